//! Sizes as people write them: `512M`, `2G`, `1GiB`, `4096`.

use thiserror::Error;

/// A string that is not a size.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("'{0}' is not a size (use bytes or K, M, G, T with an optional iB, e.g. 512M, 2G)")]
pub struct SizeError(pub String);

/// Parses a size in bytes; suffixes are binary (K = 1024).
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let err = || SizeError(s.to_string());
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits == 0 {
        return Err(err());
    }
    let n: u64 = t[..digits].parse().map_err(|_| err())?;
    let unit = t[digits..].trim().to_ascii_lowercase();
    let shift = match unit.trim_end_matches("ib").trim_end_matches('b') {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(err()),
    };
    if unit == "b" || unit.ends_with("bb") {
        return Err(err());
    }
    n.checked_mul(1u64 << shift).ok_or_else(err)
}

/// Formats bytes with the largest binary unit that divides them.
pub fn format_size(bytes: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("2GB"), Ok(2 << 30));
        for bad in ["", "M", "12Q", "-1", "1.5G", "99999999999T", "10b"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(format_size(256 << 20), "256M");
        assert_eq!(format_size(3 << 30), "3G");
        assert_eq!(format_size(1000), "1000");
    }
}
