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

/// Answers an `in` of `data.len()` bytes with the 32-bit register value `v`
/// (little-endian; bytes past the fourth read as 0).
pub(crate) fn put_u32(data: &mut [u8], v: u32) {
    let b = v.to_le_bytes();
    for (i, d) in data.iter_mut().enumerate() {
        *d = b.get(i).copied().unwrap_or(0);
    }
}

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

/// What a live update hands over of the devices.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DevicesState {
    /// COM1's registers and receive buffer.
    pub serial: serial::SerialRegs,
    /// Live updates the guest has gone through (after this one: the new process adds 1).
    pub generation: u64,
    /// Boot-marker time from the first process's start, in ns.
    pub boot_marker_ns: Option<u64>,
    /// Accesses to ports no device claims, so far.
    pub unknown_port_accesses: u64,
    /// CLOCK_MONOTONIC (ns) when the first process of this guest started.
    pub start_monotonic_ns: u64,
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

    /// Captures the device state (vCPUs paused). `start_monotonic_ns`: when the
    /// guest's first process started.
    pub fn save(&self, start_monotonic_ns: u64) -> DevicesState {
        let serial = self.serial.lock().map(|mut s| s.save()).unwrap_or_default();
        DevicesState {
            serial,
            generation: self.ports.generation(),
            boot_marker_ns: self.ports.boot_marker().map(|d| d.as_nanos() as u64),
            unknown_port_accesses: self.unknown_accesses(),
            start_monotonic_ns,
        }
    }

    /// Restores what [`Devices::save`] captured, as the next generation.
    pub fn restore(&self, s: &DevicesState) {
        if let Ok(mut serial) = self.serial.lock() {
            serial.restore(&s.serial);
        }
        self.ports.restore(s.generation.saturating_add(1), s.boot_marker_ns.map(std::time::Duration::from_nanos));
        self.unknown.store(s.unknown_port_accesses, std::sync::atomic::Ordering::Relaxed);
    }

    /// The serial console's output fd, to hand over (`None` when it discards).
    pub fn serial_fd(&self) -> Option<std::os::fd::OwnedFd> {
        self.serial.lock().ok().and_then(|s| s.output_fd())
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
            guest_ports::FIRST..=guest_ports::LAST => self.ports.read(port, data),
            _ => {
                self.unknown.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                data.fill(0xff);
            }
        }
    }
}
