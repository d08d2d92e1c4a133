//! `logd serve`: lock the state directory, run the recovery pass, start the
//! pipeline and the gRPC server, and stop in order on SIGINT/SIGTERM.
//!
//! Shutdown order (each step finishes before the next):
//! 1. the cancellation token tells every stream to stop reading, settle what
//!    it submitted, ack it and end with UNAVAILABLE; the listener closes;
//! 2. the commit thread commits and settles everything queued, then stops;
//! 3. the dispatcher hands the last frames to writers, each writer fdatasyncs
//!    and checkpoints; the store is flushed and materialized segments go.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use wal::fs::{Fs, RealFs};

pub(crate) mod disk;
pub(crate) mod lock;

use crate::config::ServeArgs;
use crate::grpc::auth::{Auth, TokenAuth, reload_tokens_on_sighup};
use crate::grpc::conn::limited_incoming;
use crate::grpc::service::{AdminSvc, BUDGET_UNIT_BYTES, LogSvc, Ready, Shared};
use crate::outbox::mirror::{MirrorConfig, run_mirror};
use crate::pb::admin_service_server::AdminServiceServer;
use crate::pb::log_service_server::LogServiceServer;
use crate::pipeline::sequencer::Sequencer;
use crate::pipeline::writer::{COMPRESS_QUEUE_MAX, RotationLimits, WriterConfig, run_compression_pool, run_dispatcher};
use crate::telemetry::prometheus::Metrics;
use crate::telemetry::stats::{DispatchStats, IngestStats, MirrorStats};
use disk::{DiskWatch, watch_disk};
use lock::{StateLock, create_dir_durably};

/// Requests staged into one group commit at most.
const COMMIT_BATCH_REQUESTS_MAX: usize = 4096;
/// How long shutdown waits for streams to end before going on.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Makes every panic in `logd serve` end the process: the message (and
/// backtrace, per `RUST_BACKTRACE`) is printed, logged, and the process
/// aborts. Without it a panic would end only its thread or task (the commit
/// thread, the sync thread, a writer, the compression pool...) and leave
/// the rest serving: requests would queue forever with health SERVING. A
/// supervisor restarts logd and recovery decides from the disk. Installed
/// only by `serve`, so library tests keep the default hook.
fn install_fail_stop_panic_hook() {
    let print = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        print(info);
        if recovery::panic_expected() {
            return;
        }
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        error!(
            thread = name,
            "panic: {info}; logd aborts so that a restart recovers from what is on disk"
        );
        std::process::abort();
    }));
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
        _ = term.recv() => info!("SIGTERM: shutting down"),
    }
}

fn tls_config(args: &ServeArgs) -> anyhow::Result<Option<tonic::transport::ServerTlsConfig>> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let identity = tonic::transport::Identity::from_pem(read(cert)?, read(key)?);
    let mut tls = tonic::transport::ServerTlsConfig::new()
        .identity(identity)
        .timeout(Duration::from_millis(args.handshake_timeout_ms));
    if let Some(ca) = &args.tls_client_ca {
        tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?));
    }
    Ok(Some(tls))
}

/// Raises the soft open-file limit to the hard one: every active session
/// holds a file, so the common default of 1024 (or 256) is too low.
fn raise_nofile_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let wanted = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0 {
                info!(from = lim.rlim_cur, to = lim.rlim_max, "raised the open-file limit");
            }
        }
    }
}

/// Runs the service until a signal; returns after a clean shutdown.
///
/// The port opens first, with `grpc.health.v1.Health` reporting NOT_SERVING
/// and the log services answering UNAVAILABLE, while the recovery pass runs;
/// only then do they serve.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    install_fail_stop_panic_hook();
    args.validate().map_err(anyhow::Error::msg)?;
    let store = &args.store;
    wal::fs::set_file_mode(args.file_mode);
    raise_nofile_limit();
    crate::telemetry::fds::init_fd_count();
    let open_files_max = args
        .open_files_max
        .unwrap_or_else(crate::pipeline::openfiles::default_open_files_max);
    let nofile = crate::pipeline::openfiles::nofile_limit();
    if open_files_max as u64 + 64 > nofile {
        warn!(
            open_files_max,
            nofile,
            "LOGD_OPEN_FILES_MAX leaves fewer than 64 descriptors of RLIMIT_NOFILE for the WAL, the metadata store and connections"
        );
    }
    info!(open_files_max, nofile, "session files open at once, at most");
    let fs: Arc<dyn Fs> = Arc::new(RealFs);
    create_dir_durably(&store.log_dir).with_context(|| format!("creating LOG_DIR {}", store.log_dir.display()))?;
    let state_dir = store.state_dir();
    let _lock = StateLock::acquire(&state_dir)?;
    std::fs::set_permissions(&state_dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .with_context(|| format!("chmod 0700 {}", state_dir.display()))?;
    let auth = Auth(args.auth_token_file.as_deref().map(TokenAuth::from_file).transpose()?);
    // Installed before the port opens: from then on SIGHUP reloads tokens
    // and never takes its default action (terminating logd).
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).context("SIGHUP handler")?;
    let tls = tls_config(&args)?;
    let metrics = Arc::new(Metrics::new());
    let shutdown = CancellationToken::new();
    // Cancelled when the WAL, the metadata store or a session file fails
    // for good (not a transient shortage): logd then stops with exit code 1.
    let fatal = CancellationToken::new();

    // The ports open before recovery, so health checks see NOT_SERVING.
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    let metrics_server = if args.metrics_listen != "off" {
        let l = tokio::net::TcpListener::bind(&args.metrics_listen)
            .await
            .with_context(|| format!("binding LOGD_METRICS_LISTEN {}", args.metrics_listen))?;
        println!("logd: metrics on {}", l.local_addr()?);
        Some(tokio::spawn(crate::telemetry::prometheus::serve(
            l,
            metrics.clone(),
            shutdown.clone(),
        )))
    } else {
        None
    };
    let (health_reporter, health_svc) = tonic_health::server::health_reporter();
    health_reporter.set_not_serving::<LogServiceServer<LogSvc>>().await;
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;
    let ready = Ready::default();
    let log_svc =
        LogServiceServer::new(LogSvc { ready: ready.clone() }).max_decoding_message_size(args.max_message_bytes);
    let admin_svc = AdminServiceServer::new(AdminSvc { ready: ready.clone() });
    let mut builder = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(args.max_concurrent_streams))
        .http2_keepalive_interval(Some(Duration::from_secs(args.http2_keepalive_seconds)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .tcp_keepalive(Some(Duration::from_secs(60)))
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(16 << 20));
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).context("TLS configuration")?;
    }
    let auth_for_reload = auth.0.clone();
    let token = shutdown.clone();
    let reporter = health_reporter.clone();
    let wal_failed = fatal.clone();
    let server = builder
        // Open (no token), but its requests end the handshake timeout.
        .add_service(tonic::service::interceptor::InterceptedService::new(
            health_svc,
            Auth(None),
        ))
        // Reflection describes the services: behind the token like them.
        // Health stays open for load balancers and probes.
        .add_service(tonic::service::interceptor::InterceptedService::new(
            reflection,
            auth.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            log_svc,
            auth.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(admin_svc, auth))
        .serve_with_incoming_shutdown(
            limited_incoming(
                listener,
                args.max_connections,
                Duration::from_millis(args.handshake_timeout_ms),
                metrics.errors.with_label_values(&["handshake_timeout"]),
            ),
            async move {
                tokio::select! {
                    _ = shutdown_signal() => {}
                    _ = wal_failed.cancelled() => {}
                }
                reporter
                    .set_service_status("", tonic_health::ServingStatus::NotServing)
                    .await;
                reporter.set_not_serving::<LogServiceServer<LogSvc>>().await;
                token.cancel();
            },
        );
    let mut server = tokio::spawn(server);
    let reloader = tokio::spawn(reload_tokens_on_sighup(hup, auth_for_reload, shutdown.clone()));
    // Scripts and tests wait for "listening on"; it is printed once the
    // service is ready. Health checks can reach the port before that.
    println!("logd: recovering on {addr}");
    info!(%addr, log_dir = %store.log_dir.display(), tls = args.tls_cert.is_some(), "listening; recovering before serving");

    let pass_opts = recovery::PassOptions {
        fs: fs.clone(),
        log_dir: store.log_dir.clone(),
        wal_dir: store.wal_dir(),
        meta_dir: store.meta_dir(),
        wal: store.wal_options().map_err(anyhow::Error::msg)?,
        lifecycle: args.lifecycle.lifecycle(),
        files_open_max: open_files_max,
        dry_run: false,
        salvage: false,
        rebuild_meta: false,
        finish_compressions: false,
    };
    let life = pass_opts.lifecycle;
    let pass = tokio::task::spawn_blocking(move || recovery::run_pass(pass_opts, |_| {}))
        .await?
        .map_err(|e| {
            let integrity = e.is_integrity();
            let e = anyhow::Error::new(e);
            if integrity {
                e.context(
                    "refusing to start: the WAL is damaged in the middle. Next: `logd recover --dry-run` \
                     (changes nothing) to see the damage, then `logd recover --salvage` (add --dry-run first \
                     to see what it would keep and lose) to keep every readable record, move the damaged WAL \
                     aside and report what was lost",
                )
            } else {
                e
            }
        })?;
    let recovery::Pass {
        wal,
        report,
        replayer,
        meta,
        meta_moved_aside_to,
        ..
    } = pass;
    let wal = wal.expect("a live pass returns the WAL");
    if meta_moved_aside_to.is_some() {
        metrics.meta_rebuilds.inc();
    }
    let l = &replayer.lifecycle;
    if l.meta_rebuilt {
        metrics.meta_rebuilds.inc();
        warn!(
            events_reemitted = l.events_reemitted,
            compressions_queued = l.compressions_queued,
            "recovery: the metadata store held no checkpoints; rebuilt it from the session files and the WAL"
        );
    }
    let foreign_moved_in_recovery = l.foreign_files_moved.len() as u64;
    if !l.foreign_files_moved.is_empty() {
        error!(moved_to = ?l.foreign_files_moved, "recovery: moved foreign files found at session file names aside (symbolic links, non-regular files, or files without a line of logd's); they were not written through");
    }
    if !l.empty_files_removed.is_empty() {
        info!(files = ?l.empty_files_removed, "recovery: removed empty session files without frames");
    }
    if !l.rotations_finished.is_empty() || !l.compressions_finished.is_empty() {
        info!(rotations = ?l.rotations_finished, compressions = ?l.compressions_finished, events = l.events_recorded, "recovery: finished interrupted file steps");
    }
    let left = replayer.compressions_left();
    if !left.is_empty() {
        info!(files = ?left, "recovery: {} compression(s) left for the compression pool", left.len());
    }
    if let Some(t) = &report.open.torn_tail {
        warn!(segment = %t.segment.display(), offset = t.offset, bytes = t.bytes, why = t.why, "recovery: truncated a torn WAL tail");
    }
    metrics
        .recovery_records
        .with_label_values(&["read"])
        .set(report.records_read as i64);
    metrics
        .recovery_records
        .with_label_values(&["replayed"])
        .set(report.records_replayed as i64);
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
    dispatch_stats
        .foreign_files_moved
        .store(foreign_moved_in_recovery, Ordering::Relaxed);
    let (to_dispatcher, dispatcher_rx) = mpsc::unbounded_channel();
    let start_lsn = wal.next_lsn();
    let segments = wal.segments();
    let wal_stats = wal.stats();
    let sequencer = Sequencer::new(meta.clone(), to_dispatcher, budget.clone(), stats.clone())
        .with_metrics(metrics.clone())
        .with_fatal(fatal.clone())
        .with_cache_max(args.seq_cache_sessions_max);
    let commit = wal::GroupCommit::start(wal, sequencer, COMMIT_BATCH_REQUESTS_MAX);
    let (compress_tx, compress_rx) = mpsc::channel(COMPRESS_QUEUE_MAX);
    let events_added = Arc::new(Notify::new());
    let active_sessions = Arc::new(crate::pipeline::sessions::ActiveSessions::new(args.sessions_active_max));
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
        budget: budget.clone(),
        checkpoints: crate::pipeline::checkpoints::CheckpointBatcher::start(meta.clone()),
        active: active_sessions.clone(),
        outbox_events_max: args.outbox_events_max,
        open_files: crate::pipeline::openfiles::OpenFiles::new(open_files_max),
        fatal: fatal.clone(),
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
        segments.clone(),
        start_lsn,
    ));
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
    metrics.set_sources(
        stats.clone(),
        dispatch_stats.clone(),
        wal_stats.clone(),
        segments.clone(),
        mirror_stats.clone(),
        meta.clone(),
    );
    let disk_low = Arc::new(AtomicBool::new(false));
    let disk_watch = DiskWatch::new(
        vec![("wal", store.wal_dir()), ("logs", store.log_dir.clone())],
        args.disk_free_min_percent,
        args.disk_free_min_bytes,
        disk_low.clone(),
        metrics.clone(),
    );
    // Checked once before the first frame can arrive: the flag must not
    // start "enough space" on a full disk while the watcher task is not yet
    // scheduled (an e2e test raced it under load).
    disk_watch.check();
    let watcher = tokio::spawn(watch_disk(disk_watch, shutdown.clone()));
    let inflight = {
        let (budget, metrics, stop) = (budget.clone(), metrics.clone(), shutdown.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let used = budget_units_total as usize - budget.available_permits().min(budget_units_total as usize);
                metrics.inflight_bytes.set((used * BUDGET_UNIT_BYTES) as i64);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    ready.set(Shared {
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
        metrics: metrics.clone(),
        disk_low,
        stream_blocked_max: Duration::from_millis(args.stream_blocked_max_ms),
        stream_idle_timeout: Duration::from_secs(args.stream_idle_timeout_seconds),
        active_sessions,
        idle_timeout: Duration::from_secs(args.idle_timeout_seconds),
        rotations_wait,
        log_dir: store.log_dir.clone(),
    });
    if !shutdown.is_cancelled() {
        health_reporter.set_serving::<LogServiceServer<LogSvc>>().await;
        health_reporter
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        info!("serving");
    }
    println!("logd: listening on {addr}");

    tokio::select! {
        res = &mut server => res?.context("gRPC server")?,
        _ = shutdown.cancelled() => match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
            Ok(res) => res?.context("gRPC server")?,
            Err(_) => warn!("streams still open after {SHUTDOWN_GRACE:?}; stopping anyway"),
        },
    }
    shutdown.cancel();
    drop(ready);
    let (_wal, sequencer) = tokio::task::spawn_blocking(move || commit.shutdown()).await?;
    drop(sequencer); // closes the dispatcher's input
    dispatcher.await?;
    pool_stop.cancel(); // running jobs finish; queued ones stay in the store
    pool.await?;
    if let Some(m) = mirror {
        m.await?;
    }
    watcher.await?;
    reloader.await?;
    inflight.await?;
    if let Some(m) = metrics_server {
        m.await??;
    }
    meta.flush().context("final metadata flush")?;
    if fatal.is_cancelled() {
        anyhow::bail!(
            "the write-ahead log, the metadata store or a session file failed (see the log above); stopped so \
             that a restart recovers from what is on disk"
        );
    }
    info!("shutdown complete");
    Ok(())
}
