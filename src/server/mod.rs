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
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use wal::fs::{Fs, RealFs};

pub(crate) mod disk;
mod edge;
pub(crate) mod lock;
mod recover;
mod start;

use crate::config::ServeArgs;
use crate::telemetry::console::outln;
use crate::telemetry::prometheus::Metrics;
use edge::{Edge, EdgeSetup, start_edge};
use lock::{StateLock, create_dir_durably};
use recover::recover;
use start::{Pipeline, start_pipeline};

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

/// Tokens every stage watches.
#[derive(Clone)]
pub(crate) struct Lifelines {
    /// Cancelled on SIGINT/SIGTERM or a fatal failure: streams settle and
    /// end, the side tasks stop.
    pub shutdown: CancellationToken,
    /// Cancelled when the WAL, the metadata store or a session file fails
    /// for good (not a transient shortage): logd then stops with exit code 1.
    pub fatal: CancellationToken,
}

/// The state directory, locked, and the process set up for serving.
pub(crate) struct State {
    /// The filesystem every stage writes through.
    pub fs: Arc<dyn Fs>,
    /// Session files open at once, at most.
    pub open_files_max: usize,
    _lock: StateLock,
}

/// Runs the service until a signal; returns after a clean shutdown.
///
/// The port opens first, with `grpc.health.v1.Health` reporting NOT_SERVING
/// and the log services answering UNAVAILABLE, while the recovery pass runs;
/// only then do they serve.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    install_fail_stop_panic_hook();
    args.validate().map_err(anyhow::Error::msg)?;
    let state = open_state(&args)?;
    let edge_setup = EdgeSetup::prepare(&args)?;
    let metrics = Arc::new(Metrics::new());
    metrics.set_instance(&args.instance_name().map_err(anyhow::Error::msg)?);
    let lifelines = Lifelines {
        shutdown: CancellationToken::new(),
        fatal: CancellationToken::new(),
    };
    // The ports open before recovery, so health checks see NOT_SERVING.
    let edge = start_edge(&args, edge_setup, &metrics, &lifelines).await?;
    // Scripts and tests wait for "listening on"; it is printed once the
    // service is ready. Health checks can reach the port before that.
    let addr = edge.addr;
    outln!("logd: recovering on {addr}");
    info!(%addr, log_dir = %args.store.log_dir.display(), tls = args.tls_cert.is_some(), "listening; recovering before serving");
    let recovered = recover(&args, &state, &metrics).await?;
    let (pipeline, shared) = start_pipeline(&args, &state, recovered, &metrics, &lifelines);
    edge.set_ready(shared, &lifelines.shutdown).await;
    outln!("logd: listening on {addr}");
    shut_down(edge, pipeline, &lifelines).await
}

/// Prepares the process (file mode, descriptor limits) and takes the state
/// directory: creates `LOG_DIR` and the state directory, locks it, 0700.
fn open_state(args: &ServeArgs) -> anyhow::Result<State> {
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
    create_dir_durably(&store.log_dir).with_context(|| format!("creating LOG_DIR {}", store.log_dir.display()))?;
    let state_dir = store.state_dir();
    let lock = StateLock::acquire(&state_dir)?;
    std::fs::set_permissions(&state_dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .with_context(|| format!("chmod 0700 {}", state_dir.display()))?;
    Ok(State {
        fs: Arc::new(RealFs),
        open_files_max,
        _lock: lock,
    })
}

/// Waits for the shutdown token, then stops in order (see the module doc):
/// the gRPC server (streams get [`SHUTDOWN_GRACE`]), the pipeline, the
/// edge's side tasks, and a final flush of the store. Fails when a fatal
/// failure caused the stop.
async fn shut_down(mut edge: Edge, pipeline: Pipeline, lifelines: &Lifelines) -> anyhow::Result<()> {
    let shutdown = &lifelines.shutdown;
    let server = &mut edge.server;
    tokio::select! {
        res = &mut *server => res?.context("gRPC server")?,
        _ = shutdown.cancelled() => match tokio::time::timeout(SHUTDOWN_GRACE, &mut *server).await {
            Ok(res) => res?.context("gRPC server")?,
            Err(_) => warn!("streams still open after {SHUTDOWN_GRACE:?}; stopping anyway"),
        },
    }
    shutdown.cancel();
    edge.unready();
    let meta = pipeline.shut_down().await?;
    edge.reloader.await?;
    if let Some(m) = edge.metrics_server {
        m.await??;
    }
    meta.flush().context("final metadata flush")?;
    if lifelines.fatal.is_cancelled() {
        anyhow::bail!(
            "the write-ahead log, the metadata store or a session file failed (see the log above); stopped so \
             that a restart recovers from what is on disk"
        );
    }
    info!("shutdown complete");
    Ok(())
}
