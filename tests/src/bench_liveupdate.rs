//! `mosaic-bench liveupdate`: downtime of live updates as the guest sees it (the
//! largest gap in heartbeat's TSC-timed loop around each update) and as the VMM
//! measures it, with the phase breakdown, for 256 MiB to 16 GiB guests on hugetlb 2M
//! and memfd; and the guest's page rate in the 100 ms after each resume against the
//! 100 ms before (EPT refaults in the new VM).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mosaic_tests::{mosaic_bin, Scratch};
use serde_json::Value;

const UPDATES: u64 = 20;

fn percentile(v: &mut [u64], p: f64) -> u64 {
    v.sort_unstable();
    if v.is_empty() {
        return 0;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn triple(v: &mut [u64]) -> String {
    let (m, p99, max) = (percentile(v, 0.5), percentile(v, 0.99), v.iter().copied().max().unwrap_or(0));
    format!("{m} / {p99} / {max}")
}

/// One guest: `size` of `mem`, 20 updates; prints one table row.
fn one(size: &str, label: &str, mem: &str) -> Result<(), String> {
    let dir = Scratch::new("bench-lu");
    let sock = dir.path("api.sock");
    let stats = dir.path("stats.json");
    let serial = dir.path("serial.txt");
    let mut first = Command::new(mosaic_bin())
        .args(["run", "--guest=heartbeat", "--vcpus=2"])
        .arg(format!("--guest-arg={UPDATES}"))
        .arg(format!("--memory=size={size},{mem}"))
        .arg(format!("--api-socket={}", sock.display()))
        .arg(format!("--serial=file:{}", serial.display()))
        .arg(format!("--stats-json={}", stats.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let t = Instant::now();
    while !sock.exists() {
        if t.elapsed() > Duration::from_secs(120) || first.try_wait().ok().flatten().is_some() {
            return Err(format!("{size} {label}: the VM did not start"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut vmm = Vec::new();
    let mut phases: [Vec<u64>; 6] = Default::default();
    let mut pids = Vec::new();
    for _ in 0..UPDATES {
        let a = vmm::api::client::request(&sock, "PUT", "/api/v1/vm/live-update", None).map_err(|e| e.to_string())?;
        if a.status != 200 {
            return Err(format!("{size} {label}: update failed: {}", a.body));
        }
        let b = &a.body;
        pids.push(b["pid"].as_u64().unwrap_or(0));
        vmm.push(b["downtime_us"].as_u64().unwrap_or(0));
        for (i, k) in ["pause_us", "save_us", "transfer_us", "restore_us", "resume_us", "prepare_us"].iter().enumerate()
        {
            phases[i].push(b[k].as_u64().unwrap_or(0));
        }
        std::thread::sleep(Duration::from_millis(150));
    }
    let _ = first.wait();
    let t = Instant::now();
    let report: Value = loop {
        if let Some(v) = std::fs::read_to_string(&stats).ok().and_then(|s| serde_json::from_str(&s).ok()) {
            break v;
        }
        if t.elapsed() > Duration::from_secs(900) {
            return Err(format!("{size} {label}: the guest did not finish"));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // The last process writes the stats, then tears the VM down and gives pool pages
    // back: wait for it to be gone before the next guest asks for memory.
    if let Some(&last) = pids.last() {
        let t = Instant::now();
        while std::path::Path::new(&format!("/proc/{last}")).exists() && t.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let text = std::fs::read_to_string(&serial).unwrap_or_default();
    if !text.lines().any(|l| l == "heartbeat: ok") || report["exit_code"] != 0 {
        return Err(format!("{size} {label}: heartbeat failed:\n{text}"));
    }
    let (mut gaps, mut ratios) = (Vec::new(), Vec::new());
    for l in text.lines().filter_map(|l| l.strip_prefix("heartbeat: update ")) {
        let w: Vec<&str> = l.split_whitespace().collect();
        if let [_, "gap", _, "cycles", us, "us", "after", after, "pages", "before", before, "pages"] = w.as_slice() {
            gaps.push(us.parse::<u64>().unwrap_or(0));
            let (a, b) = (after.parse::<u64>().unwrap_or(0), before.parse::<u64>().unwrap_or(0));
            if let Some(r) = (a * 100).checked_div(b) {
                ratios.push(r);
            }
        }
    }
    let med = |v: &mut Vec<u64>| percentile(v, 0.5);
    println!(
        "| {size} | {label} | {} | {} | {} | {} | {} | {} | {} | {} | {}% |",
        triple(&mut gaps),
        triple(&mut vmm),
        med(&mut phases[0]),
        med(&mut phases[1]),
        med(&mut phases[2]),
        med(&mut phases[3]),
        med(&mut phases[4]),
        med(&mut phases[5]) / 1000,
        med(&mut ratios),
    );
    Ok(())
}

/// The table; `sizes` default to 256M, 1G, 4G and 16G.
pub fn liveupdate(sizes: &[&str]) -> Result<(), String> {
    println!("\n### Live update: downtime over {UPDATES} consecutive updates (heartbeat, 2 vCPUs)\n");
    println!(
        "Guest gap: the largest gap in heartbeat's rdtsc-timed loop around each update. VMM: pause of the vCPUs \
         in the old process to the first KVM_RUN in the new one. Phases are medians in us. After/before: pages \
         the guest wrote in the 100 ms after the resume against the 100 ms before (median).\n"
    );
    println!(
        "| guest RAM | backend | guest gap us (median / p99 / max) | VMM downtime us (median / p99 / max) | pause | \
         save | transfer | restore | resume | prepare ms (guest running) | after / before |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for size in sizes {
        for (label, mem) in [
            ("hugetlb 2M", "backend=hugetlb,page-size=2M,reserve=auto,prefault=on"),
            ("memfd", "backend=memfd,prefault=on"),
        ] {
            if let Err(e) = one(size, label, mem) {
                println!("| {size} | {label} | failed: {e} | | | | | | | | |");
            }
        }
    }
    Ok(())
}
