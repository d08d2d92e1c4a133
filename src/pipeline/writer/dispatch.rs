//! The dispatcher's decisions, as plain functions over plain data: the
//! async dispatcher ([`super::tasks`]) and the power-loss simulation drive
//! the same code.
//!
//! - [`route`]: a durable batch from the commit thread is grouped by session
//!   (LSN order kept within each), each group gets its share of the batch's
//!   admission budget (the shares sum exactly to the batch's units), and the
//!   [`CheckpointTracker`] records what was routed.
//! - [`writer_for`]: which writer takes a session's frames. A writer that
//!   stopped taking frames (idle) may still be writing what was queued to
//!   it: its successor is started with it as predecessor and waits for it,
//!   so one file never has two writers.
//! - [`on_stopped`]: a writer's stop report removes it only if it is still
//!   the session's registered writer.
//! - [`rotate_targets`]: which sessions a rotation request reaches.
//! - [`remove_segments`]: flush the store, then delete WAL segments below
//!   the tracker's safe LSN.
//!
//! # Invariants (asserted)
//! - The admission budget of a batch is split exactly: no unit is lost or
//!   made up.
//! - Records are routed in LSN order, and a checkpoint never covers an LSN
//!   that was not routed to its session.

use foldhash::{HashMap, HashMapExt};
use std::hash::BuildHasher;
use tracing::{debug, error};
use wal::Segments;

use crate::pipeline::DurableFrame;
use store::{Line, MetaStore};

/// One session's part of a routed batch.
#[derive(Debug)]
pub struct Delivery {
    /// The session.
    pub session: String,
    /// Its frames' `(lsn, line)`, in LSN order.
    pub frames: Vec<(u64, Line)>,
    /// Its share of the batch's admission budget.
    pub units: u32,
}

/// Groups a durable batch by session and splits its `budget_units` among
/// the groups by frames (the last group takes the rounding); records the
/// routing in `tracker`. An empty batch routes nothing: its units come back
/// as `Err(units)` for the caller to return to the budget.
pub fn route(
    tracker: &mut CheckpointTracker,
    frames: Vec<DurableFrame>,
    budget_units: u32,
) -> Result<Vec<Delivery>, u32> {
    let Some(last_lsn) = frames.last().map(|f| f.lsn) else {
        return Err(budget_units);
    };
    let total_frames = frames.len() as u64;
    // Groups in order of first appearance (deterministic).
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut groups: Vec<Delivery> = Vec::new();
    for DurableFrame { lsn, session, line } in frames {
        match index.get(&session) {
            Some(&i) => groups[i].frames.push((lsn, line)),
            None => {
                index.insert(session.clone(), groups.len());
                groups.push(Delivery {
                    session,
                    frames: vec![(lsn, line)],
                    units: 0,
                });
            }
        }
    }
    // Each session's share of the budget, by frames; the shares sum exactly.
    let n = groups.len();
    let mut units_left = budget_units;
    for (i, g) in groups.iter_mut().enumerate() {
        tracker.routed(&g.session, g.frames[0].0, g.frames[g.frames.len() - 1].0);
        g.units = if i + 1 == n {
            units_left
        } else {
            ((budget_units as u64 * g.frames.len() as u64) / total_frames) as u32
        };
        units_left -= g.units;
    }
    tracker.routed_through(last_lsn);
    assert_eq!(
        groups.iter().map(|g| g.units as u64).sum::<u64>(),
        budget_units as u64,
        "the admission budget of a batch is split exactly"
    );
    Ok(groups)
}

/// The session's writer (`H`: the caller's handle), started with
/// `start(predecessor)` if none takes frames. A writer that stopped taking
/// frames (`accepting` false) but may still be draining its queue is
/// replaced, and handed to its successor, which waits for it.
pub fn writer_for<'a, H, B: BuildHasher>(
    writers: &'a mut std::collections::HashMap<String, H, B>,
    session: &str,
    accepting: impl Fn(&H) -> bool,
    start: impl FnOnce(Option<H>) -> H,
) -> &'a mut H {
    let stale = writers.get(session).is_some_and(|w| !accepting(w));
    let predecessor = if stale { writers.remove(session) } else { None };
    writers.entry(session.to_owned()).or_insert_with(|| start(predecessor))
}

/// A writer of `session` reported that it stopped (idle). If the
/// registered writer is that one (`is_it`), it is removed, the tracker
/// forgets the session, and it is returned; a successor registered
/// meanwhile stays, even one that is itself stopping by now (it still
/// writes: a writer started for the session's next frame must wait for it).
pub fn on_stopped<H, B: BuildHasher>(
    writers: &mut std::collections::HashMap<String, H, B>,
    tracker: &mut CheckpointTracker,
    session: &str,
    is_it: impl Fn(&H) -> bool,
) -> Option<H> {
    if writers.get(session).is_some_and(is_it) {
        tracker.forget(session);
        return writers.remove(session);
    }
    None
}

/// The sessions a rotation request reaches: one (if it has a writer or a
/// live file: a session with neither has nothing to rotate, and starting a
/// writer for it would only make an empty file) or every active one.
pub fn rotate_targets<H, B: BuildHasher>(
    writers: &std::collections::HashMap<String, H, B>,
    session: Option<String>,
    live_file: impl Fn(&str) -> bool,
) -> Vec<String> {
    match session {
        Some(s) if !writers.contains_key(&s) && !live_file(&s) => Vec::new(),
        Some(s) => vec![s],
        None => writers.keys().cloned().collect(),
    }
}

/// Flushes the checkpoint store (with the `materialized_below_lsn` mark
/// salvage reads), then deletes WAL segments below `safe`. Returns `safe`
/// when done, 0 when something failed (segments are kept).
pub fn remove_segments(meta: &dyn MetaStore, segments: &Segments, safe: u64) -> u64 {
    // Checkpoints must be durable before the WAL records they cover go:
    // recovery starts from a checkpoint's offset when it scans a file.
    if let Err(e) = meta
        .apply(vec![store::materialized_below_op(safe)])
        .and_then(|()| meta.flush())
    {
        error!("meta store flush failed, keeping WAL segments: {e}");
        return 0;
    }
    wal::crash_point!("dispatcher::after_meta_flush");
    match segments.remove_before(safe) {
        Ok(n) => {
            if n > 0 {
                debug!(removed = n, below_lsn = safe, "wal segments removed");
            }
            safe
        }
        Err(e) => {
            error!("removing WAL segments below LSN {safe} failed: {e}");
            0
        }
    }
}

/// Which WAL records are materialized and checkpointed, so the segments
/// holding only such records can be deleted. Pure bookkeeping: the
/// dispatcher and the power-loss simulation drive the same code.
///
/// # Invariants
/// - Every record below [`CheckpointTracker::safe_lsn`] is in its session's
///   file, fdatasynced, and covered by a checkpoint that was written (the
///   caller flushes the store before deleting segments).
/// - Records are routed in LSN order, so a record not yet routed has an LSN
///   above `routed_through`.
#[derive(Debug, Default)]
pub struct CheckpointTracker {
    sessions: HashMap<String, Track>,
    routed_through: u64,
}

#[derive(Debug, Default)]
struct Track {
    /// LSN of the last record routed to the session.
    routed_lsn: u64,
    /// Lowest LSN that may not be checkpointed yet (None: all checkpointed).
    pending_from: Option<u64>,
}

impl CheckpointTracker {
    /// A tracker for a WAL whose records below `start_lsn` are all materialized.
    pub fn new(start_lsn: u64) -> Self {
        CheckpointTracker {
            sessions: HashMap::new(),
            routed_through: start_lsn.saturating_sub(1),
        }
    }

    /// Records LSNs `first..=last` (some of them) routed to `session`.
    pub fn routed(&mut self, session: &str, first: u64, last: u64) {
        debug_assert!(
            first <= last && first > self.routed_through,
            "records are routed in LSN order"
        );
        let t = match self.sessions.get_mut(session) {
            Some(t) => t,
            None => self.sessions.entry(session.to_owned()).or_default(),
        };
        t.routed_lsn = last;
        t.pending_from.get_or_insert(first);
    }

    /// Every record up to `lsn` has been routed.
    pub fn routed_through(&mut self, lsn: u64) {
        debug_assert!(lsn >= self.routed_through, "routing never goes back");
        self.routed_through = lsn;
    }

    /// The session's checkpoint now covers every record it got up to `lsn`.
    pub fn checkpointed(&mut self, session: &str, lsn: u64) {
        if let Some(t) = self.sessions.get_mut(session) {
            debug_assert!(
                lsn <= t.routed_lsn,
                "{session}: checkpointed LSN {lsn} past the last routed {}",
                t.routed_lsn
            );
            t.pending_from = if lsn >= t.routed_lsn { None } else { Some(lsn + 1) };
        }
    }

    /// Every record below the returned LSN is materialized and checkpointed.
    pub fn safe_lsn(&self) -> u64 {
        let pending = self.sessions.values().filter_map(|t| t.pending_from).min();
        pending.unwrap_or(u64::MAX).min(self.routed_through + 1)
    }

    /// LSN of the last record routed.
    pub fn last_routed(&self) -> u64 {
        self.routed_through
    }

    /// Stops tracking a session with nothing pending (its writer stopped).
    pub fn forget(&mut self, session: &str) {
        if self.sessions.get(session).is_some_and(|t| t.pending_from.is_none()) {
            self.sessions.remove(session);
        }
    }
}
