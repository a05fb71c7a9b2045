//! TokenGate's native core (`tokengate._core`).
//!
//! Pure Rust (no interpreter needed, covered by `cargo test`): `state` (token state machine),
//! `router` (affinity policy), `mailbox` (bounded FIFO per worker), `sched` (pool, gate,
//! routing, stealing, parking, counters). PyO3 glue: `token`, `runtime`, `guarded`, `errors`.

pub mod breaker;
pub mod clock;
pub mod events;
pub mod health;
pub mod history;
pub mod mailbox;
pub mod model;
pub mod permits;
pub mod router;
pub mod sched;
pub mod state;
pub mod sync;
pub mod timers;
pub mod waits;

mod errors;
mod exitguard;
mod governor;
mod guard;
mod guarded;
mod monitor;
mod observe;
mod policy;
mod runtime;
mod token;

use pyo3::prelude::*;

/// Seconds on the clock token timestamps use (`time.monotonic()`'s clock on Unix).
#[pyfunction]
fn monotonic() -> f64 {
    clock::now_ns() as f64 / 1e9
}

#[pymodule]
#[pyo3(name = "_core")]
mod tokengate_core {
    #[pymodule_export]
    use super::guarded::GuardedFunction;
    #[pymodule_export]
    use super::monotonic;
    #[pymodule_export]
    use super::observe::{EventBatch, EventBatchIter, LifecycleEvent};
    #[pymodule_export]
    use super::runtime::{
        _after_fork_in_child, _on_worker_thread, checkpoint, current_token, Runtime,
    };
    #[pymodule_export]
    use super::token::{_debug_panic_on_run, TaskToken};

    use pyo3::prelude::*;

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        m.add("EVENT_KINDS", super::events::KINDS.to_vec())?;
        Ok(())
    }
}
