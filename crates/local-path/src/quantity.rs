//! Resource quantities (`10Gi`, `500M`, `1.5Ti`, `1e9`) to bytes, rounded up like
//! apimachinery's `Quantity.Value()`, which upstream passes as `VOL_SIZE_BYTES`.

/// Bytes of a storage quantity; `None` if it is not a valid quantity or overflows.
pub fn to_bytes(q: &str) -> Option<u64> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let value: f64 = num.parse().ok()?;
    let factor: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        s if s.starts_with(['e', 'E']) => 10f64.powi(s[1..].parse().ok()?),
        _ => return None,
    };
    let bytes = (value * factor).ceil();
    (bytes >= 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::to_bytes;

    #[test]
    fn quantities() {
        assert_eq!(to_bytes("10Gi"), Some(10 << 30));
        assert_eq!(to_bytes("128Mi"), Some(128 << 20));
        assert_eq!(to_bytes("1G"), Some(1_000_000_000));
        assert_eq!(to_bytes("1.5Ki"), Some(1536));
        assert_eq!(to_bytes("1e3"), Some(1000));
        assert_eq!(to_bytes("100m"), Some(1));
        assert_eq!(to_bytes("12"), Some(12));
        assert_eq!(to_bytes("x"), None);
        assert_eq!(to_bytes("1Zi"), None);
        assert_eq!(to_bytes("-1"), None);
    }
}
