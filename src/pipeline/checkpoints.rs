//! [`CheckpointBatcher`]: group commit of session writers' checkpoints into
//! the metadata store, and its synchronous core [`CheckpointBatch`], which
//! the power-loss simulation drives directly.

use std::sync::Arc;

use store::{Checkpoint, MetaError, MetaStore, Op, checkpoint_op};

/// Checkpoints waiting in the batcher's queue, at most.
const CHECKPOINT_QUEUE_MAX: usize = 4096;
/// Checkpoints applied as one store batch, at most.
const CHECKPOINT_BATCH_MAX: usize = 4096;

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
            while let Some((session, ckpt, reply)) = rx.recv().await {
                let mut batch = CheckpointBatch::default();
                batch.push(session, ckpt, reply);
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
