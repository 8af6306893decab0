//! The hub's rules with synthetic time: [`Hub::sweep`] takes the time,
//! so expiry and vMotion timeouts need no sleeping.
use super::*;
use crate::outbox::Encoding;
use std::task::Poll;

const EXPIRE: Duration = Duration::from_secs(60);
const VMOTION: Duration = Duration::from_secs(30);

/// The tests' synthetic clock starts here; every `now` the hub is given
/// is this plus whatever a test says.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn hub() -> Arc<Hub> {
    crate::testing::hub(EXPIRE, VMOTION, 4096)
}

fn id(n: u32) -> Identity {
    Identity {
        key: format!("{n:032x}"),
        uuid: format!("uuid-{n}"),
        name: format!("vm-{n}"),
    }
}

fn peer(h: &Hub) -> Attached {
    h.new_peer(1 << 20, Encoding::Raw)
}

use crate::testing::written;

fn output(h: &Hub, vm: &Vm, conn: ConnId, data: &'static [u8]) {
    match h.vm_output(vm, conn, Bytes::from_static(data)) {
        Fanout::Sent => {}
        Fanout::Held => panic!("held with room in every console"),
        Fanout::Retired => panic!("the connection lost its VM"),
    }
}

#[test]
fn the_newest_connection_of_a_vm_wins() {
    let h = hub();
    let (a, b) = (peer(&h), peer(&h));
    let vm = h.attach_vm(&id(1), a.clone()).expect("attach");
    let again = h.attach_vm(&id(1), b.clone()).expect("reattach");
    assert!(Arc::ptr_eq(&vm, &again), "a reconnect must keep the entry");
    assert!(a.outbox.is_closed(), "the old connection must be closed");
    // The old connection's data and its close no longer count.
    assert!(matches!(
        h.vm_output(&vm, a.id, Bytes::from_static(b"x")),
        Fanout::Retired
    ));
    h.detach_vm(&vm, a.id, epoch());
    assert!(vm.vm_connected());
    h.detach_vm(&vm, b.id, epoch());
    assert!(!vm.vm_connected());
}

#[test]
fn metrics_follow_traffic_vmotions_and_consoles_and_survive_expiry() {
    let h = hub();
    let (from, to): (SocketAddr, SocketAddr) = (
        "192.0.2.5:4000".parse().expect("addr"),
        "192.0.2.6:4001".parse().expect("addr"),
    );
    let p = peer(&h);
    h.note_addr(p.id, from);
    let vm = h.attach_vm(&id(10), p.clone()).expect("attach");
    let s = vm.status();
    assert_eq!(s.peer, Some(from));
    assert!(s.vm_connected && s.connected_since.is_some());
    output(&h, &vm, p.id, b"12345");
    let c = peer(&h);
    h.attach_console(&vm, c.clone(), LockMode::FreeForAll, Replay::None)
        .expect("console");
    h.console_input(&vm, b"ab");
    let t = h.totals();
    assert_eq!(
        (t.vms, t.vms_connected, t.consoles, t.bytes_out, t.bytes_in),
        (1, 1, 1, 5, 2)
    );

    let Begin::GoAhead(cookie) = h.vmotion_begin(&vm, p.id, b"q", epoch()) else {
        panic!("no GOAHEAD");
    };
    assert!(matches!(
        h.vmotion_begin(&vm, p.id, b"r", epoch()),
        Begin::NotNow(_)
    ));
    assert!(h.vmotion_peer(b"no such cookie", peer(&h)).is_none());
    let dest = peer(&h);
    h.note_addr(dest.id, to);
    h.vmotion_peer(&cookie, dest.clone()).expect("PEER");
    assert!(h.vmotion_complete(&vm, &cookie, b"q", &dest));
    assert_eq!(vm.status().peer, Some(to), "the destination's address");
    h.forget_addr(p.id);

    assert_eq!(h.clear_consoles(&vm, b"bye", epoch()), 1);
    h.detach_console(&vm, c.id, epoch());
    let text = crate::doors::http::prometheus::render(&h);
    for line in [
        "vspc_vmotions_total{outcome=\"complete\"} 1",
        "vspc_vmotions_total{outcome=\"notnow\"} 1",
        "vspc_vmotions_total{outcome=\"refused_peer\"} 1",
        "vspc_vmotions_total{outcome=\"abort\"} 0",
        "vspc_vmotion_goahead_seconds_count 1",
        "vspc_vmotion_complete_seconds_count 1",
        "vspc_console_disconnects_total{reason=\"cleared\"} 1",
        "vspc_console_disconnects_total{reason=\"closed\"} 0",
        "vspc_vm_to_console_bytes_total 5",
        "vspc_console_to_vm_bytes_total 2",
        "vspc_vms 1",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }

    // Expiry forgets the VM but not what it sent.
    h.detach_vm(&vm, dest.id, epoch());
    h.forget_addr(dest.id);
    h.sweep(epoch() + EXPIRE + Duration::from_secs(1));
    assert_eq!(h.len(), 0);
    let t = h.totals();
    assert_eq!((t.vms, t.bytes_out, t.bytes_in), (0, 5, 2));
    assert!(h.addrs().is_empty(), "addresses of closed connections kept");
}

#[test]
fn an_idle_vm_expires_after_the_expire_time_and_not_before() {
    let h = hub();
    let p = peer(&h);
    let vm = h.attach_vm(&id(2), p.clone()).expect("attach");
    let t0 = epoch();
    h.detach_vm(&vm, p.id, epoch());
    h.sweep(t0 + EXPIRE - Duration::from_secs(1));
    assert_eq!(h.len(), 1, "expired early");
    h.sweep(t0 + EXPIRE + Duration::from_secs(1));
    assert_eq!(h.len(), 0, "never expired");
    // A console arriving late finds the VM gone.
    let c = peer(&h);
    assert!(matches!(
        h.attach_console(&vm, c, LockMode::FreeForAll, Replay::None),
        Err(AttachError::Gone { .. })
    ));
}

#[test]
fn a_console_keeps_a_disconnected_vm_from_expiring() {
    let h = hub();
    let p = peer(&h);
    let vm = h.attach_vm(&id(3), p.clone()).expect("attach");
    let c = peer(&h);
    h.attach_console(&vm, c.clone(), LockMode::FreeForAll, Replay::None)
        .expect("console");
    h.detach_vm(&vm, p.id, epoch());
    let t0 = epoch();
    h.sweep(t0 + EXPIRE * 10);
    assert_eq!(h.len(), 1, "expired with a console attached");
    h.detach_console(&vm, c.id, epoch());
    let t1 = epoch();
    h.sweep(t1 + EXPIRE + Duration::from_secs(1));
    assert_eq!(h.len(), 0);
}

#[test]
fn a_pending_vmotion_times_out_and_held_input_goes_to_the_source() {
    let h = hub();
    let src = peer(&h);
    let vm = h.attach_vm(&id(4), src.clone()).expect("attach");
    let Begin::GoAhead(cookie) = h.vmotion_begin(&vm, src.id, b"seq1", epoch()) else {
        panic!("no GOAHEAD");
    };
    assert_eq!(&cookie[..4], b"seq1");
    assert_eq!(cookie.len(), 12, "sequence plus an 8-byte secret");
    assert_eq!(
        h.vmotion_begin(&vm, src.id, b"seq2", epoch()),
        Begin::NotNow("another vMotion of this port is pending")
    );
    // Input typed during the handoff is held, not sent.
    assert!(h.console_input(&vm, b"typed").is_none());
    assert_eq!(written(&src.outbox).0, b"");
    let t0 = epoch();
    h.sweep(t0 + VMOTION - Duration::from_secs(1));
    assert!(h.vmotion_peer(&cookie, peer(&h)).is_some(), "dropped early");
    h.sweep(t0 + VMOTION + Duration::from_secs(1));
    assert!(h.vmotion_peer(&cookie, peer(&h)).is_none(), "never dropped");
    assert_eq!(written(&src.outbox).0, b"typed");
    // A new vMotion may start.
    assert!(matches!(
        h.vmotion_begin(&vm, src.id, b"seq3", epoch()),
        Begin::GoAhead(_)
    ));
}

#[test]
fn complete_moves_the_vm_and_its_held_input_to_the_destination() {
    let h = hub();
    let src = peer(&h);
    let vm = h.attach_vm(&id(5), src.clone()).expect("attach");
    let Begin::GoAhead(cookie) = h.vmotion_begin(&vm, src.id, b"s", epoch()) else {
        panic!("no GOAHEAD");
    };
    h.console_input(&vm, b"held");
    // A wrong cookie finds nothing.
    let mut wrong = cookie.clone();
    wrong[1] ^= 1;
    assert!(h.vmotion_peer(&wrong, peer(&h)).is_none());
    let dest = peer(&h);
    let (found, seq) = h.vmotion_peer(&cookie, dest.clone()).expect("PEER");
    assert!(Arc::ptr_eq(&found, &vm));
    assert_eq!(seq, b"s");
    // COMPLETE must name the right sequence on the bound destination.
    assert!(!h.vmotion_complete(&vm, &cookie, b"x", &dest));
    assert!(!h.vmotion_complete(&vm, &cookie, b"s", &peer(&h)));
    assert!(h.vmotion_complete(&vm, &cookie, b"s", &dest));
    assert_eq!(written(&dest.outbox).0, b"held");
    assert!(src.outbox.is_closed(), "the source must be closed");
    // Output now counts only from the destination.
    assert!(matches!(
        h.vm_output(&vm, src.id, Bytes::from_static(b"late")),
        Fanout::Retired
    ));
    output(&h, &vm, dest.id, b"on");
}

#[test]
fn abort_keeps_the_source_and_closes_a_bound_destination() {
    let h = hub();
    let src = peer(&h);
    let vm = h.attach_vm(&id(6), src.clone()).expect("attach");
    let Begin::GoAhead(cookie) = h.vmotion_begin(&vm, src.id, b"q", epoch()) else {
        panic!("no GOAHEAD");
    };
    let dest = peer(&h);
    h.vmotion_peer(&cookie, dest.clone()).expect("PEER");
    h.console_input(&vm, b"keep");
    assert!(h.vmotion_abort(&vm, src.id));
    assert!(dest.outbox.is_closed());
    assert_eq!(written(&src.outbox).0, b"keep");
    assert!(!h.vmotion_abort(&vm, src.id), "nothing left to abort");
}

#[test]
fn lock_rules_follow_vspc_py() {
    use LockMode::*;
    let h = hub();
    let vm = h.attach_vm(&id(7), peer(&h)).expect("attach");
    let attach = |m| {
        h.attach_console(&vm, peer(&h), m, Replay::None)
            .map(|(a, _)| a)
    };
    // Writer first: free-for-all is refused, the fallback is read-only,
    // a second writer and exclusive are refused.
    assert_eq!(attach(Write), Ok(Access::Write));
    assert!(attach(FreeForAll).is_err());
    assert_eq!(attach(FreeForAllOrReadOnly), Ok(Access::ReadOnly));
    assert!(attach(Write).is_err());
    assert!(attach(Exclusive).is_err());
    // Watching takes no lock, and is refused only beside exclusive.
    assert_eq!(attach(ReadOnly), Ok(Access::ReadOnly));
    assert_eq!(LockMode::parse("read-only"), None);
    let vm2 = h.attach_vm(&id(8), peer(&h)).expect("attach");
    let attach2 = |m| {
        h.attach_console(&vm2, peer(&h), m, Replay::None)
            .map(|(a, _)| a)
    };
    assert_eq!(attach2(Exclusive), Ok(Access::Exclusive));
    for m in [Exclusive, Write, FreeForAll, FreeForAllOrReadOnly, ReadOnly] {
        assert!(attach2(m).is_err(), "{m:?} beside an exclusive lock");
    }
}

/// A console with the test hub's queue (4096 bytes: high-water mark
/// 512).
fn console(h: &Hub, vm: &Vm, encoding: Encoding) -> Attached {
    let c = h.new_peer(h.config().console_queue, encoding);
    h.attach_console(vm, c.clone(), LockMode::FreeForAll, Replay::None)
        .expect("console");
    c
}

fn skip_notices(bytes: &[u8]) -> usize {
    bytes
        .windows(b"[vspc: skipped ".len())
        .filter(|w| w == b"[vspc: skipped ")
        .count()
}

#[test]
fn a_lone_console_that_does_not_read_holds_the_vm_and_loses_nothing() {
    let h = hub();
    let p = peer(&h);
    let vm = h.attach_vm(&id(9), p.clone()).expect("attach");
    let c = console(&h, &vm, Encoding::Raw);
    let piece = vec![1u8; 300];
    let mut held = false;
    let mut sent = 0;
    for _ in 0..20 {
        sent += piece.len();
        if h.vm_output(&vm, p.id, Bytes::from(piece.clone())) == Fanout::Held {
            held = true;
        }
    }
    assert!(held, "a console past its high-water mark never held the VM");
    assert!(
        c.outbox.queued() <= 512 + 300,
        "queued {}",
        c.outbox.queued()
    );
    assert_eq!(c.outbox.queued() + vm.held(), sent);
    let (got, _) = written(&c.outbox);
    assert_eq!(skip_notices(&got), 0, "a lone console skipped output");
}

/// The fast console reads everything after every piece; the slow one
/// takes a tenth as much, its socket full. It holds the VM back for
/// PATIENCE at most, then skips and never holds the VM again.
#[tokio::test(start_paused = true)]
async fn the_fastest_console_sets_the_pace_and_a_slow_one_skips() {
    let h = hub();
    let p = peer(&h);
    let vm = h.attach_vm(&id(10), p.clone()).expect("attach");
    let fast = console(&h, &vm, Encoding::Raw);
    let slow = console(&h, &vm, Encoding::Raw);
    slow.outbox.set_full(true);
    let t0 = tokio::time::Instant::now();
    let mut fast_got = Vec::new();
    let mut slow_got = Vec::new();
    let mut held_late = 0;
    for i in 0..1000u32 {
        if h.vm_output(&vm, p.id, Bytes::from(vec![i as u8; 200])) == Fanout::Held {
            if i >= 400 {
                held_late += 1;
            }
            let mut w = h.pace(&vm);
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            while w.as_mut().poll(&mut cx).is_pending() {
                fast_got.extend(written(&fast.outbox).0);
                if let Poll::Ready(crate::outbox::Batch::Data(t)) =
                    crate::testing::poll_once(&slow.outbox, 20)
                {
                    slow_got.extend(t.into_wire(&mut false).concat());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        fast_got.extend(written(&fast.outbox).0);
        if let Poll::Ready(crate::outbox::Batch::Data(t)) =
            crate::testing::poll_once(&slow.outbox, 20)
        {
            slow_got.extend(t.into_wire(&mut false).concat());
        }
    }
    assert_eq!(fast_got.len(), 1000 * 200, "the fast console lost bytes");
    assert_eq!(skip_notices(&fast_got), 0);
    assert!(
        skip_notices(&slow_got) > 0,
        "the slow console never skipped"
    );
    assert_eq!(held_late, 0, "a known slow console still held the VM");
    assert!(
        t0.elapsed() < PATIENCE * 3,
        "the VM waited {:?} for a slow console",
        t0.elapsed()
    );
}

#[test]
fn a_console_behind_only_because_the_daemon_is_is_waited_for() {
    let h = hub();
    let p = peer(&h);
    let vm = h.attach_vm(&id(14), p.clone()).expect("attach");
    let fast = console(&h, &vm, Encoding::Raw);
    // Its writer has not run yet, but its socket takes more.
    let lagging = console(&h, &vm, Encoding::Raw);
    let mut held = false;
    for i in 0..100u8 {
        if h.vm_output(&vm, p.id, Bytes::from(vec![i; 200])) == Fanout::Held {
            held = true;
        }
        written(&fast.outbox);
    }
    assert!(held, "the VM never waited for the lagging console");
    assert!(lagging.outbox.queued() <= 4096);
    let (got, _) = written(&lagging.outbox);
    assert_eq!(
        skip_notices(&got),
        0,
        "skipped a console whose client keeps up"
    );
    // Once its client is behind and the VM waited its patience for it,
    // it is not waited for.
    lagging.outbox.set_full(true);
    lagging.outbox.set_behind();
    let mut rounds = 0;
    while vm.held() > 0 {
        written(&fast.outbox);
        let mut st = vm.lock();
        h.deliver(&vm, &mut st);
        rounds += 1;
        assert!(rounds < 1000, "the VM still waits for a console behind");
    }
    written(&fast.outbox);
    for i in 0..100u8 {
        output_owned(&h, &vm, p.id, vec![i; 200]);
        written(&fast.outbox);
    }
    let (got, _) = written(&lagging.outbox);
    assert_eq!(skip_notices(&got), 1);
}

/// Consoles that read equally fast on average, taking turns (as readers
/// on a busy machine do), are waited for: none is skipped, even when
/// the one that lags has its socket full; one that stayed behind for
/// the patience time is not waited for any longer.
#[test]
fn consoles_that_keep_up_on_average_are_waited_for() {
    let h = hub();
    let p = peer(&h);
    let vm = h.attach_vm(&id(15), p.clone()).expect("attach");
    let a = console(&h, &vm, Encoding::Raw);
    let b = console(&h, &vm, Encoding::Raw);
    // Both sockets are full: their clients are behind now and then.
    a.outbox.set_full(true);
    b.outbox.set_full(true);
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    let mut sent = 0;
    for round in 0..200u32 {
        h.vm_output(&vm, p.id, Bytes::from(vec![round as u8; 300]));
        sent += 300;
        // Each reads only every other stretch of ten rounds.
        if (round / 10) % 2 == 0 {
            got_a.extend(written(&a.outbox).0);
        } else {
            got_b.extend(written(&b.outbox).0);
        }
        let mut st = vm.lock();
        h.deliver(&vm, &mut st);
    }
    while vm.held() > 0 {
        got_a.extend(written(&a.outbox).0);
        got_b.extend(written(&b.outbox).0);
        let mut st = vm.lock();
        h.deliver(&vm, &mut st);
    }
    got_a.extend(written(&a.outbox).0);
    got_b.extend(written(&b.outbox).0);
    assert_eq!(skip_notices(&got_a) + skip_notices(&got_b), 0);
    assert_eq!((got_a.len(), got_b.len()), (sent, sent));
    // b stops; once the VM's pacer has waited its patience: the VM goes
    // on without it.
    b.outbox.set_behind();
    for i in 0..100u8 {
        output_owned(&h, &vm, p.id, vec![i; 300]);
        written(&a.outbox);
    }
    assert_eq!(skip_notices(&written(&b.outbox).0), 1);
}

fn output_owned(h: &Hub, vm: &Vm, conn: ConnId, data: Vec<u8>) {
    assert_eq!(h.vm_output(vm, conn, Bytes::from(data)), Fanout::Sent);
}

#[test]
fn a_console_still_being_told_apart_holds_the_vm_and_never_skips() {
    let h = hub();
    let p = peer(&h);
    let vm = h.attach_vm(&id(11), p.clone()).expect("attach");
    let fast = console(&h, &vm, Encoding::Raw);
    let undecided = console(&h, &vm, Encoding::Hold);
    let mut outcome = Fanout::Sent;
    let mut sent = 0;
    while outcome == Fanout::Sent {
        outcome = h.vm_output(&vm, p.id, Bytes::from(vec![5u8; 100]));
        sent += 100;
        written(&fast.outbox);
        assert!(sent < 10_000, "never held for the undecided console");
    }
    assert_eq!(outcome, Fanout::Held);
    assert!(undecided.outbox.queued() <= 512 + 100);
    // Told apart: it is a console like any other, and the fast one
    // sets the pace again.
    undecided.outbox.set_encoding(Encoding::Raw);
    let mut st = vm.lock();
    assert!(h.deliver(&vm, &mut st).is_none(), "backlog not delivered");
    drop(st);
    assert_eq!(vm.held(), 0);
    let (got, _) = written(&undecided.outbox);
    assert_eq!(got.len(), sent, "the undecided console lost output");
    assert_eq!(skip_notices(&got), 0);
}

#[test]
fn the_vm_reader_holds_a_bounded_backlog_then_stops() {
    let h = hub();
    let p = peer(&h);
    let vm = h.attach_vm(&id(12), p.clone()).expect("attach");
    let _stuck = console(&h, &vm, Encoding::Raw);
    let mut n = 0;
    while !vm.holds_too_much() {
        h.vm_output(&vm, p.id, Bytes::from(vec![0u8; 60_000]));
        n += 1;
        assert!(n < 100, "the backlog never filled");
    }
    assert!(vm.held() < VM_HOLD + 60_000);
}

/// A console that lags with its client behind is waited for PATIENCE
/// at most; then the VM goes on without it.
#[tokio::test(start_paused = true)]
async fn a_lagger_is_waited_for_its_patience_at_most() {
    let h = hub();
    let p = peer(&h);
    let vm = h.attach_vm(&id(16), p.clone()).expect("attach");
    let fast = console(&h, &vm, Encoding::Raw);
    let stuck = console(&h, &vm, Encoding::Raw);
    stuck.outbox.set_full(true);
    let mut held = false;
    for i in 0..100u8 {
        held |= h.vm_output(&vm, p.id, Bytes::from(vec![i; 300])) == Fanout::Held;
        written(&fast.outbox);
    }
    assert!(held, "never waited for a console behind for the first time");
    let t0 = tokio::time::Instant::now();
    let mut w = h.pace(&vm);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    assert!(w.as_mut().poll(&mut cx).is_pending());
    tokio::time::sleep(PATIENCE - Duration::from_millis(10)).await;
    written(&fast.outbox);
    assert!(w.as_mut().poll(&mut cx).is_pending(), "gave up early");
    // Past the patience: the VM goes on, and the stuck one skips.
    let mut rounds = 0;
    while w.as_mut().poll(&mut cx).is_pending() {
        tokio::time::sleep(Duration::from_millis(10)).await;
        written(&fast.outbox);
        rounds += 1;
        assert!(rounds < 100, "waited past its patience");
    }
    assert!(t0.elapsed() >= PATIENCE);
    assert_eq!(skip_notices(&written(&stuck.outbox).0), 1);
}

#[tokio::test]
async fn pacing_resumes_when_a_console_drains_attaches_or_closes() {
    let h = hub();
    let p = peer(&h);
    let vm = h.attach_vm(&id(13), p.clone()).expect("attach");
    let c = console(&h, &vm, Encoding::Raw);
    let fill = |h: &Hub| {
        while h.vm_output(&vm, p.id, Bytes::from(vec![3u8; 300])) == Fanout::Sent {}
    };
    let done = |w: &mut WaitFuture| {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        w.as_mut().poll(&mut cx).is_ready()
    };
    // Draining the console.
    fill(&h);
    let mut w = h.pace(&vm);
    assert!(!done(&mut w));
    written(&c.outbox);
    tokio::time::timeout(Duration::from_secs(5), &mut w)
        .await
        .expect("draining the console never resumed the VM");
    // A new console arriving: it is the fastest.
    fill(&h);
    let mut w = h.pace(&vm);
    assert!(!done(&mut w));
    let _fresh = console(&h, &vm, Encoding::Raw);
    tokio::time::timeout(Duration::from_secs(5), &mut w)
        .await
        .expect("a new console never resumed the VM");
    assert_eq!(vm.held(), 0);
    // Every console closing.
    fill(&h);
    let mut w = h.pace(&vm);
    assert!(!done(&mut w));
    for con in vm.lock().consoles.iter() {
        con.peer.outbox.close(None);
    }
    tokio::time::timeout(Duration::from_secs(5), &mut w)
        .await
        .expect("closing the consoles never resumed the VM");
}

/// Cluster mode: a VM let go on one node (hub `a`) and taken over on
/// another (hub `b`, given `a`'s count and ring as the hand-off carries
/// them). A console that followed it gets, on `b`, exactly the bytes after
/// the last one `a` gave it: what `a` still held back for it, what the VM
/// said on `b` before the console arrived, then live output.
#[test]
fn a_console_following_its_vm_to_another_node_resumes_at_its_next_byte() {
    let (a, b) = (hub(), hub());
    let pa = peer(&a);
    let vm_a = a.attach_vm(&id(1), pa.clone()).expect("attach on a");
    // A console that reads nothing: the VM's output backs up on `a`.
    let slow = console(&a, &vm_a, Encoding::Raw);
    let said: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    for chunk in said.chunks(300) {
        let _ = a.vm_output(&vm_a, pa.id, Bytes::copy_from_slice(chunk));
    }
    assert!(vm_a.held() > 0, "some output still waits on node a");
    assert_eq!(a.left_at(&vm_a), None, "not let go yet");
    let (handed, recent) = a.let_go("uuid-1", "moved", true).expect("held on a");
    let at = a.left_at(&vm_a).expect("where the consoles were left");
    assert_eq!(
        handed.said,
        said.len() as u64,
        "held-back output counted too"
    );
    assert_eq!(recent, said, "and kept in the ring for the next node");
    let (given, ended) = written(&slow.outbox);
    assert!(ended);
    assert_eq!(at.said, given.len() as u64);
    assert!(given.len() < said.len());
    assert!(a.let_go("uuid-1", "moved", true).is_none(), "gone from a");

    // Node b: the VM's connection arrives and speaks before the hand-off's
    // answer comes back.
    let pb = peer(&b);
    let vm_b = b.attach_vm(&id(1), pb.clone()).expect("attach on b");
    output(&b, &vm_b, pb.id, b"[on b]");
    b.adopt_output("uuid-1", handed, &recent);
    b.adopt_output("uuid-1", handed, &recent); // a second time changes nothing
    let follower = b.new_peer(1 << 20, Encoding::Raw);
    b.attach_console(
        &vm_b,
        follower.clone(),
        LockMode::FreeForAll,
        Replay::Follow(Some(at)),
    )
    .expect("follow");
    output(&b, &vm_b, pb.id, b"[live]");
    let (rest, _) = written(&follower.outbox);
    let mut whole = given.clone();
    whole.extend_from_slice(&rest);
    let mut expected = said.clone();
    expected.extend_from_slice(b"[on b][live]");
    assert_eq!(whole, expected, "no byte missed or given twice");

    // A console that comes from a node whose count b does not share (its
    // VM's node died; the VM reconnected here) gets what the VM said here.
    let stranger = b.new_peer(1 << 20, Encoding::Raw);
    let elsewhere = replay::Position {
        origin: handed.origin ^ 1,
        said: 7,
    };
    b.attach_console(
        &vm_b,
        stranger.clone(),
        LockMode::FreeForAll,
        Replay::Follow(Some(elsewhere)),
    )
    .expect("follow");
    assert_eq!(written(&stranger.outbox).0, b"[on b][live]");
    let unknown = b.new_peer(1 << 20, Encoding::Raw);
    b.attach_console(
        &vm_b,
        unknown.clone(),
        LockMode::FreeForAll,
        Replay::Follow(None),
    )
    .expect("follow");
    assert_eq!(written(&unknown.outbox).0, b"[on b][live]");
}

/// Consoles following their VM to another node re-attach in whatever
/// order their relays arrive: each keeps what it held (a writer is not
/// refused because a free-for-all console came first), and no client can
/// ask for that.
#[test]
fn followers_keep_their_access_whatever_order_they_arrive_in() {
    let h = hub();
    let vm = h.attach_vm(&id(30), peer(&h)).expect("attach");
    let ffa = h
        .attach_console(&vm, peer(&h), LockMode::FreeForAllOrReadOnly, Replay::None)
        .expect("ffa")
        .0;
    assert_eq!(ffa, Access::FreeForAll);
    let w = h
        .attach_console(&vm, peer(&h), LockMode::Keep(Access::Write), Replay::None)
        .expect("the writer follows")
        .0;
    assert_eq!(w, Access::Write);
    let ro = h
        .attach_console(
            &vm,
            peer(&h),
            LockMode::Keep(Access::ReadOnly),
            Replay::None,
        )
        .expect("read-only follows")
        .0;
    assert_eq!(ro, Access::ReadOnly);
    // A new client still meets the lock the writer brought along.
    assert!(h
        .attach_console(&vm, peer(&h), LockMode::Write, Replay::None)
        .is_err());
    assert_eq!(LockMode::parse("keep-write"), None);
}
