//! What the daemon's in-process unit tests share: a hub with no network
//! (no console ports, no backends) and a way to see what an outbox would
//! write, without a socket or a runtime.

use crate::backend_host::Backends;
use crate::hub::{ConsoleProtocol, Hub, HubConfig};
use crate::outbox::{Batch, Outbox};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

/// A hub without console ports or backends.
pub fn hub(expire: Duration, vmotion_timeout: Duration, console_queue: usize) -> Arc<Hub> {
    Hub::new(
        HubConfig {
            port_range_start: 1,
            vm_ports: false,
            interface: "127.0.0.1".parse().expect("address"),
            expire,
            vmotion_timeout,
            client_limit: None,
            console_queue,
            console_protocol: ConsoleProtocol::Auto,
            console_stall: None,
            replay_bytes: 16384,
            console_replay: false,
        },
        Backends::spawn(Vec::new(), 1 << 20).expect("backend threads"),
    )
}

struct NoWake;

impl Wake for NoWake {
    fn wake(self: Arc<Self>) {}
}

/// One poll of the outbox's writer side, with a waker that does nothing.
pub fn poll_once(o: &Outbox, max: usize) -> Poll<Batch> {
    let waker = Waker::from(Arc::new(NoWake));
    let mut cx = Context::from_waker(&waker);
    o.poll_batch(&mut cx, max)
}

/// Everything the outbox would write now, as it goes on the wire, and
/// whether it has ended.
pub fn written(o: &Outbox) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    loop {
        match poll_once(o, usize::MAX) {
            Poll::Ready(Batch::Data(t)) => out.extend(t.into_wire(&mut false).concat()),
            Poll::Ready(Batch::End) => return (out, true),
            Poll::Pending => return (out, false),
        }
    }
}
