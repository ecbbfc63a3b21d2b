//! Built-in guest programs, compiled from `resources/guests` by `build.rs`.
//!
//! Each is a static ELF64 x86-64 executable following `docs/GUEST-ABI.md`: linked at
//! guest-physical 0x200000, entered at CPL3 on every vCPU. The C programs print to COM1
//! and end through the exit (0x500) / park (0x502) ports:
//!
//! | name | what it does | output (COM1) | exit code |
//! |---|---|---|---|
//! | `hello` | every vCPU writes the boot marker and checks in; vCPU 0 waits for all | `Hello from Mosaic! guest RAM <MiB> MiB, <n> vCPUs online` | 0 |
//! | `memtest` | writes and verifies every free page, split across vCPUs | see below | 0 ok, 1 mismatch or bad layout |
//! | `fault` | reads unmapped 0x700000000000 | `fault: touching unmapped address` | #PF (VMM: 125) |
//! | `memlat` | vCPU 0: pointer-chase load latency over all free RAM (at most 4 GiB), one random cycle through every 4 KiB page | see below | 0 ok, 1 bad layout or broken cycle |
//! | `convbench` | conversion round trips through the port for 4K, 2M and 1G requests, ZERO and PRESERVE, and a bare port exit, timed with rdtsc | `convbench: exit <ns> ns`, `convbench: <4K\|2M\|1G> <zero\|preserve> <n> ops <ns> ns/op`, `convbench: ok` | 0 ok, 1 a conversion failed |
//! | `convstress` | 10,000 random single-page conversions (random target and ZERO/PRESERVE mode, each checked), then everything back to shared and the memtest pattern over all free RAM | `convstress: conversions <n> zero-checks <n> preserve-checks <n> mismatches <n>`, `convstress: memtest bytes <n> checksum 0x<16 hex> mismatches <n>`, `convstress: ok` | 0 ok, 1 otherwise |
//! | `convert` | private memory (run with `--memory size=...,private=on`): vCPU 0 walks one page through the conversion port and the test DMA device (docs/PRIVATE-MEMORY.md), then with 2+ vCPUs all convert and DMA neighbouring pages at once against a shadow | see below | 0 ok, 1 a failed step, a mismatch or bad layout |
//! | `heartbeat` | for live-update tests: every vCPU rewrites its share of the free pages cyclically (a pass number, a pass-keyed pattern and a checksum per page) and times the gaps between page writes; vCPU 0 polls the generation port (0x503) every 1 ms and reports each live update's pause and its page rate in the 100 ms after against the 100 ms before; runs until generation `--guest-arg N` (N > 0) or 1 s, then verifies every page | see below | 0 ok, 1 mismatch or bad layout |
//! | `hypercall` | at CPL0 (`--guest-cpl 0`): converts a page private and back with KVM_HC_MAP_GPA_RANGE hypercalls, checks the DMA device and the contents after each, and that bad requests are refused | `hypercall: step <n> ok`, `hypercall: ok` | 0 ok, 1 a step failed |
//! | `probe` | for `host-check`: boot marker, 200000-iteration ALU loop, exit 0; CPL0- or CPL3-safe (only mov/add/xor/dec/jnz/out, no stack) | none | 0 |
//!
//! `memtest` output (vCPU 0, after all vCPUs are done):
//! ```text
//! memtest: range 0x<gpa hex> +0x<len hex>        one line per boot-info free range
//! memtest: vcpus <n> bytes <dec> checksum 0x<16 hex> mismatches <dec>
//! memtest: write <dec> cycles/page <dec> ns/page
//! memtest: ok                                    or: memtest: FAIL
//! ```
//! The qword at guest-physical `a` holds
//! `(a ^ 0x5a5a5a5a5a5a5a5a).wrapping_mul(0x9e3779b97f4a7c15)`; the checksum is the
//! wrapping sum of every qword read back. On a mismatch, lines
//! `memtest: vcpu <i> first mismatch at 0x<hex> read 0x<16 hex> expected 0x<16 hex>`
//! come before `FAIL`; on a bad layout only `memtest: bad layout: <reason>` and
//! `memtest: FAIL` are printed.
//!
//! `memlat` (for the huge-page benchmarks) links one 8-byte slot per 4 KiB page of the
//! working set (the free ranges concatenated, capped at 4 GiB), at a varying cache-line
//! offset, into a single random cycle (Sattolo, fixed-seed xorshift64: the same cycle
//! every run), so each dependent load `p = *p` lands on a different page: a TLB miss
//! unless the mapping is huge in both guest and host. It walks the cycle once untimed
//! (checking its length), then times `steps = max(2 * pages, 1000000)` loads with rdtsc:
//! ```text
//! memlat: working set <bytes dec> pages <dec> steps <dec>
//! memlat: <dec>.<d> cycles/access <dec>.<d> ns/access      (rounded; ns 0.0 if tsc_khz is 0)
//! memlat: ok
//! ```
//! On a bad layout (invalid boot info, fewer than 1024 free pages, ...) it prints only
//! `memlat: bad layout: <reason>`; on a broken cycle `memlat: FAIL: cycle length <n>
//! expected <pages>`; both return 1. Set-up touches every page once, so it takes about
//! as long as the VMM needs to fault the working set in.

//!
//! `convert` output (P = the first page of the first free range; each step's expected
//! statuses are in `resources/guests/convert.c`):
//! ```text
//! convert: step 1 ok          secret (qword i = 0x5ec7e70000 + i) written to P
//! convert: step 2 ok          DMA READ P -> 4 (private)
//! convert: step 3 ok          shared/ZERO: P reads zeros, DMA READ 0 sum 0
//! convert: step 4 ok          DMA FILL 0xa5: the guest reads 0xa5
//! convert: step 5 ok          private/PRESERVE: still 0xa5, DMA READ 4
//! convert: step 6 ok          secret, shared/PRESERVE: intact, DMA sum = the guest's byte sum
//! convert: step 7 ok          private/ZERO: zeros, DMA READ 4
//! convert: step 8 ok          bad conversions (1 INVALID, 2 RANGE) and DMA requests change nothing
//! convert: vcpus <n> conversions <dec> dma <dec> mismatches <dec>     (2+ vCPUs only)
//! convert: ok                 or: convert: FAIL
//! ```
//! A failed step prints `convert: step <n> FAIL <what>[ at P+0x<off>]: expected 0x<hex>
//! got 0x<hex>` (its first failure) instead of `ok`, and the run goes on. With 2+
//! vCPUs, the pages after P are dealt out in 4-page chunks round-robin (up to 64 pages
//! per vCPU); each vCPU does 200 rounds of converting 1-4 pages of a chunk to a random
//! state and mode, guest writes or DMA FILLs, and DMA READs of the pages around them,
//! checking every status, sum and guest read against its shadow of its pages; each vCPU
//! with a mismatch adds `convert: vcpu <i> first mismatch: <what> at 0x<gpa> expected
//! 0x<hex> got 0x<hex>` after the `vcpus` line. Without `private=on` step 2 fails.
//! Bad layout: `convert: bad layout: <reason>` and `convert: FAIL`.
//!
//! `heartbeat` output (vCPU 0; page format, windows and end rules in
//! `resources/guests/heartbeat.c`):
//! ```text
//! heartbeat: update <gen> gap <cycles> cycles <us> us after <pages> pages before <pages> pages
//! heartbeat: vcpus <n> bytes <dec> passes <dec> updates <dec>
//! heartbeat: max gap <cycles> cycles <us> us
//! heartbeat: ok                                  or: heartbeat: FAIL
//! ```
//! One `update` line per generation value read on port 0x503, printed 100 ms after the
//! update was seen: `gap` is the longest time between two of vCPU 0's page writes
//! since its previous generation read (the update's pause), `after`/`before` vCPU 0's
//! pages written in the 100 ms after it and in the last 100 ms window before it (us are
//! 0 if tsc_khz is 0). The run ends once the generation read is at least `--guest-arg
//! N` and its line is out, or with N = 0 after 1 s (every vCPU finishes at least one
//! full pass first). `passes` sums the vCPUs' completed passes, `updates` is the last
//! generation read, `max gap` the longest gap on any vCPU. A bad page adds `heartbeat:
//! vcpu <i> first mismatch at 0x<hex> read 0x<16 hex> expected 0x<16 hex>` before
//! `FAIL`; a bad layout prints only `heartbeat: bad layout: <reason>` and `heartbeat:
//! FAIL`.

/// Names of the built-in guest programs, as accepted by [`builtin`].
pub const NAMES: &[&str] =
    &["hello", "memtest", "fault", "memlat", "convert", "convstress", "convbench", "heartbeat", "hypercall", "probe"];

static HELLO: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hello.elf"));
static MEMTEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/memtest.elf"));
static FAULT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fault.elf"));
static MEMLAT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/memlat.elf"));
static CONVERT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/convert.elf"));
static CONVSTRESS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/convstress.elf"));
static CONVBENCH: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/convbench.elf"));
static HEARTBEAT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/heartbeat.elf"));
static HYPERCALL: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hypercall.elf"));
static PROBE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/probe.elf"));

/// Returns the ELF image of the built-in guest program `name` (one of [`NAMES`]),
/// or `None` if there is no such program.
pub fn builtin(name: &str) -> Option<&'static [u8]> {
    match name {
        "hello" => Some(HELLO),
        "memtest" => Some(MEMTEST),
        "fault" => Some(FAULT),
        "memlat" => Some(MEMLAT),
        "convert" => Some(CONVERT),
        "convstress" => Some(CONVSTRESS),
        "convbench" => Some(CONVBENCH),
        "heartbeat" => Some(HEARTBEAT),
        "hypercall" => Some(HYPERCALL),
        "probe" => Some(PROBE),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    /// (p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz) of every program header.
    fn program_headers(elf: &[u8]) -> Vec<(u32, u64, u64, u64, u64, u64)> {
        let phoff = usize::try_from(u64_at(elf, 32)).unwrap();
        let phentsize = usize::from(u16_at(elf, 54));
        let phnum = usize::from(u16_at(elf, 56));
        assert_eq!(phentsize, 56);
        (0..phnum)
            .map(|i| {
                let ph = phoff + i * phentsize;
                (
                    u32_at(elf, ph),
                    u64_at(elf, ph + 8),
                    u64_at(elf, ph + 16),
                    u64_at(elf, ph + 24),
                    u64_at(elf, ph + 32),
                    u64_at(elf, ph + 40),
                )
            })
            .collect()
    }

    #[test]
    fn every_name_has_an_image() {
        for name in NAMES {
            assert!(builtin(name).is_some(), "{name}");
        }
        assert!(builtin("nope").is_none());
        assert!(builtin("").is_none());
    }

    #[test]
    fn memlat_is_built_in() {
        assert!(NAMES.contains(&"memlat"));
        let elf = builtin("memlat").unwrap();
        // The pieces of the lines the huge-page benchmarks parse (docs above).
        for text in ["memlat: working set ", " pages ", " steps ", " cycles/access ", " ns/access\n", "memlat: ok\n"] {
            let text = text.as_bytes();
            assert!(
                elf.windows(text.len()).any(|w| w == text),
                "memlat image lacks {:?}",
                String::from_utf8_lossy(text)
            );
        }
    }

    #[test]
    fn convert_is_built_in() {
        let elf = builtin("convert").unwrap();
        // The pieces of the documented output lines (docs above).
        for text in [
            "convert: step ",
            " ok\n",
            " FAIL ",
            "convert: vcpus ",
            " conversions ",
            " dma ",
            " mismatches ",
            "convert: ok\n",
            "convert: FAIL\n",
        ] {
            let text = text.as_bytes();
            assert!(
                elf.windows(text.len()).any(|w| w == text),
                "convert image lacks {:?}",
                String::from_utf8_lossy(text)
            );
        }
    }

    #[test]
    fn images_are_static_elf64_x86_64_exec() {
        for name in NAMES {
            let elf = builtin(name).unwrap();
            assert_eq!(&elf[..4], b"\x7fELF", "{name}: magic");
            assert_eq!(elf[4], 2, "{name}: ELFCLASS64");
            assert_eq!(elf[5], 1, "{name}: little-endian");
            assert_eq!(u16_at(elf, 16), 2, "{name}: ET_EXEC");
            assert_eq!(u16_at(elf, 18), 62, "{name}: EM_X86_64");
            let entry = u64_at(elf, 24);
            assert!(entry >= 0x20_0000, "{name}: entry {entry:#x}");
        }
    }

    #[test]
    fn segments_follow_the_guest_abi() {
        for name in NAMES {
            let elf = builtin(name).unwrap();
            let entry = u64_at(elf, 24);
            let phdrs = program_headers(elf);
            let loads: Vec<_> = phdrs.iter().filter(|p| p.0 == 1).collect();
            assert!(!loads.is_empty(), "{name}: no PT_LOAD");
            for &(p_type, _, _, _, _, _) in &phdrs {
                assert!(p_type != 2 && p_type != 3, "{name}: PT_DYNAMIC/PT_INTERP");
            }
            for &&(_, offset, vaddr, paddr, filesz, memsz) in &loads {
                assert!(paddr >= 0x20_0000, "{name}: p_paddr {paddr:#x}");
                assert_eq!(paddr, vaddr, "{name}: p_paddr != p_vaddr");
                assert!(filesz <= memsz, "{name}: p_filesz > p_memsz");
                assert!(offset + filesz <= elf.len() as u64, "{name}: segment past EOF");
            }
            assert!(
                loads.iter().any(|p| p.3 <= entry && entry < p.3 + p.4),
                "{name}: entry {entry:#x} outside the loaded text"
            );
        }
    }
}
