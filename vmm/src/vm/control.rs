//! How a run ends: the first vCPU (or signal) to decide the outcome records it, raises
//! the stop flag and wakes the event loop; the rest see the flag and stop.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

/// A guest exception reported by the CPL0 stubs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct FaultReport {
    /// vCPU index.
    pub vcpu: u32,
    /// Exception vector.
    pub vector: u64,
    /// Error code (0 where the CPU pushes none).
    pub error_code: u64,
    /// Faulting instruction.
    pub rip: u64,
    /// CR2 (the faulting address of a #PF).
    pub cr2: u64,
}

impl std::fmt::Display for FaultReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "guest fault on vCPU {}: vector {} ({}) at RIP {:#x}, error code {:#x}",
            self.vcpu,
            self.vector,
            crate::boot::program::tables::vector_name(self.vector),
            self.rip,
            self.error_code
        )?;
        if self.vector == 14 {
            write!(f, ", CR2 {:#x}", self.cr2)?;
        }
        Ok(())
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest wrote the exit port.
    Exit(u8),
    /// The guest reset through the i8042.
    Reset,
    /// A guest exception.
    Fault(FaultReport),
    /// KVM reported a shutdown (triple fault).
    Shutdown {
        /// vCPU index.
        vcpu: u32,
    },
    /// Every vCPU parked and none wrote the exit port.
    AllParked,
    /// A vCPU failed (KVM error, emulation failure, ...).
    Error {
        /// vCPU index.
        vcpu: u32,
        /// What happened.
        message: String,
    },
    /// The VMM was told to stop by a signal.
    Signal(i32),
    /// An operator asked for shutdown through the API socket.
    ApiShutdown,
    /// A live update handed the guest to a new Mosaic process, which runs it on.
    HandedOver {
        /// The new process.
        pid: u32,
    },
    /// An incoming live update was refused or never committed to: no guest code ran.
    NotStarted(String),
}

/// How soon a pause kicks again a vCPU that has not stopped (its first few ms).
pub const REKICK: Duration = Duration::from_micros(50);

/// Exit code of `mosaic run` when the VM failed rather than the guest deciding.
pub const EXIT_VM_FAILED: i32 = 125;

impl Outcome {
    /// The process exit code for this outcome.
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::Exit(c) => i32::from(*c),
            Outcome::Reset | Outcome::ApiShutdown | Outcome::HandedOver { .. } => 0,
            Outcome::Signal(s) => 128 + s,
            _ => EXIT_VM_FAILED,
        }
    }

    /// A one-line description.
    pub fn describe(&self) -> String {
        match self {
            Outcome::Exit(c) => format!("guest exited with code {c}"),
            Outcome::Reset => "guest reset the machine (i8042)".into(),
            Outcome::Fault(f) => f.to_string(),
            Outcome::Shutdown { vcpu } => format!("vCPU {vcpu} shut down (triple fault)"),
            Outcome::AllParked => "every vCPU parked without writing the exit port".into(),
            Outcome::Error { vcpu, message } => format!("vCPU {vcpu}: {message}"),
            Outcome::Signal(s) => format!("stopped by signal {s}"),
            Outcome::ApiShutdown => "shut down through the API socket".into(),
            Outcome::HandedOver { pid } => format!("live update: the guest runs on in process {pid}"),
            Outcome::NotStarted(why) => why.clone(),
        }
    }

    /// A short machine-readable kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Outcome::Exit(_) => "exit",
            Outcome::Reset => "reset",
            Outcome::Fault(_) => "fault",
            Outcome::Shutdown { .. } => "shutdown",
            Outcome::AllParked => "all_parked",
            Outcome::Error { .. } => "error",
            Outcome::Signal(_) => "signal",
            Outcome::ApiShutdown => "api_shutdown",
            Outcome::HandedOver { .. } => "handed_over",
            Outcome::NotStarted(_) => "not_started",
        }
    }
}

/// Shared by the vCPU threads and the event loop.
#[derive(Debug)]
pub struct RunControl {
    stop: AtomicBool,
    outcome: Mutex<Option<(Outcome, Duration)>>,
    exit_evt: EventFd,
    parked: AtomicU32,
    vcpus: u32,
    start: Instant,
    pause_requested: AtomicBool,
    /// vCPUs currently waiting in [`RunControl::wait_while_paused`].
    paused: Mutex<u32>,
    pause_cv: Condvar,
    /// While set, vCPUs capture their state when they pause (live update).
    capture_requested: AtomicBool,
    captures: Mutex<Vec<Option<VcpuCapture>>>,
    /// CLOCK_MONOTONIC (ns) when the first vCPU thread was about to enter KVM_RUN.
    first_run_ns: std::sync::atomic::AtomicU64,
    /// Each vCPU thread's kernel thread id, 0 until it has started.
    tids: Vec<AtomicI32>,
}

/// What a vCPU thread deposits when it pauses for a live update.
#[derive(Debug)]
pub struct VcpuCapture {
    /// CLOCK_MONOTONIC (ns) when the thread left KVM_RUN.
    pub left_run_ns: u64,
    /// Its state, or why it could not be captured.
    pub state: Result<crate::state::format::VcpuEntry, String>,
}

impl RunControl {
    /// Control for `vcpus` vCPUs; times count from `start`.
    pub fn new(vcpus: u32, start: Instant) -> std::io::Result<Self> {
        Ok(RunControl {
            stop: AtomicBool::new(false),
            outcome: Mutex::new(None),
            exit_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            parked: AtomicU32::new(0),
            vcpus,
            start,
            pause_requested: AtomicBool::new(false),
            paused: Mutex::new(0),
            pause_cv: Condvar::new(),
            capture_requested: AtomicBool::new(false),
            captures: Mutex::new((0..vcpus).map(|_| None).collect()),
            first_run_ns: std::sync::atomic::AtomicU64::new(0),
            tids: (0..vcpus).map(|_| AtomicI32::new(0)).collect(),
        })
    }

    /// Records `o` if no outcome is recorded yet, and stops the run.
    pub fn finish(&self, o: Outcome) {
        if let Ok(mut g) = self.outcome.lock() {
            if g.is_none() {
                *g = Some((o, self.start.elapsed()));
            }
        }
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.exit_evt.write(1);
        // Paused vCPUs wake up and see the stop flag.
        let _g = self.paused.lock();
        self.pause_cv.notify_all();
    }

    /// Whether an operator asked the vCPUs to pause.
    pub fn pause_requested(&self) -> bool {
        self.pause_requested.load(Ordering::SeqCst)
    }

    /// Called by a vCPU thread (outside KVM_RUN) while a pause is requested: waits
    /// until it is lifted or the run stops.
    pub fn wait_while_paused(&self) {
        let Ok(mut n) = self.paused.lock() else { return };
        *n += 1;
        self.pause_cv.notify_all();
        while self.pause_requested() && !self.stopping() {
            n = match self.pause_cv.wait(n) {
                Ok(g) => g,
                Err(_) => return,
            };
        }
        *n -= 1;
        self.pause_cv.notify_all();
    }

    /// Pauses the vCPUs: raises the request, calls `kick` (which gets them out of
    /// KVM_RUN) until every vCPU that has not parked waits, or `timeout` passes.
    /// Returns false if it timed out (the request stays raised).
    ///
    /// A kick that lands just before a vCPU thread enters KVM_RUN is lost (the signal
    /// handler has already run), so kicks repeat: every [`REKICK`] at first, then every
    /// millisecond.
    pub fn pause(&self, kick: impl Fn(), timeout: Duration) -> bool {
        self.pause_requested.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + timeout;
        let rekick_until = Instant::now() + Duration::from_millis(5);
        let Ok(mut n) = self.paused.lock() else { return false };
        let mut kicked: Option<Instant> = None;
        let mut polls = 0;
        loop {
            let active = self.vcpus.saturating_sub(self.parked.load(Ordering::SeqCst));
            if *n >= active || self.stopping() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let wait = if now < rekick_until { REKICK } else { Duration::from_millis(1) };
            if kicked.is_none_or(|k| now.duration_since(k) >= wait) {
                kick();
                kicked = Some(now);
            }
            if *n > 0 {
                // A vCPU has paused, so a CPU is free: poll for the others there rather
                // than sleep (each wake-up costs tens of µs on a nested host, and the
                // first one overlaps the other vCPUs' captures).
                drop(n);
                crate::run::poll_wait(&mut polls);
                n = match self.paused.lock() {
                    Ok(g) => g,
                    Err(_) => return false,
                };
            } else {
                n = match self.pause_cv.wait_timeout(n, wait) {
                    Ok((g, _)) => g,
                    Err(_) => return false,
                };
            }
        }
    }

    /// Whether paused vCPUs should capture their state.
    pub fn capture_requested(&self) -> bool {
        self.capture_requested.load(Ordering::SeqCst)
    }

    /// Pauses like [`RunControl::pause`], with every vCPU capturing its state before
    /// it waits (see [`RunControl::deposit`]). Returns the captures (by vCPU index;
    /// `None` for parked vCPUs), or `None` if the vCPUs did not pause in time (the
    /// pause request then stays raised: call [`RunControl::resume`]).
    pub fn pause_and_capture(&self, kick: impl Fn(), timeout: Duration) -> Option<Vec<Option<VcpuCapture>>> {
        if let Ok(mut c) = self.captures.lock() {
            c.iter_mut().for_each(|slot| *slot = None);
        }
        self.capture_requested.store(true, Ordering::SeqCst);
        let paused = self.pause(kick, timeout);
        self.capture_requested.store(false, Ordering::SeqCst);
        if !paused || self.stopping() {
            return None;
        }
        self.captures.lock().ok().map(|mut c| c.iter_mut().map(Option::take).collect())
    }

    /// A vCPU thread's capture, made after it left KVM_RUN for a capturing pause and
    /// before it waits.
    pub fn deposit(&self, index: u32, capture: VcpuCapture) {
        if let Ok(mut c) = self.captures.lock() {
            if let Some(slot) = c.get_mut(index as usize) {
                *slot = Some(capture);
            }
        }
    }

    /// Holds vCPU threads that have not run yet: they wait until [`RunControl::resume`].
    pub fn hold(&self) {
        self.pause_requested.store(true, Ordering::SeqCst);
    }

    /// Polls (yielding the CPU) while the vCPU threads are held, up to `max`: a live
    /// update's restored vCPU threads wait so for the commit, running on their CPUs
    /// (see `vm::handoff`).
    pub fn poll_while_held(&self, max: Duration) {
        let since = Instant::now();
        let mut polls = 0;
        while self.pause_requested() && !self.stopping() && since.elapsed() < max {
            crate::run::poll_wait(&mut polls);
        }
    }

    /// Lifts a pause.
    pub fn resume(&self) {
        self.pause_requested.store(false, Ordering::SeqCst);
        let _g = self.paused.lock();
        self.pause_cv.notify_all();
    }

    /// Called by each vCPU thread before its first KVM_RUN; the first call is timed.
    pub fn note_first_run(&self) {
        let now = crate::run::monotonic_ns();
        let _ = self.first_run_ns.compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Waits (up to `timeout`) for the first vCPU thread to reach KVM_RUN and returns
    /// when it did (CLOCK_MONOTONIC ns), or now if none did in time. Yields rather than
    /// sleeps: each wake-up from a sleep would take the CPU from a vCPU thread just
    /// started.
    pub fn wait_first_run(&self, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let t = self.first_run_ns.load(Ordering::SeqCst);
            if t != 0 || Instant::now() >= deadline || self.stopping() {
                return if t != 0 { t } else { crate::run::monotonic_ns() };
            }
            crate::run::yield_cpu();
        }
    }

    /// Called by vCPU thread `index` when it starts: records its thread id.
    pub fn note_thread(&self, index: u32) {
        if let Some(t) = self.tids.get(index as usize) {
            // SAFETY: gettid has no preconditions.
            t.store(unsafe { libc::gettid() }, Ordering::SeqCst);
        }
    }

    /// The vCPU threads' ids, in vCPU order (0 for one not started).
    pub fn vcpu_tids(&self) -> Vec<libc::pid_t> {
        self.tids.iter().map(|t| t.load(Ordering::SeqCst)).collect()
    }

    /// Number of vCPUs.
    pub fn vcpus(&self) -> u32 {
        self.vcpus
    }

    /// Time since the VMM started.
    pub fn uptime(&self) -> Duration {
        self.start.elapsed()
    }

    /// A vCPU parked; the run ends when all have.
    pub fn park(&self) {
        if self.parked.fetch_add(1, Ordering::SeqCst) + 1 == self.vcpus {
            self.finish(Outcome::AllParked);
        }
    }

    /// Whether the run is stopping.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// The eventfd the event loop waits on.
    pub fn exit_evt(&self) -> &EventFd {
        &self.exit_evt
    }

    /// Whether the run ended by handing the guest to a new process.
    pub fn handed_over(&self) -> bool {
        matches!(self.outcome.lock().as_deref(), Ok(Some((Outcome::HandedOver { .. }, _))))
    }

    /// The outcome and when it was decided (from VMM start).
    pub fn outcome(&self) -> Option<(Outcome, Duration)> {
        self.outcome.lock().ok().and_then(|g| g.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pause_waits_for_every_active_vcpu_and_resume_releases_them() {
        let c = std::sync::Arc::new(RunControl::new(2, Instant::now()).unwrap());
        let vcpu = |c: std::sync::Arc<RunControl>| {
            std::thread::spawn(move || {
                while !c.stopping() {
                    if c.pause_requested() {
                        c.wait_while_paused();
                    }
                    std::thread::sleep(Duration::from_micros(50));
                }
            })
        };
        let (a, b) = (vcpu(c.clone()), vcpu(c.clone()));
        assert!(c.pause(|| {}, Duration::from_secs(5)));
        assert_eq!(*c.paused.lock().unwrap(), 2);
        c.resume();
        c.finish(Outcome::ApiShutdown);
        a.join().unwrap();
        b.join().unwrap();
        // With no vCPU running, a pause times out.
        let lone = RunControl::new(1, Instant::now()).unwrap();
        assert!(!lone.pause(|| {}, Duration::from_millis(20)));
    }

    #[test]
    fn first_outcome_wins_and_parking_ends_the_run() {
        let c = RunControl::new(2, Instant::now()).unwrap();
        c.park();
        assert!(!c.stopping());
        c.park();
        assert!(c.stopping());
        c.finish(Outcome::Exit(3));
        assert_eq!(c.outcome().unwrap().0, Outcome::AllParked);
        assert_eq!(Outcome::Exit(3).exit_code(), 3);
        assert_eq!(Outcome::AllParked.exit_code(), EXIT_VM_FAILED);
        assert_eq!(Outcome::Signal(2).exit_code(), 130);
        assert_eq!(Outcome::ApiShutdown.exit_code(), 0);
        let f = FaultReport { vcpu: 1, vector: 14, error_code: 4, rip: 0x200010, cr2: 0x7000_0000_0000 };
        assert_eq!(
            f.to_string(),
            "guest fault on vCPU 1: vector 14 (#PF) at RIP 0x200010, error code 0x4, CR2 0x700000000000"
        );
    }
}
