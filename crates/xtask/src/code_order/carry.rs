//! The list carried over to another architecture. Symbol names carry hashes of the target, so
//! the functions seen running natively are found among the other architecture's symbols by
//! their names without the hashes. Where several functions share such a name (instances of one
//! generic function), all of them are placed first: a few more bytes in the hot region.

use std::collections::{BTreeSet, HashSet};
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::images;

/// `names` (from the native build) as the symbols of the binaries in `dir`.
pub fn carry_over(names: &BTreeSet<String>, dir: &Path) -> Result<BTreeSet<String>> {
    let wanted: HashSet<String> = names.iter().map(|n| key(n)).collect();
    let mut carried = BTreeSet::new();
    for (_, bin) in images::BINARIES {
        for symbol in functions(&dir.join(bin))? {
            if wanted.contains(&key(&symbol)) {
                carried.insert(symbol);
            }
        }
    }
    Ok(carried)
}

/// The functions `binary` defines, by `nm`.
fn functions(binary: &Path) -> Result<Vec<String>> {
    let out = Command::new("nm")
        .arg("--defined-only")
        .arg(binary)
        .output()
        .context("running nm")?;
    if !out.status.success() {
        bail!(
            "nm {}: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, kind, name) = (fields.next()?, fields.next()?, fields.next()?);
            matches!(kind, "t" | "T" | "w" | "W").then(|| name.to_owned())
        })
        .collect())
}

/// A symbol's name without what depends on the target: the legacy scheme's trailing
/// `17h<16 hex digits>E`, the v0 scheme's crate disambiguators (`Cs<base 62>_`).
fn key(name: &str) -> String {
    if let Some(v0) = name.strip_prefix("_R") {
        return format!("_R{}", without_disambiguators(v0));
    }
    let bytes = name.as_bytes();
    let n = bytes.len();
    if n > 20
        && bytes[n - 1] == b'E'
        && &bytes[n - 20..n - 17] == b"17h"
        && bytes[n - 17..n - 1].iter().all(u8::is_ascii_hexdigit)
    {
        return format!("{}E", &name[..n - 20]);
    }
    name.to_owned()
}

/// `C s <base 62> _ <length>` becomes `C <length>`.
fn without_disambiguators(v0: &str) -> String {
    let mut out = String::with_capacity(v0.len());
    let mut rest = v0;
    while let Some(at) = rest.find("Cs") {
        out.push_str(&rest[..=at]);
        let after = &rest[at + 2..];
        let digits = after.bytes().take_while(u8::is_ascii_alphanumeric).count();
        let disambiguated = after[digits..].starts_with('_')
            && after[digits + 1..].starts_with(|c: char| c.is_ascii_digit());
        rest = if disambiguated {
            &after[digits + 1..]
        } else {
            &rest[at + 1..]
        };
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_matched_without_the_targets_hashes() {
        assert_eq!(
            key("_ZN5tokio7runtime4park10drop_waker17hfeca001a7fcce071E"),
            key("_ZN5tokio7runtime4park10drop_waker17h0123456789abcdefE")
        );
        assert_eq!(
            key("_RNvNtCs7BliBxkEZsN_4core9panicking9panic_fmt"),
            key("_RNvNtCsaz6eC2DG7lh_4core9panicking9panic_fmt")
        );
        assert_ne!(
            key("_RNvNtCs7BliBxkEZsN_4core9panicking9panic_fmt"),
            key("_RNvNtCs7BliBxkEZsN_4core9panicking10panic_str")
        );
        assert_eq!(key("memcpy"), "memcpy");
        assert_eq!(key("_ZN3foo17hshortE"), "_ZN3foo17hshortE");
    }
}
