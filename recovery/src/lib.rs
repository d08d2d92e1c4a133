//! The recovery pass: what logd runs on every start and what `logd recover`
//! runs offline, so both repair a crashed state directory the same way.
//!
//! The pass, in this order (each step is safe to repeat after a crash in it):
//! 1. Open the WAL, reading every segment from the disk (fdatasync, then
//!    drop its cached pages): a torn tail of the last segment (a partial
//!    write from a crash) is truncated; corruption (a bad record followed by
//!    valid ones) stops the pass with an error naming segment and offset; a
//!    fresh segment takes this process's appends.
//! 2. `Materializer::prepare`: bring session files to their checkpoints and
//!    finish interrupted file steps (the service decides what those are).
//! 3. Stream every WAL record, oldest first, with bounded memory, through
//!    `Materializer::apply`, which must be idempotent by (session, seq): a
//!    record the session's files already hold is skipped, so checkpoints only
//!    say where to start, never what is true.
//! 4. `Materializer::finish`: fsync what was written and persist checkpoints.
//! 5. Delete WAL segments that are now fully materialized.
//!
//! Only after the pass returns may the service accept frames or hand events
//! to the Redis mirror.

mod open_meta;
mod pass;
mod replay;

pub use open_meta::{OpenMetaError, open_meta, open_meta_read_only, panic_expected};
pub use pass::{Pass, PassError, PassOptions, run_pass};
pub use replay::{LifecycleRepair, ReplayError, Replayer, SessionReplay};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wal::fs::Fs;
use wal::{OpenReport, Wal, WalOptions};

/// What a pass can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The WAL could not be opened or read (corruption included).
    #[error(transparent)]
    Wal(#[from] wal::Error),
    /// The materializer failed on a record or while finishing.
    #[error("recovery: materializing LSN {lsn}: {source}")]
    Materialize {
        /// The record's LSN (0 when finishing).
        lsn: u64,
        /// What failed.
        #[source]
        source: ReplayError,
    },
}

impl Error {
    /// True iff the failure is damage needing an operator (exit code 2).
    pub fn is_integrity(&self) -> bool {
        match self {
            Error::Wal(e) => e.is_integrity(),
            Error::Materialize { .. } => false,
        }
    }
}

/// What applying one record did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The record was written to its session's file.
    Written,
    /// The session's files already held it.
    Skipped,
}

/// The service side of recovery: how records become file contents.
pub trait Materializer {
    /// Brings files to their checkpoints and finishes interrupted steps.
    fn prepare(&mut self) -> Result<(), ReplayError>;
    /// Applies one record, idempotently by (session, seq).
    fn apply(&mut self, lsn: u64, payload: &[u8]) -> Result<Applied, ReplayError>;
    /// Makes everything applied durable and persists checkpoints.
    fn finish(&mut self) -> Result<(), ReplayError>;
}

/// Progress of a running pass, for a progress bar.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// WAL payload bytes read so far.
    pub bytes_read: u64,
    /// Bytes of all segments.
    pub bytes_total: u64,
    /// Records read so far.
    pub records: u64,
}

/// What a pass did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// What opening the WAL found (torn tail, leftover temp files).
    pub open: OpenReport,
    /// Segments read.
    pub segments_scanned: usize,
    /// Records read from the WAL.
    pub records_read: u64,
    /// Records written to session files.
    pub records_replayed: u64,
    /// Records the files already held.
    pub records_skipped: u64,
    /// WAL payload bytes read.
    pub bytes_read: u64,
    /// Segments deleted at the end.
    pub segments_removed: usize,
    /// Wall time of the pass.
    pub elapsed: Duration,
    /// Salvage only: damaged ranges whose records are lost.
    pub lost: Vec<wal::LostRange>,
    /// Salvage only: where the damaged WAL was moved (never deleted).
    pub moved_aside_to: Option<PathBuf>,
}

/// Runs the pass on the WAL in `wal_dir`; returns the open WAL, ready for
/// appends, and the report.
pub fn run(
    fs: Arc<dyn Fs>,
    wal_dir: &Path,
    opts: WalOptions,
    materializer: &mut dyn Materializer,
    mut progress: impl FnMut(Progress),
) -> Result<(Wal, Report), Error> {
    let started = Instant::now();
    let (wal, open) = Wal::open(fs.clone(), wal_dir, opts)?;
    let bytes_total = wal.segments().disk_bytes();
    materializer
        .prepare()
        .map_err(|source| Error::Materialize { lsn: 0, source })?;
    let mut report = Report {
        open,
        ..Report::default()
    };
    let summary = replay(
        fs.as_ref(),
        wal_dir,
        opts,
        materializer,
        &mut report,
        bytes_total,
        &mut progress,
    )?;
    report.segments_scanned = summary.segments.len();
    materializer
        .finish()
        .map_err(|source| Error::Materialize { lsn: 0, source })?;
    report.segments_removed = wal.segments().remove_before(wal.next_lsn())?;
    report.elapsed = started.elapsed();
    Ok((wal, report))
}

/// Reports what [`run`] would do and changes nothing: the WAL is verified
/// (a torn tail is reported in `open.torn_tail`, not truncated) and every
/// record is offered to `materializer`, which must be in a read-only mode.
pub fn dry_run(
    fs: Arc<dyn Fs>,
    wal_dir: &Path,
    opts: WalOptions,
    materializer: &mut dyn Materializer,
    mut progress: impl FnMut(Progress),
) -> Result<Report, Error> {
    let started = Instant::now();
    let mut report = Report::default();
    if !fs.exists(wal_dir) {
        report.elapsed = started.elapsed();
        return Ok(report);
    }
    let scans = wal::verify(fs.as_ref(), wal_dir, opts.record_bytes_max)?;
    for scan in &scans {
        if let Some(err) = scan.corruption() {
            return Err(err.into());
        }
        if let Some(wal::Damage::Torn { offset, bytes, why }) = &scan.damage {
            report.open.torn_tail = Some(wal::TornTail {
                segment: scan.path.clone(),
                offset: *offset,
                bytes: *bytes,
                why: why.to_string(),
            });
        }
    }
    report.open.segments = scans.len();
    report.open.first_lsn = scans.first().map_or(1, |s| s.first_lsn);
    report.open.next_lsn = scans.last().map_or(1, |s| s.next_lsn);
    let bytes_total = scans.iter().map(|s| s.valid_end).sum();
    materializer
        .prepare()
        .map_err(|source| Error::Materialize { lsn: 0, source })?;
    let summary = replay(
        fs.as_ref(),
        wal_dir,
        opts,
        materializer,
        &mut report,
        bytes_total,
        &mut progress,
    )?;
    report.segments_scanned = summary.segments.len();
    // `run` starts a fresh segment and removes every older one; the fresh one
    // replaces the last segment when that holds no record (same name).
    let last_replaced = scans.last().is_some_and(|s| s.next_lsn == s.first_lsn);
    report.segments_removed = scans.len() - usize::from(last_replaced);
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Like [`run`], but on corruption keeps every readable record: each is
/// materialized, then the whole damaged WAL directory is moved aside (never
/// deleted) and a fresh WAL starts after the highest LSN seen. The report's
/// `lost` lists exactly which byte ranges and LSNs could not be read.
pub fn salvage(
    fs: Arc<dyn Fs>,
    wal_dir: &Path,
    opts: WalOptions,
    materializer: &mut dyn Materializer,
    mut progress: impl FnMut(Progress),
) -> Result<(Wal, Report), Error> {
    match run(fs.clone(), wal_dir, opts, materializer, &mut progress) {
        Err(e) if e.is_integrity() => {}
        other => return other,
    }
    let started = Instant::now();
    let (mut report, salvaged) = salvage_records(fs.as_ref(), wal_dir, opts, materializer)?;
    materializer
        .finish()
        .map_err(|source| Error::Materialize { lsn: 0, source })?;
    let aside = aside_path(wal_dir);
    let io = |op: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| wal::Error::Io { op, path, source }
    };
    fs.rename(wal_dir, &aside).map_err(io("rename", wal_dir))?;
    if let Some(parent) = wal_dir.parent() {
        fs.sync_dir(parent).map_err(io("fsync dir", parent))?;
    }
    let (wal, open) = Wal::open_at(fs, wal_dir, opts, salvaged.next_lsn)?;
    report.open = open;
    report.segments_scanned = salvaged.segments;
    report.lost = salvaged.lost;
    report.moved_aside_to = Some(aside);
    report.elapsed = started.elapsed();
    progress(Progress {
        bytes_read: report.bytes_read,
        bytes_total: report.bytes_read,
        records: report.records_read,
    });
    Ok((wal, report))
}

/// Reports what [`salvage`] would do and changes nothing: without
/// corruption, exactly [`dry_run`]; with it, every readable record is
/// offered to `materializer` (which must be in a read-only mode) and the
/// damaged ranges are reported in `lost`. `moved_aside_to` is where the
/// damaged WAL would go.
pub fn salvage_dry_run(
    fs: Arc<dyn Fs>,
    wal_dir: &Path,
    opts: WalOptions,
    materializer: &mut dyn Materializer,
    mut progress: impl FnMut(Progress),
) -> Result<Report, Error> {
    match dry_run(fs.clone(), wal_dir, opts, materializer, &mut progress) {
        Err(e) if e.is_integrity() => {}
        other => return other,
    }
    let started = Instant::now();
    let (mut report, salvaged) = salvage_records(fs.as_ref(), wal_dir, opts, materializer)?;
    report.segments_scanned = salvaged.segments;
    report.lost = salvaged.lost;
    report.moved_aside_to = Some(aside_path(wal_dir));
    report.elapsed = started.elapsed();
    progress(Progress {
        bytes_read: report.bytes_read,
        bytes_total: report.bytes_read,
        records: report.records_read,
    });
    Ok(report)
}

/// The part of [`salvage`] and [`salvage_dry_run`] that reads: every
/// readable record around the damage goes through `materializer`.
fn salvage_records(
    fs: &dyn Fs,
    wal_dir: &Path,
    opts: WalOptions,
    materializer: &mut dyn Materializer,
) -> Result<(Report, wal::SalvageReport), Error> {
    materializer
        .prepare()
        .map_err(|source| Error::Materialize { lsn: 0, source })?;
    let mut report = Report::default();
    let mut failure = None;
    let salvaged = wal::salvage(fs, wal_dir, opts.record_bytes_max, |rec| {
        if let Err(source) = count(materializer.apply(rec.lsn, rec.payload), &mut report, rec.payload.len()) {
            failure = Some(Error::Materialize { lsn: rec.lsn, source });
            return Err(wal::Error::Closed);
        }
        Ok(())
    });
    if let Some(err) = failure {
        return Err(err);
    }
    Ok((report, salvaged?))
}

/// Where salvage moves a damaged WAL directory: `<wal>.salvaged-<unix s>`.
fn aside_path(wal_dir: &Path) -> PathBuf {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let name = format!(
        "{}.salvaged-{stamp}",
        wal_dir.file_name().and_then(|n| n.to_str()).unwrap_or("wal")
    );
    wal_dir.with_file_name(name)
}

fn count(applied: Result<Applied, ReplayError>, report: &mut Report, bytes: usize) -> Result<(), ReplayError> {
    match applied? {
        Applied::Written => report.records_replayed += 1,
        Applied::Skipped => report.records_skipped += 1,
    }
    report.records_read += 1;
    report.bytes_read += bytes as u64;
    Ok(())
}

/// Streams every record through the materializer, counting into `report`.
fn replay(
    fs: &dyn Fs,
    wal_dir: &Path,
    opts: WalOptions,
    materializer: &mut dyn Materializer,
    report: &mut Report,
    bytes_total: u64,
    progress: &mut dyn FnMut(Progress),
) -> Result<wal::ReadSummary, Error> {
    let mut failure = None;
    let summary = wal::read_from(fs, wal_dir, 0, opts.record_bytes_max, |rec| {
        if let Err(source) = count(materializer.apply(rec.lsn, rec.payload), report, rec.payload.len()) {
            failure = Some(Error::Materialize { lsn: rec.lsn, source });
            return Err(wal::Error::Closed);
        }
        if report.records_read.is_multiple_of(4096) {
            progress(Progress {
                bytes_read: report.bytes_read,
                bytes_total,
                records: report.records_read,
            });
        }
        Ok(())
    });
    if let Some(err) = failure {
        return Err(err);
    }
    let summary = summary?;
    progress(Progress {
        bytes_read: report.bytes_read,
        bytes_total,
        records: report.records_read,
    });
    Ok(summary)
}
