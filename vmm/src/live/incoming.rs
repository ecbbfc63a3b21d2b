//! The new process's side of a live update: `mosaic run --incoming SOCKET` (an
//! operator-started process) or `--incoming fd:N` (started by the old process).
//!
//! Everything sent is checked before it is used: the Hello's fds against its layout
//! and each zone's backend, the state frame (magic, version, length, CRC) before any
//! of it is restored, the state's layout and vCPU count against the Hello. A refusal
//! is sent back as `Failed` (the old process resumes the guest) and this process
//! exits with an error; nothing it built ever runs.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuFd;

use super::arbiter::{Arbiter, Decision};
use super::wire::{Channel, Message, MAX_MESSAGE};
use super::{HandoverInfo, Hello, LiveError};
use crate::devices::paravirt::VcpuPorts;
use crate::devices::serial::{Serial, COM1_IRQ};
use crate::devices::Devices;
use crate::run::{monotonic_ns, Machine};
use crate::state::format::{self, StateV2, VcpuEntry};
use crate::vm::handoff::Handoff;
use crate::vm::Vm;

/// How long to wait for the Hello once connected.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for the state, and then for the commit.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Test hook: the phase at which this process kills itself with SIGKILL (fault
/// injection in the integration tests): `fds-received`, `state-half-read`,
/// `restored`; or `stall-restored`: once restored, it stalls past the old process's
/// patience before it tries to commit.
pub const DIE_AT_ENV: &str = "MOSAIC_TEST_LIVE_UPDATE_DIE_AT";

/// Where the old process reaches this one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// Listen on this Unix socket path for one connection.
    Socket(PathBuf),
    /// An inherited, connected socket (the old process started this one).
    Fd(RawFd),
}

impl std::str::FromStr for Incoming {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.strip_prefix("fd:") {
            Some(n) => match n.parse::<RawFd>() {
                Ok(fd) if fd > 2 => Ok(Incoming::Fd(fd)),
                _ => Err(format!("'{s}' is not fd:N with N an inherited fd above 2")),
            },
            None if s.is_empty() => Err("the socket path is empty".into()),
            None => Ok(Incoming::Socket(s.into())),
        }
    }
}

fn die_at(phase: &str) {
    if std::env::var(DIE_AT_ENV).is_ok_and(|p| p == phase) {
        eprintln!("mosaic: {DIE_AT_ENV}={phase}: killing this process");
        // SAFETY: raising a signal has no memory-safety preconditions.
        unsafe { libc::raise(libc::SIGKILL) };
    }
}

/// Connects the channel: accepts one connection on the socket (which is removed
/// right after), or adopts the inherited fd.
fn open(incoming: &Incoming) -> Result<Channel, LiveError> {
    let start = |m: String| LiveError::Start(m);
    match incoming {
        Incoming::Socket(path) => {
            if path.exists() {
                return Err(start(format!("'{}' already exists", path.display())));
            }
            let l =
                UnixListener::bind(path).map_err(|e| start(format!("cannot listen on '{}': {e}", path.display())))?;
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
            eprintln!("mosaic: waiting for a live update on {}", path.display());
            let accepted = l.accept();
            let _ = std::fs::remove_file(path);
            let (s, _) = accepted.map_err(|e| start(format!("accept failed: {e}")))?;
            Ok(Channel::new(s))
        }
        Incoming::Fd(fd) => {
            // SAFETY: fstat only writes into the stat buffer; a bad fd fails cleanly.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            let ok = unsafe { libc::fstat(*fd, &mut st) } == 0 && st.st_mode & libc::S_IFMT == libc::S_IFSOCK;
            if !ok {
                return Err(start(format!("fd {fd} is not an inherited socket")));
            }
            // SAFETY: the fd is an open socket this process inherited for this purpose
            // and nothing else in it owns.
            let s = unsafe { UnixStream::from_raw_fd(*fd) };
            // SAFETY: F_SETFD on an fd we now own.
            unsafe { libc::fcntl(s.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
            Ok(Channel::new(s))
        }
    }
}

/// The fds of a Hello, sorted out.
struct HelloFds {
    zones: Vec<OwnedFd>,
    console: Option<OwnedFd>,
    api: Option<OwnedFd>,
}

fn check_hello(hello: &Hello, mut fds: Vec<OwnedFd>) -> Result<HelloFds, LiveError> {
    let bad = |m: String| LiveError::Protocol(m);
    if fds.len() != hello.fds.count() {
        return Err(bad(format!("{} fds came with the Hello, it announces {}", fds.len(), hello.fds.count())));
    }
    if hello.fds.zones as usize != hello.layout.zones().len() {
        return Err(bad(format!("{} zone fds for {} zones", hello.fds.zones, hello.layout.zones().len())));
    }
    if hello.vcpus == 0 || hello.vcpus > crate::boot::program::layout::MAX_VCPUS {
        return Err(bad(format!("{} vCPUs is out of range", hello.vcpus)));
    }
    if hello.fds.api != hello.api_socket.is_some() {
        return Err(bad("the API socket fd and its path do not match".into()));
    }
    let api = if hello.fds.api { fds.pop() } else { None };
    let console = if hello.fds.console { fds.pop() } else { None };
    Ok(HelloFds { zones: fds, console, api })
}

/// Builds the VM while the guest still runs in the old process.
fn prepare(hello: &Hello, zones: Vec<OwnedFd>, console: Option<OwnedFd>) -> Result<Machine, LiveError> {
    let err = |e: &dyn std::error::Error| LiveError::Restore(crate::error_chain(e));
    let vm = Vm::adopt(hello.layout.clone(), zones).map_err(|e| err(&e))?;
    if hello.pit {
        vm.create_pit().map_err(|e| err(&e))?;
    }
    let serial = Serial::with_fd(console).map_err(|e| err(&e))?;
    vm.fd().register_irqfd(serial.irq_evt(), COM1_IRQ).map_err(|e| err(&e))?;
    let elapsed = Duration::from_nanos(monotonic_ns().saturating_sub(hello.start_monotonic_ns));
    let start = Instant::now().checked_sub(elapsed).unwrap_or_else(Instant::now);
    let devices = Arc::new(Devices::new(serial, start, hello.is_program));
    let vcpus: Vec<VcpuFd> =
        (0..hello.vcpus).map(|i| vm.create_vcpu(i, hello.vcpus)).collect::<Result<_, _>>().map_err(|e| err(&e))?;
    let caps = Arc::new(crate::state::vcpu::CaptureCaps::new(vm.kvm()).map_err(|e| err(&e))?);
    Ok(Machine {
        vm: Arc::new(vm),
        devices,
        vcpus: vcpus.into_iter().map(|v| Some((v, VcpuPorts::default()))).collect(),
        guest: hello.guest.clone(),
        is_program: hello.is_program,
        caps,
        start,
        start_ns: hello.start_monotonic_ns,
    })
}

/// Checks `state` against the Hello and puts its VM-wide part (KVM VM state, devices,
/// page attributes) into the prepared machine; the vCPU entries are returned for the
/// vCPU threads to restore.
fn restore_vm(gate: &CommitGate, state: StateV2) -> Result<(Vec<VcpuEntry>, u64), LiveError> {
    let err = |e: &dyn std::error::Error| LiveError::Restore(crate::error_chain(e));
    // The VM was adopted with the Hello's layout.
    if &state.layout != gate.vm.memory().layout() {
        return Err(LiveError::Restore("the state's memory layout differs from the Hello's".into()));
    }
    if state.vcpus.len() != gate.vcpus as usize {
        return Err(LiveError::Restore(format!(
            "the state holds {} vCPUs, the Hello announced {}",
            state.vcpus.len(),
            gate.vcpus
        )));
    }
    crate::state::vm::restore(gate.vm.fd(), &state.vm).map_err(|e| err(&e))?;
    crate::live::trace::mark("vm_restored");
    gate.devices.restore(&state.devices);
    gate.vm.memory().restore_attrs(&state.attrs).map_err(|e| err(&e))?;
    crate::live::trace::mark("devices_restored");
    Ok((state.vcpus, state.captured_ns))
}

/// What an incoming process runs, once committed to.
pub struct Adopted {
    /// The prepared machine; its state comes through the gate.
    pub machine: Machine,
    /// The API socket handed over.
    pub api: Option<crate::api::ApiSocket>,
    /// Per-zone settings (JSON) for the API.
    pub zones: serde_json::Value,
    /// What else crossed.
    pub info: HandoverInfo,
    /// Receives and restores the state once the vCPU threads are started, then
    /// awaits the commit.
    pub gate: CommitGate,
}

/// Receives a VM: Hello (and, in v2, the commit word) and prepare. The state, the
/// restore and the commit (v2: on the commit word; v1: Ready, then a Commit message)
/// follow in the [`CommitGate`], once the vCPU threads are started. On failure, the
/// old process is told (Failed) and keeps the guest.
pub fn receive(incoming: &Incoming) -> Result<Adopted, LiveError> {
    let mut ch = open(incoming)?;
    let result = receive_on(&mut ch);
    match result {
        Ok((machine, hello, api, arbiter)) => {
            let zones = serde_json::from_str(&hello.info.zones_json).unwrap_or_default();
            let api = match (hello.api_socket, api) {
                (Some(path), Some(fd)) => Some(crate::api::ApiSocket::Inherited { path, fd }),
                _ => None,
            };
            let gate = CommitGate {
                channel: ch,
                committed: Default::default(),
                vcpus: hello.vcpus,
                vm: machine.vm.clone(),
                devices: machine.devices.clone(),
                arbiter: arbiter.map(Arc::new),
                times: (0, 0),
            };
            Ok(Adopted { machine, api, zones, info: hello.info, gate })
        }
        Err(e) => {
            ch.fail(&crate::error_chain(&e));
            Err(e)
        }
    }
}

type Received = (Machine, Hello, Option<OwnedFd>, Option<Arbiter>);

fn receive_on(ch: &mut Channel) -> Result<Received, LiveError> {
    ch.set_timeout(HELLO_TIMEOUT).map_err(|e| LiveError::Channel(e.to_string()))?;
    let (msg, fds) = ch.recv(None)?;
    let hello = match msg {
        Message::Hello(h) => *h,
        m => return Err(LiveError::Protocol(format!("expected Hello, got {}", m.name()))),
    };
    // Answer in the old process's version.
    ch.set_version(ch.peer_version());
    let arbiter = if ch.peer_version() >= 2 { Some(receive_arbiter(ch)?) } else { None };
    die_at("fds-received");
    let fds = check_hello(&hello, fds)?;
    // This thread receives and decodes the state during the pause.
    super::warm::for_pause(hello.vcpus);
    let machine = prepare(&hello, fds.zones, fds.console)?;
    Ok((machine, hello, fds.api, arbiter))
}

/// v2: the commit word, which follows the Hello.
fn receive_arbiter(ch: &mut Channel) -> Result<Arbiter, LiveError> {
    let (msg, mut fds) = ch.recv(None)?;
    match msg {
        Message::Arbiter if fds.len() == 1 => {}
        Message::Arbiter => return Err(LiveError::Protocol(format!("{} fds came with the Arbiter, not 1", fds.len()))),
        m => return Err(LiveError::Protocol(format!("expected Arbiter, got {}", m.name()))),
    }
    let fd = fds.pop().ok_or_else(|| LiveError::Protocol("no fd came with the Arbiter".into()))?;
    Arbiter::adopt(fd).map_err(|e| LiveError::Protocol(format!("the commit word: {e}")))
}

/// The rest of the incoming side, as the gate the new process's vCPU threads wait at:
/// they are started (and the API socket is set up) while the guest still runs in the
/// old process. Then: Prepared, the state, the restore (the vCPU threads restoring
/// their own), and the commit (v2: the commit word; v1: Ready and Commit).
pub struct CommitGate {
    channel: Channel,
    committed: Arc<std::sync::atomic::AtomicBool>,
    vcpus: u32,
    vm: Arc<Vm>,
    devices: Arc<Devices>,
    /// v2: the commit word (v1: the commit is a message).
    arbiter: Option<Arc<Arbiter>>,
    /// When the state had been received and restored (CLOCK_MONOTONIC ns).
    times: (u64, u64),
}

impl CommitGate {
    /// Set once the old process has committed: until then this process must leave
    /// everything the guest's run owns alone (its stats file, its hugetlb pool pages).
    pub fn committed(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.committed.clone()
    }

    /// Prepared, the state, the restore; then (v2) the commit, made by the last vCPU
    /// thread restored, or (v1) Ready.
    fn restore(&mut self, handoff: &Handoff) -> Result<(), LiveError> {
        handoff.wait_all_waiting(STEP_TIMEOUT).map_err(LiveError::Restore)?;
        let ch = &mut self.channel;
        ch.send(&Message::Prepared { pid: std::process::id() }, &[])?;
        ch.set_timeout(STEP_TIMEOUT).map_err(|e| LiveError::Channel(e.to_string()))?;
        ch.wait_readable(STEP_TIMEOUT)?;
        // The vCPU threads wake now, while the state is read.
        handoff.arriving();
        let half = |_: usize, _: usize| die_at("state-half-read");
        let hook: Option<&dyn Fn(usize, usize)> = std::env::var_os(DIE_AT_ENV).map(|_| &half as _);
        let (msg, _) = ch.recv(hook)?;
        let received_ns = monotonic_ns();
        crate::live::trace::mark("received");
        let frame = match msg {
            Message::State(f) => f,
            Message::Failed(r) => return Err(LiveError::Peer(r)),
            m => return Err(LiveError::Protocol(format!("expected State, got {}", m.name()))),
        };
        let state = format::decode_state(&frame, MAX_MESSAGE).map_err(LiveError::Refused)?;
        crate::live::trace::mark("decoded");
        let (vcpus, captured_ns) = restore_vm(self, state)?;
        if let Some(arbiter) = self.arbiter.clone() {
            // v2: the last vCPU thread restored commits and runs its vCPU at once;
            // this thread sleeps meanwhile.
            handoff.set_committer(committer(arbiter.clone(), self.committed.clone()));
            handoff.post(vcpus, captured_ns);
            let restored_ns = match handoff.wait_decided(STEP_TIMEOUT) {
                Some(Ok(ns)) => ns,
                Some(Err(_)) if arbiter.is_aborted() => return Err(LiveError::Aborted),
                Some(Err(why)) => return Err(LiveError::Restore(why)),
                // Not decided in time: decide here. A vCPU thread may just have
                // committed; then the guest runs.
                None => match arbiter.abort() {
                    Decision::Aborted => {
                        return Err(LiveError::Restore(format!("the vCPUs were not restored in {STEP_TIMEOUT:?}")))
                    }
                    Decision::Committed => monotonic_ns(),
                },
            };
            self.times = (received_ns, restored_ns);
            return Ok(());
        }
        handoff.post(vcpus, captured_ns);
        handoff.wait_restored(STEP_TIMEOUT).map_err(LiveError::Restore)?;
        let restored_ns = monotonic_ns();
        die_at("restored");
        crate::live::trace::mark("all_restored");
        self.times = (received_ns, restored_ns);
        self.channel.send(&Message::Ready { received_ns, restored_ns }, &[])
    }
}

/// v2: what the last vCPU thread restored runs: the commit on the shared word (and
/// the fault-injection hooks of the `restored` phase).
fn committer(arbiter: Arc<Arbiter>, committed: Arc<std::sync::atomic::AtomicBool>) -> crate::vm::handoff::Committer {
    Box::new(move || {
        die_at("restored");
        if std::env::var(DIE_AT_ENV).is_ok_and(|p| p == "stall-restored") {
            eprintln!("mosaic: {DIE_AT_ENV}=stall-restored: stalling before the commit");
            std::thread::sleep(super::source::PAUSED_STEP_TIMEOUT + Duration::from_secs(1));
        }
        match arbiter.commit() {
            Decision::Committed => {
                committed.store(true, std::sync::atomic::Ordering::SeqCst);
                crate::live::trace::mark("commit");
                Ok(())
            }
            Decision::Aborted => Err(LiveError::Aborted.to_string()),
        }
    })
}

impl crate::run::StartGate for CommitGate {
    fn wait_open(&mut self, _ctl: &crate::vm::control::RunControl, handoff: &Handoff) -> Result<(), String> {
        match self.restore(handoff) {
            Ok(()) if self.arbiter.is_some() => return Ok(()),
            Ok(()) => {}
            Err(e @ LiveError::Aborted) => return Err(format!("live update: {e}; nothing ran here")),
            Err(e) => {
                let why = crate::error_chain(&e);
                self.channel.fail(&why);
                return Err(format!("live update refused, nothing ran here: {why}"));
            }
        }
        let no = |why: String| format!("live update: no commit from the old process ({why}); nothing ran here");
        match self.channel.recv(None) {
            Ok((Message::Commit, _)) => {
                crate::live::trace::mark("commit");
                self.committed.store(true, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            }
            Ok((Message::Failed(r), _)) => Err(no(r)),
            Ok((m, _)) => Err(no(format!("got {}", m.name()))),
            Err(e) => Err(no(e.to_string())),
        }
    }

    fn predecessor(&self) -> Option<libc::pid_t> {
        // SAFETY: ucred is plain data; all zeros is valid.
        let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: getsockopt(SO_PEERCRED) on the channel's socket writes at most
        // `len` bytes into `cred`.
        let r = unsafe {
            libc::getsockopt(
                self.channel.raw().as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        (r == 0 && cred.pid > 0).then_some(cred.pid)
    }

    fn running(&mut self, running_ns: u64) {
        let (received_ns, restored_ns) = self.times;
        let msg = match self.arbiter {
            Some(_) => Message::Started { received_ns, restored_ns, running_ns },
            None => Message::Running { running_ns },
        };
        let _ = self.channel.send(&msg, &[]);
        crate::live::trace::mark("running_sent");
        if crate::live::trace::on() {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        crate::live::trace::dump("new");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incoming_names_parse() {
        assert_eq!("fd:5".parse::<Incoming>(), Ok(Incoming::Fd(5)));
        assert!("fd:1".parse::<Incoming>().is_err());
        assert!("fd:x".parse::<Incoming>().is_err());
        assert!("".parse::<Incoming>().is_err());
        assert_eq!("/run/m.sock".parse::<Incoming>(), Ok(Incoming::Socket("/run/m.sock".into())));
    }

    #[test]
    fn an_fd_that_is_not_a_socket_is_refused() {
        let f = std::fs::File::open("/proc/self/exe").unwrap();
        let e = open(&Incoming::Fd(f.as_raw_fd())).unwrap_err();
        assert!(e.to_string().contains("not an inherited socket"), "{e}");
    }
}
