//! The group-commit steps ([`write_step`], [`sync_step`]) driven by hand on
//! the simulated filesystem, one thread, as the power-loss simulation drives
//! them: several written-but-unsynced batches at once, a roll's fdatasync
//! running before a pending batch's, kills and power cuts at any point.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use wal::sim::SimFs;
use wal::{
    CommitInfo, Error, RecordType, Stage, Wal, WalOptions, Written, read_from, sync_step, sync_steps, write_step,
};

mod common;
use common::{RECORD_HEADER, WAL_DIR, opts, payload};

/// Appends each request's payload; settling records (LSN, acked) per
/// request, in the order settled.
#[derive(Default)]
struct Recorder {
    settled: Vec<(Result<u64, String>, bool)>,
}

impl Stage for Recorder {
    type Request = Vec<u8>;
    type Staged = Result<u64, String>;

    fn stage(&mut self, req: Vec<u8>, wal: &mut Wal) -> Self::Staged {
        wal.append(RecordType::Frame, &req).map_err(|e| e.to_string())
    }

    fn settle(&mut self, batch: Vec<Self::Staged>, result: Result<&CommitInfo, &Error>) {
        for staged in batch {
            let acked = staged.is_ok() && result.is_ok();
            self.settled.push((staged, acked));
        }
    }
}

impl Recorder {
    /// The LSNs acknowledged so far, in settlement order.
    fn acked(&self) -> Vec<u64> {
        self.settled
            .iter()
            .filter(|(_, acked)| *acked)
            .map(|(lsn, _)| *lsn.as_ref().unwrap())
            .collect()
    }
}

fn open(sim: &SimFs, opts: WalOptions) -> Wal {
    Wal::open(Arc::new(sim.clone()), Path::new(WAL_DIR), opts).unwrap().0
}

fn read_all(sim: &SimFs) -> wal::Result<Vec<(u64, Vec<u8>)>> {
    let mut out = Vec::new();
    read_from(sim, Path::new(WAL_DIR), 1, 1000, |r| {
        out.push((r.lsn, r.payload.to_vec()));
        Ok(())
    })?;
    Ok(out)
}

fn batch(tag: &str, n: usize, len: usize) -> Vec<Vec<u8>> {
    (0..n).map(|i| payload(&format!("{tag} {i}"), len)).collect()
}

fn active_segment(wal: &Wal) -> PathBuf {
    wal.segments().list().last().unwrap().path.clone()
}

#[test]
fn several_written_batches_wait_unsynced_and_a_power_cut_keeps_a_prefix_of_their_records() {
    let mut outcomes = std::collections::BTreeSet::new();
    for seed in 0..100 {
        let sim = SimFs::new();
        let mut wal = open(&sim, opts(1 << 20));
        let stage = Mutex::new(Recorder::default());
        let acked = batch("acked", 4, 300);
        let done = write_step(&mut wal, &stage, acked.clone());
        sync_step(done, &stage).unwrap();
        let pending: Vec<Vec<Vec<u8>>> = (0..3).map(|b| batch(&format!("pending {b}"), 3, 400)).collect();
        let written: Vec<Written<_>> = pending
            .iter()
            .map(|reqs| write_step(&mut wal, &stage, reqs.clone()))
            .collect();
        assert_eq!(
            sim.pending_data_ops(&active_segment(&wal)),
            Some(3),
            "one write per batch"
        );
        assert_eq!(
            stage.lock().unwrap().acked(),
            [1, 2, 3, 4],
            "nothing unsynced was settled"
        );

        drop((written, wal)); // the power cut kills the process too
        sim.crash(seed);
        let (wal, _) = Wal::open(Arc::new(sim.clone()), Path::new(WAL_DIR), opts(1 << 20)).unwrap();
        let got = read_all(&sim).unwrap();
        let all: Vec<Vec<u8>> = acked.iter().chain(pending.iter().flatten()).cloned().collect();
        assert!(got.len() >= acked.len(), "seed {seed}: an acked record was lost");
        for (i, (lsn, p)) in got.iter().enumerate() {
            assert_eq!((*lsn, p), (i as u64 + 1, &all[i]), "seed {seed}");
        }
        assert_eq!(wal.next_lsn(), got.len() as u64 + 1);
        outcomes.insert(got.len());
    }
    assert!(
        outcomes.contains(&4) && outcomes.contains(&13) && outcomes.len() > 2,
        "power cuts should keep none, some and all of the pending batches: {outcomes:?}"
    );
}

#[test]
fn batches_written_across_a_roll_are_synced_later_in_order_and_all_acknowledged() {
    let sim = SimFs::new();
    let o = opts(4096);
    let mut wal = open(&sim, o);
    let stage = Mutex::new(Recorder::default());
    let first = write_step(&mut wal, &stage, batch("first", 2, 900));
    let second = write_step(&mut wal, &stage, batch("second", 2, 900));
    // This one rolls: its roll fdatasyncs the segment the two pending
    // batches were written to before either batch's own fdatasync runs.
    let third = write_step(&mut wal, &stage, batch("third", 3, 900));
    assert!(wal.stats().rolls.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    assert_eq!(stage.lock().unwrap().settled.len(), 0);
    for w in [first, second, third] {
        sync_step(w, &stage).unwrap();
    }
    assert_eq!(stage.lock().unwrap().acked(), (1..=7).collect::<Vec<_>>());
    drop(wal);
    sim.crash_dropping_all();
    assert_eq!(read_all(&sim).unwrap().len(), 7);
}

/// The single-threaded form of the race between the commit thread's roll
/// and the `wal-sync` thread: batch N is written, its pages' writeback
/// fails, and the next batch's roll fdatasync is the first to see the error
/// (once per open file description). Batch N's own fdatasync would return
/// Ok, yet it must fail, and so must everything after it.
#[test]
fn a_pending_batch_fails_when_a_roll_fsync_sees_its_writeback_error_first() {
    let sim = SimFs::new();
    let o = opts(4096);
    let mut wal = open(&sim, o);
    let stage = Mutex::new(Recorder::default());
    let mut acked = 0;
    while wal.segments().list().last().unwrap().bytes + 2 * RECORD_HEADER + 900 + 10 <= o.segment_bytes_max {
        sync_step(write_step(&mut wal, &stage, batch("acked", 1, 900)), &stage).unwrap();
        acked += 1;
    }
    let active = active_segment(&wal);
    let batch_n = write_step(&mut wal, &stage, [b"batch N!!!".to_vec()]);
    sim.fail_writeback(&active);
    let rolled = write_step(&mut wal, &stage, batch("rolls", 1, 900));
    assert!(rolled.staged[0].is_err(), "the roll went on after a failed fdatasync");

    let e = sync_step(batch_n, &stage).unwrap_err();
    assert!(matches!(e, Error::Poisoned(_)), "{e:?}");
    let e = sync_step(rolled, &stage).unwrap_err();
    assert!(matches!(e, Error::Poisoned(_)), "{e:?}");
    assert_eq!(stage.lock().unwrap().acked(), (1..=acked).collect::<Vec<_>>());
    drop(wal);
    sim.crash_dropping_all();
    assert_eq!(read_all(&sim).unwrap().len() as u64, acked);
}

#[test]
#[should_panic(expected = "batches are synced in write order")]
fn syncing_batches_out_of_write_order_is_a_bug_the_wal_asserts_against() {
    let sim = SimFs::new();
    let mut wal = open(&sim, opts(1 << 20));
    let stage = Mutex::new(Recorder::default());
    let first = write_step(&mut wal, &stage, batch("first", 1, 10));
    let second = write_step(&mut wal, &stage, batch("second", 1, 10));
    let _ = sync_step(second, &stage);
    let _ = sync_step(first, &stage);
}

/// A kill after a failed fdatasync leaves the failed batch clean in the page
/// cache (readable, never on the disk). The restarted WAL decides from the
/// disk (open fdatasyncs each segment and drops its cached pages) and writes
/// into a fresh segment, so more work and a later power cut keep exactly the
/// acknowledged records.
#[test]
fn a_kill_after_a_failed_fsync_then_a_restart_more_work_and_a_power_cut_keeps_exactly_the_acked_records() {
    for seed in 0..40 {
        let sim = SimFs::new();
        let o = opts(1 << 20);
        let mut wal = open(&sim, o);
        let stage = Mutex::new(Recorder::default());
        let mut acked = batch("acked", 3, 100);
        sync_step(write_step(&mut wal, &stage, acked.clone()), &stage).unwrap();
        let failed = write_step(&mut wal, &stage, batch("failed", 3, 700));
        let behind = write_step(&mut wal, &stage, batch("behind", 2, 50));
        let old_segment = active_segment(&wal);
        sim.set_failed_sync_drops_pending(true);
        sim.fail_syncs_after(0);
        assert!(sync_step(failed, &stage).is_err());
        sim.clear_faults();
        assert!(
            sync_step(behind, &stage).is_err(),
            "a batch after a failed fdatasync failed too"
        );
        sim.kill();
        drop(wal);
        let cached = sim.read_file(&old_segment).unwrap();
        assert!(
            cached.windows(8).any(|w| w == b"failed 2"),
            "the page cache still holds the failed batch"
        );

        // The restart: the failed batch is not on the disk, so its LSNs are
        // issued again, in a fresh segment.
        let mut wal = open(&sim, o);
        assert_eq!(
            wal.next_lsn(),
            4,
            "seed {seed}: the failed batch was read from the page cache"
        );
        assert_ne!(active_segment(&wal), old_segment);
        let stage = Mutex::new(Recorder::default());
        let more = batch("after restart", 4, 80);
        sync_step(write_step(&mut wal, &stage, more.clone()), &stage).unwrap();
        acked.extend(more);
        let unacked = write_step(&mut wal, &stage, batch("unacked", 2, 80));
        drop((unacked, wal));

        sim.crash(seed);
        let (_, report) = Wal::open(Arc::new(sim.clone()), Path::new(WAL_DIR), o).unwrap();
        let got = read_all(&sim).unwrap();
        let payloads: Vec<Vec<u8>> = got.iter().map(|(_, p)| p.clone()).collect();
        assert_eq!(payloads[..acked.len()], acked[..], "seed {seed}: {report:?}");
        assert!(
            payloads[acked.len()..].iter().all(|p| p.starts_with(b"unacked")),
            "seed {seed}: only never-acked records may follow: {payloads:?}"
        );
        for (i, (lsn, _)) in got.iter().enumerate() {
            assert_eq!(*lsn, i as u64 + 1, "seed {seed}");
        }
    }
}

#[test]
fn one_fdatasync_makes_every_batch_written_before_it_durable_and_acks_them_all() {
    let sim = SimFs::new();
    let mut wal = open(&sim, opts(1 << 20));
    let stage = Mutex::new(Recorder::default());
    let written: Vec<Written<_>> = (0..3)
        .map(|b| write_step(&mut wal, &stage, batch(&format!("b{b}"), 4, 200)))
        .collect();
    let syncs_before = sim.stats().sync_data_ok;
    let info = sync_steps(written, &stage).unwrap();
    assert_eq!(
        sim.stats().sync_data_ok - syncs_before,
        1,
        "one fdatasync for the three batches"
    );
    assert_eq!((info.records, info.durable_lsn_end), (12, 13));
    assert_eq!(stage.lock().unwrap().acked(), (1..=12).collect::<Vec<_>>());
    drop(wal);
    sim.crash_dropping_all();
    assert_eq!(
        read_all(&sim).unwrap().len(),
        12,
        "every acked record survives a power cut"
    );
}

#[test]
fn one_fdatasync_after_a_roll_covers_the_batches_on_both_segments() {
    let sim = SimFs::new();
    let mut wal = open(&sim, opts(4096));
    let stage = Mutex::new(Recorder::default());
    let written: Vec<Written<_>> = ["first", "second", "third"]
        .iter()
        .map(|tag| write_step(&mut wal, &stage, batch(tag, 2, 900)))
        .collect();
    assert!(wal.stats().rolls.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    sync_steps(written, &stage).unwrap();
    assert_eq!(stage.lock().unwrap().acked(), (1..=6).collect::<Vec<_>>());
    drop(wal);
    sim.crash_dropping_all();
    assert_eq!(read_all(&sim).unwrap().len(), 6);
}

#[test]
fn a_failed_fdatasync_covering_several_batches_acks_none_of_them_nor_anything_later() {
    let sim = SimFs::new();
    let mut wal = open(&sim, opts(1 << 20));
    let stage = Mutex::new(Recorder::default());
    let done = write_step(&mut wal, &stage, batch("acked", 2, 100));
    sync_step(done, &stage).unwrap();
    let written: Vec<Written<_>> = (0..3)
        .map(|b| write_step(&mut wal, &stage, batch(&format!("b{b}"), 2, 100)))
        .collect();
    sim.set_sync_error(true);
    assert!(sync_steps(written, &stage).is_err());
    sim.set_sync_error(false);
    // The disk "recovered": a later fdatasync returns Ok, yet nothing after
    // the failure is acknowledged.
    let later = write_step(&mut wal, &stage, batch("later", 2, 100));
    assert!(sync_steps([later], &stage).is_err());
    let s = stage.lock().unwrap();
    assert_eq!(s.acked(), [1, 2], "only what was synced before the failure");
    assert_eq!(s.settled.len(), 2 + 6 + 2, "every request settled exactly once");
}

#[test]
fn a_failed_write_among_coalesced_batches_acks_none_of_them() {
    let sim = SimFs::new();
    let mut wal = open(&sim, opts(1 << 20));
    let stage = Mutex::new(Recorder::default());
    let first = write_step(&mut wal, &stage, batch("first", 2, 100));
    sim.set_write_error(true);
    let failed = write_step(&mut wal, &stage, batch("failed", 2, 100));
    sim.set_write_error(false);
    assert!(failed.unsynced.is_err());
    assert!(sync_steps([first, failed], &stage).is_err());
    assert!(stage.lock().unwrap().acked().is_empty());
}
