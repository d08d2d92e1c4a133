//! The line format: how an acknowledged frame becomes one JSON line of a
//! session file (`{"seq":…,"time":…,…}`, `seq` first), and how a line's seq
//! is read back.

use serde::Serialize;
use serde::ser::{SerializeMap, SerializeSeq};

use crate::pb::LogFrame;

/// `time` as RFC 3339 UTC with nanoseconds, e.g. `2026-11-29T05:14:07.000000001Z`.
pub fn format_time(t: &prost_types::Timestamp) -> String {
    let mut out = Vec::with_capacity(TIME_BYTES);
    write_time(&mut out, t);
    String::from_utf8(out).expect("ASCII")
}

/// The length of a time [`write_time`] renders for years 0–9999.
const TIME_BYTES: usize = "2026-11-29T05:14:07.000000001Z".len();

/// Appends [`format_time`]'s text to `out`, without `fmt` or an allocation
/// for the years 0–9999 (every valid protobuf Timestamp); other years go
/// through chrono. Byte-identical to chrono's
/// `to_rfc3339_opts(SecondsFormat::Nanos, true)` (a property test checks).
fn write_time(out: &mut Vec<u8>, t: &prost_types::Timestamp) {
    let nanos = t.nanos.clamp(0, 999_999_999) as u32;
    let days = t.seconds.div_euclid(86_400);
    let secs_of_day = t.seconds.rem_euclid(86_400) as u32;
    let (year, month, day) = civil_from_days(days);
    if !(0..=9999).contains(&year) {
        let dt = chrono::DateTime::from_timestamp(t.seconds, nanos).expect("validated timestamp is in range");
        out.extend_from_slice(dt.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true).as_bytes());
        return;
    }
    let mut b = [0u8; TIME_BYTES];
    let mut put = |at: usize, width: usize, mut v: u32| {
        for i in (at..at + width).rev() {
            b[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year as u32);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, secs_of_day / 3600);
    put(14, 2, secs_of_day / 60 % 60);
    put(17, 2, secs_of_day % 60);
    put(20, 9, nanos);
    for (at, c) in [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
        (29, b'Z'),
    ] {
        b[at] = c;
    }
    out.extend_from_slice(&b);
}

/// The proleptic Gregorian (year, month, day) of a day count from
/// 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11]
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

struct JsonStruct<'a>(&'a prost_types::Struct);
struct JsonValue<'a>(&'a prost_types::Value);

impl Serialize for JsonStruct<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.fields.len()))?;
        for (k, v) in &self.0.fields {
            m.serialize_entry(k, &JsonValue(v))?;
        }
        m.end()
    }
}

impl Serialize for JsonValue<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use prost_types::value::Kind;
        match &self.0.kind {
            None | Some(Kind::NullValue(_)) => s.serialize_unit(),
            Some(Kind::NumberValue(n)) if n.is_finite() => match exact_integer(*n) {
                Some(i) => s.serialize_i64(i),
                None => s.serialize_f64(*n),
            },
            Some(Kind::NumberValue(_)) => s.serialize_unit(),
            Some(Kind::StringValue(v)) => s.serialize_str(v),
            Some(Kind::BoolValue(b)) => s.serialize_bool(*b),
            Some(Kind::StructValue(st)) => JsonStruct(st).serialize(s),
            Some(Kind::ListValue(l)) => {
                let mut seq = s.serialize_seq(Some(l.values.len()))?;
                for v in &l.values {
                    seq.serialize_element(&JsonValue(v))?;
                }
                seq.end()
            }
        }
    }
}

/// `n` as an integer when it is one exactly and below 2^53 in magnitude
/// (where every integer is representable, so no reader mistakes a rounded
/// value for an exact one). `Struct` numbers are doubles on the wire: without
/// this, `"line": 11` would be written as `11.0`. `-0.0` becomes `0`.
fn exact_integer(n: f64) -> Option<i64> {
    const TWO_53: f64 = 9_007_199_254_740_992.0;
    (n.fract() == 0.0 && n.abs() < TWO_53).then_some(n as i64)
}

/// Appends the frame's line to `out`: `{"seq":N` then [`render_tail`].
pub fn render_line(frame: &LogFrame, out: &mut Vec<u8>) {
    write_seq(frame.seq, out);
    render_tail(frame, out);
}

/// The start of every line, before its seq.
const SEQ_KEY: &[u8] = b"{\"seq\":";

/// The longest `{"seq":N` there is (`N` = `i64::MIN`).
pub const SEQ_PREFIX_BYTES_MAX: usize = SEQ_KEY.len() + 20;

/// Appends `{"seq":N`, the start of every line.
fn write_seq(seq: i64, out: &mut Vec<u8>) {
    out.extend_from_slice(SEQ_KEY);
    out.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
}

/// Appends the part of the frame's line that follows its seq
/// (`,"time":…,"metadata":{…}}` and the newline). The seq is decided later
/// than the rest (on the commit thread), so the gRPC handler renders this
/// part while the frame it just decoded is in cache, and the session writer
/// only puts the seq in front ([`Line`]).
pub fn render_tail(frame: &LogFrame, out: &mut Vec<u8>) {
    // Field by field, in the documented order. Strings that need no escaping
    // (the common case for log content) are copied in one piece: serde_json's
    // byte-by-byte escaping was the largest item of the ingest profile.
    out.extend_from_slice(b",\"time\":\"");
    if let Some(t) = &frame.time {
        write_time(out, t); // no byte of it needs escaping
    }
    out.push(b'"');
    out.extend_from_slice(b",\"session_id\":");
    json_str(out, &frame.session_id);
    out.extend_from_slice(b",\"user_id\":");
    json_str(out, &frame.user_id);
    out.extend_from_slice(b",\"role\":");
    json_str(out, &frame.role);
    out.extend_from_slice(b",\"version\":");
    out.extend_from_slice(itoa::Buffer::new().format(frame.version.max(1)).as_bytes());
    out.extend_from_slice(b",\"content\":");
    json_str(out, &frame.content);
    out.extend_from_slice(b",\"metadata\":");
    match &frame.metadata {
        Some(m) if !m.fields.is_empty() => {
            serde_json::to_writer(&mut *out, &JsonStruct(m)).expect("writing JSON to a Vec cannot fail")
        }
        _ => out.extend_from_slice(b"{}"),
    }
    out.extend_from_slice(b"}\n");
}

/// The size of [`render_tail`]'s output for `frame`: exact when no string
/// needs an escape and the metadata is empty (the common case, so that the
/// line's allocation is made once, at its size), a guess otherwise.
pub fn tail_len(frame: &LogFrame) -> usize {
    // `,"time":""` `,"session_id":""` `,"user_id":""` `,"role":""`
    // `,"version":` `,"content":""` `,"metadata":` and `}\n`.
    const KEYS: usize = 10 + 16 + 13 + 10 + 11 + 13 + 12 + 2;
    let strings = frame.session_id.len() + frame.user_id.len() + frame.role.len() + frame.content.len();
    let time = if frame.time.is_some() { TIME_BYTES } else { 0 };
    let version = itoa::Buffer::new().format(frame.version.max(1)).len();
    let metadata = match &frame.metadata {
        Some(m) if !m.fields.is_empty() => 32 * m.fields.len(),
        _ => 2,
    };
    KEYS + time + strings + version + metadata
}

/// A durable frame as its session writer needs it: the seq and the rest of
/// the line, already rendered ([`render_tail`]). Holding this instead of the
/// decoded frame keeps one allocation per frame between the commit and the
/// file instead of one per string field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// The frame's seq.
    pub seq: i64,
    /// The line after `{"seq":N`, newline included.
    pub tail: Box<[u8]>,
}

impl Line {
    /// The line of `frame` (its seq as it is now), its tail rendered into
    /// an allocation of its size ([`tail_len`] is exact for most frames, so
    /// `into_boxed_slice` keeps the allocation).
    pub fn of(frame: &LogFrame) -> Line {
        let mut tail = Vec::with_capacity(tail_len(frame));
        render_tail(frame, &mut tail);
        Line {
            seq: frame.seq,
            tail: tail.into_boxed_slice(),
        }
    }

    /// Appends the whole line to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        out.reserve(self.tail.len() + SEQ_PREFIX_BYTES_MAX);
        write_seq(self.seq, out);
        out.extend_from_slice(&self.tail);
    }

    /// Appends the line's start, `{"seq":N`, to `out` ([`Line::tail`]
    /// follows it in the file).
    pub fn write_prefix(&self, out: &mut Vec<u8>) {
        write_seq(self.seq, out);
    }

    /// The line's size in bytes, newline included (never 0: every line has
    /// its seq).
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        SEQ_KEY.len() + itoa::Buffer::new().format(self.seq).len() + self.tail.len()
    }
}

/// Appends `s` as a JSON string, byte-identical to serde_json's output.
fn json_str(out: &mut Vec<u8>, s: &str) {
    if !needs_escape(s.as_bytes()) {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        serde_json::to_writer(&mut *out, s).expect("writing JSON to a Vec cannot fail");
    }
}

/// True if `b` holds a byte JSON must escape (a control byte, `"` or `\\`).
/// Checks 32 bytes per step with no early exit inside a step, which the
/// compiler turns into vector compares; a byte-at-a-time `all()` cost 14% of
/// the ingest profile for 256-byte contents.
fn needs_escape(b: &[u8]) -> bool {
    let flag = |acc: bool, &c: &u8| acc | (c < 0x20) | (c == b'"') | (c == b'\\');
    let mut chunks = b.chunks_exact(32);
    for chunk in &mut chunks {
        if chunk.iter().fold(false, flag) {
            return true;
        }
    }
    chunks.remainder().iter().fold(false, flag)
}

/// Parses the seq of a line written by [`render_line`] (`{"seq":N,...`).
pub fn line_seq(line: &[u8]) -> Option<i64> {
    let rest = line.strip_prefix(b"{\"seq\":")?;
    let end = rest.iter().position(|&b| b == b',')?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chrono_time(seconds: i64, nanos: i32) -> String {
        chrono::DateTime::from_timestamp(seconds, nanos.clamp(0, 999_999_999) as u32)
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
    }

    #[test]
    fn times_render_as_chrono_renders_them_at_the_edges() {
        // 0001-01-01, 1969-12-31T23:59:59, the epoch, leap days, 9999-12-31,
        // year 10000 (the chrono path), year 0 and before.
        for (seconds, nanos) in [
            (-62_135_596_800, 0),
            (-1, 999_999_999),
            (0, 0),
            (951_782_400, 1),   // 2000-02-29
            (4_107_542_400, 5), // 2100-03-01
            (253_402_300_799, 999_999_999),
            (253_402_300_800, 0),
            (-62_167_219_200, 7),
            (-62_198_755_200, 0),
        ] {
            let t = prost_types::Timestamp { seconds, nanos };
            assert_eq!(format_time(&t), chrono_time(seconds, nanos), "{seconds} {nanos}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_time_renders_as_chrono_renders_it(
            seconds in -62_135_596_800i64..=253_402_300_799,
            nanos in -5i32..1_000_000_005,
        ) {
            let t = prost_types::Timestamp { seconds, nanos };
            proptest::prop_assert_eq!(format_time(&t), chrono_time(seconds, nanos));
        }
    }

    #[test]
    fn the_tail_length_is_exact_for_plain_frames_and_a_guess_otherwise() {
        let mut frame = LogFrame {
            session_id: "s-1".into(),
            user_id: "u".into(),
            role: "assistant".into(),
            content: "x".repeat(256),
            version: 12,
            time: Some(prost_types::Timestamp {
                seconds: 1_764_000_000,
                nanos: 5,
            }),
            ..Default::default()
        };
        let rendered = |f: &LogFrame| {
            let mut out = Vec::new();
            render_tail(f, &mut out);
            out.len()
        };
        assert_eq!(rendered(&frame), tail_len(&frame));
        frame.time = None;
        frame.version = 0;
        assert_eq!(rendered(&frame), tail_len(&frame));
        frame.content = "a \"quoted\" word".into();
        assert!(rendered(&frame) > tail_len(&frame), "escapes make it longer");
    }

    #[test]
    fn json_strings_match_serde_json_byte_for_byte() {
        for s in [
            "",
            "plain text",
            "a\"b",
            "back\\slash",
            "tab\tnew\nline",
            "\u{1}\u{1f}",
            "é ü 日本",
            "\u{7f}",
            "</script>",
        ] {
            let mut fast = Vec::new();
            json_str(&mut fast, s);
            assert_eq!(fast, serde_json::to_vec(s).unwrap(), "{s:?}");
        }
        // Long strings: an escape at every position, inside a 32-byte step
        // and in the remainder.
        for len in [31, 32, 33, 64, 100] {
            for at in 0..len {
                for special in ['"', '\\', '\n', '\u{0}', '\u{1f}'] {
                    let mut s: String = "x".repeat(len);
                    s.replace_range(at..at + 1, &special.to_string());
                    let mut fast = Vec::new();
                    json_str(&mut fast, &s);
                    assert_eq!(fast, serde_json::to_vec(&s).unwrap(), "{s:?}");
                }
            }
        }
    }

    #[test]
    fn exact_integer_numbers_are_written_as_integers() {
        let json = |n: f64| {
            let v = prost_types::Value {
                kind: Some(prost_types::value::Kind::NumberValue(n)),
            };
            serde_json::to_string(&JsonValue(&v)).unwrap()
        };
        const TWO_53: f64 = 9_007_199_254_740_992.0;
        assert_eq!(json(11.0), "11");
        assert_eq!(json(-3.0), "-3");
        assert_eq!(json(0.0), "0");
        assert_eq!(json(-0.0), "0", "negative zero is the integer 0");
        assert_eq!(json(TWO_53 - 1.0), "9007199254740991");
        assert_eq!(json(-(TWO_53 - 1.0)), "-9007199254740991");
        // From 2^53 on, not every integer is representable: float form.
        assert_eq!(json(TWO_53), "9007199254740992.0");
        assert_eq!(json(-TWO_53), "-9007199254740992.0");
        assert_eq!(json(1e300), "1e+300");
        assert_eq!(json(1.5), "1.5");
        assert_eq!(json(-0.25), "-0.25");
        assert_eq!(json(f64::NAN), "null", "non-finite numbers stay null");
        assert_eq!(json(f64::INFINITY), "null");
    }

    #[test]
    fn a_line_is_one_json_object_with_the_documented_fields() {
        let mut md = prost_types::Struct::default();
        md.fields.insert(
            "k".into(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::NumberValue(1.5)),
            },
        );
        let f = LogFrame {
            version: 0,
            time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 5,
            }),
            session_id: "s1".into(),
            user_id: "u".into(),
            role: "r".into(),
            seq: 42,
            content: "a\nb\"c".into(),
            metadata: Some(md),
        };
        let mut out = Vec::new();
        render_line(&f, &mut out);
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(text.ends_with('\n'));
        assert_eq!(text.matches('\n').count(), 1, "content newlines are escaped");
        assert_eq!(
            text,
            "{\"seq\":42,\"time\":\"2023-11-14T22:13:20.000000005Z\",\"session_id\":\"s1\",\"user_id\":\"u\",\
             \"role\":\"r\",\"version\":1,\"content\":\"a\\nb\\\"c\",\"metadata\":{\"k\":1.5}}\n"
        );
        assert_eq!(line_seq(&out), Some(42));
        // The seq and the tail rendered apart make the same bytes.
        let mut apart = Vec::new();
        Line::of(&f).write_to(&mut apart);
        assert_eq!(apart, out);
        let mut later = Line::of(&LogFrame { seq: 0, ..f.clone() });
        later.seq = 42;
        let mut seq_later = Vec::new();
        later.write_to(&mut seq_later);
        assert_eq!(seq_later, out, "the seq can be set after the tail is rendered");
    }
}
