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
//!    once and run tokens; threads that wait on something else do not. Then it takes the GIL
//!    once more (a thread that took it meanwhile and runs Python shows up here). Little
//!    activity and a free GIL: the workers wait on something else.
//! 3. It reads the CPU time of the core's busy workers (Linux thread CPU clocks) from one tick
//!    to the next (over the `CONFIRM` window where no earlier reading exists): workers that
//!    compute with the GIL released (hashing) keep the core's CPU busy, and more threads on it
//!    would only time-slice. A core whose busy workers used half a CPU or more (pinned; with
//!    `pin_workers=False` half a CPU per busy worker, up to the CPUs there are) does not grow.
//!    This is a heuristic: a computing worker that the host deschedules (steal time) or that
//!    waits for the GIL between two GIL-releasing calls reads as waiting, so a CPU-bound core
//!    can still grow now and then; it then time-slices its CPU until convergence shrinks it.
//!
//! It ticks every `TICK` while tokens are in flight, and parks once nothing has been in flight
//! for `IDLE_AFTER`; a worker that finds work after parking wakes it (`Scheduler::wake_monitor`,
//! an atomic check on a path that already made a syscall), so an idle coordinator costs no CPU.

use std::collections::HashMap;
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
/// The shortest tick-to-tick window a CPU reading is used over.
const MIN_CPU_WINDOW_NS: u64 = 500_000;
/// After workers took the GIL at once, or every qualifying core was computing.
const SHORT_BACKOFF: Duration = Duration::from_millis(5);

/// What the monitor did (`stats()["growth"]`).
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) running: std::sync::atomic::AtomicBool,
    /// Rounds of the monitor loop (one per `TICK` while tokens are in flight).
    pub(crate) ticks: AtomicU64,
    /// Cores that qualified but whose busy workers were computing (no growth).
    pub(crate) cpu_bound: AtomicU64,
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
    let mut watch = CpuWatch::default();
    loop {
        if sched.is_shutdown() || shared.forked() {
            return;
        }
        if sched.in_flight() == 0 {
            let since = *idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= IDLE_AFTER {
                // Still idle after the park (its timeout is only a safety net): park again at
                // once; work in flight resets `idle_since` below.
                sched.park_monitor(parker, IDLE_PARK);
                continue;
            }
        } else {
            idle_since = None;
        }
        shared.growth.ticks.fetch_add(1, Ordering::Relaxed);
        watch.tick(shared);
        let plan = if Instant::now() >= quiet_until {
            sched.growth_plan(now_ns(), busy_for)
        } else {
            Vec::new()
        };
        if !plan.is_empty() {
            shared.growth.pressure.fetch_add(1, Ordering::Relaxed);
            let cores: Vec<usize> = plan.iter().map(|g| g.core).collect();
            match check(shared, &cores, &watch) {
                Verdict::Finalizing => return,
                Verdict::GilBusy => {
                    shared.growth.gil_busy.fetch_add(1, Ordering::Relaxed);
                    quiet_until = Instant::now() + BACKOFF;
                }
                Verdict::GilWaiters => {
                    shared.growth.gil_waiters.fetch_add(1, Ordering::Relaxed);
                    quiet_until = Instant::now() + SHORT_BACKOFF;
                }
                Verdict::Grow { computing } => {
                    shared
                        .growth
                        .cpu_bound
                        .fetch_add(computing.len() as u64, Ordering::Relaxed);
                    if computing.len() == cores.len() {
                        quiet_until = Instant::now() + SHORT_BACKOFF;
                    } else {
                        grow(shared, busy_for, &computing);
                    }
                }
            }
        }
        parker.park_timeout(TICK);
    }
}

enum Verdict {
    Finalizing,
    /// Someone runs Python: the workers wait for the GIL.
    GilBusy,
    /// Threads took the GIL and ran tokens as soon as the monitor let it go.
    GilWaiters,
    /// The workers wait on something else; the cores in `computing` kept their CPU busy.
    Grow {
        computing: Vec<usize>,
    },
}

/// Steps 1-3 of the module doc for the qualifying `cores`.
fn check(shared: &Arc<Shared>, cores: &[usize], watch: &CpuWatch) -> Verdict {
    let sched = &shared.sched;
    match gil_free() {
        None => return Verdict::Finalizing,
        Some(false) => return Verdict::GilBusy,
        Some(true) => {}
    }
    let cpu_before = cpu_times(shared, cores);
    let (t0, before) = (Instant::now(), sched.activity());
    spin_for(CONFIRM);
    let after = sched.activity();
    let cpu_after = cpu_times(shared, cores);
    let wall = t0.elapsed().as_nanos() as u64;
    if after.wrapping_sub(before) > CONFIRM_ACTIVITY {
        return Verdict::GilWaiters;
    }
    match gil_free() {
        None => return Verdict::Finalizing,
        Some(false) => return Verdict::GilBusy,
        Some(true) => {}
    }
    let computing = cores
        .iter()
        .zip(cpu_before.iter().zip(cpu_after.iter()))
        .filter(|(c, ((b, _), (a, n)))| match watch.usage.get(c) {
            Some(&(used, m)) => computing(shared, used, m),
            None => computing(shared, a.saturating_sub(*b) as f64 / wall.max(1) as f64, *n),
        })
        .map(|(&c, _)| c)
        .collect();
    Verdict::Grow { computing }
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

/// CPU time (ns) used so far by the busy target workers of each of `cores`, and how many were
/// read.
fn cpu_times(shared: &Arc<Shared>, cores: &[usize]) -> Vec<(u64, usize)> {
    cores
        .iter()
        .map(|&c| {
            let clocks = shared.sched.busy_target_clocks(c);
            let n = clocks.len();
            (clocks.into_iter().filter_map(|(_, k)| clock_ns(k)).sum(), n)
        })
        .collect()
}

/// CPU readings of the busy workers of cores with queued tokens, kept from one tick to the
/// next: over a whole tick the share of a CPU those workers used is far less noisy than over
/// the short confirmation window (which is used where no earlier reading exists, e.g. when
/// tokens just started to queue).
#[derive(Default)]
struct CpuWatch {
    /// `(core, slot) -> (wall ns, cpu ns)` of the last tick.
    last: HashMap<(usize, usize), (u64, u64)>,
    /// Per core: CPUs its busy workers used since the last tick, if every one of them had a
    /// reading there.
    usage: HashMap<usize, (f64, usize)>,
}

impl CpuWatch {
    fn tick(&mut self, shared: &Arc<Shared>) {
        let sched = &shared.sched;
        let mut next = HashMap::new();
        self.usage.clear();
        for c in 0..sched.cores() {
            if sched.queued_for(c) == 0 {
                continue;
            }
            let (mut used, mut n, mut complete) = (0.0, 0usize, true);
            for (wi, clock) in sched.busy_target_clocks(c) {
                let Some(cpu) = clock_ns(clock) else {
                    complete = false;
                    continue;
                };
                let wall = now_ns();
                match self.last.get(&(c, wi)) {
                    Some(&(w0, c0)) if wall > w0 + MIN_CPU_WINDOW_NS => {
                        used += cpu.saturating_sub(c0) as f64 / (wall - w0) as f64;
                        n += 1;
                    }
                    _ => complete = false,
                }
                next.insert((c, wi), (wall, cpu));
            }
            if complete && n > 0 {
                self.usage.insert(c, (used, n));
            }
        }
        self.last = next;
    }
}

/// Whether busy workers that used `used` CPUs (`n` of them) keep their core's CPU busy.
fn computing(shared: &Shared, used: f64, n: usize) -> bool {
    let cap = if shared.pin { 1 } else { n.clamp(1, cpus()) };
    used >= 0.5 * cap as f64
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The CPU-time clock of the calling thread (`None` where there is none to read from another
/// thread).
pub(crate) fn this_thread_clock() -> Option<i64> {
    #[cfg(target_os = "linux")]
    {
        let mut id: libc::clockid_t = 0;
        // SAFETY: pthread_self() is the calling thread; `id` is a valid out pointer.
        if unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut id) } == 0 {
            return Some(id as i64);
        }
    }
    None
}

/// Nanoseconds of CPU time on `clock` (a thread CPU-time clock), `None` if it cannot be read
/// (e.g. the thread exited).
fn clock_ns(clock: i64) -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the valid timespec we pass; an invalid clock id only
    // makes it fail.
    let r = unsafe { libc::clock_gettime(clock as libc::clockid_t, &mut ts) };
    (r == 0).then(|| ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// Applies the current growth plan but for the cores in `skip`: starts the threads the new
/// targets need, then routes to them.
fn grow(shared: &Arc<Shared>, busy_for: u64, skip: &[usize]) {
    let sched = &shared.sched;
    for g in sched.growth_plan(now_ns(), busy_for) {
        if skip.contains(&g.core) {
            continue;
        }
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
