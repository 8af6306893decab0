//! A connection's outbound queue.
//!
//! Producers (the VM's reader fanning out, consoles typing, the session's own
//! replies) push encoded byte chunks; the connection's writer takes them in
//! batches. Nothing here ever waits on the socket, so a producer never blocks
//! on a slow peer: it sees the queue's size and decides (a console that falls
//! behind is dropped; a console typing into a slow VM waits for [`drained`]).
//! An empty queue holds no heap memory.
//!
//! Two lanes: protocol messages (negotiation, VMware replies such as
//! GOAHEAD) go ahead of queued data, so pacing or a long paste never delays
//! an answer ESXi waits for. The writer only switches lanes between data
//! pieces that end on a whole telnet escape, so a reply can never land inside
//! an `IAC IAC` pair.
//!
//! [`drained`]: Outbox::drained

use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use tokio::sync::Notify;

/// What [`Outbox::push`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Queued; this many bytes are now waiting.
    Queued(usize),
    /// Over the limit: nothing queued; the outbox is now closed and the
    /// connection will be dropped after the farewell, if any.
    Overflow,
    /// The connection is closing; nothing queued.
    Closed,
}

#[derive(Debug, Default)]
struct Inner {
    control: VecDeque<Bytes>,
    queue: VecDeque<Bytes>,
    bytes: usize,
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
    /// Most bytes that may wait; past this, pushes with a limit fail.
    limit: usize,
    /// The peer refused BINARY: the writer applies NVT rules (CR -> CR NUL).
    nvt: std::sync::atomic::AtomicBool,
}

/// A batch of chunks the writer took, or the end of the stream.
pub enum Batch {
    Data(Vec<Bytes>),
    End,
}

/// The most the writer takes at once when not pacing.
pub const BATCH_BYTES: usize = 256 * 1024;

impl Outbox {
    pub fn new(limit: usize) -> Outbox {
        Outbox {
            inner: Mutex::new(Inner::default()),
            room: Notify::new(),
            limit,
            nvt: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves the queue consistent (every
        // mutation is a single push/pop), so poisoning is safe to ignore.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue `data` if it fits under the limit; otherwise close the outbox,
    /// queueing `farewell` (if any) as the last thing the peer receives.
    pub fn push(&self, data: Bytes, farewell: Option<&[u8]>) -> Push {
        let mut inner = self.lock();
        if inner.closed {
            return Push::Closed;
        }
        if inner.bytes + data.len() > self.limit {
            inner.queue.clear();
            inner.bytes = 0;
            if let Some(msg) = farewell {
                inner.queue.push_back(Bytes::copy_from_slice(msg));
            }
            inner.closed = true;
            unlock_and_wake(inner);
            self.room.notify_waiters();
            return Push::Overflow;
        }
        inner.bytes += data.len();
        inner.queue.push_back(data);
        let n = inner.bytes;
        unlock_and_wake(inner);
        Push::Queued(n)
    }

    /// Queue `data` regardless of the limit (protocol replies, which are
    /// small and must not be lost). Returns false if the outbox is closed.
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

    /// Queue a protocol message ahead of any queued data.
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

    /// Bytes waiting to be written.
    pub fn queued(&self) -> usize {
        self.lock().bytes
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Switch NVT output rules on or off (see the `nvt` field).
    pub fn set_nvt(&self, on: bool) {
        self.nvt.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn nvt(&self) -> bool {
        self.nvt.load(std::sync::atomic::Ordering::Relaxed)
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

    /// The writer's side: take a batch of at most about `max` bytes
    /// (protocol messages first), or the end; when there is nothing to take,
    /// `cx` is woken by the next push or the close. One writer per outbox.
    pub fn poll_batch(&self, cx: &mut Context<'_>, max: usize) -> Poll<Batch> {
        let mut inner = self.lock();
        // The control lane's buffer leaves with the batch: an idle outbox
        // keeps no allocation.
        let mut batch = Vec::from(std::mem::take(&mut inner.control));
        let mut taken = 0;
        while taken < max {
            let Some(mut chunk) = inner.queue.pop_front() else {
                break;
            };
            let room = max - taken;
            if chunk.len() > room {
                let rest = chunk.split_off(safe_cut(&chunk, room));
                if !rest.is_empty() {
                    inner.queue.push_front(rest);
                }
            }
            taken += chunk.len();
            batch.push(chunk);
        }
        if !batch.is_empty() {
            inner.bytes = inner.bytes.saturating_sub(taken);
            if inner.queue.is_empty() {
                inner.queue = VecDeque::new();
            }
            drop(inner);
            self.room.notify_waiters();
            return Poll::Ready(Batch::Data(batch));
        }
        if inner.closed {
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

/// Where to cut escaped data near `want` without splitting an `IAC IAC`
/// pair: a prefix that ends in an odd run of 0xFF takes one byte more.
fn safe_cut(escaped: &[u8], want: usize) -> usize {
    let want = want.max(1).min(escaped.len());
    let run = escaped[..want]
        .iter()
        .rev()
        .take_while(|&&b| b == 0xFF)
        .count();
    if run % 2 == 1 {
        (want + 1).min(escaped.len())
    } else {
        want
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Wait for the next batch, as the connection's writer does.
    async fn next_batch(o: &Outbox, max: usize) -> Batch {
        std::future::poll_fn(|cx| o.poll_batch(cx, max)).await
    }

    #[tokio::test]
    async fn overflow_closes_with_farewell() {
        let o = Outbox::new(10);
        assert_eq!(o.push(Bytes::from_static(b"12345"), None), Push::Queued(5));
        assert_eq!(
            o.push(Bytes::from_static(b"123456"), Some(b"bye")),
            Push::Overflow
        );
        assert_eq!(o.push(Bytes::from_static(b"1"), None), Push::Closed);
        match next_batch(&o, BATCH_BYTES).await {
            Batch::Data(b) => assert_eq!(b, vec![Bytes::from_static(b"bye")]),
            Batch::End => panic!("farewell lost"),
        }
        assert!(matches!(next_batch(&o, BATCH_BYTES).await, Batch::End));
    }

    #[tokio::test]
    async fn control_goes_first_and_never_splits_an_escape() {
        let o = Outbox::new(1000);
        o.push(Bytes::from_static(b"ab\xff\xffcd"), None);
        o.push_control(Bytes::from_static(b"!"));
        // Asking for 3 bytes would cut between the two 0xFF: take 4.
        match next_batch(&o, 3).await {
            Batch::Data(b) => assert_eq!(b.concat(), b"!ab\xff\xff"),
            Batch::End => panic!(),
        }
        assert_eq!(o.take_data(), vec![Bytes::from_static(b"cd")]);
        assert_eq!(o.queued(), 0);
    }

    #[tokio::test]
    async fn close_flushes_queue_first() {
        let o = Outbox::new(100);
        o.push(Bytes::from_static(b"a"), None);
        o.close(Some(Bytes::from_static(b"z")));
        match next_batch(&o, BATCH_BYTES).await {
            Batch::Data(b) => assert_eq!(b.concat(), b"az"),
            Batch::End => panic!(),
        }
        assert!(matches!(next_batch(&o, BATCH_BYTES).await, Batch::End));
    }
}
