//! The VM: KVM VM fd, guest memory registered as memslots, irqchip, vCPUs.
//!
//! Creation order matters on these hosts: memslots are registered before the
//! in-kernel irqchip is created (KVM_SET_USER_MEMORY_REGION was seen to take
//! 3-12 ms per call after KVM_CREATE_IRQCHIP).

pub mod attributes;
pub mod control;
pub mod cpuid;
pub mod handoff;
pub mod memslots;
pub mod vcpu;

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use guest_mem::{EngineKind, GmemFactory, GuestMemory, KernelEngine, MemoryLayout};
use kvm_bindings::{kvm_create_guest_memfd, kvm_pit_config, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use thiserror::Error;

/// Errors from building a VM.
#[derive(Debug, Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A VM-level ioctl failed.
    #[error("{what} failed")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be built.
    #[error("cannot set up guest memory")]
    Memory(#[from] guest_mem::accessor::BuildError),
    /// The kernel conversion engine could not be set up.
    #[error("cannot set up the kernel conversion engine: {0}")]
    Engine(String),
    /// A memslot could not be registered.
    #[error("cannot register guest memory with KVM")]
    Memslot(#[from] memslots::MemslotError),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Zones above this size report prefault progress.
const PREFAULT_PROGRESS_ABOVE: u64 = 4 << 30;

/// Creates guest_memfds on a VM.
struct VmGmem<'a>(&'a VmFd);

impl GmemFactory for VmGmem<'_> {
    fn create_guest_memfd(&self, size: u64, flags: u64) -> io::Result<OwnedFd> {
        let req = kvm_create_guest_memfd { size, flags, ..Default::default() };
        let raw = self.0.create_guest_memfd(req).map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        // SAFETY: KVM_CREATE_GUEST_MEMFD returned a new fd that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    }
}

/// Asks KVM to hand KVM_HC_MAP_GPA_RANGE hypercalls to the VMM (guests convert
/// pages with them), where the host offers it. Best effort: without it, guests use
/// the conversion port.
fn enable_map_gpa_range_exits(fd: &VmFd) {
    use crate::kvm::caps::{KVM_CAP_EXIT_HYPERCALL, KVM_HC_MAP_GPA_RANGE};
    let mask = 1u64 << KVM_HC_MAP_GPA_RANGE;
    let offered = u64::try_from(fd.check_extension_raw(u64::from(KVM_CAP_EXIT_HYPERCALL))).unwrap_or(0);
    if offered & mask != 0 {
        let mut cap = kvm_bindings::kvm_enable_cap { cap: KVM_CAP_EXIT_HYPERCALL, ..Default::default() };
        cap.args[0] = mask;
        let _ = fd.enable_cap(&cap);
    }
}

/// A VM with its memory registered.
#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    // The VM fd is declared before the memory it maps so it is closed first.
    fd: VmFd,
    mem: Arc<GuestMemory>,
    cpuid: CpuId,
}

impl Vm {
    /// Creates a VM, its guest memory and memslots, and the in-kernel irqchip.
    pub fn new(layout: MemoryLayout) -> Result<Self, VmError> {
        Self::with_engine(layout, EngineKind::Userspace)
    }

    /// [`Vm::new`] with a conversion engine: for the kernel engine, a
    /// KVM_X86_SW_PROTECTED_VM whose memslots take private pages from one guest_memfd
    /// per zone, with KVM's memory attributes deciding which side a page is on.
    pub fn with_engine(layout: MemoryLayout, engine: EngineKind) -> Result<Self, VmError> {
        let vm_type = match engine {
            EngineKind::Userspace => kvm_bindings::KVM_X86_DEFAULT_VM,
            EngineKind::Kernel => kvm_bindings::KVM_X86_SW_PROTECTED_VM,
        };
        Self::build(vm_type, |fd, progress| {
            let zones: Vec<u64> = layout.zones().iter().map(|z| z.size).collect();
            let mem = GuestMemory::new(layout, Some(&VmGmem(fd)), Some(progress))?;
            if engine == EngineKind::Kernel {
                let gmem = VmGmem(fd);
                let io = |source: io::Error| VmError::Engine(source.to_string());
                let fds = zones.iter().map(|&size| gmem.create_guest_memfd(size, 0)).collect::<Result<Vec<_>, _>>();
                let engine =
                    KernelEngine::new(Box::new(attributes::VmAttributes::new(fd).map_err(io)?), fds.map_err(io)?);
                mem.set_kernel_engine(engine).map_err(|e| VmError::Engine(e.to_string()))?;
            }
            Ok(mem)
        })
    }

    /// Creates a VM whose memory adopts the zone fds a live update handed over.
    pub fn adopt(layout: MemoryLayout, fds: Vec<OwnedFd>) -> Result<Self, VmError> {
        Self::build(kvm_bindings::KVM_X86_DEFAULT_VM, |_, progress| {
            Ok(GuestMemory::adopt(layout, fds, Some(progress))?)
        })
    }

    /// Creates a VM of `vm_type`, then its memory with `make` (given the VM fd and a
    /// prefault progress reporter), registers the memslots and creates the irqchip.
    fn build(
        vm_type: u32,
        make: impl FnOnce(&VmFd, &(dyn Fn(usize, u64, u64) + Sync)) -> Result<GuestMemory, VmError>,
    ) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let fd = kvm.create_vm_with_type(u64::from(vm_type)).map_err(kvm_err("KVM_CREATE_VM"))?;
        let last_decile = std::sync::atomic::AtomicU64::new(0);
        let progress = |zone: usize, done: u64, total: u64| {
            // Prefaulting a big zone takes seconds: say how far it got, every 10%.
            if total > PREFAULT_PROGRESS_ABOVE {
                let decile = done * 10 / total;
                // Zones prefault one after another: (zone, decile) only grows.
                let key = zone as u64 * 16 + decile;
                if last_decile.fetch_max(key, std::sync::atomic::Ordering::Relaxed) < key {
                    let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
                    eprintln!(
                        "mosaic: prefaulting zone {zone}: {}% ({:.1} of {:.1} GiB)",
                        decile * 10,
                        gib(done),
                        gib(total)
                    );
                }
            }
        };
        let mem = Arc::new(make(&fd, &progress)?);
        memslots::register(&fd, &mem)?;
        fd.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        enable_map_gpa_range_exits(&fd);
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        Ok(Vm { kvm, fd, mem, cpuid })
    }

    /// Adds the in-kernel PIT (Linux guests).
    pub fn create_pit(&self) -> Result<(), VmError> {
        let cfg = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        self.fd.create_pit2(cfg).map_err(kvm_err("KVM_CREATE_PIT2"))
    }

    /// Creates vCPU `index` with CPUID for a VM of `count` vCPUs.
    pub fn create_vcpu(&self, index: u32, count: u32) -> Result<VcpuFd, VmError> {
        let vcpu = self.fd.create_vcpu(u64::from(index)).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let cpuid = cpuid::for_vcpu(&self.cpuid, index, count);
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        Ok(vcpu)
    }

    /// Whether the guest CPU offers 1 GiB pages (CPUID 0x80000001 EDX bit 26, PDPE1GB).
    pub fn offers_1g_pages(&self) -> bool {
        self.cpuid.as_slice().iter().any(|e| e.function == 0x8000_0001 && e.edx & (1 << 26) != 0)
    }

    /// The KVM system handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM fd.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Guest memory.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.mem
    }

    /// Takes all guest memory out of the VM (see [`memslots::unregister`]): for a
    /// process whose guest now runs elsewhere. Its vCPUs must never run again.
    pub fn forget_memory(&self) -> Result<(), VmError> {
        Ok(memslots::unregister(&self.fd, &self.mem)?)
    }
}
