//! The simulated machine and the live service on it: the model of what was
//! sent and acked, the recovery pass, and the pipeline's steps, each one a
//! call into the real code (see the crate docs).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::hash::BuildHasherDefault;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use logd::pb::LogFrame;
use logd::pipeline::CheckpointBatch;
use logd::pipeline::DispatchStats;
use logd::pipeline::OpenFiles;
use logd::pipeline::writer::compress::sweep_order;
use logd::pipeline::writer::dispatch::{self, CheckpointTracker};
use logd::pipeline::writer::{Output, RotationLimits, SessionWriter, Settings, Step, WriterMsg};
use logd::pipeline::{Durable, IngestRequest, IngestStats, Outcome, Sequencer};
use recovery::Replayer;
use store::RotateReason;
use store::logtmp_path;
use store::{CompressJob, MetaStore, SimMeta};
use store::{Lifecycle, run_compression};
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};
use wal::fs::Fs;
use wal::sim::{SimFs, SplitMix64};
use wal::{Segments, Stage, Wal, WalOptions};

pub const LOG_DIR: &str = "/logs";
pub const WAL_DIR: &str = "/state/wal";
const BUDGET_PERMITS: usize = 1 << 24;

pub fn log_dir() -> &'static Path {
    Path::new(LOG_DIR)
}

/// A session file line: exactly the documented fields, each once.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineJson {
    pub seq: i64,
    pub time: String,
    pub session_id: String,
    #[allow(dead_code)]
    pub user_id: String,
    #[allow(dead_code)]
    pub role: String,
    pub version: i64,
    pub content: String,
    #[allow(dead_code)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

// ---------------------------------------------------------------------------
// The model: what was sent and what the service answered.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Acked with this seq: must be in the files exactly once.
    Acked(i64),
    /// Acked as a duplicate: must never be written.
    Duplicate,
    /// Failed or never answered: may be present (once) or absent.
    Unknown,
}

pub struct Sent {
    /// As sent (`seq` is the client's, 0 for server-assigned).
    pub frame: LogFrame,
    pub fate: Fate,
}

#[derive(Default)]
pub struct Model {
    /// Every frame sent, by its (unique) content.
    pub sent: BTreeMap<String, Sent>,
    /// Acked frames: session → seq → content.
    pub acked: BTreeMap<String, BTreeMap<i64, String>>,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub seeds: u64,
    pub acked: u64,
    pub power_cuts: u64,
    pub kills: u64,
    pub crash_points_hit: u64,
    pub before_settle: u64,
    pub fault_phases: u64,
    pub failed_commits: u64,
    pub torn_wal_tails: u64,
    pub session_bytes_trimmed: u64,
    pub segments_removed: u64,
    pub rotations: u64,
    pub compressions: u64,
    pub replayed: u64,
    pub max_unsynced_batches: u64,
    /// Sync steps that made several written batches durable at once.
    pub coalesced_syncs: u64,
    pub successions: u64,
    pub slot_closes: u64,
    pub checkpoint_batches: u64,
    pub fail_stops: u64,
    pub retries: u64,
    /// Fault phases whose fault was injected, by kind.
    pub fault_syncs: u64,
    pub fault_sync_bursts: u64,
    pub fault_write_bursts: u64,
    pub fault_writebacks: u64,
    /// Background writeback errors injected on a WAL segment / a `.logtmp`.
    pub writeback_wal: u64,
    pub writeback_logtmp: u64,
    /// A roll's fdatasync failed (the commit thread saw the error before
    /// the sync thread's batch).
    pub roll_sync_failures: u64,
    /// The recovery pass of a new process was the first to see a writeback
    /// error (its own open file description), so `logd` exited and restarted.
    pub recovery_saw_writeback_error: u64,
    /// Kills in a phase where an fdatasync had failed.
    pub kills_after_failed_sync: u64,
    /// Power cuts in the phase after a kill that followed a failed
    /// fdatasync or writeback (after a restart and more work).
    pub power_cuts_after_failed_kill: u64,
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
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
        self.max_unsynced_batches = self.max_unsynced_batches.max(o.max_unsynced_batches);
        self.coalesced_syncs += o.coalesced_syncs;
        self.successions += o.successions;
        self.slot_closes += o.slot_closes;
        self.checkpoint_batches += o.checkpoint_batches;
        self.fail_stops += o.fail_stops;
        self.retries += o.retries;
        self.fault_syncs += o.fault_syncs;
        self.fault_sync_bursts += o.fault_sync_bursts;
        self.fault_write_bursts += o.fault_write_bursts;
        self.fault_writebacks += o.fault_writebacks;
        self.writeback_wal += o.writeback_wal;
        self.writeback_logtmp += o.writeback_logtmp;
        self.roll_sync_failures += o.roll_sync_failures;
        self.recovery_saw_writeback_error += o.recovery_saw_writeback_error;
        self.kills_after_failed_sync += o.kills_after_failed_sync;
        self.power_cuts_after_failed_kill += o.power_cuts_after_failed_kill;
    }
}

// ---------------------------------------------------------------------------
// The group commit's two steps, as the commit and sync threads run them.

type Staged = <Sequencer as Stage>::Staged;

/// What a request expects: its reply, its frames' contents, the outcomes
/// the model predicts.
pub struct Waiting {
    rx: oneshot::Receiver<logd::pipeline::IngestReply>,
    contents: Vec<String>,
    predicted: Vec<Outcome>,
}

/// A batch written to the WAL by the real commit step, not yet fdatasynced.
type Written = wal::Written<Staged>;

// ---------------------------------------------------------------------------
// The live service.

/// One writer task: the real state machine, its queue (the channel), and
/// what its shell holds.
pub struct SimWriter {
    id: u64,
    session: String,
    /// None while it waits for its predecessor.
    core: Option<SessionWriter>,
    queue: VecDeque<WriterMsg>,
    /// The queue is closed (idle stop): the dispatcher starts a successor.
    closed: bool,
    /// Waits for the checkpoint batcher to apply its put.
    putting: bool,
    stopped: bool,
    /// The writer this one waits for (it stopped taking frames and still
    /// writes what was queued to it).
    predecessor: Option<Box<SimWriter>>,
    replies: HashMap<u64, oneshot::Sender<Result<Option<String>, String>>>,
    next_token: u64,
    wake: Arc<Notify>,
}

type Writers = HashMap<String, SimWriter, BuildHasherDefault<std::hash::DefaultHasher>>;

/// What writers hand to the dispatcher, the batcher and the pool.
pub struct Shared {
    pub settings: Settings,
    pub budget: Arc<Semaphore>,
    pub open_files: Arc<OpenFiles>,
    pub reports: VecDeque<Report>,
    pub compress: VecDeque<CompressJob>,
    pub batch: CheckpointBatch<u64>,
    /// A writer asked logd to stop (exit 1).
    pub fatal: bool,
    pub t0: Instant,
}

pub enum Report {
    Checkpointed { session: String, lsn: u64 },
    Stopped { session: String, id: u64 },
}

pub struct Live {
    pub wal: Wal,
    segments: Segments,
    /// Shared by the two steps, as the commit and sync threads share it.
    sequencer: Mutex<Sequencer>,
    rx: mpsc::UnboundedReceiver<Durable>,
    /// Written batches waiting for their fdatasync, oldest first.
    unsynced: VecDeque<(Written, Vec<Waiting>)>,
    tracker: CheckpointTracker,
    writers: Writers,
    next_id: u64,
    pub shared: Shared,
    /// A commit failed: nothing may be acked any more.
    poisoned: bool,
    /// A write step failed (its write, or a roll's fdatasync while staging).
    write_failed: bool,
    /// The Sequencer's last seq per session, as the model predicts it.
    expect_last: BTreeMap<String, i64>,
}

pub struct World {
    pub rng: SplitMix64,
    pub fs: SimFs,
    pub dfs: Arc<dyn Fs>,
    pub meta: Arc<SimMeta>,
    pub dmeta: Arc<dyn MetaStore>,
    pub opts: WalOptions,
    pub life: Lifecycle,
    file_bytes_max: u64,
    outbox_events_max: usize,
    pub sessions: Vec<String>,
    pub model: Model,
    /// Lines already checked, by hash (files mostly stay the same): seq, content.
    pub verified: HashMap<u64, (i64, String)>,
    pub log: Option<Vec<String>>,
    pub epoch: u32,
    pub step: u64,
    counter: u64,
    pub stats: Stats,
    /// A background writeback error was injected since the last recovery:
    /// the next process may be the first to see it.
    writeback_error: bool,
}

impl World {
    pub fn new(seed: u64, verbose: bool) -> World {
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
        // Sometimes the outbox fills up: rotations then wait.
        let outbox_events_max = if rng.below(4) == 0 {
            1 + rng.below(6) as usize
        } else {
            usize::MAX
        };
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
            outbox_events_max,
            sessions,
            model: Model::default(),
            verified: HashMap::new(),
            log: verbose.then(Vec::new),
            epoch: 0,
            step: 0,
            counter: 0,
            writeback_error: false,
            stats: Stats {
                seeds: 1,
                ..Stats::default()
            },
        }
    }

    pub fn note(&mut self, line: String) {
        if let Some(log) = self.log.as_mut() {
            log.push(format!("[e{} s{}] {line}", self.epoch, self.step));
        }
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.rng.below(n)
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.rng.below(100) < percent
    }

    pub fn pick_session(&mut self) -> String {
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

    // -- recovery and start ----------------------------------------------------

    /// The recovery pass, exactly as `logd serve` runs it.
    pub fn recover(&mut self) -> Result<Wal, String> {
        match self.recover_once() {
            Err((e, false)) if std::mem::take(&mut self.writeback_error) => {
                // This process's description of a file was the first to see
                // the writeback error a killed process left: logd exits (an
                // I/O error, not corruption) and is restarted. A description
                // opened now is not told again (errseq), and recovery reads
                // from the disk, not from the pages the disk never got.
                self.note(format!(
                    "recovery saw the writeback error: {e}; logd exits and restarts"
                ));
                self.stats.recovery_saw_writeback_error += 1;
                self.fs.kill();
                let unflushed = self.meta.unflushed();
                let keep = self.below(unflushed as u64 + 1) as usize;
                self.meta.crash_keeping(keep);
                self.recover_once().map_err(|(e, _)| e)
            }
            other => {
                self.writeback_error = false;
                other.map_err(|(e, _)| e)
            }
        }
    }

    /// Background writeback of the active WAL segment (`wal`) or of a
    /// session's `.logtmp` fails: see [`crate::plan::Fault::Writeback`].
    pub fn fail_writeback(&mut self, live: &Live, wal: bool) {
        let mut logtmps: Vec<_> = self
            .fs
            .list_dir(log_dir())
            .unwrap_or_default()
            .into_iter()
            .filter(|p| p.to_str().is_some_and(|p| p.ends_with(store::LOGTMP_SUFFIX)))
            .collect();
        logtmps.sort();
        let path = if wal || logtmps.is_empty() {
            self.stats.writeback_wal += 1;
            live.segments.list().last().expect("an active segment").path.clone()
        } else {
            self.stats.writeback_logtmp += 1;
            let i = self.below(logtmps.len() as u64) as usize;
            logtmps.swap_remove(i)
        };
        self.note(format!("background writeback of {} fails", path.display()));
        self.fs.fail_writeback(&path);
        self.stats.fault_writebacks += 1;
        self.writeback_error = true;
    }

    /// One recovery pass, exactly as `logd serve` runs it; the error says
    /// whether it is an integrity error.
    fn recover_once(&mut self) -> Result<Wal, (String, bool)> {
        let mut replayer = Replayer::new(self.dfs.clone(), log_dir(), self.dmeta.clone()).with_lifecycle(self.life);
        let (wal, report) = recovery::run(self.dfs.clone(), Path::new(WAL_DIR), self.opts, &mut replayer, |_| {})
            .map_err(|e| {
                (
                    format!("recovery failed: {e} (integrity: {})", e.is_integrity()),
                    e.is_integrity(),
                )
            })?;
        if report.open.torn_tail.is_some() {
            self.stats.torn_wal_tails += 1;
        }
        let trimmed: u64 = replayer.per_session.values().map(|s| s.bytes_trimmed).sum();
        self.stats.session_bytes_trimmed += trimmed;
        self.stats.replayed += report.records_replayed;
        self.note(format!(
            "recovery: torn tail {:?}, read {} replayed {} skipped {}, segments removed {}, trimmed {trimmed} B, \
             next LSN {}, {:?}",
            report.open.torn_tail.as_ref().map(|t| (t.offset, t.bytes)),
            report.records_read,
            report.records_replayed,
            report.records_skipped,
            report.segments_removed,
            wal.next_lsn(),
            replayer.lifecycle
        ));
        Ok(wal)
    }

    /// The pipeline of a fresh process on the recovered WAL.
    pub fn start(&mut self, wal: Wal, expect_last: BTreeMap<String, i64>) -> Live {
        let budget = Arc::new(Semaphore::new(BUDGET_PERMITS));
        let (tx, rx) = mpsc::unbounded_channel();
        let sequencer = Sequencer::new(self.dmeta.clone(), tx, budget.clone(), Arc::new(IngestStats::default()));
        let open_files = OpenFiles::new(1 + self.below(4) as usize);
        let settings = Settings {
            fs: self.dfs.clone(),
            log_dir: log_dir().to_path_buf(),
            meta: self.dmeta.clone(),
            limits: RotationLimits {
                file_bytes_max: self.file_bytes_max,
                file_age_max: Duration::from_secs(3600),
                idle_timeout: Duration::from_secs(300),
            },
            life: self.life,
            outbox_events_max: self.outbox_events_max,
            stats: Arc::new(DispatchStats::default()),
        };
        Live {
            segments: wal.segments(),
            tracker: CheckpointTracker::new(wal.next_lsn()),
            wal,
            sequencer: Mutex::new(sequencer),
            rx,
            unsynced: VecDeque::new(),
            writers: Writers::default(),
            next_id: 0,
            shared: Shared {
                settings,
                budget,
                open_files,
                reports: VecDeque::new(),
                compress: VecDeque::new(),
                batch: CheckpointBatch::default(),
                fatal: false,
                t0: Instant::now(),
            },
            poisoned: false,
            write_failed: false,
            expect_last,
        }
    }

    // -- the commit threads ------------------------------------------------------

    /// The commit thread stages one or two requests and writes them.
    pub fn write_batch(&mut self, live: &mut Live) -> Result<(), String> {
        if live.unsynced.len() >= crate::knobs().unsynced_max {
            return Ok(()); // the commit thread waits for the sync thread
        }
        let mut requests = Vec::new();
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
            live.shared
                .budget
                .try_acquire_many(units)
                .expect("admission budget")
                .forget();
            let contents: Vec<String> = frames.iter().map(|f| f.content.clone()).collect();
            if self.log.is_some() {
                let desc: Vec<String> = frames
                    .iter()
                    .zip(&predicted)
                    .map(|(f, o)| format!("{}#{}→{o:?}", f.session_id, f.seq))
                    .collect();
                self.note(format!("stage [{}]", desc.join(" ")));
            }
            let (tx, rx) = oneshot::channel();
            requests.push(IngestRequest::new(frames, units, tx));
            waiting.push(Waiting {
                rx,
                contents,
                predicted,
            });
        }
        let written = wal::write_step(&mut live.wal, &live.sequencer, requests);
        let ok = written.unsynced.is_ok();
        // A roll while staging fdatasyncs the full segment on the commit
        // thread, through the same gate as the sync steps: when it is the
        // first to fail, the batches still waiting must fail too.
        if let Err(wal::Error::Poisoned(why)) = &written.unsynced
            && why.starts_with("wal: fdatasync")
            && !live.poisoned
            && !std::mem::replace(&mut live.write_failed, true)
        {
            self.stats.roll_sync_failures += 1;
        }
        live.unsynced.push_back((written, waiting));
        self.stats.max_unsynced_batches = self.stats.max_unsynced_batches.max(live.unsynced.len() as u64);
        self.note(format!(
            "write batch ({}): {} waiting for fdatasync, next LSN {}",
            if ok { "ok" } else { "FAILED" },
            live.unsynced.len(),
            live.wal.next_lsn()
        ));
        Ok(())
    }

    /// The sync thread takes the written batches it finds (the oldest
    /// few: a random prefix of those written so far), makes them durable
    /// with one fdatasync and settles them (`wal::sync_steps`); true if the
    /// process is to die between the two (nothing acked; one batch then).
    pub fn sync_batch(&mut self, live: &mut Live, die_before_settle: bool) -> Result<bool, String> {
        if live.unsynced.is_empty() {
            return Ok(false);
        }
        let take = if die_before_settle {
            1
        } else {
            1 + self.below(live.unsynced.len() as u64) as usize
        };
        if take > 1 {
            self.stats.coalesced_syncs += 1;
        }
        let taken: Vec<(Written, Vec<Waiting>)> = live.unsynced.drain(..take).collect();
        let (batches, waiting): (Vec<Written>, Vec<Vec<Waiting>>) = taken.into_iter().unzip();
        let waiting: Vec<Waiting> = waiting.into_iter().flatten().collect();
        if die_before_settle {
            let written = batches.into_iter().next().expect("one batch");
            let synced = written.unsynced.and_then(wal::Unsynced::sync);
            self.note(format!(
                "fdatasync {:?}; the process dies before settling",
                synced.is_ok()
            ));
            self.stats.before_settle += 1;
            return Ok(true);
        }
        let result = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wal::sync_steps(batches, &live.sequencer)
        })) {
            Ok(result) => result.map(|_| ()).map_err(|e| e.to_string()),
            Err(crash) => {
                // The process died inside the step (a crash point): an ack
                // it sent before dying reached its client, so the model
                // holds it to it. (No reply is the expected case.)
                for w in waiting {
                    let _ = self.check_reply(live, w, true);
                }
                std::panic::resume_unwind(crash)
            }
        };
        self.note(format!("fdatasync and settle: {result:?}"));
        for w in waiting {
            self.check_reply(live, w, result.is_ok())?;
        }
        if result.is_err() {
            if !live.poisoned {
                self.stats.failed_commits += 1;
            }
            live.poisoned = true;
        }
        Ok(false)
    }

    /// A settled request's answer against the model.
    fn check_reply(&mut self, live: &Live, mut w: Waiting, committed: bool) -> Result<(), String> {
        match w.rx.try_recv() {
            Ok(Ok(outcomes)) => {
                if !committed {
                    return Err("a request was acked though its batch's commit failed".into());
                }
                if live.poisoned {
                    return Err("a request was acked after an earlier commit failed (WAL not poisoned)".into());
                }
                if outcomes != w.predicted {
                    return Err(format!("outcomes {outcomes:?}, predicted {:?}", w.predicted));
                }
                for (content, outcome) in w.contents.iter().zip(&outcomes) {
                    let sent = self.model.sent.get_mut(content).expect("sent");
                    match *outcome {
                        Outcome::Accepted(seq) => {
                            sent.fate = Fate::Acked(seq);
                            let session = sent.frame.session_id.clone();
                            let prior = self
                                .model
                                .acked
                                .entry(session.clone())
                                .or_default()
                                .insert(seq, content.clone());
                            if prior.is_some() {
                                return Err(format!("seq {seq} of {session} acked twice"));
                            }
                            self.stats.acked += 1;
                        }
                        Outcome::Duplicate => sent.fate = Fate::Duplicate,
                        other => return Err(format!("unexpected outcome {other:?} for a frame")),
                    }
                }
                Ok(())
            }
            Ok(Err(why)) if committed => Err(format!("a request failed ({why}) though its batch committed")),
            Ok(Err(_)) => Ok(()),
            Err(e) => Err(format!("no reply after settle: {e}")),
        }
    }

    // -- the dispatcher ------------------------------------------------------------

    /// The dispatcher routes one durable batch.
    pub fn route(&mut self, live: &mut Live) {
        let Ok(durable) = live.rx.try_recv() else { return };
        let deliveries = match dispatch::route(&mut live.tracker, durable.frames, durable.budget_units) {
            Ok(d) => d,
            Err(units) => {
                live.shared.budget.add_permits(units as usize);
                return;
            }
        };
        for d in deliveries {
            self.note(format!(
                "route {}: LSN {}..={}, {} units",
                d.session,
                d.frames[0].0,
                d.frames[d.frames.len() - 1].0,
                d.units
            ));
            let w = self.writer_for(live, &d.session);
            w.queue.push_back(WriterMsg::Frames(d.frames, d.units));
        }
    }

    /// The dispatcher's `writer_for`: the session's writer, or a new one
    /// (waiting for its predecessor if that one still drains).
    fn writer_for<'a>(&mut self, live: &'a mut Live, session: &str) -> &'a mut SimWriter {
        let id = live.next_id;
        let settings = &live.shared.settings;
        let t0 = live.shared.t0;
        let mut started = false;
        let mut succeeded = false;
        let w = dispatch::writer_for(
            &mut live.writers,
            session,
            |w| !w.closed,
            |predecessor| {
                started = true;
                succeeded = predecessor.is_some();
                SimWriter {
                    id,
                    session: session.to_owned(),
                    core: predecessor
                        .is_none()
                        .then(|| SessionWriter::new(settings.clone(), session, t0, false)),
                    queue: VecDeque::new(),
                    closed: false,
                    putting: false,
                    stopped: false,
                    predecessor: predecessor.map(Box::new),
                    replies: HashMap::new(),
                    next_token: 0,
                    wake: Arc::new(Notify::new()),
                }
            },
        );
        if started {
            live.next_id += 1;
        }
        if succeeded {
            self.stats.successions += 1;
        }
        w
    }

    /// The dispatcher takes one report.
    pub fn report(&mut self, live: &mut Live) {
        match live.shared.reports.pop_front() {
            Some(Report::Checkpointed { session, lsn }) => {
                live.tracker.checkpointed(&session, lsn);
                self.note(format!(
                    "report {session} through LSN {lsn}; safe LSN {}",
                    live.tracker.safe_lsn()
                ));
            }
            Some(Report::Stopped { session, id }) => {
                let is_it = |w: &SimWriter| w.id == id && w.closed;
                let removed = dispatch::on_stopped(&mut live.writers, &mut live.tracker, &session, is_it);
                self.note(format!("report {session} stopped (removed: {})", removed.is_some()));
            }
            None => {}
        }
    }

    /// A rotation request for one session (or all).
    pub fn manual_rotate(&mut self, live: &mut Live, session: Option<String>) {
        let fs = self.dfs.clone();
        let targets = dispatch::rotate_targets(&live.writers, session, |s| fs.exists(&logtmp_path(log_dir(), s)));
        for s in targets {
            self.note(format!("{s}: rotation requested"));
            let (tx, _rx) = oneshot::channel();
            self.writer_for(live, &s).queue.push_back(WriterMsg::Rotate(tx));
        }
    }

    /// Segment removal: flush the store, delete segments below the safe LSN.
    pub fn remove(&mut self, live: &mut Live) {
        let safe = live.tracker.safe_lsn();
        let before = live.segments.list().len();
        let done = dispatch::remove_segments(self.dmeta.as_ref(), &live.segments, safe);
        let removed = before - live.segments.list().len();
        self.stats.segments_removed += removed as u64;
        self.note(format!("flush store, remove below {safe}: {done}, {removed} removed"));
    }

    /// The checkpoint batcher applies what was put meanwhile.
    pub fn apply_checkpoints(&mut self, live: &mut Live) {
        if live.shared.batch.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut live.shared.batch);
        let n = batch.len();
        let (result, ids) = batch.apply(self.dmeta.as_ref());
        self.stats.checkpoint_batches += 1;
        self.note(format!("checkpoint batch of {n}: {result:?}"));
        for id in ids {
            let Some(w) = live.writers.values_mut().find_map(|w| find(w, id)) else {
                panic!("writer {id} waits for its checkpoint and is gone");
            };
            w.putting = false;
            w.core.as_mut().expect("running").checkpoint_put(result.clone());
            self.deliver(&mut live.shared, w);
        }
    }

    /// The compression pool runs one job (from the queue, else a sweep's).
    pub fn compress(&mut self, live: &mut Live) {
        if self.life.gzip_level.is_none() {
            return;
        }
        let job = match live.shared.compress.pop_front() {
            Some(job) => job,
            None => match sweep_order(self.dmeta.compress_jobs().unwrap_or_default(), &HashSet::new())
                .into_iter()
                .next()
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
        self.note(format!("compress {}: {done:?}", job.rotation.to));
        if done.is_ok() {
            self.stats.compressions += 1;
        }
    }

    // -- the writers -------------------------------------------------------------------

    /// One step of the session's writer task (its predecessor's, while it
    /// waits for it): take a message, a slot request or a flush tick when
    /// idle; else do what its state machine asks.
    pub fn writer_step(&mut self, live: &mut Live, session: &str) {
        let (tick_idle, tick_old, tick) = (self.chance(15), self.chance(10), self.chance(50));
        let Some(w) = live.writers.get_mut(session) else { return };
        let shared = &mut live.shared;
        let w = runnable(w, shared, &mut self.log, self.epoch, self.step);
        if w.putting || w.stopped {
            return;
        }
        let core = w.core.as_mut().expect("runnable");
        let step = core.poll();
        let what = match step {
            Step::Idle => {
                if let Some(msg) = w.queue.pop_front() {
                    take(w, msg, shared.t0);
                    "takes a message".to_string()
                } else if core.is_open() && shared.open_files.close_asked(session) {
                    core.close_for_slot();
                    self.stats.slot_closes += 1;
                    "asked to close for a slot".to_string()
                } else if tick {
                    let now = shared.t0 + Duration::from_secs(if tick_idle { 86_400 } else { 0 });
                    let now_ms = if tick_old { u64::MAX } else { 0 };
                    core.tick(now, now_ms, w.queue.is_empty());
                    format!("tick (idle {tick_idle}, old {tick_old})")
                } else {
                    return;
                }
            }
            Step::NeedSlot => match shared.open_files.try_acquire(session, &w.wake) {
                Ok(slot) => {
                    core.slot_granted(slot);
                    "slot granted".to_string()
                }
                Err(victim) => format!("no slot; {victim:?} asked to close"),
            },
            Step::Blocking => {
                core.run_blocking();
                "blocking operation".to_string()
            }
            Step::PutCheckpoint(c) => {
                shared.batch.push(session.to_owned(), c, w.id);
                w.putting = true;
                format!("puts checkpoint {c:?}")
            }
            Step::RetryAfter(d) => {
                core.retry_now();
                self.stats.retries += 1;
                format!("retries after {d:?}")
            }
        };
        let id = w.id;
        self.note(format!("{session} writer {id}: {what}"));
        self.deliver(shared, w);
    }

    /// What the writer task's shell does with its writer's outputs.
    fn deliver(&mut self, shared: &mut Shared, w: &mut SimWriter) {
        let core = w.core.as_mut().expect("running");
        for out in core.take_outputs() {
            if self.log.is_some() && !matches!(out, Output::Budget(_)) {
                let line = format!("{} writer {}: {out:?}", w.session, w.id);
                self.note(line);
            }
            match out {
                Output::Budget(units) => shared.budget.add_permits(units as usize),
                Output::Checkpointed { lsn } => shared.reports.push_back(Report::Checkpointed {
                    session: w.session.clone(),
                    lsn,
                }),
                Output::Rotated(rot) => {
                    self.stats.rotations += 1;
                    if self.life.gzip_level.is_some() {
                        shared.compress.push_back(CompressJob::new(rot));
                    }
                }
                Output::RotateReply { token, result } => {
                    if let Some(reply) = w.replies.remove(&token) {
                        let _ = reply.send(result);
                    }
                }
                Output::FailStop(_) => {
                    self.stats.fail_stops += 1;
                    shared.fatal = true;
                }
                Output::CloseQueue => {
                    // Stop taking frames; what was queued is still written.
                    w.closed = true;
                    while let Some(msg) = w.queue.pop_front() {
                        take(w, msg, shared.t0);
                    }
                    w.core.as_mut().expect("running").stop(true);
                }
                Output::Stopped { idle } => {
                    w.stopped = true;
                    if idle {
                        shared.reports.push_back(Report::Stopped {
                            session: w.session.clone(),
                            id: w.id,
                        });
                    }
                }
            }
        }
    }
}

#[allow(clippy::unnecessary_unwrap)] // `if let` here trips the borrow checker (the early return)
/// The writer of the chain that runs now: the oldest not yet stopped (a
/// stopped predecessor hands over: its successor starts, failed if it failed).
fn runnable<'a>(
    w: &'a mut SimWriter,
    shared: &Shared,
    log: &mut Option<Vec<String>>,
    epoch: u32,
    step: u64,
) -> &'a mut SimWriter {
    if w.predecessor.as_ref().is_some_and(|p| p.stopped) {
        let p = w.predecessor.take().expect("checked");
        let failed = p.core.as_ref().is_some_and(|c| c.failed());
        if let Some(log) = log.as_mut() {
            log.push(format!(
                "[e{epoch} s{step}] {} writer {} starts after its predecessor (failed: {failed})",
                w.session, w.id
            ));
        }
        w.core = Some(SessionWriter::new(
            shared.settings.clone(),
            &w.session,
            shared.t0,
            failed,
        ));
    }
    if w.predecessor.is_some() {
        return runnable(w.predecessor.as_mut().expect("checked"), shared, log, epoch, step);
    }
    w
}

/// The writer (or one of its predecessors) with this id.
fn find(w: &mut SimWriter, id: u64) -> Option<&mut SimWriter> {
    if w.id == id {
        return Some(w);
    }
    w.predecessor.as_mut().and_then(|p| find(p, id))
}

/// The shell hands a message to its writer.
fn take(w: &mut SimWriter, msg: WriterMsg, t0: Instant) {
    let core = w.core.as_mut().expect("running");
    match msg {
        WriterMsg::Frames(batch, units) => core.push_frames(batch, units, t0),
        WriterMsg::Rotate(reply) => {
            w.next_token += 1;
            w.replies.insert(w.next_token, reply);
            core.rotate(RotateReason::Manual, w.next_token);
        }
    }
}
