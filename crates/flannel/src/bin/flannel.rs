//! The `flannel` CNI plugin. Never panics outward: every failure is a CNI error on stdout.

use std::io::{Read, Write};

fn main() {
    let mut stdin = Vec::new();
    let read = std::io::stdin().take(16 << 20).read_to_end(&mut stdin);
    let env = flannel::cni::Env::from_process();
    let read = read.map_err(|e| e.to_string());
    let result = std::panic::catch_unwind(|| match read {
        Ok(_) => flannel::cni::run(&env, &stdin),
        Err(e) => Err((
            flannel::cni::version::LATEST.to_string(),
            flannel::cni::error::CniError::new(flannel::cni::error::code::IO, "reading stdin")
                .with_details(e),
        )),
    });
    let mut out = std::io::stdout().lock();
    let code = match result {
        Ok(Ok(bytes)) => {
            let _ = out.write_all(&bytes);
            0
        }
        Ok(Err((version, e))) => {
            let _ = out.write_all(e.to_json(&version).as_bytes());
            1
        }
        Err(_) => {
            let e = flannel::cni::error::CniError::new(
                flannel::cni::error::code::INTERNAL,
                "internal error in the flannel plugin",
            );
            let _ = out.write_all(e.to_json(flannel::cni::version::LATEST).as_bytes());
            1
        }
    };
    let _ = out.flush();
    std::process::exit(code);
}
