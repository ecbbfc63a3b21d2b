//! Memory preflight: before anything is built, check that every huge-page zone can
//! have its pages, grow hugetlb pools where `reserve=auto` asks, and apply explicit
//! fallbacks. What each zone asked for and got is recorded for the start-up line and
//! `--stats-json`; nothing falls back silently, and a short pool is an error now
//! rather than a SIGBUS later.

use std::path::{Path, PathBuf};

use guest_mem::{page_label, BackendKind, BackendSpec, Fallback, LayoutError, MemoryLayout, Reserve, ZoneSpec};
use hugepage::{PoolError, ShmemEnabled, ThpEnabled, ThpSettings};
use serde::Serialize;
use thiserror::Error;

/// What to do about a short pool: grow it, or (where reserve=auto already tried, with
/// `auto` saying how that went) free memory; or fall back.
fn short_pool_hint(auto: Option<&str>, fix_total: u64, nr_path: &str) -> String {
    match auto {
        Some(how) => format!(
            "reserve=auto could not grow it further ({how}: the kernel found no more free, unfragmented memory); \
             free some memory, or add fallback=thp|4k"
        ),
        None => format!("run 'echo {fix_total} > {nr_path}' as root, or add reserve=auto or fallback=thp|4k"),
    }
}

/// Errors that stop a run before it starts (exit code 2).
#[derive(Debug, Error)]
pub enum PreflightError {
    /// `--private-engine kernel` on a host whose KVM lacks what it needs.
    #[error("--private-engine kernel: this host's KVM lacks {missing} (mosaic host-check shows what it has); use the userspace engine")]
    Engine {
        /// What is missing.
        missing: String,
    },
    /// The hugetlb pool is short and the zone has no fallback.
    #[error("--memory: zone {zone}: hugetlb {page} needs {needed} free pages, the pool has {available}; {hint}")]
    PoolShort {
        /// Zone index.
        zone: usize,
        /// Page size label.
        page: String,
        /// Pages the zone needs.
        needed: u64,
        /// Pages available to it.
        available: u64,
        /// What to do about it.
        hint: String,
    },
    /// No pool of that page size.
    #[error("--memory: zone {zone}: this host has no hugetlb pool of {page} pages")]
    NoPool {
        /// Zone index.
        zone: usize,
        /// Page size label.
        page: String,
    },
    /// The pool could not be read or grown.
    #[error("--memory: hugetlb {page} pool: {source}")]
    Pool {
        /// Page size label.
        page: String,
        /// Cause.
        #[source]
        source: PoolError,
    },
    /// THP is off where the zone needs it.
    #[error(
        "--memory: zone {zone}: {what} is '{value}' on this host, so {backend} would run on 4K pages; \
         run 'echo {want} > {path}' as root, or add prefault=on (Mosaic then collapses the memory into \
         huge pages with MADV_COLLAPSE), or fallback=4k"
    )]
    ThpOff {
        /// Zone index.
        zone: usize,
        /// Which setting.
        what: &'static str,
        /// Its value.
        value: String,
        /// The value to set.
        want: &'static str,
        /// The sysfs file.
        path: &'static str,
        /// The zone's backend.
        backend: String,
    },
    /// The layout changed by a fallback is invalid.
    #[error("--memory: {0}")]
    Layout(#[from] LayoutError),
}

/// What one zone asked for and what it gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ZoneChoice {
    /// Zone index.
    pub zone: usize,
    /// Backend and page size asked for (`hugetlb 1G`).
    pub asked: String,
    /// Backend and page size used.
    pub got: String,
    /// Page size asked for.
    pub page_size_asked: u64,
    /// Page size used.
    pub page_size_got: u64,
    /// Why it differs, or what was done to get it (pool grown).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Pages this VM added to a hugetlb pool; given back when dropped (after the VM's
/// memory is gone).
#[derive(Debug)]
pub struct PoolReservation {
    root: PathBuf,
    page_size: u64,
    added: u64,
}

/// Pool pages added for a VM, as handed to the next process by a live update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PoolGrant {
    /// Huge page size of the pool.
    pub page_size: u64,
    /// Pages added.
    pub added: u64,
}

impl PoolReservation {
    /// What this reservation holds.
    pub fn grant(&self) -> PoolGrant {
        PoolGrant { page_size: self.page_size, added: self.added }
    }

    /// Takes over pages another process added (live update): they are given back
    /// when this is dropped.
    pub fn adopt(grant: PoolGrant) -> Self {
        PoolReservation { root: PathBuf::from(hugepage::SYSFS_ROOT), page_size: grant.page_size, added: grant.added }
    }

    /// Keeps the pages in the pool (a live update handed them to the next process).
    pub fn disarm(&mut self) {
        self.added = 0;
    }
}

impl Drop for PoolReservation {
    fn drop(&mut self) {
        if self.added == 0 {
            return;
        }
        if let Ok(p) = hugepage::pools::pool_at(&self.root, self.page_size) {
            // The write sets the persistent pages; `total` also counts surplus ones.
            let persistent = p.total.saturating_sub(p.surplus);
            let _ = hugepage::set_pool_size_at(&self.root, self.page_size, persistent.saturating_sub(self.added));
        }
    }
}

/// The outcome of a preflight.
#[derive(Debug)]
pub struct Preflight {
    /// The layout to build (with fallbacks applied).
    pub layout: MemoryLayout,
    /// One entry per zone.
    pub choices: Vec<ZoneChoice>,
    /// Pool pages to give back at exit.
    pub reservations: Vec<PoolReservation>,
}

fn nr_path(root: &Path, page: u64) -> String {
    hugepage::pools::nr_hugepages_path(root, page).display().to_string()
}

/// Checks that KVM offers what the kernel conversion engine needs: private memory
/// attributes, the KVM_X86_SW_PROTECTED_VM type, guest_memfd and
/// KVM_SET_USER_MEMORY_REGION2.
pub fn check_engine(engine: guest_mem::EngineKind, caps: &crate::kvm::caps::Caps) -> Result<(), PreflightError> {
    if engine != guest_mem::EngineKind::Kernel {
        return Ok(());
    }
    let missing: Vec<&str> = [
        (caps.private_attributes(), "KVM_CAP_MEMORY_ATTRIBUTES (private)"),
        (caps.vm_type(kvm_bindings::KVM_X86_SW_PROTECTED_VM), "the KVM_X86_SW_PROTECTED_VM type"),
        (caps.guest_memfd, "KVM_CREATE_GUEST_MEMFD"),
        (caps.user_memory2, "KVM_SET_USER_MEMORY_REGION2"),
    ]
    .into_iter()
    .filter(|(has, _)| !has)
    .map(|(_, what)| what)
    .collect();
    match missing.is_empty() {
        true => Ok(()),
        false => Err(PreflightError::Engine { missing: missing.join(", ") }),
    }
}

/// Runs the preflight against the live host.
pub fn run(layout: &MemoryLayout) -> Result<Preflight, PreflightError> {
    run_at(Path::new(hugepage::SYSFS_ROOT), layout)
}

/// The spec a zone falls back to, if its policy allows one.
fn fallback_spec(spec: &BackendSpec) -> Option<BackendSpec> {
    let kind = match spec.fallback {
        Fallback::Error => return None,
        Fallback::Thp => BackendKind::Thp,
        Fallback::FourK => BackendKind::Memfd,
    };
    let mut s = BackendSpec::new(kind);
    s.prefault = spec.prefault;
    s.private = spec.private;
    // A fallback keeps the zone's fd (live update needs one).
    s.shared = kind == BackendKind::Thp;
    s.fallback = if kind == BackendKind::Thp { Fallback::FourK } else { Fallback::Error };
    Some(s)
}

/// Checks that THP will give `spec` huge pages; `Err` says why not.
fn thp_check(zone: usize, spec: &BackendSpec, thp: &ThpSettings) -> Result<(), PreflightError> {
    if spec.prefault {
        return Ok(()); // MADV_COLLAPSE after prefault ignores the sysfs settings.
    }
    let (what, value, want, path, ok) = if spec.shared {
        let v = thp.effective_shmem(spec.page_size);
        let ok = v.is_some_and(ShmemEnabled::honours_madvise);
        let value = v.map_or("unavailable".into(), |v| v.to_string());
        ("shmem THP", value, "advise", "/sys/kernel/mm/transparent_hugepage/shmem_enabled", ok)
    } else {
        let v = thp.effective_enabled(spec.page_size);
        let ok = v.is_some_and(ThpEnabled::honours_madvise);
        let value = v.map_or("unavailable".into(), |v| v.to_string());
        ("anonymous THP", value, "madvise", "/sys/kernel/mm/transparent_hugepage/enabled", ok)
    };
    if ok {
        Ok(())
    } else {
        Err(PreflightError::ThpOff { zone, what, value, want, path, backend: spec.describe() })
    }
}

/// Runs the preflight with `root` standing for the sysfs mount point.
pub fn run_at(root: &Path, layout: &MemoryLayout) -> Result<Preflight, PreflightError> {
    let mut zones: Vec<ZoneSpec> = layout.zones().to_vec();
    let mut notes: Vec<Option<String>> = vec![None; zones.len()];
    let mut reservations = Vec::new();
    let thp = hugepage::thp_at(root).unwrap_or_default();

    // hugetlb: per page size, zones in order take pages while the pool has them.
    for page in [guest_mem::PAGE_2M, guest_mem::PAGE_1G] {
        let wanted: Vec<usize> = (0..zones.len())
            .filter(|&i| zones[i].backend.kind == BackendKind::Hugetlb && zones[i].backend.page_size == page)
            .collect();
        if wanted.is_empty() {
            continue;
        }
        let label = page_label(page);
        let pool_err = |source| PreflightError::Pool { page: label.clone(), source };
        let pool = match hugepage::pools::pool_at(root, page) {
            Ok(p) => p,
            Err(PoolError::NoSuchPool { .. }) => {
                // Zones with a fallback take it; the first without one is refused.
                for &zone in &wanted {
                    match fallback_spec(&zones[zone].backend) {
                        Some(spec) => {
                            notes[zone] = Some(format!("this host has no hugetlb pool of {label} pages"));
                            zones[zone].backend = spec;
                        }
                        None => return Err(PreflightError::NoPool { zone, page: label }),
                    }
                }
                continue;
            }
            Err(e) => return Err(pool_err(e)),
        };
        let needed: u64 = wanted.iter().map(|&i| zones[i].size / page).sum();
        let available_before = pool.available();
        let mut available = available_before;
        if needed > available && wanted.iter().any(|&i| zones[i].backend.reserve == Reserve::Auto) {
            // `total` counts surplus pages (in use, e.g. by a process a live update left
            // that is still unmapping); the kernel makes them persistent before it
            // allocates. So the pool grows by what is missing, and what is given back
            // at exit includes those pages: they would have been freed when released,
            // and giving back only the fresh pages left them in the pool for good.
            let target = pool.total + (needed - available);
            // A pool that cannot grow (not root, no such pool, no memory) is the same
            // as a short pool: the zones' fallbacks, or the error, follow.
            let (fresh, why) = match hugepage::set_pool_size_at(root, page, target) {
                Ok(got) => (got.saturating_sub(pool.total), None),
                Err(e) => (0, Some(e.to_string())),
            };
            let added = if why.is_none() { fresh + pool.surplus } else { 0 };
            if added > 0 {
                reservations.push(PoolReservation { root: root.to_path_buf(), page_size: page, added });
            }
            available += fresh;
            let note = match why {
                None => format!("pool grown by {fresh} of {} pages asked (reserve=auto)", needed - available_before),
                Some(e) => format!("reserve=auto could not grow the pool: {e}"),
            };
            for &i in &wanted {
                notes[i] = Some(note.clone());
            }
        }
        let mut left = available;
        let mut needed_so_far = 0;
        for &i in &wanted {
            let pages = zones[i].size / page;
            needed_so_far += pages;
            if pages <= left {
                left -= pages;
                continue;
            }
            match fallback_spec(&zones[i].backend) {
                Some(spec) => {
                    let short = format!("hugetlb {label} pool has {left} pages available, {pages} needed");
                    notes[i] = Some(match notes[i].take() {
                        Some(n) => format!("{n}; {short}"),
                        None => short,
                    });
                    zones[i].backend = spec;
                }
                None => {
                    // What the pool must hold, without any growth of ours (which is
                    // given back when this error drops the reservations).
                    let fix_total = pool.total + needed_so_far.saturating_sub(available_before);
                    let auto = (zones[i].backend.reserve == Reserve::Auto).then(|| notes[i].as_deref().unwrap_or(""));
                    let hint = short_pool_hint(auto, fix_total, &nr_path(root, page));
                    return Err(PreflightError::PoolShort {
                        zone: i,
                        page: label,
                        needed: pages,
                        available: left,
                        hint,
                    });
                }
            }
        }
    }

    // THP: the settings must let MADV_HUGEPAGE work (or prefault + collapse).
    for (i, z) in zones.iter_mut().enumerate() {
        if z.backend.kind != BackendKind::Thp {
            continue;
        }
        if let Err(e) = thp_check(i, &z.backend, &thp) {
            match z.backend.fallback {
                Fallback::FourK => {
                    let why = e.to_string();
                    let head = why.split(';').next().unwrap_or(&why);
                    let reason = head.trim_start_matches(&format!("--memory: zone {i}: ")).to_string();
                    notes[i] = Some(match notes[i].take() {
                        Some(n) => format!("{n}; {reason}"),
                        None => reason,
                    });
                    let (prefault, private) = (z.backend.prefault, z.backend.private);
                    z.backend = BackendSpec::new(BackendKind::Memfd);
                    z.backend.prefault = prefault;
                    z.backend.private = private;
                }
                _ => return Err(e),
            }
        }
    }

    let choices = layout
        .zones()
        .iter()
        .zip(&zones)
        .enumerate()
        .map(|(zone, (a, g))| ZoneChoice {
            zone,
            asked: a.backend.describe(),
            got: g.backend.describe(),
            page_size_asked: a.backend.page_size,
            page_size_got: g.backend.page_size,
            note: notes[zone].clone(),
        })
        .collect();
    let layout = MemoryLayout::place(zones)?;
    Ok(Preflight { layout, choices, reservations })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_engine_names_what_the_host_lacks() {
        use crate::kvm::caps::Caps;
        let none = Caps::default();
        assert!(check_engine(guest_mem::EngineKind::Userspace, &none).is_ok());
        let e = check_engine(guest_mem::EngineKind::Kernel, &none).unwrap_err().to_string();
        assert!(e.contains("KVM_CAP_MEMORY_ATTRIBUTES") && e.contains("SW_PROTECTED"), "{e}");
        let all = Caps { memory_attributes: 8, vm_types: 0b11, guest_memfd: true, user_memory2: true, ..none };
        assert!(check_engine(guest_mem::EngineKind::Kernel, &all).is_ok());
        let e = check_engine(guest_mem::EngineKind::Kernel, &Caps { vm_types: 1, ..all }).unwrap_err().to_string();
        assert!(e.contains("SW_PROTECTED") && !e.contains("ATTRIBUTES"), "{e}");
    }
    use guest_mem::{PAGE_1G, PAGE_2M};

    struct Sysfs(PathBuf);
    impl Drop for Sysfs {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A fixture sysfs with a 2M pool of `total`/`free` pages and no 1G pool.
    fn sysfs(total: u64, free: u64, shmem: &str) -> Sysfs {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let root = std::env::temp_dir().join(format!("mosaic-preflight-{}-{n}", std::process::id()));
        let pool = root.join("kernel/mm/hugepages/hugepages-2048kB");
        std::fs::create_dir_all(&pool).unwrap();
        for (f, v) in
            [("nr_hugepages", total), ("free_hugepages", free), ("resv_hugepages", 0), ("surplus_hugepages", 0)]
        {
            std::fs::write(pool.join(f), format!("{v}\n")).unwrap();
        }
        let thp = root.join("kernel/mm/transparent_hugepage");
        std::fs::create_dir_all(&thp).unwrap();
        std::fs::write(thp.join("enabled"), "always [madvise] never\n").unwrap();
        std::fs::write(thp.join("hpage_pmd_size"), "2097152\n").unwrap();
        std::fs::write(thp.join("defrag"), "always defer defer+madvise [madvise] never\n").unwrap();
        std::fs::write(thp.join("shmem_enabled"), format!("{shmem}\n")).unwrap();
        Sysfs(root)
    }

    fn layout(flags: &[&str]) -> MemoryLayout {
        let zones = flags
            .iter()
            .map(|f| crate::config::memory::MemoryConfig::parse_flag(f).unwrap().to_zone().unwrap())
            .collect();
        MemoryLayout::place(zones).unwrap()
    }

    #[test]
    fn enough_pages_means_no_change() {
        let fs = sysfs(512, 512, "always within_size advise [never] deny force");
        let p = run_at(&fs.0, &layout(&["size=1G,backend=hugetlb"])).unwrap();
        assert_eq!(p.choices[0].got, "hugetlb 2M");
        assert_eq!(p.choices[0].note, None);
        assert!(p.reservations.is_empty());
    }

    #[test]
    fn short_pool_is_a_clear_error() {
        let fs = sysfs(100, 100, "never");
        let e = run_at(&fs.0, &layout(&["size=1G,backend=hugetlb"])).unwrap_err().to_string();
        assert!(e.starts_with("--memory: zone 0: hugetlb 2M needs 512 free pages, the pool has 100;"), "{e}");
        assert!(e.contains("echo 512 > ") && e.contains("hugepages-2048kB/nr_hugepages"), "{e}");
        let e = run_at(&fs.0, &layout(&["size=2G,backend=hugetlb,page-size=1G"])).unwrap_err().to_string();
        assert_eq!(e, "--memory: zone 0: this host has no hugetlb pool of 1G pages");
    }

    #[test]
    fn a_pool_reserve_auto_could_not_grow_enough_says_so() {
        let h = short_pool_hint(Some("pool grown by 2596 of 8192 pages asked (reserve=auto)"), 9000, "/sys/x");
        assert!(h.contains("reserve=auto could not grow it further (pool grown by 2596 of 8192"), "{h}");
        assert!(h.contains("fallback=thp|4k") && !h.contains("add reserve=auto") && !h.contains("echo"), "{h}");
        let h = short_pool_hint(None, 9000, "/sys/x");
        assert_eq!(h, "run 'echo 9000 > /sys/x' as root, or add reserve=auto or fallback=thp|4k");
    }

    #[test]
    fn fallbacks_are_explicit_and_recorded() {
        let fs = sysfs(100, 100, "always within_size [advise] never deny force");
        let p = run_at(&fs.0, &layout(&["size=1G,backend=hugetlb,fallback=thp"])).unwrap();
        assert_eq!(p.choices[0].asked, "hugetlb 2M");
        assert_eq!(p.choices[0].got, "thp shared");
        assert!(p.choices[0].note.as_deref().unwrap().contains("100 pages available, 512 needed"));
        let p = run_at(&fs.0, &layout(&["size=2G,backend=hugetlb,page-size=1G,fallback=4k"])).unwrap();
        assert_eq!((p.choices[0].got.as_str(), p.choices[0].page_size_got), ("memfd", 4096));
        assert_eq!(p.layout.zones()[0].backend.kind, BackendKind::Memfd);
        // The first zone fits, the second falls back.
        let p =
            run_at(&fs.0, &layout(&["size=128M,backend=hugetlb", "size=128M,backend=hugetlb,fallback=4k"])).unwrap();
        assert_eq!(p.choices[0].got, "hugetlb 2M");
        assert_eq!(p.choices[1].got, "memfd");
        assert_eq!(p.choices[0].page_size_asked, PAGE_2M);
        let _ = PAGE_1G;
    }

    #[test]
    fn a_pool_that_cannot_grow_falls_back_or_says_what_is_needed() {
        // No 1G pool in the fixture: reserve=auto cannot grow it, fallback=4k applies.
        let fs = sysfs(10, 10, "never");
        let p = run_at(&fs.0, &layout(&["size=2G,backend=hugetlb,page-size=1G,reserve=auto,fallback=4k"])).unwrap();
        assert_eq!(p.choices[0].got, "memfd");
        assert!(p.choices[0].note.as_deref().unwrap().contains("no hugetlb pool of 1G"), "{:?}", p.choices[0].note);
        // A read-only nr_hugepages: growth fails, the fallback applies and says why.
        let nr = fs.0.join("kernel/mm/hugepages/hugepages-2048kB/nr_hugepages");
        std::fs::remove_file(&nr).unwrap();
        std::fs::create_dir(&nr).unwrap();
        let p = run_at(&fs.0, &layout(&["size=64M,backend=hugetlb,reserve=auto,fallback=4k"]));
        // The pool itself cannot be read any more: that is a clear error, not a panic.
        assert!(p.is_err() || p.unwrap().choices[0].got == "memfd");
    }

    #[test]
    fn the_fix_says_the_pool_size_that_fits() {
        let fs = sysfs(10, 10, "never");
        let e = run_at(&fs.0, &layout(&["size=64M,backend=hugetlb"])).unwrap_err().to_string();
        assert!(e.contains("echo 32 > "), "{e}");
    }

    #[test]
    fn reserve_auto_gives_back_the_surplus_pages_it_made_persistent() {
        // 10 pages, 5 of them surplus (in use), 5 free.
        let fs = sysfs(10, 5, "never");
        let dir = fs.0.join("kernel/mm/hugepages/hugepages-2048kB");
        std::fs::write(dir.join("surplus_hugepages"), "5\n").unwrap();
        let p = run_at(&fs.0, &layout(&["size=64M,backend=hugetlb,reserve=auto"])).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("nr_hugepages")).unwrap().trim(), "37");
        assert!(p.choices[0].note.as_deref().unwrap().contains("pool grown by 27"));
        // At exit the pool shows 37 pages, 5 surplus: 32 persistent, all ours.
        drop(p);
        assert_eq!(std::fs::read_to_string(dir.join("nr_hugepages")).unwrap().trim(), "0");
    }

    #[test]
    fn reserve_auto_grows_the_pool_and_gives_it_back() {
        let fs = sysfs(10, 10, "never");
        let nr = fs.0.join("kernel/mm/hugepages/hugepages-2048kB/nr_hugepages");
        let p = run_at(&fs.0, &layout(&["size=64M,backend=hugetlb,reserve=auto"])).unwrap();
        assert_eq!(std::fs::read_to_string(&nr).unwrap().trim(), "32");
        assert_eq!(p.choices[0].got, "hugetlb 2M");
        assert!(p.choices[0].note.as_deref().unwrap().contains("pool grown by 22"));
        drop(p);
        assert_eq!(std::fs::read_to_string(&nr).unwrap().trim(), "10");
    }

    #[test]
    fn thp_off_is_said_not_ignored() {
        let fs = sysfs(0, 0, "always within_size advise [never] deny force");
        let e = run_at(&fs.0, &layout(&["size=1G,backend=thp,shared=on"])).unwrap_err().to_string();
        assert!(e.contains("shmem THP is 'never'") && e.contains("echo advise > "), "{e}");
        // prefault=on collapses; fallback=4k is explicit.
        assert!(run_at(&fs.0, &layout(&["size=1G,backend=thp,shared=on,prefault=on"])).is_ok());
        let p = run_at(&fs.0, &layout(&["size=1G,backend=thp,shared=on,fallback=4k"])).unwrap();
        assert_eq!(p.choices[0].got, "memfd");
        assert!(p.choices[0].note.as_deref().unwrap().contains("shmem THP is 'never'"));
        // Anonymous THP is on (madvise) in the fixture.
        assert_eq!(run_at(&fs.0, &layout(&["size=1G,backend=thp"])).unwrap().choices[0].got, "thp anon");
    }
}
