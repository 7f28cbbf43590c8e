//! An io_uring engine for the raw export's slow path: reads that miss the page cache,
//! writes that would block, FUA writes and flushes. The thread pool hands each of those
//! to a blocking thread and back; here the request task submits the operation itself
//! and sleeps until the kernel completes it.
//!
//! ```text
//!   request task (any worker)                     reaper task (one per engine)
//!   ─────────────────────────                     ────────────────────────────
//!   acquire a depth permit                        await the ring fd readable (AsyncFd)
//!   lock: slot ◄─ buffer, file, sender            clear readiness, then drain the CQ:
//!         SQ   ◄─ SQE (user_data = slot)            lock: take the slot, free it
//!   unlock; io_uring_enter(submit)                  return the permit
//!   await the oneshot  ◄──────────────────────────  send (result, buffer)
//! ```
//!
//! Ownership is the rule that makes this sound: the buffer an SQE points at, and the file
//! its fd names, live in the engine's slot table from before the SQE is pushed until the
//! reaper has taken its CQE off the ring. A request future that is dropped early only
//! drops its receiver; the slot (and the memory the kernel writes to) stays until the
//! completion arrives. The permit taken before pushing is returned by the reaper, not by
//! the future, so at most `depth` operations are ever in the kernel: the SQ (`depth`
//! entries) can never be full when we push, and the CQ (`2 * depth` entries) can never
//! overflow.
//!
//! The reaper is spawned on first use in the runtime of the caller, so an engine can be
//! created before any runtime exists (as `thinline serve` does). An engine is meant to be
//! used from one runtime at a time: if that runtime shuts down the reaper goes with it,
//! and the next submission starts a new one.
//!
//! When the engine is dropped, the reaper cancels whatever is still in flight, reaps it
//! and exits, and the ring closes after that. If the reaper is gone too (its runtime shut
//! down), the ring's own `Drop` cancels and waits for the stragglers, blocking; if even
//! that fails it leaks their buffers rather than free memory the kernel may still write.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::{Bytes, BytesMut};
use io_uring::{IoUring, Probe, opcode, squeue, types};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::{Notify, Semaphore, oneshot};
use tracing::{debug, warn};

/// Operations in flight per engine (the SQ size; the CQ is twice that).
pub(crate) const DEFAULT_DEPTH: u32 = 256;

/// Largest length put in one SQE; the kernel caps a read or write at `MAX_RW_COUNT`
/// (2 GiB minus a page) anyway, and longer requests loop like short transfers.
const MAX_CHUNK: usize = 1 << 30;

/// `user_data` of cancellation SQEs; slot indices are always smaller.
const CANCEL_USER_DATA: u64 = u64::MAX;

/// Opcodes the engine uses; a kernel missing one of them (before 5.6) is not used.
const REQUIRED_OPCODES: [(u8, &str); 4] = [
    (opcode::Read::CODE, "IORING_OP_READ"),
    (opcode::Write::CODE, "IORING_OP_WRITE"),
    (opcode::Fsync::CODE, "IORING_OP_FSYNC"),
    (opcode::AsyncCancel::CODE, "IORING_OP_ASYNC_CANCEL"),
];

/// Why io_uring cannot be used here (the system error is the source).
#[derive(Debug, thiserror::Error)]
#[error("the io-uring I/O engine is unavailable")]
pub(crate) struct Unavailable {
    #[source]
    source: io::Error,
}

impl Unavailable {
    /// The system error behind it.
    pub(crate) fn cause(&self) -> &io::Error {
        &self.source
    }

    /// As an `io::Error` of the same kind, keeping the chain.
    pub(crate) fn into_io(self) -> io::Error {
        io::Error::new(self.source.kind(), self)
    }
}

/// An io_uring instance serving positional reads, writes and `fdatasync` to any tokio
/// task. Dropping it never frees memory the kernel may still use.
pub(crate) struct IoUringEngine {
    inner: Arc<Inner>,
}

/// The memory an operation owns until its completion is reaped.
enum Buffer {
    /// No memory (fsync).
    None,
    /// The destination of a read.
    Read(BytesMut),
    /// The source of a write.
    Write(Bytes),
}

/// One operation in flight. Dropping it is safe only once its CQE has been reaped.
struct Slot {
    buf: Buffer,
    /// Keeps the fd number in the SQE naming this file until the kernel is done (an SQE
    /// that waits in the SQ resolves its fd only when submitted).
    _file: Arc<File>,
    done: oneshot::Sender<Completion>,
}

/// What the reaper hands back: the CQE's result and the operation's memory.
struct Completion {
    res: i32,
    buf: Buffer,
}

struct State {
    /// `depth` slots; an SQE's `user_data` is its slot index.
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// A reaper task is running (cleared by the task itself when it ends or is dropped).
    reaper: bool,
    /// Lent out (mutably) to every view of the SQ or CQ, so that one exists at a time.
    queues: Queues,
}

/// Proof of exclusive access to the ring's queues; see `Ring::sq` and `Ring::cq`.
struct Queues;

impl State {
    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

struct Inner {
    ring: Ring,
    /// Guards the slot table, and every SQ and CQ view of the ring: views are created
    /// only through `sq`/`cq`, which borrow `State::queues` mutably.
    state: Mutex<State>,
    /// One permit per free slot; taken before pushing, returned by the reaper.
    permits: Semaphore,
    /// Wakes the reaper: on close, or when a submission must be retried.
    wake: Notify,
    /// The `IoUringEngine` handle is gone; the reaper drains and exits.
    closed: AtomicBool,
    /// `io_uring_enter` failed unexpectedly; no further submissions.
    broken: AtomicBool,
}

impl IoUringEngine {
    /// Sets up a ring of `depth` entries (rounded up to a power of two by the kernel) and
    /// checks that it supports the operations used.
    pub(crate) fn new(depth: u32) -> Result<Self, Unavailable> {
        let ring = IoUring::builder()
            .dontfork()
            .build(depth)
            .map_err(|source| Unavailable { source })?;
        let mut probe = Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(|source| Unavailable { source })?;
        if let Some((_, name)) = REQUIRED_OPCODES
            .iter()
            .find(|(code, _)| !probe.is_supported(*code))
        {
            return Err(Unavailable {
                source: io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("the kernel does not support {name}"),
                ),
            });
        }
        let params = ring.params();
        let depth = params.sq_entries() as usize;
        if (params.cq_entries() as usize) < depth {
            return Err(Unavailable {
                source: io::Error::new(
                    io::ErrorKind::Unsupported,
                    "the completion queue is smaller than the submission queue",
                ),
            });
        }
        Ok(IoUringEngine {
            inner: Arc::new(Inner {
                ring: Ring(ring),
                state: Mutex::new(State {
                    slots: (0..depth).map(|_| None).collect(),
                    free: (0..depth).rev().collect(),
                    reaper: false,
                    queues: Queues,
                }),
                permits: Semaphore::new(depth),
                wake: Notify::new(),
                closed: AtomicBool::new(false),
                broken: AtomicBool::new(false),
            }),
        })
    }

    /// Reads exactly `buf.len()` bytes at `offset` into `buf`; `UnexpectedEof` if the file
    /// ends first.
    pub(crate) async fn read_exact_at(
        &self,
        file: &Arc<File>,
        buf: BytesMut,
        offset: u64,
    ) -> io::Result<BytesMut> {
        let len = buf.len();
        let mut buf = Buffer::Read(buf);
        let mut done = 0;
        while done < len {
            let at = offset + done as u64;
            let c = self
                .run(file, buf, |buf, fd| {
                    let Buffer::Read(buf) = buf else {
                        unreachable!("a read owns a read buffer")
                    };
                    let dst = &mut buf[done..];
                    opcode::Read::new(fd, dst.as_mut_ptr(), chunk_len(dst.len()))
                        .offset(at)
                        .build()
                })
                .await?;
            buf = c.buf;
            match c.res {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n if n > 0 => done += n as usize,
                e => retry_or_fail(-e).await?,
            }
        }
        let Buffer::Read(buf) = buf else {
            unreachable!("a read owns a read buffer")
        };
        Ok(buf)
    }

    /// Writes all of `data` at `offset`, each write with `RWF_DSYNC` if `dsync` (durable,
    /// with the metadata needed to read it back, when this returns).
    pub(crate) async fn write_all_at(
        &self,
        file: &Arc<File>,
        data: Bytes,
        offset: u64,
        dsync: bool,
    ) -> io::Result<()> {
        let len = data.len();
        let flags = if dsync { libc::RWF_DSYNC } else { 0 };
        let mut buf = Buffer::Write(data);
        let mut done = 0;
        while done < len {
            let at = offset + done as u64;
            let c = self
                .run(file, buf, |buf, fd| {
                    let Buffer::Write(data) = buf else {
                        unreachable!("a write owns a write buffer")
                    };
                    let src = &data[done..];
                    opcode::Write::new(fd, src.as_ptr(), chunk_len(src.len()))
                        .offset(at)
                        .rw_flags(flags)
                        .build()
                })
                .await?;
            buf = c.buf;
            match c.res {
                0 => return Err(io::ErrorKind::WriteZero.into()),
                n if n > 0 => done += n as usize,
                e => retry_or_fail(-e).await?,
            }
        }
        Ok(())
    }

    /// `fdatasync(2)` of `file`.
    pub(crate) async fn fdatasync(&self, file: &Arc<File>) -> io::Result<()> {
        loop {
            let c = self
                .run(file, Buffer::None, |_, fd| {
                    opcode::Fsync::new(fd)
                        .flags(types::FsyncFlags::DATASYNC)
                        .build()
                })
                .await?;
            if c.res >= 0 {
                return Ok(());
            }
            retry_or_fail(-c.res).await?;
        }
    }

    /// Runs one operation: `prep` builds its SQE from the buffer where the slot table
    /// keeps it. Returns the raw CQE result with the buffer.
    async fn run(
        &self,
        file: &Arc<File>,
        buf: Buffer,
        prep: impl FnOnce(&mut Buffer, types::Fd) -> squeue::Entry,
    ) -> io::Result<Completion> {
        let inner = &self.inner;
        inner.check_usable()?;
        let permit = inner
            .permits
            .acquire()
            .await
            .map_err(|_| io::Error::other("the io_uring engine is closed"))?;
        let done = inner.push(file, buf, prep)?;
        // The slot now holds the permit's place; the reaper returns it with the CQE, so
        // dropping this future from here on cannot let more than `depth` ops in flight.
        permit.forget();
        inner.submit()?;
        done.await
            .map_err(|_| io::Error::other("the io_uring engine dropped an operation"))
    }

    #[cfg(test)]
    fn in_flight(&self) -> usize {
        self.inner.lock().in_flight()
    }

    #[cfg(test)]
    fn downgrade(&self) -> std::sync::Weak<Inner> {
        Arc::downgrade(&self.inner)
    }
}

impl fmt::Debug for IoUringEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoUringEngine")
            .field("fd", &self.inner.ring.as_raw_fd())
            .field("depth", &self.inner.ring.params().sq_entries())
            .finish_non_exhaustive()
    }
}

impl Drop for IoUringEngine {
    fn drop(&mut self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.wake.notify_one();
    }
}

/// `Ok` (after yielding for `EAGAIN`) if an operation that failed with `errno` should
/// simply be submitted again.
async fn retry_or_fail(errno: i32) -> io::Result<()> {
    match errno {
        libc::EINTR => Ok(()),
        libc::EAGAIN => {
            tokio::task::yield_now().await;
            Ok(())
        }
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

fn chunk_len(len: usize) -> u32 {
    // MAX_CHUNK fits in a u32, so the conversion cannot fail.
    u32::try_from(len.min(MAX_CHUNK)).unwrap_or(u32::MAX)
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while the lock is held except on a broken invariant; the table
        // stays consistent either way, and refusing to reap would strand buffers.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn check_usable(&self) -> io::Result<()> {
        if self.broken.load(Ordering::Acquire) {
            Err(io::Error::other(
                "the io_uring engine stopped after an io_uring_enter failure",
            ))
        } else {
            Ok(())
        }
    }

    /// Puts the operation in a free slot and its SQE in the SQ (not yet submitted).
    fn push(
        self: &Arc<Self>,
        file: &Arc<File>,
        buf: Buffer,
        prep: impl FnOnce(&mut Buffer, types::Fd) -> squeue::Entry,
    ) -> io::Result<oneshot::Receiver<Completion>> {
        // Declared before the guard so that, on an early return, it drops after the lock
        // is released (dropping a `Reaper` takes the lock).
        let mut reaper = None;
        let mut state = self.lock();
        if !state.reaper {
            reaper = Some(self.new_reaper(&mut state)?);
        }
        // A free slot exists: the caller holds a permit, and permits never outnumber
        // free slots (the reaper frees the slot before returning its permit).
        let index = state
            .free
            .pop()
            .ok_or_else(|| io::Error::other("io_uring slot table full"))?;
        let (done, receiver) = oneshot::channel();
        let slot = state.slots[index].insert(Slot {
            buf,
            _file: Arc::clone(file),
            done,
        });
        let entry = prep(&mut slot.buf, types::Fd(file.as_raw_fd())).user_data(index as u64);
        let mut sq = self.ring.sq(&mut state.queues);
        // SAFETY: the SQE points into `slots[index].buf` (the heap memory of a BytesMut
        // or Bytes, which stays put while the slot owns it) and names the fd of the file
        // `slots[index]._file` keeps open. That slot is cleared only by `complete_ready`
        // after the CQE with `user_data == index` has been taken off the ring, i.e. after
        // the kernel is done with both, or by `Drop for Inner`, which waits for that CQE
        // too or leaks the slot.
        let pushed = unsafe { sq.push(&entry) };
        // Publish the new tail before anyone calls io_uring_enter.
        sq.sync();
        drop(sq);
        if pushed.is_err() {
            // Cannot happen (at most `depth` ops, `depth` SQ entries); undo cleanly.
            let slot = state.slots[index].take();
            state.free.push(index);
            drop(state);
            drop(slot);
            return Err(io::Error::other("io_uring submission queue full"));
        }
        drop(state);
        // Spawned without the lock: a runtime that is shutting down drops the task at
        // once, and dropping a `Reaper` takes the lock.
        if let Some((runtime, reaper)) = reaper {
            runtime.spawn(reaper.run());
        }
        Ok(receiver)
    }

    /// Submits whatever is in the SQ. `EAGAIN`/`EBUSY` leave the SQEs queued for the
    /// reaper to submit; any other failure stops the engine.
    fn submit(&self) -> io::Result<()> {
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    Some(libc::EAGAIN | libc::EBUSY) => {
                        self.wake.notify_one();
                        return Ok(());
                    }
                    _ => {
                        warn!(error = %e, "io_uring_enter failed; the io_uring engine stops");
                        self.broken.store(true, Ordering::Release);
                        self.wake.notify_one();
                        return Err(e);
                    }
                },
            }
        }
    }

    /// Registers the ring with the caller's runtime for a new reaper task, to be spawned
    /// there once the lock is released.
    fn new_reaper(
        self: &Arc<Self>,
        state: &mut State,
    ) -> io::Result<(tokio::runtime::Handle, Reaper)> {
        let runtime = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
        let inner = Arc::clone(self);
        let ring_fd = RingFd(inner.ring.as_raw_fd());
        // SAFETY: `register_with_interest` needs the fd to stay open, and to be the one
        // `as_raw_fd` returns, for the life of the `AsyncFd`. It is the ring's fd, which
        // closes only when the last `Arc<Inner>` goes; the `AsyncFd` is stored in the
        // `Reaper` next to `inner`, declared before it, so it is dropped (deregistered)
        // first. `RingFd` is a plain copy of the number and never changes.
        let fd = unsafe { AsyncFd::register_with_interest(ring_fd, Interest::READABLE) }?;
        state.reaper = true;
        Ok((runtime, Reaper { fd, inner }))
    }

    /// Takes every available CQE off the ring, frees the slots, returns the permits, and
    /// sends each completion to its waiter (or drops its buffer if nobody waits).
    fn complete_ready(&self) {
        let done = {
            let mut state = self.lock();
            self.ring.take_completions(&mut state)
        };
        self.permits.add_permits(done.len());
        for (slot, res) in done {
            // A waiter that went away drops the buffer here, after the kernel is done.
            let _ = slot.done.send(Completion { res, buf: slot.buf });
        }
    }

    /// Submits SQEs left behind by `EAGAIN`/`EBUSY`, and flushes CQEs the kernel kept
    /// aside after a CQ overflow. True if the reaper should look again soon.
    fn flush(&self) -> bool {
        if self.broken.load(Ordering::Acquire) {
            return false;
        }
        let (pending, overflow) = {
            let mut state = self.lock();
            let sq = self.ring.sq(&mut state.queues);
            (!sq.is_empty(), sq.cq_overflow())
        };
        if !pending && !overflow {
            return false;
        }
        if overflow {
            warn!("io_uring completion queue overflowed; flushing");
        }
        // `submit` enters with GETEVENTS when the overflow flag is set, which moves the
        // kept-aside CQEs back into the ring.
        let _ = self.submit();
        true
    }
}

/// The ring, with the only ways to view its queues.
struct Ring(IoUring);

impl std::ops::Deref for Ring {
    type Target = IoUring;

    fn deref(&self) -> &IoUring {
        &self.0
    }
}

impl Ring {
    /// The submission queue. Borrowing the one `Queues` token mutably (through the lock
    /// guard, or `&mut self` in `Drop`) proves no other view exists while this one does.
    fn sq<'a>(&'a self, _token: &'a mut Queues) -> io_uring::SubmissionQueue<'a> {
        // SAFETY: `submission_shared` requires that no other `SubmissionQueue` of this
        // ring exists. Every one is created here, and each borrows the ring's single
        // `Queues` token mutably for its whole life.
        unsafe { self.0.submission_shared() }
    }

    /// The completion queue; exclusive for the same reason as `sq`.
    fn cq<'a>(&'a self, _token: &'a mut Queues) -> io_uring::CompletionQueue<'a> {
        // SAFETY: `completion_shared` requires that no other `CompletionQueue` of this
        // ring exists. Every one is created here while the `Queues` token is borrowed
        // mutably.
        unsafe { self.0.completion_shared() }
    }

    /// Drains the CQ into `(slot, result)` pairs and frees those slots.
    fn take_completions(&self, state: &mut State) -> Vec<(Slot, i32)> {
        let State {
            slots,
            free,
            queues,
            ..
        } = state;
        let mut done = Vec::new();
        let mut cq = self.cq(queues);
        loop {
            // Publishes the head (the CQEs taken so far are consumed) and sees new ones.
            cq.sync();
            if cq.is_empty() {
                break;
            }
            for cqe in &mut cq {
                let key = cqe.user_data();
                if key == CANCEL_USER_DATA {
                    continue;
                }
                let slot = usize::try_from(key)
                    .ok()
                    .and_then(|i| slots.get_mut(i))
                    .and_then(Option::take);
                match slot {
                    Some(slot) => {
                        free.push(key as usize);
                        done.push((slot, cqe.result()));
                    }
                    None => warn!(user_data = key, "io_uring completion for no operation"),
                }
            }
        }
        done
    }

    /// Asks the kernel to cancel every operation in flight (their CQEs still arrive,
    /// most with `-ECANCELED`).
    fn cancel_all(&self, state: &mut State) {
        let keys: Vec<u64> = state
            .slots
            .iter()
            .enumerate()
            .filter(|(_, slot)| slot.is_some())
            .map(|(i, _)| i as u64)
            .collect();
        for key in keys {
            let entry = opcode::AsyncCancel::new(key)
                .build()
                .user_data(CANCEL_USER_DATA);
            let mut queued = false;
            for _ in 0..2 {
                let mut sq = self.sq(&mut state.queues);
                // SAFETY: a cancellation SQE carries no pointer and no fd; it only names
                // another operation by its user_data.
                queued = unsafe { sq.push(&entry) }.is_ok();
                sq.sync();
                drop(sq);
                if queued {
                    break;
                }
                let _ = self.submit();
            }
            if !queued {
                break;
            }
        }
        let _ = self.submit();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let Inner {
            ring,
            state,
            broken,
            ..
        } = self;
        let state = state.get_mut().unwrap_or_else(PoisonError::into_inner);
        if state.in_flight() == 0 {
            return;
        }
        // The reaper is gone (its runtime shut down) with operations in flight: their
        // buffers must outlive the kernel's use of them. Cancel, then wait.
        debug!(
            in_flight = state.in_flight(),
            "io_uring engine dropped with operations in flight; cancelling"
        );
        if !broken.load(Ordering::Acquire) {
            ring.cancel_all(state);
            loop {
                drop(ring.take_completions(state));
                if state.in_flight() == 0 {
                    return;
                }
                match ring.submit_and_wait(1) {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                    Err(e) => {
                        warn!(error = %e, "cannot wait for io_uring operations");
                        break;
                    }
                }
            }
        }
        // The kernel may still write into these buffers after the ring is closed
        // (closing only starts cancellation): leak them on purpose.
        warn!(
            in_flight = state.in_flight(),
            "leaking the buffers of unfinished io_uring operations"
        );
        std::mem::forget(std::mem::take(&mut state.slots));
    }
}

/// The ring's fd, for `AsyncFd` (which must not own it: the ring closes it).
struct RingFd(RawFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// The reaper task's state. Field order is drop order: the fd is deregistered from the
/// reactor while `inner` still keeps the ring open.
struct Reaper {
    fd: AsyncFd<RingFd>,
    inner: Arc<Inner>,
}

impl Reaper {
    async fn run(self) {
        let mut cancelled = false;
        loop {
            self.inner.complete_ready();
            let again = self.inner.flush();
            if self.inner.closed.load(Ordering::Acquire) {
                let mut state = self.inner.lock();
                if state.in_flight() == 0 {
                    break;
                }
                if !cancelled {
                    // Nobody waits for these any more; do not keep the ring for them.
                    self.inner.ring.cancel_all(&mut state);
                    cancelled = true;
                }
            }
            if again {
                tokio::task::yield_now().await;
                continue;
            }
            tokio::select! {
                ready = self.fd.readable() => match ready {
                    // Clear first, then drain (next iteration): a CQE posted after the
                    // drain makes the fd readable again, so none is missed.
                    Ok(mut guard) => guard.clear_ready(),
                    Err(e) => {
                        warn!(error = %e, "io_uring reaper cannot poll the ring");
                        break;
                    }
                },
                () = self.inner.wake.notified() => {}
            }
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        // Runs when the task ends or its runtime drops it; the next submission starts
        // another reaper.
        self.inner.lock().reaper = false;
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;
    use std::os::unix::fs::FileExt;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    use super::*;

    /// Returns an engine of `depth` entries, or skips the test when io_uring is
    /// unavailable here.
    macro_rules! require_io_uring {
        ($depth:expr) => {
            match IoUringEngine::new($depth) {
                Ok(engine) => engine,
                Err(e) => {
                    eprintln!("skipping: {e}: {}", e.source);
                    return;
                }
            }
        };
    }

    fn temp_file(len: u64) -> (tempfile::NamedTempFile, Arc<File>) {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(len).unwrap();
        let file = Arc::new(f.reopen().unwrap());
        (f, file)
    }

    /// One end of a socket pair as a `File`: reads on it wait until the other end writes,
    /// which keeps an operation in flight for as long as a test needs.
    fn stalled_reader() -> (Arc<File>, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Arc::new(File::from(OwnedFd::from(a))), b)
    }

    async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
        for _ in 0..5000 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("timed out waiting until {what}");
    }

    #[tokio::test]
    async fn written_bytes_read_back_after_fdatasync() {
        let engine = require_io_uring!(8);
        let (_tmp, file) = temp_file(1 << 20);
        let data = Bytes::from((0..65536u32).map(|i| i as u8).collect::<Vec<u8>>());

        engine
            .write_all_at(&file, data.clone(), 4096, false)
            .await
            .unwrap();
        engine.fdatasync(&file).await.unwrap();
        let back = engine
            .read_exact_at(&file, BytesMut::zeroed(65536), 4096)
            .await
            .unwrap();

        assert_eq!(back, data);
    }

    #[tokio::test]
    async fn dsync_write_is_visible_through_the_file() {
        let engine = require_io_uring!(8);
        let (_tmp, file) = temp_file(8192);

        engine
            .write_all_at(&file, Bytes::from_static(b"durable"), 100, true)
            .await
            .unwrap();

        let mut buf = [0u8; 7];
        file.read_exact_at(&mut buf, 100).unwrap();
        assert_eq!(&buf, b"durable");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_concurrent_ops_beyond_the_depth_all_complete() {
        // 512 operations through 4 slots: most wait for a permit, every one completes.
        let engine = Arc::new(require_io_uring!(4));
        let (_tmp, file) = temp_file(512 * 4096);
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..512u64 {
            let (engine, file) = (Arc::clone(&engine), Arc::clone(&file));
            tasks.spawn(async move {
                let block = Bytes::from(vec![i as u8; 4096]);
                engine
                    .write_all_at(&file, block.clone(), i * 4096, false)
                    .await
                    .unwrap();
                let back = engine
                    .read_exact_at(&file, BytesMut::zeroed(4096), i * 4096)
                    .await
                    .unwrap();
                assert_eq!(back, block, "block {i}");
            });
        }

        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }

        assert_eq!(engine.in_flight(), 0);
    }

    #[tokio::test]
    async fn reading_past_the_end_of_a_short_file_is_unexpected_eof() {
        let engine = require_io_uring!(8);
        let (_tmp, file) = temp_file(1000);

        let err = engine
            .read_exact_at(&file, BytesMut::zeroed(4096), 0)
            .await
            .unwrap_err();

        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn dropping_a_read_in_flight_keeps_its_slot_until_the_kernel_completes_it() {
        let engine = require_io_uring!(8);
        let (reader, mut writer) = stalled_reader();
        let read = engine.read_exact_at(&reader, BytesMut::zeroed(4096), 0);
        let timed_out = tokio::time::timeout(Duration::from_millis(20), read).await;
        assert!(timed_out.is_err(), "the read cannot finish without data");
        assert_eq!(engine.in_flight(), 1, "the abandoned read is still owned");

        // The kernel now writes into the abandoned buffer; the reaper frees it after.
        std::io::Write::write_all(&mut writer, &[1; 4096]).unwrap();
        eventually("the abandoned read is reaped", || engine.in_flight() == 0).await;

        let (_tmp, file) = temp_file(4096);
        engine.fdatasync(&file).await.unwrap();
    }

    #[tokio::test]
    async fn dropping_the_engine_cancels_operations_in_flight_and_closes_the_ring() {
        let engine = require_io_uring!(8);
        let (reader, _writer) = stalled_reader();
        let read = engine.read_exact_at(&reader, BytesMut::zeroed(4096), 0);
        let _ = tokio::time::timeout(Duration::from_millis(20), read).await;
        let weak = engine.downgrade();

        drop(engine);

        eventually("the ring is released", || weak.upgrade().is_none()).await;
    }

    #[test]
    fn a_runtime_shut_down_with_operations_in_flight_waits_for_them_on_drop() {
        let engine = require_io_uring!(8);
        let (reader, _writer) = stalled_reader();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let read = engine.read_exact_at(&reader, BytesMut::zeroed(4096), 0);
            let _ = tokio::time::timeout(Duration::from_millis(20), read).await;
        });
        let weak = engine.downgrade();

        // The reaper never runs again: dropping the runtime drops it, and the ring's own
        // Drop must cancel and reap the read before the buffer goes.
        drop(engine);
        drop(runtime);

        assert!(weak.upgrade().is_none());
    }

    #[test]
    fn an_engine_outlives_the_runtime_that_started_its_reaper() {
        let engine = require_io_uring!(8);
        let (_tmp, file) = temp_file(4096);
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        };
        runtime().block_on(engine.fdatasync(&file)).unwrap();

        let back = runtime()
            .block_on(engine.read_exact_at(&file, BytesMut::zeroed(4096), 0))
            .unwrap();

        assert_eq!(back, vec![0u8; 4096]);
    }
}
