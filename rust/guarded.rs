//! `GuardedFunction`: what `@task_token_guard` returns. Calling it goes straight into Rust
//! (no Python wrapper frame) and returns a `TaskToken`.

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString, PyTuple};
use pyo3::{PyTraverseError, PyVisit};

use crate::errors::CoreError;
use crate::policy::{limit_conf, Jitter, LimitDecl, Policy};
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
    pub(crate) op: Arc<OpSpec>,
}

#[pymethods]
impl GuardedFunction {
    /// Validated input only: the Python decorator (`tokengate.policy.options`) checks and
    /// normalises the arguments.
    #[new]
    #[pyo3(signature = (func, operation_type, weight, priority=1, storage_speed=None, tags=None,
        *, timeout=None, retries=0, retry_backoff=0.0, retry_backoff_max=None,
        retry_jitter=true, retry_on=None, retry_timeouts=false, retry_budget=None,
        on_exhausted=None, max_concurrency=None, rate_limit=None, rate_burst=None,
        limit_by=None, complexity=None, guard=None, spike_check=true, copy_context=true))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        func: Bound<'_, PyAny>,
        operation_type: Bound<'_, PyString>,
        weight: i64,
        priority: i64,
        storage_speed: Option<u8>,
        tags: Option<Bound<'_, PyDict>>,
        timeout: Option<f64>,
        retries: u32,
        retry_backoff: f64,
        retry_backoff_max: Option<f64>,
        retry_jitter: bool,
        retry_on: Option<Bound<'_, PyTuple>>,
        retry_timeouts: bool,
        retry_budget: Option<f64>,
        on_exhausted: Option<Bound<'_, PyAny>>,
        max_concurrency: Option<usize>,
        rate_limit: Option<f64>,
        rate_burst: Option<u32>,
        limit_by: Option<String>,
        complexity: Option<f64>,
        guard: Option<Bound<'_, PyDict>>,
        spike_check: bool,
        copy_context: bool,
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
        if storage_speed.is_some_and(|s| s > 3) {
            return Err(CoreError::Config(format!(
                "storage_speed index must be 0 to 3, got {storage_speed:?}"
            ))
            .into());
        }
        let limit = if max_concurrency.is_some() || rate_limit.is_some() {
            Some(LimitDecl {
                conf: limit_conf(max_concurrency, rate_limit, rate_burst)
                    .map_err(CoreError::Config)?,
                limit_by,
            })
        } else {
            None
        };
        // Any option away from its default keeps a policy (a backoff given without retries
        // applies to the retries `fn.options(retries=...)` adds).
        let policy = (timeout.is_some()
            || retries > 0
            || limit.is_some()
            || on_exhausted.is_some()
            || retry_budget.is_some()
            || retry_on.is_some()
            || retry_backoff != 0.0
            || retry_backoff_max.is_some()
            || !retry_jitter)
            .then(|| {
                Box::new(Policy {
                    timeout,
                    retries,
                    backoff: retry_backoff,
                    backoff_max: retry_backoff_max.unwrap_or(f64::INFINITY),
                    jitter: if retry_jitter {
                        Jitter::Full
                    } else {
                        Jitter::None
                    },
                    retry_on: retry_on.map(Bound::unbind),
                    retry_timeouts,
                    budget: retry_budget,
                    on_exhausted: on_exhausted.map(Bound::unbind),
                    limit,
                })
            });
        let py = func.py();
        let operation_type = operation_type.unbind();
        let tags = tags.map(Bound::unbind);
        let labels = crate::token::OpLabels::new(py, &operation_type, tags.as_ref());
        Ok(GuardedFunction {
            op: Arc::new(OpSpec {
                func: func.unbind(),
                operation_type,
                weight,
                priority,
                storage_speed,
                tags,
                policy,
                complexity: complexity.map(|c| c as f32),
                guard: guard
                    .as_ref()
                    .map(|g| crate::guard::GuardDecl::from_dict(g).map(Box::new))
                    .transpose()?,
                spike_check,
                copy_context,
                labels,
            }),
        })
    }

    /// A guarded function like this one whose calls use other options: priority, weight,
    /// timeout, retries, tags, ... (the keywords of `task_token_guard`, validated the same
    /// way). `fn.options(priority="high", timeout=2)(x)` never mixes them with the
    /// function's own keyword arguments.
    #[pyo3(signature = (**options))]
    fn options<'py>(
        slf: &Bound<'py, Self>,
        options: Option<Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        slf.py()
            .import("tokengate.policy.options")?
            .call_method1("with_options", (slf, options))
    }

    /// Everything this guarded function was made with, as `task_token_guard` keywords (for
    /// `options()`).
    fn _settings<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let op = &self.op;
        let d = PyDict::new(py);
        d.set_item("func", op.func.bind(py))?;
        d.set_item("operation_type", op.operation_type.bind(py))?;
        d.set_item("weight", op.weight as u8)?;
        d.set_item("priority", op.priority as u8)?;
        d.set_item("storage_speed", op.storage_speed)?;
        d.set_item("tags", op.tags.as_ref().map(|t| t.bind(py)))?;
        d.set_item("complexity", op.complexity.map(|c| c as f64))?;
        d.set_item("spike_check", op.spike_check)?;
        d.set_item("copy_context", op.copy_context)?;
        if let Some(p) = &op.policy {
            d.set_item("timeout", p.timeout)?;
            d.set_item("retries", p.retries)?;
            d.set_item("retry_backoff", p.backoff)?;
            d.set_item(
                "retry_backoff_max",
                p.backoff_max.is_finite().then_some(p.backoff_max),
            )?;
            d.set_item("retry_jitter", p.jitter == Jitter::Full)?;
            d.set_item("retry_on", p.retry_on.as_ref().map(|t| t.bind(py)))?;
            d.set_item("retry_timeouts", p.retry_timeouts)?;
            d.set_item("retry_budget", p.budget)?;
            d.set_item("on_exhausted", p.on_exhausted.as_ref().map(|f| f.bind(py)))?;
            if let Some(l) = &p.limit {
                d.set_item("max_concurrency", l.conf.per_key)?;
                d.set_item("rate_limit", l.conf.rate.as_ref().map(|r| r.per_second))?;
                d.set_item("rate_burst", l.conf.rate.as_ref().map(|r| r.burst))?;
                d.set_item("limit_by", l.limit_by.as_deref())?;
            }
        }
        Ok(d)
    }

    #[pyo3(signature = (*args, **kwargs))]
    fn __call__<'py>(
        slf: &Bound<'py, Self>,
        py: Python<'py>,
        args: &Bound<'py, PyTuple>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, TaskToken>> {
        let shared = current_runtime().map_err(|e| e.into_pyerr(py))?;
        no_panic(py, || {
            submit_token(
                py,
                &shared,
                &slf.get().op,
                args.clone().unbind(),
                kwargs.map(|k| k.clone().unbind()),
                Some(slf.as_any()),
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
        if let Some(p) = &self.op.policy {
            if let Some(f) = &p.on_exhausted {
                visit.call(f)?;
            }
            if let Some(t) = &p.retry_on {
                visit.call(t)?;
            }
        }
        Ok(())
    }

    /// Nothing of its own to clear (the function and tags are shared with every token of
    /// it); PyO3 clears the instance `__dict__`, and the function, cells or class on a cycle
    /// through it clear themselves.
    fn __clear__(&self) {}

    /// Pickles by reference, like a function: `copy`, `pickle` and `multiprocessing` find it
    /// again as `module.qualname` (a nested function fails with the usual PicklingError).
    ///
    /// One made by `options()` pickles as its decorated function (by reference) and the
    /// options, so it can be unpickled (a quarantined call made through it can be replayed).
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        match slf.getattr("_tg_base") {
            Ok(base) if !base.is_none() => {
                let rebuild = py
                    .import("tokengate.policy.options")?
                    .getattr("with_options")?;
                let args = PyTuple::new(py, [base, slf.getattr("_tg_options")?])?;
                Ok(PyTuple::new(py, [rebuild, args.into_any()])?.into_any())
            }
            _ => slf.getattr("__qualname__"),
        }
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

    /// The storage tier ("SLOW", "MODERATE", "FAST", "INSANE"), or None.
    #[getter]
    fn storage_speed(&self) -> Option<&'static str> {
        self.op.tier_name()
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
