//! The live-update channel: checked, versioned messages on a Unix stream socket, with
//! file descriptors passed as SCM_RIGHTS alongside the first message.
//!
//! Every message is one frame ([`crate::state::format::FrameKind`], magic
//! `MOSAICLU`): header, postcard payload of [`Message`], CRC-32. A frame is read
//! header first, so an announced length above [`MAX_MESSAGE`] is refused before
//! anything is allocated for it.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::{Hello, LiveError};
use crate::state::format::{FrameKind, HEADER_LEN, TRAILER_LEN};

/// The protocol version this build speaks.
///
/// - 1: Hello, Prepared, State, Ready, Commit, Running: the commit is a round trip
///   over the socket while the guest is paused.
/// - 2: Hello, Arbiter, Prepared, State, Started: the commit is decided on a shared
///   word ([`super::arbiter`]), so nothing crosses the socket between the state and
///   the guest running again.
///
/// A new process answers in the version of the Hello it got, so an older old process
/// (v1) hands over to this build; this build's Hello is refused by a v1 build (the
/// update fails and the guest runs on).
pub const PROTOCOL_VERSION: u32 = 2;

/// The oldest protocol version this build speaks.
pub const OLDEST_PROTOCOL_VERSION: u32 = 1;

/// Live-update message frames.
pub const MESSAGES: FrameKind = FrameKind {
    magic: *b"MOSAICLU",
    oldest: OLDEST_PROTOCOL_VERSION,
    newest: PROTOCOL_VERSION,
    what: "a Mosaic live-update message",
};

/// Largest message accepted (the state of 1,024 vCPUs and 16,384 private ranges fits
/// with room to spare).
pub const MAX_MESSAGE: usize = 64 << 20;

/// Most fds one message may carry (zones, console, API socket).
pub const MAX_FDS: usize = 64;

/// Sorts a socket error: the peer gone (EOF, reset, broken pipe), a timeout, or else.
fn io_error(e: io::Error) -> LiveError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => LiveError::Closed,
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => LiveError::Timeout,
        _ => LiveError::Channel(e.to_string()),
    }
}

/// What the two processes say to each other, in order (old → new unless noted).
#[derive(Debug, Serialize, Deserialize)]
pub enum Message {
    /// The VM's shape; the fds travel with it.
    Hello(Box<Hello>),
    /// new → old: memory mapped, VM, memslots, vCPUs and devices built.
    Prepared {
        /// The new process.
        pid: u32,
    },
    /// The guest state: a `MOSAICST` frame (state format version 2). Encoded as one
    /// byte string (the same bytes postcard writes for a `Vec<u8>` element by element,
    /// which took ~40 µs each way for 17 KB, inside the pause).
    State(#[serde(with = "serde_bytes")] Vec<u8>),
    /// new → old: everything restored; the new process waits for the commit.
    Ready {
        /// CLOCK_MONOTONIC (ns) when the state had been received.
        received_ns: u64,
        /// CLOCK_MONOTONIC (ns) when the restore was done.
        restored_ns: u64,
    },
    /// old → new: the old process has let go of the guest; run it.
    Commit,
    /// new → old: the vCPUs run.
    Running {
        /// CLOCK_MONOTONIC (ns) when the first vCPU thread was about to enter KVM_RUN.
        running_ns: u64,
    },
    /// Either way: this side gives up, and why.
    Failed(String),
    /// v2, old → new, right after the Hello: the commit word's memfd comes with it.
    Arbiter,
    /// v2, new → old: committed (on the commit word) and the vCPUs run.
    Started {
        /// CLOCK_MONOTONIC (ns) when the state had been received.
        received_ns: u64,
        /// CLOCK_MONOTONIC (ns) when the restore was done.
        restored_ns: u64,
        /// CLOCK_MONOTONIC (ns) when the first vCPU thread was about to enter KVM_RUN.
        running_ns: u64,
    },
}

impl Message {
    /// The message's name, for errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Prepared { .. } => "Prepared",
            Message::State(_) => "State",
            Message::Ready { .. } => "Ready",
            Message::Commit => "Commit",
            Message::Running { .. } => "Running",
            Message::Failed(_) => "Failed",
            Message::Arbiter => "Arbiter",
            Message::Started { .. } => "Started",
        }
    }
}

/// One end of the channel.
#[derive(Debug)]
pub struct Channel {
    sock: UnixStream,
    /// The version this end sends.
    version: u32,
    /// The version of the last frame received.
    peer_version: u32,
}

/// Where a receive stops early, for the fault-injection hook.
pub type PartialHook<'a> = Option<&'a dyn Fn(usize, usize)>;

impl Channel {
    /// Wraps a connected stream socket.
    pub fn new(sock: UnixStream) -> Self {
        Channel { sock, version: PROTOCOL_VERSION, peer_version: PROTOCOL_VERSION }
    }

    /// Sends in protocol `version` from now on (a new process answers in its old
    /// process's version; tests play older processes).
    pub fn set_version(&mut self, version: u32) {
        self.version = version;
    }

    /// The protocol version of the last message received.
    pub fn peer_version(&self) -> u32 {
        self.peer_version
    }

    /// The socket (tests send raw bytes through it).
    pub fn raw(&self) -> &UnixStream {
        &self.sock
    }

    /// Waits (sleeping) until a message starts to arrive, up to `timeout`.
    pub fn wait_readable(&self, timeout: Duration) -> Result<(), LiveError> {
        let deadline = std::time::Instant::now() + timeout;
        let mut p = libc::pollfd { fd: self.sock.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(LiveError::Timeout);
            }
            let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
            // SAFETY: poll on one valid pollfd we own.
            match unsafe { libc::poll(&mut p, 1, ms) } {
                n if n > 0 => return Ok(()),
                0 => {}
                _ if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
                _ => return Err(LiveError::Channel(io::Error::last_os_error().to_string())),
            }
        }
    }

    /// Sets the timeout of every following receive.
    pub fn set_timeout(&self, t: Duration) -> io::Result<()> {
        self.sock.set_read_timeout(Some(t))?;
        self.sock.set_write_timeout(Some(t))
    }

    /// Sends `msg` with `fds` (SCM_RIGHTS, attached to its first bytes).
    pub fn send(&mut self, msg: &Message, fds: &[RawFd]) -> Result<(), LiveError> {
        let payload = postcard::to_stdvec(msg).map_err(|e| LiveError::Protocol(format!("cannot encode: {e}")))?;
        let frame = MESSAGES.seal(self.version, &payload);
        let io_err = |e: io::Error| LiveError::Channel(format!("sending {}: {e}", msg.name()));
        let mut sent = 0;
        if !fds.is_empty() {
            sent = self
                .sock
                .send_with_fds(&[&frame[..]], fds)
                .map_err(|e| io_err(io::Error::from_raw_os_error(e.errno())))?;
        }
        self.sock.write_all(&frame[sent..]).map_err(io_err)
    }

    /// Receives one message and the fds that came with it (CLOEXEC set on each).
    /// `partial(read, total)` is called once half of the frame has arrived.
    pub fn recv(&mut self, partial: PartialHook<'_>) -> Result<(Message, Vec<OwnedFd>), LiveError> {
        let mut header = [0u8; HEADER_LEN];
        let fds = self.recv_head(&mut header)?;
        let (_, len) = MESSAGES.check_header(&header, MAX_MESSAGE).map_err(LiveError::Refused)?;
        let total = HEADER_LEN + len + TRAILER_LEN;
        let mut frame = Vec::with_capacity(total);
        frame.extend_from_slice(&header);
        frame.resize(total, 0);
        let half = total / 2;
        let io_err = io_error;
        if let (Some(hook), true) = (partial, half > HEADER_LEN) {
            self.sock.read_exact(&mut frame[HEADER_LEN..half]).map_err(io_err)?;
            hook(half, total);
            self.sock.read_exact(&mut frame[half..]).map_err(io_err)?;
        } else {
            self.sock.read_exact(&mut frame[HEADER_LEN..]).map_err(io_err)?;
        }
        let (version, payload) = MESSAGES.open(&frame, MAX_MESSAGE).map_err(LiveError::Refused)?;
        self.peer_version = version;
        match postcard::take_from_bytes::<Message>(payload) {
            Ok((msg, [])) => Ok((msg, fds)),
            Ok(_) => Err(LiveError::Protocol("bytes after the message".into())),
            Err(e) => Err(LiveError::Protocol(format!("message does not parse: {e}"))),
        }
    }

    /// Reads exactly the header, collecting the fds that arrive with its bytes.
    fn recv_head(&mut self, header: &mut [u8; HEADER_LEN]) -> Result<Vec<OwnedFd>, LiveError> {
        let mut fds = Vec::new();
        let mut got = 0;
        while got < HEADER_LEN {
            let mut raw = [-1 as RawFd; MAX_FDS];
            let rest = &mut header[got..];
            let mut iov = [libc::iovec { iov_base: rest.as_mut_ptr().cast(), iov_len: rest.len() }];
            // SAFETY: the iovec points into `header`, which we borrow mutably for the
            // call; any bytes may be written there.
            let r = unsafe { self.sock.recv_with_fds(&mut iov, &mut raw) };
            let (n, nfds) = match r {
                Ok(v) => v,
                Err(e) if e.errno() == libc::EINTR => continue,
                Err(e) => return Err(io_error(io::Error::from_raw_os_error(e.errno()))),
            };
            for &fd in raw.iter().take(nfds) {
                // SAFETY: recvmsg gave us these fds; nothing else owns them.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                // SAFETY: F_SETFD on an fd we own, with a valid flag.
                unsafe { libc::fcntl(owned.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
                fds.push(owned);
            }
            if n == 0 {
                return Err(LiveError::Closed);
            }
            got += n;
        }
        Ok(fds)
    }

    /// Sends `Failed(reason)`, best effort (the other side may be gone).
    pub fn fail(&mut self, reason: &str) {
        let _ = self.send(&Message::Failed(reason.to_string()), &[]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_fds_cross_a_socket_pair() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (Channel::new(a), Channel::new(b));
        b.set_timeout(Duration::from_secs(5)).unwrap();
        let f = std::fs::File::open("/proc/self/exe").unwrap();
        a.send(&Message::Prepared { pid: 42 }, &[f.as_raw_fd()]).unwrap();
        let (m, fds) = b.recv(None).unwrap();
        assert!(matches!(m, Message::Prepared { pid: 42 }));
        assert_eq!(fds.len(), 1);
        // SAFETY: F_GETFD on an fd we own.
        assert_ne!(unsafe { libc::fcntl(fds[0].as_raw_fd(), libc::F_GETFD) } & libc::FD_CLOEXEC, 0);
        // Bigger than the socket buffer: sent from another thread.
        let sender = std::thread::spawn(move || a.send(&Message::State(vec![7; 300_000]), &[]).is_ok());
        let halves = std::cell::Cell::new(0);
        let hook = |read: usize, total: usize| {
            assert!(read < total);
            halves.set(halves.get() + 1);
        };
        let (m, fds) = b.recv(Some(&hook)).unwrap();
        assert!(matches!(m, Message::State(ref v) if v.len() == 300_000));
        assert!(fds.is_empty());
        assert_eq!(halves.get(), 1);
        assert!(sender.join().unwrap());
    }

    #[test]
    fn a_closed_peer_a_silent_one_and_garbage_are_told_apart() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut b = Channel::new(b);
        b.set_timeout(Duration::from_millis(50)).unwrap();
        assert!(matches!(b.recv(None), Err(LiveError::Timeout)));
        let mut raw = a.try_clone().unwrap();
        raw.write_all(b"GET / HTTP/1.1\r\n\r\nxxxx").unwrap();
        let e = b.recv(None).unwrap_err();
        assert!(matches!(e, LiveError::Refused(crate::state::FormatError::BadMagic { .. })), "{e}");
        drop((a, raw));
        assert!(matches!(b.recv(None), Err(LiveError::Closed)));
    }
}
