//! Tests of the Linux boot path: against a real Debian kernel (fetched by
//! `resources/scripts/fetch-test-kernel.sh` into `target/test-kernel`, or found through
//! `MOSAIC_TEST_KERNEL_DIR`) and against a real KVM vCPU.
//!
//! Without a test kernel the kernel tests print a skip line and pass, unless
//! `MOSAIC_REQUIRE_TEST_KERNEL=1`, which makes them fail.

use std::fs;
use std::path::{Path, PathBuf};

use guest_mem::{BackendKind, BackendSpec, GuestMemory, MemoryLayout, ZoneSpec};
use kvm_bindings::{
    kvm_msr_entry, kvm_userspace_memory_region, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_UNINITIALIZED,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use linux_loader::bootparam::{boot_params, setup_header};
use vm_memory::ByteValued;

use super::loader::{HDRS_MAGIC, SETUP_HEADER_OFFSET, STARTUP_64_OFFSET};
use super::mptable::{MPC_HEADER_LEN, MPC_SIGNATURE, MPF_LEN, MPF_SIGNATURE};
use super::regs::{
    apic_reg, APIC_LVT_LINT0, APIC_LVT_LINT1, APIC_MODE_EXTINT, APIC_MODE_NMI, BOOT_CR0, BOOT_CS, BOOT_DS, BOOT_EFER,
    BOOT_TSS, FPU_FCW, FPU_MXCSR,
};
use super::*;

const MIB: u64 = 1 << 20;

/// Where the test kernel is, or `None` (after printing the skip line) if it is absent.
fn test_kernel_dir(file: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("MOSAIC_TEST_KERNEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-kernel"));
    if dir.join(file).is_file() {
        return Some(dir);
    }
    if std::env::var("MOSAIC_REQUIRE_TEST_KERNEL").as_deref() == Ok("1") {
        panic!("no test kernel {} (run resources/scripts/fetch-test-kernel.sh)", dir.join(file).display());
    }
    skip("no test kernel (run resources/scripts/fetch-test-kernel.sh)");
    None
}

/// Reports a skipped test on stdout and in `$MOSAIC_SKIP_LOG` (which
/// `resources/scripts/test.sh` lists at the end).
fn skip(reason: &str) {
    println!("skipped: {reason}");
    if let Some(p) = std::env::var_os("MOSAIC_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).open(p) {
            let _ = writeln!(f, "skipped: {reason}");
        }
    }
}

macro_rules! need_kernel {
    ($file:expr) => {
        match test_kernel_dir($file) {
            Some(dir) => dir.join($file),
            None => return,
        }
    };
}

fn memory(size: u64) -> GuestMemory {
    let zone = ZoneSpec { size, backend: BackendSpec::new(BackendKind::Memfd) };
    GuestMemory::new(MemoryLayout::place(vec![zone]).unwrap(), None, None).unwrap()
}

/// A file in the temp dir, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, contents: &[u8]) -> Self {
        let path = std::env::temp_dir().join(format!("mosaic-linux-test-{}-{name}", std::process::id()));
        fs::write(&path, contents).unwrap();
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

fn read(mem: &GuestMemory, gpa: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    mem.read(gpa, &mut v).unwrap();
    v
}

fn pseudo_random(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
}

/// Checks the MP table in guest memory: signatures, checksums, one entry per vCPU.
fn assert_mptable(mem: &GuestMemory, vcpus: u32) {
    let mpf = read(mem, MPTABLE_ADDR, MPF_LEN);
    assert_eq!(&mpf[..4], MPF_SIGNATURE);
    assert_eq!(sum(&mpf), 0, "floating pointer checksum");
    let table = u32::from_le_bytes(mpf[4..8].try_into().unwrap()) as u64;
    let header = read(mem, table, MPC_HEADER_LEN);
    assert_eq!(&header[..4], MPC_SIGNATURE);
    let len = u16::from_le_bytes([header[4], header[5]]) as usize;
    let whole = read(mem, table, len);
    assert_eq!(sum(&whole), 0, "configuration table checksum");
    let processors: Vec<&[u8]> =
        whole[MPC_HEADER_LEN..].chunks(20).take(vcpus as usize).filter(|e| e[0] == 0).collect();
    assert_eq!(processors.len(), vcpus as usize);
    assert_eq!(processors[0][3], 3, "vCPU 0 is the enabled BSP");
}

fn assert_e820(mem: &GuestMemory, p: &boot_params) {
    let want = mem.layout().e820();
    assert_eq!(p.e820_entries as usize, want.len());
    for (got, want) in p.e820_table.iter().zip(&want) {
        let (addr, size, kind) = (got.addr, got.size, got.r#type);
        assert_eq!((addr, size, kind), (want.addr, want.size, want.kind.code()));
    }
}

fn assert_cmdline(mem: &GuestMemory, p: &boot_params, cmdline: &str) {
    let ptr = u64::from(p.hdr.cmd_line_ptr) | (u64::from(p.ext_cmd_line_ptr) << 32);
    assert_eq!(ptr, CMDLINE_ADDR);
    let mut want = cmdline.as_bytes().to_vec();
    want.push(0);
    assert_eq!(read(mem, ptr, want.len()), want);
}

#[test]
fn bzimage_loads_with_zero_page_initramfs_and_mptable() {
    let kernel = need_kernel!("vmlinuz");
    let image = fs::read(&kernel).unwrap();
    let mem = memory(256 * MIB);
    // An odd size, so the page alignment of the placement is exercised.
    let rd_bytes = pseudo_random(3 * MIB as usize + 123, 7);
    let rd = TempFile::new("initrd", &rd_bytes);
    let cfg = LinuxConfig { kernel: kernel.clone(), initramfs: Some(rd.0.clone()), cmdline: DEFAULT_CMDLINE.into() };
    let boot = load(&mem, &cfg, 2).unwrap();

    assert_eq!(boot.kind, KernelKind::BzImage);
    assert_eq!(boot.entry, KERNEL_LOAD_ADDR + STARTUP_64_OFFSET);
    assert_eq!(boot.boot_params, ZERO_PAGE_ADDR);
    assert_eq!(boot.cmdline_len, DEFAULT_CMDLINE.len() as u64);

    // The zero page: the image's own setup header, with the loader's fields filled in.
    let p: boot_params = mem.read_obj(ZERO_PAGE_ADDR).unwrap();
    let mut want = setup_header::default();
    want.as_mut_slice()
        .copy_from_slice(&image[SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + std::mem::size_of::<setup_header>()]);
    let (magic, flag, version) = (want.header, want.boot_flag, want.version);
    assert_eq!((magic, flag), (HDRS_MAGIC, 0xaa55));
    assert!(version >= 0x020c);
    let rd_place = boot.initramfs.unwrap();
    want.type_of_loader = 0xff;
    want.code32_start = KERNEL_LOAD_ADDR as u32;
    want.cmd_line_ptr = CMDLINE_ADDR as u32;
    want.ramdisk_image = rd_place.addr as u32;
    want.ramdisk_size = rd_place.size as u32;
    assert!(p.hdr == want, "zero page setup header differs from the image's");
    assert_eq!(p.sentinel, 0);
    assert_e820(&mem, &p);
    assert_cmdline(&mem, &p, DEFAULT_CMDLINE);

    // The protected-mode code at the load address, byte for byte.
    let setup_sects = if image[0x1f1] == 0 { 4 } else { image[0x1f1] as usize };
    let payload = &image[(setup_sects + 1) * 512..];
    assert_eq!(read(&mem, KERNEL_LOAD_ADDR, payload.len()), payload);

    // The initramfs: page-aligned, above the kernel and its decompression buffer, below
    // initrd_addr_max and the end of RAM.
    assert_eq!(rd_place.size, rd_bytes.len() as u64);
    assert_eq!(rd_place.addr % 4096, 0);
    let init_size = want.init_size;
    let pref = want.pref_address;
    assert!(boot.kernel_end >= pref + u64::from(init_size));
    assert!(rd_place.addr >= boot.kernel_end);
    let initrd_addr_max = want.initrd_addr_max;
    assert!(rd_place.addr + rd_place.size <= (u64::from(initrd_addr_max) + 1).min(256 * MIB));
    assert!(rd_place.addr + rd_place.size > 256 * MIB - 4096 - 4096, "placed at the top of RAM");
    assert_eq!(read(&mem, rd_place.addr, rd_bytes.len()), rd_bytes);

    assert_mptable(&mem, 2);
}

#[test]
fn elf_vmlinux_loads_at_its_physical_addresses() {
    let vmlinux = need_kernel!("vmlinux");
    let elf = fs::read(&vmlinux).unwrap();
    let mem = memory(256 * MIB);
    let cmdline = "console=ttyS0 panic=1";
    let cfg = LinuxConfig { kernel: vmlinux, initramfs: None, cmdline: cmdline.into() };
    let boot = load(&mem, &cfg, 1).unwrap();

    let e_entry = u64::from_le_bytes(elf[0x18..0x20].try_into().unwrap());
    assert_eq!(boot.kind, KernelKind::Elf);
    assert_eq!(boot.entry, e_entry);
    assert!(boot.initramfs.is_none());

    // Every PT_LOAD segment is in memory at p_paddr.
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let phnum = u16::from_le_bytes([elf[0x38], elf[0x39]]) as usize;
    let mut loaded = 0;
    for ph in elf[phoff..phoff + phnum * 56].chunks(56) {
        let word = |at: usize| u64::from_le_bytes(ph[at..at + 8].try_into().unwrap()) as usize;
        if u32::from_le_bytes(ph[..4].try_into().unwrap()) != 1 {
            continue;
        }
        let (offset, paddr, filesz) = (word(8), word(0x18) as u64, word(0x20));
        assert_eq!(read(&mem, paddr, filesz), &elf[offset..offset + filesz], "segment at {paddr:#x}");
        loaded += 1;
    }
    assert!(loaded > 0);

    // A made-up setup header: magic, boot flag, loader type, command line.
    let p: boot_params = mem.read_obj(ZERO_PAGE_ADDR).unwrap();
    let (magic, flag, loader, size, rd) =
        (p.hdr.header, p.hdr.boot_flag, p.hdr.type_of_loader, p.hdr.cmdline_size, p.hdr.ramdisk_image);
    assert_eq!((magic, flag, loader, size, rd), (HDRS_MAGIC, 0xaa55, 0xff, 2047, 0));
    assert_e820(&mem, &p);
    assert_cmdline(&mem, &p, cmdline);
    assert_mptable(&mem, 1);
}

#[test]
fn kernel_that_does_not_fit_in_ram_is_refused() {
    let kernel = need_kernel!("vmlinuz");
    // 8 MiB: the image itself does not fit; 32 MiB: it does, its decompression buffer
    // (16 MiB + init_size) does not.
    for size in [8 * MIB, 32 * MIB] {
        let err = load(&memory(size), &LinuxConfig::new(&kernel), 1).unwrap_err();
        assert!(matches!(err, LinuxError::KernelTooLarge { .. }), "{size:#x}: {err:?}");
    }
    let vmlinux = kernel.with_file_name("vmlinux");
    if vmlinux.is_file() {
        let err = load(&memory(32 * MIB), &LinuxConfig::new(&vmlinux), 1).unwrap_err();
        assert!(matches!(err, LinuxError::KernelTooLarge { .. }), "{err:?}");
    }
}

#[test]
fn bad_command_lines_are_refused() {
    let kernel = need_kernel!("vmlinuz");
    let mem = memory(256 * MIB);
    let mut cfg = LinuxConfig::new(&kernel);
    cfg.cmdline = "a".repeat(5000);
    let err = load(&mem, &cfg, 1).unwrap_err();
    assert!(matches!(err, LinuxError::CmdlineTooLong { len: 5000, max: 2047 }), "{err:?}");
    cfg.cmdline = "console=ttyS0 caf\u{e9}".into();
    let err = load(&mem, &cfg, 1).unwrap_err();
    assert!(matches!(err, LinuxError::Cmdline(_)), "{err:?}");
    // Exactly the limit is fine.
    cfg.cmdline = "a".repeat(2047);
    load(&mem, &cfg, 1).unwrap();
}

#[test]
fn bad_initramfs_is_refused() {
    let kernel = need_kernel!("vmlinuz");
    let mut cfg = LinuxConfig::new(&kernel);
    cfg.initramfs = Some(PathBuf::from("/nonexistent/mosaic-initrd.img"));
    let err = load(&memory(128 * MIB), &cfg, 1).unwrap_err();
    assert!(matches!(err, LinuxError::InitramfsOpen { .. }), "{err:?}");
    assert!(err.to_string().contains("/nonexistent/mosaic-initrd.img"));

    // 128 MiB of RAM, ~80 MiB taken by the kernel: a 60 MiB initramfs does not fit.
    let big = TempFile::new("big-initrd", b"");
    fs::File::options().write(true).open(&big.0).unwrap().set_len(60 * MIB).unwrap();
    cfg.initramfs = Some(big.0.clone());
    let err = load(&memory(128 * MIB), &cfg, 1).unwrap_err();
    assert!(matches!(err, LinuxError::InitramfsTooLarge { size, .. } if size == 60 * MIB), "{err:?}");
}

#[test]
fn missing_or_non_kernel_files_are_errors() {
    let mem = memory(64 * MIB);
    let err = load(&mem, &LinuxConfig::new("/nonexistent/vmlinuz"), 1).unwrap_err();
    assert!(matches!(err, LinuxError::KernelOpen { .. }), "{err:?}");
    assert!(err.to_string().contains("/nonexistent/vmlinuz"), "{err}");

    let dir = std::env::temp_dir();
    let err = load(&mem, &LinuxConfig::new(&dir), 1).unwrap_err();
    assert!(matches!(err, LinuxError::KernelOpen { .. }), "{err:?}");

    for (name, bytes) in [
        ("empty", Vec::new()),
        ("short", b"HdrS".to_vec()),
        ("text", b"#!/bin/sh\necho this is not a kernel\n".repeat(200)),
        ("noise", pseudo_random(64 << 10, 3)),
    ] {
        let f = TempFile::new(name, &bytes);
        let err = load(&mem, &LinuxConfig::new(&f.0), 1).unwrap_err();
        assert!(matches!(err, LinuxError::NotAKernel { .. }), "{name}: {err:?}");
    }

    // A truncated ELF header and a 32-bit ELF.
    let f = TempFile::new("elf-short", b"\x7fELF\x02\x01\x01");
    assert!(matches!(load(&mem, &LinuxConfig::new(&f.0), 1), Err(LinuxError::NotAKernel { .. })));
    let mut elf32 = vec![0u8; 64];
    elf32[..6].copy_from_slice(b"\x7fELF\x01\x01");
    let f = TempFile::new("elf32", &elf32);
    assert!(matches!(load(&mem, &LinuxConfig::new(&f.0), 1), Err(LinuxError::UnsupportedKernel { .. })));
}

/// A bzImage-shaped file with the given protocol version and xloadflags.
fn fake_bzimage(version: u16, xloadflags: u16) -> Vec<u8> {
    let mut img = vec![0u8; 8192];
    img[0x1f1] = 4; // setup_sects
    img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    img[0x202..0x206].copy_from_slice(&HDRS_MAGIC.to_le_bytes());
    img[0x206..0x208].copy_from_slice(&version.to_le_bytes());
    img[0x211] = 1; // loadflags: LOADED_HIGH
    img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    img[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
    img
}

#[test]
fn bzimages_without_a_64_bit_entry_are_refused() {
    let mem = memory(64 * MIB);
    for (name, img) in [("old", fake_bzimage(0x020b, 1)), ("no64", fake_bzimage(0x020f, 0))] {
        let f = TempFile::new(name, &img);
        let err = load(&mem, &LinuxConfig::new(&f.0), 1).unwrap_err();
        assert!(matches!(err, LinuxError::UnsupportedKernel { .. }), "{name}: {err:?}");
    }
    // Only setup sectors, no kernel after them.
    let f = TempFile::new("setup-only", &fake_bzimage(0x020f, 1)[..5 * 512]);
    let err = load(&mem, &LinuxConfig::new(&f.0), 1).unwrap_err();
    assert!(matches!(err, LinuxError::NotAKernel { .. }), "{err:?}");
}

#[test]
fn vcpu_counts_outside_the_mptable_range_are_refused() {
    let mem = memory(64 * MIB);
    for vcpus in [0, MAX_VCPUS + 1] {
        let err = load(&mem, &LinuxConfig::new("/nonexistent/vmlinuz"), vcpus).unwrap_err();
        assert!(matches!(err, LinuxError::VcpuCount { .. }), "{err:?}");
    }
}

/// A VM with `mem` registered, an in-kernel irqchip and `n` vCPUs with CPUID set
/// (APIC id = index). `None` when this host has no KVM.
fn kvm_vm(mem: &GuestMemory, n: u32) -> Option<(VmFd, Vec<VcpuFd>)> {
    let Ok(kvm) = Kvm::new() else {
        skip("no /dev/kvm");
        return None;
    };
    let vm = kvm.create_vm().unwrap();
    for (slot, r) in mem.regions().iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: r.gpa,
            memory_size: r.size,
            userspace_addr: r.host_addr,
        };
        // SAFETY: the range is a live mapping owned by `mem`, which outlives the VM in
        // every test that calls this.
        unsafe { vm.set_user_memory_region(region) }.unwrap();
    }
    vm.create_irq_chip().unwrap();
    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    let vcpus = (0..n)
        .map(|i| {
            let vcpu = vm.create_vcpu(u64::from(i)).unwrap();
            let mut cpuid = supported.clone();
            for e in cpuid.as_mut_slice() {
                match e.function {
                    1 => e.ebx = (e.ebx & 0x00ff_ffff) | (i << 24),
                    0xb | 0x1f => e.edx = i,
                    _ => {}
                }
            }
            vcpu.set_cpuid2(&cpuid).unwrap();
            vcpu
        })
        .collect();
    Some((vm, vcpus))
}

fn msr(vcpu: &VcpuFd, index: u32) -> u64 {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry { index, ..Default::default() }]).unwrap();
    assert_eq!(vcpu.get_msrs(&mut msrs).unwrap(), 1);
    msrs.as_slice()[0].data
}

#[test]
fn configure_vcpu_sets_up_bsp_and_aps_on_real_kvm() {
    let mem = memory(64 * MIB);
    let Some((_vm, vcpus)) = kvm_vm(&mem, 2) else { return };
    let boot = LinuxBoot {
        entry: KERNEL_LOAD_ADDR + STARTUP_64_OFFSET,
        boot_params: ZERO_PAGE_ADDR,
        kind: KernelKind::BzImage,
        kernel_load: KERNEL_LOAD_ADDR,
        kernel_end: 48 * MIB,
        initramfs: None,
        cmdline_addr: CMDLINE_ADDR,
        cmdline_len: 0,
        mptable: MPTABLE_ADDR,
        vcpus: 2,
    };
    for (i, vcpu) in vcpus.iter().enumerate() {
        configure_vcpu(vcpu, i as u32, &boot, &mem).unwrap();
    }

    // BSP: 64-bit entry registers.
    let regs = vcpus[0].get_regs().unwrap();
    assert_eq!((regs.rip, regs.rsi, regs.rflags, regs.rsp), (boot.entry, ZERO_PAGE_ADDR, 2, BOOT_STACK));
    let sregs = vcpus[0].get_sregs().unwrap();
    assert_eq!(sregs.cr0 & BOOT_CR0, BOOT_CR0);
    assert_eq!(sregs.cr3, PML4_ADDR);
    assert_ne!(sregs.cr4 & (1 << 5), 0, "PAE");
    assert_eq!(sregs.efer & BOOT_EFER, BOOT_EFER);
    assert_eq!((sregs.cs.selector, sregs.cs.l, sregs.cs.db, sregs.cs.dpl, sregs.cs.present), (BOOT_CS, 1, 0, 0, 1));
    assert_eq!((sregs.ds.selector, sregs.ss.selector, sregs.tr.selector), (BOOT_DS, BOOT_DS, BOOT_TSS));
    assert_eq!((sregs.gdt.base, sregs.gdt.limit), (GDT_ADDR, 47));

    // The structures the BSP's registers point at are in guest memory.
    let word = |gpa: u64| mem.read_obj::<u64>(gpa).unwrap();
    assert_eq!(word(GDT_ADDR + u64::from(BOOT_CS)), 0x00af_9b00_0000_ffff);
    assert_eq!(word(PML4_ADDR) & !0xfff, PML4_ADDR + 0x1000);
    let pdpt = word(PML4_ADDR) & !0xfff;
    for gib in 0..4 {
        let pd = word(pdpt + gib * 8) & !0xfff;
        // The PDE that maps 16 MiB into this GiB: present, writable, 2 MiB.
        assert_eq!(word(pd + 8 * 8), (gib << 30) + 16 * MIB + 0x83);
    }

    // Every vCPU: FPU, MSRs, LAPIC LINT0/LINT1.
    for vcpu in &vcpus {
        let fpu = vcpu.get_fpu().unwrap();
        assert_eq!(fpu.fcw, FPU_FCW);
        // kvm_pvm hosts report MXCSR as 0 through KVM_GET_FPU; read it from the xsave
        // area (legacy region, offset 24) there.
        let mxcsr = if fpu.mxcsr != 0 { fpu.mxcsr } else { vcpu.get_xsave().unwrap().region[6] };
        assert_eq!(mxcsr, FPU_MXCSR);
        assert_eq!(msr(vcpu, 0x1a0) & 1, 1, "IA32_MISC_ENABLE fast strings");
        assert_eq!(msr(vcpu, 0x2ff), (1 << 11) | 6, "MTRRdefType");
        let lapic = vcpu.get_lapic().unwrap();
        assert_eq!((apic_reg(&lapic, APIC_LVT_LINT0) >> 8) & 7, APIC_MODE_EXTINT);
        assert_eq!((apic_reg(&lapic, APIC_LVT_LINT1) >> 8) & 7, APIC_MODE_NMI);
    }

    // The AP keeps its reset registers and waits for INIT/SIPI.
    let ap = vcpus[1].get_sregs().unwrap();
    assert_eq!(ap.cs.selector, 0xf000);
    assert_eq!(ap.cr0 & 1, 0);
    assert_eq!(vcpus[1].get_mp_state().unwrap().mp_state, KVM_MP_STATE_UNINITIALIZED);

    // An index the MP table does not list.
    let err = configure_vcpu(&vcpus[1], 2, &boot, &mem).unwrap_err();
    assert!(matches!(err, LinuxError::VcpuIndex { index: 2, vcpus: 2 }), "{err:?}");
}

#[test]
fn loaded_kernel_and_configured_bsp_agree() {
    let kernel = need_kernel!("vmlinuz");
    let mem = memory(256 * MIB);
    let boot = load(&mem, &LinuxConfig::new(&kernel), 1).unwrap();
    let Some((_vm, vcpus)) = kvm_vm(&mem, 1) else { return };
    configure_vcpu(&vcpus[0], 0, &boot, &mem).unwrap();
    let regs = vcpus[0].get_regs().unwrap();
    assert_eq!((regs.rip, regs.rsi), (boot.entry, boot.boot_params));
    // The entry point is mapped by the identity page tables (first GiB, 2 MiB pages).
    let pd = mem.read_obj::<u64>(PML4_ADDR + 0x2000 + (boot.entry >> 21) * 8).unwrap();
    assert_eq!(pd & !0x1f_ffff, boot.entry & !0x1f_ffff);
    // And the code there is the image's startup_64.
    let image = fs::read(&kernel).unwrap();
    let setup = (usize::from(image[0x1f1]) + 1) * 512;
    assert_eq!(read(&mem, boot.entry, 64), &image[setup + 0x200..setup + 0x200 + 64]);
}
