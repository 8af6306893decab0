//! Logging set-up: tracing to stderr (default), stdout (`--stdout`) or
//! syslog (`--syslog`, each line tagged `vspc[PID]`).

use std::io::{IsTerminal, Write};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// Where log lines go.
pub enum Target {
    Stderr,
    Stdout,
    Syslog,
}

/// Install the global subscriber. `RUST_LOG` overrides the level.
pub fn init(target: Target, debug: bool) -> Result<(), String> {
    let default = if debug { "debug" } else { "info" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let result = match target {
        Target::Stderr => builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .try_init(),
        Target::Stdout => builder
            .with_ansi(std::io::stdout().is_terminal())
            .with_writer(std::io::stdout)
            .try_init(),
        Target::Syslog => {
            let sock = UnixDatagram::unbound()
                .and_then(|s| s.connect("/dev/log").map(|_| s))
                .map_err(|e| format!("cannot log to syslog: /dev/log: {e}"))?;
            builder
                .with_ansi(false)
                .without_time()
                .with_writer(Syslog(Arc::new(sock)))
                .try_init()
        }
    };
    result.map_err(|e| format!("cannot set up logging: {e}"))
}

/// A `MakeWriter` that sends each formatted event as one syslog datagram.
#[derive(Clone)]
struct Syslog(Arc<UnixDatagram>);

struct Line {
    sock: Arc<UnixDatagram>,
    buf: Vec<u8>,
}

impl<'a> MakeWriter<'a> for Syslog {
    type Writer = Line;
    fn make_writer(&'a self) -> Line {
        Line {
            sock: self.0.clone(),
            buf: Vec::new(),
        }
    }
}

impl Write for Line {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.buf);
        let text = text.trim_end();
        if text.is_empty() {
            return;
        }
        // <27> = daemon.err, <30> = daemon.info, <31> = daemon.debug.
        let pri = if text.contains("ERROR") || text.contains("WARN") {
            27
        } else {
            30
        };
        let msg = format!("<{pri}>vspc[{}]: {text}", std::process::id());
        let _ = self.sock.send(msg.as_bytes());
    }
}
