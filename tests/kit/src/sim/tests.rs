//! The simulated peers against a fake proxy and the capture fixtures.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use vspc_codec::wire::{encode, Negotiator, OptionSet};

use super::*;
use vspc_codec::vmware::PROXY_KNOWN_SUBOPTIONS;
use vspc_codec::wire::Change;

const T: Duration = Duration::from_secs(5);

fn fixture(n: u32) -> Vec<capture::Segment> {
    let path = format!("{}/../captures/stream{n}.txt", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).expect("capture fixture");
    capture::parse(&text).expect("parse fixture")
}

/// The commands and data the VM sent in a capture stream.
fn vm_side(n: u32) -> (Vec<Received>, Vec<u8>) {
    let bytes: Vec<u8> = fixture(n)
        .into_iter()
        .filter(|s| s.from_vm)
        .flat_map(|s| s.bytes)
        .collect();
    decode_events(&bytes).expect("decode")
}

/// A tiny proxy that behaves like the capture's: the same opening, KS2
/// and both GETs when 232 comes on, WILL-PROXY, GOAHEAD with a fixed
/// 4-byte secret, PEER-OK with the sequence. Returns what it received.
async fn fake_proxy(stream: TcpStream, secret: [u8; 4]) -> (Vec<Received>, Vec<u8>) {
    use opt::*;
    let (mut rd, mut wr) = stream.into_split();
    let mut neg = Negotiator::new(
        OptionSet::of(&[BINARY, SGA, ECHO]),
        OptionSet::of(&[BINARY, SGA, VMWARE_EXT]),
    );
    let mut out = Vec::new();
    neg.enable_local(BINARY, &mut out);
    neg.enable_local(SGA, &mut out);
    neg.enable_local(ECHO, &mut out);
    neg.enable_remote(BINARY, &mut out);
    neg.enable_remote(SGA, &mut out);
    neg.enable_remote(VMWARE_EXT, &mut out);
    wr.write_all(&out).await.unwrap();
    let mut dec = Decoder::default();
    let (mut events, mut data) = (Vec::new(), Vec::new());
    let mut buf = [0u8; 4096];
    loop {
        let n = match rd.read(&mut buf).await {
            Ok(0) | Err(_) => return (events, data),
            Ok(n) => n,
        };
        let mut out = Vec::new();
        dec.decode(&buf[..n], |ev| {
            match ev {
                Event::Data(d) => data.extend_from_slice(d),
                Event::Negotiate(v, o)
                    if neg.receive(v, o, &mut out) == Some(Change::RemoteEnabled(VMWARE_EXT)) =>
                {
                    Msg::KnownSuboptions2(PROXY_KNOWN_SUBOPTIONS).encode(&mut out);
                    Msg::GetVmVcUuid.encode(&mut out);
                    Msg::GetVmName.encode(&mut out);
                }
                Event::Subneg { payload, .. } => match Msg::decode(payload) {
                    Ok(Msg::DoProxy { .. }) => Msg::WillProxy.encode(&mut out),
                    Ok(Msg::VmotionBegin(seq)) => {
                        let cookie = [seq, &secret[..]].concat();
                        Msg::VmotionGoahead(&cookie).encode(&mut out);
                    }
                    Ok(Msg::VmotionPeer(c)) if c.len() > 4 => {
                        Msg::VmotionPeerOk(&c[..c.len() - 4]).encode(&mut out)
                    }
                    _ => {}
                },
                _ => {}
            }
            events.extend(Received::from_event(&ev));
        })
        .unwrap();
        wr.write_all(&out).await.unwrap();
    }
}

async fn listen() -> (TcpListener, std::net::SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

#[tokio::test]
async fn source_speaks_like_capture_stream0() {
    let (l, addr) = listen().await;
    let proxy = tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        fake_proxy(s, [0x3c, 0xe6, 0x4d, 0xab]).await
    });
    let vm = SimVm::connect(addr, &Identity::capture()).await.unwrap();
    let (want_events, want_data) = vm_side(0);
    vm.send(&want_data).await.unwrap();
    let reply = vm.begin_vmotion(&[0x44, 0xda, 0x87, 0xf1]).await.unwrap();
    assert_eq!(
        reply,
        VmotionReply::GoAhead {
            cookie: vec![0x44, 0xda, 0x87, 0xf1, 0x3c, 0xe6, 0x4d, 0xab]
        }
    );
    assert!(vm.events().contains(&Received::Negotiate(Verb::Dont, 44)));
    vm.close().await;
    let (events, data) = proxy.await.unwrap();
    assert_eq!(events, want_events);
    assert_eq!(data, want_data);
}

/// Streams 1 and 3: a destination, with 0xFF in stream 3's cookie.
#[tokio::test]
async fn destination_speaks_like_capture_streams_1_and_3() {
    for (n, cookie) in [
        (1, &b"\x44\xda\x87\xf1\x3c\xe6\x4d\xab"[..]),
        (3, &b"\x76\x19\xff\xe9\x55\x21\x99\x8c"[..]),
    ] {
        let (l, addr) = listen().await;
        let proxy = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            fake_proxy(s, [0; 4]).await
        });
        let id = Identity::capture();
        let vm = SimVm::connect_destination(addr, &id, cookie).await.unwrap();
        let seq = &cookie[..4];
        assert_eq!(vm.peer_ok().as_deref(), Some(seq));
        vm.complete(seq).await.unwrap();
        let (want_events, want_data) = vm_side(n);
        // Stream 1 goes on (data, a new BEGIN); compare up to COMPLETE.
        let upto = want_events
            .iter()
            .position(|e| matches!(e.msg(), Some(Msg::VmotionComplete(_))))
            .unwrap();
        // Wait for GET-VM-NAME's answer to have gone out before closing.
        vm.wait_event(0, T, |e| e.msg() == Some(Msg::GetVmName))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        vm.close().await;
        let (events, data) = proxy.await.unwrap();
        assert_eq!(events, want_events[..=upto], "stream {n}");
        assert!(data.is_empty());
        if n == 3 {
            assert!(want_data.is_empty());
        }
    }
}

#[tokio::test]
async fn wont_proxy_is_an_error_and_data_is_buffered() {
    let (l, addr) = listen().await;
    let server = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        // Straight to business: accept 232, refuse the proxy request,
        // send console input in pieces.
        let mut out = Vec::new();
        encode::negotiate(Verb::Dont, opt::AUTHENTICATION, &mut out);
        encode::negotiate(Verb::Do, opt::VMWARE_EXT, &mut out);
        Msg::KnownSuboptions2(PROXY_KNOWN_SUBOPTIONS).encode(&mut out);
        encode::data(b"in\xffput", &mut out);
        Msg::WontProxy.encode(&mut out);
        s.write_all(&out).await.unwrap();
        s.write_all(b"-more").await.unwrap();
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink).await;
        sink
    });
    let stream = TcpStream::connect(addr).await.unwrap();
    let vm = SimVm::start(
        stream,
        &Identity::numbered(7).with_direction(b'C'),
        Role::Source,
        &VmOptions::default(),
    );
    assert!(matches!(vm.wait_ready().await, Err(SimError::WontProxy)));
    assert_eq!(vm.read_exact_data(2, T).await.unwrap(), b"in");
    assert_eq!(vm.read_exact_data(9, T).await.unwrap(), b"\xffput-more");
    assert!(vm.recv_data(Duration::from_millis(50)).await.is_empty());
    vm.close().await;
    let sent = server.await.unwrap();
    let (events, _) = decode_events(&sent).unwrap();
    let proxy = Msg::DoProxy {
        direction: b'C',
        uri: b"vSPC.py",
    };
    assert!(events.iter().any(|e| e.msg() == Some(proxy)));
}

#[tokio::test]
async fn console_answers_and_escapes() {
    for (binary, speak_first) in [(true, false), (false, false), (true, true)] {
        let (l, addr) = listen().await;
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            s.write_all(b"\xff\xfb\x01\xff\xfb\x03\xff\xfb\x00\xff\xfd\x00\xff\xfd\x03")
                .await
                .unwrap();
            s.write_all(b"ab\xff\xffc\r\0d").await.unwrap();
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got).await;
            got
        });
        let opts = ConsoleOptions {
            binary,
            speak_first,
            ..ConsoleOptions::default()
        };
        let c = SimConsole::connect_with(addr, &opts).await.unwrap();
        assert_eq!(c.read_until(b"c", T).await.unwrap(), b"ab\xffc");
        assert_eq!(c.read_exact_data(3, T).await.unwrap(), b"\r\0d");
        assert_eq!(c.binary(), binary);
        c.send(b"x\xff\ry\r\n").await.unwrap();
        c.send_raw(b"\xff\xf1").await.unwrap();
        c.close().await;
        let got = server.await.unwrap();
        let answers: &[u8] = match (binary, speak_first) {
            (true, false) => b"\xff\xfd\x01\xff\xfd\x03\xff\xfd\x00\xff\xfb\x00\xff\xfb\x03",
            (false, _) => b"\xff\xfd\x01\xff\xfd\x03\xff\xfe\x00\xff\xfc\x00\xff\xfb\x03",
            // Our own requests first (WILL BINARY, DO BINARY, DO ECHO,
            // DO SGA); the server's offers then only need DO SGA
            // answered: nothing is answered twice.
            (true, true) => b"\xff\xfb\x00\xff\xfd\x00\xff\xfd\x01\xff\xfd\x03\xff\xfb\x03",
        };
        let typed: &[u8] = if binary {
            b"x\xff\xff\ry\r\n\xff\xf1"
        } else {
            b"x\xff\xff\r\0y\r\n\xff\xf1"
        };
        assert_eq!(
            got,
            [answers, typed].concat(),
            "binary={binary} speak_first={speak_first}"
        );
    }
}

#[tokio::test]
async fn read_to_end_and_timeouts() {
    let (l, addr) = listen().await;
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        s.write_all(b"\xff\xfb\x00\xff\xfd\x00bye").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    });
    let c = SimConsole::connect(addr).await.unwrap();
    let err = c
        .read_exact_data(10, Duration::from_millis(20))
        .await
        .unwrap_err();
    assert!(matches!(err, SimError::Timeout { .. }), "{err}");
    let (data, closed) = c.read_to_end(T).await;
    assert_eq!((data.as_slice(), closed), (&b"bye"[..], true));
    assert!(matches!(
        c.read_exact_data(1, T).await,
        Err(SimError::Closed { .. })
    ));
}

#[tokio::test]
async fn into_raw_hands_over_buffered_data_and_the_stream() {
    let (l, addr) = listen().await;
    let server = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        s.write_all(b"\xff\xfb\x00\xff\xfd\x00early").await.unwrap();
        let mut got = [0u8; 6];
        // The console's answers, then what it sends raw.
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"\xff\xfd\x00\xff\xfb\x00");
        s.write_all(b"late\xff\xff!").await.unwrap();
        let mut typed = [0u8; 3];
        s.read_exact(&mut typed).await.unwrap();
        typed
    });
    let silent = ConsoleOptions {
        speak_first: false,
        ..ConsoleOptions::default()
    };
    let c = SimConsole::connect_with(addr, &silent).await.unwrap();
    c.link
        .wait_until(T, "early data", |inbox| {
            (inbox.data.len() >= 5).then_some(Ok(()))
        })
        .await
        .unwrap();
    let mut raw = c.into_raw::<TcpStream>().await.unwrap();
    assert_eq!(raw.data, b"early");
    assert!(raw.binary);
    assert!(raw
        .events
        .contains(&Received::Negotiate(Verb::Will, opt::BINARY)));
    raw.stream.write_all(b"raw").await.unwrap();
    let mut buf = [0u8; 16];
    let mut data = Vec::new();
    while data.len() < 6 {
        let n = raw.stream.read(&mut buf).await.unwrap();
        assert!(n > 0);
        raw.decoder
            .decode(&buf[..n], |ev| {
                if let Event::Data(d) = ev {
                    data.extend_from_slice(d);
                }
            })
            .unwrap();
    }
    assert_eq!(data, b"late\xff!");
    assert_eq!(&server.await.unwrap(), b"raw");
}

#[tokio::test]
async fn into_raw_with_the_wrong_stream_type_is_an_error() {
    let (l, addr) = listen().await;
    tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        tokio::time::sleep(T).await;
        drop(s);
    });
    let stream = TcpStream::connect(addr).await.unwrap();
    let c = SimConsole::start(stream, &ConsoleOptions::default());
    let err = c.into_raw::<tokio::io::DuplexStream>().await.unwrap_err();
    assert!(matches!(err, SimError::Unexpected(_)), "{err}");
}

#[test]
fn identity_forms() {
    let id = Identity::capture();
    assert_eq!(
        id.uuid_text(),
        "01 23 45 67 89 ab cd ef-fe dc ba 98 00 00 00 00"
    );
    assert_eq!(id.uuid_display(), "0123456789abcdef-fedcba9800000000");
    let parsed = vspc_codec::vmware::VmUuid::parse(id.uuid_text().as_bytes()).unwrap();
    assert_eq!(parsed.display, id.uuid_display());
    assert_ne!(Identity::numbered(1).uuid, Identity::numbered(2).uuid);
    assert_ne!(Identity::numbered(1).name, Identity::numbered(2).name);
}
