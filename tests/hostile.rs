//! Hostile and malformed clients against a real `thinline serve`, speaking raw NBD with
//! `common::wire`. Each test asserts the spec's answer (doc/proto.md and the extended
//! headers extension) and then that the server is still up and a fresh client can
//! still GO and READ.
//!
//! Most cases hold over TLS too: `in_clear_and_over_tls!(CASE)` makes the tests
//! `CASE::in_clear` and `CASE::over_tls`, which run the same body against a server in
//! clear and against one started with `--tls require`, whose clients (the hostile one
//! and the fresh ones that check the server afterwards) say `NBD_OPT_STARTTLS` after
//! their flags and do the rest inside TLS. The cases that stay in clear say why.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::wire::{
    self, C_FIXED_NEWSTYLE, C_NO_ZEROES, Client, ExportInfo, Mode, Request, TlsClient, cflag,
    chunk, cmd, errno, info, opt, rep, state, tflag,
};
use common::{Fixture, Served, rss_kib};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// Default export size. The fixture has data in [0, 64 KiB), around size/3 and in the
/// last 64 KiB; [1 MiB, 5 MiB) is a hole.
const SIZE: u64 = 16 * MIB;
/// The default maximum payload the spec lets clients assume (and the server advertises).
const MAX_PAYLOAD: u64 = 32 * MIB;
const WAIT: Duration = Duration::from_secs(5);

/// How a test's clients talk to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    /// NBD in clear.
    Clear,
    /// The server requires TLS (`--tls require`, a certificate of a test CA for
    /// localhost); every client says `NBD_OPT_STARTTLS` after its flags and does the
    /// rest inside TLS, trusting that CA.
    Tls,
}

/// Makes the tests of a case that holds in clear and over TLS alike: `CASE::in_clear`
/// and `CASE::over_tls` run `fn CASE(transport: Transport)` with [`Transport::Clear`]
/// and [`Transport::Tls`] (which needs openssl, for the certificates).
macro_rules! in_clear_and_over_tls {
    ($case:ident) => {
        mod $case {
            #[test]
            fn in_clear() {
                super::$case(super::Transport::Clear);
            }

            #[test]
            fn over_tls() {
                if super::common::require(&["openssl"]) {
                    super::$case(super::Transport::Tls);
                }
            }
        }
    };
}

/// A server with its fixture.
struct Env {
    fx: Fixture,
    srv: Served,
    /// What the clients need to enter TLS (`None`: they stay in clear).
    tls: Option<TlsClient>,
}

/// Serves a fixture of `size` bytes with `extra` options, on a unix socket or, with
/// `tcp`, on a loopback port; over TLS, with a certificate made in the fixture's
/// directory.
fn serve_on(transport: Transport, tcp: bool, size: u64, extra: &[&str]) -> Env {
    let fx = Fixture::new(size);
    let dir = fx.dir.path();
    let mut args: Vec<String> = extra.iter().map(|a| (*a).to_owned()).collect();
    let tls = match transport {
        Transport::Clear => None,
        Transport::Tls => {
            common::tls_certificates(dir);
            for arg in ["--tls", "require", "--tls-cert"] {
                args.push(arg.to_owned());
            }
            args.push(dir.join("server-cert.pem").display().to_string());
            args.push("--tls-key".to_owned());
            args.push(dir.join("server-key.pem").display().to_string());
            Some(TlsClient::new(&dir.join("ca-cert.pem"), "localhost"))
        }
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let image = [fx.image.to_str().unwrap()];
    let srv = if tcp {
        Served::tcp(&args, &image)
    } else {
        Served::unix(dir, &args, &image)
    };
    Env { fx, srv, tls }
}

fn serve_sized(transport: Transport, size: u64, extra: &[&str]) -> Env {
    serve_on(transport, false, size, extra)
}

fn serve(transport: Transport, extra: &[&str]) -> Env {
    serve_sized(transport, SIZE, extra)
}

fn serve_tcp(transport: Transport, extra: &[&str]) -> Env {
    serve_on(transport, true, SIZE, extra)
}

impl Env {
    fn sock(&self) -> &Path {
        self.srv
            .socket
            .as_deref()
            .expect("listening on a unix socket")
    }

    /// A connected client that has read nothing yet (and enters TLS in
    /// [`Client::start`] and [`Client::enter_tls`] if the server requires it).
    fn connect(&self) -> Client {
        let c = match (&self.srv.socket, &self.srv.tcp) {
            (Some(s), _) => Client::unix(s).expect("connect to the unix socket"),
            (None, Some(t)) => Client::tcp(t).expect("connect over TCP"),
            _ => unreachable!(),
        };
        match &self.tls {
            Some(tls) => c.with_tls(tls.clone()),
            None => c,
        }
    }

    /// A client past the greeting and client flags (and inside TLS if the server
    /// requires it), ready to send options.
    fn started(&self) -> Client {
        let mut c = self.connect();
        c.start()
            .unwrap_or_else(|e| panic!("greeting or STARTTLS failed: {e}\n{}", self.srv.log()));
        c
    }

    /// A client that asks for export "" (inside TLS if the server requires it): in
    /// transmission, or the refusal of its STARTTLS or GO.
    fn try_go(&self) -> Result<Client, wire::OptReply> {
        let mut c = self.connect();
        c.start_in_clear().expect("greeting");
        c.enter_tls().expect("STARTTLS")?;
        c.go("", &[]).expect("GO")?;
        Ok(c)
    }

    /// A client in transmission on export "" in `mode` with `contexts` selected.
    fn open(&self, mode: Mode, contexts: &[&str]) -> (Client, ExportInfo, wire::Contexts) {
        wire::negotiate(self.connect(), mode, contexts)
            .unwrap_or_else(|e| panic!("negotiation failed: {e}\n{}", self.srv.log()))
    }

    fn file_bytes(&self, offset: u64, len: u64) -> Vec<u8> {
        let f = std::fs::File::open(&self.fx.image).unwrap();
        let mut v = vec![0u8; len as usize];
        f.read_exact_at(&mut v, offset).unwrap();
        v
    }

    fn pid(&self) -> u32 {
        self.srv.pid()
    }

    /// The server is running, and a fresh client can GO and READ the right data
    /// (with simple replies and with structured replies).
    fn assert_healthy(&mut self) {
        if let Some(status) = self.srv.child.try_wait().unwrap() {
            panic!("the server exited ({status}):\n{}", self.srv.log());
        }
        for mode in [Mode::Simple, Mode::Structured] {
            let (mut c, e, _) = self.open(mode, &[]);
            assert_eq!(e.size, self.fx_size(), "export size");
            let r = c.read(0, 64 * KIB).expect("READ on a fresh connection");
            assert_eq!(
                r.read_data(0, 64 * KIB),
                self.file_bytes(0, 64 * KIB),
                "data read by a fresh client"
            );
            c.disconnect().unwrap();
        }
    }

    fn fx_size(&self) -> u64 {
        std::fs::metadata(&self.fx.image).unwrap().len()
    }
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// Polls `f` every 20 ms until it is true or `timeout` passes.
fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pattern(seed: u64, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(31) ^ seed.wrapping_mul(97)) as u8 | 1)
        .collect()
}

fn assert_errno(r: &wire::Reply, want: u32, what: &str) {
    assert_eq!(
        r.errno(),
        want,
        "{what}: expected error {want}, got reply {r:?}"
    );
}

fn assert_option_error(r: &wire::OptReply, want: u32, what: &str) {
    assert_eq!(
        r.reply_type,
        want,
        "{what}: expected option reply {want:#x}, got {:#x} ({:?})",
        r.reply_type,
        r.text()
    );
}

/// After an option was refused, the same session can still GO and READ.
fn assert_session_continues(env: &Env, c: &mut Client) {
    let e = c
        .go("", &[info::BLOCK_SIZE])
        .unwrap()
        .expect("GO after a refused option");
    assert_eq!(e.size, SIZE);
    let r = c.read(0, 4096).unwrap();
    assert_eq!(r.read_data(0, 4096), env.file_bytes(0, 4096));
}

// ---------------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------------

in_clear_and_over_tls!(option_with_wrong_magic_closes_the_connection);
fn option_with_wrong_magic_closes_the_connection(transport: Transport) {
    let mut env = serve(transport, &[]);
    // NBDMAGIC where IHAVEOPT belongs, then garbage.
    for magic in [wire::NBDMAGIC, 0x0123_4567_89ab_cdef] {
        let mut c = env.started();
        c.send_option_header_with_magic(magic, opt::GO, 0).unwrap();
        let got = c
            .wait_closed(WAIT)
            .unwrap_or_else(|| panic!("connection still open after option magic {magic:#x}"));
        assert!(
            got.is_empty(),
            "server answered a bad option magic with {got:?}"
        );
    }
    env.assert_healthy();
}

// In clear only: client flags come before STARTTLS, so over TLS the bytes would be the same.
#[test]
fn unknown_client_flags_close_the_connection() {
    let mut env = serve(Transport::Clear, &[]);
    for flags in [C_FIXED_NEWSTYLE | C_NO_ZEROES | 1 << 2, 1 << 31] {
        let mut c = env.connect();
        let hs = c.greeting().unwrap();
        assert_eq!(
            hs,
            wire::FLAG_FIXED_NEWSTYLE | wire::FLAG_NO_ZEROES,
            "handshake flags"
        );
        c.send_client_flags(flags).unwrap();
        // Whatever the client sends next, the server must have dropped it.
        let _ = c.send_option(opt::GO, &wire::go_data("", &[]));
        let got = c
            .wait_closed(WAIT)
            .unwrap_or_else(|| panic!("connection still open after client flags {flags:#x}"));
        assert!(
            got.is_empty(),
            "server answered after unknown client flags: {got:?}"
        );
    }
    env.assert_healthy();
}

in_clear_and_over_tls!(truncated_handshakes_leave_the_server_unaffected);
fn truncated_handshakes_leave_the_server_unaffected(transport: Transport) {
    let mut env = serve(transport, &[]);
    let baseline = fd_count(env.pid());
    {
        // Connect and leave without reading anything.
        let _c = env.connect();
    }
    {
        // Three of the four client-flag bytes.
        let mut c = env.connect();
        c.greeting().unwrap();
        c.write_raw(&[0, 0, 0]).unwrap();
    }
    {
        // A whole option header announcing data that never comes.
        let mut c = env.started();
        c.send_option_header(opt::GO, 100).unwrap();
    }
    {
        // Inside the option data.
        let mut c = env.started();
        c.send_option_header(opt::GO, 100).unwrap();
        c.write_raw(&[0u8; 10]).unwrap();
    }
    {
        // Inside the option header.
        let mut c = env.started();
        c.write_raw(&wire::IHAVEOPT.to_be_bytes()[..5]).unwrap();
    }
    assert!(
        wait_until(WAIT, || fd_count(env.pid()) <= baseline),
        "the server kept sockets of clients that left mid-handshake: {} fds, {baseline} before",
        fd_count(env.pid())
    );
    env.assert_healthy();
}

in_clear_and_over_tls!(
    go_whose_name_length_exceeds_the_option_is_invalid_and_the_session_continues
);
fn go_whose_name_length_exceeds_the_option_is_invalid_and_the_session_continues(
    transport: Transport,
) {
    let mut env = serve(transport, &[]);
    let mut c = env.started();
    for claimed in [200u32, 7, u32::MAX] {
        let mut data = wire::go_data("", &[info::BLOCK_SIZE]);
        data[..4].copy_from_slice(&claimed.to_be_bytes());
        let r = c.option_final(opt::GO, &data).unwrap();
        assert_option_error(
            &r,
            rep::ERR_INVALID,
            &format!("GO with name length {claimed} in {} bytes", data.len()),
        );
    }
    // Same for an information-request count that runs past the data.
    let mut data = wire::go_data("", &[]);
    let n = data.len();
    data[n - 2..].copy_from_slice(&100u16.to_be_bytes());
    let r = c.option_final(opt::GO, &data).unwrap();
    assert_option_error(
        &r,
        rep::ERR_INVALID,
        "GO with 100 info requests and no room for them",
    );
    assert_session_continues(&env, &mut c);
    env.assert_healthy();
}

in_clear_and_over_tls!(option_with_a_mebibyte_of_data_is_too_big_and_the_session_continues);
fn option_with_a_mebibyte_of_data_is_too_big_and_the_session_continues(transport: Transport) {
    let mut env = serve(transport, &[]);
    let mut c = env.started();
    let data = vec![0x5a; MIB as usize];
    let r = c.option_final(opt::GO, &data).unwrap();
    assert_option_error(&r, rep::ERR_TOO_BIG, "GO with 1 MiB of data");
    let r = c.option_final(0x4242, &data).unwrap();
    assert!(r.is_error(), "unknown option with 1 MiB of data got {r:?}");
    assert_session_continues(&env, &mut c);
    env.assert_healthy();
}

in_clear_and_over_tls!(unknown_option_with_data_is_unsupported_and_the_session_continues);
fn unknown_option_with_data_is_unsupported_and_the_session_continues(transport: Transport) {
    let mut env = serve(transport, &[]);
    let mut c = env.started();
    for option in [4, 12, 0x7fff_ffff, 0xffff_ffff] {
        let r = c
            .option_final(option, b"some data the server does not understand")
            .unwrap();
        assert_option_error(&r, rep::ERR_UNSUP, &format!("unknown option {option}"));
    }
    assert_session_continues(&env, &mut c);
    env.assert_healthy();
}

// In clear only: about a server without TLS (inside TLS, see
// `starttls_inside_tls_is_invalid_and_the_session_continues`).
#[test]
fn starttls_is_refused_by_policy() {
    let mut env = serve(Transport::Clear, &[]);
    let mut c = env.started();
    let r = c.option_final(opt::STARTTLS, &[]).unwrap();
    assert_option_error(&r, rep::ERR_POLICY, "STARTTLS on a server without TLS");
    assert_session_continues(&env, &mut c);
    env.assert_healthy();
}

// Over TLS only: STARTTLS inside TLS.
#[test]
fn starttls_inside_tls_is_invalid_and_the_session_continues() {
    if !common::require(&["openssl"]) {
        return;
    }
    let mut env = serve(Transport::Tls, &[]);
    let mut c = env.started();
    assert!(c.stream.in_tls(), "the client did not enter TLS");
    let r = c.option_final(opt::STARTTLS, &[]).unwrap();
    assert_option_error(&r, rep::ERR_INVALID, "STARTTLS inside TLS");
    assert_session_continues(&env, &mut c);
    env.assert_healthy();
}

// Over TLS only: what a client sends in clear after STARTTLS before its ACK would be
// taken for TLS (a man in the middle's injection, as in CVE-2011-0411). A real
// ClientHello is sent there, so a server that took it would answer with a ServerHello.
#[test]
fn a_client_hello_sent_with_starttls_before_its_ack_closes_the_connection() {
    if !common::require(&["openssl"]) {
        return;
    }
    let mut env = serve(Transport::Tls, &[]);
    let hello = env.tls.as_ref().unwrap().client_hello();
    let mut c = env.connect();
    c.start_in_clear().unwrap();
    let mut bytes = wire::IHAVEOPT.to_be_bytes().to_vec();
    bytes.extend_from_slice(&opt::STARTTLS.to_be_bytes());
    bytes.extend_from_slice(&0u32.to_be_bytes());
    bytes.extend_from_slice(&hello);
    c.write_raw(&bytes).unwrap();
    let r = c.read_option_reply().unwrap();
    assert_eq!(
        (r.option, r.reply_type),
        (opt::STARTTLS, rep::ACK),
        "reply to STARTTLS: {r:?}"
    );
    let got = c
        .wait_closed(WAIT)
        .expect("connection still open after a ClientHello sent before STARTTLS's ACK");
    assert!(
        got.is_empty(),
        "the server answered a ClientHello sent before STARTTLS's ACK with {} bytes",
        got.len()
    );
    env.srv
        .assert_logs("data sent after NBD_OPT_STARTTLS before its reply", WAIT);
    env.assert_healthy();
}

in_clear_and_over_tls!(list_with_data_is_invalid_and_list_without_data_works);
fn list_with_data_is_invalid_and_list_without_data_works(transport: Transport) {
    let mut env = serve(transport, &[]);
    let mut c = env.started();
    let r = c.option_final(opt::LIST, b"xyz").unwrap();
    assert_option_error(&r, rep::ERR_INVALID, "LIST with data");
    let replies = c.option(opt::LIST, &[]).unwrap();
    let (last, servers) = replies.split_last().unwrap();
    assert_eq!(last.reply_type, rep::ACK);
    assert!(
        servers
            .iter()
            .any(|s| s.reply_type == rep::SERVER && s.data[4..] == *b"disk.img"),
        "LIST does not name disk.img: {servers:?}"
    );
    assert_session_continues(&env, &mut c);
    env.assert_healthy();
}

in_clear_and_over_tls!(set_meta_context_before_structured_replies_is_invalid);
fn set_meta_context_before_structured_replies_is_invalid(transport: Transport) {
    let mut env = serve(transport, &[]);
    let mut c = env.started();
    let r = c
        .set_meta_context("", &["base:allocation"])
        .unwrap()
        .expect_err("SET_META_CONTEXT before structured replies succeeded");
    assert_option_error(
        &r,
        rep::ERR_INVALID,
        "SET_META_CONTEXT before structured replies",
    );
    // After negotiating structured replies it works.
    assert_eq!(c.structured_reply().unwrap().reply_type, rep::ACK);
    let ids = c
        .set_meta_context("", &["base:allocation"])
        .unwrap()
        .expect("SET_META_CONTEXT");
    assert_eq!(ids.len(), 1);
    assert_eq!(ids[0].1, "base:allocation");
    assert_session_continues(&env, &mut c);
    env.assert_healthy();
}

in_clear_and_over_tls!(structured_reply_after_extended_headers_is_ext_header_reqd);
fn structured_reply_after_extended_headers_is_ext_header_reqd(transport: Transport) {
    let mut env = serve(transport, &[]);
    let mut c = env.started();
    assert_eq!(c.extended_headers().unwrap().reply_type, rep::ACK);
    let r = c.option_final(opt::STRUCTURED_REPLY, &[]).unwrap();
    assert_option_error(
        &r,
        rep::ERR_EXT_HEADER_REQD,
        "STRUCTURED_REPLY after EXTENDED_HEADERS",
    );
    // Still in extended mode: GO and a read answered with extended chunks.
    c.go("", &[]).unwrap().expect("GO");
    let r = c.read(0, 4096).unwrap();
    assert!(
        r.chunks.iter().all(wire::Chunk::is_extended),
        "not extended replies: {r:?}"
    );
    assert_eq!(r.read_data(0, 4096), env.file_bytes(0, 4096));
    env.assert_healthy();
}

in_clear_and_over_tls!(export_name_of_an_unknown_export_disconnects);
fn export_name_of_an_unknown_export_disconnects(transport: Transport) {
    let mut env = serve(transport, &[]);
    let mut c = env.started();
    c.send_option(opt::EXPORT_NAME, b"no-such-export").unwrap();
    let got = c
        .wait_closed(WAIT)
        .expect("connection still open after EXPORT_NAME of an unknown export");
    assert!(got.is_empty(), "server sent {got:?} for an unknown export");
    env.assert_healthy();
}

in_clear_and_over_tls!(export_name_without_no_zeroes_is_followed_by_124_zero_bytes);
fn export_name_without_no_zeroes_is_followed_by_124_zero_bytes(transport: Transport) {
    let mut env = serve(transport, &[]);
    let mut c = env.connect();
    c.greeting().unwrap();
    c.send_client_flags(C_FIXED_NEWSTYLE).unwrap();
    // Over TLS, the flags sent in clear still hold inside TLS.
    c.enter_tls().unwrap().expect("STARTTLS");
    let (size, flags) = c.export_name("").unwrap();
    assert_eq!(size, SIZE);
    assert_ne!(flags & tflag::HAS_FLAGS, 0);
    assert_eq!(
        c.read_vec(124).unwrap(),
        vec![0u8; 124],
        "padding after EXPORT_NAME"
    );
    let r = c.read(0, 4096).unwrap();
    assert!(r.is_simple(), "simple replies after EXPORT_NAME: {r:?}");
    assert_eq!(r.read_data(0, 4096), env.file_bytes(0, 4096));
    env.assert_healthy();
}

in_clear_and_over_tls!(export_name_with_no_zeroes_has_no_padding);
fn export_name_with_no_zeroes_has_no_padding(transport: Transport) {
    let mut env = serve(transport, &[]);
    let mut c = env.started();
    let (size, _) = c.export_name("disk.img").unwrap();
    assert_eq!(size, SIZE);
    // The very next bytes must be the reply to this READ, not padding.
    let r = c.read(0, 4096).unwrap();
    assert!(r.is_simple(), "{r:?}");
    assert_eq!(r.read_data(0, 4096), env.file_bytes(0, 4096));
    env.assert_healthy();
}

// ---------------------------------------------------------------------------------------
// Transmission: refused requests
// ---------------------------------------------------------------------------------------

in_clear_and_over_tls!(unknown_command_is_einval_and_the_next_request_works);
fn unknown_command_is_einval_and_the_next_request_works(transport: Transport) {
    let mut env = serve(transport, &[]);
    for mode in [Mode::Simple, Mode::Structured] {
        let (mut c, ..) = env.open(mode, &[]);
        for typ in [8u16, 42, 0xffff] {
            let cookie = c.cookie();
            let r = c.request(&Request::new(typ, cookie, 0, 0), &[]).unwrap();
            assert_errno(&r, errno::EINVAL, &format!("command {typ} in {mode:?}"));
        }
        let r = c.read(0, 4096).unwrap();
        assert_eq!(r.read_data(0, 4096), env.file_bytes(0, 4096));
    }
    env.assert_healthy();
}

in_clear_and_over_tls!(unknown_command_flag_is_einval);
fn unknown_command_flag_is_einval(transport: Transport) {
    let mut env = serve(transport, &[]);
    for mode in [Mode::Simple, Mode::Structured] {
        let (mut c, ..) = env.open(mode, &[]);
        for flags in [1u16 << 9, 1 << 15, cflag::REQ_ONE] {
            let cookie = c.cookie();
            let r = c
                .request(&Request::new(cmd::READ, cookie, 0, 4096).flags(flags), &[])
                .unwrap();
            assert_errno(
                &r,
                errno::EINVAL,
                &format!("READ with flags {flags:#x} in {mode:?}"),
            );
            if mode == Mode::Structured {
                // "MUST NOT use a simple reply for NBD_CMD_READ (even for ... bad flags)".
                assert!(
                    !r.is_simple(),
                    "simple reply to a READ under structured replies: {r:?}"
                );
            }
        }
        let r = c.read(0, 4096).unwrap();
        assert_eq!(r.read_data(0, 4096), env.file_bytes(0, 4096));
    }
    env.assert_healthy();
}

in_clear_and_over_tls!(read_out_of_range_is_einval);
fn read_out_of_range_is_einval(transport: Transport) {
    let mut env = serve(transport, &[]);
    let (mut c, ..) = env.open(Mode::Simple, &[]);
    for (offset, len) in [
        (SIZE - 2048, 4096),
        (SIZE, 512),
        (u64::MAX - 511, 1024),
        (1 << 62, 4096),
    ] {
        let r = c.read(offset, len).unwrap();
        assert_errno(&r, errno::EINVAL, &format!("READ of {len} at {offset}"));
    }
    let r = c.read(SIZE - 4096, 4096).unwrap();
    assert_eq!(
        r.read_data(SIZE - 4096, 4096),
        env.file_bytes(SIZE - 4096, 4096)
    );
    env.assert_healthy();
}

in_clear_and_over_tls!(write_past_the_end_is_enospc_and_its_payload_is_skipped);
fn write_past_the_end_is_enospc_and_its_payload_is_skipped(transport: Transport) {
    let mut env = serve(transport, &[]);
    let tail_before = env.file_bytes(SIZE - 64 * KIB, 64 * KIB);
    let (mut c, ..) = env.open(Mode::Simple, &[]);
    for offset in [SIZE - 2048, SIZE, SIZE + MIB] {
        // A payload that parses as request headers if the server does not skip it.
        let payload: Vec<u8> = Request::new(cmd::READ, 999, 0, 4096)
            .compact()
            .repeat(4096 / 28 + 1)[..4096]
            .to_vec();
        let r = c.write(offset, &payload).unwrap();
        assert_errno(&r, errno::ENOSPC, &format!("WRITE of 4096 at {offset}"));
    }
    let r = c.read(SIZE - 4096, 4096).unwrap();
    assert_eq!(
        r.read_data(SIZE - 4096, 4096),
        env.file_bytes(SIZE - 4096, 4096)
    );
    assert_eq!(
        env.file_bytes(SIZE - 64 * KIB, 64 * KIB),
        tail_before,
        "a refused write changed the image"
    );
    assert_eq!(env.fx_size(), SIZE, "a refused write grew the image");
    env.assert_healthy();
}

in_clear_and_over_tls!(write_on_a_read_only_export_is_eperm);
fn write_on_a_read_only_export_is_eperm(transport: Transport) {
    let mut env = serve(transport, &["-r"]);
    let before = env.file_bytes(0, 64 * KIB);
    let (mut c, e, _) = env.open(Mode::Simple, &[]);
    assert_ne!(
        e.flags & tflag::READ_ONLY,
        0,
        "READ_ONLY not advertised with -r"
    );
    let r = c.write(0, &pattern(1, 4096)).unwrap();
    assert_errno(&r, errno::EPERM, "WRITE on a read-only export");
    for typ in [cmd::TRIM, cmd::WRITE_ZEROES] {
        let cookie = c.cookie();
        let r = c.request(&Request::new(typ, cookie, 0, 4096), &[]).unwrap();
        assert!(
            r.errno() == errno::EPERM || r.errno() == errno::EINVAL,
            "command {typ} on a read-only export: {r:?}"
        );
    }
    // The payload was skipped: this READ is answered in sync.
    let r = c.read(0, 4096).unwrap();
    assert_eq!(r.read_data(0, 4096), before[..4096]);
    assert_eq!(
        env.file_bytes(0, 64 * KIB),
        before,
        "the read-only image changed"
    );
    env.assert_healthy();
}

in_clear_and_over_tls!(misaligned_read_with_min_block_size_4096_is_einval);
fn misaligned_read_with_min_block_size_4096_is_einval(transport: Transport) {
    let mut env = serve(transport, &["--min-block-size", "4096"]);
    let (mut c, e, _) = env.open(Mode::Simple, &[]);
    let (min, preferred, max) = e
        .block_size
        .expect("NBD_INFO_BLOCK_SIZE requested but not sent");
    assert_eq!(min, 4096, "advertised minimum block size");
    assert!(preferred >= min && max >= preferred);
    for (offset, len) in [(512, 4096), (0, 1000), (4096, 4097), (1, 1)] {
        let r = c.read(offset, len).unwrap();
        assert_errno(
            &r,
            errno::EINVAL,
            &format!("READ of {len} at {offset} with 4 KiB blocks"),
        );
    }
    let r = c.read(4096, 8192).unwrap();
    assert_eq!(r.read_data(4096, 8192), env.file_bytes(4096, 8192));
    env.assert_healthy();
}

in_clear_and_over_tls!(read_above_the_max_payload_is_einval_without_allocating_it);
fn read_above_the_max_payload_is_einval_without_allocating_it(transport: Transport) {
    // 8 GiB (sparse) so that even a 4 GiB read is inside the export and only the
    // payload limit can refuse it.
    let mut env = serve_sized(transport, 8 << 30, &[]);
    let (mut c, e, _) = env.open(Mode::Simple, &[]);
    let max = u64::from(e.block_size.expect("block sizes").2);
    assert_eq!(max, MAX_PAYLOAD, "advertised maximum payload");
    let before = rss_kib(env.pid());
    for len in [max + 1, 64 * MIB, u64::from(u32::MAX)] {
        let r = c.read(0, len).unwrap();
        assert_errno(&r, errno::EINVAL, &format!("READ of {len} bytes"));
    }
    let (mut s, ..) = env.open(Mode::Structured, &[]);
    let r = s.read(0, u64::from(u32::MAX)).unwrap();
    assert_errno(&r, errno::EINVAL, "structured READ of 4 GiB - 1");
    assert!(
        !r.is_simple(),
        "simple reply to a READ under structured replies"
    );
    let after = rss_kib(env.pid());
    eprintln!("server RSS around oversized reads: {before} KiB -> {after} KiB");
    assert!(
        after < before + 16 * 1024 && after < 128 * 1024,
        "server RSS went from {before} KiB to {after} KiB"
    );
    // A read of exactly the maximum works.
    let r = c.read(0, max).unwrap();
    assert_eq!(
        r.read_data(0, max)[..64 * KIB as usize],
        env.file_bytes(0, 64 * KIB)[..]
    );
    env.assert_healthy();
}

in_clear_and_over_tls!(write_header_announcing_100_mib_closes_the_connection);
fn write_header_announcing_100_mib_closes_the_connection(transport: Transport) {
    let mut env = serve(transport, &[]);
    let before = env.file_bytes(0, 64 * KIB);
    let (mut c, ..) = env.open(Mode::Simple, &[]);
    let cookie = c.cookie();
    c.send(
        &Request::new(cmd::WRITE, cookie, 0, 100 * MIB),
        &[0xee; 4096],
    )
    .unwrap();
    assert!(
        c.wait_closed(WAIT).is_some(),
        "connection still open after a 100 MiB write header"
    );
    assert_eq!(env.file_bytes(0, 64 * KIB), before, "the image changed");
    env.assert_healthy();
}

in_clear_and_over_tls!(extended_write_announcing_2_pow_40_bytes_closes_the_connection);
fn extended_write_announcing_2_pow_40_bytes_closes_the_connection(transport: Transport) {
    let mut env = serve(transport, &[]);
    let (mut c, ..) = env.open(Mode::Extended, &[]);
    let cookie = c.cookie();
    c.send(
        &Request::new(cmd::WRITE, cookie, 0, 1 << 40).flags(cflag::PAYLOAD_LEN),
        &[0xee; 4096],
    )
    .unwrap();
    assert!(
        c.wait_closed(WAIT).is_some(),
        "connection still open after a 2^40-byte payload header"
    );
    env.assert_healthy();
}

in_clear_and_over_tls!(extended_unknown_command_with_payload_is_einval_and_the_payload_is_consumed);
fn extended_unknown_command_with_payload_is_einval_and_the_payload_is_consumed(
    transport: Transport,
) {
    let mut env = serve(transport, &[]);
    let (mut c, ..) = env.open(Mode::Extended, &[]);
    let payload = Request::new(cmd::READ, 5, 0, 4096).extended().repeat(4);
    for (typ, what) in [
        (42u16, "unknown command"),
        (cmd::FLUSH, "FLUSH"),
        (cmd::READ, "READ"),
    ] {
        let cookie = c.cookie();
        let r = c
            .request(
                &Request::new(typ, cookie, 0, payload.len() as u64).flags(cflag::PAYLOAD_LEN),
                &payload,
            )
            .unwrap();
        assert_errno(&r, errno::EINVAL, &format!("{what} with PAYLOAD_LEN"));
    }
    let r = c.read(0, 4096).unwrap();
    assert_eq!(r.read_data(0, 4096), env.file_bytes(0, 4096));
    env.assert_healthy();
}

in_clear_and_over_tls!(client_leaving_inside_a_write_payload_leaves_the_image_unchanged);
fn client_leaving_inside_a_write_payload_leaves_the_image_unchanged(transport: Transport) {
    let mut env = serve(transport, &[]);
    let offset = 2 * MIB;
    let before = env.file_bytes(offset, MIB);
    let baseline = fd_count(env.pid());
    {
        let (mut c, ..) = env.open(Mode::Simple, &[]);
        let cookie = c.cookie();
        c.send(
            &Request::new(cmd::WRITE, cookie, offset, MIB),
            &vec![0xab; (MIB / 2) as usize],
        )
        .unwrap();
    }
    assert!(
        wait_until(WAIT, || fd_count(env.pid()) <= baseline),
        "the server did not drop a client that left inside a write payload"
    );
    assert_eq!(
        env.file_bytes(offset, MIB),
        before,
        "part of an unfinished write landed"
    );
    env.assert_healthy();
}

// ---------------------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------------------

fn assert_done_only_on_last(r: &wire::Reply) {
    let (last, rest) = r.chunks.split_last().unwrap();
    assert!(last.is_done(), "last chunk lacks DONE: {r:?}");
    assert!(
        rest.iter().all(|c| !c.is_done()),
        "DONE before the last chunk: {r:?}"
    );
    assert!(r.chunks.iter().all(|c| c.cookie == r.cookie));
}

in_clear_and_over_tls!(
    structured_read_of_a_sparse_region_gives_offset_hole_and_done_on_the_last_chunk
);
fn structured_read_of_a_sparse_region_gives_offset_hole_and_done_on_the_last_chunk(
    transport: Transport,
) {
    let mut env = serve(transport, &[]);
    let (mut c, e, _) = env.open(Mode::Structured, &[]);
    assert_ne!(
        e.flags & tflag::SEND_DF,
        0,
        "SEND_DF with structured replies"
    );

    let r = c.read(MIB, MIB).unwrap();
    assert!(
        r.chunks
            .iter()
            .all(|c| c.magic == wire::STRUCTURED_REPLY_MAGIC),
        "{r:?}"
    );
    assert!(
        r.chunks.iter().any(|c| c.typ == chunk::OFFSET_HOLE),
        "no OFFSET_HOLE for a hole: {r:?}"
    );
    assert!(
        r.chunks.iter().all(|c| c.typ != chunk::OFFSET_DATA),
        "data chunks for a hole: {r:?}"
    );
    assert_done_only_on_last(&r);
    assert_eq!(r.read_data(MIB, MIB), vec![0u8; MIB as usize]);

    // Hole then data: both chunk kinds, DONE only at the end, the right bytes.
    let start = env.fx.data_ranges()[1].0 - 64 * KIB;
    let r = c.read(start, 128 * KIB).unwrap();
    assert!(
        r.chunks.iter().any(|c| c.typ == chunk::OFFSET_DATA),
        "{r:?}"
    );
    assert!(
        r.chunks.iter().any(|c| c.typ == chunk::OFFSET_HOLE),
        "{r:?}"
    );
    assert_done_only_on_last(&r);
    assert_eq!(
        r.read_data(start, 128 * KIB),
        env.file_bytes(start, 128 * KIB)
    );
    env.assert_healthy();
}

in_clear_and_over_tls!(df_read_gives_exactly_one_content_chunk);
fn df_read_gives_exactly_one_content_chunk(transport: Transport) {
    let mut env = serve(transport, &[]);
    let (mut c, ..) = env.open(Mode::Structured, &[]);
    // Data and hole, pure hole, pure data.
    for (offset, len) in [
        (0, 128 * KIB),
        (MIB, 64 * KIB),
        (0, 64 * KIB),
        (32 * KIB, 64 * KIB),
    ] {
        let cookie = c.cookie();
        let r = c
            .request(
                &Request::new(cmd::READ, cookie, offset, len).flags(cflag::DF),
                &[],
            )
            .unwrap();
        let content = r.content_chunks();
        assert_eq!(content.len(), 1, "DF read of {len} at {offset}: {r:?}");
        let mixed = offset < 64 * KIB && offset + len > 64 * KIB;
        if mixed {
            assert_eq!(
                content[0].typ,
                chunk::OFFSET_DATA,
                "data and hole under DF must be one OFFSET_DATA"
            );
        }
        assert_done_only_on_last(&r);
        assert_eq!(r.read_data(offset, len), env.file_bytes(offset, len));
    }
    env.assert_healthy();
}

in_clear_and_over_tls!(block_status_with_req_one_gives_one_extent_within_the_request);
fn block_status_with_req_one_gives_one_extent_within_the_request(transport: Transport) {
    let mut env = serve(transport, &[]);
    let (mut c, _, ids) = env.open(Mode::Structured, &["base:allocation"]);
    assert_eq!(ids.len(), 1, "{ids:?}");
    let id = ids[0].0;
    for (offset, len, hole) in [
        (0, MIB, false),
        (0, 4096, false),
        (MIB, 64 * KIB, true),
        (MIB, 4 * MIB, true),
    ] {
        let cookie = c.cookie();
        let r = c
            .request(
                &Request::new(cmd::BLOCK_STATUS, cookie, offset, len).flags(cflag::REQ_ONE),
                &[],
            )
            .unwrap();
        assert_eq!(r.errno(), 0, "{r:?}");
        assert_eq!(r.chunks.len(), 1, "one status chunk per context: {r:?}");
        let ch = &r.chunks[0];
        assert_eq!(ch.typ, chunk::BLOCK_STATUS, "compact headers use type 5");
        assert!(ch.is_done());
        let bs = ch.block_status();
        assert_eq!(bs.context, id);
        assert_eq!(bs.extents.len(), 1, "REQ_ONE at {offset}+{len}: {bs:?}");
        let (elen, flags) = bs.extents[0];
        assert!(
            elen > 0 && elen <= len,
            "extent of {elen} for a request of {len}"
        );
        assert_eq!(
            flags & state::HOLE != 0,
            hole,
            "hole flag at {offset}: {bs:?}"
        );
    }
    // Without REQ_ONE, the first N-1 extents stay below the requested length.
    let cookie = c.cookie();
    let r = c
        .request(&Request::new(cmd::BLOCK_STATUS, cookie, 0, 2 * MIB), &[])
        .unwrap();
    let bs = r.chunks[0].block_status();
    let (_, head) = bs.extents.split_last().unwrap();
    assert!(head.iter().map(|e| e.0).sum::<u64>() < 2 * MIB, "{bs:?}");
    assert!(bs.extents.iter().all(|e| e.0 > 0));
    env.assert_healthy();
}

in_clear_and_over_tls!(extended_headers_every_reply_is_extended_and_echoes_the_request_offset);
fn extended_headers_every_reply_is_extended_and_echoes_the_request_offset(transport: Transport) {
    let mut env = serve(transport, &[]);
    let (mut c, e, ids) = env.open(Mode::Extended, &["base:allocation"]);
    assert_eq!(ids.len(), 1);
    let id = ids[0].0;
    let check = |r: &wire::Reply, offset: u64, what: &str| {
        assert!(!r.chunks.is_empty());
        for ch in &r.chunks {
            assert!(ch.is_extended(), "{what}: not an extended reply: {ch:?}");
            assert_eq!(
                ch.offset,
                Some(offset),
                "{what}: offset field does not echo the request: {ch:?}"
            );
        }
        assert_done_only_on_last(r);
    };

    // Success without payload: one NONE chunk with DONE.
    let w = 2 * MIB + 4096;
    let r = c.write(w, &pattern(7, 8192)).unwrap();
    check(&r, w, "WRITE");
    assert_eq!(r.chunks.len(), 1);
    assert_eq!(r.chunks[0].typ, chunk::NONE, "WRITE success");
    assert!(r.chunks[0].payload.is_empty());
    let r = c.flush().unwrap();
    check(&r, 0, "FLUSH");
    assert_eq!((r.chunks.len(), r.chunks[0].typ), (1, chunk::NONE));
    if e.flags & tflag::SEND_WRITE_ZEROES != 0 {
        let cookie = c.cookie();
        let z = 3 * MIB;
        let r = c
            .request(&Request::new(cmd::WRITE_ZEROES, cookie, z, 8192), &[])
            .unwrap();
        check(&r, z, "WRITE_ZEROES");
        assert_eq!((r.chunks.len(), r.chunks[0].typ), (1, chunk::NONE));
    }

    // A read across hole and data: content chunks with the request offset in the header.
    let ro = 2 * MIB - 64 * KIB;
    let r = c.read(ro, 128 * KIB).unwrap();
    check(&r, ro, "READ");
    assert_eq!(r.read_data(ro, 128 * KIB), env.file_bytes(ro, 128 * KIB));

    // Block status answers with BLOCK_STATUS_EXT.
    let bo = MIB;
    let cookie = c.cookie();
    let r = c
        .request(&Request::new(cmd::BLOCK_STATUS, cookie, bo, 4 * MIB), &[])
        .unwrap();
    check(&r, bo, "BLOCK_STATUS");
    assert_eq!(r.chunks.len(), 1);
    assert_eq!(
        r.chunks[0].typ,
        chunk::BLOCK_STATUS_EXT,
        "extended headers must use type 6"
    );
    let bs = r.chunks[0].block_status();
    assert_eq!(bs.context, id);
    assert!(bs.extents.iter().all(|e| e.0 > 0));

    // Errors too: out of range, unknown command.
    let r = c.read(SIZE, 4096).unwrap();
    check(&r, SIZE, "READ out of range");
    assert_errno(&r, errno::EINVAL, "READ out of range");
    let cookie = c.cookie();
    let r = c.request(&Request::new(42, cookie, 12345, 0), &[]).unwrap();
    check(&r, 12345, "unknown command");
    assert_errno(&r, errno::EINVAL, "unknown command");
    // 64-bit effect lengths: refused with an error, never a disconnect.
    for (typ, len) in [
        (cmd::READ, 1u64 << 33),
        (cmd::BLOCK_STATUS, 1 << 63),
        (cmd::TRIM, 1 << 40),
        (cmd::WRITE_ZEROES, u64::MAX),
    ] {
        let cookie = c.cookie();
        let r = c
            .request(&Request::new(typ, cookie, 4096, len), &[])
            .unwrap();
        check(&r, 4096, "64-bit effect length");
        assert_ne!(
            r.errno(),
            0,
            "command {typ} with effect length {len}: {r:?}"
        );
    }
    let r = c.read(0, 4096).unwrap();
    assert_eq!(r.read_data(0, 4096), env.file_bytes(0, 4096));
    env.assert_healthy();
}

in_clear_and_over_tls!(block_status_payload_form_selects_contexts_and_rejects_unknown_ids);
fn block_status_payload_form_selects_contexts_and_rejects_unknown_ids(transport: Transport) {
    let mut env = serve(transport, &[]);
    // Not advertised without contexts ("SHOULD NOT ... if the client does not negotiate metacontexts").
    let (_, e, _) = env.open(Mode::Extended, &[]);
    assert_eq!(
        e.flags & tflag::BLOCK_STATUS_PAYLOAD,
        0,
        "BLOCK_STATUS_PAYLOAD without contexts"
    );

    let (mut c, e, ids) = env.open(Mode::Extended, &["base:allocation"]);
    assert_ne!(
        e.flags & tflag::BLOCK_STATUS_PAYLOAD,
        0,
        "BLOCK_STATUS_PAYLOAD with a context"
    );
    let id = ids[0].0;
    let payload = |effect: u64, ids: &[u32]| {
        let mut p = effect.to_be_bytes().to_vec();
        for i in ids {
            p.extend_from_slice(&i.to_be_bytes());
        }
        p
    };
    let offset = MIB;
    let p = payload(64 * KIB, &[id]);
    let cookie = c.cookie();
    let req =
        Request::new(cmd::BLOCK_STATUS, cookie, offset, p.len() as u64).flags(cflag::PAYLOAD_LEN);
    let r = c.request(&req, &p).unwrap();
    assert_eq!(r.errno(), 0, "{r:?}");
    assert_eq!(r.chunks.len(), 1);
    let ch = &r.chunks[0];
    assert_eq!(
        (ch.typ, ch.offset, ch.is_done()),
        (chunk::BLOCK_STATUS_EXT, Some(offset), true)
    );
    let bs = ch.block_status();
    assert_eq!(bs.context, id);
    let (_, head) = bs.extents.split_last().unwrap();
    assert!(
        head.iter().map(|e| e.0).sum::<u64>() < 64 * KIB,
        "extents beyond the effect length: {bs:?}"
    );
    assert!(
        bs.extents[0].1 & state::HOLE != 0,
        "[1 MiB, +64 KiB) is a hole: {bs:?}"
    );

    // Unknown or duplicated ids: EINVAL, with the payload consumed.
    for ids in [&[id + 77][..], &[id, id], &[0xffff_ffff], &[]] {
        let p = payload(64 * KIB, ids);
        let cookie = c.cookie();
        let req = Request::new(cmd::BLOCK_STATUS, cookie, offset, p.len() as u64)
            .flags(cflag::PAYLOAD_LEN);
        let r = c.request(&req, &p).unwrap();
        assert_errno(
            &r,
            errno::EINVAL,
            &format!("BLOCK_STATUS payload naming {ids:?}"),
        );
        assert!(r.chunks.iter().all(|ch| ch.offset == Some(offset)));
    }
    let r = c.read(0, 4096).unwrap();
    assert_eq!(r.read_data(0, 4096), env.file_bytes(0, 4096));
    env.assert_healthy();
}

in_clear_and_over_tls!(sixty_four_pipelined_requests_are_all_answered_with_matching_cookies);
fn sixty_four_pipelined_requests_are_all_answered_with_matching_cookies(transport: Transport) {
    let mut env = serve(transport, &[]);
    for (m, mode) in [Mode::Simple, Mode::Structured, Mode::Extended]
        .into_iter()
        .enumerate()
    {
        let (mut c, ..) = env.open(mode, &[]);
        let write_base = 4 * MIB + m as u64 * MIB;
        let mut buf = Vec::new();
        // cookie -> Some(read offset) for reads, None for writes.
        let mut expect: HashMap<u64, Option<u64>> = HashMap::new();
        for i in 0..64u64 {
            let cookie = (i << 40) | 0xc0_ffee;
            if i % 2 == 0 {
                let flags = if mode == Mode::Extended {
                    cflag::PAYLOAD_LEN
                } else {
                    0
                };
                let req =
                    Request::new(cmd::WRITE, cookie, write_base + i * 4096, 4096).flags(flags);
                c.encode(&req, &pattern(i, 4096), &mut buf);
                expect.insert(cookie, None);
            } else {
                c.encode(
                    &Request::new(cmd::READ, cookie, i * 4096, 4096),
                    &[],
                    &mut buf,
                );
                expect.insert(cookie, Some(i * 4096));
            }
        }
        c.write_raw(&buf).unwrap();
        for _ in 0..64 {
            let r = c.read_reply().unwrap();
            let read_at = expect
                .remove(&r.cookie)
                .unwrap_or_else(|| panic!("unexpected or repeated cookie {:#x}", r.cookie));
            assert_eq!(r.errno(), 0, "{mode:?} cookie {:#x}: {r:?}", r.cookie);
            if let Some(at) = read_at {
                assert_eq!(
                    r.read_data(at, 4096),
                    env.file_bytes(at, 4096),
                    "{mode:?} read at {at}"
                );
            }
        }
        assert!(expect.is_empty());
        assert_eq!(c.flush().unwrap().errno(), 0);
        for i in (0..64u64).step_by(2) {
            assert_eq!(
                env.file_bytes(write_base + i * 4096, 4096),
                pattern(i, 4096),
                "{mode:?} write {i}"
            );
        }
    }
    env.assert_healthy();
}

// ---------------------------------------------------------------------------------------
// Resource limits and timeouts
// ---------------------------------------------------------------------------------------

// In clear only: idle connections never get as far as STARTTLS, and a thousand TLS
// handshakes would measure the machine rather than the server (a client that stops in
// its TLS handshake is in tests/tls.rs).
#[test]
fn a_thousand_idle_connections_are_bounded_and_dropped_by_the_handshake_timeout() {
    let mut env = serve(Transport::Clear, &["--handshake-timeout", "2"]);
    let start = Instant::now();
    let mut idle = Vec::with_capacity(1000);
    for i in 0..1000 {
        let mut c = Client::unix(env.sock()).expect("connect");
        if i % 2 == 1 {
            c.greeting().expect("greeting");
        }
        idle.push(c);
    }
    // A normal client still works meanwhile, and keeps working past the timeout.
    let (mut c, ..) = env.open(Mode::Structured, &[]);
    let r = c.read(0, 64 * KIB).unwrap();
    assert_eq!(r.read_data(0, 64 * KIB), env.file_bytes(0, 64 * KIB));
    let rss = rss_kib(env.pid());
    eprintln!("server RSS with 1000 idle connections: {rss} KiB");
    assert!(
        rss < 200 * 1024,
        "server RSS with 1000 idle connections: {rss} KiB"
    );

    let deadline = start + Duration::from_secs(8);
    for (i, conn) in idle.iter_mut().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        let got = conn.wait_closed(left);
        assert!(
            got.is_some(),
            "idle connection {i} still open {:?} after it was opened",
            start.elapsed()
        );
        if i == 0 {
            assert!(
                start.elapsed() >= Duration::from_millis(1500),
                "dropped before the handshake timeout: {:?}",
                start.elapsed()
            );
        }
    }
    let r = c
        .read(0, 4096)
        .expect("a connection in transmission must outlive the handshake timeout");
    assert_eq!(r.read_data(0, 4096), env.file_bytes(0, 4096));
    let rss = rss_kib(env.pid());
    assert!(
        rss < 200 * 1024,
        "server RSS after the idle connections: {rss} KiB"
    );
    env.assert_healthy();
}

in_clear_and_over_tls!(handshake_trickled_one_byte_per_second_is_dropped_at_the_timeout);
fn handshake_trickled_one_byte_per_second_is_dropped_at_the_timeout(transport: Transport) {
    // The timeout counts from the connection, over the whole handshake: the client flags
    // trickled in (2.4 s of the 3), over TLS STARTTLS and the TLS handshake, then an
    // option header one byte per second. Dropped 3 s after it connected, not 3 s after
    // some later step of the handshake.
    let mut env = serve(transport, &["--handshake-timeout", "3"]);
    let mut c = env.connect();
    let start = Instant::now();
    c.greeting().unwrap();
    let flags = (C_FIXED_NEWSTYLE | C_NO_ZEROES).to_be_bytes();
    assert!(
        !trickle(&mut c, &flags, Duration::from_millis(600)),
        "dropped {:?} after it connected, with a timeout of 3 s",
        start.elapsed()
    );
    c.enter_tls().unwrap().expect("STARTTLS");
    let mut header = wire::IHAVEOPT.to_be_bytes().to_vec();
    header.extend_from_slice(&opt::GO.to_be_bytes());
    header.extend_from_slice(&0u32.to_be_bytes());
    assert!(
        trickle(&mut c, &header, Duration::from_secs(1)),
        "a one-byte-per-second option header was kept for 16 s"
    );
    let at = start.elapsed();
    assert!(
        at >= Duration::from_millis(2500) && at < Duration::from_millis(4500),
        "dropped {at:?} after it connected, with a timeout of 3 s"
    );
    env.assert_healthy();
}

/// Sends `bytes` one at a time, `every` apart; true once the server has closed the
/// connection (then the rest is not sent).
fn trickle(c: &mut Client, bytes: &[u8], every: Duration) -> bool {
    bytes
        .iter()
        .any(|b| c.write_raw(&[*b]).is_err() || c.wait_closed(every).is_some())
}

in_clear_and_over_tls!(max_connections_refuses_a_third_client_politely);
fn max_connections_refuses_a_third_client_politely(transport: Transport) {
    let env = serve(transport, &["--max-connections", "2"]);
    let (mut a, ..) = env.open(Mode::Simple, &[]);
    let (mut b, ..) = env.open(Mode::Simple, &[]);
    // Whatever it asks, STARTTLS included (the refusal comes before any TLS).
    let mut third = env.connect();
    third.start_in_clear().unwrap();
    for (option, data) in [
        (opt::STARTTLS, Vec::new()),
        (opt::GO, wire::go_data("", &[])),
        (opt::LIST, Vec::new()),
    ] {
        let r = third.option_final(option, &data).unwrap();
        assert_option_error(
            &r,
            rep::ERR_POLICY,
            &format!("option {option} from a client over --max-connections"),
        );
        assert!(!r.text().is_empty(), "ERR_POLICY without a message");
    }
    let r = third.option_final(opt::ABORT, &[]).unwrap();
    assert_eq!(r.reply_type, rep::ACK, "ABORT must be ACKed");
    drop(third);

    for c in [&mut a, &mut b] {
        let r = c.read(0, 4096).unwrap();
        assert_eq!(r.read_data(0, 4096), env.file_bytes(0, 4096));
    }
    a.disconnect().unwrap();
    drop(a);
    let mut accepted = None;
    // The slot is free once the server has ended the first connection: until then a
    // client is refused (STARTTLS or GO, as above).
    let ok = wait_until(WAIT, || match env.try_go() {
        Ok(d) => {
            accepted = Some(d);
            true
        }
        Err(r) => {
            assert_option_error(&r, rep::ERR_POLICY, "while the first client leaves");
            false
        }
    });
    assert!(ok, "no client accepted after one of two left");
    let mut d = accepted.unwrap();
    for c in [&mut b, &mut d] {
        let r = c.read(0, 4096).unwrap();
        assert_eq!(r.read_data(0, 4096), env.file_bytes(0, 4096));
    }
}

// ---------------------------------------------------------------------------------------
// Shutdown and socket paths
// ---------------------------------------------------------------------------------------

in_clear_and_over_tls!(sigterm_answers_eshutdown_exits_zero_and_removes_the_socket);
fn sigterm_answers_eshutdown_exits_zero_and_removes_the_socket(transport: Transport) {
    // Regression: a connection idle when SIGTERM arrives must answer its next request
    // with ESHUTDOWN (the shutdown state is read after the header arrives).
    let mut env = serve(transport, &[]);
    let sock = env.sock().to_owned();
    let (mut c, ..) = env.open(Mode::Simple, &[]);
    assert_eq!(c.read(0, 4096).unwrap().errno(), 0);
    common::signal(&env.srv.child, libc::SIGTERM);
    // The listener closes when shutdown starts.
    assert!(
        wait_until(WAIT, || std::os::unix::net::UnixStream::connect(&sock)
            .is_err()),
        "still accepting connections after SIGTERM"
    );
    let mut problems = Vec::new();
    let first = c
        .read(0, 4096)
        .expect("the connection is kept during the grace period");
    if first.errno() != errno::ESHUTDOWN {
        let second = c.read(0, 4096).map(|r| r.errno());
        problems.push(format!(
            "first request after SIGTERM got error {} instead of ESHUTDOWN ({first:?}); \
             the second request got {second:?}",
            first.errno()
        ));
    }
    if c.wait_closed(WAIT).is_none() {
        problems.push("the connection was not closed after the grace period".into());
    }
    match common::wait_timeout(&mut env.srv.child, WAIT) {
        None => problems.push(format!("no exit within {WAIT:?} of SIGTERM")),
        Some(status) if !status.success() => problems.push(format!("exit status {status}")),
        Some(_) => {}
    }
    if sock.exists() {
        problems.push("socket file left behind".into());
    }
    assert!(
        problems.is_empty(),
        "{}\nserver log:\n{}",
        problems.join("\n"),
        env.srv.log()
    );
}

fn serve_expecting_failure(args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut child = common::spawn(
        Command::new(common::thinline()).arg("serve").args(args),
        Stdio::null(),
        Stdio::piped(),
    );
    let status = common::wait_timeout(&mut child, Duration::from_secs(10)).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("thinline serve {args:?} kept running");
    });
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status, err)
}

// In clear only, like the two tests after it: about the socket file, not what is said
// over the socket.
#[test]
fn stale_socket_left_by_a_killed_server_is_replaced() {
    let mut env = serve(Transport::Clear, &[]);
    let sock: PathBuf = env.sock().to_owned();
    env.srv.child.kill().unwrap();
    env.srv.child.wait().unwrap();
    let meta = std::fs::symlink_metadata(&sock).expect("kill -9 leaves the socket file");
    assert!(meta.file_type().is_socket());
    env.srv = Served::unix(env.fx.dir.path(), &[], &[env.fx.image.to_str().unwrap()]);
    assert_eq!(env.sock(), sock);
    env.assert_healthy();
}

#[test]
fn regular_file_at_the_socket_path_is_refused() {
    let fx = Fixture::new(SIZE);
    let path = fx.path("nbd.sock");
    std::fs::write(&path, b"precious").unwrap();
    let (status, err) = serve_expecting_failure(&[
        "--socket",
        path.to_str().unwrap(),
        fx.image.to_str().unwrap(),
    ]);
    assert!(
        !status.success(),
        "serve succeeded with a regular file at the socket path"
    );
    assert!(
        err.contains(path.to_str().unwrap()),
        "message does not name the path: {err}"
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        b"precious",
        "the file was touched"
    );
}

#[test]
fn live_socket_is_refused() {
    let mut env = serve(Transport::Clear, &[]);
    let sock = env.sock().to_str().unwrap().to_owned();
    let (status, err) =
        serve_expecting_failure(&["--socket", &sock, env.fx.image.to_str().unwrap()]);
    assert!(!status.success(), "a second server took over a live socket");
    assert!(err.contains(&sock), "message does not name the path: {err}");
    env.assert_healthy();
}

// ---------------------------------------------------------------------------------------
// TCP
// ---------------------------------------------------------------------------------------

in_clear_and_over_tls!(tcp_bad_option_and_command_keep_the_session_and_server_usable);
fn tcp_bad_option_and_command_keep_the_session_and_server_usable(transport: Transport) {
    let mut env = serve_tcp(transport, &[]);
    {
        let mut c = env.started();
        c.send_option_header_with_magic(0xdead_beef, opt::GO, 0)
            .unwrap();
        assert!(c.wait_closed(WAIT).is_some(), "bad option magic over TCP");
    }
    let mut c = env.started();
    let r = c.option_final(0x4242, b"junk").unwrap();
    assert_option_error(&r, rep::ERR_UNSUP, "unknown option over TCP");
    assert_eq!(c.structured_reply().unwrap().reply_type, rep::ACK);
    c.go("", &[]).unwrap().expect("GO over TCP");
    let cookie = c.cookie();
    let r = c.request(&Request::new(42, cookie, 0, 0), &[]).unwrap();
    assert_errno(&r, errno::EINVAL, "unknown command over TCP");
    let r = c.write(SIZE, &[1; 512]).unwrap();
    assert_errno(&r, errno::ENOSPC, "write past the end over TCP");
    let r = c.read(0, 128 * KIB).unwrap();
    assert_eq!(r.read_data(0, 128 * KIB), env.file_bytes(0, 128 * KIB));
    env.assert_healthy();
}

in_clear_and_over_tls!(a_client_that_never_reads_its_replies_does_not_stall_other_clients);
fn a_client_that_never_reads_its_replies_does_not_stall_other_clients(transport: Transport) {
    // Regression: one client that pipelines more than 1 GiB of READs and never reads the
    // replies may only exhaust its own per-connection budget, not the server's.
    // 256 MiB sparse: almost all holes, so the server needs no memory for the data.
    let mut env = serve_sized(transport, 256 * MIB, &[]);
    let (mut hog, ..) = env.open(Mode::Simple, &[]);
    let mut buf = Vec::new();
    for i in 0..64u64 {
        let req = Request::new(cmd::READ, i + 1, (i % 7) * MAX_PAYLOAD, MAX_PAYLOAD);
        hog.encode(&req, &[], &mut buf);
    }
    hog.write_raw(&buf).unwrap();
    // The server has started answering (its writer soon blocks on the full socket);
    // from here on the hog reads nothing more.
    let first = hog.read_vec(16).unwrap();
    assert_eq!(first[..4], wire::SIMPLE_REPLY_MAGIC.to_be_bytes());
    // Another client must keep being served while the hog's requests pile up.
    let (mut c, ..) = env.open(Mode::Simple, &[]);
    c.set_timeout(WAIT).unwrap();
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < Duration::from_secs(1) {
        let r = c.read(0, 4096).unwrap_or_else(|e| {
            panic!("READ {n} of another client stalled ({e}) behind a client that does not read its replies")
        });
        assert_eq!(r.read_data(0, 4096), env.file_bytes(0, 4096));
        n += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(hog);
    env.assert_healthy();
}

in_clear_and_over_tls!(sigterm_exits_even_if_a_client_never_reads_its_replies);
fn sigterm_exits_even_if_a_client_never_reads_its_replies(transport: Transport) {
    // Regression: a writer blocked on a client that does not read must not keep the
    // server from exiting after the grace period.
    // Replies far larger than the socket buffers, never read: the server's writer
    // blocks. Shutdown must still finish (after the grace period) and exit 0.
    let mut env = serve_sized(transport, 256 * MIB, &[]);
    let sock = env.sock().to_owned();
    let (mut hog, ..) = env.open(Mode::Simple, &[]);
    let mut buf = Vec::new();
    for i in 0..16u64 {
        hog.encode(&Request::new(cmd::READ, i + 1, i * MIB, MIB), &[], &mut buf);
    }
    hog.write_raw(&buf).unwrap();
    // Let the server start answering (its writer then blocks on the full socket).
    let mut c = env.open(Mode::Simple, &[]).0;
    assert_eq!(c.read(0, 4096).unwrap().errno(), 0);
    drop(c);
    common::signal(&env.srv.child, libc::SIGTERM);
    let status = common::wait_timeout(&mut env.srv.child, WAIT);
    let log = env.srv.log();
    drop(hog);
    let status = status.unwrap_or_else(|| {
        panic!(
            "no exit within {WAIT:?} of SIGTERM while a client does not read its replies:\n{log}"
        )
    });
    assert!(status.success(), "exit status {status}:\n{log}");
    assert!(!sock.exists(), "socket file left behind");
}

in_clear_and_over_tls!(disc_after_pipelined_writes_completes_them_before_closing);
fn disc_after_pipelined_writes_completes_them_before_closing(transport: Transport) {
    let mut env = serve(transport, &[]);
    let (mut c, ..) = env.open(Mode::Structured, &[]);
    let base = 6 * MIB;
    let mut buf = Vec::new();
    for i in 0..32u64 {
        let req = Request::new(cmd::WRITE, i + 1, base + i * 64 * KIB, 64 * KIB);
        c.encode(&req, &pattern(i + 100, 64 * KIB), &mut buf);
    }
    c.encode(&Request::new(cmd::DISC, 99, 0, 0), &[], &mut buf);
    c.write_raw(&buf).unwrap();
    // "The server MUST handle all outstanding requests" before closing.
    assert!(
        c.wait_closed(WAIT).is_some(),
        "connection not closed after DISC"
    );
    for i in 0..32u64 {
        assert_eq!(
            env.file_bytes(base + i * 64 * KIB, 64 * KIB),
            pattern(i + 100, 64 * KIB),
            "write {i} sent before DISC did not land"
        );
    }
    env.assert_healthy();
}

in_clear_and_over_tls!(go_with_unknown_and_repeated_info_requests_succeeds);
fn go_with_unknown_and_repeated_info_requests_succeeds(transport: Transport) {
    let mut env = serve(transport, &[]);
    let mut c = env.started();
    let e = c
        .go(
            "",
            &[0xffff, info::NAME, 77, info::DESCRIPTION, info::BLOCK_SIZE],
        )
        .unwrap()
        .expect("GO with unknown info requests (\"MUST ignore\")");
    assert_eq!(e.size, SIZE);
    assert_eq!(e.name.as_deref(), Some("disk.img"));
    let (min, pref, max) = e.block_size.expect("block sizes requested");
    assert!(min.is_power_of_two() && pref.is_power_of_two() && min <= pref && pref <= max);
    let mut infos: Vec<u16> = e
        .replies
        .iter()
        .filter(|r| r.reply_type == rep::INFO)
        .map(|r| u16::from_be_bytes([r.data[0], r.data[1]]))
        .collect();
    infos.sort_unstable();
    let n = infos.len();
    infos.dedup();
    assert_eq!(infos.len(), n, "an NBD_INFO type sent twice");
    let r = c.read(0, 4096).unwrap();
    assert_eq!(r.read_data(0, 4096), env.file_bytes(0, 4096));
    env.assert_healthy();
}
