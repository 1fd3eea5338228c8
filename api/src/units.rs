//! Sizes and durations as users write them (`16g`, `512m`, `2h`).

use std::time::Duration;

/// A size as people read it, in binary units: `512 B`, `1.5 GiB`.
pub fn format_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Parses a byte size the way `docker run --memory`/`--shm-size` do: a number
/// with an optional binary unit `b k m g t` (case-insensitive, optional
/// trailing `b`/`ib`): `16g`, `512MiB`, `1.5g`, `1048576`.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let lower = t.to_ascii_lowercase();
    let split = lower
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(lower.len());
    let (num, unit) = lower.split_at(split);
    let unit = unit.trim();
    let unit = unit
        .strip_suffix("ib")
        .or_else(|| unit.strip_suffix('b'))
        .unwrap_or(unit);
    let mult: u64 = match unit {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return Err(format!("expected a size like 512m or 16g, got {t}")),
    };
    let value: f64 = num
        .parse()
        .map_err(|_| format!("expected a size like 512m or 16g, got {t}"))?;
    if !value.is_finite() || value < 0.0 {
        return Err(format!("expected a size like 512m or 16g, got {t}"));
    }
    Ok((value * mult as f64) as u64)
}

/// Parses a duration: plain seconds (`3600`) or with a unit (`90s`, `30m`, `2h`, `1d`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("expected a duration like 3600 or 2h, got {t}"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("expected a duration like 3600 or 2h, got {t}")),
    };
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        let check = |input: &str, expect: Result<u64, ()>| {
            assert_eq!(parse_bytes(input).map_err(|_| ()), expect, "{input}");
        };
        check("16g", Ok(16 << 30));
        check("16G", Ok(16 << 30));
        check("64m", Ok(64 << 20));
        check("512MiB", Ok(512 << 20));
        check("1.5g", Ok(3 << 29));
        check("1048576", Ok(1_048_576));
        check("10kb", Ok(10 << 10));
        check("", Err(()));
        check("lots", Err(()));
        check("5x", Err(()));
        check("-1g", Err(()));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("3600"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-5").is_err());
    }
}
