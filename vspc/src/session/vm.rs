//! One ESXi connection on the proxy port: telnet negotiation, the VMware
//! extension handshake, identification and vMotion.
//!
//! A connection is identified once it has an accepted DO-PROXY plus the VM's
//! VC UUID and name (`vspc/PROTOCOL.md` §4), or when a vMotion COMPLETE hands it
//! an existing VM. Serial data that arrives earlier is held and delivered
//! after. A vMotion destination sends PEER before its identity, and never
//! DO-PROXY (§4.2).

use super::{Flow, Session, WaitFuture};
use crate::hub::{Attached, Begin, Fanout, HookFuture, Hub, Identity, RemotePeer, Vm, SECRET_LEN};
use crate::vmware::{Msg, VmUuid, PROXY_KNOWN_SUBOPTIONS};
use crate::wire::{opt, Change, Decoder, Event, Negotiator, OptionSet, Verb};
use bytes::Bytes;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Options we perform when ESXi asks (DO).
const LOCAL_OK: OptionSet = OptionSet::of(&[opt::BINARY, opt::SGA, opt::ECHO]);
/// Options we let ESXi perform (WILL).
const REMOTE_OK: OptionSet = OptionSet::of(&[opt::BINARY, opt::SGA, opt::VMWARE_EXT]);

/// Serial data held before identification, at most (ESXi identifies a
/// connection within milliseconds; an unidentified one holds no more).
const EARLY_LIMIT: usize = 64 * 1024;

/// Longest VM name kept, in bytes (longer ones are cut and logged).
pub const MAX_NAME: usize = 256;

/// Longest VM uuid accepted, in bytes (VMware's are 47 characters).
pub const MAX_UUID: usize = 128;

/// Longest service URI accepted from DO-PROXY, in bytes.
pub const MAX_URI: usize = 256;

/// How long to wait for VM-NAME once the uuid is known.
const NAME_WAIT: Duration = Duration::from_secs(2);

/// Told to a plain telnet client that reached the proxy port.
pub const NOT_ESXI_MSG: &[u8] = b"vspc: this port is for VMware ESXi virtual serial ports \
(telnet option 232). To reach a VM's console, telnet to its console port \
(list them with vspc-client).\r\n";

/// Per-connection settings from the command line.
#[derive(Debug, Clone)]
pub struct VmSessionConfig {
    pub handshake_timeout: Duration,
    /// How long a connection may stay unidentified (no accepted DO-PROXY
    /// with a uuid, no valid VMOTION-PEER) before it is closed, so idle or
    /// hostile connections cannot hold descriptors forever.
    pub identify_timeout: Duration,
    pub multi_console: bool,
}

enum Link {
    /// Not yet identified.
    Handshake,
    /// Carries `vm`.
    Active(Arc<Vm>),
    /// A vMotion destination that sent a valid PEER; waits for COMPLETE.
    Destination {
        vm: Arc<Vm>,
        cookie: Vec<u8>,
        seq: Vec<u8>,
    },
    /// Cluster mode: a vMotion destination whose source is another node
    /// (its ticket taken from the control plane); waits for COMPLETE.
    RemoteDestination(Box<RemotePeer>),
    /// Lost the VM to a newer connection or a completed vMotion.
    Retired,
}

/// The state of one ESXi connection.
pub struct VmSession {
    hub: Arc<Hub>,
    peer: Attached,
    cfg: VmSessionConfig,
    decoder: Decoder,
    neg: Negotiator,
    link: Link,
    /// The VMware extension is on (ESXi said WILL 232).
    ext: bool,
    ks2_sent: bool,
    /// The service URI from an accepted DO-PROXY.
    proxy_uri: Option<String>,
    uuid: Option<VmUuid>,
    name: Option<String>,
    early: Vec<u8>,
    early_dropped: bool,
    /// Close if the extension is not on by then.
    handshake_deadline: Option<Instant>,
    /// Identify without a name at this time.
    name_deadline: Option<Instant>,
    /// Close if still unidentified by then.
    identify_deadline: Option<Instant>,
    closing: bool,
    /// Scratch buffer for replies.
    out: Vec<u8>,
    /// Serial output decoded from the current read, handed to the hub in
    /// one call (before any other event, to keep the order).
    output: Vec<u8>,
    /// The VM's backlog is being delivered (see [`Hub::pace`]); boxed, as
    /// it is rare and the session's size is an idle VM's memory.
    pace: Option<Box<Paced>>,
    /// Counted among the hub's unidentified connections
    /// ([`Hub::unidentified`]) until identified or closed.
    unidentified: bool,
    /// Cluster mode: what this connection waits for from the control
    /// plane before it goes on (reading pauses meanwhile).
    claiming: Option<Box<Claiming>>,
}

/// A call to the cluster under way.
enum Claiming {
    /// The port of the VM `id`, before it attaches.
    Port {
        id: Identity,
        port: HookFuture<Result<u16, String>>,
    },
    /// A VMOTION-PEER whose cookie no local vMotion has: another node's
    /// ticket, if any.
    Peer {
        peer: HookFuture<Result<Option<RemotePeer>, String>>,
    },
    /// GOAHEAD `cookie`, sent once the cluster knows the vMotion (its
    /// destination may connect to any node).
    Ticket {
        cookie: Vec<u8>,
        stored: HookFuture<()>,
    },
    /// VMOTION-COMPLETE of a vMotion from another node: the VM's name and
    /// port, claimed for this node.
    Complete {
        from: Box<RemotePeer>,
        claim: HookFuture<Result<(String, u16), String>>,
    },
}

/// Output of `vm` waits in its backlog; `wait` delivers it.
struct Paced {
    vm: Arc<Vm>,
    wait: WaitFuture,
}

impl VmSession {
    /// A session for a new connection; queues the opening negotiation.
    pub fn new(hub: Arc<Hub>, peer: Attached, cfg: VmSessionConfig, now: Instant) -> VmSession {
        let identify = cfg.identify_timeout.max(cfg.handshake_timeout);
        let mut s = VmSession {
            hub,
            peer,
            handshake_deadline: Some(now + cfg.handshake_timeout),
            cfg,
            decoder: Decoder::default(),
            neg: Negotiator::new(LOCAL_OK, REMOTE_OK),
            link: Link::Handshake,
            ext: false,
            ks2_sent: false,
            proxy_uri: None,
            uuid: None,
            name: None,
            early: Vec::new(),
            early_dropped: false,
            name_deadline: None,
            identify_deadline: Some(now + identify),
            closing: false,
            out: Vec::new(),
            output: Vec::new(),
            pace: None,
            unidentified: true,
            claiming: None,
        };
        s.hub.unidentified_opened();
        // The capture's opening: WILL BINARY, SGA, ECHO; DO BINARY, SGA, 232.
        let mut out = std::mem::take(&mut s.out);
        for o in [opt::BINARY, opt::SGA, opt::ECHO] {
            s.neg.enable_local(o, &mut out);
        }
        for o in [opt::BINARY, opt::SGA, opt::VMWARE_EXT] {
            s.neg.enable_remote(o, &mut out);
        }
        s.out = out;
        s.flush();
        s
    }

    /// Send queued output and replies and tell the driver whether to go on.
    fn finish(&mut self) -> Flow {
        self.send_output();
        self.flush();
        if self.closing {
            Flow::Close
        } else {
            Flow::Continue
        }
    }

    /// The connection is identified (or closes): it no longer counts
    /// against `--max-unidentified`.
    fn identified(&mut self) {
        if std::mem::take(&mut self.unidentified) {
            self.hub.unidentified_done();
        }
    }

    /// Drive the delivery of `vm`'s backlog from now on, if output waits
    /// in it and nothing here drives it yet.
    fn pace(&mut self, vm: &Arc<Vm>) {
        if self.pace.is_none() {
            if let Some(wait) = self.hub.pace_if_held(vm) {
                self.pace = Some(Box::new(Paced {
                    vm: vm.clone(),
                    wait,
                }));
            }
        }
    }

    /// Hand the output collected so far to the hub.
    fn send_output(&mut self) {
        if self.output.is_empty() {
            return;
        }
        let data = Bytes::from(std::mem::take(&mut self.output));
        let Link::Active(vm) = &self.link else {
            return;
        };
        match self.hub.vm_output(vm, self.peer.id, data) {
            Fanout::Sent => {}
            Fanout::Held => {
                let vm = vm.clone();
                self.pace(&vm);
            }
            Fanout::Retired => {
                tracing::info!(
                    conn = self.peer.id,
                    "connection no longer carries its VM; dropping its data"
                );
                self.link = Link::Retired;
            }
        }
    }

    fn flush(&mut self) {
        if !self.out.is_empty() {
            let bytes = Bytes::from(std::mem::take(&mut self.out));
            self.peer.outbox.push_control(bytes);
        }
    }

    fn send(&mut self, msg: Msg<'_>) {
        msg.encode(&mut self.out);
    }

    fn label(&self) -> String {
        match (&self.name, &self.uuid) {
            (Some(n), _) => n.clone(),
            (None, Some(u)) => u.display.clone(),
            (None, None) => format!("connection {}", self.peer.id),
        }
    }

    fn handle(&mut self, ev: Event<'_>, now: Instant) {
        if !matches!(ev, Event::Data(_)) {
            self.send_output();
        }
        match ev {
            Event::Data(d) => self.on_data(d),
            Event::Negotiate(verb, option) => self.on_negotiate(verb, option),
            Event::Subneg { option, payload } if option == opt::VMWARE_EXT => {
                match Msg::decode(payload) {
                    Ok(msg) => self.on_msg(msg, now),
                    Err(e) => tracing::warn!(conn = self.peer.id, error = %e, "bad VMware message"),
                }
            }
            Event::Subneg { option, .. } => {
                tracing::debug!(conn = self.peer.id, option, "ignoring subnegotiation")
            }
            Event::Command(c) => {
                tracing::trace!(conn = self.peer.id, command = c, "telnet command")
            }
            Event::Malformed(m) => {
                tracing::warn!(conn = self.peer.id, "malformed telnet from VM: {m}")
            }
        }
    }

    fn on_negotiate(&mut self, verb: Verb, option: u8) {
        let mut out = std::mem::take(&mut self.out);
        let change = self.neg.receive(verb, option, &mut out);
        self.out = out;
        match change {
            Some(Change::RemoteEnabled(opt::VMWARE_EXT)) => {
                self.ext = true;
                self.handshake_deadline = None;
                self.start_extension();
            }
            Some(Change::RemoteDisabled(opt::VMWARE_EXT)) if !self.ext => {
                tracing::info!(
                    conn = self.peer.id,
                    "a client without the VMware extension reached the proxy port; closing it"
                );
                self.reject_plain();
            }
            Some(Change::RemoteDisabled(opt::VMWARE_EXT)) => {
                tracing::warn!(vm = %self.label(), "VM turned the VMware extension off");
                self.ext = false;
            }
            _ => {}
        }
    }

    fn reject_plain(&mut self) {
        self.out.extend_from_slice(NOT_ESXI_MSG);
        self.closing = true;
    }

    /// KNOWN-SUBOPTIONS-2, then ask for the identity (capture order).
    fn start_extension(&mut self) {
        if self.ks2_sent {
            return;
        }
        self.ks2_sent = true;
        self.send(Msg::KnownSuboptions2(PROXY_KNOWN_SUBOPTIONS));
        self.send(Msg::GetVmVcUuid);
        self.send(Msg::GetVmName);
    }

    fn on_msg(&mut self, msg: Msg<'_>, now: Instant) {
        let id = self.peer.id;
        match msg {
            Msg::KnownSuboptions1(list) => {
                tracing::debug!(conn = id, ?list, "VM's known suboptions");
                self.start_extension();
            }
            Msg::DoProxy { direction, uri } => self.on_do_proxy(direction, uri, now),
            Msg::VmVcUuid(text) if text.len() > MAX_UUID => {
                tracing::warn!(
                    conn = id,
                    bytes = text.len(),
                    "VM-VC-UUID is longer than {MAX_UUID} bytes; refusing the connection"
                );
                self.closing = true;
            }
            Msg::VmVcUuid(text) => {
                let uuid = VmUuid::parse(text).unwrap_or_else(|| {
                    let raw: String = String::from_utf8_lossy(text)
                        .chars()
                        .filter(|c| !c.is_whitespace() && !c.is_control())
                        .collect();
                    tracing::warn!(conn = id, uuid = %crate::shown::Shown(&raw), "VM-VC-UUID is not 32 hex digits; using it as given");
                    VmUuid {
                        hex: raw.to_ascii_lowercase(),
                        display: raw,
                    }
                });
                if uuid.hex.is_empty() {
                    tracing::warn!(conn = id, "empty VM-VC-UUID ignored");
                    return;
                }
                if let Some(old) = &self.uuid {
                    if old.hex != uuid.hex {
                        tracing::warn!(conn = id, old = %old.display, new = %uuid.display, "VM changed its uuid mid-connection; keeping the first");
                    }
                    return;
                }
                self.uuid = Some(uuid);
                if self.name.is_none() {
                    self.name_deadline = Some(now + NAME_WAIT);
                }
                self.try_identify(now);
            }
            Msg::VmName(raw) => {
                // Shown in logs, listings and terminals: control characters
                // escaped, bounded.
                let (name, changed) = crate::shown::from_peer(raw, MAX_NAME);
                if changed {
                    tracing::warn!(
                        conn = id,
                        bytes = raw.len(),
                        name = %name,
                        "VM-NAME has control characters, invalid UTF-8 or more than {MAX_NAME} bytes; using it escaped and cut"
                    );
                }
                let shown = self.compose_name(&name);
                self.name = Some(name);
                if let Link::Active(vm) = &self.link {
                    self.hub.rename(vm, id, &shown);
                } else {
                    self.try_identify(now);
                }
            }
            Msg::VmotionBegin(seq) => self.on_begin(seq, now),
            Msg::VmotionPeer(cookie) => self.on_peer(cookie),
            Msg::VmotionComplete(seq) => self.on_complete(seq),
            Msg::VmotionAbort => match &self.link {
                Link::Active(vm) => {
                    if !self.hub.vmotion_abort(vm, id) {
                        tracing::info!(vm = %self.label(), "VMOTION-ABORT with no vMotion pending");
                    }
                }
                _ => tracing::info!(
                    conn = id,
                    "VMOTION-ABORT on a connection that carries no VM"
                ),
            },
            Msg::UnknownSuboptionRcvd1(code) => {
                tracing::warn!(vm = %self.label(), code, "VM did not understand a suboption we sent")
            }
            Msg::VmBiosUuid(_) | Msg::VmLocationUuid(_) => {
                tracing::debug!(
                    conn = id,
                    code = msg.code(),
                    "ignoring unrequested VM identity"
                )
            }
            // Proxy-to-VM messages and unknown codes: "not supported".
            other => {
                tracing::info!(
                    conn = id,
                    code = other.code(),
                    "unsupported VMware suboption; answering UNKNOWN-SUBOPTION-RCVD-2"
                );
                self.send(Msg::UnknownSuboptionRcvd2(other.code()));
            }
        }
    }

    fn on_do_proxy(&mut self, direction: u8, uri: &[u8], now: Instant) {
        let (uri_text, changed) = crate::shown::from_peer(uri, MAX_URI);
        let refuse = if uri.len() > MAX_URI {
            Some(format!("the service URI is longer than {MAX_URI} bytes"))
        } else if changed {
            Some("the service URI has control characters or invalid UTF-8".to_string())
        } else if direction != b'S' {
            Some(format!(
                "direction '{}' is not supported (only 'S', server, is)",
                (direction as char).escape_default()
            ))
        } else if self.cfg.multi_console && uri_text.contains('_') {
            Some(format!(
                "service URI {uri_text:?} contains '_', which multi-console mode reserves as its separator"
            ))
        } else {
            None
        };
        if let Some(reason) = refuse {
            tracing::warn!(conn = self.peer.id, uri = %uri_text, "sending WONT-PROXY: {reason}; closing the connection");
            self.send(Msg::WontProxy);
            self.closing = true;
            return;
        }
        self.send(Msg::WillProxy);
        self.proxy_uri = Some(uri_text);
        self.try_identify(now);
    }

    fn compose_name(&self, name: &str) -> String {
        match (&self.proxy_uri, self.cfg.multi_console) {
            (Some(uri), true) => format!("{name}_{uri}"),
            _ => name.to_string(),
        }
    }

    fn try_identify(&mut self, now: Instant) {
        if !matches!(self.link, Link::Handshake) || self.claiming.is_some() {
            return;
        }
        let (Some(uri), Some(uuid)) = (&self.proxy_uri, &self.uuid) else {
            return;
        };
        if self.name.is_none() && self.name_deadline.is_some_and(|d| now < d) {
            return;
        }
        let base_name = self.name.clone().unwrap_or_else(|| uuid.display.clone());
        let id = if self.cfg.multi_console {
            Identity {
                key: format!("{}_{uri}", uuid.hex),
                uuid: format!("{}_{uri}", uuid.display),
                name: format!("{base_name}_{uri}"),
            }
        } else {
            Identity {
                key: uuid.hex.clone(),
                uuid: uuid.display.clone(),
                name: base_name,
            }
        };
        self.name_deadline = None;
        if let Some(port) = self.hub.cluster_claim(&id) {
            self.claiming = Some(Box::new(Claiming::Port { id, port }));
            return;
        }
        self.attach(id, None);
    }

    /// Attach as `id` (on `port` in cluster mode).
    fn attach(&mut self, id: Identity, port: Option<u16>) {
        match self.hub.attach_vm_at(&id, self.peer.clone(), port) {
            Ok(vm) => {
                // Output an earlier connection left in the backlog is this
                // one's to see delivered.
                self.pace(&vm);
                self.link = Link::Active(vm);
                self.identify_deadline = None;
                self.identified();
                self.deliver_early();
            }
            Err(e) => {
                tracing::error!(vm = %id.name, error = %e, "cannot serve VM; closing its connection");
                self.closing = true;
            }
        }
    }

    fn deliver_early(&mut self) {
        if self.early.is_empty() {
            return;
        }
        let early = std::mem::take(&mut self.early);
        self.on_data(&early);
    }

    fn on_data(&mut self, data: &[u8]) {
        match &self.link {
            Link::Active(_) => {
                if self.output.is_empty() {
                    self.output.reserve_exact(data.len());
                }
                self.output.extend_from_slice(data);
            }
            Link::Handshake | Link::Destination { .. } | Link::RemoteDestination(_) => {
                if self.early.len() + data.len() <= EARLY_LIMIT {
                    self.early.extend_from_slice(data);
                } else if !self.early_dropped {
                    self.early_dropped = true;
                    tracing::warn!(
                        conn = self.peer.id,
                        "over 64 KiB of serial data before identification; dropping the rest"
                    );
                }
            }
            Link::Retired => {}
        }
    }

    fn on_begin(&mut self, seq: &[u8], now: Instant) {
        let answer = match &self.link {
            Link::Active(vm) => self.hub.vmotion_begin(vm, self.peer.id, seq, now),
            _ => Begin::NotNow("the connection is not identified"),
        };
        match answer {
            Begin::GoAhead(cookie) => {
                let ticket = match (&self.link, self.hub.cluster()) {
                    (Link::Active(vm), Some(c)) if cookie.len() > SECRET_LEN => {
                        let (seq, secret) = cookie.split_at(cookie.len() - SECRET_LEN);
                        Some(c.vmotion_begun(&vm.uuid, seq, secret))
                    }
                    _ => None,
                };
                match ticket {
                    Some(stored) => {
                        self.claiming = Some(Box::new(Claiming::Ticket { cookie, stored }));
                    }
                    None => {
                        tracing::info!(vm = %self.label(), "vMotion begins; sent GOAHEAD");
                        self.send(Msg::VmotionGoahead(&cookie));
                    }
                }
            }
            Begin::NotNow(why) => {
                tracing::info!(vm = %self.label(), "answering VMOTION-BEGIN with NOTNOW: {why}");
                self.send(Msg::VmotionNotNow(seq));
            }
        }
    }

    fn on_peer(&mut self, cookie: &[u8]) {
        if !matches!(self.link, Link::Handshake) {
            tracing::warn!(vm = %self.label(), "VMOTION-PEER on a connection that already carries a VM; ignored");
            return;
        }
        match self.hub.vmotion_peer(cookie, self.peer.clone()) {
            Some((vm, seq)) => {
                tracing::info!(vm = %vm.name(), conn = self.peer.id, "vMotion destination connected; sent PEER-OK");
                self.send(Msg::VmotionPeerOk(&seq));
                self.link = Link::Destination {
                    vm,
                    cookie: cookie.to_vec(),
                    seq,
                };
                self.identify_deadline = None;
                self.identified();
            }
            None => match self.hub.cluster() {
                Some(c) => {
                    let peer = c.remote_peer(cookie);
                    self.claiming = Some(Box::new(Claiming::Peer { peer }));
                }
                None => tracing::warn!(
                    conn = self.peer.id,
                    "VMOTION-PEER with an unknown or wrong cookie; not answering"
                ),
            },
        }
    }

    fn on_complete(&mut self, seq: &[u8]) {
        if let Link::RemoteDestination(p) = &self.link {
            if seq != p.seq.as_slice() {
                tracing::warn!(
                    conn = self.peer.id,
                    "VMOTION-COMPLETE does not match the pending vMotion; ignored"
                );
                return;
            }
            let Some(c) = self.hub.cluster() else { return };
            let claim = c.claim_moved(&p.uuid);
            let Link::RemoteDestination(from) = std::mem::replace(&mut self.link, Link::Handshake)
            else {
                return;
            };
            self.claiming = Some(Box::new(Claiming::Complete { from, claim }));
            return;
        }
        let Link::Destination {
            vm,
            cookie,
            seq: expected,
        } = &self.link
        else {
            tracing::warn!(
                conn = self.peer.id,
                "VMOTION-COMPLETE on a connection that is not a vMotion destination; ignored"
            );
            return;
        };
        if seq != expected.as_slice() || !self.hub.vmotion_complete(vm, cookie, seq, &self.peer) {
            tracing::warn!(
                conn = self.peer.id,
                "VMOTION-COMPLETE does not match the pending vMotion; ignored"
            );
            return;
        }
        let vm = vm.clone();
        if let Some(name) = self.name.clone() {
            let shown = self.compose_name(&name);
            self.hub.rename(&vm, self.peer.id, &shown);
        }
        self.pace(&vm);
        self.link = Link::Active(vm);
        self.handshake_deadline = None;
        self.deliver_early();
    }
}

impl VmSession {
    /// Drive the cluster call under way; `Ready` once it is answered (and
    /// its answer acted on).
    fn poll_claim(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(c) = self.claiming.as_mut() else {
            return Poll::Ready(());
        };
        match &mut **c {
            Claiming::Port { port, .. } => {
                let Poll::Ready(got) = port.as_mut().poll(cx) else {
                    return Poll::Pending;
                };
                if let Some(Claiming::Port { id, .. }) = self.claiming.take().map(|b| *b) {
                    match got {
                        Ok(port) => self.attach(id, Some(port)),
                        Err(e) => {
                            tracing::error!(vm = %id.name, error = %e, "cannot serve VM; closing its connection");
                            self.closing = true;
                        }
                    }
                }
            }
            Claiming::Peer { peer } => {
                let Poll::Ready(got) = peer.as_mut().poll(cx) else {
                    return Poll::Pending;
                };
                self.claiming = None;
                match got {
                    Ok(Some(p)) => {
                        tracing::info!(uuid = %p.uuid, source = %p.node, conn = self.peer.id, "vMotion destination for another node's VM connected; sent PEER-OK");
                        self.send(Msg::VmotionPeerOk(&p.seq));
                        self.link = Link::RemoteDestination(Box::new(p));
                        self.identify_deadline = None;
                        self.identified();
                    }
                    Ok(None) => tracing::warn!(
                        conn = self.peer.id,
                        "VMOTION-PEER with an unknown or wrong cookie (here and in the cluster); not answering"
                    ),
                    Err(e) => tracing::warn!(
                        conn = self.peer.id,
                        error = %e,
                        "VMOTION-PEER: cannot ask the cluster for the vMotion; not answering"
                    ),
                }
            }
            Claiming::Ticket { stored, .. } => {
                let Poll::Ready(()) = stored.as_mut().poll(cx) else {
                    return Poll::Pending;
                };
                if let Some(Claiming::Ticket { cookie, .. }) = self.claiming.take().map(|b| *b) {
                    tracing::info!(vm = %self.label(), "vMotion begins; sent GOAHEAD (the cluster knows it)");
                    self.send(Msg::VmotionGoahead(&cookie));
                }
            }
            Claiming::Complete { claim, .. } => {
                let Poll::Ready(got) = claim.as_mut().poll(cx) else {
                    return Poll::Pending;
                };
                let Some(Claiming::Complete { from, .. }) = self.claiming.take().map(|b| *b) else {
                    return Poll::Ready(());
                };
                match got {
                    Ok((name, port)) => {
                        let name = match &self.name {
                            Some(n) => self.compose_name(n),
                            None => name,
                        };
                        let id = Identity {
                            key: VmUuid::key_of(&from.uuid).unwrap_or_else(|| from.uuid.clone()),
                            uuid: from.uuid.clone(),
                            name,
                        };
                        self.attach(id, Some(port));
                        if matches!(self.link, Link::Active(_)) {
                            self.handshake_deadline = None;
                            if let Some(c) = self.hub.cluster() {
                                c.took_over(&from.uuid, &from.node);
                            }
                        }
                    }
                    Err(e) => {
                        tracing::error!(uuid = %from.uuid, error = %e, "vMotion from another node: cannot take the VM over; closing the destination");
                        self.closing = true;
                    }
                }
            }
        }
        Poll::Ready(())
    }
}

impl Session for VmSession {
    fn on_input(&mut self, data: &[u8], now: Instant) -> Flow {
        let mut decoder = std::mem::take(&mut self.decoder);
        let result = decoder.decode(data, |ev| self.handle(ev, now));
        self.decoder = decoder;
        if let Err(e) = result {
            tracing::warn!(conn = self.peer.id, "closing VM connection: {e}");
            self.closing = true;
        }
        self.finish()
    }

    /// Reading goes on while the VM's backlog holds less than
    /// [`crate::hub::VM_HOLD`], so its control messages are still seen
    /// while its consoles hold its output back.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.claiming.is_some() {
            if self.poll_claim(cx).is_pending() {
                return Poll::Pending;
            }
            if let Flow::Close = self.finish() {
                self.peer.outbox.close(None);
            }
        }
        if let Some(p) = self.pace.as_mut() {
            if p.wait.as_mut().poll(cx).is_ready() {
                self.pace = None;
            } else if p.vm.holds_too_much() {
                return Poll::Pending;
            }
        }
        Poll::Ready(())
    }

    fn deadline(&self) -> Option<Instant> {
        [
            self.handshake_deadline,
            self.name_deadline,
            self.identify_deadline,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn on_deadline(&mut self, now: Instant) -> Flow {
        if self.handshake_deadline.is_some_and(|d| now >= d) {
            self.handshake_deadline = None;
            if !self.ext && matches!(self.link, Link::Handshake) {
                tracing::info!(
                    conn = self.peer.id,
                    "no VMware extension within the handshake timeout; closing"
                );
                self.reject_plain();
            }
        }
        if self.name_deadline.is_some_and(|d| now >= d) {
            self.name_deadline = None;
            tracing::info!(conn = self.peer.id, "VM sent no name; using its uuid");
            self.try_identify(now);
        }
        if self.identify_deadline.is_some_and(|d| now >= d) {
            self.identify_deadline = None;
            if matches!(self.link, Link::Handshake) {
                tracing::warn!(conn = self.peer.id, "connection sent no DO-PROXY with a uuid and no valid VMOTION-PEER within --identify-timeout; closing it");
                self.closing = true;
            }
        }
        self.finish()
    }

    fn on_close(&mut self, now: Instant) {
        self.identified();
        self.hub.forget_addr(self.peer.id);
        // Output already read is delivered after the connection is gone.
        if let Some(p) = self.pace.take() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(p.wait);
            }
        }
        match std::mem::replace(&mut self.link, Link::Retired) {
            Link::Active(vm) => self.hub.detach_vm(&vm, self.peer.id, now),
            Link::Destination { cookie, .. } => self.hub.vmotion_dest_closed(&cookie, self.peer.id),
            Link::Handshake | Link::Retired | Link::RemoteDestination(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    //! The VM session in-process, with synthetic time: every deadline is
    //! driven through [`Session::on_deadline`] with a made-up `now`, and the
    //! capture's ESXi bytes are fed straight in.
    use super::*;
    use crate::outbox::{Encoding, Outbox};
    use crate::wire::OwnedEvent;

    const HANDSHAKE: Duration = Duration::from_secs(5);
    const IDENTIFY: Duration = Duration::from_secs(60);

    fn hub() -> Arc<Hub> {
        crate::testing::hub(Duration::from_secs(60), Duration::from_secs(30), 1 << 20)
    }

    fn session(h: &Arc<Hub>, now: Instant) -> (VmSession, Arc<Outbox>) {
        let peer = h.new_peer(1 << 20, Encoding::Telnet);
        let outbox = peer.outbox.clone();
        let cfg = VmSessionConfig {
            handshake_timeout: HANDSHAKE,
            identify_timeout: IDENTIFY,
            multi_console: false,
        };
        (VmSession::new(h.clone(), peer, cfg, now), outbox)
    }

    /// What the session wrote so far, decoded.
    fn replies(o: &Outbox) -> Vec<OwnedEvent> {
        let (bytes, _) = crate::testing::written(o);
        let mut events = Vec::new();
        crate::wire::Decoder::default()
            .decode(&bytes, |ev| OwnedEvent::push_merged(&mut events, ev))
            .expect("our own replies decode");
        events
    }

    fn vmware(code: u8, payload: &[u8]) -> OwnedEvent {
        let mut p = vec![code];
        p.extend_from_slice(payload);
        OwnedEvent::Subneg(opt::VMWARE_EXT, p)
    }

    fn msg(m: Msg<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        m.encode(&mut out);
        out
    }

    const UUID: &[u8] = b"01 23 45 67 89 ab cd ef-fe dc ba 98 00 00 00 00";

    #[test]
    fn a_plain_telnet_client_is_told_and_closed_at_the_handshake_timeout() {
        let h = hub();
        let t0 = Instant::now();
        let (mut s, out) = session(&h, t0);
        assert_eq!(s.deadline(), Some(t0 + HANDSHAKE));
        assert!(matches!(s.on_deadline(t0 + HANDSHAKE), Flow::Close));
        let said = replies(&out);
        assert!(
            said.contains(&OwnedEvent::Data(NOT_ESXI_MSG.to_vec())),
            "{said:?}"
        );
    }

    #[test]
    fn an_unidentified_connection_is_closed_at_the_identify_timeout() {
        let h = hub();
        let t0 = Instant::now();
        let (mut s, _) = session(&h, t0);
        // The extension comes on, but no DO-PROXY and no uuid ever do.
        assert!(matches!(s.on_input(b"\xff\xfb\xe8", t0), Flow::Continue));
        assert_eq!(s.deadline(), Some(t0 + IDENTIFY));
        assert!(matches!(s.on_deadline(t0 + IDENTIFY), Flow::Close));
        assert!(h.is_empty());
    }

    #[test]
    fn a_vm_without_a_name_is_known_by_its_uuid_after_the_name_wait() {
        let h = hub();
        let t0 = Instant::now();
        let (mut s, _) = session(&h, t0);
        let mut bytes = b"\xff\xfb\xe8".to_vec();
        bytes.extend(msg(Msg::DoProxy {
            direction: b'S',
            uri: b"vSPC.py",
        }));
        bytes.extend(msg(Msg::VmVcUuid(UUID)));
        // Output before identification is held, not lost.
        bytes.extend_from_slice(b"early");
        s.on_input(&bytes, t0);
        assert!(h.is_empty(), "identified before the name wait");
        let due = s.deadline().expect("the name wait");
        assert_eq!(due, t0 + NAME_WAIT, "the name wait counts from the uuid");
        s.on_deadline(due - Duration::from_millis(1));
        assert!(h.is_empty(), "identified before the name wait ended");
        s.on_deadline(due);
        let vm = h.find("0123456789abcdef-fedcba9800000000").expect("listed");
        assert_eq!(vm.name(), "0123456789abcdef-fedcba9800000000");
        // A console sees what comes next; the early bytes went out first.
        assert!(vm.vm_connected());
    }

    /// The capture's first connection, fed in as ESXi sent it: the session
    /// must make the same replies the captured concentrator made (the
    /// secret differs: ours is random and 8 bytes).
    #[test]
    fn the_captured_power_on_connection_gets_the_captured_replies() {
        let text = include_str!("../../../tests/captures/stream0.txt");
        let h = hub();
        let t0 = Instant::now();
        let (mut s, out) = session(&h, t0);
        let mut theirs = Vec::new();
        let mut begin = None;
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let (from_vm, hex) = match line.split_once(' ') {
                Some(("vm>", hex)) => (true, hex),
                Some(("<vspc", hex)) => (false, hex),
                _ => continue,
            };
            let bytes: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
                .collect();
            if from_vm {
                if bytes.starts_with(b"\xff\xfa\xe8\x28") {
                    begin = Some(bytes.clone());
                }
                s.on_input(&bytes, t0);
            } else {
                theirs.extend(bytes);
            }
        }
        let mut want = Vec::new();
        crate::wire::Decoder::default()
            .decode(&theirs, |ev| OwnedEvent::push_merged(&mut want, ev))
            .expect("capture decodes");
        let got = replies(&out);
        // Every command the captured concentrator sent, ours sent too, in
        // the same order; GOAHEAD is compared by its sequence.
        let goahead = |e: &OwnedEvent| matches!(e, OwnedEvent::Subneg(0xe8, p) if p[0] == 0x29);
        let strip = |v: &[OwnedEvent]| -> Vec<OwnedEvent> {
            v.iter()
                .filter(|e| !matches!(e, OwnedEvent::Data(_)))
                .map(|e| match e {
                    OwnedEvent::Subneg(0xe8, p) if p[0] == 0x29 => vmware(0x29, &p[1..5]),
                    other => other.clone(),
                })
                .collect()
        };
        let (got_cmds, want_cmds) = (strip(&got), strip(&want));
        let mut rest = got_cmds.iter();
        for w in &want_cmds {
            assert!(
                rest.any(|g| g == w),
                "missing or out of order: {w:?}\nours: {got_cmds:?}\ntheirs: {want_cmds:?}"
            );
        }
        assert!(begin.is_some(), "the capture has a BEGIN");
        let ours = got.iter().find(|e| goahead(e)).expect("GOAHEAD");
        match ours {
            OwnedEvent::Subneg(_, p) => assert_eq!(p.len(), 1 + 4 + 8),
            _ => unreachable!(),
        }
        let vm = h.find("vm-00000").expect("the capture's VM");
        assert_eq!(vm.uuid, "0123456789abcdef-fedcba9800000000");
    }
}
