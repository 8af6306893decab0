//! The `vspc` daemon: parse flags, check everything that can fail before
//! serving (TLS files, backend options, its stored map), optionally detach,
//! then run the server on a tokio runtime.

#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::sync::Arc;
use vspc::backend_host::Backends;
use vspc::backend_setup::{self, Named, SetupError};
use vspc::config::Config;
use vspc::hub::{Hub, HubConfig};
use vspc::logging;
use vspc::net;
use vspc::server::{self, Listeners, ServerConfig};
use vspc::session::vm::VmSessionConfig;

/// jemalloc rather than glibc's malloc: 3.5 instead of 3.7 KiB per idle
/// VM with a console (`vspc-bench attach`), and with its background thread
/// memory freed after a burst of connections goes back to the system
/// within seconds instead of staying resident.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's own figures, for the admin port's `stats`.
fn heap() -> Option<vspc::memory::Heap> {
    use tikv_jemalloc_ctl::{epoch, stats};
    // The statistics are a snapshot taken at the last epoch.
    epoch::advance().ok()?;
    Some(vspc::memory::Heap {
        allocated: stats::allocated::read().ok()? as u64,
        resident: stats::resident::read().ok()? as u64,
    })
}

fn main() -> ExitCode {
    // `vspc import ...`: a command of its own, not the daemon's flags.
    if std::env::args_os().nth(1).is_some_and(|a| a == "import") {
        return vspc::import_cmd::main(std::env::args_os().skip(1));
    }
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if vspc::check_config::wanted(&args) {
        return vspc::check_config::main(args);
    }
    vspc::memory::install(heap);
    let cfg = Config::from_args();
    let target = if cfg.syslog {
        logging::Target::Syslog
    } else if cfg.stdout {
        logging::Target::Stdout
    } else {
        logging::Target::Stderr
    };
    let logs_to_stderr = matches!(target, logging::Target::Stderr);
    if let Err(e) = logging::init(target, cfg.debug) {
        eprintln!("vspc: {e}");
        return ExitCode::from(1);
    }
    match start(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            if !logs_to_stderr {
                eprintln!("vspc: {e}");
            }
            ExitCode::from(1)
        }
    }
}

fn start(cfg: Config) -> Result<(), String> {
    let (backends, preload) = match setup_backends(&cfg) {
        Ok(Some(b)) => b,
        Ok(None) => return Ok(()),
        Err(SetupError::Failed(e)) => return Err(e),
        Err(SetupError::Usage(e)) => usage_error(&e),
    };

    if cfg.cert.is_some() && !cfg.ssl {
        tracing::warn!("--cert given without --ssl; the proxy port speaks plain telnet");
    }
    let tls = if cfg.ssl {
        let cert = cfg
            .cert
            .as_deref()
            .ok_or("--ssl needs --cert FILE (a PEM certificate chain)")?;
        Some(net::tls::acceptor(cert, cfg.key.as_deref())?)
    } else {
        None
    };

    let http = http_config(&cfg)?;
    let ssh = ssh_config(&cfg)?;
    let cluster = vspc::cluster::settings(&cfg)?;
    server::check_exposure(
        (cfg.admin_iface, cfg.admin_port).into(),
        &vspc::cidr::AllowList::new(cfg.admin_allow.clone()),
        (cfg.proxy_iface, cfg.proxy_port).into(),
        &vspc::cidr::AllowList::new(cfg.proxy_allow.clone()),
    )?;

    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "open-files limit raised"),
        Err(e) => tracing::warn!("cannot raise the open-files limit: {e}"),
    }

    if cfg.daemon {
        daemonize::Daemonize::new()
            .working_directory("/")
            .start()
            .map_err(|e| format!("cannot detach into the background: {e}"))?;
    }
    if let Some(path) = &cfg.pidfile {
        std::fs::write(path, format!("{}\n", std::process::id()))
            .map_err(|e| format!("cannot write pid file {}: {e}", path.display()))?;
    }

    let backends: Vec<_> = backends.into_iter().map(|n| n.backend).collect();
    let host = Backends::spawn(backends, cfg.backend_queue as usize)
        .map_err(|e| format!("cannot start backend thread: {e}"))?;
    let hub_cfg = HubConfig {
        port_range_start: cfg.port_range_start,
        vm_ports: !cfg.no_vm_ports,
        interface: cfg.interface,
        expire: cfg.expire(),
        vmotion_timeout: cfg.vmotion_timeout,
        client_limit: cfg.client_limit,
        console_queue: cfg.console_queue as usize,
        console_protocol: cfg.console_protocol,
        console_stall: Some(cfg.console_stall_timeout).filter(|d| !d.is_zero()),
        replay_bytes: cfg.replay_bytes as usize,
        console_replay: cfg.console_replay,
    };
    let server = ServerConfig {
        proxy: (cfg.proxy_iface, cfg.proxy_port).into(),
        admin: (cfg.admin_iface, cfg.admin_port).into(),
        vms: vspc::doors::proxy::ProxyConfig {
            tls,
            vm: VmSessionConfig {
                handshake_timeout: cfg.handshake_timeout,
                identify_timeout: cfg.identify_timeout,
                multi_console: cfg.multi_console,
            },
            vm_tx_rate: cfg.vm_tx_rate,
            allow: vspc::cidr::AllowList::new(cfg.proxy_allow.clone()),
            max_unidentified: cfg.max_unidentified as usize,
        },
        http,
        ssh,
        admin_allow: vspc::cidr::AllowList::new(cfg.admin_allow.clone()),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let result = rt.block_on(async {
        let hub: Arc<Hub> = Hub::new(hub_cfg, host);
        let result = serve(hub.clone(), server, preload, cluster).await;
        hub.backend().shutdown(std::time::Duration::from_secs(5));
        result
    });
    if let Some(path) = &cfg.pidfile {
        let _ = std::fs::remove_file(path);
    }
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

/// Bind every port, then serve until SIGTERM or SIGINT; SIGHUP reloads.
async fn serve(
    hub: Arc<Hub>,
    cfg: ServerConfig,
    preload: Vec<vspc_backend_api::VmRecord>,
    cluster: Option<vspc::cluster::ClusterSettings>,
) -> Result<(), String> {
    use tokio::signal::unix::{signal, SignalKind};
    let sig = |k: SignalKind| signal(k).map_err(|e| format!("cannot install signal handler: {e}"));
    let mut term = sig(SignalKind::terminate())?;
    let mut int = sig(SignalKind::interrupt())?;
    let mut hup = sig(SignalKind::hangup())?;
    let mut listeners = Listeners::bind(&cfg)?;
    if let Some(settings) = cluster {
        listeners.cluster = Some(vspc::cluster::Cluster::connect(settings).await?);
    }
    let ssh = cfg.ssh.as_ref().map(|s| s.state.clone());
    let h = hub.clone();
    let shutdown = async move {
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); return; }
                _ = int.recv() => { tracing::info!("SIGINT: shutting down"); return; }
                _ = hup.recv() => server::reload(&h, ssh.as_deref()),
            }
        }
    };
    server::run(hub, cfg, listeners, preload, shutdown).await
}

/// The HTTP listener's settings, with everything that can fail checked
/// before anything starts: the token file, the exposure rule, TLS files.
fn http_config(cfg: &Config) -> Result<Option<vspc::doors::http::HttpConfig>, String> {
    if cfg.no_http {
        return Ok(None);
    }
    let tokens = match &cfg.http_token_file {
        Some(path) => Some(Arc::new(vspc::doors::http::Tokens::load(path)?)),
        None => None,
    };
    vspc::doors::http::check_exposure(cfg.http_iface, tokens.is_some())?;
    let tls = match &cfg.http_cert {
        Some(cert) => Some(net::tls::acceptor(cert, cfg.http_key.as_deref())?),
        None => None,
    };
    Ok(Some(vspc::doors::http::HttpConfig {
        addr: (
            cfg.http_iface,
            cfg.http_port.unwrap_or(vspc::doors::http::DEFAULT_PORT),
        )
            .into(),
        tokens,
        tls,
        handshake_timeout: cfg.handshake_timeout,
        required: cfg.http_port.is_some(),
        hosts: cfg.http_host.clone(),
        header_timeout: cfg.http_header_timeout,
        max_connections: cfg.http_max_connections as usize,
    }))
}

/// The SSH front door's settings, with its files read (and the host key
/// made if missing) before anything starts; `None` without `--ssh-port`.
fn ssh_config(cfg: &Config) -> Result<Option<vspc::doors::ssh::SshConfig>, String> {
    let Some(port) = cfg.ssh_port else {
        return Ok(None);
    };
    let keys = cfg
        .ssh_authorized_keys
        .as_deref()
        .ok_or("--ssh-port needs --ssh-authorized-keys FILE (the public keys allowed in)")?;
    let limits = vspc::doors::ssh::SshLimits {
        auth_timeout: cfg.ssh_auth_timeout,
        max_unauthenticated: usize::try_from(cfg.ssh_max_unauthenticated).unwrap_or(usize::MAX),
        idle_timeout: Some(cfg.ssh_idle_timeout).filter(|t| !t.is_zero()),
    };
    let state = vspc::doors::ssh::SshState::new(&cfg.ssh_host_key, keys, limits)?;
    Ok(Some(vspc::doors::ssh::SshConfig {
        addr: (cfg.ssh_iface, port).into(),
        state: Arc::new(state),
    }))
}

/// Resolve, configure and load the backends; `None` after `--backend-help`.
#[allow(clippy::type_complexity)]
fn setup_backends(
    cfg: &Config,
) -> Result<Option<(Vec<Named>, Vec<vspc_backend_api::VmRecord>)>, SetupError> {
    vspc_backend_api::log::install(vspc_backend_api::ffi::Logger {
        log: vspc::plugins::host_log,
    });
    let env_path = std::env::var("VSPC_PLUGIN_PATH").ok();
    let dirs = vspc::plugins::search_dirs(&cfg.plugin_dir, env_path.as_deref());
    let (mut names, tokens) = cfg.backend_request();
    if names.is_empty() {
        if cfg.backend_help {
            print!("{}", backend_setup::list_text(&dirs));
            return Ok(None);
        }
        names.push("Memory".into());
    }
    let mut backends = backend_setup::resolve(&names, &dirs)?;
    if cfg.backend_help {
        for b in &backends {
            print!("{}", backend_setup::help_text(b));
        }
        return Ok(None);
    }
    let opts = backend_setup::route(&tokens, &backends)?;
    backend_setup::configure(&mut backends, opts)?;
    let preload = backend_setup::load_map(&mut backends)?;
    let names: Vec<String> = backends
        .iter()
        .map(|b| b.backend.name().to_string())
        .collect();
    tracing::info!(backends = ?names, "backends ready");
    Ok(Some((backends, preload)))
}

/// A usage error: one line, the usage, exit status 2 (as clap does).
fn usage_error(msg: &str) -> ! {
    let mut cmd = <Config as clap::CommandFactory>::command();
    eprintln!(
        "error: {msg}\n\n{}\n\nFor more information, try '--help'.",
        cmd.render_usage()
    );
    std::process::exit(2)
}
