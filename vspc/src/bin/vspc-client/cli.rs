//! The command line: the flags (clap), the lock modes a console can ask for,
//! and the help text with the exit statuses and the escape menu.

use clap::{Parser, ValueEnum};

const AFTER_HELP: &str = "\
Exit status:
  0  success; also when the session ends by `quit`, end of input, or the server closing it
  1  error: cannot connect, protocol error, or no such VM
  2  usage error
  3  the server refused the requested lock
  128+N  ended by signal N (SIGHUP, SIGINT, SIGTERM), terminal restored

In a session on a terminal, Ctrl-] opens a prompt: `continue` (`c` or an
empty line) returns to the console, `print-escape` sends a Ctrl-] to the VM,
`quit` (`q`) leaves. When stdin is not a terminal, input is passed through
byte for byte (no escape character) and end of input ends the session.";

#[derive(Parser)]
#[command(
    name = "vspc-client",
    version,
    about = "List the VMs of a vspc daemon, or open a VM's serial console",
    after_help = AFTER_HELP
)]
pub(crate) struct Cli {
    /// The vspc server.
    #[arg(
        short = 's',
        long = "server",
        value_name = "HOST",
        default_value = "127.0.0.1"
    )]
    pub(crate) server: String,
    /// Its admin port.
    #[arg(
        short = 'a',
        long = "admin-port",
        value_name = "PORT",
        default_value_t = 13371
    )]
    pub(crate) admin_port: u16,
    /// The lock to ask for on the VM's console.
    #[arg(
        long = "client-lock-mode",
        value_name = "MODE",
        value_enum,
        default_value_t = LockMode::FreeForAllFallback
    )]
    pub(crate) lock_mode: LockMode,
    /// Disconnect every console of VM (a name or uuid), then exit.
    #[arg(long, value_name = "VM", conflicts_with_all = ["vm", "json"])]
    pub(crate) clear: Option<String>,
    /// With no VM: print the server's VM list as one line of JSON.
    #[arg(long, conflicts_with = "vm")]
    pub(crate) json: bool,
    /// The VM (name or uuid) whose console to open; without it, list the VMs.
    #[arg(value_name = "VM")]
    pub(crate) vm: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LockMode {
    /// Nobody else may watch or type.
    Exclusive,
    /// Nobody else may type; others may watch.
    Write,
    /// Everybody may type (fails while someone holds a write lock).
    FreeForAll,
    /// free-for-all, or read-only while someone holds a write lock.
    FreeForAllFallback,
}

impl LockMode {
    /// The mode's name in the admin protocol (and on the command line).
    pub(crate) fn name(self) -> &'static str {
        match self {
            LockMode::Exclusive => "exclusive",
            LockMode::Write => "write",
            LockMode::FreeForAll => "free-for-all",
            LockMode::FreeForAllFallback => "free-for-all-fallback",
        }
    }
}
