//! `hello` and `memtest` on every backend, 1 and 2 vCPUs, 64 MiB to 1 GiB (and one
//! guest whose RAM is split around the MMIO hole): the guest's own verdict and
//! checksum, and what KVM and the host report.

use std::time::Duration;

use mosaic_tests::*;

const TIMEOUT: Duration = Duration::from_secs(300);

/// `--memory` value for `backend` and `size`; file backings live on tmpfs in `dir`.
fn memory_flag(backend: &str, size: &str, dir: &Scratch) -> String {
    match backend {
        "file" => {
            let p = dir.path("ram");
            std::fs::write(&p, b"").unwrap();
            format!("--memory=size={size},backend=file,path={}", p.display())
        }
        b => format!("--memory=size={size},backend={b}"),
    }
}

fn gmem_usable() -> bool {
    let hc = host_check();
    let flags = hc["kvm"]["caps"]["guest_memfd_flags"].as_u64().unwrap_or(0);
    if flags & 3 != 3 {
        skip("gmem backend: host lacks guest_memfd MMAP|INIT_SHARED (host-check kvm.caps.guest_memfd_flags)");
        return false;
    }
    true
}

fn hello(backend: &str, vcpus: u32) {
    if backend == "gmem" && !gmem_usable() {
        return;
    }
    let dir = Scratch::under(std::path::Path::new("/dev/shm"), "hello");
    let mem = memory_flag(backend, "64M", &dir);
    let out = run_guest(&["--guest=hello", &format!("--vcpus={vcpus}"), &mem], TIMEOUT);
    assert_eq!(out.code, Some(0), "stderr: {}\nserial: {}", out.stderr, out.serial);
    let want = format!("Hello from Mosaic! guest RAM 64 MiB, {vcpus} vCPU");
    assert!(out.serial.contains(&want), "serial: {:?}", out.serial);
    let stats = out.stats.expect("stats json");
    assert_eq!(stats["exit_code"], 0);
    assert_eq!(stats["outcome"]["kind"], "exit");
    assert_eq!(stats["memory"][0]["backend"], backend);
    assert!(stats["times"]["boot_marker_us"].as_u64().is_some(), "boot marker recorded");
    // Every byte of the banner was a port write that exited to the VMM (this host's
    // KVM counts them in `exits`, not `io_exits`).
    assert!(stat(&stats, "kvm_vcpu", "exits") >= want.len() as u64, "{}", stats["kvm_vcpu"]);
}

fn memtest(backend: &str, vcpus: u32, size: &str) {
    if backend == "gmem" && !gmem_usable() {
        return;
    }
    let dir = Scratch::under(std::path::Path::new("/dev/shm"), "memtest");
    let mem = memory_flag(backend, size, &dir);
    let out = run_guest(&["--guest=memtest", &format!("--vcpus={vcpus}"), &mem], TIMEOUT);
    assert_eq!(out.code, Some(0), "stderr: {}\nserial: {}", out.stderr, out.serial);
    let m = parse_memtest(&out.serial);
    assert!(m.ok, "memtest verdict: {}", out.serial);
    assert_eq!(m.mismatches, 0);
    assert_eq!(m.vcpus, u64::from(vcpus));
    let listed: u64 = m.ranges.iter().map(|r| r.1).sum();
    assert_eq!(m.bytes, listed, "memtest checked every free byte");
    let total = out.stats.as_ref().unwrap()["memory"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["size"].as_u64().unwrap())
        .sum::<u64>();
    assert!(m.bytes + (8 << 20) >= total, "free RAM is all RAM but the first few MiB: {} of {total}", m.bytes);
    assert_eq!(m.checksum, memtest_expected_checksum(&m.ranges), "guest checksum");
    let stats = out.stats.expect("stats json");
    // KVM mapped (at least) every page the guest touched.
    let mapped = stat(&stats, "kvm_vm", "pages_4k") * 4096
        + stat(&stats, "kvm_vm", "pages_2m") * (2 << 20)
        + stat(&stats, "kvm_vm", "pages_1g") * (1 << 30);
    assert!(mapped >= m.bytes, "KVM maps {mapped} bytes, guest touched {}", m.bytes);
    if backend != "gmem" {
        // The host sees the guest's memory resident in the VMM's mapping.
        let rss: u64 = stats["memory"].as_array().unwrap().iter().map(|r| r["host"]["rss"].as_u64().unwrap()).sum();
        assert!(rss >= m.bytes, "host RSS {rss} < bytes touched {}", m.bytes);
    }
}

macro_rules! backend_tests {
    ($($name:ident: $backend:expr;)*) => {
        mod hello {
            use super::*;
            $(
                #[test]
                fn $name() {
                    hello($backend, 1);
                    hello($backend, 2);
                }
            )*
        }
        mod memtest_64m {
            use super::*;
            $(
                #[test]
                fn $name() {
                    memtest($backend, 1, "64M");
                    memtest($backend, 2, "64M");
                }
            )*
        }
        mod memtest_1g {
            use super::*;
            $(
                #[test]
                fn $name() {
                    memtest($backend, 1, "1G");
                    memtest($backend, 2, "1G");
                }
            )*
        }
    };
}

backend_tests! {
    anon: "anon";
    memfd: "memfd";
    gmem: "gmem";
    file: "file";
}

#[test]
fn memtest_on_many_vcpus() {
    // 64 stacks fill exactly 4 MiB: the first free byte is right above the last stack.
    let out = run_guest(&["--guest=memtest", "--vcpus=64", "--memory=size=64M"], TIMEOUT);
    assert_eq!(out.code, Some(0), "stderr: {}\nserial: {}", out.stderr, out.serial);
    let m = parse_memtest(&out.serial);
    assert!(m.ok && m.vcpus == 64, "{}", out.serial);
    assert_eq!(m.checksum, memtest_expected_checksum(&m.ranges));
}

#[test]
fn memtest_across_the_mmio_hole_and_two_zones() {
    // Zone 0 (memfd) fills RAM up to 3 GiB and continues at 4 GiB; zone 1 (anon) follows.
    let out = run_guest(
        &["--guest=memtest", "--vcpus=2", "--memory=size=3136M,backend=memfd", "--memory=size=64M,backend=anon"],
        TIMEOUT,
    );
    assert_eq!(out.code, Some(0), "stderr: {}\nserial: {}", out.stderr, out.serial);
    let m = parse_memtest(&out.serial);
    assert!(m.ok);
    assert_eq!(m.checksum, memtest_expected_checksum(&m.ranges));
    assert!(m.ranges.iter().any(|&(g, _)| g == 4 << 30), "a range starts at 4 GiB: {:?}", m.ranges);
    assert!(m.ranges.iter().all(|&(g, l)| g + l <= 3 << 30 || g >= 4 << 30), "nothing in the hole");
    let stats = out.stats.unwrap();
    let regions = stats["memory"].as_array().unwrap();
    assert_eq!(regions.len(), 3);
    assert_eq!(regions[1]["gpa"], 4u64 << 30);
    assert_eq!(regions[2]["backend"], "anon");
}

#[test]
fn faulting_guest_is_reported_with_vector_and_rip() {
    let out = run_guest(&["--guest=fault"], TIMEOUT);
    assert_eq!(out.code, Some(125), "stderr: {}", out.stderr);
    assert!(out.serial.contains("fault: touching unmapped address"));
    assert!(out.stderr.contains("guest fault on vCPU 0: vector 14 (#PF) at RIP 0x"), "stderr: {}", out.stderr);
    assert!(out.stderr.contains("CR2 0x700000000000"), "stderr: {}", out.stderr);
    let stats = out.stats.unwrap();
    assert_eq!(stats["outcome"]["kind"], "fault");
    assert_eq!(stats["outcome"]["fault"]["vector"], 14);
    assert_eq!(stats["outcome"]["fault"]["cr2"], 0x7000_0000_0000u64);
    let rip = stats["outcome"]["fault"]["rip"].as_u64().unwrap();
    assert!((0x20_0000..0x40_0000).contains(&rip), "RIP {rip:#x} is in the image");
}

/// A hand-made guest ELF: `mov dx, 0x500; mov al, 42; out dx, al`.
fn exit42_elf() -> Vec<u8> {
    let code = [0x66, 0xba, 0x00, 0x05, 0xb0, 42, 0xee, 0xeb, 0xfe];
    let mut b = vec![0u8; 0x80];
    b[0..4].copy_from_slice(b"\x7fELF");
    b[4] = 2;
    b[5] = 1;
    b[6] = 1;
    b[16..18].copy_from_slice(&2u16.to_le_bytes());
    b[18..20].copy_from_slice(&62u16.to_le_bytes());
    b[24..32].copy_from_slice(&0x20_0078u64.to_le_bytes());
    b[32..40].copy_from_slice(&64u64.to_le_bytes());
    b[52..54].copy_from_slice(&64u16.to_le_bytes());
    b[54..56].copy_from_slice(&56u16.to_le_bytes());
    b[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = &mut b[64..120];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes());
    ph[4..8].copy_from_slice(&5u32.to_le_bytes());
    ph[16..24].copy_from_slice(&0x20_0000u64.to_le_bytes());
    ph[24..32].copy_from_slice(&0x20_0000u64.to_le_bytes());
    let total = 0x78 + code.len() as u64;
    ph[32..40].copy_from_slice(&total.to_le_bytes());
    ph[40..48].copy_from_slice(&total.to_le_bytes());
    b.truncate(0x78);
    b.extend(code);
    b
}

#[test]
fn guest_from_a_path_sets_the_exit_code() {
    let dir = Scratch::new("elf");
    let p = dir.path("exit42.elf");
    std::fs::write(&p, exit42_elf()).unwrap();
    let out = run_guest(&[&format!("--guest={}", p.display())], TIMEOUT);
    assert_eq!(out.code, Some(42), "stderr: {}", out.stderr);
    assert_eq!(out.stats.unwrap()["exit_code"], 42);
}

#[test]
fn default_run_greets_on_stdout() {
    // The README's first command, as a newcomer runs it: no flags at all.
    let out = mosaic(&["run".into()], TIMEOUT);
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    assert!(out.stdout.contains("Hello from Mosaic! guest RAM 128 MiB, 1 vCPUs online"), "stdout: {}", out.stdout);
    assert!(out.stderr.contains("mosaic: starting guest program hello"), "stderr: {}", out.stderr);
}

#[test]
fn sigterm_stops_the_vm_cleanly() {
    use std::process::{Command, Stdio};
    let dir = Scratch::new("sigterm");
    let stats = dir.path("stats.json");
    let mut child = Command::new(mosaic_bin())
        .args(["run", "--guest=memtest", "--memory=size=2G", "--serial=none"])
        .arg(format!("--stats-json={}", stats.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    assert_eq!(s["outcome"]["kind"], "signal");
    assert_eq!(s["exit_code"], 128 + libc::SIGTERM);
}
