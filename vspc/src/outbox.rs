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
//! happens is the hub's decision; the outbox only says how full it is
//! ([`Outbox::level`]) and tells the VM's pacer ([`Outbox::pace_with`])
//! when that may have changed the decision: its queue drained to its
//! high-water mark, its encoding was decided, or it closed.

use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll, Waker};
use tokio::net::TcpStream;
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
    /// Output was skipped since the queue was last at or below its
    /// high-water mark: the console is behind, and does not hold its VM
    /// back until it has caught up that far.
    behind: bool,
    /// No more data is accepted; the writer flushes what is queued, then ends.
    closed: bool,
    /// The writer, waiting for data or the end.
    writer: Option<Waker>,
    /// The client's socket, asked whether it takes more right now
    /// ([`Outbox::client_behind`]).
    probe: Option<Weak<TcpStream>>,
    /// Since when this console, full with its client behind, has held its
    /// VM back without catching up to its high-water mark (set by the VM's
    /// pacer, which keeps time; cleared when it catches up).
    lagging_since: Option<std::time::Instant>,
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
    /// Bytes the writer has put on the socket so far (the audit record's
    /// count of output).
    sent: AtomicU64,
    /// The socket took nothing the last time the writer tried: the client
    /// is behind (rather than the daemon being slow to write to it).
    full: AtomicBool,
    /// The VM this console paces: notified whenever this queue may have
    /// stopped holding the VM back (see [`Outbox::pace_with`]).
    pacer: OnceLock<Arc<Notify>>,
}

/// How full an outbox is, as the VM's pacing sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Level {
    /// Data bytes waiting.
    pub queued: usize,
    /// The encoding is still [`Encoding::Hold`]: nothing has been written,
    /// so nothing may be skipped either.
    pub undecided: bool,
    /// No more data is accepted.
    pub closed: bool,
    /// Output was skipped and the console has not caught up since.
    pub behind: bool,
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
            sent: AtomicU64::new(0),
            full: AtomicBool::new(false),
            pacer: OnceLock::new(),
        }
    }

    /// Let [`Outbox::client_behind`] ask `socket` itself.
    pub fn probe_with(&self, socket: Weak<TcpStream>) {
        self.lock().probe = Some(socket);
    }

    /// Is the client behind, right now: does its socket take no more? Asked
    /// of the socket when there is one (a zero-timeout poll), so a console
    /// the daemon has not written to for a while, whose client has read
    /// everything meanwhile, is not mistaken for one whose client stopped;
    /// otherwise what the writer last found.
    pub fn client_behind(&self) -> bool {
        let socket = self.lock().probe.as_ref().and_then(Weak::upgrade);
        if let Some(tcp) = socket {
            use rustix::event::{poll, PollFd, PollFlags};
            let mut fds = [PollFd::new(&*tcp, PollFlags::OUT)];
            let zero = rustix::event::Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            if let Ok(n) = poll(&mut fds, Some(&zero)) {
                return n == 0 || !fds[0].revents().contains(PollFlags::OUT);
            }
        }
        self.full.load(Ordering::SeqCst)
    }

    /// Tell `pacer` (the VM's) whenever this queue may have stopped holding
    /// the VM back: the writer took it from above [`Outbox::high_water`] to
    /// or below it, or took a batch from a nearly full queue; its encoding
    /// was decided; it closed. Set once, when the console joins a VM.
    pub fn pace_with(&self, pacer: Arc<Notify>) {
        let _ = self.pacer.set(pacer);
    }

    fn wake_pacer(&self) {
        if let Some(p) = self.pacer.get() {
            p.notify_waiters();
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
            inner.behind = true;
            SKIPPED_TOTAL.fetch_add(cut as u64, Ordering::Relaxed);
            let _ = data.split_to(cut);
        }
        while inner.bytes + data.len() > self.limit {
            let Some(old) = inner.queue.pop_front() else {
                break;
            };
            inner.bytes -= old.len();
            inner.skipped += old.len() as u64;
            inner.behind = true;
            SKIPPED_TOTAL.fetch_add(old.len() as u64, Ordering::Relaxed);
        }
        inner.bytes += data.len();
        inner.queue.push_back(data);
        let n = inner.bytes;
        unlock_and_wake(inner);
        Some(n)
    }

    /// Since when this console has held its VM back as a lagger (full, its
    /// client behind) without catching up: `now` if it was not lagging yet.
    pub fn lagging_since(&self, now: std::time::Instant) -> std::time::Instant {
        *self.lock().lagging_since.get_or_insert(now)
    }

    /// The VM stops waiting for this console until it has caught up to its
    /// high-water mark (its VM waited [`crate::hub::PATIENCE`] for it).
    pub fn set_behind(&self) {
        self.lock().behind = true;
        self.wake_pacer();
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

    /// Queue `data` ahead of every data chunk queued, regardless of the
    /// limit (a console's history, once it is known to want it, goes
    /// before the live output held meanwhile). Returns false if the outbox
    /// is closed.
    pub fn push_front_always(&self, data: Bytes) -> bool {
        let mut inner = self.lock();
        if inner.closed {
            return false;
        }
        inner.bytes += data.len();
        inner.queue.push_front(data);
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
        self.wake_pacer();
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
        self.wake_pacer();
    }

    /// The most data that may wait before the oldest is skipped.
    pub fn limit(&self) -> usize {
        self.limit
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
        let was = self.encoding.swap(e as u8, Ordering::SeqCst);
        if was != e as u8 {
            unlock_and_wake(self.lock());
            if was == Encoding::Hold as u8 {
                self.wake_pacer();
            }
        }
    }

    /// How full the queue is, for the VM's pacing, in one look.
    pub fn level(&self) -> Level {
        let inner = self.lock();
        Level {
            queued: inner.bytes,
            undecided: self.encoding() == Encoding::Hold,
            closed: inner.closed,
            behind: inner.behind,
        }
    }

    /// The writer found the client's socket full (true) or wrote to it
    /// (false). Becoming full is news for the VM's pacer: a console behind
    /// only because the daemon had not written to it yet is waited for,
    /// one whose client is behind is not.
    pub fn set_full(&self, full: bool) {
        if self.full.swap(full, Ordering::SeqCst) != full && full {
            self.wake_pacer();
        }
    }

    /// The level past which this console, if it is the fastest of its VM
    /// (or not yet decided), holds the VM back: an eighth of the queue (two
    /// reads of the VM with the default queue), so that thousands of busy
    /// consoles each hold 128 KiB, not a whole queue.
    pub fn high_water(&self) -> usize {
        self.limit / 8
    }

    /// The writer put `n` more bytes on the socket.
    pub fn count_sent(&self, n: usize) {
        self.sent.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Bytes put on the socket so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
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
            let before = inner.bytes;
            inner.bytes = inner.bytes.saturating_sub(taken);
            let high = self.high_water();
            // Past its high-water mark, a console may hold its VM back as
            // the fastest; within an eighth of full, as a lagger that kept
            // up: either way the VM looks again.
            let drained = (before > high && inner.bytes <= high) || before > self.limit - high;
            if inner.bytes <= high {
                inner.behind = false;
                inner.lagging_since = None;
            }
            if inner.queue.is_empty() {
                inner.queue = VecDeque::new();
            }
            drop(inner);
            self.room.notify_waiters();
            if drained {
                self.wake_pacer();
            }
            return Poll::Ready(Batch::Data(Taken {
                chunks,
                control,
                encoding,
            }));
        }
        if inner.closed && (encoding != Encoding::Hold || inner.queue.is_empty()) {
            return Poll::Ready(Batch::End);
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

    #[tokio::test]
    async fn the_pacer_hears_of_draining_deciding_and_closing() {
        let pacer = Arc::new(Notify::new());
        let heard = |o: &Outbox, act: &dyn Fn(&Outbox)| {
            let n = pacer.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            act(o);
            futures_ready(n)
        };
        let o = Outbox::new(160, Encoding::Hold);
        o.pace_with(pacer.clone());
        o.push(Bytes::from(vec![0; 30]));
        let lvl = o.level();
        assert_eq!((lvl.queued, lvl.undecided, lvl.closed), (30, true, false));
        assert!(heard(&o, &|o| o.set_encoding(Encoding::Raw)), "decided");
        assert!(
            !heard(&o, &|o| o.set_encoding(Encoding::Telnet)),
            "not news"
        );
        // Draining from above the high-water mark (20) to it is news; a
        // batch that leaves it above is not.
        let mut small = Outbox::new(160, Encoding::Raw);
        small.pace_with(pacer.clone());
        small.push(Bytes::from(vec![0; 30]));
        assert!(!heard(&small, &|o| drop(crate::testing::poll_once(o, 5))));
        assert!(heard(&small, &|o| drop(crate::testing::poll_once(o, 20))));
        assert!(!heard(&small, &|o| drop(crate::testing::poll_once(o, 20))));
        assert!(heard(&small, &|o| o.close(None)));
        small = Outbox::new(160, Encoding::Raw);
        small.pace_with(pacer.clone());
        assert!(heard(&small, &|o| o.abandon(Bytes::from_static(b"bye"))));
        assert!(o.level().undecided.eq(&false));
    }

    /// Whether a notification future is already complete.
    fn futures_ready<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> bool {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        f.poll(&mut cx).is_ready()
    }
}
