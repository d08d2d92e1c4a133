//! The ingest pipeline's back half: the dispatcher routes durable frames to
//! one writer per active session; each writer owns its `.logtmp`
//! ([`store::SessionFile`]), fdatasyncs it every flush
//! interval, records a checkpoint, and rotates the file on size, age, idle
//! time or request ([`store::rotate`]). A writer idle past the timeout
//! rotates, closes its file and stops; the session comes back on its next
//! frame. Rotated files go to a bounded compression pool. The dispatcher
//! collects checkpoints and deletes WAL segments every session has
//! materialized.
//!
//! The logic is synchronous and shared with the power-loss simulation; the
//! tokio tasks only carry messages, timers and blocking threads:
//! - [`core`]: the session writer as a state machine ([`SessionWriter`]);
//! - [`dispatch`]: routing a durable batch (grouping by session, splitting
//!   the admission budget), checkpoint tracking, writer succession and WAL
//!   segment removal, as plain functions;
//! - [`tasks`]: the dispatcher and writer tasks ([`run_dispatcher`]);
//! - [`compress`]: the compression pool ([`run_compression_pool`]).
//!
//! Open files are bounded ([`crate::pipeline::openfiles`]): a writer holds a slot while
//! its file is open and closes it (synced and checkpointed) when another
//! session needs the slot. I/O errors are decided per error ([`on_error`]):
//! shortages are retried with capped backoff; anything else, and every
//! fdatasync error, stops the process (exit 1) so that a restart recovers
//! from the disk, as after a WAL error.
//!
//! Channels: commit thread → dispatcher → writers are unbounded queues whose
//! content is bounded by the admission budget (`LOGD_INFLIGHT_BYTES_MAX`):
//! a writer returns a batch's budget only once it has appended the batch to
//! its file's pending lines (at most [`PENDING_WRITE_BYTES`] per open file,
//! written at that size or the flush tick), so queued frames never exceed
//! the budget, a slow writer pushes back all
//! the way to the clients, and the dispatcher itself never waits on one
//! session (no head-of-line blocking). The compression queue is bounded and
//! a full queue leaves the job in the store for the next pass.
//!
//! Shutdown: when the commit thread drops its sender, the dispatcher routes
//! what is left, closes every writer's queue, and each writer syncs,
//! checkpoints and reports before the dispatcher flushes the store and
//! returns. Shutdown does not rotate: the next start continues the `.logtmp`.

pub mod compress;
pub mod core;
pub mod dispatch;
pub mod step;
pub mod tasks;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, Semaphore, mpsc, oneshot};
use wal::fs::Fs;

use crate::telemetry::stats::DispatchStats;

use crate::pipeline::openfiles::OpenFiles;
use store::FileOp;
use store::Lifecycle;
use store::RotateReason;
use store::{CompressJob, MetaStore};

pub use compress::run_compression_pool;
pub use core::SessionWriter;
pub use dispatch::CheckpointTracker;
pub use step::{Output, Step};
pub use tasks::run_dispatcher;

/// Compression jobs queued before new ones wait in the store only.
pub const COMPRESS_QUEUE_MAX: usize = 1024;

/// When files rotate.
#[derive(Debug, Clone, Copy)]
pub struct RotationLimits {
    /// A `.logtmp` never grows past this size: it rotates before the line
    /// that would cross it (a larger line gets a file of its own).
    pub file_bytes_max: u64,
    /// Rotate when the `.logtmp` is this old.
    pub file_age_max: Duration,
    /// Rotate, close and stop a writer idle this long.
    pub idle_timeout: Duration,
}

/// Settings of the writers: what each writer's state machine needs
/// ([`Settings`]) and the async plumbing around it.
#[derive(Clone)]
pub struct WriterConfig {
    /// The filesystem, directory, store, limits and counters.
    pub settings: Settings,
    /// How often a writer fdatasyncs and checkpoints.
    pub flush_interval: Duration,
    /// Rotated files waiting for compression.
    pub compress_tx: mpsc::Sender<CompressJob>,
    /// Woken when an event enters the outbox.
    pub events_added: Arc<Notify>,
    /// The admission budget, returned by writers once a batch is written.
    pub budget: Arc<Semaphore>,
    /// Where writers put their checkpoints (batched into `meta`).
    pub checkpoints: crate::pipeline::checkpoints::CheckpointBatcher,
    /// Slots of LOGD_SESSIONS_ACTIVE_MAX: told when writers start and stop.
    pub active: Arc<crate::pipeline::sessions::ActiveSessions>,
    /// The bound on open session files (`LOGD_OPEN_FILES_MAX`).
    pub open_files: Arc<OpenFiles>,
    /// Cancelled by a writer after a non-transient I/O error: logd then
    /// shuts down and exits 1, as after a WAL error.
    pub fatal: tokio_util::sync::CancellationToken,
}

fn reason_index(r: RotateReason) -> usize {
    match r {
        RotateReason::Size => 0,
        RotateReason::Age => 1,
        RotateReason::Idle => 2,
        RotateReason::Manual | RotateReason::Recovery => 3,
    }
}

/// What a writer is asked to do.
pub enum WriterMsg {
    /// Materialize these durable frames, then return this many budget units.
    Frames(Vec<(u64, store::Line)>, u32),
    /// Rotate now; the reply names the rotated file (None: file was empty).
    Rotate(oneshot::Sender<Result<Option<String>, String>>),
}

/// Control requests to the dispatcher (from the admin service).
pub enum Control {
    /// Rotate one session (`Some`) or every active one (`None`).
    Rotate {
        /// The session, or all.
        session: Option<String>,
        /// Rotated file names, or why not.
        reply: oneshot::Sender<Result<Vec<String>, String>>,
    },
}

impl WriterConfig {
    /// What a [`SessionWriter`] needs of these settings.
    pub fn settings(&self) -> Settings {
        self.settings.clone()
    }
}

/// A writer writes its rendered lines once this many bytes are pending, and
/// at every flush tick (before the fdatasync), rotation and stop. One write
/// per batch cost a syscall per frame with many sessions (each commit gives
/// a session a frame or two); acked frames are durable in the WAL meanwhile,
/// and readers of a live `.logtmp` see them at most one flush interval late.
/// Pending lines are outside the admission budget (a batch's budget comes
/// back once it is appended): holding it until the write stalled every
/// stream when a small budget was spread over many sessions.
pub const PENDING_WRITE_BYTES: usize = 32 << 10;

/// What a writer does about a failed step of its file's I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// A transient shortage (descriptors, memory, an interrupted call):
    /// wait with bounded backoff and do the step again. Safe because the
    /// step changed nothing that a retry would get wrong.
    Retry,
    /// Anything else: stop the whole process (exit 1) so that the next start
    /// decides from what is on disk. An fdatasync error is always this:
    /// after one, the state of the file's pages is unknown and a retry that
    /// succeeds proves nothing.
    FailStop,
}

/// The decision for an error `err` of step `op` of a session file.
pub fn on_error(op: FileOp, err: &std::io::Error) -> OnError {
    let transient = |codes: &[i32]| err.raw_os_error().is_some_and(|c| codes.contains(&c));
    let decision = match op {
        FileOp::DataSync => false,
        // The directory's fsync is opened first: a shortage there means the
        // open failed and no fsync ran.
        FileOp::DirSync => transient(&[libc::EMFILE, libc::ENFILE, libc::ENOMEM]),
        FileOp::Open | FileOp::Write => {
            transient(&[libc::EMFILE, libc::ENFILE, libc::ENOMEM, libc::EAGAIN, libc::EINTR])
                || err.kind() == std::io::ErrorKind::Interrupted
        }
    };
    if decision { OnError::Retry } else { OnError::FailStop }
}

/// Why rotations must wait now: the event outbox holds
/// LOGD_OUTBOX_EVENTS_MAX events or more (None: room, or no events).
pub fn outbox_full(cfg: &WriterConfig) -> Option<String> {
    outbox_full_for(
        cfg.settings.meta.as_ref(),
        cfg.settings.life,
        cfg.settings.outbox_events_max,
    )
}

/// What a writer needs to know, without the async plumbing.
#[derive(Clone)]
pub struct Settings {
    /// The filesystem.
    pub fs: Arc<dyn Fs>,
    /// Where session files live.
    pub log_dir: PathBuf,
    /// Checkpoint, rotation and event store.
    pub meta: Arc<dyn MetaStore>,
    /// Rotation triggers.
    pub limits: RotationLimits,
    /// Compression and events.
    pub life: Lifecycle,
    /// LOGD_OUTBOX_EVENTS_MAX: with events on, rotations wait while the
    /// outbox holds this many events.
    pub outbox_events_max: usize,
    /// Counters.
    pub stats: Arc<DispatchStats>,
}

/// Why rotations must wait now: the event outbox holds
/// LOGD_OUTBOX_EVENTS_MAX events or more (None: room, or no events).
pub fn outbox_full_for(meta: &dyn MetaStore, life: Lifecycle, outbox_events_max: usize) -> Option<String> {
    if !life.events {
        return None;
    }
    let held = meta.outbox_len().ok()?;
    (held >= outbox_events_max).then(|| {
        format!(
            "rotation waits: the event outbox holds {held} events (LOGD_OUTBOX_EVENTS_MAX {outbox_events_max}) until Redis takes some"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Error;

    #[test]
    fn shortages_are_retried_and_every_other_error_stops_the_process() {
        let os = Error::from_raw_os_error;
        for op in [FileOp::Open, FileOp::Write] {
            for code in [libc::EMFILE, libc::ENFILE, libc::ENOMEM, libc::EAGAIN, libc::EINTR] {
                assert_eq!(on_error(op, &os(code)), OnError::Retry, "{op} {code}");
            }
            for code in [
                libc::EIO,
                libc::ENOSPC,
                libc::EDQUOT,
                libc::EROFS,
                libc::EACCES,
                libc::ELOOP,
            ] {
                assert_eq!(on_error(op, &os(code)), OnError::FailStop, "{op} {code}");
            }
        }
        // The directory's fsync opens it first: only a shortage on that open
        // is retried.
        assert_eq!(on_error(FileOp::DirSync, &os(libc::EMFILE)), OnError::Retry);
        assert_eq!(on_error(FileOp::DirSync, &os(libc::EIO)), OnError::FailStop);
        assert_eq!(on_error(FileOp::DirSync, &os(libc::EINTR)), OnError::FailStop);
    }

    #[test]
    fn an_fdatasync_error_is_never_retried_whatever_its_errno() {
        for code in [
            libc::EIO,
            libc::ENOSPC,
            libc::EMFILE,
            libc::ENOMEM,
            libc::EAGAIN,
            libc::EINTR,
        ] {
            assert_eq!(
                on_error(FileOp::DataSync, &Error::from_raw_os_error(code)),
                OnError::FailStop,
                "{code}"
            );
        }
    }
}
