//! How the LVM SR runs lvm2: every command with `LC_ALL=C` (its messages and number
//! formats are parsed), a device filter that admits only the SR's physical volumes (so
//! lvm never scans, activates or changes anything on another disk of the host), udev
//! synchronisation off where no udev runs, and reports read as JSON in bytes.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

use crate::{Code, Error, Result};

/// The tag every LV the agent creates carries, naming its SR: the agent touches no LV
/// without it.
pub fn owner_tag(sr: uuid::Uuid) -> String {
    format!("thinline.sr.{}", sr.simple())
}

/// lvm2 as one SR runs it.
#[derive(Debug, Clone)]
pub struct Lvm {
    pvs: Vec<PathBuf>,
    udev: bool,
}

impl Lvm {
    /// lvm2 restricted to the devices `pvs`; `udev`: whether udev runs on this host
    /// (without it, lvm must create device nodes itself and never wait for udev).
    pub fn new(pvs: &[PathBuf], udev: bool) -> Result<Lvm> {
        if pvs.is_empty() {
            return Err(Error::new(
                Code::InvalidArgument,
                "an LVM SR needs at least one device",
            ));
        }
        for pv in pvs {
            filter_pattern(pv)?;
        }
        Ok(Lvm {
            pvs: pvs.to_vec(),
            udev,
        })
    }

    /// The `--config` string every command gets.
    pub fn config(&self) -> String {
        let accept: Vec<String> = self
            .pvs
            .iter()
            .map(|p| format!("\"a|{}|\"", filter_pattern(p).expect("checked in new")))
            .collect();
        let mut config = format!(
            "devices {{ filter=[{}, \"r|.*|\"] global_filter=[{}, \"r|.*|\"] use_devicesfile=0 }}",
            accept.join(", "),
            accept.join(", ")
        );
        if !self.udev {
            config.push_str(" activation { udev_sync=0 udev_rules=0 verify_udev_operations=1 }");
        }
        config
    }

    /// `tool ARGS…` (an lvm2 command: `lvcreate`, `vgs`, …), ready to run.
    pub fn command(&self, tool: &str, args: &[&str]) -> Command {
        let mut c = Command::new(tool);
        c.env("LC_ALL", "C")
            // The agent's own descriptors are its business, not a warning on stderr.
            .env("LVM_SUPPRESS_FD_WARNINGS", "1")
            .env_remove("LVM_SYSTEM_DIR")
            .arg("--config")
            .arg(self.config())
            .args(args);
        c
    }

    /// Runs `tool ARGS…`; its stdout, or an error with what it printed on stderr.
    pub fn run(&self, tool: &str, args: &[&str]) -> Result<String> {
        super::output_of(
            self.command(tool, args),
            &format!("{tool} {}", args.join(" ")),
        )
    }

    /// `tool` (`lvs`, `vgs`) as a JSON report of `fields` in bytes, for `target`s.
    fn report(&self, tool: &str, fields: &str, target: &[&str]) -> Result<String> {
        let mut args = vec![
            "--reportformat",
            "json",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            fields,
        ];
        args.extend_from_slice(target);
        self.run(tool, &args)
    }

    /// The logical volumes of `vg`.
    pub fn lvs(&self, vg: &str) -> Result<Vec<LvInfo>> {
        let fields = "lv_name,vg_name,lv_size,lv_attr,lv_tags,lv_path";
        parse_lvs(&self.report("lvs", fields, &[vg])?)
    }

    /// The volume groups on the SR's devices.
    pub fn vgs(&self) -> Result<Vec<VgInfo>> {
        let fields = "vg_name,vg_uuid,vg_size,vg_free,vg_extent_size,vg_tags,pv_count";
        parse_vgs(&self.report("vgs", fields, &[])?)
    }
}

/// The physical volumes of the VG `vg`, found by a read-only scan of the host's devices
/// (`pvs` with the devices file off: the SR's devices are in none): how `sr introduce`
/// learns an SR's devices.
pub fn pvs_of(vg: &str) -> Result<Vec<PathBuf>> {
    let mut c = Command::new("pvs");
    c.env("LC_ALL", "C")
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .args(["--config", "devices { use_devicesfile=0 }"])
        .args(["--reportformat", "json", "-o", "pv_name,vg_name"]);
    parse_pvs_of(&super::output_of(c, "pvs")?, vg)
}

fn parse_pvs_of(json: &str, vg: &str) -> Result<Vec<PathBuf>> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| {
        Error::new(
            Code::SrBackendFailure,
            format!("pvs printed what is not a report: {e}"),
        )
    })?;
    let rows = v["report"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|r| r["pv"].as_array().into_iter().flatten());
    Ok(rows
        .filter(|pv| pv["vg_name"].as_str() == Some(vg))
        .filter_map(|pv| pv["pv_name"].as_str().map(PathBuf::from))
        .collect())
}

/// An lvm filter pattern admitting exactly `device`. Characters a regular expression
/// treats specially are put in brackets (no backslashes, which lvm's config strings
/// would need escaped again); paths with characters outside a safe set are refused.
pub fn filter_pattern(device: &Path) -> Result<String> {
    let s = device.to_str().unwrap_or_default();
    let safe = |c: char| c.is_ascii_alphanumeric() || "/_.:+-=@,".contains(c);
    if !s.starts_with('/') || !s.chars().all(safe) {
        return Err(Error::new(
            Code::InvalidArgument,
            format!(
                "{}: an SR device must be an absolute path of letters, digits and /_.:+-=@,",
                device.display()
            ),
        ));
    }
    let mut out = String::from("^");
    for c in s.chars() {
        if ".+".contains(c) {
            out.push('[');
            out.push(c);
            out.push(']');
        } else {
            out.push(c);
        }
    }
    out.push('$');
    Ok(out)
}

/// One logical volume, as `lvs` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LvInfo {
    pub name: String,
    pub vg: String,
    /// Bytes.
    pub size: u64,
    /// `lv_attr`, e.g. `-wi-a-----` (see lvs(8)).
    pub attr: String,
    pub tags: Vec<String>,
    /// `/dev/VG/LV`; empty for an LV that has no device node (inactive).
    pub path: String,
}

impl LvInfo {
    /// Whether the LV is active (the fifth `lv_attr` character).
    pub fn active(&self) -> bool {
        self.attr.chars().nth(4) == Some('a')
    }
}

/// One volume group, as `vgs` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VgInfo {
    pub name: String,
    pub uuid: String,
    /// Bytes.
    pub size: u64,
    /// Bytes not allocated to an LV.
    pub free: u64,
    pub extent_size: u64,
    pub tags: Vec<String>,
    pub pv_count: u64,
}

#[derive(Deserialize)]
struct Report<T> {
    report: Vec<T>,
}

#[derive(Deserialize)]
struct LvSection {
    #[serde(default)]
    lv: Vec<RawLv>,
}

#[derive(Deserialize)]
struct RawLv {
    lv_name: String,
    vg_name: String,
    lv_size: String,
    lv_attr: String,
    #[serde(default)]
    lv_tags: String,
    #[serde(default)]
    lv_path: String,
}

#[derive(Deserialize)]
struct VgSection {
    #[serde(default)]
    vg: Vec<RawVg>,
}

#[derive(Deserialize)]
struct RawVg {
    vg_name: String,
    vg_uuid: String,
    vg_size: String,
    vg_free: String,
    vg_extent_size: String,
    #[serde(default)]
    vg_tags: String,
    pv_count: String,
}

fn bad_report(what: &str, detail: impl std::fmt::Display) -> Error {
    Error::new(
        Code::SrBackendFailure,
        format!("lvm's {what} report cannot be read: {detail}"),
    )
}

fn bytes(what: &str, field: &str, value: &str) -> Result<u64> {
    value
        .trim()
        .parse()
        .map_err(|_| bad_report(what, format!("{field} {value:?} is not a number of bytes")))
}

fn tags(s: &str) -> Vec<String> {
    s.split(',')
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The rows of a JSON report of `what` (`lvs`, `vgs`), each converted by `row`.
fn rows<S, R, T>(
    what: &str,
    json: &str,
    section: impl Fn(S) -> Vec<R>,
    row: impl Fn(R) -> Result<T>,
) -> Result<Vec<T>>
where
    S: serde::de::DeserializeOwned,
{
    let report: Report<S> = serde_json::from_str(json).map_err(|e| bad_report(what, e))?;
    report
        .report
        .into_iter()
        .flat_map(section)
        .map(row)
        .collect()
}

/// `lvs --reportformat json --units b --nosuffix` output, decoded.
pub fn parse_lvs(json: &str) -> Result<Vec<LvInfo>> {
    rows(
        "lvs",
        json,
        |s: LvSection| s.lv,
        |r| {
            Ok(LvInfo {
                size: bytes("lvs", "lv_size", &r.lv_size)?,
                name: r.lv_name,
                vg: r.vg_name,
                attr: r.lv_attr,
                tags: tags(&r.lv_tags),
                path: r.lv_path,
            })
        },
    )
}

/// `vgs --reportformat json --units b --nosuffix` output, decoded.
pub fn parse_vgs(json: &str) -> Result<Vec<VgInfo>> {
    rows(
        "vgs",
        json,
        |s: VgSection| s.vg,
        |r| {
            Ok(VgInfo {
                size: bytes("vgs", "vg_size", &r.vg_size)?,
                free: bytes("vgs", "vg_free", &r.vg_free)?,
                extent_size: bytes("vgs", "vg_extent_size", &r.vg_extent_size)?,
                pv_count: bytes("vgs", "pv_count", &r.pv_count)?,
                name: r.vg_name,
                uuid: r.vg_uuid,
                tags: tags(&r.vg_tags),
            })
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pvs_of_a_vg_are_read_from_the_report_and_others_ignored() {
        let json = r#"{"report": [{"pv": [
            {"pv_name": "/dev/loop2", "vg_name": "tlsr"},
            {"pv_name": "/dev/sda2", "vg_name": "system"},
            {"pv_name": "/dev/loop3", "vg_name": "tlsr"},
            {"pv_name": "/dev/sdz", "vg_name": ""}]}]}"#;
        assert_eq!(
            parse_pvs_of(json, "tlsr").unwrap(),
            [PathBuf::from("/dev/loop2"), PathBuf::from("/dev/loop3")]
        );
        assert!(parse_pvs_of(json, "none").unwrap().is_empty());
        assert!(parse_pvs_of("not json", "tlsr").is_err());
    }

    #[test]
    fn the_device_filter_admits_exactly_the_srs_devices_and_refuses_odd_paths() {
        let lvm = Lvm::new(
            &[
                PathBuf::from("/dev/loop0"),
                PathBuf::from("/dev/disk/by-id/wwn-0x5.00+a"),
            ],
            false,
        )
        .unwrap();
        let config = lvm.config();
        assert!(
            config.contains(
                r#"filter=["a|^/dev/loop0$|", "a|^/dev/disk/by-id/wwn-0x5[.]00[+]a$|", "r|.*|"]"#
            ),
            "{config}"
        );
        assert!(config.contains("udev_sync=0"), "{config}");
        assert!(
            !Lvm::new(&[PathBuf::from("/dev/loop0")], true)
                .unwrap()
                .config()
                .contains("udev")
        );
        for bad in [
            "loop0",
            "/dev/sd|a",
            "/dev/a\"b",
            "/dev/a b",
            "/dev/a\\b",
            "/dev/a$",
        ] {
            assert!(Lvm::new(&[PathBuf::from(bad)], true).is_err(), "{bad}");
        }
        assert!(Lvm::new(&[], true).is_err());
    }

    #[test]
    fn commands_run_in_the_c_locale_with_the_srs_config() {
        let lvm = Lvm::new(&[PathBuf::from("/dev/loop3")], true).unwrap();
        let c = lvm.command("lvs", &["vg0"]);
        let envs: Vec<_> = c.get_envs().collect();
        assert!(envs.contains(&(
            std::ffi::OsStr::new("LC_ALL"),
            Some(std::ffi::OsStr::new("C"))
        )));
        let args: Vec<_> = c
            .get_args()
            .map(|a| a.to_str().unwrap().to_owned())
            .collect();
        assert_eq!(args[0], "--config");
        assert!(args[1].contains("/dev/loop3"));
        assert_eq!(args[2], "vg0");
    }

    #[test]
    fn lvs_and_vgs_reports_decode_and_damaged_ones_are_errors() {
        let lvs = r#"  {
      "report": [
          {
              "lv": [
                  {"lv_name":"mgt", "vg_name":"vg", "lv_size":"4194304", "lv_attr":"-wi-a-----", "lv_tags":"thinline.sr.abc", "lv_path":"/dev/vg/mgt"},
                  {"lv_name":"user", "vg_name":"vg", "lv_size":"1073741824", "lv_attr":"-wi-------", "lv_tags":"", "lv_path":""}
              ]
          }
      ]
  }
"#;
        let got = parse_lvs(lvs).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].size, 4 << 20);
        assert_eq!(got[0].tags, ["thinline.sr.abc"]);
        assert!(got[0].active() && !got[1].active());
        assert!(got[1].tags.is_empty());
        let vgs = r#"{"report":[{"vg":[{"vg_name":"vg","vg_uuid":"u","vg_size":"8585740288","vg_free":"4290772992","vg_extent_size":"4194304","vg_tags":"a,b","pv_count":"2"}]}]}"#;
        let vg = &parse_vgs(vgs).unwrap()[0];
        assert_eq!((vg.size, vg.free, vg.pv_count), (8585740288, 4290772992, 2));
        assert_eq!(vg.tags, ["a", "b"]);
        for bad in ["", "{}", r#"{"report":[{"lv":[{"lv_name":"x"}]}]}"#] {
            assert!(parse_lvs(bad).is_err(), "{bad:?}");
        }
        let size = r#"{"report":[{"lv":[{"lv_name":"a","vg_name":"v","lv_size":"4.00m","lv_attr":"-"}]}]}"#;
        assert!(parse_lvs(size).unwrap_err().message.contains("4.00m"));
        assert_eq!(
            owner_tag(uuid::Uuid::nil()),
            "thinline.sr.00000000000000000000000000000000"
        );
    }
}
