//! COM1: a vm-superio 8250 UART on ports 0x3f8-0x3ff whose interrupt is an eventfd
//! (wired to GSI 4 through an irqfd when the VM has an irqchip), writing to stdout,
//! a file, or nowhere.

use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;

use thiserror::Error;
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// First port.
pub const COM1: u16 = 0x3f8;
/// Last port.
pub const COM1_END: u16 = 0x3ff;
/// Its ISA interrupt.
pub const COM1_IRQ: u32 = 4;

/// Where the console goes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SerialOutput {
    /// The VMM's stdout.
    Stdout,
    /// A file, created or truncated.
    File(PathBuf),
    /// Discarded.
    None,
}

/// Errors from setting up the console.
#[derive(Debug, Error)]
pub enum SerialError {
    /// The output file could not be created.
    #[error("cannot create serial output file '{path}'")]
    Create {
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The interrupt eventfd could not be made.
    #[error("cannot create the serial interrupt eventfd")]
    EventFd(#[source] io::Error),
}

/// The interrupt line: an eventfd KVM turns into an IRQ.
#[derive(Debug)]
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

type Uart = vm_superio::Serial<IrqLine, vm_superio::serial::NoEvents, Box<dyn Write + Send>>;

/// The UART with its output.
pub struct Serial {
    uart: Uart,
}

impl Serial {
    /// A UART writing to `out`.
    pub fn new(out: &SerialOutput) -> Result<Self, SerialError> {
        let w: Box<dyn Write + Send> = match out {
            SerialOutput::Stdout => Box::new(io::stdout()),
            SerialOutput::File(p) => {
                Box::new(File::create(p).map_err(|source| SerialError::Create { path: p.clone(), source })?)
            }
            SerialOutput::None => Box::new(io::sink()),
        };
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(SerialError::EventFd)?;
        Ok(Serial { uart: Uart::new(IrqLine(irq), w) })
    }

    /// The interrupt eventfd, to register as an irqfd.
    pub fn irq_evt(&self) -> &EventFd {
        &self.uart.interrupt_evt().0
    }

    /// Register write at `offset`. Output errors are dropped: a console that
    /// cannot be written must not stop the guest.
    pub fn write(&mut self, offset: u8, value: u8) {
        let _ = self.uart.write(offset, value);
    }

    /// Register read at `offset`.
    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    /// Flushes buffered output.
    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_reach_the_file() {
        let p = std::env::temp_dir().join(format!("mosaic-serial-{}", std::process::id()));
        let mut s = Serial::new(&SerialOutput::File(p.clone())).unwrap();
        for b in b"hi\n" {
            s.write(0, *b);
        }
        s.flush();
        assert_eq!(std::fs::read(&p).unwrap(), b"hi\n");
        // Line status: transmitter empty.
        assert_ne!(s.read(5) & 0x20, 0);
        std::fs::remove_file(p).unwrap();
        let missing = SerialOutput::File("/nonexistent-dir/x".into());
        assert!(matches!(Serial::new(&missing), Err(SerialError::Create { .. })));
    }
}
