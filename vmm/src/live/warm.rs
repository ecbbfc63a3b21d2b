//! Memory touched ahead of a live update's pause, so that the pause does not fault it
//! in.
//!
//! A first touch of a page costs ~2-5 µs on a nested host (a page fault that the outer
//! host's shadow paging makes expensive). Traced, the pause took ~30 of them: the 17 KB
//! state is copied several times as it is encoded, framed, received and decoded, each
//! copy into freshly grown heap, and a vCPU thread's restore uses stack it never used
//! before. So the threads that work during the pause touch heap and stack beforehand,
//! while the guest still runs, and the allocator is told to keep freed memory rather
//! than give it back (which would make it fault again).

use std::hint::black_box;
use std::sync::Once;

/// Heap a thread warms for the pause, per vCPU of the guest.
pub const HEAP_PER_VCPU: usize = 64 << 10;
/// Heap a thread warms for the pause, besides.
pub const HEAP_BASE: usize = 256 << 10;
/// Stack a thread warms.
const STACK: usize = 64 << 10;
/// Allocations from the heap (not mmap) up to this size: a state frame of many vCPUs
/// stays in warmed memory.
const MMAP_THRESHOLD: i32 = 4 << 20;
/// Free memory the allocator keeps instead of returning it.
const TRIM_THRESHOLD: i32 = 64 << 20;
/// Warmed in pieces of this size (each well below the mmap threshold).
const PIECE: usize = 16 << 10;

/// Makes the allocator keep what it has (once per process).
fn keep_freed_memory() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: mallopt only changes glibc malloc's tuning; both values are in range.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        }
    });
}

/// Touches `bytes` of this thread's heap arena and frees it again (kept, see
/// [`keep_freed_memory`]), so the next allocations of the thread reuse touched pages.
pub fn heap(bytes: usize) {
    keep_freed_memory();
    let pieces: Vec<Vec<u8>> = (0..bytes.div_ceil(PIECE)).map(|_| vec![1u8; PIECE]).collect();
    black_box(&pieces);
}

/// Touches this thread's stack below the caller's frame.
#[inline(never)]
pub fn stack() {
    let mut area = [0u8; STACK];
    for b in area.iter_mut().step_by(4096) {
        *b = 1;
    }
    black_box(&mut area);
}

/// Both, for a thread that works during a pause of a guest with `vcpus` vCPUs.
pub fn for_pause(vcpus: u32) {
    heap(HEAP_BASE + HEAP_PER_VCPU * vcpus as usize);
    stack();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minor_faults() -> i64 {
        // SAFETY: getrusage writes only into the struct we pass; all zeros is valid.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
        ru.ru_minflt
    }

    #[test]
    fn allocations_after_warming_do_not_fault() {
        std::thread::spawn(|| {
            for_pause(2);
            let before = minor_faults();
            let copies: Vec<Vec<u8>> = (0..8).map(|i| vec![i as u8; 17 << 10]).collect();
            black_box(&copies);
            drop(copies);
            let after = minor_faults();
            assert!(after - before <= 2, "{} faults after warming", after - before);
            // Unwarmed, the same allocations fault (the test can fail).
            let before = minor_faults();
            let big: Vec<Vec<u8>> = (0..8).map(|i| vec![i as u8; 300 << 10]).collect();
            black_box(&big);
            assert!(minor_faults() - before > 8);
        })
        .join()
        .unwrap();
    }
}
