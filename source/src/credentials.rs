//! HTTP credentials kept off the command line: a netrc file (`machine HOST login USER
//! password PASS`, the format curl, wget and ftp read), because every local user can
//! read a process's argv.
//!
//! The file must not be readable or writable by group or others (as ssh insists for
//! its keys): a readable credentials file is a leak already, and a writable one lets
//! another user point Thinline's credentials at a server of their choosing. Passwords
//! never appear in `Debug` output or messages.

use std::collections::HashMap;
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// A user name and password for HTTP Basic authentication.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub user: String,
    password: String,
}

impl Credentials {
    /// Credentials for `user` with `password`.
    pub fn new(user: String, password: String) -> Self {
        Credentials { user, password }
    }

    /// The password.
    pub fn password(&self) -> &str {
        &self.password
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// One entry being parsed: the host (`None` for `default`), login and password.
type Entry = (Option<String>, Option<String>, Option<String>);

/// Credentials by host, from a netrc file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Netrc {
    machines: HashMap<String, Credentials>,
    default: Option<Credentials>,
}

impl Netrc {
    /// Reads and parses the netrc file at `path`, refusing one that group or others
    /// may read or write.
    pub fn load(path: &Path) -> Result<Netrc, String> {
        let shown = path.display();
        let file = std::fs::File::open(path).map_err(|e| format!("cannot open {shown}: {e}"))?;
        let meta = file
            .metadata()
            .map_err(|e| format!("cannot stat {shown}: {e}"))?;
        if !meta.is_file() {
            return Err(format!("{shown} is not a regular file"));
        }
        if meta.mode() & 0o077 != 0 {
            return Err(format!(
                "{shown} is accessible by group or others (mode {:o}); it holds passwords: chmod 600 it",
                meta.mode() & 0o777
            ));
        }
        let text =
            std::io::read_to_string(file).map_err(|e| format!("cannot read {shown}: {e}"))?;
        Netrc::parse(&text).map_err(|e| format!("{shown}: {e}"))
    }

    /// Parses netrc text: `machine NAME`, `default`, `login`, `password`, `account`
    /// (ignored) and `macdef` (skipped up to the next blank line).
    pub fn parse(text: &str) -> Result<Netrc, String> {
        let mut netrc = Netrc::default();
        let mut current: Option<Entry> = None;
        let mut lines = text.lines();
        while let Some(line) = lines.next() {
            let mut tokens = line.split_whitespace();
            while let Some(token) = tokens.next() {
                let mut value = |what: &str| {
                    tokens
                        .next()
                        .map(str::to_owned)
                        .ok_or_else(|| format!("`{token}` without a {what}"))
                };
                match token {
                    "machine" => {
                        let host = value("host name")?;
                        netrc.add(current.take());
                        current = Some((Some(host), None, None));
                    }
                    "default" => {
                        netrc.add(current.take());
                        current = Some((None, None, None));
                    }
                    "login" => {
                        let login = value("user name")?;
                        let entry = current.as_mut().ok_or("`login` before `machine`")?;
                        entry.1 = Some(login);
                    }
                    "password" => {
                        let password = value("password")?;
                        let entry = current.as_mut().ok_or("`password` before `machine`")?;
                        entry.2 = Some(password);
                    }
                    "account" => {
                        value("value")?;
                    }
                    "macdef" => {
                        value("name")?;
                        for line in lines.by_ref() {
                            if line.trim().is_empty() {
                                break;
                            }
                        }
                        break;
                    }
                    t if t.starts_with('#') => break,
                    other => return Err(format!("unknown netrc token {other:?}")),
                }
            }
        }
        netrc.add(current.take());
        Ok(netrc)
    }

    fn add(&mut self, entry: Option<Entry>) {
        let Some((host, login, password)) = entry else {
            return;
        };
        let credentials = Credentials::new(login.unwrap_or_default(), password.unwrap_or_default());
        match host {
            // The first entry for a host wins, as in curl.
            Some(host) => {
                self.machines
                    .entry(host.to_ascii_lowercase())
                    .or_insert(credentials);
            }
            None => self.default = Some(credentials),
        }
    }

    /// The credentials for `host` (case-insensitive), else the `default` entry.
    pub fn lookup(&self, host: &str) -> Option<&Credentials> {
        self.machines
            .get(&host.to_ascii_lowercase())
            .or(self.default.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machines_default_and_macros_are_parsed() {
        let n = Netrc::parse(
            "# templates\nmachine Images.Example.com login alice password s3cr/t?#\n\
             macdef init\ncd /x\n\nmachine other login bob\npassword pw2 account a\n\
             default login anon password none\n",
        )
        .unwrap();
        let a = n.lookup("images.example.com").unwrap();
        assert_eq!((a.user.as_str(), a.password()), ("alice", "s3cr/t?#"));
        let b = n.lookup("OTHER").unwrap();
        assert_eq!((b.user.as_str(), b.password()), ("bob", "pw2"));
        assert_eq!(n.lookup("elsewhere").unwrap().user, "anon");
        assert!(!format!("{a:?}").contains("s3cr"));
    }

    #[test]
    fn malformed_netrc_files_are_refused() {
        for bad in [
            "login x",
            "machine",
            "machine h login",
            "machine h frobnicate 1",
        ] {
            assert!(Netrc::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_netrc_file_others_may_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("netrc");
        std::fs::write(&path, "machine h login u password p\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Netrc::load(&path).unwrap_err();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(Netrc::load(&path).unwrap().lookup("h").unwrap().user, "u");
    }
}
