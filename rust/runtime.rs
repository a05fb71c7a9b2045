//! The PyO3 side of the scheduler: worker threads that run Python callables, the `Runtime`
//! class the Python `OperationsCoordinator` drives, and the submit path shared with
//! `GuardedFunction.__call__`.

use std::cell::{RefCell, UnsafeCell};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};

use crate::errors::{deadline_in, internal_error_value, CoreError};
use crate::governor::{self, EndOfAttempt, Governor, TIERS};
use crate::router::{Priority, Weight};
use crate::sched::{Config, Overflow, RejectReason, Rejected, Scheduler};
use crate::state::{TokenState, FLAG_PERMITS};
use crate::sync::lock;
use crate::token::{no_panic, wake_threads, Call, OpSpec, TaskToken};
use crate::waits::{Deadlock, Target, WaitGraph};

/// Stack size of a worker thread when none is given (what a `threading.Thread` gets on Linux).
const DEFAULT_STACK: usize = 8 << 20;
const MIN_STACK: usize = 64 << 10;
const MAX_STACK: usize = 1 << 30;

/// Everything the worker threads and the tokens share.
pub struct Shared {
    pub(crate) sched: Scheduler<Py<TaskToken>>,
    /// Tasks blocked inside a wait (for deadlock checks and `drain()` from a task).
    waits: WaitGraph,
    /// Timeouts, retries, limits and storage tiers.
    pub(crate) gov: Governor,
    /// Health, breakers, spike detection and history (None: the Guard House is off).
    pub(crate) guard: Option<crate::guard::GuardHouse>,
    cpu_map: Vec<usize>,
    pub(crate) pin: bool,
    pin_failures: AtomicUsize,
    internal_errors: AtomicUsize,
    spawn_failures: AtomicUsize,
    inline_runs: AtomicU64,
    submit_timeout: Option<f64>,
    stack_size: usize,
    /// Whether decorated calls come here while it runs (see `register`).
    decorated_calls: bool,
    pub(crate) threads: Mutex<Vec<(std::thread::ThreadId, JoinHandle<()>)>>,
    started: AtomicBool,
    fork_gen: u64,
    /// Whether a monitor thread gives busy cores more workers at once (`monitor.rs`).
    grow_on_demand: bool,
    pub(crate) growth: crate::monitor::Counters,
    /// Lifecycle events (recorded only for the kinds someone subscribed to).
    pub(crate) events: crate::observe::Ring,
    /// What runs each attempt in place of the bare call (tracing), if set.
    attempt_hook: Mutex<Option<Py<PyAny>>>,
    has_attempt_hook: AtomicBool,
    /// What checks each call before it becomes a token (a backend's), if set.
    submit_check: Mutex<Option<Py<PyAny>>>,
    has_submit_check: AtomicBool,
}

impl Shared {
    /// Whether an attempt hook is set (one relaxed load).
    #[inline]
    pub(crate) fn has_attempt_hook(&self) -> bool {
        self.has_attempt_hook.load(Ordering::Relaxed)
    }

    /// The attempt hook, if one is set (one relaxed load when none is).
    #[inline]
    pub(crate) fn attempt_hook(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        if !self.has_attempt_hook.load(Ordering::Relaxed) {
            return None;
        }
        lock(&self.attempt_hook).as_ref().map(|h| h.clone_ref(py))
    }

    /// Whether a submit check is set (one relaxed load).
    #[inline]
    pub(crate) fn has_submit_check(&self) -> bool {
        self.has_submit_check.load(Ordering::Relaxed)
    }

    /// Runs the submit check, if one is set, on a call of `op` (one relaxed load when none
    /// is): `check(operation, func, args, kwargs)`; what it raises refuses the call.
    #[inline]
    pub(crate) fn check_submit(
        &self,
        py: Python<'_>,
        op: &OpSpec,
        args: &Bound<'_, PyTuple>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<()> {
        if !self.has_submit_check.load(Ordering::Relaxed) {
            return Ok(());
        }
        let Some(check) = lock(&self.submit_check).as_ref().map(|h| h.clone_ref(py)) else {
            return Ok(());
        };
        let kw = kwargs.map_or_else(|| py.None(), |k| k.clone().unbind().into_any());
        check.bind(py).call1((
            op.operation_type.clone_ref(py),
            op.func.clone_ref(py),
            args.clone(),
            kw,
        ))?;
        Ok(())
    }
}

/// The runtimes decorated calls go to; the last started one wins.
struct Registry(UnsafeCell<RwLock<Vec<Arc<Shared>>>>);

// SAFETY: the RwLock inside is Sync; the cell is only replaced by `reset_after_fork`, which
// runs in a freshly forked child where no other thread exists.
unsafe impl Sync for Registry {}

impl Registry {
    fn lock(&self) -> &RwLock<Vec<Arc<Shared>>> {
        // SAFETY: see the Sync impl.
        unsafe { &*self.0.get() }
    }

    /// Replaces the lock (a parent thread may have held it at fork time) and forgets the
    /// parent's runtimes, whose threads do not exist here.
    ///
    /// # Safety
    /// Only in a forked child, before any other thread starts.
    unsafe fn reset_after_fork(&self) {
        let old = std::ptr::replace(self.0.get(), RwLock::new(Vec::new()));
        std::mem::forget(old);
    }
}

static CURRENT: Registry = Registry(UnsafeCell::new(RwLock::new(Vec::new())));
/// How many runtimes are registered (kept beside the lock so a forked child can read it).
static REGISTERED: AtomicUsize = AtomicUsize::new(0);
/// Bumped in a forked child: runtimes of an older generation have no threads any more.
static FORK_GEN: AtomicU64 = AtomicU64::new(0);
/// Set in a forked child whose parent had running coordinators.
static FORKED_WITH_RUNTIMES: AtomicBool = AtomicBool::new(false);

/// The runtime decorated calls go to.
pub(crate) fn current_runtime() -> Result<Arc<Shared>, CoreError> {
    match CURRENT
        .lock()
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .last()
    {
        Some(s) => Ok(s.clone()),
        None if FORKED_WITH_RUNTIMES.load(Ordering::Relaxed) => Err(CoreError::Forked),
        None => Err(CoreError::NotRunning),
    }
}

fn register(shared: &Arc<Shared>) {
    let mut cur = CURRENT.lock().write().unwrap_or_else(|e| e.into_inner());
    cur.push(shared.clone());
    REGISTERED.store(cur.len(), Ordering::Release);
}

fn unregister(shared: &Arc<Shared>) {
    let mut cur = CURRENT.lock().write().unwrap_or_else(|e| e.into_inner());
    cur.retain(|s| !Arc::ptr_eq(s, shared));
    REGISTERED.store(cur.len(), Ordering::Release);
}

/// Called (through `os.register_at_fork`) in a forked child: runtimes started before the
/// fork refuse to run with `CoordinatorForked` instead of waiting on threads that are gone.
#[pyfunction]
pub fn _after_fork_in_child() {
    FORK_GEN.fetch_add(1, Ordering::SeqCst);
    // A task that forked: this thread is no worker here (its runtime's threads are in the
    // parent), so its waits must not hand a place of that runtime to anyone.
    WORKER.with(|w| {
        if let Ok(mut ctx) = w.try_borrow_mut() {
            std::mem::forget(ctx.take()); // its Arc<Shared> belongs to the parent's count
        }
    });
    if REGISTERED.swap(0, Ordering::SeqCst) > 0 {
        FORKED_WITH_RUNTIMES.store(true, Ordering::SeqCst);
    }
    // SAFETY: we are in the child right after fork(); only this thread exists.
    unsafe { CURRENT.reset_after_fork() };
}

impl Shared {
    pub(crate) fn note_internal_error(&self) {
        self.internal_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether this runtime was started before a fork (in this process it has no threads).
    pub(crate) fn forked(&self) -> bool {
        self.fork_gen != FORK_GEN.load(Ordering::Relaxed)
    }
}

/// One token running on a thread: its id (for the wait graph) and its object (borrowed: the
/// thread holds a reference while it runs), for `current_token()`.
#[derive(Clone, Copy)]
struct Running {
    id: u64,
    attempt: u32,
    obj: *mut pyo3::ffi::PyObject,
    /// For a passthrough call: how many tokens the worker stack of this thread held when it
    /// started (it is innermost unless that stack has grown since).
    under: u32,
}

/// A worker thread's stack of running tokens. The worker loop holds it directly, so running a
/// token costs no thread-local lookup (one per token is measurable on the no-op path); waits
/// inside a task reach it through `WORKER`.
type Stack = Rc<RefCell<Vec<Running>>>;

thread_local! {
    /// Tokens run by their caller (passthrough mode) on this thread.
    static OUTSIDE: RefCell<Vec<Running>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with `tok` as this thread's current token (a passthrough call).
/// (It has a stack of its own, apart from a worker's, whose ids belong to the wait graph of
/// the worker's runtime; `current()` tells which top is innermost by its depth stamp.)
pub(crate) fn with_inline_current<R>(tok: &Bound<'_, TaskToken>, f: impl FnOnce() -> R) -> R {
    let worker_depth = WORKER.with(|w| {
        w.borrow()
            .as_ref()
            .map_or(0, |c| c.stack.borrow().len() as u32)
    });
    OUTSIDE.with(|s| {
        s.borrow_mut().push(Running {
            id: tok.get().header.id,
            attempt: tok.get().header.attempt(),
            obj: tok.as_ptr(),
            under: worker_depth,
        })
    });
    let r = f();
    OUTSIDE.with(|s| s.borrow_mut().pop());
    r
}

/// The token whose task runs on this thread (the innermost one), if any, and its attempt.
fn current(py: Python<'_>) -> Option<(Bound<'_, TaskToken>, u32)> {
    let (worker_top, worker_len) = WORKER.with(|w| {
        w.borrow().as_ref().map_or((None, 0), |c| {
            let st = c.stack.borrow();
            (st.last().copied(), st.len() as u32)
        })
    });
    let outside_top = OUTSIDE.with(|s| s.borrow().last().copied());
    let top = match (worker_top, outside_top) {
        (Some(w), Some(o)) => {
            if worker_len > o.under {
                w
            } else {
                o
            }
        }
        (w, o) => w.or(o)?,
    };
    // SAFETY: the pointer is a live TaskToken: the thread that pushed it holds a reference
    // until it pops it, and only this thread reads its own stack.
    let any = unsafe { Bound::from_borrowed_ptr(py, top.obj) };
    any.cast_into::<TaskToken>().ok().map(|t| (t, top.attempt))
}

/// Whether a passthrough call has run longer than its timeout (nothing else can see it: no
/// timer watches calls run in their caller).
fn inline_overdue(t: &TaskToken) -> bool {
    let Some(timeout) = t.op.policy.as_ref().and_then(|p| p.timeout) else {
        return false;
    };
    t.header
        .started_ns()
        .is_some_and(|s| (crate::clock::now_ns().saturating_sub(s) as f64) / 1e9 > timeout)
}

/// The token of the task running on this thread (None outside a task).
#[pyfunction]
pub fn current_token(py: Python<'_>) -> Option<Bound<'_, TaskToken>> {
    current(py).map(|(t, _)| t)
}

/// Raises `TokenCancelled` if the token of the task running on this thread was killed or
/// timed out (or this attempt was abandoned for a new one); does nothing otherwise, or
/// outside a task. Call it between steps of a long task so a kill or timeout can stop it.
#[pyfunction]
pub fn checkpoint(py: Python<'_>) -> PyResult<()> {
    let Some((tok, attempt)) = current(py) else {
        return Ok(());
    };
    let t = tok.get();
    let replaced = "timed out (a new attempt replaces this one)";
    let why = match t.header.state.load() {
        _ if t.header.attempt() != attempt => replaced,
        TokenState::Executing if t.rt.gov.inline && inline_overdue(t) => "timed out",
        TokenState::Executing => return Ok(()),
        TokenState::TimedOut => "timed out",
        TokenState::Waiting | TokenState::Admitted => "timed out (a new attempt replaces this one)",
        _ => "killed",
    };
    Err(CoreError::Cancelled {
        id: t.header.id,
        operation: t.op.operation_type.bind(py).to_string(),
        why,
    }
    .into_pyerr(py))
}

/// What a worker thread knows about itself.
struct WorkerCtx {
    shared: Arc<Shared>,
    core: usize,
    wi: usize,
    /// A unique id of this thread in the wait graph.
    waiter: u64,
    /// Ids of the tokens executing on this thread: the one it took from its mailbox, then any
    /// token it waits for and runs inline.
    stack: Stack,
}

thread_local! {
    static WORKER: RefCell<Option<WorkerCtx>> = const { RefCell::new(None) };
}

static NEXT_WAITER: AtomicU64 = AtomicU64::new(1);

/// Whether this thread is a worker of `shared`.
fn is_worker_of(shared: &Arc<Shared>) -> bool {
    WORKER.with(|w| {
        w.borrow()
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(&c.shared, shared))
    })
}

/// Whether this thread is a worker of any runtime.
pub(crate) fn on_any_worker() -> bool {
    WORKER.with(|w| w.borrow().is_some())
}

/// Whether the calling thread is a worker of any coordinator, i.e. runs inside a task (or a done
/// callback on a worker).
#[pyfunction]
pub fn _on_worker_thread() -> bool {
    on_any_worker()
}

/// A copy of this worker thread's context.
struct Snapshot {
    shared: Arc<Shared>,
    core: usize,
    wi: usize,
    waiter: u64,
    stack: Vec<u64>,
}

fn ids(stack: &Stack) -> Vec<u64> {
    stack.borrow().iter().map(|r| r.id).collect()
}

fn worker_snapshot() -> Option<Snapshot> {
    WORKER.with(|w| {
        w.borrow().as_ref().map(|c| Snapshot {
            shared: c.shared.clone(),
            core: c.core,
            wi: c.wi,
            waiter: c.waiter,
            stack: ids(&c.stack),
        })
    })
}

/// The token stack of this thread if it is a worker of `shared` (empty otherwise).
fn stack_for(shared: &Arc<Shared>) -> Vec<u64> {
    WORKER.with(|w| match w.borrow().as_ref() {
        Some(c) if Arc::ptr_eq(&c.shared, shared) => ids(&c.stack),
        _ => Vec::new(),
    })
}

/// What a task is about to wait for.
pub(crate) enum WaitFor<'a, 'py> {
    Token(&'a Bound<'py, TaskToken>),
    Quiet(&'a Arc<Shared>),
    PoolRoom,
}

/// A worker's place handed to a compensating worker for as long as it waits (see
/// `enter_blocking`); dropping it takes the place back.
pub(crate) struct Blocked {
    shared: Arc<Shared>,
    core: usize,
    wi: usize,
    waiter: u64,
    holds_token: bool,
    /// False if no slot was left for a compensating worker: the core runs short meanwhile.
    pub(crate) compensated: bool,
}

impl Drop for Blocked {
    fn drop(&mut self) {
        self.shared
            .sched
            .unblock(self.core, self.wi, self.holds_token);
        self.shared.waits.leave(self.waiter);
    }
}

fn deadlock_error(
    py: Python<'_>,
    d: Deadlock,
    stack: &[u64],
    what: &Bound<'_, TaskToken>,
) -> CoreError {
    let me = stack.last().copied().unwrap_or(0);
    let op = what.get().op.operation_type.bind(py).to_string();
    CoreError::Deadlock(match d {
        Deadlock::OwnStack { token } if token == me => {
            format!("token {token} ({op}) waits on itself: a task cannot wait on its own token")
        }
        Deadlock::OwnStack { token } => format!(
            "token {me} waits on token {token} ({op}), which runs beneath it on the same \
             worker thread and waits for it: neither can finish"
        ),
        Deadlock::Cycle { token, chain } => {
            let via: Vec<String> = chain.iter().map(u64::to_string).collect();
            format!(
                "token {me} waits on token {token} ({op}), which waits (through token(s) {}) \
                 on token {me} itself: neither can finish",
                via.join(", ")
            )
        }
    })
}

/// Called by a worker thread about to block inside a task: records the wait (refusing one
/// that can never end with `TokenDeadlock`) and hands the worker's place on its core to a
/// compensating worker, started if its slot has no thread yet. `None` off worker threads.
pub(crate) fn enter_blocking(
    py: Python<'_>,
    what: WaitFor<'_, '_>,
    timed: bool,
) -> PyResult<Option<Blocked>> {
    let Some(Snapshot {
        shared,
        core,
        wi,
        waiter,
        stack,
    }) = worker_snapshot()
    else {
        return Ok(None);
    };
    if shared.forked() {
        return Ok(None); // the worker context of a parent's runtime, copied into a child
    }
    let target = match &what {
        WaitFor::Token(t) if Arc::ptr_eq(&t.get().rt, &shared) => Target::Token(t.get().header.id),
        WaitFor::Quiet(rt) if Arc::ptr_eq(rt, &shared) => Target::Quiet,
        _ => Target::Other,
    };
    if let Err(d) = shared.waits.enter(waiter, &stack, target, timed) {
        let WaitFor::Token(t) = what else {
            unreachable!("only token waits can deadlock")
        };
        return Err(deadlock_error(py, d, &stack, t).into_pyerr(py));
    }
    let holds_token = !stack.is_empty();
    let handoff = shared.sched.block(core, wi, holds_token);
    let started = shared.start_compensators(handoff.spawn);
    Ok(Some(Blocked {
        shared: shared.clone(),
        core,
        wi,
        waiter,
        holds_token,
        compensated: handoff.compensated && started,
    }))
}

/// A worker waiting (without a timeout) on `tok` of its own runtime runs it here if it has not
/// started, whatever its weight, instead of blocking on work queued behind it. Returns whether
/// it did and the token is settled now (a failed attempt may have scheduled a retry).
pub(crate) fn try_run_inline(py: Python<'_>, tok: &Bound<'_, TaskToken>) -> bool {
    let Some((shared, core, wi, stack)) = WORKER.with(|w| {
        w.borrow()
            .as_ref()
            .filter(|c| Arc::ptr_eq(&c.shared, &tok.get().rt) && !c.shared.forked())
            .map(|c| (c.shared.clone(), c.core, c.wi, c.stack.clone()))
    }) else {
        return false;
    };
    if !shared.sched.claim_inline(core, wi, tok.as_unbound()) {
        return false;
    }
    shared.inline_runs.fetch_add(1, Ordering::Relaxed);
    wake_threads(run_started(
        py,
        &shared,
        core,
        wi,
        &stack,
        tok.clone().unbind(),
    ));
    tok.get().header.state.load().is_settled()
}

pub(crate) fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

/// Runs one job on worker `(core, wi)`: start, call, store the outcome, finish, run done
/// callbacks. Never unwinds: a Rust panic fails the token with `InternalError`.
///
/// Waiters of a token without callbacks are not woken here: the returned threads are woken by
/// the caller, after it released the GIL if it has nothing else to run, so the woken waiter
/// finds the GIL free instead of sleeping a second time for it.
fn run_job(
    py: Python<'_>,
    shared: &Arc<Shared>,
    core: usize,
    wi: usize,
    stack: &Stack,
    job: Py<TaskToken>,
) -> Vec<Thread> {
    if !shared.sched.start(core, wi, &job.get().header) {
        return Vec::new(); // killed while queued, or run inline by its waiter
    }
    run_started(py, shared, core, wi, stack, job)
}

/// The part of `run_job` after the token became EXECUTING on `(core, wi)`.
fn run_started(
    py: Python<'_>,
    shared: &Arc<Shared>,
    core: usize,
    wi: usize,
    stack: &Stack,
    job: Py<TaskToken>,
) -> Vec<Thread> {
    let tok = job.get();
    let attempt = tok.header.attempt();
    let guard = shared.guard.as_ref().map(|gh| (gh, gh.on_start(py, tok)));
    stack.borrow_mut().push(Running {
        id: tok.header.id,
        attempt,
        obj: job.as_ptr(),
        under: 0,
    });
    crate::observe::started(tok, crate::guard::queued_since(&tok.header, attempt));
    let res = catch_unwind(AssertUnwindSafe(|| {
        if tok.wants_panic() {
            panic!("test hook: panic while running token {}", tok.header.id);
        }
        let call = if tok.op.policy.as_ref().is_some_and(|p| p.retries > 0) {
            tok.clone_call(py) // kept for the next attempt
        } else {
            tok.take_call()
        };
        let Some(call) = call else {
            return Err(internal_error_value(
                py,
                format!("token {} has no call to run", tok.header.id),
            ));
        };
        let r = crate::observe::call_attempt(py, job.bind(py), &call);
        drop(call);
        r.map(Bound::unbind).map_err(|e| e.into_value(py))
    }));
    stack.borrow_mut().pop();
    if shared.forked() {
        // The task called os.fork() and returned (or raised) in the child, into a worker loop
        // whose runtime lives in the parent: nothing else may run here.
        exit_forked_child(py, matches!(res, Ok(Ok(_))));
    }
    let outcome = res.unwrap_or_else(|p| {
        shared.internal_errors.fetch_add(1, Ordering::Relaxed);
        Err(internal_error_value(
            py,
            format!(
                "internal error in the tokengate core while running token {}: {}",
                tok.header.id,
                panic_message(&p)
            ),
        ))
    });
    if let Some((gh, started)) = guard {
        gh.on_end(
            py,
            started,
            core,
            wi,
            job.bind(py),
            attempt,
            &outcome,
            false,
        );
    }
    let outcome = if tok.op.policy.is_some() {
        match governor::end_attempt(py, shared, core, wi, job.bind(py), attempt, outcome) {
            EndOfAttempt::Store(o) => o,
            EndOfAttempt::Retried => {
                shared.sched.release(core, wi);
                return Vec::new();
            }
            EndOfAttempt::Stale => {
                shared.sched.release(core, wi);
                return Vec::new();
            }
            EndOfAttempt::Discarded => {
                if tok.header.state.load().is_settled() {
                    drop(tok.take_call()); // kept for a retry that will not come
                }
                governor::release_permits(py, job.bind(py));
                shared.sched.release(core, wi);
                return Vec::new();
            }
        }
    } else {
        outcome
    };
    let ok = outcome.is_ok();
    tok.set_outcome(outcome);
    let finished = shared.sched.finish(core, wi, &tok.header, ok);
    if tok.header.state.raw() & FLAG_PERMITS != 0 {
        governor::release_permits(py, job.bind(py));
    }
    if let Some(pol) = tok.op.policy.as_ref() {
        if pol.retries > 0 {
            drop(tok.take_call()); // kept for retries: none will come now
        }
        if finished.is_some() && !ok {
            governor::after_failure(py, job.bind(py));
        }
    }
    // (Not finished here: it was killed while it ran, and whoever killed it settled it.)
    let (waiters, callbacks) = if finished.is_some() {
        tok.settle_listeners(py)
    } else {
        tok.take_listeners()
    };
    let deferred = if callbacks.is_empty() {
        waiters
    } else {
        wake_threads(waiters); // a slow callback must not delay the waiters
                               // Callbacks on a worker thread log whatever they raise.
        let _ = TaskToken::call_callbacks(job.bind(py), callbacks);
        Vec::new()
    };
    shared.sched.release(core, wi);
    deferred
}

/// Ends a forked child whose only thread came back from a task into the worker loop.
fn exit_forked_child(py: Python<'_>, ok: bool) -> ! {
    let code = if ok { 0 } else { 1 };
    let _ =
        (|| -> PyResult<()> {
            py.import("logging")?
            .call_method1("getLogger", ("tokengate",))?
            .call_method1(
                "warning",
                ("a task called os.fork() and returned in the child process; the child exits \
                  now (status %d) instead of running the parent's queued tokens: end the \
                  child with os._exit() or use multiprocessing",
                 code),
            )?;
            let sys = py.import("sys")?;
            for name in ["stdout", "stderr"] {
                if let Ok(f) = sys.getattr(name) {
                    let _ = f.call_method0("flush");
                }
            }
            py.import("os")?.call_method1("_exit", (code,))?;
            Ok(())
        })();
    std::process::exit(code)
}

/// One wait-then-run round of a worker; false once the worker should exit.
fn worker_round(
    shared: &Arc<Shared>,
    core: usize,
    wi: usize,
    stack: &Stack,
    parker: &crossbeam_utils::sync::Parker,
) -> bool {
    let Some(job) = shared.sched.wait_for_work(core, wi, parker) else {
        return false;
    };
    let mut first = Some(job);
    let mut deferred = Vec::new();
    // Attach once and run jobs while there are any; detach only to wait.
    let attached = Python::try_attach(|py| {
        let mut job = first.take().expect("job present");
        loop {
            let wake = run_job(py, shared, core, wi, stack, job);
            match shared.sched.next_job(core, wi) {
                Some(j) => {
                    wake_threads(wake);
                    job = j;
                }
                None => {
                    deferred = wake;
                    break;
                }
            }
        }
    });
    wake_threads(deferred); // the GIL is released now
    if attached.is_none() {
        // The interpreter is finalizing: nothing can run or be released any more.
        std::mem::forget(first);
        return false;
    }
    true
}

fn worker_main(shared: Arc<Shared>, core: usize, wi: usize) {
    let Some(parker) = shared.sched.take_parker(core, wi) else {
        return;
    };
    if shared.pin {
        let cpu = shared.cpu_map[core];
        if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
            shared.pin_failures.fetch_add(1, Ordering::Relaxed);
        }
    }
    if let Some(clock) = crate::monitor::this_thread_clock() {
        shared.sched.set_thread_clock(core, wi, clock);
    }
    let sh = shared.clone();
    let run = move || {
        // Built on this thread (the stack is not Send): the context waits inside tasks use.
        let stack: Stack = Rc::new(RefCell::new(Vec::new()));
        WORKER.with(|w| {
            *w.borrow_mut() = Some(WorkerCtx {
                shared: sh.clone(),
                core,
                wi,
                waiter: NEXT_WAITER.fetch_add(1, Ordering::Relaxed),
                stack: stack.clone(),
            })
        });
        // A panic outside a token (a bug in the scheduler itself) must not kill the worker
        // and strand the tokens in its mailbox: it is counted and the loop goes on.
        loop {
            match catch_unwind(AssertUnwindSafe(|| {
                worker_round(&sh, core, wi, &stack, &parker)
            })) {
                Ok(true) => {}
                Ok(false) => break,
                Err(_) => {
                    sh.internal_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    };
    // Create this thread's Python thread state once and keep it while the worker lives: every
    // later attach only takes the GIL. Creating and deleting a thread state per burst of work
    // costs time and widens the window in which os.fork() in another thread can catch the
    // interpreter's thread-state lock held (CPython gh-112275: the child then hangs).
    Python::try_attach(|py| py.detach(run));
    WORKER.with(|w| w.borrow_mut().take());
}

impl Shared {
    /// Starts one thread per slot, in order; on the first failure the slots not started are
    /// returned (still claimed) with the error. Each thread is running (and named) when this
    /// returns: it says so before it does anything else, so `spawned_workers` never counts a
    /// thread that does not exist yet.
    pub(crate) fn spawn_workers(
        self: &Arc<Self>,
        slots: Vec<(usize, usize)>,
    ) -> Result<(), (CoreError, Vec<(usize, usize)>)> {
        let mut threads = lock(&self.threads);
        for (i, &(core, wi)) in slots.iter().enumerate() {
            let me = self.clone();
            let (running, started) = std::sync::mpsc::sync_channel::<()>(1);
            let handle = std::thread::Builder::new()
                .name(format!("tokengate-c{}-w{}", core + 1, wi))
                .stack_size(self.stack_size)
                .spawn(move || {
                    let _ = running.send(());
                    worker_main(me, core, wi)
                });
            match handle {
                Ok(h) => {
                    // Needs no GIL on the other side: the thread sends before it attaches.
                    let _ = started.recv();
                    threads.push((h.thread().id(), h))
                }
                Err(e) => {
                    self.spawn_failures.fetch_add(1, Ordering::Relaxed);
                    return Err((
                        CoreError::Internal(format!("could not start a worker thread: {e}")),
                        slots[i..].to_vec(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Starts the threads of compensating workers. A slot whose thread fails to start is given
    /// back (the next block tries it again) and the core runs short meanwhile; `stats()`
    /// counts it (`spawn_failures`, `uncompensated`). Returns whether every thread started.
    fn start_compensators(self: &Arc<Self>, slots: Vec<(usize, usize)>) -> bool {
        let mut all = true;
        for (core, wi) in slots {
            if self.sched.is_shutdown() || self.forked() {
                self.sched.unclaim_spawn(core, wi);
            } else if self.spawn_workers(vec![(core, wi)]).is_err() {
                self.sched.spawn_failed(core, wi);
                all = false;
            }
        }
        all
    }
}

/// Submits a call of `op` on `shared` and returns its token (the shared path of decorated
/// calls and `Runtime.submit`).
///
/// `origin` is what a quarantined call is replayed through (the guarded function).
pub(crate) fn submit_token<'py>(
    py: Python<'py>,
    shared: &Arc<Shared>,
    op: &Arc<OpSpec>,
    args: Py<PyTuple>,
    kwargs: Option<Py<PyDict>>,
    origin: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, TaskToken>> {
    if shared.forked() {
        return Err(CoreError::Forked.into_pyerr(py));
    }
    shared.check_submit(py, op, args.bind(py), kwargs.as_ref().map(|k| k.bind(py)))?;
    let now = crate::clock::now_ns();
    // The gate comes first: a blocked operation queues nothing.
    let gate = match shared.guard.as_ref() {
        Some(gh) => match gh.gate(
            py,
            op,
            args.bind(py),
            kwargs.as_ref().map(|k| k.bind(py)),
            now,
        ) {
            Ok(g) => Some(g),
            Err(e) => {
                crate::observe::blocked(py, &shared.events, op, &e);
                return Err(e);
            }
        },
        None => None,
    };
    let call = Call::new(py, op, args, kwargs)?;
    let bytes = if shared.sched.config().memory_budget.is_some() {
        estimate_bytes(py, &call)
    } else {
        0
    };
    let id = shared.sched.next_id();
    let tok = Bound::new(
        py,
        TaskToken::new_at(id, op.clone(), shared.clone(), call, now),
    )?;
    if shared.events.wants(crate::observe::CREATED) {
        crate::observe::emit(
            &shared.events,
            crate::observe::CREATED,
            tok.get(),
            None,
            None,
        );
    }
    let r = submit_created(py, shared, op, &tok, gate, bytes, origin);
    if let Err(e) = &r {
        crate::observe::refused(py, &tok, e);
    }
    r.map(|()| tok)
}

/// The rest of `submit_token` once the token exists.
fn submit_created<'py>(
    py: Python<'py>,
    shared: &Arc<Shared>,
    op: &Arc<OpSpec>,
    tok: &Bound<'py, TaskToken>,
    gate: Option<crate::guard::Gate>,
    bytes: u64,
    origin: Option<&Bound<'py, PyAny>>,
) -> PyResult<()> {
    if let Some(gate) = gate {
        let h = &tok.get().header;
        match (&gate.prediction, gate.size) {
            (Some(p), Some(size)) => h.set_prediction(size, p.predicted_ns),
            (None, Some(size)) => h.set_size_feature(size),
            _ => {}
        }
        if gate.spike {
            if let (Some(gh), Some(origin)) = (shared.guard.as_ref(), origin) {
                return gh.quarantine(py, tok, origin, &gate);
            }
        }
        if let Some(ticket) = gate.probe {
            tok.get().with_gov(|g| g.probe = Some(ticket));
            let r = enqueue(py, shared, tok, bytes);
            if r.is_err() {
                if let Some(t) = tok.get().with_gov_if(|g| g.probe.take()).flatten() {
                    if let Some(gh) = shared.guard.as_ref() {
                        gh.release_probe(py, op, t);
                    }
                }
            }
            return r;
        }
    }
    enqueue(py, shared, tok, bytes)
}

/// Puts a new token in the pool (or on the governed path), waiting for room as configured;
/// `bytes` is the estimate of its arguments (counted against the memory budget from 1 KiB).
fn enqueue<'py>(
    py: Python<'py>,
    shared: &Arc<Shared>,
    tok: &Bound<'py, TaskToken>,
    bytes: u64,
) -> PyResult<()> {
    let op = &tok.get().op;
    let mut room = RoomWait::default();
    if bytes >= BUDGET_MIN_BYTES {
        room.reserve_bytes(py, shared, tok.get(), bytes)?;
    }
    if op.governed() || shared.gov.limits_set() || shared.gov.inline {
        let r = submit_governed(py, shared, tok, room);
        if r.is_err() {
            shared.sched.release_bytes(tok.get().header.take_bytes());
        }
        return r;
    }
    let mut job = tok.clone().unbind();
    loop {
        match shared.sched.try_submit(job) {
            Ok(()) => return Ok(()),
            Err(Rejected { reason, job: back }) => {
                job = back;
                if let Err(e) = room.wait(py, shared, reason) {
                    shared.sched.release_bytes(tok.get().header.take_bytes());
                    return Err(e);
                }
            }
        }
    }
}

/// Calls whose arguments are estimated below this are bounded by `pool_capacity` alone (not
/// counted against the memory budget, so most calls pay nothing for it).
const BUDGET_MIN_BYTES: u64 = 1024;

/// A cheap estimate of the memory a call's arguments hold: the length of bytes, bytearray,
/// str and memoryview arguments, 8 bytes a slot for lists, tuples, sets and dicts, a flat 64
/// for anything else (one level deep: it is a guard, not an accountant).
fn estimate_bytes(py: Python<'_>, call: &Call) -> u64 {
    use pyo3::types::{PyByteArray, PyBytes, PyFrozenSet, PyMemoryView, PySet};
    fn one(v: &Bound<'_, PyAny>) -> u64 {
        if let Ok(b) = v.cast::<PyBytes>() {
            b.as_bytes().len() as u64
        } else if let Ok(s) = v.cast::<PyString>() {
            s.len().unwrap_or(0) as u64
        } else if let Ok(b) = v.cast::<PyByteArray>() {
            b.len() as u64
        } else if v.is_instance_of::<PyMemoryView>() {
            v.getattr("nbytes")
                .and_then(|n| n.extract::<u64>())
                .unwrap_or(64)
        } else if let Ok(l) = v.cast::<PyList>() {
            56 + 8 * l.len() as u64
        } else if let Ok(t) = v.cast::<PyTuple>() {
            40 + 8 * t.len() as u64
        } else if let Ok(d) = v.cast::<PyDict>() {
            64 + 24 * d.len() as u64
        } else if let Ok(s) = v.cast::<PySet>() {
            200 + 16 * s.len() as u64
        } else if let Ok(s) = v.cast::<PyFrozenSet>() {
            200 + 16 * s.len() as u64
        } else {
            64
        }
    }
    let args = call.args.bind(py);
    if args.is_empty() && call.kwargs.is_none() {
        return 0;
    }
    let mut n: u64 = args.iter().map(|a| one(&a)).sum();
    if let Some(kw) = &call.kwargs {
        n += kw.bind(py).values().iter().map(|v| one(&v)).sum::<u64>();
    }
    n
}

/// The governed path of a new token (policy, storage tier, a limit, passthrough mode).
fn submit_governed(
    py: Python<'_>,
    shared: &Arc<Shared>,
    tok: &Bound<'_, TaskToken>,
    mut room: RoomWait,
) -> PyResult<()> {
    if shared.gov.inline {
        if shared.sched.is_closed() {
            return Err(CoreError::AdmissionClosed.into_pyerr(py));
        }
        governor::run_inline(py, shared, tok, false);
        return Ok(());
    }
    let job = tok.clone().unbind();
    loop {
        match shared.sched.hold_new(&job) {
            Ok(true) => break,
            Ok(false) => return Ok(()), // killed before it was accepted: final already
            Err(reason) => room.wait(py, shared, reason)?,
        }
    }
    governor::submit_governed(py, shared, tok);
    Ok(())
}

/// A submission refused for `reason`: raises `AdmissionClosed` or, at the pool bound,
/// `PoolFull` (with `overflow='reject'`, or once `submit_timeout` passed), else waits for
/// room (GIL released; inside a task the worker's place goes to a compensating worker).
#[derive(Default)]
struct RoomWait {
    deadline: Option<Option<Instant>>,
    blocked: Option<Blocked>,
    /// Bytes waited for under the memory budget.
    bytes: u64,
}

impl RoomWait {
    /// Counts a large call's arguments against the memory budget, waiting for room (or
    /// failing) as at the pool bound.
    fn reserve_bytes(
        &mut self,
        py: Python<'_>,
        shared: &Arc<Shared>,
        tok: &TaskToken,
        n: u64,
    ) -> PyResult<()> {
        self.bytes = n;
        while !shared.sched.reserve_bytes(n) {
            self.wait(py, shared, RejectReason::Budget)?;
        }
        tok.header.set_bytes(n);
        Ok(())
    }

    fn wait(&mut self, py: Python<'_>, shared: &Arc<Shared>, reason: RejectReason) -> PyResult<()> {
        let budget = reason == RejectReason::Budget;
        match reason {
            RejectReason::Closed => Err(CoreError::AdmissionClosed.into_pyerr(py)),
            RejectReason::PoolFull | RejectReason::Budget => {
                let cap = shared.sched.config().pool_capacity;
                let full = |waited| {
                    if budget {
                        CoreError::MemoryBudget {
                            budget: shared.sched.config().memory_budget.unwrap_or(0),
                            queued: shared.sched.queued_bytes(),
                            bytes: self.bytes,
                            waited,
                        }
                    } else {
                        CoreError::PoolFull {
                            capacity: cap,
                            waited,
                        }
                    }
                };
                if shared.sched.config().overflow == Overflow::Reject {
                    return Err(full(None).into_pyerr(py));
                }
                let deadline = *self
                    .deadline
                    .get_or_insert_with(|| deadline_in(shared.submit_timeout));
                if self.blocked.is_none() {
                    // A task waiting for room gives its worker's place to a compensating
                    // worker, which makes the room by running queued tokens.
                    self.blocked = enter_blocking(py, WaitFor::PoolRoom, deadline.is_some())?;
                }
                let chunk = deadline.map_or(Duration::from_millis(50), |d| {
                    d.saturating_duration_since(Instant::now())
                        .min(Duration::from_millis(50))
                });
                if budget {
                    let n = self.bytes;
                    py.detach(|| shared.sched.wait_budget(n, chunk));
                } else {
                    py.detach(|| shared.sched.wait_pool_room(chunk));
                }
                py.check_signals()?;
                if let Some(d) = deadline {
                    if Instant::now() >= d {
                        return Err(full(shared.submit_timeout).into_pyerr(py));
                    }
                }
                Ok(())
            }
        }
    }
}

pub(crate) fn parse_weight(s: &str) -> Result<Weight, CoreError> {
    match s.to_ascii_lowercase().as_str() {
        "heavy" => Ok(Weight::Heavy),
        "medium" => Ok(Weight::Medium),
        "light" => Ok(Weight::Light),
        _ => Err(CoreError::Config(format!(
            "weight must be one of 'light', 'medium', 'heavy' (any case), got {s:?}"
        ))),
    }
}

pub(crate) fn parse_priority(s: &str) -> Result<Priority, CoreError> {
    match s.to_ascii_lowercase().as_str() {
        "high" => Ok(Priority::High),
        "normal" => Ok(Priority::Normal),
        "low" => Ok(Priority::Low),
        _ => Err(CoreError::Config(format!(
            "priority must be one of 'high', 'normal', 'low', got {s:?}"
        ))),
    }
}

/// The native runtime behind an `OperationsCoordinator`: scheduler, worker threads, gate.
#[pyclass(frozen, module = "tokengate._core", name = "Runtime")]
pub struct Runtime {
    shared: Arc<Shared>,
}

impl Runtime {
    /// The Guard House, or the error saying it is off.
    fn guard(&self) -> PyResult<&crate::guard::GuardHouse> {
        self.shared.guard.as_ref().ok_or_else(|| {
            CoreError::Config(
                "the Guard House is off for this coordinator (guard_house=False)".into(),
            )
            .into()
        })
    }
}

fn allowed_cpus() -> Vec<usize> {
    let mut ids: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    ids.sort_unstable();
    if ids.is_empty() {
        ids.push(0);
    }
    ids
}

/// `value` as an int in `lo..=hi`, `None` if it is an int outside it (however large); a
/// non-int raises the usual TypeError.
fn int_in(value: &Bound<'_, PyAny>, lo: usize, hi: usize) -> PyResult<Option<usize>> {
    let v: i128 = match value.extract::<i128>() {
        Ok(v) => v,
        Err(e) if e.is_instance_of::<pyo3::exceptions::PyOverflowError>(value.py()) => {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    Ok((v >= lo as i128 && v <= hi as i128).then_some(v as usize))
}

impl Runtime {
    /// `stats()["growth"]`: what the growth monitor did.
    fn growth_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let g = &self.shared.growth;
        let d = PyDict::new(py);
        d.set_item("enabled", self.shared.grow_on_demand)?;
        d.set_item("running", g.running.load(Ordering::Acquire))?;
        d.set_item("busy_for_s", crate::monitor::BUSY_FOR.as_secs_f64())?;
        d.set_item("ticks", g.ticks.load(Ordering::Relaxed))?;
        d.set_item("pressure", g.pressure.load(Ordering::Relaxed))?;
        d.set_item("cpu_bound", g.cpu_bound.load(Ordering::Relaxed))?;
        d.set_item("gil_busy", g.gil_busy.load(Ordering::Relaxed))?;
        d.set_item("gil_waiters", g.gil_waiters.load(Ordering::Relaxed))?;
        d.set_item("grown", g.grown.load(Ordering::Relaxed))?;
        d.set_item("workers_added", g.workers_added.load(Ordering::Relaxed))?;
        Ok(d)
    }

    /// 0-based index of 1-based `core`, or a `ConfigurationError` naming the valid range.
    fn core_index(&self, core: &Bound<'_, PyAny>) -> PyResult<usize> {
        let n = self.shared.sched.cores();
        match int_in(core, 1, n)? {
            Some(c) => Ok(c - 1),
            None => {
                Err(CoreError::Config(format!("core must be between 1 and {n}, got {core}")).into())
            }
        }
    }
}

impl Runtime {
    /// Calls `f` on every queued token (the pool, the mailboxes, then limiters, storage tiers
    /// and retry timers) until it returns false.
    fn visit_queued(&self, mut f: impl FnMut(&Py<TaskToken>) -> bool) -> bool {
        self.shared.sched.visit_queued(&mut f) && self.shared.gov.visit_waiting(f)
    }
}

#[pymethods]
impl Runtime {
    #[new]
    #[pyo3(signature = (*, cores=None, workers_per_core=4, max_workers_per_core=None,
        mailbox_capacity=120, pool_capacity=100_000, overflow="block", submit_timeout=None,
        pin_workers=true, first_token_id=1, worker_stack_size=None, decorated_calls=true,
        mode="threads", storage_limits=None, memory_budget=None, grow_on_demand=true,
        guard_house=true, history_size=10_000, guard_hook=None, event_capacity=65_536))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        cores: Option<usize>,
        workers_per_core: usize,
        max_workers_per_core: Option<usize>,
        mailbox_capacity: usize,
        pool_capacity: usize,
        overflow: &str,
        submit_timeout: Option<f64>,
        pin_workers: bool,
        first_token_id: u64,
        worker_stack_size: Option<usize>,
        decorated_calls: bool,
        mode: &str,
        storage_limits: Option<[usize; 4]>,
        memory_budget: Option<u64>,
        grow_on_demand: bool,
        guard_house: bool,
        history_size: usize,
        guard_hook: Option<Py<PyAny>>,
        event_capacity: usize,
    ) -> PyResult<Self> {
        if !(1..=1 << 24).contains(&event_capacity) {
            return Err(CoreError::Config(format!(
                "event_capacity must be between 1 and {}, got {event_capacity}",
                1 << 24
            ))
            .into());
        }
        let inline = match mode {
            "threads" => false,
            "inline" => true,
            _ => {
                return Err(CoreError::Config(format!(
                    "mode must be 'threads' or 'inline', got {mode:?}"
                ))
                .into())
            }
        };
        let tier_limits = storage_limits.unwrap_or(TIERS.map(|(_, n)| n));
        if let Some(bad) = tier_limits.iter().position(|&n| n == 0) {
            return Err(CoreError::Config(format!(
                "storage limit of {} must be at least 1, got 0",
                TIERS[bad].0
            ))
            .into());
        }
        let cpus = allowed_cpus();
        let n = cores.unwrap_or(cpus.len());
        let overflow = match overflow.to_ascii_lowercase().as_str() {
            "block" => Overflow::Block,
            "reject" => Overflow::Reject,
            _ => {
                return Err(CoreError::Config(format!(
                    "overflow must be 'block' or 'reject', got {overflow:?}"
                ))
                .into())
            }
        };
        if let Some(t) = submit_timeout {
            if t.is_nan() || t < 0.0 {
                return Err(CoreError::Config(format!(
                    "submit_timeout must be a number of seconds >= 0 or None, got {t}"
                ))
                .into());
            }
        }
        let stack_size = worker_stack_size.unwrap_or(DEFAULT_STACK);
        if !(MIN_STACK..=MAX_STACK).contains(&stack_size) {
            return Err(CoreError::Config(format!(
                "worker_stack_size must be between {MIN_STACK} and {MAX_STACK} bytes, \
                 got {stack_size}"
            ))
            .into());
        }
        let cfg = Config {
            cores: n,
            workers_per_core,
            max_workers_per_core: max_workers_per_core.unwrap_or(workers_per_core.max(64)),
            mailbox_capacity,
            pool_capacity,
            overflow,
            first_id: first_token_id,
            memory_budget,
        };
        let sched = Scheduler::new(cfg).map_err(CoreError::Config)?;
        let cpu_map = (0..n).map(|i| cpus[i % cpus.len()]).collect();
        Ok(Runtime {
            shared: Arc::new(Shared {
                sched,
                waits: WaitGraph::new(),
                gov: Governor::new(inline, tier_limits),
                guard: guard_house
                    .then(|| crate::guard::GuardHouse::new(history_size, n, guard_hook)),
                cpu_map,
                pin: pin_workers && cfg!(any(target_os = "linux", target_os = "android")),
                pin_failures: AtomicUsize::new(0),
                internal_errors: AtomicUsize::new(0),
                spawn_failures: AtomicUsize::new(0),
                inline_runs: AtomicU64::new(0),
                submit_timeout,
                stack_size,
                decorated_calls,
                threads: Mutex::new(Vec::new()),
                started: AtomicBool::new(false),
                fork_gen: FORK_GEN.load(Ordering::SeqCst),
                grow_on_demand,
                growth: Default::default(),
                events: crate::events::EventRing::new(event_capacity),
                attempt_hook: Mutex::new(None),
                has_attempt_hook: AtomicBool::new(false),
                submit_check: Mutex::new(None),
                has_submit_check: AtomicBool::new(false),
            }),
        })
    }

    /// Starts the worker threads and makes this runtime the target of decorated calls (unless
    /// created with `decorated_calls=False`).
    fn start(&self, py: Python<'_>) -> PyResult<()> {
        if self.shared.started.swap(true, Ordering::AcqRel) {
            return Err(CoreError::Config(
                "this runtime was already started; \
                create a new OperationsCoordinator to start again"
                    .into(),
            )
            .into());
        }
        let s = &self.shared;
        let mut slots = Vec::new();
        for core in 0..s.sched.cores() {
            for wi in 0..s.sched.active(core) {
                if s.sched.claim_spawn(core, wi) {
                    slots.push((core, wi));
                }
            }
        }
        s.gov.bind(s);
        if s.gov.inline {
            // Passthrough mode runs every call in its caller: no worker threads at all.
            for (core, wi) in slots.drain(..) {
                s.sched.unclaim_spawn(core, wi);
            }
        }
        if let Err((e, _)) = s.spawn_workers(slots) {
            // Don't leave the workers that did start behind.
            s.sched.close();
            s.sched.shutdown();
            let started: Vec<_> = std::mem::take(&mut *lock(&s.threads));
            py.detach(|| {
                for (_, h) in started {
                    let _ = h.join();
                }
            });
            return Err(e.into_pyerr(py));
        }
        if self.shared.grow_on_demand && !s.gov.inline && !crate::monitor::start(&self.shared) {
            // No monitor thread: the runtime runs without on-demand growth (stats() shows it).
            self.shared.spawn_failures.fetch_add(1, Ordering::Relaxed);
        }
        if self.shared.decorated_calls {
            register(&self.shared);
        }
        Ok(())
    }

    /// Submits `func(*args, **kwargs)` as a token.
    #[pyo3(signature = (func, args, kwargs=None, *, operation_type=None, weight="medium", priority="normal"))]
    #[allow(clippy::too_many_arguments)]
    fn submit<'py>(
        &self,
        py: Python<'py>,
        func: Bound<'py, PyAny>,
        args: Bound<'py, PyTuple>,
        kwargs: Option<Bound<'py, PyDict>>,
        operation_type: Option<Bound<'py, PyString>>,
        weight: &str,
        priority: &str,
    ) -> PyResult<Bound<'py, TaskToken>> {
        if !func.is_callable() {
            return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                "submit() needs a callable, got {}",
                func.get_type().name()?
            )));
        }
        let operation_type = match operation_type {
            Some(o) => o,
            None => func
                .getattr("__qualname__")
                .or_else(|_| func.getattr("__name__"))
                .and_then(|n| Ok(n.cast_into::<PyString>()?))
                .unwrap_or_else(|_| PyString::new(py, "callable")),
        };
        let operation_type = operation_type.unbind();
        let labels = crate::token::OpLabels::new(py, &operation_type, None);
        let op = Arc::new(OpSpec {
            func: func.unbind(),
            operation_type,
            weight: parse_weight(weight)?,
            priority: parse_priority(priority)?,
            storage_speed: None,
            tags: None,
            policy: None,
            complexity: None,
            guard: None,
            spike_check: false,
            copy_context: true,
            labels,
        });
        no_panic(py, || {
            submit_token(
                py,
                &self.shared,
                &op,
                args.unbind(),
                kwargs.map(Bound::unbind),
                None,
            )
        })
    }

    /// New tokens wait in the pool; admitted ones still run.
    fn pause(&self) {
        self.shared.sched.pause();
    }

    fn unpause(&self) {
        self.shared.sched.unpause();
    }

    /// Refuses new submissions with `AdmissionClosed`.
    fn close(&self) {
        self.shared.sched.close();
    }

    fn open(&self) {
        self.shared.gov.killing.store(false, Ordering::Release);
        self.shared.sched.open();
    }

    /// Waits (GIL released) until every accepted token is final; False on timeout. Called
    /// from inside a task, the tokens that cannot finish before it returns are not waited
    /// for: those running on the calling thread, those of tasks waiting on them (directly or
    /// through others), and those of other tasks that wait for quiescence too.
    #[pyo3(signature = (timeout=None))]
    fn wait_quiet(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        if self.shared.forked() {
            return Err(CoreError::Forked.into_pyerr(py));
        }
        no_panic(py, || {
            let deadline = deadline_in(timeout.map(|t| t.max(0.0)));
            let stack = stack_for(&self.shared);
            let in_task = on_any_worker();
            let quiet = |s: &Shared| {
                s.waits
                    .with_excluded(&stack, |n| (s.sched.in_flight() <= n, n))
            };
            if quiet(&self.shared).0 {
                return Ok(true);
            }
            let _blocked = if in_task {
                enter_blocking(py, WaitFor::Quiet(&self.shared), deadline.is_some())?
            } else {
                None
            };
            loop {
                let (reached, limit) = quiet(&self.shared);
                if reached {
                    return Ok(true);
                }
                // Inside a task, what is excluded can change without a token finishing.
                let slice = if in_task {
                    Duration::from_millis(2)
                } else {
                    Duration::from_millis(50)
                };
                let chunk = deadline.map_or(slice, |d| {
                    d.saturating_duration_since(Instant::now()).min(slice)
                });
                py.detach(|| self.shared.sched.wait_quiet(limit, chunk));
                py.check_signals()?;
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Ok(quiet(&self.shared).0);
                }
            }
        })
    }

    /// Accepted tokens that are not final yet.
    fn in_flight(&self) -> u64 {
        self.shared.sched.in_flight()
    }

    /// Kills every token that has not started (pool and mailboxes); returns how many. Their
    /// done callbacks run here; a `KeyboardInterrupt` raised in one is re-raised after all ran.
    fn kill_pending(&self, py: Python<'_>) -> PyResult<usize> {
        if self.shared.forked() {
            return Ok(0);
        }
        self.shared.gov.killing.store(true, Ordering::Release);
        no_panic(py, || {
            let mut pending = self.shared.sched.take_pending();
            // Tokens waiting outside the pool: held by a limiter, or for a retry's delay.
            pending.extend(self.shared.gov.take_held());
            pending.extend(self.shared.gov.delayed(py));
            let mut killed = Vec::new();
            for job in pending {
                let tok = job.get();
                if self.shared.sched.kill(&tok.header).is_ok() {
                    drop(tok.take_call());
                    governor::settled(py, job.bind(py));
                    let (threads, callbacks) = tok.settle_listeners(py);
                    wake_threads(threads);
                    killed.push((job, callbacks));
                }
            }
            // Every waiter is released before any callback runs.
            let mut interrupt = None;
            let n = killed.len();
            for (job, callbacks) in killed {
                if let Err(e) = TaskToken::call_callbacks(job.bind(py), callbacks) {
                    interrupt.get_or_insert(e);
                }
            }
            interrupt.map_or(Ok(n), Err)
        })
    }

    /// Stops the workers once they find no work and joins those that exit within `timeout`
    /// (GIL released). Returns False while some are still running; they are kept, and a later
    /// call joins them. Called from one of its own workers (`stop()` inside a task) it only
    /// tells the workers to stop and returns True: they exit by themselves once idle, and a
    /// task waiting on the caller could never let them. Decorated calls stop coming here.
    #[pyo3(signature = (timeout=None))]
    fn shutdown(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        if self.shared.forked() {
            return Ok(true); // its threads were in the parent; nothing to stop here
        }
        unregister(&self.shared);
        self.shared.sched.shutdown();
        let on_worker = is_worker_of(&self.shared);
        for job in self.shared.gov.stop(py, !on_worker) {
            // Only what raced in after the last kill_pending() is left: it can never run now.
            governor::kill_stranded(py, &self.shared, job.bind(py));
        }
        if on_worker {
            return Ok(true);
        }
        let deadline = deadline_in(timeout.map(|t| t.max(0.0)));
        let mut remaining: Vec<_> = std::mem::take(&mut *lock(&self.shared.threads));
        let result = loop {
            let mut i = 0;
            while i < remaining.len() {
                if remaining[i].1.is_finished() {
                    let (_, h) = remaining.swap_remove(i);
                    let _ = h.join();
                } else {
                    i += 1;
                }
            }
            if remaining.is_empty() {
                break Ok(true);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break Ok(false);
            }
            py.detach(|| std::thread::sleep(Duration::from_millis(1)));
            if let Err(e) = py.check_signals() {
                break Err(e);
            }
        };
        // Threads not joined yet (and any started meanwhile) stay for the next call.
        lock(&self.shared.threads).extend(remaining);
        result
    }

    /// Sets how many workers of 1-based `core` receive new work, starting their threads
    /// first. If a thread cannot be started, nothing changes (the threads that did start stay
    /// idle until asked for again) and `InternalError` is raised.
    fn set_active_workers(
        &self,
        py: Python<'_>,
        core: &Bound<'_, PyAny>,
        n: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let core = self.core_index(core)?;
        let max = self.shared.sched.config().max_workers_per_core;
        let n = int_in(n, 1, max)?.ok_or_else(|| {
            CoreError::Config(format!(
                "active workers must be between 1 and {max} (max_workers_per_core), got {n}"
            ))
        })?;
        let sched = &self.shared.sched;
        if sched.is_shutdown() {
            return Err(CoreError::NotRunning.into_pyerr(py));
        }
        if self.shared.started.load(Ordering::Acquire) && !self.shared.gov.inline {
            let slots = sched.claim_for_active(core, n).map_err(CoreError::Config)?;
            let shared = &self.shared;
            if let Err((e, unstarted)) = py.detach(|| shared.spawn_workers(slots)) {
                for (c, wi) in unstarted {
                    sched.unclaim_spawn(c, wi);
                }
                return Err(e.into_pyerr(py));
            }
        }
        sched.set_active(core, n).map_err(CoreError::Config)?;
        Ok(())
    }

    /// Coordinator-wide Guard House defaults (a `guard=` dict) for operations not seen yet.
    fn guard_defaults(&self, py: Python<'_>, settings: &Bound<'_, PyDict>) -> PyResult<()> {
        self.guard()?.set_defaults(py, settings)
    }

    /// Applies a `guard=` dict to one operation (created if it was never seen).
    fn guard_configure(
        &self,
        py: Python<'_>,
        operation: &Bound<'_, PyString>,
        settings: &Bound<'_, PyDict>,
    ) -> PyResult<()> {
        self.guard()?.configure(py, operation, settings)
    }

    /// An operator's button on an operation's breaker ("block", "unblock", "force_open",
    /// "disable"); returns the new state.
    fn breaker_action(
        &self,
        py: Python<'_>,
        operation: &Bound<'_, PyString>,
        action: &str,
    ) -> PyResult<&'static str> {
        self.guard()?.button(py, operation, action)
    }

    /// Submits a call of the guarded function `func` to this runtime (whichever runtime takes
    /// decorated calls): a released quarantined call is replayed on its own coordinator.
    #[pyo3(signature = (func, args, kwargs=None))]
    fn call_guarded<'py>(
        &self,
        py: Python<'py>,
        func: &Bound<'py, crate::guarded::GuardedFunction>,
        args: Bound<'py, PyTuple>,
        kwargs: Option<Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, TaskToken>> {
        no_panic(py, || {
            submit_token(
                py,
                &self.shared,
                &func.get().op,
                args.unbind(),
                kwargs.map(Bound::unbind),
                Some(func.as_any()),
            )
        })
    }

    /// Names of the operations the Guard House has seen.
    fn guard_operations(&self) -> PyResult<Vec<String>> {
        Ok(self.guard()?.names())
    }

    /// What the Guard House knows about one operation (None if never seen).
    fn guard_report<'py>(
        &self,
        py: Python<'py>,
        operation: &str,
    ) -> PyResult<Option<Bound<'py, PyDict>>> {
        self.guard()?.report(py, operation)
    }

    /// The execution history, oldest first (at most `limit` newest records).
    #[pyo3(signature = (limit=None))]
    fn history<'py>(&self, py: Python<'py>, limit: Option<usize>) -> PyResult<Bound<'py, PyList>> {
        self.guard()?.history_list(py, limit)
    }

    /// Capacity, records kept and records written of the execution history.
    fn history_info(&self) -> PyResult<(usize, usize, u64)> {
        let h = &self.guard()?.history;
        Ok((h.capacity(), h.len(), h.written()))
    }

    fn active_workers(&self, core: &Bound<'_, PyAny>) -> PyResult<usize> {
        Ok(self.shared.sched.active(self.core_index(core)?))
    }

    /// Which lifecycle event kinds are recorded (bits of `EVENT_KINDS`; 0: none).
    #[getter]
    fn event_mask(&self) -> u32 {
        self.shared.events.mask()
    }

    /// Records the lifecycle event kinds in `mask` from now on (0: none, which costs
    /// nothing).
    fn set_event_mask(&self, mask: u32) {
        self.shared.events.set_mask(mask);
    }

    /// Takes up to `max` buffered lifecycle events, oldest first, waiting up to `timeout`
    /// seconds (GIL released) for the first and then a few ms for a batch; `[]` on timeout
    /// or after `wake_events()`.
    #[pyo3(signature = (max=4096, timeout=0.1))]
    fn take_events(
        &self,
        py: Python<'_>,
        max: usize,
        timeout: f64,
    ) -> PyResult<crate::observe::EventBatch> {
        if timeout.is_nan() || timeout < 0.0 {
            return Err(CoreError::Config(format!(
                "timeout must be a number of seconds >= 0, got {timeout}"
            ))
            .into());
        }
        let timeout = Duration::try_from_secs_f64(timeout).unwrap_or(Duration::from_secs(3600));
        Ok(crate::observe::take(py, &self.shared.events, max, timeout))
    }

    /// Cuts a `take_events` wait short.
    fn wake_events(&self) {
        self.shared.events.wake();
    }

    /// Lifecycle events lost because the buffer was full.
    #[getter]
    fn events_dropped(&self) -> u64 {
        self.shared.events.dropped()
    }

    /// Sets (or with None clears) what runs each attempt: `hook(token, func, args, kwargs,
    /// previous)` in place of `func(*args, **kwargs)`, on the worker, in the token's context.
    fn set_attempt_hook(&self, hook: Option<Py<PyAny>>) {
        let on = hook.is_some();
        *lock(&self.shared.attempt_hook) = hook;
        self.shared.has_attempt_hook.store(on, Ordering::Release);
    }

    /// Sets (or with None clears) what checks each call before it becomes a token:
    /// `check(operation, func, args, kwargs)` on the submitting thread (and for a chain step
    /// when its parent settles); what it raises refuses the call (a chain step fails with it).
    fn set_submit_check(&self, check: Option<Py<PyAny>>) {
        let on = check.is_some();
        *lock(&self.shared.submit_check) = check;
        self.shared.has_submit_check.store(on, Ordering::Release);
    }

    /// The figures a metrics scrape exports, in one call (see docs/observability.md).
    fn metrics<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let st = self.shared.sched.stats();
        let d = PyDict::new(py);
        d.set_item("created", st.created)?;
        let tokens = PyDict::new(py);
        tokens.set_item("waiting", st.waiting)?;
        tokens.set_item("admitted", st.admitted)?;
        tokens.set_item("executing", st.executing)?;
        tokens.set_item("held", st.held)?;
        d.set_item("tokens", tokens)?;
        d.set_item("pool_depth", st.pool_len)?;
        d.set_item("events_dropped", self.shared.events.dropped())?;
        let bounds: Vec<f64> = (0..crate::sched::growth::WAIT_BUCKETS)
            .map(|i| {
                if i + 1 == crate::sched::growth::WAIT_BUCKETS {
                    f64::INFINITY
                } else {
                    crate::sched::growth::bucket_upper_us(i) as f64 / 1e6
                }
            })
            .collect();
        d.set_item("queue_wait_bounds", bounds)?;
        let per_core = PyList::empty(py);
        for (i, c) in st.per_core.iter().enumerate() {
            let cd = PyDict::new(py);
            cd.set_item("core", i + 1)?;
            cd.set_item("queue_depth", c.queue_depth)?;
            cd.set_item("active_workers", c.active_workers)?;
            cd.set_item("busy_workers", self.shared.sched.busy_targets(i))?;
            let routed = PyDict::new(py);
            for w in Weight::ALL {
                routed.set_item(w.name(), c.routed[w as usize])?;
            }
            cd.set_item("routed", routed)?;
            cd.set_item("queue_wait_buckets", c.wait_histogram.to_vec())?;
            cd.set_item("queue_wait_sum", c.wait_ns_sum as f64 / 1e9)?;
            per_core.append(cd)?;
        }
        d.set_item("per_core", per_core)?;
        d.set_item("storage", self.shared.gov.tier_metrics(py)?)?;
        match self.shared.guard.as_ref() {
            Some(gh) => d.set_item("operations", gh.metrics(py, &EXECUTION_BOUNDS_NS)?)?,
            None => d.set_item("operations", PyList::empty(py))?,
        }
        Ok(d)
    }

    /// Counters and per-core distribution.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let st = self.shared.sched.stats();
        let cfg = self.shared.sched.config();
        let d = PyDict::new(py);
        d.set_item("created", st.created)?;
        d.set_item("waiting", st.waiting)?;
        d.set_item("admitted", st.admitted)?;
        d.set_item("executing", st.executing)?;
        d.set_item("completed", st.completed)?;
        d.set_item("failed", st.failed)?;
        d.set_item("killed", st.killed)?;
        d.set_item("timed_out", st.timed_out)?;
        d.set_item("held", st.held)?;
        d.set_item("retried", st.retried)?;
        d.set_item("discarded", st.discarded)?;
        d.set_item("moved", st.moved)?;
        d.set_item(
            "mode",
            if self.shared.gov.inline {
                "inline"
            } else {
                "threads"
            },
        )?;
        d.set_item("memory_budget", cfg.memory_budget)?;
        d.set_item("queued_bytes", self.shared.sched.queued_bytes())?;
        d.set_item("storage", self.shared.gov.tier_stats(py)?)?;
        d.set_item("limits", self.shared.gov.limits_dict(py)?)?;
        d.set_item("illegal_transitions", st.illegal_transitions)?;
        d.set_item(
            "internal_errors",
            self.shared.internal_errors.load(Ordering::Relaxed),
        )?;
        d.set_item(
            "spawn_failures",
            self.shared.spawn_failures.load(Ordering::Relaxed),
        )?;
        d.set_item(
            "inline_runs",
            self.shared.inline_runs.load(Ordering::Relaxed),
        )?;
        d.set_item("blocked_waits", self.shared.waits.len())?;
        d.set_item("pool_len", st.pool_len)?;
        d.set_item("cores", self.shared.sched.cores())?;
        d.set_item("workers_per_core", cfg.workers_per_core)?;
        d.set_item("pool_capacity", cfg.pool_capacity)?;
        d.set_item("mailbox_capacity", cfg.mailbox_capacity)?;
        d.set_item("max_workers_per_core", cfg.max_workers_per_core)?;
        d.set_item("growth", self.growth_stats(py)?)?;
        let per_core = PyList::empty(py);
        for (i, c) in st.per_core.iter().enumerate() {
            let cd = PyDict::new(py);
            cd.set_item("core", i + 1)?;
            cd.set_item("cpu", self.shared.cpu_map[i])?;
            cd.set_item("active_workers", c.active_workers)?;
            cd.set_item("spawned_workers", c.spawned_workers)?;
            cd.set_item("blocked_workers", c.blocked_workers)?;
            cd.set_item("compensations", c.compensations)?;
            cd.set_item("uncompensated", c.uncompensated)?;
            cd.set_item("queue_depth", c.queue_depth)?;
            cd.set_item("executing", c.executing)?;
            cd.set_item("load", c.load)?;
            cd.set_item("busy_workers", self.shared.sched.busy_targets(i))?;
            cd.set_item("pool_backlog", c.pool_backlog)?;
            cd.set_item("grown_on_demand", c.grown_on_demand)?;
            cd.set_item("grown_workers", c.grown_workers)?;
            cd.set_item("busy_seconds", c.busy_ns as f64 / 1e9)?;
            cd.set_item("wait_histogram", c.wait_histogram.to_vec())?;
            let routed = PyDict::new(py);
            for w in Weight::ALL {
                routed.set_item(w.name(), c.routed[w as usize])?;
            }
            cd.set_item("routed", routed)?;
            per_core.append(cd)?;
        }
        d.set_item("per_core", per_core)?;
        Ok(d)
    }

    #[getter]
    fn cores(&self) -> usize {
        self.shared.sched.cores()
    }

    /// The OS CPU each virtual core maps to.
    #[getter]
    fn cpu_map(&self) -> Vec<usize> {
        self.shared.cpu_map.clone()
    }

    /// Whether every started worker was pinned to its CPU.
    #[getter]
    fn pinned(&self) -> bool {
        self.shared.pin && self.shared.pin_failures.load(Ordering::Relaxed) == 0
    }

    #[getter]
    fn paused(&self) -> bool {
        self.shared.sched.is_paused()
    }

    #[getter]
    fn closed(&self) -> bool {
        self.shared.sched.is_closed()
    }

    #[getter]
    fn started(&self) -> bool {
        self.shared.started.load(Ordering::Acquire)
    }

    #[getter]
    fn shut_down(&self) -> bool {
        self.shared.sched.is_shutdown()
    }

    /// The id the next token submitted here will get.
    #[getter]
    fn next_token_id(&self) -> u64 {
        self.shared.sched.peek_next_id()
    }

    /// Stack size in bytes of each worker thread.
    #[getter]
    fn worker_stack_size(&self) -> usize {
        self.shared.stack_size
    }

    /// Whether the calling thread is one of this runtime's workers (i.e. inside a task).
    fn on_worker_thread(&self) -> bool {
        is_worker_of(&self.shared)
    }

    /// Up to `limit` queued tokens (not started: in the pool, a mailbox, a limiter's queue or
    /// waiting for a retry), the pool first, highest lane first.
    #[pyo3(signature = (limit=50))]
    fn queued(&self, py: Python<'_>, limit: usize) -> Vec<Py<TaskToken>> {
        let mut out = Vec::new();
        // A token moving from one queue to the next while they are read one after the other
        // could be seen twice.
        let mut seen = std::collections::HashSet::new();
        let mut take = |j: &Py<TaskToken>| {
            if out.len() < limit && seen.insert(j.get().header.id) {
                out.push(j.clone_ref(py));
            }
            out.len() < limit
        };
        let _ = self.visit_queued(&mut take);
        out
    }

    /// The queued token `token_id` (see `queued`), or None if no queued token has that id.
    fn find_queued(&self, py: Python<'_>, token_id: u64) -> Option<Py<TaskToken>> {
        let mut hit = None;
        // Twice: a token moving back to a queue already read (a retry or a held token going
        // to the pool, a re-route) is missed by one pass.
        for _ in 0..2 {
            let _ = self.visit_queued(|j: &Py<TaskToken>| {
                if j.get().header.id == token_id {
                    hit = Some(j.clone_ref(py));
                }
                hit.is_none()
            });
            if hit.is_some() {
                break;
            }
        }
        hit
    }

    /// Moves the queued token `token_id` to lane `priority`; False if it is not queued.
    fn reprioritize(&self, token_id: u64, priority: &str) -> PyResult<bool> {
        let p = parse_priority(priority)?;
        Ok(self.shared.sched.requeue(token_id, Some(p), None)
            || self.shared.gov.retarget(token_id, Some(p), None))
    }

    /// Re-routes the queued token `token_id` to `weight`'s cores; False if it is not queued.
    fn reroute(&self, token_id: u64, weight: &str) -> PyResult<bool> {
        let w = parse_weight(weight)?;
        Ok(self.shared.sched.requeue(token_id, None, Some(w))
            || self.shared.gov.retarget(token_id, None, Some(w)))
    }

    /// Sets the limit of `operation` (validated by the caller); all None removes it.
    #[pyo3(signature = (operation, max_concurrency=None, rate=None, burst=None, limit_by=None))]
    fn set_limit(
        &self,
        py: Python<'_>,
        operation: &str,
        max_concurrency: Option<usize>,
        rate: Option<f64>,
        burst: Option<u32>,
        limit_by: Option<String>,
    ) -> PyResult<()> {
        let conf = if max_concurrency.is_none() && rate.is_none() {
            None
        } else {
            Some(
                crate::policy::limit_conf(max_concurrency, rate, burst)
                    .map_err(CoreError::Config)?,
            )
        };
        self.shared
            .gov
            .set_limit(py, operation, conf, limit_by)
            .map_err(|e| CoreError::Config(e).into_pyerr(py))
    }

    /// Sets how many tokens of storage tier `tier` ("SLOW", ...) may run at once.
    fn set_storage_limit(&self, py: Python<'_>, tier: &str, limit: usize) -> PyResult<()> {
        self.shared
            .gov
            .set_tier_limit(py, &self.shared, tier, limit)
            .map_err(|e| CoreError::Config(e).into_pyerr(py))
    }
}

/// The upper bounds of the execution-time histogram buckets a metrics scrape exports, in ns
/// (10 µs to 60 s, then +Inf).
const EXECUTION_BOUNDS_NS: [u64; 22] = [
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
    30_000_000_000,
    60_000_000_000,
    u64::MAX,
];

/// "high", "normal" or "low".
pub(crate) fn priority_name(p: Priority) -> &'static str {
    match p {
        Priority::High => "high",
        Priority::Normal => "normal",
        Priority::Low => "low",
    }
}
