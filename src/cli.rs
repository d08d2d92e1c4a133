//! Subcommands other than the service itself: `recover`, `wal inspect`,
//! `wal verify`, `bench`. Output for humans by default, `--json` for scripts.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use logd::config::{Command, RecoverArgs, WalArgs, WalCommand};
use logd::materialize::Replayer;
use logd::server::{StateLock, open_meta};
use serde_json::json;
use wal::fs::{Fs, RealFs};
use wal::{Damage, SegmentScan};

/// Exit code for an error: 2 when the state needs an operator, else 1.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    let integrity = e.chain().any(|c| {
        c.downcast_ref::<recovery::Error>().is_some_and(|r| r.is_integrity())
            || c.downcast_ref::<wal::Error>().is_some_and(|w| {
                matches!(
                    w,
                    wal::Error::Corruption { .. } | wal::Error::Gap { .. } | wal::Error::BadHeader { .. }
                )
            })
    });
    if integrity { 2 } else { 1 }
}

/// Runs one subcommand.
pub async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve(args) => logd::server::serve(args).await.map(|_| ExitCode::SUCCESS),
        Command::Bench(args) => {
            let r = logd::bench::run(args).await?;
            Ok(if r.errors > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Recover(args) => tokio::task::spawn_blocking(move || recover(args)).await?,
        Command::Wal { command } => tokio::task::spawn_blocking(move || wal_command(command)).await?,
    }
}

fn recover(args: RecoverArgs) -> anyhow::Result<ExitCode> {
    let store = &args.store;
    let _lock = StateLock::acquire(&store.state_dir())?;
    let fs: Arc<dyn Fs> = Arc::new(RealFs);
    std::fs::create_dir_all(&store.log_dir).with_context(|| format!("creating LOG_DIR {}", store.log_dir.display()))?;
    let meta = open_meta(&store.meta_dir())?;
    let opts = store.wal_options().map_err(anyhow::Error::msg)?;
    let mut replayer = Replayer::new(fs.clone(), &store.log_dir, meta);
    let (_wal, report) = recovery::run(fs, &store.wal_dir(), opts, &mut replayer, |_| {})?;
    let torn = report
        .open
        .torn_tail
        .as_ref()
        .map(|t| json!({"segment": t.segment, "offset": t.offset, "bytes": t.bytes, "why": t.why}));
    if args.json {
        let out = json!({
            "segments_scanned": report.segments_scanned,
            "records_read": report.records_read,
            "records_replayed": report.records_replayed,
            "records_skipped": report.records_skipped,
            "bytes_read": report.bytes_read,
            "torn_tail": torn,
            "tmp_files_removed": report.open.removed_tmp_files,
            "segments_removed": report.segments_removed,
            "sessions": replayer.per_session,
            "elapsed_ms": report.elapsed.as_millis() as u64,
        });
        println!("{out}");
    } else {
        println!(
            "recovered: {} segment(s) scanned, {} record(s) read, {} replayed, {} already materialized, {} segment(s) removed, in {:.3}s",
            report.segments_scanned,
            report.records_read,
            report.records_replayed,
            report.records_skipped,
            report.segments_removed,
            report.elapsed.as_secs_f64()
        );
        if let Some(t) = &report.open.torn_tail {
            println!(
                "torn WAL tail truncated: {} at offset {}, {} byte(s) dropped ({})",
                t.segment.display(),
                t.offset,
                t.bytes,
                t.why
            );
        }
        for (session, s) in &replayer.per_session {
            if s.replayed > 0 || s.bytes_trimmed > 0 {
                println!(
                    "  session {session}: {} replayed, {} skipped, {} byte(s) trimmed",
                    s.replayed, s.skipped, s.bytes_trimmed
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
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
