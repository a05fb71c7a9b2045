//! Timers: token deadlines, retry delays and rate-limit wake-ups, due at a time on the token
//! clock (`clock::now_ns`). Pure Rust: one heap behind a lock and a condition variable; the
//! binding runs one thread per runtime that waits for the earliest entry and handles what is
//! due, so a token with no deadline and no retry costs nothing here.
//!
//! Entries are never removed early: a deadline of a token that finished first is simply found
//! stale when it comes due (the handler checks the token's state and attempt). To keep a
//! stream of long deadlines on short tokens from growing the heap without bound, `schedule`
//! compacts it (drops the entries `stale` says are dead) whenever it has doubled since the
//! last compaction.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::clock::now_ns;
use crate::sync::lock;

struct Entry<T> {
    due: u64,
    seq: u64,
    item: T,
}

impl<T> PartialEq for Entry<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl<T> Eq for Entry<T> {}
impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Entry<T> {
    /// Reversed: the heap's top is the earliest entry (FIFO among equal due times).
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

struct Inner<T> {
    heap: BinaryHeap<Entry<T>>,
    seq: u64,
    /// Heap size after the last compaction.
    compacted_at: usize,
    stopped: bool,
}

/// A set of items due at given times; `wait_due` blocks until some are due.
pub struct Timers<T> {
    inner: Mutex<Inner<T>>,
    cv: Condvar,
}

impl<T> Default for Timers<T> {
    fn default() -> Self {
        Timers {
            inner: Mutex::new(Inner {
                heap: BinaryHeap::new(),
                seq: 0,
                compacted_at: 64,
                stopped: false,
            }),
            cv: Condvar::new(),
        }
    }
}

impl<T> Timers<T> {
    /// Adds `item`, due at `due_ns`. `stale` tells entries that can be dropped unhandled,
    /// used when the heap is compacted. Returns the entries dropped (the caller drops them
    /// outside the lock: dropping an item may run arbitrary code), or the item itself once
    /// `stop` was called (nothing would ever take it out).
    pub fn schedule(&self, due_ns: u64, item: T, stale: impl Fn(&T) -> bool) -> Result<Vec<T>, T> {
        let mut g = lock(&self.inner);
        if g.stopped {
            return Err(item);
        }
        let mut dropped = Vec::new();
        if g.heap.len() >= 2 * g.compacted_at {
            let entries = std::mem::take(&mut g.heap).into_vec();
            let mut keep = Vec::with_capacity(entries.len());
            for e in entries {
                if stale(&e.item) {
                    dropped.push(e.item);
                } else {
                    keep.push(e);
                }
            }
            g.heap = BinaryHeap::from(keep);
            g.compacted_at = g.heap.len().max(64);
        }
        let earliest = g.heap.peek().is_none_or(|top| due_ns < top.due);
        g.seq += 1;
        let seq = g.seq;
        g.heap.push(Entry {
            due: due_ns,
            seq,
            item,
        });
        drop(g);
        if earliest {
            self.cv.notify_all();
        }
        Ok(dropped)
    }

    /// Every item due at `now_ns` or before, earliest first.
    pub fn take_due(&self, now_ns: u64) -> Vec<T> {
        let mut g = lock(&self.inner);
        let mut out = Vec::new();
        while g.heap.peek().is_some_and(|top| top.due <= now_ns) {
            out.push(g.heap.pop().expect("peeked").item);
        }
        out
    }

    /// Blocks (call it with the GIL released) until an item is due or `stop` was called, at
    /// most `max_wait`; returns the due items (empty on a timeout or once stopped).
    pub fn wait_due(&self, max_wait: Duration) -> Vec<T> {
        let mut g = lock(&self.inner);
        let limit = now_ns().saturating_add(max_wait.as_nanos().min(u64::MAX as u128) as u64);
        loop {
            if g.stopped {
                return Vec::new();
            }
            let now = now_ns();
            if g.heap.peek().is_some_and(|top| top.due <= now) {
                drop(g);
                return self.take_due(now);
            }
            if now >= limit {
                return Vec::new();
            }
            let until = g.heap.peek().map_or(limit, |top| top.due.min(limit));
            g = self
                .cv
                .wait_timeout(g, Duration::from_nanos(until - now))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Wakes `wait_due` for good; returns every entry left (the caller drops them).
    pub fn stop(&self) -> Vec<T> {
        let mut g = lock(&self.inner);
        g.stopped = true;
        let left = std::mem::take(&mut g.heap)
            .into_vec()
            .into_iter()
            .map(|e| e.item)
            .collect();
        drop(g);
        self.cv.notify_all();
        left
    }

    /// Whether `stop` was called.
    pub fn is_stopped(&self) -> bool {
        lock(&self.inner).stopped
    }

    /// Entries waiting (stale ones included).
    pub fn len(&self) -> usize {
        lock(&self.inner).heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `f` on every entry (for a look-up by the operator: rare, linear).
    pub fn for_each(&self, mut f: impl FnMut(&T)) {
        for e in lock(&self.inner).heap.iter() {
            f(&e.item);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn items_come_out_in_due_order_fifo_among_equals() {
        let t = Timers::default();
        for (due, v) in [(30, 'c'), (10, 'a'), (20, 'b'), (10, 'x')] {
            assert!(t.schedule(due, v, |_| false).unwrap().is_empty());
        }
        assert_eq!(t.take_due(5), Vec::<char>::new());
        assert_eq!(t.take_due(20), vec!['a', 'x', 'b']);
        assert_eq!(t.take_due(u64::MAX), vec!['c']);
        assert!(t.is_empty());
    }

    #[test]
    fn compaction_drops_stale_entries_only() {
        let t = Timers::default();
        let mut dropped = Vec::new();
        for i in 0..1000u64 {
            dropped.extend(t.schedule(u64::MAX - i, i, |v| v % 2 == 0).unwrap());
        }
        assert!(!dropped.is_empty());
        assert!(dropped.iter().all(|v| v % 2 == 0));
        let mut left = t.stop();
        left.extend(dropped);
        left.sort();
        assert_eq!(left, (0..1000).collect::<Vec<_>>(), "nothing lost");
    }

    #[test]
    fn wait_due_wakes_for_an_earlier_entry_and_for_stop() {
        let t = Arc::new(Timers::default());
        t.schedule(now_ns() + 60_000_000_000, 1u32, |_| false)
            .unwrap();
        let t2 = t.clone();
        let h = std::thread::spawn(move || t2.wait_due(Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(20));
        t.schedule(now_ns(), 2, |_| false).unwrap();
        assert_eq!(h.join().unwrap(), vec![2]);
        let t3 = t.clone();
        let h = std::thread::spawn(move || t3.wait_due(Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(t.stop(), vec![1]);
        assert!(h.join().unwrap().is_empty());
        assert!(t.is_stopped());
        assert_eq!(t.schedule(0, 3, |_| false), Err(3), "refused once stopped");
    }

    #[test]
    fn wait_due_times_out_empty() {
        let t: Timers<u8> = Timers::default();
        assert!(t.wait_due(Duration::from_millis(5)).is_empty());
    }
}
