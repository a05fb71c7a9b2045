//! The binding side of execution policy: what happens to a token whose operation has a
//! timeout, retries, a limit or a storage tier, between its submission and its final state.
//! The rules themselves are pure Rust (`permits`, `timers`, `policy`, the state machine);
//! this wires them to tokens, the timer thread and the Python objects involved.
//!
//! The way of a governed token:
//! 1. It is accepted as WAITING outside the pool (`Scheduler::hold_new`, counted against the
//!    pool bound), and its deadline is scheduled if it has a timeout.
//! 2. It takes a permit of its operation's limit, then one of its storage tier. A permit that
//!    is not free leaves it held in that limiter (no worker, no queue slot) until a holder
//!    releases one or, for a rate limit, until its time comes (a timer polls the limiter).
//! 3. With its permits it enters the mailboxes or the pool (`Scheduler::unhold`) and runs.
//! 4. When the attempt ends the worker releases its permits (which admits the next held
//!    tokens) and either stores the outcome or, if the policy retries this error, sends it
//!    back to step 2 after its backoff (a timer), ahead of its lane.
//!
//! A token that is settled while it waits (killed, timed out) releases its permits at once
//! and is dropped by the limiter or timer that holds it when it comes up.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use pyo3::exceptions::{PyBaseException, PyException};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::clock::now_ns;
use crate::errors::CoreError;
use crate::permits::{Admit, Granted, LimitConf, Limiter, LimiterStats};
use crate::policy::{backoff_delay, unit_from, Policy};
use crate::router::{Priority, Weight};
use crate::runtime::Shared;
use crate::state::{TokenState, FLAG_FINISHING, FLAG_PERMITS};
use crate::sync::lock;
use crate::timers::Timers;
use crate::token::{wake_threads, Listener, TaskToken};

type Job = Py<TaskToken>;

/// Storage tiers, in `STORAGE_SPEEDS` order, and their default permits.
pub const TIERS: [(&str, usize); 4] =
    [("SLOW", 10), ("MODERATE", 25), ("FAST", 50), ("INSANE", 70)];

const PERMIT_LIMIT: u8 = 1;
const PERMIT_TIER: u8 = 2;

/// How soon to look again at a token that was storing its outcome when its deadline came.
const FINISHING_RECHECK_NS: u64 = 1_000_000;

/// A limit of one operation (per operation, or per value of the tag `limit_by`).
pub struct LimitEntry {
    pub operation: String,
    pub limiter: Limiter<Job>,
    pub limit_by: Option<String>,
    /// Held tokens settled (killed, timed out) while the limiter still holds them.
    dead: AtomicUsize,
    /// When the one pending poll of this limit is due (0: none).
    poll_at: AtomicU64,
}

/// Where a held token waits.
#[derive(Clone)]
enum HeldAt {
    Limit(Arc<LimitEntry>),
    Tier(usize),
}

/// What the policy keeps per token.
#[derive(Default)]
pub struct Gov {
    permits: u8,
    limit: Option<(Arc<LimitEntry>, String)>,
    tier: Option<usize>,
    held_at: Option<HeldAt>,
    /// The step before this one in its chain, when it ended this one by ending (killed,
    /// timed out) without running it.
    pub upstream: Option<u64>,
    /// Whether that step was quarantined (rather than killed).
    pub upstream_quarantined: bool,
    pub errors: Vec<Py<PyBaseException>>,
    /// Which of its deadlines is current (a retry schedules a new one).
    deadline_gen: u32,
    /// The half-open probe of its operation's breaker this token is (given back if it never
    /// runs).
    pub probe: Option<crate::breaker::Ticket>,
    /// The running attempt as the Guard House saw it start (tokens with a timeout: whoever
    /// notes the attempt's end first, the worker or the deadline, takes it).
    pub attempt: Option<crate::guard::AttemptNote>,
    /// A quarantined token's record id in the store, or why it could not be stored.
    pub quarantine: Option<Result<String, String>>,
    /// The chain step whose completion submitted this one (kept only while an attempt hook
    /// is set: tracing parents a step to the step before it).
    pub previous: Option<Py<TaskToken>>,
}

/// What the timer thread handles.
pub enum TimerItem {
    Deadline(Job, u32),
    Retry(Job),
    /// A rate-limited limiter may grant held tokens now.
    PollLimit(Arc<LimitEntry>),
}

/// The callback thread's line.
enum CallbackLine {
    Idle,
    Open(std::sync::mpsc::Sender<(Job, Vec<Listener>)>),
    Stopped,
}

/// The policy state of one runtime.
pub struct Governor {
    pub timers: Timers<TimerItem>,
    pub tiers: [Limiter<Job>; 4],
    /// Per tier: held tokens settled while the tier still holds them.
    tier_dead: [AtomicUsize; 4],
    limits: RwLock<HashMap<String, Arc<LimitEntry>>>,
    /// Whether any limit was set at runtime (then every token looks its operation up).
    any_limits: AtomicBool,
    /// Passthrough mode: calls run in the caller.
    pub inline: bool,
    /// Set by `kill_pending` (a stop that kills what has not started), cleared when
    /// admission opens again: a retry or chain step that comes up meanwhile is killed too.
    pub killing: AtomicBool,
    /// The timer thread, started with the first timer (most programs never need one).
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Where the timer thread sends the callbacks of tokens it times out (a thread of its
    /// own, started with the first; `None` once stopped).
    callbacks: Mutex<CallbackLine>,
    thread_started: AtomicBool,
    runtime: OnceLock<Weak<Shared>>,
}

fn tier_limiter(n: usize) -> Limiter<Job> {
    Limiter::new(LimitConf {
        per_key: None,
        total: Some(n),
        rate: None,
    })
    .expect("tier limits are validated")
}

impl Governor {
    pub fn new(inline: bool, tier_limits: [usize; 4]) -> Governor {
        Governor {
            timers: Timers::default(),
            tiers: tier_limits.map(tier_limiter),
            tier_dead: Default::default(),
            limits: RwLock::new(HashMap::new()),
            any_limits: AtomicBool::new(false),
            inline,
            killing: AtomicBool::new(false),
            thread: Mutex::new(None),
            callbacks: Mutex::new(CallbackLine::Idle),
            thread_started: AtomicBool::new(false),
            runtime: OnceLock::new(),
        }
    }

    /// Whether a token of an operation without policy and tier must still be governed (a
    /// limit set at runtime for its operation).
    #[inline]
    pub fn limits_set(&self) -> bool {
        self.any_limits.load(Ordering::Relaxed)
    }

    /// Sets (or, with `conf` None, removes) the limit of `operation`.
    pub fn set_limit(
        &self,
        py: Python<'_>,
        operation: &str,
        conf: Option<LimitConf>,
        limit_by: Option<String>,
    ) -> Result<(), String> {
        // No limit at all is a limit too: it overrides the decorator's.
        let conf = conf.unwrap_or_default();
        let mut released = None;
        let mut moved = Vec::new();
        {
            let mut map = self.limits.write().unwrap_or_else(|e| e.into_inner());
            match map.get(operation) {
                Some(e) if e.limit_by == limit_by => {
                    let g = e.limiter.set_conf(conf, now_ns(), alive)?;
                    released = Some((e.clone(), g));
                }
                old => {
                    let entry = Arc::new(LimitEntry {
                        operation: operation.to_string(),
                        limiter: Limiter::new(conf)?,
                        limit_by,
                        dead: AtomicUsize::new(0),
                        poll_at: AtomicU64::new(0),
                    });
                    // Keyed differently now: the old limiter's held tokens queue again under
                    // the new one (its running tokens release into the old one and are gone).
                    if let Some(old) = old {
                        moved = old.limiter.take_all();
                    }
                    map.insert(operation.to_string(), entry);
                }
            }
            self.any_limits.store(!map.is_empty(), Ordering::Relaxed);
        }
        if let Some((entry, g)) = released {
            self.after_grant_limit(py, &entry, g);
        }
        // (A settled one was counted off the pool bound when it was settled: just dropped.)
        for job in moved.into_iter().filter(alive) {
            job.get().with_gov(|g| g.held_at = None);
            let sh = job.get().rt.clone();
            advance(py, &sh, job, Stage::Limit, false);
        }
        Ok(())
    }

    /// The limit a token of `op` is under: the one set for it, else the one its decorator
    /// declares (registered on first use).
    fn limit_for(&self, py: Python<'_>, tok: &TaskToken) -> Option<Arc<LimitEntry>> {
        let decl = tok.op.policy.as_ref().and_then(|p| p.limit.as_ref());
        if decl.is_none() && !self.limits_set() {
            return None;
        }
        let name = op_key(py, tok);
        if let Some(e) = self
            .limits
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            return Some(e.clone());
        }
        let decl = decl?;
        let mut map = self.limits.write().unwrap_or_else(|e| e.into_inner());
        let entry = map
            .entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(LimitEntry {
                    operation: name.to_string(),
                    limiter: Limiter::new(decl.conf).expect("validated"),
                    limit_by: decl.limit_by.clone(),
                    dead: AtomicUsize::new(0),
                    poll_at: AtomicU64::new(0),
                })
            })
            .clone();
        self.any_limits.store(true, Ordering::Relaxed);
        Some(entry)
    }

    /// Limits by operation, for `stats()`.
    pub fn limit_stats(&self) -> Vec<(String, Option<String>, LimitConf, LimiterStats)> {
        let map = self.limits.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<_> = map
            .values()
            .map(|e| {
                let mut st = e.limiter.stats();
                st.held = st.held.saturating_sub(e.dead.load(Ordering::Relaxed));
                (
                    e.operation.clone(),
                    e.limit_by.clone(),
                    e.limiter.conf(),
                    st,
                )
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn after_grant_limit(&self, py: Python<'_>, entry: &Arc<LimitEntry>, g: Granted<Job>) {
        let Granted { jobs, dead } = g;
        sub_sat(&entry.dead, dead.len());
        drop(dead); // counted off the pool bound when they were settled
        for j in jobs {
            grant(j.get(), PERMIT_LIMIT);
            advance(py, &j.get().rt.clone(), j, Stage::Tier, false);
        }
        if let Some(due) = entry.limiter.next_due() {
            self.poll_limit_at(entry, due);
        }
    }

    fn after_grant_tier(&self, py: Python<'_>, shared: &Arc<Shared>, t: usize, g: Granted<Job>) {
        let Granted { jobs, dead } = g;
        sub_sat(&self.tier_dead[t], dead.len());
        drop(dead); // counted off the pool bound when they were settled
        for j in jobs {
            grant(j.get(), PERMIT_TIER);
            enter(py, shared, j, false);
        }
    }

    /// Every token a limiter holds (the coordinator kills them: `stop(wait=False)`).
    pub fn take_held(&self) -> Vec<Job> {
        let mut out = Vec::new();
        for (l, dead) in self.tiers.iter().zip(&self.tier_dead) {
            out.extend(l.take_all());
            dead.store(0, Ordering::Relaxed);
        }
        let map = self.limits.read().unwrap_or_else(|e| e.into_inner());
        for e in map.values() {
            out.extend(e.limiter.take_all());
            e.dead.store(0, Ordering::Relaxed);
        }
        for j in &out {
            j.get().with_gov(|g| g.held_at = None);
        }
        out
    }

    /// The tokens waiting out a retry's delay (they stay scheduled: killed, they are dropped
    /// when their time comes).
    pub fn delayed(&self, py: Python<'_>) -> Vec<Job> {
        let mut out = Vec::new();
        self.timers.for_each(|item| {
            if let TimerItem::Retry(j) = item {
                out.push(j.clone_ref(py));
            }
        });
        out
    }

    /// Gives a token waiting outside the pool (for a permit, or for its retry delay) a new
    /// priority or weight: it enters the pool with them, and a limiter serves it in its new
    /// lane. False if no such token waits.
    pub fn retarget(&self, id: u64, prio: Option<Priority>, weight: Option<Weight>) -> bool {
        let is_it = |j: &Job| {
            let h = &j.get().header;
            h.id == id && h.state.load() == TokenState::Waiting
        };
        let map = self.limits.read().unwrap_or_else(|e| e.into_inner());
        let limiters = self.tiers.iter().chain(map.values().map(|e| &e.limiter));
        for l in limiters {
            // The header changes under the limiter's lock, as the job is found.
            let found = l.relane(
                |j| {
                    let hit = is_it(j);
                    if hit {
                        let h = &j.get().header;
                        if let Some(p) = prio {
                            h.set_priority(p);
                        }
                        if let Some(w) = weight {
                            h.set_weight(w);
                        }
                    }
                    hit
                },
                prio.map(|p| p as u8),
            );
            if found {
                return true;
            }
        }
        drop(map);
        let mut found = false;
        self.timers.for_each(|item| {
            if let TimerItem::Retry(j) = item {
                let h = &j.get().header;
                if h.id == id && h.state.load() == TokenState::Waiting {
                    if let Some(p) = prio {
                        h.set_priority(p);
                    }
                    if let Some(w) = weight {
                        h.set_weight(w);
                    }
                    found = true;
                }
            }
        });
        found
    }

    /// Calls `f` on each job waiting here (held by a storage tier or a limit, or waiting for
    /// its retry) until it returns false; returns false if `f` stopped it.
    pub fn visit_waiting(&self, mut f: impl FnMut(&Job) -> bool) -> bool {
        let mut go = |j: &Job| j.get().header.state.load() != TokenState::Waiting || f(j);
        let map = self.limits.read().unwrap_or_else(|e| e.into_inner());
        let limiters = self.tiers.iter().chain(map.values().map(|e| &e.limiter));
        for l in limiters {
            if !l.visit(&mut go) {
                return false;
            }
        }
        drop(map);
        let mut more = true;
        self.timers.for_each(|item| {
            if let TimerItem::Retry(j) = item {
                if more {
                    more = go(j);
                }
            }
        });
        more
    }

    /// Sets the permits of storage tier `tier`.
    pub fn set_tier_limit(
        &self,
        py: Python<'_>,
        shared: &Arc<Shared>,
        tier: &str,
        limit: usize,
    ) -> Result<(), String> {
        let t = TIERS
            .iter()
            .position(|(n, _)| n.eq_ignore_ascii_case(tier))
            .ok_or_else(|| {
                format!("storage tier must be one of 'SLOW', 'MODERATE', 'FAST', 'INSANE', got '{tier}'")
            })?;
        if limit == 0 {
            return Err(format!(
                "storage limit of {} must be at least 1, got 0",
                TIERS[t].0
            ));
        }
        let conf = LimitConf {
            per_key: None,
            total: Some(limit),
            rate: None,
        };
        let g = self.tiers[t].set_conf(conf, now_ns(), alive)?;
        self.after_grant_tier(py, shared, t, g);
        Ok(())
    }

    /// `stats()["storage"]`: per tier, its limit, running and held tokens and held waits.
    pub fn tier_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (i, (name, _)) in TIERS.iter().enumerate() {
            let l = &self.tiers[i];
            let mut st = l.stats();
            st.held = st
                .held
                .saturating_sub(self.tier_dead[i].load(Ordering::Relaxed));
            let td = stats_dict(py, &st)?;
            td.set_item("limit", l.conf().total)?;
            d.set_item(*name, td)?;
        }
        Ok(d)
    }

    /// `metrics()["storage"]`: per tier, its limit, running and held tokens, permits granted
    /// and their waits (per log2 bucket, immediate grants in the first; and their sum).
    pub fn tier_metrics<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (i, (name, _)) in TIERS.iter().enumerate() {
            let l = &self.tiers[i];
            let st = l.stats();
            let mut buckets = st.wait_hist;
            buckets[0] += st.granted.saturating_sub(st.delayed);
            let td = PyDict::new(py);
            td.set_item("limit", l.conf().total)?;
            td.set_item("running", st.holders)?;
            td.set_item(
                "held",
                st.held
                    .saturating_sub(self.tier_dead[i].load(Ordering::Relaxed)),
            )?;
            td.set_item("granted", st.granted)?;
            td.set_item("wait_buckets", buckets.to_vec())?;
            td.set_item("wait_sum", st.wait_ns_sum as f64 / 1e9)?;
            d.set_item(*name, td)?;
        }
        Ok(d)
    }

    /// `stats()["limits"]`: per limited operation, its limit and its figures.
    pub fn limits_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (op, by, conf, st) in self.limit_stats() {
            let od = stats_dict(py, &st)?;
            od.set_item("max_concurrency", conf.per_key)?;
            od.set_item("rate", conf.rate.as_ref().map(|r| r.per_second))?;
            od.set_item("burst", conf.rate.as_ref().map(|r| r.burst))?;
            od.set_item("limit_by", by)?;
            d.set_item(op, od)?;
        }
        Ok(d)
    }

    /// Adds a timer, starting the timer thread first if it is not running yet. If it cannot
    /// be started, a retry goes ahead at once and a deadline is not enforced (counted in
    /// `internal_errors`): nothing is left waiting for a timer that never fires.
    /// One pending poll per limit (the earliest needed): held tokens of a rate limit do not
    /// each put a timer on the heap.
    fn poll_limit_at(&self, entry: &Arc<LimitEntry>, due: u64) {
        let pending = entry.poll_at.load(Ordering::Acquire);
        if pending != 0 && pending <= due {
            return;
        }
        entry.poll_at.store(due.max(1), Ordering::Release);
        self.schedule(due, TimerItem::PollLimit(entry.clone()));
    }

    pub fn schedule(&self, due: u64, item: TimerItem) {
        let refused = if !self.thread_started.load(Ordering::Acquire) && !self.start_thread() {
            item
        } else {
            match self.timers.schedule(due, item, stale_item) {
                Ok(stale) => {
                    drop(stale);
                    return;
                }
                Err(item) => item, // stopped: the runtime is shutting down
            }
        };
        if let TimerItem::Retry(job) = refused {
            // Goes on at once; after a stop it is killed as stranded (`enter`).
            Python::attach(|py| {
                let sh = job.get().rt.clone();
                advance(py, &sh, job, Stage::Limit, true);
            });
        }
    }

    /// Runs the done callbacks and chain steps of a token the timer thread timed out on the
    /// callback thread (started on first use). If it cannot run there (stopped, or no thread
    /// could be started) they run here.
    fn defer_callbacks(
        &self,
        py: Python<'_>,
        tok: &Bound<'_, TaskToken>,
        listeners: Vec<Listener>,
    ) {
        let mut line = lock(&self.callbacks);
        if matches!(*line, CallbackLine::Idle) {
            let (tx, rx) = std::sync::mpsc::channel();
            if std::thread::Builder::new()
                .name("tokengate-callbacks".into())
                .spawn(move || callbacks_main(rx))
                .is_ok()
            {
                *line = CallbackLine::Open(tx);
            }
        }
        let item = (tok.clone().unbind(), listeners);
        let item = match &*line {
            CallbackLine::Open(tx) => match tx.send(item) {
                Ok(()) => return,
                Err(std::sync::mpsc::SendError(item)) => item,
            },
            _ => item,
        };
        drop(line);
        let _ = TaskToken::call_callbacks(item.0.bind(py), item.1);
    }

    /// Lets `schedule` start the timer thread of `shared` when it first needs it.
    pub fn bind(&self, shared: &Arc<Shared>) {
        let _ = self.runtime.set(Arc::downgrade(shared));
    }

    fn start_thread(&self) -> bool {
        let mut slot = lock(&self.thread);
        if self.thread_started.load(Ordering::Acquire) {
            return true;
        }
        let Some(shared) = self.runtime.get().and_then(Weak::upgrade) else {
            return false;
        };
        if self.timers.is_stopped() {
            return false;
        }
        let sh = shared.clone();
        match std::thread::Builder::new()
            .name("tokengate-timers".into())
            .spawn(move || timer_main(sh))
        {
            Ok(h) => {
                *slot = Some(h);
                self.thread_started.store(true, Ordering::Release);
                true
            }
            Err(_) => {
                shared.note_internal_error();
                false
            }
        }
    }

    /// Stops the timer thread (joined unless `join` is false: called from a worker, which
    /// it may be waiting for) and returns what it still held (the caller kills them).
    pub fn stop(&self, py: Python<'_>, join: bool) -> Vec<Job> {
        let left = self.timers.stop();
        // The callback thread ends once it has run what it was given (not joined: a callback
        // may be waiting for this very stop).
        *lock(&self.callbacks) = CallbackLine::Stopped;
        let handle = lock(&self.thread).take();
        // Not joined from the timer thread itself (a done callback it runs may stop the
        // coordinator): it exits on its own once it sees the timers stopped.
        let me = std::thread::current().id();
        if let Some(h) = handle.filter(|h| join && h.thread().id() != me) {
            py.detach(|| {
                let _ = h.join();
            });
        }
        let mut out = Vec::new();
        for item in left {
            match item {
                TimerItem::Retry(j) => out.push(j),
                TimerItem::Deadline(..) | TimerItem::PollLimit(_) => {}
            }
        }
        out.extend(self.take_held());
        out
    }
}

fn stats_dict<'py>(py: Python<'py>, st: &LimiterStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("running", st.holders)?;
    d.set_item("held", st.held)?;
    d.set_item("granted", st.granted)?;
    d.set_item("delayed", st.delayed)?;
    d.set_item("keys", st.keys)?;
    d.set_item("wait_seconds_total", st.wait_ns_sum as f64 / 1e9)?;
    d.set_item("wait_seconds_max", st.wait_ns_max as f64 / 1e9)?;
    d.set_item("wait_seconds_p95", st.wait_quantile(0.95))?;
    Ok(d)
}

fn alive(j: &Job) -> bool {
    j.get().header.state.load() == TokenState::Waiting
}

fn stale_item(item: &TimerItem) -> bool {
    match item {
        TimerItem::Deadline(j, _) => j.get().header.state.load().is_settled(),
        TimerItem::Retry(_) | TimerItem::PollLimit(_) => false,
    }
}

fn grant(tok: &TaskToken, bit: u8) {
    tok.with_gov(|g| {
        g.permits |= bit;
        g.held_at = None;
    });
    tok.header.state.set_flags(FLAG_PERMITS);
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Limit,
    Tier,
}

/// Takes the permits a WAITING (held) token needs from `stage` on, then lets it into the
/// mailboxes or pool; stops where a permit is not free (the limiter keeps the token).
fn advance(py: Python<'_>, shared: &Arc<Shared>, job: Job, stage: Stage, front: bool) {
    let gov = &shared.gov;
    let keep = job.clone_ref(py);
    let tok = keep.get();
    let mut job = job;
    if stage <= Stage::Limit {
        if let Some(entry) = gov.limit_for(py, tok) {
            let key = match &entry.limit_by {
                None => String::new(),
                Some(tag) => tag_value(py, tok, tag),
            };
            // Marked held before it may be: a release on another thread can grant it (and
            // clear the mark) as soon as the limiter has it.
            tok.with_gov(|g| {
                g.limit = Some((entry.clone(), key.clone()));
                g.held_at = Some(HeldAt::Limit(entry.clone()));
            });
            let lane = tok.header.priority() as u8;
            match entry.limiter.acquire_in_lane(&key, job, lane, now_ns()) {
                Admit::Now(j) => {
                    job = j;
                    grant(tok, PERMIT_LIMIT);
                }
                Admit::Held => {
                    if let Some(due) = entry.limiter.next_due() {
                        gov.poll_limit_at(&entry, due);
                    }
                    return;
                }
            }
        }
    }
    if let Some(speed) = tok.op.storage_speed {
        let t = (speed as usize).min(3);
        tok.with_gov(|g| {
            g.tier = Some(t);
            g.held_at = Some(HeldAt::Tier(t));
        });
        let lane = tok.header.priority() as u8;
        match gov.tiers[t].acquire_in_lane(op_key(py, tok), job, lane, now_ns()) {
            Admit::Now(j) => {
                job = j;
                grant(tok, PERMIT_TIER);
            }
            Admit::Held => return,
        }
    }
    enter(py, shared, job, front);
}

/// Into the mailboxes or pool; a token settled meanwhile gives its permits back. A token that
/// enters after the workers were told to stop (a retry or chain step of a token
/// that outlived `stop()`'s timeout) could never run: it is killed instead.
fn enter(py: Python<'_>, shared: &Arc<Shared>, job: Job, front: bool) {
    let keep = job.clone_ref(py);
    if !shared.sched.unhold(job, front) {
        release_permits(py, keep.bind(py));
        return;
    }
    if stranded(shared) {
        kill_stranded(py, shared, keep.bind(py));
    }
}

/// Whether a token coming up now (a retry, a chain step) must be killed rather than run: the
/// workers were told to stop, or a stop is killing everything that has not started.
fn stranded(shared: &Shared) -> bool {
    shared.sched.is_shutdown()
        || (shared.gov.killing.load(Ordering::Acquire) && shared.sched.is_closed())
}

/// Kills a token that can never run now (its permits go back), and tells its listeners.
pub(crate) fn kill_stranded(py: Python<'_>, shared: &Arc<Shared>, tok: &Bound<'_, TaskToken>) {
    if shared.sched.kill(&tok.get().header).is_ok() {
        drop(tok.get().take_call());
        settled(py, tok);
        let _ = TaskToken::notify_listeners(tok);
    }
}

/// The operation name, as a limiter key (borrowed from the interned str: no allocation).
fn op_key<'a>(py: Python<'a>, tok: &'a TaskToken) -> &'a str {
    tok.op.operation_type.bind(py).to_str().unwrap_or("")
}

/// The value of tag `tag` of a token, as a limit key ("" when it has none).
fn tag_value(py: Python<'_>, tok: &TaskToken, tag: &str) -> String {
    tok.op
        .tags
        .as_ref()
        .and_then(|t| t.bind(py).get_item(tag).ok().flatten())
        .map(|v| v.str().map(|s| s.to_string()).unwrap_or_default())
        .unwrap_or_default()
}

fn sub_sat(a: &AtomicUsize, n: usize) {
    if n > 0 {
        let _ = a.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            Some(v.saturating_sub(n))
        });
    }
}

/// A token that was not running was settled (killed, timed out): its permits go back, and if
/// a limiter holds it, that limiter counts it as dead until it reaches the head of its queue
/// (swept earlier when the dead are many, so their memory does not wait for a permit).
pub fn settled(py: Python<'_>, tok: &Bound<'_, TaskToken>) {
    let t = tok.get();
    give_back_probe(py, t);
    if let Some(at) = t.with_gov_if(|g| g.held_at.take()).flatten() {
        let shared = t.rt.clone();
        let (limiter, dead) = match &at {
            HeldAt::Limit(e) => (&e.limiter, &e.dead),
            HeldAt::Tier(i) => (&shared.gov.tiers[*i], &shared.gov.tier_dead[*i]),
        };
        let n = dead.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= 64 && n * 2 >= limiter.stats().held {
            let swept = limiter.purge(alive);
            sub_sat(dead, swept.len());
            drop(swept);
        }
    }
    release_permits(py, tok);
}

/// Gives back the breaker probe `t` holds, if any (a token that will not run).
pub fn give_back_probe(py: Python<'_>, t: &TaskToken) {
    if let Some(ticket) = t.with_gov_if(|g| g.probe.take()).flatten() {
        if let Some(gh) = t.rt.guard.as_ref() {
            gh.release_probe(py, &t.op, ticket);
        }
    }
}

/// Gives back the permits `tok` holds (once: whoever clears `FLAG_PERMITS` does it), which
/// admits the held tokens they go to.
pub fn release_permits(py: Python<'_>, tok: &Bound<'_, TaskToken>) {
    let t = tok.get();
    if !t.header.state.clear_flags(FLAG_PERMITS) {
        return;
    }
    let (permits, limit, tier) = t.with_gov(|g| {
        let p = std::mem::take(&mut g.permits);
        (p, g.limit.clone(), g.tier)
    });
    let shared = t.rt.clone();
    let now = now_ns();
    if permits & PERMIT_LIMIT != 0 {
        if let Some((entry, key)) = limit {
            let g = entry.limiter.release(&key, now, alive);
            shared.gov.after_grant_limit(py, &entry, g);
        }
    }
    if permits & PERMIT_TIER != 0 {
        if let Some(ti) = tier {
            let g = shared.gov.tiers[ti].release(op_key(py, t), now, alive);
            shared.gov.after_grant_tier(py, &shared, ti, g);
        }
    }
}

/// A governed token accepted outside the pool (`Scheduler::hold_new`, or `hold_accepted`
/// for a chain step): its deadline is scheduled, then it goes on to its permits.
pub fn submit_governed(py: Python<'_>, shared: &Arc<Shared>, tok: &Bound<'_, TaskToken>) {
    schedule_deadline(shared, tok, 0);
    advance(py, shared, tok.clone().unbind(), Stage::Limit, false);
}

fn secs_to_ns(s: f64) -> u64 {
    if s >= 1e9 {
        u64::MAX / 2
    } else {
        (s.max(0.0) * 1e9) as u64
    }
}

fn timer_main(shared: Arc<Shared>) {
    loop {
        let due = shared.gov.timers.wait_due(Duration::from_secs(1));
        if shared.gov.timers.is_stopped() {
            drop(due);
            return;
        }
        if due.is_empty() {
            continue;
        }
        let attached = Python::try_attach(|py| {
            for item in due {
                handle(py, &shared, item);
            }
        });
        if attached.is_none() {
            return; // the interpreter is finalizing
        }
    }
}

fn handle(py: Python<'_>, shared: &Arc<Shared>, item: TimerItem) {
    match item {
        TimerItem::Deadline(job, gen) => {
            let tok = job.bind(py);
            if tok.get().with_gov(|g| g.deadline_gen) == gen {
                on_deadline(py, shared, tok, gen);
            }
        }
        TimerItem::Retry(job) => advance(py, shared, job, Stage::Limit, true),
        TimerItem::PollLimit(entry) => {
            entry.poll_at.store(0, Ordering::Release);
            let g = entry.limiter.poll(now_ns(), alive);
            shared.gov.after_grant_limit(py, &entry, g);
        }
    }
}

/// A token's deadline passed: it times out (or, if it runs and its policy retries timeouts,
/// its attempt is abandoned and another one scheduled).
fn on_deadline(py: Python<'_>, shared: &Arc<Shared>, tok: &Bound<'_, TaskToken>, gen: u32) {
    let t = tok.get();
    let h = &t.header;
    let st = h.state.load();
    if st.is_settled() {
        return;
    }
    let recheck = || {
        shared.gov.schedule(
            now_ns() + FINISHING_RECHECK_NS,
            TimerItem::Deadline(tok.clone().unbind(), gen),
        )
    };
    if st == TokenState::Executing {
        if let Some(pol) = t.op.policy.as_ref().filter(|p| p.overlapping_attempts()) {
            let attempt = h.attempt();
            let err = timeout_error(py, t);
            if let Some(gh) = shared.guard.as_ref() {
                gh.on_timed_out(py, t, attempt); // before the breaker decides on a retry
            }
            if let Some(delay) = retry_delay(py, t, pol, err.bind(py), attempt) {
                match shared.sched.abandon_for_retry(h) {
                    Ok(()) => {
                        crate::observe::retried(py, t, &err, delay);
                        t.with_gov(|g| g.errors.push(err));
                        release_permits(py, tok);
                        schedule_retry(py, shared, tok, delay);
                    }
                    Err(true) => recheck(),
                    Err(false) => {}
                }
                return;
            }
        }
    }
    let attempt = h.attempt();
    match shared.sched.time_out(h) {
        Ok(from) => {
            if from != TokenState::Executing {
                drop(t.take_call());
                settled(py, tok);
            } else if let Some(gh) = shared.guard.as_ref() {
                gh.on_timed_out(py, t, attempt);
            }
            // Waiters are woken here; callbacks and chain steps run on the callback thread,
            // so one that waits cannot stall the other timers.
            let (threads, others) = t.settle_listeners(py);
            wake_threads(threads);
            if !others.is_empty() {
                shared.gov.defer_callbacks(py, tok, others);
            }
        }
        Err(true) => recheck(),
        Err(false) => {}
    }
}

/// The callback thread: runs what `defer_callbacks` hands it until the runtime stops.
fn callbacks_main(rx: std::sync::mpsc::Receiver<(Job, Vec<Listener>)>) {
    while let Ok((job, listeners)) = rx.recv() {
        let ran = Python::try_attach(|py| {
            let _ = TaskToken::call_callbacks(job.bind(py), listeners);
        });
        if ran.is_none() {
            return; // the interpreter is finalizing
        }
    }
}

fn timeout_error(py: Python<'_>, t: &TaskToken) -> Py<PyBaseException> {
    CoreError::TimedOut {
        id: t.header.id,
        operation: t.op.operation_type.bind(py).to_string(),
        seconds: t.op.policy.as_ref().and_then(|p| p.timeout).unwrap_or(0.0),
    }
    .into_pyerr(py)
    .into_value(py)
}

/// The delay before another attempt of `t` after attempt `attempt` raised `err`, or None
/// if the policy does not retry it (not retryable, retries used up, budget spent).
fn retry_delay(
    py: Python<'_>,
    t: &TaskToken,
    pol: &Policy,
    err: &Bound<'_, PyBaseException>,
    attempt: u32,
) -> Option<f64> {
    if attempt > pol.retries {
        return None;
    }
    if t.rt
        .guard
        .as_ref()
        .is_some_and(|gh| !gh.admits_retry(py, &t.op))
    {
        return None; // its breaker is not closed: no more attempts now
    }
    let retry_cls = crate::errors::error_class(py, "Retry").ok();
    let explicit = retry_cls
        .as_ref()
        .is_some_and(|c| err.is_instance(c).unwrap_or(false));
    let delay = if explicit {
        err.getattr("delay")
            .ok()
            .and_then(|d| d.extract::<Option<f64>>().ok().flatten())
    } else {
        None
    };
    if !explicit {
        if let Ok(c) = crate::errors::error_class(py, "TokenCancelled") {
            if err.is_instance(&c).unwrap_or(false) {
                return None;
            }
        }
        let is_timeout = crate::errors::error_class(py, "TokenTimeout")
            .is_ok_and(|c| err.is_instance(&c).unwrap_or(false));
        let matches = match &pol.retry_on {
            None => err.is_instance_of::<PyException>() && !is_timeout,
            Some(classes) => err.is_instance(classes.bind(py).as_any()).unwrap_or(false),
        };
        if !matches {
            return None;
        }
    }
    let delay = delay.unwrap_or_else(|| {
        backoff_delay(
            pol.backoff,
            pol.backoff_max,
            attempt,
            pol.jitter,
            unit_from(t.header.id ^ now_ns().rotate_left(17)),
        )
    });
    if let Some(budget) = pol.budget {
        let created = t.header.created_ns();
        let start_next = now_ns().saturating_add(secs_to_ns(delay));
        if start_next > created.saturating_add(secs_to_ns(budget)) {
            return None;
        }
    }
    Some(delay.max(0.0))
}

/// Sends a WAITING (held) token back to its permits after `delay` seconds, ahead of its lane.
fn schedule_retry(py: Python<'_>, shared: &Arc<Shared>, tok: &Bound<'_, TaskToken>, delay: f64) {
    let delay_ns = secs_to_ns(delay);
    schedule_deadline(shared, tok, delay_ns);
    if delay_ns == 0 {
        advance(py, shared, tok.clone().unbind(), Stage::Limit, true);
    } else {
        shared.gov.schedule(
            now_ns().saturating_add(delay_ns),
            TimerItem::Retry(tok.clone().unbind()),
        );
    }
}

/// Schedules the deadline of the token's next attempt: its timeout after `delay_ns` from now.
fn schedule_deadline(shared: &Arc<Shared>, tok: &Bound<'_, TaskToken>, delay_ns: u64) {
    let t = tok.get();
    let Some(timeout) = t.op.policy.as_ref().and_then(|p| p.timeout) else {
        return;
    };
    let gen = t.with_gov(|g| {
        g.deadline_gen += 1;
        g.deadline_gen
    });
    let due = now_ns()
        .saturating_add(delay_ns)
        .saturating_add(secs_to_ns(timeout));
    shared
        .gov
        .schedule(due, TimerItem::Deadline(tok.clone().unbind(), gen));
}

/// What the worker does with the outcome of attempt `attempt` of a governed token: retry it,
/// or store it and finish. Returns whether the token was finished here (its listeners are
/// then the caller's to notify).
pub fn end_attempt(
    py: Python<'_>,
    shared: &Arc<Shared>,
    core: usize,
    wi: usize,
    tok: &Bound<'_, TaskToken>,
    attempt: u32,
    outcome: Result<Py<PyAny>, Py<PyBaseException>>,
) -> EndOfAttempt {
    let t = tok.get();
    let h = &t.header;
    let Some(pol) = t.op.policy.as_ref() else {
        return EndOfAttempt::Store(outcome);
    };
    if pol.overlapping_attempts() {
        // An attempt abandoned for a newer one touches nothing of the token: its permits and
        // its state belong to the attempt that replaced it.
        if h.attempt() != attempt || !h.state.begin_finishing() {
            // Settled during this very attempt (timed out for good, killed): its own end.
            // Otherwise a newer attempt is pending or running: stale.
            if h.attempt() == attempt && h.state.load().is_settled() {
                shared.sched.discard(core, wi, h);
                return EndOfAttempt::Discarded;
            }
            shared.sched.discard_stale(core, wi, h);
            return EndOfAttempt::Stale;
        }
        if h.attempt() != attempt {
            h.state.clear_flags(FLAG_FINISHING);
            shared.sched.discard_stale(core, wi, h);
            return EndOfAttempt::Stale;
        }
    }
    if let Err(e) = &outcome {
        if let Some(delay) = retry_delay(py, t, pol, e.bind(py), attempt) {
            let Err(e) = outcome else { unreachable!() };
            let err = e.clone_ref(py);
            t.with_gov(|g| g.errors.push(e));
            h.state.clear_flags(FLAG_FINISHING);
            if shared.sched.retry(core, wi, h) {
                crate::observe::retried(py, t, &err, delay);
                release_permits(py, tok);
                schedule_retry(py, shared, tok, delay);
                return EndOfAttempt::Retried;
            }
            return EndOfAttempt::Discarded;
        }
        if pol.retries > 0 {
            t.with_gov(|g| g.errors.push(e.clone_ref(py)));
        }
    }
    EndOfAttempt::Store(outcome)
}

pub enum EndOfAttempt {
    /// Store this outcome and finish the token as usual.
    Store(Result<Py<PyAny>, Py<PyBaseException>>),
    /// Another attempt is scheduled; nothing to finish.
    Retried,
    /// The token was settled meanwhile; the result was dropped.
    Discarded,
    /// This attempt was abandoned for a newer one (its deadline passed and a retry started):
    /// the result is dropped and nothing of the token is touched.
    Stale,
}

/// Calls the policy's `on_exhausted(token)` once a token with retries failed for good.
pub fn after_failure(py: Python<'_>, tok: &Bound<'_, TaskToken>) {
    let Some(pol) = tok.get().op.policy.as_ref() else {
        return;
    };
    let Some(cb) = pol.on_exhausted.as_ref().filter(|_| pol.retries > 0) else {
        return;
    };
    if let Err(e) = cb.bind(py).call1((tok,)) {
        crate::token::log_raised(py, "on_exhausted callback", cb.bind(py), e);
    }
}

// ---- chains -------------------------------------------------------------------------------

/// `token.then(fn, *args, **options)`.
pub fn chain<'py>(
    parent: &Bound<'py, TaskToken>,
    func: Bound<'py, PyAny>,
    args: Bound<'py, PyTuple>,
    options: Option<Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, TaskToken>> {
    let py = parent.py();
    let p = parent.get();
    let shared = p.rt.clone();
    if shared.forked() {
        return Err(CoreError::Forked.into_pyerr(py));
    }
    let gf = py
        .import("tokengate.decorator")?
        .call_method1("_chain_target", (func, options))?;
    let gf = gf.cast_into::<crate::guarded::GuardedFunction>()?;
    let op = gf.get().op.clone();
    if shared.has_submit_check() {
        // What can be checked now (the function, the extra arguments) is checked now; the
        // parent's result, which comes first, is checked when the step is submitted.
        let mut items = vec![py.None().into_bound(py)];
        items.extend(args.iter());
        shared.check_submit(py, &op, &PyTuple::new(py, items)?, None)?;
    }
    let call = crate::token::Call::new(py, &op, args.unbind(), None)?;
    let id = shared.sched.next_id();
    let child = Bound::new(py, TaskToken::new(id, op, shared.clone(), call))?;
    if shared.sched.is_shutdown() {
        return Err(CoreError::NotRunning.into_pyerr(py));
    }
    shared.sched.accept_early();
    if shared.events.wants(crate::observe::CREATED) {
        crate::observe::emit(
            &shared.events,
            crate::observe::CREATED,
            child.get(),
            None,
            None,
        );
    }
    if let Err(Listener::Chain(c)) = p.add_listener(Listener::Chain(child.clone().unbind())) {
        continue_chain(parent, c.bind(py));
    }
    Ok(child)
}

/// The step before `child` settled: submit `child` with its result, or end it the same way.
pub fn continue_chain(parent: &Bound<'_, TaskToken>, child: &Bound<'_, TaskToken>) {
    // A step that ends without running ends its own next steps the same way: a work list, not
    // recursion, so a chain of any length cannot overflow the stack.
    let py = parent.py();
    let mut work = vec![(parent.clone(), child.clone())];
    while let Some((p, c)) = work.pop() {
        if !chain_step(&p, &c) {
            continue;
        }
        let (threads, others) = c.get().settle_listeners(py);
        wake_threads(threads);
        let mut callbacks = Vec::new();
        for l in others {
            match l {
                Listener::Chain(next) => work.push((c.clone(), next.bind(py).clone())),
                other => callbacks.push(other),
            }
        }
        let _ = TaskToken::call_callbacks(&c, callbacks);
    }
}

/// Submits `child` with `parent`'s result, or ends it the way `parent` ended; true if it was
/// ended here (its listeners are then the caller's to run).
fn chain_step(parent: &Bound<'_, TaskToken>, child: &Bound<'_, TaskToken>) -> bool {
    let py = parent.py();
    let p = parent.get();
    let c = child.get();
    let shared = c.rt.clone();
    match p.header.state.load() {
        TokenState::Completed => {
            let args = parent.call_method0("result").and_then(|result| {
                let mut items = vec![result];
                if let Some(extra) = c.clone_call(py) {
                    items.extend(extra.args.bind(py).iter());
                }
                PyTuple::new(py, items)
            });
            match args {
                Ok(t) => c.set_args(t.unbind()),
                Err(e) => return fail_outside(&shared, child, e.into_value(py)),
            }
            if c.header.state.load().is_settled() {
                return false; // killed while it waited for its parent
            }
            if shared.has_submit_check() {
                if let Some((a, kw)) = c.call_args(py) {
                    let kw = kw.as_ref().map(|k| k.bind(py));
                    if let Err(e) = shared.check_submit(py, &c.op, a.bind(py), kw) {
                        return fail_outside(&shared, child, e.into_value(py));
                    }
                }
            }
            if shared.has_attempt_hook() {
                c.with_gov(|g| g.previous = Some(parent.clone().unbind()));
            }
            if let Some(gh) = shared.guard.as_ref() {
                // A step passes its operation's breaker when it comes up (not its spike check).
                match gh.gate_step(py, &c.op) {
                    Ok(Some(ticket)) => c.with_gov(|g| g.probe = Some(ticket)),
                    Ok(None) => {}
                    Err(e) => return fail_outside(&shared, child, e.into_value(py)),
                }
            }
            if shared.gov.inline {
                run_inline(py, &shared, child, true);
            } else if stranded(&shared) {
                kill_stranded(py, &shared, child);
            } else if shared.sched.hold_accepted(&c.header) {
                submit_governed(py, &shared, child);
            } else {
                give_back_probe(py, c); // killed meanwhile (its settling found no probe yet)
            }
            false
        }
        TokenState::Failed => {
            let err = parent
                .call_method0("exception")
                .ok()
                .and_then(|e| e.cast_into::<PyBaseException>().ok())
                .map(Bound::unbind)
                .unwrap_or_else(|| {
                    crate::errors::internal_error_value(
                        py,
                        format!("token {} failed without an exception", p.header.id),
                    )
                });
            fail_outside(&shared, child, err)
        }
        TokenState::TimedOut => {
            c.with_gov(|g| g.upstream = Some(p.header.id));
            let ended = shared.sched.time_out(&c.header).is_ok();
            if ended {
                drop(c.take_call());
            }
            ended
        }
        parent_state => {
            // Killed (before or while it ran), or quarantined.
            c.with_gov(|g| {
                g.upstream = Some(p.header.id);
                g.upstream_quarantined = parent_state == TokenState::Quarantined;
            });
            let ended = shared.sched.kill(&c.header).is_ok();
            if ended {
                drop(c.take_call());
            }
            ended
        }
    }
}

/// Ends a CREATED (accepted early) token as FAILED with `err`, without running it; true if it
/// did (its listeners are the caller's to run).
fn fail_outside(
    shared: &Arc<Shared>,
    child: &Bound<'_, TaskToken>,
    err: Py<PyBaseException>,
) -> bool {
    let c = child.get();
    if !shared.sched.claim_outside(&c.header, true, false) {
        return false;
    }
    drop(c.take_call());
    c.set_outcome(Err(err));
    shared.sched.finish_outside(&c.header, false)
}

// ---- passthrough mode -------------------------------------------------------------------

/// Runs a token in the calling thread (passthrough mode): every attempt, its retries' delays
/// slept here; a timeout cannot interrupt the call, so a call that took longer than its
/// timeout ends TIMED_OUT with its result discarded.
pub fn run_inline(
    py: Python<'_>,
    shared: &Arc<Shared>,
    tok: &Bound<'_, TaskToken>,
    accepted: bool,
) {
    let t = tok.get();
    let h = &t.header;
    if !shared.sched.claim_outside(h, accepted, true) {
        give_back_probe(py, t);
        return;
    }
    // Each attempt has its own timeout, counted from its own start (after its delay).
    let mut started = now_ns();
    let timeout = t.op.policy.as_ref().and_then(|p| p.timeout);
    let mut late;
    let outcome = loop {
        let call = if t.op.policy.as_ref().is_some_and(|p| p.retries > 0) {
            t.clone_call(py)
        } else {
            t.take_call()
        };
        let guard = shared.guard.as_ref().map(|gh| (gh, gh.on_start(py, t)));
        let started_at = started;
        let outcome = match call {
            None => Err(crate::errors::internal_error_value(
                py,
                format!("token {} has no call to run", h.id),
            )),
            Some(call) => crate::runtime::with_inline_current(tok, || {
                // A retry runs at once in its caller after its delay: it never queued.
                let queued = if h.attempt() > 1 {
                    started_at
                } else {
                    h.created_ns()
                };
                crate::observe::started(t, queued);
                crate::observe::call_attempt(py, tok, &call)
                    .map(Bound::unbind)
                    .map_err(|e| e.into_value(py))
            }),
        };
        // A call that ran past its timeout ends TIMED_OUT (its result is dropped): decided once,
        // here, for the Guard House and the token alike.
        late = timeout.is_some_and(|s| now_ns().saturating_sub(started_at) > secs_to_ns(s));
        if let Some((gh, started)) = guard {
            // Calls run in their caller have no core: their records go to the first shard.
            gh.on_end(py, started, 0, 0, tok, h.attempt(), &outcome, late);
        }
        let (Err(e), Some(pol)) = (&outcome, t.op.policy.as_ref()) else {
            break outcome;
        };
        if h.state.load().is_settled() {
            break outcome; // killed while it ran: no further attempt
        }
        match retry_delay(py, t, pol, e.bind(py), h.attempt()) {
            Some(delay) => {
                let Err(e) = outcome else { unreachable!() };
                crate::observe::retried(py, t, &e, delay);
                t.with_gov(|g| g.errors.push(e));
                if delay > 0.0 {
                    py.detach(|| std::thread::sleep(Duration::from_secs_f64(delay)));
                }
                shared.sched.count_outside_retry();
                h.next_attempt();
                started = now_ns();
                h.stamp_started(started);
            }
            None => {
                if pol.retries > 0 {
                    t.with_gov(|g| g.errors.push(e.clone_ref(py)));
                }
                break outcome;
            }
        }
    };
    drop(t.take_call());
    let settled_here = if late && shared.sched.time_out(h).is_ok() {
        shared.sched.finish_outside(h, false);
        true
    } else {
        let ok = outcome.is_ok();
        t.set_outcome(outcome);
        let finished = shared.sched.finish_outside(h, ok);
        if !ok {
            after_failure(py, tok);
        }
        finished
    };
    if settled_here {
        let _ = TaskToken::notify_listeners(tok);
    } else {
        // Killed while it ran: whoever killed it settled it and told its listeners; anything
        // that joined them since is told here.
        let (threads, callbacks) = t.take_listeners();
        wake_threads(threads);
        let _ = TaskToken::call_callbacks(tok, callbacks);
    }
}
