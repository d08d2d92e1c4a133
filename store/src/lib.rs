//! Session files and the metadata store: everything logd keeps on disk
//! besides the WAL (crate `wal`), synchronous and through [`wal::fs::Fs`], so
//! the service's writers, the recovery pass (crate `recovery`) and the
//! power-loss simulation run the very same code.
//!
//! Modules, leaves first: [`events`] and [`records`] (what the store holds),
//! [`names`] (session ids and file names), [`line`] (the JSON line format),
//! [`meta`] (the metadata store), [`file`] (a session's live `.logtmp`),
//! [`rotate`] (rotation and compression steps).

pub mod events;
pub mod file;
pub mod line;
pub mod meta;
pub mod names;
pub mod records;
pub mod rotate;
#[cfg(any(test, feature = "sim"))]
pub mod sim;

pub use events::{Event, EventKind, RotateReason, event_id, now_ms};
pub use file::{Appended, FileError, FileOp, OpenRepair, SessionFile, move_aside, session_file_refusal};
pub use line::{Line, format_time, line_seq, render_line, render_tail};
pub use meta::{
    MATERIALIZED_BELOW_LSN_KEY, MetaError, MetaStore, Op, Rows, SledMeta, Tree, checkpoint_op, compress_op,
    event_delete_op, event_op, materialized_below_op, rotation_op,
};
pub use names::{
    GZ_SUFFIX, LOG_SUFFIX, LOGTMP_SUFFIX, RotatedName, SESSION_ID_BYTES_MAX, logtmp_path, parse_rotated_name,
    rotated_name, session_id_is_valid,
};
pub use records::{Checkpoint, CompressJob, FileStats, Rotation, SEQ_MAX};
pub use rotate::{
    Compressed, CompressionRun, Lifecycle, StepError, checksum, complete_rotation, compress_step, compressed_event,
    file_stats, remove_source, rename_step, rotate_synced, rotated_event, run_compression,
};
#[cfg(any(test, feature = "sim"))]
pub use sim::SimMeta;

/// The protobuf messages of `proto/logging/v1/logging.proto` (the services
/// are generated in `logd::pb`, which re-exports these).
#[allow(missing_docs, clippy::all)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/logging.v1.rs"));
}
