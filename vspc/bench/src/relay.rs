//! `vspc-bench relay-server` (hidden): the bare TCP relay `fanout` and
//! `latency` measure the daemon against. One port takes "VM" connections,
//! one takes "console" connections; each opens with a header line (`vm ID`
//! or `console ID`), answered with `ok`. A VM's connection then gets one
//! task that reads its bytes and writes each read to that VM's consoles in
//! turn with plain tokio writes: no telnet, no queues, no bookkeeping
//! beyond a `Vec` of sockets. Each console gets a task that copies its
//! input to the VM. Consoles must connect before their VM; a VM takes the
//! consoles registered at its header.
//!
//! It runs as a child process of the bench (so it gets its own CPU, as the
//! daemon does) and exits when its stdin reaches EOF, i.e. when the bench is
//! gone, however the bench ended.

use std::collections::HashMap;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::Failure;

/// The relay's answer to a header.
pub(crate) const OK: &[u8] = b"ok\n";
/// Longest header line accepted.
const HEADER_MAX: usize = 64;
/// Read size of a VM connection.
const BUF: usize = 64 * 1024;

#[derive(Args)]
pub struct RelayArgs {
    /// Port for the VM connections (on 127.0.0.1).
    #[arg(long, value_name = "P")]
    vm_port: u16,
    /// Port for the console connections (on 127.0.0.1).
    #[arg(long, value_name = "P")]
    console_port: u16,
}

/// Consoles waiting for their VM, by VM id.
type Waiting = Arc<Mutex<HashMap<u32, Vec<TcpStream>>>>;

pub fn serve(args: RelayArgs) -> Result<(), Failure> {
    let rt = super::runtime().map_err(|e| format!("relay: {e}"))?;
    let result = rt.block_on(async {
        let bind = |port: u16| async move {
            TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
                .await
                .map_err(|e| format!("relay: cannot listen on 127.0.0.1:{port}: {e}"))
        };
        let vms = bind(args.vm_port).await?;
        let consoles = bind(args.console_port).await?;
        let waiting = Waiting::default();
        // The bench holds our stdin; EOF means it is gone.
        let orphaned = tokio::task::spawn_blocking(|| {
            let mut byte = [0u8; 1];
            while matches!(std::io::stdin().read(&mut byte), Ok(n) if n > 0) {}
        });
        tokio::select! {
            r = accept_loop(vms, waiting.clone(), true) => r,
            r = accept_loop(consoles, waiting, false) => r,
            _ = orphaned => Ok(()),
        }
    });
    // The blocking stdin reader may still be waiting; do not wait for it.
    rt.shutdown_background();
    result.map_err(Failure::Error)
}

async fn accept_loop(listener: TcpListener, waiting: Waiting, vm: bool) -> Result<(), String> {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors and the like: say so, go on.
                eprintln!("relay: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let waiting = waiting.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, waiting, vm).await {
                eprintln!("relay: {e}");
            }
        });
    }
}

async fn connection(mut stream: TcpStream, waiting: Waiting, vm: bool) -> Result<(), String> {
    stream
        .set_nodelay(true)
        .map_err(|e| format!("set_nodelay: {e}"))?;
    // A connection that closes without a header is a readiness probe.
    let Some(line) = header(&mut stream).await? else {
        return Ok(());
    };
    let (kind, id) = line
        .split_once(' ')
        .and_then(|(k, id)| Some((k, id.parse::<u32>().ok()?)))
        .ok_or_else(|| format!("bad header {line:?}"))?;
    match (kind, vm) {
        ("console", false) => {
            // Registered before the answer can arrive: the bench connects
            // the VM as soon as its consoles are answered, and a VM takes
            // only the consoles registered by then.
            loop {
                stream
                    .writable()
                    .await
                    .map_err(|e| format!("console of VM {id}: {e}"))?;
                let mut registry = lock(&waiting);
                match stream.try_write(OK) {
                    Ok(n) if n == OK.len() => {
                        registry.entry(id).or_default().push(stream);
                        return Ok(());
                    }
                    // Three bytes on a new connection go whole or not at all.
                    Ok(n) => return Err(format!("console of VM {id}: wrote {n} bytes of `ok`")),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(format!("console of VM {id}: {e}")),
                }
            }
        }
        ("vm", true) => {
            let consoles = lock(&waiting).remove(&id).unwrap_or_default();
            stream
                .write_all(OK)
                .await
                .map_err(|e| format!("VM {id}: {e}"))?;
            relay(stream, consoles).await;
            Ok(())
        }
        _ => Err(format!("header {line:?} on the wrong port")),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The header line without its newline; `None` at EOF before any byte.
async fn header(stream: &mut TcpStream) -> Result<Option<String>, String> {
    // The peer sends nothing more until we answer, so reading one byte at
    // a time cannot take any of what follows.
    let mut line = Vec::new();
    loop {
        let mut byte = [0u8; 1];
        match stream.read(&mut byte).await {
            Ok(0) if line.is_empty() => return Ok(None),
            Ok(0) => return Err("connection closed inside its header".into()),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() < HEADER_MAX => line.push(byte[0]),
            Ok(_) => return Err("header line too long".into()),
            Err(e) => return Err(format!("reading a header: {e}")),
        }
    }
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| "header is not UTF-8".into())
}

/// Copy everything the VM sends to each console (a console whose write
/// fails is dropped), and every console's input to the VM.
async fn relay(vm: TcpStream, consoles: Vec<TcpStream>) {
    let (mut vm_in, vm_out) = vm.into_split();
    let vm_out = Arc::new(tokio::sync::Mutex::new(vm_out));
    // Dropped (and so aborted) when the VM's connection ends.
    let mut inputs = tokio::task::JoinSet::new();
    let mut outs = Vec::with_capacity(consoles.len());
    for console in consoles {
        let (mut input, out) = console.into_split();
        outs.push(out);
        let vm_out = vm_out.clone();
        inputs.spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let n = match input.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if vm_out.lock().await.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        });
    }
    let mut buf = vec![0u8; BUF];
    loop {
        let n = match vm_in.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut i = 0;
        while i < outs.len() {
            if outs[i].write_all(&buf[..n]).await.is_ok() {
                i += 1;
            } else {
                outs.swap_remove(i);
            }
        }
    }
}
