//! Drives one connection: bytes from the socket into its [`Session`], its
//! [`Outbox`] out to the socket, and the session's timers, all in one task.
//!
//! Plain TCP reads wait for readiness and then read into a per-thread
//! buffer, so an idle connection owns no read buffer at all; TLS reads need
//! their own. Writes take batches from the outbox; with pacing
//! (`--vm-tx-rate`) the batches are small and spaced out.

use crate::outbox::{Batch, Outbox, BATCH_BYTES};
use crate::session::{Flow, Session};
use crate::wire::encode;
use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tokio::time::{sleep_until, Instant, Sleep};
use tokio_rustls::server::TlsStream;

/// Size of the shared read buffer (one per worker thread).
const READ_BUF: usize = 64 * 1024;

/// How long a closing connection may take to flush its farewell.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Console input resumes when the VM's queue is down to this.
const INPUT_LOW_WATER: usize = 16 * 1024;

thread_local! {
    static BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; READ_BUF]);
}

/// A transport the daemon serves.
pub enum Stream {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

type Writer = Box<dyn AsyncWrite + Send + Unpin>;

enum Reader {
    Tcp(OwnedReadHalf),
    Tls(ReadHalf<TlsStream<TcpStream>>, Box<[u8]>),
}

impl Reader {
    /// Wait for bytes and hand them to `f`; Ok(0) at end of stream.
    async fn read_with(&mut self, f: &mut (dyn FnMut(&[u8]) + Send)) -> io::Result<usize> {
        match self {
            Reader::Tcp(r) => loop {
                r.readable().await?;
                let got = BUF.with(|cell| {
                    let mut buf = cell.borrow_mut();
                    match r.try_read(&mut buf[..]) {
                        Ok(n) => {
                            if n > 0 {
                                f(&buf[..n]);
                            }
                            Ok(Some(n))
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                        Err(e) => Err(e),
                    }
                })?;
                if let Some(n) = got {
                    return Ok(n);
                }
            },
            Reader::Tls(r, buf) => {
                let n = r.read(buf).await?;
                if n > 0 {
                    f(&buf[..n]);
                }
                Ok(n)
            }
        }
    }
}

/// Serve `stream` with `session` until either side closes. `pace` limits
/// writes to that many bytes per second.
pub async fn serve<S: Session>(
    stream: Stream,
    session: &mut S,
    outbox: Arc<Outbox>,
    pace: Option<u64>,
) {
    let (reader, writer): (Reader, Writer) = match stream {
        Stream::Tcp(tcp) => {
            let _ = tcp.set_nodelay(true);
            let (r, w) = tcp.into_split();
            (Reader::Tcp(r), Box::new(w))
        }
        Stream::Tls(tls) => {
            let (r, w) = tokio::io::split(*tls);
            (
                Reader::Tls(r, vec![0; 16 * 1024].into_boxed_slice()),
                Box::new(w),
            )
        }
    };
    run(reader, writer, session, outbox, pace).await;
    session.on_close();
}

async fn run<S: Session>(
    mut reader: Reader,
    writer: Writer,
    session: &mut S,
    outbox: Arc<Outbox>,
    pace: Option<u64>,
) {
    let write = write_loop(writer, outbox.clone(), pace);
    tokio::pin!(write);
    // Rarely needed states live on the heap only while needed, so an idle
    // connection's task stays small: the drain wait while input is
    // throttled, and one timer for the session's deadline or the close grace.
    let mut wait: Option<Pin<Box<dyn Future<Output = ()> + Send>>> = None;
    let mut timer: Option<(Instant, Pin<Box<Sleep>>)> = None;
    let mut reading = true;
    let mut give_up: Option<Instant> = None;
    loop {
        let due = match (session.deadline().map(Instant::from_std), give_up) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match (due, &mut timer) {
            (None, t) => *t = None,
            (Some(at), Some((set, sleep))) if *set != at => {
                sleep.as_mut().reset(at);
                *set = at;
            }
            (Some(_), Some(_)) => {}
            (Some(at), t @ None) => *t = Some((at, Box::pin(sleep_until(at)))),
        }
        let mut flow = Flow::Continue;
        let mut timer_fired = false;
        {
            let mut on_input = |d: &[u8]| flow = session.on_input(d);
            tokio::select! {
                _ = &mut write => break,
                r = reader.read_with(&mut on_input), if reading && wait.is_none() => {
                    match r {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) => {
                            tracing::debug!(error = %e, "read failed");
                            break;
                        }
                    }
                }
                _ = async {
                    if let Some(w) = wait.as_mut() {
                        w.await
                    }
                }, if wait.is_some() => {
                    wait = None;
                }
                _ = async {
                    if let Some((_, t)) = timer.as_mut() {
                        t.await
                    }
                }, if timer.is_some() => {
                    timer_fired = true;
                }
            }
        }
        if timer_fired {
            timer = None;
            if give_up.is_some_and(|g| Instant::now() >= g) {
                break;
            }
            flow = session.on_deadline(std::time::Instant::now());
        }
        match flow {
            Flow::Continue => {}
            Flow::Wait(o) => {
                wait = Some(Box::pin(async move { o.drained(INPUT_LOW_WATER).await }));
            }
            Flow::Close => {
                outbox.close(None);
                reading = false;
                give_up.get_or_insert_with(|| Instant::now() + CLOSE_GRACE);
            }
        }
    }
    // Nothing more will be written: refuse further pushes.
    outbox.close(None);
}

async fn write_loop(mut w: Writer, outbox: Arc<Outbox>, pace: Option<u64>) {
    let max = match pace {
        Some(rate) => (rate / 20).clamp(1, BATCH_BYTES as u64) as usize,
        None => BATCH_BYTES,
    };
    let mut cr_pending = false;
    let mut scratch: Vec<u8> = Vec::new();
    let mut next_at = Instant::now();
    loop {
        let chunks = match outbox.next_batch(max).await {
            Batch::End => {
                let _ = w.shutdown().await;
                return;
            }
            Batch::Data(chunks) => chunks,
        };
        let nvt = outbox.nvt();
        let written = if nvt {
            scratch.clear();
            for c in &chunks {
                encode::nvt_cr(c, &mut cr_pending, &mut scratch);
            }
            let r = w.write_all(&scratch).await;
            r.map(|()| scratch.len())
        } else {
            // Several chunks (shared with other consoles) go out in one
            // writev, without copying them together first.
            write_chunks(&mut w, &chunks).await
        };
        let written = match written {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = %e, "write failed");
                return;
            }
        };
        if let Err(e) = w.flush().await {
            tracing::debug!(error = %e, "flush failed");
            return;
        }
        if let Some(rate) = pace {
            let now = Instant::now();
            if next_at < now {
                next_at = now;
            }
            next_at += Duration::from_secs_f64(written as f64 / rate as f64);
            // Boxed: only paced connections pay for a timer in their state.
            Box::pin(sleep_until(next_at)).await;
        }
        if scratch.capacity() > 4 * BATCH_BYTES {
            scratch = Vec::new();
        }
    }
}

/// Write every chunk, in order, with vectored writes; returns the bytes
/// written.
async fn write_chunks(w: &mut Writer, chunks: &[bytes::Bytes]) -> io::Result<usize> {
    if let [one] = chunks {
        w.write_all(one).await?;
        return Ok(one.len());
    }
    let total = chunks.iter().map(|c| c.len()).sum();
    let mut slices: Vec<io::IoSlice<'_>> = chunks.iter().map(|c| io::IoSlice::new(c)).collect();
    let mut rest: &mut [io::IoSlice<'_>] = &mut slices;
    while !rest.is_empty() {
        let n = w.write_vectored(rest).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        io::IoSlice::advance_slices(&mut rest, n);
    }
    Ok(total)
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
        fn on_input(&mut self, _d: &[u8]) -> Flow {
            Flow::Continue
        }
        fn deadline(&self) -> Option<std::time::Instant> {
            None
        }
        fn on_deadline(&mut self, _n: std::time::Instant) -> Flow {
            Flow::Continue
        }
        fn on_close(&mut self) {}
    }

    #[tokio::test]
    async fn connection_driver_stays_small() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let mut s = Nop;
        let f = serve(Stream::Tcp(a), &mut s, Arc::new(Outbox::new(100)), None);
        let size = std::mem::size_of_val(&f);
        assert!(
            size <= 1024,
            "connection driver future grew to {size} bytes"
        );
        assert!(std::mem::size_of::<Outbox>() <= 192);
    }
}
