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
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use wal::fs::{Fs, RealFs};

use crate::config::ServeArgs;
use crate::ingest::{IngestStats, Sequencer};
use crate::metrics::Metrics;
use crate::mirror::{MirrorConfig, MirrorStats, run_mirror};
use crate::pb::admin_service_server::AdminServiceServer;
use crate::pb::log_service_server::LogServiceServer;
use crate::service::{AdminSvc, BUDGET_UNIT_BYTES, LogSvc, Ready, Shared};
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
    /// Takes `<state>/LOCK`, or fails naming who holds it. The state
    /// directory (`LOG_DIR/.logd` or `LOGD_STATE_DIR`) is created durably.
    pub fn acquire(state_dir: &Path) -> anyhow::Result<StateLock> {
        StateLock::acquire_on(&RealFs, state_dir)
    }

    /// [`StateLock::acquire`], creating the directory through `fs` (the lock
    /// itself is an `flock` on a real file).
    pub fn acquire_on(fs: &dyn Fs, state_dir: &Path) -> anyhow::Result<StateLock> {
        wal::fs::create_dir_durably(fs, state_dir)
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

/// Creates `dir` (and missing parents), fsyncing each new directory's parent
/// so a power cut cannot take the directory, and the files in it, away
/// ([`wal::fs::create_dir_durably`] on the real filesystem).
pub fn create_dir_durably(dir: &Path) -> std::io::Result<()> {
    wal::fs::create_dir_durably(&RealFs, dir)
}

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

/// Checks `authorization: Bearer <token>` against the accepted tokens in
/// constant time; `UNAUTHENTICATED` otherwise. The scheme matches in any
/// case (RFC 6750 via RFC 7235); the token is exact. [`TokenAuth::reload`]
/// (on SIGHUP) swaps the tokens in force for the file's current ones.
#[derive(Clone)]
pub struct TokenAuth {
    path: PathBuf,
    tokens: Arc<std::sync::RwLock<Arc<Vec<Vec<u8>>>>>,
}

/// One token per non-empty line of `path` (surrounding spaces trimmed).
fn read_tokens(path: &Path) -> anyhow::Result<Vec<Vec<u8>>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading token file {}", path.display()))?;
    let tokens: Vec<Vec<u8>> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| l.as_bytes().to_vec())
        .collect();
    anyhow::ensure!(!tokens.is_empty(), "token file {} holds no token", path.display());
    Ok(tokens)
}

impl TokenAuth {
    /// Reads one token per non-empty line of `path`.
    pub fn from_file(path: &Path) -> anyhow::Result<TokenAuth> {
        Ok(TokenAuth {
            path: path.to_path_buf(),
            tokens: Arc::new(std::sync::RwLock::new(Arc::new(read_tokens(path)?))),
        })
    }

    /// Reads the file again and puts its tokens in force; on an error (the
    /// file is unreadable or holds no token) the tokens in force stay.
    /// Returns how many tokens are in force now.
    pub fn reload(&self) -> anyhow::Result<usize> {
        let fresh = Arc::new(read_tokens(&self.path)?);
        let n = fresh.len();
        *self.tokens.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(n)
    }

    fn check(&self, req: &tonic::Request<()>) -> Result<(), tonic::Status> {
        use subtle::ConstantTimeEq;
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim_start_matches(' '));
        let Some(given) = given else {
            return Err(tonic::Status::unauthenticated(
                "missing `authorization: Bearer <token>`",
            ));
        };
        let tokens = self.tokens.read().unwrap_or_else(|p| p.into_inner()).clone();
        // Compare against every token without stopping early.
        let mut ok = subtle::Choice::from(0u8);
        for t in tokens.iter() {
            ok |= t.as_slice().ct_eq(given.as_bytes());
        }
        if bool::from(ok) {
            Ok(())
        } else {
            Err(tonic::Status::unauthenticated("invalid token"))
        }
    }
}

/// Reloads the token file on every SIGHUP until `stop`. Without a token
/// file SIGHUP only logs (it never stops logd).
async fn reload_tokens_on_sighup(
    mut hup: tokio::signal::unix::Signal,
    auth: Option<TokenAuth>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            got = hup.recv() => if got.is_none() { return },
            _ = stop.cancelled() => return,
        }
        match &auth {
            None => info!("SIGHUP: no LOGD_AUTH_TOKEN_FILE, nothing to reload"),
            Some(a) => match a.reload() {
                Ok(n) => info!(tokens = n, file = %a.path.display(), "SIGHUP: reloaded the token file"),
                Err(e) => error!("SIGHUP: token file not reloaded ({e:#}); keeping the tokens in force"),
            },
        }
    }
}

/// A tonic interceptor: the token check, or nothing. A request that
/// passes it ends its connection's handshake timeout.
#[derive(Clone)]
struct Auth(Option<TokenAuth>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(a) = &self.0 {
            a.check(&req)?;
        }
        ConnInfo::of(&req).inspect(|c| c.mark_served());
        Ok(req)
    }
}

/// What the free-space watermark says about one filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskSpace {
    /// Free space is at or above the watermark.
    Enough {
        /// Bytes available to logd.
        free_bytes: u64,
    },
    /// Free space is below the watermark: new frames are refused.
    Low {
        /// Bytes available to logd.
        free_bytes: u64,
        /// The watermark in bytes.
        need_bytes: u64,
    },
    /// The filesystem reports no capacity (statvfs total = 0, as a tmpfs
    /// mounted with `size=0` and several FUSE filesystems do): there is no
    /// percentage to compare with and no way to tell "full" from "unknown",
    /// so the watermark does not apply to it.
    CapacityUnknown,
}

/// The watermark decision from a filesystem's statvfs numbers:
/// `total_bytes` (`f_blocks * f_frsize`), `free_bytes` (`f_bavail *
/// f_frsize`), and the limits `LOGD_DISK_FREE_MIN_PERCENT` /
/// `LOGD_DISK_FREE_MIN_BYTES` (whichever is larger).
pub fn disk_space(total_bytes: u64, free_bytes: u64, free_min_percent: f64, free_min_bytes: u64) -> DiskSpace {
    if total_bytes == 0 {
        return DiskSpace::CapacityUnknown;
    }
    let need_bytes = free_min_bytes.max((total_bytes as f64 * free_min_percent / 100.0) as u64);
    if free_bytes < need_bytes {
        DiskSpace::Low { free_bytes, need_bytes }
    } else {
        DiskSpace::Enough { free_bytes }
    }
}

/// `(total, available)` bytes of `dir`'s filesystem, from statvfs(2).
fn statvfs_bytes(dir: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `st` a valid out-parameter.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let frsize = st.f_frsize as u64;
    Ok((
        (st.f_blocks as u64).saturating_mul(frsize),
        (st.f_bavail as u64).saturating_mul(frsize),
    ))
}

/// Where free space is watched, and the watermark.
struct DiskWatch {
    dirs: Vec<(&'static str, PathBuf)>,
    percent: f64,
    bytes: u64,
    flag: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    /// Per directory of `dirs`: whether "no capacity" was already logged.
    warned_unknown: Vec<AtomicBool>,
}

impl DiskWatch {
    fn new(
        dirs: Vec<(&'static str, PathBuf)>,
        percent: f64,
        bytes: u64,
        flag: Arc<AtomicBool>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let warned_unknown = dirs.iter().map(|_| AtomicBool::new(false)).collect();
        DiskWatch {
            dirs,
            percent,
            bytes,
            flag,
            metrics,
            warned_unknown,
        }
    }

    /// Checks free space once; sets `flag` while below the watermark.
    fn check(&self) {
        let mut low = false;
        for ((name, dir), warned) in self.dirs.iter().zip(&self.warned_unknown) {
            let space = match statvfs_bytes(dir) {
                Ok((total, free)) => disk_space(total, free, self.percent, self.bytes),
                // Not measurable now (e.g. the directory is being recreated):
                // never a reason to refuse frames.
                Err(_) => DiskSpace::Enough { free_bytes: 0 },
            };
            let unknown = space == DiskSpace::CapacityUnknown;
            self.metrics
                .disk_capacity_unknown
                .with_label_values(&[name])
                .set(unknown as i64);
            match space {
                DiskSpace::Enough { free_bytes } => {
                    self.metrics
                        .disk_free_bytes
                        .with_label_values(&[name])
                        .set(free_bytes as i64);
                }
                DiskSpace::Low { free_bytes, .. } => {
                    self.metrics
                        .disk_free_bytes
                        .with_label_values(&[name])
                        .set(free_bytes as i64);
                    low = true;
                }
                DiskSpace::CapacityUnknown => {
                    if !warned.swap(true, Ordering::Relaxed) {
                        warn!(
                            dir = %dir.display(),
                            "the filesystem of the {name} directory reports no capacity (statvfs total = 0): \
                             the free-space watermark is disabled for it (logd_disk_capacity_unknown)"
                        );
                    }
                }
            }
        }
        if low != self.flag.swap(low, Ordering::Relaxed) {
            if low {
                warn!("free disk space below the watermark: refusing new frames (RESOURCE_EXHAUSTED) until it returns");
            } else {
                info!("free disk space is back above the watermark: accepting frames");
            }
        }
        self.metrics.disk_low.set(low as i64);
    }
}

/// Checks free space every second (the caller checked once before serving).
async fn watch_disk(watch: DiskWatch, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.cancelled() => return,
        }
        watch.check();
    }
}

/// Accepted connections bounded by a semaphore (LOGD_MAX_CONNECTIONS); each
/// must bring its first request (TLS and HTTP/2 handshakes included) within
/// `handshake_timeout` (LOGD_HANDSHAKE_TIMEOUT_MS) or it is closed and its
/// slot freed: idle sockets cannot hold every slot.
fn limited_incoming(
    listener: tokio::net::TcpListener,
    max: usize,
    handshake_timeout: Duration,
    timeouts: prometheus::IntCounter,
) -> impl tokio_stream::Stream<Item = std::io::Result<LimitedConn>> {
    let slots = Arc::new(Semaphore::new(max));
    futures::stream::unfold((listener, slots), move |(listener, slots)| {
        let timeouts = timeouts.clone();
        async move {
            let permit = slots.clone().acquire_owned().await.expect("never closed");
            let res = listener.accept().await.map(|(stream, _)| {
                let _ = stream.set_nodelay(true);
                LimitedConn {
                    stream,
                    _permit: permit,
                    handshake: Some(Box::pin(tokio::time::sleep(handshake_timeout))),
                    handshake_timeout,
                    served: Arc::new(AtomicBool::new(false)),
                    timeouts,
                }
            });
            Some((res, (listener, slots)))
        }
    })
}

/// A TCP connection holding one of the connection slots until dropped.
pub struct LimitedConn {
    stream: tokio::net::TcpStream,
    _permit: tokio::sync::OwnedSemaphorePermit,
    /// Armed until the connection's first request passed the interceptor.
    handshake: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    handshake_timeout: Duration,
    served: Arc<AtomicBool>,
    timeouts: prometheus::IntCounter,
}

/// What the services learn of a connection: its TCP info, and the flag that
/// ends its handshake timeout.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// Addresses.
    pub tcp: tonic::transport::server::TcpConnectInfo,
    served: Arc<AtomicBool>,
}

impl ConnInfo {
    /// The connection a request came on (plaintext or TLS).
    fn of<T>(req: &tonic::Request<T>) -> Option<&ConnInfo> {
        let ext = req.extensions();
        ext.get::<ConnInfo>().or_else(|| {
            ext.get::<tonic::transport::server::TlsConnectInfo<ConnInfo>>()
                .map(|t| t.get_ref())
        })
    }

    /// The connection brought a request: no handshake timeout any more.
    fn mark_served(&self) {
        self.served.store(true, Ordering::Relaxed);
    }
}

impl tokio::io::AsyncRead for LimitedConn {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(deadline) = this.handshake.as_mut() {
            if this.served.load(Ordering::Relaxed) {
                this.handshake = None;
            } else if deadline.as_mut().poll(cx).is_ready() {
                this.handshake = None;
                this.timeouts.inc();
                // Dropping the connection (hyper does on a read error)
                // frees its slot.
                return std::task::Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no request within LOGD_HANDSHAKE_TIMEOUT_MS ({} ms) of accepting the connection; closed",
                        this.handshake_timeout.as_millis()
                    ),
                )));
            }
        }
        std::pin::Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for LimitedConn {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for LimitedConn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        ConnInfo {
            tcp: self.stream.connect_info(),
            served: self.served.clone(),
        }
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
    crate::openfiles::init_fd_count();
    let open_files_max = args
        .open_files_max
        .unwrap_or_else(crate::openfiles::default_open_files_max);
    let nofile = crate::openfiles::nofile_limit();
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
        Some(tokio::spawn(crate::metrics::serve(
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
    let active_sessions = Arc::new(crate::sessions::ActiveSessions::new(args.sessions_active_max));
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
        checkpoints: crate::checkpoints::CheckpointBatcher::start(meta.clone()),
        active: active_sessions.clone(),
        outbox_events_max: args.outbox_events_max,
        open_files: crate::openfiles::OpenFiles::new(open_files_max),
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
        Arc::new(move || crate::writer::outbox_full(&cfg)) as Arc<dyn Fn() -> Option<String> + Send + Sync>
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::sync::Mutex;
    use wal::fs::{FsFile, OpenMode};

    /// The real filesystem, recording every directory it fsyncs.
    #[derive(Default)]
    struct RecordingFs {
        synced_dirs: Mutex<Vec<PathBuf>>,
    }

    impl Fs for RecordingFs {
        fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn FsFile>> {
            RealFs.open(path, mode)
        }
        fn create_dir_all(&self, path: &Path) -> io::Result<()> {
            RealFs.create_dir_all(path)
        }
        fn list_dir(&self, path: &Path) -> io::Result<Vec<PathBuf>> {
            RealFs.list_dir(path)
        }
        fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
            RealFs.rename(from, to)
        }
        fn remove_file(&self, path: &Path) -> io::Result<()> {
            RealFs.remove_file(path)
        }
        fn sync_dir(&self, path: &Path) -> io::Result<()> {
            self.synced_dirs.lock().unwrap().push(path.to_path_buf());
            RealFs.sync_dir(path)
        }
        fn exists(&self, path: &Path) -> bool {
            RealFs.exists(path)
        }
    }

    #[test]
    fn the_state_lock_creates_a_custom_state_directory_and_its_parents_durably() {
        let t = tempfile::TempDir::new().unwrap();
        let state = t.path().join("custom/deeper/state");
        let fs = RecordingFs::default();
        let lock = StateLock::acquire_on(&fs, &state).unwrap();
        assert!(lock.path().exists());
        // Each new directory's name lives in its parent: parents first.
        assert_eq!(
            *fs.synced_dirs.lock().unwrap(),
            [
                t.path().to_path_buf(),
                t.path().join("custom"),
                t.path().join("custom/deeper"),
            ]
        );
        drop(lock);
        // An existing directory is not created again.
        let fs = RecordingFs::default();
        let _lock = StateLock::acquire_on(&fs, &state).unwrap();
        assert!(fs.synced_dirs.lock().unwrap().is_empty());
    }

    #[test]
    fn a_filesystem_reporting_no_capacity_has_unknown_space_not_low_space() {
        assert_eq!(disk_space(0, 0, 5.0, 256 << 20), DiskSpace::CapacityUnknown);
        // Even with free blocks reported (some FUSE filesystems do).
        assert_eq!(disk_space(0, 1 << 40, 5.0, 0), DiskSpace::CapacityUnknown);
    }

    #[test]
    fn the_watermark_is_the_larger_of_the_percentage_and_the_bytes() {
        let gib = 1u64 << 30;
        // 5% of 100 GiB = 5 GiB > 256 MiB.
        assert_eq!(
            disk_space(100 * gib, 4 * gib, 5.0, 256 << 20),
            DiskSpace::Low {
                free_bytes: 4 * gib,
                need_bytes: 5 * gib
            }
        );
        assert_eq!(
            disk_space(100 * gib, 5 * gib, 5.0, 256 << 20),
            DiskSpace::Enough { free_bytes: 5 * gib }
        );
        // 5% of 1 GiB = 51 MiB < 256 MiB: the bytes win.
        assert_eq!(
            disk_space(gib, 200 << 20, 5.0, 256 << 20),
            DiskSpace::Low {
                free_bytes: 200 << 20,
                need_bytes: 256 << 20
            }
        );
        // A full filesystem of known size is low.
        assert!(matches!(disk_space(gib, 0, 0.0, 1), DiskSpace::Low { .. }));
        assert_eq!(disk_space(gib, 0, 0.0, 0), DiskSpace::Enough { free_bytes: 0 });
    }
}
