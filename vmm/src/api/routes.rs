//! API v1 endpoints (docs/openapi.yaml): what each request does and answers.

use serde_json::{json, Value};

use super::http::Request;
use super::ApiContext;
use crate::vm::control::Outcome;

/// How long a pause may take before the API gives up (the vCPUs are kicked out of
/// KVM_RUN; a guest cannot hold this up for long).
const PAUSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

fn error(status: u16, message: impl Into<String>) -> (u16, Option<Value>) {
    (status, Some(json!({ "error": message.into() })))
}

/// Answers one request: a status and an optional JSON body.
pub fn handle(req: &Request, ctx: &ApiContext) -> (u16, Option<Value>) {
    const VM: &str = "/api/v1/vm";
    let known = ["", "/memory", "/pause", "/resume", "/shutdown", "/live-update"];
    let Some(sub) = req.path.strip_prefix(VM).filter(|s| known.contains(s)) else {
        return error(404, format!("no such endpoint: {}", req.path));
    };
    let body_ok = req.body.is_empty() || serde_json::from_slice::<serde_json::Map<String, Value>>(&req.body).is_ok();
    if !body_ok {
        return error(400, "the body must be empty or a JSON object");
    }
    let updating = ctx.live_state.busy.load(std::sync::atomic::Ordering::SeqCst);
    match (req.method.as_str(), sub) {
        ("GET", "") => (200, Some(ctx.vm_info())),
        ("GET", "/memory") => (200, Some(ctx.memory_info())),
        ("PUT", "/pause" | "/resume" | "/shutdown" | "/live-update") if updating => {
            error(409, "a live update is in progress; try again when it has finished")
        }
        ("PUT", "/pause" | "/resume" | "/shutdown") if !req.body.is_empty() && req.body != b"{}" => {
            error(400, "this request takes no fields")
        }
        ("PUT", "/pause") => {
            if ctx.ctl.pause_requested() {
                return error(409, "the VM is already paused");
            }
            if ctx.ctl.pause(|| ctx.kick(), PAUSE_TIMEOUT) {
                (204, None)
            } else {
                ctx.ctl.resume();
                error(503, "the vCPUs did not pause in time; the VM runs on")
            }
        }
        ("PUT", "/resume") => {
            if !ctx.ctl.pause_requested() {
                return error(409, "the VM is not paused");
            }
            ctx.ctl.resume();
            (204, None)
        }
        ("PUT", "/shutdown") => {
            ctx.ctl.finish(Outcome::ApiShutdown);
            (204, None)
        }
        ("PUT", "/live-update") => match start_live_update(req, ctx, None) {
            Ok(_) => error(500, "a live update needs the API server's connection"),
            Err(answer) => answer,
        },
        (m, _) => error(405, format!("{m} is not allowed on {}", req.path)),
    }
}

/// The body of `PUT /api/v1/vm/live-update`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LiveUpdateBody {
    /// The Mosaic binary to start (default: the running one).
    #[serde(default)]
    binary: Option<std::path::PathBuf>,
    /// The `--incoming` socket of a Mosaic process the operator started.
    #[serde(default)]
    incoming: Option<std::path::PathBuf>,
}

/// Checks a live-update request and claims the one update slot. `Err` is the
/// answer to send at once (bad body, busy, paused, stopping).
pub fn start_live_update(
    req: &Request,
    ctx: &ApiContext,
    listener: Option<(std::path::PathBuf, std::os::fd::OwnedFd)>,
) -> Result<crate::live::Job, (u16, Option<Value>)> {
    use std::sync::atomic::Ordering;
    if ctx.live_state.busy.load(Ordering::SeqCst) {
        return Err(error(409, "a live update is already in progress"));
    }
    let body: LiveUpdateBody = if req.body.is_empty() {
        LiveUpdateBody::default()
    } else {
        serde_json::from_slice(&req.body).map_err(|e| error(400, format!("bad live-update body: {e}")))?
    };
    let target = match (body.binary, body.incoming) {
        (Some(_), Some(_)) => return Err(error(400, "give either binary or incoming, not both")),
        (None, Some(sock)) => crate::live::Target::Incoming(sock),
        (Some(bin), None) => {
            if !bin.is_file() {
                return Err(error(400, format!("binary '{}' is not a file", bin.display())));
            }
            crate::live::Target::Binary(bin)
        }
        (None, None) => crate::live::Target::Binary(
            std::env::current_exe().map_err(|e| error(500, format!("cannot find the running binary: {e}")))?,
        ),
    };
    if ctx.ctl.stopping() {
        return Err(error(409, "the VM is stopping"));
    }
    if ctx.ctl.pause_requested() {
        return Err(error(409, "the VM is paused; resume it before a live update"));
    }
    if let Err(reason) = ctx.live.can_hand_over() {
        return Err(error(409, reason));
    }
    let Some(listener) = listener else {
        return Err(error(500, "the API socket cannot be handed over"));
    };
    if ctx.live_state.busy.swap(true, Ordering::SeqCst) {
        return Err(error(409, "a live update is already in progress"));
    }
    Ok(crate::live::Job {
        source: ctx.live.clone(),
        state: ctx.live_state.clone(),
        target,
        threads: ctx.vcpu_threads.clone(),
        api: listener,
    })
}
