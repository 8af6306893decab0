//! The machinery both simulated peers share: a reader task, a writer task,
//! an inbox, and [`RawConn`] for a connection taken out of the simulation.

use std::any::Any;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use vspc_codec::wire::{Decoder, Event};

use super::*;

/// What the reader task has collected.
#[derive(Default)]
pub(super) struct Inbox {
    /// Data bytes not yet taken by a read call (IAC unescaped).
    pub(super) data: BytesMut,
    /// Every command received, in order; never trimmed.
    pub(super) events: Vec<Received>,
    /// When the read that carried each of `events` returned (timing hooks).
    pub(super) event_at: Vec<Instant>,
    /// Why the reader stopped (peer closed, read error, decode error).
    pub(super) end: Option<String>,
    /// Whether we currently send in BINARY mode (consoles only).
    pub(super) local_binary: bool,
}

#[derive(Default)]
pub(super) struct Shared {
    pub(super) inbox: Mutex<Inbox>,
    /// Woken after every batch the reader adds, and when it stops.
    pub(super) notify: Notify,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, Inbox> {
        // A panic while holding the lock cannot leave the inbox inconsistent
        // (every update is a plain append), so a poisoned lock is still usable.
        self.inbox.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(super) enum WriteCmd {
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
pub(super) type DetachRequest = oneshot::Sender<Box<dyn Any + Send>>;

/// The role-specific reactions of a simulated peer.
pub(super) trait Brain: Send + 'static {
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
pub(super) struct Link {
    pub(super) shared: Arc<Shared>,
    pub(super) tx: mpsc::UnboundedSender<WriteCmd>,
    pub(super) reader: JoinHandle<()>,
    pub(super) writer: JoinHandle<()>,
    /// Asks the reader to stop and give its half back; taken by
    /// [`Link::detach`].
    pub(super) detach: Option<oneshot::Sender<DetachRequest>>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

pub(super) fn queue(tx: &mpsc::UnboundedSender<WriteCmd>, out: &mut Vec<u8>) {
    if !out.is_empty() {
        // If the writer is gone the connection is dead; the reader notices.
        let _ = tx.send(WriteCmd::Bytes(std::mem::take(out), None));
    }
}

pub(super) async fn write_loop<W: AsyncWrite + Unpin + Send + 'static>(
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
pub(super) enum Wake {
    Read(io::Result<usize>),
    Deadline,
    Detach(DetachRequest),
    /// The detach sender is gone (the link is being dropped or closed).
    NoDetach,
}

pub(super) async fn read_loop<R: AsyncRead + Unpin + Send + 'static, B: Brain>(
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
    pub(super) fn start<S, B>(stream: S, brain: B) -> Link
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
    pub(super) async fn detach<S>(mut self) -> Result<RawConn<S>>
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
    pub(super) async fn write(&self, bytes: Vec<u8>) -> Result<()> {
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
    pub(super) async fn close(&self) {
        let (ack, done) = oneshot::channel();
        if self.tx.send(WriteCmd::Shutdown(ack)).is_ok() {
            let _ = tokio::time::timeout(DEFAULT_TIMEOUT, done).await;
        }
        self.reader.abort();
        self.writer.abort();
    }

    /// Deliver what is queued and shut the write side down; reading goes on.
    pub(super) async fn shutdown_write(&self) {
        let (ack, done) = oneshot::channel();
        if self.tx.send(WriteCmd::Shutdown(ack)).is_ok() {
            let _ = tokio::time::timeout(DEFAULT_TIMEOUT, done).await;
        }
    }

    /// Wait until `check` gives an answer, re-checking after every batch the
    /// reader adds. `check` sees the inbox (including `end`) and decides.
    pub(super) async fn wait_until<T>(
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

    pub(super) fn event_count(&self) -> usize {
        self.shared.lock().events.len()
    }

    pub(super) fn events(&self) -> Vec<Received> {
        self.shared.lock().events.clone()
    }

    pub(super) fn event_at(&self, index: usize) -> Option<Instant> {
        self.shared.lock().event_at.get(index).copied()
    }

    /// The first event at index `since` or later that matches `pred`.
    pub(super) async fn wait_event(
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

    pub(super) async fn recv_data(&self, wait: Duration) -> Vec<u8> {
        let _ = self
            .wait_until(wait, "data", |inbox| {
                (!inbox.data.is_empty() || inbox.end.is_some()).then_some(Ok(()))
            })
            .await;
        self.shared.lock().data.split().to_vec()
    }

    pub(super) async fn read_exact_data(&self, n: usize, timeout: Duration) -> Result<Vec<u8>> {
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

    pub(super) async fn read_until(&self, pattern: &[u8], timeout: Duration) -> Result<Vec<u8>> {
        let what = format!("data ending in {:?}", String::from_utf8_lossy(pattern));
        self.wait_until(timeout, &what, |inbox| {
            match memchr::memmem::find(&inbox.data, pattern) {
                Some(at) => Some(Ok(inbox.data.split_to(at + pattern.len()).to_vec())),
                None => check_end(inbox, &what),
            }
        })
        .await
    }

    pub(super) async fn read_to_end(&self, timeout: Duration) -> (Vec<u8>, bool) {
        let _ = self
            .wait_until(timeout, "end of stream", |inbox| {
                inbox.end.is_some().then_some(Ok(()))
            })
            .await;
        let mut inbox = self.shared.lock();
        (inbox.data.split().to_vec(), inbox.end.is_some())
    }

    pub(super) fn end_reason(&self) -> Option<String> {
        self.shared.lock().end.clone()
    }
}

/// `Some(Err(Closed))` once the reader has stopped.
pub(super) fn check_end<T>(inbox: &Inbox, what: &str) -> Option<Result<T>> {
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
