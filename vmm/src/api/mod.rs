//! The API socket: HTTP/1.1 with JSON bodies on a Unix socket (`--api-socket`),
//! served from the main thread's event loop, one request per connection. The
//! endpoints are described in docs/openapi.yaml; `mosaic ctl` is its client.

pub mod client;
pub mod http;
pub mod routes;

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
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

/// Where the API listens.
#[derive(Debug)]
pub enum ApiSocket {
    /// Bind a new socket at this path.
    Bind(PathBuf),
    /// A listening socket handed over by a live update, with its path.
    Inherited {
        /// Its path (removed at exit).
        path: PathBuf,
        /// The listening socket.
        fd: OwnedFd,
    },
}

/// The live-update state the API shares with the update thread.
#[derive(Debug, Default)]
pub struct LiveState {
    /// An update is running.
    pub busy: AtomicBool,
    /// The guest was handed over: the socket file now belongs to the new process.
    pub handed_over: AtomicBool,
    /// The new process, once committed to.
    pub new_pid: std::sync::atomic::AtomicU32,
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
    /// What a live update needs of the running VM.
    pub live: Arc<crate::live::Source>,
    /// Whether an update runs, and whether the guest was handed over.
    pub live_state: Arc<LiveState>,
}

impl ApiContext {
    /// Kicks every vCPU thread out of KVM_RUN.
    pub fn kick(&self) {
        crate::vm::vcpu::kick_threads(&self.vcpu_threads);
    }

    /// `GET /api/v1/vm`.
    pub fn vm_info(&self) -> Value {
        let state = if self.ctl.stopping() {
            "stopping"
        } else if self.live_state.busy.load(Ordering::SeqCst) {
            "live-updating"
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
            "live_update_generation": self.live.devices.guest_ports().generation(),
            "pid": std::process::id(),
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

/// Binds a listening socket at `path`, which appears only once it listens and is
/// 0600: bound under a temporary name in the same directory, then renamed (never over
/// an existing file). A client that saw the path and connected at once was refused
/// (ECONNREFUSED) when it came between bind and listen, or found it with the umask's
/// mode before the chmod.
fn bind_private(path: &Path) -> Result<UnixListener, ApiError> {
    let err = |source| ApiError::Bind { path: path.to_path_buf(), source };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.binding", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let Ok(listener) = UnixListener::bind(&tmp) else {
        // The longer name may not fit a socket address: bind in place.
        let listener = UnixListener::bind(path).map_err(err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        return Ok(listener);
    };
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).and_then(|()| {
        let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other);
        let (from, to) = (c(&tmp)?, c(path)?);
        // SAFETY: renameat2 reads two NUL-terminated paths that live for the call.
        let r = unsafe {
            libc::renameat2(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), libc::RENAME_NOREPLACE)
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    });
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    Ok(listener)
}

/// The listening socket; removed from the filesystem when dropped.
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    ctx: ApiContext,
}

impl ApiServer {
    /// Serves on `sock`: a new socket (the path must not exist; created 0600) or one
    /// handed over by a live update.
    pub fn new(sock: ApiSocket, ctx: ApiContext) -> Result<Self, ApiError> {
        let (listener, path) = match sock {
            ApiSocket::Bind(path) => {
                if path.exists() {
                    return Err(ApiError::Exists(path));
                }
                (bind_private(&path)?, path)
            }
            ApiSocket::Inherited { path, fd } => (UnixListener::from(fd), path),
        };
        let server = ApiServer { listener, path, ctx };
        let err = |source| ApiError::Bind { path: server.path.clone(), source };
        server.listener.set_nonblocking(true).map_err(err)?;
        Ok(server)
    }

    /// Sets the vCPU threads to kick (known once they are started).
    pub fn set_vcpu_threads(&mut self, threads: Vec<libc::pthread_t>) {
        self.ctx.vcpu_threads = threads;
    }

    /// A duplicate of the listening socket and its path, for a live update to hand over.
    pub fn listener(&self) -> Option<(PathBuf, OwnedFd)> {
        use std::os::fd::AsFd;
        self.listener.as_fd().try_clone_to_owned().ok().map(|fd| (self.path.clone(), fd))
    }

    fn serve(&self, mut conn: UnixStream) {
        let _ = conn.set_nonblocking(false);
        let _ = conn.set_read_timeout(Some(http::READ_TIMEOUT));
        let _ = conn.set_write_timeout(Some(http::READ_TIMEOUT));
        let (status, body) = match http::read_request(&mut conn) {
            Ok(req) if req.method == "PUT" && req.path == "/api/v1/vm/live-update" => {
                match routes::start_live_update(&req, &self.ctx, self.listener()) {
                    // The update thread answers on the connection when it is done.
                    Ok(job) => return job.run_on(conn),
                    Err(answer) => answer,
                }
            }
            Ok(req) => routes::handle(&req, &self.ctx),
            Err(e) => (e.status(), Some(json!({ "error": e.to_string() }))),
        };
        let _ = http::write_response(&mut conn, status, body.as_ref());
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        // After a live update the socket file is the new process's.
        if !self.ctx.live_state.handed_over.load(Ordering::SeqCst) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl MutEventSubscriber for ApiServer {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        if self.ctx.live_state.handed_over.load(Ordering::SeqCst) {
            // The new process serves the socket now; this one is about to exit.
            std::thread::sleep(std::time::Duration::from_millis(1));
            return;
        }
        while let Ok((conn, _)) = self.listener.accept() {
            self.serve(conn);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new_raw(self.listener.as_raw_fd(), EventSet::IN));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_appears_listening_private_and_never_over_a_file() {
        let dir = std::env::temp_dir().join(format!("mosaic-api-bind-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let _ = std::fs::remove_file(&path);
        let listener = bind_private(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        // Nothing left under the temporary name.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        UnixStream::connect(&path).unwrap();
        assert!(listener.accept().is_ok());
        // An existing file is never replaced.
        let other = dir.join("taken");
        std::fs::write(&other, b"keep").unwrap();
        assert!(bind_private(&other).is_err());
        assert_eq!(std::fs::read(&other).unwrap(), b"keep");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
