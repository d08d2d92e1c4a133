//! The ingest pipeline's front half: admission, seq assignment and the WAL.
//!
//! ```text
//! gRPC handler ──IngestRequest──▶ wal-commit thread (Sequencer: seq per session,
//!   (validated frames)               append records, one write; then the
//!                                    wal-sync thread: one fdatasync, settle)
//!        ▲                                   │ settle
//!        └──── Outcomes (after fsync) ◀──────┤
//!                                            └──▶ dispatcher ──▶ session writers
//! ```
//! Seqs are decided on the commit thread, in the same order as the records'
//! LSNs, so replaying the WAL reproduces them exactly. Nothing is sent to a
//! client, nor to a writer, before the fdatasync covering it returned Ok.

use foldhash::{HashMap, HashMapExt};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use prost::Message;
use tokio::sync::{Semaphore, mpsc, oneshot};
use wal::{CommitInfo, RecordType, Stage, Wal};

use crate::pb::LogFrame;
use store::SEQ_MAX;

use crate::telemetry::stats::IngestStats;
use store::MetaStore;

/// What became of one valid frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Durable in the WAL with this seq.
    Accepted(i64),
    /// The session already held this client seq: dropped, not an error.
    Duplicate,
    /// Answer to a [`IngestRequest::query`]: the session's last seq.
    LastSeq(i64),
    /// A server seq was asked for, but the session already holds
    /// [`SEQ_MAX`]: refused, not written (never wrapped).
    NoSeqLeft,
}

/// A reply to an [`IngestRequest`]: one outcome per frame, or why the batch
/// holding it could not be made durable.
pub type IngestReply = Result<Vec<Outcome>, IngestError>;

/// Why the commit thread did not make a request durable. Either way
/// nothing more is acknowledged and logd stops (exit 1), so that a restart
/// recovers from the disk.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IngestError {
    /// The metadata store failed while the session's last seq was loaded:
    /// assigning seqs from 1 again would reuse acked ones.
    #[error("metadata store unreadable while assigning seqs for session {session:?}: {source}")]
    MetaRead {
        /// The session whose checkpoint was read.
        session: String,
        /// The store's error (shared by every request it failed).
        #[source]
        source: Arc<store::MetaError>,
    },
    /// Appending to the WAL, or the batch's write or fdatasync, failed: the
    /// WAL is poisoned.
    #[error("WAL write failed: {0}")]
    Wal(Arc<str>),
}

/// Validated frames from one stream, in stream order.
pub struct IngestRequest {
    /// The frames, prepared ([`Prepared::of`]).
    pub frames: Vec<Prepared>,
    /// Admission budget units this request holds, released once materialized.
    pub budget_units: u32,
    /// Where the outcomes go, after the fsync.
    pub reply: oneshot::Sender<IngestReply>,
    /// Asks for this session's last seq (answered in order with frames).
    pub query: Option<String>,
}

/// A validated frame (time and version already normalized), prepared by
/// the submitter while the frame it just decoded is in cache: everything
/// the commit thread and the session writer need of it but the seq, which
/// only the commit thread decides. The decoded frame is dropped here, so
/// the commit thread copies bytes instead of encoding a frame it no longer
/// has in cache, and an acked frame waits for its writer as one rendered
/// line instead of a struct of strings.
#[derive(Debug)]
pub struct Prepared {
    /// The session.
    pub session: String,
    /// The client's seq (0: the server assigns the next one).
    pub client_seq: i64,
    /// The frame's protobuf encoding without its seq: the WAL record's
    /// payload once [`append_seq`] put the decided seq after it.
    pub payload: Box<[u8]>,
    /// The frame's JSON line after its seq ([`store::render_tail`]).
    pub tail: Box<[u8]>,
}

/// `LogFrame.seq`'s field number (`proto/logging/v1/logging.proto`).
const SEQ_FIELD: u32 = 6;

impl Prepared {
    /// Prepares `frame`: both byte strings are rendered straight into
    /// allocations of their size (no scratch buffer, no copy).
    pub fn of(mut frame: LogFrame) -> Prepared {
        let client_seq = std::mem::take(&mut frame.seq);
        let tail = store::Line::of(&frame).tail;
        // seq is 0 now: proto3 leaves the field out of the encoding.
        let mut payload = Vec::with_capacity(frame.encoded_len());
        frame.encode_raw(&mut payload);
        Prepared {
            session: std::mem::take(&mut frame.session_id),
            client_seq,
            payload: payload.into_boxed_slice(),
            tail,
        }
    }
}

/// Completes a frame record's payload (a [`Prepared::payload`] in `buf`):
/// appends the seq field. Protobuf decoders take a scalar field's last
/// occurrence, and the payload has none before it, so the record decodes
/// as the frame with this seq, as if it had been encoded with it.
pub fn append_seq(buf: &mut Vec<u8>, seq: i64) {
    prost::encoding::int64::encode(SEQ_FIELD, &seq, buf);
}

impl IngestRequest {
    /// A request for `frames`, holding `budget_units` of the admission
    /// budget; prepares each frame ([`Prepared::of`]).
    pub fn new(frames: Vec<LogFrame>, budget_units: u32, reply: oneshot::Sender<IngestReply>) -> Self {
        IngestRequest {
            frames: frames.into_iter().map(Prepared::of).collect(),
            budget_units,
            reply,
            query: None,
        }
    }

    /// A query for `session`'s last seq, holding `budget_units`.
    pub fn query(session: String, budget_units: u32, reply: oneshot::Sender<IngestReply>) -> Self {
        IngestRequest {
            frames: Vec::new(),
            budget_units,
            reply,
            query: Some(session),
        }
    }
}

/// A frame made durable, as its session writer needs it.
#[derive(Debug)]
pub struct DurableFrame {
    /// The WAL record's LSN.
    pub lsn: u64,
    /// The session.
    pub session: String,
    /// The seq and the rendered rest of the line.
    pub line: store::Line,
}

/// Frames made durable by one commit, on their way to the session writers.
pub struct Durable {
    /// In LSN order.
    pub frames: Vec<DurableFrame>,
    /// Budget units to release once they are handed to writers.
    pub budget_units: u32,
}

/// Per-request state between staging and settling.
pub struct Staged {
    outcomes: Vec<Outcome>,
    durable: Vec<DurableFrame>,
    budget_units: u32,
    reply: oneshot::Sender<IngestReply>,
}

/// A session's last seq, and when the sequencer last used it.
struct SeqEntry {
    last: i64,
    used: u64,
}

/// Assigns seqs and appends frames; runs on the commit thread and owns the
/// per-session last-seq map without locks.
///
/// The map is a cache bounded by `LOGD_SEQ_CACHE_SESSIONS_MAX`: once it
/// reaches its sweep size, before a request's sessions are loaded, the
/// least recently used entries whose last seq the metadata store already
/// holds (their session's checkpoint caught up) are dropped; a session's
/// next frame loads its last seq from the store again, exactly as at start.
/// An entry whose checkpoint lags (frames still on their way to the file)
/// is never dropped, so a reload can never return a smaller seq: only the
/// sequencer assigns seqs, and a checkpoint never passes what it assigned.
pub struct Sequencer {
    last_seq: HashMap<String, SeqEntry>,
    /// Use counter for the LRU order.
    clock: u64,
    /// LOGD_SEQ_CACHE_SESSIONS_MAX.
    cache_max: usize,
    /// Sweep when the map holds this many entries.
    sweep_at: usize,
    meta: Arc<dyn MetaStore>,
    to_dispatcher: mpsc::UnboundedSender<Durable>,
    budget: Arc<Semaphore>,
    stats: Arc<IngestStats>,
    metrics: Option<Arc<crate::telemetry::prometheus::Metrics>>,
    fatal: Option<tokio_util::sync::CancellationToken>,
}

impl Sequencer {
    /// Cancels `fatal` when a commit fails: the WAL is poisoned, so the
    /// server stops (exit 1) and a supervisor's restart runs recovery.
    pub fn with_fatal(mut self, fatal: tokio_util::sync::CancellationToken) -> Self {
        self.fatal = Some(fatal);
        self
    }

    /// Records fsync latency and batch sizes in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::telemetry::prometheus::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// A sequencer seeded lazily from checkpoints in `meta` (which recovery
    /// has made exact before this runs).
    pub fn new(
        meta: Arc<dyn MetaStore>,
        to_dispatcher: mpsc::UnboundedSender<Durable>,
        budget: Arc<Semaphore>,
        stats: Arc<IngestStats>,
    ) -> Self {
        Sequencer {
            last_seq: HashMap::new(),
            clock: 0,
            cache_max: usize::MAX,
            sweep_at: usize::MAX,
            meta,
            to_dispatcher,
            budget,
            stats,
            metrics: None,
            fatal: None,
        }
    }

    /// Bounds the last-seq cache to about `max` sessions (see the type's doc).
    pub fn with_cache_max(mut self, max: usize) -> Self {
        assert!(max > 0, "LOGD_SEQ_CACHE_SESSIONS_MAX must be > 0");
        self.cache_max = max;
        self.sweep_at = max;
        self
    }

    fn last_seq(&mut self, session: &str) -> Result<&mut i64, IngestError> {
        self.clock += 1;
        if !self.last_seq.contains_key(session) {
            // Only a store that has no value means "unknown session": a read
            // error must not restart seqs at 1.
            let last = match read_checkpoint(&self.meta, session) {
                Ok(c) => c.map_or(0, |c| c.last_seq),
                Err(e) => {
                    return Err(IngestError::MetaRead {
                        session: session.to_owned(),
                        source: Arc::new(e),
                    });
                }
            };
            self.last_seq.insert(session.to_owned(), SeqEntry { last, used: 0 });
            self.stats
                .seq_cache_sessions
                .store(self.last_seq.len() as u64, Ordering::Relaxed);
        }
        let entry = self.last_seq.get_mut(session).expect("present");
        entry.used = self.clock;
        Ok(&mut entry.last)
    }

    /// Drops least recently used entries the store holds exactly, down to
    /// three quarters of the cap where it can. Runs before a request's
    /// sessions are loaded, never between loading and using them.
    fn sweep(&mut self) {
        let target = self.cache_max - self.cache_max / 4;
        let excess = self.last_seq.len().saturating_sub(target);
        if excess > 0 {
            let mut by_age: Vec<(u64, &String)> = self.last_seq.iter().map(|(k, e)| (e.used, k)).collect();
            by_age.select_nth_unstable_by_key(excess - 1, |(used, _)| *used);
            let oldest: Vec<String> = by_age[..excess].iter().map(|(_, k)| (*k).clone()).collect();
            let mut evicted = 0u64;
            for session in oldest {
                let cached = self.last_seq[&session].last;
                // A read error keeps the entry.
                let stored = self.meta.checkpoint(&session).map(|c| c.map_or(0, |c| c.last_seq));
                if let Ok(stored) = stored {
                    debug_assert!(
                        stored <= cached,
                        "{session}: stored seq {stored} above the cached {cached}"
                    );
                    if stored == cached {
                        self.last_seq.remove(&session);
                        evicted += 1;
                    }
                }
            }
            self.stats.seq_cache_evictions.fetch_add(evicted, Ordering::Relaxed);
        }
        // Entries still waiting for their checkpoint stay; sweep again
        // after a quarter of the cap more.
        self.sweep_at = self.last_seq.len().max(target) + (self.cache_max / 4).max(1);
        self.stats
            .seq_cache_sessions
            .store(self.last_seq.len() as u64, Ordering::Relaxed);
    }

    /// Loads the last seq of every session `req` names, before anything of
    /// it is appended. On a store error the request fails and logd stops
    /// (exit 1; the restart's recovery rebuilds what the store lost).
    fn load_sessions(&mut self, req: &IngestRequest) -> Result<(), IngestError> {
        let sessions = req.query.iter().chain(req.frames.iter().map(|f| &f.session));
        for session in sessions {
            if let Err(why) = self.last_seq(session) {
                tracing::error!("{why}; nothing more is acknowledged, logd stops so a restart can recover");
                if let Some(fatal) = &self.fatal {
                    fatal.cancel();
                }
                return Err(why);
            }
        }
        Ok(())
    }
}

// The sequencer bounds server seqs with `checked_add`: that is SEQ_MAX only
// while SEQ_MAX is the type's maximum.
const _: () = assert!(SEQ_MAX == i64::MAX);

/// A session's checkpoint from the store (failpoint `ingest::meta_read`
/// injects a read error).
fn read_checkpoint(meta: &Arc<dyn MetaStore>, session: &str) -> Result<Option<store::Checkpoint>, store::MetaError> {
    fail::fail_point!("ingest::meta_read", |_| Err(store::MetaError::Transaction(
        "injected read error".to_owned()
    )));
    meta.checkpoint(session)
}

impl Stage for Sequencer {
    type Request = IngestRequest;
    type Staged = Result<Staged, (oneshot::Sender<IngestReply>, u32, IngestError)>;

    fn stage(&mut self, req: IngestRequest, wal: &mut Wal) -> Self::Staged {
        fail::fail_point!("ingest::stage");
        if self.last_seq.len() >= self.sweep_at {
            self.sweep();
        }
        if let Err(why) = self.load_sessions(&req) {
            return Err((req.reply, req.budget_units, why));
        }
        let loaded = "load_sessions loaded every session of the request";
        let mut outcomes = Vec::with_capacity(req.frames.len() + 1);
        if let Some(session) = &req.query {
            outcomes.push(Outcome::LastSeq(self.last_seq[session].last));
        }
        let mut durable = Vec::with_capacity(req.frames.len());
        for frame in req.frames {
            let last = self.last_seq.get(&frame.session).expect(loaded).last;
            let seq = match frame.client_seq {
                // SEQ_MAX is i64::MAX: checked arithmetic is the bound.
                0 => match last.checked_add(1) {
                    Some(next) => next,
                    None => {
                        outcomes.push(Outcome::NoSeqLeft);
                        continue;
                    }
                },
                s if s <= last => {
                    outcomes.push(Outcome::Duplicate);
                    continue;
                }
                s => s,
            };
            debug_assert!((1..=SEQ_MAX).contains(&seq), "validated: seq {seq} in 1..={SEQ_MAX}");
            let record = |buf: &mut Vec<u8>| {
                buf.extend_from_slice(&frame.payload);
                append_seq(buf, seq);
            };
            match wal.append_with(RecordType::Frame, record) {
                Ok(lsn) => {
                    self.last_seq.get_mut(&frame.session).expect(loaded).last = seq;
                    outcomes.push(Outcome::Accepted(seq));
                    durable.push(DurableFrame {
                        lsn,
                        session: frame.session,
                        line: store::Line { seq, tail: frame.tail },
                    });
                }
                Err(e) => return Err((req.reply, req.budget_units, IngestError::Wal(e.to_string().into()))),
            }
        }
        Ok(Staged {
            outcomes,
            durable,
            budget_units: req.budget_units,
            reply: req.reply,
        })
    }

    fn settle(&mut self, batch: Vec<Self::Staged>, result: Result<&CommitInfo, &wal::Error>) {
        if let (Some(m), Ok(info)) = (&self.metrics, result)
            && info.records > 0
        {
            m.wal_fsync_seconds.observe(info.sync_nanos as f64 / 1e9);
            m.wal_commit_batch_records.observe(info.records as f64);
        }
        if let (Some(fatal), Err(e)) = (&self.fatal, result)
            && !fatal.is_cancelled()
        {
            tracing::error!("WAL write failed: {e}; nothing more is acknowledged, logd stops so a restart can recover");
            fatal.cancel();
        }
        for staged in batch {
            match (staged, result) {
                (Ok(s), Ok(_)) => {
                    let accepted = s.durable.len() as u64;
                    let duplicate = s.outcomes.iter().filter(|o| **o == Outcome::Duplicate).count() as u64;
                    self.stats.accepted.fetch_add(accepted, Ordering::Relaxed);
                    self.stats.duplicate.fetch_add(duplicate, Ordering::Relaxed);
                    if s.durable.is_empty() {
                        self.budget.add_permits(s.budget_units as usize);
                    } else if let Err(lost) = self.to_dispatcher.send(Durable {
                        frames: s.durable,
                        budget_units: s.budget_units,
                    }) {
                        // Only during shutdown; the frames are durable in the
                        // WAL and the next start materializes them.
                        self.budget.add_permits(lost.0.budget_units as usize);
                    }
                    let _ = s.reply.send(Ok(s.outcomes));
                }
                (Ok(s), Err(e)) => {
                    self.budget.add_permits(s.budget_units as usize);
                    let _ = s.reply.send(Err(IngestError::Wal(e.to_string().into())));
                }
                (Err((reply, units, why)), _) => {
                    self.budget.add_permits(units as usize);
                    let _ = reply.send(Err(why));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(seq: i64) -> LogFrame {
        LogFrame {
            version: 1,
            time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 7,
            }),
            session_id: "s1".into(),
            user_id: "u".into(),
            role: "r".into(),
            seq,
            content: "hello \"world\"".into(),
            metadata: None,
        }
    }

    #[test]
    fn a_prepared_payload_with_its_seq_decodes_as_the_frame_with_that_seq() {
        for (client_seq, decided) in [(0, 1), (0, i64::MAX), (5, 5), (i64::MAX, i64::MAX)] {
            let p = Prepared::of(frame(client_seq));
            assert_eq!((p.session.as_str(), p.client_seq), ("s1", client_seq));
            let mut record = p.payload.to_vec();
            append_seq(&mut record, decided);
            let back = LogFrame::decode(record.as_slice()).unwrap();
            assert_eq!(back, frame(decided));
            // The tail is the line of that frame after its seq.
            let mut line = Vec::new();
            store::Line {
                seq: decided,
                tail: p.tail,
            }
            .write_to(&mut line);
            let mut want = Vec::new();
            store::render_line(&frame(decided), &mut want);
            assert_eq!(line, want);
        }
    }
}
