//! Every start writes into a fresh WAL segment (never into one an earlier
//! process wrote), and `logd recover --dry-run` predicts the segments the
//! real pass removes.

use std::path::Path;
use std::process::Command;

use logd::pb::LogFrame;

use crate::util::*;

fn wal_segments(log_dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(log_dir.join(".logd/wal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .map(|p| {
            (
                p.file_name().unwrap().to_str().unwrap().to_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

fn recover_json(log_dir: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(logd_bin())
        .arg("recover")
        .args(args)
        .arg("--json")
        .env("LOG_DIR", log_dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_logd_writes_into_a_fresh_segment_and_the_dry_run_predicts_the_removals() {
    let td = TestDir::new();
    let env = [("LOG_FLUSH_INTERVAL_MS", "60000")];
    let mut server = Server::start(&td.log_dir(), &env);
    let mut client = server.client().await;
    let frames: Vec<LogFrame> = (0..50).map(|i| frame("fresh", 0, &format!("first {i}"))).collect();
    assert_eq!(send_stream(&mut client, frames).await.frames_accepted, 50);
    server.kill9();
    let before = wal_segments(&td.log_dir());
    assert_eq!(before.len(), 1, "{:?}", before.iter().map(|s| &s.0).collect::<Vec<_>>());

    let dry = recover_json(&td.log_dir(), &["--dry-run"]);
    assert_eq!(wal_segments(&td.log_dir()), before, "the dry run changed the WAL");
    let real = recover_json(&td.log_dir(), &[]);
    assert_eq!(real["segments_removed"], 1, "{real}");
    assert_eq!(dry["segments_removed"], real["segments_removed"], "dry run: {dry}");
    let after = wal_segments(&td.log_dir());
    assert_eq!(after.len(), 1);
    assert_ne!(
        after[0].0, before[0].0,
        "recover wrote into the killed process's segment"
    );
    assert_eq!(after[0].0, "0000000000000033.wal", "the fresh segment starts at LSN 51");
    assert_eq!(after[0].1.len(), 32, "only its header");

    // A second offline pass with nothing new replaces its own empty segment.
    let dry = recover_json(&td.log_dir(), &["--dry-run"]);
    let real = recover_json(&td.log_dir(), &[]);
    assert_eq!(
        (&dry["segments_removed"], &real["segments_removed"]),
        (&0.into(), &0.into())
    );
    assert_eq!(wal_segments(&td.log_dir()), after);

    // The server appends to a segment of its own.
    server.restart();
    let mut client = server.client().await;
    let frames: Vec<LogFrame> = (0..5).map(|i| frame("fresh", 0, &format!("second {i}"))).collect();
    assert_eq!(send_stream(&mut client, frames).await.frames_accepted, 5);
    server.kill9();
    let last = wal_segments(&td.log_dir());
    assert_eq!(last.last().unwrap().0, "0000000000000033.wal", "{last:?}");
    assert!(
        last.last().unwrap().1.len() > 32,
        "the new frames went elsewhere: {last:?}"
    );
}
