//! File lifecycle events: what ETL consumers learn from the Redis stream.
//!
//! An event is recorded in the metadata store's outbox in the same atomic
//! step that records the file change it announces, and removed from the
//! outbox only after Redis accepted it: delivery is at least once, in order.
//! `event_id` is deterministic (kind, session, seq range, and the
//! publishing instance, [`Event::stamp_instance`]), so a re-sent event
//! carries the same id and consumers can dedupe on it.

use serde::{Deserialize, Serialize};

/// What happened to a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// A `.logtmp` was renamed to its final `.log` name.
    Rotated,
    /// A rotated `.log` was compressed to `.log.gz` (and the `.log` removed).
    Compressed,
}

/// Why a file was rotated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RotateReason {
    /// `LOG_MAX_SIZE_BYTES` reached.
    Size,
    /// `LOG_MAX_AGE_SECONDS` since the file was opened.
    Age,
    /// `LOG_IDLE_TIMEOUT_SECONDS` without frames.
    Idle,
    /// `logd rotate` or the admin RPC.
    Manual,
    /// Re-announced by recovery (the store was rebuilt).
    Recovery,
}

/// One event, as stored in the outbox and sent as the stream's `content`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// `<kind>:<session>:<first_seq>-<last_seq>@<instance>` once published
    /// (stored without the `@<instance>`): the same for every resend, and
    /// distinct across instances, which may each hold a file of the same
    /// session and range after a failover.
    pub event_id: String,
    /// The logd instance whose `LOG_DIR` holds `path` (`LOGD_INSTANCE`),
    /// set when the event is published; empty in the outbox.
    #[serde(default)]
    pub instance: String,
    /// What happened.
    pub kind: EventKind,
    /// The session.
    pub session_id: String,
    /// The finished file, relative to `LOG_DIR`.
    pub path: String,
    /// First seq in the file.
    pub first_seq: i64,
    /// Last seq in the file.
    pub last_seq: i64,
    /// Lines (frames) in the file.
    pub frames: u64,
    /// Size of the finished file in bytes.
    pub bytes: u64,
    /// `time` of the first frame (RFC 3339).
    pub first_time: String,
    /// `time` of the last frame (RFC 3339).
    pub last_time: String,
    /// Why the file was rotated.
    pub reason: RotateReason,
    /// `none` or `gzip`.
    pub compression: String,
    /// Checksum of the finished file, as `crc32:<8 hex digits>`.
    pub checksum: String,
    /// When the event was recorded (unix milliseconds).
    pub timestamp_ms: u64,
}

impl Event {
    /// Names the instance that publishes the event: sets `instance` and
    /// appends `@<instance>` to `event_id` (an id stamped already is kept).
    pub fn stamp_instance(&mut self, instance: &str) {
        debug_assert!(!instance.is_empty(), "an instance has a name");
        if self.instance.is_empty() {
            self.instance = instance.to_owned();
            self.event_id = format!("{}@{instance}", self.event_id);
        }
        debug_assert_eq!(self.instance, instance, "an event is published by one instance");
    }
}

/// The deterministic id of an event (before [`Event::stamp_instance`]).
pub fn event_id(kind: EventKind, session: &str, first_seq: i64, last_seq: i64) -> String {
    let k = match kind {
        EventKind::Rotated => "rotated",
        EventKind::Compressed => "compressed",
    };
    format!("{k}:{session}:{first_seq}-{last_seq}")
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_are_deterministic_per_kind_session_and_range() {
        assert_eq!(event_id(EventKind::Rotated, "s", 1, 9), "rotated:s:1-9");
        assert_ne!(
            event_id(EventKind::Compressed, "s", 1, 9),
            event_id(EventKind::Rotated, "s", 1, 9)
        );
    }

    #[test]
    fn a_published_event_names_its_instance_in_its_id_once() {
        let mut e = Event {
            event_id: event_id(EventKind::Rotated, "s", 1, 9),
            instance: String::new(),
            kind: EventKind::Rotated,
            session_id: "s".into(),
            path: "p".into(),
            first_seq: 1,
            last_seq: 9,
            frames: 9,
            bytes: 1,
            first_time: String::new(),
            last_time: String::new(),
            reason: RotateReason::Size,
            compression: "none".into(),
            checksum: String::new(),
            timestamp_ms: 0,
        };
        e.stamp_instance("logd-1");
        e.stamp_instance("logd-1");
        assert_eq!(e.event_id, "rotated:s:1-9@logd-1");
        assert_eq!(e.instance, "logd-1");
    }
}
