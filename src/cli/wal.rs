//! `logd wal`: inspecting the WAL.

use std::process::ExitCode;

use serde_json::json;
use wal::fs::RealFs;
use wal::{Damage, SegmentScan};

use crate::config::{WalArgs, WalCommand};
use crate::telemetry::console::outln;

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

pub(super) fn wal_command(command: WalCommand) -> anyhow::Result<ExitCode> {
    let (args, verify): (&WalArgs, bool) = match &command {
        WalCommand::Inspect(a) => (a, false),
        WalCommand::Verify(a) => (a, true),
    };
    let opts = args.store.wal_options().map_err(anyhow::Error::msg)?;
    let dir = args.store.wal_dir();
    let scans = wal::verify(&RealFs, &dir, opts.record_bytes_max)?;
    let corrupt = scans.iter().any(|s| matches!(s.damage, Some(Damage::Corrupt { .. })));
    if args.json {
        outln!(
            "{}",
            json!({"wal_dir": dir, "segments": scans.iter().map(scan_json).collect::<Vec<_>>(), "ok": !corrupt})
        );
    } else {
        outln!(
            "{:<24} {:>12} {:>12} {:>10} {:>12}  status",
            "segment",
            "first_lsn",
            "last_lsn",
            "records",
            "bytes"
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
            outln!(
                "{name:<24} {:>12} {last:>12} {:>10} {:>12}  {status}",
                s.first_lsn,
                s.records,
                s.file_len
            );
        }
    }
    Ok(if verify && corrupt {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}
