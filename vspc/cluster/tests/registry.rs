//! The registry against a real redis-server (started and killed by each
//! test).

mod common;

use common::{wait_for, Redis};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vspc_cluster::registry::{
    Event, HeldFn, HeldVm, Registry, RegistryConfig, TakeTicket, VmEntry,
};
use vspc_cluster::Error;

const START: u16 = 50000;

fn cfg(url: &str, cluster: &str, node: &str) -> RegistryConfig {
    let mut c = RegistryConfig::new(url, cluster, node, &format!("{node}.test:13373"), START);
    c.heartbeat = Duration::from_millis(200);
    c.node_ttl = Duration::from_millis(1500);
    c.op_timeout = Duration::from_millis(700);
    c
}

async fn node(r: &Redis, name: &str) -> Arc<Registry> {
    Registry::connect_with(cfg(&r.url(), "test", name))
        .await
        .expect("registers")
}

fn uuid(i: usize) -> String {
    format!(
        "42 0a 3b 1c 00 00 00 00-00 00 00 00 00 00 {:02x} {:02x}",
        i >> 8,
        i & 0xff
    )
}

#[tokio::test]
async fn registration_and_a_live_duplicate_name_is_refused() {
    let r = Redis::start();
    let a = node(&r, "alpha").await;
    match Registry::connect_with(cfg(&r.url(), "test", "alpha")).await {
        Err(e @ Error::NameTaken { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("alpha") && text.contains("--node-name"),
                "{text}"
            );
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a live duplicate name was accepted"),
    }
    // Another name is fine; the cluster lists both.
    let b = node(&r, "beta").await;
    let nodes = b.list_nodes().await.expect("lists");
    let names: Vec<_> = nodes.iter().map(|n| (n.name.as_str(), n.alive)).collect();
    assert_eq!(names.len(), 2, "{nodes:?}");
    assert!(nodes
        .iter()
        .all(|n| n.alive && n.advertise.ends_with(":13373")));
    assert_eq!(
        b.node_addr("alpha").await.unwrap().as_deref(),
        Some("alpha.test:13373")
    );
    // A clean leave frees the name at once.
    a.leave().await.expect("leaves");
    let a2 = node(&r, "alpha").await;
    assert_eq!(a2.node(), "alpha");
}

#[tokio::test]
async fn a_restart_after_the_key_expired_inherits_the_vms() {
    let r = Redis::start();
    let mut c = cfg(&r.url(), "test", "gamma");
    c.node_ttl = Duration::from_millis(300);
    let g = Registry::connect_with(c.clone()).await.unwrap();
    let claim = g.claim_vm(&uuid(1), "vm-1", None).await.unwrap();
    drop(g); // killed: no leave, no heartbeat
    let back = wait_for(Duration::from_secs(5), || {
        let c = c.clone();
        async move { Registry::connect_with(c).await.is_ok() }
    })
    .await;
    assert!(back, "the name stayed taken after its key expired");
    // The successful connect above consumed the inheritance; a fresh
    // instance after expiry again inherits the same VM.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let g = wait_for_connect(&c).await;
    let inh = g.inherited();
    assert_eq!(inh.len(), 1, "{inh:?}");
    assert_eq!(inh[0].uuid, uuid(1));
    assert_eq!(inh[0].port, claim.port);
    assert!(!inh[0].connected);
}

async fn wait_for_connect(c: &RegistryConfig) -> Arc<Registry> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Registry::connect_with(c.clone()).await {
            Ok(r) => return r,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[tokio::test]
async fn sixty_concurrent_claims_on_three_nodes_get_sixty_distinct_lowest_ports() {
    let r = Redis::start();
    let nodes = [
        node(&r, "n1").await,
        node(&r, "n2").await,
        node(&r, "n3").await,
    ];
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..60 {
        let n = nodes[i % 3].clone();
        tasks.spawn(async move { (i, n.claim_vm(&uuid(i), &format!("vm-{i}"), None).await) });
    }
    let mut ports = HashMap::new();
    while let Some(res) = tasks.join_next().await {
        let (i, c) = res.unwrap();
        ports.insert(i, c.expect("claims").port);
    }
    let distinct: BTreeSet<u16> = ports.values().copied().collect();
    assert_eq!(distinct.len(), 60, "ports repeat: {ports:?}");
    assert_eq!(
        distinct,
        (START..START + 60).collect::<BTreeSet<_>>(),
        "not the lowest ports"
    );
    // Sticky: a re-claim through another node keeps the port and moves
    // the VM there with a newer epoch.
    for i in 0..60 {
        let n = &nodes[(i + 1) % 3];
        let c = n
            .claim_vm(&uuid(i), &format!("vm-{i}"), None)
            .await
            .unwrap();
        assert_eq!(c.port, ports[&i], "VM {i} changed ports");
        assert_eq!(c.previous_node.as_deref(), Some(nodes[i % 3].node()));
    }
    let list = nodes[0].list_vms().await.unwrap();
    assert_eq!(list.len(), 60);
    assert!(list.iter().all(|v| v.connected));
}

#[tokio::test]
async fn the_newest_claim_wins_and_a_stale_node_cannot_undo_it() {
    let r = Redis::start();
    let n1 = node(&r, "n1").await;
    let n2 = node(&r, "n2").await;
    let (_hb, mut ev1) = n1.spawn_heartbeat(Arc::new(Vec::new) as HeldFn);
    let u = uuid(7);
    let c1 = n1.claim_vm(&u, "web-7", None).await.unwrap();
    let c2 = n2.claim_vm(&u, "web-7", None).await.unwrap();
    assert_eq!(c1.port, c2.port);
    assert!(c2.epoch > c1.epoch, "{c1:?} {c2:?}");
    assert_eq!(c2.previous_node.as_deref(), Some("n1"));
    // n1 is stale: nothing it does at its old epoch sticks.
    assert!(!n1.mark_disconnected(&u, c1.epoch).await.unwrap());
    assert!(!n1.expire(&u, c1.epoch).await.unwrap());
    assert!(!n1.rename(&u, c1.epoch, "evil").await.unwrap());
    let e = n1.vm(&u).await.unwrap().expect("still there");
    assert_eq!(
        (e.node.as_str(), e.epoch, e.connected),
        ("n2", c2.epoch, true)
    );
    // n1 is told by its mail.
    let told = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(ev) = ev1.recv().await {
            if let Event::VmTaken { uuid, by, epoch } = ev {
                return Some((uuid, by, epoch));
            }
        }
        None
    })
    .await
    .expect("told in time");
    assert_eq!(told, Some((u.clone(), "n2".to_string(), c2.epoch)));
    // The owner's own calls work; expiry returns the port to the pool.
    assert!(n2.rename(&u, c2.epoch, "web-7b").await.unwrap());
    assert!(n2.mark_disconnected(&u, c2.epoch).await.unwrap());
    let e = n2.vm(&u).await.unwrap().unwrap();
    assert!(!e.connected && e.disconnected_since_ms.is_some() && e.name == "web-7b");
    assert!(n2.expire(&u, c2.epoch).await.unwrap());
    assert!(n2.vm(&u).await.unwrap().is_none());
    let again = n1.claim_vm(&uuid(8), "other", None).await.unwrap();
    assert_eq!(again.port, START, "the freed port is the lowest free one");
}

#[tokio::test]
async fn vmotion_tickets_put_take_wrong_secret_drop_and_ttl() {
    let r = Redis::start();
    let n1 = node(&r, "src").await;
    let n2 = node(&r, "dst").await;
    let seq = [0xffu8, 0, 1, 2, 0xfe, 3, 4, 5];
    let secret = [9u8, 0xff, 7, 6, 5, 4, 3, 0];
    n1.put_ticket(&seq, &secret, &uuid(1), Duration::from_secs(30))
        .await
        .unwrap();
    // Another VM cannot take the same sequence while it is pending.
    assert!(matches!(
        n1.put_ticket(&seq, &secret, &uuid(2), Duration::from_secs(30))
            .await,
        Err(Error::TicketClash { .. })
    ));
    assert_eq!(
        n2.take_ticket(&seq, &[1u8; 8]).await.unwrap(),
        TakeTicket::WrongSecret
    );
    match n2.take_ticket(&seq, &secret).await.unwrap() {
        TakeTicket::Taken(t) => assert_eq!((t.node.as_str(), t.uuid), ("src", uuid(1))),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        n2.take_ticket(&seq, &secret).await.unwrap(),
        TakeTicket::Unknown
    );
    // ABORT drops it.
    n1.put_ticket(&seq, &secret, &uuid(1), Duration::from_secs(30))
        .await
        .unwrap();
    assert!(
        !n1.drop_ticket(&seq, &uuid(2)).await.unwrap(),
        "another VM's drop"
    );
    assert!(n1.drop_ticket(&seq, &uuid(1)).await.unwrap());
    assert_eq!(
        n2.take_ticket(&seq, &secret).await.unwrap(),
        TakeTicket::Unknown
    );
    // The vMotion timeout ends it.
    n1.put_ticket(&seq, &secret, &uuid(1), Duration::from_millis(200))
        .await
        .unwrap();
    let gone = wait_for(Duration::from_secs(5), || {
        let n2 = n2.clone();
        async move {
            // Peek with a wrong secret: it does not consume the ticket.
            n2.take_ticket(&seq, &[0u8; 8]).await.unwrap() == TakeTicket::Unknown
        }
    })
    .await;
    assert!(gone, "the ticket outlived its TTL");
    let s = n2.stats();
    assert_eq!(s.tickets_taken, 1);
    assert!(s.tickets_wrong_secret >= 1);
}

/// A node's VMs as its daemon would keep them, for the heartbeat.
#[derive(Clone, Default)]
struct Held(Arc<Mutex<Vec<HeldVm>>>);

impl Held {
    fn add(&self, v: HeldVm) {
        self.0.lock().unwrap().push(v);
    }
    fn get(&self) -> Vec<HeldVm> {
        self.0.lock().unwrap().clone()
    }
    fn fnc(&self) -> HeldFn {
        let me = self.clone();
        Arc::new(move || me.get())
    }
}

#[tokio::test]
async fn redis_killed_then_restarted_empty_is_made_whole_and_a_conflict_is_settled() {
    let mut r = Redis::start();
    let n1 = node(&r, "n1").await;
    let mut c2 = cfg(&r.url(), "test", "n2");
    c2.spares = 0; // n2 must fall back on its last view: a conflict on purpose
    let n2 = Registry::connect_with(c2).await.unwrap();
    let (h1, h2) = (Held::default(), Held::default());
    let (_t1, mut ev1) = n1.spawn_heartbeat(h1.fnc());
    let (_t2, mut ev2) = n2.spawn_heartbeat(h2.fnc());
    // Wait for n1's first beat: its spares.
    assert!(wait_for(Duration::from_secs(5), || async { n1.spares().len() == 4 }).await);
    for i in 0..5 {
        let (n, h) = if i % 2 == 0 { (&n1, &h1) } else { (&n2, &h2) };
        let c = n
            .claim_vm(&uuid(i), &format!("vm-{i}"), None)
            .await
            .unwrap();
        h.add(HeldVm::from_claim(&uuid(i), &format!("vm-{i}"), &c));
    }
    r.kill();
    // Every call now fails quickly, as unavailable.
    let t = Instant::now();
    let e = n1.claim_vm(&uuid(100), "late", None).await.unwrap_err();
    assert!(e.is_unavailable(), "{e}");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    let t = Instant::now();
    assert!(n2.list_vms().await.unwrap_err().is_unavailable());
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    assert!(!n1.redis_up());
    // VMs arrive meanwhile: n1 uses a spare (from the top), n2 (no spares,
    // and a view of nothing) the lowest port, which n1's vm-0 holds.
    let used1: BTreeSet<u16> = h1.get().iter().map(|v| v.port).collect();
    let off1 = n1.offline_claim(&|p| used1.contains(&p)).expect("a spare");
    assert!(off1.provisional && off1.port > 60000, "{off1:?}");
    h1.add(HeldVm::from_claim(&uuid(10), "offline-1", &off1));
    let used2: BTreeSet<u16> = h2.get().iter().map(|v| v.port).collect();
    let off2 = n2.offline_claim(&|p| used2.contains(&p)).expect("a port");
    assert_eq!(off2.port, START, "n2 knew no cluster view: the lowest port");
    h2.add(HeldVm::from_claim(&uuid(11), "offline-2", &off2));
    // Both told Redis went away.
    for ev in [&mut ev1, &mut ev2] {
        let down = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match ev.recv().await {
                    Some(Event::RedisDown { .. }) => return true,
                    Some(_) => continue,
                    None => return false,
                }
            }
        })
        .await;
        assert_eq!(down, Ok(true));
    }
    r.restart_empty();
    let back = Instant::now();
    let want: BTreeSet<String> = [0, 1, 2, 3, 4, 10, 11].iter().map(|&i| uuid(i)).collect();
    let whole = wait_for(Duration::from_secs(5), || {
        let n1 = n1.clone();
        let want = want.clone();
        async move {
            match n1.list_vms().await {
                Ok(l) => l.iter().map(|v| v.uuid.clone()).collect::<BTreeSet<_>>() == want,
                Err(_) => false,
            }
        }
    })
    .await;
    assert!(whole, "listing not whole within 5 s of Redis's return");
    eprintln!(
        "listing whole {:?} after Redis came back empty",
        back.elapsed()
    );
    let list = n1.list_vms().await.unwrap();
    let ports: BTreeSet<u16> = list.iter().map(|v| v.port).collect();
    assert_eq!(ports.len(), list.len(), "ports repeat: {list:?}");
    let by: HashMap<String, VmEntry> = list.into_iter().map(|v| (v.uuid.clone(), v)).collect();
    // vm-0 has held START longer: it keeps it; n2's offline VM moved.
    assert_eq!(by[&uuid(0)].port, START);
    assert_ne!(by[&uuid(11)].port, START);
    assert_eq!(by[&uuid(10)].port, off1.port, "a spare stays its VM's");
    assert_eq!(by[&uuid(11)].node, "n2");
    // n2 is told its VM moved: by its own re-assertion's report if it
    // re-asserted second, by its mail if n1 displaced it.
    let moved = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ev2.recv().await {
                Some(Event::Reasserted(rep)) if !rep.moved.is_empty() => {
                    let m = &rep.moved[0];
                    return Some((m.uuid.clone(), m.from, m.to));
                }
                Some(Event::PortMoved { uuid, from, to, .. }) => return Some((uuid, from, to)),
                Some(_) => continue,
                None => return None,
            }
        }
    })
    .await
    .expect("n2 told in time");
    assert_eq!(moved, Some((uuid(11), START, by[&uuid(11)].port)));
    assert!(n1.redis_up() && n2.redis_up());
    // New claims after the restart never hand out a port in use.
    let c = n2.claim_vm(&uuid(50), "new", None).await.unwrap();
    assert!(!ports.contains(&c.port), "{c:?} reuses one of {ports:?}");
}

#[tokio::test]
async fn a_dead_nodes_vm_reconnecting_elsewhere_keeps_its_port_and_the_rest_expire() {
    let r = Redis::start();
    let mut c = cfg(&r.url(), "test", "doomed");
    c.node_ttl = Duration::from_millis(300);
    let dead = Registry::connect_with(c).await.unwrap();
    let a = dead.claim_vm(&uuid(1), "a", None).await.unwrap();
    let b = dead.claim_vm(&uuid(2), "b", None).await.unwrap();
    drop(dead); // kill -9: no leave
    let mut c = cfg(&r.url(), "test", "alive");
    c.vm_expire = Duration::from_millis(500);
    let alive = Registry::connect_with(c).await.unwrap();
    let (_hb, _ev) = alive.spawn_heartbeat(Arc::new(Vec::new) as HeldFn);
    // At once, not after the dead node's TTL.
    let a2 = alive.claim_vm(&uuid(1), "a", None).await.unwrap();
    assert_eq!(a2.port, a.port);
    assert_eq!(a2.previous_node.as_deref(), Some("doomed"));
    // The other one expires after the dead node's TTL plus the expire time.
    let expired = wait_for(Duration::from_secs(10), || {
        let alive = alive.clone();
        async move {
            alive
                .expire_orphans()
                .await
                .unwrap()
                .iter()
                .any(|e| e.uuid == uuid(2))
        }
    })
    .await;
    assert!(expired);
    let list = alive.list_vms().await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].uuid, uuid(1));
    // The dead node, holding nothing now, is forgotten; its port is free.
    let nodes = alive.list_nodes().await.unwrap();
    assert_eq!(
        nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
        ["alive"]
    );
    let c3 = alive.claim_vm(&uuid(3), "c", None).await.unwrap();
    assert_eq!(c3.port, b.port);
}

#[tokio::test]
async fn wrong_password_wrong_db_and_no_redis_are_clear_errors() {
    let r = Redis::start_with(Some("s3cret-pass"));
    let bare = r.url_bare();
    let e = Registry::connect_with(cfg(&bare, "test", "n"))
        .await
        .err()
        .expect("refused");
    assert!(matches!(e, Error::Auth { .. }), "no password: {e}");
    let wrong = format!("redis://:nope@127.0.0.1:{}", r.port);
    let e = Registry::connect_with(cfg(&wrong, "test", "n"))
        .await
        .err()
        .expect("refused");
    assert!(matches!(e, Error::Auth { .. }), "wrong password: {e}");
    assert!(
        !e.to_string().contains("nope"),
        "the password is shown: {e}"
    );
    let db = format!("{}/999", r.url());
    let e = Registry::connect_with(cfg(&db, "test", "n"))
        .await
        .err()
        .expect("refused");
    assert!(matches!(e, Error::WrongDb { .. }), "db 999: {e}");
    assert!(Registry::connect_with(cfg(&r.url(), "test", "n"))
        .await
        .is_ok());
    let port = r.port;
    drop(r);
    let t = Instant::now();
    let e = Registry::connect_with(cfg(&format!("redis://127.0.0.1:{port}"), "test", "n"))
        .await
        .err()
        .expect("refused");
    assert!(matches!(e, Error::Unreachable { .. }), "{e}");
    assert!(t.elapsed() < Duration::from_secs(3));
    let e = Registry::connect_with(cfg("http://x", "test", "n"))
        .await
        .err()
        .expect("refused");
    assert!(matches!(e, Error::BadUrl { .. }), "{e}");
    let e = Registry::connect_with(cfg(&bare, "test", "bad name"))
        .await
        .err()
        .expect("refused");
    assert!(matches!(e, Error::BadName { .. }), "{e}");
}

#[tokio::test]
async fn two_clusters_on_one_redis_do_not_see_each_other() {
    let r = Redis::start();
    let a = Registry::connect_with(cfg(&r.url(), "red", "n1"))
        .await
        .unwrap();
    let b = Registry::connect_with(cfg(&r.url(), "blue", "n1"))
        .await
        .unwrap();
    let ca = a.claim_vm(&uuid(1), "a", None).await.unwrap();
    let cb = b.claim_vm(&uuid(2), "b", None).await.unwrap();
    assert_eq!((ca.port, cb.port), (START, START));
    assert_eq!(a.list_vms().await.unwrap().len(), 1);
    assert_eq!(b.list_vms().await.unwrap()[0].uuid, uuid(2));
    assert_eq!(a.list_nodes().await.unwrap().len(), 1);
    // Another port range start is refused in the same cluster, not another.
    let mut c = cfg(&r.url(), "red", "n2");
    c.port_range_start = 40000;
    assert!(matches!(
        Registry::connect_with(c).await,
        Err(Error::RangeMismatch {
            theirs: START,
            ours: 40000,
            ..
        })
    ));
}

#[tokio::test]
async fn twenty_thousand_vms_claimed_and_listed() {
    let r = Redis::start();
    // 20,000 ports from 30000 (50000 up has only 15,536).
    let start = 30000;
    let mut nodes = Vec::new();
    for name in ["n1", "n2", "n3"] {
        let mut c = cfg(&r.url(), "big", name);
        c.port_range_start = start;
        nodes.push(Registry::connect_with(c).await.unwrap());
    }
    let n = 20_000;
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..64 {
        let reg = nodes[w % 3].clone();
        tasks.spawn(async move {
            let mut i = w;
            while i < n {
                reg.claim_vm(&uuid(i), &format!("vm-{i}"), None)
                    .await
                    .expect("claims");
                i += 64;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let took = t.elapsed();
    eprintln!(
        "claimed {n} VMs in {took:?}: {:.0} claims/s",
        n as f64 / took.as_secs_f64()
    );
    let t = Instant::now();
    let list = nodes[1].list_vms().await.unwrap();
    let took = t.elapsed();
    eprintln!("listed {} VMs in {took:?}", list.len());
    assert_eq!(list.len(), n);
    assert!(took < Duration::from_secs(2), "listing took {took:?}");
    let ports: BTreeSet<u16> = list.iter().map(|v| v.port).collect();
    assert_eq!(ports.len(), n);
    assert_eq!(*ports.iter().next_back().unwrap(), start + n as u16 - 1);
    let t = Instant::now();
    let nodes_list = nodes[0].list_nodes().await.unwrap();
    eprintln!("listed nodes in {:?}", t.elapsed());
    assert_eq!(nodes_list.iter().map(|n| n.vms).sum::<usize>(), n);
}

/// A VM new to the cluster, claimed on one node, is hinted to the others
/// (pub/sub) so they open its console port before their next refresh; a
/// node's own claims and a claim of a VM already known are not.
#[tokio::test]
async fn a_new_vm_is_hinted_to_the_other_nodes_and_only_it() {
    let r = Redis::start();
    let n1 = node(&r, "n1").await;
    let n2 = node(&r, "n2").await;
    let (_hb, mut ev2) = n2.spawn_heartbeat(Arc::new(Vec::new) as HeldFn);
    let (_hb1, mut ev1) = n1.spawn_heartbeat(Arc::new(Vec::new) as HeldFn);
    // The subscription is made in the background: claim until the first
    // hint arrives (each claim is of a new VM, so each is hinted).
    let mut first = None;
    for i in 0..50 {
        n1.claim_vm(&uuid(100 + i), &format!("new-{i}"), None)
            .await
            .unwrap();
        if let Some(n) = hinted(&mut ev2, Duration::from_millis(100)).await {
            first = Some(n);
            break;
        }
    }
    assert_eq!(first.as_deref(), Some("n1"), "no hint reached n2");
    // Drain what the loop's other claims hinted.
    while hinted(&mut ev2, Duration::from_millis(200)).await.is_some() {}
    // A VM already known (n2 takes n1's VM over): no hint; nor to n1 of
    // its own claims.
    n2.claim_vm(&uuid(100), "new-0", None).await.unwrap();
    assert_eq!(hinted(&mut ev1, Duration::from_millis(300)).await, None);
    assert_eq!(hinted(&mut ev2, Duration::from_millis(100)).await, None);
    // A new one on n2 reaches n1.
    n2.claim_vm(&uuid(999), "brand-new", None).await.unwrap();
    assert_eq!(
        hinted(&mut ev1, Duration::from_secs(5)).await.as_deref(),
        Some("n2")
    );
}

/// The next change hint on `ev` within `wait`, skipping other events.
async fn hinted(
    ev: &mut tokio::sync::mpsc::UnboundedReceiver<Event>,
    wait: Duration,
) -> Option<String> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, ev.recv()).await {
            Ok(Some(Event::Changed { node })) => return Some(node),
            Ok(Some(_)) => continue,
            _ => return None,
        }
    }
}
