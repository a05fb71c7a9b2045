//! The PyO3 side of the scheduler: worker threads that run Python callables, the `Runtime`
//! class the Python `OperationsCoordinator` drives, and the submit path shared with
//! `GuardedFunction.__call__`.

use std::cell::{Cell, RefCell, UnsafeCell};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};

use crate::errors::{internal_error_value, CoreError};
use crate::router::{Priority, Weight};
use crate::sched::{Config, Overflow, RejectReason, Rejected, Scheduler};
use crate::state::FLAG_WAITERS;
use crate::token::{wake_key, Call, OpSpec, TaskToken};

/// Everything the worker threads and the tokens share.
pub struct Shared {
    pub(crate) sched: Scheduler<Py<TaskToken>>,
    cpu_map: Vec<usize>,
    pin: bool,
    pin_failures: AtomicUsize,
    internal_errors: AtomicUsize,
    submit_timeout: Option<f64>,
    threads: Mutex<Vec<(std::thread::ThreadId, JoinHandle<()>)>>,
    started: AtomicBool,
    fork_gen: u64,
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
    match CURRENT.lock().read().last() {
        Some(s) => Ok(s.clone()),
        None if FORKED_WITH_RUNTIMES.load(Ordering::Relaxed) => Err(CoreError::Forked),
        None => Err(CoreError::NotRunning),
    }
}

fn register(shared: &Arc<Shared>) {
    let mut cur = CURRENT.lock().write();
    cur.push(shared.clone());
    REGISTERED.store(cur.len(), Ordering::Release);
}

fn unregister(shared: &Arc<Shared>) {
    let mut cur = CURRENT.lock().write();
    cur.retain(|s| !Arc::ptr_eq(s, shared));
    REGISTERED.store(cur.len(), Ordering::Release);
}

/// Called (through `os.register_at_fork`) in a forked child: runtimes started before the
/// fork refuse to run with `CoordinatorForked` instead of waiting on threads that are gone.
#[pyfunction]
pub fn _after_fork_in_child() {
    FORK_GEN.fetch_add(1, Ordering::SeqCst);
    if REGISTERED.swap(0, Ordering::SeqCst) > 0 {
        FORKED_WITH_RUNTIMES.store(true, Ordering::SeqCst);
    }
    // SAFETY: we are in the child right after fork(); only this thread exists.
    unsafe { CURRENT.reset_after_fork() };
}

impl Shared {
    /// Whether this runtime was started before a fork (in this process it has no threads).
    pub(crate) fn forked(&self) -> bool {
        self.fork_gen != FORK_GEN.load(Ordering::Relaxed)
    }
}

struct WorkerCtx {
    shared: *const Shared,
    core: usize,
    wi: usize,
    /// Tokens executing on this thread's stack (nested waits run queued work).
    running: Cell<u64>,
}

thread_local! {
    static WORKER: RefCell<Option<WorkerCtx>> = const { RefCell::new(None) };
}

/// How deep a worker may nest helping runs inside a blocked `get()`.
const MAX_HELP_DEPTH: u64 = 64;

/// `(core, worker)` if this thread is a worker of `shared`.
pub(crate) fn current_worker(shared: &Arc<Shared>) -> Option<(usize, usize)> {
    WORKER.with(|w| {
        w.borrow()
            .as_ref()
            .and_then(|c| std::ptr::eq(c.shared, Arc::as_ptr(shared)).then_some((c.core, c.wi)))
    })
}

fn running_here(shared: &Arc<Shared>) -> u64 {
    WORKER.with(|w| {
        w.borrow()
            .as_ref()
            .filter(|c| std::ptr::eq(c.shared, Arc::as_ptr(shared)))
            .map_or(0, |c| c.running.get())
    })
}

fn add_running(delta: i64) {
    WORKER.with(|w| {
        if let Some(c) = w.borrow().as_ref() {
            c.running.set((c.running.get() as i64 + delta) as u64);
        }
    })
}

/// A worker blocked on another token runs one queued job of its own core. Returns whether
/// it ran one.
pub(crate) fn help_one(py: Python<'_>, shared: &Arc<Shared>) -> bool {
    let Some((core, wi)) = current_worker(shared) else {
        return false;
    };
    if running_here(shared) >= MAX_HELP_DEPTH {
        return false;
    }
    match shared.sched.next_job(core, wi) {
        Some(job) => {
            wake_key(run_job(py, shared, core, wi, job));
            true
        }
        None => false,
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
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
/// Waiters of a token without callbacks are not woken here: the returned key is woken by the
/// caller, after it released the GIL if it has nothing else to run, so the woken waiter finds
/// the GIL free instead of sleeping a second time for it.
fn run_job(
    py: Python<'_>,
    shared: &Arc<Shared>,
    core: usize,
    wi: usize,
    job: Py<TaskToken>,
) -> Option<usize> {
    let tok = job.get();
    if !shared.sched.start(core, wi, &tok.header) {
        return None; // killed while queued
    }
    add_running(1);
    let res = catch_unwind(AssertUnwindSafe(|| {
        if tok.wants_panic() {
            panic!("test hook: panic while running token {}", tok.header.id);
        }
        let Some(call) = tok.take_call() else {
            return Err(internal_error_value(
                py,
                format!("token {} has no call to run", tok.header.id),
            ));
        };
        let func = tok.op.func.bind(py);
        let args = call.args.bind(py);
        let r = crate::exitguard::call(func, args, call.kwargs.as_ref().map(|k| k.bind(py)));
        drop(call);
        r.map(Bound::unbind).map_err(|e| e.into_value(py))
    }));
    add_running(-1);
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
    let ok = outcome.is_ok();
    tok.set_outcome(outcome);
    let flags = shared.sched.finish(core, wi, &tok.header, ok).unwrap_or(0);
    let key = (flags & FLAG_WAITERS != 0).then(|| tok.header.state.key());
    let callbacks = tok.take_callbacks();
    let deferred = if callbacks.is_empty() {
        key
    } else {
        wake_key(key); // a slow callback must not delay the waiters
        TaskToken::call_callbacks(job.bind(py), callbacks);
        None
    };
    shared.sched.release(core, wi);
    deferred
}

/// One wait-then-run round of a worker; false once the worker should exit.
fn worker_round(
    shared: &Arc<Shared>,
    core: usize,
    wi: usize,
    parker: &crossbeam_utils::sync::Parker,
) -> bool {
    let Some(job) = shared.sched.wait_for_work(core, wi, parker) else {
        return false;
    };
    let mut first = Some(job);
    let mut deferred = None;
    // Attach once and run jobs while there are any; detach only to wait.
    let attached = Python::try_attach(|py| {
        let mut job = first.take().expect("job present");
        loop {
            let wake = run_job(py, shared, core, wi, job);
            match shared.sched.next_job(core, wi) {
                Some(j) => {
                    wake_key(wake);
                    job = j;
                }
                None => {
                    deferred = wake;
                    break;
                }
            }
        }
    });
    wake_key(deferred); // the GIL is released now
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
    WORKER.with(|w| {
        *w.borrow_mut() = Some(WorkerCtx {
            shared: Arc::as_ptr(&shared),
            core,
            wi,
            running: Cell::new(0),
        })
    });
    let sh = shared.clone();
    let run = move || {
        // A panic outside a token (a bug in the scheduler itself) must not kill the worker
        // and strand the tokens in its mailbox: it is counted and the loop goes on.
        loop {
            match catch_unwind(AssertUnwindSafe(|| worker_round(&sh, core, wi, &parker))) {
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
    fn spawn_workers(self: &Arc<Self>, slots: Vec<(usize, usize)>) -> Result<(), CoreError> {
        let mut threads = self.threads.lock();
        for (core, wi) in slots {
            let me = self.clone();
            let handle = std::thread::Builder::new()
                .name(format!("tokengate-c{}-w{}", core + 1, wi))
                .spawn(move || worker_main(me, core, wi))
                .map_err(|e| {
                    CoreError::Internal(format!("could not start a worker thread: {e}"))
                })?;
            threads.push((handle.thread().id(), handle));
        }
        Ok(())
    }
}

/// Submits a call of `op` on `shared` and returns its token (the shared path of decorated
/// calls and `Runtime.submit`).
pub(crate) fn submit_token<'py>(
    py: Python<'py>,
    shared: &Arc<Shared>,
    op: &Arc<OpSpec>,
    args: Py<PyTuple>,
    kwargs: Option<Py<PyDict>>,
) -> PyResult<Bound<'py, TaskToken>> {
    if shared.forked() {
        return Err(CoreError::Forked.into_pyerr(py));
    }
    let id = shared.sched.next_id();
    let tok = Bound::new(
        py,
        TaskToken::new(id, op.clone(), shared.clone(), Call { args, kwargs }),
    )?;
    let mut job = tok.clone().unbind();
    let mut deadline: Option<Instant> = None;
    loop {
        match shared.sched.try_submit(job) {
            Ok(()) => return Ok(tok),
            Err(Rejected {
                reason: RejectReason::Closed,
                ..
            }) => return Err(CoreError::AdmissionClosed.into_pyerr(py)),
            Err(Rejected {
                reason: RejectReason::PoolFull,
                job: back,
            }) => {
                let cap = shared.sched.config().pool_capacity;
                if shared.sched.config().overflow == Overflow::Reject {
                    return Err(CoreError::PoolFull {
                        capacity: cap,
                        waited: None,
                    }
                    .into_pyerr(py));
                }
                job = back;
                if let (None, Some(t)) = (deadline, shared.submit_timeout) {
                    deadline = Some(Instant::now() + Duration::from_secs_f64(t));
                }
                // A worker submitting into a full pool runs queued work instead of waiting
                // for room only other workers could make.
                if help_one(py, shared) {
                    continue;
                }
                let chunk = deadline.map_or(Duration::from_millis(50), |d| {
                    d.saturating_duration_since(Instant::now())
                        .min(Duration::from_millis(50))
                });
                py.detach(|| shared.sched.wait_pool_room(chunk));
                py.check_signals()?;
                if let Some(d) = deadline {
                    if Instant::now() >= d {
                        return Err(CoreError::PoolFull {
                            capacity: cap,
                            waited: shared.submit_timeout,
                        }
                        .into_pyerr(py));
                    }
                }
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

#[pymethods]
impl Runtime {
    #[new]
    #[pyo3(signature = (*, cores=None, workers_per_core=4, max_workers_per_core=None,
        mailbox_capacity=120, pool_capacity=100_000, overflow="block", submit_timeout=None,
        pin_workers=true))]
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
    ) -> PyResult<Self> {
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
        let cfg = Config {
            cores: n,
            workers_per_core,
            max_workers_per_core: max_workers_per_core.unwrap_or(workers_per_core.max(64)),
            mailbox_capacity,
            pool_capacity,
            overflow,
        };
        let sched = Scheduler::new(cfg).map_err(CoreError::Config)?;
        let cpu_map = (0..n).map(|i| cpus[i % cpus.len()]).collect();
        Ok(Runtime {
            shared: Arc::new(Shared {
                sched,
                cpu_map,
                pin: pin_workers && cfg!(any(target_os = "linux", target_os = "android")),
                pin_failures: AtomicUsize::new(0),
                internal_errors: AtomicUsize::new(0),
                submit_timeout,
                threads: Mutex::new(Vec::new()),
                started: AtomicBool::new(false),
                fork_gen: FORK_GEN.load(Ordering::SeqCst),
            }),
        })
    }

    /// Starts the worker threads and makes this runtime the target of decorated calls.
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
            for wi in 0..s.sched.config().workers_per_core {
                if s.sched.claim_spawn(core, wi) {
                    slots.push((core, wi));
                }
            }
        }
        if let Err(e) = s.spawn_workers(slots) {
            // Don't leave the workers that did start behind.
            s.sched.close();
            s.sched.shutdown();
            let started: Vec<_> = std::mem::take(&mut *s.threads.lock());
            py.detach(|| {
                for (_, h) in started {
                    let _ = h.join();
                }
            });
            return Err(e.into_pyerr(py));
        }
        register(&self.shared);
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
        let op = Arc::new(OpSpec {
            func: func.unbind(),
            operation_type: operation_type.unbind(),
            weight: parse_weight(weight)?,
            priority: parse_priority(priority)?,
            storage_speed: None,
            tags: None,
        });
        submit_token(
            py,
            &self.shared,
            &op,
            args.unbind(),
            kwargs.map(Bound::unbind),
        )
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
        self.shared.sched.open();
    }

    /// Waits (GIL released) until every accepted token is final; False on timeout. Called
    /// from inside a task, the tokens running on the calling thread are not waited for.
    #[pyo3(signature = (timeout=None))]
    fn wait_quiet(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        if self.shared.forked() {
            return Err(CoreError::Forked.into_pyerr(py));
        }
        let limit = running_here(&self.shared);
        let deadline = timeout.map(|t| Instant::now() + Duration::from_secs_f64(t.max(0.0)));
        loop {
            if help_one(py, &self.shared) {
                continue;
            }
            let chunk = deadline.map_or(Duration::from_millis(50), |d| {
                d.saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(50))
            });
            let chunk = if current_worker(&self.shared).is_some() {
                chunk.min(Duration::from_millis(1))
            } else {
                chunk
            };
            if py.detach(|| self.shared.sched.wait_quiet(limit, chunk)) {
                return Ok(true);
            }
            py.check_signals()?;
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(false);
            }
        }
    }

    /// Accepted tokens that are not final yet.
    fn in_flight(&self) -> u64 {
        self.shared.sched.in_flight()
    }

    /// Kills every token that has not started (pool and mailboxes); returns how many.
    fn kill_pending(&self, py: Python<'_>) -> usize {
        if self.shared.forked() {
            return 0;
        }
        let pending = self.shared.sched.take_pending();
        let mut killed = 0;
        for job in pending {
            let b = job.bind(py);
            if let Ok(flags) = self.shared.sched.kill(&b.get().header) {
                drop(b.get().take_call());
                b.get().wake_waiters(flags);
                TaskToken::run_callbacks(b);
                killed += 1;
            }
        }
        killed
    }

    /// Stops the workers once they find no work and joins them (GIL released). Returns
    /// False if some did not exit within `timeout`. Decorated calls stop coming here.
    #[pyo3(signature = (timeout=None))]
    fn shutdown(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        if self.shared.forked() {
            return Ok(true); // its threads were in the parent; nothing to stop here
        }
        unregister(&self.shared);
        self.shared.sched.shutdown();
        let me = std::thread::current().id();
        let deadline = timeout.map(|t| Instant::now() + Duration::from_secs_f64(t.max(0.0)));
        let handles: Vec<_> = std::mem::take(&mut *self.shared.threads.lock());
        let mut all = true;
        let mut pending = Vec::new();
        for (tid, h) in handles {
            if tid == me {
                continue; // stop() called from inside a task: this thread exits by itself
            }
            pending.push(h);
        }
        for h in pending {
            loop {
                if h.is_finished() {
                    let _ = h.join();
                    break;
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    all = false;
                    break;
                }
                py.detach(|| std::thread::sleep(Duration::from_millis(1)));
                py.check_signals()?;
            }
        }
        Ok(all)
    }

    /// Sets how many workers of 1-based `core` receive new work (starting threads if needed).
    fn set_active_workers(&self, core: &Bound<'_, PyAny>, n: &Bound<'_, PyAny>) -> PyResult<()> {
        let core = self.core_index(core)?;
        let max = self.shared.sched.config().max_workers_per_core;
        let n = int_in(n, 1, max)?.ok_or_else(|| {
            CoreError::Config(format!(
                "active workers must be between 1 and {max} (max_workers_per_core), got {n}"
            ))
        })?;
        let slots = self
            .shared
            .sched
            .set_active(core, n)
            .map_err(CoreError::Config)?;
        if self.shared.started.load(Ordering::Acquire) && !self.shared.sched.is_shutdown() {
            self.shared.spawn_workers(slots)?;
        }
        Ok(())
    }

    fn active_workers(&self, core: &Bound<'_, PyAny>) -> PyResult<usize> {
        Ok(self.shared.sched.active(self.core_index(core)?))
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
        d.set_item("illegal_transitions", st.illegal_transitions)?;
        d.set_item(
            "internal_errors",
            self.shared.internal_errors.load(Ordering::Relaxed),
        )?;
        d.set_item("pool_len", st.pool_len)?;
        d.set_item("cores", self.shared.sched.cores())?;
        d.set_item("workers_per_core", cfg.workers_per_core)?;
        d.set_item("pool_capacity", cfg.pool_capacity)?;
        d.set_item("mailbox_capacity", cfg.mailbox_capacity)?;
        let per_core = PyList::empty(py);
        for (i, c) in st.per_core.iter().enumerate() {
            let cd = PyDict::new(py);
            cd.set_item("core", i + 1)?;
            cd.set_item("cpu", self.shared.cpu_map[i])?;
            cd.set_item("active_workers", c.active_workers)?;
            cd.set_item("spawned_workers", c.spawned_workers)?;
            cd.set_item("queue_depth", c.queue_depth)?;
            cd.set_item("executing", c.executing)?;
            cd.set_item("load", c.load)?;
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
}
