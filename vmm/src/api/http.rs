//! HTTP/1.1 over a Unix socket, one request per connection: requests parsed with
//! httparse, bounded in size and time; responses with JSON bodies.

use std::io::{self, Read, Write};
use std::time::Duration;

use thiserror::Error;

/// Largest request head (request line and headers).
pub const MAX_HEAD: usize = 16 << 10;
/// Largest request body.
pub const MAX_BODY: usize = 64 << 10;
/// How long a client may take to send its request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Method (`GET`, `PUT`, ...).
    pub method: String,
    /// Path, without query.
    pub path: String,
    /// Body bytes.
    pub body: Vec<u8>,
}

/// Why a request could not be read.
#[derive(Debug, Error)]
pub enum HttpError {
    /// Not valid HTTP, or the client closed or stalled mid-request.
    #[error("{0}")]
    Malformed(String),
    /// Head or body over the limits.
    #[error("request too large (head at most {MAX_HEAD} bytes, body at most {MAX_BODY})")]
    TooLarge,
    /// The socket failed.
    #[error("socket error")]
    Io(#[from] io::Error),
}

impl HttpError {
    /// The HTTP status to answer with.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::Malformed(_) | HttpError::Io(_) => 400,
            HttpError::TooLarge => 413,
        }
    }
}

/// Reads one request from `s`.
pub fn read_request(s: &mut impl Read) -> Result<Request, HttpError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(head)) => {
                let method = req.method.unwrap_or("").to_string();
                let path = req.path.unwrap_or("").split('?').next().unwrap_or("").to_string();
                let mut len = 0usize;
                for h in req.headers.iter() {
                    if h.name.eq_ignore_ascii_case("content-length") {
                        len = std::str::from_utf8(h.value)
                            .ok()
                            .and_then(|v| v.trim().parse().ok())
                            .ok_or_else(|| HttpError::Malformed("invalid Content-Length".into()))?;
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        return Err(HttpError::Malformed("chunked bodies are not accepted".into()));
                    }
                }
                if len > MAX_BODY {
                    return Err(HttpError::TooLarge);
                }
                while buf.len() < head + len {
                    let n = s.read(&mut chunk)?;
                    if n == 0 {
                        return Err(HttpError::Malformed("connection closed before the body was complete".into()));
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let body = buf[head..head + len].to_vec();
                return Ok(Request { method, path, body });
            }
            Ok(httparse::Status::Partial) => {
                if buf.len() > MAX_HEAD {
                    return Err(HttpError::TooLarge);
                }
                let n = match s.read(&mut chunk) {
                    Ok(n) => n,
                    Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                        return Err(HttpError::Malformed("request not received in time".into()))
                    }
                    Err(e) => return Err(e.into()),
                };
                if n == 0 {
                    return Err(HttpError::Malformed("connection closed before the request was complete".into()));
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            Err(e) => return Err(HttpError::Malformed(format!("malformed request: {e}"))),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Writes a response; `body` is JSON (none for 204).
pub fn write_response(s: &mut impl Write, status: u16, body: Option<&serde_json::Value>) -> io::Result<()> {
    let text = body.map(|b| serde_json::to_string_pretty(b).unwrap_or_default() + "\n").unwrap_or_default();
    let mut out = format!("HTTP/1.1 {status} {}\r\nConnection: close\r\n", reason(status));
    if !text.is_empty() {
        out.push_str("Content-Type: application/json\r\n");
    }
    out.push_str(&format!("Content-Length: {}\r\n\r\n{text}", text.len()));
    s.write_all(out.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Request, HttpError> {
        read_request(&mut &raw[..])
    }

    #[test]
    fn parses_requests_and_refuses_bad_ones() {
        let r = parse(b"PUT /api/v1/vm/pause?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}").unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str(), r.body.as_slice()), ("PUT", "/api/v1/vm/pause", &b"{}"[..]));
        assert!(matches!(parse(b"GARBAGE\x00\r\n\r\n"), Err(HttpError::Malformed(_))));
        assert!(matches!(parse(b"GET / HTTP/1.1\r\nHost: x\r\n"), Err(HttpError::Malformed(_))), "half-closed");
        assert!(matches!(parse(b"PUT / HTTP/1.1\r\nContent-Length: 5\r\n\r\n{}"), Err(HttpError::Malformed(_))));
        assert!(matches!(parse(b"PUT / HTTP/1.1\r\nContent-Length: 999999\r\n\r\n"), Err(HttpError::TooLarge)));
        assert!(matches!(parse(b"PUT / HTTP/1.1\r\nContent-Length: x\r\n\r\n"), Err(HttpError::Malformed(_))));
        let big = [b"GET / HTTP/1.1\r\nX: ".as_slice(), &vec![b'a'; MAX_HEAD + 10]].concat();
        assert!(matches!(parse(&big), Err(HttpError::TooLarge)));
    }

    #[test]
    fn writes_responses() {
        let mut out = Vec::new();
        write_response(&mut out, 404, Some(&serde_json::json!({"error": "no"}))).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(text.contains("Content-Type: application/json") && text.ends_with("}\n"));
    }
}
