//! Unit tests of the client that need no server: URI parsing.

use super::*;

fn tcp(host: &str, port: u16, export: &str) -> NbdUri {
    NbdUri {
        transport: Transport::Tcp {
            host: host.into(),
            port,
        },
        export: export.into(),
        tls: None,
    }
}

#[test]
fn tcp_uri_with_and_without_port() {
    assert_eq!(
        NbdUri::parse("nbd://example.com/disk").unwrap(),
        tcp("example.com", DEFAULT_PORT, "disk")
    );
    assert_eq!(
        NbdUri::parse("nbd://127.0.0.1:10810/disk").unwrap(),
        tcp("127.0.0.1", 10810, "disk")
    );
}

#[test]
fn ipv6_host_in_brackets() {
    assert_eq!(
        NbdUri::parse("nbd://[::1]:5000/x").unwrap(),
        tcp("::1", 5000, "x")
    );
    assert_eq!(
        NbdUri::parse("nbd://[::1]/x").unwrap(),
        tcp("::1", DEFAULT_PORT, "x")
    );
    assert_eq!(
        NbdUri::parse("nbd://[::1]:5000/x").unwrap().to_string(),
        "nbd://[::1]:5000/x"
    );
    assert!(NbdUri::parse("nbd://[::1/x").is_err());
    assert!(NbdUri::parse("nbd://[nothost]/x").is_err());
    assert!(NbdUri::parse("nbd://::1/x").is_err());
}

#[test]
fn empty_path_is_the_default_export() {
    assert_eq!(
        NbdUri::parse("nbd://h").unwrap(),
        tcp("h", DEFAULT_PORT, "")
    );
    assert_eq!(
        NbdUri::parse("nbd://h/").unwrap(),
        tcp("h", DEFAULT_PORT, "")
    );
}

#[test]
fn export_name_is_percent_decoded_and_reencoded() {
    let u = NbdUri::parse("nbd://h/my%20disk/a%2Fb").unwrap();
    assert_eq!(u.export, "my disk/a/b");
    assert_eq!(u.to_string(), "nbd://h:10809/my%20disk/a/b");
    assert!(NbdUri::parse("nbd://h/bad%zz").is_err());
    assert!(NbdUri::parse("nbd://h/bad%ff").is_err());
}

#[test]
fn unix_uri_needs_a_socket() {
    let u = NbdUri::parse("nbd+unix:///disk?socket=/run/a%20b.sock").unwrap();
    assert_eq!(
        u.transport,
        Transport::Unix {
            socket: "/run/a b.sock".into()
        }
    );
    assert_eq!(u.export, "disk");
    assert_eq!(u.to_string(), "nbd+unix:///disk?socket=/run/a%20b.sock");
    assert!(NbdUri::parse("nbd+unix:///disk").is_err());
    assert!(NbdUri::parse("nbd+unix:///disk?socket=").is_err());
    assert!(NbdUri::parse("nbd+unix://host/disk?socket=/s").is_err());
    assert!(NbdUri::parse("nbd+unix:///disk?socket=%00abstract").is_err());
    assert!(NbdUri::parse("nbd://h/disk?socket=/s").is_err());
}

#[test]
fn tls_schemes_carry_libnbds_tls_parameters() {
    let u = NbdUri::parse("nbds://alice:pw@h/x?tls-psk-file=/k%20s&tls-hostname=n").unwrap();
    let tls = u.tls.clone().unwrap();
    assert_eq!(tls.psk_file.as_deref(), Some(std::path::Path::new("/k s")));
    assert_eq!(tls.username.as_deref(), Some("alice"));
    assert_eq!(tls.hostname.as_deref(), Some("n"));
    assert_eq!(u.to_string(), "nbds://h:10809/x");
    let u = NbdUri::parse("NBDS+UNIX:///x?socket=/s&tls-certificates=/c&tls-username=bob").unwrap();
    let tls = u.tls.clone().unwrap();
    assert_eq!(
        tls.certificates.as_deref(),
        Some(std::path::Path::new("/c"))
    );
    assert_eq!(tls.username.as_deref(), Some("bob"));
    assert_eq!(u.to_string(), "nbds+unix:///x?socket=/s");
    assert_eq!(
        NbdUri::parse("nbds://h/x?tls-verify-peer=true")
            .unwrap()
            .tls,
        Some(TlsParams::default())
    );
    assert_eq!(
        NbdUri::parse("nbd://bob@h/x?tls-psk-file=/k").unwrap().tls,
        None
    );
}

#[test]
fn unverified_or_ambiguous_tls_and_other_transports_are_refused_clearly() {
    let e = NbdUri::parse("nbds://h/x?tls-verify-peer=false")
        .unwrap_err()
        .to_string();
    assert!(e.contains("always verified"), "{e}");
    let e = NbdUri::parse("nbds://h/x?tls-certificates=/c&tls-psk-file=/k")
        .unwrap_err()
        .to_string();
    assert!(e.contains("exclude each other"), "{e}");
    let e = NbdUri::parse("nbd+vsock://1/x").unwrap_err().to_string();
    assert!(e.contains("not supported"), "{e}");
    assert!(NbdUri::parse("http://h/x").is_err());
    assert!(NbdUri::parse("/just/a/path").is_err());
}

#[test]
fn display_hides_user_info_and_unknown_query() {
    let u = NbdUri::parse("nbd://alice:secret@h:99/x?tls-psk-file=/key&foo=bar#frag").unwrap();
    assert_eq!(u.to_string(), "nbd://h:99/x");
    let u = NbdUri::parse("nbd+unix:///x?password=hunter2&socket=/s&tls-certificates=/c").unwrap();
    assert_eq!(u.to_string(), "nbd+unix:///x?socket=/s");
    let e = NbdUri::parse("nbds://alice:secret@h:0/x?token=abc")
        .unwrap_err()
        .to_string();
    assert!(
        !e.contains("secret") && !e.contains("alice") && !e.contains("abc"),
        "{e}"
    );
}

#[test]
fn bad_ports_are_refused() {
    assert!(NbdUri::parse("nbd://h:0/x").is_err());
    assert!(NbdUri::parse("nbd://h:65536/x").is_err());
    assert!(NbdUri::parse("nbd://h:abc/x").is_err());
    assert!(NbdUri::parse("nbd://:10809/x").is_err());
}
