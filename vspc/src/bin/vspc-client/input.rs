//! Input from the user: a thread does the blocking reads of stdin and sends
//! the chunks to the session, telling the raw mode's VTIME timeout apart
//! from end of input.

use std::io::Read;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::terminal::ReadState;

/// An empty read this long after it started, in raw mode, is the VTIME
/// timeout; a quicker one is end of input (a hung-up terminal).
const VTIME_MIN: Duration = Duration::from_millis(50);

/// Chunks of stdin; closed at end of input (or a read error). `state` is
/// shared with the [`Terminal`](crate::terminal::Terminal).
pub(crate) fn spawn_stdin_reader(
    state: Arc<ReadState>,
) -> std::io::Result<mpsc::Receiver<Vec<u8>>> {
    let (tx, rx) = mpsc::channel::<Vec<u8>>(4);
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let raw_before = state.raw.load(Ordering::SeqCst);
                if !raw_before {
                    state.cooked_read.store(true, Ordering::SeqCst);
                }
                let started = Instant::now();
                let got = stdin.read(&mut buf);
                let raw_after = state.raw.load(Ordering::SeqCst);
                match got {
                    Ok(0) if (raw_before || raw_after) && started.elapsed() >= VTIME_MIN => {
                        if tx.is_closed() {
                            return;
                        }
                    }
                    Ok(0) => return,
                    Ok(n) => {
                        if tx.blocking_send(buf[..n].to_vec()).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => return,
                }
            }
        })?;
    Ok(rx)
}
