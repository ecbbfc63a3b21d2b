//! [`LinuxError`]: everything that can go wrong while preparing a Linux boot.

use std::io;
use std::path::PathBuf;

use guest_mem::AccessError;
use thiserror::Error;

/// Errors from loading a Linux kernel and setting up its vCPUs.
#[derive(Debug, Error)]
pub enum LinuxError {
    /// The kernel file cannot be opened (missing, unreadable).
    #[error("cannot open kernel {}", path.display())]
    KernelOpen {
        /// The kernel path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Reading the kernel file failed.
    #[error("cannot read kernel {}", path.display())]
    KernelRead {
        /// The kernel path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The file is neither a bzImage nor an ELF kernel.
    #[error("{} is not a kernel image: {reason}", path.display())]
    NotAKernel {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A kernel image Mosaic cannot boot (e.g. a bzImage without a 64-bit entry point).
    #[error("cannot boot kernel {}: {reason}", path.display())]
    UnsupportedKernel {
        /// The kernel path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The kernel does not fit in guest RAM.
    #[error(
        "kernel {} needs guest memory {start:#x}..{end:#x}, which is not all RAM (low RAM ends at {ram_end:#x})",
        path.display()
    )]
    KernelTooLarge {
        /// The kernel path.
        path: PathBuf,
        /// First address the kernel needs.
        start: u64,
        /// One past the last address the kernel needs.
        end: u64,
        /// End of the RAM the kernel could use.
        ram_end: u64,
    },
    /// linux-loader refused or failed to load the image.
    #[error("cannot load kernel {}", path.display())]
    KernelLoad {
        /// The kernel path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The initramfs file cannot be opened (missing, unreadable).
    #[error("cannot open initramfs {}", path.display())]
    InitramfsOpen {
        /// The initramfs path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Reading the initramfs failed.
    #[error("cannot read initramfs {}", path.display())]
    InitramfsRead {
        /// The initramfs path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The initramfs does not fit between the kernel and the end of usable low RAM.
    #[error(
        "initramfs {} ({size} bytes) does not fit in guest RAM: {room} bytes free between the kernel and {limit:#x}",
        path.display()
    )]
    InitramfsTooLarge {
        /// The initramfs path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Bytes available for it.
        room: u64,
        /// Highest end address allowed (low RAM end or the kernel's `initrd_addr_max`).
        limit: u64,
    },
    /// The command line is longer than the kernel accepts.
    #[error("kernel command line is {len} bytes; the kernel accepts at most {max}")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The kernel's limit (without the NUL).
        max: usize,
    },
    /// The command line has characters the kernel cannot take.
    #[error("invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// More e820 entries than the zero page holds.
    #[error("{count} e820 entries; the zero page holds at most {max}")]
    E820TooLarge {
        /// Entries in the layout's map.
        count: usize,
        /// Zero page capacity.
        max: usize,
    },
    /// A vCPU count the MP table cannot describe.
    #[error("{vcpus} vCPUs: a Linux guest needs between 1 and {max}")]
    VcpuCount {
        /// Requested.
        vcpus: u32,
        /// Limit.
        max: u32,
    },
    /// `configure_vcpu` for an index the MP table does not list.
    #[error("vCPU {index} is not in the MP table of {vcpus} vCPUs")]
    VcpuIndex {
        /// The index.
        index: u32,
        /// vCPUs in the MP table.
        vcpus: u32,
    },
    /// Writing a boot structure to guest memory failed.
    #[error("cannot write {what} to guest memory")]
    Memory {
        /// The structure.
        what: &'static str,
        /// Cause.
        #[source]
        source: AccessError,
    },
    /// A KVM ioctl failed.
    #[error("KVM {what} failed")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Building the MSR list failed.
    #[error("cannot build the MSR list")]
    MsrList(#[source] vmm_sys_util::fam::Error),
    /// KVM took only some of the boot MSRs.
    #[error("KVM accepted {set} of {wanted} boot MSRs (first refused: {refused:#x})")]
    MsrsRefused {
        /// MSRs set.
        set: usize,
        /// MSRs asked for.
        wanted: usize,
        /// Index of the first MSR refused.
        refused: u32,
    },
}
