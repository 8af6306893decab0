//! Where the daemon under test is and listens: the `vspc` binary, the
//! workspace root, and free loopback ports. By default every daemon gets
//! its own proxy and admin ports and its own console port range, picked at
//! random in 20000..32000 and checked with a bind first, so test processes
//! running side by side do not collide.

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

/// The `vspc` binary to run: `$VSPC_BIN` if set, else the `vspc` Cargo built
/// beside the running program (`target/<profile>/vspc`, found from a test
/// binary in `target/<profile>/deps/` or a tool in `target/<profile>/`).
pub fn bin() -> &'static str {
    static BIN: OnceLock<String> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("VSPC_BIN") {
            return path.to_string_lossy().into_owned();
        }
        let exe = std::env::current_exe().unwrap_or_default();
        exe.ancestors()
            .skip(1)
            .take(2)
            .map(|dir| dir.join("vspc"))
            .find(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("vspc"))
            .to_string_lossy()
            .into_owned()
    })
}

/// The workspace root (the `vspc` package lives one level below).
pub fn repo_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

fn taken() -> &'static Mutex<HashSet<u16>> {
    static TAKEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    TAKEN.get_or_init(|| Mutex::new(HashSet::new()))
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("getrandom");
    u64::from_le_bytes(b)
}

fn bindable(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A port in 20000..32000 that this process has never handed out and that
/// can be bound right now.
pub fn free_port() -> u16 {
    let mut taken = taken().lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let p = 20000 + (random_u64() % 12000) as u16;
        if !taken.contains(&p) && bindable(p) {
            taken.insert(p);
            return p;
        }
    }
}

/// The start R of `len` consecutive ports in 20000..31000, none handed out
/// before and all bindable now.
pub fn free_range(len: u16) -> u16 {
    let mut taken = taken().lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let r = 20000 + (random_u64() % (11000 - u64::from(len))) as u16;
        let ports = r..r + len;
        if ports.clone().all(|p| !taken.contains(&p)) && ports.clone().all(bindable) {
            taken.extend(ports);
            return r;
        }
    }
}
