//! logd: a WAL-first durable log acceptance service.
//!
//! The data path, front to back (see `docs/ARCHITECTURE.md`):
//! [`service`] validates frames and submits them to [`ingest`]'s commit
//! thread, which assigns seqs, appends to the WAL (crate `wal`) and fsyncs by
//! group commit before any ack; [`writer`] materializes durable frames into
//! per-session files through [`materialize`], checkpoints them in [`meta`],
//! and deletes WAL segments once materialized. [`server`] wires it together
//! and runs the recovery pass (crate `recovery`) before serving.

pub mod bench;
pub mod checkpoints;
pub mod codec;
pub mod config;
pub mod encoding;
pub mod ingest;
pub mod metrics;
pub mod mirror;
pub mod openfiles;
pub mod server;
pub mod service;
pub mod sessions;
pub mod target;
pub mod validate;
pub mod writer;

/// Generated protobuf and gRPC code of `proto/logging/v1`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    pub use store::pb::*;
    tonic::include_proto!("logging.v1");

    /// Encoded file descriptors, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("logging_v1_descriptor");
}
