//! An Intel MultiProcessor Specification 1.4 table: how a firmware-less Linux guest
//! learns its processors, its IOAPIC and how ISA interrupts reach it.
//!
//! ```text
//! addr       MP floating pointer (16 bytes, "_MP_") ── points to ──┐
//! addr+16    MP configuration table header (44 bytes, "PCMP")  ◄───┘
//!            processor entries   (20 bytes each; LAPIC id = vCPU index, vCPU 0 the BSP)
//!            bus entry           ISA, bus id 0
//!            IOAPIC entry        id = vcpus, version 0x11, at 0xfec00000
//!            I/O interrupt entries  ISA IRQ n -> IOAPIC pin n, n = 0..24 (KVM's default
//!                                   GSI routing; pins 16..23 serve MMIO devices)
//!            local interrupt entries  LINT0 = ExtINT (the 8259), LINT1 = NMI
//! ```
//! Linux finds the floating pointer by scanning 0x9fc00..0xa0000 among others, so the
//! table lives at the start of the EBDA, which the e820 map reserves. Entries are
//! serialized field by field in little-endian order; both checksums make the byte sums
//! of their structures zero.

use guest_mem::GuestMemory;

use super::LinuxError;

/// Signature of the floating pointer structure.
pub(crate) const MPF_SIGNATURE: &[u8; 4] = b"_MP_";
/// Signature of the configuration table.
pub(crate) const MPC_SIGNATURE: &[u8; 4] = b"PCMP";
/// Size of the floating pointer structure.
pub(crate) const MPF_LEN: usize = 16;
/// Size of the configuration table header.
pub(crate) const MPC_HEADER_LEN: usize = 44;
/// MP specification revision 1.4.
const SPEC_REV: u8 = 4;
/// Local APIC base address.
pub(crate) const APIC_ADDR: u32 = 0xfee0_0000;
/// IOAPIC base address.
pub(crate) const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Pins of KVM's in-kernel IOAPIC.
pub(crate) const IOAPIC_PINS: u8 = 24;
/// Local APIC version: an integrated xAPIC.
const APIC_VERSION: u8 = 0x14;
/// IOAPIC version of KVM's in-kernel IOAPIC.
const IOAPIC_VERSION: u8 = 0x11;
/// CPU signature in processor entries: family 6.
const CPU_SIGNATURE: u32 = 6 << 8;
/// CPUID.1:EDX features in processor entries: FPU and APIC.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
/// The ISA bus id.
const ISA_BUS: u8 = 0;

/// Entry types.
pub(crate) const ENTRY_PROCESSOR: u8 = 0;
pub(crate) const ENTRY_BUS: u8 = 1;
pub(crate) const ENTRY_IOAPIC: u8 = 2;
pub(crate) const ENTRY_IO_INTERRUPT: u8 = 3;
pub(crate) const ENTRY_LOCAL_INTERRUPT: u8 = 4;
/// Interrupt types.
pub(crate) const INT_TYPE_INT: u8 = 0;
pub(crate) const INT_TYPE_NMI: u8 = 1;
pub(crate) const INT_TYPE_EXTINT: u8 = 3;
/// Processor flags.
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
/// Destination LAPIC id meaning "all".
const ALL_LAPICS: u8 = 0xff;

/// Little-endian byte writer.
struct Out(Vec<u8>);

impl Out {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
}

/// The byte that makes `bytes` sum to zero (mod 256) when added.
fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b)).wrapping_neg()
}

/// Interrupt entry (I/O or local): 8 bytes.
fn interrupt(out: &mut Out, entry: u8, kind: u8, src_irq: u8, dst_id: u8, dst_pin: u8) {
    // Flags 0: polarity and trigger mode conform to the bus (ISA: edge, active high).
    out.u8(entry).u8(kind).u16(0).u8(ISA_BUS).u8(src_irq).u8(dst_id).u8(dst_pin);
}

/// The floating pointer followed by the configuration table, for a table placed at
/// guest-physical `addr`. `vcpus` must be 1..=MAX_VCPUS (checked by the caller).
pub(crate) fn build(addr: u64, vcpus: u32) -> Vec<u8> {
    let ioapic_id = vcpus as u8;
    let mut body = Out(Vec::new());
    let mut entries = 0u16;
    for id in 0..vcpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 };
        body.u8(ENTRY_PROCESSOR)
            .u8(id as u8)
            .u8(APIC_VERSION)
            .u8(flags)
            .u32(CPU_SIGNATURE)
            .u32(CPU_FEATURES)
            .bytes(&[0; 8]);
        entries += 1;
    }
    body.u8(ENTRY_BUS).u8(ISA_BUS).bytes(b"ISA   ");
    body.u8(ENTRY_IOAPIC).u8(ioapic_id).u8(IOAPIC_VERSION).u8(1).u32(IOAPIC_ADDR);
    entries += 2;
    for pin in 0..IOAPIC_PINS {
        interrupt(&mut body, ENTRY_IO_INTERRUPT, INT_TYPE_INT, pin, ioapic_id, pin);
        entries += 1;
    }
    interrupt(&mut body, ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, ALL_LAPICS, 0);
    interrupt(&mut body, ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, ALL_LAPICS, 1);
    entries += 2;

    let table_len = (MPC_HEADER_LEN + body.0.len()) as u16;
    let mut table = Out(Vec::with_capacity(table_len as usize));
    table
        .bytes(MPC_SIGNATURE)
        .u16(table_len)
        .u8(SPEC_REV)
        .u8(0) // checksum, below
        .bytes(b"MOSAIC  ")
        .bytes(b"MOSAIC-VM   ")
        .u32(0) // OEM table
        .u16(0)
        .u16(entries)
        .u32(APIC_ADDR)
        .u16(0) // extended table
        .u8(0)
        .u8(0);
    table.bytes(&body.0);
    table.0[7] = checksum(&table.0);

    let mut mpf = Out(Vec::with_capacity(MPF_LEN + table.0.len()));
    mpf.bytes(MPF_SIGNATURE)
        .u32((addr + MPF_LEN as u64) as u32)
        .u8(1) // length in 16-byte units
        .u8(SPEC_REV)
        .u8(0) // checksum, below
        .u8(0) // feature 1: a configuration table is present
        .u8(0) // feature 2: no IMCR, virtual wire mode
        .bytes(&[0; 3]);
    mpf.0[10] = checksum(&mpf.0);
    mpf.bytes(&table.0);
    mpf.0
}

/// Writes the MP table for `vcpus` vCPUs at `addr`; returns its size.
pub(crate) fn write(mem: &GuestMemory, addr: u64, vcpus: u32) -> Result<u64, LinuxError> {
    let bytes = build(addr, vcpus);
    mem.write(addr, &bytes).map_err(|source| LinuxError::Memory { what: "the MP table", source })?;
    Ok(bytes.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::linux::{MAX_VCPUS, MPTABLE_ADDR};

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    #[test]
    fn checksums_and_counts_hold_for_any_vcpu_count() {
        for vcpus in [1, 2, 7, 64, MAX_VCPUS] {
            let t = build(MPTABLE_ADDR, vcpus);
            assert_eq!(&t[..4], MPF_SIGNATURE);
            assert_eq!(sum(&t[..MPF_LEN]), 0);
            let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
            assert_eq!(ptr, MPTABLE_ADDR + MPF_LEN as u64);
            let c = &t[MPF_LEN..];
            assert_eq!(&c[..4], MPC_SIGNATURE);
            let len = u16::from_le_bytes([c[4], c[5]]) as usize;
            assert_eq!(len, c.len());
            assert_eq!(sum(c), 0);
            let count = u16::from_le_bytes([c[34], c[35]]) as u32;
            assert_eq!(count, vcpus + 2 + u32::from(IOAPIC_PINS) + 2);
            // Whole table stays inside the e820-reserved legacy area.
            assert!(MPTABLE_ADDR + t.len() as u64 <= guest_mem::layout::HIGH_MEMORY_START);
        }
    }

    #[test]
    fn only_vcpu_zero_is_the_bsp() {
        let t = build(MPTABLE_ADDR, 3);
        let c = &t[MPF_LEN + MPC_HEADER_LEN..];
        for id in 0..3usize {
            let e = &c[id * 20..id * 20 + 20];
            assert_eq!((e[0], e[1]), (ENTRY_PROCESSOR, id as u8));
            assert_eq!(e[3], if id == 0 { 3 } else { 1 });
        }
        // IOAPIC id follows the LAPIC ids.
        let io = &c[60 + 8..60 + 16];
        assert_eq!((io[0], io[1]), (ENTRY_IOAPIC, 3));
    }
}
