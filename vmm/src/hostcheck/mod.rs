//! `mosaic host-check`: what this host can do for Mosaic.
//!
//! [`report`] gathers KVM capabilities, the kernel-mode verdict (from a probe the caller
//! ran), hugetlb pools, THP settings and NUMA nodes into a [`HostReport`]; [`run`]
//! renders it as an aligned table or as pretty JSON. Every row says what the value
//! means for Mosaic.

mod probe;
mod render;
mod report;

use std::path::Path;

pub use probe::{native_kernel_mode, ProbeResult};
pub use render::{render_json, render_text, rows, Row};
pub use report::{gather, kvm_info, HostReport, HugePool, KernelMode, KvmInfo};

/// Errors of `host-check`.
#[derive(Debug, thiserror::Error)]
pub enum HostCheckError {
    /// The report could not be serialized.
    #[error("serializing the host report: {0}")]
    Json(#[source] serde_json::Error),
}

/// Gathers the host report from `/dev/kvm` and `/sys`. `probe` is the caller's
/// kernel-mode probe result (`None`: not probed, `kernel_mode.native` is false).
///
/// Unreadable sections do not fail the call: they are left empty and listed in
/// [`HostReport::errors`] (KVM being unavailable shows as `kvm.available == false`).
pub fn report(probe: Option<ProbeResult>) -> Result<HostReport, HostCheckError> {
    Ok(gather(Path::new(hugepage::SYSFS_ROOT), kvm_info(), probe.as_ref()))
}

/// Runs `host-check`: the text to print, a table or (with `json`) pretty JSON.
pub fn run(json: bool, probe: Option<ProbeResult>) -> Result<String, HostCheckError> {
    let r = report(probe)?;
    if json {
        render_json(&r)
    } else {
        Ok(render_text(&r))
    }
}

#[cfg(test)]
mod tests;
