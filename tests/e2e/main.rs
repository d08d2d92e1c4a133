//! End-to-end tests: the real `logd` binary, real gRPC over TCP, real files.

mod alerts;
mod crash;
mod events;
mod failstop;
mod fresh_segment;
mod fsync_real;
mod hostile;
mod ingest;
mod instance;
mod lifecycle;
mod operator;
mod ops;
mod otlp;
mod recover;
mod redis_server;
mod restart;
mod util;
