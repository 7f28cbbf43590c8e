//! Long operations as tasks (the SMAPIv3 Task model: an id, progress, cancel). A task
//! is a file `.thinline-sr/tasks/ID.json` that its process keeps up to date; `task
//! list` reads them (a task whose process is gone is reported as such), and `task
//! cancel ID` asks for cancellation with a marker file `ID.cancel`, which the task
//! checks between steps (Ctrl-C in its own terminal does the same). A cancelled or
//! failed task undoes what it made (through the SR's journal) and removes its files.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::store::{DIR, read_json, write_json};
use crate::{Code, Error, Result};

const TASKS: &str = "tasks";

/// What `task list` shows of a task.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TaskInfo {
    pub id: String,
    /// The operation (`vdi create --preallocate`).
    pub operation: String,
    /// What it works on (the new VDI's UUID).
    pub vdi: Option<Uuid>,
    /// From 0 to 1.
    pub progress: f64,
    pub pid: u32,
    /// Whether its process still runs (filled in by [`list`]).
    #[serde(default)]
    pub running: bool,
    /// Whether cancellation was asked for (filled in by [`list`]).
    #[serde(default)]
    pub cancel_requested: bool,
}

fn dir(sr: &Path) -> PathBuf {
    sr.join(DIR).join(TASKS)
}

/// A running task, owned by the process doing the work. Dropping it removes its files.
#[derive(Debug)]
pub struct Task {
    sr: PathBuf,
    info: TaskInfo,
    /// Set by Ctrl-C (or anything else in this process that wants it to stop).
    interrupted: Arc<AtomicBool>,
}

impl Task {
    /// Starts a task in the SR at `sr`; `interrupted` stops it too.
    pub fn start(
        sr: &Path,
        operation: &str,
        vdi: Option<Uuid>,
        interrupted: Arc<AtomicBool>,
    ) -> Result<Task> {
        let d = dir(sr);
        std::fs::create_dir_all(&d)
            .map_err(|e| Error::io(format!("cannot create {}", d.display()), &e))?;
        let task = Task {
            sr: sr.to_owned(),
            info: TaskInfo {
                id: Uuid::new_v4().simple().to_string()[..12].to_owned(),
                operation: operation.to_owned(),
                vdi,
                progress: 0.0,
                pid: std::process::id(),
                running: true,
                cancel_requested: false,
            },
            interrupted,
        };
        task.write()?;
        Ok(task)
    }

    pub fn id(&self) -> &str {
        &self.info.id
    }

    fn write(&self) -> Result<()> {
        write_json(
            &dir(&self.sr).join(format!("{}.json", self.info.id)),
            &self.info,
            0o644,
        )
    }

    /// Records the progress (0 to 1); fails with `CANCELLED` if cancellation was asked.
    pub fn progress(&mut self, done: f64) -> Result<()> {
        let done = done.clamp(0.0, 1.0);
        // The file changes once per percent, not once per step.
        if (done * 100.0).floor() != (self.info.progress * 100.0).floor() || done >= 1.0 {
            self.info.progress = done;
            self.write()?;
        }
        self.check()
    }

    /// Fails with `CANCELLED` if cancellation was asked for.
    pub fn check(&self) -> Result<()> {
        let marker = dir(&self.sr).join(format!("{}.cancel", self.info.id));
        if self.interrupted.load(Ordering::Relaxed) || marker.exists() {
            return Err(Error::new(
                Code::Cancelled,
                format!(
                    "task {} ({}) was cancelled; nothing it made is left",
                    self.info.id, self.info.operation
                ),
            ));
        }
        Ok(())
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        let d = dir(&self.sr);
        let _ = std::fs::remove_file(d.join(format!("{}.json", self.info.id)));
        let _ = std::fs::remove_file(d.join(format!("{}.cancel", self.info.id)));
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))
    })
}

/// The SR's tasks.
pub fn list(sr: &Path) -> Result<Vec<TaskInfo>> {
    let d = dir(sr);
    let Ok(entries) = std::fs::read_dir(&d) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let mut info: TaskInfo = read_json(&path)?;
        if info.id.is_empty() {
            continue;
        }
        info.running = alive(info.pid);
        info.cancel_requested = d.join(format!("{}.cancel", info.id)).exists();
        out.push(info);
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// Asks task `id` of the SR to stop.
pub fn cancel(sr: &Path, id: &str) -> Result<TaskInfo> {
    let Some(mut info) = list(sr)?.into_iter().find(|t| t.id == id) else {
        return Err(Error::new(
            Code::TaskNotFound,
            format!(
                "no task {id} in the SR at {} (see `task list`)",
                sr.display()
            ),
        ));
    };
    let marker = dir(sr).join(format!("{id}.cancel"));
    std::fs::write(&marker, b"")
        .map_err(|e| Error::io(format!("cannot write {}", marker.display()), &e))?;
    info.cancel_requested = true;
    Ok(info)
}
