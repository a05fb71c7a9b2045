//! Token state machine (pure Rust, no interpreter needed).
//!
//! A token moves CREATED → WAITING → ADMITTED → EXECUTING → COMPLETED | FAILED, may skip WAITING
//! (CREATED → ADMITTED when a mailbox has room at once), and may become KILLED from any state
//! before EXECUTING. Policy adds: TIMED_OUT from any state before a final one (its deadline
//! passed); CANCELLING from EXECUTING (killed while it runs: the outcome is decided, the worker
//! still runs the task and discards its result), then KILLED when the task returns; EXECUTING →
//! WAITING for a retry; ADMITTED → WAITING when a queued token is re-routed to a core that
//! cannot take it from its mailbox; CREATED → EXECUTING for a call run where it is made
//! (passthrough mode, a chain step that fails with its parent's cause). Every transition is
//! one compare-and-swap on an `AtomicU8`; an illegal transition is refused, never applied.

use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};

use crate::clock::now_ns;
use crate::router::{Priority, Weight};

/// The states of a token. The discriminants are the values the Python `TokenState` enum uses.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenState {
    Created = 0,
    Waiting = 1,
    Admitted = 2,
    Executing = 3,
    Completed = 4,
    Failed = 5,
    Killed = 6,
    TimedOut = 7,
    Cancelling = 8,
    /// Refused before it was accepted: the Guard House predicted a spike (final).
    Quarantined = 9,
}

impl TokenState {
    pub const ALL: [TokenState; 10] = [
        TokenState::Created,
        TokenState::Waiting,
        TokenState::Admitted,
        TokenState::Executing,
        TokenState::Completed,
        TokenState::Failed,
        TokenState::Killed,
        TokenState::TimedOut,
        TokenState::Cancelling,
        TokenState::Quarantined,
    ];

    fn from_bits(bits: u8) -> TokenState {
        match bits & STATE_MASK {
            0 => TokenState::Created,
            1 => TokenState::Waiting,
            2 => TokenState::Admitted,
            3 => TokenState::Executing,
            4 => TokenState::Completed,
            5 => TokenState::Failed,
            6 => TokenState::Killed,
            7 => TokenState::TimedOut,
            9 => TokenState::Quarantined,
            _ => TokenState::Cancelling,
        }
    }

    /// COMPLETED, FAILED, KILLED, TIMED_OUT and QUARANTINED are final: nothing leaves them.
    #[inline]
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TokenState::Completed
                | TokenState::Failed
                | TokenState::Killed
                | TokenState::TimedOut
                | TokenState::Quarantined
        )
    }

    /// CREATED, WAITING or ADMITTED: not started (or between attempts).
    #[inline]
    pub fn is_queued(self) -> bool {
        matches!(
            self,
            TokenState::Created | TokenState::Waiting | TokenState::Admitted
        )
    }

    /// Final, or CANCELLING: the outcome is decided and waiters are released.
    #[inline]
    pub fn is_settled(self) -> bool {
        self.is_final() || self == TokenState::Cancelling
    }

    /// Whether the state machine allows `self → to`.
    pub fn can_become(self, to: TokenState) -> bool {
        use TokenState::*;
        matches!(
            (self, to),
            (Created, Waiting)
                | (Created, Admitted)
                | (Waiting, Admitted)
                | (Admitted, Executing)
                | (Executing, Completed)
                | (Executing, Failed)
                | (Created, Killed)
                | (Waiting, Killed)
                | (Admitted, Killed)
                | (Created, TimedOut)
                | (Waiting, TimedOut)
                | (Admitted, TimedOut)
                | (Executing, TimedOut)
                | (Executing, Cancelling)
                | (Cancelling, Killed)
                | (Executing, Waiting)
                | (Admitted, Waiting)
                | (Created, Executing)
                | (Created, Quarantined)
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            TokenState::Created => "CREATED",
            TokenState::Waiting => "WAITING",
            TokenState::Admitted => "ADMITTED",
            TokenState::Executing => "EXECUTING",
            TokenState::Completed => "COMPLETED",
            TokenState::Failed => "FAILED",
            TokenState::Killed => "KILLED",
            TokenState::TimedOut => "TIMED_OUT",
            TokenState::Cancelling => "CANCELLING",
            TokenState::Quarantined => "QUARANTINED",
        }
    }
}

const STATE_MASK: u8 = 0x0F;
/// Test hook: the worker panics while processing a token carrying this flag.
pub const FLAG_PANIC: u8 = 0x40;
/// The token holds limiter permits (released once, by whoever clears the flag).
pub const FLAG_PERMITS: u8 = 0x10;
/// The token waits outside the pool and mailboxes (held by a limiter or for a retry delay).
pub const FLAG_HELD: u8 = 0x20;
/// The worker that ran the current attempt is storing its outcome: no timeout or kill may
/// settle the token meanwhile (only tokens that can have two attempts at once use it).
pub const FLAG_FINISHING: u8 = 0x80;

/// Why a transition was not applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransitionError {
    /// The state machine does not allow `from → to` at all.
    Illegal { from: TokenState, to: TokenState },
    /// The token was not in `expected` (another thread moved it first).
    Conflict { actual: TokenState },
}

/// The atomic state cell: the low four bits hold the state, high bits are flags.
#[derive(Debug)]
pub struct StateCell(AtomicU8);

impl Default for StateCell {
    fn default() -> Self {
        StateCell(AtomicU8::new(TokenState::Created as u8))
    }
}

impl StateCell {
    #[inline]
    pub fn load(&self) -> TokenState {
        TokenState::from_bits(self.0.load(Ordering::Acquire))
    }

    #[inline]
    pub fn raw(&self) -> u8 {
        self.0.load(Ordering::Acquire)
    }

    /// The address waiters park on.
    pub fn key(&self) -> usize {
        &self.0 as *const AtomicU8 as usize
    }

    /// Moves `from → to` if the token is in `from`; returns the flags it carried.
    pub fn transition(&self, from: TokenState, to: TokenState) -> Result<u8, TransitionError> {
        if !from.can_become(to) {
            return Err(TransitionError::Illegal { from, to });
        }
        let mut cur = self.0.load(Ordering::Acquire);
        loop {
            if cur & STATE_MASK != from as u8 {
                return Err(TransitionError::Conflict {
                    actual: TokenState::from_bits(cur),
                });
            }
            let next = (cur & !STATE_MASK) | to as u8;
            match self
                .0
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(cur & !STATE_MASK),
                Err(seen) => cur = seen,
            }
        }
    }

    /// KILLED from whatever pre-execution state the token is in. Returns the state it left,
    /// or the state that made the kill impossible (EXECUTING, CANCELLING or final).
    pub fn kill(&self) -> Result<(TokenState, u8), TokenState> {
        let mut cur = self.0.load(Ordering::Acquire);
        loop {
            let st = TokenState::from_bits(cur);
            if !st.is_queued() {
                return Err(st);
            }
            let next = (cur & !STATE_MASK) | TokenState::Killed as u8;
            match self
                .0
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok((st, cur & !STATE_MASK)),
                Err(seen) => cur = seen,
            }
        }
    }

    /// Sets flag bits; returns the previous raw value.
    #[inline]
    pub fn set_flags(&self, flags: u8) -> u8 {
        self.0.fetch_or(flags, Ordering::AcqRel)
    }

    /// Clears flag bits; returns whether any of them was set.
    #[inline]
    pub fn clear_flags(&self, flags: u8) -> bool {
        self.0.fetch_and(!flags, Ordering::AcqRel) & flags != 0
    }

    /// Moves the token from whatever state it is in to `to` if `allowed(state)` says so and
    /// no `FLAG_FINISHING` is set; returns the state it left and its flags, or the state that
    /// made it impossible (with `None` flags when it was finishing).
    pub fn settle(
        &self,
        to: TokenState,
        allowed: impl Fn(TokenState) -> bool,
    ) -> Result<(TokenState, u8), (TokenState, bool)> {
        let mut cur = self.0.load(Ordering::Acquire);
        loop {
            let st = TokenState::from_bits(cur);
            if cur & FLAG_FINISHING != 0 {
                return Err((st, true));
            }
            if !allowed(st) || !st.can_become(to) {
                return Err((st, false));
            }
            let next = (cur & !STATE_MASK) | to as u8;
            match self
                .0
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok((st, cur & !STATE_MASK)),
                Err(seen) => cur = seen,
            }
        }
    }

    /// Clears `FLAG_HELD` if the token is still WAITING (it leaves its place outside the
    /// pool alive); false, with the flag kept, if it was settled there.
    pub fn leave_held(&self) -> bool {
        let mut cur = self.0.load(Ordering::Acquire);
        loop {
            if cur & STATE_MASK != TokenState::Waiting as u8 {
                return false;
            }
            match self.0.compare_exchange_weak(
                cur,
                cur & !FLAG_HELD,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(seen) => cur = seen,
            }
        }
    }

    /// Sets `FLAG_FINISHING` if the token is EXECUTING and not finishing already.
    pub fn begin_finishing(&self) -> bool {
        let mut cur = self.0.load(Ordering::Acquire);
        loop {
            if cur & STATE_MASK != TokenState::Executing as u8 || cur & FLAG_FINISHING != 0 {
                return false;
            }
            match self.0.compare_exchange_weak(
                cur,
                cur | FLAG_FINISHING,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(seen) => cur = seen,
            }
        }
    }
}

/// The pure part of a token: identity, routing metadata, state and timestamps.
#[derive(Debug)]
pub struct Header {
    pub id: u64,
    weight: AtomicU8,
    priority: AtomicU8,
    pub state: StateCell,
    core: AtomicU16,
    worker: AtomicU16,
    /// Attempts started (1 once it runs; a retry is a new attempt of the same token).
    attempt: AtomicU32,
    /// Estimated bytes of its arguments counted against the memory budget (0: not counted).
    bytes: AtomicU32,
    created_ns: u64,
    admitted_ns: AtomicU64,
    started_ns: AtomicU64,
    finished_ns: AtomicU64,
    /// The cost model's view of the call (operations that predict): the size feature of its
    /// arguments (f32 bits) and its predicted duration in ns (0: none).
    size: AtomicU32,
    predicted_ns: AtomicU64,
}

impl Header {
    pub fn new(id: u64, weight: Weight, priority: Priority) -> Header {
        Header::new_at(id, weight, priority, now_ns())
    }

    /// A header created at `created_ns` (a caller that read the clock already).
    pub fn new_at(id: u64, weight: Weight, priority: Priority, created_ns: u64) -> Header {
        Header {
            id,
            weight: AtomicU8::new(weight as u8),
            priority: AtomicU8::new(priority as u8),
            state: StateCell::default(),
            core: AtomicU16::new(0),
            worker: AtomicU16::new(0),
            attempt: AtomicU32::new(0),
            bytes: AtomicU32::new(0),
            created_ns,
            size: AtomicU32::new(0),
            predicted_ns: AtomicU64::new(0),
            admitted_ns: AtomicU64::new(0),
            started_ns: AtomicU64::new(0),
            finished_ns: AtomicU64::new(0),
        }
    }

    /// The routing weight (changed only by a re-route, while the token is queued).
    #[inline]
    pub fn weight(&self) -> Weight {
        Weight::from_index(self.weight.load(Ordering::Relaxed)).unwrap_or(Weight::Medium)
    }

    /// The queue lane (changed only by a re-prioritization, while the token is queued).
    #[inline]
    pub fn priority(&self) -> Priority {
        Priority::from_index(self.priority.load(Ordering::Relaxed)).unwrap_or(Priority::Normal)
    }

    pub(crate) fn set_weight(&self, w: Weight) {
        self.weight.store(w as u8, Ordering::Relaxed)
    }

    pub(crate) fn set_priority(&self, p: Priority) {
        self.priority.store(p as u8, Ordering::Relaxed)
    }

    /// Records the argument bytes counted against the memory budget (saturating at 4 GiB).
    pub(crate) fn set_bytes(&self, n: u64) {
        self.bytes
            .store(n.min(u32::MAX as u64) as u32, Ordering::Release)
    }

    /// Takes the counted bytes (once); 0 if none were counted or they were taken already.
    #[inline]
    pub(crate) fn take_bytes(&self) -> u64 {
        if self.bytes.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        self.bytes.swap(0, Ordering::AcqRel) as u64
    }

    /// Attempts started so far.
    #[inline]
    pub fn attempt(&self) -> u32 {
        self.attempt.load(Ordering::Acquire)
    }

    /// Counts a new attempt (before the transition to EXECUTING); returns its number.
    #[inline]
    pub(crate) fn next_attempt(&self) -> u32 {
        self.attempt.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Takes back an attempt counted by `next_attempt` that did not start.
    #[inline]
    pub(crate) fn undo_attempt(&self) {
        self.attempt.fetch_sub(1, Ordering::AcqRel);
    }

    /// 0-based core index and worker index, once admitted.
    pub fn placement(&self) -> Option<(usize, usize)> {
        let c = self.core.load(Ordering::Acquire);
        if c == 0 {
            None
        } else {
            Some((
                c as usize - 1,
                self.worker.load(Ordering::Acquire) as usize - 1,
            ))
        }
    }

    pub(crate) fn set_placement(&self, core: usize, worker: usize) {
        self.worker.store((worker + 1) as u16, Ordering::Release);
        self.core.store((core + 1) as u16, Ordering::Release);
    }

    pub fn created_ns(&self) -> u64 {
        self.created_ns
    }
    pub fn admitted_ns(&self) -> Option<u64> {
        nonzero(self.admitted_ns.load(Ordering::Acquire))
    }
    pub fn started_ns(&self) -> Option<u64> {
        nonzero(self.started_ns.load(Ordering::Acquire))
    }
    pub fn finished_ns(&self) -> Option<u64> {
        nonzero(self.finished_ns.load(Ordering::Acquire))
    }
    /// The size feature of the call's arguments and its predicted duration (ns), if the
    /// operation's cost model judged it.
    pub fn prediction(&self) -> Option<(f32, u64)> {
        let p = self.predicted_ns.load(Ordering::Relaxed);
        (p > 0).then(|| (f32::from_bits(self.size.load(Ordering::Relaxed)), p))
    }
    pub(crate) fn set_prediction(&self, size: f32, predicted_ns: u64) {
        self.size.store(size.to_bits(), Ordering::Relaxed);
        self.predicted_ns
            .store(predicted_ns.max(1), Ordering::Relaxed);
    }
    /// The size feature alone (an operation that learns but had too few samples to predict).
    pub fn size_feature(&self) -> f32 {
        f32::from_bits(self.size.load(Ordering::Relaxed))
    }
    pub(crate) fn set_size_feature(&self, size: f32) {
        self.size.store(size.to_bits(), Ordering::Relaxed);
    }
    pub(crate) fn stamp_admitted(&self, t: u64) {
        self.admitted_ns.store(t, Ordering::Release)
    }
    pub(crate) fn stamp_started(&self, t: u64) {
        self.started_ns.store(t, Ordering::Release)
    }
    pub(crate) fn stamp_finished(&self, t: u64) {
        self.finished_ns.store(t, Ordering::Release)
    }
}

fn nonzero(v: u64) -> Option<u64> {
    (v != 0).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use TokenState::*;

    #[test]
    fn legal_path_is_applied() {
        let c = StateCell::default();
        assert_eq!(c.load(), Created);
        c.transition(Created, Waiting).unwrap();
        c.transition(Waiting, Admitted).unwrap();
        c.transition(Admitted, Executing).unwrap();
        c.transition(Executing, Completed).unwrap();
        assert_eq!(c.load(), Completed);
        assert!(c.load().is_final());
    }

    #[test]
    fn illegal_transitions_are_refused() {
        for from in TokenState::ALL {
            for to in TokenState::ALL {
                let c = StateCell(AtomicU8::new(from as u8));
                let r = c.transition(from, to);
                if from.can_become(to) {
                    assert!(r.is_ok(), "{from:?} -> {to:?}");
                    assert_eq!(c.load(), to);
                } else {
                    assert_eq!(r, Err(TransitionError::Illegal { from, to }));
                    assert_eq!(c.load(), from, "refused transition must not apply");
                }
            }
        }
    }

    #[test]
    fn conflict_when_not_in_expected_state() {
        let c = StateCell::default();
        assert_eq!(
            c.transition(Admitted, Executing),
            Err(TransitionError::Conflict { actual: Created })
        );
    }

    #[test]
    fn kill_only_before_execution() {
        for st in TokenState::ALL {
            let c = StateCell(AtomicU8::new(st as u8 | FLAG_PANIC));
            let r = c.kill();
            if matches!(st, Created | Waiting | Admitted) {
                assert_eq!(r, Ok((st, FLAG_PANIC)));
                assert_eq!(c.load(), Killed);
            } else {
                assert_eq!(r, Err(st));
                assert_eq!(c.load(), st);
            }
        }
    }

    #[test]
    fn flags_survive_transitions() {
        let c = StateCell::default();
        c.set_flags(FLAG_PANIC);
        let flags = c.transition(Created, Admitted).unwrap();
        assert_eq!(flags, FLAG_PANIC);
        assert_eq!(c.raw() & FLAG_PANIC, FLAG_PANIC);
        assert_eq!(c.load(), Admitted);
    }

    proptest::proptest! {
        /// Random transition requests against a model: a request is applied exactly when the
        /// model says it is legal from the current state, and the state never leaves a final one.
        #[test]
        fn random_requests_follow_the_model(reqs in proptest::collection::vec((0u8..10, 0u8..10, proptest::bool::ANY), 0..64)) {
            let c = StateCell::default();
            let mut model = Created;
            for (from, to, is_kill) in reqs {
                let (from, to) = (TokenState::ALL[from as usize], TokenState::ALL[to as usize]);
                if is_kill {
                    let r = c.kill();
                    if model.is_queued() {
                        proptest::prop_assert_eq!(r, Ok((model, 0)));
                        model = Killed;
                    } else {
                        proptest::prop_assert_eq!(r, Err(model));
                    }
                } else {
                    let r = c.transition(from, to);
                    if !from.can_become(to) {
                        proptest::prop_assert_eq!(r, Err(TransitionError::Illegal { from, to }));
                    } else if from != model {
                        proptest::prop_assert_eq!(r, Err(TransitionError::Conflict { actual: model }));
                    } else {
                        proptest::prop_assert!(r.is_ok());
                        model = to;
                    }
                }
                proptest::prop_assert_eq!(c.load(), model);
            }
        }
    }

    #[test]
    fn start_and_kill_race_has_one_winner() {
        use std::sync::Arc;
        for _ in 0..200 {
            let c = Arc::new(StateCell(AtomicU8::new(Admitted as u8)));
            let c2 = c.clone();
            let t = std::thread::spawn(move || c2.kill().is_ok());
            let started = c.transition(Admitted, Executing).is_ok();
            let killed = t.join().unwrap();
            assert!(started ^ killed, "exactly one of start/kill must win");
        }
    }
}
