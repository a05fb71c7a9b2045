//! The execution history (pure Rust): a bounded ring of the most recent executed attempts,
//! optionally sharded. Its slots are allocated in blocks as the ring first fills and reused
//! from then on.
//!
//! Write side: [`History::push`] runs on the worker threads for every executed attempt. It
//! claims a slot of its shard with one relaxed `fetch_add` on the shard's head and moves the
//! record in under that slot's `Mutex`: no allocation (the record's optional error was
//! allocated by the caller), and the previous occupant is dropped after the lock is released.
//! The slot locks are uncontended in practice: only the workers of one core write a shard,
//! they rarely push at the same moment, and two pushes take different slots unless the shard
//! wraps around while one of them is in flight. A reader holds a slot's lock only to clone it.
//!
//! Why a `Mutex` per slot rather than a seqlock: a record owns its error (a `Box`); a seqlock
//! reader would have to clone that box while a writer may be freeing it, which needs a lock
//! (or an epoch scheme) anyway. An uncontended std `Mutex` is one locked instruction to take
//! and one to release, on a line only the shard's core writes.
//!
//! Trade-off of the sharding: each shard is its own ring with its own head on its own cache
//! line, so workers of different cores never write the same line. The price is that every
//! shard keeps only its share of the history (`capacity / shards`, rounded up): when the work
//! is skewed onto one core, that core's ring wraps sooner and the history reaches less far
//! back than `capacity` records of one global ring would, while other shards keep older ones.
//! The runtime uses one shard (`guard.rs`): under the GIL its workers push in batches, one
//! thread at a time, so the head seldom changes cores, and "the newest N records" stays exact.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, OnceLock};

use crossbeam_utils::CachePadded;

use crate::health::AttemptOutcome;
use crate::sync::lock;

/// One executed attempt of a token.
#[derive(Clone, Debug)]
pub struct ExecRecord {
    /// The token's id.
    pub token_id: u64,
    /// The operation: an index into the caller's table of operation names.
    pub op: u32,
    /// How the attempt ended.
    pub outcome: AttemptOutcome,
    /// The 0-based core it ran on.
    pub core: u16,
    /// The worker slot (within the core) it ran on.
    pub worker: u16,
    /// The attempt's number (1 for the first run, more for retries).
    pub attempt: u32,
    /// When it started executing (`clock::now_ns`).
    pub started_ns: u64,
    /// How long it executed, in ns.
    pub exec_ns: u64,
    /// How long it waited to start, in ns: from submission (a retry: from its admission back
    /// into a mailbox, after its delay).
    pub queue_ns: u64,
    /// The code inspector's complexity score of its function; NaN if none.
    pub complexity: f32,
    /// The cost model's predicted duration in ns; 0 if none.
    pub predicted_ns: u64,
    /// `(exception type, message)` of a failed attempt; `None` otherwise.
    pub error: Option<Box<(String, String)>>,
}

impl ExecRecord {
    /// When the attempt ended: `started_ns + exec_ns` (saturating). Snapshots sort by it.
    #[inline]
    pub fn ended_ns(&self) -> u64 {
        self.started_ns.saturating_add(self.exec_ns)
    }
}

/// Slots of a ring are allocated in blocks of this many as the ring first fills: a runtime
/// that runs a few tokens never holds the whole ring (and a program that starts and stops many
/// coordinators does not churn large blocks through the allocator).
const BLOCK: usize = 256;

type Slot = Mutex<Option<ExecRecord>>;

/// The slots of one ring: `len` of them, in blocks allocated on first use, then kept.
struct Slots {
    len: usize,
    blocks: Box<[OnceLock<Box<[Slot]>>]>,
}

impl Slots {
    fn new(len: usize) -> Slots {
        Slots {
            len,
            blocks: (0..len.div_ceil(BLOCK)).map(|_| OnceLock::new()).collect(),
        }
    }

    /// Slot `i` (< len), allocating its block the first time.
    #[inline]
    fn get(&self, i: usize) -> &Slot {
        let b = &self.blocks[i / BLOCK];
        let block = b.get_or_init(|| {
            let n = BLOCK.min(self.len - (i / BLOCK) * BLOCK);
            (0..n).map(|_| Mutex::new(None)).collect()
        });
        &block[i % BLOCK]
    }

    /// The slots allocated so far.
    fn iter(&self) -> impl Iterator<Item = &Slot> {
        self.blocks
            .iter()
            .filter_map(OnceLock::get)
            .flat_map(|b| b.iter())
    }
}

/// One shard: a ring of slots and the number of pushes it has taken.
struct Shard {
    /// Pushes to this shard ever; push `i` goes to slot `i % slots.len()`.
    head: AtomicU64,
    /// `head` when the shard was last cleared (for `len`).
    base: AtomicU64,
    slots: Slots,
}

/// The execution history: per-core rings of the most recent [`ExecRecord`]s (see the module
/// docs for the cost and the trade-off of the sharding).
pub struct History {
    shards: Box<[CachePadded<Shard>]>,
    /// Slots per shard; 0 when disabled.
    per_shard: usize,
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("History")
            .field("shards", &self.shards.len())
            .field("per_shard", &self.per_shard)
            .field("written", &self.written())
            .finish()
    }
}

impl History {
    /// A history of `capacity` records split over `shards` rings (at least 1; pass the number
    /// of cores) of `ceil(capacity / shards)` slots each (allocated in blocks as they first fill). `capacity == 0`
    /// disables it: `push` is a no-op and nothing is allocated.
    pub fn new(capacity: usize, shards: usize) -> Self {
        let shards = shards.max(1);
        let per_shard = capacity.div_ceil(shards);
        let shards = if per_shard == 0 {
            Box::default()
        } else {
            (0..shards)
                .map(|_| {
                    CachePadded::new(Shard {
                        head: AtomicU64::new(0),
                        base: AtomicU64::new(0),
                        slots: Slots::new(per_shard),
                    })
                })
                .collect()
        };
        History { shards, per_shard }
    }

    /// Whether it keeps records (`capacity > 0`).
    #[inline]
    pub fn enabled(&self) -> bool {
        self.per_shard > 0
    }

    /// Records it can keep: `shards * ceil(capacity / shards)` as created (0 when disabled).
    pub fn capacity(&self) -> usize {
        self.per_shard * self.shards.len()
    }

    /// Stores `rec` in shard `shard` (the caller's core index; taken modulo the shard count),
    /// overwriting that shard's oldest record once it is full. One relaxed `fetch_add` and one
    /// uncontended slot lock; never allocates. A no-op when disabled.
    #[inline]
    pub fn push(&self, shard: usize, rec: ExecRecord) {
        if self.per_shard == 0 {
            return;
        }
        let n = self.shards.len();
        let s = &self.shards[if shard < n { shard } else { shard % n }];
        let i = s.head.fetch_add(1, Relaxed);
        let slot = s.slots.get((i % self.per_shard as u64) as usize);
        // the guard is a temporary: the lock is released at the end of this statement, and
        // the record it replaced (maybe with an error to free) is dropped after that
        let old = lock(slot).replace(rec);
        drop(old);
    }

    /// Records kept now: per shard, its pushes since the last `clear`, at most its slots.
    /// Exact while nothing pushes concurrently with a `clear`.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let base = s.base.load(Relaxed);
                let head = s.head.load(Relaxed);
                (head.saturating_sub(base)).min(self.per_shard as u64) as usize
            })
            .sum()
    }

    /// Whether it keeps no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records pushed ever (over all shards; `clear` does not reset it).
    pub fn written(&self) -> u64 {
        self.shards.iter().map(|s| s.head.load(Relaxed)).sum()
    }

    /// Drops every kept record (`written` stays). A record pushed concurrently may survive.
    pub fn clear(&self) {
        for s in self.shards.iter() {
            s.base.store(s.head.load(Relaxed), Relaxed);
            for slot in s.slots.iter() {
                let old = lock(slot).take();
                drop(old);
            }
        }
    }

    /// Copies of the kept records of all shards, oldest first by [`ExecRecord::ended_ns`]
    /// (then `token_id`, then `attempt`); with `limit`, only the `limit` newest of them. Each
    /// slot is locked only while it is cloned, so workers keep pushing meanwhile.
    pub fn snapshot(&self, limit: Option<usize>) -> Vec<ExecRecord> {
        if limit == Some(0) {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(self.len());
        for s in self.shards.iter() {
            for slot in s.slots.iter() {
                if let Some(r) = lock(slot).as_ref() {
                    out.push(r.clone());
                }
            }
        }
        out.sort_by_key(|r| (r.ended_ns(), r.token_id, r.attempt));
        if let Some(l) = limit {
            let drop_n = out.len().saturating_sub(l);
            out.drain(..drop_n);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn rec(token_id: u64, core: u16, started_ns: u64, exec_ns: u64) -> ExecRecord {
        ExecRecord {
            token_id,
            op: 0,
            outcome: AttemptOutcome::Completed,
            core,
            worker: 0,
            attempt: 1,
            started_ns,
            exec_ns,
            queue_ns: 0,
            complexity: f32::NAN,
            predicted_ns: 0,
            error: None,
        }
    }

    fn ids(v: &[ExecRecord]) -> Vec<u64> {
        v.iter().map(|r| r.token_id).collect()
    }

    #[test]
    fn capacity_zero_disables_it() {
        let h = History::new(0, 4);
        assert!(!h.enabled());
        h.push(0, rec(1, 0, 0, 1));
        assert_eq!((h.len(), h.capacity(), h.written()), (0, 0, 0));
        assert!(h.is_empty());
        assert!(h.snapshot(None).is_empty());
        h.clear();
    }

    #[test]
    fn capacity_is_split_across_shards_rounding_up() {
        let h = History::new(10, 3);
        assert!(h.enabled());
        assert_eq!(h.capacity(), 12);
        let h = History::new(3, 8);
        assert_eq!(h.capacity(), 8, "at least one slot per shard");
        let h = History::new(5, 0);
        assert_eq!(h.capacity(), 5, "at least one shard");
    }

    #[test]
    fn each_shard_keeps_its_newest_records() {
        let h = History::new(6, 2); // 3 slots per shard
        for t in 0..5 {
            h.push(0, rec(t, 0, t * 10, 1));
        }
        h.push(1, rec(100, 1, 5, 1));
        h.push(3, rec(101, 1, 15, 1)); // shard 3 % 2 = 1
        assert_eq!((h.len(), h.written()), (5, 7));
        // shard 0 kept 2, 3, 4; shard 1 kept 100, 101; merged by end time
        assert_eq!(ids(&h.snapshot(None)), [100, 101, 2, 3, 4]);
        assert_eq!(ids(&h.snapshot(Some(2))), [3, 4], "the newest two");
        assert_eq!(ids(&h.snapshot(Some(99))).len(), 5);
        assert!(h.snapshot(Some(0)).is_empty());
    }

    #[test]
    fn snapshots_sort_by_end_time_then_token() {
        let h = History::new(8, 2);
        h.push(0, rec(7, 0, 100, 50)); // ends 150
        h.push(1, rec(3, 1, 140, 10)); // ends 150: token 3 first
        h.push(0, rec(9, 0, 120, 0)); // ends 120
        h.push(1, rec(1, 1, 10, 500)); // ends 510
        assert_eq!(ids(&h.snapshot(None)), [9, 3, 7, 1]);
        let mut r = rec(5, 0, u64::MAX - 1, 10);
        r.attempt = 2;
        assert_eq!(r.ended_ns(), u64::MAX, "saturates");
        h.push(0, r);
        assert_eq!(ids(&h.snapshot(Some(1))), [5]);
    }

    #[test]
    fn errors_travel_with_their_records() {
        let h = History::new(2, 1);
        let mut r = rec(1, 0, 0, 1);
        r.outcome = AttemptOutcome::Failed;
        r.error = Some(Box::new(("ValueError".into(), "bad input".into())));
        r.complexity = 12.5;
        r.predicted_ns = 900;
        h.push(0, r);
        let got = h.snapshot(None);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].outcome, AttemptOutcome::Failed);
        assert_eq!(got[0].complexity, 12.5);
        assert_eq!(got[0].predicted_ns, 900);
        let e = got[0].error.as_deref().unwrap();
        assert_eq!((e.0.as_str(), e.1.as_str()), ("ValueError", "bad input"));
        // overwritten twice: the failed record (and its error) is gone
        h.push(0, rec(2, 0, 1, 1));
        h.push(0, rec(3, 0, 2, 1));
        assert_eq!(ids(&h.snapshot(None)), [2, 3]);
    }

    #[test]
    fn clear_drops_the_records_but_not_the_count() {
        let h = History::new(4, 2);
        for t in 0..6 {
            h.push(t as usize, rec(t, 0, t, 1));
        }
        assert_eq!(h.len(), 4);
        h.clear();
        assert_eq!((h.len(), h.written()), (0, 6));
        assert!(h.snapshot(None).is_empty());
        h.push(0, rec(42, 0, 0, 1));
        assert_eq!((h.len(), h.written()), (1, 7));
        assert_eq!(ids(&h.snapshot(None)), [42]);
    }

    #[test]
    fn concurrent_pushes_are_all_counted_and_kept() {
        let h = Arc::new(History::new(4_000, 2));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let h = h.clone();
                std::thread::spawn(move || {
                    for i in 0..1_000u64 {
                        h.push(t as usize % 2, rec(t * 1_000 + i, 0, i, 0));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!((h.written(), h.len()), (4_000, 4_000));
        let mut got = ids(&h.snapshot(None));
        got.sort_unstable();
        assert_eq!(got, (0..4_000).collect::<Vec<_>>(), "no slot taken twice");
    }
}
