//! Admin-port clients: the listing as vSPC.py's `vSPCClient` asks for it
//! (query protocol v3, vspc/PROTOCOL.md §7.1) and the pickles to build
//! such queries by hand, the native line protocol, and the waits built on
//! them (a VM listed, a VM gone, a VM's console count).
//!
//! [`try_list_vms`] is the one listing client: the tests, the load tool
//! (as `sim::list_vms`) and [`list_vms`] (which panics on a failure) all
//! use it.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::launcher::Daemon;
use crate::wait::{POLL, T};

/// `pickle(3)`, protocol 2.
pub const PICKLE_VERSION_3: &[u8] = b"\x80\x02\x4b\x03\x2e";
/// `pickle(None)`, protocol 2.
pub const PICKLE_NONE: &[u8] = b"\x80\x02\x4e\x2e";

/// `pickle(s)` for a str, protocol 2 (BINUNICODE).
pub fn pickle_str(s: &str) -> Vec<u8> {
    let mut out = vec![0x80, 0x02, 0x58];
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
    out.push(0x2e);
    out
}

/// One row of the listing: name, uuid (display form), console port.
pub type VmRow = (String, String, Option<u16>);

/// The daemon's VM listing, like `vSPCClient` with no VM name, sorted;
/// panics on any protocol failure.
pub async fn list_vms(admin: SocketAddr) -> Vec<VmRow> {
    match try_list_vms(admin).await {
        Ok(rows) => rows,
        Err(e) => panic!("admin query on {admin} failed: {e}"),
    }
}

/// Largest single pickle [`try_list_vms`] accepts from the daemon (one listing
/// row is about a hundred bytes).
const LISTING_MAX_PICKLE: usize = 64 * 1024;

/// Most rows [`try_list_vms`] believes the daemon when it announces a count.
const LISTING_MAX_ROWS: i64 = 1_000_000;

/// The daemon's VM listing from its admin port, asked the way vSPC.py's
/// `vSPCClient` asks with no VM name (query protocol version 3): every VM's
/// name, uuid (display form, `0123456789abcdef-fedcba9800000000`) and
/// console port (`None` without console ports), sorted (by name first).
///
/// Each step (connecting, every read, every write) waits at most
/// [`T`] ([`io::ErrorKind::TimedOut`]); an answer that breaks
/// the protocol is [`io::ErrorKind::InvalidData`], and the daemon closing
/// early is [`io::ErrorKind::UnexpectedEof`].
pub async fn try_list_vms(admin: SocketAddr) -> io::Result<Vec<VmRow>> {
    use vspc_codec::pickle::Value;
    let stream = admin_step("connecting", TcpStream::connect(admin)).await?;
    stream.set_nodelay(true)?;
    let mut client = AdminClient {
        stream,
        pickles: vspc_codec::pickle::Stream::new(LISTING_MAX_PICKLE),
    };
    client.send(&[Value::Int(3)]).await?;
    match client.next().await? {
        Value::Int(v) if v >= 3 => {}
        other => {
            return Err(invalid_answer(format!(
                "the daemon offered query protocol {other:?}; version 3 is needed"
            )))
        }
    }
    let ask = [Value::None, Value::Str("free_for_all_or_readonly".into())];
    client.send(&ask).await?;
    match client.next().await? {
        Value::Str(s) if s == "vm_not_found" => {}
        other => {
            return Err(invalid_answer(format!(
                "the daemon answered a listing request with {other:?}, not 'vm_not_found'"
            )))
        }
    }
    let count = match client.next().await? {
        Value::Int(n) if (0..=LISTING_MAX_ROWS).contains(&n) => n as usize,
        other => return Err(invalid_answer(format!("listing row count {other:?}"))),
    };
    let mut rows = Vec::with_capacity(count.min(4096));
    for _ in 0..count {
        rows.push(listing_row(client.next().await?)?);
    }
    rows.sort();
    Ok(rows)
}

/// One listing row: a dict with `name`, `uuid` (strings) and `port` (an int
/// or None). Other keys are ignored.
fn listing_row(entry: vspc_codec::pickle::Value) -> io::Result<VmRow> {
    use vspc_codec::pickle::Value;
    let Value::Dict(items) = entry else {
        return Err(invalid_answer(format!(
            "listing row {entry:?} is not a dict"
        )));
    };
    let (mut name, mut uuid, mut port) = (None, None, None);
    for (key, value) in items {
        let Value::Str(key) = key else { continue };
        match (key.as_str(), value) {
            ("name", Value::Str(v)) => name = Some(v),
            ("uuid", Value::Str(v)) => uuid = Some(v),
            ("port", Value::None) => port = Some(None),
            ("port", Value::Int(p)) => match u16::try_from(p) {
                Ok(p) => port = Some(Some(p)),
                Err(_) => return Err(invalid_answer(format!("listing port {p} is out of range"))),
            },
            _ => {}
        }
    }
    match (name, uuid, port) {
        (Some(name), Some(uuid), Some(port)) => Ok((name, uuid, port)),
        (name, uuid, port) => Err(invalid_answer(format!(
            "listing row lacks a string name, a string uuid or an int/None port \
             (name {name:?}, uuid {uuid:?}, port {port:?})"
        ))),
    }
}

fn invalid_answer(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("admin port: {msg}"))
}

/// One admin-port step, limited to [`T`].
async fn admin_step<T>(
    what: &str,
    step: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    match tokio::time::timeout(T, step).await {
        Ok(res) => res,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("admin port: no progress {what} within {T:?}"),
        )),
    }
}

/// The client side of one admin connection: back-to-back pickles both ways.
struct AdminClient {
    stream: TcpStream,
    pickles: vspc_codec::pickle::Stream,
}

impl AdminClient {
    /// Send `values` as back-to-back pickles in one write.
    async fn send(&mut self, values: &[vspc_codec::pickle::Value]) -> io::Result<()> {
        let bytes: Vec<u8> = values.iter().flat_map(vspc_codec::pickle::encode).collect();
        admin_step("writing", self.stream.write_all(&bytes)).await
    }

    /// The next pickle from the daemon.
    async fn next(&mut self) -> io::Result<vspc_codec::pickle::Value> {
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            match self.pickles.next_value() {
                Ok(Some(value)) => return Ok(value),
                Ok(None) => {}
                Err(e) => return Err(invalid_answer(format!("bad pickle: {e}"))),
            }
            let n = admin_step("reading", self.stream.read(&mut chunk)).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "admin port: the daemon closed the connection in the middle of the answer",
                ));
            }
            self.pickles.feed(&chunk[..n]);
        }
    }
}

/// Poll the listing until the VM called `name` (or with uuid `name`) has a
/// console port; returns (uuid, port).
pub async fn wait_for_vm(admin: SocketAddr, name: &str, limit: Duration) -> (String, u16) {
    let deadline = Instant::now() + limit;
    loop {
        let rows = list_vms(admin).await;
        if let Some((_, uuid, Some(port))) = rows.iter().find(|r| r.0 == name || r.1 == name) {
            return (uuid.clone(), *port);
        }
        if Instant::now() > deadline {
            panic!("VM {name:?} not listed with a port within {limit:?}; listing: {rows:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Poll the listing until `name` is gone; false if it is still there.
pub async fn wait_vm_gone(admin: SocketAddr, name: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if !list_vms(admin).await.iter().any(|r| r.0 == name) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The line the native admin protocol answers to `cmd` (on a connection
/// of its own).
pub async fn admin_line(admin: SocketAddr, cmd: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(admin)
        .await
        .expect("admin port");
    s.write_all(format!("{cmd}\n").as_bytes())
        .await
        .expect("admin write");
    let mut out = Vec::new();
    let mut b = [0u8; 4096];
    while !out.ends_with(b"\n") {
        let n = tokio::time::timeout(T, s.read(&mut b))
            .await
            .expect("admin answer in time")
            .expect("admin read");
        assert!(n > 0, "admin port closed");
        out.extend_from_slice(&b[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The native `list` row of the VM called `name` (its `name`, `uuid`,
/// `port`, `vm_connected` and `consoles`), if it is listed.
pub async fn native_vm(admin: SocketAddr, name: &str) -> Option<serde_json::Value> {
    let line = admin_line(admin, "list").await;
    let mut v: serde_json::Value = serde_json::from_str(&line).ok()?;
    let rows = v.get_mut("vms")?.as_array_mut()?;
    let at = rows.iter().position(|vm| vm["name"] == name)?;
    Some(rows.swap_remove(at))
}

/// Wait until the native `list` shows the VM called `name` listed but
/// without its connection (`vm_connected` false): the daemon has handled
/// the VM's close. Panics after [`T`].
pub async fn wait_vm_disconnected(admin: SocketAddr, name: &str) {
    crate::wait::wait_for(
        T,
        &format!("VM {name} listed as disconnected"),
        async || {
            let row = native_vm(admin, name).await;
            match row.as_ref().map(|r| &r["vm_connected"]) {
                Some(serde_json::Value::Bool(false)) => Ok(()),
                _ => Err(format!("its row is {row:?}")),
            }
        },
    )
    .await
}

/// How many consoles the VM called `name` has (the native `list`), if it
/// is listed.
pub async fn console_count(admin: SocketAddr, name: &str) -> Option<usize> {
    let row = native_vm(admin, name).await?;
    row["consoles"].as_u64().map(|n| n as usize)
}

/// Wait until the VM called `name` has exactly `n` consoles attached, for
/// at most [`T`].
pub async fn wait_consoles(d: &Daemon, name: &str, n: usize) {
    wait_consoles_within(d.admin, name, n, T).await
}

/// [`wait_consoles`] on any admin port, for at most `limit`.
pub async fn wait_consoles_within(admin: SocketAddr, name: &str, n: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let now = console_count(admin, name).await;
        if now == Some(n) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "VM {name} should have {n} console(s) within {limit:?}; the admin port says {now:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}
