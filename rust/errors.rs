//! One error enum for the core, converted into the Python hierarchy rooted in
//! `tokengate.errors.TokenGateError` (the classes live in Python so they can also subclass
//! `RuntimeError`, `TimeoutError` or `ValueError`).

use std::time::{Duration, Instant};

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

/// Longer waits than this (about 31 years, `inf` included) mean "no limit".
const FOREVER_SECS: f64 = 1e9;

/// The instant `secs` seconds from now; `None` (no limit) for `None`, `inf` or any wait too
/// long to represent. Never panics (negative and NaN count as 0; callers validate first).
pub(crate) fn deadline_in(secs: Option<f64>) -> Option<Instant> {
    let s = secs?;
    if s.is_nan() {
        return Some(Instant::now());
    }
    if s >= FOREVER_SECS {
        return None;
    }
    Instant::now().checked_add(Duration::from_secs_f64(s.max(0.0)))
}

/// Seconds as a person would write them: `0.2`, `1.5`, `30`, `1e-300`.
pub(crate) fn fmt_secs(s: f64) -> String {
    if s == 0.0 || (1e-3..1e9).contains(&s) {
        let t = format!("{s:.3}");
        let t = t.trim_end_matches('0').trim_end_matches('.');
        t.to_string()
    } else {
        let t = format!("{s:.3e}");
        match t.split_once('e') {
            Some((m, e)) => {
                let m = m.trim_end_matches('0').trim_end_matches('.');
                format!("{m}e{e}")
            }
            None => t,
        }
    }
}

#[derive(Debug, Clone)]
pub enum CoreError {
    NotRunning,
    Forked,
    AdmissionClosed,
    PoolFull {
        capacity: usize,
        waited: Option<f64>,
    },
    /// The queued tokens' arguments would exceed the memory budget.
    MemoryBudget {
        budget: u64,
        queued: u64,
        bytes: u64,
        waited: Option<f64>,
    },
    Killed {
        id: u64,
        operation: String,
    },
    Timeout {
        id: u64,
        operation: String,
        seconds: f64,
    },
    /// The token's own `timeout` passed (it ended TIMED_OUT).
    TimedOut {
        id: u64,
        operation: String,
        seconds: f64,
    },
    /// Killed while it ran (CANCELLING, then KILLED): its result is discarded.
    KilledRunning {
        id: u64,
        operation: String,
    },
    /// A chain step ended without running because the step before it was killed or timed
    /// out.
    Upstream {
        id: u64,
        operation: String,
        parent: u64,
        timed_out: bool,
        /// The step before was quarantined (it ends this one KILLED).
        quarantined: bool,
    },
    /// Raised inside a task by `checkpoint()` once its token was killed or timed out.
    Cancelled {
        id: u64,
        operation: String,
        why: &'static str,
    },
    /// The operation's circuit breaker refused the call (the message says why and until when).
    Blocked(String),
    /// The call was quarantined by spike detection instead of run.
    Quarantined {
        id: u64,
        operation: String,
        /// Its record id in the quarantine store, or why it could not be stored.
        record: Result<String, String>,
    },
    /// A task waited on a token that cannot finish while it waits.
    Deadlock(String),
    Config(String),
    Internal(String),
}

impl CoreError {
    fn class_name(&self) -> &'static str {
        match self {
            CoreError::NotRunning => "CoordinatorNotRunning",
            CoreError::Forked => "CoordinatorForked",
            CoreError::AdmissionClosed => "AdmissionClosed",
            CoreError::PoolFull { .. } | CoreError::MemoryBudget { .. } => "PoolFull",
            CoreError::Killed { .. } | CoreError::KilledRunning { .. } => "TokenKilled",
            CoreError::Timeout { .. } | CoreError::TimedOut { .. } => "TokenTimeout",
            CoreError::Cancelled { .. } => "TokenCancelled",
            CoreError::Upstream {
                timed_out: true, ..
            } => "TokenTimeout",
            CoreError::Upstream { .. } => "TokenKilled",
            CoreError::Blocked(_) => "MethodBlocked",
            CoreError::Quarantined { .. } => "TokenQuarantined",
            CoreError::Deadlock(_) => "TokenDeadlock",
            CoreError::Config(_) => "ConfigurationError",
            CoreError::Internal(_) => "InternalError",
        }
    }

    fn message(&self) -> String {
        match self {
            CoreError::NotRunning => "no OperationsCoordinator is running: start one with \
                `with OperationsCoordinator():` (or `coord = OperationsCoordinator(); \
                coord.start()`) before calling a @task_token_guard function"
                .to_string(),
            CoreError::Forked => "this coordinator was started before os.fork(): its workers \
                live in the parent process; start a new OperationsCoordinator in this process"
                .to_string(),
            CoreError::AdmissionClosed => "admission is closed (drain() or stop() was called); \
                call resume() to reopen it"
                .to_string(),
            CoreError::PoolFull {
                capacity,
                waited: None,
            } => format!(
                "token pool is full (pool_capacity={capacity}) and overflow='reject'; \
                 raise pool_capacity or use overflow='block'"
            ),
            CoreError::PoolFull {
                capacity,
                waited: Some(s),
            } => format!(
                "token pool is full (pool_capacity={capacity}) and no room freed within \
                 submit_timeout={} s",
                fmt_secs(*s)
            ),
            CoreError::MemoryBudget {
                budget,
                queued,
                bytes,
                waited,
            } => {
                let tail = match waited {
                    None => "and overflow='reject'; raise memory_budget or use overflow='block'"
                        .to_string(),
                    Some(s) => {
                        format!("and no room freed within submit_timeout={} s", fmt_secs(*s))
                    }
                };
                format!(
                    "memory budget for queued work is full (memory_budget={budget} bytes, \
                     {queued} queued, this call's arguments about {bytes}) {tail}"
                )
            }
            CoreError::Killed { id, operation } => {
                format!("token {id} ({operation}) was killed before it ran")
            }
            CoreError::Timeout {
                id,
                operation,
                seconds,
            } => format!(
                "token {id} ({operation}) did not finish within {} s",
                fmt_secs(*seconds)
            ),
            CoreError::TimedOut {
                id,
                operation,
                seconds,
            } => format!(
                "token {id} ({operation}) timed out: its timeout of {} s passed before it \
                 finished",
                fmt_secs(*seconds)
            ),
            CoreError::KilledRunning { id, operation } => {
                format!("token {id} ({operation}) was killed while it ran; its result is discarded")
            }
            CoreError::Upstream {
                id,
                operation,
                parent,
                timed_out,
                quarantined,
            } => format!(
                "token {id} ({operation}) did not run: token {parent}, the step before it in \
                 its chain, {}",
                if *timed_out {
                    "timed out"
                } else if *quarantined {
                    "was quarantined"
                } else {
                    "was killed"
                }
            ),
            CoreError::Cancelled { id, operation, why } => format!(
                "token {id} ({operation}) was {why}: stop this task (checkpoint() raises \
                 until it returns)"
            ),
            CoreError::Quarantined {
                id,
                operation,
                record,
            } => {
                let tail = match record {
                    Ok(rid) => format!(
                        "release record {rid} from the quarantine store to run it \
                         (coordinator.guard_house.release)"
                    ),
                    Err(why) => {
                        format!("its record could not be stored ({why}), so it cannot be released")
                    }
                };
                format!(
                    "token {id} ({operation}) was quarantined: its arguments predict a cost far \
                     above the operation's baseline, so it did not run; {tail}"
                )
            }
            CoreError::Blocked(m)
            | CoreError::Deadlock(m)
            | CoreError::Config(m)
            | CoreError::Internal(m) => m.clone(),
        }
    }

    pub fn into_pyerr(self, py: Python<'_>) -> PyErr {
        match error_class(py, self.class_name()) {
            Ok(cls) => PyErr::from_type(cls, self.message()),
            Err(e) => e,
        }
    }
}

impl From<CoreError> for PyErr {
    fn from(e: CoreError) -> PyErr {
        Python::attach(|py| e.into_pyerr(py))
    }
}

static ERRORS_MODULE: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

/// A class of `tokengate.errors` by name.
pub fn error_class<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyType>> {
    let m =
        ERRORS_MODULE.get_or_try_init(py, || py.import("tokengate.errors").map(Bound::unbind))?;
    Ok(m.bind(py).getattr(name)?.cast_into::<PyType>()?)
}

/// An `InternalError` instance (not raised), for storing as a token's failure.
pub fn internal_error_value(py: Python<'_>, msg: String) -> Py<pyo3::exceptions::PyBaseException> {
    CoreError::Internal(msg).into_pyerr(py).into_value(py)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_read_well() {
        assert_eq!(fmt_secs(0.2), "0.2");
        assert_eq!(fmt_secs(30.0), "30");
        assert_eq!(fmt_secs(1.25), "1.25");
        assert_eq!(fmt_secs(0.0), "0");
        assert_eq!(fmt_secs(1e-300), "1e-300");
        assert_eq!(fmt_secs(2.5e12), "2.5e12");
    }

    #[test]
    fn huge_waits_have_no_deadline_and_never_panic() {
        assert!(deadline_in(None).is_none());
        assert!(deadline_in(Some(f64::INFINITY)).is_none());
        assert!(deadline_in(Some(1e300)).is_none());
        assert!(deadline_in(Some(1e19)).is_none());
        let soon = deadline_in(Some(0.5)).unwrap();
        assert!(soon > Instant::now());
        assert!(deadline_in(Some(-1.0)).unwrap() <= Instant::now());
        assert!(deadline_in(Some(f64::NAN)).is_some());
    }
}
