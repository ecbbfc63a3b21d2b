//! Registering guest memory with KVM: one memslot per guest RAM region;
//! guest_memfd regions through KVM_SET_USER_MEMORY_REGION2.

use guest_mem::GuestMemory;
use kvm_bindings::{kvm_userspace_memory_region, kvm_userspace_memory_region2, KVM_MEM_GUEST_MEMFD};
use kvm_ioctls::VmFd;
use thiserror::Error;

/// Errors from registering memslots.
#[derive(Debug, Error)]
pub enum MemslotError {
    /// The ioctl failed.
    #[error("memslot {slot} ({size} bytes at {gpa:#x})")]
    Set {
        /// Slot number.
        slot: u32,
        /// First GPA.
        gpa: u64,
        /// Size.
        size: u64,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Registers every region of `mem` with the VM.
///
/// The caller keeps `mem` alive for as long as the VM fd is open (the `Vm` struct
/// owns both and closes the VM first): that is what makes the registration sound.
pub fn register(vm: &VmFd, mem: &GuestMemory) -> Result<(), MemslotError> {
    for (slot, r) in mem.regions().iter().enumerate() {
        let slot = slot as u32;
        let err = |source| MemslotError::Set { slot, gpa: r.gpa, size: r.size, source };
        match r.gmem_fd {
            Some(gmem) => {
                let region = kvm_userspace_memory_region2 {
                    slot,
                    flags: KVM_MEM_GUEST_MEMFD,
                    guest_phys_addr: r.gpa,
                    memory_size: r.size,
                    userspace_addr: r.host_addr,
                    guest_memfd_offset: r.fd_offset,
                    guest_memfd: gmem as u32,
                    ..Default::default()
                };
                // SAFETY: userspace_addr..+size is the live shared mapping of this very
                // guest_memfd (KVM's emulator reads through it), owned by `mem`, which
                // outlives the VM fd (see above).
                unsafe { vm.set_user_memory_region2(region) }.map_err(err)?;
            }
            None => {
                let region = kvm_userspace_memory_region {
                    slot,
                    flags: 0,
                    guest_phys_addr: r.gpa,
                    memory_size: r.size,
                    userspace_addr: r.host_addr,
                };
                // SAFETY: userspace_addr..+size is a live read/write mapping owned by
                // `mem`, which outlives the VM fd (see above).
                unsafe { vm.set_user_memory_region(region) }.map_err(err)?;
            }
        }
    }
    Ok(())
}

/// Deletes every memslot [`register`] made: the VM then maps no guest memory.
///
/// For a process that has handed its guest over (live update) and will not run its
/// VM again. While a memslot covers a mapping, every unmap of part of it calls into
/// KVM (the MMU notifier), which walks the shadow MMU's reverse maps for the whole
/// range: releasing a 4 GiB hugetlb guest 2 MiB at a time took ~250 µs per step,
/// half a second of CPU per handed-over process, so each lingered for seconds at low
/// priority. With the slots gone, the same unmaps only touch the page tables.
pub fn unregister(vm: &VmFd, mem: &GuestMemory) -> Result<(), MemslotError> {
    for (slot, r) in mem.regions().iter().enumerate() {
        let slot = slot as u32;
        let region =
            kvm_userspace_memory_region { slot, flags: 0, guest_phys_addr: r.gpa, memory_size: 0, userspace_addr: 0 };
        // SAFETY: a zero-sized region deletes the slot; KVM keeps no pointer into
        // userspace memory afterwards.
        unsafe { vm.set_user_memory_region(region) }.map_err(|source| MemslotError::Set {
            slot,
            gpa: r.gpa,
            size: r.size,
            source,
        })?;
    }
    Ok(())
}
