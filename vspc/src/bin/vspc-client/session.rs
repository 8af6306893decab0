//! The console session: after `connect VM MODE` is accepted, the admin
//! connection is a telnet console. This module bridges it to stdin and
//! stdout: it decodes the server's telnet (`vspc_codec::wire`), answers its
//! negotiation, escapes keyboard input, runs the escape menu at Ctrl-], and
//! decides how the session ends and with which exit status.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use vspc_codec::wire::{encode, opt, Decoder, Event, Negotiator, OptionSet};
use vspc_codec::words::shell_quote;

use crate::admin::{is_ok, refused, Server};
use crate::cli::LockMode;
use crate::input::spawn_stdin_reader;
use crate::menu::{Choice, Menu, ESCAPE};
use crate::outgoing::Outgoing;
use crate::output::{failure, say, write_stdout, Failure, EXIT_ERROR};
use crate::signals::Signals;
use crate::terminal::Terminal;

/// After we stop sending, how long to wait for queued input to go out and
/// for the server to close its side.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Options we perform when the server asks (DO).
const LOCAL_OK: OptionSet = OptionSet::of(&[opt::BINARY, opt::SGA]);
/// Options we let the server perform (WILL).
const REMOTE_OK: OptionSet = OptionSet::of(&[opt::BINARY, opt::SGA, opt::ECHO]);

/// Open `vm`'s console with lock `mode` and run it until it ends; the exit
/// status.
pub(crate) async fn console(
    server: &Server,
    vm: &str,
    mode: LockMode,
    term: &mut Terminal,
) -> Result<u8, Failure> {
    let command = format!("connect {} {}", shell_quote(vm), mode.name());
    let (sock, answer, leftover) = server.ask(&command).await?;
    if !is_ok(&answer) {
        return Err(refused(server, vm, Some(mode), &answer));
    }
    let name = answer
        .get("vm")
        .and_then(|v| v.get("name"))
        .and_then(Value::as_str)
        .unwrap_or(vm);
    if answer.get("mode").and_then(Value::as_str) == Some("read-only") {
        say(&format!(
            "vspc-client: someone holds a write lock on {name}; this session is read-only (your input is discarded)\n"
        ));
    }
    let mut signals =
        Signals::new().map_err(|e| failure(EXIT_ERROR, format!("cannot catch signals: {e}")))?;
    let stdin = spawn_stdin_reader(term.shared())
        .map_err(|e| failure(EXIT_ERROR, format!("cannot read stdin: {e}")))?;
    let escape = term.is_tty().then_some(ESCAPE);
    term.raw()?;
    let (rd, wr) = sock.into_split();
    let mut session = Session::new(rd, wr, stdin, term, escape, server.addr());
    let end = session.run(&leftover, &mut signals).await;
    let end = match end {
        Ok(end) => end,
        Err(f) => {
            session.term.restore();
            return Err(f);
        }
    };
    match end {
        End::ServerClosed => {
            session.term.restore();
            say("\r\nvspc-client: connection closed by the server\n");
            Ok(0)
        }
        End::StdinClosed => {
            session.finish(true).await;
            session.term.restore();
            Ok(0)
        }
        End::Quit => {
            session.finish(false).await;
            session.term.restore();
            Ok(0)
        }
        End::Signal(n, what) => {
            session.term.restore();
            say(&format!("\r\nvspc-client: {what}, leaving\n"));
            Ok(128 + n)
        }
    }
}

/// How a session ended.
enum End {
    ServerClosed,
    StdinClosed,
    Quit,
    Signal(u8, &'static str),
}

struct Session<'t> {
    rd: OwnedReadHalf,
    out: Option<Outgoing>,
    drained: Arc<Notify>,
    writer: Option<JoinHandle<std::io::Result<()>>>,
    stdin: mpsc::Receiver<Vec<u8>>,
    term: &'t mut Terminal,
    escape: Option<u8>,
    decoder: Decoder,
    neg: Negotiator,
    menu: Menu,
    addr: String,
}

impl<'t> Session<'t> {
    fn new(
        rd: OwnedReadHalf,
        wr: OwnedWriteHalf,
        stdin: mpsc::Receiver<Vec<u8>>,
        term: &'t mut Terminal,
        escape: Option<u8>,
        addr: String,
    ) -> Session<'t> {
        let (out, drained, writer) = Outgoing::start(wr);
        Session {
            rd,
            out: Some(out),
            drained,
            writer: Some(writer),
            stdin,
            term,
            escape,
            decoder: Decoder::default(),
            neg: Negotiator::new(LOCAL_OK, REMOTE_OK),
            menu: Menu::default(),
            addr,
        }
    }

    async fn run(&mut self, leftover: &[u8], signals: &mut Signals) -> Result<End, Failure> {
        self.on_server_bytes(leftover)?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let room = self.out.as_ref().is_some_and(Outgoing::has_room);
            let drained = self.drained.clone();
            let writer = &mut self.writer;
            tokio::select! {
                (n, what) = signals.recv() => return Ok(End::Signal(n, what)),
                r = self.rd.read(&mut buf) => match r {
                    Ok(0) => return Ok(End::ServerClosed),
                    Ok(n) => self.on_server_bytes(&buf[..n])?,
                    Err(e) if closed_by_peer(&e) => return Ok(End::ServerClosed),
                    Err(e) => {
                        return Err(failure(EXIT_ERROR, format!("reading from {}: {e}", self.addr)))
                    }
                },
                chunk = self.stdin.recv(), if room => match chunk {
                    None => return Ok(End::StdinClosed),
                    Some(chunk) => match self.on_user_input(chunk, signals).await? {
                        Some(Choice::Quit) => return Ok(End::Quit),
                        Some(Choice::Signal(n, what)) => return Ok(End::Signal(n, what)),
                        _ => {}
                    },
                },
                _ = drained.notified(), if !room => {}
                r = async {
                    match writer.as_mut() {
                        Some(w) => w.await,
                        None => std::future::pending().await,
                    }
                } => {
                    self.writer = None;
                    return match r {
                        Ok(Ok(())) => Ok(End::ServerClosed),
                        Ok(Err(e)) if closed_by_peer(&e) => Ok(End::ServerClosed),
                        Ok(Err(e)) => Err(failure(EXIT_ERROR, format!("writing to {}: {e}", self.addr))),
                        Err(e) => Err(failure(EXIT_ERROR, format!("the writer task failed: {e}"))),
                    };
                }
            }
        }
    }

    /// Decode what the server sent: data to stdout, negotiation answered.
    fn on_server_bytes(&mut self, bytes: &[u8]) -> Result<(), Failure> {
        let mut data: Vec<u8> = Vec::new();
        let mut replies: Vec<u8> = Vec::new();
        let neg = &mut self.neg;
        self.decoder
            .decode(bytes, |ev| match ev {
                Event::Data(d) => data.extend_from_slice(d),
                Event::Negotiate(verb, option) => {
                    neg.receive(verb, option, &mut replies);
                }
                Event::Subneg { .. } | Event::Command(_) | Event::Malformed(_) => {}
            })
            .map_err(|e| failure(EXIT_ERROR, format!("bad telnet from {}: {e}", self.addr)))?;
        if let Some(out) = &self.out {
            out.send(replies);
        }
        if !data.is_empty() {
            write_stdout(&data)?;
        }
        Ok(())
    }

    /// Keyboard input to the server, with IAC doubled.
    fn send_data(&self, bytes: &[u8]) {
        if let (Some(out), false) = (&self.out, bytes.is_empty()) {
            out.send(encode::escaped(bytes));
        }
    }

    /// Send `chunk`, running the menu at each escape character in it.
    async fn on_user_input(
        &mut self,
        chunk: Vec<u8>,
        signals: &mut Signals,
    ) -> Result<Option<Choice>, Failure> {
        let mut work = VecDeque::from([chunk]);
        while let Some(chunk) = work.pop_front() {
            let mut rest: &[u8] = &chunk;
            loop {
                let at = self.escape.and_then(|esc| memchr::memchr(esc, rest));
                let Some(at) = at else {
                    self.send_data(rest);
                    break;
                };
                self.send_data(&rest[..at]);
                match self
                    .menu
                    .prompt(self.term, &mut self.stdin, signals)
                    .await?
                {
                    Choice::Continue => {}
                    Choice::SendEscape => self.send_data(&[ESCAPE]),
                    other => return Ok(Some(other)),
                }
                let typed_ahead = self.menu.take_typed_ahead();
                if !typed_ahead.is_empty() {
                    work.push_back(typed_ahead);
                }
                rest = &rest[at + 1..];
            }
        }
        Ok(None)
    }

    /// End a session we are leaving: let queued input reach the server,
    /// close our sending side, and read until the server closes (so nothing
    /// unread makes our close a reset); `print` shows that last output.
    async fn finish(&mut self, print: bool) {
        self.out = None;
        let writer = self.writer.take();
        let mut buf = vec![0u8; 64 * 1024];
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            if let Some(w) = writer {
                let _ = w.await;
            }
            loop {
                match self.rd.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) if print => {
                        if self.on_server_bytes(&buf[..n]).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
}

/// Errors that mean the server went away rather than something broke here.
fn closed_by_peer(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
    )
}
