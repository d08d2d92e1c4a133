//! `logd serve`: lock the state directory, run the recovery pass, start the
//! pipeline and the gRPC server, and stop in order on SIGINT/SIGTERM.
//!
//! Shutdown order (each step finishes before the next):
//! 1. the cancellation token tells every stream to stop reading, settle what
//!    it submitted, ack it and end with UNAVAILABLE; the listener closes;
//! 2. the commit thread commits and settles everything queued, then stops;
//! 3. the dispatcher hands the last frames to writers, each writer fdatasyncs
//!    and checkpoints; the store is flushed and materialized segments go.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use wal::fs::{Fs, RealFs};

use crate::config::ServeArgs;
use crate::ingest::{IngestStats, Sequencer};
use crate::materialize::Replayer;
use crate::meta::{MetaStore, SledMeta};
use crate::mirror::{MirrorConfig, MirrorStats, run_mirror};
use crate::pb::admin_service_server::AdminServiceServer;
use crate::pb::log_service_server::LogServiceServer;
use crate::service::{AdminSvc, BUDGET_UNIT_BYTES, LogSvc, Shared};
use crate::writer::{
    COMPRESS_QUEUE_MAX, DispatchStats, RotationLimits, WriterConfig, run_compression_pool, run_dispatcher,
};

/// Requests staged into one group commit at most.
const COMMIT_BATCH_REQUESTS_MAX: usize = 4096;
/// How long shutdown waits for streams to end before going on.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// An exclusive lock on a state directory, held for the process lifetime.
pub struct StateLock {
    _file: File,
    path: PathBuf,
}

impl StateLock {
    /// Takes `<state>/LOCK`, or fails naming who holds it.
    pub fn acquire(state_dir: &Path) -> anyhow::Result<StateLock> {
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("creating state directory {}", state_dir.display()))?;
        let path = state_dir.join("LOCK");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {
                file.set_len(0)?;
                std::io::Write::write_all(&mut &file, format!("{}\n", std::process::id()).as_bytes())?;
                Ok(StateLock { _file: file, path })
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                bail!(
                    "state directory {} is locked by another logd (pid {}); stop it first",
                    state_dir.display(),
                    holder.trim()
                )
            }
            Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("locking {}", path.display())),
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Opens the metadata store. When it cannot be opened (sled 0.34 has open
/// reports of stores that will not reopen after an abrupt stop), or when
/// `rebuild` asks for it, the directory is moved aside (never deleted) and a
/// fresh store is created; the recovery pass then rebuilds every checkpoint
/// from the session files and the WAL. Returns where the old store went.
pub fn open_meta(dir: &Path, rebuild: bool) -> anyhow::Result<(Arc<dyn MetaStore>, Option<PathBuf>)> {
    let failure = if rebuild {
        Some("rebuild requested".to_owned())
    } else {
        match std::panic::catch_unwind(|| SledMeta::open(dir)) {
            Ok(Ok(meta)) => return Ok((Arc::new(meta), None)),
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("sled panicked while opening".to_owned()),
        }
    };
    let mut aside = None;
    if dir.exists() {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let target = dir.with_file_name(format!("meta.broken-{stamp}"));
        std::fs::rename(dir, &target).with_context(|| format!("moving {} aside", dir.display()))?;
        aside = Some(target);
    }
    let why = failure.unwrap_or_default();
    error!(
        meta = %dir.display(),
        moved_to = ?aside,
        "metadata store unusable ({why}): rebuilding it from the session files and the WAL"
    );
    let meta = SledMeta::open(dir).with_context(|| format!("creating a fresh metadata store in {}", dir.display()))?;
    Ok((Arc::new(meta), aside))
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
        _ = term.recv() => info!("SIGTERM: shutting down"),
    }
}

/// Runs the service until a signal; returns after a clean shutdown.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    args.validate().map_err(anyhow::Error::msg)?;
    let store = &args.store;
    let fs: Arc<dyn Fs> = Arc::new(RealFs);
    std::fs::create_dir_all(&store.log_dir).with_context(|| format!("creating LOG_DIR {}", store.log_dir.display()))?;
    let _lock = StateLock::acquire(&store.state_dir())?;
    let (meta, _meta_aside) = open_meta(&store.meta_dir(), false)?;
    let wal_opts = store.wal_options().map_err(anyhow::Error::msg)?;
    let life = args.lifecycle.lifecycle();

    info!("recovery: replaying the WAL into session files");
    let (wal, report) = {
        let (fs, log_dir, meta, wal_dir) = (fs.clone(), store.log_dir.clone(), meta.clone(), store.wal_dir());
        tokio::task::spawn_blocking(move || {
            let mut replayer = Replayer::new(fs.clone(), &log_dir, meta).with_lifecycle(life);
            let out = recovery::run(fs, &wal_dir, wal_opts, &mut replayer, |_| {});
            let l = &replayer.lifecycle;
            if l.meta_rebuilt {
                warn!(events_reemitted = l.events_reemitted, compressions_queued = l.compressions_queued,
                    "recovery: the metadata store held no checkpoints; rebuilt it from the session files and the WAL");
            }
            if !l.rotations_finished.is_empty() || !l.compressions_finished.is_empty() {
                info!(rotations = ?l.rotations_finished, compressions = ?l.compressions_finished, "recovery: finished interrupted file steps");
            }
            out
        })
        .await??
    };
    if let Some(t) = &report.open.torn_tail {
        warn!(segment = %t.segment.display(), offset = t.offset, bytes = t.bytes, why = t.why, "recovery: truncated a torn WAL tail");
    }
    info!(
        records = report.records_read,
        replayed = report.records_replayed,
        skipped = report.records_skipped,
        segments_removed = report.segments_removed,
        ms = report.elapsed.as_millis() as u64,
        "recovery: done"
    );

    let budget_units_total = (args.inflight_bytes_max / BUDGET_UNIT_BYTES).max(1) as u32;
    let budget = Arc::new(Semaphore::new(budget_units_total as usize));
    let stats = Arc::new(IngestStats::default());
    let dispatch_stats = Arc::new(DispatchStats::default());
    let (to_dispatcher, dispatcher_rx) = mpsc::unbounded_channel();
    let start_lsn = wal.next_lsn();
    let segments = wal.segments();
    let wal_stats = wal.stats();
    let sequencer = Sequencer::new(meta.clone(), to_dispatcher, budget.clone(), stats.clone());
    let commit = wal::GroupCommit::start(wal, sequencer, COMMIT_BATCH_REQUESTS_MAX);
    let (compress_tx, compress_rx) = mpsc::channel(COMPRESS_QUEUE_MAX);
    let events_added = Arc::new(Notify::new());
    let writer_cfg = WriterConfig {
        fs: fs.clone(),
        log_dir: store.log_dir.clone(),
        meta: meta.clone(),
        flush_interval: Duration::from_millis(args.flush_interval_ms),
        limits: RotationLimits {
            file_bytes_max: args.max_size_bytes,
            file_age_max: Duration::from_secs(args.max_age_seconds),
            idle_timeout: Duration::from_secs(args.idle_timeout_seconds),
        },
        life,
        compress_tx,
        events_added: events_added.clone(),
        stats: dispatch_stats.clone(),
    };
    let pool = tokio::spawn(run_compression_pool(
        writer_cfg.clone(),
        compress_rx,
        args.compression_workers,
    ));
    let (control_tx, control_rx) = mpsc::channel(64);
    let dispatcher = tokio::spawn(run_dispatcher(
        writer_cfg,
        dispatcher_rx,
        control_rx,
        budget.clone(),
        segments.clone(),
        start_lsn,
    ));

    let shutdown = CancellationToken::new();
    let mirror_stats = Arc::new(MirrorStats::default());
    // Only now, after the recovery pass, may events go out.
    let mirror = args.lifecycle.redis_url.clone().map(|url| {
        let cfg = MirrorConfig {
            url,
            stream: args.lifecycle.redis_stream.clone(),
            maxlen: args.lifecycle.redis_stream_maxlen,
            encoding: args.lifecycle.redis_format,
            pubsub_channel: args.lifecycle.redis_pubsub_channel.clone(),
        };
        tokio::spawn(run_mirror(
            cfg,
            meta.clone(),
            events_added.clone(),
            shutdown.clone(),
            mirror_stats.clone(),
        ))
    });
    let shared = Shared {
        submitter: commit.submitter(),
        budget,
        budget_units_total,
        frame_bytes_max: store.max_frame_bytes,
        stats,
        dispatch: dispatch_stats,
        wal_stats,
        segments,
        shutdown: shutdown.clone(),
        control: control_tx,
        meta: meta.clone(),
        mirror: mirror_stats,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    println!("logd: listening on {addr}");
    info!(%addr, log_dir = %store.log_dir.display(), "serving");

    let log_svc =
        LogServiceServer::new(LogSvc { shared: shared.clone() }).max_decoding_message_size(args.max_message_bytes);
    let admin_svc = AdminServiceServer::new(AdminSvc { shared: shared.clone() });
    let token = shutdown.clone();
    let server = tonic::transport::Server::builder()
        .add_service(log_svc)
        .add_service(admin_svc)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            shutdown_signal().await;
            token.cancel();
        });
    let mut server = tokio::spawn(server);
    tokio::select! {
        res = &mut server => res?.context("gRPC server")?,
        _ = shutdown.cancelled() => match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
            Ok(res) => res?.context("gRPC server")?,
            Err(_) => warn!("streams still open after {SHUTDOWN_GRACE:?}; stopping anyway"),
        },
    }
    drop(shared);
    let (_wal, _sequencer) = tokio::task::spawn_blocking(move || commit.shutdown()).await?;
    drop(_sequencer); // closes the dispatcher's input
    dispatcher.await?; // drops the last compression-queue sender
    pool.await?;
    if let Some(m) = mirror {
        m.await?;
    }
    meta.flush().context("final metadata flush")?;
    info!("shutdown complete");
    Ok(())
}
