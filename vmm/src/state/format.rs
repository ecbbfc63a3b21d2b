//! The on-the-wire format of state that crosses a process boundary.
//!
//! ```text
//!  offset  size  field
//!  0       8     MAGIC, b"MOSAICST"
//!  8       4     format version, u32 little-endian (FORMAT_VERSION = 1)
//!  12      8     payload length N, u64 little-endian
//!  20      N     payload (serde; JSON for now)
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
//! The payload encoding is behind [`encode_payload`] and [`decode_payload`], so it can
//! change (for a binary encoding) with a version bump.
//!
//! # Versions
//!
//! The magic and the version field stay where they are in every version; what
//! follows the version may change with it. A build reads every version from
//! [`OLDEST_VERSION`] to [`FORMAT_VERSION`] and writes [`FORMAT_VERSION`]. Live update
//! runs a *newer* binary on the state of the older one, so when version 2 comes:
//!
//! - `StateV1` stays as it is (frozen: never edited, since version-1 payloads
//!   must keep parsing), `StateV2` is added, with `impl From<StateV1> for StateV2`
//!   filling what version 1 did not carry;
//! - `FORMAT_VERSION` becomes 2 and `OLDEST_VERSION` stays 1 for as long as a
//!   version-1 binary may hand over;
//! - reading is [`decode_frame`] (version-independent checks) then a match on the
//!   version: `1 => decode_payload::<StateV1>(p)?.into()`, `2 =>
//!   decode_payload::<StateV2>(p)?`.
//!
//! An older binary refuses newer state with [`FormatError::UnsupportedVersion`],
//! naming the version: rollback needs state written at the older version.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::{VcpuState, VmState};

/// The first 8 bytes of every state frame.
pub const MAGIC: [u8; 8] = *b"MOSAICST";
/// The format version this build writes.
pub const FORMAT_VERSION: u32 = 1;
/// The oldest format version this build reads.
pub const OLDEST_VERSION: u32 = 1;
/// Bytes before the payload: magic, version, length.
pub const HEADER_LEN: usize = 20;
/// Bytes after the payload: the CRC.
pub const TRAILER_LEN: usize = 4;

/// Everything format version 1 carries: enough to rebuild the VM's memory layout and
/// page attributes and put every vCPU and the VM-wide KVM state back.
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

/// Why a state frame was refused (or could not be written).
#[derive(Debug, Error)]
pub enum FormatError {
    /// Fewer bytes than the fixed header.
    #[error("state is {len} bytes, shorter than the {HEADER_LEN}-byte header")]
    TooShort {
        /// Input length.
        len: usize,
    },
    /// The first 8 bytes are not [`MAGIC`].
    #[error("not Mosaic state: magic {found:02x?} is not \"MOSAICST\"")]
    BadMagic {
        /// The bytes found.
        found: [u8; 8],
    },
    /// A version this build does not read (0, or newer than [`FORMAT_VERSION`]).
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
        source: serde_json::Error,
    },
    /// The value could not be encoded.
    #[error("cannot encode state")]
    Encode(#[source] serde_json::Error),
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

/// The payload encoding of `value` (JSON for now).
pub fn encode_payload<T: Serialize>(value: &T) -> Result<Vec<u8>, FormatError> {
    serde_json::to_vec(value).map_err(FormatError::Encode)
}

/// Parses a payload of format `version` (JSON for now).
pub fn decode_payload<T: DeserializeOwned>(version: u32, payload: &[u8]) -> Result<T, FormatError> {
    serde_json::from_slice(payload).map_err(|source| FormatError::Payload { version, source })
}

/// A frame of `version` holding `value`.
pub fn encode<T: Serialize>(version: u32, value: &T) -> Result<Vec<u8>, FormatError> {
    let payload = encode_payload(value)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + TRAILER_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    let sum = crc(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    Ok(out)
}

/// Checks a frame (everything but parsing the payload) and returns its version and
/// payload. `max_len` bounds the payload length.
pub fn decode_frame(bytes: &[u8], max_len: usize) -> Result<(u32, &[u8]), FormatError> {
    let Some((header, _)) = bytes.split_first_chunk::<HEADER_LEN>() else {
        return Err(FormatError::TooShort { len: bytes.len() });
    };
    let (magic, rest) = header.split_first_chunk::<8>().unwrap_or((&[0; 8], &[]));
    if *magic != MAGIC {
        return Err(FormatError::BadMagic { found: *magic });
    }
    let (version, rest) = rest.split_first_chunk::<4>().map(|(v, r)| (u32::from_le_bytes(*v), r)).unwrap_or((0, &[]));
    if !(OLDEST_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(FormatError::UnsupportedVersion { found: version, oldest: OLDEST_VERSION, newest: FORMAT_VERSION });
    }
    let len = rest.first_chunk::<8>().map(|l| u64::from_le_bytes(*l)).unwrap_or(u64::MAX);
    if len > max_len as u64 {
        return Err(FormatError::TooLarge { len, max: max_len });
    }
    // len <= max_len <= usize::MAX, so this conversion holds; the sums are checked.
    let frame = usize::try_from(len)
        .ok()
        .and_then(|l| l.checked_add(HEADER_LEN + TRAILER_LEN))
        .filter(|&f| f <= bytes.len())
        .ok_or(FormatError::Truncated {
            len: bytes.len(),
            need: len.saturating_add((HEADER_LEN + TRAILER_LEN) as u64),
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

/// Checks a frame and parses its payload as `T`. Returns the frame's version with it.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], max_len: usize) -> Result<(u32, T), FormatError> {
    let (version, payload) = decode_frame(bytes, max_len)?;
    Ok((version, decode_payload(version, payload)?))
}

/// Reads a [`StateV1`] frame of any version this build reads (today: only 1).
pub fn decode_state(bytes: &[u8], max_len: usize) -> Result<StateV1, FormatError> {
    let (version, payload) = decode_frame(bytes, max_len)?;
    decode_payload(version, payload)
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
        assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 1);
        let n = u64::from_le_bytes(bytes[12..20].try_into().unwrap()) as usize;
        assert_eq!(bytes.len(), HEADER_LEN + n + TRAILER_LEN);
        let (v, s): (u32, Sample) = decode(&bytes, MAX).unwrap();
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
        let bytes = encode(2, &sample()).unwrap();
        let e = decode::<Sample>(&bytes, MAX).unwrap_err();
        assert!(matches!(e, FormatError::UnsupportedVersion { found: 2, oldest: 1, newest: 1 }));
        let m = e.to_string();
        assert!(m.contains("version 2") && m.contains("newer Mosaic"), "{m}");
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
