//! Host huge page facts for Mosaic: hugetlb pools, transparent huge page settings,
//! huge-page coverage of a mapping (from smaps) and NUMA nodes.
//!
//! Every reader of `/sys` has a variant taking the sysfs mount point (normally `/sys`)
//! so that tests can point it at a fixture tree. Nothing here panics on odd file
//! contents: malformed values are returned as errors or reported as unknown (`None`).
#![deny(missing_docs)]

pub mod numa;
pub mod pools;
pub mod smaps;
pub mod thp;

pub use numa::{nodes, nodes_at, NumaError, NumaNode};
pub use pools::{
    pools, pools_at, set_node_pool_size, set_node_pool_size_at, set_pool_size, set_pool_size_at, NodePool, Pool,
    PoolError,
};
pub use smaps::{HugeCoverage, SmapsError};
pub use thp::{thp, thp_at, ShmemEnabled, ThpDefrag, ThpEnabled, ThpError, ThpSettings, ThpSize};

/// The default sysfs mount point used by the functions without a root argument.
pub const SYSFS_ROOT: &str = "/sys";

/// Formats a page size in bytes the way Mosaic prints it: `4K`, `2M`, `1G`.
pub fn page_size_label(bytes: u64) -> String {
    const K: u64 = 1024;
    if bytes >= K * K * K && bytes & (K * K * K - 1) == 0 {
        format!("{}G", bytes / (K * K * K))
    } else if bytes >= K * K && bytes & (K * K - 1) == 0 {
        format!("{}M", bytes / (K * K))
    } else if bytes >= K && bytes & (K - 1) == 0 {
        format!("{}K", bytes / K)
    } else {
        format!("{bytes}B")
    }
}

/// Parses a `hugepages-<N>kB` directory name into a page size in bytes.
pub(crate) fn parse_size_dir(name: &str) -> Option<u64> {
    let kb = name.strip_prefix("hugepages-")?.strip_suffix("kB")?;
    kb.parse::<u64>().ok()?.checked_mul(1024)
}

/// The `hugepages-<N>kB` directory name for a page size in bytes.
pub(crate) fn size_dir(page_size: u64) -> String {
    format!("hugepages-{}kB", page_size / 1024)
}

#[cfg(test)]
pub(crate) mod testutil {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A temporary directory removed on drop.
    pub struct TempTree(PathBuf);

    impl TempTree {
        pub fn new(tag: &str) -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("hugepage-test-{tag}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempTree(dir)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }

        /// Writes `contents` to `rel`, creating parent directories.
        pub fn write(&self, rel: &str, contents: &str) {
            let p = self.0.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, contents).unwrap();
        }

        pub fn mkdir(&self, rel: &str) {
            std::fs::create_dir_all(self.0.join(rel)).unwrap();
        }
    }

    impl Drop for TempTree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert_eq!(page_size_label(4096), "4K");
        assert_eq!(page_size_label(2 << 20), "2M");
        assert_eq!(page_size_label(1 << 30), "1G");
        assert_eq!(page_size_label(100), "100B");
        assert_eq!(page_size_label(64 * 1024), "64K");
    }

    #[test]
    fn size_dirs() {
        assert_eq!(parse_size_dir("hugepages-2048kB"), Some(2 << 20));
        assert_eq!(parse_size_dir("hugepages-1048576kB"), Some(1 << 30));
        assert_eq!(parse_size_dir("hugepages-xkB"), None);
        assert_eq!(parse_size_dir("hugepages-99999999999999999999kB"), None);
        assert_eq!(parse_size_dir("other"), None);
        assert_eq!(size_dir(2 << 20), "hugepages-2048kB");
    }
}
