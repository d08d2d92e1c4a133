//! Subcommands other than the service itself: `recover`, `wal inspect`,
//! `wal verify`, `bench`, `send`, `status`, `rotate`. Output for humans by
//! default, `--json` for scripts.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use logd::config::{Command, RecoverArgs, RotateArgs, SendArgs, StatusArgs, WalArgs, WalCommand};
use logd::server::StateLock;
use recovery::Replayer;
use serde_json::json;
use wal::fs::RealFs;
use wal::{Damage, SegmentScan};

/// Exit code for an error: 2 when the state needs an operator, else 1.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    let integrity = e.chain().any(|c| {
        c.downcast_ref::<recovery::PassError>()
            .is_some_and(|r| r.is_integrity())
            || c.downcast_ref::<recovery::Error>().is_some_and(|r| r.is_integrity())
            || c.downcast_ref::<wal::Error>().is_some_and(|w| {
                matches!(
                    w,
                    wal::Error::Corruption { .. } | wal::Error::Gap { .. } | wal::Error::BadHeader { .. }
                )
            })
    });
    if integrity { 2 } else { 1 }
}

/// An error as one line: each cause after the error, `: `-separated, except
/// a cause whose text the line already ends with (an error that prints its
/// own source, as hyper's and tonic's sometimes do, would show it twice).
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Runs one subcommand.
pub async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve(args) => logd::server::serve(*args).await.map(|_| ExitCode::SUCCESS),
        Command::Bench(args) => {
            let r = logd::bench::run(args).await?;
            Ok(if r.errors > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Recover(args) => tokio::task::spawn_blocking(move || recover(args)).await?,
        Command::Rotate(args) => rotate(args).await,
        Command::Send(args) => send(args).await,
        Command::Status(args) => status(args).await,
        Command::Wal { command } => tokio::task::spawn_blocking(move || wal_command(command)).await?,
    }
}

/// Adds `authorization: Bearer <token>` to every call when a token is set.
#[derive(Clone)]
struct BearerToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert("authorization", t.clone());
        }
        Ok(req)
    }
}

fn bearer(token: &Option<String>) -> anyhow::Result<BearerToken> {
    let v = token
        .as_ref()
        .map(|t| format!("Bearer {t}").parse())
        .transpose()
        .context("token is not valid ASCII")?;
    Ok(BearerToken(v))
}

/// A connection to `target` (see [`logd::target`]); an `https://` server is
/// verified against `tls_ca` when given, else the system's roots.
async fn channel(target: &str, tls_ca: Option<&Path>) -> anyhow::Result<tonic::transport::Channel> {
    let pem = match tls_ca {
        Some(ca) => Some(std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?),
        None => None,
    };
    let ep = logd::target::endpoint_with_ca(target, pem.as_deref())?;
    ep.connect().await.with_context(|| format!("connecting to {target}"))
}

/// `logd send`: the `logger(1)` of logd. Every line becomes a frame with a
/// client seq continuing the session's, sent over one bidi stream.
async fn send(args: SendArgs) -> anyhow::Result<ExitCode> {
    use logd::pb::LogFrame;
    use tokio::io::AsyncBufReadExt;
    let ch = channel(&args.target, args.tls_ca.as_deref()).await?;
    let mut client = logd::pb::log_service_client::LogServiceClient::with_interceptor(ch, bearer(&args.token)?);
    let input: Box<dyn tokio::io::AsyncRead + Unpin + Send> = match &args.file {
        Some(p) => Box::new(
            tokio::fs::File::open(p)
                .await
                .with_context(|| format!("opening {}", p.display()))?,
        ),
        None => Box::new(tokio::io::stdin()),
    };
    let mut lines = tokio::io::BufReader::new(input).lines();
    let (tx, rx) = tokio::sync::mpsc::channel::<LogFrame>(1024);
    let (session, role, user) = (args.session.clone(), args.role.clone(), args.user.clone());
    let reader = tokio::spawn(async move {
        let mut sent = 0i64;
        while let Some(line) = lines.next_line().await? {
            let frame = LogFrame {
                session_id: session.clone(),
                role: role.clone(),
                user_id: user.clone(),
                content: line,
                ..Default::default()
            };
            if tx.send(frame).await.is_err() {
                break;
            }
            sent += 1;
        }
        anyhow::Ok(sent)
    });
    let mut acks = client
        .write_log_bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .context("WriteLogBidi")?
        .into_inner();
    let (mut first, mut last, mut through, mut rejected) = (i64::MAX, 0i64, 0i64, Vec::new());
    let mut accepted = 0;
    let mut duplicate = 0;
    while let Some(ack) = acks.message().await.context("waiting for acks")? {
        through = ack.through_index;
        accepted = ack.frames_accepted;
        duplicate = ack.frames_duplicate;
        for r in &ack.sessions {
            first = first.min(r.first_seq);
            last = last.max(r.last_seq);
        }
        rejected.extend(ack.rejections);
    }
    let sent = reader.await??;
    for r in &rejected {
        eprintln!("line {}: rejected: {}", r.index + 1, r.reason);
    }
    if through != sent {
        anyhow::bail!("only {through} of {sent} line(s) were acknowledged");
    }
    if accepted > 0 {
        println!(
            "{accepted} line(s) acked as seq {first}..={last} of session {}",
            args.session
        );
    } else {
        println!("0 lines acked");
    }
    if duplicate > 0 {
        println!("{duplicate} duplicate(s)");
    }
    Ok(if rejected.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `logd status`: a live server's counters.
async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let ch = channel(&args.target, None).await?;
    let mut client = logd::pb::admin_service_client::AdminServiceClient::with_interceptor(ch, bearer(&args.token)?);
    let s = client
        .get_stats(logd::pb::StatsRequest {})
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
    Ok(ExitCode::SUCCESS)
}

async fn rotate(args: RotateArgs) -> anyhow::Result<ExitCode> {
    let mut client = logd::pb::admin_service_client::AdminServiceClient::new(channel(&args.target, None).await?);
    let req = logd::pb::RotateRequest {
        session_id: args.session.clone().unwrap_or_default(),
        all: args.all,
    };
    let files = client.rotate(req).await.context("Rotate")?.into_inner().files;
    if files.is_empty() {
        match &args.session {
            Some(s) => println!("nothing to rotate: session {s} is unknown or its live file is empty"),
            None => println!("nothing to rotate (no open file with frames)"),
        }
    }
    for f in files {
        println!("rotated: {f}");
    }
    Ok(ExitCode::SUCCESS)
}

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

fn recover(args: RecoverArgs) -> anyhow::Result<ExitCode> {
    let store = &args.store;
    let _lock = StateLock::acquire(&store.state_dir())?;
    if !args.dry_run {
        logd::server::create_dir_durably(&store.log_dir)
            .with_context(|| format!("creating LOG_DIR {}", store.log_dir.display()))?;
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
        files_open_max: logd::openfiles::default_open_files_max(),
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
        println!("{out}");
        return;
    }
    let verb = if args.dry_run { "would replay" } else { "replayed" };
    println!(
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
        println!(
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
        println!("{finish} an interrupted rotation: {f}");
    }
    for f in &l.compressions_finished {
        println!("{finish} an interrupted compression: {f}.gz");
    }
    let left = replayer.compressions_left();
    if !left.is_empty() {
        println!(
            "{} compression(s) {} unfinished: {}",
            left.len(),
            if args.dry_run { "would stay" } else { "stay" },
            left.join(", ")
        );
    }
    for f in &l.foreign_files_moved {
        println!("moved a foreign file at a session file's name aside (not logd's; never written through): {f}");
    }
    for f in &l.empty_files_removed {
        let verb = if args.dry_run { "would remove" } else { "removed" };
        println!("{verb} an empty session file without frames: {f}");
    }
    if l.meta_rebuilt {
        if args.dry_run {
            println!("the metadata store holds no checkpoints: it would be rebuilt from the files");
        } else {
            println!(
                "metadata store rebuilt from the files: {} event(s) re-announced, {} compression(s) queued",
                l.events_reemitted, l.compressions_queued
            );
        }
    }
    if l.events_recorded > 0 || outbox_events > 0 {
        if args.dry_run {
            println!(
                "events: {} would be recorded; {outbox_events} would wait in the outbox for the Redis mirror \
                 (`logd serve` sends them)",
                l.events_recorded
            );
        } else {
            println!(
                "events: {} recorded; {outbox_events} wait in the outbox for the Redis mirror (`logd serve` sends them)",
                l.events_recorded
            );
        }
    }
    if let Some(to) = meta_aside {
        println!("metadata store moved aside to {} and rebuilt", to.display());
    }
    if let Some(to) = &report.moved_aside_to {
        if args.dry_run {
            println!(
                "salvage: the damaged WAL would be moved aside to {} (not deleted)",
                to.display()
            );
        } else {
            println!("salvage: damaged WAL moved aside to {} (not deleted)", to.display());
        }
        for l in &report.lost {
            let (lost, in_files) = split_lost(l, materialized_below);
            if range_loses(l, materialized_below) {
                println!(
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
                println!(
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
        println!(
            "salvage: {records_lost} record(s) {}; {records_in_files} damaged record(s) were already in session files \
             (not lost)",
            if args.dry_run { "would be lost" } else { "lost" }
        );
    }
    for (session, s) in &replayer.per_session {
        if s.replayed > 0 || s.bytes_trimmed > 0 {
            println!(
                "  session {session}: {} {verb}, {} skipped, {} byte(s) trimmed",
                s.replayed, s.skipped, s.bytes_trimmed
            );
        }
    }
}

fn scan_json(s: &SegmentScan) -> serde_json::Value {
    let damage = match &s.damage {
        None => serde_json::Value::Null,
        Some(Damage::Torn { offset, bytes, why }) => {
            json!({"kind": "torn_tail", "offset": offset, "bytes": bytes, "why": why.to_string()})
        }
        Some(Damage::Corrupt {
            offset,
            why,
            resume_offset,
            records_after,
            bytes_after,
        }) => json!({
            "kind": "corrupt", "offset": offset, "why": why.to_string(), "resume_offset": resume_offset,
            "records_after": records_after, "bytes_after": bytes_after,
        }),
    };
    json!({
        "segment": s.path, "first_lsn": s.first_lsn, "last_lsn": (s.records > 0).then(|| s.next_lsn - 1),
        "records": s.records, "bytes": s.file_len, "damage": damage,
    })
}

fn wal_command(command: WalCommand) -> anyhow::Result<ExitCode> {
    let (args, verify): (&WalArgs, bool) = match &command {
        WalCommand::Inspect(a) => (a, false),
        WalCommand::Verify(a) => (a, true),
    };
    let opts = args.store.wal_options().map_err(anyhow::Error::msg)?;
    let dir = args.store.wal_dir();
    let scans = wal::verify(&RealFs, &dir, opts.record_bytes_max)?;
    let corrupt = scans.iter().any(|s| matches!(s.damage, Some(Damage::Corrupt { .. })));
    if args.json {
        println!(
            "{}",
            json!({"wal_dir": dir, "segments": scans.iter().map(scan_json).collect::<Vec<_>>(), "ok": !corrupt})
        );
    } else {
        println!(
            "{:<24} {:>12} {:>12} {:>10} {:>12}  status",
            "segment", "first_lsn", "last_lsn", "records", "bytes"
        );
        for s in &scans {
            let name = s
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let last = if s.records > 0 {
                (s.next_lsn - 1).to_string()
            } else {
                "-".into()
            };
            let status = match &s.damage {
                None => "ok".to_string(),
                Some(Damage::Torn { offset, bytes, why }) => format!("torn tail at {offset} ({bytes} bytes): {why}"),
                Some(Damage::Corrupt {
                    offset,
                    why,
                    records_after,
                    ..
                }) => {
                    format!("CORRUPT at {offset}: {why}; {records_after} valid record(s) after")
                }
            };
            println!(
                "{name:<24} {:>12} {last:>12} {:>10} {:>12}  {status}",
                s.first_lsn, s.records, s.file_len
            );
        }
    }
    Ok(if verify && corrupt {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Repeats(&'static str, Option<Box<Repeats>>);

    impl std::fmt::Display for Repeats {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Repeats {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn an_error_line_names_each_cause_once() {
        let leaf = Repeats("scheme is missing", None);
        let same = Repeats("scheme is missing", Some(Box::new(leaf)));
        let e = anyhow::Error::new(same).context("connecting to x");
        assert_eq!(
            format!("{e:#}"),
            "connecting to x: scheme is missing: scheme is missing"
        );
        assert_eq!(error_line(&e), "connecting to x: scheme is missing");

        let inner = Repeats("refused", None);
        let wraps = Repeats("connect failed: refused", Some(Box::new(inner)));
        let e = anyhow::Error::new(wraps).context("connecting to y");
        assert_eq!(error_line(&e), "connecting to y: connect failed: refused");

        let e = anyhow::anyhow!("plain");
        assert_eq!(error_line(&e), "plain");
    }
}
