//! Monotonic nanoseconds on the clock Python's `time.monotonic()` reads.

/// Nanoseconds on the clock of `time.monotonic()` (Unix); never 0.
#[cfg(unix)]
#[inline]
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // time.monotonic() reads CLOCK_MONOTONIC on Linux and mach_absolute_time (which is
    // CLOCK_UPTIME_RAW) on macOS.
    #[cfg(target_os = "macos")]
    let clock = libc::CLOCK_UPTIME_RAW;
    #[cfg(not(target_os = "macos"))]
    let clock = libc::CLOCK_MONOTONIC;
    // SAFETY: clock_gettime writes into the valid timespec we pass.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Nanoseconds since the first call plus one (elsewhere the Python layer converts with an offset).
#[cfg(not(unix))]
#[inline]
pub fn now_ns() -> u64 {
    use std::sync::OnceLock;
    use std::time::Instant;
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1
}
