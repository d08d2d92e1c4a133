//! The WAL's error type: every variant names the file and offset it concerns.

use std::fmt;
use std::path::PathBuf;

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
    /// True iff the error is damage to the WAL on disk that needs an operator
    /// (logd exits with code 2): a bad record with valid ones after it, a
    /// damaged or foreign segment header, a missing segment. False for
    /// failures of I/O calls, the refusals that follow them, and misuse;
    /// those are exit code 1 (a restart or a fix of the environment may
    /// clear them).
    pub fn is_integrity(&self) -> bool {
        // No wildcard: a new variant must be classified here.
        match self {
            Error::Corruption { .. } | Error::BadHeader { .. } | Error::Gap { .. } => true,
            Error::Io { .. }
            | Error::RecordTooLarge { .. }
            | Error::EmptyRecord
            | Error::Poisoned(_)
            | Error::Closed
            | Error::Visitor(_) => false,
        }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { op, path, source }
    }
}

/// Why a record failed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadRecord {
    /// The file ends inside the header or payload.
    Truncated {
        /// Bytes the record needs.
        needed: u64,
        /// Bytes left in the file.
        available: u64,
    },
    /// All header bytes are zero: unwritten space.
    Zeroed,
    /// The length field is over the configured limit.
    TooLong {
        /// The stored length.
        len: u32,
        /// The limit.
        limit: u32,
    },
    /// The record type byte names no type.
    UnknownType(u8),
    /// The record is not the next LSN.
    WrongLsn {
        /// Expected LSN.
        expected: u64,
        /// Stored LSN.
        found: u64,
    },
    /// The payload does not match its checksum.
    CrcMismatch {
        /// Stored CRC.
        stored: u32,
        /// Computed CRC.
        computed: u32,
    },
}

impl fmt::Display for BadRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BadRecord::Truncated { needed, available } => {
                write!(f, "record needs {needed} bytes but only {available} remain")
            }
            BadRecord::Zeroed => write!(f, "zeroed header (unwritten space)"),
            BadRecord::TooLong { len, limit } => {
                write!(f, "length {len} exceeds record_bytes_max {limit}")
            }
            BadRecord::UnknownType(t) => write!(f, "unknown record type {t}"),
            BadRecord::WrongLsn { expected, found } => {
                write!(f, "LSN {found} where {expected} was expected")
            }
            BadRecord::CrcMismatch { stored, computed } => {
                write!(f, "CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One value of every variant, each with whether it is an integrity
    /// problem.
    fn every_variant() -> Vec<(Error, bool)> {
        let segment = PathBuf::from("/wal/0000000000000001.wal");
        let all = vec![
            (
                Error::Io {
                    op: "fdatasync",
                    path: segment.clone(),
                    source: std::io::Error::from_raw_os_error(5),
                },
                false,
            ),
            (
                Error::Corruption {
                    segment: segment.clone(),
                    offset: 49,
                    why: BadRecord::CrcMismatch { stored: 1, computed: 2 },
                    records_after: 3,
                    bytes_after: 120,
                },
                true,
            ),
            (
                Error::BadHeader {
                    segment: segment.clone(),
                    why: "bad magic".into(),
                },
                true,
            ),
            (
                Error::Gap {
                    segment,
                    expected: 10,
                    found: 12,
                },
                true,
            ),
            (
                Error::RecordTooLarge {
                    bytes: 5000,
                    limit: 4096,
                },
                false,
            ),
            (Error::EmptyRecord, false),
            (Error::Poisoned("wal: fdatasync: EIO".into()), false),
            (Error::Closed, false),
            (Error::Visitor("callback failed".into()), false),
        ];
        all
    }

    /// Which variant `e` is. No wildcard: a new variant does not compile
    /// until it gets a number here (and then needs a value above).
    fn kind(e: &Error) -> usize {
        match e {
            Error::Io { .. } => 0,
            Error::Corruption { .. } => 1,
            Error::BadHeader { .. } => 2,
            Error::Gap { .. } => 3,
            Error::RecordTooLarge { .. } => 4,
            Error::EmptyRecord => 5,
            Error::Poisoned(_) => 6,
            Error::Closed => 7,
            Error::Visitor(_) => 8,
        }
    }
    const KINDS: usize = 9;

    #[test]
    fn only_damage_on_disk_is_an_integrity_error() {
        let all = every_variant();
        let kinds: std::collections::BTreeSet<usize> = all.iter().map(|(e, _)| kind(e)).collect();
        assert_eq!(kinds, (0..KINDS).collect(), "every variant is listed");
        for (e, integrity) in all {
            assert_eq!(e.is_integrity(), integrity, "{e}");
        }
    }
}
