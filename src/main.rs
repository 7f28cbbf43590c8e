//! The `thinline` command line: argument parsing only; each subcommand lives in its
//! own module and calls library code.
//!
//! Exit codes: 0 success (including a clean shutdown on SIGTERM/SIGINT), 1 runtime
//! failure (an image cannot be opened or is refused, a socket cannot be bound, …), 2
//! invalid usage; `image check` adds 3 (only warnings found) and 4 (errors found).

mod image;
mod remote;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Serve VM disk templates (raw, qcow2, VHD, VMDK) over NBD, and inspect them.
#[derive(Debug, Parser)]
#[command(name = "thinline", version, about, propagate_version = true)]
struct Cli {
    /// More log output (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Serve(serve::ServeArgs),
    Image(image::ImageArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let result = match cli.command {
        Command::Serve(args) => serve::run(args).map(|()| 0),
        Command::Image(args) => image::run(args),
    };
    match result {
        Ok(status) => ExitCode::from(status),
        Err(e) => {
            eprintln!("thinline: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
