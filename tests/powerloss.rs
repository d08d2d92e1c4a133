//! Deterministic power-loss simulation of logd's whole data path.
//!
//! Each seed drives the real code on a [`SimFs`] and a [`SimMeta`]: the
//! [`Sequencer`] stage and `Wal::commit` (as the commit thread runs them),
//! routing with a [`CheckpointTracker`] (as the dispatcher does), session
//! writers on [`SessionFile`] (append, write, fdatasync, checkpoint, report;
//! size, manual and idle rotation with `rotate_synced`; idle stop, with the
//! stopping writer draining its queue while its successor waits for it),
//! compression with `run_compression`, segment removal (store
//! flushed first) and the recovery pass with a [`Replayer`]. A PRNG chooses
//! the interleaving and then a crash:
//! - a **power cut** (`SimFs::crash`: every write and namespace op not
//!   fsynced is kept, torn or dropped; the store keeps what was flushed and a
//!   prefix of the rest), or a **kill** (the process dies, the page cache
//!   survives; the store keeps a prefix of its unflushed batches);
//! - between two steps, between a commit and its settle, or (with the
//!   `failpoints` feature) exactly at one of the code's crash points
//!   ([`CRASH_POINTS`]: the point panics, so the dead process does nothing
//!   more).
//!
//! Some phases inject I/O errors first: every fdatasync failing from some
//! point on (with or without Linux's "a failed writeback drops the pages"),
//! or a transient burst of failing fdatasyncs or writes that then heals.
//! Either crash may follow: after a kill, the page cache still holds the
//! pages whose writeback failed, and recovery must not trust them.
//!
//! After every crash the recovery pass runs, then a second pass, and:
//! 1. every acked frame is in its session's files (rotated `.log`, `.log.gz`,
//!    then `.logtmp`) exactly once, byte for byte as rendered; no frame acked
//!    as a duplicate is there; a frame that was never acked may be there once;
//! 2. every line is whole and parses as JSON with exactly the documented
//!    fields; seqs strictly increase across the session's files; rotated
//!    names carry their files' seq range;
//! 3. a server-assigned seq directly follows the line before it (no gaps);
//!    a client seq is the one sent; no content appears twice;
//! 4. checkpoints match the files (`last_seq`, `offset`), never name an LSN
//!    the reopened WAL will issue again, and are flushed; no rotation is left
//!    unfinished, every compression job has its source; every rotated or
//!    compressed file has its event (when events are on); every file in
//!    `LOG_DIR` and its directory entry is durable;
//! 5. the second pass changed nothing (every file byte-identical, same
//!    checkpoints);
//! 6. in the next phase every outcome is exactly predicted: server seqs
//!    continue from the recovered files, client seqs at or below them are
//!    duplicates, so no seq of an acked frame is ever reused.
//!
//! While running: a batch whose commit failed is not acked, and after it
//! nothing is acked any more (the WAL is poisoned); a live frame handed to a
//! writer is always new to its file.
//!
//! The writer and dispatcher control flow is transcribed from
//! `src/writer.rs` (they are async tasks); keep the two in step.
//!
//! `LOGD_SIM_SEEDS=N` runs N seeds (default 2000) from `LOGD_SIM_SEED_START`
//! (default 0); `LOGD_SIM_SEED=S` runs seed S alone and prints its step log
//! (`-- --nocapture`). `LOGD_SIM_FAULTS=0` / `LOGD_SIM_IDLE_RACE=0` narrow a
//! failure down (see [`knobs`]).

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::io::Read;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use logd::pb::LogFrame;
use logd::pipeline::{CheckpointTracker, PENDING_WRITE_BYTES};
use logd::pipeline::{Durable, IngestRequest, IngestStats, Outcome, Sequencer};
use recovery::Replayer;
use store::{Checkpoint, CompressJob, MetaStore, SimMeta};
use store::{EventKind, RotateReason};
use store::{LOGTMP_SUFFIX, SessionFile, render_line};
use store::{Lifecycle, parse_rotated_name, rotate_synced, run_compression};
use tokio::sync::{Semaphore, mpsc, oneshot};
use wal::fs::Fs;
use wal::sim::{SimFs, SplitMix64};
use wal::{Segments, Stage, Wal, WalOptions};

const LOG_DIR: &str = "/logs";
const WAL_DIR: &str = "/state/wal";
const DEFAULT_SEEDS: u64 = 2000;
const BUDGET_PERMITS: usize = 1 << 24;
/// A session file line: exactly the documented fields, each once.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LineJson {
    seq: i64,
    time: String,
    session_id: String,
    #[allow(dead_code)]
    user_id: String,
    #[allow(dead_code)]
    role: String,
    version: i64,
    content: String,
    #[allow(dead_code)]
    metadata: serde_json::Map<String, serde_json::Value>,
}

/// The crash points the simulated pipeline passes through.
const CRASH_POINTS: [&str; 9] = [
    "wal::commit::after_write",
    "wal::remove::after_unlink",
    "rotate::after_record",
    "rotate::after_rename",
    "rotate::after_dir_fsync",
    "compress::after_tmp_open",
    "compress::after_gz",
    "compress::after_unlink",
    "compress::after_event",
];

// ---------------------------------------------------------------------------
// Crash points: an armed point panics with `CrashPanic`; the step catches it
// and the process is dead from there on.

struct CrashPanic(&'static str);

thread_local! {
    static ARMED: Cell<Option<&'static str>> = const { Cell::new(None) };
}

fn fire(point: &'static str) {
    if ARMED.with(|a| a.get()) == Some(point) {
        ARMED.with(|a| a.set(None));
        std::panic::panic_any(CrashPanic(point));
    }
}

fn arm(point: Option<&'static str>) {
    ARMED.with(|a| a.set(point));
}

fn install_crash_points() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for point in CRASH_POINTS {
            fail::cfg_callback(point, move || fire(point)).expect("failpoint");
        }
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !info.payload().is::<CrashPanic>() {
                default(info);
            }
        }));
    });
}

// ---------------------------------------------------------------------------
// The model: what was sent and what the service answered.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Acked with this seq: must be in the files exactly once.
    Acked(i64),
    /// Acked as a duplicate: must never be written.
    Duplicate,
    /// Failed or never answered: may be present (once) or absent.
    Unknown,
}

struct Sent {
    /// As sent (`seq` is the client's, 0 for server-assigned).
    frame: LogFrame,
    fate: Fate,
}

#[derive(Default)]
struct Model {
    /// Every frame sent, by its (unique) content.
    sent: BTreeMap<String, Sent>,
    /// Acked frames: session → seq → content.
    acked: BTreeMap<String, BTreeMap<i64, String>>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    seeds: u64,
    acked: u64,
    power_cuts: u64,
    kills: u64,
    crash_points_hit: u64,
    before_settle: u64,
    fault_phases: u64,
    failed_commits: u64,
    torn_wal_tails: u64,
    session_bytes_trimmed: u64,
    segments_removed: u64,
    rotations: u64,
    compressions: u64,
    replayed: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.seeds += o.seeds;
        self.acked += o.acked;
        self.power_cuts += o.power_cuts;
        self.kills += o.kills;
        self.crash_points_hit += o.crash_points_hit;
        self.before_settle += o.before_settle;
        self.fault_phases += o.fault_phases;
        self.failed_commits += o.failed_commits;
        self.torn_wal_tails += o.torn_wal_tails;
        self.session_bytes_trimmed += o.session_bytes_trimmed;
        self.segments_removed += o.segments_removed;
        self.rotations += o.rotations;
        self.compressions += o.compressions;
        self.replayed += o.replayed;
    }
}

// ---------------------------------------------------------------------------
// The live service, as the real pipeline runs it, minus threads.

/// One session writer (`writer::run_writer`).
struct Writer {
    session: String,
    queue: VecDeque<Vec<(u64, LogFrame)>>,
    file: Option<SessionFile>,
    dirty: bool,
    failed: bool,
    /// In its idle stop, before closing its queue: batches still queue up
    /// but are not taken until it drains them.
    closing: bool,
}

impl Writer {
    /// A new writer; it starts failed if an earlier writer of the session
    /// failed (`writer_for`'s `start_failed`).
    fn new(session: &str, failed_sessions: &BTreeSet<String>) -> Writer {
        Writer {
            session: session.to_owned(),
            queue: VecDeque::new(),
            file: None,
            dirty: false,
            failed: failed_sessions.contains(session),
            closing: false,
        }
    }
}

/// What writers hand to the dispatcher and to the compression pool.
#[derive(Default)]
struct Outbox {
    /// Reports not yet seen by the dispatcher, in order.
    reports: VecDeque<Report>,
    /// Rotated files for the compression pool.
    compress: VecDeque<CompressJob>,
}

/// What writers tell the dispatcher.
enum Report {
    Checkpointed { session: String, lsn: u64 },
    Stopped { session: String },
}

struct Live {
    wal: Wal,
    segments: Segments,
    sequencer: Sequencer,
    rx: mpsc::UnboundedReceiver<Durable>,
    budget: Arc<Semaphore>,
    tracker: CheckpointTracker,
    /// The running writer of each session (`writer_for`).
    writers: BTreeMap<String, Writer>,
    /// Writers that stopped taking frames (idle) and still write what was
    /// queued to them; the session's next writer waits for them.
    draining: Vec<Writer>,
    /// Sessions whose writer failed: later writers start failed (the
    /// dispatcher's `failed_sessions`, and a successor's `predecessor` check).
    failed_sessions: BTreeSet<String>,
    out: Outbox,
    /// A commit failed: nothing may be acked any more.
    poisoned: bool,
    /// The Sequencer's last seq per session, as the model predicts it.
    expect_last: BTreeMap<String, i64>,
}

impl Live {
    /// Whether the session's writer still waits for its predecessor (an
    /// idle writer draining its queue) to finish, as `run_writer` does.
    fn waits(&self, session: &str) -> bool {
        self.draining.iter().any(|d| d.session == session)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Where {
    Step,
    BeforeSettle,
    Point(&'static str),
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Every fdatasync after `n` more fails until the crash.
    Syncs { n: u64, drops: bool },
    /// fdatasyncs after `n` more fail for `steps` steps, then heal.
    SyncBurst { n: u64, drops: bool, steps: u64 },
    /// Writes fail for `steps` steps, then heal.
    WriteBurst { steps: u64 },
}

#[derive(Debug)]
struct Plan {
    steps: u64,
    power: bool,
    at: Where,
    crash_seed: u64,
    fault: Option<(u64, Fault)>,
}

macro_rules! note {
    ($w:expr, $($arg:tt)*) => {
        if let Some(log) = $w.log.as_mut() {
            log.push(format!("[e{} s{}] {}", $w.epoch, $w.step, format!($($arg)*)));
        }
    };
}

macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            return Err(format!($($arg)*));
        }
    };
}

fn log_dir() -> &'static Path {
    Path::new(LOG_DIR)
}

struct World {
    rng: SplitMix64,
    fs: SimFs,
    dfs: Arc<dyn Fs>,
    meta: Arc<SimMeta>,
    dmeta: Arc<dyn MetaStore>,
    opts: WalOptions,
    life: Lifecycle,
    file_bytes_max: u64,
    sessions: Vec<String>,
    model: Model,
    /// Lines already checked, by hash (files mostly stay the same): seq, content.
    verified: HashMap<u64, (i64, String)>,
    log: Option<Vec<String>>,
    epoch: u32,
    step: u64,
    counter: u64,
    stats: Stats,
}

impl World {
    fn new(seed: u64, verbose: bool) -> World {
        let mut rng = SplitMix64::new(seed);
        let fs = SimFs::new();
        // LOG_DIR exists (durably) before the service starts.
        fs.create_dir_all(log_dir()).expect("mkdir");
        fs.sync_dir(Path::new("/")).expect("sync /");
        let meta = Arc::new(SimMeta::new());
        let opts = WalOptions {
            segment_bytes_max: 4096 + rng.below(4097),
            record_bytes_max: 4000,
        };
        let life = Lifecycle {
            gzip_level: (rng.below(5) < 2).then_some(1),
            events: rng.below(2) == 0,
        };
        let file_bytes_max = 2048 + rng.below(8192);
        let mut sessions = ["s0", "s1", "s2", "A-b.c_3", "s4"].map(String::from).to_vec();
        sessions.truncate(1 + rng.below(5) as usize);
        World {
            rng,
            dfs: Arc::new(fs.clone()),
            fs,
            dmeta: meta.clone(),
            meta,
            opts,
            life,
            file_bytes_max,
            sessions,
            model: Model::default(),
            verified: HashMap::new(),
            log: verbose.then(Vec::new),
            epoch: 0,
            step: 0,
            counter: 0,
            stats: Stats {
                seeds: 1,
                ..Stats::default()
            },
        }
    }

    fn below(&mut self, n: u64) -> u64 {
        self.rng.below(n)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.rng.below(100) < percent
    }

    fn pick_session(&mut self) -> String {
        let i = self.below(self.sessions.len() as u64) as usize;
        self.sessions[i].clone()
    }

    fn make_frame(&mut self, session: &str, seq: i64) -> LogFrame {
        self.counter += 1;
        let mut content = format!("{session}#{}#{}:", self.epoch, self.counter);
        let len = match self.below(100) {
            0..=5 => 300 + self.below(900),
            6..=30 => 0,
            _ => self.below(60),
        };
        const ALPHABET: [char; 15] = [
            'a', 'b', 'c', 'x', 'y', 'z', ' ', '"', '\\', '\n', 'é', '0', '9', '{', '}',
        ];
        for _ in 0..len {
            content.push(ALPHABET[self.below(ALPHABET.len() as u64) as usize]);
        }
        let metadata = self.chance(20).then(|| {
            let mut md = prost_types::Struct::default();
            md.fields.insert(
                "n".into(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::NumberValue(self.counter as f64)),
                },
            );
            md.fields.insert(
                "tag".into(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue("t\"x".into())),
                },
            );
            md
        });
        LogFrame {
            version: self.below(2) as i32,
            time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000 + self.counter as i64,
                nanos: self.below(1_000_000_000) as i32,
            }),
            session_id: session.to_owned(),
            user_id: if self.chance(50) { "u1".into() } else { String::new() },
            role: "agent".into(),
            seq,
            content,
            metadata,
        }
    }

    // -- recovery ------------------------------------------------------------

    /// The recovery pass, exactly as `logd serve` runs it.
    fn recover(&mut self) -> Result<Wal, String> {
        let mut replayer = Replayer::new(self.dfs.clone(), log_dir(), self.dmeta.clone()).with_lifecycle(self.life);
        let (wal, report) = recovery::run(self.dfs.clone(), Path::new(WAL_DIR), self.opts, &mut replayer, |_| {})
            .map_err(|e| format!("recovery failed: {e} (integrity: {})", e.is_integrity()))?;
        if report.open.torn_tail.is_some() {
            self.stats.torn_wal_tails += 1;
        }
        let trimmed: u64 = replayer.per_session.values().map(|s| s.bytes_trimmed).sum();
        self.stats.session_bytes_trimmed += trimmed;
        self.stats.replayed += report.records_replayed;
        note!(
            self,
            "recovery: torn tail {:?}, read {} replayed {} skipped {}, segments removed {}, trimmed {trimmed} B, \
             next LSN {}, {:?}",
            report.open.torn_tail.as_ref().map(|t| (t.offset, t.bytes)),
            report.records_read,
            report.records_replayed,
            report.records_skipped,
            report.segments_removed,
            wal.next_lsn(),
            replayer.lifecycle
        );
        Ok(wal)
    }

    fn start(&mut self, wal: Wal, expect_last: BTreeMap<String, i64>) -> Live {
        let budget = Arc::new(Semaphore::new(BUDGET_PERMITS));
        let (tx, rx) = mpsc::unbounded_channel();
        let sequencer = Sequencer::new(self.dmeta.clone(), tx, budget.clone(), Arc::new(IngestStats::default()));
        Live {
            segments: wal.segments(),
            tracker: CheckpointTracker::new(wal.next_lsn()),
            wal,
            sequencer,
            rx,
            budget,
            writers: BTreeMap::new(),
            draining: Vec::new(),
            failed_sessions: BTreeSet::new(),
            out: Outbox::default(),
            poisoned: false,
            expect_last,
        }
    }

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
    fn recover_and_check(&mut self) -> Result<Live, String> {
        self.check_materialized_mark()
            .map_err(|e| format!("before recovery: {e}"))?;
        let wal = self.recover()?;
        let before = self.snapshot();
        drop(wal);
        note!(self, "second recovery pass");
        let wal = self.recover()?;
        let after = self.snapshot();
        if before != after {
            return Err(format!(
                "a second recovery pass changed the state: {}",
                diff(&before, &after)
            ));
        }
        let last = self
            .check_state(wal.next_lsn())
            .map_err(|e| format!("after recovery: {e}"))?;
        Ok(self.start(wal, last))
    }

    /// The `materialized_below_lsn` mark (what salvage trusts to call a
    /// damaged record not lost), on the state a crash left: every WAL record
    /// below it is a line in its session's files.
    fn check_materialized_mark(&mut self) -> Result<(), String> {
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
                let mut out = Vec::new();
                flate2::read::GzDecoder::new(data.as_slice())
                    .read_to_end(&mut out)
                    .map_err(|e| format!("{name}: not a whole gzip file: {e}"))?;
                data = out;
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
        note!(self, "materialized mark {mark} holds");
        Ok(())
    }

    /// Checks the invariants on the recovered state; returns each session's
    /// last seq (what the next Sequencer must continue from).
    fn check_state(&mut self, next_lsn: u64) -> Result<BTreeMap<String, i64>, String> {
        ensure!(
            self.meta.unflushed() == 0,
            "recovery left {} store batches unflushed",
            self.meta.unflushed()
        );
        ensure!(
            self.dmeta.rotations().unwrap().is_empty(),
            "unfinished rotations after recovery"
        );
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
                    let mut out = Vec::new();
                    flate2::read::GzDecoder::new(data.as_slice())
                        .read_to_end(&mut out)
                        .map_err(|e| format!("{name}: not a whole gzip file: {e}"))?;
                    entry.gz = Some(out);
                } else {
                    entry.log = Some(data);
                }
            } else {
                return Err(format!("stray file {name} in LOG_DIR"));
            }
        }
        let checkpoints: BTreeMap<String, Checkpoint> = self.dmeta.checkpoints().unwrap().into_iter().collect();
        let jobs = self.dmeta.compress_jobs().unwrap();
        let outbox = self.dmeta.outbox(usize::MAX).unwrap();
        let mut ids = BTreeSet::new();
        for (_, e) in &outbox {
            // Nothing drains the outbox here: an id twice is an event
            // recorded twice (a step redone after a crash re-announced it).
            ensure!(ids.insert(e.event_id.clone()), "event {} recorded twice", e.event_id);
        }
        let events: BTreeSet<(bool, String, i64, i64)> = outbox
            .into_iter()
            .map(|(_, e)| (e.kind == EventKind::Rotated, e.path, e.first_seq, e.last_seq))
            .collect();
        for job in &jobs {
            ensure!(
                self.fs.exists(&log_dir().join(&job.rotation.to)),
                "compression job for {} whose source is gone",
                job.rotation.to
            );
        }
        let mut contents_seen = BTreeSet::new();
        let mut last_seqs = BTreeMap::new();
        for (session, sf) in &files {
            let mut parts: Vec<(String, &[u8])> = Vec::new();
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
                parts.push((stem.clone(), data));
            }
            if let Some(data) = &sf.logtmp {
                parts.push((format!("{session}{LOGTMP_SUFFIX}"), data));
            }
            let mut prev = 0i64;
            let mut present: BTreeMap<i64, String> = BTreeMap::new();
            for (name, data) in &parts {
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
            for (seq, content) in self.model.acked.get(session).into_iter().flatten() {
                ensure!(
                    present.get(seq) == Some(content),
                    "{session}: acked frame seq {seq} ({content:?}) is lost (files hold seqs {:?})",
                    present.keys().collect::<Vec<_>>()
                );
            }
            match checkpoints.get(session) {
                Some(c) => {
                    let len = sf.logtmp.as_ref().map_or(0, |d| d.len() as u64);
                    ensure!(
                        c.last_seq == prev,
                        "{session}: checkpoint last_seq {} but the files end at seq {prev}",
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
                }
                None => ensure!(parts.is_empty(), "{session}: files but no checkpoint"),
            }
            last_seqs.insert(session.clone(), prev);
        }
        for session in checkpoints.keys() {
            ensure!(files.contains_key(session), "checkpoint of unknown session {session}");
        }
        Ok(last_seqs)
    }

    /// Checks one line's shape and that it is exactly the rendering of the
    /// frame sent with its content; returns its seq and content.
    fn check_line(&mut self, session: &str, line: &[u8]) -> Result<(i64, String), String> {
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

#[derive(Default)]
struct SessionFiles {
    logtmp: Option<Vec<u8>>,
    /// (first seq, `.log` name) → the rotated file and/or its `.gz`.
    rotated: BTreeMap<(i64, String), Rotated>,
}

#[derive(Default)]
struct Rotated {
    last_seq: i64,
    log: Option<Vec<u8>>,
    gz: Option<Vec<u8>>,
}

type Snapshot = (Vec<(PathBuf, Vec<u8>)>, Vec<(String, Checkpoint)>);

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

// ---------------------------------------------------------------------------
// The live phase.

impl World {
    /// Runs one phase until the planned crash happened (or is due).
    fn run_phase(&mut self, live: &mut Live, plan: &Plan) -> Result<(), String> {
        let mut armed = false;
        let mut settle_crash = false;
        loop {
            if self.step >= plan.steps {
                match plan.at {
                    Where::Step => return Ok(()),
                    Where::BeforeSettle => settle_crash = true,
                    Where::Point(point) if !armed => {
                        armed = true;
                        note!(self, "armed crash point {point}");
                        arm(Some(point));
                    }
                    Where::Point(_) => {}
                }
                if self.step >= plan.steps + 80 {
                    note!(self, "crash point not reached: crashing between steps");
                    arm(None);
                    return Ok(());
                }
            }
            if let Some((at, fault)) = plan.fault {
                if self.step == at {
                    note!(self, "FAULT {fault:?}");
                    match fault {
                        Fault::Syncs { n, drops } | Fault::SyncBurst { n, drops, .. } => {
                            self.fs.set_failed_sync_drops_pending(drops);
                            self.fs.fail_syncs_after(n);
                        }
                        Fault::WriteBurst { .. } => self.fs.set_write_error(true),
                    }
                }
                if let Fault::SyncBurst { steps, .. } | Fault::WriteBurst { steps } = fault
                    && self.step == at + steps
                {
                    note!(self, "faults healed");
                    self.fs.clear_faults();
                }
            }
            let choice = self.below(100);
            let outcome = catch_unwind(AssertUnwindSafe(|| self.act(live, choice, settle_crash)));
            self.step += 1;
            match outcome {
                Ok(Ok(false)) => {}
                Ok(Ok(true)) => return Ok(()),
                Ok(Err(e)) => return Err(e),
                Err(panic) => match panic.downcast::<CrashPanic>() {
                    Ok(point) => {
                        note!(self, "crash point {} hit", point.0);
                        self.stats.crash_points_hit += 1;
                        return Ok(());
                    }
                    Err(other) => resume_unwind(other),
                },
            }
        }
    }

    /// One step; true if the process died in it.
    fn act(&mut self, live: &mut Live, choice: u64, settle_crash: bool) -> Result<bool, String> {
        match choice {
            0..=25 => return self.ingest(live, settle_crash),
            26..=39 => self.route(live),
            40..=55 => {
                let s = self.pick_session();
                self.recv(live, &s)?;
            }
            56..=66 => {
                // A writer's flush tick.
                let s = self.pick_session();
                if !live.waits(&s)
                    && let Some(w) = live.writers.get_mut(&s)
                    && w.dirty
                    && !w.closing
                {
                    self.sync(w, &mut live.out)?;
                }
            }
            67..=74 => self.report(live),
            75..=81 => self.remove(live)?,
            82..=85 => {
                let s = self.pick_session();
                self.stop_idle(live, &s)?;
            }
            86..=89 => self.drain(live)?,
            90..=92 => {
                let s = self.pick_session();
                self.manual_rotate(live, &s)?;
            }
            93..=97 => self.compress(live),
            _ => {}
        }
        Ok(false)
    }

    fn ingest(&mut self, live: &mut Live, crash_before_settle: bool) -> Result<bool, String> {
        let mut staged = Vec::new();
        let mut waiting = Vec::new();
        for _ in 0..1 + self.below(2) {
            let mut frames = Vec::new();
            let mut predicted = Vec::new();
            for _ in 0..1 + self.below(3) {
                let session = self.pick_session();
                let last = live.expect_last.get(&session).copied().unwrap_or(0);
                let seq = match self.below(10) {
                    0..=5 => 0,
                    6..=8 => last + 1 + self.below(3) as i64,
                    _ if last > 0 => 1 + self.below(last as u64) as i64,
                    _ => 0,
                };
                let outcome = match seq {
                    0 => Outcome::Accepted(last + 1),
                    s if s <= last => Outcome::Duplicate,
                    s => Outcome::Accepted(s),
                };
                if let Outcome::Accepted(s) = outcome {
                    live.expect_last.insert(session.clone(), s);
                }
                let frame = self.make_frame(&session, seq);
                self.model.sent.insert(
                    frame.content.clone(),
                    Sent {
                        frame: frame.clone(),
                        fate: Fate::Unknown,
                    },
                );
                frames.push(frame);
                predicted.push(outcome);
            }
            let units = frames.len() as u32;
            live.budget.try_acquire_many(units).expect("admission budget").forget();
            let contents: Vec<String> = frames.iter().map(|f| f.content.clone()).collect();
            if self.log.is_some() {
                let desc: Vec<String> = frames
                    .iter()
                    .zip(&predicted)
                    .map(|(f, o)| format!("{}#{}→{o:?}", f.session_id, f.seq))
                    .collect();
                note!(self, "stage [{}]", desc.join(" "));
            }
            let (tx, rx) = oneshot::channel();
            staged.push(live.sequencer.stage(
                IngestRequest {
                    frames,
                    budget_units: units,
                    reply: tx,
                    query: None,
                },
                &mut live.wal,
            ));
            waiting.push((rx, contents, predicted));
        }
        let result = live.wal.commit();
        note!(
            self,
            "commit: {}",
            match &result {
                Ok(c) => format!("ok, durable below LSN {}", c.durable_lsn_end),
                Err(e) => format!("FAILED: {e}"),
            }
        );
        if crash_before_settle && result.is_ok() {
            note!(self, "the process dies before settling: nothing acked");
            self.stats.before_settle += 1;
            return Ok(true);
        }
        live.sequencer.settle(staged, result.as_ref());
        for (mut rx, contents, predicted) in waiting {
            match rx.try_recv() {
                Ok(Ok(outcomes)) => {
                    ensure!(result.is_ok(), "a request was acked though its batch's commit failed");
                    ensure!(
                        !live.poisoned,
                        "a request was acked after an earlier commit failed (WAL not poisoned)"
                    );
                    ensure!(outcomes == predicted, "outcomes {outcomes:?}, predicted {predicted:?}");
                    for (content, outcome) in contents.iter().zip(&outcomes) {
                        let sent = self.model.sent.get_mut(content).expect("sent");
                        match *outcome {
                            Outcome::Accepted(seq) => {
                                sent.fate = Fate::Acked(seq);
                                let session = sent.frame.session_id.clone();
                                let prior = self
                                    .model
                                    .acked
                                    .entry(session)
                                    .or_default()
                                    .insert(seq, content.clone());
                                ensure!(prior.is_none(), "seq {seq} of {} acked twice", sent.frame.session_id);
                                self.stats.acked += 1;
                            }
                            Outcome::Duplicate => sent.fate = Fate::Duplicate,
                            other => return Err(format!("unexpected outcome {other:?} for a frame")),
                        }
                    }
                }
                Ok(Err(why)) => ensure!(result.is_err(), "a request failed ({why}) though its batch committed"),
                Err(e) => return Err(format!("no reply after settle: {e}")),
            }
        }
        if result.is_err() {
            if !live.poisoned {
                self.stats.failed_commits += 1;
            }
            live.poisoned = true;
        }
        Ok(false)
    }

    /// The dispatcher routes one durable batch (`writer::route`).
    fn route(&mut self, live: &mut Live) {
        let Ok(durable) = live.rx.try_recv() else { return };
        let last_lsn = durable.frames.last().map(|(lsn, _)| *lsn).expect("never empty");
        let mut by_session: BTreeMap<String, Vec<(u64, LogFrame)>> = BTreeMap::new();
        for (lsn, frame) in durable.frames {
            by_session
                .entry(frame.session_id.clone())
                .or_default()
                .push((lsn, frame));
        }
        for (session, batch) in by_session {
            let (first, last) = (batch[0].0, batch[batch.len() - 1].0);
            note!(self, "route {session}: LSN {first}..={last}");
            live.tracker.routed(&session, first, last);
            live.writers
                .entry(session.clone())
                .or_insert_with(|| Writer::new(&session, &live.failed_sessions))
                .queue
                .push_back(batch);
        }
        live.tracker.routed_through(last_lsn);
        live.budget.add_permits(durable.budget_units as usize);
    }

    /// The session's writer takes its next batch.
    fn recv(&mut self, live: &mut Live, session: &str) -> Result<(), String> {
        if live.waits(session) {
            return Ok(());
        }
        let Some(w) = live.writers.get_mut(session).filter(|w| !w.closing) else {
            return Ok(());
        };
        let Some(batch) = w.queue.pop_front() else {
            return Ok(());
        };
        self.frames(w, batch, &mut live.out)
    }

    /// `Writer::ensure_open`: opens the session's file from its checkpoint.
    fn ensure_open(&mut self, w: &mut Writer) -> Result<bool, String> {
        if w.file.is_some() {
            return Ok(true);
        }
        let session = w.session.as_str();
        let ckpt = self.dmeta.checkpoint(session).map_err(|e| e.to_string())?;
        match SessionFile::open(self.dfs.clone(), log_dir(), session, ckpt) {
            Ok((sf, repair)) => {
                note!(
                    self,
                    "{session}: open with {ckpt:?}: {repair:?}, last seq {}",
                    sf.last_seq()
                );
                w.file = Some(sf);
                Ok(true)
            }
            Err(e) => {
                note!(self, "{session}: open FAILED: {e}; writer stops taking frames");
                w.failed = true;
                Ok(false)
            }
        }
    }

    /// `Writer::frames`.
    fn frames(&mut self, w: &mut Writer, batch: Vec<(u64, LogFrame)>, out: &mut Outbox) -> Result<(), String> {
        let session = w.session.clone();
        if w.failed {
            note!(self, "{session}: writer failed, batch dropped (kept in the WAL)");
            return Ok(());
        }
        if !self.ensure_open(w)? {
            return Ok(());
        }
        let sf = w.file.as_mut().expect("open");
        for (lsn, frame) in &batch {
            ensure!(
                sf.append(*lsn, frame),
                "{session}: live frame seq {} (LSN {lsn}) skipped: the file already holds seq {}",
                frame.seq,
                sf.last_seq()
            );
        }
        note!(self, "{session}: append {} frames", batch.len());
        w.dirty = true;
        if sf.pending_bytes() >= PENDING_WRITE_BYTES {
            self.write_pending(w);
        }
        if w.file.as_ref().is_some_and(|sf| sf.size() >= self.file_bytes_max) {
            self.rotate(w, RotateReason::Size, out)?;
        }
        Ok(())
    }

    /// `Writer::write_pending`.
    fn write_pending(&mut self, w: &mut Writer) {
        let Some(sf) = w.file.as_mut() else { return };
        if w.failed || sf.pending_bytes() == 0 {
            return;
        }
        let written = sf.write_pending();
        note!(self, "{}: write {written:?}", w.session);
        if written.is_err() {
            w.failed = true;
        }
    }

    /// fdatasync, checkpoint, report (`Writer::sync`); false if it failed.
    fn sync(&mut self, w: &mut Writer, out: &mut Outbox) -> Result<bool, String> {
        self.write_pending(w);
        if w.failed {
            return Ok(false);
        }
        let Some(sf) = w.file.as_mut() else { return Ok(true) };
        let session = w.session.as_str();
        w.dirty = false;
        match sf.sync() {
            Ok(ckpt) => {
                note!(self, "{session}: sync, checkpoint {ckpt:?}");
                self.dmeta.put_checkpoint(session, &ckpt).map_err(|e| e.to_string())?;
                out.reports.push_back(Report::Checkpointed {
                    session: session.to_owned(),
                    lsn: ckpt.last_lsn,
                });
                Ok(true)
            }
            Err(e) => {
                note!(self, "{session}: sync FAILED: {e}; writer stops taking frames");
                w.failed = true;
                Ok(false)
            }
        }
    }

    /// `Writer::rotate`.
    fn rotate(&mut self, w: &mut Writer, reason: RotateReason, out: &mut Outbox) -> Result<(), String> {
        if w.failed || !self.ensure_open(w)? || !self.sync(w, out)? {
            return Ok(());
        }
        let session = w.session.as_str();
        let sf = w.file.take().expect("open");
        let ckpt = sf.checkpoint();
        drop(sf);
        match rotate_synced(
            self.dfs.as_ref(),
            log_dir(),
            self.dmeta.as_ref(),
            self.life,
            session,
            ckpt,
            reason,
        ) {
            Ok(Some(rot)) => {
                note!(self, "{session}: rotated ({reason:?}) to {}", rot.to);
                self.stats.rotations += 1;
                if self.life.gzip_level.is_some() {
                    out.compress.push_back(CompressJob::new(rot));
                }
            }
            Ok(None) => note!(self, "{session}: nothing to rotate"),
            Err(e) => {
                note!(self, "{session}: rotation FAILED: {e}; writer stops taking frames");
                w.failed = true;
            }
        }
        Ok(())
    }

    /// `rotate_on_request`: the session's writer (started if none runs)
    /// rotates its file.
    fn manual_rotate(&mut self, live: &mut Live, session: &str) -> Result<(), String> {
        if live.waits(session) {
            return Ok(()); // simplified: the request would wait in its queue
        }
        let w = live
            .writers
            .entry(session.to_owned())
            .or_insert_with(|| Writer::new(session, &live.failed_sessions));
        if w.closing {
            return Ok(()); // simplified: the request would be taken while draining
        }
        self.rotate(w, RotateReason::Manual, &mut live.out)
    }

    /// `run_writer`'s idle stop, step 1: with nothing queued, rotate, and
    /// (unless failed: a failed writer keeps its session until restart) get
    /// ready to close; batches routed meanwhile still queue up.
    fn stop_idle(&mut self, live: &mut Live, session: &str) -> Result<(), String> {
        if live.waits(session) {
            return Ok(());
        }
        let Some(w) = live.writers.get_mut(session) else {
            return Ok(());
        };
        if w.closing || !w.queue.is_empty() {
            return Ok(());
        }
        if !w.failed && w.file.as_ref().is_some_and(|f| f.size() > 0) {
            self.rotate(w, RotateReason::Idle, &mut live.out)?;
        }
        if w.failed {
            return Ok(());
        }
        w.closing = true;
        note!(self, "{session}: writer idle: stopping");
        if !knobs().idle_race {
            let w = live.writers.remove(session).expect("writer");
            live.draining.push(w);
            while !live.draining.is_empty() {
                self.drain(live)?;
            }
        }
        Ok(())
    }

    /// `run_writer`'s idle stop, step 2: a closing writer closes its queue
    /// (the dispatcher starts a new writer for the next batch), or a closed
    /// one writes one batch queued to it, or rotates, syncs and reports that
    /// it stopped.
    fn drain(&mut self, live: &mut Live) -> Result<(), String> {
        let closing: Vec<String> = live
            .writers
            .values()
            .filter(|w| w.closing)
            .map(|w| w.session.clone())
            .collect();
        let n = closing.len() + live.draining.len();
        if n == 0 {
            return Ok(());
        }
        let i = self.below(n as u64) as usize;
        if i < closing.len() {
            let w = live.writers.remove(&closing[i]).expect("writer");
            note!(
                self,
                "{}: writer closes its queue ({} batches in it)",
                w.session,
                w.queue.len()
            );
            live.draining.push(w);
            return Ok(());
        }
        let i = i - closing.len();
        let w = &mut live.draining[i];
        if let Some(batch) = w.queue.pop_front() {
            return self.frames(w, batch, &mut live.out);
        }
        if !w.failed && w.file.as_ref().is_some_and(|f| f.size() > 0) {
            self.rotate(w, RotateReason::Idle, &mut live.out)?;
        }
        if w.dirty {
            self.sync(w, &mut live.out)?;
        }
        let w = live.draining.remove(i);
        note!(self, "{}: writer stopped (failed: {})", w.session, w.failed);
        if w.failed {
            // run_writer: the successor, waiting for this writer, starts
            // failed; so does every later one (Report::Stopped { failed }).
            live.failed_sessions.insert(w.session.clone());
            if let Some(next) = live.writers.get_mut(&w.session) {
                next.failed = true;
            }
        }
        live.out.reports.push_back(Report::Stopped { session: w.session });
        Ok(())
    }

    /// The dispatcher takes one report.
    fn report(&mut self, live: &mut Live) {
        match live.out.reports.pop_front() {
            Some(Report::Checkpointed { session, lsn }) => {
                live.tracker.checkpointed(&session, lsn);
                note!(
                    self,
                    "report {session} through LSN {lsn}; safe LSN {}",
                    live.tracker.safe_lsn()
                );
            }
            Some(Report::Stopped { session }) => {
                if !live.writers.contains_key(&session) {
                    live.tracker.forget(&session);
                }
                note!(self, "report {session} stopped; safe LSN {}", live.tracker.safe_lsn());
            }
            None => {}
        }
    }

    /// `spawn_removal`: flush the store, then delete segments below the
    /// safe LSN.
    fn remove(&mut self, live: &mut Live) -> Result<(), String> {
        let safe = live.tracker.safe_lsn();
        self.dmeta
            .apply(vec![store::materialized_below_op(safe)])
            .map_err(|e| e.to_string())?;
        self.dmeta.flush().map_err(|e| e.to_string())?;
        let removed = live.segments.remove_before(safe);
        note!(self, "flush store, remove_before({safe}): {removed:?}");
        if let Ok(n) = removed {
            self.stats.segments_removed += n as u64;
        }
        Ok(())
    }

    /// The compression pool runs one job (from the queue, else the store's).
    fn compress(&mut self, live: &mut Live) {
        if self.life.gzip_level.is_none() {
            return;
        }
        let job = match live.out.compress.pop_front() {
            Some(job) => job,
            // Names hold a wall-clock stamp: pick by seq, not by name, so
            // a seed replays the same way.
            None => match self
                .dmeta
                .compress_jobs()
                .unwrap_or_default()
                .into_iter()
                .min_by_key(|j| (j.rotation.session.clone(), j.rotation.stats.first_seq))
            {
                Some(job) => job,
                None => return,
            },
        };
        let done = run_compression(
            self.dfs.as_ref(),
            log_dir(),
            self.dmeta.as_ref(),
            self.life,
            &job.rotation.to,
        );
        note!(self, "compress {}: {done:?}", job.rotation.to);
        if done.is_ok() {
            self.stats.compressions += 1;
        }
    }

    fn plan(&mut self) -> Plan {
        let crash_seed = self.rng.next_u64();
        let steps = self.step
            + if self.chance(20) {
                self.below(6)
            } else {
                15 + self.below(110)
            };
        let fault = match self.below(100) {
            _ if !knobs().faults => None,
            0..=9 => Some(Fault::Syncs {
                n: self.below(6),
                drops: self.chance(75),
            }),
            10..=17 => Some(Fault::SyncBurst {
                n: self.below(3),
                drops: self.chance(50),
                steps: 1 + self.below(4),
            }),
            18..=22 => Some(Fault::WriteBurst {
                steps: 1 + self.below(4),
            }),
            _ => None,
        };
        let fault = fault.map(|f| (self.step + self.below(steps - self.step + 1), f));
        // A kill after a failed fdatasync that dropped pages restarts on a
        // page cache holding bytes the disk never got: recovery must decide
        // from the disk (it drops the cache of what it scans).
        let power = self.chance(70);
        let at = match self.below(100) {
            0..=34 => Where::Step,
            35..=49 => Where::BeforeSettle,
            _ if cfg!(feature = "failpoints") && fault.is_none() => {
                Where::Point(CRASH_POINTS[self.below(CRASH_POINTS.len() as u64) as usize])
            }
            _ => Where::Step,
        };
        Plan {
            steps: steps.max(fault.map_or(0, |(at, _)| at + 5)),
            power,
            at,
            crash_seed,
            fault,
        }
    }

    fn crash(&mut self, live: Live, plan: &Plan) {
        arm(None);
        drop(live);
        if plan.power {
            let r = self.fs.crash(plan.crash_seed);
            note!(self, "POWER CUT (seed {}): {r:?}", plan.crash_seed);
            self.stats.power_cuts += 1;
        } else {
            note!(self, "KILL (the page cache survives)");
            self.stats.kills += 1;
        }
        self.fs.clear_faults();
        let unflushed = self.meta.unflushed();
        let keep = self.below(unflushed as u64 + 1) as usize;
        self.meta.crash_keeping(keep);
        note!(self, "the store keeps {keep} of {unflushed} unflushed batches");
    }

    fn run(&mut self) -> Result<(), String> {
        note!(
            self,
            "WAL {:?}, {:?}, rotate at {} B, sessions {:?}",
            self.opts,
            self.life,
            self.file_bytes_max,
            self.sessions
        );
        let wal = self.recover()?;
        let mut live = self.start(wal, BTreeMap::new());
        for epoch in 0..2 + u32::from(self.chance(25)) {
            self.epoch = epoch;
            let plan = self.plan();
            note!(self, "phase plan: {plan:?}");
            if plan.fault.is_some() {
                self.stats.fault_phases += 1;
            }
            self.run_phase(&mut live, &plan)?;
            self.crash(live, &plan);
            live = self.recover_and_check()?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// The driver.

fn run_seed(seed: u64, verbose: bool) -> (Result<(), String>, Stats, Vec<String>) {
    arm(None);
    let mut world = World::new(seed, verbose);
    let result = catch_unwind(AssertUnwindSafe(|| world.run())).unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default();
        Err(format!("panicked: {msg}"))
    });
    arm(None);
    (result, world.stats, world.log.take().unwrap_or_default())
}

/// Triage switches, both on unless set to 0: `LOGD_SIM_FAULTS` (I/O error
/// phases) and `LOGD_SIM_IDLE_RACE` (an idle writer drains what was queued
/// to it, interleaved with other steps; off: it finishes at once). Seeds
/// consume the PRNG the same way either way.
struct Knobs {
    faults: bool,
    idle_race: bool,
}

fn knobs() -> &'static Knobs {
    static KNOBS: std::sync::OnceLock<Knobs> = std::sync::OnceLock::new();
    KNOBS.get_or_init(|| Knobs {
        faults: env_u64("LOGD_SIM_FAULTS") != Some(0),
        idle_race: env_u64("LOGD_SIM_IDLE_RACE") != Some(0),
    })
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a number")))
}

#[test]
fn power_loss_simulation() {
    install_crash_points();
    if let Some(seed) = env_u64("LOGD_SIM_SEED") {
        let (result, stats, log) = run_seed(seed, true);
        for line in &log {
            eprintln!("{line}");
        }
        eprintln!("{stats:?}");
        if let Err(e) = result {
            panic!("seed {seed} failed: {e}");
        }
        return;
    }
    let seeds = env_u64("LOGD_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS);
    let first = env_u64("LOGD_SIM_SEED_START").unwrap_or(0);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 4);
    let next = AtomicU64::new(first);
    let total = Mutex::new(Stats::default());
    let failures = Mutex::new(Vec::new());
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let mut mine = Stats::default();
                loop {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= first + seeds || failures.lock().unwrap().len() >= 10 {
                        break;
                    }
                    let (result, stats, _) = run_seed(seed, false);
                    mine.add(&stats);
                    if let Err(e) = result {
                        failures.lock().unwrap().push((seed, e));
                    }
                }
                total.lock().unwrap().add(&mine);
            });
        }
    });
    let elapsed = started.elapsed();
    let stats = *total.lock().unwrap();
    eprintln!(
        "powerloss: {} seeds in {:.1?} ({:.0} seeds/min, {threads} threads): {stats:?}",
        stats.seeds,
        elapsed,
        stats.seeds as f64 * 60.0 / elapsed.as_secs_f64()
    );
    let mut failures = failures.into_inner().unwrap();
    if failures.is_empty() {
        if seeds >= 500 {
            assert!(
                stats.acked > stats.seeds * 20,
                "the workload acked too little: {stats:?}"
            );
            assert!(
                stats.power_cuts > 0 && stats.kills > 0 && (stats.failed_commits > 0 || !knobs().faults),
                "{stats:?}"
            );
            assert!(stats.torn_wal_tails > 0 && stats.segments_removed > 0, "{stats:?}");
            assert!(stats.rotations > 0 && stats.compressions > 0, "{stats:?}");
            if cfg!(feature = "failpoints") {
                assert!(stats.crash_points_hit > 0, "crash points never hit: {stats:?}");
            }
        }
        return;
    }
    failures.sort();
    let (seed, _) = failures[0];
    let (again, _, log) = run_seed(seed, true);
    let mut out = String::new();
    for (s, e) in &failures {
        out.push_str(&format!("seed {s}: {e}\n"));
    }
    out.push_str(&format!("\nstep log of seed {seed} (replayed: {again:?}):\n"));
    for line in &log {
        out.push_str(line);
        out.push('\n');
    }
    out.push_str(&format!(
        "\nreplay: LOGD_SIM_SEED={seed} cargo test --features failpoints --test powerloss -- --nocapture\n"
    ));
    panic!("{} failing seed(s)\n{out}", failures.len());
}
