//! [`Attributes`]: which 4 KiB pages of guest RAM are private to the guest and which
//! are shared with the VMM.
//!
//! Every page of guest RAM is [`PageState::Shared`] or [`PageState::Private`]. The
//! guest converts ranges ([`Attributes::set`]); the memory accessor asks on every
//! access whether a byte range is entirely shared ([`Attributes::all`]).
//!
//! # Representation
//!
//! ```text
//!   ram spans (page frames):   [0 ─────────── 786432)        [1048576 ─────────── 4456448)
//!   private (BTreeMap s -> e):     [16, 18)  [512, 1024)          [1048576, 1048577)
//!   everything else in a span is shared; everything outside the spans is not RAM
//! ```
//!
//! Only the *private* pages are stored, as a `BTreeMap<start, end>` of half-open
//! page-frame intervals that are sorted, disjoint and coalesced (no two intervals
//! touch), so a state has exactly one representation. The RAM the tracker covers is a
//! short sorted `Vec` of page-frame spans (RAM ranges that touch are joined into one
//! span, so a conversion may cross from one region into the next). Counters of RAM
//! and private pages are kept up to date by every change.
//!
//! With `n` private intervals and `r` RAM spans (a handful):
//!
//! | operation | cost |
//! |---|---|
//! | [`set`](Attributes::set), `k` intervals touched | `O((k + 1) log n + log r)`; each call adds at most two intervals, so amortized `O(log n)` |
//! | [`check`](Attributes::check), [`state_of`](Attributes::state_of), [`all`](Attributes::all), [`first_not`](Attributes::first_not), [`block_is_mixed`](Attributes::block_is_mixed) | `O(log n + log r)` |
//! | [`private_bytes`](Attributes::private_bytes), [`shared_bytes`](Attributes::shared_bytes), [`ram_bytes`](Attributes::ram_bytes) | `O(1)` |
//! | [`mixed_blocks`](Attributes::mixed_blocks), [`private_ranges`](Attributes::private_ranges), [`to_state`](Attributes::to_state) | `O(n)` (times `log r` for the first) |
//!
//! Memory is `O(n + r)`: a 16 GiB guest (4M pages) that is all shared or all private
//! costs one or two map entries, not one per page.
//!
//! # Errors
//!
//! Requests from the guest are untrusted: every address is checked with checked
//! arithmetic, a failing [`set`](Attributes::set) changes nothing, and a corrupt
//! [`AttrState`] is refused with [`AttrError::BadState`]. Nothing here panics.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::PAGE_4K;

/// log2 of [`PAGE_4K`].
const PAGE_SHIFT: u32 = 12;

/// Version of [`AttrState`] this build writes and accepts.
pub const ATTR_STATE_VERSION: u32 = 1;

/// Who may access a page of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PageState {
    /// The VMM may read and write the page.
    Shared,
    /// Only the guest may access the page; the VMM must not touch it.
    Private,
}

/// Errors from converting pages or restoring a snapshot.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum AttrError {
    /// The start or the length is not a multiple of 4 KiB.
    #[error("range of {len:#x} bytes at {gpa:#x} is not 4 KiB aligned")]
    Unaligned {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// The range is empty.
    #[error("empty range")]
    Empty,
    /// `gpa + len` overflows.
    #[error("range of {len:#x} bytes at {gpa:#x} overflows")]
    Overflow {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// The range is not entirely guest RAM (it leaves RAM or touches a gap).
    #[error("range of {len:#x} bytes at {gpa:#x} is not entirely guest RAM")]
    OutsideRam {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// A snapshot is malformed or does not fit this VM.
    #[error("bad page attribute state: {0}")]
    BadState(String),
    /// KVM refused the attribute change (kernel engine).
    #[error("KVM_SET_MEMORY_ATTRIBUTES failed: {0}")]
    Kernel(String),
}

/// The serializable form of [`Attributes`], carried across live update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttrState {
    /// Format version; [`ATTR_STATE_VERSION`] when written by this build.
    pub version: u32,
    /// RAM ranges covered, as `(gpa, size)` in bytes, sorted and disjoint.
    pub ram: Vec<(u64, u64)>,
    /// Private ranges, as `(gpa, len)` in bytes, sorted and disjoint.
    pub private: Vec<(u64, u64)>,
}

/// The shared/private state of every page of guest RAM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attributes {
    /// RAM ranges as `(gpa, size)` bytes: page-aligned, non-empty, sorted, disjoint.
    ram: Vec<(u64, u64)>,
    /// RAM as half-open page-frame spans, touching ranges joined.
    spans: Vec<(u64, u64)>,
    /// Private intervals, page frames, `start -> end` (exclusive): sorted, disjoint,
    /// coalesced, each inside one span.
    private: BTreeMap<u64, u64>,
    /// Pages of RAM.
    ram_pages: u64,
    /// Private pages: the sum of the lengths of `private`.
    private_pages: u64,
}

impl Attributes {
    /// Tracks the RAM ranges `ram`, `(gpa, size)` in bytes, every page in `initial`.
    ///
    /// `ram` should be sorted, disjoint and page-aligned, as [`MemoryLayout`]
    /// regions are. Other input is normalized rather than refused: ranges are shrunk
    /// inward to whole pages, empty ones dropped, the rest sorted and overlapping
    /// ones merged (touching ones are kept apart, but count as contiguous).
    ///
    /// [`MemoryLayout`]: crate::MemoryLayout
    pub fn new(ram: &[(u64, u64)], initial: PageState) -> Self {
        let ram = normalize_ram(ram);
        let mut spans: Vec<(u64, u64)> = Vec::with_capacity(ram.len());
        for &(gpa, size) in &ram {
            // Normalized: gpa + size does not overflow.
            let (s, e) = (gpa >> PAGE_SHIFT, (gpa + size) >> PAGE_SHIFT);
            match spans.last_mut() {
                Some(last) if last.1 == s => last.1 = e,
                _ => spans.push((s, e)),
            }
        }
        let ram_pages = spans.iter().map(|&(s, e)| e - s).sum();
        let (private, private_pages) = match initial {
            PageState::Shared => (BTreeMap::new(), 0),
            PageState::Private => (spans.iter().copied().collect(), ram_pages),
        };
        Attributes { ram, spans, private, ram_pages, private_pages }
    }

    /// Sets every page of `[gpa, gpa+len)` to `state` and returns how many pages
    /// actually changed state.
    ///
    /// `gpa` and `len` must be multiples of 4 KiB, `len` non-zero, the end must not
    /// overflow, and the range must lie entirely in RAM: it may run from one RAM range
    /// into the next only where the two touch. On error nothing changes.
    pub fn set(&mut self, gpa: u64, len: u64, state: PageState) -> Result<u64, AttrError> {
        let (s, e) = self.validate(gpa, len)?;
        let was_private = self.make_shared(s, e);
        Ok(match state {
            PageState::Shared => was_private,
            PageState::Private => {
                self.insert_private(s, e);
                (e - s) - was_private
            }
        })
    }

    /// Checks `[gpa, gpa+len)` as [`set`](Self::set) would, changing nothing.
    ///
    /// Errors are tested in order: [`Unaligned`](AttrError::Unaligned),
    /// [`Empty`](AttrError::Empty), [`Overflow`](AttrError::Overflow),
    /// [`OutsideRam`](AttrError::OutsideRam).
    pub fn check(&self, gpa: u64, len: u64) -> Result<(), AttrError> {
        self.validate(gpa, len).map(|_| ())
    }

    /// The state of the page holding byte `gpa` (any address); `None` outside RAM.
    pub fn state_of(&self, gpa: u64) -> Option<PageState> {
        let pfn = gpa >> PAGE_SHIFT;
        self.span_of(pfn)?;
        Some(if self.is_private(pfn) { PageState::Private } else { PageState::Shared })
    }

    /// Whether every page touched by the byte range `[gpa, gpa+len)` (any alignment)
    /// is RAM in `state`. An empty range is true iff `gpa` is in RAM; a range whose
    /// end overflows is false. This is the accessor's hot-path question.
    pub fn all(&self, gpa: u64, len: u64, state: PageState) -> bool {
        self.first_not(gpa, len, state).is_none()
    }

    /// The address of the first page touched by the byte range `[gpa, gpa+len)` that
    /// is not RAM in `state`, if any (a page outside RAM counts as not in `state`).
    ///
    /// Agrees with [`all`](Self::all): `all(gpa, len, s) == first_not(gpa, len, s).is_none()`
    /// for every input, so an empty range outside RAM reports the page of `gpa`. A
    /// range whose end overflows is read up to the end of the address space, whose
    /// last page is never RAM, so it always reports a page.
    pub fn first_not(&self, gpa: u64, len: u64, state: PageState) -> Option<u64> {
        let s = gpa >> PAGE_SHIFT;
        let Some(last) = len.checked_sub(1) else {
            return self.span_of(s).is_none().then_some(s << PAGE_SHIFT);
        };
        let last = gpa.saturating_add(last);
        // At most 2^52: no overflow.
        let e = (last >> PAGE_SHIFT) + 1;
        self.first_not_pfn(s, e, state).map(|p| p << PAGE_SHIFT)
    }

    /// Bytes of private RAM.
    pub fn private_bytes(&self) -> u64 {
        self.private_pages << PAGE_SHIFT
    }

    /// Bytes of shared RAM.
    pub fn shared_bytes(&self) -> u64 {
        (self.ram_pages - self.private_pages) << PAGE_SHIFT
    }

    /// Bytes of RAM tracked.
    pub fn ram_bytes(&self) -> u64 {
        self.ram_pages << PAGE_SHIFT
    }

    /// The RAM ranges tracked, `(gpa, size)` in bytes, as normalized by [`new`](Self::new).
    pub fn ram_ranges(&self) -> &[(u64, u64)] {
        &self.ram
    }

    /// The private ranges as `(gpa, len)` in bytes, ascending, maximal (two ranges
    /// never touch).
    pub fn private_ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.private.iter().map(|(&s, &e)| (s << PAGE_SHIFT, (e - s) << PAGE_SHIFT))
    }

    /// Private intervals that overlap `[gpa, gpa+len)`, as `(gpa, len)` (not clipped),
    /// ascending: `O(log n + k)`.
    pub fn private_ranges_in(&self, gpa: u64, len: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let lo = gpa >> PAGE_SHIFT;
        let hi = gpa.saturating_add(len).div_ceil(1 << PAGE_SHIFT);
        let before = self.private.range(..lo).next_back().filter(|&(_, &e)| e > lo);
        before
            .into_iter()
            .chain(self.private.range(lo..hi.max(lo)))
            .map(|(&s, &e)| (s << PAGE_SHIFT, (e - s) << PAGE_SHIFT))
    }

    /// How many private ranges there are (the `n` of the costs above).
    pub fn private_range_count(&self) -> usize {
        self.private.len()
    }

    /// How many naturally aligned blocks of `block` bytes (2 MiB, 1 GiB, ...) hold both
    /// private and shared pages, i.e. cannot be mapped as one huge page of either
    /// kind. A block partly outside RAM is judged on its RAM pages. `block` must be a
    /// non-zero multiple of 4 KiB (anything else gives 0).
    ///
    /// Costs `O(n)` in the private ranges, whatever the number of blocks: a block
    /// wholly inside one private range is not mixed, so only the blocks holding the
    /// ends of private ranges are looked at.
    pub fn mixed_blocks(&self, block: u64) -> u64 {
        let Some(bp) = block_pages(block) else { return 0 };
        let mut mixed = 0;
        // The block being summed and the private pages seen in it so far.
        let mut cur: Option<(u64, u64)> = None;
        for (&a, &b) in &self.private {
            let (first, last) = (a / bp, (b - 1) / bp);
            if let Some((i, n)) = cur.filter(|&(i, _)| i != first) {
                mixed += u64::from(n < self.ram_pages_in_block(i, bp));
                cur = None;
            }
            let n = cur.map_or(0, |(_, n)| n);
            if first == last {
                cur = Some((first, n + (b - a)));
            } else {
                // first < last, so (first+1)*bp <= last*bp <= b-1: no overflow. The
                // blocks strictly between are wholly private.
                let first_end = (first + 1) * bp;
                mixed += u64::from(n + (first_end - a) < self.ram_pages_in_block(first, bp));
                cur = Some((last, b - last * bp));
            }
        }
        if let Some((i, n)) = cur {
            mixed += u64::from(n < self.ram_pages_in_block(i, bp));
        }
        mixed
    }

    /// Whether the naturally aligned block of `block` bytes holding `gpa` has both
    /// private and shared pages (see [`mixed_blocks`](Self::mixed_blocks)).
    pub fn block_is_mixed(&self, gpa: u64, block: u64) -> bool {
        let Some(bp) = block_pages(block) else { return false };
        let bs = (gpa >> PAGE_SHIFT) / bp * bp;
        let be = bs.saturating_add(bp);
        let has_private = self.private.range(..be).next_back().is_some_and(|(_, &e)| e > bs);
        has_private && self.spans_in(bs, be).any(|(s, e)| self.first_not_pfn(s, e, PageState::Private).is_some())
    }

    /// A snapshot for live update.
    pub fn to_state(&self) -> AttrState {
        AttrState { version: ATTR_STATE_VERSION, ram: self.ram.clone(), private: self.private_ranges().collect() }
    }

    /// Rebuilds from a snapshot taken by [`to_state`](Self::to_state), checking all
    /// of it: the version, that its RAM ranges are well formed and the same as
    /// `expected_ram` (normalized as by [`new`](Self::new)), and that its private
    /// ranges are page-aligned, non-empty, sorted, disjoint and inside RAM. Private
    /// ranges that touch are accepted and joined.
    pub fn from_state(state: &AttrState, expected_ram: &[(u64, u64)]) -> Result<Self, AttrError> {
        let bad = |msg: String| AttrError::BadState(msg);
        if state.version != ATTR_STATE_VERSION {
            return Err(bad(format!("version {} (this build reads {ATTR_STATE_VERSION})", state.version)));
        }
        check_ranges("RAM", &state.ram)?;
        let expected = normalize_ram(expected_ram);
        if state.ram != expected {
            let at = state.ram.iter().zip(&expected).position(|(a, b)| a != b);
            let at = at.unwrap_or(state.ram.len().min(expected.len()));
            let show = |r: Option<&(u64, u64)>| r.map_or("nothing".to_string(), |&(g, s)| format!("{s:#x}@{g:#x}"));
            return Err(bad(format!(
                "RAM range {at} is {} but this VM has {}",
                show(state.ram.get(at)),
                show(expected.get(at))
            )));
        }
        check_ranges("private", &state.private)?;
        let mut attrs = Attributes::new(&expected, PageState::Shared);
        for &(gpa, len) in &state.private {
            attrs.set(gpa, len, PageState::Private).map_err(|e| bad(format!("private range: {e}")))?;
        }
        Ok(attrs)
    }

    /// Checks a conversion request and turns it into page frames `[s, e)`.
    fn validate(&self, gpa: u64, len: u64) -> Result<(u64, u64), AttrError> {
        if !gpa.is_multiple_of(PAGE_4K) || !len.is_multiple_of(PAGE_4K) {
            return Err(AttrError::Unaligned { gpa, len });
        }
        if len == 0 {
            return Err(AttrError::Empty);
        }
        let end = gpa.checked_add(len).ok_or(AttrError::Overflow { gpa, len })?;
        let (s, e) = (gpa >> PAGE_SHIFT, end >> PAGE_SHIFT);
        match self.span_of(s) {
            Some((_, span_end)) if e <= span_end => Ok((s, e)),
            _ => Err(AttrError::OutsideRam { gpa, len }),
        }
    }

    /// The RAM span holding page frame `pfn`.
    fn span_of(&self, pfn: u64) -> Option<(u64, u64)> {
        let i = self.spans.partition_point(|&(_, e)| e <= pfn);
        self.spans.get(i).copied().filter(|&(s, _)| s <= pfn)
    }

    /// The parts of RAM spans inside page frames `[bs, be)`.
    fn spans_in(&self, bs: u64, be: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let i = self.spans.partition_point(|&(_, e)| e <= bs);
        self.spans[i..].iter().take_while(move |&&(s, _)| s < be).map(move |&(s, e)| (s.max(bs), e.min(be)))
    }

    /// Pages of RAM in block `i` of `bp` pages.
    fn ram_pages_in_block(&self, i: u64, bp: u64) -> u64 {
        // Called with blocks holding a private page, so i * bp <= that page.
        let bs = i.saturating_mul(bp);
        self.spans_in(bs, bs.saturating_add(bp)).map(|(s, e)| e - s).sum()
    }

    /// Whether page frame `pfn` is private.
    fn is_private(&self, pfn: u64) -> bool {
        self.private.range(..=pfn).next_back().is_some_and(|(_, &e)| e > pfn)
    }

    /// The first page frame in `[s, e)` (`s < e`) that is not RAM in `state`.
    fn first_not_pfn(&self, s: u64, e: u64, state: PageState) -> Option<u64> {
        let Some((_, span_end)) = self.span_of(s) else { return Some(s) };
        // Past the span (spans are maximal) is not RAM.
        let past = (span_end < e).then_some(span_end);
        let lim = e.min(span_end);
        let covering = self.private.range(..=s).next_back().map(|(_, &end)| end).filter(|&end| end > s);
        match state {
            PageState::Private => match covering {
                // Intervals are coalesced, so the page at `end` is shared (or not RAM).
                Some(end) if end < lim => Some(end),
                Some(_) => past,
                None => Some(s),
            },
            PageState::Shared => match covering {
                Some(_) => Some(s),
                None => self.private.range(s..lim).next().map(|(&start, _)| start).or(past),
            },
        }
    }

    /// Makes page frames `[s, e)` shared; returns how many were private.
    fn make_shared(&mut self, s: u64, e: u64) -> u64 {
        let mut was_private = 0;
        if let Some((&a, &b)) = self.private.range(..s).next_back() {
            if b > s {
                self.private.insert(a, s);
                was_private += b.min(e) - s;
                if b > e {
                    self.private.insert(e, b);
                }
            }
        }
        while let Some((&a, &b)) = self.private.range(s..e).next() {
            self.private.remove(&a);
            was_private += b.min(e) - a;
            if b > e {
                self.private.insert(e, b);
            }
        }
        self.private_pages -= was_private;
        was_private
    }

    /// Adds `[s, e)`, which must hold no private page, to the private set, joining
    /// the intervals that touch it.
    fn insert_private(&mut self, s: u64, e: u64) {
        let mut start = s;
        if let Some((&a, &b)) = self.private.range(..s).next_back() {
            if b == s {
                start = a;
            }
        }
        let end = match self.private.remove(&e) {
            Some(b) => b,
            None => e,
        };
        // Overwrites the left neighbour's entry when joining it.
        self.private.insert(start, end);
        self.private_pages += e - s;
    }
}

/// `block` in pages, if it is a non-zero multiple of 4 KiB.
fn block_pages(block: u64) -> Option<u64> {
    (block != 0 && block.is_multiple_of(PAGE_4K)).then_some(block >> PAGE_SHIFT)
}

/// Shrinks ranges to whole pages, drops empty ones, sorts, merges overlaps.
/// The result's ranges are page-aligned, non-empty and end at most at
/// `u64::MAX & !(PAGE_4K - 1)`, so the last page of the address space is never RAM.
fn normalize_ram(ram: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = ram
        .iter()
        .filter_map(|&(gpa, size)| {
            let start = crate::align_up(gpa, PAGE_4K)?;
            let end = gpa.saturating_add(size) & !(PAGE_4K - 1);
            (end > start).then_some((start, end))
        })
        .collect();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s < last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out.into_iter().map(|(s, e)| (s, e - s)).collect()
}

/// Checks that snapshot ranges are page-aligned, non-empty, sorted and disjoint.
fn check_ranges(what: &str, ranges: &[(u64, u64)]) -> Result<(), AttrError> {
    let mut prev_end = 0;
    for (i, &(gpa, len)) in ranges.iter().enumerate() {
        let bad = |why: &str| AttrError::BadState(format!("{what} range {i} ({len:#x}@{gpa:#x}) {why}"));
        if !gpa.is_multiple_of(PAGE_4K) || !len.is_multiple_of(PAGE_4K) {
            return Err(bad("is not 4 KiB aligned"));
        }
        if len == 0 {
            return Err(bad("is empty"));
        }
        // The last page of the address space is never RAM, so an end of 2^64 is refused too.
        let end = gpa.checked_add(len).ok_or_else(|| bad("overflows"))?;
        if i > 0 && gpa < prev_end {
            return Err(bad("overlaps or precedes the one before"));
        }
        prev_end = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PAGE_1G, PAGE_2M};

    use PageState::{Private, Shared};

    const K4: u64 = PAGE_4K;

    /// Two touching ranges, a gap, a third range: 784 + 1264 = 2048 pages.
    fn small_ram() -> Vec<(u64, u64)> {
        vec![(0, PAGE_2M), (PAGE_2M, (1 << 20) + (64 << 10)), ((4 << 20) + 3 * K4, 1264 * K4)]
    }

    fn ranges(a: &Attributes) -> Vec<(u64, u64)> {
        a.private_ranges().collect()
    }

    /// Checks the private map is canonical and the counters agree with it.
    fn assert_invariants(a: &Attributes) {
        let mut prev: Option<(u64, u64)> = None;
        let mut sum = 0;
        for (&s, &e) in &a.private {
            assert!(s < e, "empty interval {s}..{e}");
            if let Some((_, pe)) = prev {
                assert!(pe < s, "intervals touch or overlap at {pe}/{s}");
            }
            let span = a.span_of(s).expect("private interval outside RAM");
            assert!(e <= span.1, "private interval leaves its span");
            sum += e - s;
            prev = Some((s, e));
        }
        assert_eq!(sum, a.private_pages);
        assert_eq!(a.private_bytes() + a.shared_bytes(), a.ram_bytes());
    }

    #[test]
    fn new_covers_ram_in_the_initial_state() {
        let a = Attributes::new(&small_ram(), Shared);
        assert_eq!(a.ram_bytes(), 2048 * K4);
        assert_eq!((a.private_bytes(), a.shared_bytes()), (0, 2048 * K4));
        assert_eq!(a.state_of(0), Some(Shared));
        assert_eq!(a.state_of(PAGE_2M + 17), Some(Shared));
        assert_eq!(a.state_of(4 << 20), None);
        assert_eq!(a.state_of(u64::MAX), None);
        assert_eq!(a.private_range_count(), 0);

        let p = Attributes::new(&small_ram(), Private);
        assert_eq!((p.private_bytes(), p.shared_bytes()), (2048 * K4, 0));
        // The touching ranges form one interval.
        assert_eq!(ranges(&p), vec![(0, 784 * K4), ((4 << 20) + 3 * K4, 1264 * K4)]);
        assert_eq!(p.state_of((4 << 20) + 3 * K4), Some(Private));
        assert_invariants(&a);
        assert_invariants(&p);
    }

    #[test]
    fn odd_ram_is_normalized_without_panicking() {
        let a = Attributes::new(
            &[
                (3 * K4 + 1, 2 * K4),
                (0, 0),
                (u64::MAX - 10, 100),
                (0, 2 * K4),
                (K4, 2 * K4),
                (u64::MAX - 2 * K4, K4 * 3),
            ],
            Private,
        );
        assert_eq!(a.ram_ranges(), &[(0, 3 * K4), (4 * K4, K4), (u64::MAX - 2 * K4 + 1, K4)]);
        assert_eq!(a.ram_bytes(), 5 * K4);
        // A range inside another disappears into it.
        assert_eq!(Attributes::new(&[(0, 4 * K4), (K4, K4)], Shared).ram_ranges(), &[(0, 4 * K4)]);
        // The last page of the address space is never RAM.
        assert_eq!(a.state_of(u64::MAX), None);
        assert_eq!(a.state_of(u64::MAX - K4), Some(Private));
        assert!(!a.all(u64::MAX - K4, K4 + 1, Private));
        assert_eq!(a.first_not(u64::MAX - K4, u64::MAX, Private), Some(u64::MAX - K4 + 1));
        let mut empty = Attributes::new(&[], Shared);
        assert_eq!((empty.ram_bytes(), empty.mixed_blocks(PAGE_2M)), (0, 0));
        assert_eq!(empty.set(0, K4, Private), Err(AttrError::OutsideRam { gpa: 0, len: K4 }));
    }

    #[test]
    fn every_error_is_reported_and_changes_nothing() {
        let mut a = Attributes::new(&small_ram(), Shared);
        a.set(8 * K4, 4 * K4, Private).unwrap();
        let before = a.clone();
        let gap = 784 * K4;
        let cases = [
            (K4 + 1, K4, AttrError::Unaligned { gpa: K4 + 1, len: K4 }),
            (K4, 100, AttrError::Unaligned { gpa: K4, len: 100 }),
            (3, 0, AttrError::Unaligned { gpa: 3, len: 0 }),
            (K4, 0, AttrError::Empty),
            (u64::MAX - K4 + 1, K4, AttrError::Overflow { gpa: u64::MAX - K4 + 1, len: K4 }),
            (K4, u64::MAX - K4 + 1, AttrError::Overflow { gpa: K4, len: u64::MAX - K4 + 1 }),
            (gap, K4, AttrError::OutsideRam { gpa: gap, len: K4 }),
            (gap - K4, 2 * K4, AttrError::OutsideRam { gpa: gap - K4, len: 2 * K4 }),
            (0, 1 << 30, AttrError::OutsideRam { gpa: 0, len: 1 << 30 }),
            (4 << 20, 2 * K4, AttrError::OutsideRam { gpa: 4 << 20, len: 2 * K4 }),
            (1 << 40, K4, AttrError::OutsideRam { gpa: 1 << 40, len: K4 }),
        ];
        for (gpa, len, err) in cases {
            for state in [Shared, Private] {
                assert_eq!(a.set(gpa, len, state), Err(err.clone()), "set({gpa:#x}, {len:#x})");
                assert_eq!(a, before);
            }
            assert_eq!(a.check(gpa, len), Err(err));
        }
        // Errors read well.
        assert_eq!(
            AttrError::OutsideRam { gpa: 0x1000, len: 0x2000 }.to_string(),
            "range of 0x2000 bytes at 0x1000 is not entirely guest RAM"
        );
    }

    #[test]
    fn conversions_may_cross_touching_ranges_only() {
        let mut a = Attributes::new(&small_ram(), Shared);
        a.check(PAGE_2M - K4, 2 * K4).unwrap();
        assert_eq!(a.set(PAGE_2M - K4, 2 * K4, Private), Ok(2));
        assert_eq!(ranges(&a), vec![(PAGE_2M - K4, 2 * K4)]);
        // Whole first span and whole last range.
        assert_eq!(a.set(0, 784 * K4, Private), Ok(782));
        assert_eq!(a.set((4 << 20) + 3 * K4, 1264 * K4, Private), Ok(1264));
        assert_eq!(a.shared_bytes(), 0);
        assert_invariants(&a);
    }

    #[test]
    fn touching_private_ranges_coalesce() {
        let mut a = Attributes::new(&small_ram(), Shared);
        assert_eq!(a.set(0, 2 * K4, Private), Ok(2));
        assert_eq!(a.set(2 * K4, 2 * K4, Private), Ok(2));
        assert_eq!(ranges(&a), vec![(0, 4 * K4)]);
        // Filling a hole joins both sides.
        a.set(6 * K4, K4, Private).unwrap();
        a.set(8 * K4, 2 * K4, Private).unwrap();
        assert_eq!(a.private_range_count(), 3);
        assert_eq!(a.set(4 * K4, 4 * K4, Private), Ok(3));
        assert_eq!(ranges(&a), vec![(0, 10 * K4)]);
        // Setting what is already set changes nothing.
        assert_eq!(a.set(K4, 3 * K4, Private), Ok(0));
        assert_eq!(ranges(&a), vec![(0, 10 * K4)]);
        assert_eq!(a.private_bytes(), 10 * K4);
        assert_invariants(&a);
    }

    #[test]
    fn sharing_inside_a_private_range_splits_it() {
        let mut a = Attributes::new(&small_ram(), Shared);
        a.set(0, 4 * K4, Private).unwrap();
        assert_eq!(a.set(K4, K4, Shared), Ok(1));
        assert_eq!(ranges(&a), vec![(0, K4), (2 * K4, 2 * K4)]);
        assert_eq!(a.private_bytes(), 3 * K4);
        assert_eq!(a.state_of(K4 + 5), Some(Shared));
        // Sharing across several ranges trims the ends and drops the middle.
        a.set(6 * K4, 2 * K4, Private).unwrap();
        a.set(10 * K4, 4 * K4, Private).unwrap();
        assert_eq!(a.set(3 * K4, 9 * K4, Shared), Ok(5));
        assert_eq!(ranges(&a), vec![(0, K4), (2 * K4, K4), (12 * K4, 2 * K4)]);
        assert_eq!(a.set(0, 784 * K4, Shared), Ok(4));
        assert_eq!(a.private_range_count(), 0);
        assert_invariants(&a);
    }

    #[test]
    fn all_and_first_not_are_byte_granular() {
        let mut a = Attributes::new(&small_ram(), Shared);
        a.set(4 * K4, 2 * K4, Private).unwrap();
        assert!(a.all(0, 4 * K4, Shared));
        assert!(!a.all(1, 4 * K4, Shared));
        assert_eq!(a.first_not(1, 4 * K4, Shared), Some(4 * K4));
        assert!(a.all(4 * K4 + 7, K4, Private));
        assert!(!a.all(4 * K4 + 7, 2 * K4, Private));
        assert_eq!(a.first_not(4 * K4 + 7, 2 * K4, Private), Some(6 * K4));
        assert_eq!(a.first_not(0, 4 * K4, Private), Some(0));
        // Empty ranges: only RAM membership matters.
        assert!(a.all(5 * K4, 0, Shared));
        assert!(a.all(K4, 0, Private));
        assert!(!a.all(1 << 40, 0, Shared));
        assert_eq!(a.first_not(1 << 40, 0, Shared), Some(1 << 40));
        // Crossing the touching ranges is fine, crossing the gap is not.
        assert!(a.all(PAGE_2M - 8, 16, Shared));
        let gap = 784 * K4;
        assert!(!a.all(gap - 8, 16, Shared));
        assert_eq!(a.first_not(gap - 8, 16, Shared), Some(gap));
        assert_eq!(a.first_not(gap - 8, u64::MAX, Shared), Some(gap));
        // Overflowing ranges are never all anything.
        assert!(!a.all(8, u64::MAX, Shared));
        assert_eq!(a.state_of(gap + 1), None);
    }

    #[test]
    fn mixed_blocks_counts_blocks_with_both_kinds() {
        let ram = [(0, 4 * PAGE_2M), (6 * PAGE_2M, PAGE_2M + 64 * K4)];
        let mut a = Attributes::new(&ram, Shared);
        assert_eq!(a.mixed_blocks(PAGE_2M), 0);
        a.set(PAGE_2M + 5 * K4, K4, Private).unwrap();
        assert_eq!(a.mixed_blocks(PAGE_2M), 1);
        assert!(a.block_is_mixed(PAGE_2M + 123, PAGE_2M));
        assert!(!a.block_is_mixed(0, PAGE_2M));
        assert_eq!(a.mixed_blocks(16 * K4), 1);
        assert_eq!(a.mixed_blocks(K4), 0);
        // A whole private block is not mixed.
        a.set(PAGE_2M, PAGE_2M, Private).unwrap();
        assert_eq!(a.mixed_blocks(PAGE_2M), 0);
        assert!(!a.block_is_mixed(PAGE_2M, PAGE_2M));
        // One private range from the middle of block 0 to the middle of block 3:
        // blocks 0 and 3 are mixed, blocks 1 and 2 in between are not.
        a.set(PAGE_2M / 2, 3 * PAGE_2M, Private).unwrap();
        assert_eq!(a.private_range_count(), 1);
        assert_eq!(a.mixed_blocks(PAGE_2M), 2);
        assert!(a.block_is_mixed(0, PAGE_2M) && a.block_is_mixed(3 * PAGE_2M, PAGE_2M));
        assert!(!a.block_is_mixed(PAGE_2M, PAGE_2M) && !a.block_is_mixed(2 * PAGE_2M, PAGE_2M));
        assert_eq!(a.mixed_blocks(PAGE_1G), 1);
        // A block only partly in RAM is judged on its RAM part.
        a.set(6 * PAGE_2M + PAGE_2M, 64 * K4, Private).unwrap();
        assert_eq!(a.mixed_blocks(PAGE_2M), 2);
        assert!(!a.block_is_mixed(7 * PAGE_2M, PAGE_2M));
        a.set(7 * PAGE_2M, K4, Shared).unwrap();
        assert_eq!(a.mixed_blocks(PAGE_2M), 3);
        assert!(a.block_is_mixed(7 * PAGE_2M + 64 * K4, PAGE_2M));
        // Sizes that are not whole pages count nothing.
        for bad in [0, 100, PAGE_2M + 1] {
            assert_eq!(a.mixed_blocks(bad), 0);
            assert!(!a.block_is_mixed(PAGE_2M * 2, bad));
        }
        assert_invariants(&a);
    }

    #[test]
    fn a_block_split_by_a_gap_can_be_all_private() {
        // Block 0 of 16 KiB: pages 0-1 and 3 are RAM, page 2 is a gap.
        let mut a = Attributes::new(&[(0, 2 * K4), (3 * K4, 5 * K4)], Shared);
        a.set(0, 2 * K4, Private).unwrap();
        assert_eq!(a.mixed_blocks(4 * K4), 1);
        a.set(3 * K4, K4, Private).unwrap();
        assert_eq!(a.private_range_count(), 2);
        assert_eq!(a.mixed_blocks(4 * K4), 0);
        assert!(!a.block_is_mixed(0, 4 * K4));
        a.set(4 * K4, K4, Private).unwrap();
        assert_eq!(a.mixed_blocks(4 * K4), 1);
        assert!(a.block_is_mixed(5 * K4, 4 * K4));
    }

    #[test]
    fn range_queries_find_overlapping_intervals_only() {
        let mut a = Attributes::new(&[(0, 1 << 20)], PageState::Shared);
        a.set(0x1000, 0x2000, PageState::Private).unwrap();
        a.set(0x8000, 0x1000, PageState::Private).unwrap();
        a.set(0x20000, 0x1000, PageState::Private).unwrap();
        let got: Vec<_> = a.private_ranges_in(0x2000, 0x7000).collect();
        assert_eq!(got, vec![(0x1000, 0x2000), (0x8000, 0x1000)]);
        assert_eq!(a.private_ranges_in(0x3000, 0x1000).count(), 0);
        assert_eq!(a.private_ranges_in(0, u64::MAX).count(), 3);
    }

    #[test]
    fn state_round_trips() {
        let ram = small_ram();
        let mut a = Attributes::new(&ram, Shared);
        a.set(0, 3 * K4, Private).unwrap();
        a.set(PAGE_2M - K4, 4 * K4, Private).unwrap();
        a.set((4 << 20) + 3 * K4, K4, Private).unwrap();
        let st = a.to_state();
        assert_eq!(st.version, ATTR_STATE_VERSION);
        assert_eq!(st.ram, ram);
        assert_eq!(st.private, vec![(0, 3 * K4), (PAGE_2M - K4, 4 * K4), ((4 << 20) + 3 * K4, K4)]);
        let b = Attributes::from_state(&st, &ram).unwrap();
        assert_eq!(b, a);
        assert_eq!(b.private_bytes(), 8 * K4);
        let all_private = Attributes::new(&ram, Private);
        assert_eq!(Attributes::from_state(&all_private.to_state(), &ram).unwrap(), all_private);
        // Touching private ranges are accepted and joined.
        let mut st2 = st.clone();
        st2.private = vec![(0, K4), (K4, K4), (2 * K4, K4)];
        assert_eq!(ranges(&Attributes::from_state(&st2, &ram).unwrap()), vec![(0, 3 * K4)]);
    }

    #[test]
    fn corrupt_states_are_refused() {
        let ram = small_ram();
        let good = Attributes::new(&ram, Shared).to_state();
        let with = |f: &dyn Fn(&mut AttrState)| {
            let mut s = good.clone();
            f(&mut s);
            s
        };
        let gap = 784 * K4;
        let bad_states = [
            with(&|s| s.version = 2),
            with(&|s| s.version = 0),
            with(&|s| s.private = vec![(0, 4 * K4), (2 * K4, 4 * K4)]),
            with(&|s| s.private = vec![(8 * K4, K4), (0, K4)]),
            with(&|s| s.private = vec![(0, 4 * K4), (0, 4 * K4)]),
            with(&|s| s.private = vec![(1, K4)]),
            with(&|s| s.private = vec![(0, K4 + 1)]),
            with(&|s| s.private = vec![(0, 0)]),
            with(&|s| s.private = vec![(K4, u64::MAX - K4 + 1)]),
            with(&|s| s.private = vec![(u64::MAX - K4 + 1, K4)]),
            with(&|s| s.private = vec![(gap, K4)]),
            with(&|s| s.private = vec![(gap - K4, 2 * K4)]),
            with(&|s| s.private = vec![(1 << 40, K4)]),
            with(&|s| s.ram = vec![(0, PAGE_2M)]),
            with(&|s| s.ram.push((1 << 30, K4))),
            with(&|s| s.ram[0].1 += 1),
            with(&|s| s.ram.swap(0, 1)),
            with(&|s| s.ram = vec![]),
        ];
        for st in &bad_states {
            match Attributes::from_state(st, &ram) {
                Err(AttrError::BadState(msg)) => assert!(!msg.is_empty()),
                other => panic!("{st:?} gave {other:?}"),
            }
        }
        // A good state for another VM is refused too.
        assert!(matches!(Attributes::from_state(&good, &[(0, PAGE_2M)]), Err(AttrError::BadState(_))));
        let e = Attributes::from_state(&with(&|s| s.version = 9), &ram).unwrap_err();
        assert_eq!(e.to_string(), "bad page attribute state: version 9 (this build reads 1)");
    }

    /// xorshift64*: small, deterministic, good enough to drive the model test.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Block sizes, in pages, the model keeps counts for: 2 MiB, 16 KiB, 12 KiB.
    const MODEL_BLOCKS: [usize; 3] = [512, 4, 3];

    /// The naive model: one entry per page, `None` outside RAM, plus counters
    /// updated page by page (and checked against a full recount by `recount`).
    struct Model {
        pages: Vec<Option<PageState>>,
        private: u64,
        shared: u64,
        /// Per block size of `MODEL_BLOCKS`, per block: (private pages, shared pages).
        blocks: Vec<Vec<(u32, u32)>>,
        /// Per block size of `MODEL_BLOCKS`: blocks with both kinds.
        mixed: Vec<u64>,
    }

    impl Model {
        fn new(pages: Vec<Option<PageState>>) -> Self {
            let mut m = Model { pages, private: 0, shared: 0, blocks: Vec::new(), mixed: Vec::new() };
            (m.private, m.shared, m.blocks, m.mixed) = m.recount();
            m
        }

        /// Counters computed from scratch.
        #[allow(clippy::type_complexity)]
        fn recount(&self) -> (u64, u64, Vec<Vec<(u32, u32)>>, Vec<u64>) {
            let count = |s| self.pages.iter().filter(|&&p| p == Some(s)).count() as u64;
            let blocks: Vec<Vec<(u32, u32)>> = MODEL_BLOCKS
                .iter()
                .map(|&bp| {
                    let n = |c: &[Option<PageState>], s| c.iter().filter(|&&p| p == Some(s)).count() as u32;
                    self.pages.chunks(bp).map(|c| (n(c, Private), n(c, Shared))).collect()
                })
                .collect();
            let mixed = |b: &Vec<(u32, u32)>| b.iter().filter(|&&(p, s)| p > 0 && s > 0).count() as u64;
            let mixed = blocks.iter().map(mixed).collect();
            (count(Private), count(Shared), blocks, mixed)
        }

        fn page(&self, pfn: u64) -> Option<PageState> {
            usize::try_from(pfn).ok().and_then(|i| self.pages.get(i).copied().flatten())
        }

        fn set(&mut self, gpa: u64, len: u64, state: PageState) -> Result<u64, AttrError> {
            if !gpa.is_multiple_of(K4) || !len.is_multiple_of(K4) {
                return Err(AttrError::Unaligned { gpa, len });
            }
            if len == 0 {
                return Err(AttrError::Empty);
            }
            let end = gpa.checked_add(len).ok_or(AttrError::Overflow { gpa, len })?;
            if !(gpa / K4..end / K4).all(|p| self.page(p).is_some()) {
                return Err(AttrError::OutsideRam { gpa, len });
            }
            let mut changed = 0;
            for p in (gpa / K4) as usize..(end / K4) as usize {
                if self.pages[p] == Some(state) {
                    continue;
                }
                self.pages[p] = Some(state);
                changed += 1;
                let (to_private, to_shared) = if state == Private { (1, -1) } else { (-1, 1) };
                self.private = self.private.wrapping_add_signed(to_private);
                self.shared = self.shared.wrapping_add_signed(to_shared);
                for ((counts, mixed), bp) in self.blocks.iter_mut().zip(&mut self.mixed).zip(MODEL_BLOCKS) {
                    let c = &mut counts[p / bp];
                    let was_mixed = c.0 > 0 && c.1 > 0;
                    c.0 = c.0.wrapping_add_signed(to_private as i32);
                    c.1 = c.1.wrapping_add_signed(to_shared as i32);
                    *mixed = mixed.wrapping_add_signed(i64::from(c.0 > 0 && c.1 > 0) - i64::from(was_mixed));
                }
            }
            Ok(changed)
        }

        fn first_not(&self, gpa: u64, len: u64, state: PageState) -> Option<u64> {
            if len == 0 {
                return self.page(gpa / K4).is_none().then_some(gpa / K4 * K4);
            }
            let (first, last) = (gpa / K4, gpa.saturating_add(len - 1) / K4);
            // Pages past the model are not RAM.
            let n = self.pages.len() as u64;
            if first >= n {
                return Some(first * K4);
            }
            let stop = last.min(n - 1);
            match self.pages[first as usize..=stop as usize].iter().position(|&p| p != Some(state)) {
                Some(i) => Some((first + i as u64) * K4),
                None => (last > stop).then_some((stop + 1) * K4),
            }
        }

        /// Mixed blocks of the `k`th size of `MODEL_BLOCKS`.
        fn mixed_blocks(&self, k: usize) -> u64 {
            self.mixed[k]
        }

        /// Whether the block of the `k`th size holding byte `gpa` is mixed.
        fn block_is_mixed(&self, gpa: u64, k: usize) -> bool {
            let block = usize::try_from(gpa / K4).ok().map(|p| p / MODEL_BLOCKS[k]);
            block.and_then(|b| self.blocks[k].get(b)).is_some_and(|&(p, s)| p > 0 && s > 0)
        }

        fn private_ranges(&self) -> Vec<(u64, u64)> {
            let mut out: Vec<(u64, u64)> = Vec::new();
            for (i, p) in self.pages.iter().enumerate() {
                if *p == Some(Private) {
                    let gpa = i as u64 * K4;
                    match out.last_mut() {
                        Some(last) if last.0 + last.1 == gpa => last.1 += K4,
                        _ => out.push((gpa, K4)),
                    }
                }
            }
            out
        }
    }

    /// A byte address near RAM, often page-aligned, sometimes wild.
    fn random_gpa(rng: &mut Rng, limit: u64) -> u64 {
        match rng.below(20) {
            0 => u64::MAX - rng.below(4 * K4),
            1 => rng.next(),
            2..=4 => rng.below(limit),
            _ => rng.below(limit / K4) * K4,
        }
    }

    fn random_len(rng: &mut Rng) -> u64 {
        match rng.below(20) {
            0 => 0,
            1 => rng.next(),
            2 => u64::MAX - rng.below(K4),
            3..=4 => rng.below(64 * K4),
            5..=7 => (1 + rng.below(1024)) * K4,
            _ => (1 + rng.below(48)) * K4,
        }
    }

    #[test]
    fn randomized_against_a_per_page_model() {
        // 2048 pages: two touching ranges, a one-page gap (page 786, inside a 2 MiB
        // and a 16 KiB block that have RAM on both sides), a wide gap (pages
        // 1500..1800), a last range.
        let ram = [(0, PAGE_2M), (PAGE_2M, 274 * K4), (787 * K4, 713 * K4), (1800 * K4, 549 * K4)];
        // 10 MiB: all of RAM and some beyond, a whole number of 2 MiB blocks.
        let limit_pages = 2560usize;
        let limit = limit_pages as u64 * K4;
        let mut pages = vec![None; limit_pages];
        for &(gpa, size) in &ram {
            pages[(gpa / K4) as usize..((gpa + size) / K4) as usize].fill(Some(Shared));
        }
        assert_eq!(pages.iter().flatten().count(), 2048);
        let mut model = Model::new(pages);
        let mut a = Attributes::new(&ram, Shared);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut ok, mut failed) = (0, 0);
        for op in 0..20_000 {
            let gpa = random_gpa(&mut rng, limit);
            let len = random_len(&mut rng);
            let state = if rng.below(2) == 0 { Shared } else { Private };
            let expect = model.set(gpa, len, state);
            assert_eq!(a.check(gpa, len), expect.as_ref().map(|_| ()).map_err(Clone::clone), "op {op}");
            assert_eq!(a.set(gpa, len, state), expect, "op {op}: set({gpa:#x}, {len:#x}, {state:?})");
            if expect.is_ok() {
                ok += 1;
            } else {
                failed += 1;
            }

            assert_eq!(a.private_bytes(), model.private * K4, "op {op}");
            assert_eq!(a.shared_bytes(), model.shared * K4, "op {op}");
            for sample in 0..8 {
                let g = random_gpa(&mut rng, limit + 4 * K4);
                assert_eq!(a.state_of(g), model.page(g / K4), "op {op}: state_of({g:#x})");
                for (k, &bp) in MODEL_BLOCKS.iter().enumerate() {
                    let block = bp as u64 * K4;
                    let naive = model.block_is_mixed(g, k);
                    assert_eq!(a.block_is_mixed(g, block), naive, "op {op}: block_is_mixed({g:#x}, {block:#x})");
                }
                // The model scans byte ranges page by page: half the samples suffice.
                if sample % 2 == 0 {
                    let l = random_len(&mut rng).wrapping_add(rng.below(3));
                    for s in [Shared, Private] {
                        let fnot = model.first_not(g, l, s);
                        assert_eq!(a.first_not(g, l, s), fnot, "op {op}: first_not({g:#x}, {l:#x}, {s:?})");
                        assert_eq!(a.all(g, l, s), fnot.is_none(), "op {op}: all({g:#x}, {l:#x}, {s:?})");
                    }
                }
            }
            assert_eq!(a.mixed_blocks(PAGE_2M), model.mixed_blocks(0), "op {op}");
            assert_eq!(a.mixed_blocks(4 * K4), model.mixed_blocks(1), "op {op}");
            if op % 256 == 0 {
                let counters = (model.private, model.shared, model.blocks.clone(), model.mixed.clone());
                assert_eq!(model.recount(), counters, "model counters");
                assert_invariants(&a);
                assert_eq!(ranges(&a), model.private_ranges(), "op {op}");
                assert_eq!(a.mixed_blocks(3 * K4), model.mixed_blocks(2), "op {op}");
            }
            if op % 1000 == 0 {
                assert_eq!(Attributes::from_state(&a.to_state(), &ram).as_ref(), Ok(&a), "op {op}");
            }
        }
        // Both kinds of operation were exercised in earnest.
        assert!(ok > 5_000 && failed > 5_000, "ok {ok}, failed {failed}");
    }

    #[test]
    fn sixteen_gib_guest_scales() {
        // 16 GiB split around the MMIO hole: 4M pages.
        let ram = [(0, 3 * PAGE_1G), (4 * PAGE_1G, 13 * PAGE_1G)];
        let mut a = Attributes::new(&ram, Shared);
        assert_eq!(a.ram_bytes(), 16 * PAGE_1G);
        let pages = 16 * PAGE_1G / K4;
        let low = 3 * PAGE_1G / K4;
        let mut rng = Rng(42);
        let mut private = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let i = rng.below(pages);
            let gpa = if i < low { i * K4 } else { PAGE_1G + i * K4 };
            let state = if rng.below(3) == 0 { Shared } else { Private };
            let changed = a.set(gpa, K4, state).unwrap();
            let was = if state == Private { !private.insert(gpa) } else { private.remove(&gpa) };
            assert_eq!(changed, u64::from(state == Private) ^ u64::from(was));
            assert!(a.all(gpa + 1, 4094, state));
        }
        assert_eq!(a.private_bytes(), private.len() as u64 * K4);
        assert_eq!(a.shared_bytes(), 16 * PAGE_1G - private.len() as u64 * K4);
        assert_eq!(a.private_ranges().map(|(_, l)| l).sum::<u64>(), a.private_bytes());
        assert!(a.mixed_blocks(PAGE_2M) > 0 && a.mixed_blocks(PAGE_2M) <= private.len() as u64);
        assert_eq!(a.mixed_blocks(PAGE_1G), 16);
        assert_invariants(&a);
        // Everything private, then everything shared again, in two calls per range.
        for &(gpa, size) in &ram {
            a.set(gpa, size, Private).unwrap();
        }
        assert_eq!(a.private_range_count(), 2);
        assert_eq!(a.shared_bytes(), 0);
        assert_eq!(a.set(0, 3 * PAGE_1G, Shared), Ok(3 * PAGE_1G / K4));
        assert_eq!(a.private_bytes(), 13 * PAGE_1G);
    }
}
