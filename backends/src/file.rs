//! The File backend: vSPC.py's `--backend File` / `-f PATH`. It keeps the
//! uuid -> (name, port) map in one human-editable TOML file, so a VM keeps
//! its console port across VM reboots and daemon restarts.
//!
//! Hooks only change the map in memory and mark it dirty; [`Backend::idle`]
//! and [`Backend::shutdown`] write it, so a burst of events costs one write.
//! The store is never changed in place: the whole map goes to a temp file in
//! the same directory, which is synced, renamed over the store, and then the
//! directory is synced, so `kill -9` at any moment leaves either the old map
//! or the new one. A store that fails to load is never written.
//!
//! The format:
//!
//! ```toml
//! version = 1
//!
//! [[vm]]
//! uuid = "0123456789abcdef-fedcba9800000000"
//! name = "web01"
//! port = 50001
//! ```
//!
//! `port` is absent for a VM without a console port. Records are written
//! ordered by port (port-less ones last), then uuid, for stable diffs.
//!
//! **vSPC.py's store.** When `-f PREFIX` names vSPC.py's own store (a
//! `shelve`: PREFIX as a GNU dbm file, or PREFIX.dat and PREFIX.dir), the
//! map lives beside it in `PREFIX.vspc-map.toml`. The first start, when that
//! map does not exist yet, imports vSPC.py's records into it ([`crate::vspcpy`]);
//! later starts read only vspc's map. vSPC.py's files are only ever read.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use vspc_backend_api::{log, Backend, BackendError, OptionSpec, Options, VmRecord};

/// The store's name when `-f` names a directory.
const STORE_NAME: &str = "vspc-map.toml";

/// What follows vSPC.py's prefix in the name of vspc's map beside it.
pub const BESIDE_VSPCPY: &str = ".vspc-map.toml";

/// The format version this code reads and writes.
const FORMAT_VERSION: i64 = 1;

/// Whether the store has been read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum LoadState {
    #[default]
    NotLoaded,
    Loaded,
    /// The store could not be read or is corrupt: it must never be written.
    Failed,
}

/// Persists the port map in a TOML file (vSPC.py's File backend).
#[derive(Debug, Default)]
pub struct FileBackend {
    /// The store's absolute path, once configured.
    store: Option<PathBuf>,
    /// vSPC.py's store prefix, imported when `store` does not exist yet.
    import_from: Option<PathBuf>,
    /// A vSPC.py store beside an existing map at PREFIX, which is not
    /// imported (the map came first); said once at load.
    ignored_vspcpy: Option<crate::vspcpy::Found>,
    /// uuid -> (name, port).
    vms: BTreeMap<String, (String, Option<u16>)>,
    /// port -> uuid, so no port is written twice.
    ports: BTreeMap<u16, String>,
    state: LoadState,
    /// The map changed since the last successful write.
    dirty: bool,
    /// The last write error logged, so a lasting failure is not logged at
    /// error level after every burst.
    write_error: Option<String>,
    /// Whether the "changes are not saved" warning after a failed load was
    /// given.
    warned_unsaved: bool,
}

/// The file as read; anything else in it is an error.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredMap {
    #[allow(dead_code)]
    version: i64,
    #[serde(default)]
    vm: Vec<StoredVm>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredVm {
    uuid: String,
    name: String,
    port: Option<u16>,
}

impl FileBackend {
    /// Read the store into the map, replacing what the map held.
    fn load(&mut self) -> Result<Vec<VmRecord>, BackendError> {
        self.vms.clear();
        self.ports.clear();
        self.dirty = false;
        let store = match &self.store {
            Some(s) => s.clone(),
            None => {
                self.state = LoadState::Failed;
                return Err(missing_store());
            }
        };
        if let Some(found) = &self.ignored_vspcpy {
            log::warn(&format!(
                "a vSPC.py store ({}, {}) is beside vspc's port map {}; it is not imported \
                 because vspc's map exists: to import it instead, stop vspc, move {} away and \
                 start again",
                found.main.display(),
                found.format,
                store.display(),
                store.display()
            ));
        }
        let import = match &self.import_from {
            Some(prefix) if !store.exists() => Some(prefix.clone()),
            _ => None,
        };
        let imported = import.is_some();
        let records = match import {
            Some(prefix) => crate::vspcpy::read(&prefix).map(|got| {
                log::info(&format!(
                    "imported {} VMs from vSPC.py's {} store {}; vspc keeps its own map in {} \
                     from now on and leaves vSPC.py's files as they are",
                    got.records.len(),
                    got.format,
                    files_shown(&got.files),
                    store.display()
                ));
                got.records
            }),
            None => read_store(&store).map_err(|e| e.0),
        };
        let records = match records {
            Ok(r) => r,
            Err(e) => {
                self.state = LoadState::Failed;
                return Err(BackendError(e));
            }
        };
        for r in &records {
            self.vms.insert(r.uuid.clone(), (r.name.clone(), r.port));
            if let Some(p) = r.port {
                self.ports.insert(p, r.uuid.clone());
            }
        }
        self.state = LoadState::Loaded;
        remove_stale_temps(&store);
        if imported {
            // vspc's own map from the first start on, even with no VM event.
            self.dirty = true;
            self.flush();
        }
        Ok(records)
    }

    /// True if hooks may change the map: configured and loaded. Loads the
    /// store first if the daemon did not ask for it, so a write never drops
    /// records that were stored.
    fn ready(&mut self) -> bool {
        if self.store.is_none() {
            return false;
        }
        if self.state == LoadState::NotLoaded {
            if let Err(e) = self.load() {
                log::error(&e.0);
            }
        }
        if self.state == LoadState::Failed && !self.warned_unsaved {
            self.warned_unsaved = true;
            log::warn(&format!(
                "port map {} did not load, so vspc will not write it: port map changes \
                 are not saved until it is fixed and vspc restarted",
                self.store_display()
            ));
        }
        self.state == LoadState::Loaded
    }

    fn store_display(&self) -> String {
        match &self.store {
            Some(s) => s.display().to_string(),
            None => "(none)".into(),
        }
    }

    /// Insert or update one VM's record.
    fn upsert(&mut self, vm: &VmRecord) {
        if !self.ready() {
            return;
        }
        if vm.uuid.is_empty() {
            log::warn("File backend: ignoring a VM with an empty uuid");
            return;
        }
        let port = vm.port.filter(|&p| p != 0);
        if let Some(p) = port {
            let holder = self.ports.get(&p).filter(|h| **h != vm.uuid).cloned();
            if let Some(holder) = holder {
                // The daemon gave the port to another VM; a stale record
                // holding it would make the store unloadable.
                log::warn(&format!(
                    "port {p} now belongs to {}; dropping the stored record of {holder}",
                    vm.uuid
                ));
                self.remove(&holder);
            }
        }
        let new = (vm.name.clone(), port);
        if self.vms.get(&vm.uuid) == Some(&new) {
            return;
        }
        if let Some((_, Some(old_port))) = self.vms.insert(vm.uuid.clone(), new) {
            if Some(old_port) != port {
                self.ports.remove(&old_port);
            }
        }
        if let Some(p) = port {
            self.ports.insert(p, vm.uuid.clone());
        }
        self.dirty = true;
    }

    /// Drop one VM's record, if there is one.
    fn remove(&mut self, uuid: &str) {
        if let Some((_, port)) = self.vms.remove(uuid) {
            if let Some(p) = port {
                if self.ports.get(&p).map(String::as_str) == Some(uuid) {
                    self.ports.remove(&p);
                }
            }
            self.dirty = true;
        }
    }

    /// The whole map as the store's text.
    fn render(&self) -> String {
        render_rows(
            self.vms
                .iter()
                .map(|(uuid, (name, port))| (uuid, name, *port))
                .collect(),
        )
    }

    /// Write the map if it changed; a failure is logged and retried later.
    fn flush(&mut self) {
        if !self.dirty || self.state != LoadState::Loaded {
            return;
        }
        let Some(store) = self.store.clone() else {
            return;
        };
        match write_atomically(&store, self.render().as_bytes()) {
            Ok(()) => {
                self.dirty = false;
                if self.write_error.take().is_some() {
                    log::info(&format!("port map {} written again", store.display()));
                } else {
                    log::debug(&format!(
                        "wrote port map {} ({} VMs)",
                        store.display(),
                        self.vms.len()
                    ));
                }
            }
            Err(e) => {
                let msg = format!("cannot write port map {}: {e}; will retry", store.display());
                if self.write_error.as_deref() == Some(msg.as_str()) {
                    log::debug(&msg);
                } else {
                    log::error(&msg);
                }
                self.write_error = Some(msg);
            }
        }
    }
}

impl Backend for FileBackend {
    fn name(&self) -> &str {
        "File"
    }

    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn description(&self) -> &str {
        "stores the port map in a TOML file, so VMs keep their ports across restarts"
    }

    fn options(&self) -> Vec<OptionSpec> {
        // -f as in vSPC.py's `--backend File --backend-args '-f PATH'`; on
        // the command line vspc's own -f means the same.
        vec![OptionSpec::value(
            "file",
            Some('f'),
            "PATH",
            "where the port map is stored: a directory (the map is PATH/vspc-map.toml) or a file",
        )]
    }

    fn configure(&mut self, options: &Options) -> Result<(), BackendError> {
        let mut given: Option<&str> = None;
        let mut unknown = Vec::new();
        for (key, value) in options {
            match (key.as_str(), value) {
                ("file", Some(v)) => given = Some(v),
                ("file", None) => {
                    return Err(BackendError::new(
                        "backend File: --file needs a value: give -f PATH or --file PATH",
                    ))
                }
                _ => unknown.push(format!("--{key}")),
            }
        }
        if !unknown.is_empty() {
            return Err(BackendError(format!(
                "backend File takes no option {}; its only option is --file PATH",
                unknown.join(", ")
            )));
        }
        let given = match given {
            Some(g) if !g.is_empty() => g,
            _ => return Err(missing_store()),
        };
        let resolved = resolve(given)?;
        *self = FileBackend {
            store: Some(resolved.map),
            import_from: resolved.import_from,
            ignored_vspcpy: resolved.ignored_vspcpy,
            ..FileBackend::default()
        };
        Ok(())
    }

    fn persists(&self) -> bool {
        true
    }

    fn load_map(&mut self) -> Result<Vec<VmRecord>, BackendError> {
        self.load()
    }

    fn vm_connected(&mut self, vm: &VmRecord) {
        self.upsert(vm);
    }

    fn vm_renamed(&mut self, vm: &VmRecord, _old_name: &str) {
        self.upsert(vm);
    }

    /// The mapping is kept: the VM gets the same port when it comes back.
    fn vm_disconnected(&mut self, _vm: &VmRecord) {}

    fn vm_expired(&mut self, vm: &VmRecord) {
        if self.ready() {
            self.remove(&vm.uuid);
        }
    }

    fn idle(&mut self) {
        self.flush();
    }

    fn shutdown(&mut self) {
        self.flush();
        if self.dirty && self.state == LoadState::Loaded {
            log::error(&format!(
                "port map {} could not be written at shutdown: the latest changes are lost",
                self.store_display()
            ));
        }
    }
}

/// The map's text for these (uuid, name, port) rows.
fn render_rows(mut rows: Vec<(&String, &String, Option<u16>)>) -> String {
    rows.sort_by(|a, b| (a.2.is_none(), a.2, a.0).cmp(&(b.2.is_none(), b.2, b.0)));
    let mut out = String::with_capacity(64 + rows.len() * 96);
    out.push_str("# vspc port map: the console port of each VM, by uuid.\n");
    out.push_str("# vspc rewrites this file; edit it only while vspc is stopped.\n");
    out.push_str(&format!("version = {FORMAT_VERSION}\n"));
    for (uuid, name, port) in rows {
        out.push_str("\n[[vm]]\nuuid = ");
        push_toml_string(&mut out, uuid);
        out.push_str("\nname = ");
        push_toml_string(&mut out, name);
        out.push('\n');
        if let Some(p) = port {
            out.push_str(&format!("port = {p}\n"));
        }
    }
    out
}

/// The files of a vSPC.py store, for a log line.
fn files_shown(files: &[PathBuf]) -> String {
    let shown: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    shown.join(" and ")
}

fn missing_store() -> BackendError {
    BackendError::new("backend File needs a store: give -f PATH or --file PATH")
}

/// Where `-f PATH` keeps the map, and what it may import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// vspc's own map (absolute).
    pub map: PathBuf,
    /// vSPC.py's store prefix, imported while `map` does not exist.
    pub import_from: Option<PathBuf>,
    /// A vSPC.py store beside a map that already exists at PATH.
    pub ignored_vspcpy: Option<crate::vspcpy::Found>,
}

/// The map for `-f PATH`: `PATH/vspc-map.toml` if PATH is a directory;
/// `PATH.vspc-map.toml`, importing vSPC.py's store, if PATH is the prefix of
/// one (unless vspc's own map is already at PATH); else PATH itself, whose
/// directory must exist.
pub fn resolve(given: &str) -> Result<Resolved, BackendError> {
    let path = resolve_store(given)?;
    let plain = |ignored| Resolved {
        map: path.clone(),
        import_from: None,
        ignored_vspcpy: ignored,
    };
    if std::path::absolute(given).is_ok_and(|p| p.is_dir()) {
        return Ok(plain(None));
    }
    let Some(found) = crate::vspcpy::find(&path) else {
        return Ok(plain(None));
    };
    // The dbm.dumb, ndbm and .db formats leave PATH itself free: a file
    // there is vspc's map, from a run before this import existed.
    if found.main != path && path.exists() && !crate::vspcpy::is_dbm_file(&path) {
        return Ok(plain(Some(found)));
    }
    Ok(Resolved {
        map: crate::vspcpy::with_suffix(&path, BESIDE_VSPCPY),
        import_from: Some(path),
        ignored_vspcpy: None,
    })
}

/// Check the store `-f PATH` names without changing any file: vspc's map,
/// or the vSPC.py store it would import. Says what it found.
pub fn check(given: &str) -> Result<String, String> {
    let r = resolve(given).map_err(|e| e.0)?;
    if r.map.exists() {
        let records = read_store(&r.map).map_err(|e| e.0)?;
        return Ok(format!(
            "port map {}: {} VMs",
            r.map.display(),
            records.len()
        ));
    }
    if r.import_from.is_none() {
        return Ok(format!("port map {}: not made yet", r.map.display()));
    }
    let prefix = r.import_from.unwrap_or_default();
    let got = crate::vspcpy::read(&prefix)?;
    Ok(format!(
        "vSPC.py's {} store {}: {} VMs, to be imported into {} at the first start",
        got.format,
        files_shown(&got.files),
        got.records.len(),
        r.map.display()
    ))
}

/// Write `records` as a map at `path`, atomically (the `vspc import`
/// command's output).
pub fn write_map(path: &Path, records: &[VmRecord]) -> io::Result<()> {
    let rows = records.iter().map(|r| (&r.uuid, &r.name, r.port)).collect();
    write_atomically(path, render_rows(rows).as_bytes())
}

/// The store's path for `-f PATH`: `PATH/vspc-map.toml` if PATH is a
/// directory, else PATH itself, whose directory must exist.
fn resolve_store(given: &str) -> Result<PathBuf, BackendError> {
    // Absolute, so a later change of working directory (daemonising) does
    // not move the store.
    let path = std::path::absolute(given).map_err(|e| {
        BackendError(format!(
            "backend File: cannot use port map path {given}: {e}"
        ))
    })?;
    if path.is_dir() {
        return Ok(path.join(STORE_NAME));
    }
    if given.ends_with('/') {
        return Err(BackendError(format!(
            "backend File: directory {given} for the port map does not exist: create it or give another -f PATH"
        )));
    }
    let (Some(dir), Some(_)) = (path.parent(), path.file_name()) else {
        return Err(BackendError(format!(
            "backend File: {given} is neither a directory nor a file path: give another -f PATH"
        )));
    };
    if !dir.is_dir() {
        return Err(BackendError(format!(
            "backend File: directory {} for the port map {} does not exist: create it or give another -f PATH",
            dir.display(),
            path.display()
        )));
    }
    Ok(path)
}

/// The store's directory.
fn store_dir(store: &Path) -> &Path {
    match store.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// The prefix of this store's temp files; the pid follows it.
fn temp_prefix(store: &Path) -> String {
    let name = store
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| STORE_NAME.to_string());
    format!(".{name}.tmp-")
}

fn temp_path(store: &Path) -> PathBuf {
    store_dir(store).join(format!("{}{}", temp_prefix(store), std::process::id()))
}

/// Remove temp files a crashed earlier run left next to the store.
fn remove_stale_temps(store: &Path) {
    let prefix = temp_prefix(store);
    let dir = store_dir(store);
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            log::warn(&format!(
                "cannot look for stale temp files in {}: {e}",
                dir.display()
            ));
            return;
        }
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        let Some(pid) = name.strip_prefix(prefix.as_str()) else {
            continue;
        };
        if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let path = entry.path();
        match fs::remove_file(&path) {
            Ok(()) => log::info(&format!(
                "removed {}, left by an interrupted write of the port map",
                path.display()
            )),
            Err(e) => log::warn(&format!("cannot remove {}: {e}", path.display())),
        }
    }
}

/// Replace the store with `data` so that a crash at any moment leaves
/// either the old or the new content.
fn write_atomically(store: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = temp_path(store);
    let written = write_and_rename(&tmp, store, data);
    if written.is_err() {
        // Nothing useful is in it; the store itself was not touched.
        let _ = fs::remove_file(&tmp);
    }
    written?;
    File::open(store_dir(store))?.sync_all()
}

fn write_and_rename(tmp: &Path, store: &Path, data: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    fs::rename(tmp, store)
}

/// Read and check the store; a missing store is an empty map.
fn read_store(store: &Path) -> Result<Vec<VmRecord>, BackendError> {
    let untouched = |problem: String| {
        BackendError(format!(
            "port map {} {problem}: fix or move it away; vspc did not change it",
            store.display()
        ))
    };
    let bytes = match fs::read(store) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            log::info(&format!(
                "no port map at {} yet; starting empty",
                store.display()
            ));
            return Ok(Vec::new());
        }
        Err(e) => return Err(untouched(format!("cannot be read ({e})"))),
    };
    let text = String::from_utf8(bytes).map_err(|e| {
        untouched(format!(
            "is corrupt (not UTF-8 text: bad byte at offset {})",
            e.utf8_error().valid_up_to()
        ))
    })?;
    parse_map(&text).map_err(untouched)
}

/// The records of a store's text, or what is wrong with it (phrased to
/// follow "port map PATH").
fn parse_map(text: &str) -> Result<Vec<VmRecord>, String> {
    let corrupt = |e: toml::de::Error| {
        let msg = e.message().lines().map(str::trim).collect::<Vec<_>>();
        let msg = msg.join("; ");
        match e.span() {
            Some(span) => {
                let end = span.start.min(text.len());
                let line = text.as_bytes()[..end]
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count()
                    + 1;
                format!("is corrupt (line {line}: {msg})")
            }
            None => format!("is corrupt ({msg})"),
        }
    };
    let table: toml::Table = text.parse().map_err(corrupt)?;
    match table.get("version") {
        Some(toml::Value::Integer(FORMAT_VERSION)) => {}
        Some(toml::Value::Integer(v)) => {
            return Err(format!(
                "has format version {v}, but this vspc reads version {FORMAT_VERSION}"
            ))
        }
        Some(other) => {
            return Err(format!(
                "is corrupt (version is a {}, not the number {FORMAT_VERSION})",
                other.type_str()
            ))
        }
        None => return Err(format!("is corrupt (no `version = {FORMAT_VERSION}` line)")),
    }
    let stored: StoredMap = toml::from_str(text).map_err(corrupt)?;
    let mut uuids = BTreeMap::new();
    let mut ports = BTreeMap::new();
    let mut records = Vec::with_capacity(stored.vm.len());
    for (i, vm) in stored.vm.into_iter().enumerate() {
        let n = i + 1;
        if vm.uuid.is_empty() {
            return Err(format!("is corrupt ([[vm]] number {n} has an empty uuid)"));
        }
        if let Some(first) = uuids.insert(vm.uuid.clone(), n) {
            return Err(format!(
                "is corrupt (uuid {:?} is in [[vm]] number {first} and number {n})",
                vm.uuid
            ));
        }
        if let Some(p) = vm.port {
            if p == 0 {
                return Err(format!(
                    "is corrupt (uuid {:?} has port 0, which is not a port)",
                    vm.uuid
                ));
            }
            if let Some(other) = ports.insert(p, vm.uuid.clone()) {
                return Err(format!(
                    "is corrupt (port {p} is given to both {other:?} and {:?})",
                    vm.uuid
                ));
            }
        }
        records.push(VmRecord {
            uuid: vm.uuid,
            name: vm.name,
            port: vm.port,
        });
    }
    Ok(records)
}

/// Append `s` as a TOML basic string: quotes, backslashes and control
/// characters escaped, everything else as is.
fn push_toml_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use tempfile::TempDir;

    fn rec(uuid: &str, name: &str, port: Option<u16>) -> VmRecord {
        VmRecord {
            uuid: uuid.into(),
            name: name.into(),
            port,
        }
    }

    fn opts(path: &Path) -> Vec<(String, Option<String>)> {
        vec![("file".into(), Some(path.to_str().unwrap().into()))]
    }

    fn configured(path: &Path) -> Box<dyn Backend> {
        let mut b: Box<dyn Backend> = Box::new(FileBackend::default());
        b.configure(&opts(path)).unwrap();
        b
    }

    /// Names of leftover temp files in `dir`.
    fn temps(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect()
    }

    #[test]
    fn describes_itself() {
        let b: Box<dyn Backend> = Box::new(FileBackend::default());
        assert_eq!(b.name(), "File");
        assert_eq!(b.version(), env!("CARGO_PKG_VERSION"));
        assert!(!b.description().is_empty());
        assert!(b.persists());
        let o = b.options();
        assert_eq!(o.len(), 1);
        assert_eq!(o[0].long, "file");
        assert_eq!(o[0].short, Some('f'));
        assert_eq!(o[0].value.as_deref(), Some("PATH"));
        assert!(o[0].help.contains("PATH/vspc-map.toml"));
    }

    #[test]
    fn round_trip_through_a_new_backend() {
        let dir = TempDir::new().unwrap();
        let mut b = configured(dir.path());
        assert!(b.load_map().unwrap().is_empty());
        b.vm_connected(&rec("aaa", "alpha", Some(5001)));
        b.vm_connected(&rec("bbb", "beta", Some(5000)));
        b.vm_connected(&rec("ccc", "gamma", None));
        b.vm_renamed(&rec("bbb", "beta2", Some(5000)), "beta");
        b.vm_disconnected(&rec("ccc", "gamma", None));
        b.vm_expired(&rec("aaa", "alpha", Some(5001)));
        b.idle();

        let store = dir.path().join("vspc-map.toml");
        let text = fs::read_to_string(&store).unwrap();
        let table: toml::Table = text.parse().unwrap();
        assert_eq!(table["version"].as_integer(), Some(1));

        let mut again = configured(dir.path());
        assert_eq!(
            again.load_map().unwrap(),
            vec![rec("bbb", "beta2", Some(5000)), rec("ccc", "gamma", None)]
        );
        assert!(temps(dir.path()).is_empty());
    }

    #[test]
    fn records_are_ordered_by_port_then_uuid() {
        let dir = TempDir::new().unwrap();
        let mut b = configured(dir.path());
        b.load_map().unwrap();
        b.vm_connected(&rec("z", "z", None));
        b.vm_connected(&rec("c", "c", Some(7002)));
        b.vm_connected(&rec("y", "y", None));
        b.vm_connected(&rec("a", "a", Some(7003)));
        b.vm_connected(&rec("b", "b", Some(7001)));
        b.shutdown();
        let got = configured(dir.path()).load_map().unwrap();
        let uuids: Vec<&str> = got.iter().map(|r| r.uuid.as_str()).collect();
        assert_eq!(uuids, ["b", "c", "a", "y", "z"]);
    }

    #[test]
    fn a_reused_port_keeps_the_store_loadable() {
        let dir = TempDir::new().unwrap();
        let mut b = configured(dir.path());
        b.load_map().unwrap();
        b.vm_connected(&rec("old", "old", Some(6000)));
        b.vm_connected(&rec("new", "new", Some(6000)));
        b.vm_connected(&rec("mover", "m", Some(6001)));
        b.vm_connected(&rec("mover", "m", Some(6002)));
        b.vm_connected(&rec("other", "o", Some(6001)));
        b.idle();
        assert_eq!(
            configured(dir.path()).load_map().unwrap(),
            vec![
                rec("new", "new", Some(6000)),
                rec("other", "o", Some(6001)),
                rec("mover", "m", Some(6002)),
            ]
        );
    }

    #[test]
    fn directory_and_file_paths_both_work() {
        let dir = TempDir::new().unwrap();
        let mut b = configured(dir.path());
        b.load_map().unwrap();
        b.vm_connected(&rec("u1", "one", Some(1)));
        b.idle();
        assert!(dir.path().join("vspc-map.toml").is_file());

        let file = dir.path().join("custom.toml");
        let mut b = configured(&file);
        b.load_map().unwrap();
        b.vm_connected(&rec("u2", "two", Some(2)));
        b.idle();
        assert!(file.is_file());
        assert_eq!(
            configured(&file).load_map().unwrap(),
            vec![rec("u2", "two", Some(2))]
        );
        assert_eq!(
            configured(dir.path()).load_map().unwrap(),
            vec![rec("u1", "one", Some(1))]
        );
    }

    #[test]
    fn configure_errors() {
        let dir = TempDir::new().unwrap();
        let mut b: Box<dyn Backend> = Box::new(FileBackend::default());

        let err = b.configure(&[]).unwrap_err().to_string();
        assert!(err.contains("-f PATH"), "{err}");
        let err = b.load_map().unwrap_err().to_string();
        assert!(err.contains("needs a store"), "{err}");

        let missing = dir.path().join("nope");
        let err = b.configure(&opts(&missing.join("map.toml"))).unwrap_err();
        assert!(err.to_string().contains(missing.to_str().unwrap()), "{err}");

        let err = b
            .configure(&[("bogus".into(), Some("x".into())), ("x".into(), None)])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--bogus") && err.contains("--x"), "{err}");

        let err = b.configure(&[("file".into(), None)]).unwrap_err();
        assert!(err.to_string().contains("--file"), "{err}");

        let with_slash = format!("{}/", missing.display());
        let err = b.configure(&[("file".into(), Some(with_slash))]);
        assert!(err.is_err());
    }

    #[test]
    fn corrupt_store_is_reported_and_never_written() {
        let cases: &[(&str, &[u8], &str)] = &[
            ("garbage", b"\xff\xfe\x00\x01 garbage \x80", "UTF-8"),
            (
                "bad toml",
                b"version = 1\n\n[[vm]\nuuid = \"a\"\n",
                "line 3",
            ),
            (
                "duplicate port",
                b"version = 1\n[[vm]]\nuuid = \"a\"\nname = \"a\"\nport = 5000\n\
                  [[vm]]\nuuid = \"b\"\nname = \"b\"\nport = 5000\n",
                "port 5000",
            ),
            (
                "duplicate uuid",
                b"version = 1\n[[vm]]\nuuid = \"a\"\nname = \"a\"\nport = 1\n\
                  [[vm]]\nuuid = \"a\"\nname = \"b\"\nport = 2\n",
                "uuid \"a\"",
            ),
            ("wrong version", b"version = 2\n", "version 2"),
            (
                "no version",
                b"[[vm]]\nuuid = \"a\"\nname = \"a\"\n",
                "version",
            ),
            (
                "port 0",
                b"version = 1\n[[vm]]\nuuid = \"a\"\nname = \"a\"\nport = 0\n",
                "port 0",
            ),
            (
                "missing name",
                b"version = 1\n[[vm]]\nuuid = \"a\"\nport = 3\n",
                "name",
            ),
            (
                "port too big",
                b"version = 1\n[[vm]]\nuuid = \"a\"\nname = \"a\"\nport = 70000\n",
                "line 5",
            ),
            (
                "unknown key",
                b"version = 1\n[[vm]]\nuuid = \"a\"\nname = \"a\"\nprot = 3\n",
                "prot",
            ),
        ];
        for (what, bytes, hint) in cases {
            let dir = TempDir::new().unwrap();
            let store = dir.path().join("vspc-map.toml");
            fs::write(&store, bytes).unwrap();
            let mut b = configured(dir.path());
            let err = b.load_map().unwrap_err().to_string();
            assert!(err.contains(store.to_str().unwrap()), "{what}: {err}");
            assert!(err.contains("did not change it"), "{what}: {err}");
            assert!(err.contains(hint), "{what}: {err}");
            assert!(!err.contains('\n'), "{what}: {err}");

            b.vm_connected(&rec("x", "x", Some(9000)));
            b.vm_renamed(&rec("x", "y", Some(9000)), "x");
            b.vm_expired(&rec("a", "a", Some(5000)));
            b.idle();
            b.shutdown();
            assert_eq!(&fs::read(&store).unwrap(), bytes, "{what}");
            assert!(temps(dir.path()).is_empty(), "{what}");
        }
    }

    #[test]
    fn unreadable_store_is_an_error_naming_it() {
        let dir = TempDir::new().unwrap();
        let store = dir.path().join("vspc-map.toml");
        fs::create_dir(&store).unwrap();
        let mut b = configured(dir.path());
        let err = b.load_map().unwrap_err().to_string();
        assert!(err.contains(store.to_str().unwrap()), "{err}");
        b.vm_connected(&rec("x", "x", Some(1)));
        b.idle();
        assert!(store.is_dir());
        assert_eq!(fs::read_dir(&store).unwrap().count(), 0);
    }

    #[test]
    fn a_burst_is_written_once_at_idle() {
        let dir = TempDir::new().unwrap();
        let store = dir.path().join("vspc-map.toml");
        let mut b = configured(dir.path());
        b.load_map().unwrap();
        for i in 0..1000u16 {
            b.vm_connected(&rec(
                &format!("uuid-{i:04}"),
                &format!("vm{i}"),
                Some(10000 + i),
            ));
        }
        assert!(!store.exists(), "written before idle()");
        assert!(temps(dir.path()).is_empty());
        b.idle();
        assert!(temps(dir.path()).is_empty());
        let text = fs::read_to_string(&store).unwrap();
        assert_eq!(text.matches("[[vm]]").count(), 1000);

        // Nothing changed: idle() and shutdown() leave the same file.
        use std::os::unix::fs::MetadataExt;
        let before = fs::metadata(&store).unwrap().ino();
        b.idle();
        b.vm_connected(&rec("uuid-0000", "vm0", Some(10000)));
        b.idle();
        b.shutdown();
        assert_eq!(fs::metadata(&store).unwrap().ino(), before);
        assert_eq!(fs::read_to_string(&store).unwrap(), text);
        assert_eq!(configured(dir.path()).load_map().unwrap().len(), 1000);
    }

    #[test]
    fn a_failed_write_is_retried_at_the_next_idle() {
        let top = TempDir::new().unwrap();
        let dir = top.path().join("state");
        fs::create_dir(&dir).unwrap();
        let mut b = configured(&dir);
        b.load_map().unwrap();
        b.vm_connected(&rec("u", "n", Some(4000)));
        fs::remove_dir(&dir).unwrap();
        b.idle();
        fs::create_dir(&dir).unwrap();
        b.idle();
        assert_eq!(
            configured(&dir).load_map().unwrap(),
            vec![rec("u", "n", Some(4000))]
        );
    }

    #[test]
    fn stale_temp_file_is_removed_on_load() {
        let dir = TempDir::new().unwrap();
        let store = dir.path().join("vspc-map.toml");
        let mut b = configured(dir.path());
        b.load_map().unwrap();
        b.vm_connected(&rec("u", "n", Some(4000)));
        b.shutdown();
        let good = fs::read(&store).unwrap();

        let stale = dir.path().join(".vspc-map.toml.tmp-99999");
        fs::write(&stale, b"version = 1\n[[vm]]\nuuid = \"half").unwrap();
        let unrelated = dir.path().join(".vspc-map.toml.tmp-notes");
        fs::write(&unrelated, b"keep").unwrap();

        let mut b = configured(dir.path());
        assert_eq!(b.load_map().unwrap(), vec![rec("u", "n", Some(4000))]);
        assert!(!stale.exists());
        assert!(unrelated.exists());
        assert_eq!(fs::read(&store).unwrap(), good);
    }

    #[test]
    fn awkward_names_round_trip() {
        let names = [
            "He said \"hi\" and 'bye'",
            "line one\nline two\r\nthree\rfour",
            "tab\there, back\\slash, \\n not a newline",
            "ünïcødé 日本語 🚀",
            "a/b/../../etc/passwd",
            "ctl \u{0}\u{1}\u{8}\u{c}\u{1b}\u{7f}\u{85} end",
            "\"\"\" ''' [[vm]] = #",
            "",
        ];
        let dir = TempDir::new().unwrap();
        let mut b = configured(dir.path());
        b.load_map().unwrap();
        let want: Vec<VmRecord> = names
            .iter()
            .enumerate()
            .map(|(i, n)| rec(&format!("u{i}"), n, Some(3000 + i as u16)))
            .collect();
        for r in &want {
            b.vm_connected(r);
        }
        b.idle();
        assert_eq!(configured(dir.path()).load_map().unwrap(), want);
    }

    #[test]
    fn hooks_before_load_map_keep_stored_records() {
        let dir = TempDir::new().unwrap();
        let mut b = configured(dir.path());
        b.load_map().unwrap();
        b.vm_connected(&rec("kept", "k", Some(1)));
        b.idle();

        let mut b = configured(dir.path());
        b.vm_connected(&rec("added", "a", Some(2)));
        b.idle();
        assert_eq!(
            configured(dir.path()).load_map().unwrap(),
            vec![rec("kept", "k", Some(1)), rec("added", "a", Some(2))]
        );
    }

    /// Every file in `dir` with its bytes.
    fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    fs::read(e.path()).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn a_vspc_py_store_is_imported_once_and_never_written() {
        use crate::vspcpy::tests::{json, make, python_has, sample};
        for format in ["gnu", "dumb"] {
            if !python_has(&format!("dbm.{format}")) {
                continue;
            }
            let dir = TempDir::new().unwrap();
            let prefix = dir.path().join("vspc");
            make(format, &prefix, None, &json(&sample()));
            let before = snapshot(dir.path());

            let mut b = configured(&prefix);
            assert_eq!(b.load_map().unwrap(), sample(), "{format}");
            // vspc's own map is written at once, beside vSPC.py's files,
            // which are as they were.
            let map = dir.path().join("vspc.vspc-map.toml");
            let mut after = snapshot(dir.path());
            assert!(after.remove("vspc.vspc-map.toml").is_some(), "{format}");
            assert_eq!(after, before, "{format}");
            b.vm_connected(&rec("new", "new", Some(40000)));
            b.shutdown();

            // From now on the map is read, not the vSPC.py store.
            make(format, &prefix, None, r#"[["late", "late", 1]]"#);
            let mut again = configured(&prefix);
            let got = again.load_map().unwrap();
            assert_eq!(got.len(), sample().len() + 1, "{format}: {got:?}");
            assert!(got.iter().all(|r| r.uuid != "late"), "{format}");
            assert!(map.is_file());
        }
    }

    #[test]
    fn a_broken_vspc_py_store_stops_the_import_and_nothing_is_written() {
        use crate::vspcpy::tests::{make, python_has};
        if !python_has("dbm.gnu") {
            return;
        }
        let dir = TempDir::new().unwrap();
        let prefix = dir.path().join("vspc");
        make("gnu", &prefix, None, r#"[{"raw": ["7531", "80045d942e"]}]"#);
        let before = snapshot(dir.path());
        let mut b = configured(&prefix);
        let err = b.load_map().unwrap_err().to_string();
        assert!(err.contains(prefix.to_str().unwrap()), "{err}");
        assert!(
            err.contains("dbm.gnu") && err.contains("not vSPC.py's dict"),
            "{err}"
        );
        b.vm_connected(&rec("x", "x", Some(9000)));
        b.idle();
        b.shutdown();
        assert_eq!(snapshot(dir.path()), before);
    }

    #[test]
    fn a_map_already_at_the_prefix_wins_over_a_dumb_store_beside_it() {
        use crate::vspcpy::tests::{json, make, python_has, sample};
        if !python_has("dbm.dumb") {
            return;
        }
        let dir = TempDir::new().unwrap();
        let prefix = dir.path().join("vspc");
        // An earlier vspc ran with -f PREFIX and wrote its map there.
        let mut b = configured(&prefix);
        b.load_map().unwrap();
        b.vm_connected(&rec("mine", "mine", Some(7000)));
        b.shutdown();
        make("dumb", &prefix, None, &json(&sample()));
        let r = resolve(prefix.to_str().unwrap()).unwrap();
        assert_eq!(r.map, prefix);
        assert!(r.import_from.is_none());
        assert_eq!(
            r.ignored_vspcpy.map(|f| f.format),
            Some(crate::vspcpy::Format::Dumb)
        );
        assert_eq!(
            configured(&prefix).load_map().unwrap(),
            vec![rec("mine", "mine", Some(7000))]
        );
        assert!(!dir.path().join("vspc.vspc-map.toml").exists());
        // A directory never imports.
        let r = resolve(dir.path().to_str().unwrap()).unwrap();
        assert_eq!(r.map, dir.path().join("vspc-map.toml"));
    }

    #[test]
    fn check_reads_and_never_writes() {
        use crate::vspcpy::tests::{json, make, python_has, sample};
        let dir = TempDir::new().unwrap();
        let prefix = dir.path().join("vspc");
        let said = check(prefix.to_str().unwrap()).unwrap();
        assert!(said.contains("not made yet"), "{said}");
        if python_has("dbm.gnu") {
            make("gnu", &prefix, None, &json(&sample()));
            let before = snapshot(dir.path());
            let said = check(prefix.to_str().unwrap()).unwrap();
            assert!(said.contains("5 VMs") && said.contains("dbm.gnu"), "{said}");
            assert_eq!(snapshot(dir.path()), before);
        }
        fs::write(dir.path().join("map.toml"), "version = 7\n").unwrap();
        let err = check(dir.path().join("map.toml").to_str().unwrap()).unwrap_err();
        assert!(err.contains("version 7"), "{err}");
    }
}
