//! A segmented, CRC-checked write-ahead log with group commit and torn-tail
//! repair. No gRPC and no async runtime: logd's durability lives here.
//!
//! # Design constraints
//! - Every record is checksummed (masked CRC32 over LSN, type and payload).
//! - Records are written sequentially and never span two segment files.
//! - A record is durable only after the `fdatasync` of a commit that covered
//!   it returned Ok; nothing may be acknowledged earlier.
//! - An I/O error from `write` or `fdatasync` poisons the WAL: no retry, no
//!   further appends until a restart reopens it (see [`Wal::commit`]). Every
//!   fdatasync of an open WAL takes turns through one gate and checks the
//!   poison before and after: Linux reports a writeback error once per open
//!   file description, so when the commit thread's roll sees it first, the
//!   batch the `wal-sync` thread is syncing on the same file must still fail.
//! - A process never appends to a segment an earlier process wrote: open
//!   starts a fresh segment, since the old one's cached tail may hold pages
//!   whose writeback failed (clean, never written again, gone at the next
//!   power cut).
//! - All file operations go through [`fs::Fs`], so tests can simulate a power
//!   cut that loses whatever was not fsynced.
//! - `sim::SimFs` (behind the `sim` cargo feature, for tests only: it is
//!   not compiled into release builds) simulates that power cut
//!   deterministically (seeded crashes, torn writes, injected `EIO`,
//!   writeback errors reported once per open file description).
//!
//! # Segment files
//! `<dir>/<first LSN as 16 lowercase hex digits>.wal`, so names sort by LSN.
//! A segment is rolled when the next record would take it past
//! `segment_bytes_max`. A new segment is created as `<name>.tmp`, its header
//! written and fdatasynced, renamed into place, and the directory fsynced; a
//! leftover `*.tmp` is deleted on open. The previous segment is fdatasynced
//! before the new one is created, so only the last segment can hold bytes
//! that were never synced.
//!
//! ```text
//! segment header (32 bytes)
//!   0  magic      [u8; 8]  "LOGDWAL1"
//!   8  version    u32 LE   1
//!  12  header_len u32 LE   32
//!  16  first_lsn  u64 LE   LSN of the first record in this file
//!  24  crc        u32 LE   crc32 of bytes 0..24
//!  28  reserved   u32      0
//!
//! record (17-byte header + payload), repeated to the end of the file
//!   0  len        u32 LE   payload bytes (1 ..= record_bytes_max)
//!   4  crc        u32 LE   masked crc32(lsn || type || payload)
//!   8  lsn        u64 LE   the previous record's LSN + 1
//!  16  type       u8       1 = Frame
//!  17  payload    [u8; len]
//! ```
//! LSNs number records (not bytes) from 1 and never repeat; the LSN inside
//! each record means a stale or misplaced record can never pass as the next
//! one. CRC masking is LevelDB's: `rotr(crc, 15) + 0xa282ead8`.
//!
//! # What opening and reading tolerate
//! Every segment is read from the disk, not the page cache: [`Wal::open`]
//! (and [`verify`], [`salvage`]) fdatasync each segment and drop its cached
//! pages (`POSIX_FADV_DONTNEED`) before reading it, so records whose
//! fdatasync failed in a previous process are not taken for durable ones.
//!
//! Scanning stops at the first record that is truncated, zeroed, too long,
//! of an unknown type, out of LSN order or fails its CRC. Then:
//! - in the **last** segment, if no valid record follows, or the bad region
//!   holds a zeroed header or a zeroed 512-byte sector (a write that never
//!   reached the disk, as etcd's `isTornEntry` reasons), or the bad record's
//!   header straddles a sector boundary and reads zeros from its start to
//!   that boundary while the header is provably not what was written (its
//!   length reads 0, or with 1 to 3 zeroed low length bytes some length
//!   makes the record valid; the disk kept the later sector of the write and
//!   not the earlier one), it is a **torn tail**: [`Wal::open`] truncates
//!   it, fdatasyncs, and reports segment, offset and bytes dropped. Only
//!   bytes that were never fsynced can be torn this way, since every commit
//!   syncs everything before it: a sector that never received a write means
//!   no fdatasync ran after that write;
//! - in an **older** segment, if no valid record follows and the next
//!   segment starts exactly at the LSN where the valid records end, the
//!   segment **ended early** (a torn or preallocated tail left by a process
//!   that stopped; the next process started a fresh segment): no LSN is
//!   missing, readers go on and report it as [`Damage::Torn`]. Nothing is
//!   truncated there;
//! - otherwise it is **corruption** ([`Error::Corruption`]) naming segment,
//!   offset and how many valid records lie beyond; nothing is skipped.
//!   Consecutive segments whose LSNs do not meet are a [`Error::Gap`].
//!
//! Caveat (shared with etcd): a frame whose payload holds a whole aligned
//! 512-byte run of zeros, later hit by real corruption, can be taken for torn.
//!
//! # Group commit
//! [`GroupCommit`] runs a committer thread and a syncer thread, thin shells
//! around two public steps: the committer drains the queue and calls
//! [`write_step`] (stage each request's records into one buffer, one
//! `write`, never waiting for the syncer); the syncer calls [`sync_steps`]
//! on every batch written so far, in order (ONE `fdatasync` for all of them,
//! then settle every request). What arrives while an `fdatasync` runs is
//! written at once and covered by the next one. After a failed `fdatasync` every
//! later batch fails too, even one whose own `fdatasync` returns Ok. A
//! simulator may call the steps itself in any order the threads could run
//! them (see [`group`]).

/// Aborts the process at a named crash point when the `failpoints` feature
/// is on and `FAILPOINTS` names it with the `return` action (for example
/// `FAILPOINTS='wal::commit::after_write=3*off->return'`). Without the
/// feature it compiles to nothing, so release builds pay no cost.
#[macro_export]
macro_rules! crash_point {
    ($name:expr) => {
        $crate::fail::fail_point!($name, |_| {
            eprintln!("logd: crash point {} hit: aborting", $name);
            std::process::abort()
        })
    };
}

#[doc(hidden)]
pub use fail;

pub mod error;
pub mod fs;
pub mod group;
pub mod log;
pub mod read;
pub mod record;
pub mod segment;
#[cfg(feature = "sim")]
pub mod sim;

pub use error::{Error, Result};
pub use group::{GroupCommit, Stage, Submitter, Written, sync_step, sync_steps, write_step};
pub use log::{CommitInfo, OpenReport, SegmentInfo, Segments, TornTail, Unsynced, Wal, WalOptions, WalStats};
pub use read::{ReadSummary, SalvageReport, read_from, salvage, verify};
pub use record::RecordType;
pub use segment::{BadRecord, Damage, LostRange, RecordRef, SegmentScan};
