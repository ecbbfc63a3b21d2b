//! Mosaic's guest ports (docs/GUEST-ABI.md): exit, boot marker, park, and the
//! exception report written by the VMM's own CPL0 stubs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::IoAction;

/// Exit port: the low 8 bits of the value become `mosaic run`'s exit code.
pub const EXIT_PORT: u16 = 0x500;
/// Boot marker: the first write is timed.
pub const BOOT_MARKER_PORT: u16 = 0x501;
/// Park: this vCPU is done.
pub const PARK_PORT: u16 = 0x502;
/// Generation (in32): live updates this guest has gone through.
pub const GENERATION_PORT: u16 = 0x503;
/// Exception report from the CPL0 stubs.
pub const EXCEPTION_PORT: u16 = 0x510;
/// First port of the range.
pub const FIRST: u16 = EXIT_PORT;
/// Last port of the range.
pub const LAST: u16 = 0x51f;

/// State of the guest ports.
#[derive(Debug)]
pub struct GuestPorts {
    start: Instant,
    boot_marker: OnceLock<Duration>,
    exception_reports: bool,
    generation: AtomicU64,
}

impl GuestPorts {
    /// Ports whose times count from `start`. `exception_reports`: the VMM's CPL0
    /// exception stubs are installed (guest programs), so port 0x510 reports a fault;
    /// other guests (Linux) writing it are ignored.
    pub fn new(start: Instant, exception_reports: bool) -> Self {
        GuestPorts { start, boot_marker: OnceLock::new(), exception_reports, generation: AtomicU64::new(0) }
    }

    /// Live updates this guest has gone through.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Sets the generation and the boot-marker time (both handed over by a live
    /// update; the boot marker counts from the first process's start).
    pub fn restore(&self, generation: u64, boot_marker: Option<Duration>) {
        self.generation.store(generation, Ordering::Relaxed);
        if let Some(b) = boot_marker {
            let _ = self.boot_marker.set(b);
        }
    }

    /// An `in` from one of the ports: the generation port reads the generation
    /// (low 32 bits); the others read as all ones.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        match port {
            GENERATION_PORT => super::put_u32(data, self.generation() as u32),
            _ => data.fill(0xff),
        }
    }

    /// Time from VMM start to the first boot-marker write.
    pub fn boot_marker(&self) -> Option<Duration> {
        self.boot_marker.get().copied()
    }

    /// An `out` to one of the ports.
    pub fn write(&self, port: u16, data: &[u8]) -> IoAction {
        match port {
            EXIT_PORT => IoAction::Exit(data.first().copied().unwrap_or(0)),
            BOOT_MARKER_PORT => {
                let _ = self.boot_marker.set(self.start.elapsed());
                IoAction::Continue
            }
            PARK_PORT => IoAction::Park,
            EXCEPTION_PORT if self.exception_reports => IoAction::Exception,
            _ => IoAction::Continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_map_to_actions() {
        let p = GuestPorts::new(Instant::now(), true);
        assert_eq!(GuestPorts::new(Instant::now(), false).write(EXCEPTION_PORT, &[0]), IoAction::Continue);
        assert_eq!(p.write(EXIT_PORT, &[7, 1, 0, 0]), IoAction::Exit(7));
        assert_eq!(p.write(EXIT_PORT, &[]), IoAction::Exit(0));
        assert!(p.boot_marker().is_none());
        assert_eq!(p.write(BOOT_MARKER_PORT, &[1]), IoAction::Continue);
        let first = p.boot_marker().unwrap();
        p.write(BOOT_MARKER_PORT, &[1]);
        assert_eq!(p.boot_marker(), Some(first), "only the first write counts");
        assert_eq!(p.write(PARK_PORT, &[0]), IoAction::Park);
        assert_eq!(p.write(EXCEPTION_PORT, &[0]), IoAction::Exception);
        assert_eq!(p.write(0x505, &[0]), IoAction::Continue);
        let mut v = [0u8; 4];
        p.read(GENERATION_PORT, &mut v);
        assert_eq!(u32::from_le_bytes(v), 0);
        p.restore(7, Some(Duration::from_millis(3)));
        p.read(GENERATION_PORT, &mut v);
        assert_eq!(u32::from_le_bytes(v), 7);
        assert_eq!(p.boot_marker(), Some(first), "a boot marker already set stays");
        p.read(0x504, &mut v);
        assert_eq!(v, [0xff; 4]);
    }
}
