//! The metadata store: per-session checkpoints (and, later, rotation records
//! and the event outbox). sled in production, behind [`MetaStore`] so the
//! power-loss simulation can model "only what was flushed survives".
//!
//! Never the only record of anything: session files and the WAL are the
//! truth, and a lost store is rebuilt from them.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// sled failed.
    #[error("meta store: {0}")]
    Sled(#[from] sled::Error),
    /// A stored value did not decode.
    #[error("meta store: bad value for {key}: {source}")]
    Decode {
        /// Its key.
        key: String,
        /// The decode error.
        #[source]
        source: rmp_serde::decode::Error,
    },
}

/// Where a session's materialization stands. Written after the session file
/// was fdatasynced up to `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Checkpoint {
    /// Bytes of the `.logtmp` that are durable and hold whole lines.
    pub offset: u64,
    /// Highest seq materialized for the session (in any of its files).
    pub last_seq: i64,
    /// LSN of the last WAL record materialized.
    pub last_lsn: u64,
}

/// A durable key-value store for metadata. Writes become durable at `flush`.
pub trait MetaStore: Send + Sync + 'static {
    /// The session's checkpoint, if any.
    fn checkpoint(&self, session: &str) -> Result<Option<Checkpoint>, MetaError>;
    /// Records a checkpoint (durable after the next `flush`).
    fn put_checkpoint(&self, session: &str, ckpt: &Checkpoint) -> Result<(), MetaError>;
    /// Every checkpoint.
    fn checkpoints(&self) -> Result<Vec<(String, Checkpoint)>, MetaError>;
    /// Makes every earlier write durable.
    fn flush(&self) -> Result<(), MetaError>;
}

/// sled-backed store (pinned to 0.34.7).
pub struct SledMeta {
    checkpoints: sled::Tree,
    db: sled::Db,
}

impl SledMeta {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, MetaError> {
        let db = sled::Config::new().path(dir).flush_every_ms(Some(1000)).open()?;
        let checkpoints = db.open_tree("checkpoints")?;
        Ok(SledMeta { checkpoints, db })
    }
}

fn decode<T: for<'de> Deserialize<'de>>(key: &[u8], v: &[u8]) -> Result<T, MetaError> {
    rmp_serde::from_slice(v).map_err(|source| MetaError::Decode {
        key: String::from_utf8_lossy(key).into(),
        source,
    })
}

impl MetaStore for SledMeta {
    fn checkpoint(&self, session: &str) -> Result<Option<Checkpoint>, MetaError> {
        self.checkpoints
            .get(session.as_bytes())?
            .map(|v| decode(session.as_bytes(), &v))
            .transpose()
    }
    fn put_checkpoint(&self, session: &str, ckpt: &Checkpoint) -> Result<(), MetaError> {
        let v = rmp_serde::to_vec(ckpt).expect("checkpoint encodes");
        self.checkpoints.insert(session.as_bytes(), v)?;
        Ok(())
    }
    fn checkpoints(&self) -> Result<Vec<(String, Checkpoint)>, MetaError> {
        let mut out = Vec::new();
        for kv in self.checkpoints.iter() {
            let (k, v) = kv?;
            out.push((String::from_utf8_lossy(&k).into_owned(), decode(&k, &v)?));
        }
        Ok(out)
    }
    fn flush(&self) -> Result<(), MetaError> {
        self.db.flush()?;
        Ok(())
    }
}
