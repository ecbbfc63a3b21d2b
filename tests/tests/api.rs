//! The API socket over a real Unix socket: the VM lifecycle through `mosaic ctl`, and
//! misuse (malformed, unknown, oversized, half-closed requests) answered with a 4xx
//! while the VM runs on.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use mosaic_tests::*;

/// A long-running guest (memtest over 4 GiB of 4K pages takes seconds here) with an
/// API socket.
fn start(sock: &Path, stats: &Path) -> Child {
    let child = Command::new(mosaic_bin())
        .args(["run", "--guest=memtest", "--memory=size=4G", "--serial=none"])
        .arg(format!("--api-socket={}", sock.display()))
        .arg(format!("--stats-json={}", stats.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_for_path(sock, Duration::from_secs(20)), "socket never appeared");
    child
}

/// Sends raw bytes, optionally half-closing, and returns (status, body).
fn raw(sock: &Path, bytes: &[u8], half_close: bool) -> (u16, String) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.write_all(bytes).unwrap();
    if half_close {
        s.shutdown(Shutdown::Write).unwrap();
    }
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out.split("\r\n\r\n").nth(1).unwrap_or("").to_string())
}

fn ctl(sock: &Path, args: &[&str]) -> Output {
    let mut all = vec!["ctl".to_string(), format!("--api-socket={}", sock.display())];
    all.extend(args.iter().map(|s| s.to_string()));
    mosaic(&all, Duration::from_secs(30))
}

#[test]
fn lifecycle_through_mosaic_ctl() {
    let dir = Scratch::new("api");
    let (sock, stats) = (dir.path("api.sock"), dir.path("stats.json"));
    let mut child = start(&sock, &stats);
    assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o600);
    let vm = ctl(&sock, &["--json", "vm"]);
    assert_eq!(vm.code, Some(0), "{}", vm.stderr);
    let v: serde_json::Value = serde_json::from_str(&vm.stdout).unwrap();
    assert_eq!(
        (v["state"].as_str(), v["guest"].as_str(), v["vcpus"].as_u64()),
        (Some("running"), Some("memtest"), Some(1))
    );
    let mem = ctl(&sock, &["--json", "memory"]);
    let m: serde_json::Value = serde_json::from_str(&mem.stdout).unwrap();
    assert_eq!(m["regions"].as_array().unwrap().len(), 2, "4G is split around the hole");
    assert_eq!(m["private_memory"]["shared_bytes"], 4u64 << 30);
    assert_eq!(ctl(&sock, &["pause"]).code, Some(0));
    assert!(ctl(&sock, &["vm"]).stdout.starts_with("state paused"));
    let again = ctl(&sock, &["pause"]);
    assert_eq!(again.code, Some(1));
    assert!(again.stderr.contains("already paused (409)"), "{}", again.stderr);
    assert_eq!(ctl(&sock, &["resume"]).code, Some(0));
    assert!(ctl(&sock, &["resume"]).stderr.contains("not paused (409)"));
    assert_eq!(ctl(&sock, &["shutdown"]).code, Some(0));
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(!sock.exists(), "socket removed at exit");
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    assert_eq!(s["outcome"]["kind"], "api_shutdown");
}

#[test]
fn misuse_gets_4xx_and_the_vm_runs_on() {
    let dir = Scratch::new("api-misuse");
    let (sock, stats) = (dir.path("api.sock"), dir.path("stats.json"));
    let mut child = start(&sock, &stats);
    let cases: &[(&[u8], bool, u16, &str)] = &[
        (b"NONSENSE\x01\r\n\r\n", false, 400, "malformed"),
        (b"GET /api/v1/nope HTTP/1.1\r\n\r\n", false, 404, "no such endpoint"),
        (b"DELETE /api/v1/vm HTTP/1.1\r\n\r\n", false, 405, "not allowed"),
        (b"PUT /api/v1/vm/pause HTTP/1.1\r\nContent-Length: 9999999\r\n\r\n", false, 413, "too large"),
        (b"PUT /api/v1/vm/pause HTTP/1.1\r\nContent-Length: 5\r\n\r\n[1,2]", false, 400, "JSON object"),
        (b"PUT /api/v1/vm/pause HTTP/1.1\r\nContent-Length: 12\r\n\r\n{\"now\":true}", false, 400, "no fields"),
        (b"PUT /api/v1/vm/live-update HTTP/1.1\r\nContent-Length: 12\r\n\r\n{\"colour\":1}", false, 400, "unknown field"),
        (
            b"PUT /api/v1/vm/live-update HTTP/1.1\r\nContent-Length: 25\r\n\r\n{\"binary\":\"/nonexistent\"}",
            false,
            400,
            "not a file",
        ),
        (
            b"PUT /api/v1/vm/live-update HTTP/1.1\r\nContent-Length: 36\r\n\r\n{\"binary\":\"/bin/sh\",\"incoming\":\"/x\"}",
            false,
            400,
            "not both",
        ),
        (b"GET /api/v1/vm HTTP/1.1\r\nHost: x\r\n", true, 400, "closed"),
        (b"PUT /api/v1/vm/shutdown HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}", true, 400, "closed"),
    ];
    for (req, half, want, says) in cases {
        let (status, body) = raw(&sock, req, *half);
        assert_eq!(status, *want, "{:?}: {body}", String::from_utf8_lossy(req));
        assert!(body.contains(says), "{:?}: {body}", String::from_utf8_lossy(req));
        let vm = ctl(&sock, &["vm"]);
        assert!(
            vm.stdout.starts_with("state running"),
            "VM runs on after {:?}: {}",
            String::from_utf8_lossy(req),
            vm.stdout
        );
    }
    assert_eq!(ctl(&sock, &["shutdown"]).code, Some(0));
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

#[test]
fn an_existing_socket_path_is_refused_at_start() {
    let dir = Scratch::new("api-exists");
    let sock = dir.path("api.sock");
    std::fs::write(&sock, b"").unwrap();
    let out = run_guest(&[&format!("--api-socket={}", sock.display())], Duration::from_secs(30));
    assert_eq!(out.code, Some(2));
    assert!(out.stderr.contains("--api-socket:") && out.stderr.contains("already exists"), "{}", out.stderr);
    assert!(sock.exists(), "the existing file is left alone");
}
