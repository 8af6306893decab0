//! A vSPC.py site's first start: `vspc -f PREFIX` beside the store vSPC.py's
//! File backend left (made here by Python's real `shelve`, as vSPC.py makes
//! it) gives every VM its old port, and `vspc import --from-vspcpy` prints
//! and writes the same mappings. A broken store stops start-up and nothing
//! is written.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::common::*;
use vspc_testkit::sim::Identity;

use vspc_testkit::vspcpy::python_has;

/// Make a vSPC.py store at `prefix` with tests/make_vspcpy_store.py.
fn make_store(format: &str, prefix: &Path, json: &str) {
    vspc_testkit::vspcpy::make_store(format, prefix, None, json, false)
}

/// Every file in `dir` and its bytes.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| {
            let e = e.expect("dir entry");
            let bytes = std::fs::read(e.path()).expect("read file");
            (e.file_name().to_string_lossy().into_owned(), bytes)
        })
        .collect()
}

fn s(p: &Path) -> String {
    p.to_str().expect("test paths are UTF-8").to_string()
}

#[tokio::test]
async fn a_vspc_py_store_keeps_every_port_at_the_first_start() {
    for (format, module, said) in [
        ("gnu", "dbm.gnu", "dbm.gnu"),
        ("dumb", "dbm.dumb", "dbm.dumb"),
    ] {
        if !python_has(module) {
            continue;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let prefix = dir.path().join("vspc");
        let start = free_range(16);
        let ids: Vec<Identity> = (0..3)
            .map(|i| Identity {
                name: ["web-1", "Ünïcødé 日本語", "it's \"db\""][i as usize].into(),
                ..Identity::numbered(700 + i)
            })
            .collect();
        // vSPC.py gave them ports in the middle of the range, out of order.
        let ports = [start + 9, start + 4, start + 12];
        let items: Vec<String> = ids
            .iter()
            .zip(ports)
            .map(|(id, port)| {
                format!(
                    "[\"{}\", \"{}\", {port}]",
                    id.uuid_display(),
                    id.name.replace('"', "\\\"")
                )
            })
            .collect();
        make_store(format, &prefix, &format!("[{}]", items.join(", ")));
        let before = snapshot(dir.path());

        let mut d = Daemon::builder()
            .range_start(start)
            .args(&["-f", &s(&prefix)])
            .start();
        assert!(
            d.wait_log(&format!("imported 3 VMs from vSPC.py's {said} store"), T)
                .await,
            "{format}: no import line in the log:\n{}",
            d.log()
        );
        // Listed with their old ports before any VM connects.
        let rows = list_vms(d.admin).await;
        for (id, port) in ids.iter().zip(ports) {
            assert!(
                rows.contains(&(id.name.clone(), id.uuid_display(), Some(port))),
                "{format}: {} not listed on {port}: {rows:?}",
                id.name
            );
        }
        // A VM that connects gets its old port, and a console there sees it.
        let (vm, port) = vm_up(&d, &ids[1]).await;
        assert_eq!(port, ports[1], "{format}");
        let console = console_synced(&vm, &d, port).await;
        drop(console);
        drop(vm);
        d.terminate(T).await.expect("vspc stops");

        // vSPC.py's files are as they were; vspc's map is beside them.
        let mut after = snapshot(dir.path());
        let map = after
            .remove("vspc.vspc-map.toml")
            .unwrap_or_else(|| panic!("{format}: no vspc.vspc-map.toml: {:?}", after.keys()));
        assert_eq!(after, before, "{format}: vSPC.py's files changed");
        let map = String::from_utf8(map).expect("the map is text");
        assert!(map.contains("Ünïcødé 日本語"), "{format}: {map}");
    }
}

#[tokio::test]
async fn vspc_import_prints_and_writes_the_mappings() {
    if !python_has("dbm.gnu") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let prefix = dir.path().join("vspc");
    make_store(
        "gnu",
        &prefix,
        r#"[["u-1", "web-1", 50001], ["u-2", "Ünïcødé", 50000]]"#,
    );
    let p = s(&prefix);
    let dry = run_to_exit(&["import", "--from-vspcpy", &p, "--dry-run"], T);
    assert!(dry.status.is_some_and(|s| s.success()), "{}", dry.stderr);
    assert_eq!(dry.stdout, "Ünïcødé:u-2:50000\nweb-1:u-1:50001\n");
    assert!(dry.stderr.contains("wrote nothing"), "{}", dry.stderr);
    assert!(!dir.path().join("vspc.vspc-map.toml").exists());

    let done = run_to_exit(&["import", "--from-vspcpy", &p], T);
    assert!(done.status.is_some_and(|s| s.success()), "{}", done.stderr);
    assert_eq!(done.stdout, dry.stdout);
    assert!(
        done.stderr.contains("imported 2 VMs") && done.stderr.contains("vspc.vspc-map.toml"),
        "{}",
        done.stderr
    );
    // A second import does not replace vspc's map unless told to.
    let again = run_to_exit(&["import", "--from-vspcpy", &p], T);
    assert_eq!(again.status.and_then(|s| s.code()), Some(1));
    assert!(again.stderr.contains("--force"), "{}", again.stderr);
    let forced = run_to_exit(&["import", "--from-vspcpy", &p, "--force"], T);
    assert!(
        forced.status.is_some_and(|s| s.success()),
        "{}",
        forced.stderr
    );

    // The daemon reads that map (no second import).
    let start = free_range(4);
    let mut d = Daemon::builder()
        .range_start(start)
        .args(&["-f", &p])
        .start();
    let rows = list_vms(d.admin).await;
    assert!(
        rows.contains(&("web-1".into(), "u-1".into(), Some(50001))),
        "{rows:?}"
    );
    assert!(!d.log().contains("imported"), "{}", d.log());
    d.terminate(T).await.expect("vspc stops");
}

#[tokio::test]
async fn a_broken_vspc_py_store_stops_start_up_and_nothing_is_written() {
    if !python_has("dbm.gnu") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let prefix = dir.path().join("vspc");
    // Two VMs with one port, as no sane vSPC.py store has.
    make_store(
        "gnu",
        &prefix,
        r#"[["u-1", "a", 50001], ["u-2", "b", 50001]]"#,
    );
    let before = snapshot(dir.path());
    let exit = run_to_exit(
        &[
            "--proxy-iface",
            "127.0.0.1",
            "--proxy-port",
            &free_port().to_string(),
            "--admin-port",
            &free_port().to_string(),
            "--no-http",
            "-f",
            &s(&prefix),
        ],
        Duration::from_secs(10),
    );
    assert_eq!(
        exit.status.and_then(|s| s.code()),
        Some(1),
        "{}",
        exit.stderr
    );
    assert!(
        exit.stderr.contains(&s(&prefix)) && exit.stderr.contains("port 50001 is given to both"),
        "{}",
        exit.stderr
    );
    let import = run_to_exit(&["import", "--from-vspcpy", &s(&prefix)], T);
    assert_eq!(import.status.and_then(|s| s.code()), Some(1));
    assert!(
        import.stderr.contains("nothing was imported"),
        "{}",
        import.stderr
    );
    assert_eq!(snapshot(dir.path()), before);
}
