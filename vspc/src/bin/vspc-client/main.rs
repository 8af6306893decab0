//! `vspc-client`: list a vspc daemon's VMs, clear a VM's consoles, or open a
//! VM's console, over the daemon's native admin protocol (see
//! `vspc/src/admin/native.rs`). The successor of vSPC.py's `vSPCClient`.
//!
//! With no VM it prints the listing as `name:uuid:port` lines. With a VM it
//! sends `connect VM MODE`; after the one-line JSON answer the same TCP
//! connection is a telnet console, bridged to stdin and stdout.
//!
//! When stdin is a terminal it is put in raw mode for the session and its
//! saved settings are restored on every way out: quitting, the server
//! closing, errors, SIGTERM, SIGHUP or SIGINT (caught, so the process returns
//! normally) and panics (a `Drop` guard, plus a panic hook that restores
//! before the message is printed). Ctrl-] then opens a small command menu.
//! When stdin is not a terminal the terminal settings are never touched and
//! bytes pass through untouched (no escape character), so files and
//! scripts can be piped in; end of input ends the session.
//!
//! The client depends on the codec crate (`vspc_codec`) only, never on the
//! daemon's library. Its modules:
//!
//! | module | what it owns |
//! | --- | --- |
//! | [`cli`] | the flags, the lock modes and the help text |
//! | [`output`] | [`Failure`](output::Failure), exit statuses, writes to stdout and stderr |
//! | [`admin`] | the admin conversation: connect, one command, one JSON answer |
//! | [`commands`] | `list` (the listing) and `clear` |
//! | [`session`] | the console: a telnet connection bridged to stdin and stdout |
//! | [`outgoing`] | the task that writes to the server |
//! | [`menu`] | the Ctrl-] `vspc>` prompt |
//! | [`terminal`] | stdin's terminal settings: raw mode and its restoring |
//! | [`input`] | the thread that reads stdin |
//! | [`signals`] | the signals that end a session cleanly |

#![forbid(unsafe_code)]

mod admin;
mod cli;
mod commands;
mod input;
mod menu;
mod outgoing;
mod output;
mod session;
mod signals;
mod terminal;

use std::process::ExitCode;

use clap::Parser;

use crate::admin::Server;
use crate::cli::Cli;
use crate::output::{failure, say, Failure, EXIT_ERROR, EXIT_USAGE};
use crate::terminal::Terminal;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut term = Terminal::new();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            say(&format!("vspc-client: cannot start the runtime: {e}\n"));
            return ExitCode::from(EXIT_ERROR);
        }
    };
    let result = runtime.block_on(run(&cli, &mut term));
    // Restore before any message, whatever happened.
    term.restore();
    drop(runtime);
    match result {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            say(&format!("vspc-client: {}\n", f.message));
            ExitCode::from(f.code)
        }
    }
}

/// Check the VM names, then do what the flags ask; the exit status.
async fn run(cli: &Cli, term: &mut Terminal) -> Result<u8, Failure> {
    for name in cli.vm.iter().chain(cli.clear.iter()) {
        if name.contains(['\n', '\r']) {
            return Err(failure(EXIT_USAGE, "a VM name cannot contain a line break"));
        }
    }
    let server = Server::new(&cli.server, cli.admin_port);
    if let Some(vm) = &cli.clear {
        return commands::clear(&server, vm).await;
    }
    match &cli.vm {
        None => commands::list(&server, cli.json).await,
        Some(vm) => session::console(&server, vm, cli.lock_mode, term).await,
    }
}
