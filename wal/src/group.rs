//! Group commit: many appenders, a committer thread and a syncer thread,
//! and the two steps they run, which a simulator may call itself.
//!
//! Appenders [`Submitter::submit`] requests to a queue and return at once
//! (the caller waits on its own completion channel). Each batch then goes
//! through two steps:
//! - [`write_step`] (on the `wal-commit` thread): lets the [`Stage`] append
//!   each request's records in submission order, then writes the batch with
//!   one write ([`Wal::write_batch`]). The result, a [`Written`], holds what
//!   was staged and the written-but-unsynced batch ([`Unsynced`]);
//! - [`sync_steps`] (on the `wal-sync` thread): makes every batch written so
//!   far durable with ONE fdatasync of the newest ([`Unsynced::sync`],
//!   through the WAL's sync gate; an fdatasync covers every earlier write to
//!   the file, and a roll synced the segments before) and only then settles
//!   every request of them ([`Stage::settle`]). [`sync_step`] is the same for
//!   one batch.
//!
//! The threads are thin shells: the committer takes up to
//! `batch_requests_max` queued requests, calls [`write_step`] and hands the
//! [`Written`] to the syncer over an unbounded channel, never waiting for
//! it; the syncer takes every batch in the channel and calls [`sync_steps`]
//! on them. So a request that arrives while fdatasync N runs is written at
//! once and made durable by fdatasync N+1: it waits at most for the
//! fdatasync in flight and its own, and one fdatasync covers every request
//! that arrived during the previous one (with 64 clients and one frame in
//! flight each, about 64 frames per fdatasync, not 10). The encoding work
//! hides behind the disk. The stage lock is taken once per request while
//! staging and once per fdatasync to settle, never across an fdatasync. The
//! queues are unbounded: callers bound what they put in flight (logd admits
//! requests through a byte budget).
//!
//! # Invariants
//! - Batches are synced and settled in the order they were written
//!   ([`Unsynced::sync`] asserts it).
//! - After a failed fdatasync every later batch fails too, even one whose
//!   own fdatasync returns Ok (the WAL is poisoned; see [`Wal::commit`]).
//! - A request is settled exactly once, and settled Ok only after an
//!   fdatasync that covered its records returned Ok.
//!
//! # Driving the steps from a simulator
//! A single-threaded simulator (the power-loss test on
//! `sim::SimFs`, with the `sim` feature) may run the same steps in any
//! interleaving the threads could produce:
//! - hold several [`Written`] batches at once (written, not yet synced);
//! - call [`sync_step`] or [`sync_steps`] on them in write order at any
//!   later time, one or several at once (syncing out of order is a bug the
//!   WAL asserts against);
//! - run more [`write_step`]s in between, including ones whose appends roll
//!   a segment: the roll's fdatasync then runs, in program order, before a
//!   pending batch's, as it may on the threads;
//! - drop everything at any point (a kill): a dropped [`Written`] is never
//!   settled, so nothing in it is acknowledged.
//!
//! The stage sits in a `Mutex` so that the threads can share it; a
//! simulator owns one too and passes it to both steps.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::log::{CommitInfo, Unsynced, Wal};

/// What the committer does with requests. `stage` runs in [`write_step`]
/// (the committer thread) and `settle` in [`sync_step`] (the syncer thread),
/// never at the same time (the stage sits behind a mutex), so it may own state (logd's per-session seq
/// counters) without locks of its own.
pub trait Stage: Send + 'static {
    /// A unit of work submitted by an appender.
    type Request: Send + 'static;
    /// What `stage` produced for one request, kept until the batch settles.
    type Staged: Send;

    /// Appends the records of `req` to `wal` (not yet durable). Failures are
    /// the stage's to record in `Staged`; the WAL poisons itself on I/O errors.
    fn stage(&mut self, req: Self::Request, wal: &mut Wal) -> Self::Staged;

    /// Called once per batch, after the commit: `Ok` means every record
    /// staged in `batch` is durable; `Err` means none may be acknowledged.
    fn settle(&mut self, batch: Vec<Self::Staged>, result: std::result::Result<&CommitInfo, &Error>);
}

/// A batch after [`write_step`]: staged and written, not yet durable.
/// Nothing in it may be acknowledged before [`sync_step`] settles it;
/// dropping it (a kill) settles nothing.
pub struct Written<T> {
    /// What [`Stage::stage`] produced for each request, in submission order.
    pub staged: Vec<T>,
    /// The written batch, or the error of its write (or of a roll while
    /// staging, which poisoned the WAL).
    pub unsynced: Result<Unsynced>,
}

impl<T> std::fmt::Debug for Written<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Written")
            .field("requests", &self.staged.len())
            .field("unsynced", &self.unsynced.as_ref().map(|u| u.durable_lsn_end()))
            .finish()
    }
}

/// The first step of a batch: stages each request of `requests` in order
/// (taking the stage lock once per request), then writes everything staged
/// with one write ([`Wal::write_batch`]; page cache, not durable).
pub fn write_step<S: Stage>(
    wal: &mut Wal,
    stage: &Mutex<S>,
    requests: impl IntoIterator<Item = S::Request>,
) -> Written<S::Staged> {
    let requests = requests.into_iter();
    let mut staged = Vec::with_capacity(requests.size_hint().0);
    for req in requests {
        staged.push(stage.lock().unwrap().stage(req, wal));
    }
    let unsynced = wal.write_batch();
    Written { staged, unsynced }
}

/// The second step of a batch: one fdatasync ([`Unsynced::sync`], through
/// the WAL's sync gate; it fails once any earlier fdatasync failed), then
/// [`Stage::settle`] under the stage lock, which is not held during the
/// fdatasync. Batches must go through here in the order [`write_step`]
/// wrote them. Returns the commit's result as the stage saw it.
pub fn sync_step<S: Stage>(written: Written<S::Staged>, stage: &Mutex<S>) -> Result<CommitInfo> {
    sync_steps(std::iter::once(written), stage)
}

/// The second step for every batch written so far, at once: ONE fdatasync
/// makes them all durable, then one [`Stage::settle`] answers every request
/// of them, in write order. An fdatasync covers every write made to the
/// file before it, and a batch on an earlier segment was made durable by
/// the roll's fdatasync that closed that segment (a failed roll poisons the
/// WAL, so the fdatasync here fails too). When any batch's write failed,
/// none of them is acknowledged. With no batch, nothing happens.
pub fn sync_steps<S: Stage>(
    batches: impl IntoIterator<Item = Written<S::Staged>>,
    stage: &Mutex<S>,
) -> Result<CommitInfo> {
    let mut staged: Vec<S::Staged> = Vec::new();
    let mut newest: Option<Result<Unsynced>> = None;
    for w in batches {
        if staged.is_empty() {
            staged = w.staged;
        } else {
            staged.extend(w.staged);
        }
        newest = Some(match (newest, w.unsynced) {
            (None, u) => u,
            (Some(Err(e)), _) | (Some(Ok(_)), Err(e)) => Err(e),
            (Some(Ok(earlier)), Ok(mut later)) => {
                later.absorb(earlier);
                Ok(later)
            }
        });
    }
    let Some(unsynced) = newest else {
        return Ok(CommitInfo::default());
    };
    let result = unsynced.and_then(Unsynced::sync);
    crate::crash_point!("wal::commit::after_fsync");
    stage.lock().unwrap().settle(staged, result.as_ref());
    result
}

/// The syncer's wait for the rest of a cohort. Clients that wait for their
/// ack before sending again (one frame in flight each) come back together,
/// one round trip after their fdatasync settled them. If the syncer started
/// the next fdatasync on the few requests that beat them, the clients would
/// split into two groups that alternate, each fdatasync covering half of them
/// at half the throughput. So when fewer requests are written than the
/// previous fdatasync settled, the syncer waits for the rest, at most a
/// quarter of a recent fdatasync's time ([`COHORT_WAIT_MAX`] at most): a
/// slow disk loses little to the wait and gains a full batch, a fast one
/// waits a few microseconds. The wait changes when the fdatasync runs, never
/// what it covers: nothing is acknowledged before it returns.
#[derive(Default)]
struct Cohort {
    /// Requests the previous fdatasync settled.
    last: usize,
    /// Recent fdatasync time (exponentially weighted, 1/4 per sample).
    sync_time: Duration,
}

/// The longest the syncer waits for the rest of a cohort.
const COHORT_WAIT_MAX: Duration = Duration::from_millis(5);

impl Cohort {
    /// Adds to `batches` what is written until it holds as many requests as
    /// the previous fdatasync settled, or the wait is over.
    fn gather<T>(&self, written: &std::sync::mpsc::Receiver<Written<T>>, batches: &mut Vec<Written<T>>) {
        let mut requests: usize = batches.iter().map(|b| b.staged.len()).sum();
        if requests >= self.last {
            return;
        }
        let deadline = Instant::now() + (self.sync_time / 4).min(COHORT_WAIT_MAX);
        while requests < self.last {
            let left = deadline.saturating_duration_since(Instant::now());
            match written.recv_timeout(left) {
                Ok(batch) => {
                    requests += batch.staged.len();
                    batches.push(batch);
                }
                Err(_) => return, // the wait is over, or the committer is gone
            }
        }
    }

    /// Notes an fdatasync that settled `requests` and took `took`.
    fn synced(&mut self, requests: usize, took: Duration) {
        self.last = requests;
        self.sync_time = (self.sync_time * 3 + took) / 4;
    }
}

struct Queue<R> {
    items: VecDeque<R>,
    closed: bool,
}

struct Shared<R> {
    queue: Mutex<Queue<R>>,
    ready: Condvar,
}

/// The handle appenders use; cloneable.
pub struct GroupCommit<S: Stage> {
    shared: Arc<Shared<S::Request>>,
    thread: Option<JoinHandle<(Wal, S)>>,
}

/// A cloneable submitter for a running [`GroupCommit`].
pub struct Submitter<R> {
    shared: Arc<Shared<R>>,
}

impl<R> Clone for Submitter<R> {
    fn clone(&self) -> Self {
        Submitter {
            shared: self.shared.clone(),
        }
    }
}

impl<R: Send> Submitter<R> {
    /// Queues a request; it is staged in the next batch. Fails once shut down.
    pub fn submit(&self, req: R) -> Result<()> {
        let mut q = self.shared.queue.lock().unwrap();
        if q.closed {
            return Err(Error::Closed);
        }
        q.items.push_back(req);
        drop(q);
        self.shared.ready.notify_one();
        Ok(())
    }
}

impl<S: Stage> GroupCommit<S> {
    /// Starts the committer thread, which owns `wal` and `stage` until
    /// [`GroupCommit::shutdown`]. `batch_requests_max` bounds one batch.
    pub fn start(wal: Wal, stage: S, batch_requests_max: usize) -> Self {
        assert!(batch_requests_max > 0, "a batch holds at least one request");
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                closed: false,
            }),
            ready: Condvar::new(),
        });
        let stage = Arc::new(Mutex::new(stage));
        // The committer never waits for the syncer: whatever arrives while
        // an fdatasync runs is written at once, and the syncer's next
        // fdatasync covers every batch written by then (`sync_steps`). So a
        // request waits at most for the fdatasync in flight and its own.
        // The channel is unbounded; what it holds is bounded by what callers
        // put in flight (logd's admission budget).
        let (to_sync, written) = std::sync::mpsc::channel::<Written<S::Staged>>();
        let sync_stage = stage.clone();
        let syncer = std::thread::Builder::new()
            .name("wal-sync".into())
            .spawn(move || {
                let mut cohort = Cohort::default();
                while let Ok(first) = written.recv() {
                    let mut batches = vec![first];
                    batches.extend(written.try_iter());
                    cohort.gather(&written, &mut batches);
                    let requests = batches.iter().map(|b| b.staged.len()).sum();
                    let started = Instant::now();
                    let _ = sync_steps(batches, &sync_stage);
                    cohort.synced(requests, started.elapsed());
                }
            })
            .expect("spawn wal-sync thread");
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("wal-commit".into())
            .spawn(move || {
                let mut wal = wal;
                let mut taken = VecDeque::new();
                loop {
                    {
                        let mut q = thread_shared.queue.lock().unwrap();
                        while q.items.is_empty() && !q.closed {
                            q = thread_shared.ready.wait(q).unwrap();
                        }
                        if q.items.is_empty() && q.closed {
                            break;
                        }
                        if q.items.len() <= batch_requests_max {
                            std::mem::swap(&mut q.items, &mut taken);
                        } else {
                            taken.extend(q.items.drain(..batch_requests_max));
                        }
                    }
                    let batch = write_step(&mut wal, &stage, taken.drain(..));
                    if to_sync.send(batch).is_err() {
                        break; // the syncer is gone (it panicked)
                    }
                }
                drop(to_sync);
                syncer.join().expect("wal-sync thread panicked");
                let stage = match Arc::try_unwrap(stage) {
                    Ok(m) => m.into_inner().unwrap(),
                    Err(_) => unreachable!("the syncer has exited"),
                };
                (wal, stage)
            })
            .expect("spawn wal-commit thread");
        GroupCommit {
            shared,
            thread: Some(thread),
        }
    }

    /// A handle for appenders.
    pub fn submitter(&self) -> Submitter<S::Request> {
        Submitter {
            shared: self.shared.clone(),
        }
    }

    /// Stops taking requests, commits and settles everything already queued,
    /// and returns the WAL and the stage.
    pub fn shutdown(mut self) -> (Wal, S) {
        self.shared.queue.lock().unwrap().closed = true;
        self.shared.ready.notify_all();
        self.thread
            .take()
            .expect("not yet joined")
            .join()
            .expect("wal-commit thread panicked")
    }
}

impl<S: Stage> Drop for GroupCommit<S> {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.shared.queue.lock().unwrap().closed = true;
            self.shared.ready.notify_all();
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(requests: usize) -> Written<()> {
        Written {
            staged: vec![(); requests],
            unsynced: Err(Error::Closed),
        }
    }

    fn cohort(last: usize, sync_time: Duration) -> Cohort {
        Cohort { last, sync_time }
    }

    #[test]
    fn the_rest_of_a_cohort_already_written_joins_the_fdatasync() {
        let (tx, rx) = std::sync::mpsc::channel();
        tx.send(batch(2)).unwrap();
        tx.send(batch(5)).unwrap(); // beyond the cohort: left for the next fdatasync
        let mut batches = vec![batch(1)];
        cohort(3, Duration::from_secs(1)).gather(&rx, &mut batches);
        assert_eq!(batches.iter().map(|b| b.staged.len()).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(rx.try_iter().count(), 1);
    }

    #[test]
    fn a_complete_cohort_is_synced_without_waiting() {
        let (tx, rx) = std::sync::mpsc::channel();
        tx.send(batch(1)).unwrap(); // written after: not waited for
        let mut batches = vec![batch(4)];
        cohort(4, Duration::from_secs(60)).gather(&rx, &mut batches);
        assert_eq!(batches.len(), 1);
        assert_eq!(rx.try_iter().count(), 1, "gather did not take from the channel");
    }

    #[test]
    fn an_incomplete_cohort_waits_a_quarter_of_an_fdatasync_at_most() {
        let (_tx, rx) = std::sync::mpsc::channel::<Written<()>>();
        let mut batches = vec![batch(1)];
        let t = Instant::now();
        cohort(64, Duration::from_millis(8)).gather(&rx, &mut batches);
        let waited = t.elapsed();
        assert!(waited >= Duration::from_millis(2), "the wait ended early: {waited:?}");
        assert_eq!(batches.len(), 1);
        // A very slow disk: the wait is capped.
        let t = Instant::now();
        cohort(64, Duration::from_secs(10)).gather(&rx, &mut batches);
        assert!(t.elapsed() >= COHORT_WAIT_MAX, "{:?}", t.elapsed());
    }

    #[test]
    fn the_cohort_follows_the_last_fdatasync() {
        let mut c = Cohort::default();
        c.synced(64, Duration::from_millis(8));
        assert_eq!((c.last, c.sync_time), (64, Duration::from_millis(2)));
        c.synced(10, Duration::from_millis(8));
        assert_eq!((c.last, c.sync_time), (10, Duration::from_micros(3500)));
    }
}
