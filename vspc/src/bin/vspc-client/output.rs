//! How the client reports to its user: the exit statuses, the [`Failure`]
//! that ends it with a status and a message, and writes to stdout and
//! stderr that never panic.

use std::io::Write;

/// Exit status: an error (connection, protocol, unknown VM).
pub(crate) const EXIT_ERROR: u8 = 1;
/// Exit status: a usage error (clap's own, and a VM name with a line break).
pub(crate) const EXIT_USAGE: u8 = 2;
/// Exit status: the server refused the lock (2 is clap's usage error).
pub(crate) const EXIT_LOCK: u8 = 3;

/// Why the client stops with a non-zero status: the message (printed after
/// `vspc-client: `, may span lines) and the status.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) code: u8,
    pub(crate) message: String,
}

pub(crate) fn failure(code: u8, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

/// Write to stderr, ignoring failures (a hung-up terminal must not panic us).
pub(crate) fn say(text: &str) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(text.as_bytes());
    let _ = err.flush();
}

/// Write to stdout and flush; a failure to do so ends the client.
pub(crate) fn write_stdout(bytes: &[u8]) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|e| failure(EXIT_ERROR, format!("cannot write to stdout: {e}")))
}
