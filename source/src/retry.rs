//! The one retry policy of remote reads and opens: exponential backoff with jitter.
//!
//! Opening a remote object ([`super::open`]), the fetch engine's range requests
//! ([`super::fetch::FetchEngine`]) and the copy-on-read proxy's NBD upstream all retry
//! transient failures. They share this module so they wait the same delays: retry
//! number `n` waits `min(base * 2^(n-1), max)`, times a jitter between half and all of
//! it so that many clients failing together do not retry together.

use std::future::Future;
use std::time::Duration;

use crate::{FetchError, RemoteConfig};

/// Exponential backoff: delays doubling from `base`, capped at `max`, with jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay before the first retry (before jitter).
    pub base: Duration,
    /// Longest delay (before jitter).
    pub max: Duration,
}

impl Backoff {
    /// The backoff of `config` ([`RemoteConfig::backoff_base`],
    /// [`RemoteConfig::backoff_max`]).
    pub fn from_config(config: &RemoteConfig) -> Self {
        Backoff {
            base: config.backoff_base,
            max: config.backoff_max,
        }
    }

    /// The delay before retry number `attempt` (1 = the first retry) without jitter:
    /// `min(base * 2^(attempt-1), max)`.
    pub fn nominal(&self, attempt: u32) -> Duration {
        self.base
            .saturating_mul(1 << attempt.saturating_sub(1).min(20))
            .min(self.max)
    }

    /// The delay before retry number `attempt` (1 = the first retry): the
    /// [`nominal`](Self::nominal) delay times a jitter between half and all of it.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.nominal(attempt).mul_f64(0.5 + 0.5 * jitter())
    }
}

/// Runs `attempt` (given the attempt number, from 1) up to `attempts` times while it
/// fails with a transient error ([`FetchError::is_transient`]), sleeping
/// [`Backoff::delay`] between attempts. `on_retry` is called with the error and the
/// number of the attempt that failed before each retry, to log it. The first success,
/// the first error that is not transient, or the last attempt's error is returned.
pub async fn run<T, F, Fut>(
    attempts: u32,
    backoff: &Backoff,
    mut attempt: F,
    mut on_retry: impl FnMut(&FetchError, u32),
) -> Result<T, FetchError>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, FetchError>>,
{
    let mut n = 1;
    loop {
        match attempt(n).await {
            Err(e) if e.is_transient() && n < attempts => {
                on_retry(&e, n);
                tokio::time::sleep(backoff.delay(n)).await;
                n += 1;
            }
            result => return result,
        }
    }
}

/// A number in `[0, 1)` that differs between calls and processes.
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FetchErrorKind;

    fn backoff() -> Backoff {
        Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(5),
        }
    }

    fn error(kind: FetchErrorKind) -> FetchError {
        FetchError::new(kind, "read", "mem://test", None, "test failure")
    }

    #[test]
    fn nominal_delays_double_from_the_base() {
        let b = backoff();
        assert_eq!(b.nominal(1), Duration::from_millis(100));
        assert_eq!(b.nominal(2), Duration::from_millis(200));
        assert_eq!(b.nominal(3), Duration::from_millis(400));
        assert_eq!(b.nominal(6), Duration::from_millis(3200));
    }

    #[test]
    fn nominal_delays_are_capped_at_the_maximum() {
        let b = backoff();
        assert_eq!(b.nominal(7), Duration::from_secs(5));
        assert_eq!(b.nominal(1000), Duration::from_secs(5));
        assert_eq!(b.nominal(u32::MAX), Duration::from_secs(5));
    }

    #[test]
    fn jittered_delays_stay_between_half_and_all_of_the_nominal_delay() {
        let b = backoff();
        for attempt in 1..12 {
            let nominal = b.nominal(attempt);
            for _ in 0..50 {
                let d = b.delay(attempt);
                assert!(d >= nominal / 2, "{d:?} < half of {nominal:?}");
                assert!(d <= nominal, "{d:?} > {nominal:?}");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn run_retries_transient_errors_until_the_attempts_run_out() {
        let mut retried = Vec::new();
        let mut calls = 0;
        let result: Result<(), _> = run(
            3,
            &backoff(),
            |_| {
                calls += 1;
                async { Err(error(FetchErrorKind::Transient)) }
            },
            |_, n| retried.push(n),
        )
        .await;
        assert!(result.is_err());
        assert_eq!(calls, 3);
        assert_eq!(retried, [1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn run_returns_the_first_success_and_never_retries_permanent_errors() {
        let ok = run(
            5,
            &backoff(),
            |n| async move {
                if n < 3 {
                    Err(error(FetchErrorKind::Transient))
                } else {
                    Ok(n)
                }
            },
            |_, _| {},
        )
        .await;
        assert_eq!(ok.unwrap(), 3);
        let mut calls = 0;
        let permanent: Result<(), _> = run(
            5,
            &backoff(),
            |_| {
                calls += 1;
                async { Err(error(FetchErrorKind::Permanent)) }
            },
            |_, _| panic!("a permanent error is not retried"),
        )
        .await;
        assert_eq!(permanent.unwrap_err().kind, FetchErrorKind::Permanent);
        assert_eq!(calls, 1);
    }
}
