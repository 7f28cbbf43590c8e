//! `thinline man --out DIR`: the man pages, one per command (`thinline(1)`,
//! `thinline-serve(1)`, `thinline-vdi-clone(1)`, …), generated from the clap definitions
//! that `--help` prints, so the two never drift. The agent's pages (`thinline-sr-*`,
//! `thinline-vdi-*`, `thinline-quickstart`) add the output contract and the exit status
//! of every error code; `thinline(1)` lists every exit status.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, CommandFactory};
use thinline_sr::Code;

/// Write the man pages into a directory (for packaging and `make install`).
#[derive(Debug, Args)]
#[command(after_help = "Example:
  thinline man --out /usr/local/share/man/man1")]
pub struct ManArgs {
    /// The directory (made if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

/// roff text: backslashes and leading dots or quotes escaped.
fn roff_line(text: &str) -> String {
    let t = text.replace('\\', "\\\\");
    if t.starts_with('.') || t.starts_with('\'') {
        format!("\\&{t}")
    } else {
        t
    }
}

fn exit_codes(out: &mut String) {
    for code in Code::ALL {
        out.push_str(&format!(
            ".TP\n\\fB{}\\fR {}\n{}\n",
            code.exit_status(),
            code.as_str(),
            roff_line(code.meaning())
        ));
    }
}

/// The output contract of the agent's commands.
fn agent_section() -> String {
    let mut s = String::from(".SH OUTPUT\n");
    s.push_str(
        "With \\fB--json\\fR the command prints exactly one JSON object on stdout (list commands: an object with an array). \
         An SR carries uuid, name_label, type, path, total_space, free_space, physical_utilisation, vdi_count, health and daemon; \
         a VDI carries uuid, name_label, type (template, disk, snapshot), sr, virtual_size, physical_utilisation, read_only, \
         is_template, parent, uri (without credentials), format, file and attached. \
         A failure prints {\"error\": {\"code\": CODE, \"message\": TEXT}} on stdout with \\fB--json\\fR, \
         and \"thinline: error: TEXT (CODE)\" on stderr without it.\n",
    );
    s.push_str(".SH EXIT STATUS\n0 on success; otherwise the status of the error code:\n");
    exit_codes(&mut s);
    s.push_str(".PP\n\\fBsr check\\fR exits 3 when it finds problems it did not repair.\n");
    s
}

/// Every exit status of `thinline`.
fn root_section() -> String {
    let mut s = String::from(".SH EXIT STATUS\n");
    s.push_str(
        "0 on success (a clean shutdown on SIGTERM or SIGINT included); 1 on a runtime failure \
         (an image cannot be opened or is refused, a socket cannot be bound); 2 on invalid usage. \
         \\fBimage check\\fR exits 3 when it finds only warnings and 4 when it finds errors; \
         \\fBproxy scrub\\fR exits 4 when chunks do not match their checksums; \\fBsr check\\fR exits 3 \
         when problems remain. The \\fBsr\\fR, \\fBvdi\\fR and \\fBquickstart\\fR commands exit with \
         the status of their error code:\n",
    );
    exit_codes(&mut s);
    s
}

/// Runs `thinline man`.
pub fn run(args: ManArgs) -> anyhow::Result<u8> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    clap_mangen::generate_to(crate::Cli::command(), &args.out)
        .with_context(|| format!("cannot write man pages into {}", args.out.display()))?;
    let mut pages = Vec::new();
    for entry in std::fs::read_dir(&args.out)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
            continue;
        };
        if !name.starts_with("thinline") || !name.ends_with(".1") {
            continue;
        }
        let extra = if name == "thinline.1" {
            Some(root_section())
        } else if name.starts_with("thinline-sr")
            || name.starts_with("thinline-vdi")
            || name.starts_with("thinline-task")
            || name == "thinline-quickstart.1"
        {
            Some(agent_section())
        } else {
            None
        };
        // clap_mangen puts the `after_help` text under EXTRA: ours are examples.
        let mut page = std::fs::read_to_string(&path)?.replace(".SH EXTRA\n", ".SH EXAMPLES\n");
        page.push_str(extra.as_deref().unwrap_or(""));
        std::fs::write(&path, page)?;
        pages.push(name);
    }
    pages.sort();
    println!(
        "wrote {} man pages into {}",
        pages.len(),
        args.out.display()
    );
    Ok(0)
}
