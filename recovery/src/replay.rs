//! The service's side of the pass: [`Replayer`] brings session files to a
//! consistent end, finishes interrupted rotations and compressions,
//! rebuilds a lost metadata store and replays WAL records into the files
//! through the same [`SessionFile`] code the writers use.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use prost::Message;
use serde::Serialize;
use store::pb::LogFrame;
use store::{Checkpoint, LOGTMP_SUFFIX, MetaStore, SessionFile, logtmp_path};
use wal::fs::{Fs, OpenMode};

/// The recovery side of materialization: replays WAL records into session
/// files through [`SessionFile`], at most `files_open_max` at a time.
///
/// `prepare` visits every session file in the log directory and refreshes
/// its checkpoint from the file itself, so a lost, stale or rebuilt
/// metadata store is corrected before any seq is assigned. In dry-run mode
/// nothing is written: files are probed read-only and records counted.
pub struct Replayer {
    fs: Arc<dyn Fs>,
    log_dir: PathBuf,
    meta: Arc<dyn MetaStore>,
    files: HashMap<String, SessionFile>,
    /// Dry run: last seq per session as replay would advance it.
    probed: HashMap<String, i64>,
    dry_run: bool,
    files_open_max: usize,
    /// What replay did (or would do), per session.
    pub per_session: BTreeMap<String, SessionReplay>,
    /// Session files whose checkpoint `prepare` refreshed.
    pub checkpoints_refreshed: u64,
    /// Compression and events, for finishing interrupted file steps.
    life: store::Lifecycle,
    /// What `prepare` finished or re-announced.
    pub lifecycle: LifecycleRepair,
}

/// File steps the recovery pass finished (in a dry run: would finish).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LifecycleRepair {
    /// Rotations recorded but not finished (renamed now).
    pub rotations_finished: Vec<String>,
    /// Rotated files whose compression was not finished when the pass
    /// started (including those of the rotations it finishes), in seq order
    /// per session.
    pub compressions_pending: Vec<String>,
    /// Pending compressions finished: by `prepare` those whose `.gz` was
    /// complete (only the unlink and the event were left), by
    /// [`Replayer::finish_compressions`] the others.
    pub compressions_finished: Vec<String>,
    /// Events recorded in the outbox (one per finished step, when events
    /// are on, plus those re-announced after a rebuild).
    pub events_recorded: u64,
    /// Rotated files re-announced because the store was rebuilt.
    pub events_reemitted: u64,
    /// Rotated `.log` files queued for compression because the store was rebuilt.
    pub compressions_queued: u64,
    /// Whether the store had no checkpoints while session files existed.
    pub meta_rebuilt: bool,
    /// Empty `.logtmp` files without checkpointed content, removed (or, in
    /// a dry run, to be removed): a session without frames has no file.
    pub empty_files_removed: Vec<String>,
    /// Foreign files found at a session file's name (symbolic links,
    /// non-regular files, files without a line of logd's and no checkpoint),
    /// moved aside untouched: where each went.
    pub foreign_files_moved: Vec<String>,
}

/// What replay did for one session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SessionReplay {
    /// Records written to the session's file.
    pub replayed: u64,
    /// Records the file already held.
    pub skipped: u64,
    /// Bytes cut from the file's end on open.
    pub bytes_trimmed: u64,
}

/// Why the session-file side of the pass failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// A session file or the log directory could not be read or written.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A step of a session file (write, fdatasync, directory fsync) failed.
    #[error(transparent)]
    File(#[from] store::FileError),
    /// The metadata store failed.
    #[error(transparent)]
    Meta(#[from] store::MetaError),
    /// Finishing an interrupted rotation or compression failed.
    #[error(transparent)]
    Step(#[from] store::StepError),
    /// A WAL record whose CRC held does not decode as a `LogFrame`.
    #[error("record at LSN {lsn} is not a LogFrame: {source}")]
    Decode {
        /// The record's LSN.
        lsn: u64,
        /// What prost said.
        #[source]
        source: prost::DecodeError,
    },
}

/// Rendered bytes a replayed session file buffers before writing; with at
/// most `files_open_max` files open, replay memory stays near 32 MiB
/// whatever the size of the WAL.
const REPLAY_PENDING_BYTES_MAX: usize = 128 << 10;

impl Replayer {
    /// A replayer writing into `log_dir`, reading checkpoints from `meta`.
    pub fn new(fs: Arc<dyn Fs>, log_dir: &Path, meta: Arc<dyn MetaStore>) -> Self {
        Replayer {
            fs,
            log_dir: log_dir.to_path_buf(),
            meta,
            files: HashMap::new(),
            probed: HashMap::new(),
            dry_run: false,
            files_open_max: 256,
            per_session: BTreeMap::new(),
            checkpoints_refreshed: 0,
            life: store::Lifecycle::default(),
            lifecycle: LifecycleRepair::default(),
        }
    }

    /// Keeps at most `n` session files open at once (`LOGD_OPEN_FILES_MAX`).
    pub fn with_files_open_max(mut self, n: usize) -> Self {
        self.files_open_max = self.files_open_max.min(n.max(1));
        self
    }

    /// Finishes interrupted rotations and compressions per `life`.
    pub fn with_lifecycle(mut self, life: store::Lifecycle) -> Self {
        self.life = life;
        self
    }

    /// Finishes recorded rotations and compressions whose `.gz` exists; when
    /// the store lost everything, re-announces rotated files and queues their
    /// compression. Returns the highest seq per session in rotated files.
    fn repair_lifecycle(&mut self) -> Result<HashMap<String, i64>, ReplayError> {
        use store::{complete_rotation, parse_rotated_name};
        let (fs, dir, meta, life) = (self.fs.as_ref(), self.log_dir.as_path(), self.meta.as_ref(), self.life);
        let events = u64::from(life.events);
        let mut rotations = meta.rotations()?;
        rotations.sort_by(|a, b| (&a.session, a.stats.first_seq).cmp(&(&b.session, b.stats.first_seq)));
        let mut pending: Vec<(String, i64, String)> = Vec::new();
        for rot in rotations {
            if !self.dry_run {
                complete_rotation(fs, dir, meta, life, &rot)?;
            } else if life.gzip_level.is_some() {
                // Finishing it queues its compression (below when not dry).
                pending.push((rot.session.clone(), rot.stats.first_seq, rot.to.clone()));
            }
            self.lifecycle.rotations_finished.push(rot.to.clone());
            self.lifecycle.events_recorded += events;
        }
        for job in meta.compress_jobs()? {
            let r = &job.rotation;
            pending.push((r.session.clone(), r.stats.first_seq, r.to.clone()));
        }
        // Seq order per session: `compressed` events must go out in it.
        pending.sort();
        pending.dedup();
        for (_, _, name) in pending {
            let gz = dir.join(format!("{name}.gz"));
            if fs.exists(&gz) {
                if !self.dry_run {
                    store::run_compression(fs, dir, meta, life, &name)?;
                }
                self.lifecycle.compressions_finished.push(name.clone());
                self.lifecycle.events_recorded += events;
            }
            self.lifecycle.compressions_pending.push(name);
        }
        let mut names: Vec<(String, store::RotatedName)> = Vec::new();
        if fs.exists(dir) {
            for path in fs.list_dir(dir)? {
                let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                    continue;
                };
                if let Some(r) = parse_rotated_name(name) {
                    names.push((name.to_owned(), r));
                }
            }
        }
        names.sort_by(|a, b| (&a.1.session, a.1.first_seq, a.1.gz).cmp(&(&b.1.session, b.1.first_seq, b.1.gz)));
        let mut floors: HashMap<String, i64> = HashMap::new();
        for (_, r) in &names {
            let f = floors.entry(r.session.clone()).or_insert(0);
            *f = (*f).max(r.last_seq);
        }
        let rebuilt = meta.checkpoints()?.is_empty() && (!names.is_empty() || !self.sessions_on_disk()?.is_empty());
        self.lifecycle.meta_rebuilt = rebuilt;
        if rebuilt && !self.dry_run {
            self.reannounce(&names)?;
        }
        Ok(floors)
    }

    /// After a rebuild: events for every rotated file (same deterministic
    /// ids, so consumers dedupe) and compression for every `.log`.
    fn reannounce(&mut self, names: &[(String, store::RotatedName)]) -> Result<(), ReplayError> {
        use store::{CompressJob, compress_op, event_op};
        use store::{Rotation, compressed_event, file_stats, rotated_event};
        let (fs, dir, meta, life) = (self.fs.as_ref(), self.log_dir.as_path(), self.meta.as_ref(), self.life);
        for (name, r) in names {
            let log_name = name.strip_suffix(".gz").unwrap_or(name).to_owned();
            if r.gz && names.iter().any(|(n, _)| *n == log_name) {
                continue; // the .log is still there: announced with it below
            }
            let path = dir.join(name);
            let mut rot = Rotation {
                session: r.session.clone(),
                to: log_name.clone(),
                stats: store::FileStats {
                    first_seq: r.first_seq,
                    last_seq: r.last_seq,
                    ..Default::default()
                },
                reason: store::RotateReason::Recovery,
                rotated_at_ms: store::now_ms(),
            };
            let mut ops = Vec::new();
            if !r.gz {
                rot.stats = file_stats(fs, &path)?;
                if life.events {
                    ops.push(event_op(meta.next_id()?, &rotated_event(&rot)));
                }
                if life.gzip_level.is_some() {
                    ops.push(compress_op(&log_name, Some(&CompressJob::new(rot.clone()))));
                    self.lifecycle.compressions_queued += 1;
                }
            } else if life.events {
                let (bytes_out, crc32) = store::checksum(fs, &path)?;
                let c = store::Compressed {
                    bytes_in: 0,
                    bytes_out,
                    crc32,
                };
                ops.push(event_op(meta.next_id()?, &rotated_event(&rot)));
                ops.push(event_op(meta.next_id()?, &compressed_event(&rot, &c)));
            }
            let n = ops.iter().filter(|o| o.0 == store::Tree::Outbox).count() as u64;
            self.lifecycle.events_reemitted += n;
            self.lifecycle.events_recorded += n;
            if !ops.is_empty() {
                meta.apply(ops)?;
            }
        }
        Ok(())
    }

    /// Runs every pending compression that `prepare` left (those without a
    /// complete `.gz`) to its end, in seq order, as the service's
    /// compression pool does right after its recovery pass: `logd recover`
    /// calls this so that it finishes exactly what `logd serve` would. In a
    /// dry run, only counts them as would-be finished.
    pub fn finish_compressions(&mut self) -> Result<(), ReplayError> {
        use store::{CompressionRun, run_compression};
        if !self.dry_run {
            // Also jobs queued after `prepare` listed them (a rebuild).
            let mut jobs = self.meta.compress_jobs()?;
            jobs.sort_by(|a, b| {
                (&a.rotation.session, a.rotation.stats.first_seq)
                    .cmp(&(&b.rotation.session, b.rotation.stats.first_seq))
            });
            let known: std::collections::HashSet<String> =
                self.lifecycle.compressions_pending.iter().cloned().collect();
            for job in jobs {
                if !known.contains(&job.rotation.to) {
                    self.lifecycle.compressions_pending.push(job.rotation.to);
                }
            }
        }
        for name in self.compressions_left() {
            if !self.dry_run {
                let run = run_compression(self.fs.as_ref(), &self.log_dir, self.meta.as_ref(), self.life, &name)?;
                if run == CompressionRun::NoJob {
                    continue;
                }
            }
            self.lifecycle.compressions_finished.push(name);
            self.lifecycle.events_recorded += u64::from(self.life.events);
        }
        Ok(())
    }

    /// Pending compressions not finished (the service's pool takes them).
    pub fn compressions_left(&self) -> Vec<String> {
        let l = &self.lifecycle;
        let finished: std::collections::HashSet<&String> = l.compressions_finished.iter().collect();
        l.compressions_pending
            .iter()
            .filter(|n| !finished.contains(n))
            .cloned()
            .collect()
    }

    fn note_moved_aside(&mut self, sf: &mut SessionFile) {
        if let Some(aside) = sf.take_moved_aside() {
            let name = aside
                .file_name()
                .map_or_else(|| aside.display().to_string(), |n| n.to_string_lossy().into_owned());
            self.lifecycle.foreign_files_moved.push(name);
        }
    }

    /// A replayer that changes nothing and only counts.
    pub fn dry_run(fs: Arc<dyn Fs>, log_dir: &Path, meta: Arc<dyn MetaStore>) -> Self {
        Replayer {
            dry_run: true,
            ..Replayer::new(fs, log_dir, meta)
        }
    }

    fn close_all(&mut self) -> Result<(), ReplayError> {
        let mut files: Vec<(String, SessionFile)> = self.files.drain().collect();
        for (session, sf) in &mut files {
            let ckpt = sf.sync()?;
            self.meta.put_checkpoint(session, &ckpt)?;
        }
        for (_, mut sf) in files {
            self.note_moved_aside(&mut sf);
        }
        Ok(())
    }

    /// Session ids that have a `.logtmp` in the log directory.
    fn sessions_on_disk(&self) -> Result<Vec<String>, ReplayError> {
        if !self.fs.exists(&self.log_dir) {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for path in self.fs.list_dir(&self.log_dir)? {
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if let Some(session) = name.strip_suffix(LOGTMP_SUFFIX)
                && store::session_id_is_valid(session)
            {
                out.push(session.to_owned());
            }
        }
        out.sort();
        Ok(out)
    }

    fn apply_dry(&mut self, frame: &LogFrame) -> Result<bool, ReplayError> {
        let last = match self.probed.get_mut(&frame.session_id) {
            Some(l) => l,
            None => {
                let ckpt = self.meta.checkpoint(&frame.session_id)?;
                let (last, repair) = SessionFile::probe(self.fs.as_ref(), &self.log_dir, &frame.session_id, ckpt)?;
                self.per_session
                    .entry(frame.session_id.clone())
                    .or_default()
                    .bytes_trimmed = repair.bytes_trimmed;
                self.probed.entry(frame.session_id.clone()).or_insert(last)
            }
        };
        if frame.seq <= *last {
            return Ok(false);
        }
        *last = frame.seq;
        Ok(true)
    }

    fn apply_live(&mut self, lsn: u64, frame: &LogFrame) -> Result<bool, ReplayError> {
        if !self.files.contains_key(&frame.session_id) {
            if self.files.len() >= self.files_open_max {
                self.close_all()?;
            }
            let ckpt = self.meta.checkpoint(&frame.session_id)?;
            let (mut sf, repair) = SessionFile::open(self.fs.clone(), &self.log_dir, &frame.session_id, ckpt)?;
            self.note_moved_aside(&mut sf);
            self.per_session
                .entry(frame.session_id.clone())
                .or_default()
                .bytes_trimmed += repair.bytes_trimmed;
            self.files.insert(frame.session_id.clone(), sf);
        }
        let sf = self.files.get_mut(&frame.session_id).expect("just inserted");
        let written = sf.append_frame(lsn, frame);
        if sf.pending_bytes() > REPLAY_PENDING_BYTES_MAX {
            sf.write_pending()?;
        }
        Ok(written)
    }
}

impl crate::Materializer for Replayer {
    fn prepare(&mut self) -> Result<(), ReplayError> {
        let floors = self.repair_lifecycle()?;
        let on_disk = self.sessions_on_disk()?;
        // Sessions whose only files are rotated ones still need their seq.
        for (session, floor) in &floors {
            if on_disk.contains(session) || self.dry_run {
                continue;
            }
            let ckpt = self.meta.checkpoint(session)?.unwrap_or_default();
            if ckpt.last_seq < *floor {
                self.meta.put_checkpoint(
                    session,
                    &Checkpoint {
                        offset: 0,
                        last_seq: *floor,
                        ..ckpt
                    },
                )?;
                self.checkpoints_refreshed += 1;
            }
        }
        let mut removed_any = false;
        for session in on_disk {
            let stored = self.meta.checkpoint(&session)?;
            let path = logtmp_path(&self.log_dir, &session);
            if stored.is_none_or(|c| c.offset == 0) && self.fs.open(&path, OpenMode::Read)?.len()? == 0 {
                // Nothing was ever checkpointed in it and it holds nothing:
                // a ghost (older logds created one per known session).
                if !self.dry_run {
                    self.fs.remove_file(&path)?;
                    removed_any = true;
                }
                self.lifecycle
                    .empty_files_removed
                    .push(format!("{session}{LOGTMP_SUFFIX}"));
                continue;
            }
            // Rotated files bound the seq from below, even if the store is stale.
            let floor = floors.get(&session).copied().unwrap_or(0);
            let ckpt = match stored {
                Some(c) if c.last_seq >= floor => Some(c),
                Some(c) => Some(Checkpoint { last_seq: floor, ..c }),
                None if floor > 0 => Some(Checkpoint {
                    last_seq: floor,
                    ..Checkpoint::default()
                }),
                None => None,
            };
            if self.dry_run {
                let (_, repair) = SessionFile::probe(self.fs.as_ref(), &self.log_dir, &session, ckpt)?;
                if repair.bytes_trimmed > 0 {
                    self.per_session.entry(session).or_default().bytes_trimmed = repair.bytes_trimmed;
                }
                continue;
            }
            let (mut sf, repair) = SessionFile::open(self.fs.clone(), &self.log_dir, &session, ckpt)?;
            self.note_moved_aside(&mut sf);
            if repair.bytes_trimmed > 0 {
                self.per_session.entry(session.clone()).or_default().bytes_trimmed += repair.bytes_trimmed;
            }
            let fresh = sf.sync()?;
            if stored != Some(fresh) {
                self.meta.put_checkpoint(&session, &fresh)?;
                self.checkpoints_refreshed += 1;
            }
        }
        if removed_any {
            self.fs.sync_dir(&self.log_dir)?;
        }
        Ok(())
    }

    fn apply(&mut self, lsn: u64, payload: &[u8]) -> Result<crate::Applied, ReplayError> {
        let frame = LogFrame::decode(payload).map_err(|source| ReplayError::Decode { lsn, source })?;
        let written = if self.dry_run {
            self.apply_dry(&frame)?
        } else {
            self.apply_live(lsn, &frame)?
        };
        let stats = self.per_session.entry(frame.session_id).or_default();
        if written {
            stats.replayed += 1;
            Ok(crate::Applied::Written)
        } else {
            stats.skipped += 1;
            Ok(crate::Applied::Skipped)
        }
    }

    fn finish(&mut self) -> Result<(), ReplayError> {
        if self.dry_run {
            return Ok(());
        }
        self.close_all()?;
        self.meta.flush()?;
        Ok(())
    }
}
