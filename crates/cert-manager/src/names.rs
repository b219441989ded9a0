//! Object names and label values derived as upstream derives them.

/// 32-bit FNV-1a (upstream names Orders and Challenges `<parent>-<fnv32a(spec)>`).
pub fn fnv32a(data: &[u8]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for b in data {
        hash ^= u32::from(*b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

/// Adler-32 (upstream's `acme.cert-manager.io/http-domain` and `http-token` label values).
pub fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for byte in data {
        a = (a + u32::from(*byte)) % 65521;
        b = (b + a) % 65521;
    }
    (b << 16) | a
}

/// `<prefix>-<hash>`, shortened so the whole name stays a valid object name (≤ 52 characters
/// of prefix, as upstream's ComputeName).
pub fn compute_name(prefix: &str, hash: u32) -> String {
    let prefix: String = prefix.chars().take(52).collect();
    let prefix = prefix.trim_end_matches(['-', '.']);
    format!("{prefix}-{hash}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        assert_eq!(fnv32a(b""), 0x811c_9dc5);
        assert_eq!(fnv32a(b"a"), 0xe40c_292c);
        assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
        assert_eq!(compute_name("x", 7), "x-7");
        assert!(compute_name(&"a".repeat(80), 4_294_967_295).len() <= 63);
    }
}
