//! Devices on the port I/O bus: COM1 serial, the i8042 reset line, and Mosaic's guest
//! ports (exit, boot marker, park, exception report).
//!
//! vCPU threads call [`Devices::io_out`] / [`Devices::io_in`] on every port exit; the
//! result tells the vCPU loop whether to go on or stop.

pub mod guest_ports;
pub mod i8042;
pub mod paravirt;
pub mod serial;

use std::sync::Mutex;
use std::time::Instant;

pub use guest_ports::{GuestPorts, EXCEPTION_PORT, EXIT_PORT};
pub use serial::{SerialError, SerialOutput};

/// What a port access asks of the vCPU loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoAction {
    /// Go on running.
    Continue,
    /// The guest ended the run with this exit code.
    Exit(u8),
    /// This vCPU is done.
    Park,
    /// The guest asked for a reset (i8042): the run ends.
    Reset,
    /// A CPL0 exception stub reported a fault.
    Exception,
}

/// All devices of one VM.
pub struct Devices {
    serial: Mutex<serial::Serial>,
    i8042: i8042::I8042,
    ports: GuestPorts,
    /// Unknown-port accesses seen (counted, not logged per access: guests can flood).
    unknown: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Devices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Devices").field("ports", &self.ports).finish_non_exhaustive()
    }
}

impl Devices {
    /// Devices with the serial console going to `serial`; boot-marker times count
    /// from `start`; `exception_reports` for guest programs (their CPL0 stubs).
    pub fn new(serial: serial::Serial, start: Instant, exception_reports: bool) -> Self {
        Devices {
            serial: Mutex::new(serial),
            i8042: i8042::I8042,
            ports: GuestPorts::new(start, exception_reports),
            unknown: Default::default(),
        }
    }

    /// Mosaic's guest ports (boot-marker time).
    pub fn guest_ports(&self) -> &GuestPorts {
        &self.ports
    }

    /// Number of accesses to ports no device claims.
    pub fn unknown_accesses(&self) -> u64 {
        self.unknown.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Flushes the serial console.
    pub fn flush(&self) {
        if let Ok(mut s) = self.serial.lock() {
            s.flush();
        }
    }

    /// An `out` to `port`.
    pub fn io_out(&self, port: u16, data: &[u8]) -> IoAction {
        match port {
            serial::COM1..=serial::COM1_END => {
                if let (Ok(mut s), Some(&b)) = (self.serial.lock(), data.first()) {
                    s.write((port - serial::COM1) as u8, b);
                }
                IoAction::Continue
            }
            i8042::DATA | i8042::COMMAND => self.i8042.write(port, data),
            guest_ports::FIRST..=guest_ports::LAST => self.ports.write(port, data),
            _ => {
                self.unknown.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                IoAction::Continue
            }
        }
    }

    /// An `in` from `port`; `data` is filled.
    pub fn io_in(&self, port: u16, data: &mut [u8]) {
        match port {
            serial::COM1..=serial::COM1_END => {
                let v = self.serial.lock().map(|mut s| s.read((port - serial::COM1) as u8)).unwrap_or(0xff);
                data.fill(0);
                if let Some(b) = data.first_mut() {
                    *b = v;
                }
            }
            i8042::DATA | i8042::COMMAND => self.i8042.read(port, data),
            _ => {
                self.unknown.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                data.fill(0xff);
            }
        }
    }
}
