//! The writable log: open with torn-tail repair, buffered appends, commit
//! (one write + one fdatasync), segment roll and removal. The readers are in
//! [`crate::read`].

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::fs::{Fs, FsFile, OpenMode};
use crate::record::{RECORD_HEADER_BYTES, RecordType, encode_with};
use crate::segment::{
    Damage, SEGMENT_HEADER_BYTES, encode_header, parse_segment_file_name, scan_segment, segment_file_name,
};

/// Limits of a WAL. Every field is a bound, named with its unit last.
#[derive(Debug, Clone, Copy)]
pub struct WalOptions {
    /// A segment is rolled when the next record would take it past this size.
    /// Default: 64 MiB. Minimum: 4 KiB.
    pub segment_bytes_max: u64,
    /// Largest payload accepted; also the bound a reader trusts a length field
    /// up to. Default: 4 MiB. Must leave room for one record in a segment.
    pub record_bytes_max: u32,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            segment_bytes_max: 64 << 20,
            record_bytes_max: 4 << 20,
        }
    }
}

impl WalOptions {
    /// Checks the limits against each other.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.segment_bytes_max < 4096 {
            return Err(format!(
                "segment_bytes_max {} is below the minimum 4096",
                self.segment_bytes_max
            ));
        }
        let one = SEGMENT_HEADER_BYTES + RECORD_HEADER_BYTES as u64 + self.record_bytes_max as u64;
        if one > self.segment_bytes_max {
            return Err(format!(
                "record_bytes_max {} does not fit a segment of segment_bytes_max {}",
                self.record_bytes_max, self.segment_bytes_max
            ));
        }
        Ok(())
    }
}

/// One segment on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    /// LSN of its first record.
    pub first_lsn: u64,
    /// Its path.
    pub path: PathBuf,
    /// Its size in bytes (of the active one: as of the last commit).
    pub bytes: u64,
}

/// What [`Wal::open`] found and repaired.
#[derive(Debug, Clone, Default)]
pub struct OpenReport {
    /// Segments present after open.
    pub segments: usize,
    /// The torn tail that was truncated away, if any.
    pub torn_tail: Option<TornTail>,
    /// Leftover `*.wal.tmp` files from an interrupted segment creation, removed.
    pub removed_tmp_files: usize,
    /// LSN of the oldest record on disk.
    pub first_lsn: u64,
    /// LSN the next append gets.
    pub next_lsn: u64,
}

/// A torn tail found (and, unless read-only, truncated) on open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    /// The last segment.
    pub segment: PathBuf,
    /// Where valid data ends.
    pub offset: u64,
    /// Bytes dropped.
    pub bytes: u64,
    /// Why the first dropped record was not valid.
    pub why: String,
}

/// Counters of the WAL (shared, cheap to read from any thread).
#[derive(Debug, Default)]
pub struct WalStats {
    /// Commits that wrote and fdatasynced something.
    pub commits: AtomicU64,
    /// Records made durable.
    pub records: AtomicU64,
    /// Bytes made durable.
    pub bytes: AtomicU64,
    /// Commits by records per commit: bucket i counts `[2^i, 2^(i+1))`.
    pub batch_log2_histogram: [AtomicU64; 24],
    /// Segments rolled.
    pub rolls: AtomicU64,
    /// Segments removed.
    pub segments_removed: AtomicU64,
    /// Nanoseconds spent in fdatasync.
    pub fsync_nanos: AtomicU64,
}

/// The set of segments, shared between the writer and whoever removes
/// materialized segments (checkpointing runs on another thread).
#[derive(Clone)]
pub struct Segments {
    fs: Arc<dyn Fs>,
    dir: PathBuf,
    list: Arc<Mutex<Vec<SegmentInfo>>>,
    stats: Arc<WalStats>,
    poisoned: Poison,
}

impl Segments {
    /// A snapshot of the segments, oldest first.
    pub fn list(&self) -> Vec<SegmentInfo> {
        self.list.lock().unwrap().clone()
    }

    /// Total bytes of all segments.
    pub fn disk_bytes(&self) -> u64 {
        self.list.lock().unwrap().iter().map(|s| s.bytes).sum()
    }

    /// Deletes every segment whose records all have LSN < `lsn`: a segment
    /// goes when the next one starts at or below `lsn`. The active (last)
    /// segment is never removed. Returns how many were removed.
    ///
    /// Each segment leaves the list as soon as its unlink is durable, so an
    /// error part-way keeps the list true, and a segment whose name is
    /// already gone (`ENOENT`: unlinked by a call that failed after it)
    /// counts as removed: a later call finishes the job. A failed fsync of
    /// the directory poisons the WAL (the unlink may not be durable, and a
    /// later fsync returning Ok would not prove it is).
    pub fn remove_before(&self, lsn: u64) -> Result<usize> {
        let doomed: Vec<SegmentInfo> = {
            let list = self.list.lock().unwrap();
            let mut doomed = Vec::new();
            for pair in list.windows(2) {
                if pair[1].first_lsn <= lsn {
                    doomed.push(pair[0].clone());
                } else {
                    break;
                }
            }
            doomed
        };
        if doomed.is_empty() {
            return Ok(0);
        }
        self.poisoned.check()?;
        // Oldest first, each unlink made durable before the next: a crash
        // then leaves a suffix of the segments, never a gap that readers
        // would have to take for a lost segment.
        for seg in &doomed {
            match self.fs.remove_file(&seg.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("unlink", &seg.path)(e)),
            }
            crate::crash_point!("wal::remove::after_unlink");
            if let Err(e) = self.fs.sync_dir(&self.dir) {
                return Err(self.poisoned.set(Error::io("fsync dir", &self.dir)(e)));
            }
            self.list.lock().unwrap().retain(|s| s.first_lsn != seg.first_lsn);
            self.stats.segments_removed.fetch_add(1, Ordering::Relaxed);
        }
        Ok(doomed.len())
    }
}

/// Result of a successful [`Wal::commit`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitInfo {
    /// Records made durable by this commit.
    pub records: u64,
    /// Bytes written by this commit.
    pub bytes: u64,
    /// Every record with LSN < this is durable.
    pub durable_lsn_end: u64,
    /// Nanoseconds the fdatasync took.
    pub sync_nanos: u64,
}

/// A writable WAL. One owner appends and commits; see the crate docs.
///
/// # Invariants
/// Checked by `Wal::assert_invariants` after every append, write and roll.
/// - LSN continuity: each appended record gets `next_lsn`, the previous
///   record's LSN + 1; the active segment holds (written or in `buf`) the
///   records `[active_first_lsn, next_lsn)`, and a rolled segment's
///   successor starts at the LSN right after its last record, so
///   consecutive segments' LSNs meet.
/// - `buf` holds whole records, the LSNs `[buf_first_lsn, next_lsn)`, to be
///   written at `write_offset` of the active segment; it is empty exactly
///   when `buf_first_lsn == next_lsn`, and after [`Wal::write_batch`] it is
///   empty. `buf_records` counts the records of the batch being staged:
///   those in `buf` and those a roll already wrote to the previous segment.
/// - `SEGMENT_HEADER_BYTES <= write_offset` and `write_offset + buf.len()
///   <= segment_bytes_max`: a record never spans segments.
/// - Everything before `write_offset` in the active segment is written
///   (the file is at least that long) and, after a successful commit,
///   fdatasynced; batches are synced in write order, so what is synced is a
///   prefix of what is written ([`Unsynced::sync`] asserts the order).
/// - The last entry of the segment list is the active segment, starting at
///   `active_first_lsn`; the list is sorted by first LSN, strictly.
/// - Once `poisoned` is set it stays set: no append or commit succeeds again.
pub struct Wal {
    fs: Arc<dyn Fs>,
    dir: PathBuf,
    opts: WalOptions,
    segments: Segments,
    active: Arc<dyn FsFile>,
    active_path: PathBuf,
    /// LSN of the active segment's first record.
    active_first_lsn: u64,
    write_offset: u64,
    buf: Vec<u8>,
    /// LSN of the first record in `buf` (`next_lsn` when it is empty).
    buf_first_lsn: u64,
    buf_records: u64,
    next_lsn: u64,
    poisoned: Poison,
    stats: Arc<WalStats>,
}

/// The WAL's poisoned state, shared by the WAL, its unsynced batches and its
/// segment set: the first I/O failure is kept, and everything after it is
/// refused.
#[derive(Clone, Default)]
struct Poison {
    why: Arc<Mutex<Option<String>>>,
    /// Held across every fdatasync of a WAL segment once the WAL is open.
    sync_gate: Arc<Mutex<()>>,
    /// The highest `durable_lsn_end` of a batch whose sync has started:
    /// batches are synced in the order they were written.
    sync_started_lsn_end: Arc<AtomicU64>,
}

impl Poison {
    /// `Err(Poisoned)` once a failure was recorded.
    fn check(&self) -> Result<()> {
        match &*self.why.lock().unwrap() {
            Some(why) => Err(Error::Poisoned(why.clone())),
            None => Ok(()),
        }
    }

    /// Records `err` (the first one stays) and returns it.
    fn set(&self, err: Error) -> Error {
        let mut p = self.why.lock().unwrap();
        if p.is_none() {
            *p = Some(err.to_string());
        }
        err
    }

    /// fdatasyncs a segment; every fdatasync of an open WAL goes through
    /// here (a batch's on the `wal-sync` thread, a roll's on the commit
    /// thread).
    ///
    /// Linux reports a writeback error once per open file description
    /// (errseq): when two threads fsync the same file, only the first call
    /// after the failure sees it, and the other returns Ok although pages it
    /// covers never reached the disk. So the syncs take turns, and a failed
    /// one poisons the WAL before the next one starts; each checks the
    /// poison before and after its own fdatasync. A batch is thus never
    /// acknowledged once any fdatasync of its file failed, whoever saw the
    /// error.
    fn sync(&self, file: &dyn FsFile, path: &Path) -> Result<()> {
        let _one_at_a_time = self.sync_gate.lock().unwrap();
        self.check()?;
        if let Err(e) = file.sync_data() {
            return Err(self.set(Error::io("fdatasync", path)(e)));
        }
        self.check()
    }
}

/// Records written to the active segment by [`Wal::write_batch`] but not yet
/// fdatasynced. [`Unsynced::sync`] makes them durable; it may run on another
/// thread while the WAL stages and writes the next batch (pipelined group
/// commit). Nothing in it may be acknowledged before `sync` returns Ok.
pub struct Unsynced {
    file: Arc<dyn FsFile>,
    path: PathBuf,
    records: u64,
    bytes: u64,
    durable_lsn_end: u64,
    poisoned: Poison,
    stats: Arc<WalStats>,
}

impl Unsynced {
    /// Every record of this batch (and of every batch before it) has an LSN
    /// below this.
    pub fn durable_lsn_end(&self) -> u64 {
        self.durable_lsn_end
    }

    /// Records in this batch (0 for a batch that wrote nothing).
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Takes in `earlier`, a batch written before this one, so that this
    /// batch's one fdatasync makes both durable (and counts as one commit of
    /// both batches' records): the fdatasync covers every write to this
    /// batch's segment before it, and a batch on an earlier segment was made
    /// durable by the roll that closed that segment.
    pub fn absorb(&mut self, earlier: Unsynced) {
        assert!(
            earlier.durable_lsn_end <= self.durable_lsn_end,
            "a batch ending before LSN {} absorbed into one ending before LSN {}: only earlier batches",
            earlier.durable_lsn_end,
            self.durable_lsn_end
        );
        self.records += earlier.records;
        self.bytes += earlier.bytes;
    }

    /// fdatasyncs the segment the batch was written to. On error the WAL is
    /// poisoned (see [`Wal::commit`] for why there is no retry), and so is
    /// every later batch: once one fdatasync failed, a later one returning Ok
    /// proves nothing about the pages the failed one lost.
    pub fn sync(self) -> Result<CommitInfo> {
        let before = (self.poisoned.sync_started_lsn_end).fetch_max(self.durable_lsn_end, Ordering::SeqCst);
        assert!(
            before <= self.durable_lsn_end,
            "batches are synced in write order: a batch ending before LSN {} synced after one ending before LSN {before}",
            self.durable_lsn_end
        );
        self.poisoned.check()?;
        if self.records == 0 {
            return Ok(CommitInfo {
                records: 0,
                bytes: 0,
                durable_lsn_end: self.durable_lsn_end,
                sync_nanos: 0,
            });
        }
        let t = std::time::Instant::now();
        self.poisoned.sync(self.file.as_ref(), &self.path)?;
        let sync_nanos = t.elapsed().as_nanos() as u64;
        let s = &self.stats;
        s.fsync_nanos.fetch_add(sync_nanos, Ordering::Relaxed);
        s.commits.fetch_add(1, Ordering::Relaxed);
        s.records.fetch_add(self.records, Ordering::Relaxed);
        s.bytes.fetch_add(self.bytes, Ordering::Relaxed);
        let bucket = (63 - self.records.leading_zeros() as usize).min(s.batch_log2_histogram.len() - 1);
        s.batch_log2_histogram[bucket].fetch_add(1, Ordering::Relaxed);
        Ok(CommitInfo {
            records: self.records,
            bytes: self.bytes,
            durable_lsn_end: self.durable_lsn_end,
            sync_nanos,
        })
    }
}

/// The segments of a directory as (first LSN, path) sorted by LSN, and its
/// leftover `*.tmp` files.
pub(crate) type Listing = (Vec<(u64, PathBuf)>, Vec<PathBuf>);

pub(crate) fn list_segments(fs: &dyn Fs, dir: &Path) -> Result<Listing> {
    let mut segs = Vec::new();
    let mut tmps = Vec::new();
    for path in fs.list_dir(dir).map_err(Error::io("list", dir))? {
        if let Some(lsn) = parse_segment_file_name(&path) {
            segs.push((lsn, path));
        } else if path.extension().is_some_and(|e| e == "tmp") {
            tmps.push(path);
        }
    }
    segs.sort();
    Ok((segs, tmps))
}

/// Creates a segment the crash-safe way: write the header to `<name>.tmp`,
/// fdatasync it, rename it into place, fsync the directory. A crash at any
/// point leaves either no segment or a complete, empty one.
fn create_segment(fs: &dyn Fs, dir: &Path, first_lsn: u64) -> Result<(Box<dyn FsFile>, PathBuf)> {
    let path = dir.join(segment_file_name(first_lsn));
    let tmp = dir.join(format!("{}.tmp", segment_file_name(first_lsn)));
    let file = fs
        .open(&tmp, OpenMode::CreateTruncate)
        .map_err(Error::io("create", &tmp))?;
    file.write_all_at(&encode_header(first_lsn), 0)
        .map_err(Error::io("write", &tmp))?;
    file.sync_data().map_err(Error::io("fdatasync", &tmp))?;
    fs.rename(&tmp, &path).map_err(Error::io("rename", &tmp))?;
    fs.sync_dir(dir).map_err(Error::io("fsync dir", dir))?;
    Ok((file, path))
}

impl Wal {
    /// Opens (or creates) the WAL in `dir`, truncating a torn tail of the last
    /// segment. Mid-log corruption in the last segment is an error; damage in
    /// older segments is found by readers (recovery reads everything).
    pub fn open(fs: Arc<dyn Fs>, dir: &Path, opts: WalOptions) -> Result<(Wal, OpenReport)> {
        Wal::open_at(fs, dir, opts, 1)
    }

    /// Like [`Wal::open`]; an empty directory starts at `first_lsn` (LSNs
    /// never go back, e.g. after salvage moved a damaged WAL aside).
    pub fn open_at(fs: Arc<dyn Fs>, dir: &Path, opts: WalOptions, first_lsn: u64) -> Result<(Wal, OpenReport)> {
        assert!(first_lsn >= 1, "LSNs start at 1");
        opts.validate().map_err(|why| Error::BadHeader {
            segment: dir.to_path_buf(),
            why,
        })?;
        crate::fs::create_dir_durably(fs.as_ref(), dir).map_err(Error::io("mkdir", dir))?;
        let mut report = OpenReport::default();
        let (mut segs, tmps) = list_segments(fs.as_ref(), dir)?;
        for tmp in &tmps {
            fs.remove_file(tmp).map_err(Error::io("unlink", tmp))?;
        }
        report.removed_tmp_files = tmps.len();
        if !tmps.is_empty() {
            fs.sync_dir(dir).map_err(Error::io("fsync dir", dir))?;
        }
        // Decide from the disk, not the page cache: after a failed fdatasync
        // (in a process that then stopped) the cache may still hold records
        // the disk never got. Readers later read every segment afresh.
        for (_, path) in &segs[..segs.len().saturating_sub(1)] {
            fs.open(path, OpenMode::Read)
                .and_then(|f| f.sync_and_drop_cache())
                .map_err(Error::io("fdatasync and drop cache", path))?;
        }
        let stats = Arc::new(WalStats::default());
        let next_lsn = match segs.last() {
            None => first_lsn,
            Some((_, path)) => {
                let path = path.clone();
                let file = fs.open(&path, OpenMode::ReadWrite).map_err(Error::io("open", &path))?;
                file.sync_and_drop_cache()
                    .map_err(Error::io("fdatasync and drop cache", &path))?;
                let scan = scan_segment(&path, file.as_ref(), true, opts.record_bytes_max, u64::MAX, |_| Ok(()))?;
                if let Some(err) = scan.corruption() {
                    return Err(err);
                }
                if let Some(Damage::Torn { offset, bytes, why }) = &scan.damage {
                    warn!(segment = %path.display(), offset, bytes, %why, "wal: truncating torn tail");
                    file.set_len(*offset).map_err(Error::io("truncate", &path))?;
                    file.sync_data().map_err(Error::io("fdatasync", &path))?;
                    report.torn_tail = Some(TornTail {
                        segment: path.clone(),
                        offset: *offset,
                        bytes: *bytes,
                        why: why.to_string(),
                    });
                }
                scan.next_lsn
            }
        };
        // Never append to a segment an earlier process wrote: its cached
        // tail may hold pages whose writeback failed, which a later fsync
        // would not write again. A fresh segment starts at the next LSN (it
        // replaces the last one when that holds no record).
        let (active, active_path) = create_segment(fs.as_ref(), dir, next_lsn)?;
        if segs.last().is_some_and(|(lsn, _)| *lsn == next_lsn) {
            segs.pop();
        }
        segs.push((next_lsn, active_path.clone()));
        let write_offset = SEGMENT_HEADER_BYTES;
        let mut infos = Vec::with_capacity(segs.len());
        for (lsn, path) in &segs {
            let bytes = if *path == active_path {
                write_offset
            } else {
                fs.open(path, OpenMode::Read)
                    .and_then(|f| f.len())
                    .map_err(Error::io("stat", path))?
            };
            infos.push(SegmentInfo {
                first_lsn: *lsn,
                path: path.clone(),
                bytes,
            });
        }
        report.segments = infos.len();
        report.first_lsn = infos.first().map_or(next_lsn, |s| s.first_lsn);
        report.next_lsn = next_lsn;
        info!(dir = %dir.display(), segments = infos.len(), next_lsn, "wal: opened");
        let poisoned = Poison::default();
        let segments = Segments {
            fs: fs.clone(),
            dir: dir.to_path_buf(),
            list: Arc::new(Mutex::new(infos)),
            stats: stats.clone(),
            poisoned: poisoned.clone(),
        };
        let wal = Wal {
            fs,
            dir: dir.to_path_buf(),
            opts,
            segments,
            active: Arc::from(active),
            active_path,
            active_first_lsn: next_lsn,
            write_offset,
            buf: Vec::with_capacity(1 << 20),
            buf_first_lsn: next_lsn,
            buf_records: 0,
            next_lsn,
            poisoned,
            stats,
        };
        wal.assert_invariants();
        Ok((wal, report))
    }

    /// The LSN the next append gets.
    pub fn next_lsn(&self) -> u64 {
        self.next_lsn
    }

    /// The options the WAL was opened with.
    pub fn options(&self) -> &WalOptions {
        &self.opts
    }

    /// A handle on the segment set (for removal and listing).
    pub fn segments(&self) -> Segments {
        self.segments.clone()
    }

    /// The WAL's counters.
    pub fn stats(&self) -> Arc<WalStats> {
        self.stats.clone()
    }

    /// The WAL directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Asserts the invariants of the type's doc that need no I/O (cheap:
    /// field arithmetic, plus the segment list unless `per_record`).
    fn assert_invariants_with(&self, per_record: bool) {
        let buf_bytes = self.buf.len() as u64;
        assert!(
            self.write_offset >= SEGMENT_HEADER_BYTES,
            "write offset {} inside the header",
            self.write_offset
        );
        assert!(
            self.write_offset + buf_bytes <= self.opts.segment_bytes_max,
            "write offset {} + {buf_bytes} buffered bytes pass segment_bytes_max {}",
            self.write_offset,
            self.opts.segment_bytes_max
        );
        assert!(
            self.active_first_lsn <= self.buf_first_lsn && self.buf_first_lsn <= self.next_lsn,
            "LSNs out of order: active segment from {}, buffer from {}, next {}",
            self.active_first_lsn,
            self.buf_first_lsn,
            self.next_lsn
        );
        let buffered = self.next_lsn - self.buf_first_lsn;
        assert_eq!(
            self.buf.is_empty(),
            buffered == 0,
            "{buf_bytes} buffered bytes for {buffered} records"
        );
        assert!(
            buf_bytes >= buffered * (RECORD_HEADER_BYTES as u64 + 1),
            "{buffered} buffered records cannot fit {buf_bytes} bytes"
        );
        assert!(buffered <= self.buf_records, "the batch holds every buffered record");
        if per_record {
            return;
        }
        let list = self.segments.list.lock().unwrap();
        let active = list.last().expect("the active segment is listed");
        assert_eq!(
            (active.first_lsn, &active.path),
            (self.active_first_lsn, &self.active_path),
            "the last listed segment is the active one"
        );
        assert!(
            list.windows(2).all(|w| w[0].first_lsn < w[1].first_lsn),
            "segments sorted by first LSN"
        );
    }

    /// [`Wal::assert_invariants_with`] in full.
    fn assert_invariants(&self) {
        self.assert_invariants_with(false);
    }

    fn check_poisoned(&self) -> Result<()> {
        self.poisoned.check()
    }

    /// Records an I/O failure: from now on the WAL refuses everything.
    fn poison(&mut self, err: Error) -> Error {
        self.poisoned.set(err)
    }

    /// Appends a record whose payload `encode` writes into the batch buffer.
    /// The record is not durable until [`Wal::commit`] returns Ok.
    pub fn append_with(&mut self, kind: RecordType, encode: impl FnOnce(&mut Vec<u8>)) -> Result<u64> {
        self.check_poisoned()?;
        let start = self.buf.len();
        let lsn = self.next_lsn;
        let n = encode_with(&mut self.buf, lsn, kind, encode);
        let payload = n - RECORD_HEADER_BYTES;
        if payload > self.opts.record_bytes_max as usize {
            self.buf.truncate(start);
            return Err(Error::RecordTooLarge {
                bytes: payload,
                limit: self.opts.record_bytes_max,
            });
        }
        if payload == 0 {
            self.buf.truncate(start);
            return Err(Error::EmptyRecord);
        }
        let end = self.write_offset + self.buf.len() as u64;
        let segment_has_records = self.write_offset + start as u64 > SEGMENT_HEADER_BYTES;
        if end > self.opts.segment_bytes_max && segment_has_records {
            // A record never spans segments: finish this one without it.
            if let Err(e) = self.roll(start) {
                return Err(self.poison(e));
            }
        }
        // LSN continuity: this record is the one after the previous.
        assert_eq!(lsn, self.next_lsn, "a roll does not change the next LSN");
        self.next_lsn = lsn + 1;
        self.buf_records += 1;
        self.assert_invariants_with(true);
        Ok(lsn)
    }

    /// Appends a record with a ready payload.
    pub fn append(&mut self, kind: RecordType, payload: &[u8]) -> Result<u64> {
        self.append_with(kind, |b| b.extend_from_slice(payload))
    }

    /// Writes `buf[..keep_from]` to the active segment, fdatasyncs it, and
    /// starts a new segment holding `buf[keep_from..]` (one pending record).
    fn roll(&mut self, keep_from: usize) -> Result<()> {
        self.active
            .write_all_at(&self.buf[..keep_from], self.write_offset)
            .map_err(Error::io("write", &self.active_path))?;
        self.poisoned.sync(self.active.as_ref(), &self.active_path)?;
        let sealed_bytes = self.write_offset + keep_from as u64;
        // The sealed segment holds [active_first_lsn, next_lsn) (the record
        // being appended, at buf[keep_from..], is not counted yet); the new
        // one starts right after it, so the two meet.
        assert!(
            self.next_lsn > self.active_first_lsn,
            "a segment is rolled only once it holds a record"
        );
        let (file, path) = create_segment(self.fs.as_ref(), &self.dir, self.next_lsn)?;
        {
            let mut list = self.segments.list.lock().unwrap();
            if let Some(last) = list.last_mut() {
                last.bytes = sealed_bytes;
            }
            list.push(SegmentInfo {
                first_lsn: self.next_lsn,
                path: path.clone(),
                bytes: SEGMENT_HEADER_BYTES,
            });
        }
        self.active = Arc::from(file);
        self.active_path = path;
        self.active_first_lsn = self.next_lsn;
        self.buf_first_lsn = self.next_lsn;
        self.write_offset = SEGMENT_HEADER_BYTES;
        self.buf.drain(..keep_from);
        self.stats.rolls.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Writes every pending record with one write and makes it durable with
    /// one fdatasync. On error the WAL is poisoned.
    ///
    /// Why no retry: after a failed fsync Linux may mark the dirty pages clean
    /// and report success to the next fsync though the data never reached the
    /// disk (PostgreSQL's "fsyncgate"). The only safe answer is to fail every
    /// waiter of this batch, accept nothing more, and let the restart's
    /// recovery decide from what is really on disk.
    pub fn commit(&mut self) -> Result<CommitInfo> {
        self.write_batch()?.sync()
    }

    /// The first half of [`Wal::commit`]: writes every pending record with
    /// one write (page cache, not durable) and returns the batch for
    /// [`Unsynced::sync`]. The next batch may be staged and written while
    /// this one syncs; an fdatasync covers everything written before it, so
    /// syncing batches in order acknowledges nothing early. On a write error
    /// the WAL is poisoned.
    pub fn write_batch(&mut self) -> Result<Unsynced> {
        self.check_poisoned()?;
        let bytes = self.buf.len() as u64;
        if self.buf_records > 0 {
            if let Err(e) = self.active.write_all_at(&self.buf, self.write_offset) {
                return Err(self.poison(Error::io("write", &self.active_path)(e)));
            }
            crate::crash_point!("wal::commit::after_write");
            self.write_offset += bytes;
            if let Some(last) = self.segments.list.lock().unwrap().last_mut() {
                last.bytes = self.write_offset;
            }
        }
        let records = std::mem::take(&mut self.buf_records);
        self.buf.clear();
        self.buf_first_lsn = self.next_lsn;
        self.assert_invariants();
        debug_assert!(
            self.active.len().is_ok_and(|len| len >= self.write_offset),
            "the active segment is at least write_offset {} long",
            self.write_offset
        );
        Ok(Unsynced {
            file: self.active.clone(),
            path: self.active_path.clone(),
            records,
            bytes,
            durable_lsn_end: self.next_lsn,
            poisoned: self.poisoned.clone(),
            stats: self.stats.clone(),
        })
    }
}
