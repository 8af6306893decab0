//! The kinds of console client `fanout` and `burst` attach
//! (`--console-kind`), and what each must see on the wire.
//!
//! - **speak-first**: a telnet client that sends its own negotiation as soon
//!   as it connects, as PuTTY does; the daemon knows it at once. It is
//!   attached, negotiated and then read with telnet decoding.
//! - **silent-telnet**: a telnet client that sends nothing until the server
//!   negotiates, then answers every negotiation, as inetutils `telnet HOST
//!   PORT` does. It is only connected before the flood starts, and answers
//!   the daemon's offer (and any later negotiation) while it reads.
//! - **silent-raw**: a program that never sends a byte and speaks no
//!   telnet (`nc HOST PORT > file`, `socat -u TCP:HOST:PORT FILE`). In the
//!   daemon's default `--console-protocol auto` its stream must be the
//!   daemon's 15-byte telnet offer ([`TELNET_OFFER`], sent after 0.3 s of
//!   silence) followed by the VM's bytes as they are (no 0xFF doubling).
//!
//! The commonest real clients are the silent ones, so the default mixes
//! the three.

use serde::Serialize;

/// The daemon's telnet offer to a console that stayed silent (WILL ECHO,
/// WILL SGA, WILL BINARY, DO BINARY, DO SGA: `offer()` in
/// `vspc/src/session/console.rs`).
pub(crate) const TELNET_OFFER: &[u8] =
    b"\xff\xfb\x01\xff\xfb\x03\xff\xfb\x00\xff\xfd\x00\xff\xfd\x03";

/// `--console-kind`, shared by `fanout` and `burst`.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct KindOpts {
    /// Which console clients attach: `speak-first`, telnet clients that
    /// negotiate as soon as they connect (PuTTY); `silent-telnet`, telnet
    /// clients that send nothing until the daemon negotiates, then answer
    /// (inetutils `telnet HOST PORT`); `silent-raw`, clients that never
    /// send a byte and decode no telnet (`nc HOST PORT > file`, `socat -u`),
    /// whose stream must be the daemon's 15-byte telnet offer and then the
    /// VM's bytes as they are; or `mixed`, where console k of the run is
    /// speak-first, silent-telnet, silent-raw for k % 3 = 0, 1, 2 (so every
    /// VM with 3 or more consoles has all three, and with one console per
    /// VM the VMs alternate). The commonest real clients are silent, so the
    /// default mixes them in. The relay phase has no telnet: there every
    /// kind reads the relayed bytes alike.
    ///
    /// The VMs start writing as soon as the daemon has attached every
    /// console (its admin `stats` counts them all), which is inside its
    /// 0.3 s detection window: the flood does not wait for silent consoles
    /// to be told apart, and the daemon must hold their output, not drop
    /// it. What a silent-raw console expects follows the daemon's
    /// --console-protocol as given with --daemon-arg (auto when none):
    /// with `raw` it gets no offer, and only silent-raw can run; with
    /// `telnet`, silent-raw and mixed are refused.
    ///
    /// A console reading at full speed fails the run, listed by kind after
    /// the JSON line, if the daemon tells it output was skipped, if it gets
    /// a wrong byte or is closed, or if it has not received its last byte
    /// 30 s after the relay (which runs first) finished the same work;
    /// with --no-relay, when no console has verified a byte for
    /// --stall-secs. [default: mixed]
    #[arg(long, value_enum, value_name = "KIND")]
    pub(crate) console_kind: Option<ConsoleKindArg>,
}

impl KindOpts {
    /// The kinds against a daemon started with `daemon_args`.
    pub(crate) fn kinds(&self, daemon_args: &[String]) -> Result<Kinds, String> {
        Kinds::new(self.console_kind.unwrap_or_default(), daemon_args)
    }
}

/// `--console-kind`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ConsoleKindArg {
    /// Telnet clients that wait for the daemon to negotiate, then answer
    /// (inetutils `telnet HOST PORT`).
    SilentTelnet,
    /// Telnet clients that negotiate as soon as they connect (PuTTY).
    SpeakFirst,
    /// Clients that never send a byte and decode no telnet (`nc`, `socat
    /// -u`).
    SilentRaw,
    /// Console k of the run gets speak-first, silent-telnet, silent-raw for
    /// k % 3 = 0, 1, 2.
    #[default]
    Mixed,
}

impl ConsoleKindArg {
    /// The report's `console_kind`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            ConsoleKindArg::SilentTelnet => "silent-telnet",
            ConsoleKindArg::SpeakFirst => "speak-first",
            ConsoleKindArg::SilentRaw => "silent-raw",
            ConsoleKindArg::Mixed => "mixed",
        }
    }
}

/// One console's kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ConsoleKind {
    SpeakFirst,
    SilentTelnet,
    SilentRaw,
}

impl ConsoleKind {
    /// In `mixed` order.
    pub(crate) const ALL: [ConsoleKind; 3] = [
        ConsoleKind::SpeakFirst,
        ConsoleKind::SilentTelnet,
        ConsoleKind::SilentRaw,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            ConsoleKind::SpeakFirst => "speak-first",
            ConsoleKind::SilentTelnet => "silent-telnet",
            ConsoleKind::SilentRaw => "silent-raw",
        }
    }

    /// Sends nothing before the daemon does.
    pub(crate) fn silent(self) -> bool {
        self != ConsoleKind::SpeakFirst
    }
}

/// The daemon's `--console-protocol`, as the bench passes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DaemonProtocol {
    Auto,
    Telnet,
    Raw,
}

impl DaemonProtocol {
    /// The last `--console-protocol` among the daemon's flags (`--console-
    /// protocol=MODE` or `--console-protocol MODE`, as clap takes them);
    /// `auto`, the daemon's default, if none.
    pub(crate) fn of_args(args: &[String]) -> Result<DaemonProtocol, String> {
        const FLAG: &str = "--console-protocol";
        let mut found = None;
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let value = if arg == FLAG {
                Some(args.next().map(String::as_str).ok_or_else(|| {
                    format!("--daemon-arg={FLAG} needs a value (another --daemon-arg)")
                })?)
            } else {
                arg.strip_prefix(FLAG).and_then(|v| v.strip_prefix('='))
            };
            if let Some(value) = value {
                found = Some(match value {
                    "auto" => DaemonProtocol::Auto,
                    "telnet" => DaemonProtocol::Telnet,
                    "raw" => DaemonProtocol::Raw,
                    other => {
                        return Err(format!(
                            "--daemon-arg gives {FLAG} {other:?}; the daemon takes auto, \
                             telnet or raw"
                        ))
                    }
                });
            }
        }
        Ok(found.unwrap_or(DaemonProtocol::Auto))
    }

    fn name(self) -> &'static str {
        match self {
            DaemonProtocol::Auto => "auto",
            DaemonProtocol::Telnet => "telnet",
            DaemonProtocol::Raw => "raw",
        }
    }
}

/// Which kind each console of a run is, and what a silent raw one must
/// receive before the VM's bytes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Kinds {
    arg: ConsoleKindArg,
    protocol: DaemonProtocol,
}

impl Kinds {
    /// `--console-kind` against a daemon started with `daemon_args`; an
    /// error for a combination whose stream a console cannot make sense
    /// of.
    pub(crate) fn new(arg: ConsoleKindArg, daemon_args: &[String]) -> Result<Kinds, String> {
        let protocol = DaemonProtocol::of_args(daemon_args)?;
        let kinds = Kinds { arg, protocol };
        let has = |kind| kinds.includes(kind);
        match protocol {
            DaemonProtocol::Auto => {}
            DaemonProtocol::Telnet if has(ConsoleKind::SilentRaw) => {
                return Err(format!(
                    "--console-kind {} cannot run against --console-protocol=telnet: that \
                     daemon negotiates telnet at once and doubles 0xFF, which a silent-raw \
                     console (it never answers and decodes no telnet) cannot make sense of; \
                     use --console-kind silent-telnet or speak-first",
                    arg.name()
                ))
            }
            DaemonProtocol::Telnet => {}
            DaemonProtocol::Raw
                if has(ConsoleKind::SpeakFirst) || has(ConsoleKind::SilentTelnet) =>
            {
                return Err(format!(
                    "--console-kind {} cannot run against --console-protocol=raw: that \
                     daemon never negotiates, so a speak-first console would wait for an \
                     answer forever and a silent-telnet one would read raw output as \
                     telnet; use --console-kind silent-raw",
                    arg.name()
                ))
            }
            DaemonProtocol::Raw => {}
        }
        Ok(kinds)
    }

    /// Every console speaks first (the modes without `--console-kind`).
    pub(crate) fn speak_first() -> Kinds {
        Kinds {
            arg: ConsoleKindArg::SpeakFirst,
            protocol: DaemonProtocol::Auto,
        }
    }

    /// The kind of console `k` of the run (counted over every VM's
    /// consoles, VM by VM).
    pub(crate) fn of(&self, k: usize) -> ConsoleKind {
        match self.arg {
            ConsoleKindArg::SpeakFirst => ConsoleKind::SpeakFirst,
            ConsoleKindArg::SilentTelnet => ConsoleKind::SilentTelnet,
            ConsoleKindArg::SilentRaw => ConsoleKind::SilentRaw,
            ConsoleKindArg::Mixed => ConsoleKind::ALL[k % ConsoleKind::ALL.len()],
        }
    }

    fn includes(&self, kind: ConsoleKind) -> bool {
        match self.arg {
            ConsoleKindArg::Mixed => true,
            _ => self.of(0) == kind,
        }
    }

    /// What a silent-raw console receives before the VM's bytes: the
    /// telnet offer in `auto`, nothing in `raw`.
    pub(crate) fn raw_prefix(&self) -> &'static [u8] {
        match self.protocol {
            DaemonProtocol::Auto => TELNET_OFFER,
            DaemonProtocol::Telnet | DaemonProtocol::Raw => b"",
        }
    }

    /// The report's `console_kind`.
    pub(crate) fn name(&self) -> &'static str {
        self.arg.name()
    }

    /// For the progress lines.
    pub(crate) fn protocol_name(&self) -> &'static str {
        self.protocol.name()
    }
}

/// A count per console kind, for the report; kinds the run has none of
/// are left out.
#[derive(Serialize, Default, Debug, PartialEq, Eq)]
pub(crate) struct ByKind {
    #[serde(rename = "speak-first", skip_serializing_if = "Option::is_none")]
    speak_first: Option<u64>,
    #[serde(rename = "silent-telnet", skip_serializing_if = "Option::is_none")]
    silent_telnet: Option<u64>,
    #[serde(rename = "silent-raw", skip_serializing_if = "Option::is_none")]
    silent_raw: Option<u64>,
}

impl ByKind {
    /// Of `consoles` (each a kind and whether it counts), how many count,
    /// by kind.
    pub(crate) fn count(consoles: impl Iterator<Item = (Option<ConsoleKind>, bool)>) -> ByKind {
        let mut by = ByKind::default();
        for (kind, counts) in consoles {
            let slot = match kind {
                Some(ConsoleKind::SpeakFirst) => &mut by.speak_first,
                Some(ConsoleKind::SilentTelnet) => &mut by.silent_telnet,
                Some(ConsoleKind::SilentRaw) => &mut by.silent_raw,
                None => continue,
            };
            *slot.get_or_insert(0) += u64::from(counts);
        }
        by
    }
}

/// "silent-telnet 2, silent-raw 1": how many of `kinds` are of each kind.
pub(crate) fn tally(kinds: impl Iterator<Item = Option<ConsoleKind>>) -> String {
    let kinds: Vec<Option<ConsoleKind>> = kinds.collect();
    ConsoleKind::ALL
        .iter()
        .filter_map(|&k| {
            let n = kinds.iter().filter(|&&c| c == Some(k)).count();
            (n > 0).then(|| format!("{} {n}", k.name()))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use vspc_codec::wire::{opt, Negotiator, OptionSet};

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_offer_is_what_the_daemons_negotiator_writes() {
        // The calls of `offer()` in vspc/src/session/console.rs, in order.
        let mut neg = Negotiator::new(
            OptionSet::of(&[opt::BINARY, opt::SGA, opt::ECHO]),
            OptionSet::of(&[opt::BINARY, opt::SGA]),
        );
        let mut out = Vec::new();
        neg.enable_local(opt::ECHO, &mut out);
        neg.enable_local(opt::SGA, &mut out);
        neg.enable_local(opt::BINARY, &mut out);
        neg.enable_remote(opt::BINARY, &mut out);
        neg.enable_remote(opt::SGA, &mut out);
        assert_eq!(out, TELNET_OFFER);
        assert_eq!(TELNET_OFFER.len(), 15);
    }

    #[test]
    fn mixed_gives_every_vm_with_three_consoles_all_kinds() {
        let k = Kinds::new(ConsoleKindArg::Mixed, &[]).expect("auto");
        let kinds: Vec<ConsoleKind> = (0..6).map(|i| k.of(i)).collect();
        assert_eq!(&kinds[..3], &ConsoleKind::ALL);
        assert_eq!(&kinds[3..], &ConsoleKind::ALL);
        // Four consoles a VM: the second VM's are 4..8, all three again.
        for vm in 0..5 {
            let of_vm: Vec<ConsoleKind> = (vm * 4..vm * 4 + 4).map(|i| k.of(i)).collect();
            assert!(ConsoleKind::ALL.iter().all(|x| of_vm.contains(x)), "{vm}");
        }
        assert_eq!(k.raw_prefix(), TELNET_OFFER);
    }

    #[test]
    fn reads_the_daemons_console_protocol() {
        let p = |a: &[&str]| DaemonProtocol::of_args(&args(a));
        assert_eq!(p(&[]), Ok(DaemonProtocol::Auto));
        assert_eq!(
            p(&["--console-queue=1", "--console-protocol=raw"]),
            Ok(DaemonProtocol::Raw)
        );
        assert_eq!(
            p(&["--console-protocol", "telnet"]),
            Ok(DaemonProtocol::Telnet)
        );
        assert_eq!(
            p(&["--console-protocol=raw", "--console-protocol=auto"]),
            Ok(DaemonProtocol::Auto)
        );
        assert!(p(&["--console-protocol=gdb"])
            .unwrap_err()
            .contains("\"gdb\""));
        assert!(p(&["--console-protocol"]).is_err());
    }

    #[test]
    fn refuses_consoles_that_cannot_read_the_daemons_stream() {
        let k = |arg, a: &[&str]| Kinds::new(arg, &args(a));
        let telnet = ["--console-protocol=telnet"];
        let raw = ["--console-protocol=raw"];
        for arg in [ConsoleKindArg::SilentRaw, ConsoleKindArg::Mixed] {
            let e = k(arg, &telnet).unwrap_err();
            assert!(e.contains("--console-protocol=telnet"), "{e}");
        }
        for arg in [ConsoleKindArg::SilentTelnet, ConsoleKindArg::SpeakFirst] {
            assert!(k(arg, &telnet).is_ok());
            let e = k(arg, &raw).unwrap_err();
            assert!(e.contains("--console-protocol=raw"), "{e}");
        }
        assert!(k(ConsoleKindArg::Mixed, &raw).is_err());
        let silent_raw = k(ConsoleKindArg::SilentRaw, &raw).expect("raw reader on raw");
        assert_eq!(silent_raw.raw_prefix(), b"");
    }

    #[test]
    fn counts_by_kind() {
        let by = ByKind::count(
            [
                (Some(ConsoleKind::SpeakFirst), true),
                (Some(ConsoleKind::SilentRaw), false),
                (Some(ConsoleKind::SilentRaw), true),
                (None, true),
            ]
            .into_iter(),
        );
        assert_eq!(
            serde_json::to_string(&by).expect("serialises"),
            r#"{"speak-first":1,"silent-raw":1}"#
        );
        assert_eq!(
            tally(
                [
                    Some(ConsoleKind::SilentRaw),
                    Some(ConsoleKind::SilentTelnet),
                    Some(ConsoleKind::SilentTelnet)
                ]
                .into_iter()
            ),
            "silent-telnet 2, silent-raw 1"
        );
    }
}
