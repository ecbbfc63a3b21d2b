//! The on-the-wire format of state that crosses a process boundary.
//!
//! ```text
//!  offset  size  field
//!  0       8     MAGIC, b"MOSAICST"
//!  8       4     format version, u32 little-endian (FORMAT_VERSION = 2)
//!  12      8     payload length N, u64 little-endian
//!  20      N     payload: version 1 JSON, version 2 postcard (binary serde)
//!  20+N    4     CRC-32 (IEEE) of bytes 0..20+N, u32 little-endian
//! ```
//!
//! [`decode`] checks, in this order, and refuses with its own [`FormatError`]
//! variant: input shorter than the header, wrong magic, a version this build does
//! not read, a length above the caller's limit, a frame longer or shorter than the
//! input, a CRC mismatch, and a payload that does not parse. It never panics and
//! never allocates from the announced length: the payload is parsed in place, so
//! memory is bounded by what the input actually holds (parsed fixed-size KVM
//! structs may be larger than their text: an empty byte list becomes a zeroed
//! `kvm_xsave` of 4 KiB).
//!
//! The payload encoding is behind [`encode_payload`] and [`decode_payload`]: version 1
//! payloads are JSON, version 2 payloads postcard (compact binary serde: a vCPU is
//! about 8 KB instead of 26 KB, and encodes in microseconds).
//!
//! The same frame, with its own magic ([`FrameKind`]), carries the live-update
//! protocol's messages (`live::wire`).
//!
//! # Versions
//!
//! The magic and the version field stay where they are in every version; what
//! follows the version may change with it. A build reads every version from
//! [`OLDEST_VERSION`] to [`FORMAT_VERSION`] and writes [`FORMAT_VERSION`]. Live update
//! runs a *newer* binary on the state of the older one. Version 2 is the first
//! version a live update writes:
//!
//! - `StateV1` stays as it is (frozen: never edited, since version-1 payloads
//!   must keep parsing); [`StateV2`] adds device and per-vCPU VMM state, and
//!   `impl From<StateV1> for StateV2` fills what version 1 did not carry;
//! - `OLDEST_VERSION` stays 1 for as long as a version-1 writer may hand over;
//! - reading is [`decode_frame`] (version-independent checks) then a match on the
//!   version ([`decode_state`]). A version-3 build adds `StateV3` the same way and
//!   freezes `StateV2`.
//!
//! An older binary refuses newer state with [`FormatError::UnsupportedVersion`],
//! naming the version: rollback needs state written at the older version.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::{VcpuState, VmState};
use crate::devices::paravirt::VcpuPorts;
use crate::devices::DevicesState;

/// The first 8 bytes of every state frame.
pub const MAGIC: [u8; 8] = *b"MOSAICST";
/// The format version this build writes.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format version this build reads.
pub const OLDEST_VERSION: u32 = 1;
/// Bytes before the payload: magic, version, length.
pub const HEADER_LEN: usize = 20;
/// Bytes after the payload: the CRC.
pub const TRAILER_LEN: usize = 4;

/// A kind of frame: its magic, the versions this build reads, and what it is called
/// in messages.
#[derive(Debug, Clone, Copy)]
pub struct FrameKind {
    /// The first 8 bytes.
    pub magic: [u8; 8],
    /// Oldest version read.
    pub oldest: u32,
    /// Newest version read (and the one written).
    pub newest: u32,
    /// What the frame holds, for messages ("Mosaic state").
    pub what: &'static str,
}

/// VM state frames.
pub const STATE: FrameKind =
    FrameKind { magic: MAGIC, oldest: OLDEST_VERSION, newest: FORMAT_VERSION, what: "Mosaic state" };

/// Everything format version 1 carries: enough to rebuild the VM's memory layout and
/// page attributes and put every vCPU and the VM-wide KVM state back. Frozen.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateV1 {
    /// Guest-physical layout of RAM (zones and their regions).
    pub layout: guest_mem::MemoryLayout,
    /// Shared/private state of every page.
    pub attrs: guest_mem::attrs::AttrState,
    /// Per-vCPU state, by vCPU index.
    pub vcpus: Vec<VcpuState>,
    /// VM-wide KVM state.
    pub vm: VmState,
}

/// One vCPU in [`StateV2`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VcpuEntry {
    /// KVM state; `None` for a vCPU the guest parked (it never runs again).
    pub kvm: Option<VcpuState>,
    /// Its registers of the conversion port and DMA device.
    pub ports: VcpuPorts,
    /// KVM_VCPU_TSC_OFFSET (guest TSC = host TSC + offset), where the host offers it:
    /// restoring it keeps the guest TSC running in real time across a live update.
    pub tsc_offset: Option<u64>,
}

/// Format version 2: version 1 plus the VMM's own state (devices, per-vCPU ports,
/// parked vCPUs, TSC offsets) and the times a live update needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateV2 {
    /// Guest-physical layout of RAM (zones and their regions).
    pub layout: guest_mem::MemoryLayout,
    /// Shared/private state of every page.
    pub attrs: guest_mem::attrs::AttrState,
    /// Per-vCPU state, by vCPU index.
    pub vcpus: Vec<VcpuEntry>,
    /// VM-wide KVM state.
    pub vm: VmState,
    /// Device state.
    pub devices: DevicesState,
    /// CLOCK_MONOTONIC (ns) when the state was captured: where a TSC offset cannot be
    /// restored, the TSC is advanced by the time since.
    pub captured_ns: u64,
}

impl From<StateV1> for StateV2 {
    fn from(v1: StateV1) -> Self {
        StateV2 {
            layout: v1.layout,
            attrs: v1.attrs,
            vcpus: v1
                .vcpus
                .into_iter()
                .map(|s| VcpuEntry { kvm: Some(s), ports: VcpuPorts::default(), tsc_offset: None })
                .collect(),
            vm: v1.vm,
            devices: DevicesState::default(),
            captured_ns: 0,
        }
    }
}

/// Why a payload did not encode or parse.
#[derive(Debug, Error)]
pub enum PayloadError {
    /// JSON (version 1).
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// postcard (version 2).
    #[error(transparent)]
    Postcard(#[from] postcard::Error),
}

/// Why a state frame was refused (or could not be written).
#[derive(Debug, Error)]
pub enum FormatError {
    /// Fewer bytes than the fixed header.
    #[error("state is {len} bytes, shorter than the {HEADER_LEN}-byte header")]
    TooShort {
        /// Input length.
        len: usize,
    },
    /// The first 8 bytes are not the frame kind's magic.
    #[error("not {what}: magic {found:02x?} is not \"{}\"", String::from_utf8_lossy(.expected))]
    BadMagic {
        /// The bytes found.
        found: [u8; 8],
        /// The magic expected.
        expected: [u8; 8],
        /// What the frame should hold.
        what: &'static str,
    },
    /// A version this build does not read (0, or newer than it writes).
    #[error(
        "state format version {found} is not supported: this build reads versions {oldest} to {newest}{}",
        newer_hint(.found, .newest)
    )]
    UnsupportedVersion {
        /// The version in the header.
        found: u32,
        /// The oldest version this build reads.
        oldest: u32,
        /// The newest version this build reads.
        newest: u32,
    },
    /// The announced payload length is above the caller's limit.
    #[error("state payload of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Announced payload length.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// The input ends before the frame the header announces.
    #[error("state is truncated: {len} bytes, the header announces a {need}-byte frame")]
    Truncated {
        /// Input length.
        len: usize,
        /// Frame length the header announces (saturating).
        need: u64,
    },
    /// Bytes follow the frame the header announces.
    #[error("{extra} unexpected bytes after the {frame}-byte state frame")]
    TrailingBytes {
        /// Length of the frame.
        frame: usize,
        /// Bytes after it.
        extra: usize,
    },
    /// The CRC does not match the header and payload.
    #[error("state CRC mismatch: stored {stored:#010x}, computed {computed:#010x} (corrupted)")]
    Crc {
        /// CRC in the frame.
        stored: u32,
        /// CRC of what was received.
        computed: u32,
    },
    /// The payload passed every check but does not parse as the expected type.
    #[error("state payload (format version {version}) does not parse")]
    Payload {
        /// The frame's version.
        version: u32,
        /// Cause.
        #[source]
        source: PayloadError,
    },
    /// The value could not be encoded.
    #[error("cannot encode state")]
    Encode(#[source] PayloadError),
}

fn newer_hint(found: &u32, newest: &u32) -> &'static str {
    if found > newest {
        " (the state was written by a newer Mosaic)"
    } else {
        ""
    }
}

fn crc(bytes: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(bytes);
    h.finalize()
}

/// The payload encoding of `value` for frame `version`: JSON for version 1,
/// postcard from version 2 on.
pub fn encode_payload<T: Serialize>(version: u32, value: &T) -> Result<Vec<u8>, FormatError> {
    match version {
        0 | 1 => serde_json::to_vec(value).map_err(|e| FormatError::Encode(e.into())),
        _ => postcard::to_stdvec(value).map_err(|e| FormatError::Encode(e.into())),
    }
}

/// Parses a payload of frame `version` (JSON for version 1, postcard after). A
/// postcard payload must be used up entirely.
pub fn decode_payload<T: DeserializeOwned>(version: u32, payload: &[u8]) -> Result<T, FormatError> {
    let err = |source: PayloadError| FormatError::Payload { version, source };
    match version {
        0 | 1 => serde_json::from_slice(payload).map_err(|e| err(e.into())),
        _ => match postcard::take_from_bytes(payload) {
            Ok((v, [])) => Ok(v),
            Ok(_) => Err(err(postcard::Error::DeserializeUnexpectedEnd.into())),
            Err(e) => Err(err(e.into())),
        },
    }
}

impl FrameKind {
    /// A frame of `version` around an encoded `payload`.
    pub fn seal(&self, version: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + TRAILER_LEN);
        out.extend_from_slice(&self.magic);
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(payload);
        let sum = crc(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    /// Checks a header (the first [`HEADER_LEN`] bytes): magic, version, and the
    /// payload length against `max_len`. Returns (version, payload length).
    pub fn check_header(&self, header: &[u8; HEADER_LEN], max_len: usize) -> Result<(u32, usize), FormatError> {
        let (magic, rest) = header.split_first_chunk::<8>().unwrap_or((&[0; 8], &[]));
        if *magic != self.magic {
            return Err(FormatError::BadMagic { found: *magic, expected: self.magic, what: self.what });
        }
        let (version, rest) =
            rest.split_first_chunk::<4>().map(|(v, r)| (u32::from_le_bytes(*v), r)).unwrap_or((0, &[]));
        if !(self.oldest..=self.newest).contains(&version) {
            return Err(FormatError::UnsupportedVersion { found: version, oldest: self.oldest, newest: self.newest });
        }
        let len = rest.first_chunk::<8>().map(|l| u64::from_le_bytes(*l)).unwrap_or(u64::MAX);
        if len > max_len as u64 {
            return Err(FormatError::TooLarge { len, max: max_len });
        }
        // len <= max_len, so it fits a usize.
        Ok((version, len as usize))
    }

    /// Checks a whole frame (everything but parsing the payload) and returns its
    /// version and payload. `max_len` bounds the payload length.
    pub fn open<'a>(&self, bytes: &'a [u8], max_len: usize) -> Result<(u32, &'a [u8]), FormatError> {
        let Some((header, _)) = bytes.split_first_chunk::<HEADER_LEN>() else {
            return Err(FormatError::TooShort { len: bytes.len() });
        };
        let (version, len) = self.check_header(header, max_len)?;
        let frame =
            len.checked_add(HEADER_LEN + TRAILER_LEN).filter(|&f| f <= bytes.len()).ok_or(FormatError::Truncated {
                len: bytes.len(),
                need: (len as u64).saturating_add((HEADER_LEN + TRAILER_LEN) as u64),
            })?;
        if frame < bytes.len() {
            return Err(FormatError::TrailingBytes { frame, extra: bytes.len() - frame });
        }
        let (body, trailer) = bytes.split_at(frame - TRAILER_LEN);
        let stored = trailer.first_chunk::<4>().map(|c| u32::from_le_bytes(*c)).unwrap_or(0);
        let computed = crc(body);
        if stored != computed {
            return Err(FormatError::Crc { stored, computed });
        }
        Ok((version, &body[HEADER_LEN..]))
    }
}

/// A state frame of `version` holding `value`.
pub fn encode<T: Serialize>(version: u32, value: &T) -> Result<Vec<u8>, FormatError> {
    Ok(STATE.seal(version, &encode_payload(version, value)?))
}

/// Checks a state frame (everything but parsing the payload) and returns its version
/// and payload. `max_len` bounds the payload length.
pub fn decode_frame(bytes: &[u8], max_len: usize) -> Result<(u32, &[u8]), FormatError> {
    STATE.open(bytes, max_len)
}

/// Checks a state frame and parses its payload as `T`. Returns the frame's version with it.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], max_len: usize) -> Result<(u32, T), FormatError> {
    let (version, payload) = decode_frame(bytes, max_len)?;
    Ok((version, decode_payload(version, payload)?))
}

/// Reads VM state of any version this build reads, as the newest ([`StateV2`]).
pub fn decode_state(bytes: &[u8], max_len: usize) -> Result<StateV2, FormatError> {
    let (version, payload) = decode_frame(bytes, max_len)?;
    match version {
        1 => Ok(decode_payload::<StateV1>(version, payload)?.into()),
        _ => decode_payload(version, payload),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        name: String,
        values: Vec<u64>,
    }

    fn sample() -> Sample {
        Sample { name: "vcpu0".into(), values: vec![1, 2, 0xdead_beef, u64::MAX] }
    }

    const MAX: usize = 1 << 20;

    #[test]
    fn round_trip() {
        let bytes = encode(FORMAT_VERSION, &sample()).unwrap();
        assert_eq!(&bytes[..8], b"MOSAICST");
        assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), FORMAT_VERSION);
        let n = u64::from_le_bytes(bytes[12..20].try_into().unwrap()) as usize;
        assert_eq!(bytes.len(), HEADER_LEN + n + TRAILER_LEN);
        let (v, s): (u32, Sample) = decode(&bytes, MAX).unwrap();
        assert_eq!((v, s), (FORMAT_VERSION, sample()));
        // Version 1 frames (JSON) still read.
        let (v, s): (u32, Sample) = decode(&encode(1, &sample()).unwrap(), MAX).unwrap();
        assert_eq!((v, s), (1, sample()));
    }

    /// Flips every byte of every region and checks the variant that refuses it.
    #[test]
    fn every_corruption_is_refused_with_its_variant() {
        let good = encode(FORMAT_VERSION, &sample()).unwrap();
        for i in 0..good.len() {
            for mask in [0x01u8, 0x80, 0xff] {
                let mut b = good.clone();
                b[i] ^= mask;
                let r = decode::<Sample>(&b, MAX);
                let ok = match i {
                    0..8 => matches!(r, Err(FormatError::BadMagic { .. })),
                    8..12 => matches!(r, Err(FormatError::UnsupportedVersion { .. })),
                    12..20 => matches!(
                        r,
                        Err(FormatError::TooLarge { .. }
                            | FormatError::Truncated { .. }
                            | FormatError::TrailingBytes { .. })
                    ),
                    // Payload and CRC: CRC-32 detects every error burst of up to 32 bits.
                    _ => matches!(r, Err(FormatError::Crc { .. })),
                };
                assert!(ok, "byte {i} ^ {mask:#x}: {r:?}");
            }
        }
    }

    #[test]
    fn a_well_framed_payload_that_does_not_parse_is_refused() {
        let bytes = encode(FORMAT_VERSION, &"just a string").unwrap();
        let r = decode::<Sample>(&bytes, MAX);
        assert!(matches!(r, Err(FormatError::Payload { version: FORMAT_VERSION, .. })), "{r:?}");
        let r = decode::<Sample>(&encode(1, &"just a string").unwrap(), MAX);
        assert!(matches!(r, Err(FormatError::Payload { version: 1, .. })), "{r:?}");
        // Rebuilt frame with garbage JSON and a correct CRC.
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&3u64.to_le_bytes());
        b.extend_from_slice(b"{x}");
        let c = crc(&b);
        b.extend_from_slice(&c.to_le_bytes());
        let e = decode::<Sample>(&b, MAX).unwrap_err();
        assert!(matches!(e, FormatError::Payload { .. }));
        assert!(crate::error_chain(&e).contains("does not parse"), "{e}");
    }

    #[test]
    fn truncation_at_every_length_is_refused() {
        let good = encode(FORMAT_VERSION, &sample()).unwrap();
        for n in 0..good.len() {
            let r = decode::<Sample>(&good[..n], MAX);
            if n < HEADER_LEN {
                assert!(matches!(r, Err(FormatError::TooShort { len }) if len == n), "len {n}: {r:?}");
            } else {
                assert!(matches!(r, Err(FormatError::Truncated { len, .. }) if len == n), "len {n}: {r:?}");
            }
        }
        let mut long = good.clone();
        long.push(0);
        assert!(matches!(decode::<Sample>(&long, MAX), Err(FormatError::TrailingBytes { extra: 1, .. })));
    }

    #[test]
    fn newer_and_unknown_versions_are_refused_by_name() {
        let bytes = encode(3, &sample()).unwrap();
        let e = decode::<Sample>(&bytes, MAX).unwrap_err();
        assert!(matches!(e, FormatError::UnsupportedVersion { found: 3, oldest: 1, newest: 2 }));
        let m = e.to_string();
        assert!(m.contains("version 3") && m.contains("newer Mosaic"), "{m}");
        let e = decode::<Sample>(&encode(0, &sample()).unwrap(), MAX).unwrap_err();
        assert!(matches!(e, FormatError::UnsupportedVersion { found: 0, .. }));
        assert!(!e.to_string().contains("newer"), "{e}");
    }

    #[test]
    fn length_limit_is_enforced_without_allocating_from_it() {
        let good = encode(FORMAT_VERSION, &sample()).unwrap();
        let n = good.len() - HEADER_LEN - TRAILER_LEN;
        assert!(decode::<Sample>(&good, n).is_ok());
        assert!(matches!(decode::<Sample>(&good, n - 1), Err(FormatError::TooLarge { max, .. }) if max == n - 1));
        // A header announcing u64::MAX bytes, with no limit: refused as truncated.
        let mut b = good.clone();
        b[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        let r = decode::<Sample>(&b, usize::MAX);
        assert!(matches!(r, Err(FormatError::Truncated { need: u64::MAX, .. })), "{r:?}");
    }

    #[test]
    fn bad_magic_message_is_clear() {
        let mut b = encode(FORMAT_VERSION, &sample()).unwrap();
        b[..8].copy_from_slice(b"ELF\x7f\0\0\0\0");
        let m = decode::<Sample>(&b, MAX).unwrap_err().to_string();
        assert!(m.starts_with("not Mosaic state"), "{m}");
    }
}
