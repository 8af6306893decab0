//! A child process the harness started: its output captured (in memory, or
//! in a log file of its own that outlives a failure), its process id, a
//! graceful stop (SIGTERM, then wait) or a SIGKILL, and what its log said
//! last when something failed. [`crate::Daemon`] is one of these running
//! `vspc`; the load tool also runs its bare relay as one.
//!
//! The process is killed (SIGKILL) when its [`Process`] is dropped.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// Where a [`Process`]'s output goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogTo {
    /// Kept in memory: stderr as is, stdout lines prefixed `stdout: `.
    Memory,
    /// stderr into `<PROGRAM>.log` (the program's file name) in a new
    /// directory `<PREFIX>.<pid>.<stamp>` under the system's temporary
    /// directory (stdout discarded). The
    /// directory stays until [`Process::discard_log`], so a failed run's
    /// log can be read afterwards.
    TempDir(String),
}

enum Log {
    Memory {
        text: Arc<Mutex<String>>,
        threads: Vec<JoinHandle<()>>,
    },
    File {
        dir: PathBuf,
        path: PathBuf,
    },
}

/// A running (or ended) child process and its log.
pub struct Process {
    child: Child,
    /// The program, for messages.
    program: String,
    log: Log,
    /// Set once the process has been reaped.
    status: Option<ExitStatus>,
}

impl Process {
    /// Spawn `cmd` (its program, arguments, environment and stdin as the
    /// caller set them) with its output going where `log` says; in a
    /// process group of its own if `own_group`, so that a terminal's Ctrl-C
    /// reaches only the caller, which then stops it.
    pub fn spawn(mut cmd: Command, log: &LogTo, own_group: bool) -> Result<Process, String> {
        let program = cmd.get_program().to_string_lossy().into_owned();
        if own_group {
            cmd.process_group(0);
        }
        let file = match log {
            LogTo::Memory => {
                cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
                None
            }
            LogTo::TempDir(prefix) => {
                let stamp = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos());
                let dir =
                    std::env::temp_dir().join(format!("{prefix}.{}.{stamp:x}", std::process::id()));
                std::fs::create_dir(&dir)
                    .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
                let name = Path::new(&program)
                    .file_name()
                    .map_or("process".into(), |n| n.to_string_lossy());
                let path = dir.join(format!("{name}.log"));
                let file = std::fs::File::create(&path)
                    .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
                cmd.stdout(Stdio::null()).stderr(file);
                Some((dir, path))
            }
        };
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot run {program}: {e}"))?;
        let log = match file {
            Some((dir, path)) => Log::File { dir, path },
            None => {
                let text = Arc::new(Mutex::new(String::new()));
                let threads = vec![
                    collect(child.stdout.take(), text.clone(), "stdout: "),
                    collect(child.stderr.take(), text.clone(), ""),
                ];
                Log::Memory { text, threads }
            }
        };
        Ok(Process {
            child,
            program,
            log,
            status: None,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The program that was run, as given.
    pub fn program(&self) -> &str {
        &self.program
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.status = Some(status);
            }
        }
        self.status
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.exited().is_none()
    }

    /// SIGKILL the process (unless it has exited) and wait for it to be
    /// gone, and for its output to be collected.
    pub fn kill(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
        if let Log::Memory { threads, .. } = &mut self.log {
            for t in threads.drain(..) {
                let _ = t.join();
            }
        }
    }

    /// Stop the process as an init system does, with SIGTERM (the daemon
    /// then flushes its backends), and wait up to `limit` for it to exit;
    /// an error if it does not, or exits unsuccessfully. The signal is sent
    /// with kill(1): std can only SIGKILL a child.
    pub async fn terminate(&mut self, limit: Duration) -> Result<(), String> {
        let pid = self.pid().to_string();
        let sent = Command::new("kill")
            .args(["-s", "TERM", &pid])
            .stdin(Stdio::null())
            .status()
            .map_err(|e| format!("cannot run kill(1) to stop {}: {e}", self.program))?;
        if !sent.success() {
            return Err(format!("kill -s TERM {pid} failed ({sent})"));
        }
        let start = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.status = Some(status);
                    return if status.success() {
                        Ok(())
                    } else {
                        Err(format!(
                            "{} exited with {status} after SIGTERM",
                            self.program
                        ))
                    };
                }
                Ok(None) if start.elapsed() < limit => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Ok(None) => {
                    return Err(format!(
                        "{} had not exited {} s after SIGTERM",
                        self.program,
                        limit.as_secs()
                    ))
                }
                Err(e) => return Err(format!("cannot wait for {}: {e}", self.program)),
            }
        }
    }

    /// Everything the process logged so far.
    pub fn log(&self) -> String {
        match &self.log {
            Log::Memory { text, .. } => text.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            Log::File { path, .. } => std::fs::read_to_string(path).unwrap_or_default(),
        }
    }

    /// The log file ([`LogTo::TempDir`]).
    pub fn log_path(&self) -> Option<&Path> {
        match &self.log {
            Log::Memory { .. } => None,
            Log::File { path, .. } => Some(path),
        }
    }

    /// The log's last line naming an error (clap's `error: ...`, the
    /// daemon's `vspc: ...`), else its last non-empty line.
    pub fn last_words(&self) -> Option<String> {
        let log = self.log();
        let lines = || log.lines().rev().map(str::trim).filter(|l| !l.is_empty());
        let line = lines()
            .find(|l| l.starts_with("vspc:") || l.to_ascii_lowercase().contains("error"))
            .or_else(|| lines().next())?;
        Some(line.to_string())
    }

    /// Kill the process and turn `msg` into an error message that says
    /// whether it had exited, with what last log line, and where its log
    /// is (a file) or what it was (in memory).
    pub fn failed(&mut self, msg: &str) -> String {
        let exited = self.exited();
        self.kill();
        let mut out = msg.to_string();
        if let Some(status) = exited {
            out.push_str(&format!("; it exited ({status})"));
            if let Some(line) = self.last_words() {
                out.push_str(&format!(", its last words: {line}"));
            }
        }
        match &self.log {
            Log::File { path, .. } => out.push_str(&format!(" (log: {})", path.display())),
            Log::Memory { .. } => {
                out.push('\n');
                out.push_str(&self.log());
            }
        }
        out
    }

    /// Remove the log's directory ([`LogTo::TempDir`]; after a run that
    /// went well).
    pub fn discard_log(&self) {
        if let Log::File { dir, .. } = &self.log {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A thread that appends each line of `pipe` to `log`, after `prefix`.
pub(crate) fn collect<R: Read + Send + 'static>(
    pipe: Option<R>,
    log: Arc<Mutex<String>>,
    prefix: &'static str,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let Some(pipe) = pipe else { return };
        for line in BufReader::new(pipe).split(b'\n') {
            let Ok(line) = line else { return };
            let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
            log.push_str(prefix);
            log.push_str(&String::from_utf8_lossy(&line));
            log.push('\n');
        }
    })
}

/// Copy everything `pipe` yields into `into` on a thread of its own, until
/// the pipe ends (a child's stdout or stderr, read while a test watches
/// it grow).
pub fn collect_bytes<R: std::io::Read + Send + 'static>(
    mut pipe: R,
    into: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => into
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(&buf[..n]),
            }
        }
    })
}
