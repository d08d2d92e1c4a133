//! The recovery step of `serve`: the pass (crate `recovery`), run before the
//! pipeline starts, and what it reports to the log and the metrics.

use std::sync::Arc;

use anyhow::Context;
use store::MetaStore;
use tracing::{error, info, warn};
use wal::Wal;

use super::State;
use crate::config::ServeArgs;
use crate::telemetry::prometheus::Metrics;

/// What the pipeline starts from.
pub(super) struct Recovered {
    /// The WAL, open for appends in a fresh segment.
    pub wal: Wal,
    /// The metadata store, consistent with the files and the WAL.
    pub meta: Arc<dyn MetaStore>,
    /// Foreign files the pass moved aside (a counter of the dispatcher's).
    pub foreign_files_moved: u64,
}

/// Runs the recovery pass on a blocking thread.
pub(super) async fn recover(args: &ServeArgs, state: &State, metrics: &Metrics) -> anyhow::Result<Recovered> {
    // Tests hold the service in recovery with `FAILPOINTS=recover::start=sleep(ms)`.
    fail::fail_point!("recover::start");
    let store = &args.store;
    let opts = recovery::PassOptions {
        fs: state.fs.clone(),
        log_dir: store.log_dir.clone(),
        wal_dir: store.wal_dir(),
        meta_dir: store.meta_dir(),
        wal: store.wal_options().map_err(anyhow::Error::msg)?,
        lifecycle: args.lifecycle.lifecycle(),
        files_open_max: state.open_files_max,
        dry_run: false,
        salvage: false,
        rebuild_meta: false,
        finish_compressions: false,
    };
    let pass = tokio::task::spawn_blocking(move || recovery::run_pass(opts, |_| {}))
        .await?
        .map_err(|e| {
            let integrity = e.is_integrity();
            let e = anyhow::Error::new(e);
            if integrity {
                e.context(
                    "refusing to start: the WAL is damaged in the middle. Next: `logd recover --dry-run` \
                     (changes nothing) to see the damage, then `logd recover --salvage` (add --dry-run first \
                     to see what it would keep and lose) to keep every readable record, move the damaged WAL \
                     aside and report what was lost",
                )
            } else {
                e
            }
        })?;
    report(&pass, metrics);
    Ok(Recovered {
        wal: pass.wal.context("a live pass returns the WAL")?,
        meta: pass.meta,
        foreign_files_moved: pass.replayer.lifecycle.foreign_files_moved.len() as u64,
    })
}

/// Logs what the pass did and sets the recovery metrics.
fn report(pass: &recovery::Pass, metrics: &Metrics) {
    if pass.meta_moved_aside_to.is_some() {
        metrics.meta_rebuilds.inc();
    }
    let l = &pass.replayer.lifecycle;
    if l.meta_rebuilt {
        metrics.meta_rebuilds.inc();
        warn!(
            events_reemitted = l.events_reemitted,
            compressions_queued = l.compressions_queued,
            "recovery: the metadata store held no checkpoints; rebuilt it from the session files and the WAL"
        );
    }
    if !l.foreign_files_moved.is_empty() {
        error!(moved_to = ?l.foreign_files_moved, "recovery: moved foreign files found at session file names aside (symbolic links, non-regular files, or files without a line of logd's); they were not written through");
    }
    if !l.empty_files_removed.is_empty() {
        info!(files = ?l.empty_files_removed, "recovery: removed empty session files without frames");
    }
    if !l.rotations_finished.is_empty() || !l.compressions_finished.is_empty() {
        info!(rotations = ?l.rotations_finished, compressions = ?l.compressions_finished, events = l.events_recorded, "recovery: finished interrupted file steps");
    }
    let left = pass.replayer.compressions_left();
    if !left.is_empty() {
        info!(files = ?left, "recovery: {} compression(s) left for the compression pool", left.len());
    }
    let report = &pass.report;
    if let Some(t) = &report.open.torn_tail {
        warn!(segment = %t.segment.display(), offset = t.offset, bytes = t.bytes, why = t.why, "recovery: truncated a torn WAL tail");
    }
    metrics
        .recovery_records
        .with_label_values(&["read"])
        .set(report.records_read as i64);
    metrics
        .recovery_records
        .with_label_values(&["replayed"])
        .set(report.records_replayed as i64);
    info!(
        records = report.records_read,
        replayed = report.records_replayed,
        skipped = report.records_skipped,
        segments_removed = report.segments_removed,
        ms = report.elapsed.as_millis() as u64,
        "recovery: done"
    );
}
