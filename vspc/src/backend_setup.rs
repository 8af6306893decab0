//! From `--backend` names and leftover arguments to configured backends:
//! each name becomes a built-in or a loaded plugin (all as the same
//! stable-ABI object), each leftover argument goes to the backend that
//! declared that option, and the first backend that persists supplies the
//! port map.

use crate::argv::{OptKey, OptToken, OptValue};
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
    let mut it = tokens.iter();
    while let Some(tok) = it.next() {
        let opt = OptToken::parse(tok)
            .ok_or_else(|| SetupError::Usage(format!("unexpected argument '{tok}'")))?;
        let (idx, spec) = owner(tok, &opt.key, backends)?;
        let backend = backends[idx].backend.name();
        let value = match &spec.value {
            None if opt.inline.is_some() => {
                return Err(SetupError::Usage(format!(
                    "option --{} of backend {backend} takes no value (got '{tok}')",
                    spec.long
                )))
            }
            None => None,
            Some(meta) => match opt.value(&mut it) {
                OptValue::Inline(v) => Some(v),
                OptValue::Next(v) => Some(v.clone()),
                OptValue::Missing => {
                    return Err(SetupError::Usage(format!(
                        "option '{tok}' of backend {backend} needs a value ({meta})"
                    )))
                }
            },
        };
        out[idx].push((spec.long.clone(), value));
    }
    Ok(out)
}

/// The one backend that declared option `key` (written as `tok`), and its
/// declaration.
fn owner<'a>(
    tok: &str,
    key: &OptKey,
    backends: &'a [Named],
) -> Result<(usize, &'a OptionSpec), SetupError> {
    let owners: Vec<(usize, &OptionSpec)> = backends
        .iter()
        .enumerate()
        .filter_map(|(n, b)| {
            b.specs
                .iter()
                .find(|s| key.is(Some(&s.long), s.short))
                .map(|s| (n, s))
        })
        .collect();
    match owners.as_slice() {
        [] => Err(SetupError::Usage(format!(
            "unknown option '{tok}': not a vspc flag nor an option of backend {} (see --backend NAME --backend-help)",
            names(backends)
        ))),
        [one] => Ok(*one),
        [(a, _), (b, _), ..] => Err(SetupError::Usage(format!(
            "option '{tok}' belongs to both backend {} and backend {}; use --backend-args for one of them",
            backends[*a].backend.name(),
            backends[*b].backend.name()
        ))),
    }
}

/// The backends' names, comma-separated.
fn names(backends: &[Named]) -> String {
    let names: Vec<String> = backends
        .iter()
        .map(|b| b.backend.name().to_string())
        .collect();
    names.join(", ")
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
    fn flags_values_and_clashes() {
        let toks = |t: &[&str]| t.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut flagged = named("Memory");
        flagged.specs = vec![
            OptionSpec::flag("verbose", Some('v'), "talk"),
            OptionSpec::value("level", Some('L'), "N", "how much"),
        ];
        let bs = vec![flagged];
        // A flag takes no token after it; an empty inline value is a value.
        let r = route(&toks(&["-v", "--level=", "--verbose", "-L", "-v"]), &bs).unwrap();
        assert_eq!(
            r[0],
            vec![
                ("verbose".to_string(), None),
                ("level".to_string(), Some(String::new())),
                ("verbose".to_string(), None),
                ("level".to_string(), Some("-v".to_string())),
            ]
        );
        let err = |t: &[&str], bs: &[Named]| match route(&toks(t), bs) {
            Err(SetupError::Usage(m)) => m,
            other => panic!("expected a usage error, got {:?}", other.map(|_| ())),
        };
        assert_eq!(
            err(&["--verbose=yes"], &bs),
            "option --verbose of backend Memory takes no value (got '--verbose=yes')"
        );
        assert_eq!(
            err(&["-vx"], &bs),
            "option --verbose of backend Memory takes no value (got '-vx')"
        );
        assert_eq!(
            err(&["--level"], &bs),
            "option '--level' of backend Memory needs a value (N)"
        );
        assert_eq!(err(&["-"], &bs), "unexpected argument '-'");
        let two = vec![named("Logging"), named("File")];
        assert_eq!(
            err(&["--nope"], &two),
            "unknown option '--nope': not a vspc flag nor an option of backend Logging, File (see --backend NAME --backend-help)"
        );
        let mut clash = named("File");
        clash.specs = vec![OptionSpec::value("logdir", None, "DIR", "")];
        let both = vec![named("Logging"), clash];
        assert_eq!(
            err(&["--logdir=/x"], &both),
            "option '--logdir=/x' belongs to both backend Logging and backend File; use --backend-args for one of them"
        );
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
