//! Rendering tests with fake reports, and gathering from fixture sysfs trees.

use std::path::Path;

use hugepage::{NumaNode, ShmemEnabled, ThpDefrag, ThpEnabled, ThpSettings, ThpSize};

use super::*;
use crate::kvm::Caps;

/// A report shaped like the kvm_pvm development hosts.
fn pvm_host() -> HostReport {
    HostReport {
        kvm: KvmInfo {
            available: true,
            api_version: 12,
            caps: Caps {
                user_memory2: true,
                memory_fault_info: true,
                memory_attributes: 0,
                guest_memfd: true,
                guest_memfd_flags: 3,
                vm_types: 1,
                pre_fault_memory: false,
                exit_hypercall: 0x1000,
                binary_stats_fd: true,
                dirty_log_ring: 1 << 20,
                nr_memslots: 32764,
                max_vcpus: 1024,
                nr_vcpus: 2,
            },
            error: None,
        },
        kernel_mode: KernelMode::new(
            Some(&ProbeResult { cpl3_us: Some(70), cpl0_us: None, timed_out: true, error: None }),
            true,
        ),
        hugepages: vec![
            HugePool { page_size: 2 << 20, ..Default::default() },
            HugePool { page_size: 1 << 30, total: 2, free: 2, reserved: 1, surplus: 0 },
        ],
        thp: ThpSettings {
            enabled: Some(ThpEnabled::Madvise),
            defrag: Some(ThpDefrag::Madvise),
            shmem_enabled: Some(ShmemEnabled::Never),
            pmd_size: Some(2 << 20),
            sizes: vec![
                ThpSize {
                    page_size: 64 << 10,
                    enabled: Some(ThpEnabled::Never),
                    shmem_enabled: Some(ShmemEnabled::Never),
                },
                ThpSize {
                    page_size: 2 << 20,
                    enabled: Some(ThpEnabled::Inherit),
                    shmem_enabled: Some(ShmemEnabled::Inherit),
                },
            ],
        },
        numa: vec![NumaNode {
            node: 0,
            mem_total: Some(4810964 << 10),
            mem_free: Some(3519820 << 10),
            has_cpus: true,
            cpus: vec![0, 1],
        }],
        implications: Vec::new(),
        errors: Vec::new(),
    }
    .with_implications()
}

fn line<'a>(text: &'a str, item: &str) -> &'a str {
    text.lines().find(|l| l.starts_with(item)).unwrap_or_else(|| panic!("no line for {item} in\n{text}"))
}

#[test]
fn text_table_for_pvm_host() {
    let r = pvm_host();
    let t = render_text(&r);
    println!("{t}");
    assert!(t.starts_with("ITEM"));
    let gm = line(&t, "guest_memfd MMAP|INIT_SHARED");
    assert!(gm.contains("yes") && gm.ends_with("backend=gmem available"), "{gm}");
    assert!(line(&t, "memory attributes").ends_with("private memory: userspace-enforced only"));
    let km = line(&t, "kernel-mode code");
    assert!(km.contains("emulated (CPL0 probe timed out)"), "{km}");
    assert!(km.ends_with("Linux guests and CPL0 hypercall exits unavailable; guest programs run at CPL3"));
    assert!(line(&t, "EXIT_HYPERCALL").contains("MAP_GPA_RANGE"));
    assert!(line(&t, "EXIT_HYPERCALL").contains("emulated here"));
    assert!(line(&t, "kvm_pvm module").contains("loaded"));
    let p2 = line(&t, "2M pool");
    assert!(p2.contains("0 total, 0 free, 0 reserved"), "{p2}");
    assert!(p2.ends_with("hugetlb 2M needs: echo N > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"));
    assert!(line(&t, "1G pool").contains("up to 1 GiB (1 page) free"));
    let sh = line(&t, "shmem THP");
    assert!(sh.contains("never") && sh.ends_with("thp shared=on needs shmem_enabled=advise"));
    assert!(line(&t, "anon THP ").contains("thp=on (MADV_HUGEPAGE) gets 2M anon pages"));
    assert!(line(&t, "anon mTHP").contains("none"));
    assert!(line(&t, "NUMA nodes").contains("1 (node0)"));
    assert!(line(&t, "node0").contains("4.6 GiB total, 3.4 GiB free, cpus 0-1"));
    assert!(line(&t, "memslots / vCPUs").contains("32764 / 1024"));
    assert!(line(&t, "dirty log ring").contains("up to 1 MiB"));

    // Columns are aligned: every row's value starts at the same column, after the
    // header's VALUE.
    let col = t.lines().next().unwrap().find("VALUE").unwrap();
    for row in rows(&r) {
        let l = line(&t, &row.item);
        assert_eq!(&l[col..col + row.value.len()], row.value, "{l}");
        assert!(l[..col].trim_end() == row.item, "{l}");
    }
    // Sections are separated by blank lines; no errors section.
    assert_eq!(t.lines().filter(|l| l.is_empty()).count(), 4);
    assert!(!t.contains("errors:"));
}

#[test]
fn implications_match_rows() {
    let r = pvm_host();
    assert_eq!(r.implications.len(), rows(&r).len());
    assert!(r.implications.contains(&"guest_memfd MMAP|INIT_SHARED: yes -> backend=gmem available".to_string()));
    assert!(r.implications.contains(&"shmem THP: never -> thp shared=on needs shmem_enabled=advise".to_string()));
}

#[test]
fn json_object_is_stable() {
    let r = pvm_host();
    let s = render_json(&r).unwrap();
    let v: serde_json::Value = serde_json::from_str(&s).unwrap();
    assert_eq!(v["kvm"]["api_version"], 12);
    assert_eq!(v["kvm"]["caps"]["guest_memfd_flags"], 3);
    assert_eq!(v["kvm"]["caps"]["user_memory2"], true);
    assert_eq!(v["kvm"]["caps"]["exit_hypercall"], 0x1000);
    assert_eq!(v["kernel_mode"]["native"], false);
    assert_eq!(v["kernel_mode"]["cpl3_us"], 70);
    assert!(v["kernel_mode"]["cpl0_us"].is_null());
    assert_eq!(v["kernel_mode"]["timed_out"], true);
    assert_eq!(v["kernel_mode"]["kvm_pvm"], true);
    assert_eq!(v["hugepages"][0]["page_size"], 2 << 20);
    for k in ["total", "free", "reserved", "surplus"] {
        assert!(v["hugepages"][1][k].is_u64(), "{k}");
    }
    assert_eq!(v["thp"]["enabled"], "madvise");
    assert_eq!(v["thp"]["shmem_enabled"], "never");
    assert_eq!(v["thp"]["sizes"][1]["shmem_enabled"], "inherit");
    assert_eq!(v["numa"][0]["node"], 0);
    assert_eq!(v["numa"][0]["has_cpus"], true);
    assert!(!v["implications"].as_array().unwrap().is_empty());
    let back: HostReport = serde_json::from_str(&s).unwrap();
    assert_eq!(back, r);
}

#[test]
fn native_host_and_capable_kvm() {
    let mut r = pvm_host();
    r.kvm.caps.memory_attributes = 8;
    r.kvm.caps.vm_types = 0b11;
    r.kernel_mode = KernelMode::new(
        Some(&ProbeResult { cpl3_us: Some(50), cpl0_us: Some(60), timed_out: false, error: None }),
        false,
    );
    r.thp.shmem_enabled = Some(ShmemEnabled::Advise);
    r.hugepages[0].total = 64;
    r.hugepages[0].free = 64;
    let r = r.with_implications();
    let t = render_text(&r);
    assert!(line(&t, "kernel-mode code").contains("native (cpl3 50 us, cpl0 60 us)"));
    assert!(line(&t, "kernel-mode code").ends_with("Linux guests and CPL0 hypercall exits available"));
    assert!(line(&t, "memory attributes").contains("PRIVATE"));
    assert!(
        line(&t, "memory attributes").ends_with("KVM-enforced (KVM_SET_MEMORY_ATTRIBUTES, --private-engine kernel)")
    );
    assert!(line(&t, "VM types").contains("default, sw_protected"));
    assert!(line(&t, "EXIT_HYPERCALL").contains("guest can request"));
    assert!(line(&t, "shmem THP").contains("thp shared=on gets 2M memfd pages"));
    assert!(line(&t, "2M pool").contains("up to 128 MiB (64 pages) free"));
    assert!(line(&t, "kvm_pvm module").contains("not loaded"));
}

#[test]
fn degraded_hosts() {
    let mut r = pvm_host();
    r.kvm = KvmInfo {
        error: Some("cannot open /dev/kvm: No such file or directory (os error 2)".into()),
        ..Default::default()
    };
    r.kernel_mode = KernelMode::new(None, false);
    r.hugepages.clear();
    r.thp = ThpSettings::default();
    r.numa.clear();
    r.errors.push("thp: something odd".into());
    let r = r.with_implications();
    let t = render_text(&r);
    println!("{t}");
    assert!(line(&t, "/dev/kvm").contains("unavailable"));
    assert!(!t.contains("guest_memfd"));
    assert!(line(&t, "kernel-mode code").contains("unknown (not probed)"));
    assert!(!r.kernel_mode.native);
    assert!(line(&t, "hugetlb pools").contains("none"));
    assert!(line(&t, "anon THP").contains("unknown"));
    assert!(line(&t, "NUMA nodes").contains("none"));
    assert!(t.contains("errors:\n  thp: something odd\n"));

    // A probe that failed without timing.
    let mut r = pvm_host();
    r.kernel_mode = KernelMode::new(
        Some(&ProbeResult {
            cpl3_us: Some(60),
            cpl0_us: None,
            timed_out: false,
            error: Some("KVM_EXIT_INTERNAL_ERROR".into()),
        }),
        true,
    );
    let t = render_text(&r.with_implications());
    assert!(line(&t, "kernel-mode code").contains("unknown (probe failed: KVM_EXIT_INTERNAL_ERROR)"));
}

struct Tree(vmm_sys_util::tempdir::TempDir);

impl Tree {
    fn new() -> Tree {
        Tree(vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/mosaic-hostcheck-").unwrap())
    }
    fn root(&self) -> &Path {
        self.0.as_path()
    }
    fn write(&self, rel: &str, text: &str) {
        let p = self.root().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
}

#[test]
fn gather_from_fixture_tree() {
    let t = Tree::new();
    let h = "kernel/mm/hugepages/hugepages-2048kB";
    for (f, v) in [("nr", "4"), ("free", "3"), ("resv", "1"), ("surplus", "0")] {
        t.write(&format!("{h}/{f}_hugepages"), v);
    }
    t.write("kernel/mm/transparent_hugepage/enabled", "always [madvise] never\n");
    t.write("kernel/mm/transparent_hugepage/shmem_enabled", "always within_size [advise] never deny force\n");
    t.write("devices/system/node/online", "0-1\n");
    t.write("devices/system/node/node0/cpulist", "0-1\n");
    t.write("devices/system/node/node1/cpulist", "\n");
    std::fs::create_dir_all(t.root().join("module/kvm_pvm")).unwrap();
    let kvm = KvmInfo { available: true, api_version: 12, ..Default::default() };
    let r = gather(t.root(), kvm, None);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(r.kernel_mode.kvm_pvm);
    assert!(!r.kernel_mode.probed);
    assert_eq!(r.hugepages, vec![HugePool { page_size: 2 << 20, total: 4, free: 3, reserved: 1, surplus: 0 }]);
    assert_eq!(r.thp.shmem_enabled, Some(ShmemEnabled::Advise));
    assert_eq!(r.numa.len(), 2);
    assert!(!r.numa[1].has_cpus);
    assert_eq!(r.implications.len(), rows(&r).len());
    let text = render_text(&r);
    assert!(line(&text, "NUMA nodes").contains("1 CPU-less node(s) as far tiers"));
    assert!(line(&text, "node1").contains("CPU-less node"));

    // Broken files degrade to errors, not failure.
    t.write("kernel/mm/transparent_hugepage/enabled", "garbage\n");
    t.write(&format!("{h}/free_hugepages"), "x");
    t.write("devices/system/node/online", "0-\n");
    let r = gather(t.root(), KvmInfo::default(), None);
    assert_eq!(r.errors.len(), 3, "{:?}", r.errors);
    assert!(r.hugepages.is_empty() && r.numa.is_empty());
    assert_eq!(r.thp, ThpSettings::default());
}

#[test]
fn real_host_report() {
    let r = report(None).unwrap();
    assert!(r.kvm.available, "{:?}", r.kvm.error);
    assert_eq!(r.kvm.api_version, 12);
    assert!(!r.kernel_mode.native);
    let text = run(false, None).unwrap();
    println!("{text}");
    let json = run(true, None).unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["kvm"]["api_version"], 12);
}
