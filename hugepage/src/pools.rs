//! hugetlb pools: one per huge page size, with per-NUMA-node counts.
//!
//! Sources: `<sysfs>/kernel/mm/hugepages/hugepages-<N>kB/{nr,free,resv,surplus}_hugepages`
//! and `<sysfs>/devices/system/node/nodeN/hugepages/hugepages-<N>kB/{nr,free,surplus}_hugepages`.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{parse_size_dir, size_dir, SYSFS_ROOT};

/// Errors reading or resizing hugetlb pools.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// A sysfs file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A sysfs file did not hold a non-negative integer.
    #[error("{path}: expected an integer, found {value:?}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What it held (trimmed, truncated to 64 bytes).
        value: String,
    },
    /// The kernel has no hugetlb pool of this page size.
    #[error("no hugetlb pool of page size {page_size} bytes")]
    NoSuchPool {
        /// The page size asked for, in bytes.
        page_size: u64,
    },
}

/// The share of one hugetlb pool on one NUMA node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePool {
    /// NUMA node id.
    pub node: u32,
    /// Pages in the pool on this node (`nr_hugepages`).
    pub total: u64,
    /// Pages free on this node (`free_hugepages`).
    pub free: u64,
    /// Surplus (overcommitted) pages on this node (`surplus_hugepages`).
    pub surplus: u64,
}

/// One hugetlb pool (one huge page size).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    /// Page size in bytes.
    pub page_size: u64,
    /// Pages in the pool (`nr_hugepages`).
    pub total: u64,
    /// Pages not in use (`free_hugepages`); includes reserved pages.
    pub free: u64,
    /// Pages reserved by mappings but not yet faulted in (`resv_hugepages`).
    pub reserved: u64,
    /// Surplus (overcommitted) pages (`surplus_hugepages`).
    pub surplus: u64,
    /// Per-NUMA-node counts, sorted by node; empty without NUMA sysfs.
    pub per_node: Vec<NodePool>,
}

impl Pool {
    /// Pages a new mapping can still get: free minus reserved (never negative).
    pub fn available(&self) -> u64 {
        self.free.saturating_sub(self.reserved)
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PoolError + '_ {
    move |source| PoolError::Io { path: path.to_path_buf(), source }
}

/// Reads a sysfs file holding one unsigned integer.
fn read_u64(path: &Path) -> Result<u64, PoolError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let t = text.trim();
    t.parse::<u64>().map_err(|_| PoolError::Parse { path: path.to_path_buf(), value: t.chars().take(64).collect() })
}

fn pools_dir(root: &Path) -> PathBuf {
    root.join("kernel/mm/hugepages")
}

/// NUMA node directories under `<root>/devices/system/node`, sorted by id.
/// A missing directory (kernel without NUMA) gives an empty list.
pub(crate) fn node_dirs(root: &Path) -> Result<Vec<(u32, PathBuf)>, io::Error> {
    let dir = root.join("devices/system/node");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut nodes = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(id) = name.strip_prefix("node").and_then(|n| n.parse::<u32>().ok()) {
            nodes.push((id, entry.path()));
        }
    }
    nodes.sort_by_key(|(id, _)| *id);
    Ok(nodes)
}

fn read_pool(root: &Path, dir: &Path, page_size: u64) -> Result<Pool, PoolError> {
    let mut per_node = Vec::new();
    let nodes = node_dirs(root).map_err(io_err(&root.join("devices/system/node")))?;
    for (node, node_dir) in nodes {
        let d = node_dir.join("hugepages").join(size_dir(page_size));
        if !d.is_dir() {
            continue;
        }
        per_node.push(NodePool {
            node,
            total: read_u64(&d.join("nr_hugepages"))?,
            free: read_u64(&d.join("free_hugepages"))?,
            surplus: read_u64(&d.join("surplus_hugepages"))?,
        });
    }
    Ok(Pool {
        page_size,
        total: read_u64(&dir.join("nr_hugepages"))?,
        free: read_u64(&dir.join("free_hugepages"))?,
        reserved: read_u64(&dir.join("resv_hugepages"))?,
        surplus: read_u64(&dir.join("surplus_hugepages"))?,
        per_node,
    })
}

/// All hugetlb pools of this host, sorted by page size.
///
/// A kernel without hugetlb (no `/sys/kernel/mm/hugepages`) gives an empty list.
pub fn pools() -> Result<Vec<Pool>, PoolError> {
    pools_at(Path::new(SYSFS_ROOT))
}

/// [`pools`] with `root` standing for the sysfs mount point (normally `/sys`).
pub fn pools_at(root: &Path) -> Result<Vec<Pool>, PoolError> {
    let dir = pools_dir(root);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(&dir)(e)),
    };
    let mut sizes = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(&dir))?;
        let name = entry.file_name();
        if let Some(size) = name.to_str().and_then(parse_size_dir) {
            sizes.push((size, entry.path()));
        }
    }
    sizes.sort_by_key(|(s, _)| *s);
    sizes.into_iter().map(|(size, path)| read_pool(root, &path, size)).collect()
}

/// The hugetlb pool of one page size (bytes), or [`PoolError::NoSuchPool`].
pub fn pool(page_size: u64) -> Result<Pool, PoolError> {
    pool_at(Path::new(SYSFS_ROOT), page_size)
}

/// [`pool`] with `root` standing for the sysfs mount point.
pub fn pool_at(root: &Path, page_size: u64) -> Result<Pool, PoolError> {
    let dir = pool_dir(root, page_size)?;
    read_pool(root, &dir, page_size)
}

/// The `nr_hugepages` file of the pool of `page_size` bytes under `root` (whether or
/// not the pool exists): what an operator writes to size the pool.
pub fn nr_hugepages_path(root: &Path, page_size: u64) -> PathBuf {
    pools_dir(root).join(size_dir(page_size)).join("nr_hugepages")
}

fn pool_dir(root: &Path, page_size: u64) -> Result<PathBuf, PoolError> {
    let dir = pools_dir(root).join(size_dir(page_size));
    if page_size == 0 || page_size & 1023 != 0 || !dir.is_dir() {
        return Err(PoolError::NoSuchPool { page_size });
    }
    Ok(dir)
}

/// Asks the kernel for `count` pages in the pool of `page_size` bytes by writing
/// `nr_hugepages` (needs root), and returns the pool size read back afterwards.
///
/// The kernel may grant fewer pages than asked for (fragmented or short memory);
/// compare the result with `count`. Shrinking frees only unused pages.
pub fn set_pool_size(page_size: u64, count: u64) -> Result<u64, PoolError> {
    set_pool_size_at(Path::new(SYSFS_ROOT), page_size, count)
}

/// [`set_pool_size`] with `root` standing for the sysfs mount point.
pub fn set_pool_size_at(root: &Path, page_size: u64, count: u64) -> Result<u64, PoolError> {
    let path = pool_dir(root, page_size)?.join("nr_hugepages");
    std::fs::write(&path, format!("{count}\n")).map_err(io_err(&path))?;
    read_u64(&path)
}

/// Asks the kernel for `count` pages of `page_size` bytes on NUMA node `node` (its
/// `nodeN/hugepages/.../nr_hugepages`, needs root); returns the node's pool size read
/// back, which may be less than asked.
pub fn set_node_pool_size(node: u32, page_size: u64, count: u64) -> Result<u64, PoolError> {
    set_node_pool_size_at(Path::new(SYSFS_ROOT), node, page_size, count)
}

/// [`set_node_pool_size`] with `root` standing for the sysfs mount point.
pub fn set_node_pool_size_at(root: &Path, node: u32, page_size: u64, count: u64) -> Result<u64, PoolError> {
    pool_dir(root, page_size)?;
    let dir = root.join(format!("devices/system/node/node{node}/hugepages")).join(crate::size_dir(page_size));
    if !dir.is_dir() {
        return Err(PoolError::NoSuchPool { page_size });
    }
    let path = dir.join("nr_hugepages");
    std::fs::write(&path, format!("{count}\n")).map_err(io_err(&path))?;
    read_u64(&path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempTree;

    fn fixture() -> TempTree {
        let t = TempTree::new("pools");
        let p2 = "kernel/mm/hugepages/hugepages-2048kB";
        t.write(&format!("{p2}/nr_hugepages"), "128\n");
        t.write(&format!("{p2}/free_hugepages"), "100\n");
        t.write(&format!("{p2}/resv_hugepages"), "10\n");
        t.write(&format!("{p2}/surplus_hugepages"), "0\n");
        t.write(&format!("{p2}/nr_overcommit_hugepages"), "0\n");
        let p1 = "kernel/mm/hugepages/hugepages-1048576kB";
        t.write(&format!("{p1}/nr_hugepages"), "0\n");
        t.write(&format!("{p1}/free_hugepages"), "0\n");
        t.write(&format!("{p1}/resv_hugepages"), "0\n");
        t.write(&format!("{p1}/surplus_hugepages"), "0\n");
        t.mkdir("kernel/mm/hugepages/not-a-pool");
        for (node, total, free) in [(0, 64, 50), (1, 64, 50)] {
            let d = format!("devices/system/node/node{node}/hugepages/hugepages-2048kB");
            t.write(&format!("{d}/nr_hugepages"), &format!("{total}\n"));
            t.write(&format!("{d}/free_hugepages"), &format!("{free}\n"));
            t.write(&format!("{d}/surplus_hugepages"), "0\n");
        }
        t.write("devices/system/node/online", "0-1\n");
        t.mkdir("devices/system/node/power");
        t
    }

    #[test]
    fn reads_pools_sorted_with_nodes() {
        let t = fixture();
        let pools = pools_at(t.path()).unwrap();
        assert_eq!(pools.len(), 2);
        let p = &pools[0];
        assert_eq!(p.page_size, 2 << 20);
        assert_eq!((p.total, p.free, p.reserved, p.surplus), (128, 100, 10, 0));
        assert_eq!(p.available(), 90);
        assert_eq!(p.per_node.len(), 2);
        assert_eq!(p.per_node[1], NodePool { node: 1, total: 64, free: 50, surplus: 0 });
        assert_eq!(pools[1].page_size, 1 << 30);
        assert!(pools[1].per_node.is_empty());
        assert_eq!(pool_at(t.path(), 2 << 20).unwrap(), pools[0]);
    }

    #[test]
    fn missing_tree_is_empty() {
        let t = TempTree::new("pools-empty");
        assert!(pools_at(t.path()).unwrap().is_empty());
        assert!(matches!(pool_at(t.path(), 2 << 20), Err(PoolError::NoSuchPool { .. })));
    }

    #[test]
    fn garbage_is_an_error() {
        let t = fixture();
        t.write("kernel/mm/hugepages/hugepages-2048kB/free_hugepages", "lots\n");
        match pools_at(t.path()) {
            Err(PoolError::Parse { value, .. }) => assert_eq!(value, "lots"),
            other => panic!("unexpected {other:?}"),
        }
        t.write("kernel/mm/hugepages/hugepages-2048kB/free_hugepages", "-1");
        assert!(pools_at(t.path()).is_err());
        std::fs::remove_file(t.path().join("kernel/mm/hugepages/hugepages-2048kB/free_hugepages")).unwrap();
        assert!(matches!(pools_at(t.path()), Err(PoolError::Io { .. })));
    }

    #[test]
    fn set_size_writes_nr_hugepages() {
        let t = fixture();
        assert_eq!(set_pool_size_at(t.path(), 1 << 30, 4).unwrap(), 4);
        let text =
            std::fs::read_to_string(t.path().join("kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages")).unwrap();
        assert_eq!(text, "4\n");
        assert!(matches!(set_pool_size_at(t.path(), 64 * 1024, 1), Err(PoolError::NoSuchPool { page_size: 65536 })));
        assert!(matches!(set_pool_size_at(t.path(), 0, 1), Err(PoolError::NoSuchPool { .. })));
    }

    #[test]
    fn set_node_size_writes_the_node_pool() {
        let t = fixture();
        assert_eq!(set_node_pool_size_at(t.path(), 1, 2 << 20, 80).unwrap(), 80);
        let p = t.path().join("devices/system/node/node1/hugepages/hugepages-2048kB/nr_hugepages");
        assert_eq!(std::fs::read_to_string(p).unwrap(), "80\n");
        assert!(matches!(set_node_pool_size_at(t.path(), 7, 2 << 20, 1), Err(PoolError::NoSuchPool { .. })));
        assert!(matches!(set_node_pool_size_at(t.path(), 0, 1 << 30, 1), Err(PoolError::NoSuchPool { .. })));
    }
}
