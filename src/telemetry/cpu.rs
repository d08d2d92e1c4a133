//! The process's CPU time (for `GetStats`' `process_cpu_seconds`, which
//! `logd bench` turns into server CPU per frame).

/// User + system CPU time of the whole process (all threads, not its
/// children) since it started, in seconds; 0.0 if the call fails.
///
/// `getrusage(RUSAGE_SELF)` rather than `utime + stime` of `/proc/self/stat`:
/// the same accounting on Linux, but in microseconds instead of clock ticks
/// (10 ms at `CLK_TCK` = 100), and it needs no file descriptor, so it keeps
/// working when the process has run out of them (see [`super::fds`]).
pub fn process_cpu_seconds() -> f64 {
    // SAFETY: `getrusage` only writes the `rusage` it is given, which is
    // plain data that all-zero bytes initialize validly.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// CPU time of the calling thread, in seconds.
    fn thread_cpu_seconds() -> f64 {
        // SAFETY: `clock_gettime` only writes the `timespec` it is given.
        let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
        assert_eq!(
            unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) },
            0
        );
        ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
    }

    #[test]
    fn process_cpu_seconds_grows_with_work_on_another_thread() {
        let before = process_cpu_seconds();
        assert!(before > 0.0, "a running process has used some CPU: {before}");
        // Spin on another thread until it has used 100 ms of CPU by its own
        // clock (not for a wall time: on a loaded machine 200 ms of wall
        // time once gave it 4 ms of CPU). The figure is the whole process's.
        let spun = std::thread::spawn(|| {
            let t = Instant::now();
            let mut x = 0u64;
            while thread_cpu_seconds() < 0.1 {
                assert!(
                    t.elapsed() < Duration::from_secs(120),
                    "no CPU for the spinning thread in 120 s"
                );
                for _ in 0..1000 {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            }
            thread_cpu_seconds()
        });
        let spun_cpu = spun.join().unwrap();
        let after = process_cpu_seconds();
        // getrusage and the thread clock count the same time, at microsecond
        // resolution.
        assert!(
            after - before >= spun_cpu - 0.001,
            "a thread used {spun_cpu:.3} s of CPU, the process's figure grew by {:.3} s ({before} -> {after})",
            after - before
        );
    }
}
