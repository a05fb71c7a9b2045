//! The expected cost of a call (pure Rust): per operation, an online model of an attempt's
//! duration from one feature of its arguments, used to tell a call that is slow because it is
//! big from one that is slow for no reason (a spike).
//!
//! Feature: `x = ln(1 + size)`, where `size >= 0` is computed by the caller (the sum of the
//! lengths or magnitudes of the arguments); NaN, infinite and negative sizes count as 0.
//! Target: `y = ln(max(duration_ns, 100))` (durations below 100 ns are noise).
//!
//! Fit: a least-squares line `y = a + b x` over exponentially weighted samples, each older
//! sample's weight multiplied by `1 - 1/window` per new sample, so the model follows drift
//! (it effectively remembers the last `window` samples). With the weighted means `mx`, `my`,
//! the variance `vxx` of `x` and the covariance `cxy`, the slope is a ridge estimate pulled
//! toward the prior slope `b0 = 1` (cost linear in size):
//! `b = (cxy + tau * b0) / (vxx + tau)` with `tau = 0.05`, clamped to `[0, 3]`, and
//! `a = my - b * mx`. When all sizes are the same (`vxx = 0`) the prior decides the
//! prediction; once sizes spread, the data does. A call is judged a spike only once the sizes
//! learnt from spread ([`MIN_SPREAD`], the zero-spread guard of [`judge`]): the prior alone is
//! no evidence that a bigger call costs more.
//!
//! The weighted moments are kept centred (running means and co-moments, updated the way
//! Welford's algorithm does) rather than as raw sums `sxx`, `sxy`: the same fit in exact
//! arithmetic, without the cancellation of `sxx/n - mx^2`, and exactly `vxx = 0` when the
//! sizes do not vary.
//!
//! Updates take one `Mutex` (once per completed attempt of an operation that uses a model).

use std::sync::Mutex;

use crate::sync::lock;

/// The default `window`: samples the model effectively remembers.
pub const DEFAULT_WINDOW: usize = 1000;

/// The default `min_samples`: observations before the model predicts.
pub const DEFAULT_MIN_SAMPLES: u64 = 20;

/// The slope the fit is pulled toward: cost linear in size.
pub const PRIOR_SLOPE: f64 = 1.0;

/// The weight of the prior slope (`tau`), in units of the variance of `x`.
pub const RIDGE: f64 = 0.05;

/// The largest slope (cost cubic in size).
pub const MAX_SLOPE: f64 = 3.0;

/// Durations are floored to this many ns before the logarithm.
pub const MIN_DURATION_NS: u64 = 100;

/// The model's feature of a size: `ln(1 + size)`, with NaN, infinite and negative sizes as 0.
#[inline]
fn feature(size: f64) -> f64 {
    if size.is_finite() && size > 0.0 {
        size.ln_1p()
    } else {
        0.0
    }
}

/// The model's target for a duration: `ln(max(ns, MIN_DURATION_NS))`.
#[inline]
fn target(ns: u64) -> f64 {
    (ns.max(MIN_DURATION_NS) as f64).ln()
}

/// `exp(l)` in whole ns, saturating (`l` is never NaN here).
#[inline]
fn to_ns(l: f64) -> u64 {
    l.exp().round() as u64
}

/// What the model expects of a call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Prediction {
    /// The expected duration of this call, in ns: `exp(a + b x)`.
    pub predicted_ns: u64,
    /// The typical attempt, in ns: `exp(my)` (the prediction for the typical size).
    pub baseline_ns: u64,
    /// `predicted / baseline` (`exp(b (x - mx))`): how much longer than a typical attempt this
    /// call is expected to take because of its size. Finite, at least 0.
    pub deviation: f64,
    /// The spread (standard deviation) of the sizes learnt from, in `ln(1 + size)`: below
    /// [`MIN_SPREAD`] the model has not seen sizes vary and may not judge a call by its size.
    pub spread: f64,
}

/// The least spread of learnt sizes (std of `ln(1 + size)`, about 10 % variation) with which a
/// call may be judged a spike: with every call so far the same size (or nearly), the model
/// cannot know how cost follows size, and a call of a new size is no evidence of a spike (the
/// zero-spread guard).
pub const MIN_SPREAD: f64 = 0.1;

/// A copy of a model's state.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelView {
    /// The effective number of samples (their total weight; approaches `window`).
    pub samples: f64,
    /// Observations ever.
    pub raw_samples: u64,
    /// The fitted slope `b` (the prior slope before any spread in the sizes).
    pub slope: f64,
    /// The typical attempt in ns (`exp(my)`); `None` before any observation.
    pub baseline_ns: Option<u64>,
    /// How far off predictions typically are: `exp(e) - 1` for the weighted mean `e` of
    /// `|ln(actual / predicted)|` (0.3: typically off by 30 %); `None` before any
    /// [`CostModel::note_error`].
    pub typical_error: Option<f64>,
    /// The typical size: `exp(mx) - 1`, the size whose prediction is the baseline (0 before
    /// any observation).
    pub mean_size: f64,
}

#[derive(Debug)]
struct Inner {
    /// `1 - 1/window`: each sample's weight is multiplied by it per new sample.
    keep: f64,
    min_samples: u64,
    /// Total weight of the samples.
    n: f64,
    mx: f64,
    my: f64,
    /// Weighted co-moments: `sum w (x - mx)^2` and `sum w (x - mx)(y - my)`.
    mxx: f64,
    mxy: f64,
    raw: u64,
    /// Total weight and weighted sum of the `|ln(actual / predicted)|` noted.
    err_n: f64,
    err_sum: f64,
}

impl Inner {
    fn slope(&self) -> f64 {
        if self.n <= 0.0 {
            return PRIOR_SLOPE;
        }
        let vxx = (self.mxx / self.n).max(0.0);
        let cxy = self.mxy / self.n;
        let b = (cxy + RIDGE * PRIOR_SLOPE) / (vxx + RIDGE);
        if b.is_finite() {
            b.clamp(0.0, MAX_SLOPE)
        } else {
            PRIOR_SLOPE
        }
    }
}

fn keep_of(window: usize) -> f64 {
    1.0 - 1.0 / window.max(1) as f64
}

/// An online model of one operation's attempt durations (see the module docs).
#[derive(Debug)]
pub struct CostModel {
    inner: Mutex<Inner>,
}

impl Default for CostModel {
    /// `CostModel::new(DEFAULT_WINDOW, DEFAULT_MIN_SAMPLES)`.
    fn default() -> Self {
        CostModel::new(DEFAULT_WINDOW, DEFAULT_MIN_SAMPLES)
    }
}

impl CostModel {
    /// An empty model that forgets with factor `1 - 1/window` (`window` 0 counts as 1: only
    /// the last sample) and predicts after `min_samples` observations (at least 1).
    pub fn new(window: usize, min_samples: u64) -> Self {
        CostModel {
            inner: Mutex::new(Inner {
                keep: keep_of(window),
                min_samples,
                n: 0.0,
                mx: 0.0,
                my: 0.0,
                mxx: 0.0,
                mxy: 0.0,
                raw: 0,
                err_n: 0.0,
                err_sum: 0.0,
            }),
        }
    }

    /// Changes the window and `min_samples` (as in [`CostModel::new`]); what was learnt stays
    /// and is forgotten at the new rate from now on.
    pub fn set_params(&self, window: usize, min_samples: u64) {
        let mut g = lock(&self.inner);
        g.keep = keep_of(window);
        g.min_samples = min_samples;
    }

    /// Learns from one completed attempt of a call of size `size` that ran `duration_ns`.
    pub fn observe(&self, size: f64, duration_ns: u64) {
        observe_into(&mut lock(&self.inner), size, duration_ns);
    }

    /// What the model expects of a call of size `size`; `None` until it has seen
    /// `min_samples` observations (at least 1).
    pub fn predict(&self, size: f64) -> Option<Prediction> {
        let x = feature(size);
        let g = lock(&self.inner);
        if g.raw < g.min_samples.max(1) {
            return None;
        }
        let ln_dev = g.slope() * (x - g.mx);
        Some(Prediction {
            predicted_ns: to_ns(g.my + ln_dev),
            baseline_ns: to_ns(g.my),
            deviation: ln_dev.exp().min(f64::MAX),
            spread: (g.mxx / g.n).max(0.0).sqrt(),
        })
    }

    /// Notes how far a prediction was off: `|ln(actual / predicted)|` (both floored to
    /// [`MIN_DURATION_NS`]) joins an exponentially weighted mean with the model's forgetting
    /// factor. `predicted_ns == 0` (no prediction) is ignored.
    pub fn note_error(&self, predicted_ns: u64, actual_ns: u64) {
        note_error_into(&mut lock(&self.inner), predicted_ns, actual_ns);
    }

    /// [`CostModel::note_error`] (when `predicted_ns > 0`) and [`CostModel::observe`] of one
    /// completed attempt, under one lock.
    pub fn learn(&self, size: f64, duration_ns: u64, predicted_ns: u64) {
        let mut g = lock(&self.inner);
        note_error_into(&mut g, predicted_ns, duration_ns);
        observe_into(&mut g, size, duration_ns);
    }

    /// A copy of the model's state.
    pub fn view(&self) -> ModelView {
        let g = lock(&self.inner);
        let seen = g.raw > 0;
        ModelView {
            samples: g.n,
            raw_samples: g.raw,
            slope: g.slope(),
            baseline_ns: seen.then(|| to_ns(g.my)),
            typical_error: (g.err_n > 0.0).then(|| (g.err_sum / g.err_n).exp() - 1.0),
            mean_size: if seen { g.mx.exp_m1() } else { 0.0 },
        }
    }
}

fn observe_into(g: &mut Inner, size: f64, duration_ns: u64) {
    let (x, y) = (feature(size), target(duration_ns));
    let old = g.n * g.keep;
    let n = old + 1.0;
    let (dx, dy) = (x - g.mx, y - g.my);
    g.mx += dx / n;
    g.my += dy / n;
    // merging weight `old` (centred at the old means) with one sample at (x, y)
    let f = old / n;
    g.mxx = g.keep * g.mxx + f * dx * dx;
    g.mxy = g.keep * g.mxy + f * dx * dy;
    g.n = n;
    g.raw += 1;
}

fn note_error_into(g: &mut Inner, predicted_ns: u64, actual_ns: u64) {
    if predicted_ns == 0 {
        return;
    }
    let e = (target(actual_ns) - target(predicted_ns)).abs();
    g.err_n = g.err_n * g.keep + 1.0;
    g.err_sum = g.err_sum * g.keep + e;
}

/// Whether a call is a spike: its predicted deviation from the typical attempt is at least
/// `threshold` (e.g. 3.0: three times the baseline), and the sizes learnt from had spread
/// enough ([`MIN_SPREAD`]) to say how cost follows size. The one place the rule lives.
#[inline]
pub fn judge(pred: &Prediction, threshold: f64) -> bool {
    pred.spread >= MIN_SPREAD && pred.deviation >= threshold
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sizes 10, 11, ..., 100, 10, 11, ... (`n` of them).
    fn sizes(n: usize) -> impl Iterator<Item = f64> {
        (0..n).map(|i| (10 + i % 91) as f64)
    }

    fn close(a: f64, b: f64, rel: f64) -> bool {
        (a - b).abs() <= rel * b.abs()
    }

    #[test]
    fn nothing_is_predicted_before_min_samples() {
        let m = CostModel::new(1000, 20);
        assert_eq!(m.predict(10.0), None);
        let v = m.view();
        assert_eq!(
            (v.raw_samples, v.baseline_ns, v.typical_error),
            (0, None, None)
        );
        assert_eq!((v.slope, v.mean_size, v.samples), (PRIOR_SLOPE, 0.0, 0.0));
        for s in sizes(19) {
            m.observe(s, 1_000);
        }
        assert_eq!(m.predict(10.0), None);
        m.observe(10.0, 1_000);
        assert!(m.predict(10.0).is_some());
        m.set_params(1000, 50);
        assert_eq!(m.predict(10.0), None, "min_samples raised");
        let m = CostModel::new(1000, 0);
        assert_eq!(m.predict(1.0), None, "at least one observation");
    }

    #[test]
    fn a_linear_cost_op_flags_a_huge_call() {
        let m = CostModel::default();
        for s in sizes(2_000) {
            m.observe(s, (1_000.0 * s) as u64);
        }
        let v = m.view();
        assert!(close(v.slope, 1.0, 0.05), "slope {}", v.slope);
        // the typical attempt is about the geometric mean of 10 µs .. 100 µs
        let base = v.baseline_ns.unwrap();
        assert!((40_000..=55_000).contains(&base), "baseline {base}");
        let p = m.predict(10_000.0).unwrap();
        assert!(close(p.predicted_ns as f64, 1e7, 0.15), "{p:?}");
        assert_eq!(p.baseline_ns, base);
        assert!(
            close(p.deviation, p.predicted_ns as f64 / base as f64, 1e-3),
            "{p:?}"
        );
        // 10 ms against a ~48 µs geometric-mean baseline: about 230x
        assert!((100.0..400.0).contains(&p.deviation), "{p:?}");
        assert!(judge(&p, 3.0));
        // a typical call is no spike
        let p = m.predict(50.0).unwrap();
        assert!(close(p.predicted_ns as f64, 50_000.0, 0.1), "{p:?}");
        assert!(!judge(&p, 3.0));
    }

    #[test]
    fn a_constant_cost_op_learns_a_flat_slope() {
        let m = CostModel::default();
        for s in sizes(2_000) {
            m.observe(s, 50_000);
        }
        let v = m.view();
        assert!(v.slope < 0.2, "slope {}", v.slope);
        assert_eq!(v.baseline_ns, Some(50_000));
        let p = m.predict(10_000.0).unwrap();
        assert!(!judge(&p, 3.0), "{p:?}");
    }

    #[test]
    fn without_spread_in_the_sizes_the_prior_slope_decides() {
        let m = CostModel::new(1000, 5);
        for i in 0..100u64 {
            m.observe(50.0, 1_000 + i * 100); // durations vary, the size does not
        }
        let v = m.view();
        assert_eq!(v.slope, PRIOR_SLOPE);
        assert!(close(v.mean_size, 50.0, 1e-9), "{v:?}");
        let p = m.predict(5_099.0).unwrap();
        assert!(close(p.deviation, 100.0, 1e-6), "{p:?}");
        assert_eq!(p.spread, 0.0);
        assert!(!judge(&p, 3.0), "no spread in the sizes: no judgement");
    }

    #[test]
    fn learn_is_note_error_then_observe() {
        let (a, b) = (CostModel::new(100, 1), CostModel::new(100, 1));
        for (i, s) in sizes(50).enumerate() {
            let d = 1_000 + 37 * i as u64;
            let p = if i % 3 == 0 { 0 } else { 900 + i as u64 };
            a.learn(s, d, p);
            b.note_error(p, d);
            b.observe(s, d);
        }
        assert_eq!(a.view(), b.view());
    }

    #[test]
    fn the_baseline_follows_drift() {
        let m = CostModel::default();
        for s in sizes(5_000) {
            m.observe(s, 1_000);
        }
        assert_eq!(m.view().baseline_ns, Some(1_000));
        for s in sizes(5_000) {
            m.observe(s, 10_000);
        }
        let v = m.view();
        let base = v.baseline_ns.unwrap();
        assert!(close(base as f64, 10_000.0, 0.03), "baseline {base}");
        assert!(close(v.samples, 1_000.0, 0.01), "effective n {}", v.samples);
        assert_eq!(v.raw_samples, 10_000);
    }

    #[test]
    fn bad_sizes_count_as_zero_and_never_produce_nan() {
        let m = CostModel::new(100, 1);
        for (i, s) in [
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            -5.0,
            0.0,
            f64::MAX,
        ]
        .into_iter()
        .cycle()
        .take(60)
        .enumerate()
        {
            m.observe(s, if i % 2 == 0 { 0 } else { u64::MAX });
        }
        let v = m.view();
        assert!(v.slope.is_finite() && v.samples.is_finite() && v.mean_size.is_finite());
        for s in [f64::NAN, f64::INFINITY, -1.0, 0.0, 1e300, f64::MAX] {
            let p = m.predict(s).unwrap();
            assert!(
                !p.deviation.is_nan() && p.deviation.is_finite(),
                "{s}: {p:?}"
            );
            assert!(p.deviation >= 0.0);
        }
        assert_eq!(m.predict(f64::NAN), m.predict(0.0));
        assert_eq!(m.predict(-3.0), m.predict(0.0));
        // a steep model asked about an astronomic size saturates instead of overflowing
        let m = CostModel::new(1000, 1);
        for s in sizes(500) {
            m.observe(s, (s * s * s * s) as u64);
        }
        assert_eq!(m.view().slope, MAX_SLOPE);
        let p = m.predict(f64::MAX).unwrap();
        assert_eq!(p.predicted_ns, u64::MAX);
        assert!(p.deviation.is_finite() && judge(&p, 3.0));
        assert!(!judge(&p, f64::NAN));
    }

    #[test]
    fn typical_error_tracks_how_far_off_predictions_are() {
        let m = CostModel::default();
        m.note_error(0, 5_000); // no prediction: ignored
        assert_eq!(m.view().typical_error, None);
        for _ in 0..50 {
            m.note_error(1_000, 1_300);
            m.note_error(1_300, 1_000); // as far off the other way
        }
        let e = m.view().typical_error.unwrap();
        assert!(close(e, 0.3, 1e-9), "{e}");
    }
}
