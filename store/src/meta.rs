//! The metadata store: per-session checkpoints, rotations in progress,
//! compressions in progress and the event outbox. sled in production
//! ([`SledMeta`]); `SimMeta` (feature `sim`) in the power-loss simulation, where only what
//! was flushed survives a crash.
//!
//! Never the only record of anything: session files and the WAL are the
//! truth, and a lost store is rebuilt from them (see `recovery::Replayer`).
//!
//! The store is a small set of ordered key-value trees with atomic batches
//! ([`MetaStore::apply`]); the typed operations are provided methods.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::events::Event;
use crate::records::{Checkpoint, CompressJob, Rotation};

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// sled failed.
    #[error("meta store: {0}")]
    Sled(#[from] sled::Error),
    /// A multi-tree transaction failed.
    #[error("meta store transaction: {0}")]
    Transaction(String),
    /// A stored value did not decode.
    #[error("meta store: bad value in {tree:?} for {key}: {source}")]
    Decode {
        /// The tree.
        tree: Tree,
        /// Its key.
        key: String,
        /// The decode error.
        #[source]
        source: rmp_serde::decode::Error,
    },
}

/// The trees of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tree {
    /// session → [`Checkpoint`].
    Checkpoints,
    /// session → [`Rotation`] between its record and its completion.
    Rotations,
    /// rotated file name → [`CompressJob`] until its `.log` is removed.
    Compressions,
    /// big-endian u64 id → [`Event`], until Redis accepted it.
    Outbox,
    /// Single values about the WAL, e.g. [`MATERIALIZED_BELOW_LSN_KEY`].
    Marks,
}

/// Key in [`Tree::Marks`]: every WAL record with a lower LSN is in its
/// session's file, fdatasynced and checkpointed (big-endian u64). Written
/// with the flush that makes those checkpoints durable, before WAL segments
/// are deleted; salvage uses it to tell a damaged record that is already in
/// a session file from one that is lost.
pub const MATERIALIZED_BELOW_LSN_KEY: &[u8] = b"materialized_below_lsn";

impl Tree {
    /// Every tree.
    pub const ALL: [Tree; 5] = [
        Tree::Checkpoints,
        Tree::Rotations,
        Tree::Compressions,
        Tree::Outbox,
        Tree::Marks,
    ];

    fn name(self) -> &'static str {
        match self {
            Tree::Checkpoints => "checkpoints",
            Tree::Rotations => "rotations",
            Tree::Compressions => "compressions",
            Tree::Outbox => "outbox",
            Tree::Marks => "marks",
        }
    }
}

/// Entries of a tree, in key order.
pub type Rows = Vec<(Vec<u8>, Vec<u8>)>;

/// One write of an atomic batch: `None` deletes.
pub type Op = (Tree, Vec<u8>, Option<Vec<u8>>);

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(v).expect("metadata encodes")
}

fn dec<T: for<'de> Deserialize<'de>>(tree: Tree, key: &[u8], v: &[u8]) -> Result<T, MetaError> {
    rmp_serde::from_slice(v).map_err(|source| MetaError::Decode {
        tree,
        key: String::from_utf8_lossy(key).into(),
        source,
    })
}

/// A durable store of ordered trees. Writes become durable at `flush`.
pub trait MetaStore: Send + Sync + 'static {
    /// The value at `key`.
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, MetaError>;
    /// Applies every op atomically (all or none, also across a crash).
    fn apply(&self, ops: Vec<Op>) -> Result<(), MetaError>;
    /// Every entry of a tree, in key order.
    fn scan(&self, tree: Tree) -> Result<Rows, MetaError>;
    /// The first `max` entries of a tree, in key order (without reading the rest).
    fn scan_first(&self, tree: Tree, max: usize) -> Result<Rows, MetaError> {
        let mut rows = self.scan(tree)?;
        rows.truncate(max);
        Ok(rows)
    }
    /// Makes every earlier write durable.
    fn flush(&self) -> Result<(), MetaError>;
    /// A new id, greater than every id returned before (also across restarts).
    fn next_id(&self) -> Result<u64, MetaError>;

    /// The session's checkpoint, if any.
    fn checkpoint(&self, session: &str) -> Result<Option<Checkpoint>, MetaError> {
        let key = session.as_bytes();
        self.get(Tree::Checkpoints, key)?
            .map(|v| dec(Tree::Checkpoints, key, &v))
            .transpose()
    }
    /// Records a checkpoint (durable after the next `flush`).
    fn put_checkpoint(&self, session: &str, ckpt: &Checkpoint) -> Result<(), MetaError> {
        self.apply(vec![checkpoint_op(session, ckpt)])
    }
    /// Every checkpoint.
    fn checkpoints(&self) -> Result<Vec<(String, Checkpoint)>, MetaError> {
        let rows = self.scan(Tree::Checkpoints)?;
        rows.iter()
            .map(|(k, v)| Ok((String::from_utf8_lossy(k).into_owned(), dec(Tree::Checkpoints, k, v)?)))
            .collect()
    }
    /// Every WAL record below this LSN was materialized and checkpointed
    /// (0: unknown). See [`MATERIALIZED_BELOW_LSN_KEY`].
    fn materialized_below_lsn(&self) -> Result<u64, MetaError> {
        Ok(self
            .get(Tree::Marks, MATERIALIZED_BELOW_LSN_KEY)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map_or(0, u64::from_be_bytes))
    }
    /// The session's rotation recorded but not finished, if any.
    fn rotation(&self, session: &str) -> Result<Option<Rotation>, MetaError> {
        let key = session.as_bytes();
        self.get(Tree::Rotations, key)?
            .map(|v| dec(Tree::Rotations, key, &v))
            .transpose()
    }
    /// Rotations recorded but not finished.
    fn rotations(&self) -> Result<Vec<Rotation>, MetaError> {
        self.scan(Tree::Rotations)?
            .iter()
            .map(|(k, v)| dec(Tree::Rotations, k, v))
            .collect()
    }
    /// The compression job of the rotated file `name`, if it is not finished.
    fn compress_job(&self, name: &str) -> Result<Option<CompressJob>, MetaError> {
        let key = name.as_bytes();
        self.get(Tree::Compressions, key)?
            .map(|v| dec(Tree::Compressions, key, &v))
            .transpose()
    }
    /// Compressions not finished.
    fn compress_jobs(&self) -> Result<Vec<CompressJob>, MetaError> {
        self.scan(Tree::Compressions)?
            .iter()
            .map(|(k, v)| dec(Tree::Compressions, k, v))
            .collect()
    }
    /// Up to `max` events of the outbox, oldest first, with their keys
    /// (reads only those).
    fn outbox(&self, max: usize) -> Result<Vec<(Vec<u8>, Event)>, MetaError> {
        let rows = self.scan_first(Tree::Outbox, max)?;
        rows.into_iter()
            .map(|(k, v)| Ok((k.clone(), dec(Tree::Outbox, &k, &v)?)))
            .collect()
    }
    /// Events waiting in the outbox. The stores keep a count (metrics
    /// scrapes, `GetStats`, every mirror pass and every rotation ask).
    fn outbox_len(&self) -> Result<usize, MetaError>;
}

/// The op that records a checkpoint.
pub fn checkpoint_op(session: &str, ckpt: &Checkpoint) -> Op {
    (Tree::Checkpoints, session.as_bytes().to_vec(), Some(enc(ckpt)))
}

/// The op that records (`Some`) or clears (`None`) a session's rotation.
pub fn rotation_op(session: &str, rot: Option<&Rotation>) -> Op {
    (Tree::Rotations, session.as_bytes().to_vec(), rot.map(enc))
}

/// The op that records (`Some`) or clears (`None`) a compression job.
pub fn compress_op(name: &str, job: Option<&CompressJob>) -> Op {
    (Tree::Compressions, name.as_bytes().to_vec(), job.map(enc))
}

/// The op that appends an event to the outbox under `id`.
pub fn event_op(id: u64, event: &Event) -> Op {
    (Tree::Outbox, id.to_be_bytes().to_vec(), Some(enc(event)))
}

/// The op that records that every WAL record below `lsn` is materialized
/// and checkpointed (durable after the next `flush`).
pub fn materialized_below_op(lsn: u64) -> Op {
    (
        Tree::Marks,
        MATERIALIZED_BELOW_LSN_KEY.to_vec(),
        Some(lsn.to_be_bytes().to_vec()),
    )
}

/// The op that removes a delivered event.
pub fn event_delete_op(key: &[u8]) -> Op {
    (Tree::Outbox, key.to_vec(), None)
}

/// sled-backed store (pinned to 0.34.7).
pub struct SledMeta {
    trees: Vec<(Tree, sled::Tree)>,
    db: sled::Db,
    /// Entries of the outbox tree: counted once at open, then kept by
    /// [`MetaStore::apply`] (the only writer), exact whenever no apply is
    /// in progress.
    outbox_len: std::sync::atomic::AtomicI64,
}

/// How long [`SledMeta::open`] waits for a lock held by a store this
/// process just closed.
pub const SLED_LOCK_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(5);

impl SledMeta {
    /// Opens (or creates) the store in `dir`.
    ///
    /// A store closed in this process may still be locked for a moment:
    /// sled's background threads drop their handles (and the file lock)
    /// shortly after the last `Db`. Opening waits for that lock up to
    /// [`SLED_LOCK_WAIT_MAX`] (another process holding it is refused
    /// earlier, by the state directory's own lock).
    pub fn open(dir: &Path) -> Result<Self, MetaError> {
        let deadline = std::time::Instant::now() + SLED_LOCK_WAIT_MAX;
        let db = loop {
            match sled::Config::new().path(dir).flush_every_ms(Some(1000)).open() {
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock") && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                other => break other?,
            }
        };
        let trees: Vec<(Tree, sled::Tree)> = Tree::ALL
            .iter()
            .map(|t| Ok((*t, db.open_tree(t.name())?)))
            .collect::<Result<_, MetaError>>()?;
        let outbox = &trees.iter().find(|(t, _)| *t == Tree::Outbox).expect("opened").1;
        let outbox_len = std::sync::atomic::AtomicI64::new(outbox.len() as i64);
        Ok(SledMeta { trees, db, outbox_len })
    }

    fn tree(&self, t: Tree) -> &sled::Tree {
        &self.trees.iter().find(|(k, _)| *k == t).expect("every tree is open").1
    }
}

impl MetaStore for SledMeta {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, MetaError> {
        Ok(self.tree(tree).get(key)?.map(|v| v.to_vec()))
    }

    fn apply(&self, ops: Vec<Op>) -> Result<(), MetaError> {
        use sled::Transactional;
        let touched: std::collections::BTreeSet<Tree> = ops.iter().map(|(t, _, _)| *t).collect();
        // The outbox's count needs each op's previous value: a transaction
        // gives it (a batch does not).
        if touched.len() <= 1 && !touched.contains(&Tree::Outbox) {
            // One tree: a sled batch is atomic.
            let Some(t) = touched.into_iter().next() else {
                return Ok(());
            };
            let mut batch = sled::Batch::default();
            for (_, k, v) in ops {
                match v {
                    Some(v) => batch.insert(k, v),
                    None => batch.remove(k),
                }
            }
            return Ok(self.tree(t).apply_batch(batch)?);
        }
        let trees: Vec<&sled::Tree> = Tree::ALL.iter().map(|t| self.tree(*t)).collect();
        let outbox_delta = trees
            .as_slice()
            .transaction(|tx| {
                // A transaction may run more than once: count per attempt.
                let mut outbox_delta = 0i64;
                for (t, k, v) in &ops {
                    let i = Tree::ALL.iter().position(|x| x == t).expect("known tree");
                    let previous = match v {
                        Some(v) => tx[i].insert(k.as_slice(), v.as_slice())?,
                        None => tx[i].remove(k.as_slice())?,
                    };
                    if *t == Tree::Outbox {
                        outbox_delta += i64::from(v.is_some()) - i64::from(previous.is_some());
                    }
                }
                Ok(outbox_delta)
            })
            .map_err(|e: sled::transaction::TransactionError<()>| MetaError::Transaction(format!("{e:?}")))?;
        self.outbox_len
            .fetch_add(outbox_delta, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn scan(&self, tree: Tree) -> Result<Rows, MetaError> {
        self.tree(tree)
            .iter()
            .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(Into::into))
            .collect()
    }

    fn scan_first(&self, tree: Tree, max: usize) -> Result<Rows, MetaError> {
        self.tree(tree)
            .iter()
            .take(max)
            .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(Into::into))
            .collect()
    }

    fn outbox_len(&self) -> Result<usize, MetaError> {
        // The count is adjusted after each transaction commits, so an event
        // removed right after its insert committed (the mirror is quick) may
        // make it dip below zero for an instant: never below the truth once
        // both applies returned.
        let n = self.outbox_len.load(std::sync::atomic::Ordering::Relaxed);
        Ok(n.max(0) as usize)
    }

    fn flush(&self) -> Result<(), MetaError> {
        self.db.flush()?;
        Ok(())
    }

    fn next_id(&self) -> Result<u64, MetaError> {
        Ok(self.db.generate_id()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::SimMeta;

    #[test]
    fn sled_batches_across_trees_are_applied_together_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let m = SledMeta::open(dir.path()).unwrap();
            let ckpt = Checkpoint {
                offset: 10,
                last_seq: 3,
                last_lsn: 7,
                opened_at_ms: 1,
            };
            m.apply(vec![checkpoint_op("s", &ckpt), compress_op("f.log", None)])
                .unwrap();
            m.flush().unwrap();
        }
        let m = SledMeta::open(dir.path()).unwrap();
        assert_eq!(m.checkpoint("s").unwrap().unwrap().last_seq, 3);
        assert!(m.next_id().unwrap() < m.next_id().unwrap());
    }

    fn event(n: u64) -> Event {
        Event {
            event_id: format!("rotated:s:{n}-{n}"),
            instance: String::new(),
            kind: crate::events::EventKind::Rotated,
            session_id: "s".into(),
            path: format!("s.{n}.log"),
            first_seq: n as i64,
            last_seq: n as i64,
            frames: 1,
            bytes: 100,
            first_time: String::new(),
            last_time: String::new(),
            reason: crate::events::RotateReason::Size,
            compression: "none".into(),
            checksum: "crc32:00000000".into(),
            timestamp_ms: 0,
        }
    }

    #[test]
    fn the_outbox_count_follows_inserts_deletes_and_reopen_and_answers_without_a_scan() {
        let dir = tempfile::tempdir().unwrap();
        const EVENTS: u64 = 20_000;
        {
            let m = SledMeta::open(dir.path()).unwrap();
            for chunk in (1..=EVENTS).collect::<Vec<_>>().chunks(1000) {
                m.apply(chunk.iter().map(|i| event_op(*i, &event(*i))).collect())
                    .unwrap();
            }
            assert_eq!(m.outbox_len().unwrap(), EVENTS as usize);
            // With a checkpoint in the same batch, and a re-put of a key.
            m.apply(vec![
                checkpoint_op("s", &Checkpoint::default()),
                event_op(1, &event(1)),
                event_delete_op(&2u64.to_be_bytes()),
                event_delete_op(&(EVENTS + 7).to_be_bytes()), // absent
            ])
            .unwrap();
            assert_eq!(m.outbox_len().unwrap(), EVENTS as usize - 1);
            // Many reads (a metrics scrape, GetStats, a mirror pass each)
            // cost no scan of the tree: 2,000 of them over 20,000 events
            // took 105 s here when each one scanned the tree.
            let t = std::time::Instant::now();
            for _ in 0..2000 {
                assert_eq!(m.outbox_len().unwrap(), EVENTS as usize - 1);
            }
            assert!(t.elapsed() < std::time::Duration::from_secs(2), "{:?}", t.elapsed());
            let first = m.outbox(3).unwrap();
            let ids: Vec<&str> = first.iter().map(|(_, e)| e.event_id.as_str()).collect();
            assert_eq!(ids, ["rotated:s:1-1", "rotated:s:3-3", "rotated:s:4-4"]);
            m.flush().unwrap();
        }
        let m = SledMeta::open(dir.path()).unwrap();
        assert_eq!(m.outbox_len().unwrap(), EVENTS as usize - 1, "counted again at open");
    }

    #[test]
    fn the_outbox_count_is_exact_after_concurrent_inserts_and_removals() {
        let dir = tempfile::tempdir().unwrap();
        let m = std::sync::Arc::new(SledMeta::open(dir.path()).unwrap());
        const EVENTS: u64 = 2000;
        let producer = {
            let m = m.clone();
            std::thread::spawn(move || {
                for i in 1..=EVENTS {
                    m.apply(vec![event_op(i, &event(i))]).unwrap();
                }
            })
        };
        // A quick consumer, like the mirror: removes what it sees at once.
        let mut removed = 0;
        while removed < EVENTS {
            let _ = m.outbox_len().unwrap(); // a scrape meanwhile
            for (k, _) in m.outbox(100).unwrap() {
                m.apply(vec![event_delete_op(&k)]).unwrap();
                removed += 1;
            }
        }
        producer.join().unwrap();
        assert_eq!(m.outbox_len().unwrap(), 0);
        assert_eq!(m.scan(Tree::Outbox).unwrap().len(), 0);
    }

    #[test]
    fn sim_meta_forgets_what_was_not_flushed() {
        let m = SimMeta::new();
        m.put_checkpoint("a", &Checkpoint::default()).unwrap();
        m.flush().unwrap();
        m.put_checkpoint("b", &Checkpoint::default()).unwrap();
        m.crash();
        assert!(m.checkpoint("a").unwrap().is_some());
        assert!(m.checkpoint("b").unwrap().is_none());
    }
}
