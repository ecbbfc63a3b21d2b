//! Identity page tables for a guest program: all guest RAM is mapped present, writable
//! and user-accessible with the largest pages its backing uses (1 GiB entries where the
//! backing is 1 GiB pages and the guest CPU offers them, 2 MiB elsewhere), so the
//! guest's TLB reach matches the host's (with shadow paging KVM maps huge only where the
//! guest does). The MMIO hole and anything beyond RAM are not mapped.

use super::layout::{MAX_MAPPED, PML4};

const PRESENT_RW_USER: u64 = 0x7;
const PAGE_SIZE_BIT: u64 = 1 << 7;
const HUGE_2M: u64 = 2 << 20;
const HUGE_1G: u64 = 1 << 30;

/// A RAM range to map: first GPA, size, and the page size of its backing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRange {
    /// First GPA.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Page size of the backing.
    pub page_size: u64,
}

/// One page-table page to write: its guest address and 512 entries.
pub type TablePage = (u64, Vec<u64>);

/// The page tables and the largest page size they use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tables {
    /// Pages to write.
    pub pages: Vec<TablePage>,
    /// log2 of the largest page size used (21 or 30).
    pub page_shift: u32,
}

/// Builds the PML4, the PDPT and the PDs for `ram`: whole GiBs of 1 GiB-backed RAM
/// get 1 GiB entries when `use_1g`; every other whole 2 MiB page gets a 2 MiB entry.
/// `None` if RAM reaches beyond [`MAX_MAPPED`].
pub fn identity(ram: &[RamRange], use_1g: bool) -> Option<Tables> {
    let end = ram.iter().map(|r| r.gpa + r.size).max()?;
    if end > MAX_MAPPED {
        return None;
    }
    let pdpt_addr = PML4 + 0x1000;
    let pd_addr = |gib: u64| PML4 + 0x2000 + gib * 0x1000;
    let mut pml4 = vec![0u64; 512];
    pml4[0] = pdpt_addr | PRESENT_RW_USER;
    let mut pdpt = vec![0u64; 512];
    let mut pds: Vec<(u64, Vec<u64>)> = Vec::new();
    let mut page_shift = 21;
    for r in ram {
        let (gpa, size) = (r.gpa, r.size);
        let mut page = gpa.div_ceil(HUGE_2M) * HUGE_2M;
        while page + HUGE_2M <= gpa + size {
            if use_1g && r.page_size >= HUGE_1G && page.is_multiple_of(HUGE_1G) && page + HUGE_1G <= gpa + size {
                pdpt[(page >> 30) as usize] = page | PRESENT_RW_USER | PAGE_SIZE_BIT;
                page_shift = 30;
                page += HUGE_1G;
                continue;
            }
            let gib = page >> 30;
            let addr = pd_addr(gib);
            if pdpt[gib as usize] == 0 {
                pdpt[gib as usize] = addr | PRESENT_RW_USER;
                pds.push((addr, vec![0u64; 512]));
            }
            let pd = &mut pds.iter_mut().find(|(a, _)| *a == addr)?.1;
            pd[((page >> 21) & 511) as usize] = page | PRESENT_RW_USER | PAGE_SIZE_BIT;
            page += HUGE_2M;
        }
    }
    let mut pages = vec![(PML4, pml4), (pdpt_addr, pdpt)];
    pages.extend(pds);
    Some(Tables { pages, page_shift })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks the tables: (physical address, page size) for `va`.
    fn walk(tables: &[TablePage], va: u64) -> Option<(u64, u64)> {
        let get = |addr: u64, idx: u64| tables.iter().find(|(a, _)| *a == addr).map(|(_, e)| e[idx as usize]);
        let e4 = get(PML4, (va >> 39) & 511)?;
        let e3 = get(e4 & !0xfff, (va >> 30) & 511).filter(|e| e & 1 == 1)?;
        if e3 & 0x80 != 0 {
            return Some(((e3 & !0x3fff_ffff & !0x87) | (va & 0x3fff_ffff), 1 << 30));
        }
        let e2 = get(e3 & !0xfff, (va >> 21) & 511).filter(|e| e & 1 == 1)?;
        assert_eq!(e2 & 0x87, 0x87);
        Some(((e2 & !0x1f_ffff & !0x87) | (va & 0x1f_ffff), 2 << 20))
    }

    fn lookup(tables: &[TablePage], va: u64) -> Option<u64> {
        walk(tables, va).map(|(pa, _)| pa)
    }

    fn range(gpa: u64, size: u64, page_size: u64) -> RamRange {
        RamRange { gpa, size, page_size }
    }

    #[test]
    fn maps_ram_identically_and_leaves_the_hole_unmapped() {
        let ram = [range(0, 3 << 30, 4096), range(4 << 30, 1 << 30, 4096)];
        let t = identity(&ram, true).unwrap();
        assert_eq!(t.page_shift, 21);
        let t = t.pages;
        assert_eq!(lookup(&t, 0x20_1234), Some(0x20_1234));
        assert_eq!(lookup(&t, (3 << 30) - 8), Some((3 << 30) - 8));
        assert_eq!(lookup(&t, 3 << 30), None);
        assert_eq!(lookup(&t, (4 << 30) + 0x40_0000), Some((4 << 30) + 0x40_0000));
        assert_eq!(lookup(&t, 5 << 30), None);
        assert_eq!(t.len(), 2 + 4);
    }

    #[test]
    fn one_gig_backing_gets_one_gig_entries_only_when_offered() {
        let ram = [range(0, 3 << 30, 1 << 30), range(4 << 30, (1 << 30) + (2 << 20), 1 << 30)];
        let t = identity(&ram, true).unwrap();
        assert_eq!(t.page_shift, 30);
        assert_eq!(walk(&t.pages, (1 << 30) + 5), Some(((1 << 30) + 5, 1 << 30)));
        assert_eq!(walk(&t.pages, (5 << 30) + 8), Some(((5 << 30) + 8, 2 << 20)), "the partial GiB uses 2M");
        let t = identity(&ram, false).unwrap();
        assert_eq!(t.page_shift, 21);
        assert_eq!(walk(&t.pages, (1 << 30) + 5), Some(((1 << 30) + 5, 2 << 20)));
        // 2 MiB-backed RAM never gets 1 GiB entries.
        let t = identity(&[range(0, 2 << 30, 2 << 20)], true).unwrap();
        assert_eq!(t.page_shift, 21);
    }

    #[test]
    fn refuses_ram_beyond_the_table_area() {
        assert!(identity(&[range(0, MAX_MAPPED + (2 << 20), 4096)], false).is_none());
    }
}
