//! Lifecycle events: what the core records (through the pure ring of `events.rs`) and the
//! `LifecycleEvent` Python objects the delivery thread takes. Emission sites check
//! `ring.wants(kind)` first, so with nobody listening an event costs one relaxed load and is
//! never built.

use std::sync::Arc;

use pyo3::exceptions::PyBaseException;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyString};
use pyo3::{PyTraverseError, PyVisit};

use crate::events::{EventRing, KINDS};
use crate::router::{Priority, Weight};
use crate::state::Header;
use crate::token::{OpLabels, OpSpec, TaskToken};

pub(crate) use crate::events::{
    ADMITTED, BLOCKED, COMPLETED, CREATED, FAILED, KILLED, QUARANTINED, REFUSED, RETRIED, STARTED,
    TIMED_OUT,
};

/// "No value" for the 64-bit fields of [`Event`].
const NONE: u64 = u64::MAX;

/// One recorded event: plain data plus the operation (shared, no GIL needed to clone) and an
/// optional Python object (the error, or a detail string) cloned where the GIL is held.
pub(crate) struct Event {
    kind: u8,
    weight: Weight,
    priority: Priority,
    /// Core index + 1, worker index + 1 (0: not placed).
    core: u16,
    worker: u16,
    attempt: u32,
    token_id: u64,
    t_ns: u64,
    /// Queue wait (started) or the attempt's duration (ended), in ns; `NONE` if neither.
    span_ns: u64,
    /// A retry's delay, in ns (`NONE` for other kinds).
    delay_ns: u64,
    /// The operation's name and tags (not its function: an event kept by a subscriber must
    /// not keep the task's closure, and what it refers to, alive).
    labels: Arc<OpLabels>,
    obj: Option<Py<PyAny>>,
}

pub(crate) type Ring = EventRing<Event>;

/// Records an event of `t` (call only if `ring.wants(kind)`, so an unwanted event is never
/// built).
pub(crate) fn emit(
    ring: &Ring,
    kind: u8,
    t: &TaskToken,
    span_ns: Option<u64>,
    obj: Option<Py<PyAny>>,
) {
    push(ring, kind, t, span_ns, NONE, obj);
}

fn push(
    ring: &Ring,
    kind: u8,
    t: &TaskToken,
    span_ns: Option<u64>,
    delay_ns: u64,
    obj: Option<Py<PyAny>>,
) {
    let h: &Header = &t.header;
    let (core, worker) = h
        .placement()
        .map_or((0, 0), |(c, w)| (c as u16 + 1, w as u16 + 1));
    ring.push(Event {
        kind,
        weight: h.weight(),
        priority: h.priority(),
        core,
        worker,
        attempt: h.attempt(),
        token_id: h.id,
        t_ns: stamp_of(kind, h).unwrap_or_else(crate::clock::now_ns),
        span_ns: span_ns.unwrap_or(NONE),
        delay_ns,
        labels: t.op.labels.clone(),
        obj,
    });
}

/// When an event of `kind` happened, from the token's own timestamps where it has one (the
/// scheduler stamped it a moment before: no second clock read per event).
#[inline]
fn stamp_of(kind: u8, h: &Header) -> Option<u64> {
    match kind {
        CREATED => Some(h.created_ns()),
        ADMITTED => h.admitted_ns(),
        STARTED => h.started_ns(),
        COMPLETED | FAILED => h.finished_ns(),
        _ => None,
    }
}

/// Records an event of a call of `op` that has no token (a breaker refused it).
pub(crate) fn emit_call(ring: &Ring, kind: u8, op: &Arc<OpSpec>, detail: Option<Py<PyAny>>) {
    ring.push(Event {
        kind,
        weight: op.weight,
        priority: op.priority,
        core: 0,
        worker: 0,
        attempt: 0,
        token_id: 0,
        t_ns: crate::clock::now_ns(),
        span_ns: NONE,
        delay_ns: NONE,
        labels: op.labels.clone(),
        obj: detail,
    });
}

/// The final event of `t`, which the caller just settled (from its state).
pub(crate) fn emit_final(py: Python<'_>, t: &TaskToken) {
    use crate::state::TokenState as S;
    let ring = &t.rt.events;
    let kind = match t.header.state.load() {
        S::Completed => COMPLETED,
        S::Failed => FAILED,
        S::Killed | S::Cancelling => KILLED,
        S::TimedOut => TIMED_OUT,
        S::Quarantined => QUARANTINED,
        _ => return,
    };
    if !ring.wants(kind) {
        return;
    }
    let obj = if kind == FAILED {
        t.error(py).map(|e| e.into_any())
    } else {
        None
    };
    let span = match (kind, t.header.started_ns()) {
        (KILLED | TIMED_OUT | COMPLETED | FAILED, Some(s)) => {
            let end = t.header.finished_ns().unwrap_or_else(crate::clock::now_ns);
            Some(end.saturating_sub(s))
        }
        _ => None,
    };
    emit(ring, kind, t, span, obj);
}

/// The wall clock minus the monotonic clock, in seconds (what turns event times into
/// `time.time()` values).
fn wall_offset() -> f64 {
    crate::guard::wall_now() - crate::clock::now_ns() as f64 / 1e9
}

/// Takes up to `max` events of `ring` as Python objects (see `EventRing::take`); the GIL is
/// released while it waits.
pub(crate) fn take(
    py: Python<'_>,
    ring: &Ring,
    max: usize,
    timeout: std::time::Duration,
) -> EventBatch {
    let events = py.detach(|| ring.take(max, timeout, LINGER));
    EventBatch {
        events,
        wall_offset: wall_offset(),
    }
}

impl Event {
    fn clone_ref(&self, py: Python<'_>) -> Event {
        Event {
            kind: self.kind,
            weight: self.weight,
            priority: self.priority,
            core: self.core,
            worker: self.worker,
            attempt: self.attempt,
            token_id: self.token_id,
            t_ns: self.t_ns,
            span_ns: self.span_ns,
            delay_ns: self.delay_ns,
            labels: self.labels.clone(),
            obj: self.obj.as_ref().map(|o| o.clone_ref(py)),
        }
    }
}

/// Events taken from the core in one go, oldest first: a read-only sequence of
/// `LifecycleEvent`s, each made only when it is read (a subscriber that takes batches and
/// looks at a few events, or only counts them, pays nothing for the rest).
#[pyclass(frozen, sequence, module = "tokengate._core", name = "EventBatch")]
pub struct EventBatch {
    events: Vec<Event>,
    wall_offset: f64,
}

impl EventBatch {
    fn event<'py>(&self, py: Python<'py>, i: usize) -> PyResult<Bound<'py, LifecycleEvent>> {
        let ev = self.events[i].clone_ref(py);
        let obj = Bound::new(
            py,
            LifecycleEvent {
                time: ev.t_ns as f64 / 1e9 + self.wall_offset,
                ev,
            },
        )?;
        // An object from the class's free list is initialised but not tracked by the garbage
        // collector again (PyO3 0.30): track it, or a cycle through its error would never be
        // collected.
        // SAFETY: attached; a live object of a GC type, untracked only if it came from the list.
        unsafe {
            if pyo3::ffi::PyObject_GC_IsTracked(obj.as_ptr()) == 0 {
                pyo3::ffi::PyObject_GC_Track(obj.as_ptr().cast());
            }
        }
        Ok(obj)
    }
}

#[pymethods]
impl EventBatch {
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        for e in &self.events {
            if let Some(o) = &e.obj {
                visit.call(o)?;
            }
        }
        Ok(())
    }

    fn __len__(&self) -> usize {
        self.events.len()
    }

    fn __bool__(&self) -> bool {
        !self.events.is_empty()
    }

    fn __getitem__<'py>(
        &self,
        py: Python<'py>,
        index: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        if let Ok(slice) = index.cast::<pyo3::types::PySlice>() {
            let ix = slice.indices(self.events.len() as isize)?;
            let mut out = Vec::with_capacity(ix.slicelength);
            let mut i = ix.start;
            for _ in 0..ix.slicelength {
                out.push(self.event(py, i as usize)?);
                i += ix.step;
            }
            return Ok(pyo3::types::PyList::new(py, out)?.into_any());
        }
        let index: isize = index.extract()?;
        let n = self.events.len() as isize;
        let i = if index < 0 { index + n } else { index };
        if !(0..n).contains(&i) {
            return Err(pyo3::exceptions::PyIndexError::new_err(format!(
                "event index {index} out of range for a batch of {n}"
            )));
        }
        self.event(py, i as usize).map(Bound::into_any)
    }

    fn __iter__(slf: Bound<'_, Self>) -> EventBatchIter {
        EventBatchIter {
            batch: slf.unbind(),
            next: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// The events of `kinds` (names of `EVENT_KINDS`, or a mask of their bits), as a batch of
    /// their own.
    fn select(&self, py: Python<'_>, kinds: &Bound<'_, PyAny>) -> PyResult<EventBatch> {
        let mask = kind_mask(kinds)?;
        Ok(EventBatch {
            events: self
                .events
                .iter()
                .filter(|e| mask & (1 << e.kind) != 0)
                .map(|e| e.clone_ref(py))
                .collect(),
            wall_offset: self.wall_offset,
        })
    }

    /// The kinds the batch holds, as a mask (bits of `EVENT_KINDS`).
    fn mask(&self) -> u32 {
        self.events.iter().fold(0, |m, e| m | 1 << e.kind)
    }

    /// How many events of each kind the batch holds (kinds it holds none of are left out).
    fn counts<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let mut n = [0usize; KINDS.len()];
        for e in &self.events {
            n[e.kind as usize] += 1;
        }
        let d = PyDict::new(py);
        for (i, &c) in n.iter().enumerate() {
            if c > 0 {
                d.set_item(interned(py, &KIND_NAMES, &KINDS, i), c)?;
            }
        }
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!("<EventBatch of {} events>", self.events.len())
    }
}

/// A mask of event kinds from an int (the bits themselves), one kind's name, or names.
fn kind_mask(kinds: &Bound<'_, PyAny>) -> PyResult<u32> {
    if let Ok(m) = kinds.extract::<u32>() {
        return Ok(m);
    }
    let one = |name: &str| -> PyResult<u32> {
        KINDS
            .iter()
            .position(|k| *k == name)
            .map(|i| 1u32 << i)
            .ok_or_else(|| {
                crate::errors::CoreError::Config(format!(
                    "unknown event kind '{name}'; valid: {}",
                    KINDS.join(", ")
                ))
                .into()
            })
    };
    if let Ok(name) = kinds.extract::<String>() {
        return one(&name);
    }
    let mut mask = 0;
    for k in kinds.try_iter()? {
        mask |= one(&k?.extract::<String>()?)?;
    }
    Ok(mask)
}

/// Iterates an `EventBatch`.
#[pyclass(frozen, module = "tokengate._core", name = "EventBatchIterator")]
pub struct EventBatchIter {
    batch: Py<EventBatch>,
    next: std::sync::atomic::AtomicUsize,
}

#[pymethods]
impl EventBatchIter {
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.batch)
    }

    fn __iter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, LifecycleEvent>>> {
        let b = self.batch.get();
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if i < b.events.len() {
            b.event(py, i).map(Some)
        } else {
            Ok(None)
        }
    }
}

/// `names[i]` as an interned str, made once (the getters of a busy feed return the same
/// objects instead of a new string per event).
fn interned<'py>(
    py: Python<'py>,
    cell: &'static PyOnceLock<Vec<Py<PyString>>>,
    names: &[&'static str],
    i: usize,
) -> Bound<'py, PyString> {
    cell.get_or_init(py, || {
        names
            .iter()
            .map(|n| PyString::intern(py, n).unbind())
            .collect()
    })[i]
        .bind(py)
        .clone()
}

static KIND_NAMES: PyOnceLock<Vec<Py<PyString>>> = PyOnceLock::new();
static WEIGHT_NAMES: PyOnceLock<Vec<Py<PyString>>> = PyOnceLock::new();
static PRIORITY_NAMES: PyOnceLock<Vec<Py<PyString>>> = PyOnceLock::new();

/// How long the delivery thread gathers events after the first one.
const LINGER: std::time::Duration = std::time::Duration::from_millis(5);

/// One lifecycle event of a token (or of a refused call), as delivered to subscribers of
/// `coordinator.events`.
#[pyclass(
    frozen,
    freelist = 8192,
    module = "tokengate._core",
    name = "LifecycleEvent"
)]
pub struct LifecycleEvent {
    ev: Event,
    time: f64,
}

#[pymethods]
impl LifecycleEvent {
    /// The object it holds (an error or a detail), for the garbage collector: a subscriber
    /// that keeps events in a list the error's traceback refers to makes a cycle.
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        if let Some(o) = &self.ev.obj {
            visit.call(o)?;
        }
        Ok(())
    }

    /// One of `EVENT_KINDS`: "created", "admitted", "started", "completed", "failed",
    /// "killed", "timed_out", "retried", "quarantined", "blocked", "refused".
    #[getter]
    fn kind<'py>(&self, py: Python<'py>) -> Bound<'py, PyString> {
        interned(py, &KIND_NAMES, &KINDS, self.ev.kind as usize)
    }

    /// The token's id (None for "blocked": the call was refused before a token existed).
    #[getter]
    fn token_id(&self) -> Option<u64> {
        (self.ev.token_id != 0).then_some(self.ev.token_id)
    }

    #[getter]
    fn operation(&self, py: Python<'_>) -> Py<PyString> {
        self.ev.labels.operation_type.clone_ref(py)
    }

    /// When it happened, in seconds since the epoch (as `time.time()`).
    #[getter]
    fn time(&self) -> f64 {
        self.time
    }

    /// "heavy", "medium" or "light" (the token's weight at the time).
    #[getter]
    fn weight<'py>(&self, py: Python<'py>) -> Bound<'py, PyString> {
        let names = Weight::ALL.map(Weight::name);
        interned(py, &WEIGHT_NAMES, &names, self.ev.weight as usize)
    }

    /// "high", "normal" or "low".
    #[getter]
    fn priority<'py>(&self, py: Python<'py>) -> Bound<'py, PyString> {
        let names = Priority::ALL.map(crate::runtime::priority_name);
        interned(py, &PRIORITY_NAMES, &names, self.ev.priority as usize)
    }

    /// The 1-based core the token was routed to (None before it was admitted).
    #[getter]
    fn core(&self) -> Option<u16> {
        (self.ev.core != 0).then_some(self.ev.core)
    }

    /// The 0-based worker index on that core (None before it was admitted).
    #[getter]
    fn worker(&self) -> Option<u16> {
        (self.ev.worker != 0).then(|| self.ev.worker - 1)
    }

    /// Attempts started so far (1 for the first attempt; 0 before it started).
    #[getter]
    fn attempt(&self) -> u32 {
        self.ev.attempt
    }

    /// The operation's tags (None if it has none).
    #[getter]
    fn tags(&self, py: Python<'_>) -> Option<Py<PyDict>> {
        self.ev.labels.tags.as_ref().map(|t| t.clone_ref(py))
    }

    /// "started": seconds the attempt waited since it was submitted (or since its retry was
    /// scheduled to run); None for other kinds.
    #[getter]
    fn queue_wait(&self) -> Option<f64> {
        (self.ev.kind == STARTED && self.ev.span_ns != NONE).then(|| self.ev.span_ns as f64 / 1e9)
    }

    /// Seconds the attempt ran: "completed", "failed", "retried", and "killed"/"timed_out"
    /// of a token that had started; None otherwise.
    #[getter]
    fn duration(&self) -> Option<f64> {
        (self.ev.kind != STARTED && self.ev.span_ns != NONE).then(|| self.ev.span_ns as f64 / 1e9)
    }

    /// The exception of a "failed" or "retried" event (None otherwise).
    #[getter]
    fn error<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyAny>> {
        self.ev
            .obj
            .as_ref()
            .map(|o| o.bind(py).clone())
            .filter(|o| o.is_instance_of::<PyBaseException>())
    }

    /// Why a call was "blocked" or "refused", the record id of a "quarantined" one (or why it
    /// could not be stored), when a "retried" one runs again; None otherwise.
    #[getter]
    fn detail(&self, py: Python<'_>) -> Option<String> {
        if self.ev.delay_ns != NONE {
            return Some(format!("retry in {:.3}s", self.ev.delay_ns as f64 / 1e9));
        }
        let o = self.ev.obj.as_ref()?.bind(py);
        if o.is_instance_of::<PyBaseException>() {
            return None;
        }
        o.str().ok().map(|s| s.to_string())
    }

    /// The event as a JSON-safe dict (the error as `{"type": qualname, "message": str}`).
    fn as_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("kind", self.kind(py))?;
        d.set_item("token_id", self.token_id())?;
        d.set_item("operation", self.operation(py))?;
        d.set_item("time", self.time)?;
        d.set_item("weight", self.weight(py))?;
        d.set_item("priority", self.priority(py))?;
        d.set_item("core", self.core())?;
        d.set_item("worker", self.worker())?;
        d.set_item("attempt", self.attempt())?;
        let tags = match self.tags(py) {
            Some(t) => Some(t.bind(py).copy()?),
            None => None,
        };
        d.set_item("tags", tags)?;
        d.set_item("queue_wait", self.queue_wait())?;
        d.set_item("duration", self.duration())?;
        let err = match self.error(py) {
            Some(e) => {
                let ed = PyDict::new(py);
                let name = e
                    .get_type()
                    .qualname()
                    .map_or_else(|_| "BaseException".to_string(), |n| n.to_string());
                ed.set_item("type", name)?;
                ed.set_item(
                    "message",
                    e.str().map_or_else(|_| String::new(), |s| s.to_string()),
                )?;
                Some(ed)
            }
            None => None,
        };
        d.set_item("error", err)?;
        d.set_item("detail", self.detail(py))?;
        Ok(d)
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let op = self.ev.labels.operation_type.bind(py).to_string();
        match self.token_id() {
            Some(id) => format!(
                "<LifecycleEvent {} token={} op={:?}>",
                self.kind(py),
                id,
                op
            ),
            None => format!("<LifecycleEvent {} op={:?}>", self.kind(py), op),
        }
    }
}

// ---- what the token's way reports ---------------------------------------------------------

/// `t` was just settled by the caller: its operation counts the outcome, and its final event
/// is recorded.
pub(crate) fn settled(py: Python<'_>, t: &TaskToken) {
    if let Some(gh) = t.rt.guard.as_ref() {
        gh.note_settled(py, t);
    }
    emit_final(py, t);
    // A chain step keeps the step before it only for the tracing hook of its attempts (kept
    // only while a hook is set: no lock here otherwise).
    if t.rt.has_attempt_hook() {
        drop(t.with_gov_if(|g| g.previous.take()).flatten());
    }
}

/// The submission of `tok` raised `e` before the token was accepted (pool full, admission
/// closed, ...): it is counted and recorded as refused. Nothing if the token got further (a
/// quarantine interrupted by Ctrl-C is not a refusal).
pub(crate) fn refused(py: Python<'_>, tok: &Bound<'_, TaskToken>, e: &PyErr) {
    let t = tok.get();
    if t.header.state.load() != crate::state::TokenState::Created {
        return;
    }
    if let Some(gh) = t.rt.guard.as_ref() {
        gh.note_refused(py, &t.op);
    }
    if t.rt.events.wants(REFUSED) {
        emit(
            &t.rt.events,
            REFUSED,
            t,
            None,
            Some(message(py, e, "refused")),
        );
    }
}

/// `e`'s message as a str object (`fallback` if it cannot be made), an event's detail.
fn message(py: Python<'_>, e: &PyErr, fallback: &str) -> Py<PyAny> {
    let text = e.value(py).str();
    match text {
        Ok(s) => s.into_any().unbind(),
        Err(_) => PyString::new(py, fallback).into_any().unbind(),
    }
}

/// A breaker refused a call of `op` (no token was made).
pub(crate) fn blocked(py: Python<'_>, ring: &Ring, op: &Arc<OpSpec>, e: &PyErr) {
    if ring.wants(BLOCKED) {
        let why = e
            .value(py)
            .str()
            .map_or_else(|_| "blocked".to_string(), |s| s.to_string());
        emit_call(
            ring,
            BLOCKED,
            op,
            Some(PyString::new(py, &why).into_any().unbind()),
        );
    }
}

/// An attempt of `t` starts on its worker (`queued_ns`: since when it waited).
#[inline]
pub(crate) fn started(t: &TaskToken, queued_ns: u64) {
    let ring = &t.rt.events;
    if ring.wants(STARTED) {
        let wait = t.header.started_ns().map(|s| s.saturating_sub(queued_ns));
        emit(ring, STARTED, t, wait, None);
    }
}

/// An attempt of `t` failed with `err` (or timed out) and another one runs in `delay`
/// seconds.
pub(crate) fn retried(py: Python<'_>, t: &TaskToken, err: &Py<PyBaseException>, delay: f64) {
    if let Some(gh) = t.rt.guard.as_ref() {
        gh.note_retried(py, t);
    }
    let ring = &t.rt.events;
    if ring.wants(RETRIED) {
        let ran = t
            .header
            .started_ns()
            .map(|s| crate::clock::now_ns().saturating_sub(s));
        let delay_ns = (delay.max(0.0) * 1e9).min(u64::MAX as f64 / 2.0) as u64;
        push(
            ring,
            RETRIED,
            t,
            ran,
            delay_ns,
            Some(err.clone_ref(py).into_any()),
        );
    }
}

/// Runs one attempt of `tok`: `func(*args, **kwargs)` inside the token's copy of its
/// submitter's context, through the runtime's attempt hook if one is set.
pub(crate) fn call_attempt<'py>(
    py: Python<'py>,
    tok: &Bound<'py, TaskToken>,
    call: &crate::token::Call,
) -> PyResult<Bound<'py, PyAny>> {
    let t = tok.get();
    let func = t.op.func.bind(py);
    let args = call.args.bind(py);
    let kwargs = call.kwargs.as_ref().map(|k| k.bind(py));
    let Some(ctx) = call.ctx.as_ref().map(|c| c.as_ptr()) else {
        return run(py, tok, func, args, kwargs);
    };
    // Each attempt runs in a fresh copy of the (shared, immutable) snapshot: what it sets is
    // its own, and tokens sharing the snapshot (or a late attempt and the next one) never
    // enter the same context object.
    // SAFETY: attached; `ctx` is a context object; a new reference or NULL.
    let fresh = unsafe { Bound::from_owned_ptr_or_err(py, pyo3::ffi::PyContext_Copy(ctx))? };
    let ctx = fresh.as_ptr();
    // SAFETY: attached; `ctx` is a context object kept alive by `fresh`.
    if unsafe { pyo3::ffi::PyContext_Enter(ctx) } != 0 {
        return Err(PyErr::fetch(py));
    }
    let r = run(py, tok, func, args, kwargs);
    // SAFETY: the context entered above, on this thread.
    if unsafe { pyo3::ffi::PyContext_Exit(ctx) } != 0 {
        let exit_err = PyErr::fetch(py);
        return r.and(Err(exit_err));
    }
    r
}

fn run<'py>(
    py: Python<'py>,
    tok: &Bound<'py, TaskToken>,
    func: &Bound<'py, PyAny>,
    args: &Bound<'py, pyo3::types::PyTuple>,
    kwargs: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyAny>> {
    let t = tok.get();
    match t.rt.attempt_hook(py) {
        None => crate::exitguard::call(func, args, kwargs),
        Some(hook) => {
            let previous = t
                .with_gov_if(|g| g.previous.as_ref().map(|p| p.clone_ref(py)))
                .flatten();
            let kw = kwargs.map_or_else(|| py.None(), |k| k.clone().unbind().into_any());
            let hook_args = pyo3::types::PyTuple::new(
                py,
                [
                    tok.clone().into_any().unbind(),
                    func.clone().unbind(),
                    args.clone().into_any().unbind(),
                    kw,
                    previous.map_or_else(|| py.None(), |p| p.into_any()),
                ],
            )?;
            crate::exitguard::call(hook.bind(py), &hook_args, None)
        }
    }
}
