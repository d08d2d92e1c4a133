//! Session files after a failed fdatasync and a restart without a power cut,
//! on the simulated filesystem: the page cache still holds the lines whose
//! writeback failed, and opening the file must decide from the disk.

use std::path::Path;
use std::sync::Arc;

use store::pb::LogFrame;
use store::{SessionFile, logtmp_path};
use wal::fs::Fs;
use wal::sim::SimFs;

const LOG_DIR: &str = "/logs";

fn frame(seq: i64) -> LogFrame {
    LogFrame {
        version: 1,
        time: Some(prost_types::Timestamp {
            seconds: 1_700_000_000 + seq,
            nanos: 0,
        }),
        session_id: "s".into(),
        user_id: String::new(),
        role: "agent".into(),
        seq,
        content: format!("line {seq}"),
        metadata: None,
    }
}

#[test]
fn lines_whose_fdatasync_failed_are_not_trusted_after_a_restart_without_a_power_cut() {
    let sim = SimFs::new();
    let fs: Arc<dyn Fs> = Arc::new(sim.clone());
    let dir = Path::new(LOG_DIR);
    fs.create_dir_all(dir).unwrap();
    fs.sync_dir(Path::new("/")).unwrap();
    let (mut file, _) = SessionFile::open(fs.clone(), dir, "s", None).unwrap();
    for seq in 1..=3 {
        assert!(file.append_frame(seq as u64, &frame(seq)));
    }
    let synced = file.sync().unwrap();
    assert_eq!(synced.last_seq, 3);
    for seq in 4..=6 {
        assert!(file.append_frame(seq as u64, &frame(seq)));
    }
    file.write_pending().unwrap();
    let path = logtmp_path(dir, "s");
    sim.fail_writeback(&path);
    assert!(file.sync().is_err(), "the writeback error is reported");
    drop(file); // the process stops; the page cache keeps lines 4..=6
    assert!(
        String::from_utf8(sim.read_file(&path).unwrap())
            .unwrap()
            .contains("line 6")
    );

    // A dry run and the real open both see what the disk holds.
    let (last, repair) = SessionFile::probe(fs.as_ref(), dir, "s", Some(synced)).unwrap();
    assert_eq!(last, 3, "the dry run trusted lines whose fdatasync failed");
    assert!(repair.bytes_trimmed > 0);
    let (file, repair) = SessionFile::open(fs.clone(), dir, "s", Some(synced)).unwrap();
    assert_eq!(
        (file.last_seq(), file.offset()),
        (3, synced.offset),
        "lines whose fdatasync failed were trusted, so replay would skip their seqs"
    );
    assert!(repair.bytes_trimmed > 0);
    drop(file);
    // What is left is exactly the synced lines, and they survive a power cut.
    sim.crash_dropping_all();
    let text = String::from_utf8(sim.read_file(&path).unwrap()).unwrap();
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(text.ends_with("\n") && text.contains("line 3"));
}
