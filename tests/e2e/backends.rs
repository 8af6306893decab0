//! End-to-end tests of the daemon's backends: the built-in File (port map
//! across restarts and `kill -9`) and Logging (transcripts, context for new
//! consoles, hostile names, SIGHUP) backends, several backends at once, and
//! plugins (found by name, path or `VSPC_PLUGIN_PATH`; a panicking one; ones
//! that cannot be loaded), `--backend-help` and backend option errors.
//!
//! The plugins are built once per run with cargo (see [`plugins`]).

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::common::*;
use vspc_testkit::sim::{Identity, SimConsole, SimVm};

/// How many console ports [`port_args`] sets aside.
const RANGE: u16 = 16;

// ---------------------------------------------------------------------------
// Plugins.

/// The `.so` files of the workspace's plugins.
pub(crate) struct Plugins {
    pub(crate) jsonl: PathBuf,
    panicky: PathBuf,
    legacy: PathBuf,
}

/// Build the plugins once per test process and return their paths. Cargo
/// does not hold its build lock while tests run, so this may call it.
pub(crate) fn plugins() -> &'static Plugins {
    static PLUGINS: OnceLock<Plugins> = OnceLock::new();
    PLUGINS.get_or_init(build_plugins)
}

fn build_plugins() -> Plugins {
    let cargo = std::env::var_os("CARGO")
        .map(PathBuf::from)
        .or_else(|| option_env!("CARGO").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("cargo"));
    let manifest = repo_root().join("Cargo.toml");
    let out = Command::new(&cargo)
        .arg("build")
        .arg("--manifest-path")
        .arg(&manifest)
        .args(["-p", "vspc-backend-jsonl"])
        .args(["-p", "vspc-backend-panicky"])
        .args(["-p", "vspc-backend-legacy"])
        .arg("--message-format=json")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", cargo.display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "building the plugins failed ({}):\n{stderr}",
        out.status
    );
    // target name -> the cdylib's .so
    let mut found: BTreeMap<String, PathBuf> = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let is_cdylib = msg["target"]["kind"]
            .as_array()
            .is_some_and(|kinds| kinds.iter().any(|k| k == "cdylib"));
        let Some(name) = msg["target"]["name"].as_str() else {
            continue;
        };
        if !is_cdylib {
            continue;
        }
        let so = msg["filenames"].as_array().and_then(|files| {
            files
                .iter()
                .filter_map(|f| f.as_str())
                .find(|f| f.ends_with(".so"))
        });
        if let Some(so) = so {
            found.insert(name.to_string(), PathBuf::from(so));
        }
    }
    let mut take = |name: &str| {
        let path = found
            .remove(name)
            .unwrap_or_else(|| panic!("cargo reported no .so for {name}; its stderr:\n{stderr}"));
        assert!(path.is_file(), "{} does not exist", path.display());
        path
    };
    Plugins {
        jsonl: take("vspc_backend_jsonl"),
        panicky: take("vspc_backend_panicky"),
        legacy: take("vspc_backend_legacy"),
    }
}

/// A fresh plugin directory holding copies of `files` (under their own
/// names).
fn plugin_dir(files: &[&Path]) -> tempfile::TempDir {
    let dir = tempdir();
    for f in files {
        let name = f.file_name().expect("plugin file name");
        std::fs::copy(f, dir.path().join(name))
            .unwrap_or_else(|e| panic!("cannot copy {}: {e}", f.display()));
    }
    dir
}

// ---------------------------------------------------------------------------
// Helpers.

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vspc-backends-")
        .tempdir()
        .expect("temp dir")
}

/// A path as a command-line argument.
fn s(p: &Path) -> String {
    p.to_str().expect("test paths are UTF-8").to_string()
}

/// `Identity::numbered(index)` called `name`.
fn named(index: u32, name: &str) -> Identity {
    Identity {
        name: name.into(),
        ..Identity::numbered(index)
    }
}

/// Where two byte strings first differ, for failure messages.
fn first_difference(a: &[u8], b: &[u8]) -> String {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => format!(
            "first difference at byte {i}: {:#04x} vs {:#04x}",
            a[i], b[i]
        ),
        None => format!(
            "one is a prefix of the other ({} vs {} bytes)",
            a.len(),
            b.len()
        ),
    }
}

/// Poll until the file at `path` holds exactly `want`.
async fn wait_file_eq(path: &Path, want: &[u8], limit: Duration) {
    let read = || std::fs::read(path);
    if eventually(limit, || read().is_ok_and(|b| b == want)).await {
        return;
    }
    match read() {
        Ok(got) => panic!(
            "{} holds {} bytes, wanted {} ({})",
            path.display(),
            got.len(),
            want.len(),
            first_difference(&got, want)
        ),
        Err(e) => panic!("{} cannot be read after {limit:?}: {e}", path.display()),
    }
}

/// One `[[vm]]` of a File backend store.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Stored {
    name: String,
    uuid: String,
    port: Option<u16>,
}

/// The store's records, sorted; `Err` if it is missing or not a valid map.
fn read_store(store: &Path) -> Result<Vec<Stored>, String> {
    let text = std::fs::read_to_string(store).map_err(|e| format!("read: {e}"))?;
    let table: toml::Table = text.parse().map_err(|e| format!("not TOML: {e}"))?;
    if table.get("version").and_then(|v| v.as_integer()) != Some(1) {
        return Err(format!("no `version = 1`:\n{text}"));
    }
    let mut out = Vec::new();
    let vms = match table.get("vm") {
        None => return Ok(out),
        Some(v) => v.as_array().ok_or("vm is not an array")?,
    };
    for vm in vms {
        let field = |k: &str| vm.get(k).and_then(|v| v.as_str()).map(str::to_string);
        let (Some(name), Some(uuid)) = (field("name"), field("uuid")) else {
            return Err(format!("a [[vm]] lacks name or uuid:\n{text}"));
        };
        let port = match vm.get("port") {
            None => None,
            Some(p) => Some(
                p.as_integer()
                    .and_then(|p| u16::try_from(p).ok())
                    .ok_or_else(|| format!("bad port {p}"))?,
            ),
        };
        out.push(Stored { name, uuid, port });
    }
    out.sort();
    Ok(out)
}

/// Listing rows as store records, sorted.
fn as_stored(rows: &[VmRow]) -> Vec<Stored> {
    let mut v: Vec<Stored> = rows
        .iter()
        .map(|(name, uuid, port)| Stored {
            name: name.clone(),
            uuid: uuid.clone(),
            port: *port,
        })
        .collect();
    v.sort();
    v
}

/// Poll until the store lists exactly `want`.
async fn wait_store_eq(store: &Path, want: &[Stored]) {
    let ok = eventually(T, || read_store(store).is_ok_and(|got| got == want)).await;
    assert!(
        ok,
        "store {} never held {want:?}; it has {:?}",
        store.display(),
        read_store(store)
    );
}

/// Free ports for a daemon run with [`run_to_exit`], so a daemon that
/// wrongly starts cannot collide with anything.
fn port_args() -> Vec<String> {
    let range = free_range(RANGE);
    [
        "--proxy-iface",
        "127.0.0.1",
        "--proxy-port",
        &free_port().to_string(),
        "--admin-port",
        &free_port().to_string(),
        "-r",
        &range.to_string(),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect()
}

/// Run the daemon with `args` (on free ports, logging at info level) and
/// wait up to 10 s for it to exit.
fn run_expecting_exit(args: &[&str], envs: &[(&str, &str)]) -> Exit {
    let mut all = port_args();
    all.extend(args.iter().map(|a| a.to_string()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let mut envs = envs.to_vec();
    envs.push(("RUST_LOG", "info"));
    let started = Instant::now();
    let exit = run_to_exit_env(&all, &envs, Duration::from_secs(10));
    assert!(
        exit.status.is_some(),
        "vspc {all:?} was still running after {:?}; stderr:\n{}",
        started.elapsed(),
        exit.stderr
    );
    exit
}

fn code(exit: &Exit) -> Option<i32> {
    exit.status.and_then(|s| s.code())
}

/// The non-blank lines of a text.
fn lines(text: &str) -> Vec<&str> {
    text.lines().filter(|l| !l.trim().is_empty()).collect()
}

/// Assert a start-up failure: exit status 1 and exactly one non-blank line
/// on stderr, which contains every one of `needles`.
fn assert_one_line_failure(exit: &Exit, needles: &[&str]) {
    let l = lines(&exit.stderr);
    assert_eq!(
        code(exit),
        Some(1),
        "wanted exit status 1; stderr:\n{}",
        exit.stderr
    );
    assert_eq!(
        l.len(),
        1,
        "wanted exactly one line on stderr, got {}:\n{}",
        l.len(),
        exit.stderr
    );
    for n in needles {
        assert!(l[0].contains(n), "stderr does not mention {n:?}:\n{}", l[0]);
    }
}

fn send_signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid} failed");
}

/// Every path below `root` (relative to it), recursively.
fn tree(root: &Path) -> BTreeSet<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            out.insert(p.strip_prefix(root).unwrap_or(&p).to_path_buf());
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(root, &p, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(root, root, &mut out);
    out
}

// ---------------------------------------------------------------------------
// File backend.

/// VMs keep their ports across `kill -9` and a restart with the same store:
/// the map is listed (and its ports reserved) before the VMs come back.
#[tokio::test]
async fn file_map_survives_kill9_and_restart() {
    // -f DIR: the store is DIR/vspc-map.toml.
    let dir = tempdir();
    map_survives(
        &["-f", &s(dir.path())],
        &dir.path().join("vspc-map.toml"),
        100,
    )
    .await;
    // -f FILE.
    let dir = tempdir();
    let file = dir.path().join("ports.toml");
    map_survives(&["-f", &s(&file)], &file, 200).await;
}

async fn map_survives(args: &[&str], store: &Path, first: u32) {
    let builder = Daemon::builder().args(args);
    let mut d = builder.clone().start();
    let ids: Vec<Identity> = (0..3).map(|i| Identity::numbered(first + i)).collect();
    let mut vms = Vec::new();
    for id in &ids {
        vms.push(vm_up(&d, id).await);
    }
    let before = list_vms(d.admin).await;
    assert_eq!(before.len(), 3, "listing: {before:?}");
    let ports: BTreeSet<u16> = before.iter().filter_map(|r| r.2).collect();
    assert_eq!(ports.len(), 3, "three distinct ports: {before:?}");
    // The backend writes the map once its queue drains.
    wait_store_eq(store, &as_stored(&before)).await;

    d.kill9();
    drop(vms);
    let d2 = builder.clone().same_ports_as(&d).start();
    // Listed with their ports before any of them reconnects.
    let after = list_vms(d2.admin).await;
    assert_eq!(after, before, "the restarted daemon's listing");

    // A VM coming back gets its old port: a console on that port reaches it.
    let back = &ids[1];
    let old_port = before.iter().find(|r| r.0 == back.name).and_then(|r| r.2);
    let vm = SimVm::connect(d2.proxy, back)
        .await
        .unwrap_or_else(|e| panic!("VM {} did not reconnect: {e}", back.name));
    let old_port = old_port.expect("port of the returning VM");
    let console = console_synced(&vm, &d2, old_port).await;
    vm.send(b"back again").await.expect("VM send");
    let got = console
        .read_exact_data(10, T)
        .await
        .expect("console reads the returning VM");
    assert_eq!(got, b"back again");

    // A new VM gets none of the reserved ports.
    let (_new, new_port) = vm_up(&d2, &Identity::numbered(first + 3)).await;
    assert!(
        !ports.contains(&new_port),
        "new VM got port {new_port}, reserved for a stored VM ({ports:?})"
    );
    let listed = list_vms(d2.admin).await;
    assert_eq!(listed.len(), 4, "listing: {listed:?}");
    for row in &before {
        assert!(listed.contains(row), "{row:?} changed: {listed:?}");
    }
    // The new VM is stored too, and no temp file is left next to the store.
    wait_store_eq(store, &as_stored(&listed)).await;
    let dir = store.parent().expect("the store's directory");
    let name = PathBuf::from(store.file_name().expect("the store's name"));
    let clean = eventually(T, || tree(dir).iter().all(|p| *p == name)).await;
    assert!(clean, "files next to the store: {:?}", tree(dir));
}

/// `kill -9` at random moments while VMs connect never leaves a store that
/// stops the next start, loses records, or gives two VMs one port; stale
/// temp files are cleaned up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_kill9_at_random_moments() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    eprintln!("file_kill9_at_random_moments: seed {seed}");
    let mut rng = XorShift::new(seed);
    let dir = tempdir();
    let store = dir.path().join("vspc-map.toml");
    let first = Daemon::builder().args(&["-f", &s(dir.path())]).start();
    let builder = Daemon::builder()
        .args(&["-f", &s(dir.path())])
        .same_ports_as(&first);
    let range = first.range_start..first.range_start + RANGE;
    let mut d = first;
    let ids: Vec<Identity> = (0..12).map(|i| Identity::numbered(300 + i)).collect();
    // Every VM that may have reached the daemon.
    let mut attempted: BTreeSet<String> = BTreeSet::new();
    // name -> port, as the daemon listed them.
    let seen: Arc<Mutex<BTreeMap<String, u16>>> = Arc::default();
    // What the last restarted daemon listed: never lost later.
    let mut kept: Vec<VmRow> = Vec::new();
    let mut stores = 0;

    for round in 0..8 {
        // Ports seen this round (a VM whose record was lost to a kill may
        // get another port in a later round).
        seen.lock().unwrap().clear();
        let mut tasks = tokio::task::JoinSet::new();
        let count = 4 + (rng.next_u64() % 5) as usize;
        let mut picks: Vec<usize> = (0..ids.len()).collect();
        for i in (1..picks.len()).rev() {
            picks.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        for (k, &idx) in picks.iter().take(count).enumerate() {
            let id = ids[idx].clone();
            attempted.insert(id.name.clone());
            let proxy = d.proxy;
            // Three at once, then one every 25 ms: spreading the
            // connections over the kill window is the test.
            let delay = Duration::from_millis(25 * k.saturating_sub(2) as u64);
            tasks.spawn(async move {
                tokio::time::sleep(delay).await;
                let _vm = SimVm::connect(proxy, &id).await;
                // Connected until the daemon dies and the task is shut down.
                std::future::pending::<()>().await;
            });
        }
        let admin = d.admin;
        let seen_by_lister = seen.clone();
        tasks.spawn(async move {
            loop {
                if let Ok(rows) = try_list_vms(admin).await {
                    let mut seen = seen_by_lister.lock().unwrap();
                    for (name, _, port) in rows {
                        if let Some(p) = port {
                            seen.insert(name, p);
                        }
                    }
                }
                // A sampler, not a wait: it runs until shut down.
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        });
        // The kill at a random moment is the test.
        let delay = rng.next_u64() % 301;
        tokio::time::sleep(Duration::from_millis(delay)).await;
        d.kill9();
        tasks.shutdown().await;

        let stored = if store.exists() {
            stores += 1;
            Some(read_store(&store).unwrap_or_else(|e| {
                panic!("round {round} (kill after {delay} ms): store is not valid: {e}")
            }))
        } else {
            None
        };
        let restarted = builder.clone().start();
        let _previous = std::mem::replace(&mut d, restarted);
        let rows = list_vms(d.admin).await;
        let why = format!("round {round} (kill after {delay} ms, seed {seed}): listing {rows:?}");
        let mut ports = BTreeSet::new();
        for (name, _, port) in &rows {
            assert!(attempted.contains(name), "{why}: {name} never connected");
            let port = port.unwrap_or_else(|| panic!("{why}: {name} has no port"));
            assert!(range.contains(&port), "{why}: {name} has port {port}");
            assert!(ports.insert(port), "{why}: port {port} listed twice");
            if let Some(&p) = seen.lock().unwrap().get(name) {
                assert_eq!(port, p, "{why}: {name} had port {p} before");
            }
        }
        for row in &kept {
            assert!(rows.contains(row), "{why}: stored {row:?} was lost");
        }
        if let Some(stored) = stored {
            assert_eq!(stored, as_stored(&rows), "{why}: store and listing differ");
        }
        // Temp files of the killed writer are gone once the map loaded.
        let clean = eventually(T, || {
            tree(dir.path())
                .iter()
                .all(|p| p == Path::new("vspc-map.toml"))
        })
        .await;
        assert!(
            clean,
            "{why}: files left in the store's directory: {:?}",
            tree(dir.path())
        );
        kept = rows;
    }
    eprintln!("file_kill9_at_random_moments: a store existed after {stores} of 8 kills");
}

/// A store that cannot be read or is corrupt stops start-up with a message
/// naming it, and is left exactly as it was.
#[test]
fn corrupt_store_stops_startup() {
    let mut rng = XorShift::new(0x5eed);
    let mut garbage = b"version = 1\n[[vm]\nuuid = \"".to_vec();
    garbage.extend(rng.bytes(200));
    let duplicate = b"version = 1\n\n[[vm]]\nuuid = \"a\"\nname = \"x\"\nport = 20001\n\n\
                      [[vm]]\nuuid = \"b\"\nname = \"y\"\nport = 20001\n"
        .to_vec();
    for (what, bytes) in [("garbage", garbage), ("a port given twice", duplicate)] {
        let dir = tempdir();
        let store = dir.path().join("vspc-map.toml");
        std::fs::write(&store, &bytes).expect("write store");
        let started = Instant::now();
        let exit = run_expecting_exit(&["-f", &s(dir.path())], &[]);
        assert_ne!(code(&exit), Some(0), "{what}: vspc started");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{what}: took {:?} to give up",
            started.elapsed()
        );
        assert!(
            exit.stderr.contains(&s(&store)),
            "{what}: stderr does not name {}:\n{}",
            store.display(),
            exit.stderr
        );
        assert_eq!(
            std::fs::read(&store).expect("store still there"),
            bytes,
            "{what}: the store was changed"
        );
        let left: Vec<_> = tree(dir.path()).into_iter().collect();
        assert_eq!(left, [PathBuf::from("vspc-map.toml")], "{what}: files left");
    }

    // The store's path is a directory.
    let dir = tempdir();
    let store = dir.path().join("vspc-map.toml");
    std::fs::create_dir(&store).expect("mkdir");
    let exit = run_expecting_exit(&["-f", &s(dir.path())], &[]);
    assert_ne!(code(&exit), Some(0), "a directory as store: vspc started");
    assert!(
        exit.stderr.contains(&s(&store)),
        "stderr does not name {}:\n{}",
        store.display(),
        exit.stderr
    );
    assert!(store.is_dir(), "the directory was replaced");
    let left: Vec<_> = tree(dir.path()).into_iter().collect();
    assert_eq!(left, [PathBuf::from("vspc-map.toml")], "files left");
}

// ---------------------------------------------------------------------------
// Logging backend.

/// The transcript holds exactly the VM's bytes with the asked-for mode, and
/// a new console is shown exactly the last `--context` bytes, then live
/// output.
#[tokio::test]
async fn logging_transcript_exact_and_seed() {
    let dir = tempdir();
    let d = Daemon::start(&[
        "--backend",
        "Logging",
        "-l",
        &s(dir.path()),
        "--context",
        "16",
        "-m",
        "0640",
        // Logging's own context, shown to telnet clients on the console
        // port: with no replay ring, a backend's scrollback is the history.
        "--replay-bytes",
        "0",
        "--console-replay",
    ]);
    let (vm, port) = vm_up(&d, &named(400, "log-vm")).await;
    // Every byte value three times, then CR LF CR NUL.
    let sent = [every_byte(3), b"\r\n\r\0".to_vec()].concat();
    vm.send(&sent).await.expect("VM send");
    let log = dir.path().join("log-vm.log");
    wait_file_eq(&log, &sent, T).await;
    let mode = std::fs::metadata(&log).expect("stat").permissions().mode() & 0o7777;
    assert_eq!(mode, 0o640, "mode of {} is {mode:o}", log.display());

    let console = SimConsole::connect(d.console(port))
        .await
        .unwrap_or_else(|e| panic!("console on port {port}: {e}"));
    let seed = console
        .read_exact_data(16, T)
        .await
        .expect("the console is shown recent output");
    assert_eq!(
        seed,
        sent[sent.len() - 16..],
        "context shown to a new console"
    );
    let marker = console
        .read_exact_data(LIVE.len(), T)
        .await
        .expect("marker");
    assert_eq!(marker, LIVE, "the end of the context is marked");
    let extra = console.recv_data(SHORT).await;
    assert!(
        extra.is_empty(),
        "more than the context arrived: {extra:02x?}"
    );

    vm.send(b"live \xff data\r\n").await.expect("VM send");
    let live = console.read_exact_data(13, T).await.expect("live data");
    assert_eq!(live, b"live \xff data\r\n");
    let mut all = sent.clone();
    all.extend_from_slice(b"live \xff data\r\n");
    wait_file_eq(&log, &all, T).await;
}

/// `-p PREFIX` names transcripts `PREFIX-NAME.log`; VM names that look like
/// paths never write outside the log directory, with or without a prefix.
#[tokio::test]
async fn logging_prefix_and_hostile_name() {
    let root = tempdir();
    let parent = root.path().join("a");
    std::fs::create_dir(&parent).expect("mkdir");
    // Where `DIR/../../evil/..` would lead.
    std::fs::create_dir(root.path().join("evil")).expect("mkdir");
    let logs = parent.join("logs");
    let before = tree(root.path());

    let with_prefix = Daemon::start(&["--backend", "Logging", "-l", &s(&logs), "-p", "pre"]);
    let plain = Daemon::start(&["--backend", "Logging", "-l", &s(&logs)]);
    let hostile = ["../../evil/..", "..", "/etc/passwd", ".hidden", "a/../../b"];

    let (web, _) = vm_up(&with_prefix, &named(500, "web-1")).await;
    web.send(b"normal output\n").await.expect("send");
    wait_file_eq(&logs.join("pre-web-1.log"), b"normal output\n", T).await;

    let mut vms = Vec::new();
    for (d, tag) in [(&with_prefix, "pre"), (&plain, "plain")] {
        for (i, name) in hostile.iter().enumerate() {
            let id = named(510 + i as u32, name);
            let (vm, _) = vm_up(d, &id).await;
            let data = format!("{tag} output of {name:?}\n");
            vm.send(data.as_bytes()).await.expect("send");
            vms.push((vm, tag, name, data));
        }
    }
    for (_, tag, name, data) in &vms {
        // Each VM's output lands in one file directly inside the log dir.
        let holder = || {
            std::fs::read_dir(&logs).ok().and_then(|entries| {
                entries.flatten().find_map(|e| {
                    let content = std::fs::read(e.path()).ok()?;
                    (content == data.as_bytes()).then(|| e.file_name())
                })
            })
        };
        let found = eventually(T, || holder().is_some()).await;
        assert!(
            found,
            "{tag}: output of VM {name:?} is in no file of {}; tree: {:?}",
            logs.display(),
            tree(root.path())
        );
        let file = holder()
            .expect("found above")
            .to_string_lossy()
            .into_owned();
        assert!(
            file.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
            "{tag}: VM {name:?} writes to {file:?}"
        );
        assert!(
            !file.starts_with('.'),
            "{tag}: {name:?} gives hidden {file:?}"
        );
        if *tag == "pre" {
            assert!(
                file.starts_with("pre-"),
                "{tag}: {name:?} writes to {file:?}"
            );
        }
        assert!(file.ends_with(".log"), "{tag}: {name:?} writes to {file:?}");
    }

    // Nothing but regular files directly inside DIR; nothing new elsewhere.
    let after = tree(root.path());
    for p in &after {
        let full = root.path().join(p);
        if p.starts_with("a/logs") && p != Path::new("a/logs") {
            assert_eq!(
                p.parent(),
                Some(Path::new("a/logs")),
                "{} is not directly in the log directory",
                p.display()
            );
            let meta = std::fs::symlink_metadata(&full).expect("stat");
            assert!(meta.is_file(), "{} is not a regular file", p.display());
        } else if p != Path::new("a/logs") {
            assert!(
                before.contains(p),
                "{} appeared outside the log directory",
                full.display()
            );
        }
    }
    assert!(
        tree(&root.path().join("evil")).is_empty(),
        "something was written into evil/"
    );
}

/// SIGHUP (after logrotate renamed the transcript) makes the next output go
/// to a new file at the old path.
#[tokio::test]
async fn logging_sighup_reopens() {
    let dir = tempdir();
    let mut d = Daemon::start(&["--backend", "Logging", "-l", &s(dir.path())]);
    let (vm, _) = vm_up(&d, &named(600, "log-vm")).await;
    let log = dir.path().join("log-vm.log");
    let rotated = dir.path().join("log-vm.log.1");

    vm.send(b"before the rotation\n").await.expect("send");
    wait_file_eq(&log, b"before the rotation\n", T).await;
    std::fs::rename(&log, &rotated).expect("rename");
    send_signal(d.pid(), "-HUP");
    assert!(
        d.wait_log("closed all console logs", T).await,
        "the Logging backend did not act on SIGHUP"
    );

    vm.send(b"after the rotation\n").await.expect("send");
    wait_file_eq(&log, b"after the rotation\n", T).await;
    assert_eq!(
        std::fs::read(&rotated).expect("rotated file"),
        b"before the rotation\n",
        "the rotated transcript changed"
    );
    assert!(d.running(), "SIGHUP stopped the daemon");
}

// ---------------------------------------------------------------------------
// Several backends.

/// File and Logging at once, named with a comma, with a repeated flag, or
/// with their options in `--backend-args`: the map is stored and the
/// transcript written.
#[tokio::test]
async fn file_and_logging_together() {
    let forms: [&[&str]; 3] = [
        &["--backend", "File,Logging", "-f", "{D1}", "-l", "{D2}"],
        &[
            "--backend",
            "File",
            "--backend",
            "Logging",
            "--file",
            "{D1}",
            "--logdir",
            "{D2}",
        ],
        &[
            "--backend",
            "File,Logging",
            "--backend-args",
            "--file {D1} -l {D2}",
        ],
    ];
    for (n, form) in forms.iter().enumerate() {
        let (d1, d2) = (tempdir(), tempdir());
        let args: Vec<String> = form
            .iter()
            .map(|a| {
                a.replace("{D1}", &s(d1.path()))
                    .replace("{D2}", &s(d2.path()))
            })
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let d = Daemon::start(&args);
        let id = named(700 + n as u32, "both-vm");
        let (vm, port) = vm_up(&d, &id).await;
        vm.send(b"to the transcript\n").await.expect("send");
        wait_file_eq(&d2.path().join("both-vm.log"), b"to the transcript\n", T).await;
        let want = [Stored {
            name: "both-vm".into(),
            uuid: id.uuid_display(),
            port: Some(port),
        }];
        wait_store_eq(&d1.path().join("vspc-map.toml"), &want).await;
    }
}

// ---------------------------------------------------------------------------
// Plugins.

/// The jsonl plugin, found through `--plugin-dir`, by its path and through
/// `VSPC_PLUGIN_PATH`, records a VM's connection and a console's attach and
/// detach with the VM's name, uuid and port.
#[tokio::test]
async fn jsonl_plugin_by_name_path_and_env() {
    let p = plugins();
    let pdir = plugin_dir(&[&p.jsonl]);
    let events = tempdir();
    let file = |n: usize| events.path().join(format!("events-{n}.jsonl"));
    let env_path = format!("/nonexistent-vspc-plugins:{}", s(pdir.path()));
    let builders = [
        Daemon::builder().args(&["--plugin-dir", &s(pdir.path()), "--backend", "jsonl"]),
        Daemon::builder().args(&["--backend", &s(&p.jsonl)]),
        Daemon::builder()
            .args(&["--backend", "jsonl"])
            .env("VSPC_PLUGIN_PATH", &env_path),
    ];
    for (n, builder) in builders.into_iter().enumerate() {
        let d = builder.args(&["--jsonl-file", &s(&file(n))]).start();
        let id = named(800 + n as u32, &format!("json-vm-{n}"));
        let (vm, port) = vm_up(&d, &id).await;
        let console = console_synced(&vm, &d, port).await;
        console.close().await;
        let wanted = ["vm_connected", "console_attached", "console_detached"];
        let parse = || -> Vec<serde_json::Value> {
            std::fs::read_to_string(file(n))
                .unwrap_or_default()
                .lines()
                .map(|l| {
                    serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}"))
                })
                .collect()
        };
        let has_all = |lines: &[serde_json::Value]| {
            wanted
                .iter()
                .all(|w| lines.iter().any(|l| l["event"] == *w))
        };
        let ok = eventually(T, || has_all(&parse())).await;
        let lines = parse();
        assert!(
            ok,
            "form {n}: events file lacks some of {wanted:?}: {lines:?}"
        );
        let mut order = Vec::new();
        for l in &lines {
            let event = l["event"].as_str().expect("event is a string");
            order.push(event.to_string());
            assert_eq!(l["name"], id.name.as_str(), "form {n}: {l}");
            assert_eq!(l["uuid"], id.uuid_display().as_str(), "form {n}: {l}");
            assert_eq!(l["port"], port, "form {n}: {l}");
        }
        let pos = |w: &str| order.iter().position(|e| e == w);
        assert!(
            pos("vm_connected") < pos("console_attached")
                && pos("console_attached") < pos("console_detached"),
            "form {n}: events out of order: {order:?}"
        );
        assert!(
            d.log().contains(&s(&file(n))),
            "form {n}: plugin did not log its file"
        );
    }
}

/// A plugin that panics in its hooks is logged, and the daemon goes on
/// serving VMs and consoles.
#[tokio::test]
async fn panicking_plugin_is_logged_not_fatal() {
    let p = plugins();
    let pdir = plugin_dir(&[&p.panicky]);
    let mut d = Daemon::start(&["--plugin-dir", &s(pdir.path()), "--backend", "panicky"]);
    let (vm, port) = vm_up(&d, &named(900, "panic-vm")).await;
    let console = console_synced(&vm, &d, port).await;

    let out = all_bytes(2);
    vm.send(&out).await.expect("VM send");
    let got = console
        .read_exact_data(out.len(), T)
        .await
        .expect("console reads");
    assert_eq!(got, out, "VM -> console: {}", first_difference(&got, &out));
    let input = all_bytes(1);
    console.send(&input).await.expect("console send");
    let got = vm.read_exact_data(input.len(), T).await.expect("VM reads");
    assert_eq!(
        got,
        input,
        "console -> VM: {}",
        first_difference(&got, &input)
    );

    assert!(
        d.wait_log("backend panicky panicked in vm_connected", T)
            .await,
        "the panic was not logged"
    );
    assert!(d.running(), "the daemon stopped");
    // A second VM is served too.
    let (vm2, port2) = vm_up(&d, &named(901, "panic-vm-2")).await;
    assert_ne!(port, port2);
    let _console2 = console_synced(&vm2, &d, port2).await;
    assert!(d.running(), "the daemon stopped");
}

/// A plugin built against an old, incompatible API is refused in one line
/// naming the file, its API version and the fix.
#[test]
fn incompatible_plugin_is_refused_in_one_line() {
    let p = plugins();
    let legacy = s(&p.legacy);
    let exit = run_expecting_exit(&["--backend", &legacy], &[]);
    assert_one_line_failure(&exit, &[&legacy, "0.0.1", "rebuild"]);

    // The same found by name in a plugin directory.
    let pdir = plugin_dir(&[&p.legacy]);
    let copy = s(&pdir.path().join("libvspc_backend_legacy.so"));
    let exit = run_expecting_exit(
        &["--plugin-dir", &s(pdir.path()), "--backend", "legacy"],
        &[],
    );
    assert_one_line_failure(&exit, &[&copy, "0.0.1", "rebuild"]);
}

/// An unknown backend names every directory searched; a file that is not a
/// plugin is refused in one line naming it.
#[test]
fn bad_plugins_and_unknown_backends() {
    let dir = tempdir();
    let env_dir = tempdir();
    let exit = run_expecting_exit(
        &["--plugin-dir", &s(dir.path()), "--backend", "nosuch"],
        &[("VSPC_PLUGIN_PATH", &s(env_dir.path()))],
    );
    assert_one_line_failure(
        &exit,
        &[
            "nosuch",
            &s(dir.path()),
            &s(env_dir.path()),
            "/usr/local/lib/vspc",
            "/usr/lib/vspc",
        ],
    );

    let fake = dir.path().join("libvspc_backend_fake.so");
    std::fs::write(&fake, "this is not a shared object\n").expect("write");
    let exit = run_expecting_exit(&["--plugin-dir", &s(dir.path()), "--backend", "fake"], &[]);
    assert_one_line_failure(&exit, &[&s(&fake)]);
    let exit = run_expecting_exit(&["--backend", &s(&fake)], &[]);
    assert_one_line_failure(&exit, &[&s(&fake)]);
}

// ---------------------------------------------------------------------------
// --backend-help and option errors.

#[test]
fn backend_help() {
    let p = plugins();
    let pdir = plugin_dir(&[&p.jsonl]);
    let no_env = [("VSPC_PLUGIN_PATH", "")];
    let help = |args: &[&str]| {
        let exit = run_expecting_exit(args, &no_env);
        assert_eq!(
            code(&exit),
            Some(0),
            "vspc {args:?} failed:\n{}",
            exit.stderr
        );
        exit.stdout
    };

    let out = help(&["--backend-help"]);
    for b in ["Memory", "File", "Logging"] {
        assert!(out.contains(b), "--backend-help does not list {b}:\n{out}");
    }
    assert!(
        !out.contains("jsonl"),
        "jsonl listed without its dir:\n{out}"
    );

    let out = help(&["--plugin-dir", &s(pdir.path()), "--backend-help"]);
    for b in ["Memory", "File", "Logging", "jsonl", &s(pdir.path())] {
        assert!(out.contains(b), "--backend-help does not list {b}:\n{out}");
    }

    let out = help(&["--backend", "Logging", "--backend-help"]);
    assert!(out.contains("Logging"), "{out}");
    let logdir = out
        .lines()
        .find(|l| l.contains("--logdir"))
        .unwrap_or_else(|| panic!("no --logdir in:\n{out}"));
    assert!(
        logdir.contains("/var/log/consoles"),
        "--logdir's default is not shown: {logdir}"
    );

    let out = help(&[
        "--plugin-dir",
        &s(pdir.path()),
        "--backend",
        "jsonl",
        "--backend-help",
    ]);
    assert!(out.contains("jsonl"), "{out}");
    assert!(out.contains("--jsonl-file"), "{out}");
    assert!(
        out.contains(&s(pdir.path())),
        "the origin is not shown:\n{out}"
    );
}

#[test]
fn backend_option_errors() {
    let dir = tempdir();
    let usage = |args: &[&str], needle: &str| {
        let exit = run_expecting_exit(args, &[]);
        assert_eq!(
            code(&exit),
            Some(2),
            "vspc {args:?}: wanted exit status 2; stderr:\n{}",
            exit.stderr
        );
        assert!(
            exit.stderr.contains(needle),
            "vspc {args:?}: stderr does not mention {needle:?}:\n{}",
            exit.stderr
        );
        assert!(
            exit.stderr.contains("Usage"),
            "vspc {args:?}: no usage:\n{}",
            exit.stderr
        );
    };
    usage(&["--backend", "Logging", "-z"], "-z");
    usage(
        &["--backend", "Logging", "-l", &s(dir.path()), "-m", "999"],
        "999",
    );
    let x = dir.path().join("x");
    usage(&["--backend", "Memory", "-l", &s(&x)], "-l");
    assert!(!x.exists(), "Memory with -l created {}", x.display());
    usage(&["--backend", "Logging", "--context", "lots"], "lots");
    usage(&["--backend", "File"], "-f");
}
