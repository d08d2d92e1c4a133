//! The free-space watermark (`LOGD_DISK_FREE_MIN_PERCENT` /
//! `LOGD_DISK_FREE_MIN_BYTES`): frames are refused while a watched
//! filesystem is low.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::telemetry::prometheus::Metrics;

/// What the free-space watermark says about one filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskSpace {
    /// Free space is at or above the watermark.
    Enough {
        /// Bytes available to logd.
        free_bytes: u64,
    },
    /// Free space is below the watermark: new frames are refused.
    Low {
        /// Bytes available to logd.
        free_bytes: u64,
        /// The watermark in bytes.
        need_bytes: u64,
    },
    /// The filesystem reports no capacity (statvfs total = 0, as a tmpfs
    /// mounted with `size=0` and several FUSE filesystems do): there is no
    /// percentage to compare with and no way to tell "full" from "unknown",
    /// so the watermark does not apply to it.
    CapacityUnknown,
}

/// The watermark decision from a filesystem's statvfs numbers:
/// `total_bytes` (`f_blocks * f_frsize`), `free_bytes` (`f_bavail *
/// f_frsize`), and the limits `LOGD_DISK_FREE_MIN_PERCENT` /
/// `LOGD_DISK_FREE_MIN_BYTES` (whichever is larger).
pub fn disk_space(total_bytes: u64, free_bytes: u64, free_min_percent: f64, free_min_bytes: u64) -> DiskSpace {
    if total_bytes == 0 {
        return DiskSpace::CapacityUnknown;
    }
    let need_bytes = free_min_bytes.max((total_bytes as f64 * free_min_percent / 100.0) as u64);
    if free_bytes < need_bytes {
        DiskSpace::Low { free_bytes, need_bytes }
    } else {
        DiskSpace::Enough { free_bytes }
    }
}

/// `(total, available)` bytes of `dir`'s filesystem, from statvfs(2).
fn statvfs_bytes(dir: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `st` a valid out-parameter.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let frsize = st.f_frsize as u64;
    Ok((
        (st.f_blocks as u64).saturating_mul(frsize),
        (st.f_bavail as u64).saturating_mul(frsize),
    ))
}

/// Where free space is watched, and the watermark.
pub(crate) struct DiskWatch {
    dirs: Vec<(&'static str, PathBuf)>,
    percent: f64,
    bytes: u64,
    flag: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    /// Per directory of `dirs`: whether "no capacity" was already logged.
    warned_unknown: Vec<AtomicBool>,
}

impl DiskWatch {
    pub(crate) fn new(
        dirs: Vec<(&'static str, PathBuf)>,
        percent: f64,
        bytes: u64,
        flag: Arc<AtomicBool>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let warned_unknown = dirs.iter().map(|_| AtomicBool::new(false)).collect();
        DiskWatch {
            dirs,
            percent,
            bytes,
            flag,
            metrics,
            warned_unknown,
        }
    }

    /// Checks free space once; sets `flag` while below the watermark.
    pub(crate) fn check(&self) {
        let mut low = false;
        for ((name, dir), warned) in self.dirs.iter().zip(&self.warned_unknown) {
            let space = match statvfs_bytes(dir) {
                Ok((total, free)) => disk_space(total, free, self.percent, self.bytes),
                // Not measurable now (e.g. the directory is being recreated):
                // never a reason to refuse frames.
                Err(_) => DiskSpace::Enough { free_bytes: 0 },
            };
            let unknown = space == DiskSpace::CapacityUnknown;
            self.metrics
                .disk_capacity_unknown
                .with_label_values(&[name])
                .set(unknown as i64);
            match space {
                DiskSpace::Enough { free_bytes } => {
                    self.metrics
                        .disk_free_bytes
                        .with_label_values(&[name])
                        .set(free_bytes as i64);
                }
                DiskSpace::Low { free_bytes, .. } => {
                    self.metrics
                        .disk_free_bytes
                        .with_label_values(&[name])
                        .set(free_bytes as i64);
                    low = true;
                }
                DiskSpace::CapacityUnknown => {
                    if !warned.swap(true, Ordering::Relaxed) {
                        warn!(
                            dir = %dir.display(),
                            "the filesystem of the {name} directory reports no capacity (statvfs total = 0): \
                             the free-space watermark is disabled for it (logd_disk_capacity_unknown)"
                        );
                    }
                }
            }
        }
        if low != self.flag.swap(low, Ordering::Relaxed) {
            if low {
                warn!("free disk space below the watermark: refusing new frames (RESOURCE_EXHAUSTED) until it returns");
            } else {
                info!("free disk space is back above the watermark: accepting frames");
            }
        }
        self.metrics.disk_low.set(low as i64);
    }
}

/// Checks free space every second (the caller checked once before serving).
pub(crate) async fn watch_disk(watch: DiskWatch, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.cancelled() => return,
        }
        watch.check();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filesystem_reporting_no_capacity_has_unknown_space_not_low_space() {
        assert_eq!(disk_space(0, 0, 5.0, 256 << 20), DiskSpace::CapacityUnknown);
        // Even with free blocks reported (some FUSE filesystems do).
        assert_eq!(disk_space(0, 1 << 40, 5.0, 0), DiskSpace::CapacityUnknown);
    }

    #[test]
    fn the_watermark_is_the_larger_of_the_percentage_and_the_bytes() {
        let gib = 1u64 << 30;
        // 5% of 100 GiB = 5 GiB > 256 MiB.
        assert_eq!(
            disk_space(100 * gib, 4 * gib, 5.0, 256 << 20),
            DiskSpace::Low {
                free_bytes: 4 * gib,
                need_bytes: 5 * gib
            }
        );
        assert_eq!(
            disk_space(100 * gib, 5 * gib, 5.0, 256 << 20),
            DiskSpace::Enough { free_bytes: 5 * gib }
        );
        // 5% of 1 GiB = 51 MiB < 256 MiB: the bytes win.
        assert_eq!(
            disk_space(gib, 200 << 20, 5.0, 256 << 20),
            DiskSpace::Low {
                free_bytes: 200 << 20,
                need_bytes: 256 << 20
            }
        );
        // A full filesystem of known size is low.
        assert!(matches!(disk_space(gib, 0, 0.0, 1), DiskSpace::Low { .. }));
        assert_eq!(disk_space(gib, 0, 0.0, 0), DiskSpace::Enough { free_bytes: 0 });
    }
}
