//! How a run ends: the first vCPU (or signal) to decide the outcome records it, raises
//! the stop flag and wakes the event loop; the rest see the flag and stop.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
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
}

/// Exit code of `mosaic run` when the VM failed rather than the guest deciding.
pub const EXIT_VM_FAILED: i32 = 125;

impl Outcome {
    /// The process exit code for this outcome.
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::Exit(c) => i32::from(*c),
            Outcome::Reset => 0,
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

    /// The outcome and when it was decided (from VMM start).
    pub fn outcome(&self) -> Option<(Outcome, Duration)> {
        self.outcome.lock().ok().and_then(|g| g.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let f = FaultReport { vcpu: 1, vector: 14, error_code: 4, rip: 0x200010, cr2: 0x7000_0000_0000 };
        assert_eq!(
            f.to_string(),
            "guest fault on vCPU 1: vector 14 (#PF) at RIP 0x200010, error code 0x4, CR2 0x700000000000"
        );
    }
}
