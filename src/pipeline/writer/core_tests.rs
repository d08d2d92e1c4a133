//! Tests of the session writer's state machine, driven synchronously on a
//! real directory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::*;
use crate::pipeline::openfiles::OpenFiles;
use crate::pipeline::writer::RotationLimits;
use crate::telemetry::stats::DispatchStats;

fn writer(dir: &std::path::Path) -> SessionWriter {
    let settings = Settings {
        fs: Arc::new(wal::fs::RealFs),
        log_dir: dir.to_path_buf(),
        meta: Arc::new(store::SimMeta::new()),
        limits: RotationLimits {
            file_bytes_max: 1 << 30,
            file_age_max: Duration::from_secs(3600),
            idle_timeout: Duration::from_secs(3600),
        },
        life: store::Lifecycle {
            gzip_level: None,
            events: false,
        },
        outbox_events_max: 1000,
        stats: Arc::new(DispatchStats::default()),
    };
    SessionWriter::new(settings, "s", Instant::now(), false)
}

/// Runs the writer until it is idle, doing what each step asks; returns
/// the budget units it gave back.
fn drive(w: &mut SessionWriter, files: &Arc<OpenFiles>) -> u32 {
    let mut budget = 0;
    loop {
        let step = w.poll();
        for out in w.take_outputs() {
            if let Output::Budget(units) = out {
                budget += units;
            }
        }
        match step {
            Step::Idle => return budget,
            Step::NeedSlot => {
                let slot = files.try_acquire("s", &Arc::new(Notify::new())).expect("a free slot");
                w.slot_granted(slot);
            }
            Step::Blocking => w.run_blocking(),
            Step::PutCheckpoint(_) => w.checkpoint_put(Ok(())),
            Step::RetryAfter(d) => panic!("no transient error expected (retry after {d:?})"),
        }
    }
}

fn lines(seqs: std::ops::Range<i64>, bytes: usize) -> Vec<(u64, Line)> {
    seqs.map(|seq| {
        let tail = format!(",\"content\":\"{}\"}}\n", "x".repeat(bytes)).into_bytes();
        (seq as u64, Line { seq, tail: tail.into() })
    })
    .collect()
}

#[test]
fn a_batch_gives_its_budget_back_once_appended_even_while_its_lines_wait_for_the_write() {
    let dir = tempfile::tempdir().unwrap();
    let files = OpenFiles::new(4);
    let mut w = writer(dir.path());
    let path = store::logtmp_path(dir.path(), "s");
    let file_len = || std::fs::metadata(&path).map_or(0, |m| m.len());

    // Ten small lines stay pending until the flush tick, but their budget
    // comes back now: held until the tick, a small budget spread over many
    // sessions stalled every stream.
    let small = lines(1..11, 100);
    let small_bytes: usize = small.iter().map(|(_, l)| l.len()).sum();
    assert!(small_bytes < PENDING_WRITE_BYTES);
    w.push_frames(small, 10, Instant::now());
    assert_eq!(drive(&mut w, &files), 10, "the budget comes back at append");
    assert_eq!(file_len(), 0, "the lines are still pending");

    // A batch that takes the pending lines past the threshold is written
    // with them.
    let count = (PENDING_WRITE_BYTES / 1000 + 1) as i64;
    w.push_frames(lines(11..11 + count, 1000), 7, Instant::now());
    assert_eq!(drive(&mut w, &files), 7);
    let written = file_len();
    assert!(written as usize > PENDING_WRITE_BYTES, "{written} bytes written");

    // Lines left pending are written by the flush tick.
    w.push_frames(lines(11 + count..12 + count, 10), 3, Instant::now());
    assert_eq!(drive(&mut w, &files), 3);
    assert_eq!(file_len(), written);
    w.tick(Instant::now(), store::now_ms(), true);
    assert_eq!(drive(&mut w, &files), 0);
    assert!(file_len() > written);

    // The file holds every line once, in order.
    let text = std::fs::read_to_string(&path).unwrap();
    let seqs: Vec<i64> = text.lines().map(|l| store::line_seq(l.as_bytes()).unwrap()).collect();
    assert_eq!(seqs, (1..12 + count).collect::<Vec<_>>());
}
