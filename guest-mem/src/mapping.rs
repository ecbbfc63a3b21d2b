//! Host mappings of guest RAM, aligned so that huge pages can back them.
//!
//! A mapping is placed at a host virtual address aligned to the zone's placement
//! alignment: zones start at GPAs with that alignment too, so GPA and HVA stay
//! congruent modulo the largest page size and KVM can map huge pages.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr;

/// An owned, aligned `mmap` of guest RAM; unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    addr: usize,
    len: usize,
    prot: i32,
    flags: i32,
}

impl Mapping {
    /// Private anonymous memory (`MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE`).
    pub fn anonymous(len: usize, align: usize) -> io::Result<Self> {
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        Self::aligned(len, align, flags, None)
    }

    /// A shared mapping of `len` bytes of `fd` from `offset` (`MAP_SHARED`).
    pub fn shared(fd: BorrowedFd<'_>, offset: u64, len: usize, align: usize) -> io::Result<Self> {
        Self::aligned(len, align, libc::MAP_SHARED, Some((fd, offset)))
    }

    fn aligned(len: usize, align: usize, flags: i32, fd: Option<(BorrowedFd<'_>, u64)>) -> io::Result<Self> {
        if len == 0 || !align.is_power_of_two() {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let span = len.checked_add(align).ok_or(io::Error::from(io::ErrorKind::InvalidInput))?;
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        // SAFETY: a fresh PROT_NONE reservation at an address of the kernel's choosing;
        // it overlaps nothing we own, and the result is checked below.
        let base = unsafe {
            libc::mmap(
                ptr::null_mut(),
                span,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = base as usize;
        let start = (base + align - 1) & !(align - 1);
        let (raw_fd, off) = match fd {
            Some((fd, off)) => (fd.as_raw_fd(), off),
            None => (-1, 0),
        };
        let off = libc::off_t::try_from(off).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: [start, start+len) lies inside the reservation made above, which this
        // function owns; MAP_FIXED replaces only that reservation.
        let got = unsafe { libc::mmap(start as *mut libc::c_void, len, prot, flags | libc::MAP_FIXED, raw_fd, off) };
        let err = (got == libc::MAP_FAILED).then(io::Error::last_os_error);
        // Give back the unused head and tail of the reservation (and, on failure, all of it).
        let (keep_start, keep_end) = if err.is_some() { (start, start) } else { (start, start + len) };
        for (a, l) in [(base, keep_start - base), (keep_end, base + span - keep_end)] {
            if l > 0 {
                // SAFETY: [a, a+l) is part of our reservation and no longer used.
                unsafe { libc::munmap(a as *mut libc::c_void, l) };
            }
        }
        if let Some(e) = err {
            return Err(e);
        }
        Ok(Mapping { addr: start, len, prot, flags })
    }

    /// First host address.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr as *mut u8
    }

    /// First host address as a number.
    pub fn addr(&self) -> u64 {
        self.addr as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: mappings are never empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The `mmap` protection the mapping was made with.
    pub fn prot(&self) -> i32 {
        self.prot
    }

    /// The `mmap` flags the mapping was made with (without `MAP_FIXED`).
    pub fn flags(&self) -> i32 {
        self.flags
    }

    /// Populates every page writable (`MADV_POPULATE_WRITE`), so the guest never
    /// faults on first touch and allocation failures show up now, not later.
    pub fn populate_write(&self) -> io::Result<()> {
        self.madvise(libc::MADV_POPULATE_WRITE)
    }

    /// Applies `advice` to the whole mapping.
    pub fn madvise(&self, advice: i32) -> io::Result<()> {
        // SAFETY: the range is exactly this live mapping; madvise does not invalidate it
        // for the advice values Mosaic uses (populate, huge page hints).
        let rc = unsafe { libc::madvise(self.addr as *mut libc::c_void, self.len, advice) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by `aligned` and is unmapped exactly once here;
        // everything that borrowed it (vm-memory regions, memslots) is gone by now.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

// SAFETY: a Mapping is an address range; all access to its bytes goes through
// vm-memory's volatile accessors, which are safe to use from any thread.
unsafe impl Send for Mapping {}
// SAFETY: as above; the struct itself is immutable after creation.
unsafe impl Sync for Mapping {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PAGE_2M;

    #[test]
    fn anonymous_mapping_is_aligned_and_writable() {
        let m = Mapping::anonymous(4 << 20, PAGE_2M as usize).unwrap();
        assert_eq!(m.addr() % PAGE_2M, 0);
        // SAFETY: the mapping is 4 MiB long and writable.
        unsafe { m.as_ptr().add(4095).write_volatile(7) };
        m.populate_write().unwrap();
    }

    #[test]
    fn zero_length_is_refused() {
        assert!(Mapping::anonymous(0, 4096).is_err());
    }
}
