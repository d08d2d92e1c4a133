//! The gRPC edge: `logging.v1.LogService` and `logging.v1.AdminService`.
//! Validation and chunking happen here; durable work is the pipeline's
//! ([`crate::pipeline::sequencer`]). Errors become `Status` codes only in this module.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use futures::FutureExt;
use prost::Message;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status, Streaming};
use tonic_types::{ErrorDetails, StatusExt};

use crate::grpc::validate::{SEQ_MAX, validate};
use crate::pb::admin_service_server::AdminService;
use crate::pb::log_service_server::LogService;
use crate::pb::{
    LogBatch, LogFrame, Rejection, RotateRequest, RotateResponse, SessionInfo, SessionRange, SessionRequest,
    SessionStatus, StatsRequest, StatsResponse, WriteLogAck, WriteLogResponse,
};
use crate::pipeline::sequencer::{IngestError, IngestReply, IngestRequest, Outcome};
use crate::pipeline::writer::Control;
use crate::telemetry::prometheus::Metrics;
use crate::telemetry::stats::{DispatchStats, IngestStats, MirrorStats};
use store::MetaStore;

mod whole;

/// Rejections listed in one response (the count is always exact).
pub const REJECTIONS_LISTED_MAX: usize = 100;
/// Frames per request handed to the commit thread.
const CHUNK_FRAMES_MAX: usize = 512;
/// Encoded bytes per request handed to the commit thread.
const CHUNK_BYTES_MAX: usize = 1 << 20;
/// Requests one stream may have waiting for their fsync.
const STREAM_CHUNKS_IN_FLIGHT_MAX: usize = 16;
/// Bytes per admission budget unit.
pub const BUDGET_UNIT_BYTES: usize = 1024;

/// State shared by all handlers.
#[derive(Clone)]
pub struct Shared {
    /// Submits requests to the commit thread.
    pub submitter: wal::Submitter<IngestRequest>,
    /// Admission budget in [`BUDGET_UNIT_BYTES`] units.
    pub budget: Arc<Semaphore>,
    /// Total units of the budget.
    pub budget_units_total: u32,
    /// Counters.
    pub stats: Arc<IngestStats>,
    /// Dispatcher counters.
    pub dispatch: Arc<DispatchStats>,
    /// The WAL's counters and segments.
    pub wal_stats: Arc<wal::WalStats>,
    /// The WAL's segments.
    pub segments: wal::Segments,
    /// Cancelled when the server starts shutting down.
    pub shutdown: CancellationToken,
    /// Requests to the dispatcher (manual rotation).
    pub control: mpsc::Sender<Control>,
    /// The metadata store (outbox size).
    pub meta: Arc<dyn MetaStore>,
    /// Redis mirror counters.
    pub mirror: Arc<MirrorStats>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Set while free disk space is below the watermark.
    pub disk_low: Arc<AtomicBool>,
    /// Slots of LOGD_SESSIONS_ACTIVE_MAX.
    pub active_sessions: Arc<crate::pipeline::sessions::ActiveSessions>,
    /// Why rotations wait now (the event outbox is full), if they do.
    pub rotations_wait: Arc<dyn Fn() -> Option<String> + Send + Sync>,
    /// The limits the edge enforces, from the configuration.
    pub limits: EdgeLimits,
}

/// The edge's limits and paths, from the configuration.
#[derive(Clone)]
pub struct EdgeLimits {
    /// Largest accepted encoded frame.
    pub frame_bytes_max: usize,
    /// How long a stream may wait for admission before RESOURCE_EXHAUSTED.
    pub stream_blocked_max: Duration,
    /// A stream that sends nothing this long is closed.
    pub stream_idle_timeout: Duration,
    /// LOG_IDLE_TIMEOUT_SECONDS: when an idle session frees its slot.
    pub idle_timeout: Duration,
    /// Where session files live (a frame whose session file's name holds a
    /// symbolic link is rejected).
    pub log_dir: std::path::PathBuf,
}

/// A `RESOURCE_EXHAUSTED` status that tells the client when to retry.
pub fn resource_exhausted(message: String, retry_after: Duration) -> Status {
    Status::with_error_details(
        Code::ResourceExhausted,
        message,
        ErrorDetails::with_retry_info(Some(retry_after)),
    )
}

/// The services' view of the server: not ready while recovery runs.
#[derive(Clone, Default)]
pub struct Ready(Arc<OnceLock<Shared>>);

impl Ready {
    /// Marks the server ready with its shared state.
    pub fn set(&self, shared: Shared) {
        let _ = self.0.set(shared);
    }

    pub(crate) fn get(&self) -> Result<Shared, Status> {
        self.0.get().cloned().ok_or_else(|| {
            Status::with_error_details(
                Code::Unavailable,
                "logd is recovering (replaying its write-ahead log); retry shortly",
                ErrorDetails::with_retry_info(Some(Duration::from_secs(1))),
            )
        })
    }
}

/// Frames of one stream waiting for their fsync, with the rejections that
/// sit between them (settled together, in stream order).
struct Chunk {
    /// Stream index just past the chunk.
    end_index: i64,
    /// Session runs of the chunk's valid frames: (session, frames).
    runs: Vec<(String, usize)>,
    /// Stream index of each valid frame, in order.
    indices: Vec<i64>,
    rejections: Vec<Rejection>,
    reply: Option<oneshot::Receiver<IngestReply>>,
    submitted: Instant,
}

/// Counts and ranges over a call (or since the last ack).
#[derive(Default)]
pub(crate) struct Tally {
    pub(crate) accepted: i64,
    pub(crate) duplicate: i64,
    pub(crate) rejected: i64,
    sessions: Vec<SessionRange>,
    pub(crate) rejections: Vec<Rejection>,
}

impl Tally {
    fn record(&mut self, session: &str, outcome: Outcome) {
        match outcome {
            // Refusals are listed by the caller, in stream order.
            Outcome::LastSeq(_) | Outcome::NoSeqLeft => {}
            Outcome::Duplicate => self.duplicate += 1,
            Outcome::Accepted(seq) => {
                self.accepted += 1;
                match self.sessions.iter_mut().find(|r| r.session_id == session) {
                    Some(r) => {
                        r.first_seq = r.first_seq.min(seq);
                        r.last_seq = r.last_seq.max(seq);
                        r.frames += 1;
                    }
                    None => self.sessions.push(SessionRange {
                        session_id: session.to_owned(),
                        first_seq: seq,
                        last_seq: seq,
                        frames: 1,
                    }),
                }
            }
        }
    }

    fn reject(&mut self, r: Rejection) {
        self.rejected += 1;
        if self.rejections.len() < REJECTIONS_LISTED_MAX {
            self.rejections.push(r);
        }
    }

    fn response(self) -> WriteLogResponse {
        WriteLogResponse {
            frames_accepted: self.accepted,
            frames_duplicate: self.duplicate,
            frames_rejected: self.rejected,
            sessions: self.sessions,
            rejections: self.rejections,
        }
    }
}

/// Takes `units` of the admission budget (returned by the pipeline once
/// the request is settled and materialized), waiting at most
/// LOGD_STREAM_BLOCKED_MAX_MS; RESOURCE_EXHAUSTED + RetryInfo after that,
/// its message ending with `not_done`.
async fn admit(shared: &Shared, units: u32, not_done: &str) -> Result<(), Status> {
    let blocked_max = shared.limits.stream_blocked_max;
    let permit = tokio::select! {
        p = shared.budget.acquire_many(units) => p.map_err(|_| Status::unavailable("server is shutting down"))?,
        _ = shared.shutdown.cancelled() => return Err(Status::unavailable("server is shutting down")),
        _ = tokio::time::sleep(blocked_max) => {
            shared.metrics.errors.with_label_values(&["overloaded"]).inc();
            return Err(resource_exhausted(
                format!(
                    "overloaded: no room for {units} KiB within LOGD_INFLIGHT_BYTES_MAX for {blocked_max:?}; {not_done}"
                ),
                Duration::from_secs(1),
            ));
        }
    };
    permit.forget(); // returned by the pipeline
    Ok(())
}

/// Builds chunks from a stream of frames and settles them in order.
pub(crate) struct StreamIngest {
    shared: Shared,
    next_index: i64,
    building: Vec<LogFrame>,
    building_indices: Vec<i64>,
    building_bytes: usize,
    building_rejections: Vec<Rejection>,
    pending: VecDeque<Chunk>,
    /// The session of the last frame that got an active-session slot.
    last_admitted: String,
    /// Sessions whose file name this stream checked, and the refusal if any.
    session_files_checked: std::collections::HashMap<String, Option<String>>,
}

/// Sessions a stream remembers checking ([`StreamIngest::session_file_refusal`])
/// before it forgets them all and checks again.
const SESSION_FILE_CHECKS_MAX: usize = 4096;

/// The commit thread could not make a request durable (`why` names the WAL
/// or the metadata store): nothing from `index` on is acknowledged.
fn not_durable(why: &IngestError, index: i64) -> Status {
    Status::unavailable(format!(
        "frames from stream index {index} on are not acknowledged: {why}"
    ))
}

impl StreamIngest {
    pub(crate) fn new(shared: Shared) -> Self {
        StreamIngest {
            shared,
            next_index: 0,
            building: Vec::new(),
            building_indices: Vec::new(),
            building_bytes: 0,
            building_rejections: Vec::new(),
            pending: VecDeque::new(),
            last_admitted: String::new(),
            session_files_checked: std::collections::HashMap::new(),
        }
    }

    /// Why frames for `session` are refused (its file's name holds a
    /// symbolic link or something that is not a regular file), checked once
    /// per session per stream: one `lstat`.
    fn session_file_refusal(&mut self, session: &str) -> Option<String> {
        if let Some(r) = self.session_files_checked.get(session) {
            return r.clone();
        }
        if self.session_files_checked.len() >= SESSION_FILE_CHECKS_MAX {
            self.session_files_checked.clear();
        }
        let r = store::session_file_refusal(&self.shared.limits.log_dir, session);
        self.session_files_checked.insert(session.to_owned(), r.clone());
        r
    }

    /// Validates a frame into the chunk being built. Err: the frame's
    /// session is new and LOGD_SESSIONS_ACTIVE_MAX sessions are active; the
    /// frame is not taken and the call must end (after settling what came
    /// before it) with this RESOURCE_EXHAUSTED.
    pub(crate) fn push(&mut self, mut frame: LogFrame) -> Result<(), Status> {
        let index = self.next_index;
        self.shared.metrics.frames_received.inc();
        if let Err((rule, reason)) = validate(&frame, self.shared.limits.frame_bytes_max) {
            self.next_index += 1;
            self.shared.stats.rejected.fetch_add(1, Ordering::Relaxed);
            self.shared.metrics.frames_rejected.with_label_values(&[rule]).inc();
            self.building_rejections.push(Rejection { index, reason });
            return Ok(());
        }
        if let Some(reason) = self.session_file_refusal(&frame.session_id) {
            self.next_index += 1;
            self.shared.stats.rejected.fetch_add(1, Ordering::Relaxed);
            self.shared
                .metrics
                .frames_rejected
                .with_label_values(&["session_file"])
                .inc();
            self.building_rejections.push(Rejection { index, reason });
            return Ok(());
        }
        if frame.session_id != self.last_admitted {
            if let Err(full) = self.shared.active_sessions.admit(&frame.session_id) {
                self.shared
                    .metrics
                    .errors
                    .with_label_values(&["sessions_active_max"])
                    .inc();
                return Err(resource_exhausted(
                    format!(
                        "{} sessions are active (LOGD_SESSIONS_ACTIVE_MAX {}): session {:?} at stream index {index} \
                         would be one more; frames from index {index} on were not accepted; an idle session \
                         frees its slot after LOG_IDLE_TIMEOUT_SECONDS ({}s)",
                        full.active,
                        full.max,
                        frame.session_id,
                        self.shared.limits.idle_timeout.as_secs()
                    ),
                    Duration::from_secs(1),
                ));
            }
            self.last_admitted.clone_from(&frame.session_id);
        }
        self.next_index += 1;
        if frame.time.is_none() {
            frame.time = Some(prost_types::Timestamp::from(SystemTime::now()));
        }
        frame.version = 1;
        let len = frame.encoded_len();
        self.shared.metrics.bytes_received.inc_by(len as u64);
        self.building_bytes += len;
        self.building.push(frame);
        self.building_indices.push(index);
        Ok(())
    }

    fn chunk_full(&self) -> bool {
        self.building.len() >= CHUNK_FRAMES_MAX || self.building_bytes >= CHUNK_BYTES_MAX
    }

    fn window_full(&self) -> bool {
        self.pending.len() >= STREAM_CHUNKS_IN_FLIGHT_MAX
    }

    /// Hands the chunk being built to the commit thread (after admission).
    async fn submit(&mut self) -> Result<(), Status> {
        if self.building.is_empty() && self.building_rejections.is_empty() {
            return Ok(());
        }
        let frames = std::mem::take(&mut self.building);
        let indices = std::mem::take(&mut self.building_indices);
        let bytes = std::mem::take(&mut self.building_bytes);
        let runs = session_runs(&frames);
        let reply = if frames.is_empty() {
            None
        } else {
            if self.shared.disk_low.load(Ordering::Relaxed) {
                self.shared.metrics.errors.with_label_values(&["disk_low"]).inc();
                return Err(resource_exhausted(
                    "free disk space is below the watermark (LOGD_DISK_FREE_MIN_*); frames are refused until space returns".into(),
                    Duration::from_secs(5),
                ));
            }
            let units = (bytes.div_ceil(BUDGET_UNIT_BYTES) as u32).clamp(1, self.shared.budget_units_total);
            admit(&self.shared, units, "frames not acknowledged yet were not accepted").await?;
            let Some(rx) = submit_frames(&self.shared, frames, units) else {
                self.shared.budget.add_permits(units as usize);
                return Err(Status::unavailable("server is shutting down"));
            };
            Some(rx)
        };
        self.pending.push_back(Chunk {
            end_index: self.next_index,
            runs,
            indices,
            rejections: std::mem::take(&mut self.building_rejections),
            reply,
            submitted: Instant::now(),
        });
        Ok(())
    }

    /// Waits for the oldest chunk and adds it to `tally`; returns its end index.
    pub(crate) async fn settle_one(&mut self, tally: &mut Tally) -> Result<Option<i64>, Status> {
        let Some(chunk) = self.pending.front_mut() else {
            return Ok(None);
        };
        let mut refused = Vec::new();
        if let Some(rx) = chunk.reply.as_mut() {
            let outcomes = match rx.await {
                Ok(Ok(o)) => o,
                Ok(Err(why)) => {
                    self.shared.metrics.errors.with_label_values(&["wal_unavailable"]).inc();
                    return Err(not_durable(&why, chunk.end_index));
                }
                Err(_) => return Err(Status::unavailable("server is shutting down")),
            };
            self.shared
                .metrics
                .ack_latency_seconds
                .observe(chunk.submitted.elapsed().as_secs_f64());
            debug_assert_eq!(outcomes.len(), chunk.indices.len(), "one outcome per valid frame");
            let mut it = outcomes.into_iter().zip(chunk.indices.iter().copied());
            for (session, n) in &chunk.runs {
                for (o, index) in it.by_ref().take(*n) {
                    if o == Outcome::NoSeqLeft {
                        self.shared.stats.rejected.fetch_add(1, Ordering::Relaxed);
                        self.shared.metrics.frames_rejected.with_label_values(&["seq"]).inc();
                        refused.push(Rejection {
                            index,
                            reason: format!(
                                "no seq left: session {session} holds the largest seq {SEQ_MAX}; \
                                 a server-assigned seq (seq 0) would pass it"
                            ),
                        });
                    }
                    tally.record(session, o);
                }
            }
        }
        let chunk = self.pending.pop_front().expect("front exists");
        // Rejections of one chunk come from validation and from the
        // sequencer: list them in stream order.
        refused.extend(chunk.rejections);
        refused.sort_by_key(|r| r.index);
        for r in refused {
            tally.reject(r);
        }
        Ok(Some(chunk.end_index))
    }
}

/// Reads one more frame if one is ready right now.
fn ready_frame(stream: &mut Streaming<LogFrame>) -> Option<Option<Result<LogFrame, Status>>> {
    stream.next().now_or_never()
}

/// Pushes `first`, then every frame already readable, until the chunk is
/// full. Ok(true) if the stream ended. An Err is the stream's failure (a
/// message over LOGD_MAX_MESSAGE_BYTES is OUT_OF_RANGE; a broken
/// connection): the frames read before it stay in the chunk being built, so
/// the caller settles them before failing.
fn push_ready(
    ingest: &mut StreamIngest,
    stream: &mut Streaming<LogFrame>,
    first: Result<LogFrame, Status>,
) -> Result<bool, Status> {
    ingest.push(first?)?;
    while !ingest.chunk_full() {
        match ready_frame(stream) {
            Some(Some(f)) => ingest.push(f?)?,
            Some(None) => return Ok(true),
            None => break,
        }
    }
    Ok(false)
}

/// The LogService implementation.
pub struct LogSvc {
    /// Shared state, once recovery is done.
    pub ready: Ready,
}

/// Settles what was submitted, then returns `refused` with the count of
/// frames that were made durable before it (client streaming and unary
/// calls have no other place to report them).
async fn settle_then(ingest: &mut StreamIngest, tally: &mut Tally, refused: Status) -> Status {
    let mut through = 0;
    loop {
        match ingest.settle_one(tally).await {
            Ok(Some(end)) => through = end,
            Ok(None) => break,
            Err(e) => return e,
        }
    }
    let message = format!(
        "{}; before this, {} frame(s) of this call were made durable (stream indexes < {through} settled)",
        refused.message(),
        tally.accepted
    );
    Status::with_details(refused.code(), message, refused.details().to_vec().into())
}

fn idle_closed(idle: Duration) -> Status {
    Status::deadline_exceeded(format!(
        "stream sent nothing for {idle:?} (LOGD_STREAM_IDLE_TIMEOUT_SECONDS); closed"
    ))
}

#[tonic::async_trait]
impl LogService for LogSvc {
    async fn write_log_stream(
        &self,
        request: Request<Streaming<LogFrame>>,
    ) -> Result<Response<WriteLogResponse>, Status> {
        let shared = self.ready.get()?;
        let mut stream = request.into_inner();
        let idle = shared.limits.stream_idle_timeout;
        let shutdown = shared.shutdown.clone();
        let mut ingest = StreamIngest::new(shared);
        let mut tally = Tally::default();
        loop {
            let first = tokio::select! {
                f = stream.next() => f,
                _ = tokio::time::sleep(idle) => return Err(idle_closed(idle)),
                _ = shutdown.cancelled() => {
                    ingest.submit().await.ok();
                    while ingest.settle_one(&mut tally).await?.is_some() {}
                    return Err(Status::unavailable(format!(
                        "server is shutting down: {} frames of this stream were made durable; resend the rest (client seqs make it idempotent)",
                        tally.accepted
                    )));
                }
            };
            let Some(first) = first else { break };
            match push_ready(&mut ingest, &mut stream, first) {
                Ok(false) => {}
                Ok(true) => break,
                // What was read before the failure is made durable and
                // counted in the failure's message, like a refusal.
                Err(failed) => {
                    let failed = match ingest.submit().await {
                        Ok(()) => failed,
                        Err(refused) => refused,
                    };
                    return Err(settle_then(&mut ingest, &mut tally, failed).await);
                }
            }
            if let Err(refused) = ingest.submit().await {
                return Err(settle_then(&mut ingest, &mut tally, refused).await);
            }
            while ingest.window_full() {
                ingest.settle_one(&mut tally).await?;
            }
        }
        if let Err(refused) = ingest.submit().await {
            return Err(settle_then(&mut ingest, &mut tally, refused).await);
        }
        while ingest.settle_one(&mut tally).await?.is_some() {}
        Ok(Response::new(tally.response()))
    }

    type WriteLogBidiStream = ReceiverStream<Result<WriteLogAck, Status>>;

    async fn write_log_bidi(
        &self,
        request: Request<Streaming<LogFrame>>,
    ) -> Result<Response<Self::WriteLogBidiStream>, Status> {
        let shared = self.ready.get()?;
        let mut stream = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_CHUNKS_IN_FLIGHT_MAX);
        tokio::spawn(async move {
            if let Err(status) = bidi_loop(shared, &mut stream, &tx).await {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn write_log_batch(&self, request: Request<LogBatch>) -> Result<Response<WriteLogResponse>, Status> {
        let shared = self.ready.get()?;
        let batch = request.into_inner();
        let mut ingest = StreamIngest::new(shared);
        let mut tally = Tally::default();
        for frame in batch.frames {
            // A frame that did not decode (src/grpc/codec.rs) ends the batch:
            // what came before it is made durable and counted.
            let pushed = match crate::grpc::codec::decode_failure(&frame) {
                Some(why) => Err(Status::invalid_argument(why.to_owned())),
                None => ingest.push(frame),
            };
            if let Err(refused) = pushed {
                let refused = match ingest.submit().await {
                    Ok(()) => refused,
                    Err(other) => other,
                };
                return Err(settle_then(&mut ingest, &mut tally, refused).await);
            }
            if ingest.chunk_full()
                && let Err(refused) = ingest.submit().await
            {
                return Err(settle_then(&mut ingest, &mut tally, refused).await);
            }
            while ingest.window_full() {
                ingest.settle_one(&mut tally).await?;
            }
        }
        if let Err(refused) = ingest.submit().await {
            return Err(settle_then(&mut ingest, &mut tally, refused).await);
        }
        while ingest.settle_one(&mut tally).await?.is_some() {}
        Ok(Response::new(tally.response()))
    }

    async fn get_session(&self, request: Request<SessionRequest>) -> Result<Response<SessionInfo>, Status> {
        let shared = self.ready.get()?;
        let session_id = request.into_inner().session_id;
        if !store::session_id_is_valid(&session_id) {
            return Err(Status::invalid_argument(format!("invalid session_id {session_id:?}")));
        }
        // A query waits in the commit thread's queue like frames do: it
        // takes one unit of the admission budget (returned when it is
        // answered), so a flood of GetSession calls is bounded too.
        admit(&shared, 1, "GetSession was not answered").await?;
        let (tx, rx) = oneshot::channel();
        let req = IngestRequest::query(session_id.clone(), 1, tx);
        if shared.submitter.submit(req).is_err() {
            shared.budget.add_permits(1);
            return Err(Status::unavailable("server is shutting down"));
        }
        match rx.await {
            Ok(Ok(outcomes)) => match outcomes.first() {
                Some(Outcome::LastSeq(last_seq)) => Ok(Response::new(SessionInfo {
                    session_id,
                    last_seq: *last_seq,
                })),
                _ => Err(Status::internal("sequencer did not answer the query")),
            },
            Ok(Err(why)) => Err(not_durable(&why, 0)),
            Err(_) => Err(Status::unavailable("server is shutting down")),
        }
    }
}

/// The bidi loop: read frames while the window allows, ack each settled chunk.
async fn bidi_loop(
    shared: Shared,
    stream: &mut Streaming<LogFrame>,
    tx: &mpsc::Sender<Result<WriteLogAck, Status>>,
) -> Result<(), Status> {
    let shutdown = shared.shutdown.clone();
    let idle = shared.limits.stream_idle_timeout;
    let mut ingest = StreamIngest::new(shared);
    let mut total = Tally::default();
    let mut input_open = true;
    loop {
        if !input_open && ingest.pending.is_empty() {
            return Ok(());
        }
        let has_pending = !ingest.pending.is_empty();
        tokio::select! {
            biased;
            _ = shutdown.cancelled(), if input_open => {
                ingest.submit().await.ok();
                while !ingest.pending.is_empty() {
                    ack_one(&mut ingest, &mut total, tx).await?;
                }
                return Err(Status::unavailable("server is shutting down: every acked frame is durable; reconnect and resend the rest"));
            }
            settled = ack_one(&mut ingest, &mut total, tx), if has_pending => settled?,
            _ = tokio::time::sleep(idle), if input_open && !has_pending => return Err(idle_closed(idle)),
            frame = stream.next(), if input_open && !ingest.window_full() => {
                match frame {
                    None => {
                        input_open = false;
                        submit_or_settle(&mut ingest, &mut total, tx).await?;
                    }
                    Some(f) => {
                        let read = push_ready(&mut ingest, stream, f);
                        input_open = matches!(read, Ok(false));
                        submit_or_settle(&mut ingest, &mut total, tx).await?;
                        // Acks always precede the error, also for a failed read.
                        if let Err(failed) = read {
                            while !ingest.pending.is_empty() {
                                ack_one(&mut ingest, &mut total, tx).await?;
                            }
                            return Err(failed);
                        }
                    }
                }
            }
        }
    }
}

/// Submits the chunk being built; if that is refused (overload, low disk),
/// first acks everything already submitted, then fails with the refusal.
async fn submit_or_settle(
    ingest: &mut StreamIngest,
    total: &mut Tally,
    tx: &mpsc::Sender<Result<WriteLogAck, Status>>,
) -> Result<(), Status> {
    if let Err(refused) = ingest.submit().await {
        while !ingest.pending.is_empty() {
            ack_one(ingest, total, tx).await?;
        }
        return Err(refused);
    }
    Ok(())
}

/// Settles the oldest chunk and sends its ack.
async fn ack_one(
    ingest: &mut StreamIngest,
    total: &mut Tally,
    tx: &mpsc::Sender<Result<WriteLogAck, Status>>,
) -> Result<(), Status> {
    let mut delta = Tally::default();
    let Some(through) = ingest.settle_one(&mut delta).await? else {
        return Ok(());
    };
    total.accepted += delta.accepted;
    total.duplicate += delta.duplicate;
    total.rejected += delta.rejected;
    let ack = WriteLogAck {
        through_index: through,
        frames_accepted: total.accepted,
        frames_duplicate: total.duplicate,
        frames_rejected: total.rejected,
        sessions: delta.sessions,
        rejections: delta.rejections,
    };
    tx.send(Ok(ack))
        .await
        .map_err(|_| Status::cancelled("client went away"))
}

/// Sessions a stats response lists, at most.
const STATS_SESSIONS_MAX: usize = 1000;

/// The sessions a [`StatsRequest`] asks for (see `admin.proto`).
fn session_statuses(board: &crate::telemetry::stats::SessionBoard, req: &StatsRequest) -> Vec<SessionStatus> {
    let only = (!req.session_id.is_empty()).then_some(req.session_id.as_str());
    let top = (req.sessions_top as usize).min(STATS_SESSIONS_MAX);
    if only.is_none() && top == 0 {
        return Vec::new();
    }
    let now = store::now_ms();
    let since = |t: u64| if t == 0 { 0 } else { now.saturating_sub(t) };
    let logtmp = |s: &str| store::logtmp_path(std::path::Path::new(""), s).display().to_string();
    board
        .snapshot(top, only)
        .into_iter()
        .map(|x| SessionStatus {
            open_file: if x.file_open { logtmp(&x.session) } else { String::new() },
            last_seq: x.last_seq,
            file_bytes: x.file_bytes,
            file_age_ms: if x.file_open { since(x.file_opened_at_ms) } else { 0 },
            idle_ms: since(x.last_frame_at_ms),
            session_id: x.session,
        })
        .collect()
}

/// The AdminService implementation.
pub struct AdminSvc {
    /// Shared state, once recovery is done.
    pub ready: Ready,
}

#[tonic::async_trait]
impl AdminService for AdminSvc {
    async fn get_stats(&self, request: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        let req = request.into_inner();
        let s = &self.ready.get()?;
        let w = &s.wal_stats;
        let segs = s.segments.list();
        Ok(Response::new(StatsResponse {
            frames_accepted: s.stats.accepted.load(Ordering::Relaxed),
            frames_duplicate: s.stats.duplicate.load(Ordering::Relaxed),
            frames_rejected: s.stats.rejected.load(Ordering::Relaxed),
            wal_commits: w.commits.load(Ordering::Relaxed),
            wal_records: w.records.load(Ordering::Relaxed),
            wal_bytes: w.bytes.load(Ordering::Relaxed),
            wal_segments: segs.len() as u64,
            wal_disk_bytes: segs.iter().map(|x| x.bytes).sum(),
            commit_batch_log2_histogram: w
                .batch_log2_histogram
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            active_sessions: s.dispatch.active_sessions.load(Ordering::Relaxed),
            wal_next_lsn: s.dispatch.routed_through.load(Ordering::Relaxed) + 1,
            wal_removable_below_lsn: s.dispatch.removable_below_lsn.load(Ordering::Relaxed),
            rotations_size: s.dispatch.rotations[0].load(Ordering::Relaxed),
            rotations_age: s.dispatch.rotations[1].load(Ordering::Relaxed),
            rotations_idle: s.dispatch.rotations[2].load(Ordering::Relaxed),
            rotations_manual: s.dispatch.rotations[3].load(Ordering::Relaxed),
            evictions: s.dispatch.evictions.load(Ordering::Relaxed),
            compress_backlog: s.dispatch.compress_backlog.load(Ordering::Relaxed),
            compressed_files: s.dispatch.compressed_files.load(Ordering::Relaxed),
            compress_bytes_in: s.dispatch.compress_bytes_in.load(Ordering::Relaxed),
            compress_bytes_out: s.dispatch.compress_bytes_out.load(Ordering::Relaxed),
            outbox_events: s.meta.outbox_len().unwrap_or(0) as u64,
            events_published: s.mirror.published.load(Ordering::Relaxed),
            events_failed: s.mirror.failed.load(Ordering::Relaxed),
            open_fds: crate::telemetry::fds::open_fds(),
            process_cpu_seconds: crate::telemetry::cpu::process_cpu_seconds(),
            sessions: session_statuses(&s.dispatch.sessions, &req),
        }))
    }

    async fn rotate(&self, request: Request<RotateRequest>) -> Result<Response<RotateResponse>, Status> {
        let req = request.into_inner();
        let session = if req.all {
            None
        } else {
            if !store::session_id_is_valid(&req.session_id) {
                return Err(Status::invalid_argument(format!(
                    "invalid session_id {:?}",
                    req.session_id
                )));
            }
            Some(req.session_id)
        };
        let shared = self.ready.get()?;
        if let Some(why) = (shared.rotations_wait)() {
            return Err(resource_exhausted(why, Duration::from_secs(5)));
        }
        let (tx, rx) = oneshot::channel();
        let unavailable = || Status::unavailable("server is shutting down");
        shared
            .control
            .send(Control::Rotate { session, reply: tx })
            .await
            .map_err(|_| unavailable())?;
        match rx.await.map_err(|_| unavailable())? {
            Ok(files) => Ok(Response::new(RotateResponse { files })),
            Err(e) => Err(Status::internal(format!("rotation failed: {e}"))),
        }
    }
}

/// `(session, frames)` for each run of consecutive frames of one session,
/// in order: how a chunk's outcomes map back to sessions.
fn session_runs(frames: &[LogFrame]) -> Vec<(String, usize)> {
    let mut runs: Vec<(String, usize)> = Vec::new();
    for f in frames {
        match runs.last_mut() {
            Some((s, n)) if *s == f.session_id => *n += 1,
            _ => runs.push((f.session_id.clone(), 1)),
        }
    }
    runs
}

/// Submits admitted frames holding `units` of budget to the commit thread;
/// the receiver gets their outcomes after the fsync. `None` once the
/// server shuts down (the caller gives the budget back).
fn submit_frames(shared: &Shared, frames: Vec<LogFrame>, units: u32) -> Option<oneshot::Receiver<IngestReply>> {
    let (tx, rx) = oneshot::channel();
    let req = IngestRequest::new(frames, units, tx);
    shared.submitter.submit(req).ok().map(|()| rx)
}
