//! [`GuestMemory`]: the guest RAM of one VM, and the only road from the VMM to its bytes.
//!
//! Devices, loaders and (later) the API and live update read and write guest memory
//! through [`GuestMemory::read`], [`GuestMemory::write`] and their typed forms. Each
//! access is checked as a whole before any byte moves: a range that overflows, touches
//! the MMIO hole, or leaves guest RAM is refused with an [`AccessError`]; nothing
//! panics. This is the seam where private pages will be refused too.

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::{RwLock, RwLockReadGuard};

use thiserror::Error;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::attrs::{AttrError, Attributes, PageState};
use crate::backend::{BackendError, BackendKind, Backing, GmemFactory};
use crate::convert::{ContentMode, ConvError, ConvRequest, ConvStats, ConvStatsSnapshot};
use crate::layout::MemoryLayout;

type Mem = GuestMemoryMmap<()>;

/// Errors from accessing guest memory.
#[derive(Debug, Error)]
pub enum AccessError {
    /// `gpa + len` overflows.
    #[error("access of {len} bytes at {gpa:#x} overflows")]
    Overflow {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// The range touches the 32-bit MMIO hole.
    #[error("access of {len} bytes at {gpa:#x} touches the MMIO hole")]
    MmioHole {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// The range is not entirely guest RAM.
    #[error("access of {len} bytes at {gpa:#x} is outside guest RAM")]
    OutOfRange {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// The range touches a page private to the guest.
    #[error("access of {len} bytes at {gpa:#x} touches private page {page:#x}")]
    Private {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
        /// First private page in the range.
        page: u64,
    },
    /// The loader view was asked for after pages became private.
    #[error("boot loaders cannot write guest memory once pages are private")]
    LoaderAfterPrivate,
    /// vm-memory refused the access.
    #[error("guest memory access at {gpa:#x} failed")]
    Memory {
        /// Start.
        gpa: u64,
        /// Cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Errors from building guest memory.
#[derive(Debug, Error)]
pub enum BuildError {
    /// A zone's backing could not be created.
    #[error("memory zone {zone}")]
    Backing {
        /// Zone index.
        zone: usize,
        /// Cause.
        #[source]
        source: BackendError,
    },
    /// vm-memory refused the regions.
    #[error("cannot build the guest memory map")]
    Regions(#[source] vm_memory::mmap::MmapRegionError),
    /// The VMM's view of a region could not be mapped.
    #[error("cannot map the VMM's view of memory zone {zone}")]
    View {
        /// Zone index.
        zone: usize,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A live update handed over a different number of fds than there are zones.
    #[error("{fds} memory fds were handed over for {zones} zones")]
    ZoneFds {
        /// Fds received.
        fds: usize,
        /// Zones in the layout.
        zones: usize,
    },
    /// vm-memory refused the region list.
    #[error("cannot build the guest memory map")]
    Collection(#[source] vm_memory::GuestRegionCollectionError),
}

/// One guest RAM range as the VMM registers it with KVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestRegion {
    /// First guest-physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub size: u64,
    /// Host virtual address of `gpa`.
    pub host_addr: u64,
    /// Zone index.
    pub zone: usize,
    /// Backend of the zone.
    pub kind: BackendKind,
    /// Page size of the backing.
    pub page_size: u64,
    /// Offset of `gpa` within the zone's backing fd.
    pub fd_offset: u64,
    /// The guest_memfd, for `gmem` zones.
    pub gmem_fd: Option<RawFd>,
}

/// Makes each zone's backing with `make(zone, pieces, progress)`: the zone's pieces
/// (`(offset, len)` of each of its regions) and its prefault progress reporter.
fn zone_backings(
    layout: &MemoryLayout,
    progress: Option<&(dyn Fn(usize, u64, u64) + Sync)>,
    mut make: impl FnMut(
        &crate::layout::ZoneSpec,
        &[(u64, u64)],
        Option<&(dyn Fn(u64, u64) + Sync)>,
    ) -> Result<Backing, BackendError>,
) -> Result<Vec<Backing>, BuildError> {
    let mut backings = Vec::with_capacity(layout.zones().len());
    for (zone, z) in layout.zones().iter().enumerate() {
        let pieces: Vec<(u64, u64)> =
            layout.regions().iter().filter(|r| r.zone == zone).map(|r| (r.zone_offset, r.size)).collect();
        let zone_progress = progress.map(|p| move |done: u64, total: u64| p(zone, done, total));
        let zp = zone_progress.as_ref().map(|f| f as &(dyn Fn(u64, u64) + Sync));
        backings.push(make(z, &pieces, zp).map_err(|source| BuildError::Backing { zone, source })?);
    }
    Ok(backings)
}

/// Puts the attributes of `[gpa, gpa+len)` back to what they were: shared except the
/// `before` private ranges.
fn restore_private(attrs: &mut Attributes, gpa: u64, len: u64, before: &[(u64, u64)]) {
    let _ = attrs.set(gpa, len, PageState::Shared);
    for &(g, l) in before {
        let (s, e) = (g.max(gpa), (g + l).min(gpa + len));
        let _ = attrs.set(s, e - s, PageState::Private);
    }
}

/// Whether each huge block (of each size in [`MIXED_BLOCKS`]) overlapping
/// `[gpa, gpa+len)` is mixed, block by block.
fn mixed_per_block(attrs: &Attributes, gpa: u64, len: u64) -> Vec<Vec<bool>> {
    crate::convert::MIXED_BLOCKS
        .iter()
        .map(|&block| {
            let first = gpa / block * block;
            let end = gpa.saturating_add(len);
            (0..).map(|i| first + i * block).take_while(|&b| b < end).map(|b| attrs.block_is_mixed(b, block)).collect()
        })
        .collect()
}

/// A callback run before the first conversion.
struct Observer(Box<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observer")
    }
}

/// The guest RAM of one VM.
///
/// Every fd-backed region is mapped twice: the **KVM mapping** (`GuestRegion::host_addr`,
/// registered as the memslot, never handed to VMM code) and the **VMM view**, a second
/// `MAP_SHARED` mapping of the same fd through which every accessor read and write
/// goes. Private pages are `PROT_NONE` in the view (per 4 KiB page; per huge page for
/// hugetlb, where a huge page is protected once all of it is private), so a stray
/// pointer into a private page faults instead of leaking it.
#[derive(Debug)]
pub struct GuestMemory {
    // Field order matters: the kernel engine (which holds a VM fd) is dropped first, so
    // the VM is gone before any mapping it used is unmapped; vm-memory's views (which do
    // not own the mappings) are dropped before the mappings and backings that own them.
    kernel: std::sync::OnceLock<crate::engine::KernelEngine>,
    mem: Mem,
    kvm_mem: Mem,
    views: Vec<Option<crate::mapping::Mapping>>,
    /// False once a view's protection could not be kept in step with the attributes
    /// (mprotect failed): accesses then go through the KVM mapping, guarded by the
    /// attribute check alone, instead of risking a fault on a stale PROT_NONE page.
    view_trusted: std::sync::atomic::AtomicBool,
    attrs: RwLock<Attributes>,
    conv_stats: ConvStats,
    first_conversion: std::sync::Once,
    before_first_conversion: std::sync::OnceLock<Observer>,
    regions: Vec<GuestRegion>,
    layout: MemoryLayout,
    backings: Vec<Backing>,
}

impl GuestMemory {
    /// Creates a backing for each zone of `layout` and maps it.
    /// `gmem` creates guest_memfds for `gmem` zones; `progress(zone, done, total)` is
    /// called while prefaulting zones that ask for it.
    pub fn new(
        layout: MemoryLayout,
        gmem: Option<&dyn GmemFactory>,
        progress: Option<&(dyn Fn(usize, u64, u64) + Sync)>,
    ) -> Result<Self, BuildError> {
        let backings =
            zone_backings(&layout, progress, |z, pieces, zp| Backing::create(&z.backend, z.size, pieces, gmem, zp))?;
        Self::from_backings(layout, backings)
    }

    /// Builds guest memory from the zone fds another Mosaic process created for
    /// `layout` and handed over (live update): one fd per zone, in zone order. Every
    /// fd is checked against its zone ([`Backing::adopt`]); nothing is allocated or
    /// written, and all pages start shared until [`GuestMemory::restore_attrs`].
    pub fn adopt(
        layout: MemoryLayout,
        fds: Vec<std::os::fd::OwnedFd>,
        progress: Option<&(dyn Fn(usize, u64, u64) + Sync)>,
    ) -> Result<Self, BuildError> {
        if fds.len() != layout.zones().len() {
            return Err(BuildError::ZoneFds { fds: fds.len(), zones: layout.zones().len() });
        }
        let mut fds = fds.into_iter();
        let backings = zone_backings(&layout, progress, |z, pieces, zp| {
            // One fd per zone: checked above.
            let fd = fds.next().ok_or_else(|| crate::backend::BackendError::Adopt {
                kind: z.backend.kind,
                reason: "no fd was handed over for it".into(),
            })?;
            Backing::adopt(&z.backend, z.size, pieces, fd, zp)
        })?;
        Self::from_backings(layout, backings)
    }

    fn from_backings(layout: MemoryLayout, backings: Vec<Backing>) -> Result<Self, BuildError> {
        let mut regions = Vec::new();
        let (mut view_regions, mut kvm_regions, mut views) = (Vec::new(), Vec::new(), Vec::new());
        let mut piece = vec![0usize; backings.len()];
        for r in layout.regions() {
            let b = &backings[r.zone];
            let m = &b.mappings()[piece[r.zone]];
            piece[r.zone] += 1;
            let host_addr = m.addr();
            let gmem_fd = match b.spec().kind {
                BackendKind::Gmem => b.fd().map(|f| f.as_raw_fd()),
                _ => None,
            };
            regions.push(GuestRegion {
                gpa: r.gpa,
                size: r.size,
                host_addr,
                zone: r.zone,
                kind: b.spec().kind,
                page_size: b.spec().page_size(),
                fd_offset: r.zone_offset,
                gmem_fd,
            });
            let len = r.size as usize;
            let view = match b.fd() {
                Some(fd) => Some(
                    crate::mapping::Mapping::shared(fd, r.zone_offset, len, b.spec().placement_align() as usize)
                        .map_err(|source| BuildError::View { zone: r.zone, source })?,
                ),
                None => None,
            };
            let (vaddr, vprot, vflags) = match &view {
                Some(v) => (v.addr(), v.prot(), v.flags()),
                None => (host_addr, m.prot(), m.flags()),
            };
            views.push(view);
            // SAFETY: [vaddr, vaddr+len) is the region's live view (or, without an fd,
            // its only mapping) and [host_addr, host_addr+len) its KVM mapping, both made
            // with the prot and flags passed; `views` and `backings` outlive the
            // vm-memory collections (field order above).
            let (vm, km) = unsafe {
                (
                    MmapRegion::build_raw(vaddr as *mut u8, len, vprot, vflags).map_err(BuildError::Regions)?,
                    MmapRegion::build_raw(host_addr as *mut u8, len, m.prot(), m.flags())
                        .map_err(BuildError::Regions)?,
                )
            };
            let no_region = || BuildError::Collection(vm_memory::GuestRegionCollectionError::NoMemoryRegion);
            view_regions.push(GuestRegionMmap::new(vm, GuestAddress(r.gpa)).ok_or_else(no_region)?);
            kvm_regions.push(GuestRegionMmap::new(km, GuestAddress(r.gpa)).ok_or_else(no_region)?);
        }
        let mem = Mem::from_regions(view_regions).map_err(BuildError::Collection)?;
        let kvm_mem = Mem::from_regions(kvm_regions).map_err(BuildError::Collection)?;
        let ram: Vec<(u64, u64)> = regions.iter().map(|r| (r.gpa, r.size)).collect();
        let attrs = RwLock::new(Attributes::new(&ram, PageState::Shared));
        Ok(GuestMemory {
            kernel: std::sync::OnceLock::new(),
            mem,
            kvm_mem,
            views,
            view_trusted: std::sync::atomic::AtomicBool::new(true),
            attrs,
            conv_stats: ConvStats::default(),
            first_conversion: std::sync::Once::new(),
            before_first_conversion: std::sync::OnceLock::new(),
            regions,
            layout,
            backings,
        })
    }

    /// The layout this memory was built from.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// The RAM ranges, sorted by address, with their host addresses.
    pub fn regions(&self) -> &[GuestRegion] {
        &self.regions
    }

    /// Drops this process's page-table entries for all fd-backed guest RAM, `step`
    /// bytes at a time (at least the backing's page size), calling `between` after
    /// each step; the data stays in the shared backings. For a process that has handed
    /// its guest to another (live update) and is about to exit: its exit then frees
    /// empty page tables, and KVM tears down a VM with nothing mapped, instead of
    /// holding a CPU unpreempted for milliseconds (for a 1 GiB memfd guest, 256 Ki
    /// entries each) while the guest's new process wants it. Guest memory read here
    /// afterwards would only refault.
    pub fn release_pages(&self, step: usize, between: &mut dyn FnMut()) {
        for b in self.backings.iter().filter(|b| b.fd().is_some()) {
            let step = step.max(b.spec().page_size() as usize);
            for m in b.mappings() {
                let _ = m.release_pages(step, between);
            }
        }
        for (r, view) in self.regions.iter().zip(&self.views) {
            if let Some(v) = view {
                let _ = v.release_pages(step.max(r.page_size as usize), between);
            }
        }
    }

    /// The backing fd of zone `zone`, if its kind has one.
    pub fn zone_fd(&self, zone: usize) -> Option<BorrowedFd<'_>> {
        self.backings.get(zone).and_then(Backing::fd)
    }

    /// Checks that `[gpa, gpa+len)` is guest RAM the VMM may access.
    pub fn check(&self, gpa: u64, len: u64) -> Result<(), AccessError> {
        let end = gpa.checked_add(len).ok_or(AccessError::Overflow { gpa, len })?;
        if MemoryLayout::touches_hole(gpa, len) {
            return Err(AccessError::MmioHole { gpa, len });
        }
        // Ranges may span adjacent regions; walk them.
        let mut at = gpa;
        while at < end {
            let r = self
                .regions
                .iter()
                .find(|r| r.gpa <= at && at < r.gpa + r.size)
                .ok_or(AccessError::OutOfRange { gpa, len })?;
            at = r.gpa + r.size;
        }
        Ok(())
    }

    fn attrs(&self) -> RwLockReadGuard<'_, Attributes> {
        // A poisoned lock only means a panic elsewhere; the attributes themselves are
        // always consistent (every change is validated before it is made).
        self.attrs.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks that `[gpa, gpa+len)` is guest RAM and entirely shared; returns the
    /// attribute guard, held for the duration of the access so that no conversion
    /// can run halfway through it.
    fn check_shared(&self, gpa: u64, len: u64) -> Result<RwLockReadGuard<'_, Attributes>, AccessError> {
        self.check(gpa, len)?;
        let attrs = self.attrs();
        if let Some(page) = attrs.first_not(gpa, len, PageState::Shared) {
            return Err(AccessError::Private { gpa, len, page });
        }
        Ok(attrs)
    }

    /// The mapping accessor reads and writes go through: the VMM view, unless its
    /// protection could not be kept in step.
    fn access_mem(&self) -> &Mem {
        if self.view_trusted.load(std::sync::atomic::Ordering::Acquire) {
            &self.mem
        } else {
            &self.kvm_mem
        }
    }

    /// Whether the VMM view's protection still follows the attributes.
    pub fn view_trusted(&self) -> bool {
        self.view_trusted.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Reads `buf.len()` bytes at `gpa`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        let _attrs = self.check_shared(gpa, buf.len() as u64)?;
        self.access_mem().read_slice(buf, GuestAddress(gpa)).map_err(|source| AccessError::Memory { gpa, source })
    }

    /// Writes `buf` at `gpa`.
    pub fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), AccessError> {
        let _attrs = self.check_shared(gpa, buf.len() as u64)?;
        self.access_mem().write_slice(buf, GuestAddress(gpa)).map_err(|source| AccessError::Memory { gpa, source })
    }

    /// Bytes of guest RAM that are private, and shared.
    pub fn private_shared_bytes(&self) -> (u64, u64) {
        let a = self.attrs();
        (a.private_bytes(), a.shared_bytes())
    }

    /// Naturally aligned `block`-sized ranges that hold both private and shared pages.
    pub fn mixed_blocks(&self, block: u64) -> u64 {
        self.attrs().mixed_blocks(block)
    }

    /// Whether the page holding `gpa` is private (`None` outside RAM).
    pub fn state_of(&self, gpa: u64) -> Option<PageState> {
        self.attrs().state_of(gpa)
    }

    /// Runs a conversion: checks the whole request first (nothing changes on error),
    /// scrubs the pages that change state when the mode is ZERO (with stores, so huge
    /// pages stay huge), then flips their state. Holds the attribute lock for writing
    /// throughout, so VMM accesses see the range wholly before or after. Returns the
    /// number of pages that changed state.
    pub fn convert(&self, req: &ConvRequest) -> Result<u64, ConvError> {
        self.first_conversion.call_once(|| {
            if let Some(observe) = self.before_first_conversion.get() {
                (observe.0)();
            }
        });
        let start = std::time::Instant::now();
        let r = self.convert_locked(req);
        match r {
            Ok(_) => {
                self.conv_stats.record(req.pages, req.mode, start.elapsed().as_nanos().try_into().unwrap_or(u64::MAX))
            }
            Err(_) => self.conv_stats.record_failure(),
        }
        r
    }

    /// Switches this memory to the kernel engine (before any page is private and
    /// before the memslots are registered: they need the private guest_memfds). Refused
    /// if pages are private already, the engine does not have one guest_memfd per
    /// zone, or an engine is set.
    pub fn set_kernel_engine(&self, engine: crate::engine::KernelEngine) -> Result<(), ConvError> {
        if engine.zones() != self.layout.zones().len() || self.attrs().private_bytes() > 0 {
            return Err(ConvError::Unsupported);
        }
        self.kernel.set(engine).map_err(|_| ConvError::Unsupported)
    }

    /// The engine in use.
    pub fn engine(&self) -> crate::engine::EngineKind {
        match self.kernel.get() {
            Some(_) => crate::engine::EngineKind::Kernel,
            None => crate::engine::EngineKind::Userspace,
        }
    }

    /// The kernel engine's private guest_memfd for region `index` (for its memslot),
    /// with the region's offset in it.
    pub fn private_memfd(&self, index: usize) -> Option<(RawFd, u64)> {
        let r = self.regions.get(index)?;
        self.kernel.get()?.private_fd(r.zone).map(|fd| (fd.as_raw_fd(), r.fd_offset))
    }

    /// Kernel engine: tells KVM the new attribute of `[gpa, gpa+len)` and discards the
    /// private copies of the `changing` ranges.
    fn kernel_convert(
        &self,
        k: &crate::engine::KernelEngine,
        gpa: u64,
        len: u64,
        target: PageState,
        changing: &[(u64, u64)],
    ) -> Result<(), ConvError> {
        k.set_private(gpa, len, target == PageState::Private).map_err(|_| ConvError::Unsupported)?;
        for &(g, l) in changing {
            for r in self.regions.iter().filter(|r| r.gpa < g + l && g < r.gpa + r.size) {
                let (s, e) = (g.max(r.gpa), (g + l).min(r.gpa + r.size));
                // Best effort: a hole that could not be punched still holds the old
                // private bytes; KVM has switched the page either way.
                let _ = k.discard(r.zone, r.fd_offset + (s - r.gpa), e - s);
            }
        }
        Ok(())
    }

    /// Sets what runs once, just before the first conversion (the VMM snapshots KVM's
    /// huge-mapping coverage there, to compare with the coverage after). Only the
    /// first call takes effect.
    pub fn observe_first_conversion(&self, f: Box<dyn Fn() + Send + Sync>) {
        let _ = self.before_first_conversion.set(Observer(f));
    }

    /// Counts a request refused before it reached [`GuestMemory::convert`] (decoding).
    pub fn note_refused_conversion(&self) {
        self.conv_stats.record_failure();
    }

    /// Conversion counters and latencies so far.
    pub fn conversion_stats(&self) -> ConvStatsSnapshot {
        self.conv_stats.snapshot()
    }

    fn convert_locked(&self, req: &ConvRequest) -> Result<u64, ConvError> {
        let len = req.len().ok_or(ConvError::Range)?;
        self.check(req.gpa, len).map_err(|_| ConvError::Range)?;
        let mut attrs = self.attrs.write().unwrap_or_else(|e| e.into_inner());
        attrs.check(req.gpa, len).map_err(|e| match e {
            AttrError::Unaligned { .. } | AttrError::Empty => ConvError::Invalid,
            _ => ConvError::Range,
        })?;
        if req.target == PageState::Private && self.touches_fdless(req.gpa, len) {
            // Private pages need a view that can hide them: anonymous memory has none.
            return Err(ConvError::Unsupported);
        }
        let kernel = self.kernel.get();
        if kernel.is_some() && req.mode == ContentMode::Preserve {
            // Private bytes live in a guest_memfd nobody can map: they cannot move.
            return Err(ConvError::Unsupported);
        }
        let before: Vec<(u64, u64)> = attrs.private_ranges_in(req.gpa, len).collect();
        let mixed_before = mixed_per_block(&attrs, req.gpa, len);
        let changing = changing_ranges(&before, req.gpa, len, req.target);
        let scrub = match (req.mode, kernel) {
            // The kernel engine scrubs the shared side only when pages become shared
            // (private ones read from the guest_memfd, which is discarded instead).
            (ContentMode::Zero, Some(_)) if req.target == PageState::Private => Vec::new(),
            (ContentMode::Zero, _) => changing.clone(),
            (ContentMode::Preserve, _) => Vec::new(),
        };
        let changed = attrs.set(req.gpa, len, req.target).map_err(|_| ConvError::Range)?;
        if attrs.private_range_count() > MAX_PRIVATE_RANGES {
            // Each private island costs the view up to two memory areas (a process has
            // ~65,530): undo, exactly, and refuse.
            restore_private(&mut attrs, req.gpa, len, &before);
            return Err(ConvError::Unsupported);
        }
        if let Some(k) = kernel {
            if let Err(e) = self.kernel_convert(k, req.gpa, len, req.target, &changing) {
                restore_private(&mut attrs, req.gpa, len, &before);
                return Err(e);
            }
        }
        let mixed_after = mixed_per_block(&attrs, req.gpa, len);
        for (i, (was, now)) in mixed_before.iter().zip(&mixed_after).enumerate() {
            let (mut became_mixed, mut became_uniform) = (0, 0);
            for (a, b) in was.iter().zip(now) {
                match (a, b) {
                    (false, true) => became_mixed += 1,
                    (true, false) => became_uniform += 1,
                    _ => {}
                }
            }
            self.conv_stats.record_blocks(i, became_mixed, became_uniform);
        }
        for (gpa, n) in scrub {
            self.scrub(gpa, n).map_err(|_| ConvError::Range)?;
        }
        self.reprotect(&attrs, req.gpa, len);
        Ok(changed)
    }

    fn touches_fdless(&self, gpa: u64, len: u64) -> bool {
        self.regions
            .iter()
            .zip(&self.views)
            .any(|(r, v)| v.is_none() && r.gpa < gpa.saturating_add(len) && gpa < r.gpa + r.size)
    }

    /// Brings the VMM view's protection of `[gpa, gpa+len)` in line with the
    /// attributes: whole protection granules (4 KiB, or the backing's huge page) that
    /// are entirely private become PROT_NONE, the rest read/write. If mprotect fails
    /// (out of memory areas), the view is no longer trusted and accesses go through
    /// the KVM mapping, checked by the attributes alone.
    fn reprotect(&self, attrs: &Attributes, gpa: u64, len: u64) {
        if let Err(e) = self.try_reprotect(attrs, gpa, len) {
            if self.view_trusted.swap(false, std::sync::atomic::Ordering::AcqRel) {
                eprintln!("mosaic: cannot keep the VMM view's protection ({e}); private pages are now guarded by the accessor check alone");
            }
        }
    }

    fn try_reprotect(&self, attrs: &Attributes, gpa: u64, len: u64) -> std::io::Result<()> {
        let end = gpa.saturating_add(len);
        for (r, view) in self.regions.iter().zip(&self.views) {
            let Some(view) = view else { continue };
            let gran = r.page_size.max(crate::PAGE_4K);
            let (lo, hi) = (gpa.max(r.gpa), end.min(r.gpa + r.size));
            if lo >= hi {
                continue;
            }
            // Expand to whole granules, inside the region.
            let lo = (lo / gran * gran).max(r.gpa);
            let hi = hi.div_ceil(gran).saturating_mul(gran).min(r.gpa + r.size);
            let rw = libc::PROT_READ | libc::PROT_WRITE;
            view.protect((lo - r.gpa) as usize, (hi - lo) as usize, rw)?;
            for (pg, pl) in attrs.private_ranges_in(lo, hi - lo) {
                let (s, e) = (pg.max(lo), (pg + pl).min(hi));
                // Only granules wholly private are hidden.
                let (s, e) = (s.div_ceil(gran) * gran, e / gran * gran);
                if s < e {
                    view.protect((s - r.gpa) as usize, (e - s) as usize, libc::PROT_NONE)?;
                }
            }
        }
        Ok(())
    }

    /// The page attributes, for the state a live update hands over.
    pub fn attr_state(&self) -> crate::attrs::AttrState {
        self.attrs().to_state()
    }

    /// Replaces the page attributes with `state` (handed over by a live update) and
    /// protects the VMM view to match. Refused, with nothing changed, if `state` does
    /// not describe this memory's RAM.
    pub fn restore_attrs(&self, state: &crate::attrs::AttrState) -> Result<(), AttrError> {
        let ram: Vec<(u64, u64)> = self.regions.iter().map(|r| (r.gpa, r.size)).collect();
        let restored = Attributes::from_state(state, &ram)?;
        let mut attrs = self.attrs.write().unwrap_or_else(|e| e.into_inner());
        *attrs = restored;
        let (start, end) = (ram.first().map_or(0, |r| r.0), ram.last().map_or(0, |r| r.0 + r.1));
        self.reprotect(&attrs, start, end - start);
        Ok(())
    }

    /// Makes `[gpa, gpa+len)` private without touching its contents (the initial
    /// state of `private=on` zones, applied after the VMM has loaded the guest).
    pub fn make_private(&self, gpa: u64, len: u64) -> Result<u64, AttrError> {
        let mut attrs = self.attrs.write().unwrap_or_else(|e| e.into_inner());
        let before: Vec<(u64, u64)> = attrs.private_ranges_in(gpa, len).collect();
        let changed = attrs.set(gpa, len, PageState::Private)?;
        if let Some(k) = self.kernel.get() {
            if let Err(e) = k.set_private(gpa, len, true) {
                restore_private(&mut attrs, gpa, len, &before);
                return Err(AttrError::Kernel(e.to_string()));
            }
        }
        self.reprotect(&attrs, gpa, len);
        Ok(changed)
    }

    /// The VMM view's host address of `gpa` (tests: the view's protection is visible
    /// in /proc/self/maps). `None` outside RAM or for regions without a view.
    pub fn view_addr(&self, gpa: u64) -> Option<u64> {
        self.regions
            .iter()
            .zip(&self.views)
            .find(|(r, _)| r.gpa <= gpa && gpa < r.gpa + r.size)
            .and_then(|(r, v)| v.as_ref().map(|v| v.addr() + (gpa - r.gpa)))
    }

    /// Zeros guest RAM with stores, whatever its state (the conversion engine's own
    /// scrub; callers hold the attribute write lock).
    fn scrub(&self, gpa: u64, len: u64) -> Result<(), AccessError> {
        write_zeros(&self.kvm_mem, gpa, len)
    }

    /// Reads a plain-data value at `gpa`.
    pub fn read_obj<T: ByteValued>(&self, gpa: u64) -> Result<T, AccessError> {
        let mut v = T::zeroed();
        self.read(gpa, v.as_mut_slice())?;
        Ok(v)
    }

    /// Writes a plain-data value at `gpa`.
    pub fn write_obj<T: ByteValued>(&self, gpa: u64, val: &T) -> Result<(), AccessError> {
        self.write(gpa, val.as_slice())
    }

    /// Fills `[gpa, gpa+len)` with zeros (all of it, or nothing if the range is not
    /// entirely shared guest RAM).
    pub fn zero(&self, gpa: u64, len: u64) -> Result<(), AccessError> {
        let _attrs = self.check_shared(gpa, len)?;
        write_zeros(self.access_mem(), gpa, len)
    }

    /// The VMM view's host range for region `index` (`None` without a view).
    pub fn view_range(&self, index: usize) -> Option<(u64, u64)> {
        self.views.get(index)?.as_ref().map(|v| (v.addr(), v.addr() + v.len() as u64))
    }

    /// vm-memory's view, for boot loaders (linux-loader) that take a
    /// `GuestMemoryBackend`. Loaders run before any vCPU does and write only the
    /// images they load; everything else goes through the checked methods above.
    /// Refused once any page is private: this road has no private-page check.
    pub fn loader_view(&self) -> Result<&GuestMemoryMmap<()>, AccessError> {
        if self.attrs().private_bytes() > 0 {
            return Err(AccessError::LoaderAfterPrivate);
        }
        Ok(&self.mem)
    }
}

/// Most private ranges a VM may have (each costs the VMM view up to two memory
/// areas; Linux allows a process about 65,530).
pub const MAX_PRIVATE_RANGES: usize = 16_384;

/// Writes zeros over `[gpa, gpa+len)` of `mem`, 4 KiB at a time.
fn write_zeros(mem: &Mem, gpa: u64, len: u64) -> Result<(), AccessError> {
    let zeros = [0u8; 4096];
    let mut at = gpa;
    while at < gpa + len {
        let n = (gpa + len - at).min(zeros.len() as u64) as usize;
        mem.write_slice(&zeros[..n], GuestAddress(at)).map_err(|source| AccessError::Memory { gpa: at, source })?;
        at += n as u64;
    }
    Ok(())
}

/// The parts of `[gpa, gpa+len)` not already in `target`, as `(gpa, len)` ranges,
/// given the private intervals that overlap it (`Attributes::private_ranges_in`).
fn changing_ranges(private: &[(u64, u64)], gpa: u64, len: u64, target: PageState) -> Vec<(u64, u64)> {
    let end = gpa + len;
    let clipped = private.iter().map(|&(g, l)| (g.max(gpa), (g + l).min(end)));
    match target {
        PageState::Shared => clipped.map(|(s, e)| (s, e - s)).collect(),
        PageState::Private => {
            let mut out = Vec::new();
            let mut at = gpa;
            for (s, e) in clipped {
                if s > at {
                    out.push((at, s - at));
                }
                at = e;
            }
            if at < end {
                out.push((at, end - at));
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendSpec;
    use crate::layout::ZoneSpec;

    fn mem(kind: BackendKind, sizes: &[u64]) -> GuestMemory {
        let zones = sizes.iter().map(|&size| ZoneSpec { size, backend: BackendSpec::new(kind) }).collect();
        GuestMemory::new(MemoryLayout::place(zones).unwrap(), None, None).unwrap()
    }

    #[test]
    fn reads_back_what_was_written_across_zones() {
        let m = mem(BackendKind::Memfd, &[2 << 20, 2 << 20]);
        let data: Vec<u8> = (0..8192u32).map(|i| i as u8).collect();
        let at = (2 << 20) - 4096;
        m.write(at, &data).unwrap();
        let mut back = vec![0; 8192];
        m.read(at, &mut back).unwrap();
        assert_eq!(back, data);
        m.write_obj(16, &0xdead_beef_u64).unwrap();
        assert_eq!(m.read_obj::<u64>(16).unwrap(), 0xdead_beef);
        m.zero(at, 8192).unwrap();
        m.read(at, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 0));
    }

    #[test]
    fn bad_ranges_are_errors_not_panics() {
        let m = mem(BackendKind::Anon, &[4 << 20]);
        let mut b = [0u8; 16];
        assert!(matches!(m.read(4 << 20, &mut b), Err(AccessError::OutOfRange { .. })));
        assert!(matches!(m.read((4 << 20) - 8, &mut b), Err(AccessError::OutOfRange { .. })));
        assert!(matches!(m.read(u64::MAX - 4, &mut b), Err(AccessError::Overflow { .. })));
        assert!(matches!(m.write(0xC000_0000, &b), Err(AccessError::MmioHole { .. })));
        assert!(matches!(m.check(0xBFFF_FFF8, 16), Err(AccessError::MmioHole { .. })));
    }

    #[test]
    fn private_pages_are_refused_and_conversions_zero_or_preserve() {
        use crate::convert::decode_port;
        let m = mem(BackendKind::Memfd, &[4 << 20]);
        let p = 0x10_0000;
        m.write(p, &[7u8; 8192]).unwrap();
        assert_eq!(m.convert(&decode_port(p, 2, 1 | 2).unwrap()), Ok(2), "private, preserve");
        let mut b = [0u8; 16];
        assert!(matches!(m.read(p + 4096, &mut b), Err(AccessError::Private { page, .. }) if page == p + 4096));
        assert!(matches!(m.write(p - 8, &b), Err(AccessError::Private { page, .. }) if page == p));
        assert!(m.read(p - 16, &mut b).is_ok(), "the shared neighbour still works");
        assert_eq!(m.private_shared_bytes(), (8192, (4 << 20) - 8192));
        assert_eq!(m.mixed_blocks(2 << 20), 1);
        // Preserve back to shared keeps the data; zero scrubs.
        assert_eq!(m.convert(&decode_port(p, 1, 2).unwrap()), Ok(1));
        m.read(p, &mut b).unwrap();
        assert_eq!(b, [7u8; 16]);
        assert_eq!(m.convert(&decode_port(p, 2, 0).unwrap()), Ok(1), "only the private page changes");
        m.read(p, &mut b).unwrap();
        assert_eq!(b, [7u8; 16], "pages already shared are not scrubbed");
        m.read(p + 4096, &mut b).unwrap();
        assert_eq!(b, [0u8; 16], "the converted page reads zeros");
        // Bad requests change nothing.
        assert_eq!(m.convert(&decode_port(p, 1 << 20, 1).unwrap()), Err(ConvError::Range));
        assert_eq!(m.convert(&decode_port(0xC000_0000, 1, 1).unwrap()), Err(ConvError::Range));
        assert_eq!(m.private_shared_bytes().0, 0);
    }

    /// The protection of the VMA holding `addr`, from /proc/self/maps ("rw-s", "---s").
    fn prot_at(addr: u64) -> String {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        for l in maps.lines() {
            let mut f = l.split_whitespace();
            let (range, perms) = (f.next().unwrap(), f.next().unwrap());
            let (a, b) = range.split_once('-').unwrap();
            let (a, b) = (u64::from_str_radix(a, 16).unwrap(), u64::from_str_radix(b, 16).unwrap());
            if a <= addr && addr < b {
                return perms.to_string();
            }
        }
        panic!("{addr:#x} not mapped");
    }

    #[test]
    fn private_pages_are_not_mapped_in_the_vmm_view() {
        use crate::convert::decode_port;
        let m = mem(BackendKind::Memfd, &[4 << 20]);
        let p = 0x10_0000;
        assert_eq!(prot_at(m.view_addr(p).unwrap()), "rw-s");
        m.convert(&decode_port(p, 1, 1).unwrap()).unwrap();
        assert_eq!(prot_at(m.view_addr(p).unwrap()), "---s");
        assert_eq!(prot_at(m.view_addr(p + 4096).unwrap()), "rw-s", "the neighbour stays mapped");
        // The KVM mapping (the memslot) is untouched.
        assert_eq!(prot_at(m.regions()[0].host_addr + p), "rw-s");
        m.convert(&decode_port(p, 1, 0).unwrap()).unwrap();
        assert_eq!(prot_at(m.view_addr(p).unwrap()), "rw-s");
        m.make_private(0x20_0000, 0x20_0000).unwrap();
        assert_eq!(prot_at(m.view_addr(0x30_0000).unwrap()), "---s");
        assert!(m.view_trusted());
        assert!(matches!(m.loader_view(), Err(AccessError::LoaderAfterPrivate)));
        // Anonymous memory has no view: it cannot become private.
        let a = mem(BackendKind::Anon, &[4 << 20]);
        assert_eq!(a.convert(&decode_port(p, 1, 1).unwrap()), Err(ConvError::Unsupported));
        assert!(a.view_addr(p).is_none());
    }

    #[test]
    fn private_ranges_are_capped_below_the_memory_area_limit() {
        use crate::convert::decode_port;
        let m = mem(BackendKind::Memfd, &[256 << 20]);
        for i in 0..MAX_PRIVATE_RANGES as u64 {
            assert_eq!(m.convert(&decode_port(0x10_0000 + 2 * i * 4096, 1, 1).unwrap()), Ok(1));
        }
        let next = 0x10_0000 + 2 * MAX_PRIVATE_RANGES as u64 * 4096;
        assert_eq!(m.convert(&decode_port(next, 1, 1).unwrap()), Err(ConvError::Unsupported));
        assert!(m.view_trusted(), "the view kept up");
        // Converting back to shared works and reads go through the view again.
        assert_eq!(m.convert(&decode_port(0x10_0000, 1, 0).unwrap()), Ok(1));
        m.read(0x10_0000, &mut [0u8; 8]).unwrap();
    }

    #[test]
    fn conversions_count_huge_blocks_made_mixed_and_uniform_again() {
        use crate::convert::decode_port;
        let m = mem(BackendKind::Memfd, &[8 << 20]);
        let blocks = |m: &GuestMemory| {
            let s = m.conversion_stats();
            (s.blocks_2m.became_mixed, s.blocks_2m.became_uniform, s.blocks_1g.became_mixed, s.blocks_1g.became_uniform)
        };
        // One 4K page private in the second 2 MiB block: that block and the 1 GiB
        // block holding everything become mixed.
        m.convert(&decode_port(0x20_0000, 1, 1).unwrap()).unwrap();
        assert_eq!(blocks(&m), (1, 0, 1, 0));
        // A neighbour too: nothing new.
        m.convert(&decode_port(0x20_1000, 1, 1).unwrap()).unwrap();
        assert_eq!(blocks(&m), (1, 0, 1, 0));
        // The whole 2 MiB block private: uniform again (the 1 GiB block stays mixed).
        m.convert(&decode_port(0x20_0000, 512, 1).unwrap()).unwrap();
        assert_eq!(blocks(&m), (1, 1, 1, 0));
        // A range over two 2 MiB blocks, half of each: both mixed.
        m.convert(&decode_port(0x50_0000, 512, 1).unwrap()).unwrap();
        assert_eq!(blocks(&m), (3, 1, 1, 0));
        // Everything shared again: the three mixed ones are uniform, and so is the GiB.
        m.convert(&decode_port(0, 2048, 0).unwrap()).unwrap();
        assert_eq!(blocks(&m), (3, 3, 1, 1));
        assert_eq!(m.mixed_blocks(crate::PAGE_2M), 0);
    }

    /// KVM's attributes as a kernel-engine test sees them: every call, and a switch
    /// that makes the next one fail.
    #[derive(Default)]
    struct FakeKvm {
        calls: std::sync::Mutex<Vec<(u64, u64, bool)>>,
        fail: std::sync::atomic::AtomicBool,
    }

    impl crate::engine::KernelAttributes for std::sync::Arc<FakeKvm> {
        fn set_private(&self, gpa: u64, len: u64, private: bool) -> std::io::Result<()> {
            if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
            }
            self.calls.lock().unwrap().push((gpa, len, private));
            Ok(())
        }
    }

    /// A memfd standing in for a zone's private guest_memfd (it punches the same way).
    fn private_memfd(size: u64) -> std::os::fd::OwnedFd {
        crate::backend::tests_memfd(size)
    }

    fn read_fd(fd: &std::os::fd::OwnedFd, offset: u64, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::from(fd.try_clone().unwrap());
        let mut b = vec![0; len];
        f.read_exact_at(&mut b, offset).unwrap();
        b
    }

    #[test]
    fn the_kernel_engine_flips_kvm_attributes_and_discards_private_copies() {
        use crate::convert::decode_port;
        use std::os::unix::fs::FileExt;
        let m = mem(BackendKind::Memfd, &[4 << 20]);
        let kvm = std::sync::Arc::new(FakeKvm::default());
        let private = private_memfd(4 << 20);
        // Old private bytes in the guest_memfd at 1 MiB.
        std::fs::File::from(private.try_clone().unwrap()).write_all_at(&[0xab; 4096], 0x10_0000).unwrap();
        let engine = crate::engine::KernelEngine::new(Box::new(kvm.clone()), vec![private.try_clone().unwrap()]);
        m.set_kernel_engine(engine).unwrap();
        assert_eq!(m.engine(), crate::engine::EngineKind::Kernel);
        assert!(m.private_memfd(0).is_some());
        // PRESERVE is refused, with nothing changed.
        assert_eq!(m.convert(&decode_port(0x10_0000, 1, 1 | 2).unwrap()), Err(ConvError::Unsupported));
        assert!(kvm.calls.lock().unwrap().is_empty());
        assert_eq!(m.state_of(0x10_0000), Some(PageState::Shared));
        // ZERO to private: KVM told, the private copy discarded (reads as zeros).
        m.write(0x10_0000, &[0x5a; 4096]).unwrap();
        assert_eq!(m.convert(&decode_port(0x10_0000, 1, 1).unwrap()), Ok(1));
        assert_eq!(kvm.calls.lock().unwrap().as_slice(), &[(0x10_0000, 4096, true)]);
        assert_eq!(read_fd(&private, 0x10_0000, 4096), vec![0; 4096]);
        assert_eq!(m.state_of(0x10_0000), Some(PageState::Private));
        // Back to shared with ZERO: the shared side is scrubbed too.
        assert_eq!(m.convert(&decode_port(0x10_0000, 1, 0).unwrap()), Ok(1));
        let mut b = [1u8; 4096];
        m.read(0x10_0000, &mut b).unwrap();
        assert_eq!(b, [0; 4096]);
        assert_eq!(kvm.calls.lock().unwrap().last(), Some(&(0x10_0000, 4096, false)));
        // KVM refuses: the tracker is put back, the guest gets UNSUPPORTED.
        kvm.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(m.convert(&decode_port(0x20_0000, 16, 1).unwrap()), Err(ConvError::Unsupported));
        assert_eq!(m.state_of(0x20_0000), Some(PageState::Shared));
        assert_eq!(m.private_shared_bytes().0, 0);
        assert!(matches!(m.make_private(0x20_0000, 4096), Err(AttrError::Kernel(_))));
        assert_eq!(m.state_of(0x20_0000), Some(PageState::Shared));
        // Only one engine, set before anything is private.
        let again = crate::engine::KernelEngine::new(Box::new(kvm.clone()), vec![private_memfd(4 << 20)]);
        assert!(m.set_kernel_engine(again).is_err());
    }

    #[test]
    fn changing_ranges_are_the_complement() {
        let mut a = Attributes::new(&[(0, 1 << 20)], PageState::Shared);
        a.set(0x2000, 0x2000, PageState::Private).unwrap();
        let overlapping = |g, l| a.private_ranges_in(g, l).collect::<Vec<_>>();
        assert_eq!(changing_ranges(&overlapping(0, 0x8000), 0, 0x8000, PageState::Shared), vec![(0x2000, 0x2000)]);
        assert_eq!(
            changing_ranges(&overlapping(0, 0x8000), 0, 0x8000, PageState::Private),
            vec![(0, 0x2000), (0x4000, 0x4000)]
        );
        assert_eq!(changing_ranges(&overlapping(0x3000, 0x1000), 0x3000, 0x1000, PageState::Private), vec![]);
    }

    #[test]
    fn regions_are_congruent_with_their_host_mappings() {
        let m = mem(BackendKind::Memfd, &[2 << 20, 6 << 20]);
        for r in m.regions() {
            assert_eq!(r.gpa % crate::PAGE_2M, r.host_addr % crate::PAGE_2M);
        }
        assert!(m.zone_fd(0).is_some());
        assert!(m.zone_fd(2).is_none());
    }
}
