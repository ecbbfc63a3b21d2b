//! The `--stats-json` report: how the run ended, its times, guest memory as the host
//! and KVM map it, and KVM's binary stats.

use std::collections::BTreeMap;
use std::time::Duration;

use guest_mem::GuestMemory;
use serde::Serialize;

use crate::vm::control::{FaultReport, Outcome};

/// Version of the report format.
pub const REPORT_VERSION: u32 = 1;

/// How the run ended.
#[derive(Debug, Serialize)]
pub struct OutcomeReport {
    /// Short kind: exit, reset, fault, shutdown, all_parked, error, signal.
    pub kind: &'static str,
    /// One line for people.
    pub description: String,
    /// The fault, for `fault`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<FaultReport>,
}

/// Wall times from VMM start (`main`), in microseconds.
#[derive(Debug, Serialize)]
pub struct Times {
    /// To the guest's first boot-marker write.
    pub boot_marker_us: Option<u64>,
    /// To the moment the outcome was decided.
    pub exit_us: Option<u64>,
    /// `CLOCK_MONOTONIC` at VMM start, in ns (to compare with a launcher's clock).
    pub vmm_start_monotonic_ns: u64,
}

/// One guest RAM region as the host maps it.
#[derive(Debug, Serialize)]
pub struct RegionReport {
    /// First GPA.
    pub gpa: u64,
    /// Size.
    pub size: u64,
    /// Zone index.
    pub zone: usize,
    /// Backend name.
    pub backend: &'static str,
    /// Backing page size.
    pub page_size: u64,
    /// Host mapping (from /proc/self/smaps).
    pub host: hugepage::smaps::HugeCoverage,
    /// Bytes the host maps with huge pages.
    pub host_huge_bytes: u64,
    /// Guest RAM resident in the VMM's own view of the region (pages the VMM touched:
    /// loaded images, device accesses); counted in VmRSS a second time.
    pub view_rss: u64,
}

/// The whole report.
#[derive(Debug, Serialize)]
pub struct RunReport {
    /// Format version.
    pub version: u32,
    /// Process exit code.
    pub exit_code: i32,
    /// How the run ended.
    pub outcome: OutcomeReport,
    /// Guest program name, or the kernel path.
    pub guest: String,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Times.
    pub times: Times,
    /// Per zone: backend and page size asked for and used (filled in by the caller
    /// from the preflight).
    pub zones: Vec<crate::preflight::ZoneChoice>,
    /// Guest RAM regions.
    pub memory: Vec<RegionReport>,
    /// Huge-page coverage of guest RAM, as the host and KVM map it.
    pub coverage: Coverage,
    /// KVM VM stats (pages_4k, pages_2m, pages_1g, ...).
    pub kvm_vm: BTreeMap<String, u64>,
    /// KVM vCPU stats summed over vCPUs (exits, io_exits, ...).
    pub kvm_vcpu: BTreeMap<String, u64>,
    /// VMM resident memory beyond guest RAM (VmRSS minus guest resident bytes).
    pub vmm_rss_bytes: Option<u64>,
    /// The same as a proportional set size (shared library pages divided among the
    /// processes that map them): smaps_rollup Pss minus guest resident bytes.
    pub vmm_pss_bytes: Option<u64>,
    /// Port accesses no device claimed.
    pub unknown_port_accesses: u64,
    /// Private memory: page states and conversions.
    pub private_memory: PrivateReport,
    /// Live updates the guest went through before this process ended it.
    pub live_update_generation: u64,
    /// KVM's huge-mapping coverage just before the guest's first conversion (absent
    /// if it made none); `coverage` is the coverage after, at exit.
    pub coverage_before_conversions: Option<KvmCoverage>,
}

/// How KVM maps guest RAM at one moment (from its binary stats).
#[derive(Debug, Clone, Default, Serialize)]
pub struct KvmCoverage {
    /// Bytes KVM maps (`pages_4k`, `pages_2m`, `pages_1g` summed).
    pub kvm_mapped_bytes: u64,
    /// Of those, bytes on 2 MiB and 1 GiB mappings.
    pub kvm_huge_bytes: u64,
    /// `kvm_huge_bytes / kvm_mapped_bytes` (0 when nothing is mapped).
    pub kvm_huge_ratio: f64,
}

impl KvmCoverage {
    /// From KVM VM stats.
    pub fn new(kvm_vm: &BTreeMap<String, u64>) -> Self {
        let c = Coverage::new(kvm_vm, &[]);
        KvmCoverage {
            kvm_mapped_bytes: c.kvm_mapped_bytes,
            kvm_huge_bytes: c.kvm_huge_bytes,
            kvm_huge_ratio: c.kvm_huge_ratio,
        }
    }
}

/// Private memory at exit (docs/PRIVATE-MEMORY.md).
#[derive(Debug, Serialize)]
pub struct PrivateReport {
    /// The conversion engine: `userspace` (Mosaic enforces the rules) or `kernel`
    /// (KVM memory attributes and guest_memfd).
    pub engine: &'static str,
    /// Bytes of guest RAM private to the guest.
    pub private_bytes: u64,
    /// Bytes shared with the VMM.
    pub shared_bytes: u64,
    /// 2 MiB blocks holding both private and shared pages.
    pub mixed_2m_blocks: u64,
    /// 1 GiB blocks holding both private and shared pages.
    pub mixed_1g_blocks: u64,
    /// Conversions by size, refused requests, latency.
    pub conversions: guest_mem::convert::ConvStatsSnapshot,
    /// Whether the VMM view still hides private pages (false after an mprotect
    /// failure: the accessor check alone guards them then).
    pub view_protects: bool,
}

impl PrivateReport {
    /// The report for `mem` now.
    pub fn new(mem: &GuestMemory) -> Self {
        let (private_bytes, shared_bytes) = mem.private_shared_bytes();
        PrivateReport {
            engine: mem.engine().name(),
            private_bytes,
            shared_bytes,
            mixed_2m_blocks: mem.mixed_blocks(guest_mem::PAGE_2M),
            mixed_1g_blocks: mem.mixed_blocks(guest_mem::PAGE_1G),
            conversions: mem.conversion_stats(),
            view_protects: mem.view_trusted(),
        }
    }
}

fn us(d: Duration) -> u64 {
    d.as_micros().try_into().unwrap_or(u64::MAX)
}

/// Huge-page coverage at exit.
#[derive(Debug, Default, Serialize)]
pub struct Coverage {
    /// Bytes KVM maps for the guest (`pages_4k`, `pages_2m`, `pages_1g` summed).
    pub kvm_mapped_bytes: u64,
    /// Of those, bytes on 2 MiB and 1 GiB mappings.
    pub kvm_huge_bytes: u64,
    /// `kvm_huge_bytes / kvm_mapped_bytes` (0 when nothing is mapped).
    pub kvm_huge_ratio: f64,
    /// Guest RAM resident in the VMM's mappings (smaps Rss + hugetlb).
    pub host_resident_bytes: u64,
    /// Of those, bytes on huge pages (AnonHugePages, ShmemPmdMapped, FilePmdMapped, hugetlb).
    pub host_huge_bytes: u64,
    /// `host_huge_bytes / host_resident_bytes` (0 when nothing is resident).
    pub host_huge_ratio: f64,
}

impl Coverage {
    /// Coverage from KVM VM stats and region reports.
    pub fn new(kvm_vm: &BTreeMap<String, u64>, memory: &[RegionReport]) -> Self {
        let stat = |k: &str| kvm_vm.get(k).copied().unwrap_or(0);
        let huge = stat("pages_2m").saturating_mul(2 << 20).saturating_add(stat("pages_1g").saturating_mul(1 << 30));
        let mapped = huge.saturating_add(stat("pages_4k").saturating_mul(4096));
        let resident: u64 = memory.iter().map(|r| r.host.resident_bytes()).sum();
        let host_huge: u64 = memory.iter().map(|r| r.host_huge_bytes).sum();
        let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        Coverage {
            kvm_mapped_bytes: mapped,
            kvm_huge_bytes: huge,
            kvm_huge_ratio: ratio(huge, mapped),
            host_resident_bytes: resident,
            host_huge_bytes: host_huge,
            host_huge_ratio: ratio(host_huge, resident),
        }
    }
}

/// Per-region host mapping report.
pub fn regions(mem: &GuestMemory) -> Vec<RegionReport> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok();
    let maps = smaps.as_deref().and_then(|t| hugepage::smaps::parse(t).ok()).unwrap_or_default();
    mem.regions()
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let host = hugepage::smaps::coverage_of(&maps, r.host_addr, r.host_addr + r.size);
            let view_rss =
                mem.view_range(i).map(|(a, b)| hugepage::smaps::coverage_of(&maps, a, b).resident_bytes()).unwrap_or(0);
            RegionReport {
                gpa: r.gpa,
                size: r.size,
                zone: r.zone,
                backend: r.kind.name(),
                page_size: r.page_size,
                host_huge_bytes: host.huge_bytes(),
                host,
                view_rss,
            }
        })
        .collect()
}

/// VmRSS of this process, in bytes.
pub fn vm_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    guest_mem::capacity::parse_meminfo_field(&s, "VmRSS")
}

/// Pss of this process (smaps_rollup), in bytes.
pub fn vm_pss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/smaps_rollup").ok()?;
    guest_mem::capacity::parse_meminfo_field(&s, "Pss")
}

/// Inputs to [`RunReport::new`].
#[derive(Debug)]
pub struct ReportInputs {
    /// Outcome and when it was decided.
    pub outcome: Option<(Outcome, Duration)>,
    /// Boot-marker time.
    pub boot_marker: Option<Duration>,
    /// Guest name.
    pub guest: String,
    /// vCPU count.
    pub vcpus: u32,
    /// CLOCK_MONOTONIC at start.
    pub start_monotonic_ns: u64,
    /// Region reports.
    pub memory: Vec<RegionReport>,
    /// VM stats.
    pub kvm_vm: BTreeMap<String, u64>,
    /// Per-vCPU stats.
    pub kvm_vcpus: Vec<BTreeMap<String, u64>>,
    /// VmRSS.
    pub rss: Option<u64>,
    /// Pss.
    pub pss: Option<u64>,
    /// Unknown port accesses.
    pub unknown_port_accesses: u64,
    /// Private memory.
    pub private: PrivateReport,
    /// Live-update generation.
    pub generation: u64,
    /// Coverage before the first conversion.
    pub coverage_before_conversions: Option<KvmCoverage>,
}

impl RunReport {
    /// Builds the report.
    pub fn new(i: ReportInputs) -> Self {
        let (outcome, exit_at) = match i.outcome {
            Some((o, t)) => (o, Some(t)),
            None => (Outcome::Error { vcpu: 0, message: "run ended without an outcome".into() }, None),
        };
        let mut kvm_vcpu = BTreeMap::new();
        for s in &i.kvm_vcpus {
            for (k, v) in s {
                let e = kvm_vcpu.entry(k.clone()).or_insert(0u64);
                *e = e.saturating_add(*v);
            }
        }
        let guest_resident: u64 = i.memory.iter().map(|r| r.host.resident_bytes() + r.view_rss).sum();
        RunReport {
            version: REPORT_VERSION,
            exit_code: outcome.exit_code(),
            outcome: OutcomeReport {
                kind: outcome.kind(),
                description: outcome.describe(),
                fault: match &outcome {
                    Outcome::Fault(f) => Some(*f),
                    _ => None,
                },
            },
            guest: i.guest,
            vcpus: i.vcpus,
            times: Times {
                boot_marker_us: i.boot_marker.map(us),
                exit_us: exit_at.map(us),
                vmm_start_monotonic_ns: i.start_monotonic_ns,
            },
            zones: Vec::new(),
            coverage: Coverage::new(&i.kvm_vm, &i.memory),
            memory: i.memory,
            kvm_vm: i.kvm_vm,
            kvm_vcpu,
            vmm_rss_bytes: i.rss.map(|r| r.saturating_sub(guest_resident)),
            vmm_pss_bytes: i.pss.map(|r| r.saturating_sub(guest_resident)),
            unknown_port_accesses: i.unknown_port_accesses,
            private_memory: i.private,
            live_update_generation: i.generation,
            coverage_before_conversions: i.coverage_before_conversions,
        }
    }
}
