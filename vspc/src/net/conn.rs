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
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tokio::time::{sleep_until, Instant};
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
    let mut wait: Option<Arc<Outbox>> = None;
    let mut reading = true;
    let mut give_up: Option<Instant> = None;
    loop {
        let deadline = session.deadline().map(Instant::from_std);
        let far = Instant::now() + Duration::from_secs(86400);
        let mut flow = Flow::Continue;
        let mut deadline_hit = false;
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
                    if let Some(w) = &wait {
                        w.drained(INPUT_LOW_WATER).await
                    }
                }, if wait.is_some() => {
                    wait = None;
                }
                _ = sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => {
                    deadline_hit = true;
                }
                _ = sleep_until(give_up.unwrap_or(far)), if give_up.is_some() => break,
            }
        }
        if deadline_hit {
            flow = session.on_deadline(std::time::Instant::now());
        }
        match flow {
            Flow::Continue => {}
            Flow::Wait(o) => wait = Some(o),
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
        let data: &[u8] = if chunks.len() == 1 && !nvt {
            &chunks[0]
        } else {
            scratch.clear();
            for c in &chunks {
                if nvt {
                    encode::nvt_cr(c, &mut cr_pending, &mut scratch);
                } else {
                    scratch.extend_from_slice(c);
                }
            }
            &scratch
        };
        if let Err(e) = w.write_all(data).await {
            tracing::debug!(error = %e, "write failed");
            return;
        }
        if let Err(e) = w.flush().await {
            tracing::debug!(error = %e, "flush failed");
            return;
        }
        if let Some(rate) = pace {
            let now = Instant::now();
            if next_at < now {
                next_at = now;
            }
            next_at += Duration::from_secs_f64(data.len() as f64 / rate as f64);
            sleep_until(next_at).await;
        }
        if scratch.capacity() > 4 * BATCH_BYTES {
            scratch = Vec::new();
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
