//! Deterministic power-loss simulation of logd's whole data path, running
//! the real pipeline code on a [`wal::sim::SimFs`] and a
//! [`store::SimMeta`], one step at a time, in an order a seeded PRNG
//! chooses:
//! - **ingest**: the real [`logd::pipeline::Sequencer`] stages requests into
//!   the real WAL, written as a batch (`write_step`) and made durable
//!   later (`sync_steps`, one fdatasync for several), so several written-but-unsynced batches wait
//!   while more are written and segments roll, as the pipelined commit
//!   threads do; settling answers the requests;
//! - **dispatcher**: [`logd::pipeline::writer::dispatch`] routes each durable batch
//!   (grouping, budget split, tracker), picks or starts the session's
//!   writer (succession: a writer that stopped taking frames drains while
//!   its successor waits), takes reports and removes WAL segments;
//! - **writers**: real [`logd::pipeline::writer::SessionWriter`] state machines, each
//!   stepped through its real [`logd::pipeline::writer::Step`]s (slots from a real
//!   [`logd::pipeline::OpenFiles`], blocking operations, checkpoint puts,
//!   retries), with flush ticks, age and idle times chosen by the PRNG;
//! - **checkpoint batcher**: the real [`logd::pipeline::CheckpointBatch`] core
//!   applies what writers put, in batches;
//! - **compression**: the real `run_compression`, jobs in the pool's order;
//! - **recovery**: the real `recovery::run` with a
//!   [`recovery::Replayer`], after every crash, twice.
//!
//! The test's own logic is only: choosing steps, faults and crashes, the
//! model of what was acked, and the checks ([`checks`]). The crash is a
//! **power cut** (`SimFs::crash`: every write and namespace op not fsynced
//! is kept, torn or dropped; the store keeps what was flushed and a prefix
//! of the rest) or a **kill** (the page cache survives; the store keeps a
//! prefix of its unflushed batches), between two steps, between a batch's
//! fdatasync and its settle, or (with the `failpoints` feature) exactly at
//! one of the code's crash points ([`plan::CRASH_POINTS`]). Some phases
//! inject I/O errors first (see [`plan::Fault`]). After every crash the
//! recovery pass runs, then a second one, and every invariant of
//! [`checks`] is verified.
//!
//! `LOGD_SIM_SEEDS=N` runs N seeds (default 2000) from `LOGD_SIM_SEED_START`
//! (default 0); `LOGD_SIM_SEED=S` runs seed S alone and prints its step log
//! (`-- --nocapture`). `LOGD_SIM_FAULTS=0` turns the I/O error phases off
//! (seeds consume the PRNG the same way either way).

mod checks;
mod plan;
mod world;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use world::{Stats, World};

const DEFAULT_SEEDS: u64 = 2000;

/// Written-but-unsynced batches the simulation lets pile up at most. The
/// real `wal-commit` thread never waits for `wal-sync` (`wal/src/group.rs`):
/// it writes whatever arrives while an fdatasync runs, and the next
/// `sync_steps` covers every batch written by then, so the real depth is
/// bounded only by the admission budget. Four is deep enough for a power
/// cut to keep, tear or drop each of several batches, and for one sync to
/// cover several of them.
const UNSYNCED_MAX: usize = 4;

fn run_seed(seed: u64, verbose: bool) -> (Result<(), String>, Stats, Vec<String>) {
    plan::arm(None);
    let mut world = World::new(seed, verbose);
    let result = catch_unwind(AssertUnwindSafe(|| world.run())).unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default();
        Err(format!("panicked: {msg}"))
    });
    plan::arm(None);
    (result, world.stats, world.log.take().unwrap_or_default())
}

/// Triage switches: `LOGD_SIM_FAULTS` (I/O error phases, on unless 0) and
/// `LOGD_SIM_UNSYNCED_MAX`: written batches waiting for their fdatasync at
/// most (default [`UNSYNCED_MAX`]).
pub struct Knobs {
    pub faults: bool,
    pub unsynced_max: usize,
}

pub fn knobs() -> &'static Knobs {
    static KNOBS: std::sync::OnceLock<Knobs> = std::sync::OnceLock::new();
    KNOBS.get_or_init(|| Knobs {
        faults: env_u64("LOGD_SIM_FAULTS") != Some(0),
        unsynced_max: env_u64("LOGD_SIM_UNSYNCED_MAX").map_or(UNSYNCED_MAX, |n| n.max(1) as usize),
    })
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a number")))
}

#[test]
fn power_loss_simulation() {
    plan::install_crash_points();
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
            assert!(
                stats.max_unsynced_batches == knobs().unsynced_max as u64
                    && (stats.coalesced_syncs > 0 || knobs().unsynced_max == 1)
                    && stats.successions > 0
                    && stats.slot_closes > 0,
                "{stats:?}"
            );
            if knobs().faults {
                // Every fault kind was injected, and each errseq path taken:
                // a writeback error seen first by the WAL's roll or by the
                // next process's recovery (other descriptions than the sync
                // step's), and a kill after a failed fsync followed, after a
                // restart and more work, by a power cut.
                assert!(
                    stats.fault_syncs > 0
                        && stats.fault_sync_bursts > 0
                        && stats.fault_write_bursts > 0
                        && stats.fault_writebacks > 0
                        && stats.writeback_wal > 0
                        && stats.writeback_logtmp > 0,
                    "{stats:?}"
                );
                assert!(
                    stats.roll_sync_failures > 0
                        && stats.recovery_saw_writeback_error > 0
                        && stats.kills_after_failed_sync > 0
                        && stats.power_cuts_after_failed_kill > 0,
                    "{stats:?}"
                );
            }
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
