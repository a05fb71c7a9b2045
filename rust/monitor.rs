//! The growth monitor: one thread per runtime (when `grow_on_demand`) that gives a core more
//! workers within about a millisecond when every worker of the core has been executing its
//! token for a while and tokens for it queue (`Scheduler::growth_plan`), the way
//! `ThreadPoolExecutor` starts a thread for a submission that finds none idle. Shrinking back
//! is the Python convergence loop's job (`tokengate.policy.convergence`).
//!
//! Workers that have executed one token for long are either waiting with the GIL released (a
//! sleep, I/O, a lock, hashing) — another worker helps then — or waiting *for* the GIL behind
//! other Python code, as every worker does under a stream of tiny tokens: another thread
//! contending for the GIL would only slow that down. The monitor tells the two apart before it
//! grows a core:
//!
//! 1. it takes the GIL itself (its thread keeps a Python thread state, so this is only the
//!    lock): if that takes longer than `PROBE_FAST`, the GIL is busy (someone runs Python and
//!    the others wait for their switch interval); it does not grow and does not look again for
//!    `BACKOFF`;
//! 2. it lets the GIL go and watches the core's activity (tokens accepted, started, finished:
//!    each needs the GIL) for `CONFIRM`: threads that were only waiting for the GIL take it at
//!    once and run tokens; threads that wait on something else do not. Little activity: grow.
//!
//! It ticks every `TICK` while tokens are in flight, and parks once nothing has been in flight
//! for `IDLE_AFTER`; a worker that finds work after parking wakes it (`Scheduler::wake_monitor`,
//! an atomic check on a path that already made a syscall), so an idle coordinator costs no CPU.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_utils::sync::Parker;
use pyo3::prelude::*;

use crate::clock::now_ns;
use crate::runtime::Shared;
use crate::sync::lock;

/// How long every target worker of a core must have been executing its current token.
pub(crate) const BUSY_FOR: Duration = Duration::from_millis(1);
const TICK: Duration = Duration::from_millis(1);
const IDLE_AFTER: Duration = Duration::from_millis(50);
const IDLE_PARK: Duration = Duration::from_secs(1);
const PROBE_FAST: Duration = Duration::from_micros(500);
const CONFIRM: Duration = Duration::from_micros(200);
/// More activity than this during `CONFIRM` means the GIL, not a wait, holds the workers.
const CONFIRM_ACTIVITY: u64 = 8;
const BACKOFF: Duration = Duration::from_millis(20);

/// What the monitor did (`stats()["growth"]`).
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) running: std::sync::atomic::AtomicBool,
    /// Ticks at which some core qualified (`growth_plan` non-empty).
    pub(crate) pressure: AtomicU64,
    /// Of those, how often the GIL was busy (no growth, back off) or the workers came back
    /// to life once the monitor let the GIL go (no growth).
    pub(crate) gil_busy: AtomicU64,
    pub(crate) gil_waiters: AtomicU64,
    /// Growths applied, and workers added by them.
    pub(crate) grown: AtomicU64,
    pub(crate) workers_added: AtomicU64,
}

/// Starts the monitor thread of `shared` (its handle joins the workers'). Returns false if the
/// thread could not be started (the runtime then runs without on-demand growth).
pub(crate) fn start(shared: &Arc<Shared>) -> bool {
    let Some(parker) = shared.sched.take_monitor_parker() else {
        return false;
    };
    let me = shared.clone();
    let handle = std::thread::Builder::new()
        .name("tg-grow-monitor".into())
        .stack_size(256 << 10)
        .spawn(move || main(me, parker));
    match handle {
        Ok(h) => {
            shared.growth.running.store(true, Ordering::Release);
            lock(&shared.threads).push((h.thread().id(), h));
            true
        }
        Err(_) => false,
    }
}

fn main(shared: Arc<Shared>, parker: Parker) {
    // Keep a Python thread state for the thread's life (as workers do): each probe then only
    // takes the GIL, and no thread state is created or deleted per probe.
    let sh = shared.clone();
    let run = move || run(&sh, &parker);
    if Python::try_attach(|py| py.detach(run)).is_none() {
        // The interpreter is finalizing: no growth any more.
    }
    shared.growth.running.store(false, Ordering::Release);
}

fn run(shared: &Arc<Shared>, parker: &Parker) {
    let sched = &shared.sched;
    let busy_for = BUSY_FOR.as_nanos() as u64;
    let mut idle_since: Option<Instant> = None;
    let mut quiet_until = Instant::now();
    loop {
        if sched.is_shutdown() || shared.forked() {
            return;
        }
        if sched.in_flight() == 0 {
            let since = *idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= IDLE_AFTER {
                sched.park_monitor(parker, IDLE_PARK);
                idle_since = None;
                continue;
            }
        } else {
            idle_since = None;
        }
        if Instant::now() >= quiet_until && !sched.growth_plan(now_ns(), busy_for).is_empty() {
            shared.growth.pressure.fetch_add(1, Ordering::Relaxed);
            match gil_free() {
                None => return, // finalizing
                Some(false) => {
                    shared.growth.gil_busy.fetch_add(1, Ordering::Relaxed);
                    quiet_until = Instant::now() + BACKOFF;
                }
                Some(true) => {
                    let before = sched.activity();
                    spin_for(CONFIRM);
                    if sched.activity().wrapping_sub(before) > CONFIRM_ACTIVITY {
                        shared.growth.gil_waiters.fetch_add(1, Ordering::Relaxed);
                    } else {
                        grow(shared, busy_for);
                    }
                }
            }
        }
        parker.park_timeout(TICK);
    }
}

/// Whether this thread got the GIL within `PROBE_FAST`; `None` if the interpreter is
/// finalizing.
fn gil_free() -> Option<bool> {
    let t0 = Instant::now();
    Python::try_attach(|_py| ())?;
    Some(t0.elapsed() <= PROBE_FAST)
}

fn spin_for(d: Duration) {
    let until = Instant::now() + d;
    while Instant::now() < until {
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// Applies the current growth plan: starts the threads the new targets need, then routes to
/// them.
fn grow(shared: &Arc<Shared>, busy_for: u64) {
    let sched = &shared.sched;
    for g in sched.growth_plan(now_ns(), busy_for) {
        let Some(claim) = sched.claim_growth(g) else {
            continue;
        };
        if sched.is_shutdown() || shared.forked() {
            for (c, wi) in claim.spawn {
                sched.unclaim_spawn(c, wi);
            }
            return;
        }
        if let Err((_, unstarted)) = shared.spawn_workers(claim.spawn.clone()) {
            for (c, wi) in unstarted {
                sched.unclaim_spawn(c, wi);
            }
            continue; // the threads that did start stay idle until asked for
        }
        if sched.commit_growth(&claim) {
            shared.growth.grown.fetch_add(1, Ordering::Relaxed);
            shared
                .growth
                .workers_added
                .fetch_add((claim.to - claim.from) as u64, Ordering::Relaxed);
        }
    }
}
