//! The simulated ESXi connection ([`SimVm`]) and who it is ([`Identity`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio::time::Instant;

use vspc_codec::vmware::Msg;
use vspc_codec::wire::{encode, opt, Event, Negotiator, OptionSet, Verb};

use super::link::*;
use super::*;

/// Who a simulated VM is: what it answers to GET-VM-VC-UUID and GET-VM-NAME
/// and what it puts in DO-PROXY.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The VC UUID, sent as ESXi's text (`01 23 ... ef-fe ... 00`).
    pub uuid: [u8; 16],
    /// The VM display name (VM-NAME).
    pub name: String,
    /// The port's serviceURI (DO-PROXY).
    pub service_uri: String,
    /// The DO-PROXY direction byte, `b'S'` or `b'C'`.
    pub direction: u8,
}

impl Identity {
    /// The VM of the capture: `01 23 45 67 89 ab cd ef-fe dc ba 98 00 00 00
    /// 00`, `vm-00000`, `vSPC.py`, `S`.
    pub fn capture() -> Identity {
        Identity {
            uuid: [
                0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0xfe, 0xdc, 0xba, 0x98, 0, 0, 0, 0,
            ],
            name: "vm-00000".into(),
            service_uri: "vSPC.py".into(),
            direction: b'S',
        }
    }

    /// A distinct identity for each `index`: uuid `42 1f 5e 7a <index BE>
    /// <8 mixed bytes>`, name `sim-vm-<index>`, uri `vSPC.py`, direction S.
    pub fn numbered(index: u32) -> Identity {
        let mut uuid = [0u8; 16];
        uuid[..4].copy_from_slice(&[0x42, 0x1f, 0x5e, 0x7a]);
        uuid[4..8].copy_from_slice(&index.to_be_bytes());
        uuid[8..].copy_from_slice(&splitmix64(u64::from(index)).to_be_bytes());
        Identity {
            uuid,
            name: format!("sim-vm-{index:05}"),
            service_uri: "vSPC.py".into(),
            direction: b'S',
        }
    }

    /// The same identity with another serviceURI.
    pub fn with_uri(mut self, uri: &str) -> Identity {
        self.service_uri = uri.into();
        self
    }

    /// The same identity with another DO-PROXY direction byte.
    pub fn with_direction(mut self, direction: u8) -> Identity {
        self.direction = direction;
        self
    }

    /// ESXi's VM-VC-UUID text: 16 lowercase hex pairs separated by spaces,
    /// with `-` instead of the space after the 8th.
    pub fn uuid_text(&self) -> String {
        let mut s = String::with_capacity(47);
        for (i, b) in self.uuid.iter().enumerate() {
            if i == 8 {
                s.push('-');
            } else if i > 0 {
                s.push(' ');
            }
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// vSPC.py's display form, as the admin listing shows it:
    /// `0123456789abcdef-fedcba9800000000`.
    pub fn uuid_display(&self) -> String {
        format!("{}-{}", hex(&self.uuid[..8]), hex(&self.uuid[8..]))
    }
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What a simulated VM connection is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// A normal (power-on) connection: sends DO-PROXY, ready at WILL-PROXY.
    Source,
    /// A vMotion destination: sends VMOTION-PEER with this cookie
    /// (sequence ‖ secret from GOAHEAD) and no DO-PROXY; ready at PEER-OK.
    Destination { cookie: Vec<u8> },
}

/// Knobs for a simulated VM.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// Limit for the handshake wait and for waiting on vMotion replies.
    pub timeout: Duration,
    /// Answer GET-VM-NAME (false simulates a VM whose name never comes).
    pub answer_name: bool,
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            timeout: DEFAULT_TIMEOUT,
            answer_name: true,
        }
    }
}

/// The proxy's answer to VMOTION-BEGIN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmotionReply {
    /// VMOTION-GOAHEAD: `cookie` is sequence ‖ secret, for the destination.
    GoAhead { cookie: Vec<u8> },
    /// VMOTION-NOTNOW.
    NotNow,
}

/// ESXi's side of the handshake (vspc/PROTOCOL.md §4 and §5).
struct VmBrain {
    id: Identity,
    role: Role,
    answer_name: bool,
    neg: Negotiator,
    /// The proxy has answered our WILL AUTHENTICATION.
    auth_answered: bool,
    /// DO VMWARE-EXT arrived before that answer; ESXi holds it.
    ext_deferred: bool,
    /// We perform option 232.
    ext_on: bool,
    ks1_sent: bool,
    ks1_deadline: Option<Instant>,
    com_port_offered: bool,
    /// When VMOTION-PEER was queued (a destination), for [`SimVm::peer_round_trip`].
    peer_sent: Arc<std::sync::OnceLock<Instant>>,
}

impl VmBrain {
    fn new(id: Identity, role: Role, answer_name: bool) -> VmBrain {
        use opt::*;
        VmBrain {
            id,
            role,
            answer_name,
            // We perform BINARY, SGA and 232 when asked; we let the proxy
            // perform BINARY, SGA and ECHO (as ESXi does in `tests/captures/stream0.txt`).
            neg: Negotiator::new(
                OptionSet::of(&[BINARY, SGA, VMWARE_EXT]),
                OptionSet::of(&[BINARY, SGA, ECHO]),
            ),
            auth_answered: false,
            ext_deferred: false,
            ext_on: false,
            ks1_sent: false,
            ks1_deadline: None,
            com_port_offered: false,
            peer_sent: Arc::default(),
        }
    }

    fn negotiate(&mut self, verb: Verb, option: u8, out: &mut Vec<u8>) {
        if option == opt::VMWARE_EXT && verb == Verb::Do && !self.auth_answered {
            // ESXi answers DO 232 only after its AUTH offer is answered.
            self.ext_deferred = true;
            return;
        }
        self.neg.receive(verb, option, out);
        if option == opt::AUTHENTICATION
            && matches!(verb, Verb::Do | Verb::Dont)
            && !self.auth_answered
        {
            self.auth_answered = true;
            if self.neg.local(opt::AUTHENTICATION) {
                // We do not implement SSL-in-telnet; withdraw the offer.
                self.neg.disable_local(opt::AUTHENTICATION, out);
            }
            if self.ext_deferred {
                self.neg.receive(Verb::Do, opt::VMWARE_EXT, out);
            } else {
                self.neg.enable_local(opt::VMWARE_EXT, out);
            }
        }
        if !self.ext_on && self.neg.local(opt::VMWARE_EXT) {
            self.ext_on = true;
            self.ks1_deadline = Some(Instant::now() + KS1_FALLBACK);
        }
    }

    /// KNOWN-SUBOPTIONS-1 plus DO-PROXY (source) or VMOTION-PEER and WILL
    /// COM-PORT (destination), all in one write.
    fn send_ks1(&mut self, out: &mut Vec<u8>) {
        self.ks1_sent = true;
        Msg::KnownSuboptions1(ESXI_KNOWN_SUBOPTIONS).encode(out);
        match &self.role {
            Role::Source => Msg::DoProxy {
                direction: self.id.direction,
                uri: self.id.service_uri.as_bytes(),
            }
            .encode(out),
            Role::Destination { cookie } => {
                Msg::VmotionPeer(cookie).encode(out);
                let _ = self.peer_sent.set(Instant::now());
                self.offer_com_port(out);
            }
        }
    }

    fn offer_com_port(&mut self, out: &mut Vec<u8>) {
        if !self.com_port_offered {
            self.com_port_offered = true;
            self.neg.enable_local(opt::COM_PORT, out);
        }
    }

    fn vmware(&mut self, body: &[u8], out: &mut Vec<u8>) {
        let Ok(msg) = Msg::decode(body) else {
            return;
        };
        let uuid = self.id.uuid_text();
        match msg {
            Msg::KnownSuboptions2(_) if self.ext_on && !self.ks1_sent => self.send_ks1(out),
            Msg::GetVmVcUuid => Msg::VmVcUuid(uuid.as_bytes()).encode(out),
            Msg::GetVmBiosUuid => Msg::VmBiosUuid(uuid.as_bytes()).encode(out),
            Msg::GetVmLocationUuid => Msg::VmLocationUuid(uuid.as_bytes()).encode(out),
            Msg::GetVmName if self.answer_name => Msg::VmName(self.id.name.as_bytes()).encode(out),
            Msg::WillProxy if self.role == Role::Source => self.offer_com_port(out),
            Msg::Unknown { code, .. } => Msg::UnknownSuboptionRcvd1(code).encode(out),
            _ => {}
        }
    }
}

impl Brain for VmBrain {
    fn start(&mut self, out: &mut Vec<u8>) {
        // ESXi's first bytes: IAC WILL AUTHENTICATION (the first line of `tests/captures/stream0.txt`).
        self.neg.enable_local(opt::AUTHENTICATION, out);
    }

    fn on_event(&mut self, ev: &Event<'_>, out: &mut Vec<u8>) {
        match *ev {
            Event::Negotiate(verb, option) => self.negotiate(verb, option, out),
            Event::Subneg {
                option: opt::VMWARE_EXT,
                payload,
            } => self.vmware(payload, out),
            _ => {}
        }
    }

    fn deadline(&self) -> Option<Instant> {
        if self.ks1_sent {
            None
        } else {
            self.ks1_deadline
        }
    }

    fn on_deadline(&mut self, out: &mut Vec<u8>) {
        self.ks1_deadline = None;
        if !self.ks1_sent {
            self.send_ks1(out);
        }
    }
}

/// One simulated ESXi serial-port connection to the proxy port.
///
/// The reader task keeps answering the proxy (negotiation, GET-VM-VC-UUID,
/// GET-VM-NAME) for the life of the connection, like ESXi does.
pub struct SimVm {
    link: Link,
    role: Role,
    timeout: Duration,
    peer_sent: Arc<std::sync::OnceLock<Instant>>,
}

impl SimVm {
    /// Connect as a powered-on VM and wait for WILL-PROXY.
    pub async fn connect(addr: impl ToSocketAddrs, id: &Identity) -> Result<SimVm> {
        SimVm::connect_with(addr, id, Role::Source, &VmOptions::default()).await
    }

    /// Connect as a vMotion destination presenting `cookie` and wait for
    /// PEER-OK (see [`SimVm::peer_ok`] for its payload). A wrong cookie gets
    /// silence, so this fails with [`SimError::Timeout`] after
    /// [`DEFAULT_TIMEOUT`]; use [`SimVm::connect_with`] for another limit.
    pub async fn connect_destination(
        addr: impl ToSocketAddrs,
        id: &Identity,
        cookie: &[u8],
    ) -> Result<SimVm> {
        let role = Role::Destination {
            cookie: cookie.to_vec(),
        };
        SimVm::connect_with(addr, id, role, &VmOptions::default()).await
    }

    /// Connect over TCP (TCP_NODELAY, so writes leave as separate segments)
    /// and wait until ready (see [`SimVm::wait_ready`]).
    pub async fn connect_with(
        addr: impl ToSocketAddrs,
        id: &Identity,
        role: Role,
        opts: &VmOptions,
    ) -> Result<SimVm> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let vm = SimVm::start(stream, id, role, opts);
        vm.wait_ready().await?;
        Ok(vm)
    }

    /// Run the simulation over an already connected stream (TCP, TLS, ...)
    /// without waiting for anything. Must be called inside a tokio runtime.
    pub fn start<S>(stream: S, id: &Identity, role: Role, opts: &VmOptions) -> SimVm
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let brain = VmBrain::new(id.clone(), role.clone(), opts.answer_name);
        let peer_sent = brain.peer_sent.clone();
        SimVm {
            link: Link::start(stream, brain),
            role,
            timeout: opts.timeout,
            peer_sent,
        }
    }

    /// Wait for the end of the handshake: WILL-PROXY for a source (an error
    /// for WONT-PROXY), PEER-OK for a destination (an error unless its payload
    /// is a proper prefix of the cookie, i.e. the sequence).
    pub async fn wait_ready(&self) -> Result<()> {
        match &self.role {
            Role::Source => {
                let (_, ev) = self
                    .link
                    .wait_event(0, self.timeout, "WILL-PROXY", |e| {
                        matches!(e.msg(), Some(Msg::WillProxy | Msg::WontProxy))
                    })
                    .await?;
                match ev.msg() {
                    Some(Msg::WontProxy) => Err(SimError::WontProxy),
                    _ => Ok(()),
                }
            }
            Role::Destination { cookie } => {
                let (_, ev) = self
                    .link
                    .wait_event(0, self.timeout, "VMOTION-PEER-OK", |e| {
                        matches!(e.msg(), Some(Msg::VmotionPeerOk(_)))
                    })
                    .await?;
                match ev.msg() {
                    Some(Msg::VmotionPeerOk(seq))
                        if seq.len() < cookie.len() && cookie.starts_with(seq) =>
                    {
                        Ok(())
                    }
                    other => Err(SimError::Unexpected(format!(
                        "{other:?} in answer to VMOTION-PEER {}",
                        hex(cookie)
                    ))),
                }
            }
        }
    }

    /// The payload of the first PEER-OK received, if any.
    pub fn peer_ok(&self) -> Option<Vec<u8>> {
        self.link.events().iter().find_map(|e| match e.msg() {
            Some(Msg::VmotionPeerOk(seq)) => Some(seq.to_vec()),
            _ => None,
        })
    }

    /// Send serial output (IAC doubled).
    pub async fn send(&self, data: &[u8]) -> Result<()> {
        self.link.write(encode::escaped(data)).await
    }

    /// Send bytes exactly as given.
    pub async fn send_raw(&self, bytes: &[u8]) -> Result<()> {
        self.link.write(bytes.to_vec()).await
    }

    /// Send one VMware message.
    pub async fn send_msg(&self, msg: &Msg<'_>) -> Result<()> {
        self.link.write(msg.to_bytes()).await
    }

    /// BEGIN `seq` and insist on GOAHEAD with the daemon's 8-byte secret
    /// after the sequence; returns the cookie (panics otherwise).
    pub async fn expect_goahead(&self, seq: &[u8]) -> Vec<u8> {
        match self.begin_vmotion(seq).await {
            Ok(VmotionReply::GoAhead { cookie }) => {
                assert_eq!(cookie.len(), seq.len() + 8, "the secret should be 8 bytes");
                cookie
            }
            other => panic!("BEGIN {seq:02x?}: wanted GOAHEAD, got {other:?}"),
        }
    }

    /// Send VMOTION-BEGIN and wait for GOAHEAD (whose payload must start
    /// with `seq`) or NOTNOW (whose payload must be `seq`).
    pub async fn begin_vmotion(&self, seq: &[u8]) -> Result<VmotionReply> {
        self.begin_vmotion_timed(seq).await.map(|(reply, _)| reply)
    }

    /// [`SimVm::begin_vmotion`], and the time from just before BEGIN was
    /// handed to the writer to the return of the read that carried the
    /// answer (not counting the wake-up of the caller).
    pub async fn begin_vmotion_timed(&self, seq: &[u8]) -> Result<(VmotionReply, Duration)> {
        let since = self.link.event_count();
        let sent = Instant::now();
        self.send_msg(&Msg::VmotionBegin(seq)).await?;
        let (index, ev) = self
            .link
            .wait_event(since, self.timeout, "VMOTION-GOAHEAD or NOTNOW", |e| {
                matches!(
                    e.msg(),
                    Some(Msg::VmotionGoahead(_) | Msg::VmotionNotNow(_))
                )
            })
            .await?;
        let took = self
            .link
            .event_at(index)
            .unwrap_or_else(Instant::now)
            .saturating_duration_since(sent);
        match ev.msg() {
            Some(Msg::VmotionGoahead(c)) if c.len() > seq.len() && c.starts_with(seq) => {
                Ok((VmotionReply::GoAhead { cookie: c.to_vec() }, took))
            }
            Some(Msg::VmotionNotNow(s)) if s == seq => Ok((VmotionReply::NotNow, took)),
            other => Err(SimError::Unexpected(format!(
                "{other:?} in answer to VMOTION-BEGIN {}",
                hex(seq)
            ))),
        }
    }

    /// On a destination that received PEER-OK: the time from queueing
    /// VMOTION-PEER to the return of the read that carried PEER-OK.
    pub fn peer_round_trip(&self) -> Option<Duration> {
        let sent = *self.peer_sent.get()?;
        let events = self.link.events();
        let index = events
            .iter()
            .position(|e| matches!(e.msg(), Some(Msg::VmotionPeerOk(_))))?;
        Some(self.link.event_at(index)?.saturating_duration_since(sent))
    }

    /// Send VMOTION-COMPLETE (on a destination).
    pub async fn complete(&self, seq: &[u8]) -> Result<()> {
        self.send_msg(&Msg::VmotionComplete(seq)).await
    }

    /// Send VMOTION-ABORT, empty as ESXi sends it (on a source).
    pub async fn abort(&self) -> Result<()> {
        self.send_msg(&Msg::VmotionAbort).await
    }

    /// Console input forwarded by the proxy: everything buffered, after
    /// waiting up to `wait` for at least one byte. Empty if nothing came.
    pub async fn recv_data(&self, wait: Duration) -> Vec<u8> {
        self.link.recv_data(wait).await
    }

    /// Exactly `n` bytes of console input.
    pub async fn read_exact_data(&self, n: usize, timeout: Duration) -> Result<Vec<u8>> {
        self.link.read_exact_data(n, timeout).await
    }

    /// Every command the proxy sent so far, in order.
    pub fn events(&self) -> Vec<Received> {
        self.link.events()
    }

    /// How many commands have arrived (an index for [`SimVm::wait_event`]).
    pub fn event_count(&self) -> usize {
        self.link.event_count()
    }

    /// The first command at index `since` or later that matches `pred`,
    /// with its index.
    pub async fn wait_event(
        &self,
        since: usize,
        timeout: Duration,
        pred: impl Fn(&Received) -> bool,
    ) -> Result<(usize, Received)> {
        self.link
            .wait_event(since, timeout, "a matching command", pred)
            .await
    }

    /// Why the proxy side ended, once it has (EOF or an error).
    pub fn closed(&self) -> Option<String> {
        self.link.end_reason()
    }

    /// Wait until the proxy closes the connection.
    pub async fn wait_closed(&self, timeout: Duration) -> Result<()> {
        let what = "the proxy to close the connection";
        self.link
            .wait_until(timeout, what, |inbox| inbox.end.is_some().then_some(Ok(())))
            .await
    }

    /// Deliver what is queued, then close the connection.
    pub async fn close(self) {
        self.link.close().await;
    }

    /// Stop simulating and take the connection back, for raw I/O after the
    /// handshake: whatever was queued is written first, and data already
    /// received comes along ([`RawConn`]). From then on nothing answers the
    /// proxy's questions. `S` is the stream type the VM was started with
    /// (`TcpStream` for the `connect*` constructors); another type is
    /// [`SimError::Unexpected`]. Fails with [`SimError::Closed`] if the
    /// connection has already ended.
    pub async fn into_raw<S>(self) -> Result<RawConn<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.link.detach().await
    }

    /// Deliver what is queued, shut the write side down (the proxy reads
    /// EOF after the last byte sent) and wait up to `timeout` for the proxy
    /// to close its side, which proves it has read everything. Console input
    /// arriving meanwhile stays readable ([`SimVm::recv_data`]).
    pub async fn hang_up(&self, timeout: Duration) -> Result<()> {
        self.link.shutdown_write().await;
        self.wait_closed(timeout).await
    }
}
