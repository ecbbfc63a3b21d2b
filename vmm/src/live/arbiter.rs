//! The commit word (protocol v2): one 32-bit word in a small shared memfd that both
//! processes map, where the live update's outcome is decided by one compare-and-swap.
//!
//! ```text
//!            Pending ──new process: restored, about to run ──► Committed
//!               │
//!               └──old process: the new one failed, died or timed out ──► Aborted
//! ```
//!
//! Whichever side swaps first wins, and the loser sees the winner's value: the new
//! process runs the guest only after it has swapped in `Committed`, the old process
//! resumes the guest only after it has swapped in `Aborted`. So the guest never runs
//! in both, and the decision needs no round trip over the socket while the guest is
//! paused (protocol v1's Ready and Commit messages cost ~70 µs of it).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};

use thiserror::Error;

/// Size of the shared memfd (one page; the word is at offset 0).
pub const SIZE: usize = 4096;

/// Nothing decided yet.
const PENDING: u32 = 0x4d4c_5550;
/// The new process runs the guest.
const COMMITTED: u32 = 0x4d4c_5543;
/// The old process keeps the guest.
const ABORTED: u32 = 0x4d4c_5541;

/// Why the commit word cannot be made or adopted.
#[derive(Debug, Error)]
pub enum ArbiterError {
    /// A system call failed.
    #[error("{what}: {source}")]
    Os {
        /// The call.
        what: &'static str,
        /// Its error.
        source: std::io::Error,
    },
    /// The fd handed over is not a one-page file.
    #[error("the commit word's fd is {len} bytes, not {SIZE}")]
    BadSize {
        /// Its size.
        len: i64,
    },
    /// The word handed over is not pending.
    #[error("the commit word handed over is {0:#x}, not pending")]
    NotPending(u32),
}

fn os(what: &'static str) -> ArbiterError {
    ArbiterError::Os { what, source: std::io::Error::last_os_error() }
}

/// How a decision went, as seen by the side that tried to make it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The new process runs the guest.
    Committed,
    /// The old process keeps it.
    Aborted,
}

/// One side's mapping of the commit word.
#[derive(Debug)]
pub struct Arbiter {
    fd: OwnedFd,
    word: std::ptr::NonNull<AtomicU32>,
}

// SAFETY: the mapping is shared memory accessed only through an `AtomicU32`, and it
// lives (and stays mapped) as long as the `Arbiter`; nothing else in this process
// refers to it.
unsafe impl Send for Arbiter {}
// SAFETY: as above: every access is atomic.
unsafe impl Sync for Arbiter {}

impl Arbiter {
    /// Makes a new, pending word (the old process, before its Hello).
    pub fn create() -> Result<Self, ArbiterError> {
        // SAFETY: a valid NUL-terminated name; the result is checked.
        let raw = unsafe { libc::memfd_create(c"mosaic-live-update-commit".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(os("memfd_create"));
        }
        // SAFETY: memfd_create returned a new fd nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on the fd we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), SIZE as libc::off_t) } != 0 {
            return Err(os("ftruncate"));
        }
        let a = Self::map(fd)?;
        a.word().store(PENDING, Ordering::SeqCst);
        Ok(a)
    }

    /// Maps the word the old process handed over (the new process); it must be a
    /// one-page file holding a pending word.
    pub fn adopt(fd: OwnedFd) -> Result<Self, ArbiterError> {
        // SAFETY: fstat only writes into the stat buffer; all zeros is valid.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above, on an fd we own.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(os("fstat"));
        }
        if st.st_size != SIZE as i64 {
            return Err(ArbiterError::BadSize { len: st.st_size });
        }
        let a = Self::map(fd)?;
        match a.word().load(Ordering::SeqCst) {
            PENDING => Ok(a),
            other => Err(ArbiterError::NotPending(other)),
        }
    }

    fn map(fd: OwnedFd) -> Result<Self, ArbiterError> {
        // SAFETY: a fresh shared mapping of one page of a file we hold open and know
        // to be that large; the kernel picks the address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(os("mmap"));
        }
        let word = std::ptr::NonNull::new(p.cast::<AtomicU32>()).ok_or_else(|| os("mmap"))?;
        Ok(Arbiter { fd, word })
    }

    fn word(&self) -> &AtomicU32 {
        // SAFETY: `word` points to the start of a page-aligned, page-long mapping we
        // keep until drop; an AtomicU32 is valid for any bit pattern there.
        unsafe { self.word.as_ref() }
    }

    /// The fd to hand over.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The new process: takes the guest unless the old process has already kept it
    /// (asked again, answers the same).
    pub fn commit(&self) -> Decision {
        match self.word().compare_exchange(PENDING, COMMITTED, Ordering::SeqCst, Ordering::SeqCst) {
            Ok(_) | Err(COMMITTED) => Decision::Committed,
            Err(_) => Decision::Aborted,
        }
    }

    /// The old process: keeps the guest unless the new process has already taken it.
    /// Any value but `Committed` leaves the guest here: the new process commits only
    /// from `Pending`, so after this it never can.
    pub fn abort(&self) -> Decision {
        match self.word().compare_exchange(PENDING, ABORTED, Ordering::SeqCst, Ordering::SeqCst) {
            Ok(_) => Decision::Aborted,
            Err(COMMITTED) => Decision::Committed,
            Err(_) => {
                self.word().store(ABORTED, Ordering::SeqCst);
                Decision::Aborted
            }
        }
    }

    /// Whether the old process has kept the guest (a read; decides nothing).
    pub fn is_aborted(&self) -> bool {
        self.word().load(Ordering::SeqCst) == ABORTED
    }

    /// Whether the new process has committed (a read; decides nothing).
    pub fn is_committed(&self) -> bool {
        self.word().load(Ordering::SeqCst) == COMMITTED
    }
}

impl Drop for Arbiter {
    fn drop(&mut self) {
        // SAFETY: unmapping the page `map` mapped; no reference to it outlives `self`.
        unsafe { libc::munmap(self.word.as_ptr().cast(), SIZE) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Arbiter, Arbiter) {
        let old = Arbiter::create().unwrap();
        let new = Arbiter::adopt(old.fd().try_clone_to_owned().unwrap()).unwrap();
        (old, new)
    }

    #[test]
    fn the_first_swap_wins_and_the_loser_sees_it() {
        let (old, new) = pair();
        assert!(!old.is_committed());
        assert_eq!(new.commit(), Decision::Committed);
        assert!(old.is_committed());
        assert_eq!(old.abort(), Decision::Committed);
        assert_eq!(new.commit(), Decision::Committed);

        let (old, new) = pair();
        assert_eq!(old.abort(), Decision::Aborted);
        assert_eq!(new.commit(), Decision::Aborted);
        assert!(!old.is_committed());
    }

    #[test]
    fn a_word_already_decided_or_of_the_wrong_size_is_not_adopted() {
        let (old, new) = pair();
        new.commit();
        let e = Arbiter::adopt(old.fd().try_clone_to_owned().unwrap()).unwrap_err();
        assert!(matches!(e, ArbiterError::NotPending(COMMITTED)), "{e}");
        let f = std::fs::File::open("/proc/self/exe").unwrap();
        let e = Arbiter::adopt(OwnedFd::from(f)).unwrap_err();
        assert!(matches!(e, ArbiterError::BadSize { .. }), "{e}");
    }

    #[test]
    fn garbage_in_the_word_leaves_the_guest_with_the_old_process() {
        let (old, new) = pair();
        new.word().store(7, Ordering::SeqCst);
        assert_eq!(old.abort(), Decision::Aborted);
        assert_eq!(new.commit(), Decision::Aborted);
    }
}
