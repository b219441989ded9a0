//! The `flannel` CNI plugin. Never panics outward: every failure is a CNI error on stdout.

use std::io::{Read, Write};

use flannel::cni::{self, error::CniError, version::LATEST};

fn main() {
    // A hook rather than `catch_unwind`: it also holds when the binary is built with
    // `panic = "abort"` (as shipped), where nothing unwinds.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info); // the message on stderr, which the runtime logs
        let e = CniError::new(
            cni::error::code::INTERNAL,
            "internal error in the flannel plugin",
        )
        .with_details(info.to_string());
        finish(e.to_json(LATEST).as_bytes(), 1);
    }));
    let mut stdin = Vec::new();
    let read = std::io::stdin().take(16 << 20).read_to_end(&mut stdin);
    let env = cni::Env::from_process();
    let result = match read {
        Ok(_) => cni::run(&env, &stdin),
        Err(e) => Err((
            LATEST.to_string(),
            CniError::new(cni::error::code::IO, "reading stdin").with_details(e.to_string()),
        )),
    };
    match result {
        Ok(bytes) => finish(&bytes, 0),
        Err((version, e)) => finish(e.to_json(&version).as_bytes(), 1),
    }
}

fn finish(bytes: &[u8], code: i32) -> ! {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(bytes);
    let _ = out.flush();
    std::process::exit(code);
}
