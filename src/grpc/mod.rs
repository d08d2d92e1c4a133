//! The edge: the gRPC services (`LogService`, `AdminService`, OTLP's
//! `LogsService`), their codec,
//! per-frame validation, bearer-token auth and connection limits. Frames
//! that pass go to the pipeline's sequencer.

pub(crate) mod auth;
pub(crate) mod codec;
pub(crate) mod conn;
pub(crate) mod otlp;
pub(crate) mod service;
pub(crate) mod validate;
