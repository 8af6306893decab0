//! Drives one connection: bytes from the socket into its [`Session`], its
//! [`Outbox`] out to the socket, and the session's timers.
//!
//! [`Conn`] is a hand-written future rather than an `async` block, because
//! an idle connection holds its whole task for as long as it is open: with
//! thousands of VMs the driver's size is most of the daemon's memory. Its
//! resting state is the socket, the session, the outbox handle and a few
//! flags; the rarely needed parts (a timer, the input-throttle wait, the
//! pacing state, a TLS read buffer) live on the heap only while needed.
//! Plain TCP reads wait for readiness and then read into a per-thread
//! buffer, so an idle connection owns no read buffer at all.
//!
//! Writes take batches from the outbox and go out with vectored writes, so
//! chunks shared with other consoles are never copied together; with pacing
//! (`--vm-tx-rate`) the batches are small and spaced out.
//!
//! Flow control lives in the session ([`Session::poll_ready`]), asked
//! before every read: it drives its own waits (the VM's consoles and
//! lossless backends, the VM's own queue for console input) with this
//! connection's waker, and says whether to read on. Reads are capped at a
//! slice ([`Conn::read_slice`]) well below a console's queue, so one read
//! can never overflow a queue by itself.
//!
//! A console that stops taking output is given up on by its own progress,
//! never by a rate over a short interval: once its socket is full while
//! output waits, it has the stall timeout to take at least
//! [`STALL_FLOOR`] bytes per second on average (a reader that takes
//! nothing, or trickles a byte a second, cannot hold its VM back for
//! ever), or until it catches up; otherwise it is told why, if it can
//! still take that, and closed ([`Conn::stall_timeout`]). A reader that a
//! busy machine deschedules for a second or two is far above the floor
//! over the whole timeout.

use crate::outbox::{Batch, Outbox, BATCH_BYTES};
use crate::session::{Flow, Session};
use bytes::{Buf, Bytes};
use std::cell::RefCell;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{sleep_until, Instant, Sleep};
use tokio_rustls::server::TlsStream;

/// Size of the shared read buffer (one per worker thread).
const READ_BUF: usize = 64 * 1024;

/// Size of a TLS connection's own read buffer.
const TLS_READ_BUF: usize = 16 * 1024;

/// How long a closing connection may take to flush its farewell.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// How long a stalled console gets to take the notice of why it goes.
const STALL_GRACE: Duration = Duration::from_secs(2);

/// A console that is behind must take at least this many bytes per second,
/// on average over the whole stall timeout, to stay: far below any real
/// client (a 9,600-baud terminal takes 960), far above a reader that has
/// stopped.
pub const STALL_FLOOR: u64 = 1024;

/// Chunks handed to one vectored write.
const MAX_IOV: usize = 64;

/// Reads (or batches written) in one poll before other tasks get a turn.
const ROUNDS: usize = 32;

thread_local! {
    static BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; READ_BUF]);
}

/// A transport the daemon serves.
pub enum Stream {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// One end of an in-process pipe whose other end an adapter serves
    /// (the browser console: [`crate::doors::http::web`] moves bytes between the pipe
    /// and a WebSocket). The pipe's buffer is the socket buffer: a pipe the
    /// adapter does not empty fills, and the console stalls as on TCP.
    Pipe(DuplexStream),
}

enum Io {
    /// Shared with the outbox, which asks the socket itself whether the
    /// client is behind ([`Outbox::probe_with`]).
    Tcp(Arc<TcpStream>),
    Tls(Box<(TlsStream<TcpStream>, [u8; TLS_READ_BUF])>),
    Pipe(DuplexStream),
}

/// What a read gave.
enum Got {
    Input(Flow),
    Eof,
}

impl Io {
    /// Read once and hand the bytes to `session`.
    fn poll_read_into<S: Session>(
        &mut self,
        cx: &mut Context<'_>,
        session: &mut S,
        max: usize,
    ) -> Poll<io::Result<Got>> {
        match self {
            Io::Tcp(tcp) => loop {
                ready!(tcp.poll_read_ready(cx))?;
                let got = BUF.with(|cell| {
                    let mut buf = cell.borrow_mut();
                    let slice = max.clamp(1, buf.len());
                    match tcp.try_read(&mut buf[..slice]) {
                        Ok(0) => Ok(Some(Got::Eof)),
                        Ok(n) => Ok(Some(Got::Input(
                            session.on_input(&buf[..n], Instant::now().into_std()),
                        ))),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                        Err(e) => Err(e),
                    }
                })?;
                if let Some(got) = got {
                    return Poll::Ready(Ok(got));
                }
            },
            Io::Tls(tls) => {
                let (stream, buf) = &mut **tls;
                let slice = max.clamp(1, buf.len());
                let mut rb = ReadBuf::new(&mut buf[..slice]);
                ready!(Pin::new(stream).poll_read(cx, &mut rb))?;
                let data = rb.filled();
                Poll::Ready(Ok(if data.is_empty() {
                    Got::Eof
                } else {
                    Got::Input(session.on_input(data, Instant::now().into_std()))
                }))
            }
            // A pipe read copies what is buffered at once, so the shared
            // per-thread buffer serves it as it serves TCP.
            Io::Pipe(pipe) => BUF.with(|cell| {
                let mut buf = cell.borrow_mut();
                let slice = max.clamp(1, buf.len());
                let mut rb = ReadBuf::new(&mut buf[..slice]);
                ready!(Pin::new(pipe).poll_read(cx, &mut rb))?;
                let data = rb.filled();
                Poll::Ready(Ok(if data.is_empty() {
                    Got::Eof
                } else {
                    Got::Input(session.on_input(data, Instant::now().into_std()))
                }))
            }),
        }
    }

    fn poll_write_vectored(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self {
            Io::Tcp(t) => loop {
                ready!(t.poll_write_ready(cx))?;
                match t.try_write_vectored(bufs) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    r => return Poll::Ready(r),
                }
            },
            Io::Tls(t) => Pin::new(&mut t.0).poll_write_vectored(cx, bufs),
            Io::Pipe(p) => Pin::new(p).poll_write_vectored(cx, bufs),
        }
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Io::Tcp(_) | Io::Pipe(_) => Poll::Ready(Ok(())),
            Io::Tls(t) => Pin::new(&mut t.0).poll_flush(cx),
        }
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Io::Tcp(t) => Poll::Ready(
                rustix::net::shutdown(&**t, rustix::net::Shutdown::Write).or_else(|e| match e {
                    rustix::io::Errno::NOTCONN => Ok(()),
                    e => Err(e.into()),
                }),
            ),
            Io::Tls(t) => Pin::new(&mut t.0).poll_shutdown(cx),
            Io::Pipe(p) => Pin::new(p).poll_shutdown(cx),
        }
    }
}

/// Output pacing (`--vm-tx-rate`).
struct Pace {
    rate: u64,
    next_at: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
}

/// Where the writing side is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum WriteState {
    /// Taking batches and writing them.
    Open,
    /// The outbox ended: sending FIN (or TLS close_notify).
    ShuttingDown,
}

/// Serves one connection with session `S` until either side closes; then
/// calls [`Session::on_close`].
pub struct Conn<S: Session + Unpin> {
    io: Io,
    session: S,
    outbox: Arc<Outbox>,
    /// The batch being written; `written` chunks of it are out.
    batch: Vec<Bytes>,
    written: usize,
    /// Bytes written since the last flush.
    unflushed: usize,
    /// The session's deadline or the close grace, whichever is first.
    timer: Option<Pin<Box<Sleep>>>,
    pace: Option<Box<Pace>>,
    /// Closing: input is no longer read, and flushing the farewell is given
    /// up at this time.
    give_up: Option<Instant>,
    /// Since when output has waited for a full socket without the peer
    /// catching up (the start of the current stall window).
    stalled_since: Option<Instant>,
    /// Bytes the socket took since `stalled_since` (saturating).
    stalled_sent: u32,
    /// Close the connection once it has been stalled this many
    /// milliseconds; 0 waits forever (VM connections: ESXi's own flow
    /// control applies).
    stall_ms: u32,
    /// Largest batch taken from the outbox.
    max_batch: u32,
    /// Largest read handed to the session at once.
    read_max: u32,
    state: WriteState,
    /// NVT output: the last byte written was a CR.
    cr_pending: bool,
    done: bool,
}

/// Told to a console that took (almost) no output for the stall timeout.
pub fn stall_notice(limit: Duration) -> Bytes {
    Bytes::from(format!(
        "\r\nvspc: this console took no output for {} s while output waited; disconnecting it.\r\n",
        limit.as_secs_f64()
    ))
}

impl<S: Session + Unpin> Conn<S> {
    /// A driver for `stream`; `pace` limits writes to that many bytes per
    /// second.
    pub fn new(stream: Stream, session: S, outbox: Arc<Outbox>, pace: Option<u64>) -> Conn<S> {
        let io = match stream {
            Stream::Tcp(tcp) => {
                let _ = tcp.set_nodelay(true);
                let tcp = Arc::new(tcp);
                outbox.probe_with(Arc::downgrade(&tcp));
                Io::Tcp(tcp)
            }
            Stream::Tls(tls) => Io::Tls(Box::new((*tls, [0; TLS_READ_BUF]))),
            Stream::Pipe(pipe) => Io::Pipe(pipe),
        };
        let max_batch = match pace {
            Some(rate) => (rate / 20).clamp(1, BATCH_BYTES as u64) as u32,
            None => BATCH_BYTES as u32,
        };
        Conn {
            io,
            session,
            outbox,
            batch: Vec::new(),
            written: 0,
            unflushed: 0,
            timer: None,
            pace: pace.map(|rate| {
                Box::new(Pace {
                    rate,
                    next_at: Instant::now(),
                    sleep: None,
                })
            }),
            give_up: None,
            stalled_since: None,
            stalled_sent: 0,
            stall_ms: 0,
            max_batch,
            read_max: READ_BUF as u32,
            state: WriteState::Open,
            cr_pending: false,
            done: false,
        }
    }

    /// Hand the session at most `bytes` per read (a VM's read slice).
    pub fn read_slice(mut self, bytes: usize) -> Self {
        self.read_max = bytes.clamp(1, READ_BUF) as u32;
        self
    }

    /// Give up on a peer that, once behind, takes less than
    /// [`STALL_FLOOR`] bytes per second over `limit` while output waits for
    /// it (consoles).
    pub fn stall_timeout(mut self, limit: Option<Duration>) -> Self {
        self.stall_ms = limit.map_or(0, |l| l.as_millis().clamp(1, u32::MAX as u128) as u32);
        self
    }

    fn stall_limit(&self) -> Option<Duration> {
        (self.stall_ms > 0).then(|| Duration::from_millis(u64::from(self.stall_ms)))
    }

    fn apply(&mut self, flow: Flow) {
        match flow {
            Flow::Continue => {}
            Flow::Close => {
                self.outbox.close(None);
                self.give_up
                    .get_or_insert_with(|| Instant::now() + CLOSE_GRACE);
            }
        }
    }

    /// Read while there is input; `Ready` when the connection is over.
    fn poll_reading(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        for _ in 0..ROUNDS {
            ready!(self.session.poll_ready(cx));
            if self.give_up.is_some() {
                return Poll::Pending;
            }
            let max = self.read_max as usize;
            match ready!(self.io.poll_read_into(cx, &mut self.session, max)) {
                Ok(Got::Input(flow)) => self.apply(flow),
                Ok(Got::Eof) => return Poll::Ready(()),
                Err(e) => {
                    tracing::debug!(error = %e, "read failed");
                    return Poll::Ready(());
                }
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Arm the timer for the next deadline; `Ready` when it has passed.
    fn poll_timer(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let stall = self
            .stalled_since
            .zip(self.stall_limit())
            .map(|(s, l)| s + l);
        let due = [
            self.session.deadline().map(Instant::from_std),
            self.give_up,
            stall,
        ]
        .into_iter()
        .flatten()
        .min();
        match (due, &mut self.timer) {
            (None, t) => *t = None,
            (Some(at), Some(sleep)) => {
                if sleep.deadline() != at {
                    sleep.as_mut().reset(at);
                }
            }
            (Some(at), t @ None) => *t = Some(Box::pin(sleep_until(at))),
        }
        match self.timer.as_mut() {
            Some(t) => t.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }

    /// Write what the outbox has; `Ready` when writing is over (the outbox
    /// ended and the stream is shut down, or the peer is gone).
    fn poll_writing(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self.write_some(cx) {
            Poll::Ready(Err(e)) => {
                tracing::debug!(error = %e, "write failed");
                Poll::Ready(())
            }
            Poll::Ready(Ok(())) => Poll::Ready(()),
            Poll::Pending => Poll::Pending,
        }
    }

    fn write_some(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.state == WriteState::ShuttingDown {
            return self.io.poll_shutdown(cx);
        }
        for _ in 0..ROUNDS {
            // Finish the batch in hand.
            while self.written < self.batch.len() {
                let mut slices = [IoSlice::new(&[]); MAX_IOV];
                let mut k = 0;
                for c in &self.batch[self.written..] {
                    if k == MAX_IOV {
                        break;
                    }
                    slices[k] = IoSlice::new(c);
                    k += 1;
                }
                let n = match self.io.poll_write_vectored(cx, &slices[..k]) {
                    Poll::Ready(r) => r?,
                    Poll::Pending => {
                        self.outbox.set_full(true);
                        if self.stalled_since.is_none() {
                            self.stalled_since = Some(Instant::now());
                            self.stalled_sent = 0;
                        }
                        return Poll::Pending;
                    }
                };
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.outbox.set_full(false);
                self.stalled_sent = self
                    .stalled_sent
                    .saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
                self.outbox.count_sent(n);
                self.unflushed += n;
                self.advance(n);
            }
            if !self.batch.is_empty() {
                self.batch = Vec::new();
                self.written = 0;
            }
            if self.unflushed > 0 {
                ready!(self.io.poll_flush(cx))?;
                let sent = std::mem::take(&mut self.unflushed);
                if let Some(p) = self.pace.as_mut() {
                    let now = Instant::now();
                    p.next_at =
                        p.next_at.max(now) + Duration::from_secs_f64(sent as f64 / p.rate as f64);
                    p.sleep = Some(Box::pin(sleep_until(p.next_at)));
                }
            }
            // Paced: wait for the next slot.
            if let Some(p) = self.pace.as_mut() {
                if let Some(s) = p.sleep.as_mut() {
                    ready!(s.as_mut().poll(cx));
                    p.sleep = None;
                }
            }
            let batch = match self.outbox.poll_batch(cx, self.max_batch as usize) {
                Poll::Ready(b) => b,
                Poll::Pending => {
                    // Everything queued is out: the peer has caught up.
                    self.stalled_since = None;
                    return Poll::Pending;
                }
            };
            match batch {
                Batch::Data(taken) => {
                    self.batch = taken.into_wire(&mut self.cr_pending);
                }
                Batch::End => {
                    self.state = WriteState::ShuttingDown;
                    return self.io.poll_shutdown(cx);
                }
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Account for `n` bytes of the batch written.
    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let c = &mut self.batch[self.written];
            if n >= c.len() {
                n -= c.len();
                self.written += 1;
            } else {
                c.advance(n);
                n = 0;
            }
        }
    }

    fn finish(&mut self) -> Poll<()> {
        self.done = true;
        // Nothing more will be written: refuse further pushes.
        self.outbox.close(None);
        self.session.on_close(Instant::now().into_std());
        Poll::Ready(())
    }
}

impl<S: Session + Unpin> Future for Conn<S> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(());
        }
        if this.poll_reading(cx).is_ready() {
            return this.finish();
        }
        // The session's deadline (after the input, which may move it).
        let mut rounds = 0;
        while this.poll_timer(cx).is_ready() {
            this.timer = None;
            let now = Instant::now();
            if this.give_up.is_some_and(|g| now >= g) {
                return this.finish();
            }
            if let Some(limit) = this.stall_limit() {
                if this.stalled_since.is_some_and(|s| now >= s + limit) {
                    let floor = STALL_FLOOR.saturating_mul(limit.as_secs().max(1));
                    if u64::from(this.stalled_sent) >= floor {
                        // Behind, but taking output: a new window.
                        this.stalled_since = Some(now);
                        this.stalled_sent = 0;
                        continue;
                    }
                    // Only the reason waits now; if the socket takes even
                    // that within the grace, the peer learns why.
                    tracing::info!(
                        stalled_s = limit.as_secs_f64(),
                        took = this.stalled_sent,
                        "disconnecting a console that took no output, or less than the stall floor, for the stall timeout"
                    );
                    this.outbox.abandon(stall_notice(limit));
                    this.session.on_stall();
                    this.stalled_since = None;
                    this.stall_ms = 0;
                    this.give_up = Some(now + STALL_GRACE);
                    continue;
                }
            }
            let flow = this.session.on_deadline(std::time::Instant::now());
            this.apply(flow);
            rounds += 1;
            if rounds == ROUNDS {
                cx.waker().wake_by_ref();
                break;
            }
        }
        // Last, so replies queued by the input and the timer go out now.
        if this.poll_writing(cx).is_ready() {
            return this.finish();
        }
        // A write that just stalled starts the stall clock: arm it.
        if this.stall_ms > 0 && this.stalled_since.is_some() && this.poll_timer(cx).is_ready() {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }
}

/// A session borrowed for the length of a [`Conn`].
impl<S: Session + ?Sized> Session for &mut S {
    fn on_input(&mut self, data: &[u8], now: std::time::Instant) -> Flow {
        (**self).on_input(data, now)
    }
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        (**self).poll_ready(cx)
    }
    fn deadline(&self) -> Option<std::time::Instant> {
        (**self).deadline()
    }
    fn on_deadline(&mut self, now: std::time::Instant) -> Flow {
        (**self).on_deadline(now)
    }
    fn on_close(&mut self, now: std::time::Instant) {
        (**self).on_close(now)
    }
    fn on_stall(&mut self) {
        (**self).on_stall()
    }
}

/// Serve a console session on `stream` until either side closes: the
/// session's own outbox and stall timeout, no pacing (the one way every
/// door that hands a console a stream of its own serves it).
pub async fn serve_console(stream: Stream, session: &mut crate::session::console::ConsoleSession) {
    let outbox = session.outbox();
    let stall = session.stall_timeout();
    Conn::new(stream, session, outbox, None)
        .stall_timeout(stall)
        .await
}

/// What the pipe of [`serve_console_over_pipe`] holds each way (a socket
/// buffer's worth).
pub const PIPE_BYTES: usize = 64 * 1024;

/// Serve a console over an in-process pipe, for a door whose client is not
/// a byte stream of its own (an SSH channel, a WebSocket): `adapter` gets
/// the pipe's other end and moves bytes between it and the client, with
/// the same driver, flow control and stall rule as a TCP console. When the
/// client goes, the adapter returns and drops its end, and the driver ends
/// when it reads that; when the console ends first (cleared, stalled), the
/// adapter gets [`CLOSE_GRACE`] to pass on the last bytes.
pub async fn serve_console_over_pipe<F, A>(
    session: &mut crate::session::console::ConsoleSession,
    adapter: A,
) where
    A: FnOnce(tokio::io::DuplexStream) -> F,
    F: std::future::Future<Output = ()>,
{
    let (ours, theirs) = tokio::io::duplex(PIPE_BYTES);
    let conn = serve_console(Stream::Pipe(ours), session);
    let pump = adapter(theirs);
    tokio::pin!(conn, pump);
    tokio::select! {
        _ = &mut pump => conn.await,
        _ = &mut conn => {
            let _ = tokio::time::timeout(CLOSE_GRACE, pump).await;
        }
    }
}

/// Write `msg` to a stream that gets no session, then close it.
pub async fn say_and_close<S: AsyncWrite + AsyncRead + Unpin>(mut s: S, msg: &[u8]) {
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        let _ = s.write_all(msg).await;
        let _ = s.shutdown().await;
    })
    .await;
}

#[cfg(test)]
mod size_budget {
    //! Every idle connection holds its task's whole future, so these sizes
    //! are per-connection memory. The budgets fail the build's tests if the
    //! driver grows by accident (figures from debug builds; release is
    //! smaller).
    use super::*;
    use crate::session::Flow;

    struct Nop;
    impl Session for Nop {
        fn on_input(&mut self, _d: &[u8], _now: std::time::Instant) -> Flow {
            Flow::Continue
        }
        fn deadline(&self) -> Option<std::time::Instant> {
            None
        }
        fn on_deadline(&mut self, _n: std::time::Instant) -> Flow {
            Flow::Continue
        }
        fn on_close(&mut self, _now: std::time::Instant) {}
    }

    #[tokio::test]
    async fn connection_driver_stays_small() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let f = Conn::new(
            Stream::Tcp(a),
            Nop,
            Arc::new(Outbox::new(100, crate::outbox::Encoding::Raw)),
            None,
        );
        let size = std::mem::size_of_val(&f);
        assert!(size <= 192, "connection driver future grew to {size} bytes");
        let outbox = std::mem::size_of::<Outbox>();
        assert!(outbox <= 208, "outbox grew to {outbox} bytes");
    }
}
