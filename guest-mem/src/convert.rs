//! Conversion requests: the one decoded form every guest path (conversion port,
//! KVM_HC_MAP_GPA_RANGE hypercall, memory-fault exit) turns into before
//! [`GuestMemory::convert`](crate::GuestMemory::convert) runs it, and the status codes
//! they all return.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::attrs::PageState;
use crate::PAGE_4K;

/// What happens to the contents of converted pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContentMode {
    /// Converted pages read as zeros afterwards, on both sides.
    Zero,
    /// Converted pages keep their contents.
    Preserve,
}

/// A validated-shape conversion request (alignment and flags checked; whether the
/// range is guest RAM is checked when it runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvRequest {
    /// First GPA (4 KiB aligned).
    pub gpa: u64,
    /// Number of 4 KiB pages (> 0).
    pub pages: u64,
    /// State the pages end in.
    pub target: PageState,
    /// Content mode.
    pub mode: ContentMode,
}

impl ConvRequest {
    /// Length in bytes (`None` on overflow).
    pub fn len(&self) -> Option<u64> {
        self.pages.checked_mul(PAGE_4K)
    }

    /// Whether the request covers no pages (never true for a decoded request).
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }
}

/// Why a conversion was refused; [`ConvError::status`] is what the guest reads.
#[derive(Debug, Clone, Copy, Error, PartialEq, Eq)]
pub enum ConvError {
    /// Unaligned GPA, zero pages, or unknown flag bits.
    #[error("invalid conversion request")]
    Invalid,
    /// The range overflows or is not entirely guest RAM.
    #[error("conversion range is not guest RAM")]
    Range,
    /// The engine cannot do this.
    #[error("conversion not supported")]
    Unsupported,
}

/// Status: converted.
pub const STATUS_OK: u32 = 0;

impl ConvError {
    /// The status code the guest reads (docs/PRIVATE-MEMORY.md).
    pub fn status(self) -> u32 {
        match self {
            ConvError::Invalid => 1,
            ConvError::Range => 2,
            ConvError::Unsupported => 3,
        }
    }
}

/// Conversion-port flags: bit 0 target private.
pub const FLAG_PRIVATE: u32 = 1 << 0;
/// Conversion-port flags: bit 1 PRESERVE.
pub const FLAG_PRESERVE: u32 = 1 << 1;

/// Decodes a conversion-port request (docs/PRIVATE-MEMORY.md).
pub fn decode_port(gpa: u64, pages: u64, flags: u32) -> Result<ConvRequest, ConvError> {
    if flags & !(FLAG_PRIVATE | FLAG_PRESERVE) != 0 || pages == 0 || !gpa.is_multiple_of(PAGE_4K) {
        return Err(ConvError::Invalid);
    }
    let len = pages.checked_mul(PAGE_4K).ok_or(ConvError::Range)?;
    gpa.checked_add(len).ok_or(ConvError::Range)?;
    Ok(ConvRequest {
        gpa,
        pages,
        target: if flags & FLAG_PRIVATE != 0 { PageState::Private } else { PageState::Shared },
        mode: if flags & FLAG_PRESERVE != 0 { ContentMode::Preserve } else { ContentMode::Zero },
    })
}

/// KVM_HC_MAP_GPA_RANGE attribute bit: the range becomes private (encrypted).
pub const MAP_GPA_RANGE_ENCRYPTED: u64 = 1 << 4;
/// KVM_HC_MAP_GPA_RANGE attribute bits 3:0: page-size hint (0 = 4K, 1 = 2M, 2 = 1G).
pub const MAP_GPA_RANGE_PAGE_SZ_MASK: u64 = 0xf;

/// Decodes a KVM_HC_MAP_GPA_RANGE hypercall (`rbx` = GPA, `rcx` = pages, `rdx` =
/// attributes). The hypercall has no content mode: conversions it asks for are ZERO,
/// as on confidential-computing hosts where the other side's contents are lost.
pub fn decode_map_gpa_range(gpa: u64, pages: u64, attrs: u64) -> Result<ConvRequest, ConvError> {
    if attrs & !(MAP_GPA_RANGE_ENCRYPTED | MAP_GPA_RANGE_PAGE_SZ_MASK) != 0 || attrs & MAP_GPA_RANGE_PAGE_SZ_MASK > 2 {
        return Err(ConvError::Invalid);
    }
    let flags = if attrs & MAP_GPA_RANGE_ENCRYPTED != 0 { FLAG_PRIVATE } else { 0 };
    decode_port(gpa, pages, flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_port_requests() {
        let r = decode_port(0x20_0000, 3, FLAG_PRIVATE | FLAG_PRESERVE).unwrap();
        assert_eq!(r.target, PageState::Private);
        assert_eq!(r.mode, ContentMode::Preserve);
        assert_eq!(r.len(), Some(3 * 4096));
        assert_eq!(decode_port(0x20_0000, 1, 0).unwrap().mode, ContentMode::Zero);
        assert_eq!(decode_port(0x20_0008, 1, 0), Err(ConvError::Invalid));
        assert_eq!(decode_port(0x20_0000, 0, 0), Err(ConvError::Invalid));
        assert_eq!(decode_port(0x20_0000, 1, 1 << 5), Err(ConvError::Invalid));
        assert_eq!(decode_port(0x20_0000, 1 << 60, 0), Err(ConvError::Range));
        assert_eq!(decode_port(!0xfff, 2, 0), Err(ConvError::Range));
        assert_eq!(ConvError::Range.status(), 2);
    }

    #[test]
    fn decodes_map_gpa_range() {
        let r = decode_map_gpa_range(0x1000, 1, MAP_GPA_RANGE_ENCRYPTED | 1).unwrap();
        assert_eq!((r.target, r.mode), (PageState::Private, ContentMode::Zero));
        assert_eq!(decode_map_gpa_range(0x1000, 1, 0).unwrap().target, PageState::Shared);
        assert_eq!(decode_map_gpa_range(0x1000, 1, 3), Err(ConvError::Invalid));
        assert_eq!(decode_map_gpa_range(0x1000, 1, 1 << 5), Err(ConvError::Invalid));
        assert_eq!(decode_map_gpa_range(0x1001, 1, 0), Err(ConvError::Invalid));
    }
}

/// Conversion counters, shared by every vCPU (lock-free).
#[derive(Debug, Default)]
pub struct ConvStats {
    by_size: [std::sync::atomic::AtomicU64; 4],
    /// Total ns per (size class, mode): [4K, 2M, 1G, other] x [zero, preserve].
    ns_by_kind: [[std::sync::atomic::AtomicU64; 2]; 4],
    n_by_kind: [[std::sync::atomic::AtomicU64; 2]; 4],
    failed: std::sync::atomic::AtomicU64,
    total_ns: std::sync::atomic::AtomicU64,
    /// Latency histogram: bucket i counts conversions that took [2^i, 2^(i+1)) ns.
    buckets: [std::sync::atomic::AtomicU64; 32],
    /// Huge blocks (2 MiB, 1 GiB) that conversions made mixed, and uniform again.
    became_mixed: [std::sync::atomic::AtomicU64; 2],
    became_uniform: [std::sync::atomic::AtomicU64; 2],
}

/// The huge block sizes mixed/uniform transitions are counted for.
pub const MIXED_BLOCKS: [u64; 2] = [crate::PAGE_2M, crate::PAGE_1G];

/// How conversions changed one huge block size: blocks that became mixed (private
/// and shared pages in one block: a kernel engine's KVM maps such a block with 4 KiB
/// pages) and blocks that became uniform again (mappable huge again).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MixedTransitions {
    /// Blocks that went from uniform to mixed.
    pub became_mixed: u64,
    /// Blocks that went from mixed to uniform.
    pub became_uniform: u64,
}

/// A snapshot of [`ConvStats`].
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ConvStatsSnapshot {
    /// Successful conversions of exactly one 4 KiB page.
    pub pages_4k: u64,
    /// Of exactly 2 MiB.
    pub pages_2m: u64,
    /// Of exactly 1 GiB.
    pub pages_1g: u64,
    /// Of any other size.
    pub other: u64,
    /// Refused requests.
    pub failed: u64,
    /// Mean latency of successful conversions, in microseconds.
    pub mean_us: f64,
    /// 99th-percentile latency (upper bound of its power-of-two bucket), in microseconds.
    pub p99_us: f64,
    /// Mean VMM-side latency in microseconds per request size and mode, for the kinds
    /// seen: keys like `4k_zero`, `2m_preserve`, `1g_zero`, `other_preserve`.
    pub mean_us_by_kind: std::collections::BTreeMap<String, f64>,
    /// 2 MiB blocks made mixed / uniform again by conversions.
    pub blocks_2m: MixedTransitions,
    /// 1 GiB blocks made mixed / uniform again by conversions.
    pub blocks_1g: MixedTransitions,
}

impl ConvStats {
    /// Counts how a conversion changed the blocks of size `MIXED_BLOCKS[i]`.
    pub fn record_blocks(&self, i: usize, became_mixed: u64, became_uniform: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        if let (Some(m), Some(u)) = (self.became_mixed.get(i), self.became_uniform.get(i)) {
            m.fetch_add(became_mixed, Relaxed);
            u.fetch_add(became_uniform, Relaxed);
        }
    }

    /// Records a successful conversion of `pages` pages in `mode` that took `ns`.
    pub fn record(&self, pages: u64, mode: ContentMode, ns: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let i = match pages {
            1 => 0,
            512 => 1,
            262_144 => 2,
            _ => 3,
        };
        let m = usize::from(mode == ContentMode::Preserve);
        self.by_size[i].fetch_add(1, Relaxed);
        self.ns_by_kind[i][m].fetch_add(ns, Relaxed);
        self.n_by_kind[i][m].fetch_add(1, Relaxed);
        self.total_ns.fetch_add(ns, Relaxed);
        let b = (63 - ns.max(1).leading_zeros() as usize).min(self.buckets.len() - 1);
        self.buckets[b].fetch_add(1, Relaxed);
    }

    /// Records a refused request.
    pub fn record_failure(&self) {
        self.failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> ConvStatsSnapshot {
        use std::sync::atomic::Ordering::Relaxed;
        let n: Vec<u64> = self.by_size.iter().map(|a| a.load(Relaxed)).collect();
        let count: u64 = n.iter().sum();
        let buckets: Vec<u64> = self.buckets.iter().map(|a| a.load(Relaxed)).collect();
        let mut p99 = 0.0;
        let want = count - count / 100;
        let mut seen = 0;
        for (i, b) in buckets.iter().enumerate() {
            seen += b;
            if count > 0 && seen >= want {
                p99 = (1u64 << (i + 1)) as f64 / 1e3;
                break;
            }
        }
        let mut mean_us_by_kind = std::collections::BTreeMap::new();
        for (i, size) in ["4k", "2m", "1g", "other"].iter().enumerate() {
            for (m, mode) in ["zero", "preserve"].iter().enumerate() {
                let c = self.n_by_kind[i][m].load(Relaxed);
                if c > 0 {
                    let mean = self.ns_by_kind[i][m].load(Relaxed) as f64 / c as f64 / 1e3;
                    mean_us_by_kind.insert(format!("{size}_{mode}"), mean);
                }
            }
        }
        ConvStatsSnapshot {
            mean_us_by_kind,
            pages_4k: n[0],
            pages_2m: n[1],
            pages_1g: n[2],
            other: n[3],
            failed: self.failed.load(Relaxed),
            mean_us: if count == 0 { 0.0 } else { self.total_ns.load(Relaxed) as f64 / count as f64 / 1e3 },
            p99_us: p99,
            blocks_2m: MixedTransitions {
                became_mixed: self.became_mixed[0].load(Relaxed),
                became_uniform: self.became_uniform[0].load(Relaxed),
            },
            blocks_1g: MixedTransitions {
                became_mixed: self.became_mixed[1].load(Relaxed),
                became_uniform: self.became_uniform[1].load(Relaxed),
            },
        }
    }
}

#[cfg(test)]
mod stats_tests {
    use super::*;

    #[test]
    fn counts_by_size_and_latency() {
        let s = ConvStats::default();
        for _ in 0..99 {
            s.record(1, ContentMode::Zero, 1000);
        }
        s.record(512, ContentMode::Preserve, 100_000);
        s.record_failure();
        let x = s.snapshot();
        assert_eq!((x.pages_4k, x.pages_2m, x.pages_1g, x.other, x.failed), (99, 1, 0, 0, 1));
        assert!((x.mean_us - 1.99).abs() < 0.01);
        assert_eq!(x.p99_us, 1.024, "99 of 100 are in the 512-1023 ns bucket");
        assert_eq!(x.mean_us_by_kind.get("4k_zero"), Some(&1.0));
        assert_eq!(x.mean_us_by_kind.get("2m_preserve"), Some(&100.0));
        assert_eq!(x.mean_us_by_kind.len(), 2);
    }
}
