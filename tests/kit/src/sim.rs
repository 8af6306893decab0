//! Simulated peers of the proxy, for tests, examples and load tools: an ESXi
//! serial-port connection ([`SimVm`]) and a telnet user on a VM's console
//! port ([`SimConsole`]).
//!
//! Each simulated peer owns two tasks. A reader task decodes everything the
//! proxy sends with [`Decoder`], answers option negotiation the way the real
//! peer does (RFC 1143, via [`Negotiator`]), answers the proxy's questions,
//! records every command in an event log ([`Received`]) and buffers every data
//! byte, so nothing is lost between calls. A writer task sends, in call order;
//! every call (and every automatic answer) is one `write_all`, so bytes built
//! in one call leave in one write, as ESXi's do. Every wait takes a timeout,
//! and nothing the peer sends can make this module panic.
//!
//! Dropping a [`SimVm`] or [`SimConsole`] stops both tasks and closes the
//! connection at once; [`SimVm::close`] / [`SimConsole::close`] first deliver
//! what was queued and then shut the write side down.

use std::any::Any;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use vspc_codec::vmware::Msg;
use vspc_codec::wire::{
    encode, opt, DecodeError, Decoder, Event, Malformed, Negotiator, OptionSet, Verb,
};

/// The suboption list ESXi sends in KNOWN-SUBOPTIONS-1, in ESXi's order
/// (`tests/captures/stream0.txt`; note `50 51 54 55 56 57 52 53`).
pub const ESXI_KNOWN_SUBOPTIONS: &[u8] = &[
    0x00, 0x01, 0x02, 0x03, 0x28, 0x29, 0x2b, 0x2c, 0x2d, 0x2e, 0x30, 0x46, 0x47, 0x49, 0x50, 0x51,
    0x54, 0x55, 0x56, 0x57, 0x52, 0x53,
];

/// How long a simulated VM waits for KNOWN-SUBOPTIONS-2 after option 232 is
/// on before it sends KNOWN-SUBOPTIONS-1 anyway (the spec has the VM go first).
const KS1_FALLBACK: Duration = Duration::from_millis(500);

/// Default limit for every wait of the simulated peers.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// What can go wrong with a simulated peer.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
    #[error("connection ended ({reason}) while waiting for {what}")]
    Closed { what: String, reason: String },
    #[error("the proxy answered DO-PROXY with WONT-PROXY")]
    WontProxy,
    #[error("unexpected answer from the proxy: {0}")]
    Unexpected(String),
}

pub type Result<T, E = SimError> = std::result::Result<T, E>;

/// One command the proxy sent, owned. Data bytes are not events; they go to
/// the data buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// `IAC WILL/WONT/DO/DONT option`.
    Negotiate(Verb, u8),
    /// A VMware extension (option 232) subnegotiation: the code byte, then
    /// the payload, unescaped. [`Received::msg`] decodes it.
    Vmware(Vec<u8>),
    /// A subnegotiation for any other option (payload unescaped).
    Subneg { option: u8, payload: Vec<u8> },
    /// Any other two-byte command (`IAC NOP`, `IAC GA`, ...).
    Command(u8),
    /// Something malformed the decoder recovered from.
    Malformed(Malformed),
}

impl Received {
    /// The owned form of a decoder event; `None` for data.
    pub fn from_event(ev: &Event<'_>) -> Option<Received> {
        Some(match *ev {
            Event::Data(_) => return None,
            Event::Negotiate(verb, option) => Received::Negotiate(verb, option),
            Event::Subneg {
                option: opt::VMWARE_EXT,
                payload,
            } => Received::Vmware(payload.to_vec()),
            Event::Subneg { option, payload } => Received::Subneg {
                option,
                payload: payload.to_vec(),
            },
            Event::Command(c) => Received::Command(c),
            Event::Malformed(m) => Received::Malformed(m),
        })
    }

    /// The VMware message, if this is a well-formed one.
    pub fn msg(&self) -> Option<Msg<'_>> {
        match self {
            Received::Vmware(body) => Msg::decode(body).ok(),
            _ => None,
        }
    }
}

/// Decode a complete byte stream into its commands and its data (for
/// comparing transcripts). Use one call per direction of one connection.
pub fn decode_events(bytes: &[u8]) -> Result<(Vec<Received>, Vec<u8>), DecodeError> {
    let mut dec = Decoder::default();
    let mut events = Vec::new();
    let mut data = Vec::new();
    dec.decode(bytes, |ev| match ev {
        Event::Data(d) => data.extend_from_slice(d),
        other => events.extend(Received::from_event(&other)),
    })?;
    Ok((events, data))
}

/// Lowercase hex of `bytes`, for messages.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The `streamN.txt` capture fixtures: one line per TCP segment,
/// `vm> <hex>` or `<vspc <hex>`.
pub mod capture {
    /// One TCP segment of a capture.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Segment {
        /// True for `vm>` (VM to proxy), false for `<vspc`.
        pub from_vm: bool,
        /// The raw payload, IAC escaping included.
        pub bytes: Vec<u8>,
    }

    /// Parse a fixture. Blank lines and lines starting with `#` are skipped.
    pub fn parse(text: &str) -> Result<Vec<Segment>, String> {
        let mut out = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (from_vm, hex) = if let Some(rest) = line.strip_prefix("vm>") {
                (true, rest.trim())
            } else if let Some(rest) = line.strip_prefix("<vspc") {
                (false, rest.trim())
            } else {
                return Err(format!("line {}: no `vm>` or `<vspc` prefix", n + 1));
            };
            let bytes = unhex(hex).ok_or_else(|| format!("line {}: bad hex", n + 1))?;
            out.push(Segment { from_vm, bytes });
        }
        Ok(out)
    }

    /// Decode lowercase or uppercase hex without separators.
    pub fn unhex(s: &str) -> Option<Vec<u8>> {
        let pairs = s.as_bytes().chunks_exact(2);
        if !pairs.remainder().is_empty() {
            return None;
        }
        let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        pairs
            .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
            .collect()
    }
}

/// Who a simulated VM is: what it answers to GET-VM-VC-UUID and GET-VM-NAME
/// and what it puts in DO-PROXY.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The VC UUID, sent as ESXi's text (`01 23 ... ef-fe ... 00`).
    pub uuid: [u8; 16],
    /// The VM display name (VM-NAME).
    pub name: String,
    /// The port's serviceURI (DO-PROXY).
    pub service_uri: String,
    /// The DO-PROXY direction byte, `b'S'` or `b'C'`.
    pub direction: u8,
}

impl Identity {
    /// The VM of the capture: `01 23 45 67 89 ab cd ef-fe dc ba 98 00 00 00
    /// 00`, `vm-00000`, `vSPC.py`, `S`.
    pub fn capture() -> Identity {
        Identity {
            uuid: [
                0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0xfe, 0xdc, 0xba, 0x98, 0, 0, 0, 0,
            ],
            name: "vm-00000".into(),
            service_uri: "vSPC.py".into(),
            direction: b'S',
        }
    }

    /// A distinct identity for each `index`: uuid `42 1f 5e 7a <index BE>
    /// <8 mixed bytes>`, name `sim-vm-<index>`, uri `vSPC.py`, direction S.
    pub fn numbered(index: u32) -> Identity {
        let mut uuid = [0u8; 16];
        uuid[..4].copy_from_slice(&[0x42, 0x1f, 0x5e, 0x7a]);
        uuid[4..8].copy_from_slice(&index.to_be_bytes());
        uuid[8..].copy_from_slice(&splitmix64(u64::from(index)).to_be_bytes());
        Identity {
            uuid,
            name: format!("sim-vm-{index:05}"),
            service_uri: "vSPC.py".into(),
            direction: b'S',
        }
    }

    /// The same identity with another serviceURI.
    pub fn with_uri(mut self, uri: &str) -> Identity {
        self.service_uri = uri.into();
        self
    }

    /// The same identity with another DO-PROXY direction byte.
    pub fn with_direction(mut self, direction: u8) -> Identity {
        self.direction = direction;
        self
    }

    /// ESXi's VM-VC-UUID text: 16 lowercase hex pairs separated by spaces,
    /// with `-` instead of the space after the 8th.
    pub fn uuid_text(&self) -> String {
        let mut s = String::with_capacity(47);
        for (i, b) in self.uuid.iter().enumerate() {
            if i == 8 {
                s.push('-');
            } else if i > 0 {
                s.push(' ');
            }
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// vSPC.py's display form, as the admin listing shows it:
    /// `0123456789abcdef-fedcba9800000000`.
    pub fn uuid_display(&self) -> String {
        format!("{}-{}", hex(&self.uuid[..8]), hex(&self.uuid[8..]))
    }
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

// ---------------------------------------------------------------------------
// The shared machinery: a reader task, a writer task, an inbox.

/// What the reader task has collected.
#[derive(Default)]
struct Inbox {
    /// Data bytes not yet taken by a read call (IAC unescaped).
    data: BytesMut,
    /// Every command received, in order; never trimmed.
    events: Vec<Received>,
    /// When the read that carried each of `events` returned (timing hooks).
    event_at: Vec<Instant>,
    /// Why the reader stopped (peer closed, read error, decode error).
    end: Option<String>,
    /// Whether we currently send in BINARY mode (consoles only).
    local_binary: bool,
}

#[derive(Default)]
struct Shared {
    inbox: Mutex<Inbox>,
    /// Woken after every batch the reader adds, and when it stops.
    notify: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inbox> {
        // A panic while holding the lock cannot leave the inbox inconsistent
        // (every update is a plain append), so a poisoned lock is still usable.
        self.inbox.lock().unwrap_or_else(|e| e.into_inner())
    }
}

enum WriteCmd {
    /// Bytes to write in one `write_all`; the sender, if any, learns the result.
    Bytes(Vec<u8>, Option<oneshot::Sender<io::Result<()>>>),
    /// Shut the write side down (after everything queued before it).
    Shutdown(oneshot::Sender<()>),
    /// Stop (after everything queued before it) and hand the write half
    /// back, boxed ([`Link::detach`]).
    Detach(oneshot::Sender<Box<dyn Any + Send>>),
}

/// A request to the reader task to stop and hand back its read half and
/// decoder, boxed as `(R, Decoder)` ([`Link::detach`]).
type DetachRequest = oneshot::Sender<Box<dyn Any + Send>>;

/// The role-specific reactions of a simulated peer.
trait Brain: Send + 'static {
    /// Bytes to send as soon as the connection exists.
    fn start(&mut self, out: &mut Vec<u8>);
    /// React to one non-data event; answers go to `out`.
    fn on_event(&mut self, ev: &Event<'_>, out: &mut Vec<u8>);
    /// When [`Brain::on_deadline`] should run, if ever.
    fn deadline(&self) -> Option<Instant> {
        None
    }
    fn on_deadline(&mut self, _out: &mut Vec<u8>) {}
    /// Whether we now send in BINARY mode.
    fn local_binary(&self) -> bool {
        false
    }
}

/// One connection: the two tasks and the inbox they fill.
struct Link {
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<WriteCmd>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
    /// Asks the reader to stop and give its half back; taken by
    /// [`Link::detach`].
    detach: Option<oneshot::Sender<DetachRequest>>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

fn queue(tx: &mpsc::UnboundedSender<WriteCmd>, out: &mut Vec<u8>) {
    if !out.is_empty() {
        // If the writer is gone the connection is dead; the reader notices.
        let _ = tx.send(WriteCmd::Bytes(std::mem::take(out), None));
    }
}

async fn write_loop<W: AsyncWrite + Unpin + Send + 'static>(
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<WriteCmd>,
) {
    // After the first failure every later write fails the same way.
    let mut failed: Option<(io::ErrorKind, String)> = None;
    while let Some(cmd) = rx.recv().await {
        match cmd {
            WriteCmd::Bytes(bytes, ack) => {
                let res = match &failed {
                    Some((kind, msg)) => Err(io::Error::new(*kind, msg.clone())),
                    None => {
                        let res = match wr.write_all(&bytes).await {
                            Ok(()) => wr.flush().await,
                            Err(e) => Err(e),
                        };
                        if let Err(e) = &res {
                            failed = Some((e.kind(), e.to_string()));
                        }
                        res
                    }
                };
                if let Some(ack) = ack {
                    let _ = ack.send(res);
                }
            }
            WriteCmd::Shutdown(ack) => {
                if failed.is_none() {
                    let _ = wr.shutdown().await;
                    failed = Some((io::ErrorKind::NotConnected, "write side shut down".into()));
                }
                let _ = ack.send(());
            }
            WriteCmd::Detach(reply) => {
                let _ = reply.send(Box::new(wr));
                return;
            }
        }
    }
}

/// What woke the reader task.
enum Wake {
    Read(io::Result<usize>),
    Deadline,
    Detach(DetachRequest),
    /// The detach sender is gone (the link is being dropped or closed).
    NoDetach,
}

async fn read_loop<R: AsyncRead + Unpin + Send + 'static, B: Brain>(
    mut rd: R,
    mut brain: B,
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<WriteCmd>,
    mut detach: oneshot::Receiver<DetachRequest>,
) {
    let mut detach_armed = true;
    let mut dec = Decoder::default();
    let mut buf = vec![0u8; 8 * 1024];
    let mut out = Vec::new();
    brain.start(&mut out);
    queue(&tx, &mut out);
    shared.lock().local_binary = brain.local_binary();
    let end = loop {
        let deadline = brain.deadline();
        // A disabled branch's future is still built, so it needs some instant.
        let at = deadline.unwrap_or_else(Instant::now);
        let wake = tokio::select! {
            r = rd.read(&mut buf) => Wake::Read(r),
            _ = tokio::time::sleep_until(at), if deadline.is_some() => Wake::Deadline,
            req = &mut detach, if detach_armed => match req {
                Ok(reply) => Wake::Detach(reply),
                Err(_) => Wake::NoDetach,
            },
        };
        let read_at = Instant::now();
        let n = match wake {
            Wake::Deadline => {
                brain.on_deadline(&mut out);
                queue(&tx, &mut out);
                continue;
            }
            Wake::NoDetach => {
                detach_armed = false;
                continue;
            }
            Wake::Detach(reply) => {
                // Every read so far is decoded and in the inbox; a command
                // split across reads is still in the decoder, which goes too.
                let _ = reply.send(Box::new((rd, dec)));
                return;
            }
            Wake::Read(Ok(0)) => break "closed by the peer".to_string(),
            Wake::Read(Ok(n)) => n,
            Wake::Read(Err(e)) => break format!("read error: {e}"),
        };
        let mut data = Vec::new();
        let mut events = Vec::new();
        let res = dec.decode(&buf[..n], |ev| {
            if let Event::Data(d) = ev {
                data.extend_from_slice(d);
                return;
            }
            brain.on_event(&ev, &mut out);
            // One reaction, one write.
            queue(&tx, &mut out);
            events.extend(Received::from_event(&ev));
        });
        {
            let mut inbox = shared.lock();
            inbox.data.extend_from_slice(&data);
            let read = inbox.event_at.len() + events.len();
            inbox.event_at.resize(read, read_at);
            inbox.events.append(&mut events);
            inbox.local_binary = brain.local_binary();
        }
        shared.notify.notify_waiters();
        if let Err(e) = res {
            break format!("telnet decode error: {e}");
        }
    };
    shared.lock().end = Some(end);
    shared.notify.notify_waiters();
}

impl Link {
    fn start<S, B>(stream: S, brain: B) -> Link
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
        B: Brain,
    {
        let (rd, wr) = tokio::io::split(stream);
        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::unbounded_channel();
        let (detach, detach_rx) = oneshot::channel();
        let writer = tokio::spawn(write_loop(wr, rx));
        let reader = tokio::spawn(read_loop(rd, brain, shared.clone(), tx.clone(), detach_rx));
        Link {
            shared,
            tx,
            reader,
            writer,
            detach: Some(detach),
        }
    }

    /// Stop both tasks and take the stream back: the reader stops between
    /// reads (after the reactions to everything it read are queued), then
    /// the writer after writing everything queued. `S` must be the type the
    /// link was started with.
    async fn detach<S>(mut self) -> Result<RawConn<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let what = "the simulation to hand the stream back";
        let closed = |link: &Link| SimError::Closed {
            what: what.into(),
            reason: link
                .end_reason()
                .unwrap_or_else(|| "the simulation's task has stopped".into()),
        };
        let timeout = |_| SimError::Timeout {
            what: what.into(),
            after: DEFAULT_TIMEOUT,
        };
        let wrong_type = || {
            SimError::Unexpected(format!(
                "into_raw::<{}>() on a connection started with another stream type",
                std::any::type_name::<S>()
            ))
        };
        let (reply, parts) = oneshot::channel();
        let sent = self.detach.take().map(|d| d.send(reply).is_ok());
        if sent != Some(true) {
            return Err(closed(&self));
        }
        let read_parts = match tokio::time::timeout(DEFAULT_TIMEOUT, parts).await {
            Ok(Ok(parts)) => parts,
            Ok(Err(_)) => return Err(closed(&self)),
            Err(e) => return Err(timeout(e)),
        };
        let (reply, parts) = oneshot::channel();
        if self.tx.send(WriteCmd::Detach(reply)).is_err() {
            return Err(closed(&self));
        }
        let write_half = match tokio::time::timeout(DEFAULT_TIMEOUT, parts).await {
            Ok(Ok(parts)) => parts,
            Ok(Err(_)) => return Err(closed(&self)),
            Err(e) => return Err(timeout(e)),
        };
        let (rd, decoder) = *read_parts
            .downcast::<(ReadHalf<S>, Decoder)>()
            .map_err(|_| wrong_type())?;
        let wr = *write_half
            .downcast::<WriteHalf<S>>()
            .map_err(|_| wrong_type())?;
        let mut inbox = self.shared.lock();
        Ok(RawConn {
            stream: rd.unsplit(wr),
            data: inbox.data.split().to_vec(),
            decoder,
            events: {
                inbox.event_at.clear();
                std::mem::take(&mut inbox.events)
            },
            binary: inbox.local_binary,
        })
    }

    /// Write `bytes` in one `write_all` after everything queued before;
    /// returns once they are written.
    async fn write(&self, bytes: Vec<u8>) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let gone = || io::Error::new(io::ErrorKind::NotConnected, "writer task has stopped");
        let (ack, done) = oneshot::channel();
        self.tx
            .send(WriteCmd::Bytes(bytes, Some(ack)))
            .map_err(|_| gone())?;
        done.await.map_err(|_| gone())??;
        Ok(())
    }

    /// Deliver what is queued, shut the write side down, stop reading.
    async fn close(&self) {
        let (ack, done) = oneshot::channel();
        if self.tx.send(WriteCmd::Shutdown(ack)).is_ok() {
            let _ = tokio::time::timeout(DEFAULT_TIMEOUT, done).await;
        }
        self.reader.abort();
        self.writer.abort();
    }

    /// Deliver what is queued and shut the write side down; reading goes on.
    async fn shutdown_write(&self) {
        let (ack, done) = oneshot::channel();
        if self.tx.send(WriteCmd::Shutdown(ack)).is_ok() {
            let _ = tokio::time::timeout(DEFAULT_TIMEOUT, done).await;
        }
    }

    /// Wait until `check` gives an answer, re-checking after every batch the
    /// reader adds. `check` sees the inbox (including `end`) and decides.
    async fn wait_until<T>(
        &self,
        timeout: Duration,
        what: &str,
        mut check: impl FnMut(&mut Inbox) -> Option<Result<T>>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(res) = check(&mut self.shared.lock()) {
                return res;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let inbox = self.shared.lock();
                if let Some(res) = check_end(&inbox, what) {
                    return res;
                }
                return Err(SimError::Timeout {
                    what: format!("{what} ({} data bytes buffered)", inbox.data.len()),
                    after: timeout,
                });
            }
        }
    }

    fn event_count(&self) -> usize {
        self.shared.lock().events.len()
    }

    fn events(&self) -> Vec<Received> {
        self.shared.lock().events.clone()
    }

    fn event_at(&self, index: usize) -> Option<Instant> {
        self.shared.lock().event_at.get(index).copied()
    }

    /// The first event at index `since` or later that matches `pred`.
    async fn wait_event(
        &self,
        since: usize,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Received) -> bool,
    ) -> Result<(usize, Received)> {
        self.wait_until(timeout, what, |inbox| {
            let found = inbox
                .events
                .iter()
                .enumerate()
                .skip(since)
                .find(|(_, e)| pred(e))
                .map(|(i, e)| (i, e.clone()));
            match found {
                Some(hit) => Some(Ok(hit)),
                None => check_end(inbox, what),
            }
        })
        .await
    }

    async fn recv_data(&self, wait: Duration) -> Vec<u8> {
        let _ = self
            .wait_until(wait, "data", |inbox| {
                (!inbox.data.is_empty() || inbox.end.is_some()).then_some(Ok(()))
            })
            .await;
        self.shared.lock().data.split().to_vec()
    }

    async fn read_exact_data(&self, n: usize, timeout: Duration) -> Result<Vec<u8>> {
        let what = format!("{n} data bytes");
        self.wait_until(timeout, &what, |inbox| {
            if inbox.data.len() >= n {
                Some(Ok(inbox.data.split_to(n).to_vec()))
            } else {
                check_end(inbox, &what)
            }
        })
        .await
    }

    async fn read_until(&self, pattern: &[u8], timeout: Duration) -> Result<Vec<u8>> {
        let what = format!("data ending in {:?}", String::from_utf8_lossy(pattern));
        self.wait_until(timeout, &what, |inbox| {
            match memchr::memmem::find(&inbox.data, pattern) {
                Some(at) => Some(Ok(inbox.data.split_to(at + pattern.len()).to_vec())),
                None => check_end(inbox, &what),
            }
        })
        .await
    }

    async fn read_to_end(&self, timeout: Duration) -> (Vec<u8>, bool) {
        let _ = self
            .wait_until(timeout, "end of stream", |inbox| {
                inbox.end.is_some().then_some(Ok(()))
            })
            .await;
        let mut inbox = self.shared.lock();
        (inbox.data.split().to_vec(), inbox.end.is_some())
    }

    fn end_reason(&self) -> Option<String> {
        self.shared.lock().end.clone()
    }
}

/// `Some(Err(Closed))` once the reader has stopped.
fn check_end<T>(inbox: &Inbox, what: &str) -> Option<Result<T>> {
    inbox.end.as_ref().map(|reason| {
        Err(SimError::Closed {
            what: format!("{what} ({} data bytes buffered)", inbox.data.len()),
            reason: reason.clone(),
        })
    })
}

/// A connection taken out of the simulation after its handshake
/// ([`SimVm::into_raw`], [`SimConsole::into_raw`]), for raw high-rate I/O:
/// the caller now reads and writes the telnet stream itself.
#[derive(Debug)]
pub struct RawConn<S> {
    /// The stream, positioned after everything the simulation read and
    /// wrote.
    pub stream: S,
    /// Data bytes received but not taken by any read call (IAC unescaped);
    /// they come before whatever `stream` yields next.
    pub data: Vec<u8>,
    /// The telnet decoder to go on with: a command may have been split
    /// across the last read.
    pub decoder: Decoder,
    /// Every command received, in order.
    pub events: Vec<Received>,
    /// Whether we send in BINARY mode (a console that agreed to DO BINARY;
    /// always false for a VM). Without it, a CR not followed by LF must
    /// be sent as CR NUL.
    pub binary: bool,
}

// ---------------------------------------------------------------------------
// The simulated ESXi connection.

/// What a simulated VM connection is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// A normal (power-on) connection: sends DO-PROXY, ready at WILL-PROXY.
    Source,
    /// A vMotion destination: sends VMOTION-PEER with this cookie
    /// (sequence ‖ secret from GOAHEAD) and no DO-PROXY; ready at PEER-OK.
    Destination { cookie: Vec<u8> },
}

/// Knobs for a simulated VM.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// Limit for the handshake wait and for waiting on vMotion replies.
    pub timeout: Duration,
    /// Answer GET-VM-NAME (false simulates a VM whose name never comes).
    pub answer_name: bool,
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            timeout: DEFAULT_TIMEOUT,
            answer_name: true,
        }
    }
}

/// The proxy's answer to VMOTION-BEGIN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmotionReply {
    /// VMOTION-GOAHEAD: `cookie` is sequence ‖ secret, for the destination.
    GoAhead { cookie: Vec<u8> },
    /// VMOTION-NOTNOW.
    NotNow,
}

/// ESXi's side of the handshake (vspc/PROTOCOL.md §4 and §5).
struct VmBrain {
    id: Identity,
    role: Role,
    answer_name: bool,
    neg: Negotiator,
    /// The proxy has answered our WILL AUTHENTICATION.
    auth_answered: bool,
    /// DO VMWARE-EXT arrived before that answer; ESXi holds it.
    ext_deferred: bool,
    /// We perform option 232.
    ext_on: bool,
    ks1_sent: bool,
    ks1_deadline: Option<Instant>,
    com_port_offered: bool,
    /// When VMOTION-PEER was queued (a destination), for [`SimVm::peer_round_trip`].
    peer_sent: Arc<std::sync::OnceLock<Instant>>,
}

impl VmBrain {
    fn new(id: Identity, role: Role, answer_name: bool) -> VmBrain {
        use opt::*;
        VmBrain {
            id,
            role,
            answer_name,
            // We perform BINARY, SGA and 232 when asked; we let the proxy
            // perform BINARY, SGA and ECHO (as ESXi does in `tests/captures/stream0.txt`).
            neg: Negotiator::new(
                OptionSet::of(&[BINARY, SGA, VMWARE_EXT]),
                OptionSet::of(&[BINARY, SGA, ECHO]),
            ),
            auth_answered: false,
            ext_deferred: false,
            ext_on: false,
            ks1_sent: false,
            ks1_deadline: None,
            com_port_offered: false,
            peer_sent: Arc::default(),
        }
    }

    fn negotiate(&mut self, verb: Verb, option: u8, out: &mut Vec<u8>) {
        if option == opt::VMWARE_EXT && verb == Verb::Do && !self.auth_answered {
            // ESXi answers DO 232 only after its AUTH offer is answered.
            self.ext_deferred = true;
            return;
        }
        self.neg.receive(verb, option, out);
        if option == opt::AUTHENTICATION
            && matches!(verb, Verb::Do | Verb::Dont)
            && !self.auth_answered
        {
            self.auth_answered = true;
            if self.neg.local(opt::AUTHENTICATION) {
                // We do not implement SSL-in-telnet; withdraw the offer.
                self.neg.disable_local(opt::AUTHENTICATION, out);
            }
            if self.ext_deferred {
                self.neg.receive(Verb::Do, opt::VMWARE_EXT, out);
            } else {
                self.neg.enable_local(opt::VMWARE_EXT, out);
            }
        }
        if !self.ext_on && self.neg.local(opt::VMWARE_EXT) {
            self.ext_on = true;
            self.ks1_deadline = Some(Instant::now() + KS1_FALLBACK);
        }
    }

    /// KNOWN-SUBOPTIONS-1 plus DO-PROXY (source) or VMOTION-PEER and WILL
    /// COM-PORT (destination), all in one write.
    fn send_ks1(&mut self, out: &mut Vec<u8>) {
        self.ks1_sent = true;
        Msg::KnownSuboptions1(ESXI_KNOWN_SUBOPTIONS).encode(out);
        match &self.role {
            Role::Source => Msg::DoProxy {
                direction: self.id.direction,
                uri: self.id.service_uri.as_bytes(),
            }
            .encode(out),
            Role::Destination { cookie } => {
                Msg::VmotionPeer(cookie).encode(out);
                let _ = self.peer_sent.set(Instant::now());
                self.offer_com_port(out);
            }
        }
    }

    fn offer_com_port(&mut self, out: &mut Vec<u8>) {
        if !self.com_port_offered {
            self.com_port_offered = true;
            self.neg.enable_local(opt::COM_PORT, out);
        }
    }

    fn vmware(&mut self, body: &[u8], out: &mut Vec<u8>) {
        let Ok(msg) = Msg::decode(body) else {
            return;
        };
        let uuid = self.id.uuid_text();
        match msg {
            Msg::KnownSuboptions2(_) if self.ext_on && !self.ks1_sent => self.send_ks1(out),
            Msg::GetVmVcUuid => Msg::VmVcUuid(uuid.as_bytes()).encode(out),
            Msg::GetVmBiosUuid => Msg::VmBiosUuid(uuid.as_bytes()).encode(out),
            Msg::GetVmLocationUuid => Msg::VmLocationUuid(uuid.as_bytes()).encode(out),
            Msg::GetVmName if self.answer_name => Msg::VmName(self.id.name.as_bytes()).encode(out),
            Msg::WillProxy if self.role == Role::Source => self.offer_com_port(out),
            Msg::Unknown { code, .. } => Msg::UnknownSuboptionRcvd1(code).encode(out),
            _ => {}
        }
    }
}

impl Brain for VmBrain {
    fn start(&mut self, out: &mut Vec<u8>) {
        // ESXi's first bytes: IAC WILL AUTHENTICATION (the first line of `tests/captures/stream0.txt`).
        self.neg.enable_local(opt::AUTHENTICATION, out);
    }

    fn on_event(&mut self, ev: &Event<'_>, out: &mut Vec<u8>) {
        match *ev {
            Event::Negotiate(verb, option) => self.negotiate(verb, option, out),
            Event::Subneg {
                option: opt::VMWARE_EXT,
                payload,
            } => self.vmware(payload, out),
            _ => {}
        }
    }

    fn deadline(&self) -> Option<Instant> {
        if self.ks1_sent {
            None
        } else {
            self.ks1_deadline
        }
    }

    fn on_deadline(&mut self, out: &mut Vec<u8>) {
        self.ks1_deadline = None;
        if !self.ks1_sent {
            self.send_ks1(out);
        }
    }
}

/// One simulated ESXi serial-port connection to the proxy port.
///
/// The reader task keeps answering the proxy (negotiation, GET-VM-VC-UUID,
/// GET-VM-NAME) for the life of the connection, like ESXi does.
pub struct SimVm {
    link: Link,
    role: Role,
    timeout: Duration,
    peer_sent: Arc<std::sync::OnceLock<Instant>>,
}

impl SimVm {
    /// Connect as a powered-on VM and wait for WILL-PROXY.
    pub async fn connect(addr: impl ToSocketAddrs, id: &Identity) -> Result<SimVm> {
        SimVm::connect_with(addr, id, Role::Source, &VmOptions::default()).await
    }

    /// Connect as a vMotion destination presenting `cookie` and wait for
    /// PEER-OK (see [`SimVm::peer_ok`] for its payload). A wrong cookie gets
    /// silence, so this fails with [`SimError::Timeout`] after
    /// [`DEFAULT_TIMEOUT`]; use [`SimVm::connect_with`] for another limit.
    pub async fn connect_destination(
        addr: impl ToSocketAddrs,
        id: &Identity,
        cookie: &[u8],
    ) -> Result<SimVm> {
        let role = Role::Destination {
            cookie: cookie.to_vec(),
        };
        SimVm::connect_with(addr, id, role, &VmOptions::default()).await
    }

    /// Connect over TCP (TCP_NODELAY, so writes leave as separate segments)
    /// and wait until ready (see [`SimVm::wait_ready`]).
    pub async fn connect_with(
        addr: impl ToSocketAddrs,
        id: &Identity,
        role: Role,
        opts: &VmOptions,
    ) -> Result<SimVm> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let vm = SimVm::start(stream, id, role, opts);
        vm.wait_ready().await?;
        Ok(vm)
    }

    /// Run the simulation over an already connected stream (TCP, TLS, ...)
    /// without waiting for anything. Must be called inside a tokio runtime.
    pub fn start<S>(stream: S, id: &Identity, role: Role, opts: &VmOptions) -> SimVm
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let brain = VmBrain::new(id.clone(), role.clone(), opts.answer_name);
        let peer_sent = brain.peer_sent.clone();
        SimVm {
            link: Link::start(stream, brain),
            role,
            timeout: opts.timeout,
            peer_sent,
        }
    }

    /// Wait for the end of the handshake: WILL-PROXY for a source (an error
    /// for WONT-PROXY), PEER-OK for a destination (an error unless its payload
    /// is a proper prefix of the cookie, i.e. the sequence).
    pub async fn wait_ready(&self) -> Result<()> {
        match &self.role {
            Role::Source => {
                let (_, ev) = self
                    .link
                    .wait_event(0, self.timeout, "WILL-PROXY", |e| {
                        matches!(e.msg(), Some(Msg::WillProxy | Msg::WontProxy))
                    })
                    .await?;
                match ev.msg() {
                    Some(Msg::WontProxy) => Err(SimError::WontProxy),
                    _ => Ok(()),
                }
            }
            Role::Destination { cookie } => {
                let (_, ev) = self
                    .link
                    .wait_event(0, self.timeout, "VMOTION-PEER-OK", |e| {
                        matches!(e.msg(), Some(Msg::VmotionPeerOk(_)))
                    })
                    .await?;
                match ev.msg() {
                    Some(Msg::VmotionPeerOk(seq))
                        if seq.len() < cookie.len() && cookie.starts_with(seq) =>
                    {
                        Ok(())
                    }
                    other => Err(SimError::Unexpected(format!(
                        "{other:?} in answer to VMOTION-PEER {}",
                        hex(cookie)
                    ))),
                }
            }
        }
    }

    /// The payload of the first PEER-OK received, if any.
    pub fn peer_ok(&self) -> Option<Vec<u8>> {
        self.link.events().iter().find_map(|e| match e.msg() {
            Some(Msg::VmotionPeerOk(seq)) => Some(seq.to_vec()),
            _ => None,
        })
    }

    /// Send serial output (IAC doubled).
    pub async fn send(&self, data: &[u8]) -> Result<()> {
        self.link.write(encode::escaped(data)).await
    }

    /// Send bytes exactly as given.
    pub async fn send_raw(&self, bytes: &[u8]) -> Result<()> {
        self.link.write(bytes.to_vec()).await
    }

    /// Send one VMware message.
    pub async fn send_msg(&self, msg: &Msg<'_>) -> Result<()> {
        self.link.write(msg.to_bytes()).await
    }

    /// Send VMOTION-BEGIN and wait for GOAHEAD (whose payload must start
    /// with `seq`) or NOTNOW (whose payload must be `seq`).
    pub async fn begin_vmotion(&self, seq: &[u8]) -> Result<VmotionReply> {
        self.begin_vmotion_timed(seq).await.map(|(reply, _)| reply)
    }

    /// [`SimVm::begin_vmotion`], and the time from just before BEGIN was
    /// handed to the writer to the return of the read that carried the
    /// answer (not counting the wake-up of the caller).
    pub async fn begin_vmotion_timed(&self, seq: &[u8]) -> Result<(VmotionReply, Duration)> {
        let since = self.link.event_count();
        let sent = Instant::now();
        self.send_msg(&Msg::VmotionBegin(seq)).await?;
        let (index, ev) = self
            .link
            .wait_event(since, self.timeout, "VMOTION-GOAHEAD or NOTNOW", |e| {
                matches!(
                    e.msg(),
                    Some(Msg::VmotionGoahead(_) | Msg::VmotionNotNow(_))
                )
            })
            .await?;
        let took = self
            .link
            .event_at(index)
            .unwrap_or_else(Instant::now)
            .saturating_duration_since(sent);
        match ev.msg() {
            Some(Msg::VmotionGoahead(c)) if c.len() > seq.len() && c.starts_with(seq) => {
                Ok((VmotionReply::GoAhead { cookie: c.to_vec() }, took))
            }
            Some(Msg::VmotionNotNow(s)) if s == seq => Ok((VmotionReply::NotNow, took)),
            other => Err(SimError::Unexpected(format!(
                "{other:?} in answer to VMOTION-BEGIN {}",
                hex(seq)
            ))),
        }
    }

    /// On a destination that received PEER-OK: the time from queueing
    /// VMOTION-PEER to the return of the read that carried PEER-OK.
    pub fn peer_round_trip(&self) -> Option<Duration> {
        let sent = *self.peer_sent.get()?;
        let events = self.link.events();
        let index = events
            .iter()
            .position(|e| matches!(e.msg(), Some(Msg::VmotionPeerOk(_))))?;
        Some(self.link.event_at(index)?.saturating_duration_since(sent))
    }

    /// Send VMOTION-COMPLETE (on a destination).
    pub async fn complete(&self, seq: &[u8]) -> Result<()> {
        self.send_msg(&Msg::VmotionComplete(seq)).await
    }

    /// Send VMOTION-ABORT, empty as ESXi sends it (on a source).
    pub async fn abort(&self) -> Result<()> {
        self.send_msg(&Msg::VmotionAbort).await
    }

    /// Console input forwarded by the proxy: everything buffered, after
    /// waiting up to `wait` for at least one byte. Empty if nothing came.
    pub async fn recv_data(&self, wait: Duration) -> Vec<u8> {
        self.link.recv_data(wait).await
    }

    /// Exactly `n` bytes of console input.
    pub async fn read_exact_data(&self, n: usize, timeout: Duration) -> Result<Vec<u8>> {
        self.link.read_exact_data(n, timeout).await
    }

    /// Every command the proxy sent so far, in order.
    pub fn events(&self) -> Vec<Received> {
        self.link.events()
    }

    /// How many commands have arrived (an index for [`SimVm::wait_event`]).
    pub fn event_count(&self) -> usize {
        self.link.event_count()
    }

    /// The first command at index `since` or later that matches `pred`,
    /// with its index.
    pub async fn wait_event(
        &self,
        since: usize,
        timeout: Duration,
        pred: impl Fn(&Received) -> bool,
    ) -> Result<(usize, Received)> {
        self.link
            .wait_event(since, timeout, "a matching command", pred)
            .await
    }

    /// Why the proxy side ended, once it has (EOF or an error).
    pub fn closed(&self) -> Option<String> {
        self.link.end_reason()
    }

    /// Wait until the proxy closes the connection.
    pub async fn wait_closed(&self, timeout: Duration) -> Result<()> {
        let what = "the proxy to close the connection";
        self.link
            .wait_until(timeout, what, |inbox| inbox.end.is_some().then_some(Ok(())))
            .await
    }

    /// Deliver what is queued, then close the connection.
    pub async fn close(self) {
        self.link.close().await;
    }

    /// Stop simulating and take the connection back, for raw I/O after the
    /// handshake: whatever was queued is written first, and data already
    /// received comes along ([`RawConn`]). From then on nothing answers the
    /// proxy's questions. `S` is the stream type the VM was started with
    /// (`TcpStream` for the `connect*` constructors); another type is
    /// [`SimError::Unexpected`]. Fails with [`SimError::Closed`] if the
    /// connection has already ended.
    pub async fn into_raw<S>(self) -> Result<RawConn<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.link.detach().await
    }

    /// Deliver what is queued, shut the write side down (the proxy reads
    /// EOF after the last byte sent) and wait up to `timeout` for the proxy
    /// to close its side, which proves it has read everything. Console input
    /// arriving meanwhile stays readable ([`SimVm::recv_data`]).
    pub async fn hang_up(&self, timeout: Duration) -> Result<()> {
        self.link.shutdown_write().await;
        self.wait_closed(timeout).await
    }
}

// ---------------------------------------------------------------------------
// The simulated console user.

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
    link: Link,
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

// ---------------------------------------------------------------------------
// The admin port's VM listing.

/// Largest single pickle [`list_vms`] accepts from the daemon (one listing
/// row is about a hundred bytes).
const LISTING_MAX_PICKLE: usize = 64 * 1024;

/// Most rows [`list_vms`] believes the daemon when it announces a count.
const LISTING_MAX_ROWS: i64 = 1_000_000;

/// The daemon's VM listing from its admin port, asked the way vSPC.py's
/// `vSPCClient` asks with no VM name (query protocol version 3): every VM's
/// name, uuid (display form, `0123456789abcdef-fedcba9800000000`) and
/// console port (`None` without console ports), in the daemon's order.
///
/// Each step (connecting, every read, every write) waits at most
/// [`DEFAULT_TIMEOUT`] ([`io::ErrorKind::TimedOut`]); an answer that breaks
/// the protocol is [`io::ErrorKind::InvalidData`], and the daemon closing
/// early is [`io::ErrorKind::UnexpectedEof`].
pub async fn list_vms(
    admin: std::net::SocketAddr,
) -> io::Result<Vec<(String, String, Option<u16>)>> {
    use vspc_codec::pickle::Value;
    let stream = admin_step("connecting", TcpStream::connect(admin)).await?;
    stream.set_nodelay(true)?;
    let mut client = AdminClient {
        stream,
        pickles: vspc_codec::pickle::Stream::new(LISTING_MAX_PICKLE),
    };
    client.send(&[Value::Int(3)]).await?;
    match client.next().await? {
        Value::Int(v) if v >= 3 => {}
        other => {
            return Err(invalid_answer(format!(
                "the daemon offered query protocol {other:?}; version 3 is needed"
            )))
        }
    }
    let ask = [Value::None, Value::Str("free_for_all_or_readonly".into())];
    client.send(&ask).await?;
    match client.next().await? {
        Value::Str(s) if s == "vm_not_found" => {}
        other => {
            return Err(invalid_answer(format!(
                "the daemon answered a listing request with {other:?}, not 'vm_not_found'"
            )))
        }
    }
    let count = match client.next().await? {
        Value::Int(n) if (0..=LISTING_MAX_ROWS).contains(&n) => n as usize,
        other => return Err(invalid_answer(format!("listing row count {other:?}"))),
    };
    let mut rows = Vec::with_capacity(count.min(4096));
    for _ in 0..count {
        rows.push(listing_row(client.next().await?)?);
    }
    Ok(rows)
}

/// One listing row: a dict with `name`, `uuid` (strings) and `port` (an int
/// or None). Other keys are ignored.
fn listing_row(entry: vspc_codec::pickle::Value) -> io::Result<(String, String, Option<u16>)> {
    use vspc_codec::pickle::Value;
    let Value::Dict(items) = entry else {
        return Err(invalid_answer(format!(
            "listing row {entry:?} is not a dict"
        )));
    };
    let (mut name, mut uuid, mut port) = (None, None, None);
    for (key, value) in items {
        let Value::Str(key) = key else { continue };
        match (key.as_str(), value) {
            ("name", Value::Str(v)) => name = Some(v),
            ("uuid", Value::Str(v)) => uuid = Some(v),
            ("port", Value::None) => port = Some(None),
            ("port", Value::Int(p)) => match u16::try_from(p) {
                Ok(p) => port = Some(Some(p)),
                Err(_) => return Err(invalid_answer(format!("listing port {p} is out of range"))),
            },
            _ => {}
        }
    }
    match (name, uuid, port) {
        (Some(name), Some(uuid), Some(port)) => Ok((name, uuid, port)),
        (name, uuid, port) => Err(invalid_answer(format!(
            "listing row lacks a string name, a string uuid or an int/None port \
             (name {name:?}, uuid {uuid:?}, port {port:?})"
        ))),
    }
}

fn invalid_answer(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("admin port: {msg}"))
}

/// One admin-port step, limited to [`DEFAULT_TIMEOUT`].
async fn admin_step<T>(
    what: &str,
    step: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    match tokio::time::timeout(DEFAULT_TIMEOUT, step).await {
        Ok(res) => res,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("admin port: no progress {what} within {DEFAULT_TIMEOUT:?}"),
        )),
    }
}

/// The client side of one admin connection: back-to-back pickles both ways.
struct AdminClient {
    stream: TcpStream,
    pickles: vspc_codec::pickle::Stream,
}

impl AdminClient {
    /// Send `values` as back-to-back pickles in one write.
    async fn send(&mut self, values: &[vspc_codec::pickle::Value]) -> io::Result<()> {
        let bytes: Vec<u8> = values.iter().flat_map(vspc_codec::pickle::encode).collect();
        admin_step("writing", self.stream.write_all(&bytes)).await
    }

    /// The next pickle from the daemon.
    async fn next(&mut self) -> io::Result<vspc_codec::pickle::Value> {
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            match self.pickles.next_value() {
                Ok(Some(value)) => return Ok(value),
                Ok(None) => {}
                Err(e) => return Err(invalid_answer(format!("bad pickle: {e}"))),
            }
            let n = admin_step("reading", self.stream.read(&mut chunk)).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "admin port: the daemon closed the connection in the middle of the answer",
                ));
            }
            self.pickles.feed(&chunk[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;
    use vspc_codec::vmware::PROXY_KNOWN_SUBOPTIONS;
    use vspc_codec::wire::Change;

    const T: Duration = Duration::from_secs(5);

    fn fixture(n: u32) -> Vec<capture::Segment> {
        let path = format!("{}/../captures/stream{n}.txt", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).expect("capture fixture");
        capture::parse(&text).expect("parse fixture")
    }

    /// The commands and data the VM sent in a capture stream.
    fn vm_side(n: u32) -> (Vec<Received>, Vec<u8>) {
        let bytes: Vec<u8> = fixture(n)
            .into_iter()
            .filter(|s| s.from_vm)
            .flat_map(|s| s.bytes)
            .collect();
        decode_events(&bytes).expect("decode")
    }

    /// A tiny proxy that behaves like the capture's: the same opening, KS2
    /// and both GETs when 232 comes on, WILL-PROXY, GOAHEAD with a fixed
    /// 4-byte secret, PEER-OK with the sequence. Returns what it received.
    async fn fake_proxy(stream: TcpStream, secret: [u8; 4]) -> (Vec<Received>, Vec<u8>) {
        use opt::*;
        let (mut rd, mut wr) = stream.into_split();
        let mut neg = Negotiator::new(
            OptionSet::of(&[BINARY, SGA, ECHO]),
            OptionSet::of(&[BINARY, SGA, VMWARE_EXT]),
        );
        let mut out = Vec::new();
        neg.enable_local(BINARY, &mut out);
        neg.enable_local(SGA, &mut out);
        neg.enable_local(ECHO, &mut out);
        neg.enable_remote(BINARY, &mut out);
        neg.enable_remote(SGA, &mut out);
        neg.enable_remote(VMWARE_EXT, &mut out);
        wr.write_all(&out).await.unwrap();
        let mut dec = Decoder::default();
        let (mut events, mut data) = (Vec::new(), Vec::new());
        let mut buf = [0u8; 4096];
        loop {
            let n = match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return (events, data),
                Ok(n) => n,
            };
            let mut out = Vec::new();
            dec.decode(&buf[..n], |ev| {
                match ev {
                    Event::Data(d) => data.extend_from_slice(d),
                    Event::Negotiate(v, o)
                        if neg.receive(v, o, &mut out)
                            == Some(Change::RemoteEnabled(VMWARE_EXT)) =>
                    {
                        Msg::KnownSuboptions2(PROXY_KNOWN_SUBOPTIONS).encode(&mut out);
                        Msg::GetVmVcUuid.encode(&mut out);
                        Msg::GetVmName.encode(&mut out);
                    }
                    Event::Subneg { payload, .. } => match Msg::decode(payload) {
                        Ok(Msg::DoProxy { .. }) => Msg::WillProxy.encode(&mut out),
                        Ok(Msg::VmotionBegin(seq)) => {
                            let cookie = [seq, &secret[..]].concat();
                            Msg::VmotionGoahead(&cookie).encode(&mut out);
                        }
                        Ok(Msg::VmotionPeer(c)) if c.len() > 4 => {
                            Msg::VmotionPeerOk(&c[..c.len() - 4]).encode(&mut out)
                        }
                        _ => {}
                    },
                    _ => {}
                }
                events.extend(Received::from_event(&ev));
            })
            .unwrap();
            wr.write_all(&out).await.unwrap();
        }
    }

    async fn listen() -> (TcpListener, std::net::SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        (l, a)
    }

    #[tokio::test]
    async fn source_speaks_like_capture_stream0() {
        let (l, addr) = listen().await;
        let proxy = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            fake_proxy(s, [0x3c, 0xe6, 0x4d, 0xab]).await
        });
        let vm = SimVm::connect(addr, &Identity::capture()).await.unwrap();
        let (want_events, want_data) = vm_side(0);
        vm.send(&want_data).await.unwrap();
        let reply = vm.begin_vmotion(&[0x44, 0xda, 0x87, 0xf1]).await.unwrap();
        assert_eq!(
            reply,
            VmotionReply::GoAhead {
                cookie: vec![0x44, 0xda, 0x87, 0xf1, 0x3c, 0xe6, 0x4d, 0xab]
            }
        );
        assert!(vm.events().contains(&Received::Negotiate(Verb::Dont, 44)));
        vm.close().await;
        let (events, data) = proxy.await.unwrap();
        assert_eq!(events, want_events);
        assert_eq!(data, want_data);
    }

    /// Streams 1 and 3: a destination, with 0xFF in stream 3's cookie.
    #[tokio::test]
    async fn destination_speaks_like_capture_streams_1_and_3() {
        for (n, cookie) in [
            (1, &b"\x44\xda\x87\xf1\x3c\xe6\x4d\xab"[..]),
            (3, &b"\x76\x19\xff\xe9\x55\x21\x99\x8c"[..]),
        ] {
            let (l, addr) = listen().await;
            let proxy = tokio::spawn(async move {
                let (s, _) = l.accept().await.unwrap();
                fake_proxy(s, [0; 4]).await
            });
            let id = Identity::capture();
            let vm = SimVm::connect_destination(addr, &id, cookie).await.unwrap();
            let seq = &cookie[..4];
            assert_eq!(vm.peer_ok().as_deref(), Some(seq));
            vm.complete(seq).await.unwrap();
            let (want_events, want_data) = vm_side(n);
            // Stream 1 goes on (data, a new BEGIN); compare up to COMPLETE.
            let upto = want_events
                .iter()
                .position(|e| matches!(e.msg(), Some(Msg::VmotionComplete(_))))
                .unwrap();
            // Wait for GET-VM-NAME's answer to have gone out before closing.
            vm.wait_event(0, T, |e| e.msg() == Some(Msg::GetVmName))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            vm.close().await;
            let (events, data) = proxy.await.unwrap();
            assert_eq!(events, want_events[..=upto], "stream {n}");
            assert!(data.is_empty());
            if n == 3 {
                assert!(want_data.is_empty());
            }
        }
    }

    #[tokio::test]
    async fn wont_proxy_is_an_error_and_data_is_buffered() {
        let (l, addr) = listen().await;
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            // Straight to business: accept 232, refuse the proxy request,
            // send console input in pieces.
            let mut out = Vec::new();
            encode::negotiate(Verb::Dont, opt::AUTHENTICATION, &mut out);
            encode::negotiate(Verb::Do, opt::VMWARE_EXT, &mut out);
            Msg::KnownSuboptions2(PROXY_KNOWN_SUBOPTIONS).encode(&mut out);
            encode::data(b"in\xffput", &mut out);
            Msg::WontProxy.encode(&mut out);
            s.write_all(&out).await.unwrap();
            s.write_all(b"-more").await.unwrap();
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink).await;
            sink
        });
        let stream = TcpStream::connect(addr).await.unwrap();
        let vm = SimVm::start(
            stream,
            &Identity::numbered(7).with_direction(b'C'),
            Role::Source,
            &VmOptions::default(),
        );
        assert!(matches!(vm.wait_ready().await, Err(SimError::WontProxy)));
        assert_eq!(vm.read_exact_data(2, T).await.unwrap(), b"in");
        assert_eq!(vm.read_exact_data(9, T).await.unwrap(), b"\xffput-more");
        assert!(vm.recv_data(Duration::from_millis(50)).await.is_empty());
        vm.close().await;
        let sent = server.await.unwrap();
        let (events, _) = decode_events(&sent).unwrap();
        let proxy = Msg::DoProxy {
            direction: b'C',
            uri: b"vSPC.py",
        };
        assert!(events.iter().any(|e| e.msg() == Some(proxy)));
    }

    #[tokio::test]
    async fn console_answers_and_escapes() {
        for (binary, speak_first) in [(true, false), (false, false), (true, true)] {
            let (l, addr) = listen().await;
            let server = tokio::spawn(async move {
                let (mut s, _) = l.accept().await.unwrap();
                s.write_all(b"\xff\xfb\x01\xff\xfb\x03\xff\xfb\x00\xff\xfd\x00\xff\xfd\x03")
                    .await
                    .unwrap();
                s.write_all(b"ab\xff\xffc\r\0d").await.unwrap();
                let mut got = Vec::new();
                let _ = s.read_to_end(&mut got).await;
                got
            });
            let opts = ConsoleOptions {
                binary,
                speak_first,
                ..ConsoleOptions::default()
            };
            let c = SimConsole::connect_with(addr, &opts).await.unwrap();
            assert_eq!(c.read_until(b"c", T).await.unwrap(), b"ab\xffc");
            assert_eq!(c.read_exact_data(3, T).await.unwrap(), b"\r\0d");
            assert_eq!(c.binary(), binary);
            c.send(b"x\xff\ry\r\n").await.unwrap();
            c.send_raw(b"\xff\xf1").await.unwrap();
            c.close().await;
            let got = server.await.unwrap();
            let answers: &[u8] = match (binary, speak_first) {
                (true, false) => b"\xff\xfd\x01\xff\xfd\x03\xff\xfd\x00\xff\xfb\x00\xff\xfb\x03",
                (false, _) => b"\xff\xfd\x01\xff\xfd\x03\xff\xfe\x00\xff\xfc\x00\xff\xfb\x03",
                // Our own requests first (WILL BINARY, DO BINARY, DO ECHO,
                // DO SGA); the server's offers then only need DO SGA
                // answered: nothing is answered twice.
                (true, true) => b"\xff\xfb\x00\xff\xfd\x00\xff\xfd\x01\xff\xfd\x03\xff\xfb\x03",
            };
            let typed: &[u8] = if binary {
                b"x\xff\xff\ry\r\n\xff\xf1"
            } else {
                b"x\xff\xff\r\0y\r\n\xff\xf1"
            };
            assert_eq!(
                got,
                [answers, typed].concat(),
                "binary={binary} speak_first={speak_first}"
            );
        }
    }

    #[tokio::test]
    async fn read_to_end_and_timeouts() {
        let (l, addr) = listen().await;
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            s.write_all(b"\xff\xfb\x00\xff\xfd\x00bye").await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        });
        let c = SimConsole::connect(addr).await.unwrap();
        let err = c
            .read_exact_data(10, Duration::from_millis(20))
            .await
            .unwrap_err();
        assert!(matches!(err, SimError::Timeout { .. }), "{err}");
        let (data, closed) = c.read_to_end(T).await;
        assert_eq!((data.as_slice(), closed), (&b"bye"[..], true));
        assert!(matches!(
            c.read_exact_data(1, T).await,
            Err(SimError::Closed { .. })
        ));
    }

    #[tokio::test]
    async fn into_raw_hands_over_buffered_data_and_the_stream() {
        let (l, addr) = listen().await;
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            s.write_all(b"\xff\xfb\x00\xff\xfd\x00early").await.unwrap();
            let mut got = [0u8; 6];
            // The console's answers, then what it sends raw.
            s.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"\xff\xfd\x00\xff\xfb\x00");
            s.write_all(b"late\xff\xff!").await.unwrap();
            let mut typed = [0u8; 3];
            s.read_exact(&mut typed).await.unwrap();
            typed
        });
        let silent = ConsoleOptions {
            speak_first: false,
            ..ConsoleOptions::default()
        };
        let c = SimConsole::connect_with(addr, &silent).await.unwrap();
        c.link
            .wait_until(T, "early data", |inbox| {
                (inbox.data.len() >= 5).then_some(Ok(()))
            })
            .await
            .unwrap();
        let mut raw = c.into_raw::<TcpStream>().await.unwrap();
        assert_eq!(raw.data, b"early");
        assert!(raw.binary);
        assert!(raw
            .events
            .contains(&Received::Negotiate(Verb::Will, opt::BINARY)));
        raw.stream.write_all(b"raw").await.unwrap();
        let mut buf = [0u8; 16];
        let mut data = Vec::new();
        while data.len() < 6 {
            let n = raw.stream.read(&mut buf).await.unwrap();
            assert!(n > 0);
            raw.decoder
                .decode(&buf[..n], |ev| {
                    if let Event::Data(d) = ev {
                        data.extend_from_slice(d);
                    }
                })
                .unwrap();
        }
        assert_eq!(data, b"late\xff!");
        assert_eq!(&server.await.unwrap(), b"raw");
    }

    #[tokio::test]
    async fn into_raw_with_the_wrong_stream_type_is_an_error() {
        let (l, addr) = listen().await;
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            tokio::time::sleep(T).await;
            drop(s);
        });
        let stream = TcpStream::connect(addr).await.unwrap();
        let c = SimConsole::start(stream, &ConsoleOptions::default());
        let err = c.into_raw::<tokio::io::DuplexStream>().await.unwrap_err();
        assert!(matches!(err, SimError::Unexpected(_)), "{err}");
    }

    #[test]
    fn identity_forms() {
        let id = Identity::capture();
        assert_eq!(
            id.uuid_text(),
            "01 23 45 67 89 ab cd ef-fe dc ba 98 00 00 00 00"
        );
        assert_eq!(id.uuid_display(), "0123456789abcdef-fedcba9800000000");
        let parsed = vspc_codec::vmware::VmUuid::parse(id.uuid_text().as_bytes()).unwrap();
        assert_eq!(parsed.display, id.uuid_display());
        assert_ne!(Identity::numbered(1).uuid, Identity::numbered(2).uuid);
        assert_ne!(Identity::numbered(1).name, Identity::numbered(2).name);
    }
}
