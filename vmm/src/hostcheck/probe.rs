//! The kernel-mode probe result the caller passes in, and its verdict.

use serde::{Deserialize, Serialize};

/// Timings of a tiny guest program run once at CPL3 and once at CPL0 (measured by the
/// caller). On hosts that emulate kernel-mode code (kvm_pvm) the CPL0 run is ~1000x
/// slower, times out, or fails with an emulation error.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeResult {
    /// Microseconds the CPL3 run took; `None` if it did not complete.
    pub cpl3_us: Option<u64>,
    /// Microseconds the CPL0 run took; `None` if it did not complete.
    pub cpl0_us: Option<u64>,
    /// The probe gave up waiting (CPL0 code did not finish in time).
    pub timed_out: bool,
    /// What went wrong, if anything (e.g. an emulation failure exit).
    pub error: Option<String>,
}

/// Verdict: kernel-mode guest code runs natively. True when the CPL0 run completed
/// without a timeout and `cpl0_us <= 5 * cpl3_us + 2000` (a missing CPL3 time counts
/// as 0, leaving the 2 ms allowance). `error` is informational: a completed CPL0 run
/// decides.
pub fn native_kernel_mode(p: &ProbeResult) -> bool {
    if p.timed_out {
        return false;
    }
    match p.cpl0_us {
        Some(cpl0) => cpl0 <= p.cpl3_us.unwrap_or(0).saturating_mul(5).saturating_add(2000),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(cpl3: Option<u64>, cpl0: Option<u64>, timed_out: bool) -> ProbeResult {
        ProbeResult { cpl3_us: cpl3, cpl0_us: cpl0, timed_out, error: None }
    }

    #[test]
    fn verdicts() {
        assert!(native_kernel_mode(&p(Some(100), Some(120), false)));
        assert!(native_kernel_mode(&p(Some(100), Some(2500), false)));
        assert!(!native_kernel_mode(&p(Some(100), Some(2501), false)));
        assert!(!native_kernel_mode(&p(Some(60), Some(45_000), false)));
        assert!(!native_kernel_mode(&p(Some(60), None, false)));
        assert!(!native_kernel_mode(&p(Some(60), Some(10), true)));
        assert!(native_kernel_mode(&p(None, Some(1500), false)));
        assert!(native_kernel_mode(&p(Some(u64::MAX), Some(u64::MAX), false)));
        assert!(!native_kernel_mode(&ProbeResult::default()));
    }
}
