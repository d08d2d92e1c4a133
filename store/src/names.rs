//! Names in `LOG_DIR`: a session id, its live `.logtmp`, and the rotated
//! `<session>.<UTC stamp>.<first>-<last>.log[.gz]` names.

use std::path::{Path, PathBuf};

/// Longest session id, in bytes.
pub const SESSION_ID_BYTES_MAX: usize = 128;

/// Whether `id` is a valid session id: `^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$`.
///
/// No `/`, no `..` prefix, no leading dot and never empty, so `<LOG_DIR>/<id>…`
/// always names a file directly inside the log directory.
pub fn session_id_is_valid(id: &str) -> bool {
    let b = id.as_bytes();
    let ok_rest = |c: &u8| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-');
    match b.first() {
        None => false,
        Some(first) => {
            b.len() <= SESSION_ID_BYTES_MAX
                && (first.is_ascii_alphanumeric() || matches!(first, b'_' | b'-'))
                && b[1..].iter().all(ok_rest)
        }
    }
}

/// Suffix of the file a session's frames are appended to.
pub const LOGTMP_SUFFIX: &str = ".logtmp";

/// Path of a session's live file.
pub fn logtmp_path(log_dir: &Path, session: &str) -> PathBuf {
    log_dir.join(format!("{session}{LOGTMP_SUFFIX}"))
}

/// Suffix of a rotated, uncompressed file.
pub const LOG_SUFFIX: &str = ".log";
/// Suffix of a compressed file.
pub const GZ_SUFFIX: &str = ".log.gz";

/// The parts of a rotated file's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotatedName {
    /// The session.
    pub session: String,
    /// `yyyymmddTHHMMSSZ`.
    pub stamp: String,
    /// First seq in the file.
    pub first_seq: i64,
    /// Last seq in the file.
    pub last_seq: i64,
    /// Whether it is the `.log.gz`.
    pub gz: bool,
}

/// `<session>.<yyyymmddTHHMMSSZ>.<first>-<last>.log` for a rotation at `at_ms`.
pub fn rotated_name(session: &str, at_ms: u64, first_seq: i64, last_seq: i64) -> String {
    let t = chrono::DateTime::from_timestamp_millis(at_ms as i64).unwrap_or_default();
    format!(
        "{session}.{}.{first_seq}-{last_seq}{LOG_SUFFIX}",
        t.format("%Y%m%dT%H%M%SZ")
    )
}

/// Parses a rotated file name (`.log` or `.log.gz`). Session ids may hold
/// dots, so the name is taken apart from the right.
pub fn parse_rotated_name(name: &str) -> Option<RotatedName> {
    let (stem, gz) = match name.strip_suffix(GZ_SUFFIX) {
        Some(s) => (s, true),
        None => (name.strip_suffix(LOG_SUFFIX)?, false),
    };
    let (rest, range) = stem.rsplit_once('.')?;
    let (session, stamp) = rest.rsplit_once('.')?;
    let (first, last) = range.split_once('-')?;
    let ok_stamp = stamp.len() == 16 && stamp.as_bytes()[8] == b'T' && stamp.ends_with('Z');
    if !ok_stamp || !crate::names::session_id_is_valid(session) {
        return None;
    }
    Some(RotatedName {
        session: session.to_owned(),
        stamp: stamp.to_owned(),
        first_seq: first.parse().ok()?,
        last_seq: last.parse().ok()?,
        gz,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotated_names_sort_by_time_and_parse_back_even_with_dots_in_the_session() {
        let a = rotated_name("a.b-c", 1_700_000_000_000, 1, 10);
        assert_eq!(a, "a.b-c.20231114T221320Z.1-10.log");
        let p = parse_rotated_name(&a).unwrap();
        assert_eq!(
            (p.session.as_str(), p.first_seq, p.last_seq, p.gz),
            ("a.b-c", 1, 10, false)
        );
        let g = parse_rotated_name(&format!("{a}.gz")).unwrap();
        assert!(g.gz);
        let later = rotated_name("a.b-c", 1_700_000_001_000, 11, 12);
        assert!(a < later);
        assert_eq!(parse_rotated_name("x.logtmp"), None);
        assert_eq!(parse_rotated_name("x.log.gz.tmp"), None);
        assert_eq!(parse_rotated_name("../x.20231114T221320Z.1-2.log"), None);
    }
}
