//! Everything KVM exposes per x86 vCPU, captured into one serde type, and put back.
//!
//! Most fields are kvm-bindings structs, which (with its `serde` feature) serialize
//! as their raw bytes and deserialize zero-padding or truncating, so a newer kernel
//! header that grows a struct at the end still reads older state. `kvm_fpu` has no
//! serde support there, so it is mirrored field by field ([`FpuState`]); CPUID entries
//! and MSRs are kept as small explicit records ([`CpuidEntry`], [`MsrEntry`]) rather
//! than byte blobs, so the state says what it holds.
//!
//! # Ordering
//!
//! Capture (following the KVM API documentation and what Firecracker and QEMU learned):
//! - KVM_GET_MP_STATE first: it runs `kvm_apic_accept_events()`, which may change
//!   vCPU and LAPIC state, so everything read after it is consistent with it.
//! - KVM_GET_LAPIC may also update the LAPIC before returning it.
//! - KVM_GET_VCPU_EVENTS last: the other GETs may settle pending events.
//!
//! Restore:
//! 1. TSC frequency (KVM_SET_TSC_KHZ, only if it differs beyond 250 ppm): TSC MSR
//!    values written later are interpreted at the vCPU's frequency.
//! 2. CPUID: later SETs (XSAVE features, MSR validity, `kvm_vcpu_is_bsp()` for the
//!    MP state) are checked against it.
//! 3. MP state.
//! 4. SREGS, then REGS: SREGS sets the mode, CS base and APIC base; REGS clears any
//!    pending exception, so it must come before VCPU_EVENTS, which restores it.
//! 5. FPU, XSAVE (which supersedes the FPU part), XCRS, debug registers.
//! 6. LAPIC: after SREGS (which restores the APIC base MSR), before the MSRs
//!    (IA32_TSC_DEADLINE only takes when the LAPIC is configured).
//! 7. MSRs, with IA32_TSC_DEADLINE in a batch of its own after all others (KVM
//!    compares it with IA32_TSC when arming the timer).
//! 8. VCPU_EVENTS last, with NMI_PENDING and SIPI_VECTOR marked valid so the pending
//!    NMI and the SIPI vector are transferred too.
//!
//! Restore is for a vCPU that has not run yet, and vCPU events must not be set while
//! other vCPUs of the VM run.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
    KVM_VCPUEVENT_VALID_NMI_PENDING, KVM_VCPUEVENT_VALID_SIPI_VECTOR,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use super::{kvm_err, StateError};

/// IA32_TSC.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_TSC_DEADLINE: restored after every other MSR.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// IA32_MCG_CAP: its low byte is the number of machine-check banks.
const MSR_IA32_MCG_CAP: u32 = 0x179;
/// IA32_MC0_CTL: banks follow in groups of four (CTL, STATUS, ADDR, MISC).
const MSR_IA32_MC0_CTL: u32 = 0x400;
/// KVM emulates at most this many machine-check banks.
const MAX_MCE_BANKS: u32 = 32;

/// Architectural MSRs captured besides KVM_GET_MSR_INDEX_LIST, which does not list
/// them everywhere (QEMU and Firecracker save them separately): on the nested
/// `kvm_pvm` development hosts the list has 43 entries and lacks IA32_TSC_AUX
/// although the vCPU has it. (IA32_XSS is not here: it reads as 0 on these hosts
/// but KVM_SET_MSRS refuses it.) Each is read like the listed ones, and skipped (and
/// counted as unreadable) where this vCPU refuses it.
#[rustfmt::skip]
pub const EXTRA_MSRS: &[u32] = &[
    0xc000_0103, // IA32_TSC_AUX
    0x2ff,       // IA32_MTRR_DEF_TYPE
    0x200, 0x201, 0x202, 0x203, 0x204, 0x205, 0x206, 0x207, // variable MTRRs 0-3 (base, mask)
    0x208, 0x209, 0x20a, 0x20b, 0x20c, 0x20d, 0x20e, 0x20f, // variable MTRRs 4-7
    0x250, 0x258, 0x259,                                    // fixed MTRRs, 64K and 16K
    0x268, 0x269, 0x26a, 0x26b, 0x26c, 0x26d, 0x26e, 0x26f, // fixed MTRRs, 4K
];

/// TSC frequencies within this many parts per million of each other count as equal
/// (calibration differs a little from boot to boot).
const TSC_KHZ_TOLERANCE_PPM: u64 = 250;

/// One CPUID leaf as KVM_GET_CPUID2 reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    /// EAX input (leaf).
    pub function: u32,
    /// ECX input (subleaf).
    pub index: u32,
    /// KVM_CPUID_FLAG_* bits.
    pub flags: u32,
    /// EAX output.
    pub eax: u32,
    /// EBX output.
    pub ebx: u32,
    /// ECX output.
    pub ecx: u32,
    /// EDX output.
    pub edx: u32,
}

impl From<&kvm_cpuid_entry2> for CpuidEntry {
    fn from(e: &kvm_cpuid_entry2) -> Self {
        CpuidEntry {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        }
    }
}

impl From<&CpuidEntry> for kvm_cpuid_entry2 {
    fn from(e: &CpuidEntry) -> Self {
        kvm_cpuid_entry2 {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
            ..Default::default()
        }
    }
}

/// One MSR and its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrEntry {
    /// MSR index.
    pub index: u32,
    /// Value.
    pub data: u64,
}

/// `kvm_fpu` field by field (kvm-bindings gives it no serde support).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    /// x87 registers ST0-ST7 (80 bits each, in 16-byte slots).
    pub fpr: [[u8; 16]; 8],
    /// x87 control word.
    pub fcw: u16,
    /// x87 status word.
    pub fsw: u16,
    /// Abridged x87 tag word.
    pub ftwx: u8,
    /// Last x87 opcode.
    pub last_opcode: u16,
    /// Last x87 instruction pointer.
    pub last_ip: u64,
    /// Last x87 data pointer.
    pub last_dp: u64,
    /// XMM0-XMM15.
    pub xmm: [[u8; 16]; 16],
    /// MXCSR.
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl FpuState {
    /// The FPU state as KVM_GET_FPU reports it, read from the legacy (FXSAVE) region
    /// of an XSAVE area instead: one ioctl less in a live update's pause.
    pub fn from_xsave(x: &kvm_xsave) -> Self {
        let mut b = [0u8; 512];
        for (chunk, word) in b.chunks_exact_mut(4).zip(x.region.iter()) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| u64::from(u32_at(o)) | (u64::from(u32_at(o + 4)) << 32);
        let reg16 = |o: usize| {
            let mut r = [0u8; 16];
            r.copy_from_slice(&b[o..o + 16]);
            r
        };
        FpuState {
            fpr: std::array::from_fn(|i| reg16(32 + 16 * i)),
            fcw: u16_at(0),
            fsw: u16_at(2),
            ftwx: b[4],
            last_opcode: u16_at(6),
            last_ip: u64_at(8),
            last_dp: u64_at(16),
            xmm: std::array::from_fn(|i| reg16(160 + 16 * i)),
            mxcsr: u32_at(24),
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// The legacy 4 KiB `kvm_xsave` area (KVM_GET_XSAVE), boxed: kvm-bindings gives
/// `kvm_xsave` serde but not `Clone`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct XsaveArea(pub Box<kvm_xsave>);

impl Clone for XsaveArea {
    fn clone(&self) -> Self {
        let mut x = Box::<kvm_xsave>::default();
        x.region = self.0.region;
        XsaveArea(x)
    }
}

impl PartialEq for XsaveArea {
    fn eq(&self, other: &Self) -> bool {
        self.0.region == other.0.region
    }
}

/// Everything KVM exposes for one x86 vCPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    /// CPUID as set on the vCPU (KVM_GET_CPUID2).
    pub cpuid: Vec<CpuidEntry>,
    /// TSC frequency in kHz (KVM_GET_TSC_KHZ), where the host reports it.
    pub tsc_khz: Option<u32>,
    /// Multiprocessing state (running, halted, waiting for INIT/SIPI...).
    pub mp_state: kvm_mp_state,
    /// General-purpose registers, RIP, RFLAGS.
    pub regs: kvm_regs,
    /// Segments, descriptor tables, control registers, EFER, APIC base, pending interrupt.
    pub sregs: kvm_sregs,
    /// x87/SSE state (KVM_GET_FPU); XSAVE, where present, supersedes it on restore.
    pub fpu: FpuState,
    /// XSAVE area (KVM_GET_XSAVE), where the host has KVM_CAP_XSAVE.
    pub xsave: Option<XsaveArea>,
    /// Extended control registers (XCR0), where the host has KVM_CAP_XCRS.
    pub xcrs: Option<kvm_xcrs>,
    /// DR0-DR3, DR6, DR7.
    pub debug_regs: kvm_debugregs,
    /// In-kernel local APIC register page.
    pub lapic: kvm_lapic_state,
    /// MSRs that could be read: KVM_GET_MSR_INDEX_LIST, [`EXTRA_MSRS`] and the
    /// machine-check banks, in that order.
    pub msrs: Vec<MsrEntry>,
    /// MSRs from the index list that KVM_GET_MSRS refused on this vCPU (not restored).
    pub msrs_unreadable: Vec<u32>,
    /// Pending exceptions, interrupts, NMIs, SMM and interrupt shadow.
    pub vcpu_events: kvm_vcpu_events,
}

impl VcpuState {
    /// The captured value of MSR `index`, if it was readable.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|m| m.index == index).map(|m| m.data)
    }
}

/// Reads every MSR of `indices`, in batches of at most KVM_MAX_MSR_ENTRIES.
/// KVM_GET_MSRS stops at the first MSR it cannot read: that one is recorded as
/// unreadable and the batch goes on after it. Returns (read, unreadable).
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<(Vec<MsrEntry>, Vec<u32>), StateError> {
    let mut read = Vec::with_capacity(indices.len());
    let mut unreadable = Vec::new();
    let mut rest = indices;
    while !rest.is_empty() {
        let n = rest.len().min(KVM_MAX_MSR_ENTRIES);
        let entries: Vec<kvm_msr_entry> =
            rest[..n].iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|_| StateError::TooManyEntries { what: "MSR list", len: n })?;
        let got = vcpu.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?.min(n);
        read.extend(msrs.as_slice()[..got].iter().map(|e| MsrEntry { index: e.index, data: e.data }));
        if got < n {
            unreadable.push(rest[got]);
            rest = &rest[got + 1..];
        } else {
            rest = &rest[n..];
        }
    }
    Ok((read, unreadable))
}

/// The MSRs to capture: KVM's index list, then [`EXTRA_MSRS`] and the machine-check
/// banks IA32_MCG_CAP announces, each index once, in that order.
fn msr_indices(vcpu: &VcpuFd, listed: &[u32]) -> Result<Vec<u32>, StateError> {
    let mut out = listed.to_vec();
    out.extend_from_slice(EXTRA_MSRS);
    let (mcg, _) = read_msrs(vcpu, &[MSR_IA32_MCG_CAP])?;
    let banks = mcg.first().map_or(0, |m| (m.data & 0xff) as u32).min(MAX_MCE_BANKS);
    out.extend(MSR_IA32_MC0_CTL..MSR_IA32_MC0_CTL + 4 * banks);
    let mut seen = std::collections::HashSet::with_capacity(out.len());
    out.retain(|i| seen.insert(*i));
    Ok(out)
}

/// Writes `entries` in batches of at most KVM_MAX_MSR_ENTRIES; any MSR KVM refuses
/// is an error naming it.
fn write_msrs(vcpu: &VcpuFd, entries: &[MsrEntry]) -> Result<(), StateError> {
    for chunk in entries.chunks(KVM_MAX_MSR_ENTRIES) {
        let kvm: Vec<kvm_msr_entry> =
            chunk.iter().map(|m| kvm_msr_entry { index: m.index, data: m.data, ..Default::default() }).collect();
        let msrs =
            Msrs::from_entries(&kvm).map_err(|_| StateError::TooManyEntries { what: "MSR list", len: chunk.len() })?;
        let written = vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
        if written < chunk.len() {
            let bad = chunk[written];
            return Err(StateError::MsrRefused { index: bad.index, data: bad.data, written, total: chunk.len() });
        }
    }
    Ok(())
}

/// What a capture asks KVM once per process rather than once per vCPU: the MSR index
/// list and the XSAVE/XCRS capabilities (live update captures within the pause).
#[derive(Debug, Clone)]
pub struct CaptureCaps {
    msr_index_list: Vec<u32>,
    xsave: bool,
    xcrs: bool,
}

impl CaptureCaps {
    /// Asks `kvm`.
    pub fn new(kvm: &Kvm) -> Result<Self, StateError> {
        let list = kvm.get_msr_index_list().map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
        Ok(CaptureCaps {
            msr_index_list: list.as_slice().to_vec(),
            xsave: kvm.check_extension(Cap::Xsave),
            xcrs: kvm.check_extension(Cap::Xcrs),
        })
    }
}

/// What every capture of one vCPU reads the same: its CPUID (KVM refuses to change
/// it once the vCPU has run), its TSC frequency and the MSRs to read (KVM's list, the
/// extras and the machine-check banks IA32_MCG_CAP announces, which the guest cannot
/// change). Read once, before the vCPU first runs, it keeps ~40 µs of ioctls out of
/// a live update's pause.
#[derive(Debug, Clone)]
pub struct VcpuFixed {
    cpuid: Vec<CpuidEntry>,
    tsc_khz: Option<u32>,
    msr_indices: Vec<u32>,
}

impl VcpuFixed {
    /// Reads them from `vcpu`.
    pub fn read(vcpu: &VcpuFd, caps: &CaptureCaps) -> Result<Self, StateError> {
        Ok(VcpuFixed {
            cpuid: current_cpuid(vcpu)?,
            tsc_khz: vcpu.get_tsc_khz().ok().filter(|&k| k != 0),
            msr_indices: msr_indices(vcpu, &caps.msr_index_list)?,
        })
    }

    /// The CPUID read.
    pub fn cpuid(&self) -> &[CpuidEntry] {
        &self.cpuid
    }

    /// The vCPU was restored with this CPUID and TSC frequency.
    pub fn restored(&mut self, cpuid: Vec<CpuidEntry>, tsc_khz: Option<u32>) {
        self.cpuid = cpuid;
        if tsc_khz.is_some() {
            self.tsc_khz = tsc_khz;
        }
    }
}

/// The vCPU's CPUID as KVM reports it (KVM_GET_CPUID2), in the form captures record.
pub fn current_cpuid(vcpu: &VcpuFd) -> Result<Vec<CpuidEntry>, StateError> {
    let cpuid = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("KVM_GET_CPUID2"))?;
    Ok(cpuid
        .as_slice()
        .iter()
        // Unused slots after the valid entries (leaf 0 always reports a nonzero EAX).
        .filter(|e| !(e.function == 0 && e.index == 0 && e.flags == 0 && e.eax == 0))
        .map(CpuidEntry::from)
        .collect())
}

/// Captures the state of `vcpu`, which must not be running (its thread is outside
/// KVM_RUN, e.g. paused). `kvm` supplies the MSR index list and capabilities.
pub fn capture(vcpu: &VcpuFd, kvm: &Kvm) -> Result<VcpuState, StateError> {
    capture_with(vcpu, &CaptureCaps::new(kvm)?)
}

/// [`capture`] with the capabilities asked beforehand.
pub fn capture_with(vcpu: &VcpuFd, caps: &CaptureCaps) -> Result<VcpuState, StateError> {
    capture_fixed(vcpu, &VcpuFixed::read(vcpu, caps)?, caps)
}

/// [`capture`] with what does not change read beforehand ([`VcpuFixed`]).
pub fn capture_fixed(vcpu: &VcpuFd, fixed: &VcpuFixed, caps: &CaptureCaps) -> Result<VcpuState, StateError> {
    // First: may change vCPU/LAPIC state (see the module docs).
    let mp_state = vcpu.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?;
    let regs = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let xsave = if caps.xsave {
        // KVM_GET_XSAVE refuses (EINVAL) rather than truncates when the guest's XSAVE
        // area is larger than 4 KiB, so what we get here is complete.
        Some(XsaveArea(Box::new(vcpu.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?)))
    } else {
        None
    };
    let fpu = match &xsave {
        Some(x) => FpuState::from_xsave(&x.0),
        None => FpuState::from(&vcpu.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?),
    };
    let xcrs = if caps.xcrs { Some(vcpu.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?) } else { None };
    let debug_regs = vcpu.get_debug_regs().map_err(kvm_err("KVM_GET_DEBUGREGS"))?;
    let lapic = vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    let (msrs, msrs_unreadable) = read_msrs(vcpu, &fixed.msr_indices)?;
    // Last: the GETs above may settle pending events.
    let vcpu_events = vcpu.get_vcpu_events().map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        cpuid: fixed.cpuid.clone(),
        tsc_khz: fixed.tsc_khz,
        mp_state,
        regs,
        sregs,
        fpu,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        msrs,
        msrs_unreadable,
        vcpu_events,
    })
}

/// KVM device-attribute ioctls on a vCPU fd (kvm-ioctls offers them on aarch64 only).
#[allow(missing_docs)]
mod attr_ioctls {
    vmm_sys_util::ioctl_iow_nr!(KVM_SET_DEVICE_ATTR, kvm_bindings::KVMIO, 0xe1, kvm_bindings::kvm_device_attr);
    vmm_sys_util::ioctl_iow_nr!(KVM_GET_DEVICE_ATTR, kvm_bindings::KVMIO, 0xe2, kvm_bindings::kvm_device_attr);
}
use attr_ioctls::{KVM_GET_DEVICE_ATTR, KVM_SET_DEVICE_ATTR};

fn tsc_offset_attr(value: &mut u64) -> kvm_bindings::kvm_device_attr {
    kvm_bindings::kvm_device_attr {
        flags: 0,
        group: kvm_bindings::KVM_VCPU_TSC_CTRL,
        attr: u64::from(kvm_bindings::KVM_VCPU_TSC_OFFSET),
        addr: value as *mut u64 as u64,
    }
}

/// The vCPU's TSC offset (guest TSC = host TSC + offset, KVM_VCPU_TSC_OFFSET), or
/// `None` where the host does not offer the attribute (Linux before 5.16).
pub fn tsc_offset(vcpu: &VcpuFd) -> Option<u64> {
    let mut value = 0u64;
    let attr = tsc_offset_attr(&mut value);
    // SAFETY: KVM_GET_DEVICE_ATTR reads `attr` and writes one u64 to `attr.addr`,
    // which points at `value`, alive for the whole call; the result is checked.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vcpu, KVM_GET_DEVICE_ATTR(), &attr) };
    (ret == 0).then_some(value)
}

/// Sets the vCPU's TSC offset (after [`restore`], which writes the TSC MSR: the offset
/// then wins, and the guest TSC continues from the host TSC as before).
pub fn set_tsc_offset(vcpu: &VcpuFd, offset: u64) -> Result<(), StateError> {
    let mut value = offset;
    let attr = tsc_offset_attr(&mut value);
    // SAFETY: KVM_SET_DEVICE_ATTR reads `attr` and one u64 from `attr.addr`, which
    // points at `value`, alive for the whole call; the result is checked.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vcpu, KVM_SET_DEVICE_ATTR(), &attr) };
    if ret != 0 {
        return Err(StateError::Kvm { what: "KVM_SET_DEVICE_ATTR (TSC offset)", source: kvm_ioctls::Error::last() });
    }
    Ok(())
}

/// The size in bytes KVM_SET_XSAVE would read for a vCPU of this process:
/// KVM_CAP_XSAVE2 (at least 4096), or 4096 where the host lacks the capability.
fn xsave_uabi_size() -> usize {
    static SIZE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *SIZE.get_or_init(|| {
        let legacy = std::mem::size_of::<kvm_xsave>();
        match Kvm::new() {
            Ok(kvm) => usize::try_from(kvm.check_extension_int(Cap::Xsave2)).unwrap_or(0).max(legacy),
            // Without /dev/kvm there is no vCPU either; the SET below fails on its own.
            Err(_) => legacy,
        }
    })
}

fn tsc_differs(a: u32, b: u32) -> bool {
    let (a, b) = (u64::from(a), u64::from(b));
    a.abs_diff(b) * 1_000_000 > b * TSC_KHZ_TOLERANCE_PPM
}

/// Restores `s` into `vcpu`, a vCPU that has not run yet, of a VM with an in-kernel
/// irqchip; no other vCPU of the VM may be running. See the module docs for the order.
pub fn restore(vcpu: &VcpuFd, s: &VcpuState) -> Result<(), StateError> {
    restore_with(vcpu, s, None)
}

/// [`restore`], knowing what `fixed` read from this vCPU beforehand: KVM_SET_CPUID2
/// is skipped when the vCPU already has the state's CPUID (a live update to the same
/// host usually finds it so, and the ioctl is the slowest of a restore), and the TSC
/// frequency is not read again.
pub fn restore_with(vcpu: &VcpuFd, s: &VcpuState, fixed: Option<&VcpuFixed>) -> Result<(), StateError> {
    if let Some(khz) = s.tsc_khz {
        let now = match fixed {
            Some(f) => f.tsc_khz,
            None => vcpu.get_tsc_khz().ok(),
        };
        if now.is_none_or(|n| tsc_differs(n, khz)) {
            vcpu.set_tsc_khz(khz).map_err(kvm_err("KVM_SET_TSC_KHZ"))?;
        }
    }
    if fixed.map(VcpuFixed::cpuid) != Some(s.cpuid.as_slice()) {
        let entries: Vec<kvm_cpuid_entry2> = s.cpuid.iter().map(kvm_cpuid_entry2::from).collect();
        let cpuid = CpuId::from_entries(&entries)
            .map_err(|_| StateError::TooManyEntries { what: "CPUID", len: entries.len() })?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
    }
    vcpu.set_mp_state(s.mp_state).map_err(kvm_err("KVM_SET_MP_STATE"))?;
    vcpu.set_sregs(&s.sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    vcpu.set_regs(&s.regs).map_err(kvm_err("KVM_SET_REGS"))?;
    // The XSAVE area holds the FPU state too (its legacy region).
    if s.xsave.is_none() {
        vcpu.set_fpu(&kvm_fpu::from(&s.fpu)).map_err(kvm_err("KVM_SET_FPU"))?;
    }
    if let Some(xsave) = &s.xsave {
        let size = xsave_uabi_size();
        if size > std::mem::size_of::<kvm_xsave>() {
            return Err(StateError::XsaveTooLarge { size });
        }
        // SAFETY: KVM_SET_XSAVE reads the vCPU's uABI XSAVE size from the pointer we
        // pass. That size is at most KVM_CAP_XSAVE2 for this process (it only grows
        // when the process asks for dynamic XSTATE features with arch_prctl, which
        // Mosaic never does), and we just checked it is 4096 bytes: exactly the
        // `kvm_xsave` we pass, which lives for the whole call. The contents are plain
        // data that KVM validates (it refuses unsupported XSTATE features).
        unsafe { vcpu.set_xsave(&xsave.0) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
    }
    if let Some(xcrs) = &s.xcrs {
        vcpu.set_xcrs(xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
    }
    vcpu.set_debug_regs(&s.debug_regs).map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&s.lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
    // In one KVM_SET_MSRS, which KVM applies in order: the TSC deadline last, once the
    // TSC it counts against is set.
    let mut msrs = s.msrs.clone();
    msrs.sort_by_key(|m| m.index == MSR_IA32_TSC_DEADLINE);
    write_msrs(vcpu, &msrs)?;
    let mut events = s.vcpu_events;
    events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR;
    vcpu.set_vcpu_events(&events).map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// Restores a live update's vCPU entry into `vcpu` (see [`restore`]) and returns its
/// port registers. The TSC: the captured offset is set after the MSRs, so the guest
/// TSC runs on from the host TSC exactly as before; without one, the TSC MSR is
/// advanced by the time since `captured_ns`.
pub fn restore_entry(
    vcpu: &VcpuFd,
    mut entry: super::format::VcpuEntry,
    captured_ns: u64,
    fixed: Option<&VcpuFixed>,
) -> Result<crate::devices::paravirt::VcpuPorts, StateError> {
    let Some(kvm) = entry.kvm.as_mut() else { return Ok(entry.ports) };
    if entry.tsc_offset.is_none() {
        let khz = u64::from(kvm.tsc_khz.unwrap_or(0));
        let elapsed = crate::run::monotonic_ns().saturating_sub(captured_ns);
        let ticks = elapsed.saturating_mul(khz) / 1_000_000;
        for msr in kvm.msrs.iter_mut().filter(|m| m.index == MSR_IA32_TSC) {
            msr.data = msr.data.wrapping_add(ticks);
        }
    }
    restore_with(vcpu, kvm, fixed)?;
    if let Some(off) = entry.tsc_offset {
        set_tsc_offset(vcpu, off)?;
    }
    Ok(entry.ports)
}

/// Restores `states[i]` into `vcpus[i]`; the counts must match.
pub fn restore_all(vcpus: &[VcpuFd], states: &[VcpuState]) -> Result<(), StateError> {
    if vcpus.len() != states.len() {
        return Err(StateError::VcpuCount { state: states.len(), target: vcpus.len() });
    }
    vcpus.iter().zip(states).try_for_each(|(v, s)| restore(v, s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_tolerance_is_250_ppm() {
        assert!(!tsc_differs(2_600_000, 2_600_000));
        assert!(!tsc_differs(2_600_600, 2_600_000));
        assert!(tsc_differs(2_601_000, 2_600_000));
        assert!(tsc_differs(1_000_000, 2_600_000));
    }

    #[test]
    fn fpu_and_cpuid_mirrors_round_trip() {
        let mut f = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, last_ip: 7, ..Default::default() };
        f.xmm[3][5] = 0xaa;
        f.fpr[7][0] = 0x55;
        assert_eq!(kvm_fpu::from(&FpuState::from(&f)), f);
        let e =
            kvm_cpuid_entry2 { function: 7, index: 1, flags: 1, eax: 2, ebx: 3, ecx: 4, edx: 5, ..Default::default() };
        assert_eq!(kvm_cpuid_entry2::from(&CpuidEntry::from(&e)), e);
    }
}
