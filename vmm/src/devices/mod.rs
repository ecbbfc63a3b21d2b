//! Devices: port I/O bus, serial, debug-exit, boot marker, i8042.
