//! Locks that never consult process-global state.
//!
//! `parking_lot` parks contended threads in one process-wide hash table whose bucket locks a
//! thread of the parent may hold at `fork()`; a child that then contends any `parking_lot` lock
//! or parks on a token hangs forever in `WordLock::lock_slow`. The standard library's locks keep
//! all their state inside the lock (a futex word on Linux), so a lock created after the fork is
//! always usable in the child. Poisoning is ignored: every critical section here leaves its data
//! consistent, and a panic inside one is already reported as an `InternalError`.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, ignoring poisoning.
#[inline]
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
