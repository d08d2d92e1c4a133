//! How an event's `content` is encoded on the Redis stream
//! (`REDIS_PUBSUB_FORMAT`).

use store::Event;

/// How `content` is encoded on the stream (`REDIS_PUBSUB_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Encoding {
    /// JSON text.
    Json,
    /// MessagePack (rmp-serde, struct as a map).
    Msgpack,
}

impl Encoding {
    /// The name sent in the stream's `encoding` field.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Json => "json",
            Encoding::Msgpack => "msgpack",
        }
    }

    /// Encodes an event.
    pub fn encode(self, e: &Event) -> Vec<u8> {
        match self {
            Encoding::Json => serde_json::to_vec(e).expect("event encodes as JSON"),
            Encoding::Msgpack => rmp_serde::to_vec_named(e).expect("event encodes as msgpack"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use store::{EventKind, RotateReason, event_id};

    fn sample() -> Event {
        Event {
            event_id: event_id(EventKind::Rotated, "s", 1, 9),
            instance: "logd-0".into(),
            kind: EventKind::Rotated,
            session_id: "s".into(),
            path: "s.20261129T051407Z.1-9.log".into(),
            first_seq: 1,
            last_seq: 9,
            frames: 9,
            bytes: 900,
            first_time: "t0".into(),
            last_time: "t1".into(),
            reason: RotateReason::Size,
            compression: "none".into(),
            checksum: "crc32:0000abcd".into(),
            timestamp_ms: 5,
        }
    }

    #[test]
    fn both_encodings_round_trip() {
        let e = sample();
        let j = Encoding::Json.encode(&e);
        assert_eq!(serde_json::from_slice::<Event>(&j).unwrap(), e);
        assert!(String::from_utf8(j).unwrap().contains("\"kind\":\"rotated\""));
        let m = Encoding::Msgpack.encode(&e);
        assert_eq!(rmp_serde::from_slice::<Event>(&m).unwrap(), e);
    }
}
