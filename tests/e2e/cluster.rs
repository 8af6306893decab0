//! Cluster mode (`--cluster`): three daemons on 127.0.0.1, 127.0.0.2 and
//! 127.0.0.3, each with the same proxy, admin, console and link port
//! numbers bound to its own address, and a real `redis-server` per test
//! (killed when the test ends, a failing one included).

use crate::common::redis::Redis;
use crate::common::sim::{Identity, SimConsole, SimVm};
use crate::common::*;
use std::net::SocketAddr;

/// One cluster of `n` nodes and its Redis.
struct Nodes {
    /// Stopped when the test ends.
    redis: Redis,
    nodes: Vec<Daemon>,
    /// The secret file's directory (removed at the end).
    _dir: tempfile::TempDir,
    args: Vec<String>,
    ports: (u16, u16, u16, u16),
}

/// One Redis outage at a time among these tests: during an outage a node
/// hands out its spare ports, which every cluster reserves at the top of
/// the port range (65535 down), so two outages at once in one test run
/// would open the same console ports on 127.0.0.1.
static OUTAGES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn node_ip(i: usize) -> String {
    format!("127.0.0.{}", i + 1)
}

impl Nodes {
    /// `n` nodes named node1.. on 127.0.0.1.., in one cluster.
    fn start(n: usize, extra: &[&str]) -> Nodes {
        let redis = Redis::start();
        let dir = tempfile::tempdir().expect("temp dir");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "a cluster secret for the tests\n").expect("secret");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let ports = (free_port(), free_port(), free_range(16), free_port());
        let cluster_name = format!("t{}", crate::common::redis::random_u32());
        let mut args: Vec<String> = vec![
            "--cluster".into(),
            redis.url(),
            "--cluster-name".into(),
            cluster_name,
            "--cluster-secret-file".into(),
            secret.display().to_string(),
            "--cluster-port".into(),
            ports.3.to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut c = Nodes {
            redis,
            nodes: Vec::new(),
            _dir: dir,
            args,
            ports,
        };
        for i in 0..n {
            let d = c.start_node(i);
            c.nodes.push(d);
        }
        c
    }

    fn builder(&self, i: usize) -> DaemonBuilder {
        let ip = node_ip(i);
        let name = format!("node{}", i + 1);
        let mut args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        args.extend(["--node-name", &name, "--http-iface", &ip]);
        if self.args.iter().any(|a| a == "--ssh-port") {
            args.extend(["--ssh-iface", &ip]);
        }
        Daemon::builder()
            .proxy_iface(&ip)
            .local_iface(&ip)
            .proxy_port(self.ports.0)
            .admin_port(self.ports.1)
            .range_start(self.ports.2)
            .args(&args)
    }

    /// Start node `i` and wait until it serves: its ports accept before
    /// it has registered with the cluster (the listeners are bound first),
    /// and a test that stops Redis in that moment would test start-up
    /// instead.
    fn start_node(&self, i: usize) -> Daemon {
        let d = self.builder(i).start();
        let deadline = std::time::Instant::now() + T;
        while !d.log().contains("vspc listening") {
            assert!(
                std::time::Instant::now() < deadline,
                "node {} never said it was listening:\n{}",
                i + 1,
                d.log()
            );
            std::thread::sleep(ms(10));
        }
        d
    }

    fn node(&self, i: usize) -> &Daemon {
        &self.nodes[i]
    }

    /// Wait until every node lists `name` on port `port`.
    async fn listed_everywhere(&self, name: &str, port: u16) {
        for (i, d) in self.nodes.iter().enumerate() {
            let admin = d.admin;
            wait_for(
                T,
                &format!("node {} lists {name} on port {port}", i + 1),
                async || {
                    let rows = list_vms(admin).await;
                    match rows.iter().find(|r| r.0 == name) {
                        Some((_, _, Some(p))) if *p == port => Ok(()),
                        other => Err(format!("its row is {other:?}")),
                    }
                },
            )
            .await;
        }
    }
}

/// The console port `port` on node `i`.
fn console_at(i: usize, port: u16) -> SocketAddr {
    SocketAddr::new(node_ip(i).parse().expect("ip"), port)
}

/// A telnet console on `addr`, negotiated and in step with `vm`.
async fn console_on(vm: &SimVm, addr: SocketAddr) -> SimConsole {
    let c = SimConsole::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("console on {addr}: {e}"));
    sync_console(vm, &c).await;
    c
}

/// Every byte value both ways between `vm` and `c`.
async fn bytes_both_ways(vm: &SimVm, c: &SimConsole) {
    let out = all_bytes(4);
    vm.send(&out).await.expect("VM send");
    assert_eq!(c.read_exact_data(out.len(), T).await.expect("output"), out);
    let input = all_bytes(3);
    c.send(&input).await.expect("console send");
    assert_eq!(
        vm.read_exact_data(input.len(), T).await.expect("input"),
        input
    );
}

/// `GET path` on a node's HTTP port, as JSON.
async fn http_json(addr: SocketAddr, path: &str) -> serde_json::Value {
    let r = crate::http::get(addr, path).await;
    let text = r.text();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[tokio::test]
async fn every_node_lists_every_vm_and_relays_consoles_byte_exact() {
    let http = free_port();
    let http_s = http.to_string();
    let c = Nodes::start(3, &["--http-port", &http_s]);
    let id = Identity::numbered(1901);
    let vm = SimVm::connect(c.node(0).proxy, &id)
        .await
        .expect("VM connects");
    let (_, port) = wait_for_vm(c.node(0).admin, &id.name, T).await;
    c.listed_everywhere(&id.name, port).await;

    // The HTTP listing of node 3 names node 1; /api/v1/cluster has all.
    let h3 = SocketAddr::new(node_ip(2).parse().unwrap(), http);
    wait_for(T, "node 3's HTTP listing names node1", async || {
        let v = http_json(h3, "/api/v1/vms").await;
        let row = v["vms"]
            .as_array()
            .and_then(|a| a.iter().find(|r| r["name"] == id.name.as_str()).cloned());
        match row {
            Some(r) if r["node"] == "node1" && r["port"] == port => Ok(()),
            other => Err(format!("row {other:?}")),
        }
    })
    .await;
    wait_for(
        T,
        "node 2's /api/v1/cluster lists three nodes",
        async || {
            let h2 = SocketAddr::new(node_ip(1).parse().unwrap(), http);
            let v = http_json(h2, "/api/v1/cluster").await;
            let n = v["nodes"]
                .as_array()
                .map_or(0, |a| a.iter().filter(|n| n["alive"] == true).count());
            if n == 3 {
                Ok(())
            } else {
                Err(format!("{v}"))
            }
        },
    )
    .await;

    let one = http_json(h3, &format!("/api/v1/vms/{}", id.name)).await;
    assert_eq!(
        (one["node"].as_str(), one["port"].as_u64()),
        (Some("node1"), Some(u64::from(port))),
        "{one}"
    );
    let native = native_vm(c.node(2).admin, &id.name)
        .await
        .expect("native row on node 3");
    assert_eq!(native["node"], "node1", "{native}");

    // A console on node 2 (relayed to node 1) and one on node 1 itself.
    let far = console_on(&vm, console_at(1, port)).await;
    let near = console_on(&vm, console_at(0, port)).await;
    wait_consoles(c.node(0), &id.name, 2).await;
    bytes_both_ways(&vm, &far).await;
    let out = b"to both\r\n".to_vec();
    vm.send(&out).await.unwrap();
    assert_eq!(
        near.read_exact_data(out.len() + all_bytes(4).len(), T)
            .await
            .unwrap()[all_bytes(4).len()..],
        out[..]
    );
    assert_eq!(far.read_exact_data(out.len(), T).await.unwrap(), out);
    assert!(
        vm.recv_data(SHORT).await.is_empty(),
        "extra bytes to the VM"
    );
    far.assert_only_negotiation("the relayed console");

    // Node 3 fetches the VM's console log from node 1 (its replay ring).
    let (uuid, _) = wait_for_vm(c.node(0).admin, &id.name, T).await;
    let log = crate::http::get(h3, &format!("/console_log/{uuid}")).await;
    assert_eq!(log.status, 200, "{}", log.text());
    assert!(log.text().ends_with("to both\r\n"), "{:?}", log.text());

    // The metrics of node 2 count the link's bytes.
    let h2 = SocketAddr::new(node_ip(1).parse().unwrap(), http);
    let m = crate::http::get(h2, "/metrics").await.text();
    assert!(m.contains("vspc_cluster_nodes 3"), "{m}");
    assert!(m.contains("vspc_cluster_redis_up 1"), "{m}");
}

#[tokio::test]
async fn sixty_vms_joining_three_nodes_at_once_get_sixty_ports() {
    let c = Nodes::start(3, &[]);
    let mut joins = Vec::new();
    for k in 0..60u32 {
        let proxy = c.node(k as usize % 3).proxy;
        joins.push(tokio::spawn(async move {
            let id = Identity::numbered(19_100 + k);
            let vm = SimVm::connect(proxy, &id).await.expect("VM connects");
            vm.wait_ready().await.expect("ready");
            (id, vm)
        }));
    }
    let mut vms = Vec::new();
    for j in joins {
        vms.push(j.await.expect("join"));
    }
    for (i, d) in c.nodes.iter().enumerate() {
        let admin = d.admin;
        let rows = wait_for(T * 2, &format!("node {} lists 60 VMs", i + 1), async || {
            let rows = list_vms(admin).await;
            if rows.len() == 60 && rows.iter().all(|r| r.2.is_some()) {
                Ok(rows)
            } else {
                Err(format!("{} rows", rows.len()))
            }
        })
        .await;
        let ports: std::collections::BTreeSet<u16> = rows.iter().filter_map(|r| r.2).collect();
        assert_eq!(
            ports.len(),
            60,
            "60 distinct ports on node {}: {rows:?}",
            i + 1
        );
    }
    drop(vms);
}

#[tokio::test]
async fn a_second_node_with_a_taken_name_is_refused() {
    let c = Nodes::start(1, &[]);
    // Node 2's address, node 1's name.
    let mut args: Vec<String> = c.args.clone();
    for (k, v) in [
        ("--node-name", "node1".to_string()),
        ("--proxy-iface", "127.0.0.2".into()),
        ("--admin-iface", "127.0.0.2".into()),
        ("--interface", "127.0.0.2".into()),
        ("--http-iface", "127.0.0.2".into()),
        ("--proxy-port", free_port().to_string()),
        ("--admin-port", free_port().to_string()),
    ] {
        args.push(k.into());
        args.push(v);
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let exit = run_to_exit(&refs, T);
    assert!(exit.status.is_some_and(|s| !s.success()), "{}", log(&exit));
    assert!(
        log(&exit).contains("is held by a live node"),
        "{}",
        log(&exit)
    );
}

/// What a daemon that stopped said.
fn log(e: &Exit) -> String {
    format!("{}{}", e.stdout, e.stderr)
}

#[tokio::test]
async fn start_up_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s3cret-s3cret-s3cret").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let s = secret.display().to_string();
    let dead = format!("redis://127.0.0.1:{}", free_port());
    let exit = run_to_exit(&["--cluster", &dead], T);
    assert!(
        log(&exit).contains("--cluster-secret-file"),
        "{}",
        log(&exit)
    );
    let exit = run_to_exit(&["--cluster", &dead, "--cluster-secret-file", &s], T);
    assert!(log(&exit).contains("chmod 600"), "{}", log(&exit));
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let exit = run_to_exit(&["--cluster", &dead, "--cluster-secret-file", &s], T);
    assert!(
        log(&exit).contains("--cluster-advertise"),
        "wildcard proxy iface: {}",
        log(&exit)
    );
    let exit = run_to_exit(
        &[
            "--cluster",
            &dead,
            "--cluster-secret-file",
            &s,
            "--cluster-iface",
            "127.0.0.1",
            "--admin-port",
            &free_port().to_string(),
            "--proxy-port",
            &free_port().to_string(),
            "--no-http",
        ],
        T,
    );
    assert!(log(&exit).contains("cannot reach Redis"), "{}", log(&exit));
    assert!(exit.status.is_some_and(|s| !s.success()));
}

/// Wait until node `i` lists `name` as its own (the native listing has no
/// `node` field for local VMs) with `n` consoles.
async fn held_with_consoles(c: &Nodes, i: usize, name: &str, n: usize) {
    let admin = c.node(i).admin;
    wait_for(
        T * 2,
        &format!("node {} holds {name} with {n} consoles", i + 1),
        async || {
            let row = native_vm(admin, name).await;
            match &row {
                Some(r) if r.get("node").is_none() && r["consoles"] == n => Ok(()),
                _ => Err(format!("its row is {row:?}")),
            }
        },
    )
    .await;
}

#[tokio::test]
async fn vmotion_from_node_1_to_node_2_keeps_consoles_on_node_3_and_node_1() {
    let http = free_port();
    let http_s = http.to_string();
    let c = Nodes::start(3, &["--http-port", &http_s]);
    let id = Identity::numbered(1902);
    let src = SimVm::connect(c.node(0).proxy, &id)
        .await
        .expect("VM connects");
    let (_, port) = wait_for_vm(c.node(0).admin, &id.name, T).await;
    c.listed_everywhere(&id.name, port).await;
    let near = console_on(&src, console_at(0, port)).await;
    let far = console_on(&src, console_at(2, port)).await;
    // And one that never speaks (nc): offered telnet, then served raw.
    let mut nc = Raw::connect(console_at(2, port)).await;
    // All three attached on node 1 before the VM speaks (console ports
    // give no history).
    held_with_consoles(&c, 0, &id.name, 3).await;
    src.send(b"before-").await.unwrap();
    assert!(
        nc.until(T, |r| r.data.ends_with(b"before-")).await,
        "the silent console got {:?}",
        nc.bytes
    );
    let offered = nc.events.len();

    let seq = [0x19, 0x02, 0x33, 0x44];
    let cookie = src.expect_goahead(&seq).await;
    // Input typed between GOAHEAD and COMPLETE waits for the destination.
    far.send(b"held-input").await.unwrap();
    assert!(
        src.recv_data(SHORT).await.is_empty(),
        "input reached the source"
    );

    // The destination connects to node 2, which finds the ticket.
    let dst = SimVm::connect_destination(c.node(1).proxy, &id, &cookie)
        .await
        .expect("PEER-OK from node 2");
    assert_eq!(dst.peer_ok().as_deref(), Some(&seq[..]));
    dst.complete(&seq).await.unwrap();
    // The VM speaks on node 2 at once, before its consoles can have
    // followed it there: they get it all the same.
    dst.send(b"after").await.unwrap();
    assert_eq!(dst.read_exact_data(10, T).await.unwrap(), b"held-input");
    src.wait_closed(T).await.expect("node 1 closes the source");

    // The three consoles followed the VM to node 2, on the same port.
    held_with_consoles(&c, 1, &id.name, 3).await;
    c.listed_everywhere(&id.name, port).await;
    dst.send(b"-live").await.unwrap();
    assert_eq!(
        near.read_exact_data(17, T).await.unwrap(),
        b"before-after-live"
    );
    assert_eq!(
        far.read_exact_data(17, T).await.unwrap(),
        b"before-after-live"
    );
    // The silent one followed as it was served: raw, the same bytes, and
    // no second telnet offer.
    nc.until(T, |r| r.data.len() >= 17).await;
    assert_eq!(nc.data, b"before-after-live");
    assert_eq!(nc.events.len(), offered, "offered again: {:?}", nc.events);
    near.send(b"from-1").await.unwrap();
    assert_eq!(dst.read_exact_data(6, T).await.unwrap(), b"from-1");
    bytes_both_ways(&dst, &far).await;
    assert!(near.closed().is_none() && far.closed().is_none());
    // The replay ring came along: node 2's holds what the VM said on node 1
    // before the vMotion, then what it said after.
    let h2 = SocketAddr::new(node_ip(1).parse().unwrap(), http);
    let recent = crate::http::get(h2, &format!("/api/v1/vms/{}/recent", id.name)).await;
    let ring = String::from_utf8_lossy(&recent.body).into_owned();
    assert!(
        ring.contains("before-after-live"),
        "node 2's ring: {ring:?}"
    );
}

#[tokio::test]
async fn kill_9_of_node_1_and_the_vm_reconnecting_to_node_2_keeps_its_port() {
    let mut c = Nodes::start(3, &[]);
    let id = Identity::numbered(1903);
    let vm = SimVm::connect(c.node(0).proxy, &id)
        .await
        .expect("VM connects");
    let (_, port) = wait_for_vm(c.node(0).admin, &id.name, T).await;
    c.listed_everywhere(&id.name, port).await;
    let far = console_on(&vm, console_at(2, port)).await;

    c.nodes[0].kill9();
    vm.wait_closed(T)
        .await
        .expect("the VM's connection died with node 1");
    let vm2 = SimVm::connect(c.node(1).proxy, &id)
        .await
        .expect("VM reconnects to node 2");
    // It speaks at once, before the console on node 3 found it again.
    vm2.send(b"back on node 2").await.unwrap();
    let (_, port2) = wait_for_vm(c.node(1).admin, &id.name, T).await;
    assert_eq!(port2, port, "same port on node 2");
    // The console on node 3 follows the VM to node 2, and gets what the
    // VM said there before it came.
    held_with_consoles(&c, 1, &id.name, 1).await;
    assert_eq!(far.read_exact_data(14, T).await.unwrap(), b"back on node 2");
    bytes_both_ways(&vm2, &far).await;
}

#[tokio::test]
async fn redis_stopped_and_restarted_empty_with_consoles_flowing() {
    let _one = OUTAGES.lock().await;
    let mut c = Nodes::start(3, &[]);
    let a = Identity::numbered(1904);
    let vm_a = SimVm::connect(c.node(0).proxy, &a)
        .await
        .expect("VM a connects");
    let (_, port_a) = wait_for_vm(c.node(0).admin, &a.name, T).await;
    c.listed_everywhere(&a.name, port_a).await;
    let far = console_on(&vm_a, console_at(1, port_a)).await;

    c.redis.kill();
    // Nothing connected depends on Redis.
    bytes_both_ways(&vm_a, &far).await;
    // A VM connecting meanwhile is served where it connects.
    let b = Identity::numbered(1905);
    let vm_b = SimVm::connect(c.node(2).proxy, &b)
        .await
        .expect("VM b connects");
    let (_, port_b) = wait_for_vm(c.node(2).admin, &b.name, T).await;
    assert_ne!(port_a, port_b);
    let near_b = console_on(&vm_b, console_at(2, port_b)).await;

    c.redis.restart_empty();
    let restarted = std::time::Instant::now();
    // Nodes 1 and 2 can only know b from the re-asserted record.
    c.listed_everywhere(&b.name, port_b).await;
    c.listed_everywhere(&a.name, port_a).await;
    let took = restarted.elapsed();
    println!("listings whole on every node {took:?} after Redis restarted empty");
    assert!(
        took < std::time::Duration::from_secs(8),
        "listings whole after {took:?}"
    );
    bytes_both_ways(&vm_a, &far).await;
    bytes_both_ways(&vm_b, &near_b).await;
    // And b's console now works from node 1 too.
    let from_1 = console_on(&vm_b, console_at(0, port_b)).await;
    bytes_both_ways(&vm_b, &from_1).await;
}

#[tokio::test]
async fn a_cleared_console_is_not_reopened_and_other_nodes_consoles_stay() {
    let c = Nodes::start(2, &[]);
    let id = Identity::numbered(1906);
    let vm = SimVm::connect(c.node(0).proxy, &id)
        .await
        .expect("VM connects");
    let (_, port) = wait_for_vm(c.node(0).admin, &id.name, T).await;
    c.listed_everywhere(&id.name, port).await;
    let near = console_on(&vm, console_at(0, port)).await;
    let far = console_on(&vm, console_at(1, port)).await;
    held_with_consoles(&c, 0, &id.name, 2).await;
    let answer = admin_line(c.node(0).admin, &format!("clear {}", id.name)).await;
    assert!(answer.contains("\"cleared\":2"), "{answer}");
    // Both are told and closed, wherever their socket is; neither comes
    // back on its own.
    for con in [&near, &far] {
        let (text, closed) = con.read_to_end(T).await;
        assert!(closed, "the console was closed");
        assert!(
            String::from_utf8_lossy(&text).contains("cleared"),
            "{text:?}"
        );
    }
    held_with_consoles(&c, 0, &id.name, 0).await;
    assert!(vm.recv_data(SHORT).await.is_empty());
}

#[tokio::test]
async fn a_node_with_another_secret_is_refused_and_logged() {
    let c = Nodes::start(1, &[]);
    let id = Identity::numbered(1907);
    let vm = SimVm::connect(c.node(0).proxy, &id)
        .await
        .expect("VM connects");
    let (_, port) = wait_for_vm(c.node(0).admin, &id.name, T).await;
    // Node 2 shares Redis and the cluster name, but not the secret.
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("secret");
    std::fs::write(&other, "not the cluster's secret at all").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut args: Vec<String> = c.args.clone();
    let at = args
        .iter()
        .position(|a| a == "--cluster-secret-file")
        .unwrap();
    args[at + 1] = other.display().to_string();
    args.extend([
        "--node-name".into(),
        "node2".into(),
        "--http-iface".into(),
        "127.0.0.2".into(),
    ]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let d2 = Daemon::builder()
        .proxy_iface("127.0.0.2")
        .local_iface("127.0.0.2")
        .proxy_port(c.ports.0)
        .admin_port(c.ports.1)
        .range_start(c.ports.2)
        .args(&refs)
        .start();
    wait_for_vm(d2.admin, &id.name, T).await;
    let mut con = Raw::connect(console_at(1, port)).await;
    assert!(con.read_to_close(T).await, "the console is closed");
    let text = String::from_utf8_lossy(&con.bytes).into_owned();
    assert!(text.contains("cannot be reached"), "{text:?}");
    assert!(
        c.node(0).wait_log("cluster link: peer refused", T).await,
        "node 1 logs the refused peer"
    );
    drop(vm);
}

#[tokio::test]
async fn port_conflicts_after_an_outage_are_settled_and_the_losers_told() {
    let _one = OUTAGES.lock().await;
    let mut c = Nodes::start(2, &[]);
    // Each node keeps 4 spare ports for an outage; 6 VMs per node run
    // past them, onto the lowest ports free in each node's own view: the
    // same ports on both nodes.
    c.redis.kill();
    let mut vms = Vec::new();
    for k in 0..12u32 {
        let node = (k % 2) as usize;
        let id = Identity::numbered(1910 + k);
        let vm = SimVm::connect(c.node(node).proxy, &id)
            .await
            .expect("VM connects");
        let (_, port) = wait_for_vm(c.node(node).admin, &id.name, T).await;
        let con = console_on(&vm, console_at(node, port)).await;
        vms.push((node, id, vm, con));
    }
    let ports: std::collections::BTreeSet<u16> = {
        let mut p = std::collections::BTreeSet::new();
        for i in 0..2 {
            for r in list_vms(c.node(i).admin).await {
                p.extend(r.2);
            }
        }
        p
    };
    assert!(ports.len() < 12, "no conflict to settle: {ports:?}");

    c.redis.restart_empty();
    // The losers' consoles are told and closed, their ESXi connections too;
    // ESXi reconnects them (here: the test, again if need be) and they get
    // their new ports.
    let mut told = 0;
    let mut consoles: Vec<Option<SimConsole>> = Vec::new();
    let mut vm_list = Vec::new();
    for (node, id, vm, con) in vms {
        vm_list.push((node, id, vm));
        consoles.push(Some(con));
    }
    let mut whole = [false, false];
    let deadline = std::time::Instant::now() + T * 3;
    while whole != [true, true] {
        assert!(
            std::time::Instant::now() < deadline,
            "listings not whole: {:?} / {:?}",
            list_vms(c.node(0).admin).await,
            list_vms(c.node(1).admin).await
        );
        for ((node, id, vm), con) in vm_list.iter_mut().zip(consoles.iter_mut()) {
            if vm.closed().is_none() {
                continue;
            }
            if let Some(con) = con.take() {
                let (text, closed) = con.read_to_end(T).await;
                assert!(closed, "the loser's console was closed");
                assert!(
                    String::from_utf8_lossy(&text).contains("console port moved"),
                    "the loser's console was told: {text:?}"
                );
                told += 1;
            }
            *vm = SimVm::connect(c.node(*node).proxy, id)
                .await
                .expect("VM reconnects");
        }
        for (i, w) in whole.iter_mut().enumerate() {
            let rows = list_vms(c.node(i).admin).await;
            let ports: std::collections::BTreeSet<u16> = rows.iter().filter_map(|r| r.2).collect();
            *w = rows.len() == 12 && ports.len() == 12;
        }
        tokio::time::sleep(POLL).await;
    }
    assert!(told > 0, "no VM lost a conflict");
    // Every VM works on its port, from the other node.
    for (node, id, vm) in &vm_list {
        let (_, port) = wait_for_vm(c.node(1 - *node).admin, &id.name, T).await;
        let far = console_on(vm, console_at(1 - *node, port)).await;
        bytes_both_ways(vm, &far).await;
    }
}

#[tokio::test]
async fn the_link_speaks_tls_with_the_daemons_certificate() {
    let (crt, key) = (cert_path("server.crt"), cert_path("server.key"));
    let (crt, key) = (crt.display().to_string(), key.display().to_string());
    let c = Nodes::start(2, &["--cert", &crt, "--key", &key]);
    let id = Identity::numbered(1908);
    let vm = SimVm::connect(c.node(0).proxy, &id)
        .await
        .expect("VM connects");
    let (_, port) = wait_for_vm(c.node(0).admin, &id.name, T).await;
    c.listed_everywhere(&id.name, port).await;
    let far = console_on(&vm, console_at(1, port)).await;
    bytes_both_ways(&vm, &far).await;
    for i in 0..2 {
        assert!(
            c.node(i).log().contains("tls=true"),
            "node {} link without TLS",
            i + 1
        );
    }
    assert!(
        c.node(1)
            .wait_log("cluster link: connected to peer", T)
            .await
    );
}

#[tokio::test]
async fn the_newest_connection_wins_across_nodes_and_consoles_follow() {
    let c = Nodes::start(2, &[]);
    let id = Identity::numbered(1909);
    let old = SimVm::connect(c.node(0).proxy, &id)
        .await
        .expect("VM connects");
    let (_, port) = wait_for_vm(c.node(0).admin, &id.name, T).await;
    c.listed_everywhere(&id.name, port).await;
    let near = console_on(&old, console_at(0, port)).await;
    // The same VM connects to node 2 (its host restarted, its old socket
    // half-open): node 1 lets go of the old connection.
    let new = SimVm::connect(c.node(1).proxy, &id)
        .await
        .expect("VM connects to node 2");
    old.wait_closed(T)
        .await
        .expect("node 1 closes the old connection");
    let (_, port2) = wait_for_vm(c.node(1).admin, &id.name, T).await;
    assert_eq!(port2, port);
    held_with_consoles(&c, 1, &id.name, 1).await;
    bytes_both_ways(&new, &near).await;
    assert!(near.closed().is_none());
}

// ---------------------------------------------------------------------------
// Figures (README "A cluster of nodes"): run on demand, with a release
// daemon, one test at a time:
//
//   cargo build --release -p vspc
//   VSPC_BIN=target/release/vspc cargo test -p vspc --test e2e \
//       cluster::figures -- --ignored --nocapture --test-threads 1

/// Bytes each throughput run moves from the VM to the console.
const FIGURE_BYTES: usize = 256 << 20;

/// Stream `FIGURE_BYTES` from a raw VM connection to a raw reader of
/// `console`; MB/s.
async fn throughput(vm: SimVm, console: SocketAddr) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut reader = tokio::net::TcpStream::connect(console)
        .await
        .expect("console");
    // The daemons run with --console-protocol raw: say nothing, read.
    let mut raw = vm
        .into_raw::<tokio::net::TcpStream>()
        .await
        .expect("raw VM");
    // Give the console time to join before the clock starts.
    tokio::time::sleep(ms(300)).await;
    let chunk = vec![b'x'; 64 * 1024];
    let started = std::time::Instant::now();
    let writer = tokio::spawn(async move {
        let mut left = FIGURE_BYTES;
        while left > 0 {
            let n = left.min(chunk.len());
            raw.stream.write_all(&chunk[..n]).await.expect("VM write");
            left -= n;
        }
        raw
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    while got < FIGURE_BYTES {
        let n = reader.read(&mut buf).await.expect("console read");
        assert!(n > 0, "console closed after {got} bytes");
        got += n;
    }
    let secs = started.elapsed().as_secs_f64();
    drop(writer.await);
    FIGURE_BYTES as f64 / secs / 1e6
}

/// A bare relay: one VM socket copied to one console socket by socat
/// (a C program doing nothing else), for scale.
async fn bare_relay_throughput() -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (a, b) = (free_port(), free_port());
    let mut relay = std::process::Command::new("socat")
        .args([
            "-b",
            "65536",
            &format!("TCP-LISTEN:{a},bind=127.0.0.1,reuseaddr"),
            &format!("TCP-LISTEN:{b},bind=127.0.0.1,reuseaddr"),
        ])
        .spawn()
        .expect("socat (apt-get install socat)");
    let mut w = None;
    for _ in 0..250 {
        if let Ok(s) = tokio::net::TcpStream::connect(("127.0.0.1", a)).await {
            w = Some(s);
            break;
        }
        tokio::time::sleep(ms(20)).await;
    }
    let mut w = w.expect("socat listens");
    let mut reader = None;
    for _ in 0..250 {
        if let Ok(s) = tokio::net::TcpStream::connect(("127.0.0.1", b)).await {
            reader = Some(s);
            break;
        }
        tokio::time::sleep(ms(20)).await;
    }
    let mut reader = reader.expect("socat's second port");
    let started = std::time::Instant::now();
    let writer = tokio::spawn(async move {
        let chunk = vec![b'x'; 64 * 1024];
        let mut left = FIGURE_BYTES;
        while left > 0 {
            let n = left.min(chunk.len());
            w.write_all(&chunk[..n]).await.unwrap();
            left -= n;
        }
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    while got < FIGURE_BYTES {
        got += reader.read(&mut buf).await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    writer.await.unwrap();
    let _ = relay.kill();
    let _ = relay.wait();
    FIGURE_BYTES as f64 / secs / 1e6
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurements for the README; run on demand with a release daemon"]
async fn figures() {
    // Throughput: single node, cluster local console, cluster relayed.
    let single = Daemon::start(&["--console-protocol", "raw"]);
    let id = Identity::numbered(1990);
    let (vm, port) = vm_up(&single, &id).await;
    let single_mbs = throughput(vm, single.console(port)).await;
    drop(single);
    let bare = bare_relay_throughput().await;

    let c = Nodes::start(3, &["--console-protocol", "raw"]);
    let id = Identity::numbered(1991);
    let vm = SimVm::connect(c.node(0).proxy, &id).await.unwrap();
    let (_, port) = wait_for_vm(c.node(0).admin, &id.name, T).await;
    let local_mbs = throughput(vm, console_at(0, port)).await;
    let id = Identity::numbered(1992);
    let vm = SimVm::connect(c.node(0).proxy, &id).await.unwrap();
    let (_, port) = wait_for_vm(c.node(0).admin, &id.name, T).await;
    c.listed_everywhere(&id.name, port).await;
    let relayed_mbs = throughput(vm, console_at(1, port)).await;
    println!(
        "throughput, {} MiB VM -> one raw console: bare relay {bare:.0} MB/s; single node {single_mbs:.0} MB/s; \
         cluster, console on the VM's node {local_mbs:.0} MB/s; console on another node (over the link) {relayed_mbs:.0} MB/s",
        FIGURE_BYTES >> 20
    );

    // Cross-node vMotion: BEGIN on one node to the held input delivered on
    // the other, 30 times back and forth, a console on the third node.
    let id = Identity::numbered(1993);
    let mut vm = SimVm::connect(c.node(0).proxy, &id).await.unwrap();
    let (_, port) = wait_for_vm(c.node(0).admin, &id.name, T).await;
    c.listed_everywhere(&id.name, port).await;
    // A raw console (the cluster runs with --console-protocol raw).
    let mut console = tokio::net::TcpStream::connect(console_at(2, port))
        .await
        .unwrap();
    held_with_consoles(&c, 0, &id.name, 1).await;
    let mut times = Vec::new();
    for k in 0..30u8 {
        let to = if k % 2 == 0 { 1 } else { 0 };
        let seq = [0x33, k, 0x55, 0x66];
        let started = std::time::Instant::now();
        let cookie = vm.expect_goahead(&seq).await;
        tokio::io::AsyncWriteExt::write_all(&mut console, b"m")
            .await
            .unwrap();
        let dst = SimVm::connect_destination(c.node(to).proxy, &id, &cookie)
            .await
            .unwrap();
        dst.complete(&seq).await.unwrap();
        assert_eq!(dst.read_exact_data(1, T).await.unwrap(), b"m");
        times.push(started.elapsed().as_secs_f64() * 1e3);
        vm.wait_closed(T).await.unwrap();
        held_with_consoles(&c, to, &id.name, 1).await;
        vm = dst;
    }
    println!(
        "cross-node vMotion, BEGIN to held input delivered on the destination (30 runs): p50 {:.1} ms, p99 {:.1} ms",
        percentile(&mut times.clone(), 0.5),
        percentile(&mut times, 0.99)
    );

    // Listing: 300 VMs over three nodes, listed on node 3.
    let mut vms = Vec::new();
    for k in 0..300u32 {
        let proxy = c.node(k as usize % 3).proxy;
        vms.push(
            SimVm::connect(proxy, &Identity::numbered(20_000 + k))
                .await
                .unwrap(),
        );
    }
    let admin = c.node(2).admin;
    wait_for(T * 4, "node 3 lists every VM", async || {
        let n = list_vms(admin).await.len();
        if n >= 303 {
            Ok(())
        } else {
            Err(format!("{n} rows"))
        }
    })
    .await;
    let mut times = Vec::new();
    for _ in 0..50 {
        let started = std::time::Instant::now();
        let rows = list_vms(admin).await;
        times.push(started.elapsed().as_secs_f64() * 1e3);
        assert!(rows.len() >= 303);
    }
    println!(
        "listing {} VMs of three nodes on one node (vSPC.py query protocol, 50 runs): p50 {:.1} ms, p99 {:.1} ms",
        list_vms(admin).await.len(),
        percentile(&mut times.clone(), 0.5),
        percentile(&mut times, 0.99)
    );
    drop(vms);
}

/// The doors that name a VM (the admin port's `connect`, both protocols;
/// SSH; the browser console) reach a VM another node holds: the console is
/// opened there, under that node's locks, and relayed; its recent output
/// comes first.
#[tokio::test]
async fn other_nodes_vms_through_connect_ssh_and_the_browser() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = crate::ssh::only_key(dir.path(), "alice");
    let keys = dir.path().join("authorized_keys");
    std::fs::set_permissions(&keys, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    let host_key = dir.path().join("host/ssh_host_ed25519_key");
    let (ssh, http) = (free_port(), free_port());
    let (ssh_s, http_s) = (ssh.to_string(), http.to_string());
    let c = Nodes::start(
        3,
        &[
            "--ssh-port",
            &ssh_s,
            "--ssh-host-key",
            &host_key.display().to_string(),
            "--ssh-authorized-keys",
            &keys.display().to_string(),
            "--http-port",
            &http_s,
        ],
    );
    let id = Identity::numbered(1920);
    let vm = SimVm::connect(c.node(0).proxy, &id)
        .await
        .expect("VM connects to node 1");
    let (uuid, port) = wait_for_vm(c.node(0).admin, &id.name, T).await;
    c.listed_everywhere(&id.name, port).await;
    vm.send(b"early output\r\n").await.unwrap();

    // `connect` on node 2, with a write lock: granted by node 1.
    let (answer, native) = crate::admin::native_connect(c.node(1), &id.name, Some("write"))
        .await
        .unwrap_or_else(|a| panic!("connect on node 2 refused: {a}"));
    assert_eq!(answer["mode"], "write", "{answer}");
    assert_eq!(answer["vm"]["node"], "node1", "{answer}");
    assert_eq!(answer["vm"]["port"], port, "{answer}");
    assert_eq!(
        native.read_exact_data(14 + LIVE.len(), T).await.unwrap(),
        [&b"early output\r\n"[..], LIVE].concat(),
        "the recent output, then live"
    );
    bytes_both_ways(&vm, &native).await;
    // What later consoles are given first: all the VM said, then live.
    let history = [&b"early output\r\n"[..], &all_bytes(4), LIVE].concat();
    // Node 1's locks hold for every node: a second writer is refused.
    let refused = crate::admin::native_connect(c.node(2), &id.name, Some("write"))
        .await
        .err()
        .expect("a second write lock was granted");
    assert_eq!(refused["code"], "lock_failed", "{refused}");

    // SSH on node 3: the key's default lock, read-only beside the writer.
    let listed = crate::ssh::run(crate::ssh::ssh_command_at(
        &node_ip(2),
        ssh,
        &key,
        "list",
        &[],
    ))
    .await;
    assert!(
        listed.1.contains(&format!("{}:{uuid}:{port}", id.name)),
        "ssh list@node3: {listed:?}"
    );
    let ssh_console = crate::ssh::Ssh::spawn(crate::ssh::ssh_command_at(
        &node_ip(2),
        ssh,
        &key,
        &id.name,
        &[],
    ));
    let seen = ssh_console.read_out(history.len(), T * 2).await;
    assert!(
        seen == history,
        "ssh on node 3 got {:?}; stderr {}",
        String::from_utf8_lossy(&seen),
        ssh_console.err()
    );

    // vSPC.py's query protocol on node 3 (its uuid, as vSPCClient asks):
    // read-only beside the writer; the recent output comes in the telnet
    // stream rather than the pickle.
    match crate::admin::pickle_session(c.node(2), &uuid, "free_for_all_or_readonly").await {
        crate::admin::PickleAnswer::Found {
            mode,
            seed,
            console,
        } => {
            assert_eq!(
                (mode.as_str(), seed.as_str()),
                ("free_for_all_or_readonly", "")
            );
            assert_eq!(
                console.read_exact_data(history.len(), T).await.unwrap(),
                history
            );
        }
        crate::admin::PickleAnswer::Other(status, rest) => {
            panic!("vSPC.py query on node 3: {status} {rest:?}")
        }
    }

    // The browser console on node 2.
    let http2 = SocketAddr::new(node_ip(1).parse().unwrap(), http);
    let mut ws = crate::web::ws_connect(http2, &crate::web::console_path(&id, ""), None)
        .await
        .expect("the WebSocket on node 2");
    let hello = crate::web::next_json(&mut ws).await;
    assert_eq!(hello["node"], "node1", "{hello}");
    assert_eq!(hello["access"], "read-only", "{hello}");
    assert_eq!(hello["uuid"], uuid.as_str(), "{hello}");
    assert_eq!(
        crate::web::read_bytes(&mut ws, history.len()).await,
        history
    );
    let page = crate::http::get(http2, &format!("/vms/{}", id.name)).await;
    assert_eq!(page.status, 200, "the console page of another node's VM");

    // Live output reaches all three, wherever they came in.
    vm.send(b"to everyone\r\n").await.unwrap();
    assert_eq!(
        native.read_exact_data(13, T).await.unwrap(),
        b"to everyone\r\n"
    );
    let want = [&seen[..], b"to everyone\r\n"].concat();
    assert_eq!(ssh_console.read_out(want.len(), T).await, want);
    assert_eq!(
        crate::web::read_bytes(&mut ws, 13).await,
        b"to everyone\r\n"
    );

    // The VM moves to node 2 (vMotion): the three follow it, no byte lost.
    let seq = [0x19, 0x20, 0, 1];
    let cookie = vm.expect_goahead(&seq).await;
    let dst = SimVm::connect_destination(c.node(1).proxy, &id, &cookie)
        .await
        .expect("PEER-OK from node 2");
    dst.complete(&seq).await.unwrap();
    dst.send(b"moved\r\n").await.unwrap();
    vm.wait_closed(T).await.expect("node 1 closes the source");
    assert_eq!(native.read_exact_data(7, T).await.unwrap(), b"moved\r\n");
    let want = [&want[..], b"moved\r\n"].concat();
    assert_eq!(ssh_console.read_out(want.len(), T).await, want);
    assert_eq!(crate::web::read_bytes(&mut ws, 7).await, b"moved\r\n");
    native.send(b"typed after the move").await.unwrap();
    assert_eq!(
        dst.read_exact_data(20, T).await.unwrap(),
        b"typed after the move"
    );
    // And an unknown name is still unknown, on any node.
    let unknown = crate::admin::native_connect(c.node(1), "no-such-vm", None)
        .await
        .err()
        .expect("connected to nothing");
    assert_eq!(unknown["code"], "vm_not_found", "{unknown}");
}

/// inetutils telnet, run as users run it (`telnet HOST PORT`) on node 2,
/// for a VM on node 1 that then moves to node 2: the VM's bytes arrive
/// exactly once on its terminal, before and after the move (the VM
/// speaking on node 2 before the console could follow), and typing
/// reaches the VM on its new node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inetutils_telnet_follows_its_vm_across_nodes() {
    let telnet = crate::real_clients::require_inetutils_telnet();
    let c = Nodes::start(2, &[]);
    let id = Identity::numbered(1930);
    let src = SimVm::connect(c.node(0).proxy, &id)
        .await
        .expect("VM connects");
    let (_, port) = wait_for_vm(c.node(0).admin, &id.name, T).await;
    c.listed_everywhere(&id.name, port).await;
    let telnet = telnet.to_str().expect("utf-8 path").to_string();
    let (host, port_s) = (node_ip(1), port.to_string());
    let mut client = crate::real_clients::on_pty("telnet", &[&telnet, &host, &port_s]);
    assert!(
        client.wait_for(b"Escape character is", T).await,
        "telnet did not connect\n{}",
        client.transcript()
    );
    held_with_consoles(&c, 0, &id.name, 1).await;
    src.send(b"before the move\r\n").await.unwrap();
    assert!(
        client.wait_for(b"before the move\r\n", T).await,
        "{}",
        client.transcript()
    );

    let seq = [0x19, 0x30, 0, 1];
    let cookie = src.expect_goahead(&seq).await;
    let dst = SimVm::connect_destination(c.node(1).proxy, &id, &cookie)
        .await
        .expect("PEER-OK from node 2");
    dst.complete(&seq).await.unwrap();
    dst.send(b"after the move\r\n").await.unwrap();
    src.wait_closed(T).await.expect("node 1 closes the source");
    assert!(
        client.wait_for(b"after the move\r\n", T).await,
        "{}",
        client.transcript()
    );
    held_with_consoles(&c, 1, &id.name, 1).await;
    client.write(b"typed");
    assert_eq!(dst.read_exact_data(5, T).await.unwrap(), b"typed");
    let out = client.out();
    for line in [&b"before the move\r\n"[..], b"after the move\r\n"] {
        assert_eq!(
            memchr::memmem::find_iter(&out, line).count(),
            1,
            "{:?} not exactly once\n{}",
            String::from_utf8_lossy(line),
            client.transcript()
        );
    }
}
