//! The x86 descriptor tables a guest program runs on: GDT, per-vCPU TSS with an I/O
//! permission bitmap, IDT, and the CPL0 exception stubs, built as bytes.

use super::layout::*;

/// Vectors for which the CPU pushes an error code.
const ERROR_CODE_VECTORS: [u8; 9] = [8, 10, 11, 12, 13, 14, 17, 21, 29];

/// Port the exception stubs write to.
pub const EXCEPTION_PORT: u16 = 0x510;

/// A code/data segment descriptor: `access` byte and flags nibble, flat 4 GiB.
fn seg(access: u8, flags: u8) -> u64 {
    let limit: u64 = 0xf_ffff;
    (limit & 0xffff) | (u64::from(access) << 40) | (((limit >> 16) & 0xf) << 48) | (u64::from(flags & 0xf) << 52)
}

/// A 64-bit TSS descriptor (two GDT slots), type 0xB (busy, as loaded into TR).
fn tss_desc(base: u64, limit: u32) -> [u64; 2] {
    let lo = u64::from(limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x8b << 40)
        | (u64::from((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    [lo, base >> 32]
}

/// Size of one TSS including its I/O bitmap and the terminating 0xff byte.
pub const TSS_SIZE: u32 = 104 + IOPB_PORTS / 8 + 1;

/// The GDT for `vcpus` vCPUs: null, kernel code/data, user data/code, then a TSS
/// descriptor per vCPU.
pub fn gdt(vcpus: u32) -> Vec<u8> {
    let mut e = vec![
        0,
        seg(0x9b, 0xa), // kernel code: P, DPL0, S, code RX accessed; G, L
        seg(0x93, 0xc), // kernel data: P, DPL0, S, data RW accessed; G, DB
        seg(0xf3, 0xc), // user data: DPL3
        seg(0xfb, 0xa), // user code: DPL3, L
    ];
    for i in 0..vcpus {
        e.extend(tss_desc(tss_addr(i), TSS_SIZE - 1));
    }
    e.iter().flat_map(|d| d.to_le_bytes()).collect()
}

/// vCPU `i`'s TSS: RSP0 at its CPL0 stack, and an I/O bitmap that opens exactly
/// [`OPEN_PORTS`].
pub fn tss(i: u32) -> Vec<u8> {
    let mut t = vec![0u8; TSS_SIZE as usize];
    t[4..12].copy_from_slice(&kstack_top(i).to_le_bytes());
    t[102..104].copy_from_slice(&104u16.to_le_bytes());
    let bitmap = &mut t[104..];
    bitmap.fill(0xff);
    for &(lo, hi) in OPEN_PORTS {
        for port in lo..=hi {
            bitmap[usize::from(port / 8)] &= !(1 << (port % 8));
        }
    }
    t
}

/// The exception stubs: for each vector 0-31, push a zero error code where the CPU
/// pushes none, push the vector, `out` to [`EXCEPTION_PORT`], then `hlt` forever.
pub fn stubs() -> Vec<u8> {
    let mut code = vec![0xccu8; (32 * STUB_SIZE) as usize];
    for v in 0u8..32 {
        let mut s = Vec::new();
        if !ERROR_CODE_VECTORS.contains(&v) {
            s.extend([0x6a, 0x00]); // push 0
        }
        s.extend([0x6a, v]); // push vector
        let [lo, hi] = EXCEPTION_PORT.to_le_bytes();
        s.extend([0x66, 0xba, lo, hi]); // mov dx, EXCEPTION_PORT
        s.extend([0xee, 0xf4, 0xeb, 0xfd]); // out dx, al; hlt; jmp hlt
        let at = usize::from(v) * STUB_SIZE as usize;
        code[at..at + s.len()].copy_from_slice(&s);
    }
    code
}

/// The IDT: vectors 0-31 go to their stubs through 64-bit interrupt gates at CPL0;
/// the rest are not present.
pub fn idt() -> Vec<u8> {
    let mut t = vec![0u8; 256 * 16];
    for v in 0..32u64 {
        let off = STUBS + v * STUB_SIZE;
        let g = &mut t[(v * 16) as usize..(v * 16 + 16) as usize];
        g[0..2].copy_from_slice(&(off as u16).to_le_bytes());
        g[2..4].copy_from_slice(&SEL_KCODE.to_le_bytes());
        g[5] = 0x8e; // present, DPL0, 64-bit interrupt gate
        g[6..8].copy_from_slice(&((off >> 16) as u16).to_le_bytes());
        g[8..12].copy_from_slice(&((off >> 32) as u32).to_le_bytes());
    }
    t
}

/// Name of an exception vector.
pub fn vector_name(v: u64) -> &'static str {
    const NAMES: [&str; 32] = [
        "#DE",
        "#DB",
        "NMI",
        "#BP",
        "#OF",
        "#BR",
        "#UD",
        "#NM",
        "#DF",
        "coprocessor overrun",
        "#TS",
        "#NP",
        "#SS",
        "#GP",
        "#PF",
        "reserved",
        "#MF",
        "#AC",
        "#MC",
        "#XM",
        "#VE",
        "#CP",
        "reserved",
        "reserved",
        "reserved",
        "reserved",
        "reserved",
        "reserved",
        "#HV",
        "#VC",
        "#SX",
        "reserved",
    ];
    usize::try_from(v).ok().and_then(|i| NAMES.get(i)).copied().unwrap_or("unknown")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_bitmap_opens_only_the_abi_ports() {
        let t = tss(3);
        let allowed = |p: u16| t[104 + usize::from(p / 8)] & (1 << (p % 8)) == 0;
        assert!(
            allowed(0x3f8) && allowed(0x3ff) && allowed(0x500) && allowed(0x502) && allowed(0x520) && allowed(0x53f)
        );
        assert!(
            !allowed(0x3f7)
                && !allowed(0x508)
                && !allowed(0x510)
                && !allowed(0x51f)
                && !allowed(0x540)
                && !allowed(0x60)
                && !allowed(0x5ff)
        );
        assert_eq!(*t.last().unwrap(), 0xff);
        assert_eq!(u64::from_le_bytes(t[4..12].try_into().unwrap()), kstack_top(3));
    }

    #[test]
    fn gdt_has_a_tss_per_vcpu() {
        let g = gdt(2);
        assert_eq!(g.len() as u64, gdt_size(2));
        let user_code = u64::from_le_bytes(g[32..40].try_into().unwrap());
        assert_eq!((user_code >> 45) & 3, 3, "user code is DPL3");
        assert_eq!((user_code >> 53) & 1, 1, "user code is 64-bit");
        let tss1 = u64::from_le_bytes(g[56..64].try_into().unwrap());
        assert_eq!(((tss1 >> 16) & 0xff_ffff) | (((tss1 >> 56) & 0xff) << 24), tss_addr(1));
    }

    #[test]
    fn stubs_push_vector_and_report() {
        let s = stubs();
        // #PF (14) has a CPU error code: push 14 comes first.
        assert_eq!(&s[14 * 16..14 * 16 + 2], &[0x6a, 14]);
        // #UD (6) gets a zero error code first.
        assert_eq!(&s[6 * 16..6 * 16 + 4], &[0x6a, 0, 0x6a, 6]);
        let i = idt();
        assert_eq!(i[14 * 16 + 5], 0x8e);
        assert_eq!(u16::from_le_bytes([i[14 * 16], i[14 * 16 + 1]]) as u64, STUBS + 14 * STUB_SIZE);
        assert_eq!(vector_name(14), "#PF");
        assert_eq!(vector_name(99), "unknown");
    }
}
