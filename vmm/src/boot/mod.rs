//! Ways to start a guest: guest programs entered at CPL3, and Linux.

pub mod linux;
pub mod program;
