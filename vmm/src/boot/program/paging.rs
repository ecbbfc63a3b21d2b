//! Identity page tables for a guest program: every 2 MiB page of guest RAM is mapped
//! present, writable and user-accessible; the MMIO hole and anything beyond RAM are not.

use super::layout::{MAX_MAPPED, PML4};

const PRESENT_RW_USER: u64 = 0x7;
const PAGE_SIZE_BIT: u64 = 1 << 7;
const HUGE_2M: u64 = 2 << 20;

/// One page-table page to write: its guest address and 512 entries.
pub type TablePage = (u64, Vec<u64>);

/// Builds the PML4, the PDPT and one PD per GiB that holds RAM, mapping every whole
/// 2 MiB page inside `ram` (sorted `(gpa, size)` ranges). `None` if RAM reaches
/// beyond [`MAX_MAPPED`].
pub fn identity_2m(ram: &[(u64, u64)]) -> Option<Vec<TablePage>> {
    let end = ram.iter().map(|&(g, s)| g + s).max()?;
    if end > MAX_MAPPED {
        return None;
    }
    let pdpt_addr = PML4 + 0x1000;
    let pd_addr = |gib: u64| PML4 + 0x2000 + gib * 0x1000;
    let mut pml4 = vec![0u64; 512];
    pml4[0] = pdpt_addr | PRESENT_RW_USER;
    let mut pdpt = vec![0u64; 512];
    let mut pds: Vec<(u64, Vec<u64>)> = Vec::new();
    for &(gpa, size) in ram {
        let mut page = gpa.div_ceil(HUGE_2M) * HUGE_2M;
        while page + HUGE_2M <= gpa + size {
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
    let mut out = vec![(PML4, pml4), (pdpt_addr, pdpt)];
    out.extend(pds);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(tables: &[TablePage], va: u64) -> Option<u64> {
        let get = |addr: u64, idx: u64| tables.iter().find(|(a, _)| *a == addr).map(|(_, e)| e[idx as usize]);
        let e4 = get(PML4, (va >> 39) & 511)?;
        let e3 = get(e4 & !0xfff, (va >> 30) & 511).filter(|e| e & 1 == 1)?;
        let e2 = get(e3 & !0xfff, (va >> 21) & 511).filter(|e| e & 1 == 1)?;
        assert_eq!(e2 & 0x87, 0x87);
        Some((e2 & !0x1f_ffff & !0x87) | (va & 0x1f_ffff))
    }

    #[test]
    fn maps_ram_identically_and_leaves_the_hole_unmapped() {
        let ram = [(0, 3 << 30), (4 << 30, 1 << 30)];
        let t = identity_2m(&ram).unwrap();
        assert_eq!(lookup(&t, 0x20_1234), Some(0x20_1234));
        assert_eq!(lookup(&t, (3 << 30) - 8), Some((3 << 30) - 8));
        assert_eq!(lookup(&t, 3 << 30), None);
        assert_eq!(lookup(&t, (4 << 30) + 0x40_0000), Some((4 << 30) + 0x40_0000));
        assert_eq!(lookup(&t, 5 << 30), None);
        assert_eq!(t.len(), 2 + 4);
    }

    #[test]
    fn refuses_ram_beyond_the_table_area() {
        assert!(identity_2m(&[(0, MAX_MAPPED + (2 << 20))]).is_none());
    }
}
