//! The live counters every stage keeps and the admin service and Prometheus
//! read. A leaf: it uses nothing of logd, so any stage can own a counter
//! without a dependency on the stages that read it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Counters shared with the admin service.
#[derive(Debug, Default)]
pub struct IngestStats {
    /// Frames made durable.
    pub accepted: AtomicU64,
    /// Frames dropped as duplicates.
    pub duplicate: AtomicU64,
    /// Frames rejected by validation.
    pub rejected: AtomicU64,
    /// Sessions whose last seq the sequencer holds in memory.
    pub seq_cache_sessions: AtomicU64,
    /// Sessions dropped from that cache (reloaded from the store on return).
    pub seq_cache_evictions: AtomicU64,
}

/// Live counters of the dispatcher, writers and compression pool.
#[derive(Debug, Default)]
pub struct DispatchStats {
    /// Sessions with a running writer.
    pub active_sessions: AtomicU64,
    /// Segments below this LSN are materialized everywhere.
    pub removable_below_lsn: AtomicU64,
    /// LSN of the last record handed to a writer.
    pub routed_through: AtomicU64,
    /// Rotations by reason: size, age, idle, manual.
    pub rotations: [AtomicU64; 4],
    /// Writers stopped after their idle timeout.
    pub evictions: AtomicU64,
    /// Rotations put off because the event outbox was full (attempts).
    pub rotations_deferred: AtomicU64,
    /// Compression jobs queued or running.
    pub compress_backlog: AtomicU64,
    /// Files compressed.
    pub compressed_files: AtomicU64,
    /// Bytes into and out of compression.
    pub compress_bytes_in: AtomicU64,
    /// Bytes out of compression.
    pub compress_bytes_out: AtomicU64,
    /// Session file steps retried after a transient error (EMFILE, ENOMEM, …).
    pub io_retries: AtomicU64,
    /// Session file errors that stopped the process.
    pub fatal_errors: AtomicU64,
    /// Session files closed because another session needed the slot.
    pub files_closed_for_slots: AtomicU64,
    /// Foreign files (symbolic links, non-regular files, files without a
    /// line of logd's) found at a session file's name and moved aside.
    pub foreign_files_moved: AtomicU64,
    /// Each running writer's session, for `logd status`.
    pub sessions: SessionBoard,
}

/// What a running writer tells of its session (`logd status`); it writes
/// these after each step, the admin service reads them.
#[derive(Debug, Default)]
pub struct SessionCell {
    /// Highest seq written to the session's files.
    pub last_seq: AtomicI64,
    /// Size of the open file; while it is closed for a slot, its last
    /// size; 0 when no file holds lines (rotated, or none yet).
    pub file_bytes: AtomicU64,
    /// Wall clock (ms) when the open file was started; 0: no file open, or
    /// nothing written to it yet.
    pub file_opened_at_ms: AtomicU64,
    /// Whether a file is open.
    pub file_open: std::sync::atomic::AtomicBool,
    /// Wall clock (ms) of the last frame routed to the writer.
    pub last_frame_at_ms: AtomicU64,
}

/// One session's [`SessionCell`], read at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSnapshot {
    /// The session.
    pub session: String,
    /// See [`SessionCell`].
    pub last_seq: i64,
    /// See [`SessionCell`].
    pub file_bytes: u64,
    /// See [`SessionCell`].
    pub file_opened_at_ms: u64,
    /// See [`SessionCell`].
    pub file_open: bool,
    /// See [`SessionCell`].
    pub last_frame_at_ms: u64,
}

/// The sessions with a running writer, each with its [`SessionCell`].
/// Bounded by LOGD_SESSIONS_ACTIVE_MAX: a writer registers when it starts
/// and unregisters when it stops.
#[derive(Debug, Default)]
pub struct SessionBoard {
    /// session → (writer id, its cell).
    cells: Mutex<HashMap<String, (u64, Arc<SessionCell>)>>,
}

impl SessionBoard {
    fn cells(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, Arc<SessionCell>)>> {
        self.cells.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writer `id` of `session` starts: its cell (a successor replaces its
    /// predecessor's, keeping what it knew).
    pub fn register(&self, session: &str, id: u64) -> Arc<SessionCell> {
        let mut cells = self.cells();
        let cell = Arc::new(SessionCell::default());
        if let Some((_, old)) = cells.get(session) {
            let l = Ordering::Relaxed;
            cell.last_seq.store(old.last_seq.load(l), l);
            cell.file_bytes.store(old.file_bytes.load(l), l);
            cell.last_frame_at_ms.store(old.last_frame_at_ms.load(l), l);
        }
        cells.insert(session.to_owned(), (id, cell.clone()));
        cell
    }

    /// Writer `id` of `session` stopped (a successor's cell stays).
    pub fn unregister(&self, session: &str, id: u64) {
        let mut cells = self.cells();
        if cells.get(session).is_some_and(|(owner, _)| *owner == id) {
            cells.remove(session);
        }
    }

    /// The `top` sessions with the largest files (ties by name), or only
    /// `session` when given.
    pub fn snapshot(&self, top: usize, session: Option<&str>) -> Vec<SessionSnapshot> {
        let read = |name: &str, c: &SessionCell| {
            let l = Ordering::Relaxed;
            SessionSnapshot {
                session: name.to_owned(),
                last_seq: c.last_seq.load(l),
                file_bytes: c.file_bytes.load(l),
                file_opened_at_ms: c.file_opened_at_ms.load(l),
                file_open: c.file_open.load(l),
                last_frame_at_ms: c.last_frame_at_ms.load(l),
            }
        };
        let cells = self.cells();
        if let Some(s) = session {
            return cells.get(s).map(|(_, c)| read(s, c)).into_iter().collect();
        }
        let mut all: Vec<SessionSnapshot> = cells.iter().map(|(s, (_, c))| read(s, c)).collect();
        drop(cells);
        all.sort_by(|a, b| b.file_bytes.cmp(&a.file_bytes).then_with(|| a.session.cmp(&b.session)));
        all.truncate(top);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_board_lists_the_largest_sessions_first_and_a_successor_outlives_its_predecessor() {
        let b = SessionBoard::default();
        for (i, s) in ["a", "b", "c"].iter().enumerate() {
            let c = b.register(s, i as u64);
            c.file_bytes.store(10 * (i as u64 + 1), Ordering::Relaxed);
            c.last_seq.store(i as i64 + 1, Ordering::Relaxed);
        }
        let top: Vec<String> = b.snapshot(2, None).into_iter().map(|s| s.session).collect();
        assert_eq!(top, ["c", "b"]);
        assert_eq!(b.snapshot(10, Some("a"))[0].file_bytes, 10);
        assert!(b.snapshot(10, Some("z")).is_empty());
        // Writer 7 succeeds writer 0 of "a"; the predecessor's stop leaves it.
        b.register("a", 7);
        b.unregister("a", 0);
        let a = b.snapshot(1, Some("a"));
        assert_eq!(a[0].last_seq, 1, "the successor starts from what was known");
        b.unregister("a", 7);
        assert!(b.snapshot(10, Some("a")).is_empty());
        assert_eq!(b.snapshot(10, None).len(), 2);
    }
}

/// Counters of the mirror.
#[derive(Debug, Default)]
pub struct MirrorStats {
    /// Events accepted by Redis.
    pub published: AtomicU64,
    /// Failed XADD attempts (each retried).
    pub failed: AtomicU64,
    /// Events in the outbox at the last look.
    pub pending: AtomicU64,
}
