//! The async shells: the dispatcher task and one task per session writer.
//! They own the channels, timers, semaphores and blocking threads, and leave
//! every decision to the synchronous code they call: [`super::dispatch`]
//! (routing, succession, segment removal) and [`SessionWriter`] (the
//! writer's state machine).
//!
//! A writer task waits for its predecessor (a writer of the same session
//! that stopped taking frames and is still writing what was queued to it),
//! then loops: it takes a message, a slot request or a flush tick, hands it
//! to its [`SessionWriter`], and drives it until it is idle again, doing
//! what each [`Step`] asks (a slot from [`crate::pipeline::openfiles::OpenFiles`], a
//! blocking operation on the blocking pool behind
//! `WRITER_BLOCKING_OPS_MAX`, a checkpoint through the
//! [`crate::pipeline::checkpoints::CheckpointBatcher`], a backoff sleep) and delivering its
//! [`Output`]s (budget, reports, compression jobs, replies, the fatal token).

use foldhash::{HashMap, HashMapExt};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::error;
use wal::Segments;

use super::dispatch::{self, CheckpointTracker};
use super::{Control, Output, SessionWriter, Step, WriterConfig, WriterMsg};
use crate::pipeline::sequencer::Durable;
use store::logtmp_path;
use store::{CompressJob, MetaStore};
use store::{RotateReason, now_ms};

struct WriterHandle {
    /// Which writer of the session (they get new ids as they succeed each other).
    id: u64,
    tx: mpsc::UnboundedSender<WriterMsg>,
    /// Resolves to whether the writer had failed (an I/O error that stopped
    /// the process).
    join: JoinHandle<bool>,
}

/// A writer's news for the dispatcher.
enum Report {
    /// The session's checkpoint now covers records up to `lsn`.
    Checkpointed { session: String, lsn: u64 },
    /// The writer `id` stopped (idle); it took no frame after its last checkpoint.
    Stopped { session: String, id: u64 },
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
    let stats = cfg.settings.stats.clone();
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
                route(&cfg, &mut writers, &mut tracker, batch, &report_tx);
                stats.routed_through.store(tracker.last_routed(), Ordering::Relaxed);
            }
            Some(ctl) = control.recv() => rotate_on_request(&cfg, &mut writers, &report_tx, ctl).await,
            Some(report) = report_rx.recv() => match report {
                Report::Checkpointed { session, lsn } => tracker.checkpointed(&session, lsn),
                Report::Stopped { session, id } => {
                    let is_it = |w: &WriterHandle| w.id == id && !accepting(w);
                    if dispatch::on_stopped(&mut writers, &mut tracker, &session, is_it).is_some() {
                        cfg.active.writer_stopped(&session);
                    }
                }
            },
            _ = tick.tick() => {
                stats.active_sessions.store(writers.len() as u64, Ordering::Relaxed);
                cfg.active.expire_reservations(crate::pipeline::sessions::RESERVATION_TTL);
                let safe = tracker.safe_lsn();
                stats.removable_below_lsn.store(safe, Ordering::Relaxed);
                if let Some(h) = &removal && h.is_finished() {
                    removed_below = removal.take().unwrap().await.unwrap_or(removed_below);
                }
                if removal.is_none() && safe > removed_below {
                    removal = Some(spawn_removal(cfg.settings.meta.clone(), segments.clone(), safe));
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
    let _ = spawn_removal(cfg.settings.meta.clone(), segments, tracker.safe_lsn()).await;
}

/// Whether a writer still takes frames (its queue is open).
fn accepting(w: &WriterHandle) -> bool {
    !w.tx.is_closed()
}

/// Hands each session's share of a durable batch to its writer.
fn route(
    cfg: &WriterConfig,
    writers: &mut HashMap<String, WriterHandle>,
    tracker: &mut CheckpointTracker,
    batch: Durable,
    report_tx: &mpsc::UnboundedSender<Report>,
) {
    let deliveries = match dispatch::route(tracker, batch.frames, batch.budget_units) {
        Ok(d) => d,
        Err(units) => {
            cfg.budget.add_permits(units as usize);
            return;
        }
    };
    for d in deliveries {
        let mut msg = WriterMsg::Frames(d.frames, d.units);
        // A writer that stopped (idle) between our look and the send hands
        // the batch back; a fresh writer takes it.
        for _ in 0..2 {
            let w = writer_for(cfg, writers, report_tx, &d.session);
            match w.tx.send(msg) {
                Ok(()) => break,
                Err(mpsc::error::SendError(back)) => msg = back,
            }
        }
    }
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
    let targets = dispatch::rotate_targets(writers, session, |s| {
        cfg.settings.fs.exists(&logtmp_path(&cfg.settings.log_dir, s))
    });
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

/// The session's writer, started if it is not running (see
/// [`dispatch::writer_for`]).
fn writer_for<'a>(
    cfg: &WriterConfig,
    writers: &'a mut HashMap<String, WriterHandle>,
    report_tx: &mpsc::UnboundedSender<Report>,
    session: &str,
) -> &'a mut WriterHandle {
    static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    dispatch::writer_for(writers, session, accepting, |predecessor| {
        cfg.active.writer_started(session);
        let (tx, rx) = mpsc::unbounded_channel();
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let join = tokio::spawn(run_writer(
            cfg.clone(),
            (session.to_owned(), id),
            rx,
            report_tx.clone(),
            predecessor.map(|p| p.join),
        ));
        WriterHandle { id, tx, join }
    })
}

/// [`dispatch::remove_segments`] on the blocking pool.
fn spawn_removal(meta: Arc<dyn MetaStore>, segments: Segments, safe: u64) -> JoinHandle<u64> {
    tokio::task::spawn_blocking(move || dispatch::remove_segments(meta.as_ref(), &segments, safe))
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

/// One writer task's plumbing around its [`SessionWriter`].
struct Shell {
    cfg: WriterConfig,
    session: String,
    /// None only while a blocking operation runs on the blocking pool.
    core: Option<SessionWriter>,
    close_wake: Arc<Notify>,
    report_tx: mpsc::UnboundedSender<Report>,
    replies: HashMap<u64, oneshot::Sender<Result<Option<String>, String>>>,
    next_token: u64,
    id: u64,
    /// What `logd status` shows of the session.
    cell: Arc<crate::telemetry::stats::SessionCell>,
}

impl Shell {
    fn core(&mut self) -> &mut SessionWriter {
        self.core.as_mut().expect("not in a blocking operation")
    }

    /// Hands a message to the writer.
    fn take(&mut self, msg: WriterMsg) {
        match msg {
            WriterMsg::Frames(batch, units) => {
                self.cell.last_frame_at_ms.store(now_ms(), Ordering::Relaxed);
                self.core().push_frames(batch, units, Instant::now())
            }
            WriterMsg::Rotate(reply) => {
                self.next_token += 1;
                let token = self.next_token;
                self.replies.insert(token, reply);
                self.core().rotate(RotateReason::Manual, token);
            }
        }
    }

    /// Drives the writer until it is idle; true if it asked to close its
    /// queue (idle stop).
    async fn drive(&mut self) -> bool {
        let mut close_queue = false;
        loop {
            let step = self.core().poll();
            close_queue |= self.deliver();
            match step {
                Step::Idle => return close_queue,
                Step::NeedSlot => {
                    let slot = self
                        .cfg
                        .open_files
                        .acquire(&self.session, self.close_wake.clone())
                        .await;
                    self.core().slot_granted(slot);
                }
                Step::Blocking => {
                    let mut core = self.core.take().expect("present");
                    self.core = Some(
                        blocking(move || {
                            core.run_blocking();
                            core
                        })
                        .await,
                    );
                }
                Step::PutCheckpoint(ckpt) => {
                    let put = self.cfg.checkpoints.put(&self.session, &ckpt).await;
                    self.core().checkpoint_put(put);
                }
                Step::RetryAfter(delay) => {
                    tokio::time::sleep(delay).await;
                    self.core().retry_now();
                }
            }
            close_queue |= self.deliver();
        }
    }

    /// Copies the file's state into the session's cell (`logd status`): a
    /// file closed for a slot keeps its last size, a rotated one has none.
    fn publish(&mut self) {
        let (open, closed_with_lines) = self.core().file_status();
        let (c, l) = (&self.cell, Ordering::Relaxed);
        c.file_open.store(open.is_some(), l);
        match open {
            Some((last_seq, bytes, opened_at_ms)) => {
                c.last_seq.store(last_seq, l);
                c.file_bytes.store(bytes, l);
                c.file_opened_at_ms.store(opened_at_ms, l);
            }
            None if !closed_with_lines => c.file_bytes.store(0, l),
            None => {}
        }
    }

    /// Delivers the writer's outputs; true if it asked to close its queue.
    fn deliver(&mut self) -> bool {
        let mut close_queue = false;
        for out in self.core().take_outputs() {
            match out {
                Output::Budget(units) => self.cfg.budget.add_permits(units as usize),
                Output::Checkpointed { lsn } => {
                    let _ = self.report_tx.send(Report::Checkpointed {
                        session: self.session.clone(),
                        lsn,
                    });
                }
                Output::Rotated(rot) => {
                    if self.cfg.settings.life.events {
                        self.cfg.events_added.notify_one();
                    }
                    if self.cfg.settings.life.gzip_level.is_some() {
                        self.cfg.settings.stats.compress_backlog.fetch_add(1, Ordering::Relaxed);
                        if self.cfg.compress_tx.try_send(CompressJob::new(rot)).is_err() {
                            // The job is in the store; the pool's next sweep takes it.
                            self.cfg.settings.stats.compress_backlog.fetch_sub(1, Ordering::Relaxed);
                        }
                    }
                }
                Output::RotateReply { token, result } => {
                    if let Some(reply) = self.replies.remove(&token) {
                        let _ = reply.send(result);
                    }
                }
                Output::FailStop(_) => self.cfg.fatal.cancel(),
                Output::CloseQueue => close_queue = true,
                Output::Stopped { idle: true } => {
                    let _ = self.report_tx.send(Report::Stopped {
                        session: self.session.clone(),
                        id: self.id,
                    });
                }
                Output::Stopped { idle: false } => {}
            }
        }
        close_queue
    }
}

/// One session's writer: appends lines, syncs and checkpoints every flush
/// interval (and once more on shutdown), rotates, and stops when idle.
/// Returns whether it failed.
async fn run_writer(
    cfg: WriterConfig,
    (session, id): (String, u64),
    mut rx: mpsc::UnboundedReceiver<WriterMsg>,
    report_tx: mpsc::UnboundedSender<Report>,
    predecessor: Option<JoinHandle<bool>>,
) -> bool {
    // A predecessor that failed stopped the process: this writer must not
    // touch the file either (a new descriptor would not see the writeback
    // error, and a checkpoint could cover lost pages).
    let mut failed = false;
    let cell = cfg.settings.stats.sessions.register(&session, id);
    if let Some(p) = predecessor {
        match p.await {
            Ok(f) => failed = f,
            Err(e) => error!(session, "previous session writer panicked: {e}"),
        }
    }
    let flush_interval = cfg.flush_interval;
    let close_wake = Arc::new(Notify::new());
    let mut shell = Shell {
        core: Some(SessionWriter::new(cfg.settings(), &session, Instant::now(), failed)),
        cfg,
        session,
        close_wake: close_wake.clone(),
        report_tx,
        replies: HashMap::new(),
        next_token: 0,
        id,
        cell,
    };
    let mut tick = tokio::time::interval(flush_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(msg) => shell.take(msg),
                None => break,
            },
            _ = close_wake.notified() => shell.core().close_for_slot(),
            _ = tick.tick() => {
                let queue_empty = rx.is_empty();
                shell.core().tick(Instant::now(), now_ms(), queue_empty);
            }
        }
        let close_queue = shell.drive().await;
        shell.publish();
        if close_queue {
            // Stop taking frames; whatever was already queued is still
            // written (into a new file) before the task ends.
            rx.close();
            while let Some(msg) = rx.recv().await {
                shell.take(msg);
            }
            shell.core().stop(true);
            shell.drive().await;
            shell.cfg.settings.stats.sessions.unregister(&shell.session, id);
            return shell.core().failed();
        }
    }
    shell.core().stop(false);
    shell.drive().await;
    shell.cfg.settings.stats.sessions.unregister(&shell.session, id);
    shell.core().failed()
}
