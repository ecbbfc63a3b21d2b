//! The API socket: HTTP/1.1 with JSON bodies on a Unix socket (`--api-socket`),
//! served from the main thread's event loop, one request per connection. The
//! endpoints are described in docs/openapi.yaml; `mosaic ctl` is its client.

pub mod client;
pub mod http;
pub mod routes;

use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use guest_mem::GuestMemory;
use serde_json::{json, Value};
use thiserror::Error;
use vmm_sys_util::epoll::EventSet;

use crate::kvm::stats::StatsFd;
use crate::run::report;
use crate::vm::control::RunControl;

/// Errors from setting up the socket.
#[derive(Debug, Error)]
pub enum ApiError {
    /// The path exists already.
    #[error("--api-socket: '{0}' already exists (a running Mosaic, or a stale socket to remove)")]
    Exists(PathBuf),
    /// Binding failed.
    #[error("--api-socket: cannot listen on '{path}'")]
    Bind {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// What the endpoints read and act on.
pub struct ApiContext {
    /// Run control (pause, resume, shutdown).
    pub ctl: Arc<RunControl>,
    /// Guest memory.
    pub mem: Arc<GuestMemory>,
    /// The VM's KVM stats.
    pub vm_stats: Option<Arc<StatsFd>>,
    /// Guest program or kernel.
    pub guest: String,
    /// vCPU threads, to kick out of KVM_RUN.
    pub vcpu_threads: Vec<libc::pthread_t>,
    /// Per-zone choices (asked/got).
    pub zones: Value,
}

impl ApiContext {
    /// Kicks every vCPU thread out of KVM_RUN.
    pub fn kick(&self) {
        for &t in &self.vcpu_threads {
            // SAFETY: the threads are the run's vCPU threads, which are joined only
            // after the event loop (and so this API) has stopped; a thread that has
            // already returned (parked) is still a valid, unjoined pthread_t.
            unsafe { libc::pthread_kill(t, crate::vm::vcpu::kick_signal()) };
        }
    }

    /// `GET /api/v1/vm`.
    pub fn vm_info(&self) -> Value {
        let state = if self.ctl.stopping() {
            "stopping"
        } else if self.ctl.pause_requested() {
            "paused"
        } else {
            "running"
        };
        json!({
            "state": state,
            "guest": self.guest,
            "vcpus": self.vcpu_threads.len(),
            "uptime_ms": self.ctl.uptime().as_millis() as u64,
            "memory_zones": self.zones,
        })
    }

    /// `GET /api/v1/vm/memory`.
    pub fn memory_info(&self) -> Value {
        let regions = report::regions(&self.mem);
        let kvm = self.vm_stats.as_ref().and_then(|s| s.read().ok()).unwrap_or_default();
        let coverage = report::Coverage::new(&kvm, &regions);
        json!({
            "regions": regions,
            "coverage": coverage,
            "private_memory": report::PrivateReport::new(&self.mem),
        })
    }
}

/// The listening socket; removed from the filesystem when dropped.
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    ctx: ApiContext,
}

impl ApiServer {
    /// Listens on `path` (which must not exist), mode 0600.
    pub fn bind(path: &Path, ctx: ApiContext) -> Result<Self, ApiError> {
        if path.exists() {
            return Err(ApiError::Exists(path.into()));
        }
        let err = |source| ApiError::Bind { path: path.into(), source };
        let listener = UnixListener::bind(path).map_err(err)?;
        let server = ApiServer { listener, path: path.into(), ctx };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        server.listener.set_nonblocking(true).map_err(err)?;
        Ok(server)
    }

    /// Sets the vCPU threads to kick (known once they are started).
    pub fn set_vcpu_threads(&mut self, threads: Vec<libc::pthread_t>) {
        self.ctx.vcpu_threads = threads;
    }

    fn serve(&self, mut conn: UnixStream) {
        let _ = conn.set_nonblocking(false);
        let _ = conn.set_read_timeout(Some(http::READ_TIMEOUT));
        let _ = conn.set_write_timeout(Some(http::READ_TIMEOUT));
        let (status, body) = match http::read_request(&mut conn) {
            Ok(req) => routes::handle(&req, &self.ctx),
            Err(e) => (e.status(), Some(json!({ "error": e.to_string() }))),
        };
        let _ = http::write_response(&mut conn, status, body.as_ref());
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl MutEventSubscriber for ApiServer {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        while let Ok((conn, _)) = self.listener.accept() {
            self.serve(conn);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new_raw(self.listener.as_raw_fd(), EventSet::IN));
    }
}
