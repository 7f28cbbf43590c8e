//! `nfs://` URIs: the server, the ports and the AUTH_SYS identity their query may give,
//! and the path, %-decoded and normalised; with the textual path helpers the rest of the
//! client uses (normalising, whole-component containment).

use thinline_format::storage::percent_decode;

/// What an `nfs://` URI names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Target {
    /// Host name or address (IPv6 without brackets).
    pub(super) host: String,
    /// `host[:port]` as written, for the URIs of related objects.
    pub(super) authority: String,
    pub(super) nfs_port: Option<u16>,
    pub(super) mount_port: Option<u16>,
    pub(super) uid: Option<u32>,
    pub(super) gid: Option<u32>,
    /// Absolute, %-decoded, normalised path on the server.
    pub(super) path: String,
}

/// Parses an `nfs://` URI into the [`Target`] it names.
pub(super) fn parse_uri(uri: &str) -> Result<Target, String> {
    let rest = match uri.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("nfs") => rest,
        _ => return Err("not an nfs:// URI".into()),
    };
    let rest = rest.split('#').next().unwrap_or("");
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or("the IPv6 address in the URI has no closing ']'")?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or("unexpected text after ']'")?),
        };
        (host, port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("the URI names no server".into());
    }
    let parse_port = |p: &str, what: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("{what} {p:?} is not a port number"))
    };
    let mut target = Target {
        host: host.to_owned(),
        authority: authority.to_owned(),
        nfs_port: port
            .filter(|p| !p.is_empty())
            .map(|p| parse_port(p, "the port"))
            .transpose()?,
        mount_port: None,
        uid: None,
        gid: None,
        path: String::new(),
    };
    for param in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = param.split_once('=').unwrap_or((param, ""));
        let number = || {
            value
                .parse::<u32>()
                .map_err(|_| format!("the URI parameter {key} needs a number"))
        };
        match key {
            "nfsport" => target.nfs_port = Some(parse_port(value, "nfsport")?),
            "mountport" => target.mount_port = Some(parse_port(value, "mountport")?),
            "uid" => target.uid = Some(number()?),
            "gid" => target.gid = Some(number()?),
            "version" if value == "3" => {}
            "version" => return Err(format!("NFS version {value:?} is not supported (only 3)")),
            _ => {
                return Err(format!(
                    "unknown URI parameter {key:?} (known: nfsport, mountport, uid, gid, version)"
                ));
            }
        }
    }
    if path.is_empty() || path == "/" {
        return Err("the URI has no path".into());
    }
    let decoded = percent_decode(path).ok_or("a %-escape in the path is malformed")?;
    target.path = normalize(&decoded);
    if target.path == "/" {
        return Err("the URI names the server's root, not a file".into());
    }
    Ok(target)
}

/// `path` made absolute with `.`, `..` and repeated slashes removed (textually, the
/// way a URL is resolved).
pub(super) fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

pub(super) fn components(path: &str) -> Vec<&str> {
    path.split('/').filter(|c| !c.is_empty()).collect()
}

/// True if `path` is `export` or inside it (whole components).
pub(super) fn within(export: &str, path: &str) -> bool {
    let (e, p) = (components(export), components(path));
    p.len() >= e.len() && e.iter().zip(&p).all(|(a, b)| a == b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_split_into_host_ports_and_path() {
        let t = parse_uri("nfs://user@nas:2049/srv/img/a%20b.qcow2?mountport=635&uid=7").unwrap();
        assert_eq!(t.host, "nas");
        assert_eq!(t.authority, "nas:2049");
        assert_eq!(
            (t.nfs_port, t.mount_port, t.uid, t.gid),
            (Some(2049), Some(635), Some(7), None)
        );
        assert_eq!(t.path, "/srv/img/a b.qcow2");
        let t = parse_uri("NFS://[::1]:20490//a/./b/../c").unwrap();
        assert_eq!(
            (t.host.as_str(), t.nfs_port, t.path.as_str()),
            ("::1", Some(20490), "/a/c")
        );
        let t = parse_uri("nfs://h/x?nfsport=1&version=3").unwrap();
        assert_eq!(t.nfs_port, Some(1));
        for bad in [
            "nfs:///x",
            "nfs://h",
            "nfs://h/",
            "nfs://h/..",
            "nfs://h:99999/x",
            "nfs://h/x?bogus=1",
            "nfs://h/x?version=4",
            "nfs://h/%zz",
            "http://h/x",
        ] {
            assert!(parse_uri(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn containment_is_by_whole_components() {
        assert!(within("/srv/img/", "/srv/img"));
        assert!(!within("/srv/img", "/srv/imgs/x"));
    }

    #[test]
    fn paths_normalise_without_climbing_above_the_root() {
        assert_eq!(normalize("a/../../b/"), "/b");
    }
}
