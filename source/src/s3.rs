//! S3 objects (`s3://bucket/key[?versionId=V]`) through the AWS SDK: the standard
//! credential chain (environment, profile, web identity, SSO, instance metadata), a
//! region from `--s3-region` or the standard configuration, and a custom endpoint for
//! S3-compatible stores (`--s3-endpoint` or `AWS_ENDPOINT_URL`) with path-style
//! addressing.
//!
//! The object is pinned at open: to the `versionId` in the URI when there is one
//! (every GET asks for that version, so a newer version never shows through), else to
//! the ETag seen by `HeadObject` (every GET carries `If-Match`, so a replaced object
//! fails with [`FetchErrorKind::Changed`]). The SDK's own retries are off: the fetch
//! engine retries, with the same policy for every source.

use std::sync::Arc;

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{BehaviorVersion, Region};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use bytes::Bytes;

use crate::redact::redact;
use crate::{
    BodyChunks, FetchError, FetchErrorKind, RangeBackend, RemoteConfig, check_size, read_body,
};

/// `s3://bucket/key` split, with the optional version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    /// The bucket.
    pub bucket: String,
    /// The key (percent-decoded).
    pub key: String,
    /// `?versionId=`.
    pub version: Option<String>,
}

/// Parses `s3://bucket/key[?versionId=V]`.
pub fn parse(uri: &str) -> Result<S3Location, String> {
    let rest = uri
        .split_once("://")
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("s3"))
        .ok_or("not an s3:// URI")?
        .1;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (bucket, key) = path
        .split_once('/')
        .ok_or("the URI names a bucket but no key: s3://bucket/key")?;
    if bucket.is_empty() || bucket.contains('@') {
        return Err("the URI has no bucket (s3://bucket/key; credentials come from the AWS configuration, not the URI)".into());
    }
    if key.is_empty() {
        return Err("the URI has no key: s3://bucket/key".into());
    }
    let key = thinline_format::storage::percent_decode(key)
        .ok_or("a %-escape in the key is malformed")?;
    let mut version = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("versionId", v)) if !v.is_empty() => {
                version = Some(
                    thinline_format::storage::percent_decode(v)
                        .ok_or("a %-escape in versionId is malformed")?,
                );
            }
            _ => {
                return Err(format!(
                    "unknown query parameter {:?}; only versionId is understood",
                    pair.split('=').next().unwrap_or("")
                ));
            }
        }
    }
    Ok(S3Location {
        bucket: bucket.to_owned(),
        key,
        version,
    })
}

/// What every GET is pinned to.
#[derive(Debug, Clone)]
enum Pin {
    Version(String),
    ETag(String),
}

/// An S3 object.
#[derive(Debug)]
pub struct S3Backend {
    client: Client,
    location: S3Location,
    shown: String,
    size: u64,
    pin: Pin,
    identity: String,
    config: RemoteConfig,
}

/// The endpoint of an S3-compatible store, if one is configured.
fn endpoint(config: &RemoteConfig) -> Option<String> {
    config.s3_endpoint.clone().or_else(|| {
        std::env::var("AWS_ENDPOINT_URL_S3")
            .or_else(|_| std::env::var("AWS_ENDPOINT_URL"))
            .ok()
            .filter(|e| !e.is_empty())
    })
}

async fn client(config: &RemoteConfig) -> Result<Client, String> {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(config.connect_timeout)
                .read_timeout(config.first_byte_timeout)
                .build(),
        );
    if let Some(region) = &config.s3_region {
        loader = loader.region(Region::new(region.clone()));
    }
    let shared = loader.load().await;
    let mut builder = aws_sdk_s3::config::Builder::from(&shared);
    if let Some(url) = endpoint(config) {
        builder = builder.endpoint_url(url).force_path_style(true);
        if shared.region().is_none() {
            // S3-compatible stores rarely care; SigV4 needs some region.
            builder = builder.region(Region::new("us-east-1"));
        }
    } else if shared.region().is_none() {
        return Err(
            "no AWS region is configured: pass --s3-region or set AWS_REGION (or a profile region)"
                .into(),
        );
    }
    Ok(Client::from_conf(builder.build()))
}

/// Opens `uri` (`s3://bucket/key[?versionId=V]`).
pub async fn open(uri: &str, config: &RemoteConfig) -> Result<Arc<dyn RangeBackend>, FetchError> {
    let shown = shown_uri(uri);
    let permanent =
        |message: String| FetchError::new(FetchErrorKind::Permanent, "open", &shown, None, message);
    let location = parse(uri).map_err(permanent)?;
    let client = client(config).await.map_err(permanent)?;
    Ok(Arc::new(S3Backend::open(client, location, config).await?))
}

/// The URI for messages: no credentials, and only the `versionId` of the query.
fn shown_uri(uri: &str) -> String {
    let base = redact(uri);
    match parse(uri).ok().and_then(|l| l.version) {
        Some(v) => format!("{base}?versionId={v}"),
        None => base,
    }
}

impl S3Backend {
    async fn open(
        client: Client,
        location: S3Location,
        config: &RemoteConfig,
    ) -> Result<Self, FetchError> {
        let shown = match &location.version {
            Some(v) => format!("s3://{}/{}?versionId={v}", location.bucket, location.key),
            None => format!("s3://{}/{}", location.bucket, location.key),
        };
        let head = client
            .head_object()
            .bucket(&location.bucket)
            .key(&location.key)
            .set_version_id(location.version.clone())
            .send()
            .await
            .map_err(|e| {
                let (kind, message) = match classify(&e) {
                    // A missing object at open is not a change: nothing was pinned yet.
                    (FetchErrorKind::Changed, _) => (
                        FetchErrorKind::Permanent,
                        "no such object (or version) in the bucket".to_owned(),
                    ),
                    other => other,
                };
                FetchError::new(kind, "open", &shown, None, message)
            })?;
        let fail = |message: &str| {
            FetchError::new(FetchErrorKind::Permanent, "open", &shown, None, message)
        };
        let size = head
            .content_length()
            .and_then(|l| u64::try_from(l).ok())
            .ok_or_else(|| fail("HeadObject returned no size"))?;
        if size == 0 {
            return Err(fail("the object is empty"));
        }
        check_size(&shown, size)?;
        let etag = head.e_tag().map(str::to_owned);
        let pin = match (&location.version, &etag) {
            (Some(v), _) => Pin::Version(v.clone()),
            (None, Some(e)) => Pin::ETag(e.clone()),
            (None, None) => return Err(fail("HeadObject returned no ETag to pin the object to")),
        };
        let identity = match &pin {
            Pin::Version(v) => format!("size:{size},version:{v}"),
            Pin::ETag(e) => format!("size:{size},etag:{e}"),
        };
        Ok(S3Backend {
            client,
            location,
            shown,
            size,
            pin,
            identity,
            config: config.clone(),
        })
    }

    async fn read_once(&self, offset: u64, length: u64) -> Result<Bytes, (FetchErrorKind, String)> {
        let deadline = tokio::time::Instant::now() + self.config.request_deadline(length);
        let mut request = self
            .client
            .get_object()
            .bucket(&self.location.bucket)
            .key(&self.location.key)
            .range(format!("bytes={offset}-{}", offset + length - 1));
        request = match &self.pin {
            Pin::Version(v) => request.version_id(v),
            Pin::ETag(e) => request.if_match(e),
        };
        let output = request.send().await.map_err(|e| classify(&e))?;
        if let (Pin::ETag(pinned), Some(now)) = (&self.pin, output.e_tag())
            && pinned != now
        {
            return Err((
                FetchErrorKind::Changed,
                format!("the object changed since it was opened: ETag {now}, pinned {pinned}"),
            ));
        }
        if let Some(range) = output.content_range() {
            let expected = format!("bytes {offset}-{}/{}", offset + length - 1, self.size);
            if range != expected {
                let total = range.rsplit('/').next().and_then(|t| t.parse::<u64>().ok());
                return Err(if total.is_some_and(|t| t != self.size) {
                    (
                        FetchErrorKind::Changed,
                        format!("the object changed since it was opened: Content-Range {range}"),
                    )
                } else {
                    (
                        FetchErrorKind::Transient,
                        format!("asked for {expected}, the server sent {range}"),
                    )
                });
            }
        }
        let mut body = output.body;
        read_body(&mut body, length, self.config.idle_timeout, deadline).await
    }
}

#[async_trait]
impl BodyChunks for aws_sdk_s3::primitives::ByteStream {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, String> {
        self.next().await.transpose().map_err(|e| error_chain(&e))
    }
}

#[async_trait]
impl RangeBackend for S3Backend {
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
        // Inside the same bucket only; a leading `/` starts at the bucket's root.
        let path = super::related::resolve(&format!("/{}", self.location.key), name).map_err(
            |reason| {
                FetchError::new(
                    FetchErrorKind::Permanent,
                    "open",
                    &self.shown,
                    None,
                    format!("refusing the related name {}: {reason}", redact(name)),
                )
            },
        )?;
        let location = S3Location {
            bucket: self.location.bucket.clone(),
            key: path[1..].to_owned(),
            version: None,
        };
        Ok(Arc::new(
            S3Backend::open(self.client.clone(), location, &self.config).await?,
        ))
    }
}

/// Classifies an SDK failure and says what happened, without the request URL.
fn classify<E: ProvideErrorMetadata + std::error::Error + 'static>(
    e: &SdkError<E, HttpResponse>,
) -> (FetchErrorKind, String) {
    let status = e.raw_response().map(|r| r.status().as_u16());
    let code = e.code().unwrap_or("");
    let message = e.message().unwrap_or("");
    let what = match (status, code, message) {
        (Some(s), "", "") => format!("the server answered {s}"),
        (Some(s), c, "") => format!("the server answered {s} {c}"),
        (Some(s), c, m) => format!("the server answered {s} {c}: {m}"),
        (None, c, m) if !c.is_empty() => format!("{c}: {m}"),
        _ => error_chain(e),
    };
    let kind = match (e, status) {
        (SdkError::TimeoutError(_) | SdkError::DispatchFailure(_), _) => FetchErrorKind::Transient,
        (SdkError::ResponseError(_), _) => FetchErrorKind::Transient,
        (_, Some(412)) => FetchErrorKind::Changed,
        (_, Some(404)) if code != "NoSuchBucket" => FetchErrorKind::Changed,
        (_, Some(s)) if s >= 500 || s == 429 || s == 408 => FetchErrorKind::Transient,
        (_, _) if code == "SlowDown" || code == "RequestTimeout" => FetchErrorKind::Transient,
        _ => FetchErrorKind::Permanent,
    };
    let what = match kind {
        FetchErrorKind::Changed if status == Some(412) => "the object changed since it was opened (412 Precondition Failed: its ETag no longer matches)".to_string(),
        FetchErrorKind::Changed => format!("the object is gone since it was opened ({what})"),
        _ if status == Some(403) => format!("{what}; check the credentials and the bucket policy"),
        _ => what,
    };
    (kind, what)
}

/// An error and its causes, joined with `: `.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_split_into_bucket_key_and_version() {
        assert_eq!(
            parse("s3://tmpl/os/debian%2012.qcow2?versionId=abc").unwrap(),
            S3Location {
                bucket: "tmpl".into(),
                key: "os/debian 12.qcow2".into(),
                version: Some("abc".into())
            }
        );
        for bad in [
            "s3://bucket",
            "s3://bucket/",
            "s3:///key",
            "s3://k:s@bucket/key",
            "s3://b/k?X-Amz-Signature=x",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
