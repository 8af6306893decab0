//! A real `redis-server` for the tests: the test kit's
//! ([`vspc_testkit::redis`], shared with the end-to-end cluster tests), and
//! a poll for async conditions.

#![allow(dead_code, unused_imports)]

use std::time::{Duration, Instant};

pub use vspc_testkit::redis::{random_port, random_u32, Redis, REDIS_SERVER};

/// Poll `f` every 20 ms until it is true or `within` has passed.
pub async fn wait_for<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
