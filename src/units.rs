//! Human-readable values on the command line: durations (`500ms`, `2s`), sizes (`256MiB`),
//! fractions, each checked against a range with a message naming the allowed values.

use std::time::Duration;

/// Parses a byte size: a number with a unit `B`, `KiB`, `MiB`, `GiB`, `TiB` (or `K`, `M`, `G`,
/// `T`, also with `B` after them, all binary), returned in KiB (rounded down).
pub fn parse_size_kib(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num.parse().map_err(|_| format!("{s:?} is not a size like 256MiB or 2GiB"))?;
    let mul: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "b" => 1.0 / 1024.0,
        "k" | "kb" | "kib" => 1.0,
        "m" | "mb" | "mib" => 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0,
        "t" | "tb" | "tib" => 1024.0 * 1024.0 * 1024.0,
        "" => return Err(format!("{s:?} needs a unit (B, KiB, MiB, GiB, TiB)")),
        u => return Err(format!("unknown size unit {u:?} in {s:?} (use B, KiB, MiB, GiB, TiB)")),
    };
    let kib = v * mul;
    if !kib.is_finite() || !(0.0..=1e15).contains(&kib) {
        return Err(format!("{s:?} is out of range"));
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(kib as u64)
}

/// Parses a duration (`humantime`: `500ms`, `2s`, `1m30s`) within `[min, max]`.
pub fn parse_duration_in(s: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let d =
        humantime::parse_duration(s.trim()).map_err(|e| format!("{s:?} is not a duration like 500ms or 2s ({e})"))?;
    if d < min || d > max {
        return Err(format!(
            "{s:?} is out of range: allowed {} to {}",
            humantime::format_duration(min),
            humantime::format_duration(max)
        ));
    }
    Ok(d)
}

/// Parses a float within `[min, max]`.
pub fn parse_f64_in(s: &str, min: f64, max: f64) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !(min..=max).contains(&v) {
        return Err(format!("{s:?} is out of range: allowed {min} to {max}"));
    }
    Ok(v)
}

/// Formats KiB as MiB with one decimal.
#[allow(clippy::cast_precision_loss)]
pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size_kib("256MiB").unwrap(), 262_144);
        assert_eq!(parse_size_kib("2GiB").unwrap(), 2 * 1024 * 1024);
        assert_eq!(parse_size_kib("1.5G").unwrap(), 1536 * 1024);
        assert_eq!(parse_size_kib("4096B").unwrap(), 4);
        assert!(parse_size_kib("12").is_err());
        assert!(parse_size_kib("x MiB").is_err());
        assert!(parse_size_kib("3 parsecs").is_err());
        assert!(parse_size_kib("-1MiB").is_err());
    }

    #[test]
    fn durations() {
        let (lo, hi) = (Duration::from_millis(100), Duration::from_secs(3600));
        assert_eq!(parse_duration_in("500ms", lo, hi).unwrap(), Duration::from_millis(500));
        assert!(parse_duration_in("10ms", lo, hi).unwrap_err().contains("allowed 100ms to 1h"));
        assert!(parse_duration_in("soon", lo, hi).is_err());
    }
}
