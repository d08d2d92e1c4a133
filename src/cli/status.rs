//! `logd status`: a live server's counters and its sessions (the largest
//! open files first, or one session).

use std::process::ExitCode;

use anyhow::Context;

use serde_json::json;

use super::connect;
use crate::config::StatusArgs;
use crate::pb::SessionStatus;
use crate::telemetry::console::outln;

/// `logd status`: a live server's counters and sessions.
pub(super) async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let ch = connect(&args.client).await?;
    let mut client = crate::pb::admin_service_client::AdminServiceClient::new(ch.clone());
    let req = crate::pb::StatsRequest {
        sessions_top: args.top,
        session_id: args.session.clone().unwrap_or_default(),
    };
    let s = client.get_stats(req).await.context("GetStats")?.into_inner();
    // A session without a running writer: its last seq from GetSession.
    let mut idle = None;
    if let Some(id) = args.session.as_ref().filter(|_| s.sessions.is_empty()) {
        let mut log = crate::pb::log_service_client::LogServiceClient::new(ch);
        let req = crate::pb::SessionRequest { session_id: id.clone() };
        idle = Some(log.get_session(req).await.context("GetSession")?.into_inner().last_seq);
    }
    if let Some(id) = &args.session {
        return one_session(id, s.sessions.first(), idle, args.json);
    }
    if args.json {
        let sessions: Vec<_> = s.sessions.iter().map(session_json).collect();
        outln!(
            "{}",
            json!({
                "frames_accepted": s.frames_accepted, "frames_duplicate": s.frames_duplicate, "frames_rejected": s.frames_rejected,
                "active_sessions": s.active_sessions, "wal_segments": s.wal_segments, "wal_disk_bytes": s.wal_disk_bytes,
                "wal_commits": s.wal_commits, "wal_records": s.wal_records, "compress_backlog": s.compress_backlog,
                "outbox_events": s.outbox_events, "events_published": s.events_published, "open_fds": s.open_fds,
                "process_cpu_seconds": s.process_cpu_seconds,
                "rotations": {"size": s.rotations_size, "age": s.rotations_age, "idle": s.rotations_idle, "manual": s.rotations_manual},
                "sessions": sessions,
            })
        );
        return Ok(ExitCode::SUCCESS);
    }
    let per_commit = if s.wal_commits > 0 {
        s.wal_records as f64 / s.wal_commits as f64
    } else {
        0.0
    };
    outln!(
        "frames:       {} accepted, {} duplicate, {} rejected",
        s.frames_accepted,
        s.frames_duplicate,
        s.frames_rejected
    );
    outln!(
        "sessions:     {} active writers, {} evicted (idle)",
        s.active_sessions,
        s.evictions
    );
    outln!(
        "wal:          {} segment(s), {} bytes on disk; {} commits, {per_commit:.1} records/commit",
        s.wal_segments,
        s.wal_disk_bytes,
        s.wal_commits
    );
    outln!(
        "rotations:    size {} / age {} / idle {} / manual {}",
        s.rotations_size,
        s.rotations_age,
        s.rotations_idle,
        s.rotations_manual
    );
    outln!(
        "compression:  {} waiting, {} done ({} -> {} bytes)",
        s.compress_backlog,
        s.compressed_files,
        s.compress_bytes_in,
        s.compress_bytes_out
    );
    outln!(
        "events:       {} in the outbox, {} published, {} failed attempts",
        s.outbox_events,
        s.events_published,
        s.events_failed
    );
    outln!("open fds:     {}", s.open_fds);
    outln!(
        "cpu:          {:.2} s (user + system, since start)",
        s.process_cpu_seconds
    );
    if s.sessions.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    let shown = s.sessions.len();
    outln!(
        "\n{} of {} active session(s), largest open file first:",
        shown,
        s.active_sessions.max(shown as u64)
    );
    outln!(
        "{:<32} {:>10} {:>12} {:>9} {:>9}  open file",
        "session",
        "last seq",
        "bytes",
        "age",
        "idle"
    );
    for x in &s.sessions {
        outln!("{}", session_row(x));
    }
    Ok(ExitCode::SUCCESS)
}

/// `--session S`: that session's row, or that it has no running writer.
fn one_session(
    id: &str,
    s: Option<&SessionStatus>,
    idle_last_seq: Option<i64>,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    match (s, as_json) {
        (Some(x), true) => outln!("{}", session_json(x)),
        (Some(x), false) => outln!("{}", session_row(x)),
        (None, true) => outln!(
            "{}",
            json!({"session_id": id, "active": false, "last_seq": idle_last_seq.unwrap_or(0)})
        ),
        (None, false) => outln!(
            "{id}: no running writer (idle or unknown); last seq {}",
            idle_last_seq.unwrap_or(0)
        ),
    }
    Ok(ExitCode::SUCCESS)
}

fn session_json(x: &SessionStatus) -> serde_json::Value {
    json!({
        "session_id": x.session_id, "active": true, "last_seq": x.last_seq,
        "open_file": (!x.open_file.is_empty()).then_some(&x.open_file),
        "file_bytes": x.file_bytes, "file_age_ms": x.file_age_ms, "idle_ms": x.idle_ms,
    })
}

fn session_row(x: &SessionStatus) -> String {
    let file = match (x.open_file.is_empty(), x.file_bytes) {
        (false, _) => &x.open_file,
        (true, 0) => "(none: rotated, or no frame yet)",
        (true, _) => "(closed for a slot)",
    };
    format!(
        "{:<32} {:>10} {:>12} {:>9} {:>9}  {file}",
        x.session_id,
        x.last_seq,
        x.file_bytes,
        duration(x.file_age_ms),
        duration(x.idle_ms)
    )
}

/// `950ms`, `12.5s`, `3m20s`, `2h05m`.
fn duration(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{}m{:02}s", ms / 60_000, ms / 1000 % 60),
        _ => format!("{}h{:02}m", ms / 3_600_000, ms / 60_000 % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::duration;

    #[test]
    fn durations_read_in_the_largest_sensible_unit() {
        assert_eq!(duration(0), "0ms");
        assert_eq!(duration(950), "950ms");
        assert_eq!(duration(12_500), "12.5s");
        assert_eq!(duration(200_000), "3m20s");
        assert_eq!(duration(7_500_000), "2h05m");
    }
}
