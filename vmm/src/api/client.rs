//! `mosaic ctl`: the API socket's client.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use thiserror::Error;

/// Errors talking to the API socket.
#[derive(Debug, Error)]
pub enum ClientError {
    /// No VMM listens there.
    #[error("cannot connect to '{path}': {source}")]
    Connect {
        /// Socket path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The exchange failed.
    #[error("API socket error: {0}")]
    Io(#[from] std::io::Error),
    /// The answer is not HTTP.
    #[error("malformed answer from the VMM")]
    Malformed,
}

/// An answer: status and JSON body (`Null` when empty).
#[derive(Debug)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// Body.
    pub body: serde_json::Value,
}

/// Sends `method path` with an optional JSON body and reads the answer.
pub fn request(socket: &Path, method: &str, path: &str, body: Option<&str>) -> Result<Answer, ClientError> {
    let mut s = UnixStream::connect(socket)
        .map_err(|source| ClientError::Connect { path: socket.display().to_string(), source })?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(&buf) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return Err(ClientError::Malformed),
    };
    let status = resp.code.ok_or(ClientError::Malformed)?;
    let text = &buf[head..];
    let body = if text.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(text).map_err(|_| ClientError::Malformed)?
    };
    Ok(Answer { status, body })
}
