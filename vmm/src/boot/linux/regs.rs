//! vCPU state for the 64-bit boot protocol.
//!
//! The BSP starts in long mode at CPL0: paging on with identity page tables for the
//! first 4 GiB (2 MiB pages; this host has no 1 GiB pages), a flat GDT with `__BOOT_CS`
//! 0x10 (64-bit code) and `__BOOT_DS` 0x18, interrupts off, RIP at the kernel's 64-bit
//! entry and RSI at the zero page. Every vCPU gets a clean FPU (fcw 0x37f, mxcsr
//! 0x1f80), a few MSRs, and its local APIC's LINT0/LINT1 set to ExtINT/NMI (virtual
//! wire, as the MP table says). APs then wait for INIT/SIPI in the in-kernel irqchip.

use guest_mem::{GuestMemory, PAGE_2M};
use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;

use super::{LinuxBoot, LinuxError, BOOT_STACK, GDT_ADDR, PML4_ADDR, TSS_ADDR};

/// Selector of the 64-bit code segment (`__BOOT_CS`).
pub(crate) const BOOT_CS: u16 = 0x10;
/// Selector of the data segment (`__BOOT_DS`).
pub(crate) const BOOT_DS: u16 = 0x18;
/// Selector of the TSS.
pub(crate) const BOOT_TSS: u16 = 0x20;

/// Descriptor flags (bits 40..55 of a descriptor, limit bits masked out):
/// G=1 L=1 P=1 DPL=0 S=1 type=0xb (execute/read, accessed).
const CODE64_FLAGS: u16 = 0xa09b;
/// G=1 D/B=1 P=1 DPL=0 S=1 type=3 (read/write, accessed).
const DATA_FLAGS: u16 = 0xc093;
/// P=1 DPL=0 S=0 type=0xb (busy 64-bit TSS).
const TSS_FLAGS: u16 = 0x008b;
/// TSS limit (a 64-bit TSS without an I/O bitmap).
const TSS_LIMIT: u32 = 0x67;

/// CR0: PE MP ET NE WP PG.
pub(crate) const BOOT_CR0: u64 = 0x8001_0033;
/// CR4: PAE.
pub(crate) const BOOT_CR4: u64 = 1 << 5;
/// EFER: LME | LMA.
pub(crate) const BOOT_EFER: u64 = (1 << 8) | (1 << 10);
/// RFLAGS: only the reserved bit 1; interrupts off.
const BOOT_RFLAGS: u64 = 0x2;

/// Page table entry bits.
const PTE_PRESENT: u64 = 1;
const PTE_WRITE: u64 = 1 << 1;
const PTE_PS: u64 = 1 << 7;
/// Page directories (one per GiB) identity-mapping the first 4 GiB.
pub(crate) const IDENTITY_GIBS: u64 = 4;

/// MSRs.
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// IA32_MISC_ENABLE: fast string operations.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRdefType: MTRRs enabled, default type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// FPU control word after FNINIT.
pub(crate) const FPU_FCW: u16 = 0x37f;
/// MXCSR at reset: all exceptions masked.
pub(crate) const FPU_MXCSR: u32 = 0x1f80;

/// Local APIC register offsets and delivery modes.
pub(crate) const APIC_LVT_LINT0: usize = 0x350;
pub(crate) const APIC_LVT_LINT1: usize = 0x360;
pub(crate) const APIC_MODE_NMI: u32 = 0x4;
pub(crate) const APIC_MODE_EXTINT: u32 = 0x7;

/// Sets up vCPU `index` for the Linux boot `boot`. Index 0 is the BSP: it also gets the
/// page tables and GDT (written into `mem`) and the boot registers. CPUID must be set
/// before, with APIC id = `index`; the in-kernel irqchip must exist.
pub fn configure_vcpu(vcpu: &VcpuFd, index: u32, boot: &LinuxBoot, mem: &GuestMemory) -> Result<(), LinuxError> {
    if index >= boot.vcpus {
        return Err(LinuxError::VcpuIndex { index, vcpus: boot.vcpus });
    }
    set_msrs(vcpu)?;
    set_fpu(vcpu)?;
    set_lint(vcpu)?;
    if index == 0 {
        write_gdt(mem)?;
        write_page_tables(mem)?;
        set_sregs(vcpu)?;
        set_regs(vcpu, boot)?;
    }
    Ok(())
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> LinuxError {
    move |source| LinuxError::Kvm { what, source }
}

/// A GDT descriptor: `flags` holds bits 40..55 (access byte and G/DB/L/AVL nibble).
pub(crate) fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (base, limit, flags) = (u64::from(base), u64::from(limit), u64::from(flags));
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The KVM view of a segment loaded from a descriptor made by [`gdt_entry`].
fn segment(selector: u16, flags: u16, base: u64, limit: u32) -> kvm_segment {
    let g = (flags >> 15) & 1;
    kvm_segment {
        base,
        // KVM takes the limit in bytes.
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector,
        type_: (flags & 0xf) as u8,
        s: ((flags >> 4) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        present: ((flags >> 7) & 1) as u8,
        avl: ((flags >> 12) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        db: ((flags >> 14) & 1) as u8,
        g: g as u8,
        unusable: 0,
        padding: 0,
    }
}

/// The GDT: null, null, code, data, TSS (16 bytes).
pub(crate) fn gdt() -> [u64; 6] {
    let tss = u64::from(TSS_ADDR as u32);
    [
        0,
        0,
        gdt_entry(CODE64_FLAGS, 0, 0xfffff),
        gdt_entry(DATA_FLAGS, 0, 0xfffff),
        gdt_entry(TSS_FLAGS, TSS_ADDR as u32, TSS_LIMIT),
        // Upper half of the 16-byte TSS descriptor: base bits 32..63.
        tss >> 32,
    ]
}

fn write_gdt(mem: &GuestMemory) -> Result<(), LinuxError> {
    let bytes: Vec<u8> = gdt().iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write(GDT_ADDR, &bytes).map_err(|source| LinuxError::Memory { what: "the boot GDT", source })?;
    mem.zero(TSS_ADDR, u64::from(TSS_LIMIT) + 1).map_err(|source| LinuxError::Memory { what: "the boot TSS", source })
}

/// PML4 at [`PML4_ADDR`], the PDPT in the next page, then one page directory per GiB.
fn write_page_tables(mem: &GuestMemory) -> Result<(), LinuxError> {
    let err = |source| LinuxError::Memory { what: "the boot page tables", source };
    let pdpt = PML4_ADDR + 0x1000;
    let pd0 = PML4_ADDR + 0x2000;
    let page = |entries: &[u64]| -> Vec<u8> {
        let mut p = vec![0u8; 4096];
        for (i, e) in entries.iter().enumerate() {
            p[i * 8..i * 8 + 8].copy_from_slice(&e.to_le_bytes());
        }
        p
    };
    mem.write(PML4_ADDR, &page(&[pdpt | PTE_PRESENT | PTE_WRITE])).map_err(err)?;
    let pdpes: Vec<u64> = (0..IDENTITY_GIBS).map(|g| (pd0 + g * 0x1000) | PTE_PRESENT | PTE_WRITE).collect();
    mem.write(pdpt, &page(&pdpes)).map_err(err)?;
    for g in 0..IDENTITY_GIBS {
        let pdes: Vec<u64> = (0..512).map(|i| ((g << 30) + i * PAGE_2M) | PTE_PRESENT | PTE_WRITE | PTE_PS).collect();
        mem.write(pd0 + g * 0x1000, &page(&pdes)).map_err(err)?;
    }
    Ok(())
}

/// Long mode, flat segments, the boot GDT and page tables.
pub(crate) fn boot_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment(BOOT_CS, CODE64_FLAGS, 0, 0xfffff);
    let data = segment(BOOT_DS, DATA_FLAGS, 0, 0xfffff);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(BOOT_TSS, TSS_FLAGS, TSS_ADDR, TSS_LIMIT);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of::<[u64; 6]>() - 1) as u16;
    // No IDT: the kernel installs its own before it enables interrupts.
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = BOOT_CR0;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = BOOT_CR4;
    sregs.efer = BOOT_EFER;
    sregs
}

fn set_sregs(vcpu: &VcpuFd) -> Result<(), LinuxError> {
    let sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    vcpu.set_sregs(&boot_sregs(sregs)).map_err(kvm("KVM_SET_SREGS"))
}

fn set_regs(vcpu: &VcpuFd, boot: &LinuxBoot) -> Result<(), LinuxError> {
    let regs = kvm_regs {
        rflags: BOOT_RFLAGS,
        rip: boot.entry,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: boot.boot_params,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))
}

fn set_fpu(vcpu: &VcpuFd) -> Result<(), LinuxError> {
    let fpu = kvm_fpu { fcw: FPU_FCW, mxcsr: FPU_MXCSR, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))
}

/// The MSRs set at boot: syscall/sysenter state cleared, fast strings on, MTRRs on with
/// write-back as the default type (no variable ranges: all RAM is WB).
pub(crate) fn boot_msrs() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_LSTAR, 0),
        (MSR_CSTAR, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry { index, data, ..Default::default() })
    .collect()
}

fn set_msrs(vcpu: &VcpuFd) -> Result<(), LinuxError> {
    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(LinuxError::MsrList)?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(LinuxError::MsrsRefused { set, wanted: entries.len(), refused: entries[set].index });
    }
    Ok(())
}

pub(crate) fn apic_reg(lapic: &kvm_lapic_state, off: usize) -> u32 {
    let b = &lapic.regs[off..off + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_apic_reg(lapic: &mut kvm_lapic_state, off: usize, v: u32) {
    for (dst, src) in lapic.regs[off..off + 4].iter_mut().zip(v.to_le_bytes()) {
        *dst = src as std::os::raw::c_char;
    }
}

/// `lvt` with its delivery mode (bits 8..10) replaced by `mode`.
fn with_delivery_mode(lvt: u32, mode: u32) -> u32 {
    (lvt & !0x700) | (mode << 8)
}

fn set_lint(vcpu: &VcpuFd) -> Result<(), LinuxError> {
    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    let lint0 = apic_reg(&lapic, APIC_LVT_LINT0);
    set_apic_reg(&mut lapic, APIC_LVT_LINT0, with_delivery_mode(lint0, APIC_MODE_EXTINT));
    let lint1 = apic_reg(&lapic, APIC_LVT_LINT1);
    set_apic_reg(&mut lapic, APIC_LVT_LINT1, with_delivery_mode(lint1, APIC_MODE_NMI));
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_encode_flat_segments() {
        let g = gdt();
        assert_eq!(g[(BOOT_CS / 8) as usize], 0x00af_9b00_0000_ffff);
        assert_eq!(g[(BOOT_DS / 8) as usize], 0x00cf_9300_0000_ffff);
        let tss = g[(BOOT_TSS / 8) as usize];
        assert_eq!(tss & 0xffff, u64::from(TSS_LIMIT));
        assert_eq!((tss >> 16) & 0xff_ffff, TSS_ADDR);
        let cs = segment(BOOT_CS, CODE64_FLAGS, 0, 0xfffff);
        assert_eq!((cs.l, cs.db, cs.g, cs.type_, cs.limit), (1, 0, 1, 0xb, 0xffff_ffff));
    }

    #[test]
    fn delivery_mode_keeps_the_other_bits() {
        assert_eq!(with_delivery_mode(0x1_0000, APIC_MODE_EXTINT), 0x1_0700);
        assert_eq!(with_delivery_mode(0x1_0700, APIC_MODE_NMI), 0x1_0400);
    }
}
