//! KVM binary statistics (`KVM_GET_STATS_FD`, Linux 5.14+), for VMs and vCPUs.
//!
//! The stats fd holds a header (`struct kvm_stats_header`), an id string, an array of
//! descriptors (`struct kvm_stats_desc`, each followed by a `name_size`-byte name) and a
//! data block of `u64` values; everything is read with `pread`. Descriptors are parsed
//! once in [`StatsFd::open`]; [`StatsFd::read`] re-reads the data block.
//!
//! Every offset and size from the fd is bounds-checked: malformed data gives
//! [`StatsError::Malformed`], never a panic.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

/// `KVM_GET_STATS_FD` (kvm-ioctls has no wrapper).
#[allow(missing_docs)]
mod ioctls {
    use vmm_sys_util::ioctl_io_nr;
    ioctl_io_nr!(KVM_GET_STATS_FD, kvm_bindings::KVMIO, 0xce);
}

/// Size of `struct kvm_stats_header`.
const HEADER_SIZE: usize = 24;
/// Size of `struct kvm_stats_desc` without its name.
const DESC_SIZE: usize = 16;
/// Largest descriptor name accepted (KVM uses 48).
const MAX_NAME_SIZE: usize = 4096;
/// Largest number of descriptors accepted.
const MAX_DESCS: usize = 1 << 16;
/// Largest descriptor or data block accepted.
const MAX_BLOCK: usize = 16 << 20;

/// `KVM_STATS_TYPE_*` mask in [`StatDesc::flags`].
pub const STATS_TYPE_MASK: u32 = 0xf;
/// `KVM_STATS_UNIT_*` mask in [`StatDesc::flags`].
pub const STATS_UNIT_MASK: u32 = 0xf0;
/// `KVM_STATS_BASE_*` mask in [`StatDesc::flags`].
pub const STATS_BASE_MASK: u32 = 0xf00;

/// Errors opening or reading a KVM stats fd.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// `KVM_GET_STATS_FD` failed (e.g. a kernel without `KVM_CAP_BINARY_STATS_FD`).
    #[error("KVM_GET_STATS_FD: {0}")]
    Ioctl(#[source] io::Error),
    /// Reading the stats fd failed (including short reads).
    #[error("reading KVM stats: {0}")]
    Io(#[source] io::Error),
    /// The header, descriptors or data are inconsistent.
    #[error("malformed KVM stats: {0}")]
    Malformed(String),
}

/// One statistic's descriptor (`struct kvm_stats_desc`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatDesc {
    /// Name, e.g. `pages_4k`, `exits`.
    pub name: String,
    /// Type, unit and base (see [`STATS_TYPE_MASK`] and friends).
    pub flags: u32,
    /// Unit exponent (value * base^exponent).
    pub exponent: i16,
    /// Number of `u64` values (1, or the bucket count of a histogram).
    pub size: u16,
    /// Byte offset of the values in the data block.
    pub offset: u32,
    /// Bucket width of a linear histogram.
    pub bucket_size: u32,
}

impl StatDesc {
    /// `KVM_STATS_TYPE_*`: 0 cumulative, 1 instant, 2 peak, 3 linear hist, 4 log hist.
    pub fn kind(&self) -> u32 {
        self.flags & STATS_TYPE_MASK
    }

    /// Whether this statistic is a histogram (more than one value).
    pub fn is_histogram(&self) -> bool {
        self.size > 1
    }
}

/// The parsed `struct kvm_stats_header`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    name_size: u32,
    num_desc: u32,
    id_offset: u32,
    desc_offset: u32,
    data_offset: u32,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_ne_bytes(s.try_into().ok()?))
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_ne_bytes(s.try_into().ok()?))
}

fn malformed(what: impl Into<String>) -> StatsError {
    StatsError::Malformed(what.into())
}

fn parse_header(b: &[u8]) -> Result<Header, StatsError> {
    let f = |at| u32_at(b, at).ok_or_else(|| malformed("short header"));
    let h = Header { name_size: f(4)?, num_desc: f(8)?, id_offset: f(12)?, desc_offset: f(16)?, data_offset: f(20)? };
    if h.name_size as usize > MAX_NAME_SIZE {
        return Err(malformed(format!("name_size {} too large", h.name_size)));
    }
    if h.num_desc as usize > MAX_DESCS {
        return Err(malformed(format!("num_desc {} too large", h.num_desc)));
    }
    Ok(h)
}

/// A NUL-terminated (or full-length) name from a fixed-size field.
fn c_name(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Parses `num_desc` descriptors of stride `DESC_SIZE + name_size` from `block`.
fn parse_descs(block: &[u8], name_size: usize, num_desc: usize) -> Result<Vec<StatDesc>, StatsError> {
    let stride = DESC_SIZE + name_size;
    let mut out = Vec::with_capacity(num_desc.min(MAX_DESCS));
    for i in 0..num_desc {
        let base = i.checked_mul(stride).ok_or_else(|| malformed("descriptor offset overflow"))?;
        let d = base
            .checked_add(stride)
            .and_then(|end| block.get(base..end))
            .ok_or_else(|| malformed(format!("descriptor {i} out of range")))?;
        let short = || malformed(format!("descriptor {i} short"));
        out.push(StatDesc {
            flags: u32_at(d, 0).ok_or_else(short)?,
            exponent: u16_at(d, 4).ok_or_else(short)? as i16,
            size: u16_at(d, 6).ok_or_else(short)?,
            offset: u32_at(d, 8).ok_or_else(short)?,
            bucket_size: u32_at(d, 12).ok_or_else(short)?,
            name: c_name(&d[DESC_SIZE..]),
        });
    }
    Ok(out)
}

/// Bytes of the data block the descriptors need (bounds-checked).
fn data_len(descs: &[StatDesc]) -> Result<usize, StatsError> {
    let mut len = 0usize;
    for d in descs {
        let end = (d.offset as usize)
            .checked_add(usize::from(d.size) * 8)
            .filter(|&e| e <= MAX_BLOCK)
            .ok_or_else(|| malformed(format!("stat {} data out of range", d.name)))?;
        len = len.max(end);
    }
    Ok(len)
}

/// Values of one descriptor from the data block.
fn values<'a>(data: &'a [u8], d: &StatDesc) -> impl Iterator<Item = u64> + 'a {
    let start = d.offset as usize;
    let end = start + usize::from(d.size) * 8;
    data.get(start..end).unwrap_or(&[]).chunks_exact(8).map(|c| u64::from_ne_bytes(c.try_into().unwrap_or([0; 8])))
}

/// An open KVM binary stats fd with its parsed descriptors.
#[derive(Debug)]
pub struct StatsFd {
    file: File,
    id: String,
    descs: Vec<StatDesc>,
    data_offset: u64,
    data_len: usize,
}

impl StatsFd {
    /// Issues `KVM_GET_STATS_FD` on a VM fd (`VmFd`) or vCPU fd (`VcpuFd`) and parses
    /// the header and descriptors.
    pub fn open(fd: &impl AsRawFd) -> Result<StatsFd, StatsError> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and only returns a new fd; `fd` is
        // a valid open descriptor borrowed for the call. A non-KVM fd just fails.
        let ret = unsafe { vmm_sys_util::ioctl::ioctl(fd, ioctls::KVM_GET_STATS_FD()) };
        if ret < 0 {
            return Err(StatsError::Ioctl(io::Error::last_os_error()));
        }
        // SAFETY: the ioctl succeeded, so `ret` is a new fd that nothing else owns.
        let file = unsafe { File::from_raw_fd(ret) };
        StatsFd::from_file(file)
    }

    /// Parses an already open stats file (any file with the stats layout; used by tests).
    pub fn from_file(file: File) -> Result<StatsFd, StatsError> {
        let mut hb = [0u8; HEADER_SIZE];
        file.read_exact_at(&mut hb, 0).map_err(StatsError::Io)?;
        let h = parse_header(&hb)?;
        let name_size = h.name_size as usize;
        let num_desc = h.num_desc as usize;
        let block_len = (DESC_SIZE + name_size)
            .checked_mul(num_desc)
            .filter(|&l| l <= MAX_BLOCK)
            .ok_or_else(|| malformed("descriptor block too large"))?;
        let mut block = vec![0u8; block_len];
        file.read_exact_at(&mut block, u64::from(h.desc_offset)).map_err(StatsError::Io)?;
        let descs = parse_descs(&block, name_size, num_desc)?;
        let mut idb = vec![0u8; name_size];
        file.read_exact_at(&mut idb, u64::from(h.id_offset)).map_err(StatsError::Io)?;
        let data_len = data_len(&descs)?;
        Ok(StatsFd { file, id: c_name(&idb), descs, data_offset: u64::from(h.data_offset), data_len })
    }

    /// The stats id string (e.g. `kvm-1234` for a VM, `kvm-1234/vcpu_0` for a vCPU).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The statistic descriptors, in the kernel's order.
    pub fn descriptors(&self) -> &[StatDesc] {
        &self.descs
    }

    fn read_data(&self) -> Result<Vec<u8>, StatsError> {
        let mut data = vec![0u8; self.data_len];
        self.file.read_exact_at(&mut data, self.data_offset).map_err(StatsError::Io)?;
        Ok(data)
    }

    /// Current values by name. A histogram (size > 1) is reported as the **sum of its
    /// buckets**, i.e. its total sample count; use [`StatsFd::read_all`] for buckets.
    pub fn read(&self) -> Result<BTreeMap<String, u64>, StatsError> {
        let data = self.read_data()?;
        Ok(self
            .descs
            .iter()
            .map(|d| {
                let sum = values(&data, d).fold(0u64, u64::wrapping_add);
                (d.name.clone(), sum)
            })
            .collect())
    }

    /// Current values by name, every value of each statistic (histogram buckets).
    pub fn read_all(&self) -> Result<BTreeMap<String, Vec<u64>>, StatsError> {
        let data = self.read_data()?;
        Ok(self.descs.iter().map(|d| (d.name.clone(), values(&data, d).collect())).collect())
    }

    /// The current value of one statistic (histograms summed), `None` if absent.
    pub fn get(&self, name: &str) -> Result<Option<u64>, StatsError> {
        Ok(self.read()?.get(name).copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Builds a stats image: header, id, descriptors, data.
    fn image(name_size: u32, stats: &[(&str, u32, &[u64])]) -> Vec<u8> {
        let ns = name_size as usize;
        let id_offset = HEADER_SIZE;
        let desc_offset = id_offset + ns;
        let data_offset = desc_offset + stats.len() * (DESC_SIZE + ns);
        let mut out = Vec::new();
        for v in [0, name_size, stats.len() as u32, id_offset as u32, desc_offset as u32, data_offset as u32] {
            out.extend_from_slice(&v.to_ne_bytes());
        }
        let mut id = b"kvm-test".to_vec();
        id.resize(ns, 0);
        out.extend_from_slice(&id);
        let mut off = 0u32;
        for (name, flags, vals) in stats {
            out.extend_from_slice(&flags.to_ne_bytes());
            out.extend_from_slice(&0i16.to_ne_bytes());
            out.extend_from_slice(&(vals.len() as u16).to_ne_bytes());
            out.extend_from_slice(&off.to_ne_bytes());
            out.extend_from_slice(&0u32.to_ne_bytes());
            let mut n = name.as_bytes().to_vec();
            n.resize(ns, 0);
            out.extend_from_slice(&n);
            off += vals.len() as u32 * 8;
        }
        for (_, _, vals) in stats {
            for v in *vals {
                out.extend_from_slice(&v.to_ne_bytes());
            }
        }
        out
    }

    fn temp_file(bytes: &[u8]) -> File {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("mosaic-stats-{}-{n}", std::process::id()));
        let mut f = File::create(&p).unwrap();
        f.write_all(bytes).unwrap();
        let f = File::open(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        f
    }

    #[test]
    fn parses_synthetic_image() {
        let img = image(48, &[("pages_4k", 1, &[7]), ("halt_hist", 4, &[1, 2, 3]), ("exits", 0, &[42])]);
        let s = StatsFd::from_file(temp_file(&img)).unwrap();
        assert_eq!(s.id(), "kvm-test");
        assert_eq!(s.descriptors().len(), 3);
        assert!(s.descriptors()[1].is_histogram());
        assert_eq!(s.descriptors()[1].kind(), 4);
        let m = s.read().unwrap();
        assert_eq!(m["pages_4k"], 7);
        assert_eq!(m["halt_hist"], 6);
        assert_eq!(m["exits"], 42);
        assert_eq!(s.read_all().unwrap()["halt_hist"], vec![1, 2, 3]);
        assert_eq!(s.get("exits").unwrap(), Some(42));
        assert_eq!(s.get("nope").unwrap(), None);
    }

    #[test]
    fn malformed_images_do_not_panic() {
        let good = image(16, &[("a", 0, &[1]), ("b", 0, &[2])]);
        // Truncations at every length.
        for len in 0..good.len() {
            let r = StatsFd::from_file(temp_file(&good[..len])).and_then(|s| s.read());
            assert!(r.is_err(), "len {len}");
        }
        // Huge name_size / num_desc.
        let mut bad = good.clone();
        bad[4..8].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(matches!(StatsFd::from_file(temp_file(&bad)), Err(StatsError::Malformed(_))));
        let mut bad = good.clone();
        bad[8..12].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(matches!(StatsFd::from_file(temp_file(&bad)), Err(StatsError::Malformed(_))));
        // Descriptor offset far past the data.
        let mut bad = good.clone();
        let d0 = HEADER_SIZE + 16;
        bad[d0 + 8..d0 + 12].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(StatsFd::from_file(temp_file(&bad)).is_err());
        // Offsets pointing outside the file.
        let mut bad = good.clone();
        bad[20..24].copy_from_slice(&(1u32 << 30).to_ne_bytes());
        let r = StatsFd::from_file(temp_file(&bad)).and_then(|s| s.read());
        assert!(matches!(r, Err(StatsError::Io(_))));
        // A name filling the whole field (no NUL) is fine.
        let img = image(4, &[("abcd", 0, &[5])]);
        let s = StatsFd::from_file(temp_file(&img)).unwrap();
        assert_eq!(s.read().unwrap()["abcd"], 5);
        // Zero descriptors.
        let s = StatsFd::from_file(temp_file(&image(8, &[]))).unwrap();
        assert!(s.read().unwrap().is_empty());
    }

    #[test]
    fn non_kvm_fd_is_ioctl_error() {
        let f = temp_file(b"x");
        assert!(matches!(StatsFd::open(&f), Err(StatsError::Ioctl(_))));
    }

    #[test]
    fn real_vm_and_vcpu_stats() {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        let vm = kvm.create_vm().unwrap();
        let vs = StatsFd::open(&vm).unwrap();
        let m = vs.read().unwrap();
        assert!(m.contains_key("pages_4k"), "{m:?}");
        assert!(vs.id().starts_with("kvm-"), "{}", vs.id());
        let vcpu = vm.create_vcpu(0).unwrap();
        let cs = StatsFd::open(&vcpu).unwrap();
        let m = cs.read().unwrap();
        assert!(m.contains_key("exits"), "{m:?}");
        assert!(cs.read_all().unwrap().values().any(|v| v.len() > 1) || !m.is_empty());
    }
}
