//! The admin port. Two protocols, told apart by the client's first byte:
//!
//! - a lowercase letter: the native line protocol ([`native`]): one command
//!   per line (`list`, `connect VM [MODE]`, `clear VM`, `help`, `version`,
//!   `quit`), one JSON object per answer line;
//! - anything else, or silence: vSPC.py's query protocol ([`query`]):
//!   pickled values, version 3 (1 and 2 for old clients), so an unchanged
//!   vSPC.py `vSPCClient` works.
//!
//! Both list VMs, open console sessions under a lock (exclusive, write,
//! free-for-all, free-for-all-or-read-only) and, in the native protocol,
//! clear a VM's consoles.

pub mod native;
pub mod query;

pub use vspc_codec::pickle;

use crate::hub::Hub;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

/// How long to wait for a client's first byte before assuming a vSPC.py
/// client that waits for the server's version.
const FIRST_BYTE_WAIT: Duration = Duration::from_millis(500);

/// Told to every console of a VM that an admin cleared.
pub const CLEARED_MSG: &[u8] = b"\r\nvspc: this console was cleared by an administrator.\r\n";

/// Serve one admin connection.
pub async fn serve_admin(hub: Arc<Hub>, tcp: TcpStream) {
    let _ = tcp.set_nodelay(true);
    let mut first = [0u8; 1];
    let native = matches!(
        tokio::time::timeout(FIRST_BYTE_WAIT, tcp.peek(&mut first)).await,
        Ok(Ok(1)) if first[0].is_ascii_lowercase()
    );
    if native {
        native::serve(hub, tcp).await
    } else {
        query::serve(hub, tcp).await
    }
}
