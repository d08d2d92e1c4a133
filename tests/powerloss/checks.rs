//! The invariants, one function each, checked on the state a crash and the
//! recovery pass left:
//! 1. [`World::check_acked_present`]: every acked frame is in its session's
//!    files (rotated `.log`, `.log.gz`, then `.logtmp`) exactly once, byte
//!    for byte as rendered ([`World::check_line`]); [`World::check_lines`]:
//!    no frame acked as a duplicate is there; a frame never acked may be
//!    there once;
//! 2. [`World::check_lines`]: every line is whole and parses as JSON with
//!    exactly the documented fields; seqs strictly increase across the
//!    session's files; [`World::check_rotated`]: rotated names carry their
//!    files' seq range;
//! 3. [`World::check_lines`]: a server-assigned seq directly follows the line
//!    before it (no gaps); a client seq is the one sent; no content appears
//!    twice;
//! 4. [`World::check_checkpoints`]: checkpoints match the files (`last_seq`,
//!    `offset`) and never name an LSN the reopened WAL will issue again;
//!    [`World::check_store_settled`]: they are flushed and no rotation is
//!    left unfinished; [`World::check_events_once`] and
//!    [`World::check_rotated`]: every compression job has its source, every
//!    rotated or compressed file its event (when events are on), and no
//!    event is recorded twice; [`World::collect_files`]: every file in
//!    `LOG_DIR` and its directory entry is durable;
//! 5. [`World::recover_and_check`]: a second recovery pass changes nothing
//!    (every file byte-identical, same checkpoints);
//! 6. [`World::check_materialized_mark`]: every WAL record below the
//!    `materialized_below_lsn` mark is in its session's files;
//! 7. in the next phase every outcome is exactly predicted (the ingest step
//!    checks it): server seqs continue from the recovered files, client seqs
//!    at or below them are duplicates, so no seq of an acked frame is reused.
//!
//! While running (in [`crate::world`]): a batch whose commit failed is not
//! acked, and after it nothing is acked any more (the WAL is poisoned).

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::io::Read;
use std::path::{Path, PathBuf};

use logd::pb::LogFrame;
use store::EventKind;
use store::parse_rotated_name;
use store::{Checkpoint, CompressJob};
use store::{LOGTMP_SUFFIX, render_line};
use wal::fs::Fs;

use crate::world::{Fate, LineJson, Live, WAL_DIR, World, log_dir};

macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            return Err(format!($($arg)*));
        }
    };
}

#[derive(Default)]
pub struct SessionFiles {
    logtmp: Option<Vec<u8>>,
    /// (first seq, `.log` name) → the rotated file and/or its `.gz`.
    rotated: BTreeMap<(i64, String), Rotated>,
}

#[derive(Default)]
pub struct Rotated {
    last_seq: i64,
    log: Option<Vec<u8>>,
    gz: Option<Vec<u8>>,
}

/// (first seq, rotated, compressed) of an event: `(rotated?, path, first, last)`.
type Events = BTreeSet<(bool, String, i64, i64)>;

pub type Snapshot = (Vec<(PathBuf, Vec<u8>)>, Vec<(String, Checkpoint)>);

fn diff(a: &Snapshot, b: &Snapshot) -> String {
    let files = |s: &Snapshot| s.0.iter().map(|(p, d)| (p.clone(), d.len())).collect::<Vec<_>>();
    format!(
        "files {:?} → {:?}; checkpoints {:?} → {:?}",
        files(a),
        files(b),
        a.1,
        b.1
    )
}

fn gunzip(name: &str, data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .read_to_end(&mut out)
        .map_err(|e| format!("{name}: not a whole gzip file: {e}"))?;
    Ok(out)
}

impl World {
    /// Every file (WAL and `LOG_DIR`) and every checkpoint.
    fn snapshot(&self) -> Snapshot {
        let files = self
            .fs
            .list_all()
            .into_iter()
            .map(|p| (p.clone(), self.fs.read_file(&p).unwrap()))
            .collect();
        (files, self.dmeta.checkpoints().unwrap())
    }

    /// Recovery after a crash, a second pass that must change nothing, the
    /// invariants, and the live pipeline for the next phase.
    pub fn recover_and_check(&mut self) -> Result<Live, String> {
        self.check_materialized_mark()
            .map_err(|e| format!("before recovery: {e}"))?;
        let wal = self.recover()?;
        let before = self.snapshot();
        drop(wal);
        self.note("second recovery pass".into());
        let wal = self.recover()?;
        let after = self.snapshot();
        ensure!(
            before == after,
            "a second recovery pass changed the state: {}",
            diff(&before, &after)
        );
        let last = self
            .check_state(wal.next_lsn())
            .map_err(|e| format!("after recovery: {e}"))?;
        Ok(self.start(wal, last))
    }

    /// The `materialized_below_lsn` mark (what salvage trusts to call a
    /// damaged record not lost), on the state a crash left: every WAL record
    /// below it is a line in its session's files.
    pub fn check_materialized_mark(&mut self) -> Result<(), String> {
        let mark = self.dmeta.materialized_below_lsn().map_err(|e| e.to_string())?;
        let mut held: BTreeMap<String, BTreeSet<i64>> = BTreeMap::new();
        for path in self.fs.list_dir(log_dir()).map_err(|e| e.to_string())? {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
            let session = match (name.strip_suffix(LOGTMP_SUFFIX), parse_rotated_name(&name)) {
                (Some(s), _) => s.to_owned(),
                (None, Some(r)) => r.session,
                _ => continue,
            };
            let mut data = self.fs.read_file(&path).expect("listed");
            if name.ends_with(".gz") {
                data = gunzip(&name, &data)?;
            }
            let seqs = held.entry(session).or_default();
            seqs.extend(data.split(|&b| b == b'\n').filter_map(store::line_seq));
        }
        let mut missing = Vec::new();
        // A torn tail past the mark may end the read early: that is fine.
        let _ = wal::read_from(
            self.dfs.as_ref(),
            Path::new(WAL_DIR),
            0,
            self.opts.record_bytes_max,
            |rec| {
                if rec.lsn < mark
                    && let Ok(f) = <LogFrame as prost::Message>::decode(rec.payload)
                    && !held.get(&f.session_id).is_some_and(|s| s.contains(&f.seq))
                {
                    missing.push((rec.lsn, f.session_id, f.seq));
                }
                Ok(())
            },
        );
        ensure!(
            missing.is_empty(),
            "WAL records below the materialized mark {mark} are in no session file: {missing:?}"
        );
        self.note(format!("materialized mark {mark} holds"));
        Ok(())
    }

    /// Checks the invariants on the recovered state; returns each session's
    /// last seq (what the next Sequencer must continue from).
    fn check_state(&mut self, next_lsn: u64) -> Result<BTreeMap<String, i64>, String> {
        self.check_store_settled()?;
        let files = self.collect_files()?;
        let checkpoints: BTreeMap<String, Checkpoint> = self.dmeta.checkpoints().unwrap().into_iter().collect();
        let jobs = self.dmeta.compress_jobs().unwrap();
        let events = self.check_events_once()?;
        self.check_jobs_have_sources(&jobs)?;
        let mut contents_seen = BTreeSet::new();
        let mut last_seqs = BTreeMap::new();
        for (session, sf) in &files {
            let mut parts: Vec<(String, &[u8])> = self.check_rotated(sf, &jobs, &events)?;
            if let Some(data) = &sf.logtmp {
                parts.push((format!("{session}{LOGTMP_SUFFIX}"), data));
            }
            let (present, last) = self.check_lines(session, &parts, &mut contents_seen)?;
            self.check_acked_present(session, &present)?;
            self.check_checkpoints(session, checkpoints.get(session), sf, !parts.is_empty(), last, next_lsn)?;
            last_seqs.insert(session.clone(), last);
        }
        for session in checkpoints.keys() {
            ensure!(files.contains_key(session), "checkpoint of unknown session {session}");
        }
        Ok(last_seqs)
    }

    /// Recovery flushed the store and finished every rotation.
    fn check_store_settled(&self) -> Result<(), String> {
        ensure!(
            self.meta.unflushed() == 0,
            "recovery left {} store batches unflushed",
            self.meta.unflushed()
        );
        ensure!(
            self.dmeta.rotations().unwrap().is_empty(),
            "unfinished rotations after recovery"
        );
        Ok(())
    }

    /// Every session's files; each (and its directory entry) is durable,
    /// and nothing else is in `LOG_DIR`.
    fn collect_files(&self) -> Result<BTreeMap<String, SessionFiles>, String> {
        let mut files: BTreeMap<String, SessionFiles> = BTreeMap::new();
        for session in &self.sessions {
            files.entry(session.clone()).or_default();
        }
        for path in self.fs.list_dir(log_dir()).map_err(|e| e.to_string())? {
            let data = self.fs.read_file(&path).expect("listed");
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
            if name.ends_with(".gz.tmp") {
                continue; // an interrupted compression; the next run replaces it
            }
            ensure!(
                self.fs.durable_read(&path).as_ref() == Some(&data),
                "{} is not durable after recovery (volatile {} B, durable {:?} B)",
                path.display(),
                data.len(),
                self.fs.durable_read(&path).map(|d| d.len())
            );
            if let Some(session) = name.strip_suffix(LOGTMP_SUFFIX) {
                files.entry(session.to_owned()).or_default().logtmp = Some(data);
            } else if let Some(r) = parse_rotated_name(&name) {
                let stem = name.strip_suffix(".gz").unwrap_or(&name).to_owned();
                let entry = files
                    .entry(r.session.clone())
                    .or_default()
                    .rotated
                    .entry((r.first_seq, stem))
                    .or_default();
                entry.last_seq = r.last_seq;
                if r.gz {
                    entry.gz = Some(gunzip(&name, &data)?);
                } else {
                    entry.log = Some(data);
                }
            } else {
                return Err(format!("stray file {name} in LOG_DIR"));
            }
        }
        Ok(files)
    }

    /// No event is recorded twice (nothing drains the outbox here: an id
    /// twice is a step redone after a crash that re-announced it).
    fn check_events_once(&self) -> Result<Events, String> {
        let outbox = self.dmeta.outbox(usize::MAX).unwrap();
        let mut ids = BTreeSet::new();
        for (_, e) in &outbox {
            ensure!(ids.insert(e.event_id.clone()), "event {} recorded twice", e.event_id);
        }
        Ok(outbox
            .into_iter()
            .map(|(_, e)| (e.kind == EventKind::Rotated, e.path, e.first_seq, e.last_seq))
            .collect())
    }

    /// Every compression job's source file exists.
    fn check_jobs_have_sources(&self, jobs: &[CompressJob]) -> Result<(), String> {
        for job in jobs {
            ensure!(
                self.fs.exists(&log_dir().join(&job.rotation.to)),
                "compression job for {} whose source is gone",
                job.rotation.to
            );
        }
        Ok(())
    }

    /// The rotated files of a session: a `.log` has its compression job (or
    /// its `.gz`), a `.gz` its `compressed` event, each its `rotated` event,
    /// and each holds exactly the seq range its name says. Returns them in
    /// seq order.
    fn check_rotated<'a>(
        &self,
        sf: &'a SessionFiles,
        jobs: &[CompressJob],
        events: &Events,
    ) -> Result<Vec<(String, &'a [u8])>, String> {
        let mut parts = Vec::new();
        for ((first, stem), r) in &sf.rotated {
            let data = match (&r.log, &r.gz) {
                (Some(log), Some(gz)) => {
                    ensure!(log == gz, "{stem}: .gz differs from the .log");
                    ensure!(
                        self.life.gzip_level.is_none(),
                        "{stem}: both .log and .gz after recovery"
                    );
                    log
                }
                (Some(log), None) => {
                    if self.life.gzip_level.is_some() {
                        ensure!(
                            jobs.iter().any(|j| j.rotation.to == *stem),
                            "{stem}: no compression job"
                        );
                    }
                    log
                }
                (None, Some(gz)) => {
                    if self.life.events {
                        let ev = (false, format!("{stem}.gz"), *first, r.last_seq);
                        ensure!(events.contains(&ev), "{stem}.gz has no compressed event");
                    }
                    gz
                }
                (None, None) => unreachable!("an entry has a file"),
            };
            if self.life.events {
                let ev = (true, stem.clone(), *first, r.last_seq);
                ensure!(events.contains(&ev), "{stem} has no rotated event");
            }
            ensure!(!data.is_empty(), "{stem} is empty");
            let seqs: Vec<i64> = data
                .split_inclusive(|&b| b == b'\n')
                .filter_map(store::line_seq)
                .collect();
            ensure!(
                seqs.first() == Some(first) && seqs.last() == Some(&r.last_seq),
                "{stem}: holds seqs {:?}..{:?}",
                seqs.first(),
                seqs.last()
            );
            parts.push((stem.clone(), data.as_slice()));
        }
        Ok(parts)
    }

    /// Every line of a session's files, in order: whole, as rendered, seqs
    /// increasing, server seqs without gaps, client seqs as sent, no content
    /// twice, no duplicate-acked frame, acked frames at their seq. Returns
    /// the seqs present and the last one.
    fn check_lines(
        &mut self,
        session: &str,
        parts: &[(String, &[u8])],
        contents_seen: &mut BTreeSet<String>,
    ) -> Result<(BTreeMap<i64, String>, i64), String> {
        let mut prev = 0i64;
        let mut present: BTreeMap<i64, String> = BTreeMap::new();
        for (name, data) in parts {
            ensure!(data.is_empty() || data.ends_with(b"\n"), "{name}: torn last line");
            for (i, line) in data.split_inclusive(|&b| b == b'\n').enumerate() {
                let at = || format!("{name} line {}", i + 1);
                let (seq, content) = self.check_line(session, line).map_err(|e| format!("{}: {e}", at()))?;
                ensure!(seq > prev, "{}: seq {seq} after {prev}", at());
                ensure!(
                    contents_seen.insert(content.clone()),
                    "{}: content {content:?} appears twice",
                    at()
                );
                let sent = &self.model.sent[&content];
                match sent.fate {
                    Fate::Acked(s) => ensure!(s == seq, "{}: frame acked as seq {s} is there as {seq}", at()),
                    Fate::Duplicate => return Err(format!("{}: a frame acked as a duplicate was written", at())),
                    Fate::Unknown => {}
                }
                if sent.frame.seq > 0 {
                    ensure!(
                        sent.frame.seq == seq,
                        "{}: client seq {} written as {seq}",
                        at(),
                        sent.frame.seq
                    );
                } else {
                    ensure!(
                        seq == prev + 1,
                        "{}: server-assigned seq {seq} does not follow {prev}",
                        at()
                    );
                }
                present.insert(seq, content);
                prev = seq;
            }
        }
        Ok((present, prev))
    }

    /// Every acked frame of the session is present.
    fn check_acked_present(&self, session: &str, present: &BTreeMap<i64, String>) -> Result<(), String> {
        for (seq, content) in self.model.acked.get(session).into_iter().flatten() {
            ensure!(
                present.get(seq) == Some(content),
                "{session}: acked frame seq {seq} ({content:?}) is lost (files hold seqs {:?})",
                present.keys().collect::<Vec<_>>()
            );
        }
        Ok(())
    }

    /// The session's checkpoint matches its files and the reopened WAL.
    fn check_checkpoints(
        &self,
        session: &str,
        ckpt: Option<&Checkpoint>,
        sf: &SessionFiles,
        has_files: bool,
        last: i64,
        next_lsn: u64,
    ) -> Result<(), String> {
        let Some(c) = ckpt else {
            ensure!(!has_files, "{session}: files but no checkpoint");
            return Ok(());
        };
        let len = sf.logtmp.as_ref().map_or(0, |d| d.len() as u64);
        ensure!(
            c.last_seq == last,
            "{session}: checkpoint last_seq {} but the files end at seq {last}",
            c.last_seq
        );
        ensure!(
            c.offset == len,
            "{session}: checkpoint offset {} but the .logtmp has {len} bytes",
            c.offset
        );
        ensure!(
            c.last_lsn < next_lsn,
            "{session}: checkpoint covers LSN {} but the reopened WAL issues LSN {next_lsn} next \
             (LSNs of materialized records will be reused)",
            c.last_lsn
        );
        Ok(())
    }

    /// Checks one line's shape and that it is exactly the rendering of the
    /// frame sent with its content; returns its seq and content.
    pub fn check_line(&mut self, session: &str, line: &[u8]) -> Result<(i64, String), String> {
        let mut hasher = std::hash::DefaultHasher::new();
        line.hash(&mut hasher);
        let hash = hasher.finish();
        if let Some(known) = self.verified.get(&hash) {
            return Ok(known.clone());
        }
        let body = line.strip_suffix(b"\n").ok_or("torn line (no newline)")?;
        ensure!(body.starts_with(b"{\"seq\":"), "the seq is not first");
        let text = std::str::from_utf8(body).map_err(|e| format!("not UTF-8: {e}"))?;
        let parsed: LineJson =
            serde_json::from_str(text).map_err(|e| format!("not a documented line ({e}): {text}"))?;
        ensure!(
            chrono::DateTime::parse_from_rfc3339(&parsed.time).is_ok(),
            "time {:?} is not RFC 3339",
            parsed.time
        );
        ensure!(
            parsed.session_id == session,
            "session_id {:?} in {session}'s file",
            parsed.session_id
        );
        ensure!(parsed.version == 1, "version {}", parsed.version);
        let sent = self
            .model
            .sent
            .get(&parsed.content)
            .ok_or_else(|| format!("content {:?} was never sent", parsed.content))?;
        let mut expected = Vec::new();
        render_line(
            &LogFrame {
                seq: parsed.seq,
                ..sent.frame.clone()
            },
            &mut expected,
        );
        ensure!(
            expected == line,
            "bytes differ from the rendered frame:\n  file: {text}\n  want: {}",
            String::from_utf8_lossy(&expected)
        );
        let known = (parsed.seq, parsed.content);
        self.verified.insert(hash, known.clone());
        Ok(known)
    }
}
