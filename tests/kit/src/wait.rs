//! Time in the tests: the named durations every test uses, and waits that
//! poll for a condition up to a deadline instead of sleeping a fixed time.
//!
//! A test waits for what it needs (a log line, a listing, a metric, a
//! byte), never for "long enough": on a busy machine any fixed wait is too
//! short some day, and on an idle one it is time lost. The only sleeps left
//! in tests are the thing under test (a client that stalls, a trickle) and
//! negative checks ("nothing more arrives within [`SHORT`]").

use std::time::{Duration, Instant};

/// The usual limit for one step of a test: a wait that should take
/// milliseconds, with room for a machine that is busy building.
pub const T: Duration = Duration::from_secs(5);

/// How long "nothing (more) arrives" is watched for, in negative checks:
/// long enough for anything already on its way over loopback to show up.
pub const SHORT: Duration = Duration::from_millis(300);

/// How often the waits here poll.
pub const POLL: Duration = Duration::from_millis(20);

/// How long a console may say nothing before the daemon offers it telnet
/// (`DETECT_WINDOW` in `vspc/src/session/console.rs`).
pub const DETECT_WINDOW: Duration = Duration::from_millis(300);

/// Milliseconds, for short waits in tests.
pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Poll `done` every [`POLL`] until it holds (true) or `limit` passes
/// (false).
pub async fn eventually(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// [`eventually`] for a condition that has to wait itself (an admin query,
/// an HTTP request, a connection attempt).
pub async fn eventually_async(limit: Duration, mut done: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Poll `check` every [`POLL`] until it gives a value; after `limit`,
/// panic with `what` and the last reason `check` gave for not being done.
pub async fn wait_for<V>(
    limit: Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> Result<V, String>,
) -> V {
    let deadline = Instant::now() + limit;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(why) if Instant::now() >= deadline => {
                panic!("{what}: not within {limit:?}: {why}")
            }
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// [`eventually`] outside a runtime: blocks the thread between polls.
pub fn eventually_blocking(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// Wait up to `limit` for `child` to exit; `None` if it is still running
/// (it is left running: the caller kills it or lets its guard do so).
pub async fn child_exit(
    child: &mut std::process::Child,
    limit: Duration,
) -> Option<std::process::ExitStatus> {
    let mut status = None;
    eventually(limit, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    })
    .await;
    status
}

/// The length of the file at `path`, 0 if it is missing (transcripts and
/// stores appear when first written).
pub fn file_len(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Whether the file at `path` exists and its bytes satisfy `ok`.
pub fn file_holds(path: &std::path::Path, ok: impl FnOnce(&[u8]) -> bool) -> bool {
    std::fs::read(path).is_ok_and(|b| ok(&b))
}
