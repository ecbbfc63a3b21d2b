//! Bad flags and configs: a one-line error naming the flag, exit code 2, no guest
//! started and nothing left behind.

use std::time::Duration;

use mosaic_tests::*;

fn refused(args: &[&str], flag: &str, message: &str) {
    let dir = Scratch::new("cli");
    let serial = dir.path("serial.txt");
    let stats = dir.path("stats.json");
    let mut all: Vec<String> = vec!["run".into()];
    all.extend(args.iter().map(|s| s.to_string()));
    if !args.iter().any(|a| a.starts_with("--serial")) {
        all.push(format!("--serial=file:{}", serial.display()));
    }
    if !args.iter().any(|a| a.starts_with("--stats-json")) {
        all.push(format!("--stats-json={}", stats.display()));
    }
    let out = mosaic(&all, Duration::from_secs(30));
    assert_eq!(out.code, Some(2), "{args:?}: stderr {}", out.stderr);
    let line = out.stderr.trim_end();
    assert_eq!(line.lines().count(), 1, "one line: {line:?}");
    assert!(line.contains(flag), "{args:?}: {line:?} names {flag}");
    assert!(line.contains(message), "{args:?}: {line:?} says {message:?}");
    assert!(!serial.exists(), "no serial file left behind");
    assert!(!stats.exists(), "no stats file left behind");
    assert!(out.stdout.is_empty(), "no guest output: {:?}", out.stdout);
}

#[test]
fn invalid_sizes() {
    refused(&["--memory=size=12Q"], "--memory", "'12Q' is not a size");
    refused(&["--memory=size=0"], "--memory", "below the minimum");
    refused(&["--memory=size=3M"], "--memory", "not a multiple of 2097152");
    refused(&["--memory=backend=memfd"], "--memory", "size= is required");
    refused(&["--memory=size=64M,colour=blue"], "--memory", "unknown key 'colour'");
}

#[test]
fn unknown_backend() {
    refused(&["--memory=size=64M,backend=floppy"], "--memory", "unknown backend 'floppy'");
}

#[test]
fn missing_files() {
    refused(&["--memory=size=64M,backend=file,path=/nonexistent/ram"], "--memory", "/nonexistent/ram");
    refused(&["--memory=size=64M,backend=file"], "--memory", "backend=file needs path=");
    refused(&["--kernel=/nonexistent/vmlinuz"], "--kernel", "/nonexistent/vmlinuz");
    refused(&["--guest=/nonexistent/guest.elf"], "--guest", "neither a built-in guest");
    refused(&["--guest=/etc/hostname"], "--guest", "not a guest program");
    refused(&["--stats-json=/nonexistent/dir/stats.json"], "--stats-json", "does not exist");
}

#[test]
fn too_many_vcpus() {
    refused(&["--vcpus=300"], "--vcpus", "out of range");
    refused(&["--vcpus=0"], "--vcpus", "out of range");
}

#[test]
fn more_memory_than_the_host_can_back() {
    refused(&["--memory=size=16T"], "--memory", "more than this host can back");
}

#[test]
fn conflicting_and_misplaced_flags() {
    refused(&["--guest=hello", "--kernel=/x"], "--kernel", "cannot be used together");
    refused(&["--vcpus=two"], "--vcpus", "invalid value 'two'");
    refused(&["--memroy=size=64M"], "--memroy", "unexpected argument");
    refused(&["--cmdline=quiet"], "--cmdline", "needs --kernel");
    refused(&["--serial=tty"], "--serial", "not stdout, none or file:PATH");
}

#[test]
fn bad_config_files() {
    let dir = Scratch::new("cfg");
    let bad_json = dir.path("bad.json");
    std::fs::write(&bad_json, "{ not json").unwrap();
    refused(&[&format!("--config={}", bad_json.display())], "--config", "not a valid Mosaic config");
    let unknown = dir.path("unknown.json");
    std::fs::write(&unknown, r#"{"vcpu": 2}"#).unwrap();
    refused(&[&format!("--config={}", unknown.display())], "--config", "unknown field `vcpu`");
    let bad_mem = dir.path("mem.json");
    std::fs::write(&bad_mem, r#"{"memory": [{"size": "1G", "backend": "tape"}]}"#).unwrap();
    refused(&[&format!("--config={}", bad_mem.display())], "--memory", "unknown backend 'tape'");
    refused(&["--config=/nonexistent.json"], "--config", "cannot read");
}

#[test]
fn config_file_runs_a_guest_and_flags_override_it() {
    let dir = Scratch::new("cfg-ok");
    let cfg = dir.path("vm.json");
    std::fs::write(&cfg, r#"{"guest": "hello", "vcpus": 2, "memory": [{"size": "96M", "backend": "anon"}]}"#).unwrap();
    let out = run_guest(&[&format!("--config={}", cfg.display())], Duration::from_secs(60));
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    assert!(out.serial.contains("guest RAM 96 MiB, 2 vCPUs online"), "serial: {}", out.serial);
    let out = run_guest(&[&format!("--config={}", cfg.display()), "--vcpus=1"], Duration::from_secs(60));
    assert!(out.serial.contains("guest RAM 96 MiB, 1 vCPUs online"), "serial: {}", out.serial);
}

#[test]
fn guest_cpl_choices() {
    refused(&["--guest-cpl=1"], "--guest-cpl", "not 0 or 3");
    refused(&["--guest-cpl=0", "--kernel=/etc/hostname"], "--guest-cpl", "not --kernel");
}

#[test]
fn private_engine_choices() {
    refused(&["--private-engine=bogus"], "--private-engine", "not userspace or kernel");
    refused(&["--private-engine=kernel", "--memory=size=64M,backend=gmem"], "--private-engine", "gmem zone");
    refused(
        &["--private-engine=kernel", "--kernel=/etc/hostname", "--memory=size=64M,private=on"],
        "--private-engine",
        "free RAM of guest programs only",
    );
    let hc = host_check();
    let caps = &hc["kvm"]["caps"];
    let kernel_ok =
        caps["memory_attributes"].as_u64().unwrap_or(0) & 8 != 0 && caps["vm_types"].as_u64().unwrap_or(0) & 2 != 0;
    if !kernel_ok {
        // This host cannot: the run is refused before anything starts, naming what is missing.
        refused(&["--private-engine=kernel"], "--private-engine kernel", "KVM_CAP_MEMORY_ATTRIBUTES");
    }
}
