//! Tracing set-up: text or JSON lines on stderr, filtered by `--log-level` (EnvFilter syntax).

use tracing_subscriber::EnvFilter;

use crate::Error;
use crate::args::LogFormat;

/// Installs the global subscriber. Calling it twice is harmless (tests start several components).
pub fn init(format: LogFormat, filter: &str) -> Result<(), Error> {
    let env_filter = EnvFilter::try_new(filter).map_err(|e| Error::LogFilter {
        filter: filter.to_string(),
        message: e.to_string(),
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    Ok(())
}
