//! When a connection waits for its next request by polling instead of parking.
//!
//! At queue depth 1 a client sends its next request microseconds after it reads the
//! reply. Parking the thread in `epoll_wait` for those microseconds and being woken
//! again costs more than serving the request: on a virtual machine an idle vCPU halts,
//! and waking it goes through the host. So after a request that came alone (nothing
//! else of the connection in flight) the connection polls its read for a short budget
//! ([`spin_then_await`]), yielding between polls: to the runtime's other tasks (the
//! writer sending the reply among them), and to the client when it shares this CPU.
//! While it polls, its socket is asked directly ([`crate::socket::SocketReader`]), so a
//! poll sees bytes that arrived since the last one without waiting for the reactor.
//!
//! A client with several requests in flight keeps the connection busy without this, and
//! polling there would cost more than it saves (replies flushed one by one, or a CPU
//! taken from a client that is the bottleneck, as under TLS): a request that arrives
//! while others are in flight, or in a burst with others, turns it off until one comes
//! alone again. A spin that finds nothing is wasted CPU, so each one that comes back
//! empty doubles the number of requests served before the next spin is tried (up to
//! [`MAX_SKIP`]): an idle or slow client costs a few spins, then almost none.

use std::cell::Cell;
use std::future::Future;
use std::task::Poll;
use std::time::{Duration, Instant};

/// The longest a connection skips spinning after spins that came back empty.
const MAX_SKIP: u32 = 1024;

/// One connection's spin policy.
#[derive(Debug)]
pub(crate) struct SpinPolicy {
    budget: Duration,
    /// Requests left to serve without spinning.
    skip: u32,
    /// The skip after the next empty spin.
    penalty: u32,
    /// Whether the last request came alone.
    alone: bool,
    /// Requests read since the connection last waited for one.
    burst: u32,
}

impl SpinPolicy {
    /// Spins of at most `budget`; a zero budget never spins.
    pub(crate) fn new(budget: Duration) -> Self {
        Self {
            budget,
            skip: 0,
            penalty: 1,
            alone: false,
            burst: 0,
        }
    }

    /// Records whether the request just read came alone, with nothing else in flight.
    pub(crate) fn arrived(&mut self, alone: bool) {
        self.alone = alone;
        self.burst = self.burst.saturating_add(1);
    }

    /// The budget of the spin before waiting for the next request, if it should spin at
    /// all: only when the one request read since the last wait came alone. A client that
    /// keeps several requests in flight sends them in bursts, even when the server drains
    /// them faster than it sends.
    pub(crate) fn next(&mut self) -> Option<Duration> {
        let burst = std::mem::take(&mut self.burst);
        if self.budget.is_zero() || !self.alone || burst != 1 {
            return None;
        }
        if self.skip > 0 {
            self.skip -= 1;
            return None;
        }
        Some(self.budget)
    }

    /// Records what the spin found.
    pub(crate) fn found(&mut self, arrived: bool) {
        if arrived {
            self.penalty = 1;
        } else {
            self.skip = self.penalty;
            self.penalty = (self.penalty * 2).min(MAX_SKIP);
        }
    }
}

thread_local! {
    static SPINNING: Cell<bool> = const { Cell::new(false) };
}

/// Whether this thread is polling a spin's read right now: when
/// [`crate::socket::SocketReader`] asks its socket directly. Outside spins it leaves reads
/// to the reactor, which costs one system call fewer per wait.
pub(crate) fn spinning() -> bool {
    SPINNING.with(Cell::get)
}

/// Marks this thread as spinning until dropped (also when a poll panics).
struct Spinning;

impl Spinning {
    fn begin() -> Self {
        SPINNING.with(|s| s.set(true));
        Spinning
    }
}

impl Drop for Spinning {
    fn drop(&mut self) {
        SPINNING.with(|s| s.set(false));
    }
}

/// Polls `future` until it is ready or `budget` has passed, yielding between polls, then
/// awaits it in the ordinary way. The output, and whether it came within the budget.
pub(crate) async fn spin_then_await<F: Future>(future: F, budget: Duration) -> (F::Output, bool) {
    let mut future = std::pin::pin!(future);
    let started = Instant::now();
    // Whatever this task woke runs first (the writer with the last reply).
    tokio::task::yield_now().await;
    loop {
        let polled = std::future::poll_fn(|cx| {
            let poll = {
                let _spinning = Spinning::begin();
                future.as_mut().poll(cx)
            };
            Poll::Ready(match poll {
                Poll::Ready(out) => Some(out),
                Poll::Pending => None,
            })
        })
        .await;
        if let Some(out) = polled {
            return (out, true);
        }
        if started.elapsed() >= budget {
            return (future.await, false);
        }
        // The client, if it shares this CPU, then the runtime's other tasks.
        std::thread::yield_now();
        tokio::task::yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zero_budget_never_spins() {
        let mut p = SpinPolicy::new(Duration::ZERO);
        assert!((0..100).all(|_| {
            p.arrived(true);
            p.next().is_none()
        }));
    }

    #[test]
    fn only_a_request_that_came_alone_and_by_itself_is_followed_by_a_spin() {
        let budget = Duration::from_micros(30);
        let mut p = SpinPolicy::new(budget);
        assert_eq!(p.next(), None, "before any request");
        p.arrived(true);
        assert_eq!(p.next(), Some(budget));
        p.found(true);
        p.arrived(false);
        assert_eq!(p.next(), None, "others were in flight: pipelining");
        p.arrived(true);
        p.arrived(true);
        assert_eq!(
            p.next(),
            None,
            "two requests read since the last wait: a burst"
        );
        assert_eq!(p.next(), None, "no request since the last wait");
        p.arrived(true);
        assert_eq!(p.next(), Some(budget));
    }

    #[test]
    fn empty_spins_back_off_exponentially_up_to_the_cap_and_a_hit_resets_it() {
        let budget = Duration::from_micros(30);
        let mut p = SpinPolicy::new(budget);
        // Every wait follows one request that came alone.
        let next = |p: &mut SpinPolicy| {
            p.arrived(true);
            p.next()
        };
        let mut skips = Vec::new();
        assert_eq!(next(&mut p), Some(budget));
        for _ in 0..13 {
            p.found(false);
            let mut skipped = 0;
            while next(&mut p).is_none() {
                skipped += 1;
            }
            skips.push(skipped);
        }
        assert_eq!(
            skips,
            [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 1024, 1024]
        );
        p.found(true);
        assert_eq!(next(&mut p), Some(budget), "a hit: the next wait spins");
        p.found(false);
        assert_eq!(
            next(&mut p),
            None,
            "one skip after a miss that followed a hit"
        );
        assert_eq!(next(&mut p), Some(budget));
    }

    #[tokio::test]
    async fn a_spin_returns_what_arrives_within_the_budget_and_then_waits_in_the_ordinary_way() {
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let sender = tokio::spawn(async move {
            tokio::task::yield_now().await;
            tx.send(7).unwrap();
        });
        let (got, arrived) = spin_then_await(rx, Duration::from_secs(10)).await;
        assert_eq!((got.unwrap(), arrived), (7, true), "sent while spinning");
        sender.await.unwrap();

        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            tx.send(8).unwrap();
        });
        let (got, arrived) = spin_then_await(rx, Duration::from_micros(100)).await;
        assert_eq!((got.unwrap(), arrived), (8, false), "sent after the budget");
        late.await.unwrap();
    }
}
