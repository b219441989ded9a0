//! Value syntaxes shared by annotations and ConfigMap keys (nginx's, since users copy them).

use std::time::Duration;

use ipnet::IpNet;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{key}: {message} (got {value:?})")]
pub struct ValueError {
    pub key: String,
    pub value: String,
    pub message: String,
}

pub fn err(key: &str, value: &str, message: &str) -> ValueError {
    ValueError {
        key: key.into(),
        value: value.into(),
        message: message.into(),
    }
}

pub fn parse_bool(key: &str, v: &str) -> Result<bool, ValueError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "on" | "1" | "yes" => Ok(true),
        "false" | "off" | "0" | "no" => Ok(false),
        _ => Err(err(key, v, "expected true or false")),
    }
}

/// nginx sizes: `1m`, `8k`, `1g`, plain bytes; `0` means unlimited (returned as None).
pub fn parse_size(key: &str, v: &str) -> Result<Option<u64>, ValueError> {
    let t = v.trim().to_ascii_lowercase();
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1024),
        Some('m') => (&t[..t.len() - 1], 1024 * 1024),
        Some('g') => (&t[..t.len() - 1], 1024 * 1024 * 1024),
        _ => (t.as_str(), 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| err(key, v, "expected a size like 1m, 8k or 1024"))?;
    Ok(if n == 0 { None } else { n.checked_mul(mult) })
}

/// Seconds, unitless as upstream (`60`), also accepting `60s`.
pub fn parse_seconds(key: &str, v: &str) -> Result<Duration, ValueError> {
    let t = v.trim().trim_end_matches('s');
    t.parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|_| err(key, v, "expected whole seconds"))
}

/// An nginx time (`1h`, `90s`, `1h 30m`, `500ms`; a bare number is seconds).
pub fn parse_nginx_time(key: &str, v: &str) -> Result<Duration, ValueError> {
    let bad = || {
        err(
            key,
            v,
            "expected an nginx time such as 1h, 30m, 90s or 1h 30m",
        )
    };
    let mut total = Duration::ZERO;
    let mut rest = v.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == ' ')
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(1),
            "" | "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            "d" => Duration::from_secs(86_400),
            "w" => Duration::from_secs(7 * 86_400),
            "M" => Duration::from_secs(30 * 86_400),
            "y" => Duration::from_secs(365 * 86_400),
            _ => return Err(bad()),
        };
        let part = unit
            .checked_mul(u32::try_from(n).map_err(|_| bad())?)
            .ok_or_else(bad)?;
        total = total.checked_add(part).ok_or_else(bad)?;
        rest = rest[unit_len..].trim_start();
    }
    Ok(total)
}

pub fn parse_u32(key: &str, v: &str) -> Result<u32, ValueError> {
    v.trim()
        .parse()
        .map_err(|_| err(key, v, "expected a non-negative integer"))
}

/// Comma-separated CIDRs or addresses (`10.0.0.0/8, 192.168.1.1`).
pub fn parse_cidrs(key: &str, v: &str) -> Result<Vec<IpNet>, ValueError> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| err(key, v, &format!("{s:?} is not a CIDR or IP address")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nginx_times() {
        let t = |v: &str| parse_nginx_time("k", v);
        assert_eq!(t("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(t("90").unwrap(), Duration::from_secs(90));
        assert_eq!(t("1h 30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(t("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(t("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(t("1M").unwrap(), Duration::from_secs(30 * 86_400));
        for bad in ["", "h", "1x", "-1s", "99999999999h"] {
            assert!(t(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes_and_times() {
        assert_eq!(parse_size("k", "1m"), Ok(Some(1 << 20)));
        assert_eq!(parse_size("k", "8k"), Ok(Some(8192)));
        assert_eq!(parse_size("k", "100"), Ok(Some(100)));
        assert_eq!(parse_size("k", "0"), Ok(None));
        assert!(parse_size("k", "lots").is_err());
        assert_eq!(parse_seconds("k", "60"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_seconds("k", "5s"), Ok(Duration::from_secs(5)));
        assert!(parse_seconds("k", "-1").is_err());
        assert_eq!(parse_bool("k", "True"), Ok(true));
        assert!(parse_bool("k", "maybe").is_err());
    }

    #[test]
    fn cidrs() {
        let c = parse_cidrs("k", "0.0.0.0/0,::/0, 10.1.2.3").expect("cidrs");
        assert_eq!(c.len(), 3);
        assert!(parse_cidrs("k", "10.0.0.0/33").is_err());
        assert!(parse_cidrs("k", "").expect("empty").is_empty());
    }
}
