//! Stores made by Python's real `shelve` (tests/make_vspcpy_store.py), as
//! vSPC.py writes them, and hostile or broken ones.

use super::*;

use tempfile::TempDir;

pub(crate) use vspc_testkit::vspcpy::python_has;

/// Run the store maker: `items` is its JSON input.
pub(crate) fn make(format: &str, prefix: &Path, protocol: Option<u8>, items: &str) {
    vspc_testkit::vspcpy::make_store(format, prefix, protocol, items, false)
}

fn rec(uuid: &str, name: &str, port: Option<u16>) -> VmRecord {
    VmRecord {
        uuid: uuid.into(),
        name: name.into(),
        port,
    }
}

/// JSON for `[uuid, name, port]` records.
pub(crate) fn json(records: &[VmRecord]) -> String {
    let esc = |s: &str| {
        let mut o = String::from("\"");
        for c in s.chars() {
            match c {
                '"' => o.push_str("\\\""),
                '\\' => o.push_str("\\\\"),
                c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
                c => o.push(c),
            }
        }
        o.push('"');
        o
    };
    let items: Vec<String> = records
        .iter()
        .map(|r| {
            let port = r.port.map_or("null".to_string(), |p| p.to_string());
            format!("[{}, {}, {port}]", esc(&r.uuid), esc(&r.name))
        })
        .collect();
    format!("[{}]", items.join(", "))
}

fn raw_json(pairs: &[(&[u8], &[u8])]) -> String {
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let items: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{{\"raw\": [\"{}\", \"{}\"]}}", hex(k), hex(v)))
        .collect();
    format!("[{}]", items.join(", "))
}

pub(crate) fn sample() -> Vec<VmRecord> {
    vec![
        rec("4213e5a5a9e0b3d1-77a0f6d6a2c4e6b1", "web-1", Some(50000)),
        rec(
            "4213aaaa00000000-0000000000000001",
            "Ünïcødé 日本語 🚀",
            Some(50001),
        ),
        rec(
            "4213aaaa00000000-0000000000000002",
            "it's \"quoted\" \\ too",
            Some(50007),
        ),
        rec(
            "4213aaaa00000000-0000000000000003_kgdb",
            "db_kgdb",
            Some(65535),
        ),
        rec("4213aaaa00000000-0000000000000004", "no port", None),
    ]
}

#[test]
fn python_shelves_of_every_protocol_and_both_formats() {
    for format in ["gnu", "dumb"] {
        if !python_has(&format!("dbm.{format}")) {
            continue;
        }
        for protocol in [0u8, 1, 2, 3, 4, 5] {
            let dir = TempDir::new().unwrap();
            let prefix = dir.path().join("vspc");
            make(format, &prefix, Some(protocol), &json(&sample()));
            let got = read(&prefix).unwrap_or_else(|e| panic!("{format} p{protocol}: {e}"));
            assert_eq!(got.records, sample(), "{format} protocol {protocol}");
            let want = if format == "gnu" {
                Format::Gnu
            } else {
                Format::Dumb
            };
            assert_eq!(got.format, want);
        }
    }
}

#[test]
fn shelve_open_as_vspc_py_calls_it_with_updates_and_deletes() {
    if !python_has("dbm") {
        return;
    }
    let dir = TempDir::new().unwrap();
    let prefix = dir.path().join("vspc");
    // Renames, a port that moves, a deleted VM: later writes win.
    let items = r#"[["u1", "one", 50000], ["u2", "two", 50001], ["u3", "three", 50002],
        ["u1", "one renamed, and much longer than before", 50000],
        {"del": "u2"}, ["u3", "three", 50001]]"#;
    make("default", &prefix, None, items);
    let got = read(&prefix).unwrap();
    assert_eq!(
        got.records,
        vec![
            rec(
                "u1",
                "one renamed, and much longer than before",
                Some(50000)
            ),
            rec("u3", "three", Some(50001)),
        ]
    );
    let found = find(&prefix).unwrap();
    assert_eq!(found.format, got.format);
}

/// Python 2's pickles of vSPC.py's record: `str` values (STRING and
/// SHORT_BINSTRING opcodes, UTF-8 bytes), a `unicode` name, `I`/`M` ports.
#[test]
fn python_2_pickles_in_both_formats() {
    let p0: &[u8] = b"(dp0\nS'port'\np1\nI50010\nsS'name'\np2\nS'caf\\xc3\\xa9 \\'py2\\''\np3\nsS'uuid'\np4\nS'u-py2-0'\np5\ns.";
    let p0u: &[u8] = b"(dp0\nS'uuid'\np1\nS'u-py2-u'\np2\nsS'name'\np3\nVna\\u00efve\np4\nsS'port'\np5\nI50012\ns.";
    let mut p2: Vec<u8> = b"\x80\x02}q\x00(U\x04uuidq\x01U\x07u-py2-2q\x02U\x04nameq\x03U\x05\xc3\xa9t\xc3\xa9q\x04U\x04portq\x05M".to_vec();
    p2.extend_from_slice(&50011u16.to_le_bytes());
    p2.extend_from_slice(b"u.");
    let pairs: Vec<(&[u8], &[u8])> = vec![(b"u-py2-0", p0), (b"u-py2-2", &p2), (b"u-py2-u", p0u)];
    let want = vec![
        rec("u-py2-0", "café 'py2'", Some(50010)),
        rec("u-py2-2", "été", Some(50011)),
        rec("u-py2-u", "naïve", Some(50012)),
    ];
    for format in ["gnu", "dumb"] {
        if !python_has(&format!("dbm.{format}")) {
            continue;
        }
        let dir = TempDir::new().unwrap();
        let prefix = dir.path().join("vspc");
        make(format, &prefix, None, &raw_json(&pairs));
        assert_eq!(read(&prefix).unwrap().records, want, "{format}");
    }
    // Python 2's dumbdbm wrote `L` after the offsets (file.tell() was a long).
    let dir = TempDir::new().unwrap();
    let prefix = dir.path().join("py2");
    let mut dat = Vec::new();
    let mut lines = String::new();
    for (k, v) in &pairs {
        let at = dat.len();
        dat.extend_from_slice(v);
        dat.resize(dat.len().div_ceil(512) * 512, 0);
        lines.push_str(&format!(
            "'{}', ({at}L, {})\n",
            std::str::from_utf8(k).unwrap(),
            v.len()
        ));
    }
    fs::write(with_suffix(&prefix, ".dat"), &dat).unwrap();
    fs::write(with_suffix(&prefix, ".dir"), lines).unwrap();
    assert_eq!(read(&prefix).unwrap().records, want);
}

#[test]
fn the_numsync_magic_reads_like_the_standard_one() {
    if !python_has("dbm.gnu") {
        return;
    }
    let dir = TempDir::new().unwrap();
    let prefix = dir.path().join("vspc");
    make("gnu", &prefix, None, &json(&sample()));
    // GDBM 1.21+ with numsync: another magic and an extension header after
    // the fields this reader uses.
    let mut bytes = fs::read(&prefix).unwrap();
    bytes[..4].copy_from_slice(&0x1357_9ad1u32.to_le_bytes());
    fs::write(&prefix, &bytes).unwrap();
    assert_eq!(read(&prefix).unwrap().records, sample());
    // Written on a big-endian machine: a clear refusal.
    bytes[..4].copy_from_slice(&0x1357_9acfu32.to_be_bytes());
    fs::write(&prefix, &bytes).unwrap();
    let err = read(&prefix).unwrap_err();
    assert!(err.contains("big-endian"), "{err}");
}

#[test]
fn many_vms_split_over_many_buckets() {
    if !python_has("dbm.gnu") {
        return;
    }
    let many: Vec<VmRecord> = (0..3000u16)
        .map(|i| {
            rec(
                &format!("4213{i:012x}-{i:016x}"),
                &format!("vm-{i}"),
                Some(20000 + i),
            )
        })
        .collect();
    for format in ["gnu", "dumb"] {
        let dir = TempDir::new().unwrap();
        let prefix = dir.path().join("vspc");
        vspc_testkit::vspcpy::make_store(format, &prefix, None, &json(&many), true);
        assert_eq!(read(&prefix).unwrap().records, many, "{format}");
    }
}

/// A store of `pairs` written raw; the error `read` gives.
fn error_for(format: &str, pairs: &[(&[u8], &[u8])]) -> (PathBuf, String, TempDir) {
    let dir = TempDir::new().unwrap();
    let prefix = dir.path().join("vspc");
    make(format, &prefix, None, &raw_json(pairs));
    let err = read(&prefix).unwrap_err();
    (prefix, err, dir)
}

#[test]
fn hostile_records_are_clear_errors() {
    let long = "x".repeat(60_000);
    let mut long_pickle = b"\x80\x04}(\x8c\x04uuid\x8c\x01u\x8c\x04name\x8d".to_vec();
    long_pickle.extend_from_slice(&(long.len() as u64).to_le_bytes());
    long_pickle.extend_from_slice(long.as_bytes());
    long_pickle.extend_from_slice(b"\x8c\x04portM\x50\xc3u.");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "not a dict",
            b"\x80\x04]\x94.".to_vec(),
            "a list, not vSPC.py's dict",
        ),
        (
            "code",
            b"cos\nsystem\n(S'echo pwned'\ntR.".to_vec(),
            "not a plain pickle",
        ),
        ("truncated", b"\x80\x04}(\x8c\x04uuid".to_vec(), "truncated"),
        (
            "trailing",
            b"(dS'uuid'\nS'u'\nsS'name'\nS'n'\nsS'port'\nI1\ns.junk".to_vec(),
            "after its pickle",
        ),
        (
            "newline",
            b"(dS'uuid'\nS'u'\nsS'name'\nS'a\\nb'\nsS'port'\nI1\ns.".to_vec(),
            "control character U+000A",
        ),
        ("long name", long_pickle, "60000 bytes"),
        (
            "no port",
            b"(dS'uuid'\nS'u'\nsS'name'\nS'n'\ns.".to_vec(),
            "no 'port'",
        ),
        (
            "port 70000",
            b"(dS'uuid'\nS'u'\nsS'name'\nS'n'\nsS'port'\nI70000\ns.".to_vec(),
            "port 70000",
        ),
        (
            "text port",
            b"(dS'uuid'\nS'u'\nsS'name'\nS'n'\nsS'port'\nS'1'\ns.".to_vec(),
            "not a number",
        ),
        (
            "empty uuid",
            b"(dS'uuid'\nS''\nsS'name'\nS'n'\nsS'port'\nI1\ns.".to_vec(),
            "empty uuid",
        ),
        (
            "binary name",
            b"(dS'uuid'\nS'u'\nsS'name'\nS'\\xff'\nsS'port'\nI1\ns.".to_vec(),
            "not text",
        ),
    ];
    for format in ["gnu", "dumb"] {
        if !python_has(&format!("dbm.{format}")) {
            continue;
        }
        for (what, pickle, hint) in &cases {
            let (prefix, err, _dir) = error_for(format, &[(b"u", pickle)]);
            let main = if format == "gnu" {
                prefix.clone()
            } else {
                with_suffix(&prefix, ".dat")
            };
            assert!(
                err.contains(&main.display().to_string()),
                "{format} {what}: {err}"
            );
            assert!(err.contains(hint), "{format} {what}: {err} lacks {hint:?}");
            assert!(err.len() < 600 && !err.contains('\n'), "{what}: {err}");
        }
        let a = b"(dS'uuid'\nS'a'\nsS'name'\nS'a'\nsS'port'\nI5000\ns.";
        let b = b"(dS'uuid'\nS'b'\nsS'name'\nS'b'\nsS'port'\nI5000\ns.";
        let (_, err, _dir) = error_for(format, &[(b"a", a), (b"b", b)]);
        assert!(err.contains("port 5000 is given to both"), "{err}");
        // Two keys whose records claim the same uuid.
        let (_, err, _dir) = error_for(format, &[(b"a", a), (b"c", a)]);
        assert!(err.contains("two records") || err.contains("both"), "{err}");
    }
}

/// Every prefix of a real file, and every byte of its header and first
/// bucket changed, reads as records or as an error naming the file: never
/// a panic, never a huge allocation.
#[test]
fn damaged_gdbm_files_never_panic() {
    if !python_has("dbm.gnu") {
        return;
    }
    let dir = TempDir::new().unwrap();
    let prefix = dir.path().join("vspc");
    make("gnu", &prefix, None, &json(&sample()));
    let good = fs::read(&prefix).unwrap();
    let name = prefix.display().to_string();
    let cuts = (0..good.len())
        .step_by(509)
        .chain([1, 3, 4, 8, 40, 4095, 4096, 8191]);
    for cut in cuts {
        fs::write(&prefix, &good[..cut.min(good.len())]).unwrap();
        match read(&prefix) {
            Ok(got) => assert!(got.records.len() <= sample().len()),
            Err(e) => assert!(e.contains(&name) || e.contains("no vSPC.py store"), "{e}"),
        }
    }
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    // The header, the directory's start and the buckets' headers and first
    // elements; then anywhere.
    let hot: Vec<usize> = (0..64)
        .chain(4096..4160)
        .chain(8192..8192 + 1200)
        .chain(12288..12288 + 600)
        .filter(|&i| i < good.len())
        .collect();
    for round in 0..3000 {
        let mut bytes = good.clone();
        let at = if round % 3 == 0 {
            next() as usize % bytes.len()
        } else {
            hot[next() as usize % hot.len()]
        };
        bytes[at] = match round % 4 {
            0 => 0xff,
            1 => 0x7f,
            2 => bytes[at] ^ (1 << (next() % 8)),
            _ => next() as u8,
        };
        let _ = gdbm::read(&bytes);
        if round % 50 == 0 {
            fs::write(&prefix, &bytes).unwrap();
            if let Err(e) = read(&prefix) {
                assert!(e.contains(&name), "{e}");
            }
        }
    }
}

#[test]
fn damaged_dumb_stores_never_panic() {
    let dir = TempDir::new().unwrap();
    let prefix = dir.path().join("vspc");
    if !python_has("dbm.dumb") {
        return;
    }
    make("dumb", &prefix, None, &json(&sample()));
    let dir_file = with_suffix(&prefix, ".dir");
    let dat_file = with_suffix(&prefix, ".dat");
    let good_dir = fs::read(&dir_file).unwrap();
    let good_dat = fs::read(&dat_file).unwrap();
    for cut in (0..good_dat.len()).step_by(41) {
        fs::write(&dat_file, &good_dat[..cut]).unwrap();
        if let Err(e) = read(&prefix) {
            assert!(e.contains(&dat_file.display().to_string()), "{e}");
        }
    }
    fs::write(&dat_file, &good_dat).unwrap();
    for cut in (0..good_dir.len()).step_by(7) {
        fs::write(&dir_file, &good_dir[..cut]).unwrap();
        if let Err(e) = read(&prefix) {
            assert!(e.contains(&dir_file.display().to_string()), "{e}");
        }
    }
    for at in 0..good_dir.len() {
        for b in [b'\'', b'\\', b'9', b'(', b'\n', 0xff] {
            let mut bytes = good_dir.clone();
            bytes[at] = b;
            let _ = dumb::read(&bytes, &good_dat);
        }
    }
}

#[test]
fn handmade_gdbm_headers_are_refused_clearly() {
    let dir = TempDir::new().unwrap();
    let prefix = dir.path().join("vspc");
    let header = |fields: &[(usize, &[u8])]| {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(&0x1357_9acfu32.to_le_bytes());
        for (at, v) in fields {
            b[*at..*at + v.len()].copy_from_slice(v);
        }
        b
    };
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (header(&[(8, &(-5i64).to_le_bytes())]), "negative offset"),
        (
            header(&[
                (8, &0i64.to_le_bytes()),
                (16, &8i32.to_le_bytes()),
                (20, &40i32.to_le_bytes()),
            ]),
            "40 bits",
        ),
        (
            header(&[(8, &(1i64 << 40).to_le_bytes()), (16, &8i32.to_le_bytes())]),
            "outside",
        ),
        (
            // One directory entry (at 0), buckets of 4096 bytes with 9999 elements.
            header(&[
                (16, &8i32.to_le_bytes()),
                (24, &4096i32.to_le_bytes()),
                (28, &9999i32.to_le_bytes()),
            ]),
            "do not fit",
        ),
        (
            // A sane header whose only bucket lies past the end.
            header(&[
                (16, &8i32.to_le_bytes()),
                (24, &136i32.to_le_bytes()),
                (28, &1i32.to_le_bytes()),
            ]),
            "",
        ),
    ];
    for (bytes, hint) in cases {
        fs::write(&prefix, &bytes).unwrap();
        let err = read(&prefix).unwrap_err();
        assert!(err.contains(&prefix.display().to_string()), "{err}");
        assert!(err.contains(hint), "{err} lacks {hint}");
        assert!(err.contains("nothing was imported"), "{err}");
    }
}

#[test]
fn no_store_and_unread_formats_are_named() {
    let dir = TempDir::new().unwrap();
    let prefix = dir.path().join("vspc");
    let err = read(&prefix).unwrap_err();
    assert!(
        err.contains("no vSPC.py store") && err.contains("vspc.dat"),
        "{err}"
    );
    assert!(find(&prefix).is_none());

    // A vspc TOML map at PREFIX is not a vSPC.py store.
    fs::write(&prefix, "version = 1\n").unwrap();
    assert!(find(&prefix).is_none());
    assert!(!is_dbm_file(&prefix));

    // Berkeley DB's hash magic at offset 12, as dbm.ndbm writes PREFIX.db.
    let mut bdb = vec![0u8; 512];
    bdb[12..16].copy_from_slice(&0x0006_1561u32.to_le_bytes());
    fs::write(with_suffix(&prefix, ".db"), &bdb).unwrap();
    let err = read(&prefix).unwrap_err();
    assert!(
        err.contains("vspc.db") && err.contains("Berkeley DB"),
        "{err}"
    );
    assert!(err.contains("dbm.dumb"), "{err}");
}
