//! KVM capability numbers kvm-bindings 0.14 lacks (or that Mosaic names in one place),
//! and [`Caps`]: the capabilities that matter to Mosaic, read from a KVM fd.

use std::os::raw::c_ulong;

use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};

/// `KVM_CAP_NR_VCPUS`: recommended maximum number of vCPUs.
pub const KVM_CAP_NR_VCPUS: u32 = 9;
/// `KVM_CAP_NR_MEMSLOTS`: maximum number of memory slots.
pub const KVM_CAP_NR_MEMSLOTS: u32 = 10;
/// `KVM_CAP_MAX_VCPUS`: maximum number of vCPUs.
pub const KVM_CAP_MAX_VCPUS: u32 = 66;
/// `KVM_CAP_DIRTY_LOG_RING`: dirty ring size limit in bytes (0: unsupported).
pub const KVM_CAP_DIRTY_LOG_RING: u32 = 192;
/// `KVM_CAP_EXIT_HYPERCALL`: bitmask of hypercalls that can exit to userspace.
pub const KVM_CAP_EXIT_HYPERCALL: u32 = 201;
/// `KVM_CAP_BINARY_STATS_FD`: `KVM_GET_STATS_FD` is available.
pub const KVM_CAP_BINARY_STATS_FD: u32 = 203;
/// `KVM_CAP_USER_MEMORY2`: `KVM_SET_USER_MEMORY_REGION2` is available.
pub const KVM_CAP_USER_MEMORY2: u32 = 231;
/// `KVM_CAP_MEMORY_FAULT_INFO`: `KVM_EXIT_MEMORY_FAULT` exits are reported.
pub const KVM_CAP_MEMORY_FAULT_INFO: u32 = 232;
/// `KVM_CAP_MEMORY_ATTRIBUTES`: bitmask of attributes `KVM_SET_MEMORY_ATTRIBUTES` takes.
pub const KVM_CAP_MEMORY_ATTRIBUTES: u32 = 233;
/// `KVM_CAP_GUEST_MEMFD`: `KVM_CREATE_GUEST_MEMFD` is available.
pub const KVM_CAP_GUEST_MEMFD: u32 = 234;
/// `KVM_CAP_VM_TYPES`: bitmask of supported VM types (bit n = type n).
pub const KVM_CAP_VM_TYPES: u32 = 235;
/// `KVM_CAP_PRE_FAULT_MEMORY`: `KVM_PRE_FAULT_MEMORY` is available.
pub const KVM_CAP_PRE_FAULT_MEMORY: u32 = 236;
/// `KVM_CAP_GUEST_MEMFD_FLAGS`: bitmask of `KVM_CREATE_GUEST_MEMFD` flags (Linux 6.18).
pub const KVM_CAP_GUEST_MEMFD_FLAGS: u32 = 244;

/// guest_memfd flag: the guest_memfd can be mmap()ed by the host.
pub const GUEST_MEMFD_FLAG_MMAP: u64 = 1;
/// guest_memfd flag: the memory starts shared (host-accessible) rather than private.
pub const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 2;

/// Hypercall number of `KVM_HC_MAP_GPA_RANGE` (guest asks to convert private/shared).
pub const KVM_HC_MAP_GPA_RANGE: u64 = 12;
/// `KVM_MEMORY_ATTRIBUTE_PRIVATE`: the memory-attributes bit marking private memory.
pub const KVM_MEMORY_ATTRIBUTE_PRIVATE: u64 = 1 << 3;
/// x86 VM type: the default VM.
pub const KVM_X86_DEFAULT_VM: u32 = 0;
/// x86 VM type: software-protected VM (private memory without hardware encryption).
pub const KVM_X86_SW_PROTECTED_VM: u32 = 1;

/// Errors opening KVM to read capabilities.
#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: {0}")]
    Open(#[source] kvm_ioctls::Error),
    /// `KVM_CREATE_VM` failed.
    #[error("cannot create a VM: {0}")]
    CreateVm(#[source] kvm_ioctls::Error),
}

/// The KVM capabilities that matter to Mosaic. Values are what `KVM_CHECK_EXTENSION`
/// returned (negative answers are stored as 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caps {
    /// `KVM_SET_USER_MEMORY_REGION2` works.
    pub user_memory2: bool,
    /// `KVM_EXIT_MEMORY_FAULT` exits are reported.
    pub memory_fault_info: bool,
    /// Memory attributes KVM enforces (bit [`KVM_MEMORY_ATTRIBUTE_PRIVATE`]); 0: none.
    pub memory_attributes: u64,
    /// `KVM_CREATE_GUEST_MEMFD` works.
    pub guest_memfd: bool,
    /// Supported guest_memfd flags ([`GUEST_MEMFD_FLAG_MMAP`], [`GUEST_MEMFD_FLAG_INIT_SHARED`]).
    pub guest_memfd_flags: u64,
    /// Supported VM types, bit n = type n (x86: 0 default, 1 sw-protected, 2.. SEV/TDX).
    pub vm_types: u64,
    /// `KVM_PRE_FAULT_MEMORY` works.
    pub pre_fault_memory: bool,
    /// Hypercalls that can exit to userspace, bit n = hypercall n
    /// (bit [`KVM_HC_MAP_GPA_RANGE`]).
    pub exit_hypercall: u64,
    /// `KVM_GET_STATS_FD` works.
    pub binary_stats_fd: bool,
    /// Maximum dirty ring size in bytes; 0: no dirty ring.
    pub dirty_log_ring: u64,
    /// Maximum number of memory slots.
    pub nr_memslots: u32,
    /// Maximum number of vCPUs.
    pub max_vcpus: u32,
    /// Recommended number of vCPUs.
    pub nr_vcpus: u32,
}

impl Caps {
    /// Reads the capabilities. VM-scoped answers (memory attributes, guest_memfd flags,
    /// memslots, ...) can differ by VM type, so they are asked of `vm` when given,
    /// else of the system fd.
    pub fn read(kvm: &Kvm, vm: Option<&VmFd>) -> Caps {
        let ask = |cap: u32| -> u64 {
            let r = match vm {
                Some(vm) => vm.check_extension_raw(c_ulong::from(cap)),
                None => kvm.check_extension_raw(c_ulong::from(cap)),
            };
            // The ioctl returns an int; bitmask answers are reinterpreted as unsigned.
            if r < 0 {
                0
            } else {
                u64::from(r as u32)
            }
        };
        let small = |cap: u32| u32::try_from(ask(cap)).unwrap_or(u32::MAX);
        Caps {
            user_memory2: ask(KVM_CAP_USER_MEMORY2) != 0,
            memory_fault_info: ask(KVM_CAP_MEMORY_FAULT_INFO) != 0,
            memory_attributes: ask(KVM_CAP_MEMORY_ATTRIBUTES),
            guest_memfd: ask(KVM_CAP_GUEST_MEMFD) != 0,
            guest_memfd_flags: ask(KVM_CAP_GUEST_MEMFD_FLAGS),
            vm_types: ask(KVM_CAP_VM_TYPES),
            pre_fault_memory: ask(KVM_CAP_PRE_FAULT_MEMORY) != 0,
            exit_hypercall: ask(KVM_CAP_EXIT_HYPERCALL),
            binary_stats_fd: ask(KVM_CAP_BINARY_STATS_FD) != 0,
            dirty_log_ring: ask(KVM_CAP_DIRTY_LOG_RING),
            nr_memslots: small(KVM_CAP_NR_MEMSLOTS),
            max_vcpus: small(KVM_CAP_MAX_VCPUS),
            nr_vcpus: small(KVM_CAP_NR_VCPUS),
        }
    }

    /// Opens `/dev/kvm`, creates a default VM and reads the capabilities from it.
    pub fn probe() -> Result<Caps, CapsError> {
        let kvm = Kvm::new().map_err(CapsError::Open)?;
        let vm = kvm.create_vm().map_err(CapsError::CreateVm)?;
        Ok(Caps::read(&kvm, Some(&vm)))
    }

    /// guest_memfd can be created with `MMAP | INIT_SHARED`: host-mappable, shared memory
    /// (Mosaic's `gmem` backend).
    pub fn gmem_mappable_shared(&self) -> bool {
        let want = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
        self.guest_memfd && self.user_memory2 && self.guest_memfd_flags & want == want
    }

    /// KVM enforces private memory (`KVM_SET_MEMORY_ATTRIBUTES` with the private bit).
    pub fn private_attributes(&self) -> bool {
        self.memory_attributes & KVM_MEMORY_ATTRIBUTE_PRIVATE != 0
    }

    /// VM type `ty` (e.g. [`KVM_X86_SW_PROTECTED_VM`]) can be created.
    pub fn vm_type(&self, ty: u32) -> bool {
        ty < 64 && self.vm_types & (1u64 << ty) != 0
    }

    /// `KVM_HC_MAP_GPA_RANGE` can be made to exit to userspace.
    pub fn map_gpa_range_exit(&self) -> bool {
        self.exit_hypercall & (1u64 << KVM_HC_MAP_GPA_RANGE) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        let c = Caps {
            guest_memfd: true,
            user_memory2: true,
            guest_memfd_flags: 3,
            vm_types: 1,
            exit_hypercall: 0x1000,
            ..Default::default()
        };
        assert!(c.gmem_mappable_shared());
        assert!(!c.private_attributes());
        assert!(c.vm_type(KVM_X86_DEFAULT_VM));
        assert!(!c.vm_type(KVM_X86_SW_PROTECTED_VM));
        assert!(!c.vm_type(200));
        assert!(c.map_gpa_range_exit());
        let c = Caps { guest_memfd_flags: 1, ..c };
        assert!(!c.gmem_mappable_shared());
    }

    #[test]
    fn matches_kvm_bindings_where_defined() {
        assert_eq!(KVM_CAP_USER_MEMORY2, kvm_bindings::KVM_CAP_USER_MEMORY2);
        assert_eq!(KVM_CAP_GUEST_MEMFD, kvm_bindings::KVM_CAP_GUEST_MEMFD);
        assert_eq!(KVM_CAP_PRE_FAULT_MEMORY, kvm_bindings::KVM_CAP_PRE_FAULT_MEMORY);
        assert_eq!(KVM_MEMORY_ATTRIBUTE_PRIVATE, u64::from(kvm_bindings::KVM_MEMORY_ATTRIBUTE_PRIVATE));
        assert_eq!(KVM_X86_SW_PROTECTED_VM, kvm_bindings::KVM_X86_SW_PROTECTED_VM);
        assert_eq!(KVM_CAP_NR_MEMSLOTS, kvm_bindings::KVM_CAP_NR_MEMSLOTS);
        assert_eq!(KVM_CAP_MAX_VCPUS, kvm_bindings::KVM_CAP_MAX_VCPUS);
        assert_eq!(KVM_CAP_BINARY_STATS_FD, kvm_bindings::KVM_CAP_BINARY_STATS_FD);
        assert_eq!(KVM_CAP_EXIT_HYPERCALL, kvm_bindings::KVM_CAP_EXIT_HYPERCALL);
        assert_eq!(KVM_CAP_DIRTY_LOG_RING, kvm_bindings::KVM_CAP_DIRTY_LOG_RING);
    }

    #[test]
    fn reads_real_kvm() {
        let c = Caps::probe().expect("/dev/kvm");
        assert!(c.nr_memslots > 0);
        assert!(c.max_vcpus > 0);
        let kvm = Kvm::new().unwrap();
        let sys = Caps::read(&kvm, None);
        assert_eq!(sys.binary_stats_fd, c.binary_stats_fd);
        let j = serde_json::to_value(c).unwrap();
        assert!(j.get("guest_memfd_flags").is_some());
    }
}
