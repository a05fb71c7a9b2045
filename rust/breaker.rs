//! Circuit breaker: one per operation, it refuses calls for a while once too many of them fail
//! or are slow, then lets a few probe calls through to decide whether to close again.
//!
//! States ([`BreakerState`]):
//! - `CLOSED`: every call is admitted. With [`BreakerConfig::auto`], results are judged over a
//!   sliding window ([`Window`]: the last N calls, or the calls of the last T ns) and it trips to
//!   `OPEN` when the failure rate or the slow-call rate reaches its threshold (once the window
//!   holds `min_calls` calls), or after `consecutive_failures` failures in a row.
//! - `OPEN`: every call is refused until `open_until`; the first admission after that moves it
//!   to `HALF_OPEN`. Each re-open after a failed probe multiplies the open duration by
//!   `open_backoff` (at most `open_max_ns`); closing brings it back to `open_ns`.
//! - `HALF_OPEN`: exactly `half_open_probes` calls are admitted as probes, the rest refused. A
//!   failed (or slow) probe re-opens it; once every probe succeeded it closes (fresh window).
//! - `FORCED_OPEN` (`block`): refuses everything until `unblock`.
//! - `DISABLED` (`disable`): admits everything, records nothing, never trips.
//!
//! Generations: the breaker's generation changes at every transition. A worker reads it when a
//! call starts ([`Breaker::generation`], or [`Ticket::gen`] from [`Breaker::admit`]) and passes it
//! to [`Breaker::record`]: a result of an older generation is ignored, so a call that started
//! before a transition never counts against the new state (nor does a probe of an earlier
//! half-open round).
//!
//! Layout and locking: one cache-padded `AtomicU64` word packs `gen << 32 | probes_left << 8 |
//! state`, so [`Breaker::admit`] reads state and generation with one load, and a half-open probe
//! is taken with one compare-and-swap on the same word: a probe counter that could be reset by a
//! new half-open round between a thread's load of the state and its decrement cannot hand a
//! stale admission a probe of the new round. `CLOSED` and `DISABLED` admissions are one atomic
//! load and nothing else. Everything else (window, consecutive count, open duration, history,
//! jitter generator) lives in one std `Mutex`, and every transition happens under it, so state,
//! generation, probe budget and `open_until` always change together; the only writer outside
//! the mutex is `admit` taking a probe. `record` takes the mutex unless the word already says
//! the result cannot count (an old generation, or `OPEN`/`FORCED_OPEN`/`DISABLED`); refusals
//! take it briefly to copy the last trip reason.
//!
//! Clock: every method that needs the time takes `now_ns` (any monotonic nanosecond clock,
//! the same for every call; TokenGate passes `crate::clock::now_ns()`), so tests never sleep.
//! Callers on several threads read the clock before they call, so calls may arrive slightly
//! out of order: under the mutex the breaker uses the largest `now_ns` it has seen.
//!
//! Probe contract: a probe ticket must end in exactly one [`Breaker::record`] (with
//! `probe: true`) or one [`Breaker::release_probe`]; a probe that does neither keeps its slot,
//! and with `half_open_probes` such leaks the breaker stays `HALF_OPEN` until an operator
//! button is pressed.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crossbeam_utils::CachePadded;

use crate::sync::lock;

/// Transitions [`Breaker::transitions`] keeps (the newest).
pub const HISTORY: usize = 64;

/// The largest count window ([`Window::Count`]); the window keeps one byte per call.
pub const MAX_COUNT_WINDOW: u32 = 1_000_000;

/// The largest `half_open_probes` (the probe budget has 24 bits of the state word).
pub const MAX_PROBES: u32 = (1 << 24) - 1;

/// Buckets of a [`Window::Time`] window (fewer for a window shorter than this many ns).
const TIME_BUCKETS: u64 = 10;

/// The `reason` of a transition made by an operator button.
const MANUAL: &str = "manual";

const STATE_MASK: u64 = 0xFF;
const PROBE_SHIFT: u32 = 8;
const PROBE_ONE: u64 = 1 << PROBE_SHIFT;
const PROBE_MASK: u64 = MAX_PROBES as u64;
const GEN_SHIFT: u32 = 32;

#[inline]
fn pack(gen: u32, probes: u32, state: BreakerState) -> u64 {
    (u64::from(gen) << GEN_SHIFT) | (u64::from(probes) << PROBE_SHIFT) | state as u64
}

#[inline]
fn gen_of(w: u64) -> u32 {
    (w >> GEN_SHIFT) as u32
}

#[inline]
fn probes_of(w: u64) -> u32 {
    ((w >> PROBE_SHIFT) & PROBE_MASK) as u32
}

#[inline]
fn state_of(w: u64) -> BreakerState {
    match w & STATE_MASK {
        0 => BreakerState::Closed,
        1 => BreakerState::Open,
        2 => BreakerState::HalfOpen,
        3 => BreakerState::ForcedOpen,
        4 => BreakerState::Disabled,
        s => unreachable!("breaker word holds state {s}"),
    }
}

/// The state of a [`Breaker`]; the numbers are stable (the Python layer may expose them).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BreakerState {
    /// Every call is admitted; with `auto`, results are judged and may trip it.
    Closed = 0,
    /// Every call is refused until the open period is over, then probes go through.
    Open = 1,
    /// `half_open_probes` calls are admitted as probes; their results decide.
    HalfOpen = 2,
    /// Opened by an operator ([`Breaker::block`]): refuses until [`Breaker::unblock`].
    ForcedOpen = 3,
    /// Switched off by an operator ([`Breaker::disable`]): admits everything, records nothing.
    Disabled = 4,
}

impl BreakerState {
    /// The lower-case name: "closed", "open", "half_open", "forced_open", "disabled".
    pub fn name(&self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
            BreakerState::ForcedOpen => "forced_open",
            BreakerState::Disabled => "disabled",
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The calls a closed breaker judges its rates over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Window {
    /// The last `n` results (1 to [`MAX_COUNT_WINDOW`]).
    Count(u32),
    /// The results of the last `ns` nanoseconds (at least 1), kept as counts in 10 buckets of
    /// `ns / 10` (rounded up): a result counts for at least `ns - ns / 10` and less than `ns`
    /// after it was recorded (whole buckets drop out).
    Time {
        /// The window's length in ns.
        ns: u64,
    },
}

/// How a [`Breaker`] judges results and recovers. `Default` is the documented defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct BreakerConfig {
    /// Whether results trip it at all (default false). Without it the breaker obeys only the
    /// operator buttons and `record` does nothing in `CLOSED`; after a `force_open` it still
    /// recovers through half-open probes.
    pub auto: bool,
    /// Trips when failures / calls over the window is at least this (above 0, at most 1;
    /// default 0.5).
    pub failure_rate: f64,
    /// Trips when slow calls / calls over the window is at least this (above 0, at most 1;
    /// default 1.0); only with `slow_call_ns`.
    pub slow_call_rate: f64,
    /// A call whose duration is at least this is slow (above 0; default `None`: no call is
    /// slow). In `HALF_OPEN` a slow probe counts as a failed one.
    pub slow_call_ns: Option<u64>,
    /// The calls the rates are judged over (default the last 100).
    pub window: Window,
    /// Rates are judged only once the window holds at least this many calls (at least 1, at
    /// most a count window's size; default 20).
    pub min_calls: u32,
    /// Trips on this many failures in a row, whatever `min_calls` says (at least 1; default
    /// `None`).
    pub consecutive_failures: Option<u32>,
    /// How long it stays `OPEN` before probes go through (above 0; default 30 s).
    pub open_ns: u64,
    /// Each re-open after a failed probe multiplies the open duration by this (finite, at least
    /// 1; default 1.0: constant). Closing brings it back to `open_ns`.
    pub open_backoff: f64,
    /// The longest open duration, backoff and jitter included (at least `open_ns`; default 10
    /// min).
    pub open_max_ns: u64,
    /// Multiplies each open duration by a uniform factor in [0.8, 1.2] (default false), so
    /// breakers that tripped together do not probe together.
    pub jitter: bool,
    /// Calls admitted as probes in `HALF_OPEN`; all must succeed to close (1 to
    /// [`MAX_PROBES`]; default 1).
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            auto: false,
            failure_rate: 0.5,
            slow_call_rate: 1.0,
            slow_call_ns: None,
            window: Window::Count(100),
            min_calls: 20,
            consecutive_failures: None,
            open_ns: 30_000_000_000,
            open_backoff: 1.0,
            open_max_ns: 600_000_000_000,
            jitter: false,
            half_open_probes: 1,
        }
    }
}

/// Whether `r` is a valid rate: above 0 and at most 1 (false for NaN).
fn valid_rate(r: f64) -> bool {
    r > 0.0 && r <= 1.0
}

impl BreakerConfig {
    /// Checks every field; the message names the field, its value and what is valid.
    pub fn validate(&self) -> Result<(), String> {
        if !valid_rate(self.failure_rate) {
            return Err(format!(
                "failure_rate must be above 0 and at most 1, got {}",
                self.failure_rate
            ));
        }
        if !valid_rate(self.slow_call_rate) {
            return Err(format!(
                "slow_call_rate must be above 0 and at most 1, got {}",
                self.slow_call_rate
            ));
        }
        if self.slow_call_ns == Some(0) {
            return Err("slow_call_ns must be above 0 ns (or None), got 0".into());
        }
        match self.window {
            Window::Count(n) if !(1..=MAX_COUNT_WINDOW).contains(&n) => {
                return Err(format!(
                    "window must count 1 to {MAX_COUNT_WINDOW} calls, got {n}"
                ));
            }
            Window::Time { ns: 0 } => {
                return Err("window must last at least 1 ns, got 0".into());
            }
            _ => {}
        }
        if self.min_calls < 1 {
            return Err("min_calls must be at least 1, got 0".into());
        }
        if let Window::Count(n) = self.window {
            if self.min_calls > n {
                return Err(format!(
                    "min_calls must be at most the window's size ({n} calls), got {}: the \
                     rates would never be judged",
                    self.min_calls
                ));
            }
        }
        if self.consecutive_failures == Some(0) {
            return Err("consecutive_failures must be at least 1 (or None), got 0".into());
        }
        if self.open_ns == 0 {
            return Err("open_ns must be above 0, got 0".into());
        }
        if !(self.open_backoff.is_finite() && self.open_backoff >= 1.0) {
            return Err(format!(
                "open_backoff must be a finite number of at least 1.0, got {}",
                self.open_backoff
            ));
        }
        if self.open_max_ns < self.open_ns {
            return Err(format!(
                "open_max_ns must be at least open_ns ({}), got {}",
                self.open_ns, self.open_max_ns
            ));
        }
        if !(1..=MAX_PROBES).contains(&self.half_open_probes) {
            return Err(format!(
                "half_open_probes must be 1 to {MAX_PROBES}, got {}",
                self.half_open_probes
            ));
        }
        Ok(())
    }

    /// `self` with every field that `validate` rejects replaced by its default (then
    /// `min_calls` lowered to a count window's size and `open_max_ns` raised to `open_ns`), so
    /// an unchecked config never makes the breaker panic or misbehave.
    fn sanitized(mut self) -> Self {
        let d = BreakerConfig::default();
        if !valid_rate(self.failure_rate) {
            self.failure_rate = d.failure_rate;
        }
        if !valid_rate(self.slow_call_rate) {
            self.slow_call_rate = d.slow_call_rate;
        }
        if self.slow_call_ns == Some(0) {
            self.slow_call_ns = d.slow_call_ns;
        }
        match self.window {
            Window::Count(n) if !(1..=MAX_COUNT_WINDOW).contains(&n) => self.window = d.window,
            Window::Time { ns: 0 } => self.window = d.window,
            _ => {}
        }
        if self.min_calls < 1 {
            self.min_calls = d.min_calls;
        }
        if let Window::Count(n) = self.window {
            self.min_calls = self.min_calls.min(n);
        }
        if self.consecutive_failures == Some(0) {
            self.consecutive_failures = d.consecutive_failures;
        }
        if self.open_ns == 0 {
            self.open_ns = d.open_ns;
        }
        if !(self.open_backoff.is_finite() && self.open_backoff >= 1.0) {
            self.open_backoff = d.open_backoff;
        }
        self.open_max_ns = self.open_max_ns.max(self.open_ns);
        if !(1..=MAX_PROBES).contains(&self.half_open_probes) {
            self.half_open_probes = d.half_open_probes;
        }
        self
    }
}

/// Why a breaker opened (the last time: [`BreakerView::last_trip`], [`Refusal::reason`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TripReason {
    /// `failures` of the window's `calls` failed, at least `failure_rate` of them.
    FailureRate {
        /// Failed calls in the window.
        failures: u32,
        /// Calls in the window.
        calls: u32,
    },
    /// `slow` of the window's `calls` took at least `slow_call_ns`, at least `slow_call_rate`
    /// of them.
    SlowRate {
        /// Slow calls in the window.
        slow: u32,
        /// Calls in the window.
        calls: u32,
        /// The threshold they reached (`slow_call_ns` when it tripped).
        slow_call_ns: u64,
    },
    /// `n` calls failed in a row.
    Consecutive {
        /// Failures in a row.
        n: u32,
    },
    /// A half-open probe failed.
    ProbeFailed,
    /// A half-open probe succeeded but was slower than the slow-call threshold.
    ProbeSlow {
        /// The threshold it reached.
        slow_call_ns: u64,
    },
    /// An operator opened it (`force_open` or `block`).
    Manual,
}

impl TripReason {
    /// A sentence for messages, e.g. "12 of 20 calls failed (60.0 %)", "15 of 20 calls slower
    /// than 250 ms", "5 failures in a row", "a half-open probe failed", "opened by an
    /// operator".
    pub fn describe(&self) -> String {
        match *self {
            TripReason::FailureRate { failures, calls } => format!(
                "{failures} of {calls} calls failed ({:.1} %)",
                percent(failures, calls)
            ),
            TripReason::SlowRate {
                slow,
                calls,
                slow_call_ns,
            } => format!(
                "{slow} of {calls} calls slower than {}",
                fmt_ns(slow_call_ns)
            ),
            TripReason::Consecutive { n: 1 } => "a failure".into(),
            TripReason::Consecutive { n } => format!("{n} failures in a row"),
            TripReason::ProbeFailed => "a half-open probe failed".into(),
            TripReason::ProbeSlow { slow_call_ns } => {
                format!("a half-open probe was slower than {}", fmt_ns(slow_call_ns))
            }
            TripReason::Manual => "opened by an operator".into(),
        }
    }
}

impl fmt::Display for TripReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// `part` of `whole` in percent (0 when `whole` is 0).
fn percent(part: u32, whole: u32) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * f64::from(part) / f64::from(whole)
    }
}

/// `ns` in the largest unit that keeps it at least 1, up to 3 decimals: "250 ms", "1.5 s".
fn fmt_ns(ns: u64) -> String {
    let (v, unit) = if ns >= 1_000_000_000 {
        (ns as f64 / 1e9, "s")
    } else if ns >= 1_000_000 {
        (ns as f64 / 1e6, "ms")
    } else if ns >= 1_000 {
        (ns as f64 / 1e3, "µs")
    } else {
        return format!("{ns} ns");
    };
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s} {unit}")
}

/// What [`Breaker::admit`] gave a call it let through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    /// The generation the call was admitted in: pass it to [`Breaker::record`].
    pub gen: u32,
    /// The call is a half-open probe: it must end in `record(.., probe: true, ..)` or
    /// [`Breaker::release_probe`].
    pub probe: bool,
}

/// Why [`Breaker::admit`] refused a call: what the caller needs for a clear `MethodBlocked`.
#[derive(Clone, Debug, PartialEq)]
pub struct Refusal {
    /// `OPEN`, `HALF_OPEN` (every probe taken) or `FORCED_OPEN`.
    pub state: BreakerState,
    /// For `OPEN`: ns until probes go through. `None` otherwise (half-open: it depends on the
    /// probes; forced open: until an operator unblocks it).
    pub retry_in_ns: Option<u64>,
    /// Why it opened the last time (`None` if it never did).
    pub reason: Option<TripReason>,
}

/// One state change, as [`Breaker::transitions`] and [`Breaker::record`] report it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// When it happened (the largest `now_ns` the breaker had seen).
    pub at_ns: u64,
    /// The state before.
    pub from: BreakerState,
    /// The state after.
    pub to: BreakerState,
    /// Why: "manual" for an operator button, the trip's [`TripReason::describe`] for an
    /// automatic open, "open period over" for `OPEN -> HALF_OPEN`, "N probes succeeded" for
    /// `HALF_OPEN -> CLOSED`.
    pub reason: String,
}

/// A snapshot of a breaker, plain data for reports and `MethodBlocked`.
#[derive(Clone, Debug, PartialEq)]
pub struct BreakerView {
    /// The state; `HALF_OPEN` once an `OPEN` period is over, even if no call came since (the
    /// breaker itself moves on the next `admit`).
    pub state: BreakerState,
    /// The current generation (the move of an `OPEN` breaker whose period is over to
    /// `HALF_OPEN` will change it).
    pub gen: u32,
    /// For `OPEN`: when probes go through.
    pub open_until_ns: Option<u64>,
    /// For `OPEN`: ns until probes go through.
    pub retry_in_ns: Option<u64>,
    /// Calls in the window (for a time window: as of `now_ns`).
    pub calls: u32,
    /// Failed calls in the window.
    pub failures: u32,
    /// Slow calls in the window.
    pub slow: u32,
    /// `failures / calls`; `None` with no calls.
    pub failure_rate: Option<f64>,
    /// `slow / calls`; `None` with no calls or without `slow_call_ns`.
    pub slow_rate: Option<f64>,
    /// Failures in a row (while `CLOSED` with `auto`).
    pub consecutive_failures: u32,
    /// Times it went to `OPEN` or `FORCED_OPEN`.
    pub times_opened: u64,
    /// For `HALF_OPEN`: probes that may still be admitted.
    pub probes_left: u32,
    /// Calls refused so far.
    pub refused: u64,
    /// Why it opened the last time (`None` if it never did).
    pub last_trip: Option<TripReason>,
}

/// Result flags of one call in a count window.
const FAILED: u8 = 1;
const SLOW: u8 = 2;

/// Counts of one bucket of a time window.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    /// `now / width` of its calls (`u64::MAX`: never used).
    epoch: u64,
    calls: u32,
    failures: u32,
    slow: u32,
}

const EMPTY: Bucket = Bucket {
    epoch: u64::MAX,
    calls: 0,
    failures: 0,
    slow: 0,
};

/// The results a closed breaker judges.
#[derive(Debug)]
enum Store {
    /// The last `cap` results: `ring` grows to `cap`, then `ring[next]` is the oldest.
    Count {
        cap: usize,
        ring: Vec<u8>,
        next: usize,
        failures: u32,
        slow: u32,
    },
    /// Counts per `width` ns; the bucket of epoch `e` is `buckets[e % len]`.
    Time { width: u64, buckets: Vec<Bucket> },
}

impl Store {
    fn new(w: Window) -> Store {
        match w {
            Window::Count(n) => Store::Count {
                cap: n.max(1) as usize,
                ring: Vec::new(),
                next: 0,
                failures: 0,
                slow: 0,
            },
            Window::Time { ns } => {
                let n = TIME_BUCKETS.min(ns.max(1));
                Store::Time {
                    width: ns.max(1).div_ceil(n),
                    buckets: vec![EMPTY; n as usize],
                }
            }
        }
    }

    /// Adds one result at `now` (never earlier than a previous `now`).
    fn add(&mut self, now: u64, failed: bool, slow: bool) {
        match self {
            Store::Count {
                cap,
                ring,
                next,
                failures,
                slow: slows,
            } => {
                let flags = (if failed { FAILED } else { 0 }) | (if slow { SLOW } else { 0 });
                if ring.len() < *cap {
                    ring.push(flags);
                } else {
                    let old = std::mem::replace(&mut ring[*next], flags);
                    *failures -= u32::from(old & FAILED != 0);
                    *slows -= u32::from(old & SLOW != 0);
                    *next = (*next + 1) % *cap;
                }
                *failures += u32::from(failed);
                *slows += u32::from(slow);
            }
            Store::Time { width, buckets } => {
                let epoch = now / *width;
                let len = buckets.len() as u64;
                let b = &mut buckets[(epoch % len) as usize];
                if b.epoch != epoch {
                    // Time never goes back here, so a different epoch is an older one.
                    *b = Bucket { epoch, ..EMPTY };
                }
                b.calls = b.calls.saturating_add(1);
                b.failures = b.failures.saturating_add(u32::from(failed));
                b.slow = b.slow.saturating_add(u32::from(slow));
            }
        }
    }

    /// (calls, failures, slow) in the window at `now`.
    fn totals(&self, now: u64) -> (u32, u32, u32) {
        match self {
            Store::Count {
                ring,
                failures,
                slow,
                ..
            } => (ring.len() as u32, *failures, *slow),
            Store::Time { width, buckets } => {
                let epoch = now / *width;
                let len = buckets.len() as u64;
                buckets
                    .iter()
                    .filter(|b| b.epoch <= epoch && epoch - b.epoch < len)
                    .fold((0u32, 0u32, 0u32), |(c, f, s), b| {
                        (
                            c.saturating_add(b.calls),
                            f.saturating_add(b.failures),
                            s.saturating_add(b.slow),
                        )
                    })
            }
        }
    }

    /// Forgets every result.
    fn clear(&mut self) {
        match self {
            Store::Count {
                ring,
                next,
                failures,
                slow,
                ..
            } => {
                ring.clear();
                *next = 0;
                *failures = 0;
                *slow = 0;
            }
            Store::Time { buckets, .. } => buckets.fill(EMPTY),
        }
    }
}

/// SplitMix64's output function: a well-mixed 64-bit value from any input.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A non-zero seed for the jitter generator, different for every breaker of a process (a
/// counter) and across processes (the process id and where the counter was mapped).
fn jitter_seed() -> u64 {
    static BREAKERS: AtomicU64 = AtomicU64::new(0);
    let n = BREAKERS.fetch_add(1, Ordering::Relaxed);
    let here = &BREAKERS as *const AtomicU64 as usize as u64;
    let process = here ^ (u64::from(std::process::id()) << 32);
    splitmix64(n ^ splitmix64(process)) | 1
}

/// Everything of a breaker but the atomics; every transition happens under its mutex.
#[derive(Debug)]
struct Inner {
    cfg: BreakerConfig,
    window: Store,
    /// Failures in a row (while `CLOSED` with `auto`).
    consecutive: u32,
    /// The next open duration before jitter: `open_ns`, backed off by failed probes.
    open_base_ns: u64,
    /// Probes of the current half-open round (its `half_open_probes`) and those that succeeded.
    round_probes: u32,
    round_ok: u32,
    last_trip: Option<TripReason>,
    times_opened: u64,
    history: VecDeque<Transition>,
    /// xorshift64* state (never 0).
    rng: u64,
    /// The largest `now_ns` seen.
    now: u64,
}

impl Inner {
    #[inline]
    fn tick(&mut self, now_ns: u64) -> u64 {
        self.now = self.now.max(now_ns);
        self.now
    }

    /// A uniform factor in [0.8, 1.2).
    fn jitter_factor(&mut self) -> f64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        let r = x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11;
        0.8 + 0.4 * (r as f64 / (1u64 << 53) as f64)
    }

    /// Why a closed breaker must trip now, if it must.
    fn trip_reason(&self, now: u64) -> Option<TripReason> {
        let cfg = &self.cfg;
        if cfg
            .consecutive_failures
            .is_some_and(|n| self.consecutive >= n)
        {
            return Some(TripReason::Consecutive {
                n: self.consecutive,
            });
        }
        let (calls, failures, slow) = self.window.totals(now);
        if calls < cfg.min_calls || calls == 0 {
            return None;
        }
        if f64::from(failures) / f64::from(calls) >= cfg.failure_rate {
            return Some(TripReason::FailureRate { failures, calls });
        }
        match cfg.slow_call_ns {
            Some(s) if f64::from(slow) / f64::from(calls) >= cfg.slow_call_rate => {
                Some(TripReason::SlowRate {
                    slow,
                    calls,
                    slow_call_ns: s,
                })
            }
            _ => None,
        }
    }
}

/// A per-operation circuit breaker, shared by submitting threads (`admit`) and workers
/// (`generation`, `record`, `release_probe`); see the module docs.
#[derive(Debug)]
pub struct Breaker {
    /// `gen << 32 | probes_left << 8 | state`: written under `inner`, except that `admit`
    /// takes half-open probes with a compare-and-swap.
    word: CachePadded<AtomicU64>,
    /// For `OPEN`: when probes go through (written under `inner`, before `word`).
    open_until: AtomicU64,
    /// Calls refused so far.
    refused: AtomicU64,
    /// `cfg.auto` (written under `inner`): lets `record` skip the mutex for a closed
    /// manual-only breaker.
    auto: AtomicBool,
    inner: Mutex<Inner>,
}

impl Breaker {
    /// A `CLOSED` breaker of generation 0. `cfg` should pass [`BreakerConfig::validate`]: a
    /// field it would reject is replaced by its default.
    pub fn new(cfg: BreakerConfig) -> Breaker {
        let cfg = cfg.sanitized();
        Breaker {
            word: CachePadded::new(AtomicU64::new(pack(0, 0, BreakerState::Closed))),
            open_until: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            auto: AtomicBool::new(cfg.auto),
            inner: Mutex::new(Inner {
                window: Store::new(cfg.window),
                consecutive: 0,
                open_base_ns: cfg.open_ns,
                round_probes: 0,
                round_ok: 0,
                last_trip: None,
                times_opened: 0,
                history: VecDeque::with_capacity(HISTORY),
                rng: jitter_seed(),
                now: 0,
                cfg,
            }),
        }
    }

    /// The gate, called once per submitted call at `now_ns`. `CLOSED` and `DISABLED`: one
    /// atomic load, admitted. `OPEN`: refused until the open period is over, then it moves to
    /// `HALF_OPEN` (under the mutex) and admits as that. `HALF_OPEN`: the first
    /// `half_open_probes` calls get a probe ticket (decided by one compare-and-swap, never more
    /// however many threads race), the others are refused. `FORCED_OPEN`: refused.
    #[inline]
    pub fn admit(&self, now_ns: u64) -> Result<Ticket, Refusal> {
        let w = self.word.load(Ordering::Acquire);
        match state_of(w) {
            BreakerState::Closed | BreakerState::Disabled => Ok(Ticket {
                gen: gen_of(w),
                probe: false,
            }),
            _ => self.admit_slow(w, now_ns),
        }
    }

    /// `admit` for the states that may refuse; `w` is the word `admit` read.
    #[cold]
    #[inline(never)]
    fn admit_slow(&self, mut w: u64, now_ns: u64) -> Result<Ticket, Refusal> {
        loop {
            match state_of(w) {
                BreakerState::Closed | BreakerState::Disabled => {
                    return Ok(Ticket {
                        gen: gen_of(w),
                        probe: false,
                    })
                }
                BreakerState::ForcedOpen => return Err(self.refuse(w, None)),
                BreakerState::Open => {
                    let until = self.open_until.load(Ordering::Acquire);
                    if now_ns < until {
                        return Err(self.refuse(w, Some(until - now_ns)));
                    }
                    let mut g = lock(&self.inner);
                    // Another thread may have moved it meanwhile (to HALF_OPEN, or re-opened
                    // it with a later `open_until`): move it only if it still must move.
                    let cur = self.word.load(Ordering::Acquire);
                    if state_of(cur) == BreakerState::Open
                        && now_ns >= self.open_until.load(Ordering::Acquire)
                    {
                        let now = g.tick(now_ns);
                        self.transition(
                            &mut g,
                            BreakerState::HalfOpen,
                            now,
                            "open period over".into(),
                        );
                    }
                    drop(g);
                    w = self.word.load(Ordering::Acquire);
                }
                BreakerState::HalfOpen => {
                    if probes_of(w) == 0 {
                        return Err(self.refuse(w, None));
                    }
                    // The word carries the generation: a CAS on a word read before a newer
                    // half-open round fails instead of taking that round's probe.
                    match self.word.compare_exchange_weak(
                        w,
                        w - PROBE_ONE,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    ) {
                        Ok(_) => {
                            return Ok(Ticket {
                                gen: gen_of(w),
                                probe: true,
                            })
                        }
                        Err(cur) => w = cur,
                    }
                }
            }
        }
    }

    /// Counts a refusal in state word `w` and describes it.
    #[cold]
    fn refuse(&self, w: u64, retry_in_ns: Option<u64>) -> Refusal {
        self.refused.fetch_add(1, Ordering::Relaxed);
        Refusal {
            state: state_of(w),
            retry_in_ns,
            reason: lock(&self.inner).last_trip,
        }
    }

    /// The current generation (one atomic load): a worker reads it when a call starts and
    /// passes it to [`Breaker::record`] with the result.
    #[inline]
    pub fn generation(&self) -> u32 {
        gen_of(self.word.load(Ordering::Acquire))
    }

    /// The generation and the state as stored (one atomic load; an OPEN breaker whose time
    /// passed still reads OPEN until the next `admit`).
    #[inline]
    pub fn generation_and_state(&self) -> (u32, BreakerState) {
        let w = self.word.load(Ordering::Acquire);
        (gen_of(w), state_of(w))
    }

    /// The result of a call that started in generation `gen` (`probe`: it had a probe ticket;
    /// `failure`: it failed; `duration_ns`: how long it ran; it is slow if that is at least
    /// `slow_call_ns`). Returns the transition it caused, if any.
    ///
    /// Ignored (`None`) when `gen` is not the current generation (the call started before a
    /// transition), in `OPEN`, `FORCED_OPEN` and `DISABLED`, and in `CLOSED` without `auto`.
    /// `CLOSED` with `auto`: added to the window and the consecutive count (a success resets
    /// it); trips to `OPEN` on `consecutive_failures` failures in a row, or once the window
    /// holds `min_calls` calls, when the failure rate reaches `failure_rate` or (with
    /// `slow_call_ns`) the slow rate reaches `slow_call_rate`. `HALF_OPEN` (with or without
    /// `auto`): only probes count; a failed or slow probe re-opens it with the backed-off
    /// duration; once all of the round's probes succeeded it closes. So without `auto` only
    /// probe results matter, and a caller may skip `record` for the other tickets.
    pub fn record(
        &self,
        gen: u32,
        probe: bool,
        failure: bool,
        duration_ns: u64,
        now_ns: u64,
    ) -> Option<Transition> {
        let w = self.word.load(Ordering::Acquire);
        let counts = match state_of(w) {
            BreakerState::Closed => self.auto.load(Ordering::Relaxed),
            BreakerState::HalfOpen => probe,
            _ => false,
        };
        if gen_of(w) != gen || !counts {
            return None;
        }
        let mut g = lock(&self.inner);
        // Under the mutex only the probe budget can change.
        let w = self.word.load(Ordering::Acquire);
        if gen_of(w) != gen {
            return None;
        }
        let now = g.tick(now_ns);
        let slow = g.cfg.slow_call_ns.is_some_and(|s| duration_ns >= s);
        match state_of(w) {
            BreakerState::Closed if g.cfg.auto => {
                g.window.add(now, failure, slow);
                g.consecutive = if failure {
                    g.consecutive.saturating_add(1)
                } else {
                    0
                };
                let why = g.trip_reason(now)?;
                Some(self.open(&mut g, now, why, false, why.describe()))
            }
            BreakerState::HalfOpen if probe => {
                if failure || slow {
                    let why = match g.cfg.slow_call_ns {
                        Some(slow_call_ns) if !failure => TripReason::ProbeSlow { slow_call_ns },
                        _ => TripReason::ProbeFailed,
                    };
                    return Some(self.open(&mut g, now, why, true, why.describe()));
                }
                g.round_ok += 1;
                if g.round_ok < g.round_probes {
                    return None;
                }
                let n = g.round_probes;
                let reason = if n == 1 {
                    "1 probe succeeded".to_string()
                } else {
                    format!("{n} probes succeeded")
                };
                Some(self.transition(&mut g, BreakerState::Closed, now, reason))
            }
            _ => None,
        }
    }

    /// Gives back the probe of a call admitted with `ticket` that never ran (killed while
    /// queued, refused further down, quarantined), so another call can probe. Nothing happens
    /// unless `ticket` is a probe of the current generation and the breaker is still
    /// `HALF_OPEN`, nor beyond the round's outstanding probes (a second release of one ticket).
    pub fn release_probe(&self, ticket: Ticket) {
        if !ticket.probe {
            return;
        }
        let g = lock(&self.inner);
        let most = g.round_probes.saturating_sub(g.round_ok);
        let mut w = self.word.load(Ordering::Acquire);
        // `admit` may take probes meanwhile (without the mutex), hence the CAS loop.
        while gen_of(w) == ticket.gen
            && state_of(w) == BreakerState::HalfOpen
            && probes_of(w) < most
        {
            match self.word.compare_exchange_weak(
                w,
                w + PROBE_ONE,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return,
                Err(cur) => w = cur,
            }
        }
    }

    /// Operator button: `FORCED_OPEN` (refuses everything) until [`Breaker::unblock`], from any
    /// state. Records a "manual" transition at `now_ns` and changes the generation.
    pub fn block(&self, now_ns: u64) -> BreakerState {
        let mut g = lock(&self.inner);
        let now = g.tick(now_ns);
        g.last_trip = Some(TripReason::Manual);
        g.times_opened += 1;
        self.transition(&mut g, BreakerState::ForcedOpen, now, MANUAL.into());
        BreakerState::ForcedOpen
    }

    /// Operator button: `CLOSED` with a fresh window, consecutive count and open duration,
    /// from any state (also from `CLOSED`: a reset). Records a "manual" transition at `now_ns`
    /// and changes the generation.
    pub fn unblock(&self, now_ns: u64) -> BreakerState {
        let mut g = lock(&self.inner);
        let now = g.tick(now_ns);
        self.transition(&mut g, BreakerState::Closed, now, MANUAL.into());
        BreakerState::Closed
    }

    /// Operator button: `OPEN` from `now_ns` for the current open duration (with jitter if
    /// configured), then the normal recovery through half-open probes, from any state and
    /// also without `auto`. Records a "manual" transition and changes the generation.
    pub fn force_open(&self, now_ns: u64) -> BreakerState {
        let mut g = lock(&self.inner);
        let now = g.tick(now_ns);
        self.open(&mut g, now, TripReason::Manual, false, MANUAL.into());
        BreakerState::Open
    }

    /// Operator button: `DISABLED` (admits everything, records nothing) until another button,
    /// from any state. Records a "manual" transition at `now_ns` and changes the generation.
    pub fn disable(&self, now_ns: u64) -> BreakerState {
        let mut g = lock(&self.inner);
        let now = g.tick(now_ns);
        self.transition(&mut g, BreakerState::Disabled, now, MANUAL.into());
        BreakerState::Disabled
    }

    /// Replaces the config (a field [`BreakerConfig::validate`] would reject is replaced by its
    /// default); the state, generation and consecutive count are kept. The window keeps its
    /// results if `window` is unchanged and starts empty otherwise. A running `OPEN` period
    /// keeps its end and a running half-open round its probe count; the new `open_ns`,
    /// backoff, jitter and `half_open_probes` apply from the next open or round (a backed-off
    /// open duration is kept, within the new `open_ns..=open_max_ns`). The new thresholds are
    /// judged at the next `record`.
    pub fn set_config(&self, cfg: BreakerConfig) {
        let cfg = cfg.sanitized();
        let mut g = lock(&self.inner);
        if cfg.window != g.cfg.window {
            g.window = Store::new(cfg.window);
        }
        self.auto.store(cfg.auto, Ordering::Relaxed);
        g.open_base_ns = if g.open_base_ns == g.cfg.open_ns {
            cfg.open_ns
        } else {
            g.open_base_ns.clamp(cfg.open_ns, cfg.open_max_ns)
        };
        g.cfg = cfg;
    }

    /// The config in use (after the replacement of invalid fields).
    pub fn config(&self) -> BreakerConfig {
        lock(&self.inner).cfg.clone()
    }

    /// A snapshot at `now_ns` (the breaker uses the largest `now_ns` it has seen); see
    /// [`BreakerView`].
    pub fn view(&self, now_ns: u64) -> BreakerView {
        let g = lock(&self.inner);
        let now = g.now.max(now_ns);
        let w = self.word.load(Ordering::Acquire);
        let until = self.open_until.load(Ordering::Acquire);
        let mut state = state_of(w);
        let (mut open_until_ns, mut retry_in_ns, mut probes_left) = (None, None, 0);
        match state {
            BreakerState::Open if now < until => {
                open_until_ns = Some(until);
                retry_in_ns = Some(until - now);
            }
            BreakerState::Open => {
                state = BreakerState::HalfOpen;
                probes_left = g.cfg.half_open_probes;
            }
            BreakerState::HalfOpen => probes_left = probes_of(w),
            _ => {}
        }
        let (calls, failures, slow) = g.window.totals(now);
        let rate = |n: u32| (calls > 0).then(|| f64::from(n) / f64::from(calls));
        BreakerView {
            state,
            gen: gen_of(w),
            open_until_ns,
            retry_in_ns,
            calls,
            failures,
            slow,
            failure_rate: rate(failures),
            slow_rate: g.cfg.slow_call_ns.and_then(|_| rate(slow)),
            consecutive_failures: g.consecutive,
            times_opened: g.times_opened,
            probes_left,
            refused: self.refused.load(Ordering::Relaxed),
            last_trip: g.last_trip,
        }
    }

    /// The last [`HISTORY`] transitions, oldest first.
    pub fn transitions(&self) -> Vec<Transition> {
        lock(&self.inner).history.iter().cloned().collect()
    }

    /// Opens (under the mutex): the open duration is backed off first if `backoff` (a failed
    /// probe), then jittered if configured, at most `open_max_ns`.
    fn open(
        &self,
        g: &mut Inner,
        now: u64,
        why: TripReason,
        backoff: bool,
        reason: String,
    ) -> Transition {
        let max = g.cfg.open_max_ns;
        if backoff {
            g.open_base_ns = scale(g.open_base_ns, g.cfg.open_backoff, max);
        }
        let mut ns = g.open_base_ns;
        if g.cfg.jitter {
            let f = g.jitter_factor();
            ns = scale(ns, f, max);
        }
        self.open_until
            .store(now.saturating_add(ns), Ordering::Release);
        g.last_trip = Some(why);
        g.times_opened += 1;
        self.transition(g, BreakerState::Open, now, reason)
    }

    /// Moves to `to` with the next generation (under the mutex; `open` sets `open_until`
    /// first): a half-open round gets its probe budget, closing resets the window, the
    /// consecutive count and the open duration. Logs and returns the transition.
    fn transition(&self, g: &mut Inner, to: BreakerState, now: u64, reason: String) -> Transition {
        let w = self.word.load(Ordering::Acquire);
        let from = state_of(w);
        let mut probes = 0;
        match to {
            BreakerState::HalfOpen => {
                g.round_probes = g.cfg.half_open_probes;
                g.round_ok = 0;
                probes = g.round_probes;
            }
            BreakerState::Closed => {
                g.window.clear();
                g.consecutive = 0;
                g.open_base_ns = g.cfg.open_ns;
            }
            _ => {}
        }
        // A plain store: the only concurrent writer is `admit` taking a probe of the old
        // generation, whose CAS then fails (or whose probe is stale from now on).
        self.word.store(
            pack(gen_of(w).wrapping_add(1), probes, to),
            Ordering::Release,
        );
        let t = Transition {
            at_ns: now,
            from,
            to,
            reason,
        };
        if g.history.len() == HISTORY {
            g.history.pop_front();
        }
        g.history.push_back(t.clone());
        t
    }
}

/// `ns * factor`, at least 1 and at most `max`.
fn scale(ns: u64, factor: f64, max: u64) -> u64 {
    let v = ns as f64 * factor;
    if v >= max as f64 {
        max
    } else {
        (v as u64).clamp(1, max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;
    use std::sync::Barrier;

    const MS: u64 = 1_000_000;
    const SEC: u64 = 1_000_000_000;

    fn auto() -> BreakerConfig {
        BreakerConfig {
            auto: true,
            ..BreakerConfig::default()
        }
    }

    /// Admits one call at `now` and records its result.
    fn call(b: &Breaker, now: u64, failure: bool) -> Option<Transition> {
        let t = b.admit(now).expect("admitted");
        b.record(t.gen, t.probe, failure, 0, now)
    }

    /// Records `n` results at `now`; panics if any but the last trips it.
    fn calls(b: &Breaker, now: u64, n: u32, failure: bool) -> Option<Transition> {
        let mut last = None;
        for i in 0..n {
            assert!(last.is_none(), "tripped after {i} of {n} calls");
            last = call(b, now, failure);
        }
        last
    }

    /// A breaker with `cfg` tripped at `now` (`consecutive_failures` 1).
    fn tripped(cfg: BreakerConfig, now: u64) -> Breaker {
        let b = Breaker::new(BreakerConfig {
            consecutive_failures: Some(1),
            ..cfg
        });
        let t = call(&b, now, true).expect("tripped");
        assert_eq!(t.to, BreakerState::Open);
        b
    }

    /// Admits a probe at `now`.
    fn probe(b: &Breaker, now: u64) -> Ticket {
        let t = b.admit(now).expect("probe admitted");
        assert!(t.probe);
        t
    }

    #[test]
    fn breaker_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Breaker>();
    }

    #[test]
    fn names_and_numbers() {
        use BreakerState::*;
        let all = [Closed, Open, HalfOpen, ForcedOpen, Disabled];
        let names: Vec<_> = all.iter().map(|s| s.name()).collect();
        assert_eq!(
            names,
            ["closed", "open", "half_open", "forced_open", "disabled"]
        );
        for (i, s) in all.iter().enumerate() {
            assert_eq!(*s as u8 as usize, i);
            assert_eq!(state_of(pack(7, 3, *s)), *s);
            assert_eq!(s.to_string(), s.name());
        }
        let w = pack(u32::MAX, MAX_PROBES, Disabled);
        assert_eq!(
            (gen_of(w), probes_of(w), state_of(w)),
            (u32::MAX, MAX_PROBES, Disabled)
        );
    }

    #[test]
    fn closed_admits_and_does_not_trip_before_min_calls() {
        let b = Breaker::new(auto());
        assert_eq!(
            b.admit(0),
            Ok(Ticket {
                gen: 0,
                probe: false
            })
        );
        assert!(calls(&b, 0, 19, true).is_none(), "19 < min_calls 20");
        let v = b.view(0);
        assert_eq!(
            (v.state, v.calls, v.failures),
            (BreakerState::Closed, 19, 19)
        );
        assert_eq!(v.failure_rate, Some(1.0));
        assert_eq!(b.generation(), 0);
    }

    #[test]
    fn trips_at_the_rate_boundary() {
        // 10 of 20 is exactly 50 %: trips on the 20th call.
        let b = Breaker::new(auto());
        assert!(calls(&b, 0, 10, false).is_none());
        let t = calls(&b, 0, 10, true).expect("10 of 20 trips");
        assert_eq!((t.from, t.to), (BreakerState::Closed, BreakerState::Open));
        assert_eq!(t.reason, "10 of 20 calls failed (50.0 %)");
        let v = b.view(0);
        assert_eq!(
            v.last_trip,
            Some(TripReason::FailureRate {
                failures: 10,
                calls: 20
            })
        );
        assert_eq!(v.gen, 1);
        // 9 of 20 does not.
        let b = Breaker::new(auto());
        assert!(calls(&b, 0, 11, false).is_none());
        assert!(calls(&b, 0, 9, true).is_none());
        assert_eq!(b.view(0).state, BreakerState::Closed);
    }

    #[test]
    fn slow_calls_trip() {
        let b = Breaker::new(BreakerConfig {
            slow_call_ns: Some(250 * MS),
            slow_call_rate: 0.5,
            ..auto()
        });
        for _ in 0..10 {
            let t = b.admit(0).unwrap();
            assert!(b.record(t.gen, false, false, 250 * MS - 1, 0).is_none());
        }
        let mut last = None;
        for _ in 0..10 {
            assert!(last.is_none());
            let t = b.admit(0).unwrap();
            // Exactly the threshold is slow.
            last = b.record(t.gen, false, false, 250 * MS, 0);
        }
        let t = last.expect("10 of 20 slow trips");
        assert_eq!(t.reason, "10 of 20 calls slower than 250 ms");
        assert_eq!(
            b.view(0).last_trip,
            Some(TripReason::SlowRate {
                slow: 10,
                calls: 20,
                slow_call_ns: 250 * MS
            })
        );
    }

    #[test]
    fn consecutive_failures_trip_before_min_calls_and_a_success_resets() {
        let b = Breaker::new(BreakerConfig {
            consecutive_failures: Some(5),
            ..auto()
        });
        assert!(calls(&b, 0, 4, true).is_none());
        assert!(call(&b, 0, false).is_none());
        assert_eq!(b.view(0).consecutive_failures, 0);
        assert!(calls(&b, 0, 4, true).is_none());
        assert_eq!(b.view(0).consecutive_failures, 4);
        let t = call(&b, 0, true).expect("5 in a row");
        assert_eq!(t.reason, "5 failures in a row");
        assert_eq!(b.view(0).last_trip, Some(TripReason::Consecutive { n: 5 }));
    }

    #[test]
    fn count_window_slides() {
        let b = Breaker::new(BreakerConfig {
            window: Window::Count(20),
            ..auto()
        });
        assert!(calls(&b, 0, 9, true).is_none());
        assert!(calls(&b, 0, 11, false).is_none());
        // Each new failure pushes out an old one: 9 of 20 throughout (cumulatively 11 of 29).
        assert!(calls(&b, 0, 9, true).is_none());
        let v = b.view(0);
        assert_eq!((v.calls, v.failures), (20, 9));
        // The next one pushes out a success: 10 of 20.
        let t = call(&b, 0, true).expect("trips");
        assert_eq!(t.reason, "10 of 20 calls failed (50.0 %)");
    }

    #[test]
    fn time_window_drops_old_buckets() {
        let cfg = BreakerConfig {
            window: Window::Time { ns: 10 * SEC },
            ..auto()
        };
        // Failures 9.5 s ago still count.
        let b = Breaker::new(cfg.clone());
        assert!(calls(&b, 0, 10, true).is_none());
        assert!(calls(&b, 9 * SEC + 500 * MS, 10, false).is_some());
        // Failures 10 s ago do not.
        let b = Breaker::new(cfg);
        assert!(calls(&b, 0, 10, true).is_none());
        assert_eq!(b.view(5 * SEC).calls, 10);
        assert_eq!(b.view(10 * SEC).calls, 0, "expired without a record");
        assert!(calls(&b, 10 * SEC, 10, false).is_none());
        let v = b.view(10 * SEC);
        assert_eq!(
            (v.calls, v.failures, v.state),
            (10, 0, BreakerState::Closed)
        );
        // A window shorter than 10 ns has a bucket per ns.
        let b = Breaker::new(BreakerConfig {
            window: Window::Time { ns: 3 },
            min_calls: 1,
            ..auto()
        });
        assert!(call(&b, 100, false).is_none());
        assert_eq!(b.view(102).calls, 1);
        assert_eq!(b.view(103).calls, 0);
    }

    #[test]
    fn open_refuses_with_retry_in_then_goes_half_open() {
        let b = tripped(auto(), SEC);
        let gen = b.generation();
        let r = b.admit(11 * SEC).unwrap_err();
        assert_eq!(r.state, BreakerState::Open);
        assert_eq!(r.retry_in_ns, Some(20 * SEC));
        assert_eq!(r.reason, Some(TripReason::Consecutive { n: 1 }));
        // The view reports HALF_OPEN once the period is over, before any admit.
        let v = b.view(31 * SEC);
        assert_eq!(
            (v.state, v.probes_left, v.gen),
            (BreakerState::HalfOpen, 1, gen)
        );
        assert_eq!((v.open_until_ns, v.retry_in_ns), (None, None));
        assert_eq!(b.generation(), gen, "only an admit moves it");
        let t = probe(&b, 31 * SEC);
        assert_eq!(t.gen, gen + 1);
        let r = b.admit(31 * SEC).unwrap_err();
        assert_eq!((r.state, r.retry_in_ns), (BreakerState::HalfOpen, None));
        assert_eq!(b.view(31 * SEC).refused, 2);
        let last = b.transitions().pop().unwrap();
        assert_eq!(
            (last.from, last.to, last.reason.as_str(), last.at_ns),
            (
                BreakerState::Open,
                BreakerState::HalfOpen,
                "open period over",
                31 * SEC
            )
        );
    }

    #[test]
    fn exactly_n_probes_under_racing_threads() {
        for round in 0..200u32 {
            let n = [1, 2, 3][round as usize % 3];
            let b = tripped(
                BreakerConfig {
                    half_open_probes: n,
                    ..auto()
                },
                0,
            );
            let barrier = Barrier::new(8);
            let admitted = AtomicU32::new(0);
            std::thread::scope(|s| {
                for _ in 0..8 {
                    s.spawn(|| {
                        barrier.wait();
                        // The first admits race to move it to HALF_OPEN, too.
                        for _ in 0..4 {
                            if let Ok(t) = b.admit(30 * SEC) {
                                assert!(t.probe);
                                admitted.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    });
                }
            });
            assert_eq!(admitted.load(Ordering::Relaxed), n, "round {round}");
            let v = b.view(30 * SEC);
            assert_eq!((v.state, v.probes_left), (BreakerState::HalfOpen, 0));
            assert_eq!(v.refused, u64::from(32 - n));
            assert_eq!(b.transitions().len(), 2, "one trip, one move to HALF_OPEN");
        }
    }

    #[test]
    fn released_probes_never_exceed_n_in_flight_under_racing_threads() {
        for round in 0..50 {
            let n = 2;
            let b = tripped(
                BreakerConfig {
                    half_open_probes: n,
                    ..auto()
                },
                0,
            );
            let barrier = Barrier::new(8);
            let in_flight = AtomicU32::new(0);
            let admitted = AtomicU32::new(0);
            std::thread::scope(|s| {
                for _ in 0..8 {
                    s.spawn(|| {
                        barrier.wait();
                        for _ in 0..200 {
                            if let Ok(t) = b.admit(30 * SEC) {
                                let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                                assert!(now <= n, "{now} probes in flight, round {round}");
                                admitted.fetch_add(1, Ordering::Relaxed);
                                in_flight.fetch_sub(1, Ordering::SeqCst);
                                b.release_probe(t);
                            }
                        }
                    });
                }
            });
            assert!(admitted.load(Ordering::Relaxed) >= n);
            assert_eq!(b.view(30 * SEC).probes_left, n, "every probe came back");
        }
    }

    #[test]
    fn a_slow_probe_reopens_and_says_so() {
        let b = tripped(
            BreakerConfig {
                slow_call_ns: Some(250_000_000),
                ..auto()
            },
            0,
        );
        let p = probe(&b, 30 * SEC);
        let t = b
            .record(p.gen, true, false, SEC, 31 * SEC)
            .expect("re-opens");
        assert_eq!(
            (t.to, t.reason.as_str()),
            (
                BreakerState::Open,
                "a half-open probe was slower than 250 ms"
            )
        );
    }

    #[test]
    fn all_probes_must_succeed_to_close() {
        let b = tripped(
            BreakerConfig {
                half_open_probes: 2,
                ..auto()
            },
            0,
        );
        let (p1, p2) = (probe(&b, 30 * SEC), probe(&b, 30 * SEC));
        assert!(b.admit(30 * SEC).is_err());
        assert!(b.record(p1.gen, true, false, 0, 31 * SEC).is_none());
        assert_eq!(b.view(31 * SEC).state, BreakerState::HalfOpen);
        let t = b.record(p2.gen, true, false, 0, 32 * SEC).expect("closes");
        assert_eq!(
            (t.from, t.to, t.reason.as_str()),
            (
                BreakerState::HalfOpen,
                BreakerState::Closed,
                "2 probes succeeded"
            )
        );
        let v = b.view(32 * SEC);
        assert_eq!(
            (v.state, v.calls, v.consecutive_failures),
            (BreakerState::Closed, 0, 0)
        );
        assert!(!b.admit(32 * SEC).unwrap().probe);
        // One success and one failure re-opens.
        assert!(call(&b, 40 * SEC, true).is_some());
        let (p1, p2) = (probe(&b, 70 * SEC), probe(&b, 70 * SEC));
        assert!(b.record(p1.gen, true, false, 0, 70 * SEC).is_none());
        let t = b.record(p2.gen, true, true, 0, 70 * SEC).expect("re-opens");
        assert_eq!(
            (t.to, t.reason.as_str()),
            (BreakerState::Open, "a half-open probe failed")
        );
        assert_eq!(b.view(70 * SEC).last_trip, Some(TripReason::ProbeFailed));
    }

    #[test]
    fn failed_probes_back_off_up_to_open_max() {
        let b = tripped(
            BreakerConfig {
                open_backoff: 2.0,
                open_max_ns: 100 * SEC,
                ..auto()
            },
            0,
        );
        assert_eq!(b.view(0).open_until_ns, Some(30 * SEC));
        let mut at = 30 * SEC;
        for expect in [60, 100, 100] {
            let p = probe(&b, at);
            assert_eq!(
                b.record(p.gen, true, true, 0, at).map(|t| t.to),
                Some(BreakerState::Open)
            );
            let until = b.view(at).open_until_ns.unwrap();
            assert_eq!(until - at, expect * SEC);
            assert!(b.admit(until - 1).is_err());
            at = until;
        }
        let p = probe(&b, at);
        assert_eq!(
            b.record(p.gen, true, false, 0, at).map(|t| t.to),
            Some(BreakerState::Closed)
        );
        // Closed again: back to open_ns.
        assert!(call(&b, at, true).is_some());
        assert_eq!(b.view(at).open_until_ns, Some(at + 30 * SEC));
        assert_eq!(b.view(at).times_opened, 5);
    }

    #[test]
    fn a_slow_probe_reopens() {
        let b = tripped(
            BreakerConfig {
                slow_call_ns: Some(SEC),
                ..auto()
            },
            0,
        );
        let p = probe(&b, 30 * SEC);
        let t = b
            .record(p.gen, true, false, SEC, 31 * SEC)
            .expect("re-opens");
        assert_eq!(t.to, BreakerState::Open);
    }

    #[test]
    fn jitter_stays_within_a_fifth() {
        let b = Breaker::new(BreakerConfig {
            jitter: true,
            open_ns: 10 * SEC,
            ..auto()
        });
        lock(&b.inner).rng = 0x1234_5678_9ABC_DEF1;
        let (mut lo, mut hi) = (u64::MAX, 0);
        for i in 0..2000u64 {
            let now = i * 100 * SEC;
            b.force_open(now);
            let d = b.view(now).open_until_ns.unwrap() - now;
            assert!((8 * SEC..=12 * SEC).contains(&d), "{d} ns");
            (lo, hi) = (lo.min(d), hi.max(d));
        }
        assert!(
            lo < 8 * SEC + 100 * MS && hi > 12 * SEC - 100 * MS,
            "{lo}..{hi}"
        );
        // open_max_ns caps the jittered duration too.
        b.set_config(BreakerConfig {
            jitter: true,
            open_ns: 10 * SEC,
            open_max_ns: 10 * SEC,
            ..auto()
        });
        for i in 0..200u64 {
            let now = (2000 + i) * 100 * SEC;
            b.force_open(now);
            let d = b.view(now).open_until_ns.unwrap() - now;
            assert!((8 * SEC..=10 * SEC).contains(&d), "{d} ns");
        }
    }

    #[test]
    fn released_probe_can_be_readmitted() {
        let b = tripped(auto(), 0);
        let p = probe(&b, 30 * SEC);
        assert!(b.admit(30 * SEC).is_err());
        b.release_probe(p);
        assert_eq!(b.view(30 * SEC).probes_left, 1);
        b.release_probe(p);
        assert_eq!(
            b.view(30 * SEC).probes_left,
            1,
            "a second release adds nothing"
        );
        b.release_probe(Ticket {
            gen: p.gen,
            probe: false,
        });
        assert_eq!(b.view(30 * SEC).probes_left, 1, "not a probe");
        let p2 = probe(&b, 30 * SEC);
        assert_eq!(p2, p);
        // A probe of an earlier round neither counts nor gives a probe back in a later one.
        assert!(b.record(p2.gen, true, true, 0, 30 * SEC).is_some());
        let p3 = probe(&b, 60 * SEC);
        assert_ne!(p3.gen, p.gen);
        b.release_probe(p);
        assert!(
            b.admit(60 * SEC).is_err(),
            "the stale release gave nothing back"
        );
        assert!(b.record(p.gen, true, false, 0, 60 * SEC).is_none());
        assert_eq!(b.view(60 * SEC).state, BreakerState::HalfOpen);
        // After the round ended, releasing its probe does nothing either.
        assert!(b.record(p3.gen, true, false, 0, 61 * SEC).is_some());
        b.release_probe(p3);
        assert_eq!(b.view(61 * SEC).state, BreakerState::Closed);
    }

    #[test]
    fn stale_generations_are_ignored() {
        let b = Breaker::new(BreakerConfig {
            consecutive_failures: Some(3),
            ..auto()
        });
        let early = b.admit(0).unwrap();
        assert!(calls(&b, 0, 3, true).is_some());
        let before = b.view(SEC);
        assert!(b.record(early.gen, false, true, 0, SEC).is_none());
        assert_eq!(
            b.view(SEC),
            before,
            "a call that started closed changed nothing"
        );
        // In HALF_OPEN: a non-probe (even of the current generation) and an old call count
        // for nothing.
        let p = probe(&b, 30 * SEC);
        assert!(b.record(p.gen, false, true, 0, 30 * SEC).is_none());
        assert!(b.record(early.gen, true, true, 0, 30 * SEC).is_none());
        let v = b.view(30 * SEC);
        assert_eq!((v.state, v.gen), (BreakerState::HalfOpen, p.gen));
        assert!(b.record(p.gen, true, false, 0, 30 * SEC).is_some());
        // A closed call from before a manual reset does not count after it.
        let old = b.admit(31 * SEC).unwrap();
        b.unblock(31 * SEC);
        assert!(b.record(old.gen, false, true, 0, 31 * SEC).is_none());
        assert_eq!(b.view(31 * SEC).calls, 0);
    }

    /// A breaker in `state` at 35 s (OPEN until 65 s; HALF_OPEN with its probe taken).
    fn in_state(state: BreakerState) -> Breaker {
        let b = Breaker::new(auto());
        match state {
            BreakerState::Closed => {}
            BreakerState::Open => {
                b.force_open(35 * SEC);
            }
            BreakerState::HalfOpen => {
                b.force_open(0);
                probe(&b, 35 * SEC);
            }
            BreakerState::ForcedOpen => {
                b.block(35 * SEC);
            }
            BreakerState::Disabled => {
                b.disable(35 * SEC);
            }
        }
        assert_eq!(b.view(35 * SEC).state, state);
        b
    }

    #[test]
    fn manual_buttons_from_every_state() {
        use BreakerState::*;
        type Button = fn(&Breaker, u64) -> BreakerState;
        let buttons: [(Button, BreakerState); 4] = [
            (Breaker::block, ForcedOpen),
            (Breaker::unblock, Closed),
            (Breaker::force_open, Open),
            (Breaker::disable, Disabled),
        ];
        let now = 40 * SEC;
        for from in [Closed, Open, HalfOpen, ForcedOpen, Disabled] {
            for (press, to) in buttons {
                let b = in_state(from);
                let gen = b.generation();
                assert_eq!(press(&b, now), to);
                let t = b.transitions().pop().unwrap();
                assert_eq!(
                    (t.from, t.to, t.reason.as_str(), t.at_ns),
                    (from, to, "manual", now)
                );
                let v = b.view(now);
                assert_eq!((v.state, v.gen), (to, gen + 1), "{from} -> {to}");
                match to {
                    Closed | Disabled => {
                        let t = b.admit(now).unwrap();
                        assert!(!t.probe);
                        assert!(b.record(t.gen, false, true, 0, now).is_none());
                    }
                    ForcedOpen => {
                        let r = b.admit(u64::MAX).unwrap_err();
                        assert_eq!(
                            r,
                            Refusal {
                                state: ForcedOpen,
                                retry_in_ns: None,
                                reason: Some(TripReason::Manual)
                            }
                        );
                    }
                    Open => {
                        assert_eq!(v.open_until_ns, Some(now + 30 * SEC));
                        assert_eq!(b.admit(now).unwrap_err().reason, Some(TripReason::Manual));
                        // The normal recovery follows.
                        let p = probe(&b, now + 30 * SEC);
                        assert_eq!(
                            b.record(p.gen, true, false, 0, now + 30 * SEC)
                                .map(|t| t.to),
                            Some(Closed)
                        );
                    }
                    HalfOpen => unreachable!(),
                }
            }
        }
    }

    #[test]
    fn unblock_resets_the_window() {
        let b = Breaker::new(auto());
        assert!(calls(&b, 0, 15, true).is_none());
        assert_eq!(b.unblock(0), BreakerState::Closed);
        let v = b.view(0);
        assert_eq!((v.calls, v.failures, v.consecutive_failures), (0, 0, 0));
        assert!(
            calls(&b, 0, 19, true).is_none(),
            "min_calls counts from the reset"
        );
    }

    #[test]
    fn disabled_never_trips() {
        let b = Breaker::new(BreakerConfig {
            consecutive_failures: Some(1),
            ..auto()
        });
        b.disable(0);
        for i in 0..1000 {
            let t = b.admit(i).unwrap();
            assert!(b.record(t.gen, t.probe, true, u64::MAX, i).is_none());
        }
        let v = b.view(1000);
        assert_eq!(
            (v.state, v.calls, v.refused),
            (BreakerState::Disabled, 0, 0)
        );
    }

    #[test]
    fn manual_only_never_trips_but_recovers_after_force_open() {
        let b = Breaker::new(BreakerConfig {
            consecutive_failures: Some(1),
            min_calls: 1,
            ..BreakerConfig::default()
        });
        assert!(calls(&b, 0, 100, true).is_none());
        assert_eq!(b.view(0).calls, 0, "nothing recorded");
        b.force_open(0);
        assert!(b.admit(SEC).is_err());
        let p = probe(&b, 30 * SEC);
        let t = b.record(p.gen, true, false, 0, 30 * SEC).expect("closes");
        assert_eq!(t.to, BreakerState::Closed);
        // A failed probe re-opens it, too.
        b.force_open(40 * SEC);
        let p = probe(&b, 70 * SEC);
        assert_eq!(
            b.record(p.gen, true, true, 0, 70 * SEC).map(|t| t.to),
            Some(BreakerState::Open)
        );
    }

    #[test]
    fn view_fields() {
        let b = Breaker::new(BreakerConfig {
            slow_call_ns: Some(100 * MS),
            ..auto()
        });
        let v = b.view(0);
        assert_eq!(
            v,
            BreakerView {
                state: BreakerState::Closed,
                gen: 0,
                open_until_ns: None,
                retry_in_ns: None,
                calls: 0,
                failures: 0,
                slow: 0,
                failure_rate: None,
                slow_rate: None,
                consecutive_failures: 0,
                times_opened: 0,
                probes_left: 0,
                refused: 0,
                last_trip: None,
            }
        );
        for (failure, ns) in [(true, 0), (false, 100 * MS), (true, 200 * MS), (false, 0)] {
            let t = b.admit(0).unwrap();
            assert!(b.record(t.gen, false, failure, ns, 0).is_none());
        }
        let v = b.view(0);
        assert_eq!((v.calls, v.failures, v.slow), (4, 2, 2));
        assert_eq!((v.failure_rate, v.slow_rate), (Some(0.5), Some(0.5)));
        assert_eq!(v.consecutive_failures, 0);
        b.force_open(SEC);
        assert!(b.admit(2 * SEC).is_err());
        let v = b.view(2 * SEC);
        assert_eq!(v.state, BreakerState::Open);
        assert_eq!(v.gen, 1);
        assert_eq!(v.open_until_ns, Some(31 * SEC));
        assert_eq!(v.retry_in_ns, Some(29 * SEC));
        assert_eq!((v.times_opened, v.refused), (1, 1));
        assert_eq!(v.last_trip, Some(TripReason::Manual));
        assert_eq!(v.calls, 4, "the window is kept while open");
        probe(&b, 31 * SEC);
        let v = b.view(31 * SEC);
        assert_eq!(
            (v.state, v.probes_left, v.gen),
            (BreakerState::HalfOpen, 0, 2)
        );
        // Without slow_call_ns there is no slow rate.
        let b = Breaker::new(auto());
        call(&b, 0, false);
        assert_eq!(
            (b.view(0).failure_rate, b.view(0).slow_rate),
            (Some(0.0), None)
        );
    }

    #[test]
    fn transitions_keep_the_last_64_oldest_first() {
        let b = Breaker::new(BreakerConfig::default());
        for i in 0..100u64 {
            b.block(2 * i);
            b.unblock(2 * i + 1);
        }
        let ts = b.transitions();
        assert_eq!(ts.len(), HISTORY);
        assert!(ts.windows(2).all(|p| p[0].at_ns < p[1].at_ns));
        assert_eq!(ts[0].at_ns, 200 - 64);
        let last = ts.last().unwrap();
        assert_eq!((last.to, last.at_ns), (BreakerState::Closed, 199));
        assert_eq!(b.generation(), 200);
        assert_eq!(b.view(199).times_opened, 100);
    }

    #[test]
    fn validate_names_the_field() {
        assert_eq!(BreakerConfig::default().validate(), Ok(()));
        let d = BreakerConfig::default;
        let cases: Vec<(BreakerConfig, &str)> = vec![
            (
                BreakerConfig {
                    failure_rate: 0.0,
                    ..d()
                },
                "failure_rate must be above 0 and at most 1, got 0",
            ),
            (
                BreakerConfig {
                    failure_rate: 1.5,
                    ..d()
                },
                "failure_rate must be above 0 and at most 1, got 1.5",
            ),
            (
                BreakerConfig {
                    failure_rate: f64::NAN,
                    ..d()
                },
                "failure_rate must be above 0 and at most 1, got NaN",
            ),
            (
                BreakerConfig {
                    slow_call_rate: -1.0,
                    ..d()
                },
                "slow_call_rate must be above 0 and at most 1",
            ),
            (
                BreakerConfig {
                    slow_call_ns: Some(0),
                    ..d()
                },
                "slow_call_ns must be above 0",
            ),
            (
                BreakerConfig {
                    window: Window::Count(0),
                    ..d()
                },
                "window must count 1 to 1000000 calls, got 0",
            ),
            (
                BreakerConfig {
                    window: Window::Count(MAX_COUNT_WINDOW + 1),
                    ..d()
                },
                "window must count 1 to",
            ),
            (
                BreakerConfig {
                    window: Window::Time { ns: 0 },
                    ..d()
                },
                "window must last at least 1 ns",
            ),
            (
                BreakerConfig {
                    min_calls: 0,
                    ..d()
                },
                "min_calls must be at least 1, got 0",
            ),
            (
                BreakerConfig {
                    window: Window::Count(10),
                    ..d()
                },
                "min_calls must be at most the window's size (10 calls), got 20",
            ),
            (
                BreakerConfig {
                    consecutive_failures: Some(0),
                    ..d()
                },
                "consecutive_failures must be at least 1",
            ),
            (
                BreakerConfig { open_ns: 0, ..d() },
                "open_ns must be above 0, got 0",
            ),
            (
                BreakerConfig {
                    open_backoff: 0.5,
                    ..d()
                },
                "open_backoff must be a finite number of at least 1.0, got 0.5",
            ),
            (
                BreakerConfig {
                    open_backoff: f64::INFINITY,
                    ..d()
                },
                "open_backoff must be a finite number",
            ),
            (
                BreakerConfig {
                    open_max_ns: SEC,
                    ..d()
                },
                "open_max_ns must be at least open_ns (30000000000), got 1000000000",
            ),
            (
                BreakerConfig {
                    half_open_probes: 0,
                    ..d()
                },
                "half_open_probes must be 1 to 16777215, got 0",
            ),
        ];
        for (cfg, msg) in cases {
            let err = cfg.validate().expect_err(msg);
            assert!(err.starts_with(msg), "{err:?} does not start with {msg:?}");
            // An unchecked config is repaired instead of misbehaving.
            assert_eq!(Breaker::new(cfg).config().validate(), Ok(()));
        }
        let ok = BreakerConfig {
            window: Window::Time { ns: 1 },
            min_calls: 1000,
            slow_call_ns: Some(1),
            consecutive_failures: Some(1),
            ..d()
        };
        assert_eq!(ok.validate(), Ok(()));
    }

    #[test]
    fn set_config_keeps_state_and_a_same_shaped_window() {
        let b = Breaker::new(auto());
        assert!(calls(&b, 0, 5, true).is_none());
        b.set_config(BreakerConfig {
            failure_rate: 0.9,
            ..auto()
        });
        assert_eq!(b.view(0).calls, 5, "same window: kept");
        assert_eq!(b.config().failure_rate, 0.9);
        b.set_config(BreakerConfig {
            window: Window::Count(50),
            ..auto()
        });
        let v = b.view(0);
        assert_eq!(
            (v.calls, v.consecutive_failures, v.gen),
            (0, 5, 0),
            "new window: empty"
        );
        // A running half-open round keeps its probe count.
        b.force_open(0);
        let p = probe(&b, 30 * SEC);
        b.set_config(BreakerConfig {
            half_open_probes: 3,
            ..auto()
        });
        assert_eq!(
            b.record(p.gen, true, false, 0, 30 * SEC).map(|t| t.to),
            Some(BreakerState::Closed)
        );
        b.force_open(40 * SEC);
        for _ in 0..3 {
            probe(&b, 70 * SEC);
        }
        assert!(b.admit(70 * SEC).is_err(), "the next round has 3");
    }

    #[test]
    fn describe_formats() {
        let slow = |ns| {
            TripReason::SlowRate {
                slow: 15,
                calls: 20,
                slow_call_ns: ns,
            }
            .describe()
        };
        assert_eq!(slow(250 * MS), "15 of 20 calls slower than 250 ms");
        assert_eq!(slow(1500 * MS), "15 of 20 calls slower than 1.5 s");
        assert_eq!(slow(2500), "15 of 20 calls slower than 2.5 µs");
        assert_eq!(slow(7), "15 of 20 calls slower than 7 ns");
        assert_eq!(
            TripReason::FailureRate {
                failures: 12,
                calls: 20
            }
            .describe(),
            "12 of 20 calls failed (60.0 %)"
        );
        assert_eq!(
            TripReason::Consecutive { n: 5 }.describe(),
            "5 failures in a row"
        );
        assert_eq!(
            TripReason::ProbeFailed.describe(),
            "a half-open probe failed"
        );
        assert_eq!(TripReason::Manual.to_string(), "opened by an operator");
    }
}
