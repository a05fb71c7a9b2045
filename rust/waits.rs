//! Who waits on what inside tasks (pure Rust, no interpreter needed).
//!
//! A worker thread runs a *stack* of tokens: the one it took from its mailbox, plus any token it
//! waits for and runs inline because it had not started. When a task blocks — on a token running
//! elsewhere, for quiescence (`drain()`/`stop()`), for room in a full pool — its thread records
//! its stack and what it waits for here. That is enough to
//!
//! - refuse a wait that can never end (`enter` returns [`Deadlock`]): waiting on a token of one's
//!   own stack, or on a token whose thread waits, directly or through others, on one's stack;
//! - let `drain()`/`stop()` called from a task ignore the tokens that cannot finish before it
//!   returns: its own stack, and every stack that (transitively) waits on it
//!   ([`WaitGraph::excluded`]).
//!
//! Only the blocking path touches the graph (one short lock); running tokens never do.

use std::collections::HashSet;
use std::sync::Mutex;

use crate::sync::lock;

/// What a blocked task waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// A token of the same runtime, by id.
    Token(u64),
    /// Quiescence: every other token finished (`drain()`, `stop()`).
    Quiet,
    /// Anything else (room in a full pool, a token of another runtime).
    Other,
}

/// Why a wait was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Deadlock {
    /// The awaited token is on the waiter's own stack (itself, or a token it runs inline over).
    OwnStack { token: u64 },
    /// The awaited token's thread waits, through `chain`, on a token of the waiter's stack.
    Cycle { token: u64, chain: Vec<u64> },
}

#[derive(Debug)]
struct Entry {
    waiter: u64,
    stack: Vec<u64>,
    target: Target,
    /// The wait has a deadline: a chain of waits through it ends when it passes.
    timed: bool,
}

/// The blocked tasks of one runtime.
#[derive(Debug, Default)]
pub struct WaitGraph {
    entries: Mutex<Vec<Entry>>,
}

impl WaitGraph {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `waiter` (a thread, by any unique id) running `stack` now waits on
    /// `target` (`timed`: with a deadline), unless that wait can never end: a wait on its own
    /// stack, or a cycle of waits none of whose *other* waits has a deadline (this wait's own
    /// deadline would only end it in a timeout). Pair with [`WaitGraph::leave`].
    pub fn enter(
        &self,
        waiter: u64,
        stack: &[u64],
        target: Target,
        timed: bool,
    ) -> Result<(), Deadlock> {
        let mut entries = lock(&self.entries);
        if let Target::Token(t) = target {
            if stack.contains(&t) {
                return Err(Deadlock::OwnStack { token: t });
            }
            // Follow "t runs on a blocked thread, which waits on t2, ..." back to our stack.
            let mut chain = Vec::new();
            let mut cur = t;
            for _ in 0..=entries.len() {
                let Some(e) = entries.iter().find(|e| e.stack.contains(&cur)) else {
                    break; // cur's thread is running: it can finish
                };
                if e.timed {
                    break; // that wait ends by its deadline, and the chain with it
                }
                match e.target {
                    Target::Token(next) => {
                        chain.push(next);
                        if stack.contains(&next) {
                            return Err(Deadlock::Cycle { token: t, chain });
                        }
                        cur = next;
                    }
                    _ => break,
                }
            }
        }
        entries.push(Entry {
            waiter,
            stack: stack.to_vec(),
            target,
            timed,
        });
        Ok(())
    }

    /// `waiter` no longer waits.
    pub fn leave(&self, waiter: u64) {
        let mut entries = lock(&self.entries);
        if let Some(i) = entries.iter().position(|e| e.waiter == waiter) {
            entries.swap_remove(i);
        }
    }

    /// Calls `f` with the number of tokens that cannot finish while a task running `stack`
    /// waits for quiescence: `stack` itself, the stacks of other tasks waiting for quiescence,
    /// and every stack that waits, directly or through others, on one of those. The graph
    /// cannot change while `f` runs, so `f` can compare it with a live count consistently.
    pub fn with_excluded<R>(&self, stack: &[u64], f: impl FnOnce(u64) -> R) -> R {
        let entries = lock(&self.entries);
        let mut out: HashSet<u64> = stack.iter().copied().collect();
        if !stack.is_empty() {
            for e in entries.iter().filter(|e| e.target == Target::Quiet) {
                out.extend(e.stack.iter().copied());
            }
        }
        loop {
            let before = out.len();
            for e in entries.iter() {
                if let Target::Token(t) = e.target {
                    if out.contains(&t) {
                        out.extend(e.stack.iter().copied());
                    }
                }
            }
            if out.len() == before {
                break;
            }
        }
        f(out.len() as u64)
    }

    /// How many tasks are blocked.
    pub fn len(&self) -> usize {
        lock(&self.entries).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_on_its_own_stack_is_refused() {
        let g = WaitGraph::new();
        assert_eq!(
            g.enter(1, &[10, 11], Target::Token(10), false),
            Err(Deadlock::OwnStack { token: 10 })
        );
        assert!(g.is_empty(), "a refused wait is not recorded");
        assert_eq!(g.enter(1, &[10, 11], Target::Token(12), false), Ok(()));
        assert_eq!(g.len(), 1);
        g.leave(1);
        assert!(g.is_empty());
    }

    #[test]
    fn a_cycle_through_blocked_threads_is_refused() {
        let g = WaitGraph::new();
        // thread 1 runs A=1 and waits on B=2; thread 2 runs B, which waits on C=3 (thread 3)
        g.enter(1, &[1], Target::Token(2), false).unwrap();
        g.enter(2, &[2], Target::Token(3), false).unwrap();
        // thread 3 (running C) waiting on A closes the loop C -> A -> B -> C
        assert_eq!(
            g.enter(3, &[3], Target::Token(1), false),
            Err(Deadlock::Cycle {
                token: 1,
                chain: vec![2, 3]
            })
        );
        // waiting on something outside the loop is fine
        g.enter(3, &[3], Target::Token(4), false).unwrap();
        assert_eq!(g.len(), 3);
    }

    #[test]
    fn a_cycle_through_a_timed_wait_is_allowed() {
        let g = WaitGraph::new();
        // A waits on B with a timeout (and a fallback): B may wait on A, the loop ends
        g.enter(1, &[1], Target::Token(2), true).unwrap();
        assert_eq!(g.enter(2, &[2], Target::Token(1), false), Ok(()));
        // but a wait on one's own stack is refused even with a timeout
        assert_eq!(
            g.enter(3, &[3], Target::Token(3), true),
            Err(Deadlock::OwnStack { token: 3 })
        );
    }

    #[test]
    fn a_chain_that_ends_at_a_running_thread_is_allowed() {
        let g = WaitGraph::new();
        g.enter(1, &[1], Target::Token(2), false).unwrap(); // 2 runs on an unblocked thread
        g.enter(2, &[5, 6], Target::Token(1), false).unwrap();
        assert_eq!(g.len(), 2);
    }

    #[test]
    fn quiescence_excludes_the_stack_and_its_waiters() {
        let g = WaitGraph::new();
        // parent 1 waits on child 2 (the drainer); grandparent 0 waits on parent 1
        g.enter(10, &[1], Target::Token(2), false).unwrap();
        g.enter(11, &[0], Target::Token(1), false).unwrap();
        // an unrelated blocked task waits on token 7
        g.enter(12, &[8], Target::Token(7), false).unwrap();
        assert_eq!(g.with_excluded(&[2], |n| n), 3); // 2, 1, 0
                                                     // from outside any task nothing is excluded
        assert_eq!(g.with_excluded(&[], |n| n), 0);
    }

    #[test]
    fn two_drainers_do_not_wait_on_each_other() {
        let g = WaitGraph::new();
        g.enter(10, &[1], Target::Quiet, false).unwrap();
        g.enter(11, &[2, 3], Target::Quiet, false).unwrap();
        g.enter(12, &[4], Target::Token(3), false).unwrap();
        // task 1 draining excludes itself, the other drainer and its waiter
        assert_eq!(g.with_excluded(&[1], |n| n), 4);
        // a thread that is not a task waits for all of them
        assert_eq!(g.with_excluded(&[], |n| n), 0);
    }
}
