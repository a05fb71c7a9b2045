//! The Guard House in the core (binding side): per operation, its health counters, its
//! circuit breaker (the gate every call passes), its cost model (spike detection), and the
//! runtime's execution history. The rules themselves are pure Rust (`breaker.rs`,
//! `health.rs`, `model.rs`, `history.rs`); this file finds an operation's state for a call and
//! feeds it, and turns what it decides into Python errors and records.
//!
//! Cost on the hot path: a call finds its operation through a small per-thread cache (a
//! pointer compare on the interned name), the breaker gate is one atomic load while closed,
//! and a worker records an attempt with relaxed atomics on its core's shard plus one slot of
//! its core's history ring. Breaker windows and cost models take a lock per attempt, but only
//! for operations that use them.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use pyo3::exceptions::{PyBaseException, PyException};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};

use crate::breaker::{Breaker, BreakerConfig, BreakerState, Refusal, Ticket, Window};
use crate::clock::now_ns;
use crate::errors::{error_class, fmt_secs, CoreError};
use crate::health::{AttemptOutcome, OpHealth};
use crate::history::{ExecRecord, History};
use crate::model::{judge, CostModel, Prediction};
use crate::state::TokenState;
use crate::sync::lock;
use crate::token::{OpSpec, TaskToken};

/// The quarantine settings of one operation.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QuarantineConf {
    pub enabled: bool,
    /// A call is a spike when its predicted cost is at least this many times the baseline.
    pub threshold: f64,
    /// Attempts the model must have seen before it may judge.
    pub min_samples: u32,
}

impl Default for QuarantineConf {
    fn default() -> Self {
        QuarantineConf {
            enabled: false,
            threshold: 3.0,
            min_samples: 20,
        }
    }
}

/// What a decorator (or `guard_house.configure`) declares for an operation. Fields left None
/// keep the coordinator's defaults.
#[derive(Default)]
pub(crate) struct GuardDecl {
    pub breaker: Option<BreakerConfig>,
    pub quarantine: Option<QuarantineConf>,
    pub predict: Option<bool>,
    /// Exceptions that count as failures for the breaker (default: any `Exception`).
    pub failure_on: Option<Py<PyTuple>>,
    /// Exceptions that never count as failures.
    pub ignore: Option<Py<PyTuple>>,
}

impl GuardDecl {
    /// Parses the `guard=` dict the Python layer built (validated there): keys `breaker`
    /// (dict), `quarantine` (dict), `predict`, `failure_on`, `ignore`.
    pub fn from_dict(d: &Bound<'_, PyDict>) -> PyResult<GuardDecl> {
        let mut decl = GuardDecl::default();
        if let Some(b) = d.get_item("breaker")?.filter(|b| !b.is_none()) {
            decl.breaker = Some(breaker_config(&b.cast_into::<PyDict>()?)?);
        }
        if let Some(q) = d.get_item("quarantine")?.filter(|q| !q.is_none()) {
            decl.quarantine = Some(quarantine_conf(&q.cast_into::<PyDict>()?)?);
        }
        if let Some(p) = d.get_item("predict")?.filter(|p| !p.is_none()) {
            decl.predict = Some(p.extract()?);
        }
        if let Some(t) = d.get_item("failure_on")?.filter(|t| !t.is_none()) {
            decl.failure_on = Some(t.cast_into::<PyTuple>()?.unbind());
        }
        if let Some(t) = d.get_item("ignore")?.filter(|t| !t.is_none()) {
            decl.ignore = Some(t.cast_into::<PyTuple>()?.unbind());
        }
        Ok(decl)
    }

    fn clone_ref(&self, py: Python<'_>) -> GuardDecl {
        GuardDecl {
            breaker: self.breaker.clone(),
            quarantine: self.quarantine,
            predict: self.predict,
            failure_on: self.failure_on.as_ref().map(|t| t.clone_ref(py)),
            ignore: self.ignore.as_ref().map(|t| t.clone_ref(py)),
        }
    }

    /// `self` with the fields `over` sets replaced.
    fn merged(&self, py: Python<'_>, over: &GuardDecl) -> GuardDecl {
        let mut d = self.clone_ref(py);
        if over.breaker.is_some() {
            d.breaker = over.breaker.clone();
        }
        if over.quarantine.is_some() {
            d.quarantine = over.quarantine;
        }
        if over.predict.is_some() {
            d.predict = over.predict;
        }
        if over.failure_on.is_some() {
            d.failure_on = over.failure_on.as_ref().map(|t| t.clone_ref(py));
        }
        if over.ignore.is_some() {
            d.ignore = over.ignore.as_ref().map(|t| t.clone_ref(py));
        }
        d
    }
}

fn get<'py, T: pyo3::conversion::FromPyObjectOwned<'py>>(
    d: &Bound<'py, PyDict>,
    key: &str,
) -> PyResult<Option<T>> {
    match d.get_item(key)? {
        Some(v) if !v.is_none() => Ok(Some(v.extract().map_err(Into::into)?)),
        _ => Ok(None),
    }
}

/// A `BreakerConfig` from the dict `tokengate.guard.breaker.CircuitBreaker.to_core()` makes
/// (durations in ns).
pub(crate) fn breaker_config(d: &Bound<'_, PyDict>) -> PyResult<BreakerConfig> {
    let mut c = BreakerConfig::default();
    if let Some(v) = get(d, "auto")? {
        c.auto = v;
    }
    if let Some(v) = get(d, "failure_rate")? {
        c.failure_rate = v;
    }
    if let Some(v) = get(d, "slow_call_rate")? {
        c.slow_call_rate = v;
    }
    c.slow_call_ns = get(d, "slow_call_ns")?;
    if let Some(n) = get::<u32>(d, "window_calls")? {
        c.window = Window::Count(n);
    }
    if let Some(ns) = get::<u64>(d, "window_ns")? {
        c.window = Window::Time { ns };
    }
    if let Some(v) = get(d, "min_calls")? {
        c.min_calls = v;
    }
    c.consecutive_failures = get(d, "consecutive_failures")?;
    if let Some(v) = get(d, "open_ns")? {
        c.open_ns = v;
    }
    if let Some(v) = get(d, "open_backoff")? {
        c.open_backoff = v;
    }
    if let Some(v) = get(d, "open_max_ns")? {
        c.open_max_ns = v;
    }
    if let Some(v) = get(d, "jitter")? {
        c.jitter = v;
    }
    if let Some(v) = get(d, "half_open_probes")? {
        c.half_open_probes = v;
    }
    c.validate().map_err(CoreError::Config)?;
    Ok(c)
}

fn quarantine_conf(d: &Bound<'_, PyDict>) -> PyResult<QuarantineConf> {
    let mut q = QuarantineConf::default();
    if let Some(v) = get(d, "enabled")? {
        q.enabled = v;
    }
    if let Some(v) = get(d, "threshold")? {
        q.threshold = v;
    }
    if let Some(v) = get(d, "min_samples")? {
        q.min_samples = v;
    }
    if !(q.threshold.is_finite() && q.threshold > 1.0) || q.min_samples == 0 {
        return Err(CoreError::Config(format!(
            "quarantine threshold must be a number > 1 and min_samples >= 1, got {} and {}",
            q.threshold, q.min_samples
        ))
        .into());
    }
    Ok(q)
}

/// Which exceptions count as breaker failures: `failure_on` (None: any `Exception`), never
/// `ignore`.
#[derive(Default)]
struct Classes {
    failure_on: Option<Py<PyTuple>>,
    ignore: Option<Py<PyTuple>>,
}

/// Which settings of an operation `configure()` set (the code's declarations leave them).
#[derive(Default, Clone, Copy)]
struct Configured {
    breaker: bool,
    quarantine: bool,
    predict: bool,
    failure_on: bool,
    ignore: bool,
}

/// The last failure of an operation.
struct LastError {
    kind: String,
    message: String,
    at: f64,
}

/// Everything the Guard House keeps for one operation (by name) of one runtime.
pub(crate) struct OpGuard {
    /// Its place in the runtime's table (history records carry it).
    index: u32,
    name: String,
    health: OpHealth,
    breaker: Breaker,
    /// Whether results feed the breaker (its `auto`); manual buttons work either way.
    breaker_auto: AtomicBool,
    model: CostModel,
    /// Whether calls are featurized and predicted: asked for (`predict_wanted`), or implied
    /// by quarantine.
    predict: AtomicBool,
    predict_wanted: AtomicBool,
    quarantine: Mutex<QuarantineConf>,
    quarantine_on: AtomicBool,
    /// The inspector's score of its function (f32 bits; NaN: unknown).
    complexity: AtomicU32,
    /// A weak reference to the function to score when asked, for an operation first seen
    /// without a score (a `submit(fn)` call): the inspector (a parse of its source) never runs
    /// on a submit, and the operation does not keep the function alive.
    unscored: Mutex<Option<Py<pyo3::types::PyWeakrefReference>>>,
    last_error: Mutex<Option<LastError>>,
    classes: Mutex<Classes>,
    /// Whether a function's declaration was applied to it (the first one to come).
    declared: AtomicBool,
    configured: Mutex<Configured>,
    /// The breaker's slow-call threshold in ns (0: none), for the health report.
    slow_ns: AtomicU64,
}

impl OpGuard {
    /// Applies what a function declares, except what `configure()` set for this operation
    /// (an operator's setting wins over the code's).
    fn apply_declared(&self, py: Python<'_>, d: &GuardDecl) {
        let c = *lock(&self.configured);
        self.apply(
            py,
            &GuardDecl {
                breaker: d.breaker.clone().filter(|_| !c.breaker),
                quarantine: d.quarantine.filter(|_| !c.quarantine),
                predict: d.predict.filter(|_| !c.predict),
                failure_on: d
                    .failure_on
                    .as_ref()
                    .filter(|_| !c.failure_on)
                    .map(|t| t.clone_ref(py)),
                ignore: d
                    .ignore
                    .as_ref()
                    .filter(|_| !c.ignore)
                    .map(|t| t.clone_ref(py)),
            },
        );
    }

    /// Applies `configure()` settings and remembers which ones it set.
    fn apply_configured(&self, py: Python<'_>, d: &GuardDecl) {
        {
            let mut c = lock(&self.configured);
            c.breaker |= d.breaker.is_some();
            c.quarantine |= d.quarantine.is_some();
            c.predict |= d.predict.is_some();
            c.failure_on |= d.failure_on.is_some();
            c.ignore |= d.ignore.is_some();
        }
        self.apply(py, d);
    }

    fn apply(&self, py: Python<'_>, d: &GuardDecl) {
        if let Some(b) = &d.breaker {
            self.breaker_auto.store(b.auto, Ordering::Release);
            self.slow_ns
                .store(b.slow_call_ns.unwrap_or(0), Ordering::Relaxed);
            self.breaker.set_config(b.clone());
        }
        if let Some(q) = d.quarantine {
            *lock(&self.quarantine) = q;
            self.quarantine_on.store(q.enabled, Ordering::Release);
            self.model.set_params(1000, q.min_samples as u64);
        }
        if let Some(p) = d.predict {
            self.predict_wanted.store(p, Ordering::Release);
        }
        let predict = self.predict_wanted.load(Ordering::Acquire)
            || self.quarantine_on.load(Ordering::Acquire);
        self.predict.store(predict, Ordering::Release);
        let mut classes = lock(&self.classes);
        if let Some(t) = &d.failure_on {
            classes.failure_on = Some(t.clone_ref(py));
        }
        if let Some(t) = &d.ignore {
            classes.ignore = Some(t.clone_ref(py));
        }
    }

    /// Whether `e` counts as a failure for the breaker: an `Exception` (or one of
    /// `failure_on`), not one of `ignore`, never a kill or cancellation.
    fn counts_as_failure(&self, py: Python<'_>, e: &Bound<'_, PyBaseException>) -> bool {
        let never = ["TokenKilled", "TokenCancelled", "TokenQuarantined"];
        if never
            .iter()
            .any(|n| error_class(py, n).is_ok_and(|c| e.is_instance(&c).unwrap_or(false)))
        {
            return false;
        }
        let (on, ignore) = {
            let c = lock(&self.classes);
            (
                c.failure_on.as_ref().map(|t| t.clone_ref(py)),
                c.ignore.as_ref().map(|t| t.clone_ref(py)),
            )
        };
        if let Some(ig) = ignore {
            if e.is_instance(ig.bind(py).as_any()).unwrap_or(false) {
                return false;
            }
        }
        match on {
            Some(on) => e.is_instance(on.bind(py).as_any()).unwrap_or(false),
            None => e.is_instance_of::<PyException>(),
        }
    }

    /// The inspector's score of the operation's function, computed on first use if the
    /// operation was first seen without one.
    fn complexity(&self, py: Python<'_>) -> Option<f64> {
        use pyo3::types::PyWeakrefMethods;
        let unscored = lock(&self.unscored).take();
        if let Some(func) = unscored.and_then(|w| w.bind(py).upgrade()) {
            if let Some(c) = inspect_score(py, &func) {
                self.complexity.store(c.to_bits(), Ordering::Relaxed);
            }
        }
        let c = f32::from_bits(self.complexity.load(Ordering::Relaxed));
        c.is_finite().then_some(c as f64)
    }
}

/// The operations of a runtime, by name (append-only while the runtime lives).
#[derive(Default)]
struct Registry {
    ops: Vec<Arc<OpGuard>>,
    by_name: HashMap<String, u32>,
}

/// The Guard House of one runtime.
pub(crate) struct GuardHouse {
    uid: u64,
    registry: Mutex<Registry>,
    /// The coordinator's defaults for operations that declare nothing.
    defaults: Mutex<GuardDecl>,
    pub history: History,
    /// Where quarantined calls go (`GuardHouse._on_quarantine` of the Python layer).
    hook: Option<Py<PyAny>>,
    shards: usize,
}

static NEXT_UID: AtomicU64 = AtomicU64::new(1);

/// One entry of a thread's cache of operations: the name object it was found by (kept alive,
/// so its address cannot be reused while cached) and the runtime it belongs to.
struct Cached {
    uid: u64,
    name: usize,
    _keep: Py<PyString>,
    op: Arc<OpGuard>,
}

const CACHE_SIZE: usize = 8;

thread_local! {
    static CACHE: RefCell<Vec<Cached>> = const { RefCell::new(Vec::new()) };
}

/// What the gate decided for a call that may go ahead.
#[derive(Default)]
pub(crate) struct Gate {
    /// The half-open probe this call is (given back if it never runs).
    pub probe: Option<Ticket>,
    /// The size feature of its arguments and the prediction, for operations that predict.
    pub size: Option<f32>,
    pub prediction: Option<Prediction>,
    /// Set when the call is to be quarantined instead of run.
    pub spike: bool,
    pub threshold: f64,
}

/// What a worker notes when an attempt starts (for the end of the attempt).
pub(crate) struct Started<'a> {
    g: &'a OpGuard,
    note: AttemptNote,
    /// Whether the note is also in the token (a token with a timeout: its deadline may end
    /// the attempt first, and then notes it itself).
    shared: bool,
}

/// An attempt as it started: the breaker generation its result counts against, the probe
/// ticket it runs as (if any), and when it started.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AttemptNote {
    attempt: u32,
    gen: u32,
    probe: Option<Ticket>,
    started_ns: u64,
}

impl GuardHouse {
    pub fn new(history: usize, shards: usize, hook: Option<Py<PyAny>>) -> GuardHouse {
        GuardHouse {
            uid: NEXT_UID.fetch_add(1, Ordering::Relaxed),
            registry: Mutex::new(Registry::default()),
            defaults: Mutex::new(GuardDecl::default()),
            // One ring for the whole runtime: it keeps the newest records whichever core
            // ran them (workers hand the GIL around in batches, so its head seldom moves
            // between cores).
            history: History::new(history, 1),
            hook,
            shards: shards.max(1),
        }
    }

    /// The operation named `name` (created on first sight, with the coordinator's defaults and
    /// what `spec` declares). Found through this thread's cache without a lock.
    pub fn op<'a>(
        &'a self,
        py: Python<'_>,
        name: &Bound<'_, PyString>,
        spec: Option<&OpSpec>,
    ) -> &'a OpGuard {
        let key = name.as_ptr() as usize;
        let hit = CACHE.with(|c| {
            c.borrow()
                .iter()
                .find(|e| e.uid == self.uid && e.name == key)
                .map(|e| Arc::as_ptr(&e.op))
        });
        let ptr = match hit {
            Some(p) => p,
            None => {
                let op = self.get_or_create(py, name, spec);
                let p = Arc::as_ptr(&op);
                CACHE.with(|c| {
                    let mut c = c.borrow_mut();
                    if c.len() >= CACHE_SIZE {
                        c.remove(0);
                    }
                    c.push(Cached {
                        uid: self.uid,
                        name: key,
                        _keep: name.clone().unbind(),
                        op,
                    });
                });
                p
            }
        };
        // SAFETY: the registry keeps an Arc of every operation for as long as `self` lives
        // (entries are never removed), so the pointer outlives the borrow of `self`.
        unsafe { &*ptr }
    }

    /// The operation of calls of `spec`. The first function with a declaration to come to
    /// an operation has it applied (even when a button or `configure()` made the operation
    /// first), except for what `configure()` set; one atomic load after that.
    fn op_for<'a>(&'a self, py: Python<'_>, spec: &OpSpec) -> &'a OpGuard {
        let g = self.op(py, spec.operation_type.bind(py), Some(spec));
        if let Some(decl) = spec.guard.as_deref() {
            if !g.declared.load(Ordering::Acquire) && !g.declared.swap(true, Ordering::AcqRel) {
                g.apply_declared(py, decl);
            }
        }
        g
    }

    /// The operation named `name` if it exists (no cache, no creation).
    fn find(&self, name: &str) -> Option<Arc<OpGuard>> {
        let r = lock(&self.registry);
        r.by_name.get(name).map(|&i| r.ops[i as usize].clone())
    }

    fn get_or_create(
        &self,
        py: Python<'_>,
        name: &Bound<'_, PyString>,
        spec: Option<&OpSpec>,
    ) -> Arc<OpGuard> {
        let s = name.to_str().unwrap_or("");
        if let Some(g) = self.find(s) {
            return g;
        }
        let complexity = spec.and_then(|sp| sp.complexity).unwrap_or(f32::NAN);
        // (a callable that takes no weak reference is never scored)
        let unscored = spec
            .filter(|sp| sp.complexity.is_none())
            .and_then(|sp| {
                // A bound method lives as long as the call: refer to its function.
                let f = sp.func.bind(py);
                let is_method = f.get_type().name().is_ok_and(|n| n == "method");
                let f = match is_method {
                    true => f.getattr("__func__").unwrap_or_else(|_| f.clone()),
                    false => f.clone(),
                };
                pyo3::types::PyWeakrefReference::new(&f).ok()
            })
            .map(Bound::unbind);
        let decl = {
            let defaults = lock(&self.defaults);
            match spec.and_then(|sp| sp.guard.as_deref()) {
                Some(own) => defaults.merged(py, own),
                None => defaults.clone_ref(py),
            }
        };
        let mut r = lock(&self.registry);
        if let Some(&i) = r.by_name.get(s) {
            return r.ops[i as usize].clone();
        }
        let index = r.ops.len() as u32;
        let q = decl.quarantine.unwrap_or_default();
        let g = Arc::new(OpGuard {
            index,
            name: s.to_string(),
            health: OpHealth::new(self.shards),
            breaker: Breaker::new(decl.breaker.clone().unwrap_or_default()),
            breaker_auto: AtomicBool::new(false),
            model: CostModel::new(1000, q.min_samples as u64),
            predict: AtomicBool::new(false),
            predict_wanted: AtomicBool::new(false),
            quarantine: Mutex::new(q),
            quarantine_on: AtomicBool::new(false),
            complexity: AtomicU32::new(complexity.to_bits()),
            unscored: Mutex::new(unscored),
            last_error: Mutex::new(None),
            classes: Mutex::new(Classes::default()),
            declared: AtomicBool::new(spec.is_some_and(|sp| sp.guard.is_some())),
            configured: Mutex::new(Configured::default()),
            slow_ns: AtomicU64::new(0),
        });
        g.apply(py, &decl);
        r.by_name.insert(s.to_string(), index);
        r.ops.push(g.clone());
        g
    }

    /// The gate of a new call of `spec`: the breaker (raises `MethodBlocked`), then, for an
    /// operation that predicts, the cost model (and the spike check when it quarantines).
    pub fn gate(
        &self,
        py: Python<'_>,
        spec: &OpSpec,
        args: &Bound<'_, PyTuple>,
        kwargs: Option<&Bound<'_, PyDict>>,
        now: u64,
    ) -> PyResult<Gate> {
        let g = self.op_for(py, spec);
        let mut gate = Gate {
            probe: admit(py, g, now, true)?,
            ..Gate::default()
        };
        if g.predict.load(Ordering::Relaxed) {
            let size = features(args, kwargs).min(f32::MAX as f64) as f32;
            gate.size = Some(size);
            gate.prediction = g.model.predict(size as f64);
            if spec.spike_check && g.quarantine_on.load(Ordering::Relaxed) {
                let q = *lock(&g.quarantine);
                if let Some(p) = &gate.prediction {
                    gate.spike = judge(p, q.threshold);
                    gate.threshold = q.threshold;
                }
            }
        }
        Ok(gate)
    }

    /// The breaker gate of a chain step coming up: its probe ticket if it is one, or
    /// `MethodBlocked`.
    pub fn gate_step(&self, py: Python<'_>, spec: &OpSpec) -> PyResult<Option<Ticket>> {
        admit(py, self.op_for(py, spec), now_ns(), false)
    }

    /// Gives back the probe of a call that will not run.
    pub fn release_probe(&self, py: Python<'_>, spec: &OpSpec, ticket: Ticket) {
        self.op(py, spec.operation_type.bind(py), Some(spec))
            .breaker
            .release_probe(ticket);
    }

    /// Ends a new token QUARANTINED (it never runs) and hands the call to the Python layer's
    /// quarantine store.
    pub fn quarantine(
        &self,
        py: Python<'_>,
        tok: &Bound<'_, TaskToken>,
        origin: &Bound<'_, PyAny>,
        gate: &Gate,
    ) -> PyResult<()> {
        let t = tok.get();
        let g = self.op(py, t.op.operation_type.bind(py), Some(&t.op));
        if let Some(ticket) = gate.probe {
            g.breaker.release_probe(ticket);
        }
        // The record is written first: a waiter that sees QUARANTINED finds it in the store
        // (or learns why it is not there).
        let call = t.take_call();
        let mut interrupt = None;
        let stored = match (&self.hook, gate.prediction.as_ref()) {
            (Some(hook), Some(p)) => {
                let (args, kwargs) = match &call {
                    Some(c) => (
                        c.args.clone_ref(py).into_any(),
                        c.kwargs.as_ref().map_or_else(
                            || PyDict::new(py).unbind().into_any(),
                            |k| k.clone_ref(py).into_any(),
                        ),
                    ),
                    None => (
                        PyTuple::empty(py).unbind().into_any(),
                        PyDict::new(py).unbind().into_any(),
                    ),
                };
                let r = hook.bind(py).call1((
                    tok,
                    origin,
                    args,
                    kwargs,
                    p.predicted_ns as f64 / 1e9,
                    p.baseline_ns as f64 / 1e9,
                    p.deviation,
                    gate.threshold,
                ));
                match r.and_then(|id| id.extract::<String>()) {
                    Ok(id) => Ok(id),
                    Err(e) => {
                        let why = e
                            .value(py)
                            .repr()
                            .map_or_else(|_| "an error".to_string(), |r| r.to_string());
                        if e.is_instance_of::<PyException>(py) {
                            crate::token::log_raised(py, "the quarantine store", hook.bind(py), e);
                        } else {
                            interrupt = Some(e); // Ctrl-C, SystemExit: re-raised below
                        }
                        Err(why)
                    }
                }
            }
            _ => Err("no quarantine store".to_string()),
        };
        drop(call);
        t.with_gov(|gv| gv.quarantine = Some(stored));
        let _ = t
            .header
            .state
            .transition(TokenState::Created, TokenState::Quarantined);
        t.header.stamp_finished(now_ns());
        g.health.note_quarantined();
        if t.rt.events.wants(crate::observe::QUARANTINED) {
            let detail = t
                .with_gov_if(|gv| match gv.quarantine.as_ref() {
                    Some(Ok(id)) => id.clone(),
                    Some(Err(why)) => format!("not stored: {why}"),
                    None => String::new(),
                })
                .unwrap_or_default();
            crate::observe::emit(
                &t.rt.events,
                crate::observe::QUARANTINED,
                t,
                None,
                Some(PyString::new(py, &detail).into_any().unbind()),
            );
        }
        interrupt.map_or(Ok(()), Err)
    }

    /// A worker starts an attempt of `tok`: notes the breaker generation (results of attempts
    /// that started before a transition do not count against the new state) and, for a
    /// probe, the generation of the round that admitted it.
    pub fn on_start<'a>(&'a self, py: Python<'_>, tok: &TaskToken) -> Started<'a> {
        let g = self.op(py, tok.op.operation_type.bind(py), Some(&tok.op));
        let (gen, state) = g.breaker.generation_and_state();
        let h = &tok.header;
        // Only a breaker that is not closed can have probes out (a stale ticket of a round
        // that closed meanwhile needs nothing: its generation is gone).
        let probe = match state {
            BreakerState::Closed | BreakerState::Disabled => None,
            _ => tok.with_gov_if(|gv| gv.probe.take()).flatten(),
        };
        let note = AttemptNote {
            attempt: h.attempt(),
            gen: probe.map_or(gen, |t| t.gen),
            probe,
            started_ns: h.started_ns().unwrap_or_else(now_ns),
        };
        let shared = tok.op.policy.as_ref().is_some_and(|p| p.timeout.is_some());
        if shared {
            tok.with_gov(|gv| gv.attempt = Some(note));
        }
        Started { g, note, shared }
    }

    /// The deadline of `t`'s running attempt `attempt` passed: it counts as a timed-out
    /// failure now (health and breaker), not when its task returns, which may be never.
    pub fn on_timed_out(&self, py: Python<'_>, t: &TaskToken, attempt: u32) {
        let Some(note) = t
            .with_gov_if(|gv| gv.attempt.take_if(|n| n.attempt == attempt))
            .flatten()
        else {
            return; // its worker noted it already (or it never started)
        };
        let g = self.op(py, t.op.operation_type.bind(py), Some(&t.op));
        let now = now_ns();
        let exec = now.saturating_sub(note.started_ns);
        let core = t.header.placement().map_or(0, |(c, _)| c);
        g.health.record(
            core,
            AttemptOutcome::TimedOut,
            exec,
            note.started_ns
                .saturating_sub(queued_since(&t.header, attempt)),
        );
        self.note_breaker(py, g, &note, true, exec, now);
    }

    /// `t` was just settled: its operation counts how it ended (once per token).
    pub fn note_settled(&self, py: Python<'_>, t: &TaskToken) {
        use crate::health::TokenOutcome as O;
        let outcome = match t.header.state.load() {
            TokenState::Completed => O::Completed,
            TokenState::Failed => O::Failed,
            TokenState::Killed | TokenState::Cancelling => O::Killed,
            TokenState::TimedOut => O::TimedOut,
            _ => return, // (quarantined: counted when it was)
        };
        let shard = t.header.placement().map_or(0, |(c, _)| c);
        self.op(py, t.op.operation_type.bind(py), Some(&t.op))
            .health
            .note_token(shard, outcome);
    }

    /// Another attempt of `t` is scheduled.
    pub fn note_retried(&self, py: Python<'_>, t: &TaskToken) {
        let shard = t.header.placement().map_or(0, |(c, _)| c);
        self.op(py, t.op.operation_type.bind(py), Some(&t.op))
            .health
            .note_token(shard, crate::health::TokenOutcome::Retried);
    }

    /// A submission of `spec` was refused after its token was made.
    pub fn note_refused(&self, py: Python<'_>, spec: &OpSpec) {
        self.op(py, spec.operation_type.bind(py), Some(spec))
            .health
            .note_refused();
    }

    /// Whether a retry of `spec` may be scheduled now: not while its breaker is open,
    /// half-open or blocked.
    pub fn admits_retry(&self, py: Python<'_>, spec: &OpSpec) -> bool {
        let g = self.op(py, spec.operation_type.bind(py), Some(spec));
        matches!(
            g.breaker.generation_and_state().1,
            BreakerState::Closed | BreakerState::Disabled
        )
    }

    fn note_breaker(
        &self,
        py: Python<'_>,
        g: &OpGuard,
        note: &AttemptNote,
        failure: bool,
        exec: u64,
        now: u64,
    ) {
        if note.probe.is_some() || g.breaker_auto.load(Ordering::Relaxed) {
            if let Some(tr) = g
                .breaker
                .record(note.gen, note.probe.is_some(), failure, exec, now)
            {
                log_transition(py, &g.name, tr.from, tr.to, &tr.reason);
            }
        }
    }

    /// A worker's attempt of `tok` on `(core, wi)` ended with `outcome` (before the token's
    /// final state is published, so a waiter that sees it sees the record too).
    #[allow(clippy::too_many_arguments)]
    pub fn on_end(
        &self,
        py: Python<'_>,
        s: Started<'_>,
        core: usize,
        wi: usize,
        tok: &Bound<'_, TaskToken>,
        attempt: u32,
        outcome: &Result<Py<PyAny>, Py<PyBaseException>>,
        late: bool,
    ) {
        let t = tok.get();
        let h = &t.header;
        let g = s.g;
        let now = now_ns();
        let started = s.note.started_ns;
        let exec = now.saturating_sub(started);
        let queue = started.saturating_sub(queued_since(h, attempt));
        let kind = match h.state.load() {
            _ if late || h.attempt() != attempt => AttemptOutcome::TimedOut, // or abandoned
            TokenState::TimedOut => AttemptOutcome::TimedOut,
            TokenState::Cancelling | TokenState::Killed => AttemptOutcome::Killed,
            _ if outcome.is_ok() => AttemptOutcome::Completed,
            _ => AttemptOutcome::Failed,
        };
        // A token with a timeout shares the note with its deadline: whoever takes it counts
        // the attempt (a deadline that passed counted it as timed out already).
        let note = if s.shared {
            t.with_gov_if(|gv| gv.attempt.take_if(|n| n.attempt == attempt))
                .flatten()
        } else {
            Some(s.note)
        };
        if let Some(note) = note {
            g.health.record(core, kind, exec, queue);
            if kind == AttemptOutcome::Killed {
                if let Some(ticket) = note.probe {
                    g.breaker.release_probe(ticket);
                }
            } else {
                let failure = match (kind, outcome) {
                    (AttemptOutcome::TimedOut, _) => true,
                    (AttemptOutcome::Failed, Err(e)) => g.counts_as_failure(py, e.bind(py)),
                    _ => false,
                };
                self.note_breaker(py, g, &note, failure, exec, now);
            }
        }
        if kind == AttemptOutcome::Completed && g.predict.load(Ordering::Relaxed) {
            let (size, predicted) = h.prediction().unwrap_or((h.size_feature(), 0));
            g.model.learn(size as f64, exec, predicted);
        }
        let error = match (kind, outcome) {
            (AttemptOutcome::Failed, Err(e)) => {
                let e = e.bind(py);
                let kind = e
                    .get_type()
                    .qualname()
                    .map(|n| n.to_string())
                    .unwrap_or_else(|_| "Exception".into());
                let message = e
                    .str()
                    .map(|m| truncate(m.to_string(), 500))
                    .unwrap_or_default();
                *lock(&g.last_error) = Some(LastError {
                    kind: kind.clone(),
                    message: message.clone(),
                    at: wall_now(),
                });
                Some(Box::new((kind, message)))
            }
            (AttemptOutcome::TimedOut, _) => Some(Box::new((
                "TokenTimeout".to_string(),
                "the attempt ran past its timeout".to_string(),
            ))),
            _ => None,
        };
        if self.history.enabled() {
            self.history.push(
                0,
                ExecRecord {
                    token_id: h.id,
                    op: g.index,
                    outcome: kind,
                    core: core as u16,
                    worker: wi as u16,
                    attempt,
                    started_ns: started,
                    exec_ns: exec,
                    queue_ns: queue,
                    // (NaN: the operation's score, filled in when the history is read)
                    complexity: t.op.complexity.unwrap_or(f32::NAN),
                    predicted_ns: h.prediction().map_or(0, |(_, p)| p),
                    error,
                },
            );
        }
    }

    /// The complexity score of `tok`'s function (the decorator's, or its operation's).
    pub fn complexity_of(&self, py: Python<'_>, tok: &TaskToken) -> Option<f64> {
        if let Some(c) = tok.op.complexity {
            return Some(c as f64);
        }
        self.op(py, tok.op.operation_type.bind(py), Some(&tok.op))
            .complexity(py)
    }

    // ---- what the Python layer asks -----------------------------------------------------

    /// Sets the coordinator's defaults (for operations seen from now on) from a `guard=` dict.
    pub fn set_defaults(&self, py: Python<'_>, d: &Bound<'_, PyDict>) -> PyResult<()> {
        let decl = GuardDecl::from_dict(d)?;
        let mut defaults = lock(&self.defaults);
        *defaults = defaults.merged(py, &decl);
        Ok(())
    }

    /// Applies a `guard=` dict to operation `name` (created if new).
    pub fn configure(
        &self,
        py: Python<'_>,
        name: &Bound<'_, PyString>,
        d: &Bound<'_, PyDict>,
    ) -> PyResult<()> {
        let decl = GuardDecl::from_dict(d)?;
        self.op(py, name, None).apply_configured(py, &decl);
        Ok(())
    }

    /// An operator's button on operation `name`'s breaker; returns the new state's name.
    pub fn button(
        &self,
        py: Python<'_>,
        name: &Bound<'_, PyString>,
        action: &str,
    ) -> PyResult<&'static str> {
        let g = self.op(py, name, None);
        let before = g.breaker.view(now_ns()).state;
        let st = match action {
            "block" => g.breaker.block(now_ns()),
            "unblock" => g.breaker.unblock(now_ns()),
            "force_open" => g.breaker.force_open(now_ns()),
            "disable" => g.breaker.disable(now_ns()),
            _ => {
                return Err(CoreError::Config(format!(
                    "breaker action must be 'block', 'unblock', 'force_open' or 'disable', got \
                     {action:?}"
                ))
                .into())
            }
        };
        log_transition(
            py,
            &g.name,
            before,
            st,
            &format!("{action}() by an operator"),
        );
        Ok(st.name())
    }

    /// Names of the operations seen so far, in the order they were first seen.
    pub fn names(&self) -> Vec<String> {
        lock(&self.registry)
            .ops
            .iter()
            .map(|g| g.name.clone())
            .collect()
    }

    /// Per operation, what a metrics scrape exports (`Runtime.metrics()["operations"]`).
    pub fn metrics<'py>(&self, py: Python<'py>, bounds_ns: &[u64]) -> PyResult<Bound<'py, PyList>> {
        use crate::health::{AttemptOutcome, TokenOutcome};
        let ops: Vec<Arc<OpGuard>> = lock(&self.registry).ops.clone();
        let now = now_ns();
        let bounds: Vec<f64> = bounds_ns
            .iter()
            .map(|&b| {
                if b == u64::MAX {
                    f64::INFINITY
                } else {
                    b as f64 / 1e9
                }
            })
            .collect();
        let out = PyList::empty(py);
        for g in ops {
            let hs = g.health.snapshot();
            let d = PyDict::new(py);
            d.set_item("operation", &g.name)?;
            let tokens = PyDict::new(py);
            for o in TokenOutcome::ALL {
                tokens.set_item(o.name(), hs.tokens[o as usize])?;
            }
            tokens.set_item("quarantined", hs.quarantined)?;
            tokens.set_item("blocked", hs.blocked)?;
            tokens.set_item("refused", hs.refused)?;
            d.set_item("tokens", tokens)?;
            let attempts = PyDict::new(py);
            for o in AttemptOutcome::ALL {
                let n = match o {
                    AttemptOutcome::Completed => hs.completed,
                    AttemptOutcome::Failed => hs.failed,
                    AttemptOutcome::TimedOut => hs.timed_out,
                    AttemptOutcome::Killed => hs.killed,
                };
                attempts.set_item(o.name(), n)?;
            }
            d.set_item("attempts", attempts)?;
            d.set_item("execution_bounds", bounds.clone())?;
            d.set_item("execution_buckets", hs.hist.cumulative_at(bounds_ns))?;
            d.set_item("execution_count", hs.hist.total())?;
            d.set_item("execution_sum", hs.exec_ns_sum as f64 / 1e9)?;
            d.set_item("breaker", g.breaker.view(now).state.name())?;
            out.append(d)?;
        }
        Ok(out)
    }

    /// Everything known about operation `name` as a dict (None if never seen).
    pub fn report<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some(g) = self.find(name) else {
            return Ok(None);
        };
        let now = now_ns();
        let d = PyDict::new(py);
        d.set_item("operation", &g.name)?;
        d.set_item("complexity_score", g.complexity(py))?;
        let hs = g.health.snapshot();
        let secs = |ns: Option<u64>| ns.map(|n| n as f64 / 1e9);
        d.set_item("attempts", hs.attempts)?;
        d.set_item("completed", hs.completed)?;
        d.set_item("failed", hs.failed)?;
        d.set_item("timed_out", hs.timed_out)?;
        d.set_item("killed", hs.killed)?;
        d.set_item("blocked", hs.blocked)?;
        d.set_item("quarantined", hs.quarantined)?;
        d.set_item("success_rate", hs.success_rate())?;
        d.set_item("failure_rate", hs.failure_rate())?;
        d.set_item("mean_duration", hs.mean_exec_ns().map(|n| n / 1e9))?;
        d.set_item("p50_duration", secs(hs.p50()))?;
        d.set_item("p95_duration", secs(hs.p95()))?;
        d.set_item(
            "max_duration",
            (hs.attempts > 0).then(|| hs.max_exec_ns as f64 / 1e9),
        )?;
        let ran = hs.attempts;
        d.set_item(
            "mean_queue_wait",
            (ran > 0).then(|| hs.queue_ns_sum as f64 / ran as f64 / 1e9),
        )?;
        let slow = g.slow_ns.load(Ordering::Relaxed);
        d.set_item("slow_call_threshold", (slow > 0).then(|| slow as f64 / 1e9))?;
        d.set_item(
            "slow_call_rate",
            if slow > 0 { hs.slow_rate(slow) } else { None },
        )?;
        let last = lock(&g.last_error)
            .as_ref()
            .map(|e| (e.kind.clone(), e.message.clone(), e.at));
        match last {
            Some((kind, message, at)) => {
                let le = PyDict::new(py);
                le.set_item("type", kind)?;
                le.set_item("message", message)?;
                le.set_item("time", at)?;
                d.set_item("last_error", le)?;
            }
            None => d.set_item("last_error", py.None())?,
        }
        d.set_item("breaker", breaker_dict(py, &g, now)?)?;
        let mv = g.model.view();
        let m = PyDict::new(py);
        m.set_item("enabled", g.predict.load(Ordering::Relaxed))?;
        m.set_item("samples", mv.raw_samples)?;
        m.set_item("slope", mv.slope)?;
        m.set_item("baseline_duration", secs(mv.baseline_ns))?;
        m.set_item("typical_error", mv.typical_error)?;
        m.set_item("mean_size", mv.mean_size)?;
        d.set_item("model", m)?;
        let q = *lock(&g.quarantine);
        let qd = PyDict::new(py);
        qd.set_item("enabled", q.enabled)?;
        qd.set_item("threshold", q.threshold)?;
        qd.set_item("min_samples", q.min_samples)?;
        d.set_item("quarantine", qd)?;
        Ok(Some(d))
    }

    /// The execution history as dicts (oldest first, at most `limit` newest).
    pub fn history_list<'py>(
        &self,
        py: Python<'py>,
        limit: Option<usize>,
    ) -> PyResult<Bound<'py, PyList>> {
        let ops: Vec<Arc<OpGuard>> = lock(&self.registry).ops.clone();
        let out = PyList::empty(py);
        for r in self.history.snapshot(limit) {
            let d = PyDict::new(py);
            d.set_item("token_id", r.token_id)?;
            let op = ops.get(r.op as usize);
            d.set_item("operation_type", op.map_or("", |g| g.name.as_str()))?;
            d.set_item("success", r.outcome == AttemptOutcome::Completed)?;
            d.set_item("outcome", r.outcome.name())?;
            d.set_item("execution_time", r.exec_ns as f64 / 1e9)?;
            d.set_item("queue_wait", r.queue_ns as f64 / 1e9)?;
            d.set_item("core_id", r.core as usize + 1)?;
            d.set_item("worker_id", r.worker)?;
            let score = if r.complexity.is_finite() {
                Some(r.complexity as f64)
            } else {
                op.and_then(|g| g.complexity(py))
            };
            d.set_item("complexity_score", score)?;
            d.set_item(
                "predicted_duration",
                (r.predicted_ns > 0).then(|| r.predicted_ns as f64 / 1e9),
            )?;
            d.set_item("attempt", r.attempt)?;
            let (et, em) = match &r.error {
                Some(e) => (Some(e.0.as_str()), Some(e.1.as_str())),
                None => (None, None),
            };
            d.set_item("error_type", et)?;
            d.set_item("error_message", em)?;
            d.set_item("started_at", r.started_ns as f64 / 1e9)?;
            d.set_item("finished_at", (r.started_ns + r.exec_ns) as f64 / 1e9)?;
            out.append(d)?;
        }
        Ok(out)
    }
}

fn breaker_dict<'py>(py: Python<'py>, g: &OpGuard, now: u64) -> PyResult<Bound<'py, PyDict>> {
    let v = g.breaker.view(now);
    let cfg = g.breaker.config();
    let b = PyDict::new(py);
    b.set_item("state", v.state.name())?;
    b.set_item("auto", cfg.auto)?;
    b.set_item("generation", v.gen)?;
    b.set_item("retry_in", v.retry_in_ns.map(|n| n as f64 / 1e9))?;
    b.set_item("window_calls", v.calls)?;
    b.set_item("window_failures", v.failures)?;
    b.set_item("window_slow", v.slow)?;
    b.set_item("failure_rate", v.failure_rate)?;
    b.set_item("slow_rate", v.slow_rate)?;
    b.set_item("consecutive_failures", v.consecutive_failures)?;
    b.set_item("times_opened", v.times_opened)?;
    b.set_item("probes_left", v.probes_left)?;
    b.set_item("refused", v.refused)?;
    b.set_item("last_trip", v.last_trip.as_ref().map(|r| r.describe()))?;
    let c = PyDict::new(py);
    c.set_item("failure_rate", cfg.failure_rate)?;
    c.set_item("slow_call_rate", cfg.slow_call_rate)?;
    c.set_item("slow_call", cfg.slow_call_ns.map(|n| n as f64 / 1e9))?;
    match cfg.window {
        Window::Count(n) => {
            c.set_item("window", n)?;
            c.set_item("window_kind", "calls")?;
        }
        Window::Time { ns } => {
            c.set_item("window", ns as f64 / 1e9)?;
            c.set_item("window_kind", "seconds")?;
        }
    }
    c.set_item("min_calls", cfg.min_calls)?;
    c.set_item("consecutive_failures", cfg.consecutive_failures)?;
    c.set_item("open_duration", cfg.open_ns as f64 / 1e9)?;
    c.set_item("open_backoff", cfg.open_backoff)?;
    c.set_item("open_max", cfg.open_max_ns as f64 / 1e9)?;
    c.set_item("jitter", cfg.jitter)?;
    c.set_item("half_open_probes", cfg.half_open_probes)?;
    b.set_item("config", c)?;
    let hist = PyList::empty(py);
    let wall = wall_now();
    for tr in g.breaker.transitions() {
        let t = PyDict::new(py);
        t.set_item("time", wall - now.saturating_sub(tr.at_ns) as f64 / 1e9)?;
        t.set_item("from", tr.from.name())?;
        t.set_item("to", tr.to.name())?;
        t.set_item("reason", &tr.reason)?;
        hist.append(t)?;
    }
    b.set_item("history", hist)?;
    Ok(b)
}

/// The breaker gate of operation `g`: the probe ticket of a call admitted as a half-open
/// probe, None for any other admitted call, or `MethodBlocked` (counted as blocked).
/// The breaker's gate for a call of `g`; a refused call counts as blocked when `count` (a
/// new call: no token exists). A chain step refused when it comes up is a token that fails
/// with `MethodBlocked` and counts as failed instead.
fn admit(py: Python<'_>, g: &OpGuard, now: u64, count: bool) -> PyResult<Option<Ticket>> {
    match g.breaker.admit(now) {
        Ok(t) => Ok(t.probe.then_some(t)),
        Err(refusal) => {
            if count {
                g.health.note_blocked();
            }
            Err(blocked_error(py, g, &refusal))
        }
    }
}

/// `MethodBlocked` for a refused call: names the operation, why its breaker is open, and
/// when it lets a probe through.
fn blocked_error(py: Python<'_>, g: &OpGuard, r: &Refusal) -> PyErr {
    let why = match &r.reason {
        Some(crate::breaker::TripReason::Manual) => " (opened by an operator)".to_string(),
        Some(t) => format!(" because {}", t.describe()),
        None => String::new(),
    };
    let name = &g.name;
    let msg = match r.state {
        BreakerState::ForcedOpen => format!(
            "operation '{name}' is blocked by an operator; guard_house.unblock('{name}') \
             reopens it"
        ),
        BreakerState::HalfOpen => format!(
            "operation '{name}' is blocked: its circuit breaker is half-open{why} and its \
             probe calls are running; it closes once they succeed"
        ),
        _ => {
            let secs = r.retry_in_ns.unwrap_or(0) as f64 / 1e9;
            let secs = if secs >= 1.0 { secs.round() } else { secs };
            format!(
                "operation '{name}' is blocked: its circuit breaker is open{why}; it lets a \
                 probe call through in {} s",
                fmt_secs(secs)
            )
        }
    };
    let err = CoreError::Blocked(msg).into_pyerr(py);
    let v = err.value(py);
    let _ = v.setattr("operation", &g.name);
    let _ = v.setattr("retry_in", r.retry_in_ns.map(|n| n as f64 / 1e9));
    let _ = v.setattr("state", r.state.name());
    err
}

fn log_transition(py: Python<'_>, op: &str, from: BreakerState, to: BreakerState, reason: &str) {
    let _ = (|| -> PyResult<()> {
        let logger = py
            .import("logging")?
            .call_method1("getLogger", ("tokengate.guard",))?;
        logger.call_method1(
            "warning",
            (
                "circuit breaker of %r: %s -> %s (%s)",
                op,
                from.name(),
                to.name(),
                reason,
            ),
        )?;
        Ok(())
    })();
}

/// The inspector's score of `func` (None if it cannot be had).
fn inspect_score(py: Python<'_>, func: &Bound<'_, PyAny>) -> Option<f32> {
    py.import("tokengate.guard.inspector")
        .and_then(|m| m.call_method1("score_of", (func,)))
        .and_then(|s| s.extract::<f64>())
        .ok()
        .map(|s| s as f32)
}

/// Where an attempt's queue wait starts: the token's creation for its first attempt, its
/// admission back into a mailbox for a retry (its retry delay is not queueing).
pub(crate) fn queued_since(h: &crate::state::Header, attempt: u32) -> u64 {
    if attempt > 1 {
        h.admitted_ns().unwrap_or_else(|| h.created_ns())
    } else {
        h.created_ns()
    }
}

pub(crate) fn wall_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// The size feature of a call: the sum over its arguments of the length of strings, bytes
/// and builtin containers, the magnitude of numbers, and the length of any object of a
/// native (non-heap) type that has one; 0 for anything else (no Python code runs).
pub(crate) fn features(args: &Bound<'_, PyTuple>, kwargs: Option<&Bound<'_, PyDict>>) -> f64 {
    let mut n: f64 = args.iter().map(|a| one_feature(&a)).sum();
    if let Some(kw) = kwargs {
        n += kw.values().iter().map(|v| one_feature(&v)).sum::<f64>();
    }
    if n.is_finite() {
        n
    } else {
        f64::MAX
    }
}

fn one_feature(v: &Bound<'_, PyAny>) -> f64 {
    use pyo3::types::{PyBool, PyFloat, PyInt, PyWeakrefProxy};
    if v.is_instance_of::<PyBool>() || v.is_none() || v.is_instance_of::<PyWeakrefProxy>() {
        return 0.0; // (a weak proxy's len() is its referent's, which may be user code)
    }
    if v.is_exact_instance_of::<PyInt>() || v.is_exact_instance_of::<PyFloat>() {
        return v
            .extract::<f64>()
            .map_or(0.0, |x| if x.is_finite() { x.abs() } else { 0.0 });
    }
    // SAFETY: plain reads of the object's type and its slots.
    unsafe {
        let tp = pyo3::ffi::Py_TYPE(v.as_ptr());
        let heap = pyo3::ffi::PyType_GetFlags(tp) & pyo3::ffi::Py_TPFLAGS_HEAPTYPE != 0;
        if heap {
            return 0.0; // a Python class: its __len__ is user code
        }
    }
    v.len().map_or(0.0, |n| n as f64)
}
