//! Group commit: many appenders, a committer thread and a syncer thread.
//!
//! Appenders [`GroupCommit::submit`] requests to a queue and return at once
//! (the caller waits on its own completion channel). The committer thread
//! takes everything queued, lets the [`Stage`] append each request's records
//! in submission order, writes the batch with one write
//! ([`Wal::write_batch`]) and hands it to the syncer thread, which makes it
//! durable with one fdatasync ([`Unsynced::sync`]) and only then settles
//! every request of the batch. The two are pipelined: batch N+1 is staged
//! and written while batch N's fdatasync runs (one batch waits at most), so
//! the encoding work hides behind the disk. Batches grow by themselves while
//! an fdatasync is in flight, with no added wait. Batches are synced and
//! settled in order, and after a failed fdatasync every later batch fails
//! too. The queue itself is unbounded: callers bound what they put in
//! flight (logd admits requests through a byte budget).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crate::error::{Error, Result};
use crate::log::{CommitInfo, Unsynced, Wal};

/// What the committer does with requests. `stage` runs on the committer
/// thread and `settle` on the syncer thread, never at the same time (the
/// stage sits behind a mutex), so it may own state (logd's per-session seq
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
        // One written batch waits while another syncs: deeper queues would
        // only split what could be one larger batch.
        let (to_sync, written) = std::sync::mpsc::sync_channel::<(Vec<S::Staged>, Result<Unsynced>)>(1);
        let sync_stage = stage.clone();
        let syncer = std::thread::Builder::new()
            .name("wal-sync".into())
            .spawn(move || {
                for (staged, unsynced) in written {
                    let result = unsynced.and_then(Unsynced::sync);
                    crate::crash_point!("wal::commit::after_fsync");
                    sync_stage.lock().unwrap().settle(staged, result.as_ref());
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
                    let mut staged = Vec::with_capacity(taken.len());
                    for req in taken.drain(..) {
                        staged.push(stage.lock().unwrap().stage(req, &mut wal));
                    }
                    let unsynced = wal.write_batch();
                    if to_sync.send((staged, unsynced)).is_err() {
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
