//! `thinline task …`: long operations of an SR (preallocations) as tasks: list them,
//! cancel one from another shell.

use clap::{Args, Subcommand};
use thinline_sr::{registry, task};

use crate::agent::{OnSr, finish};

/// Long operations (preallocations): list them, cancel one.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  thinline task list --sr /srv/thinline/sr1
  thinline task cancel --sr /srv/thinline/sr1 3f0c9a1e22b4")]
pub struct TaskArgs {
    #[command(subcommand)]
    command: TaskCommand,
}

#[derive(Debug, Subcommand)]
enum TaskCommand {
    /// List the SR's tasks: id, operation, progress, whether its process still runs.
    #[command(after_help = "Example:\n  thinline task list --sr /srv/thinline/sr1 --json")]
    List(OnSr),
    Cancel(CancelArgs),
}

/// Ask a task to stop: it undoes what it made and exits with CANCELLED.
#[derive(Debug, Args)]
#[command(after_help = "Example:
  thinline task cancel --sr /srv/thinline/sr1 3f0c9a1e22b4")]
struct CancelArgs {
    #[command(flatten)]
    on: OnSr,
    /// The task's id (see `task list`).
    id: String,
}

/// Runs `thinline task …`; returns the exit status.
pub fn run(args: TaskArgs) -> anyhow::Result<u8> {
    match args.command {
        TaskCommand::List(on) => {
            let result = registry::resolve(&on.sr)
                .and_then(|p| task::list(&p))
                .map(|tasks| serde_json::json!({ "tasks": tasks }));
            finish(result, on.json, |v, out| {
                writeln!(
                    out,
                    "{:<12}  {:>8}  {:<8}  OPERATION",
                    "ID", "PROGRESS", "STATE"
                )?;
                for t in v["tasks"].as_array().into_iter().flatten() {
                    writeln!(
                        out,
                        "{:<12}  {:>7.1}%  {:<8}  {}",
                        t["id"].as_str().unwrap_or("?"),
                        t["progress"].as_f64().unwrap_or(0.0) * 100.0,
                        if t["running"] == true {
                            "running"
                        } else {
                            "gone"
                        },
                        t["operation"].as_str().unwrap_or("?")
                    )?;
                }
                Ok(())
            })
        }
        TaskCommand::Cancel(a) => {
            let result = registry::resolve(&a.on.sr).and_then(|p| task::cancel(&p, &a.id));
            finish(result, a.on.json, |t, out| {
                writeln!(out, "asked task {} ({}) to stop", t.id, t.operation)
            })
        }
    }
}
