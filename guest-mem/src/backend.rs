//! Backends: what host memory backs a zone of guest RAM.
//!
//! | backend | host memory | fd (live update) | notes |
//! |---|---|---|---|
//! | `anon`  | `MAP_PRIVATE` anonymous | no  | cheapest; cannot be handed to another process |
//! | `memfd` | `memfd_create`, `MAP_SHARED` | yes | the default |
//! | `gmem`  | KVM guest_memfd (`MMAP` + `INIT_SHARED`), `MAP_SHARED` | bound to its VM | registered with `KVM_SET_USER_MEMORY_REGION2` |
//! | `file`  | a file on tmpfs/hugetlbfs or a `/dev/daxX.Y` device, `MAP_SHARED` | yes | |
//! | `hugetlb` | memfd with `MFD_HUGETLB` (2 MiB or 1 GiB pages), `MAP_SHARED` | yes | pages reserved from the pool at map time: a short pool fails here, never with SIGBUS later |
//! | `thp`   | anonymous (`shared=off`) or memfd (`shared=on`) with `MADV_HUGEPAGE` | with `shared=on` | `MADV_COLLAPSE` after prefault rebuilds huge pages whatever the sysfs THP settings |
//!
//! Each kind says its page size and placement alignment, and [`Backing::create`] is
//! the one place that turns a spec into an fd and a mapping.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::mapping::Mapping;
use crate::{PAGE_2M, PAGE_4K};

/// guest_memfd flag: the fd can be mmapped (KVM_CAP_GUEST_MEMFD_FLAGS bit 0).
pub const GUEST_MEMFD_FLAG_MMAP: u64 = 1 << 0;
/// guest_memfd flag: memory starts shared (host-accessible) (bit 1).
pub const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 1 << 1;

/// The kinds of backing Mosaic knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Private anonymous memory.
    Anon,
    /// A memfd, mapped shared.
    Memfd,
    /// A KVM guest_memfd, mmappable and initially shared.
    Gmem,
    /// A file or DAX device given by path.
    File,
    /// hugetlb pages (2 MiB or 1 GiB) from the host's pool, through a memfd.
    Hugetlb,
    /// Transparent huge pages.
    Thp,
}

impl BackendKind {
    /// All kinds, in the order the docs list them.
    pub const ALL: [BackendKind; 6] = [
        BackendKind::Anon,
        BackendKind::Memfd,
        BackendKind::Gmem,
        BackendKind::File,
        BackendKind::Hugetlb,
        BackendKind::Thp,
    ];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Anon => "anon",
            BackendKind::Memfd => "memfd",
            BackendKind::Gmem => "gmem",
            BackendKind::File => "file",
            BackendKind::Hugetlb => "hugetlb",
            BackendKind::Thp => "thp",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown backend name.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("unknown backend '{0}' (expected anon, memfd, gmem, file, hugetlb or thp)")]
pub struct UnknownBackend(pub String);

impl FromStr for BackendKind {
    type Err = UnknownBackend;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BackendKind::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| UnknownBackend(s.to_string()))
    }
}

/// A backend as configured for one zone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendSpec {
    /// The kind.
    pub kind: BackendKind,
    /// Path, for `file`.
    // Always serialized (as null when absent): the binary state encoding has no
    // field names, so every field must be present.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Populate all pages before the guest starts.
    #[serde(default)]
    pub prefault: bool,
    /// Page size of the backing: 4 KiB; 2 MiB or 1 GiB for hugetlb; 2 MiB for thp;
    /// the huge page size of a hugetlbfs file.
    #[serde(default = "default_page_size")]
    pub page_size: u64,
    /// `thp` only: a shared memfd (which live update can hand over) instead of
    /// anonymous memory.
    #[serde(default)]
    pub shared: bool,
    /// `hugetlb` only: grow the pool for this VM if it is short, and give the pages
    /// back at exit.
    #[serde(default)]
    pub reserve: Reserve,
    /// What to do when the huge pages asked for cannot be had.
    #[serde(default)]
    pub fallback: Fallback,
    /// The zone's RAM starts private to the guest (needs a backing with an fd).
    #[serde(default)]
    pub private: bool,
}

fn default_page_size() -> u64 {
    PAGE_4K
}

/// Pool reservation policy for `hugetlb` zones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reserve {
    /// Use the pool as it is.
    #[default]
    Off,
    /// Grow the pool by what is missing, and shrink it back at exit.
    Auto,
}

/// What a huge-page zone falls back to when its pages cannot be had.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    /// Refuse to start.
    #[default]
    Error,
    /// Transparent huge pages (a shared memfd, so the zone keeps an fd).
    Thp,
    /// 4 KiB pages (memfd).
    #[serde(rename = "4k")]
    FourK,
}

impl FromStr for Fallback {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "error" => Ok(Fallback::Error),
            "thp" => Ok(Fallback::Thp),
            "4k" | "4K" => Ok(Fallback::FourK),
            _ => Err(format!("fallback '{s}' is not error, thp or 4k")),
        }
    }
}

/// `statfs` magic of hugetlbfs.
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// The page size of the filesystem holding `path`: its huge page size on hugetlbfs,
/// 4 KiB elsewhere (tmpfs, ext4, DAX devices on devtmpfs).
pub fn file_page_size(path: &std::path::Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: an all-zero statfs is a valid value for the kernel to overwrite.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` is a valid, writable statfs.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if st.f_type as i64 == HUGETLBFS_MAGIC && st.f_bsize > 0 {
        Ok(st.f_bsize as u64)
    } else {
        Ok(PAGE_4K)
    }
}

impl BackendSpec {
    /// A spec of `kind` with default options.
    pub fn new(kind: BackendKind) -> Self {
        let page_size = match kind {
            BackendKind::Hugetlb | BackendKind::Thp => PAGE_2M,
            _ => PAGE_4K,
        };
        BackendSpec {
            kind,
            path: None,
            prefault: false,
            page_size,
            shared: false,
            reserve: Reserve::Off,
            fallback: Fallback::Error,
            private: false,
        }
    }

    /// Whether the backing has an fd another process could map.
    pub fn has_fd(&self) -> bool {
        match self.kind {
            BackendKind::Anon => false,
            BackendKind::Thp => self.shared,
            _ => true,
        }
    }

    /// A short description: `hugetlb 1G`, `thp shared`, `memfd`.
    pub fn describe(&self) -> String {
        match self.kind {
            BackendKind::Hugetlb => format!("hugetlb {}", crate::page_label(self.page_size)),
            BackendKind::Thp if self.shared => "thp shared".into(),
            BackendKind::Thp => "thp anon".into(),
            k => k.name().into(),
        }
    }

    /// The page size the backing is made of.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Alignment of the zone's first GPA and of its host mapping: at least 2 MiB so
    /// guest page tables can use 2 MiB entries, and never less than the page size.
    pub fn placement_align(&self) -> u64 {
        self.page_size().max(PAGE_2M)
    }
}

/// Makes KVM guest_memfds; implemented by the VMM over its VM fd, so this crate
/// needs no KVM handle.
pub trait GmemFactory {
    /// `KVM_CREATE_GUEST_MEMFD` with `size` and `flags`.
    fn create_guest_memfd(&self, size: u64, flags: u64) -> io::Result<OwnedFd>;
}

/// Errors from creating a backing.
#[derive(Debug, Error)]
pub enum BackendError {
    /// `memfd_create` or sizing it failed.
    #[error("cannot create memfd of {size} bytes")]
    Memfd {
        /// Requested size.
        size: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// `file` without `path=`.
    #[error("backend 'file' needs path=")]
    MissingPath,
    /// The file could not be opened or sized.
    #[error("cannot use '{path}'")]
    File {
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The path is a directory or another unusable file type.
    #[error("'{0}' is neither a regular file nor a DAX device, so it cannot back guest RAM")]
    FileType(PathBuf),
    /// `gmem` without a VM to create the guest_memfd on.
    #[error("backend 'gmem' needs a VM to create guest_memfd on")]
    NoGmemFactory,
    /// `KVM_CREATE_GUEST_MEMFD` failed.
    #[error("cannot create guest_memfd of {size} bytes")]
    Gmem {
        /// Requested size.
        size: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// `mmap` failed.
    #[error("cannot map {size} bytes of {kind} memory")]
    Map {
        /// Backend.
        kind: BackendKind,
        /// Requested size.
        size: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A hugetlb memfd could not be created or sized (no pool of that size, or the
    /// pool is short: hugetlb reserves pages when the memfd is mapped).
    #[error("cannot get {size} bytes of hugetlb {page} pages")]
    Hugetlb {
        /// Requested size.
        size: u64,
        /// Page size label.
        page: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A page size the backend does not offer.
    #[error("backend '{kind}' does not offer {page} pages")]
    PageSize {
        /// Backend.
        kind: BackendKind,
        /// Page size label.
        page: String,
    },
    /// A handed-over fd is not what its zone's spec says it should be.
    #[error("the {kind} fd handed over is not usable for this zone: {reason}")]
    Adopt {
        /// Backend.
        kind: BackendKind,
        /// What is wrong.
        reason: String,
    },
    /// `MADV_POPULATE_WRITE` failed (out of memory, or the file is too short).
    #[error("cannot prefault {size} bytes of {kind} memory")]
    Prefault {
        /// Backend.
        kind: BackendKind,
        /// Requested size.
        size: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// The host memory behind one zone: an fd (if the kind has one) and one mapping per
/// piece of the zone (a zone split by the MMIO hole has two pieces, each its own
/// mapping, so /proc/self/smaps reports each guest RAM region on its own).
#[derive(Debug)]
pub struct Backing {
    spec: BackendSpec,
    // Declared before `fd`: unmapped before the fd is closed.
    mappings: Vec<Mapping>,
    fd: Option<OwnedFd>,
}

impl Backing {
    /// Creates the backing for a zone of `size` bytes, mapped as `pieces` (`(offset,
    /// len)` within the zone, in order, covering it; empty = one piece); with
    /// `prefault`, populates it on every CPU, calling `progress(done, total)` as it goes.
    pub fn create(
        spec: &BackendSpec,
        size: u64,
        pieces: &[(u64, u64)],
        gmem: Option<&dyn GmemFactory>,
        progress: Option<&(dyn Fn(u64, u64) + Sync)>,
    ) -> Result<Self, BackendError> {
        let fd = match spec.kind {
            BackendKind::Anon => None,
            BackendKind::Memfd => Some(memfd(size).map_err(|source| BackendError::Memfd { size, source })?),
            BackendKind::Gmem => {
                let factory = gmem.ok_or(BackendError::NoGmemFactory)?;
                let fd = factory
                    .create_guest_memfd(size, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
                    .map_err(|source| BackendError::Gmem { size, source })?;
                Some(fd)
            }
            BackendKind::Hugetlb => {
                let page = crate::page_label(spec.page_size);
                let fd = hugetlb_memfd(size, spec.page_size).map_err(|e| match e {
                    Some(source) => BackendError::Hugetlb { size, page: page.clone(), source },
                    None => BackendError::PageSize { kind: spec.kind, page: page.clone() },
                })?;
                Some(fd)
            }
            BackendKind::Thp => {
                if spec.page_size != PAGE_2M {
                    let page = crate::page_label(spec.page_size);
                    return Err(BackendError::PageSize { kind: spec.kind, page });
                }
                match spec.shared {
                    true => Some(memfd(size).map_err(|source| BackendError::Memfd { size, source })?),
                    false => None,
                }
            }
            BackendKind::File => {
                let path = spec.path.as_ref().ok_or(BackendError::MissingPath)?;
                Some(OwnedFd::from(open_backing_file(path, size)?))
            }
        };
        Self::map(spec, size, pieces, fd, Populate::FlatOut, progress)
    }

    /// Adopts `fd`, the backing of a zone of `size` bytes that another Mosaic process
    /// created from `spec` and handed over (live update), and maps it as `pieces`
    /// (see [`Backing::create`]). The fd is checked first: its kind must be one that
    /// can be shared between processes (never `anon`, `thp` without `shared`, or
    /// `gmem`, which is bound to its VM), it must be at least `size` bytes, and a
    /// hugetlb fd must have the spec's page size. With `spec.prefault`, the pages
    /// (already allocated by the first process) are mapped in up front, which costs
    /// page-table updates only.
    pub fn adopt(
        spec: &BackendSpec,
        size: u64,
        pieces: &[(u64, u64)],
        fd: OwnedFd,
        progress: Option<&(dyn Fn(u64, u64) + Sync)>,
    ) -> Result<Self, BackendError> {
        check_adoptable(spec, size, fd.as_fd())?;
        Self::map(spec, size, pieces, Some(fd), Populate::Paced, progress)
    }

    fn map(
        spec: &BackendSpec,
        size: u64,
        pieces: &[(u64, u64)],
        fd: Option<OwnedFd>,
        populate: Populate,
        progress: Option<&(dyn Fn(u64, u64) + Sync)>,
    ) -> Result<Self, BackendError> {
        let invalid =
            || BackendError::Map { kind: spec.kind, size, source: io::Error::from(io::ErrorKind::InvalidInput) };
        let whole = [(0, size)];
        let pieces = if pieces.is_empty() { &whole[..] } else { pieces };
        if pieces.iter().map(|p| p.1).sum::<u64>() != size {
            return Err(invalid());
        }
        let align = spec.placement_align() as usize;
        let map_err = |source| BackendError::Map { kind: spec.kind, size, source };
        let mut mappings = Vec::with_capacity(pieces.len());
        for &(off, len) in pieces {
            let len = usize::try_from(len).map_err(|_| invalid())?;
            let m = match &fd {
                Some(fd) => Mapping::shared(fd.as_fd(), off, len, align),
                None => Mapping::anonymous(len, align),
            };
            let m = m.map_err(|source| match spec.kind {
                // hugetlb reserves its pages when mapped: this is where a short pool shows.
                BackendKind::Hugetlb => BackendError::Hugetlb { size, page: crate::page_label(spec.page_size), source },
                _ => map_err(source),
            })?;
            if spec.kind == BackendKind::Thp {
                m.madvise(libc::MADV_HUGEPAGE).map_err(map_err)?;
            }
            mappings.push(m);
        }
        if spec.prefault {
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            let chunk = match populate {
                Populate::FlatOut => (PREFAULT_CHUNK as usize).max(align),
                Populate::Paced => (PACED_CHUNK_PAGES * spec.page_size()).max(PACED_CHUNK_MIN) as usize,
            };
            let mut before = 0u64;
            for m in &mappings {
                let base = before;
                let piece_progress = progress.map(|p| move |done: u64, _: u64| p(base + done, size));
                let pp = piece_progress.as_ref().map(|f| f as &(dyn Fn(u64, u64) + Sync));
                let populated = match populate {
                    Populate::FlatOut => m.populate_write_parallel(threads, chunk, pp),
                    Populate::Paced => m.populate_write_paced(threads, chunk, pp),
                };
                populated.map_err(|source| BackendError::Prefault { kind: spec.kind, size, source })?;
                if spec.kind == BackendKind::Thp {
                    // Rebuild huge pages wherever the fault path gave small ones (shmem
                    // THP off, fragmentation): MADV_COLLAPSE ignores the sysfs THP
                    // settings. Best effort: what it could not collapse shows in the
                    // coverage report.
                    let _ = m.madvise(MADV_COLLAPSE);
                }
                before += m.len() as u64;
            }
        }
        Ok(Backing { spec: spec.clone(), mappings, fd })
    }

    /// Collapses the zone's memory into huge pages (`MADV_COLLAPSE`); for `thp` zones
    /// whose huge pages were split.
    pub fn collapse(&self) -> io::Result<()> {
        self.mappings.iter().try_for_each(|m| m.madvise(MADV_COLLAPSE))
    }

    /// The spec it was made from.
    pub fn spec(&self) -> &BackendSpec {
        &self.spec
    }

    /// The host mappings, one per piece, in order.
    pub fn mappings(&self) -> &[Mapping] {
        &self.mappings
    }

    /// The backing fd, if the kind has one.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(|f| f.as_fd())
    }
}

/// Whether a zone of this spec can be handed to another process as an fd.
pub fn can_hand_over(spec: &BackendSpec) -> Result<(), &'static str> {
    match spec.kind {
        BackendKind::Anon => {
            Err("anonymous memory has no fd to hand over (use memfd, hugetlb, thp with shared=on, or file)")
        }
        BackendKind::Thp if !spec.shared => {
            Err("thp without shared=on is anonymous memory, which has no fd to hand over (use shared=on)")
        }
        BackendKind::Gmem => {
            Err("guest_memfd is bound by the kernel to the VM that created it, so a new process's VM cannot adopt it \
             (use memfd or hugetlb for guests that must survive a live update)")
        }
        _ => Ok(()),
    }
}

/// Checks that `fd` can back a zone of `spec` and `size` bytes (see [`Backing::adopt`]).
fn check_adoptable(spec: &BackendSpec, size: u64, fd: BorrowedFd<'_>) -> Result<(), BackendError> {
    let bad = |reason: String| BackendError::Adopt { kind: spec.kind, reason };
    can_hand_over(spec).map_err(|r| bad(r.into()))?;
    let file = File::from(fd.try_clone_to_owned().map_err(|e| bad(format!("cannot duplicate it: {e}")))?);
    let meta = file.metadata().map_err(|e| bad(format!("fstat failed: {e}")))?;
    let ft = meta.file_type();
    if !(ft.is_file() || (spec.kind == BackendKind::File && ft.is_char_device())) {
        return Err(bad("it is not a regular file".into()));
    }
    if ft.is_file() && meta.len() < size {
        return Err(bad(format!("it holds {} bytes, the zone needs {size}", meta.len())));
    }
    // SAFETY: statfs is plain data; fstatfs writes only into it and the fd is open.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above: a valid fd and a valid, writable statfs.
    if unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(bad(format!("fstatfs failed: {}", io::Error::last_os_error())));
    }
    let hugetlbfs = st.f_type as i64 == HUGETLBFS_MAGIC;
    match spec.kind {
        BackendKind::Hugetlb if !hugetlbfs => Err(bad("it is not a hugetlb file".into())),
        BackendKind::Hugetlb if st.f_bsize as u64 != spec.page_size => Err(bad(format!(
            "its huge pages are {}, the zone has {}",
            crate::page_label(st.f_bsize as u64),
            crate::page_label(spec.page_size)
        ))),
        BackendKind::Memfd | BackendKind::Thp if hugetlbfs => Err(bad("it is a hugetlb file".into())),
        _ => Ok(()),
    }
}

/// Bytes one prefault thread populates at a time.
const PREFAULT_CHUNK: u64 = 256 << 20;

/// How a prefault populates a zone's mappings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Populate {
    /// As fast as the CPUs allow: a new guest that does not run yet.
    FlatOut,
    /// In small chunks, each thread resting as long as it worked
    /// ([`crate::mapping::Mapping::populate_write_paced`]): memory adopted from a
    /// process whose guest runs meanwhile, so its vCPUs are never held up for more than
    /// a chunk (~30 µs of page-table work for 4 KiB pages).
    Paced,
}

/// A paced chunk: this many pages of the zone's page size ...
const PACED_CHUNK_PAGES: u64 = 16;
/// ... and at least this many bytes (64 page-table entries of 4 KiB pages).
const PACED_CHUNK_MIN: u64 = 256 << 10;

/// `MADV_COLLAPSE` (Linux 6.1), not in every libc crate version.
pub const MADV_COLLAPSE: i32 = 25;

/// A hugetlb memfd of `size` bytes with `page` pages. `Err(None)`: no such page size.
fn hugetlb_memfd(size: u64, page: u64) -> Result<OwnedFd, Option<io::Error>> {
    let shift = match page {
        crate::PAGE_2M => 21,
        crate::PAGE_1G => 30,
        _ => return Err(None),
    };
    let flags = libc::MFD_CLOEXEC | libc::MFD_HUGETLB | (shift << libc::MFD_HUGE_SHIFT);
    // SAFETY: the name is a valid NUL-terminated string; the result is checked.
    let raw = unsafe { libc::memfd_create(c"mosaic-guest-ram-hugetlb".as_ptr(), flags) };
    if raw < 0 {
        return Err(Some(io::Error::last_os_error()));
    }
    // SAFETY: memfd_create returned a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    File::from(fd.try_clone().map_err(Some)?).set_len(size).map_err(Some)?;
    Ok(fd)
}

/// A plain memfd of `size` bytes (tests stand it in for a guest_memfd).
#[cfg(test)]
pub(crate) fn tests_memfd(size: u64) -> OwnedFd {
    memfd(size).expect("memfd")
}

fn memfd(size: u64) -> io::Result<OwnedFd> {
    // SAFETY: the name is a valid NUL-terminated string; the result is checked.
    let raw = unsafe { libc::memfd_create(c"mosaic-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    File::from(fd.try_clone()?).set_len(size)?;
    Ok(fd)
}

/// Opens a `file` backing: a regular file is grown to `size` if shorter (never
/// shrunk); a character device (DAX) is used as it is.
fn open_backing_file(path: &std::path::Path, size: u64) -> Result<File, BackendError> {
    let err = |source| BackendError::File { path: path.to_path_buf(), source };
    let file = check_backing_file(path)?;
    let meta = file.metadata().map_err(err)?;
    if meta.file_type().is_file() && meta.len() < size {
        file.set_len(size).map_err(err)?;
    }
    Ok(file)
}

/// Opens a `file` backing read/write and checks that it can be guest RAM: a regular
/// file, or a DAX character device (other character devices, such as /dev/zero, do
/// not share memory between mappings).
pub fn check_backing_file(path: &std::path::Path) -> Result<File, BackendError> {
    use std::os::unix::fs::MetadataExt;
    let err = |source| BackendError::File { path: path.to_path_buf(), source };
    let file = OpenOptions::new().read(true).write(true).open(path).map_err(err)?;
    let meta = file.metadata().map_err(err)?;
    let ft = meta.file_type();
    let ok = if ft.is_char_device() {
        let (maj, min) = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
        let subsystem = std::fs::read_link(format!("/sys/dev/char/{maj}:{min}/subsystem")).unwrap_or_default();
        subsystem.ends_with("dax")
    } else {
        ft.is_file()
    };
    if !ok {
        return Err(BackendError::FileType(path.to_path_buf()));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for k in BackendKind::ALL {
            assert_eq!(k.name().parse::<BackendKind>().unwrap(), k);
        }
        assert_eq!("hugetlbx".parse::<BackendKind>(), Err(UnknownBackend("hugetlbx".into())));
    }

    #[test]
    fn memfd_backing_has_fd_and_prefaults() {
        let mut spec = BackendSpec::new(BackendKind::Memfd);
        spec.prefault = true;
        let b = Backing::create(&spec, 4 << 20, &[], None, None).unwrap();
        assert!(b.fd().is_some());
        assert_eq!(b.mappings()[0].addr() % PAGE_2M, 0);
    }

    #[test]
    fn file_backing_grows_a_short_file_and_refuses_missing_ones() {
        let dir = std::env::temp_dir().join(format!("mosaic-gm-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("ram");
        std::fs::write(&p, b"").unwrap();
        let mut spec = BackendSpec::new(BackendKind::File);
        spec.path = Some(p.clone());
        Backing::create(&spec, 2 << 20, &[], None, None).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 2 << 20);
        spec.path = Some(dir.join("missing"));
        assert!(matches!(Backing::create(&spec, 2 << 20, &[], None, None), Err(BackendError::File { .. })));
        spec.path = Some(dir.clone());
        assert!(Backing::create(&spec, 2 << 20, &[], None, None).is_err());
        spec.path = None;
        assert!(matches!(Backing::create(&spec, 2 << 20, &[], None, None), Err(BackendError::MissingPath)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tmpfs_files_have_4k_pages() {
        assert_eq!(file_page_size(std::path::Path::new("/dev/shm")).unwrap(), PAGE_4K);
        assert!(file_page_size(std::path::Path::new("/nonexistent/x")).is_err());
    }

    #[test]
    fn gmem_without_a_vm_is_refused() {
        let spec = BackendSpec::new(BackendKind::Gmem);
        assert!(matches!(Backing::create(&spec, 2 << 20, &[], None, None), Err(BackendError::NoGmemFactory)));
    }
}
