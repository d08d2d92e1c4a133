//! The vocabulary between a [`SessionWriter`] and its driver (the async
//! task in [`super::tasks`] or the power-loss simulation): the [`Step`] it
//! needs before it can go on, and the [`Output`]s it reports.

use std::time::Duration;

use store::{Checkpoint, Rotation};

#[cfg(doc)]
use super::SessionWriter;

/// What the driver must do before calling [`SessionWriter::poll`] again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do until the next input.
    Idle,
    /// The file must be opened and no open-file slot is held: get one
    /// ([`crate::pipeline::openfiles::OpenFiles`]), then [`SessionWriter::slot_granted`].
    NeedSlot,
    /// The next operation blocks on the disk (open, fdatasync, rotation):
    /// call [`SessionWriter::run_blocking`], off the async runtime.
    Blocking,
    /// Record this checkpoint in the store, then
    /// [`SessionWriter::checkpoint_put`] with the result.
    PutCheckpoint(Checkpoint),
    /// A transient error: wait this long, then [`SessionWriter::retry_now`].
    RetryAfter(Duration),
}

/// What a writer tells the world, in order.
#[derive(Debug)]
pub enum Output {
    /// Give back this many units of the admission budget (a batch is written).
    Budget(u32),
    /// The session's checkpoint now covers every record it got up to `lsn`.
    Checkpointed {
        /// LSN of the last record the checkpoint covers.
        lsn: u64,
    },
    /// A file was rotated (events and compression were recorded in the store).
    Rotated(Rotation),
    /// The answer to the rotation request `token`: the rotated file's name
    /// (None: nothing to rotate), or why not.
    RotateReply {
        /// As given to [`SessionWriter::rotate`].
        token: u64,
        /// The result.
        result: Result<Option<String>, String>,
    },
    /// A non-transient error: logd must stop (exit 1) so that a restart
    /// recovers the file from the disk and the WAL.
    FailStop(String),
    /// Idle: stop taking frames. The driver closes the writer's queue, hands
    /// over what is still in it, then calls [`SessionWriter::stop`].
    CloseQueue,
    /// The writer is done ([`SessionWriter::stop`] finished): its file is
    /// synced, checkpointed and closed.
    Stopped {
        /// Whether it stopped for being idle (the dispatcher is told).
        idle: bool,
    },
}
