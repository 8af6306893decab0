//! The admin conversation: connect to the daemon's admin port, send one
//! command line, read the one-line JSON answer (with time limits), and turn
//! a refusal into a [`Failure`] with the right exit status.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::cli::LockMode;
use crate::output::{failure, Failure, EXIT_ERROR, EXIT_LOCK};

/// Limit for the TCP connection to the admin port.
const CONNECT_WAIT: Duration = Duration::from_secs(10);
/// Limit for the server's one-line answer.
const ANSWER_WAIT: Duration = Duration::from_secs(30);
/// Longest answer line accepted (a listing of very many VMs fits).
const MAX_ANSWER: usize = 64 << 20;

/// Where the admin port is.
pub(crate) struct Server {
    host: String,
    port: u16,
}

impl Server {
    pub(crate) fn new(host: &str, port: u16) -> Server {
        Server {
            host: host.to_string(),
            port,
        }
    }

    /// `host:port`, with brackets around an IPv6 address.
    pub(crate) fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Connect, send `command`, and read the one-line answer. Returns the
    /// stream, the answer, and whatever arrived after the answer line.
    pub(crate) async fn ask(&self, command: &str) -> Result<(TcpStream, Value, Vec<u8>), Failure> {
        let addr = self.addr();
        let host = self.host.trim_start_matches('[').trim_end_matches(']');
        let mut sock =
            match tokio::time::timeout(CONNECT_WAIT, TcpStream::connect((host, self.port))).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    return Err(failure(
                        EXIT_ERROR,
                        format!("cannot connect to {addr}: {e}"),
                    ))
                }
                Err(_) => {
                    return Err(failure(
                        EXIT_ERROR,
                        format!("cannot connect to {addr}: no answer within {CONNECT_WAIT:?}"),
                    ))
                }
            };
        let _ = sock.set_nodelay(true);
        let line = format!("{command}\n");
        sock.write_all(line.as_bytes())
            .await
            .map_err(|e| failure(EXIT_ERROR, format!("cannot send to {addr}: {e}")))?;
        let mut buf = Vec::new();
        let answer = tokio::time::timeout(ANSWER_WAIT, read_answer(&mut sock, &mut buf, &addr))
            .await
            .map_err(|_| {
                failure(
                    EXIT_ERROR,
                    format!("no answer from {addr} within {ANSWER_WAIT:?}"),
                )
            })??;
        Ok((sock, answer, buf))
    }
}

/// Read one line and parse it as JSON; `buf` keeps what follows the line.
async fn read_answer(
    sock: &mut TcpStream,
    buf: &mut Vec<u8>,
    addr: &str,
) -> Result<Value, Failure> {
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        if let Some(pos) = memchr::memchr(b'\n', buf) {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            return serde_json::from_slice(&line).map_err(|e| {
                failure(
                    EXIT_ERROR,
                    format!("{addr} answered something that is not JSON ({e}); is it a vspc admin port?"),
                )
            });
        }
        if buf.len() > MAX_ANSWER {
            return Err(failure(
                EXIT_ERROR,
                format!("{addr} sent an answer longer than {MAX_ANSWER} bytes"),
            ));
        }
        match sock.read(&mut chunk).await {
            Ok(0) => {
                return Err(failure(
                    EXIT_ERROR,
                    format!("{addr} closed the connection without answering"),
                ))
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(failure(EXIT_ERROR, format!("reading from {addr}: {e}"))),
        }
    }
}

/// The answer's error, as a failure: an unknown VM lists the known ones.
pub(crate) fn refused(
    server: &Server,
    vm: &str,
    lock: Option<LockMode>,
    answer: &Value,
) -> Failure {
    let code = answer.get("code").and_then(Value::as_str).unwrap_or("");
    let error = answer
        .get("error")
        .and_then(Value::as_str)
        .unwrap_or("the server gave no reason");
    match (code, lock) {
        ("vm_not_found", _) => {
            let known: Vec<&str> = answer
                .get("known")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let mut known = known;
            known.sort_unstable();
            let mut msg = format!("no VM called '{vm}' on {}", server.host);
            if known.is_empty() {
                msg.push_str("; no VMs are known");
            } else {
                msg.push_str("; known VMs:");
                for name in known {
                    msg.push('\n');
                    msg.push_str(name);
                }
            }
            failure(EXIT_ERROR, msg)
        }
        ("lock_failed", Some(mode)) => failure(
            EXIT_LOCK,
            format!("cannot get a {} lock on {vm}: {error}", mode.name()),
        ),
        _ => failure(EXIT_ERROR, format!("the server said: {error}")),
    }
}

/// Whether the answer says `"ok": true`.
pub(crate) fn is_ok(answer: &Value) -> bool {
    answer.get("ok").and_then(Value::as_bool) == Some(true)
}
