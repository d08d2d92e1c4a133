//! Materialization: how an acknowledged frame becomes one JSON line in
//! `<LOG_DIR>/<session>.logtmp`. Synchronous and runtime-free, so the live
//! writer tasks, the recovery pass and the power-loss simulation all run the
//! very same code.
//!
//! # Invariants
//! - A session file holds whole lines with strictly increasing seqs.
//! - `append` skips a frame whose seq the session already holds, so replaying
//!   the WAL any number of times never duplicates a line.
//! - A checkpoint is produced only after the bytes it covers were
//!   fdatasynced (and the file's directory entry, for a new file).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use prost::Message;
use serde::Serialize;
use serde::ser::{SerializeMap, SerializeSeq};
use wal::fs::{Fs, FsFile, OpenMode};

use crate::meta::{Checkpoint, MetaStore};
use crate::pb::LogFrame;

/// Suffix of the file a session's frames are appended to.
pub const LOGTMP_SUFFIX: &str = ".logtmp";

/// Path of a session's live file.
pub fn logtmp_path(log_dir: &Path, session: &str) -> PathBuf {
    log_dir.join(format!("{session}{LOGTMP_SUFFIX}"))
}

/// `time` as RFC 3339 UTC with nanoseconds, e.g. `2026-11-29T05:14:07.000000001Z`.
pub fn format_time(t: &prost_types::Timestamp) -> String {
    let dt = chrono::DateTime::from_timestamp(t.seconds, t.nanos.clamp(0, 999_999_999) as u32)
        .expect("validated timestamp is in range");
    dt.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

struct JsonStruct<'a>(&'a prost_types::Struct);
struct JsonValue<'a>(&'a prost_types::Value);

impl Serialize for JsonStruct<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.fields.len()))?;
        for (k, v) in &self.0.fields {
            m.serialize_entry(k, &JsonValue(v))?;
        }
        m.end()
    }
}

impl Serialize for JsonValue<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use prost_types::value::Kind;
        match &self.0.kind {
            None | Some(Kind::NullValue(_)) => s.serialize_unit(),
            Some(Kind::NumberValue(n)) if n.is_finite() => match exact_integer(*n) {
                Some(i) => s.serialize_i64(i),
                None => s.serialize_f64(*n),
            },
            Some(Kind::NumberValue(_)) => s.serialize_unit(),
            Some(Kind::StringValue(v)) => s.serialize_str(v),
            Some(Kind::BoolValue(b)) => s.serialize_bool(*b),
            Some(Kind::StructValue(st)) => JsonStruct(st).serialize(s),
            Some(Kind::ListValue(l)) => {
                let mut seq = s.serialize_seq(Some(l.values.len()))?;
                for v in &l.values {
                    seq.serialize_element(&JsonValue(v))?;
                }
                seq.end()
            }
        }
    }
}

/// `n` as an integer when it is one exactly and below 2^53 in magnitude
/// (where every integer is representable, so no reader mistakes a rounded
/// value for an exact one). `Struct` numbers are doubles on the wire: without
/// this, `"line": 11` would be written as `11.0`. `-0.0` becomes `0`.
fn exact_integer(n: f64) -> Option<i64> {
    const TWO_53: f64 = 9_007_199_254_740_992.0;
    (n.fract() == 0.0 && n.abs() < TWO_53).then_some(n as i64)
}

static EMPTY_STRUCT: std::sync::LazyLock<prost_types::Struct> = std::sync::LazyLock::new(Default::default);

/// Appends `frame` as one JSON line (with `\n`) to `out`.
pub fn render_line(frame: &LogFrame, out: &mut Vec<u8>) {
    use std::io::Write;
    // Field by field, in the documented order. Strings that need no escaping
    // (the common case for log content) are copied in one piece: serde_json's
    // byte-by-byte escaping was the largest item of the ingest profile.
    let time = frame.time.as_ref().map(format_time).unwrap_or_default();
    write!(out, "{{\"seq\":{},\"time\":", frame.seq).expect("Vec write");
    json_str(out, &time);
    out.extend_from_slice(b",\"session_id\":");
    json_str(out, &frame.session_id);
    out.extend_from_slice(b",\"user_id\":");
    json_str(out, &frame.user_id);
    out.extend_from_slice(b",\"role\":");
    json_str(out, &frame.role);
    write!(out, ",\"version\":{},\"content\":", frame.version.max(1)).expect("Vec write");
    json_str(out, &frame.content);
    out.extend_from_slice(b",\"metadata\":");
    let metadata = JsonStruct(frame.metadata.as_ref().unwrap_or(&EMPTY_STRUCT));
    serde_json::to_writer(&mut *out, &metadata).expect("writing JSON to a Vec cannot fail");
    out.extend_from_slice(b"}\n");
}

/// Appends `s` as a JSON string, byte-identical to serde_json's output.
fn json_str(out: &mut Vec<u8>, s: &str) {
    if !needs_escape(s.as_bytes()) {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        serde_json::to_writer(&mut *out, s).expect("writing JSON to a Vec cannot fail");
    }
}

/// True if `b` holds a byte JSON must escape (a control byte, `"` or `\\`).
/// Checks 32 bytes per step with no early exit inside a step, which the
/// compiler turns into vector compares; a byte-at-a-time `all()` cost 14% of
/// the ingest profile for 256-byte contents.
fn needs_escape(b: &[u8]) -> bool {
    let flag = |acc: bool, &c: &u8| acc | (c < 0x20) | (c == b'"') | (c == b'\\');
    let mut chunks = b.chunks_exact(32);
    for chunk in &mut chunks {
        if chunk.iter().fold(false, flag) {
            return true;
        }
    }
    chunks.remainder().iter().fold(false, flag)
}

/// Parses the seq of a line written by [`render_line`] (`{"seq":N,...`).
pub fn line_seq(line: &[u8]) -> Option<i64> {
    let rest = line.strip_prefix(b"{\"seq\":")?;
    let end = rest.iter().position(|&b| b == b',')?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// The line is pending.
    Written,
    /// The session already holds the seq.
    Skipped,
    /// The line would take the file past its size limit: nothing changed.
    Full,
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
    pending: Vec<u8>,
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
            pending: Vec::with_capacity(64 << 10),
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

    /// Renders `frame` (taken from WAL record `lsn`) into the pending buffer,
    /// unless the session already holds its seq. Returns whether it was new.
    pub fn append(&mut self, lsn: u64, frame: &LogFrame) -> bool {
        // Replay starts at the WAL's oldest record, which may be older than
        // the checkpoint: such records are skipped by seq below.
        self.last_lsn = self.last_lsn.max(lsn);
        if frame.seq <= self.last_seq {
            return false;
        }
        render_line(frame, &mut self.pending);
        self.last_seq = frame.seq;
        true
    }

    /// Like [`SessionFile::append`], but keeps the file within `size_max`
    /// bytes: a new line that would take a non-empty file past it is not
    /// taken ([`Appended::Full`]: rotate, then append it to the next file).
    /// A line larger than `size_max` on its own goes into an empty file.
    pub fn append_within(&mut self, lsn: u64, frame: &LogFrame, size_max: u64) -> Appended {
        if frame.seq <= self.last_seq {
            self.last_lsn = self.last_lsn.max(lsn);
            return Appended::Skipped;
        }
        let before = self.pending.len();
        let size_before = self.size();
        render_line(frame, &mut self.pending);
        if size_before > 0 && self.size() > size_max {
            self.pending.truncate(before);
            return Appended::Full;
        }
        self.last_lsn = self.last_lsn.max(lsn);
        self.last_seq = frame.seq;
        Appended::Written
    }

    /// Bytes written to the file (synced or not).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Bytes rendered but not yet written.
    pub fn pending_bytes(&self) -> usize {
        self.pending.len()
    }

    /// The file's size once the pending lines are written (what rotation
    /// by size and "is the file empty" look at).
    pub fn size(&self) -> u64 {
        self.offset + self.pending.len() as u64
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
        file.write_all_at(&self.pending, self.offset)
            .map_err(|e| err(FileOp::Write, e))?;
        self.offset += self.pending.len() as u64;
        self.pending.clear();
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

/// The recovery side of materialization: replays WAL records into session
/// files through [`SessionFile`], at most `files_open_max` at a time.
///
/// `prepare` visits every session file in the log directory and refreshes
/// its checkpoint from the file itself, so a lost, stale or rebuilt
/// metadata store is corrected before any seq is assigned. In dry-run mode
/// nothing is written: files are probed read-only and records counted.
pub struct Replayer {
    fs: Arc<dyn Fs>,
    log_dir: PathBuf,
    meta: Arc<dyn MetaStore>,
    files: HashMap<String, SessionFile>,
    /// Dry run: last seq per session as replay would advance it.
    probed: HashMap<String, i64>,
    dry_run: bool,
    files_open_max: usize,
    /// What replay did (or would do), per session.
    pub per_session: BTreeMap<String, SessionReplay>,
    /// Session files whose checkpoint `prepare` refreshed.
    pub checkpoints_refreshed: u64,
    /// Compression and events, for finishing interrupted file steps.
    life: crate::rotate::Lifecycle,
    /// What `prepare` finished or re-announced.
    pub lifecycle: LifecycleRepair,
}

/// File steps the recovery pass finished (in a dry run: would finish).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LifecycleRepair {
    /// Rotations recorded but not finished (renamed now).
    pub rotations_finished: Vec<String>,
    /// Rotated files whose compression was not finished when the pass
    /// started (including those of the rotations it finishes), in seq order
    /// per session.
    pub compressions_pending: Vec<String>,
    /// Pending compressions finished: by `prepare` those whose `.gz` was
    /// complete (only the unlink and the event were left), by
    /// [`Replayer::finish_compressions`] the others.
    pub compressions_finished: Vec<String>,
    /// Events recorded in the outbox (one per finished step, when events
    /// are on, plus those re-announced after a rebuild).
    pub events_recorded: u64,
    /// Rotated files re-announced because the store was rebuilt.
    pub events_reemitted: u64,
    /// Rotated `.log` files queued for compression because the store was rebuilt.
    pub compressions_queued: u64,
    /// Whether the store had no checkpoints while session files existed.
    pub meta_rebuilt: bool,
    /// Empty `.logtmp` files without checkpointed content, removed (or, in
    /// a dry run, to be removed): a session without frames has no file.
    pub empty_files_removed: Vec<String>,
    /// Foreign files found at a session file's name (symbolic links,
    /// non-regular files, files without a line of logd's and no checkpoint),
    /// moved aside untouched: where each went.
    pub foreign_files_moved: Vec<String>,
}

/// What replay did for one session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SessionReplay {
    /// Records written to the session's file.
    pub replayed: u64,
    /// Records the file already held.
    pub skipped: u64,
    /// Bytes cut from the file's end on open.
    pub bytes_trimmed: u64,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Rendered bytes a replayed session file buffers before writing; with at
/// most `files_open_max` files open, replay memory stays near 32 MiB
/// whatever the size of the WAL.
const REPLAY_PENDING_BYTES_MAX: usize = 128 << 10;

impl Replayer {
    /// A replayer writing into `log_dir`, reading checkpoints from `meta`.
    pub fn new(fs: Arc<dyn Fs>, log_dir: &Path, meta: Arc<dyn MetaStore>) -> Self {
        Replayer {
            fs,
            log_dir: log_dir.to_path_buf(),
            meta,
            files: HashMap::new(),
            probed: HashMap::new(),
            dry_run: false,
            files_open_max: 256,
            per_session: BTreeMap::new(),
            checkpoints_refreshed: 0,
            life: crate::rotate::Lifecycle::default(),
            lifecycle: LifecycleRepair::default(),
        }
    }

    /// Keeps at most `n` session files open at once (`LOGD_OPEN_FILES_MAX`).
    pub fn with_files_open_max(mut self, n: usize) -> Self {
        self.files_open_max = self.files_open_max.min(n.max(1));
        self
    }

    /// Finishes interrupted rotations and compressions per `life`.
    pub fn with_lifecycle(mut self, life: crate::rotate::Lifecycle) -> Self {
        self.life = life;
        self
    }

    /// Finishes recorded rotations and compressions whose `.gz` exists; when
    /// the store lost everything, re-announces rotated files and queues their
    /// compression. Returns the highest seq per session in rotated files.
    fn repair_lifecycle(&mut self) -> Result<HashMap<String, i64>, BoxError> {
        use crate::rotate::{complete_rotation, parse_rotated_name};
        let (fs, dir, meta, life) = (self.fs.as_ref(), self.log_dir.as_path(), self.meta.as_ref(), self.life);
        let events = u64::from(life.events);
        let mut rotations = meta.rotations()?;
        rotations.sort_by(|a, b| (&a.session, a.stats.first_seq).cmp(&(&b.session, b.stats.first_seq)));
        let mut pending: Vec<(String, i64, String)> = Vec::new();
        for rot in rotations {
            if !self.dry_run {
                complete_rotation(fs, dir, meta, life, &rot)?;
            } else if life.gzip_level.is_some() {
                // Finishing it queues its compression (below when not dry).
                pending.push((rot.session.clone(), rot.stats.first_seq, rot.to.clone()));
            }
            self.lifecycle.rotations_finished.push(rot.to.clone());
            self.lifecycle.events_recorded += events;
        }
        for job in meta.compress_jobs()? {
            let r = &job.rotation;
            pending.push((r.session.clone(), r.stats.first_seq, r.to.clone()));
        }
        // Seq order per session: `compressed` events must go out in it.
        pending.sort();
        pending.dedup();
        for (_, _, name) in pending {
            let gz = dir.join(format!("{name}.gz"));
            if fs.exists(&gz) {
                if !self.dry_run {
                    crate::rotate::run_compression(fs, dir, meta, life, &name)?;
                }
                self.lifecycle.compressions_finished.push(name.clone());
                self.lifecycle.events_recorded += events;
            }
            self.lifecycle.compressions_pending.push(name);
        }
        let mut names: Vec<(String, crate::rotate::RotatedName)> = Vec::new();
        if fs.exists(dir) {
            for path in fs.list_dir(dir)? {
                let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                    continue;
                };
                if let Some(r) = parse_rotated_name(name) {
                    names.push((name.to_owned(), r));
                }
            }
        }
        names.sort_by(|a, b| (&a.1.session, a.1.first_seq, a.1.gz).cmp(&(&b.1.session, b.1.first_seq, b.1.gz)));
        let mut floors: HashMap<String, i64> = HashMap::new();
        for (_, r) in &names {
            let f = floors.entry(r.session.clone()).or_insert(0);
            *f = (*f).max(r.last_seq);
        }
        let rebuilt = meta.checkpoints()?.is_empty() && (!names.is_empty() || !self.sessions_on_disk()?.is_empty());
        self.lifecycle.meta_rebuilt = rebuilt;
        if rebuilt && !self.dry_run {
            self.reannounce(&names)?;
        }
        Ok(floors)
    }

    /// After a rebuild: events for every rotated file (same deterministic
    /// ids, so consumers dedupe) and compression for every `.log`.
    fn reannounce(&mut self, names: &[(String, crate::rotate::RotatedName)]) -> Result<(), BoxError> {
        use crate::meta::{CompressJob, compress_op, event_op};
        use crate::rotate::{Rotation, compressed_event, file_stats, rotated_event};
        let (fs, dir, meta, life) = (self.fs.as_ref(), self.log_dir.as_path(), self.meta.as_ref(), self.life);
        for (name, r) in names {
            let log_name = name.strip_suffix(".gz").unwrap_or(name).to_owned();
            if r.gz && names.iter().any(|(n, _)| *n == log_name) {
                continue; // the .log is still there: announced with it below
            }
            let path = dir.join(name);
            let mut rot = Rotation {
                session: r.session.clone(),
                to: log_name.clone(),
                stats: crate::rotate::FileStats {
                    first_seq: r.first_seq,
                    last_seq: r.last_seq,
                    ..Default::default()
                },
                reason: crate::events::RotateReason::Recovery,
                rotated_at_ms: crate::events::now_ms(),
            };
            let mut ops = Vec::new();
            if !r.gz {
                rot.stats = file_stats(fs, &path)?;
                if life.events {
                    ops.push(event_op(meta.next_id()?, &rotated_event(&rot)));
                }
                if life.gzip_level.is_some() {
                    ops.push(compress_op(&log_name, Some(&CompressJob::new(rot.clone()))));
                    self.lifecycle.compressions_queued += 1;
                }
            } else if life.events {
                let (bytes_out, crc32) = crate::rotate::checksum(fs, &path)?;
                let c = crate::rotate::Compressed {
                    bytes_in: 0,
                    bytes_out,
                    crc32,
                };
                ops.push(event_op(meta.next_id()?, &rotated_event(&rot)));
                ops.push(event_op(meta.next_id()?, &compressed_event(&rot, &c)));
            }
            let n = ops.iter().filter(|o| o.0 == crate::meta::Tree::Outbox).count() as u64;
            self.lifecycle.events_reemitted += n;
            self.lifecycle.events_recorded += n;
            if !ops.is_empty() {
                meta.apply(ops)?;
            }
        }
        Ok(())
    }

    /// Runs every pending compression that `prepare` left (those without a
    /// complete `.gz`) to its end, in seq order, as the service's
    /// compression pool does right after its recovery pass: `logd recover`
    /// calls this so that it finishes exactly what `logd serve` would. In a
    /// dry run, only counts them as would-be finished.
    pub fn finish_compressions(&mut self) -> Result<(), BoxError> {
        use crate::rotate::{CompressionRun, run_compression};
        if !self.dry_run {
            // Also jobs queued after `prepare` listed them (a rebuild).
            let mut jobs = self.meta.compress_jobs()?;
            jobs.sort_by(|a, b| {
                (&a.rotation.session, a.rotation.stats.first_seq)
                    .cmp(&(&b.rotation.session, b.rotation.stats.first_seq))
            });
            let known: std::collections::HashSet<String> =
                self.lifecycle.compressions_pending.iter().cloned().collect();
            for job in jobs {
                if !known.contains(&job.rotation.to) {
                    self.lifecycle.compressions_pending.push(job.rotation.to);
                }
            }
        }
        for name in self.compressions_left() {
            if !self.dry_run {
                let run = run_compression(self.fs.as_ref(), &self.log_dir, self.meta.as_ref(), self.life, &name)?;
                if run == CompressionRun::NoJob {
                    continue;
                }
            }
            self.lifecycle.compressions_finished.push(name);
            self.lifecycle.events_recorded += u64::from(self.life.events);
        }
        Ok(())
    }

    /// Pending compressions not finished (the service's pool takes them).
    pub fn compressions_left(&self) -> Vec<String> {
        let l = &self.lifecycle;
        let finished: std::collections::HashSet<&String> = l.compressions_finished.iter().collect();
        l.compressions_pending
            .iter()
            .filter(|n| !finished.contains(n))
            .cloned()
            .collect()
    }

    fn note_moved_aside(&mut self, sf: &mut SessionFile) {
        if let Some(aside) = sf.take_moved_aside() {
            let name = aside
                .file_name()
                .map_or_else(|| aside.display().to_string(), |n| n.to_string_lossy().into_owned());
            self.lifecycle.foreign_files_moved.push(name);
        }
    }

    /// A replayer that changes nothing and only counts.
    pub fn dry_run(fs: Arc<dyn Fs>, log_dir: &Path, meta: Arc<dyn MetaStore>) -> Self {
        Replayer {
            dry_run: true,
            ..Replayer::new(fs, log_dir, meta)
        }
    }

    fn close_all(&mut self) -> Result<(), BoxError> {
        let mut files: Vec<(String, SessionFile)> = self.files.drain().collect();
        for (session, sf) in &mut files {
            let ckpt = sf.sync()?;
            self.meta.put_checkpoint(session, &ckpt)?;
        }
        for (_, mut sf) in files {
            self.note_moved_aside(&mut sf);
        }
        Ok(())
    }

    /// Session ids that have a `.logtmp` in the log directory.
    fn sessions_on_disk(&self) -> Result<Vec<String>, BoxError> {
        if !self.fs.exists(&self.log_dir) {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for path in self.fs.list_dir(&self.log_dir)? {
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if let Some(session) = name.strip_suffix(LOGTMP_SUFFIX)
                && crate::validate::session_id_is_valid(session)
            {
                out.push(session.to_owned());
            }
        }
        out.sort();
        Ok(out)
    }

    fn apply_dry(&mut self, frame: &LogFrame) -> Result<bool, BoxError> {
        let last = match self.probed.get_mut(&frame.session_id) {
            Some(l) => l,
            None => {
                let ckpt = self.meta.checkpoint(&frame.session_id)?;
                let (last, repair) = SessionFile::probe(self.fs.as_ref(), &self.log_dir, &frame.session_id, ckpt)?;
                self.per_session
                    .entry(frame.session_id.clone())
                    .or_default()
                    .bytes_trimmed = repair.bytes_trimmed;
                self.probed.entry(frame.session_id.clone()).or_insert(last)
            }
        };
        if frame.seq <= *last {
            return Ok(false);
        }
        *last = frame.seq;
        Ok(true)
    }

    fn apply_live(&mut self, lsn: u64, frame: &LogFrame) -> Result<bool, BoxError> {
        if !self.files.contains_key(&frame.session_id) {
            if self.files.len() >= self.files_open_max {
                self.close_all()?;
            }
            let ckpt = self.meta.checkpoint(&frame.session_id)?;
            let (mut sf, repair) = SessionFile::open(self.fs.clone(), &self.log_dir, &frame.session_id, ckpt)?;
            self.note_moved_aside(&mut sf);
            self.per_session
                .entry(frame.session_id.clone())
                .or_default()
                .bytes_trimmed += repair.bytes_trimmed;
            self.files.insert(frame.session_id.clone(), sf);
        }
        let sf = self.files.get_mut(&frame.session_id).expect("just inserted");
        let written = sf.append(lsn, frame);
        if sf.pending_bytes() > REPLAY_PENDING_BYTES_MAX {
            sf.write_pending()?;
        }
        Ok(written)
    }
}

impl recovery::Materializer for Replayer {
    fn prepare(&mut self) -> Result<(), BoxError> {
        let floors = self.repair_lifecycle()?;
        let on_disk = self.sessions_on_disk()?;
        // Sessions whose only files are rotated ones still need their seq.
        for (session, floor) in &floors {
            if on_disk.contains(session) || self.dry_run {
                continue;
            }
            let ckpt = self.meta.checkpoint(session)?.unwrap_or_default();
            if ckpt.last_seq < *floor {
                self.meta.put_checkpoint(
                    session,
                    &Checkpoint {
                        offset: 0,
                        last_seq: *floor,
                        ..ckpt
                    },
                )?;
                self.checkpoints_refreshed += 1;
            }
        }
        let mut removed_any = false;
        for session in on_disk {
            let stored = self.meta.checkpoint(&session)?;
            let path = logtmp_path(&self.log_dir, &session);
            if stored.is_none_or(|c| c.offset == 0) && self.fs.open(&path, OpenMode::Read)?.len()? == 0 {
                // Nothing was ever checkpointed in it and it holds nothing:
                // a ghost (older logds created one per known session).
                if !self.dry_run {
                    self.fs.remove_file(&path)?;
                    removed_any = true;
                }
                self.lifecycle
                    .empty_files_removed
                    .push(format!("{session}{LOGTMP_SUFFIX}"));
                continue;
            }
            // Rotated files bound the seq from below, even if the store is stale.
            let floor = floors.get(&session).copied().unwrap_or(0);
            let ckpt = match stored {
                Some(c) if c.last_seq >= floor => Some(c),
                Some(c) => Some(Checkpoint { last_seq: floor, ..c }),
                None if floor > 0 => Some(Checkpoint {
                    last_seq: floor,
                    ..Checkpoint::default()
                }),
                None => None,
            };
            if self.dry_run {
                let (_, repair) = SessionFile::probe(self.fs.as_ref(), &self.log_dir, &session, ckpt)?;
                if repair.bytes_trimmed > 0 {
                    self.per_session.entry(session).or_default().bytes_trimmed = repair.bytes_trimmed;
                }
                continue;
            }
            let (mut sf, repair) = SessionFile::open(self.fs.clone(), &self.log_dir, &session, ckpt)?;
            self.note_moved_aside(&mut sf);
            if repair.bytes_trimmed > 0 {
                self.per_session.entry(session.clone()).or_default().bytes_trimmed += repair.bytes_trimmed;
            }
            let fresh = sf.sync()?;
            if stored != Some(fresh) {
                self.meta.put_checkpoint(&session, &fresh)?;
                self.checkpoints_refreshed += 1;
            }
        }
        if removed_any {
            self.fs.sync_dir(&self.log_dir)?;
        }
        Ok(())
    }

    fn apply(&mut self, lsn: u64, payload: &[u8]) -> Result<recovery::Applied, BoxError> {
        let frame = LogFrame::decode(payload).map_err(|e| format!("record at LSN {lsn} is not a LogFrame: {e}"))?;
        let written = if self.dry_run {
            self.apply_dry(&frame)?
        } else {
            self.apply_live(lsn, &frame)?
        };
        let stats = self.per_session.entry(frame.session_id).or_default();
        if written {
            stats.replayed += 1;
            Ok(recovery::Applied::Written)
        } else {
            stats.skipped += 1;
            Ok(recovery::Applied::Skipped)
        }
    }

    fn finish(&mut self) -> Result<(), BoxError> {
        if self.dry_run {
            return Ok(());
        }
        self.close_all()?;
        self.meta.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_match_serde_json_byte_for_byte() {
        for s in [
            "",
            "plain text",
            "a\"b",
            "back\\slash",
            "tab\tnew\nline",
            "\u{1}\u{1f}",
            "é ü 日本",
            "\u{7f}",
            "</script>",
        ] {
            let mut fast = Vec::new();
            json_str(&mut fast, s);
            assert_eq!(fast, serde_json::to_vec(s).unwrap(), "{s:?}");
        }
        // Long strings: an escape at every position, inside a 32-byte step
        // and in the remainder.
        for len in [31, 32, 33, 64, 100] {
            for at in 0..len {
                for special in ['"', '\\', '\n', '\u{0}', '\u{1f}'] {
                    let mut s: String = "x".repeat(len);
                    s.replace_range(at..at + 1, &special.to_string());
                    let mut fast = Vec::new();
                    json_str(&mut fast, &s);
                    assert_eq!(fast, serde_json::to_vec(&s).unwrap(), "{s:?}");
                }
            }
        }
    }

    #[test]
    fn exact_integer_numbers_are_written_as_integers() {
        let json = |n: f64| {
            let v = prost_types::Value {
                kind: Some(prost_types::value::Kind::NumberValue(n)),
            };
            serde_json::to_string(&JsonValue(&v)).unwrap()
        };
        const TWO_53: f64 = 9_007_199_254_740_992.0;
        assert_eq!(json(11.0), "11");
        assert_eq!(json(-3.0), "-3");
        assert_eq!(json(0.0), "0");
        assert_eq!(json(-0.0), "0", "negative zero is the integer 0");
        assert_eq!(json(TWO_53 - 1.0), "9007199254740991");
        assert_eq!(json(-(TWO_53 - 1.0)), "-9007199254740991");
        // From 2^53 on, not every integer is representable: float form.
        assert_eq!(json(TWO_53), "9007199254740992.0");
        assert_eq!(json(-TWO_53), "-9007199254740992.0");
        assert_eq!(json(1e300), "1e+300");
        assert_eq!(json(1.5), "1.5");
        assert_eq!(json(-0.25), "-0.25");
        assert_eq!(json(f64::NAN), "null", "non-finite numbers stay null");
        assert_eq!(json(f64::INFINITY), "null");
    }

    #[test]
    fn a_line_is_one_json_object_with_the_documented_fields() {
        let mut md = prost_types::Struct::default();
        md.fields.insert(
            "k".into(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::NumberValue(1.5)),
            },
        );
        let f = LogFrame {
            version: 0,
            time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 5,
            }),
            session_id: "s1".into(),
            user_id: "u".into(),
            role: "r".into(),
            seq: 42,
            content: "a\nb\"c".into(),
            metadata: Some(md),
        };
        let mut out = Vec::new();
        render_line(&f, &mut out);
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(text.ends_with('\n'));
        assert_eq!(text.matches('\n').count(), 1, "content newlines are escaped");
        assert_eq!(
            text,
            "{\"seq\":42,\"time\":\"2023-11-14T22:13:20.000000005Z\",\"session_id\":\"s1\",\"user_id\":\"u\",\
             \"role\":\"r\",\"version\":1,\"content\":\"a\\nb\\\"c\",\"metadata\":{\"k\":1.5}}\n"
        );
        assert_eq!(line_seq(&out), Some(42));
    }
}
