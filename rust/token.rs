//! `TaskToken`: the Python handle of one call. The scheduler carries `Py<TaskToken>` itself,
//! so a queued token is one Python object (no second allocation).

use std::cell::{RefCell, UnsafeCell};
use std::sync::{Arc, Mutex};
use std::thread::Thread;
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyBaseException, PyException};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyString, PyTuple};
use pyo3::{PyTraverseError, PyVisit};

use crate::errors::{deadline_in, CoreError};
use crate::governor::Gov;
use crate::policy::Policy;
use crate::router::{Priority, Weight};
use crate::runtime::{enter_blocking, on_any_worker, try_run_inline, Shared, WaitFor};
use crate::sched::Job;
use crate::state::{Header, TokenState, FLAG_PANIC};
use crate::sync::lock;

/// What events of an operation's tokens carry of it: its name and tags.
pub struct OpLabels {
    pub operation_type: Py<PyString>,
    pub tags: Option<Py<PyDict>>,
}

/// What every call of one decorated function shares.
pub struct OpSpec {
    /// The function every call runs (for `submit(fn)`, an `OpSpec` of its own token alone).
    pub func: Py<PyAny>,
    pub operation_type: Py<PyString>,
    pub weight: Weight,
    pub priority: Priority,
    pub storage_speed: Option<u8>,
    pub tags: Option<Py<PyDict>>,
    /// Timeout, retries, limit (None for an operation that uses none of them).
    pub policy: Option<Box<Policy>>,
    /// The code inspector's score of `func` (computed at decoration).
    pub complexity: Option<f32>,
    /// What the decorator declares to the Guard House (breaker, quarantine, prediction).
    pub guard: Option<Box<crate::guard::GuardDecl>>,
    /// False for calls that skip the spike check (a released quarantined call).
    pub spike_check: bool,
    /// Whether calls run in a copy of the submitter's `contextvars` context.
    pub copy_context: bool,
    /// The name and tags again, shared with the lifecycle events of its tokens.
    pub labels: Arc<OpLabels>,
}

impl OpLabels {
    pub fn new(py: Python<'_>, name: &Py<PyString>, tags: Option<&Py<PyDict>>) -> Arc<OpLabels> {
        Arc::new(OpLabels {
            operation_type: name.clone_ref(py),
            tags: tags.map(|t| t.clone_ref(py)),
        })
    }
}

impl OpSpec {
    /// The storage tier's name ("SLOW", "MODERATE", "FAST", "INSANE"), or None.
    pub fn tier_name(&self) -> Option<&'static str> {
        self.storage_speed
            .map(|t| crate::governor::TIERS[(t as usize).min(3)].0)
    }

    /// Whether tokens of this operation take the governed path (policy or storage tier).
    #[inline]
    pub fn governed(&self) -> bool {
        self.policy.is_some() || self.storage_speed.is_some()
    }
}

pub(crate) struct Call {
    pub args: Py<PyTuple>,
    pub kwargs: Option<Py<PyDict>>,
    /// The submitter's `contextvars` context, copied at submission (None: the operation
    /// opted out with `copy_context=False`).
    pub ctx: Option<ContextCopy>,
}

impl Call {
    pub(crate) fn new(
        py: Python<'_>,
        op: &OpSpec,
        args: Py<PyTuple>,
        kwargs: Option<Py<PyDict>>,
    ) -> PyResult<Call> {
        let ctx = if op.copy_context {
            Some(ContextCopy::current(py)?)
        } else {
            None
        };
        Ok(Call { args, kwargs, ctx })
    }
}

/// The submitting thread's `contextvars` context as it was at submission: an immutable
/// snapshot, shared by the tokens submitted in the same context. A token never runs in the
/// snapshot itself but in a fresh copy of it per attempt (`observe::call_attempt`), so what a
/// task sets stays in its own copy, and tokens sharing a snapshot can run at once.
///
/// Why shared: a context object per queued token doubles the objects the cyclic garbage
/// collector tracks in a burst of submissions, and the collections that causes cost a no-op
/// token about 30 % of its throughput (docs/observability.md). The per-attempt copy lives only
/// while the attempt runs, so CPython's context free list recycles it.
pub(crate) struct ContextCopy(Py<PyAny>);

thread_local! {
    /// The last snapshot this thread submitted with, and the address of the variables it holds
    /// (the snapshot keeps them alive, so the address cannot be reused meanwhile).
    static LAST_SNAPSHOT: RefCell<Option<(usize, Py<PyAny>)>> = const { RefCell::new(None) };
}

impl ContextCopy {
    fn current(py: Python<'_>) -> PyResult<ContextCopy> {
        // SAFETY: attached; a new reference or NULL with an error set.
        let ctx = unsafe {
            Bound::from_owned_ptr_or_err(py, pyo3::ffi::PyContext_CopyCurrent())?.unbind()
        };
        let Some(vars) = context_vars(py, &ctx) else {
            return Ok(ContextCopy(ctx));
        };
        // The same variables as the last submission from this thread: share its snapshot (this
        // copy goes straight back to the free list).
        let shared = LAST_SNAPSHOT.with(|c| {
            c.borrow()
                .as_ref()
                .filter(|(v, _)| *v == vars)
                .map(|(_, snap)| snap.clone_ref(py))
        });
        if let Some(snap) = shared {
            return Ok(ContextCopy(snap));
        }
        LAST_SNAPSHOT.with(|c| *c.borrow_mut() = Some((vars, ctx.clone_ref(py))));
        Ok(ContextCopy(ctx))
    }

    pub(crate) fn as_ptr(&self) -> *mut pyo3::ffi::PyObject {
        self.0.as_ptr()
    }

    pub(crate) fn clone_ref(&self, py: Python<'_>) -> ContextCopy {
        ContextCopy(self.0.clone_ref(py))
    }
}

/// The address of the variables (an immutable HAMT) a context holds, read from CPython's
/// `PyContext` (`PyObject_HEAD; PyContext *ctx_prev; PyHamtObject *ctx_vars; ...`, the same
/// from 3.7 to 3.14), or None if a check of that layout failed on this interpreter (then
/// every submission keeps a snapshot of its own). The address is only compared, never
/// followed.
fn context_vars(py: Python<'_>, ctx: &Py<PyAny>) -> Option<usize> {
    static LAYOUT_OK: PyOnceLock<bool> = PyOnceLock::new();
    if !*LAYOUT_OK.get_or_init(py, || check_context_layout(py).unwrap_or(false)) {
        return None;
    }
    Some(read_vars(ctx.as_ptr()))
}

fn read_vars(ctx: *mut pyo3::ffi::PyObject) -> usize {
    let offset = std::mem::size_of::<pyo3::ffi::PyObject>() + std::mem::size_of::<usize>();
    // SAFETY: `ctx` is a live context object, at least this large (checked once by
    // `check_context_layout`); an aligned pointer-sized read.
    unsafe { std::ptr::read((ctx as *const u8).add(offset) as *const usize) }
}

/// Whether `read_vars` reads the variables of a context: two copies of one context share
/// them (and they are not null), and a copy in which a variable was set has others.
fn check_context_layout(py: Python<'_>) -> PyResult<bool> {
    let cv = py.import("contextvars")?;
    let a = cv.call_method0("copy_context")?;
    if !a.get_type().name()?.to_string().eq("Context") {
        return Ok(false);
    }
    let b = a.call_method0("copy")?;
    let c = a.call_method0("copy")?;
    let var = cv
        .getattr("ContextVar")?
        .call1(("tokengate_context_layout_check",))?;
    c.call_method1("run", (var.getattr("set")?, 1))?;
    let (va, vb, vc) = (
        read_vars(a.as_ptr()),
        read_vars(b.as_ptr()),
        read_vars(c.as_ptr()),
    );
    Ok(va != 0 && va == vb && vc != 0 && vc != va)
}

struct Slot {
    call: Option<Call>,
    /// Done callbacks, chained tokens and threads parked until the token is settled, in one
    /// list (the token stays small: most have none), taken by whoever settles it.
    listeners: Vec<Listener>,
    /// What the policy keeps per token (permits held, attempt errors, deadline generation);
    /// None for a token without policy.
    gov: Option<Box<Gov>>,
}

pub(crate) enum Listener {
    Callback(Py<PyAny>),
    Waiter(Thread),
    /// A token made by `then()`, submitted (or ended with the cause) once this one settles.
    Chain(Py<TaskToken>),
}

type Outcome = Result<Py<PyAny>, Py<PyBaseException>>;

/// The result slot: written once, read without a lock, cleared only by the garbage collector.
///
/// Invariants that make the `Sync` impl sound:
/// - it is written exactly once, by the worker that moved the token to EXECUTING, before the
///   EXECUTING → COMPLETED/FAILED transition (a release store on the state);
/// - it is read only after a COMPLETED/FAILED state was observed (an acquire load);
/// - `clear` runs only from `__clear__`, when the garbage collector found the token unreachable
///   (so nobody can be reading it) and the interpreter is attached.
struct OutcomeCell(UnsafeCell<Option<Outcome>>);

// SAFETY: see the invariants above; `Outcome` itself is Send + Sync.
unsafe impl Sync for OutcomeCell {}

impl OutcomeCell {
    fn set(&self, o: Outcome) {
        // SAFETY: the only writer, before the state is published (see above).
        unsafe { *self.0.get() = Some(o) }
    }

    fn get(&self) -> Option<&Outcome> {
        // SAFETY: readers come after the final state is published; nobody writes then.
        unsafe { (*self.0.get()).as_ref() }
    }

    fn clear(&self) {
        // SAFETY: only from __clear__ on an unreachable token (see above).
        unsafe { *self.0.get() = None }
    }
}

/// A handle on one call of a guarded function: identity, state, timings and its result.
#[pyclass(frozen, weakref, module = "tokengate._core", name = "TaskToken")]
pub struct TaskToken {
    pub(crate) header: Header,
    pub(crate) op: Arc<OpSpec>,
    pub(crate) rt: Arc<Shared>,
    slot: Mutex<Slot>,
    outcome: OutcomeCell,
}

impl Job for Py<TaskToken> {
    #[inline]
    fn header(&self) -> &Header {
        &self.get().header
    }

    #[inline]
    fn admitted(&self) {
        let t = self.get();
        if t.rt.events.wants(crate::observe::ADMITTED) {
            crate::observe::emit(&t.rt.events, crate::observe::ADMITTED, t, None, None);
        }
    }
}

/// Wakes threads taken from a token's waiter list.
pub(crate) fn wake_threads(threads: Vec<Thread>) {
    for t in threads {
        t.unpark();
    }
}

/// How long a waiter parks before it re-attaches to check for signals (Ctrl-C).
const SIGNAL_CHECK: Duration = Duration::from_millis(50);

impl TaskToken {
    pub(crate) fn new(id: u64, op: Arc<OpSpec>, rt: Arc<Shared>, call: Call) -> Self {
        TaskToken::new_at(id, op, rt, call, crate::clock::now_ns())
    }

    pub(crate) fn new_at(
        id: u64,
        op: Arc<OpSpec>,
        rt: Arc<Shared>,
        call: Call,
        created_ns: u64,
    ) -> Self {
        TaskToken {
            header: Header::new_at(id, op.weight, op.priority, created_ns),
            op,
            rt,
            slot: Mutex::new(Slot {
                call: Some(call),
                listeners: Vec::new(),
                gov: None,
            }),
            outcome: OutcomeCell(UnsafeCell::new(None)),
        }
    }

    /// Takes the call out (to run it, or to drop it as the token settles); its bytes leave
    /// the memory budget.
    pub(crate) fn take_call(&self) -> Option<Call> {
        let call = lock(&self.slot).call.take();
        let n = self.header.take_bytes();
        if n > 0 {
            self.rt.sched.release_bytes(n);
        }
        call
    }

    /// The call, left in place for another attempt (its bytes leave the memory budget all the
    /// same: the budget is for queued work, and this call now runs).
    pub(crate) fn clone_call(&self, py: Python<'_>) -> Option<Call> {
        let n = self.header.take_bytes();
        if n > 0 {
            self.rt.sched.release_bytes(n);
        }
        lock(&self.slot).call.as_ref().map(|c| Call {
            args: c.args.clone_ref(py),
            kwargs: c.kwargs.as_ref().map(|k| k.clone_ref(py)),
            ctx: c.ctx.as_ref().map(|k| k.clone_ref(py)),
        })
    }

    /// The call's arguments and keyword arguments (new references; the call stays in place).
    pub(crate) fn call_args(&self, py: Python<'_>) -> Option<(Py<PyTuple>, Option<Py<PyDict>>)> {
        lock(&self.slot).call.as_ref().map(|c| {
            (
                c.args.clone_ref(py),
                c.kwargs.as_ref().map(|k| k.clone_ref(py)),
            )
        })
    }

    /// Replaces the call's arguments (a chain step gets the result of the step before it).
    pub(crate) fn set_args(&self, args: Py<PyTuple>) {
        let mut slot = lock(&self.slot);
        if let Some(c) = slot.call.as_mut() {
            c.args = args;
        }
    }

    /// Runs `f` on the token's policy state (created on first use).
    pub(crate) fn with_gov<R>(&self, f: impl FnOnce(&mut Gov) -> R) -> R {
        let mut slot = lock(&self.slot);
        f(slot.gov.get_or_insert_with(Default::default))
    }

    /// Runs `f` on the token's policy state if it has any (none is created).
    pub(crate) fn with_gov_if<R>(&self, f: impl FnOnce(&mut Gov) -> R) -> Option<R> {
        lock(&self.slot).gov.as_deref_mut().map(f)
    }

    /// Adds a listener unless the token is settled already (then it is given back).
    pub(crate) fn add_listener(&self, l: Listener) -> Result<(), Listener> {
        let mut slot = lock(&self.slot);
        if self.header.state.load().is_settled() {
            return Err(l);
        }
        slot.listeners.push(l);
        Ok(())
    }

    pub(crate) fn set_outcome(&self, o: Outcome) {
        // Only the worker that moved the token to EXECUTING gets here, once.
        self.outcome.set(o);
    }

    pub(crate) fn wants_panic(&self) -> bool {
        self.header.state.raw() & FLAG_PANIC != 0
    }

    /// The token was just settled by the caller (who made its final transition, once per
    /// token): counts its outcome for its operation, records its final event, and takes its
    /// listeners (see `take_listeners`).
    pub(crate) fn settle_listeners(&self, py: Python<'_>) -> (Vec<Thread>, Vec<Listener>) {
        crate::observe::settled(py, self);
        self.take_listeners()
    }

    /// The exception of a FAILED token.
    pub(crate) fn error(&self, py: Python<'_>) -> Option<Py<PyBaseException>> {
        match self.outcome() {
            Some(Err(e)) => Some(e.clone_ref(py)),
            _ => None,
        }
    }

    /// Takes the threads to wake and the callbacks and chained tokens to run; call once the
    /// token is settled (nothing is added to them after that).
    pub(crate) fn take_listeners(&self) -> (Vec<Thread>, Vec<Listener>) {
        let listeners = std::mem::take(&mut lock(&self.slot).listeners);
        let mut threads = Vec::new();
        let mut others = Vec::new();
        for l in listeners {
            match l {
                Listener::Waiter(t) => threads.push(t),
                other => others.push(other),
            }
        }
        (threads, others)
    }

    /// Runs `cbs`: done callbacks, and the chained tokens' next step. Every callback runs; an
    /// `Exception` one raises is logged. A `BaseException` that is not an `Exception`
    /// (`KeyboardInterrupt`, `SystemExit`) raised on a thread that is not a worker (a Ctrl-C
    /// reaching the main thread inside a callback run by `kill()` or `stop(wait=False)`) is
    /// re-raised once they all ran, as `concurrent.futures` does.
    pub(crate) fn call_callbacks(slf: &Bound<'_, TaskToken>, cbs: Vec<Listener>) -> PyResult<()> {
        let mut interrupt = None;
        for l in cbs {
            match l {
                Listener::Callback(cb) => {
                    if let Some(e) = call_callback(slf, cb.bind(slf.py())) {
                        interrupt.get_or_insert(e);
                    }
                }
                Listener::Chain(child) => {
                    crate::governor::continue_chain(slf, child.bind(slf.py()))
                }
                Listener::Waiter(t) => t.unpark(),
            }
        }
        interrupt.map_or(Ok(()), Err)
    }

    /// Wakes the waiters and runs the callbacks of a token that just became final.
    pub(crate) fn notify_listeners(slf: &Bound<'_, TaskToken>) -> PyResult<()> {
        let (threads, callbacks) = slf.get().settle_listeners(slf.py());
        wake_threads(threads);
        TaskToken::call_callbacks(slf, callbacks)
    }

    /// Puts this thread on the listener list; false if the token is final already. Whoever
    /// makes the token final takes the list under the same lock after its transition, so a
    /// waiter woken by it need not remove itself; one that stops waiting early calls
    /// `unregister_waiter`.
    fn register_waiter(&self) -> bool {
        let mut slot = lock(&self.slot);
        if self.header.state.load().is_settled() {
            return false;
        }
        slot.listeners
            .push(Listener::Waiter(std::thread::current()));
        true
    }

    fn unregister_waiter(&self) {
        let me = std::thread::current().id();
        lock(&self.slot)
            .listeners
            .retain(|l| !matches!(l, Listener::Waiter(t) if t.id() == me));
    }

    /// Parks (GIL released by the caller, registered as a waiter) until final or `until`.
    fn park_until_final(&self, until: Instant) -> bool {
        loop {
            if self.header.state.load().is_settled() {
                return true;
            }
            let now = Instant::now();
            if now >= until {
                return false;
            }
            std::thread::park_timeout(until - now);
        }
    }

    /// Waits for a final state; `Ok(false)` on timeout. The GIL is released while parked and
    /// signals are checked between timed waits.
    ///
    /// Inside a task, a token that has not started is run inline on this thread (when no
    /// timeout is given), so a task never blocks on work queued behind it; otherwise the
    /// worker hands its place to a compensating worker while it waits, and a wait that can
    /// never end (its own token, a cycle of waits) raises `TokenDeadlock` at once.
    pub(crate) fn wait_final(
        slf: &Bound<'_, TaskToken>,
        py: Python<'_>,
        timeout: Option<f64>,
    ) -> PyResult<bool> {
        let tok = slf.get();
        if tok.header.state.load().is_settled() {
            return Ok(true);
        }
        if tok.rt.forked() {
            return Err(CoreError::Forked.into_pyerr(py));
        }
        if let Some(t) = timeout {
            if t.is_nan() || t < 0.0 {
                return Err(CoreError::Config(format!(
                    "timeout must be a number of seconds >= 0 or None, got {t}"
                ))
                .into_pyerr(py));
            }
        }
        if timeout == Some(0.0) {
            return Ok(false); // a poll: nothing to wait for, no place to hand over
        }
        let deadline = deadline_in(timeout);
        let on_worker = on_any_worker();
        if on_worker && timeout.is_none() && try_run_inline(py, slf) {
            return Ok(true);
        }
        let mut blocked = if on_worker {
            enter_blocking(py, WaitFor::Token(slf), deadline.is_some())?
        } else {
            None
        };
        if blocked.as_ref().is_some_and(|b| !b.compensated) {
            // No slot left on this core for a compensating worker: waiting (even with a
            // timeout) on a token queued behind this very wait would only stall the core,
            // so run it here if it has not started. The wait then lasts as long as it runs.
            drop(blocked.take());
            if try_run_inline(py, slf) {
                return Ok(true);
            }
            blocked = enter_blocking(py, WaitFor::Token(slf), deadline.is_some())?;
        }
        let _blocked = blocked;
        if !tok.register_waiter() {
            return Ok(true);
        }
        loop {
            let until = Instant::now() + SIGNAL_CHECK;
            let until = deadline.map_or(until, |d| d.min(until));
            if py.detach(|| tok.park_until_final(until)) {
                return Ok(true);
            }
            if let Err(e) = py.check_signals() {
                tok.unregister_waiter();
                return Err(e);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                tok.unregister_waiter();
                return Ok(tok.header.state.load().is_settled());
            }
        }
    }

    /// The error a waiter gets from a token that settled without an outcome of its own.
    fn killed_error(&self, py: Python<'_>) -> PyErr {
        let id = self.header.id;
        let operation = self.op.operation_type.bind(py).to_string();
        let state = self.header.state.load();
        let (upstream, quarantined, record) = {
            let slot = lock(&self.slot);
            let g = slot.gov.as_ref();
            (
                g.and_then(|g| g.upstream),
                g.is_some_and(|g| g.upstream_quarantined),
                g.and_then(|g| g.quarantine.clone()),
            )
        };
        if let Some(parent) = upstream {
            return CoreError::Upstream {
                id,
                operation,
                parent,
                timed_out: state == TokenState::TimedOut,
                quarantined,
            }
            .into_pyerr(py);
        }
        match state {
            TokenState::Quarantined => {
                let record = record.unwrap_or_else(|| Err("no quarantine store".into()));
                let err = CoreError::Quarantined {
                    id,
                    operation: operation.clone(),
                    record: record.clone(),
                }
                .into_pyerr(py);
                let v = err.value(py);
                let _ = v.setattr("token_id", id);
                let _ = v.setattr("operation", operation);
                let _ = v.setattr("record_id", record.ok());
                return err;
            }
            TokenState::TimedOut => CoreError::TimedOut {
                id,
                operation,
                seconds: self
                    .op
                    .policy
                    .as_ref()
                    .and_then(|p| p.timeout)
                    .unwrap_or(0.0),
            },
            TokenState::Cancelling => CoreError::KilledRunning { id, operation },
            TokenState::Killed if self.header.started_ns().is_some() => {
                CoreError::KilledRunning { id, operation }
            }
            _ => CoreError::Killed { id, operation },
        }
        .into_pyerr(py)
    }

    fn wait_or_timeout(slf: &Bound<'_, TaskToken>, timeout: Option<f64>) -> PyResult<()> {
        let py = slf.py();
        if TaskToken::wait_final(slf, py, timeout)? {
            Ok(())
        } else {
            let tok = slf.get();
            Err(CoreError::Timeout {
                id: tok.header.id,
                operation: tok.op.operation_type.bind(py).to_string(),
                seconds: timeout.unwrap_or(0.0),
            }
            .into_pyerr(py))
        }
    }

    /// The result or exception, once the token is COMPLETED or FAILED.
    fn outcome(&self) -> Option<&Outcome> {
        if matches!(
            self.header.state.load(),
            TokenState::Completed | TokenState::Failed
        ) {
            self.outcome.get()
        } else {
            None
        }
    }
}

/// The value of a finished token, or its exception raised again.
fn outcome_value(py: Python<'_>, o: &Outcome) -> PyResult<Py<PyAny>> {
    match o {
        Ok(v) => Ok(v.clone_ref(py)),
        Err(e) => Err(PyErr::from_value(e.bind(py).clone().into_any())),
    }
}

/// Runs `f`, turning a Rust panic into an `InternalError` instead of letting it escape as
/// `PanicException` (a `BaseException` that `except Exception` does not catch).
pub(crate) fn no_panic<T>(py: Python<'_>, f: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(CoreError::Internal(format!(
            "internal error in the tokengate core: {}",
            crate::runtime::panic_message(&p)
        ))
        .into_pyerr(py)),
    }
}

/// Runs one done callback; returns the interrupt to re-raise (see `call_callbacks`).
fn call_callback(tok: &Bound<'_, TaskToken>, cb: &Bound<'_, PyAny>) -> Option<PyErr> {
    let py = tok.py();
    let args = PyTuple::new(py, [tok]);
    let e = args
        .and_then(|a| crate::exitguard::call(cb, &a, None))
        .err()?;
    if !e.is_instance_of::<PyException>(py) && !on_any_worker() {
        return Some(e);
    }
    log_callback_error(py, cb, e);
    None
}

static LOGGER: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

pub(crate) fn log_callback_error(py: Python<'_>, cb: &Bound<'_, PyAny>, e: PyErr) {
    log_raised(py, "done callback", cb, e)
}

/// Logs `e`, raised by `what` `cb`, on the "tokengate" logger (or as unraisable if logging
/// itself fails).
pub(crate) fn log_raised(py: Python<'_>, what: &str, cb: &Bound<'_, PyAny>, e: PyErr) {
    let logged = LOGGER
        .get_or_try_init(py, || {
            py.import("logging")?
                .call_method1("getLogger", ("tokengate",))
                .map(Bound::unbind)
        })
        .and_then(|logger| {
            let kw = PyDict::new(py);
            kw.set_item("exc_info", e.clone_ref(py).into_value(py))?;
            logger.bind(py).call_method(
                "error",
                (format!("{what} %r raised %r"), cb, e.value(py)),
                Some(&kw),
            )?;
            Ok(())
        });
    if logged.is_err() {
        e.write_unraisable(py, Some(cb));
    }
}

fn secs(ns: Option<u64>) -> Option<f64> {
    ns.map(|n| n as f64 / 1e9)
}

static STATE_MEMBERS: PyOnceLock<Vec<Py<PyAny>>> = PyOnceLock::new();
static WEIGHT_MEMBERS: PyOnceLock<Vec<Py<PyAny>>> = PyOnceLock::new();

fn enum_member<'py>(
    py: Python<'py>,
    cell: &'static PyOnceLock<Vec<Py<PyAny>>>,
    class: &str,
    names: &[&str],
    idx: usize,
) -> PyResult<Bound<'py, PyAny>> {
    let members = cell.get_or_try_init(py, || -> PyResult<_> {
        let cls = py.import("tokengate._types")?.getattr(class)?;
        names
            .iter()
            .map(|n| cls.getattr(*n).map(Bound::unbind))
            .collect()
    })?;
    Ok(members[idx].bind(py).clone())
}

pub(crate) fn weight_member(py: Python<'_>, w: Weight) -> PyResult<Bound<'_, PyAny>> {
    enum_member(
        py,
        &WEIGHT_MEMBERS,
        "TaskWeight",
        &["HEAVY", "MEDIUM", "LIGHT"],
        w as usize,
    )
}

#[pymethods]
impl TaskToken {
    /// The objects this token owns alone (its arguments, result and callbacks), so reference
    /// cycles through it (e.g. an exception whose traceback holds the token) are collected.
    /// The function and tags are shared by every call and belong to the decorator.
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        // The function and tags: only when this token owns its `OpSpec` alone (a `submit(fn)`
        // token, or one whose decorated function is gone); otherwise they belong to the
        // decorator, which reports them once no token shares them.
        if Arc::strong_count(&self.op) == 1 {
            visit.call(&self.op.func)?;
            if let Some(t) = &self.op.tags {
                visit.call(t)?;
            }
        }
        let state = self.header.state.load();
        if matches!(state, TokenState::Completed | TokenState::Failed) {
            match self.outcome.get() {
                Some(Ok(v)) => visit.call(v)?,
                Some(Err(e)) => visit.call(e)?,
                None => {}
            }
        }
        if state.is_final() && self.op.policy.is_none() {
            // The call and the callbacks leave the slot as the token becomes final (a moment
            // later at most, and a reference not reported is only kept a cycle longer): no
            // lock for the tokens a program keeps around after they finished (those with a
            // policy keep their attempts' errors there).
            return Ok(());
        }
        // A worker holds the slot lock only for a moment; never block inside the collector.
        if let Ok(slot) = self.slot.try_lock() {
            if let Some(gov) = &slot.gov {
                for e in &gov.errors {
                    visit.call(e)?;
                }
                if let Some(p) = &gov.previous {
                    visit.call(p)?;
                }
            }
            if let Some(call) = &slot.call {
                visit.call(&call.args)?;
                if let Some(kw) = &call.kwargs {
                    visit.call(kw)?;
                }
            }
            for l in &slot.listeners {
                if let Listener::Callback(cb) = l {
                    visit.call(cb)?;
                }
            }
        }
        Ok(())
    }

    fn __clear__(&self) {
        if self.header.state.load().is_final() {
            self.outcome.clear();
        }
        // Unreachable tokens are not in any worker's hands, so the lock is free, except in a
        // forked child where a parent thread may have held it at fork time: never block here.
        if let Ok(mut slot) = self.slot.try_lock() {
            let call = slot.call.take();
            let listeners = std::mem::take(&mut slot.listeners);
            let errors = slot.gov.as_mut().map(|g| std::mem::take(&mut g.errors));
            drop(slot);
            drop((call, listeners, errors));
        }
    }

    /// Unique id (per coordinator, increasing from 1).
    #[getter]
    fn token_id(&self) -> u64 {
        self.header.id
    }

    #[getter]
    fn operation_type(&self, py: Python<'_>) -> Py<PyString> {
        self.op.operation_type.clone_ref(py)
    }

    #[getter]
    fn weight<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        weight_member(py, self.header.weight())
    }

    /// The free-form tags given to the decorator (None if none).
    #[getter]
    fn tags(&self, py: Python<'_>) -> Option<Py<PyDict>> {
        self.op.tags.as_ref().map(|t| t.clone_ref(py))
    }

    /// The storage tier ("SLOW", "MODERATE", "FAST", "INSANE"), or None.
    #[getter]
    fn storage_speed(&self) -> Option<&'static str> {
        self.op.tier_name()
    }

    /// The queue lane: "high", "normal" or "low".
    #[getter]
    fn priority(&self) -> &'static str {
        crate::runtime::priority_name(self.header.priority())
    }

    /// Attempts started so far (0 before it runs; more than 1 after retries).
    #[getter]
    fn attempts(&self) -> u32 {
        self.header.attempt()
    }

    /// The exception of each failed attempt, oldest first (the last one is the token's own
    /// error if its retries ran out).
    #[getter]
    fn errors(&self, py: Python<'_>) -> Vec<Py<PyAny>> {
        let mut out: Vec<Py<PyAny>> = {
            let slot = lock(&self.slot);
            slot.gov.as_ref().map_or_else(Vec::new, |g| {
                g.errors
                    .iter()
                    .map(|e| e.clone_ref(py).into_any())
                    .collect()
            })
        };
        // A failed token's own exception is its last attempt's error (kept apart from the
        // list when it had no retries).
        if let Some(Err(e)) = self.outcome() {
            if !out.last().is_some_and(|l| l.is(e.as_any())) {
                out.push(e.clone_ref(py).into_any());
            }
        }
        out
    }

    /// The duration the operation's cost model predicted for this call from its arguments, in
    /// seconds (None when the operation does not predict or had too few samples).
    #[getter]
    fn predicted_duration(&self) -> Option<f64> {
        self.header.prediction().map(|(_, p)| p as f64 / 1e9)
    }

    /// The code inspector's complexity score of the token's function (None when unknown).
    #[getter]
    fn complexity_score(&self, py: Python<'_>) -> Option<f64> {
        match (self.op.complexity, self.rt.guard.as_ref()) {
            (Some(c), _) => Some(c as f64),
            (None, Some(gh)) => gh.complexity_of(py, self),
            (None, None) => None,
        }
    }

    /// Seconds each attempt may take (None: no timeout).
    #[getter]
    fn timeout(&self) -> Option<f64> {
        self.op.policy.as_ref().and_then(|p| p.timeout)
    }

    #[getter]
    fn state<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let names: Vec<&str> = TokenState::ALL.iter().map(|s| s.name()).collect();
        enum_member(
            py,
            &STATE_MEMBERS,
            "TokenState",
            &names,
            self.header.state.load() as usize,
        )
    }

    /// 1-based virtual core the token was routed to, once admitted.
    #[getter]
    fn core_id(&self) -> Option<usize> {
        self.header.placement().map(|(c, _)| c + 1)
    }

    /// 0-based worker index on that core, once admitted.
    #[getter]
    fn worker_id(&self) -> Option<usize> {
        self.header.placement().map(|(_, w)| w)
    }

    #[getter]
    fn created_at(&self) -> f64 {
        self.header.created_ns() as f64 / 1e9
    }
    #[getter]
    fn admitted_at(&self) -> Option<f64> {
        secs(self.header.admitted_ns())
    }
    #[getter]
    fn started_at(&self) -> Option<f64> {
        secs(self.header.started_ns())
    }
    #[getter]
    fn finished_at(&self) -> Option<f64> {
        secs(self.header.finished_ns())
    }

    /// True once the token's outcome is decided: COMPLETED, FAILED, KILLED, TIMED_OUT, or
    /// CANCELLING (killed while it runs; its task may still be running).
    fn done(&self) -> bool {
        self.header.state.load().is_settled()
    }

    /// Waits until the token is final; returns False if `timeout` seconds passed first.
    #[pyo3(signature = (timeout=None))]
    fn wait(slf: &Bound<'_, Self>, timeout: Option<f64>) -> PyResult<bool> {
        no_panic(slf.py(), || TaskToken::wait_final(slf, slf.py(), timeout))
    }

    /// The task's return value. Re-raises the task's exception, raises `TokenKilled` if the
    /// token was killed and `TokenTimeout` if `timeout` seconds pass first.
    #[pyo3(signature = (timeout=None))]
    fn get(slf: &Bound<'_, Self>, timeout: Option<f64>) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        if let Some(o) = slf.get().outcome() {
            // Final already: one atomic load, no lock.
            return outcome_value(py, o);
        }
        no_panic(py, || {
            TaskToken::wait_or_timeout(slf, timeout)?;
            let tok = slf.get();
            match tok.outcome() {
                Some(o) => outcome_value(py, o),
                None => Err(tok.killed_error(py)),
            }
        })
    }

    /// Same as `get`.
    #[pyo3(signature = (timeout=None))]
    fn result(slf: &Bound<'_, Self>, timeout: Option<f64>) -> PyResult<Py<PyAny>> {
        TaskToken::get(slf, timeout)
    }

    /// The exception the task raised, or None if it returned.
    #[pyo3(signature = (timeout=None))]
    fn exception(slf: &Bound<'_, Self>, timeout: Option<f64>) -> PyResult<Option<Py<PyAny>>> {
        let py = slf.py();
        no_panic(py, || {
            TaskToken::wait_or_timeout(slf, timeout)?;
            let tok = slf.get();
            match tok.outcome() {
                Some(Ok(_)) => Ok(None),
                Some(Err(e)) => Ok(Some(e.clone_ref(py).into_any())),
                None => Err(tok.killed_error(py)),
            }
        })
    }

    /// Kills the token. One that has not started becomes KILLED at once; one that is running
    /// becomes CANCELLING: its waiters are released at once with `TokenKilled`, the task
    /// keeps running until it returns or calls `tokengate.checkpoint()` (which then raises
    /// `TokenCancelled`), and its result is discarded. Returns False if the token is already
    /// settled (or storing its result right now).
    fn kill(slf: &Bound<'_, Self>) -> PyResult<bool> {
        let tok = slf.get();
        if tok.rt.forked() {
            return Ok(false); // the token lives in the parent process
        }
        let py = slf.py();
        let killed = match tok.rt.sched.kill(&tok.header) {
            Ok(_) => {
                drop(tok.take_call());
                crate::governor::settled(py, slf);
                true
            }
            Err(TokenState::Executing) => tok.rt.sched.cancel_running(&tok.header).is_ok(),
            Err(_) => false,
        };
        if killed {
            TaskToken::notify_listeners(slf)?;
        }
        Ok(killed)
    }

    /// Kills the token only if it has not started (what `concurrent.futures.Future.cancel`
    /// does); returns whether it did.
    fn cancel_queued(slf: &Bound<'_, Self>) -> PyResult<bool> {
        let tok = slf.get();
        if tok.rt.forked() || !tok.header.state.load().is_queued() {
            return Ok(false);
        }
        match tok.rt.sched.kill(&tok.header) {
            Ok(_) => {
                drop(tok.take_call());
                crate::governor::settled(slf.py(), slf);
                TaskToken::notify_listeners(slf)?;
                Ok(true)
            }
            Err(_) => Ok(false),
        }
    }

    /// Runs `fn(result, *args)` as a new token once this one completes, without a worker
    /// waiting for it, and returns that token at once. If this token fails, is killed or
    /// times out, the new one ends the same way without running (a failure with this
    /// token's exception), and so on down the chain. `fn` may be a guarded function (its
    /// operation, weight and policy apply) or any callable; `options` are those of
    /// `fn.options(...)` (priority, timeout, weight, retries, ...).
    #[pyo3(signature = (func, *args, **options))]
    fn then<'py>(
        slf: &Bound<'py, Self>,
        func: Bound<'py, PyAny>,
        args: Bound<'py, PyTuple>,
        options: Option<Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, TaskToken>> {
        no_panic(slf.py(), || {
            crate::governor::chain(slf, func, args, options)
        })
    }

    /// Calls `fn(token)` once the token is final (at once if it already is), on the thread
    /// that finishes it. Exceptions raised by `fn` are logged to the "tokengate" logger.
    fn add_done_callback(slf: &Bound<'_, Self>, func: Bound<'_, PyAny>) -> PyResult<()> {
        if !func.is_callable() {
            return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                "add_done_callback needs a callable, got {}",
                func.get_type().name()?
            )));
        }
        if slf.get().rt.forked() {
            if !slf.get().header.state.load().is_settled() {
                // It would never run here: the token finishes (or not) in the parent process.
                return Err(CoreError::Forked.into_pyerr(slf.py()));
            }
            // Final: run it now, without the token's lock (a parent thread may have held it
            // at fork time).
            return call_callback(slf, &func).map_or(Ok(()), Err);
        }
        match slf.get().add_listener(Listener::Callback(func.unbind())) {
            Ok(()) => Ok(()),
            Err(Listener::Callback(func)) => {
                call_callback(slf, func.bind(slf.py())).map_or(Ok(()), Err)
            }
            Err(_) => unreachable!("the listener given back is the one passed"),
        }
    }

    fn __await__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        slf.py()
            .import("tokengate._aio")?
            .call_method1("await_token", (slf,))
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let place = match self.header.placement() {
            Some((c, w)) => format!(" core={} worker={}", c + 1, w),
            None => String::new(),
        };
        format!(
            "<TaskToken {} {} {}{}>",
            self.header.id,
            self.op.operation_type.bind(py),
            self.header.state.load().name(),
            place
        )
    }
}

/// Test hook: the worker that picks this token up panics inside the core, which must turn
/// into an `InternalError` on the token (never an abort).
#[pyfunction]
pub fn _debug_panic_on_run(token: &Bound<'_, TaskToken>) {
    token.get().header.state.set_flags(FLAG_PANIC);
}
