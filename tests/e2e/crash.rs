//! The crash harness: concurrent WriteLogBidi load against the real binary,
//! crashes at random instants (SIGKILL) and at every named crash point
//! (`FAILPOINTS`, the process aborts by itself), restarts with and without an
//! offline `logd recover`, damaged WAL segments and a damaged metadata store;
//! then every acknowledged frame must be in its session file exactly once,
//! with the seq it was acknowledged with.
//!
//! Replay: every test prints `LOGD_CRASH_SEED=<n>`; run again with that env
//! var to repeat the same choices (crash kinds, skip counts, kill delays,
//! frame sizes). Thread timing still differs between runs.
//! Soak: `LOGD_CRASH_SOAK=1` multiplies the cycles of every test; the ignored
//! test `soak_random_crashes` runs for `LOGD_CRASH_SOAK_SECS` (default 600).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use logd::pb::log_service_client::LogServiceClient;
use logd::pb::{LogFrame, WriteLogAck};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::util::*;

/// Every `crash_point!("…")` in src/, wal/ and recovery/ (checked by
/// `crash_point_list_covers_every_crash_point_in_the_code`).
const CRASH_POINTS: &[&str] = &[
    "wal::commit::after_write",
    "wal::commit::after_fsync",
    "wal::remove::after_unlink",
    "writer::after_write",
    "writer::after_fsync",
    "writer::after_checkpoint_put",
    "dispatcher::after_meta_flush",
    "rotate::after_rename",
    "rotate::after_record",
    "rotate::after_dir_fsync",
    "compress::after_tmp_open",
    "compress::after_gz",
    "compress::after_unlink",
    "compress::after_event",
    "mirror::after_xadd",
];

/// Sessions: the first four get server-assigned seqs and are shared by every
/// stream; the last four get client seqs, each owned by one stream.
const SESSIONS: [&str; 8] = ["srv-0", "srv-1", "srv-2", "srv-3", "cli-0", "cli-1", "cli-2", "cli-3"];
const SERVER_SESSIONS: usize = 4;
/// Frames a stream may have sent but not seen acked.
const STREAM_WINDOW: usize = 512;
/// Largest frame the scenarios allow (and the WAL record limit derived from it).
const MAX_FRAME_BYTES: u32 = 8192;
const RECORD_BYTES_MAX: u32 = MAX_FRAME_BYTES + 64;
/// How long a cycle with a crash point waits for the abort before SIGKILL.
const CRASH_POINT_WAIT: Duration = Duration::from_secs(5);
/// How long a clean stop (SIGTERM, every stream already finished) may take.
const CLEAN_STOP_WAIT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------
// Seeds and a small PRNG (SplitMix64): deterministic for a given seed.

#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// `LOGD_CRASH_SEED` (decimal or 0x-hex), else from the clock.
fn base_seed() -> u64 {
    match std::env::var("LOGD_CRASH_SEED") {
        Ok(v) => {
            let v = v.trim();
            let parsed = match v.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => v.parse(),
            };
            parsed.unwrap_or_else(|e| panic!("LOGD_CRASH_SEED={v:?}: {e}"))
        }
        Err(_) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64;
            Rng::new(t ^ ((std::process::id() as u64) << 32)).next_u64() >> 1
        }
    }
}

/// Cycle multiplier: `LOGD_CRASH_SOAK=1` runs every test several times longer.
fn soak_factor() -> usize {
    if std::env::var("LOGD_CRASH_SOAK").is_ok_and(|v| v != "0" && !v.is_empty()) {
        6
    } else {
        1
    }
}

// ---------------------------------------------------------------------------
// Frames: unique, deterministic content naming session, cycle, stream, counter.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key {
    cycle: u32,
    stream: u32,
    n: u32,
}

/// The content of frame `k` of `session`: a parseable prefix plus 0..=240
/// bytes of padding derived from the key (so segments roll quickly).
fn content(session: usize, k: Key) -> String {
    let mut h = Rng::new(((k.cycle as u64) << 40) ^ ((k.stream as u64) << 32) ^ k.n as u64 ^ ((session as u64) << 56));
    let len = h.below(241) as usize;
    let pad: String = (0..len).map(|_| (b'a' + h.below(26) as u8) as char).collect();
    format!("s={} c={} w={} n={} {pad}", SESSIONS[session], k.cycle, k.stream, k.n)
}

fn parse_content(c: &str) -> Option<(usize, Key)> {
    let mut it = c.split(' ');
    let session = it.next()?.strip_prefix("s=")?;
    let session = SESSIONS.iter().position(|s| *s == session)?;
    let cycle = it.next()?.strip_prefix("c=")?.parse().ok()?;
    let stream = it.next()?.strip_prefix("w=")?.parse().ok()?;
    let n = it.next()?.strip_prefix("n=")?.parse().ok()?;
    Some((session, Key { cycle, stream, n }))
}

/// What the model knows about one frame that was sent.
#[derive(Debug, Clone, Copy)]
struct FrameRec {
    session: usize,
    /// The client's seq (0: server-assigned).
    client_seq: i64,
    acked: bool,
    /// The seq the ack reported for it.
    ack_seq: Option<i64>,
}

// ---------------------------------------------------------------------------
// One WriteLogBidi stream.

struct StreamPlan {
    addr: String,
    cycle: u32,
    stream: u32,
    /// The client-seq session this stream owns and its next seq.
    owned: Option<(usize, i64)>,
    seed: u64,
    acked_total: Arc<AtomicUsize>,
}

struct Sent {
    key: Key,
    session: usize,
    client_seq: i64,
}

#[derive(Default)]
struct StreamLog {
    sent: Vec<Sent>,
    /// Frames `0..acked` of the stream are acked.
    acked: usize,
    ack_seqs: Vec<Option<i64>>,
    next_client_seq: Option<i64>,
    /// Acks that contradict what was sent (each one is a violation).
    problems: Vec<String>,
    end: String,
}

impl StreamLog {
    fn on_ack(&mut self, a: &WriteLogAck, acked_total: &AtomicUsize) {
        let from = self.acked;
        if a.through_index < from as i64 || a.through_index as usize > self.sent.len() {
            self.problems.push(format!(
                "ack through_index {} outside {from}..={} (frames sent)",
                a.through_index,
                self.sent.len()
            ));
            return;
        }
        let to = a.through_index as usize;
        if a.frames_rejected != 0 || a.frames_duplicate != 0 || !a.rejections.is_empty() {
            self.problems.push(format!(
                "ack through {to}: {} rejected, {} duplicate (none expected): {:?}",
                a.frames_rejected, a.frames_duplicate, a.rejections
            ));
        }
        let mut covered = 0;
        for r in &a.sessions {
            let Some(s) = SESSIONS.iter().position(|n| *n == r.session_id) else {
                self.problems
                    .push(format!("ack names unknown session {:?}", r.session_id));
                continue;
            };
            let idx: Vec<usize> = (from..to).filter(|&i| self.sent[i].session == s).collect();
            covered += idx.len();
            if idx.is_empty() || idx.len() as i64 != r.frames {
                self.problems.push(format!(
                    "ack through {to}: range {r:?} but {} frame(s) of that session were sent in {from}..{to}",
                    idx.len()
                ));
                continue;
            }
            if s >= SERVER_SESSIONS {
                let (first, last) = (self.sent[idx[0]].client_seq, self.sent[idx[idx.len() - 1]].client_seq);
                if (r.first_seq, r.last_seq) != (first, last) {
                    self.problems.push(format!(
                        "ack through {to}: range {r:?} but the client sent seqs {first}..={last}"
                    ));
                }
                for &i in &idx {
                    self.ack_seqs[i] = Some(self.sent[i].client_seq);
                }
            } else if r.last_seq - r.first_seq + 1 != r.frames {
                self.problems.push(format!(
                    "ack through {to}: server-assigned range {r:?} is not contiguous within one commit"
                ));
            } else {
                for (k, &i) in idx.iter().enumerate() {
                    self.ack_seqs[i] = Some(r.first_seq + k as i64);
                }
            }
        }
        if covered != to - from {
            self.problems.push(format!(
                "ack through {to}: its session ranges cover {covered} frame(s), {} were settled",
                to - from
            ));
        }
        self.acked = to;
        acked_total.fetch_add(to - from, Ordering::Relaxed);
    }
}

/// Sends bursts of frames until the server goes away or `stop` is cancelled
/// (then ends its input and waits for the last acks).
async fn run_stream(plan: StreamPlan, stop: CancellationToken) -> StreamLog {
    let mut log = StreamLog {
        next_client_seq: plan.owned.map(|o| o.1),
        ..StreamLog::default()
    };
    let mut rng = Rng::new(plan.seed);
    let mut client = match LogServiceClient::connect(plan.addr.clone()).await {
        Ok(c) => c,
        Err(e) => {
            log.end = format!("connect failed: {e}");
            return log;
        }
    };
    let (tx, rx) = mpsc::channel::<LogFrame>(64);
    let mut acks = match client.write_log_bidi(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(e) => {
            log.end = format!("WriteLogBidi failed: {e}");
            return log;
        }
    };
    let mut tx = Some(tx);
    let mut n = 0u32;
    let mut next_burst = tokio::time::Instant::now();
    loop {
        let can_send = tx.is_some() && log.sent.len() - log.acked < STREAM_WINDOW;
        tokio::select! {
            biased;
            m = acks.message() => match m {
                Ok(Some(a)) => log.on_ack(&a, &plan.acked_total),
                Ok(None) => {
                    log.end = "acks ended".into();
                    break;
                }
                Err(s) => {
                    log.end = format!("acks failed: {:?}: {}", s.code(), s.message());
                    break;
                }
            },
            _ = stop.cancelled(), if tx.is_some() => tx = None,
            _ = tokio::time::sleep_until(next_burst), if can_send => {
                let t = tx.as_ref().expect("open");
                let mut closed = false;
                for _ in 0..rng.range(1, 8) {
                    if log.sent.len() - log.acked >= STREAM_WINDOW {
                        break;
                    }
                    let (session, client_seq) = match (plan.owned, log.next_client_seq) {
                        (Some((s, _)), Some(seq)) if rng.chance(50) => (s, seq),
                        _ => (rng.below(SERVER_SESSIONS as u64) as usize, 0),
                    };
                    let key = Key { cycle: plan.cycle, stream: plan.stream, n };
                    match t.try_send(frame(SESSIONS[session], client_seq, &content(session, key))) {
                        Ok(()) => {
                            n += 1;
                            if client_seq > 0 {
                                // Sometimes skip a few seqs: gaps are allowed.
                                let gap = if rng.chance(10) { rng.range(1, 3) as i64 } else { 0 };
                                log.next_client_seq = Some(client_seq + 1 + gap);
                            }
                            log.sent.push(Sent { key, session, client_seq });
                            log.ack_seqs.push(None);
                        }
                        Err(mpsc::error::TrySendError::Full(_)) => break,
                        Err(mpsc::error::TrySendError::Closed(_)) => {
                            closed = true;
                            break;
                        }
                    }
                }
                if closed {
                    tx = None;
                }
                next_burst = tokio::time::Instant::now() + Duration::from_millis(rng.range(2, 8));
            }
        }
    }
    log
}

// ---------------------------------------------------------------------------
// Scenarios: one state directory, several crash/restart cycles, a verdict.

#[derive(Debug, Clone, Copy)]
enum Crash {
    /// SIGKILL after this much load.
    Kill(Duration),
    /// SIGKILL once this many frames are acked (at least).
    KillAfterAcked(usize),
    /// Start with `FAILPOINTS=<name>=<skip>*off->return` and wait for the abort.
    Point { name: &'static str, skip: u64 },
    /// Load for a while, let every stream finish, SIGTERM (exit 0 required).
    Stop(Duration),
}

/// Counters a test prints at the end.
#[derive(Debug, Default, Clone)]
struct Totals {
    scenarios: usize,
    cycles: usize,
    kills: usize,
    crash_point_aborts: usize,
    crash_point_aborts_in_recovery: usize,
    crash_point_not_hit: usize,
    recover_runs: usize,
    frames_sent: usize,
    frames_acked: usize,
    lines_verified: usize,
    acked_verified: usize,
}

impl Totals {
    fn add(&mut self, o: &Totals) {
        self.scenarios += o.scenarios;
        self.cycles += o.cycles;
        self.kills += o.kills;
        self.crash_point_aborts += o.crash_point_aborts;
        self.crash_point_aborts_in_recovery += o.crash_point_aborts_in_recovery;
        self.crash_point_not_hit += o.crash_point_not_hit;
        self.recover_runs += o.recover_runs;
        self.frames_sent += o.frames_sent;
        self.frames_acked += o.frames_acked;
        self.lines_verified += o.lines_verified;
        self.acked_verified += o.acked_verified;
    }
}

/// Per crash point: (aborts while serving, aborts in recovery, not hit).
type PointStats = (usize, usize, usize);

/// One test's run: its seed, totals and every violation found.
struct Run {
    test: &'static str,
    base_seed: u64,
    rng: Rng,
    totals: Totals,
    per_point: BTreeMap<&'static str, PointStats>,
    violations: Vec<String>,
    started: Instant,
}

impl Run {
    fn new(test: &'static str) -> Run {
        let base_seed = base_seed();
        println!("crash[{test}]: LOGD_CRASH_SEED={base_seed} (set it to replay)");
        Run {
            test,
            base_seed,
            rng: Rng::new(base_seed ^ fnv1a(test)),
            totals: Totals::default(),
            per_point: BTreeMap::new(),
            violations: Vec::new(),
            started: Instant::now(),
        }
    }

    fn scenario(&mut self, name: &str, env: Vec<(String, String)>) -> Scenario {
        let td = TestDir::new();
        let mut rng = Rng::new(self.rng.next_u64());
        let recover_phase = rng.below(2) as u32;
        println!(
            "crash[{}]: scenario {name} in {} env {:?}",
            self.test,
            td.dir.path().display(),
            env
        );
        Scenario {
            name: name.to_string(),
            td,
            env,
            rng,
            recover_phase,
            cycle: 0,
            next_client_seq: [1; 8],
            frames: HashMap::new(),
            damaged: HashSet::new(),
            history: Vec::new(),
            violations: Vec::new(),
            t: Totals {
                scenarios: 1,
                ..Totals::default()
            },
            per_point: BTreeMap::new(),
            last_stderr: String::new(),
            last_recover_out: String::new(),
        }
    }

    /// Takes a finished scenario's counters and violations; keeps its
    /// directory (and prints where) when it failed.
    fn absorb(&mut self, sc: Scenario) {
        self.totals.add(&sc.t);
        for (p, s) in &sc.per_point {
            let e = self.per_point.entry(p).or_default();
            e.0 += s.0;
            e.1 += s.1;
            e.2 += s.2;
        }
        if sc.violations.is_empty() {
            return;
        }
        let kept = sc.td.dir.keep();
        let mut msg = format!(
            "scenario {} ({} violation(s)); directory kept at {}\n",
            sc.name,
            sc.violations.len(),
            kept.display()
        );
        for v in &sc.violations {
            msg.push_str(&format!("  - {v}\n"));
        }
        msg.push_str("  history:\n");
        for h in &sc.history {
            msg.push_str(&format!("    {h}\n"));
        }
        println!("crash[{}]: {msg}", self.test);
        self.violations.push(msg);
    }

    /// Prints the totals; panics with every violation if there were any.
    fn finish(self) {
        let t = &self.totals;
        println!(
            "crash[{}] totals: scenarios={} cycles={} kills={} crash_point_aborts_while_serving={} crash_point_aborts_in_recovery={} \
             crash_points_not_hit_then_killed={} logd_recover_runs={} frames_sent={} frames_acked={} lines_verified={} \
             acked_frames_verified={} elapsed={:.1}s LOGD_CRASH_SEED={}",
            self.test,
            t.scenarios,
            t.cycles,
            t.kills,
            t.crash_point_aborts,
            t.crash_point_aborts_in_recovery,
            t.crash_point_not_hit,
            t.recover_runs,
            t.frames_sent,
            t.frames_acked,
            t.lines_verified,
            t.acked_verified,
            self.started.elapsed().as_secs_f64(),
            self.base_seed
        );
        for (p, (serving, startup, missed)) in &self.per_point {
            println!(
                "crash[{}]   {p}: {serving} abort(s) while serving, {startup} in recovery (serve startup or logd recover), {missed} not hit (killed instead)",
                self.test
            );
        }
        if !self.violations.is_empty() {
            panic!(
                "crash[{}]: {} failing scenario(s), LOGD_CRASH_SEED={}:\n{}",
                self.test,
                self.violations.len(),
                self.base_seed,
                self.violations.join("\n")
            );
        }
    }
}

/// Env of the crash scenarios: small segments that roll, get checkpointed
/// and deleted during the run; a short flush interval; session files that
/// rotate (and get gzipped) during the run, or not at all.
fn fast_env(rng: &mut Rng, rotate_often: bool) -> Vec<(String, String)> {
    let rotate_at = match (rotate_often, rng.below(3)) {
        (true, _) | (false, 0) => 32 << 10,
        (false, 1) => 128 << 10,
        _ => 64 << 20,
    };
    vec![
        ("LOGD_WAL_SEGMENT_BYTES".into(), "65536".into()),
        ("LOG_FLUSH_INTERVAL_MS".into(), rng.range(20, 50).to_string()),
        ("LOG_MAX_FRAME_BYTES".into(), MAX_FRAME_BYTES.to_string()),
        ("LOG_MAX_SIZE_BYTES".into(), rotate_at.to_string()),
        ("LOGD_COMPRESSION_LEVEL".into(), "1".into()),
        // The default metrics port is fixed: parallel servers would collide.
        ("LOGD_METRICS_LISTEN".into(), "off".into()),
    ]
}

/// Whether exercising `point` needs session files to rotate.
fn needs_rotation(point: &str) -> bool {
    ["rotate::", "compress::", "mirror::"]
        .iter()
        .any(|p| point.starts_with(p))
}

/// Env of the WAL-damage scenarios: materialization lags, the WAL keeps
/// every record.
fn slow_flush_env() -> Vec<(String, String)> {
    vec![
        ("LOGD_WAL_SEGMENT_BYTES".into(), "262144".into()),
        ("LOG_FLUSH_INTERVAL_MS".into(), "60000".into()),
        ("LOG_MAX_FRAME_BYTES".into(), MAX_FRAME_BYTES.to_string()),
        ("LOGD_METRICS_LISTEN".into(), "off".into()),
    ]
}

/// A random skip count for a crash point, so that it fires within a few
/// seconds of load (hit rates differ by orders of magnitude).
fn skip_for(point: &str, rng: &mut Rng) -> u64 {
    match point {
        "wal::commit::after_write" | "wal::commit::after_fsync" => rng.range(0, 300),
        "writer::after_write" => rng.range(0, 400),
        "writer::after_fsync" | "writer::after_checkpoint_put" => rng.range(0, 150),
        "dispatcher::after_meta_flush" => rng.range(0, 40),
        "wal::remove::after_unlink" => rng.range(0, 12),
        "rotate::after_rename" | "rotate::after_record" | "rotate::after_dir_fsync" => rng.range(0, 30),
        "compress::after_tmp_open" | "compress::after_gz" | "compress::after_unlink" | "compress::after_event" => {
            rng.range(0, 20)
        }
        "mirror::after_xadd" => rng.range(0, 40),
        _ => rng.range(0, 20),
    }
}

/// Why a scenario cannot go on (the server does not start).
struct Stuck;

struct Scenario {
    name: String,
    td: TestDir,
    env: Vec<(String, String)>,
    rng: Rng,
    /// Cycles with this parity run `logd recover` before starting.
    recover_phase: u32,
    cycle: u32,
    next_client_seq: [i64; 8],
    frames: HashMap<Key, FrameRec>,
    /// Frames whose WAL record the test damaged (allowed to be missing).
    damaged: HashSet<Key>,
    history: Vec<String>,
    violations: Vec<String>,
    t: Totals,
    per_point: BTreeMap<&'static str, PointStats>,
    /// stderr of the last server started.
    last_stderr: String,
    /// Output of the last `logd recover` a cycle ran (empty if none).
    last_recover_out: String,
}

impl Scenario {
    fn log_dir(&self) -> PathBuf {
        self.td.log_dir()
    }

    fn env_with(&self, more: &[(&str, String)]) -> Vec<(String, String)> {
        let mut env = self.env.clone();
        env.extend(more.iter().map(|(k, v)| (k.to_string(), v.clone())));
        env
    }

    /// Records a violation of the cycle running (or that ran last).
    fn violation(&mut self, v: String) {
        self.violations
            .push(format!("cycle {}: {v}", self.cycle.saturating_sub(1)));
    }

    /// Runs `logd <args>` with the scenario's env.
    fn logd(&self, args: &[&str]) -> std::process::Output {
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        run_logd(args, &self.log_dir(), &env)
    }

    /// Whether the next cycle runs `logd recover` before starting (alternating).
    fn recover_this_cycle(&self) -> bool {
        self.cycle > 0 && self.cycle % 2 == self.recover_phase
    }

    /// One cycle: (maybe `logd recover`), start, load, crash or stop.
    async fn cycle(&mut self, crash: Crash, recover_first: bool) -> Result<(), Stuck> {
        let c = self.cycle;
        self.cycle += 1;
        self.t.cycles += 1;
        let mut desc = format!("cycle {c}: {crash:?}");
        self.last_recover_out.clear();
        if recover_first {
            // Half the time the offline recovery runs with the crash point
            // armed too (at its first hit): a crash inside recovery itself.
            let armed = match crash {
                Crash::Point { name, .. } if self.rng.chance(50) => Some(name),
                _ => None,
            };
            let out = match armed {
                Some(name) => {
                    let env = self.env_with(&[("FAILPOINTS", format!("{name}=return"))]);
                    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                    run_logd(&["recover"], &self.log_dir(), &env)
                }
                None => self.logd(&["recover"]),
            };
            self.last_recover_out = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            self.t.recover_runs += 1;
            desc.push_str(if armed.is_some() {
                ", logd recover first (crash point armed)"
            } else {
                ", logd recover first"
            });
            if let Some(name) = armed
                && out.status.signal() == Some(6)
                && self.last_recover_out.contains(&format!("crash point {name} hit"))
            {
                self.t.crash_point_aborts_in_recovery += 1;
                self.per_point.entry(name).or_default().1 += 1;
                desc.push_str(" → aborted inside logd recover");
            } else if !out.status.success() {
                self.violation(format!(
                    "logd recover exited with {}:\nstdout: {}\nstderr: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    tail(&String::from_utf8_lossy(&out.stderr))
                ));
            }
        }
        let env = match crash {
            Crash::Point { name, skip } => self.env_with(&[("FAILPOINTS", format!("{name}={skip}*off->return"))]),
            _ => self.env.clone(),
        };
        let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut server = match Server::try_start(&self.log_dir(), &env_ref) {
            Ok(s) => s,
            Err(f) => {
                if let Crash::Point { name, .. } = crash
                    && f.stderr.contains(&format!("crash point {name} hit"))
                {
                    self.t.crash_point_aborts_in_recovery += 1;
                    self.per_point.entry(name).or_default().1 += 1;
                    self.history
                        .push(format!("{desc}: aborted at the crash point during startup recovery"));
                    return Ok(());
                }
                self.history.push(format!("{desc}: did not start"));
                self.violations.push(format!(
                    "cycle {c}: logd serve did not start (exit {:?}):\n{}",
                    f.status,
                    tail(&f.stderr)
                ));
                return Err(Stuck);
            }
        };
        let stop = CancellationToken::new();
        let acked_total = Arc::new(AtomicUsize::new(0));
        let streams = self.rng.range(4, 6) as u32;
        let mut handles = Vec::new();
        for w in 0..streams {
            let owned = ((w as usize) < SESSIONS.len() - SERVER_SESSIONS).then(|| {
                let s = SERVER_SESSIONS + w as usize;
                (s, self.next_client_seq[s])
            });
            let plan = StreamPlan {
                addr: server.addr.clone(),
                cycle: c,
                stream: w,
                owned,
                seed: self.rng.next_u64(),
                acked_total: acked_total.clone(),
            };
            handles.push(tokio::spawn(run_stream(plan, stop.clone())));
        }
        let loaded = Instant::now();
        let outcome = match crash {
            Crash::Kill(after) => {
                tokio::time::sleep(after).await;
                self.kill(&mut server, "")
            }
            Crash::KillAfterAcked(n) => {
                let deadline = Instant::now() + Duration::from_secs(60);
                while acked_total.load(Ordering::Relaxed) < n && Instant::now() < deadline {
                    if server.child.as_mut().unwrap().try_wait().unwrap().is_some() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                self.kill(
                    &mut server,
                    &format!(" with {} acked", acked_total.load(Ordering::Relaxed)),
                )
            }
            Crash::Point { name, .. } => loop {
                if let Some(status) = server.try_exit_status() {
                    let stderr = server.stderr();
                    if stderr.contains(&format!("crash point {name} hit")) && status.signal() == Some(6) {
                        self.t.crash_point_aborts += 1;
                        self.per_point.entry(name).or_default().0 += 1;
                        break format!("aborted at the crash point after {} ms", loaded.elapsed().as_millis());
                    }
                    self.violation(format!(
                        "logd exited with {status} instead of aborting at {name}:\n{}",
                        tail(&stderr)
                    ));
                    break format!("died unexpectedly ({status})");
                }
                if loaded.elapsed() > CRASH_POINT_WAIT {
                    self.t.crash_point_not_hit += 1;
                    self.per_point.entry(name).or_default().2 += 1;
                    break self.kill(&mut server, " (crash point not hit)");
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            },
            Crash::Stop(after) => {
                tokio::time::sleep(after).await;
                stop.cancel();
                String::new()
            }
        };
        let mut logs = Vec::new();
        for (w, h) in handles.into_iter().enumerate() {
            match tokio::time::timeout(Duration::from_secs(60), h).await {
                Ok(Ok(log)) => logs.push((w, log)),
                Ok(Err(e)) => self.violation(format!("stream task failed: {e}")),
                Err(_) => self.violation("a stream did not end within 60 s".into()),
            }
        }
        let outcome = if let Crash::Stop(_) = crash {
            match server.try_stop_within(CLEAN_STOP_WAIT) {
                Ok(()) => "stopped cleanly".to_string(),
                Err(e) => {
                    self.violation(format!("clean stop failed: {}", tail(&e)));
                    // Still judge durability: materialize what the WAL holds.
                    let out = self.logd(&["recover"]);
                    if !out.status.success() {
                        self.violation(format!(
                            "logd recover after the failed stop exited with {}:\n{}",
                            out.status,
                            tail(&String::from_utf8_lossy(&out.stderr))
                        ));
                    }
                    format!("clean stop FAILED (killed, then logd recover: {})", out.status)
                }
            }
        } else {
            outcome
        };
        self.last_stderr = server.stderr();
        let (mut sent, mut acked) = (0, 0);
        let mut ends: BTreeMap<String, usize> = BTreeMap::new();
        for (w, log) in logs {
            *ends.entry(log.end.chars().take(100).collect()).or_default() += 1;
            for p in &log.problems {
                self.violations.push(format!("cycle {c} stream {w}: {p}"));
            }
            if matches!(crash, Crash::Stop(_)) && log.acked != log.sent.len() {
                self.violations.push(format!(
                    "cycle {c} stream {w}: clean stop left {} of {} frames unacked ({})",
                    log.sent.len() - log.acked,
                    log.sent.len(),
                    log.end
                ));
            }
            if let Some(next) = log.next_client_seq {
                self.next_client_seq[SERVER_SESSIONS + w] = next;
            }
            sent += log.sent.len();
            acked += log.acked;
            for (i, s) in log.sent.iter().enumerate() {
                self.frames.insert(
                    s.key,
                    FrameRec {
                        session: s.session,
                        client_seq: s.client_seq,
                        acked: i < log.acked,
                        ack_seq: log.ack_seqs[i],
                    },
                );
            }
        }
        self.t.frames_sent += sent;
        self.t.frames_acked += acked;
        self.history.push(format!(
            "{desc}: {streams} streams, {outcome}; sent {sent}, acked {acked}; streams ended: {ends:?}"
        ));
        Ok(())
    }

    /// SIGKILL (a violation if the server had already died by itself).
    fn kill(&mut self, server: &mut Server, note: &str) -> String {
        if let Some(status) = server.try_exit_status() {
            let stderr = server.stderr();
            self.violation(format!(
                "logd died by itself ({status}) before the kill:\n{}",
                tail(&stderr)
            ));
            return format!("died by itself ({status})");
        }
        server.kill9();
        self.t.kills += 1;
        format!("SIGKILL{note}")
    }

    /// Random crash cycles followed by a clean one: the common shape.
    async fn final_stop(&mut self) -> Result<(), Stuck> {
        let after = Duration::from_millis(self.rng.range(300, 700));
        let recover = self.recover_this_cycle();
        self.cycle(Crash::Stop(after), recover).await
    }

    /// Checks the session files against the model (see the module doc):
    /// every acked frame (not damaged by the test) exactly once with the seq
    /// it was acked with, client seqs kept, no content twice, seqs strictly
    /// increasing, and (if `contiguous`) server seqs exactly 1..=n.
    fn verify(&mut self, contiguous: bool) {
        let mut v: Vec<String> = Vec::new();
        let sessions = read_session_files(&self.log_dir(), &mut v);
        let mut seen: HashMap<Key, (String, i64)> = HashMap::new();
        for (name, lines) in &sessions {
            let Some(sidx) = SESSIONS.iter().position(|s| s == name) else {
                v.push(format!("unexpected session {name:?} with {} line(s)", lines.len()));
                continue;
            };
            let mut bad = 0;
            for w in lines.windows(2) {
                if w[0].line.seq >= w[1].line.seq {
                    bad += 1;
                    if bad <= 5 {
                        v.push(format!(
                            "{name}: seq {} ({}: {:.40}) then seq {} ({}: {:.40}): not strictly increasing",
                            w[0].line.seq, w[0].file, w[0].line.content, w[1].line.seq, w[1].file, w[1].line.content
                        ));
                    }
                }
            }
            if contiguous
                && sidx < SERVER_SESSIONS
                && let Some((i, l)) = lines.iter().enumerate().find(|(i, l)| l.line.seq != *i as i64 + 1)
            {
                v.push(format!(
                    "{name}: server-assigned seqs are not 1..=n: line {} has seq {} ({}: {:.40}); {} line(s), last seq {}",
                    i + 1,
                    l.line.seq,
                    l.file,
                    l.line.content,
                    lines.len(),
                    lines.last().map_or(0, |l| l.line.seq)
                ));
            }
            let mut reported = 0;
            let mut report = |v: &mut Vec<String>, m: String| {
                reported += 1;
                if reported <= 20 {
                    v.push(m);
                }
            };
            for FileLine { file, line: l } in lines {
                self.t.lines_verified += 1;
                let Some((cs, key)) = parse_content(&l.content) else {
                    report(&mut v, format!("{name}: foreign line seq {}: {:.60}", l.seq, l.content));
                    continue;
                };
                if cs != sidx {
                    report(
                        &mut v,
                        format!("{name}: line seq {} belongs to {}", l.seq, SESSIONS[cs]),
                    );
                }
                if l.content != content(cs, key) {
                    report(
                        &mut v,
                        format!("{name}: line seq {} content mangled: {:.60}", l.seq, l.content),
                    );
                }
                if let Some((pfile, pseq)) = seen.insert(key, (file.clone(), l.seq)) {
                    report(
                        &mut v,
                        format!(
                            "DUPLICATE: {key:?} in {file} at seq {} and in {pfile} at seq {pseq} ({})",
                            l.seq,
                            self.frame_story(&key)
                        ),
                    );
                }
                match self.frames.get(&key) {
                    None => report(
                        &mut v,
                        format!("{name}: seq {} holds a frame never sent: {key:?}", l.seq),
                    ),
                    Some(rec) => {
                        if rec.client_seq > 0 && l.seq != rec.client_seq {
                            report(
                                &mut v,
                                format!(
                                    "{name}: {key:?} sent with client seq {} but stored with seq {}",
                                    rec.client_seq, l.seq
                                ),
                            );
                        }
                        if let Some(a) = rec.ack_seq
                            && a != l.seq
                        {
                            report(
                                &mut v,
                                format!("{name}: {key:?} acked with seq {a} but stored with seq {}", l.seq),
                            );
                        }
                    }
                }
            }
            if reported > 20 {
                v.push(format!("{name}: … {} more problem(s)", reported - 20));
            }
        }
        let mut missing: Vec<(Key, FrameRec)> = Vec::new();
        for (key, rec) in &self.frames {
            if rec.acked && !self.damaged.contains(key) {
                self.t.acked_verified += 1;
                if !seen.contains_key(key) {
                    missing.push((*key, *rec));
                }
            }
        }
        if !missing.is_empty() {
            missing.sort_by_key(|(k, _)| *k);
            let mut by_cycle: BTreeMap<u32, usize> = BTreeMap::new();
            for (k, _) in &missing {
                *by_cycle.entry(k.cycle).or_default() += 1;
            }
            let examples: Vec<String> = missing
                .iter()
                .take(10)
                .map(|(k, r)| format!("{k:?} {} ack_seq {:?}", SESSIONS[r.session], r.ack_seq))
                .collect();
            v.push(format!(
                "LOST: {} acked frame(s) missing (per cycle: {by_cycle:?}); e.g. {}",
                missing.len(),
                examples.join("; ")
            ));
        }
        self.violations.extend(v);
    }

    fn frame_story(&self, key: &Key) -> String {
        match self.frames.get(key) {
            Some(r) => format!(
                "sent in cycle {} to {}, client seq {}, acked {}, ack seq {:?}",
                key.cycle, SESSIONS[r.session], r.client_seq, r.acked, r.ack_seq
            ),
            None => "never sent".into(),
        }
    }

    /// The highest seq a session's files hold for frames sent before `cycle`.
    fn max_seq_before(&self, session: usize, cycle: u32) -> Option<i64> {
        let sessions = read_session_files(&self.log_dir(), &mut Vec::new());
        sessions.get(SESSIONS[session]).and_then(|lines| {
            lines
                .iter()
                .filter(|l| parse_content(&l.line.content).is_some_and(|(_, k)| k.cycle < cycle))
                .map(|l| l.line.seq)
                .max()
        })
    }
}

/// One line of a session file and the file it is in.
struct FileLine {
    file: String,
    line: Line,
}

/// Every session's lines in seq order of its files: rotated files
/// (`<session>.<stamp>.<first>-<last>.log[.gz]`) by the first seq in their
/// name, then the `.logtmp`. Unreadable lines and rotated files whose name
/// does not match their first and last seq are reported in `problems`.
fn read_session_files(log_dir: &Path, problems: &mut Vec<String>) -> BTreeMap<String, Vec<FileLine>> {
    // (session, live?, first seq, gz?, name)
    let mut files: Vec<(String, bool, i64, bool, String)> = Vec::new();
    for e in std::fs::read_dir(log_dir).unwrap() {
        let e = e.unwrap();
        if !e.file_type().unwrap().is_file() {
            continue;
        }
        let name = e.file_name().into_string().unwrap();
        if let Some(session) = name.strip_suffix(".logtmp") {
            files.push((session.to_string(), true, 0, false, name));
            continue;
        }
        let (stem, gz) = match name.strip_suffix(".log.gz") {
            Some(s) => (s, true),
            None => match name.strip_suffix(".log") {
                Some(s) => (s, false),
                None => continue, // e.g. a `.gz.tmp` of an interrupted compression
            },
        };
        let parsed = stem.rsplit_once('.').and_then(|(rest, range)| {
            let (session, _stamp) = rest.rsplit_once('.')?;
            let (first, _last) = range.split_once('-')?;
            Some((session.to_string(), first.parse::<i64>().ok()?))
        });
        match parsed {
            Some((session, first)) => files.push((session, false, first, gz, name)),
            None => problems.push(format!("unexpected file name {name}")),
        }
    }
    files.sort();
    let mut out: BTreeMap<String, Vec<FileLine>> = BTreeMap::new();
    for (session, live, _, gz, name) in files {
        let path = log_dir.join(&name);
        let text = if gz {
            let o = std::process::Command::new("gzip")
                .arg("-dc")
                .arg(&path)
                .output()
                .expect("gzip");
            if !o.status.success() {
                problems.push(format!(
                    "{name}: gzip -dc failed: {}",
                    String::from_utf8_lossy(&o.stderr)
                ));
                continue;
            }
            String::from_utf8_lossy(&o.stdout).into_owned()
        } else {
            String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned()
        };
        let mut lines = Vec::new();
        for (i, l) in text.lines().enumerate() {
            match serde_json::from_str::<Line>(l) {
                Ok(line) => lines.push(FileLine {
                    file: name.clone(),
                    line,
                }),
                Err(e) => problems.push(format!("{name}:{}: bad line {:.80}: {e}", i + 1, l)),
            }
        }
        if !live {
            let range = name.trim_end_matches(".gz").trim_end_matches(".log");
            let range = range.rsplit_once('.').map_or("", |(_, r)| r);
            let want = format!(
                "{}-{}",
                lines.first().map_or(0, |l| l.line.seq),
                lines.last().map_or(0, |l| l.line.seq)
            );
            if range != want {
                problems.push(format!("{name}: holds seqs {want}"));
            }
        }
        out.entry(session).or_default().extend(lines);
    }
    out
}

/// A throwaway `redis-server` on a free loopback port (for the mirror).
struct Redis {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Redis {
    fn start() -> Redis {
        let dir = tempfile::Builder::new().prefix("logd-redis-").tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is needed to exercise mirror::after_xadd");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Redis {
            child,
            url: format!("redis://127.0.0.1:{port}"),
            _dir: dir,
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    let from = lines.len().saturating_sub(25);
    lines[from..].join("\n")
}

// ---------------------------------------------------------------------------
// The crash tests.

/// Every crash point: cycles that abort there (a random skip count, so at a
/// random moment; and skip 0, so at the first hit, which for some points is
/// inside the recovery pass), SIGKILLs between them, restarts alternating
/// with an offline `logd recover` (half of those with the point armed too),
/// then a clean stop and the verdict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_crash_point_keeps_acked_frames_exactly_once() {
    let mut run = Run::new("every_crash_point");
    let crash_cycles = 6 * soak_factor();
    for &point in CRASH_POINTS {
        let mut env = fast_env(&mut run.rng, needs_rotation(point));
        let redis = point.starts_with("mirror::").then(Redis::start);
        if let Some(r) = &redis {
            env.push(("REDIS_URL".into(), r.url.clone()));
        }
        let mut sc = run.scenario(point, env);
        let mut stuck = false;
        for i in 0..crash_cycles {
            // A SIGKILL; the point at a random moment (leaving its step
            // interrupted); the point at its first hit, which is inside the
            // recovery pass when recovery redoes that step.
            let crash = match i % 3 {
                0 => Crash::Kill(Duration::from_millis(sc.rng.range(50, 1500))),
                1 => Crash::Point {
                    name: point,
                    skip: skip_for(point, &mut sc.rng),
                },
                _ => Crash::Point { name: point, skip: 0 },
            };
            let recover = sc.recover_this_cycle();
            if sc.cycle(crash, recover).await.is_err() {
                stuck = true;
                break;
            }
        }
        if !stuck && sc.final_stop().await.is_ok() {
            sc.verify(true);
        }
        run.absorb(sc);
    }
    run.finish();
}

/// SIGKILL at random instants (50–1500 ms into the load), at least 20 per run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_sigkills_keep_acked_frames_exactly_once() {
    let mut run = Run::new("random_sigkills");
    let kills_per_scenario = 11 * soak_factor();
    for s in 0..2 {
        let env = fast_env(&mut run.rng, false);
        let mut sc = run.scenario(&format!("sigkill-{s}"), env);
        let mut stuck = false;
        for _ in 0..kills_per_scenario {
            let crash = Crash::Kill(Duration::from_millis(sc.rng.range(50, 1500)));
            let recover = sc.recover_this_cycle();
            if sc.cycle(crash, recover).await.is_err() {
                stuck = true;
                break;
            }
        }
        if !stuck && sc.final_stop().await.is_ok() {
            sc.verify(true);
        }
        run.absorb(sc);
    }
    run.finish();
}

/// Soak: random crash kinds (SIGKILL or any crash point) in scenarios of 12
/// cycles, until `LOGD_CRASH_SOAK_SECS` (default 600) have passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: minutes; run with --ignored"]
async fn soak_random_crashes() {
    let mut run = Run::new("soak_random_crashes");
    let secs: u64 = std::env::var("LOGD_CRASH_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let redis = Redis::start();
    let mut s = 0;
    while Instant::now() < deadline {
        let mut env = fast_env(&mut run.rng, false);
        env.push(("REDIS_URL".into(), redis.url.clone()));
        let mut sc = run.scenario(&format!("soak-{s}"), env);
        s += 1;
        let mut stuck = false;
        for _ in 0..12 {
            let crash = if sc.rng.chance(50) {
                Crash::Kill(Duration::from_millis(sc.rng.range(50, 1500)))
            } else {
                let name = CRASH_POINTS[sc.rng.below(CRASH_POINTS.len() as u64) as usize];
                Crash::Point {
                    name,
                    skip: skip_for(name, &mut sc.rng),
                }
            };
            let recover = sc.recover_this_cycle();
            if sc.cycle(crash, recover).await.is_err() {
                stuck = true;
                break;
            }
        }
        if !stuck && sc.final_stop().await.is_ok() {
            sc.verify(true);
        }
        run.absorb(sc);
    }
    run.finish();
}

/// The names of every `crash_point!("…")` under `dir` (recursively).
fn crash_points_in(dir: &Path, out: &mut BTreeMap<String, Vec<String>>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries {
        let path = e.unwrap().path();
        if path.is_dir() {
            crash_points_in(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            for (i, _) in text.match_indices("crash_point!(\"") {
                let rest = &text[i + "crash_point!(\"".len()..];
                let name = &rest[..rest.find('"').expect("closing quote")];
                out.entry(name.to_string())
                    .or_default()
                    .push(path.display().to_string());
            }
        }
    }
}

#[test]
fn crash_point_list_covers_every_crash_point_in_the_code() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut found = BTreeMap::new();
    for dir in ["src", "wal", "store", "recovery"] {
        crash_points_in(&root.join(dir), &mut found);
    }
    assert!(
        !found.is_empty(),
        "no crash_point!(\"…\") found under src/ wal/ store/ recovery/"
    );
    let missing: Vec<_> = found
        .iter()
        .filter(|(name, _)| !CRASH_POINTS.contains(&name.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "crash points not exercised by the crash harness (add them to CRASH_POINTS in tests/e2e/crash.rs, \
         and a skip range to skip_for): {missing:?}"
    );
    let stale: Vec<_> = CRASH_POINTS.iter().filter(|p| !found.contains_key(**p)).collect();
    assert!(
        stale.is_empty(),
        "CRASH_POINTS names crash points the code no longer has: {stale:?}"
    );
    println!("crash points covered: {:?}", found.keys().collect::<Vec<_>>());
}

/// The verdict itself is checked: a short clean scenario passes, then lines
/// removed, duplicated or re-sequenced by hand must each be reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_verifier_catches_a_lost_a_duplicated_and_a_resequenced_frame() {
    let mut run = Run::new("verifier_self_check");
    let mut env = fast_env(&mut run.rng, false);
    env.retain(|(k, _)| k != "LOG_MAX_SIZE_BYTES"); // one file per session
    let mut sc = run.scenario("verifier_self_check", env);
    let crash = Crash::Kill(Duration::from_millis(400));
    if sc.cycle(crash, false).await.is_ok() && sc.final_stop().await.is_ok() {
        sc.verify(true);
        assert!(sc.violations.is_empty(), "clean run: {:?}", sc.violations);
        let dir = sc.log_dir();
        let file = |s: &str| dir.join(format!("{s}.logtmp"));
        let expect = |sc: &mut Scenario, what: &str, needles: &[&str]| {
            sc.verify(true);
            let all = sc.violations.join("\n");
            for n in needles {
                assert!(all.contains(n), "{what}: no violation mentions {n:?}:\n{all}");
            }
            sc.violations.clear();
        };
        let edit = |path: &Path, f: &dyn Fn(&mut Vec<String>)| -> String {
            let orig = std::fs::read_to_string(path).unwrap();
            let mut lines: Vec<String> = orig.lines().map(|l| l.to_string()).collect();
            f(&mut lines);
            std::fs::write(path, lines.join("\n") + "\n").unwrap();
            orig
        };
        // An acked server-seq frame lost (its line removed).
        let orig = edit(&file("srv-0"), &|l| {
            l.remove(0);
        });
        expect(&mut sc, "lost line", &["LOST: 1 acked frame", "not 1..=n"]);
        std::fs::write(file("srv-0"), orig).unwrap();
        // A frame twice.
        let orig = edit(&file("cli-0"), &|l| {
            let last = l.last().unwrap().clone();
            l.push(last);
        });
        expect(&mut sc, "duplicated line", &["DUPLICATE", "not strictly increasing"]);
        std::fs::write(file("cli-0"), orig).unwrap();
        // A client-seq frame stored under another seq.
        let orig = edit(&file("cli-1"), &|l| {
            let last = l.pop().unwrap();
            let mut v: serde_json::Value = serde_json::from_str(&last).unwrap();
            v["seq"] = (v["seq"].as_i64().unwrap() + 1000).into();
            l.push(v.to_string());
        });
        expect(
            &mut sc,
            "re-sequenced line",
            &["sent with client seq", "acked with seq"],
        );
        std::fs::write(file("cli-1"), orig).unwrap();
        sc.verify(true);
        assert!(sc.violations.is_empty(), "restored: {:?}", sc.violations);
    }
    run.absorb(sc);
    run.finish();
}

// ---------------------------------------------------------------------------
// WAL damage.

/// One WAL record: where it is and which frame it holds.
#[derive(Debug, Clone)]
struct WalRec {
    segment: PathBuf,
    lsn: u64,
    offset: u64,
    /// Header + payload.
    bytes: u64,
    key: Option<Key>,
}

fn wal_dir(log_dir: &Path) -> PathBuf {
    log_dir.join(".logd/wal")
}

fn wal_segments(log_dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(wal_dir(log_dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    v.sort();
    v
}

/// Every readable record of the WAL, with its segment and byte range.
fn wal_records(log_dir: &Path) -> Vec<WalRec> {
    let segs: Vec<(u64, PathBuf)> = wal_segments(log_dir)
        .into_iter()
        .map(|p| {
            let stem = p.file_stem().unwrap().to_str().unwrap().to_string();
            (u64::from_str_radix(&stem, 16).unwrap(), p)
        })
        .collect();
    let mut out = Vec::new();
    wal::read_from(&wal::fs::RealFs, &wal_dir(log_dir), 0, RECORD_BYTES_MAX, |rec| {
        let segment = segs
            .iter()
            .rev()
            .find(|(first, _)| *first <= rec.lsn)
            .map(|(_, p)| p.clone())
            .expect("a segment holds the record");
        let key = <LogFrame as prost::Message>::decode(rec.payload)
            .ok()
            .and_then(|f| parse_content(&f.content))
            .map(|(_, k)| k);
        out.push(WalRec {
            segment,
            lsn: rec.lsn,
            offset: rec.offset,
            bytes: 17 + rec.payload.len() as u64,
            key,
        });
        Ok(())
    })
    .expect("reading the WAL before damaging it");
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WalDamage {
    AppendGarbage,
    TruncateMidRecord,
    FlipBitInLastRecord,
}

/// Loads with a long flush interval and SIGKILLs, until the last segment
/// holds at least `min_records` records; returns that segment's records.
async fn load_then_kill(sc: &mut Scenario, min_records: usize) -> Result<Vec<WalRec>, Stuck> {
    for _ in 0..6 {
        sc.cycle(Crash::KillAfterAcked(1500), false).await?;
        let recs = wal_records(&sc.log_dir());
        let last = wal_segments(&sc.log_dir()).pop().expect("a WAL segment");
        let in_last: Vec<WalRec> = recs.into_iter().filter(|r| r.segment == last).collect();
        if in_last.len() >= min_records {
            return Ok(in_last);
        }
    }
    sc.violation(format!("the last WAL segment never held {min_records} records"));
    Err(Stuck)
}

async fn wal_damage_test(test: &'static str, damage: WalDamage) {
    let mut run = Run::new(test);
    let mut sc = run.scenario(test, slow_flush_env());
    if let Ok(recs) = load_then_kill(&mut sc, 16).await {
        let seg = recs[0].segment.clone();
        let len = std::fs::metadata(&seg).unwrap().len();
        let last = recs.last().unwrap().clone();
        let (range, what) = match damage {
            WalDamage::AppendGarbage => {
                let n = sc.rng.range(1, 300) as usize;
                let garbage = sc.rng.bytes(n);
                let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
                std::io::Write::write_all(&mut f, &garbage).unwrap();
                (
                    len..len + garbage.len() as u64,
                    format!("appended {} garbage bytes", garbage.len()),
                )
            }
            WalDamage::TruncateMidRecord => {
                let r = &recs[sc.rng.range(recs.len() as u64 / 2, recs.len() as u64 - 1) as usize];
                let cut = r.offset + sc.rng.range(1, r.bytes - 1);
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&seg)
                    .unwrap()
                    .set_len(cut)
                    .unwrap();
                (
                    cut..len,
                    format!("truncated to {cut} (inside LSN {} at {})", r.lsn, r.offset),
                )
            }
            WalDamage::FlipBitInLastRecord => {
                let at = last.offset + sc.rng.below(last.bytes);
                let bit = sc.rng.below(8) as u8;
                flip_bit(&seg, at, bit);
                (
                    at..at + 1,
                    format!("flipped bit {bit} at {at} (last record, LSN {})", last.lsn),
                )
            }
        };
        let damaged: Vec<&WalRec> = recs
            .iter()
            .filter(|r| r.offset < range.end && range.start < r.offset + r.bytes)
            .collect();
        sc.history.push(format!(
            "damage to {}: {what}; {} record(s) overlap",
            seg.display(),
            damaged.len()
        ));
        sc.damaged.extend(damaged.iter().filter_map(|r| r.key));
        let after = Duration::from_millis(sc.rng.range(300, 700));
        let recover = sc.rng.chance(50);
        if sc.cycle(Crash::Stop(after), recover).await.is_ok() {
            if !sc.last_stderr.contains("torn WAL tail") && !sc.last_recover_out.contains("torn WAL tail") {
                sc.violation(format!(
                    "the restart (logd recover first: {recover}) did not report truncating a torn WAL tail"
                ));
            }
            // Server seqs stay gapless: the session files hold a prefix of
            // each session and the WAL a prefix of the records.
            sc.verify(true);
        }
    }
    run.absorb(sc);
    run.finish();
}

fn flip_bit(path: &Path, at: u64, bit: u8) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at as usize] ^= 1 << bit;
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_garbage_appended_to_the_last_segment_is_a_torn_tail() {
    wal_damage_test("wal_garbage_appended", WalDamage::AppendGarbage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_last_segment_truncated_mid_record_loses_only_the_cut_records() {
    wal_damage_test("wal_truncated_mid_record", WalDamage::TruncateMidRecord).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_bit_flip_in_the_last_record_loses_only_that_record() {
    wal_damage_test("wal_bit_flip_last_record", WalDamage::FlipBitInLastRecord).await;
}

/// Whether `v` has a key named `lost` (or holding `salvage`) with a non-empty value.
fn json_reports_loss(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Object(m) => m.iter().any(|(k, val)| {
            let named = k == "lost" || k.contains("salvage");
            let nonempty = match val {
                serde_json::Value::Array(a) => !a.is_empty(),
                serde_json::Value::Object(o) => !o.is_empty(),
                serde_json::Value::Number(n) => n.as_f64().is_some_and(|n| n > 0.0),
                serde_json::Value::String(s) => !s.is_empty(),
                serde_json::Value::Bool(b) => *b,
                serde_json::Value::Null => false,
            };
            (named && nonempty) || json_reports_loss(val)
        }),
        serde_json::Value::Array(a) => a.iter().any(json_reports_loss),
        _ => false,
    }
}

/// Files under `dir` (recursively) named `name`, except in `except`.
fn find_files_named(dir: &Path, name: &std::ffi::OsStr, except: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries {
        let path = e.unwrap().path();
        if path.is_dir() {
            if path != except {
                find_files_named(&path, name, except, out);
            }
        } else if path.file_name() == Some(name) {
            out.push(path);
        }
    }
}

/// A bit flip in an early record of the last segment, valid records after
/// it: mid-log corruption. `serve` refuses to start, `recover` exits 2, both
/// naming the place; `recover --salvage --json` keeps every readable record,
/// moves the damaged WAL aside and reports the loss; then the server starts
/// and only the damaged record's frame may be missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_bit_flip_in_an_early_record_needs_salvage() {
    let mut run = Run::new("wal_bit_flip_early_record");
    let mut sc = run.scenario("wal_bit_flip_early_record", slow_flush_env());
    if let Ok(recs) = load_then_kill(&mut sc, 24).await {
        let seg = recs[0].segment.clone();
        let seg_name = seg.file_name().unwrap().to_str().unwrap().to_string();
        let i = sc.rng.below(recs.len() as u64 / 2) as usize;
        let r = recs[i].clone();
        // A bit of the payload: the CRC fails, the length still leads to the
        // next (valid) record.
        let at = r.offset + 17 + sc.rng.below(r.bytes - 17);
        let bit = sc.rng.below(8) as u8;
        flip_bit(&seg, at, bit);
        let damaged_copy = std::fs::read(&seg).unwrap();
        sc.damaged.extend(r.key);
        sc.history.push(format!(
            "damage: flipped bit {bit} at {at} in {seg_name}: record {i} of {} (LSN {} at offset {})",
            recs.len(),
            r.lsn,
            r.offset
        ));
        let offset = r.offset.to_string();
        let env: Vec<(&str, &str)> = sc.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        match Server::try_start(&sc.log_dir(), &env) {
            Ok(mut s) => {
                s.kill9();
                sc.violation("logd serve started on a WAL with mid-log corruption".into());
            }
            Err(f) => {
                println!("serve refused: exit {:?}: {}", f.status, tail(&f.stderr));
                if f.status.is_none_or(|s| s.success()) {
                    sc.violation(format!("logd serve exit {:?}, want non-zero", f.status));
                }
                if !(f.stderr.contains(&seg_name) && f.stderr.contains(&offset)) {
                    sc.violation(format!(
                        "logd serve's error does not name {seg_name} and offset {offset}:\n{}",
                        tail(&f.stderr)
                    ));
                }
            }
        }
        let out = sc.logd(&["recover"]);
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!("recover: exit {:?}: {}", out.status.code(), tail(&said));
        if out.status.code() != Some(2) {
            sc.violation(format!(
                "logd recover exit {:?}, want 2:\n{}",
                out.status.code(),
                tail(&said)
            ));
        }
        if !(said.contains(&seg_name) && said.contains(&offset)) {
            sc.violation(format!(
                "logd recover does not name {seg_name} and offset {offset}:\n{}",
                tail(&said)
            ));
        }
        let out = sc.logd(&["recover", "--salvage", "--json"]);
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        println!(
            "recover --salvage --json: exit {:?}\nstdout: {stdout}\nstderr: {}",
            out.status.code(),
            tail(&String::from_utf8_lossy(&out.stderr))
        );
        if !out.status.success() {
            sc.violation(format!(
                "logd recover --salvage --json exit {:?}, want 0:\n{}",
                out.status.code(),
                tail(&String::from_utf8_lossy(&out.stderr))
            ));
        } else {
            match stdout
                .lines()
                .rev()
                .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            {
                None => sc.violation(format!("recover --salvage --json printed no JSON: {stdout}")),
                Some(j) => {
                    if !json_reports_loss(&j) {
                        sc.violation(format!("recover --salvage --json does not report the loss: {j}"));
                    }
                    // The damaged record is lost unless it was already in
                    // its session file (then salvage says so instead).
                    let count = |p: &str| j.pointer(p).and_then(|n| n.as_u64());
                    let lost = count("/salvage/records_lost");
                    let in_files = count("/salvage/records_in_session_files");
                    if lost.zip(in_files).is_none_or(|(l, f)| l + f != 1) {
                        sc.violation(format!(
                            "salvage reports {lost:?} records lost and {in_files:?} already in session files, \
                             one was damaged: {j}"
                        ));
                    }
                }
            }
            let mut copies = Vec::new();
            let state = sc.log_dir().join(".logd");
            find_files_named(&state, seg.file_name().unwrap(), &wal_dir(&sc.log_dir()), &mut copies);
            if !copies.iter().any(|p| std::fs::read(p).is_ok_and(|b| b == damaged_copy)) {
                sc.violation(format!(
                    "salvage did not keep the damaged segment {seg_name} (copies found: {copies:?})"
                ));
            }
            sc.history.push("logd recover --salvage --json: ok".into());
            if sc.final_stop().await.is_ok() {
                // A record lost mid-log may leave a gap in server seqs.
                sc.verify(false);
            }
        }
    }
    run.absorb(sc);
    run.finish();
}

// ---------------------------------------------------------------------------
// Metadata store damage: startup must rebuild it from the files and the WAL.

#[derive(Debug, Clone, Copy)]
enum MetaDamage {
    Delete,
    Garbage,
}

fn largest_file(dir: &Path) -> Option<(u64, PathBuf)> {
    let mut best: Option<(u64, PathBuf)> = None;
    for e in std::fs::read_dir(dir).ok()? {
        let path = e.unwrap().path();
        let cand = if path.is_dir() {
            largest_file(&path)
        } else {
            Some((std::fs::metadata(&path).unwrap().len(), path))
        };
        if let Some(c) = cand
            && best.as_ref().is_none_or(|b| c.0 > b.0)
        {
            best = Some(c);
        }
    }
    best
}

async fn meta_damage_test(test: &'static str, damage: MetaDamage) {
    let mut run = Run::new(test);
    let env = fast_env(&mut run.rng, false);
    let mut sc = run.scenario(test, env);
    let mut ok = true;
    for _ in 0..2 {
        let crash = Crash::Kill(Duration::from_millis(sc.rng.range(300, 1200)));
        let recover = sc.recover_this_cycle();
        if sc.cycle(crash, recover).await.is_err() {
            ok = false;
            break;
        }
    }
    if ok {
        let meta = sc.log_dir().join(".logd/meta");
        let what = match damage {
            MetaDamage::Delete => {
                std::fs::remove_dir_all(&meta).unwrap();
                format!("deleted {}", meta.display())
            }
            MetaDamage::Garbage => {
                let (len, path) = largest_file(&meta).expect("a file in the metadata store");
                let garbage = sc.rng.bytes(len.max(4096) as usize);
                std::fs::write(&path, garbage).unwrap();
                format!("overwrote {} ({len} bytes) with garbage", path.display())
            }
        };
        sc.history.push(format!("damage: {what}"));
        let final_cycle = sc.cycle;
        if sc.final_stop().await.is_ok() {
            let said: Vec<String> = sc
                .last_recover_out
                .lines()
                .chain(sc.last_stderr.lines())
                .filter(|l| l.contains("meta") || l.contains("rebuil"))
                .map(|l| l.to_string())
                .collect();
            println!("crash[{test}]: {what}; the restart said:\n  {}", said.join("\n  "));
            sc.verify(true);
            // The seqs assigned after the damage continue right after the
            // last one held before it.
            for (s, name) in SESSIONS.iter().enumerate().take(SERVER_SESSIONS) {
                let before = sc.max_seq_before(s, final_cycle).unwrap_or(0);
                let first_new = sc
                    .frames
                    .iter()
                    .filter(|(k, r)| k.cycle == final_cycle && r.session == s)
                    .filter_map(|(_, r)| r.ack_seq)
                    .min();
                if let Some(first) = first_new
                    && first != before + 1
                {
                    sc.violation(format!(
                        "{name}: first seq assigned after the damage is {first}, the files held up to {before}"
                    ));
                }
            }
        }
    }
    run.absorb(sc);
    run.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_store_deleted_is_rebuilt_and_seqs_continue() {
    meta_damage_test("meta_deleted", MetaDamage::Delete).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_store_file_overwritten_with_garbage_is_rebuilt_and_seqs_continue() {
    meta_damage_test("meta_garbage", MetaDamage::Garbage).await;
}
