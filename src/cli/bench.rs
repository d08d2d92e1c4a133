//! `logd bench`: a load generator that drives a running server with N
//! concurrent streams over M sessions and reports durable-acked throughput,
//! ack latency percentiles, the server's WAL fdatasyncs (frames per fsync,
//! group-commit batch sizes) and the server's CPU per frame, all from the
//! server's `GetStats` before and after the run.
//!
//! Latency is measured per frame from when it was handed to the stream to
//! when the ack covering it arrived (bidi), or per call (stream, batch).

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use super::Authed;
use crate::config::{BenchArgs, BenchRpc};
use crate::pb::admin_service_client::AdminServiceClient;
use crate::pb::log_service_client::LogServiceClient;
use crate::pb::{LogBatch, LogFrame, StatsRequest, StatsResponse};
use crate::telemetry::console::{errln, errtext, outln};

/// The result of a run (`--json` prints it).
#[derive(Debug, Serialize)]
pub struct BenchReport {
    /// Which RPC was driven.
    pub rpc: String,
    /// Streams and sessions.
    pub streams: usize,
    /// Sessions.
    pub sessions: usize,
    /// Content bytes per frame.
    pub frame_bytes: usize,
    /// Most frames a bidi stream keeps unacked (`--window-frames`).
    pub window_frames: usize,
    /// Seconds from first send to last ack.
    pub seconds: f64,
    /// Frames acknowledged as durable.
    pub frames_acked: u64,
    /// Acked frames per second.
    pub frames_per_sec: f64,
    /// Acked content megabytes (10^6) per second.
    pub mb_per_sec: f64,
    /// Ack latency percentiles in milliseconds.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest latency seen.
    pub max_ms: f64,
    /// WAL fdatasyncs during the run: the delta of the server's
    /// `wal_commits`, which `Unsynced::sync` (`wal/src/log.rs`) bumps once
    /// per `fdatasync` of the WAL that made a non-empty batch durable, so one
    /// commit = one fdatasync. Not counted: the syncs of a segment roll (the
    /// sealed segment's fdatasync, the new segment's header and directory),
    /// one set per segment filled.
    pub wal_fsyncs: u64,
    /// Acked frames per WAL fdatasync: `frames_acked / wal_fsyncs` (null
    /// when there was none).
    pub frames_per_fsync: Option<f64>,
    /// Group commits on the server during the run (= `wal_fsyncs`; kept for
    /// older readers of the JSON).
    pub server_commits: u64,
    /// WAL records per group commit, on average (records, not frames: the
    /// WAL also holds non-frame records).
    pub server_records_per_commit: f64,
    /// Server commits by records per commit: `[low, high) → count`.
    pub server_batch_histogram: Vec<(u64, u64, u64)>,
    /// The server's user + system CPU seconds (every thread, from
    /// `GetStats.process_cpu_seconds`) from before the first frame until the
    /// server went idle after the last ack (sampled every 250 ms until it
    /// used < 10 ms of CPU in one interval, at most 5 s), so it covers the
    /// session files written after the acks too. Null if the server does not
    /// report its CPU.
    pub server_cpu_seconds: Option<f64>,
    /// `server_cpu_seconds` per acked frame, in microseconds.
    pub server_cpu_us_per_frame: Option<f64>,
    /// Client errors (failed calls).
    pub errors: u64,
}

async fn connect(client: &crate::config::ClientArgs) -> anyhow::Result<Authed> {
    let ep = super::endpoint(client)?
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(16 << 20));
    super::connect_with(client, ep).await
}

fn frame(session: &str, content: &str) -> LogFrame {
    LogFrame {
        session_id: session.to_owned(),
        content: content.to_owned(),
        role: "bench".into(),
        ..Default::default()
    }
}

struct Shared {
    acked: AtomicU64,
    errors: AtomicU64,
    stop: AtomicBool,
}

/// Runs the benchmark and prints the report.
pub async fn run(args: BenchArgs) -> anyhow::Result<BenchReport> {
    anyhow::ensure!(
        args.streams > 0 && args.sessions > 0,
        "--streams and --sessions must be > 0"
    );
    let admin_channel = connect(&args.client).await?;
    let mut admin = AdminServiceClient::new(admin_channel);
    let before = admin
        .get_stats(StatsRequest::default())
        .await
        .context("GetStats")?
        .into_inner();
    let run_id = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
    );
    let sessions: Vec<String> = (0..args.sessions).map(|i| format!("bench-{run_id}-{i}")).collect();
    let content: String = "x".repeat(args.frame_bytes);
    let shared = Arc::new(Shared {
        acked: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.duration);
    let mut tasks = Vec::new();
    for s in 0..args.streams {
        // Stream s writes sessions s, s + streams, …; with fewer sessions
        // than streams, several streams share one session (server seqs).
        let mine: Vec<String> = if args.sessions >= args.streams {
            sessions.iter().skip(s).step_by(args.streams).cloned().collect()
        } else {
            vec![sessions[s % args.sessions].clone()]
        };
        let channel = connect(&args.client).await?;
        let (args, shared, content) = (args.clone(), shared.clone(), content.clone());
        tasks.push(tokio::spawn(async move {
            let client = LogServiceClient::new(channel)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20);
            match args.rpc {
                BenchRpc::Bidi => bidi(client, &args, &mine, &content, &shared, deadline).await,
                BenchRpc::Stream | BenchRpc::Batch => calls(client, &args, &mine, &content, &shared, deadline).await,
            }
        }));
    }
    let progress = std::io::stderr().is_terminal() && !args.json;
    let ticker = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut last = 0;
            while progress && !shared.stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = shared.acked.load(Ordering::Relaxed);
                errtext!(
                    "\r{:>6.1}s  {:>10} acked  {:>9} frames/s   ",
                    started.elapsed().as_secs_f64(),
                    now,
                    now - last
                );
                last = now;
            }
        })
    };
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for t in tasks {
        match t.await? {
            Ok(h) => hist.add(h)?,
            Err(e) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                errln!("bench stream failed: {}", crate::cli::error_line(&e));
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    shared.stop.store(true, Ordering::Relaxed);
    ticker.abort();
    if progress {
        errln!("");
    }
    let after = admin
        .get_stats(StatsRequest::default())
        .await
        .context("GetStats")?
        .into_inner();
    let idle = settle_cpu(&mut admin, &after).await?;
    let acked = shared.acked.load(Ordering::Relaxed);
    let report = make_report(
        &args,
        seconds,
        acked,
        &hist,
        &before,
        &after,
        &idle,
        shared.errors.load(Ordering::Relaxed),
    );
    if args.json {
        outln!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    Ok(report)
}

/// Samples the server's stats every 250 ms from `after` (taken at the last
/// ack) until its CPU time grows by less than 10 ms in one interval (it has
/// finished writing the session files), at most 5 s; returns the last sample.
async fn settle_cpu(admin: &mut AdminServiceClient<Authed>, after: &StatsResponse) -> anyhow::Result<StatsResponse> {
    let mut last = after.clone();
    for _ in 0..20 {
        if last.process_cpu_seconds == 0.0 {
            break; // a server that does not report its CPU
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = admin
            .get_stats(StatsRequest::default())
            .await
            .context("GetStats")?
            .into_inner();
        let grew = now.process_cpu_seconds - last.process_cpu_seconds;
        last = now;
        if grew < 0.010 {
            break;
        }
    }
    Ok(last)
}

#[allow(clippy::too_many_arguments)]
fn make_report(
    args: &BenchArgs,
    seconds: f64,
    acked: u64,
    hist: &Histogram<u64>,
    before: &StatsResponse,
    after: &StatsResponse,
    idle: &StatsResponse,
    errors: u64,
) -> BenchReport {
    // WAL counters from the sample at the last ack; CPU from the one taken
    // once the server went idle.
    let commits = after.wal_commits - before.wal_commits;
    let server_cpu_seconds =
        (idle.process_cpu_seconds > 0.0).then(|| (idle.process_cpu_seconds - before.process_cpu_seconds).max(0.0));
    let records = after.wal_records - before.wal_records;
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let server_batch_histogram = after
        .commit_batch_log2_histogram
        .iter()
        .zip(before.commit_batch_log2_histogram.iter().chain(std::iter::repeat(&0)))
        .enumerate()
        .filter(|(_, (a, b))| *a > *b)
        .map(|(i, (a, b))| (1u64 << i, 1u64 << (i + 1), a - b))
        .collect();
    BenchReport {
        rpc: format!("{:?}", args.rpc).to_lowercase(),
        streams: args.streams,
        sessions: args.sessions,
        frame_bytes: args.frame_bytes,
        window_frames: args.window_frames.max(1),
        seconds,
        frames_acked: acked,
        frames_per_sec: acked as f64 / seconds,
        mb_per_sec: (acked as f64 * args.frame_bytes as f64) / seconds / 1e6,
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: hist.max() as f64 / 1000.0,
        wal_fsyncs: commits,
        frames_per_fsync: (commits > 0).then(|| acked as f64 / commits as f64),
        server_commits: commits,
        server_records_per_commit: if commits > 0 {
            records as f64 / commits as f64
        } else {
            0.0
        },
        server_batch_histogram,
        server_cpu_seconds,
        server_cpu_us_per_frame: server_cpu_seconds
            .filter(|_| acked > 0)
            .map(|cpu| cpu * 1e6 / acked as f64),
        errors,
    }
}

fn print_report(r: &BenchReport) {
    outln!(
        "{} streams={} sessions={} frame={}B: {} frames acked in {:.2}s = {:.0} frames/s, {:.1} MB/s; ack latency p50 {:.3} ms, p99 {:.3} ms, p999 {:.3} ms, max {:.3} ms",
        r.rpc,
        r.streams,
        r.sessions,
        r.frame_bytes,
        r.frames_acked,
        r.seconds,
        r.frames_per_sec,
        r.mb_per_sec,
        r.p50_ms,
        r.p99_ms,
        r.p999_ms,
        r.max_ms
    );
    match r.frames_per_fsync {
        Some(f) => outln!(
            "server WAL fdatasyncs: {} ({f:.1} acked frames per fsync; group commits of {:.1} records on average, one write + one fdatasync each)",
            r.wal_fsyncs,
            r.server_records_per_commit
        ),
        None => outln!("server WAL fdatasyncs: 0"),
    }
    match (r.server_cpu_seconds, r.server_cpu_us_per_frame) {
        (Some(cpu), Some(us)) => {
            outln!("server CPU: {cpu:.2} s user + system until idle after the last ack, {us:.2} µs per acked frame")
        }
        (Some(cpu), None) => outln!("server CPU: {cpu:.2} s user + system"),
        _ => outln!("server CPU: not reported by the server"),
    }
    for (lo, hi, n) in &r.server_batch_histogram {
        outln!("  records/commit [{lo:>6}, {hi:>6}): {n}");
    }
    if r.errors > 0 {
        outln!("errors: {}", r.errors);
    }
}

/// Paces sends to `rate` frames/s per stream (0: unpaced).
struct Pacer {
    per_frame: Option<Duration>,
    next: Instant,
}

impl Pacer {
    fn new(args: &BenchArgs) -> Self {
        let per_stream = args.rate / args.streams as f64;
        Pacer {
            per_frame: (per_stream > 0.0).then(|| Duration::from_secs_f64(1.0 / per_stream)),
            next: Instant::now(),
        }
    }
    async fn wait(&mut self, frames: u64) {
        if let Some(d) = self.per_frame {
            self.next += d * frames as u32;
            tokio::time::sleep_until(self.next.into()).await;
        }
    }
}

async fn bidi(
    mut client: LogServiceClient<Authed>,
    args: &BenchArgs,
    sessions: &[String],
    content: &str,
    shared: &Shared,
    deadline: Instant,
) -> anyhow::Result<Histogram<u64>> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (tx, rx) = mpsc::channel::<LogFrame>(args.window_frames.max(1));
    let mut acks = client
        .write_log_bidi(routed(ReceiverStream::new(rx), sessions)?)
        .await?
        .into_inner();
    let window = args.window_frames.max(1) as u64;
    let mut sent_at: VecDeque<Instant> = VecDeque::new();
    let mut sent = 0u64;
    let mut settled = 0u64;
    let per_frame = Pacer::new(args).per_frame;
    let mut next_burst = Instant::now();
    let mut tx = Some(tx);
    let burst = 64u64;
    loop {
        if let Some(sender) = &tx {
            let now = Instant::now();
            if now >= deadline {
                tx = None;
                continue;
            }
            let room = window - (sent - settled);
            if room > 0 && now >= next_burst {
                let n = burst.min(room);
                if let Some(d) = per_frame {
                    next_burst += d * n as u32;
                }
                for _ in 0..n {
                    let s = &sessions[(sent as usize) % sessions.len()];
                    sender.send(frame(s, content)).await?;
                    sent_at.push_back(now);
                    sent += 1;
                }
                // Pick up acks that are already here without blocking.
                while let Some(Some(ack)) = futures::FutureExt::now_or_never(acks.next()) {
                    settle(ack?.through_index as u64, &mut settled, &mut sent_at, &mut hist, shared)?;
                }
                continue;
            }
            // Acks are read while waiting for the next paced burst: an ack
            // must never wait for the pacer, or the pause shows as latency.
            let wake = if room > 0 { next_burst.min(deadline) } else { deadline };
            tokio::select! {
                ack = acks.next() => match ack {
                    Some(ack) => settle(ack?.through_index as u64, &mut settled, &mut sent_at, &mut hist, shared)?,
                    None => anyhow::bail!("stream ended with {} frames unacked", sent - settled),
                },
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
            continue;
        }
        if settled == sent {
            break;
        }
        match acks.next().await {
            Some(ack) => settle(ack?.through_index as u64, &mut settled, &mut sent_at, &mut hist, shared)?,
            None => anyhow::ensure!(settled == sent, "stream ended with {} frames unacked", sent - settled),
        }
    }
    Ok(hist)
}

/// A call carrying `x-session-id` when it writes one session, so that a
/// load balancer hashing on that header (docs/SCALING.md) routes it to the
/// session's instance; a call writing several sessions goes anywhere.
fn routed<T>(message: T, sessions: &[String]) -> anyhow::Result<tonic::Request<T>> {
    let mut req = tonic::Request::new(message);
    if let [session] = sessions {
        req.metadata_mut().insert("x-session-id", session.parse()?);
    }
    Ok(req)
}

fn settle(
    through: u64,
    settled: &mut u64,
    sent_at: &mut VecDeque<Instant>,
    hist: &mut Histogram<u64>,
    shared: &Shared,
) -> anyhow::Result<()> {
    let now = Instant::now();
    anyhow::ensure!(through >= *settled, "ack went backwards: {through} after {settled}");
    shared.acked.fetch_add(through - *settled, Ordering::Relaxed);
    while *settled < through {
        let t = sent_at.pop_front().context("ack beyond what was sent")?;
        hist.record((now - t).as_micros().max(1) as u64)?;
        *settled += 1;
    }
    Ok(())
}

async fn calls(
    mut client: LogServiceClient<Authed>,
    args: &BenchArgs,
    sessions: &[String],
    content: &str,
    shared: &Shared,
    deadline: Instant,
) -> anyhow::Result<Histogram<u64>> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut pacer = Pacer::new(args);
    let mut n = 0usize;
    while Instant::now() < deadline {
        let frames: Vec<LogFrame> = (0..args.batch_frames)
            .map(|i| frame(&sessions[(n + i) % sessions.len()], content))
            .collect();
        n += args.batch_frames;
        pacer.wait(args.batch_frames as u64).await;
        let t = Instant::now();
        let resp = match args.rpc {
            BenchRpc::Batch => client
                .write_log_batch(routed(LogBatch { frames }, sessions)?)
                .await?
                .into_inner(),
            _ => client
                .write_log_stream(routed(tokio_stream::iter(frames), sessions)?)
                .await?
                .into_inner(),
        };
        hist.record(t.elapsed().as_micros().max(1) as u64)?;
        shared.acked.fetch_add(resp.frames_accepted as u64, Ordering::Relaxed);
    }
    Ok(hist)
}
