//! The bit of an i8042 keyboard controller a microVM needs: the CPU reset line
//! (command 0xfe on port 0x64), which Linux uses to reboot with `reboot=k`.

use super::IoAction;

/// Data port.
pub const DATA: u16 = 0x60;
/// Status/command port.
pub const COMMAND: u16 = 0x64;
const CMD_RESET_CPU: u8 = 0xfe;

/// The controller; it holds no state.
#[derive(Debug, Default)]
pub struct I8042;

impl I8042 {
    /// An `out`: only the reset command does anything.
    pub fn write(&self, port: u16, data: &[u8]) -> IoAction {
        if port == COMMAND && data.first() == Some(&CMD_RESET_CPU) {
            IoAction::Reset
        } else {
            IoAction::Continue
        }
    }

    /// An `in`: status reads "no data, ready for input"; data reads 0.
    pub fn read(&self, _port: u16, data: &mut [u8]) {
        data.fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_resets() {
        assert_eq!(I8042.write(COMMAND, &[0xfe]), IoAction::Reset);
        assert_eq!(I8042.write(COMMAND, &[0xaa]), IoAction::Continue);
        assert_eq!(I8042.write(DATA, &[0xfe]), IoAction::Continue);
        let mut b = [0xffu8];
        I8042.read(COMMAND, &mut b);
        assert_eq!(b, [0]);
    }
}
