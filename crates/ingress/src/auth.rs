//! `auth-type: basic`: htpasswd files from the `auth` key of `auth-secret`, checked the way
//! nginx's auth_basic does: Apache MD5 (`$apr1$`, htpasswd's default), `{SHA}`, `{PLAIN}`, and
//! the crypt(3) schemes (bcrypt `$2y$`, `$1$`, `$5$`, `$6$`, DES).

use std::collections::HashMap;

use base64::Engine;
use md5::{Digest, Md5};

/// Parsed htpasswd content: user → hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Htpasswd {
    users: HashMap<String, String>,
}

impl Htpasswd {
    /// Parses `user:hash` lines; blank lines and `#` comments are skipped.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut users = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| format!("line {}: expected user:hash", n + 1))?;
            users.insert(user.to_string(), hash.to_string());
        }
        if users.is_empty() {
            return Err("no users".into());
        }
        Ok(Self { users })
    }

    /// Checks an `Authorization: Basic ...` header value.
    pub fn check_header(&self, header: Option<&str>) -> bool {
        let Some(encoded) = header.and_then(|h| h.strip_prefix("Basic ")) else {
            return false;
        };
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
            return false;
        };
        let Ok(pair) = String::from_utf8(decoded) else {
            return false;
        };
        let Some((user, password)) = pair.split_once(':') else {
            return false;
        };
        self.users
            .get(user)
            .is_some_and(|hash| verify(password, hash))
    }
}

/// Verifies `password` against one stored hash.
pub fn verify(password: &str, hash: &str) -> bool {
    if let Some(rest) = hash.strip_prefix("$apr1$") {
        let salt = rest.split('$').next().unwrap_or("");
        return apr1(password.as_bytes(), salt.as_bytes()) == hash;
    }
    if let Some(b64) = hash.strip_prefix("{SHA}") {
        let digest = sha1::Sha1::digest(password.as_bytes());
        return base64::engine::general_purpose::STANDARD.encode(digest) == b64;
    }
    if let Some(plain) = hash.strip_prefix("{PLAIN}") {
        return plain == password;
    }
    pwhash::unix::verify(password, hash)
}

const ITOA64: &[u8; 64] = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Apache's MD5 crypt: md5crypt with the `$apr1$` magic (no crate implements this variant).
fn apr1(password: &[u8], salt: &[u8]) -> String {
    const MAGIC: &[u8] = b"$apr1$";
    let salt = &salt[..salt.len().min(8)];
    let alt = Md5::new()
        .chain_update(password)
        .chain_update(salt)
        .chain_update(password)
        .finalize();
    let mut ctx = Md5::new();
    ctx.update(password);
    ctx.update(MAGIC);
    ctx.update(salt);
    let mut left = password.len();
    while left > 0 {
        let n = left.min(16);
        ctx.update(&alt[..n]);
        left -= n;
    }
    let mut i = password.len();
    while i > 0 {
        if i & 1 == 1 {
            ctx.update([0u8]);
        } else {
            ctx.update(&password[..1]);
        }
        i >>= 1;
    }
    let mut digest = ctx.finalize();
    for round in 0..1000 {
        let mut c = Md5::new();
        if round & 1 == 1 {
            c.update(password);
        } else {
            c.update(digest);
        }
        if round % 3 != 0 {
            c.update(salt);
        }
        if round % 7 != 0 {
            c.update(password);
        }
        if round & 1 == 1 {
            c.update(digest);
        } else {
            c.update(password);
        }
        digest = c.finalize();
    }
    let d = digest;
    let mut out = String::from("$apr1$");
    out.push_str(&String::from_utf8_lossy(salt));
    out.push('$');
    let mut push = |v: u32, n: usize| {
        let mut v = v;
        for _ in 0..n {
            out.push(ITOA64[(v & 0x3f) as usize] as char);
            v >>= 6;
        }
    };
    let b = |i: usize| u32::from(d[i]);
    push((b(0) << 16) | (b(6) << 8) | b(12), 4);
    push((b(1) << 16) | (b(7) << 8) | b(13), 4);
    push((b(2) << 16) | (b(8) << 8) | b(14), 4);
    push((b(3) << 16) | (b(9) << 8) | b(15), 4);
    push((b(4) << 16) | (b(10) << 8) | b(5), 4);
    push(b(11), 2);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apr1_matches_openssl() {
        // `openssl passwd -apr1 -salt abcdefgh password`
        assert!(verify("password", "$apr1$abcdefgh$FBwExRW4dCc8aL.OvjpIE1"));
        assert!(!verify("Password", "$apr1$abcdefgh$FBwExRW4dCc8aL.OvjpIE1"));
    }

    #[test]
    fn sha_plain_and_crypt() {
        // `htpasswd -nbs foo bar`
        assert!(verify("bar", "{SHA}Ys23Ag/5IOWqZCw9QGaVDdHwH00="));
        assert!(verify("x", "{PLAIN}x"));
        let bcrypt = pwhash::bcrypt::hash("secret").expect("bcrypt");
        assert!(verify("secret", &bcrypt));
        assert!(!verify("wrong", &bcrypt));
    }

    #[test]
    fn basic_header() {
        let h = Htpasswd::parse("# users\nfoo:{PLAIN}bar\n").expect("parse");
        let ok = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("foo:bar")
        );
        let bad = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("foo:baz")
        );
        assert!(h.check_header(Some(&ok)));
        assert!(!h.check_header(Some(&bad)));
        assert!(!h.check_header(None));
        assert!(!h.check_header(Some("Bearer x")));
        assert!(Htpasswd::parse("nocolon").is_err());
    }
}
