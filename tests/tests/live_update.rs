//! Live update with real guests: `heartbeat` keeps rewriting a checksummed pattern
//! over its RAM while the VM is handed from process to process, then verifies every
//! page and reports the largest pause it saw. Also fault injection (the new process
//! killed at each phase), corrupt state sent to `--incoming`, backends that cannot be
//! handed over, and API misuse during an update.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mosaic_tests::pool::PoolPages;
use mosaic_tests::*;
use serde_json::Value;
use vmm::live::wire::{Channel, Message};

const GUEST_DONE_TIMEOUT: Duration = Duration::from_secs(120);

/// A VM started for a live-update test, with its serial console and stats in files
/// (the processes it is handed to keep writing them).
struct LiveVm {
    dir: Scratch,
    sock: PathBuf,
    first: Child,
    pids: Vec<u32>,
}

impl LiveVm {
    fn start(tag: &str, flags: &[&str]) -> LiveVm {
        let dir = Scratch::new(tag);
        let sock = dir.path("api.sock");
        let mut args: Vec<String> = vec!["run".into(), format!("--api-socket={}", sock.display())];
        args.push(format!("--serial=file:{}", dir.path("serial.txt").display()));
        args.push(format!("--stats-json={}", dir.path("stats.json").display()));
        args.extend(flags.iter().map(|s| s.to_string()));
        log_guest(&args);
        let first = Command::new(mosaic_bin())
            .args(&args)
            .stdin(Stdio::null())
            .stdout(File::create(dir.path("stdout.txt")).unwrap())
            .stderr(File::create(dir.path("stderr.txt")).unwrap())
            .spawn()
            .unwrap();
        let up = wait_for_path(&sock, Duration::from_secs(30));
        assert!(up, "socket never appeared: {}", read(&dir.path("stderr.txt")));
        let pid = first.id();
        LiveVm { dir, sock, first, pids: vec![pid] }
    }

    fn request(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let a = vmm::api::client::request(&self.sock, method, path, body).expect("API request");
        (a.status, a.body)
    }

    fn live_update(&mut self, body: Option<&str>) -> (u16, Value) {
        let (status, v) = self.request("PUT", "/api/v1/vm/live-update", body);
        if status == 200 {
            self.pids.push(v["pid"].as_u64().unwrap() as u32);
        }
        (status, v)
    }

    fn vm(&self) -> Value {
        let (status, v) = self.request("GET", "/api/v1/vm", None);
        assert_eq!(status, 200, "{v}");
        v
    }

    fn serial(&self) -> String {
        read(&self.dir.path("serial.txt"))
    }

    fn stderr(&self) -> String {
        read(&self.dir.path("stderr.txt"))
    }

    /// Waits for the guest to end (its last process writes the stats file) and
    /// returns the stats.
    fn wait_done(&mut self) -> Value {
        let stats = self.dir.path("stats.json");
        let t = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(&stats) {
                if let Ok(v) = serde_json::from_str::<Value>(&text) {
                    return v;
                }
            }
            assert!(
                t.elapsed() < GUEST_DONE_TIMEOUT,
                "the guest did not finish; serial:\n{}\nstderr:\n{}",
                self.serial(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for LiveVm {
    fn drop(&mut self) {
        for &pid in &self.pids {
            // SAFETY: kill(2) on pids this test started; a stale pid is at worst ESRCH.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let _ = self.first.wait();
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// `heartbeat: update <g> gap <cycles> cycles <us> us ...` lines: (generation, gap µs).
fn update_lines(serial: &str) -> Vec<(u64, u64)> {
    serial
        .lines()
        .filter_map(|l| l.strip_prefix("heartbeat: update "))
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w[0].parse().unwrap(), w[4].parse().unwrap())
        })
        .collect()
}

fn assert_heartbeat_ok(serial: &str, updates: u64) {
    assert!(serial.lines().any(|l| l == "heartbeat: ok"), "heartbeat did not verify:\n{serial}");
    let summary = serial.lines().find(|l| l.starts_with("heartbeat: vcpus")).expect("summary line");
    assert!(summary.ends_with(&format!("updates {updates}")), "{summary}");
}

#[test]
fn heartbeat_survives_20_consecutive_live_updates_under_load() {
    let mut vm = LiveVm::start("lu-20", &["--guest=heartbeat", "--guest-arg=20", "--vcpus=2", "--memory=size=256M"]);
    let mut downtimes = Vec::new();
    for i in 1..=20u64 {
        let (status, r) = vm.live_update(None);
        assert_eq!(status, 200, "update {i}: {r}\nstderr:\n{}", vm.stderr());
        assert_eq!(r["generation"], i, "{r}");
        let phases: u64 = ["pause_us", "save_us", "transfer_us", "restore_us", "resume_us"]
            .iter()
            .map(|k| r[k].as_u64().unwrap())
            .sum();
        let downtime = r["downtime_us"].as_u64().unwrap();
        assert!(phases <= downtime + 5, "phases {phases} us exceed the downtime {downtime} us: {r}");
        downtimes.push(downtime);
        let v = vm.vm();
        assert_eq!(v["live_update_generation"], i);
        assert_eq!(v["pid"], r["pid"], "the API socket is served by the new process");
        // Let the guest run (and print the update's line) before the next one.
        std::thread::sleep(Duration::from_millis(150));
    }
    assert_eq!(vm.first.wait().unwrap().code(), Some(0), "the first process exits 0 once it has handed over");
    let stats = vm.wait_done();
    let serial = vm.serial();
    assert_heartbeat_ok(&serial, 20);
    let lines = update_lines(&serial);
    assert_eq!(lines.iter().map(|l| l.0).collect::<Vec<_>>(), (1..=20).collect::<Vec<_>>(), "{serial}");
    assert_eq!(stats["exit_code"], 0);
    assert_eq!(stats["live_update_generation"], 20);
    let max_gap = lines.iter().map(|l| l.1).max().unwrap();
    eprintln!("downtime as the VMM measured it (us): {downtimes:?}; the guest's largest gap: {max_gap} us");
    // The guest saw the pause: a gap at least as long as part of the VMM-measured
    // downtime (its TSC keeps real time across the update).
    assert!(max_gap > 0, "{serial}");
}

#[test]
fn a_hugetlb_guest_keeps_private_pages_private_and_huge_pages_huge() {
    let _pool = match PoolPages::reserve(2 << 20, 128) {
        Ok(p) => p,
        Err(e) => return skip(&format!("hugetlb live update: {e}")),
    };
    let mut vm = LiveVm::start(
        "lu-hugetlb",
        &["--guest=heartbeat", "--guest-arg=1", "--memory=size=256M,backend=hugetlb,page-size=2M,private=on"],
    );
    let (_, before) = vm.request("GET", "/api/v1/vm/memory", None);
    let private_before = before["private_memory"]["private_bytes"].as_u64().unwrap();
    assert!(private_before > 200 << 20, "{before}");
    let (status, r) = vm.live_update(None);
    assert_eq!(status, 200, "{r}\n{}", vm.stderr());
    let new_pid = r["pid"].as_u64().unwrap();
    let (_, after) = vm.request("GET", "/api/v1/vm/memory", None);
    assert_eq!(after["private_memory"]["private_bytes"].as_u64(), Some(private_before), "{after}");
    // The new process's view of the private pages is PROT_NONE.
    let maps = std::fs::read_to_string(format!("/proc/{new_pid}/maps")).unwrap();
    assert!(maps.lines().any(|l| l.contains("---s") && l.contains("hugetlb")), "no PROT_NONE view:\n{maps}");
    let stats = vm.wait_done();
    assert_heartbeat_ok(&vm.serial(), 1);
    assert_eq!(stats["private_memory"]["private_bytes"].as_u64(), Some(private_before));
    let pages_2m = stat(&stats, "kvm_vm", "pages_2m");
    let pages_4k = stat(&stats, "kvm_vm", "pages_4k");
    let ratio = stats["coverage"]["kvm_huge_ratio"].as_f64().unwrap();
    eprintln!("after the update: KVM pages_2m {pages_2m}, pages_4k {pages_4k}, huge ratio {ratio:.4}");
    assert!(ratio >= 0.99, "KVM huge coverage {ratio} after the update: {}", stats["coverage"]);
    assert!(stats["coverage"]["host_huge_ratio"].as_f64().unwrap() >= 0.99, "{}", stats["coverage"]);
}

/// Starts `mosaic run --incoming SOCK` (as an operator would), with `env` set.
fn incoming(sock: &Path, env: &[(&str, &str)], dir: &Scratch, tag: &str) -> Child {
    let mut c = Command::new(mosaic_bin());
    c.arg("run").arg(format!("--incoming={}", sock.display()));
    for (k, v) in env {
        c.env(k, v);
    }
    let child = c
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(dir.path(&format!("{tag}.stderr"))).unwrap())
        .spawn()
        .unwrap();
    assert!(wait_for_path(sock, Duration::from_secs(10)), "--incoming socket never appeared");
    child
}

#[test]
fn the_guest_runs_on_when_the_new_process_dies_at_any_phase() {
    let mut vm = LiveVm::start("lu-faults", &["--guest=heartbeat", "--guest-arg=1", "--vcpus=2", "--memory=size=128M"]);
    for phase in ["fds-received", "state-half-read", "restored"] {
        let target = vm.dir.path(&format!("{phase}.sock"));
        let mut child = incoming(&target, &[(vmm::live::incoming::DIE_AT_ENV, phase)], &vm.dir, phase);
        let body = serde_json::json!({ "incoming": target }).to_string();
        let (status, r) = vm.live_update(Some(&body));
        assert_eq!(status, 502, "{phase}: {r}");
        assert!(r["error"].as_str().unwrap().contains("closed the live-update channel"), "{phase}: {r}");
        let st = child.wait().unwrap();
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), Some(libc::SIGKILL), "{phase}");
        let v = vm.vm();
        assert_eq!(v["state"], "running", "{phase}: {v}");
        assert_eq!(v["live_update_generation"], 0, "{phase}");
        assert_eq!(v["pid"], vm.first.id(), "{phase}: the old process still serves the API");
    }
    // A new process that stalls after restoring: the old one gives up, keeps the guest
    // (it won the commit word), and the new one, finding the word decided, never runs
    // the guest.
    let target = vm.dir.path("stall.sock");
    let mut child = incoming(&target, &[(vmm::live::incoming::DIE_AT_ENV, "stall-restored")], &vm.dir, "stall");
    let body = serde_json::json!({ "incoming": target }).to_string();
    let (status, r) = vm.live_update(Some(&body));
    assert_eq!(status, 502, "{r}");
    assert!(r["error"].as_str().unwrap().contains("did not answer in time"), "{r}");
    assert_eq!(vm.vm()["pid"], vm.first.id());
    assert_eq!(child.wait().unwrap().code(), Some(125));
    let stderr = read(&vm.dir.path("stall.stderr"));
    assert!(
        stderr.contains("gave up on it before this one could commit") && stderr.contains("nothing ran here"),
        "{stderr}"
    );
    // The next update succeeds, and the guest then verifies all of its memory.
    let (status, r) = vm.live_update(None);
    assert_eq!(status, 200, "{r}\n{}", vm.stderr());
    let stats = vm.wait_done();
    assert_heartbeat_ok(&vm.serial(), 1);
    assert_eq!(stats["live_update_generation"], 1);
    assert_eq!(vm.stderr().matches("live update failed, the guest runs on here").count(), 4, "{}", vm.stderr());
}

/// A 64 MiB memfd, as an old process would hand over.
fn memfd(size: u64) -> OwnedFd {
    // SAFETY: a valid NUL-terminated name; the result is checked.
    let raw = unsafe { libc::memfd_create(c"test-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(raw >= 0);
    // SAFETY: memfd_create returned a new fd nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    File::from(fd.try_clone().unwrap()).set_len(size).unwrap();
    fd
}

fn hello(layout: guest_mem::MemoryLayout) -> vmm::live::Hello {
    vmm::live::Hello {
        layout,
        vcpus: 1,
        guest: "test".into(),
        is_program: true,
        pit: false,
        api_socket: None,
        start_monotonic_ns: 0,
        info: Default::default(),
        fds: vmm::live::FdLayout { zones: 1, console: false, api: false },
    }
}

/// Plays the old process against `mosaic run --incoming`, in protocol `version`,
/// sending `state` after a valid Hello (which hands over a listening API socket if
/// `api` is given); returns what the new process answered and its stderr. In v2 the
/// new process must never have committed.
fn send_state(
    tag: &str,
    version: u32,
    state: Option<Vec<u8>>,
    garbage_hello: bool,
    api: Option<&Path>,
) -> (Option<Message>, Option<i32>, String) {
    let dir = Scratch::new(tag);
    let sock = dir.path("in.sock");
    let mut child = incoming(&sock, &[], &dir, "new");
    let mut ch = Channel::new(UnixStream::connect(&sock).unwrap());
    ch.set_version(version);
    ch.set_timeout(Duration::from_secs(30)).unwrap();
    let arbiter = vmm::live::arbiter::Arbiter::create().unwrap();
    let mut answer = None;
    if garbage_hello {
        // A frame with the right magic and a newer protocol version.
        let frame = vmm::live::wire::MESSAGES.seal(99, b"whatever");
        ch.raw().try_clone().unwrap().write_all(&frame).unwrap();
    } else {
        let zone =
            guest_mem::ZoneSpec { size: 64 << 20, backend: guest_mem::BackendSpec::new(guest_mem::BackendKind::Memfd) };
        let layout = guest_mem::MemoryLayout::place(vec![zone]).unwrap();
        let fd = memfd(64 << 20);
        let mut h = hello(layout);
        let listener = api.map(|p| std::os::unix::net::UnixListener::bind(p).unwrap());
        let mut fds = vec![fd.as_raw_fd()];
        if let (Some(l), Some(p)) = (&listener, api) {
            h.api_socket = Some(p.to_path_buf());
            h.fds.api = true;
            fds.push(l.as_raw_fd());
        }
        ch.send(&Message::Hello(Box::new(h)), &fds).unwrap();
        if version >= 2 {
            ch.send(&Message::Arbiter, &[arbiter.fd().as_raw_fd()]).unwrap();
        }
        let (m, _) = ch.recv(None).unwrap();
        assert!(matches!(m, Message::Prepared { .. }), "{m:?}");
        ch.send(&Message::State(state.unwrap_or_default()), &[]).unwrap();
    }
    if let Ok((m, _)) = ch.recv(None) {
        answer = Some(m);
    }
    let code = child.wait().unwrap().code();
    assert!(!arbiter.is_committed(), "{tag}: a refused process committed");
    (answer, code, read(&dir.path("new.stderr")))
}

#[test]
fn corrupt_truncated_and_wrong_version_state_is_refused() {
    use vmm::state::format::{encode, StateV2, FORMAT_VERSION};
    let (layout, attrs) = memfd_layout_64m();
    let kvm = kvm_ioctls_vm_state();
    let state = StateV2 { layout, attrs, vcpus: Vec::new(), vm: kvm, devices: Default::default(), captured_ns: 0 };
    let good = encode(FORMAT_VERSION, &state).unwrap();
    let mut corrupt = good.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0x40;
    let truncated = good[..good.len() - 100].to_vec();
    let newer = encode(FORMAT_VERSION + 1, &state).unwrap();
    for (tag, bytes, says) in [
        ("corrupt", corrupt, "CRC mismatch"),
        ("truncated", truncated, "truncated"),
        ("newer", newer, "newer Mosaic"),
        ("vcpus", good, "holds 0 vCPUs"),
    ] {
        // One refused process is handed the (old process's) API socket: it must leave
        // its file alone. Both protocol versions are played (v1: an older old process).
        let api_dir = Scratch::new(&format!("lu-bad-{tag}-api"));
        let api = (tag == "corrupt").then(|| api_dir.path("api.sock"));
        let version = if tag == "truncated" { 1 } else { 2 };
        let (answer, code, stderr) = send_state(&format!("lu-bad-{tag}"), version, Some(bytes), false, api.as_deref());
        if let Some(p) = &api {
            assert!(p.exists(), "{tag}: the refused process removed the API socket it was handed: {stderr}");
        }
        match answer {
            Some(Message::Failed(m)) => assert!(m.contains(says), "{tag}: {m}"),
            other => panic!("{tag}: expected Failed, got {other:?}"),
        }
        assert_eq!(code, Some(125), "{tag}: {stderr}");
        assert!(stderr.contains("live update refused, nothing ran here") && stderr.contains(says), "{tag}: {stderr}");
    }
    // A Hello of a protocol version this build does not speak: refused before any VM
    // is built.
    let (answer, code, stderr) = send_state("lu-bad-hello", 2, None, true, None);
    assert!(matches!(answer, Some(Message::Failed(ref m)) if m.contains("version 99")), "{answer:?}");
    assert_eq!(code, Some(125), "{stderr}");
}

/// An older old process (protocol v1: Ready and Commit messages, no commit word)
/// hands its guest to this build, which answers in v1 and runs the guest only once
/// Commit came.
#[test]
fn an_older_old_process_hands_over_with_protocol_v1() {
    use vmm::state::format::{encode, StateV2, VcpuEntry, FORMAT_VERSION};
    let (layout, attrs) = memfd_layout_64m();
    // One vCPU's state, as a fresh vCPU holds it (the guest would run from reset).
    let donor = small_vm();
    let vcpu = donor.create_vcpu(0, 1).unwrap();
    let kvm = vmm::state::vcpu::capture(&vcpu, donor.kvm()).unwrap();
    let entry = VcpuEntry { kvm: Some(kvm), ports: Default::default(), tsc_offset: None };
    let state = StateV2 {
        layout: layout.clone(),
        attrs,
        vcpus: vec![entry],
        vm: vmm::state::vm::capture(donor.fd()).unwrap(),
        devices: Default::default(),
        captured_ns: 0,
    };
    let frame = encode(FORMAT_VERSION, &state).unwrap();

    let dir = Scratch::new("lu-v1");
    let sock = dir.path("in.sock");
    let mut child = incoming(&sock, &[], &dir, "new");
    let mut ch = Channel::new(UnixStream::connect(&sock).unwrap());
    ch.set_version(1);
    ch.set_timeout(Duration::from_secs(30)).unwrap();
    let fd = memfd(64 << 20);
    ch.send(&Message::Hello(Box::new(hello(layout))), &[fd.as_raw_fd()]).unwrap();
    let next = |ch: &mut Channel, what: &str| {
        let (m, _) = ch.recv(None).unwrap_or_else(|e| panic!("waiting for {what}: {e}"));
        assert_eq!(ch.peer_version(), 1, "{what} did not come in protocol v1");
        m
    };
    assert!(matches!(next(&mut ch, "Prepared"), Message::Prepared { .. }));
    ch.send(&Message::State(frame), &[]).unwrap();
    let m = next(&mut ch, "Ready");
    assert!(matches!(m, Message::Ready { received_ns, restored_ns } if received_ns > 0 && restored_ns >= received_ns));
    // Not committed yet: nothing runs there.
    assert!(child.try_wait().unwrap().is_none());
    ch.send(&Message::Commit, &[]).unwrap();
    let m = next(&mut ch, "Running");
    assert!(matches!(m, Message::Running { running_ns } if running_ns > 0), "{m:?}");
    let _ = child.kill();
    let _ = child.wait();
}

/// The layout (one 64 MiB memfd zone) and all-shared page attributes an old process
/// would send.
fn memfd_layout_64m() -> (guest_mem::MemoryLayout, guest_mem::attrs::AttrState) {
    let zone =
        guest_mem::ZoneSpec { size: 64 << 20, backend: guest_mem::BackendSpec::new(guest_mem::BackendKind::Memfd) };
    let layout = guest_mem::MemoryLayout::place(vec![zone]).unwrap();
    let ram: Vec<(u64, u64)> = layout.regions().iter().map(|r| (r.gpa, r.size)).collect();
    let attrs = guest_mem::Attributes::new(&ram, guest_mem::PageState::Shared).to_state();
    (layout, attrs)
}

/// A freshly made VM (2 MiB anon) with an irqchip.
fn small_vm() -> vmm::vm::Vm {
    let zone =
        guest_mem::ZoneSpec { size: 2 << 20, backend: guest_mem::BackendSpec::new(guest_mem::BackendKind::Anon) };
    vmm::vm::Vm::new(guest_mem::MemoryLayout::place(vec![zone]).unwrap()).unwrap()
}

/// VM state of a freshly made VM with an irqchip (what an empty old VM would send).
fn kvm_ioctls_vm_state() -> vmm::state::VmState {
    vmm::state::vm::capture(small_vm().fd()).unwrap()
}

#[test]
fn backends_without_a_shareable_fd_are_refused_and_the_vm_runs_on() {
    for (mem, says) in [("size=64M,backend=anon", "anonymous memory"), ("size=64M,backend=gmem", "guest_memfd")] {
        let mut vm = LiveVm::start("lu-refused", &["--guest=heartbeat", "--guest-arg=0", &format!("--memory={mem}")]);
        let (status, r) = vm.live_update(None);
        assert_eq!(status, 409, "{mem}: {r}");
        assert!(r["error"].as_str().unwrap().contains(says), "{mem}: {r}");
        let stats = vm.wait_done();
        assert_eq!(stats["exit_code"], 0, "{mem}");
        assert_heartbeat_ok(&vm.serial(), 0);
    }
}

#[test]
fn a_second_update_while_one_runs_and_an_update_while_paused_get_409() {
    let mut vm = LiveVm::start("lu-misuse", &["--guest=heartbeat", "--guest-arg=1", "--memory=size=128M"]);
    // A fake incoming process that accepts and never answers: the update waits.
    let fake = vm.dir.path("fake.sock");
    let listener = UnixListener::bind(&fake).unwrap();
    let sock = vm.sock.clone();
    let body = serde_json::json!({ "incoming": fake }).to_string();
    let first =
        std::thread::spawn(move || vmm::api::client::request(&sock, "PUT", "/api/v1/vm/live-update", Some(&body)));
    let (conn, _) = listener.accept().unwrap();
    let (status, r) = vm.live_update(None);
    assert_eq!(status, 409, "{r}");
    assert!(r["error"].as_str().unwrap().contains("already in progress"), "{r}");
    let (status, r) = vm.request("PUT", "/api/v1/vm/pause", None);
    assert_eq!(status, 409, "{r}");
    assert_eq!(vm.vm()["state"], "live-updating");
    // The fake process goes away: the first update fails, the VM runs on.
    drop(conn);
    let a = first.join().unwrap().unwrap();
    assert_eq!(a.status, 502, "{}", a.body);
    assert_eq!(vm.vm()["state"], "running");
    // Paused VMs are not handed over.
    assert_eq!(vm.request("PUT", "/api/v1/vm/pause", None).0, 204);
    let (status, r) = vm.live_update(None);
    assert_eq!(status, 409, "{r}");
    assert!(r["error"].as_str().unwrap().contains("paused"), "{r}");
    assert_eq!(vm.request("PUT", "/api/v1/vm/resume", None).0, 204);
    let (status, r) = vm.live_update(None);
    assert_eq!(status, 200, "{r}");
    vm.wait_done();
    assert_heartbeat_ok(&vm.serial(), 1);
}
