//! An example vspc backend plugin: every VM event becomes one JSON line in
//! a file, ready for `jq`, a log shipper or an audit trail.
//!
//! ```sh
//! cargo build --release -p vspc-backend-jsonl
//! vspc --plugin-dir target/release --backend jsonl --jsonl-file /var/log/vspc-events.jsonl
//! ```
//!
//! Lines look like
//! `{"ts_ms":1763700000000,"event":"vm_connected","uuid":"…","name":"web-1","port":50000}`.
//! Console sessions (the daemon's audit events) are
//! `{"event":"session_started","session":7,"kind":"console-port","peer":"10.1.2.3:51234","user":"","access":"free-for-all",…}`
//! and `session_ended` with `duration_ms`, `bytes_to_vm` and
//! `bytes_from_vm` besides. With `--jsonl-data` console output is recorded too (`"data"` holds the
//! bytes as text, with invalid UTF-8 replaced).

use serde_json::json;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};
use vspc_backend_api::{log, Backend, BackendError, OptionSpec, Options, SessionEvent, VmRecord};

vspc_backend_api::export_backend!(JsonLines::default());

/// The plugin's state.
#[derive(Default)]
pub struct JsonLines {
    path: Option<PathBuf>,
    file: Option<File>,
    with_data: bool,
    /// Set after a write failed, so the error is logged once, not per event.
    failing: bool,
}

impl JsonLines {
    fn open(&mut self) -> Option<&mut File> {
        if self.file.is_none() {
            let path = self.path.as_ref()?;
            match OpenOptions::new().create(true).append(true).open(path) {
                Ok(f) => self.file = Some(f),
                Err(e) => {
                    if !self.failing {
                        log::error(&format!("jsonl: cannot open {}: {e}", path.display()));
                        self.failing = true;
                    }
                    return None;
                }
            }
        }
        self.file.as_mut()
    }

    fn emit(&mut self, event: &str, vm: &VmRecord, extra: &[(&str, serde_json::Value)]) {
        let ts_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut line = json!({
            "ts_ms": ts_ms,
            "event": event,
            "uuid": vm.uuid,
            "name": vm.name,
            "port": vm.port,
        });
        if let Some(obj) = line.as_object_mut() {
            for (k, v) in extra {
                obj.insert(k.to_string(), v.clone());
            }
        }
        let mut text = line.to_string();
        text.push('\n');
        let path = self.path.clone();
        let Some(file) = self.open() else { return };
        match file.write_all(text.as_bytes()) {
            Ok(()) => self.failing = false,
            Err(e) => {
                if !self.failing {
                    let shown = path.map(|p| p.display().to_string()).unwrap_or_default();
                    log::error(&format!("jsonl: cannot write {shown}: {e}"));
                    self.failing = true;
                }
                self.file = None;
            }
        }
    }
}

/// An audit event's fields beyond the VM's; `ended` adds the duration and
/// the bytes each way.
fn session_fields(ev: &SessionEvent, ended: bool) -> Vec<(&'static str, serde_json::Value)> {
    let mut f = vec![
        ("session", json!(ev.id)),
        ("kind", json!(ev.kind)),
        ("peer", json!(ev.peer)),
        ("user", json!(ev.user)),
        ("access", json!(ev.access)),
    ];
    if ended {
        f.push(("duration_ms", json!(ev.duration_ms)));
        f.push(("bytes_to_vm", json!(ev.bytes_to_vm)));
        f.push(("bytes_from_vm", json!(ev.bytes_from_vm)));
    }
    f
}

impl Backend for JsonLines {
    fn name(&self) -> &str {
        "jsonl"
    }

    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn description(&self) -> &str {
        "appends every VM event to a file as one JSON line (example plugin)"
    }

    fn options(&self) -> Vec<OptionSpec> {
        vec![
            OptionSpec::value(
                "jsonl-file",
                None,
                "PATH",
                "file the JSON lines are appended to",
            ),
            OptionSpec::flag("jsonl-data", None, "record console output too, as text"),
        ]
    }

    fn configure(&mut self, options: &Options) -> Result<(), BackendError> {
        for (key, value) in options {
            match (key.as_str(), value) {
                ("jsonl-file", Some(path)) => self.path = Some(PathBuf::from(path)),
                ("jsonl-data", None) => self.with_data = true,
                _ => {
                    return Err(BackendError::new(format!(
                        "jsonl: unexpected option --{key}"
                    )))
                }
            }
        }
        let Some(path) = &self.path else {
            return Err(BackendError::new(
                "backend jsonl needs --jsonl-file PATH (where the events go)",
            ));
        };
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| {
                BackendError::new(format!("jsonl: cannot open {}: {e}", path.display()))
            })?;
        log::info(&format!("jsonl: writing VM events to {}", path.display()));
        Ok(())
    }

    fn wants_console_data(&self) -> bool {
        self.with_data
    }

    fn vm_connected(&mut self, vm: &VmRecord) {
        self.emit("vm_connected", vm, &[]);
    }

    fn vm_renamed(&mut self, vm: &VmRecord, old_name: &str) {
        self.emit("vm_renamed", vm, &[("old_name", json!(old_name))]);
    }

    fn vm_disconnected(&mut self, vm: &VmRecord) {
        self.emit("vm_disconnected", vm, &[]);
    }

    fn vm_expired(&mut self, vm: &VmRecord) {
        self.emit("vm_expired", vm, &[]);
    }

    fn console_attached(&mut self, vm: &VmRecord) {
        self.emit("console_attached", vm, &[]);
    }

    fn console_detached(&mut self, vm: &VmRecord) {
        self.emit("console_detached", vm, &[]);
    }

    fn console_data(&mut self, vm: &VmRecord, data: &[u8]) {
        let text = String::from_utf8_lossy(data).into_owned();
        self.emit("console_data", vm, &[("data", json!(text))]);
    }

    fn session_started(&mut self, ev: &SessionEvent) {
        self.emit("session_started", &ev.vm, &session_fields(ev, false));
    }

    fn session_ended(&mut self, ev: &SessionEvent) {
        self.emit("session_ended", &ev.vm, &session_fields(ev, true));
    }

    fn reopen(&mut self) {
        // After logrotate moved the file, the next event opens a new one.
        self.file = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_one_json_line_per_event() {
        let dir = std::env::temp_dir().join(format!("vspc-jsonl-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("events.jsonl");
        let _ = std::fs::remove_file(&path);
        let mut b = JsonLines::default();
        b.configure(&[("jsonl-file".into(), Some(path.display().to_string()))])
            .unwrap();
        let vm = VmRecord {
            uuid: "u1".into(),
            name: "web \"1\"".into(),
            port: Some(50000),
        };
        b.vm_connected(&vm);
        b.vm_renamed(&vm, "old");
        b.vm_expired(&vm);
        b.session_ended(&SessionEvent {
            id: 9,
            kind: "web".into(),
            peer: "127.0.0.1:4000".into(),
            user: "token#2".into(),
            vm: vm.clone(),
            access: "read-only".into(),
            duration_ms: 1500,
            bytes_to_vm: 0,
            bytes_from_vm: 77,
        });
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[3]["event"], "session_ended");
        assert_eq!(lines[3]["user"], "token#2");
        assert_eq!(lines[3]["bytes_from_vm"], 77);
        assert_eq!(lines[3]["name"], "web \"1\"");
        assert_eq!(lines[0]["event"], "vm_connected");
        assert_eq!(lines[0]["name"], "web \"1\"");
        assert_eq!(lines[0]["port"], 50000);
        assert_eq!(lines[1]["old_name"], "old");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn needs_a_file() {
        let mut b = JsonLines::default();
        let e = b.configure(&[]).unwrap_err();
        assert!(e.0.contains("--jsonl-file"));
    }
}
