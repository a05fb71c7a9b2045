//! One error enum for the core, converted into the Python hierarchy rooted in
//! `tokengate.errors.TokenGateError` (the classes live in Python so they can also subclass
//! `RuntimeError`, `TimeoutError` or `ValueError`).

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

#[derive(Debug, Clone)]
pub enum CoreError {
    NotRunning,
    Forked,
    AdmissionClosed,
    PoolFull {
        capacity: usize,
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
    Config(String),
    Internal(String),
}

impl CoreError {
    fn class_name(&self) -> &'static str {
        match self {
            CoreError::NotRunning => "CoordinatorNotRunning",
            CoreError::Forked => "CoordinatorForked",
            CoreError::AdmissionClosed => "AdmissionClosed",
            CoreError::PoolFull { .. } => "PoolFull",
            CoreError::Killed { .. } => "TokenKilled",
            CoreError::Timeout { .. } => "TokenTimeout",
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
                 submit_timeout={s} s"
            ),
            CoreError::Killed { id, operation } => {
                format!("token {id} ({operation}) was killed before it ran")
            }
            CoreError::Timeout {
                id,
                operation,
                seconds,
            } => format!("token {id} ({operation}) did not finish within {seconds} s"),
            CoreError::Config(m) | CoreError::Internal(m) => m.clone(),
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
