//! Command-line configuration: vSPC.py's server flags with the same names
//! and defaults, plus vspc's own. Environment variables vSPC.py read
//! (`SUPPORT_MULTI_CONSOLE`, `VM_CLIENT_LIMIT`) are honoured too; a flag
//! wins over its variable.
//!
//! `--config FILE` reads the same settings from TOML, one key per long flag
//! (`proxy-port = 13370`, `ssl = true`); flags on the command line win over
//! the file.

use crate::argv::{OptKey, OptToken, OptValue};
use clap::Parser;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// vspc: a virtual Serial Port Concentrator for VMware ESXi.
///
/// ESXi hosts connect each VM's network serial port to the proxy port; every
/// VM gets its own console port where any number of telnet users attach.
#[derive(Debug, Clone, Parser)]
#[command(name = "vspc", version, about, long_about = None, args_override_self = true)]
pub struct Config {
    /// Read settings from this TOML file (keys are the long flag names);
    /// command-line flags win over it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Check the configuration and exit: the TOML FILE (or --config's) and
    /// the flags, naming every problem (unknown keys, bad values, unreadable
    /// certificates and key files, backend options, the File backend's
    /// map); exit status 1 if there is one. Nothing is written.
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "")]
    pub check_config: Option<PathBuf>,

    /// Port for admin queries (vSPC.py's query protocol).
    #[arg(short = 'a', long, default_value_t = 13371, value_name = "PORT")]
    pub admin_port: u16,

    /// Address the admin port listens on. The admin port attaches consoles
    /// and clears them without authentication: an address that is not
    /// loopback needs --admin-allow.
    #[arg(long, default_value = "127.0.0.1", value_name = "ADDR")]
    pub admin_iface: IpAddr,

    /// Accept admin connections only from these networks (CIDR, repeatable
    /// and comma-separated); required when --admin-iface is not a loopback
    /// address (0.0.0.0/0 allows anyone, as vSPC.py did).
    #[arg(long, value_name = "CIDR", value_delimiter = ',', action = clap::ArgAction::Append, value_parser = parse_cidr)]
    pub admin_allow: Vec<crate::cidr::Cidr>,

    /// Port ESXi hosts connect to (the vSPC URI's port).
    #[arg(long, default_value_t = 13370, value_name = "PORT")]
    pub proxy_port: u16,

    /// Address the proxy port listens on (`::` for IPv6).
    #[arg(long, default_value = "0.0.0.0", value_name = "ADDR")]
    pub proxy_iface: IpAddr,

    /// Accept VM connections on the proxy port only from these networks
    /// (the ESXi hosts'), in CIDR notation (10.0.0.0/8, 2001:db8::/32, or
    /// one address); repeatable and comma-separated. Anyone when not given.
    #[arg(long, value_name = "CIDR", value_delimiter = ',', action = clap::ArgAction::Append, value_parser = parse_cidr)]
    pub proxy_allow: Vec<crate::cidr::Cidr>,

    /// First console port; each VM gets the lowest free port from here.
    #[arg(short = 'r', long, default_value_t = 50000, value_name = "PORT")]
    pub port_range_start: u16,

    /// Address the per-VM console ports listen on.
    #[arg(short = 'i', long, default_value = "127.0.0.1", value_name = "ADDR")]
    pub interface: IpAddr,

    /// Seconds a VM keeps its port after its last VM or console connection
    /// closed.
    #[arg(long, default_value_t = 86400, value_name = "SECONDS")]
    pub vm_expire_time: u64,

    /// Backend(s): built-in Memory (default), File or Logging, or a plugin's
    /// name or path. Repeat the flag or separate names with commas to use
    /// several at once. Backend options (e.g. Logging's -l DIR) go anywhere
    /// on the command line.
    #[arg(long, value_name = "NAME", value_delimiter = ',', action = clap::ArgAction::Append)]
    pub backend: Vec<String>,

    /// Options for the backend(s), as one string (vSPC.py's --backend-args).
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    pub backend_args: Option<String>,

    /// Print the options of the --backend(s) given, or list the built-in
    /// backends and the plugins found, then exit.
    #[arg(long)]
    pub backend_help: bool,

    /// Look for backend plugins (libvspc_backend_NAME.so) here; repeatable.
    /// VSPC_PLUGIN_PATH (colon-separated) is searched next.
    #[arg(long, value_name = "DIR", action = clap::ArgAction::Append)]
    pub plugin_dir: Vec<PathBuf>,

    /// Command-line arguments that are not vspc's own: the backends' options.
    #[arg(skip)]
    pub backend_options: Vec<String>,

    /// Persist the port map in this file or directory (the File backend).
    #[arg(short = 'f', long, value_name = "PATH")]
    pub persist_file: Option<PathBuf>,

    /// Speak TLS on the proxy port (telnets:// URIs).
    #[arg(long)]
    pub ssl: bool,

    /// PEM certificate chain for --ssl.
    #[arg(long, value_name = "FILE")]
    pub cert: Option<PathBuf>,

    /// PEM private key for --ssl (default: read it from --cert).
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,

    /// Write the process id to this file.
    #[arg(long, value_name = "FILE")]
    pub pidfile: Option<PathBuf>,

    /// Open no per-VM console ports (consoles only through the admin port).
    #[arg(long)]
    pub no_vm_ports: bool,

    /// Debug logging.
    #[arg(short = 'd', long)]
    pub debug: bool,

    /// Log to standard output instead of standard error.
    #[arg(long)]
    pub stdout: bool,

    /// Stay in the foreground (the default; accepted for vSPC.py scripts).
    #[arg(long)]
    pub no_fork: bool,

    /// Log to syslog (/dev/log) with name and PID.
    #[arg(long)]
    pub syslog: bool,

    /// Detach into the background (use with --pidfile in init scripts).
    #[arg(long, conflicts_with = "no_fork")]
    pub daemon: bool,

    /// One console port per VM serial port: name and uuid get `_` + the
    /// port's service URI (or set SUPPORT_MULTI_CONSOLE=true).
    #[arg(long)]
    pub multi_console: bool,

    /// Most consoles per VM; the next one is told the VM is full
    /// (or set VM_CLIENT_LIMIT=N).
    #[arg(long, value_name = "N")]
    pub client_limit: Option<usize>,

    /// Pace console input to each VM at this many bytes per second (ESXi
    /// drops bytes written faster than the virtual UART drains).
    #[arg(long, value_name = "BYTES_PER_S", value_parser = clap::value_parser!(u64).range(1..))]
    pub vm_tx_rate: Option<u64>,

    /// Seconds a new VM connection has to enable the VMware extension (and
    /// a TLS client to finish its handshake).
    #[arg(long, default_value = "5", value_name = "SECONDS", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// Seconds a VM connection may stay unidentified (no DO-PROXY with a
    /// uuid, no valid VMOTION-PEER) before it is closed.
    #[arg(long, default_value = "60", value_name = "SECONDS", value_parser = parse_duration)]
    pub identify_timeout: Duration,

    /// Most VM connections that may be open and not yet identified at once;
    /// past this, new ones are closed at accept (and counted).
    #[arg(long, default_value_t = 1024, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_unidentified: u32,

    /// Seconds a vMotion may stay pending before it is dropped.
    #[arg(long, default_value = "300", value_name = "SECONDS", value_parser = parse_duration)]
    pub vmotion_timeout: Duration,

    /// Bytes of output that may wait for one console. A console that falls
    /// further behind stays connected: it skips the oldest output and is
    /// told, on a line of its own, how many bytes it missed.
    #[arg(long, default_value_t = 1 << 20, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(4096..=(1u64 << 32)))]
    pub console_queue: u64,

    /// Seconds a console that is behind has to take at least 1 KiB/s on
    /// average while output waits for it (or to catch up); then it is told
    /// why (if it can still take that) and disconnected. 0 never
    /// disconnects.
    #[arg(long, default_value = "30", value_name = "SECONDS", value_parser = parse_duration_or_zero)]
    pub console_stall_timeout: Duration,

    /// How console-port clients are served: `auto` tells telnet clients and
    /// raw ones (gdb, socat, scripts) apart by the first byte they send;
    /// `telnet` and `raw` force one.
    #[arg(long, value_enum, default_value = "auto", value_name = "MODE")]
    pub console_protocol: crate::hub::ConsoleProtocol,

    /// Bytes of each VM's most recent output kept in memory and shown, then
    /// a `-- live --` line, to a browser console, an SSH session or an
    /// admin session when it opens (so a panic printed before anyone came
    /// is seen); 0 keeps none.
    #[arg(long, default_value_t = 16384, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(0..=(64u64 << 20)))]
    pub replay_bytes: u64,

    /// Show that recent output to telnet clients on the console ports too
    /// (raw clients, such as gdb and scripts, never get it).
    #[arg(long)]
    pub console_replay: bool,

    /// Bytes of console output that may wait for one backend. A backend
    /// that needs every byte (Logging) makes the VMs that write wait past
    /// this; any other backend has output dropped for it.
    #[arg(long, default_value_t = 32 << 20, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(65536..=(1u64 << 40)))]
    pub backend_queue: u64,

    /// Port of the HTTP API and /metrics [default: 13372]. The default port
    /// is best effort (taken: a warning, no HTTP); a port given here must
    /// be free.
    #[arg(long, value_name = "PORT")]
    pub http_port: Option<u16>,

    /// Address the HTTP port listens on; anything but loopback needs
    /// --http-token-file.
    #[arg(long, default_value = "127.0.0.1", value_name = "ADDR")]
    pub http_iface: IpAddr,

    /// Open no HTTP port (no API, no /metrics).
    #[arg(long)]
    pub no_http: bool,

    /// Bearer tokens for the HTTP port, one per line: TOKEN, `TOKEN rw` or
    /// `TOKEN ro` (read-only); `#` starts a comment.
    #[arg(long, value_name = "FILE")]
    pub http_token_file: Option<PathBuf>,

    /// PEM certificate chain: serve the HTTP port over TLS.
    #[arg(long, value_name = "FILE")]
    pub http_cert: Option<PathBuf>,

    /// PEM private key for --http-cert (default: read it from --http-cert).
    #[arg(long, value_name = "FILE", requires = "http_cert")]
    pub http_key: Option<PathBuf>,

    /// A name this server is reached by over HTTP (repeatable,
    /// comma-separated). Requests are answered only when their Host is an
    /// IP address, `localhost` or one of these names; any other Host gets
    /// 421 (a defence against DNS rebinding).
    #[arg(long, value_name = "NAME", value_delimiter = ',', action = clap::ArgAction::Append, value_parser = parse_host_name)]
    pub http_host: Vec<String>,

    /// Seconds an HTTP client has to send a request's header (the first
    /// one, and each next one on a kept-alive connection); then the
    /// connection is closed.
    #[arg(long, default_value = "10", value_name = "SECONDS", value_parser = parse_duration)]
    pub http_header_timeout: Duration,

    /// Most HTTP connections open at once (browser consoles included);
    /// past it a new connection is closed at once, and counted.
    #[arg(long, default_value_t = 1024, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub http_max_connections: u32,

    /// Port of the SSH front door (`ssh -p PORT VM@host`); off unless
    /// given.
    #[arg(long, value_name = "PORT")]
    pub ssh_port: Option<u16>,

    /// Address the SSH port listens on.
    #[arg(long, default_value = "0.0.0.0", value_name = "ADDR")]
    pub ssh_iface: IpAddr,

    /// The SSH host key (OpenSSH format); an ed25519 key is made there,
    /// mode 0600, if the file does not exist.
    #[arg(
        long,
        default_value = "/var/lib/vspc/ssh_host_ed25519_key",
        value_name = "FILE"
    )]
    pub ssh_host_key: PathBuf,

    /// Public keys allowed in over SSH, in OpenSSH's authorized_keys
    /// format with vspc's options vms="GLOBS" and mode="MODE"; read again
    /// on SIGHUP. Needed with --ssh-port.
    #[arg(long, value_name = "FILE")]
    pub ssh_authorized_keys: Option<PathBuf>,

    /// Seconds an SSH connection may take to authenticate (from accept to
    /// an accepted key); then it is closed.
    #[arg(long, default_value = "30", value_name = "SECONDS", value_parser = parse_duration)]
    pub ssh_auth_timeout: Duration,

    /// SSH connections that may be waiting to authenticate at once; one
    /// more is closed as soon as it is accepted.
    #[arg(long, default_value_t = 64, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub ssh_max_unauthenticated: u32,

    /// Seconds an SSH connection may pass no console data either way
    /// before it is closed. 0 never closes it.
    #[arg(long, default_value = "0", value_name = "SECONDS", value_parser = parse_duration_or_zero)]
    pub ssh_idle_timeout: Duration,

    /// Cluster mode: the Redis control plane every node of the cluster
    /// shares, redis://[:PASSWORD@]HOST:PORT[/DB] or rediss://... Without
    /// it vspc is a single node.
    #[arg(long, value_name = "URL")]
    pub cluster: Option<String>,

    /// This node's name in the cluster, unique among its live nodes
    /// (default: the host name).
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,

    /// Port the node link listens on (other nodes relay consoles to it).
    #[arg(long, default_value_t = 13373, value_name = "PORT")]
    pub cluster_port: u16,

    /// Address the node link listens on (default: --proxy-iface).
    #[arg(long, value_name = "ADDR")]
    pub cluster_iface: Option<IpAddr>,

    /// HOST:PORT other nodes dial to reach this one (default:
    /// --cluster-iface:--cluster-port; required when that is a wildcard).
    #[arg(long, value_name = "HOST:PORT")]
    pub cluster_advertise: Option<String>,

    /// The secret every node of the cluster shares (mode 0600 or stricter);
    /// required with --cluster.
    #[arg(long, value_name = "FILE")]
    pub cluster_secret_file: Option<PathBuf>,

    /// The cluster's name: the namespace of its keys in Redis (several
    /// clusters may share one Redis).
    #[arg(long, default_value = "vspc", value_name = "NAME")]
    pub cluster_name: String,
}

/// Separate vspc's own flags (and their values) from everything else, which
/// belongs to the backends. vspc's flags are read off the clap definition,
/// so the two can never disagree.
fn split_backend_options(args: Vec<std::ffi::OsString>) -> (Vec<std::ffi::OsString>, Vec<String>) {
    let cmd = <Config as clap::CommandFactory>::command();
    // (long, short, takes a value) of every flag, clap's own included.
    let mut flags: Vec<(Option<String>, Option<char>, bool)> = vec![
        (Some("help".into()), Some('h'), false),
        (Some("version".into()), Some('V'), false),
    ];
    for a in cmd.get_arguments() {
        let long = a.get_long().map(String::from);
        flags.push((long, a.get_short(), a.get_action().takes_values()));
    }
    let takes_value = |key: &OptKey| {
        flags
            .iter()
            .find(|(l, s, _)| key.is(l.as_deref(), *s))
            .map(|(_, _, takes)| *takes)
    };
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    let mut it = args.into_iter();
    if let Some(prog) = it.next() {
        ours.push(prog);
    }
    while let Some(arg) = it.next() {
        let Some(text) = arg.to_str().map(str::to_string) else {
            ours.push(arg);
            continue;
        };
        let Some((opt, takes)) =
            OptToken::parse(&text).and_then(|o| takes_value(&o.key).map(|t| (o, t)))
        else {
            theirs.push(text);
            continue;
        };
        ours.push(arg);
        if !takes {
            continue;
        }
        // A missing value is left for clap to report.
        if let OptValue::Next(v) = opt.value(&mut it) {
            ours.push(v);
        }
    }
    (ours, theirs)
}

pub use vspc_codec::words::{shell_quote, shell_words};

/// Turn a TOML config file into flags: `key = value` becomes `--key=value`,
/// `key = true` becomes `--key`, `key = false` is left out.
fn file_args(path: &std::path::Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| format!("config file {} is not valid TOML: {e}", path.display()))?;
    let known: Vec<String> = <Config as clap::CommandFactory>::command()
        .get_arguments()
        .filter_map(|a| a.get_long().map(String::from))
        .collect();
    let mut out = Vec::new();
    for (key, value) in table {
        // `http_host` reads as `http-host`.
        let key = key.replace('_', "-");
        if key == "config" || key == "check-config" || !known.contains(&key) {
            return Err(format!(
                "config file {}: unknown setting '{key}' (use the long flag names, e.g. proxy-port)",
                path.display()
            ));
        }
        match value {
            toml::Value::Boolean(true) => out.push(format!("--{key}")),
            toml::Value::Boolean(false) => {}
            toml::Value::String(s) => out.push(format!("--{key}={s}")),
            toml::Value::Integer(i) => out.push(format!("--{key}={i}")),
            toml::Value::Float(f) => out.push(format!("--{key}={f}")),
            // A list is the flag repeated (`proxy-allow = ["10.0.0.0/8"]`).
            toml::Value::Array(items) => {
                for item in items {
                    match item {
                        toml::Value::String(s) => out.push(format!("--{key}={s}")),
                        other => {
                            return Err(format!(
                                "config file {}: setting '{key}' lists a {} value; list strings",
                                path.display(),
                                other.type_str()
                            ))
                        }
                    }
                }
            }
            other => {
                return Err(format!(
                "config file {}: setting '{key}' has a {} value; use a string, number or boolean",
                path.display(),
                other.type_str()
            ))
            }
        }
    }
    Ok(out)
}

/// An `--http-host` name: a DNS name (letters, digits, `-`, `.`), without
/// a port; kept lowercased, without a trailing dot.
pub fn parse_host_name(s: &str) -> Result<String, String> {
    let name = s.trim().trim_end_matches('.').to_ascii_lowercase();
    if name.is_empty() {
        return Err(format!("'{s}' is not a host name: it is empty"));
    }
    if name.len() > 253 {
        return Err(format!(
            "'{s}' is not a host name: longer than 253 characters"
        ));
    }
    if name.contains(':') {
        return Err(format!(
            "'{s}' is not a host name: give the name without a port (any port is accepted)"
        ));
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!(
                "'{s}' is not a host name: each dot-separated part needs 1-63 letters, digits \
                 or '-' (not first or last)"
            ));
        }
    }
    Ok(name)
}

/// A `--proxy-allow` range; the error names it and says what is wrong.
fn parse_cidr(s: &str) -> Result<crate::cidr::Cidr, String> {
    s.parse()
}

/// Seconds, where 0 means "never" (a zero duration).
fn parse_duration_or_zero(s: &str) -> Result<Duration, String> {
    if s.trim().parse::<f64>() == Ok(0.0) {
        return Ok(Duration::ZERO);
    }
    parse_duration(s)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !secs.is_finite() || secs <= 0.0 || secs > 1e9 {
        return Err(format!("'{s}' must be a positive number of seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
}

impl Config {
    /// Parse the command line (and `--config`), then apply vSPC.py's
    /// environment variables. Exits with status 2 and the usage on error.
    /// The backends asked for by name (none: the caller picks Memory) and
    /// their option words, with vSPC.py's `-f PATH` as the File backend
    /// with that store.
    pub fn backend_request(&self) -> (Vec<String>, Vec<String>) {
        let mut names = self.backend.clone();
        let mut tokens = self.backend_options.clone();
        if let Some(path) = &self.persist_file {
            if !names.iter().any(|n| n.eq_ignore_ascii_case("file")) {
                names.push("File".into());
            }
            tokens.splice(0..0, ["--file".to_string(), path.display().to_string()]);
        }
        (names, tokens)
    }

    pub fn from_args() -> Config {
        let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
        let mut cfg = match Config::from_argv(args) {
            Ok(c) => c,
            Err(e) => e.exit(),
        };
        cfg.apply_env(|k| std::env::var(k).ok());
        cfg
    }

    /// Parse `args` (program name first), reading `--config` if given.
    /// Arguments that are not vspc flags are kept in `backend_options`.
    pub fn from_argv(args: Vec<std::ffi::OsString>) -> Result<Config, clap::Error> {
        let (args, extra) = split_backend_options(args);
        let mut cfg = Config::parse_with_file(args)?;
        cfg.backend_options = extra;
        if let Some(more) = &cfg.backend_args {
            cfg.backend_options.extend(shell_words(more));
        }
        Ok(cfg)
    }

    fn parse_with_file(args: Vec<std::ffi::OsString>) -> Result<Config, clap::Error> {
        let first = Config::try_parse_from(&args)?;
        let Some(path) = first.config.clone() else {
            return Ok(first);
        };
        let from_file = file_args(&path).map_err(|msg| {
            clap::Error::raw(clap::error::ErrorKind::InvalidValue, format!("{msg}\n"))
                .with_cmd(&<Config as clap::CommandFactory>::command())
        })?;
        // File settings first, so the command line overrides them.
        let mut merged = vec![args.first().cloned().unwrap_or_else(|| "vspc".into())];
        merged.extend(from_file.into_iter().map(Into::into));
        merged.extend(args.into_iter().skip(1));
        Config::try_parse_from(merged)
    }

    /// Fill what the flags left unset from vSPC.py's environment variables.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) {
        if !self.multi_console {
            if let Some(v) = get("SUPPORT_MULTI_CONSOLE") {
                self.multi_console =
                    matches!(v.to_ascii_lowercase().as_str(), "true" | "1" | "yes");
            }
        }
        if self.client_limit.is_none() {
            if let Some(v) = get("VM_CLIENT_LIMIT") {
                match v.trim().parse::<usize>() {
                    Ok(n) => self.client_limit = Some(n),
                    Err(_) => tracing::warn!("ignoring VM_CLIENT_LIMIT={v:?}: not a number"),
                }
            }
        }
    }

    /// How long a VM's mapping outlives its last connection.
    pub fn expire(&self) -> Duration {
        Duration::from_secs(self.vm_expire_time)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_vspc_py() {
        let c = Config::try_parse_from(["vspc"]).unwrap();
        assert_eq!(c.proxy_port, 13370);
        assert_eq!(c.proxy_iface.to_string(), "0.0.0.0");
        assert_eq!(c.admin_port, 13371);
        assert_eq!(c.admin_iface.to_string(), "127.0.0.1");
        assert_eq!(c.port_range_start, 50000);
        assert_eq!(c.interface.to_string(), "127.0.0.1");
        assert_eq!(c.vm_expire_time, 86400);
        assert!(c.backend.is_empty(), "Memory is chosen when none is named");
    }

    #[test]
    fn cluster_flags_default_to_a_single_node() {
        let c = Config::try_parse_from(["vspc"]).unwrap();
        assert_eq!(c.cluster, None, "no --cluster: a single node");
        assert_eq!(c.cluster_port, 13373);
        assert_eq!(c.cluster_name, "vspc");
        assert_eq!(c.cluster_iface, None, "the proxy interface by default");
        let c = Config::try_parse_from([
            "vspc",
            "--cluster",
            "redis://r:6379/2",
            "--node-name",
            "n1",
            "--cluster-advertise",
            "n1.example:13373",
            "--cluster-secret-file",
            "/etc/vspc/s",
        ])
        .unwrap();
        assert_eq!(c.cluster.as_deref(), Some("redis://r:6379/2"));
        assert_eq!(c.node_name.as_deref(), Some("n1"));
        assert_eq!(c.cluster_advertise.as_deref(), Some("n1.example:13373"));
    }

    #[test]
    fn env_fills_unset_flags() {
        let mut c = Config::try_parse_from(["vspc"]).unwrap();
        c.apply_env(|k| match k {
            "SUPPORT_MULTI_CONSOLE" => Some("true".into()),
            "VM_CLIENT_LIMIT" => Some("3".into()),
            _ => None,
        });
        assert!(c.multi_console);
        assert_eq!(c.client_limit, Some(3));
        let mut c = Config::try_parse_from(["vspc", "--client-limit", "1"]).unwrap();
        c.apply_env(|_| Some("7".into()));
        assert_eq!(c.client_limit, Some(1));
    }

    #[test]
    fn config_file_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vspc.toml");
        std::fs::write(
            &path,
            "proxy-port = 1234\nadmin-iface = \"::1\"\nssl = false\nmulti-console = true\n",
        )
        .unwrap();
        let argv = |extra: &[&str]| {
            let mut v: Vec<std::ffi::OsString> =
                vec!["vspc".into(), "--config".into(), path.clone().into()];
            v.extend(extra.iter().map(|s| s.into()));
            v
        };
        let c = Config::from_argv(argv(&[])).unwrap();
        assert_eq!(c.proxy_port, 1234);
        assert_eq!(c.admin_iface.to_string(), "::1");
        assert!(c.multi_console && !c.ssl);
        let c = Config::from_argv(argv(&["--proxy-port", "99"])).unwrap();
        assert_eq!(c.proxy_port, 99);

        // The cluster's settings are keys like any other.
        std::fs::write(
            &path,
            "cluster = \"rediss://:pw@r:6380/1\"\ncluster-name = \"lab\"\ncluster-port = 14000\n",
        )
        .unwrap();
        let c = Config::from_argv(argv(&[])).unwrap();
        assert_eq!(c.cluster.as_deref(), Some("rediss://:pw@r:6380/1"));
        assert_eq!((c.cluster_name.as_str(), c.cluster_port), ("lab", 14000));

        std::fs::write(&path, "bogus = 1\n").unwrap();
        let e = Config::from_argv(argv(&[])).unwrap_err().to_string();
        assert!(e.contains("unknown setting 'bogus'"), "{e}");
        std::fs::write(&path, "proxy-port = [").unwrap();
        let e = Config::from_argv(argv(&[])).unwrap_err().to_string();
        assert!(e.contains("not valid TOML"), "{e}");
        std::fs::write(&path, "proxy-port = \"x\"").unwrap();
        assert!(Config::from_argv(argv(&[])).is_err());
    }

    #[test]
    fn backend_options_are_kept_apart() {
        let argv = |a: &[&str]| {
            a.iter()
                .map(|s| std::ffi::OsString::from(*s))
                .collect::<Vec<_>>()
        };
        let c = Config::from_argv(argv(&[
            "vspc",
            "--backend",
            "File,Logging",
            "-l",
            "/tmp/logs",
            "-a",
            "1234",
            "--prefix=x",
            "-d",
            "--backend",
            "jsonl",
            "--jsonl-file",
            "/tmp/e",
            "-f",
            "/var/lib/vspc",
            "--backend-args",
            "-m 0640 --context '5 0'",
        ]))
        .unwrap();
        assert_eq!(c.backend, ["File", "Logging", "jsonl"]);
        assert_eq!(c.admin_port, 1234);
        assert!(c.debug);
        assert_eq!(
            c.persist_file.as_deref(),
            Some(std::path::Path::new("/var/lib/vspc"))
        );
        assert_eq!(
            c.backend_options,
            [
                "-l",
                "/tmp/logs",
                "--prefix=x",
                "--jsonl-file",
                "/tmp/e",
                "-m",
                "0640",
                "--context",
                "5 0"
            ]
        );
        assert_eq!(
            shell_words(r#"a "b c" 'd e' f\ g"#),
            ["a", "b c", "d e", "f g"]
        );
    }

    #[test]
    fn split_reads_every_flag_form() {
        let os = |a: &[&str]| a.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        let (ours, theirs) = split_backend_options(os(&[
            "vspc",
            "-a1234",
            "--proxy-port=1",
            "-l",
            "-d",
            "--backend-args",
            "-m 0640",
            "-",
            "word",
            "--",
            "--debug=x",
            "-dl",
            "-h",
            "--version",
            "--interface",
        ]));
        assert_eq!(
            ours,
            os(&[
                "vspc",
                "-a1234",
                "--proxy-port=1",
                "-d",
                "--backend-args",
                "-m 0640",
                "--debug=x",
                "-dl",
                "-h",
                "--version",
                "--interface",
            ])
        );
        assert_eq!(theirs, ["-l", "-", "word", "--"]);
    }

    #[cfg(unix)]
    #[test]
    fn split_keeps_non_utf8_values() {
        use std::os::unix::ffi::OsStringExt;
        let odd = std::ffi::OsString::from_vec(vec![b'/', 0xff]);
        let args = vec!["vspc".into(), "-f".into(), odd.clone(), odd.clone()];
        let (ours, theirs) = split_backend_options(args.clone());
        assert_eq!(ours, args);
        assert!(theirs.is_empty());
    }

    #[test]
    fn proxy_allow_from_flags_and_the_config_file() {
        let c = Config::try_parse_from([
            "vspc",
            "--proxy-allow",
            "10.0.0.0/8,192.168.1.0/24",
            "--proxy-allow=2001:db8::/32",
        ])
        .unwrap();
        let shown: Vec<String> = c.proxy_allow.iter().map(|r| r.to_string()).collect();
        assert_eq!(shown, ["10.0.0.0/8", "192.168.1.0/24", "2001:db8::/32"]);
        let e = Config::try_parse_from(["vspc", "--proxy-allow", "10.0.0.0/40"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("10.0.0.0/40") && e.contains("--proxy-allow"),
            "{e}"
        );

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vspc.toml");
        std::fs::write(&path, "proxy-allow = [\"10.0.0.0/8\", \"::1\"]\n").unwrap();
        let argv = vec!["vspc".into(), "--config".into(), path.clone().into()];
        let c = Config::from_argv(argv).unwrap();
        assert_eq!(c.proxy_allow.len(), 2);
        std::fs::write(&path, "proxy-allow = \"127.0.0.1/32,10.0.0.0/8\"\n").unwrap();
        let argv = vec!["vspc".into(), "--config".into(), path.clone().into()];
        assert_eq!(Config::from_argv(argv).unwrap().proxy_allow.len(), 2);
        std::fs::write(&path, "proxy-allow = [1]\n").unwrap();
        let argv = vec!["vspc".into(), "--config".into(), path.into()];
        assert!(Config::from_argv(argv).is_err());
    }

    #[test]
    fn ssh_limits_from_flags_and_the_config_file() {
        let c = Config::try_parse_from(["vspc"]).unwrap();
        assert_eq!(c.ssh_auth_timeout, Duration::from_secs(30));
        assert_eq!(c.ssh_max_unauthenticated, 64);
        assert_eq!(c.ssh_idle_timeout, Duration::ZERO);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vspc.toml");
        std::fs::write(
            &path,
            "ssh-auth-timeout = 10\nssh-max-unauthenticated = 16\nssh-idle-timeout = 3600\n",
        )
        .unwrap();
        let argv = vec!["vspc".into(), "--config".into(), path.into()];
        let c = Config::from_argv(argv).unwrap();
        assert_eq!(c.ssh_auth_timeout, Duration::from_secs(10));
        assert_eq!(c.ssh_max_unauthenticated, 16);
        assert_eq!(c.ssh_idle_timeout, Duration::from_secs(3600));
        assert!(Config::try_parse_from(["vspc", "--ssh-auth-timeout", "0"]).is_err());
        assert!(Config::try_parse_from(["vspc", "--ssh-max-unauthenticated", "0"]).is_err());
        assert!(Config::try_parse_from(["vspc", "--ssh-idle-timeout", "x"]).is_err());
    }

    #[test]
    fn bad_values_are_errors() {
        assert!(Config::try_parse_from(["vspc", "--proxy-port", "x"]).is_err());
        assert!(Config::try_parse_from(["vspc", "--bogus"]).is_err());
        assert!(Config::from_argv(vec!["vspc".into(), "--admin-port".into(), "x".into()]).is_err());
        assert!(Config::try_parse_from(["vspc", "--handshake-timeout", "-1"]).is_err());
        assert!(Config::try_parse_from(["vspc", "--vm-tx-rate", "0"]).is_err());
    }
}
