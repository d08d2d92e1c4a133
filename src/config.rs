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
    Serve(ServeArgs),
    /// Offline crash recovery of a state directory (refuses while a server runs).
    Recover(RecoverArgs),
    /// Load generator: drive a running server and report durable-ack throughput.
    Bench(BenchArgs),
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
    /// gRPC max decoding message size; must exceed LOG_MAX_FRAME_BYTES.
    #[arg(long, env = "LOGD_MAX_MESSAGE_BYTES", default_value_t = (4 << 20) + (64 << 10))]
    pub max_message_bytes: usize,
    /// Bytes of frames admitted but not yet handed to session writers;
    /// streams wait for room beyond it.
    #[arg(long, env = "LOGD_INFLIGHT_BYTES_MAX", default_value_t = 256 << 20)]
    pub inflight_bytes_max: usize,
    /// Log format of the service's own logs.
    #[arg(long, env = "LOGD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
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
    /// WAL aside (never deleted) and report exactly what was lost.
    #[arg(long, conflicts_with = "dry_run")]
    pub salvage: bool,
    /// Move the metadata store aside and rebuild it from the session files
    /// and the WAL.
    #[arg(long, conflicts_with = "dry_run")]
    pub rebuild_meta: bool,
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
    /// Server to drive.
    #[arg(long, env = "LOGD_TARGET", default_value = "http://127.0.0.1:50051")]
    pub target: String,
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
    /// Unacknowledged frames one bidi stream may have outstanding.
    #[arg(long, default_value_t = 4096)]
    pub window_frames: usize,
    /// Target rate over all streams in frames/s (0: as fast as acks allow).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}
