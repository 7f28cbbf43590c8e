//! The `thinline` command line: argument parsing only; each subcommand lives in its
//! own module and calls library code.
//!
//! Exit codes: 0 success (including a clean shutdown on SIGTERM/SIGINT), 1 runtime
//! failure (an image cannot be opened or is refused, a socket cannot be bound, …), 2
//! invalid usage; `image check` adds 3 (only warnings found) and 4 (errors found), and
//! `proxy scrub` 4 (chunks that do not match their checksums found). `sr` and `vdi`
//! exit with the status of their error code (`docs/sr-agent.md`: 10 `SR_NOT_FOUND`,
//! 11 `VDI_NOT_FOUND`, 12 `VDI_IS_TEMPLATE`, … 19 `CANCELLED`), and `sr check` 3 when it
//! finds problems.

mod agent;
mod cache;
mod completions;
mod image;
mod man;
mod metrics;
mod proxy;
mod quickstart;
mod remote;
mod serve;
mod size;
mod sr;
mod systemd;
mod task;
mod tls;
mod vdi;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Serve VM disk templates (raw, qcow2, VHD, VMDK) over NBD, inspect them, and keep thin
/// clones of them in storage repositories.
#[derive(Debug, Parser)]
#[command(name = "thinline", version, about, propagate_version = true)]
struct Cli {
    /// More log output (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Log lines on stderr as text, or as one JSON object each (for log collectors).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    Quickstart(quickstart::QuickstartArgs),
    Serve(serve::ServeArgs),
    Image(image::ImageArgs),
    Proxy(proxy::ProxyArgs),
    Sr(sr::SrArgs),
    Vdi(vdi::VdiArgs),
    Task(task::TaskArgs),
    #[command(hide = true)]
    Man(man::ManArgs),
    #[command(hide = true)]
    Completions(completions::CompletionsArgs),
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    let log_format = cli.log_format;
    init_logging(cli.verbose, log_format);
    let result = match cli.command {
        Command::Quickstart(args) => quickstart::run(args),
        Command::Serve(args) => serve::run(args).map(|()| 0),
        Command::Image(args) => image::run(args),
        Command::Proxy(args) => proxy::run(args),
        Command::Sr(args) => sr::run(args),
        Command::Vdi(args) => vdi::run(args),
        Command::Task(args) => task::run(args),
        Command::Man(args) => man::run(args),
        Command::Completions(args) => completions::run(args),
    };
    match result {
        Ok(status) => ExitCode::from(status),
        Err(e) => {
            match log_format {
                LogFormat::Text => eprintln!("thinline: error: {e:#}"),
                LogFormat::Json => tracing::error!(error = format!("{e:#}"), "thinline failed"),
            }
            ExitCode::from(1)
        }
    }
}

/// Writes a subcommand's report to stdout, flushed: one line of JSON with `json`,
/// otherwise the text `text` writes.
/// A usage error: as clap prints it, or with `--json` as the one JSON object the
/// command would print (`INVALID_ARGUMENT`, exit 2), so scripts parse every failure.
fn usage_error(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    let shown = matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    );
    if shown || !std::env::args().any(|a| a == "--json") {
        e.exit();
    }
    let text = e.to_string();
    let message = text.lines().next().unwrap_or("invalid usage");
    let message = message.strip_prefix("error: ").unwrap_or(message);
    let error = serde_json::json!({ "error": { "code": "INVALID_ARGUMENT", "message": message } });
    println!("{error}");
    ExitCode::from(2)
}

fn print_report(
    report: &impl serde::Serialize,
    json: bool,
    text: impl FnOnce(&mut std::io::StdoutLock<'static>) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer(&mut out, report)?;
        writeln!(out)?;
    } else {
        text(&mut out)?;
    }
    Ok(out.flush()?)
}

/// Fetch units and NBD payloads (up to 32 MiB) are allocated and freed all the time.
/// By default glibc maps and unmaps each large one and trims the heap eagerly, which
/// costs a page fault and a zeroed page per 4 KiB every time: keep them in the heap.
fn tune_allocator() {
    // SAFETY: mallopt only sets allocator tunables; it runs before any other thread
    // exists. Unknown parameters are ignored (return 0), never undefined behaviour.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
}

fn init_logging(verbose: u8, format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    // The AWS configuration chain logs every source it tries (instance metadata when no
    // region is set, …) as warnings; thinline reports what it needs in its own errors.
    let default = match verbose {
        0 => "info,aws_config=error",
        1 => "debug,aws_config=warn,aws_smithy_runtime=info,hyper_util=info",
        _ => "trace",
    };
    let from_env = EnvFilter::try_from_default_env().ok();
    let overridden = from_env.is_some();
    let mut filter = from_env.unwrap_or_else(|| EnvFilter::new(default));
    // The AWS SDK's debug and trace output names credentials (access key ids) and signed
    // requests: never more than info from it, whatever RUST_LOG says.
    let mut caps = vec![
        "aws_smithy_runtime=info",
        "aws_runtime=info",
        "aws_sdk_s3=info",
        "aws_sigv4=info",
    ];
    if overridden {
        caps.push("aws_config=info");
    }
    for directive in caps {
        filter = filter.add_directive(directive.parse().expect("a valid directive"));
    }
    use std::io::IsTerminal;
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        // One object per line: {"timestamp", "level", "fields": {"message", …}, "target",
        // "span", "spans"}.
        LogFormat::Json => logs.json().init(),
    }
}
