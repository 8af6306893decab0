//! vspc's wire formats as plain functions and state machines, with no
//! sockets, no runtime and no daemon: the telnet codec ([`wire`]),
//! VMware's option-232 messages ([`vmware`]), vSPC.py's pickles
//! ([`pickle`]) and shell-style words ([`words`]). The daemon, its client,
//! the simulators, the load tool and the fuzz targets all build on this
//! crate; `vspc/PROTOCOL.md` describes the formats.

#![forbid(unsafe_code)]

pub mod pickle;
pub mod vmware;
pub mod wire;
pub mod words;
