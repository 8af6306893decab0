//! A connection's outbound queue.
//!
//! Producers (the VM's reader fanning out, consoles typing, the session's own
//! replies) push byte chunks; the connection's writer takes them in batches.
//! Nothing here ever waits on the socket, so a producer never blocks on a
//! slow peer: it sees the queue's size and decides. An empty queue holds no
//! heap memory.
//!
//! Two lanes: protocol messages (negotiation, VMware replies such as
//! GOAHEAD), already encoded, go ahead of queued data, so pacing or a long
//! paste never delays an answer ESXi waits for. Data is queued as the plain
//! bytes it is and encoded only on its way out, as the peer needs it
//! ([`Encoding`]): raw for a client that speaks no telnet, IAC doubled for a
//! telnet peer, CR NUL added for one that refused BINARY. One chunk can thus
//! be shared by consoles that want different encodings, and a lane switch
//! can never land inside an `IAC IAC` pair.
//!
//! A console's queue never refuses output and never disconnects anyone: past
//! its limit, the oldest queued data is dropped and counted, and the next
//! batch starts with a line telling the console how many bytes it missed
//! ([`skip_notice`]). Whether a VM should wait for a console before that
//! happens is the caller's decision; the outbox only says how full it is
//! ([`Outbox::lagging`]) and remembers when the VM gave up waiting for it
//! ([`Outbox::set_behind`]).

use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use tokio::sync::Notify;

/// How queued data is put on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Encoding {
    /// Not decided yet (a console that has not spoken): only the control
    /// lane is written; data waits.
    Hold = 0,
    /// Byte for byte (clients that speak no telnet: gdb, socat, scripts).
    Raw = 1,
    /// Telnet BINARY: 0xFF doubled.
    Telnet = 2,
    /// Telnet without BINARY (NVT): 0xFF doubled and a CR not followed by
    /// LF sent as CR NUL.
    Nvt = 3,
}

impl Encoding {
    fn from_u8(v: u8) -> Encoding {
        match v {
            1 => Encoding::Raw,
            2 => Encoding::Telnet,
            3 => Encoding::Nvt,
            _ => Encoding::Hold,
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    control: VecDeque<Bytes>,
    queue: VecDeque<Bytes>,
    /// Data bytes queued (the control lane is not counted).
    bytes: usize,
    /// Data bytes dropped from the front since the last notice was queued.
    skipped: u64,
    /// No more data is accepted; the writer flushes what is queued, then ends.
    closed: bool,
    /// The writer, waiting for data or the end.
    writer: Option<Waker>,
}

/// One connection's outbound queue.
#[derive(Debug)]
pub struct Outbox {
    inner: Mutex<Inner>,
    /// Wakes producers waiting for the queue to shrink.
    room: Notify,
    /// Most data bytes that may wait; past this the oldest are skipped.
    limit: usize,
    /// An [`Encoding`], as u8.
    encoding: AtomicU8,
    /// The writer is blocked on a socket that takes nothing more: the peer
    /// is not reading as fast as output comes (rather than the daemon
    /// being slow to write).
    full: AtomicBool,
    /// Bytes the writer has put on the socket so far: how fast the peer
    /// really takes output.
    sent: AtomicU64,
    /// The VM gave up waiting for this console: it is not waited for again
    /// until it has caught up (its writer found nothing left to write).
    /// Merely draining below a mark is not enough: a console that reads
    /// slower than the VM writes would otherwise make the VM wait again at
    /// every batch.
    behind: AtomicBool,
}

/// What the writer took: `control` encoded messages first, then data
/// chunks to encode with [`Taken::encoding`].
pub struct Taken {
    pub chunks: Vec<Bytes>,
    /// How many of `chunks`, from the front, are control messages.
    pub control: usize,
    /// The encoding the data chunks need.
    pub encoding: Encoding,
}

/// A batch of chunks the writer took, or the end of the stream.
pub enum Batch {
    Data(Taken),
    End,
}

/// Data bytes skipped by every outbox of the process (consoles that fell
/// a whole queue behind), for `/metrics`. A process-wide counter rather
/// than a field, so an outbox stays as small as it is; bumped only when
/// output is skipped, never on the ordinary path.
static SKIPPED_TOTAL: AtomicU64 = AtomicU64::new(0);

/// Data bytes skipped by every outbox so far.
pub fn skipped_total() -> u64 {
    SKIPPED_TOTAL.load(Ordering::Relaxed)
}

/// The most the writer takes at once when not pacing.
pub const BATCH_BYTES: usize = 256 * 1024;

/// The line a console gets where output was skipped because it fell more
/// than its queue behind.
pub fn skip_notice(skipped: u64) -> Bytes {
    Bytes::from(format!(
        "\r\n[vspc: skipped {skipped} bytes of output; this console fell behind]\r\n"
    ))
}

impl Outbox {
    pub fn new(limit: usize, encoding: Encoding) -> Outbox {
        Outbox {
            inner: Mutex::new(Inner::default()),
            room: Notify::new(),
            limit: limit.max(1),
            encoding: AtomicU8::new(encoding as u8),
            full: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            behind: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves the queue consistent (every
        // mutation is a single push/pop), so poisoning is safe to ignore.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue output; past the limit, drop the oldest queued data (and, for
    /// a chunk larger than the whole limit, its head) and count it. Returns
    /// the bytes now queued, or `None` if the outbox is closed.
    pub fn push(&self, mut data: Bytes) -> Option<usize> {
        let mut inner = self.lock();
        if inner.closed {
            return None;
        }
        if data.len() > self.limit {
            let cut = data.len() - self.limit;
            inner.skipped += cut as u64;
            SKIPPED_TOTAL.fetch_add(cut as u64, Ordering::Relaxed);
            let _ = data.split_to(cut);
        }
        while inner.bytes + data.len() > self.limit {
            let Some(old) = inner.queue.pop_front() else {
                break;
            };
            inner.bytes -= old.len();
            inner.skipped += old.len() as u64;
            SKIPPED_TOTAL.fetch_add(old.len() as u64, Ordering::Relaxed);
        }
        inner.bytes += data.len();
        inner.queue.push_back(data);
        let n = inner.bytes;
        unlock_and_wake(inner);
        Some(n)
    }

    /// Queue `data` regardless of the limit (recent output for a new
    /// console, notices, console input for the VM, which its producer
    /// throttles itself). Returns false if the outbox is closed.
    pub fn push_always(&self, data: Bytes) -> bool {
        let mut inner = self.lock();
        if inner.closed {
            return false;
        }
        inner.bytes += data.len();
        inner.queue.push_back(data);
        unlock_and_wake(inner);
        true
    }

    /// Queue an encoded protocol message ahead of any queued data.
    pub fn push_control(&self, msg: Bytes) -> bool {
        let mut inner = self.lock();
        if inner.closed {
            return false;
        }
        inner.control.push_back(msg);
        unlock_and_wake(inner);
        true
    }

    /// Take back every data chunk not yet handed to the writer (a vMotion
    /// holds them for whichever connection wins).
    pub fn take_data(&self) -> Vec<Bytes> {
        let mut inner = self.lock();
        inner.bytes = 0;
        let taken = Vec::from(std::mem::take(&mut inner.queue));
        drop(inner);
        self.room.notify_waiters();
        taken
    }

    /// Stop accepting data; the writer sends what is queued plus `last`,
    /// then the connection closes.
    pub fn close(&self, last: Option<Bytes>) {
        let mut inner = self.lock();
        if let Some(b) = last {
            if !inner.closed {
                inner.queue.push_back(b);
            }
        }
        inner.closed = true;
        unlock_and_wake(inner);
        self.room.notify_waiters();
    }

    /// Drop every queued data byte, queue `last` alone and close: for a
    /// peer that is being given up on, so that only the reason waits.
    pub fn abandon(&self, last: Bytes) {
        let mut inner = self.lock();
        if !inner.closed {
            inner.queue.clear();
            inner.bytes = 0;
            inner.queue.push_back(last);
        }
        inner.closed = true;
        unlock_and_wake(inner);
        self.room.notify_waiters();
    }

    /// Data bytes waiting to be written.
    pub fn queued(&self) -> usize {
        self.lock().bytes
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// How the data is put on the wire.
    pub fn encoding(&self) -> Encoding {
        Encoding::from_u8(self.encoding.load(Ordering::Relaxed))
    }

    /// Change the encoding from the next batch on (a held outbox starts
    /// writing its data).
    pub fn set_encoding(&self, e: Encoding) {
        if self.encoding.swap(e as u8, Ordering::Relaxed) != e as u8 {
            unlock_and_wake(self.lock());
        }
    }

    /// The level past which a VM should wait for this console: an eighth
    /// of the queue (two reads of the VM with the default queue), so that
    /// thousands of busy consoles each hold 128 KiB, not a whole queue.
    pub fn high_water(&self) -> usize {
        self.limit / 8
    }

    /// The level a lagging console must drain to before the VM goes on.
    pub fn low_water(&self) -> usize {
        self.limit / 16
    }

    /// With `queued` bytes waiting, should a VM wait for this console
    /// (briefly) before sending more? Yes past the high-water mark, unless
    /// it was given up on or is not being written yet (a console still
    /// being told apart must not hold the VM up).
    pub fn lags_at(&self, queued: usize) -> bool {
        queued > self.high_water()
            && !self.behind.load(Ordering::Relaxed)
            && self.encoding() != Encoding::Hold
    }

    /// [`Outbox::lags_at`] its current level.
    pub fn lagging(&self) -> bool {
        self.lags_at(self.queued())
    }

    /// The writer found the peer's socket full (true) or wrote to it again
    /// (false).
    pub fn set_full(&self, full: bool) {
        self.full.store(full, Ordering::Relaxed);
    }

    /// Whether the peer's socket is full right now.
    pub fn is_full(&self) -> bool {
        self.full.load(Ordering::Relaxed)
    }

    /// The writer put `n` more bytes on the socket.
    pub fn count_sent(&self, n: usize) {
        self.sent.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Bytes put on the socket so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// The VM stops waiting for this console until it has caught up.
    pub fn set_behind(&self) {
        self.behind.store(true, Ordering::Relaxed);
    }

    /// Whether the VM has given up waiting for this console for now.
    pub fn is_behind(&self) -> bool {
        self.behind.load(Ordering::Relaxed)
    }

    /// Wait until at most `level` bytes are queued (or the outbox closes).
    pub async fn drained(&self, level: usize) {
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let inner = self.lock();
                if inner.bytes <= level || inner.closed {
                    return;
                }
            }
            notified.await;
        }
    }

    /// The writer's side: take a batch of at most about `max` data bytes
    /// (protocol messages first), or the end; when there is nothing to take,
    /// `cx` is woken by the next push, encoding change or close. One writer
    /// per outbox.
    pub fn poll_batch(&self, cx: &mut Context<'_>, max: usize) -> Poll<Batch> {
        let encoding = self.encoding();
        let mut inner = self.lock();
        // The control lane's buffer leaves with the batch: an idle outbox
        // keeps no allocation.
        let mut chunks = Vec::from(std::mem::take(&mut inner.control));
        let control = chunks.len();
        let mut taken = 0;
        if encoding != Encoding::Hold {
            if inner.skipped > 0 && !inner.queue.is_empty() {
                chunks.push(skip_notice(std::mem::take(&mut inner.skipped)));
            }
            while taken < max {
                let Some(mut chunk) = inner.queue.pop_front() else {
                    break;
                };
                let room = max - taken;
                if chunk.len() > room {
                    inner.queue.push_front(chunk.split_off(room));
                }
                taken += chunk.len();
                chunks.push(chunk);
            }
        }
        if !chunks.is_empty() {
            inner.bytes = inner.bytes.saturating_sub(taken);
            if inner.queue.is_empty() {
                inner.queue = VecDeque::new();
            }
            drop(inner);
            self.room.notify_waiters();
            return Poll::Ready(Batch::Data(Taken {
                chunks,
                control,
                encoding,
            }));
        }
        if inner.closed && (encoding != Encoding::Hold || inner.queue.is_empty()) {
            return Poll::Ready(Batch::End);
        }
        if encoding != Encoding::Hold {
            // Everything queued is out and the writer asks for more: the
            // console has caught up, and a VM waits for it again.
            self.behind.store(false, Ordering::Relaxed);
        }
        match &mut inner.writer {
            Some(w) if w.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

/// Unlock, then wake the writer if it is waiting (outside the lock, so it
/// never wakes into a held mutex).
fn unlock_and_wake(mut inner: std::sync::MutexGuard<'_, Inner>) {
    let writer = inner.writer.take();
    drop(inner);
    if let Some(w) = writer {
        w.wake();
    }
}

impl Taken {
    /// The batch as it goes on the wire: control messages as they are, data
    /// encoded. `cr_pending` carries NVT's "the last byte out was a CR"
    /// across batches. Chunks that need no change are passed through
    /// without a copy.
    pub fn into_wire(self, cr_pending: &mut bool) -> Vec<Bytes> {
        let Taken {
            mut chunks,
            control,
            encoding,
        } = self;
        match encoding {
            Encoding::Raw | Encoding::Hold => chunks,
            Encoding::Telnet => {
                for c in &mut chunks[control..] {
                    if memchr::memchr(crate::wire::IAC, c).is_some() {
                        *c = Bytes::from(crate::wire::encode::escaped(c));
                    }
                }
                chunks
            }
            Encoding::Nvt => {
                let mut out = Vec::new();
                for c in &chunks[control..] {
                    crate::wire::encode::nvt_data(c, cr_pending, &mut out);
                }
                chunks.truncate(control);
                if !out.is_empty() {
                    chunks.push(Bytes::from(out));
                }
                chunks
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Wait for the next batch, as the connection's writer does.
    async fn next_batch(o: &Outbox, max: usize) -> Batch {
        std::future::poll_fn(|cx| o.poll_batch(cx, max)).await
    }

    async fn next_wire(o: &Outbox, max: usize) -> Option<Vec<u8>> {
        match next_batch(o, max).await {
            Batch::Data(t) => Some(t.into_wire(&mut false).concat()),
            Batch::End => None,
        }
    }

    #[tokio::test]
    async fn overflow_skips_the_oldest_and_says_so() {
        let o = Outbox::new(10, Encoding::Raw);
        assert_eq!(o.push(Bytes::from_static(b"12345")), Some(5));
        assert_eq!(o.push(Bytes::from_static(b"abc")), Some(8));
        // 8 + 6 > 10: "12345" goes.
        assert_eq!(o.push(Bytes::from_static(b"uvwxyz")), Some(9));
        let got = next_wire(&o, BATCH_BYTES).await.unwrap();
        let mut want = skip_notice(5).to_vec();
        want.extend_from_slice(b"abcuvwxyz");
        assert_eq!(got, want);
        // A chunk larger than the limit keeps its tail.
        o.push(Bytes::from_static(b"0123456789ABCDEF"));
        let got = next_wire(&o, BATCH_BYTES).await.unwrap();
        let mut want = skip_notice(6).to_vec();
        want.extend_from_slice(b"6789ABCDEF");
        assert_eq!(got, want);
        // Nothing is ever refused: the outbox stays open.
        assert!(!o.is_closed());
    }

    #[tokio::test]
    async fn control_goes_first_and_data_is_encoded_on_the_way_out() {
        let o = Outbox::new(1000, Encoding::Telnet);
        o.push(Bytes::from_static(b"ab\xffcd"));
        o.push_control(Bytes::from_static(b"\xff\xfb\x01"));
        // Three data bytes only: the cut may fall anywhere in raw data.
        assert_eq!(next_wire(&o, 3).await.unwrap(), b"\xff\xfb\x01ab\xff\xff");
        assert_eq!(o.take_data(), vec![Bytes::from_static(b"cd")]);
        assert_eq!(o.queued(), 0);
        o.set_encoding(Encoding::Raw);
        o.push(Bytes::from_static(b"\xff\r\0"));
        assert_eq!(next_wire(&o, 100).await.unwrap(), b"\xff\r\0");
        o.set_encoding(Encoding::Nvt);
        o.push(Bytes::from_static(b"\xff\ra\r\n"));
        assert_eq!(next_wire(&o, 100).await.unwrap(), b"\xff\xff\r\0a\r\n");
    }

    #[tokio::test]
    async fn held_data_waits_for_an_encoding() {
        let o = Outbox::new(100, Encoding::Hold);
        o.push(Bytes::from_static(b"data"));
        o.push_control(Bytes::from_static(b"ctl"));
        assert_eq!(next_wire(&o, 100).await.unwrap(), b"ctl");
        let pending = futures_poll(&o);
        assert!(pending.is_pending(), "held data was written");
        o.set_encoding(Encoding::Raw);
        assert_eq!(next_wire(&o, 100).await.unwrap(), b"data");
    }

    fn futures_poll(o: &Outbox) -> Poll<Batch> {
        crate::testing::poll_once(o, 100)
    }

    #[tokio::test]
    async fn close_flushes_queue_first() {
        let o = Outbox::new(100, Encoding::Raw);
        o.push(Bytes::from_static(b"a"));
        o.close(Some(Bytes::from_static(b"z")));
        assert_eq!(next_wire(&o, BATCH_BYTES).await.unwrap(), b"az");
        assert!(next_wire(&o, BATCH_BYTES).await.is_none());
        let o = Outbox::new(100, Encoding::Raw);
        o.push(Bytes::from_static(b"old"));
        o.abandon(Bytes::from_static(b"bye"));
        assert_eq!(next_wire(&o, BATCH_BYTES).await.unwrap(), b"bye");
    }

    #[test]
    fn lag_marks() {
        let o = Outbox::new(100, Encoding::Raw);
        o.push(Bytes::from(vec![0; 13]));
        assert!(o.lagging());
        o.set_behind();
        assert!(!o.lagging());
        // Taking a batch is not catching up: the VM may still be ahead.
        assert!(futures_poll(&o).is_ready());
        assert!(o.is_behind());
        // Asking for more with nothing left is.
        assert!(futures_poll(&o).is_pending());
        assert!(!o.is_behind());
        // A held console is never waited for.
        let held = Outbox::new(100, Encoding::Hold);
        held.push(Bytes::from(vec![0; 90]));
        assert!(!held.lagging());
    }
}
