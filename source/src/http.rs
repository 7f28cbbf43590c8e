//! HTTP and HTTPS objects: range GETs on a keep-alive pool (HTTP/2 when the server
//! offers it through TLS ALPN), pinned to the object seen at open.
//!
//! Opening sends `Range: bytes=0-0`: a `206` with `Content-Range: bytes 0-0/SIZE`
//! gives the size; a `200` means the server ignores ranges and is refused (serving it
//! would download the whole object for every read). The identity is the strong ETag,
//! else Last-Modified. Every later GET is conditional on it (`If-Match` for an ETag,
//! `If-Range` for a date) and its `Content-Range`, ETag and Last-Modified are checked,
//! so an object replaced under a running export fails with
//! [`FetchErrorKind::Changed`] instead of mixing old and new bytes.
//!
//! Credentials in the URL (`https://user:pass@host/…`) or, better, in a netrc file
//! ([`super::credentials`]) are sent as Basic authentication and never appear in
//! messages; the query (a pre-signed URL's signature) is sent but never shown.
//!
//! What a hostile server cannot do: redirects are followed only within the object's
//! origin (scheme, host, port) unless the operator allows other hosts, never from
//! HTTPS to HTTP, never to link-local or cloud metadata addresses through a wildcard,
//! and no `Referer` (which would carry a pre-signed query) is ever sent; a body longer
//! than asked for fails at once, one slower than `min_rate` fails at its deadline; an
//! object larger than [`super::MAX_OBJECT_SIZE`] is refused; names inside an image
//! resolve only to paths of the same origin ([`super::related`]).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Client, StatusCode, Url};

use crate::credentials::Credentials;
use crate::redact::redact;
use crate::{
    BodyChunks, FetchError, FetchErrorKind, RangeBackend, RemoteConfig, check_size, read_body,
};

/// What the object is pinned to.
#[derive(Debug, Clone)]
enum Validator {
    /// A strong ETag: `If-Match`.
    ETag(String),
    /// A Last-Modified date: `If-Range`.
    LastModified(String),
    /// Neither: only the size is checked.
    None,
}

/// An HTTP(S) object.
#[derive(Debug)]
pub struct HttpBackend {
    client: Client,
    /// The URL requested, without user information.
    url: Url,
    credentials: Option<Credentials>,
    /// The URL as shown in messages.
    shown: String,
    size: u64,
    validator: Validator,
    /// The ETag seen at open, weak or strong, compared with every response.
    etag: Option<String>,
    last_modified: Option<String>,
    identity: String,
    config: RemoteConfig,
}

/// Most redirects followed for one request.
const MAX_REDIRECTS: usize = 10;

/// Builds the client shared by an object and the files it names.
fn client(config: &RemoteConfig) -> Result<Client, String> {
    Client::builder()
        .connect_timeout(config.connect_timeout)
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        .http2_adaptive_window(true)
        .user_agent(concat!("thinline/", env!("CARGO_PKG_VERSION")))
        .no_proxy()
        .referer(false)
        .redirect(redirect_policy(config.redirect_hosts.clone()))
        .build()
        .map_err(|e| error_text(&e))
}

/// Opens `uri` (`http://` or `https://`).
pub async fn open(uri: &str, config: &RemoteConfig) -> Result<Arc<dyn RangeBackend>, FetchError> {
    let shown = redact(uri);
    let url = Url::parse(uri).map_err(|e| {
        FetchError::new(
            FetchErrorKind::Permanent,
            "open",
            &shown,
            None,
            format!("not a valid URL: {e}"),
        )
    })?;
    let client = client(config)
        .map_err(|e| FetchError::new(FetchErrorKind::Permanent, "open", &shown, None, e))?;
    let decode =
        |s: &str| thinline_format::storage::percent_decode(s).unwrap_or_else(|| s.to_owned());
    let credentials = if url.username().is_empty() {
        url.host_str()
            .and_then(|host| config.http_credentials.as_ref()?.lookup(host))
            .cloned()
    } else {
        Some(Credentials::new(
            decode(url.username()),
            decode(url.password().unwrap_or("")),
        ))
    };
    Ok(Arc::new(
        HttpBackend::open_with(client, url, credentials, config).await?,
    ))
}

impl HttpBackend {
    async fn open_with(
        client: Client,
        mut url: Url,
        credentials: Option<Credentials>,
        config: &RemoteConfig,
    ) -> Result<Self, FetchError> {
        let _ = url.set_username("");
        let _ = url.set_password(None);
        let shown = redact(url.as_str());
        let mut backend = HttpBackend {
            client,
            url,
            credentials,
            shown,
            size: 0,
            validator: Validator::None,
            etag: None,
            last_modified: None,
            identity: String::new(),
            config: config.clone(),
        };
        let shown = backend.shown.clone();
        let fail = |kind, message: String| FetchError::new(kind, "open", &shown, None, message);
        let deadline = tokio::time::Instant::now() + config.request_deadline(1);
        let mut response = backend
            .send(0, 1, false)
            .await
            .map_err(|(kind, m)| fail(kind, m))?;
        let status = response.status();
        match status {
            StatusCode::PARTIAL_CONTENT => {}
            StatusCode::OK => {
                return Err(fail(
                    FetchErrorKind::Permanent,
                    "the server does not support range requests (it answered a range request with the whole object, status 200); serve the template from a server that does".to_owned(),
                ));
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                return Err(fail(
                    FetchErrorKind::Permanent,
                    "the object is empty (416 Range Not Satisfiable for its first byte)".to_owned(),
                ));
            }
            s => return Err(fail(status_kind(s), status_text(s))),
        }
        let headers = response.headers();
        let (start, end, total) =
            content_range(headers).map_err(|m| fail(FetchErrorKind::Permanent, m))?;
        if (start, end) != (0, 0) {
            return Err(fail(
                FetchErrorKind::Permanent,
                format!("asked for bytes 0-0, the server sent bytes {start}-{end}"),
            ));
        }
        check_size(&shown, total)?;
        backend.size = total;
        backend.etag = header_text(headers, &header::ETAG);
        backend.last_modified = header_text(headers, &header::LAST_MODIFIED);
        backend.validator = match (&backend.etag, &backend.last_modified) {
            (Some(etag), _) if !etag.starts_with("W/") => Validator::ETag(etag.clone()),
            (_, Some(date)) => Validator::LastModified(date.clone()),
            _ => Validator::None,
        };
        backend.identity = match &backend.validator {
            Validator::ETag(e) => format!("size:{total},etag:{e}"),
            Validator::LastModified(d) => format!("size:{total},last-modified:{d}"),
            Validator::None => {
                tracing::warn!(
                    uri = %backend.shown,
                    "the server sends neither a strong ETag nor Last-Modified: only a change of size can be detected"
                );
                format!("size:{total}")
            }
        };
        // Read the one-byte body (bounded in size and time) so the connection goes back
        // to the pool.
        read_body(&mut response, 1, config.idle_timeout, deadline)
            .await
            .map_err(|(kind, m)| fail(kind, m))?;
        Ok(backend)
    }

    /// Sends a GET for `length` bytes at `offset` and waits for the response headers.
    async fn send(
        &self,
        offset: u64,
        length: u64,
        conditional: bool,
    ) -> Result<reqwest::Response, (FetchErrorKind, String)> {
        let mut request = self.client.get(self.url.clone()).header(
            header::RANGE,
            format!("bytes={offset}-{}", offset + length - 1),
        );
        if let Some(credentials) = &self.credentials {
            request = request.basic_auth(&credentials.user, Some(credentials.password()));
        }
        if conditional {
            match &self.validator {
                Validator::ETag(etag) => request = request.header(header::IF_MATCH, etag),
                Validator::LastModified(date) => {
                    request = request.header(header::IF_RANGE, date);
                }
                Validator::None => {}
            }
        }
        let first_byte_timeout = self.config.first_byte_timeout;
        match tokio::time::timeout(first_byte_timeout, request.send()).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => {
                let text = error_text(&e);
                // A certificate the server will keep presenting, or a redirect it will
                // keep sending: retrying cannot help.
                let kind = if e.is_redirect() || text.contains("certificate") {
                    FetchErrorKind::Permanent
                } else {
                    FetchErrorKind::Transient
                };
                Err((kind, text))
            }
            Err(_) => Err((
                FetchErrorKind::Transient,
                format!("no response within {first_byte_timeout:?} (first-byte timeout)"),
            )),
        }
    }

    /// Checks that a 206 response is the range asked for, of the pinned object.
    fn check_response(
        &self,
        headers: &HeaderMap,
        offset: u64,
        length: u64,
    ) -> Result<(), (FetchErrorKind, String)> {
        let (start, end, total) =
            content_range(headers).map_err(|m| (FetchErrorKind::Transient, m))?;
        if total != self.size {
            return Err((
                FetchErrorKind::Changed,
                format!(
                    "the object changed since it was opened: its size is now {total} bytes, not {}",
                    self.size
                ),
            ));
        }
        if let (Some(pinned), Some(now)) = (&self.etag, header_text(headers, &header::ETAG))
            && *pinned != now
        {
            return Err((
                FetchErrorKind::Changed,
                format!("the object changed since it was opened: ETag {now}, pinned {pinned}"),
            ));
        }
        if let (Some(pinned), Some(now)) = (
            &self.last_modified,
            header_text(headers, &header::LAST_MODIFIED),
        ) && *pinned != now
        {
            return Err((
                FetchErrorKind::Changed,
                format!(
                    "the object changed since it was opened: Last-Modified {now}, pinned {pinned}"
                ),
            ));
        }
        if (start, end) != (offset, offset + length - 1) {
            return Err((
                FetchErrorKind::Transient,
                format!("the server sent bytes {start}-{end} instead"),
            ));
        }
        Ok(())
    }

    async fn read_once(&self, offset: u64, length: u64) -> Result<Bytes, (FetchErrorKind, String)> {
        let deadline = tokio::time::Instant::now() + self.config.request_deadline(length);
        let mut response = self.send(offset, length, true).await?;
        let status = response.status();
        match status {
            StatusCode::PARTIAL_CONTENT => {}
            StatusCode::OK => {
                return Err(match self.validator {
                    Validator::LastModified(_) => (
                        FetchErrorKind::Changed,
                        "the object changed since it was opened (If-Range failed: the server sent the whole new object)".to_owned(),
                    ),
                    _ => (
                        FetchErrorKind::Permanent,
                        "the server ignored the Range header (status 200)".to_owned(),
                    ),
                });
            }
            StatusCode::PRECONDITION_FAILED => {
                return Err((
                    FetchErrorKind::Changed,
                    "the object changed since it was opened (412 Precondition Failed: its ETag no longer matches)".to_owned(),
                ));
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                return Err((
                    FetchErrorKind::Changed,
                    "the object changed since it was opened: it is shorter now (416 Range Not Satisfiable)".to_owned(),
                ));
            }
            StatusCode::NOT_FOUND | StatusCode::GONE => {
                return Err((
                    FetchErrorKind::Changed,
                    format!(
                        "the object is gone since it was opened ({})",
                        status_text(status)
                    ),
                ));
            }
            s => return Err((status_kind(s), status_text(s))),
        }
        self.check_response(response.headers(), offset, length)?;
        read_body(&mut response, length, self.config.idle_timeout, deadline).await
    }
}

#[async_trait]
impl BodyChunks for reqwest::Response {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, String> {
        self.chunk().await.map_err(|e| error_text(&e))
    }
}

#[async_trait]
impl RangeBackend for HttpBackend {
    fn uri(&self) -> &str {
        &self.shown
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn identity(&self) -> &str {
        &self.identity
    }

    async fn read(&self, offset: u64, length: u64) -> Result<Bytes, FetchError> {
        self.read_once(offset, length)
            .await
            .map_err(|(kind, message)| {
                FetchError::new(kind, "read", &self.shown, Some((offset, length)), message)
            })
    }

    async fn open_related(&self, name: &str) -> Result<Arc<dyn RangeBackend>, FetchError> {
        // The name comes from the image: only its path is used, so the scheme, host,
        // port and credentials stay the template's own.
        let base = thinline_format::storage::percent_decode(self.url.path())
            .unwrap_or_else(|| self.url.path().to_owned());
        let path = super::related::resolve(&base, name).map_err(|reason| {
            FetchError::new(
                FetchErrorKind::Permanent,
                "open",
                &self.shown,
                None,
                format!("refusing the related name {}: {reason}", redact(name)),
            )
        })?;
        let mut url = self.url.clone();
        url.set_path(&super::related::encode_path(&path));
        url.set_query(None);
        url.set_fragment(None);
        Ok(Arc::new(
            HttpBackend::open_with(
                self.client.clone(),
                url,
                self.credentials.clone(),
                &self.config,
            )
            .await?,
        ))
    }
}

/// Follows redirects within the origin of the first URL, and to `allowed` hosts.
fn redirect_policy(allowed: Vec<String>) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() > MAX_REDIRECTS {
            return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
        }
        let refusal = match attempt.previous().first() {
            Some(origin) => redirect_refusal(origin, attempt.url(), &allowed),
            None => None,
        };
        match refusal {
            Some(reason) => attempt.error(reason),
            None => attempt.follow(),
        }
    })
}

/// Why a redirect from a request to `origin` on to `next` is not followed, if it is not.
fn redirect_refusal(origin: &Url, next: &Url, allowed: &[String]) -> Option<String> {
    let host = next.host_str().unwrap_or("");
    let port = next.port_or_known_default().unwrap_or(0);
    let target = format!("{}://{host}:{port}", next.scheme());
    if next.scheme() != origin.scheme() {
        return Some(format!(
            "a redirect to {target} changes the scheme from {}; not followed",
            origin.scheme()
        ));
    }
    if host == origin.host_str().unwrap_or("") && Some(port) == origin.port_or_known_default() {
        return None;
    }
    let named = |pattern: &str| {
        pattern.eq_ignore_ascii_case(host)
            || pattern.eq_ignore_ascii_case(&format!("{host}:{port}"))
    };
    let wildcard = |pattern: &str| {
        pattern == "*"
            || pattern.strip_prefix("*.").is_some_and(|suffix| {
                host.len() > suffix.len() + 1
                    && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                    && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
            })
    };
    if allowed.iter().any(|p| named(p)) {
        return None;
    }
    if allowed.iter().any(|p| wildcard(p)) {
        if metadata_or_link_local(next) {
            return Some(format!(
                "a redirect to {target} (a link-local or cloud metadata address) is not followed unless that host is allowed by name"
            ));
        }
        return None;
    }
    Some(format!(
        "a redirect to another origin ({target}) is not followed; allow its host with --allow-redirect HOST"
    ))
}

/// Link-local addresses (169.254.0.0/16, fe80::/10) and the names and addresses cloud
/// instance metadata services answer on.
fn metadata_or_link_local(url: &Url) -> bool {
    use std::net::{IpAddr, Ipv6Addr};
    let host = url.host_str().unwrap_or("");
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    match literal.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => v4.is_link_local(),
        Ok(IpAddr::V6(v6)) => {
            (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_link_local())
                // AWS's IPv6 instance metadata address.
                || v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
        }
        Err(_) => {
            let name = host.trim_end_matches('.').to_ascii_lowercase();
            ["metadata", "metadata.google.internal", "instance-data"].contains(&name.as_str())
        }
    }
}

/// Parses `Content-Range: bytes START-END/TOTAL`.
fn content_range(headers: &HeaderMap) -> Result<(u64, u64, u64), String> {
    let value = headers
        .get(header::CONTENT_RANGE)
        .ok_or("a 206 response without Content-Range")?;
    let text = value.to_str().map_err(|_| "an unreadable Content-Range")?;
    let parse = || -> Option<(u64, u64, u64)> {
        let rest = text.strip_prefix("bytes ")?;
        let (range, total) = rest.split_once('/')?;
        let (start, end) = range.split_once('-')?;
        let (start, end, total) = (
            start.trim().parse().ok()?,
            end.trim().parse().ok()?,
            total.trim().parse().ok()?,
        );
        (start <= end && end < total).then_some((start, end, total))
    };
    parse().ok_or_else(|| format!("a malformed Content-Range {text:?}"))
}

fn header_text(headers: &HeaderMap, name: &header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v: &HeaderValue| v.to_str().ok())
        .map(str::to_owned)
}

/// Whether a failure status is worth retrying.
fn status_kind(status: StatusCode) -> FetchErrorKind {
    if status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
    {
        FetchErrorKind::Transient
    } else {
        FetchErrorKind::Permanent
    }
}

fn status_text(status: StatusCode) -> String {
    let hint = match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            ": access denied; check the credentials"
        }
        StatusCode::NOT_FOUND => ": no such object",
        _ => "",
    };
    format!("the server answered {status}{hint}")
}

/// A reqwest error and its causes, without the URL (which may hold credentials).
fn error_text(e: &reqwest::Error) -> String {
    let mut text = String::new();
    let mut current: Option<&dyn std::error::Error> = Some(e);
    let mut first = true;
    while let Some(err) = current {
        let part = if first {
            let mut e2 = String::new();
            if e.is_timeout() {
                e2.push_str("timed out");
            } else if e.is_connect() {
                e2.push_str("cannot connect");
            } else if e.is_body() || e.is_decode() {
                e2.push_str("the body failed");
            } else {
                e2.push_str("the request failed");
            }
            e2
        } else {
            err.to_string()
        };
        if !part.is_empty() && !text.ends_with(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
        first = false;
        current = err.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_is_parsed_and_checked() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_RANGE, "bytes 0-0/1048576".parse().unwrap());
        assert_eq!(content_range(&h).unwrap(), (0, 0, 1 << 20));
        for bad in [
            "bytes 5-4/10",
            "bytes 0-10/10",
            "bytes */10",
            "items 0-1/2",
            "bytes 0-1/x",
        ] {
            h.insert(header::CONTENT_RANGE, bad.parse().unwrap());
            assert!(content_range(&h).is_err(), "{bad}");
        }
    }

    #[test]
    fn redirects_stay_in_the_origin_unless_a_host_is_allowed() {
        let origin = Url::parse("https://images.example.com/t.qcow2?sig=x").unwrap();
        let refused = |next: &str, allowed: &[&str]| {
            let allowed: Vec<String> = allowed.iter().map(|a| (*a).to_owned()).collect();
            redirect_refusal(&origin, &Url::parse(next).unwrap(), &allowed)
        };
        assert_eq!(refused("https://images.example.com/other", &[]), None);
        assert_eq!(refused("https://images.example.com:443/x", &[]), None);
        for (next, allowed, reason) in [
            ("https://cdn.example.net/t", &[][..], "another origin"),
            ("https://images.example.com:8443/t", &[], "another origin"),
            ("http://images.example.com/t", &["*"], "changes the scheme"),
            ("https://169.254.169.254/latest", &["*"], "link-local"),
            ("https://[fe80::1]/x", &["*"], "link-local"),
            ("https://[fd00:ec2::254]/x", &["*"], "metadata"),
            ("https://metadata.google.internal/x", &["*"], "metadata"),
            (
                "https://evil.example.net/t",
                &["*.cdn.example.net"],
                "another origin",
            ),
        ] {
            let why = refused(next, allowed).unwrap_or_default();
            assert!(why.contains(reason), "{next}: {why:?}");
        }
        assert_eq!(
            refused("https://cdn.example.net/t", &["cdn.example.net"]),
            None
        );
        assert_eq!(
            refused("https://a.cdn.example.net/t", &["*.cdn.example.net"]),
            None
        );
        assert_eq!(
            refused("https://cdn.example.net:443/t", &["CDN.example.net:443"]),
            None
        );
        assert_eq!(refused("https://anything.example.org/t", &["*"]), None);
        // Named explicitly, even a metadata address is the operator's choice.
        assert_eq!(
            refused("https://169.254.169.254/x", &["169.254.169.254"]),
            None
        );
    }

    #[test]
    fn throttling_and_server_errors_are_transient() {
        assert_eq!(
            status_kind(StatusCode::SERVICE_UNAVAILABLE),
            FetchErrorKind::Transient
        );
        assert_eq!(
            status_kind(StatusCode::TOO_MANY_REQUESTS),
            FetchErrorKind::Transient
        );
        assert_eq!(
            status_kind(StatusCode::FORBIDDEN),
            FetchErrorKind::Permanent
        );
    }
}
