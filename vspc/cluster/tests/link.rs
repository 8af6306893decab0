//! The node-to-node link between two endpoints on 127.0.0.2 and 127.0.0.3
//! (the same port number on both), and hostile peers.

mod common;

use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use vspc_cluster::link::frame::{Frame, MAX_FRAME, MAX_LOG};
use vspc_cluster::link::handshake::{self, Me, Role};
use vspc_cluster::link::{
    Handed, Incoming, Link, LinkConfig, LinkError, LinkTls, OpenRequest, Protocol, Recv, Secret,
    StaticDirectory,
};

const SECRET: &[u8] = b"a cluster secret of some length";

fn dir(port: u16) -> StaticDirectory {
    let mut m = HashMap::new();
    m.insert("a".to_string(), format!("127.0.0.2:{port}"));
    m.insert("b".to_string(), format!("127.0.0.3:{port}"));
    StaticDirectory(m)
}

fn cfg(node: &str, secret: &[u8]) -> LinkConfig {
    let mut c = LinkConfig::new("test", node, Secret::new(secret).unwrap());
    c.handshake_timeout = Duration::from_millis(1500);
    c
}

/// Two endpoints, "a" on 127.0.0.2 and "b" on 127.0.0.3, on one port.
struct Pair {
    a: Link,
    b: Link,
    a_in: mpsc::Receiver<Incoming>,
    b_in: mpsc::Receiver<Incoming>,
    port: u16,
}

async fn pair_with(
    ca: LinkConfig,
    cb: LinkConfig,
    dir_a: StaticDirectory,
    dir_b: StaticDirectory,
) -> Pair {
    for _ in 0..20 {
        let port = common::random_port();
        let da = StaticDirectory(
            dir_a
                .0
                .iter()
                .map(|(k, v)| (k.clone(), fix(v, port)))
                .collect(),
        );
        let db = StaticDirectory(
            dir_b
                .0
                .iter()
                .map(|(k, v)| (k.clone(), fix(v, port)))
                .collect(),
        );
        let (a, a_in) = Link::new(ca.clone(), Arc::new(da));
        let (b, b_in) = Link::new(cb.clone(), Arc::new(db));
        let la = a.listen(SocketAddr::from(([127, 0, 0, 2], port))).await;
        let lb = b.listen(SocketAddr::from(([127, 0, 0, 3], port))).await;
        if la.is_ok() && lb.is_ok() {
            return Pair {
                a,
                b,
                a_in,
                b_in,
                port,
            };
        }
    }
    panic!("no free port pair");
}

fn fix(addr: &str, port: u16) -> String {
    match addr.rsplit_once(':') {
        Some((h, _)) => format!("{h}:{port}"),
        None => addr.to_string(),
    }
}

async fn pair() -> Pair {
    pair_with(cfg("a", SECRET), cfg("b", SECRET), dir(0), dir(0)).await
}

fn req(uuid: &str) -> OpenRequest {
    OpenRequest {
        uuid: uuid.to_string(),
        mode: "free-for-all".to_string(),
        protocol: Protocol::Raw,
        client: "127.0.0.1:40000".to_string(),
    }
}

/// 8 MiB in which every byte value occurs, in a pattern that catches
/// reordering and loss: byte i is (i * 7 + i / 256) mod 256.
fn pattern(len: usize, salt: u8) -> Bytes {
    (0..len)
        .map(|i| ((i * 7 + i / 256) as u8).wrapping_add(salt))
        .collect::<Vec<u8>>()
        .into()
}

/// Read until EOF, slowly: a pause every 256 KiB.
async fn drain_slowly(r: &mut vspc_cluster::link::StreamReader, slow: bool) -> BytesMut {
    let mut got = BytesMut::new();
    let mut next_pause = 256 * 1024;
    loop {
        match r.recv().await {
            Recv::Data(b) => got.extend_from_slice(&b),
            Recv::Eof => return got,
            Recv::Closed(why) => panic!("closed early after {} bytes: {why}", got.len()),
        }
        if slow && got.len() >= next_pause {
            next_pause += 256 * 1024;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_mib_of_every_byte_value_both_ways_through_a_slow_consumer() {
    let mut p = pair().await;
    let window = 256 * 1024u64;
    let (opened, accepted) = tokio::join!(p.a.open("b", req("vm-1")), async {
        match p.b_in.recv().await {
            Some(Incoming::Open(o)) => {
                assert_eq!(o.from, "a");
                assert_eq!(o.request, req("vm-1"));
                o.accept().expect("accepts")
            }
            _ => panic!("no open"),
        }
    });
    let (mut ar, aw) = opened.expect("opens").split();
    let (mut br, bw) = accepted.split();
    let n = 8 * 1024 * 1024;
    let to_b = pattern(n, 0);
    let to_a = pattern(n, 101);
    // b does not read yet: a may send one window and no more.
    let send_a = {
        let d = to_b.clone();
        tokio::spawn(async move {
            aw.send(d).await.expect("a sends");
            aw.shutdown().await.expect("a shuts down");
            aw
        })
    };
    let started = common::wait_for(Duration::from_secs(10), || async {
        p.a.stats().bytes_out > 0
    })
    .await;
    assert!(started, "a never sent");
    // Give the sender time to overrun, were it able to.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = p.a.stats().bytes_out;
    assert!(
        sent <= window,
        "{sent} bytes sent to a reader that reads nothing"
    );
    let t = Instant::now();
    let send_b = {
        let d = to_a.clone();
        tokio::spawn(async move {
            bw.send(d).await.expect("b sends");
            bw.shutdown().await.expect("b shuts down");
            bw
        })
    };
    let (got_b, got_a) = tokio::join!(drain_slowly(&mut br, true), drain_slowly(&mut ar, false));
    let took = t.elapsed();
    let _keep = (send_a.await.unwrap(), send_b.await.unwrap());
    assert_eq!(got_b.len(), n);
    assert!(got_b[..] == to_b[..], "a -> b bytes differ");
    assert_eq!(got_a.len(), n);
    assert!(got_a[..] == to_a[..], "b -> a bytes differ");
    eprintln!(
        "16 MiB over the link (8 MiB each way, one side slow) in {took:?}: {:.0} MiB/s",
        16.0 / took.as_secs_f64()
    );
    let (sa, sb) = (p.a.stats(), p.b.stats());
    assert_eq!((sa.bytes_out, sa.bytes_in), (n as u64, n as u64));
    assert_eq!((sb.bytes_out, sb.bytes_in), (n as u64, n as u64));
    assert_eq!(sa.connections, 1);
    assert_eq!(p.a.peers(), ["b"]);
    let _ = p.port;
}

#[tokio::test]
async fn a_wrong_secret_is_refused_on_both_sides() {
    let p = pair_with(
        cfg("a", SECRET),
        cfg("b", b"another secret, just as long"),
        dir(0),
        dir(0),
    )
    .await;
    let e = p.a.open("b", req("vm")).await.err().expect("refused");
    match &e {
        LinkError::Handshake { detail, .. } => {
            assert!(detail.contains("secret"), "{detail}")
        }
        other => panic!("{other}"),
    }
    // b counts and logs its refusal too.
    assert!(
        common::wait_for(Duration::from_secs(5), || async {
            p.b.stats().handshakes_failed >= 1
        })
        .await
    );
    assert_eq!(p.a.stats().connections, 0);
    assert_eq!(p.b.stats().connections, 0);
}

#[tokio::test]
async fn a_peer_that_is_not_a_registered_node_is_refused() {
    let mut only_a = dir(0);
    only_a.0.remove("a");
    let p = pair_with(cfg("a", SECRET), cfg("b", SECRET), dir(0), only_a).await;
    let e = p.a.open("b", req("vm")).await.err().expect("refused");
    assert!(e.to_string().contains("not a registered node"), "{e}");
    // Another cluster's node with the same secret is refused too.
    let mut other = cfg("a", SECRET);
    other.cluster = "elsewhere".into();
    let q = pair_with(other, cfg("b", SECRET), dir(0), dir(0)).await;
    let e = q.a.open("b", req("vm")).await.err().expect("refused");
    assert!(e.to_string().contains("--cluster-name"), "{e}");
}

#[tokio::test]
async fn tls_carries_the_bytes_and_a_refusal_reason() {
    let certs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/certs");
    let tls =
        LinkTls::from_pem(&certs.join("server.crt"), Some(&certs.join("server.key"))).expect("tls");
    let (mut ca, mut cb) = (cfg("a", SECRET), cfg("b", SECRET));
    ca.tls = Some(tls.clone());
    cb.tls = Some(tls);
    let mut p = pair_with(ca, cb, dir(0), dir(0)).await;
    let server = tokio::spawn(async move {
        // The first open is refused, the second served as an echo.
        if let Some(Incoming::Open(o)) = p.b_in.recv().await {
            o.refuse("VM is locked exclusively by someone");
        }
        if let Some(Incoming::Open(o)) = p.b_in.recv().await {
            let (mut r, w) = o.accept().unwrap().split();
            loop {
                match r.recv().await {
                    Recv::Data(b) => w.send(b).await.unwrap(),
                    _ => {
                        w.shutdown().await.unwrap();
                        break;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    match p.a.open("b", req("locked")).await {
        Err(LinkError::Refused { reason, .. }) => assert!(reason.contains("exclusively")),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("not refused"),
    }
    let (mut r, w) = p.a.open("b", req("vm")).await.unwrap().split();
    let all: Bytes = (0..=255u8).cycle().take(300_000).collect::<Vec<_>>().into();
    w.send(all.clone()).await.unwrap();
    w.shutdown().await.unwrap();
    let got = drain_slowly(&mut r, false).await;
    assert!(got[..] == all[..]);
    server.await.unwrap();
}

#[tokio::test]
async fn handoff_and_console_log_requests_are_answered() {
    let mut p = pair().await;
    let server = tokio::spawn(async move {
        for _ in 0..3 {
            match p.b_in.recv().await {
                Some(Incoming::Handoff(h)) => {
                    assert_eq!(
                        (h.from.as_str(), h.uuid.as_str(), h.epoch),
                        ("a", "vm-9", 77)
                    );
                    assert_eq!(&h.input[..], &[0xff, 0, 1, 0xfe][..]);
                    h.done(Ok(Handed {
                        origin: 0xfeed,
                        said: 1 << 33,
                        input: Bytes::from_static(b"typed"),
                        recent: Bytes::from_static(b"\xff said"),
                    }));
                }
                Some(Incoming::Log(l)) if l.uuid == "vm-9" => {
                    let log: Bytes = (0..=255u8).collect::<Vec<_>>().into();
                    l.reply(Some(log));
                }
                Some(Incoming::Log(l)) => l.reply(None),
                _ => panic!("unexpected request"),
            }
        }
    });
    let handed =
        p.a.handoff("b", "vm-9", 77, Bytes::from_static(&[0xff, 0, 1, 0xfe]))
            .await
            .expect("handed off");
    assert_eq!(
        handed,
        Handed {
            origin: 0xfeed,
            said: 1 << 33,
            input: Bytes::from_static(b"typed"),
            recent: Bytes::from_static(b"\xff said"),
        },
        "where the output stood comes back"
    );
    let log =
        p.a.console_log("b", "vm-9", 16)
            .await
            .unwrap()
            .expect("a log");
    assert_eq!(
        &log[..],
        &(240..=255u8).collect::<Vec<_>>()[..],
        "the tail, bounded"
    );
    assert_eq!(p.a.console_log("b", "nope", 100).await.unwrap(), None);
    server.await.unwrap();
}

#[tokio::test]
async fn a_lost_link_closes_its_streams_and_the_next_open_redials() {
    let mut p = pair().await;
    let b_in = &mut p.b_in;
    let (opened, accepted) = tokio::join!(p.a.open("b", req("vm")), async {
        match b_in.recv().await {
            Some(Incoming::Open(o)) => o.accept().unwrap(),
            _ => panic!(),
        }
    });
    let (mut ar, _aw) = opened.unwrap().split();
    let _b_stream = accepted;
    p.b.disconnect("a", "test cut");
    match tokio::time::timeout(Duration::from_secs(5), ar.recv()).await {
        Ok(Recv::Closed(why)) => assert!(why.contains("lost") || why.contains("closed"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert!(common::wait_for(Duration::from_secs(5), || async { p.a.peers().is_empty() }).await);
    let (opened, _acc) = tokio::join!(p.a.open("b", req("vm")), async {
        match b_in.recv().await {
            Some(Incoming::Open(o)) => o.accept().unwrap(),
            _ => panic!(),
        }
    });
    assert!(opened.is_ok(), "no redial");
    assert_eq!(p.a.stats().handshakes_ok, 2);
}

/// Do the real handshake as node "a" on a raw socket to `port` on
/// 127.0.0.3; returns the socket and what was read past the handshake.
async fn raw_peer(port: u16, secret: &[u8]) -> (TcpStream, BytesMut) {
    let mut s = TcpStream::connect(("127.0.0.3", port)).await.unwrap();
    let mut buf = BytesMut::new();
    let secret = Secret::new(secret).unwrap();
    let me = Me {
        cluster: "test",
        node: "a",
        secret: &secret,
        role: Role::Dialer,
        expected: Some("b"),
        binding: b"",
    };
    handshake::run(&mut s, &mut buf, &me, &dir(port))
        .await
        .expect("handshake");
    (s, buf)
}

/// Wait until the peer closes `s` (reading and dropping what it sends).
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut b = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match s.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test]
async fn hostile_peers_are_cut_off_and_nothing_breaks() {
    let mut cb = cfg("b", SECRET);
    cb.handshake_timeout = Duration::from_millis(400);
    cb.dead_after = Duration::from_millis(800);
    cb.ping_interval = Duration::from_millis(200);
    let p = pair_with(cfg("a", SECRET), cb, dir(0), dir(0)).await;
    let port = p.port;

    // A half-sent handshake: dropped at the deadline.
    let mut s = TcpStream::connect(("127.0.0.3", port)).await.unwrap();
    s.write_all(&[0, 0, 0, 40, 1, 1]).await.unwrap();
    let t = Instant::now();
    assert!(
        closed_within(&mut s, Duration::from_secs(5)).await,
        "half handshake kept open"
    );
    assert!(t.elapsed() >= Duration::from_millis(300));

    // An oversize first frame: dropped at once.
    let mut s = TcpStream::connect(("127.0.0.3", port)).await.unwrap();
    s.write_all(&[0x7f, 0xff, 0xff, 0xff, 1]).await.unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(5)).await);

    // Authenticated, then an unknown frame type: cut off.
    let (mut s, _) = raw_peer(port, SECRET).await;
    s.write_all(&[0, 0, 0, 1, 200]).await.unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(5)).await);

    // Authenticated, then an oversize frame: cut off before buffering it.
    let (mut s, _) = raw_peer(port, SECRET).await;
    s.write_all(&((MAX_FRAME as u32 + 1).to_be_bytes()))
        .await
        .unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(5)).await);

    // Data for a stream never opened: dropped and logged; the connection
    // lives on and answers a ping.
    let (mut s, mut buf) = raw_peer(port, SECRET).await;
    let mut out = BytesMut::new();
    Frame::Data {
        stream: 999,
        data: Bytes::from_static(b"junk"),
    }
    .encode(&mut out);
    Frame::Ping { n: 4242 }.encode(&mut out);
    s.write_all(&out).await.unwrap();
    let pong = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            while let Some(f) = Frame::decode(&mut buf, MAX_FRAME).unwrap() {
                if f == (Frame::Pong { n: 4242 }) {
                    return true;
                }
            }
            if s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                return false;
            }
        }
    })
    .await;
    assert_eq!(pong, Ok(true));

    // A stream opened, then data past its credit: cut off.
    let mut out = BytesMut::new();
    Frame::Open {
        stream: 1,
        uuid: "vm".into(),
        mode: "free-for-all".into(),
        protocol: Protocol::Auto,
        client: "x".into(),
        window: 1000,
    }
    .encode(&mut out);
    // Before Accept the peer has no credit at all.
    Frame::Data {
        stream: 1,
        data: Bytes::from_static(b"too soon"),
    }
    .encode(&mut out);
    s.write_all(&out).await.unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(5)).await);

    // Authenticated, then a hand-off answer whose held input and ring
    // together pass what the link carries (though the frame fits): cut off.
    let (mut s, _) = raw_peer(port, SECRET).await;
    let mut out = BytesMut::new();
    Frame::HandoffDone {
        id: 1,
        ok: true,
        reason: String::new(),
        origin: 1,
        said: 1,
        input: Bytes::from(vec![b'i'; 1000]),
        recent: Bytes::from(vec![b'r'; MAX_LOG - 500]),
    }
    .encode(&mut out);
    assert!(out.len() <= MAX_FRAME + 4, "the frame itself fits");
    s.write_all(&out).await.unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(5)).await);

    // Authenticated, then silent (no pongs, nothing): dead after
    // dead_after.
    let (mut s, _) = raw_peer(port, SECRET).await;
    let t = Instant::now();
    assert!(closed_within(&mut s, Duration::from_secs(5)).await);
    assert!(
        t.elapsed() >= Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );

    // A replayed handshake (another session's proof) fails: a raw peer
    // with the wrong secret stands in for any proof not made for this
    // session's nonces.
    let mut s = TcpStream::connect(("127.0.0.3", port)).await.unwrap();
    let mut buf = BytesMut::new();
    let wrong = Secret::new(b"not the secret at all, really").unwrap();
    let me = Me {
        cluster: "test",
        node: "a",
        secret: &wrong,
        role: Role::Dialer,
        expected: Some("b"),
        binding: b"",
    };
    let e = handshake::run(&mut s, &mut buf, &me, &dir(port))
        .await
        .expect_err("refused");
    assert!(e.to_string().contains("secret"), "{e}");

    let counted = common::wait_for(Duration::from_secs(5), || async {
        let st = p.b.stats();
        st.violations >= 4 && st.handshakes_failed >= 3
    })
    .await;
    assert!(counted, "{:?}", p.b.stats());
    // And b still serves a real peer (the hostile peer's open, queued
    // before, can no longer be accepted: its connection is gone).
    let mut b_in = p.b_in;
    let (opened, _acc) = tokio::join!(p.a.open("b", req("vm")), async {
        loop {
            match b_in.recv().await {
                Some(Incoming::Open(o)) => match o.accept() {
                    Ok(s) => return s,
                    Err(e) => assert!(e.to_string().contains("credit"), "{e}"),
                },
                _ => panic!(),
            }
        }
    });
    assert!(opened.is_ok());
    let _ = p.a_in;
}

/// Throughput on loopback, one way, a consumer that keeps up (a
/// measurement, not a check):
/// `cargo test --release -p vspc-cluster --test link -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn throughput_one_way() {
    let mut p = pair().await;
    let (opened, accepted) = tokio::join!(p.a.open("b", req("vm-1")), async {
        match p.b_in.recv().await {
            Some(Incoming::Open(o)) => o.accept().expect("accepts"),
            _ => panic!("no open"),
        }
    });
    let (_ar, aw) = opened.expect("opens").split();
    let (mut br, _bw) = accepted.split();
    let n = 256 * 1024 * 1024;
    let chunk = pattern(1024 * 1024, 3);
    let t = Instant::now();
    let sender = tokio::spawn(async move {
        for _ in 0..n / chunk.len() {
            aw.send(chunk.clone()).await.expect("sends");
        }
        aw.shutdown().await.expect("shuts down");
        aw
    });
    let mut got = 0usize;
    loop {
        match br.recv().await {
            Recv::Data(b) => got += b.len(),
            Recv::Eof => break,
            Recv::Closed(why) => panic!("{why}"),
        }
    }
    let took = t.elapsed();
    let _aw = sender.await.unwrap();
    assert_eq!(got, n);
    eprintln!(
        "{} MiB one way in {took:?}: {:.0} MiB/s",
        n >> 20,
        (n >> 20) as f64 / took.as_secs_f64()
    );
}

/// Many consoles relayed at once from one node (every console of a node
/// following its VMs after a vMotion burst): stream ids are drawn by
/// concurrent tasks, and the peer accepts them in increasing order only.
/// Every open must reach it in the order its id was drawn, or the peer
/// closes the connection and every stream on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_opens_reach_the_peer_in_stream_id_order() {
    // Within the peer's queue of requests (1024): past it opens are refused
    // as "busy", which is not what this is about.
    const OPENS: usize = 1000;
    let mut p = pair().await;
    let server = tokio::spawn(async move {
        let mut kept = Vec::with_capacity(OPENS);
        for _ in 0..OPENS {
            match p.b_in.recv().await {
                Some(Incoming::Open(o)) => kept.push(o.accept().expect("accepts")),
                Some(_) => panic!("unexpected request"),
                None => break,
            }
        }
        (kept.len(), p.b)
    });
    let a = p.a.clone();
    // One open first, so the connection exists before the burst.
    let first = a.open("b", req("vm-0")).await.expect("first open");
    let mut opens = Vec::with_capacity(OPENS - 1);
    for i in 1..OPENS {
        let a = a.clone();
        opens.push(tokio::spawn(async move {
            a.open("b", req(&format!("vm-{i}"))).await
        }));
    }
    let mut failed = Vec::new();
    for o in opens {
        if let Err(e) = o.await.expect("task") {
            failed.push(e.to_string());
        }
    }
    failed.dedup();
    assert!(failed.is_empty(), "opens failed: {failed:?}");
    let (accepted, b) = server.await.expect("server");
    assert_eq!(accepted, OPENS);
    assert_eq!(a.stats().violations + b.stats().violations, 0);
    drop(first);
}

#[tokio::test]
async fn the_opener_learns_what_the_holder_granted() {
    let mut p = pair().await;
    let server = tokio::spawn(async move {
        match p.b_in.recv().await {
            Some(Incoming::Open(o)) => o.accept_granting("read-only").expect("accepts"),
            _ => panic!("no open"),
        }
    });
    let s = p.a.open("b", req("vm-1")).await.expect("opened");
    assert_eq!(s.granted(), "read-only");
    let theirs = server.await.expect("server");
    assert_eq!(theirs.granted(), "", "the acceptor's own end has no answer");
}
