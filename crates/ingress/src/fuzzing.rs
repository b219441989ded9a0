//! Entry points for the cargo-fuzz targets in `crates/ingress/fuzz` (kept here so the unit
//! tests run them on seeds and they cannot rot). Each must never panic, whatever the input.

use std::collections::BTreeMap;

use crate::annotations::{Annotations, PREFIX};
use crate::config::Config;
use crate::path_rules::{HostRules, PathKind, PathRule, normalize_host};

/// Input: lines `E|P|I <path>` (Exact, Prefix, ImplementationSpecific), `R` to switch the host
/// to regex mode, and `? <request path>` lookups. Checks the matching invariants.
pub fn path_rules(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut rules = Vec::new();
    let mut regex = false;
    let mut lookups = Vec::new();
    for line in text.lines().take(64) {
        let (tag, rest) = line.split_once(' ').unwrap_or((line, ""));
        let kind = match tag {
            "E" => PathKind::Exact,
            "P" => PathKind::Prefix,
            "I" => PathKind::ImplementationSpecific,
            "R" => {
                regex = true;
                continue;
            }
            "?" => {
                lookups.push(rest.to_string());
                continue;
            }
            _ => continue,
        };
        rules.push(PathRule {
            path: rest.to_string(),
            kind,
            target: rules.len(),
        });
    }
    let (host, _) = HostRules::new(rules, regex, None);
    for path in lookups {
        let Some(rule) = host.lookup(&path) else {
            continue;
        };
        if regex {
            continue;
        }
        match rule.kind {
            PathKind::Exact => assert_eq!(rule.path, path),
            PathKind::ImplementationSpecific => assert!(path.starts_with(&rule.path)),
            PathKind::Prefix => {
                let p = rule.path.trim_end_matches('/');
                assert!(
                    p.is_empty() || path == p || path.starts_with(&format!("{p}/")),
                    "prefix {p:?} matched {path:?}"
                );
            }
        }
    }
    let _ = normalize_host(&text);
}

/// Input: `key=value` lines, parsed as Ingress annotations and as ConfigMap data.
pub fn annotations_and_config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut annotations = BTreeMap::new();
    let mut config = BTreeMap::new();
    for line in text.lines().take(64) {
        if let Some((k, v)) = line.split_once('=') {
            annotations.insert(format!("{PREFIX}{k}"), v.to_string());
            config.insert(k.to_string(), v.to_string());
        }
    }
    if let Ok(a) = Annotations::parse(Some(&annotations)) {
        let _ = a.forces_regex();
    }
    if let Ok(c) = Config::parse(Some(&config)) {
        let _ = c.config.hsts_header();
    }
}

/// Input: a client byte stream, fed to the request-framing scanner in uneven pieces; the
/// scanner must never panic and never yield more verdicts than request heads it could see.
pub fn framing(data: &[u8]) {
    use std::sync::Arc;
    let verdicts = Arc::new(crate::framing::Verdicts::default());
    let mut scanner = crate::framing::Scanner::new(verdicts.clone());
    let split = data.first().map_or(1, |b| usize::from(*b % 7) + 1);
    for piece in data.chunks(split) {
        scanner.feed(piece);
    }
    let heads = data.windows(4).filter(|w| *w == b"\r\n\r\n").count();
    let mut n = 0;
    while n <= heads + 1 && verdicts.next() {
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_run_clean() {
        path_rules(b"P /foo\nE /foo\nI /fo\n? /foo\n? /foo/bar\n? /foobar\n? /\n");
        path_rules(b"R\nI /api(/|$)(.*)\nP /[\n? /api/x\n");
        path_rules(b"P /\n? \n? /x\nP \n");
        path_rules(&[0xff, 0xfe, b'\n', b'P', b' ', 0xc3]);
        annotations_and_config(b"proxy-body-size=8m\nssl-redirect=maybe\nlimit-rps=99999999999\n");
        annotations_and_config(b"enable-cors=true\ncors-allow-origin=\nauth-type=basic\n");
        annotations_and_config(b"large-client-header-buffers=4 99999999999g\nhsts-max-age=-1\n");
        framing(b"\x03POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nabGET / HTTP/1.1\r\n\r\n");
        framing(b"\x01POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n");
        framing(b"");
    }
}
