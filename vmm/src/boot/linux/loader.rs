//! Putting the kernel, the command line and the initramfs into guest memory.
//!
//! The kernel format is told by its bytes: a bzImage has the setup header magic `HdrS`
//! at 0x202, an ELF `vmlinux` starts with `\x7fELF`. Both are checked against guest RAM
//! before linux-loader copies them in, so a kernel that does not fit is a clear error.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

use guest_mem::layout::{HIGH_MEMORY_START, MMIO_HOLE_START};
use guest_mem::{GuestMemory, PAGE_4K};
use linux_loader::bootparam::{setup_header, LOADED_HIGH, XLF_KERNEL_64};
use linux_loader::cmdline::{Cmdline, Error as CmdlineError};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{ByteValued, GuestAddress};

use super::{InitramfsPlacement, LinuxError, CMDLINE_ADDR, CMDLINE_MAX_SIZE, KERNEL_LOAD_ADDR};

/// `HdrS`, the setup header magic at 0x202 of a bzImage.
pub(crate) const HDRS_MAGIC: u32 = 0x5372_6448;
/// Offset of the setup header in a bzImage (and in the zero page).
pub(crate) const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// Offset of the 64-bit entry point (`startup_64`) from the protected-mode code.
pub(crate) const STARTUP_64_OFFSET: u64 = 0x200;
/// The kernel's compiled-in load address when the header does not say
/// (`LOAD_PHYSICAL_ADDR`, 16 MiB on x86-64 distributions).
const DEFAULT_PREF_ADDRESS: u64 = 0x100_0000;
/// Command line limit of kernels older than boot protocol 2.06.
const OLD_CMDLINE_MAX: usize = 255;
/// Command line limit for an ELF kernel (x86 `COMMAND_LINE_SIZE` - 1).
pub(crate) const ELF_CMDLINE_MAX: usize = 2047;
/// `initrd_addr_max` of kernels older than boot protocol 2.03.
const OLD_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// Highest initramfs byte for an ELF kernel (what current bzImages declare).
const ELF_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;
/// Most program headers an ELF kernel may have.
const MAX_PHNUM: usize = 256;
/// Bytes read from the start of a kernel to tell its format.
const HEAD_LEN: usize = SETUP_HEADER_OFFSET + std::mem::size_of::<setup_header>();

/// The two kernel formats Mosaic boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelKind {
    /// A compressed bzImage, entered at its 64-bit entry (`load + 0x200`).
    BzImage,
    /// An uncompressed ELF `vmlinux`, entered at `e_entry`.
    Elf,
}

/// A kernel in guest memory.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LoadedKernel {
    pub kind: KernelKind,
    /// First byte loaded.
    pub load: u64,
    /// One past the last byte the kernel needs (image, bss, decompression buffer).
    pub end: u64,
    /// 64-bit entry point.
    pub entry: u64,
    /// The bzImage's setup header (with `code32_start` set to the load address).
    pub header: Option<setup_header>,
    /// Longest command line the kernel takes, without the NUL.
    pub cmdline_max: usize,
    /// Highest address an initramfs byte may have.
    pub initrd_addr_max: u64,
}

/// One past the last byte of the RAM that starts at guest-physical 0 and runs without a
/// gap, capped at the MMIO hole: where the kernel, its initramfs and boot data may go.
pub(crate) fn low_ram_end(mem: &GuestMemory) -> u64 {
    let mut end = 0;
    for r in mem.regions() {
        if r.gpa == end {
            end = r.gpa + r.size;
        } else if r.gpa > end {
            break;
        }
    }
    end.min(MMIO_HOLE_START)
}

/// Loads the kernel at `path`: bzImage if it has a setup header, else ELF.
pub(crate) fn load_kernel(mem: &GuestMemory, path: &Path) -> Result<LoadedKernel, LinuxError> {
    let open_err = |source| LinuxError::KernelOpen { path: path.to_path_buf(), source };
    let read_err = |source| LinuxError::KernelRead { path: path.to_path_buf(), source };
    let mut file = File::open(path).map_err(open_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(open_err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file")));
    }
    let file_len = meta.len();
    let mut head = Vec::with_capacity(HEAD_LEN);
    (&mut file).take(HEAD_LEN as u64).read_to_end(&mut head).map_err(read_err)?;

    if head.len() >= 0x206 && le_u32(&head, 0x202) == HDRS_MAGIC {
        load_bzimage(mem, path, &mut file, file_len, &head)
    } else if head.starts_with(b"\x7fELF") {
        load_elf(mem, path, &mut file, file_len, &head)
    } else {
        Err(not_a_kernel(path, "no bzImage setup header (HdrS at 0x202) and no ELF magic"))
    }
}

fn not_a_kernel(path: &Path, reason: impl Into<String>) -> LinuxError {
    LinuxError::NotAKernel { path: path.to_path_buf(), reason: reason.into() }
}

fn unsupported(path: &Path, reason: impl Into<String>) -> LinuxError {
    LinuxError::UnsupportedKernel { path: path.to_path_buf(), reason: reason.into() }
}

/// Checks that `[start, end)` is guest RAM.
fn check_fits(mem: &GuestMemory, path: &Path, start: u64, end: u64) -> Result<(), LinuxError> {
    let too_large = || LinuxError::KernelTooLarge { path: path.to_path_buf(), start, end, ram_end: low_ram_end(mem) };
    if end > MMIO_HOLE_START {
        return Err(too_large());
    }
    mem.check(start, end - start).map_err(|_| too_large())
}

fn load_bzimage(
    mem: &GuestMemory,
    path: &Path,
    file: &mut File,
    file_len: u64,
    head: &[u8],
) -> Result<LoadedKernel, LinuxError> {
    if head.len() < HEAD_LEN {
        return Err(not_a_kernel(path, "bzImage setup header is truncated"));
    }
    let mut hdr = setup_header::default();
    hdr.as_mut_slice().copy_from_slice(&head[SETUP_HEADER_OFFSET..HEAD_LEN]);
    // Fields of the packed header are copied out before use.
    let version = hdr.version;
    if version < 0x020c {
        return Err(unsupported(
            path,
            format!("boot protocol {}.{:02} is older than 2.12: no 64-bit entry point", version >> 8, version & 0xff),
        ));
    }
    let xloadflags = hdr.xloadflags;
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err(unsupported(path, "bzImage has no 64-bit entry point (XLF_KERNEL_64 clear)"));
    }
    if hdr.loadflags & LOADED_HIGH == 0 {
        return Err(unsupported(path, "zImage (loads below 1 MiB); only bzImage is supported"));
    }
    let setup_sects = if hdr.setup_sects == 0 { 4 } else { u64::from(hdr.setup_sects) };
    let setup_size = (setup_sects + 1) * 512;
    if file_len <= setup_size {
        return Err(not_a_kernel(path, "bzImage has no protected-mode code after its setup sectors"));
    }
    let payload = file_len - setup_size;

    let load = KERNEL_LOAD_ADDR;
    let image_end = load.checked_add(payload).ok_or_else(|| not_a_kernel(path, "bzImage size overflows"))?;
    // The decompressor (entered at startup_64) works in a buffer of init_size bytes at
    // the kernel's preferred address, or at the load address rounded up to
    // kernel_alignment if that is higher and the kernel is relocatable.
    let pref = hdr.pref_address;
    let pref = if pref == 0 { DEFAULT_PREF_ADDRESS } else { pref };
    let align = u64::from(hdr.kernel_alignment);
    let out_start = if hdr.relocatable_kernel != 0 && align.is_power_of_two() {
        guest_mem::align_up(load, align).unwrap_or(load).max(pref)
    } else {
        pref
    };
    let end = out_start
        .checked_add(u64::from(hdr.init_size))
        .ok_or_else(|| not_a_kernel(path, "bzImage init_size overflows"))?
        .max(image_end);
    check_fits(mem, path, load, end)?;

    let view = mem.loader_view().map_err(|source| LinuxError::Memory { what: "the kernel", source })?;
    let res = BzImage::load(view, Some(GuestAddress(load)), file, Some(GuestAddress(HIGH_MEMORY_START)))
        .map_err(|source| LinuxError::KernelLoad { path: path.to_path_buf(), source })?;
    let header = res.setup_header.unwrap_or(hdr);
    let cmdline_max = if version >= 0x0206 { hdr.cmdline_size as usize } else { OLD_CMDLINE_MAX };
    let initrd_addr_max = if version >= 0x0203 { u64::from(hdr.initrd_addr_max) } else { OLD_INITRD_ADDR_MAX };
    Ok(LoadedKernel {
        kind: KernelKind::BzImage,
        load,
        end,
        entry: load + STARTUP_64_OFFSET,
        header: Some(header),
        cmdline_max,
        initrd_addr_max,
    })
}

/// A PT_LOAD program header.
#[derive(Debug, Clone, Copy)]
struct Segment {
    paddr: u64,
    offset: u64,
    filesz: u64,
    memsz: u64,
}

fn load_elf(
    mem: &GuestMemory,
    path: &Path,
    file: &mut File,
    file_len: u64,
    head: &[u8],
) -> Result<LoadedKernel, LinuxError> {
    const EHDR_LEN: usize = 64;
    const PHDR_LEN: usize = 56;
    const PT_LOAD: u32 = 1;
    const EM_X86_64: u16 = 62;
    if head.len() < EHDR_LEN {
        return Err(not_a_kernel(path, "ELF header is truncated"));
    }
    if head[4] != 2 || head[5] != 1 {
        return Err(unsupported(path, "not a 64-bit little-endian ELF"));
    }
    if le_u16(head, 0x12) != EM_X86_64 {
        return Err(unsupported(path, "ELF is not for x86-64"));
    }
    let e_entry = le_u64(head, 0x18);
    let e_phoff = le_u64(head, 0x20);
    let e_phentsize = le_u16(head, 0x36) as usize;
    let e_phnum = le_u16(head, 0x38) as usize;
    if e_phentsize != PHDR_LEN || e_phnum == 0 || e_phnum > MAX_PHNUM {
        return Err(not_a_kernel(path, format!("bad ELF program header table ({e_phnum} x {e_phentsize} bytes)")));
    }
    let table_len = (e_phnum * PHDR_LEN) as u64;
    if e_phoff.checked_add(table_len).is_none_or(|e| e > file_len) {
        return Err(not_a_kernel(path, "ELF program header table is past the end of the file"));
    }
    let mut table = vec![0u8; e_phnum * PHDR_LEN];
    let read_err = |source| LinuxError::KernelRead { path: path.to_path_buf(), source };
    file.seek(SeekFrom::Start(e_phoff)).map_err(read_err)?;
    file.read_exact(&mut table).map_err(read_err)?;

    let mut segments = Vec::new();
    for ph in table.chunks_exact(PHDR_LEN) {
        if le_u32(ph, 0) != PT_LOAD || le_u64(ph, 0x20) == 0 {
            // linux-loader skips segments with nothing in the file too.
            continue;
        }
        let s = Segment {
            offset: le_u64(ph, 8),
            paddr: le_u64(ph, 0x18),
            filesz: le_u64(ph, 0x20),
            memsz: le_u64(ph, 0x28),
        };
        if s.offset.checked_add(s.filesz).is_none_or(|e| e > file_len) {
            return Err(not_a_kernel(path, "an ELF segment is past the end of the file"));
        }
        if s.paddr.checked_add(s.memsz.max(s.filesz)).is_none() {
            return Err(not_a_kernel(path, "an ELF segment's address overflows"));
        }
        segments.push(s);
    }
    let start =
        segments.iter().map(|s| s.paddr).min().ok_or_else(|| not_a_kernel(path, "ELF has no loadable segment"))?;
    let end = segments.iter().map(|s| s.paddr + s.memsz.max(s.filesz)).max().unwrap_or(start);
    if start < HIGH_MEMORY_START {
        return Err(unsupported(path, format!("ELF loads at {start:#x}, below 1 MiB")));
    }
    if !(start..end).contains(&e_entry) {
        return Err(unsupported(path, format!("ELF entry {e_entry:#x} is outside its segments")));
    }
    check_fits(mem, path, start, end)?;

    let view = mem.loader_view().map_err(|source| LinuxError::Memory { what: "the kernel", source })?;
    let res = Elf::load(view, None, file, Some(GuestAddress(HIGH_MEMORY_START)))
        .map_err(|source| LinuxError::KernelLoad { path: path.to_path_buf(), source })?;
    // linux-loader copies p_filesz bytes; the rest of each segment (bss) must be zero.
    for s in segments.iter().filter(|s| s.memsz > s.filesz) {
        mem.zero(s.paddr + s.filesz, s.memsz - s.filesz)
            .map_err(|source| LinuxError::Memory { what: "the kernel's bss", source })?;
    }
    Ok(LoadedKernel {
        kind: KernelKind::Elf,
        load: start,
        end,
        entry: res.kernel_load.0,
        header: None,
        cmdline_max: ELF_CMDLINE_MAX,
        initrd_addr_max: ELF_INITRD_ADDR_MAX,
    })
}

/// Writes `cmdline` NUL-terminated at [`CMDLINE_ADDR`]; returns its length without the NUL.
pub(crate) fn write_cmdline(mem: &GuestMemory, cmdline: &str, kernel_max: usize) -> Result<u64, LinuxError> {
    let max = kernel_max.min(CMDLINE_MAX_SIZE as usize - 1);
    let too_long = || LinuxError::CmdlineTooLong { len: cmdline.len(), max };
    if cmdline.len() > max {
        return Err(too_long());
    }
    let mut cl = Cmdline::new(max + 1).map_err(LinuxError::Cmdline)?;
    cl.insert_str(cmdline).map_err(|e| match e {
        CmdlineError::TooLarge => too_long(),
        e => LinuxError::Cmdline(e),
    })?;
    let c = cl.as_cstring().map_err(LinuxError::Cmdline)?;
    mem.write(CMDLINE_ADDR, c.as_bytes_with_nul())
        .map_err(|source| LinuxError::Memory { what: "the command line", source })?;
    Ok(c.as_bytes().len() as u64)
}

/// Loads the initramfs at `path` as high in low RAM as `initrd_addr_max` allows, above
/// `kernel_end`. An empty file loads nothing.
pub(crate) fn load_initramfs(
    mem: &GuestMemory,
    path: &Path,
    kernel_end: u64,
    initrd_addr_max: u64,
) -> Result<Option<InitramfsPlacement>, LinuxError> {
    let read_err = |source| LinuxError::InitramfsRead { path: path.to_path_buf(), source };
    let mut file = File::open(path).map_err(|source| LinuxError::InitramfsOpen { path: path.to_path_buf(), source })?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(LinuxError::InitramfsOpen {
            path: path.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
        });
    }
    let size = meta.len();
    if size == 0 {
        return Ok(None);
    }
    let limit = initrd_addr_max.saturating_add(1).min(low_ram_end(mem));
    let lowest = guest_mem::align_up(kernel_end, PAGE_4K).unwrap_or(u64::MAX);
    let room = limit.saturating_sub(lowest);
    if size > room {
        return Err(LinuxError::InitramfsTooLarge { path: path.to_path_buf(), size, room, limit });
    }
    // limit - size >= lowest, which is page-aligned, so rounding down stays above it.
    let addr = (limit - size) & !(PAGE_4K - 1);
    let mut buf = vec![0u8; (1 << 20).min(size as usize)];
    let mut done = 0u64;
    while done < size {
        let n = (size - done).min(buf.len() as u64) as usize;
        file.read_exact(&mut buf[..n]).map_err(read_err)?;
        mem.write(addr + done, &buf[..n]).map_err(|source| LinuxError::Memory { what: "the initramfs", source })?;
        done += n as u64;
    }
    Ok(Some(InitramfsPlacement { addr, size }))
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}
