//! vspc's end-to-end tests, in one test binary: the real `vspc` (and
//! `vspc-client`) binaries on private loopback ports, simulated ESXi hosts
//! and console users from `vspc-testkit`, and real client programs. Every
//! test starts its own daemon, so they run in parallel; a failing test
//! prints its daemon's log.
//!
//! # Adding a test
//!
//! Put it in the module of the door or feature it exercises (the table
//! below): the proxy port and VM sessions in `daemon`, data flow and slow
//! consoles in `flow`, the admin port in `admin`, HTTP in `http`, the
//! browser in `web`, SSH in `ssh`, a third-party program in
//! `real_clients`. Start from a small test and copy it:
//! `daemon::byte_exact_both_ways_with_two_consoles` is the pattern most
//! tests follow. Every helper comes from the test kit (`tests/kit`,
//! imported by `use crate::common::*`); do not write another one here:
//!
//! - a daemon: `Daemon::start(&["--flag", "value"])`, or
//!   `Daemon::builder()` for ports, environment or a wrapper; its log is
//!   `d.log()`, `d.wait_log(needle, T)`, `d.wait_log_count(..)`;
//! - a VM: `vm_up(&d, &Identity::numbered(N))` (connected and listed; use
//!   an `N` no other test uses), or `sim::SimVm` for handshakes by hand;
//! - a console: `console_synced(&vm, &d, port)` (negotiated and in step
//!   with the VM), or `sim::SimConsole` / `Raw` for byte-level checks;
//! - waiting: never a fixed `sleep`. Wait for the thing itself:
//!   `wait_consoles(&d, name, n)`, `wait_for_vm`, `wait_vm_gone`,
//!   `wait_vm_disconnected`, `eventually(T, || ..)`, `eventually_async`,
//!   `wait_for(T, what, async || ..)` (panics with the last reason), and
//!   `eventually_blocking` in a plain `#[test]`; a child process with
//!   `child_exit`;
//! - "nothing (more) arrives": `x.recv_data(SHORT)` is empty, or
//!   `assert!(!eventually(SHORT, || ..).await)`;
//! - time: `T` (5 s, one step's limit), `SHORT` (300 ms, a negative
//!   check), `DETECT_WINDOW` (the daemon's telnet-or-raw guess), `ms(n)`;
//! - data: `all_bytes(reps)` (every byte value plus CR/NUL/IAC pairs),
//!   `all_bytes_down(reps)`, `every_byte(reps)`, `XorShift` for
//!   reproducible garbage.
//!
//! A timer rule (expiry, the vMotion, identify or handshake timeout) is
//! tested in synthetic time by the unit tests in `vspc/src` (`hub.rs`,
//! `session/vm.rs`); here each timer runs once in real time, set short by
//! its flag. A sleep is only right when it is the thing under test (a
//! client that stalls, trickles or reads late), and then says so.
//!
//! | module | what it covers |
//! | --- | --- |
//! | [`daemon`] | the proxy port: captures replayed, negotiation, identity, vMotion, reconnects, expiry, TLS, flags, signals |
//! | [`flow`] | every byte to every console: bursts, slow and stuck consoles, lossless transcripts, raw clients |
//! | [`real_clients`] | gdb with gdbserver, socat, nc, inetutils and BusyBox telnet |
//! | [`admin`] | the admin port's two protocols, locks, vSPC.py's own client |
//! | [`client`] | `vspc-client` on a pseudo-terminal |
//! | [`backends`] | File, Logging, plugins, and start-up errors |
//! | [`http`] | the HTTP API and `/metrics`: endpoints, tokens, metrics that follow traffic, console logs |
//! | [`web`] | the browser console: its WebSocket byte-exact both ways, tokens and locks, the pages, and headless Chromium typing into it |
//! | [`access`] | `--proxy-allow` (refused VMs, a hijack, takeover warnings, bad ranges) and the audit lines and backend events of every console session |
//! | [`certs`] | the checked-in test certificates |
//! | [`hardening`] | hostile peers on the proxy and admin ports: forged log lines, 60,000-character names, a second VM claiming a name, unidentified floods, the admin allow-list |
//! | [`vspcpy`] | a vSPC.py site's first start: its File store (made by Python's shelve) imported, `vspc import`, a broken store refused |
//! | [`packaging`] | the Debian package: cargo-deb, `dpkg -i`, files, the vspc user, `systemd-analyze verify`/`security`, ExecStart as vspc with a VM and a console, remove and purge; logrotate losing no byte |
//! | [`cluster`] | cluster mode: three nodes on 127.0.0.1-3 with one Redis: listings everywhere, relayed consoles byte-exact, 60 VMs at once, vMotion across nodes, kill -9 failover, a Redis restart |
//! | [`ssh`] | the SSH front door with OpenSSH's client: byte-exact consoles, `~.`, key patterns and modes, `list@`, refused keys and passwords, SIGHUP reload, audit lines, a pty, bulk both ways, a stopped client dropped as a stall, EOF and killed clients, revocation over ControlMaster, auth and idle timeouts, the unauthenticated cap, key file permissions |

mod access;
mod admin;
mod backends;
mod certs;
mod client;
mod cluster;
mod common;
mod daemon;
mod flow;
mod hardening;
mod http;
mod packaging;
mod real_clients;
mod replay;
mod ssh;
mod vspcpy;
mod web;
