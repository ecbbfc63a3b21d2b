//! A guest program image: a static ELF64 x86-64 executable, checked against the
//! guest ABI before a byte of it reaches guest memory.

use thiserror::Error;

/// Errors in a guest program image.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ElfError {
    /// Too short or not ELF.
    #[error("not an ELF file")]
    NotElf,
    /// Not 64-bit little-endian x86-64 EXEC.
    #[error("not a static 64-bit x86-64 executable")]
    WrongKind,
    /// Program headers outside the file or malformed.
    #[error("program headers are malformed")]
    BadHeaders,
    /// A segment's data lies outside the file.
    #[error("segment {0} reaches past the end of the file")]
    Truncated(usize),
    /// A segment below the image area.
    #[error("segment {index} at {paddr:#x} is below {min:#x}, which the VMM owns")]
    TooLow {
        /// Segment number.
        index: usize,
        /// Its physical address.
        paddr: u64,
        /// Lowest allowed.
        min: u64,
    },
    /// No loadable segment.
    #[error("no loadable segment")]
    Empty,
}

/// One loadable segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address.
    pub paddr: u64,
    /// Offset of its bytes in the file.
    pub offset: usize,
    /// Bytes taken from the file.
    pub filesz: usize,
    /// Bytes in memory (the rest is zeros).
    pub memsz: u64,
}

/// A parsed image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Entry point.
    pub entry: u64,
    /// Loadable segments.
    pub segments: Vec<Segment>,
}

impl Image {
    /// One past the highest byte any segment occupies.
    pub fn end(&self) -> u64 {
        self.segments.iter().map(|s| s.paddr + s.memsz).max().unwrap_or(0)
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Parses `bytes`, requiring every segment at or above `min_paddr`.
pub fn parse(bytes: &[u8], min_paddr: u64) -> Result<Image, ElfError> {
    if bytes.get(0..4) != Some(b"\x7fELF") {
        return Err(ElfError::NotElf);
    }
    let (class, data) = (bytes.get(4), bytes.get(5));
    let (e_type, machine) = (u16_at(bytes, 16), u16_at(bytes, 18));
    if class != Some(&2) || data != Some(&1) || e_type != Some(2) || machine != Some(62) {
        return Err(ElfError::WrongKind);
    }
    let entry = u64_at(bytes, 24).ok_or(ElfError::BadHeaders)?;
    let phoff = usize::try_from(u64_at(bytes, 32).ok_or(ElfError::BadHeaders)?).map_err(|_| ElfError::BadHeaders)?;
    let phentsize = usize::from(u16_at(bytes, 54).ok_or(ElfError::BadHeaders)?);
    let phnum = usize::from(u16_at(bytes, 56).ok_or(ElfError::BadHeaders)?);
    if phentsize < 56 {
        return Err(ElfError::BadHeaders);
    }
    let mut segments = Vec::new();
    for i in 0..phnum {
        let at = phentsize.checked_mul(i).and_then(|x| x.checked_add(phoff)).ok_or(ElfError::BadHeaders)?;
        let ph = bytes.get(at..at + 56).ok_or(ElfError::BadHeaders)?;
        if u32_at(ph, 0) != Some(1) {
            continue; // not PT_LOAD
        }
        let field = |o| u64_at(ph, o).ok_or(ElfError::BadHeaders);
        let (offset, paddr, filesz, memsz) = (field(8)?, field(24)?, field(32)?, field(40)?);
        if memsz == 0 {
            continue;
        }
        let offset = usize::try_from(offset).map_err(|_| ElfError::Truncated(i))?;
        let filesz = usize::try_from(filesz).map_err(|_| ElfError::Truncated(i))?;
        if offset.checked_add(filesz).is_none_or(|end| end > bytes.len()) || filesz as u64 > memsz {
            return Err(ElfError::Truncated(i));
        }
        if paddr < min_paddr {
            return Err(ElfError::TooLow { index: i, paddr, min: min_paddr });
        }
        paddr.checked_add(memsz).ok_or(ElfError::BadHeaders)?;
        segments.push(Segment { paddr, offset, filesz, memsz });
    }
    if segments.is_empty() {
        return Err(ElfError::Empty);
    }
    Ok(Image { entry, segments })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf(paddr: u64, filesz: u64, memsz: u64) -> Vec<u8> {
        let mut b = vec![0u8; 0x100];
        b[0..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[16..18].copy_from_slice(&2u16.to_le_bytes());
        b[18..20].copy_from_slice(&62u16.to_le_bytes());
        b[24..32].copy_from_slice(&paddr.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = &mut b[64..120];
        ph[0..4].copy_from_slice(&1u32.to_le_bytes());
        ph[8..16].copy_from_slice(&0xc0u64.to_le_bytes());
        ph[24..32].copy_from_slice(&paddr.to_le_bytes());
        ph[32..40].copy_from_slice(&filesz.to_le_bytes());
        ph[40..48].copy_from_slice(&memsz.to_le_bytes());
        b
    }

    #[test]
    fn parses_a_minimal_image() {
        let i = parse(&elf(0x20_0000, 0x40, 0x1000), 0x20_0000).unwrap();
        assert_eq!(i.entry, 0x20_0000);
        assert_eq!(i.end(), 0x20_1000);
    }

    #[test]
    fn refuses_bad_images() {
        assert_eq!(parse(b"hello", 0), Err(ElfError::NotElf));
        let mut e = elf(0x20_0000, 0x40, 0x1000);
        e[18] = 3;
        assert_eq!(parse(&e, 0), Err(ElfError::WrongKind));
        assert!(matches!(parse(&elf(0x1000, 0x40, 0x1000), 0x20_0000), Err(ElfError::TooLow { .. })));
        assert_eq!(parse(&elf(0x20_0000, 0x1000, 0x1000), 0), Err(ElfError::Truncated(0)));
        let mut e = elf(0x20_0000, 0x40, 0x1000);
        e[56] = 200;
        assert_eq!(parse(&e, 0), Err(ElfError::BadHeaders));
        assert_eq!(parse(&e[..40], 0), Err(ElfError::BadHeaders));
    }
}
