//! Per-operation health counters (pure Rust): how the executed attempts of one operation ended,
//! how long they ran and waited, and a log-linear histogram of their run times.
//!
//! Write side: [`OpHealth::record`] runs on the worker threads for every executed attempt, so
//! it is three relaxed `fetch_add`s (four for an attempt that did not complete: completed
//! attempts are not counted on their own but derived, as all attempts in the histogram minus
//! the others) and no allocation. The counters are sharded: the
//! caller passes its core index as the shard, and each shard sits on its own cache lines
//! ([`CachePadded`]), so workers of different cores never write the same line. Workers of one
//! core share their shard; their `fetch_add`s hit a line that stays in that core's cache.
//!
//! Read side: [`OpHealth::snapshot`] sums the shards into a plain [`HealthSnapshot`]. The
//! counters are read one by one with relaxed loads, so while attempts are being recorded a
//! snapshot is a recent view whose figures may disagree by the attempts recorded meanwhile
//! (e.g. `completed` may be off by the failures recorded meanwhile); once recording stops,
//! they agree exactly.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crossbeam_utils::CachePadded;

/// Sub-buckets per power of two (3 bits below the leading one).
const SUB_BITS: u32 = 3;

/// Values from `2^MAX_OCTAVE` ns on (about 36.6 minutes) share the last bucket.
const MAX_OCTAVE: u32 = 41;

/// Buckets of a [`DurationHistogram`]: one per value 0 to 7, then 8 per power of two from
/// `2^3` to `2^40` (each 1/8 of its octave wide), then one for everything from `2^41` ns on.
pub const HIST_BUCKETS: usize = ((MAX_OCTAVE - 2) << SUB_BITS) as usize + 1;

/// The index of the last (overflow) bucket, which holds every value from `2^41` ns on.
pub const LAST_BUCKET: usize = HIST_BUCKETS - 1;

/// The bucket of a value of `v` ns: `v` itself below 16 (these buckets are exact); otherwise,
/// with `o = 63 - v.leading_zeros()` (the octave) and `sub` the 3 bits below the leading one,
/// `8 * (o - 2) + sub`; [`LAST_BUCKET`] from `2^41` on. Branch-free.
#[inline]
pub fn bucket_of(v: u64) -> usize {
    let octave = 63 - (v | 1).leading_zeros();
    let shift = octave.saturating_sub(SUB_BITS);
    // below 8: shift 0, index v; else `v >> shift` is 8 + sub, so the index is 8*(o-2) + sub
    (((shift as usize) << SUB_BITS) + (v >> shift) as usize).min(LAST_BUCKET)
}

/// The smallest value (ns) bucket `i` holds (`2^41` for the last bucket).
pub fn bucket_lower(i: usize) -> u64 {
    let i = i.min(LAST_BUCKET);
    if i < 8 {
        return i as u64;
    }
    let shift = (i >> SUB_BITS) as u32 - 1;
    (8 + (i & 7) as u64) << shift
}

/// The largest value (ns) bucket `i` holds (`u64::MAX` for the last bucket). Bucket `i` holds
/// exactly the values `bucket_lower(i) ..= bucket_upper(i)`; below 16 that is one value.
pub fn bucket_upper(i: usize) -> u64 {
    if i >= LAST_BUCKET {
        return u64::MAX;
    }
    if i < 8 {
        return i as u64;
    }
    let shift = (i >> SUB_BITS) as u32 - 1;
    bucket_lower(i) + (1u64 << shift) - 1
}

/// A histogram of durations in nanoseconds with log-linear buckets (see [`bucket_of`]): every
/// bucket is at most 1/8 of its lower edge wide, so a value read back from a bucket is within
/// 12.5 % of any value it holds. Counts are relaxed atomics; `record` is one `fetch_add`.
pub struct DurationHistogram {
    counts: [AtomicU64; HIST_BUCKETS],
}

impl Default for DurationHistogram {
    fn default() -> Self {
        DurationHistogram {
            counts: [const { AtomicU64::new(0) }; HIST_BUCKETS],
        }
    }
}

impl std::fmt::Debug for DurationHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = HistogramSnapshot::default();
        self.merge_into(&mut s);
        f.debug_struct("DurationHistogram")
            .field("total", &s.total())
            .finish_non_exhaustive()
    }
}

impl DurationHistogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one value of `v_ns` nanoseconds (one relaxed `fetch_add`).
    #[inline]
    pub fn record(&self, v_ns: u64) {
        self.counts[bucket_of(v_ns)].fetch_add(1, Relaxed);
    }

    /// Adds this histogram's counts to `into` (growing `into.counts` to [`HIST_BUCKETS`] if it
    /// is shorter), so several shards merge into one snapshot.
    pub fn merge_into(&self, into: &mut HistogramSnapshot) {
        if into.counts.len() < HIST_BUCKETS {
            into.counts.resize(HIST_BUCKETS, 0);
        }
        for (acc, c) in into.counts.iter_mut().zip(self.counts.iter()) {
            *acc = acc.wrapping_add(c.load(Relaxed));
        }
    }
}

/// Plain counts of a [`DurationHistogram`] (bucket `i` as in [`bucket_of`]). `Default` is
/// empty (no buckets, total 0); [`DurationHistogram::merge_into`] sizes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Values counted per bucket.
    pub counts: Vec<u64>,
}

impl HistogramSnapshot {
    /// Values counted.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The `q` quantile (0 to 1, clamped) as the **upper edge** of the bucket holding the
    /// `ceil(q * total)`-th smallest value: the largest value that bucket can hold
    /// ([`bucket_upper`]). So it is never below the true quantile and at most 12.5 % above it
    /// (exact below 16 ns); for the last bucket it is `u64::MAX` (clamp it with the maximum,
    /// as [`HealthSnapshot::p50`] does). `None` if nothing was counted or `q` is NaN.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let n = self.total();
        if n == 0 || q.is_nan() {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as u64).clamp(1, n);
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(bucket_upper(i));
            }
        }
        None
    }

    /// Values in the buckets whose lower edge is at least `ns`. A bucket that straddles `ns`
    /// (holds values both below and from `ns` on) is left out, so this is exact when `ns` is a
    /// bucket's lower edge (any `ns` below 16, or `(8 + k) * 2^j` with `k < 8`) and otherwise
    /// counts the values from the next lower edge above `ns`, which is less than 12.5 % above
    /// `ns`: it may undercount, never overcount. Above `2^41` it is 0 (the last bucket's lower
    /// edge is `2^41`).
    pub fn count_at_least(&self, ns: u64) -> u64 {
        let b = bucket_of(ns);
        let start = if bucket_lower(b) < ns { b + 1 } else { b };
        self.counts.iter().skip(start).sum()
    }
}

impl HistogramSnapshot {
    /// Prometheus-style cumulative counts at each of `bounds_ns` (ascending): the values whose
    /// bucket's midpoint is at most the bound. A value within a bucket's width (12.5 %) of a
    /// bound may so be counted on either side of it; the last count is the total only if the
    /// last bound is `u64::MAX`.
    pub fn cumulative_at(&self, bounds_ns: &[u64]) -> Vec<u64> {
        let mut out = Vec::with_capacity(bounds_ns.len());
        let mut seen = 0u64;
        let mut i = 0usize;
        for &b in bounds_ns {
            while i < self.counts.len() {
                let lo = bucket_lower(i);
                let hi = bucket_upper(i);
                let mid = lo + (hi - lo) / 2;
                if b != u64::MAX && mid > b {
                    break;
                }
                seen += self.counts[i];
                i += 1;
            }
            out.push(seen);
        }
        out
    }
}

/// How an executed attempt ended.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttemptOutcome {
    /// It returned a value.
    Completed = 0,
    /// It raised.
    Failed = 1,
    /// It ran past its deadline.
    TimedOut = 2,
    /// It was killed (cancelled or stopped at shutdown); not a verdict on the operation.
    Killed = 3,
}

impl AttemptOutcome {
    /// Every outcome, in `repr` order.
    pub const ALL: [AttemptOutcome; 4] = [
        AttemptOutcome::Completed,
        AttemptOutcome::Failed,
        AttemptOutcome::TimedOut,
        AttemptOutcome::Killed,
    ];

    /// The outcome's name: `"completed"`, `"failed"`, `"timed_out"` or `"killed"`.
    pub fn name(self) -> &'static str {
        match self {
            AttemptOutcome::Completed => "completed",
            AttemptOutcome::Failed => "failed",
            AttemptOutcome::TimedOut => "timed_out",
            AttemptOutcome::Killed => "killed",
        }
    }
}

/// How a token of the operation ended (counted once per token, when it settles), or a retry
/// (counted per retry).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenOutcome {
    Completed = 0,
    Failed = 1,
    Killed = 2,
    TimedOut = 3,
    /// Another attempt was scheduled (not a final outcome: one per retry).
    Retried = 4,
}

impl TokenOutcome {
    pub const ALL: [TokenOutcome; 5] = [
        TokenOutcome::Completed,
        TokenOutcome::Failed,
        TokenOutcome::Killed,
        TokenOutcome::TimedOut,
        TokenOutcome::Retried,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TokenOutcome::Completed => "completed",
            TokenOutcome::Failed => "failed",
            TokenOutcome::Killed => "killed",
            TokenOutcome::TimedOut => "timed_out",
            TokenOutcome::Retried => "retried",
        }
    }
}

/// The counters of one shard (one core).
#[derive(Default)]
struct Shard {
    /// Tokens by how they ended, and retries ([`TokenOutcome`] order).
    tokens: [AtomicU64; 5],
    /// Attempts that failed, timed out, were killed (`AttemptOutcome as usize - 1`); completed
    /// ones are the histogram's total minus these.
    others: [AtomicU64; 3],
    exec_ns: AtomicU64,
    queue_ns: AtomicU64,
    max_exec_ns: AtomicU64,
    hist: DurationHistogram,
}

/// Rarely written counters, kept off the line holding the shard pointer every `record` reads.
#[derive(Default)]
struct Rare {
    blocked: AtomicU64,
    quarantined: AtomicU64,
    /// Submissions refused after their token was made (pool full, admission closed).
    refused: AtomicU64,
}

/// The health counters of one operation, sharded by core (see the module docs).
pub struct OpHealth {
    shards: Box<[CachePadded<Shard>]>,
    rare: CachePadded<Rare>,
}

impl std::fmt::Debug for OpHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpHealth")
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

impl OpHealth {
    /// Counters with `shards` shards (at least 1; pass the number of cores). Each shard is
    /// about 2.6 KB.
    pub fn new(shards: usize) -> Self {
        OpHealth {
            shards: (0..shards.max(1)).map(|_| CachePadded::default()).collect(),
            rare: CachePadded::default(),
        }
    }

    /// Shards (as created).
    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    /// Records one executed attempt of the operation on shard `shard` (the caller's core
    /// index; taken modulo the shard count): its outcome, the time it executed and the time it
    /// waited from submission to start. Relaxed atomics only, on the shard's own lines: three
    /// `fetch_add`s (histogram, both sums), one more unless the attempt completed, and a
    /// `fetch_max` when `exec_ns` is a new maximum. Every attempt recorded counts in the
    /// histogram, whatever its outcome.
    #[inline]
    pub fn record(&self, shard: usize, outcome: AttemptOutcome, exec_ns: u64, queue_ns: u64) {
        let n = self.shards.len();
        // no division on the usual path: the caller passes an index below the shard count
        let s = &self.shards[if shard < n { shard } else { shard % n }];
        if outcome != AttemptOutcome::Completed {
            s.others[outcome as usize - 1].fetch_add(1, Relaxed);
        }
        s.exec_ns.fetch_add(exec_ns, Relaxed);
        s.queue_ns.fetch_add(queue_ns, Relaxed);
        if exec_ns > s.max_exec_ns.load(Relaxed) {
            s.max_exec_ns.fetch_max(exec_ns, Relaxed);
        }
        s.hist.record(exec_ns);
    }

    /// Counts a token of the operation that ended with `outcome` (or a retry), on shard
    /// `shard` (one relaxed `fetch_add`).
    #[inline]
    pub fn note_token(&self, shard: usize, outcome: TokenOutcome) {
        let n = self.shards.len();
        let s = &self.shards[if shard < n { shard } else { shard % n }];
        s.tokens[outcome as usize].fetch_add(1, Relaxed);
    }

    /// Counts a submission of the operation refused after its token was made.
    pub fn note_refused(&self) {
        self.rare.refused.fetch_add(1, Relaxed);
    }

    /// Counts a call of the operation that was refused because the operation is blocked.
    pub fn note_blocked(&self) {
        self.rare.blocked.fetch_add(1, Relaxed);
    }

    /// Counts a quarantine of the operation.
    pub fn note_quarantined(&self) {
        self.rare.quarantined.fetch_add(1, Relaxed);
    }

    /// The counters summed over the shards (see the module docs on consistency).
    pub fn snapshot(&self) -> HealthSnapshot {
        let mut others = [0u64; 3];
        let (mut exec, mut queue, mut max) = (0u64, 0u64, 0u64);
        let mut hist = HistogramSnapshot::default();
        let mut tokens = [0u64; 5];
        for s in self.shards.iter() {
            s.hist.merge_into(&mut hist);
            for (acc, c) in tokens.iter_mut().zip(s.tokens.iter()) {
                *acc += c.load(Relaxed);
            }
            for (acc, c) in others.iter_mut().zip(s.others.iter()) {
                *acc += c.load(Relaxed);
            }
            exec = exec.wrapping_add(s.exec_ns.load(Relaxed));
            queue = queue.wrapping_add(s.queue_ns.load(Relaxed));
            max = max.max(s.max_exec_ns.load(Relaxed));
        }
        let [failed, timed_out, killed] = others;
        // an attempt being recorded may already count as failed but not yet in the histogram
        let completed = hist.total().saturating_sub(failed + timed_out + killed);
        HealthSnapshot {
            attempts: completed + failed + timed_out + killed,
            completed,
            failed,
            timed_out,
            killed,
            blocked: self.rare.blocked.load(Relaxed),
            quarantined: self.rare.quarantined.load(Relaxed),
            refused: self.rare.refused.load(Relaxed),
            tokens,
            exec_ns_sum: exec,
            queue_ns_sum: queue,
            max_exec_ns: max,
            hist,
        }
    }
}

/// A plain copy of an [`OpHealth`]'s counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HealthSnapshot {
    /// Executed attempts: `completed + failed + timed_out + killed`.
    pub attempts: u64,
    /// Attempts that returned (derived: the histogram's total minus the other outcomes).
    pub completed: u64,
    /// Attempts that raised.
    pub failed: u64,
    /// Attempts that ran past their deadline.
    pub timed_out: u64,
    /// Attempts that were killed.
    pub killed: u64,
    /// Calls refused because the operation was blocked.
    pub blocked: u64,
    /// Times the operation was quarantined.
    pub quarantined: u64,
    /// Submissions refused after their token was made.
    pub refused: u64,
    /// Tokens by how they ended, and retries ([`TokenOutcome`] order).
    pub tokens: [u64; 5],
    /// Sum of the attempts' execution times, in ns.
    pub exec_ns_sum: u64,
    /// Sum of the attempts' submit-to-start waits, in ns.
    pub queue_ns_sum: u64,
    /// The longest execution time of an attempt, in ns.
    pub max_exec_ns: u64,
    /// Execution times of all attempts.
    pub hist: HistogramSnapshot,
}

impl HealthSnapshot {
    /// Attempts that delivered a verdict on the operation: `completed + failed + timed_out`
    /// (killed attempts are left out).
    fn judged(&self) -> u64 {
        self.completed + self.failed + self.timed_out
    }

    /// `completed / (completed + failed + timed_out)`; killed attempts are excluded. `None`
    /// before any such attempt.
    pub fn success_rate(&self) -> Option<f64> {
        let n = self.judged();
        (n > 0).then(|| self.completed as f64 / n as f64)
    }

    /// `(failed + timed_out) / (completed + failed + timed_out)` (`1 - success_rate`); `None`
    /// before any such attempt.
    pub fn failure_rate(&self) -> Option<f64> {
        let n = self.judged();
        (n > 0).then(|| (self.failed + self.timed_out) as f64 / n as f64)
    }

    /// The mean execution time in ns over all attempts; `None` before any.
    pub fn mean_exec_ns(&self) -> Option<f64> {
        (self.attempts > 0).then(|| self.exec_ns_sum as f64 / self.attempts as f64)
    }

    /// The `q` quantile of the execution times ([`HistogramSnapshot::quantile`], the bucket's
    /// upper edge) clamped to `max_exec_ns`.
    fn quantile(&self, q: f64) -> Option<u64> {
        self.hist.quantile(q).map(|v| v.min(self.max_exec_ns))
    }

    /// The median execution time in ns: the upper edge of its bucket (at most 12.5 % above the
    /// true median), never above `max_exec_ns`; `None` before any attempt.
    pub fn p50(&self) -> Option<u64> {
        self.quantile(0.5)
    }

    /// The 95th percentile of the execution times in ns, read as [`HealthSnapshot::p50`] is.
    pub fn p95(&self) -> Option<u64> {
        self.quantile(0.95)
    }

    /// The share of attempts that executed for at least `threshold_ns`, by
    /// [`HistogramSnapshot::count_at_least`] (so it may undercount the attempts in the bucket
    /// straddling the threshold); `None` before any attempt.
    pub fn slow_rate(&self, threshold_ns: u64) -> Option<f64> {
        let n = self.hist.total();
        (n > 0).then(|| self.hist.count_at_least(threshold_ns) as f64 / n as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn small_values_have_exact_buckets() {
        for v in 0..16u64 {
            assert_eq!(bucket_of(v), v as usize);
            assert_eq!((bucket_lower(v as usize), bucket_upper(v as usize)), (v, v));
        }
        assert_eq!(bucket_of(16), 16);
        assert_eq!(bucket_of(17), 16);
        assert_eq!(bucket_of(18), 17);
        assert_eq!((bucket_lower(16), bucket_upper(16)), (16, 17));
        assert_eq!(HIST_BUCKETS, 313);
    }

    #[test]
    fn buckets_tile_the_range_and_are_at_most_an_eighth_wide() {
        assert_eq!(bucket_lower(0), 0);
        for i in 0..LAST_BUCKET {
            let (lo, hi) = (bucket_lower(i), bucket_upper(i));
            assert!(lo <= hi);
            assert_eq!(bucket_of(lo), i, "lower edge of {i}");
            assert_eq!(bucket_of(hi), i, "upper edge of {i}");
            assert_eq!(
                bucket_lower(i + 1),
                hi + 1,
                "bucket {} starts after {i}",
                i + 1
            );
            if lo >= 8 {
                assert!((hi - lo + 1) * 8 <= lo, "bucket {i} is [{lo}, {hi}]");
            }
        }
        assert_eq!(bucket_lower(LAST_BUCKET), 1 << 41);
        assert_eq!(bucket_of((1 << 41) - 1), LAST_BUCKET - 1);
        assert_eq!(bucket_of(1 << 41), LAST_BUCKET);
        assert_eq!(bucket_of(u64::MAX), LAST_BUCKET);
        assert_eq!(bucket_upper(LAST_BUCKET), u64::MAX);
        // one octave: 8 sub-buckets of 2^(o-3) each
        assert_eq!(bucket_of(1_000_000), bucket_of(1_015_807));
        assert_eq!(bucket_lower(bucket_of(1_000_000)), 983_040); // (8 + 7) << 16
    }

    #[test]
    fn quantiles_report_the_bucket_upper_edge() {
        let h = DurationHistogram::new();
        let mut s = HistogramSnapshot::default();
        assert_eq!(s.quantile(0.5), None);
        for v in 1..=100 {
            h.record(v);
        }
        h.merge_into(&mut s);
        assert_eq!(s.total(), 100);
        assert_eq!(s.quantile(0.0), Some(1));
        assert_eq!(s.quantile(0.1), Some(10), "exact below 16");
        assert_eq!(s.quantile(0.5), Some(51), "50 is in [48, 51]");
        assert_eq!(s.quantile(0.95), Some(95), "95 is in [88, 95]");
        assert_eq!(s.quantile(1.0), Some(103), "100 is in [96, 103]");
        assert_eq!(s.quantile(f64::NAN), None);
        assert_eq!(s.quantile(7.0), s.quantile(1.0), "q is clamped");
        // within one bucket of the truth for large values too
        let h = DurationHistogram::new();
        h.record(123_456_789);
        let mut s = HistogramSnapshot::default();
        h.merge_into(&mut s);
        let q = s.quantile(0.5).unwrap();
        assert!((123_456_789..=123_456_789 * 9 / 8).contains(&q), "{q}");
    }

    #[test]
    fn count_at_least_leaves_out_the_straddling_bucket() {
        let h = DurationHistogram::new();
        for v in [5, 15, 16, 17, 18, 1_000, 1 << 41, u64::MAX] {
            h.record(v);
        }
        let mut s = HistogramSnapshot::default();
        h.merge_into(&mut s);
        assert_eq!(s.count_at_least(0), 8);
        assert_eq!(s.count_at_least(15), 7, "exact below 16");
        assert_eq!(s.count_at_least(16), 6, "16 is a lower edge");
        assert_eq!(
            s.count_at_least(17),
            4,
            "[16, 17] straddles 17: only 18 and up"
        );
        assert_eq!(s.count_at_least(1 << 41), 2);
        assert_eq!(s.count_at_least((1 << 41) + 1), 0);
        // two shards merge
        let h2 = DurationHistogram::new();
        h2.record(20);
        h2.merge_into(&mut s);
        assert_eq!(s.total(), 9);
    }

    #[test]
    fn outcome_names() {
        let names: Vec<_> = AttemptOutcome::ALL.iter().map(|o| o.name()).collect();
        assert_eq!(names, ["completed", "failed", "timed_out", "killed"]);
        for (i, o) in AttemptOutcome::ALL.iter().enumerate() {
            assert_eq!(*o as usize, i);
        }
    }

    #[test]
    fn a_snapshot_sums_the_shards() {
        let h = OpHealth::new(2);
        assert_eq!(h.snapshot(), {
            let mut e = HealthSnapshot::default();
            e.hist.counts = vec![0; HIST_BUCKETS];
            e
        });
        let s = h.snapshot();
        assert_eq!((s.success_rate(), s.failure_rate()), (None, None));
        assert_eq!(
            (s.mean_exec_ns(), s.p50(), s.slow_rate(1)),
            (None, None, None)
        );

        h.record(0, AttemptOutcome::Completed, 1_000, 10);
        h.record(1, AttemptOutcome::Completed, 3_000, 20);
        h.record(5, AttemptOutcome::Failed, 2_000, 30); // shard 5 % 2 = 1
        h.record(0, AttemptOutcome::TimedOut, 50_000, 40);
        h.record(1, AttemptOutcome::Killed, 4_000, 0);
        h.note_blocked();
        h.note_blocked();
        h.note_quarantined();
        let s = h.snapshot();
        assert_eq!(
            (s.attempts, s.completed, s.failed, s.timed_out, s.killed),
            (5, 2, 1, 1, 1)
        );
        assert_eq!((s.blocked, s.quarantined), (2, 1));
        assert_eq!(
            (s.exec_ns_sum, s.queue_ns_sum, s.max_exec_ns),
            (60_000, 100, 50_000)
        );
        assert_eq!(s.hist.total(), 5, "every attempt, killed ones too");
        assert_eq!(s.success_rate(), Some(0.5), "killed attempts are excluded");
        assert_eq!(s.failure_rate(), Some(0.5));
        assert_eq!(s.mean_exec_ns(), Some(12_000.0));
        let p50 = s.p50().unwrap();
        assert!((3_000..=3_000 * 9 / 8).contains(&p50), "{p50}");
        assert_eq!(s.p95(), Some(50_000), "clamped to the maximum");
        assert_eq!(
            s.slow_rate(3_840),
            Some(0.4),
            "4 µs and 50 µs: 3840 is a lower edge"
        );
        assert_eq!(
            s.slow_rate(4_000),
            Some(0.2),
            "[3840, 4095] straddles 4000: left out"
        );
        assert_eq!(s.slow_rate(1 << 30), Some(0.0));
    }

    #[test]
    fn the_last_bucket_reports_the_maximum() {
        let h = OpHealth::new(1);
        h.record(0, AttemptOutcome::Completed, 3 << 41, 0);
        let s = h.snapshot();
        assert_eq!(s.hist.quantile(0.5), Some(u64::MAX));
        assert_eq!(s.p50(), Some(3 << 41));
    }

    #[test]
    fn concurrent_records_are_all_counted() {
        let h = Arc::new(OpHealth::new(2));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let h = h.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000u64 {
                        let o = AttemptOutcome::ALL[(i % 4) as usize];
                        h.record(t % 2, o, i, 1);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let s = h.snapshot();
        assert_eq!(s.attempts, 40_000);
        assert_eq!(
            (s.completed, s.failed, s.timed_out, s.killed),
            (10_000, 10_000, 10_000, 10_000)
        );
        assert_eq!(s.hist.total(), 40_000);
        assert_eq!(s.exec_ns_sum, 4 * (0..10_000).sum::<u64>());
        assert_eq!((s.queue_ns_sum, s.max_exec_ns), (40_000, 9_999));
    }

    #[test]
    fn cumulative_counts_at_bounds_are_monotone_and_end_at_the_total() {
        let h = DurationHistogram::new();
        for v in [5u64, 900, 1_000, 1_100, 50_000, 2_000_000, u64::MAX / 2] {
            h.record(v);
        }
        let mut s = HistogramSnapshot::default();
        h.merge_into(&mut s);
        let c = s.cumulative_at(&[10, 1_000, 100_000, 1_000_000_000, u64::MAX]);
        assert_eq!(c[0], 1);
        // 900 and 1000 are at most the bound 1000; 1100 is more than 12.5 % above it
        assert_eq!(c[1], 3);
        assert_eq!(c[2], 5);
        assert_eq!(c[3], 6);
        assert_eq!(c[4], 7);
        assert!(c.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn token_outcomes_are_counted_per_token_apart_from_attempts() {
        let h = OpHealth::new(2);
        h.note_token(0, TokenOutcome::Completed);
        h.note_token(1, TokenOutcome::Completed);
        h.note_token(7, TokenOutcome::Retried);
        h.note_refused();
        let s = h.snapshot();
        assert_eq!(s.tokens, [2, 0, 0, 0, 1]);
        assert_eq!(s.refused, 1);
        assert_eq!(s.attempts, 0);
    }
}
