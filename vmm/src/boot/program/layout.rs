//! Where the VMM puts its structures for a guest program (the system area below
//! 2 MiB) and the ports it opens; see docs/GUEST-ABI.md for the picture.

/// Guest address of the boot-info block.
pub const BOOT_INFO: u64 = 0x1000;
/// Guest address of the IDT (256 gates of 16 bytes).
pub const IDT: u64 = 0x2000;
/// Guest address of the exception stubs.
pub const STUBS: u64 = 0x3000;
/// Bytes per exception stub.
pub const STUB_SIZE: u64 = 16;
/// Guest address of the GDT.
pub const GDT: u64 = 0x4000;
/// Guest address of the first TSS.
pub const TSS: u64 = 0x8000;
/// Bytes between two vCPUs' TSSs.
pub const TSS_STRIDE: u64 = 512;
/// Guest address of the PML4; the PDPT follows, then one PD per GiB.
pub const PML4: u64 = 0x4_0000;
/// End of the page-table area.
pub const PAGE_TABLES_END: u64 = 0xC_0000;
/// Guest address of the first CPL0 (exception) stack.
pub const KSTACKS: u64 = 0xC_0000;
/// Bytes of CPL0 stack per vCPU.
pub const KSTACK_SIZE: u64 = 0x1000;
/// Lowest address a program image may use.
pub const IMAGE_START: u64 = 0x20_0000;
/// Bytes of user stack per vCPU.
pub const USTACK_SIZE: u64 = 64 << 10;
/// Most vCPUs a guest program can have (TSS and CPL0 stacks must fit below 2 MiB).
pub const MAX_VCPUS: u32 = 254;
/// Most free ranges the boot-info block lists.
pub const MAX_FREE_RANGES: usize = 32;
/// Highest guest-physical address the page tables can map (one PD per GiB).
pub const MAX_MAPPED: u64 = ((PAGE_TABLES_END - PML4) / 0x1000 - 2) << 30;

/// GDT selector of the 64-bit kernel code segment.
pub const SEL_KCODE: u16 = 0x08;
/// GDT selector of the kernel data segment.
pub const SEL_KDATA: u16 = 0x10;
/// GDT selector (with RPL 3) of the user data segment.
pub const SEL_UDATA: u16 = 0x1b;
/// GDT selector (with RPL 3) of the 64-bit user code segment.
pub const SEL_UCODE: u16 = 0x23;
/// GDT selector of vCPU 0's TSS; vCPU i's is `SEL_TSS0 + 16 * i`.
pub const SEL_TSS0: u16 = 0x28;

/// Ports a guest program may use (inclusive ranges); opened in every TSS I/O bitmap.
pub const OPEN_PORTS: &[(u16, u16)] = &[(0x3f8, 0x3ff), (0x500, 0x507), (0x520, 0x53f)];
/// Ports covered by the I/O permission bitmap; ports above are always denied.
pub const IOPB_PORTS: u32 = 0x600;

/// Guest address of vCPU `i`'s TSS.
pub const fn tss_addr(i: u32) -> u64 {
    TSS + TSS_STRIDE * i as u64
}

/// Top of vCPU `i`'s CPL0 stack.
pub const fn kstack_top(i: u32) -> u64 {
    KSTACKS + KSTACK_SIZE * (i as u64 + 1)
}

/// Number of GDT bytes for `vcpus` vCPUs.
pub const fn gdt_size(vcpus: u32) -> u64 {
    8 * (5 + 2 * vcpus as u64)
}

// The system area fits below the image, checked at compile time.
const _: () = {
    assert!(GDT + gdt_size(MAX_VCPUS) <= TSS);
    assert!(tss_addr(MAX_VCPUS) <= PML4);
    assert!(kstack_top(MAX_VCPUS - 1) <= IMAGE_START);
    assert!(IDT + 256 * 16 <= STUBS && STUBS + 32 * STUB_SIZE <= GDT);
    assert!(104 + IOPB_PORTS as u64 / 8 < TSS_STRIDE);
    assert!(MAX_MAPPED == 126 << 30);
};
