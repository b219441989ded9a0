//! RFC 3339 timestamps as the API writes them (`2026-11-26T23:59:59Z`), and Go durations.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::jiff::Timestamp;

pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Seconds since the epoch → `YYYY-MM-DDTHH:MM:SSZ` (whole seconds, as metav1.Time).
pub fn format_secs(secs: i64) -> String {
    Timestamp::from_second(secs)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

pub fn now() -> String {
    format_secs(now_secs())
}

pub fn parse_secs(s: &str) -> Option<i64> {
    s.parse::<Timestamp>().ok().map(|t| t.as_second())
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid duration {0:?}")]
pub struct DurationError(pub String);

/// Go's `time.ParseDuration` for the units certificates use (`h`, `m`, `s`, `ms`, `us`, `ns`;
/// decimals allowed, e.g. `1.5h`, `2160h`, `1h30m`).
pub fn parse_go_duration(s: &str) -> Result<Duration, DurationError> {
    let err = || DurationError(s.to_string());
    let mut rest = s.trim();
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() || rest.starts_with('-') {
        return Err(err());
    }
    rest = rest.strip_prefix('+').unwrap_or(rest);
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(err)?;
        if num_len == 0 {
            return Err(err());
        }
        let value: f64 = rest[..num_len].parse().map_err(|_| err())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return Err(err()),
        };
        total += value * factor;
        rest = &rest[unit_len..];
    }
    if !total.is_finite() || total > 1e12 {
        return Err(err());
    }
    Ok(Duration::from_secs_f64(total))
}

/// Go-style rendering used in messages (`2160h0m0s`).
pub fn format_go_duration(d: Duration) -> String {
    let secs = d.as_secs();
    format!("{}h{}m{}s", secs / 3600, (secs % 3600) / 60, secs % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        for (input, secs) in [
            ("2160h", 2160 * 3600),
            ("1h30m", 5400),
            ("90m", 5400),
            ("45s", 45),
            ("1.5h", 5400),
            ("0", 0),
            ("720h0m0s", 720 * 3600),
        ] {
            assert_eq!(
                parse_go_duration(input),
                Ok(Duration::from_secs(secs)),
                "{input}"
            );
        }
        for bad in ["", "1", "h", "1d", "-1h", "1hh", "abc"] {
            assert!(parse_go_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(
            format_go_duration(Duration::from_secs(2160 * 3600)),
            "2160h0m0s"
        );
    }

    #[test]
    fn timestamps_round_trip() {
        let t = 1_800_000_000;
        assert_eq!(parse_secs(&format_secs(t)), Some(t));
        assert_eq!(format_secs(0), "1970-01-01T00:00:00Z");
        assert_eq!(parse_secs("garbage"), None);
    }
}
