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
    match (req.method.as_str(), sub) {
        ("GET", "") => (200, Some(ctx.vm_info())),
        ("GET", "/memory") => (200, Some(ctx.memory_info())),
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
        ("PUT", "/live-update") => error(501, "live update is not available in this version of Mosaic"),
        (m, _) => error(405, format!("{m} is not allowed on {}", req.path)),
    }
}
