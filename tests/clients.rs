//! Independent NBD clients against `thinline serve`: libnbd's tools (nbdinfo, nbdcopy,
//! nbdsh), qemu (qemu-img, qemu-io; qemu 10 negotiates extended headers, libnbd 1.14
//! structured replies, so both reply paths are covered), fio's nbd engine and the `nbd`
//! crate (a synchronous Rust client: `NBD_OPT_EXPORT_NAME`, simple replies), on unix
//! sockets and on TCP.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::net::TcpStream;
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::Duration;

use common::{Fixture, Served, nbdsh, require, run, stdout};

const MIB: u64 = 1 << 20;

fn json(cmd: &mut Command) -> serde_json::Value {
    serde_json::from_str(&stdout(cmd)).expect("valid JSON")
}

fn nbdinfo_export(uri: &str) -> serde_json::Value {
    let v = json(Command::new("nbdinfo").arg("--json").arg(uri));
    v["exports"][0].clone()
}

#[test]
fn nbdinfo_json_reports_every_flag_and_context_of_a_writable_export() {
    if !require(&["nbdinfo"]) {
        return;
    }
    let fx = Fixture::new(64 * MIB);
    let served = Served::unix(fx.dir.path(), &[], &[fx.image.to_str().unwrap()]);
    let e = nbdinfo_export(&served.uri(""));
    for flag in [
        "can_cache",
        "can_df",
        "can_fast_zero",
        "can_flush",
        "can_fua",
        "can_multi_conn",
        "can_trim",
        "can_zero",
    ] {
        assert_eq!(e[flag], true, "{flag} in {e:#}");
    }
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["export-size"], 64 * MIB);
    assert_eq!(
        e["contexts"],
        serde_json::json!(["base:allocation", "qemu:allocation-depth"])
    );
    assert_eq!(e["block_size_minimum"], 1);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32 * MIB);
    assert_eq!(e["description"], "raw image disk.img");
}

#[test]
fn nbdinfo_json_reports_a_read_only_export_over_tcp() {
    if !require(&["nbdinfo"]) {
        return;
    }
    let fx = Fixture::new(16 * MIB);
    let served = Served::tcp(&["-r"], &[fx.image.to_str().unwrap()]);
    let e = nbdinfo_export(&served.tcp_uri(""));
    assert_eq!(e["is_read_only"], true);
    for flag in ["can_trim", "can_zero", "can_fast_zero"] {
        assert_eq!(
            e[flag], false,
            "{flag} must not be advertised read-only: {e:#}"
        );
    }
    for flag in [
        "can_cache",
        "can_df",
        "can_flush",
        "can_fua",
        "can_multi_conn",
    ] {
        assert_eq!(e[flag], true, "{flag} in {e:#}");
    }
    assert_eq!(
        e["contexts"],
        serde_json::json!(["base:allocation", "qemu:allocation-depth"])
    );
}

#[test]
fn nbdinfo_can_answers_match_the_export() {
    if !require(&["nbdinfo"]) {
        return;
    }
    let fx = Fixture::new(4 * MIB);
    let rw = Served::unix(fx.dir.path(), &[], &[fx.image.to_str().unwrap()]);
    let can = |uri: &str, what: &str| {
        Command::new("nbdinfo")
            .args(["--can", what, uri])
            .status()
            .unwrap()
            .code()
            .unwrap()
    };
    for what in [
        "multi-conn",
        "fua",
        "flush",
        "trim",
        "zero",
        "fast-zero",
        "cache",
        "df",
        "structured-reply",
    ] {
        assert_eq!(can(&rw.uri(""), what), 0, "--can {what}");
    }
    let dir = tempfile::tempdir().unwrap();
    let ro = Served::unix(dir.path(), &["-r"], &[fx.image.to_str().unwrap()]);
    for what in ["trim", "zero", "fast-zero"] {
        assert_eq!(
            can(&ro.uri(""), what),
            2,
            "--can {what} on a read-only export"
        );
    }
    assert_eq!(
        Command::new("nbdinfo")
            .args(["--is", "read-only", &ro.uri("")])
            .status()
            .unwrap()
            .code(),
        Some(0)
    );
}

#[test]
fn nbdinfo_list_shows_every_export_and_names_select_them() {
    if !require(&["nbdinfo"]) {
        return;
    }
    let fx = Fixture::new(4 * MIB);
    let other = fx.path("other.img");
    common::sparse_file(&other, 2 * MIB);
    let a = format!("alpha={}", fx.image.display());
    let b = format!("beta={}", other.display());
    let served = Served::unix(fx.dir.path(), &[], &[&a, &b]);
    let list = json(Command::new("nbdinfo").args(["--list", "--json", &served.uri("")]));
    let names: Vec<&str> = list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alpha", "beta"]);
    let sizes: Vec<u64> = list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-size"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, [4 * MIB, 2 * MIB]);
    // The default export "" is the first one.
    assert_eq!(
        stdout(Command::new("nbdinfo").args(["--size", &served.uri("")])).trim(),
        (4 * MIB).to_string()
    );
    assert_eq!(
        stdout(Command::new("nbdinfo").args(["--size", &served.uri("beta")])).trim(),
        (2 * MIB).to_string()
    );
}

#[test]
fn nbdinfo_map_reports_data_exactly_where_it_was_written() {
    if !require(&["nbdinfo"]) {
        return;
    }
    let fx = Fixture::new(64 * MIB);
    let served = Served::unix(fx.dir.path(), &[], &[fx.image.to_str().unwrap()]);
    let map = json(Command::new("nbdinfo").args(["--map", "--json", &served.uri("")]));
    let data: Vec<(u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"].as_u64() == Some(0))
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(data, fx.data_ranges(), "{map:#}");
    let total = common::mapped_length(&map);
    assert_eq!(total, fx.size);
}

#[test]
fn nbdcopy_copies_out_and_in_byte_for_byte_on_unix_and_tcp() {
    if !require(&["nbdcopy"]) {
        return;
    }
    let fx = Fixture::new(32 * MIB);
    let copy = fx.path("copy.img");
    let served = Served::unix(fx.dir.path(), &[], &[fx.image.to_str().unwrap()]);
    run(Command::new("nbdcopy").arg(served.uri("")).arg(&copy));
    assert!(
        common::read_file(&copy) == common::read_file(&fx.image),
        "nbdcopy out differs"
    );
    drop(served);

    // Into a fresh export over TCP, with flush.
    let target = fx.path("target.img");
    common::sparse_file(&target, 32 * MIB);
    let served = Served::tcp(&[], &[target.to_str().unwrap()]);
    run(Command::new("nbdcopy")
        .arg("--flush")
        .arg(&fx.image)
        .arg(served.tcp_uri("")));
    assert!(
        common::read_file(&target) == common::read_file(&fx.image),
        "nbdcopy in differs"
    );
}

#[test]
fn nbdsh_multi_conn_flush_on_one_handle_makes_writes_visible_on_all() {
    if !require(&["nbdsh"]) {
        return;
    }
    let fx = Fixture::new(8 * MIB);
    let served = Served::unix(fx.dir.path(), &[], &[fx.image.to_str().unwrap()]);
    let out = nbdsh(
        &served.uri(""),
        r#"
hs = [nbd.NBD() for _ in range(3)]
for x in hs:
    x.connect_uri(URI)
    assert x.can_multi_conn()
data = b"\x5a" * 65536
hs[1].pwrite(data, 1048576)
hs[2].flush()
assert hs[0].pread(65536, 1048576) == data
hs[0].pwrite(b"\x77" * 4096, 0, nbd.CMD_FLAG_FUA)
assert hs[2].pread(4096, 0) == b"\x77" * 4096
for x in hs:
    x.shutdown()
print("ok")
"#,
    );
    assert_eq!(out.trim(), "ok");
    let mut buf = vec![0u8; 65536];
    std::fs::File::open(&fx.image)
        .unwrap()
        .read_exact_at(&mut buf, MIB)
        .unwrap();
    assert!(
        buf.iter().all(|&b| b == 0x5a),
        "the image holds what was written"
    );
}

#[test]
fn nbdsh_without_structured_replies_reads_and_writes_with_simple_replies() {
    if !require(&["nbdsh"]) {
        return;
    }
    let fx = Fixture::new(8 * MIB);
    let served = Served::unix(fx.dir.path(), &[], &[fx.image.to_str().unwrap()]);
    let out = nbdsh(
        &served.uri(""),
        r#"
h.set_request_structured_replies(False)
h.connect_uri(URI)
assert not h.get_structured_replies_negotiated()
assert not h.can_df()
h.pwrite(b"\x01" * 8192, 4096)
h.flush()
assert h.pread(8192, 4096) == b"\x01" * 8192
# A hole read through a simple reply arrives as zeroes.
assert h.pread(4096, 4 * 1048576) == bytes(4096)
try:
    h.pread(4096, 8 * 1048576)
    raise SystemExit("read past the end succeeded")
except nbd.Error as e:
    assert e.errnum == 22, e   # EINVAL
print("ok")
"#,
    );
    assert_eq!(out.trim(), "ok");
    served.assert_logs("mode=Simple", Duration::from_secs(5));
}

#[test]
fn nbdsh_lists_meta_contexts_with_and_without_wildcards() {
    if !require(&["nbdsh"]) {
        return;
    }
    let fx = Fixture::new(4 * MIB);
    let served = Served::unix(fx.dir.path(), &[], &[fx.image.to_str().unwrap()]);
    let out = nbdsh(
        &served.uri(""),
        r#"
h.set_opt_mode(True)
h.connect_uri(URI)
found = []
h.opt_list_meta_context(lambda name: found.append(name))
assert found == ["base:allocation", "qemu:allocation-depth"], found
h.add_meta_context("base:")
wild = []
h.opt_list_meta_context(lambda name: wild.append(name))
assert wild == ["base:allocation"], wild
h.clear_meta_contexts()
h.add_meta_context("qemu:")
qemu = []
h.opt_list_meta_context(lambda name: qemu.append(name))
assert qemu == ["qemu:allocation-depth"], qemu
h.clear_meta_contexts()
h.add_meta_context("qemu:dirty-bitmap:none")
none = []
h.opt_list_meta_context(lambda name: none.append(name))
assert none == [], none
h.clear_meta_contexts()
h.add_meta_context("base:allocation")
h.opt_go()
assert h.can_meta_context("base:allocation")
seen = []
h.block_status(1048576, 0, lambda ctx, off, ents, err: seen.append((ctx, ents)))
assert seen[0][0] == "base:allocation", seen
assert seen[0][1][:2] == [65536, 0], seen
print("ok")
"#,
    );
    assert_eq!(out.trim(), "ok");
}

#[test]
fn nbdsh_fast_zero_either_zeroes_or_fails_with_enotsup_leaving_data() {
    if !require(&["nbdsh"]) {
        return;
    }
    let fx = Fixture::new(8 * MIB);
    let served = Served::unix(fx.dir.path(), &[], &[fx.image.to_str().unwrap()]);
    let out = nbdsh(
        &served.uri(""),
        r#"
h.connect_uri(URI)
assert h.can_fast_zero()
before = h.pread(65536, 0)
assert before != bytes(65536)
# Holes allowed: punching is fast on every Linux filesystem we run on.
h.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(65536, 0) == bytes(65536)
# NO_HOLE + FAST_ZERO: fast only where FALLOC_FL_ZERO_RANGE works.
h.pwrite(b"\x33" * 65536, 1048576)
try:
    h.zero(65536, 1048576, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
    assert h.pread(65536, 1048576) == bytes(65536)
    print("zeroed")
except nbd.Error as e:
    assert e.errnum == 95, e   # ENOTSUP
    assert h.pread(65536, 1048576) == b"\x33" * 65536, "data must be untouched"
    print("enotsup")
"#,
    );
    assert!(matches!(out.trim(), "zeroed" | "enotsup"), "{out}");
}

#[test]
fn qemu_img_compare_convert_and_map_agree_with_the_image() {
    if !require(&["qemu-img"]) {
        return;
    }
    let fx = Fixture::new(48 * MIB);
    let served = Served::unix(fx.dir.path(), &["-r"], &[fx.image.to_str().unwrap()]);
    let uri = served.uri("");
    let out = stdout(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&fx.image)
            .arg(&uri),
    );
    assert!(out.contains("Images are identical"), "{out}");

    let converted = fx.path("converted.img");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &uri])
        .arg(&converted));
    assert!(common::read_file(&converted) == common::read_file(&fx.image));

    let map = json(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &uri]));
    let data: Vec<(u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(data, fx.data_ranges(), "{map:#}");
    assert!(
        map.as_array()
            .unwrap()
            .iter()
            .all(|e| e["data"] == true || e["zero"] == true)
    );
    // qemu 10 negotiates extended headers.
    served.assert_logs("mode=Extended", Duration::from_secs(5));
}

#[test]
fn qemu_img_converts_into_an_export_over_tcp() {
    if !require(&["qemu-img"]) {
        return;
    }
    let fx = Fixture::new(16 * MIB);
    let target = fx.path("target.img");
    common::sparse_file(&target, 16 * MIB);
    let served = Served::tcp(&[], &[target.to_str().unwrap()]);
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-W", "-m", "16", "-f", "raw", "-O", "raw"])
        .arg(&fx.image)
        .arg(served.tcp_uri("")));
    assert!(common::read_file(&target) == common::read_file(&fx.image));
}

#[test]
fn qemu_io_writes_zeroes_discards_flushes_and_pipelines() {
    if !require(&["qemu-io"]) {
        return;
    }
    let fx = Fixture::new(32 * MIB);
    let served = Served::unix(fx.dir.path(), &[], &[fx.image.to_str().unwrap()]);
    let mut cmds = vec![
        "write -P 0xab 2M 64k",
        "read -P 0xab 2M 64k",
        "write -z 2M 32k",
        "read -P 0 2M 32k",
        "read -P 0xab 2080k 32k",
        "write -P 0xcd 4M 1M",
        "write -z -u 4M 512k",
        "read -P 0 4M 512k",
        "read -P 0xcd 4608k 512k",
        "discard 6M 1M",
        "flush",
        "write -f -P 0x42 12M 4k",
    ];
    // 64 requests in flight at once, then a flush.
    let aio: Vec<String> = (0..64)
        .map(|i| format!("aio_write -P 0x{:02x} {}k 4k", i + 1, 16 * 1024 + i * 4))
        .collect();
    cmds.extend(aio.iter().map(String::as_str));
    cmds.push("aio_flush");
    let out = common::qemu_io_raw(&served.uri(""), &cmds);
    assert!(!out.contains("Pattern verification failed"), "{out}");

    let img = common::read_file(&fx.image);
    let at = |o: u64, n: u64| &img[o as usize..(o + n) as usize];
    assert!(at(2 * MIB, 32 * 1024).iter().all(|&b| b == 0));
    assert!(
        at(2 * MIB + 32 * 1024, 32 * 1024)
            .iter()
            .all(|&b| b == 0xab)
    );
    assert!(at(4 * MIB, 512 * 1024).iter().all(|&b| b == 0));
    assert!(
        at(4 * MIB + 512 * 1024, 512 * 1024)
            .iter()
            .all(|&b| b == 0xcd)
    );
    assert!(at(12 * MIB, 4096).iter().all(|&b| b == 0x42));
    for i in 0..64u64 {
        assert!(
            at(16 * MIB + i * 4096, 4096)
                .iter()
                .all(|&b| b == (i + 1) as u8),
            "aio write {i}"
        );
    }
}

#[test]
fn qemu_io_reads_holes_and_data_of_a_read_only_export() {
    if !require(&["qemu-io"]) {
        return;
    }
    let fx = Fixture::new(8 * MIB);
    let served = Served::unix(fx.dir.path(), &["-r"], &[fx.image.to_str().unwrap()]);
    let hole = format!("read -P 0 {MIB} 1M");
    let out = stdout(Command::new("qemu-io").args([
        "-r",
        "-f",
        "raw",
        &served.uri(""),
        "-c",
        &hole,
        "-c",
        "read 0 64k",
    ]));
    assert!(!out.contains("failed"), "{out}");
}

#[test]
fn fio_nbd_engine_random_writes_verify_with_crc32c() {
    if !require(&["fio"]) {
        return;
    }
    let fx = Fixture::new(64 * MIB);
    let served = Served::unix(fx.dir.path(), &[], &[fx.image.to_str().unwrap()]);
    let out = stdout(
        Command::new("fio")
            .args([
                "--name=verify",
                "--ioengine=nbd",
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=32",
            ])
            .args([
                "--size=32M",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--verify_state_save=0",
                "--output-format=json",
            ])
            .arg(format!("--uri={}", served.uri(""))),
    );
    let v: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "{job:#}");
    assert_eq!(job["write"]["io_bytes"], 32 * MIB);
    assert!(
        job["read"]["io_bytes"].as_u64().unwrap() >= 32 * MIB,
        "verify read everything back"
    );
}

/// Connects the `nbd` crate's client (crates.io) to the TCP export of `served`.
fn nbd_crate_client(served: &Served) -> (TcpStream, nbd::client::Export) {
    let mut stream = TcpStream::connect(served.tcp.as_deref().expect("listening on TCP")).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let export = nbd::client::handshake(&mut stream, b"").expect("nbd crate handshake");
    (stream, export)
}

/// The `nbd` crate is another Rust client of the ecosystem, with the oldest negotiation a
/// fixed-newstyle client may use: `NBD_OPT_EXPORT_NAME` (no `NBD_OPT_GO`), no
/// `NO_ZEROES` (so the 124 bytes of zeroes after the export flags must come, and be zero)
/// and simple replies only.
#[test]
fn the_nbd_crate_client_negotiates_reads_known_data_and_reads_back_its_writes() {
    let fx = Fixture::new(16 * MIB);
    let original = common::read_file(&fx.image);
    let served = Served::tcp(&[], &[fx.image.to_str().unwrap()]);
    let (mut stream, export) = nbd_crate_client(&served);
    assert_eq!(export.size, 16 * MIB);
    assert!(!export.readonly);
    assert!(export.send_flush);
    assert!(export.send_trim);
    let mut client = nbd::client::NbdClient::new(&mut stream, &export);

    // Known data, and the holes around it, unaligned.
    for (off, len) in fx.data_ranges() {
        let start = off.saturating_sub(1000);
        let end = (off + len + 1000).min(16 * MIB);
        let mut got = vec![0u8; (end - start) as usize];
        client.seek(SeekFrom::Start(start)).unwrap();
        client.read_exact(&mut got).unwrap();
        assert!(
            got == original[start as usize..end as usize],
            "data differs in {start}..{end}"
        );
    }

    // A write at an odd offset across a data range's edge, then a flush: read back
    // through the same connection and from the file.
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8 ^ 0x5a).collect();
    let at = 65536 - 777;
    client.seek(SeekFrom::Start(at)).unwrap();
    client.write_all(&data).unwrap();
    client.flush().unwrap();
    let mut back = vec![0u8; data.len()];
    client.seek(SeekFrom::Start(at)).unwrap();
    client.read_exact(&mut back).unwrap();
    assert!(back == data, "written data does not read back");
    let on_disk = common::read_file(&fx.image);
    assert!(on_disk[at as usize..at as usize + data.len()] == data[..]);
    assert!(on_disk[..at as usize] == original[..at as usize]);
    drop(stream);

    served.assert_logs("option=NBD_OPT_EXPORT_NAME", Duration::from_secs(5));
    served.assert_logs("mode=Simple", Duration::from_secs(5));
}

#[test]
fn the_nbd_crate_client_sees_a_read_only_export_and_its_writes_are_refused() {
    let fx = Fixture::new(MIB);
    let original = common::read_file(&fx.image);
    let served = Served::tcp(&["-r"], &[fx.image.to_str().unwrap()]);
    let (mut stream, export) = nbd_crate_client(&served);
    assert_eq!(export.size, MIB);
    assert!(export.readonly);
    assert!(!export.send_trim);
    let mut client = nbd::client::NbdClient::new(&mut stream, &export);
    client.seek(SeekFrom::Start(0)).unwrap();
    assert!(client.write_all(&[0xff; 4096]).is_err());
    drop(stream);
    // The refusal reached the client as an error; the image is untouched.
    assert!(common::read_file(&fx.image) == original);
    // A new connection still reads the data.
    let (mut stream, export) = nbd_crate_client(&served);
    let mut client = nbd::client::NbdClient::new(&mut stream, &export);
    let mut got = vec![0u8; 65536];
    client.read_exact(&mut got).unwrap();
    assert!(got == original[..65536]);
}
