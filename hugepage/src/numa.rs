//! NUMA nodes: which are online, their memory, and whether they have CPUs.
//!
//! Sources: `<sysfs>/devices/system/node/online` (a range list such as `0-1,3`),
//! `nodeN/meminfo` (`Node N MemTotal: ... kB`) and `nodeN/cpulist` (empty for a
//! CPU-less node, e.g. CXL or other far memory).

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::SYSFS_ROOT;

/// Largest number of ids a range list may expand to (guards against absurd input).
pub const MAX_RANGE_IDS: usize = 1 << 16;

/// Errors reading NUMA topology.
#[derive(Debug, thiserror::Error)]
pub enum NumaError {
    /// A sysfs file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A range list (`0-1,3`) could not be parsed or is too large.
    #[error("bad range list {text:?}")]
    RangeList {
        /// The text (truncated to 128 bytes).
        text: String,
    },
    /// A `meminfo` value could not be parsed.
    #[error("{path}: cannot parse {line:?}")]
    Meminfo {
        /// The file.
        path: PathBuf,
        /// The line (truncated to 128 bytes).
        line: String,
    },
}

/// One online NUMA node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NumaNode {
    /// Node id.
    pub node: u32,
    /// `MemTotal` in bytes; `None` if `meminfo` is missing or lacks it.
    pub mem_total: Option<u64>,
    /// `MemFree` in bytes; `None` if `meminfo` is missing or lacks it.
    pub mem_free: Option<u64>,
    /// Whether the node has CPUs (non-empty `cpulist`).
    pub has_cpus: bool,
    /// The node's CPUs (from `cpulist`; empty if missing).
    pub cpus: Vec<u32>,
}

fn range_err(text: &str) -> NumaError {
    NumaError::RangeList { text: text.chars().take(128).collect() }
}

/// Parses a kernel range list (`0-3,5,8-9`; empty or whitespace gives an empty list)
/// into sorted, deduplicated ids. Lists expanding past [`MAX_RANGE_IDS`] are errors.
pub fn parse_range_list(text: &str) -> Result<Vec<u32>, NumaError> {
    let t = text.trim();
    let mut ids = Vec::new();
    if t.is_empty() {
        return Ok(ids);
    }
    for part in t.split(',') {
        let part = part.trim();
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let (Ok(a), Ok(b)) = (a.parse::<u32>(), b.parse::<u32>()) else {
            return Err(range_err(text));
        };
        if b < a || (b - a) as usize >= MAX_RANGE_IDS - ids.len().min(MAX_RANGE_IDS) {
            return Err(range_err(text));
        }
        ids.extend(a..=b);
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

fn read_optional(path: &Path) -> Result<Option<String>, NumaError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(NumaError::Io { path: path.to_path_buf(), source }),
    }
}

/// Parses per-node meminfo text into (`MemTotal`, `MemFree`) in bytes.
pub fn parse_node_meminfo(text: &str) -> Result<(Option<u64>, Option<u64>), String> {
    let (mut total, mut free) = (None, None);
    for line in text.lines() {
        // "Node 0 MemTotal:        4810964 kB"
        let toks: Vec<&str> = line.split_whitespace().collect();
        let slot = match toks.get(2) {
            Some(&"MemTotal:") => &mut total,
            Some(&"MemFree:") => &mut free,
            _ => continue,
        };
        let bytes = match (toks.get(3), toks.get(4), toks.len()) {
            (Some(v), Some(&"kB"), 5) => v.parse::<u64>().ok().and_then(|v| v.checked_mul(1024)),
            _ => None,
        };
        *slot = Some(bytes.ok_or_else(|| line.chars().take(128).collect::<String>())?);
    }
    Ok((total, free))
}

/// The online NUMA nodes of this host, sorted by id.
pub fn nodes() -> Result<Vec<NumaNode>, NumaError> {
    nodes_at(Path::new(SYSFS_ROOT))
}

/// [`nodes`] with `root` standing for the sysfs mount point (normally `/sys`).
/// A kernel without NUMA sysfs (no `devices/system/node/online`) gives an empty list.
pub fn nodes_at(root: &Path) -> Result<Vec<NumaNode>, NumaError> {
    let dir = root.join("devices/system/node");
    let Some(online) = read_optional(&dir.join("online"))? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for node in parse_range_list(&online)? {
        let nd = dir.join(format!("node{node}"));
        let (mem_total, mem_free) = match read_optional(&nd.join("meminfo"))? {
            Some(text) => {
                parse_node_meminfo(&text).map_err(|line| NumaError::Meminfo { path: nd.join("meminfo"), line })?
            }
            None => (None, None),
        };
        let cpus = match read_optional(&nd.join("cpulist"))? {
            Some(text) => parse_range_list(&text)?,
            None => Vec::new(),
        };
        out.push(NumaNode { node, mem_total, mem_free, has_cpus: !cpus.is_empty(), cpus });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempTree;

    #[test]
    fn range_lists() {
        assert_eq!(parse_range_list("0\n").unwrap(), [0]);
        assert_eq!(parse_range_list("0-1,3").unwrap(), [0, 1, 3]);
        assert_eq!(parse_range_list("3,0-2,2").unwrap(), [0, 1, 2, 3]);
        assert!(parse_range_list("\n").unwrap().is_empty());
        assert!(parse_range_list("1-0").is_err());
        assert!(parse_range_list("a").is_err());
        assert!(parse_range_list("0-").is_err());
        assert!(parse_range_list("0,,1").is_err());
        assert!(parse_range_list("0-4294967295").is_err());
        assert!(parse_range_list("0-40000,0-40000").is_err());
    }

    #[test]
    fn meminfo() {
        let text = "Node 0 MemTotal:        4810964 kB\nNode 0 MemFree:         3519820 kB\n\
                    Node 0 MemUsed:         1291144 kB\nNode 0 HugePages_Total:     0\n";
        assert_eq!(parse_node_meminfo(text).unwrap(), (Some(4810964 * 1024), Some(3519820 * 1024)));
        assert!(parse_node_meminfo("Node 0 MemTotal: x kB\n").is_err());
        assert_eq!(parse_node_meminfo("").unwrap(), (None, None));
    }

    #[test]
    fn reads_tree() {
        let t = TempTree::new("numa");
        let d = "devices/system/node";
        t.write(&format!("{d}/online"), "0-1,3\n");
        t.write(&format!("{d}/possible"), "0-3\n");
        t.write(&format!("{d}/node0/meminfo"), "Node 0 MemTotal:  1024 kB\nNode 0 MemFree:  512 kB\n");
        t.write(&format!("{d}/node0/cpulist"), "0-1\n");
        t.write(&format!("{d}/node1/meminfo"), "Node 1 MemTotal:  2048 kB\nNode 1 MemFree:  2048 kB\n");
        t.write(&format!("{d}/node1/cpulist"), "\n");
        t.mkdir(&format!("{d}/node3"));
        let n = nodes_at(t.path()).unwrap();
        assert_eq!(n.len(), 3);
        assert_eq!(
            n[0],
            NumaNode { node: 0, mem_total: Some(1 << 20), mem_free: Some(512 << 10), has_cpus: true, cpus: vec![0, 1] }
        );
        assert!(!n[1].has_cpus);
        assert_eq!(n[1].mem_total, Some(2 << 20));
        assert_eq!(n[2].node, 3);
        assert_eq!(n[2].mem_total, None);
        assert!(!n[2].has_cpus);

        t.write(&format!("{d}/online"), "zero\n");
        assert!(matches!(nodes_at(t.path()), Err(NumaError::RangeList { .. })));

        let empty = TempTree::new("numa-none");
        assert!(nodes_at(empty.path()).unwrap().is_empty());
    }
}
