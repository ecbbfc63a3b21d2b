//! Turning a [`HostReport`] into rows (item, value, meaning for Mosaic), an aligned
//! text table, or pretty JSON.

use hugepage::{page_size_label, ShmemEnabled, ThpDefrag, ThpEnabled};

use super::report::HostReport;
use super::HostCheckError;
use crate::kvm::caps::{
    GUEST_MEMFD_FLAG_MMAP, KVM_HC_MAP_GPA_RANGE, KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_X86_SW_PROTECTED_VM,
};

const THP_DIR: &str = "/sys/kernel/mm/transparent_hugepage";

/// One line of the host-check table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Section the row belongs to (`kvm`, `kernel`, `hugetlb`, `thp`, `numa`).
    pub section: &'static str,
    /// What was checked.
    pub item: String,
    /// What the host has.
    pub value: String,
    /// What that means for Mosaic.
    pub meaning: String,
}

impl Row {
    fn new(
        section: &'static str,
        item: impl Into<String>,
        value: impl Into<String>,
        meaning: impl Into<String>,
    ) -> Row {
        Row { section, item: item.into(), value: value.into(), meaning: meaning.into() }
    }

    /// The row as one line: `item: value -> meaning`.
    pub fn implication(&self) -> String {
        format!("{}: {} -> {}", self.item, self.value, self.meaning)
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// `4.6 GiB`, `512 MiB`, `12 KiB`, `100 B`.
fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 || v >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[i])
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// Compresses sorted ids into a range list: `0-3,5`.
fn range_list(ids: &[u32]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < ids.len() {
        let start = ids[i];
        let mut end = start;
        while i + 1 < ids.len() && Some(ids[i + 1]) == end.checked_add(1) {
            i += 1;
            end = ids[i];
        }
        out.push(if start == end { start.to_string() } else { format!("{start}-{end}") });
        i += 1;
    }
    out.join(",")
}

fn kvm_rows(r: &HostReport, rows: &mut Vec<Row>) {
    let k = &r.kvm;
    if !k.available {
        let why = k.error.as_deref().unwrap_or("unknown reason");
        rows.push(Row::new("kvm", "/dev/kvm", "unavailable", format!("Mosaic cannot run VMs here ({why})")));
        return;
    }
    rows.push(Row::new(
        "kvm",
        "/dev/kvm",
        format!("API {}", k.api_version),
        if k.api_version == 12 {
            "KVM usable".to_string()
        } else {
            format!("unexpected API version {} (Mosaic expects 12)", k.api_version)
        },
    ));
    let c = &k.caps;

    let (value, meaning) = if !c.guest_memfd {
        ("no", "backend=gmem unavailable (no KVM_CREATE_GUEST_MEMFD)")
    } else if c.gmem_mappable_shared() {
        ("yes", "backend=gmem available")
    } else if !c.user_memory2 {
        ("yes", "backend=gmem unavailable: no USER_MEMORY2")
    } else if c.guest_memfd_flags & GUEST_MEMFD_FLAG_MMAP != 0 {
        ("MMAP only", "backend=gmem unavailable: memory would start private, host access faults")
    } else {
        ("no", "backend=gmem unavailable: guest_memfd cannot be mmap()ed")
    };
    rows.push(Row::new("kvm", "guest_memfd MMAP|INIT_SHARED", value, meaning));
    rows.push(Row::new(
        "kvm",
        "USER_MEMORY2",
        yes_no(c.user_memory2),
        if c.user_memory2 {
            "memslots can be backed by guest_memfd (KVM_SET_USER_MEMORY_REGION2)"
        } else {
            "memslots by userspace address only; backend=gmem unavailable"
        },
    ));
    let attrs = if c.memory_attributes == 0 {
        "no".to_string()
    } else if c.memory_attributes == KVM_MEMORY_ATTRIBUTE_PRIVATE {
        "PRIVATE".to_string()
    } else {
        format!("{:#x}", c.memory_attributes)
    };
    rows.push(Row::new(
        "kvm",
        "memory attributes",
        attrs,
        if c.private_attributes() {
            "private memory: KVM-enforced (KVM_SET_MEMORY_ATTRIBUTES, --private-engine kernel)"
        } else {
            "private memory: userspace-enforced only"
        },
    ));
    const VM_TYPE_NAMES: [&str; 6] = ["default", "sw_protected", "sev", "sev_es", "snp", "tdx"];
    let mut types: Vec<String> = (0..64u32)
        .filter(|&t| c.vm_type(t))
        .map(|t| VM_TYPE_NAMES.get(t as usize).map_or_else(|| format!("type{t}"), |n| n.to_string()))
        .collect();
    if types.is_empty() {
        types.push("default (cap absent)".to_string());
    }
    rows.push(Row::new(
        "kvm",
        "VM types",
        types.join(", "),
        if c.vm_type(KVM_X86_SW_PROTECTED_VM) {
            "sw-protected VMs available (KVM-tracked private memory)"
        } else {
            "default VM only: no KVM_X86_SW_PROTECTED_VM"
        },
    ));
    let hc = if c.exit_hypercall == 0 {
        "no".to_string()
    } else if c.exit_hypercall == 1 << KVM_HC_MAP_GPA_RANGE {
        "MAP_GPA_RANGE".to_string()
    } else {
        format!("{:#x}", c.exit_hypercall)
    };
    let hc_meaning = if !c.map_gpa_range_exit() {
        "no guest-requested conversions: only the VMM converts private/shared".to_string()
    } else if r.kernel_mode.probed && !r.kernel_mode.native {
        "KVM_HC_MAP_GPA_RANGE exits exist but need CPL0 guest code, which is emulated here".to_string()
    } else {
        "guest can request private/shared conversion (KVM_HC_MAP_GPA_RANGE, from CPL0)".to_string()
    };
    rows.push(Row::new("kvm", "EXIT_HYPERCALL", hc, hc_meaning));
    rows.push(Row::new(
        "kvm",
        "binary stats",
        yes_no(c.binary_stats_fd),
        if c.binary_stats_fd {
            "KVM huge mappings verifiable (pages_4k/2m/1g)"
        } else {
            "cannot verify KVM huge mappings (no KVM_GET_STATS_FD)"
        },
    ));
    rows.push(Row::new(
        "kvm",
        "dirty log ring",
        if c.dirty_log_ring == 0 { "no".to_string() } else { format!("up to {}", human_bytes(c.dirty_log_ring)) },
        if c.dirty_log_ring == 0 {
            "dirty tracking via KVM_GET_DIRTY_LOG bitmap only"
        } else {
            "dirty tracking via per-vCPU dirty ring available"
        },
    ));
    rows.push(Row::new(
        "kvm",
        "memslots / vCPUs",
        format!("{} / {}", c.nr_memslots, c.max_vcpus),
        "per-VM limits on memory regions and vCPUs",
    ));
}

fn kernel_rows(r: &HostReport, rows: &mut Vec<Row>) {
    let k = &r.kernel_mode;
    let timing = match (k.cpl3_us, k.cpl0_us) {
        (Some(a), Some(b)) => format!(" (cpl3 {a} us, cpl0 {b} us)"),
        (Some(a), None) => format!(" (cpl3 {a} us, cpl0 did not finish)"),
        (None, Some(b)) => format!(" (cpl0 {b} us)"),
        (None, None) => String::new(),
    };
    let (value, meaning) = if !k.probed {
        (
            "unknown (not probed)".to_string(),
            "assume guest programs at CPL3 only; run the probe to know whether Linux guests can run".to_string(),
        )
    } else if k.native {
        (format!("native{timing}"), "Linux guests and CPL0 hypercall exits available".to_string())
    } else if k.cpl0_us.is_none() && !k.timed_out {
        let why = k.error.as_deref().unwrap_or("no result");
        (
            format!("unknown (probe failed: {why})"),
            "treated as emulated: Linux guests and CPL0 hypercall exits unavailable".to_string(),
        )
    } else {
        let t = if k.timed_out { " (CPL0 probe timed out)".to_string() } else { timing };
        (
            format!("emulated{t}"),
            "Linux guests and CPL0 hypercall exits unavailable; guest programs run at CPL3".to_string(),
        )
    };
    rows.push(Row::new("kernel", "kernel-mode code", value, meaning));
    rows.push(Row::new(
        "kernel",
        "kvm_pvm module",
        if k.kvm_pvm { "loaded" } else { "not loaded" },
        if k.kvm_pvm {
            "KVM nested via kvm_pvm (shadow paging): non-PVM kernel code is emulated"
        } else {
            "KVM is not the kvm_pvm nested flavour"
        },
    ));
}

fn hugetlb_rows(r: &HostReport, rows: &mut Vec<Row>) {
    if r.hugepages.is_empty() {
        rows.push(Row::new(
            "hugetlb",
            "hugetlb pools",
            "none",
            "hugetlb backing unavailable (no /sys/kernel/mm/hugepages)",
        ));
        return;
    }
    for p in &r.hugepages {
        let label = page_size_label(p.page_size);
        let path = hugepage::pools::nr_hugepages_path(std::path::Path::new(hugepage::SYSFS_ROOT), p.page_size);
        let path = path.display();
        let available = p.free.saturating_sub(p.reserved);
        let meaning = if p.total == 0 {
            format!("hugetlb {label} needs: echo N > {path}")
        } else if available == 0 {
            format!("hugetlb {label} pool used up; grow it: echo N > {path}")
        } else {
            format!(
                "hugetlb {label} backing: up to {} ({available} page{}) free",
                human_bytes(available.saturating_mul(p.page_size)),
                if available == 1 { "" } else { "s" }
            )
        };
        rows.push(Row::new(
            "hugetlb",
            format!("{label} pool"),
            format!("{} total, {} free, {} reserved", p.total, p.free, p.reserved),
            meaning,
        ));
    }
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "unknown".to_string(), |v| v.to_string())
}

fn thp_rows(r: &HostReport, rows: &mut Vec<Row>) {
    let t = &r.thp;
    let pmd = t.pmd_size.unwrap_or(2 << 20);
    let pmd_label = page_size_label(pmd);
    let pmd_entry = t.size(pmd);

    // Anonymous THP.
    let mut value = opt(t.enabled);
    if let Some(v) = pmd_entry.and_then(|s| s.enabled).filter(|&v| v != ThpEnabled::Inherit) {
        value.push_str(&format!(" ({pmd_label}: {v})"));
    }
    let meaning = match t.effective_enabled(pmd) {
        Some(ThpEnabled::Always) => format!("thp=on gets {pmd_label} anon pages (all anon memory)"),
        Some(ThpEnabled::Madvise) => format!("thp=on (MADV_HUGEPAGE) gets {pmd_label} anon pages"),
        Some(_) => format!("thp=on needs enabled=madvise (echo madvise > {THP_DIR}/enabled)"),
        None => "THP unavailable: thp=on has no effect".to_string(),
    };
    rows.push(Row::new("thp", "anon THP", value, meaning));

    let meaning = match t.defrag {
        Some(ThpDefrag::Always | ThpDefrag::Madvise | ThpDefrag::DeferMadvise) => {
            "MADV_HUGEPAGE faults compact memory to get huge pages"
        }
        Some(ThpDefrag::Defer) => "huge pages only if free now; compaction in background",
        Some(ThpDefrag::Never) => "huge pages only if free now (no compaction)",
        None => "unknown",
    };
    rows.push(Row::new("thp", "THP defrag", opt(t.defrag), meaning));

    // shmem / memfd THP.
    let mut value = opt(t.shmem_enabled);
    if let Some(v) = pmd_entry.and_then(|s| s.shmem_enabled).filter(|&v| v != ShmemEnabled::Inherit) {
        value.push_str(&format!(" ({pmd_label}: {v})"));
    }
    let meaning = match t.effective_shmem(pmd) {
        Some(v) if v.honours_madvise() => {
            format!("thp shared=on gets {pmd_label} memfd pages")
        }
        Some(_) => "thp shared=on needs shmem_enabled=advise".to_string(),
        None => "shmem THP unavailable: thp shared=on has no effect".to_string(),
    };
    rows.push(Row::new("thp", "shmem THP", value, meaning));

    // Smaller (mTHP) sizes.
    if t.sizes.iter().any(|s| s.page_size != pmd) {
        let on: Vec<String> = t
            .sizes
            .iter()
            .filter(|s| s.page_size < pmd)
            .filter_map(|s| {
                let v = t.effective_enabled(s.page_size)?;
                v.honours_madvise().then(|| format!("{} {v}", page_size_label(s.page_size)))
            })
            .collect();
        rows.push(Row::new(
            "thp",
            "anon mTHP < PMD",
            if on.is_empty() { "none".to_string() } else { on.join(", ") },
            format!("KVM maps 4K or {pmd_label}: smaller folios do not help guests"),
        ));
    }
}

fn numa_rows(r: &HostReport, rows: &mut Vec<Row>) {
    let n = &r.numa;
    let names: Vec<String> = n.iter().map(|n| format!("node{}", n.node)).collect();
    let cpuless = n.iter().filter(|n| !n.has_cpus).count();
    let meaning = match n.len() {
        0 => "no NUMA sysfs: placement options have no effect".to_string(),
        1 => "single node: NUMA placement and tiers testable only with fixtures".to_string(),
        _ if cpuless > 0 => {
            format!("multi-node: placement available; {cpuless} CPU-less node(s) as far tiers")
        }
        _ => "multi-node: NUMA placement available".to_string(),
    };
    let value = if n.is_empty() { "none".to_string() } else { format!("{} ({})", n.len(), names.join(", ")) };
    rows.push(Row::new("numa", "NUMA nodes", value, meaning));
    for node in n {
        let mem = match (node.mem_total, node.mem_free) {
            (Some(t), Some(f)) => format!("{} total, {} free", human_bytes(t), human_bytes(f)),
            (Some(t), None) => format!("{} total", human_bytes(t)),
            _ => "memory unknown".to_string(),
        };
        let cpus = if node.has_cpus { format!("cpus {}", range_list(&node.cpus)) } else { "no CPUs".to_string() };
        rows.push(Row::new(
            "numa",
            format!("node{}", node.node),
            format!("{mem}, {cpus}"),
            if node.has_cpus {
                "CPU node: near memory for its vCPUs"
            } else {
                "CPU-less node: usable as a far-memory tier"
            },
        ));
    }
}

/// The table rows for a report, in display order.
pub fn rows(r: &HostReport) -> Vec<Row> {
    let mut rows = Vec::new();
    kvm_rows(r, &mut rows);
    kernel_rows(r, &mut rows);
    hugetlb_rows(r, &mut rows);
    thp_rows(r, &mut rows);
    numa_rows(r, &mut rows);
    rows
}

/// The human table: columns item, value, meaning for Mosaic; a blank line between
/// sections; errors at the end.
pub fn render_text(r: &HostReport) -> String {
    let rows = rows(r);
    let head = ("ITEM", "VALUE", "MEANING FOR MOSAIC");
    let wi = rows.iter().map(|r| r.item.chars().count()).chain([head.0.len()]).max().unwrap_or(0);
    let wv = rows.iter().map(|r| r.value.chars().count()).chain([head.1.len()]).max().unwrap_or(0);
    let mut out = format!("{:wi$}  {:wv$}  {}\n", head.0, head.1, head.2);
    let mut section = None;
    for row in &rows {
        if section.is_some() && section != Some(row.section) {
            out.push('\n');
        }
        section = Some(row.section);
        out.push_str(&format!("{:wi$}  {:wv$}  {}\n", row.item, row.value, row.meaning));
    }
    if !r.errors.is_empty() {
        out.push_str("\nerrors:\n");
        for e in &r.errors {
            out.push_str(&format!("  {e}\n"));
        }
    }
    out
}

/// The report as pretty JSON (the `--json` output), with a trailing newline.
pub fn render_json(r: &HostReport) -> Result<String, HostCheckError> {
    let mut s = serde_json::to_string_pretty(r).map_err(HostCheckError::Json)?;
    s.push('\n');
    Ok(s)
}
