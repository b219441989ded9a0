//! Go `time.Duration` strings, as cert-manager's API carries them (`duration: 2160h`,
//! `renewBefore: 1h30m`): parsed with Go's `time.ParseDuration` grammar and printed with
//! `Duration.String()`, so messages read exactly like upstream's.

use std::time::Duration;

/// Why a duration string did not parse. The messages are Go's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("time: invalid duration \"{0}\"")]
    Invalid(String),
    #[error("time: missing unit in duration \"{0}\"")]
    MissingUnit(String),
    #[error("time: unknown unit \"{unit}\" in duration \"{input}\"")]
    UnknownUnit { unit: String, input: String },
    /// Go accepts negative durations; `std::time::Duration` cannot hold them, so callers that
    /// must reject them (waitInsteadOfSelfCheck) get a distinct error.
    #[error("time: negative duration \"{0}\"")]
    Negative(String),
}

const NANOS_PER_SEC: u128 = 1_000_000_000;

fn unit_nanos(unit: &str) -> Option<u128> {
    Some(match unit {
        "ns" => 1,
        "us" | "µs" | "μs" => 1_000,
        "ms" => 1_000_000,
        "s" => NANOS_PER_SEC,
        "m" => 60 * NANOS_PER_SEC,
        "h" => 3600 * NANOS_PER_SEC,
        _ => return None,
    })
}

/// Parses like Go's `time.ParseDuration`: `"2160h"`, `"1h30m"`, `"1.5s"`, `"300ms"`, `"0"`.
pub fn parse_go_duration(input: &str) -> Result<Duration, DurationError> {
    let invalid = || DurationError::Invalid(input.to_string());
    let (negative, mut rest) = match input.as_bytes().first() {
        Some(b'-') => (true, &input[1..]),
        Some(b'+') => (false, &input[1..]),
        _ => (false, input),
    };
    // Go special-cases a bare zero (no unit needed).
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(invalid());
    }
    // Go's Duration is an int64 of nanoseconds; anything larger overflows.
    const MAX: u128 = i64::MAX as u128;
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (int_part, after) = rest.split_at(int_len);
        let (frac_part, after) = match after.strip_prefix('.') {
            Some(a) => {
                let n = a.bytes().take_while(u8::is_ascii_digit).count();
                a.split_at(n)
            }
            None => ("", after),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            // No digits at all (e.g. ".s" or "h").
            return Err(invalid());
        }
        let unit_len = after
            .char_indices()
            .find(|(_, c)| *c == '.' || c.is_ascii_digit())
            .map_or(after.len(), |(i, _)| i);
        let (unit, after) = after.split_at(unit_len);
        if unit.is_empty() {
            return Err(DurationError::MissingUnit(input.to_string()));
        }
        let scale = unit_nanos(unit).ok_or_else(|| DurationError::UnknownUnit {
            unit: unit.to_string(),
            input: input.to_string(),
        })?;
        let whole: u128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().map_err(|_| invalid())?
        };
        let mut value = whole.checked_mul(scale).ok_or_else(invalid)?;
        if !frac_part.is_empty() {
            // Like Go, digits beyond what can matter are ignored rather than overflowing.
            let digits = &frac_part[..frac_part.len().min(18)];
            let frac: u128 = digits.parse().map_err(|_| invalid())?;
            let denom = 10u128.pow(digits.len() as u32);
            value += frac * scale / denom;
        }
        total = total.checked_add(value).ok_or_else(invalid)?;
        if total > MAX {
            return Err(invalid());
        }
        rest = after;
    }
    if negative && total != 0 {
        return Err(DurationError::Negative(input.to_string()));
    }
    let secs = u64::try_from(total / NANOS_PER_SEC).map_err(|_| invalid())?;
    // The remainder is below one second, so it fits in u32.
    let nanos = (total % NANOS_PER_SEC) as u32;
    Ok(Duration::new(secs, nanos))
}

/// Prints like Go's `Duration.String()`: `2160h0m0s`, `30m0s`, `1.5s`, `300ms`, `0s`.
pub fn format_go_duration(d: Duration) -> String {
    let total = d.as_nanos();
    if total == 0 {
        return "0s".into();
    }
    if total < NANOS_PER_SEC {
        return if total < 1_000 {
            format!("{total}ns")
        } else if total < 1_000_000 {
            format!("{}µs", fraction(total, 1_000))
        } else {
            format!("{}ms", fraction(total, 1_000_000))
        };
    }
    let secs = total / NANOS_PER_SEC;
    let (h, m, s) = (secs / 3600, (secs / 60) % 60, secs % 60);
    let sub = total % NANOS_PER_SEC;
    let s = fraction(s * NANOS_PER_SEC + sub, NANOS_PER_SEC);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

/// `value / unit` in decimal with trailing zeros of the fraction dropped.
fn fraction(value: u128, unit: u128) -> String {
    let (whole, rem) = (value / unit, value % unit);
    if rem == 0 {
        return whole.to_string();
    }
    let width = unit.ilog10() as usize;
    let frac = format!("{rem:0width$}");
    format!("{whole}.{}", frac.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_like_go() {
        let h = 3600;
        let table: &[(&str, Duration)] = &[
            ("2160h", Duration::from_secs(2160 * h)),
            ("1h30m", Duration::from_secs(h + 1800)),
            ("90m", Duration::from_secs(5400)),
            ("1h0m0s", Duration::from_secs(h)),
            ("5m", Duration::from_secs(300)),
            ("1.5s", Duration::from_millis(1500)),
            (".5s", Duration::from_millis(500)),
            ("300ms", Duration::from_millis(300)),
            ("10us", Duration::from_micros(10)),
            ("10µs", Duration::from_micros(10)),
            ("7ns", Duration::from_nanos(7)),
            ("0", Duration::ZERO),
            ("-0", Duration::ZERO),
            ("+5s", Duration::from_secs(5)),
            ("1h1h", Duration::from_secs(2 * h)),
            ("0.5h", Duration::from_secs(1800)),
        ];
        for (input, want) in table {
            assert_eq!(parse_go_duration(input), Ok(*want), "{input}");
        }
    }

    #[test]
    fn rejects_like_go() {
        let table: &[(&str, DurationError)] = &[
            ("", DurationError::Invalid("".into())),
            ("abc", DurationError::Invalid("abc".into())),
            ("1", DurationError::MissingUnit("1".into())),
            ("1h30", DurationError::MissingUnit("1h30".into())),
            (
                "1d",
                DurationError::UnknownUnit {
                    unit: "d".into(),
                    input: "1d".into(),
                },
            ),
            (".", DurationError::Invalid(".".into())),
            ("-5s", DurationError::Negative("-5s".into())),
            (
                "9999999999999h",
                DurationError::Invalid("9999999999999h".into()),
            ),
            (
                "1h ",
                DurationError::UnknownUnit {
                    unit: "h ".into(),
                    input: "1h ".into(),
                },
            ),
        ];
        for (input, want) in table {
            assert_eq!(parse_go_duration(input).as_ref(), Err(want), "{input}");
        }
        assert_eq!(
            DurationError::UnknownUnit {
                unit: "d".into(),
                input: "1d".into()
            }
            .to_string(),
            "time: unknown unit \"d\" in duration \"1d\""
        );
    }

    #[test]
    fn formats_like_go() {
        let table: &[(Duration, &str)] = &[
            (Duration::ZERO, "0s"),
            (Duration::from_secs(2160 * 3600), "2160h0m0s"),
            (Duration::from_secs(3600), "1h0m0s"),
            (Duration::from_secs(1800), "30m0s"),
            (Duration::from_secs(5400), "1h30m0s"),
            (Duration::from_secs(300), "5m0s"),
            (Duration::from_millis(1500), "1.5s"),
            (Duration::from_millis(300), "300ms"),
            (Duration::from_micros(1500), "1.5ms"),
            (Duration::from_nanos(1500), "1.5µs"),
            (Duration::from_nanos(7), "7ns"),
            (Duration::from_secs(61), "1m1s"),
        ];
        for (d, want) in table {
            assert_eq!(format_go_duration(*d), *want);
        }
    }
}
