//! NBD over TLS (STARTTLS, x509) with real clients: libnbd's nbdinfo and nbdcopy with
//! `nbds://` URIs and `tls-certificates=DIR`, and qemu-img with a `tls-creds-x509`
//! object. Certificates are made by openssl for each test. libnbd checks a server's
//! certificate over TCP (not on unix sockets), so the refusals are tested over TCP.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::wire::{C_FIXED_NEWSTYLE, Client, opt, rep};
use common::{Served, require, run};

/// A CA, a server certificate for localhost / 127.0.0.1 signed by it, and a client
/// certificate signed by it, in `dir`; `client/` holds what libnbd and qemu read
/// (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`), `server-key.pem` is mode 0600.
fn certificates(dir: &Path) -> PathBuf {
    let sh = |script: &str| {
        let out = run(Command::new("sh").arg("-ec").arg(script).current_dir(dir));
        assert!(out.status.success(), "{out:?}");
    };
    sh(
        "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca-key.pem -out ca-cert.pem -days 30 \
          -subj '/CN=thinline test CA' 2>/dev/null
        openssl req -newkey rsa:2048 -nodes -keyout server-key.pem -out server.csr \
          -subj '/CN=localhost' 2>/dev/null
        printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\n' >server.ext
        openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
          -out server-cert.pem -days 30 -extfile server.ext 2>/dev/null
        openssl req -newkey rsa:2048 -nodes -keyout client-key.pem -out client.csr \
          -subj '/CN=client' 2>/dev/null
        printf 'extendedKeyUsage=clientAuth\n' >client.ext
        openssl x509 -req -in client.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
          -out client-cert.pem -days 30 -extfile client.ext 2>/dev/null
        chmod 600 server-key.pem client-key.pem
        mkdir -p client wrong
        cp ca-cert.pem client-cert.pem client-key.pem client/
        openssl req -x509 -newkey rsa:2048 -nodes -keyout wrong/ca-key.pem -out wrong/ca-cert.pem \
          -days 30 -subj '/CN=another CA' 2>/dev/null",
    );
    dir.to_owned()
}

fn tls_args(dir: &Path, mode: &str) -> Vec<String> {
    vec![
        "--tls".into(),
        mode.into(),
        "--tls-cert".into(),
        dir.join("server-cert.pem").display().to_string(),
        "--tls-key".into(),
        dir.join("server-key.pem").display().to_string(),
    ]
}

fn start(args: &[String], image: &Path) -> Served {
    let mut all: Vec<&str> = vec!["--listen", "127.0.0.1:0"];
    all.extend(args.iter().map(String::as_str));
    all.push(image.to_str().unwrap());
    Served::start(&all)
}

/// nbdinfo's answer (its exit status and what it printed) for `uri`.
fn nbdinfo(args: &[&str], uri: &str) -> (bool, String) {
    let out = Command::new("nbdinfo")
        .args(args)
        .arg(uri)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

fn image(dir: &Path) -> (PathBuf, Vec<u8>) {
    let data: Vec<u8> = (0..(2u32 << 20)).map(|i| (i % 253) as u8).collect();
    let path = dir.join("disk.raw");
    std::fs::write(&path, &data).unwrap();
    (path, data)
}

/// A server of a 2 MiB pattern image with TLS `mode` (and `extra` options) on TCP,
/// with its certificates and what a client needs.
struct TlsServer {
    dir: tempfile::TempDir,
    certs: PathBuf,
    data: Vec<u8>,
    served: Served,
    /// `HOST:PORT`.
    tcp: String,
}

impl TlsServer {
    /// With `client_ca`, clients need a certificate the test CA signed (`--tls-ca`).
    fn start(mode: &str, client_ca: bool, extra: &[&str]) -> TlsServer {
        let dir = tempfile::tempdir().unwrap();
        let certs = certificates(dir.path());
        let (path, data) = image(dir.path());
        let mut args = tls_args(&certs, mode);
        if client_ca {
            args.push("--tls-ca".into());
            args.push(certs.join("ca-cert.pem").display().to_string());
        }
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let served = start(&args, &path);
        let tcp = served.tcp.clone().unwrap();
        TlsServer {
            dir,
            certs,
            data,
            served,
            tcp,
        }
    }

    /// The `nbds://` URI of the export for a client that trusts the CA (and holds a
    /// client certificate) in `client/` of the certificates, or in `dir`.
    fn uri(&self, dir: Option<&Path>) -> String {
        let client = self.certs.join("client");
        format!(
            "nbds://{}/disk.raw?tls-certificates={}",
            self.tcp,
            dir.unwrap_or(&client).display()
        )
    }
}

#[test]
fn tls_require_serves_inside_tls_and_refuses_everything_in_clear() {
    if !require(&["openssl", "nbdinfo", "nbdcopy"]) {
        return;
    }
    let t = TlsServer::start("require", false, &[]);
    let (tcp, uri) = (&t.tcp, t.uri(None));
    let (ok, said) = nbdinfo(&["--size"], &uri);
    assert!(ok && said.trim() == (2u32 << 20).to_string(), "{said}");
    let copy = t.dir.path().join("copy.raw");
    let out = run(Command::new("nbdcopy").arg(&uri).arg(&copy));
    assert!(out.status.success(), "{out:?}");
    assert!(std::fs::read(&copy).unwrap() == t.data);
    // In clear: refused, and not even the export list is given.
    let (ok, said) = nbdinfo(&["--size"], &format!("nbd://{tcp}/disk.raw"));
    assert!(!ok && said.contains("requires TLS"), "{said}");
    let (ok, said) = nbdinfo(&["--list"], &format!("nbd://{tcp}"));
    assert!(!ok && !said.contains("disk.raw"), "{said}");
    // A client that trusts another CA refuses the server.
    let (ok, said) = nbdinfo(&["--size"], &t.uri(Some(&t.certs.join("wrong"))));
    assert!(!ok && said.contains("certificate"), "{said}");
    // Raw options before STARTTLS get NBD_REP_ERR_TLS_REQD; ABORT is still answered.
    let mut c = Client::tcp(tcp).unwrap();
    c.greeting().unwrap();
    c.send_client_flags(C_FIXED_NEWSTYLE).unwrap();
    c.send_option(opt::LIST, &[]).unwrap();
    assert_eq!(c.read_option_reply().unwrap().reply_type, rep::ERR_TLS_REQD);
    c.send_option(opt::ABORT, &[]).unwrap();
    assert_eq!(c.read_option_reply().unwrap().reply_type, rep::ACK);
    // The server is unharmed.
    let (ok, said) = nbdinfo(&["--size"], &uri);
    assert!(ok, "{said}");
}

#[test]
fn tls_on_serves_clients_in_clear_and_inside_tls_and_qemu_img_reads_it() {
    if !require(&["openssl", "nbdinfo", "qemu-img"]) {
        return;
    }
    let t = TlsServer::start("on", false, &[]);
    let client = t.certs.join("client");
    let (ok, said) = nbdinfo(&["--size"], &format!("nbd://{}/disk.raw", t.tcp));
    assert!(ok, "{said}");
    let (ok, said) = nbdinfo(&["--size"], &t.uri(None));
    assert!(ok, "{said}");
    let (host, port) = t.tcp.rsplit_once(':').unwrap();
    let out = run(Command::new("qemu-img")
        .arg("info")
        .arg("--output=json")
        .arg("--object")
        .arg(format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            client.display()
        ))
        .arg("--image-opts")
        .arg(format!(
            "driver=nbd,host={host},port={port},export=disk.raw,tls-creds=tls0"
        )));
    assert!(out.status.success(), "{out:?}");
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["virtual-size"], 2u64 << 20);
}

#[test]
fn with_tls_ca_a_client_needs_a_certificate_that_ca_signed() {
    if !require(&["openssl", "nbdinfo"]) {
        return;
    }
    let t = TlsServer::start("require", true, &[]);
    let with_cert = t.uri(None);
    assert!(nbdinfo(&["--size"], &with_cert).0);
    // Only the CA: no client certificate to present.
    let bare = t.dir.path().join("bare");
    std::fs::create_dir(&bare).unwrap();
    std::fs::copy(t.certs.join("ca-cert.pem"), bare.join("ca-cert.pem")).unwrap();
    let (ok, said) = nbdinfo(&["--size"], &t.uri(Some(&bare)));
    assert!(!ok, "{said}");
    assert!(nbdinfo(&["--size"], &with_cert).0, "the server is unharmed");
}

#[test]
fn a_client_that_stops_or_talks_garbage_in_the_tls_handshake_loses_only_its_connection() {
    if !require(&["openssl", "nbdinfo"]) {
        return;
    }
    let t = TlsServer::start("require", false, &["--handshake-timeout", "2"]);
    let (tcp, uri) = (&t.tcp, t.uri(None));
    let starttls = |c: &mut Client| {
        c.greeting().unwrap();
        c.send_client_flags(C_FIXED_NEWSTYLE).unwrap();
        c.send_option(opt::STARTTLS, &[]).unwrap();
        assert_eq!(c.read_option_reply().unwrap().reply_type, rep::ACK);
    };
    // One stops after STARTTLS's reply, one sends what is no TLS record.
    let mut silent = Client::tcp(tcp).unwrap();
    starttls(&mut silent);
    let mut garbage = Client::tcp(tcp).unwrap();
    starttls(&mut garbage);
    garbage.write_raw(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    // Meanwhile another client is served.
    assert!(nbdinfo(&["--size"], &uri).0);
    for c in [&mut silent, &mut garbage] {
        c.set_timeout(Duration::from_secs(20)).unwrap();
        // The garbage may get a TLS alert first; then the connection ends.
        let ended = loop {
            match c.read_vec(1) {
                Ok(_) => continue,
                Err(e) => break e.kind(),
            }
        };
        assert!(
            matches!(
                ended,
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
            ),
            "the server closes a connection whose TLS handshake fails: {ended:?}"
        );
    }
    assert!(
        t.served
            .wait_for_log("TLS handshake", Duration::from_secs(20)),
        "{}",
        t.served.log()
    );
    assert!(nbdinfo(&["--size"], &uri).0);
}

/// A psktool file of `user` with a new random key at `dir/name`.
fn psk_file(dir: &Path, name: &str, user: &str) -> PathBuf {
    let path = dir.join(name);
    let out = run(Command::new("psktool")
        .arg("-u")
        .arg(user)
        .arg("-p")
        .arg(&path));
    assert!(out.status.success(), "{out:?}");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// `thinline serve` of `image` on TCP with `--tls require --tls-psk keys`.
fn psk_server(keys: &Path, image: &Path) -> Served {
    let args: Vec<String> = vec![
        "--tls".into(),
        "require".into(),
        "--tls-psk".into(),
        keys.display().to_string(),
    ];
    start(&args, image)
}

#[test]
fn tls_psk_serves_libnbd_and_qemu_the_image_and_refuses_wrong_keys_unknown_users_and_clear_text() {
    if !require(&["psktool", "nbdinfo", "nbdcopy", "qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (path, data) = image(dir.path());
    let qemu_dir = dir.path().join("qemu");
    std::fs::create_dir(&qemu_dir).unwrap();
    // qemu reads DIR/keys.psk: the server's file itself.
    let keys = psk_file(&qemu_dir, "keys.psk", "alice");
    let served = psk_server(&keys, &path);
    let tcp = served.tcp.clone().unwrap();
    let uri = |user: &str, file: &Path| {
        format!(
            "nbds://{user}@{tcp}/disk.raw?tls-psk-file={}",
            file.display()
        )
    };
    // libnbd (GnuTLS) reads every byte inside TLS-PSK.
    let copy = dir.path().join("copy.raw");
    let out = run(Command::new("nbdcopy").arg(uri("alice", &keys)).arg(&copy));
    assert!(out.status.success(), "{out:?}");
    assert!(std::fs::read(&copy).unwrap() == data);
    // So does qemu (GnuTLS too) with a tls-creds-psk object.
    let (host, port) = tcp.rsplit_once(':').unwrap();
    let qcopy = dir.path().join("qemu-copy.raw");
    let out = run(Command::new("qemu-img")
        .arg("convert")
        .arg("-O")
        .arg("raw")
        .arg("--object")
        .arg(format!(
            "tls-creds-psk,id=tls0,dir={},username=alice,endpoint=client",
            qemu_dir.display()
        ))
        .arg("--image-opts")
        .arg(format!(
            "driver=nbd,host={host},port={port},export=disk.raw,tls-creds=tls0"
        ))
        .arg(&qcopy));
    assert!(out.status.success(), "{out:?}");
    assert!(std::fs::read(&qcopy).unwrap() == data);
    // The same user with another key, a user the file does not have, and clear text:
    // each refused.
    let other = psk_file(dir.path(), "other.psk", "alice");
    let (ok, said) = nbdinfo(&["--size"], &uri("alice", &other));
    assert!(!ok && said.contains("TLS"), "{said}");
    let bob = psk_file(dir.path(), "bob.psk", "bob");
    let (ok, said) = nbdinfo(&["--size"], &uri("bob", &bob));
    assert!(!ok && said.contains("TLS"), "{said}");
    let (ok, said) = nbdinfo(&["--size"], &format!("nbd://{tcp}/disk.raw"));
    assert!(!ok && said.contains("requires TLS"), "{said}");
    // The key never reaches the log; the server still serves.
    let key_hex = std::fs::read_to_string(&keys).unwrap();
    let key_hex = key_hex.trim().split_once(':').unwrap().1;
    assert!(!served.log().contains(key_hex), "{}", served.log());
    let (ok, said) = nbdinfo(&["--size"], &uri("alice", &keys));
    assert!(ok && said.trim() == (2u32 << 20).to_string(), "{said}");
}

#[test]
fn tls_psk_on_a_unix_socket_serves_nbds_unix_and_a_psk_file_others_may_read_is_refused() {
    if !require(&["psktool", "nbdcopy"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (path, data) = image(dir.path());
    let keys = psk_file(dir.path(), "keys.psk", "alice");
    let sock = dir.path().join("s.sock");
    let served = Served::start(&[
        "--socket",
        sock.to_str().unwrap(),
        "--tls",
        "require",
        "--tls-psk",
        keys.to_str().unwrap(),
        path.to_str().unwrap(),
    ]);
    let uri = format!(
        "nbds+unix://alice@/disk.raw?socket={}&tls-psk-file={}",
        sock.display(),
        keys.display()
    );
    assert!(
        served.report["exports"][0]["uris"][0]
            .as_str()
            .unwrap()
            .starts_with("nbds+unix://")
    );
    let copy = dir.path().join("copy.raw");
    let out = run(Command::new("nbdcopy").arg(&uri).arg(&copy));
    assert!(out.status.success(), "{out:?}");
    assert!(std::fs::read(&copy).unwrap() == data);
    // A key file its group could write, or others read, is refused at start.
    use std::os::unix::fs::PermissionsExt;
    for mode in [0o604, 0o620] {
        std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(mode)).unwrap();
        let out = Command::new(common::thinline())
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--tls",
                "on",
                "--tls-psk",
            ])
            .arg(&keys)
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("keys.psk") && stderr.contains("chmod 600"),
            "{stderr}"
        );
    }
}

/// `thinline serve` of the template `uri` (a front server, on TCP); `Err` with its
/// log if it exits instead.
fn front(uri: &str) -> Result<Served, String> {
    Served::try_spawn("serve", &["--listen", "127.0.0.1:0", uri], &[])
}

/// Why `thinline serve` of the template `uri` refused to start.
fn refused(uri: &str) -> String {
    front(uri)
        .err()
        .unwrap_or_else(|| panic!("{uri} was served"))
}

#[test]
fn nbds_templates_and_proxy_upstreams_are_read_inside_tls_with_certificates_or_a_psk() {
    if !require(&["openssl", "psktool", "nbdcopy"]) {
        return;
    }
    let t = TlsServer::start("require", true, &[]);
    let client = t.certs.join("client");
    let x509 = format!(
        "nbds://{}/disk.raw?tls-certificates={}",
        t.tcp,
        client.display()
    );
    let keys = psk_file(t.dir.path(), "keys.psk", "alice");
    let psk_served = psk_server(&keys, &t.dir.path().join("disk.raw"));
    let psk = format!(
        "nbds://{}/disk.raw?tls-psk-file={}&tls-username=alice",
        psk_served.tcp.as_ref().unwrap(),
        keys.display()
    );
    let read_all = |tcp: &str, name: &str| {
        let copy = t.dir.path().join(name);
        let out = run(Command::new("nbdcopy")
            .arg(format!("nbd://{tcp}/"))
            .arg(&copy));
        assert!(out.status.success(), "{out:?}");
        std::fs::read(&copy).unwrap() == t.data
    };
    // Templates: with the CA and a client certificate, and with a pre-shared key.
    for (n, uri) in [&x509, &psk].into_iter().enumerate() {
        let served = front(uri).unwrap();
        assert!(
            read_all(served.tcp.as_ref().unwrap(), &format!("t{n}.raw")),
            "{uri}"
        );
    }
    // The copy-on-read proxy's upstream, inside TLS.
    let cache = t.dir.path().join("proxy.cache");
    let proxy = Served::spawn(
        "proxy",
        &[
            "--upstream",
            &x509,
            "--cache",
            cache.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    assert!(read_all(proxy.tcp.as_ref().unwrap(), "proxy.raw"));
    // Refused: a server whose CA the client does not trust, a wrong key, a server
    // that does not offer TLS. Nothing falls back to clear text.
    let wrong = t.certs.join("wrong");
    let e = refused(&x509.replace(client.to_str().unwrap(), wrong.to_str().unwrap()));
    assert!(e.contains("certificate"), "{e}");
    let other = psk_file(t.dir.path(), "other.psk", "alice");
    let e = refused(&psk.replace(keys.to_str().unwrap(), other.to_str().unwrap()));
    assert!(e.contains("refused the key of user \"alice\""), "{e}");
    let plain = Served::start(&[
        "--listen",
        "127.0.0.1:0",
        t.dir.path().join("disk.raw").to_str().unwrap(),
    ]);
    let e = refused(&format!(
        "nbds://{}/disk.raw?tls-certificates={}",
        plain.tcp.as_ref().unwrap(),
        client.display()
    ));
    assert!(e.contains("does not offer TLS"), "{e}");
}

#[test]
fn a_private_key_others_may_read_or_a_missing_certificate_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    if !require(&["openssl"]) {
        return;
    }
    let certs = certificates(dir.path());
    let (path, _) = image(dir.path());
    let key = certs.join("server-key.pem");
    let serve = |args: &[String]| {
        Command::new(common::thinline())
            .arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .args(args)
            .arg(&path)
            .output()
            .unwrap()
    };
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = serve(&tls_args(&certs, "on"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("server-key.pem") && stderr.contains("world-readable"),
        "{stderr}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = serve(&["--tls".into(), "on".into()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-cert"));
}

/// The server's certificate request of [`certificates`] in `dir` signed again by the
/// CA, valid only in January 2020 (`openssl ca`: openssl 3.0's `x509` cannot set a start
/// date): `expired-cert.pem`.
fn expired_certificate(dir: &Path) -> PathBuf {
    let out = run(Command::new("sh")
        .arg("-ec")
        .arg(
            "printf '%s\\n' '[ca]' 'default_ca = test' '[test]' 'database = index.txt' \
              'new_certs_dir = .' 'serial = serial' 'default_md = sha256' 'policy = any' \
              '[any]' 'commonName = supplied' >expired.cnf
            : >index.txt
            echo 01 >serial
            openssl ca -batch -config expired.cnf -cert ca-cert.pem -keyfile ca-key.pem \
              -in server.csr -extfile server.ext -notext -out expired-cert.pem \
              -startdate 20200101000000Z -enddate 20200201000000Z 2>/dev/null
            ! openssl x509 -in expired-cert.pem -noout -checkend 0 >/dev/null",
        )
        .current_dir(dir));
    assert!(out.status.success(), "{out:?}");
    dir.join("expired-cert.pem")
}

// libnbd (GnuTLS) says only "Error in the certificate verification" (qemu-img: "The
// certificate is not trusted"); the raw client's rustls names the reason.
#[test]
fn a_server_whose_certificate_has_expired_is_refused_by_clients_and_stays_up() {
    if !require(&["openssl", "nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let certs = certificates(dir.path());
    let (path, _) = image(dir.path());
    let args = [
        "--tls".to_owned(),
        "require".to_owned(),
        "--tls-cert".to_owned(),
        expired_certificate(&certs).display().to_string(),
        "--tls-key".to_owned(),
        certs.join("server-key.pem").display().to_string(),
    ];
    let mut expired = start(&args, &path);
    let tcp = expired.tcp.clone().unwrap();
    let client = certs.join("client");
    let uri = format!(
        "nbds://{tcp}/disk.raw?tls-certificates={}",
        client.display()
    );
    let (ok, said) = nbdinfo(&["--size"], &uri);
    assert!(!ok, "nbdinfo accepted an expired certificate: {said}");
    assert!(said.contains("certificate verification"), "{said}");
    let mut c = Client::tcp(&tcp).unwrap();
    c.start_in_clear().unwrap();
    let tls = common::wire::TlsClient::new(&certs.join("ca-cert.pem"), "localhost");
    let refused = c
        .starttls(&tls)
        .expect_err("the raw client accepted an expired certificate");
    assert!(
        refused.to_string().contains("certificate expired"),
        "{refused}"
    );
    drop(c);
    // The server stays up and still answers.
    assert!(
        expired.child.try_wait().unwrap().is_none(),
        "the server exited:\n{}",
        expired.log()
    );
    let mut c = Client::tcp(&tcp).unwrap();
    c.start_in_clear().unwrap();
    assert_eq!(
        c.option_final(opt::STARTTLS, &[]).unwrap().reply_type,
        rep::ACK
    );
    // The same client takes a server of the same CA and key whose certificate is
    // valid: only the expiry was refused.
    let valid = start(&tls_args(&certs, "require"), &path);
    let (ok, said) = nbdinfo(
        &["--size"],
        &format!(
            "nbds://{}/disk.raw?tls-certificates={}",
            valid.tcp.as_ref().unwrap(),
            client.display()
        ),
    );
    assert!(ok && said.trim() == (2u32 << 20).to_string(), "{said}");
}

#[test]
fn a_client_that_stops_inside_its_client_hello_loses_only_its_connection() {
    if !require(&["openssl", "nbdinfo"]) {
        return;
    }
    let timeout = Duration::from_secs(5);
    let mut t = TlsServer::start("require", false, &["--handshake-timeout", "5"]);
    let hello =
        common::wire::TlsClient::new(&t.certs.join("ca-cert.pem"), "localhost").client_hello();
    // STARTTLS, its ACK, then the first half of a real ClientHello record.
    let half_a_hello = |c: &mut Client| {
        c.greeting().unwrap();
        c.send_client_flags(C_FIXED_NEWSTYLE).unwrap();
        c.send_option(opt::STARTTLS, &[]).unwrap();
        assert_eq!(c.read_option_reply().unwrap().reply_type, rep::ACK);
        c.write_raw(&hello[..hello.len() / 2]).unwrap();
    };
    let started = std::time::Instant::now();
    // One stalls there, one closes its connection there.
    let mut stalled = Client::tcp(&t.tcp).unwrap();
    half_a_hello(&mut stalled);
    let mut closed = Client::tcp(&t.tcp).unwrap();
    half_a_hello(&mut closed);
    drop(closed);
    // Meanwhile another client is served.
    let (ok, said) = nbdinfo(&["--size"], &t.uri(None));
    let served_at = started.elapsed();
    assert!(ok && said.trim() == (2u32 << 20).to_string(), "{said}");
    // The stalled one is dropped at the handshake timeout, with nothing sent to it.
    let got = stalled
        .wait_closed(timeout * 4)
        .expect("the connection of a client stalled in its ClientHello was kept");
    let closed_at = started.elapsed();
    assert!(got.is_empty(), "sent {got:?} to a half ClientHello");
    assert!(
        closed_at >= timeout && closed_at < timeout * 2,
        "dropped {closed_at:?} after it connected, with a timeout of {timeout:?}"
    );
    assert!(
        served_at < closed_at,
        "the other client was served {served_at:?} after the stalled one connected, \
         not while it stalled"
    );
    t.served.assert_logs("TLS handshake timed out", timeout);
    t.served.assert_logs("TLS handshake failed", timeout);
    assert!(
        t.served.child.try_wait().unwrap().is_none(),
        "the server exited:\n{}",
        t.served.log()
    );
    let (ok, said) = nbdinfo(&["--size"], &t.uri(None));
    assert!(ok, "{said}");
}
