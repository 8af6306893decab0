//! What a task waits for when the core holds it back: a boxed future the
//! waiting connection drives with its own waker (the VM's consoles and
//! lossless backends for its output, the VM's queue for console input).
//! It lives below the hub and the backends, so neither imports the
//! sessions that drive it.

use std::future::Future;
use std::pin::Pin;

/// Something a session waits for (backpressure), driven by its connection.
pub type WaitFuture = Pin<Box<dyn Future<Output = ()> + Send>>;
