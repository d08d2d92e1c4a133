//! Reading the WAL without writing it: [`read_from`] (every record from an
//! LSN on, for replay), [`verify`] (every segment scanned, damage reported,
//! for `logd wal verify`) and [`salvage`] (every readable record around
//! damage).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::fs::{Fs, OpenMode};
use crate::log::list_segments;
use crate::segment::{Damage, RecordRef, SegmentScan, scan_segment};

/// What a full read of the WAL saw.
#[derive(Debug, Clone, Default)]
pub struct ReadSummary {
    /// Per segment, oldest first.
    pub segments: Vec<SegmentScan>,
    /// Records passed to the visitor.
    pub records_visited: u64,
    /// Bytes of payload passed to the visitor.
    pub payload_bytes_visited: u64,
}

/// A segment that is not the last may end early: damage with no valid record
/// after it, where the next segment starts exactly at the LSN the valid
/// records end at (no LSN is missing). Such a tail was never acknowledged
/// (e.g. a preallocated or torn tail of a segment a crashed process left
/// behind) and is reported as [`Damage::Torn`]; any other damage in it stays
/// corruption.
fn settle_early_end(scan: &mut SegmentScan, next_first_lsn: u64) {
    if let Some(Damage::Corrupt {
        offset,
        why,
        resume_offset: None,
        ..
    }) = &scan.damage
        && scan.next_lsn == next_first_lsn
    {
        scan.damage = Some(Damage::Torn {
            offset: *offset,
            bytes: scan.file_len - offset,
            why: why.clone(),
        });
    }
}

/// Reads every record with LSN >= `from_lsn`, in LSN order, with bounded
/// memory. Damage anywhere but the tail of the last segment (or an early
/// end of an older segment that the next one continues, see the crate docs)
/// is an error; a torn tail of the last segment ends the read (it is
/// reported in the summary; [`crate::Wal::open`] truncates it).
///
/// It reads through the page cache: open the WAL first ([`crate::Wal::open`]
/// syncs every segment and drops its cached pages), or read after
/// [`verify`], so what is read is what the disk holds.
pub fn read_from(
    fs: &dyn Fs,
    dir: &Path,
    from_lsn: u64,
    record_bytes_max: u32,
    mut visit: impl FnMut(RecordRef<'_>) -> Result<()>,
) -> Result<ReadSummary> {
    let (segs, _) = list_segments(fs, dir)?;
    let mut summary = ReadSummary::default();
    let mut expected: Option<u64> = None;
    for (i, (first_lsn, path)) in segs.iter().enumerate() {
        let is_last = i + 1 == segs.len();
        if let Some(next) = segs.get(i + 1)
            && next.0 <= from_lsn
        {
            continue; // every record here is below from_lsn
        }
        if let Some(exp) = expected
            && exp != *first_lsn
        {
            return Err(Error::Gap {
                segment: path.clone(),
                expected: exp,
                found: *first_lsn,
            });
        }
        let file = fs.open(path, OpenMode::Read).map_err(Error::io("open", path))?;
        let mut scan = scan_segment(path, file.as_ref(), is_last, record_bytes_max, from_lsn, |r| {
            summary.records_visited += 1;
            summary.payload_bytes_visited += r.payload.len() as u64;
            visit(r)
        })?;
        if let Some(next) = segs.get(i + 1) {
            settle_early_end(&mut scan, next.0);
        }
        if let Some(err) = scan.corruption() {
            return Err(err);
        }
        expected = Some(scan.next_lsn);
        summary.segments.push(scan);
    }
    Ok(summary)
}

/// Scans every segment without stopping at damage (for `logd wal verify`
/// and `logd recover --dry-run`). Each segment is fdatasynced and its cached
/// pages dropped first, so the scan sees what the disk holds; nothing else
/// changes.
pub fn verify(fs: &dyn Fs, dir: &Path, record_bytes_max: u32) -> Result<Vec<SegmentScan>> {
    let (segs, _) = list_segments(fs, dir)?;
    let mut out = Vec::with_capacity(segs.len());
    for (i, (_, path)) in segs.iter().enumerate() {
        let file = fs.open(path, OpenMode::Read).map_err(Error::io("open", path))?;
        file.sync_and_drop_cache()
            .map_err(Error::io("fdatasync and drop cache", path))?;
        let mut scan = scan_segment(
            path,
            file.as_ref(),
            i + 1 == segs.len(),
            record_bytes_max,
            u64::MAX,
            |_| Ok(()),
        )?;
        if let Some(next) = segs.get(i + 1) {
            settle_early_end(&mut scan, next.0);
        }
        out.push(scan);
    }
    Ok(out)
}

/// What [`salvage`] read and skipped.
#[derive(Debug, Clone, Default)]
pub struct SalvageReport {
    /// Segments read.
    pub segments: usize,
    /// Valid records passed to the visitor.
    pub records: u64,
    /// Damaged ranges skipped.
    pub lost: Vec<crate::segment::LostRange>,
    /// Segments whose header could not be read at all (skipped whole).
    pub unreadable_segments: Vec<(PathBuf, String)>,
    /// LSN after the highest valid record (where a fresh WAL must start).
    pub next_lsn: u64,
}

/// Reads every valid record of every segment, skipping damage (for
/// `logd recover --salvage`); changes nothing on disk. LSNs may jump where
/// records were lost.
pub fn salvage(
    fs: &dyn Fs,
    dir: &Path,
    record_bytes_max: u32,
    mut visit: impl FnMut(RecordRef<'_>) -> Result<()>,
) -> Result<SalvageReport> {
    let (segs, _) = list_segments(fs, dir)?;
    let mut report = SalvageReport {
        next_lsn: 1,
        ..SalvageReport::default()
    };
    for (first_lsn, path) in &segs {
        let file = fs.open(path, OpenMode::Read).map_err(Error::io("open", path))?;
        file.sync_and_drop_cache()
            .map_err(Error::io("fdatasync and drop cache", path))?;
        let mut records = 0;
        match crate::segment::salvage_segment(path, file.as_ref(), record_bytes_max, |r| {
            records += 1;
            visit(r)
        }) {
            Ok((lost, next)) => {
                report.lost.extend(lost);
                report.next_lsn = report.next_lsn.max(next);
            }
            Err(Error::BadHeader { why, .. }) => {
                report.unreadable_segments.push((path.clone(), why));
                report.next_lsn = report.next_lsn.max(*first_lsn);
            }
            Err(e) => return Err(e),
        }
        report.records += records;
        report.segments += 1;
    }
    Ok(report)
}
