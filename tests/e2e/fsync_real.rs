//! The fsync-error class on a real Linux kernel, not a simulation: a
//! loop-mounted ext4 whose backing tmpfs the test fills, so writeback fails
//! for real (see `scripts/fsync_error_on_a_real_kernel.sh` for the steps).
//! It needs root, mount namespaces (`unshare -m`), a loop device and ext4;
//! where any is missing it says so and checks nothing.

use std::path::Path;
use std::process::Command;

use crate::util::*;

#[test]
fn acked_frames_survive_a_real_writeback_failure_a_restart_without_reboot_and_a_power_cut() {
    let root = Command::new("id").arg("-u").output().map(|o| o.stdout == b"0\n");
    if !matches!(root, Ok(true)) {
        eprintln!("skipped: needs root (mount, losetup)");
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/scripts/fsync_error_on_a_real_kernel.sh");
    let work = TestDir::new();
    let out = match Command::new("unshare")
        .args(["-m", "bash"])
        .arg(&script)
        .arg(logd_bin())
        .arg(work.log_dir())
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            eprintln!("skipped: cannot run unshare: {e}");
            return;
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) => assert!(stdout.contains("PASS"), "{stdout}"),
        Some(77) => eprintln!("skipped: {stdout}"),
        _ if stderr.contains("unshare failed") => eprintln!("skipped: {stderr}"),
        _ => panic!("{}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status),
    }
}
