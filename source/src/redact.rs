//! Locations as messages show them: without user information, query or fragment.
//!
//! Every source builds its error messages from [`redact`], so a password or a query
//! signature never reaches a log line, a report or a client.

/// `uri` without user information, query or fragment, for messages.
///
/// Whatever stands between `://` and the *last* `@` is credentials, whether or not the
/// URI parses: a password may hold `/`, `?` or `#` (`http://alice:pa/ss@host/x`), which
/// a URI parser would take for the start of the path, query or fragment. When a `?` or
/// `#` comes before that `@`, either the password or the query holds it, and nothing
/// after the scheme is shown. Over-redacting an odd URI is fine; showing a secret is not.
pub fn redact(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return uri.to_owned();
    };
    let after_credentials = match rest.rfind('@') {
        Some(at) if rest[..at].contains(['?', '#']) => return format!("{scheme}://<redacted>"),
        Some(at) => &rest[at + 1..],
        None => rest,
    };
    let shown = after_credentials.split(['?', '#']).next().unwrap_or("");
    format!("{scheme}://{shown}")
}

/// The parts of `uri` that [`redact`] hides (user information, password, query and
/// fragment), for scrubbing them from text a third party printed (a handler's stderr).
pub fn secrets(uri: &str) -> Vec<&str> {
    let Some((_, rest)) = uri.split_once("://") else {
        return Vec::new();
    };
    let mut secrets = Vec::new();
    if let Some(at) = rest.rfind('@') {
        let userinfo = &rest[..at];
        secrets.push(userinfo);
        if let Some((_, password)) = userinfo.split_once(':') {
            secrets.push(password);
        }
    }
    if let Some(q) = rest.find(['?', '#']) {
        secrets.push(&rest[q + 1..]);
    }
    secrets.retain(|s| !s.is_empty());
    secrets
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_with_delimiters_are_never_shown() {
        for (uri, shown) in [
            ("http://alice:pa/ss@host/t.raw", "http://host/t.raw"),
            ("http://alice:pa?ss@host/t.raw", "http://<redacted>"),
            ("http://alice:pa#ss@host/t.raw", "http://<redacted>"),
            ("https://a:b@c@host:8443/t?sig=x#f", "https://host:8443/t"),
            (
                "https://host/t?X-Amz-Signature=abc@def",
                "https://<redacted>",
            ),
            ("nbd+unix:///e?socket=/run/s", "nbd+unix:///e"),
            ("/local/path", "/local/path"),
        ] {
            assert_eq!(redact(uri), shown, "{uri}");
        }
        for secret in ["pa/ss", "pa?ss", "pa#ss"] {
            let uri = format!("http://alice:{secret}@host/x");
            assert!(!redact(&uri).contains("ss"), "{uri}: {}", redact(&uri));
        }
    }
}
