//! The simulated console user ([`SimConsole`]): a telnet client on a VM's
//! console port.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, ToSocketAddrs};

use vspc_codec::wire::{encode, opt, Event, Negotiator, OptionSet, Verb};

use super::link::*;
use super::*;

/// Knobs for a simulated console user.
#[derive(Debug, Clone)]
pub struct ConsoleOptions {
    /// Accept BINARY in both directions. With false, BINARY is refused both
    /// ways and the user speaks NVT: [`SimConsole::send`] turns a CR not
    /// followed by LF into CR NUL.
    pub binary: bool,
    /// Limit for the negotiation wait in [`SimConsole::connect`].
    pub timeout: Duration,
    /// Send our own requests as soon as the connection exists, as PuTTY
    /// does (DO ECHO, DO SGA, and with `binary` WILL and DO BINARY), so
    /// the daemon knows at once that this is a telnet client. With false
    /// the user says nothing until the daemon negotiates, as inetutils
    /// telnet given a port number does (the daemon then waits its
    /// detection window before offering telnet).
    pub speak_first: bool,
}

impl Default for ConsoleOptions {
    fn default() -> Self {
        ConsoleOptions {
            binary: true,
            timeout: DEFAULT_TIMEOUT,
            speak_first: true,
        }
    }
}

/// The option negotiation of a simulated console user, for code that
/// reads a console port itself but must answer the server as
/// [`SimConsole`] does: it performs BINARY (with `binary`) and SGA, and
/// lets the server perform BINARY (with `binary`), SGA and ECHO; anything
/// else is refused.
pub fn console_negotiator(binary: bool) -> Negotiator {
    use opt::*;
    if binary {
        Negotiator::new(
            OptionSet::of(&[BINARY, SGA]),
            OptionSet::of(&[BINARY, SGA, ECHO]),
        )
    } else {
        Negotiator::new(OptionSet::of(&[SGA]), OptionSet::of(&[SGA, ECHO]))
    }
}

struct ConsoleBrain {
    neg: Negotiator,
    /// See [`ConsoleOptions::speak_first`]; with `binary` as well.
    first_words: Option<bool>,
}

impl Brain for ConsoleBrain {
    fn start(&mut self, out: &mut Vec<u8>) {
        let Some(binary) = self.first_words else {
            return;
        };
        if binary {
            self.neg.enable_local(opt::BINARY, out);
            self.neg.enable_remote(opt::BINARY, out);
        }
        self.neg.enable_remote(opt::ECHO, out);
        self.neg.enable_remote(opt::SGA, out);
    }

    fn on_event(&mut self, ev: &Event<'_>, out: &mut Vec<u8>) {
        if let Event::Negotiate(verb, option) = *ev {
            self.neg.receive(verb, option, out);
        }
    }

    fn local_binary(&self) -> bool {
        self.neg.local(opt::BINARY)
    }
}

/// A telnet user on a VM's console port.
///
/// Received data is IAC-unescaped only; NVT sequences (CR NUL) are left as
/// they came, so tests can check them.
pub struct SimConsole {
    pub(super) link: Link,
}

impl SimConsole {
    /// Connect, accepting BINARY, SGA and ECHO, and wait until the server's
    /// WILL BINARY and DO BINARY have been answered (or it closed).
    pub async fn connect(addr: impl ToSocketAddrs) -> Result<SimConsole> {
        SimConsole::connect_with(addr, &ConsoleOptions::default()).await
    }

    /// [`SimConsole::connect`] with options.
    pub async fn connect_with(
        addr: impl ToSocketAddrs,
        opts: &ConsoleOptions,
    ) -> Result<SimConsole> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let console = SimConsole::start(stream, opts);
        console.wait_negotiated(opts.timeout).await?;
        Ok(console)
    }

    /// Run the user over an already connected stream without waiting.
    /// Must be called inside a tokio runtime.
    pub fn start<S>(stream: S, opts: &ConsoleOptions) -> SimConsole
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        SimConsole {
            link: Link::start(
                stream,
                ConsoleBrain {
                    neg: console_negotiator(opts.binary),
                    first_words: opts.speak_first.then_some(opts.binary),
                },
            ),
        }
    }

    /// Wait until the server has sent both WILL BINARY and DO BINARY (so
    /// both are answered), or has closed the connection.
    pub async fn wait_negotiated(&self, timeout: Duration) -> Result<()> {
        let will = Received::Negotiate(Verb::Will, opt::BINARY);
        let doo = Received::Negotiate(Verb::Do, opt::BINARY);
        self.link
            .wait_until(timeout, "the server's BINARY negotiation", |inbox| {
                let done = inbox.events.contains(&will) && inbox.events.contains(&doo);
                (done || inbox.end.is_some()).then_some(Ok(()))
            })
            .await
    }

    /// Whether we send in BINARY mode (the server said DO BINARY and we
    /// agreed).
    pub fn binary(&self) -> bool {
        self.link.shared.lock().local_binary
    }

    /// Type `data`: IAC doubled, and in NVT mode a CR not followed by LF
    /// sent as CR NUL.
    pub async fn send(&self, data: &[u8]) -> Result<()> {
        let bytes = if self.binary() {
            encode::escaped(data)
        } else {
            let mut out = Vec::with_capacity(data.len() + 8);
            for (i, &b) in data.iter().enumerate() {
                out.push(b);
                match b {
                    0xFF => out.push(0xFF),
                    b'\r' if data.get(i + 1) != Some(&b'\n') => out.push(0),
                    _ => {}
                }
            }
            out
        };
        self.link.write(bytes).await
    }

    /// Send bytes exactly as given.
    pub async fn send_raw(&self, bytes: &[u8]) -> Result<()> {
        self.link.write(bytes.to_vec()).await
    }

    /// Everything buffered, after waiting up to `wait` for at least one
    /// byte. Empty if nothing came.
    pub async fn recv_data(&self, wait: Duration) -> Vec<u8> {
        self.link.recv_data(wait).await
    }

    /// Exactly `n` data bytes.
    pub async fn read_exact_data(&self, n: usize, timeout: Duration) -> Result<Vec<u8>> {
        self.link.read_exact_data(n, timeout).await
    }

    /// Data up to and including the first occurrence of `pattern`.
    pub async fn read_until(&self, pattern: &[u8], timeout: Duration) -> Result<Vec<u8>> {
        self.link.read_until(pattern, timeout).await
    }

    /// Everything until the server closes or `timeout` passes; the flag says
    /// whether it closed (EOF or a reset).
    pub async fn read_to_end(&self, timeout: Duration) -> (Vec<u8>, bool) {
        self.link.read_to_end(timeout).await
    }

    /// Every command the server sent so far, in order.
    pub fn events(&self) -> Vec<Received> {
        self.link.events()
    }

    /// Panic, naming `who`, if the server sent any command but option
    /// negotiation (a relayed or fanned-out console must see nothing
    /// else).
    pub fn assert_only_negotiation(&self, who: &str) {
        let odd: Vec<Received> = self
            .events()
            .into_iter()
            .filter(|e| !matches!(e, Received::Negotiate(..)))
            .collect();
        assert!(
            odd.is_empty(),
            "{who} got commands: {}",
            crate::raw::describe_all(&odd)
        );
    }

    /// Why the server side ended, once it has.
    pub fn closed(&self) -> Option<String> {
        self.link.end_reason()
    }

    /// Deliver what is queued, then close the connection.
    pub async fn close(self) {
        self.link.close().await;
    }

    /// Stop simulating and take the connection back, for raw I/O after the
    /// negotiation; see [`SimVm::into_raw`]. [`RawConn::binary`] says
    /// whether input must follow NVT rules.
    pub async fn into_raw<S>(self) -> Result<RawConn<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.link.detach().await
    }
}
