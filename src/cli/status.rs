//! `logd status`.

use std::process::ExitCode;

use anyhow::Context;

use serde_json::json;

use super::{bearer, channel};
use crate::config::StatusArgs;

/// `logd status`: a live server's counters.
pub(super) async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let ch = channel(&args.target, None).await?;
    let mut client = crate::pb::admin_service_client::AdminServiceClient::with_interceptor(ch, bearer(&args.token)?);
    let s = client
        .get_stats(crate::pb::StatsRequest::default())
        .await
        .context("GetStats")?
        .into_inner();
    if args.json {
        println!(
            "{}",
            json!({
                "frames_accepted": s.frames_accepted, "frames_duplicate": s.frames_duplicate, "frames_rejected": s.frames_rejected,
                "active_sessions": s.active_sessions, "wal_segments": s.wal_segments, "wal_disk_bytes": s.wal_disk_bytes,
                "wal_commits": s.wal_commits, "wal_records": s.wal_records, "compress_backlog": s.compress_backlog,
                "outbox_events": s.outbox_events, "events_published": s.events_published, "open_fds": s.open_fds,
                "process_cpu_seconds": s.process_cpu_seconds,
                "rotations": {"size": s.rotations_size, "age": s.rotations_age, "idle": s.rotations_idle, "manual": s.rotations_manual},
            })
        );
        return Ok(ExitCode::SUCCESS);
    }
    let per_commit = if s.wal_commits > 0 {
        s.wal_records as f64 / s.wal_commits as f64
    } else {
        0.0
    };
    println!(
        "frames:       {} accepted, {} duplicate, {} rejected",
        s.frames_accepted, s.frames_duplicate, s.frames_rejected
    );
    println!(
        "sessions:     {} active writers, {} evicted (idle)",
        s.active_sessions, s.evictions
    );
    println!(
        "wal:          {} segment(s), {} bytes on disk; {} commits, {per_commit:.1} records/commit",
        s.wal_segments, s.wal_disk_bytes, s.wal_commits
    );
    println!(
        "rotations:    size {} / age {} / idle {} / manual {}",
        s.rotations_size, s.rotations_age, s.rotations_idle, s.rotations_manual
    );
    println!(
        "compression:  {} waiting, {} done ({} -> {} bytes)",
        s.compress_backlog, s.compressed_files, s.compress_bytes_in, s.compress_bytes_out
    );
    println!(
        "events:       {} in the outbox, {} published, {} failed attempts",
        s.outbox_events, s.events_published, s.events_failed
    );
    println!("open fds:     {}", s.open_fds);
    println!(
        "cpu:          {:.2} s (user + system, since start)",
        s.process_cpu_seconds
    );
    Ok(ExitCode::SUCCESS)
}
