//! The session writer as a synchronous state machine: everything a writer
//! decides, with no tokio inside. The async task ([`super::tasks`]) and the
//! power-loss simulation (`tests/powerloss/`) both drive this same code.
//!
//! A [`SessionWriter`] owns its session's `.logtmp` ([`SessionFile`]) and a
//! queue of jobs, taken one at a time, in order:
//! - **frames** ([`SessionWriter::push_frames`]): append each line (the
//!   gRPC handler rendered all of it but the seq; rotating by size before a
//!   line that would cross the limit), write them once
//!   [`PENDING_WRITE_BYTES`] are pending, rotate when the file reached the
//!   limit, then give the batch's admission budget back (pending lines, at
//!   most [`PENDING_WRITE_BYTES`] per open file, are outside the budget);
//! - **sync** (flush tick, before rotation, close and stop): write the
//!   pending lines, fdatasync, put the checkpoint, report it;
//! - **rotate** (size, age, idle, manual): sync, then rotate the file
//!   ([`rotate_synced`]); it waits (nothing changes) while the event outbox
//!   is full;
//! - **close for slot**: sync, checkpoint and close the file because another
//!   session needs its open-file slot;
//! - **idle stop** and **stop**: rotate, stop taking frames, write what was
//!   queued meanwhile, rotate again, sync, close.
//!
//! The driver loops on [`SessionWriter::poll`], which does the CPU and
//! page-cache work inline (rendering, `pwrite`) and returns a [`Step`] when
//! it needs something it must not do itself: a slot ([`Step::NeedSlot`]), a
//! blocking file operation (open, fdatasync, rotation: [`Step::Blocking`],
//! run with [`SessionWriter::run_blocking`] off the async runtime), a
//! checkpoint in the store ([`Step::PutCheckpoint`], batched with other
//! writers'), or a pause before retrying a transient error
//! ([`Step::RetryAfter`]). What it has to tell the world (budget to give
//! back, checkpoints and rotations to report, replies, a fail-stop, that it
//! stopped) it queues as [`Output`]s ([`SessionWriter::take_outputs`]).
//!
//! Errors are decided by [`on_error`]: a shortage is retried (the job stays
//! where it was), anything else and every fdatasync error fail-stops the
//! writer: it touches its file no more and [`Output::FailStop`] stops logd.
//!
//! # Invariants (asserted)
//! - The file's synced offset never passes its written offset, and the
//!   checkpoint reported never claims more than the last fdatasync made
//!   durable: a checkpoint is put only after its file's fdatasync returned Ok.
//! - Frames reach a writer in increasing LSN order.
//! - A slot is held exactly while a file is open; a failed writer never
//!   touches its file again.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};

use super::step::{Output, Step};
use super::{OnError, PENDING_WRITE_BYTES, Settings, on_error, outbox_full_for, reason_index};
use crate::pipeline::openfiles::FileSlot;
use store::RotateReason;
use store::{Appended, FileOp, SessionFile, logtmp_path};
use store::{Checkpoint, Line};
use store::{Rotation, complete_rotation, rotate_synced};

/// A blocking operation the writer asked for ([`Step::Blocking`]).
#[derive(Debug, Clone, Copy)]
enum Blocking {
    Open,
    Sync,
    Rotate(Checkpoint, RotateReason),
}

/// One job of the writer's queue, with how far it got.
#[derive(Debug)]
enum Job {
    /// Append these frames, write once enough is pending, rotate at the size
    /// limit, then give back `units`.
    Frames {
        frames: VecDeque<(u64, Line)>,
        units: u32,
        /// The size rotation the next frame needs waits (the outbox is
        /// full): the frame goes in past the limit rather than be dropped.
        force: bool,
        /// Every frame is appended: only the write and size checks are left.
        appended: bool,
    },
    /// Write, fdatasync, checkpoint, report.
    Sync { stage: SyncStage },
    /// Rotate the file. `in_batch`: a size rotation in the middle of a
    /// frames job (which forces its next frame in if this one waits).
    Rotate {
        reason: RotateReason,
        token: Option<u64>,
        in_batch: bool,
        stage: RotateStage,
    },
    /// Rotate the file if it is older than the age limit at `now_ms`.
    AgeCheck { now_ms: u64 },
    /// Sync and close the file for another session's slot.
    CloseForSlot { synced: bool },
    /// Idle: rotate, then (unless it waits or the writer failed) stop
    /// taking frames.
    IdleStop { rotated: bool },
    /// Rotate (idle only), sync, close, and report the stop.
    Stop { idle: bool, stage: StopStage },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SyncStage {
    Write,
    DataSync,
    Put,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RotateStage {
    Start,
    Synced,
    Renaming(Checkpoint),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopStage {
    Rotate,
    Sync,
    Close,
}

impl Job {
    fn sync() -> Job {
        Job::Sync {
            stage: SyncStage::Write,
        }
    }

    fn rotate(reason: RotateReason) -> Job {
        Job::Rotate {
            reason,
            token: None,
            in_batch: false,
            stage: RotateStage::Start,
        }
    }
}

/// First retry delay; it doubles up to [`RETRY_DELAY_MAX`].
const RETRY_DELAY_FIRST: Duration = Duration::from_millis(10);
/// Longest delay between two retries of a transient error.
const RETRY_DELAY_MAX: Duration = Duration::from_secs(2);

/// One session's writer. See the module docs.
pub struct SessionWriter {
    cfg: Settings,
    session: String,
    file: Option<SessionFile>,
    /// Held exactly while `file` is open (`LOGD_OPEN_FILES_MAX`).
    slot: Option<FileSlot>,
    /// The file was closed for lack of slots while it held lines: idle
    /// rotation must still rotate it.
    closed_with_lines: bool,
    /// Lines appended since the last fdatasync.
    dirty: bool,
    /// Stopped after a non-transient error: the file is touched no more.
    failed: bool,
    /// Why it failed.
    failure: Option<String>,
    /// The idle stop closed the queue: only [`SessionWriter::stop`] is left.
    closing: bool,
    last_frame_at: Instant,
    /// LSN of the last frame pushed (they come in increasing order).
    last_pushed_lsn: u64,
    jobs: VecDeque<Job>,
    blocking: Option<Blocking>,
    /// Result of the last blocking operation, for the job that asked.
    done: Option<Done>,
    /// A checkpoint synced and waiting to be put.
    to_put: Option<Checkpoint>,
    /// A transient error's pause before the failed step runs again.
    wait: Option<Duration>,
    retries: u32,
    out: Vec<Output>,
}

/// The result of a blocking operation.
enum Done {
    Synced(Checkpoint),
    Rotated(Option<Rotation>),
}

impl SessionWriter {
    /// A writer for `session`; it starts failed if its predecessor failed
    /// (a failed writer's frames stay in the WAL until the restart).
    pub fn new(cfg: Settings, session: &str, now: Instant, failed: bool) -> Self {
        SessionWriter {
            cfg,
            session: session.to_owned(),
            file: None,
            slot: None,
            closed_with_lines: false,
            dirty: false,
            failed,
            failure: None,
            closing: false,
            last_frame_at: now,
            last_pushed_lsn: 0,
            jobs: VecDeque::new(),
            blocking: None,
            done: None,
            to_put: None,
            wait: None,
            retries: 0,
            out: Vec::new(),
        }
    }

    /// The session.
    pub fn session(&self) -> &str {
        &self.session
    }

    /// Whether the writer stopped after a non-transient error.
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// Whether the file is open (and a slot held).
    pub fn is_open(&self) -> bool {
        self.file.is_some()
    }

    /// Whether every job is done (the driver may hand over the next input).
    pub fn is_idle(&self) -> bool {
        self.jobs.is_empty()
    }

    /// The open file's last seq, size and start (wall clock ms; 0 until its
    /// first write), for `logd status`; None while no file is open. The
    /// bool: the file was closed for a slot while it held lines.
    pub fn file_status(&self) -> (Option<(i64, u64, u64)>, bool) {
        let open = self
            .file
            .as_ref()
            .map(|f| (f.last_seq(), f.size(), f.checkpoint().opened_at_ms));
        (open, self.closed_with_lines)
    }

    /// Lines were appended since the last fdatasync.
    pub fn dirty(&self) -> bool {
        self.dirty
    }

    /// What the writer has to tell, in order (taken).
    pub fn take_outputs(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.out)
    }

    // -- inputs ----------------------------------------------------------

    /// Durable frames routed to this writer, worth `units` of the budget.
    pub fn push_frames(&mut self, frames: Vec<(u64, Line)>, units: u32, now: Instant) {
        if let (Some(first), Some(last)) = (frames.first(), frames.last()) {
            assert!(
                first.0 > self.last_pushed_lsn && frames.windows(2).all(|w| w[0].0 < w[1].0),
                "{}: frames must come in increasing LSN order (after {}: {}..={})",
                self.session,
                self.last_pushed_lsn,
                first.0,
                last.0
            );
            self.last_pushed_lsn = last.0;
        }
        self.last_frame_at = now;
        self.jobs.push_back(Job::Frames {
            frames: frames.into(),
            units,
            force: false,
            appended: false,
        });
    }

    /// A rotation request; answered by [`Output::RotateReply`] with `token`.
    pub fn rotate(&mut self, reason: RotateReason, token: u64) {
        self.jobs.push_back(Job::Rotate {
            reason,
            token: Some(token),
            in_batch: false,
            stage: RotateStage::Start,
        });
    }

    /// Another session needs this writer's slot (it was asked through
    /// [`crate::pipeline::openfiles::OpenFiles`]): sync, checkpoint, close.
    pub fn close_for_slot(&mut self) {
        self.jobs.push_back(Job::CloseForSlot { synced: false });
    }

    /// The flush tick: sync if dirty, rotate a file older than the age
    /// limit (`now_ms`: wall clock), and, when no frame came for the idle
    /// timeout and nothing is queued (`queue_empty`), start the idle stop.
    pub fn tick(&mut self, now: Instant, now_ms: u64, queue_empty: bool) {
        if self.closing {
            return;
        }
        if self.dirty {
            self.jobs.push_back(Job::sync());
        }
        // Checked once the sync ran: a new file's age starts with its first write.
        self.jobs.push_back(Job::AgeCheck { now_ms });
        if now.saturating_duration_since(self.last_frame_at) >= self.cfg.limits.idle_timeout && queue_empty {
            self.jobs.push_back(Job::IdleStop { rotated: false });
        }
    }

    /// Stop: after [`Output::CloseQueue`] (idle, once the frames still queued
    /// were pushed) or at shutdown (`idle` false: no rotation, the next start
    /// continues the `.logtmp`). Ends with [`Output::Stopped`].
    pub fn stop(&mut self, idle: bool) {
        self.jobs.push_back(Job::Stop {
            idle,
            stage: if idle { StopStage::Rotate } else { StopStage::Sync },
        });
    }

    /// The slot asked for by [`Step::NeedSlot`].
    pub fn slot_granted(&mut self, slot: FileSlot) {
        assert!(self.slot.is_none() && self.file.is_none(), "no slot without a file");
        self.slot = Some(slot);
        self.blocking = Some(Blocking::Open);
    }

    /// The pause of [`Step::RetryAfter`] is over.
    pub fn retry_now(&mut self) {
        self.wait = None;
    }

    /// The result of the put asked for by [`Step::PutCheckpoint`].
    pub fn checkpoint_put(&mut self, result: Result<(), crate::pipeline::checkpoints::CheckpointError>) {
        let ckpt = self.to_put.take().expect("a checkpoint was waiting to be put");
        debug_assert!(
            matches!(self.jobs.front(), Some(Job::Sync { stage: SyncStage::Put })),
            "a put answers the sync that asked for it"
        );
        self.jobs.pop_front();
        match result {
            Ok(()) => {
                wal::crash_point!("writer::after_checkpoint_put");
                self.out.push(Output::Checkpointed { lsn: ckpt.last_lsn });
            }
            Err(e) => self.fail_stop(&format!("checkpoint write failed: {e}")),
        }
    }

    // -- the machine -------------------------------------------------------

    /// Runs the jobs as far as they go without waiting; see [`Step`].
    pub fn poll(&mut self) -> Step {
        loop {
            if let Some(delay) = self.wait {
                return Step::RetryAfter(delay);
            }
            if let Some(ckpt) = self.to_put {
                return Step::PutCheckpoint(ckpt);
            }
            if self.blocking.is_some() {
                return Step::Blocking;
            }
            let Some(job) = self.jobs.pop_front() else {
                return Step::Idle;
            };
            let job = match job {
                Job::Frames {
                    frames,
                    units,
                    force,
                    appended,
                } => self.frames(frames, units, force, appended),
                Job::Sync { stage } => self.sync(stage),
                Job::Rotate {
                    reason,
                    token,
                    in_batch,
                    stage,
                } => self.rotate_step(reason, token, in_batch, stage),
                Job::AgeCheck { now_ms } if !self.failed && self.too_old(now_ms) => {
                    Next::Again(Job::rotate(RotateReason::Age))
                }
                Job::AgeCheck { .. } => Next::Done,
                Job::CloseForSlot { synced } => self.close_for_slot_step(synced),
                Job::IdleStop { rotated } => self.idle_stop(rotated),
                Job::Stop { idle, stage } => self.stop_step(idle, stage),
            };
            match job {
                Next::Done => {}
                Next::Again(job) => self.jobs.push_front(job),
                Next::Then(job, first) => {
                    self.jobs.push_front(job);
                    self.jobs.push_front(first);
                }
                Next::Wait(job, step) => {
                    self.jobs.push_front(job);
                    if step == Step::NeedSlot {
                        return step;
                    }
                }
            }
        }
    }

    /// Runs the blocking operation [`Step::Blocking`] asked for.
    pub fn run_blocking(&mut self) {
        let op = self.blocking.take().expect("a blocking operation was asked for");
        match op {
            Blocking::Open => self.open(),
            Blocking::Sync => {
                let sf = self.file.as_mut().expect("a sync has a file");
                match sf.sync() {
                    Ok(c) => {
                        self.retries = 0;
                        self.done = Some(Done::Synced(c));
                    }
                    Err(e) if on_error(e.op, &e.source) == OnError::Retry => self.retry_later(&e.to_string()),
                    Err(e) => self.fail_stop(&e.to_string()),
                }
            }
            Blocking::Rotate(ckpt, reason) => match self.rotate_or_finish(ckpt, reason) {
                Ok(rot) => {
                    self.retries = 0;
                    self.done = Some(Done::Rotated(rot));
                }
                Err((true, e)) => self.retry_later(&format!("rotation failed: {e}")),
                Err((false, e)) => self.fail_stop(&format!("rotation failed: {e}")),
            },
        }
    }

    // -- jobs ----------------------------------------------------------------

    fn frames(&mut self, mut frames: VecDeque<(u64, Line)>, units: u32, mut force: bool, appended: bool) -> Next {
        let again = |frames, force, appended| Job::Frames {
            frames,
            units,
            force,
            appended,
        };
        if self.failed {
            // Durable in the WAL; the restart after a fail-stop replays it.
            self.out.push(Output::Budget(units));
            return Next::Done;
        }
        if !appended {
            if let Some(step) = self.need_open() {
                return Next::Wait(again(frames, force, appended), step);
            }
            if self.failed {
                return Next::Again(again(frames, force, appended));
            }
            if let Some(slot) = &self.slot {
                slot.touch();
            }
            let size_max = self.cfg.limits.file_bytes_max;
            let sf = self.file.as_mut().expect("open");
            // The size limit holds per line: rotate before a line that would
            // cross it (a line larger than the limit gets a file of its own).
            while let Some((lsn, line)) = frames.pop_front() {
                if force {
                    // The size rotation waits (the event outbox is full): the
                    // line goes in now, past the limit, rather than be dropped
                    // (every acked frame is written, in order).
                    sf.append(lsn, line);
                    self.dirty = true;
                    force = false;
                } else {
                    match sf.append_within(lsn, line, size_max) {
                        Appended::Written => self.dirty = true,
                        Appended::Skipped => {}
                        Appended::Full(line) => {
                            frames.push_front((lsn, line));
                            let rotate = Job::Rotate {
                                reason: RotateReason::Size,
                                token: None,
                                in_batch: true,
                                stage: RotateStage::Start,
                            };
                            return Next::Then(again(frames, force, false), rotate);
                        }
                    }
                }
            }
        }
        // One write per batch (not per frame) once enough is pending.
        if self
            .file
            .as_ref()
            .is_some_and(|sf| sf.pending_bytes() >= PENDING_WRITE_BYTES)
            && !self.write_pending()
        {
            return Next::Again(again(frames, force, true)); // a retry pauses, a fail-stop drops
        }
        // The budget comes back once the lines are appended, not written:
        // pending lines (at most PENDING_WRITE_BYTES per open file) are
        // outside it. Held until the flush tick, a small budget spread over
        // many sessions stalled every stream (2 MiB, 16 streams / 1000
        // sessions: 212k -> 62k frames/s).
        self.out.push(Output::Budget(units));
        if self
            .file
            .as_ref()
            .is_some_and(|sf| sf.size() >= self.cfg.limits.file_bytes_max)
        {
            return Next::Again(Job::rotate(RotateReason::Size));
        }
        Next::Done
    }

    fn sync(&mut self, stage: SyncStage) -> Next {
        match stage {
            SyncStage::Write => {
                if self.failed || !self.write_pending() {
                    return if self.failed {
                        Next::Done
                    } else {
                        Next::Again(Job::Sync { stage })
                    };
                }
                if self.file.is_none() {
                    return Next::Done; // nothing to make durable
                }
                self.blocking = Some(Blocking::Sync);
                Next::Again(Job::Sync {
                    stage: SyncStage::DataSync,
                })
            }
            SyncStage::DataSync => match self.done.take() {
                Some(Done::Synced(ckpt)) => {
                    let sf = self.file.as_ref().expect("synced");
                    assert!(
                        ckpt.offset == sf.offset() && ckpt.offset <= sf.size(),
                        "{}: the checkpoint claims offset {} but {} bytes are written",
                        self.session,
                        ckpt.offset,
                        sf.offset()
                    );
                    self.dirty = false;
                    wal::crash_point!("writer::after_fsync");
                    self.to_put = Some(ckpt);
                    Next::Again(Job::Sync { stage: SyncStage::Put })
                }
                None if self.failed => Next::Done,
                // A transient error: the fdatasync never ran; write again.
                None => Next::Again(Job::sync()),
                Some(_) => unreachable!("a sync waits for its own result"),
            },
            SyncStage::Put => unreachable!("answered by checkpoint_put"),
        }
    }

    fn rotate_step(&mut self, reason: RotateReason, token: Option<u64>, in_batch: bool, stage: RotateStage) -> Next {
        let again = |stage| Job::Rotate {
            reason,
            token,
            in_batch,
            stage,
        };
        match stage {
            RotateStage::Start => {
                if self.failed {
                    let e = format!("session {} is stopped after an I/O error", self.session);
                    return self.rotated(token, in_batch, Err(e));
                }
                if let Some(full) = outbox_full_for(self.cfg.meta.as_ref(), self.cfg.life, self.cfg.outbox_events_max) {
                    self.cfg.stats.rotations_deferred.fetch_add(1, Ordering::Relaxed);
                    debug!(session = self.session, ?reason, "rotation waits: {full}");
                    return self.rotated(token, in_batch, Err(full));
                }
                if let Some(step) = self.need_open() {
                    return Next::Wait(again(RotateStage::Start), step);
                }
                if self.failed {
                    let e = format!("session {}: cannot open its file", self.session);
                    return self.rotated(token, in_batch, Err(e));
                }
                Next::Then(again(RotateStage::Synced), Job::sync())
            }
            RotateStage::Synced => {
                if self.failed {
                    let e = format!("session {}: fdatasync failed", self.session);
                    return self.rotated(token, in_batch, Err(e));
                }
                let sf = self.file.take().expect("open");
                let ckpt = sf.checkpoint();
                drop(sf); // closes the file before the rename
                self.close_file();
                self.closed_with_lines = false;
                self.blocking = Some(Blocking::Rotate(ckpt, reason));
                Next::Again(again(RotateStage::Renaming(ckpt)))
            }
            RotateStage::Renaming(ckpt) => match self.done.take() {
                Some(Done::Rotated(Some(rot))) => {
                    self.cfg.stats.rotations[reason_index(reason)].fetch_add(1, Ordering::Relaxed);
                    info!(
                        session = self.session,
                        file = rot.to,
                        ?reason,
                        frames = rot.stats.frames,
                        "rotated"
                    );
                    let name = rot.to.clone();
                    self.out.push(Output::Rotated(rot));
                    self.rotated(token, in_batch, Ok(Some(name)))
                }
                Some(Done::Rotated(None)) => self.rotated(token, in_batch, Ok(None)),
                None if self.failed => {
                    let e = self.failure.clone().unwrap_or_default();
                    self.rotated(token, in_batch, Err(e))
                }
                None => {
                    // A transient error: the same rotation again.
                    self.blocking = Some(Blocking::Rotate(ckpt, reason));
                    Next::Again(again(stage))
                }
                Some(_) => unreachable!("a rotation waits for its own result"),
            },
        }
    }

    /// A rotation's end: the answer to its request, or to the frames job
    /// it interrupted (which forces its next line in if the rotation waits).
    fn rotated(&mut self, token: Option<u64>, in_batch: bool, result: Result<Option<String>, String>) -> Next {
        if in_batch
            && result.is_err()
            && !self.failed
            && let Some(Job::Frames { force, .. }) = self.jobs.front_mut()
        {
            *force = true;
        }
        if let Some(token) = token {
            self.out.push(Output::RotateReply { token, result });
        }
        Next::Done
    }

    fn close_for_slot_step(&mut self, synced: bool) -> Next {
        if !synced {
            if self.file.is_none() || !self.slot.as_ref().is_some_and(|s| s.close_asked()) {
                return Next::Done;
            }
            return Next::Then(Job::CloseForSlot { synced: true }, Job::sync());
        }
        if self.failed {
            return Next::Done;
        }
        self.closed_with_lines |= self.file.as_ref().is_some_and(|f| f.size() > 0);
        self.close_file();
        self.cfg.stats.files_closed_for_slots.fetch_add(1, Ordering::Relaxed);
        Next::Done
    }

    fn idle_stop(&mut self, rotated: bool) -> Next {
        if !rotated && !self.failed && self.has_lines() {
            return Next::Then(Job::IdleStop { rotated: true }, Job::rotate(RotateReason::Idle));
        }
        // A rotation waiting for room in the outbox: stay, and try again at
        // the next tick. A failed writer has stopped the process: it keeps
        // its queue (its frames are in the WAL) until the end.
        if self.failed || self.file.as_ref().is_some_and(|f| f.size() > 0) {
            return Next::Done;
        }
        // Stop taking frames; whatever was already queued is still written
        // (into a new file) before the writer ends.
        self.closing = true;
        self.out.push(Output::CloseQueue);
        Next::Done
    }

    fn stop_step(&mut self, idle: bool, stage: StopStage) -> Next {
        match stage {
            // What came in meanwhile is in a new file: rotate it too, or it
            // would stay live until the session returns.
            StopStage::Rotate if !self.failed && self.has_lines() => Next::Then(
                Job::Stop {
                    idle,
                    stage: StopStage::Sync,
                },
                Job::rotate(RotateReason::Idle),
            ),
            StopStage::Rotate | StopStage::Sync if self.dirty && !self.failed => Next::Then(
                Job::Stop {
                    idle,
                    stage: StopStage::Close,
                },
                Job::sync(),
            ),
            _ => {
                self.close_file();
                if idle {
                    self.cfg.stats.evictions.fetch_add(1, Ordering::Relaxed);
                }
                // A failed writer is not reported as stopped: it stays the
                // session's registered writer, so a writer started for the
                // session's next frame waits for it and starts failed too
                // (it must not write past the frames this one lost).
                self.out.push(Output::Stopped {
                    idle: idle && !self.failed,
                });
                Next::Done
            }
        }
    }

    // -- steps -----------------------------------------------------------------

    /// Whether the file must be opened first: a slot to get, or the open to run.
    fn need_open(&mut self) -> Option<Step> {
        if self.file.is_some() || self.failed {
            return None;
        }
        if self.slot.is_none() {
            return Some(Step::NeedSlot);
        }
        self.blocking = Some(Blocking::Open);
        Some(Step::Blocking)
    }

    /// Opens the session's file from its checkpoint (a slot is held).
    fn open(&mut self) {
        let (fs, dir, s) = (self.cfg.fs.clone(), self.cfg.log_dir.as_path(), self.session.as_str());
        let opened = match self.cfg.meta.checkpoint(s) {
            Ok(ckpt) => SessionFile::open(fs, dir, s, ckpt).map_err(|e| {
                let what = format!("cannot open session file {}: {e}", logtmp_path(dir, s).display());
                (Some(e), what)
            }),
            Err(e) => Err((None, format!("cannot read the checkpoint of session {s}: {e}"))),
        };
        match opened {
            Ok((mut sf, repair)) => {
                self.report_moved_aside(sf.take_moved_aside());
                if repair.bytes_trimmed > 0 {
                    warn!(
                        session = self.session,
                        bytes = repair.bytes_trimmed,
                        "trimmed a torn end of the session file"
                    );
                }
                self.file = Some(sf);
                self.closed_with_lines = false;
                self.retries = 0;
            }
            Err((Some(e), what)) if on_error(FileOp::Open, &e) == OnError::Retry => self.retry_later(&what),
            Err((_, what)) => {
                self.slot = None;
                self.fail_stop(&what);
            }
        }
    }

    /// Writes the rendered lines to the file (page cache). False when the
    /// step must wait for a retry, or after a fail-stop.
    fn write_pending(&mut self) -> bool {
        let Some(sf) = self.file.as_mut() else { return true };
        if sf.pending_bytes() == 0 {
            return true;
        }
        let written = sf.write_pending();
        let moved = sf.take_moved_aside();
        self.report_moved_aside(moved);
        match written {
            Ok(()) => {
                self.retries = 0;
                wal::crash_point!("writer::after_write");
                true
            }
            Err(e) if on_error(e.op, &e.source) == OnError::Retry => {
                self.retry_later(&e.to_string());
                false
            }
            Err(e) => {
                self.fail_stop(&e.to_string());
                false
            }
        }
    }

    /// Steps 2-4 of a rotation, or, when a previous attempt already recorded
    /// it (and then failed on a transient error), its idempotent completion.
    /// `Err((transient, why))`.
    fn rotate_or_finish(&self, ckpt: Checkpoint, reason: RotateReason) -> Result<Option<Rotation>, (bool, String)> {
        let (fs, dir, meta) = (self.cfg.fs.as_ref(), self.cfg.log_dir.as_path(), self.cfg.meta.as_ref());
        let run = || -> Result<Option<Rotation>, store::StepError> {
            if let Some(rot) = meta.rotations()?.into_iter().find(|r| r.session == self.session) {
                complete_rotation(fs, dir, meta, self.cfg.life, &rot)?;
                return Ok(Some(rot));
            }
            rotate_synced(fs, dir, meta, self.cfg.life, &self.session, ckpt, reason)
        };
        run().map_err(|e| {
            let transient = e.io().is_some_and(|io| on_error(FileOp::Open, io) == OnError::Retry);
            (transient, e.to_string())
        })
    }

    /// A transient error: the step runs again after a capped exponential
    /// backoff (10 ms doubling to 2 s).
    fn retry_later(&mut self, what: &str) {
        let delay = RETRY_DELAY_FIRST
            .saturating_mul(1 << self.retries.min(10))
            .min(RETRY_DELAY_MAX);
        if self.retries == 0 || self.retries.is_power_of_two() {
            warn!(
                session = self.session,
                attempt = self.retries + 1,
                delay_ms = delay.as_millis() as u64,
                "{what}; transient, retrying"
            );
        }
        self.cfg.stats.io_retries.fetch_add(1, Ordering::Relaxed);
        self.retries += 1;
        self.wait = Some(delay);
    }

    /// Stops the process after a non-transient error: logs it, marks the
    /// writer failed (it touches its file no more) and asks the driver to
    /// stop logd ([`Output::FailStop`]). The WAL keeps every frame the file
    /// may lack, and the next start's recovery repairs the file from the disk.
    fn fail_stop(&mut self, what: &str) {
        error!(
            session = self.session,
            "{what}; stopping logd (exit 1) so that a restart recovers the session file from the disk and the WAL"
        );
        self.failed = true;
        self.failure = Some(what.to_owned());
        self.blocking = None;
        self.cfg.stats.fatal_errors.fetch_add(1, Ordering::Relaxed);
        self.out.push(Output::FailStop(what.to_owned()));
    }

    fn report_moved_aside(&self, moved: Option<PathBuf>) {
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
        if let Some(sf) = &self.file {
            let ckpt = sf.checkpoint();
            debug_assert!(ckpt.offset <= sf.offset(), "synced offset past the written one");
        }
        self.file = None;
        self.slot = None;
    }

    /// Whether the open file is older than the age limit.
    fn too_old(&self, now_ms: u64) -> bool {
        let Some(sf) = &self.file else { return false };
        let age_ms = now_ms.saturating_sub(sf.checkpoint().opened_at_ms);
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

/// What a job step leaves.
enum Next {
    /// The job is finished.
    Done,
    /// The job continues (at the front of the queue).
    Again(Job),
    /// `first` runs before the job continues.
    Then(Job, Job),
    /// The job waits for the driver (a slot, or a blocking operation).
    Wait(Job, Step),
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
