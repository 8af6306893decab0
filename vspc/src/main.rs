//! The `vspc` daemon: parse flags, check everything that can fail before
//! serving (TLS files, backend options, its stored map), optionally detach,
//! then run the server on a tokio runtime.

use std::process::ExitCode;
use std::sync::Arc;
use vspc::backend_host::BackendHost;
use vspc::config::Config;
use vspc::hub::{Hub, HubConfig};
use vspc::logging;
use vspc::net::{self, ServerConfig};
use vspc::session::vm::VmSessionConfig;

fn main() -> ExitCode {
    let cfg = Config::from_args();
    let target = if cfg.syslog {
        logging::Target::Syslog
    } else if cfg.stdout {
        logging::Target::Stdout
    } else {
        logging::Target::Stderr
    };
    if let Err(e) = logging::init(target, cfg.debug) {
        eprintln!("vspc: {e}");
        return ExitCode::from(1);
    }
    match start(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("vspc: {e}");
            ExitCode::from(1)
        }
    }
}

fn start(cfg: Config) -> Result<(), String> {
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

    let backend_name = if cfg.persist_file.is_some() {
        "File".to_string()
    } else {
        cfg.backend.clone()
    };
    let mut backend = vspc_backends::builtin(&backend_name).ok_or_else(|| {
        format!(
            "unknown backend '{backend_name}' (built in: {})",
            vspc_backends::BUILTIN.join(", ")
        )
    })?;
    let args: Vec<String> = cfg
        .backend_args
        .as_deref()
        .unwrap_or("")
        .split_whitespace()
        .map(String::from)
        .collect();
    backend
        .configure(&args)
        .map_err(|e| format!("backend {}: {e}", backend.name()))?;
    let preload = backend
        .load_map()
        .map_err(|e| format!("backend {}: {e}", backend.name()))?;

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

    let host =
        BackendHost::spawn(backend).map_err(|e| format!("cannot start backend thread: {e}"))?;
    let hub_cfg = HubConfig {
        port_range_start: cfg.port_range_start,
        vm_ports: !cfg.no_vm_ports,
        interface: cfg.interface,
        expire: cfg.expire(),
        vmotion_timeout: cfg.vmotion_timeout,
        client_limit: cfg.client_limit,
        console_queue: cfg.console_queue as usize,
    };
    let server = ServerConfig {
        proxy: (cfg.proxy_iface, cfg.proxy_port).into(),
        admin: (cfg.admin_iface, cfg.admin_port).into(),
        tls,
        vm: VmSessionConfig {
            handshake_timeout: cfg.handshake_timeout,
            identify_timeout: cfg.identify_timeout,
            multi_console: cfg.multi_console,
        },
        vm_tx_rate: cfg.vm_tx_rate,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let result = rt.block_on(async {
        let hub: Arc<Hub> = Hub::new(hub_cfg, host);
        net::run(hub, server, preload).await
    });
    if let Some(path) = &cfg.pidfile {
        let _ = std::fs::remove_file(path);
    }
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}
