//! Time marks for studying a live update's downtime, off unless
//! `MOSAIC_LIVE_UPDATE_TRACE` is set (docs/LIVE-UPDATE.md, "Tracing the pause").
//!
//! Each mark records CLOCK_MONOTONIC (comparable across the two processes) and the
//! thread's minor page faults so far. Both processes print theirs to stderr, one
//! `LUTRACE <ns> <process> <mark> <faults>` line each, once the update is over;
//! `resources/scripts/lu-trace.py` lines them up per update. Marking costs one load
//! of a flag when off.

use std::sync::{Mutex, OnceLock};

/// The environment variable that turns tracing on.
pub const TRACE_ENV: &str = "MOSAIC_LIVE_UPDATE_TRACE";

static ON: OnceLock<bool> = OnceLock::new();
/// One mark: what, for which vCPU, when (ns), the thread's minor faults so far.
struct Mark {
    what: &'static str,
    vcpu: Option<u32>,
    ns: u64,
    faults: i64,
}

static MARKS: Mutex<Vec<Mark>> = Mutex::new(Vec::new());

/// Whether tracing is on (read once per process).
pub fn on() -> bool {
    *ON.get_or_init(|| std::env::var_os(TRACE_ENV).is_some())
}

fn record(what: &'static str, vcpu: Option<u32>) {
    if !on() {
        return;
    }
    let t = crate::run::monotonic_ns();
    // SAFETY: getrusage writes only into the struct we pass; all zeros is valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    if let Ok(mut m) = MARKS.lock() {
        m.push(Mark { what, vcpu, ns: t, faults: ru.ru_minflt });
    }
}

/// Marks `what` now.
pub fn mark(what: &'static str) {
    record(what, None);
}

/// Marks `what` now, for vCPU `index` (printed as `what<index>`).
pub fn mark_vcpu(what: &'static str, index: u32) {
    record(what, Some(index));
}

/// Prints this process's marks (as `who`) and forgets them.
pub fn dump(who: &str) {
    if !on() {
        return;
    }
    if let Ok(mut m) = MARKS.lock() {
        for Mark { what, vcpu, ns, faults } in m.drain(..) {
            let index = vcpu.map(|i| i.to_string()).unwrap_or_default();
            eprintln!("LUTRACE {ns} {who} {what}{index} {faults}");
        }
    }
}
