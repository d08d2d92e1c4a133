//! [`SimMeta`]: an in-memory metadata store for the power-loss simulation and
//! tests (only with the `sim` feature: not in release builds).

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::meta::{MetaError, MetaStore, Op, Rows, Tree};

type Trees = BTreeMap<Tree, BTreeMap<Vec<u8>, Vec<u8>>>;

/// An in-memory store for the power-loss simulation and tests.
///
/// A write is volatile until [`MetaStore::flush`]. [`SimMeta::crash`] loses
/// every batch not flushed; [`SimMeta::crash_keeping`] keeps a prefix of
/// them, as sled's background flush (which persists its log in order) may
/// have written some before the crash. Batches are atomic either way.
#[derive(Default)]
pub struct SimMeta {
    state: Mutex<SimState>,
}

#[derive(Default)]
struct SimState {
    volatile: Trees,
    durable: Trees,
    /// Batches applied since the last flush, in order.
    unflushed: Vec<Vec<Op>>,
    next_id: u64,
}

fn apply_ops(trees: &mut Trees, ops: &[Op]) {
    for (t, k, v) in ops {
        let tree = trees.entry(*t).or_default();
        match v {
            Some(v) => tree.insert(k.clone(), v.clone()),
            None => tree.remove(k),
        };
    }
}

impl SimMeta {
    /// An empty store.
    pub fn new() -> Self {
        SimMeta::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Batches not flushed yet.
    pub fn unflushed(&self) -> usize {
        self.state().unflushed.len()
    }

    /// Power loss: only flushed writes survive.
    pub fn crash(&self) {
        self.crash_keeping(0);
    }

    /// Power loss that also keeps the first `keep` unflushed batches.
    pub fn crash_keeping(&self, keep: usize) {
        let mut st = self.state();
        let unflushed = std::mem::take(&mut st.unflushed);
        for ops in unflushed.iter().take(keep) {
            apply_ops(&mut st.durable, ops);
        }
        st.volatile = st.durable.clone();
    }
}

impl MetaStore for SimMeta {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, MetaError> {
        Ok(self.state().volatile.get(&tree).and_then(|t| t.get(key).cloned()))
    }
    fn apply(&self, ops: Vec<Op>) -> Result<(), MetaError> {
        let mut st = self.state();
        apply_ops(&mut st.volatile, &ops);
        st.unflushed.push(ops);
        Ok(())
    }
    fn scan(&self, tree: Tree) -> Result<Rows, MetaError> {
        let st = self.state();
        Ok(st
            .volatile
            .get(&tree)
            .map(|t| t.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default())
    }
    fn outbox_len(&self) -> Result<usize, MetaError> {
        Ok(self.state().volatile.get(&Tree::Outbox).map_or(0, |t| t.len()))
    }
    fn flush(&self) -> Result<(), MetaError> {
        let mut st = self.state();
        st.unflushed.clear();
        st.durable = st.volatile.clone();
        Ok(())
    }
    fn next_id(&self) -> Result<u64, MetaError> {
        // Ids must grow across crashes too (sled's generate_id does).
        let mut st = self.state();
        st.next_id += 1;
        Ok(st.next_id)
    }
}
