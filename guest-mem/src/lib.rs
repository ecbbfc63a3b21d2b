//! Guest memory for Mosaic: where guest RAM lives in guest-physical space
//! ([`layout`]), what host memory backs it ([`backend`], [`mapping`]), and the one
//! road through which the VMM reads and writes guest bytes ([`accessor`]).
//!
//! ```text
//!   --memory flags ──► ZoneSpec ──► layout::place() ──► RegionLayout (GPA ranges)
//!                          │                                   │
//!                          ▼                                   ▼
//!                 backend::create() ──► Backing (fd + aligned host mapping)
//!                                              │
//!                                              ▼
//!                     GuestMemory ── regions() ──► KVM memslots (vmm)
//!                          │
//!                          └── read/write/read_obj/write_obj ──► every VMM access
//! ```
#![deny(missing_docs)]

pub mod accessor;
pub mod attrs;
pub mod backend;
pub mod capacity;
pub mod convert;
pub mod engine;
pub mod layout;
pub mod mapping;

pub use accessor::{AccessError, GuestMemory, GuestRegion};
pub use attrs::{AttrError, Attributes, PageState};
pub use backend::{BackendKind, BackendSpec, Backing, Fallback, GmemFactory, Reserve};
pub use engine::{EngineKind, KernelAttributes, KernelEngine};
pub use layout::{E820Entry, E820Kind, LayoutError, MemoryLayout, RegionLayout, ZoneSpec};

/// 4 KiB, the base page size.
pub const PAGE_4K: u64 = 4 << 10;
/// 2 MiB, the x86 PMD huge page size.
pub const PAGE_2M: u64 = 2 << 20;
/// 1 GiB, the x86 PUD huge page size.
pub const PAGE_1G: u64 = 1 << 30;

pub use hugepage::page_size_label as page_label;

/// Rounds `v` up to a multiple of `align` (a power of two); `None` on overflow.
pub fn align_up(v: u64, align: u64) -> Option<u64> {
    debug_assert!(align.is_power_of_two());
    v.checked_add(align - 1).map(|x| x & !(align - 1))
}
