//! The old process's side of a live update (see the module docs of `live`).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::arbiter::{Arbiter, Decision};
use super::wire::{Channel, Message};
use super::{FdLayout, Hello, Job, LiveError, Report, Target};
use crate::run::monotonic_ns;
use crate::state::format::{self, StateV2, VcpuEntry, FORMAT_VERSION};
use crate::vm::handoff::Spread;

/// How long the new process may take to map memory and build its VM (the guest runs
/// meanwhile): large memfd zones take a while to map in.
pub const PREPARE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long any step may take while the guest is paused before the old process gives
/// up and resumes it.
pub const PAUSED_STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the guest runs between Prepared and the pause. Without it, a quarter of
/// the pauses the guest saw were ~0.5 ms longer (the new process's prepare had just
/// held up a vCPU); 1-3 ms all but removed them (docs/LIVE-UPDATE.md).
pub const SETTLE: Duration = Duration::from_millis(2);
/// How long the vCPUs may take to leave KVM_RUN.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The new process, killed and reaped unless the update commits.
struct Peer {
    child: Option<Child>,
}

impl Peer {
    fn pid(&self, announced: u32) -> u32 {
        self.child.as_ref().map_or(announced, Child::id)
    }

    fn committed(mut self) {
        // The new process runs on; it is not ours to wait for.
        self.child.take();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn connect(target: &Target) -> Result<(Channel, Peer), LiveError> {
    match target {
        Target::Incoming(path) => {
            let s = UnixStream::connect(path)
                .map_err(|e| LiveError::Start(format!("cannot connect to '{}': {e}", path.display())))?;
            Ok((Channel::new(s), Peer { child: None }))
        }
        Target::Binary(bin) => {
            let (mine, theirs) =
                UnixStream::pair().map_err(|e| LiveError::Start(format!("cannot make a socket pair: {e}")))?;
            // The child inherits its end (the only fd without CLOEXEC we make).
            // SAFETY: F_SETFD on an fd we own, clearing FD_CLOEXEC.
            if unsafe { libc::fcntl(theirs.as_raw_fd(), libc::F_SETFD, 0) } != 0 {
                return Err(LiveError::Start(format!("fcntl: {}", std::io::Error::last_os_error())));
            }
            let child = Command::new(bin)
                .arg("run")
                .arg("--incoming")
                .arg(format!("fd:{}", theirs.as_raw_fd()))
                .stdin(Stdio::null())
                .spawn()
                .map_err(|e| LiveError::Start(format!("cannot run '{}': {e}", bin.display())))?;
            drop(theirs);
            Ok((Channel::new(mine), Peer { child: Some(child) }))
        }
    }
}

/// Receives the next message, which must be `want` (by name); a `Failed` message
/// becomes [`LiveError::Peer`].
fn expect(ch: &mut Channel, want: &'static str) -> Result<Message, LiveError> {
    let (m, _) = ch.recv(None)?;
    match m {
        Message::Failed(reason) => Err(LiveError::Peer(reason)),
        m if m.name() == want => Ok(m),
        m => Err(LiveError::Protocol(format!("expected {want}, got {}", m.name()))),
    }
}

/// Waits for Started: the new process has committed and runs the guest.
fn expect_started(ch: &mut Channel) -> Result<(u64, u64, u64), LiveError> {
    match expect(ch, "Started")? {
        Message::Started { received_ns, restored_ns, running_ns } => Ok((received_ns, restored_ns, running_ns)),
        m => Err(LiveError::Protocol(format!("expected Started, got {}", m.name()))),
    }
}

/// The time slice asked for once the guest is handed over (Linux 6.12 and later take
/// it; older kernels ignore it).
const ASIDE_SLICE_NS: u64 = 100_000;

/// What threads of a process that has handed its guest over run with.
fn aside_attr() -> libc::sched_attr {
    libc::sched_attr {
        size: std::mem::size_of::<libc::sched_attr>() as u32,
        sched_policy: libc::SCHED_OTHER as u32,
        sched_flags: 0,
        sched_nice: 19,
        sched_priority: 0,
        sched_runtime: ASIDE_SLICE_NS,
        sched_deadline: 0,
        sched_period: 0,
    }
}

/// Sets `attr` on thread `tid` (0: the calling one); where the kernel refuses the
/// slice, the nice value alone.
fn set_sched(tid: libc::pid_t, attr: &libc::sched_attr) {
    // SAFETY: sched_setattr on one of this process's own threads, reading a valid
    // sched_attr of the size it states.
    let r = unsafe { libc::syscall(libc::SYS_sched_setattr, tid, attr, 0u32) };
    if r != 0 {
        // SAFETY: setpriority on one of this process's own threads.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, attr.sched_nice) };
    }
}

/// Lowers every thread of this process to nice 19, with a short time slice, once the
/// guest is handed over. What is left here (the API answer, tearing the old VM down:
/// a few ms of CPU, more to unmap large memfd zones) then takes no CPU time the new
/// process's vCPU threads want at once, and never more than ~100 µs at a stretch
/// later. Left at normal priority, the woken update thread was seen to preempt the
/// guest's vCPU for 400 µs right after its resume.
pub fn step_aside() {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return };
    let attr = aside_attr();
    for tid in tasks.flatten().filter_map(|t| t.file_name().to_str()?.parse::<libc::pid_t>().ok()) {
        set_sched(tid, &attr);
    }
}

/// The calling thread, lowered as [`step_aside`] lowers all, until [`Lowered::undo`].
struct Lowered(Option<libc::sched_attr>);

impl Lowered {
    /// Lowers the calling thread: the update thread, once it has sent the state. It
    /// sleeps until the new process's answer, which comes once the guest runs there:
    /// lowered, it wakes without preempting the guest's vCPUs.
    fn this_thread() -> Self {
        let saved = crate::vm::handoff::sched_attr_of_this_thread();
        set_sched(0, &aside_attr());
        Lowered(saved)
    }

    /// Back to what the thread had: the update failed and this process keeps the
    /// guest.
    fn undo(self) {
        if let Some(attr) = self.0 {
            set_sched(0, &attr);
        }
    }
}

/// Runs a live update (a [`Job`] is only made once `Source::can_hand_over` has
/// passed); on any failure before the commit the guest runs on here.
pub fn update(job: &Job) -> Result<Report, LiveError> {
    let src = &*job.source;
    let t_start = monotonic_ns();
    // This thread encodes and sends the state during the pause.
    super::warm::for_pause(src.ctl.vcpus());
    // The guest's vCPUs keep a CPU each while the new process prepares (see
    // Placement); they stop here if the update goes through, and are let go if not.
    let _spread = Spread::pin(&src.ctl.vcpu_tids());
    let mem = src.vm.memory();
    let zone_fds: Vec<OwnedFd> = (0..mem.layout().zones().len())
        .map(|z| {
            mem.zone_fd(z)
                .and_then(|f| f.try_clone_to_owned().ok())
                .ok_or_else(|| LiveError::NotHandable(format!("memory zone {z} has no fd")))
        })
        .collect::<Result<_, _>>()?;
    let console = src.devices.serial_fd();
    let mut fds: Vec<RawFd> = zone_fds.iter().map(AsRawFd::as_raw_fd).collect();
    fds.extend(console.iter().map(AsRawFd::as_raw_fd));
    fds.push(job.api.1.as_raw_fd());
    let hello = Hello {
        layout: mem.layout().clone(),
        vcpus: src.ctl.vcpus(),
        guest: src.guest.clone(),
        is_program: src.is_program,
        pit: src.vm.fd().get_pit2().is_ok(),
        api_socket: Some(job.api.0.clone()),
        start_monotonic_ns: src.start_ns,
        info: src.info.clone(),
        fds: FdLayout { zones: zone_fds.len() as u32, console: console.is_some(), api: true },
    };

    // Made before the new process exists, so that nothing can decide on it early.
    let arbiter = Arbiter::create().map_err(|e| LiveError::Start(format!("cannot make the commit word: {e}")))?;
    let (mut ch, peer) = connect(&job.target)?;
    ch.set_timeout(PREPARE_TIMEOUT).map_err(|e| LiveError::Channel(e.to_string()))?;
    ch.send(&Message::Hello(Box::new(hello)), &fds)?;
    ch.send(&Message::Arbiter, &[arbiter.fd().as_raw_fd()])?;
    drop((zone_fds, console));
    let announced = match expect(&mut ch, "Prepared")? {
        Message::Prepared { pid } => pid,
        _ => 0,
    };
    let pid = peer.pid(announced);
    ch.set_timeout(PAUSED_STEP_TIMEOUT).map_err(|e| LiveError::Channel(e.to_string()))?;

    // The new process's last prepare work (its vCPU threads' warm-ups) has just taken
    // CPU time from the guest's vCPUs; let them run again before pausing them, so the
    // guest sees that and the pause as two short stalls rather than one long one.
    std::thread::sleep(SETTLE);
    // The guest stops here.
    let t_pause = monotonic_ns();
    crate::live::trace::mark("kick");
    let kick = || crate::vm::vcpu::kick_threads(&job.threads);
    let Some(captures) = src.ctl.pause_and_capture(kick, PAUSE_TIMEOUT) else {
        src.ctl.resume();
        return Err(LiveError::Pause);
    };
    crate::live::trace::mark("paused");
    let sent = (|| -> Result<(u64, u64, usize), LiveError> {
        let t_paused = captures.iter().flatten().map(|c| c.left_run_ns).max().unwrap_or(t_pause).max(t_pause);
        let mut vcpus = Vec::with_capacity(captures.len());
        for c in captures {
            vcpus.push(match c {
                None => VcpuEntry { kvm: None, ports: Default::default(), tsc_offset: None },
                Some(c) => c.state.map_err(LiveError::Capture)?,
            });
        }
        let vm = crate::state::vm::capture(src.vm.fd()).map_err(|e| LiveError::Capture(crate::error_chain(&e)))?;
        let state = StateV2 {
            layout: mem.layout().clone(),
            attrs: mem.attr_state(),
            vcpus,
            vm,
            devices: src.devices.save(src.start_ns),
            captured_ns: monotonic_ns(),
        };
        let frame = format::encode(FORMAT_VERSION, &state).map_err(LiveError::Refused)?;
        crate::live::trace::mark("encoded");
        let t_saved = monotonic_ns();
        let state_bytes = frame.len();
        ch.send(&Message::State(frame), &[])?;
        crate::live::trace::mark("sent");
        Ok((t_paused, t_saved, state_bytes))
    })();
    let lowered = Lowered::this_thread();
    // The new process decides now: it commits on the shared word once it has
    // restored everything, runs the guest, then says Started. Nothing is awaited here
    // while the guest is paused; this thread sleeps until Started (or a failure).
    let started = sent.and_then(|s| expect_started(&mut ch).map(|t| (s, t)));
    let decision = match &started {
        Ok(_) if arbiter.is_committed() => Decision::Committed,
        _ => arbiter.abort(),
    };
    if decision == Decision::Aborted {
        lowered.undo();
        let e = started.err().unwrap_or_else(|| LiveError::Protocol("Started came without a commit".into()));
        ch.fail(&e.to_string());
        drop(peer);
        src.ctl.resume();
        return Err(e);
    }

    // Committed: from here on this process never runs the guest again.
    job.state.handed_over.store(true, Ordering::SeqCst);
    crate::live::trace::mark("committed_seen");
    peer.committed();
    step_aside();
    job.state.new_pid.store(pid, Ordering::SeqCst);
    let ((t_paused, t_saved, state_bytes), (received_ns, restored_ns, running_ns)) = started.map_err(|e| {
        LiveError::Peer(format!(
            "process {pid} committed to the guest but did not confirm that it runs ({e}); this process has let go \
             of the guest"
        ))
    })?;
    crate::live::trace::mark("running_seen");
    crate::live::trace::dump("old");
    let us = |a: u64, b: u64| b.saturating_sub(a) / 1000;
    Ok(Report {
        pid,
        downtime_us: us(t_pause, running_ns),
        prepare_us: us(t_start, t_pause),
        pause_us: us(t_pause, t_paused),
        save_us: us(t_paused, t_saved),
        transfer_us: us(t_saved, received_ns),
        restore_us: us(received_ns, restored_ns),
        resume_us: us(restored_ns, running_ns),
        state_bytes,
        generation: src.devices.guest_ports().generation() + 1,
    })
}
