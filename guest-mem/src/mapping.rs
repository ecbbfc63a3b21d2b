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
        let (raw_fd, off) = match fd {
            Some((fd, off)) => (fd.as_raw_fd(), off),
            None => (-1, 0),
        };
        let off = libc::off_t::try_from(off).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
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

    /// [`Mapping::populate_write`] on `threads` threads, in chunks of `chunk` bytes
    /// (a multiple of the page size); `progress(done, total)` is called after each chunk.
    pub fn populate_write_parallel(
        &self,
        threads: usize,
        chunk: usize,
        progress: Option<&(dyn Fn(u64, u64) + Sync)>,
    ) -> io::Result<()> {
        self.populate_chunks(threads, chunk, false, progress)
    }

    /// [`Mapping::populate_write_parallel`] for memory a running guest uses from
    /// another process (a live update's new process mapping what the old one runs):
    /// after each chunk a thread sleeps as long as the chunk took, so it holds a CPU
    /// for one chunk at a time and never more than half of it. Left to run flat out,
    /// the populating threads shared the CPUs with the guest's vCPU threads in whole
    /// scheduler ticks (4 ms at HZ=250, PREEMPT_NONE), and the guest stalled that long.
    pub fn populate_write_paced(
        &self,
        threads: usize,
        chunk: usize,
        progress: Option<&(dyn Fn(u64, u64) + Sync)>,
    ) -> io::Result<()> {
        self.populate_chunks(threads, chunk, true, progress)
    }

    fn populate_chunks(
        &self,
        threads: usize,
        chunk: usize,
        paced: bool,
        progress: Option<&(dyn Fn(u64, u64) + Sync)>,
    ) -> io::Result<()> {
        use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
        let chunk = chunk.max(1);
        let chunks = self.len.div_ceil(chunk);
        let next = AtomicUsize::new(0);
        let done = AtomicU64::new(0);
        let failed: std::sync::Mutex<Option<io::Error>> = std::sync::Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..threads.clamp(1, chunks.max(1)) {
                s.spawn(|| {
                    if paced {
                        fine_timer_slack();
                    }
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= chunks || failed.lock().map(|f| f.is_some()).unwrap_or(true) {
                            break;
                        }
                        let off = i * chunk;
                        let len = chunk.min(self.len - off);
                        let started = std::time::Instant::now();
                        if let Err(e) = self.madvise_range(off, len, libc::MADV_POPULATE_WRITE) {
                            if let Ok(mut f) = failed.lock() {
                                f.get_or_insert(e);
                            }
                            break;
                        }
                        let d = done.fetch_add(len as u64, Ordering::Relaxed) + len as u64;
                        if let Some(p) = progress {
                            p(d, self.len as u64);
                        }
                        if paced && i + 1 < chunks {
                            std::thread::sleep(started.elapsed());
                        }
                    }
                });
            }
        });
        match failed.into_inner() {
            Ok(Some(e)) => Err(e),
            Ok(None) => Ok(()),
            Err(_) => Err(io::Error::other("prefault thread panicked")),
        }
    }

    /// Changes the protection of `[offset, offset+len)` (page-aligned, inside the
    /// mapping) to `prot`.
    pub fn protect(&self, offset: usize, len: usize, prot: i32) -> io::Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // SAFETY: the range lies inside this live mapping (checked above); mprotect
        // changes no memory. Accesses through the mapping that this could make fault
        // are guarded by the caller (GuestMemory stops using a view whose protection
        // it could not keep in step).
        let rc = unsafe { libc::mprotect((self.addr + offset) as *mut libc::c_void, len, prot) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Drops this process's page-table entries of a `MAP_SHARED` mapping, `step` bytes
    /// at a time, calling `between` after each step; the data stays in the backing
    /// file. Unmapping (or exiting) afterwards is then quick: tearing down the page
    /// tables of a large 4 KiB mapping in one go holds a CPU for milliseconds without
    /// being preempted. Refused (`InvalidInput`) for private mappings, whose data
    /// this would discard.
    pub fn release_pages(&self, step: usize, between: &mut dyn FnMut()) -> io::Result<()> {
        if self.flags & libc::MAP_SHARED == 0 || step == 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let mut off = 0;
        while off < self.len {
            let len = step.min(self.len - off);
            // MADV_DONTNEED on a shared mapping only unmaps: see madvise_range's SAFETY.
            self.madvise_range(off, len, libc::MADV_DONTNEED)?;
            between();
            off += len;
        }
        Ok(())
    }

    /// Applies `advice` to the whole mapping.
    pub fn madvise(&self, advice: i32) -> io::Result<()> {
        self.madvise_range(0, self.len, advice)
    }

    fn madvise_range(&self, offset: usize, len: usize, advice: i32) -> io::Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // SAFETY: [offset, offset+len) lies inside this live mapping (checked above);
        // madvise does not invalidate it for the advice values Mosaic uses (populate,
        // huge page hints, collapse, and MADV_DONTNEED only on shared mappings, where
        // it drops page-table entries and the next access refaults the same data).
        let rc = unsafe { libc::madvise((self.addr + offset) as *mut libc::c_void, len, advice) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Makes the calling thread's sleeps as short as asked (timer slack 1 ns instead of
/// the default 50 µs), for threads that pace themselves with sleeps of tens of µs.
fn fine_timer_slack() {
    // SAFETY: prctl(PR_SET_TIMERSLACK) sets the calling thread's timer slack; no
    // memory is passed.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
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
    use std::os::fd::{AsFd, FromRawFd};

    #[test]
    fn anonymous_mapping_is_aligned_and_writable() {
        let m = Mapping::anonymous(4 << 20, PAGE_2M as usize).unwrap();
        assert_eq!(m.addr() % PAGE_2M, 0);
        // SAFETY: the mapping is 4 MiB long and writable.
        unsafe { m.as_ptr().add(4095).write_volatile(7) };
        m.populate_write().unwrap();
        let calls = std::sync::atomic::AtomicU32::new(0);
        let progress = |done: u64, total: u64| {
            assert!(done <= total && total == 4 << 20);
            calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        };
        m.populate_write_parallel(2, 1 << 20, Some(&progress)).unwrap();
        assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 4);
        m.populate_write_paced(2, 1 << 20, Some(&progress)).unwrap();
        assert_eq!(calls.into_inner(), 8);
        assert!(m.madvise_range(4 << 20, 4096, libc::MADV_POPULATE_WRITE).is_err());
    }

    #[test]
    fn released_pages_of_a_shared_mapping_keep_their_data() {
        let len = 4 << 20;
        // SAFETY: memfd_create with a valid NUL-terminated name.
        let raw = unsafe { libc::memfd_create(c"release".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: memfd_create returned this fd and nothing else owns it.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on the fd we own.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) }, 0);
        let m = Mapping::shared(fd.as_fd(), 0, len, PAGE_2M as usize).unwrap();
        m.populate_write().unwrap();
        // SAFETY: the mapping is 4 MiB long and writable.
        unsafe { m.as_ptr().add(3 << 20).write_volatile(0x5a) };
        let mut steps = 0;
        m.release_pages(1 << 20, &mut || steps += 1).unwrap();
        assert_eq!(steps, 4);
        // SAFETY: as above; the page refaults from the memfd.
        assert_eq!(unsafe { m.as_ptr().add(3 << 20).read_volatile() }, 0x5a);
        let anon = Mapping::anonymous(len, PAGE_2M as usize).unwrap();
        assert!(anon.release_pages(1 << 20, &mut || {}).is_err());
    }

    #[test]
    fn zero_length_is_refused() {
        assert!(Mapping::anonymous(0, 4096).is_err());
    }
}
