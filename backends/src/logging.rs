//! The Logging backend: vSPC.py's per-VM console transcripts.
//!
//! Every byte a VM writes to its serial port is appended, exactly as sent, to
//! `DIR/NAME.log` (or `DIR/PREFIX-NAME.log`), and the last `--context` bytes
//! of each VM are kept in memory and shown to every new console first.
//!
//! File names come from VM names, which are untrusted text from ESXi. They
//! are sanitised (see [`sanitize_name`]) so that a transcript always lies
//! directly inside DIR and is never a hidden file. Sanitising is lossy: two
//! different VM names may map to the same file name (`a/b` and `a_b` both
//! become `a_b.log`), and two VMs (two uuids) may have the same name. Two
//! uuids never share a transcript: the first keeps the file, a later one
//! writes `NAME.UUID.log` (logged), so a VM that claims another's name
//! never writes into its transcript.
//!
//! The transcript is the record people read after an incident, so this
//! backend says it needs every byte ([`Backend::needs_every_byte`]): the
//! daemon never drops output for it, and pauses the VMs that write while it
//! is behind. Open transcripts are kept per VM (keyed by uuid) behind a
//! buffer that batches small writes into one (up to [`BATCH`] bytes; larger
//! output goes straight to the file). The buffer is written whenever the
//! daemon's queue runs dry ([`Backend::idle`]), before a file is rotated,
//! reopened or closed, and at shutdown; it is freed when written, so an
//! idle VM holds no buffer. `reopen` (SIGHUP) closes
//! every transcript so the next write opens the path afresh, which is what
//! logrotate's rename-then-HUP expects. With `--max-log-size`, a transcript
//! that would grow past the limit is renamed to `NAME.log.1` (replacing an
//! older one) and a new file is started.
//!
//! Write errors (disk full, directory removed) are logged once per file
//! until a flush to that file succeeds again; they never stop the daemon.
//!
//! The HTTP API's `/console_log` asks [`Backend::console_log`]: the VM's
//! buffer is written first, then the last bytes of its current transcript
//! file are read back (a rotated `NAME.log.1` is not included).

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use vspc_backend_api::log;
use vspc_backend_api::{Backend, BackendError, OptionSpec, Options, VmRecord};

const DEFAULT_LOGDIR: &str = "/var/log/consoles";
const DEFAULT_MODE: u32 = 0o600;
const DEFAULT_CONTEXT: usize = 200;
/// Mode of a log directory this backend creates.
const DIR_MODE: u32 = 0o755;
/// Longest sanitised VM name, in bytes (ASCII after sanitising).
const MAX_NAME_BYTES: usize = 200;
/// Longest prefix, so `PREFIX-NAME.log.1` stays within the usual 255-byte
/// file-name limit.
const MAX_PREFIX_BYTES: usize = 40;
/// Largest `--context` accepted (per VM, held in memory).
const MAX_CONTEXT: u64 = 16 << 20;
/// Output collected per transcript before it is written in one call.
const BATCH: usize = 64 * 1024;

/// Writes per-VM console transcripts and keeps recent context for new
/// consoles.
#[derive(Debug, Default)]
pub struct LoggingBackend {
    config: Config,
    vms: HashMap<String, VmLog>,
    errors: Errors,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Config {
    logdir: PathBuf,
    prefix: String,
    mode: u32,
    context: usize,
    max_log_size: Option<u64>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            logdir: PathBuf::from(DEFAULT_LOGDIR),
            prefix: String::new(),
            mode: DEFAULT_MODE,
            context: DEFAULT_CONTEXT,
            max_log_size: None,
        }
    }
}

impl Config {
    /// The transcript path of a VM named `name`: always directly in logdir.
    fn path_for(&self, name: &str) -> PathBuf {
        let clean = sanitize_name(name);
        let file = if self.prefix.is_empty() {
            format!("{clean}.log")
        } else {
            format!("{}-{clean}.log", self.prefix)
        };
        self.logdir.join(file)
    }
}

/// One VM: its current name, the name its transcript is filed under, its
/// open transcript and its recent output.
#[derive(Debug, Default)]
struct VmLog {
    name: String,
    /// The VM's name, or, when another VM (another uuid) already writes a
    /// transcript under that name, the name followed by `.` and its uuid:
    /// two VMs never share a transcript, whatever a second one claims.
    file: String,
    out: Option<Transcript>,
    context: VecDeque<u8>,
}

/// An open transcript file.
#[derive(Debug)]
struct Transcript {
    path: PathBuf,
    file: File,
    /// Bytes in the file: its length at open plus what was handed to us
    /// since (written or in `buf`).
    size: u64,
    /// Output not yet written to the file.
    buf: Vec<u8>,
}

impl Transcript {
    /// Append `data`: collected while small, written at once when large.
    fn append(&mut self, data: &[u8]) -> io::Result<()> {
        if self.buf.len() + data.len() > BATCH {
            self.write_buf()?;
        }
        if data.len() >= BATCH {
            self.file.write_all(data)?;
        } else {
            if self.buf.capacity() == 0 {
                self.buf.reserve(data.len().clamp(4096, BATCH));
            }
            self.buf.extend_from_slice(data);
        }
        self.size += data.len() as u64;
        Ok(())
    }

    /// Write what is collected; the buffer is freed.
    fn write_buf(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let result = self.file.write_all(&self.buf);
        self.buf = Vec::new();
        result
    }
}

/// Which files have a logged error, so each is reported once until a flush
/// to it succeeds again.
#[derive(Debug, Default)]
struct Errors {
    failing: HashSet<PathBuf>,
    logged: u64,
}

impl Errors {
    fn report(&mut self, path: &Path, what: &str, err: &io::Error) {
        if self.failing.insert(path.to_path_buf()) {
            self.logged += 1;
            log::error(&format!(
                "Logging backend: cannot {what} {}: {err} (further errors for this file are \
                 not logged until a write succeeds)",
                path.display()
            ));
        }
    }

    fn succeeded(&mut self, path: &Path) {
        if !self.failing.is_empty() && self.failing.remove(path) {
            log::info(&format!(
                "Logging backend: writing {} works again",
                path.display()
            ));
        }
    }
}

/// A VM name made safe as a file-name stem: every char outside
/// `[A-Za-z0-9._-]` (including all non-ASCII) becomes `_`, leading dots
/// become `_` (no hidden files), an empty or all-dots name becomes `_`, and
/// the result is at most [`MAX_NAME_BYTES`] bytes. Distinct names can map to
/// the same stem.
fn sanitize_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .take(MAX_NAME_BYTES)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.bytes().all(|b| b == b'.') {
        return "_".to_string();
    }
    let dots = out.bytes().take_while(|&b| b == b'.').count();
    out.replace_range(..dots, &"_".repeat(dots));
    out
}

/// A file mode in octal: `0600`, `600` and `0o600` are all octal 600.
fn parse_mode(text: &str) -> Option<u32> {
    let t = text.trim();
    let digits = t
        .strip_prefix("0o")
        .or_else(|| t.strip_prefix("0O"))
        .unwrap_or(t);
    if digits.is_empty() || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return None;
    }
    let mode = u32::from_str_radix(digits, 8).ok()?;
    (mode <= 0o7777).then_some(mode)
}

/// A byte count: a plain number or one with a `K`, `M` or `G` suffix
/// (powers of 1024, either case).
fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let (digits, unit) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let unit = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return None,
            };
            (&t[..i], unit)
        }
        _ => (t, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(unit)
}

fn needs_value<'a>(key: &str, value: &'a Option<String>) -> Result<&'a str, BackendError> {
    value
        .as_deref()
        .ok_or_else(|| BackendError::new(format!("Logging backend: --{key} needs a value")))
}

/// Make sure `dir` is a directory, creating it (mode 0755) if missing.
fn ensure_dir(dir: &Path) -> Result<(), BackendError> {
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(BackendError::new(format!(
            "Logging backend: --logdir {} is not a directory; give a directory for the \
             console logs",
            dir.display()
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(dir)
                .and_then(|()| fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE)))
                .map_err(|e| {
                    BackendError::new(format!(
                        "Logging backend: cannot create --logdir {}: {e}",
                        dir.display()
                    ))
                })?;
            log::info(&format!(
                "Logging backend: created log directory {}",
                dir.display()
            ));
            Ok(())
        }
        Err(e) => Err(BackendError::new(format!(
            "Logging backend: cannot use --logdir {}: {e}",
            dir.display()
        ))),
    }
}

/// Open `path` for appending, creating it with exactly `mode`.
fn open_transcript(path: &Path, mode: u32) -> io::Result<Transcript> {
    let mut opts = OpenOptions::new();
    opts.append(true).mode(mode);
    let file = match opts.clone().create_new(true).open(path) {
        Ok(file) => {
            // The umask may have cleared bits of the requested mode.
            file.set_permissions(fs::Permissions::from_mode(mode))?;
            file
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            // Refuse FIFOs, devices and directories: opening a FIFO would
            // block this thread forever.
            if !fs::metadata(path)?.is_file() {
                return Err(io::Error::other("exists and is not a regular file"));
            }
            opts.open(path)?
        }
        Err(e) => return Err(e),
    };
    let size = file.metadata()?.len();
    Ok(Transcript {
        path: path.to_path_buf(),
        file,
        size,
        buf: Vec::new(),
    })
}

/// Flush a transcript if it has unflushed bytes; on failure it is dropped so
/// the next write reopens it by path.
fn flush(out: &mut Option<Transcript>, errors: &mut Errors) {
    let Some(t) = out.as_mut() else { return };
    if t.buf.is_empty() {
        return;
    }
    match t.write_buf() {
        Ok(()) => {
            errors.succeeded(&t.path);
        }
        Err(e) => {
            errors.report(&t.path, "write", &e);
            *out = None;
        }
    }
}

/// The last `max` bytes of the file at `path`.
fn read_tail(path: &Path, max: usize) -> io::Result<Vec<u8>> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    let start = len.saturating_sub(max as u64);
    f.seek(SeekFrom::Start(start))?;
    let mut out = Vec::with_capacity((len - start) as usize);
    f.take(max as u64).read_to_end(&mut out)?;
    Ok(out)
}

/// Flush and close a transcript.
fn close(out: &mut Option<Transcript>, errors: &mut Errors) {
    flush(out, errors);
    *out = None;
}

/// Keep the last `cap` bytes of output.
fn push_context(ctx: &mut VecDeque<u8>, cap: usize, data: &[u8]) {
    if data.len() >= cap {
        ctx.clear();
        ctx.extend(&data[data.len() - cap..]);
        return;
    }
    let excess = (ctx.len() + data.len()).saturating_sub(cap);
    ctx.drain(..excess);
    ctx.extend(data);
}

/// Rotate the open transcript: flush and close it, then rename it to
/// `NAME.log.1`, replacing an older one.
fn rotate(out: &mut Option<Transcript>, errors: &mut Errors) {
    let Some(path) = out.as_ref().map(|t| t.path.clone()) else {
        return;
    };
    close(out, errors);
    let mut rotated = path.clone().into_os_string();
    rotated.push(".1");
    let rotated = PathBuf::from(rotated);
    match fs::rename(&path, &rotated) {
        Ok(()) => log::info(&format!(
            "Logging backend: rotated {} to {}",
            path.display(),
            rotated.display()
        )),
        // Moved away already (logrotate without a SIGHUP yet): start anew.
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => errors.report(&path, "rotate", &e),
    }
}

/// Append `data` to the VM's transcript, opening or rotating it as needed.
fn write_transcript(vm: &mut VmLog, config: &Config, errors: &mut Errors, data: &[u8]) {
    let len = data.len() as u64;
    if vm.out.is_none() {
        vm.out = open_or_report(&vm.file, config, errors);
    }
    if let (Some(max), Some(t)) = (config.max_log_size, vm.out.as_ref()) {
        if t.size > 0 && t.size.saturating_add(len) > max {
            rotate(&mut vm.out, errors);
            vm.out = open_or_report(&vm.file, config, errors);
        }
    }
    let Some(t) = vm.out.as_mut() else { return };
    match t.append(data) {
        Ok(()) => {}
        Err(e) => {
            errors.report(&t.path, "write", &e);
            vm.out = None;
        }
    }
}

fn open_or_report(name: &str, config: &Config, errors: &mut Errors) -> Option<Transcript> {
    let path = config.path_for(name);
    match open_transcript(&path, config.mode) {
        Ok(t) => Some(t),
        Err(e) => {
            errors.report(&path, "open", &e);
            None
        }
    }
}

impl LoggingBackend {
    /// Start tracking the VM on first sight; a changed name closes its
    /// transcript so the next write goes to the new name's file.
    fn track(&mut self, vm: &VmRecord) {
        if self
            .vms
            .get(&vm.uuid)
            .is_some_and(|entry| entry.name == vm.name)
        {
            return;
        }
        let file = self.file_for(vm);
        match self.vms.get_mut(&vm.uuid) {
            Some(entry) => {
                close(&mut entry.out, &mut self.errors);
                entry.name.clone_from(&vm.name);
                entry.file = file;
            }
            None => {
                let entry = VmLog {
                    name: vm.name.clone(),
                    file,
                    ..VmLog::default()
                };
                self.vms.insert(vm.uuid.clone(), entry);
            }
        }
    }

    /// The name `vm`'s transcript is filed under: its own, unless another
    /// uuid's transcript already has that file.
    fn file_for(&self, vm: &VmRecord) -> String {
        let path = self.config.path_for(&vm.name);
        let taken = self
            .vms
            .iter()
            .any(|(uuid, other)| *uuid != vm.uuid && self.config.path_for(&other.file) == path);
        if !taken {
            return vm.name.clone();
        }
        let file = format!("{}.{}", vm.name, vm.uuid);
        log::warn(&format!(
            "Logging backend: another VM already writes {}; the VM {:?} with uuid {} writes {} \
             instead (two VMs with one name)",
            path.display(),
            vm.name,
            vm.uuid,
            self.config.path_for(&file).display()
        ));
        file
    }

    fn close_all(&mut self) {
        for vm in self.vms.values_mut() {
            close(&mut vm.out, &mut self.errors);
        }
    }

    #[cfg(test)]
    fn errors_logged(&self) -> u64 {
        self.errors.logged
    }
}

impl Backend for LoggingBackend {
    fn name(&self) -> &str {
        "Logging"
    }

    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn description(&self) -> &str {
        "writes each VM's console output to DIR/NAME.log and shows new consoles the recent output"
    }

    fn options(&self) -> Vec<OptionSpec> {
        vec![
            OptionSpec::value(
                "logdir",
                Some('l'),
                "DIR",
                "directory for the console transcripts (created if missing)",
            )
            .with_default(DEFAULT_LOGDIR),
            OptionSpec::value(
                "prefix",
                Some('p'),
                "PREFIX",
                "transcripts are named PREFIX-NAME.log instead of NAME.log",
            ),
            OptionSpec::value(
                "mode",
                Some('m'),
                "MODE",
                "octal permissions of new transcripts",
            )
            .with_default("0600"),
            OptionSpec::value(
                "context",
                None,
                "N",
                "bytes of recent output kept per VM and shown to each new console first",
            )
            .with_default(&DEFAULT_CONTEXT.to_string()),
            OptionSpec::value(
                "max-log-size",
                None,
                "BYTES",
                "rotate a transcript to NAME.log.1 before it grows past BYTES (K, M, G \
                 suffixes allowed)",
            ),
        ]
    }

    fn configure(&mut self, options: &Options) -> Result<(), BackendError> {
        let mut config = Config::default();
        for (key, value) in options {
            match key.as_str() {
                "logdir" => {
                    let v = needs_value(key, value)?;
                    if v.is_empty() {
                        return Err(BackendError::new(
                            "Logging backend: --logdir is empty; give a directory",
                        ));
                    }
                    config.logdir = PathBuf::from(v);
                }
                "prefix" => {
                    let v = needs_value(key, value)?;
                    if v.contains('/') || v.chars().any(char::is_control) {
                        return Err(BackendError::new(format!(
                            "Logging backend: --prefix {v:?} may not contain '/' or control \
                             characters"
                        )));
                    }
                    if v.len() > MAX_PREFIX_BYTES {
                        return Err(BackendError::new(format!(
                            "Logging backend: --prefix {v:?} is longer than {MAX_PREFIX_BYTES} \
                             bytes"
                        )));
                    }
                    config.prefix = v.to_string();
                }
                "mode" => {
                    let v = needs_value(key, value)?;
                    config.mode = parse_mode(v).ok_or_else(|| {
                        BackendError::new(format!(
                            "Logging backend: --mode {v:?} is not an octal file mode of at \
                             most 7777 (e.g. 0600, 640 or 0o644)"
                        ))
                    })?;
                }
                "context" => {
                    let v = needs_value(key, value)?;
                    config.context = parse_size(v)
                        .filter(|&n| n <= MAX_CONTEXT)
                        .and_then(|n| usize::try_from(n).ok())
                        .ok_or_else(|| {
                            BackendError::new(format!(
                                "Logging backend: --context {v:?} is not a byte count from 0 \
                                 to {MAX_CONTEXT} (e.g. 200 or 4K)"
                            ))
                        })?;
                }
                "max-log-size" => {
                    let v = needs_value(key, value)?;
                    let size = parse_size(v).filter(|&n| n > 0).ok_or_else(|| {
                        BackendError::new(format!(
                            "Logging backend: --max-log-size {v:?} is not a positive byte \
                             count (e.g. 1048576, 512K, 10M or 1G)"
                        ))
                    })?;
                    config.max_log_size = Some(size);
                }
                other => {
                    return Err(BackendError::new(format!(
                        "backend Logging takes no option --{other}"
                    )))
                }
            }
        }
        ensure_dir(&config.logdir)?;
        // New names, modes or limits apply from the next write on.
        self.close_all();
        for vm in self.vms.values_mut() {
            let excess = vm.context.len().saturating_sub(config.context);
            vm.context.drain(..excess);
        }
        self.config = config;
        Ok(())
    }

    fn wants_console_data(&self) -> bool {
        true
    }

    fn needs_every_byte(&self) -> bool {
        true
    }

    fn vm_connected(&mut self, vm: &VmRecord) {
        self.track(vm);
    }

    fn vm_renamed(&mut self, vm: &VmRecord, old_name: &str) {
        self.track(vm);
        let file = self.vms.get(&vm.uuid).map_or(&vm.name, |e| &e.file);
        let new_path = self.config.path_for(file);
        log::debug(&format!(
            "Logging backend: {} renamed from {old_name:?} to {:?}; console log now {}",
            vm.uuid,
            vm.name,
            new_path.display()
        ));
    }

    fn vm_disconnected(&mut self, vm: &VmRecord) {
        // Keep the transcript and the context; just make the output durable.
        if let Some(entry) = self.vms.get_mut(&vm.uuid) {
            flush(&mut entry.out, &mut self.errors);
        }
    }

    fn vm_expired(&mut self, vm: &VmRecord) {
        if let Some(mut entry) = self.vms.remove(&vm.uuid) {
            close(&mut entry.out, &mut self.errors);
        }
    }

    fn console_data(&mut self, vm: &VmRecord, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let cap = self.config.context;
        self.track(vm);
        let Some(entry) = self.vms.get_mut(&vm.uuid) else {
            return;
        };
        push_context(&mut entry.context, cap, data);
        write_transcript(entry, &self.config, &mut self.errors, data);
    }

    fn seed_data(&mut self, vm: &VmRecord) -> Vec<u8> {
        self.vms
            .get(&vm.uuid)
            .map(|entry| entry.context.iter().copied().collect())
            .unwrap_or_default()
    }

    fn console_log(&mut self, vm: &VmRecord, max: usize) -> Option<Vec<u8>> {
        // The name the transcript is written under: the one tracked (the
        // last output's), else the VM's current one (a transcript from
        // before a restart).
        let name = match self.vms.get_mut(&vm.uuid) {
            Some(entry) => {
                flush(&mut entry.out, &mut self.errors);
                entry.file.clone()
            }
            None => vm.name.clone(),
        };
        let path = self.config.path_for(&name);
        match read_tail(&path, max) {
            Ok(tail) => Some(tail),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                log::warn(&format!(
                    "Logging backend: cannot read {} for /console_log: {e}",
                    path.display()
                ));
                None
            }
        }
    }

    fn reopen(&mut self) {
        self.close_all();
        log::info("Logging backend: closed all console logs; they reopen on the next output");
    }

    fn idle(&mut self) {
        for vm in self.vms.values_mut() {
            flush(&mut vm.out, &mut self.errors);
        }
    }

    fn shutdown(&mut self) {
        self.close_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn rec(uuid: &str, name: &str) -> VmRecord {
        VmRecord {
            uuid: uuid.into(),
            name: name.into(),
            port: Some(50_000),
        }
    }

    fn opts(dir: &Path, extra: &[(&str, &str)]) -> Vec<(String, Option<String>)> {
        let mut v = vec![("logdir".to_string(), Some(dir.display().to_string()))];
        v.extend(
            extra
                .iter()
                .map(|(k, val)| (k.to_string(), Some(val.to_string()))),
        );
        v
    }

    fn backend(dir: &Path, extra: &[(&str, &str)]) -> Box<dyn Backend> {
        let mut b: Box<dyn Backend> = Box::new(LoggingBackend::default());
        b.configure(&opts(dir, extra)).unwrap();
        b
    }

    fn configure_err(dir: &Path, extra: &[(&str, &str)]) -> String {
        let mut b: Box<dyn Backend> = Box::new(LoggingBackend::default());
        b.configure(&opts(dir, extra)).unwrap_err().to_string()
    }

    #[test]
    fn through_the_trait() {
        let b: Box<dyn Backend> = Box::new(LoggingBackend::default());
        assert_eq!(b.name(), "Logging");
        assert_eq!(b.version(), env!("CARGO_PKG_VERSION"));
        assert!(!b.description().is_empty());
        assert!(b.wants_console_data());
        assert!(!b.persists());
        let o = b.options();
        let find = |long: &str| o.iter().find(|s| s.long == long).unwrap().clone();
        assert_eq!(find("logdir").short, Some('l'));
        assert_eq!(find("logdir").default.as_deref(), Some("/var/log/consoles"));
        assert_eq!(find("prefix").short, Some('p'));
        assert_eq!(find("prefix").default, None);
        assert_eq!(find("mode").short, Some('m'));
        assert_eq!(find("mode").default.as_deref(), Some("0600"));
        assert_eq!(find("context").short, None);
        assert_eq!(find("context").default.as_deref(), Some("200"));
        assert_eq!(find("max-log-size").value.as_deref(), Some("BYTES"));
        assert_eq!(o.len(), 5);
        assert!(crate::builtin("LOGGING").is_some());
    }

    #[test]
    fn console_log_is_the_flushed_tail_of_the_transcript() {
        let tmp = tempfile::tempdir().unwrap();
        let mut b = backend(tmp.path(), &[]);
        let vm = rec("u1", "vm1");
        assert_eq!(b.console_log(&vm, 10), None, "no transcript yet");
        b.console_data(&vm, b"0123456789");
        // Still in the buffer: asking writes it first.
        assert_eq!(b.console_log(&vm, 4).as_deref(), Some(&b"6789"[..]));
        assert_eq!(b.console_log(&vm, 100).as_deref(), Some(&b"0123456789"[..]));
        // A transcript left from before a restart is found by the VM's name.
        b.shutdown();
        let mut fresh = backend(tmp.path(), &[]);
        assert_eq!(fresh.console_log(&vm, 3).as_deref(), Some(&b"789"[..]));
        assert_eq!(fresh.console_log(&rec("u2", "other"), 3), None);
    }

    #[test]
    fn two_vms_with_one_name_never_share_a_transcript() {
        let tmp = tempfile::tempdir().unwrap();
        let mut b = LoggingBackend::default();
        b.config.logdir = tmp.path().to_path_buf();
        let real = VmRecord {
            uuid: "real-uuid".into(),
            name: "web-1".into(),
            port: Some(1),
        };
        let impostor = VmRecord {
            uuid: "other-uuid".into(),
            ..real.clone()
        };
        b.console_data(&real, b"real output\n");
        b.console_data(&impostor, b"forged output\n");
        b.close_all();
        let real_log = fs::read(tmp.path().join("web-1.log")).unwrap();
        assert_eq!(real_log, b"real output\n");
        let other = fs::read(tmp.path().join("web-1.other-uuid.log")).unwrap();
        assert_eq!(other, b"forged output\n");
        assert_eq!(b.console_log(&real, 100).unwrap(), b"real output\n");
        assert_eq!(b.console_log(&impostor, 100).unwrap(), b"forged output\n");
    }

    #[test]
    fn transcript_is_byte_exact() {
        let tmp = tempfile::tempdir().unwrap();
        let mut b = backend(tmp.path(), &[]);
        let vm = rec("u1", "vm1");
        b.vm_connected(&vm);
        let mut all = Vec::new();
        for _ in 0..4 {
            all.extend(0u8..=255);
            all.extend(b"line\r\nnext\r\0\r\0\n\n\r");
            all.extend([0xFF; 37]);
            all.extend([0u8; 5]);
        }
        all.extend((0u8..=255).rev());
        let mut pos = 0;
        let mut step = 0;
        while pos < all.len() {
            let n = (step % 7 + 1).min(all.len() - pos);
            b.console_data(&vm, &all[pos..pos + n]);
            pos += n;
            step += 1;
            if step % 5 == 0 {
                b.idle();
            }
        }
        b.idle();
        assert_eq!(fs::read(tmp.path().join("vm1.log")).unwrap(), all);
        // More output after a flush appends; shutdown flushes the rest.
        b.console_data(&vm, b"\xFF\xFE\0tail");
        b.shutdown();
        all.extend(b"\xFF\xFE\0tail");
        assert_eq!(fs::read(tmp.path().join("vm1.log")).unwrap(), all);
    }

    #[test]
    fn appends_to_an_existing_transcript() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("vm1.log"), b"old\n").unwrap();
        let mut b = backend(tmp.path(), &[]);
        b.console_data(&rec("u1", "vm1"), b"new\n");
        b.shutdown();
        assert_eq!(fs::read(tmp.path().join("vm1.log")).unwrap(), b"old\nnew\n");
    }

    #[test]
    fn prefix_and_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let mut b = backend(tmp.path(), &[("prefix", "esx1"), ("mode", "0640")]);
        b.console_data(&rec("u1", "web"), b"hello");
        b.idle();
        let path = tmp.path().join("esx1-web.log");
        assert_eq!(fs::read(&path).unwrap(), b"hello");
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
        assert!(!tmp.path().join("web.log").exists());

        // The default: no prefix, mode 0600.
        let tmp2 = tempfile::tempdir().unwrap();
        let mut b = backend(tmp2.path(), &[]);
        b.console_data(&rec("u1", "web"), b"x");
        b.idle();
        let meta = fs::metadata(tmp2.path().join("web.log")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);

        // Bits the usual umask clears are still set.
        let tmp3 = tempfile::tempdir().unwrap();
        let mut b = backend(tmp3.path(), &[("mode", "0o666")]);
        b.console_data(&rec("u1", "web"), b"x");
        b.idle();
        let meta = fs::metadata(tmp3.path().join("web.log")).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o666);
    }

    #[test]
    fn mode_parsing() {
        for text in ["0600", "600", "0o600", "0O600", " 0600 ", "000600"] {
            assert_eq!(parse_mode(text), Some(0o600), "{text}");
        }
        assert_eq!(parse_mode("0"), Some(0));
        assert_eq!(parse_mode("7777"), Some(0o7777));
        assert_eq!(parse_mode("0644"), Some(0o644));
        for bad in [
            "", "0o", "8", "0800", "0o9", "10000", "-600", "+600", "0x1a", "rw", "6 00",
        ] {
            assert_eq!(parse_mode(bad), None, "{bad}");
        }
        assert_eq!(parse_mode("77777777777777777777777"), None);

        let tmp = tempfile::tempdir().unwrap();
        let err = configure_err(tmp.path(), &[("mode", "0800")]);
        assert!(err.contains("--mode") && err.contains("0800"), "{err}");
        let err = configure_err(tmp.path(), &[("mode", "17777")]);
        assert!(err.contains("--mode") && err.contains("17777"), "{err}");
    }

    #[test]
    fn size_parsing() {
        assert_eq!(parse_size("0"), Some(0));
        assert_eq!(parse_size("1048576"), Some(1 << 20));
        assert_eq!(parse_size("4K"), Some(4096));
        assert_eq!(parse_size("4k"), Some(4096));
        assert_eq!(parse_size("10M"), Some(10 << 20));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("2g"), Some(2 << 30));
        for bad in [
            "",
            "K",
            "1T",
            "1.5M",
            "-1",
            "1 K",
            "0x10",
            "ten",
            "99999999999999G",
        ] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }

    #[test]
    fn context_keeps_the_last_n_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let mut b = backend(tmp.path(), &[("context", "10")]);
        let a = rec("ua", "a");
        let c = rec("uc", "c");
        assert!(b.seed_data(&a).is_empty());
        b.vm_connected(&a);
        assert!(b.seed_data(&a).is_empty());
        b.console_data(&a, b"abc");
        assert_eq!(b.seed_data(&a), b"abc");
        assert!(b.seed_data(&c).is_empty());
        let mut sent = b"abc".to_vec();
        for chunk in [&b"defg"[..], b"h", b"ijklmnop", b"qrstuvwxy"] {
            b.console_data(&a, chunk);
            sent.extend(chunk);
            let want = &sent[sent.len().saturating_sub(10)..];
            assert_eq!(b.seed_data(&a), want);
        }
        assert_eq!(sent.len(), 25);
        assert_eq!(b.seed_data(&a), b"pqrstuvwxy");
        // One chunk longer than the context.
        b.console_data(&c, b"0123456789ABCDEF");
        assert_eq!(b.seed_data(&c), b"6789ABCDEF");
        assert_eq!(b.seed_data(&a), b"pqrstuvwxy");
        // Disconnecting keeps it; expiry drops it.
        b.vm_disconnected(&a);
        assert_eq!(b.seed_data(&a), b"pqrstuvwxy");
        b.vm_expired(&a);
        assert!(b.seed_data(&a).is_empty());
        assert_eq!(b.seed_data(&c), b"6789ABCDEF");
        // The default context is 200 bytes.
        let mut d = backend(tmp.path(), &[]);
        d.console_data(&a, &[7u8; 300]);
        assert_eq!(d.seed_data(&a), vec![7u8; 200]);
    }

    #[test]
    fn context_zero_is_always_empty() {
        let tmp = tempfile::tempdir().unwrap();
        let mut b = backend(tmp.path(), &[("context", "0")]);
        let a = rec("ua", "a");
        b.console_data(&a, b"abc");
        b.console_data(&a, &[1u8; 1000]);
        assert!(b.seed_data(&a).is_empty());
        b.idle();
        assert_eq!(fs::read(tmp.path().join("a.log")).unwrap().len(), 1003);
    }

    #[test]
    fn rename_moves_output_to_the_new_file() {
        let tmp = tempfile::tempdir().unwrap();
        let mut b = backend(tmp.path(), &[]);
        let old = rec("u1", "old");
        b.console_data(&old, b"before ");
        let new = rec("u1", "new");
        b.vm_renamed(&new, "old");
        b.console_data(&new, b"after");
        b.idle();
        assert_eq!(fs::read(tmp.path().join("old.log")).unwrap(), b"before ");
        assert_eq!(fs::read(tmp.path().join("new.log")).unwrap(), b"after");
        assert_eq!(b.seed_data(&new), b"before after");
        // Output that arrives with a new name but no rename event follows
        // the name too.
        b.console_data(&rec("u1", "newer"), b"!");
        b.shutdown();
        assert_eq!(fs::read(tmp.path().join("newer.log")).unwrap(), b"!");
        assert_eq!(fs::read(tmp.path().join("new.log")).unwrap(), b"after");
    }

    #[test]
    fn expire_closes_and_forgets() {
        let tmp = tempfile::tempdir().unwrap();
        let mut b = backend(tmp.path(), &[]);
        let vm = rec("u1", "vm");
        b.console_data(&vm, b"one");
        b.vm_expired(&vm);
        // Expiry flushed the file.
        assert_eq!(fs::read(tmp.path().join("vm.log")).unwrap(), b"one");
        assert!(b.seed_data(&vm).is_empty());
        b.console_data(&vm, b"two");
        assert_eq!(b.seed_data(&vm), b"two");
        b.shutdown();
        assert_eq!(fs::read(tmp.path().join("vm.log")).unwrap(), b"onetwo");
    }

    #[test]
    fn reopen_after_logrotate() {
        let tmp = tempfile::tempdir().unwrap();
        let mut b = backend(tmp.path(), &[]);
        let vm = rec("u1", "vm");
        b.console_data(&vm, b"first part\n");
        b.idle();
        let log = tmp.path().join("vm.log");
        let moved = tmp.path().join("vm.log.1");
        fs::rename(&log, &moved).unwrap();
        b.reopen();
        b.console_data(&vm, b"second part\n");
        b.idle();
        assert_eq!(fs::read(&moved).unwrap(), b"first part\n");
        assert_eq!(fs::read(&log).unwrap(), b"second part\n");
        assert_eq!(b.seed_data(&vm), b"first part\nsecond part\n");
    }

    #[test]
    fn reopen_flushes_unwritten_output() {
        let tmp = tempfile::tempdir().unwrap();
        let mut b = backend(tmp.path(), &[]);
        let vm = rec("u1", "vm");
        b.console_data(&vm, b"buffered");
        // logrotate renames before the HUP; the buffered bytes belong to
        // the old file.
        let moved = tmp.path().join("vm.log.1");
        fs::rename(tmp.path().join("vm.log"), &moved).unwrap();
        b.reopen();
        assert_eq!(fs::read(&moved).unwrap(), b"buffered");
        assert!(!tmp.path().join("vm.log").exists());
    }

    #[test]
    fn max_log_size_rotates() {
        let tmp = tempfile::tempdir().unwrap();
        let mut b = backend(tmp.path(), &[("max-log-size", "10")]);
        let vm = rec("u1", "vm");
        let log = tmp.path().join("vm.log");
        let old = tmp.path().join("vm.log.1");
        b.console_data(&vm, b"0123456789");
        b.idle();
        assert_eq!(fs::read(&log).unwrap(), b"0123456789");
        assert!(!old.exists());
        b.console_data(&vm, b"ab");
        b.idle();
        assert_eq!(fs::read(&old).unwrap(), b"0123456789");
        assert_eq!(fs::read(&log).unwrap(), b"ab");
        b.console_data(&vm, b"cdefghij");
        b.console_data(&vm, b"k");
        b.idle();
        // The older .1 was replaced.
        assert_eq!(fs::read(&old).unwrap(), b"abcdefghij");
        assert_eq!(fs::read(&log).unwrap(), b"k");
    }

    #[test]
    fn max_log_size_loses_nothing_across_the_two_files() {
        let tmp = tempfile::tempdir().unwrap();
        let mut b = backend(tmp.path(), &[("max-log-size", "1K")]);
        let vm = rec("u1", "vm");
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
        for (i, chunk) in data.chunks(37).enumerate() {
            b.console_data(&vm, chunk);
            if i % 3 == 0 {
                b.idle();
            }
        }
        b.shutdown();
        let cur = fs::read(tmp.path().join("vm.log")).unwrap();
        let old = fs::read(tmp.path().join("vm.log.1")).unwrap();
        assert!(cur.len() <= 1024 && old.len() <= 1024);
        assert!(old.len() > 1024 - 37);
        let both = [old, cur].concat();
        assert_eq!(both, &data[data.len() - both.len()..]);
    }

    #[test]
    fn existing_oversized_transcript_rotates_on_first_write() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("vm.log"), [b'x'; 20]).unwrap();
        let mut b = backend(tmp.path(), &[("max-log-size", "16")]);
        b.console_data(&rec("u1", "vm"), b"y");
        b.shutdown();
        assert_eq!(fs::read(tmp.path().join("vm.log.1")).unwrap(), [b'x'; 20]);
        assert_eq!(fs::read(tmp.path().join("vm.log")).unwrap(), b"y");
    }

    #[test]
    fn sanitised_names() {
        assert_eq!(sanitize_name("web-01.example_com"), "web-01.example_com");
        assert_eq!(sanitize_name("a/b"), "a_b");
        assert_eq!(sanitize_name(""), "_");
        assert_eq!(sanitize_name("."), "_");
        assert_eq!(sanitize_name(".."), "_");
        assert_eq!(sanitize_name("..."), "_");
        assert_eq!(sanitize_name(".hidden"), "_hidden");
        assert_eq!(sanitize_name("../../etc/passwd"), "___.._etc_passwd");
        assert_eq!(sanitize_name("\0x"), "_x");
        assert_eq!(sanitize_name("\n"), "_");
        assert_eq!(sanitize_name("evil\u{202e}txt"), "evil_txt");
        assert_eq!(sanitize_name("caf\u{e9} vm"), "caf__vm");
        assert_eq!(sanitize_name(&"a".repeat(1000)), "a".repeat(MAX_NAME_BYTES));
        assert_eq!(
            sanitize_name(&"\u{1F600}".repeat(1000)),
            "_".repeat(MAX_NAME_BYTES)
        );
    }

    #[test]
    fn hostile_names_stay_inside_logdir() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("logs");
        let mut b = backend(&dir, &[]);
        let long = "a".repeat(1000);
        let names = [
            "../../etc/passwd",
            "a/b",
            "..",
            ".",
            "\0x",
            "\n",
            "evil\u{202e}txt",
            long.as_str(),
            "",
            "/abs/path",
            ".bashrc",
            "a\\b",
            "..\\..\\x",
            "con\r\nsole",
            "\u{7f}",
        ];
        for (i, name) in names.iter().enumerate() {
            let vm = rec(&format!("u{i}"), name);
            b.console_data(&vm, name.as_bytes());
        }
        b.shutdown();
        // Nothing besides the log directory appeared next to it.
        let outside: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(outside, vec![std::ffi::OsString::from("logs")]);
        let canon = fs::canonicalize(&dir).unwrap();
        let mut total = 0;
        let mut count = 0;
        for entry in fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().unwrap();
            assert!(entry.file_type().unwrap().is_file(), "{name}");
            assert!(!name.starts_with('.'), "{name}");
            assert!(name.ends_with(".log"), "{name}");
            assert!(name.len() <= MAX_NAME_BYTES + 4, "{name}");
            assert!(name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c)));
            let path = fs::canonicalize(entry.path()).unwrap();
            assert_eq!(path.parent().unwrap(), canon);
            total += fs::metadata(entry.path()).unwrap().len();
            count += 1;
        }
        // Some names collide ("..", ".", "\n", "" and "\u{7f}" all become
        // `_.log`); every byte still lands in some transcript.
        let sent: usize = names.iter().map(|n| n.len()).sum();
        assert_eq!(total, sent as u64);
        assert!(count >= 8, "{count}");
        assert!(dir.join("_.log").exists());
        assert!(dir
            .join(format!("{}.log", "a".repeat(MAX_NAME_BYTES)))
            .exists());
    }

    #[test]
    fn colliding_names_never_share_a_transcript() {
        let tmp = tempfile::tempdir().unwrap();
        let mut b = backend(tmp.path(), &[("context", "100")]);
        let one = rec("u1", "a/b");
        let two = rec("u2", "a_b");
        b.console_data(&one, b"one");
        b.idle();
        b.console_data(&two, b"two");
        b.idle();
        // Two uuids never share a file: the second gets its uuid in the name.
        assert_eq!(fs::read(tmp.path().join("a_b.log")).unwrap(), b"one");
        assert_eq!(fs::read(tmp.path().join("a_b.u2.log")).unwrap(), b"two");
        // Contexts stay per VM.
        assert_eq!(b.seed_data(&one), b"one");
        assert_eq!(b.seed_data(&two), b"two");
    }

    #[test]
    fn configure_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let err = configure_err(dir, &[("bogus", "1")]);
        assert!(err.contains("--bogus"), "{err}");
        let err = configure_err(dir, &[("mode", "rw-r--r--")]);
        assert!(err.contains("--mode") && err.contains("rw-r--r--"), "{err}");
        for bad in ["ten", "-1", "1.5", "1T", "99999999999"] {
            let err = configure_err(dir, &[("context", bad)]);
            assert!(err.contains("--context") && err.contains(bad), "{err}");
        }
        for bad in ["0", "big", "10X"] {
            let err = configure_err(dir, &[("max-log-size", bad)]);
            assert!(err.contains("--max-log-size") && err.contains(bad), "{err}");
        }
        let err = configure_err(dir, &[("prefix", "a/b")]);
        assert!(err.contains("--prefix") && err.contains("a/b"), "{err}");
        let file = dir.join("not-a-dir");
        fs::write(&file, b"").unwrap();
        let err = configure_err(&file, &[]);
        assert!(
            err.contains("--logdir") && err.contains("not-a-dir"),
            "{err}"
        );
        let under_file = file.join("sub");
        let err = configure_err(&under_file, &[]);
        assert!(
            err.contains("--logdir") && err.contains("not-a-dir"),
            "{err}"
        );
        let mut b: Box<dyn Backend> = Box::new(LoggingBackend::default());
        let err = b.configure(&[("mode".into(), None)]).unwrap_err();
        assert!(err.to_string().contains("--mode"), "{err}");
        let err = b.configure(&[("logdir".into(), Some(String::new()))]);
        assert!(err.unwrap_err().to_string().contains("--logdir"));
        // Accepted spellings.
        let mut b = backend(
            dir,
            &[
                ("mode", "640"),
                ("context", "4K"),
                ("max-log-size", "10M"),
                ("prefix", "p"),
            ],
        );
        b.console_data(&rec("u", "v"), &[1u8; 5000]);
        assert_eq!(b.seed_data(&rec("u", "v")).len(), 4096);
    }

    #[test]
    fn creates_a_missing_logdir() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a").join("consoles");
        let mut b = backend(&dir, &[]);
        let meta = fs::metadata(&dir).unwrap();
        assert!(meta.is_dir());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o755);
        b.console_data(&rec("u", "vm"), b"x");
        b.shutdown();
        assert_eq!(fs::read(dir.join("vm.log")).unwrap(), b"x");
    }

    #[test]
    fn write_errors_are_logged_once_and_recover() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("logs");
        let mut lb = LoggingBackend::default();
        lb.configure(&opts(&dir, &[])).unwrap();
        let vm = rec("u1", "vm");
        lb.console_data(&vm, b"a");
        lb.idle();
        fs::remove_dir_all(&dir).unwrap();
        lb.reopen();
        for _ in 0..5 {
            lb.console_data(&vm, b"lost");
            lb.idle();
        }
        assert_eq!(lb.errors_logged(), 1);
        // The context still has everything.
        assert_eq!(lb.seed_data(&vm), b"alostlostlostlostlost");
        fs::create_dir(&dir).unwrap();
        lb.console_data(&vm, b"back");
        lb.idle();
        assert_eq!(fs::read(dir.join("vm.log")).unwrap(), b"back");
        assert!(lb.errors.failing.is_empty());
        // A new failure after recovery is logged again.
        fs::remove_dir_all(&dir).unwrap();
        lb.reopen();
        lb.console_data(&vm, b"x");
        lb.console_data(&vm, b"y");
        assert_eq!(lb.errors_logged(), 2);
        lb.shutdown();
    }

    #[test]
    fn refuses_a_transcript_that_is_not_a_regular_file() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir(tmp.path().join("vm.log")).unwrap();
        let _sock = std::os::unix::net::UnixListener::bind(tmp.path().join("sock.log")).unwrap();
        let mut lb = LoggingBackend::default();
        lb.configure(&opts(tmp.path(), &[])).unwrap();
        lb.console_data(&rec("u1", "vm"), b"x");
        lb.console_data(&rec("u2", "sock"), b"x");
        lb.idle();
        lb.shutdown();
        assert_eq!(lb.errors_logged(), 2);
        assert!(tmp.path().join("vm.log").is_dir());
    }
}
