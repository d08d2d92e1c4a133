//! [`CheckpointBatcher`]: group commit of session writers' checkpoints into
//! the metadata store.

use store::{Checkpoint, MetaStore, Op, checkpoint_op};

/// Checkpoints waiting in the batcher's queue, at most.
const CHECKPOINT_QUEUE_MAX: usize = 4096;
/// Checkpoints applied as one store batch, at most.
const CHECKPOINT_BATCH_MAX: usize = 4096;

type CheckpointPut = (String, Checkpoint, tokio::sync::oneshot::Sender<Result<(), String>>);

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
    pub fn start(meta: std::sync::Arc<dyn MetaStore>) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<CheckpointPut>(CHECKPOINT_QUEUE_MAX);
        tokio::spawn(async move {
            let mut batch = Vec::new();
            while let Some(first) = rx.recv().await {
                batch.push(first);
                while batch.len() < CHECKPOINT_BATCH_MAX {
                    match rx.try_recv() {
                        Ok(put) => batch.push(put),
                        Err(_) => break,
                    }
                }
                let ops: Vec<Op> = batch.iter().map(|(s, c, _)| checkpoint_op(s, c)).collect();
                let meta = meta.clone();
                let result = match tokio::task::spawn_blocking(move || meta.apply(ops)).await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(e) => Err(format!("checkpoint batch task failed: {e}")),
                };
                for (_, _, reply) in batch.drain(..) {
                    let _ = reply.send(result.clone());
                }
            }
        });
        CheckpointBatcher { tx }
    }

    /// Records `ckpt` for `session`, in a batch with whatever other writers
    /// put meanwhile.
    pub async fn put(&self, session: &str, ckpt: &Checkpoint) -> Result<(), String> {
        let (reply, applied) = tokio::sync::oneshot::channel();
        let stopped = || "the checkpoint batcher stopped".to_string();
        self.tx
            .send((session.to_owned(), *ckpt, reply))
            .await
            .map_err(|_| stopped())?;
        applied.await.map_err(|_| stopped())?
    }
}
