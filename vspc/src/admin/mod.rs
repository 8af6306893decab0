//! The admin port: vSPC.py's query protocol (pickled values, version 3,
//! with versions 1 and 2 for old clients; PROTOCOL.md §7.2).
//!
//! A vSPC.py client sends its version pickle without waiting, so the first
//! byte tells the protocols apart: a pickle starts with PROTO (0x80) or a
//! protocol-0 opcode. A client that says nothing for a moment is assumed to
//! be a vSPC.py client waiting for the server's version.
//!
//! What works here: the listing (every VM's name, uuid and port) and
//! connecting to a VM in free-for-all mode. Exclusive and write locks are
//! answered `lock_invalid` until lock support lands.

pub mod pickle;

use crate::hub::{Hub, Vm};
use crate::net::conn::{serve, Stream};
use crate::session::console::ConsoleSession;
use crate::session::Session;
use pickle::Value;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vspc_backend_api::VmRecord;

/// The query-protocol version this server speaks.
const Q_VERS: i64 = 3;
/// Largest pickle accepted from a client.
const MAX_PICKLE: usize = 64 * 1024;
/// How long a client may take for each message.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for a client's first byte before speaking first.
const FIRST_BYTE_WAIT: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
enum AdminError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("bad pickle from admin client: {0}")]
    Pickle(#[from] pickle::PickleError),
    #[error("admin client was silent for {0:?}")]
    Timeout(Duration),
    #[error("admin client closed the connection")]
    Eof,
}

/// Serve one admin connection.
pub async fn serve_admin(hub: Arc<Hub>, tcp: TcpStream) {
    let peer = tcp.peer_addr().ok();
    match query(hub, tcp).await {
        Ok(()) => {}
        Err(AdminError::Eof) => tracing::debug!(?peer, "admin client left"),
        Err(e) => tracing::info!(?peer, "admin connection ended: {e}"),
    }
}

struct Conn {
    tcp: TcpStream,
    buf: Vec<u8>,
    decoder: pickle::Decoder,
}

impl Conn {
    async fn read_value(&mut self) -> Result<Value, AdminError> {
        loop {
            if !self.buf.is_empty() {
                if let Some((v, used)) = self.decoder.decode(&self.buf)? {
                    self.buf.drain(..used);
                    self.decoder = pickle::Decoder::new(MAX_PICKLE);
                    return Ok(v);
                }
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(STEP_TIMEOUT, self.tcp.read(&mut chunk))
                .await
                .map_err(|_| AdminError::Timeout(STEP_TIMEOUT))??;
            if n == 0 {
                return Err(AdminError::Eof);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn send(&mut self, v: &Value) -> Result<(), AdminError> {
        let bytes = pickle::encode(v);
        tokio::time::timeout(STEP_TIMEOUT, self.tcp.write_all(&bytes))
            .await
            .map_err(|_| AdminError::Timeout(STEP_TIMEOUT))??;
        Ok(())
    }
}

fn row(r: &VmRecord) -> Value {
    Value::Dict(vec![
        (Value::Str("name".into()), Value::Str(r.name.clone())),
        (Value::Str("uuid".into()), Value::Str(r.uuid.clone())),
        (
            Value::Str("port".into()),
            r.port.map_or(Value::None, |p| Value::Int(p.into())),
        ),
    ])
}

async fn query(hub: Arc<Hub>, tcp: TcpStream) -> Result<(), AdminError> {
    let _ = tcp.set_nodelay(true);
    let mut c = Conn {
        tcp,
        buf: Vec::new(),
        decoder: pickle::Decoder::new(MAX_PICKLE),
    };
    // Let the client speak first if it will (it tells us its protocol).
    let mut first = [0u8; 4096];
    match tokio::time::timeout(FIRST_BYTE_WAIT, c.tcp.read(&mut first)).await {
        Ok(Ok(0)) => return Err(AdminError::Eof),
        Ok(Ok(n)) => c.buf.extend_from_slice(&first[..n]),
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => {}
    }
    c.send(&Value::Int(Q_VERS)).await?;
    let client_vers = match c.read_value().await {
        Ok(Value::Int(v)) => v,
        Ok(Value::Str(s)) if s.trim().parse::<i64>().is_ok() => s.trim().parse().unwrap_or(0),
        Ok(other) => {
            c.send(&Value::Exception("I don't understand".into()))
                .await?;
            tracing::info!("admin client sent {other:?} instead of a version");
            return Ok(());
        }
        Err(AdminError::Pickle(e)) => {
            let _ = c.send(&Value::Exception("I don't understand".into())).await;
            return Err(AdminError::Pickle(e));
        }
        Err(e) => return Err(e),
    };
    let vers = client_vers.min(Q_VERS);
    let listing = || async { hub.listing().await.iter().map(row).collect::<Vec<_>>() };
    match vers {
        1 => {
            let rows = listing().await;
            c.send(&Value::Tuple(vec![Value::Int(1), Value::List(rows)]))
                .await?;
            return Ok(());
        }
        2 | 3 => {}
        _ => {
            c.send(&Value::Exception("No common version".into()))
                .await?;
            return Ok(());
        }
    }
    let wanted = c.read_value().await?;
    let lock = c.read_value().await?;
    let vm = match &wanted {
        Value::Str(s) => hub.find(s),
        _ => None,
    };
    let Some(vm) = vm else {
        c.send(&Value::Str("vm_not_found".into())).await?;
        let rows = listing().await;
        if vers == 3 {
            c.send(&Value::Int(rows.len() as i64)).await?;
            for r in &rows {
                c.send(r).await?;
            }
        } else {
            c.send(&Value::List(rows)).await?;
        }
        return Ok(());
    };
    match lock {
        Value::Str(mode) if mode == "free_for_all" || mode == "free_for_all_or_readonly" => {
            console_session(hub, vm, c).await
        }
        other => {
            tracing::info!(vm = %vm.name(), lock = ?other, "admin client asked for a lock mode this build does not grant");
            c.send(&Value::Str("lock_invalid".into())).await
        }
    }
}

/// Grant free-for-all access and turn the connection into a console.
async fn console_session(hub: Arc<Hub>, vm: Arc<Vm>, mut c: Conn) -> Result<(), AdminError> {
    let peer = hub.new_peer(hub.config().console_queue);
    let seed = hub.backend().seed_data(vm.record()).await;
    let (neg, opening) = ConsoleSession::opening();
    peer.outbox.push_control(opening.into());
    // Joins the fan-out now so no output is missed; the outbox is written
    // only after the answers below.
    if let Err(e) = hub.attach_console(&vm, peer.clone()) {
        tracing::info!(vm = %vm.name(), "admin console refused: {e}");
        return c.send(&Value::Str("lock_failed".into())).await;
    }
    let answers = [
        Value::Str("vm_found".into()),
        Value::Str("free_for_all".into()),
        Value::Str(String::from_utf8_lossy(&seed).into_owned()),
    ];
    for answer in &answers {
        if let Err(e) = c.send(answer).await {
            hub.detach_console(&vm, peer.id);
            return Err(e);
        }
    }
    let mut session = ConsoleSession::new(hub, vm, peer.clone(), neg);
    let rest = std::mem::take(&mut c.buf);
    if !rest.is_empty() {
        session.on_input(&rest);
    }
    serve(Stream::Tcp(c.tcp), &mut session, peer.outbox, None).await;
    Ok(())
}
