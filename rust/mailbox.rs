//! A bounded FIFO per worker, with three priority lanes (FIFO within each lane).
//!
//! Capacity is reserved with a lock-free compare-and-swap (`try_reserve`) so the router can
//! pick a mailbox and know it has room before it changes a token's state; the item is then
//! pushed under a short lock.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};

use std::sync::Mutex;

use crate::sync::lock;

use crate::router::Priority;

#[derive(Debug)]
pub struct Mailbox<T> {
    lanes: Mutex<[VecDeque<T>; 3]>,
    /// Reserved plus queued items.
    len: AtomicUsize,
    cap: usize,
}

impl<T> Mailbox<T> {
    pub fn new(cap: usize) -> Self {
        assert!(cap >= 1, "mailbox capacity must be at least 1");
        Mailbox {
            lanes: Mutex::new([VecDeque::new(), VecDeque::new(), VecDeque::new()]),
            len: AtomicUsize::new(0),
            cap,
        }
    }

    #[inline]
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Room left (capacity minus reserved and queued items).
    pub fn room(&self) -> usize {
        self.cap.saturating_sub(self.len())
    }

    /// Reserves one place; `push_reserved` must follow.
    #[inline]
    pub fn try_reserve(&self) -> bool {
        self.try_reserve_many(1) == 1
    }

    /// Reserves up to `want` places; returns how many were reserved.
    pub fn try_reserve_many(&self, want: usize) -> usize {
        let mut cur = self.len.load(Ordering::Acquire);
        loop {
            let n = want.min(self.cap.saturating_sub(cur));
            if n == 0 {
                return 0;
            }
            match self
                .len
                .compare_exchange_weak(cur, cur + n, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return n,
                Err(seen) => cur = seen,
            }
        }
    }

    /// Gives back places reserved but not used.
    pub fn unreserve(&self, n: usize) {
        self.len.fetch_sub(n, Ordering::AcqRel);
    }

    #[inline]
    pub fn push_reserved(&self, item: T, prio: Priority) {
        lock(&self.lanes)[prio as usize].push_back(item);
    }

    /// Pushes a reserved item ahead of its lane (a retry that is due).
    pub fn push_reserved_front(&self, item: T, prio: Priority) {
        lock(&self.lanes)[prio as usize].push_front(item);
    }

    /// Pushes several reserved items under one lock.
    pub fn push_reserved_all(&self, items: impl IntoIterator<Item = (T, Priority)>) {
        let mut lanes = lock(&self.lanes);
        for (item, prio) in items {
            lanes[prio as usize].push_back(item);
        }
    }

    /// Pushes if there is room; gives the item back otherwise.
    pub fn try_push(&self, item: T, prio: Priority) -> Result<(), T> {
        if self.try_reserve() {
            self.push_reserved(item, prio);
            Ok(())
        } else {
            Err(item)
        }
    }

    /// The oldest item of the highest non-empty lane.
    #[inline]
    pub fn pop(&self) -> Option<T> {
        if self.is_empty() {
            return None;
        }
        let mut lanes = lock(&self.lanes);
        let item = lanes.iter_mut().find_map(|lane| lane.pop_front());
        if item.is_some() {
            self.len.fetch_sub(1, Ordering::AcqRel);
        }
        item
    }

    /// Calls `f` on each queued item, highest lane first, oldest first within a lane, until it
    /// returns false; returns false if it stopped early.
    pub fn visit(&self, mut f: impl FnMut(&T) -> bool) -> bool {
        if self.is_empty() {
            return true;
        }
        let lanes = lock(&self.lanes);
        lanes.iter().flat_map(|lane| lane.iter()).all(&mut f)
    }

    /// Removes the first queued item (any lane) for which `pred` holds; its place is freed.
    pub fn take_where(&self, mut pred: impl FnMut(&T) -> bool) -> Option<T> {
        if self.is_empty() {
            return None;
        }
        let mut lanes = lock(&self.lanes);
        for lane in lanes.iter_mut() {
            if let Some(pos) = lane.iter().position(&mut pred) {
                let item = lane.remove(pos);
                if item.is_some() {
                    self.len.fetch_sub(1, Ordering::AcqRel);
                }
                return item;
            }
        }
        None
    }

    /// Removes everything queued (reservations in flight stay counted).
    pub fn drain(&self) -> Vec<T> {
        let mut lanes = lock(&self.lanes);
        let out: Vec<T> = lanes.iter_mut().flat_map(|l| l.drain(..)).collect();
        self.len.fetch_sub(out.len(), Ordering::AcqRel);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque as Model;

    #[test]
    fn fifo_and_bound() {
        let m = Mailbox::new(3);
        for i in 0..3 {
            m.try_push(i, Priority::Normal).unwrap();
        }
        assert_eq!(m.try_push(9, Priority::Normal), Err(9));
        assert_eq!(m.len(), 3);
        assert_eq!(m.pop(), Some(0));
        assert_eq!(m.pop(), Some(1));
        m.try_push(3, Priority::Normal).unwrap();
        assert_eq!(m.drain(), vec![2, 3]);
        assert!(m.is_empty());
        assert_eq!(m.pop(), None);
    }

    #[test]
    fn priorities_jump_the_queue_fifo_within_lane() {
        let m = Mailbox::new(10);
        m.try_push("n1", Priority::Normal).unwrap();
        m.try_push("l1", Priority::Low).unwrap();
        m.try_push("h1", Priority::High).unwrap();
        m.try_push("n2", Priority::Normal).unwrap();
        m.try_push("h2", Priority::High).unwrap();
        let order: Vec<_> = std::iter::from_fn(|| m.pop()).collect();
        assert_eq!(order, vec!["h1", "h2", "n1", "n2", "l1"]);
    }

    #[test]
    fn visit_goes_in_pop_order_and_stops_early() {
        let m = Mailbox::new(10);
        assert!(m.visit(|_: &&str| panic!("an empty mailbox visits nothing")));
        for (item, p) in [
            ("n1", Priority::Normal),
            ("l1", Priority::Low),
            ("h1", Priority::High),
        ] {
            m.try_push(item, p).unwrap();
        }
        let mut seen = Vec::new();
        assert!(m.visit(|i| {
            seen.push(*i);
            true
        }));
        assert_eq!(seen, vec!["h1", "n1", "l1"]);
        let mut n = 0;
        assert!(!m.visit(|_| {
            n += 1;
            n < 2
        }));
        assert_eq!(n, 2);
        assert_eq!(m.len(), 3, "visiting takes nothing");
    }

    #[test]
    fn reserve_many_is_bounded() {
        let m: Mailbox<u8> = Mailbox::new(5);
        assert_eq!(m.try_reserve_many(3), 3);
        assert_eq!(m.try_reserve_many(3), 2);
        assert_eq!(m.try_reserve_many(1), 0);
        m.unreserve(4);
        assert_eq!(m.room(), 4);
    }

    #[test]
    fn concurrent_producers_consumers_lose_nothing() {
        use std::sync::Arc;
        let m = Arc::new(Mailbox::new(64));
        let producers: Vec<_> = (0..4)
            .map(|p| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000u64 {
                        let mut item = p * 1_000_000 + i;
                        loop {
                            match m.try_push(item, Priority::Normal) {
                                Ok(()) => break,
                                Err(back) => {
                                    item = back;
                                    std::thread::yield_now();
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        let consumers: Vec<_> = (0..3)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || {
                    let mut got = Vec::new();
                    let mut idle = 0;
                    while idle < 100_000 {
                        match m.pop() {
                            Some(v) => {
                                got.push(v);
                                idle = 0;
                            }
                            None => {
                                idle += 1;
                                std::thread::yield_now();
                            }
                        }
                    }
                    got
                })
            })
            .collect();
        for p in producers {
            p.join().unwrap();
        }
        let mut all: Vec<u64> = consumers
            .into_iter()
            .flat_map(|c| c.join().unwrap())
            .collect();
        all.extend(m.drain());
        all.sort_unstable();
        let mut expected: Vec<u64> = (0..4)
            .flat_map(|p| (0..10_000).map(move |i| p * 1_000_000 + i))
            .collect();
        expected.sort_unstable();
        assert_eq!(all, expected);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push(u8, u8),
        Pop,
    }

    proptest! {
        #[test]
        fn matches_a_model(cap in 1usize..8, ops in prop::collection::vec(
            prop_oneof![(0u8..3, any::<u8>()).prop_map(|(p, v)| Op::Push(p, v)), Just(Op::Pop)], 0..200)) {
            let m = Mailbox::new(cap);
            let mut model: [Model<u8>; 3] = [Model::new(), Model::new(), Model::new()];
            for op in ops {
                match op {
                    Op::Push(p, v) => {
                        let total: usize = model.iter().map(|l| l.len()).sum();
                        let r = m.try_push(v, Priority::from_index(p).unwrap());
                        if total < cap {
                            prop_assert!(r.is_ok());
                            model[p as usize].push_back(v);
                        } else {
                            prop_assert_eq!(r, Err(v));
                        }
                    }
                    Op::Pop => {
                        let want = model.iter_mut().find_map(|l| l.pop_front());
                        prop_assert_eq!(m.pop(), want);
                    }
                }
                prop_assert_eq!(m.len(), model.iter().map(|l| l.len()).sum::<usize>());
            }
        }
    }
}
