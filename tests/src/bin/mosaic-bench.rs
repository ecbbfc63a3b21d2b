//! `mosaic-bench`: Mosaic's benchmarks, printed as Markdown tables for
//! docs/BENCHMARKS.md. Each table is measured in one run, on this machine.
//!
//! ```text
//! cargo run --release -p mosaic-tests --bin mosaic-bench -- [boot [N]] [memtest [SIZE]] [coverage]
//!     [memlat [SIZE]] [prefault] [conversions]
//! ```
//! - `boot`: `hello` N times (default 20): process spawn to the guest's first
//!   boot-marker write, spawn to process exit, and the VMM's RSS beyond guest memory.
//! - `memtest`: `memtest` on each backend (default 1G, 1 vCPU): wall time per GiB of
//!   guest RAM written and verified, and the guest's own write cost per page.
//! - `coverage`: `memtest` (512M) on every backend and page size: asked vs got, and
//!   how much of guest RAM the host and KVM map huge.
//! - `memlat`: pointer-chase latency at CPL3 on anon 4K, thp, hugetlb 2M and 1G
//!   (default 2G guest), with the ratio to 4K.
//! - `prefault`: start-up time with `prefault=on` for 1, 4 and 16 GiB guests
//!   (memfd and hugetlb 2M), and prefault throughput.
//!
//! - `conversions`: `convbench`: conversion round trips for 4K/2M/1G, ZERO and
//!   PRESERVE, as the guest sees them and as the VMM spends them.
//!
//! - `liveupdate [SIZE]`: 20 consecutive live updates of `heartbeat` guests (256M,
//!   1G, 4G and 16G, or SIZE), hugetlb 2M and memfd: downtime as the guest saw it and
//!   as the VMM measured it, phases, and the guest's page rate after the resume.
//!
//! hugetlb runs use `reserve=auto`: pools are grown for the run and given back.

#[path = "../bench_liveupdate.rs"]
mod bench_liveupdate;

use std::process::{Command, Stdio};
use std::time::Instant;

use mosaic_tests::{mosaic_bin, parse_memtest, Scratch};
use serde_json::Value;

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes only into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

struct Run {
    spawn_to_marker_us: f64,
    spawn_to_exit_us: f64,
    stats: Value,
    serial: String,
}

fn run(args: &[String]) -> Result<Run, String> {
    let dir = Scratch::new("bench");
    let stats = dir.path("stats.json");
    let serial = dir.path("serial.txt");
    let mut cmd = Command::new(mosaic_bin());
    cmd.arg("run").args(args);
    cmd.arg(format!("--stats-json={}", stats.display())).arg(format!("--serial=file:{}", serial.display()));
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let t0 = monotonic_ns();
    let wall = Instant::now();
    let status = cmd.status().map_err(|e| e.to_string())?;
    let exit_us = wall.elapsed().as_secs_f64() * 1e6;
    if !status.success() {
        return Err(format!("mosaic {args:?} failed: {status}"));
    }
    let s: Value = serde_json::from_str(&std::fs::read_to_string(&stats).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    let start = s["times"]["vmm_start_monotonic_ns"].as_u64().ok_or("no start time")?;
    let marker = s["times"]["boot_marker_us"].as_u64().ok_or("no boot marker")?;
    let marker_abs = start + marker * 1000;
    Ok(Run {
        spawn_to_marker_us: marker_abs.saturating_sub(t0) as f64 / 1e3,
        spawn_to_exit_us: exit_us,
        stats: s,
        serial: std::fs::read_to_string(&serial).unwrap_or_default(),
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn boot(n: usize) -> Result<(), String> {
    let (mut marker, mut exit, mut rss, mut pss) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    run(&[])?; // warm the page cache
    for _ in 0..n {
        let r = run(&[])?;
        marker.push(r.spawn_to_marker_us);
        exit.push(r.spawn_to_exit_us);
        rss.push(r.stats["vmm_rss_bytes"].as_u64().unwrap_or(0) as f64);
        pss.push(r.stats["vmm_pss_bytes"].as_u64().unwrap_or(0) as f64);
    }
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    println!("\n### Start-up: `mosaic run` (hello, 1 vCPU, 128M memfd), {n} runs\n");
    println!("| measure | median | min | max |");
    println!("|---|---|---|---|");
    for (name, v, unit, scale) in [
        ("spawn to guest boot marker", &mut marker, "ms", 1e3),
        ("spawn to process exit", &mut exit, "ms", 1e3),
        ("VMM RSS beyond guest memory", &mut rss, "MiB", 1048576.0),
        ("VMM PSS beyond guest memory", &mut pss, "MiB", 1048576.0),
    ] {
        let (lo, hi) = (min(v), max(v));
        let m = median(v);
        println!("| {name} | {:.2} {unit} | {:.2} {unit} | {:.2} {unit} |", m / scale, lo / scale, hi / scale);
    }
    Ok(())
}

fn memtest(size: &str) -> Result<(), String> {
    println!("\n### memtest {size}, 1 vCPU: wall time per GiB written and verified\n");
    println!("| backend | guest bytes | marker to exit | per GiB | guest write cost | KVM pages_4k / pages_2m |");
    println!("|---|---|---|---|---|---|");
    let shm = Scratch::under(std::path::Path::new("/dev/shm"), "bench-file");
    let file = shm.path("ram");
    for backend in ["anon", "memfd", "gmem", "file"] {
        if backend == "file" {
            std::fs::write(&file, b"").map_err(|e| e.to_string())?;
        }
        let mem = match backend {
            "file" => format!("--memory=size={size},backend=file,path={}", file.display()),
            b => format!("--memory=size={size},backend={b}"),
        };
        let r = match run(&["--guest=memtest".into(), mem]) {
            Ok(r) => r,
            Err(e) => {
                println!("| {backend} | failed: {e} | | | | |");
                continue;
            }
        };
        let m = parse_memtest(&r.serial);
        let t = &r.stats["times"];
        let us = (t["exit_us"].as_u64().unwrap_or(0) - t["boot_marker_us"].as_u64().unwrap_or(0)) as f64;
        let per_gib = us / 1e6 / (m.bytes as f64 / f64::from(1u32 << 30));
        let ns_page = r.serial.lines().find(|l| l.starts_with("memtest: write")).unwrap_or("").to_string();
        let ns_page = ns_page.split_whitespace().nth(4).unwrap_or("?").to_string();
        println!(
            "| {backend} | {} MiB | {:.2} s | {per_gib:.2} s | {ns_page} ns/page | {} / {} |",
            m.bytes >> 20,
            us / 1e6,
            r.stats["kvm_vm"]["pages_4k"],
            r.stats["kvm_vm"]["pages_2m"],
        );
    }
    Ok(())
}

fn coverage() -> Result<(), String> {
    println!("\n### Huge-page coverage: memtest 512M, 1 vCPU\n");
    println!("| --memory | asked | got | host huge | KVM huge | KVM pages_4k / pages_2m / pages_1g |");
    println!("|---|---|---|---|---|---|");
    let shm = Scratch::under(std::path::Path::new("/dev/shm"), "bench-cov");
    let file = shm.path("ram");
    std::fs::write(&file, b"").map_err(|e| e.to_string())?;
    let mems = [
        "backend=anon".to_string(),
        "backend=memfd".into(),
        "backend=gmem".into(),
        format!("backend=file,path={}", file.display()),
        "backend=hugetlb,reserve=auto".into(),
        "backend=thp".into(),
        "backend=thp,shared=on,prefault=on".into(),
    ];
    let mut rows: Vec<(String, String)> = mems.iter().map(|m| (format!("size=512M,{m}"), m.clone())).collect();
    rows.push(("size=1G,backend=hugetlb,page-size=1G,reserve=auto".into(), "hugetlb 1G".into()));
    for (mem, label) in rows {
        let label = label.split(",path=").next().unwrap_or(&label).to_string();
        match run(&["--guest=memtest".into(), format!("--memory={mem}")]) {
            Ok(r) => {
                let z = &r.stats["zones"][0];
                let c = &r.stats["coverage"];
                let k = &r.stats["kvm_vm"];
                println!(
                    "| {label} | {} | {} | {:.1}% | {:.1}% | {} / {} / {} |",
                    z["asked"].as_str().unwrap_or("?"),
                    z["got"].as_str().unwrap_or("?"),
                    c["host_huge_ratio"].as_f64().unwrap_or(0.0) * 100.0,
                    c["kvm_huge_ratio"].as_f64().unwrap_or(0.0) * 100.0,
                    k["pages_4k"],
                    k["pages_2m"],
                    k["pages_1g"]
                );
            }
            Err(e) => println!("| {label} | failed: {e} | | | | |"),
        }
    }
    Ok(())
}

fn memlat(size: &str) -> Result<(), String> {
    println!("\n### memlat: pointer chase at CPL3, {size} guest, 1 vCPU\n");
    println!("| backend | working set | ns/access | cycles/access | vs anon 4K | KVM pages_2m |");
    println!("|---|---|---|---|---|---|");
    let mut base = None;
    for (label, mem) in [
        ("anon 4K", "backend=anon".to_string()),
        ("thp anon", "backend=thp".into()),
        ("hugetlb 2M", "backend=hugetlb,reserve=auto".into()),
        ("hugetlb 1G", "backend=hugetlb,page-size=1G,reserve=auto".into()),
    ] {
        let r = match run(&["--guest=memlat".into(), format!("--memory=size={size},{mem}")]) {
            Ok(r) => r,
            Err(e) => {
                println!("| {label} | failed: {e} | | | | |");
                continue;
            }
        };
        let line = r.serial.lines().find(|l| l.contains("ns/access")).unwrap_or("").to_string();
        let w: Vec<&str> = line.split_whitespace().collect();
        let (cycles, ns) = match w.as_slice() {
            ["memlat:", c, "cycles/access", n, "ns/access"] => (c.to_string(), n.parse::<f64>().unwrap_or(0.0)),
            _ => return Err(format!("unexpected memlat output: {:?}", r.serial)),
        };
        let ws = r.serial.lines().find(|l| l.starts_with("memlat: working set")).unwrap_or("");
        let ws = ws.split_whitespace().nth(3).and_then(|b| b.parse::<u64>().ok()).unwrap_or(0);
        let base_ns = *base.get_or_insert(ns);
        println!(
            "| {label} | {} MiB | {ns:.1} | {cycles} | {:.2}x | {} |",
            ws >> 20,
            base_ns / ns.max(0.001),
            r.stats["kvm_vm"]["pages_2m"]
        );
    }
    Ok(())
}

fn prefault() -> Result<(), String> {
    println!("\n### Start-up with prefault=on (hello, 1 vCPU)\n");
    println!("| guest RAM | backend | spawn to boot marker | prefault throughput |");
    println!("|---|---|---|---|");
    let baseline = run(&[])?.spawn_to_marker_us;
    for gib in [1u64, 4, 16] {
        for mem in ["backend=memfd", "backend=hugetlb,reserve=auto"] {
            let r = run(&[format!("--memory=size={gib}G,{mem},prefault=on")]);
            match r {
                Ok(r) => {
                    let secs = (r.spawn_to_marker_us - baseline).max(1.0) / 1e6;
                    println!(
                        "| {gib} GiB | {} | {:.0} ms | {:.1} GiB/s |",
                        mem.split(',').next().unwrap_or(mem).trim_start_matches("backend="),
                        r.spawn_to_marker_us / 1e3,
                        gib as f64 / secs
                    );
                }
                Err(e) => println!("| {gib} GiB | {mem} | failed: {e} | |"),
            }
        }
    }
    Ok(())
}

fn conversions() -> Result<(), String> {
    println!("\n### Conversions: guest round trip vs VMM-side cost (convbench, 2G memfd guest)\n");
    let r = run(&["--guest=convbench".into(), "--memory=size=2G".into()])?;
    let exit_ns: f64 = r
        .serial
        .lines()
        .find_map(|l| l.strip_prefix("convbench: exit ")?.strip_suffix(" ns")?.parse().ok())
        .ok_or("no exit line")?;
    println!(
        "One port exit (out + return): {:.1} us; a conversion through the port takes 5 (4 out, 1 in).\n",
        exit_ns / 1e3
    );
    println!("| request | mode | guest round trip | conversions/s | VMM-side cost | share that is the exits |");
    println!("|---|---|---|---|---|---|");
    let by_kind = &r.stats["private_memory"]["conversions"]["mean_us_by_kind"];
    for l in r.serial.lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        if let ["convbench:", size, mode, _, "ops", ns, "ns/op"] = w.as_slice() {
            let ns: f64 = ns.parse().map_err(|_| format!("bad line {l}"))?;
            let vmm = by_kind[format!("{}_{mode}", size.to_lowercase())].as_f64().unwrap_or(0.0);
            println!(
                "| {size} | {mode} | {:.1} us | {:.0} | {vmm:.1} us | {:.0}% |",
                ns / 1e3,
                1e9 / ns.max(1.0),
                ((ns - vmm * 1e3) / ns.max(1.0) * 100.0).clamp(0.0, 100.0)
            );
        }
    }
    Ok(())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    format!("{cpu}, {cores} cores, Linux {}", kernel.trim())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args = if args.is_empty() {
        ["boot", "memtest", "coverage", "memlat", "prefault", "conversions"].map(String::from).to_vec()
    } else {
        args
    };
    println!("Machine: {}", machine());
    println!("Binary: {}", mosaic_bin().display());
    let mut i = 0;
    while i < args.len() {
        let next_num = args.get(i + 1).filter(|a| a.chars().next().is_some_and(|c| c.is_ascii_digit())).cloned();
        let r = match args[i].as_str() {
            "boot" => boot(next_num.as_deref().and_then(|n| n.parse().ok()).unwrap_or(20)),
            "memtest" => memtest(next_num.as_deref().unwrap_or("1G")),
            "coverage" => coverage(),
            "memlat" => memlat(next_num.as_deref().unwrap_or("2G")),
            "prefault" => prefault(),
            "conversions" => conversions(),
            "liveupdate" => match next_num.as_deref() {
                Some(s) => bench_liveupdate::liveupdate(&[s]),
                None => bench_liveupdate::liveupdate(&["256M", "1G", "4G", "16G"]),
            },
            other => Err(format!(
                "unknown benchmark '{other}' (boot, memtest, coverage, memlat, prefault, conversions, liveupdate)"
            )),
        };
        if let Err(e) = r {
            eprintln!("mosaic-bench: {e}");
            std::process::exit(1);
        }
        i += if next_num.is_some() { 2 } else { 1 };
    }
}
