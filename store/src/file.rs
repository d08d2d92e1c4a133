//! A session's live file (`<LOG_DIR>/<session>.logtmp`): append, write,
//! fdatasync → checkpoint, and the repair on open. Synchronous and
//! runtime-free, so the live writer tasks, the recovery pass and the
//! power-loss simulation all run the very same code.
//!
//! # Invariants
//! - A session file holds whole lines with strictly increasing seqs.
//! - `append` skips a frame whose seq the session already holds, so replaying
//!   the WAL any number of times never duplicates a line.
//! - A checkpoint is produced only after the bytes it covers were
//!   fdatasynced (and the file's directory entry, for a new file).
//! - Asserted: `synced_offset ≤ offset` (bytes are synced only once
//!   written), and a line new to the session comes from a later WAL record
//!   than any the session saw (LSNs grow with seqs).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use wal::fs::{Fs, FsFile, OpenMode};

use crate::line::{Line, line_seq};
use crate::names::logtmp_path;
use crate::pb::LogFrame;
use crate::records::Checkpoint;

/// The step of a session file's I/O that failed (what a writer does about
/// an error depends on it: see `writer::on_error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileOp {
    /// Opening or creating the file.
    Open,
    /// Writing lines (page cache).
    Write,
    /// `fdatasync` of the file.
    DataSync,
    /// Opening and fsyncing the directory (a new file's entry).
    DirSync,
}

impl std::fmt::Display for FileOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FileOp::Open => "open",
            FileOp::Write => "write",
            FileOp::DataSync => "fdatasync",
            FileOp::DirSync => "directory fsync",
        })
    }
}

/// A failed step of a session file's I/O.
#[derive(Debug, thiserror::Error)]
#[error("{op} of {path} failed: {source}")]
pub struct FileError {
    /// Which step.
    pub op: FileOp,
    /// The file (or, for [`FileOp::DirSync`], the directory).
    pub path: PathBuf,
    /// The OS error.
    #[source]
    pub source: io::Error,
}

impl From<FileError> for io::Error {
    fn from(e: FileError) -> io::Error {
        io::Error::new(e.source.kind(), e)
    }
}

/// Opens a session file, with the `session_file::open` failpoint
/// (`return(<errno>)`, e.g. `return(24)` for EMFILE) for fault injection.
fn open_session_file(fs: &dyn Fs, path: &Path, mode: OpenMode) -> io::Result<Box<dyn FsFile>> {
    injected_error("session_file::open")?;
    fs.open(path, mode)
}

/// Whether the file starts the way every file logd writes does (`{"seq":`,
/// or a prefix of it, or a zero byte where a write was lost in a crash).
fn starts_like_logd(file: &dyn FsFile) -> io::Result<bool> {
    const HEAD: &[u8] = b"{\"seq\":";
    let mut buf = [0u8; HEAD.len()];
    let n = file.read_at(&mut buf, 0)?;
    Ok(n == 0 || buf[0] == 0 || buf[..n] == HEAD[..n])
}

/// Why frames for `session` must be refused: its file's name in `log_dir`
/// holds a symbolic link or something that is not a regular file (logd never
/// writes through one). None when the name is free or a regular file.
pub fn session_file_refusal(log_dir: &Path, session: &str) -> Option<String> {
    let path = logtmp_path(log_dir, session);
    let m = std::fs::symlink_metadata(&path).ok()?;
    let what = if m.file_type().is_symlink() {
        "a symbolic link"
    } else if !m.is_file() {
        "not a regular file"
    } else {
        return None;
    };
    Some(format!(
        "session file {} is {what}: logd does not write through it (remove or rename it)",
        path.display()
    ))
}

/// Renames a foreign file found at a session's path to
/// `<name>.foreign-<unix ms>` (a rename never follows a symbolic link, so a
/// link's target is untouched) and fsyncs the directory. Returns the new
/// path.
pub fn move_aside(fs: &dyn Fs, dir: &Path, path: &Path) -> io::Result<PathBuf> {
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".foreign-{}", crate::events::now_ms()));
    let aside = PathBuf::from(aside);
    fs.rename(path, &aside)?;
    fs.sync_dir(dir)?;
    Ok(aside)
}

/// `Err(errno)` when the failpoint `name` is set to `return(<errno>)`.
#[cfg_attr(not(feature = "failpoints"), allow(unused_variables))]
fn injected_error(name: &str) -> io::Result<()> {
    fail::fail_point!(name, |errno: Option<String>| {
        let errno = errno.and_then(|e| e.parse().ok()).unwrap_or(libc::EIO);
        Err(io::Error::from_raw_os_error(errno))
    });
    Ok(())
}

/// What [`SessionFile::append_within`] did with a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    /// The line is pending.
    Written,
    /// The session already holds the seq.
    Skipped,
    /// The line would take the file past its size limit: nothing changed,
    /// and here is the line back.
    Full(Line),
}

/// What opening a session file had to repair.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenRepair {
    /// Bytes cut from the end (past the checkpoint, or a torn line).
    pub bytes_trimmed: u64,
    /// Whether the file had to be scanned line by line (no usable checkpoint).
    pub scanned: bool,
}

/// One session's live file, owned by exactly one writer.
pub struct SessionFile {
    fs: Arc<dyn Fs>,
    dir: PathBuf,
    path: PathBuf,
    /// None until the first line is written: a session without frames has
    /// no file.
    file: Option<Box<dyn FsFile>>,
    offset: u64,
    synced_offset: u64,
    last_seq: i64,
    last_lsn: u64,
    /// Lines appended and not yet written, in order. They are written
    /// straight from their own allocations (`pwritev`), not copied into one
    /// buffer first: with many sessions that copy of cold lines into cold
    /// buffers was the writers' largest cost, and the buffers' memory came
    /// on top of the lines'.
    pending: Vec<Line>,
    /// The bytes `pending` takes in the file.
    pending_bytes: usize,
    needs_dir_sync: bool,
    opened_at_ms: u64,
    moved_aside: Option<PathBuf>,
}

impl SessionFile {
    /// Opens the session's `.logtmp` and brings it to a consistent end; a
    /// missing file is created only when the first line is written. Bytes up to the checkpoint's offset were fdatasynced
    /// and are trusted; after it, whole valid lines with increasing seqs are
    /// kept (written but maybe not synced: they are acked frames, and replay
    /// skips them by seq) and the file is cut at the first torn, zeroed or
    /// out-of-order line. A checkpoint that is stale (lost flush) or past the
    /// end of the file never cuts good lines: the scan then starts earlier.
    pub fn open(
        fs: Arc<dyn Fs>,
        dir: &Path,
        session: &str,
        ckpt: Option<Checkpoint>,
    ) -> io::Result<(Self, OpenRepair)> {
        let path = logtmp_path(dir, session);
        let file = match open_session_file(fs.as_ref(), &path, OpenMode::ReadWrite) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok((SessionFile::absent(fs, dir, path, ckpt), OpenRepair::default()));
            }
            // A symbolic link, a FIFO, a directory…: never opened through.
            Err(e) if wal::fs::is_foreign_file_error(&e) => {
                let aside = move_aside(fs.as_ref(), dir, &path)?;
                let mut sf = SessionFile::absent(fs, dir, path, ckpt);
                sf.moved_aside = Some(aside);
                return Ok((sf, OpenRepair::default()));
            }
            Err(e) => return Err(e),
        };
        let len = file.len()?;
        let State {
            start,
            end,
            last_seq,
            last_lsn,
            mut repair,
        } = inspect(file.as_ref(), len, ckpt)?;
        if end == 0 && len > 0 && ckpt.is_none_or(|c| c.offset == 0) && !starts_like_logd(file.as_ref())? {
            // Not one line of it is logd's, nothing was checkpointed in it,
            // and it does not even start like logd's first write torn by a
            // crash (a prefix of `{"seq":`, or a hole of zeros): not logd's
            // file (an operator's, or planted). Never cut it.
            drop(file);
            let aside = move_aside(fs.as_ref(), dir, &path)?;
            let mut sf = SessionFile::absent(fs, dir, path, ckpt);
            sf.moved_aside = Some(aside);
            return Ok((sf, OpenRepair::default()));
        }
        if end < len {
            file.set_len(end)?;
            file.sync_data()?;
            repair.bytes_trimmed = len - end;
        }
        let sf = SessionFile {
            fs,
            dir: dir.to_path_buf(),
            path,
            file: Some(file),
            offset: end,
            synced_offset: start.min(end),
            last_seq,
            last_lsn,
            pending: Vec::new(),
            pending_bytes: 0,
            // Also for a file that exists: its directory entry may not be
            // durable yet (a process killed before the file's first sync, a
            // writer that failed), and a checkpoint must never outlive it.
            needs_dir_sync: true,
            opened_at_ms: match ckpt {
                Some(c) if c.opened_at_ms > 0 => c.opened_at_ms,
                _ => crate::events::now_ms(),
            },
            moved_aside: None,
        };
        Ok((sf, repair))
    }

    /// A session whose `.logtmp` does not exist (yet): no file until the
    /// first line is written; the seq continues from the checkpoint.
    fn absent(fs: Arc<dyn Fs>, dir: &Path, path: PathBuf, ckpt: Option<Checkpoint>) -> Self {
        SessionFile {
            fs,
            dir: dir.to_path_buf(),
            path,
            file: None,
            offset: 0,
            synced_offset: 0,
            last_seq: ckpt.map_or(0, |c| c.last_seq),
            last_lsn: ckpt.map_or(0, |c| c.last_lsn),
            pending: Vec::new(),
            pending_bytes: 0,
            needs_dir_sync: true,
            // Set when the file is created; until then the checkpoint stays
            // as it was (recovery passes are idempotent).
            opened_at_ms: ckpt.map_or(0, |c| c.opened_at_ms),
            moved_aside: None,
        }
    }

    /// Where a foreign file found at this session's path was moved (once):
    /// a symbolic link, a file that is not regular, or one holding no line
    /// of logd's without a checkpoint.
    pub fn take_moved_aside(&mut self) -> Option<PathBuf> {
        self.moved_aside.take()
    }

    /// Whether the file exists (a session without lines has none).
    pub fn exists(&self) -> bool {
        self.file.is_some()
    }

    /// What [`SessionFile::open`] would find, without changing anything:
    /// the highest seq the file holds and the bytes it would cut.
    pub fn probe(fs: &dyn Fs, dir: &Path, session: &str, ckpt: Option<Checkpoint>) -> io::Result<(i64, OpenRepair)> {
        let path = logtmp_path(dir, session);
        let file = match fs.open(&path, OpenMode::Read) {
            Ok(f) => f,
            // Missing, or foreign (it would be moved aside): no lines.
            Err(e) if e.kind() == io::ErrorKind::NotFound || wal::fs::is_foreign_file_error(&e) => {
                return Ok((ckpt.map_or(0, |c| c.last_seq), OpenRepair::default()));
            }
            Err(e) => return Err(e),
        };
        let len = file.len()?;
        let mut st = inspect(file.as_ref(), len, ckpt)?;
        st.repair.bytes_trimmed = len - st.end;
        Ok((st.last_seq, st.repair))
    }

    /// Highest seq the session's files hold (or will, once written).
    pub fn last_seq(&self) -> i64 {
        self.last_seq
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Puts `line` (of WAL record `lsn`) among the pending lines, unless the
    /// session already holds its seq. Returns whether it was new.
    pub fn append(&mut self, lsn: u64, line: Line) -> bool {
        if self.holds(lsn, line.seq) {
            return false;
        }
        self.push(lsn, line);
        true
    }

    /// Renders `frame` (taken from WAL record `lsn`) among the pending
    /// lines, unless the session already holds its seq. Returns whether it
    /// was new.
    pub fn append_frame(&mut self, lsn: u64, frame: &LogFrame) -> bool {
        if self.holds(lsn, frame.seq) {
            return false;
        }
        self.push(lsn, Line::of(frame));
        true
    }

    /// Replay starts at the WAL's oldest record, which may be older than
    /// the checkpoint: such records are skipped by seq.
    fn holds(&mut self, lsn: u64, seq: i64) -> bool {
        if seq <= self.last_seq {
            self.last_lsn = self.last_lsn.max(lsn);
            return true;
        }
        false
    }

    fn push(&mut self, lsn: u64, line: Line) {
        self.assert_lsn_grows(lsn);
        self.last_lsn = lsn;
        self.last_seq = line.seq;
        self.pending_bytes += line.len();
        self.pending.push(line);
    }

    /// Like [`SessionFile::append`], but keeps the file within `size_max`
    /// bytes: a new line that would take a non-empty file past it is not
    /// taken ([`Appended::Full`]: rotate, then append it to the next file).
    /// A line larger than `size_max` on its own goes into an empty file.
    pub fn append_within(&mut self, lsn: u64, line: Line, size_max: u64) -> Appended {
        if self.holds(lsn, line.seq) {
            return Appended::Skipped;
        }
        let size = self.size();
        if size > 0 && size + line.len() as u64 > size_max {
            return Appended::Full(line);
        }
        self.push(lsn, line);
        Appended::Written
    }

    /// Invariant: seqs and LSNs are assigned in the same order (the commit
    /// thread does both) and the WAL is read in LSN order, so a line new to
    /// the session comes from a later record than any the session saw.
    fn assert_lsn_grows(&self, lsn: u64) {
        debug_assert!(
            lsn > self.last_lsn,
            "session file {}: a new line from LSN {lsn} after LSN {}",
            self.path.display(),
            self.last_lsn
        );
    }

    /// Bytes written to the file (synced or not).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Bytes appended but not yet written.
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes
    }

    /// The file's size once the pending lines are written (what rotation
    /// by size and "is the file empty" look at).
    pub fn size(&self) -> u64 {
        self.offset + self.pending_bytes as u64
    }

    /// Writes the pending lines to the file (page cache; not yet durable),
    /// creating the file with its first line. On error nothing changed but
    /// maybe some bytes past the offset, which the next write overwrites.
    pub fn write_pending(&mut self) -> Result<(), FileError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let err = |op, source| FileError {
            op,
            path: self.path.clone(),
            source,
        };
        let file = match &mut self.file {
            Some(f) => f,
            none => {
                // Created exclusively: whatever appeared at the name since
                // the open (a planted link, a file) is moved aside first.
                let f = match open_session_file(self.fs.as_ref(), &self.path, OpenMode::CreateNew) {
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists || wal::fs::is_foreign_file_error(&e) => {
                        let aside =
                            move_aside(self.fs.as_ref(), &self.dir, &self.path).map_err(|e| err(FileOp::Open, e))?;
                        self.moved_aside = Some(aside);
                        open_session_file(self.fs.as_ref(), &self.path, OpenMode::CreateNew)
                    }
                    other => other,
                }
                .map_err(|e| err(FileOp::Open, e))?;
                self.needs_dir_sync = true;
                self.opened_at_ms = crate::events::now_ms();
                none.insert(f)
            }
        };
        injected_error("session_file::write").map_err(|e| err(FileOp::Write, e))?;
        // Each line is its seq's prefix, rendered here, then its tail.
        let mut prefixes = Vec::with_capacity(self.pending.len() * crate::line::SEQ_PREFIX_BYTES_MAX);
        let mut ends = Vec::with_capacity(self.pending.len());
        for line in &self.pending {
            line.write_prefix(&mut prefixes);
            ends.push(prefixes.len());
        }
        let mut slices = Vec::with_capacity(2 * self.pending.len());
        let mut start = 0;
        for (line, &end) in self.pending.iter().zip(&ends) {
            slices.push(io::IoSlice::new(&prefixes[start..end]));
            slices.push(io::IoSlice::new(&line.tail));
            start = end;
        }
        file.write_all_vectored_at(&slices, self.offset)
            .map_err(|e| err(FileOp::Write, e))?;
        self.offset += self.pending_bytes as u64;
        self.pending.clear();
        self.pending_bytes = 0;
        debug_assert!(self.synced_offset <= self.offset, "synced past the written offset");
        Ok(())
    }

    /// Writes pending lines, fdatasyncs the file (and its directory entry if
    /// the file is new), and returns the checkpoint that is now true.
    pub fn sync(&mut self) -> Result<Checkpoint, FileError> {
        self.write_pending()?;
        let Some(file) = &self.file else {
            return Ok(self.checkpoint()); // no file: nothing to make durable
        };
        if self.synced_offset != self.offset || self.needs_dir_sync {
            injected_error("session_file::sync_data")
                .and_then(|()| file.sync_data())
                .map_err(|source| FileError {
                    op: FileOp::DataSync,
                    path: self.path.clone(),
                    source,
                })?;
            self.synced_offset = self.offset;
        }
        debug_assert!(self.pending.is_empty() && self.synced_offset == self.offset);
        if self.needs_dir_sync {
            self.fs.sync_dir(&self.dir).map_err(|source| FileError {
                op: FileOp::DirSync,
                path: self.dir.clone(),
                source,
            })?;
            self.needs_dir_sync = false;
        }
        Ok(self.checkpoint())
    }

    /// The checkpoint as of the last successful sync.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            opened_at_ms: self.opened_at_ms,
            offset: self.synced_offset,
            last_seq: self.last_seq,
            last_lsn: self.last_lsn,
        }
    }
}

/// Where a session file's trusted bytes end and what it holds.
struct State {
    /// Bytes known synced (the checkpoint's offset, when usable).
    start: u64,
    /// End of the valid lines.
    end: u64,
    last_seq: i64,
    last_lsn: u64,
    repair: OpenRepair,
}

fn inspect(file: &dyn FsFile, len: u64, ckpt: Option<Checkpoint>) -> io::Result<State> {
    let mut repair = OpenRepair::default();
    let (start, seq_floor, last_lsn) = match ckpt {
        Some(c) if c.offset <= len => (c.offset, c.last_seq, c.last_lsn),
        Some(c) => (0, 0, c.last_lsn),
        None => (0, 0, 0),
    };
    let (end, scanned_last) = if start < len {
        repair.scanned = true;
        // Bytes past the checkpoint were never known synced: decide from the
        // disk, not from cached pages whose writeback may have failed.
        file.sync_and_drop_cache()?;
        scan_valid_lines(file, start, len, if start > 0 { seq_floor } else { 0 })?
    } else {
        (start, 0)
    };
    // The checkpoint's seq also covers rotated files, so it is a floor.
    let last_seq = scanned_last.max(ckpt.map_or(0, |c| c.last_seq));
    Ok(State {
        start,
        end,
        last_seq,
        last_lsn,
        repair,
    })
}

/// From `start`, the end of the longest run of whole, valid JSON lines with
/// seqs increasing above `seq_floor`, and the last seq in it (0 if none).
/// Reads in chunks (bounded memory).
fn scan_valid_lines(file: &dyn FsFile, start: u64, len: u64, seq_floor: i64) -> io::Result<(u64, i64)> {
    const CHUNK: usize = 1 << 20;
    let mut end = start;
    let mut floor = seq_floor;
    let mut last = 0i64;
    let mut carry: Vec<u8> = Vec::new();
    let mut pos = start;
    let mut buf = vec![0u8; CHUNK];
    while pos < len {
        let n = ((len - pos) as usize).min(CHUNK);
        file.read_exact_at(&mut buf[..n], pos)?;
        pos += n as u64;
        carry.extend_from_slice(&buf[..n]);
        let mut at = 0;
        while let Some(nl) = carry[at..].iter().position(|&b| b == b'\n') {
            let line = &carry[at..at + nl];
            match line_seq(line) {
                Some(seq) if seq > floor && is_json(line) => {
                    floor = seq;
                    last = seq;
                    end += (nl + 1) as u64;
                }
                _ => return Ok((end, last)),
            }
            at += nl + 1;
        }
        carry.drain(..at);
    }
    Ok((end, last))
}

fn is_json(line: &[u8]) -> bool {
    serde_json::from_slice::<serde::de::IgnoredAny>(line).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(seq: i64, content: &str) -> Line {
        Line::of(&LogFrame {
            session_id: "s".into(),
            seq,
            content: content.into(),
            version: 1,
            ..Default::default()
        })
    }

    #[test]
    fn pending_lines_reach_the_file_byte_for_byte_as_rendered_across_many_pwritev_calls() {
        let dir = tempfile::tempdir().unwrap();
        let (mut sf, _) = SessionFile::open(Arc::new(wal::fs::RealFs), dir.path(), "s", None).unwrap();
        // 1,500 lines are 3,000 slices: more than one pwritev takes (1,024).
        // Contents of every length from 0 up, some with escapes.
        let mut expected = Vec::new();
        for seq in 1..=1500 {
            let content = if seq % 7 == 0 {
                "quote \" and \\ ".repeat(seq as usize % 5)
            } else {
                "x".repeat(seq as usize % 300)
            };
            let l = line(seq, &content);
            l.write_to(&mut expected);
            assert_eq!(sf.append_within(seq as u64, l, u64::MAX), Appended::Written);
            // The seq the session holds is skipped, not written twice.
            assert_eq!(
                sf.append_within(seq as u64, line(seq, "again"), u64::MAX),
                Appended::Skipped
            );
        }
        assert_eq!(sf.pending_bytes(), expected.len());
        assert_eq!(sf.size(), expected.len() as u64);
        sf.write_pending().unwrap();
        assert_eq!(sf.pending_bytes(), 0);
        // A second write continues at the offset.
        let l = line(1501, "last");
        l.write_to(&mut expected);
        assert!(sf.append(1501, l));
        sf.sync().unwrap();
        assert_eq!(std::fs::read(logtmp_path(dir.path(), "s")).unwrap(), expected);
        assert_eq!(sf.offset(), expected.len() as u64);
    }

    #[test]
    fn a_line_that_would_cross_the_size_limit_is_handed_back_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let (mut sf, _) = SessionFile::open(Arc::new(wal::fs::RealFs), dir.path(), "s", None).unwrap();
        let first = line(1, "first");
        let limit = first.len() as u64 + 10;
        assert_eq!(sf.append_within(1, first, limit), Appended::Written);
        let second = line(2, "second");
        assert_eq!(sf.append_within(2, second.clone(), limit), Appended::Full(second));
        assert_eq!(sf.last_seq(), 1);
        // An empty file takes a line larger than the limit.
        sf.write_pending().unwrap();
        let (mut other, _) = SessionFile::open(Arc::new(wal::fs::RealFs), dir.path(), "t", None).unwrap();
        assert_eq!(other.append_within(1, line(1, &"y".repeat(100)), 10), Appended::Written);
    }
}
