//! vspc's end-to-end tests, in one test binary: the real `vspc` (and
//! `vspc-client`) binaries on private loopback ports, simulated ESXi hosts
//! and console users from `vspc-testkit`, and real client programs. Every
//! test starts its own daemon, so they run in parallel; a failing test
//! prints its daemon's log.
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
//! | [`ssh`] | the SSH front door with OpenSSH's client: byte-exact consoles, `~.`, key patterns and modes, `list@`, refused keys and passwords, SIGHUP reload, audit lines, a pty, bulk both ways, a stopped client dropped as a stall, EOF and killed clients, revocation over ControlMaster, auth and idle timeouts, the unauthenticated cap, key file permissions |

mod access;
mod admin;
mod backends;
mod certs;
mod client;
mod common;
mod daemon;
mod flow;
mod hardening;
mod http;
mod packaging;
mod real_clients;
mod ssh;
mod vspcpy;
mod web;
