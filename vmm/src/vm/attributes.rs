//! The kernel conversion engine's link to KVM: KVM_SET_MEMORY_ATTRIBUTES on the VM fd
//! (docs/PRIVATE-MEMORY.md, `guest_mem::engine`).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use guest_mem::KernelAttributes;
use kvm_bindings::{kvm_memory_attributes, KVM_MEMORY_ATTRIBUTE_PRIVATE};
use kvm_ioctls::VmFd;

/// KVM_SET_MEMORY_ATTRIBUTES (kvm-ioctls wraps it on `VmFd`, which the engine cannot
/// own: guest memory holds a duplicate of the VM fd instead).
#[allow(missing_docs)]
mod ioctls {
    vmm_sys_util::ioctl_iow_nr!(
        KVM_SET_MEMORY_ATTRIBUTES,
        kvm_bindings::KVMIO,
        0xd2,
        kvm_bindings::kvm_memory_attributes
    );
}

/// The attributes of one VM's memory.
#[derive(Debug)]
pub struct VmAttributes {
    vm: OwnedFd,
}

impl VmAttributes {
    /// Over a duplicate of `vm`'s fd (closed when guest memory drops the engine).
    pub fn new(vm: &VmFd) -> io::Result<Self> {
        // SAFETY: the VM fd is open for as long as `vm` lives, which covers this call.
        let fd = unsafe { BorrowedFd::borrow_raw(vm.as_raw_fd()) };
        Ok(VmAttributes { vm: fd.try_clone_to_owned()? })
    }
}

/// The request for `[gpa, gpa+len)`: private or not.
pub fn request(gpa: u64, len: u64, private: bool) -> kvm_memory_attributes {
    let attributes = if private { u64::from(KVM_MEMORY_ATTRIBUTE_PRIVATE) } else { 0 };
    kvm_memory_attributes { address: gpa, size: len, attributes, flags: 0 }
}

impl KernelAttributes for VmAttributes {
    fn set_private(&self, gpa: u64, len: u64, private: bool) -> io::Result<()> {
        let req = request(gpa, len, private);
        // SAFETY: KVM_SET_MEMORY_ATTRIBUTES reads one kvm_memory_attributes, which lives
        // for the whole call, from a VM fd we own; the result is checked.
        let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&self.vm, ioctls::KVM_SET_MEMORY_ATTRIBUTES(), &req) };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_the_private_bit_and_nothing_else() {
        let r = request(0x20_0000, 0x1000, true);
        assert_eq!((r.address, r.size, r.attributes, r.flags), (0x20_0000, 0x1000, 8, 0));
        assert_eq!(request(0, 0x20_0000, false).attributes, 0);
        // KVM_SET_MEMORY_ATTRIBUTES = _IOW(0xae, 0xd2, 32 bytes).
        assert_eq!(ioctls::KVM_SET_MEMORY_ATTRIBUTES(), 0x4020_aed2);
    }

    #[test]
    fn a_default_vm_refuses_private_attributes() {
        // Where KVM has no private memory for this VM type, the call fails (and the
        // engine reports UNSUPPORTED to the guest): never a silent success.
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        let vm = kvm.create_vm().unwrap();
        let a = VmAttributes::new(&vm).unwrap();
        assert!(a.set_private(0, 0x1000, true).is_err());
    }
}
