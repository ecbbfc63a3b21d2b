//! The zero page (`struct boot_params`) handed to the kernel in RSI.
//!
//! For a bzImage the setup header is the kernel's own (as linux-loader read it, with
//! `code32_start` set to the load address); for an ELF kernel a minimal header is made
//! up. Either way Mosaic then fills what a boot loader owns: loader type, command line
//! pointer, initramfs, and the e820 map from the guest memory layout. Everything else
//! stays zero, in particular `sentinel`, so the kernel keeps the fields as given.

use guest_mem::GuestMemory;
use linux_loader::bootparam::{boot_e820_entry, boot_params, E820_MAX_ENTRIES_ZEROPAGE};

use super::loader::{LoadedKernel, HDRS_MAGIC};
use super::{InitramfsPlacement, LinuxError, CMDLINE_ADDR};

/// `type_of_loader` for a boot loader without an assigned id.
pub(crate) const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// The boot sector signature the setup header carries in `boot_flag`.
pub(crate) const BOOT_FLAG: u16 = 0xaa55;
/// `kernel_alignment` stated for ELF kernels (the 16 MiB of `LOAD_PHYSICAL_ADDR`).
const ELF_KERNEL_ALIGNMENT: u32 = 0x100_0000;

/// Builds the zero page for `kernel`.
pub(crate) fn build(
    mem: &GuestMemory,
    kernel: &LoadedKernel,
    initramfs: Option<InitramfsPlacement>,
) -> Result<boot_params, LinuxError> {
    let mut p = boot_params::default();
    match kernel.header {
        Some(hdr) => p.hdr = hdr,
        None => {
            p.hdr.boot_flag = BOOT_FLAG;
            p.hdr.header = HDRS_MAGIC;
            p.hdr.kernel_alignment = ELF_KERNEL_ALIGNMENT;
            p.hdr.cmdline_size = kernel.cmdline_max as u32;
        }
    }
    p.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    p.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    p.ext_cmd_line_ptr = (CMDLINE_ADDR >> 32) as u32;
    if let Some(rd) = initramfs {
        p.hdr.ramdisk_image = rd.addr as u32;
        p.hdr.ramdisk_size = rd.size as u32;
        p.ext_ramdisk_image = (rd.addr >> 32) as u32;
        p.ext_ramdisk_size = (rd.size >> 32) as u32;
    }

    let e820 = mem.layout().e820();
    if e820.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(LinuxError::E820TooLarge { count: e820.len(), max: E820_MAX_ENTRIES_ZEROPAGE });
    }
    for (slot, e) in p.e820_table.iter_mut().zip(&e820) {
        *slot = boot_e820_entry { addr: e.addr, size: e.size, r#type: e.kind.code() };
    }
    p.e820_entries = e820.len() as u8;
    Ok(p)
}
