//! Private memory with real guests: the `convert` guest walks through private pages,
//! the DMA device, ZERO and PRESERVE conversions and bad requests; two vCPUs convert
//! while the DMA device works on neighbouring pages.

use std::time::Duration;

use mosaic_tests::pool::PoolPages;
use mosaic_tests::*;

const TIMEOUT: Duration = Duration::from_secs(300);

fn convert(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--guest=convert"];
    all.extend_from_slice(args);
    let out = run_guest(&all, TIMEOUT);
    assert_eq!(out.code, Some(0), "stderr: {}\nserial: {}", out.stderr, out.serial);
    assert!(out.serial.contains("convert: ok"), "serial: {}", out.serial);
    assert!(!out.serial.contains("FAIL"), "serial: {}", out.serial);
    for step in 1..=8 {
        assert!(out.serial.contains(&format!("convert: step {step} ok")), "step {step}: {}", out.serial);
    }
    out.stats.expect("stats")
}

#[test]
fn walkthrough_on_private_memory() {
    let s = convert(&["--memory=size=64M,private=on"]);
    let p = &s["private_memory"];
    assert_eq!(p["engine"], "userspace");
    // Everything from 2 MiB on started private; the walk-through ends with its page private.
    assert_eq!(p["private_bytes"].as_u64().unwrap() + p["shared_bytes"].as_u64().unwrap(), 64 << 20);
    assert!(p["private_bytes"].as_u64().unwrap() >= (60 << 20), "{p}");
    assert_eq!(p["conversions"]["pages_4k"], 4, "steps 3, 5, 6 and 7 convert one page each: {p}");
    assert!(p["conversions"]["failed"].as_u64().unwrap() >= 6, "bad requests counted: {p}");
}

#[test]
fn two_vcpus_convert_while_dma_works_next_door() {
    let out = run_guest(&["--guest=convert", "--vcpus=2", "--memory=size=64M,private=on"], TIMEOUT);
    assert_eq!(out.code, Some(0), "stderr: {}\nserial: {}", out.stderr, out.serial);
    let line = out.serial.lines().find(|l| l.starts_with("convert: vcpus")).unwrap_or_default().to_string();
    let w: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(w.get(2), Some(&"2"), "{line}");
    assert_eq!(w.last(), Some(&"0"), "no mismatches: {line}");
    assert!(w.get(4).and_then(|n| n.parse::<u64>().ok()).unwrap_or(0) >= 400, "{line}");
}

#[test]
fn private_memory_on_hugetlb_keeps_huge_mappings() {
    let pool = match PoolPages::reserve(2 << 20, 64) {
        Ok(p) => p,
        Err(why) => return skip(&format!("private hugetlb test: {why}")),
    };
    let s = convert(&["--memory=size=128M,backend=hugetlb,private=on,prefault=on"]);
    let ratio = s["coverage"]["kvm_huge_ratio"].as_f64().unwrap();
    assert!(ratio >= 0.99, "KVM huge coverage after conversions: {ratio}");
    // The walk-through ends with its page private again, inside all-private RAM.
    assert_eq!(s["private_memory"]["mixed_2m_blocks"], 0);
    assert_eq!(s["zones"][0]["got"], "hugetlb 2M");
    drop(pool);
}

#[test]
fn ten_thousand_conversions_keep_hugetlb_huge_and_memory_intact() {
    let pool = match PoolPages::reserve(2 << 20, 128) {
        Ok(p) => p,
        Err(why) => return skip(&format!("convstress hugetlb test: {why}")),
    };
    let out = run_guest(&["--guest=convstress", "--memory=size=256M,backend=hugetlb,prefault=on"], TIMEOUT);
    assert_eq!(out.code, Some(0), "stderr: {}\nserial: {}", out.stderr, out.serial);
    assert!(out.serial.contains("convstress: ok"), "{}", out.serial);
    let mut ranges = Vec::new();
    let mut checksum = None;
    for l in out.serial.lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        match w.as_slice() {
            ["convstress:", "range", g, len] => {
                let hex =
                    |s: &str| u64::from_str_radix(s.trim_start_matches('+').trim_start_matches("0x"), 16).unwrap();
                ranges.push((hex(g), hex(len)));
            }
            ["convstress:", "memtest", "bytes", _, "checksum", c, "mismatches", "0"] => {
                checksum = Some(u64::from_str_radix(c.trim_start_matches("0x"), 16).unwrap())
            }
            ["convstress:", "conversions", n, ..] => assert_eq!(*n, "10000", "{l}"),
            _ => {}
        }
    }
    assert_eq!(checksum, Some(memtest_expected_checksum(&ranges)), "memtest after the conversions");
    let s = out.stats.unwrap();
    assert_eq!(s["private_memory"]["conversions"]["pages_4k"], 10000);
    let ratio = s["coverage"]["kvm_huge_ratio"].as_f64().unwrap();
    assert!(ratio >= 0.99, "KVM pages_2m coverage after 10,000 4K conversions: {ratio} ({})", s["kvm_vm"]);
    // Before the first conversion (the guest has already touched its RAM), KVM mapped
    // huge too: the conversions did not take coverage down.
    let before = &s["coverage_before_conversions"];
    let before_ratio = before["kvm_huge_ratio"].as_f64().expect("coverage before the conversions");
    assert!(before["kvm_mapped_bytes"].as_u64().unwrap() > 0, "{before}");
    assert!(ratio >= before_ratio - 0.01, "coverage fell from {before_ratio} to {ratio}");
    // Every 2 MiB block mixed at exit was made mixed by a conversion (RAM started all
    // shared), and conversions made some uniform again.
    let pm = &s["private_memory"];
    let (mixed, uniform) = (
        pm["conversions"]["blocks_2m"]["became_mixed"].as_u64().unwrap(),
        pm["conversions"]["blocks_2m"]["became_uniform"].as_u64().unwrap(),
    );
    assert!(mixed > 0 && uniform > 0, "{pm}");
    assert_eq!(mixed - uniform, pm["mixed_2m_blocks"].as_u64().unwrap(), "{pm}");
    drop(pool);
}

#[test]
fn private_needs_a_backing_with_an_fd() {
    let out = run_guest(&["--guest=convert", "--memory=size=64M,backend=anon,private=on"], TIMEOUT);
    assert_eq!(out.code, Some(2));
    assert!(out.stderr.contains("private=on needs a backend with an fd"), "{}", out.stderr);
}

#[test]
fn the_kernel_engine_converts_through_kvm_where_the_host_has_it() {
    let hc = host_check();
    let caps = &hc["kvm"]["caps"];
    let attrs = caps["memory_attributes"].as_u64().unwrap_or(0);
    let types = caps["vm_types"].as_u64().unwrap_or(0);
    if attrs & 8 == 0 || types & 2 == 0 {
        return skip(&format!(
            "kernel conversion engine: this host's KVM has no private memory attributes (memory_attributes \
             {attrs:#x}) or no KVM_X86_SW_PROTECTED_VM (vm_types {types:#x})"
        ));
    }
    // convstress with ZERO only (--guest-arg 1): the kernel engine has no PRESERVE.
    let out = run_guest(
        &["--guest=convstress", "--guest-arg=1", "--private-engine=kernel", "--memory=size=256M,backend=memfd"],
        TIMEOUT,
    );
    assert_eq!(out.code, Some(0), "stderr: {}\nserial: {}", out.stderr, out.serial);
    assert!(out.serial.contains("convstress: ok"), "{}", out.serial);
    let s = out.stats.unwrap();
    let pm = &s["private_memory"];
    assert_eq!(pm["engine"], "kernel", "{pm}");
    assert_eq!(pm["conversions"]["pages_4k"], 10000, "{pm}");
    let (mixed, uniform) = (
        pm["conversions"]["blocks_2m"]["became_mixed"].as_u64().unwrap(),
        pm["conversions"]["blocks_2m"]["became_uniform"].as_u64().unwrap(),
    );
    assert_eq!(mixed - uniform, pm["mixed_2m_blocks"].as_u64().unwrap(), "{pm}");
}

#[test]
fn hypercalls_convert_pages_where_kernel_mode_code_runs_natively() {
    let hc = host_check();
    if hc["kernel_mode"]["native"] != true {
        return skip(&format!(
            "KVM_HC_MAP_GPA_RANGE real-guest test: kernel-mode guest code is emulated on this host (host-check \
             kernel_mode: {}), so CPL0 hypercalls do not reach the VMM",
            hc["kernel_mode"]
        ));
    }
    if hc["kvm"]["caps"]["exit_hypercall"].as_u64().unwrap_or(0) & (1 << 12) == 0 {
        return skip(
            "KVM_HC_MAP_GPA_RANGE real-guest test: this host's KVM does not offer KVM_CAP_EXIT_HYPERCALL for it",
        );
    }
    let out = run_guest(&["--guest=hypercall", "--guest-cpl=0", "--memory=size=64M"], TIMEOUT);
    assert_eq!(out.code, Some(0), "stderr: {}\nserial: {}", out.stderr, out.serial);
    assert!(out.serial.contains("hypercall: ok"), "{}", out.serial);
    let s = out.stats.unwrap();
    assert_eq!(s["private_memory"]["conversions"]["pages_4k"], 2, "{}", s["private_memory"]);
}
