//! End-to-end tests: the real `logd` binary, real gRPC over TCP, real files.

mod ingest;
mod restart;
mod util;
