//! Linux boot: bzImage/ELF via linux-loader, boot params, e820, mptable, CPL0 entry.
//!
//! Mosaic starts Linux through the x86 **64-bit boot protocol**
//! (Documentation/arch/x86/boot.rst, "64-bit Boot Protocol"): the VMM loads the kernel,
//! fills a zero page (`boot_params`), builds identity page tables and a flat GDT, and
//! enters the kernel's 64-bit entry point in long mode at CPL0 with RSI pointing at the
//! zero page. No firmware runs; the guest finds its processors and interrupt wiring in an
//! Intel MP table.
//!
//! [`load`] puts everything into guest memory once per VM; [`configure_vcpu`] sets up
//! each vCPU afterwards (the BSP gets the boot registers, APs wait for INIT/SIPI in the
//! in-kernel irqchip).
//!
//! Fixed guest-physical addresses (all in low RAM, below the EBDA):
//!
//! | address | what |
//! |---|---|
//! | [`GDT_ADDR`] `0x500` | boot GDT: null, null, `0x10` 64-bit code, `0x18` data, `0x20` TSS |
//! | [`TSS_ADDR`] `0x600` | a zeroed 64-bit TSS (KVM wants a valid TR) |
//! | [`ZERO_PAGE_ADDR`] `0x7000` | `boot_params` |
//! | [`BOOT_STACK`] `0x8ff0` | initial RSP/RBP of the BSP |
//! | [`PML4_ADDR`] `0x9000` | PML4, then PDPT (`0xa000`) and 4 PDs (`0xb000`..`0xf000`): 0-4 GiB identity-mapped with 2 MiB pages |
//! | [`CMDLINE_ADDR`] `0x20000` | kernel command line, NUL-terminated |
//! | [`MPTABLE_ADDR`] `0x9fc00` | MP floating pointer, then the MP configuration table (EBDA, reserved in e820) |
//! | [`KERNEL_LOAD_ADDR`] `0x100000` | protected-mode part of a bzImage (an ELF goes to its own physical addresses) |
//! | top of low RAM | initramfs, page-aligned, below the kernel's `initrd_addr_max` |
//!
//! Limits: at most [`MAX_VCPUS`] vCPUs (xAPIC ids in the MP table); the kernel, zero
//! page, command line and initramfs all live below the 3 GiB MMIO hole.

mod error;
mod loader;
mod mptable;
mod params;
mod regs;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use error::LinuxError;
pub use loader::KernelKind;
pub use regs::configure_vcpu;

use guest_mem::GuestMemory;

/// A sensible command line for a Mosaic microVM: console on the first serial port
/// (0x3f8, IRQ 4), reboot through the i8042 reset line (which Mosaic turns into a clean
/// exit), reboot one second after a panic, no PCI probing, and an i8042 driver that does
/// not probe for an AUX port, a mux or PnP.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// Boot GDT.
pub const GDT_ADDR: u64 = 0x500;
/// Boot TSS (zeroed, 0x68 bytes).
pub const TSS_ADDR: u64 = 0x600;
/// The zero page (`boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer of the BSP.
pub const BOOT_STACK: u64 = 0x8ff0;
/// PML4 of the boot page tables; the PDPT and the page directories follow it.
pub const PML4_ADDR: u64 = 0x9000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Room reserved for the command line at [`CMDLINE_ADDR`].
pub const CMDLINE_MAX_SIZE: u64 = 0x1_0000;
/// The MP table (floating pointer first), in the EBDA.
pub const MPTABLE_ADDR: u64 = guest_mem::layout::EBDA_START;
/// Where the protected-mode part of a bzImage is loaded (the kernel's `code32_start`).
pub const KERNEL_LOAD_ADDR: u64 = guest_mem::layout::HIGH_MEMORY_START;
/// Most vCPUs a Linux guest can have here: xAPIC ids 0..=253, the IOAPIC takes the next
/// id and 0xff is the broadcast id.
pub const MAX_VCPUS: u32 = 254;

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxConfig {
    /// The kernel: a bzImage (`vmlinuz`) or an uncompressed ELF `vmlinux`.
    pub kernel: PathBuf,
    /// An initramfs (cpio, possibly compressed), loaded as is.
    pub initramfs: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
}

impl LinuxConfig {
    /// A config for `kernel` with no initramfs and [`DEFAULT_CMDLINE`].
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        LinuxConfig { kernel: kernel.into(), initramfs: None, cmdline: DEFAULT_CMDLINE.to_string() }
    }
}

/// Where an initramfs was put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitramfsPlacement {
    /// Guest-physical address (page-aligned).
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// What [`load`] put where; [`configure_vcpu`] needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxBoot {
    /// The kernel's 64-bit entry point (RIP of the BSP).
    pub entry: u64,
    /// Guest-physical address of the zero page (RSI of the BSP).
    pub boot_params: u64,
    /// bzImage or ELF.
    pub kind: KernelKind,
    /// First guest-physical address the kernel image was loaded at.
    pub kernel_load: u64,
    /// One past the last byte the kernel needs before it sets up its own memory map
    /// (for a bzImage this includes the decompression buffer: `pref_address + init_size`).
    pub kernel_end: u64,
    /// The initramfs, if one was loaded.
    pub initramfs: Option<InitramfsPlacement>,
    /// Guest-physical address of the command line.
    pub cmdline_addr: u64,
    /// Length of the command line in bytes, without the terminating NUL.
    pub cmdline_len: u64,
    /// Guest-physical address of the MP floating pointer.
    pub mptable: u64,
    /// Number of vCPUs the MP table lists.
    pub vcpus: u32,
}

/// Loads the kernel, the initramfs and the command line of `cfg` into `mem` and writes
/// the zero page and an MP table for `vcpus` vCPUs. Run it once, before any vCPU runs.
pub fn load(mem: &GuestMemory, cfg: &LinuxConfig, vcpus: u32) -> Result<LinuxBoot, LinuxError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(LinuxError::VcpuCount { vcpus, max: MAX_VCPUS });
    }
    let kernel = loader::load_kernel(mem, &cfg.kernel)?;
    let cmdline = loader::write_cmdline(mem, &cfg.cmdline, kernel.cmdline_max)?;
    let initramfs = match &cfg.initramfs {
        Some(path) => loader::load_initramfs(mem, path, kernel.end, kernel.initrd_addr_max)?,
        None => None,
    };
    let zero_page = params::build(mem, &kernel, initramfs)?;
    mem.write_obj(ZERO_PAGE_ADDR, &zero_page).map_err(|source| LinuxError::Memory { what: "the zero page", source })?;
    mptable::write(mem, MPTABLE_ADDR, vcpus)?;
    Ok(LinuxBoot {
        entry: kernel.entry,
        boot_params: ZERO_PAGE_ADDR,
        kind: kernel.kind,
        kernel_load: kernel.load,
        kernel_end: kernel.end,
        initramfs,
        cmdline_addr: CMDLINE_ADDR,
        cmdline_len: cmdline,
        mptable: MPTABLE_ADDR,
        vcpus,
    })
}
