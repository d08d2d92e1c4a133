//! A count of the process's file descriptors that needs no new descriptor
//! (for `logd_open_files` and `logd status`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// `/proc/self/fd`, opened once (at start, while descriptors are free) so
/// that counting never needs a new descriptor.
static PROC_FD_DIR: OnceLock<Option<std::fs::File>> = OnceLock::new();
/// The last count, answered when counting fails.
static LAST_FD_COUNT: AtomicU64 = AtomicU64::new(0);

/// Opens `/proc/self/fd` for [`open_fds`]; call it early.
pub fn init_fd_count() {
    PROC_FD_DIR.get_or_init(|| std::fs::File::open("/proc/self/fd").ok());
}

/// Descriptors the process has open, counted on the descriptor of
/// `/proc/self/fd` kept open since [`init_fd_count`] (rewound and read with
/// `getdents64`), so it works when descriptors have run out. Falls back to
/// the last count if reading fails.
pub fn open_fds() -> u64 {
    use std::os::fd::AsRawFd;
    init_fd_count();
    let Some(Some(dir)) = PROC_FD_DIR.get() else {
        return LAST_FD_COUNT.load(Ordering::Relaxed);
    };
    static READING: Mutex<()> = Mutex::new(());
    let _one_reader = READING.lock().expect("not poisoned");
    let fd = dir.as_raw_fd();
    let mut buf = vec![0u8; 64 << 10];
    let mut count = 0u64;
    // SAFETY: `fd` is a directory descriptor owned by `dir`, which lives for
    // the process; `buf` is valid for `buf.len()` bytes; the kernel fills
    // it with `linux_dirent64` records whose `d_reclen` (offset 16, u16)
    // and `d_name` (offset 19) we read within the returned length.
    unsafe {
        if libc::lseek(fd, 0, libc::SEEK_SET) != 0 {
            return LAST_FD_COUNT.load(Ordering::Relaxed);
        }
        loop {
            let n = libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len());
            if n < 0 {
                return LAST_FD_COUNT.load(Ordering::Relaxed);
            }
            if n == 0 {
                break;
            }
            let mut at = 0usize;
            while at < n as usize {
                let reclen = u16::from_ne_bytes([buf[at + 16], buf[at + 17]]) as usize;
                let name = &buf[at + 19..at + reclen];
                if name[0] != b'.' {
                    count += 1;
                }
                at += reclen;
            }
        }
    }
    LAST_FD_COUNT.store(count, Ordering::Relaxed);
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_fds_counts_a_file_opened_and_closed() {
        init_fd_count();
        let before = open_fds();
        assert!(before >= 3, "stdin, stdout, stderr at least: {before}");
        let files: Vec<std::fs::File> = (0..5).map(|_| tempfile::tempfile().unwrap()).collect();
        let during = open_fds();
        drop(files);
        let after = open_fds();
        // Other tests of this binary open files too: compare loosely.
        assert!(during >= before + 5 || during > after, "{before} {during} {after}");
    }
}
