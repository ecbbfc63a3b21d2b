//! Live update: a running guest handed to a new Mosaic process without copying its
//! memory (docs/LIVE-UPDATE.md).
//!
//! ```text
//!  old process (source.rs)                 new process (incoming.rs)
//!  ───────────────────────                 ─────────────────────────
//!  make the commit word (arbiter.rs)
//!  start `mosaic run --incoming fd:N`  ─►  (or the operator started it on a socket)
//!  Hello + fds (zones, console, API) ───►  map the fds, build VM, memslots, vCPUs,
//!  Arbiter + the commit word's fd    ───►  devices                (guest still runs)
//!                                     ◄─── Prepared
//!  pause vCPUs, capture state (pause+save)
//!  State (MOSAICST v2 frame)         ───►  restore VM, vCPUs, devices, attributes;
//!                                          commit word Pending → Committed; run
//!                                     ◄─── Started
//!  answer the API, exit 0                  serve the API socket it was handed
//! ```
//!
//! The guest's owner is decided by one compare-and-swap on the commit word: the new
//! process runs the guest only after swapping in Committed; the old one resumes it
//! (when the new process failed, died or stalled) only after swapping in Aborted.
//! Protocol v1 (older builds: Ready and Commit messages instead of the word) is still
//! answered by the new process's side (`wire::PROTOCOL_VERSION`).

pub mod arbiter;
pub mod incoming;
pub mod source;
pub mod trace;
pub mod warm;
pub mod wire;

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::api::LiveState;
use crate::devices::Devices;
use crate::preflight::PoolGrant;
use crate::state::format::FormatError;
use crate::vm::control::RunControl;
use crate::vm::Vm;

pub use incoming::Incoming;

/// Why a live update failed.
#[derive(Debug, Error)]
pub enum LiveError {
    /// This VM cannot be handed over (a backend without a shareable fd).
    #[error("this VM cannot be live-updated: {0}")]
    NotHandable(String),
    /// The new process could not be started or reached.
    #[error("cannot start the new process: {0}")]
    Start(String),
    /// The other side closed the channel.
    #[error("the other process closed the live-update channel (it exited or was killed)")]
    Closed,
    /// The other side did not answer in time.
    #[error("the other process did not answer in time")]
    Timeout,
    /// The channel failed.
    #[error("live-update channel error: {0}")]
    Channel(String),
    /// A message or the state was refused by its checks.
    #[error("refused: {0}")]
    Refused(#[source] FormatError),
    /// A message out of order or not understood.
    #[error("live-update protocol error: {0}")]
    Protocol(String),
    /// The other side reported a failure.
    #[error("the other process failed: {0}")]
    Peer(String),
    /// The vCPUs did not pause in time.
    #[error("the vCPUs did not pause in time")]
    Pause,
    /// Capturing the state failed.
    #[error("cannot capture the VM state: {0}")]
    Capture(String),
    /// The old process gave up on the update (protocol v2's commit word says so)
    /// before the new one could commit.
    #[error("the old process gave up on it before this one could commit (it timed out or failed) and keeps the guest")]
    Aborted,
    /// Building or restoring the VM in the new process failed.
    #[error("cannot restore the VM: {0}")]
    Restore(String),
}

/// Where the guest goes.
#[derive(Debug, Clone)]
pub enum Target {
    /// Start this Mosaic binary as the new process.
    Binary(PathBuf),
    /// Connect to a Mosaic process the operator started with `--incoming SOCKET`.
    Incoming(PathBuf),
}

/// What crosses to the new process besides the guest state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HandoverInfo {
    /// The stats file to write when the guest ends.
    pub stats_json: Option<PathBuf>,
    /// Hugetlb pool pages to give back when the guest ends.
    pub pool_grants: Vec<PoolGrant>,
    /// Per-zone settings as the API shows them (JSON text).
    pub zones_json: String,
}

/// Which fds travel with [`Hello`], in this order: one per zone, then the console
/// (if any), then the API socket (if any).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdLayout {
    /// Zone fds.
    pub zones: u32,
    /// The console output fd follows.
    pub console: bool,
    /// The listening API socket follows.
    pub api: bool,
}

impl FdLayout {
    /// Number of fds.
    pub fn count(&self) -> usize {
        self.zones as usize + usize::from(self.console) + usize::from(self.api)
    }
}

/// The VM's shape, sent first so the new process can build everything while the guest
/// still runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// Guest RAM layout, with each zone's backend.
    pub layout: guest_mem::MemoryLayout,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest program name or kernel path.
    pub guest: String,
    /// A guest program (its CPL0 stubs report exceptions on port 0x510).
    pub is_program: bool,
    /// The VM has an in-kernel PIT.
    pub pit: bool,
    /// API socket path, when its fd follows.
    pub api_socket: Option<PathBuf>,
    /// CLOCK_MONOTONIC (ns) when the guest's first process started.
    pub start_monotonic_ns: u64,
    /// The rest.
    pub info: HandoverInfo,
    /// The fds that came with this message.
    pub fds: FdLayout,
}

/// The running VM, as the live-update path sees it.
pub struct Source {
    /// The VM.
    pub vm: Arc<Vm>,
    /// Its devices.
    pub devices: Arc<Devices>,
    /// Run control.
    pub ctl: Arc<RunControl>,
    /// Guest name.
    pub guest: String,
    /// A guest program.
    pub is_program: bool,
    /// When the guest's first process started.
    pub start_ns: u64,
    /// What else crosses.
    pub info: HandoverInfo,
}

impl Source {
    /// Refuses VMs whose memory cannot be handed over as fds.
    pub fn can_hand_over(&self) -> Result<(), String> {
        if self.vm.memory().engine() == guest_mem::EngineKind::Kernel {
            return Err("the kernel conversion engine keeps private pages in guest_memfds, which the kernel binds to \
                        this VM; a new process cannot adopt them"
                .into());
        }
        for (i, z) in self.vm.memory().layout().zones().iter().enumerate() {
            guest_mem::backend::can_hand_over(&z.backend).map_err(|r| format!("memory zone {i}: {r}"))?;
        }
        Ok(())
    }
}

/// How long each phase took, in microseconds, and what it moved.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The new process.
    pub pid: u32,
    /// Guest-visible downtime: vCPUs paused in the old process to running in the new.
    pub downtime_us: u64,
    /// Before the pause (the guest runs): start the new process, hand over the fds,
    /// build its VM.
    pub prepare_us: u64,
    /// Kick the vCPUs out of KVM_RUN.
    pub pause_us: u64,
    /// Capture vCPU, VM, device and attribute state and encode it.
    pub save_us: u64,
    /// Send the state until the new process has it.
    pub transfer_us: u64,
    /// Restore it in the new process.
    pub restore_us: u64,
    /// Commit and start the vCPUs in the new process.
    pub resume_us: u64,
    /// Size of the state frame.
    pub state_bytes: usize,
    /// Live updates this guest has gone through, this one included.
    pub generation: u64,
}

/// One claimed live update, run on its own thread (the event loop keeps serving the
/// API, answering 409 to anything that would interfere).
pub struct Job {
    /// The VM.
    pub source: Arc<Source>,
    /// The busy/handed-over flags.
    pub state: Arc<LiveState>,
    /// Where the guest goes.
    pub target: Target,
    /// vCPU threads to kick.
    pub threads: Vec<libc::pthread_t>,
    /// The API socket to hand over.
    pub api: (PathBuf, OwnedFd),
}

impl Job {
    /// Runs the update on a new thread, answering on `conn` when done.
    pub fn run_on(self, conn: std::os::unix::net::UnixStream) {
        let spawned = std::thread::Builder::new().name("live-update".into()).spawn(move || {
            let mut conn = conn;
            let (status, body) = match source::update(&self) {
                Ok(r) => {
                    eprintln!(
                        "mosaic: live update to process {}: downtime {} us (pause {}, save {}, transfer {}, restore {}, \
                         resume {}); prepared in {} us, state {} bytes",
                        r.pid,
                        r.downtime_us,
                        r.pause_us,
                        r.save_us,
                        r.transfer_us,
                        r.restore_us,
                        r.resume_us,
                        r.prepare_us,
                        r.state_bytes
                    );
                    (200, serde_json::to_value(&r).unwrap_or_default())
                }
                Err(e) => {
                    let message = crate::error_chain(&e);
                    eprintln!("mosaic: live update failed, the guest runs on here: {message}");
                    let status = if matches!(e, LiveError::NotHandable(_)) { 409 } else { 502 };
                    (status, serde_json::json!({ "error": message }))
                }
            };
            use std::sync::atomic::Ordering;
            let handed_over = self.state.handed_over.load(Ordering::SeqCst);
            if !handed_over {
                // Free before the answer: a client that reads it may ask again at once.
                self.state.busy.store(false, Ordering::SeqCst);
            }
            let _ = crate::api::http::write_response(&mut conn, status, Some(&body));
            drop(conn);
            if handed_over {
                // Only now (the answer is out) may this process end.
                let pid = self.state.new_pid.load(Ordering::SeqCst);
                self.source.ctl.finish(crate::vm::control::Outcome::HandedOver { pid });
            }
        });
        if spawned.is_err() {
            eprintln!("mosaic: cannot start the live-update thread");
        }
    }
}
