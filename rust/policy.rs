//! Per-operation execution policy the decorator (or `fn.options(...)`) sets: timeout, retries
//! with backoff, and a concurrency / rate limit. The Python layer validates every value
//! (`tokengate.policy.options`); this holds the validated result and the pure arithmetic
//! (backoff with jitter), so a token whose operation has no policy carries none
//! (`OpSpec::policy` is `None`) and pays one pointer test for all of it.

use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::permits::{LimitConf, Rate};

/// How a retry's delay is spread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Jitter {
    /// Uniform in [0, backoff] ("full jitter": retries of many tokens do not line up).
    Full,
    /// Exactly the exponential backoff.
    None,
}

/// A declared limit: applies per operation, or per value of the tag `limit_by`.
pub struct LimitDecl {
    pub conf: LimitConf,
    pub limit_by: Option<String>,
}

pub struct Policy {
    /// Seconds each attempt may take, from its submission (queue time included).
    pub timeout: Option<f64>,
    /// Attempts after the first one.
    pub retries: u32,
    pub backoff: f64,
    pub backoff_max: f64,
    pub jitter: Jitter,
    /// Exception classes that are retried (None: any `Exception`).
    pub retry_on: Option<Py<PyTuple>>,
    /// Whether a timed-out attempt is retried (`TokenTimeout` in `retry_on`).
    pub retry_timeouts: bool,
    /// Seconds from submission after which no new attempt starts.
    pub budget: Option<f64>,
    /// Called with the token when its retries are exhausted.
    pub on_exhausted: Option<Py<PyAny>>,
    pub limit: Option<LimitDecl>,
}

impl Policy {
    /// Whether two attempts of one token may be running at once (a timed-out attempt still
    /// runs while the next one starts): the worker then claims the right to store its
    /// outcome (`StateCell::begin_finishing`) before it does.
    pub fn overlapping_attempts(&self) -> bool {
        self.retry_timeouts && self.retries > 0 && self.timeout.is_some()
    }
}

/// The delay before retry number `attempt` (1 for the first retry): `base * 2^(attempt-1)`
/// capped at `max`, then spread by `jitter` with `unit` drawn uniformly from [0, 1).
pub fn backoff_delay(base: f64, max: f64, attempt: u32, jitter: Jitter, unit: f64) -> f64 {
    if base <= 0.0 {
        return 0.0;
    }
    let exp = attempt.saturating_sub(1).min(1023) as i32;
    let d = (base * 2f64.powi(exp)).min(max);
    match jitter {
        Jitter::Full => d * unit.clamp(0.0, 1.0),
        Jitter::None => d,
    }
}

/// A number in [0, 1) from a splitmix64 step of `seed` (the token id and the clock): cheap,
/// and different for every token and attempt, which is all jitter needs.
pub fn unit_from(seed: u64) -> f64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// A limit from its Python description (validated there).
pub fn limit_conf(
    max_concurrency: Option<usize>,
    rate: Option<f64>,
    burst: Option<u32>,
) -> Result<LimitConf, String> {
    let conf = LimitConf {
        per_key: max_concurrency,
        total: None,
        rate: rate.map(|per_second| Rate {
            per_second,
            burst: burst.unwrap_or(1),
        }),
    };
    conf.validate()?;
    Ok(conf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let d: Vec<f64> = (1..=6)
            .map(|a| backoff_delay(0.1, 1.0, a, Jitter::None, 0.5))
            .collect();
        assert_eq!(d, vec![0.1, 0.2, 0.4, 0.8, 1.0, 1.0]);
        assert_eq!(backoff_delay(0.0, 1.0, 3, Jitter::None, 0.5), 0.0);
        assert_eq!(backoff_delay(0.1, 5.0, u32::MAX, Jitter::None, 0.5), 5.0);
    }

    #[test]
    fn full_jitter_stays_within_the_backoff() {
        for seed in 0..1000u64 {
            let u = unit_from(seed);
            assert!((0.0..1.0).contains(&u));
            let d = backoff_delay(0.5, 4.0, 3, Jitter::Full, u);
            assert!((0.0..=2.0).contains(&d), "{d}");
        }
        let mean: f64 = (0..10_000u64).map(unit_from).sum::<f64>() / 10_000.0;
        assert!((mean - 0.5).abs() < 0.02, "uniform-ish: {mean}");
    }
}
