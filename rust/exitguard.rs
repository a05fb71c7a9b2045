//! Calls into Python from worker threads that survive interpreter finalization.
//!
//! On CPython < 3.14 a thread that re-takes the GIL after finalization began is ended with
//! `pthread_exit`, a *forced unwind*. On its way out it would meet the `catch_unwind` frames of
//! the worker (and of `std::thread`), and Rust aborts the whole process when it catches a
//! foreign exception ("FATAL: exception not rethrown"). So every call into Python from a worker
//! registers a glibc cleanup handler in the calling frame; the forced unwind runs it before it
//! reaches any Rust frame, and the handler parks the thread for good (the process is exiting;
//! the thread holds no lock and no GIL). This is what PyO3 itself does for its own re-attach.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod imp {
    use std::mem::MaybeUninit;
    use std::os::raw::{c_int, c_void};

    use pyo3::ffi;

    /// glibc's `struct _pthread_cleanup_buffer`.
    #[repr(C)]
    struct CleanupBuffer {
        routine: Option<unsafe extern "C" fn(*mut c_void)>,
        arg: *mut c_void,
        canceltype: c_int,
        prev: *mut CleanupBuffer,
    }

    extern "C" {
        fn _pthread_cleanup_push(
            buffer: *mut CleanupBuffer,
            routine: unsafe extern "C" fn(*mut c_void),
            arg: *mut c_void,
        );
        fn _pthread_cleanup_pop(buffer: *mut CleanupBuffer, execute: c_int);
    }

    unsafe extern "C" fn park_forever(_: *mut c_void) {
        loop {
            std::thread::park();
        }
    }

    /// `PyObject_Call(func, args, kwargs)` with the exit guard registered in this very frame,
    /// so no Rust frame (and no landing pad) lies between the guard and CPython.
    ///
    /// # Safety
    /// The caller is attached; the pointers are valid (`kwargs` may be null).
    #[inline(never)]
    pub unsafe fn call(
        func: *mut ffi::PyObject,
        args: *mut ffi::PyObject,
        kwargs: *mut ffi::PyObject,
    ) -> *mut ffi::PyObject {
        let mut buf = MaybeUninit::<CleanupBuffer>::uninit();
        _pthread_cleanup_push(buf.as_mut_ptr(), park_forever, std::ptr::null_mut());
        let r = ffi::PyObject_Call(func, args, kwargs);
        _pthread_cleanup_pop(buf.as_mut_ptr(), 0);
        r
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    use pyo3::ffi;

    /// Plain `PyObject_Call` (the forced-unwind hazard above is glibc's).
    ///
    /// # Safety
    /// The caller is attached; the pointers are valid (`kwargs` may be null).
    pub unsafe fn call(
        func: *mut ffi::PyObject,
        args: *mut ffi::PyObject,
        kwargs: *mut ffi::PyObject,
    ) -> *mut ffi::PyObject {
        ffi::PyObject_Call(func, args, kwargs)
    }
}

/// `func(*args, **kwargs)` from a worker thread, safe against interpreter finalization.
pub fn call<'py>(
    func: &pyo3::Bound<'py, pyo3::PyAny>,
    args: &pyo3::Bound<'py, pyo3::types::PyTuple>,
    kwargs: Option<&pyo3::Bound<'py, pyo3::types::PyDict>>,
) -> pyo3::PyResult<pyo3::Bound<'py, pyo3::PyAny>> {
    use pyo3::prelude::*;
    let py = func.py();
    let kw = kwargs.map_or(std::ptr::null_mut(), |k| k.as_ptr());
    // SAFETY: attached (we hold `py`), the pointers come from live bound objects.
    unsafe {
        let r = imp::call(func.as_ptr(), args.as_ptr(), kw);
        Bound::from_owned_ptr_or_err(py, r)
    }
}
