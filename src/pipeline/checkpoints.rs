//! [`CheckpointBatcher`]: group commit of session writers' checkpoints into
//! the metadata store, and its synchronous core [`CheckpointBatch`], which
//! the power-loss simulation drives directly.

use std::sync::Arc;

use store::{Checkpoint, MetaError, MetaStore, Op, checkpoint_op};

/// Checkpoints waiting in the batcher's queue, at most.
const CHECKPOINT_QUEUE_MAX: usize = 4096;
/// Checkpoints applied as one store batch, at most.
const CHECKPOINT_BATCH_MAX: usize = 4096;
/// Store batches start at least this far apart: a put that comes within
/// this time of the last batch waits for the rest of it, so that the puts
/// of many writers' ticks go in one batch. Writers tick at different
/// moments, and sled's cost is per batch more than per checkpoint: with
/// 1,000 sessions at 20,000 frames/s, batches taken as they came (a few
/// puts each) cost logd 4.7-5.3 s of CPU in 6 s, batches at least 10 ms
/// apart 2.9-3.2 s (and at full load, 574-582k -> 594-602k frames/s). A
/// lone put (no batch in the last 10 ms) goes at once.
const CHECKPOINT_BATCH_INTERVAL_MIN: std::time::Duration = std::time::Duration::from_millis(10);

/// Why a checkpoint was not recorded. Every writer of the failed batch gets
/// the same error, so the store's is shared.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CheckpointError {
    /// The store refused the batch holding the checkpoint.
    #[error("checkpoint batch of {puts} failed: {source}")]
    Store {
        /// Checkpoints in the failed batch.
        puts: usize,
        /// The store's error.
        #[source]
        source: Arc<MetaError>,
    },
    /// The batching task is gone (shutdown, or it panicked).
    #[error("the checkpoint batcher stopped")]
    Stopped,
}

type CheckpointPut = (
    String,
    Checkpoint,
    tokio::sync::oneshot::Sender<Result<(), CheckpointError>>,
);

/// Group commit for checkpoints: session writers all checkpoint on the same
/// `LOG_FLUSH_INTERVAL_MS` tick, and one store batch of N checkpoints costs
/// sled far less than N single writes (with 1,000 busy sessions, single
/// writes were ~30% of logd's CPU). [`CheckpointBatcher::put`] returns once
/// the batch holding the checkpoint was applied (not yet flushed: as with
/// [`MetaStore::put_checkpoint`], durable after the next `flush`), so a
/// writer's checkpoints stay in order with its other steps.
#[derive(Clone)]
pub struct CheckpointBatcher {
    tx: tokio::sync::mpsc::Sender<CheckpointPut>,
}

impl CheckpointBatcher {
    /// Starts the batching task on the current tokio runtime; it ends when
    /// every handle is dropped.
    pub fn start(meta: Arc<dyn MetaStore>) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<CheckpointPut>(CHECKPOINT_QUEUE_MAX);
        tokio::spawn(async move {
            let now = tokio::time::Instant::now();
            let mut last_batch = now.checked_sub(CHECKPOINT_BATCH_INTERVAL_MIN).unwrap_or(now);
            while let Some((session, ckpt, reply)) = rx.recv().await {
                let mut batch = CheckpointBatch::default();
                batch.push(session, ckpt, reply);
                tokio::time::sleep_until(last_batch + CHECKPOINT_BATCH_INTERVAL_MIN).await;
                last_batch = tokio::time::Instant::now();
                while !batch.is_full() {
                    match rx.try_recv() {
                        Ok((s, c, reply)) => batch.push(s, c, reply),
                        Err(_) => break,
                    }
                }
                let meta = meta.clone();
                let (result, replies) = match tokio::task::spawn_blocking(move || batch.apply(meta.as_ref())).await {
                    Ok(done) => done,
                    Err(e) => {
                        tracing::error!("checkpoint batch task failed: {e}");
                        continue; // the replies are dropped: every put fails
                    }
                };
                for reply in replies {
                    let _ = reply.send(result.clone());
                }
            }
        });
        CheckpointBatcher { tx }
    }

    /// Records `ckpt` for `session`, in a batch with whatever other writers
    /// put meanwhile.
    pub async fn put(&self, session: &str, ckpt: &Checkpoint) -> Result<(), CheckpointError> {
        let (reply, applied) = tokio::sync::oneshot::channel();
        self.tx
            .send((session.to_owned(), *ckpt, reply))
            .await
            .map_err(|_| CheckpointError::Stopped)?;
        applied.await.map_err(|_| CheckpointError::Stopped)?
    }
}

/// The batching core of [`CheckpointBatcher`], without tokio: checkpoints
/// put meanwhile (each with what to tell its writer, `R`), applied as one
/// store batch of at most `CHECKPOINT_BATCH_MAX`.
pub struct CheckpointBatch<R> {
    puts: Vec<(String, Checkpoint, R)>,
}

impl<R> Default for CheckpointBatch<R> {
    fn default() -> Self {
        CheckpointBatch { puts: Vec::new() }
    }
}

impl<R> CheckpointBatch<R> {
    /// Adds a put (call only while not [`CheckpointBatch::is_full`]).
    pub fn push(&mut self, session: String, ckpt: Checkpoint, reply: R) {
        debug_assert!(!self.is_full(), "a batch holds at most CHECKPOINT_BATCH_MAX puts");
        self.puts.push((session, ckpt, reply));
    }

    /// Whether the batch takes no more puts.
    pub fn is_full(&self) -> bool {
        self.puts.len() >= CHECKPOINT_BATCH_MAX
    }

    /// Puts waiting.
    pub fn len(&self) -> usize {
        self.puts.len()
    }

    /// Whether no put waits.
    pub fn is_empty(&self) -> bool {
        self.puts.is_empty()
    }

    /// Applies every put as one store batch (not flushed); returns the
    /// result for all of them and their replies, in the order put.
    pub fn apply(self, meta: &dyn MetaStore) -> (Result<(), CheckpointError>, Vec<R>) {
        let ops: Vec<Op> = self.puts.iter().map(|(s, c, _)| checkpoint_op(s, c)).collect();
        let puts = ops.len();
        let result = meta.apply(ops).map_err(|e| CheckpointError::Store {
            puts,
            source: Arc::new(e),
        });
        (result, self.puts.into_iter().map(|(_, _, r)| r).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use store::{Rows, SledMeta, Tree};

    /// The real store, counting the batches applied to it.
    struct Counting {
        inner: SledMeta,
        applies: AtomicUsize,
    }

    impl MetaStore for Counting {
        fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, MetaError> {
            self.inner.get(tree, key)
        }
        fn apply(&self, ops: Vec<Op>) -> Result<(), MetaError> {
            self.applies.fetch_add(1, Ordering::SeqCst);
            self.inner.apply(ops)
        }
        fn scan(&self, tree: Tree) -> Result<Rows, MetaError> {
            self.inner.scan(tree)
        }
        fn flush(&self) -> Result<(), MetaError> {
            self.inner.flush()
        }
        fn next_id(&self) -> Result<u64, MetaError> {
            self.inner.next_id()
        }
        fn outbox_len(&self) -> Result<usize, MetaError> {
            self.inner.outbox_len()
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn writers_that_tick_a_little_apart_share_batches_at_least_the_interval_apart() {
        let dir = tempfile::tempdir().unwrap();
        let meta = Arc::new(Counting {
            inner: SledMeta::open(dir.path()).unwrap(),
            applies: AtomicUsize::new(0),
        });
        let batcher = CheckpointBatcher::start(meta.clone());
        let ckpt = |n: u64| Checkpoint {
            offset: n,
            last_seq: n as i64,
            last_lsn: n,
            opened_at_ms: 0,
        };
        batcher.put("first", &ckpt(1)).await.unwrap();
        assert_eq!(
            meta.applies.load(Ordering::SeqCst),
            1,
            "a lone put is a batch of its own"
        );
        // 60 writers whose ticks come 1 ms apart (as unaligned writers' do).
        let started = std::time::Instant::now();
        let writers: Vec<_> = (0..60u64)
            .map(|i| {
                let batcher = batcher.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(std::time::Duration::from_millis(i)).await;
                    batcher.put(&format!("s{i}"), &ckpt(i + 2)).await
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap().unwrap();
        }
        let elapsed = started.elapsed();
        let batches = meta.applies.load(Ordering::SeqCst) - 1;
        // Batches start at least the interval apart: within `elapsed`, at
        // most one per interval and one more. (Taken as they came, with a
        // sled batch faster than 1 ms, this was about one batch per put.)
        let bound = 2 + (elapsed.as_millis() / CHECKPOINT_BATCH_INTERVAL_MIN.as_millis()) as usize;
        println!("60 puts over {elapsed:?}: {batches} batches (at most {bound})");
        assert!(batches <= bound, "{batches} batches in {elapsed:?}, at most {bound}");
        for i in 0..60u64 {
            assert_eq!(meta.checkpoint(&format!("s{i}")).unwrap(), Some(ckpt(i + 2)), "s{i}");
        }
    }
}
