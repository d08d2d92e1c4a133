//! `logd recover`: the recovery pass offline, with its report.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use recovery::Replayer;
use serde_json::json;
use wal::fs::RealFs;

use crate::config::RecoverArgs;
use crate::server::lock::{StateLock, create_dir_durably};
use crate::telemetry::console::outln;

fn progress_bar(enabled: bool) -> Option<indicatif::ProgressBar> {
    if !enabled || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(0);
    let style = indicatif::ProgressStyle::with_template("replaying WAL {bar:40} {bytes}/{total_bytes} {msg} ({eta})")
        .expect("valid template");
    bar.set_style(style);
    Some(bar)
}

pub(super) fn recover(args: RecoverArgs) -> anyhow::Result<ExitCode> {
    let store = &args.store;
    let _lock = StateLock::acquire(&store.state_dir())?;
    if !args.dry_run {
        create_dir_durably(&store.log_dir).with_context(|| format!("creating LOG_DIR {}", store.log_dir.display()))?;
    }
    let bar = progress_bar(!args.json);
    let progress = |p: recovery::Progress| {
        if let Some(b) = &bar {
            b.set_length(p.bytes_total.max(p.bytes_read));
            b.set_position(p.bytes_read);
            b.set_message(format!("{} records", p.records));
        }
    };
    let opts = recovery::PassOptions {
        fs: Arc::new(RealFs),
        log_dir: store.log_dir.clone(),
        wal_dir: store.wal_dir(),
        meta_dir: store.meta_dir(),
        wal: store.wal_options().map_err(anyhow::Error::msg)?,
        lifecycle: args.lifecycle.lifecycle(),
        files_open_max: crate::pipeline::openfiles::default_open_files_max(),
        dry_run: args.dry_run,
        salvage: args.salvage,
        rebuild_meta: args.rebuild_meta,
        // What `serve`'s compression pool would do next: finish the pending
        // compressions, so that `serve` finds nothing left.
        finish_compressions: true,
    };
    let pass = recovery::run_pass(opts, progress).map_err(|e| with_salvage_hint(e, args.salvage && !args.dry_run))?;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let outbox_events = pass.meta.outbox_len()? as u64
        + if args.dry_run {
            pass.replayer.lifecycle.events_recorded
        } else {
            0
        };
    print_recovery(
        &args,
        &pass.report,
        &pass.replayer,
        pass.meta_moved_aside_to.as_deref(),
        outbox_events,
        pass.materialized_below,
    );
    Ok(ExitCode::SUCCESS)
}

/// A damaged WAL's error, with the next steps for the operator.
fn with_salvage_hint(e: recovery::PassError, salvaging: bool) -> anyhow::Error {
    let integrity = e.is_integrity();
    let e = anyhow::Error::new(e);
    if integrity && !salvaging {
        e.context(
            "the WAL is damaged: `logd recover --salvage --dry-run` shows what salvage would keep and lose \
             (it changes nothing), then `logd recover --salvage` keeps every readable record, moves the damaged \
             WAL aside and reports what was lost",
        )
    } else {
        e
    }
}

/// How much of a damaged range salvage skipped is really lost: records
/// below `materialized_below` are in their session files already.
fn split_lost(l: &wal::LostRange, materialized_below: u64) -> (u64, u64) {
    let in_files = materialized_below.clamp(l.lsn_from, l.lsn_to) - l.lsn_from;
    (l.lsn_to - l.lsn_from - in_files, in_files)
}

/// Whether a damaged range may hold a record in no session file.
fn range_loses(l: &wal::LostRange, materialized_below: u64) -> bool {
    let (lost, _) = split_lost(l, materialized_below);
    // A range with nothing valid after it holds an unknown number of records.
    lost > 0 || (l.lsn_to == l.lsn_from && l.lsn_from >= materialized_below)
}

fn lost_json(l: &wal::LostRange, materialized_below: u64) -> serde_json::Value {
    let (lost, in_files) = split_lost(l, materialized_below);
    json!({
        "segment": l.segment, "offset": l.offset, "bytes": l.bytes,
        "lsn_from": l.lsn_from, "lsn_to": l.lsn_to, "records_lost": lost,
        "records_in_session_files": in_files, "why": l.why.to_string(),
    })
}

fn print_recovery(
    args: &RecoverArgs,
    report: &recovery::Report,
    replayer: &Replayer,
    meta_aside: Option<&Path>,
    outbox_events: u64,
    materialized_below: u64,
) {
    let records_lost: u64 = report.lost.iter().map(|l| split_lost(l, materialized_below).0).sum();
    let records_in_files: u64 = report.lost.iter().map(|l| split_lost(l, materialized_below).1).sum();
    let torn = report
        .open
        .torn_tail
        .as_ref()
        .map(|t| json!({"segment": t.segment, "offset": t.offset, "bytes": t.bytes, "why": t.why}));
    if args.json {
        let out = json!({
            "dry_run": args.dry_run,
            "segments_scanned": report.segments_scanned,
            "records_read": report.records_read,
            "records_replayed": report.records_replayed,
            "records_skipped": report.records_skipped,
            "bytes_read": report.bytes_read,
            "torn_tail": torn,
            "tmp_files_removed": report.open.removed_tmp_files,
            "segments_removed": report.segments_removed,
            "checkpoints_refreshed": replayer.checkpoints_refreshed,
            "sessions": replayer.per_session,
            "lifecycle": replayer.lifecycle,
            "compressions_left": replayer.compressions_left(),
            "outbox_events": outbox_events,
            "meta_moved_aside_to": meta_aside,
            "salvage": report.moved_aside_to.as_ref().map(|to| json!({
                "wal_moved_aside_to": to,
                "lost": report.lost.iter().map(|l| lost_json(l, materialized_below)).collect::<Vec<_>>(),
                "records_lost": records_lost,
                "records_in_session_files": records_in_files,
                "bytes_damaged": report.lost.iter().map(|l| l.bytes).sum::<u64>(),
                "bytes_lost": report.lost.iter().filter(|l| range_loses(l, materialized_below)).map(|l| l.bytes).sum::<u64>(),
                "materialized_below_lsn": materialized_below,
            })),
            "elapsed_ms": report.elapsed.as_millis() as u64,
        });
        outln!("{out}");
        return;
    }
    let verb = if args.dry_run { "would replay" } else { "replayed" };
    outln!(
        "{}: {} segment(s) scanned, {} record(s) read, {} {verb}, {} already materialized, {} segment(s) {}, in {:.3}s",
        if args.dry_run {
            "dry run (nothing changed)"
        } else {
            "recovered"
        },
        report.segments_scanned,
        report.records_read,
        report.records_replayed,
        report.records_skipped,
        report.segments_removed,
        if args.dry_run { "removable" } else { "removed" },
        report.elapsed.as_secs_f64()
    );
    if let Some(t) = &report.open.torn_tail {
        let verb = if args.dry_run {
            "would be truncated"
        } else {
            "truncated"
        };
        outln!(
            "torn WAL tail {verb}: {} at offset {}, {} byte(s) ({})",
            t.segment.display(),
            t.offset,
            t.bytes,
            t.why
        );
    }
    let l = &replayer.lifecycle;
    let finish = if args.dry_run { "would finish" } else { "finished" };
    for f in &l.rotations_finished {
        outln!("{finish} an interrupted rotation: {f}");
    }
    for f in &l.compressions_finished {
        outln!("{finish} an interrupted compression: {f}.gz");
    }
    let left = replayer.compressions_left();
    if !left.is_empty() {
        outln!(
            "{} compression(s) {} unfinished: {}",
            left.len(),
            if args.dry_run { "would stay" } else { "stay" },
            left.join(", ")
        );
    }
    for f in &l.foreign_files_moved {
        outln!("moved a foreign file at a session file's name aside (not logd's; never written through): {f}");
    }
    for f in &l.empty_files_removed {
        let verb = if args.dry_run { "would remove" } else { "removed" };
        outln!("{verb} an empty session file without frames: {f}");
    }
    if l.meta_rebuilt {
        if args.dry_run {
            outln!("the metadata store holds no checkpoints: it would be rebuilt from the files");
        } else {
            outln!(
                "metadata store rebuilt from the files: {} event(s) re-announced, {} compression(s) queued",
                l.events_reemitted,
                l.compressions_queued
            );
        }
    }
    if l.events_recorded > 0 || outbox_events > 0 {
        if args.dry_run {
            outln!(
                "events: {} would be recorded; {outbox_events} would wait in the outbox for the Redis mirror \
                 (`logd serve` sends them)",
                l.events_recorded
            );
        } else {
            outln!(
                "events: {} recorded; {outbox_events} wait in the outbox for the Redis mirror (`logd serve` sends them)",
                l.events_recorded
            );
        }
    }
    if let Some(to) = meta_aside {
        outln!("metadata store moved aside to {} and rebuilt", to.display());
    }
    if let Some(to) = &report.moved_aside_to {
        if args.dry_run {
            outln!(
                "salvage: the damaged WAL would be moved aside to {} (not deleted)",
                to.display()
            );
        } else {
            outln!("salvage: damaged WAL moved aside to {} (not deleted)", to.display());
        }
        for l in &report.lost {
            let (lost, in_files) = split_lost(l, materialized_below);
            if range_loses(l, materialized_below) {
                outln!(
                    "  LOST: {} bytes at offset {} of {} (LSNs {}..{}): {lost} record(s) in no session file{}: {}",
                    l.bytes,
                    l.offset,
                    l.segment.display(),
                    l.lsn_from,
                    l.lsn_to,
                    if in_files > 0 {
                        format!(" ({in_files} more already in session files)")
                    } else {
                        String::new()
                    },
                    l.why
                );
            } else {
                outln!(
                    "  damaged, not lost: {} bytes at offset {} of {} (LSNs {}..{}): its {in_files} record(s) \
                     were already in session files: {}",
                    l.bytes,
                    l.offset,
                    l.segment.display(),
                    l.lsn_from,
                    l.lsn_to,
                    l.why
                );
            }
        }
        outln!(
            "salvage: {records_lost} record(s) {}; {records_in_files} damaged record(s) were already in session files \
             (not lost)",
            if args.dry_run { "would be lost" } else { "lost" }
        );
    }
    for (session, s) in &replayer.per_session {
        if s.replayed > 0 || s.bytes_trimmed > 0 {
            outln!(
                "  session {session}: {} {verb}, {} skipped, {} byte(s) trimmed",
                s.replayed,
                s.skipped,
                s.bytes_trimmed
            );
        }
    }
}
