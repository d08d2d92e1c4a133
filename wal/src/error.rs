//! The WAL's error type: every variant names the file and offset it concerns.

use std::path::PathBuf;

use crate::segment::BadRecord;

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong in the WAL.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O call failed; `op` says which and `path` on what.
    #[error("wal: {op} {path}: {source}")]
    Io {
        /// The operation (e.g. "fdatasync", "write").
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A bad record with valid records after it, or any bad record in a
    /// segment that is not the last: real corruption, never skipped silently.
    #[error(
        "wal: corruption in {segment} at offset {offset}: {why}; {records_after} valid record(s) \
         ({bytes_after} bytes) lie beyond it"
    )]
    Corruption {
        /// The damaged segment.
        segment: PathBuf,
        /// Byte offset of the first bad record.
        offset: u64,
        /// What was wrong with it.
        why: BadRecord,
        /// Valid records found after the damage (in this segment).
        records_after: u64,
        /// Bytes from the first valid record after the damage to the end of the segment.
        bytes_after: u64,
    },
    /// A segment header that is not ours or is damaged.
    #[error("wal: bad segment header in {segment}: {why}")]
    BadHeader {
        /// The segment.
        segment: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Consecutive segments whose LSNs do not meet (a segment is missing).
    #[error("wal: segment {segment} starts at LSN {found} but the previous one ends before LSN {expected}")]
    Gap {
        /// The segment after the gap.
        segment: PathBuf,
        /// LSN the segment should start at.
        expected: u64,
        /// LSN it starts at.
        found: u64,
    },
    /// A record larger than the configured limit was appended.
    #[error("wal: record of {bytes} bytes exceeds record_bytes_max {limit}")]
    RecordTooLarge {
        /// The payload size.
        bytes: usize,
        /// The limit.
        limit: u32,
    },
    /// An empty payload was appended: the format requires 1 ..= record_bytes_max
    /// bytes, and a reader resynchronizing after damage skips len-0 headers.
    #[error("wal: empty record (a payload holds at least 1 byte)")]
    EmptyRecord,
    /// A previous write or fsync failed: the WAL accepts nothing more until
    /// it is reopened (after a restart, recovery decides what is durable).
    #[error("wal: refusing appends after an earlier failure: {0}")]
    Poisoned(String),
    /// The group-commit thread has stopped.
    #[error("wal: group commit is shut down")]
    Closed,
    /// A reader callback failed.
    #[error("wal: reader callback: {0}")]
    Visitor(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { op, path, source }
    }
}
