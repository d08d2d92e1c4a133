//! Per-frame validation: the rules that decide whether a frame is accepted,
//! each with the precise reason a client sees in its `Rejection`.

use prost::Message;

use crate::pb::LogFrame;

pub use store::SEQ_MAX;

/// First second of year 0000 (unix seconds): RFC 3339 writes four-digit
/// years only, so a `time` before it (or after [`TIME_SECONDS_MAX`]) is
/// rejected per frame.
pub const TIME_SECONDS_MIN: i64 = -62_167_219_200;
/// Last second of year 9999 (unix seconds), `9999-12-31T23:59:59Z`.
pub const TIME_SECONDS_MAX: i64 = 253_402_300_799;

pub use store::session_id_is_valid;

/// Checks one frame against every rule; `Err` holds the rule's short name
/// (a metric label) and the reason the client sees.
pub fn validate(frame: &LogFrame, frame_bytes_max: usize) -> Result<(), (&'static str, String)> {
    if !session_id_is_valid(&frame.session_id) {
        let shown: String = frame.session_id.chars().take(64).collect();
        return Err((
            "session_id",
            format!(
                "invalid session_id {shown:?}: must match ^[A-Za-z0-9_-][A-Za-z0-9._-]{{0,127}}$ \
             (1-128 characters, no '/', no leading '.')"
            ),
        ));
    }
    if frame.version != 0 && frame.version != 1 {
        return Err((
            "version",
            format!("unsupported version {}: must be 0 or 1", frame.version),
        ));
    }
    if frame.seq < 0 {
        return Err((
            "seq",
            format!("invalid seq {}: must be >= 0 (0 = server assigns)", frame.seq),
        ));
    }
    if let Some(t) = &frame.time
        && (!(0..1_000_000_000).contains(&t.nanos) || !(TIME_SECONDS_MIN..=TIME_SECONDS_MAX).contains(&t.seconds))
    {
        return Err((
            "time",
            format!(
                "invalid time {}s {}ns: outside 0000-01-01T00:00:00Z..=9999-12-31T23:59:59.999999999Z \
                 (RFC 3339 has four-digit years; nanos in 0..=999999999)",
                t.seconds, t.nanos
            ),
        ));
    }
    let len = frame.encoded_len();
    if len > frame_bytes_max {
        return Err((
            "size",
            format!("frame of {len} bytes exceeds LOG_MAX_FRAME_BYTES {frame_bytes_max}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_that_could_escape_the_log_dir_are_invalid() {
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            ".hidden",
            "a\\b",
            "a b",
            "é",
            &"x".repeat(129),
            "a\0",
        ] {
            assert!(!session_id_is_valid(bad), "{bad:?} must be invalid");
        }
        for good in [
            "a",
            "A-1",
            "_x",
            "-x",
            "a.b",
            "a..b",
            &"x".repeat(128),
            "sess_01.part-2",
        ] {
            assert!(session_id_is_valid(good), "{good:?} must be valid");
        }
    }

    #[test]
    fn each_rule_gives_its_own_reason() {
        let ok = LogFrame {
            session_id: "s".into(),
            ..Default::default()
        };
        assert!(validate(&ok, 1024).is_ok());
        let v = LogFrame {
            version: 2,
            ..ok.clone()
        };
        assert!(validate(&v, 1024).unwrap_err().1.contains("version 2"));
        let s = LogFrame { seq: -1, ..ok.clone() };
        assert!(validate(&s, 1024).unwrap_err().1.contains("seq -1"));
        let top = LogFrame {
            seq: SEQ_MAX,
            ..ok.clone()
        };
        assert!(validate(&top, 1024).is_ok());
        let big = LogFrame {
            content: "x".repeat(2000),
            ..ok.clone()
        };
        assert!(
            validate(&big, 1024)
                .unwrap_err()
                .1
                .contains("exceeds LOG_MAX_FRAME_BYTES 1024")
        );
        let t = LogFrame {
            time: Some(prost_types::Timestamp { seconds: 0, nanos: -1 }),
            ..ok
        };
        assert!(validate(&t, 1024).unwrap_err().1.contains("time"));
    }
}
