//! Rotation and compression steps, synchronous and through [`Fs`] so the
//! writers, the recovery pass and the power-loss simulation share them.
//!
//! Rotation of `<session>.logtmp` (the writer task drives it):
//! 1. fdatasync the `.logtmp` (its checkpoint covers every line);
//! 2. record a [`Rotation`] in the metadata store, flushed: from here a
//!    crash is finished by recovery;
//! 3. rename to `<session>.<UTC yyyymmddTHHMMSSZ>.<first_seq>-<last_seq>.log`
//!    and fsync the directory ([`rename_step`], idempotent);
//! 4. in one atomic batch, flushed: clear the record, start the checkpoint
//!    of the next `.logtmp` at 0, queue the compression job and record the
//!    `rotated` event.
//!
//! Compression of a rotated `.log` (the compression pool drives it):
//! 1. gzip into `<name>.gz.tmp`, fdatasync, rename to `<name>.gz`, fsync the
//!    directory ([`compress_step`]): a `.gz` exists only complete;
//! 2. unlink the `.log` and fsync the directory ([`remove_source`]);
//! 3. in one atomic batch, flushed: clear the job and record the
//!    `compressed` event.
//!
//! # Events are recorded once
//! An event enters the outbox only in the batch that also clears its file's
//! record (the rotation record, the compression job), after the file change
//! it announces is durable. Redoing a step after a crash therefore records
//! its event once, and a step whose record is gone is never run again (it
//! was finished). The mirror may still resend an event whose `XADD` was
//! not confirmed when the process died (same `event_id`).
//!
//! Names sort by time and never collide: the seq range is in the name.

use std::io::{self, Write};
use std::path::Path;

use serde::Deserialize;
use wal::fs::{Fs, FsFile, OpenMode};

use crate::events::{Event, EventKind, RotateReason, event_id, now_ms};
use crate::line::line_seq;
use crate::meta::{MetaStore, checkpoint_op, compress_op, event_op, rotation_op};
use crate::names::{LOGTMP_SUFFIX, rotated_name};
use crate::records::{Checkpoint, CompressJob, FileStats, Rotation};

fn line_time(line: &[u8]) -> String {
    #[derive(Deserialize)]
    struct T {
        time: String,
    }
    serde_json::from_slice::<T>(line).map(|t| t.time).unwrap_or_default()
}

/// Reads a session file once: seq range, line count, times and checksum.
pub fn file_stats(fs: &dyn Fs, path: &Path) -> io::Result<FileStats> {
    let file = fs.open(path, OpenMode::Read)?;
    let len = file.len()?;
    let mut stats = FileStats {
        bytes: len,
        ..FileStats::default()
    };
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut carry: Vec<u8> = Vec::new();
    let mut last_line: Vec<u8> = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        let n = ((len - pos) as usize).min(buf.len());
        file.read_exact_at(&mut buf[..n], pos)?;
        crc.update(&buf[..n]);
        pos += n as u64;
        carry.extend_from_slice(&buf[..n]);
        let mut at = 0;
        while let Some(nl) = carry[at..].iter().position(|&b| b == b'\n') {
            let line = &carry[at..at + nl];
            if stats.frames == 0 {
                stats.first_seq = line_seq(line).unwrap_or(0);
                stats.first_time = line_time(line);
            }
            stats.frames += 1;
            last_line.clear();
            last_line.extend_from_slice(line);
            at += nl + 1;
        }
        carry.drain(..at);
    }
    stats.last_seq = line_seq(&last_line).unwrap_or(0);
    stats.last_time = line_time(&last_line);
    stats.crc32 = crc.finalize();
    Ok(stats)
}

/// Renames the session's `.logtmp` to `rot.to` and fsyncs the directory.
/// Idempotent: if the rename already happened, only the fsync is repeated.
pub fn rename_step(fs: &dyn Fs, log_dir: &Path, rot: &Rotation) -> io::Result<()> {
    let from = log_dir.join(format!("{}{LOGTMP_SUFFIX}", rot.session));
    let to = log_dir.join(&rot.to);
    if !fs.exists(&to) {
        if !fs.exists(&from) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "rotation of {}: neither {} nor {} exists",
                    rot.session,
                    from.display(),
                    to.display()
                ),
            ));
        }
        fs.rename(&from, &to)?;
        wal::crash_point!("rotate::after_rename");
    }
    fs.sync_dir(log_dir)
}

/// Writes to an [`FsFile`] at increasing offsets (for the gzip encoder).
struct FsWriter<'a> {
    file: &'a dyn FsFile,
    offset: u64,
    buf: Vec<u8>,
}

impl Write for FsWriter<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= 1 << 20 {
            self.flush()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.file.write_all_at(&self.buf, self.offset)?;
            self.offset += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }
}

/// A finished `.log.gz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compressed {
    /// Bytes of the source `.log`.
    pub bytes_in: u64,
    /// Bytes of the `.log.gz`.
    pub bytes_out: u64,
    /// crc32 of the `.log.gz` bytes.
    pub crc32: u32,
}

/// Makes `<name>.gz` from the rotated `name` (step 1 of compression).
/// Idempotent: an existing `.gz` is complete (it appears only by rename
/// after fdatasync) and is reused; a leftover `.gz.tmp` is removed and
/// created anew (`O_EXCL`).
pub fn compress_step(fs: &dyn Fs, log_dir: &Path, name: &str, level: u32) -> io::Result<Compressed> {
    let src = log_dir.join(name);
    let gz = log_dir.join(format!("{name}.gz"));
    let tmp = log_dir.join(format!("{name}.gz.tmp"));
    if fs.exists(&gz) {
        let bytes_in = if fs.exists(&src) {
            fs.open(&src, OpenMode::Read)?.len()?
        } else {
            0
        };
        let (bytes_out, crc32) = checksum(fs, &gz)?;
        return Ok(Compressed {
            bytes_in,
            bytes_out,
            crc32,
        });
    }
    let input = fs.open(&src, OpenMode::Read)?;
    let bytes_in = input.len()?;
    // A leftover `.gz.tmp` (a crash mid-compression) is removed, never
    // opened: whatever is at that name (even a symbolic link) is not
    // written through, and the new one is created exclusively.
    match fs.remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let out = fs.open(&tmp, OpenMode::CreateNew)?;
    wal::crash_point!("compress::after_tmp_open");
    let mut enc = flate2::write::GzEncoder::new(
        FsWriter {
            file: out.as_ref(),
            offset: 0,
            buf: Vec::new(),
        },
        flate2::Compression::new(level),
    );
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < bytes_in {
        let n = ((bytes_in - pos) as usize).min(buf.len());
        input.read_exact_at(&mut buf[..n], pos)?;
        enc.write_all(&buf[..n])?;
        pos += n as u64;
    }
    let mut w = enc.finish()?;
    w.flush()?;
    out.sync_data()?;
    drop(out);
    fs.rename(&tmp, &gz)?;
    fs.sync_dir(log_dir)?;
    let (bytes_out, crc32) = checksum(fs, &gz)?;
    Ok(Compressed {
        bytes_in,
        bytes_out,
        crc32,
    })
}

/// Unlinks the rotated `.log` once its `.gz` is durable (step 3).
pub fn remove_source(fs: &dyn Fs, log_dir: &Path, name: &str) -> io::Result<()> {
    let src = log_dir.join(name);
    if fs.exists(&src) {
        fs.remove_file(&src)?;
    }
    fs.sync_dir(log_dir)
}

/// Size and crc32 of a file.
pub fn checksum(fs: &dyn Fs, path: &Path) -> io::Result<(u64, u32)> {
    let f = fs.open(path, OpenMode::Read)?;
    let len = f.len()?;
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < len {
        let n = ((len - pos) as usize).min(buf.len());
        f.read_exact_at(&mut buf[..n], pos)?;
        crc.update(&buf[..n]);
        pos += n as u64;
    }
    Ok((len, crc.finalize()))
}

/// What the file lifecycle does besides rotating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Lifecycle {
    /// gzip level for rotated files; `None`: no compression.
    pub gzip_level: Option<u32>,
    /// Whether events go to the outbox (a Redis mirror is configured).
    pub events: bool,
}

/// Why a rotation or compression step failed: the file step's I/O, or the
/// metadata store. Every step is idempotent, so the caller may run it again
/// after a transient I/O error ([`StepError::io`] tells which).
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// A file or directory operation failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The metadata store failed.
    #[error(transparent)]
    Meta(#[from] crate::meta::MetaError),
}

impl StepError {
    /// The I/O error, when a file step failed (for the retry decision).
    pub fn io(&self) -> Option<&io::Error> {
        match self {
            StepError::Io(e) => Some(e),
            StepError::Meta(_) => None,
        }
    }
}

/// The `rotated` event of a rotation.
pub fn rotated_event(rot: &Rotation) -> Event {
    let s = &rot.stats;
    Event {
        event_id: event_id(EventKind::Rotated, &rot.session, s.first_seq, s.last_seq),
        instance: String::new(),
        kind: EventKind::Rotated,
        session_id: rot.session.clone(),
        path: rot.to.clone(),
        first_seq: s.first_seq,
        last_seq: s.last_seq,
        frames: s.frames,
        bytes: s.bytes,
        first_time: s.first_time.clone(),
        last_time: s.last_time.clone(),
        reason: rot.reason,
        compression: "none".into(),
        checksum: format!("crc32:{:08x}", s.crc32),
        timestamp_ms: now_ms(),
    }
}

/// The `compressed` event of a finished `.log.gz`.
pub fn compressed_event(rot: &Rotation, c: &Compressed) -> Event {
    Event {
        event_id: event_id(
            EventKind::Compressed,
            &rot.session,
            rot.stats.first_seq,
            rot.stats.last_seq,
        ),
        kind: EventKind::Compressed,
        path: format!("{}.gz", rot.to),
        bytes: c.bytes_out,
        compression: "gzip".into(),
        checksum: format!("crc32:{:08x}", c.crc32),
        ..rotated_event(rot)
    }
}

/// Steps 2-4 of a rotation of a `.logtmp` whose data is synced and whose
/// checkpoint is `ckpt`. Returns the rotation, or `None` for an empty file.
pub fn rotate_synced(
    fs: &dyn Fs,
    log_dir: &Path,
    meta: &dyn MetaStore,
    life: Lifecycle,
    session: &str,
    ckpt: Checkpoint,
    reason: RotateReason,
) -> Result<Option<Rotation>, StepError> {
    if ckpt.offset == 0 {
        return Ok(None);
    }
    let path = log_dir.join(format!("{session}{LOGTMP_SUFFIX}"));
    let stats = file_stats(fs, &path)?;
    let rotated_at_ms = now_ms();
    let rot = Rotation {
        session: session.to_owned(),
        to: rotated_name(session, rotated_at_ms, stats.first_seq, stats.last_seq),
        stats,
        reason,
        rotated_at_ms,
    };
    // The `rotated` event is recorded with the step that finishes the
    // rotation (see `complete_rotation`), never before the rename.
    meta.apply(vec![checkpoint_op(session, &ckpt), rotation_op(session, Some(&rot))])?;
    meta.flush()?;
    wal::crash_point!("rotate::after_record");
    complete_rotation(fs, log_dir, meta, life, &rot)?;
    Ok(Some(rot))
}

/// Renames (if not yet done), fsyncs the directory, and in one atomic batch
/// clears the record, records the `rotated` event and queues the
/// compression: the session's next `.logtmp` starts at offset 0 with the
/// seq carried on. Idempotent, so recovery finishes an interrupted rotation
/// with it; the event is recorded once because it goes in the batch that
/// clears the record.
pub fn complete_rotation(
    fs: &dyn Fs,
    log_dir: &Path,
    meta: &dyn MetaStore,
    life: Lifecycle,
    rot: &Rotation,
) -> Result<(), StepError> {
    if meta.rotation(&rot.session)?.as_ref() != Some(rot) {
        // Finished before (its record is cleared in the batch that records
        // the event): never rename, queue or announce it twice.
        return Ok(());
    }
    rename_step(fs, log_dir, rot)?;
    wal::crash_point!("rotate::after_dir_fsync");
    let old = meta.checkpoint(&rot.session)?.unwrap_or_default();
    let next = Checkpoint {
        offset: 0,
        last_seq: old.last_seq.max(rot.stats.last_seq),
        last_lsn: old.last_lsn,
        opened_at_ms: 0,
    };
    let mut ops = vec![rotation_op(&rot.session, None), checkpoint_op(&rot.session, &next)];
    if life.gzip_level.is_some() {
        ops.push(compress_op(&rot.to, Some(&CompressJob::new(rot.clone()))));
    }
    if life.events {
        ops.push(event_op(meta.next_id()?, &rotated_event(rot)));
    }
    meta.apply(ops)?;
    // Durable before the `.log` can be compressed away or a new `.logtmp`
    // started: a record that survived a crash past either would make
    // recovery fail (neither file exists) or rename the new `.logtmp`.
    meta.flush()?;
    Ok(())
}

/// What [`run_compression`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionRun {
    /// No job for the file is in the store: it was finished before, and is
    /// not run (or announced) again.
    NoJob,
    /// The `.gz` is complete, the `.log` is gone, and the `compressed` event
    /// was recorded (when events are on) in the batch that cleared the job.
    Finished(Compressed),
}

/// Runs the compression job of the rotated file `name` to its end: `.gz`,
/// unlink of the `.log`, then the `compressed` event and the job's removal
/// in one atomic batch (flushed). The job is read from the store: one that
/// is gone was finished and is not run again. Every step before the batch
/// is idempotent, so a crash anywhere leaves either the job (redo, then
/// announce once) or the event (done). Callers must not run the same job
/// concurrently.
pub fn run_compression(
    fs: &dyn Fs,
    log_dir: &Path,
    meta: &dyn MetaStore,
    life: Lifecycle,
    name: &str,
) -> Result<CompressionRun, StepError> {
    let Some(job) = meta.compress_job(name)? else {
        return Ok(CompressionRun::NoJob);
    };
    let rot = &job.rotation;
    debug_assert_eq!(rot.to, name, "a job is stored under its file's name");
    let level = life.gzip_level.unwrap_or(1);
    let done = compress_step(fs, log_dir, name, level)?;
    wal::crash_point!("compress::after_gz");
    remove_source(fs, log_dir, name)?;
    wal::crash_point!("compress::after_unlink");
    let mut ops = vec![compress_op(name, None)];
    if life.events {
        ops.push(event_op(meta.next_id()?, &compressed_event(rot, &done)));
    }
    meta.apply(ops)?;
    meta.flush()?;
    wal::crash_point!("compress::after_event");
    Ok(CompressionRun::Finished(done))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::SimMeta;

    /// A rotated `.log` with two lines and its job in `meta`, as
    /// `complete_rotation` leaves them.
    fn rotated_file(dir: &Path, meta: &SimMeta, life: Lifecycle) -> Rotation {
        let fs = wal::fs::RealFs;
        std::fs::write(
            dir.join("s.logtmp"),
            "{\"seq\":1,\"time\":\"t\"}\n{\"seq\":2,\"time\":\"t\"}\n",
        )
        .unwrap();
        let ckpt = Checkpoint {
            offset: 40,
            last_seq: 2,
            last_lsn: 2,
            opened_at_ms: 1,
        };
        rotate_synced(&fs, dir, meta, life, "s", ckpt, RotateReason::Manual)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn a_failed_file_step_hands_its_io_error_to_the_retry_decision() {
        let dir = tempfile::tempdir().unwrap();
        let meta = SimMeta::new();
        let ckpt = Checkpoint {
            offset: 40,
            last_seq: 2,
            last_lsn: 2,
            opened_at_ms: 1,
        };
        // No `.logtmp` to read: the file step fails, the store is untouched.
        let e = rotate_synced(
            &wal::fs::RealFs,
            dir.path(),
            &meta,
            Lifecycle::default(),
            "s",
            ckpt,
            RotateReason::Size,
        )
        .unwrap_err();
        assert_eq!(e.io().map(io::Error::kind), Some(io::ErrorKind::NotFound), "{e}");
        assert!(meta.rotations().unwrap().is_empty());
    }

    fn events(meta: &SimMeta) -> Vec<String> {
        meta.outbox(usize::MAX)
            .unwrap()
            .into_iter()
            .map(|(_, e)| e.event_id)
            .collect()
    }

    const LIFE: Lifecycle = Lifecycle {
        gzip_level: Some(1),
        events: true,
    };

    #[test]
    fn a_compression_job_run_twice_compresses_and_announces_once() {
        let dir = tempfile::tempdir().unwrap();
        let meta = SimMeta::new();
        let rot = rotated_file(dir.path(), &meta, LIFE);
        let fs = wal::fs::RealFs;
        let first = run_compression(&fs, dir.path(), &meta, LIFE, &rot.to).unwrap();
        assert!(matches!(first, CompressionRun::Finished(_)), "{first:?}");
        let again = run_compression(&fs, dir.path(), &meta, LIFE, &rot.to).unwrap();
        assert_eq!(again, CompressionRun::NoJob);
        assert_eq!(events(&meta), ["rotated:s:1-2", "compressed:s:1-2"]);
        assert!(dir.path().join(format!("{}.gz", rot.to)).exists());
        assert!(!dir.path().join(&rot.to).exists());
    }

    #[test]
    fn a_crash_before_the_event_is_flushed_redoes_the_compression_and_announces_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let meta = SimMeta::new();
        let rot = rotated_file(dir.path(), &meta, LIFE);
        let fs = wal::fs::RealFs;
        let gz = dir.path().join(format!("{}.gz", rot.to));
        // Crash after the unlink: `.gz` there, `.log` gone, job still stored.
        compress_step(&fs, dir.path(), &rot.to, 1).unwrap();
        remove_source(&fs, dir.path(), &rot.to).unwrap();
        let redo = run_compression(&fs, dir.path(), &meta, LIFE, &rot.to).unwrap();
        assert!(matches!(redo, CompressionRun::Finished(_)), "{redo:?}");
        assert_eq!(events(&meta), ["rotated:s:1-2", "compressed:s:1-2"]);
        let (bytes, crc) = checksum(&fs, &gz).unwrap();
        let e = &meta.outbox(usize::MAX).unwrap()[1].1;
        assert_eq!((e.bytes, e.checksum.clone()), (bytes, format!("crc32:{crc:08x}")));
        assert!(meta.compress_jobs().unwrap().is_empty());
    }

    #[test]
    fn a_rotation_finished_twice_records_its_event_once_and_only_after_the_rename() {
        let dir = tempfile::tempdir().unwrap();
        let meta = SimMeta::new();
        let fs = wal::fs::RealFs;
        let rot = rotated_file(dir.path(), &meta, LIFE);
        complete_rotation(&fs, dir.path(), &meta, LIFE, &rot).unwrap();
        assert_eq!(events(&meta), ["rotated:s:1-2"]);
        assert!(meta.rotations().unwrap().is_empty());
    }
}
