//! The WAL under fsync errors as Linux reports them, on the simulated
//! filesystem: a writeback error is reported once per open file description
//! (errseq), pages whose writeback failed stay readable in the page cache
//! until dropped, and a restart without a power cut reads that cache.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use wal::fs::{DelegateFile, DelegateFs, Fs, FsFile, OpenMode, RealFs};
use wal::sim::SimFs;
use wal::{Error, RecordType, Wal, read_from, verify};

mod common;
use common::{RECORD_HEADER, WAL_DIR, opts, payload};

/// Every record of the WAL in `dir`, as (LSN, payload).
fn read_all(fs: &dyn Fs, dir: &Path) -> wal::Result<Vec<(u64, Vec<u8>)>> {
    let mut out = Vec::new();
    read_from(fs, dir, 1, 1000, |r| {
        out.push((r.lsn, r.payload.to_vec()));
        Ok(())
    })?;
    Ok(out)
}

fn numbered(first_lsn: u64, payloads: &[Vec<u8>]) -> Vec<(u64, Vec<u8>)> {
    (first_lsn..).zip(payloads.iter().cloned()).collect()
}

// ---------------------------------------------------------------------------
// The roll's fdatasync and a batch's fdatasync on one file description

/// Lets a test hold the `sync_data` of the thread named [`HELD_THREAD`] at
/// its entry until another thread's `sync_data` on the same filesystem has
/// returned, or [`HOLD_MAX`] passed (the other sync may be waiting for the
/// held one, as the WAL's syncs take turns).
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    armed: bool,
    held: bool,
    other_synced: bool,
}

const HELD_THREAD: &str = "batch-sync";
const HOLD_MAX: Duration = Duration::from_millis(1500);

impl Gate {
    fn hold_if_armed(&self) {
        let mut st = self.state.lock().unwrap();
        if !st.armed {
            return;
        }
        st.armed = false;
        st.held = true;
        self.changed.notify_all();
        let deadline = Instant::now() + HOLD_MAX;
        while !st.other_synced && Instant::now() < deadline {
            st = self.changed.wait_timeout(st, deadline - Instant::now()).unwrap().0;
        }
    }

    fn arm(&self) {
        *self.state.lock().unwrap() = GateState {
            armed: true,
            ..GateState::default()
        };
    }

    fn other_synced(&self) {
        self.state.lock().unwrap().other_synced = true;
        self.changed.notify_all();
    }

    fn wait_until_held(&self) {
        let mut st = self.state.lock().unwrap();
        while !st.held {
            st = self.changed.wait(st).unwrap();
        }
    }
}

/// A [`SimFs`] whose files pass their `sync_data` through a [`Gate`].
struct GatedFs {
    sim: SimFs,
    gate: Arc<Gate>,
}

struct GatedFile {
    inner: Box<dyn FsFile>,
    gate: Arc<Gate>,
}

impl DelegateFile for GatedFile {
    fn inner(&self) -> &dyn FsFile {
        self.inner.as_ref()
    }
    fn sync_data(&self) -> io::Result<()> {
        let held = std::thread::current().name() == Some(HELD_THREAD);
        if held {
            self.gate.hold_if_armed();
        }
        let result = self.inner.sync_data();
        if !held {
            self.gate.other_synced();
        }
        result
    }
}

impl DelegateFs for GatedFs {
    fn inner(&self) -> &dyn Fs {
        &self.sim
    }
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn FsFile>> {
        Ok(Box::new(GatedFile {
            inner: self.sim.open(path, mode)?,
            gate: self.gate.clone(),
        }))
    }
}

/// Batch N is written to the active segment and its `wal-sync` fdatasync
/// starts (past the poison check); meanwhile the pages' writeback fails, and
/// the commit thread rolls the segment, whose fdatasync on the same file
/// description is the first to see the error. Linux then reports nothing to
/// batch N's fdatasync. Batch N must still fail, and nothing after it may
/// succeed.
#[test]
fn a_batch_whose_pages_failed_writeback_is_never_acked_when_the_roll_fsync_sees_the_error_first() {
    let sim = SimFs::new();
    let gate = Arc::new(Gate::default());
    let fs = Arc::new(GatedFs {
        sim: sim.clone(),
        gate: gate.clone(),
    });
    let opts = opts(4096);
    let dir = Path::new(WAL_DIR);
    let (mut wal, _) = Wal::open(fs.clone(), dir, opts).unwrap();
    let big = |i: usize| payload(&format!("acked {i}"), 900);
    let mut acked = Vec::new();
    // Fill the segment so that a small batch still fits and a big record after it rolls.
    while wal.segments().list().last().unwrap().bytes + 2 * RECORD_HEADER + 900 + 10 <= opts.segment_bytes_max {
        let p = big(acked.len());
        wal.append(RecordType::Frame, &p).unwrap();
        wal.commit().unwrap();
        acked.push(p);
    }
    let active = wal.segments().list().last().unwrap().path.clone();
    wal.append(RecordType::Frame, b"batch N!!!").unwrap();
    let batch_n = wal.write_batch().unwrap();
    sim.fail_writeback(&active);

    gate.arm();
    let syncer = std::thread::Builder::new()
        .name(HELD_THREAD.into())
        .spawn(move || batch_n.sync())
        .unwrap();
    gate.wait_until_held();
    let rolled = wal.append(RecordType::Frame, &payload("rolls", 900));
    let batch_n = syncer.join().unwrap();

    assert!(
        batch_n.is_err(),
        "batch N was acknowledged although its pages never reached the disk: {batch_n:?}"
    );
    assert!(rolled.is_err(), "the roll went on after a failed fdatasync: {rolled:?}");
    let e = wal.commit().unwrap_err();
    assert!(matches!(e, Error::Poisoned(_)), "{e:?}");
    assert_eq!(
        sim.durable_read(&active).map(|d| d.ends_with(b"batch N!!!")),
        Some(false)
    );
    drop(wal);
    sim.crash_dropping_all();
    let (_, report) = Wal::open(Arc::new(sim.clone()), dir, opts).unwrap();
    assert_eq!(report.next_lsn, acked.len() as u64 + 1);
    assert_eq!(read_all(&sim, dir).unwrap(), numbered(1, &acked));
}

// ---------------------------------------------------------------------------
// A restart without a power cut reads the page cache

/// Commits `n` records, then writes one more batch whose writeback fails
/// (its fdatasync reports EIO) and "kills" the process: every handle is
/// dropped, the page cache survives. Returns the acked payloads.
fn acked_then_failed_batch_then_kill(sim: &SimFs, n: usize) -> Vec<Vec<u8>> {
    let dir = Path::new(WAL_DIR);
    let (mut wal, _) = Wal::open(Arc::new(sim.clone()), dir, opts(1 << 20)).unwrap();
    let acked: Vec<Vec<u8>> = (0..n).map(|i| payload(&format!("acked {i}"), 60)).collect();
    for p in &acked {
        wal.append(RecordType::Frame, p).unwrap();
        wal.commit().unwrap();
    }
    for i in 0..3 {
        wal.append(RecordType::Frame, &payload(&format!("failed {i}"), 700))
            .unwrap();
    }
    let active = wal.segments().list().last().unwrap().path.clone();
    let batch = wal.write_batch().unwrap();
    sim.fail_writeback(&active);
    let e = batch.sync().unwrap_err();
    assert!(matches!(e, Error::Io { op: "fdatasync", .. }), "{e:?}");
    let cached = sim.read_file(&active).unwrap();
    assert!(
        cached.windows(8).any(|w| w == b"failed 2"),
        "the page cache still holds the failed batch"
    );
    acked
}

#[test]
fn a_restart_after_a_failed_fsync_reads_the_disk_and_never_appends_behind_the_failed_batch() {
    let sim = SimFs::new();
    let dir = Path::new(WAL_DIR);
    let mut acked = acked_then_failed_batch_then_kill(&sim, 5);

    // The restart (no reboot): the failed batch is not on the disk, so it is
    // not there for the new process either, and its LSNs are issued again.
    let (mut wal, report) = Wal::open(Arc::new(sim.clone()), dir, opts(1 << 20)).unwrap();
    assert_eq!(
        report.next_lsn, 6,
        "the failed batch was read from the page cache: {report:?}"
    );
    assert_eq!(read_all(&sim, dir).unwrap(), numbered(1, &acked));
    let after: Vec<Vec<u8>> = (0..4).map(|i| payload(&format!("after restart {i}"), 80)).collect();
    for p in &after {
        wal.append(RecordType::Frame, p).unwrap();
    }
    wal.commit().unwrap();
    acked.extend(after);
    drop(wal);

    // A later power cut keeps every acked record, in order, and opens.
    sim.crash_dropping_all();
    let (wal, report) = Wal::open(Arc::new(sim.clone()), dir, opts(1 << 20)).unwrap();
    assert!(report.torn_tail.is_none(), "{report:?}");
    assert_eq!(wal.next_lsn(), acked.len() as u64 + 1);
    assert_eq!(read_all(&sim, dir).unwrap(), numbered(1, &acked));
}

#[test]
fn a_dry_run_after_a_failed_fsync_reports_what_the_disk_holds() {
    let sim = SimFs::new();
    let dir = Path::new(WAL_DIR);
    acked_then_failed_batch_then_kill(&sim, 4);
    let scans = verify(&sim, dir, 1000).unwrap();
    assert_eq!(scans.len(), 1);
    assert_eq!((scans[0].records, scans[0].next_lsn), (4, 5), "{:?}", scans[0]);
}

#[test]
fn a_restarted_wal_always_writes_into_a_new_segment() {
    let t = tempfile::TempDir::new().unwrap();
    let fs: Arc<dyn Fs> = Arc::new(RealFs);
    let first: Vec<Vec<u8>> = (0..3).map(|i| payload(&format!("first run {i}"), 40)).collect();
    let (mut wal, _) = Wal::open(fs.clone(), t.path(), opts(1 << 20)).unwrap();
    for p in &first {
        wal.append(RecordType::Frame, p).unwrap();
    }
    wal.commit().unwrap();
    let old = wal.segments().list();
    assert_eq!(old.len(), 1);
    let old_bytes = std::fs::read(&old[0].path).unwrap();
    drop(wal);

    let (mut wal, report) = Wal::open(fs.clone(), t.path(), opts(1 << 20)).unwrap();
    let segs = wal.segments().list();
    assert_eq!(report.segments, 2, "{segs:?}");
    assert_eq!((segs[0].path.clone(), segs[1].first_lsn), (old[0].path.clone(), 4));
    wal.append(RecordType::Frame, b"second run").unwrap();
    wal.commit().unwrap();
    drop(wal);
    assert_eq!(
        std::fs::read(&old[0].path).unwrap(),
        old_bytes,
        "the previous process's segment was written to"
    );
    let mut want = numbered(1, &first);
    want.push((4, b"second run".to_vec()));
    assert_eq!(read_all(&RealFs, t.path()).unwrap(), want);

    // A restart with nothing appended replaces its own empty segment.
    let (wal, report) = Wal::open(fs.clone(), t.path(), opts(1 << 20)).unwrap();
    assert_eq!((report.segments, wal.next_lsn()), (3, 5));
    drop(wal);
    let (_, report) = Wal::open(fs, t.path(), opts(1 << 20)).unwrap();
    assert_eq!(report.segments, 3);
}

/// A segment that is not the last may end early (a torn or preallocated
/// tail) when the next segment starts right where its valid records end:
/// no LSN is missing. When the next one starts later, records are missing.
#[test]
fn a_segment_that_ends_early_is_read_whole_when_the_next_one_continues_it() {
    let t = tempfile::TempDir::new().unwrap();
    let fs: Arc<dyn Fs> = Arc::new(RealFs);
    let (mut wal, _) = Wal::open(fs.clone(), t.path(), opts(1 << 20)).unwrap();
    let first: Vec<Vec<u8>> = (0..3).map(|i| payload(&format!("r{i}"), 50)).collect();
    for p in &first {
        wal.append(RecordType::Frame, p).unwrap();
    }
    wal.commit().unwrap();
    let seg = wal.segments().list()[0].path.clone();
    drop(wal);
    let (mut wal, _) = Wal::open(fs.clone(), t.path(), opts(1 << 20)).unwrap();
    wal.append(RecordType::Frame, b"next").unwrap();
    wal.commit().unwrap();
    drop(wal);
    // A zeroed (preallocated) tail after the first segment's last record.
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes.extend_from_slice(&[0; 700]);
    std::fs::write(&seg, &bytes).unwrap();
    let mut want = numbered(1, &first);
    want.push((4, b"next".to_vec()));
    assert_eq!(read_all(&RealFs, t.path()).unwrap(), want);
    assert!(verify(&RealFs, t.path(), 1000).unwrap()[0].corruption().is_none());

    // Damage to its last record: LSN 3 is gone, so it is corruption.
    bytes.truncate(bytes.len() - 700 - 10);
    bytes.extend_from_slice(&[0; 700]);
    std::fs::write(&seg, &bytes).unwrap();
    let e = read_all(&RealFs, t.path()).unwrap_err();
    assert!(matches!(e, Error::Corruption { offset, .. } if offset > 32), "{e:?}");
}

// ---------------------------------------------------------------------------
// Segment removal

fn rolled_wal(sim: &SimFs) -> Wal {
    let (mut wal, _) = Wal::open(Arc::new(sim.clone()), Path::new(WAL_DIR), opts(4096)).unwrap();
    for i in 0..40 {
        wal.append(RecordType::Frame, &payload(&format!("r{i}"), 500)).unwrap();
        wal.commit().unwrap();
    }
    assert!(wal.segments().list().len() >= 6);
    wal
}

#[test]
fn a_failed_unlink_part_way_does_not_stop_later_removals() {
    let sim = SimFs::new();
    let wal = rolled_wal(&sim);
    let segments = wal.segments();
    let before = segments.list();
    sim.fail_unlinks_after(2);
    let e = segments.remove_before(before[4].first_lsn).unwrap_err();
    assert!(matches!(&e, Error::Io { op: "unlink", .. }), "{e:?}");
    assert_eq!(
        segments.list(),
        before[2..],
        "the list must drop exactly the segments that are gone"
    );
    sim.clear_faults();
    assert_eq!(segments.remove_before(before[4].first_lsn).unwrap(), 2);
    assert_eq!(segments.remove_before(before[5].first_lsn).unwrap(), 1);
    let mut on_disk = sim.list_all();
    on_disk.sort();
    let listed: Vec<PathBuf> = segments.list().into_iter().map(|s| s.path).collect();
    assert_eq!(on_disk, listed);
    assert_eq!(listed[0], before[5].path);
}

#[test]
fn a_segment_whose_name_is_already_gone_counts_as_removed() {
    let sim = SimFs::new();
    let wal = rolled_wal(&sim);
    let segments = wal.segments();
    let before = segments.list();
    // Unlinked by someone (an earlier call that failed after its unlink).
    sim.remove_file(&before[0].path).unwrap();
    assert_eq!(segments.remove_before(before[2].first_lsn).unwrap(), 2);
    assert_eq!(segments.list(), before[2..]);
}

#[test]
fn a_failed_directory_fsync_while_removing_poisons_the_wal() {
    let sim = SimFs::new();
    let mut wal = rolled_wal(&sim);
    let segments = wal.segments();
    let before = segments.list();
    sim.set_sync_dir_error(true);
    let e = segments.remove_before(before[3].first_lsn).unwrap_err();
    assert!(matches!(&e, Error::Io { op: "fsync dir", .. }), "{e:?}");
    sim.clear_faults();
    let e = wal.append(RecordType::Frame, b"after").unwrap_err();
    assert!(matches!(e, Error::Poisoned(_)), "{e:?}");
    let e = segments.remove_before(before[3].first_lsn).unwrap_err();
    assert!(matches!(e, Error::Poisoned(_)), "{e:?}");
}
