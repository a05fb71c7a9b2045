//! `GuardedFunction`: what `@task_token_guard` returns. Calling it goes straight into Rust
//! (no Python wrapper frame) and returns a `TaskToken`.

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString, PyTuple};
use pyo3::{PyTraverseError, PyVisit};

use crate::errors::CoreError;
use crate::router::{Priority, Weight};
use crate::runtime::{current_runtime, submit_token};
use crate::token::{no_panic, weight_member, OpSpec, TaskToken};

/// A function whose every call becomes a `TaskToken` on the running coordinator.
///
/// Like the function it replaces it takes part in the garbage collector (a nested decorated
/// function that calls itself, or a method using `__class__`, forms a cycle), accepts weak
/// references, and pickles by reference (module and qualified name).
#[pyclass(
    frozen,
    dict,
    weakref,
    module = "tokengate._core",
    name = "GuardedFunction"
)]
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
        weight: i64,
        priority: i64,
        storage_speed: Option<u8>,
        tags: Option<Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        if !func.is_callable() {
            return Err(pyo3::exceptions::PyTypeError::new_err(
                "func must be callable",
            ));
        }
        let index = |v: i64| u8::try_from(v).ok();
        let weight = index(weight).and_then(Weight::from_index).ok_or_else(|| {
            CoreError::Config(format!("weight index must be 0, 1 or 2, got {weight}"))
        })?;
        let priority = index(priority)
            .and_then(Priority::from_index)
            .ok_or_else(|| {
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
        no_panic(py, || {
            submit_token(
                py,
                &shared,
                &self.op,
                args.clone().unbind(),
                kwargs.map(|k| k.clone().unbind()),
            )
        })
    }

    /// The function and tags it holds (the instance `__dict__` is visited by PyO3), but only
    /// while no token shares them: a queued token still calls the function, and the collector
    /// cannot see the token's share, so reporting the reference then would let it clear the
    /// function under the token (a cycle through it is collected once its tokens are gone).
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        if Arc::strong_count(&self.op) > 1 {
            return Ok(());
        }
        visit.call(&self.op.func)?;
        if let Some(t) = &self.op.tags {
            visit.call(t)?;
        }
        Ok(())
    }

    /// Nothing of its own to clear (the function and tags are shared with every token of
    /// it); PyO3 clears the instance `__dict__`, and the function, cells or class on a cycle
    /// through it clear themselves.
    fn __clear__(&self) {}

    /// Pickles by reference, like a function: `copy`, `pickle` and `multiprocessing` find it
    /// again as `module.qualname` (a nested function fails with the usual PicklingError).
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        slf.getattr("__qualname__")
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
