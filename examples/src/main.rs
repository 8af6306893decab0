//! `vspc-fake-vm`: one simulated ESXi virtual serial port, for trying a
//! concentrator without vSphere.
//!
//! It connects to the proxy port, does ESXi's whole handshake (the same one
//! the test suite checks against real captures), and then bridges the VM's
//! serial port to this terminal: lines typed here are the VM's output (every
//! console sees them) and whatever consoles type is printed here. With
//! `--echo` it behaves like a guest that echoes its input. It stays
//! connected when its input ends (so it can run in the background) until
//! interrupted.
//!
//! ```sh
//! cargo run -p vspc-examples -- --proxy 127.0.0.1:13370 --name demo-vm --echo
//! telnet 127.0.0.1 50000
//! ```

#![forbid(unsafe_code)]

use clap::Parser;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use vspc_testkit::sim::{Identity, SimVm};

/// One simulated ESXi virtual serial port.
#[derive(Parser)]
#[command(name = "vspc-fake-vm", version)]
struct Args {
    /// The concentrator's proxy port.
    #[arg(long, default_value = "127.0.0.1:13370")]
    proxy: String,
    /// The VM's display name; its uuid is derived from it, so the same name
    /// gets the same console port back.
    #[arg(long, default_value = "fake-vm")]
    name: String,
    /// The serial port's service URI (DO-PROXY).
    #[arg(long, default_value = "vSPC.py")]
    uri: String,
    /// Echo console input back as VM output, like a guest's shell would.
    #[arg(long)]
    echo: bool,
}

/// A stable uuid for `name` (two FNV-1a hashes), so restarts reconnect as
/// the same VM.
fn uuid_for(name: &str) -> [u8; 16] {
    let fnv = |seed: u64| {
        name.bytes().fold(seed, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    };
    let mut uuid = [0u8; 16];
    uuid[..8].copy_from_slice(&fnv(0xcbf2_9ce4_8422_2325).to_be_bytes());
    uuid[8..].copy_from_slice(&fnv(0x84222325_cbf29ce4).to_be_bytes());
    uuid
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let id = Identity {
        uuid: uuid_for(&args.name),
        name: args.name.clone(),
        service_uri: args.uri.clone(),
        direction: b'S',
    };
    let vm = match SimVm::connect(args.proxy.as_str(), &id).await {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("vspc-fake-vm: cannot connect to {}: {e}", args.proxy);
            return std::process::ExitCode::from(1);
        }
    };
    eprintln!(
        "vspc-fake-vm: {} (uuid {}) is connected to {}; type lines to send them as VM output",
        id.name,
        id.uuid_display(),
        args.proxy
    );
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    let mut stdout = tokio::io::stdout();
    loop {
        tokio::select! {
            line = lines.next_line(), if stdin_open => match line {
                Ok(Some(line)) => {
                    let mut out = line.into_bytes();
                    out.extend_from_slice(b"\r\n");
                    if let Err(e) = vm.send(&out).await {
                        eprintln!("vspc-fake-vm: connection lost: {e}");
                        return std::process::ExitCode::from(1);
                    }
                }
                // Without input (started with &, or </dev/null) the VM stays
                // connected until interrupted.
                Ok(None) | Err(_) => stdin_open = false,
            },
            _ = tokio::signal::ctrl_c() => break,
            input = vm.recv_data(Duration::from_millis(200)) => {
                if !input.is_empty() {
                    let _ = stdout.write_all(&input).await;
                    let _ = stdout.flush().await;
                    if args.echo && vm.send(&input).await.is_err() {
                        break;
                    }
                }
                if let Some(why) = vm.closed() {
                    eprintln!("vspc-fake-vm: the concentrator closed the connection: {why}");
                    return std::process::ExitCode::from(1);
                }
            }
        }
    }
    vm.close().await;
    std::process::ExitCode::SUCCESS
}
