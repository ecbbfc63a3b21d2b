//! `mosaic-bench`: Mosaic's benchmarks, printed as Markdown tables for
//! docs/BENCHMARKS.md. Each table is measured in one run, on this machine.
//!
//! ```text
//! cargo run --release -p mosaic-tests --bin mosaic-bench -- [boot [N]] [memtest [SIZE]]
//! ```
//! - `boot`: `hello` N times (default 20): process spawn to the guest's first
//!   boot-marker write, spawn to process exit, and the VMM's RSS beyond guest memory.
//! - `memtest`: `memtest` on each backend (default 1G, 1 vCPU): wall time per GiB of
//!   guest RAM written and verified, and the guest's own write cost per page.

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
    let (mut marker, mut exit, mut rss) = (Vec::new(), Vec::new(), Vec::new());
    run(&[])?; // warm the page cache
    for _ in 0..n {
        let r = run(&[])?;
        marker.push(r.spawn_to_marker_us);
        exit.push(r.spawn_to_exit_us);
        rss.push(r.stats["vmm_rss_bytes"].as_u64().unwrap_or(0) as f64);
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
    let args = if args.is_empty() { vec!["boot".to_string(), "memtest".to_string()] } else { args };
    println!("Machine: {}", machine());
    println!("Binary: {}", mosaic_bin().display());
    let mut i = 0;
    while i < args.len() {
        let next_num = args.get(i + 1).filter(|a| a.chars().next().is_some_and(|c| c.is_ascii_digit())).cloned();
        let r = match args[i].as_str() {
            "boot" => boot(next_num.as_deref().and_then(|n| n.parse().ok()).unwrap_or(20)),
            "memtest" => memtest(next_num.as_deref().unwrap_or("1G")),
            other => Err(format!("unknown benchmark '{other}' (boot, memtest)")),
        };
        if let Err(e) = r {
            eprintln!("mosaic-bench: {e}");
            std::process::exit(1);
        }
        i += if next_num.is_some() { 2 } else { 1 };
    }
}
