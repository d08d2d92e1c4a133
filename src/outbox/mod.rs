//! The outbox's delivery: events recorded in the metadata store go to a
//! Redis stream, at least once and in order.

pub(crate) mod encoding;
pub(crate) mod mirror;
