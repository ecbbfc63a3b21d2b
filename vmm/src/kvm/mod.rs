//! KVM helpers rust-vmm does not provide: capability numbers, binary stats.

pub mod caps;
pub mod stats;

pub use caps::{Caps, CapsError};
pub use stats::{StatDesc, StatsError, StatsFd};
