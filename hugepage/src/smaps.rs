//! Huge-page coverage of a host address range, from `/proc/<pid>/smaps` text.
//!
//! [`coverage`] sums, over the mappings that overlap `[start, end)`, the smaps fields
//! that say how much of a mapping is backed by huge pages: `AnonHugePages` (anonymous
//! THP), `ShmemPmdMapped` (shmem/memfd THP mapped by PMD), `FilePmdMapped` (file THP),
//! `Private_Hugetlb` + `Shared_Hugetlb` (hugetlbfs), plus `Rss` and `KernelPageSize`.
//!
//! **Partial overlaps:** smaps gives per-mapping totals only, so a mapping that overlaps
//! the range partially is counted whole (nothing is scaled) and is counted in
//! [`HugeCoverage::partial`]. Guest memory regions are normally whole mappings, so in
//! practice every counted mapping lies fully inside the range.
//!
//! Note that the kernel does not count hugetlb pages in `Rss`: resident memory of a
//! hugetlb mapping appears only in the `*_Hugetlb` fields.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors reading or parsing smaps.
#[derive(Debug, thiserror::Error)]
pub enum SmapsError {
    /// The smaps file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A mapping header or a summed field could not be parsed.
    #[error("smaps line {line}: cannot parse {text:?}")]
    Malformed {
        /// 1-based line number.
        line: usize,
        /// The line (truncated to 128 bytes).
        text: String,
    },
}

/// One mapping of an smaps file, with the fields Mosaic uses, in bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SmapsMapping {
    /// First address of the mapping.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Permissions, e.g. `rw-s`.
    pub perms: String,
    /// Path or pseudo-name (`[heap]`, `/memfd:guest (deleted)`); empty if anonymous.
    pub name: String,
    /// `Rss`.
    pub rss: u64,
    /// `AnonHugePages`.
    pub anon_huge: u64,
    /// `ShmemPmdMapped`.
    pub shmem_pmd: u64,
    /// `FilePmdMapped`.
    pub file_pmd: u64,
    /// `Private_Hugetlb`.
    pub private_hugetlb: u64,
    /// `Shared_Hugetlb`.
    pub shared_hugetlb: u64,
    /// `KernelPageSize` (0 if absent).
    pub kernel_page_size: u64,
}

/// Huge-page coverage summed over the mappings overlapping an address range (bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HugeCoverage {
    /// Sum of `Rss` (excludes hugetlb pages).
    pub rss: u64,
    /// Sum of `AnonHugePages`.
    pub anon_huge: u64,
    /// Sum of `ShmemPmdMapped`.
    pub shmem_pmd: u64,
    /// Sum of `FilePmdMapped`.
    pub file_pmd: u64,
    /// Sum of `Private_Hugetlb` and `Shared_Hugetlb`.
    pub hugetlb: u64,
    /// The largest `KernelPageSize` among the counted mappings (0 if none): 2 MiB or
    /// 1 GiB for hugetlb mappings, 4 KiB otherwise (THP does not change it).
    pub kernel_page_size: u64,
    /// Number of mappings counted.
    pub mappings: usize,
    /// How many of them extend beyond the range (counted whole, not scaled).
    pub partial: usize,
}

impl HugeCoverage {
    /// Bytes backed by huge pages: anon THP + shmem PMD + file PMD + hugetlb.
    pub fn huge_bytes(&self) -> u64 {
        self.anon_huge.saturating_add(self.shmem_pmd).saturating_add(self.file_pmd).saturating_add(self.hugetlb)
    }

    /// Resident bytes: `Rss` plus hugetlb (which `Rss` leaves out).
    pub fn resident_bytes(&self) -> u64 {
        self.rss.saturating_add(self.hugetlb)
    }

    fn add(&mut self, m: &SmapsMapping, partial: bool) {
        self.rss = self.rss.saturating_add(m.rss);
        self.anon_huge = self.anon_huge.saturating_add(m.anon_huge);
        self.shmem_pmd = self.shmem_pmd.saturating_add(m.shmem_pmd);
        self.file_pmd = self.file_pmd.saturating_add(m.file_pmd);
        self.hugetlb = self.hugetlb.saturating_add(m.private_hugetlb).saturating_add(m.shared_hugetlb);
        self.kernel_page_size = self.kernel_page_size.max(m.kernel_page_size);
        self.mappings += 1;
        if partial {
            self.partial += 1;
        }
    }
}

fn malformed(line: usize, text: &str) -> SmapsError {
    SmapsError::Malformed { line, text: text.chars().take(128).collect() }
}

/// Parses a mapping header line (`start-end perms offset dev inode [name]`);
/// `None` if the line is not a header.
fn parse_header(line: &str) -> Option<Result<SmapsMapping, ()>> {
    let mut it = line.split_whitespace();
    let range = it.next()?;
    let (s, e) = range.split_once('-')?;
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let (Ok(start), Ok(end)) = (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16)) else {
        return Some(Err(()));
    };
    if end < start {
        return Some(Err(()));
    }
    let perms = it.next().ok_or(()).map(str::to_string);
    let Ok(perms) = perms else {
        return Some(Err(()));
    };
    // offset, dev, inode, then the rest of the line is the name.
    for _ in 0..3 {
        if it.next().is_none() {
            return Some(Err(()));
        }
    }
    let name = it.collect::<Vec<_>>().join(" ");
    Some(Ok(SmapsMapping { start, end, perms, name, ..Default::default() }))
}

/// Parses `<value> kB` into bytes.
fn parse_kb(rest: &str) -> Option<u64> {
    let mut it = rest.split_whitespace();
    let v: u64 = it.next()?.parse().ok()?;
    match (it.next(), it.next()) {
        (Some("kB"), None) => v.checked_mul(1024),
        _ => None,
    }
}

/// Parses smaps text into its mappings. Fields other than the ones Mosaic sums are
/// ignored; lines before the first mapping header are ignored.
pub fn parse(text: &str) -> Result<Vec<SmapsMapping>, SmapsError> {
    let mut out: Vec<SmapsMapping> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let lineno = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let Some((key, rest)) = line.split_once(':').filter(|(k, _)| !k.contains(' ')) else {
            match parse_header(line) {
                Some(Ok(m)) => out.push(m),
                Some(Err(())) => return Err(malformed(lineno, line)),
                None => {}
            }
            continue;
        };
        let Some(m) = out.last_mut() else { continue };
        let slot = match key {
            "Rss" => &mut m.rss,
            "AnonHugePages" => &mut m.anon_huge,
            "ShmemPmdMapped" => &mut m.shmem_pmd,
            "FilePmdMapped" => &mut m.file_pmd,
            "Private_Hugetlb" => &mut m.private_hugetlb,
            "Shared_Hugetlb" => &mut m.shared_hugetlb,
            "KernelPageSize" => &mut m.kernel_page_size,
            _ => continue,
        };
        *slot = parse_kb(rest).ok_or_else(|| malformed(lineno, line))?;
    }
    Ok(out)
}

/// Sums the coverage of the mappings overlapping `[start, end)` (see the module docs
/// for partial overlaps). An empty range covers nothing.
pub fn coverage_of(mappings: &[SmapsMapping], start: u64, end: u64) -> HugeCoverage {
    let mut c = HugeCoverage::default();
    if start >= end {
        return c;
    }
    for m in mappings {
        if m.start < end && m.end > start {
            c.add(m, m.start < start || m.end > end);
        }
    }
    c
}

/// Parses smaps `text` and sums the coverage of `[start, end)`.
pub fn coverage(text: &str, start: u64, end: u64) -> Result<HugeCoverage, SmapsError> {
    Ok(coverage_of(&parse(text)?, start, end))
}

/// Reads an smaps file (e.g. `/proc/<pid>/smaps`) and sums the coverage of `[start, end)`.
pub fn coverage_from_file(path: &Path, start: u64, end: u64) -> Result<HugeCoverage, SmapsError> {
    let text = std::fs::read_to_string(path).map_err(|source| SmapsError::Io { path: path.to_path_buf(), source })?;
    coverage(&text, start, end)
}

/// The coverage of `[start, end)` in this process (`/proc/self/smaps`).
pub fn self_coverage(start: u64, end: u64) -> Result<HugeCoverage, SmapsError> {
    coverage_from_file(Path::new("/proc/self/smaps"), start, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = "\
55d0c0000000-55d0c0002000 r--p 00000000 fe:00 247282                     /usr/bin/mosaic
Size:                  8 kB
KernelPageSize:        4 kB
MMUPageSize:           4 kB
Rss:                   8 kB
AnonHugePages:         0 kB
VmFlags: rd mr mw me
7f0000000000-7f0010000000 rw-p 00000000 00:00 0 
Size:             262144 kB
KernelPageSize:        4 kB
MMUPageSize:           4 kB
Rss:              262144 kB
Anonymous:        262144 kB
AnonHugePages:    260096 kB
ShmemPmdMapped:        0 kB
FilePmdMapped:         0 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:       0 kB
THPeligible:           1
ProtectionKey:         0
VmFlags: rd wr mr mw me ac hg
7f0010000000-7f0020000000 rw-s 00000000 00:01 1234                       /memfd:guest (deleted)
Size:             262144 kB
KernelPageSize:        4 kB
Rss:              131072 kB
ShmemPmdMapped:   131072 kB
FilePmdMapped:         0 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:       0 kB
THPeligible:           1
7f0040000000-7f0080000000 rw-s 00000000 00:10 99                         /anon_hugepage (deleted)
Size:            1048576 kB
KernelPageSize:  1048576 kB
MMUPageSize:     1048576 kB
Rss:                   0 kB
AnonHugePages:         0 kB
ShmemPmdMapped:        0 kB
Shared_Hugetlb:  1048576 kB
Private_Hugetlb:       0 kB
THPeligible:           0
";

    #[test]
    fn parses_mappings() {
        let maps = parse(FIXTURE).unwrap();
        assert_eq!(maps.len(), 4);
        assert_eq!(maps[0].name, "/usr/bin/mosaic");
        assert_eq!(maps[1].name, "");
        assert_eq!(maps[1].perms, "rw-p");
        assert_eq!(maps[1].anon_huge, 260096 * 1024);
        assert_eq!(maps[2].name, "/memfd:guest (deleted)");
        assert_eq!(maps[3].kernel_page_size, 1 << 30);
    }

    #[test]
    fn sums_inside_range() {
        let c = coverage(FIXTURE, 0x7f00_0000_0000, 0x7f00_2000_0000).unwrap();
        assert_eq!(c.mappings, 2);
        assert_eq!(c.partial, 0);
        assert_eq!(c.rss, (262144 + 131072) * 1024);
        assert_eq!(c.anon_huge, 260096 * 1024);
        assert_eq!(c.shmem_pmd, 131072 * 1024);
        assert_eq!(c.hugetlb, 0);
        assert_eq!(c.kernel_page_size, 4096);
        assert_eq!(c.huge_bytes(), (260096 + 131072) * 1024);

        let h = coverage(FIXTURE, 0x7f00_4000_0000, 0x7f00_8000_0000).unwrap();
        assert_eq!(h.hugetlb, 1 << 30);
        assert_eq!(h.rss, 0);
        assert_eq!(h.resident_bytes(), 1 << 30);
        assert_eq!(h.kernel_page_size, 1 << 30);
        assert_eq!(h.huge_bytes(), 1 << 30);
    }

    #[test]
    fn partial_overlap_counts_whole_mapping() {
        // Range covers the second half of the anon mapping and the start of the memfd.
        let c = coverage(FIXTURE, 0x7f00_0800_0000, 0x7f00_1000_1000).unwrap();
        assert_eq!(c.mappings, 2);
        assert_eq!(c.partial, 2);
        assert_eq!(c.anon_huge, 260096 * 1024);
        // Touching end boundaries do not overlap.
        let none = coverage(FIXTURE, 0x7f00_2000_0000, 0x7f00_4000_0000).unwrap();
        assert_eq!(none, HugeCoverage::default());
        let empty = coverage(FIXTURE, 0x7f00_0000_1000, 0x7f00_0000_1000).unwrap();
        assert_eq!(empty.mappings, 0);
    }

    #[test]
    fn malformed_input() {
        assert!(matches!(
            parse("zz-10 rw-p 0 0 0\n"),
            Ok(v) if v.is_empty()
        ));
        assert!(matches!(parse("1000-zz rw-p 0 0 0\n"), Err(SmapsError::Malformed { line: 1, .. })));
        assert!(parse("2000-1000 rw-p 0 0:0 0\n").is_err());
        assert!(parse("1000-2000 rw-p\n").is_err());
        assert!(parse("1000-2000 rw-p 0 0:0 0\nRss: lots kB\n").is_err());
        assert!(parse("1000-2000 rw-p 0 0:0 0\nRss: 4 MB\n").is_err());
        assert!(parse("1000-2000 rw-p 0 0:0 0\nRss: 18446744073709551615 kB\n").is_err());
        // Unknown or unit-less fields we do not sum are fine; so is a stray field line.
        let m = parse("Rss: 4 kB\n1000-2000 rw-p 0 0:0 0\nTHPeligible: 1\nFoo: x\n").unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].rss, 0);
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn self_smaps_sees_own_mapping() {
        const LEN: usize = 4 << 20;
        // SAFETY: anonymous private mapping with no fixed address; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: `p` points to LEN writable bytes we own.
        unsafe { std::ptr::write_bytes(p.cast::<u8>(), 1, LEN) };
        let start = p as u64;
        let c = self_coverage(start, start + LEN as u64).unwrap();
        // SAFETY: unmapping exactly the mapping created above.
        unsafe { libc::munmap(p, LEN) };
        assert!(c.mappings >= 1);
        assert!(c.rss >= LEN as u64, "{c:?}");
        assert_eq!(c.hugetlb, 0);
    }
}
