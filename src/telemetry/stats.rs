//! The live counters every stage keeps and the admin service and Prometheus
//! read. A leaf: it uses nothing of logd, so any stage can own a counter
//! without a dependency on the stages that read it.

use std::sync::atomic::AtomicU64;

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
