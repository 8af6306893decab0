//! The control plane in Redis: who holds which VM, console ports unique
//! across the cluster, vMotion tickets, node heartbeats.
//!
//! Every key lives under `vspc:{CLUSTER}:` (the braces are a Redis hash
//! tag: on a Redis Cluster every key of one vspc cluster shares a slot, so
//! a script may touch any of them); two clusters on one Redis never see
//! each other's keys.
//!
//! | key | type | what |
//! | --- | --- | --- |
//! | `vms` | hash | uuid -> JSON record: name, port, owner node, epoch, connected, disconnected-since, port-held-since |
//! | `ports` | hash | port -> uuid (or `@NODE`: a spare port NODE keeps for an outage) |
//! | `free` | sorted set | freed ports below `next` (score = port) |
//! | `next` | string | the lowest port never handed out |
//! | `top` | string | where spare ports are taken from, going down from 65535 |
//! | `epoch` | string | the last epoch handed out (microseconds of Redis's clock, or more) |
//! | `meta` | hash | `range_start`, the cluster's first console port |
//! | `nodes` | sorted set | node name -> last heartbeat (ms, Redis's clock) |
//! | `node:NAME` | hash, TTL | instance id, advertise address, last heartbeat, start; expires when the node stops beating |
//! | `held:NAME` | set | uuids NAME holds |
//! | `spares:NAME` | set | spare ports NAME keeps for an outage |
//! | `mail:NAME` | list | notices for NAME (its VM taken by another node, its VM's port moved), drained by its heartbeat |
//! | `ticket:SEQHEX` | hash, TTL | vMotion ticket: secret, uuid, source node |
//! | `events` | pub/sub channel | hints only (`claim UUID`, `expire UUID`, ...), never the record |
//!
//! Truth is in the `vms` hash, changed only by Lua scripts that compare the
//! epoch: a node acts on a VM only at the epoch it was given, so a stale
//! node cannot undo a newer owner's claim. Times are Redis's clock (`TIME`
//! in the scripts), so a node whose clock is off changes nothing but its
//! own log line about it.
//!
//! **Ports.** A VM keeps its port for as long as its record lives (sticky
//! per uuid, whichever node it connects to). A new VM gets the lowest free
//! port from the range start: the lowest of the `free` set or `next`, so a
//! claim costs O(log n), not a scan.
//!
//! **While Redis is down** ([`Registry::offline_claim`]): a new VM gets one
//! of the node's *spare* ports: a few ports (default 4) each node reserves
//! in Redis ahead of time, from the top of the range down, so that Redis
//! itself has recorded them as that node's and no other node hands them
//! out. That is the one rule that proves a port free without Redis. When
//! the spares are used up, the lowest port free in the node's last view of
//! the cluster (and free locally) is taken, and a conflict, if any, is
//! settled when Redis is back.
//!
//! **Conflicts** ([`Registry::reassert`]): for one uuid, the higher epoch
//! wins (epochs grow with Redis's clock, across restarts); for one port
//! held by two uuids, the VM that has held it longer wins, equal times to
//! the smaller uuid; the loser gets the lowest free port, and its node is
//! told (by its mail) if it is not the node re-asserting.

mod scripts;

use crate::error::Error;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError, ServerErrorKind, Value};
use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// How a [`Registry`] reaches Redis and who it is.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// `redis://[USER:PASSWORD@]HOST:PORT[/DB]` or `rediss://...`.
    pub url: String,
    /// `--cluster-name`: the namespace of every key.
    pub cluster: String,
    /// `--node-name`: unique among the live nodes of the cluster.
    pub node: String,
    /// `--cluster-advertise`: what other nodes dial to reach this one.
    pub advertise: String,
    /// `--port-range-start`: must be the same on every node.
    pub port_range_start: u16,
    /// How often the node beats.
    pub heartbeat: Duration,
    /// How long a node's key outlives its last beat: a node silent this long
    /// is dead to the others.
    pub node_ttl: Duration,
    /// The longest any one call waits for Redis before it says
    /// [`Error::Unavailable`].
    pub op_timeout: Duration,
    /// Ports kept in reserve for VMs that connect while Redis is down.
    pub spares: usize,
    /// `--vm-expire-time`: how long a dead node's disconnected VM keeps its
    /// port (the living owner expires its own VMs, see [`Registry::expire`]).
    pub vm_expire: Duration,
}

impl RegistryConfig {
    /// The defaults: beat every second, dead after 5 s, 2 s per call, 4
    /// spare ports, VMs expire after a day.
    pub fn new(url: &str, cluster: &str, node: &str, advertise: &str, start: u16) -> Self {
        RegistryConfig {
            url: url.to_string(),
            cluster: cluster.to_string(),
            node: node.to_string(),
            advertise: advertise.to_string(),
            port_range_start: start,
            heartbeat: Duration::from_secs(1),
            node_ttl: Duration::from_secs(5),
            op_timeout: Duration::from_secs(2),
            spares: 4,
            vm_expire: Duration::from_secs(86400),
        }
    }
}

/// A VM's port and epoch, as a claim gave them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub port: u16,
    /// The VM's epoch: pass it back to every later call about this VM.
    pub epoch: u64,
    /// Since when the VM has held this port (ms since 1970, Redis's clock):
    /// the older holder wins a port conflict.
    pub held_since_ms: u64,
    /// The node that held the VM before this claim, if another one: it is
    /// told (mail) and must let go of the VM's connection.
    pub previous_node: Option<String>,
    /// Made while Redis was down ([`Registry::offline_claim`]): re-assert
    /// it when Redis is back.
    pub provisional: bool,
}

/// A VM this node holds, as it re-asserts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldVm {
    pub uuid: String,
    pub name: String,
    pub port: u16,
    pub epoch: u64,
    /// Its ESXi connection is up (else it is counting down to expiry).
    pub connected: bool,
    /// Since when it has been disconnected (ms, Redis's clock); 0 while
    /// connected.
    pub disconnected_since_ms: u64,
    /// From [`Claim::held_since_ms`].
    pub held_since_ms: u64,
}

impl HeldVm {
    /// The record of a VM this node claimed.
    pub fn from_claim(uuid: &str, name: &str, claim: &Claim) -> HeldVm {
        HeldVm {
            uuid: uuid.to_string(),
            name: name.to_string(),
            port: claim.port,
            epoch: claim.epoch,
            connected: true,
            disconnected_since_ms: 0,
            held_since_ms: claim.held_since_ms,
        }
    }
}

/// One VM of the cluster, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmEntry {
    pub uuid: String,
    pub name: String,
    pub port: u16,
    /// The node holding it (its ESXi connection, or its last one).
    pub node: String,
    pub epoch: u64,
    pub connected: bool,
    /// Since when it has been disconnected (ms since 1970, Redis's clock).
    pub disconnected_since_ms: Option<u64>,
    /// Since when it has held its port (ms since 1970, Redis's clock).
    pub held_since_ms: u64,
}

impl VmEntry {
    /// What this node re-asserts for an entry it holds.
    pub fn to_held(&self) -> HeldVm {
        HeldVm {
            uuid: self.uuid.clone(),
            name: self.name.clone(),
            port: self.port,
            epoch: self.epoch,
            connected: self.connected,
            disconnected_since_ms: self.disconnected_since_ms.unwrap_or(0),
            held_since_ms: self.held_since_ms,
        }
    }
}

/// One node of the cluster, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEntry {
    pub name: String,
    /// What other nodes dial (`--cluster-advertise`); empty once dead.
    pub advertise: String,
    /// Its last heartbeat (ms since 1970, Redis's clock).
    pub last_heartbeat_ms: u64,
    /// Its key is alive (it beat within the node TTL).
    pub alive: bool,
    /// VMs it holds.
    pub vms: usize,
}

/// A vMotion ticket: which node's VM a destination connection joins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    /// The source node (it holds the VM and its consoles).
    pub node: String,
    pub uuid: String,
}

/// What [`Registry::take_ticket`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TakeTicket {
    /// The ticket was there with this secret: it is consumed.
    Taken(Ticket),
    /// A ticket for the sequence is pending with another secret: left as
    /// it is (a wrong or forged PEER).
    WrongSecret,
    /// No ticket for the sequence (never put, dropped, or timed out).
    Unknown,
}

/// Another node holds a VM at a newer epoch: this node lets go of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost {
    pub uuid: String,
    pub node: String,
    pub epoch: u64,
}

/// A VM's port changed (a conflict was settled against it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    pub uuid: String,
    pub from: u16,
    pub to: u16,
}

/// What a re-assertion did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReassertReport {
    /// Written back (or found) as this node has them.
    pub kept: usize,
    /// Held by another node at a newer epoch: close their connections here.
    pub lost: Vec<Lost>,
    /// This node's VMs that lost a port conflict: new port, tell their
    /// consoles.
    pub moved: Vec<Moved>,
    /// Other nodes' VMs that lost a port conflict to ours (their nodes are
    /// told by mail).
    pub displaced: Vec<Moved>,
    /// No port left for these.
    pub no_port: Vec<String>,
}

/// A VM a dead node held, expired by [`Registry::expire_orphans`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    pub uuid: String,
    pub port: u16,
    pub node: String,
}

/// What the heartbeat task tells the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Redis stopped answering: go on locally.
    RedisDown { detail: String },
    /// Redis answers again (re-assertion follows).
    RedisUp,
    /// Redis came back, restarted or failed over: what this node holds was
    /// written back.
    Reasserted(ReassertReport),
    /// Another node claimed a VM this node held (the newest connection
    /// wins): close its ESXi connection here; its consoles follow the VM.
    VmTaken {
        uuid: String,
        by: String,
        epoch: u64,
    },
    /// A VM of this node was given another port (a conflict settled by
    /// another node's re-assertion): move its listener, tell its consoles.
    PortMoved {
        uuid: String,
        from: u16,
        to: u16,
        epoch: u64,
    },
    /// Dead nodes' VMs expired.
    Expired(Vec<Expired>),
    /// Another live instance holds this node's name now (this node stalled
    /// past its TTL and a namesake started): an operator error.
    NameStolen { instance: String },
    /// This node's clock differs from Redis's by this much (ms); nothing
    /// depends on it but provisional claims' times.
    ClockSkew { offset_ms: i64 },
    /// Another node claimed a VM new to the cluster (a hint over Redis
    /// pub/sub, not the record): the view is worth fetching now, so that
    /// this node opens the VM's console port at once.
    Changed { node: String },
}

/// Counters for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub redis_up: bool,
    /// Calls to Redis, and those that failed as unavailable.
    pub calls: u64,
    pub unavailable: u64,
    pub claims: u64,
    pub offline_claims: u64,
    pub reasserts: u64,
    /// Port conflicts settled (moved plus displaced).
    pub conflicts: u64,
    pub tickets_taken: u64,
    pub tickets_wrong_secret: u64,
    pub tickets_unknown: u64,
}

#[derive(Default)]
struct Counters {
    calls: AtomicU64,
    unavailable: AtomicU64,
    claims: AtomicU64,
    offline_claims: AtomicU64,
    reasserts: AtomicU64,
    conflicts: AtomicU64,
    tickets_taken: AtomicU64,
    tickets_wrong: AtomicU64,
    tickets_unknown: AtomicU64,
}

/// What the heartbeat calls to learn what this node holds.
pub type HeldFn = Arc<dyn Fn() -> Vec<HeldVm> + Send + Sync>;

/// A node's handle on the control plane. Cheap to share (`Arc`); every
/// method is one bounded round trip (or a few, pipelined).
pub struct Registry {
    cfg: RegistryConfig,
    /// `vspc:{CLUSTER}:`.
    prefix: String,
    /// The URL without its password, for messages.
    shown_url: String,
    /// For the pub/sub connection of the change hints.
    client: redis::Client,
    conn: ConnectionManager,
    scripts: scripts::Scripts,
    /// Random per process: tells this node's key from a namesake's.
    instance: String,
    up: AtomicBool,
    counters: Counters,
    /// Redis's clock minus ours, in ms (for provisional claims).
    offset_ms: AtomicI64,
    /// Spare ports Redis has recorded as this node's, not yet used.
    spares: Mutex<Vec<u16>>,
    /// Ports seen taken in the cluster (claims, listings): what an
    /// offline claim beyond the spares avoids.
    known_ports: Mutex<BTreeSet<u16>>,
    /// Node names seen alive: the link's membership check while Redis is
    /// down.
    known_nodes: Mutex<HashSet<String>>,
    /// VMs this node name held in a previous life, handed over once.
    inherited: Mutex<Vec<VmEntry>>,
    /// Redis's `run_id` at the last beat: a change means a restart.
    run_id: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Names that go into keys and messages: host-name characters only.
fn check_name(what: &'static str, value: &str) -> Result<(), Error> {
    let bad = |why| {
        Err(Error::BadName {
            what,
            value: value.to_string(),
            why,
        })
    };
    if value.is_empty() {
        return bad("it is empty");
    }
    if value.len() > 253 {
        return bad("it is longer than 253 characters");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
    {
        return bad("use letters, digits, '.', '-' and '_' only");
    }
    Ok(())
}

/// The URL with its password replaced, for log lines.
fn hide_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.rsplit_once('@') {
        Some((cred, host)) => match cred.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => format!("{scheme}://***@{host}"),
        },
        None => url.to_string(),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A fresh random instance id.
fn instance_id() -> String {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        // Not secret, only distinct: the time and pid do.
        let t = now_us() as u64 ^ u64::from(std::process::id()) << 40;
        b = t.to_le_bytes();
    }
    hex(&b)
}

/// Classifies a failed call: Redis not there (go on locally) or something
/// this vspc did not expect.
fn classify(e: &RedisError) -> Error {
    let unavailable = e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.kind(),
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ReadOnly
            ) | ErrorKind::AuthenticationFailed
        )
        || matches!(e.code(), Some("NOAUTH" | "WRONGPASS" | "LOADING"));
    if unavailable {
        Error::Unavailable {
            detail: e.to_string(),
        }
    } else {
        Error::Protocol {
            detail: e.to_string(),
        }
    }
}

fn v_str(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        Value::Okay => Some("OK".into()),
        _ => None,
    }
}

fn v_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        Value::BulkString(_) | Value::SimpleString(_) => v_str(v)?.parse().ok(),
        _ => None,
    }
}

fn v_port(v: &Value) -> Option<u16> {
    v_u64(v).and_then(|p| u16::try_from(p).ok())
}

fn bad_reply(what: &str, v: &impl std::fmt::Debug) -> Error {
    Error::Protocol {
        detail: format!("unexpected reply to {what}: {v:?}"),
    }
}

/// A VM record as the scripts store it (see `lua/prelude.lua`).
#[derive(serde::Deserialize, serde::Serialize)]
struct Record {
    n: String,
    p: u16,
    o: String,
    /// Epoch, as a decimal string (beyond cjson's number precision).
    e: String,
    c: u8,
    s: u64,
    f: u64,
}

/// A record as `register` hands it back.
#[derive(serde::Deserialize)]
struct InheritedRecord {
    u: String,
    n: String,
    p: u16,
    e: String,
    s: u64,
    f: u64,
}

/// A notice from a node's mail.
#[derive(serde::Deserialize)]
struct Mail {
    k: String,
    u: String,
    #[serde(default)]
    by: String,
    #[serde(default)]
    e: String,
    #[serde(default)]
    from: u16,
    #[serde(default)]
    to: u16,
}

impl Registry {
    /// Connect to Redis and register this node (see [`Registry::connect_with`]).
    pub async fn connect(
        url: &str,
        cluster: &str,
        node: &str,
        advertise: &str,
        port_range_start: u16,
    ) -> Result<Arc<Registry>, Error> {
        Self::connect_with(RegistryConfig::new(
            url,
            cluster,
            node,
            advertise,
            port_range_start,
        ))
        .await
    }

    /// Connect to Redis and register this node. Refuses an unreachable
    /// Redis, a wrong password or database, a name a live node holds, and
    /// a port range start that differs from the cluster's, each with its
    /// own [`Error`]. VMs the same node name held before its key expired
    /// (a restart) are handed over: see [`Registry::inherited`].
    pub async fn connect_with(cfg: RegistryConfig) -> Result<Arc<Registry>, Error> {
        check_name("--cluster-name", &cfg.cluster)?;
        check_name("--node-name", &cfg.node)?;
        // rediss:// goes through rustls, which needs a process-wide crypto
        // provider; ring is the one the workspace builds. Installing fails
        // harmlessly when the daemon has installed one already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let shown_url = hide_password(&cfg.url);
        let client = redis::Client::open(cfg.url.as_str()).map_err(|e| Error::BadUrl {
            url: shown_url.clone(),
            detail: e.to_string(),
        })?;
        // One plain connection first, to tell why it fails: the connection
        // manager would retry instead.
        let probe_cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(cfg.op_timeout))
            .set_response_timeout(Some(cfg.op_timeout));
        let probe = tokio::time::timeout(
            cfg.op_timeout + Duration::from_millis(500),
            client.get_multiplexed_async_connection_with_config(&probe_cfg),
        )
        .await;
        match probe {
            Err(_) => {
                return Err(Error::Unreachable {
                    url: shown_url,
                    detail: format!("no answer within {:?}", cfg.op_timeout),
                })
            }
            Ok(Err(e)) => return Err(startup_error(&shown_url, &e)),
            Ok(Ok(mut c)) => {
                // Without a password the connection opens; the first
                // command says NOAUTH.
                let ping = tokio::time::timeout(
                    cfg.op_timeout,
                    redis::cmd("PING").query_async::<String>(&mut c),
                )
                .await;
                match ping {
                    Err(_) => {
                        return Err(Error::Unreachable {
                            url: shown_url,
                            detail: format!("no answer to PING within {:?}", cfg.op_timeout),
                        })
                    }
                    Ok(Err(e)) => return Err(startup_error(&shown_url, &e)),
                    Ok(Ok(_)) => {}
                }
            }
        }
        let mcfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.op_timeout))
            .set_response_timeout(Some(cfg.op_timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(200));
        let conn = ConnectionManager::new_with_config(client.clone(), mcfg)
            .await
            .map_err(|e| startup_error(&shown_url, &e))?;
        let prefix = format!("vspc:{{{}}}:", cfg.cluster);
        let reg = Arc::new(Registry {
            prefix,
            shown_url,
            client,
            conn,
            scripts: scripts::Scripts::new(),
            instance: instance_id(),
            up: AtomicBool::new(true),
            counters: Counters::default(),
            offset_ms: AtomicI64::new(0),
            spares: Mutex::new(Vec::new()),
            known_ports: Mutex::new(BTreeSet::new()),
            known_nodes: Mutex::new(HashSet::new()),
            inherited: Mutex::new(Vec::new()),
            run_id: Mutex::new(None),
            cfg,
        });
        reg.register().await?;
        if let Ok(id) = reg.fetch_run_id().await {
            *lock(&reg.run_id) = Some(id);
        }
        Ok(reg)
    }

    async fn register(&self) -> Result<(), Error> {
        let mut inv = self.scripts.register.prepare_invoke();
        inv.arg(&self.prefix)
            .arg(&self.cfg.node)
            .arg(&self.instance)
            .arg(&self.cfg.advertise)
            .arg(self.cfg.node_ttl.as_millis() as u64)
            .arg(self.cfg.port_range_start);
        let started = now_ms();
        let reply: Vec<Value> = self.call(inv.invoke_async(&mut self.conn.clone())).await?;
        let status = reply.first().and_then(v_str).unwrap_or_default();
        match status.as_str() {
            "taken" => Err(Error::NameTaken {
                cluster: self.cfg.cluster.clone(),
                node: self.cfg.node.clone(),
                instance: reply.get(1).and_then(v_str).unwrap_or_default(),
                advertise: reply.get(2).and_then(v_str).unwrap_or_default(),
                expires_in: Duration::from_millis(reply.get(3).and_then(v_u64).unwrap_or(0)),
            }),
            "start" => Err(Error::RangeMismatch {
                cluster: self.cfg.cluster.clone(),
                theirs: reply.get(1).and_then(v_port).unwrap_or(0),
                ours: self.cfg.port_range_start,
            }),
            "ok" => {
                let redis_now = reply.get(1).and_then(v_u64).unwrap_or(0) as i64;
                let ours = (started + now_ms()) / 2;
                let offset = redis_now - ours;
                self.offset_ms.store(offset, Ordering::Relaxed);
                if offset.abs() > 2000 {
                    tracing::warn!(
                        node = %self.cfg.node,
                        offset_ms = offset,
                        "this node's clock differs from Redis's by {offset} ms; the cluster keeps Redis's time, \
                         but fix the clock (NTP) so that log lines and outage claims agree"
                    );
                }
                let mut inherited = Vec::new();
                for v in reply.iter().skip(2) {
                    let Some(j) = v_str(v) else { continue };
                    match serde_json::from_str::<InheritedRecord>(&j) {
                        Ok(r) => inherited.push(VmEntry {
                            uuid: r.u,
                            name: r.n,
                            port: r.p,
                            node: self.cfg.node.clone(),
                            epoch: r.e.parse().unwrap_or(0),
                            connected: false,
                            disconnected_since_ms: Some(r.s),
                            held_since_ms: r.f,
                        }),
                        Err(e) => {
                            tracing::warn!(error = %e, "unreadable inherited VM record; skipped")
                        }
                    }
                }
                if !inherited.is_empty() {
                    tracing::info!(
                        node = %self.cfg.node,
                        vms = inherited.len(),
                        "this node name held VMs before it restarted; they are its again, disconnected"
                    );
                }
                *lock(&self.inherited) = inherited;
                lock(&self.known_nodes).insert(self.cfg.node.clone());
                tracing::info!(
                    node = %self.cfg.node,
                    cluster = %self.cfg.cluster,
                    redis = %self.shown_url,
                    instance = %self.instance,
                    "registered with the cluster"
                );
                Ok(())
            }
            _ => Err(bad_reply("register", &reply)),
        }
    }

    /// Runs one call with the bounded timeout, keeping the up/down state
    /// and the counters.
    async fn call<T>(
        &self,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, Error> {
        self.counters.calls.fetch_add(1, Ordering::Relaxed);
        let r = match tokio::time::timeout(self.cfg.op_timeout, fut).await {
            Err(_) => Err(Error::Unavailable {
                detail: format!("no answer within {:?}", self.cfg.op_timeout),
            }),
            Ok(Err(e)) => Err(classify(&e)),
            Ok(Ok(v)) => Ok(v),
        };
        match &r {
            Err(Error::Unavailable { detail }) => {
                self.counters.unavailable.fetch_add(1, Ordering::Relaxed);
                if self.up.swap(false, Ordering::Relaxed) {
                    tracing::warn!(redis = %self.shown_url, error = %detail, "Redis is unavailable; serving locally");
                }
            }
            _ => {
                if !self.up.swap(true, Ordering::Relaxed) {
                    tracing::info!(redis = %self.shown_url, "Redis answers again");
                }
            }
        }
        r
    }

    async fn fetch_run_id(&self) -> Result<String, Error> {
        let info: String = self
            .call(
                redis::cmd("INFO")
                    .arg("server")
                    .query_async(&mut self.conn.clone()),
            )
            .await?;
        info.lines()
            .find_map(|l| l.strip_prefix("run_id:"))
            .map(|s| s.trim().to_string())
            .ok_or_else(|| bad_reply("INFO server", &"no run_id"))
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.cfg.node
    }

    /// The cluster's name.
    pub fn cluster(&self) -> &str {
        &self.cfg.cluster
    }

    /// The settings it runs with.
    pub fn config(&self) -> &RegistryConfig {
        &self.cfg
    }

    /// The key prefix, `vspc:{CLUSTER}:`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Whether the last call reached Redis.
    pub fn redis_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// The counters, for `/metrics`.
    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        Stats {
            redis_up: self.redis_up(),
            calls: c.calls.load(Ordering::Relaxed),
            unavailable: c.unavailable.load(Ordering::Relaxed),
            claims: c.claims.load(Ordering::Relaxed),
            offline_claims: c.offline_claims.load(Ordering::Relaxed),
            reasserts: c.reasserts.load(Ordering::Relaxed),
            conflicts: c.conflicts.load(Ordering::Relaxed),
            tickets_taken: c.tickets_taken.load(Ordering::Relaxed),
            tickets_wrong_secret: c.tickets_wrong.load(Ordering::Relaxed),
            tickets_unknown: c.tickets_unknown.load(Ordering::Relaxed),
        }
    }

    /// The VMs this node name held before a restart (once; then empty):
    /// the daemon takes them in as disconnected VMs (their ports open,
    /// expiring as usual), as it would a persisted map.
    pub fn inherited(&self) -> Vec<VmEntry> {
        std::mem::take(&mut *lock(&self.inherited))
    }

    /// Spare ports this node holds for an outage (sorted).
    pub fn spares(&self) -> Vec<u16> {
        lock(&self.spares).clone()
    }

    fn note_port(&self, port: u16) {
        lock(&self.known_ports).insert(port);
    }

    /// A VM connected to this node: its port (sticky per uuid, whichever
    /// node held it; else `preferred` if free cluster-wide, else the lowest
    /// free port) and a new epoch. The newest connection wins cluster-wide:
    /// a node that held the VM is told (mail: [`Event::VmTaken`]).
    pub async fn claim_vm(
        &self,
        uuid: &str,
        name: &str,
        preferred_port: Option<u16>,
    ) -> Result<Claim, Error> {
        let mut inv = self.scripts.claim.prepare_invoke();
        inv.arg(&self.prefix)
            .arg(uuid)
            .arg(name)
            .arg(&self.cfg.node)
            .arg(self.cfg.port_range_start)
            .arg(preferred_port.unwrap_or(0));
        let reply: Vec<Value> = self.call(inv.invoke_async(&mut self.conn.clone())).await?;
        if reply.first().and_then(v_str).as_deref() == Some("noport") {
            return Err(Error::NoPort {
                cluster: self.cfg.cluster.clone(),
                start: self.cfg.port_range_start,
            });
        }
        let (Some(port), Some(epoch), Some(since)) = (
            reply.first().and_then(v_port),
            reply.get(1).and_then(v_u64),
            reply.get(2).and_then(v_u64),
        ) else {
            return Err(bad_reply("claim", &reply));
        };
        let prev = reply.get(3).and_then(v_str).filter(|s| !s.is_empty());
        self.counters.claims.fetch_add(1, Ordering::Relaxed);
        if prev.is_none() {
            self.hint_change();
        }
        self.note_port(port);
        lock(&self.spares).retain(|&p| p != port);
        if let Some(prev) = &prev {
            tracing::info!(uuid, vm = name, port, from = %prev, "VM moved to this node (the newest connection wins)");
        }
        Ok(Claim {
            port,
            epoch,
            held_since_ms: since,
            previous_node: prev,
            provisional: false,
        })
    }

    /// A VM connected while Redis is down: a port this node can use now,
    /// and a provisional epoch (from this node's clock, corrected by its
    /// offset to Redis's), to [`Registry::reassert`] when Redis is back.
    /// One of the node's spare ports if any is left (Redis recorded them
    /// as this node's: no other node has them); else the lowest port from
    /// the range start that is neither taken in the node's last view of
    /// the cluster nor `in_use_here` (a conflict is then possible and is
    /// settled at re-assertion). `None` when no port is left at all.
    pub fn offline_claim(&self, in_use_here: &dyn Fn(u16) -> bool) -> Option<Claim> {
        let offset = self.offset_ms.load(Ordering::Relaxed);
        let spare = {
            let mut s = lock(&self.spares);
            let i = s.iter().position(|&p| !in_use_here(p));
            i.map(|i| s.remove(i))
        };
        let port = match spare {
            Some(p) => p,
            None => {
                let known = lock(&self.known_ports);
                (self.cfg.port_range_start..=u16::MAX)
                    .find(|p| !known.contains(p) && !in_use_here(*p))?
            }
        };
        self.note_port(port);
        self.counters.offline_claims.fetch_add(1, Ordering::Relaxed);
        Some(Claim {
            port,
            epoch: (now_us() + offset * 1000).max(1) as u64,
            held_since_ms: (now_ms() + offset).max(0) as u64,
            previous_node: None,
            provisional: true,
        })
    }

    async fn cas(&self, op: &str, uuid: &str, epoch: u64, name: &str) -> Result<bool, Error> {
        let mut inv = self.scripts.cas.prepare_invoke();
        inv.arg(&self.prefix)
            .arg(op)
            .arg(uuid)
            .arg(&self.cfg.node)
            .arg(epoch)
            .arg(name);
        let n: i64 = self.call(inv.invoke_async(&mut self.conn.clone())).await?;
        Ok(n == 1)
    }

    /// The VM's ESXi connection closed: its expiry clock starts. Does
    /// nothing (false) unless this node holds it at `epoch`.
    pub async fn mark_disconnected(&self, uuid: &str, epoch: u64) -> Result<bool, Error> {
        self.cas("disconnected", uuid, epoch, "").await
    }

    /// The VM is connected again on the same claim (a vMotion destination
    /// on this node took over). False unless held at `epoch`.
    pub async fn mark_connected(&self, uuid: &str, epoch: u64) -> Result<bool, Error> {
        self.cas("connected", uuid, epoch, "").await
    }

    /// The VM sent a new name. False unless held at `epoch`.
    pub async fn rename(&self, uuid: &str, epoch: u64, name: &str) -> Result<bool, Error> {
        self.cas("rename", uuid, epoch, name).await
    }

    /// The VM expired here (`--vm-expire-time` without connection, console
    /// or vMotion): its record goes, its port returns to the pool. Does
    /// nothing (false) unless this node holds it at `epoch`: a stale node
    /// cannot delete a newer owner's record.
    pub async fn expire(&self, uuid: &str, epoch: u64) -> Result<bool, Error> {
        let done = self.cas("expire", uuid, epoch, "").await?;
        Ok(done)
    }

    /// Expire dead nodes' VMs that have gone `vm_expire` without a
    /// connection; forget dead nodes that hold nothing. Any node may run it
    /// (the heartbeat does, every few beats); it is idempotent.
    pub async fn expire_orphans(&self) -> Result<Vec<Expired>, Error> {
        let mut inv = self.scripts.orphans.prepare_invoke();
        inv.arg(&self.prefix)
            .arg(self.cfg.vm_expire.as_millis() as u64)
            .arg(self.cfg.node_ttl.as_millis() as u64)
            .arg(1000);
        let reply: Vec<Value> = self.call(inv.invoke_async(&mut self.conn.clone())).await?;
        let mut out = Vec::new();
        for c in reply.chunks(3) {
            if let [u, p, n] = c {
                if let (Some(uuid), Some(port), Some(node)) = (v_str(u), v_port(p), v_str(n)) {
                    tracing::info!(%uuid, port, %node, "a dead node's VM expired; port returned to the pool");
                    lock(&self.known_ports).remove(&port);
                    out.push(Expired { uuid, port, node });
                }
            }
        }
        Ok(out)
    }

    /// Write back what this node holds (after Redis restarted, failed over
    /// or was away): each record if absent, ours, or older than ours;
    /// conflicts settled as the module says. In batches of 500 (one script
    /// each, so Redis is never blocked long).
    pub async fn reassert(&self, vms: &[HeldVm]) -> Result<ReassertReport, Error> {
        let mut report = ReassertReport::default();
        for batch in vms.chunks(500) {
            let arr: Vec<serde_json::Value> = batch
                .iter()
                .map(|v| {
                    serde_json::json!({
                        "u": v.uuid, "n": v.name, "p": v.port, "e": v.epoch.to_string(),
                        "c": u8::from(v.connected),
                        "s": if v.connected { 0 } else { v.disconnected_since_ms },
                        "f": v.held_since_ms,
                    })
                })
                .collect();
            let json = serde_json::Value::Array(arr).to_string();
            let mut inv = self.scripts.reassert.prepare_invoke();
            inv.arg(&self.prefix)
                .arg(&self.cfg.node)
                .arg(self.cfg.port_range_start)
                .arg(json);
            let reply: Vec<Value> = self.call(inv.invoke_async(&mut self.conn.clone())).await?;
            let mut it = reply.iter();
            while let Some(tag) = it.next() {
                match v_str(tag).as_deref() {
                    Some("ok") => {
                        it.next();
                        report.kept += 1;
                    }
                    Some("noport") => {
                        if let Some(u) = it.next().and_then(v_str) {
                            report.no_port.push(u);
                        }
                    }
                    Some("lost") => {
                        let (u, n, e) = (it.next(), it.next(), it.next());
                        report.lost.push(Lost {
                            uuid: u.and_then(v_str).unwrap_or_default(),
                            node: n.and_then(v_str).unwrap_or_default(),
                            epoch: e.and_then(v_u64).unwrap_or(0),
                        });
                    }
                    Some(t @ ("moved" | "displaced")) => {
                        let (u, f, to) = (it.next(), it.next(), it.next());
                        let m = Moved {
                            uuid: u.and_then(v_str).unwrap_or_default(),
                            from: f.and_then(v_port).unwrap_or(0),
                            to: to.and_then(v_port).unwrap_or(0),
                        };
                        self.note_port(m.to);
                        if t == "moved" {
                            report.moved.push(m);
                        } else {
                            report.displaced.push(m);
                        }
                    }
                    _ => return Err(bad_reply("reassert", &reply)),
                }
            }
        }
        let conflicts = report.moved.len() + report.displaced.len();
        self.counters.reasserts.fetch_add(1, Ordering::Relaxed);
        self.counters
            .conflicts
            .fetch_add(conflicts as u64, Ordering::Relaxed);
        for m in &report.moved {
            tracing::warn!(uuid = %m.uuid, from = m.from, to = m.to,
                "port conflict after Redis came back: another VM held the port longer; this VM moves to a new port");
        }
        for m in &report.displaced {
            tracing::warn!(uuid = %m.uuid, from = m.from, to = m.to,
                "port conflict after Redis came back: our VM held the port longer; the other node's VM moves");
        }
        for l in &report.lost {
            tracing::info!(uuid = %l.uuid, node = %l.node, "a VM this node held lives on another node now (newer connection)");
        }
        {
            let mut s = lock(&self.spares);
            s.retain(|p| !vms.iter().any(|v| v.port == *p));
        }
        Ok(report)
    }

    /// Every VM of the cluster: one `HGETALL` (20,000 VMs in well under a
    /// second).
    pub async fn list_vms(&self) -> Result<Vec<VmEntry>, Error> {
        let raw: Vec<(String, String)> = self
            .call(
                redis::cmd("HGETALL")
                    .arg(format!("{}vms", self.prefix))
                    .query_async(&mut self.conn.clone()),
            )
            .await?;
        let mut out = Vec::with_capacity(raw.len());
        for (uuid, j) in raw {
            match serde_json::from_str::<Record>(&j) {
                Ok(r) => out.push(VmEntry {
                    uuid,
                    name: r.n,
                    port: r.p,
                    node: r.o,
                    epoch: r.e.parse().unwrap_or(0),
                    connected: r.c == 1,
                    disconnected_since_ms: (r.c != 1).then_some(r.s),
                    held_since_ms: r.f,
                }),
                Err(e) => {
                    tracing::warn!(%uuid, error = %e, "unreadable VM record in Redis; skipped")
                }
            }
        }
        {
            let mut known = lock(&self.known_ports);
            known.clear();
            known.extend(out.iter().map(|v| v.port));
        }
        Ok(out)
    }

    /// One VM's record, if any.
    pub async fn vm(&self, uuid: &str) -> Result<Option<VmEntry>, Error> {
        let j: Option<String> = self
            .call(
                redis::cmd("HGET")
                    .arg(format!("{}vms", self.prefix))
                    .arg(uuid)
                    .query_async(&mut self.conn.clone()),
            )
            .await?;
        let Some(j) = j else { return Ok(None) };
        let r: Record = serde_json::from_str(&j).map_err(|e| bad_reply("HGET vms", &e))?;
        Ok(Some(VmEntry {
            uuid: uuid.to_string(),
            name: r.n,
            port: r.p,
            node: r.o,
            epoch: r.e.parse().unwrap_or(0),
            connected: r.c == 1,
            disconnected_since_ms: (r.c != 1).then_some(r.s),
            held_since_ms: r.f,
        }))
    }

    /// Every node the cluster knows: alive ones, and dead ones still
    /// holding VMs (until those expire).
    pub async fn list_nodes(&self) -> Result<Vec<NodeEntry>, Error> {
        let nodes: Vec<(String, f64)> = self
            .call(
                redis::cmd("ZRANGE")
                    .arg(format!("{}nodes", self.prefix))
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES")
                    .query_async(&mut self.conn.clone()),
            )
            .await?;
        let mut pipe = redis::pipe();
        for (n, _) in &nodes {
            pipe.cmd("HGET")
                .arg(format!("{}node:{n}", self.prefix))
                .arg("advertise");
            pipe.cmd("SCARD").arg(format!("{}held:{n}", self.prefix));
        }
        let rows: Vec<Value> = if nodes.is_empty() {
            Vec::new()
        } else {
            self.call(pipe.query_async(&mut self.conn.clone())).await?
        };
        let mut out = Vec::with_capacity(nodes.len());
        for (i, (name, hb)) in nodes.into_iter().enumerate() {
            let adv = rows.get(2 * i).and_then(v_str);
            let vms = rows.get(2 * i + 1).and_then(v_u64).unwrap_or(0) as usize;
            out.push(NodeEntry {
                name,
                alive: adv.is_some(),
                advertise: adv.unwrap_or_default(),
                last_heartbeat_ms: hb.max(0.0) as u64,
                vms,
            });
        }
        {
            let mut k = lock(&self.known_nodes);
            k.extend(out.iter().filter(|n| n.alive).map(|n| n.name.clone()));
        }
        Ok(out)
    }

    /// A live node's advertise address (`None` when it is not alive).
    pub async fn node_addr(&self, node: &str) -> Result<Option<String>, Error> {
        let adv: Option<String> = self
            .call(
                redis::cmd("HGET")
                    .arg(format!("{}node:{node}", self.prefix))
                    .arg("advertise")
                    .query_async(&mut self.conn.clone()),
            )
            .await?;
        if adv.is_some() {
            lock(&self.known_nodes).insert(node.to_string());
        }
        Ok(adv)
    }

    /// Whether `node` is a registered, live node of this cluster: Redis's
    /// answer, or while Redis is down, whether it was seen alive before.
    pub async fn is_member(&self, node: &str) -> bool {
        match self.node_addr(node).await {
            Ok(a) => a.is_some(),
            Err(_) => lock(&self.known_nodes).contains(node),
        }
    }

    async fn ticket(&self, args: &[&str]) -> Result<Value, Error> {
        let mut inv = self.scripts.ticket.prepare_invoke();
        inv.arg(&self.prefix);
        for a in args {
            inv.arg(*a);
        }
        self.call(inv.invoke_async(&mut self.conn.clone())).await
    }

    /// VMOTION-BEGIN on this node: a destination that presents `sequence`
    /// and `secret` on any node joins this node's VM `uuid`, until `ttl`
    /// (the vMotion timeout).
    pub async fn put_ticket(
        &self,
        sequence: &[u8],
        secret: &[u8],
        uuid: &str,
        ttl: Duration,
    ) -> Result<(), Error> {
        let ttl_ms = ttl.as_millis().max(1).to_string();
        let r = self
            .ticket(&[
                "put",
                &hex(sequence),
                &hex(secret),
                uuid,
                &self.cfg.node,
                &ttl_ms,
            ])
            .await?;
        match v_str(&r).as_deref() {
            Some("ok") => Ok(()),
            Some("clash") => Err(Error::TicketClash {
                uuid: uuid.to_string(),
            }),
            _ => Err(bad_reply("put_ticket", &r)),
        }
    }

    /// VMOTION-PEER on any node: the ticket, consumed, if `secret` matches;
    /// a wrong secret leaves the ticket for the real destination.
    pub async fn take_ticket(&self, sequence: &[u8], secret: &[u8]) -> Result<TakeTicket, Error> {
        let r = self.ticket(&["take", &hex(sequence), &hex(secret)]).await?;
        let Value::Array(items) = &r else {
            return Err(bad_reply("take_ticket", &r));
        };
        let c = &self.counters;
        match items.first().and_then(v_str).as_deref() {
            Some("ok") => {
                c.tickets_taken.fetch_add(1, Ordering::Relaxed);
                Ok(TakeTicket::Taken(Ticket {
                    uuid: items.get(1).and_then(v_str).unwrap_or_default(),
                    node: items.get(2).and_then(v_str).unwrap_or_default(),
                }))
            }
            Some("wrong") => {
                c.tickets_wrong.fetch_add(1, Ordering::Relaxed);
                Ok(TakeTicket::WrongSecret)
            }
            Some("unknown") => {
                c.tickets_unknown.fetch_add(1, Ordering::Relaxed);
                Ok(TakeTicket::Unknown)
            }
            _ => Err(bad_reply("take_ticket", &r)),
        }
    }

    /// VMOTION-ABORT (or the source gave up): the ticket goes, if it is
    /// still `uuid`'s.
    pub async fn drop_ticket(&self, sequence: &[u8], uuid: &str) -> Result<bool, Error> {
        let r = self.ticket(&["drop", &hex(sequence), uuid]).await?;
        Ok(v_u64(&r) == Some(1))
    }

    /// One heartbeat: refresh the node's key, learn its spares and mail.
    /// Returns whether the node's key had to be recreated.
    async fn beat(&self, events: &mpsc::UnboundedSender<Event>) -> Result<bool, Error> {
        let mut inv = self.scripts.heartbeat.prepare_invoke();
        inv.arg(&self.prefix)
            .arg(&self.cfg.node)
            .arg(&self.instance)
            .arg(&self.cfg.advertise)
            .arg(self.cfg.node_ttl.as_millis() as u64)
            .arg(self.cfg.port_range_start)
            .arg(self.cfg.spares)
            .arg(1000);
        let reply: Vec<Value> = self.call(inv.invoke_async(&mut self.conn.clone())).await?;
        let status = reply.first().and_then(v_str).unwrap_or_default();
        if status == "stolen" {
            let instance = reply.get(1).and_then(v_str).unwrap_or_default();
            tracing::error!(
                node = %self.cfg.node,
                other = %instance,
                "another vspc instance registered this node name while this one was silent; \
                 two nodes share --node-name: stop one of them"
            );
            let _ = events.send(Event::NameStolen { instance });
            return Ok(false);
        }
        let n = reply.get(2).and_then(v_u64).unwrap_or(0) as usize;
        let spares: Vec<u16> = reply.iter().skip(3).take(n).filter_map(v_port).collect();
        *lock(&self.spares) = spares;
        for m in reply.iter().skip(3 + n) {
            let Some(j) = v_str(m) else { continue };
            let Ok(m) = serde_json::from_str::<Mail>(&j) else {
                tracing::warn!(mail = %j, "unreadable notice in this node's mail; skipped");
                continue;
            };
            let epoch = m.e.parse().unwrap_or(0);
            let ev = match m.k.as_str() {
                "taken" => Event::VmTaken {
                    uuid: m.u,
                    by: m.by,
                    epoch,
                },
                "moved" => Event::PortMoved {
                    uuid: m.u,
                    from: m.from,
                    to: m.to,
                    epoch,
                },
                _ => continue,
            };
            let _ = events.send(ev);
        }
        lock(&self.known_nodes).insert(self.cfg.node.clone());
        Ok(status == "recreated")
    }

    /// Start the heartbeat: every `heartbeat`, refresh this node's key;
    /// when Redis comes back from an outage, or restarted (the node's key
    /// gone, or a new `run_id`), re-assert what `held` returns at once;
    /// every few beats, expire dead nodes' VMs. The daemon reads the
    /// events (and must, or they pile up). Stops when the handle is
    /// aborted or the receiver is dropped.
    pub fn spawn_heartbeat(
        self: &Arc<Self>,
        held: HeldFn,
    ) -> (JoinHandle<()>, mpsc::UnboundedReceiver<Event>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let me = self.clone();
        let hints = me.clone();
        let hints_tx = tx.clone();
        let task = tokio::spawn(async move {
            let watch = tokio::spawn(hints.watch_changes(hints_tx));
            me.heartbeat_loop(held, tx).await;
            watch.abort();
        });
        (task, rx)
    }

    /// The pub/sub channel of the change hints.
    fn changes_channel(&self) -> String {
        format!("{}changes", self.prefix)
    }

    /// Tell the other nodes (a hint, not the record) that a VM new to the
    /// cluster was claimed here; lost hints cost nothing but the wait for
    /// their next refresh.
    fn hint_change(&self) {
        let (mut conn, channel, node) = (
            self.conn.clone(),
            self.changes_channel(),
            self.cfg.node.clone(),
        );
        tokio::spawn(async move {
            let sent: redis::RedisResult<i64> = redis::cmd("PUBLISH")
                .arg(channel)
                .arg(node)
                .query_async(&mut conn)
                .await;
            if let Err(e) = sent {
                tracing::debug!(error = %e, "cluster: change hint not published");
            }
        });
    }

    /// Read the other nodes' change hints, as [`Event::Changed`], until the
    /// receiver goes; a lost connection is dialled again every second.
    async fn watch_changes(self: Arc<Self>, tx: mpsc::UnboundedSender<Event>) {
        use futures_util::StreamExt;
        let channel = self.changes_channel();
        while !tx.is_closed() {
            match self.client.get_async_pubsub().await {
                Ok(mut ps) => match ps.subscribe(&channel).await {
                    Ok(()) => {
                        let mut messages = ps.on_message();
                        while let Some(msg) = messages.next().await {
                            let node: String = msg.get_payload().unwrap_or_default();
                            if node != self.cfg.node && tx.send(Event::Changed { node }).is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "cluster: cannot subscribe to change hints")
                    }
                },
                Err(e) => tracing::debug!(error = %e, "cluster: no connection for change hints"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn heartbeat_loop(self: Arc<Self>, held: HeldFn, tx: mpsc::UnboundedSender<Event>) {
        let mut tick = tokio::time::interval(self.cfg.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut down = false;
        let mut beats: u64 = 0;
        let mut skew_told = false;
        loop {
            tick.tick().await;
            if tx.is_closed() {
                return;
            }
            beats += 1;
            let recreated = match self.beat(&tx).await {
                Ok(r) => r,
                Err(e) => {
                    if !down {
                        down = true;
                        let _ = tx.send(Event::RedisDown {
                            detail: e.to_string(),
                        });
                    }
                    continue;
                }
            };
            let restarted = match self.fetch_run_id().await {
                Ok(id) => {
                    let mut run = lock(&self.run_id);
                    let changed = run.as_ref().is_some_and(|old| *old != id);
                    *run = Some(id);
                    changed
                }
                Err(_) => false,
            };
            if down {
                let _ = tx.send(Event::RedisUp);
            }
            if down || recreated || restarted {
                tracing::info!(
                    node = %self.cfg.node,
                    after_outage = down,
                    key_recreated = recreated,
                    redis_restarted = restarted,
                    "re-asserting this node's VMs"
                );
                match self.reassert(&held()).await {
                    Ok(report) => {
                        let _ = tx.send(Event::Reasserted(report));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "re-assertion failed; trying again at the next beat");
                        down = true;
                        continue;
                    }
                }
            }
            down = false;
            let offset = self.offset_ms.load(Ordering::Relaxed);
            if offset.abs() > 2000 && !skew_told {
                skew_told = true;
                let _ = tx.send(Event::ClockSkew { offset_ms: offset });
            }
            if beats.is_multiple_of(10) {
                match self.expire_orphans().await {
                    Ok(v) if !v.is_empty() => {
                        let _ = tx.send(Event::Expired(v));
                    }
                    _ => {}
                }
            }
        }
    }

    /// Leave the cluster on a clean stop: the node's key and spare ports
    /// go at once (its VMs stay recorded, disconnected, for a restart to
    /// inherit or for expiry).
    pub async fn leave(&self) -> Result<(), Error> {
        let k = format!("{}node:{}", self.prefix, self.cfg.node);
        let inst: Option<String> = self
            .call(
                redis::cmd("HGET")
                    .arg(&k)
                    .arg("instance")
                    .query_async(&mut self.conn.clone()),
            )
            .await?;
        if inst.as_deref() == Some(self.instance.as_str()) {
            let _: () = self
                .call(
                    redis::cmd("DEL")
                        .arg(&k)
                        .query_async(&mut self.conn.clone()),
                )
                .await?;
        }
        Ok(())
    }
}

/// Why the first connection failed, for the start-up error.
fn startup_error(url: &str, e: &RedisError) -> Error {
    let text = e.to_string();
    let url = url.to_string();
    let detail = text.clone();
    if e.kind() == ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("NOAUTH" | "WRONGPASS"))
        || text.contains("NOAUTH")
        || text.contains("WRONGPASS")
        || text.contains("invalid password")
        || text.contains("invalid username-password")
    {
        Error::Auth { url, detail }
    } else if text.contains("DB index is out of range") || text.contains("invalid DB index") {
        Error::WrongDb { url, detail }
    } else if matches!(e.kind(), ErrorKind::InvalidClientConfig) {
        Error::BadUrl { url, detail }
    } else {
        Error::Unreachable { url, detail }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden_in_messages() {
        assert_eq!(hide_password("redis://:s3cret@h:1/2"), "redis://:***@h:1/2");
        assert_eq!(hide_password("redis://u:s3cret@h:1"), "redis://u:***@h:1");
        assert_eq!(hide_password("rediss://h:1"), "rediss://h:1");
    }

    #[test]
    fn names_are_host_name_characters() {
        assert!(check_name("--node-name", "esx-vspc-1.example").is_ok());
        assert!(check_name("--node-name", "").is_err());
        assert!(check_name("--node-name", "a b").is_err());
        assert!(check_name("--node-name", "a:b").is_err());
        assert!(check_name("--cluster-name", "x}{").is_err());
    }
}
