//! How much memory the host can give to RAM-backed guest memory.

use std::fs;
use std::io;

/// `MemAvailable` from `/proc/meminfo`, in bytes.
pub fn mem_available() -> io::Result<u64> {
    let text = fs::read_to_string("/proc/meminfo")?;
    parse_meminfo_field(&text, "MemAvailable")
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no MemAvailable in /proc/meminfo"))
}

/// Reads one `Name:   N kB` field of a meminfo text, in bytes.
pub fn parse_meminfo_field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?.strip_prefix(':')?;
        let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        kb.checked_mul(1024)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields() {
        let t = "MemTotal:       24000000 kB\nMemAvailable:    1000 kB\nHugePages_Total:       0\n";
        assert_eq!(parse_meminfo_field(t, "MemAvailable"), Some(1_024_000));
        assert_eq!(parse_meminfo_field(t, "HugePages_Total"), Some(0));
        assert_eq!(parse_meminfo_field(t, "Mem"), None);
        assert!(mem_available().unwrap() > 0);
    }
}
