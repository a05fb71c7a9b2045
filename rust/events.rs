//! The lifecycle event ring: a bounded, lock-free buffer between the threads that make events
//! (submitters, workers, the timer thread) and the one thread that delivers them. Pure Rust
//! and generic over the event type, so `cargo test` drives it without an interpreter.
//!
//! Cost model, which is the reason for its shape:
//! - nobody listens (mask 0, the default): a producer pays one relaxed load of the mask, and
//!   no buffer is allocated;
//! - someone listens: one `ArrayQueue::push` (a CAS on the tail) per event and a load of the
//!   `waiting` flag; a producer makes a syscall only to wake a consumer that parked on an
//!   empty ring (once per idle-to-busy transition, not per event);
//! - the ring is full: the event is dropped and counted. A producer never waits for the
//!   consumer, so a slow subscriber cannot slow the workers down.
//!
//! The consumer, woken by the first event, lingers a few milliseconds to take a batch, so
//! under load it wakes a few hundred times a second whatever the event rate.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;

use crate::sync::lock;

/// The kinds of lifecycle events, in mask-bit order (kind `i` is bit `1 << i`).
pub const KINDS: [&str; 11] = [
    "created",
    "admitted",
    "started",
    "completed",
    "failed",
    "killed",
    "timed_out",
    "retried",
    "quarantined",
    "blocked",
    "refused",
];

pub const CREATED: u8 = 0;
pub const ADMITTED: u8 = 1;
pub const STARTED: u8 = 2;
pub const COMPLETED: u8 = 3;
pub const FAILED: u8 = 4;
pub const KILLED: u8 = 5;
pub const TIMED_OUT: u8 = 6;
pub const RETRIED: u8 = 7;
pub const QUARANTINED: u8 = 8;
pub const BLOCKED: u8 = 9;
pub const REFUSED: u8 = 10;

/// Every kind's bit.
pub const ALL_KINDS: u32 = (1 << KINDS.len()) - 1;

/// How often a lingering consumer looks whether the ring is half full (then it stops
/// lingering at once).
const LINGER_STEP: Duration = Duration::from_millis(1);
/// The longest a parked consumer sleeps in one go (a wake or a push cuts it short).
const PARK_STEP: Duration = Duration::from_secs(3600);

/// A bounded multi-producer, single-consumer event buffer with a kind mask.
pub struct EventRing<T> {
    mask: AtomicU32,
    capacity: usize,
    /// Allocated on the first non-zero mask.
    queue: OnceLock<ArrayQueue<T>>,
    dropped: AtomicU64,
    /// The consumer parked on an empty ring and wants the next producer to wake it.
    waiting: AtomicBool,
    /// `wake` was called: a waiting or lingering consumer returns at once.
    kicked: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
}

impl<T> std::fmt::Debug for EventRing<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventRing")
            .field("mask", &self.mask())
            .field("capacity", &self.capacity)
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}

impl<T> EventRing<T> {
    /// A ring for `capacity` events (at least 1), recording nothing until `set_mask`.
    pub fn new(capacity: usize) -> Self {
        EventRing {
            mask: AtomicU32::new(0),
            capacity: capacity.max(1),
            queue: OnceLock::new(),
            dropped: AtomicU64::new(0),
            waiting: AtomicBool::new(false),
            kicked: AtomicBool::new(false),
            lock: Mutex::new(()),
            cv: Condvar::new(),
        }
    }

    /// Whether events of kind `kind` are recorded now (one relaxed load).
    #[inline]
    pub fn wants(&self, kind: u8) -> bool {
        self.mask.load(Ordering::Relaxed) & (1 << kind) != 0
    }

    /// Records the kinds in `mask` (bits of [`KINDS`]; others are ignored) from now on.
    pub fn set_mask(&self, mask: u32) {
        let mask = mask & ALL_KINDS;
        if mask != 0 {
            self.queue.get_or_init(|| ArrayQueue::new(self.capacity));
        }
        self.mask.store(mask, Ordering::Release);
    }

    pub fn mask(&self) -> u32 {
        self.mask.load(Ordering::Acquire)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Events lost because the ring was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Events buffered now.
    pub fn len(&self) -> usize {
        self.queue.get().map_or(0, ArrayQueue::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Buffers `ev` (check [`EventRing::wants`] first, so an unwanted event is never built),
    /// or drops it and counts it if the ring is full. Never waits.
    pub fn push(&self, ev: T) {
        let Some(q) = self.queue.get() else {
            return;
        };
        if q.push(ev).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // The push's CAS and this load are both SeqCst, and so are the consumer's store of
        // `waiting` and its emptiness check: one of the two sides sees the other.
        if self.waiting.load(Ordering::SeqCst) && self.waiting.swap(false, Ordering::SeqCst) {
            let _g = lock(&self.lock);
            self.cv.notify_all();
        }
    }

    /// Cuts a consumer's wait or linger short (it returns what is buffered, maybe nothing).
    pub fn wake(&self) {
        self.kicked.store(true, Ordering::SeqCst);
        let _g = lock(&self.lock);
        self.cv.notify_all();
    }

    /// Takes up to `max` events, oldest first: waits up to `timeout` for the first one, then
    /// lingers up to `linger` (or until the ring is half full, or `wake`) to take a batch.
    /// Empty on timeout or after `wake`. One consumer at a time.
    pub fn take(&self, max: usize, timeout: Duration, linger: Duration) -> Vec<T> {
        let Some(q) = self.queue.get() else {
            self.park_for(timeout);
            return Vec::new();
        };
        let max = max.max(1);
        if q.is_empty() && !self.wait_first(q, timeout) {
            return Vec::new();
        }
        self.linger(q, max, linger);
        let mut out = Vec::with_capacity(q.len().min(max));
        while out.len() < max {
            match q.pop() {
                Some(e) => out.push(e),
                None => break,
            }
        }
        out
    }

    /// Parks until an event is buffered (true), or `timeout` passed or `wake` (false).
    fn wait_first(&self, q: &ArrayQueue<T>, timeout: Duration) -> bool {
        let mut got = false;
        self.wait_until(Instant::now().checked_add(timeout), PARK_STEP, || {
            self.waiting.store(true, Ordering::SeqCst);
            got = !q.is_empty();
            got || self.kicked.swap(false, Ordering::SeqCst)
        });
        self.waiting.store(false, Ordering::SeqCst);
        got
    }

    fn linger(&self, q: &ArrayQueue<T>, max: usize, linger: Duration) {
        let enough = max.min(self.capacity / 2).max(1);
        self.wait_until(Instant::now().checked_add(linger), LINGER_STEP, || {
            self.kicked.swap(false, Ordering::SeqCst) || q.len() >= enough
        });
    }

    /// Waits `timeout` (or until `wake`) with nothing to take: no ring was ever allocated.
    fn park_for(&self, timeout: Duration) {
        self.wait_until(
            Instant::now().checked_add(timeout),
            Duration::from_millis(50),
            || self.kicked.swap(false, Ordering::SeqCst) || self.queue.get().is_some(),
        );
    }

    /// Waits on the ring's condition variable until `done()` (checked under its lock, first
    /// at once) or `until` passed (None: no end), waking at least every `step`; returns
    /// whether `done()` said so.
    fn wait_until(
        &self,
        until: Option<Instant>,
        step: Duration,
        mut done: impl FnMut() -> bool,
    ) -> bool {
        let mut g = lock(&self.lock);
        loop {
            if done() {
                return true;
            }
            let left = until.map_or(step, |d| d.saturating_duration_since(Instant::now()));
            if left.is_zero() {
                return false;
            }
            g = self
                .cv
                .wait_timeout(g, left.min(step))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::thread;

    const NO_LINGER: Duration = Duration::ZERO;

    #[test]
    fn nothing_is_recorded_or_allocated_without_a_mask() {
        let r = EventRing::<u32>::new(8);
        assert!(!r.wants(CREATED));
        r.push(1);
        assert_eq!(r.len(), 0);
        assert!(r.queue.get().is_none());
        assert!(r.take(10, Duration::from_millis(1), NO_LINGER).is_empty());
    }

    #[test]
    fn the_mask_selects_kinds_and_ignores_unknown_bits() {
        let r = EventRing::<u32>::new(8);
        r.set_mask((1 << STARTED) | (1 << REFUSED) | (1 << 30));
        assert!(r.wants(STARTED) && r.wants(REFUSED));
        assert!(!r.wants(CREATED) && !r.wants(COMPLETED));
        assert_eq!(r.mask(), (1 << STARTED) | (1 << REFUSED));
        assert_eq!(KINDS[REFUSED as usize], "refused");
        assert_eq!(ALL_KINDS.count_ones() as usize, KINDS.len());
    }

    #[test]
    fn events_come_out_oldest_first_in_batches_of_at_most_max() {
        let r = EventRing::new(16);
        r.set_mask(ALL_KINDS);
        for i in 0..10 {
            r.push(i);
        }
        assert_eq!(r.take(4, Duration::ZERO, NO_LINGER), vec![0, 1, 2, 3]);
        assert_eq!(
            r.take(100, Duration::ZERO, NO_LINGER),
            (4..10).collect::<Vec<_>>()
        );
        assert!(r.take(100, Duration::ZERO, NO_LINGER).is_empty());
    }

    #[test]
    fn a_full_ring_drops_and_counts_without_waiting() {
        let r = EventRing::new(4);
        r.set_mask(ALL_KINDS);
        for i in 0..10 {
            r.push(i);
        }
        assert_eq!(r.dropped(), 6);
        assert_eq!(r.take(100, Duration::ZERO, NO_LINGER), vec![0, 1, 2, 3]);
    }

    #[test]
    fn a_parked_consumer_is_woken_by_the_first_event() {
        let r = Arc::new(EventRing::new(64));
        r.set_mask(ALL_KINDS);
        let c = {
            let r = r.clone();
            thread::spawn(move || r.take(100, Duration::from_secs(30), NO_LINGER))
        };
        while !r.waiting.load(Ordering::SeqCst) {
            thread::yield_now();
        }
        let t0 = Instant::now();
        r.push(7u32);
        assert_eq!(c.join().unwrap(), vec![7]);
        assert!(t0.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn wake_cuts_a_wait_short() {
        let r = Arc::new(EventRing::<u32>::new(64));
        r.set_mask(ALL_KINDS);
        let c = {
            let r = r.clone();
            thread::spawn(move || r.take(100, Duration::from_secs(30), NO_LINGER))
        };
        while !r.waiting.load(Ordering::SeqCst) {
            thread::yield_now();
        }
        r.wake();
        assert!(c.join().unwrap().is_empty());
    }

    #[test]
    fn wake_also_ends_a_linger_and_the_batch_is_returned() {
        let r = Arc::new(EventRing::new(64));
        r.set_mask(ALL_KINDS);
        r.push(1u32);
        let c = {
            let r = r.clone();
            thread::spawn(move || r.take(100, Duration::ZERO, Duration::from_secs(30)))
        };
        r.wake();
        assert_eq!(c.join().unwrap(), vec![1]);
    }

    #[test]
    fn a_half_full_ring_ends_the_linger() {
        let r = EventRing::new(8);
        r.set_mask(ALL_KINDS);
        for i in 0..4 {
            r.push(i);
        }
        let t0 = Instant::now();
        assert_eq!(
            r.take(100, Duration::ZERO, Duration::from_secs(30)).len(),
            4
        );
        assert!(t0.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn concurrent_producers_lose_nothing_below_capacity() {
        let r = Arc::new(EventRing::new(1 << 16));
        r.set_mask(ALL_KINDS);
        let producers: Vec<_> = (0..4u64)
            .map(|p| {
                let r = r.clone();
                thread::spawn(move || {
                    for i in 0..5000u64 {
                        r.push(p * 1_000_000 + i);
                    }
                })
            })
            .collect();
        let mut got = Vec::new();
        while got.len() < 20_000 {
            got.extend(r.take(1000, Duration::from_secs(5), NO_LINGER));
        }
        for p in producers {
            p.join().unwrap();
        }
        assert_eq!(r.dropped(), 0);
        got.sort_unstable();
        got.dedup();
        assert_eq!(got.len(), 20_000);
        // each producer's events keep their order
        let r2 = EventRing::new(16);
        r2.set_mask(ALL_KINDS);
        r2.push(1);
        r2.push(2);
        assert_eq!(r2.take(2, Duration::ZERO, NO_LINGER), vec![1, 2]);
    }
}
