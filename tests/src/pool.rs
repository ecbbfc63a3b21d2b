//! hugetlb pool set-up for tests: reserve the pages a test needs, give them back after.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

/// The sysfs directory of the pool of `page_size` bytes.
fn pool_dir(page_size: u64) -> PathBuf {
    PathBuf::from(format!("/sys/kernel/mm/hugepages/hugepages-{}kB", page_size / 1024))
}

/// Reads one pool counter (`nr_hugepages`, `free_hugepages`, `resv_hugepages`).
pub fn pool_stat(page_size: u64, name: &str) -> u64 {
    std::fs::read_to_string(pool_dir(page_size).join(name)).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

/// Tests that change hugetlb pools or THP settings hold this lock: only one at a time.
pub struct HostLock {
    _file: File,
}

impl HostLock {
    /// Waits for the lock.
    pub fn take() -> Self {
        let f = File::create("/tmp/mosaic-tests-hugepages.lock").expect("lock file");
        // SAFETY: flock on an fd we own; blocks until the lock is ours.
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        HostLock { _file: f }
    }
}

/// `pages` extra pages in the pool of `page_size`, held under the [`HostLock`] and
/// given back on drop.
pub struct PoolPages {
    page_size: u64,
    before: u64,
    _lock: HostLock,
}

impl PoolPages {
    /// Grows the pool so that `pages` pages are free; `Err` says why it could not.
    pub fn reserve(page_size: u64, pages: u64) -> Result<Self, String> {
        let lock = HostLock::take();
        if !pool_dir(page_size).exists() {
            return Err(format!("this host has no hugetlb pool of {} KiB pages", page_size / 1024));
        }
        let before = pool_stat(page_size, "nr_hugepages");
        let free = pool_stat(page_size, "free_hugepages").saturating_sub(pool_stat(page_size, "resv_hugepages"));
        let guard = PoolPages { page_size, before, _lock: lock };
        if free < pages {
            guard.set(before + pages - free);
        }
        let now_free = pool_stat(page_size, "free_hugepages").saturating_sub(pool_stat(page_size, "resv_hugepages"));
        if now_free < pages {
            return Err(format!(
                "the kernel granted only {now_free} of {pages} free {} KiB hugetlb pages (memory fragmented?)",
                page_size / 1024
            ));
        }
        Ok(guard)
    }

    fn set(&self, n: u64) {
        let _ = std::fs::write(pool_dir(self.page_size).join("nr_hugepages"), format!("{n}\n"));
    }

    /// Pool size before the test.
    pub fn before(&self) -> u64 {
        self.before
    }
}

impl Drop for PoolPages {
    fn drop(&mut self) {
        self.set(self.before);
    }
}
