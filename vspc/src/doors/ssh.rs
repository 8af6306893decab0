//! The SSH front door: `ssh -p P VM@host` opens that VM's console, `ssh -p
//! P list@host` lists the VMs the key may see (`name:uuid:port` lines, as
//! vSPC.py's client prints them). Off unless `--ssh-port` is given.
//!
//! # Who gets in
//!
//! Public keys only, from `--ssh-authorized-keys` in OpenSSH's format, with
//! two options of vspc's own per key ([`parse_authorized_keys`]):
//! `vms="web-*,db-1"` (globs on the VM's name, when no other VM has it, or
//! its uuid; `uuid:GLOB` on the uuid only; none: every VM) and
//! `mode="read-only|write|free-for-all|exclusive"` (the lock the key's
//! sessions take; none: `free-for-all-fallback`, as on the admin port). A
//! malformed line is logged with its file and line number and skipped,
//! never read as "any key, any VM". The file is read at start (unreadable,
//! or writable by group or others: start-up stops) and again on SIGHUP
//! ([`SshState::reload`]). A reload applies at once: every channel open
//! and session start looks the key up again, and open sessions the new
//! keys no longer allow are closed. Passwords and keyboard-interactive are
//! not offered at all.
//!
//! # Limits
//!
//! Each connection has `--ssh-auth-timeout` from accept to log in, and at
//! most `--ssh-max-unauthenticated` wait at once ([`serve`],
//! [`connection`]); `--ssh-idle-timeout` closes a connection without
//! console data. russh has no limit before its key exchange and counts
//! keepalive answers as activity, so these are kept here: the socket is
//! shut under russh when one is passed.
//!
//! # The console
//!
//! A session is an ordinary console of the VM: a [`crate::session::console::ConsoleSession`] with
//! [`ConsoleProtocol::Raw`], shown the backend's recent output first, and
//! served by the same connection driver as every console
//! ([`crate::net::conn`]) over an in-process pipe ([`serve_console_over_pipe`]), as the
//! browser console is ([`crate::doors::http::web`]). The adapter here ([`pump`]) moves
//! bytes between the pipe and the SSH channel: the channel's window holds
//! the adapter back, the pipe then fills, and the driver sees a console
//! that does not keep up (the VM waits, then skip-and-tell and stalls as
//! for any console). EOF from the client does not end the session (output
//! still flows); the channel's close or the connection's end does, at
//! once. Bytes pass untouched both ways except the escape:
//! `~.` at the start of a line (after CR or LF, or first) closes the
//! session and `~~` sends one `~`, as OpenSSH's client does; it is done here,
//! on the server, so it works with `ssh -e none` and non-OpenSSH clients.
//!
//! Window-change requests are accepted and ignored (a serial line has no
//! size); `break` and other unknown channel requests are answered "not
//! supported" by russh; exec and subsystem requests are refused.

use crate::hub::{Access, ConsoleProtocol, Hub, LockMode, Vm};
use crate::metrics::{Door, SshClosed};
use crate::net::conn::{serve_console_over_pipe, PIPE_BYTES};
use crate::session::open::{self, Find, History, Request};
use bytes::{Buf, Bytes};
use russh::keys::{HashAlg, PrivateKey, PublicKey};
use russh::server::{Auth, ChannelOpenHandle, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelMsg, MethodKind, MethodSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::TcpListener;

/// How long a closing connection's sessions may take to pass on their last
/// bytes.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// The user name that lists VMs instead of opening a console.
pub const LIST_USER: &str = "list";

/// One usable line of the authorized keys file.
#[derive(Debug, Clone)]
pub struct KeyEntry {
    /// The key itself; an offered key matches on its key data.
    pub key: PublicKey,
    /// The line's comment (usually `user@host`), for the audit lines.
    pub comment: String,
    /// `SHA256:…`, as `ssh-keygen -l` prints it: names the key in logs
    /// whatever its comment says.
    pub fingerprint: String,
    /// `vms="…"` globs; `None`: every VM.
    pub vms: Option<Vec<String>>,
    /// The lock the key's sessions take (`mode="…"`).
    pub mode: LockMode,
}

impl KeyEntry {
    /// May this key see `vm`? A pattern `uuid:GLOB` matches the uuid
    /// only; any other matches the uuid, or the name when `name_is_unique`
    /// (no other VM has it: a name a second VM claimed identifies
    /// neither, so a name pattern never lets a key onto an impostor).
    pub fn may_see(&self, vm: &Vm, name_is_unique: bool) -> bool {
        self.may_see_ids(&vm.name(), &vm.uuid, &vm.key, name_is_unique)
    }

    /// [`KeyEntry::may_see`] by the VM's name, uuid and registry key (a VM
    /// another node of the cluster holds has no local entry).
    pub fn may_see_ids(&self, name: &str, uuid: &str, key: &str, name_is_unique: bool) -> bool {
        match &self.vms {
            None => true,
            Some(globs) => globs.iter().any(|g| match g.strip_prefix("uuid:") {
                Some(u) => glob(u, uuid) || glob(u, key),
                None => (name_is_unique && glob(g, name)) || glob(g, uuid) || glob(g, key),
            }),
        }
    }

    /// [`KeyEntry::may_see`] for what a session is on.
    fn may_see_on(&self, on: &On) -> bool {
        match on {
            On::Local(vm) => self.may_see(vm, true),
            On::Remote(v) => self.may_see_ids(&v.record.name, &v.record.uuid, &remote_key(v), true),
        }
    }

    /// Who the key is, for the audit lines: comment and fingerprint.
    fn who(&self) -> String {
        format!("{} {}", self.comment, self.fingerprint)
    }
}

/// The keys the front door accepts now.
#[derive(Debug, Default)]
pub struct AuthorizedKeys {
    /// Every well-formed line, in file order (the first match wins).
    pub entries: Vec<Arc<KeyEntry>>,
}

impl AuthorizedKeys {
    /// The entry for `key`, if the file has one.
    pub fn find(&self, key: &PublicKey) -> Option<Arc<KeyEntry>> {
        self.entries
            .iter()
            .find(|e| e.key.key_data() == key.key_data())
            .cloned()
    }
}

/// A problem with one line of the authorized keys file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub error: String,
}

/// `*` matches any run of characters, `?` any one; everything else itself.
pub fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    // Where the last `*` was, and where in the text it matched up to.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// OpenSSH's options that grant nothing here (vspc forwards nothing and
/// runs no commands), so a line copied from a shell account's file keeps
/// working. Any other OpenSSH option (`from=`, `command=`, …) would limit
/// the key in a way vspc does not enforce: such a line is refused.
const HARMLESS: &[&str] = &[
    "restrict",
    "no-port-forwarding",
    "no-agent-forwarding",
    "no-x11-forwarding",
    "no-user-rc",
    "no-pty",
];

/// Split at the first unquoted whitespace: (options, rest).
fn split_options(line: &str) -> Result<(&str, &str), String> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' && quoted {
            escaped = true;
        } else if c == '"' {
            quoted = !quoted;
        } else if c.is_whitespace() && !quoted {
            return Ok((&line[..i], line[i..].trim_start()));
        }
    }
    if quoted {
        Err("unterminated quote in the options".into())
    } else {
        Err("options but no key".into())
    }
}

/// `a,b="x,y",c` into (name, value) pairs; quotes removed, `\"` unescaped.
fn parse_options(opts: &str) -> Result<Vec<(String, Option<String>)>, String> {
    let mut out = Vec::new();
    let mut chars = opts.chars().peekable();
    loop {
        let mut name = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' {
                break;
            }
            name.push(c);
            chars.next();
        }
        if name.is_empty() {
            return Err("an empty option".into());
        }
        let value = if chars.peek() == Some(&'=') {
            chars.next();
            if chars.next() != Some('"') {
                return Err(format!("option {name}= needs a quoted value"));
            }
            let mut v = String::new();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '\\' if chars.peek() == Some(&'"') => {
                        v.push('"');
                        chars.next();
                    }
                    '"' => {
                        closed = true;
                        break;
                    }
                    c => v.push(c),
                }
            }
            if !closed {
                return Err(format!("option {name}= has an unterminated quote"));
            }
            Some(v)
        } else {
            None
        };
        out.push((name, value));
        match chars.next() {
            None => return Ok(out),
            Some(',') => {}
            Some(c) => return Err(format!("unexpected {c:?} after an option")),
        }
    }
}

/// The lock a `mode="…"` names.
fn parse_mode(s: &str) -> Option<LockMode> {
    match s.to_ascii_lowercase().as_str() {
        "read-only" | "readonly" => Some(LockMode::ReadOnly),
        other => LockMode::parse(other),
    }
}

/// Does `token` look like the key type that starts a line without options?
fn is_key_type(token: &str) -> bool {
    token.starts_with("ssh-")
        || token.starts_with("ecdsa-")
        || token.starts_with("sk-")
        || token.starts_with("rsa-")
}

/// One line (not blank, not a comment).
fn parse_line(line: &str) -> Result<KeyEntry, String> {
    let first = line.split_whitespace().next().unwrap_or_default();
    let (opts, key_text) = if is_key_type(first) {
        ("", line)
    } else {
        split_options(line)?
    };
    let mut vms = None;
    let mut mode = LockMode::FreeForAllOrReadOnly;
    if !opts.is_empty() {
        for (name, value) in parse_options(opts)? {
            match (name.to_ascii_lowercase().as_str(), value) {
                ("vms", Some(v)) => {
                    let globs: Vec<String> = v
                        .split(',')
                        .map(|g| g.trim().to_string())
                        .filter(|g| !g.is_empty())
                        .collect();
                    if globs.is_empty() {
                        return Err("vms=\"\" names no VM".into());
                    }
                    vms = Some(globs);
                }
                ("mode", Some(v)) => {
                    mode = parse_mode(&v).ok_or_else(|| {
                        format!(
                            "unknown mode {v:?} (use read-only, write, free-for-all, exclusive or free-for-all-fallback)"
                        )
                    })?;
                }
                (n, None) if HARMLESS.contains(&n) => {}
                (n, _) => {
                    return Err(format!(
                        "option {n:?} is not supported here (vspc knows vms=\"…\" and mode=\"…\")"
                    ))
                }
            }
        }
    }
    let key =
        PublicKey::from_openssh(key_text.trim()).map_err(|e| format!("not a public key ({e})"))?;
    let mut words = key_text.split_whitespace();
    let _ = (words.next(), words.next());
    let comment = words.collect::<Vec<_>>().join(" ");
    let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
    Ok(KeyEntry {
        key,
        comment,
        fingerprint,
        vms,
        mode,
    })
}

/// Parse an authorized keys file's text: the usable entries, and an error
/// for every line that is not (those lines are left out).
pub fn parse_authorized_keys(text: &str) -> (AuthorizedKeys, Vec<LineError>) {
    let mut keys = AuthorizedKeys::default();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match parse_line(line) {
            Ok(e) => keys.entries.push(Arc::new(e)),
            Err(error) => errors.push(LineError { line: i + 1, error }),
        }
    }
    (keys, errors)
}

/// Why the authorized keys file was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeysError {
    /// It cannot be opened or read.
    Unreadable(String),
    /// Group or others may write it (StrictModes): whoever can write it
    /// can let themselves in.
    Unsafe(String),
}

impl std::fmt::Display for KeysError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeysError::Unreadable(e) | KeysError::Unsafe(e) => f.write_str(e),
        }
    }
}

/// Who besides the owner `mode` lets in: "group", "others" or "group and
/// others", for the bits in `mask` (0o022: write, 0o044: read).
fn who_besides_owner(mode: u32, mask: u32) -> &'static str {
    match (mode & mask & 0o070 != 0, mode & mask & 0o007 != 0) {
        (true, true) => "group and others",
        (true, false) => "group",
        _ => "others",
    }
}

/// Refuse a file that group or others may write, as OpenSSH's StrictModes
/// does: `what` names it in the error, `why` says what a writer could do.
fn refuse_writable(
    file: &std::fs::File,
    path: &Path,
    what: &str,
    why: &str,
) -> Result<u32, String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = file
        .metadata()
        .map_err(|e| {
            format!(
                "cannot read the permissions of {what} {}: {e}",
                path.display()
            )
        })?
        .permissions()
        .mode();
    if mode & 0o022 != 0 {
        return Err(format!(
            "{what} {} is writable by {} (mode {:04o}): {why}; run chmod go-w on it",
            path.display(),
            who_besides_owner(mode, 0o022),
            mode & 0o7777
        ));
    }
    Ok(mode)
}

/// Read and parse `path`, logging each bad line with the file and line
/// number. An unreadable file, or one that group or others may write, is
/// an error naming it.
pub fn load_authorized_keys(path: &Path) -> Result<AuthorizedKeys, KeysError> {
    use std::io::Read;
    let unreadable = |e: std::io::Error| {
        KeysError::Unreadable(format!(
            "cannot read SSH authorized keys {}: {e}",
            path.display()
        ))
    };
    let mut file = std::fs::File::open(path).map_err(unreadable)?;
    refuse_writable(
        &file,
        path,
        "SSH authorized keys",
        "whoever can write it can add a key of their own",
    )
    .map_err(KeysError::Unsafe)?;
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(unreadable)?;
    let (keys, errors) = parse_authorized_keys(&text);
    for e in &errors {
        tracing::warn!(
            "{}:{}: skipping this authorized key line: {}",
            path.display(),
            e.line,
            e.error
        );
    }
    tracing::info!(file = %path.display(), keys = keys.entries.len(), skipped = errors.len(), "SSH authorized keys loaded");
    Ok(keys)
}

/// Read the host key from `path`, or make a new ed25519 key there (mode
/// 0600, its folder 0700) when there is no file. A file that is there but
/// cannot be read or parsed, or that group or others may write, is an
/// error naming it; one they may read is used with a warning.
pub fn load_or_create_host_key(path: &Path) -> Result<PrivateKey, String> {
    use std::io::Read;
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return create_host_key(path),
        Err(e) => return Err(format!("cannot read SSH host key {}: {e}", path.display())),
    };
    let mode = refuse_writable(
        &file,
        path,
        "SSH host key",
        "whoever can write it can replace this server's identity",
    )?;
    if mode & 0o044 != 0 {
        tracing::warn!(
            file = %path.display(),
            "SSH host key {} is readable by {} (mode {:04o}): whoever can read it can pose as this server; run chmod 600 on it",
            path.display(),
            who_besides_owner(mode, 0o044),
            mode & 0o7777
        );
    }
    let mut text = String::new();
    file.read_to_string(&mut text)
        .map_err(|e| format!("cannot read SSH host key {}: {e}", path.display()))?;
    PrivateKey::from_openssh(text.as_bytes()).map_err(|e| {
        format!(
            "SSH host key {} is not an OpenSSH private key: {e}",
            path.display()
        )
    })
}

fn create_host_key(path: &Path) -> Result<PrivateKey, String> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        format!("cannot {what} SSH host key {}: {e}", path.display())
    };
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| fail("make a random", &e))?;
    let pair = russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&seed);
    let mut key = PrivateKey::from(pair);
    key.set_comment("vspc host key");
    let text = key
        .to_openssh(russh::keys::ssh_key::LineEnding::LF)
        .map_err(|e| fail("encode the", &e))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| fail("make the folder of the", &e))?;
        }
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| fail("create the", &e))?;
    std::io::Write::write_all(&mut file, text.as_bytes()).map_err(|e| fail("write the", &e))?;
    tracing::info!(file = %path.display(), fingerprint = %key.fingerprint(HashAlg::Sha256), "made a new SSH host key");
    Ok(key)
}

/// The front door's settings, checked before the daemon starts.
#[derive(Clone)]
pub struct SshConfig {
    /// Where to listen (`--ssh-iface`, `--ssh-port`).
    pub addr: SocketAddr,
    /// The shared state: host key, authorized keys.
    pub state: Arc<SshState>,
}

/// The time limits and the cap on SSH connections.
#[derive(Debug, Clone, Copy)]
pub struct SshLimits {
    /// From accept to an accepted key (`--ssh-auth-timeout`); then the
    /// connection is closed.
    pub auth_timeout: Duration,
    /// Connections that may wait to authenticate at once
    /// (`--ssh-max-unauthenticated`); one more is closed when accepted.
    pub max_unauthenticated: usize,
    /// No console data either way for this long closes an authenticated
    /// connection (`--ssh-idle-timeout`); `None`: never.
    pub idle_timeout: Option<Duration>,
}

impl Default for SshLimits {
    fn default() -> SshLimits {
        SshLimits {
            auth_timeout: Duration::from_secs(30),
            max_unauthenticated: 64,
            idle_timeout: None,
        }
    }
}

/// What every SSH connection shares.
pub struct SshState {
    /// russh's settings, with the host key.
    server: Arc<russh::server::Config>,
    /// The authorized keys file, read again on SIGHUP.
    keys_path: PathBuf,
    /// The keys now; a reload swaps the whole set, so a session sees one
    /// version of the file.
    keys: RwLock<Arc<AuthorizedKeys>>,
    /// Time limits and the unauthenticated cap.
    limits: SshLimits,
    /// Connections accepted and not yet authenticated.
    unauthenticated: AtomicUsize,
    /// The console sessions open now, so that a reload can close those its
    /// new keys no longer allow.
    live: Mutex<Vec<Live>>,
    /// Numbers the entries of `live`.
    next_live: AtomicU64,
}

/// An open console session, as a reload sees it.
/// The VM a session is on: one of this node's, or one another node of
/// the cluster holds (relayed there).
enum On {
    Local(Arc<Vm>),
    Remote(Box<crate::hub::RemoteVm>),
}

impl On {
    fn name(&self) -> String {
        match self {
            On::Local(vm) => vm.name(),
            On::Remote(v) => v.record.name.clone(),
        }
    }

    fn uuid(&self) -> &str {
        match self {
            On::Local(vm) => &vm.uuid,
            On::Remote(v) => &v.record.uuid,
        }
    }
}

/// A remote VM's registry key (32 hex digits of its uuid), as a local
/// entry has it.
fn remote_key(v: &crate::hub::RemoteVm) -> String {
    crate::vmware::VmUuid::key_of(&v.record.uuid).unwrap_or_else(|| v.record.uuid.clone())
}

struct Live {
    /// Its entry in `live`.
    id: u64,
    /// The key entry it was started under.
    key: Arc<KeyEntry>,
    /// The VM it is attached to.
    vm: On,
    /// What it was granted.
    access: Access,
    /// Its number in the audit lines.
    audit: Option<u64>,
    /// Tells the session to close, and why.
    close: Arc<Closer>,
}

/// A reason to close a session, handed from a reload to its adapter.
#[derive(Default)]
struct Closer {
    reason: Mutex<Option<String>>,
    notify: tokio::sync::Notify,
}

impl Closer {
    fn close(&self, reason: String) {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
        self.notify.notify_one();
    }

    async fn closed(&self) -> String {
        self.notify.notified().await;
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_default()
    }
}

/// Removes a session from [`SshState::live`] when it ends.
struct LiveGuard {
    state: Arc<SshState>,
    id: u64,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.state.live().retain(|l| l.id != self.id);
    }
}

/// How a key's lock mode ranks against a granted access: a session whose
/// access ranks above what its key's mode now allows is closed by a reload.
fn mode_rank(mode: LockMode) -> u8 {
    match mode {
        LockMode::ReadOnly => 0,
        LockMode::FreeForAllOrReadOnly | LockMode::FreeForAll => 1,
        LockMode::Write => 2,
        LockMode::Exclusive => 3,
        LockMode::Keep(a) => access_rank(a),
    }
}

fn access_rank(access: Access) -> u8 {
    match access {
        Access::ReadOnly => 0,
        Access::FreeForAll => 1,
        Access::Write => 2,
        Access::Exclusive => 3,
    }
}

/// Why the keys `now` no longer allow a session of `key` on `vm` with
/// `access`; `None` while they do.
fn no_longer_allowed(
    now: &AuthorizedKeys,
    key: &KeyEntry,
    vm: &On,
    access: Access,
) -> Option<&'static str> {
    match now.find(&key.key) {
        None => Some("its key was removed from the authorized keys"),
        // The session is on this VM (by uuid) already: its name still
        // counts, whoever else claims it meanwhile.
        Some(e) if !e.may_see_on(vm) => Some("its key's vms= no longer covers this VM"),
        Some(e) if access_rank(access) > mode_rank(e.mode) => {
            Some("its key's mode= no longer grants this access")
        }
        Some(_) => None,
    }
}

impl SshState {
    /// Load the host key (making it if missing) and the authorized keys.
    pub fn new(
        host_key: &Path,
        authorized_keys: &Path,
        limits: SshLimits,
    ) -> Result<SshState, String> {
        // The keys first: a start that fails on them leaves no host key.
        let keys = load_authorized_keys(authorized_keys).map_err(|e| e.to_string())?;
        let key = load_or_create_host_key(host_key)?;
        let server = russh::server::Config {
            server_id: russh::SshId::Standard(
                concat!("SSH-2.0-vspc_", env!("CARGO_PKG_VERSION")).into(),
            ),
            methods: MethodSet::from(&[MethodKind::PublicKey][..]),
            // The client's opening "none" attempt is answered at once; a
            // refused key still waits the full second.
            auth_rejection_time: Duration::from_secs(1),
            auth_rejection_time_initial: Some(Duration::ZERO),
            keys: vec![key],
            // russh's own inactivity limit would also count keepalive
            // answers as activity; vspc's limits are kept per connection
            // instead ([`connection`]). A dead peer is found by keepalives
            // (3 × 30 s unanswered).
            inactivity_timeout: None,
            keepalive_interval: Some(Duration::from_secs(30)),
            keepalive_max: 3,
            nodelay: true,
            ..Default::default()
        };
        Ok(SshState {
            server: Arc::new(server),
            keys_path: authorized_keys.to_path_buf(),
            keys: RwLock::new(Arc::new(keys)),
            limits,
            unauthenticated: AtomicUsize::new(0),
            live: Mutex::new(Vec::new()),
            next_live: AtomicU64::new(0),
        })
    }

    /// The keys in force now.
    pub fn keys(&self) -> Arc<AuthorizedKeys> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Vec<Live>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Read the authorized keys file again (SIGHUP), then close the open
    /// sessions the new keys no longer allow (key removed, VM outside its
    /// `vms=`, access above its `mode=`), each with an audit line. If the
    /// file cannot be read, no key is accepted until it can: a revoked key
    /// must not stay valid because the file was being replaced. If group
    /// or others may write it, the keys loaded before stay.
    pub fn reload(&self, hub: &Hub) {
        let keys = match load_authorized_keys(&self.keys_path) {
            Ok(k) => k,
            Err(KeysError::Unsafe(e)) => {
                tracing::error!("{e}; keeping the SSH authorized keys loaded before");
                return;
            }
            Err(KeysError::Unreadable(e)) => {
                tracing::error!("{e}; no SSH key is accepted until it can be read");
                AuthorizedKeys::default()
            }
        };
        let keys = Arc::new(keys);
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys.clone();
        for l in self.live().iter() {
            if let Some(why) = no_longer_allowed(&keys, &l.key, &l.vm, l.access) {
                tracing::info!(
                    session = l.audit.unwrap_or_default(),
                    kind = "ssh",
                    vm = ?l.vm.name(),
                    uuid = %l.vm.uuid(),
                    access = %l.access.as_str(),
                    user = ?l.key.who(),
                    reason = why,
                    "audit: console session closed by a reload of the SSH keys"
                );
                hub.metrics().ssh_closed(SshClosed::Revoked);
                l.close.close(format!("closed: {why}"));
            }
        }
    }
}

/// Holds one of [`SshState::unauthenticated`]'s places until dropped.
struct UnauthSlot(Arc<SshState>);

impl Drop for UnauthSlot {
    fn drop(&mut self) {
        self.0.unauthenticated.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serve SSH on `listener` until the task is dropped: a connection past
/// `--ssh-max-unauthenticated` waiting ones is closed at once.
pub async fn serve(listener: TcpListener, hub: Arc<Hub>, state: Arc<SshState>) {
    let mut last_full: Option<std::time::Instant> = None;
    let h = hub.clone();
    crate::net::listen::accept_loop(listener, Door::Ssh, hub, move |tcp, peer| {
        let waiting = state.unauthenticated.fetch_add(1, Ordering::SeqCst);
        let slot = UnauthSlot(state.clone());
        if waiting >= state.limits.max_unauthenticated {
            // Dropping the socket closes it.
            drop((slot, tcp));
            h.metrics().ssh_closed(SshClosed::Unauthenticated);
            if last_full.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                last_full = Some(std::time::Instant::now());
                tracing::warn!(
                    %peer,
                    "SSH port: closed a connection at once: {} connections are already waiting to authenticate (--ssh-max-unauthenticated)",
                    state.limits.max_unauthenticated
                );
            }
            return;
        }
        tokio::spawn(connection(h.clone(), state.clone(), tcp, peer, slot));
    })
    .await
}

/// What a connection's task and its handler share.
struct Shared {
    /// Notified when a key is accepted.
    authenticated: tokio::sync::Notify,
    /// When the connection started: `activity` counts from here.
    since: tokio::time::Instant,
    /// Milliseconds from `since` to the last console data either way.
    activity: AtomicU64,
    /// Set when the connection is gone, for the sessions on it.
    gone: tokio::sync::watch::Sender<bool>,
}

impl Shared {
    fn touch(&self) {
        let ms = u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.activity.store(ms, Ordering::Relaxed);
    }

    fn last_activity(&self) -> tokio::time::Instant {
        self.since + Duration::from_millis(self.activity.load(Ordering::Relaxed))
    }
}

/// Tells the sessions on a connection that it is gone, however its task
/// ends.
struct Gone(Arc<Shared>);

impl Drop for Gone {
    fn drop(&mut self) {
        self.0.gone.send_replace(true);
    }
}

/// One SSH connection, from accept to close: the handshake and the login
/// within `--ssh-auth-timeout` (else the socket is shut), then, with
/// `--ssh-idle-timeout`, closed after that long without console data.
async fn connection(
    hub: Arc<Hub>,
    state: Arc<SshState>,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    slot: UnauthSlot,
) {
    use std::os::fd::AsFd;
    // A second handle on the socket, to shut it under russh's feet: russh
    // waits for a silent client without end, and handles no message
    // while a key exchange is under way.
    let killer = match tcp.as_fd().try_clone_to_owned() {
        Ok(fd) => std::net::TcpStream::from(fd),
        Err(e) => {
            tracing::warn!(%peer, "SSH connection dropped: cannot duplicate its socket: {e}");
            return;
        }
    };
    let shared = Arc::new(Shared {
        authenticated: tokio::sync::Notify::new(),
        since: tokio::time::Instant::now(),
        activity: AtomicU64::new(0),
        gone: tokio::sync::watch::Sender::new(false),
    });
    let _gone = Gone(shared.clone());
    let handler = Handler {
        hub: hub.clone(),
        state: state.clone(),
        shared: shared.clone(),
        peer,
        user: String::new(),
        key: None,
        channel: None,
        started: false,
    };
    let limits = state.limits;
    let auth_deadline = tokio::time::Instant::now() + limits.auth_timeout;
    let auth_timed_out = || {
        hub.metrics().ssh_closed(SshClosed::AuthTimeout);
        tracing::info!(
            %peer,
            "SSH connection closed: not authenticated within {} s (--ssh-auth-timeout)",
            limits.auth_timeout.as_secs_f64()
        );
        let _ = killer.shutdown(std::net::Shutdown::Both);
    };
    // russh reads the client's version line before it returns the session.
    let running = tokio::select! {
        r = russh::server::run_stream(state.server.clone(), tcp, handler) => match r {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%peer, "SSH handshake failed: {e}");
                return;
            }
        },
        () = tokio::time::sleep_until(auth_deadline) => return auth_timed_out(),
    };
    let handle = running.handle();
    tokio::pin!(running);
    let ended = |r: Result<(), russh::Error>| {
        if let Err(e) = r {
            tracing::debug!(%peer, "SSH connection ended: {e}");
        }
    };
    tokio::select! {
        r = &mut running => return ended(r),
        () = shared.authenticated.notified() => {}
        () = tokio::time::sleep_until(auth_deadline) => {
            auth_timed_out();
            let _ = tokio::time::timeout(CLOSE_GRACE, running).await;
            return;
        }
    }
    drop(slot);
    shared.touch();
    let Some(idle) = limits.idle_timeout else {
        return ended(running.await);
    };
    loop {
        let due = shared.last_activity() + idle;
        tokio::select! {
            r = &mut running => return ended(r),
            () = tokio::time::sleep_until(due) => {
                if shared.last_activity() + idle > tokio::time::Instant::now() {
                    continue;
                }
                hub.metrics().ssh_closed(SshClosed::Idle);
                tracing::info!(
                    %peer,
                    "SSH connection closed: no console data for {} s (--ssh-idle-timeout)",
                    idle.as_secs_f64()
                );
                let msg = format!("idle for {} s", idle.as_secs_f64());
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    handle.disconnect(russh::Disconnect::ByApplication, msg, String::new()),
                )
                .await;
                if tokio::time::timeout(Duration::from_secs(1), &mut running).await.is_err() {
                    let _ = killer.shutdown(std::net::Shutdown::Both);
                    let _ = tokio::time::timeout(CLOSE_GRACE, running).await;
                }
                return;
            }
        }
    }
}

/// One SSH connection's state, as russh calls it.
struct Handler {
    /// The VMs, to list and to join.
    hub: Arc<Hub>,
    /// The keys in force, looked up again at every channel and session
    /// start, so that a reload applies to connections already open.
    state: Arc<SshState>,
    /// Shared with the connection's task: login, activity, end.
    shared: Arc<Shared>,
    /// Where the client connects from (for the logs and the audit).
    peer: SocketAddr,
    /// The user name the key logged in as: a VM, or [`LIST_USER`].
    user: String,
    /// The key that logged in, as the authorized keys had it last.
    key: Option<Arc<KeyEntry>>,
    /// The session channel, until a shell request starts it.
    channel: Option<Channel<Msg>>,
    /// One session per connection: set when it starts.
    started: bool,
}

impl Handler {
    /// The logged-in key's entry in the authorized keys now (a reload may
    /// have removed or changed it); logs a refusal when it is gone.
    fn current_key(&mut self, what: &str) -> Option<Arc<KeyEntry>> {
        let old = self.key.as_ref()?;
        match self.state.keys().find(&old.key) {
            Some(now) => {
                self.key = Some(now.clone());
                Some(now)
            }
            None => {
                tracing::info!(
                    peer = %self.peer,
                    user = %self.user,
                    key = %old.fingerprint,
                    "SSH {what} refused: the key is no longer in the authorized keys"
                );
                None
            }
        }
    }

    /// Start the session on the channel (shell request).
    fn start(&mut self) {
        let Some(channel) = self.channel.take() else {
            return;
        };
        self.started = true;
        let Some(key) = self.current_key("session") else {
            tokio::spawn(refuse(
                channel,
                "vspc: this key is no longer authorized\r\n".into(),
            ));
            return;
        };
        let hub = self.hub.clone();
        let state = self.state.clone();
        let shared = self.shared.clone();
        let user = self.user.clone();
        let peer = self.peer;
        tokio::spawn(async move {
            if user == LIST_USER {
                list(&hub, &key, channel).await;
            } else {
                console(hub, state, shared, key, &user, peer, channel).await;
            }
        });
    }
}

impl russh::server::Handler for Handler {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        if self.state.keys().find(offer.public_key).is_some() {
            return Ok(Auth::Accept);
        }
        tracing::info!(
            peer = %self.peer,
            user,
            fingerprint = %offer.public_key.fingerprint(HashAlg::Sha256),
            "SSH key refused: not in the authorized keys"
        );
        Ok(Auth::reject())
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        match self.state.keys().find(key.public_key) {
            Some(entry) => {
                tracing::debug!(peer = %self.peer, user, key = %entry.fingerprint, "SSH key accepted");
                self.user = user.to_string();
                self.key = Some(entry);
                self.shared.authenticated.notify_one();
                Ok(Auth::Accept)
            }
            None => {
                tracing::info!(
                    peer = %self.peer,
                    user,
                    fingerprint = %key.public_key.fingerprint(HashAlg::Sha256),
                    "SSH key refused: not in the authorized keys"
                );
                Ok(Auth::reject())
            }
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.started || self.channel.is_some() || self.current_key("channel").is_none() {
            reply
                .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        self.channel = Some(channel);
        reply.accept().await;
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Accepted so that the client puts its terminal in raw mode; the
        // size means nothing to a serial line.
        session.channel_success(channel)
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        _value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)?;
        self.start();
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)?;
        if let Some(ch) = self.channel.take() {
            self.started = true;
            tokio::spawn(refuse(
                ch,
                "vspc: commands are not run here; use ssh VM@host for a console or list@host for the list\r\n".into(),
            ));
        }
        Ok(())
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)
    }
}

/// Say `msg` on the client's stderr, exit status 1, close.
async fn refuse(channel: Channel<Msg>, msg: String) {
    let _ = channel.extended_data_bytes(1, Bytes::from(msg)).await;
    let _ = channel.exit_status(1).await;
    let _ = channel.eof().await;
    let _ = channel.close().await;
}

/// `list@`: the VMs the key may see, `name:uuid:port` per line.
async fn list(hub: &Hub, key: &KeyEntry, channel: Channel<Msg>) {
    let mut out = String::new();
    let vms = hub.vms();
    let mut names: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for vm in &vms {
        *names.entry(vm.name()).or_default() += 1;
    }
    let remote = hub.cluster().map(|c| c.remote_vms()).unwrap_or_default();
    for v in &remote {
        *names.entry(v.record.name.clone()).or_default() += 1;
    }
    for vm in vms {
        let name = vm.name();
        if key.may_see(&vm, names.get(&name) == Some(&1)) {
            let port = vm.port.map_or(String::new(), |p| p.to_string());
            out.push_str(&format!("{name}:{}:{port}\n", vm.uuid));
        }
    }
    // The cluster's other VMs, which `ssh VM@` here reaches too.
    for v in &remote {
        let r = &v.record;
        if key.may_see_ids(
            &r.name,
            &r.uuid,
            &remote_key(v),
            names.get(&r.name) == Some(&1),
        ) {
            let port = r.port.map_or(String::new(), |p| p.to_string());
            out.push_str(&format!("{}:{}:{port}\n", r.name, r.uuid));
        }
    }
    let _ = channel.data_bytes(Bytes::from(out)).await;
    let _ = channel.exit_status(0).await;
    let _ = channel.eof().await;
    let _ = channel.close().await;
}

/// `VM@`: join the console under the key's mode and serve it until either
/// side ends, the connection goes, or a reload takes the key's access.
async fn console(
    hub: Arc<Hub>,
    state: Arc<SshState>,
    shared: Arc<Shared>,
    key: Arc<KeyEntry>,
    what: &str,
    peer: SocketAddr,
    channel: Channel<Msg>,
) {
    // An unknown VM and one the key may not see get the same answer, so a
    // key learns nothing about VMs outside its patterns.
    let found = match hub.lookup(what) {
        Ok(vm) => {
            let unique = hub.lookup(&vm.name()).is_ok();
            Some(vm).filter(|vm| key.may_see(vm, unique))
        }
        Err(crate::hub::Lookup::Ambiguous(uuids)) => {
            // Name the uuids this key may use, and only those.
            let visible: Vec<String> = uuids
                .into_iter()
                .filter(|u| hub.find(u).is_some_and(|vm| key.may_see(&vm, false)))
                .collect();
            if !visible.is_empty() {
                tracing::info!(%peer, vm = ?what, key = %key.fingerprint, "SSH console refused: the name is ambiguous");
                let msg = format!(
                    "vspc: more than one VM is named {what:?}; ask for one by its uuid: {}\r\n",
                    visible.join(", ")
                );
                return refuse(channel, msg).await;
            }
            None
        }
        Err(crate::hub::Lookup::NotFound) => None,
    };
    let none_here =
        found.is_none() && matches!(hub.lookup(what), Err(crate::hub::Lookup::NotFound));
    if none_here {
        if let Some(v) = remote_for_key(&hub, &key, what) {
            return remote_console(hub, state, shared, key, v, peer, channel).await;
        }
    }
    let Some(vm) = found else {
        tracing::info!(%peer, vm = ?what, key = %key.fingerprint, "SSH console refused: no such VM for this key");
        let msg = format!("vspc: no VM named {what:?} for this key (ssh list@host shows them)\r\n");
        return refuse(channel, msg).await;
    };
    let request = Request {
        vm: Find::Vm(vm.clone()),
        mode: key.mode,
        protocol: ConsoleProtocol::Raw,
        history: History::Inline,
        door: crate::audit::Kind::Ssh,
        peer: Some(peer),
        user: Some(key.who()),
    };
    let mut session = match open::open(&hub, request).await {
        Ok(opened) => opened.session,
        Err(e) => {
            tracing::info!(%peer, vm = ?vm.name(), "SSH console refused: {e}");
            return refuse(channel, format!("vspc: {e}\r\n")).await;
        }
    };
    let access = session.access();
    let (closer, _live) = go_live(
        &state,
        &key,
        On::Local(vm.clone()),
        access,
        session.audit_id(),
        &channel,
    )
    .await;
    // The client going (or typing ~.), the connection closing, or a reload
    // closing the session ends the adapter; a console that ends first
    // (cleared, stalled) gives it a moment to pass on the last bytes.
    serve_console_over_pipe(&mut session, |pipe| pump(channel, pipe, &shared, &closer)).await;
}

/// The VM another node of the cluster holds that `what` names (uuid, or
/// a name no other VM has), if this key may see it.
fn remote_for_key(hub: &Hub, key: &KeyEntry, what: &str) -> Option<crate::hub::RemoteVm> {
    let v = crate::hub::find_remote(hub.cluster()?.remote_vms(), what).ok()?;
    // Found by a name only if no other VM of the cluster has it.
    key.may_see_ids(&v.record.name, &v.record.uuid, &remote_key(&v), true)
        .then_some(v)
}

/// Register a session that starts (so that a reload can close it), check
/// the keys as they are now (a reload between the key's look-up and here),
/// and tell a read-only session so on stderr. The guard unregisters it.
async fn go_live(
    state: &Arc<SshState>,
    key: &Arc<KeyEntry>,
    on: On,
    access: Access,
    audit: Option<u64>,
    channel: &Channel<Msg>,
) -> (Arc<Closer>, LiveGuard) {
    let closer = Arc::new(Closer::default());
    let id = state.next_live.fetch_add(1, Ordering::Relaxed);
    {
        let mut all = state.live();
        if let Some(why) = no_longer_allowed(&state.keys(), key, &on, access) {
            closer.close(format!("closed: {why}"));
        }
        all.push(Live {
            id,
            key: key.clone(),
            vm: on,
            access,
            audit,
            close: closer.clone(),
        });
    }
    let guard = LiveGuard {
        state: state.clone(),
        id,
    };
    if access == Access::ReadOnly {
        let _ = channel
            .extended_data_bytes(
                1,
                Bytes::from_static(
                    b"vspc: this console is read-only; what you type is discarded.\r\n",
                ),
            )
            .await;
    }
    (closer, guard)
}

/// `VM@` for a VM another node holds: the console is opened there under
/// the key's mode and relayed; revocation by a reload works as for a local
/// VM.
async fn remote_console(
    hub: Arc<Hub>,
    state: Arc<SshState>,
    shared: Arc<Shared>,
    key: Arc<KeyEntry>,
    v: crate::hub::RemoteVm,
    peer: SocketAddr,
    channel: Channel<Msg>,
) {
    let Some(cluster) = hub.cluster() else { return };
    let spec = crate::hub::RemoteSpec {
        mode: key.mode,
        protocol: ConsoleProtocol::Raw,
        history: true,
        door: crate::audit::Kind::Ssh.as_str(),
        client: Some(peer),
        user: Some(key.who()),
    };
    let opened = match cluster.open_remote(&v.record.uuid, spec).await {
        Ok(o) => o,
        Err(e) => {
            tracing::info!(%peer, vm = ?v.record.name, node = %v.node, "SSH console of another node's VM refused: {e:?}");
            let why = match e {
                crate::hub::RemoteError::Refused(r) => r,
                _ => format!("no VM named {:?} for this key", v.record.name),
            };
            return refuse(channel, format!("vspc: {why}\r\n")).await;
        }
    };
    let access = opened.access;
    let on = On::Remote(Box::new(opened.vm.clone()));
    let (closer, _live) = go_live(&state, &key, on, access, None, &channel).await;
    tracing::info!(%peer, vm = ?v.record.name, node = %v.node, access = access.as_str(), "SSH console of another node's VM");
    pump(channel, opened.pipe, &shared, &closer).await;
}

/// OpenSSH's escape, done on the server: `~.` at the start of a line ends
/// the session, `~~` sends one `~`, `~` followed by anything else sends
/// both.
#[derive(Debug, Default)]
pub struct Escape {
    /// The last byte did not end a line (false before anything is typed:
    /// the session starts at a line's start).
    mid_line: bool,
    /// A `~` at the start of a line is held, waiting for the next byte.
    tilde: bool,
}

impl Escape {
    /// Pass `data` through; `Err(before)` when `~.` was typed, with the
    /// bytes before it.
    pub fn filter(&mut self, data: &[u8]) -> Result<Vec<u8>, Vec<u8>> {
        let mut out = Vec::with_capacity(data.len() + 1);
        for &b in data {
            if self.tilde {
                self.tilde = false;
                match b {
                    b'.' => return Err(out),
                    b'~' => {
                        out.push(b'~');
                        self.mid_line = true;
                        continue;
                    }
                    _ => out.push(b'~'),
                }
            } else if b == b'~' && !self.mid_line {
                self.tilde = true;
                continue;
            }
            out.push(b);
            self.mid_line = !(b == b'\r' || b == b'\n');
        }
        Ok(out)
    }
}

/// How the adapter's loop ended.
enum End {
    /// The console side closed the pipe: its last bytes go out.
    Console,
    /// The client closed the channel, or the connection is gone.
    Client,
    /// `~.` was typed.
    Escaped,
    /// A reload closed the session; the reason, for the client.
    Closed(String),
}

/// The adapter: bytes from the pipe (the console's output) go out on the
/// channel, as fast as its window lets them; data from the client goes
/// into the pipe (through [`Escape`]). The client is not read while the
/// pipe takes no more input. Dropping the pipe's end tells the driver the
/// console is gone. The channel's close, the connection's end and a
/// reload's [`Closer`] end it at once, whatever the client sent before
/// (an EOF is not the end: output still flows).
async fn pump(channel: Channel<Msg>, pipe: DuplexStream, shared: &Shared, closer: &Closer) {
    let (mut from_client, to_client) = channel.split();
    let mut writer = to_client.make_writer();
    let (mut from_console, mut to_console) = tokio::io::split(pipe);
    let mut gone = shared.gone.subscribe();
    let mut buf = vec![0u8; PIPE_BYTES];
    let mut input = Bytes::new();
    let mut escape = Escape::default();
    // Output taken from the console, not yet on the channel. Written in
    // the loop (not awaited whole), so that the client's input is still
    // read while its window is shut: otherwise a paste during a burst
    // could fill russh's queue for this channel and stall the connection.
    // A write the window holds back is retried with the same bytes first,
    // as russh's writer expects.
    let mut output = Bytes::new();
    let end = loop {
        tokio::select! {
            got = from_console.read(&mut buf), if output.is_empty() => match got {
                Ok(0) | Err(_) => break End::Console,
                Ok(n) => output = Bytes::copy_from_slice(&buf[..n]),
            },
            sent = writer.write(&output), if !output.is_empty() => match sent {
                Ok(n) if n > 0 => {
                    output.advance(n);
                    shared.touch();
                }
                _ => break End::Client,
            },
            put = to_console.write(&input), if !input.is_empty() => match put {
                Ok(n) if n > 0 => input.advance(n),
                _ => break End::Console,
            },
            // Read after the client's EOF too (`ssh VM@host </dev/null`
            // watches a console): the channel's close must still be seen.
            msg = from_client.wait(), if input.is_empty() => match msg {
                Some(ChannelMsg::Data { data }) => {
                    shared.touch();
                    match escape.filter(&data) {
                        Ok(bytes) => input = Bytes::from(bytes),
                        Err(before) => {
                            let _ = to_console.write_all(&before).await;
                            break End::Escaped;
                        }
                    }
                }
                Some(ChannelMsg::Close) | None => break End::Client,
                Some(_) => {}
            },
            // (The guard `wait_for` returns is not held across an await.)
            _ = async { gone.wait_for(|g| *g).await.is_ok() } => break End::Client,
            reason = closer.closed() => break End::Closed(reason),
        }
    };
    match &end {
        End::Escaped => {
            let _ = to_client
                .extended_data_bytes(1, Bytes::from_static(b"\r\nvspc: closed (~.)\r\n"))
                .await;
        }
        End::Closed(reason) => {
            let msg = format!("\r\nvspc: {reason}\r\n");
            let _ = to_client.extended_data_bytes(1, Bytes::from(msg)).await;
        }
        End::Console => {
            if !output.is_empty() {
                let _ = writer.write_all(&output).await;
            }
        }
        End::Client => {}
    }
    let _ = writer.flush().await;
    match end {
        End::Console | End::Escaped => {
            let _ = to_client.exit_status(0).await;
        }
        End::Closed(_) => {
            let _ = to_client.exit_status(1).await;
        }
        End::Client => {}
    }
    let _ = to_client.eof().await;
    let _ = to_client.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICn/tGpRDUntUDULlimghiOKF5HzrA3kHHQa43nYHVwx";

    #[test]
    fn globs() {
        assert!(glob("web-*", "web-1"));
        assert!(glob("*", ""));
        assert!(glob("w?b-*1", "web-xx1"));
        assert!(!glob("web-*", "db-1"));
        assert!(glob("db-1", "db-1"));
        assert!(!glob("db-1", "db-10"));
        assert!(glob("*-1*", "a-b-1c"));
    }

    #[test]
    fn authorized_keys_lines() {
        let text = format!(
            "# comment\n\n{KEY} alice@example\n\
             vms=\"web-*,db-1\",mode=\"read-only\" {KEY} bob\n\
             mode=\"sideways\" {KEY} carol\n\
             from=\"10.0.0.0/8\" {KEY} dave\n\
             vms=\"x {KEY}\n\
             ssh-ed25519 AAAAnot-base64 eve\n\
             restrict,no-pty,mode=\"exclusive\" {KEY}\n"
        );
        let (keys, errors) = parse_authorized_keys(&text);
        assert_eq!(keys.entries.len(), 3, "{errors:?}");
        let lines: Vec<usize> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, [5, 6, 7, 8]);
        let a = &keys.entries[0];
        assert_eq!(a.comment, "alice@example");
        assert!(a.vms.is_none());
        assert_eq!(a.mode, LockMode::FreeForAllOrReadOnly);
        assert!(a.fingerprint.starts_with("SHA256:"));
        let b = &keys.entries[1];
        assert_eq!(
            b.vms.as_deref(),
            Some(&["web-*".to_string(), "db-1".to_string()][..])
        );
        assert_eq!(b.mode, LockMode::ReadOnly);
        assert_eq!(keys.entries[2].mode, LockMode::Exclusive);
    }

    #[test]
    fn escape_at_line_start_only() {
        let mut e = Escape::default();
        assert_eq!(e.filter(b"a~.b\n"), Ok(b"a~.b\n".to_vec()));
        assert_eq!(e.filter(b"~~x\r"), Ok(b"~x\r".to_vec()));
        assert_eq!(e.filter(b"~"), Ok(vec![]));
        assert_eq!(e.filter(b"q"), Ok(b"~q".to_vec()));
        let mut e = Escape::default();
        assert_eq!(e.filter(b"~"), Ok(vec![]));
        assert_eq!(e.filter(b"."), Err(vec![]));
        let mut e = Escape::default();
        assert_eq!(e.filter(b"ls\n~."), Err(b"ls\n".to_vec()));
    }

    #[test]
    fn writable_key_files_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys");
        std::fs::write(&path, format!("{KEY} a\n")).expect("write");
        let set = |mode| {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod")
        };
        set(0o644);
        assert_eq!(load_authorized_keys(&path).expect("0644").entries.len(), 1);
        set(0o664);
        match load_authorized_keys(&path) {
            Err(KeysError::Unsafe(e)) => {
                assert!(e.contains(&path.display().to_string()), "{e}");
                assert!(e.contains("writable by group (mode 0664)"), "{e}");
            }
            other => panic!("a group-writable file was taken: {other:?}"),
        }
        assert!(matches!(
            load_authorized_keys(&dir.path().join("none")),
            Err(KeysError::Unreadable(_))
        ));
        let host = dir.path().join("host");
        load_or_create_host_key(&host).expect("made");
        std::fs::set_permissions(&host, std::fs::Permissions::from_mode(0o606)).expect("chmod");
        let Err(e) = load_or_create_host_key(&host) else {
            panic!("a world-writable host key was taken");
        };
        assert!(e.contains("writable by others"), "{e}");
    }

    #[test]
    fn access_above_the_mode_is_no_longer_allowed() {
        assert!(access_rank(Access::Write) > mode_rank(LockMode::ReadOnly));
        assert!(access_rank(Access::Exclusive) > mode_rank(LockMode::Write));
        assert!(access_rank(Access::FreeForAll) <= mode_rank(LockMode::FreeForAllOrReadOnly));
        assert!(access_rank(Access::ReadOnly) <= mode_rank(LockMode::ReadOnly));
        assert!(access_rank(Access::Write) <= mode_rank(LockMode::Exclusive));
    }

    #[test]
    fn host_key_is_made_once_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/key");
        let a = load_or_create_host_key(&path).expect("made");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = load_or_create_host_key(&path).expect("read back");
        assert_eq!(a.public_key().key_data(), b.public_key().key_data());
        std::fs::write(&path, "garbage").expect("write");
        let Err(e) = load_or_create_host_key(&path) else {
            panic!("a garbage host key was taken");
        };
        assert!(e.contains(&path.display().to_string()), "{e}");
    }
}
