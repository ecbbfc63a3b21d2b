//! The `mosaic` command.
fn main() {}
