//! Starting the pipeline after recovery: the sequencer on the WAL's group
//! commit, the dispatcher and its writers, the compression pool, and the
//! tasks beside them (Redis mirror, disk watch, in-flight gauge); and
//! stopping them in order.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use store::MetaStore;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::disk::{DiskWatch, watch_disk};
use super::recover::Recovered;
use super::{COMMIT_BATCH_REQUESTS_MAX, Lifelines, State};
use crate::config::ServeArgs;
use crate::grpc::service::{BUDGET_UNIT_BYTES, EdgeLimits, Shared};
use crate::outbox::mirror::{MirrorConfig, run_mirror};
use crate::pipeline::Sequencer;
use crate::pipeline::writer::{
    COMPRESS_QUEUE_MAX, RotationLimits, Settings, WriterConfig, run_compression_pool, run_dispatcher,
};
use crate::telemetry::prometheus::Metrics;
use crate::telemetry::stats::{DispatchStats, IngestStats, MirrorStats};

/// The running pipeline, in the order it stops.
pub(super) struct Pipeline {
    commit: wal::GroupCommit<Sequencer>,
    dispatcher: JoinHandle<()>,
    pool: JoinHandle<()>,
    pool_stop: CancellationToken,
    mirror: Option<JoinHandle<()>>,
    watcher: JoinHandle<()>,
    inflight: JoinHandle<()>,
    meta: Arc<dyn MetaStore>,
}

/// Starts the pipeline on the recovered WAL and store; returns it and what
/// the gRPC services serve with.
pub(super) fn start_pipeline(
    args: &ServeArgs,
    state: &State,
    recovered: Recovered,
    metrics: &Arc<Metrics>,
    lifelines: &Lifelines,
) -> (Pipeline, Shared) {
    let (wal, meta) = (recovered.wal, recovered.meta);
    let budget_units_total = (args.inflight_bytes_max / BUDGET_UNIT_BYTES).max(1) as u32;
    let budget = Arc::new(Semaphore::new(budget_units_total as usize));
    let stats = Arc::new(IngestStats::default());
    let dispatch_stats = Arc::new(DispatchStats::default());
    dispatch_stats
        .foreign_files_moved
        .store(recovered.foreign_files_moved, Ordering::Relaxed);
    let (start_lsn, segments, wal_stats) = (wal.next_lsn(), wal.segments(), wal.stats());
    let (commit, dispatcher_rx) = start_commit(args, wal, &meta, &budget, &stats, metrics, lifelines);
    let events_added = Arc::new(Notify::new());
    let active_sessions = Arc::new(crate::pipeline::sessions::ActiveSessions::new(args.sessions_active_max));
    let writers = start_writers(
        args,
        state,
        WriterShared {
            meta: meta.clone(),
            events_added: events_added.clone(),
            stats: dispatch_stats.clone(),
            budget: budget.clone(),
            active: active_sessions.clone(),
        },
        dispatcher_rx,
        (segments.clone(), start_lsn),
        lifelines,
    );
    let (mirror, mirror_stats) = start_mirror(args, &meta, &events_added, &lifelines.shutdown);
    metrics.set_sources(
        stats.clone(),
        dispatch_stats.clone(),
        wal_stats.clone(),
        segments.clone(),
        mirror_stats.clone(),
        meta.clone(),
    );
    let (watcher, disk_low) = start_disk_watch(args, metrics, &lifelines.shutdown);
    let inflight = start_inflight_gauge(&budget, budget_units_total, metrics, &lifelines.shutdown);
    let shared = Shared {
        submitter: commit.submitter(),
        budget,
        budget_units_total,
        stats,
        dispatch: dispatch_stats,
        wal_stats,
        segments,
        shutdown: lifelines.shutdown.clone(),
        control: writers.control,
        meta: meta.clone(),
        mirror: mirror_stats,
        metrics: metrics.clone(),
        disk_low,
        active_sessions,
        rotations_wait: writers.rotations_wait,
        limits: edge_limits(args),
    };
    let pipeline = Pipeline {
        commit,
        dispatcher: writers.dispatcher,
        pool: writers.pool,
        pool_stop: writers.pool_stop,
        mirror,
        watcher,
        inflight,
        meta,
    };
    (pipeline, shared)
}

/// The sequencer on the WAL's group commit (the wal-commit and wal-sync
/// threads); returns it and the dispatcher's input of durable frames.
fn start_commit(
    args: &ServeArgs,
    wal: wal::Wal,
    meta: &Arc<dyn MetaStore>,
    budget: &Arc<Semaphore>,
    stats: &Arc<IngestStats>,
    metrics: &Arc<Metrics>,
    lifelines: &Lifelines,
) -> (
    wal::GroupCommit<Sequencer>,
    mpsc::UnboundedReceiver<crate::pipeline::Durable>,
) {
    let (to_dispatcher, dispatcher_rx) = mpsc::unbounded_channel();
    let sequencer = Sequencer::new(meta.clone(), to_dispatcher, budget.clone(), stats.clone())
        .with_metrics(metrics.clone())
        .with_fatal(lifelines.fatal.clone())
        .with_cache_max(args.seq_cache_sessions_max);
    let commit = wal::GroupCommit::start(wal, sequencer, COMMIT_BATCH_REQUESTS_MAX);
    (commit, dispatcher_rx)
}

/// What the writers share with the rest of the pipeline.
struct WriterShared {
    meta: Arc<dyn MetaStore>,
    events_added: Arc<Notify>,
    stats: Arc<DispatchStats>,
    budget: Arc<Semaphore>,
    active: Arc<crate::pipeline::sessions::ActiveSessions>,
}

/// The dispatcher, its writers and the compression pool, running.
struct Writers {
    dispatcher: JoinHandle<()>,
    pool: JoinHandle<()>,
    pool_stop: CancellationToken,
    /// Why rotations wait now (the outbox is full), if they do.
    rotations_wait: Arc<dyn Fn() -> Option<String> + Send + Sync>,
    /// Requests to the dispatcher (`Rotate`).
    control: mpsc::Sender<crate::pipeline::writer::Control>,
}

/// Starts the compression pool and the dispatcher, which starts a writer per
/// session as frames arrive from the commit thread.
fn start_writers(
    args: &ServeArgs,
    state: &State,
    shared: WriterShared,
    dispatcher_rx: mpsc::UnboundedReceiver<crate::pipeline::Durable>,
    (segments, start_lsn): (wal::Segments, u64),
    lifelines: &Lifelines,
) -> Writers {
    let (compress_tx, compress_rx) = mpsc::channel(COMPRESS_QUEUE_MAX);
    let writer_cfg = WriterConfig {
        settings: Settings {
            fs: state.fs.clone(),
            log_dir: args.store.log_dir.clone(),
            meta: shared.meta.clone(),
            limits: RotationLimits {
                file_bytes_max: args.max_size_bytes,
                file_age_max: Duration::from_secs(args.max_age_seconds),
                idle_timeout: Duration::from_secs(args.idle_timeout_seconds),
            },
            life: args.lifecycle.lifecycle(),
            outbox_events_max: args.outbox_events_max,
            stats: shared.stats,
        },
        flush_interval: Duration::from_millis(args.flush_interval_ms),
        compress_tx,
        checkpoints: crate::pipeline::checkpoints::CheckpointBatcher::start(shared.meta),
        events_added: shared.events_added,
        budget: shared.budget,
        active: shared.active,
        open_files: crate::pipeline::openfiles::OpenFiles::new(state.open_files_max),
        fatal: lifelines.fatal.clone(),
    };
    let pool_stop = CancellationToken::new();
    let pool = tokio::spawn(run_compression_pool(
        writer_cfg.clone(),
        compress_rx,
        args.compression_workers,
        Duration::from_millis(args.compression_sweep_interval_ms),
        pool_stop.clone(),
    ));
    let rotations_wait = {
        let cfg = writer_cfg.clone();
        Arc::new(move || crate::pipeline::writer::outbox_full(&cfg)) as Arc<dyn Fn() -> Option<String> + Send + Sync>
    };
    let (control_tx, control_rx) = mpsc::channel(64);
    let dispatcher = tokio::spawn(run_dispatcher(
        writer_cfg,
        dispatcher_rx,
        control_rx,
        segments,
        start_lsn,
    ));
    Writers {
        dispatcher,
        pool,
        pool_stop,
        rotations_wait,
        control: control_tx,
    }
}

/// The limits the gRPC edge enforces.
fn edge_limits(args: &ServeArgs) -> EdgeLimits {
    EdgeLimits {
        frame_bytes_max: args.store.max_frame_bytes,
        stream_blocked_max: Duration::from_millis(args.stream_blocked_max_ms),
        stream_idle_timeout: Duration::from_secs(args.stream_idle_timeout_seconds),
        idle_timeout: Duration::from_secs(args.idle_timeout_seconds),
        log_dir: args.store.log_dir.clone(),
    }
}

/// The Redis mirror, when `REDIS_URL` is set, and its counters. Only now,
/// after the recovery pass, may events go out.
fn start_mirror(
    args: &ServeArgs,
    meta: &Arc<dyn MetaStore>,
    events_added: &Arc<Notify>,
    shutdown: &CancellationToken,
) -> (Option<JoinHandle<()>>, Arc<MirrorStats>) {
    let stats = Arc::new(MirrorStats::default());
    let Some(url) = args.lifecycle.redis_url.clone() else {
        return (None, stats);
    };
    let cfg = MirrorConfig {
        url,
        stream: args.lifecycle.redis_stream.clone(),
        maxlen: args.lifecycle.redis_stream_maxlen,
        encoding: args.lifecycle.redis_format,
        pubsub_channel: args.lifecycle.redis_pubsub_channel.clone(),
        instance: args.instance_name().expect("validated at start"),
    };
    let task = tokio::spawn(run_mirror(
        cfg,
        meta.clone(),
        events_added.clone(),
        shutdown.clone(),
        stats.clone(),
    ));
    (Some(task), stats)
}

/// The free-space watermark on the WAL's and the log directory's
/// filesystems; returns the watcher and the flag it sets while space is low.
fn start_disk_watch(
    args: &ServeArgs,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
) -> (JoinHandle<()>, Arc<AtomicBool>) {
    let disk_low = Arc::new(AtomicBool::new(false));
    let disk_watch = DiskWatch::new(
        vec![("wal", args.store.wal_dir()), ("logs", args.store.log_dir.clone())],
        args.disk_free_min_percent,
        args.disk_free_min_bytes,
        disk_low.clone(),
        metrics.clone(),
    );
    // Checked once before the first frame can arrive: the flag must not
    // start "enough space" on a full disk while the watcher task is not yet
    // scheduled (an e2e test raced it under load).
    disk_watch.check();
    (tokio::spawn(watch_disk(disk_watch, shutdown.clone())), disk_low)
}

/// `logd_inflight_bytes`: the admission budget in use, every 500 ms.
fn start_inflight_gauge(
    budget: &Arc<Semaphore>,
    units_total: u32,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
) -> JoinHandle<()> {
    let (budget, metrics, stop) = (budget.clone(), metrics.clone(), shutdown.clone());
    tokio::spawn(async move {
        while !stop.is_cancelled() {
            let used = units_total as usize - budget.available_permits().min(units_total as usize);
            metrics.inflight_bytes.set((used * BUDGET_UNIT_BYTES) as i64);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}

impl Pipeline {
    /// Stops in order: the commit thread settles everything queued; the
    /// dispatcher hands the last frames to writers, which fdatasync and
    /// checkpoint; the compression pool finishes running jobs (queued ones
    /// stay in the store); the side tasks end. Returns the store, for the
    /// final flush.
    pub async fn shut_down(self) -> anyhow::Result<Arc<dyn MetaStore>> {
        let commit = self.commit;
        let (_wal, sequencer) = tokio::task::spawn_blocking(move || commit.shutdown()).await?;
        drop(sequencer); // closes the dispatcher's input
        self.dispatcher.await?;
        self.pool_stop.cancel(); // running jobs finish; queued ones stay in the store
        self.pool.await?;
        if let Some(m) = self.mirror {
            m.await?;
        }
        self.watcher.await?;
        self.inflight.await?;
        Ok(self.meta)
    }
}
