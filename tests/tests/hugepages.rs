//! Huge pages with real guests: `memtest` on hugetlb 2M and 1G and on THP (anonymous
//! and shared), with the guest's verdict and checksum, and KVM's and the host's
//! huge-page coverage; short pools refused at start; `reserve=auto`; alignment.
//! Tests that touch pools or THP settings take a host-wide lock and restore what
//! they changed.

use std::time::Duration;

use mosaic_tests::pool::{pool_stat, HostLock, PoolPages};
use mosaic_tests::*;
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(600);
const M2: u64 = 2 << 20;
const G1: u64 = 1 << 30;

/// Runs memtest and checks the verdict, the checksum and that KVM maps at least
/// `min_kvm` of the RAM the guest touched with huge pages (and the host at least
/// `min_host` of what is resident). Returns the stats.
fn memtest_huge(args: &[&str], min_kvm: f64, min_host: f64) -> Value {
    let mut all = vec!["--guest=memtest"];
    all.extend_from_slice(args);
    let out = run_guest(&all, TIMEOUT);
    assert_eq!(out.code, Some(0), "stderr: {}\nserial: {}", out.stderr, out.serial);
    let m = parse_memtest(&out.serial);
    assert!(m.ok && m.mismatches == 0, "memtest: {}", out.serial);
    assert_eq!(m.checksum, memtest_expected_checksum(&m.ranges), "guest checksum");
    let stats = out.stats.expect("stats");
    let cov = &stats["coverage"];
    let kvm_huge = cov["kvm_huge_bytes"].as_u64().unwrap();
    assert!(
        kvm_huge as f64 >= min_kvm * m.bytes as f64,
        "KVM maps {kvm_huge} bytes huge of {} the guest touched ({})",
        m.bytes,
        stats["kvm_vm"]
    );
    let host_huge = cov["host_huge_bytes"].as_u64().unwrap();
    let resident = cov["host_resident_bytes"].as_u64().unwrap();
    assert!(host_huge as f64 >= min_host * resident as f64, "host: {host_huge} huge of {resident} resident");
    assert!(host_huge as f64 >= min_kvm * m.bytes as f64, "host smaps agree with KVM: {host_huge} of {}", m.bytes);
    stats
}

fn with_pool(page: u64, pages: u64, f: impl FnOnce()) {
    match PoolPages::reserve(page, pages) {
        Ok(p) => {
            f();
            drop(p);
        }
        Err(why) => skip(&format!("hugetlb test: {why}")),
    }
}

#[test]
fn hugetlb_2m_256m_to_2g() {
    with_pool(M2, 1024, || {
        for (size, vcpus) in [("256M", "1"), ("2G", "2")] {
            let s = memtest_huge(
                &[&format!("--vcpus={vcpus}"), &format!("--memory=size={size},backend=hugetlb")],
                0.99,
                0.99,
            );
            assert_eq!(s["zones"][0]["got"], "hugetlb 2M");
            assert_eq!(s["memory"][0]["page_size"], M2);
        }
    });
}

#[test]
fn hugetlb_1g_with_a_two_page_pool() {
    with_pool(G1, 2, || {
        let s = memtest_huge(&["--memory=size=2G,backend=hugetlb,page-size=1G"], 0.99, 0.99);
        assert_eq!(s["zones"][0]["got"], "hugetlb 1G");
        assert_eq!(s["memory"][0]["host"]["kernel_page_size"], G1);
        // These hosts offer no 1 GiB guest pages: KVM maps the 1G backing at 2 MiB.
        let huge = s["kvm_vm"]["pages_2m"].as_u64().unwrap() * M2 + s["kvm_vm"]["pages_1g"].as_u64().unwrap() * G1;
        assert_eq!(huge, s["coverage"]["kvm_huge_bytes"].as_u64().unwrap());
    });
}

#[test]
fn one_gig_zone_after_a_small_zone_and_across_the_hole_is_aligned() {
    with_pool(G1, 4, || {
        let s = memtest_huge(
            &["--memory=size=64M,backend=memfd", "--memory=size=4G,backend=hugetlb,page-size=1G"],
            0.95,
            0.95,
        );
        let regions = s["memory"].as_array().unwrap();
        let huge: Vec<&Value> = regions.iter().filter(|r| r["backend"] == "hugetlb").collect();
        assert_eq!(huge.len(), 2, "the 1G zone is split around the hole: {regions:?}");
        for r in huge {
            assert_eq!(r["gpa"].as_u64().unwrap() % G1, 0, "1G-aligned GPA: {r}");
            assert_eq!(r["host_huge_bytes"], r["size"], "all of it on 1G pages: {r}");
        }
    });
}

#[test]
fn thp_anonymous_and_shared() {
    let _lock = HostLock::take();
    memtest_huge(&["--memory=size=1G,backend=thp"], 0.95, 0.95);
    // shmem THP is off on these hosts: prefault=on collapses the memory instead.
    let s = memtest_huge(&["--memory=size=1G,backend=thp,shared=on,prefault=on"], 0.95, 0.95);
    assert_eq!(s["zones"][0]["got"], "thp shared");
    // With shmem THP set to advise, the fault path itself gives huge pages.
    let knob = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";
    let before = std::fs::read_to_string(knob).unwrap_or_default();
    let active = before.split_whitespace().find(|w| w.starts_with('[')).map(|w| w.trim_matches(['[', ']']).to_string());
    if std::fs::write(knob, "advise").is_ok() {
        memtest_huge(&["--memory=size=1G,backend=thp,shared=on"], 0.95, 0.95);
        if let Some(a) = active {
            std::fs::write(knob, a).unwrap();
        }
    } else {
        skip("thp shared without prefault: cannot set shmem_enabled=advise (not root?)");
    }
}

/// A refusal at start: exit 2, one line, no guest, and the pools as they were.
fn refused_at_start(memory: &str, message: &str) {
    let (nr2, free2) = (pool_stat(M2, "nr_hugepages"), pool_stat(M2, "free_hugepages"));
    let (nr1, free1) = (pool_stat(G1, "nr_hugepages"), pool_stat(G1, "free_hugepages"));
    let out = run_guest(&["--guest=memtest", memory], TIMEOUT);
    assert_eq!(out.code, Some(2), "{memory}: {}", out.stderr);
    assert_eq!(out.stderr.trim_end().lines().count(), 1, "one line: {}", out.stderr);
    assert!(out.stderr.contains(message), "{memory}: {:?} says {message:?}", out.stderr);
    assert!(out.serial.is_empty() && out.stats.is_none(), "no guest started");
    assert_eq!((pool_stat(M2, "nr_hugepages"), pool_stat(M2, "free_hugepages")), (nr2, free2), "2M pool unchanged");
    assert_eq!((pool_stat(G1, "nr_hugepages"), pool_stat(G1, "free_hugepages")), (nr1, free1), "1G pool unchanged");
}

#[test]
fn short_pools_are_refused_before_the_guest_starts() {
    let _lock = HostLock::take();
    let free = pool_stat(M2, "free_hugepages").saturating_sub(pool_stat(M2, "resv_hugepages"));
    let size = (free + 64) * 2;
    refused_at_start(
        &format!("--memory=size={size}M,backend=hugetlb"),
        &format!("hugetlb 2M needs {} free pages, the pool has {free}; run 'echo ", free + 64),
    );
    let free1 = pool_stat(G1, "free_hugepages").saturating_sub(pool_stat(G1, "resv_hugepages"));
    refused_at_start(
        &format!("--memory=size={}G,backend=hugetlb,page-size=1G", free1 + 1),
        &format!("hugetlb 1G needs {} free pages, the pool has {free1}", free1 + 1),
    );
}

#[test]
fn reserve_auto_grows_the_pool_and_restores_it() {
    let _lock = HostLock::take();
    let before = pool_stat(M2, "nr_hugepages");
    let s = memtest_huge(&["--memory=size=512M,backend=hugetlb,reserve=auto"], 0.99, 0.99);
    assert!(s["zones"][0]["note"].as_str().unwrap_or("").contains("reserve=auto"), "{}", s["zones"]);
    assert_eq!(pool_stat(M2, "nr_hugepages"), before, "pool given back");
}

#[test]
fn fallbacks_are_explicit_and_reported() {
    let _lock = HostLock::take();
    let free = pool_stat(M2, "free_hugepages").saturating_sub(pool_stat(M2, "resv_hugepages"));
    let size = format!("{}M", (free + 64) * 2);
    let out = run_guest(&["--guest=hello", &format!("--memory=size={size},backend=hugetlb,fallback=4k")], TIMEOUT);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stderr.contains("memfd (4K pages) [asked hugetlb 2M]"), "start-up line says so: {}", out.stderr);
    let s = out.stats.unwrap();
    assert_eq!(s["zones"][0]["asked"], "hugetlb 2M");
    assert_eq!(s["zones"][0]["got"], "memfd");
    assert_eq!(s["zones"][0]["page_size_got"], 4096);
}

#[test]
fn misaligned_requests_are_refused() {
    let _lock = HostLock::take();
    refused_at_start("--memory=size=3M,backend=hugetlb", "not a multiple of 2097152");
    refused_at_start("--memory=size=1536M,backend=hugetlb,page-size=1G", "not a multiple of 1073741824");
    refused_at_start("--memory=size=1G,backend=hugetlb,page-size=4M", "page-size=4M is not offered");
}
