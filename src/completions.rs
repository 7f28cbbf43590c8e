//! `thinline completions SHELL`: the shell completion script, generated from the clap
//! definitions that `--help` prints (for packaging: the Debian package installs the
//! bash, zsh and fish ones).

use clap::{Args, CommandFactory};
use clap_complete::Shell;

/// Print the completion script of a shell on stdout.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  thinline completions bash > /usr/share/bash-completion/completions/thinline
  thinline completions zsh > /usr/share/zsh/vendor-completions/_thinline
  thinline completions fish > /usr/share/fish/vendor_completions.d/thinline.fish")]
pub struct CompletionsArgs {
    /// bash, zsh, fish, elvish or powershell.
    shell: Shell,
}

pub fn run(args: CompletionsArgs) -> anyhow::Result<u8> {
    use std::io::Write;
    let mut command = crate::Cli::command();
    // Generated in memory: a closed stdout is an error here, not a panic in clap_complete.
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut command, "thinline", &mut script);
    let mut out = std::io::stdout().lock();
    out.write_all(&script)?;
    out.flush()?;
    Ok(0)
}
