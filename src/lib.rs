//! logd: a WAL-first durable log acceptance service.
//!
//! The data path, front to back (see `docs/ARCHITECTURE.md`): `grpc`
//! validates frames and submits them to the [`pipeline`]'s sequencer, which
//! assigns seqs, appends to the WAL (crate `wal`) and fsyncs by group commit
//! before any ack; the pipeline's writers turn durable frames into session
//! files (crate `store`), checkpoint them and delete WAL segments once
//! materialized; `outbox` delivers file events to Redis; `telemetry` counts.
//! `server` wires it together and runs the recovery pass (crate `recovery`)
//! before serving; [`cli`] runs the subcommands of the `logd` binary, whose
//! flags are in [`config`].
//!
//! Layers (each module uses only those before it; `tests/layers.rs` checks):
//! `telemetry` < `pipeline`, `outbox` < `grpc`, `config` < `server` < `cli`.

pub mod cli;
pub mod config;
pub(crate) mod grpc;
pub(crate) mod outbox;
pub mod pipeline;
pub(crate) mod server;
pub(crate) mod telemetry;

/// Generated protobuf and gRPC code of `proto/logging/v1`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    pub use store::pb::*;
    tonic::include_proto!("logging.v1");

    /// Encoded file descriptors, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("logging_v1_descriptor");
}
