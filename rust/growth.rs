//! On-demand growth, the scheduler's side (pure Rust, a child module of `sched`): the per-slot
//! figures it reads (when the running token started, time spent executing, submit-to-start
//! waits), which cores need another worker now, raising a core's `active` count, and the
//! park state of the monitor thread that does it (`monitor.rs` in the binding).
//!
//! A core needs more workers *now* when every worker that receives its work has been executing
//! its current token for at least `busy_for` while tokens for the core queue (in its
//! mailboxes, or in the pool lanes of the weights it accepts): those workers wait on something
//! (a sleep, I/O, a lock, a GIL-releasing computation) and the queued tokens would otherwise
//! wait for one of them. How many: as many as are queued, up to `max_workers_per_core` (the
//! way `ThreadPoolExecutor` starts a thread per submission while none is idle). Whether the
//! GIL, not a wait, is what holds those workers is for the monitor to find out (see
//! `monitor.rs`); shrinking back is the Python convergence loop's job.

use std::sync::atomic::{fence, AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crossbeam_utils::sync::{Parker, Unparker};

use super::{Job, Scheduler, SLOT_RUNNABLE};
use crate::sync::lock;

/// Buckets of the submit-to-start wait histogram: bucket 0 holds waits under 1 µs, bucket
/// `i >= 1` waits in `[2^(i-1), 2^i)` µs; the last one everything from about 4.2 s on.
pub const WAIT_BUCKETS: usize = 24;

/// The bucket of a wait of `ns` nanoseconds.
#[inline]
pub fn wait_bucket(ns: u64) -> usize {
    let us = ns / 1_000;
    if us == 0 {
        0
    } else {
        ((64 - us.leading_zeros()) as usize).min(WAIT_BUCKETS - 1)
    }
}

/// Upper bound in microseconds of bucket `i` (what a percentile read from it reports).
pub fn bucket_upper_us(i: usize) -> u64 {
    1u64 << i.min(63)
}

/// `SlotFigures::clock` of a slot whose thread's CPU clock is not known.
pub const NO_CLOCK: i64 = i64::MIN;

/// Per worker slot. Only the slot's own thread writes (a token runs on the thread of the slot
/// that started it, inline runs included), so plain load + store is enough: no locked
/// instruction on the hot path. Readers see a recent value.
pub(crate) struct SlotFigures {
    /// When the token it runs (or ran last) started.
    busy_since: AtomicU64,
    /// Nanoseconds spent executing tokens that finished.
    busy_ns: AtomicU64,
    waits: [AtomicU64; WAIT_BUCKETS],
    /// The sum of those waits, in ns.
    wait_ns: AtomicU64,
    /// The CPU-time clock of the slot's thread (`pthread_getcpuclockid`), or `NO_CLOCK`.
    clock: AtomicI64,
}

impl Default for SlotFigures {
    fn default() -> Self {
        SlotFigures {
            busy_since: AtomicU64::new(0),
            busy_ns: AtomicU64::new(0),
            waits: Default::default(),
            wait_ns: AtomicU64::new(0),
            clock: AtomicI64::new(NO_CLOCK),
        }
    }
}

#[inline]
fn bump(a: &AtomicU64, by: u64) {
    a.store(
        a.load(Ordering::Relaxed).wrapping_add(by),
        Ordering::Relaxed,
    );
}

impl SlotFigures {
    #[inline]
    pub(crate) fn note_start(&self, now: u64, created: u64) {
        self.busy_since.store(now, Ordering::Relaxed);
        let wait = now.saturating_sub(created);
        bump(&self.waits[wait_bucket(wait)], 1);
        bump(&self.wait_ns, wait);
    }

    #[inline]
    pub(crate) fn note_finish(&self, now: u64, started: Option<u64>) {
        if let Some(s) = started {
            bump(&self.busy_ns, now.saturating_sub(s));
        }
    }

    pub(crate) fn busy_since(&self) -> u64 {
        self.busy_since.load(Ordering::Relaxed)
    }

    pub(crate) fn busy_ns(&self) -> u64 {
        self.busy_ns.load(Ordering::Relaxed)
    }

    /// The sum of the submit-to-start waits counted here, in ns.
    pub(crate) fn wait_ns(&self) -> u64 {
        self.wait_ns.load(Ordering::Relaxed)
    }

    pub(crate) fn add_waits(&self, into: &mut [u64; WAIT_BUCKETS]) {
        for (acc, b) in into.iter_mut().zip(self.waits.iter()) {
            *acc += b.load(Ordering::Relaxed);
        }
    }
}

/// Where the monitor thread parks while nothing is in flight; a worker that finds work after
/// parking wakes it (an atomic check; a syscall only when the monitor is parked).
pub(crate) struct MonitorPark {
    parked: AtomicBool,
    unparker: Unparker,
    parker: Mutex<Option<Parker>>,
}

impl MonitorPark {
    pub(crate) fn new() -> Self {
        let parker = Parker::new();
        MonitorPark {
            parked: AtomicBool::new(false),
            unparker: parker.unparker().clone(),
            parker: Mutex::new(Some(parker)),
        }
    }
}

/// One core that needs more workers now: raise its `active` count by `add`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Growth {
    /// 0-based core.
    pub core: usize,
    pub add: usize,
}

/// A growth in progress: `claim_growth` claimed the slots, `commit_growth` routes to them.
#[derive(Debug, PartialEq, Eq)]
pub struct GrowthClaim {
    pub core: usize,
    /// The `active` count it was claimed against, and the new one.
    pub from: usize,
    pub to: usize,
    /// Slots whose thread must be started before `commit_growth`.
    pub spawn: Vec<(usize, usize)>,
}

impl<J: Job> Scheduler<J> {
    /// The cores whose every target worker has been executing its current token since at least
    /// `busy_for_ns` before `now` (`clock::now_ns`) while tokens for the core queue, and how
    /// many workers each needs: one per queued token, up to the slots it has left. Pool tokens
    /// of a weight several cores accept are counted once, for the first of them (heavy work
    /// prefers core 1) and after what idle workers of earlier cores will take. Nothing while
    /// the gate is paused (the pool feeds no mailbox then).
    pub fn growth_plan(&self, now: u64, busy_for_ns: u64) -> Vec<Growth> {
        if self.is_shutdown() {
            return Vec::new();
        }
        let mut pool = if self.is_paused() {
            [0; 3]
        } else {
            [0, 1, 2].map(|w| self.pool_len_w[w].load(Ordering::Acquire))
        };
        let mut out = Vec::new();
        for (c, cs) in self.cores.iter().enumerate() {
            let mut take = |mut budget: usize| {
                let mut got = 0;
                for (w, n) in pool.iter_mut().enumerate() {
                    if cs.accepts[w] && budget > 0 {
                        let t = (*n).min(budget);
                        *n -= t;
                        budget -= t;
                        got += t;
                    }
                }
                got
            };
            let end = self.target_end(c);
            let (mut targets, mut idle, mut stuck) = (0usize, 0usize, true);
            for w in cs.workers[..end].iter().filter(|w| w.serves()) {
                targets += 1;
                if w.started.load(Ordering::Acquire) <= w.ended() {
                    idle += 1;
                    stuck = false;
                } else if w.figures.busy_since().saturating_add(busy_for_ns) > now {
                    stuck = false;
                }
            }
            if !stuck || targets == 0 {
                take(idle); // its idle workers will pull these from the pool themselves
                continue;
            }
            let blocked = cs.blocked.load(Ordering::Acquire);
            let active = cs.active.load(Ordering::Acquire);
            let room = cs.workers.len().saturating_sub(blocked + active);
            if room == 0 {
                continue;
            }
            let queued: usize = cs.workers.iter().map(|w| w.mailbox.len()).sum();
            let mut add = queued.min(room);
            add += take(room - add);
            if add > 0 {
                out.push(Growth { core: c, add });
            }
        }
        out
    }

    /// Claims the slots `g` needs (see `claim_for_active`): start their threads, then
    /// `commit_growth` (or `unclaim_spawn` those that failed and drop the claim).
    pub fn claim_growth(&self, g: Growth) -> Option<GrowthClaim> {
        let cs = self.cores.get(g.core)?;
        let from = cs.active.load(Ordering::Acquire);
        let to = (from + g.add).min(cs.workers.len());
        if to <= from {
            return None;
        }
        let spawn = self.claim_for_active(g.core, to).ok()?;
        Some(GrowthClaim {
            core: g.core,
            from,
            to,
            spawn,
        })
    }

    /// Raises the core's `active` count as claimed, unless it changed meanwhile (`set_active`
    /// from the convergence loop wins then; the threads started stay idle until asked for).
    /// Returns whether it did.
    pub fn commit_growth(&self, c: &GrowthClaim) -> bool {
        let cs = &self.cores[c.core];
        if cs
            .active
            .compare_exchange(c.from, c.to, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        cs.grown.fetch_add(1, Ordering::Relaxed);
        cs.grown_workers
            .fetch_add((c.to - c.from) as u64, Ordering::Relaxed);
        self.wake_core(c.core);
        true
    }

    /// Something changes whenever a token is accepted, starts or finishes (each of these holds
    /// the GIL in the binding): the monitor compares two readings.
    pub fn activity(&self) -> u64 {
        let mut n = self.accepted.load(Ordering::Acquire);
        for cs in self.cores.iter() {
            for w in cs.workers.iter() {
                if w.spawned.load(Ordering::Relaxed) {
                    n = n
                        .wrapping_add(w.started.load(Ordering::Acquire))
                        .wrapping_add(w.ended());
                }
            }
        }
        n
    }

    /// Records the CPU-time clock of the thread of slot `(core, wi)` (the binding reads it to
    /// tell computing workers from waiting ones).
    pub fn set_thread_clock(&self, core: usize, wi: usize, clock: i64) {
        self.cores[core].workers[wi]
            .figures
            .clock
            .store(clock, Ordering::Relaxed);
    }

    /// The slots and CPU-time clocks of core `core`'s target workers that execute a token now.
    pub fn busy_target_clocks(&self, core: usize) -> Vec<(usize, i64)> {
        let cs = &self.cores[core];
        let end = self.target_end(core);
        cs.workers[..end]
            .iter()
            .enumerate()
            .filter(|(_, w)| w.serves() && w.started.load(Ordering::Acquire) > w.ended())
            .map(|(wi, w)| (wi, w.figures.clock.load(Ordering::Relaxed)))
            .filter(|&(_, c)| c != NO_CLOCK)
            .collect()
    }

    /// Tokens queued for core `core`: in its mailboxes, plus the pool tokens of the weights it
    /// accepts (0 while paused).
    pub fn queued_for(&self, core: usize) -> usize {
        let cs = &self.cores[core];
        let pool: usize = if self.is_paused() {
            0
        } else {
            (0..3)
                .filter(|&w| cs.accepts[w])
                .map(|w| self.pool_len_w[w].load(Ordering::Acquire))
                .sum()
        };
        pool + cs.workers.iter().map(|w| w.mailbox.len()).sum::<usize>()
    }

    /// How many of core `core`'s target workers execute a token right now.
    pub fn busy_targets(&self, core: usize) -> usize {
        let cs = &self.cores[core];
        let end = self.target_end(core);
        cs.workers[..end]
            .iter()
            .filter(|w| {
                w.blocked.load(Ordering::Acquire) == SLOT_RUNNABLE
                    && w.started.load(Ordering::Acquire) > w.ended()
            })
            .count()
    }

    /// Hands the monitor's parker to the monitor thread (once).
    pub fn take_monitor_parker(&self) -> Option<Parker> {
        lock(&self.monitor.parker).take()
    }

    /// Wakes the monitor if it is parked.
    #[inline]
    pub fn wake_monitor(&self) {
        fence(Ordering::SeqCst);
        let m = &self.monitor;
        if m.parked.load(Ordering::Relaxed) && m.parked.swap(false, Ordering::SeqCst) {
            m.unparker.unpark();
        }
    }

    /// The monitor parks (for at most `timeout`) unless work is in flight or the scheduler
    /// shuts down; a worker that finds work after parking wakes it. Returns whether it parked.
    pub fn park_monitor(&self, parker: &Parker, timeout: Duration) -> bool {
        let m = &self.monitor;
        m.parked.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if self.in_flight() > 0 || self.is_shutdown() {
            m.parked.store(false, Ordering::SeqCst);
            return false;
        }
        parker.park_timeout(timeout);
        m.parked.store(false, Ordering::SeqCst);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Config, Overflow, Scheduler};
    use super::*;
    use crate::clock::now_ns;
    use crate::router::{Priority, Weight};
    use crate::state::Header;
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

    const MS: u64 = 1_000_000;

    fn sched(cores: usize, wpc: usize, max: usize) -> S {
        let s = Scheduler::new(Config {
            cores,
            workers_per_core: wpc,
            max_workers_per_core: max,
            mailbox_capacity: 8,
            pool_capacity: 1_000,
            overflow: Overflow::Reject,
            first_id: 1,
            memory_budget: None,
        })
        .unwrap();
        for c in 0..cores {
            for wi in 0..wpc {
                assert!(s.claim_spawn(c, wi));
            }
        }
        s
    }

    fn submit(s: &S, w: Weight) -> Arc<TestJob> {
        let j = Arc::new(TestJob {
            header: Header::new(s.next_id(), w, Priority::Normal),
        });
        s.try_submit(j.clone()).unwrap();
        j
    }

    /// Worker `(core, wi)` takes its next job and starts it (and keeps running it).
    fn start_next(s: &S, core: usize, wi: usize) -> Arc<TestJob> {
        let j = s.next_job(core, wi).expect("a job");
        assert!(s.start(core, wi, &j.header));
        j
    }

    #[test]
    fn buckets_are_log2_microseconds() {
        assert_eq!(wait_bucket(0), 0);
        assert_eq!(wait_bucket(999), 0);
        assert_eq!(wait_bucket(1_000), 1);
        assert_eq!(wait_bucket(1_999), 1);
        assert_eq!(wait_bucket(2_000), 2);
        assert_eq!(wait_bucket(1_000_000), 10); // 1 ms: [512, 1024) µs
        assert_eq!(wait_bucket(u64::MAX), WAIT_BUCKETS - 1);
        assert_eq!(bucket_upper_us(10), 1024);
    }

    #[test]
    fn a_core_whose_workers_are_all_stuck_grows_by_what_queues() {
        let s = sched(1, 2, 8);
        for _ in 0..5 {
            submit(&s, Weight::Heavy);
        }
        let _a = start_next(&s, 0, 0);
        let _b = start_next(&s, 0, 1);
        let now = now_ns();
        // just started: not yet
        assert_eq!(s.growth_plan(now, 10 * MS), vec![]);
        // busy long enough, three tokens queue: three more workers
        let plan = s.growth_plan(now + 20 * MS, 10 * MS);
        assert_eq!(plan, vec![Growth { core: 0, add: 3 }]);
        let claim = s.claim_growth(plan[0]).unwrap();
        assert_eq!((claim.from, claim.to), (2, 5));
        assert_eq!(claim.spawn, vec![(0, 2), (0, 3), (0, 4)]);
        assert!(s.commit_growth(&claim));
        assert_eq!(s.active(0), 5);
        let st = s.stats().per_core[0].clone();
        assert_eq!((st.grown_on_demand, st.grown_workers), (1, 3));
        // the new workers take the queued tokens (stealing from their siblings' mailboxes)
        for wi in 2..5 {
            start_next(&s, 0, wi);
        }
        assert!(s.next_job(0, 4).is_none());
        assert_eq!(s.busy_targets(0), 5);
        // nothing queues now: no growth however long they run
        assert_eq!(s.growth_plan(now + 100 * MS, 10 * MS), vec![]);
    }

    #[test]
    fn an_idle_worker_means_no_growth() {
        let s = sched(1, 2, 8);
        for _ in 0..3 {
            submit(&s, Weight::Heavy);
        }
        let _a = start_next(&s, 0, 0);
        // worker 1 has not started its token: it is not stuck
        assert_eq!(s.growth_plan(now_ns() + 50 * MS, MS), vec![]);
    }

    #[test]
    fn growth_stops_at_max_workers_per_core() {
        let s = sched(1, 1, 3);
        for _ in 0..7 {
            submit(&s, Weight::Medium);
        }
        let _a = start_next(&s, 0, 0);
        let plan = s.growth_plan(now_ns() + 50 * MS, MS);
        assert_eq!(plan, vec![Growth { core: 0, add: 2 }], "3 slots: 2 more");
        let claim = s.claim_growth(plan[0]).unwrap();
        assert!(s.commit_growth(&claim));
        let _b = start_next(&s, 0, 1);
        let _c = start_next(&s, 0, 2);
        assert_eq!(
            s.growth_plan(now_ns() + 100 * MS, MS),
            vec![],
            "no slot left"
        );
    }

    #[test]
    fn pool_backlog_is_counted_once_for_the_cores_sharing_a_weight() {
        // two cores, one worker each, heavy tokens may run on both
        let s = sched(2, 1, 8);
        for _ in 0..20 {
            submit(&s, Weight::Heavy);
        }
        let _a = start_next(&s, 0, 0);
        let _b = start_next(&s, 1, 0);
        let st = s.stats();
        let queued: usize = st.per_core.iter().map(|c| c.queue_depth).sum::<usize>() + st.pool_len;
        assert_eq!(queued, 18);
        let plan = s.growth_plan(now_ns() + 50 * MS, MS);
        let total: usize = plan.iter().map(|g| g.add).sum();
        assert!(total <= 14, "at most 7 more per core: {plan:?}");
        assert_eq!(plan[0].core, 0, "heavy work grows core 1 first: {plan:?}");
        assert_eq!(plan[0].add, 7);
    }

    #[test]
    fn a_changed_active_count_wins_over_a_growth_in_progress() {
        let s = sched(1, 1, 4);
        submit(&s, Weight::Heavy);
        submit(&s, Weight::Heavy);
        let _a = start_next(&s, 0, 0);
        let plan = s.growth_plan(now_ns() + 50 * MS, MS);
        let claim = s.claim_growth(plan[0]).unwrap();
        // the convergence loop sets a count meanwhile
        s.set_active(0, 3).unwrap();
        assert!(!s.commit_growth(&claim));
        assert_eq!(s.active(0), 3);
        assert_eq!(s.stats().per_core[0].grown_on_demand, 0);
    }

    #[test]
    fn nothing_grows_while_paused_or_blocked_slots_fill_the_core() {
        let s = sched(1, 1, 2);
        s.pause();
        submit(&s, Weight::Heavy);
        submit(&s, Weight::Heavy);
        assert_eq!(s.growth_plan(now_ns() + 50 * MS, MS), vec![]);
        s.unpause();
        let _a = start_next(&s, 0, 0);
        // worker 0 blocks inside its task: slot 1 compensates and is the only target
        let h = s.block(0, 0, true);
        assert_eq!(h.spawn, vec![(0, 1)]);
        let _b = start_next(&s, 0, 1);
        submit(&s, Weight::Heavy);
        assert_eq!(
            s.growth_plan(now_ns() + 50 * MS, MS),
            vec![],
            "every slot is taken (one blocked, one active)"
        );
        s.unblock(0, 0, true);
    }

    #[test]
    fn figures_record_waits_and_busy_time() {
        let s = sched(1, 1, 2);
        let j = submit(&s, Weight::Heavy);
        let got = start_next(&s, 0, 0);
        assert_eq!(got.header.id, j.header.id);
        s.finish(0, 0, &got.header, true).unwrap();
        s.release(0, 0);
        let st = s.stats().per_core[0].clone();
        assert_eq!(st.wait_histogram.iter().sum::<u64>(), 1);
        let started = got.header.started_ns().unwrap();
        let finished = got.header.finished_ns().unwrap();
        assert_eq!(st.busy_ns, finished - started);
        assert!(s.activity() >= 3, "accepted, started, finished");
    }

    #[test]
    fn the_monitor_parks_only_while_nothing_is_in_flight() {
        let s = sched(1, 1, 2);
        let p = s.take_monitor_parker().unwrap();
        assert!(s.take_monitor_parker().is_none());
        assert!(s.park_monitor(&p, Duration::from_millis(1)));
        submit(&s, Weight::Heavy);
        assert!(
            !s.park_monitor(&p, Duration::from_secs(5)),
            "work in flight"
        );
        // a wake while parked ends the park at once
        let s = Arc::new(sched(1, 1, 2));
        let p = s.take_monitor_parker().unwrap();
        let s2 = s.clone();
        let t = std::thread::spawn(move || {
            let started = std::time::Instant::now();
            assert!(s2.park_monitor(&p, Duration::from_secs(30)));
            started.elapsed()
        });
        while !s.monitor.parked.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        s.wake_monitor();
        assert!(t.join().unwrap() < Duration::from_secs(30));
    }
}
