//! From `--backend` names and leftover arguments to configured backends:
//! each name becomes a built-in or a loaded plugin (all as the same
//! stable-ABI object), each leftover argument goes to the backend that
//! declared that option, and the first backend that persists supplies the
//! port map.

use crate::plugins;
use std::path::PathBuf;
use vspc_backend_api::abi_stable::std_types::{ROption, RString, RVec, Tuple2};
use vspc_backend_api::ffi::BackendBox;
use vspc_backend_api::{OptionSpec, VmRecord};
use vspc_backends::builtin;

/// Why set-up failed: usage errors exit 2 with the usage, others exit 1.
#[derive(Debug)]
pub enum SetupError {
    Usage(String),
    Failed(String),
}

/// One backend, ready to configure.
pub struct Named {
    pub backend: BackendBox,
    pub specs: Vec<OptionSpec>,
    /// Where it came from: "built in" or the plugin's path.
    pub origin: String,
}

/// Turn `--backend` names into backends (built-ins first, then plugins).
pub fn resolve(names: &[String], dirs: &[PathBuf]) -> Result<Vec<Named>, SetupError> {
    let mut out: Vec<Named> = Vec::new();
    for name in names {
        let (backend, origin) = match builtin(name) {
            Some(b) => (b, "built in".to_string()),
            None => {
                let path = plugins::find(name, dirs).map_err(SetupError::Failed)?;
                let b = plugins::load(&path).map_err(SetupError::Failed)?;
                (b, path.display().to_string())
            }
        };
        let specs = backend.options().iter().map(OptionSpec::from).collect();
        if out.iter().any(|n| {
            n.backend
                .name()
                .as_str()
                .eq_ignore_ascii_case(backend.name().as_str())
        }) {
            return Err(SetupError::Usage(format!(
                "backend {} is named twice",
                backend.name()
            )));
        }
        out.push(Named {
            backend,
            specs,
            origin,
        });
    }
    Ok(out)
}

type Opts = Vec<(String, Option<String>)>;

/// Give each token to the backend that declared it. `-x V`, `-xV`,
/// `--long V` and `--long=V` all work for options with values.
pub fn route(tokens: &[String], backends: &[Named]) -> Result<Vec<Opts>, SetupError> {
    let mut out: Vec<Opts> = vec![Vec::new(); backends.len()];
    let names = || {
        backends
            .iter()
            .map(|b| b.backend.name().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut i = 0;
    while i < tokens.len() {
        let tok = &tokens[i];
        i += 1;
        let (key, inline): (Key, Option<String>) = if let Some(rest) = tok.strip_prefix("--") {
            match rest.split_once('=') {
                Some((k, v)) => (Key::Long(k.to_string()), Some(v.to_string())),
                None => (Key::Long(rest.to_string()), None),
            }
        } else if let Some(rest) = tok.strip_prefix('-').filter(|r| !r.is_empty()) {
            let mut chars = rest.chars();
            let c = chars.next().unwrap_or('-');
            let tail = chars.as_str();
            (Key::Short(c), (!tail.is_empty()).then(|| tail.to_string()))
        } else {
            return Err(SetupError::Usage(format!("unexpected argument '{tok}'")));
        };
        let owners: Vec<(usize, &OptionSpec)> = backends
            .iter()
            .enumerate()
            .filter_map(|(n, b)| b.specs.iter().find(|s| key.matches(s)).map(|s| (n, s)))
            .collect();
        let (idx, spec) = match owners.as_slice() {
            [] => {
                return Err(SetupError::Usage(format!(
                    "unknown option '{tok}': not a vspc flag nor an option of backend {} (see --backend NAME --backend-help)",
                    names()
                )))
            }
            [one] => *one,
            [(a, _), (b, _), ..] => {
                return Err(SetupError::Usage(format!(
                    "option '{tok}' belongs to both backend {} and backend {}; use --backend-args for one of them",
                    backends[*a].backend.name(),
                    backends[*b].backend.name()
                )))
            }
        };
        let value = match (&spec.value, inline) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(SetupError::Usage(format!(
                    "option --{} of backend {} takes no value (got '{tok}')",
                    spec.long,
                    backends[idx].backend.name()
                )))
            }
            (Some(_), Some(v)) => Some(v),
            (Some(meta), None) => match tokens.get(i) {
                Some(v) => {
                    i += 1;
                    Some(v.clone())
                }
                None => {
                    return Err(SetupError::Usage(format!(
                        "option '{tok}' of backend {} needs a value ({meta})",
                        backends[idx].backend.name()
                    )))
                }
            },
        };
        out[idx].push((spec.long.clone(), value));
    }
    Ok(out)
}

enum Key {
    Long(String),
    Short(char),
}

impl Key {
    fn matches(&self, s: &OptionSpec) -> bool {
        match self {
            Key::Long(l) => s.long == *l,
            Key::Short(c) => s.short == Some(*c),
        }
    }
}

/// Configure every backend with its options.
pub fn configure(backends: &mut [Named], opts: Vec<Opts>) -> Result<(), SetupError> {
    for (named, opts) in backends.iter_mut().zip(opts) {
        let ffi: RVec<Tuple2<RString, ROption<RString>>> = opts
            .into_iter()
            .map(|(k, v)| Tuple2(RString::from(k), v.map(RString::from).into()))
            .collect();
        if let Err(e) = named.backend.configure(ffi).into_result() {
            return Err(SetupError::Usage(format!(
                "backend {}: {e}",
                named.backend.name()
            )));
        }
    }
    Ok(())
}

/// The port map from the first backend that persists (empty if none does).
pub fn load_map(backends: &mut [Named]) -> Result<Vec<VmRecord>, SetupError> {
    for named in backends.iter_mut() {
        if named.backend.persists() {
            let name = named.backend.name();
            return match named.backend.load_map().into_result() {
                Ok(v) => {
                    let map: Vec<VmRecord> = v.iter().map(VmRecord::from).collect();
                    tracing::info!(backend = %name, vms = map.len(), "port map loaded");
                    Ok(map)
                }
                Err(e) => Err(SetupError::Failed(format!("backend {name}: {e}"))),
            };
        }
    }
    Ok(Vec::new())
}

/// `--backend NAME --backend-help`: what the backend is and its options.
pub fn help_text(n: &Named) -> String {
    let b = &n.backend;
    let mut out = format!("{} {} ({})\n", b.name(), b.version(), n.origin);
    let desc = b.description();
    if !desc.is_empty() {
        out.push_str(&format!("  {desc}\n"));
    }
    if n.specs.is_empty() {
        out.push_str("  (no options)\n");
    }
    for s in &n.specs {
        let mut flag = match s.short {
            Some(c) => format!("-{c}, --{}", s.long),
            None => format!("    --{}", s.long),
        };
        if let Some(v) = &s.value {
            flag.push(' ');
            flag.push_str(v);
        }
        let mut line = format!("  {flag:<28} {}", s.help);
        if let Some(d) = &s.default {
            line.push_str(&format!(" (default: {d})"));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `--backend-help` alone: the built-ins and the plugins found.
pub fn list_text(dirs: &[PathBuf]) -> String {
    let mut out = String::from("Built-in backends:\n");
    for name in vspc_backends::BUILTIN {
        if let Some(b) = builtin(name) {
            out.push_str(&format!("  {:<10} {}\n", b.name(), b.description()));
        }
    }
    let found = plugins::available(dirs);
    let shown: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    out.push_str(&format!("Plugins (searched: {}):\n", shown.join(", ")));
    if found.is_empty() {
        out.push_str("  none found\n");
    }
    for (name, path) in found {
        match plugins::load(&path) {
            Ok(b) => out.push_str(&format!(
                "  {:<10} {} ({})\n",
                name,
                b.description(),
                path.display()
            )),
            Err(e) => out.push_str(&format!("  {name:<10} cannot be loaded: {e}\n")),
        }
    }
    out.push_str("Options of one backend: vspc --backend NAME --backend-help\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(name: &str) -> Named {
        let backend = builtin(name).unwrap();
        let specs = backend.options().iter().map(OptionSpec::from).collect();
        Named {
            backend,
            specs,
            origin: "built in".into(),
        }
    }

    #[test]
    fn options_go_to_their_backend() {
        let bs = vec![named("File"), named("Logging")];
        let toks: Vec<String> = [
            "-l",
            "/d",
            "--prefix=p",
            "-m0640",
            "--file",
            "/f",
            "--context",
            "9",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let r = route(&toks, &bs).unwrap();
        assert_eq!(r[0], vec![("file".to_string(), Some("/f".to_string()))]);
        assert_eq!(
            r[1],
            vec![
                ("logdir".to_string(), Some("/d".to_string())),
                ("prefix".to_string(), Some("p".to_string())),
                ("mode".to_string(), Some("0640".to_string())),
                ("context".to_string(), Some("9".to_string())),
            ]
        );
    }

    #[test]
    fn bad_options_are_usage_errors() {
        let bs = vec![named("Logging")];
        let err =
            |t: &[&str]| match route(&t.iter().map(|s| s.to_string()).collect::<Vec<_>>(), &bs) {
                Err(SetupError::Usage(m)) => m,
                other => panic!("expected a usage error, got {:?}", other.map(|_| ())),
            };
        assert!(err(&["-z"]).contains("unknown option '-z'"));
        assert!(err(&["stray"]).contains("unexpected argument 'stray'"));
        assert!(err(&["-l"]).contains("needs a value"));
        // vSPC.py's form: --backend File --backend-args '-f PATH'.
        let file = vec![named("File")];
        let r = route(&["-f".into(), "/var/lib/vspc".into()], &file).unwrap();
        assert_eq!(
            r[0],
            vec![("file".to_string(), Some("/var/lib/vspc".to_string()))]
        );
        let mem = vec![named("Memory")];
        assert!(matches!(
            route(&["-l".into(), "x".into()], &mem),
            Err(SetupError::Usage(_))
        ));
    }

    #[test]
    fn help_lists_options() {
        let h = help_text(&named("Logging"));
        assert!(h.starts_with("Logging "), "{h}");
        assert!(
            h.contains("-l, --logdir DIR") && h.contains("default: /var/log/consoles"),
            "{h}"
        );
        let l = list_text(&[]);
        assert!(
            l.contains("Memory") && l.contains("File") && l.contains("Logging"),
            "{l}"
        );
    }
}
