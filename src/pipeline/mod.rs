//! The data path behind the edge: the sequencer (seqs, WAL group commit),
//! the dispatcher and one writer per session (session files, checkpoints,
//! rotation, the compression pool), the bounds on open files and active
//! sessions, and checkpoint batching.
//!
//! Public here: what the power-loss simulation (`tests/powerloss/`) drives.

pub(crate) mod checkpoints;
pub(crate) mod openfiles;
pub(crate) mod sequencer;
pub(crate) mod sessions;
pub mod writer;

pub use crate::telemetry::stats::DispatchStats;
pub use crate::telemetry::stats::IngestStats;
pub use checkpoints::{CheckpointBatch, CheckpointError};
pub use openfiles::OpenFiles;
pub use sequencer::{Durable, DurableFrame, IngestRequest, Outcome, Sequencer};
pub use sequencer::{IngestError, IngestReply};
pub use writer::{CheckpointTracker, PENDING_WRITE_BYTES};
