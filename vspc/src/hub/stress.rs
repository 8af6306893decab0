//! The wait/wake protocol between a VM's reader, its backlog, the
//! consoles' outboxes and their writers, on real threads: a reader that
//! drives [`Hub::pace`] as a VM connection does, writers that take
//! batches as a connection does and are "descheduled" at random (their
//! socket full, then not), a console still being told apart, and a
//! console that joins and one that leaves mid-stream. Every byte must
//! reach every console that stays, in order, none skipped, and nothing
//! may hang: a lost wake-up shows as a run that does not finish.
use super::*;
use crate::outbox::{Batch, BATCH_BYTES};
use std::future::poll_fn;
use std::task::Poll;

const PERIOD: usize = 251;
const TOTAL: usize = 6 << 20;

/// A tiny deterministic generator (xorshift), one per task.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Take batches as a connection's writer does, checking that the bytes
/// are the pattern from 0 on; now and then the "socket" is full for a
/// few milliseconds. Returns the bytes received and whether a notice
/// was seen.
async fn writer(o: Arc<Outbox>, seed: u64, until: usize) -> (usize, bool) {
    let mut rng = Rng(seed);
    let mut at = 0usize;
    let mut notice = false;
    // To the end of the stream (the outbox closing), or `until` bytes.
    while at < until {
        let batch = poll_fn(|cx| o.poll_batch(cx, BATCH_BYTES)).await;
        let Batch::Data(t) = batch else { break };
        for chunk in t.into_wire(&mut false) {
            for &b in chunk.iter() {
                if b as usize != at % PERIOD {
                    notice = true;
                }
                at += 1;
            }
        }
        match rng.below(8) {
            0 => {
                o.set_full(true);
                tokio::time::sleep(Duration::from_micros(rng.below(3000))).await;
                o.set_full(false);
            }
            1 | 2 => tokio::task::yield_now().await,
            _ => {}
        }
    }
    (at, notice)
}

async fn one_run(seed: u64) {
    let h = crate::testing::hub(Duration::from_secs(60), Duration::from_secs(30), 1 << 20);
    let vm_peer = h.new_peer(1 << 20, Encoding::Telnet);
    let id = Identity {
        key: format!("{seed:032x}"),
        uuid: format!("u{seed}"),
        name: format!("stress-{seed}"),
    };
    let vm = h.attach_vm(&id, vm_peer.clone()).expect("attach");
    let join = |enc| {
        let c = h.new_peer(1 << 20, enc);
        h.attach_console(&vm, c.clone(), LockMode::FreeForAll, Replay::None)
            .expect("console");
        c
    };
    let mut writers = Vec::new();
    for k in 0..3u64 {
        let c = join(Encoding::Raw);
        writers.push(tokio::spawn(writer(
            c.outbox.clone(),
            seed * 31 + k + 1,
            usize::MAX,
        )));
    }
    // Told apart a little later, as a silent client is.
    let undecided = join(Encoding::Hold);
    writers.push(tokio::spawn(writer(
        undecided.outbox.clone(),
        seed * 31 + 7,
        usize::MAX,
    )));
    tokio::spawn({
        let o = undecided.outbox.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            o.set_encoding(Encoding::Raw);
        }
    });
    // One leaves mid-stream (its connection closes).
    let leaver = join(Encoding::Raw);
    let leaving = tokio::spawn(writer(leaver.outbox.clone(), seed * 31 + 9, TOTAL / 3));

    // The VM's reader: pieces of random sizes, driving the pace as a VM
    // connection does (read on while the backlog is under VM_HOLD).
    let reader = {
        let (h, vm, id) = (h.clone(), vm.clone(), vm_peer.id);
        tokio::spawn(async move {
            let mut rng = Rng(seed | 1);
            let mut pace: Option<WaitFuture> = None;
            let mut at = 0usize;
            while at < TOTAL {
                poll_fn(|cx| {
                    if let Some(w) = pace.as_mut() {
                        if w.as_mut().poll(cx).is_ready() {
                            pace = None;
                        } else if vm.holds_too_much() {
                            return Poll::Pending;
                        }
                    }
                    Poll::Ready(())
                })
                .await;
                let n = (1 + rng.below(64 * 1024) as usize).min(TOTAL - at);
                let piece: Vec<u8> = (at..at + n).map(|i| (i % PERIOD) as u8).collect();
                at += n;
                if h.vm_output(&vm, id, Bytes::from(piece)) == Fanout::Held && pace.is_none() {
                    pace = Some(h.pace(&vm));
                }
                if rng.below(16) == 0 {
                    tokio::task::yield_now().await;
                }
            }
            if let Some(w) = pace {
                w.await;
            }
        })
    };
    let (left_at, _) = leaving.await.expect("leaver");
    h.detach_console(&vm, leaver.id, Instant::now());
    leaver.outbox.close(None);
    assert!(left_at >= TOTAL / 3);
    // A console joining mid-stream gets what follows its join.
    let late = join(Encoding::Raw);
    let late_writer = tokio::spawn(async move {
        let mut got = 0usize;
        while let Batch::Data(t) = poll_fn(|cx| late.outbox.poll_batch(cx, BATCH_BYTES)).await {
            got += t
                .into_wire(&mut false)
                .iter()
                .map(|c| c.len())
                .sum::<usize>();
        }
        got
    });
    if tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .is_err()
    {
        let levels: Vec<String> = vm
            .lock()
            .consoles
            .iter()
            .map(|c| {
                let l = c.peer.outbox.level();
                format!(
                    "{} queued, undecided {}, behind {}, client behind {}",
                    l.queued,
                    l.undecided,
                    l.behind,
                    c.peer.outbox.client_behind(),
                )
            })
            .collect();
        panic!(
            "run {seed}: the VM's reader hung with {} bytes held; consoles: {levels:#?}",
            vm.held()
        );
    }
    assert_eq!(vm.held(), 0);
    for c in vm.lock().consoles.iter() {
        c.peer.outbox.close(None);
    }
    for w in writers {
        let (got, notice) = w.await.expect("writer");
        assert!(!notice, "a console that kept up was skipped (seed {seed})");
        assert_eq!(got, TOTAL, "a console lost bytes (seed {seed})");
    }
    assert!(late_writer.await.expect("late") <= TOTAL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_byte_and_no_lost_wake_up_under_random_scheduling() {
    for seed in 1..=20u64 {
        tokio::time::timeout(Duration::from_secs(60), one_run(seed))
            .await
            .unwrap_or_else(|_| panic!("run {seed} hung: a wait was never woken"));
    }
}
