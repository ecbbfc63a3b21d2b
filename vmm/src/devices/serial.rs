//! COM1: a vm-superio 8250 UART on ports 0x3f8-0x3ff whose interrupt is an eventfd
//! (wired to GSI 4 through an irqfd when the VM has an irqchip), writing to stdout,
//! a file, or nowhere.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
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
    /// The console's fd could not be duplicated.
    #[error("cannot use the console's output")]
    Stdout(#[source] io::Error),
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

/// COM1's registers and receive buffer (vm-superio's `SerialState`, in a form that
/// crosses a process boundary).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialRegs {
    /// Divisor latch, low and high bytes.
    pub baud_divisor: [u8; 2],
    /// IER, IIR, LCR, LSR, MCR, MSR, SCR.
    pub regs: [u8; 7],
    /// Bytes received and not read yet.
    pub in_buffer: Vec<u8>,
}

impl Default for SerialRegs {
    fn default() -> Self {
        SerialRegs::from(&vm_superio::serial::SerialState::default())
    }
}

impl From<&vm_superio::serial::SerialState> for SerialRegs {
    fn from(s: &vm_superio::serial::SerialState) -> Self {
        SerialRegs {
            baud_divisor: [s.baud_divisor_low, s.baud_divisor_high],
            regs: [
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl From<&SerialRegs> for vm_superio::serial::SerialState {
    fn from(r: &SerialRegs) -> Self {
        let [ier, iir, lcr, lsr, mcr, msr, scr] = r.regs;
        vm_superio::serial::SerialState {
            baud_divisor_low: r.baud_divisor[0],
            baud_divisor_high: r.baud_divisor[1],
            interrupt_enable: ier,
            interrupt_identification: iir,
            line_control: lcr,
            line_status: lsr,
            modem_control: mcr,
            modem_status: msr,
            scratch: scr,
            in_buffer: r.in_buffer.clone(),
        }
    }
}

/// The UART with its output.
pub struct Serial {
    uart: Uart,
    /// The output's fd (kept to hand over in a live update); `None` discards.
    out_fd: Option<OwnedFd>,
}

fn writer(fd: Option<&OwnedFd>) -> io::Result<Box<dyn Write + Send>> {
    Ok(match fd {
        Some(fd) => Box::new(io::LineWriter::new(File::from(fd.try_clone()?))),
        None => Box::new(io::sink()),
    })
}

impl Serial {
    /// A UART writing to `out`.
    pub fn new(out: &SerialOutput) -> Result<Self, SerialError> {
        let fd = match out {
            SerialOutput::Stdout => Some(io::stdout().as_fd().try_clone_to_owned().map_err(SerialError::Stdout)?),
            SerialOutput::File(p) => {
                Some(OwnedFd::from(File::create(p).map_err(|source| SerialError::Create { path: p.clone(), source })?))
            }
            SerialOutput::None => None,
        };
        Self::with_fd(fd)
    }

    /// A UART writing to `fd` (a console handed over by a live update), or nowhere.
    pub fn with_fd(out_fd: Option<OwnedFd>) -> Result<Self, SerialError> {
        let w = writer(out_fd.as_ref()).map_err(SerialError::Stdout)?;
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(SerialError::EventFd)?;
        Ok(Serial { uart: Uart::new(IrqLine(irq), w), out_fd })
    }

    /// The registers and receive buffer (output is flushed first).
    pub fn save(&mut self) -> SerialRegs {
        self.flush();
        SerialRegs::from(&self.uart.state())
    }

    /// Puts the registers back (a freshly made UART, before the guest runs). A
    /// receive buffer longer than the FIFO is cut to it.
    pub fn restore(&mut self, regs: &SerialRegs) {
        let mut state = vm_superio::serial::SerialState::from(regs);
        state.in_buffer.truncate(64);
        let rebuilt = self.uart.interrupt_evt().0.try_clone().and_then(|irq| {
            let w = writer(self.out_fd.as_ref())?;
            Uart::from_state(&state, IrqLine(irq), vm_superio::serial::NoEvents, w)
                .map_err(|e| io::Error::other(format!("{e:?}")))
        });
        if let Ok(uart) = rebuilt {
            self.uart = uart;
        }
    }

    /// A duplicate of the output fd, to hand over.
    pub fn output_fd(&self) -> Option<OwnedFd> {
        self.out_fd.as_ref().and_then(|f| f.try_clone().ok())
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
        // The registers survive a save and restore into a new UART on the same file.
        s.write(7, 0x5a); // scratch
        let regs = s.save();
        let mut t = Serial::with_fd(s.output_fd()).unwrap();
        t.restore(&regs);
        assert_eq!(t.read(7), 0x5a);
        for b in b"ok\n" {
            t.write(0, *b);
        }
        t.flush();
        assert_eq!(std::fs::read(&p).unwrap(), b"hi\nok\n");
        std::fs::remove_file(p).unwrap();
        let missing = SerialOutput::File("/nonexistent-dir/x".into());
        assert!(matches!(Serial::new(&missing), Err(SerialError::Create { .. })));
    }
}
