//! vSPC.py's File backend store, read-only: what `vSPCServer --backend File
//! -f PREFIX` left behind, so a site moving to vspc keeps every VM's port.
//!
//! vSPC.py keeps its map in a Python `shelve` at PREFIX: a dbm file whose
//! keys are the VMs' uuids and whose values are pickles of
//! `{'uuid': UUID, 'name': NAME, 'port': PORT}`. Which dbm depends on the
//! Python that ran it: `dbm.gnu` (one file, PREFIX itself; Debian with
//! python3-gdbm), `dbm.dumb` (PREFIX.dat, PREFIX.dir, PREFIX.bak), or
//! Berkeley DB through `dbm.ndbm` / Python 2's `dbhash` (PREFIX.db or
//! PREFIX), which vspc recognises but does not read. The pickles are read
//! by vspc's own decoder, which never runs code.
//!
//! Nothing here opens a file for writing.

mod dumb;
mod gdbm;

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use vspc_backend_api::VmRecord;
use vspc_codec::pickle::{self, Value};

/// A key and its pickled value.
type Owned = (Vec<u8>, Vec<u8>);

/// Largest file this reader loads (a 10,000-VM store is about 2 MB).
const MAX_FILE: u64 = 512 * 1024 * 1024;

/// Longest VM name and uuid taken from a store, in bytes. ESXi's names are
/// at most 80 characters; with `--multi-console` a service URI follows.
const MAX_NAME: usize = 1024;
const MAX_UUID: usize = 256;

/// The dbm flavours vSPC.py's shelve may have used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// GNU dbm: the file PREFIX.
    Gnu,
    /// Python's own dbm.dumb: PREFIX.dat and PREFIX.dir.
    Dumb,
    /// Berkeley DB (dbm.ndbm on Debian, Python 2's dbhash): recognised, not read.
    BerkeleyDb,
    /// A classic ndbm pair (PREFIX.dir and PREFIX.pag): recognised, not read.
    Ndbm,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Gnu => "dbm.gnu",
            Format::Dumb => "dbm.dumb",
            Format::BerkeleyDb => "Berkeley DB (dbm.ndbm)",
            Format::Ndbm => "ndbm (.dir/.pag)",
        })
    }
}

/// A vSPC.py store found at a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub format: Format,
    /// The file that holds the records (PREFIX, PREFIX.dat, PREFIX.db).
    pub main: PathBuf,
}

/// A store read in full.
#[derive(Debug, Clone, PartialEq)]
pub struct Imported {
    pub format: Format,
    /// The files read.
    pub files: Vec<PathBuf>,
    /// One per VM, ordered by port (port-less ones last), then uuid.
    pub records: Vec<VmRecord>,
}

/// `PREFIX` with `suffix` appended to its file name.
pub fn with_suffix(prefix: &Path, suffix: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// The first bytes of a file, or none if it cannot be opened.
fn head(path: &Path) -> Option<Vec<u8>> {
    let mut f = fs::File::open(path).ok()?;
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    let mut buf = Vec::with_capacity(16);
    f.by_ref().take(16).read_to_end(&mut buf).ok()?;
    Some(buf)
}

/// Berkeley DB's hash, btree and queue magics, at offset 12 of the first
/// page, in either byte order.
fn is_berkeley_db(head: &[u8]) -> bool {
    let Some(m) = head.get(12..16) else {
        return false;
    };
    let m = [m[0], m[1], m[2], m[3]];
    [u32::from_le_bytes(m), u32::from_be_bytes(m)]
        .iter()
        .any(|v| matches!(v, 0x0006_1561 | 0x0005_3162 | 0x0004_2253))
}

/// Whether PREFIX itself is a dbm file (GNU dbm or Berkeley DB), as
/// opposed to vspc's own map or nothing.
pub fn is_dbm_file(path: &Path) -> bool {
    head(path).is_some_and(|h| gdbm::is_gdbm(&h) || is_berkeley_db(&h))
}

/// The vSPC.py store at `prefix`, if there is one.
pub fn find(prefix: &Path) -> Option<Found> {
    let found = |format, main: PathBuf| Some(Found { format, main });
    if let Some(h) = head(prefix) {
        if gdbm::is_gdbm(&h) {
            return found(Format::Gnu, prefix.to_path_buf());
        }
        if is_berkeley_db(&h) {
            return found(Format::BerkeleyDb, prefix.to_path_buf());
        }
    }
    let dir = with_suffix(prefix, ".dir");
    if with_suffix(prefix, ".pag").is_file() && dir.is_file() {
        return found(Format::Ndbm, with_suffix(prefix, ".pag"));
    }
    let dat = with_suffix(prefix, ".dat");
    if dir.is_file() && (dat.exists() || with_suffix(prefix, ".bak").is_file()) {
        return found(Format::Dumb, dat);
    }
    let db = with_suffix(prefix, ".db");
    if head(&db).is_some_and(|h| is_berkeley_db(&h)) {
        return found(Format::BerkeleyDb, db);
    }
    None
}

/// Read a whole file of at most [`MAX_FILE`] bytes; the error follows the
/// file's name.
fn read_file(path: &Path) -> Result<Vec<u8>, String> {
    let f = fs::File::open(path).map_err(|e| format!("cannot be read ({e})"))?;
    let meta = f.metadata().map_err(|e| format!("cannot be read ({e})"))?;
    if !meta.is_file() {
        return Err("is not a regular file".into());
    }
    if meta.len() > MAX_FILE {
        return Err(format!(
            "is {} bytes, more than the {MAX_FILE} a port map can need",
            meta.len()
        ));
    }
    let mut buf = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    f.take(MAX_FILE + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("cannot be read ({e})"))?;
    Ok(buf)
}

/// An error about one file of a store: "vSPC.py store FILE (FORMAT) ...".
fn fault(file: &Path, format: Format, problem: &str) -> String {
    format!(
        "vSPC.py store {} ({format}) {problem}; nothing was imported and no file was changed",
        file.display()
    )
}

/// Read the store at `prefix` completely and check every record; nothing
/// is written. The error names the file at fault and what is wrong.
pub fn read(prefix: &Path) -> Result<Imported, String> {
    let Some(found) = find(prefix) else {
        return Err(format!(
            "no vSPC.py store at {}: looked for {} (dbm.gnu or Berkeley DB), {} and {} \
             (dbm.dumb), {} (Berkeley DB); give the prefix vSPC.py was given with -f",
            prefix.display(),
            prefix.display(),
            with_suffix(prefix, ".dat").display(),
            with_suffix(prefix, ".dir").display(),
            with_suffix(prefix, ".db").display(),
        ));
    };
    let format = found.format;
    let (files, pairs): (Vec<PathBuf>, Vec<Owned>) = match format {
        Format::Gnu => {
            let data = read_file(&found.main).map_err(|e| fault(&found.main, format, &e))?;
            let pairs = gdbm::read(&data).map_err(|e| fault(&found.main, format, &e))?;
            let pairs = pairs
                .into_iter()
                .map(|(k, v)| (k.to_vec(), v.to_vec()))
                .collect();
            (vec![found.main.clone()], pairs)
        }
        Format::Dumb => {
            let dir_path = with_suffix(prefix, ".dir");
            let dir = read_file(&dir_path).map_err(|e| fault(&dir_path, format, &e))?;
            let dat = read_file(&found.main).map_err(|e| fault(&found.main, format, &e))?;
            let pairs = dumb::read(&dir, &dat).map_err(|(in_dir, e)| {
                let at = if in_dir { &dir_path } else { &found.main };
                fault(at, format, &e)
            })?;
            let pairs = pairs.into_iter().map(|(k, v)| (k, v.to_vec())).collect();
            (vec![dir_path, found.main.clone()], pairs)
        }
        Format::BerkeleyDb | Format::Ndbm => {
            return Err(fault(
                &found.main,
                format,
                "is a format vspc does not read; convert it to dbm.dumb with the Python that \
                 wrote it (python3 -c \"import dbm, dbm.dumb; s = dbm.open('PREFIX'); \
                 d = dbm.dumb.open('NEWPREFIX', 'n'); [d.__setitem__(k, s[k]) for k in \
                 s.keys()]; d.close()\") and import NEWPREFIX",
            ))
        }
    };
    let main = found.main.clone();
    let records = records(pairs).map_err(|e| fault(&main, format, &e))?;
    Ok(Imported {
        format,
        files,
        records,
    })
}

/// A uuid or name for an error message: quoted, escaped, cut short.
fn shown(s: &str) -> String {
    let cut: String = s.chars().take(60).collect();
    if cut.len() < s.len() {
        format!("{cut:?}…")
    } else {
        format!("{cut:?}")
    }
}

fn shown_bytes(b: &[u8]) -> String {
    shown(&String::from_utf8_lossy(b))
}

/// Text of a pickled `str` (Python 3) or UTF-8 `str` (Python 2).
fn text(v: &Value) -> Option<&str> {
    match v {
        Value::Str(s) => Some(s),
        Value::Bytes(b) => std::str::from_utf8(b).ok(),
        _ => None,
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::None => "None",
        Value::Bool(_) => "a bool",
        Value::Int(_) => "an int",
        Value::Float(_) => "a float",
        Value::Str(_) => "a str",
        Value::Bytes(_) => "bytes that are not UTF-8",
        Value::List(_) => "a list",
        Value::Tuple(_) => "a tuple",
        Value::Dict(_) => "a dict",
        Value::Exception(_) => "an exception",
    }
}

/// Text fit for a map: not empty (uuids), not too long, no control
/// characters.
fn check_text(what: &str, s: &str, max: usize, key: &str) -> Result<(), String> {
    if s.len() > max {
        return Err(format!(
            "is corrupt (the {what} of the record for {} is {} bytes; at most {max} are taken)",
            shown(key),
            s.len()
        ));
    }
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(format!(
            "is corrupt (the {what} {} of the record for {} holds the control character \
             U+{:04X})",
            shown(s),
            shown(key),
            u32::from(c)
        ));
    }
    Ok(())
}

/// The VM records of a store's (key, pickled value) pairs.
fn records(pairs: Vec<Owned>) -> Result<Vec<VmRecord>, String> {
    let mut by_uuid: BTreeMap<String, VmRecord> = BTreeMap::new();
    let mut ports: BTreeMap<u16, String> = BTreeMap::new();
    for (key, value) in pairs {
        let key = std::str::from_utf8(&key)
            .map_err(|_| format!("is corrupt (key {} is not UTF-8)", shown_bytes(&key)))?;
        let decoded = match pickle::decode(&value, value.len().max(1)) {
            Ok(Some((v, used))) if used == value.len() => v,
            Ok(Some((_, used))) => {
                return Err(format!(
                    "is corrupt (the record for {} has {} bytes after its pickle)",
                    shown(key),
                    value.len() - used
                ))
            }
            Ok(None) | Err(pickle::PickleError::TooLarge { .. }) => {
                return Err(format!(
                    "is corrupt (the record for {} is a truncated pickle)",
                    shown(key)
                ))
            }
            Err(e) => {
                return Err(format!(
                    "is corrupt (the record for {} is not a plain pickle: {e})",
                    shown(key)
                ))
            }
        };
        let Value::Dict(items) = &decoded else {
            return Err(format!(
                "is corrupt (the record for {} is {}, not vSPC.py's dict of uuid, name and port)",
                shown(key),
                type_name(&decoded)
            ));
        };
        let field = |name: &str| {
            items
                .iter()
                .rev()
                .find(|(k, _)| text(k) == Some(name))
                .map(|(_, v)| v)
        };
        let missing = |f: &str| format!("is corrupt (the record for {} has no '{f}')", shown(key));
        let uuid = field("uuid").ok_or_else(|| missing("uuid"))?;
        let uuid = text(uuid).ok_or_else(|| {
            format!(
                "is corrupt (the uuid of the record for {} is {}, not text)",
                shown(key),
                type_name(uuid)
            )
        })?;
        if uuid.is_empty() {
            return Err(format!(
                "is corrupt (the record for {} has an empty uuid)",
                shown(key)
            ));
        }
        check_text("uuid", uuid, MAX_UUID, key)?;
        let name = field("name").ok_or_else(|| missing("name"))?;
        let name = text(name).ok_or_else(|| {
            format!(
                "is corrupt (the name of the record for {} is {}, not text)",
                shown(key),
                type_name(name)
            )
        })?;
        check_text("name", name, MAX_NAME, key)?;
        let port = match field("port").ok_or_else(|| missing("port"))? {
            Value::None => None,
            Value::Int(p) => match u16::try_from(*p) {
                Ok(p) if p > 0 => Some(p),
                _ => {
                    return Err(format!(
                        "is corrupt (the record for {} has port {p}, which is not a TCP port)",
                        shown(key)
                    ))
                }
            },
            other => {
                return Err(format!(
                    "is corrupt (the port of the record for {} is {}, not a number)",
                    shown(key),
                    type_name(other)
                ))
            }
        };
        if let Some(p) = port {
            if let Some(other) = ports.insert(p, uuid.to_string()) {
                return Err(format!(
                    "is corrupt (port {p} is given to both {} and {})",
                    shown(&other),
                    shown(uuid)
                ));
            }
        }
        let rec = VmRecord {
            uuid: uuid.to_string(),
            name: name.to_string(),
            port,
        };
        if by_uuid.insert(uuid.to_string(), rec).is_some() {
            return Err(format!("is corrupt (uuid {} has two records)", shown(uuid)));
        }
    }
    let mut out: Vec<VmRecord> = by_uuid.into_values().collect();
    out.sort_by(|a, b| {
        (a.port.is_none(), a.port, &a.uuid).cmp(&(b.port.is_none(), b.port, &b.uuid))
    });
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests;
