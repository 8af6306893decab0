//! vSPC.py's query protocol (`vspc/PROTOCOL.md` §7.1): back-to-back pickles.
//! The server sends its version (3); the client sends its version, the VM
//! (name or uuid, or None to list) and a lock mode; the answer is
//! `vm_not_found` plus the listing, `lock_invalid`, `lock_failed`, or
//! `vm_found` with the lock granted and the recent output, after which the
//! connection is a telnet console session.
//!
//! Pickles are read by [`super::pickle`], which only builds plain values
//! and refuses anything that would import or call code.

use super::pickle::{self, Value};
use crate::hub::{Access, AttachError, ConsoleProtocol, Hub, LockMode, Vm};
use crate::net::conn::{serve_console, Stream};
use crate::session::open::{self, Find, History, OpenError, Request};
use crate::session::Session;
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

/// Serve one vSPC.py query-protocol connection.
pub async fn serve(hub: Arc<Hub>, tcp: TcpStream) {
    let peer = tcp.peer_addr().ok();
    match query(hub, tcp).await {
        Ok(()) => {}
        Err(AdminError::Eof) => tracing::debug!(?peer, "admin client left"),
        Err(e) => tracing::info!(?peer, "admin connection ended: {e}"),
    }
}

struct Conn {
    tcp: TcpStream,
    pickles: pickle::Stream,
}

impl Conn {
    async fn read_value(&mut self) -> Result<Value, AdminError> {
        loop {
            if let Some(v) = self.pickles.next_value()? {
                return Ok(v);
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(STEP_TIMEOUT, self.tcp.read(&mut chunk))
                .await
                .map_err(|_| AdminError::Timeout(STEP_TIMEOUT))??;
            if n == 0 {
                return Err(AdminError::Eof);
            }
            self.pickles.feed(&chunk[..n]);
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
    let mut c = Conn {
        tcp,
        pickles: pickle::Stream::new(MAX_PICKLE),
    };
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
    let remote = match (&vm, &wanted, hub.cluster()) {
        (None, Value::Str(s), Some(cluster)) => cluster
            .remote_vms()
            .into_iter()
            .find(|v| v.record.uuid == *s)
            .map(|v| v.record.uuid),
        _ => None,
    };
    if let Some(uuid) = remote {
        let mode = match &lock {
            Value::Str(m) => LockMode::parse(m),
            _ => None,
        };
        let Some(mode) = mode else {
            return c.send(&Value::Str("lock_invalid".into())).await;
        };
        return remote_session(hub, &uuid, mode, c).await;
    }
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
    let mode = match &lock {
        Value::Str(m) => LockMode::parse(m),
        _ => None,
    };
    let Some(mode) = mode else {
        tracing::info!(vm = %vm.name(), lock = ?lock, "admin client asked for an unknown lock mode");
        return c.send(&Value::Str("lock_invalid".into())).await;
    };
    console_session(hub, vm, mode, c).await
}

/// vSPC.py's name for what was granted.
fn granted_name(a: Access) -> &'static str {
    match a {
        Access::Exclusive => "exclusive",
        Access::Write => "write",
        Access::FreeForAll => "free_for_all",
        Access::ReadOnly => "free_for_all_or_readonly",
    }
}

/// A console of a VM another node of the cluster holds: opened there, with
/// the same lock rules. Its recent output comes first in the telnet
/// stream (then a marker line) rather than in the pickle, so that no byte
/// falls between the two.
async fn remote_session(
    hub: Arc<Hub>,
    uuid: &str,
    mode: LockMode,
    mut c: Conn,
) -> Result<(), AdminError> {
    let Some(cluster) = hub.cluster() else {
        return c.send(&Value::Str("vm_not_found".into())).await;
    };
    let spec = crate::hub::RemoteSpec {
        mode,
        protocol: ConsoleProtocol::Telnet,
        history: true,
        door: crate::audit::Kind::AdminVspc.as_str(),
        client: c.tcp.peer_addr().ok(),
        user: None,
    };
    let mut opened = match cluster.open_remote(uuid, spec).await {
        Ok(o) => o,
        Err(e) => {
            tracing::info!(%uuid, "admin console of another node's VM refused: {e:?}");
            let answer = match e {
                crate::hub::RemoteError::Refused(_) => "lock_failed",
                _ => "vm_not_found",
            };
            return c.send(&Value::Str(answer.into())).await;
        }
    };
    let answers = [
        Value::Str("vm_found".into()),
        Value::Str(granted_name(opened.access).into()),
        Value::Str(String::new()),
    ];
    for answer in &answers {
        c.send(answer).await?;
    }
    tracing::info!(vm = %opened.vm.record.name, node = %opened.vm.node, access = opened.access.as_str(), "admin console session (vSPC.py protocol) for another node's VM");
    let rest = c.pickles.take_rest();
    if !rest.is_empty() && opened.pipe.write_all(&rest).await.is_err() {
        return Ok(());
    }
    let mut tcp = c.tcp;
    let _ = tokio::io::copy_bidirectional(&mut tcp, &mut opened.pipe).await;
    Ok(())
}

/// Take the lock and turn the connection into a console session.
async fn console_session(
    hub: Arc<Hub>,
    vm: Arc<Vm>,
    mode: LockMode,
    mut c: Conn,
) -> Result<(), AdminError> {
    // The seed travels in a pickle here, not in the telnet stream.
    let request = Request {
        vm: Find::Vm(vm.clone()),
        mode,
        protocol: ConsoleProtocol::Telnet,
        history: History::Apart,
        door: crate::audit::Kind::AdminVspc,
        peer: c.tcp.peer_addr().ok(),
        user: None,
    };
    let (mut session, seed) = match open::open(&hub, request).await {
        Ok(opened) => (opened.session, opened.history),
        Err(e) => {
            tracing::info!(vm = %vm.name(), "admin console refused: {e}");
            let answer = match e {
                OpenError::Refused(AttachError::LockFailed { .. } | AttachError::Full { .. }) => {
                    "lock_failed"
                }
                _ => "vm_not_found",
            };
            return c.send(&Value::Str(answer.into())).await;
        }
    };
    let answers = [
        Value::Str("vm_found".into()),
        Value::Str(granted_name(session.access()).into()),
        Value::Str(String::from_utf8_lossy(&seed).into_owned()),
    ];
    for answer in &answers {
        if let Err(e) = c.send(answer).await {
            session.on_close(std::time::Instant::now());
            return Err(e);
        }
    }
    tracing::info!(vm = %vm.name(), access = session.access().as_str(), "admin console session (vSPC.py protocol)");
    let rest = c.pickles.take_rest();
    if !rest.is_empty() {
        session.on_input(&rest, std::time::Instant::now());
    }
    serve_console(Stream::Tcp(c.tcp), &mut session).await;
    Ok(())
}
