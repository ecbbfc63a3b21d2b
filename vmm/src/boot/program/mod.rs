//! Guest programs: a static ELF entered in 64-bit long mode at CPL3 on every vCPU,
//! with the page tables, GDT/TSS/IDT and boot-info block the VMM builds for it.
//! The ABI is written down in docs/GUEST-ABI.md.

pub mod elf;
pub mod layout;
pub mod paging;
pub mod tables;

use guest_mem::{AccessError, GuestMemory, PAGE_2M};
use kvm_bindings::{kvm_fpu, kvm_mp_state, kvm_regs, kvm_segment, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::VcpuFd;
use thiserror::Error;

use layout::*;

/// Boot-info magic, "MOSB".
pub const BOOT_INFO_MAGIC: u32 = 0x4253_4f4d;
/// Boot-info version.
pub const BOOT_INFO_VERSION: u32 = 1;

/// Errors from preparing or entering a guest program.
#[derive(Debug, Error)]
pub enum ProgramError {
    /// The image is not a valid guest program.
    #[error("invalid guest program")]
    Elf(#[from] elf::ElfError),
    /// Too many vCPUs for the system area.
    #[error("guest programs support at most {MAX_VCPUS} vCPUs, {0} asked")]
    TooManyVcpus(u32),
    /// The image or stacks do not fit in the first RAM region.
    #[error("the first {first_region} bytes of RAM cannot hold the system area, the program (up to {image_end:#x}) and its stacks")]
    DoesNotFit {
        /// Size of the first region.
        first_region: u64,
        /// End of the image.
        image_end: u64,
    },
    /// RAM beyond what the page tables can map.
    #[error("guest programs support RAM up to {MAX_MAPPED:#x}")]
    TooMuchRam,
    /// More free ranges than the boot-info block holds.
    #[error("guest RAM is split into more than {MAX_FREE_RANGES} ranges")]
    TooManyRanges,
    /// Writing guest memory failed.
    #[error("cannot write guest memory")]
    Memory(#[from] AccessError),
    /// A vCPU register ioctl failed.
    #[error("cannot set up vCPU {index} registers")]
    Vcpu {
        /// vCPU index.
        index: u32,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// A guest program loaded into guest memory, ready for its vCPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramBoot {
    /// Entry point.
    pub entry: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Base of the user stacks (vCPU i's stack top is base + (i+1) * 64 KiB).
    pub stacks: u64,
    /// Free RAM handed to the program.
    pub free: Vec<(u64, u64)>,
    /// Enter at CPL0 instead of CPL3 (host-check's kernel-mode probe only).
    pub kernel_mode: bool,
}

/// Loads `image` and builds everything a guest program runs on.
/// `use_1g`: the guest CPU offers 1 GiB pages (CPUID PDPE1GB), so 1 GiB-backed RAM is
/// mapped with 1 GiB entries. `arg` goes to boot info (`--guest-arg`).
pub fn prepare(
    mem: &GuestMemory,
    image: &[u8],
    vcpus: u32,
    tsc_khz: u32,
    use_1g: bool,
    arg: u32,
) -> Result<ProgramBoot, ProgramError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(ProgramError::TooManyVcpus(vcpus));
    }
    let img = elf::parse(image, IMAGE_START)?;
    let ram: Vec<(u64, u64)> = mem.regions().iter().map(|r| (r.gpa, r.size)).collect();
    let first = ram.first().copied().unwrap_or((0, 0));
    let stacks = img.end().next_multiple_of(PAGE_2M);
    let stacks_end = (stacks + USTACK_SIZE * u64::from(vcpus)).next_multiple_of(PAGE_2M);
    if first.0 != 0 || stacks_end > first.1 {
        return Err(ProgramError::DoesNotFit { first_region: first.1, image_end: img.end() });
    }
    let ranges: Vec<paging::RamRange> =
        mem.regions().iter().map(|r| paging::RamRange { gpa: r.gpa, size: r.size, page_size: r.page_size }).collect();
    let tables = paging::identity(&ranges, use_1g).ok_or(ProgramError::TooMuchRam)?;

    for s in &img.segments {
        mem.write(s.paddr, &image[s.offset..s.offset + s.filesz])?;
        mem.zero(s.paddr + s.filesz as u64, s.memsz - s.filesz as u64)?;
    }
    for (addr, entries) in &tables.pages {
        let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
        mem.write(*addr, &bytes)?;
    }
    mem.write(GDT, &tables::gdt(vcpus))?;
    for i in 0..vcpus {
        mem.write(tss_addr(i), &tables::tss(i))?;
    }
    mem.write(IDT, &tables::idt())?;
    mem.write(STUBS, &tables::stubs())?;

    let mut free = Vec::new();
    if stacks_end < first.1 {
        free.push((stacks_end, first.1 - stacks_end));
    }
    for &(gpa, size) in &ram[1..] {
        match free.last_mut() {
            Some((g, s)) if *g + *s == gpa => *s += size,
            _ => free.push((gpa, size)),
        }
    }
    if free.len() > MAX_FREE_RANGES {
        return Err(ProgramError::TooManyRanges);
    }
    let ram_size = ram.iter().map(|r| r.1).sum();
    mem.write(BOOT_INFO, &boot_info(vcpus, ram_size, tsc_khz, tables.page_shift, &free, arg))?;
    Ok(ProgramBoot { entry: img.entry, vcpus, stacks, free, kernel_mode: false })
}

/// The boot-info block (docs/GUEST-ABI.md).
pub fn boot_info(vcpus: u32, ram_size: u64, tsc_khz: u32, page_shift: u32, free: &[(u64, u64)], arg: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(40 + 16 * free.len());
    b.extend(BOOT_INFO_MAGIC.to_le_bytes());
    b.extend(BOOT_INFO_VERSION.to_le_bytes());
    b.extend(vcpus.to_le_bytes());
    b.extend(page_shift.to_le_bytes());
    b.extend(ram_size.to_le_bytes());
    b.extend(u64::from(tsc_khz).to_le_bytes());
    b.extend((free.len() as u32).to_le_bytes());
    b.extend(arg.to_le_bytes());
    for &(g, l) in free {
        b.extend(g.to_le_bytes());
        b.extend(l.to_le_bytes());
    }
    b
}

fn segment(selector: u16, code: bool, dpl: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Puts vCPU `index` at the program's entry point: long mode, paging on the identity
/// tables, CPL3 (or CPL0 for the probe), its TSS, stack and registers.
pub fn configure_vcpu(vcpu: &VcpuFd, index: u32, boot: &ProgramBoot) -> Result<(), ProgramError> {
    let err = |source| ProgramError::Vcpu { index, source };
    let mut sregs = vcpu.get_sregs().map_err(err)?;
    let (code_sel, data_sel, dpl) =
        if boot.kernel_mode { (SEL_KCODE, SEL_KDATA, 0) } else { (SEL_UCODE, SEL_UDATA, 3) };
    sregs.cs = segment(code_sel, true, dpl);
    let data = segment(data_sel, false, dpl);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = kvm_segment {
        base: tss_addr(index),
        limit: tables::TSS_SIZE - 1,
        selector: SEL_TSS0 + 16 * index as u16,
        type_: 0xb,
        present: 1,
        ..Default::default()
    };
    sregs.gdt.base = GDT;
    sregs.gdt.limit = (gdt_size(boot.vcpus) - 1) as u16;
    sregs.idt.base = IDT;
    sregs.idt.limit = 256 * 16 - 1;
    sregs.cr0 = 0x8001_0033;
    sregs.cr3 = PML4;
    sregs.cr4 = 0x620; // PAE | OSFXSR | OSXMMEXCPT
    sregs.efer = 0x500; // LME | LMA
    vcpu.set_sregs(&sregs).map_err(err)?;

    let regs = kvm_regs {
        rip: boot.entry,
        rsp: boot.stacks + USTACK_SIZE * (u64::from(index) + 1),
        rdi: u64::from(index),
        rsi: u64::from(boot.vcpus),
        rdx: BOOT_INFO,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(err)?;
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(err)?;
    vcpu.set_mp_state(kvm_mp_state { mp_state: KVM_MP_STATE_RUNNABLE }).map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_info_matches_the_abi() {
        let b = boot_info(2, 64 << 20, 2_600_000, 21, &[(0x40_0000, 0x3c0_0000)], 9);
        assert_eq!(&b[0..4], b"MOSB");
        assert_eq!(u32::from_le_bytes(b[8..12].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(b[12..16].try_into().unwrap()), 21);
        assert_eq!(u64::from_le_bytes(b[16..24].try_into().unwrap()), 64 << 20);
        assert_eq!(u32::from_le_bytes(b[32..36].try_into().unwrap()), 1);
        assert_eq!(u32::from_le_bytes(b[36..40].try_into().unwrap()), 9, "--guest-arg");
        assert_eq!(u64::from_le_bytes(b[40..48].try_into().unwrap()), 0x40_0000);
        assert_eq!(b.len(), 56);
    }
}
