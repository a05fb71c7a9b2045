//! The scheduler: token pool, gate, per-worker mailboxes, routing, stealing, parking and
//! counters. Pure Rust and generic over the job type, so `cargo test` drives it with plain
//! Rust jobs; the PyO3 layer (`runtime.rs`) supplies Python tokens and the worker threads.
//!
//! Flow of one job: `try_submit` → (gate) → straight into the least-loaded mailbox of an
//! allowed core when no older job of its weight waits, else into the pool (FIFO per weight and
//! priority, bounded). Workers take from their own mailbox, refill it from the pool as room
//! frees, steal from siblings on the same core, spin briefly and then park.

use std::collections::VecDeque;
use std::sync::atomic::{fence, AtomicBool, AtomicI64, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use std::sync::{Condvar, Mutex};

use crossbeam_utils::sync::{Parker, Unparker};

use crate::clock::now_ns;
use crate::mailbox::Mailbox;
use crate::router::{self, Priority, Weight};
use crate::state::{Header, TokenState, TransitionError, FLAG_HELD};
use crate::sync::lock;

#[path = "growth.rs"]
pub mod growth;

/// Anything the scheduler can carry: it only needs the token header.
pub trait Job: Send + Sync + 'static {
    fn header(&self) -> &Header;

    /// The job was just admitted to a mailbox (before it is visible to any worker there), so
    /// an observer sees "admitted" before "started".
    #[inline]
    fn admitted(&self) {}
}

/// How a job enters a mailbox or the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    /// A new submission (CREATED): counted as accepted, refused at the bound.
    New,
    /// WAITING outside the pool (limiter, retry delay): never refused.
    Back,
}

impl Entry {
    fn from(self) -> TokenState {
        match self {
            Entry::Back => TokenState::Waiting,
            _ => TokenState::Created,
        }
    }
}

/// What a submission does when the pool is at its bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overflow {
    /// The caller waits for room (the binding releases the GIL while it waits).
    Block,
    /// The submission is refused with `PoolFull`.
    Reject,
}

#[derive(Clone, Debug)]
pub struct Config {
    /// Virtual cores to route over.
    pub cores: usize,
    /// Workers started per core.
    pub workers_per_core: usize,
    /// Worker slots per core (the most `set_active` may ask for).
    pub max_workers_per_core: usize,
    pub mailbox_capacity: usize,
    pub pool_capacity: usize,
    pub overflow: Overflow,
    /// The id of the first token (ids keep increasing across restarts of a coordinator).
    pub first_id: u64,
    /// Bytes of arguments that queued tokens may hold (None: no budget); see `reserve_bytes`.
    pub memory_budget: Option<u64>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cores: 1,
            workers_per_core: 4,
            max_workers_per_core: 64,
            mailbox_capacity: 120,
            pool_capacity: 100_000,
            overflow: Overflow::Block,
            first_id: 1,
            memory_budget: None,
        }
    }
}

impl Config {
    /// Checks every field; the message names the field, its value and what is valid.
    pub fn validate(&self) -> Result<(), String> {
        let check = |name: &str, v: usize, lo: usize, hi: usize| {
            if v < lo || v > hi {
                Err(format!("{name} must be between {lo} and {hi}, got {v}"))
            } else {
                Ok(())
            }
        };
        check("cores", self.cores, 1, 4096)?;
        check("max_workers_per_core", self.max_workers_per_core, 1, 1024)?;
        check(
            "workers_per_core",
            self.workers_per_core,
            1,
            self.max_workers_per_core,
        )?;
        check("mailbox_capacity", self.mailbox_capacity, 1, 1 << 24)?;
        check("pool_capacity", self.pool_capacity, 1, 1 << 40)?;
        if self.first_id == 0 || self.first_id > 1 << 62 {
            return Err(format!(
                "first_id must be between 1 and {}, got {}",
                1u64 << 62,
                self.first_id
            ));
        }
        Ok(())
    }
}

/// Why `try_submit` gave the job back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    /// Admission is closed (drain or stop).
    Closed,
    /// The pool is at `pool_capacity`.
    PoolFull,
    /// The queued tokens' arguments would exceed `memory_budget`.
    Budget,
}

#[derive(Debug)]
pub struct Rejected<J> {
    pub reason: RejectReason,
    pub job: J,
}

const GATE_PAUSED: u8 = 1;
const GATE_CLOSED: u8 = 2;
const GATE_SHUTDOWN: u8 = 4;

/// Jobs moved from the pool into a mailbox under one pool lock.
const REFILL_BATCH: usize = 32;
/// How long an idle worker may spin before parking, and how many spin at once.
const SPIN_FOR: Duration = Duration::from_micros(50);
const MAX_SPINNERS: usize = 1;
/// Safety net: a parked worker looks for work this often even if nobody wakes it.
const PARK_TIMEOUT: Duration = Duration::from_millis(100);
/// The same for a worker that receives no work (inactive, or a retired compensating worker):
/// it is woken explicitly when it becomes a target again.
const IDLE_PARK_TIMEOUT: Duration = Duration::from_secs(1);

/// `WorkerSlot::blocked` values.
const SLOT_RUNNABLE: u8 = 0;
/// Its thread waits inside a task (`get()`, `drain()`, a full pool) and gave its place away.
const SLOT_BLOCKED: u8 = 1;

/// What `Scheduler::block` did with the blocked worker's place.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Handoff {
    /// Slots whose thread must be started (already claimed; report a failure with
    /// `spawn_failed`).
    pub spawn: Vec<(usize, usize)>,
    /// False if the core had no free slot left: it runs one worker short while this waits.
    pub compensated: bool,
}

struct WorkerSlot<J> {
    mailbox: Mailbox<J>,
    /// Jobs queued in (or reserved for) this mailbox plus jobs this worker executes.
    load: AtomicUsize,
    parked: AtomicBool,
    spawned: AtomicBool,
    /// `SLOT_RUNNABLE` or `SLOT_BLOCKED`.
    blocked: AtomicU8,
    unparker: Unparker,
    parker: Mutex<Option<Parker>>,
    started: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    /// Attempts that ended without an outcome of their own: the token was settled meanwhile
    /// (timed out, killed while running) and the late result was discarded, or it failed
    /// and goes on to a retry.
    discarded: AtomicU64,
    retried: AtomicU64,
    /// On-demand growth and convergence figures (`growth.rs`), written only by this slot's
    /// thread.
    figures: growth::SlotFigures,
}

impl<J> WorkerSlot<J> {
    fn new(cap: usize) -> Self {
        let parker = Parker::new();
        WorkerSlot {
            mailbox: Mailbox::new(cap),
            load: AtomicUsize::new(0),
            parked: AtomicBool::new(false),
            spawned: AtomicBool::new(false),
            blocked: AtomicU8::new(SLOT_RUNNABLE),
            unparker: parker.unparker().clone(),
            parker: Mutex::new(Some(parker)),
            started: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            discarded: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            figures: growth::SlotFigures::default(),
        }
    }

    fn wake(&self) -> bool {
        fence(Ordering::SeqCst);
        if self.parked.load(Ordering::SeqCst) && self.parked.swap(false, Ordering::SeqCst) {
            self.unparker.unpark();
            true
        } else {
            false
        }
    }

    fn finished(&self) -> u64 {
        self.completed.load(Ordering::Acquire) + self.failed.load(Ordering::Acquire)
    }

    /// Attempts that ended on this worker, whatever became of their token (with `started`:
    /// whether it runs one now).
    pub(crate) fn ended(&self) -> u64 {
        self.finished()
            + self.discarded.load(Ordering::Acquire)
            + self.retried.load(Ordering::Acquire)
    }

    /// Not blocked, and a thread runs (or is being started for) it.
    #[inline]
    fn serves(&self) -> bool {
        self.blocked.load(Ordering::Acquire) == SLOT_RUNNABLE
            && self.spawned.load(Ordering::Acquire)
    }
}

struct CoreSlot<J> {
    workers: Box<[WorkerSlot<J>]>,
    active: AtomicUsize,
    /// Blocked slots (when 0, the targets are simply the first `active` slots).
    blocked: AtomicUsize,
    /// How often a blocked worker's place went to a compensating worker, and how often no
    /// slot was left for one.
    compensations: AtomicU64,
    uncompensated: AtomicU64,
    load: AtomicUsize,
    routed: [AtomicU64; 3],
    accepts: [bool; 3],
    /// How often (and by how many workers) `grow` raised `active` on demand.
    grown: AtomicU64,
    grown_workers: AtomicU64,
}

struct PoolQueues<J> {
    /// `[weight][priority]`
    lanes: [[VecDeque<J>; 3]; 3],
    len: usize,
}

impl<J: Job> PoolQueues<J> {
    fn new() -> Self {
        PoolQueues {
            lanes: Default::default(),
            len: 0,
        }
    }

    /// The lane holding the next job a core accepting `accepts` should take: highest priority
    /// first, then the oldest head (lowest id) across weights.
    fn best_lane(&self, accepts: &[bool; 3]) -> Option<(usize, usize)> {
        for p in 0..3 {
            let mut best: Option<(usize, u64)> = None;
            for (w, ok) in accepts.iter().enumerate() {
                if !ok {
                    continue;
                }
                if let Some(head) = self.lanes[w][p].front() {
                    let id = head.header().id;
                    if best.is_none_or(|(_, b)| id < b) {
                        best = Some((w, id));
                    }
                }
            }
            if let Some((w, _)) = best {
                return Some((w, p));
            }
        }
        None
    }
}

/// A snapshot of the counters. Gauges are derived from monotonic counters read from the end
/// of the pipeline backwards, so none is ever negative; at quiescence they are exact.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub created: u64,
    pub waiting: u64,
    pub admitted: u64,
    pub executing: u64,
    pub completed: u64,
    pub failed: u64,
    pub killed: u64,
    pub timed_out: u64,
    /// WAITING tokens outside the pool: held by a limiter or waiting out a retry delay.
    pub held: usize,
    /// Attempts that failed and were retried.
    pub retried: u64,
    /// Attempts whose late result was discarded (the token timed out or was killed while it
    /// ran).
    pub discarded: u64,
    /// Tokens re-prioritized or re-routed while queued.
    pub moved: u64,
    pub illegal_transitions: u64,
    pub pool_len: usize,
    pub per_core: Vec<CoreStats>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CoreStats {
    pub active_workers: usize,
    pub spawned_workers: usize,
    pub blocked_workers: usize,
    pub compensations: u64,
    pub uncompensated: u64,
    pub queue_depth: usize,
    pub executing: u64,
    pub load: usize,
    pub routed: [u64; 3],
    /// Tokens of its weights waiting in the pool (shared with other cores accepting them).
    pub pool_backlog: usize,
    /// Times `active` was raised on demand, and by how many workers in all.
    pub grown_on_demand: u64,
    pub grown_workers: u64,
    /// Nanoseconds its workers spent executing tokens (finished ones).
    pub busy_ns: u64,
    /// Submit-to-start waits of the tokens started here, in log2 microsecond buckets.
    pub wait_histogram: [u64; growth::WAIT_BUCKETS],
    /// The sum of those waits, in ns.
    pub wait_ns_sum: u64,
}

pub struct Scheduler<J> {
    cfg: Config,
    cores: Box<[CoreSlot<J>]>,
    pool: Mutex<PoolQueues<J>>,
    pool_len: AtomicUsize,
    pool_len_w: [AtomicUsize; 3],
    pool_cv: Condvar,
    pool_waiters: AtomicUsize,
    gate: AtomicU8,
    next_id: AtomicU64,
    in_submit: AtomicUsize,
    accepted: AtomicU64,
    to_pool: AtomicU64,
    direct: AtomicU64,
    pulled: AtomicU64,
    /// Running attempts abandoned by their deadline for a retry (`abandon_for_retry`).
    retried_outside: AtomicU64,
    /// Kills by the state they left: CREATED, WAITING, ADMITTED, EXECUTING (CANCELLING).
    killed_from: [AtomicU64; 4],
    /// Timeouts by the state they left: CREATED, WAITING, ADMITTED, EXECUTING.
    timed_out_from: [AtomicU64; 4],
    /// Tokens that ended outside any worker: run by their caller (passthrough mode), or
    /// failed with their parent's cause (a chain); counted as started and finished here.
    outside_completed: AtomicU64,
    outside_failed: AtomicU64,
    outside_started: AtomicU64,
    outside_discarded: AtomicU64,
    /// Live WAITING tokens outside the pool (limiter, retry delay), for the pool bound: added
    /// before a token is marked held, taken off when it leaves alive (`unhold`) or is settled
    /// there (`kill`, `time_out`), so it may dip below 0 for a moment (read clamped).
    held: AtomicI64,
    /// Entries into and live exits from that place (a killed or timed-out one just leaves).
    held_in: AtomicU64,
    held_out: AtomicU64,
    /// Held jobs settled (killed, timed out) while outside the pool.
    held_dead: AtomicU64,
    /// ADMITTED tokens sent back to the pool by a re-route.
    requeued: AtomicU64,
    moved: AtomicU64,
    illegal: AtomicU64,
    quiet_lock: Mutex<()>,
    quiet_cv: Condvar,
    quiet_waiters: AtomicUsize,
    spinners: AtomicUsize,
    /// Argument bytes of the queued tokens that are counted (see `reserve_bytes`).
    queued_bytes: AtomicU64,
    /// The growth monitor's park state (`growth.rs`).
    monitor: growth::MonitorPark,
}

impl<J: Job> Scheduler<J> {
    pub fn new(cfg: Config) -> Result<Self, String> {
        cfg.validate()?;
        let n = cfg.cores;
        let cores = (1..=n)
            .map(|c| CoreSlot {
                workers: (0..cfg.max_workers_per_core)
                    .map(|_| WorkerSlot::new(cfg.mailbox_capacity))
                    .collect(),
                active: AtomicUsize::new(cfg.workers_per_core),
                blocked: AtomicUsize::new(0),
                compensations: AtomicU64::new(0),
                uncompensated: AtomicU64::new(0),
                load: AtomicUsize::new(0),
                routed: Default::default(),
                accepts: router::weights_for_core(c, n),
                grown: AtomicU64::new(0),
                grown_workers: AtomicU64::new(0),
            })
            .collect();
        let first_id = cfg.first_id;
        Ok(Scheduler {
            cfg,
            cores,
            pool: Mutex::new(PoolQueues::new()),
            pool_len: AtomicUsize::new(0),
            pool_len_w: Default::default(),
            pool_cv: Condvar::new(),
            pool_waiters: AtomicUsize::new(0),
            gate: AtomicU8::new(0),
            next_id: AtomicU64::new(first_id),
            in_submit: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
            to_pool: AtomicU64::new(0),
            direct: AtomicU64::new(0),
            pulled: AtomicU64::new(0),
            killed_from: Default::default(),
            timed_out_from: Default::default(),
            retried_outside: AtomicU64::new(0),
            outside_completed: AtomicU64::new(0),
            outside_failed: AtomicU64::new(0),
            outside_started: AtomicU64::new(0),
            outside_discarded: AtomicU64::new(0),
            held: AtomicI64::new(0),
            held_in: AtomicU64::new(0),
            held_out: AtomicU64::new(0),
            held_dead: AtomicU64::new(0),
            requeued: AtomicU64::new(0),
            moved: AtomicU64::new(0),
            illegal: AtomicU64::new(0),
            quiet_lock: Mutex::new(()),
            quiet_cv: Condvar::new(),
            quiet_waiters: AtomicUsize::new(0),
            spinners: AtomicUsize::new(0),
            queued_bytes: AtomicU64::new(0),
            monitor: growth::MonitorPark::new(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn cores(&self) -> usize {
        self.cores.len()
    }

    /// A fresh token id (`first_id`, then increasing).
    #[inline]
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The id the next token will get.
    pub fn peek_next_id(&self) -> u64 {
        self.next_id.load(Ordering::Relaxed)
    }

    // ---- gate -------------------------------------------------------------------------

    pub fn is_paused(&self) -> bool {
        self.gate.load(Ordering::Acquire) & GATE_PAUSED != 0
    }
    pub fn is_closed(&self) -> bool {
        self.gate.load(Ordering::Acquire) & GATE_CLOSED != 0
    }
    pub fn is_shutdown(&self) -> bool {
        self.gate.load(Ordering::Acquire) & GATE_SHUTDOWN != 0
    }

    /// New jobs wait in the pool; admitted ones still run.
    pub fn pause(&self) {
        self.gate.fetch_or(GATE_PAUSED, Ordering::SeqCst);
    }

    /// Lets the pool feed mailboxes again and wakes every parked worker.
    pub fn unpause(&self) {
        self.gate.fetch_and(!GATE_PAUSED, Ordering::SeqCst);
        self.wake_all();
    }

    /// Refuses new submissions (`RejectReason::Closed`); blocked submitters return.
    pub fn close(&self) {
        self.gate.fetch_or(GATE_CLOSED, Ordering::SeqCst);
        self.notify_pool_waiters(true);
    }

    pub fn open(&self) {
        self.gate
            .fetch_and(!(GATE_CLOSED | GATE_SHUTDOWN), Ordering::SeqCst);
    }

    /// Workers exit once they find no work. Call after `close` and `wait_quiet`.
    pub fn shutdown(&self) {
        self.gate
            .fetch_or(GATE_SHUTDOWN | GATE_CLOSED, Ordering::SeqCst);
        self.notify_pool_waiters(true);
        self.wake_all();
        self.wake_monitor();
    }

    // ---- submission -------------------------------------------------------------------

    /// Accepts `job` into a mailbox or the pool, or gives it back with the reason.
    pub fn try_submit(&self, job: J) -> Result<(), Rejected<J>> {
        // Registered before the gate check so that `close` + `wait_quiet` cannot miss a
        // submission racing with it (both sides use SeqCst).
        self.in_submit.fetch_add(1, Ordering::SeqCst);
        let r = self.submit_inner(job);
        if self.in_submit.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.notify_quiet();
        }
        r
    }

    fn submit_inner(&self, job: J) -> Result<(), Rejected<J>> {
        let gate = self.gate.load(Ordering::SeqCst);
        if gate & GATE_CLOSED != 0 {
            return Err(Rejected {
                reason: RejectReason::Closed,
                job,
            });
        }
        let h = job.header();
        let w = h.weight() as usize;
        if gate & GATE_PAUSED == 0 && self.pool_len_w[w].load(Ordering::Acquire) == 0 {
            match self.route_direct(job, Entry::New, false) {
                Ok(_) => return Ok(()),
                Err(back) => return self.push_pool(back, Entry::New, false),
            }
        }
        self.push_pool(job, Entry::New, false)
    }

    /// Counts a token as accepted before it is submitted (a chain step, submitted when the
    /// step before it finishes), so that `wait_quiet` waits for it; submit it later with
    /// `hold_accepted` + `unhold`, or end it with `claim_outside(h, true)` or `kill`.
    pub fn accept_early(&self) {
        self.accepted.fetch_add(1, Ordering::AcqRel);
    }

    /// Into the least-loaded mailbox of the least-loaded allowed core, if any has room.
    /// `Ok(false)`: it was no longer in the state `entry` expects (killed or timed out
    /// meanwhile) and is dropped.
    fn route_direct(&self, job: J, entry: Entry, front: bool) -> Result<bool, J> {
        let h = job.header();
        let Some((core, wi)) = self.reserve_for(h) else {
            return Err(job);
        };
        let slot = &self.cores[core].workers[wi];
        let new = entry == Entry::New;
        match h.state.transition(entry.from(), TokenState::Admitted) {
            Ok(_) => {}
            Err(e) => {
                // Killed before it was submitted: it is accepted and already final.
                slot.mailbox.unreserve(1);
                self.note_transition_error(e);
                if new {
                    self.accepted.fetch_add(1, Ordering::AcqRel);
                }
                return Ok(false);
            }
        }
        self.admit_into(h, core, wi, now_ns());
        job.admitted();
        if new {
            self.accepted.fetch_add(1, Ordering::AcqRel);
        }
        self.direct.fetch_add(1, Ordering::AcqRel);
        let prio = h.priority();
        if front {
            slot.mailbox.push_reserved_front(job, prio);
        } else {
            slot.mailbox.push_reserved(job, prio);
        }
        slot.wake();
        Ok(true)
    }

    /// A reserved place in a mailbox of an allowed core: the least-loaded core first.
    fn reserve_for(&self, h: &Header) -> Option<(usize, usize)> {
        let n = self.cores.len();
        let weight = h.weight();
        let first = router::pick_core(weight, n, |c| {
            self.cores[c - 1].load.load(Ordering::Relaxed)
        });
        self.reserve_on_core(first - 1).or_else(|| {
            router::allowed_cores(weight, n)
                .filter(|&c| c != first)
                .find_map(|c| self.reserve_on_core(c - 1))
        })
    }

    /// Reserves a place in the least-loaded active worker's mailbox on `core` (0-based).
    fn reserve_on_core(&self, core: usize) -> Option<(usize, usize)> {
        let cs = &self.cores[core];
        let end = self.target_end(core);
        let cap = self.cfg.mailbox_capacity;
        for _ in 0..2 {
            let wi = router::pick_least_loaded(
                cs.workers[..end].iter().map(|w| {
                    if w.mailbox.len() >= cap || !w.serves() {
                        usize::MAX
                    } else {
                        w.load.load(Ordering::Relaxed)
                    }
                }),
                usize::MAX,
            )?;
            if cs.workers[wi].mailbox.try_reserve() {
                return Some((core, wi));
            }
        }
        None
    }

    /// Book-keeping for a job that just became ADMITTED to `(core, wi)`.
    fn admit_into(&self, h: &Header, core: usize, wi: usize, t: u64) {
        h.set_placement(core, wi);
        h.stamp_admitted(t);
        let cs = &self.cores[core];
        cs.routed[h.weight() as usize].fetch_add(1, Ordering::Relaxed);
        cs.load.fetch_add(1, Ordering::AcqRel);
        cs.workers[wi].load.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether the pool (with the WAITING tokens held outside it) is at its bound.
    fn pool_full(&self, pool: &mut PoolQueues<J>) -> bool {
        let cap = self.cfg.pool_capacity;
        if pool.len + self.held_now() < cap {
            return false;
        }
        Self::purge_dead(pool, &self.pool_len_w);
        self.pool_len.store(pool.len, Ordering::Release);
        pool.len + self.held_now() >= cap
    }

    /// Live tokens held outside the pool (see `held`).
    #[inline]
    fn held_now(&self) -> usize {
        self.held.load(Ordering::Acquire).max(0) as usize
    }

    /// Into the pool. A new job is refused at the bound; one accepted already is not.
    /// `front`: ahead of its lane (a retry).
    fn push_pool(&self, job: J, entry: Entry, front: bool) -> Result<(), Rejected<J>> {
        let h = job.header();
        let w = h.weight() as usize;
        let new = entry == Entry::New;
        {
            let mut pool = lock(&self.pool);
            if new && self.pool_full(&mut pool) {
                return Err(Rejected {
                    reason: RejectReason::PoolFull,
                    job,
                });
            }
            if entry != Entry::Back {
                let r = h.state.transition(TokenState::Created, TokenState::Waiting);
                if new {
                    self.accepted.fetch_add(1, Ordering::AcqRel);
                }
                if let Err(e) = r {
                    self.note_transition_error(e);
                    return Ok(());
                }
            } else if h.state.load() != TokenState::Waiting {
                return Ok(()); // settled while it came back: dropped
            }
            self.to_pool.fetch_add(1, Ordering::AcqRel);
            let lane = &mut pool.lanes[w][h.priority() as usize];
            if front {
                lane.push_front(job);
            } else {
                lane.push_back(job);
            }
            pool.len += 1;
            self.pool_len.store(pool.len, Ordering::Release);
            self.pool_len_w[w].fetch_add(1, Ordering::AcqRel);
        }
        if !self.is_paused() {
            self.wake_for_weight(Weight::ALL[w]);
        }
        Ok(())
    }

    // ---- outside the pool: limiters and retry delays ------------------------------------

    /// Accepts a new job that waits outside the pool (a limiter holds it): WAITING, counted
    /// against the pool bound. Refused when admission is closed or the pool is full.
    pub fn hold_new(&self, job: &J) -> Result<bool, RejectReason> {
        self.in_submit.fetch_add(1, Ordering::SeqCst);
        let r = self.hold_new_inner(job);
        if self.in_submit.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.notify_quiet();
        }
        r
    }

    fn hold_new_inner(&self, job: &J) -> Result<bool, RejectReason> {
        if self.is_closed() {
            return Err(RejectReason::Closed);
        }
        let h = job.header();
        {
            let mut pool = lock(&self.pool);
            if self.pool_full(&mut pool) {
                return Err(RejectReason::PoolFull);
            }
            self.accepted.fetch_add(1, Ordering::AcqRel);
            if !self.mark_held(h, TokenState::Created) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// A CREATED job counted by `accept_early` (a chain step whose parent completed) now
    /// waits outside the pool; false if it was settled meanwhile.
    pub fn hold_accepted(&self, h: &Header) -> bool {
        self.mark_held(h, TokenState::Created)
    }

    /// CREATED → WAITING outside the pool, counted (before the state changes, so a kill
    /// right after it finds the count to take off).
    fn mark_held(&self, h: &Header, from: TokenState) -> bool {
        self.held.fetch_add(1, Ordering::AcqRel);
        h.state.set_flags(FLAG_HELD);
        if let Err(e) = h.state.transition(from, TokenState::Waiting) {
            h.state.clear_flags(FLAG_HELD);
            self.held.fetch_sub(1, Ordering::AcqRel);
            self.note_transition_error(e);
            return false;
        }
        self.held_in.fetch_add(1, Ordering::AcqRel);
        true
    }

    /// Marks a running token held before it leaves EXECUTING for WAITING (a retry), counted.
    fn pre_hold(&self, h: &Header) {
        self.held.fetch_add(1, Ordering::AcqRel);
        h.state.set_flags(FLAG_HELD);
    }

    /// The transition `pre_hold` prepared did not happen: the count comes off, and the mark
    /// too unless the token went to WAITING anyway (the other side's retry won).
    fn undo_pre_hold(&self, h: &Header) {
        self.held.fetch_sub(1, Ordering::AcqRel);
        if h.state.load() != TokenState::Waiting {
            h.state.clear_flags(FLAG_HELD);
        }
    }

    /// A job that waited outside the pool goes on into a mailbox or the pool (ahead of its
    /// lane if `front`), whatever the gate and bound say: it was accepted already. A job that
    /// was settled meanwhile is dropped. Returns whether it went on.
    pub fn unhold(&self, job: J, front: bool) -> bool {
        let h = job.header();
        if !h.state.leave_held() {
            return false; // settled while held: counted off by `kill`/`time_out` already
        }
        self.held.fetch_sub(1, Ordering::AcqRel);
        self.held_out.fetch_add(1, Ordering::AcqRel);
        let w = h.weight() as usize;
        // A due retry goes ahead of everything queued in its lane: the front of a mailbox's
        // lane (ahead of the pool too, which only feeds mailboxes behind it).
        if !self.is_paused() && (front || self.pool_len_w[w].load(Ordering::Acquire) == 0) {
            match self.route_direct(job, Entry::Back, front) {
                Ok(went) => return went,
                Err(back) => return self.push_pool(back, Entry::Back, front).is_ok(),
            }
        }
        self.push_pool(job, Entry::Back, front).is_ok()
    }

    /// Drops pool entries that were killed while waiting.
    fn purge_dead(pool: &mut PoolQueues<J>, len_w: &[AtomicUsize; 3]) {
        let mut removed = 0;
        for (w, lanes) in pool.lanes.iter_mut().enumerate() {
            for lane in lanes.iter_mut() {
                let before = lane.len();
                lane.retain(|j| j.header().state.load() == TokenState::Waiting);
                let gone = before - lane.len();
                len_w[w].fetch_sub(gone, Ordering::AcqRel);
                removed += gone;
            }
        }
        pool.len -= removed;
    }

    /// Waits (blocking: call it with the GIL released) until the pool has room, admission
    /// closes, a kill may have freed room, or `timeout` passes. Returns whether there is room.
    /// Counts `n` more bytes of queued arguments against the budget; false if they do not
    /// fit (a token alone larger than the whole budget still fits when nothing is counted,
    /// so it is not refused for ever). Always true without a budget.
    pub fn reserve_bytes(&self, n: u64) -> bool {
        let Some(budget) = self.cfg.memory_budget else {
            return true;
        };
        let mut cur = self.queued_bytes.load(Ordering::Acquire);
        loop {
            if cur > 0 && cur.saturating_add(n) > budget {
                return false;
            }
            match self.queued_bytes.compare_exchange_weak(
                cur,
                cur + n,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(seen) => cur = seen,
            }
        }
    }

    /// Gives back bytes counted by `reserve_bytes` (the token's arguments were released).
    pub fn release_bytes(&self, n: u64) {
        if n > 0 {
            self.queued_bytes.fetch_sub(n, Ordering::AcqRel);
            self.notify_pool_waiters(true);
        }
    }

    /// Waits (GIL released) until `n` more bytes fit the budget, admission closes, or
    /// `timeout` passes.
    pub fn wait_budget(&self, n: u64, timeout: Duration) {
        let Some(budget) = self.cfg.memory_budget else {
            return;
        };
        self.pool_waiters.fetch_add(1, Ordering::SeqCst);
        let pool = lock(&self.pool);
        let cur = self.queued_bytes.load(Ordering::Acquire);
        if cur > 0 && cur.saturating_add(n) > budget && !self.is_closed() {
            drop(
                self.pool_cv
                    .wait_timeout(pool, timeout)
                    .unwrap_or_else(|e| e.into_inner()),
            );
        } else {
            drop(pool);
        }
        self.pool_waiters.fetch_sub(1, Ordering::SeqCst);
    }

    /// Bytes of queued arguments counted against the budget.
    pub fn queued_bytes(&self) -> u64 {
        self.queued_bytes.load(Ordering::Acquire)
    }

    pub fn wait_pool_room(&self, timeout: Duration) -> bool {
        self.pool_waiters.fetch_add(1, Ordering::SeqCst);
        let mut pool = lock(&self.pool);
        let full = |len: usize| len + self.held_now() >= self.cfg.pool_capacity;
        if full(pool.len) && !self.is_closed() {
            pool = self
                .pool_cv
                .wait_timeout(pool, timeout)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let room = !full(pool.len);
        drop(pool);
        self.pool_waiters.fetch_sub(1, Ordering::SeqCst);
        room
    }

    fn notify_pool_waiters(&self, take_lock: bool) {
        if self.pool_waiters.load(Ordering::SeqCst) > 0 {
            if take_lock {
                drop(lock(&self.pool));
            }
            self.pool_cv.notify_all();
        }
    }

    // ---- the worker side --------------------------------------------------------------

    /// Hands the parker of worker `(core, wi)` to the thread that will run it (once).
    pub fn take_parker(&self, core: usize, wi: usize) -> Option<Parker> {
        lock(&self.cores[core].workers[wi].parker).take()
    }

    /// Marks slot `(core, wi)` as having a thread; false if it already had one.
    pub fn claim_spawn(&self, core: usize, wi: usize) -> bool {
        !self.cores[core].workers[wi]
            .spawned
            .swap(true, Ordering::AcqRel)
    }

    /// Gives slot `(core, wi)` back after its thread could not be started.
    pub fn unclaim_spawn(&self, core: usize, wi: usize) {
        self.cores[core].workers[wi]
            .spawned
            .store(false, Ordering::Release);
    }

    fn check_active(&self, core: usize, n: usize) -> Result<&CoreSlot<J>, String> {
        let cs = self.cores.get(core).ok_or_else(|| {
            format!(
                "core must be between 1 and {}, got {}",
                self.cores.len(),
                core + 1
            )
        })?;
        if n < 1 || n > cs.workers.len() {
            return Err(format!(
                "active workers must be between 1 and {} (max_workers_per_core), got {n}",
                cs.workers.len()
            ));
        }
        Ok(cs)
    }

    /// The slots of 0-based `core` that need a thread before `n` of them can receive work
    /// (`claim_spawn` is done for them; `unclaim_spawn` those whose thread fails to start).
    /// Call `set_active` once the threads exist, so no token is routed to a slot without one.
    pub fn claim_for_active(&self, core: usize, n: usize) -> Result<Vec<(usize, usize)>, String> {
        self.check_active(core, n)?;
        let mut out = Vec::new();
        let mut seen = 0;
        for wi in 0..self.cores[core].workers.len() {
            if seen == n {
                break;
            }
            if self.cores[core].workers[wi].blocked.load(Ordering::Acquire) != SLOT_RUNNABLE {
                continue; // a blocked slot has its thread and is not a target
            }
            seen += 1;
            if self.claim_spawn(core, wi) {
                out.push((core, wi));
            }
        }
        Ok(out)
    }

    /// Sets how many workers of 0-based `core` receive work (their threads must exist).
    pub fn set_active(&self, core: usize, n: usize) -> Result<(), String> {
        let cs = self.check_active(core, n)?;
        cs.active.store(n, Ordering::Release);
        self.wake_all();
        Ok(())
    }

    pub fn active(&self, core: usize) -> usize {
        self.cores[core].active.load(Ordering::Acquire)
    }

    /// The next job for worker `(core, wi)` without blocking: its own mailbox (refilled from
    /// the pool as room frees), then a sibling's on the same core.
    pub fn next_job(&self, core: usize, wi: usize) -> Option<J> {
        let slot = &self.cores[core].workers[wi];
        if let Some(j) = slot.mailbox.pop() {
            self.refill(core, wi);
            return Some(j);
        }
        if self.refill(core, wi) > 0 {
            if let Some(j) = slot.mailbox.pop() {
                return Some(j);
            }
        }
        self.steal(core, wi)
    }

    /// One past the last slot of `core` that receives work: the first `active` slots that
    /// serve (not blocked, with a thread) lie below it. Without blocked workers these are the
    /// first `active` slots, whose threads `set_active` made sure of.
    #[inline]
    fn target_end(&self, core: usize) -> usize {
        let cs = &self.cores[core];
        let active = cs.active.load(Ordering::Acquire).min(cs.workers.len());
        if cs.blocked.load(Ordering::Acquire) == 0 {
            return active;
        }
        let mut n = 0;
        for (i, w) in cs.workers.iter().enumerate() {
            if w.serves() {
                n += 1;
                if n >= active {
                    return i + 1;
                }
            }
        }
        cs.workers.len()
    }

    /// Whether worker `(core, wi)` receives work (routing, refill from the pool, stealing).
    #[inline]
    pub fn is_target(&self, core: usize, wi: usize) -> bool {
        wi < self.target_end(core) && self.cores[core].workers[wi].serves()
    }

    fn may_pull(&self, core: usize, wi: usize) -> bool {
        let cs = &self.cores[core];
        self.is_target(core, wi)
            && !self.is_paused()
            && (0..3).any(|w| cs.accepts[w] && self.pool_len_w[w].load(Ordering::Acquire) > 0)
    }

    /// Moves up to a batch of waiting jobs this core accepts into the worker's mailbox.
    fn refill(&self, core: usize, wi: usize) -> usize {
        if self.pool_len.load(Ordering::Acquire) == 0 || !self.may_pull(core, wi) {
            return 0;
        }
        let cs = &self.cores[core];
        let slot = &cs.workers[wi];
        let reserved = slot.mailbox.try_reserve_many(REFILL_BATCH);
        if reserved == 0 {
            return 0;
        }
        let mut moved: Vec<(J, Priority)> = Vec::with_capacity(reserved);
        let mut admitted = 0u64;
        let t = now_ns();
        {
            let mut pool = lock(&self.pool);
            while moved.len() < reserved {
                let Some((w, p)) = pool.best_lane(&cs.accepts) else {
                    break;
                };
                let job = pool.lanes[w][p]
                    .pop_front()
                    .expect("best_lane is non-empty");
                pool.len -= 1;
                self.pool_len_w[w].fetch_sub(1, Ordering::AcqRel);
                let h = job.header();
                // A job killed while it waited stays dead; it is discarded when popped.
                if h.state
                    .transition(TokenState::Waiting, TokenState::Admitted)
                    .is_ok()
                {
                    self.admit_into(h, core, wi, t);
                    job.admitted();
                    admitted += 1;
                } else {
                    cs.load.fetch_add(1, Ordering::AcqRel);
                    slot.load.fetch_add(1, Ordering::AcqRel);
                }
                let prio = h.priority();
                moved.push((job, prio));
            }
            self.pool_len.store(pool.len, Ordering::Release);
            self.pulled.fetch_add(admitted, Ordering::AcqRel);
        }
        self.notify_pool_waiters(false);
        let n = moved.len();
        slot.mailbox.unreserve(reserved - n);
        slot.mailbox.push_reserved_all(moved);
        n
    }

    fn steal(&self, core: usize, wi: usize) -> Option<J> {
        let cs = &self.cores[core];
        if !self.is_target(core, wi) {
            return None; // an inactive worker only finishes its own mailbox
        }
        for (vi, victim) in cs.workers.iter().enumerate() {
            if vi == wi || victim.mailbox.is_empty() {
                continue;
            }
            if let Some(j) = victim.mailbox.pop() {
                victim.load.fetch_sub(1, Ordering::AcqRel);
                cs.workers[wi].load.fetch_add(1, Ordering::AcqRel);
                if j.header().state.load() == TokenState::Admitted {
                    j.header().set_placement(core, wi);
                }
                return Some(j);
            }
        }
        None
    }

    fn has_work_for(&self, core: usize, wi: usize) -> bool {
        let cs = &self.cores[core];
        !cs.workers[wi].mailbox.is_empty()
            || (self.pool_len.load(Ordering::Acquire) > 0 && self.may_pull(core, wi))
            || (self.is_target(core, wi) && cs.workers.iter().any(|w| !w.mailbox.is_empty()))
    }

    /// Blocks until worker `(core, wi)` has a job (call it with the GIL released). Spins
    /// briefly (one spinner at a time), then parks. `None` once the scheduler shuts down and
    /// no work is left for this worker.
    pub fn wait_for_work(&self, core: usize, wi: usize, parker: &Parker) -> Option<J> {
        let slot = &self.cores[core].workers[wi];
        let mut slept = false;
        loop {
            if let Some(j) = self.next_job(core, wi) {
                if slept {
                    self.wake_monitor(); // work after a pause: the monitor may be parked
                }
                return Some(j);
            }
            if self.is_shutdown() {
                return None;
            }
            // Spin only where it pays: a target on a core without waiting tasks (there,
            // woken compensating workers would burn the CPU the running ones need).
            let may_spin =
                self.cores[core].blocked.load(Ordering::Acquire) == 0 && self.is_target(core, wi);
            if may_spin && self.spinners.fetch_add(1, Ordering::AcqRel) < MAX_SPINNERS {
                let until = Instant::now() + SPIN_FOR;
                let mut found = false;
                while Instant::now() < until {
                    for _ in 0..64 {
                        std::hint::spin_loop();
                    }
                    if self.has_work_for(core, wi) || self.is_shutdown() {
                        found = true;
                        break;
                    }
                }
                self.spinners.fetch_sub(1, Ordering::AcqRel);
                if found {
                    continue;
                }
            } else if may_spin {
                self.spinners.fetch_sub(1, Ordering::AcqRel);
            }
            slot.parked.store(true, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if self.has_work_for(core, wi) || self.is_shutdown() {
                slot.parked.store(false, Ordering::SeqCst);
                continue;
            }
            parker.park_timeout(if self.is_target(core, wi) {
                PARK_TIMEOUT
            } else {
                IDLE_PARK_TIMEOUT
            });
            slot.parked.store(false, Ordering::SeqCst);
            slept = true;
        }
    }

    /// EXECUTING if the job is still ADMITTED (a new attempt is counted); false (and the job
    /// is discarded) if it was killed or timed out meanwhile.
    pub fn start(&self, core: usize, wi: usize, h: &Header) -> bool {
        // Counted first, so a worker still running an earlier attempt that sees EXECUTING
        // also sees that the attempt is no longer its own.
        h.next_attempt();
        match h
            .state
            .transition(TokenState::Admitted, TokenState::Executing)
        {
            Ok(_) => {
                let t = now_ns();
                h.stamp_started(t);
                let slot = &self.cores[core].workers[wi];
                slot.figures.note_start(t, h.created_ns());
                slot.started.fetch_add(1, Ordering::AcqRel);
                true
            }
            Err(e) => {
                h.undo_attempt();
                self.note_transition_error(e);
                self.release(core, wi);
                false
            }
        }
    }

    /// COMPLETED (`ok`) or FAILED; returns the flags the state carried, or `None` if the token
    /// was not EXECUTING (it was settled while it ran: the result is discarded, and a
    /// CANCELLING token becomes KILLED). The worker still counts as loaded until `release`
    /// (after done callbacks), so a worker stuck in a callback gets no new work.
    pub fn finish(&self, core: usize, wi: usize, h: &Header, ok: bool) -> Option<u8> {
        let to = if ok {
            TokenState::Completed
        } else {
            TokenState::Failed
        };
        let r = h.state.transition(TokenState::Executing, to);
        let slot = &self.cores[core].workers[wi];
        let flags = match r {
            Ok(flags) => {
                let t = now_ns();
                h.stamp_finished(t);
                slot.figures.note_finish(t, h.started_ns());
                if ok {
                    slot.completed.fetch_add(1, Ordering::AcqRel);
                } else {
                    slot.failed.fetch_add(1, Ordering::AcqRel);
                }
                Some(flags)
            }
            Err(e) => {
                self.discard(core, wi, h);
                if let TransitionError::Illegal { .. } = e {
                    self.note_transition_error(e);
                }
                None
            }
        };
        self.notify_quiet();
        flags
    }

    /// The attempt that ran on `(core, wi)` ended after its token was settled (or moved on to
    /// another attempt): its result is dropped; a CANCELLING token becomes KILLED.
    pub fn discard(&self, core: usize, wi: usize, h: &Header) {
        let slot = &self.cores[core].workers[wi];
        slot.figures.note_finish(now_ns(), h.started_ns());
        slot.discarded.fetch_add(1, Ordering::AcqRel);
        let _ = h
            .state
            .transition(TokenState::Cancelling, TokenState::Killed);
        self.notify_quiet();
    }

    /// The attempt that ran on `(core, wi)` had been abandoned for a newer one: only counted
    /// (the token's state belongs to the newer attempt).
    pub fn discard_stale(&self, core: usize, wi: usize, h: &Header) {
        let slot = &self.cores[core].workers[wi];
        slot.figures.note_finish(now_ns(), h.started_ns());
        slot.discarded.fetch_add(1, Ordering::AcqRel);
        self.notify_quiet();
    }

    /// The attempt that ran on `(core, wi)` failed and the token gets another: WAITING, held
    /// outside the pool (the caller brings it back with `unhold`). False if it was settled
    /// meanwhile (the attempt is then discarded).
    pub fn retry(&self, core: usize, wi: usize, h: &Header) -> bool {
        // Marked held first: a waiter must not run it inline while it waits for its delay.
        self.pre_hold(h);
        match h
            .state
            .transition(TokenState::Executing, TokenState::Waiting)
        {
            Ok(_) => {
                let slot = &self.cores[core].workers[wi];
                slot.figures.note_finish(now_ns(), h.started_ns());
                slot.retried.fetch_add(1, Ordering::AcqRel);
                self.held_in.fetch_add(1, Ordering::AcqRel);
                true
            }
            Err(_) => {
                self.undo_pre_hold(h);
                self.discard(core, wi, h);
                false
            }
        }
    }

    /// The deadline of the token passed: TIMED_OUT from any state that is not settled (and
    /// not in the middle of storing its outcome). Returns the state it left; `Err(true)` if
    /// it is storing its outcome right now (look again a moment later).
    pub fn time_out(&self, h: &Header) -> Result<TokenState, bool> {
        let (from, flags) = h
            .state
            .settle(TokenState::TimedOut, |st| !st.is_settled())
            .map_err(|(_, finishing)| finishing)?;
        if from == TokenState::Waiting && flags & FLAG_HELD != 0 {
            self.held_dead.fetch_add(1, Ordering::AcqRel);
            self.held.fetch_sub(1, Ordering::AcqRel);
        }
        self.count_settled(&self.timed_out_from, from, h);
        Ok(from)
    }

    /// The deadline of a running attempt passed and the policy retries timeouts: WAITING
    /// (held outside the pool; the caller brings it back with `unhold`) while the old attempt's thread
    /// may still run (its worker discards its result). `Err(true)`: it is storing its outcome
    /// right now (look again a moment later).
    pub fn abandon_for_retry(&self, h: &Header) -> Result<(), bool> {
        self.pre_hold(h);
        match h
            .state
            .settle(TokenState::Waiting, |s| s == TokenState::Executing)
        {
            Ok(_) => {
                self.retried_outside.fetch_add(1, Ordering::AcqRel);
                self.held_in.fetch_add(1, Ordering::AcqRel);
                Ok(())
            }
            Err((_, finishing)) => {
                self.undo_pre_hold(h);
                Err(finishing)
            }
        }
    }

    /// A running token is killed: CANCELLING (its waiters are released; the worker discards
    /// the late result). Err: it is not running (or is storing its outcome).
    pub fn cancel_running(&self, h: &Header) -> Result<(), TokenState> {
        h.state
            .settle(TokenState::Cancelling, |st| st == TokenState::Executing)
            .map_err(|(st, _)| st)?;
        self.count_settled(&self.killed_from, TokenState::Executing, h);
        Ok(())
    }

    /// Counts a token settled (killed, timed out) from state `from`, stamps its end, and
    /// wakes whoever waits for pool room (a WAITING one frees its place) or quiescence.
    fn count_settled(&self, by_state: &[AtomicU64; 4], from: TokenState, h: &Header) {
        h.stamp_finished(now_ns());
        let idx = match from {
            TokenState::Created => 0,
            TokenState::Waiting => 1,
            TokenState::Admitted => 2,
            _ => 3,
        };
        by_state[idx].fetch_add(1, Ordering::AcqRel);
        if from == TokenState::Waiting {
            self.notify_pool_waiters(true);
        }
        self.notify_quiet();
    }

    /// Claims a CREATED token to run or end it outside any worker (passthrough mode, a chain
    /// step failing with its parent's cause): EXECUTING. `accepted`: it was counted by
    /// `accept_early`. Pair with `finish_outside`.
    /// `run`: it runs (an attempt is counted and its start stamped); else it only ends.
    pub fn claim_outside(&self, h: &Header, accepted: bool, run: bool) -> bool {
        if h.state
            .transition(TokenState::Created, TokenState::Executing)
            .is_err()
        {
            return false;
        }
        if !accepted {
            self.accepted.fetch_add(1, Ordering::AcqRel);
        }
        self.outside_started.fetch_add(1, Ordering::AcqRel);
        if run {
            h.next_attempt();
            h.stamp_started(now_ns());
        }
        true
    }

    /// A passthrough call failed and runs again in its caller.
    pub fn count_outside_retry(&self) {
        self.retried_outside.fetch_add(1, Ordering::AcqRel);
    }

    /// Ends a token claimed by `claim_outside` as COMPLETED or FAILED (false if it was
    /// settled meanwhile: timed out).
    pub fn finish_outside(&self, h: &Header, ok: bool) -> bool {
        let to = if ok {
            TokenState::Completed
        } else {
            TokenState::Failed
        };
        if h.state.transition(TokenState::Executing, to).is_err() {
            // Settled while it ran: count the run as ended all the same.
            self.outside_discarded.fetch_add(1, Ordering::AcqRel);
            let _ = h
                .state
                .transition(TokenState::Cancelling, TokenState::Killed);
            self.notify_quiet();
            return false;
        }
        h.stamp_finished(now_ns());
        let counter = if ok {
            &self.outside_completed
        } else {
            &self.outside_failed
        };
        counter.fetch_add(1, Ordering::AcqRel);
        self.notify_quiet();
        true
    }

    /// The worker is done with the job it finished (callbacks included), or a queued job it
    /// took out was discarded: its place no longer counts toward the load.
    pub fn release(&self, core: usize, wi: usize) {
        let cs = &self.cores[core];
        cs.load.fetch_sub(1, Ordering::AcqRel);
        cs.workers[wi].load.fetch_sub(1, Ordering::AcqRel);
    }

    // ---- waits inside a task --------------------------------------------------------------

    /// Worker `(core, wi)` is about to wait inside a task (on a token that runs elsewhere, for
    /// quiescence, for pool room). Its place goes to the next slot of its core, a compensating
    /// worker, so the core keeps `active` workers that run tokens while it waits: the slots to
    /// start a thread for are returned, one that has a thread is woken if work is queued.
    /// `holds_token`: the waiting thread runs a token whose load it carries (not so in a
    /// done callback after the token was released); it does not occupy the core while it
    /// waits. Pair with `unblock` (same `holds_token`).
    pub fn block(&self, core: usize, wi: usize, holds_token: bool) -> Handoff {
        let cs = &self.cores[core];
        let slot = &cs.workers[wi];
        let was_target = self.is_target(core, wi);
        if slot
            .blocked
            .compare_exchange(
                SLOT_RUNNABLE,
                SLOT_BLOCKED,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_err()
        {
            return Handoff {
                spawn: Vec::new(),
                compensated: true,
            };
        }
        cs.blocked.fetch_add(1, Ordering::AcqRel);
        if holds_token {
            cs.load.fetch_sub(1, Ordering::AcqRel);
            slot.load.fetch_sub(1, Ordering::AcqRel);
        }
        if !slot.mailbox.is_empty() {
            self.wake_core(core); // its queued tokens go to its siblings
        }
        // Always look (another worker may have counted this one as its compensation a moment
        // ago); a retired worker's place needs no compensation: the core has its targets.
        let (spawn, complete) = self.compensate(core, wi);
        if was_target {
            let counter = if complete {
                &cs.compensations
            } else {
                &cs.uncompensated
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        Handoff {
            spawn,
            compensated: complete || !was_target,
        }
    }

    /// Makes every target of `core` run after slot `from` stopped being one: the first
    /// `active` runnable slots without a thread are claimed and returned, and those above
    /// `from` (the ones that just became targets) are woken if work is queued for the core
    /// (otherwise the next submission wakes them, as it wakes any parked target). Also
    /// returns whether there were `active` runnable slots. Idempotent.
    fn compensate(&self, core: usize, from: usize) -> (Vec<(usize, usize)>, bool) {
        let cs = &self.cores[core];
        let active = cs.active.load(Ordering::Acquire);
        let queued = cs.workers.iter().any(|w| !w.mailbox.is_empty())
            || (0..3).any(|w| cs.accepts[w] && self.pool_len_w[w].load(Ordering::Acquire) > 0);
        let mut spawn = Vec::new();
        let mut seen = 0;
        for (i, w) in cs.workers.iter().enumerate() {
            if seen == active {
                break;
            }
            if w.blocked.load(Ordering::Acquire) != SLOT_RUNNABLE {
                continue;
            }
            seen += 1;
            if self.claim_spawn(core, i) {
                spawn.push((core, i));
            } else if i > from && queued {
                w.wake();
            }
        }
        (spawn, seen == active)
    }

    /// The thread of slot `(core, wi)` could not be started: the slot is given back (it
    /// receives no work without a thread, and the next block tries it again), whatever was
    /// routed to it in the meantime goes to its siblings, and the core runs short.
    pub fn spawn_failed(&self, core: usize, wi: usize) {
        let cs = &self.cores[core];
        cs.workers[wi].spawned.store(false, Ordering::Release);
        cs.uncompensated.fetch_add(1, Ordering::Relaxed);
        self.wake_core(core);
    }

    /// Worker `(core, wi)` stopped waiting: it receives work again (its compensating worker
    /// finishes what it has and retires).
    pub fn unblock(&self, core: usize, wi: usize, holds_token: bool) {
        let cs = &self.cores[core];
        let slot = &cs.workers[wi];
        if slot
            .blocked
            .compare_exchange(
                SLOT_BLOCKED,
                SLOT_RUNNABLE,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
        {
            if holds_token {
                cs.load.fetch_add(1, Ordering::AcqRel);
                slot.load.fetch_add(1, Ordering::AcqRel);
            }
            cs.blocked.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Worker `(core, wi)` takes the token it waits for, to run it on its own stack: true if
    /// the token had not started (it is EXECUTING now, counted on this worker), false if
    /// another worker started it, it was killed, or it is final. Its queue entry is discarded
    /// when popped, like a killed token's.
    pub fn claim_inline(&self, core: usize, wi: usize, job: &J) -> bool {
        let h = job.header();
        let cs = &self.cores[core];
        match h.state.load() {
            TokenState::Admitted => {
                // `start` releases this on failure, like the load of a popped entry.
                cs.load.fetch_add(1, Ordering::AcqRel);
                cs.workers[wi].load.fetch_add(1, Ordering::AcqRel);
                if self.start(core, wi, h) {
                    h.set_placement(core, wi);
                    true
                } else {
                    false
                }
            }
            TokenState::Waiting => {
                if h.state.raw() & FLAG_HELD != 0 {
                    return false; // waits for a permit or a retry delay: not ours to run
                }
                if h.state
                    .transition(TokenState::Waiting, TokenState::Admitted)
                    .is_err()
                {
                    return false;
                }
                self.admit_into(h, core, wi, now_ns());
                job.admitted();
                self.pulled.fetch_add(1, Ordering::AcqRel);
                self.start(core, wi, h)
            }
            _ => false,
        }
    }

    /// KILLED if the token has not started; returns the flags it carried, or the state that
    /// made it impossible.
    pub fn kill(&self, h: &Header) -> Result<u8, TokenState> {
        let (from, flags) = h.state.kill()?;
        h.stamp_finished(now_ns());
        let idx = match from {
            TokenState::Created => 0,
            TokenState::Waiting => 1,
            _ => 2,
        };
        self.killed_from[idx].fetch_add(1, Ordering::AcqRel);
        if from == TokenState::Waiting {
            if flags & FLAG_HELD != 0 {
                self.held_dead.fetch_add(1, Ordering::AcqRel);
                self.held.fetch_sub(1, Ordering::AcqRel);
            }
            // Room for blocked submitters once the entry is purged.
            self.notify_pool_waiters(true);
        }
        self.notify_quiet();
        Ok(flags)
    }

    /// Removes every queued job (pool and mailboxes) and returns them; the caller kills them.
    pub fn take_pending(&self) -> Vec<J> {
        let mut out = Vec::new();
        {
            let mut pool = lock(&self.pool);
            for (w, lanes) in pool.lanes.iter_mut().enumerate() {
                for lane in lanes.iter_mut() {
                    out.extend(lane.drain(..));
                }
                self.pool_len_w[w].store(0, Ordering::Release);
            }
            pool.len = 0;
            self.pool_len.store(0, Ordering::Release);
        }
        self.notify_pool_waiters(true);
        for cs in self.cores.iter() {
            for w in cs.workers.iter() {
                let d = w.mailbox.drain();
                w.load.fetch_sub(d.len(), Ordering::AcqRel);
                cs.load.fetch_sub(d.len(), Ordering::AcqRel);
                out.extend(d);
            }
        }
        out
    }

    fn note_transition_error(&self, e: TransitionError) {
        // A conflict is a race lost to a kill or timeout: expected. Only an illegal request
        // is a bug worth counting.
        if let TransitionError::Illegal { .. } = e {
            self.illegal.fetch_add(1, Ordering::Relaxed);
        }
    }

    // ---- quiescence -------------------------------------------------------------------

    fn finals(&self) -> u64 {
        let done: u64 = self
            .cores
            .iter()
            .flat_map(|c| c.workers.iter())
            .map(|w| w.finished())
            .sum();
        done + sum(&self.killed_from)
            + sum(&self.timed_out_from)
            + self.outside_completed.load(Ordering::Acquire)
            + self.outside_failed.load(Ordering::Acquire)
    }

    /// Accepted tokens not yet final, plus submissions in progress.
    pub fn in_flight(&self) -> u64 {
        let finals = self.finals();
        let accepted = self.accepted.load(Ordering::SeqCst);
        accepted.saturating_sub(finals) + self.in_submit.load(Ordering::SeqCst) as u64
    }

    fn notify_quiet(&self) {
        if self.quiet_waiters.load(Ordering::SeqCst) > 0 {
            let _g = lock(&self.quiet_lock);
            self.quiet_cv.notify_all();
        }
    }

    /// Waits (blocking: call it with the GIL released) until at most `limit` tokens are in
    /// flight, or `timeout` passes. Returns whether that point was reached.
    pub fn wait_quiet(&self, limit: u64, timeout: Duration) -> bool {
        let deadline = Instant::now().checked_add(timeout);
        self.quiet_waiters.fetch_add(1, Ordering::SeqCst);
        let mut g = lock(&self.quiet_lock);
        let reached = loop {
            if self.in_flight() <= limit {
                break true;
            }
            let left = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => Duration::from_secs(3600),
            };
            if left.is_zero() {
                break self.in_flight() <= limit;
            }
            g = self
                .quiet_cv
                .wait_timeout(g, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        };
        drop(g);
        self.quiet_waiters.fetch_sub(1, Ordering::SeqCst);
        reached
    }

    // ---- waking -----------------------------------------------------------------------

    fn wake_for_weight(&self, w: Weight) {
        let n = self.cores.len();
        for c in router::allowed_cores(w, n) {
            let cs = &self.cores[c - 1];
            let end = self.target_end(c - 1);
            if cs.workers[..end].iter().any(|w| w.serves() && w.wake()) {
                return;
            }
        }
    }

    fn wake_core(&self, core: usize) {
        for w in self.cores[core].workers.iter() {
            w.wake();
        }
    }

    pub fn wake_all(&self) {
        for cs in self.cores.iter() {
            for w in cs.workers.iter() {
                w.wake();
            }
        }
    }

    // ---- listing queued tokens --------------------------------------------------------

    /// Calls `f` on each queued job until it returns false: the pool first (high lane first,
    /// then normal, then low; heavy, medium, light within a lane), then the mailboxes core by
    /// core. Only jobs still queued (WAITING in the pool, ADMITTED in a mailbox) are shown;
    /// entries a kill left behind are skipped. Returns false if `f` stopped it.
    pub fn visit_queued(&self, mut f: impl FnMut(&J) -> bool) -> bool {
        {
            let pool = lock(&self.pool);
            for p in 0..3 {
                for lanes in pool.lanes.iter() {
                    for j in lanes[p].iter() {
                        if j.header().state.load() == TokenState::Waiting && !f(j) {
                            return false;
                        }
                    }
                }
            }
        }
        self.cores
            .iter()
            .flat_map(|cs| cs.workers.iter())
            .all(|slot| {
                slot.mailbox
                    .visit(|j| j.header().state.load() != TokenState::Admitted || f(j))
            })
    }

    // ---- re-prioritize and re-route --------------------------------------------------

    /// Moves the queued token `id` (in the pool or a mailbox) to lane `prio`, or re-routes it
    /// to `weight`'s cores: it keeps its place in time (FIFO by id within the new lane is not
    /// guaranteed: it goes to the back of the new lane). False if no queued token has that id
    /// (it started, finished, or waits outside the pool: those take the new priority or
    /// weight when they enter it, see `Header::set_priority`).
    pub fn requeue(&self, id: u64, prio: Option<Priority>, weight: Option<Weight>) -> bool {
        let found = {
            let mut pool = lock(&self.pool);
            let mut hit = None;
            'find: for w in 0..3 {
                for p in 0..3 {
                    if let Some(pos) = pool.lanes[w][p].iter().position(|j| j.header().id == id) {
                        hit = Some((w, p, pos));
                        break 'find;
                    }
                }
            }
            match hit {
                Some((w, p, pos)) => {
                    let job = pool.lanes[w][p].remove(pos).expect("position is in range");
                    let h = job.header();
                    if h.state.load() != TokenState::Waiting {
                        pool.lanes[w][p].insert(pos, job);
                        return false;
                    }
                    if let Some(pr) = prio {
                        h.set_priority(pr);
                    }
                    if let Some(wt) = weight {
                        h.set_weight(wt);
                    }
                    let nw = h.weight() as usize;
                    self.pool_len_w[w].fetch_sub(1, Ordering::AcqRel);
                    self.pool_len_w[nw].fetch_add(1, Ordering::AcqRel);
                    pool.lanes[nw][h.priority() as usize].push_back(job);
                    Some(nw)
                }
                None => None,
            }
        };
        if let Some(nw) = found {
            self.moved.fetch_add(1, Ordering::Relaxed);
            if !self.is_paused() {
                self.wake_for_weight(Weight::ALL[nw]);
            }
            return true;
        }
        for cs in self.cores.iter() {
            for slot in cs.workers.iter() {
                let Some(job) = slot.mailbox.take_where(|j| {
                    j.header().id == id && j.header().state.load() == TokenState::Admitted
                }) else {
                    continue;
                };
                let h = job.header();
                if let Some(pr) = prio {
                    h.set_priority(pr);
                }
                if let Some(wt) = weight {
                    h.set_weight(wt);
                }
                self.moved.fetch_add(1, Ordering::Relaxed);
                if cs.accepts[h.weight() as usize] && slot.mailbox.try_reserve() {
                    let p = h.priority();
                    slot.mailbox.push_reserved(job, p);
                    slot.wake();
                    return true;
                }
                // Its core does not take the new weight: into a mailbox of one that does (in
                // its lane there), else back to the pool, from where such a core takes it.
                slot.load.fetch_sub(1, Ordering::AcqRel);
                cs.load.fetch_sub(1, Ordering::AcqRel);
                if let Some((c2, w2)) = self.reserve_for(h) {
                    let cs2 = &self.cores[c2];
                    h.set_placement(c2, w2);
                    cs2.routed[h.weight() as usize].fetch_add(1, Ordering::Relaxed);
                    cs2.load.fetch_add(1, Ordering::AcqRel);
                    cs2.workers[w2].load.fetch_add(1, Ordering::AcqRel);
                    let p = h.priority();
                    cs2.workers[w2].mailbox.push_reserved(job, p);
                    cs2.workers[w2].wake();
                    return true;
                }
                if h.state
                    .transition(TokenState::Admitted, TokenState::Waiting)
                    .is_err()
                {
                    return false; // killed or timed out this very moment: dropped
                }
                self.requeued.fetch_add(1, Ordering::AcqRel);
                let _ = self.push_pool(job, Entry::Back, false);
                return true;
            }
        }
        false
    }

    // ---- stats ------------------------------------------------------------------------

    pub fn stats(&self) -> Stats {
        // Read from the end of the pipeline backwards so derived gauges stay non-negative.
        let mut per_core = Vec::with_capacity(self.cores.len());
        let (mut completed, mut failed, mut started) = (0u64, 0u64, 0u64);
        let (mut discarded, mut retried) = (0u64, 0u64);
        for cs in self.cores.iter() {
            let mut c_exec = 0u64;
            let mut depth = 0usize;
            let mut spawned = 0usize;
            let mut busy_ns = 0u64;
            let mut waits = [0u64; growth::WAIT_BUCKETS];
            let mut wait_ns = 0u64;
            for w in cs.workers.iter() {
                busy_ns += w.figures.busy_ns();
                wait_ns = wait_ns.wrapping_add(w.figures.wait_ns());
                w.figures.add_waits(&mut waits);
                let done = w.completed.load(Ordering::Acquire);
                let fail = w.failed.load(Ordering::Acquire);
                let disc = w.discarded.load(Ordering::Acquire);
                let retr = w.retried.load(Ordering::Acquire);
                let st = w.started.load(Ordering::Acquire);
                completed += done;
                failed += fail;
                discarded += disc;
                retried += retr;
                started += st;
                c_exec += st.saturating_sub(done + fail + disc + retr);
                depth += w.mailbox.len();
                spawned += w.spawned.load(Ordering::Acquire) as usize;
            }
            per_core.push(CoreStats {
                active_workers: cs.active.load(Ordering::Acquire),
                spawned_workers: spawned,
                blocked_workers: cs.blocked.load(Ordering::Acquire),
                compensations: cs.compensations.load(Ordering::Relaxed),
                uncompensated: cs.uncompensated.load(Ordering::Relaxed),
                queue_depth: depth,
                executing: c_exec,
                load: cs.load.load(Ordering::Acquire),
                routed: [0, 1, 2].map(|i| cs.routed[i].load(Ordering::Acquire)),
                pool_backlog: (0..3)
                    .filter(|&w| cs.accepts[w])
                    .map(|w| self.pool_len_w[w].load(Ordering::Acquire))
                    .sum(),
                grown_on_demand: cs.grown.load(Ordering::Relaxed),
                grown_workers: cs.grown_workers.load(Ordering::Relaxed),
                busy_ns,
                wait_histogram: waits,
                wait_ns_sum: wait_ns,
            });
        }
        let o_completed = self.outside_completed.load(Ordering::Acquire);
        let o_failed = self.outside_failed.load(Ordering::Acquire);
        let o_discarded = self.outside_discarded.load(Ordering::Acquire);
        let o_started = self.outside_started.load(Ordering::Acquire);
        let killed_x = self.killed_from[3].load(Ordering::Acquire);
        let timed_x = self.timed_out_from[3].load(Ordering::Acquire);
        let killed_a = self.killed_from[2].load(Ordering::Acquire);
        let timed_a = self.timed_out_from[2].load(Ordering::Acquire);
        let requeued = self.requeued.load(Ordering::Acquire);
        let pulled = self.pulled.load(Ordering::Acquire);
        let direct = self.direct.load(Ordering::Acquire);
        let killed_w = self.killed_from[1].load(Ordering::Acquire);
        let timed_w = self.timed_out_from[1].load(Ordering::Acquire);
        let held_out = self.held_out.load(Ordering::Acquire);
        let to_pool = self.to_pool.load(Ordering::Acquire);
        let held_in = self.held_in.load(Ordering::Acquire);
        let killed_c = self.killed_from[0].load(Ordering::Acquire);
        let timed_c = self.timed_out_from[0].load(Ordering::Acquire);
        let accepted = self.accepted.load(Ordering::Acquire);
        let executing = (started + o_started).saturating_sub(
            completed + failed + discarded + retried + o_completed + o_failed + o_discarded,
        );
        let admitted = (pulled + direct).saturating_sub(started + killed_a + timed_a + requeued);
        let waiting = (to_pool + held_in).saturating_sub(pulled + held_out + killed_w + timed_w);
        Stats {
            created: accepted,
            waiting,
            admitted,
            executing,
            completed: completed + o_completed,
            failed: failed + o_failed,
            killed: killed_a + killed_w + killed_c + killed_x,
            timed_out: timed_a + timed_w + timed_c + timed_x,
            held: (held_in.saturating_sub(held_out + self.held_dead.load(Ordering::Acquire)))
                as usize,
            retried: retried + self.retried_outside.load(Ordering::Acquire),
            discarded: discarded + o_discarded,
            moved: self.moved.load(Ordering::Relaxed),
            illegal_transitions: self.illegal.load(Ordering::Relaxed),
            pool_len: self.pool_len.load(Ordering::Acquire),
            per_core,
        }
    }
}

fn sum<const N: usize>(a: &[AtomicU64; N]) -> u64 {
    a.iter().map(|k| k.load(Ordering::Acquire)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;
    use std::sync::Arc;

    #[derive(Debug)]
    struct TestJob {
        header: Header,
    }

    impl Job for Arc<TestJob> {
        fn header(&self) -> &Header {
            &self.header
        }
    }

    type S = Scheduler<Arc<TestJob>>;

    /// A scheduler whose initial worker slots are claimed, as `Runtime::start` does.
    fn sched(cores: usize, wpc: usize, mailbox: usize, pool: usize, overflow: Overflow) -> Arc<S> {
        let s: Arc<S> = Arc::new(
            Scheduler::new(Config {
                cores,
                workers_per_core: wpc,
                max_workers_per_core: wpc.max(4),
                mailbox_capacity: mailbox,
                pool_capacity: pool,
                overflow,
                first_id: 1,
                memory_budget: None,
            })
            .unwrap(),
        );
        for core in 0..cores {
            for wi in 0..wpc {
                assert!(s.claim_spawn(core, wi));
            }
        }
        s
    }

    fn job(s: &S, w: Weight) -> Arc<TestJob> {
        Arc::new(TestJob {
            header: Header::new(s.next_id(), w, Priority::Normal),
        })
    }

    /// Runs every slot's loop on plain threads; each run records the job id.
    fn run_workers(s: &Arc<S>) -> Vec<std::thread::JoinHandle<Vec<u64>>> {
        let mut hs = Vec::new();
        for core in 0..s.cores() {
            for wi in 0..s.config().workers_per_core {
                let s = s.clone();
                hs.push(std::thread::spawn(move || {
                    let parker = s.take_parker(core, wi).unwrap();
                    let mut ran = Vec::new();
                    while let Some(j) = s.wait_for_work(core, wi, &parker) {
                        if s.start(core, wi, &j.header) {
                            ran.push(j.header.id);
                            s.finish(core, wi, &j.header, true).unwrap();
                            s.release(core, wi);
                        }
                    }
                    ran
                }));
            }
        }
        hs
    }

    fn submit_all(s: &S, jobs: &[Arc<TestJob>]) {
        for j in jobs {
            let mut j = j.clone();
            loop {
                match s.try_submit(j) {
                    Ok(()) => break,
                    Err(r) => {
                        assert_eq!(r.reason, RejectReason::PoolFull);
                        s.wait_pool_room(Duration::from_millis(10));
                        j = r.job;
                    }
                }
            }
        }
    }

    #[test]
    fn every_job_runs_exactly_once() {
        let s = sched(3, 3, 8, 64, Overflow::Block);
        let hs = run_workers(&s);
        let jobs: Vec<_> = (0..30_000).map(|i| job(&s, Weight::ALL[i % 3])).collect();
        submit_all(&s, &jobs);
        assert!(s.wait_quiet(0, Duration::from_secs(30)));
        s.close();
        s.shutdown();
        let mut seen = HashSet::new();
        for h in hs {
            for id in h.join().unwrap() {
                assert!(seen.insert(id), "job {id} ran twice");
            }
        }
        assert_eq!(seen.len(), jobs.len());
        let st = s.stats();
        assert_eq!(st.created, 30_000);
        assert_eq!(st.completed, 30_000);
        assert_eq!(
            st.waiting + st.admitted + st.executing + st.failed + st.killed,
            0
        );
        assert_eq!(st.illegal_transitions, 0);
        for j in &jobs {
            let (core, _) = j.header.placement().unwrap();
            assert!(router::core_allows(core + 1, j.header.weight(), 3));
            assert_eq!(j.header.state.load(), TokenState::Completed);
        }
    }

    #[test]
    fn routing_follows_weights_on_two_cores() {
        let s = sched(2, 2, 4, 100, Overflow::Reject);
        let medium = job(&s, Weight::Medium);
        let light = job(&s, Weight::Light);
        let heavy = job(&s, Weight::Heavy);
        for j in [&medium, &light, &heavy] {
            s.try_submit(j.clone()).unwrap();
        }
        assert_eq!(medium.header.placement().unwrap().0, 1);
        assert_eq!(light.header.placement().unwrap().0, 1);
        // core 2 is loaded now, so heavy goes to (preferred) core 1
        assert_eq!(heavy.header.placement().unwrap().0, 0);
        let st = s.stats();
        assert_eq!(st.per_core[1].routed, [0, 1, 1]);
        assert_eq!(st.per_core[0].routed, [1, 0, 0]);
        assert_eq!(st.admitted, 3);
    }

    #[test]
    fn full_pool_rejects_without_losing_jobs() {
        // one core, one worker, mailbox 2, pool 3 and nobody running: 5 fit, the 6th is refused
        let s = sched(1, 1, 2, 3, Overflow::Reject);
        let jobs: Vec<_> = (0..6).map(|_| job(&s, Weight::Heavy)).collect();
        for j in &jobs[..5] {
            s.try_submit(j.clone()).unwrap();
        }
        let r = s.try_submit(jobs[5].clone()).unwrap_err();
        assert_eq!(r.reason, RejectReason::PoolFull);
        assert_eq!(r.job.header.id, jobs[5].header.id);
        let st = s.stats();
        assert_eq!((st.created, st.admitted, st.waiting), (5, 2, 3));
        assert!(!s.wait_pool_room(Duration::from_millis(1)));
        // the worker takes one: a pool job moves into the mailbox, FIFO
        let first = s.next_job(0, 0).unwrap();
        assert_eq!(first.header.id, jobs[0].header.id);
        assert!(s.wait_pool_room(Duration::from_millis(1)));
        assert_eq!(jobs[2].header.state.load(), TokenState::Admitted);
        assert_eq!(jobs[3].header.state.load(), TokenState::Waiting);
    }

    #[test]
    fn pause_holds_jobs_in_the_pool() {
        let s = sched(1, 1, 4, 10, Overflow::Block);
        s.pause();
        let j = job(&s, Weight::Medium);
        s.try_submit(j.clone()).unwrap();
        assert_eq!(j.header.state.load(), TokenState::Waiting);
        assert!(s.next_job(0, 0).is_none());
        s.unpause();
        let got = s.next_job(0, 0).unwrap();
        assert_eq!(got.header.id, j.header.id);
        assert_eq!(j.header.state.load(), TokenState::Admitted);
    }

    #[test]
    fn killed_jobs_are_skipped_and_counted() {
        let s = sched(1, 1, 1, 10, Overflow::Block);
        let a = job(&s, Weight::Heavy);
        let b = job(&s, Weight::Heavy);
        s.try_submit(a.clone()).unwrap();
        s.try_submit(b.clone()).unwrap();
        assert_eq!(b.header.state.load(), TokenState::Waiting);
        assert!(s.kill(&b.header).is_ok());
        assert!(s.kill(&a.header).is_ok());
        assert_eq!(s.kill(&a.header), Err(TokenState::Killed));
        let st = s.stats();
        assert_eq!((st.killed, st.waiting, st.admitted), (2, 0, 0));
        assert_eq!(s.in_flight(), 0);
        // the dead entries come out and are refused by start()
        while let Some(j) = s.next_job(0, 0) {
            assert!(!s.start(0, 0, &j.header));
        }
        assert_eq!(s.stats().per_core[0].load, 0);
    }

    #[test]
    fn siblings_steal_queued_work() {
        let s = sched(1, 2, 8, 10, Overflow::Block);
        let jobs: Vec<_> = (0..4).map(|_| job(&s, Weight::Heavy)).collect();
        for j in &jobs {
            s.try_submit(j.clone()).unwrap();
        }
        // worker 1 takes everything, including what was routed to worker 0
        let mut ids = Vec::new();
        while let Some(j) = s.next_job(0, 1) {
            assert!(s.start(0, 1, &j.header));
            assert_eq!(j.header.placement(), Some((0, 1)));
            s.finish(0, 1, &j.header, true);
            s.release(0, 1);
            ids.push(j.header.id);
        }
        ids.sort_unstable();
        assert_eq!(ids, jobs.iter().map(|j| j.header.id).collect::<Vec<_>>());
        assert_eq!(s.stats().per_core[0].load, 0);
    }

    #[test]
    fn closed_gate_refuses_and_take_pending_empties_everything() {
        let s = sched(2, 1, 1, 10, Overflow::Block);
        let jobs: Vec<_> = (0..5).map(|_| job(&s, Weight::Heavy)).collect();
        for j in &jobs {
            s.try_submit(j.clone()).unwrap();
        }
        s.close();
        let r = s.try_submit(job(&s, Weight::Heavy)).unwrap_err();
        assert_eq!(r.reason, RejectReason::Closed);
        let pending = s.take_pending();
        assert_eq!(pending.len(), 5);
        for j in &pending {
            assert!(s.kill(&j.header).is_ok());
        }
        assert_eq!(s.in_flight(), 0);
        assert!(s.wait_quiet(0, Duration::from_millis(1)));
        let st = s.stats();
        assert_eq!(st.killed, 5);
        assert_eq!(st.per_core.iter().map(|c| c.load).sum::<usize>(), 0);
    }

    #[test]
    fn wait_quiet_times_out_while_work_is_in_flight() {
        let s = sched(1, 1, 4, 10, Overflow::Block);
        let j = job(&s, Weight::Heavy);
        s.try_submit(j.clone()).unwrap();
        assert!(!s.wait_quiet(0, Duration::from_millis(5)));
        assert!(s.wait_quiet(1, Duration::from_millis(5)));
        let got = s.next_job(0, 0).unwrap();
        assert!(s.start(0, 0, &got.header));
        s.finish(0, 0, &got.header, false).unwrap();
        s.release(0, 0);
        assert!(s.wait_quiet(0, Duration::from_millis(5)));
        assert_eq!(s.stats().failed, 1);
    }

    #[test]
    fn set_active_bounds_and_spawn_list() {
        let s = sched(2, 1, 4, 10, Overflow::Block);
        assert_eq!(s.claim_for_active(0, 3).unwrap(), vec![(0, 1), (0, 2)]);
        assert_eq!(
            s.active(0),
            1,
            "claiming threads does not route to them yet"
        );
        s.set_active(0, 3).unwrap();
        assert_eq!(s.active(0), 3);
        assert!(s.set_active(0, 0).is_err());
        assert!(s.set_active(0, 5).is_err());
        assert!(s.set_active(7, 1).is_err());
    }

    /// Runs whatever `(core, wi)` finds until it finds nothing.
    fn drain_worker(s: &S, core: usize, wi: usize) -> Vec<u64> {
        let mut ran = Vec::new();
        while let Some(j) = s.next_job(core, wi) {
            if s.start(core, wi, &j.header) {
                ran.push(j.header.id);
                s.finish(core, wi, &j.header, true).unwrap();
                s.release(core, wi);
            }
        }
        ran
    }

    #[test]
    fn a_blocked_worker_hands_its_place_to_the_next_slot() {
        let s = sched(1, 2, 4, 100, Overflow::Block);
        // worker 0 runs a token and blocks inside it
        let a = job(&s, Weight::Heavy);
        s.try_submit(a.clone()).unwrap();
        let got = s.next_job(0, 0).unwrap();
        assert!(s.start(0, 0, &got.header));
        assert_eq!(
            s.block(0, 0, true).spawn,
            vec![(0, 2)],
            "slot 2 must get a thread"
        );
        assert!(!s.is_target(0, 0));
        assert!(s.is_target(0, 1) && s.is_target(0, 2));
        assert!(!s.is_target(0, 3));
        let st = s.stats().per_core[0].clone();
        assert_eq!((st.blocked_workers, st.compensations, st.load), (1, 1, 0));
        // new work goes to the runnable targets only
        let more: Vec<_> = (0..4).map(|_| job(&s, Weight::Heavy)).collect();
        for j in &more {
            s.try_submit(j.clone()).unwrap();
        }
        assert!(more
            .iter()
            .all(|j| matches!(j.header.placement(), Some((0, 1 | 2)))));
        // worker 1 blocks too: slot 3 takes its place
        assert_eq!(s.block(0, 1, true).spawn, vec![(0, 3)]);
        // worker 0 resumes: slot 3 is no longer a target; it only finishes its own mailbox
        s.unblock(0, 0, true);
        assert!(s.is_target(0, 0) && s.is_target(0, 2) && !s.is_target(0, 3));
        s.unblock(0, 1, true);
        s.finish(0, 0, &got.header, true).unwrap();
        s.release(0, 0);
        let mut ran: Vec<u64> = (0..4).flat_map(|w| drain_worker(&s, 0, w)).collect();
        ran.sort_unstable();
        assert_eq!(ran, more.iter().map(|j| j.header.id).collect::<Vec<_>>());
        let st = s.stats();
        assert_eq!(st.per_core[0].load, 0);
        assert_eq!(st.per_core[0].blocked_workers, 0);
        assert_eq!(st.completed, 5);
    }

    #[test]
    fn concurrent_blocks_give_every_new_target_a_thread() {
        let s = sched(1, 2, 4, 100, Overflow::Block);
        // both workers are marked blocked before either looks for its compensating slot
        let a = s.block(0, 0, false).spawn;
        let b = s.block(0, 1, false).spawn;
        let mut all: Vec<_> = a.into_iter().chain(b).collect();
        all.sort_unstable();
        assert_eq!(all, vec![(0, 2), (0, 3)]);
    }

    #[test]
    fn no_slot_left_means_no_compensation() {
        let s: Arc<S> = Arc::new(
            Scheduler::new(Config {
                cores: 1,
                workers_per_core: 1,
                max_workers_per_core: 2,
                ..Config::default()
            })
            .unwrap(),
        );
        assert!(s.claim_spawn(0, 0));
        let first = s.block(0, 0, false);
        assert_eq!(first.spawn, vec![(0, 1)]);
        assert!(first.compensated);
        let second = s.block(0, 1, false);
        assert_eq!(second.spawn, vec![]);
        assert!(!second.compensated, "every slot waits: the core runs short");
        let st = s.stats().per_core[0].clone();
        assert_eq!((st.compensations, st.uncompensated), (1, 1));
        s.unblock(0, 1, false);
        s.unblock(0, 0, false);
        assert_eq!(s.stats().per_core[0].blocked_workers, 0);
    }

    #[test]
    fn a_slot_whose_thread_failed_to_start_gets_no_work_until_it_has_one() {
        let s = sched(1, 1, 4, 100, Overflow::Block);
        let h = s.block(0, 0, false);
        assert_eq!(h.spawn, vec![(0, 1)]);
        s.spawn_failed(0, 1);
        assert!(!s.is_target(0, 1), "no thread: no work");
        let j = job(&s, Weight::Heavy);
        s.try_submit(j.clone()).unwrap();
        assert_eq!(
            j.header.state.load(),
            TokenState::Waiting,
            "nobody may take it: pool"
        );
        s.unblock(0, 0, false);
        // the next block tries the slot again
        assert_eq!(s.block(0, 0, false).spawn, vec![(0, 1)]);
        assert!(s.is_target(0, 1));
        s.unblock(0, 0, false);
        assert_eq!(drain_worker(&s, 0, 0), vec![j.header.id]);
    }

    #[test]
    fn a_waiter_claims_the_token_it_waits_for_unless_it_started() {
        let s = sched(1, 2, 4, 100, Overflow::Block);
        let queued = job(&s, Weight::Heavy);
        s.try_submit(queued.clone()).unwrap();
        let (c, w) = queued.header.placement().unwrap();
        assert!(s.claim_inline(0, 1, &queued));
        assert_eq!(queued.header.state.load(), TokenState::Executing);
        assert_eq!(queued.header.placement(), Some((0, 1)));
        assert!(!s.claim_inline(0, 1, &queued), "only once");
        s.finish(0, 1, &queued.header, true).unwrap();
        s.release(0, 1);
        // its queue entry is discarded by whoever pops it
        assert!(drain_worker(&s, c, w).is_empty());
        // a token waiting in the pool (paused) is claimed the same way
        s.pause();
        let waiting = job(&s, Weight::Medium);
        s.try_submit(waiting.clone()).unwrap();
        assert_eq!(waiting.header.state.load(), TokenState::Waiting);
        assert!(s.claim_inline(0, 0, &waiting));
        s.finish(0, 0, &waiting.header, false).unwrap();
        s.release(0, 0);
        s.unpause();
        assert!(drain_worker(&s, 0, 0).is_empty());
        let st = s.stats();
        assert_eq!((st.completed, st.failed), (1, 1));
        assert_eq!(st.waiting + st.admitted + st.executing, 0);
        assert!(st.per_core.iter().all(|c| c.load == 0));
        assert_eq!(s.in_flight(), 0);
    }

    /// The gauges at quiescence: nothing waiting, admitted, executing or held, and every
    /// accepted job in exactly one final count.
    fn assert_quiet(s: &S) {
        let st = s.stats();
        assert_eq!(
            (st.waiting, st.admitted, st.executing, st.held),
            (0, 0, 0, 0),
            "{st:?}"
        );
        assert_eq!(
            st.created,
            st.completed + st.failed + st.killed + st.timed_out,
            "{st:?}"
        );
        assert_eq!(s.in_flight(), 0);
    }

    #[test]
    fn timeouts_settle_a_job_in_every_state_exactly_once() {
        let s = sched(1, 1, 8, 100, Overflow::Reject);
        s.pause();
        let queued = job(&s, Weight::Heavy); // WAITING in the pool (paused)
        s.try_submit(queued.clone()).unwrap();
        let held = job(&s, Weight::Heavy); // WAITING outside the pool
        assert_eq!(s.hold_new(&held), Ok(true));
        assert_eq!(s.stats().held, 1);
        let never = job(&s, Weight::Heavy); // CREATED
        s.accept_early();
        for h in [&queued.header, &held.header, &never.header] {
            assert!(s.time_out(h).is_ok());
            assert_eq!(h.state.load(), TokenState::TimedOut);
            assert_eq!(s.time_out(h), Err(false), "only once");
        }
        s.unpause();
        assert!(
            drain_worker(&s, 0, 0).is_empty(),
            "a timed-out job never runs"
        );
        // A running one: it times out at once; the worker's late finish is discarded.
        let running = job(&s, Weight::Heavy);
        s.try_submit(running.clone()).unwrap();
        let j = s.next_job(0, 0).unwrap();
        assert!(s.start(0, 0, &j.header));
        assert_eq!(s.time_out(&j.header), Ok(TokenState::Executing));
        assert_eq!(s.finish(0, 0, &j.header, true), None);
        s.release(0, 0);
        let st = s.stats();
        assert_eq!((st.timed_out, st.discarded, st.completed), (4, 1, 0));
        assert_quiet(&s);
    }

    #[test]
    fn a_running_job_killed_is_cancelling_until_its_worker_returns() {
        let s = sched(1, 1, 8, 100, Overflow::Reject);
        let a = job(&s, Weight::Heavy);
        s.try_submit(a.clone()).unwrap();
        let j = s.next_job(0, 0).unwrap();
        assert!(s.start(0, 0, &j.header));
        assert_eq!(s.kill(&a.header), Err(TokenState::Executing));
        assert!(s.cancel_running(&a.header).is_ok());
        assert_eq!(a.header.state.load(), TokenState::Cancelling);
        assert!(s.cancel_running(&a.header).is_err(), "once");
        assert_eq!(s.in_flight(), 0, "its outcome is decided");
        assert_eq!(s.stats().executing, 1, "its task still runs");
        assert_eq!(s.finish(0, 0, &a.header, true), None);
        s.release(0, 0);
        assert_eq!(a.header.state.load(), TokenState::Killed);
        assert_quiet(&s);
    }

    #[test]
    fn a_retry_leaves_its_worker_waits_outside_and_comes_back_first() {
        let s = sched(1, 1, 8, 100, Overflow::Reject);
        let a = job(&s, Weight::Heavy);
        s.try_submit(a.clone()).unwrap();
        let j = s.next_job(0, 0).unwrap();
        assert!(s.start(0, 0, &j.header));
        assert_eq!(a.header.attempt(), 1);
        assert!(s.retry(0, 0, &a.header));
        s.release(0, 0);
        let st = s.stats();
        assert_eq!(
            (st.waiting, st.held, st.executing, st.retried),
            (1, 1, 0, 1)
        );
        // Others queue meanwhile; the retry goes ahead of them.
        s.pause();
        let b = job(&s, Weight::Heavy);
        s.try_submit(b.clone()).unwrap();
        assert!(s.unhold(a.clone(), true));
        s.unpause();
        assert_eq!(drain_worker(&s, 0, 0), vec![a.header.id, b.header.id]);
        assert_eq!(a.header.attempt(), 2);
        assert_quiet(&s);
    }

    #[test]
    fn held_jobs_count_against_the_pool_bound_and_never_run_inline() {
        let s = sched(1, 1, 8, 2, Overflow::Reject);
        let a = job(&s, Weight::Heavy);
        let b = job(&s, Weight::Heavy);
        assert_eq!(s.hold_new(&a), Ok(true));
        assert_eq!(s.hold_new(&b), Ok(true));
        let c = job(&s, Weight::Heavy);
        assert_eq!(s.hold_new(&c), Err(RejectReason::PoolFull));
        assert!(!s.claim_inline(0, 0, &a), "it waits for a permit");
        s.close();
        assert!(
            s.unhold(a.clone(), false),
            "accepted before close: it still enters"
        );
        assert!(s.kill(&b.header).is_ok());
        assert!(!s.unhold(b.clone(), false), "killed while held: dropped");
        assert_eq!(drain_worker(&s, 0, 0), vec![a.header.id]);
        assert_quiet(&s);
    }

    #[test]
    fn requeue_moves_queued_jobs_between_lanes_and_cores() {
        let s = sched(3, 1, 8, 100, Overflow::Reject);
        s.pause();
        let jobs: Vec<_> = (0..3).map(|_| job(&s, Weight::Heavy)).collect();
        for j in &jobs {
            s.try_submit(j.clone()).unwrap();
        }
        assert!(s.requeue(jobs[2].header.id, Some(Priority::High), None));
        assert!(s.requeue(jobs[0].header.id, None, Some(Weight::Light)));
        assert!(!s.requeue(999, Some(Priority::Low), None));
        s.unpause();
        // Core 1 runs the high one first and never the re-routed light one; core 3 does.
        assert_eq!(
            drain_worker(&s, 0, 0),
            vec![jobs[2].header.id, jobs[1].header.id]
        );
        assert_eq!(drain_worker(&s, 2, 0), vec![jobs[0].header.id]);
        assert!(
            !s.requeue(jobs[1].header.id, Some(Priority::Low), None),
            "finished"
        );
        assert_eq!(s.stats().moved, 2);
        assert_quiet(&s);
    }

    #[test]
    fn the_memory_budget_admits_one_large_call_alone_and_frees_on_release() {
        let s = Scheduler::<Arc<TestJob>>::new(Config {
            memory_budget: Some(1000),
            ..Config::default()
        })
        .unwrap();
        assert!(
            s.reserve_bytes(5000),
            "alone, even a call above the budget fits"
        );
        assert!(!s.reserve_bytes(1));
        s.release_bytes(5000);
        assert!(s.reserve_bytes(600));
        assert!(s.reserve_bytes(400));
        assert!(!s.reserve_bytes(1));
        assert_eq!(s.queued_bytes(), 1000);
        let unbounded = Scheduler::<Arc<TestJob>>::new(Config::default()).unwrap();
        assert!(unbounded.reserve_bytes(u64::MAX / 2));
    }

    #[test]
    fn ids_start_where_the_config_says() {
        let s = Scheduler::<Arc<TestJob>>::new(Config {
            first_id: 42,
            ..Config::default()
        })
        .unwrap();
        assert_eq!(s.peek_next_id(), 42);
        assert_eq!(s.next_id(), 42);
        assert_eq!(s.next_id(), 43);
        assert!(Scheduler::<Arc<TestJob>>::new(Config {
            first_id: 0,
            ..Config::default()
        })
        .is_err());
    }

    #[test]
    fn config_errors_name_the_field() {
        let e = Scheduler::<Arc<TestJob>>::new(Config {
            mailbox_capacity: 0,
            ..Config::default()
        })
        .err()
        .unwrap();
        assert!(e.contains("mailbox_capacity"), "{e}");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Submit(u8),
        Kill(usize),
        Run(usize, usize),
        Pause,
        Unpause,
    }

    proptest::proptest! {
        /// Random single-threaded schedules: no job runs twice, killed jobs never run, every
        /// job ends final, and counters and loads add up once everything is drained.
        #[test]
        fn random_schedules_keep_the_invariants(ops in proptest::collection::vec(proptest::prop_oneof![
            (0u8..3).prop_map(Op::Submit),
            (0usize..64).prop_map(Op::Kill),
            (0usize..3, 0usize..2).prop_map(|(c, w)| Op::Run(c, w)),
            proptest::strategy::Just(Op::Pause),
            proptest::strategy::Just(Op::Unpause),
        ], 0..120)) {
            let s = sched(3, 2, 2, 1_000, Overflow::Reject);
            let mut jobs: Vec<Arc<TestJob>> = Vec::new();
            let mut ran: HashSet<u64> = HashSet::new();
            let mut killed: HashSet<u64> = HashSet::new();
            let run = |s: &S, c: usize, w: usize, ran: &mut HashSet<u64>| -> bool {
                match s.next_job(c, w) {
                    Some(j) => {
                        if s.start(c, w, &j.header) {
                            assert!(ran.insert(j.header.id), "ran twice");
                            s.finish(c, w, &j.header, j.header.id % 2 == 0).unwrap();
                            s.release(c, w);
                        }
                        true
                    }
                    None => false,
                }
            };
            for op in ops {
                match op {
                    Op::Submit(w) => {
                        let j = job(&s, Weight::ALL[w as usize]);
                        s.try_submit(j.clone()).unwrap();
                        jobs.push(j);
                    }
                    Op::Kill(i) if !jobs.is_empty() => {
                        let j = &jobs[i % jobs.len()];
                        if s.kill(&j.header).is_ok() {
                            prop_assert!(killed.insert(j.header.id));
                        }
                    }
                    Op::Kill(_) => {}
                    Op::Run(c, w) => { run(&s, c, w, &mut ran); }
                    Op::Pause => s.pause(),
                    Op::Unpause => s.unpause(),
                }
                let st = s.stats();
                prop_assert_eq!(st.created, jobs.len() as u64);
                prop_assert_eq!(
                    st.waiting + st.admitted + st.executing + st.completed + st.failed + st.killed,
                    st.created
                );
            }
            s.unpause();
            while (0..3).any(|c| (0..2).any(|w| run(&s, c, w, &mut ran))) {}
            prop_assert!(ran.is_disjoint(&killed));
            prop_assert_eq!(ran.len() + killed.len(), jobs.len());
            for j in &jobs {
                prop_assert!(j.header.state.load().is_final());
            }
            let st = s.stats();
            prop_assert_eq!(st.completed + st.failed, ran.len() as u64);
            prop_assert_eq!(st.killed, killed.len() as u64);
            prop_assert_eq!(st.waiting + st.admitted + st.executing, 0);
            prop_assert!(st.per_core.iter().all(|c| c.load == 0 && c.queue_depth == 0));
            prop_assert_eq!(s.in_flight(), 0);
        }
    }
}
