//! RFC 3339 timestamps as the API writes them (`2026-11-26T23:59:59Z`); Go durations are in
//! [`crate::duration`].

use std::time::{SystemTime, UNIX_EPOCH};

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

pub use crate::duration::{DurationError, format_go_duration, parse_go_duration};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip() {
        let t = 1_800_000_000;
        assert_eq!(parse_secs(&format_secs(t)), Some(t));
        assert_eq!(format_secs(0), "1970-01-01T00:00:00Z");
        assert_eq!(parse_secs("garbage"), None);
    }
}
