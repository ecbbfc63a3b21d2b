//! Conversion engines (docs/PRIVATE-MEMORY.md): who enforces that private pages are
//! the guest's alone.
//!
//! - **userspace** (every host): one backing holds every page; Mosaic tracks the
//!   attributes, refuses private pages in its accessor and hides them in its own view.
//!   KVM maps everything. Both content modes.
//! - **kernel** (hosts with KVM_CAP_MEMORY_ATTRIBUTES and a VM type that has private
//!   memory, such as KVM_X86_SW_PROTECTED_VM): KVM maps a private page from a
//!   per-zone guest_memfd that no process can map, a shared one from the zone's
//!   backing; conversions flip the page's attribute in KVM (KVM_SET_MEMORY_ATTRIBUTES)
//!   and discard the private copy (`fallocate(PUNCH_HOLE)` on the guest_memfd), so
//!   converted pages read as zeros on both sides. PRESERVE is refused: moving data
//!   between the two needs guest_memfd in-place conversion, which upstream Linux does
//!   not have yet. A range that is part private, part shared inside a huge page is
//!   mapped by KVM with 4 KiB pages; the conversion statistics count those blocks.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use serde::{Deserialize, Serialize};

/// Which engine a VM uses, chosen at start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// Enforced by Mosaic.
    #[default]
    Userspace,
    /// Enforced by KVM (memory attributes and guest_memfd).
    Kernel,
}

impl EngineKind {
    /// Its name (`userspace`, `kernel`).
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Userspace => "userspace",
            EngineKind::Kernel => "kernel",
        }
    }
}

impl std::str::FromStr for EngineKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "userspace" => Ok(EngineKind::Userspace),
            "kernel" => Ok(EngineKind::Kernel),
            _ => Err(format!("'{s}' is not userspace or kernel")),
        }
    }
}

/// What the kernel engine asks of KVM; the VMM implements it on its VM fd.
pub trait KernelAttributes: Send + Sync {
    /// Sets (or clears) the private attribute of `[gpa, gpa+len)`
    /// (KVM_SET_MEMORY_ATTRIBUTES).
    fn set_private(&self, gpa: u64, len: u64, private: bool) -> io::Result<()>;
}

/// The kernel engine of one VM: KVM's attributes and each zone's private guest_memfd.
pub struct KernelEngine {
    attrs: Box<dyn KernelAttributes>,
    /// Private guest_memfd per zone (offsets within it are the zone's offsets).
    private_fds: Vec<OwnedFd>,
}

impl std::fmt::Debug for KernelEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelEngine").field("private_fds", &self.private_fds).finish_non_exhaustive()
    }
}

impl KernelEngine {
    /// An engine over `attrs` with one private guest_memfd per zone, in zone order.
    pub fn new(attrs: Box<dyn KernelAttributes>, private_fds: Vec<OwnedFd>) -> Self {
        KernelEngine { attrs, private_fds }
    }

    /// The private guest_memfd of zone `zone`.
    pub fn private_fd(&self, zone: usize) -> Option<&OwnedFd> {
        self.private_fds.get(zone)
    }

    /// Number of zones it has a private guest_memfd for.
    pub fn zones(&self) -> usize {
        self.private_fds.len()
    }

    /// KVM_SET_MEMORY_ATTRIBUTES for `[gpa, gpa+len)`.
    pub fn set_private(&self, gpa: u64, len: u64, private: bool) -> io::Result<()> {
        self.attrs.set_private(gpa, len, private)
    }

    /// Frees the private copy of `len` bytes at `offset` of zone `zone`'s guest_memfd:
    /// the next private access gets a zeroed page.
    pub fn discard(&self, zone: usize, offset: u64, len: u64) -> io::Result<()> {
        let fd = self.private_fds.get(zone).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        let (off, n) = (i64::try_from(offset), i64::try_from(len));
        let (Ok(off), Ok(n)) = (off, n) else { return Err(io::Error::from(io::ErrorKind::InvalidInput)) };
        // SAFETY: fallocate on an fd we own, with in-range offsets; it changes no memory
        // of this process.
        let r =
            unsafe { libc::fallocate(fd.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, off, n) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
