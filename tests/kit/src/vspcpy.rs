//! vSPC.py stores made by Python's real `shelve`
//! (`tests/make_vspcpy_store.py`), for the File backend's unit tests and
//! the end-to-end import tests alike.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Debian's Python when there is one (it has dbm.gnu; a pyenv Python on
/// PATH may not), else `python3` on PATH.
pub fn python() -> PathBuf {
    let debian = Path::new("/usr/bin/python3");
    if debian.exists() {
        debian.to_path_buf()
    } else {
        PathBuf::from("python3")
    }
}

/// Whether that Python can import `module`; says why not when it cannot
/// (the caller skips: `.ci/run` installs python3 and python3-gdbm).
pub fn python_has(module: &str) -> bool {
    let ok = Command::new(python())
        .args(["-c", &format!("import {module}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!(
            "SKIPPED: {} cannot import {module} (install Debian's python3 and python3-gdbm, \
             as .ci/run does)",
            python().display()
        );
    }
    ok
}

/// Make a store at `prefix` in dbm `format` (`gnu`, `dumb`, `default`)
/// from `items` (the script's JSON input), pickled with `protocol` (or
/// shelve's default); synced once at the end when `bulk`. Panics with
/// Python's error when it fails.
pub fn make_store(format: &str, prefix: &Path, protocol: Option<u8>, items: &str, bulk: bool) {
    let script = crate::ports::repo_root().join("tests/make_vspcpy_store.py");
    let mut cmd = Command::new(python());
    cmd.arg(script).arg(format).arg(prefix);
    cmd.arg(protocol.map_or("-".to_string(), |p| p.to_string()));
    if bulk {
        cmd.arg("bulk");
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(items.as_bytes())
        .expect("write to python");
    let out = child.wait_with_output().expect("python finishes");
    assert!(
        out.status.success(),
        "making the store failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
