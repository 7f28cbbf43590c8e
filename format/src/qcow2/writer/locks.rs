//! Per-cluster locks: each guest cluster being changed is locked on its own, so
//! writes to different clusters never wait for each other.

use std::collections::HashSet;
use std::sync::{Condvar, Mutex};

use crate::cache::Fetch;
use crate::{Error, Result};

/// Guest clusters being changed, each locked on its own.
#[derive(Debug, Default)]
pub(super) struct ClusterLocks {
    busy: Mutex<HashSet<u64>>,
    freed: Condvar,
}

pub(super) struct ClusterGuard<'a> {
    locks: &'a ClusterLocks,
    cluster: u64,
}

impl ClusterLocks {
    pub(super) fn lock(&self, cluster: u64) -> ClusterGuard<'_> {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        while !busy.insert(cluster) {
            busy = self.freed.wait(busy).unwrap_or_else(|e| e.into_inner());
        }
        ClusterGuard {
            locks: self,
            cluster,
        }
    }

    /// Locks `cluster`, waiting for another write that holds it only if `fetch`
    /// allows blocking; else [`Error::NotCached`].
    pub(super) fn lock_for(&self, cluster: u64, fetch: Fetch) -> Result<ClusterGuard<'_>> {
        if fetch == Fetch::Allowed {
            return Ok(self.lock(cluster));
        }
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        if !busy.insert(cluster) {
            return Err(Error::NotCached);
        }
        Ok(ClusterGuard {
            locks: self,
            cluster,
        })
    }
}

impl Drop for ClusterGuard<'_> {
    fn drop(&mut self) {
        let mut busy = self.locks.busy.lock().unwrap_or_else(|e| e.into_inner());
        busy.remove(&self.cluster);
        self.locks.freed.notify_all();
    }
}
