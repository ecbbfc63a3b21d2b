//! Fuzzes the conversion-request decoders (conversion port and KVM_HC_MAP_GPA_RANGE)
//! and the conversion engine behind them, with guest-controlled values.
//!
//! Invariants: nothing panics; a refused request changes no page; an accepted one
//! leaves every page of its range in the target state and the byte counts add up.
#![no_main]

use std::sync::OnceLock;

use guest_mem::attrs::PageState;
use guest_mem::convert::{decode_map_gpa_range, decode_port};
use guest_mem::{BackendKind, BackendSpec, GuestMemory, MemoryLayout, ZoneSpec};
use libfuzzer_sys::fuzz_target;

fn memory() -> &'static GuestMemory {
    static MEM: OnceLock<GuestMemory> = OnceLock::new();
    MEM.get_or_init(|| {
        // Two zones with a gap-free layout of 8 MiB + 4 MiB.
        let zones = [8u64 << 20, 4 << 20]
            .into_iter()
            .map(|size| ZoneSpec { size, backend: BackendSpec::new(BackendKind::Memfd) })
            .collect();
        GuestMemory::new(MemoryLayout::place(zones).expect("layout"), None, None).expect("memory")
    })
}

fn u64_at(d: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    for (j, x) in b.iter_mut().enumerate() {
        *x = d.get(i + j).copied().unwrap_or(0);
    }
    u64::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    let mem = memory();
    // Small addresses and counts are more interesting than random 64-bit ones.
    let shrink = data.first().copied().unwrap_or(0);
    let mut gpa = u64_at(data, 1);
    let mut pages = u64_at(data, 9);
    if shrink & 1 != 0 {
        gpa %= 16 << 20;
    }
    if shrink & 2 != 0 {
        pages %= 4096;
    }
    let flags = u64_at(data, 17);
    let req =
        if shrink & 4 != 0 { decode_map_gpa_range(gpa, pages, flags) } else { decode_port(gpa, pages, flags as u32) };
    let before = mem.private_shared_bytes();
    let Ok(req) = req else {
        assert_eq!(mem.private_shared_bytes(), before);
        return;
    };
    match mem.convert(&req) {
        Ok(_) => {
            let len = req.len().expect("accepted length");
            let mut at = req.gpa;
            while at < req.gpa + len {
                assert_eq!(mem.state_of(at), Some(req.target));
                at += 4096;
            }
            let (p, s) = mem.private_shared_bytes();
            assert_eq!(p + s, 12 << 20);
            if req.target == PageState::Shared {
                let mut b = [0u8; 8];
                mem.read(req.gpa, &mut b).expect("a shared page is readable");
            }
        }
        Err(_) => assert_eq!(mem.private_shared_bytes(), before),
    }
});
