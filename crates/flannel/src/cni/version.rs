//! CNI spec versions: which we accept, and per-verb floors (CHECK ≥ 0.4.0, STATUS/GC ≥ 1.1.0).

use super::error::{CniError, code};

/// Every version this plugin speaks (upstream: `cni.All`, plus 1.1.0).
pub const SUPPORTED: [&str; 7] = [
    "0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0",
];

/// The newest version; used for errors when the config's version is unknown.
pub const LATEST: &str = "1.1.0";

/// `"a.b.c"` as a comparable triple.
pub fn parse(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    let t = (it.next()??, it.next()??, it.next()??);
    it.next().is_none().then_some(t)
}

/// Refuses versions we do not speak (error 1).
pub fn check_supported(v: &str) -> Result<(), CniError> {
    if SUPPORTED.contains(&v) {
        Ok(())
    } else {
        Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("incompatible CNI versions: config is {v:?}, plugin supports {SUPPORTED:?}"),
        ))
    }
}

/// Refuses a verb the config's version does not have (error 1).
pub fn check_floor(v: &str, verb: &str, floor: &str) -> Result<(), CniError> {
    match (parse(v), parse(floor)) {
        (Some(have), Some(need)) if have >= need => Ok(()),
        _ => Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("{verb} needs cniVersion {floor} or later, config has {v:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert!(check_supported("0.3.1").is_ok());
        assert_eq!(check_supported("9.9.9").unwrap_err().code, 1);
        assert!(check_floor("0.3.1", "CHECK", "0.4.0").is_err());
        assert!(check_floor("1.0.0", "CHECK", "0.4.0").is_ok());
        assert!(check_floor("1.0.0", "GC", "1.1.0").is_err());
        assert_eq!(parse("1.10.0"), Some((1, 10, 0)));
        assert_eq!(parse("1.0"), None);
    }
}
