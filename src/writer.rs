//! The ingest pipeline's back half: the dispatcher routes durable frames to
//! one writer task per active session; each writer owns its `.logtmp`
//! ([`SessionFile`]), fdatasyncs it every flush interval and records a
//! checkpoint. The dispatcher collects checkpoints and deletes WAL segments
//! every session has materialized.
//!
//! Channels: commit thread → dispatcher is unbounded but its content is
//! bounded by the admission budget (released only after routing); dispatcher
//! → writer is bounded (`WRITER_QUEUE_MAX` batches), so a slow writer pushes
//! back all the way to the clients.
//!
//! Shutdown: when the commit thread drops its sender, the dispatcher routes
//! what is left, closes every writer's queue, and each writer syncs,
//! checkpoints and reports before the dispatcher flushes the store and
//! returns.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tracing::{debug, error, warn};
use wal::Segments;
use wal::fs::Fs;

use crate::ingest::Durable;
use crate::materialize::SessionFile;
use crate::meta::{Checkpoint, MetaStore};
use crate::pb::LogFrame;

/// Batches queued for one writer before the dispatcher waits.
pub const WRITER_QUEUE_MAX: usize = 64;

/// Settings of the writers.
#[derive(Clone)]
pub struct WriterConfig {
    /// The filesystem.
    pub fs: Arc<dyn Fs>,
    /// Where session files live.
    pub log_dir: PathBuf,
    /// Checkpoint store.
    pub meta: Arc<dyn MetaStore>,
    /// How often a writer fdatasyncs and checkpoints.
    pub flush_interval: Duration,
}

/// Live counters of the dispatcher.
#[derive(Debug, Default)]
pub struct DispatchStats {
    /// Sessions with a running writer.
    pub active_sessions: AtomicU64,
    /// Segments below this LSN are materialized everywhere.
    pub removable_below_lsn: AtomicU64,
    /// LSN of the last record handed to a writer.
    pub routed_through: AtomicU64,
}

struct WriterHandle {
    tx: mpsc::Sender<Vec<(u64, LogFrame)>>,
    join: JoinHandle<()>,
}

/// Which WAL records are materialized and checkpointed, so the segments
/// holding only such records can be deleted. Pure bookkeeping: the
/// dispatcher and the power-loss simulation drive the same code.
///
/// # Invariants
/// - Every record below [`CheckpointTracker::safe_lsn`] is in its session's
///   file, fdatasynced, and covered by a checkpoint that was written (the
///   caller flushes the store before deleting segments).
/// - Records are routed in LSN order, so a record not yet routed has an LSN
///   above `routed_through`.
#[derive(Debug, Default)]
pub struct CheckpointTracker {
    sessions: HashMap<String, Track>,
    routed_through: u64,
}

#[derive(Debug, Default)]
struct Track {
    /// LSN of the last record routed to the session.
    routed_lsn: u64,
    /// Lowest LSN that may not be checkpointed yet (None: all checkpointed).
    pending_from: Option<u64>,
}

impl CheckpointTracker {
    /// A tracker for a WAL whose records below `start_lsn` are all materialized.
    pub fn new(start_lsn: u64) -> Self {
        CheckpointTracker {
            sessions: HashMap::new(),
            routed_through: start_lsn.saturating_sub(1),
        }
    }

    /// Records LSNs `first..=last` (some of them) routed to `session`.
    pub fn routed(&mut self, session: &str, first: u64, last: u64) {
        debug_assert!(
            first <= last && first > self.routed_through,
            "records are routed in LSN order"
        );
        let t = match self.sessions.get_mut(session) {
            Some(t) => t,
            None => self.sessions.entry(session.to_owned()).or_default(),
        };
        t.routed_lsn = last;
        t.pending_from.get_or_insert(first);
    }

    /// Every record up to `lsn` has been routed.
    pub fn routed_through(&mut self, lsn: u64) {
        debug_assert!(lsn >= self.routed_through, "routing never goes back");
        self.routed_through = lsn;
    }

    /// The session's checkpoint now covers every record it got up to `lsn`.
    pub fn checkpointed(&mut self, session: &str, lsn: u64) {
        if let Some(t) = self.sessions.get_mut(session) {
            t.pending_from = if lsn >= t.routed_lsn { None } else { Some(lsn + 1) };
        }
    }

    /// Every record below the returned LSN is materialized and checkpointed.
    pub fn safe_lsn(&self) -> u64 {
        let pending = self.sessions.values().filter_map(|t| t.pending_from).min();
        pending.unwrap_or(u64::MAX).min(self.routed_through + 1)
    }

    /// LSN of the last record routed.
    pub fn last_routed(&self) -> u64 {
        self.routed_through
    }

    /// Stops tracking a session with nothing pending (its writer stopped).
    pub fn forget(&mut self, session: &str) {
        if self.sessions.get(session).is_some_and(|t| t.pending_from.is_none()) {
            self.sessions.remove(session);
        }
    }
}

/// A writer's report: the session's checkpoint now covers records up to `lsn`.
struct CheckpointReport {
    session: String,
    lsn: u64,
}

/// Runs the dispatcher until `rx` closes, then shuts every writer down.
/// `routed_through` is the LSN below which everything is materialized at start.
pub async fn run_dispatcher(
    cfg: WriterConfig,
    mut rx: mpsc::UnboundedReceiver<Durable>,
    budget: Arc<Semaphore>,
    segments: Segments,
    start_lsn: u64,
    stats: Arc<DispatchStats>,
) {
    let (ckpt_tx, mut ckpt_rx) = mpsc::unbounded_channel::<CheckpointReport>();
    let mut writers: HashMap<String, WriterHandle> = HashMap::new();
    let mut tracker = CheckpointTracker::new(start_lsn);
    let mut removed_below = 0u64;
    let mut tick = tokio::time::interval(cfg.flush_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut removal: Option<JoinHandle<u64>> = None;
    loop {
        tokio::select! {
            msg = rx.recv() => {
                let Some(batch) = msg else { break };
                route(&cfg, &mut writers, &mut tracker, batch.frames, &ckpt_tx).await;
                budget.add_permits(batch.budget_units as usize);
                stats.routed_through.store(tracker.last_routed(), Ordering::Relaxed);
                stats.active_sessions.store(writers.len() as u64, Ordering::Relaxed);
            }
            Some(report) = ckpt_rx.recv() => tracker.checkpointed(&report.session, report.lsn),
            _ = tick.tick() => {
                let safe = tracker.safe_lsn();
                stats.removable_below_lsn.store(safe, Ordering::Relaxed);
                if let Some(h) = &removal && h.is_finished() {
                    removed_below = removal.take().unwrap().await.unwrap_or(removed_below);
                }
                if removal.is_none() && safe > removed_below {
                    removal = Some(spawn_removal(cfg.meta.clone(), segments.clone(), safe));
                }
            }
        }
    }
    // Shutdown: close every queue, let each writer sync and checkpoint.
    for (_, w) in writers.drain() {
        drop(w.tx);
        if let Err(e) = w.join.await {
            error!("session writer panicked: {e}");
        }
    }
    if let Some(h) = removal {
        let _ = h.await;
    }
    while let Ok(report) = ckpt_rx.try_recv() {
        tracker.checkpointed(&report.session, report.lsn);
    }
    let _ = spawn_removal(cfg.meta.clone(), segments, tracker.safe_lsn()).await;
}

/// Flushes the checkpoint store, then deletes segments below `safe`.
/// Returns `safe` when done (the dispatcher remembers it).
fn spawn_removal(meta: Arc<dyn MetaStore>, segments: Segments, safe: u64) -> JoinHandle<u64> {
    tokio::task::spawn_blocking(move || {
        // Checkpoints must be durable before the WAL records they cover go:
        // recovery trusts a checkpoint's offset to cut a session file back to.
        if let Err(e) = meta.flush() {
            error!("meta store flush failed, keeping WAL segments: {e}");
            return 0;
        }
        wal::crash_point!("dispatcher::after_meta_flush");
        match segments.remove_before(safe) {
            Ok(n) => {
                if n > 0 {
                    debug!(removed = n, below_lsn = safe, "wal segments removed");
                }
                safe
            }
            Err(e) => {
                error!("removing WAL segments below LSN {safe} failed: {e}");
                0
            }
        }
    })
}

async fn route(
    cfg: &WriterConfig,
    writers: &mut HashMap<String, WriterHandle>,
    tracker: &mut CheckpointTracker,
    frames: Vec<(u64, LogFrame)>,
    ckpt_tx: &mpsc::UnboundedSender<CheckpointReport>,
) {
    let Some(&(last_lsn, _)) = frames.last() else { return };
    let mut by_session: HashMap<String, Vec<(u64, LogFrame)>> = HashMap::new();
    for (lsn, frame) in frames {
        match by_session.get_mut(&frame.session_id) {
            Some(v) => v.push((lsn, frame)),
            None => {
                by_session.insert(frame.session_id.clone(), vec![(lsn, frame)]);
            }
        }
    }
    for (session, batch) in by_session {
        tracker.routed(&session, batch[0].0, batch[batch.len() - 1].0);
        let w = match writers.get_mut(&session) {
            Some(w) => w,
            None => {
                let (tx, rx) = mpsc::channel(WRITER_QUEUE_MAX);
                let join = tokio::spawn(run_writer(cfg.clone(), session.clone(), rx, ckpt_tx.clone()));
                writers.entry(session.clone()).or_insert(WriterHandle { tx, join })
            }
        };
        if w.tx.send(batch).await.is_err() {
            error!(
                session,
                "session writer is gone; its frames stay in the WAL until restart"
            );
        }
    }
    tracker.routed_through(last_lsn);
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task panicked")
}

/// One session's writer: appends lines, syncs and checkpoints every flush
/// interval and once more on shutdown.
async fn run_writer(
    cfg: WriterConfig,
    session: String,
    mut rx: mpsc::Receiver<Vec<(u64, LogFrame)>>,
    ckpt_tx: mpsc::UnboundedSender<CheckpointReport>,
) {
    let opened = {
        let (fs, dir, meta, s) = (cfg.fs.clone(), cfg.log_dir.clone(), cfg.meta.clone(), session.clone());
        blocking(move || -> Result<SessionFile, String> {
            let ckpt = meta.checkpoint(&s).map_err(|e| e.to_string())?;
            let (sf, repair) = SessionFile::open(fs, &dir, &s, ckpt).map_err(|e| e.to_string())?;
            if repair.bytes_trimmed > 0 {
                warn!(
                    session = s,
                    bytes = repair.bytes_trimmed,
                    "trimmed session file to its checkpoint"
                );
            }
            Ok(sf)
        })
        .await
    };
    let mut sf = match opened {
        Ok(sf) => sf,
        Err(e) => {
            error!(
                session,
                "cannot open session file: {e}; frames stay in the WAL until restart"
            );
            while rx.recv().await.is_some() {}
            return;
        }
    };
    let mut dirty = false;
    let mut failed = false;
    let mut tick = tokio::time::interval(cfg.flush_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            msg = rx.recv() => {
                let Some(batch) = msg else { break };
                if failed {
                    continue; // durable in the WAL; a restart replays it
                }
                for (lsn, frame) in &batch {
                    sf.append(*lsn, frame);
                }
                if let Err(e) = sf.write_pending() {
                    error!(session, "write to {} failed: {e}; session stops until restart", sf.path().display());
                    failed = true;
                }
                wal::crash_point!("writer::after_write");
                dirty = true;
            }
            _ = tick.tick(), if dirty && !failed => {
                let (back, res) = blocking(move || { let r = sf.sync(); (sf, r) }).await;
                sf = back;
                dirty = false;
                failed = !checkpoint(&cfg, &session, res, &ckpt_tx);
            }
        }
    }
    if dirty && !failed {
        let (back, res) = blocking(move || {
            let r = sf.sync();
            (sf, r)
        })
        .await;
        sf = back;
        checkpoint(&cfg, &session, res, &ckpt_tx);
    }
    drop(sf);
}

/// Records a checkpoint after a sync; false if the sync failed (the writer
/// then stops: after an fdatasync error nothing about the file is known, so
/// it is never retried; the WAL keeps the frames for the next start).
fn checkpoint(
    cfg: &WriterConfig,
    session: &str,
    synced: std::io::Result<Checkpoint>,
    ckpt_tx: &mpsc::UnboundedSender<CheckpointReport>,
) -> bool {
    match synced {
        Ok(ckpt) => {
            wal::crash_point!("writer::after_fsync");
            if let Err(e) = cfg.meta.put_checkpoint(session, &ckpt) {
                error!(session, "checkpoint write failed: {e}");
                return false;
            }
            wal::crash_point!("writer::after_checkpoint_put");
            let _ = ckpt_tx.send(CheckpointReport {
                session: session.to_owned(),
                lsn: ckpt.last_lsn,
            });
            true
        }
        Err(e) => {
            error!(
                session,
                "fdatasync of session file failed: {e}; session stops until restart"
            );
            false
        }
    }
}
