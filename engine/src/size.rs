//! Byte sizes as users write them: `4096`, `512MiB`, `2GiB`, `1.5GB`, or `25%` of a whole.

use std::fmt;

/// A size, absolute or relative to a total known later (e.g. the model's expert bytes).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Size {
    Bytes(u64),
    Percent(f64),
}

impl Size {
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if let Some(p) = t.strip_suffix('%') {
            let v: f64 = p.trim().parse().map_err(|_| format!("`{s}` is not a percentage"))?;
            if !(v > 0.0 && v <= 100.0) {
                return Err(format!("`{s}`: a percentage must be in (0, 100]"));
            }
            return Ok(Size::Percent(v));
        }
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let v: f64 = num.parse().map_err(|_| format!("`{s}` is not a size (examples: 512MiB, 2GiB, 25%)"))?;
        let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1.0,
            "k" | "kb" => 1e3,
            "m" | "mb" => 1e6,
            "g" | "gb" => 1e9,
            "t" | "tb" => 1e12,
            "kib" => 1024.0,
            "mib" => 1024.0 * 1024.0,
            "gib" => 1024.0 * 1024.0 * 1024.0,
            "tib" => 1024.0f64.powi(4),
            u => return Err(format!("`{s}`: unknown unit `{u}` (use B, KiB, MiB, GiB, KB, MB, GB or %)")),
        };
        Ok(Size::Bytes((v * mult).round() as u64))
    }

    /// Resolves against `total` bytes.
    pub fn bytes(self, total: u64) -> u64 {
        match self {
            Size::Bytes(b) => b,
            Size::Percent(p) => (total as f64 * p / 100.0).round() as u64,
        }
    }
}

impl std::str::FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Size::parse(s)
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Size::Bytes(b) => write!(f, "{}", human(*b)),
            Size::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// `1536` -> `1.5 KiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_percentages() {
        assert_eq!(Size::parse("512MiB"), Ok(Size::Bytes(512 << 20)));
        assert_eq!(Size::parse("2GiB"), Ok(Size::Bytes(2 << 30)));
        assert_eq!(Size::parse("1.5GB"), Ok(Size::Bytes(1_500_000_000)));
        assert_eq!(Size::parse("4096"), Ok(Size::Bytes(4096)));
        assert_eq!(Size::parse("25%").unwrap().bytes(1000), 250);
        for bad in ["", "abc", "12XB", "0%", "150%", "-3MiB"] {
            assert!(Size::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(human(3 << 20), "3.0 MiB");
    }
}
