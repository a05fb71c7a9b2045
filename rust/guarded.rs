//! `GuardedFunction`: what `@task_token_guard` returns. Calling it goes straight into Rust
//! (no Python wrapper frame) and returns a `TaskToken`.

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString, PyTuple};

use crate::errors::CoreError;
use crate::router::{Priority, Weight};
use crate::runtime::{current_runtime, submit_token};
use crate::token::{weight_member, OpSpec, TaskToken};

/// A function whose every call becomes a `TaskToken` on the running coordinator.
#[pyclass(frozen, dict, module = "tokengate._core", name = "GuardedFunction")]
pub struct GuardedFunction {
    op: Arc<OpSpec>,
}

#[pymethods]
impl GuardedFunction {
    /// Validated input only: the Python decorator checks and normalises the arguments.
    #[new]
    #[pyo3(signature = (func, operation_type, weight, priority=1, storage_speed=None, tags=None))]
    fn new(
        func: Bound<'_, PyAny>,
        operation_type: Bound<'_, PyString>,
        weight: u8,
        priority: u8,
        storage_speed: Option<u8>,
        tags: Option<Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        if !func.is_callable() {
            return Err(pyo3::exceptions::PyTypeError::new_err(
                "func must be callable",
            ));
        }
        let weight = Weight::from_index(weight).ok_or_else(|| {
            CoreError::Config(format!("weight index must be 0, 1 or 2, got {weight}"))
        })?;
        let priority = Priority::from_index(priority).ok_or_else(|| {
            CoreError::Config(format!("priority index must be 0, 1 or 2, got {priority}"))
        })?;
        Ok(GuardedFunction {
            op: Arc::new(OpSpec {
                func: func.unbind(),
                operation_type: operation_type.unbind(),
                weight,
                priority,
                storage_speed,
                tags: tags.map(Bound::unbind),
            }),
        })
    }

    #[pyo3(signature = (*args, **kwargs))]
    fn __call__<'py>(
        &self,
        py: Python<'py>,
        args: &Bound<'py, PyTuple>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, TaskToken>> {
        let shared = current_runtime().map_err(|e| e.into_pyerr(py))?;
        submit_token(
            py,
            &shared,
            &self.op,
            args.clone().unbind(),
            kwargs.map(|k| k.clone().unbind()),
        )
    }

    /// Binds like a function when looked up on an instance.
    fn __get__<'py>(
        slf: Bound<'py, Self>,
        obj: Option<Bound<'py, PyAny>>,
        _objtype: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        match obj {
            Some(o) if !o.is_none() => slf
                .py()
                .import("types")?
                .getattr("MethodType")?
                .call1((slf, o)),
            _ => Ok(slf.into_any()),
        }
    }

    #[getter]
    fn operation_type(&self, py: Python<'_>) -> Py<PyString> {
        self.op.operation_type.clone_ref(py)
    }

    #[getter]
    fn weight<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        weight_member(py, self.op.weight)
    }

    #[getter]
    fn storage_speed(&self) -> Option<u8> {
        self.op.storage_speed
    }

    #[getter]
    fn tags(&self, py: Python<'_>) -> Option<Py<PyDict>> {
        self.op.tags.as_ref().map(|t| t.clone_ref(py))
    }

    /// The plain function (also available as `__wrapped__`).
    #[getter]
    fn func(&self, py: Python<'_>) -> Py<PyAny> {
        self.op.func.clone_ref(py)
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "<GuardedFunction {} weight={}>",
            self.op.operation_type.bind(py),
            self.op.weight.name()
        )
    }
}
