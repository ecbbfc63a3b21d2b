//! host-check's kernel-mode probe: the same tiny loop run at CPL3 and at CPL0, each
//! bounded by a timeout. Where KVM runs kernel-mode code natively the two take about
//! as long; where it emulates it (nested `kvm_pvm` hosts) CPL0 is ~1000x slower or fails.

use std::time::{Duration, Instant};

use guest_mem::{BackendKind, BackendSpec, MemoryLayout, ZoneSpec};

use crate::config::{BootSource, RunPlan};
use crate::devices::SerialOutput;
use crate::hostcheck::ProbeResult;

/// Time allowed for each probe run.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// One probe run: time from the boot marker to the exit port, or why it failed.
fn one(kernel_mode: bool) -> Result<u64, (bool, String)> {
    let image = crate::guests::builtin("probe").ok_or((false, "probe guest missing".to_string()))?;
    let zone = ZoneSpec { size: 16 << 20, backend: BackendSpec::new(BackendKind::Anon) };
    let layout = MemoryLayout::place(vec![zone]).map_err(|e| (false, e.to_string()))?;
    let plan = RunPlan {
        boot: BootSource::Program { name: "probe".into(), image: image.to_vec(), kernel_mode },
        vcpus: 1,
        layout,
        serial: SerialOutput::None,
        stats_json: None,
        api_socket: None,
        guest_arg: 0,
        pool_grants: Vec::new(),
        engine: Default::default(),
    };
    let start = Instant::now();
    let r = super::execute(&plan, start, super::monotonic_ns(), Some(PROBE_TIMEOUT))
        .map_err(|e| (false, crate::error_chain(&e)))?;
    match (r.outcome.kind, r.times.boot_marker_us, r.times.exit_us) {
        ("exit", Some(b), Some(e)) if r.exit_code == 0 => Ok(e.saturating_sub(b)),
        ("error", _, _) if r.outcome.description.contains("timed out") => Err((true, r.outcome.description)),
        _ => Err((false, r.outcome.description)),
    }
}

/// Runs the probe at CPL3 and CPL0.
pub fn kernel_mode_probe() -> ProbeResult {
    let cpl3 = one(false);
    let cpl0 = one(true);
    let error = match (&cpl3, &cpl0) {
        (Err((_, e)), _) => Some(format!("CPL3: {e}")),
        (_, Err((_, e))) => Some(format!("CPL0: {e}")),
        _ => None,
    };
    ProbeResult {
        cpl3_us: cpl3.as_ref().ok().copied(),
        cpl0_us: cpl0.as_ref().ok().copied(),
        timed_out: matches!(cpl0, Err((true, _))),
        error,
    }
}
