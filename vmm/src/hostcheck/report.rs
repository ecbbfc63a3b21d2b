//! The host report: what `mosaic host-check` gathers.

use std::path::Path;

use hugepage::{NumaNode, ThpSettings};
use kvm_ioctls::Kvm;
use serde::{Deserialize, Serialize};

use super::probe::{native_kernel_mode, ProbeResult};
use super::render;
use crate::kvm::Caps;

/// KVM availability, API version and capabilities.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvmInfo {
    /// `/dev/kvm` could be opened and a VM created.
    pub available: bool,
    /// `KVM_GET_API_VERSION` (12 on every supported kernel; 0 if unavailable).
    pub api_version: i32,
    /// Capabilities (all zero if unavailable), read from a default VM.
    pub caps: Caps,
    /// Why KVM is unavailable.
    pub error: Option<String>,
}

/// Whether kernel-mode (CPL0) guest code runs natively.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelMode {
    /// A probe result was supplied.
    pub probed: bool,
    /// Verdict of [`native_kernel_mode`]; false if not probed.
    pub native: bool,
    /// Probe: CPL3 run time in microseconds.
    pub cpl3_us: Option<u64>,
    /// Probe: CPL0 run time in microseconds.
    pub cpl0_us: Option<u64>,
    /// Probe: the CPL0 run timed out.
    pub timed_out: bool,
    /// Probe: error message, if any.
    pub error: Option<String>,
    /// The `kvm_pvm` module is loaded (`/sys/module/kvm_pvm`): KVM is nested through PVM.
    pub kvm_pvm: bool,
}

impl KernelMode {
    /// Builds the section from an optional probe result and the kvm_pvm flag.
    pub fn new(probe: Option<&ProbeResult>, kvm_pvm: bool) -> KernelMode {
        match probe {
            Some(p) => KernelMode {
                probed: true,
                native: native_kernel_mode(p),
                cpl3_us: p.cpl3_us,
                cpl0_us: p.cpl0_us,
                timed_out: p.timed_out,
                error: p.error.clone(),
                kvm_pvm,
            },
            None => KernelMode { kvm_pvm, ..Default::default() },
        }
    }
}

/// One hugetlb pool.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HugePool {
    /// Page size in bytes.
    pub page_size: u64,
    /// Pages in the pool.
    pub total: u64,
    /// Free pages (including reserved ones).
    pub free: u64,
    /// Reserved pages (promised to mappings, not yet faulted).
    pub reserved: u64,
    /// Surplus pages.
    pub surplus: u64,
}

impl From<&hugepage::Pool> for HugePool {
    fn from(p: &hugepage::Pool) -> Self {
        HugePool { page_size: p.page_size, total: p.total, free: p.free, reserved: p.reserved, surplus: p.surplus }
    }
}

/// Everything `mosaic host-check` reports. Serializes to the `--json` object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostReport {
    /// KVM API version and capabilities.
    pub kvm: KvmInfo,
    /// Kernel-mode guest code: native or emulated.
    pub kernel_mode: KernelMode,
    /// hugetlb pools, by page size.
    pub hugepages: Vec<HugePool>,
    /// THP settings (all `None` if unreadable; see `errors`).
    pub thp: ThpSettings,
    /// Online NUMA nodes.
    pub numa: Vec<NumaNode>,
    /// One line per checked item: `item: value -> meaning for Mosaic`.
    pub implications: Vec<String>,
    /// Sections that could not be read, with the reason.
    pub errors: Vec<String>,
}

impl HostReport {
    /// Recomputes [`HostReport::implications`] from the other fields.
    pub fn with_implications(mut self) -> HostReport {
        self.implications = render::rows(&self).iter().map(render::Row::implication).collect();
        self
    }
}

/// Opens `/dev/kvm`, creates a default VM and reads the API version and capabilities.
pub fn kvm_info() -> KvmInfo {
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => return KvmInfo { error: Some(format!("cannot open /dev/kvm: {e}")), ..Default::default() },
    };
    let api_version = kvm.get_api_version();
    match kvm.create_vm() {
        Ok(vm) => KvmInfo { available: true, api_version, caps: Caps::read(&kvm, Some(&vm)), error: None },
        Err(e) => KvmInfo {
            available: false,
            api_version,
            caps: Caps::read(&kvm, None),
            error: Some(format!("KVM_CREATE_VM: {e}")),
        },
    }
}

/// Gathers the report with `sysfs_root` standing for `/sys` (KVM is always the real
/// `/dev/kvm`). Sections that cannot be read are left empty and listed in `errors`.
pub fn gather(sysfs_root: &Path, kvm: KvmInfo, probe: Option<&ProbeResult>) -> HostReport {
    let mut errors = Vec::new();
    let kvm_pvm = sysfs_root.join("module/kvm_pvm").exists();
    let hugepages = match hugepage::pools_at(sysfs_root) {
        Ok(p) => p.iter().map(HugePool::from).collect(),
        Err(e) => {
            errors.push(format!("hugepages: {e}"));
            Vec::new()
        }
    };
    let thp = hugepage::thp_at(sysfs_root).unwrap_or_else(|e| {
        errors.push(format!("thp: {e}"));
        ThpSettings::default()
    });
    let numa = hugepage::nodes_at(sysfs_root).unwrap_or_else(|e| {
        errors.push(format!("numa: {e}"));
        Vec::new()
    });
    if let Some(e) = &kvm.error {
        errors.push(format!("kvm: {e}"));
    }
    HostReport {
        kvm,
        kernel_mode: KernelMode::new(probe, kvm_pvm),
        hugepages,
        thp,
        numa,
        implications: Vec::new(),
        errors,
    }
    .with_implications()
}
