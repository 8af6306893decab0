//! `vspc --check-config [FILE]`: check a configuration without starting,
//! naming every problem rather than the first: each TOML setting and each
//! flag value on its own (unknown keys, wrong types, bad CIDRs, bad
//! numbers), then the whole as the daemon would take it (TLS certificates
//! and keys, token and key files, exposure rules, backend options, the
//! File backend's map or the vSPC.py store it would import). Nothing is
//! written, nothing listens. Exit status 0 when all is well, 1 otherwise,
//! so a unit can run it as `ExecStartPre`.

use crate::argv::{OptToken, OptValue};
use crate::config::Config;
use clap::CommandFactory;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Whether the command line asks for a check.
pub fn wanted(args: &[OsString]) -> bool {
    args.iter().skip(1).any(|a| {
        a.to_str()
            .is_some_and(|s| s == "--check-config" || s.starts_with("--check-config="))
    })
}

/// Run the check for `args` (the program name first) and report.
pub fn main(args: Vec<OsString>) -> ExitCode {
    let report = check(args, &|k| std::env::var(k).ok());
    for n in &report.notes {
        println!("vspc: note: {n}");
    }
    if report.problems.is_empty() {
        println!("vspc: configuration OK ({})", report.what);
        return ExitCode::SUCCESS;
    }
    for p in &report.problems {
        eprintln!("vspc: {p}");
    }
    let n = report.problems.len();
    eprintln!(
        "vspc: {n} problem{} in {}",
        if n == 1 { "" } else { "s" },
        report.what
    );
    ExitCode::from(1)
}

/// What a check found.
#[derive(Debug, Default)]
pub struct Report {
    /// What was checked: "FILE and the flags", or "the flags".
    pub what: String,
    /// Each a line: what is wrong and where.
    pub problems: Vec<String>,
    /// Things worth knowing that are not errors.
    pub notes: Vec<String>,
}

/// Check `args` (program name first, `--check-config [FILE]` among them).
pub fn check(args: Vec<OsString>, env: &dyn Fn(&str) -> Option<String>) -> Report {
    let mut report = Report::default();
    let mut file: Option<PathBuf> = None;
    let mut config: Option<PathBuf> = None;
    let mut rest: Vec<OsString> = Vec::new();
    let mut it = args.into_iter().peekable();
    if let Some(prog) = it.next() {
        rest.push(prog);
    }
    while let Some(a) = it.next() {
        let text = a.to_str().map(str::to_string);
        match text.as_deref() {
            Some("--check-config") => {
                let next_is_file = it
                    .peek()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| !n.starts_with('-'));
                if next_is_file {
                    file = it.next().map(PathBuf::from);
                }
            }
            Some(t) if t.starts_with("--check-config=") => {
                file = Some(PathBuf::from(&t["--check-config=".len()..]));
            }
            Some("--config") => {
                config = it.next().map(PathBuf::from);
            }
            Some(t) if t.starts_with("--config=") => {
                config = Some(PathBuf::from(&t["--config=".len()..]));
            }
            _ => rest.push(a),
        }
    }
    let file = match (file, config) {
        (Some(f), Some(c)) if f != c => {
            report.problems.push(format!(
                "--check-config {} and --config {} name two files: give one",
                f.display(),
                c.display()
            ));
            Some(f)
        }
        (f, c) => f.or(c),
    };
    report.what = match &file {
        Some(f) => format!("{} and the flags", f.display()),
        None => "the flags".into(),
    };
    let cmd = Config::command();
    // The settings that passed on their own go on to the whole check, so
    // that a bad value does not hide an unreadable certificate.
    let mut full: Vec<OsString> = rest.first().cloned().into_iter().collect();
    if let Some(f) = &file {
        full.extend(
            check_toml(&cmd, f, &mut report.problems)
                .into_iter()
                .map(OsString::from),
        );
    }
    full.extend(check_flags(&cmd, &rest, &mut report.problems));
    let mut cfg = match Config::from_argv(full) {
        Ok(c) => c,
        Err(e) => {
            if report.problems.is_empty() {
                report.problems.push(clap_line(&e));
            }
            return report;
        }
    };
    cfg.apply_env(env);
    check_whole(&cfg, &mut report);
    report
}

/// clap's message without "error: " and its advice lines.
fn clap_line(e: &clap::Error) -> String {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or("").trim();
    first.strip_prefix("error: ").unwrap_or(first).to_string()
}

/// Check one value of `arg` with the flag's own parser (each part, for a
/// comma-separated flag).
fn check_value(arg: &clap::Arg, value: &str) -> Result<(), String> {
    let parts: Vec<&str> = match arg.get_value_delimiter() {
        Some(d) => value.split(d).collect(),
        None => vec![value],
    };
    // The flag alone in a command of its own (its ties to other flags
    // dropped), so its own parser and range checks run on the value.
    let alone = arg
        .clone()
        .required(false)
        .requires(clap::builder::Resettable::Reset)
        .conflicts_with(clap::builder::Resettable::Reset)
        .value_delimiter(None)
        .num_args(1);
    let one = clap::Command::new("vspc").no_binary_name(true).arg(alone);
    let id = arg.get_id().clone();
    for part in parts {
        let flag = format!("--{}", arg.get_long().unwrap_or(id.as_str()));
        one.clone()
            .try_get_matches_from([OsStr::new(&flag), OsStr::new(part)])
            .map_err(|e| clap_line(&e))?;
    }
    Ok(())
}

fn takes_value(arg: &clap::Arg) -> bool {
    arg.get_action().takes_values()
}

/// Every setting of the TOML file on its own; the good ones as flags.
fn check_toml(cmd: &clap::Command, path: &Path, problems: &mut Vec<String>) -> Vec<String> {
    let mut good = Vec::new();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            problems.push(format!("cannot read config file {}: {e}", path.display()));
            return good;
        }
    };
    let table: toml::Table = match text.parse() {
        Ok(t) => t,
        Err(e) => {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            let msg = e.message().lines().next().unwrap_or("").to_string();
            problems.push(match line {
                Some(l) => format!(
                    "config file {} is not valid TOML: line {l}: {msg}",
                    path.display()
                ),
                None => format!("config file {} is not valid TOML: {msg}", path.display()),
            });
            return good;
        }
    };
    let at = |key: &str| format!("config file {}: setting '{key}'", path.display());
    for (key, value) in &table {
        let long = key.replace('_', "-");
        if long == "config" || long == "check-config" {
            problems.push(format!("{}: cannot be set in a config file", at(key)));
            continue;
        }
        let Some(arg) = cmd.get_arguments().find(|a| a.get_long() == Some(&long)) else {
            problems.push(format!(
                "{}: unknown setting{} (keys are vspc's long flag names, e.g. proxy-port)",
                at(key),
                suggestion(cmd, &long)
            ));
            continue;
        };
        let values: Vec<String> = match value {
            toml::Value::Boolean(true) if !takes_value(arg) => {
                good.push(format!("--{long}"));
                continue;
            }
            toml::Value::Boolean(_) if !takes_value(arg) => continue,
            toml::Value::Boolean(_) => {
                problems.push(format!("{}: takes a value, not true or false", at(key)));
                continue;
            }
            _ if !takes_value(arg) => {
                problems.push(format!(
                    "{}: is a switch: set it to true or false, not a {}",
                    at(key),
                    value.type_str()
                ));
                continue;
            }
            toml::Value::String(s) => vec![s.clone()],
            toml::Value::Integer(i) => vec![i.to_string()],
            toml::Value::Float(f) => vec![f.to_string()],
            toml::Value::Array(items) => {
                let mut out = Vec::new();
                for item in items {
                    match item {
                        toml::Value::String(s) => out.push(s.clone()),
                        other => problems.push(format!(
                            "{}: lists a {} value; list strings",
                            at(key),
                            other.type_str()
                        )),
                    }
                }
                out
            }
            other => {
                problems.push(format!(
                    "{}: has a {} value; use a string, number or boolean",
                    at(key),
                    other.type_str()
                ));
                continue;
            }
        };
        for v in values {
            match check_value(arg, &v) {
                Ok(()) => good.push(format!("--{long}={v}")),
                Err(e) => problems.push(format!("{}: {e}", at(key))),
            }
        }
    }
    good
}

/// A known key close to an unknown one: ", did you mean 'proxy-port'?".
fn suggestion(cmd: &clap::Command, key: &str) -> String {
    let best = cmd
        .get_arguments()
        .filter_map(|a| a.get_long())
        .map(|l| (distance(l, key), l))
        .min();
    match best {
        Some((d, l)) if d <= 2 || l.contains(key) => format!(", did you mean '{l}'?"),
        _ => String::new(),
    }
}

/// Levenshtein distance, for suggestions.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// Every value given on the command line on its own. Options that are not
/// vspc's go to the backends, which are checked later. Returns the
/// arguments without the flags whose values are bad.
fn check_flags(
    cmd: &clap::Command,
    args: &[OsString],
    problems: &mut Vec<String>,
) -> Vec<OsString> {
    let mut good = Vec::new();
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let Some(tok) = a.to_str().and_then(OptToken::parse) else {
            good.push(a.clone());
            continue;
        };
        let Some(arg) = cmd
            .get_arguments()
            .find(|x| tok.key.is(x.get_long(), x.get_short()))
        else {
            good.push(a.clone());
            continue;
        };
        if !takes_value(arg) {
            good.push(a.clone());
            continue;
        }
        let name = arg.get_long().map_or(String::new(), |l| format!("--{l}"));
        let value = match tok.value(&mut it) {
            OptValue::Inline(v) => v,
            OptValue::Next(v) => v.to_string_lossy().into_owned(),
            OptValue::Missing => {
                problems.push(format!("flag {name} needs a value"));
                continue;
            }
        };
        match check_value(arg, &value) {
            Ok(()) => good.push(format!("{name}={value}").into()),
            Err(e) => problems.push(format!("flag {name}: {e}")),
        }
    }
    good
}

/// The settings together, as the daemon would take them at start-up.
fn check_whole(cfg: &Config, report: &mut Report) {
    let problems = &mut report.problems;
    if cfg.ssl {
        match &cfg.cert {
            None => problems.push("--ssl needs --cert FILE (a PEM certificate chain)".into()),
            Some(cert) => {
                if let Err(e) = crate::net::tls::acceptor(cert, cfg.key.as_deref()) {
                    problems.push(e);
                }
            }
        }
    } else if cfg.cert.is_some() {
        report
            .notes
            .push("--cert is given without --ssl: the proxy port speaks plain telnet".into());
    }
    if !cfg.no_http {
        let tokens = match &cfg.http_token_file {
            Some(path) => match crate::doors::http::Tokens::load(path) {
                Ok(_) => true,
                Err(e) => {
                    problems.push(e);
                    true
                }
            },
            None => false,
        };
        if let Err(e) = crate::doors::http::check_exposure(cfg.http_iface, tokens) {
            problems.push(e);
        }
        if let Some(cert) = &cfg.http_cert {
            if let Err(e) = crate::net::tls::acceptor(cert, cfg.http_key.as_deref()) {
                problems.push(e);
            }
        }
    }
    if cfg.ssh_port.is_some() {
        match &cfg.ssh_authorized_keys {
            None => problems.push(
                "--ssh-port needs --ssh-authorized-keys FILE (the public keys allowed in)".into(),
            ),
            Some(keys) => {
                if let Err(e) = crate::doors::ssh::load_authorized_keys(keys) {
                    problems.push(e.to_string());
                }
            }
        }
        let key = &cfg.ssh_host_key;
        if key.exists() {
            if let Err(e) = std::fs::File::open(key) {
                problems.push(format!("cannot read SSH host key {}: {e}", key.display()));
            }
        } else if !key
            .parent()
            .is_some_and(|d| d.as_os_str().is_empty() || d.is_dir())
        {
            problems.push(format!(
                "SSH host key {} does not exist and its directory does not either",
                key.display()
            ));
        } else {
            report.notes.push(format!(
                "SSH host key {} will be made at the first start",
                key.display()
            ));
        }
    }
    if let Err(e) = crate::server::check_exposure(
        (cfg.admin_iface, cfg.admin_port).into(),
        &crate::cidr::AllowList::new(cfg.admin_allow.clone()),
        (cfg.proxy_iface, cfg.proxy_port).into(),
        &crate::cidr::AllowList::new(cfg.proxy_allow.clone()),
    ) {
        problems.push(e);
    }
    let mut ports = vec![
        ("--proxy-port", cfg.proxy_port),
        ("--admin-port", cfg.admin_port),
    ];
    if !cfg.no_http {
        ports.push((
            "--http-port",
            cfg.http_port.unwrap_or(crate::doors::http::DEFAULT_PORT),
        ));
    }
    if let Some(p) = cfg.ssh_port {
        ports.push(("--ssh-port", p));
    }
    for (i, (a, pa)) in ports.iter().enumerate() {
        if let Some((b, _)) = ports[..i].iter().find(|(_, pb)| pb == pa) {
            problems.push(format!(
                "{b} and {a} are both {pa}: give them different ports"
            ));
        }
    }
    let low: Vec<String> = ports
        .iter()
        .chain(std::iter::once(&(
            "--port-range-start",
            cfg.port_range_start,
        )))
        .filter(|(_, p)| *p < 1024)
        .map(|(f, p)| format!("{f} {p}"))
        .collect();
    if !low.is_empty() {
        report.notes.push(format!(
            "{} below 1024: the daemon needs CAP_NET_BIND_SERVICE (in the packaged unit: \
             AmbientCapabilities=CAP_NET_BIND_SERVICE and \
             CapabilityBoundingSet=CAP_NET_BIND_SERVICE in a drop-in)",
            low.join(", ")
        ));
    }
    if let Some(pid) = &cfg.pidfile {
        if !pid
            .parent()
            .is_some_and(|d| d.as_os_str().is_empty() || d.is_dir())
        {
            problems.push(format!(
                "the directory of --pidfile {} does not exist",
                pid.display()
            ));
        }
    }
    // Cluster mode, as far as it can be checked without Redis: the secret
    // file and its mode, the node link's address, its TLS files.
    if let Err(e) = crate::cluster::settings(cfg) {
        problems.push(e);
    }
    check_backends(cfg, report);
}

/// The backends as `vspc` would set them up, and the File backend's store;
/// nothing is loaded into a backend and nothing is written.
fn check_backends(cfg: &Config, report: &mut Report) {
    use crate::backend_setup::{self, SetupError};
    let text = |e: SetupError| match e {
        SetupError::Usage(m) | SetupError::Failed(m) => m,
    };
    let env_path = std::env::var("VSPC_PLUGIN_PATH").ok();
    let dirs = crate::plugins::search_dirs(&cfg.plugin_dir, env_path.as_deref());
    let (mut names, tokens) = cfg.backend_request();
    if names.is_empty() {
        names.push("Memory".into());
    }
    let mut backends = match backend_setup::resolve(&names, &dirs) {
        Ok(b) => b,
        Err(e) => return report.problems.push(text(e)),
    };
    let opts = match backend_setup::route(&tokens, &backends) {
        Ok(o) => o,
        Err(e) => return report.problems.push(text(e)),
    };
    let file_opt = backends
        .iter()
        .zip(&opts)
        .find(|(b, _)| b.backend.name().as_str() == "File")
        .and_then(|(_, o)| {
            o.iter()
                .rev()
                .find(|(k, _)| k == "file")
                .and_then(|(_, v)| v.clone())
        });
    if let Err(e) = backend_setup::configure(&mut backends, opts) {
        return report.problems.push(text(e));
    }
    if let Some(path) = file_opt {
        match vspc_backends::file::check(&path) {
            Ok(said) => report.notes.push(said),
            Err(e) => report.problems.push(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Report {
        let mut v: Vec<OsString> = vec!["vspc".into()];
        v.extend(args.iter().map(OsString::from));
        check(v, &|_| None)
    }

    #[test]
    fn every_problem_of_a_file_and_the_flags_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vspc.toml");
        std::fs::write(
            &path,
            "proxy-prot = 1\nproxy-allow = [\"10.0.0.0/8\", \"10.1.0.0/33\"]\n\
             admin-allow = \"192.168.1.1/16\"\nssl = \"yes\"\nmulti-console = 3\n\
             vm-expire-time = -1\nconfig = \"x\"\nhttp-host = [1]\n",
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let r = run(&[
            "--check-config",
            p,
            "--admin-port",
            "x",
            "--proxy-allow=1.2.3.4/99",
        ]);
        let all = r.problems.join("\n");
        for want in [
            "'proxy-prot': unknown setting, did you mean 'proxy-port'?",
            "10.1.0.0/33",
            "192.168.1.1/16",
            "'ssl': is a switch",
            "'multi-console': is a switch",
            "'vm-expire-time'",
            "'config': cannot be set",
            "'http-host': lists a integer",
            "flag --admin-port",
            "1.2.3.4/99",
        ] {
            assert!(all.contains(want), "{want:?} not in:\n{all}");
        }
        assert_eq!(r.problems.len(), 10, "{all}");
        assert!(r.problems.iter().all(|p| !p.contains('\n')), "{all}");
        assert!(r.what.contains(p));
    }

    #[test]
    fn cluster_settings_are_checked_without_redis() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "0123456789abcdef0123456789abcdef").unwrap();
        let mut perms = std::fs::metadata(&secret).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
        std::fs::set_permissions(&secret, perms).unwrap();
        let s = secret.to_str().unwrap();
        let r = run(&[
            "--check-config",
            "--cluster",
            "redis://127.0.0.1:1",
            "--cluster-secret-file",
            s,
        ]);
        let all = r.problems.join("\n");
        assert!(all.contains(s) && all.contains("chmod 600"), "{all}");
        let r = run(&["--check-config", "--cluster", "redis://127.0.0.1:1"]);
        let all = r.problems.join("\n");
        assert!(all.contains("--cluster-secret-file"), "{all}");
    }

    #[test]
    fn files_the_daemon_would_read_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let m = missing.to_str().unwrap();
        let r = run(&[
            "--check-config",
            "--ssl",
            "--cert",
            m,
            "--http-token-file",
            m,
            "--admin-iface",
            "0.0.0.0",
            "--no-vm-ports",
            "--pidfile",
            "/nonexistent-dir/vspc.pid",
        ]);
        let all = r.problems.join("\n");
        assert!(all.matches("nope.pem").count() >= 2, "{all}");
        assert!(all.contains("--admin-allow"), "{all}");
        assert!(all.contains("--pidfile"), "{all}");
        assert_eq!(r.what, "the flags");

        let r = run(&["--check-config", "--backend", "Nope"]);
        assert!(r.problems.join("\n").contains("Nope"), "{:?}", r.problems);
        let r = run(&[
            "--check-config",
            "--backend",
            "Logging",
            "--bogus-option",
            "1",
        ]);
        assert!(
            r.problems.join("\n").contains("--bogus-option"),
            "{:?}",
            r.problems
        );
        let r = run(&["--check-config", "--admin-port", "13370"]);
        assert!(
            r.problems.join("\n").contains("both 13370"),
            "{:?}",
            r.problems
        );
    }

    #[test]
    fn a_good_configuration_passes_with_notes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vspc.toml");
        let map = dir.path().join("map");
        std::fs::write(
            &path,
            format!(
                "proxy-port = 13370\nproxy_allow = \"10.0.0.0/8,10.1.0.0/16\"\n\
                 persist-file = {:?}\nadmin-port = 1023\nssl = false\n",
                map.to_str().unwrap()
            ),
        )
        .unwrap();
        let r = run(&[&format!("--check-config={}", path.display()), "-d"]);
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        let notes = r.notes.join("\n");
        assert!(notes.contains("--admin-port 1023 below 1024"), "{notes}");
        assert!(notes.contains("not made yet"), "{notes}");
        // --config and --check-config FILE together must agree.
        let r = run(&[
            "--check-config",
            path.to_str().unwrap(),
            "--config",
            "/x.toml",
        ]);
        assert!(r.problems[0].contains("two files"), "{:?}", r.problems);
        assert!(wanted(&["vspc".into(), "--check-config".into()]));
        assert!(!wanted(&["vspc".into(), "--config".into(), "x".into()]));
    }
}
