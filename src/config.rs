//! Command-line flags. Every option is a clap flag with an environment
//! variable of the same meaning; `LOG_*` names are the seed's, new ones start
//! with `LOGD_`. Raw flags are checked into limits by [`StoreArgs::wal_options`]
//! and [`ServeArgs::validate`].

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// logd: WAL-first durable log acceptance.
#[derive(Debug, Parser)]
#[command(name = "logd", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service.
    Serve(Box<ServeArgs>),
    /// Offline crash recovery of a state directory (refuses while a server runs).
    Recover(RecoverArgs),
    /// Load generator: drive a running server and report durable-ack throughput.
    Bench(BenchArgs),
    /// Ask a running server to rotate one session's file, or every active one.
    Rotate(RotateArgs),
    /// Send lines (or JSON objects) from stdin or a file as frames; exit 0 only when none was rejected.
    Send(SendArgs),
    /// Show a running server's sessions, WAL, queues and outbox.
    Status(StatusArgs),
    /// Print one session's lines in seq order across its `.logtmp`, `.log`
    /// and `.log.gz` files in one or more log directories (no server needed).
    Cat(CatArgs),
    /// Inspect and verify the write-ahead log (offline).
    Wal {
        /// Which WAL command.
        #[command(subcommand)]
        command: WalCommand,
    },
}

/// `logd wal …`
#[derive(Debug, Subcommand)]
pub enum WalCommand {
    /// List segments with first/last LSN, record counts and sizes.
    Inspect(WalArgs),
    /// Verify every record's CRC; exit 2 on damage.
    Verify(WalArgs),
}

/// Arguments of `logd wal inspect|verify`.
#[derive(Debug, Args)]
pub struct WalArgs {
    /// Where the store lives.
    #[command(flatten)]
    pub store: StoreArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Where logd keeps its files, shared by `serve`, `recover` and `wal`.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Directory of the session files.
    #[arg(long, env = "LOG_DIR", default_value = "./logs")]
    pub log_dir: PathBuf,
    /// Directory of the WAL (`wal/`) and the metadata store (`meta/`).
    /// Default: `<LOG_DIR>/.logd`.
    #[arg(long, env = "LOGD_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Size at which a WAL segment is rolled.
    #[arg(long, env = "LOGD_WAL_SEGMENT_BYTES", default_value_t = 64 << 20)]
    pub wal_segment_bytes: u64,
    /// Largest encoded frame accepted; larger ones are rejected per frame.
    #[arg(long, env = "LOG_MAX_FRAME_BYTES", default_value_t = 1 << 20)]
    pub max_frame_bytes: usize,
}

/// Bytes a record may grow by over the client's encoded frame: the seq,
/// receive time and version the server fills in.
const FRAME_NORMALIZATION_BYTES: usize = 64;

impl StoreArgs {
    /// The state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir.clone().unwrap_or_else(|| self.log_dir.join(".logd"))
    }

    /// The WAL directory.
    pub fn wal_dir(&self) -> PathBuf {
        self.state_dir().join("wal")
    }

    /// The metadata store directory.
    pub fn meta_dir(&self) -> PathBuf {
        self.state_dir().join("meta")
    }

    /// WAL limits derived from the flags, checked.
    pub fn wal_options(&self) -> Result<wal::WalOptions, String> {
        let record = self.max_frame_bytes + FRAME_NORMALIZATION_BYTES;
        let record_bytes_max =
            u32::try_from(record).map_err(|_| format!("LOG_MAX_FRAME_BYTES {} is too large", self.max_frame_bytes))?;
        let opts = wal::WalOptions {
            segment_bytes_max: self.wal_segment_bytes,
            record_bytes_max,
        };
        opts.validate()
            .map_err(|e| format!("LOGD_WAL_SEGMENT_BYTES / LOG_MAX_FRAME_BYTES: {e}"))?;
        Ok(opts)
    }
}

/// Arguments of `logd serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Where the store lives.
    #[command(flatten)]
    pub store: StoreArgs,
    /// gRPC listen address (loopback by default). Port 0 picks a free port;
    /// the address is printed as `logd: listening on ADDR`.
    #[arg(long, env = "LOGD_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// How often session files are fdatasynced and checkpointed.
    #[arg(long, env = "LOG_FLUSH_INTERVAL_MS", default_value_t = 200)]
    pub flush_interval_ms: u64,
    /// gRPC max decoding message size; must exceed LOG_MAX_FRAME_BYTES. A
    /// larger message is refused with OUT_OF_RANGE (on every RPC).
    #[arg(long, env = "LOGD_MAX_MESSAGE_BYTES", default_value_t = (4 << 20) + (64 << 10))]
    pub max_message_bytes: usize,
    /// Bytes of frames admitted but not yet written by session writers
    /// (encoded size; about twice that in memory); streams wait for room
    /// beyond it. It bounds how far materialization may lag acks: 64 MiB is
    /// ~200,000 256-byte frames, over a second at full rate.
    #[arg(long, env = "LOGD_INFLIGHT_BYTES_MAX", default_value_t = 64 << 20)]
    pub inflight_bytes_max: usize,
    /// Log format of the service's own logs.
    #[arg(long, env = "LOGD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Rotate a session's file when it reaches this size.
    #[arg(long, env = "LOG_MAX_SIZE_BYTES", default_value_t = 64 << 20)]
    pub max_size_bytes: u64,
    /// Rotate a session's file this long after it was started.
    #[arg(long, env = "LOG_MAX_AGE_SECONDS", default_value_t = 3600)]
    pub max_age_seconds: u64,
    /// Rotate and close a session's file after this long without frames.
    #[arg(long, env = "LOG_IDLE_TIMEOUT_SECONDS", default_value_t = 300)]
    pub idle_timeout_seconds: u64,
    /// Compression threads for rotated files.
    #[arg(long, env = "LOGD_COMPRESSION_WORKERS", default_value_t = 1)]
    pub compression_workers: usize,
    /// How often the compression pool looks in the metadata store for jobs
    /// the writers' queue did not carry (left by a crash or a full queue).
    #[arg(long, env = "LOGD_COMPRESSION_SWEEP_INTERVAL_MS", default_value_t = 60_000)]
    pub compression_sweep_interval_ms: u64,
    /// What happens to rotated files and where events go.
    #[command(flatten)]
    pub lifecycle: LifecycleArgs,
    /// Prometheus metrics address (`/metrics`); `off` disables. Port 0 picks
    /// a free port, printed as `logd: metrics on ADDR`.
    #[arg(long, env = "LOGD_METRICS_LISTEN", default_value = "127.0.0.1:9464")]
    pub metrics_listen: String,
    /// TLS certificate chain (PEM); with --tls-key, the server speaks TLS only.
    #[arg(long, env = "LOGD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "LOGD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) that client certificates must chain to: mutual TLS.
    #[arg(long, env = "LOGD_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// File of accepted bearer tokens, one per line; clients send
    /// `authorization: Bearer <token>`. Unset: no token needed.
    #[arg(long, env = "LOGD_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// Concurrent client connections accepted; more wait in the backlog.
    #[arg(long, env = "LOGD_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// A connection must bring its first request (TLS and HTTP/2 handshakes
    /// included) within this many milliseconds of being accepted, or it is
    /// closed and its LOGD_MAX_CONNECTIONS slot freed.
    #[arg(long, env = "LOGD_HANDSHAKE_TIMEOUT_MS", default_value_t = 10_000)]
    pub handshake_timeout_ms: u64,
    /// Sessions active at once (a writer task and an open file each, or a
    /// first frame on its way); a frame for a new session beyond it is
    /// refused with RESOURCE_EXHAUSTED until idle sessions close.
    #[arg(long, env = "LOGD_SESSIONS_ACTIVE_MAX", default_value_t = 10_000)]
    pub sessions_active_max: usize,
    /// Sessions whose last seq the sequencer keeps in memory; beyond it
    /// the least recently used ones whose checkpoint caught up are dropped
    /// and reloaded from the metadata store on their next frame.
    #[arg(long, env = "LOGD_SEQ_CACHE_SESSIONS_MAX", default_value_t = 100_000)]
    pub seq_cache_sessions_max: usize,
    /// With REDIS_URL set: rotations wait (frames keep going to the live
    /// file) while the event outbox holds this many events, e.g. while
    /// Redis is down; they go on once Redis took some.
    #[arg(long, env = "LOGD_OUTBOX_EVENTS_MAX", default_value_t = 100_000)]
    pub outbox_events_max: usize,
    /// Concurrent streams per HTTP/2 connection.
    #[arg(long, env = "LOGD_MAX_CONCURRENT_STREAMS", default_value_t = 256)]
    pub max_concurrent_streams: u32,
    /// HTTP/2 keepalive ping interval; a peer silent for 20 s more is dropped.
    #[arg(long, env = "LOGD_HTTP2_KEEPALIVE_SECONDS", default_value_t = 30)]
    pub http2_keepalive_seconds: u64,
    /// A stream that sends nothing this long is closed (DEADLINE_EXCEEDED).
    #[arg(long, env = "LOGD_STREAM_IDLE_TIMEOUT_SECONDS", default_value_t = 300)]
    pub stream_idle_timeout_seconds: u64,
    /// How long a stream may wait for admission before RESOURCE_EXHAUSTED.
    #[arg(long, env = "LOGD_STREAM_BLOCKED_MAX_MS", default_value_t = 5000)]
    pub stream_blocked_max_ms: u64,
    /// Session files open at once, at most; beyond it the least recently
    /// used idle file is synced, checkpointed and closed (and reopened on
    /// its session's next frame). Default: half of the open-file limit
    /// (RLIMIT_NOFILE, raised to its hard limit at start), at least 8.
    #[arg(long, env = "LOGD_OPEN_FILES_MAX")]
    pub open_files_max: Option<usize>,
    /// Refuse frames while free space on the WAL or log filesystem is below
    /// this percentage of its size.
    #[arg(long, env = "LOGD_DISK_FREE_MIN_PERCENT", default_value_t = 5.0)]
    pub disk_free_min_percent: f64,
    /// …or below this many bytes (whichever is larger).
    #[arg(long, env = "LOGD_DISK_FREE_MIN_BYTES", default_value_t = 256 << 20)]
    pub disk_free_min_bytes: u64,
    /// Permission bits of files logd creates (octal).
    #[arg(long, env = "LOGD_FILE_MODE", default_value = "640", value_parser = parse_octal)]
    pub file_mode: u32,
    /// This instance's name, in every event (`instance`, and `event_id`'s
    /// `@<instance>`) and in `logd_instance_info`: which `LOG_DIR` an
    /// event's `path` is in when several instances share a Redis stream.
    /// `[A-Za-z0-9._-]`, at most 64 bytes. Default: the host name.
    #[arg(long, env = "LOGD_INSTANCE")]
    pub instance: Option<String>,

    /// The OTLP log record (or resource) attribute that names a record's
    /// session; without it `service.instance.id`, then `service.name`.
    #[arg(long, env = "LOGD_OTLP_SESSION_ATTRIBUTE", default_value = "session.id")]
    pub otlp_session_attribute: String,
}

/// Longest `LOGD_INSTANCE`, in bytes.
pub const INSTANCE_BYTES_MAX: usize = 64;

/// Whether `name` can be an instance name: 1 to 64 of `[A-Za-z0-9._-]`
/// (no `@` or `:`, so an `event_id` splits back into its parts).
pub fn instance_is_valid(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= INSTANCE_BYTES_MAX
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

/// The host name (`/proc/sys/kernel/hostname`, else `$HOSTNAME`), the
/// default `LOGD_INSTANCE`.
fn host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())?;
    Some(name.trim().to_owned())
}

impl ServeArgs {
    /// This instance's name: `LOGD_INSTANCE`, or the host name.
    pub fn instance_name(&self) -> Result<String, String> {
        let name = match &self.instance {
            Some(n) => n.clone(),
            None => host_name().ok_or("no host name to name this instance: set LOGD_INSTANCE")?,
        };
        if !instance_is_valid(&name) {
            return Err(format!(
                "LOGD_INSTANCE {name:?} must be 1 to {INSTANCE_BYTES_MAX} bytes of [A-Za-z0-9._-] (default: the host name)"
            ));
        }
        Ok(name)
    }
}

fn parse_octal(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8).map_err(|e| format!("not an octal mode: {e}"))
}

/// Compression of rotated files and the Redis event stream (shared by
/// `serve` and `recover`, which finishes interrupted steps).
#[derive(Debug, Clone, Args)]
pub struct LifecycleArgs {
    /// Compression of rotated files.
    #[arg(long, env = "LOG_COMPRESSION", value_enum, default_value_t = Compression::Gzip)]
    pub compression: Compression,
    /// gzip level, 0 (fastest) to 9 (smallest).
    #[arg(long, env = "LOGD_COMPRESSION_LEVEL", default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=9))]
    pub compression_level: u32,
    /// Redis to mirror file events to, e.g. `redis://127.0.0.1:6379`. Unset: no events.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// Encoding of each event's `content` field on the stream.
    #[arg(long, env = "REDIS_PUBSUB_FORMAT", value_enum, default_value_t = crate::outbox::encoding::Encoding::Json)]
    pub redis_format: crate::outbox::encoding::Encoding,
    /// Stream key events are XADDed to.
    #[arg(long, env = "LOGD_REDIS_STREAM", default_value = "logd:events")]
    pub redis_stream: String,
    /// Approximate cap of the stream (`XADD … MAXLEN ~ N`).
    #[arg(long, env = "LOGD_REDIS_STREAM_MAXLEN", default_value_t = 1_000_000)]
    pub redis_stream_maxlen: u64,
    /// Also PUBLISH each event id to this channel (a wake-up ping; at most once).
    #[arg(long, env = "REDIS_PUBSUB_CHANNEL")]
    pub redis_pubsub_channel: Option<String>,
}

impl LifecycleArgs {
    /// The lifecycle these flags ask for.
    pub fn lifecycle(&self) -> store::Lifecycle {
        store::Lifecycle {
            gzip_level: (self.compression == Compression::Gzip).then_some(self.compression_level),
            events: self.redis_url.is_some(),
        }
    }
}

/// Compression of rotated files.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Compression {
    /// `.log` → `.log.gz` in the background.
    Gzip,
    /// Rotated files stay `.log`.
    None,
}

/// How every client subcommand (`send`, `status`, `rotate`, `bench`) reaches
/// the server: the same flags and environment variables for each.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Connection")]
pub struct ClientArgs {
    /// Server: `host:port` or `http://host:port` (plaintext), or
    /// `https://host:port` (TLS, verified with the system's root
    /// certificates, or --tls-ca).
    #[arg(long, env = "LOGD_TARGET", default_value = "http://127.0.0.1:50051")]
    pub target: String,
    /// Bearer token, sent as `authorization: Bearer <token>`.
    #[arg(long, env = "LOGD_AUTH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) to verify the server with instead of the
    /// system's roots (needs an https:// target).
    #[arg(long, env = "LOGD_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate chain (PEM) for mutual TLS, with --tls-key (needs
    /// an https:// target).
    #[arg(long, env = "LOGD_TLS_CLIENT_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "LOGD_TLS_CLIENT_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

/// Arguments of `logd rotate`.
#[derive(Debug, Clone, Args)]
pub struct RotateArgs {
    /// Which files: one session's, or every active one's.
    #[command(flatten)]
    pub which: RotateWhich,
    /// Which server.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `--session S` or `--all`: exactly one.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct RotateWhich {
    /// The session to rotate.
    #[arg(long)]
    pub session: Option<String>,
    /// Rotate every session with an open file.
    #[arg(long)]
    pub all: bool,
}

/// Format of logd's own logs.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl ServeArgs {
    /// Checks the flags against each other.
    pub fn validate(&self) -> Result<(), String> {
        self.store.wal_options()?;
        self.instance_name()?;
        if self.max_message_bytes <= self.store.max_frame_bytes {
            return Err(format!(
                "LOGD_MAX_MESSAGE_BYTES {} must exceed LOG_MAX_FRAME_BYTES {}",
                self.max_message_bytes, self.store.max_frame_bytes
            ));
        }
        if self.flush_interval_ms == 0 || self.flush_interval_ms > 60_000 {
            return Err(format!(
                "LOG_FLUSH_INTERVAL_MS {} must be in 1..=60000",
                self.flush_interval_ms
            ));
        }
        if self.max_size_bytes == 0 || self.max_age_seconds == 0 || self.idle_timeout_seconds == 0 {
            return Err("LOG_MAX_SIZE_BYTES, LOG_MAX_AGE_SECONDS and LOG_IDLE_TIMEOUT_SECONDS must be > 0".into());
        }
        if self.open_files_max == Some(0) {
            return Err("LOGD_OPEN_FILES_MAX must be > 0".into());
        }
        if self.compression_workers == 0 || self.compression_workers > 64 {
            return Err(format!(
                "LOGD_COMPRESSION_WORKERS {} must be in 1..=64",
                self.compression_workers
            ));
        }
        if self.compression_sweep_interval_ms == 0 {
            return Err("LOGD_COMPRESSION_SWEEP_INTERVAL_MS must be > 0".into());
        }
        if self.sessions_active_max == 0 {
            return Err("LOGD_SESSIONS_ACTIVE_MAX must be > 0".into());
        }
        if self.seq_cache_sessions_max == 0 {
            return Err("LOGD_SEQ_CACHE_SESSIONS_MAX must be > 0".into());
        }
        if self.outbox_events_max == 0 {
            return Err("LOGD_OUTBOX_EVENTS_MAX must be > 0".into());
        }
        if self.handshake_timeout_ms == 0 {
            return Err("LOGD_HANDSHAKE_TIMEOUT_MS must be > 0".into());
        }
        if self.inflight_bytes_max < self.store.max_frame_bytes {
            return Err(format!(
                "LOGD_INFLIGHT_BYTES_MAX {} must be at least LOG_MAX_FRAME_BYTES {}",
                self.inflight_bytes_max, self.store.max_frame_bytes
            ));
        }
        Ok(())
    }
}

/// Arguments of `logd recover`.
#[derive(Debug, Args)]
pub struct RecoverArgs {
    /// Where the store lives.
    #[command(flatten)]
    pub store: StoreArgs,
    /// Print one JSON object instead of the human summary.
    #[arg(long)]
    pub json: bool,
    /// Report what recovery would do; change nothing.
    #[arg(long, alias = "check")]
    pub dry_run: bool,
    /// On mid-log corruption, keep every readable record, move the damaged
    /// WAL aside (never deleted) and report exactly what was lost. With
    /// `--dry-run`: report what salvage would keep and lose; change nothing.
    #[arg(long)]
    pub salvage: bool,
    /// Move the metadata store aside and rebuild it from the session files
    /// and the WAL.
    #[arg(long, conflicts_with = "dry_run")]
    pub rebuild_meta: bool,
    /// Compression and events, as `serve` has them.
    #[command(flatten)]
    pub lifecycle: LifecycleArgs,
}

/// Which RPC `logd bench` drives.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum BenchRpc {
    /// WriteLogBidi with per-batch acks.
    Bidi,
    /// WriteLogStream, one response per stream.
    Stream,
    /// WriteLogBatch, one unary call per batch.
    Batch,
}

/// Arguments of `logd bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Concurrent gRPC streams (each on its own connection).
    #[arg(long, default_value_t = 16)]
    pub streams: usize,
    /// Sessions the frames are spread over.
    #[arg(long, default_value_t = 64)]
    pub sessions: usize,
    /// Content bytes per frame.
    #[arg(long, default_value_t = 256)]
    pub frame_bytes: usize,
    /// How long to send, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Which RPC.
    #[arg(long, value_enum, default_value_t = BenchRpc::Bidi)]
    pub rpc: BenchRpc,
    /// Frames per unary batch or per client-streaming call.
    #[arg(long, default_value_t = 256)]
    pub batch_frames: usize,
    /// Unacknowledged frames one bidi stream may have outstanding. 1,024 (~300 KB
    /// of 256-byte frames) keeps group commits full; more only queues (Little's
    /// law: latency = frames in flight / rate) and lets frames go cold in cache.
    #[arg(long, default_value_t = 1024)]
    pub window_frames: usize,
    /// Target rate over all streams in frames/s (0: as fast as acks allow).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Which server.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Arguments of `logd send`.
#[derive(Debug, Clone, Args)]
#[command(override_usage = "logd send --session <SESSION> [OPTIONS] < lines\n       \
                            logd send --json [--session <SESSION>] [OPTIONS] < json-lines")]
pub struct SendArgs {
    /// Session the lines go to (with --json: of lines that name none).
    #[arg(long, required_unless_present = "json")]
    pub session: Option<String>,
    /// Role of every frame (with --json: of lines that name none).
    #[arg(long, default_value = "")]
    pub role: String,
    /// User of every frame (with --json: of lines that name none).
    #[arg(long, default_value = "")]
    pub user: String,
    /// Metadata `key=value` for every frame (repeatable; with --json,
    /// merged under each line's own `metadata`).
    #[arg(long = "meta", value_name = "KEY=VALUE", value_parser = parse_meta)]
    pub meta: Vec<(String, String)>,
    /// Each line is one JSON object: `content` (a string; anything else is
    /// sent as its JSON text), and optionally `session_id`, `role`,
    /// `user_id`, `metadata` (an object), `time` (RFC 3339) and `seq`.
    #[arg(long)]
    pub json: bool,
    /// Read lines from this file instead of stdin.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Which server.
    #[command(flatten)]
    pub client: ClientArgs,
}

fn parse_meta(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// Arguments of `logd status`.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// Show this session only (also when it has no open file).
    #[arg(long)]
    pub session: Option<String>,
    /// Sessions to list, largest open file first (the server sends at most
    /// 1,000).
    #[arg(long, default_value_t = 20)]
    pub top: u32,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Which server.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// How `logd cat` prints a line.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum CatFormat {
    /// The JSON line as logd wrote it.
    Json,
    /// `time role content`, one line per frame (newlines in content as `\n`).
    Text,
}

/// Arguments of `logd cat`.
#[derive(Debug, Clone, Args)]
pub struct CatArgs {
    /// The session to print.
    #[arg(long)]
    pub session: String,
    /// Print only seqs at or above this one.
    #[arg(long, default_value_t = 0)]
    pub from_seq: i64,
    /// Print only seqs at or below this one (with --follow: exit once past it).
    #[arg(long, default_value_t = i64::MAX)]
    pub to_seq: i64,
    /// Keep printing new lines as they are written, across rotations.
    #[arg(long)]
    pub follow: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = CatFormat::Json)]
    pub format: CatFormat,
    /// How often --follow looks for new lines and files.
    #[arg(long, default_value_t = 200)]
    pub poll_interval_ms: u64,
    /// Log directories to read (e.g. one per instance). Default: LOG_DIR.
    pub dirs: Vec<PathBuf>,
}
