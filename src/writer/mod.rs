//! The ingest pipeline's back half: the dispatcher routes durable frames to
//! one writer task per active session; each writer owns its `.logtmp`
//! ([`SessionFile`]), fdatasyncs it every flush interval, records a
//! checkpoint, and rotates the file on size, age, idle time or request
//! ([`crate::rotate`]). A writer idle past the timeout rotates, closes its
//! file and stops; the session comes back on its next frame. Rotated files
//! go to a bounded compression pool. The dispatcher collects checkpoints and
//! deletes WAL segments every session has materialized.
//!
//! Open files are bounded ([`crate::openfiles`]): a writer holds a slot while
//! its file is open and closes it (synced and checkpointed) when another
//! session needs the slot. I/O errors are decided per error ([`on_error`]):
//! shortages are retried with capped backoff; anything else, and every
//! fdatasync error, stops the process (exit 1) so that a restart recovers
//! from the disk, as after a WAL error.
//!
//! Channels: commit thread → dispatcher → writers are unbounded queues whose
//! content is bounded by the admission budget (`LOGD_INFLIGHT_BYTES_MAX`):
//! a writer returns a batch's budget only once it has written the batch, so
//! frames in memory never exceed the budget, a slow writer pushes back all
//! the way to the clients, and the dispatcher itself never waits on one
//! session (no head-of-line blocking). The compression queue is bounded and
//! a full queue leaves the job in the store for the next pass.
//!
//! Shutdown: when the commit thread drops its sender, the dispatcher routes
//! what is left, closes every writer's queue, and each writer syncs,
//! checkpoints and reports before the dispatcher flushes the store and
//! returns. Shutdown does not rotate: the next start continues the `.logtmp`.

use foldhash::{HashMap, HashMapExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};
use wal::Segments;
use wal::fs::Fs;

use crate::events::{RotateReason, now_ms};
use crate::ingest::Durable;
use crate::materialize::{Appended, FileOp, SessionFile, logtmp_path};
use crate::meta::{CompressJob, MetaStore};
use crate::openfiles::{FileSlot, OpenFiles};
use crate::pb::LogFrame;
use crate::rotate::{CompressionRun, Lifecycle, Rotation, rotate_synced, run_compression};

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
    /// Rotation triggers.
    pub limits: RotationLimits,
    /// Compression and events.
    pub life: Lifecycle,
    /// Rotated files waiting for compression.
    pub compress_tx: mpsc::Sender<CompressJob>,
    /// Woken when an event enters the outbox.
    pub events_added: Arc<Notify>,
    /// Counters.
    pub stats: Arc<DispatchStats>,
    /// The admission budget, returned by writers once a batch is written.
    pub budget: Arc<Semaphore>,
    /// Where writers put their checkpoints (batched into `meta`).
    pub checkpoints: crate::meta::CheckpointBatcher,
    /// Slots of LOGD_SESSIONS_ACTIVE_MAX: told when writers start and stop.
    pub active: Arc<crate::sessions::ActiveSessions>,
    /// LOGD_OUTBOX_EVENTS_MAX: with events on, rotations wait while the
    /// outbox holds this many events.
    pub outbox_events_max: usize,
    /// The bound on open session files (`LOGD_OPEN_FILES_MAX`).
    pub open_files: Arc<OpenFiles>,
    /// Cancelled by a writer after a non-transient I/O error: logd then
    /// shuts down and exits 1, as after a WAL error.
    pub fatal: tokio_util::sync::CancellationToken,
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
    Frames(Vec<(u64, LogFrame)>, u32),
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

struct WriterHandle {
    tx: mpsc::UnboundedSender<WriterMsg>,
    /// Resolves to whether the writer had failed (an I/O error that stopped
    /// the process).
    join: JoinHandle<bool>,
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

/// A writer's news for the dispatcher.
enum Report {
    /// The session's checkpoint now covers records up to `lsn`.
    Checkpointed { session: String, lsn: u64 },
    /// The writer stopped (idle); it took no frame after its last checkpoint.
    Stopped { session: String },
}

/// Runs the dispatcher until `rx` closes, then shuts every writer down.
/// Records below `start_lsn` are materialized at start.
pub async fn run_dispatcher(
    cfg: WriterConfig,
    mut rx: mpsc::UnboundedReceiver<Durable>,
    mut control: mpsc::Receiver<Control>,
    segments: Segments,
    start_lsn: u64,
) {
    let stats = cfg.stats.clone();
    let (report_tx, mut report_rx) = mpsc::unbounded_channel::<Report>();
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
                route(&cfg, &mut writers, &mut tracker, batch.frames, batch.budget_units, &report_tx);
                stats.routed_through.store(tracker.last_routed(), Ordering::Relaxed);
            }
            Some(ctl) = control.recv() => rotate_on_request(&cfg, &mut writers, &report_tx, ctl).await,
            Some(report) = report_rx.recv() => match report {
                Report::Checkpointed { session, lsn } => tracker.checkpointed(&session, lsn),
                Report::Stopped { session } => {
                    if writers.get(&session).is_some_and(|w| w.tx.is_closed()) {
                        writers.remove(&session);
                        tracker.forget(&session);
                        cfg.active.writer_stopped(&session);
                    }
                }
            },
            _ = tick.tick() => {
                stats.active_sessions.store(writers.len() as u64, Ordering::Relaxed);
                cfg.active.expire_reservations(crate::sessions::RESERVATION_TTL);
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
    while let Ok(report) = report_rx.try_recv() {
        if let Report::Checkpointed { session, lsn } = report {
            tracker.checkpointed(&session, lsn);
        }
    }
    let _ = spawn_removal(cfg.meta.clone(), segments, tracker.safe_lsn()).await;
}

/// Asks the writer(s) to rotate and answers with the rotated files, without
/// blocking the dispatcher while they work.
async fn rotate_on_request(
    cfg: &WriterConfig,
    writers: &mut HashMap<String, WriterHandle>,
    report_tx: &mpsc::UnboundedSender<Report>,
    ctl: Control,
) {
    let Control::Rotate { session, reply } = ctl;
    let targets: Vec<String> = match session {
        // A session with neither a writer nor a live file has nothing to
        // rotate: starting a writer for it would only make an empty file.
        Some(s) if !writers.contains_key(&s) && !cfg.fs.exists(&logtmp_path(&cfg.log_dir, &s)) => Vec::new(),
        Some(s) => vec![s],
        None => writers.keys().cloned().collect(),
    };
    let mut waits = Vec::new();
    for s in targets {
        let (tx, rx) = oneshot::channel();
        let w = writer_for(cfg, writers, report_tx, &s);
        if w.tx.send(WriterMsg::Rotate(tx)).is_ok() {
            waits.push(rx);
        }
    }
    tokio::spawn(async move {
        let mut files = Vec::new();
        for rx in waits {
            match rx.await {
                Ok(Ok(Some(f))) => files.push(f),
                Ok(Ok(None)) | Err(_) => {}
                Ok(Err(e)) => {
                    let _ = reply.send(Err(e));
                    return;
                }
            }
        }
        let _ = reply.send(Ok(files));
    });
}

/// The session's writer, started if it is not running.
fn writer_for<'a>(
    cfg: &WriterConfig,
    writers: &'a mut HashMap<String, WriterHandle>,
    report_tx: &mpsc::UnboundedSender<Report>,
    session: &str,
) -> &'a mut WriterHandle {
    // A writer that went idle closed its queue but may still be draining
    // it: the new writer waits for it, so one file never has two writers.
    let stale = writers.get(session).is_some_and(|w| w.tx.is_closed());
    let predecessor = if stale {
        writers.remove(session).map(|w| w.join)
    } else {
        None
    };
    writers.entry(session.to_owned()).or_insert_with(|| {
        cfg.active.writer_started(session);
        let (tx, rx) = mpsc::unbounded_channel();
        let join = tokio::spawn(run_writer(
            cfg.clone(),
            session.to_owned(),
            rx,
            report_tx.clone(),
            predecessor,
        ));
        WriterHandle { tx, join }
    })
}

/// Flushes the checkpoint store, then deletes segments below `safe`.
/// Returns `safe` when done (the dispatcher remembers it).
fn spawn_removal(meta: Arc<dyn MetaStore>, segments: Segments, safe: u64) -> JoinHandle<u64> {
    tokio::task::spawn_blocking(move || {
        // Checkpoints must be durable before the WAL records they cover go:
        // recovery starts from a checkpoint's offset when it scans a file.
        // The mark goes with them (salvage reads it).
        if let Err(e) = meta
            .apply(vec![crate::meta::materialized_below_op(safe)])
            .and_then(|()| meta.flush())
        {
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

fn route(
    cfg: &WriterConfig,
    writers: &mut HashMap<String, WriterHandle>,
    tracker: &mut CheckpointTracker,
    frames: Vec<(u64, LogFrame)>,
    budget_units: u32,
    report_tx: &mpsc::UnboundedSender<Report>,
) {
    let Some(&(last_lsn, _)) = frames.last() else {
        cfg.budget.add_permits(budget_units as usize);
        return;
    };
    let total_frames = frames.len() as u64;
    let mut by_session: HashMap<String, Vec<(u64, LogFrame)>> = HashMap::new();
    for (lsn, frame) in frames {
        match by_session.get_mut(&frame.session_id) {
            Some(v) => v.push((lsn, frame)),
            None => {
                by_session.insert(frame.session_id.clone(), vec![(lsn, frame)]);
            }
        }
    }
    // Each session's share of the budget, by frames; the shares sum exactly.
    let groups = by_session.len();
    let mut units_left = budget_units;
    for (i, (session, batch)) in by_session.into_iter().enumerate() {
        tracker.routed(&session, batch[0].0, batch[batch.len() - 1].0);
        let units = if i + 1 == groups {
            units_left
        } else {
            ((budget_units as u64 * batch.len() as u64) / total_frames) as u32
        };
        units_left -= units;
        let mut msg = WriterMsg::Frames(batch, units);
        // A writer that stopped (idle) between our look and the send hands
        // the batch back; a fresh writer takes it.
        for _ in 0..2 {
            let w = writer_for(cfg, writers, report_tx, &session);
            match w.tx.send(msg) {
                Ok(()) => break,
                Err(mpsc::error::SendError(back)) => msg = back,
            }
        }
    }
    tracker.routed_through(last_lsn);
}

/// Session writers' blocking file operations (open, fdatasync, rotate)
/// running at once, at most. Without a bound, 1,000 sessions syncing every
/// flush interval grew tokio's blocking pool to ~400 threads: ~80 MiB of
/// stacks and allocator caches, and a wakeup storm (10% of CPU). Writers
/// beyond it wait their turn; each operation is short.
const WRITER_BLOCKING_OPS_MAX: usize = 16;

static WRITER_BLOCKING_OPS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(WRITER_BLOCKING_OPS_MAX);

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let _turn = WRITER_BLOCKING_OPS.acquire().await.expect("never closed");
    tokio::task::spawn_blocking(f).await.expect("blocking task panicked")
}

/// A writer writes its rendered lines once this many bytes are pending, and
/// at every flush tick (before the fdatasync), rotation and stop. One write
/// per batch cost a syscall per frame with many sessions (each commit gives
/// a session a frame or two); acked frames are durable in the WAL meanwhile,
/// and readers of a live `.logtmp` see them at most one flush interval late.
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

/// Capped exponential backoff between retries of a transient error.
struct Backoff {
    attempt: u32,
}

/// First retry delay; it doubles up to [`RETRY_DELAY_MAX`].
const RETRY_DELAY_FIRST: Duration = Duration::from_millis(10);
/// Longest delay between two retries of a transient error.
const RETRY_DELAY_MAX: Duration = Duration::from_secs(2);

impl Backoff {
    fn new() -> Self {
        Backoff { attempt: 0 }
    }

    async fn wait(&mut self, w: &Writer, what: &str) {
        let delay = RETRY_DELAY_FIRST
            .saturating_mul(1 << self.attempt.min(10))
            .min(RETRY_DELAY_MAX);
        if self.attempt == 0 || self.attempt.is_power_of_two() {
            warn!(
                session = w.session,
                attempt = self.attempt + 1,
                delay_ms = delay.as_millis() as u64,
                "{what}; transient, retrying"
            );
        }
        w.cfg.stats.io_retries.fetch_add(1, Ordering::Relaxed);
        self.attempt += 1;
        tokio::time::sleep(delay).await;
    }
}

/// A session writer's state between messages.
struct Writer {
    cfg: WriterConfig,
    session: String,
    file: Option<SessionFile>,
    /// Held exactly while `file` is open (`LOGD_OPEN_FILES_MAX`).
    slot: Option<FileSlot>,
    /// Woken when another session needs this writer's slot.
    close_wake: Arc<Notify>,
    /// The file was closed for lack of slots while it held lines: idle
    /// rotation must still rotate it.
    closed_with_lines: bool,
    dirty: bool,
    failed: bool,
    last_frame_at: Instant,
    report_tx: mpsc::UnboundedSender<Report>,
}

impl Writer {
    /// Stops the process after a non-transient error: logs it, marks the
    /// writer failed (it touches its file no more) and cancels the fatal
    /// token, which shuts logd down and makes it exit 1, as a WAL error
    /// does. The WAL keeps every frame the file may lack, and the next
    /// start's recovery repairs the file from the disk.
    fn fail_stop(&mut self, what: &str) {
        error!(
            session = self.session,
            "{what}; stopping logd (exit 1) so that a restart recovers the session file from the disk and the WAL"
        );
        self.failed = true;
        self.cfg.stats.fatal_errors.fetch_add(1, Ordering::Relaxed);
        self.cfg.fatal.cancel();
    }

    /// Logs and counts a foreign file the session file's open moved aside.
    fn note_moved_aside(&self, sf: &mut SessionFile) {
        self.report_moved_aside(sf.take_moved_aside());
    }

    fn report_moved_aside(&self, moved: Option<std::path::PathBuf>) {
        if let Some(aside) = moved {
            error!(
                session = self.session,
                moved_to = %aside.display(),
                "the session file's name held a symbolic link, a file that is not regular, or a file without \
                 one line of logd's: moved aside untouched (never written through); the session continues in a new file"
            );
            self.cfg.stats.foreign_files_moved.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Closes the file and frees its slot.
    fn close_file(&mut self) {
        self.file = None;
        self.slot = None;
    }

    /// Opens the session's file if it is not open (waiting for a slot).
    async fn ensure_open(&mut self) -> bool {
        if self.file.is_some() {
            return true;
        }
        if self.failed {
            return false;
        }
        debug_assert!(self.slot.is_none(), "no slot without a file");
        let slot = self
            .cfg
            .open_files
            .acquire(&self.session, self.close_wake.clone())
            .await;
        let mut backoff = Backoff::new();
        loop {
            let (fs, dir, meta, s) = (
                self.cfg.fs.clone(),
                self.cfg.log_dir.clone(),
                self.cfg.meta.clone(),
                self.session.clone(),
            );
            let opened = blocking(move || {
                let ckpt = match meta.checkpoint(&s) {
                    Ok(c) => c,
                    Err(e) => return Err((None, format!("cannot read the checkpoint of session {s}: {e}"))),
                };
                SessionFile::open(fs, &dir, &s, ckpt).map_err(|e| {
                    let what = format!("cannot open session file {}: {e}", logtmp_path(&dir, &s).display());
                    (Some(e), what)
                })
            })
            .await;
            match opened {
                Ok((mut sf, repair)) => {
                    self.note_moved_aside(&mut sf);
                    if repair.bytes_trimmed > 0 {
                        warn!(
                            session = self.session,
                            bytes = repair.bytes_trimmed,
                            "trimmed a torn end of the session file"
                        );
                    }
                    self.file = Some(sf);
                    self.slot = Some(slot);
                    self.closed_with_lines = false;
                    return true;
                }
                Err((Some(e), what)) if on_error(FileOp::Open, &e) == OnError::Retry => {
                    backoff.wait(self, &what).await;
                }
                Err((_, what)) => {
                    self.fail_stop(&what);
                    return false;
                }
            }
        }
    }

    async fn frames(&mut self, batch: Vec<(u64, LogFrame)>) {
        self.last_frame_at = Instant::now();
        if self.failed || !self.ensure_open().await {
            return; // durable in the WAL; the restart after a fail-stop replays it
        }
        self.cfg.open_files.touch(&self.session);
        let size_max = self.cfg.limits.file_bytes_max;
        for (lsn, frame) in &batch {
            // The size limit holds per line: rotate before a line that
            // would cross it (a line larger than the limit gets a file of
            // its own).
            loop {
                if self.failed || (self.file.is_none() && !self.ensure_open().await) {
                    return;
                }
                let sf = self.file.as_mut().expect("open");
                match sf.append_within(*lsn, frame, size_max) {
                    Appended::Written => {
                        self.dirty = true;
                        break;
                    }
                    Appended::Skipped => break,
                    Appended::Full => {
                        if self.rotate(RotateReason::Size).await.is_ok() {
                            continue;
                        }
                        if self.failed {
                            return; // stopped: a restart replays the rest from the WAL
                        }
                        // The rotation waits (the event outbox is full) and
                        // left the file open: the line goes in now, past the
                        // limit, rather than be dropped (every acked frame is
                        // written, in order); a later size check rotates.
                        let sf = self.file.as_mut().expect("a waiting rotation leaves the file open");
                        sf.append(*lsn, frame);
                        self.dirty = true;
                        break;
                    }
                }
            }
        }
        // One write per batch (not per frame) once enough is pending.
        if self
            .file
            .as_ref()
            .is_some_and(|sf| sf.pending_bytes() >= PENDING_WRITE_BYTES)
        {
            self.write_pending().await;
        }
        if self.file.as_ref().is_some_and(|sf| sf.size() >= size_max) {
            self.rotate(RotateReason::Size).await.ok();
        }
    }

    /// Writes the rendered lines to the file (page cache), retrying
    /// transient errors; false after a fail-stop.
    async fn write_pending(&mut self) -> bool {
        let mut backoff = Backoff::new();
        loop {
            if self.failed {
                return false;
            }
            let Some(sf) = self.file.as_mut() else { return true };
            if sf.pending_bytes() == 0 {
                return true;
            }
            let written = sf.write_pending();
            let moved = sf.take_moved_aside();
            self.report_moved_aside(moved);
            match written {
                Ok(()) => {
                    wal::crash_point!("writer::after_write");
                    return true;
                }
                Err(e) if on_error(e.op, &e.source) == OnError::Retry => {
                    backoff.wait(self, &e.to_string()).await;
                }
                Err(e) => {
                    self.fail_stop(&e.to_string());
                    return false;
                }
            }
        }
    }

    /// Writes, fdatasyncs and checkpoints the file; false after a
    /// fail-stop. An fdatasync error is never retried (see [`on_error`]).
    async fn sync(&mut self) -> bool {
        if !self.write_pending().await {
            return false;
        }
        let mut backoff = Backoff::new();
        let ckpt = loop {
            let Some(mut sf) = self.file.take() else { return true };
            let (sf, synced) = blocking(move || {
                let r = sf.sync();
                (sf, r)
            })
            .await;
            self.file = Some(sf);
            match synced {
                Ok(c) => break c,
                Err(e) if on_error(e.op, &e.source) == OnError::Retry => {
                    backoff.wait(self, &e.to_string()).await;
                }
                Err(e) => {
                    self.fail_stop(&e.to_string());
                    return false;
                }
            }
        };
        self.dirty = false;
        wal::crash_point!("writer::after_fsync");
        if let Err(e) = self.cfg.checkpoints.put(&self.session, &ckpt).await {
            self.fail_stop(&format!("checkpoint write failed: {e}"));
            return false;
        }
        wal::crash_point!("writer::after_checkpoint_put");
        let _ = self.report_tx.send(Report::Checkpointed {
            session: self.session.clone(),
            lsn: ckpt.last_lsn,
        });
        true
    }

    /// Syncs, checkpoints and closes the file because another session needs
    /// its slot (it is reopened on the next frame).
    async fn close_for_slot(&mut self) {
        if self.file.is_none() || !self.cfg.open_files.close_asked(&self.session) {
            return;
        }
        if !self.sync().await {
            return;
        }
        self.closed_with_lines |= self.file.as_ref().is_some_and(|f| f.size() > 0);
        self.close_file();
        self.cfg.stats.files_closed_for_slots.fetch_add(1, Ordering::Relaxed);
    }

    /// Rotates the open file (if it holds anything). Returns its new name.
    /// While the event outbox is full (LOGD_OUTBOX_EVENTS_MAX) the rotation
    /// waits: Err, nothing changes, and the next size check, tick or idle
    /// check tries again; frames keep going to the `.logtmp`.
    async fn rotate(&mut self, reason: RotateReason) -> Result<Option<String>, String> {
        if self.failed {
            return Err(format!("session {} is stopped after an I/O error", self.session));
        }
        if let Some(full) = outbox_full(&self.cfg) {
            self.cfg.stats.rotations_deferred.fetch_add(1, Ordering::Relaxed);
            debug!(session = self.session, ?reason, "rotation waits: {full}");
            return Err(full);
        }
        if self.file.is_none() && !self.ensure_open().await {
            return Err(format!("session {}: cannot open its file", self.session));
        }
        if !self.sync().await {
            return Err(format!("session {}: fdatasync failed", self.session));
        }
        let sf = self.file.take().expect("open");
        let ckpt = sf.checkpoint();
        drop(sf); // closes the file before the rename
        self.close_file();
        self.closed_with_lines = false;
        let mut backoff = Backoff::new();
        let rotated = loop {
            let cfg = self.cfg.clone();
            let session = self.session.clone();
            let attempt: Result<Option<Rotation>, (bool, String)> = blocking(move || {
                rotate_or_finish(&cfg, &session, ckpt, reason).map_err(|e| {
                    let transient = e
                        .downcast_ref::<std::io::Error>()
                        .is_some_and(|io| on_error(FileOp::Open, io) == OnError::Retry);
                    (transient, e.to_string())
                })
            })
            .await;
            match attempt {
                Err((true, e)) => backoff.wait(self, &format!("rotation failed: {e}")).await,
                other => break other.map_err(|(_, e)| e),
            }
        };
        match rotated {
            Ok(Some(rot)) => {
                self.cfg.stats.rotations[reason_index(reason)].fetch_add(1, Ordering::Relaxed);
                info!(
                    session = self.session,
                    file = rot.to,
                    ?reason,
                    frames = rot.stats.frames,
                    "rotated"
                );
                if self.cfg.life.events {
                    self.cfg.events_added.notify_one();
                }
                if self.cfg.life.gzip_level.is_some() {
                    self.cfg.stats.compress_backlog.fetch_add(1, Ordering::Relaxed);
                    if self.cfg.compress_tx.try_send(CompressJob::new(rot.clone())).is_err() {
                        // The job is in the store; the pool's next sweep takes it.
                        self.cfg.stats.compress_backlog.fetch_sub(1, Ordering::Relaxed);
                    }
                }
                Ok(Some(rot.to))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                self.fail_stop(&format!("rotation failed: {e}"));
                Err(e)
            }
        }
    }

    /// Whether the open file is older than the age limit.
    fn too_old(&self) -> bool {
        let Some(sf) = &self.file else { return false };
        let age_ms = now_ms().saturating_sub(sf.checkpoint().opened_at_ms);
        sf.size() > 0 && age_ms >= self.cfg.limits.file_age_max.as_millis() as u64
    }

    /// Whether idle rotation has a file with lines to rotate.
    fn has_lines(&self) -> bool {
        match &self.file {
            Some(f) => f.size() > 0,
            None => self.closed_with_lines,
        }
    }
}

/// Steps 2-4 of a rotation, or, when a previous attempt of this writer
/// already recorded it (and then failed on a transient error), its
/// idempotent completion.
fn rotate_or_finish(
    cfg: &WriterConfig,
    session: &str,
    ckpt: crate::meta::Checkpoint,
    reason: RotateReason,
) -> Result<Option<Rotation>, Box<dyn std::error::Error + Send + Sync>> {
    let (fs, dir, meta) = (cfg.fs.as_ref(), cfg.log_dir.as_path(), cfg.meta.as_ref());
    if let Some(rot) = meta.rotations()?.into_iter().find(|r| r.session == session) {
        crate::rotate::complete_rotation(fs, dir, meta, cfg.life, &rot)?;
        return Ok(Some(rot));
    }
    rotate_synced(fs, dir, meta, cfg.life, session, ckpt, reason)
}

/// One session's writer: appends lines, syncs and checkpoints every flush
/// interval (and once more on shutdown), rotates, and stops when idle.
async fn run_writer(
    cfg: WriterConfig,
    session: String,
    mut rx: mpsc::UnboundedReceiver<WriterMsg>,
    report_tx: mpsc::UnboundedSender<Report>,
    predecessor: Option<JoinHandle<bool>>,
) -> bool {
    if let Some(p) = predecessor
        && let Err(e) = p.await
    {
        error!(session, "previous session writer panicked: {e}");
    }
    let flush_interval = cfg.flush_interval;
    let idle_timeout = cfg.limits.idle_timeout;
    let close_wake = Arc::new(Notify::new());
    let mut w = Writer {
        cfg,
        session,
        file: None,
        slot: None,
        close_wake: close_wake.clone(),
        closed_with_lines: false,
        dirty: false,
        failed: false,
        last_frame_at: Instant::now(),
        report_tx,
    };
    let mut tick = tokio::time::interval(flush_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(WriterMsg::Frames(batch, units)) => {
                    w.frames(batch).await;
                    w.cfg.budget.add_permits(units as usize);
                },
                Some(WriterMsg::Rotate(reply)) => {
                    let _ = reply.send(w.rotate(RotateReason::Manual).await);
                }
                None => break,
            },
            _ = close_wake.notified() => w.close_for_slot().await,
            _ = tick.tick() => {
                if w.dirty {
                    w.sync().await;
                }
                if !w.failed && w.too_old() {
                    w.rotate(RotateReason::Age).await.ok();
                }
                if w.last_frame_at.elapsed() >= idle_timeout && rx.is_empty() {
                    if !w.failed && w.has_lines() {
                        w.rotate(RotateReason::Idle).await.ok();
                        // A rotation waiting for room in the outbox: stay,
                        // and try again at the next tick.
                        if !w.failed && w.file.as_ref().is_some_and(|f| f.size() > 0) {
                            continue;
                        }
                    }
                    // A failed writer has stopped the process: it keeps its
                    // queue (its frames are in the WAL) until the end.
                    if w.failed {
                        continue;
                    }
                    // Stop taking frames; whatever was already queued is
                    // still written (into a new file) before the task ends.
                    rx.close();
                    while let Some(msg) = rx.recv().await {
                        match msg {
                            WriterMsg::Frames(batch, units) => {
                                w.frames(batch).await;
                                w.cfg.budget.add_permits(units as usize);
                            },
                            WriterMsg::Rotate(reply) => {
                                let _ = reply.send(w.rotate(RotateReason::Manual).await);
                            }
                        }
                    }
                    // What came in meanwhile is in a new file: rotate it
                    // too, or it would stay live until the session returns.
                    if !w.failed && w.has_lines() {
                        w.rotate(RotateReason::Idle).await.ok();
                    }
                    if w.dirty {
                        w.sync().await;
                    }
                    w.close_file();
                    w.cfg.stats.evictions.fetch_add(1, Ordering::Relaxed);
                    let _ = w.report_tx.send(Report::Stopped { session: w.session.clone() });
                    return w.failed;
                }
            }
        }
    }
    if w.dirty {
        w.sync().await;
    }
    w.close_file();
    w.failed
}

/// Why rotations must wait now: the event outbox holds
/// LOGD_OUTBOX_EVENTS_MAX events or more (None: room, or no events).
pub fn outbox_full(cfg: &WriterConfig) -> Option<String> {
    if !cfg.life.events {
        return None;
    }
    let held = cfg.meta.outbox_len().ok()?;
    (held >= cfg.outbox_events_max).then(|| {
        format!(
            "rotation waits: the event outbox holds {held} events (LOGD_OUTBOX_EVENTS_MAX {}) until Redis takes some",
            cfg.outbox_events_max
        )
    })
}

/// Runs compression jobs, at most `workers` at a time, off the ingest path.
/// Jobs come from the writers and, at start and every minute, from the
/// store (jobs that did not fit the queue or were left by a crash).
/// Stops when `stop` is cancelled (after the writers are done).
pub async fn run_compression_pool(
    cfg: WriterConfig,
    mut jobs: mpsc::Receiver<CompressJob>,
    workers: usize,
    sweep_interval: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(workers.max(1)));
    let mut sweep = tokio::time::interval(sweep_interval);
    let mut in_flight: std::collections::HashSet<String> = std::collections::HashSet::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<String>();
    loop {
        let job = tokio::select! {
                        j = jobs.recv() => match j { Some(j) => j, None => break },
            _ = stop.cancelled() => break,
            Some(name) = done_rx.recv() => { in_flight.remove(&name); continue; }
            _ = sweep.tick() => {
                let stored = cfg.meta.compress_jobs().unwrap_or_default();
                let mut fresh: Vec<CompressJob> = stored.into_iter().filter(|j| !in_flight.contains(&j.rotation.to)).collect();
                // The store keeps them by name, which within one second is
                // not seq order (`…10-10.log` < `…9-9.log`); a session's
                // `compressed` events must go out in seq order.
                fresh.sort_by(|a, b| {
                    (&a.rotation.session, a.rotation.stats.first_seq)
                        .cmp(&(&b.rotation.session, b.rotation.stats.first_seq))
                });
                cfg.stats.compress_backlog.store((fresh.len() + in_flight.len()) as u64, Ordering::Relaxed);
                for j in fresh {
                    start_job(&cfg, &slots, &mut in_flight, &done_tx, j).await;
                }
                continue;
            }
        };
        if in_flight.contains(&job.rotation.to) {
            // The sweep took it first; it runs once.
            cfg.stats
                .compress_backlog
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(1)))
                .ok();
        } else {
            // May have been run (and finished) by the sweep meanwhile:
            // `run_compression` then finds no job in the store and does nothing.
            start_job(&cfg, &slots, &mut in_flight, &done_tx, job).await;
        }
    }
    // Let running jobs finish (the rest stay in the store for next start).
    let _ = slots.acquire_many(workers.max(1) as u32).await;
}

async fn start_job(
    cfg: &WriterConfig,
    slots: &Arc<Semaphore>,
    in_flight: &mut std::collections::HashSet<String>,
    done_tx: &mpsc::UnboundedSender<String>,
    job: CompressJob,
) {
    let permit = slots.clone().acquire_owned().await.expect("pool semaphore open");
    in_flight.insert(job.rotation.to.clone());
    let (cfg, done_tx) = (cfg.clone(), done_tx.clone());
    // A thread of its own at idle priority: compression uses only CPU that
    // ingest leaves over, and when there is none the files wait as `.log`
    // (the backlog metric shows it) instead of slowing acks down.
    let spawned = std::thread::Builder::new().name("logd-gzip".into()).spawn(move || {
        lower_to_idle_priority();
        let name = job.rotation.to.clone();
        match run_compression(cfg.fs.as_ref(), &cfg.log_dir, cfg.meta.as_ref(), cfg.life, &name) {
            Ok(CompressionRun::NoJob) => {}
            Ok(CompressionRun::Finished(c)) => {
                let s = &cfg.stats;
                s.compressed_files.fetch_add(1, Ordering::Relaxed);
                s.compress_bytes_in.fetch_add(c.bytes_in, Ordering::Relaxed);
                s.compress_bytes_out.fetch_add(c.bytes_out, Ordering::Relaxed);
                if cfg.life.events {
                    cfg.events_added.notify_one();
                }
            }
            Err(e) => error!(
                file = name,
                "compression failed: {e}; the .log stays and is retried later"
            ),
        }
        let _ = cfg
            .stats
            .compress_backlog
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(1)));
        let _ = done_tx.send(name);
        drop(permit);
    });
    if let Err(e) = spawned {
        error!("cannot start a compression thread: {e}; the job stays in the store");
    }
}

/// Moves the calling thread to `SCHED_IDLE` (Linux): it runs only when no
/// other thread wants the CPU.
fn lower_to_idle_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` outlives the call.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if rc != 0 {
        debug!("SCHED_IDLE not available: {}", std::io::Error::last_os_error());
    }
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
