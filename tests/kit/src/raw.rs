//! A raw connection that records exactly what the daemon sends, for
//! byte-level tests of the proxy port, and readable forms of telnet
//! commands for failure messages.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::sim::Received;

/// A plain TCP connection for byte-level tests: everything the daemon sends
/// is kept as raw bytes and also decoded into commands and data.
pub struct Raw {
    pub stream: TcpStream,
    dec: vspc_codec::wire::Decoder,
    /// Every byte received.
    pub bytes: Vec<u8>,
    /// Every command received.
    pub events: Vec<Received>,
    /// Every data byte received (IAC unescaped).
    pub data: Vec<u8>,
    /// The daemon closed (EOF) or reset the connection.
    pub closed: bool,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream.set_nodelay(true).expect("nodelay");
        Raw {
            stream,
            dec: vspc_codec::wire::Decoder::default(),
            bytes: Vec::new(),
            events: Vec::new(),
            data: Vec::new(),
            closed: false,
        }
    }

    /// Write `bytes` in one write.
    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// One read, unless `deadline` passes first; false on timeout.
    async fn read_some(&mut self, deadline: tokio::time::Instant) -> bool {
        if self.closed {
            return false;
        }
        let mut buf = vec![0u8; 64 * 1024];
        match tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await {
            Err(_) => false,
            Ok(Ok(0)) | Ok(Err(_)) => {
                self.closed = true;
                true
            }
            Ok(Ok(n)) => {
                self.bytes.extend_from_slice(&buf[..n]);
                let (events, data) = (&mut self.events, &mut self.data);
                self.dec
                    .decode(&buf[..n], |ev| match ev {
                        vspc_codec::wire::Event::Data(d) => data.extend_from_slice(d),
                        other => events.extend(Received::from_event(&other)),
                    })
                    .unwrap_or_else(|e| panic!("daemon sent undecodable telnet: {e}"));
                true
            }
        }
    }

    /// Read until `done` holds (true), the connection ends or `limit` passes.
    pub async fn until(&mut self, limit: Duration, done: impl Fn(&Raw) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while !done(self) {
            if !self.read_some(deadline).await
                && (self.closed || tokio::time::Instant::now() >= deadline)
            {
                return done(self);
            }
        }
        true
    }

    /// Read until at least `n` commands have arrived in total.
    pub async fn until_events(&mut self, n: usize, limit: Duration) -> bool {
        self.until(limit, |r| r.events.len() >= n).await
    }

    /// Read until at least `n` bytes have arrived in total.
    pub async fn until_bytes(&mut self, n: usize, limit: Duration) -> bool {
        self.until(limit, |r| r.bytes.len() >= n).await
    }

    /// Read whatever arrives during `period`.
    pub async fn quiet(&mut self, period: Duration) {
        let deadline = tokio::time::Instant::now() + period;
        while self.read_some(deadline).await {}
    }

    /// Read until the daemon closes the connection; false if it did not
    /// within `limit`.
    pub async fn read_to_close(&mut self, limit: Duration) -> bool {
        self.until(limit, |r| r.closed).await
    }
}

/// A short readable form of a command, for failure messages.
pub fn describe(ev: &Received) -> String {
    use vspc_codec::wire::Verb;
    match ev {
        Received::Negotiate(verb, o) => {
            let v = match verb {
                Verb::Will => "WILL",
                Verb::Wont => "WONT",
                Verb::Do => "DO",
                Verb::Dont => "DONT",
            };
            format!("{v} {o}")
        }
        Received::Vmware(body) => match body.split_first() {
            Some((code, payload)) => format!("SB232 {code:02x} [{}]", crate::sim::hex(payload)),
            None => "SB232 (empty)".into(),
        },
        Received::Subneg { option, payload } => {
            format!("SB{option} [{}]", crate::sim::hex(payload))
        }
        Received::Command(c) => format!("IAC {c:02x}"),
        Received::Malformed(m) => format!("MALFORMED {m}"),
    }
}

/// [`describe`] for a list, one per line.
pub fn describe_all(events: &[Received]) -> String {
    events
        .iter()
        .enumerate()
        .map(|(i, e)| format!("  {i:3}: {}\n", describe(e)))
        .collect()
}
