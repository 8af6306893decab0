//! A simulated VM and its consoles, up and in step with the daemon: the
//! first lines of most tests.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::admin::wait_for_vm;
use crate::launcher::Daemon;
use crate::sim::{Identity, SimConsole, SimVm};
use crate::wait::T;

/// Connect a VM and wait until it is listed; returns it and its port.
pub async fn vm_up(d: &Daemon, id: &Identity) -> (SimVm, u16) {
    let vm = SimVm::connect(d.proxy, id)
        .await
        .unwrap_or_else(|e| panic!("VM {} did not connect: {e}", id.name));
    let (_, port) = wait_for_vm(d.admin, &id.name, T).await;
    (vm, port)
}

/// Connect a console to `port` and make sure the daemon has processed its
/// negotiation answers before returning: the console types a unique marker
/// and `vm` must receive exactly it (the answers were sent before it).
pub async fn console_synced(vm: &SimVm, daemon: &Daemon, port: u16) -> SimConsole {
    let console = SimConsole::connect(daemon.console(port))
        .await
        .unwrap_or_else(|e| panic!("console on port {port}: {e}"));
    sync_console(vm, &console).await;
    console
}

/// Type a unique marker on `console` and read exactly it on `vm`.
pub async fn sync_console(vm: &SimVm, console: &SimConsole) {
    static N: AtomicU32 = AtomicU32::new(0);
    let marker = format!("<sync {}>", N.fetch_add(1, Ordering::Relaxed));
    console.send(marker.as_bytes()).await.expect("console send");
    let got = vm
        .read_exact_data(marker.len(), T)
        .await
        .unwrap_or_else(|e| panic!("VM did not get the console's sync marker: {e}"));
    assert_eq!(
        String::from_utf8_lossy(&got),
        marker,
        "VM got something else than the sync marker"
    );
}
