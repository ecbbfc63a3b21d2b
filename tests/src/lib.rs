//! Helpers for Mosaic's integration tests: they run the real `mosaic` binary, which
//! runs real KVM guests, and read what the guest printed and what the VMM and KVM
//! reported (`--stats-json`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod pool;

/// The `mosaic` binary: `$MOSAIC_BIN`, or `mosaic` in the same target profile
/// directory as this executable (tests live in its `deps/`, binaries beside it).
pub fn mosaic_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MOSAIC_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().expect("target dir");
    let dir = if dir.ends_with("deps") { dir.parent().expect("profile dir") } else { dir };
    let bin = dir.join("mosaic");
    assert!(bin.exists(), "{} not built: run `cargo build` for the workspace first", bin.display());
    bin
}

/// Reports a skipped test: a `skipped: <reason>` line on stdout and, so that it is
/// seen even though the test harness captures output, in `$MOSAIC_SKIP_LOG`, which
/// `resources/scripts/test.sh` prints at the end.
pub fn skip(reason: &str) {
    println!("skipped: {reason}");
    if let Some(p) = std::env::var_os("MOSAIC_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(p) {
            let _ = writeln!(f, "skipped: {reason}");
        }
    }
}

/// A scratch directory removed on drop.
pub struct Scratch(PathBuf);

impl Scratch {
    /// A new empty directory under `base` (default: the system temp dir).
    pub fn new(tag: &str) -> Self {
        Self::under(&std::env::temp_dir(), tag)
    }

    /// A new empty directory under `base`.
    pub fn under(base: &Path, tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = base.join(format!("mosaic-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create scratch dir");
        Scratch(p)
    }

    /// A path inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a `mosaic` invocation left.
#[derive(Debug)]
pub struct Output {
    /// Exit code (None if killed).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// Serial console output, when run through [`run_guest`].
    pub serial: String,
    /// `--stats-json`, when run through [`run_guest`].
    pub stats: Option<Value>,
}

/// Waits until `path` exists (a socket a VMM creates), up to `timeout`; whether it does.
pub fn wait_for_path(path: &Path, timeout: Duration) -> bool {
    let t = Instant::now();
    while !path.exists() {
        if t.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

/// Appends one line per KVM guest run to `$MOSAIC_GUEST_LOG` (CI counts them).
pub fn log_guest(args: &[String]) {
    if let Some(p) = std::env::var_os("MOSAIC_GUEST_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(p) {
            let _ = writeln!(f, "{}", args.join(" "));
        }
    }
}

/// Runs `mosaic ARGS` with a timeout (the process is killed after it).
pub fn mosaic(args: &[String], timeout: Duration) -> Output {
    let mut child = Command::new(mosaic_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mosaic");
    let out_pipe = child.stdout.take().expect("stdout");
    let err_pipe = child.stderr.take().expect("stderr");
    let read = |mut p: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = p.read_to_string(&mut s);
            s
        })
    };
    let (o, e) = (read(Box::new(out_pipe)), read(Box::new(err_pipe)));
    let deadline = Instant::now() + timeout;
    let code = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Output {
        code,
        stdout: o.join().unwrap_or_default(),
        stderr: e.join().unwrap_or_default(),
        serial: String::new(),
        stats: None,
    }
}

/// Runs a guest with `--serial file:` and `--stats-json` in a scratch dir, plus
/// `extra` flags; returns everything it left.
pub fn run_guest(extra: &[&str], timeout: Duration) -> Output {
    let dir = Scratch::new("run");
    let serial = dir.path("serial.txt");
    let stats = dir.path("stats.json");
    let mut args: Vec<String> = vec!["run".into()];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push(format!("--serial=file:{}", serial.display()));
    args.push(format!("--stats-json={}", stats.display()));
    log_guest(&args);
    let mut out = mosaic(&args, timeout);
    out.serial = std::fs::read_to_string(&serial).unwrap_or_default();
    out.stats = std::fs::read_to_string(&stats).ok().and_then(|t| serde_json::from_str(&t).ok());
    out
}

/// The memtest pattern for the qword at guest-physical `addr`.
pub fn memtest_pattern(addr: u64) -> u64 {
    (addr ^ 0x5a5a_5a5a_5a5a_5a5a).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// What `memtest` printed.
#[derive(Debug, Default)]
pub struct Memtest {
    /// Free ranges it tested.
    pub ranges: Vec<(u64, u64)>,
    /// vCPUs that took part.
    pub vcpus: u64,
    /// Bytes checked.
    pub bytes: u64,
    /// Checksum it computed from what it read back.
    pub checksum: u64,
    /// Mismatches.
    pub mismatches: u64,
    /// Its verdict line was `memtest: ok`.
    pub ok: bool,
}

fn hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).ok()
}

/// Parses memtest's serial output.
pub fn parse_memtest(serial: &str) -> Memtest {
    let mut m = Memtest::default();
    for line in serial.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["memtest:", "range", gpa, len] => {
                if let (Some(g), Some(l)) = (hex(gpa), hex(len.trim_start_matches('+'))) {
                    m.ranges.push((g, l));
                }
            }
            ["memtest:", "vcpus", n, "bytes", b, "checksum", c, "mismatches", x] => {
                m.vcpus = n.parse().unwrap_or(0);
                m.bytes = b.parse().unwrap_or(0);
                m.checksum = hex(c).unwrap_or(0);
                m.mismatches = x.parse().unwrap_or(u64::MAX);
            }
            ["memtest:", "ok"] => m.ok = true,
            _ => {}
        }
    }
    m
}

/// The checksum memtest must report for `ranges`, computed independently here.
pub fn memtest_expected_checksum(ranges: &[(u64, u64)]) -> u64 {
    let mut sum = 0u64;
    for &(gpa, len) in ranges {
        let mut a = gpa;
        while a < gpa + len {
            sum = sum.wrapping_add(memtest_pattern(a));
            a += 8;
        }
    }
    sum
}

/// A stat from the report (`kvm_vm` or `kvm_vcpu`), 0 if absent.
pub fn stat(stats: &Value, group: &str, name: &str) -> u64 {
    stats[group][name].as_u64().unwrap_or(0)
}

/// `mosaic host-check --json`, parsed.
pub fn host_check() -> Value {
    let out = mosaic(&["host-check".into(), "--json".into()], Duration::from_secs(60));
    assert_eq!(out.code, Some(0), "host-check failed: {}", out.stderr);
    serde_json::from_str(&out.stdout).expect("host-check JSON")
}
