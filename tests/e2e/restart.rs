//! Restarts: clean stop and start, the state-directory lock, WAL cleanup.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use logd::pb::LogFrame;

use crate::util::*;

fn wal_segments(log_dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(log_dir.join(".logd/wal"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".wal"))
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_restart_continues_seqs_and_loses_or_duplicates_nothing() {
    let td = TestDir::new();
    let mut server = Server::start(&td.log_dir(), &[]);
    for round in 0..3 {
        let mut client = server.client().await;
        let frames: Vec<LogFrame> = (0..500)
            .map(|i| frame(&format!("r-{}", i % 5), 0, &format!("round {round} frame {i}")))
            .collect();
        let acks = send_bidi(&mut client, frames).await;
        assert_eq!(acks.last().unwrap().frames_accepted, 500);
        let ranges: Vec<(i64, i64)> = {
            let mut r: Vec<_> = acks
                .iter()
                .flat_map(|a| a.sessions.clone())
                .filter(|r| r.session_id == "r-0")
                .map(|r| (r.first_seq, r.last_seq))
                .collect();
            r.sort();
            r
        };
        assert_eq!(
            ranges.first().unwrap().0,
            round * 100 + 1,
            "round {round} continues where the last stopped"
        );
        assert_eq!(ranges.last().unwrap().1, (round + 1) * 100);
        server.stop();
        server.restart();
    }
    server.stop();
    let sessions = read_sessions(&td.log_dir());
    assert_eq!(sessions.len(), 5);
    for (s, lines) in &sessions {
        let seqs: Vec<i64> = lines.iter().map(|l| l.seq).collect();
        assert_eq!(seqs, (1..=300).collect::<Vec<_>>(), "{s}");
        let mut contents: Vec<&str> = lines.iter().map(|l| l.content.as_str()).collect();
        contents.dedup();
        assert_eq!(contents.len(), 300, "{s}: no line twice");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_logd_on_the_same_state_directory_exits_with_a_clear_error() {
    let td = TestDir::new();
    let mut server = Server::start(&td.log_dir(), &[]);
    let out = Command::new(logd_bin())
        .arg("serve")
        .env("LOG_DIR", td.log_dir())
        .env("LOGD_LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is locked by another logd"), "stderr: {err}");
    let recover = Command::new(logd_bin())
        .arg("recover")
        .env("LOG_DIR", td.log_dir())
        .output()
        .unwrap();
    assert_eq!(recover.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&recover.stderr).contains("is locked by another logd"));
    server.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_segments_are_deleted_once_every_session_has_checkpointed_past_them() {
    let td = TestDir::new();
    let mut server = Server::start(
        &td.log_dir(),
        &[
            ("LOGD_WAL_SEGMENT_BYTES", "65536"),
            ("LOG_MAX_FRAME_BYTES", "4096"),
            ("LOG_FLUSH_INTERVAL_MS", "20"),
        ],
    );
    let mut client = server.client().await;
    let mut max_segments = 0;
    for round in 0..20 {
        let frames: Vec<LogFrame> = (0..200)
            .map(|i| frame(&format!("w-{}", i % 7), 0, &format!("{round}-{i}-{}", "p".repeat(200))))
            .collect();
        let resp = send_stream(&mut client, frames).await;
        assert_eq!(resp.frames_accepted, 200);
        max_segments = max_segments.max(wal_segments(&td.log_dir()).len());
    }
    // ~4000 frames x ~300 B = 1.2 MB of WAL in 64 KiB segments: about 19 were written.
    let deadline = Instant::now() + Duration::from_secs(10);
    while wal_segments(&td.log_dir()).len() > 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = wal_segments(&td.log_dir());
    assert!(left.len() <= 2, "materialized segments must go: {left:?}");
    assert!(
        max_segments < 19,
        "WAL disk use stays bounded under load (peak {max_segments} segments)"
    );
    server.stop();
    let sessions = read_sessions(&td.log_dir());
    assert_eq!(sessions.values().map(|l| l.len()).sum::<usize>(), 4000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_frames_survive_sigkill_and_appear_once_after_restart() {
    let td = TestDir::new();
    let mut server = Server::start(&td.log_dir(), &[("LOG_FLUSH_INTERVAL_MS", "5000")]);
    let mut client = server.client().await;
    // The long flush interval leaves materialization behind the WAL.
    let frames: Vec<LogFrame> = (0..2000).map(|i| frame("k-1", i + 1, &format!("frame {i}"))).collect();
    let resp = send_stream(&mut client, frames).await;
    assert_eq!(resp.frames_accepted, 2000);
    server.kill9();
    server.restart();
    let mut client = server.client().await;
    let again: Vec<LogFrame> = (1990..2100)
        .map(|i| frame("k-1", i + 1, &format!("frame {i}")))
        .collect();
    let resp = send_stream(&mut client, again).await;
    assert_eq!(
        (resp.frames_accepted, resp.frames_duplicate),
        (100, 10),
        "seqs survive the crash"
    );
    server.stop();
    let lines = &read_sessions(&td.log_dir())["k-1"];
    let seqs: Vec<i64> = lines.iter().map(|l| l.seq).collect();
    assert_eq!(seqs, (1..=2100).collect::<Vec<_>>());
}

fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n != "LOCK") {
                out.push((p.display().to_string(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

fn recover(log_dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(logd_bin())
        .arg("recover")
        .args(args)
        .env("LOG_DIR", log_dir)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_dry_run_changes_nothing_and_exit_codes_separate_repairs_from_integrity_problems() {
    let td = TestDir::new();
    let mut server = Server::start(&td.log_dir(), &[("LOG_FLUSH_INTERVAL_MS", "60000")]);
    let mut client = server.client().await;
    let frames: Vec<LogFrame> = (0..500)
        .map(|i| frame("dry", 0, &format!("frame {i} {}", "z".repeat(100))))
        .collect();
    assert_eq!(send_stream(&mut client, frames).await.frames_accepted, 500);
    server.kill9();
    let wal_dir = td.log_dir().join(".logd/wal");
    let seg = wal_dir.join(wal_segments(&td.log_dir()).pop().unwrap());

    // A torn tail: dry run reports it, changes nothing, exits 0.
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes.extend_from_slice(&[0xab; 100]);
    std::fs::write(&seg, &bytes).unwrap();
    let before = snapshot(&td.log_dir());
    let out = recover(&td.log_dir(), &["--dry-run", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["dry_run"], true);
    assert_eq!(report["records_read"], 500);
    assert_eq!(report["torn_tail"]["bytes"], 100, "{report}");
    assert_eq!(snapshot(&td.log_dir()), before, "--dry-run changed files");

    // Damage followed by valid records: integrity problem, exit 2 everywhere.
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[200] ^= 0x40; // inside the first record's payload
    std::fs::write(&seg, &bytes).unwrap();
    for args in [&["--dry-run"][..], &[][..]] {
        let out = recover(&td.log_dir(), args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "recover {args:?}: {err}");
        assert!(err.contains("corruption in") && err.contains(".wal at offset"), "{err}");
    }
    let verify = Command::new(logd_bin())
        .args(["wal", "verify"])
        .env("LOG_DIR", td.log_dir())
        .output()
        .unwrap();
    assert_eq!(verify.status.code(), Some(2));
    let out = recover(&td.log_dir(), &["--salvage", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["salvage"]["records_lost"], 1, "{report}");
    // Usage errors are exit 1.
    let bad = Command::new(logd_bin())
        .args(["recover", "--no-such-flag"])
        .output()
        .unwrap();
    assert_ne!(bad.status.code(), Some(0));
    assert_ne!(bad.status.code(), Some(2));
    server.restart();
    server.stop();
    let lines = &read_sessions(&td.log_dir())["dry"];
    assert!(
        lines.len() >= 499,
        "all but the damaged record are kept: {}",
        lines.len()
    );
    assert_increasing("dry", lines);
}
