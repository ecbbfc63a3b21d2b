//! Per-vCPU paravirtual ports (docs/PRIVATE-MEMORY.md): the conversion port, through
//! which guests that cannot make hypercalls convert pages between shared and private,
//! and the test DMA device, which reads and writes guest memory through the accessor as
//! a virtio device would. Their registers belong to each vCPU, so two vCPUs can use
//! them at once; the vCPU thread owns a [`VcpuPorts`].

use guest_mem::convert::{decode_map_gpa_range, decode_port, ConvError, ConvRequest, FLAG_PRIVATE, STATUS_OK};
use guest_mem::{AccessError, GuestMemory};

/// Conversion port: GPA bits 31:0.
pub const CONV_GPA_LO: u16 = 0x520;
/// Conversion port: GPA bits 63:32.
pub const CONV_GPA_HI: u16 = 0x524;
/// Conversion port: number of pages.
pub const CONV_PAGES: u16 = 0x528;
/// Conversion port: doorbell (out: flags) and status (in).
pub const CONV_DOORBELL: u16 = 0x52c;
/// DMA device: GPA bits 31:0.
pub const DMA_GPA_LO: u16 = 0x530;
/// DMA device: GPA bits 63:32.
pub const DMA_GPA_HI: u16 = 0x534;
/// DMA device: length (out) and last READ's sum (in).
pub const DMA_LEN: u16 = 0x538;
/// DMA device: doorbell (out: op) and status (in).
pub const DMA_DOORBELL: u16 = 0x53c;
/// First port.
pub const FIRST: u16 = CONV_GPA_LO;
/// Last port (the last byte of the DMA doorbell).
pub const LAST: u16 = DMA_DOORBELL + 3;

/// Largest DMA transfer.
pub const DMA_MAX: u32 = 1 << 20;
/// DMA op: checksum the range.
pub const DMA_OP_READ: u32 = 1;
/// DMA op: fill the range with bits 15:8 of the doorbell value.
pub const DMA_OP_FILL: u32 = 2;
/// DMA status: bad op or length.
pub const DMA_STATUS_INVALID: u32 = 1;
/// DMA status: not guest RAM.
pub const DMA_STATUS_RANGE: u32 = 2;
/// DMA status: the range touches a private page.
pub const DMA_STATUS_PRIVATE: u32 = 4;

/// Handles a KVM_HC_MAP_GPA_RANGE hypercall exit (`args`: GPA, pages, attributes):
/// the same conversion as the port, and the same status codes, returned in RAX.
pub fn map_gpa_range(args: &[u64; 6], mem: &GuestMemory) -> u64 {
    u64::from(status(run(decode_map_gpa_range(args[0], args[1], args[2]), mem)))
}

/// Runs a decoded request (a refused decode is counted like a refused conversion).
fn run(decoded: Result<ConvRequest, ConvError>, mem: &GuestMemory) -> Result<u64, ConvError> {
    decoded.inspect_err(|_| mem.note_refused_conversion()).and_then(|req| mem.convert(&req))
}

/// The status code a guest reads for a result.
fn status(r: Result<u64, ConvError>) -> u32 {
    r.map_or_else(ConvError::status, |_| STATUS_OK)
}

/// Handles a KVM_EXIT_MEMORY_FAULT (kernel engine): the guest touched `[gpa,
/// gpa+size)` with the other attribute, so the range is converted as the fault asks
/// (private when `flags` has KVM_MEMORY_EXIT_FLAG_PRIVATE), ZERO as on confidential
/// hosts, and the vCPU re-enters. `Err` when the request cannot be honoured; the run
/// then stops (re-entering would fault forever).
pub fn memory_fault(flags: u64, gpa: u64, size: u64, mem: &GuestMemory) -> Result<(), ConvError> {
    let private_flag = u64::from(kvm_bindings::KVM_MEMORY_EXIT_FLAG_PRIVATE);
    let decoded = if flags & !private_flag != 0 || !size.is_multiple_of(4096) {
        Err(ConvError::Invalid)
    } else {
        decode_port(gpa, size / 4096, if flags & private_flag != 0 { FLAG_PRIVATE } else { 0 })
    };
    match run(decoded, mem)? {
        // Nothing changed: the userspace engine cannot clear KVM's fault (that needs
        // KVM_SET_MEMORY_ATTRIBUTES), so re-entering would fault forever.
        0 => Err(ConvError::Unsupported),
        _ => Ok(()),
    }
}

/// One vCPU's registers of both devices (handed over by a live update).
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VcpuPorts {
    conv_gpa: u64,
    conv_pages: u64,
    conv_status: u32,
    dma_gpa: u64,
    dma_len: u32,
    dma_status: u32,
    dma_sum: u32,
}

fn value(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

fn set_lo(r: &mut u64, v: u32) {
    *r = (*r & !0xffff_ffff) | u64::from(v);
}

fn set_hi(r: &mut u64, v: u32) {
    *r = (*r & 0xffff_ffff) | (u64::from(v) << 32);
}

impl VcpuPorts {
    /// Whether `port` belongs to these devices.
    pub fn claims(port: u16) -> bool {
        (FIRST..=LAST).contains(&port)
    }

    /// An `out`.
    pub fn write(&mut self, port: u16, data: &[u8], mem: &GuestMemory) {
        let v = value(data);
        match port {
            CONV_GPA_LO => set_lo(&mut self.conv_gpa, v),
            CONV_GPA_HI => set_hi(&mut self.conv_gpa, v),
            CONV_PAGES => self.conv_pages = u64::from(v),
            CONV_DOORBELL => self.conv_status = self.convert(v, mem),
            DMA_GPA_LO => set_lo(&mut self.dma_gpa, v),
            DMA_GPA_HI => set_hi(&mut self.dma_gpa, v),
            DMA_LEN => self.dma_len = v,
            DMA_DOORBELL => self.dma_status = self.dma(v, mem),
            _ => {}
        }
    }

    /// An `in`.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        let v = match port {
            CONV_DOORBELL => self.conv_status,
            DMA_LEN => self.dma_sum,
            DMA_DOORBELL => self.dma_status,
            _ => 0,
        };
        super::put_u32(data, v);
    }

    fn convert(&self, flags: u32, mem: &GuestMemory) -> u32 {
        status(run(decode_port(self.conv_gpa, self.conv_pages, flags), mem))
    }

    fn dma(&mut self, doorbell: u32, mem: &GuestMemory) -> u32 {
        let (op, byte) = (doorbell & 0xff, (doorbell >> 8) as u8);
        if !(op == DMA_OP_READ || op == DMA_OP_FILL)
            || doorbell >> 16 != 0
            || self.dma_len == 0
            || self.dma_len > DMA_MAX
        {
            return DMA_STATUS_INVALID;
        }
        let mut buf = vec![0u8; self.dma_len as usize];
        let r = if op == DMA_OP_READ {
            mem.read(self.dma_gpa, &mut buf).map(|()| {
                self.dma_sum = buf.iter().fold(0u32, |s, &b| s.wrapping_add(u32::from(b)));
            })
        } else {
            buf.fill(byte);
            mem.write(self.dma_gpa, &buf)
        };
        match r {
            Ok(()) => STATUS_OK,
            Err(AccessError::Private { .. }) => DMA_STATUS_PRIVATE,
            Err(_) => DMA_STATUS_RANGE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_mem::{BackendKind, BackendSpec, MemoryLayout, ZoneSpec};

    fn mem() -> GuestMemory {
        let z = ZoneSpec { size: 4 << 20, backend: BackendSpec::new(BackendKind::Memfd) };
        GuestMemory::new(MemoryLayout::place(vec![z]).unwrap(), None, None).unwrap()
    }

    fn out(p: &mut VcpuPorts, port: u16, v: u32, m: &GuestMemory) {
        p.write(port, &v.to_le_bytes(), m);
    }

    fn inp(p: &VcpuPorts, port: u16) -> u32 {
        let mut b = [0u8; 4];
        p.read(port, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn convert_and_dma_through_the_ports() {
        let m = mem();
        let mut p = VcpuPorts::default();
        out(&mut p, DMA_GPA_LO, 0x10_0000, &m);
        out(&mut p, DMA_LEN, 4096, &m);
        out(&mut p, DMA_DOORBELL, DMA_OP_FILL | 0x11 << 8, &m);
        assert_eq!(inp(&p, DMA_DOORBELL), 0);
        out(&mut p, DMA_DOORBELL, DMA_OP_READ, &m);
        assert_eq!((inp(&p, DMA_DOORBELL), inp(&p, DMA_LEN)), (0, 0x11 * 4096));
        // Private, preserve: the DMA device is refused.
        out(&mut p, CONV_GPA_LO, 0x10_0000, &m);
        out(&mut p, CONV_PAGES, 1, &m);
        out(&mut p, CONV_DOORBELL, 3, &m);
        assert_eq!(inp(&p, CONV_DOORBELL), 0);
        out(&mut p, DMA_DOORBELL, DMA_OP_READ, &m);
        assert_eq!(inp(&p, DMA_DOORBELL), DMA_STATUS_PRIVATE);
        // Bad requests.
        out(&mut p, CONV_GPA_LO, 0x10_0008, &m);
        out(&mut p, CONV_DOORBELL, 0, &m);
        assert_eq!(inp(&p, CONV_DOORBELL), 1);
        out(&mut p, CONV_GPA_LO, 0, &m);
        out(&mut p, CONV_GPA_HI, 1, &m);
        out(&mut p, CONV_DOORBELL, 0, &m);
        assert_eq!(inp(&p, CONV_DOORBELL), 2, "4 GiB + 0 is beyond RAM");
        out(&mut p, DMA_DOORBELL, 9, &m);
        assert_eq!(inp(&p, DMA_DOORBELL), DMA_STATUS_INVALID);
        out(&mut p, DMA_GPA_LO, 0xC000_0000, &m);
        out(&mut p, DMA_DOORBELL, DMA_OP_READ, &m);
        assert_eq!(inp(&p, DMA_DOORBELL), DMA_STATUS_RANGE);
        assert_eq!(m.conversion_stats().failed, 2);
        assert_eq!(m.conversion_stats().pages_4k, 1);
    }

    #[test]
    fn memory_faults_convert_as_asked() {
        let m = mem();
        let private = u64::from(kvm_bindings::KVM_MEMORY_EXIT_FLAG_PRIVATE);
        memory_fault(private, 0x10_0000, 8192, &m).unwrap();
        assert!(m.read(0x10_1000, &mut [0u8; 8]).is_err());
        memory_fault(0, 0x10_0000, 4096, &m).unwrap();
        assert!(m.read(0x10_0000, &mut [0u8; 8]).is_ok());
        assert!(memory_fault(0, 0x10_0000, 4096, &m).is_err(), "a fault that changes nothing would loop");
        assert!(memory_fault(1 << 40, 0x10_0000, 4096, &m).is_err(), "unknown flag");
        assert!(memory_fault(private, 0x10_0000, 100, &m).is_err(), "partial page");
        assert!(memory_fault(private, 0xC000_0000, 4096, &m).is_err(), "MMIO hole");
    }

    #[test]
    fn map_gpa_range_hypercalls_use_the_same_engine_and_codes() {
        let m = mem();
        // Private (bit 4), 4K hint: the page becomes private; the DMA device is refused.
        assert_eq!(map_gpa_range(&[0x10_0000, 2, 1 << 4, 0, 0, 0], &m), 0);
        assert!(m.read(0x10_1000, &mut [0u8; 8]).is_err());
        assert_eq!(map_gpa_range(&[0x10_0000, 2, 0, 0, 0, 0], &m), 0);
        assert!(m.read(0x10_1000, &mut [0u8; 8]).is_ok());
        assert_eq!(map_gpa_range(&[0x10_0004, 1, 0, 0, 0, 0], &m), 1, "unaligned");
        assert_eq!(map_gpa_range(&[0x10_0000, 1, 1 << 7, 0, 0, 0], &m), 1, "unknown attribute bit");
        assert_eq!(map_gpa_range(&[0xC000_0000, 1, 0, 0, 0, 0], &m), 2, "MMIO hole");
    }
}
