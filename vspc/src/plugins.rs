//! Finding and loading backend plugins.
//!
//! `--backend NAME` that is not built in means `libvspc_backend_NAME.so`,
//! looked for in each `--plugin-dir`, then each directory of
//! `VSPC_PLUGIN_PATH` (colon-separated), then `/usr/local/lib/vspc` and
//! `/usr/lib/vspc`; a NAME containing `/` or ending in `.so` is a path.
//!
//! Loading uses `lib_header_from_path` + `init_root_module`, which checks the
//! plugin's `vspc-backend-api` version and type layout before anything is
//! called (and, unlike `RootModule::load_from_file`, does not cache one
//! module per process, so several plugins can be loaded). Failures become
//! one readable line naming the file and the cause.

use std::path::{Path, PathBuf};
use vspc_backend_api::abi_stable::library::{lib_header_from_path, LibraryError};
use vspc_backend_api::abi_stable::std_types::RStr;
use vspc_backend_api::ffi::{BackendBox, BackendModRef, Logger, API_VERSION};
use vspc_backend_api::log::Level;

/// Directories searched after `--plugin-dir` and `VSPC_PLUGIN_PATH`.
pub const DEFAULT_DIRS: &[&str] = &["/usr/local/lib/vspc", "/usr/lib/vspc"];

/// The file name a plugin called `name` has.
pub fn file_name(name: &str) -> String {
    format!(
        "{}vspc_backend_{name}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    )
}

/// Where plugins are looked for, in order.
pub fn search_dirs(cli: &[PathBuf], env_path: Option<&str>) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = cli.to_vec();
    if let Some(p) = env_path {
        dirs.extend(p.split(':').filter(|s| !s.is_empty()).map(PathBuf::from));
    }
    dirs.extend(DEFAULT_DIRS.iter().map(PathBuf::from));
    dirs
}

/// True if `name` names a file rather than a plugin.
pub fn is_path(name: &str) -> bool {
    name.contains('/') || name.ends_with(std::env::consts::DLL_SUFFIX)
}

/// The plugin file for `name`, or an error listing where it was looked for.
pub fn find(name: &str, dirs: &[PathBuf]) -> Result<PathBuf, String> {
    if is_path(name) {
        return Ok(PathBuf::from(name));
    }
    let candidates = [file_name(name), file_name(&name.to_ascii_lowercase())];
    for dir in dirs {
        for c in &candidates {
            let p = dir.join(c);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    let looked: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    Err(format!(
        "unknown backend '{name}': not built in ({}) and no {} in {} (add --plugin-dir DIR or set VSPC_PLUGIN_PATH)",
        vspc_backends::BUILTIN.join(", "),
        candidates[0],
        if looked.is_empty() { "no plugin directory".to_string() } else { looked.join(", ") }
    ))
}

/// Every plugin found in `dirs`: (name, path), first one of each name.
pub fn available(dirs: &[PathBuf]) -> Vec<(String, PathBuf)> {
    let prefix = format!("{}vspc_backend_", std::env::consts::DLL_PREFIX);
    let mut found: Vec<(String, PathBuf)> = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut here: Vec<(String, PathBuf)> = entries
            .flatten()
            .filter_map(|e| {
                let file = e.file_name().to_string_lossy().into_owned();
                let name = file
                    .strip_prefix(&prefix)?
                    .strip_suffix(std::env::consts::DLL_SUFFIX)?;
                Some((name.to_string(), e.path()))
            })
            .collect();
        here.sort();
        for (name, path) in here {
            if !found.iter().any(|(n, _)| *n == name) {
                found.push((name, path));
            }
        }
    }
    found
}

/// Load the plugin at `path` and make its backend.
pub fn load(path: &Path) -> Result<BackendBox, String> {
    let shown = path.display();
    let header = lib_header_from_path(path).map_err(|e| describe(path, e))?;
    let module = header
        .init_root_module::<BackendModRef>()
        .map_err(|e| describe(path, e))?;
    module.new()(Logger { log: host_log })
        .into_result()
        .map_err(|e| format!("plugin {shown} failed to start: {e}"))
}

/// One line for a load failure. abi_stable's layout reports run to hundreds
/// of lines; only their last line is kept.
fn describe(path: &Path, e: LibraryError) -> String {
    let shown = path.display();
    match e {
        LibraryError::OpenError { err, .. } => {
            format!("cannot load plugin {shown}: {}", last_line(&err.to_string()))
        }
        LibraryError::GetSymbolError { .. } => format!(
            "{shown} is not a vspc backend plugin (it exports no vspc_backend_api root module; build it with export_backend!)"
        ),
        LibraryError::IncompatibleVersionNumber { actual_version, .. } => format!(
            "plugin {shown} was built against vspc-backend-api {actual_version}, which this vspc (API {API_VERSION}) cannot load: rebuild the plugin against vspc-backend-api {API_VERSION}"
        ),
        LibraryError::InvalidAbiHeader(h) => format!(
            "plugin {shown} was built with an incompatible abi_stable ({h:?}): rebuild it against vspc-backend-api {API_VERSION}"
        ),
        LibraryError::AbiInstability(details) => format!(
            "plugin {shown} was built against an incompatible vspc-backend-api layout ({}): rebuild it against vspc-backend-api {API_VERSION}",
            last_line(&details.to_string())
        ),
        other => format!("cannot load plugin {shown}: {}", last_line(&other.to_string())),
    }
}

/// The last non-blank line of a (possibly very long) error text.
fn last_line(text: &str) -> String {
    text.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("no details")
        .to_string()
}

/// The log callback every backend gets: its lines go to our log.
pub extern "C" fn host_log(level: u8, msg: RStr<'_>) {
    let msg = msg.as_str();
    match Level::from_u8(level) {
        Level::Error => tracing::error!(target: "backend", "{msg}"),
        Level::Warn => tracing::warn!(target: "backend", "{msg}"),
        Level::Info => tracing::info!(target: "backend", "{msg}"),
        Level::Debug => tracing::debug!(target: "backend", "{msg}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_paths() {
        assert_eq!(file_name("jsonl"), "libvspc_backend_jsonl.so");
        assert!(is_path("./x.so") && is_path("/a/b") && !is_path("jsonl"));
        let dirs = search_dirs(&[PathBuf::from("/cli")], Some("/e1::/e2"));
        assert_eq!(
            dirs[..3],
            [
                PathBuf::from("/cli"),
                PathBuf::from("/e1"),
                PathBuf::from("/e2")
            ]
        );
        let err = find("nosuch", &[PathBuf::from("/nonexistent-dir")]).unwrap_err();
        assert!(
            err.contains("libvspc_backend_nosuch.so") && err.contains("/nonexistent-dir"),
            "{err}"
        );
    }

    #[test]
    fn loading_a_non_plugin_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("libvspc_backend_fake.so");
        std::fs::write(&p, b"not an ELF file").unwrap();
        let err = load(&p).err().unwrap_or_default();
        assert!(err.contains("libvspc_backend_fake.so"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        let err = load(&dir.path().join("missing.so"))
            .err()
            .unwrap_or_default();
        assert!(
            err.contains("missing.so") && err.lines().count() == 1,
            "{err}"
        );
    }
}
