//! Sizes at the edges: `6GiB`, `2.5GB`, `512MiB` in, bytes in code, `6.00 GiB` out.

use crate::error::{Error, Result};

/// Parse a size with a unit: B, KB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB (powers of
/// 1024); the unit's case does not matter. `flag` is named in the error.
pub fn parse_size(s: &str, flag: &'static str) -> Result<usize> {
    let bad = || Error::Flag {
        flag,
        message: format!(
            "{s:?} is not a size; expected a number and a unit, like 6GiB, 2.5GB or 512MiB"
        ),
    };
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number.parse().map_err(|_| bad())?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(bad()),
    };
    let bytes = number * scale;
    if !bytes.is_finite() || bytes >= usize::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes.round() as usize)
}

/// Bytes for people, in binary units: `512 B`, `1.5 KiB`, `300.0 MiB`, `6.00 GiB`.
pub fn human_bytes(b: usize) -> String {
    const KIB: f64 = 1024.0;
    let x = b as f64;
    if x >= KIB * KIB * KIB {
        format!("{:.2} GiB", x / (KIB * KIB * KIB))
    } else if x >= KIB * KIB {
        format!("{:.1} MiB", x / (KIB * KIB))
    } else if x >= KIB {
        format!("{:.1} KiB", x / KIB)
    } else {
        format!("{b} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("6GiB", "--vram").unwrap(), 6 << 30);
        assert_eq!(parse_size("2.5GB", "--vram").unwrap(), 2_500_000_000);
        assert_eq!(parse_size("512MiB", "--vram").unwrap(), 512 << 20);
        assert_eq!(parse_size("512 mib", "--vram").unwrap(), 512 << 20);
        assert_eq!(parse_size("100B", "--vram").unwrap(), 100);
        for bad in ["", "6", "GiB", "6XB", "-1GiB", "1.2.3GB"] {
            let e = parse_size(bad, "--vram").unwrap_err().to_string();
            assert!(e.starts_with("--vram:"), "{e}");
        }
        assert_eq!(human_bytes(6 << 30), "6.00 GiB");
        assert_eq!(human_bytes(100), "100 B");
    }
}
