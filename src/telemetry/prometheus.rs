//! Prometheus metrics at `LOGD_METRICS_LISTEN` `/metrics` (the `prometheus`
//! crate's registry and text encoder, served by axum).
//!
//! Event-time measurements (latencies, batch sizes, rejections) are recorded
//! where they happen; counters that other components already keep as
//! atomics are copied into the registry when it is scraped.
//!
//! Every labelled counter exists from the start, at 0 for each known label
//! ([`ERROR_KINDS`], [`REJECT_REASONS`]): a series that appears only with
//! its first error is invisible to `increase()`, so an alert on it would
//! never fire on that first error. `logd_serving` says whether the gRPC
//! services serve (0 while recovering and while draining), which `up`
//! cannot: `/metrics` answers during both.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
    exponential_buckets,
};

use crate::telemetry::stats::{DispatchStats, IngestStats, MirrorStats};

/// Every `kind` of `logd_errors_total`, each exported from the start at 0.
pub const ERROR_KINDS: &[&str] = &[
    "overloaded",
    "disk_low",
    "wal_unavailable",
    "sessions_active_max",
    "handshake_timeout",
];

/// Every `reason` of `logd_frames_rejected_total` (the validation rules and
/// `session_file`), each exported from the start at 0.
pub const REJECT_REASONS: &[&str] = &["session_id", "version", "seq", "time", "size", "session_file"];

/// Every `reason` of `logd_rotations_total`, in [`DispatchStats::rotations`] order.
const ROTATE_REASONS: [&str; 4] = ["size", "age", "idle", "manual"];

/// Every metric of the process.
pub struct Metrics {
    registry: Registry,
    /// Frames read from streams (valid or not).
    pub frames_received: IntCounter,
    frames_accepted: IntCounter,
    frames_duplicate: IntCounter,
    /// Rejected frames by rule.
    pub frames_rejected: IntCounterVec,
    /// Encoded bytes of valid frames received.
    pub bytes_received: IntCounter,
    wal_appends: IntCounter,
    wal_fsyncs: IntCounter,
    wal_bytes: IntCounter,
    /// fdatasync latency of group commits.
    pub wal_fsync_seconds: Histogram,
    /// Records per group commit.
    pub wal_commit_batch_records: Histogram,
    wal_disk_bytes: IntGauge,
    wal_segments: IntGauge,
    /// From submitting a chunk to its settlement (fsync done).
    pub ack_latency_seconds: Histogram,
    active_sessions: IntGauge,
    open_files: IntGauge,
    /// Admission budget in use, bytes.
    pub inflight_bytes: IntGauge,
    rotations: IntCounterVec,
    evictions: IntCounter,
    session_io_retries: IntCounter,
    session_files_closed_for_slots: IntCounter,
    session_fatal_errors: IntCounter,
    foreign_files_moved: IntCounter,
    compress_backlog: IntGauge,
    compressed_files: IntCounter,
    compress_bytes_in: IntCounter,
    compress_bytes_out: IntCounter,
    redis_published: IntCounter,
    redis_pending: IntGauge,
    redis_failed: IntCounter,
    /// Records the last recovery pass read and replayed.
    pub recovery_records: IntGaugeVec,
    /// Errors by kind, as clients see them.
    pub errors: IntCounterVec,
    /// Free bytes of the WAL and log filesystems.
    pub disk_free_bytes: IntGaugeVec,
    /// 1 while ingest is refused for low disk space.
    pub disk_low: IntGauge,
    /// 1 for a directory whose filesystem reports no capacity (watermark off).
    pub disk_capacity_unknown: IntGaugeVec,
    /// Times the metadata store was rebuilt.
    pub meta_rebuilds: IntCounter,
    seq_cache_sessions: IntGauge,
    rotations_deferred: IntCounter,
    seq_cache_evictions: IntCounter,
    /// 1 while the gRPC services serve; 0 while recovering and draining.
    pub serving: IntGauge,
    /// `logd_instance_info{instance}` = 1: this instance's `LOGD_INSTANCE`.
    instance_info: IntGaugeVec,
    sources: std::sync::OnceLock<Sources>,
}

struct Sources {
    ingest: Arc<IngestStats>,
    dispatch: Arc<DispatchStats>,
    wal: Arc<wal::WalStats>,
    segments: wal::Segments,
    mirror: Arc<MirrorStats>,
    meta: Arc<dyn store::MetaStore>,
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

fn counter_vec(r: &Registry, name: &str, help: &str, label: &str) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge_vec(r: &Registry, name: &str, help: &str, label: &str) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), &[label]).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

/// Sets a counter to `value` (counters copied from atomics only grow).
fn catch_up(c: &IntCounter, value: u64) {
    let now = c.get();
    if value > now {
        c.inc_by(value - now);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A registry with every metric at zero.
    pub fn new() -> Self {
        let r = Registry::new();
        let secs = exponential_buckets(0.000_025, 2.0, 18).expect("buckets");
        let build_info = IntGauge::with_opts(
            Opts::new(
                "logd_build_info",
                "Always 1; the version of the running binary is its label.",
            )
            .const_label("version", env!("CARGO_PKG_VERSION")),
        )
        .expect("valid metric");
        r.register(Box::new(build_info.clone())).expect("unique metric");
        build_info.set(1);
        let m = Metrics {
            frames_received: counter(&r, "logd_frames_received_total", "Frames read from client streams."),
            frames_accepted: counter(&r, "logd_frames_accepted_total", "Frames made durable in the WAL."),
            frames_duplicate: counter(&r, "logd_frames_duplicate_total", "Frames dropped: seq already held."),
            frames_rejected: counter_vec(&r, "logd_frames_rejected_total", "Invalid frames, by rule.", "reason"),
            bytes_received: counter(
                &r,
                "logd_bytes_received_total",
                "Encoded bytes of valid frames received.",
            ),
            wal_appends: counter(&r, "logd_wal_appends_total", "Records made durable in the WAL."),
            wal_fsyncs: counter(
                &r,
                "logd_wal_fsyncs_total",
                "Group commits (one write + one fdatasync each).",
            ),
            wal_bytes: counter(&r, "logd_wal_bytes_written_total", "Bytes made durable in the WAL."),
            wal_fsync_seconds: histogram(
                &r,
                "logd_wal_fsync_seconds",
                "fdatasync latency of group commits.",
                secs.clone(),
            ),
            wal_commit_batch_records: histogram(
                &r,
                "logd_wal_commit_batch_records",
                "Records per group commit.",
                exponential_buckets(1.0, 2.0, 20).expect("buckets"),
            ),
            wal_disk_bytes: gauge(&r, "logd_wal_disk_bytes", "Bytes of WAL segments on disk."),
            wal_segments: gauge(&r, "logd_wal_segments", "WAL segments on disk."),
            ack_latency_seconds: histogram(
                &r,
                "logd_ack_latency_seconds",
                "From submit to durable settlement.",
                secs,
            ),
            active_sessions: gauge(&r, "logd_active_sessions", "Sessions with a running writer."),
            open_files: gauge(&r, "logd_open_files", "Open file descriptors of the process."),
            inflight_bytes: gauge(&r, "logd_inflight_bytes", "Admission budget in use (bytes)."),
            rotations: counter_vec(
                &r,
                "logd_rotations_total",
                "Session files rotated, by reason.",
                "reason",
            ),
            evictions: counter(
                &r,
                "logd_writer_evictions_total",
                "Writers stopped after their idle timeout.",
            ),
            session_io_retries: counter(
                &r,
                "logd_session_io_retries_total",
                "Session file steps retried after a transient error (EMFILE, ENFILE, ENOMEM, EAGAIN, EINTR).",
            ),
            session_files_closed_for_slots: counter(
                &r,
                "logd_session_files_closed_for_slots_total",
                "Session files synced and closed because another session needed the slot (LOGD_OPEN_FILES_MAX).",
            ),
            session_fatal_errors: counter(
                &r,
                "logd_session_fatal_errors_total",
                "Session file errors that stopped the process (it exits 1; a restart recovers).",
            ),
            foreign_files_moved: counter(
                &r,
                "logd_foreign_files_moved_total",
                "Symbolic links, non-regular files and files without a line of logd's found at a session file's name, moved aside (never written through).",
            ),
            compress_backlog: gauge(
                &r,
                "logd_compress_backlog_files",
                "Rotated files waiting for compression.",
            ),
            compressed_files: counter(&r, "logd_compressed_files_total", "Files compressed."),
            compress_bytes_in: counter(&r, "logd_compress_in_bytes_total", "Bytes read by compression."),
            compress_bytes_out: counter(&r, "logd_compress_out_bytes_total", "Bytes written by compression."),
            redis_published: counter(&r, "logd_redis_events_published_total", "Events accepted by Redis."),
            redis_pending: gauge(&r, "logd_redis_events_pending", "Events waiting in the outbox."),
            redis_failed: counter(&r, "logd_redis_events_failed_total", "Failed XADD attempts (retried)."),
            recovery_records: gauge_vec(
                &r,
                "logd_recovery_records",
                "Records of the last recovery pass.",
                "what",
            ),
            errors: counter_vec(&r, "logd_errors_total", "Errors returned to clients, by kind.", "kind"),
            disk_free_bytes: gauge_vec(
                &r,
                "logd_disk_free_bytes",
                "Free bytes of the filesystems in use.",
                "dir",
            ),
            disk_low: gauge(&r, "logd_disk_low", "1 while ingest is refused for low disk space."),
            disk_capacity_unknown: gauge_vec(
                &r,
                "logd_disk_capacity_unknown",
                "1 when the directory's filesystem reports no capacity (statvfs total = 0): no watermark there.",
                "dir",
            ),
            meta_rebuilds: counter(&r, "logd_meta_rebuilds_total", "Times the metadata store was rebuilt."),
            seq_cache_sessions: gauge(
                &r,
                "logd_seq_cache_sessions",
                "Sessions whose last seq the sequencer holds in memory (LOGD_SEQ_CACHE_SESSIONS_MAX).",
            ),
            seq_cache_evictions: counter(
                &r,
                "logd_seq_cache_evictions_total",
                "Sessions dropped from the sequencer's cache (reloaded from the store on return).",
            ),
            rotations_deferred: counter(
                &r,
                "logd_rotations_deferred_total",
                "Rotation attempts put off because the event outbox held LOGD_OUTBOX_EVENTS_MAX events.",
            ),
            serving: gauge(
                &r,
                "logd_serving",
                "1 while the gRPC services serve; 0 while recovering (health NOT_SERVING) and while draining.",
            ),
            instance_info: gauge_vec(
                &r,
                "logd_instance_info",
                "1, labelled with this instance's LOGD_INSTANCE (the name in its events).",
                "instance",
            ),
            registry: r,
            sources: std::sync::OnceLock::new(),
        };
        for kind in ERROR_KINDS {
            m.errors.with_label_values(&[kind]);
        }
        for reason in REJECT_REASONS {
            m.frames_rejected.with_label_values(&[reason]);
        }
        for reason in ROTATE_REASONS {
            m.rotations.with_label_values(&[reason]);
        }
        m
    }

    /// Names this instance (`logd_instance_info{instance}` = 1).
    pub fn set_instance(&self, name: &str) {
        self.instance_info.reset();
        self.instance_info.with_label_values(&[name]).set(1);
    }

    /// Connects the atomics copied at scrape time.
    #[allow(clippy::too_many_arguments)]
    pub fn set_sources(
        &self,
        ingest: Arc<IngestStats>,
        dispatch: Arc<DispatchStats>,
        wal: Arc<wal::WalStats>,
        segments: wal::Segments,
        mirror: Arc<MirrorStats>,
        meta: Arc<dyn store::MetaStore>,
    ) {
        let _ = self.sources.set(Sources {
            ingest,
            dispatch,
            wal,
            segments,
            mirror,
            meta,
        });
    }

    fn refresh(&self) {
        self.open_files.set(crate::telemetry::fds::open_fds() as i64);
        let Some(s) = self.sources.get() else { return };
        let l = Ordering::Relaxed;
        catch_up(&self.frames_accepted, s.ingest.accepted.load(l));
        catch_up(&self.frames_duplicate, s.ingest.duplicate.load(l));
        self.seq_cache_sessions.set(s.ingest.seq_cache_sessions.load(l) as i64);
        catch_up(&self.seq_cache_evictions, s.ingest.seq_cache_evictions.load(l));
        catch_up(&self.wal_appends, s.wal.records.load(l));
        catch_up(&self.wal_fsyncs, s.wal.commits.load(l));
        catch_up(&self.wal_bytes, s.wal.bytes.load(l));
        let segs = s.segments.list();
        self.wal_segments.set(segs.len() as i64);
        self.wal_disk_bytes
            .set(segs.iter().map(|x| x.bytes).sum::<u64>() as i64);
        let d = &s.dispatch;
        self.active_sessions.set(d.active_sessions.load(l) as i64);
        for (i, reason) in ROTATE_REASONS.iter().enumerate() {
            catch_up(&self.rotations.with_label_values(&[reason]), d.rotations[i].load(l));
        }
        catch_up(&self.evictions, d.evictions.load(l));
        catch_up(&self.rotations_deferred, d.rotations_deferred.load(l));
        catch_up(&self.session_io_retries, d.io_retries.load(l));
        catch_up(&self.session_files_closed_for_slots, d.files_closed_for_slots.load(l));
        catch_up(&self.session_fatal_errors, d.fatal_errors.load(l));
        catch_up(&self.foreign_files_moved, d.foreign_files_moved.load(l));
        self.compress_backlog.set(d.compress_backlog.load(l) as i64);
        catch_up(&self.compressed_files, d.compressed_files.load(l));
        catch_up(&self.compress_bytes_in, d.compress_bytes_in.load(l));
        catch_up(&self.compress_bytes_out, d.compress_bytes_out.load(l));
        catch_up(&self.redis_published, s.mirror.published.load(l));
        catch_up(&self.redis_failed, s.mirror.failed.load(l));
        self.redis_pending.set(s.meta.outbox_len().unwrap_or(0) as i64);
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        self.refresh();
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }
}

/// Serves `/metrics` on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    use axum::http::header::CONTENT_TYPE;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let m = metrics.clone();
            async move { ([(CONTENT_TYPE, "text/plain; version=0.0.4")], m.render()) }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The label values the code passes to `metric.with_label_values(&["…"])`
    /// for a metric field named `field`, found in the source of `src/`.
    fn labels_used(field: &str) -> std::collections::BTreeSet<String> {
        let mut found = std::collections::BTreeSet::new();
        let mut dirs = vec![std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/src"))];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).expect("src is readable") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    dirs.push(path);
                    continue;
                }
                let text = std::fs::read_to_string(&path).expect("source is UTF-8");
                // A call on the field, possibly split over lines (whitespace removed).
                let flat: String = text.split_whitespace().collect();
                let needle = format!(".{field}.with_label_values(&[\"");
                for (at, _) in flat.match_indices(&needle) {
                    let rest = &flat[at + needle.len()..];
                    let label = &rest[..rest.find('"').expect("closing quote")];
                    found.insert(label.to_owned());
                }
            }
        }
        found
    }

    #[test]
    fn every_error_kind_and_reject_reason_the_code_uses_is_exported_at_zero_from_the_start() {
        let kinds = labels_used("errors");
        let reasons = labels_used("frames_rejected");
        assert!(kinds.contains("wal_unavailable") && kinds.len() >= 5, "{kinds:?}");
        assert!(reasons.contains("session_file"), "{reasons:?}");
        for k in &kinds {
            assert!(
                ERROR_KINDS.contains(&k.as_str()),
                "kind {k:?} is used but not in ERROR_KINDS"
            );
        }
        for r in &reasons {
            assert!(
                REJECT_REASONS.contains(&r.as_str()),
                "reason {r:?} is used but not in REJECT_REASONS"
            );
        }
        let text = Metrics::new().render();
        for k in ERROR_KINDS {
            let line = format!("logd_errors_total{{kind=\"{k}\"}} 0");
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
        for r in REJECT_REASONS {
            let line = format!("logd_frames_rejected_total{{reason=\"{r}\"}} 0");
            assert!(text.lines().any(|l| l == line), "missing {line:?}");
        }
        assert!(text.lines().any(|l| l == "logd_serving 0"), "not serving until told");
        let build = format!("logd_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
        assert!(text.lines().any(|l| l == build), "missing {build:?}");
    }
}
