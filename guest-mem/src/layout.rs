//! Guest-physical layout: RAM zones placed around the 32-bit MMIO hole, and the e820 map.
//!
//! ```text
//!  0 ─────────────── 3 GiB ─────────── 4 GiB ───────────────────────►
//!  │ RAM (zones in  │ MMIO hole        │ RAM continues (rest of the  │
//!  │ flag order)    │ (devices, LAPIC, │ zone that crossed 3 GiB,    │
//!  │                │ IOAPIC)          │ then later zones)           │
//! ```
//! Each zone (one `--memory` flag) starts at a GPA aligned to its placement alignment
//! (at least 2 MiB, or the backing's page size if larger), so guest and host huge
//! pages line up. A zone that reaches the hole is split in two regions; the hole is
//! 1 GiB, so a zone's host mapping stays congruent to its GPAs on both sides.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::backend::BackendSpec;
use crate::{align_up, PAGE_2M};

/// Start of the 32-bit MMIO hole (3 GiB).
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// End of the 32-bit MMIO hole (4 GiB).
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// Highest guest-physical address Mosaic places RAM below (46 bits, 64 TiB).
pub const MAX_GPA: u64 = 1 << 46;
/// Smallest zone Mosaic accepts.
pub const MIN_ZONE_SIZE: u64 = PAGE_2M;
/// Legacy area reserved in the e820 map for BIOS data (EBDA, VGA, ROMs).
pub const EBDA_START: u64 = 0x9_fc00;
/// End of the first MiB.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;

/// Errors from placing guest RAM.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum LayoutError {
    /// No zone given.
    #[error("no guest memory configured")]
    Empty,
    /// A zone below the minimum size.
    #[error("zone {zone}: size {size} is below the minimum of {min} bytes")]
    TooSmall {
        /// Zone index.
        zone: usize,
        /// Requested size.
        size: u64,
        /// Minimum size.
        min: u64,
    },
    /// A zone whose size is not a multiple of its alignment.
    #[error("zone {zone}: size {size} is not a multiple of {align} bytes")]
    Unaligned {
        /// Zone index.
        zone: usize,
        /// Requested size.
        size: u64,
        /// Required multiple.
        align: u64,
    },
    /// Guest RAM would reach beyond the guest-physical address space Mosaic uses.
    #[error("guest memory ends beyond the {max:#x} guest-physical limit")]
    TooLarge {
        /// The limit.
        max: u64,
    },
}

/// One zone of guest RAM as asked for: a size and a backend (one `--memory` flag).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZoneSpec {
    /// Bytes of guest RAM in the zone.
    pub size: u64,
    /// What backs the zone.
    pub backend: BackendSpec,
}

/// One contiguous guest-physical RAM range; part of one zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionLayout {
    /// First guest-physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub size: u64,
    /// Index of the zone it belongs to.
    pub zone: usize,
    /// Offset of this range within the zone's backing.
    pub zone_offset: u64,
}

impl RegionLayout {
    /// One past the last guest-physical address.
    pub fn end(&self) -> u64 {
        self.gpa + self.size
    }
}

/// Kind of an e820 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum E820Kind {
    /// Usable RAM (type 1).
    Ram,
    /// Reserved (type 2).
    Reserved,
}

impl E820Kind {
    /// The numeric e820 type.
    pub fn code(self) -> u32 {
        match self {
            E820Kind::Ram => 1,
            E820Kind::Reserved => 2,
        }
    }
}

/// One entry of the e820 map handed to a Linux guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct E820Entry {
    /// First address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Entry type.
    pub kind: E820Kind,
}

/// The whole guest-physical RAM layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayout {
    zones: Vec<ZoneSpec>,
    regions: Vec<RegionLayout>,
}

impl MemoryLayout {
    /// Places `zones` in guest-physical space, in order, around the MMIO hole.
    pub fn place(zones: Vec<ZoneSpec>) -> Result<Self, LayoutError> {
        if zones.is_empty() {
            return Err(LayoutError::Empty);
        }
        let mut regions = Vec::new();
        let mut cursor = 0u64;
        for (i, zone) in zones.iter().enumerate() {
            if zone.size < MIN_ZONE_SIZE {
                return Err(LayoutError::TooSmall { zone: i, size: zone.size, min: MIN_ZONE_SIZE });
            }
            let align = zone.backend.placement_align();
            if zone.size % align != 0 {
                return Err(LayoutError::Unaligned { zone: i, size: zone.size, align });
            }
            let too_large = LayoutError::TooLarge { max: MAX_GPA };
            cursor = align_up(cursor, align).ok_or(too_large.clone())?;
            let mut left = zone.size;
            let mut zone_offset = 0;
            while left > 0 {
                if (MMIO_HOLE_START..MMIO_HOLE_END).contains(&cursor) {
                    cursor = MMIO_HOLE_END;
                }
                let room = if cursor < MMIO_HOLE_START { MMIO_HOLE_START - cursor } else { u64::MAX };
                let chunk = left.min(room);
                let end = cursor.checked_add(chunk).ok_or(too_large.clone())?;
                if end > MAX_GPA {
                    return Err(too_large);
                }
                regions.push(RegionLayout { gpa: cursor, size: chunk, zone: i, zone_offset });
                cursor = end;
                zone_offset += chunk;
                left -= chunk;
            }
        }
        Ok(MemoryLayout { zones, regions })
    }

    /// The zones, as asked for.
    pub fn zones(&self) -> &[ZoneSpec] {
        &self.zones
    }

    /// The RAM ranges, sorted by address.
    pub fn regions(&self) -> &[RegionLayout] {
        &self.regions
    }

    /// Total bytes of guest RAM.
    pub fn ram_size(&self) -> u64 {
        self.zones.iter().map(|z| z.size).sum()
    }

    /// One past the highest RAM address.
    pub fn ram_end(&self) -> u64 {
        self.regions.last().map_or(0, RegionLayout::end)
    }

    /// Whether `[gpa, gpa+len)` lies inside the MMIO hole (even partly).
    pub fn touches_hole(gpa: u64, len: u64) -> bool {
        let end = gpa.saturating_add(len);
        gpa < MMIO_HOLE_END && end > MMIO_HOLE_START
    }

    /// The e820 map for a Linux guest: low RAM up to the EBDA, the legacy area
    /// reserved, RAM from 1 MiB, and every RAM range above; gaps (the MMIO hole)
    /// are left out, which Linux reads as not-RAM.
    pub fn e820(&self) -> Vec<E820Entry> {
        let mut out = Vec::new();
        for r in &self.regions {
            if r.gpa < HIGH_MEMORY_START {
                let low_end = r.end().min(EBDA_START);
                if low_end > r.gpa {
                    out.push(E820Entry { addr: r.gpa, size: low_end - r.gpa, kind: E820Kind::Ram });
                }
                out.push(E820Entry {
                    addr: EBDA_START,
                    size: HIGH_MEMORY_START - EBDA_START,
                    kind: E820Kind::Reserved,
                });
                if r.end() > HIGH_MEMORY_START {
                    out.push(E820Entry {
                        addr: HIGH_MEMORY_START,
                        size: r.end() - HIGH_MEMORY_START,
                        kind: E820Kind::Ram,
                    });
                }
            } else if let Some(last) = out.last_mut().filter(|e| e.kind == E820Kind::Ram && e.addr + e.size == r.gpa) {
                last.size += r.size;
            } else {
                out.push(E820Entry { addr: r.gpa, size: r.size, kind: E820Kind::Ram });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{BackendKind, BackendSpec};
    use crate::PAGE_1G;

    fn zone(size: u64) -> ZoneSpec {
        ZoneSpec { size, backend: BackendSpec::new(BackendKind::Memfd) }
    }

    #[test]
    fn small_guest_is_one_region_at_zero() {
        let l = MemoryLayout::place(vec![zone(64 << 20)]).unwrap();
        assert_eq!(l.regions(), &[RegionLayout { gpa: 0, size: 64 << 20, zone: 0, zone_offset: 0 }]);
        assert_eq!(l.ram_end(), 64 << 20);
    }

    #[test]
    fn large_guest_is_split_around_the_hole() {
        let l = MemoryLayout::place(vec![zone(5 * PAGE_1G)]).unwrap();
        let r = l.regions();
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].gpa, r[0].size), (0, 3 * PAGE_1G));
        assert_eq!((r[1].gpa, r[1].size, r[1].zone_offset), (4 * PAGE_1G, 2 * PAGE_1G, 3 * PAGE_1G));
        assert_eq!(l.ram_size(), 5 * PAGE_1G);
        // Host and guest stay congruent modulo 1 GiB across the split.
        assert_eq!((r[1].gpa - r[1].zone_offset) % PAGE_1G, 0);
    }

    #[test]
    fn zones_follow_each_other_and_skip_the_hole() {
        let l = MemoryLayout::place(vec![zone(3 * PAGE_1G), zone(PAGE_1G)]).unwrap();
        let r = l.regions();
        assert_eq!(r.len(), 2);
        assert_eq!((r[1].gpa, r[1].zone), (4 * PAGE_1G, 1));
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert_eq!(MemoryLayout::place(vec![]), Err(LayoutError::Empty));
        assert!(matches!(MemoryLayout::place(vec![zone(4096)]), Err(LayoutError::TooSmall { .. })));
        assert!(matches!(MemoryLayout::place(vec![zone(PAGE_2M + 4096)]), Err(LayoutError::Unaligned { .. })));
        assert!(matches!(MemoryLayout::place(vec![zone(MAX_GPA)]), Err(LayoutError::TooLarge { .. })));
    }

    #[test]
    fn e820_reserves_legacy_area_and_omits_the_hole() {
        let l = MemoryLayout::place(vec![zone(5 * PAGE_1G)]).unwrap();
        let e = l.e820();
        assert_eq!(e[0], E820Entry { addr: 0, size: EBDA_START, kind: E820Kind::Ram });
        assert_eq!(e[1].kind, E820Kind::Reserved);
        assert_eq!(
            e[2],
            E820Entry { addr: HIGH_MEMORY_START, size: 3 * PAGE_1G - HIGH_MEMORY_START, kind: E820Kind::Ram }
        );
        assert_eq!(e[3], E820Entry { addr: 4 * PAGE_1G, size: 2 * PAGE_1G, kind: E820Kind::Ram });
        assert!(e.iter().all(|x| !MemoryLayout::touches_hole(x.addr, x.size)));
    }
}
