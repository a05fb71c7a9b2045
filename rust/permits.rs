//! Permits: storage tiers, per-key concurrency limits and per-key rate limits.
//!
//! A job that must hold a permit while it runs asks a [`Limiter`] for one under a *key* (an
//! operation name, a tenant tag value, or one fixed key for a storage tier). If every limit
//! allows it, the permit is taken at once ([`Admit::Now`]). Otherwise the limiter keeps the job
//! (it is *held*): it occupies no worker and no queue slot. Whenever a permit frees
//! ([`Limiter::release`]), time passes for a rate limit ([`Limiter::poll`]) or the limits are
//! raised ([`Limiter::set_conf`]), the limiter hands back the held jobs that now hold a permit
//! and the caller enqueues them. Nothing is ever dropped: every job given to `acquire` comes
//! back exactly once: from `acquire` itself, in [`Granted::jobs`] (it holds a permit), in
//! [`Granted::dead`] (it was no longer wanted when its turn came; it holds no permit), or from
//! [`Limiter::take_all`] / [`Limiter::purge`] (no permit either).
//!
//! Limits ([`LimitConf`]), each optional; a grant needs all of them to allow it:
//! - `per_key`: holders of one key at once;
//! - `total`: holders of all keys together (the storage tiers: SLOW 10, MODERATE 25, FAST 50,
//!   INSANE 70 concurrent runs);
//! - `rate`: a GCRA per key. With the emission interval `T = 1/per_second` and the burst `b`,
//!   a grant conforms if `now >= TAT - (b-1)*T`, and then `TAT = max(TAT, now) + T`. Over any
//!   window of length `W` a key gets at most `b + W*per_second` grants (no fixed-window double
//!   bursts). `T` is rounded *up* to whole nanoseconds, so the bound holds exactly.
//!
//! Order: held jobs are served FIFO within a key and round robin across keys. A key with held
//! jobs is filed where the limit that blocks it will wake it: nowhere if its own `per_key`
//! bound is reached (its own release wakes it), in a heap ordered by due time if it waits for
//! its rate (`poll` pops what is due, `next_due` peeks), in the round-robin ring if it waits
//! only for a `total` permit. A freed `total` permit goes to the first key of the ring that
//! every limit allows; a key that got a permit goes to the back of the ring. So with `total =
//! 1`, a key with 1000 held jobs and one with 10 alternate. Keys are checked lazily: a ring or
//! heap entry is re-examined when it is reached, so a dead job or a key whose state changed
//! meanwhile needs no search (stale entries are skipped).
//! While a key has held jobs, a new job of that key is held behind them (even if its rate came
//! due and nobody has polled yet), so nothing overtakes within a key.
//!
//! Keys are created on first use and forgotten once they have no holder, no held job and no
//! rate state that still matters (`TAT <= now`: a fresh key would behave the same), so a stream
//! of one-off tenant ids does not grow memory. An idle key whose TAT is still ahead is
//! forgotten by the first `release`/`poll`/`set_conf` after its TAT.
//!
//! Clock: `now_ns` is any monotonic nanosecond clock, the same for every call. Callers on
//! several threads read it before they take the lock, so calls may arrive slightly out of
//! order: the limiter uses the largest `now_ns` it has seen.
//!
//! Locking: one std `Mutex`, held for short critical sections. A `J` is never dropped while it
//! is held (dropping a job may run arbitrary code that calls back into the limiter): dead jobs
//! are returned, never dropped. `alive` runs under the lock: it must be cheap, must not call
//! into this limiter (it would deadlock) and must not panic (if it does, the jobs that call had
//! already granted are dropped after the lock is released and their permits stay taken).
//!
//! Cost: `acquire` is one lock and one hash lookup (plus an allocation for a new key);
//! `release` is one lookup, O(1) amortised plus O(log n) per rate key that came due, plus the
//! jobs it returns; `poll` pops only the due keys from the heap, it never scans all keys.
//! `set_conf`, `take_all`, `purge` and `key_stats` are O(keys + held).

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::mem;
use std::sync::{Arc, Mutex};

use crate::sync::lock;

/// Buckets of [`LimiterStats::wait_hist`]: bucket `i` counts held waits of `2^i` to
/// `2^(i+1) - 1` ns (bucket 0 also counts waits of 0 ns).
pub const WAIT_BUCKETS: usize = 64;

/// The longest emission interval (about 146 years); slower rates are rounded up to it.
const MAX_INTERVAL_NS: u64 = 1 << 62;

/// A GCRA rate limit: `burst` calls may go at once, then one every `1/per_second` seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    /// Sustained grants per second (finite, above 0).
    pub per_second: f64,
    /// Grants that may go at once (at least 1).
    pub burst: u32,
}

/// The limits of one [`Limiter`]; `None` means unlimited. `Default` limits nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LimitConf {
    /// Most holders at once for each key.
    pub per_key: Option<usize>,
    /// Most holders at once across all keys (storage tiers use this).
    pub total: Option<usize>,
    /// A rate limit for each key.
    pub rate: Option<Rate>,
}

impl LimitConf {
    /// Checks every field; the message names the field, its value and what is valid.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(n) = self.per_key {
            if n < 1 {
                return Err(format!("per_key must be at least 1 (or None), got {n}"));
            }
        }
        if let Some(n) = self.total {
            if n < 1 {
                return Err(format!("total must be at least 1 (or None), got {n}"));
            }
        }
        if let Some(r) = &self.rate {
            if !(r.per_second.is_finite() && r.per_second > 0.0) {
                return Err(format!(
                    "rate.per_second must be a finite number above 0, got {}",
                    r.per_second
                ));
            }
            if r.burst < 1 {
                return Err(format!("rate.burst must be at least 1, got {}", r.burst));
            }
        }
        Ok(())
    }
}

/// What [`Limiter::acquire`] did with the job.
#[must_use = "a job admitted now holds a permit: run it, then release its key"]
#[derive(Debug, PartialEq, Eq)]
pub enum Admit<J> {
    /// The job holds a permit of its key: run it, then call `release` with the same key.
    Now(J),
    /// The limiter keeps the job; it comes back from a later `release`/`poll`/`set_conf`, or
    /// from `take_all`/`purge`.
    Held,
}

/// Held jobs handed back by [`Limiter::release`], [`Limiter::poll`] or [`Limiter::set_conf`].
#[must_use = "granted jobs hold permits and dead jobs must be disposed of"]
#[derive(Debug, PartialEq, Eq)]
pub struct Granted<J> {
    /// Jobs that now hold a permit of their key, in grant order (round robin across keys,
    /// FIFO within a key): enqueue them in this order; each must later `release` its key.
    pub jobs: Vec<J>,
    /// Held jobs for which `alive` said false when their turn came: they hold no permit. Drop
    /// them (or settle them) after the call, outside the limiter.
    pub dead: Vec<J>,
}

impl<J> Default for Granted<J> {
    fn default() -> Self {
        Granted {
            jobs: Vec::new(),
            dead: Vec::new(),
        }
    }
}

impl<J> Granted<J> {
    /// Nothing granted and nothing dead.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty() && self.dead.is_empty()
    }
}

/// A snapshot of a limiter's gauges and counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimiterStats {
    /// Jobs holding a permit now.
    pub holders: usize,
    /// Jobs held (waiting for a permit) now.
    pub held: usize,
    /// Permits given, at once or after a wait.
    pub granted: u64,
    /// Permits given to held jobs (a subset of `granted`).
    pub delayed: u64,
    /// Sum of the held waits (grant time minus acquire time), in ns.
    pub wait_ns_sum: u64,
    /// The longest held wait, in ns.
    pub wait_ns_max: u64,
    /// Held waits in log2 buckets (see [`WAIT_BUCKETS`]); they sum to `delayed`.
    pub wait_hist: [u64; WAIT_BUCKETS],
    /// Held jobs returned as dead (by `release`/`poll`/`set_conf` or `purge`).
    pub dead: u64,
    /// `release` calls for a key without a holder (a caller bug; they changed nothing).
    pub stray_releases: u64,
    /// Keys the limiter remembers now.
    pub keys: usize,
}

impl Default for LimiterStats {
    fn default() -> Self {
        LimiterStats {
            holders: 0,
            held: 0,
            granted: 0,
            delayed: 0,
            wait_ns_sum: 0,
            wait_ns_max: 0,
            wait_hist: [0; WAIT_BUCKETS],
            dead: 0,
            stray_releases: 0,
            keys: 0,
        }
    }
}

impl LimiterStats {
    /// The `q` quantile (0 to 1) of the held waits in seconds, interpolated inside its log2
    /// bucket (so within a factor of 2), never above `wait_ns_max`; `None` if no held job was
    /// granted yet or `q` is NaN. Waits of jobs granted at once are not included.
    pub fn wait_quantile(&self, q: f64) -> Option<f64> {
        let n: u64 = self.wait_hist.iter().sum();
        if n == 0 || q.is_nan() {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as u64).clamp(1, n);
        let mut seen = 0u64;
        for (i, &c) in self.wait_hist.iter().enumerate() {
            if c == 0 {
                continue;
            }
            if seen + c >= rank {
                let lo = if i == 0 { 0.0 } else { (1u64 << i) as f64 };
                let hi = 2f64.powi(i as i32 + 1);
                let v = lo + (hi - lo) * ((rank - seen) as f64 / c as f64);
                return Some(v.min(self.wait_ns_max as f64) / 1e9);
            }
            seen += c;
        }
        None
    }

    /// The mean held wait in seconds; `None` if no held job was granted yet.
    pub fn wait_mean(&self) -> Option<f64> {
        (self.delayed > 0).then(|| self.wait_ns_sum as f64 / self.delayed as f64 / 1e9)
    }
}

/// The bucket of [`LimiterStats::wait_hist`] for a wait of `ns`.
#[inline]
fn wait_bucket(ns: u64) -> usize {
    63 - (ns | 1).leading_zeros() as usize
}

/// GCRA parameters in ns.
#[derive(Clone, Copy, Debug)]
struct Gcra {
    /// Emission interval.
    t: u64,
    /// Tolerance: `(burst - 1) * t`.
    tau: u64,
}

impl Gcra {
    fn new(r: &Rate) -> Self {
        let t = (1e9 / r.per_second).ceil();
        let t = if t >= MAX_INTERVAL_NS as f64 {
            MAX_INTERVAL_NS
        } else {
            (t as u64).max(1)
        };
        Gcra {
            t,
            tau: t.saturating_mul(u64::from(r.burst.max(1)) - 1),
        }
    }

    /// The first time a call conforms.
    #[inline]
    fn due(&self, tat: u64) -> u64 {
        tat.saturating_sub(self.tau)
    }

    /// The TAT after a conforming call at `now`.
    #[inline]
    fn next_tat(&self, tat: u64, now: u64) -> u64 {
        tat.max(now).saturating_add(self.t)
    }

    /// The largest TAT a key can have at `now` (a full burst just taken).
    #[inline]
    fn cap(&self, now: u64) -> u64 {
        now.saturating_add(self.tau).saturating_add(self.t)
    }

    /// A key's TAT under `self` after its rate changed from `old`: the part of its budget it
    /// had used (`tat - now` in `old` intervals) stays used, at most a full burst.
    fn convert(&self, old: &Gcra, tat: u64, now: u64) -> u64 {
        if tat <= now {
            return tat;
        }
        let used = (u128::from(tat - now) * u128::from(self.t)).div_ceil(u128::from(old.t));
        now.saturating_add(u64::try_from(used).unwrap_or(u64::MAX))
            .min(self.cap(now))
    }
}

/// Why a key's oldest held job cannot have a permit now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Block {
    /// Its key has `per_key` holders: its own release wakes it.
    PerKey,
    /// Its rate does not conform before this time.
    Rate(u64),
    /// Every `total` permit is taken: any release wakes it.
    Total,
}

struct Held<J> {
    job: J,
    /// When it was held (limiter clock).
    since: u64,
    /// Its priority lane (0 first): a key's held jobs are served by lane, FIFO within one.
    prio: u8,
}

/// Queues `h` behind every held job of its lane or a more urgent one (FIFO within a lane; a
/// plain push when all share a lane, the usual case).
fn insert_by_prio<J>(q: &mut VecDeque<Held<J>>, h: Held<J>) {
    let mut at = q.len();
    while at > 0 && q[at - 1].prio > h.prio {
        at -= 1;
    }
    q.insert(at, h);
}

struct Key<J> {
    name: Arc<str>,
    /// Bumped when the slot is forgotten: ring and heap entries of an older generation are
    /// stale.
    gen: u32,
    holders: usize,
    held: VecDeque<Held<J>>,
    /// GCRA theoretical arrival time (0: fresh).
    tat: u64,
    /// Exactly one current-generation entry of this key is in the ring.
    in_ring: bool,
    /// The key is filed in the due heap at this time (entries with another time are stale).
    due: Option<u64>,
    /// An entry of this key is in the expiry heap.
    expiring: bool,
}

/// Heap entry: (time, slot, generation), earliest first.
type Timed = Reverse<(u64, usize, u32)>;

struct Inner<J> {
    conf: LimitConf,
    gcra: Option<Gcra>,
    index: HashMap<Arc<str>, usize>,
    slots: Vec<Key<J>>,
    free: Vec<usize>,
    /// Keys whose turn comes when a `total` permit frees, or that a release or a due rate
    /// made eligible again: (slot, generation).
    ring: VecDeque<(usize, u32)>,
    /// Keys waiting for their rate, by due time.
    due: BinaryHeap<Timed>,
    /// Idle keys whose TAT is ahead, by TAT: forgotten once it passes.
    expiry: BinaryHeap<Timed>,
    holders: usize,
    held: usize,
    /// The largest `now_ns` seen.
    now: u64,
    empty: Arc<str>,
    stats: LimiterStats,
}

impl<J> Inner<J> {
    fn new(conf: LimitConf) -> Self {
        Inner {
            conf,
            gcra: conf.rate.as_ref().map(Gcra::new),
            index: HashMap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            ring: VecDeque::new(),
            due: BinaryHeap::new(),
            expiry: BinaryHeap::new(),
            holders: 0,
            held: 0,
            now: 0,
            empty: Arc::from(""),
            stats: LimiterStats::default(),
        }
    }

    #[inline]
    fn tick(&mut self, now_ns: u64) -> u64 {
        self.now = self.now.max(now_ns);
        self.now
    }

    #[inline]
    fn total_full(&self) -> bool {
        self.conf.total.is_some_and(|t| self.holders >= t)
    }

    /// The slot of `name`, created if needed.
    fn key_index(&mut self, name: &str) -> usize {
        if let Some(&i) = self.index.get(name) {
            return i;
        }
        let name: Arc<str> = Arc::from(name);
        let idx = match self.free.pop() {
            Some(i) => {
                self.slots[i].name = name.clone();
                i
            }
            None => {
                self.slots.push(Key {
                    name: name.clone(),
                    gen: 0,
                    holders: 0,
                    held: VecDeque::new(),
                    tat: 0,
                    in_ring: false,
                    due: None,
                    expiring: false,
                });
                self.slots.len() - 1
            }
        };
        self.index.insert(name, idx);
        idx
    }

    /// What keeps `k` from taking a permit at `now`, if anything.
    #[inline]
    fn blocker(&self, k: &Key<J>, now: u64) -> Option<Block> {
        if self.conf.per_key.is_some_and(|p| k.holders >= p) {
            return Some(Block::PerKey);
        }
        if let Some(g) = &self.gcra {
            let due = g.due(k.tat);
            if now < due {
                return Some(Block::Rate(due));
            }
        }
        if self.total_full() {
            return Some(Block::Total);
        }
        None
    }

    /// Counts a permit of `idx` taken at `now`.
    #[inline]
    fn take_permit(&mut self, idx: usize, now: u64) {
        let k = &mut self.slots[idx];
        k.holders += 1;
        if let Some(g) = &self.gcra {
            k.tat = g.next_tat(k.tat, now);
        }
        self.holders += 1;
        self.stats.granted += 1;
    }

    fn record_wait(&mut self, ns: u64) {
        let s = &mut self.stats;
        s.delayed += 1;
        s.wait_ns_sum = s.wait_ns_sum.saturating_add(ns);
        s.wait_ns_max = s.wait_ns_max.max(ns);
        s.wait_hist[wait_bucket(ns)] += 1;
    }

    fn ring_push(&mut self, idx: usize) {
        let k = &mut self.slots[idx];
        if !k.in_ring {
            k.in_ring = true;
            self.ring.push_back((idx, k.gen));
        }
    }

    /// Files key `idx` (which has held jobs) where `block` will wake it.
    fn file(&mut self, idx: usize, block: Block) {
        match block {
            Block::PerKey => {}
            Block::Rate(at) => {
                let k = &mut self.slots[idx];
                if k.due != Some(at) {
                    k.due = Some(at);
                    self.due.push(Reverse((at, idx, k.gen)));
                }
            }
            Block::Total => self.ring_push(idx),
        }
    }

    /// Takes a ring turn of key `idx`: returns its dead front jobs, grants its oldest live held
    /// job if every limit allows it (and puts the key back at the end of the ring if more
    /// wait), else files the key where its blocking limit will wake it.
    fn visit(&mut self, idx: usize, now: u64, alive: &dyn Fn(&J) -> bool, out: &mut Granted<J>) {
        loop {
            let front_alive = self.slots[idx].held.front().map(|h| alive(&h.job));
            match front_alive {
                None => {
                    self.slots[idx].due = None;
                    self.settle(idx, now);
                    return;
                }
                Some(true) => break,
                Some(false) => {
                    if let Some(h) = self.slots[idx].held.pop_front() {
                        self.held -= 1;
                        self.stats.dead += 1;
                        out.dead.push(h.job);
                    }
                }
            }
        }
        if let Some(block) = self.blocker(&self.slots[idx], now) {
            self.file(idx, block);
            return;
        }
        if let Some(h) = self.slots[idx].held.pop_front() {
            self.held -= 1;
            self.take_permit(idx, now);
            self.record_wait(now.saturating_sub(h.since));
            out.jobs.push(h.job);
            if !self.slots[idx].held.is_empty() {
                self.ring_push(idx);
            }
        }
    }

    /// Serves the ring until it is empty or every `total` permit is taken.
    fn pump(&mut self, now: u64, alive: &dyn Fn(&J) -> bool, out: &mut Granted<J>) {
        while !self.total_full() {
            let Some((idx, gen)) = self.ring.pop_front() else {
                break;
            };
            let k = &mut self.slots[idx];
            if k.gen != gen || !k.in_ring {
                continue;
            }
            k.in_ring = false;
            self.visit(idx, now, alive, out);
        }
    }

    /// Moves the keys whose rate came due to the ring, and forgets idle keys whose TAT passed.
    fn advance(&mut self, now: u64) {
        while let Some(&Reverse((at, idx, gen))) = self.due.peek() {
            if at > now {
                break;
            }
            self.due.pop();
            let k = &mut self.slots[idx];
            if k.gen == gen && k.due == Some(at) {
                k.due = None;
                self.ring_push(idx);
            }
        }
        while let Some(&Reverse((at, idx, gen))) = self.expiry.peek() {
            if at > now {
                break;
            }
            self.expiry.pop();
            let k = &mut self.slots[idx];
            if k.gen == gen {
                k.expiring = false;
                self.settle(idx, now);
            }
        }
    }

    /// Forgets key `idx` if it is idle and its rate state no longer matters; an idle key whose
    /// TAT is ahead waits in the expiry heap.
    fn settle(&mut self, idx: usize, now: u64) {
        let k = &mut self.slots[idx];
        if k.holders != 0 || !k.held.is_empty() {
            return;
        }
        if self.gcra.is_none() || k.tat <= now {
            self.forget(idx);
        } else if !k.expiring {
            k.expiring = true;
            self.expiry.push(Reverse((k.tat, idx, k.gen)));
        }
    }

    fn forget(&mut self, idx: usize) {
        let k = &mut self.slots[idx];
        let name = mem::replace(&mut k.name, self.empty.clone());
        self.index.remove(&*name);
        k.gen = k.gen.wrapping_add(1);
        k.holders = 0;
        // Empty, so no job is dropped; a new deque frees a large backlog's buffer.
        k.held = VecDeque::new();
        k.tat = 0;
        k.in_ring = false;
        k.due = None;
        k.expiring = false;
        self.free.push(idx);
    }

    /// Slots of the remembered keys, in slot order.
    fn live_keys(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self.index.values().copied().collect();
        v.sort_unstable();
        v
    }
}

/// Permits for jobs of type `J`, under per-key and total concurrency limits and per-key
/// rates (see the module documentation). `Send + Sync` when `J: Send`.
pub struct Limiter<J> {
    inner: Mutex<Inner<J>>,
}

impl<J> Limiter<J> {
    /// A limiter with the limits `conf` (checked with [`LimitConf::validate`]).
    pub fn new(conf: LimitConf) -> Result<Self, String> {
        conf.validate()?;
        Ok(Limiter {
            inner: Mutex::new(Inner::new(conf)),
        })
    }

    /// Takes a permit of `key` for `job` if the limits allow it now and no older job of `key`
    /// is held ([`Admit::Now`]: the caller runs the job and releases `key` afterwards); else
    /// holds the job (FIFO per key) and it comes back later.
    pub fn acquire(&self, key: &str, job: J, now_ns: u64) -> Admit<J> {
        self.acquire_in_lane(key, job, 1, now_ns)
    }

    /// `acquire` for a job of priority lane `prio` (0 first): held, it waits behind the held
    /// jobs of its key of the same or a more urgent lane only.
    pub fn acquire_in_lane(&self, key: &str, job: J, prio: u8, now_ns: u64) -> Admit<J> {
        let mut g = lock(&self.inner);
        let s = &mut *g;
        let now = s.tick(now_ns);
        let idx = s.key_index(key);
        let k = &s.slots[idx];
        // A key with a backlog is already filed where it will be woken.
        let backlog = !k.held.is_empty();
        let block = if backlog { None } else { s.blocker(k, now) };
        if !backlog && block.is_none() {
            s.take_permit(idx, now);
            return Admit::Now(job);
        }
        insert_by_prio(
            &mut s.slots[idx].held,
            Held {
                job,
                since: now,
                prio,
            },
        );
        s.held += 1;
        if let Some(block) = block {
            s.file(idx, block);
        }
        Admit::Held
    }

    /// A holder of `key` finished: frees its permit and returns the held jobs that now hold
    /// one (they count as holders): of `key`, or of any key whose turn came (the freed `total`
    /// permit, a rate that came due), plus the dead held jobs met on the way. Releasing a key
    /// without a holder changes nothing but `stats().stray_releases`.
    pub fn release(&self, key: &str, now_ns: u64, alive: impl Fn(&J) -> bool) -> Granted<J> {
        // Declared before the guard so that, should `alive` panic, these drop after unlocking.
        let mut out = Granted::default();
        let mut g = lock(&self.inner);
        let s = &mut *g;
        let now = s.tick(now_ns);
        s.advance(now);
        match s.index.get(key) {
            Some(&idx) if s.slots[idx].holders > 0 => {
                s.slots[idx].holders -= 1;
                s.holders = s.holders.saturating_sub(1);
                let k = &s.slots[idx];
                if k.held.is_empty() {
                    s.settle(idx, now);
                } else if !k.in_ring && k.due.is_none() {
                    // It waited for its own per-key bound: its turn comes in the ring.
                    s.ring_push(idx);
                }
            }
            _ => s.stats.stray_releases += 1,
        }
        s.pump(now, &alive, &mut out);
        drop(g);
        out
    }

    /// Time passed: grants the held jobs whose rate conforms now, as far as the concurrency
    /// limits allow. Call it at [`Limiter::next_due`].
    pub fn poll(&self, now_ns: u64, alive: impl Fn(&J) -> bool) -> Granted<J> {
        let mut out = Granted::default();
        let mut g = lock(&self.inner);
        let s = &mut *g;
        let now = s.tick(now_ns);
        s.advance(now);
        s.pump(now, &alive, &mut out);
        drop(g);
        out
    }

    /// The earliest time (ns, the callers' clock) at which `poll` could grant a held job that
    /// waits for its rate (it may be in the past: poll now); `None` if no held job waits for a
    /// rate. A key that also waits for a `total` permit is woken by the release that frees it.
    pub fn next_due(&self) -> Option<u64> {
        let mut g = lock(&self.inner);
        let s = &mut *g;
        while let Some(&Reverse((at, idx, gen))) = s.due.peek() {
            let k = &s.slots[idx];
            if k.gen == gen && k.due == Some(at) && !k.held.is_empty() {
                return Some(at);
            }
            s.due.pop();
        }
        None
    }

    /// Changes the limits at runtime and returns the held jobs the new limits grant at once.
    /// Lowering a bound never revokes a permit: holders above it simply finish, and nothing
    /// more is granted until they are below it. Under a new rate, the part of its budget a key
    /// had used stays used (in new intervals, at most a full burst); removing the rate forgets
    /// it. On an invalid `conf` nothing changes.
    pub fn set_conf(
        &self,
        conf: LimitConf,
        now_ns: u64,
        alive: impl Fn(&J) -> bool,
    ) -> Result<Granted<J>, String> {
        conf.validate()?;
        let mut out = Granted::default();
        let mut g = lock(&self.inner);
        let s = &mut *g;
        let now = s.tick(now_ns);
        let old = s.gcra;
        s.conf = conf;
        s.gcra = conf.rate.as_ref().map(Gcra::new);
        let gcra = s.gcra;
        // Keys waiting their turn keep it; every other key with held jobs queues behind them;
        // the pump files each one afresh under the new limits.
        let mut order = Vec::with_capacity(s.ring.len());
        for (idx, gen) in mem::take(&mut s.ring) {
            let k = &mut s.slots[idx];
            if k.gen == gen && k.in_ring {
                k.in_ring = false;
                order.push(idx);
            }
        }
        s.due.clear();
        s.expiry.clear();
        let keys = s.live_keys();
        for &idx in &keys {
            let k = &mut s.slots[idx];
            k.due = None;
            k.expiring = false;
            k.tat = match (&old, &gcra) {
                (Some(old), Some(new)) => new.convert(old, k.tat, now),
                _ => 0,
            };
        }
        for idx in order {
            s.ring_push(idx);
        }
        for &idx in &keys {
            if s.slots[idx].held.is_empty() {
                s.settle(idx, now);
            } else {
                s.ring_push(idx);
            }
        }
        s.pump(now, &alive, &mut out);
        drop(g);
        Ok(out)
    }

    /// The current limits.
    pub fn conf(&self) -> LimitConf {
        lock(&self.inner).conf
    }

    /// Removes every held job (the coordinator stops and kills them); they hold no permit.
    /// Holders keep theirs and still release them.
    pub fn take_all(&self) -> Vec<J> {
        let mut out = Vec::new();
        let mut g = lock(&self.inner);
        let s = &mut *g;
        out.reserve(s.held);
        let keys = s.live_keys();
        for &idx in &keys {
            let k = &mut s.slots[idx];
            out.extend(k.held.drain(..).map(|h| h.job));
            k.in_ring = false;
            k.due = None;
        }
        s.ring.clear();
        s.due.clear();
        s.held = 0;
        let now = s.now;
        for idx in keys {
            s.settle(idx, now);
        }
        drop(g);
        out
    }

    /// Removes the held jobs for which `alive` says false, wherever they are in their queue
    /// (`release`/`poll` only meet the dead at the head of a queue); they hold no permit.
    /// O(held): for a periodic sweep of timed-out or killed held jobs.
    pub fn purge(&self, alive: impl Fn(&J) -> bool) -> Vec<J> {
        let mut dead = Vec::new();
        let mut g = lock(&self.inner);
        let s = &mut *g;
        let keys = s.live_keys();
        for &idx in &keys {
            let k = &mut s.slots[idx];
            // Ask first, move after: a panicking `alive` leaves the queue intact.
            let keep: Vec<bool> = k.held.iter().map(|h| alive(&h.job)).collect();
            if keep.iter().all(|&b| b) {
                continue;
            }
            let before = dead.len();
            for (h, keep) in mem::take(&mut k.held).into_iter().zip(keep) {
                if keep {
                    k.held.push_back(h);
                } else {
                    dead.push(h.job);
                }
            }
            if k.held.is_empty() {
                // Nothing waits for its rate any more (a ring entry just finds it empty).
                k.due = None;
            }
            let n = dead.len() - before;
            s.held -= n;
            s.stats.dead += n as u64;
        }
        let now = s.now;
        for idx in keys {
            s.settle(idx, now);
        }
        drop(g);
        dead
    }

    /// Moves the first held job for which `pred` holds to lane `prio` (keeping its wait
    /// time), or, with `prio` None, only says whether one is held. O(held): an operator's
    /// action, not a per-job one.
    pub fn relane(&self, pred: impl Fn(&J) -> bool, prio: Option<u8>) -> bool {
        let mut g = lock(&self.inner);
        let s = &mut *g;
        for idx in s.live_keys() {
            let k = &mut s.slots[idx];
            let Some(pos) = k.held.iter().position(|h| pred(&h.job)) else {
                continue;
            };
            if let Some(p) = prio {
                let mut h = k.held.remove(pos).expect("position is in range");
                h.prio = p;
                insert_by_prio(&mut k.held, h);
            }
            return true;
        }
        false
    }

    /// Calls `f` on each held job (key by key, in priority order within a key) until it
    /// returns false; returns false if it stopped early.
    pub fn visit(&self, mut f: impl FnMut(&J) -> bool) -> bool {
        let g = lock(&self.inner);
        g.live_keys()
            .into_iter()
            .all(|idx| g.slots[idx].held.iter().all(|h| f(&h.job)))
    }

    /// A snapshot of the gauges and counters.
    pub fn stats(&self) -> LimiterStats {
        let g = lock(&self.inner);
        let mut st = g.stats.clone();
        st.holders = g.holders;
        st.held = g.held;
        st.keys = g.index.len();
        st
    }

    /// Up to `limit` keys as `(key, holders, held)`, biggest backlog first (then most holders,
    /// then by name), for the dashboard. O(keys).
    pub fn key_stats(&self, limit: usize) -> Vec<(String, usize, usize)> {
        let g = lock(&self.inner);
        let mut v: Vec<(usize, usize, &str)> = g
            .index
            .values()
            .map(|&i| {
                let k = &g.slots[i];
                (k.held.len(), k.holders, &*k.name)
            })
            .collect();
        fn cmp(a: &(usize, usize, &str), b: &(usize, usize, &str)) -> Ordering {
            b.0.cmp(&a.0).then(b.1.cmp(&a.1)).then(a.2.cmp(b.2))
        }
        if limit < v.len() {
            v.select_nth_unstable_by(limit, cmp);
            v.truncate(limit);
        }
        v.sort_unstable_by(cmp);
        v.into_iter()
            .map(|(held, holders, name)| (name.to_string(), holders, held))
            .collect()
    }
}

#[cfg(test)]
impl<J> Limiter<J> {
    /// Checks the internal invariants; `quiescent`: no key with held jobs could take a permit
    /// now (true after any call, as long as time moves only with `poll`).
    fn check(&self, quiescent: bool) {
        let g = lock(&self.inner);
        let s = &*g;
        assert_eq!(s.index.len() + s.free.len(), s.slots.len());
        let (mut holders, mut held) = (0, 0);
        for (name, &idx) in &s.index {
            let k = &s.slots[idx];
            assert_eq!(&k.name, name);
            holders += k.holders;
            held += k.held.len();
            if !k.held.is_empty() {
                let filed = k.in_ring
                    || k.due
                        .is_some_and(|at| s.due.iter().any(|e| e.0 == (at, idx, k.gen)))
                    || s.conf.per_key.is_some_and(|p| k.holders >= p);
                assert!(filed, "key {name} has held jobs but nothing will wake it");
                if quiescent {
                    assert!(
                        s.blocker(k, s.now).is_some(),
                        "key {name} could take a permit"
                    );
                }
            } else if k.holders == 0 {
                assert!(
                    s.gcra.is_some() && k.tat > s.now && k.expiring,
                    "idle key {name} should be forgotten"
                );
            }
        }
        assert_eq!(holders, s.holders);
        assert_eq!(held, s.held);
        assert!(s.ring.is_empty() || s.total_full());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::cell::RefCell;
    use std::collections::{HashMap, HashSet};
    use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering as AO};
    use std::sync::Weak;

    const MS: u64 = 1_000_000;
    const SEC: u64 = 1_000_000_000;

    fn all<J>(_: &J) -> bool {
        true
    }

    fn conf(per_key: Option<usize>, total: Option<usize>, rate: Option<(f64, u32)>) -> LimitConf {
        LimitConf {
            per_key,
            total,
            rate: rate.map(|(per_second, burst)| Rate { per_second, burst }),
        }
    }

    fn now<J: std::fmt::Debug>(a: Admit<J>) -> J {
        match a {
            Admit::Now(j) => j,
            Admit::Held => panic!("expected a permit now"),
        }
    }

    #[test]
    fn limiter_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Limiter<Box<u8>>>();
        check::<Granted<Box<u8>>>();
    }

    #[test]
    fn visit_sees_every_held_job_and_stops_when_told() {
        let l = Limiter::new(conf(Some(1), None, None)).unwrap();
        assert_eq!(now(l.acquire("a", 1, 0)), 1);
        for job in [2, 3] {
            assert_eq!(l.acquire("a", job, 0), Admit::Held);
        }
        assert_eq!(now(l.acquire("b", 10, 0)), 10);
        assert_eq!(l.acquire("b", 11, 0), Admit::Held);
        let mut seen = Vec::new();
        assert!(l.visit(|j| {
            seen.push(*j);
            true
        }));
        seen.sort_unstable();
        assert_eq!(
            seen,
            vec![2, 3, 11],
            "holders are not listed, held jobs all are"
        );
        let mut first = Vec::new();
        assert!(!l.visit(|j| {
            first.push(*j);
            false
        }));
        assert_eq!(first.len(), 1);
    }

    #[test]
    fn per_key_bound_holds_fifo_and_release_hands_on() {
        let l = Limiter::new(conf(Some(2), None, None)).unwrap();
        assert_eq!(now(l.acquire("a", 1, 0)), 1);
        assert_eq!(now(l.acquire("a", 2, 0)), 2);
        assert_eq!(l.acquire("a", 3, 0), Admit::Held);
        assert_eq!(l.acquire("a", 4, 0), Admit::Held);
        // Another key is not affected.
        assert_eq!(now(l.acquire("b", 10, 0)), 10);
        let st = l.stats();
        assert_eq!((st.holders, st.held, st.keys, st.granted), (3, 2, 2, 3));
        assert_eq!(l.release("a", 5, all).jobs, vec![3]);
        assert_eq!(l.release("a", 7, all).jobs, vec![4]);
        assert!(l.release("a", 8, all).is_empty());
        l.check(true);
        let st = l.stats();
        assert_eq!((st.holders, st.held, st.delayed), (2, 0, 2));
        assert_eq!(st.wait_ns_sum, 5 + 7);
        assert_eq!(st.wait_ns_max, 7);
    }

    #[test]
    fn total_permits_alternate_between_keys() {
        let l = Limiter::new(conf(None, Some(1), None)).unwrap();
        assert_eq!(now(l.acquire("a", 0u32, 0)), 0);
        for i in 1..=1000 {
            assert_eq!(l.acquire("a", i, 0), Admit::Held);
        }
        for i in 0..10 {
            assert_eq!(l.acquire("b", 10_000 + i, 0), Admit::Held);
        }
        let mut running = ("a", 0u32);
        let mut order = Vec::new();
        for t in 1..=1010u64 {
            let g = l.release(running.0, t, all);
            assert_eq!(g.jobs.len(), 1, "one total permit freed, one granted");
            let j = g.jobs[0];
            running = (if j >= 10_000 { "b" } else { "a" }, j);
            order.push(j);
            l.check(true);
        }
        // A and B alternate: B's 10 jobs are done within the first 20 grants, each in order.
        let b_pos: Vec<usize> = (0..order.len()).filter(|&i| order[i] >= 10_000).collect();
        assert_eq!(b_pos, (0..10).map(|i| 2 * i + 1).collect::<Vec<_>>());
        let a: Vec<u32> = order.iter().copied().filter(|&j| j < 10_000).collect();
        assert_eq!(a, (1..=1000).collect::<Vec<_>>());
        let b: Vec<u32> = order.iter().copied().filter(|&j| j >= 10_000).collect();
        assert_eq!(b, (10_000..10_010).collect::<Vec<_>>());
        assert!(l.release(running.0, 2000, all).is_empty());
        assert_eq!(l.stats().keys, 0);
    }

    #[test]
    fn per_key_limits_are_independent_of_other_backlogs() {
        let l = Limiter::new(conf(Some(2), None, None)).unwrap();
        let mut a_now = 0;
        for i in 0..10_000u32 {
            if let Admit::Now(_) = l.acquire("tenant-a", i, 0) {
                a_now += 1;
            }
        }
        assert_eq!(a_now, 2);
        // B's jobs are not behind A's 9 998 held ones: its first two run at once...
        assert_eq!(now(l.acquire("tenant-b", 100_000, 1)), 100_000);
        assert_eq!(now(l.acquire("tenant-b", 100_001, 1)), 100_001);
        for i in 2..10 {
            assert_eq!(l.acquire("tenant-b", 100_000 + i, 1), Admit::Held);
        }
        // ...and each B release grants the next B job at once, never one of A's.
        for i in 2..10 {
            assert_eq!(l.release("tenant-b", 2, all).jobs, vec![100_000 + i]);
        }
        assert_eq!(l.stats().held, 9_998);
        assert_eq!(
            l.key_stats(10),
            vec![
                ("tenant-a".to_string(), 2, 9_998),
                ("tenant-b".to_string(), 2, 0)
            ]
        );
        assert_eq!(l.key_stats(1), vec![("tenant-a".to_string(), 2, 9_998)]);
        assert!(l.key_stats(0).is_empty());
        // Raising per_key grants A's backlog up to the new bound at once.
        let g = l.set_conf(conf(Some(100), None, None), 3, all).unwrap();
        assert_eq!(g.jobs, (2..100).collect::<Vec<_>>());
        l.check(true);
    }

    #[test]
    fn raising_limits_grants_lowering_never_revokes() {
        let l = Limiter::new(conf(None, Some(2), None)).unwrap();
        now(l.acquire("a", 1, 0));
        now(l.acquire("b", 2, 0));
        for j in 3..9 {
            assert_eq!(
                l.acquire(if j % 2 == 0 { "a" } else { "b" }, j, 0),
                Admit::Held
            );
        }
        let g = l.set_conf(conf(None, Some(5), None), 1, all).unwrap();
        assert_eq!(g.jobs, vec![3, 4, 5], "round robin in ring order: b, a, b");
        assert_eq!(l.stats().holders, 5);
        // Lowering: nobody loses a permit, and nothing is granted while above the bound.
        let g = l.set_conf(conf(None, Some(2), None), 2, all).unwrap();
        assert!(g.is_empty());
        assert_eq!((l.stats().holders, l.stats().held), (5, 3));
        assert_eq!(l.acquire("c", 9, 2), Admit::Held);
        assert!(l.release("a", 3, all).is_empty()); // 4 holders
        assert!(l.release("b", 3, all).is_empty()); // 3 holders
        assert!(l.release("a", 3, all).is_empty()); // 2 holders: still at the bound
        l.check(true);
        // 1 holder: the permit goes to the first key in the ring.
        assert_eq!(l.release("b", 3, all).jobs, vec![6]);
        assert_eq!(l.conf(), conf(None, Some(2), None));
        // Removing the bound grants everything.
        let g = l.set_conf(LimitConf::default(), 4, all).unwrap();
        assert_eq!(g.jobs.len(), 3);
        assert_eq!(l.stats().held, 0);
        l.check(true);
    }

    #[test]
    fn lowering_per_key_waits_for_holders_to_finish() {
        let l = Limiter::new(conf(Some(3), None, None)).unwrap();
        for j in 0..3 {
            now(l.acquire("a", j, 0));
        }
        assert_eq!(l.acquire("a", 3, 0), Admit::Held);
        assert!(l
            .set_conf(conf(Some(1), None, None), 0, all)
            .unwrap()
            .is_empty());
        assert!(l.release("a", 1, all).is_empty());
        assert!(l.release("a", 1, all).is_empty());
        assert!(l.release("a", 1, all).jobs == vec![3]);
        l.check(true);
    }

    #[test]
    fn held_jobs_are_served_by_lane_fifo_within_one_and_can_change_lane() {
        let l = Limiter::new(conf(Some(1), None, None)).unwrap();
        let _first = now(l.acquire("k", 0u32, 0));
        for (job, prio) in [(1, 2), (2, 2), (3, 0), (4, 1), (5, 0)] {
            assert!(matches!(l.acquire_in_lane("k", job, prio, 0), Admit::Held));
        }
        assert!(
            l.relane(|&j| j == 2, Some(0)),
            "2 moves to the urgent lane, behind 3 and 5"
        );
        assert!(l.relane(|&j| j == 4, None));
        assert!(!l.relane(|&j| j == 9, Some(0)));
        let mut order = Vec::new();
        for _ in 0..5 {
            let g = l.release("k", 0, all);
            order.extend(g.jobs);
        }
        assert_eq!(order, vec![3, 5, 2, 4, 1]);
    }

    #[test]
    fn dead_jobs_are_skipped_and_returned() {
        let l = Limiter::new(conf(Some(1), None, None)).unwrap();
        now(l.acquire("a", 0u32, 0));
        for j in 1..=5 {
            assert_eq!(l.acquire("a", j, 0), Admit::Held);
        }
        // 1 and 2 were killed while held: the permit goes to 3.
        let g = l.release("a", 1, |&j| j > 2);
        assert_eq!((g.jobs, g.dead), (vec![3], vec![1, 2]));
        // All the rest died: the permit goes to nobody and the key is forgotten.
        let g = l.release("a", 2, |_| false);
        assert_eq!((g.jobs, g.dead), (vec![], vec![4, 5]));
        let st = l.stats();
        assert_eq!((st.dead, st.keys, st.holders, st.held), (4, 0, 0, 0));
        l.check(true);
    }

    #[test]
    fn purge_removes_dead_anywhere_in_the_queue() {
        let l = Limiter::new(conf(Some(1), None, None)).unwrap();
        now(l.acquire("a", 0u32, 0));
        for j in 1..=6 {
            assert_eq!(l.acquire("a", j, 0), Admit::Held);
        }
        assert_eq!(l.purge(|&j| j % 2 == 1), vec![2, 4, 6]);
        assert_eq!(l.stats().held, 3);
        l.check(true);
        assert_eq!(l.release("a", 1, all).jobs, vec![1]);
        assert_eq!(l.purge(|_| false), vec![3, 5]);
        l.check(true);
        assert!(l.release("a", 2, all).is_empty());
        assert_eq!(l.stats().keys, 0);
    }

    #[test]
    fn purge_of_a_rate_backlog_clears_its_due_time() {
        let l = Limiter::new(conf(None, None, Some((10.0, 1)))).unwrap();
        now(l.acquire("k", 0u32, 0));
        assert_eq!(l.acquire("k", 1, 0), Admit::Held);
        assert_eq!(l.next_due(), Some(100 * MS));
        assert_eq!(l.purge(|_| false), vec![1]);
        assert_eq!(l.next_due(), None);
        assert_eq!(lock(&l.inner).slots[0].due, None);
        l.check(true);
        // A new backlog is filed afresh and granted when due.
        assert_eq!(l.acquire("k", 2, 50 * MS), Admit::Held);
        assert_eq!(l.next_due(), Some(100 * MS));
        assert_eq!(l.poll(100 * MS, all).jobs, vec![2]);
        assert_eq!(l.next_due(), None);
        l.check(true);
    }

    #[test]
    fn take_all_returns_every_held_job() {
        let l = Limiter::new(conf(Some(1), Some(3), Some((1.0, 1)))).unwrap();
        let mut held = Vec::new();
        let mut holders = Vec::new();
        for j in 0..40u32 {
            let key = ["a", "b", "c", "d", "e"][j as usize % 5];
            match l.acquire(key, j, 0) {
                Admit::Now(j) => holders.push((key, j)),
                Admit::Held => held.push(j),
            }
        }
        assert_eq!(holders.len(), 3);
        let mut all_held = l.take_all();
        all_held.sort_unstable();
        assert_eq!(all_held, held);
        assert_eq!(l.stats().held, 0);
        assert_eq!(l.next_due(), None);
        l.check(true);
        // Holders still release; their keys are forgotten once their TAT has passed.
        for (key, _) in holders {
            assert!(l.release(key, 10, all).is_empty());
        }
        assert!(l.poll(2 * SEC, all).is_empty());
        assert_eq!(l.stats().keys, 0);
        assert!(l.take_all().is_empty());
    }

    #[test]
    fn idle_keys_are_forgotten() {
        let l = Limiter::new(conf(Some(1), None, None)).unwrap();
        for i in 0..1000 {
            let key = format!("tenant-{i}");
            now(l.acquire(&key, i, 0));
            assert!(l.release(&key, 0, all).is_empty());
        }
        assert_eq!(l.stats().keys, 0);
        // Slots are reused.
        assert_eq!(lock(&l.inner).slots.len(), 1);

        // A rate key is remembered while its TAT is ahead (a fresh key would allow a burst).
        let l = Limiter::new(conf(None, None, Some((10.0, 2)))).unwrap();
        for i in 0..100u64 {
            let key = format!("tenant-{i}");
            now(l.acquire(&key, i, i * MS));
            assert!(l.release(&key, i * MS, all).is_empty());
        }
        assert_eq!(l.stats().keys, 100);
        l.check(true);
        // Key i has TAT i ms + 100 ms.
        assert!(l.poll(150 * MS, all).is_empty());
        assert_eq!(l.stats().keys, 49);
        l.check(true);
        assert!(l.poll(SEC, all).is_empty());
        assert_eq!(l.stats().keys, 0);
        assert!(lock(&l.inner).expiry.is_empty());
    }

    #[test]
    fn a_key_reused_while_expiring_is_not_forgotten() {
        let l = Limiter::new(conf(None, None, Some((10.0, 1)))).unwrap();
        now(l.acquire("k", 1, 0));
        assert!(l.release("k", 0, all).is_empty()); // idle, TAT 100 ms
        now(l.acquire("k", 2, 100 * MS)); // TAT 200 ms
        assert!(l.poll(150 * MS, all).is_empty());
        assert_eq!(l.stats().keys, 1);
        assert!(l.release("k", 150 * MS, all).is_empty());
        l.check(true);
        assert!(l.poll(199 * MS, all).is_empty());
        assert_eq!(l.stats().keys, 1);
        // The limiter still enforces the rate: a fresh key would allow this one at once.
        assert_eq!(l.acquire("k", 3, 199 * MS), Admit::Held);
        assert_eq!(l.next_due(), Some(200 * MS));
        assert_eq!(l.poll(200 * MS, all).jobs, vec![3]);
    }

    #[test]
    fn gcra_burst_then_one_per_interval() {
        let l = Limiter::new(conf(None, None, Some((10.0, 3)))).unwrap();
        let mut admitted = 0;
        for j in 0..10u32 {
            if let Admit::Now(_) = l.acquire("k", j, 0) {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 3, "the burst goes at once");
        // TAT is now 300 ms; the next call conforms at TAT - 2T = 100 ms.
        assert_eq!(l.next_due(), Some(100 * MS));
        assert!(l.poll(100 * MS - 1, all).is_empty());
        let mut got = Vec::new();
        let mut t = 100 * MS;
        for _ in 0..7 {
            assert_eq!(l.next_due(), Some(t));
            let g = l.poll(t, all);
            assert_eq!(g.jobs.len(), 1, "one per interval");
            got.extend(g.jobs);
            l.check(true);
            t += 100 * MS;
        }
        assert_eq!(got, (3..10).collect::<Vec<_>>());
        assert_eq!(l.next_due(), None);
        // After a quiet second the full burst is available again (no fixed-window carry-over
        // beyond `burst`).
        let mut admitted = 0;
        for j in 0..10u32 {
            if let Admit::Now(_) = l.acquire("k", j, 3 * SEC) {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 3);
        let st = l.stats();
        assert_eq!((st.granted, st.delayed), (13, 7));
        // Waits were 100 ms, 200 ms, ..., 700 ms.
        assert_eq!(st.wait_ns_max, 700 * MS);
        assert_eq!(st.wait_ns_sum, 2800 * MS);
        let med = st.wait_quantile(0.5).unwrap();
        assert!((0.2..=0.8).contains(&med), "median {med}");
        assert!(st.wait_quantile(1.0).unwrap() <= 0.7 + 1e-12);
        let mean = st.wait_mean().unwrap();
        assert!((mean - 0.4).abs() < 1e-9);
    }

    #[test]
    fn rate_and_concurrency_must_both_allow() {
        // Rate would allow 5 at once, per_key only 1.
        let l = Limiter::new(conf(Some(1), None, Some((10.0, 5)))).unwrap();
        now(l.acquire("k", 0u32, 0));
        assert_eq!(l.acquire("k", 1, 0), Admit::Held);
        assert_eq!(l.acquire("k", 2, 0), Admit::Held);
        assert_eq!(
            l.next_due(),
            None,
            "it waits for a permit, not for its rate"
        );
        assert!(l.poll(SEC, all).is_empty());
        assert_eq!(l.release("k", SEC, all).jobs, vec![1]);
        // Rate 1 per 100 ms, burst 1: the release frees a permit but the rate is not due.
        let l = Limiter::new(conf(Some(5), None, Some((10.0, 1)))).unwrap();
        now(l.acquire("k", 0u32, 0));
        assert_eq!(l.acquire("k", 1, 0), Admit::Held);
        assert!(l.release("k", 50 * MS, all).is_empty());
        assert_eq!(l.next_due(), Some(100 * MS));
        assert_eq!(l.poll(100 * MS, all).jobs, vec![1]);
        l.check(true);
    }

    #[test]
    fn rate_key_waiting_for_total_is_woken_by_a_release() {
        let l = Limiter::new(conf(None, Some(1), Some((10.0, 1)))).unwrap();
        now(l.acquire("a", 0u32, 0));
        assert_eq!(l.acquire("b", 1, 0), Admit::Held); // total full
        assert_eq!(l.acquire("a", 2, 0), Admit::Held); // rate and total
        assert_eq!(l.next_due(), Some(100 * MS));
        assert!(l.poll(100 * MS, all).is_empty(), "total is full");
        assert_eq!(l.next_due(), None);
        l.check(true);
        assert_eq!(l.release("a", 120 * MS, all).jobs, vec![1]);
        assert_eq!(l.release("b", 130 * MS, all).jobs, vec![2]);
    }

    #[test]
    fn set_conf_changes_rates() {
        let l = Limiter::new(conf(None, None, Some((1.0, 1)))).unwrap();
        now(l.acquire("k", 0u32, 0));
        for j in 1..5 {
            assert_eq!(l.acquire("k", j, 0), Admit::Held);
        }
        assert_eq!(l.next_due(), Some(SEC));
        // Faster: the key had used 0.99 of an interval; under 10/s that is 99 ms, so with a
        // burst of 2 one conforms at once (TAT 109 ms, then 209 ms, due at 109 ms).
        let g = l
            .set_conf(conf(None, None, Some((10.0, 2))), 10 * MS, all)
            .unwrap();
        assert_eq!(g.jobs, vec![1]);
        assert_eq!(l.next_due(), Some(109 * MS));
        // Slower again: 200 ms of budget used at 10/s is 2 s at 1/s, capped at one burst.
        let g = l
            .set_conf(conf(None, None, Some((1.0, 1))), 10 * MS, all)
            .unwrap();
        assert!(g.is_empty());
        assert_eq!(l.next_due(), Some(1010 * MS));
        // No rate: everything goes.
        let g = l.set_conf(LimitConf::default(), 20 * MS, all).unwrap();
        assert_eq!(g.jobs, vec![2, 3, 4]);
        assert_eq!(l.next_due(), None);
        l.check(true);
    }

    #[test]
    fn stray_release_does_not_underflow() {
        let l: Limiter<u32> = Limiter::new(conf(Some(1), Some(1), None)).unwrap();
        assert!(l.release("nobody", 0, all).is_empty());
        now(l.acquire("a", 1, 0));
        assert!(l.release("b", 0, all).is_empty());
        assert!(l.release("a", 0, all).is_empty());
        assert!(l.release("a", 0, all).is_empty());
        let st = l.stats();
        assert_eq!((st.holders, st.stray_releases, st.keys), (0, 3, 0));
        now(l.acquire("a", 2, 0));
        assert_eq!(l.acquire("b", 3, 0), Admit::Held);
        l.check(true);
    }

    #[test]
    fn clock_going_backwards_is_clamped() {
        let l = Limiter::new(conf(None, None, Some((10.0, 1)))).unwrap();
        now(l.acquire("k", 0u32, 500 * MS));
        // A caller that read the clock earlier: still rate-limited from 500 ms.
        assert_eq!(l.acquire("k", 1, 100 * MS), Admit::Held);
        assert_eq!(l.next_due(), Some(600 * MS));
        let g = l.poll(600 * MS, all);
        assert_eq!(g.jobs, vec![1]);
        assert_eq!(l.stats().wait_ns_max, 100 * MS);
    }

    #[test]
    fn validate_names_the_field() {
        let bad = [
            (conf(Some(0), None, None), "per_key", "0"),
            (conf(None, Some(0), None), "total", "0"),
            (conf(None, None, Some((0.0, 1))), "rate.per_second", "0"),
            (conf(None, None, Some((-1.0, 1))), "rate.per_second", "-1"),
            (
                conf(None, None, Some((f64::NAN, 1))),
                "rate.per_second",
                "NaN",
            ),
            (
                conf(None, None, Some((f64::INFINITY, 1))),
                "rate.per_second",
                "inf",
            ),
            (conf(None, None, Some((5.0, 0))), "rate.burst", "0"),
        ];
        for (c, field, value) in bad {
            let e = c.validate().unwrap_err();
            assert!(e.starts_with(field), "{e}");
            assert!(e.contains(value), "{e}");
            assert!(e.contains("at least 1") || e.contains("above 0"), "{e}");
            assert_eq!(Limiter::<u8>::new(c).err(), Some(e.clone()));
            let l: Limiter<u8> = Limiter::new(LimitConf::default()).unwrap();
            assert_eq!(l.set_conf(c, 0, all).err(), Some(e));
            assert_eq!(l.conf(), LimitConf::default());
        }
        assert!(conf(Some(1), Some(1), Some((1e-300, 1))).validate().is_ok());
        assert!(conf(None, None, Some((1e300, u32::MAX))).validate().is_ok());
    }

    #[test]
    fn extreme_rates_do_not_overflow() {
        let l = Limiter::new(conf(None, None, Some((1e-300, u32::MAX)))).unwrap();
        for j in 0..100u32 {
            now(l.acquire("k", j, u64::MAX - 10));
        }
        let l = Limiter::new(conf(None, None, Some((1e300, 1)))).unwrap();
        for j in 0..100u32 {
            now(l.acquire("k", j, j as u64));
        }
        let l = Limiter::new(conf(None, None, Some((1e-300, 1)))).unwrap();
        now(l.acquire("k", 0u32, 1));
        assert_eq!(l.acquire("k", 1, 2), Admit::Held);
        assert_eq!(l.next_due(), Some(1 + MAX_INTERVAL_NS));
        l.check(true);
    }

    #[test]
    fn quantiles_are_plausible() {
        let mut st = LimiterStats::default();
        assert_eq!(st.wait_quantile(0.5), None);
        assert_eq!(st.wait_mean(), None);
        // 90 waits of ~1 ms, 10 of ~1 s.
        for _ in 0..90 {
            st.wait_hist[wait_bucket(MS)] += 1;
        }
        for _ in 0..10 {
            st.wait_hist[wait_bucket(SEC)] += 1;
        }
        st.wait_ns_max = SEC;
        let p50 = st.wait_quantile(0.5).unwrap();
        let p99 = st.wait_quantile(0.99).unwrap();
        assert!((0.5e-3..=2e-3).contains(&p50), "{p50}");
        assert!((0.5..=1.0).contains(&p99), "{p99}");
        assert!(st.wait_quantile(0.0).unwrap() <= p50);
        assert_eq!(st.wait_quantile(f64::NAN), None);
        assert_eq!(st.wait_quantile(7.0), st.wait_quantile(1.0));
        assert_eq!(wait_bucket(0), 0);
        assert_eq!(wait_bucket(1), 0);
        assert_eq!(wait_bucket(2), 1);
        assert_eq!(wait_bucket(3), 1);
        assert_eq!(wait_bucket(u64::MAX), 63);
    }

    /// A job whose drop checks that its limiter is not locked.
    struct Tattle {
        id: u32,
        lim: Weak<Limiter<Tattle>>,
        drops: Arc<AtomicUsize>,
    }

    impl Drop for Tattle {
        fn drop(&mut self) {
            if let Some(l) = self.lim.upgrade() {
                assert!(
                    l.inner.try_lock().is_ok(),
                    "job {} dropped under the lock",
                    self.id
                );
                let _ = l.stats();
            }
            self.drops.fetch_add(1, AO::SeqCst);
        }
    }

    #[test]
    fn jobs_are_never_dropped_under_the_lock() {
        let drops = Arc::new(AtomicUsize::new(0));
        let l = Arc::new(Limiter::new(conf(Some(1), Some(2), Some((10.0, 1)))).unwrap());
        let job = |id| Tattle {
            id,
            lim: Arc::downgrade(&l),
            drops: drops.clone(),
        };
        let dead = |t: &Tattle| t.id % 3 != 0;
        for id in 0..30 {
            drop(l.acquire(["a", "b", "c"][id as usize % 3], job(id), 0));
        }
        for t in 1..10 {
            drop(l.release("a", t * 100 * MS, dead));
            drop(l.poll(t * 100 * MS, dead));
            drop(l.set_conf(conf(Some(1), Some(2), Some((10.0, 1))), t * 100 * MS, dead));
            drop(l.purge(|t| t.id % 5 != 0));
        }
        drop(l.take_all());
        assert_eq!(drops.load(AO::SeqCst), 30);
    }

    /// Tiny deterministic generator for the threaded test.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    const KEYS: [&str; 6] = ["k0", "k1", "k2", "k3", "k4", "k5"];

    fn key_of(id: u64) -> usize {
        (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize % KEYS.len()
    }

    #[test]
    fn threads_never_exceed_limits_and_lose_nothing() {
        const THREADS: u64 = 4;
        const PER_THREAD: u64 = 5_000;
        for seed in 1..=6u64 {
            let mut rng = XorShift(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1);
            let c = LimitConf {
                per_key: (rng.below(4) != 0).then(|| 1 + rng.below(4) as usize),
                total: (rng.below(4) != 0).then(|| 1 + rng.below(8) as usize),
                rate: (rng.below(2) == 0).then(|| Rate {
                    per_second: 1_000.0 * (1 + rng.below(20)) as f64,
                    burst: 1 + rng.below(4) as u32,
                }),
            };
            let l = Arc::new(Limiter::<u64>::new(c).unwrap());
            let clock = Arc::new(AtomicU64::new(1));
            let per_key: Arc<Vec<AtomicUsize>> =
                Arc::new(KEYS.iter().map(|_| AtomicUsize::new(0)).collect());
            let total = Arc::new(AtomicUsize::new(0));
            let seen: Arc<Vec<AtomicU8>> = Arc::new(
                (0..THREADS * PER_THREAD)
                    .map(|_| AtomicU8::new(0))
                    .collect(),
            );
            let alive = |j: &u64| j % 13 != 0;
            // Counts a job that came back; a granted one becomes a holder of its caller.
            let back = {
                let (per_key, total, seen) = (per_key.clone(), total.clone(), seen.clone());
                move |j: u64, granted: bool, holding: &mut Vec<u64>| {
                    assert_eq!(
                        seen[j as usize].fetch_add(1, AO::SeqCst),
                        0,
                        "job {j} twice"
                    );
                    if granted {
                        let k = per_key[key_of(j)].fetch_add(1, AO::SeqCst) + 1;
                        let t = total.fetch_add(1, AO::SeqCst) + 1;
                        assert!(c.per_key.is_none_or(|p| k <= p), "{k} holders of a key");
                        assert!(c.total.is_none_or(|p| t <= p), "{t} holders in all");
                        holding.push(j);
                    }
                }
            };
            let release = {
                let (per_key, total, l, clock) =
                    (per_key.clone(), total.clone(), l.clone(), clock.clone());
                move |j: u64| {
                    // Uncounted before the limiter frees it, so the counters never exceed
                    // the limiter's own holders.
                    per_key[key_of(j)].fetch_sub(1, AO::SeqCst);
                    total.fetch_sub(1, AO::SeqCst);
                    l.release(KEYS[key_of(j)], clock.fetch_add(1_000, AO::SeqCst), alive)
                }
            };
            let hs: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (l, clock, back, release) =
                        (l.clone(), clock.clone(), back.clone(), release.clone());
                    std::thread::spawn(move || {
                        let mut rng = XorShift((seed * 31 + t) | 1);
                        let mut holding = Vec::new();
                        let mut next = t * PER_THREAD;
                        let end = next + PER_THREAD;
                        let absorb = |g: Granted<u64>, holding: &mut Vec<u64>| {
                            for j in g.jobs {
                                back(j, true, holding);
                            }
                            for j in g.dead {
                                assert!(!alive(&j));
                                back(j, false, holding);
                            }
                        };
                        while next < end || !holding.is_empty() {
                            let r = rng.below(10);
                            if next < end && (r < 5 || holding.is_empty()) {
                                let j = next;
                                next += 1;
                                let at = clock.fetch_add(1_000, AO::SeqCst);
                                if let Admit::Now(j) = l.acquire(KEYS[key_of(j)], j, at) {
                                    back(j, true, &mut holding);
                                }
                            } else if r < 9 && !holding.is_empty() {
                                let i = rng.below(holding.len() as u64) as usize;
                                let j = holding.swap_remove(i);
                                absorb(release(j), &mut holding);
                            } else {
                                let at = clock.fetch_add(1_000, AO::SeqCst);
                                absorb(l.poll(at, alive), &mut holding);
                            }
                        }
                    })
                })
                .collect();
            for h in hs {
                h.join().unwrap();
            }
            // Nobody holds a permit any more: what is still held waits for its rate.
            assert_eq!(l.stats().holders, 0);
            let mut holding = Vec::new();
            let absorb = |g: Granted<u64>, holding: &mut Vec<u64>| {
                for j in g.jobs {
                    back(j, true, holding);
                }
                for j in g.dead {
                    back(j, false, holding);
                }
            };
            for round in 0.. {
                assert!(round < 100_000, "held jobs never granted");
                absorb(
                    l.poll(clock.fetch_add(SEC, AO::SeqCst), alive),
                    &mut holding,
                );
                while let Some(j) = holding.pop() {
                    absorb(release(j), &mut holding);
                }
                let st = l.stats();
                if st.held == 0 && st.holders == 0 {
                    break;
                }
            }
            let end = clock.fetch_add(100 * SEC, AO::SeqCst) + 100 * SEC;
            assert!(l.poll(end, alive).is_empty());
            l.check(true);
            let st = l.stats();
            assert_eq!((st.holders, st.held, st.keys), (0, 0, 0), "{c:?}");
            assert!(seen.iter().all(|s| s.load(AO::SeqCst) == 1), "{c:?}");
            assert_eq!(st.granted + st.dead, THREADS * PER_THREAD);
            assert_eq!(st.wait_hist.iter().sum::<u64>(), st.delayed);
        }
    }

    // ---- model-based property tests ----

    const PKEYS: [&str; 4] = ["a", "b", "c", "d"];

    #[derive(Debug, Clone)]
    enum Op {
        Acquire(usize),
        Release(usize),
        Advance(u64),
        Kill(usize),
        SetConf(LimitConf),
        Purge,
        TakeAll,
        JumpToDue,
    }

    fn conf_strategy() -> impl Strategy<Value = LimitConf> {
        (
            prop::option::of(1usize..4),
            prop::option::of(1usize..6),
            prop::option::of((1u32..5, 1u32..4)),
        )
            .prop_map(|(per_key, total, rate)| LimitConf {
                per_key,
                total,
                rate: rate.map(|(r, burst)| Rate {
                    per_second: f64::from(r) * 10.0,
                    burst,
                }),
            })
    }

    fn op_strategy() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..PKEYS.len()).prop_map(Op::Acquire),
            4 => any::<usize>().prop_map(Op::Release),
            2 => (0u64..150 * MS).prop_map(Op::Advance),
            1 => any::<usize>().prop_map(Op::Kill),
            1 => conf_strategy().prop_map(Op::SetConf),
            1 => Just(Op::Purge),
            1 => Just(Op::TakeAll),
            2 => Just(Op::JumpToDue),
        ]
    }

    /// The test's view of every job.
    struct Model {
        conf: LimitConf,
        now: u64,
        next: u32,
        /// Jobs the limiter holds, by key.
        held: HashMap<u32, usize>,
        /// Jobs holding a permit: (key, job).
        holding: Vec<(usize, u32)>,
        back: HashSet<u32>,
        dead: RefCell<HashSet<u32>>,
        last_grant: [Option<u32>; PKEYS.len()],
        granted_keys: HashSet<usize>,
        /// Grant times by key (for the rate bound).
        grant_times: [Vec<u64>; PKEYS.len()],
    }

    impl Model {
        fn new(conf: LimitConf) -> Self {
            Model {
                conf,
                now: 1,
                next: 0,
                held: HashMap::new(),
                holding: Vec::new(),
                back: HashSet::new(),
                dead: RefCell::new(HashSet::new()),
                last_grant: [None; PKEYS.len()],
                granted_keys: HashSet::new(),
                grant_times: Default::default(),
            }
        }

        fn alive(&self, j: &u32) -> bool {
            !self.dead.borrow().contains(j)
        }

        fn came_back(&mut self, j: u32) -> usize {
            assert!(self.back.insert(j), "job {j} came back twice");
            self.held.remove(&j).expect("a held job")
        }

        fn granted(&mut self, k: usize, j: u32) {
            assert!(self.last_grant[k].is_none_or(|p| p < j), "FIFO within key");
            self.last_grant[k] = Some(j);
            self.holding.push((k, j));
            self.granted_keys.insert(k);
            self.grant_times[k].push(self.now);
        }

        fn absorb(&mut self, g: Granted<u32>) {
            for j in g.jobs {
                assert!(self.alive(&j), "dead job {j} granted");
                let k = self.came_back(j);
                self.granted(k, j);
            }
            for j in g.dead {
                assert!(!self.alive(&j), "live job {j} returned as dead");
                self.came_back(j);
            }
        }

        fn apply(&mut self, l: &Limiter<u32>, op: &Op) {
            self.granted_keys.clear();
            match *op {
                Op::Acquire(k) => {
                    let j = self.next;
                    self.next += 1;
                    match l.acquire(PKEYS[k], j, self.now) {
                        Admit::Now(got) => {
                            assert_eq!(got, j);
                            assert!(self.back.insert(j));
                            self.granted(k, j);
                        }
                        Admit::Held => {
                            self.held.insert(j, k);
                        }
                    }
                }
                Op::Release(i) => {
                    if !self.holding.is_empty() {
                        let (k, _) = self.holding.swap_remove(i % self.holding.len());
                        let g = l.release(PKEYS[k], self.now, |j| self.alive(j));
                        self.absorb(g);
                    }
                }
                Op::Advance(dt) => {
                    self.now += dt;
                    let g = l.poll(self.now, |j| self.alive(j));
                    self.absorb(g);
                }
                Op::Kill(i) => {
                    let mut v: Vec<u32> = self.held.keys().copied().collect();
                    if !v.is_empty() {
                        v.sort_unstable();
                        self.dead.borrow_mut().insert(v[i % v.len()]);
                    }
                }
                Op::SetConf(c) => {
                    self.conf = c;
                    let g = l.set_conf(c, self.now, |j| self.alive(j)).unwrap();
                    self.absorb(g);
                }
                Op::Purge => {
                    for j in l.purge(|j| self.alive(j)) {
                        assert!(!self.alive(&j));
                        self.came_back(j);
                    }
                }
                Op::TakeAll => {
                    let v = l.take_all();
                    assert_eq!(v.len(), self.held.len());
                    for j in v {
                        self.came_back(j);
                    }
                }
                Op::JumpToDue => {
                    if let Some(d) = l.next_due() {
                        assert!(d > self.now, "due {d} not after now {}", self.now);
                        if self.conf.total.is_none() {
                            let g = l.poll(d - 1, |j| self.alive(j));
                            assert!(g.is_empty(), "granted before it was due");
                            self.now = d;
                            let g = l.poll(d, |j| self.alive(j));
                            assert!(!g.is_empty(), "nothing granted when due");
                            self.absorb(g);
                        }
                    }
                }
            }
            // Every grant of this call respected the limits in force.
            for &k in &self.granted_keys {
                let n = self.holding.iter().filter(|h| h.0 == k).count();
                assert!(
                    self.conf.per_key.is_none_or(|p| n <= p),
                    "{n} holders of a key"
                );
            }
            if !self.granted_keys.is_empty() {
                let n = self.holding.len();
                assert!(self.conf.total.is_none_or(|t| n <= t), "{n} holders");
            }
            let st = l.stats();
            assert_eq!(st.holders, self.holding.len());
            assert_eq!(st.held, self.held.len());
            l.check(true);
        }

        /// Takes everything back and checks that every job came back exactly once.
        fn finish(mut self, l: &Limiter<u32>) {
            for j in l.take_all() {
                self.came_back(j);
            }
            assert!(self.held.is_empty());
            assert_eq!(self.back.len(), self.next as usize);
            for (k, _) in std::mem::take(&mut self.holding) {
                assert!(l.release(PKEYS[k], self.now, all).is_empty());
            }
            assert!(l.poll(self.now + 1_000 * SEC, all).is_empty());
            assert_eq!(l.stats().keys, 0);
            l.check(true);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn matches_a_model(c in conf_strategy(), ops in prop::collection::vec(op_strategy(), 0..150)) {
            let l = Limiter::new(c).unwrap();
            let mut m = Model::new(c);
            for op in &ops {
                m.apply(&l, op);
            }
            m.finish(&l);
        }

        /// With a fixed rate, over any window of length W a key gets at most
        /// `burst + W * per_second` grants, whatever the concurrency limits and timing.
        #[test]
        fn rate_bound_holds_over_every_window(
            per_key in prop::option::of(1usize..4),
            total in prop::option::of(1usize..4),
            per_second in 1u32..40,
            burst in 1u32..5,
            ops in prop::collection::vec(prop_oneof![
                5 => (0..PKEYS.len()).prop_map(Op::Acquire),
                3 => any::<usize>().prop_map(Op::Release),
                3 => (0u64..80 * MS).prop_map(Op::Advance),
                1 => any::<usize>().prop_map(Op::Kill),
                2 => Just(Op::JumpToDue),
            ], 0..300),
        ) {
            let c = LimitConf {
                per_key,
                total,
                rate: Some(Rate { per_second: f64::from(per_second), burst }),
            };
            let l = Limiter::new(c).unwrap();
            let mut m = Model::new(c);
            for op in &ops {
                m.apply(&l, op);
            }
            for times in &m.grant_times {
                for i in 0..times.len() {
                    for j in i..times.len() {
                        let n = (j - i + 1) as f64;
                        let w = (times[j] - times[i]) as f64 / 1e9;
                        prop_assert!(
                            n <= f64::from(burst) + w * f64::from(per_second) + 1e-9,
                            "{n} grants in {w} s"
                        );
                    }
                }
            }
            m.finish(&l);
        }
    }
}
