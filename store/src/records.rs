//! The records the metadata store keeps: a session's [`Checkpoint`], a
//! [`Rotation`] in progress, a [`CompressJob`] and a finished file's
//! [`FileStats`]. A leaf: the store, the session file and the rotation steps
//! all use them, none of them is used here.

use serde::{Deserialize, Serialize};

use crate::events::RotateReason;

/// The largest seq a session may hold, client-sent or server-assigned: the
/// whole `int64` range of the contract. A session at `SEQ_MAX` has no seq
/// left: a `seq == 0` frame after it is refused per frame, never wrapped.
/// (Readers that parse JSON numbers as doubles must read seqs beyond 2^53
/// as big integers: the session files write them exactly.)
pub const SEQ_MAX: i64 = i64::MAX;

/// Where a session's materialization stands. Written after the session file
/// was fdatasynced up to `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Checkpoint {
    /// Bytes of the `.logtmp` that are durable and hold whole lines.
    pub offset: u64,
    /// Highest seq materialized for the session (in any of its files).
    pub last_seq: i64,
    /// LSN of the last WAL record materialized (or skipped) for it.
    pub last_lsn: u64,
    /// When the current `.logtmp` was started (unix ms; 0: unknown).
    #[serde(default)]
    pub opened_at_ms: u64,
}

/// A rotated file waiting for (or in) compression. While it is in the store,
/// the file's `compressed` event is not recorded: the batch that records
/// the event also clears the job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompressJob {
    /// The rotation that produced the file (for the `compressed` event).
    pub rotation: Rotation,
}

impl CompressJob {
    /// A job for a fresh rotation.
    pub fn new(rotation: Rotation) -> Self {
        CompressJob { rotation }
    }
}

/// What a finished file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct FileStats {
    /// First seq.
    pub first_seq: i64,
    /// Last seq.
    pub last_seq: i64,
    /// Lines.
    pub frames: u64,
    /// Bytes.
    pub bytes: u64,
    /// `time` of the first line.
    pub first_time: String,
    /// `time` of the last line.
    pub last_time: String,
    /// crc32 of the bytes.
    pub crc32: u32,
}

/// A rotation recorded before its rename (step 2), so recovery can finish it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rotation {
    /// The session.
    pub session: String,
    /// Final file name (in `LOG_DIR`).
    pub to: String,
    /// What the file holds.
    pub stats: FileStats,
    /// Why.
    pub reason: RotateReason,
    /// When (unix ms).
    pub rotated_at_ms: u64,
}
