//! Output to the server: a task owns the socket's write half, so the
//! session never blocks on a slow server while the server has output for
//! us. It counts the bytes in flight, so the session stops reading stdin
//! while too much waits, and shuts down our sending side when done.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

/// Stop reading stdin while this much input waits for the socket.
const INFLIGHT_LIMIT: usize = 256 * 1024;

/// The sending end of the writer task; dropping it ends the task.
pub(crate) struct Outgoing {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    inflight: Arc<AtomicUsize>,
}

impl Outgoing {
    /// Start the writer task: the sender, a notification each time a write
    /// completes, and the task (its result is the write half's fate).
    pub(crate) fn start(
        wr: OwnedWriteHalf,
    ) -> (Outgoing, Arc<Notify>, JoinHandle<std::io::Result<()>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let inflight = Arc::new(AtomicUsize::new(0));
        let drained = Arc::new(Notify::new());
        let task = tokio::spawn(write_loop(wr, rx, inflight.clone(), drained.clone()));
        (Outgoing { tx, inflight }, drained, task)
    }

    pub(crate) fn send(&self, bytes: Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        self.inflight.fetch_add(bytes.len(), Ordering::SeqCst);
        // A closed channel means the writer failed; the session notices.
        let _ = self.tx.send(bytes);
    }

    /// Whether less than [`INFLIGHT_LIMIT`] bytes wait to be written.
    pub(crate) fn has_room(&self) -> bool {
        self.inflight.load(Ordering::SeqCst) < INFLIGHT_LIMIT
    }
}

async fn write_loop(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    inflight: Arc<AtomicUsize>,
    drained: Arc<Notify>,
) -> std::io::Result<()> {
    while let Some(bytes) = rx.recv().await {
        wr.write_all(&bytes).await?;
        inflight.fetch_sub(bytes.len(), Ordering::SeqCst);
        drained.notify_one();
    }
    // Every sender is gone: we are done sending; tell the server.
    wr.shutdown().await
}
