//! The file lifecycle against the real binary: rotation (size, age, idle,
//! `logd rotate`), gzip compression, idle eviction of many short sessions,
//! the Redis stream of `rotated` / `compressed` events (a real
//! `redis-server`, read with a consumer group), Redis outages, and crashes
//! between the steps of a rotation, a compression and a delivery.
//!
//! What every test holds the files to: names
//! `<session>.<yyyymmddTHHMMSSZ>.<first>-<last>.log[.gz]` whose seq range is
//! the content's; `gzip -t` accepts every `.log.gz`; the union of a
//! session's files holds every acked frame exactly once, in seq order.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use logd::pb::{LogBatch, LogFrame, StatsRequest, StatsResponse};
use store::{Event, EventKind, RotateReason};

use crate::redis_server::{RedisServer, free_port};
use crate::util::*;

// ---------------------------------------------------------------------------
// Talking to the server.

/// Polls GetStats until `done` holds; panics with the last stats after `timeout`.
async fn wait_for(
    server: &Server,
    what: &str,
    timeout: Duration,
    done: impl Fn(&StatsResponse) -> bool,
) -> StatsResponse {
    let deadline = Instant::now() + timeout;
    let mut client = admin(server).await;
    loop {
        let s = client
            .get_stats(StatsRequest::default())
            .await
            .expect("GetStats")
            .into_inner();
        if done(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; last stats: {s:?}\nstderr:\n{}",
            server.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `logd rotate --target <server> <args>` (the real CLI); stdout, asserting exit 0.
fn logd_rotate_cli(server: &Server, args: &[&str]) -> String {
    let out = Command::new(logd_bin())
        .args(["rotate", "--target", &server.addr])
        .args(args)
        .output()
        .expect("run logd rotate");
    assert!(
        out.status.success(),
        "logd rotate {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// What was acked, per session: (seq, content), in seq order.
type Acked = BTreeMap<String, Vec<(i64, String)>>;

/// Sends `n` frames of about `size` content bytes to `session` in one
/// WriteLogStream (server-assigned seqs) and records them as acked.
/// Returns the acked seq range.
async fn send_n(server: &Server, acked: &mut Acked, session: &str, n: usize, size: usize) -> (i64, i64) {
    let have = acked.get(session).map_or(0, Vec::len);
    let contents: Vec<String> = (0..n)
        .map(|k| {
            let head = format!("{session} frame {}", have + k);
            let pad = size.saturating_sub(head.len());
            format!("{head} {}", "x".repeat(pad))
        })
        .collect();
    let frames: Vec<LogFrame> = contents.iter().map(|c| frame(session, 0, c)).collect();
    let mut client = server.client().await;
    let resp = send_stream(&mut client, frames).await;
    assert_eq!(resp.frames_accepted, n as i64, "{resp:?}");
    assert_eq!(resp.sessions.len(), 1, "{resp:?}");
    let r = &resp.sessions[0];
    assert_eq!(
        (r.frames, r.last_seq - r.first_seq + 1),
        (n as i64, n as i64),
        "one sender per session: contiguous seqs {r:?}"
    );
    let v = acked.entry(session.to_owned()).or_default();
    if let Some(&(last, _)) = v.last() {
        assert_eq!(r.first_seq, last + 1, "{session}: seqs continue");
    }
    v.extend(
        contents
            .into_iter()
            .enumerate()
            .map(|(i, c)| (r.first_seq + i as i64, c)),
    );
    (r.first_seq, r.last_seq)
}

// ---------------------------------------------------------------------------
// Reading the files.

/// A rotated file, read back.
#[derive(Debug, Clone)]
struct Rotated {
    name: String,
    session: String,
    first: i64,
    last: i64,
    gz: bool,
    /// The file's bytes as on disk.
    disk: Vec<u8>,
    /// The uncompressed bytes (= `disk` for a `.log`).
    data: Vec<u8>,
    lines: Vec<Line>,
}

/// Names of the files in `dir` (not the state directory).
fn file_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

/// Splits `<session>.<yyyymmddTHHMMSSZ>.<first>-<last>.log[.gz]`, checking
/// the stamp is a UTC time within `window` (unix seconds). Independent of
/// logd's own parser on purpose.
fn parse_name(name: &str, window: (i64, i64)) -> (String, i64, i64, bool) {
    let (stem, gz) = match name.strip_suffix(".log.gz") {
        Some(s) => (s, true),
        None => (
            name.strip_suffix(".log")
                .unwrap_or_else(|| panic!("{name}: not .log[.gz]")),
            false,
        ),
    };
    let mut parts = stem.rsplitn(3, '.');
    let (range, stamp, session) = (parts.next().unwrap(), parts.next(), parts.next());
    let (Some(stamp), Some(session)) = (stamp, session) else {
        panic!("{name}: not <session>.<stamp>.<first>-<last>.log");
    };
    let t = chrono::NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%M%SZ")
        .unwrap_or_else(|e| panic!("{name}: stamp {stamp:?} is not yyyymmddTHHMMSSZ: {e}"));
    let secs = t.and_utc().timestamp();
    assert!(
        secs >= window.0 - 1 && secs <= window.1 + 1,
        "{name}: stamp {stamp} is not the UTC time of the test ({window:?})"
    );
    let (first, last) = range
        .split_once('-')
        .unwrap_or_else(|| panic!("{name}: range {range:?}"));
    (session.to_owned(), first.parse().unwrap(), last.parse().unwrap(), gz)
}

fn unix_now() -> i64 {
    store::now_ms() as i64 / 1000
}

/// `gzip -t` (it must pass), then `gzip -dc`: the real tool.
fn gunzip(path: &Path) -> Vec<u8> {
    let t = Command::new("gzip").arg("-t").arg(path).output().expect("gzip -t");
    assert!(
        t.status.success(),
        "gzip -t {}: {}",
        path.display(),
        String::from_utf8_lossy(&t.stderr)
    );
    let out = Command::new("gzip").arg("-dc").arg(path).output().expect("gzip -dc");
    assert!(out.status.success(), "gzip -dc {}", path.display());
    out.stdout
}

/// Every rotated file in `dir`, by (session, first seq), each checked: the
/// name parses, the stamp is `window`'s, it holds whole JSON lines of its
/// session with strictly increasing seqs from `first` to `last`, and a
/// `.log.gz` is a complete gzip file. Call it when no compression runs.
fn rotated_files(dir: &Path, window: (i64, i64)) -> Vec<Rotated> {
    let mut out = Vec::new();
    for name in file_names(dir) {
        if !(name.ends_with(".log") || name.ends_with(".log.gz")) {
            continue;
        }
        let (session, first, last, gz) = parse_name(&name, window);
        let path = dir.join(&name);
        let disk = std::fs::read(&path).unwrap();
        let data = if gz { gunzip(&path) } else { disk.clone() };
        assert!(data.ends_with(b"\n"), "{name}: does not end with a whole line");
        let text = std::str::from_utf8(&data).unwrap_or_else(|_| panic!("{name}: not UTF-8"));
        let lines: Vec<Line> = text
            .lines()
            .enumerate()
            .map(|(i, l)| serde_json::from_str(l).unwrap_or_else(|e| panic!("{name}:{}: {e}: {l:?}", i + 1)))
            .collect();
        assert!(!lines.is_empty(), "{name}: empty rotated file");
        assert_eq!(
            (lines[0].seq, lines[lines.len() - 1].seq),
            (first, last),
            "{name}: the name's seq range is not the content's"
        );
        assert!(
            lines.iter().all(|l| l.session_id == session),
            "{name}: lines of another session"
        );
        assert_increasing(&name, &lines);
        out.push(Rotated {
            name,
            session,
            first,
            last,
            gz,
            disk,
            data,
            lines,
        });
    }
    out.sort_by(|a, b| (&a.session, a.first).cmp(&(&b.session, b.first)));
    out
}

/// Lines of a session's live `.logtmp` (empty if there is none).
fn live_lines(dir: &Path, session: &str) -> Vec<Line> {
    match std::fs::read_to_string(dir.join(format!("{session}.logtmp"))) {
        Ok(text) => text.lines().map(|l| serde_json::from_str(l).unwrap()).collect(),
        Err(_) => Vec::new(),
    }
}

/// Asserts that the union of every session's files (rotated ones by seq,
/// then the `.logtmp`) is exactly what was acked: every frame once, with
/// its seq and content, in seq order, and nothing else.
fn assert_exactly_acked(dir: &Path, files: &[Rotated], acked: &Acked) {
    let mut by_session: BTreeMap<&str, Vec<&Line>> = BTreeMap::new();
    for f in files {
        by_session.entry(&f.session).or_default().extend(&f.lines);
    }
    let live: BTreeMap<String, Vec<Line>> = acked.keys().map(|s| (s.clone(), live_lines(dir, s))).collect();
    for (s, lines) in &live {
        by_session.entry(s).or_default().extend(lines);
    }
    by_session.retain(|_, v| !v.is_empty());
    let sessions: BTreeSet<&str> = by_session.keys().copied().collect();
    let want: BTreeSet<&str> = acked.keys().map(String::as_str).collect();
    assert_eq!(sessions, want, "sessions on disk vs acked");
    for (s, lines) in by_session {
        let got: Vec<(i64, &str)> = lines.iter().map(|l| (l.seq, l.content.as_str())).collect();
        let exp: Vec<(i64, &str)> = acked[s].iter().map(|(q, c)| (*q, c.as_str())).collect();
        if got != exp {
            let first_diff = got.iter().zip(&exp).position(|(a, b)| a != b);
            panic!(
                "session {s}: files hold {} lines, {} were acked; first difference at index {first_diff:?}: {:?} vs {:?}",
                got.len(),
                exp.len(),
                first_diff.map(|i| got[i]),
                first_diff.map(|i| exp[i]),
            );
        }
    }
}

// ---------------------------------------------------------------------------
// 1. Rotation.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_rotate_at_the_size_limit_with_utc_stamps_and_seq_ranges_in_their_names() {
    let td = TestDir::new();
    let dir = td.log_dir();
    let t0 = unix_now();
    let env = [
        ("LOG_MAX_SIZE_BYTES", "4096"),
        ("LOG_COMPRESSION", "none"),
        ("LOG_FLUSH_INTERVAL_MS", "50"),
    ];
    let mut server = Server::start(&dir, &env);
    let mut acked = Acked::new();
    for _round in 0..40 {
        for s in ["size-a", "size-b", "size.dotted"] {
            send_n(&server, &mut acked, s, 5, 100).await;
        }
    }
    let st = stats(&server).await;
    server.stop();

    let files = rotated_files(&dir, (t0, unix_now()));
    assert!(
        files.len() >= 3 * 8,
        "expected many size rotations, got {}",
        files.len()
    );
    for f in &files {
        assert!(!f.gz, "{}: LOG_COMPRESSION=none", f.name);
        // Rotated before the line that would have crossed the limit (lines
        // are under 300 bytes here).
        assert!(
            f.data.len() <= 4096 && f.data.len() > 4096 - 300,
            "{}: rotated for size at {} bytes (limit 4096)",
            f.name,
            f.data.len()
        );
    }
    assert!(
        st.rotations_size > 0 && st.rotations_age + st.rotations_idle + st.rotations_manual == 0,
        "{st:?}"
    );
    assert!(
        !file_names(&dir).iter().any(|n| n.contains(".gz")),
        "nothing is compressed with LOG_COMPRESSION=none"
    );
    assert_exactly_acked(&dir, &files, &acked);
}

/// The size limit holds per frame, not per batch: batches of 200 frames
/// (~90 KB each) against a 20,000-byte limit give files of at most 20,000
/// bytes, a frame larger than the limit gets a file of its own, and every
/// frame is in the files once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_files_never_exceed_the_size_limit_except_for_a_single_frame_larger_than_it() {
    const LIMIT: usize = 20_000;
    let td = TestDir::new();
    let dir = td.log_dir();
    let t0 = unix_now();
    let env = [
        ("LOG_MAX_SIZE_BYTES", "20000"),
        ("LOG_COMPRESSION", "none"),
        ("LOG_FLUSH_INTERVAL_MS", "50"),
    ];
    let mut server = Server::start(&dir, &env);
    let mut acked = Acked::new();
    for round in 0..6 {
        send_n(&server, &mut acked, "per-frame", 200, 300).await;
        if round == 2 {
            // Larger than the limit on its own, between two full batches.
            send_n(&server, &mut acked, "per-frame", 1, 30_000).await;
        }
    }
    server.stop();

    let files = rotated_files(&dir, (t0, unix_now()));
    let mut oversized = 0;
    for f in &files {
        if f.lines.len() == 1 && f.data.len() > LIMIT {
            oversized += 1;
            continue;
        }
        assert!(
            f.data.len() <= LIMIT,
            "{}: {} bytes in {} lines, over the {LIMIT}-byte limit",
            f.name,
            f.data.len(),
            f.lines.len()
        );
    }
    assert_eq!(oversized, 1, "the 30,000-byte frame has a file of its own");
    assert!(files.len() >= 20, "expected many size rotations, got {}", files.len());
    let live = std::fs::metadata(dir.join("per-frame.logtmp")).map_or(0, |m| m.len() as usize);
    assert!(live <= LIMIT, "the live file holds {live} bytes");
    assert_exactly_acked(&dir, &files, &acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_rotate_at_the_age_limit() {
    let td = TestDir::new();
    let dir = td.log_dir();
    let t0 = unix_now();
    let env = [
        ("LOG_MAX_AGE_SECONDS", "1"),
        ("LOG_COMPRESSION", "none"),
        ("LOG_FLUSH_INTERVAL_MS", "50"),
    ];
    let mut server = Server::start(&dir, &env);
    let mut acked = Acked::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(3300) {
        send_n(&server, &mut acked, "age", 2, 50).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let st = wait_for(&server, "two age rotations", Duration::from_secs(5), |s| {
        s.rotations_age >= 2
    })
    .await;
    server.stop();
    assert_eq!(st.rotations_size + st.rotations_idle + st.rotations_manual, 0, "{st:?}");

    let files = rotated_files(&dir, (t0, unix_now()));
    assert!(files.len() >= 2, "{files:?}");
    for f in &files {
        // Frames get the server's receive time; a file is rotated within
        // about a second of its first frame (plus a flush tick).
        let t = |l: &Line| {
            chrono::DateTime::parse_from_rfc3339(&l.time)
                .unwrap()
                .timestamp_millis()
        };
        let span = t(&f.lines[f.lines.len() - 1]) - t(&f.lines[0]);
        assert!(span < 1600, "{}: spans {span} ms with LOG_MAX_AGE_SECONDS=1", f.name);
    }
    assert_exactly_acked(&dir, &files, &acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_is_rotated_and_closed_and_comes_back_with_its_seq_continuing() {
    let td = TestDir::new();
    let dir = td.log_dir();
    let t0 = unix_now();
    let env = [
        ("LOG_IDLE_TIMEOUT_SECONDS", "1"),
        ("LOG_COMPRESSION", "none"),
        ("LOG_FLUSH_INTERVAL_MS", "50"),
    ];
    let mut server = Server::start(&dir, &env);
    let mut acked = Acked::new();
    assert_eq!(send_n(&server, &mut acked, "idle-a", 10, 40).await, (1, 10));
    assert_eq!(send_n(&server, &mut acked, "idle-b", 3, 40).await, (1, 3));
    wait_for(&server, "both writers running", Duration::from_secs(5), |s| {
        s.active_sessions == 2
    })
    .await;
    let st = wait_for(&server, "both sessions evicted", Duration::from_secs(5), |s| {
        s.rotations_idle == 2 && s.evictions == 2 && s.active_sessions == 0
    })
    .await;
    assert_eq!(st.rotations_size + st.rotations_age + st.rotations_manual, 0, "{st:?}");
    let names = file_names(&dir);
    assert!(
        !names.iter().any(|n| n.ends_with(".logtmp")),
        "an evicted session has no live file: {names:?}"
    );
    let files = rotated_files(&dir, (t0, unix_now()));
    let ranges: Vec<(&str, i64, i64)> = files.iter().map(|f| (f.session.as_str(), f.first, f.last)).collect();
    assert_eq!(ranges, [("idle-a", 1, 10), ("idle-b", 1, 3)]);

    // The next frame brings the session back; its seq continues.
    assert_eq!(send_n(&server, &mut acked, "idle-a", 5, 40).await, (11, 15));
    wait_for(&server, "idle-a evicted again", Duration::from_secs(5), |s| {
        s.rotations_idle == 3 && s.evictions == 3 && s.active_sessions == 0
    })
    .await;
    server.stop();
    let files = rotated_files(&dir, (t0, unix_now()));
    let ranges: Vec<(&str, i64, i64)> = files.iter().map(|f| (f.session.as_str(), f.first, f.last)).collect();
    assert_eq!(ranges, [("idle-a", 1, 10), ("idle-a", 11, 15), ("idle-b", 1, 3)]);
    assert_exactly_acked(&dir, &files, &acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logd_rotate_rotates_one_session_or_all_of_them_now() {
    let td = TestDir::new();
    let dir = td.log_dir();
    let t0 = unix_now();
    let mut server = Server::start(&dir, &[("LOG_COMPRESSION", "none")]);
    let mut acked = Acked::new();
    send_n(&server, &mut acked, "man-a", 7, 30).await;
    send_n(&server, &mut acked, "man-b", 3, 30).await;

    let out = logd_rotate_cli(&server, &["--session", "man-a"]);
    let name = out
        .trim()
        .strip_prefix("rotated: ")
        .unwrap_or_else(|| panic!("{out:?}"))
        .to_owned();
    assert!(name.starts_with("man-a.") && name.ends_with(".1-7.log"), "{name}");
    assert!(dir.join(&name).exists(), "{name} exists when logd rotate returns");
    assert!(!dir.join("man-a.logtmp").exists());
    assert_eq!(live_lines(&dir, "man-b").len(), 3, "man-b is not rotated");
    // Nothing new: nothing to rotate.
    let out = logd_rotate_cli(&server, &["--session", "man-a"]);
    assert!(out.contains("nothing to rotate"), "{out:?}");

    assert_eq!(send_n(&server, &mut acked, "man-a", 4, 30).await, (8, 11));
    assert_eq!(send_n(&server, &mut acked, "man-b", 2, 30).await, (4, 5));
    let out = logd_rotate_cli(&server, &["--all"]);
    let mut rotated: Vec<&str> = out.lines().filter_map(|l| l.strip_prefix("rotated: ")).collect();
    rotated.sort();
    assert_eq!(rotated.len(), 2, "{out:?}");
    assert!(
        rotated[0].starts_with("man-a.") && rotated[0].ends_with(".8-11.log"),
        "{out}"
    );
    assert!(
        rotated[1].starts_with("man-b.") && rotated[1].ends_with(".1-5.log"),
        "{out}"
    );
    let st = stats(&server).await;
    assert_eq!(st.rotations_manual, 3, "{st:?}");
    server.stop();

    let files = rotated_files(&dir, (t0, unix_now()));
    assert_eq!(files.len(), 3);
    assert!(!file_names(&dir).iter().any(|n| n.ends_with(".logtmp")));
    assert_exactly_acked(&dir, &files, &acked);
}

// ---------------------------------------------------------------------------
// 2. Compression.

/// `.logtmp` files in `dir`, with their sizes.
fn logtmp_files(dir: &Path) -> Vec<(String, u64)> {
    file_names(dir)
        .into_iter()
        .filter(|n| n.ends_with(".logtmp"))
        .map(|n| {
            let len = std::fs::metadata(dir.join(&n)).unwrap().len();
            (n, len)
        })
        .collect()
}

/// Sessions the metadata knows, whose files were all rotated, get no file
/// back from a restart or from `logd recover` (their records are still in
/// the WAL's active segment, so replay visits them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_and_logd_recover_create_no_file_for_a_session_without_frames() {
    let td = TestDir::new();
    let dir = td.log_dir();
    let env = [("LOG_COMPRESSION", "none")];
    let mut server = Server::start(&dir, &env);
    let mut acked = Acked::new();
    for s in ["known-a", "known-b", "known-c"] {
        send_n(&server, &mut acked, s, 3, 20).await;
    }
    assert_eq!(rotate_all(&server).await.len(), 3);
    server.stop();
    assert_eq!(logtmp_files(&dir), vec![], "every live file was rotated");

    server.restart();
    server.stop();
    assert_eq!(logtmp_files(&dir), vec![], "after a restart");

    let out = run_logd(&["recover"], &dir, &[]);
    assert!(out.status.success(), "logd recover: {out:?}");
    assert_eq!(logtmp_files(&dir), vec![], "after logd recover");

    // The sessions are still known: their seqs continue.
    server.restart();
    let (first, _) = send_n(&server, &mut acked, "known-b", 1, 20).await;
    assert_eq!(first, 4);
    server.stop();
    let files = rotated_files(&dir, (0, unix_now()));
    assert_exactly_acked(&dir, &files, &acked);
}

/// `logd rotate --session nope` for a session logd never saw creates no
/// file and says there was nothing to rotate for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_an_unknown_session_creates_no_file_and_says_so() {
    let td = TestDir::new();
    let dir = td.log_dir();
    let mut server = Server::start(&dir, &[]);
    let out = logd_rotate_cli(&server, &["--session", "nope"]);
    assert!(
        out.contains("nope") && out.contains("unknown"),
        "logd rotate --session nope said {out:?}"
    );
    server.stop();
    assert_eq!(logtmp_files(&dir), vec![]);
    assert!(!dir.join("nope.logtmp").exists());
}

/// An empty `.logtmp` (from an older logd, or a crash before a session's
/// first line) is removed by the recovery pass; a non-empty one is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_removes_an_empty_logtmp_left_over() {
    let td = TestDir::new();
    let dir = td.log_dir();
    let mut server = Server::start(&dir, &[]);
    let mut acked = Acked::new();
    send_n(&server, &mut acked, "kept", 2, 20).await;
    server.stop();
    std::fs::write(dir.join("ghost.logtmp"), b"").unwrap();
    std::fs::write(dir.join("ghost2.logtmp"), b"").unwrap();

    let out = run_logd(&["recover", "--dry-run"], &dir, &[]);
    assert!(out.status.success(), "logd recover --dry-run: {out:?}");
    assert!(dir.join("ghost.logtmp").exists(), "a dry run removes nothing");

    let out = run_logd(&["recover"], &dir, &[]);
    assert!(out.status.success(), "logd recover: {out:?}");
    assert!(
        !dir.join("ghost.logtmp").exists(),
        "logd recover removes an empty .logtmp"
    );

    server.restart();
    server.stop();
    assert!(!dir.join("ghost2.logtmp").exists() && !dir.join("ghost.logtmp").exists());
    let live = logtmp_files(&dir);
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!(live[0].0, "kept.logtmp");
    assert!(live[0].1 > 0);
    assert_exactly_acked(&dir, &rotated_files(&dir, (0, unix_now())), &acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_gzip_every_rotated_file_becomes_a_complete_log_gz_holding_what_was_rotated() {
    let td = TestDir::new();
    let dir = td.log_dir();
    let t0 = unix_now();
    let env = [
        ("LOG_MAX_SIZE_BYTES", "8192"),
        ("LOG_COMPRESSION", "gzip"),
        ("LOG_FLUSH_INTERVAL_MS", "50"),
    ];
    let mut server = Server::start(&dir, &env);
    let mut acked = Acked::new();
    for _round in 0..20 {
        for s in ["gz-a", "gz-b", "gz-c"] {
            send_n(&server, &mut acked, s, 5, 150).await;
        }
    }
    rotate_all(&server).await;
    let st = wait_for(&server, "every rotated file compressed", Duration::from_secs(20), |s| {
        let rotations = s.rotations_size + s.rotations_manual;
        s.compress_backlog == 0 && s.compressed_files == rotations
    })
    .await;
    server.stop();

    assert_eq!(leftovers(&dir), Vec::<String>::new(), "no .log, no .gz.tmp left");
    let files = rotated_files(&dir, (t0, unix_now()));
    assert_eq!(files.len() as u64, st.compressed_files);
    assert!(files.iter().all(|f| f.gz));
    assert!(files.len() >= 3 * 3, "{}", files.len());
    // zcat reads them too, and the bytes in/out add up.
    let z = Command::new("zcat").arg(dir.join(&files[0].name)).output().unwrap();
    assert!(z.status.success());
    assert_eq!(z.stdout, files[0].data);
    let bytes_in: usize = files.iter().map(|f| f.data.len()).sum();
    let bytes_out: usize = files.iter().map(|f| f.disk.len()).sum();
    assert_eq!(
        (st.compress_bytes_in, st.compress_bytes_out),
        (bytes_in as u64, bytes_out as u64)
    );
    assert!(!file_names(&dir).iter().any(|n| n.ends_with(".logtmp")));
    assert_exactly_acked(&dir, &files, &acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_compression_none_rotated_files_stay_plain_log_files() {
    let td = TestDir::new();
    let dir = td.log_dir();
    let t0 = unix_now();
    let env = [("LOG_MAX_SIZE_BYTES", "8192"), ("LOG_COMPRESSION", "none")];
    let mut server = Server::start(&dir, &env);
    let mut acked = Acked::new();
    for _round in 0..10 {
        send_n(&server, &mut acked, "plain", 10, 150).await;
    }
    rotate_all(&server).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let st = stats(&server).await;
    server.stop();
    assert_eq!((st.compressed_files, st.compress_backlog), (0, 0), "{st:?}");
    let files = rotated_files(&dir, (t0, unix_now()));
    assert!(files.len() >= 2 && files.iter().all(|f| !f.gz), "{files:?}");
    assert!(!file_names(&dir).iter().any(|n| n.contains(".gz")));
    assert_exactly_acked(&dir, &files, &acked);
}

// ---------------------------------------------------------------------------
// 3. Many short sessions.

/// The soft limit of open files this process (and so a logd it starts) has.
fn nofile_soft_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap_or(u64::MAX)
}

/// 2,000 sessions by default (about 10 s in a debug build on 2 cores);
/// `LOGD_LIFECYCLE_SESSIONS=10000` for the 10,000 (about 90 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_short_sessions_are_evicted_and_open_fds_return_to_the_baseline() {
    // Each session sends three frames in one batch and goes quiet; a wave of
    // sessions arrives every 250 ms, so with the 1 s idle timeout about five
    // waves are live at once: the wave size keeps that well under the fd
    // limit logd inherits.
    let total: usize = std::env::var("LOGD_LIFECYCLE_SESSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let limit = nofile_soft_limit();
    let live_max = (limit.saturating_sub(256) / 2).clamp(200, 4000) as usize;
    let wave = (live_max / 5).min(200);
    let td = TestDir::new();
    let dir = td.log_dir();
    let t0 = unix_now();
    let env = [
        ("LOG_IDLE_TIMEOUT_SECONDS", "1"),
        ("LOG_FLUSH_INTERVAL_MS", "100"),
        // Not gzip: a burst of more rotations than the compression queue
        // holds (1,024) leaves the rest to the pool's sweep, once a minute.
        ("LOG_COMPRESSION", "none"),
    ];
    let mut server = Server::start(&dir, &env);
    let mut client = server.client().await;
    let baseline = stats(&server).await.open_fds;

    // Sample fds and writers while the sessions come and go.
    let stop = Arc::new(AtomicBool::new(false));
    let (peak_fds, peak_active) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let sampler = {
        let mut a = admin(&server).await;
        let (stop, peak_fds, peak_active) = (stop.clone(), peak_fds.clone(), peak_active.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(s) = a.get_stats(StatsRequest::default()).await {
                    let s = s.into_inner();
                    peak_fds.fetch_max(s.open_fds, Ordering::Relaxed);
                    peak_active.fetch_max(s.active_sessions, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let started = Instant::now();
    let mut sent = 0;
    while sent < total {
        let wave_start = Instant::now();
        let n = wave.min(total - sent);
        let frames: Vec<LogFrame> = (sent..sent + n)
            .flat_map(|i| (0..3).map(move |k| frame(&format!("short-{i:05}"), 0, &format!("s{i} f{k}"))))
            .collect();
        let resp = client
            .write_log_batch(LogBatch { frames })
            .await
            .expect("WriteLogBatch")
            .into_inner();
        assert_eq!(resp.frames_accepted, 3 * n as i64);
        assert_eq!(resp.sessions.len(), n);
        assert!(resp.sessions.iter().all(|r| (r.first_seq, r.last_seq) == (1, 3)));
        sent += n;
        tokio::time::sleep(Duration::from_millis(250).saturating_sub(wave_start.elapsed())).await;
    }
    let sending = started.elapsed();
    let evicted_while_sending = stats(&server).await.evictions;
    let st = wait_for(&server, "every session evicted", Duration::from_secs(60), |s| {
        s.evictions == total as u64 && s.active_sessions == 0
    })
    .await;
    let drained = started.elapsed();
    let st = if st.open_fds < baseline + 50 {
        st
    } else {
        wait_for(&server, "fds back near the baseline", Duration::from_secs(5), |s| {
            s.open_fds < baseline + 50
        })
        .await
    };
    stop.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
    let (peak_fds, peak_active) = (peak_fds.load(Ordering::Relaxed), peak_active.load(Ordering::Relaxed));
    println!(
        "{total} sessions in waves of {wave} (fd limit {limit}): sent in {sending:.1?}, all evicted \
         after {drained:.1?}; open fds: baseline {baseline}, peak {peak_fds}, end {}; \
         active writers: peak {peak_active}, end {}; evicted before the last wave: {evicted_while_sending}",
        st.open_fds, st.active_sessions
    );
    assert!(st.open_fds < baseline + 50, "{st:?}");
    assert!(
        peak_active > wave as u64 / 2 && peak_fds > baseline + wave as u64 / 2,
        "the sampler saw the writers and their files open (peak {peak_active} writers, {peak_fds} fds)"
    );
    assert!(
        evicted_while_sending > 0,
        "idle writers are evicted while new sessions still arrive"
    );
    assert_eq!(st.rotations_idle, total as u64, "{st:?}");
    server.stop();

    let names = file_names(&dir);
    let live: Vec<(String, u64)> = names
        .iter()
        .filter(|n| n.ends_with(".logtmp"))
        .map(|n| (n.clone(), std::fs::metadata(dir.join(n)).unwrap().len()))
        .collect();
    assert!(
        live.is_empty(),
        "live files after every session was evicted: {live:?}\n{}",
        server.stderr()
    );
    assert_eq!(names.len(), total, "one .log per session");
    let files = rotated_files(&dir, (t0, unix_now()));
    for (i, f) in files.iter().enumerate() {
        assert_eq!(f.session, format!("short-{i:05}"));
        let got: Vec<(i64, &str)> = f.lines.iter().map(|l| (l.seq, l.content.as_str())).collect();
        let exp: Vec<(i64, String)> = (0..3).map(|k| (k + 1, format!("s{i} f{k}"))).collect();
        let exp: Vec<(i64, &str)> = exp.iter().map(|(q, c)| (*q, c.as_str())).collect();
        assert_eq!(got, exp, "{}", f.name);
    }
}

// ---------------------------------------------------------------------------
// 4.–6. Events on a Redis stream.

/// One entry read from the stream, decoded.
#[derive(Debug, Clone)]
struct Delivered {
    entry_id: String,
    encoding: String,
    event: Event,
}

/// A consumer in a consumer group, as an ETL job would run it.
struct EventConsumer {
    con: redis::aio::MultiplexedConnection,
    stream: String,
    group: String,
    got: Vec<Delivered>,
}

impl EventConsumer {
    /// `XGROUP CREATE <stream> <group> 0 MKSTREAM`: the group sees every
    /// entry, also those added before it was created.
    async fn create(url: &str, stream: &str, group: &str) -> EventConsumer {
        let client = redis::Client::open(url).unwrap();
        let mut con = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect to redis");
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg(group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut con)
            .await
            .expect("XGROUP CREATE … MKSTREAM");
        EventConsumer {
            con,
            stream: stream.into(),
            group: group.into(),
            got: Vec::new(),
        }
    }

    /// One `XREADGROUP … BLOCK 100 STREAMS <stream> >`; decodes, checks the
    /// stream fields against the content, and XACKs what it read.
    async fn poll(&mut self) -> usize {
        let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&self.group)
            .arg("worker-1")
            .arg("COUNT")
            .arg(1000)
            .arg("BLOCK")
            .arg(100)
            .arg("STREAMS")
            .arg(&self.stream)
            .arg(">")
            .query_async(&mut self.con)
            .await
            .expect("XREADGROUP");
        let Some(reply) = reply else { return 0 };
        let mut n = 0;
        for key in reply.keys {
            for entry in key.ids {
                let field = |f: &str| -> Vec<u8> {
                    let v = entry
                        .map
                        .get(f)
                        .unwrap_or_else(|| panic!("entry {} has no field {f}: {:?}", entry.id, entry.map));
                    redis::from_redis_value_ref(v).unwrap()
                };
                let text = |f: &str| String::from_utf8(field(f)).unwrap();
                let encoding = text("encoding");
                let content = field("content");
                let event: Event = match encoding.as_str() {
                    "json" => serde_json::from_slice(&content).expect("json content"),
                    "msgpack" => rmp_serde::from_slice(&content).expect("msgpack content"),
                    other => panic!("unknown encoding {other:?}"),
                };
                let kind = match event.kind {
                    EventKind::Rotated => "rotated",
                    EventKind::Compressed => "compressed",
                };
                assert_eq!(text("type"), kind, "{}", entry.id);
                assert_eq!(text("event_id"), event.event_id, "{}", entry.id);
                assert_eq!(text("timestamp"), event.timestamp_ms.to_string(), "{}", entry.id);
                assert_eq!(entry.map.len(), 5, "fields: type encoding content timestamp event_id");
                let _: i64 = redis::cmd("XACK")
                    .arg(&self.stream)
                    .arg(&self.group)
                    .arg(&entry.id)
                    .query_async(&mut self.con)
                    .await
                    .expect("XACK");
                self.got.push(Delivered {
                    entry_id: entry.id.clone(),
                    encoding,
                    event,
                });
                n += 1;
            }
        }
        n
    }

    /// Reads until at least `n` entries arrived in total, then a little
    /// longer to catch any extra ones.
    async fn read_at_least(&mut self, n: usize, timeout: Duration) -> &[Delivered] {
        let deadline = Instant::now() + timeout;
        while self.got.len() < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} events arrived in {timeout:?}: {:#?}",
                self.got.len(),
                self.got.iter().map(|d| &d.event.event_id).collect::<Vec<_>>()
            );
            self.poll().await;
        }
        for _ in 0..3 {
            self.poll().await;
        }
        &self.got
    }
}

fn crc_hex(bytes: &[u8]) -> String {
    format!("crc32:{:08x}", crc32fast::hash(bytes))
}

/// Checks delivered events against the finished files on disk:
/// - for every `.log.gz`, one `rotated` event (the `.log` it was: path, seq
///   range, frames, bytes, times, crc32 of the uncompressed bytes) and one
///   `compressed` event (the `.log.gz`: size and crc32 on disk); nothing else;
/// - per session and kind, events in seq order, each `compressed` after its
///   `rotated`;
/// - a duplicate (allowed only with `dups_allowed`) has the same
///   `event_id` and describes the same file; only `timestamp_ms` may differ.
///
/// Returns how many duplicates there were.
fn check_events(got: &[Delivered], files: &[Rotated], encoding: &str, dups_allowed: bool) -> usize {
    let mut first: HashMap<&str, (usize, &Event)> = HashMap::new();
    let mut dups = 0;
    for (i, d) in got.iter().enumerate() {
        assert_eq!(d.encoding, encoding, "{}", d.entry_id);
        let e = &d.event;
        match first.get(e.event_id.as_str()) {
            None => {
                first.insert(&e.event_id, (i, e));
            }
            Some((_, prev)) => {
                assert!(dups_allowed, "event {} delivered twice: {prev:?} / {e:?}", e.event_id);
                let same = Event {
                    timestamp_ms: prev.timestamp_ms,
                    ..e.clone()
                };
                assert_eq!(&same, *prev, "a resent {} must describe the same file", e.event_id);
                dups += 1;
            }
        }
    }
    let mut expected: BTreeSet<String> = BTreeSet::new();
    for f in files {
        assert!(f.gz, "{}: events are checked once every file is compressed", f.name);
        let log_name = f.name.strip_suffix(".gz").unwrap();
        // Unset LOGD_INSTANCE: the host name names the instance.
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        let host = host.trim();
        let rid = format!("rotated:{}:{}-{}@{host}", f.session, f.first, f.last);
        let cid = format!("compressed:{}:{}-{}@{host}", f.session, f.first, f.last);
        let (ri, r) = *first
            .get(rid.as_str())
            .unwrap_or_else(|| panic!("no rotated event for {}", f.name));
        let (ci, c) = *first
            .get(cid.as_str())
            .unwrap_or_else(|| panic!("no compressed event for {}", f.name));
        assert!(ri < ci, "{}: compressed before rotated", f.name);
        for (e, kind) in [(r, EventKind::Rotated), (c, EventKind::Compressed)] {
            assert_eq!(e.kind, kind);
            assert_eq!(e.instance, host, "{}", e.event_id);
            assert_eq!(
                (e.session_id.as_str(), e.first_seq, e.last_seq, e.frames),
                (f.session.as_str(), f.first, f.last, f.lines.len() as u64),
                "{}: {e:?}",
                f.name
            );
            assert_eq!(
                (e.first_time.as_str(), e.last_time.as_str()),
                (f.lines[0].time.as_str(), f.lines[f.lines.len() - 1].time.as_str()),
                "{}",
                f.name
            );
            assert!(
                matches!(e.reason, RotateReason::Size | RotateReason::Manual),
                "{}: {:?}",
                f.name,
                e.reason
            );
        }
        assert_eq!(
            (r.path.as_str(), r.bytes, r.compression.as_str(), r.checksum.clone()),
            (log_name, f.data.len() as u64, "none", crc_hex(&f.data)),
            "rotated event of {}",
            f.name
        );
        assert_eq!(
            (c.path.as_str(), c.bytes, c.compression.as_str(), c.checksum.clone()),
            (f.name.as_str(), f.disk.len() as u64, "gzip", crc_hex(&f.disk)),
            "compressed event of {}",
            f.name
        );
        assert_eq!(r.reason, c.reason);
        expected.insert(rid);
        expected.insert(cid);
    }
    let delivered: BTreeSet<String> = first.keys().map(|k| k.to_string()).collect();
    assert_eq!(delivered, expected, "events for exactly the files on disk");
    // In seq order per session and kind (first deliveries, stream order).
    let mut last: HashMap<(String, bool), i64> = HashMap::new();
    let mut order: Vec<(usize, &Event)> = first.values().copied().collect();
    order.sort_by_key(|(i, _)| *i);
    for (_, e) in order {
        let k = (e.session_id.clone(), e.kind == EventKind::Rotated);
        let prev = last.insert(k, e.last_seq).unwrap_or(0);
        assert_eq!(
            e.first_seq,
            prev + 1,
            "{}: out of seq order (previous last {prev})",
            e.event_id
        );
    }
    dups
}

/// Sends a few rounds to `sessions` (small files rotate often), then
/// rotates what is left in the live files.
async fn rotating_load(server: &Server, acked: &mut Acked, sessions: &[&str], rounds: usize) {
    for _ in 0..rounds {
        for s in sessions {
            send_n(server, acked, s, 4, 120).await;
        }
    }
    rotate_all(server).await;
}

/// Waits until every rotation is compressed and every event left the outbox.
async fn wait_settled(server: &Server, timeout: Duration) -> StatsResponse {
    wait_for(server, "compressions done and outbox empty", timeout, |s| {
        s.compress_backlog == 0 && s.compressed_files == s.rotations_size + s.rotations_manual && s.outbox_events == 0
    })
    .await
}

async fn events_in_both_encodings(encoding: &str) {
    let redis = RedisServer::start();
    let stream = "etl:files";
    let mut consumer = EventConsumer::create(&redis.url, stream, "etl").await;
    let td = TestDir::new();
    let dir = td.log_dir();
    let t0 = unix_now();
    let env = [
        ("REDIS_URL", redis.url.as_str()),
        ("REDIS_PUBSUB_FORMAT", encoding),
        ("LOGD_REDIS_STREAM", stream),
        ("LOG_MAX_SIZE_BYTES", "4096"),
        ("LOG_COMPRESSION", "gzip"),
        ("LOG_FLUSH_INTERVAL_MS", "50"),
    ];
    let mut server = Server::start(&dir, &env);
    let mut acked = Acked::new();
    rotating_load(&server, &mut acked, &["ev-a", "ev-b", "ev.c"], 12).await;
    let st = wait_settled(&server, Duration::from_secs(20)).await;
    assert_eq!(st.events_published, 2 * st.compressed_files, "{st:?}");
    server.stop();

    let files = rotated_files(&dir, (t0, unix_now()));
    assert_eq!(leftovers(&dir), Vec::<String>::new());
    assert_exactly_acked(&dir, &files, &acked);
    let got = consumer.read_at_least(2 * files.len(), Duration::from_secs(10)).await;
    check_events(got, &files, encoding, false);
    let reasons: Vec<RotateReason> = got
        .iter()
        .filter(|d| d.event.kind == EventKind::Rotated)
        .map(|d| d.event.reason)
        .collect();
    let size = reasons.iter().filter(|r| **r == RotateReason::Size).count() as u64;
    assert_eq!(
        (size, reasons.len() as u64 - size),
        (st.rotations_size, st.rotations_manual)
    );
    let xlen: u64 = redis::cmd("XLEN")
        .arg(stream)
        .query_async(&mut consumer.con)
        .await
        .unwrap();
    assert_eq!(xlen, 2 * files.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rotated_and_compressed_file_is_announced_once_on_the_stream_in_json() {
    events_in_both_encodings("json").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rotated_and_compressed_file_is_announced_once_on_the_stream_in_msgpack() {
    events_in_both_encodings("msgpack").await;
}

/// Events while nothing listens on REDIS_URL's port; optionally a logd
/// restart in between; then redis-server starts on that port.
async fn redis_down_then_up(restart_logd: bool) {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let td = TestDir::new();
    let dir = td.log_dir();
    let t0 = unix_now();
    let env = [
        ("REDIS_URL", url.as_str()),
        ("LOG_MAX_SIZE_BYTES", "4096"),
        ("LOG_COMPRESSION", "gzip"),
        ("LOG_FLUSH_INTERVAL_MS", "50"),
    ];
    let mut server = Server::start(&dir, &env);
    let mut acked = Acked::new();
    let sessions = ["down-a", "down-b"];
    let t = Instant::now();
    rotating_load(&server, &mut acked, &sessions, 10).await;
    let ingest = t.elapsed();
    let st = wait_for(&server, "events waiting in the outbox", Duration::from_secs(20), |s| {
        let files = s.rotations_size + s.rotations_manual;
        s.compress_backlog == 0 && s.compressed_files == files && s.outbox_events == 2 * files && s.events_failed > 0
    })
    .await;
    assert!(st.outbox_events > 0 && st.events_published == 0, "{st:?}");
    assert_eq!(st.frames_accepted, 80, "ingest is unaffected (took {ingest:?})");
    let mut waiting = st.outbox_events;
    if restart_logd {
        server.stop();
        server.restart();
        let st = stats(&server).await;
        assert_eq!(st.outbox_events, waiting, "the outbox survives a restart");
        rotating_load(&server, &mut acked, &sessions, 5).await;
        let st = wait_for(&server, "more events waiting", Duration::from_secs(20), |s| {
            let files = s.rotations_size + s.rotations_manual;
            s.compress_backlog == 0 && s.compressed_files == files && s.outbox_events == waiting + 2 * files
        })
        .await;
        waiting = st.outbox_events;
    }
    let redis = RedisServer::start_on(port);
    let mut consumer = EventConsumer::create(&redis.url, "logd:events", "etl").await;
    // The mirror counts an event as published after its removal from the
    // outbox is durable: a snapshot can see the outbox empty and the count
    // one short, so wait for both (and then check the count is not over).
    let st = wait_for(&server, "the outbox drained", Duration::from_secs(20), |s| {
        s.outbox_events == 0 && s.events_published >= waiting
    })
    .await;
    assert_eq!(st.events_published, waiting, "{st:?}");
    server.stop();
    let files = rotated_files(&dir, (t0, unix_now()));
    assert_eq!(2 * files.len() as u64, waiting);
    assert_exactly_acked(&dir, &files, &acked);
    let got = consumer.read_at_least(2 * files.len(), Duration::from_secs(10)).await;
    check_events(got, &files, "json", false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_wait_while_redis_is_down_and_all_arrive_in_order_once_it_is_up() {
    redis_down_then_up(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_waiting_for_redis_survive_a_logd_restart() {
    redis_down_then_up(true).await;
}

// ---------------------------------------------------------------------------
// 6. Crashes between the steps.

/// Frames sent with client seqs, so that unacked ones can be resent after
/// a crash and end up exactly once.
struct ClientFrames {
    /// session → (seq, content, acked)
    frames: BTreeMap<String, Vec<(i64, String, bool)>>,
}

impl ClientFrames {
    /// One WriteLogBatch of `n` new frames per session; false if the call
    /// failed (the server is gone).
    async fn send_new(&mut self, server: &Server, sessions: &[&str], n: usize) -> bool {
        let mut batch = Vec::new();
        let mut sent = Vec::new();
        for s in sessions {
            let v = self.frames.entry(s.to_string()).or_default();
            for _ in 0..n {
                let seq = v.len() as i64 + 1;
                let content = format!("{s} #{seq} {}", "y".repeat(100));
                batch.push(frame(s, seq, &content));
                v.push((seq, content, false));
                sent.push((s.to_string(), seq as usize - 1));
            }
        }
        let Ok(mut client) = logd::pb::log_service_client::LogServiceClient::connect(server.addr.clone()).await else {
            return false;
        };
        match client.write_log_batch(LogBatch { frames: batch }).await {
            Ok(r) => {
                let r = r.into_inner();
                assert_eq!(r.frames_rejected, 0, "{r:?}");
                assert_eq!(r.frames_accepted + r.frames_duplicate, sent.len() as i64);
                for (s, i) in sent {
                    self.frames.get_mut(&s).unwrap()[i].2 = true;
                }
                true
            }
            Err(_) => false,
        }
    }

    /// Resends every frame not acked (same seqs); all must be settled.
    async fn resend_unacked(&mut self, server: &Server) -> usize {
        let batch: Vec<LogFrame> = self
            .frames
            .iter()
            .flat_map(|(s, v)| v.iter().filter(|f| !f.2).map(|(q, c, _)| frame(s, *q, c)))
            .collect();
        let n = batch.len();
        if n > 0 {
            let mut client = server.client().await;
            let r = client
                .write_log_batch(LogBatch { frames: batch })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.frames_accepted + r.frames_duplicate, n as i64, "{r:?}");
        }
        for v in self.frames.values_mut() {
            for f in v.iter_mut() {
                f.2 = true;
            }
        }
        n
    }

    fn acked(&self) -> Acked {
        self.frames
            .iter()
            .map(|(s, v)| (s.clone(), v.iter().map(|(q, c, _)| (*q, c.clone())).collect()))
            .collect()
    }
}

/// Aborts logd at `point` (its first hit) while it rotates, compresses and
/// publishes; optionally runs `logd recover` offline; restarts; resends
/// what was not acked; finishes everything. Then: complete files, every
/// frame exactly once, every event delivered (duplicates only as resends of
/// the same event_id).
async fn crash_at(point: &str, recover_offline: bool) {
    let redis = RedisServer::start();
    let mut consumer = EventConsumer::create(&redis.url, "logd:events", "etl").await;
    let td = TestDir::new();
    let dir = td.log_dir();
    let t0 = unix_now();
    let env = [
        ("REDIS_URL", redis.url.as_str()),
        ("LOG_MAX_SIZE_BYTES", "2048"),
        ("LOG_COMPRESSION", "gzip"),
        ("LOGD_COMPRESSION_LEVEL", "1"),
        ("LOG_FLUSH_INTERVAL_MS", "20"),
    ];
    let failpoint = format!("{point}=return");
    let mut armed = env.to_vec();
    armed.push(("FAILPOINTS", failpoint.as_str()));
    let mut server = Server::start(&dir, &armed);
    let sessions = ["crash-a", "crash-b"];
    let mut frames = ClientFrames {
        frames: BTreeMap::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = server.try_exit_status() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "logd did not abort at {point} (built without --features failpoints?); stderr:\n{}",
            server.stderr()
        );
        if !frames.send_new(&server, &sessions, 6).await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let stderr = server.stderr();
    assert_eq!(status.signal(), Some(6), "{point}: {status}\n{stderr}");
    assert!(stderr.contains(&format!("crash point {point} hit")), "{stderr}");

    if recover_offline {
        let out = Command::new(logd_bin())
            .arg("recover")
            .env("LOG_DIR", &dir)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "logd recover: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut server = Server::start(&dir, &env);
    let resent = frames.resend_unacked(&server).await;
    for _ in 0..5 {
        assert!(frames.send_new(&server, &sessions, 6).await);
    }
    rotate_all(&server).await;
    wait_files_settled(&server, &dir, Duration::from_secs(30)).await;
    server.stop();

    assert_eq!(
        leftovers(&dir),
        Vec::<String>::new(),
        "every .log compressed, no .gz.tmp"
    );
    let files = rotated_files(&dir, (t0, unix_now()));
    assert!(files.iter().all(|f| f.gz));
    assert_exactly_acked(&dir, &files, &frames.acked());
    let got = consumer.read_at_least(2 * files.len(), Duration::from_secs(10)).await;
    let dups = check_events(got, &files, "json", true);
    println!(
        "{point}{}: {} files, {} events delivered ({dups} resent), {resent} frames resent after the crash",
        if recover_offline { " + logd recover" } else { "" },
        files.len(),
        got.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs --features failpoints")]
async fn a_crash_after_a_rotation_is_recorded_is_finished_by_logd_recover() {
    crash_at("rotate::after_record", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs --features failpoints")]
async fn a_crash_after_the_rename_of_a_rotation_is_finished_at_restart() {
    crash_at("rotate::after_rename", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs --features failpoints")]
async fn a_crash_after_the_directory_fsync_of_a_rotation_is_finished_by_logd_recover() {
    crash_at("rotate::after_dir_fsync", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs --features failpoints")]
async fn a_crash_after_the_gz_is_renamed_in_place_is_finished_at_restart() {
    crash_at("compress::after_gz", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs --features failpoints")]
async fn a_crash_after_the_gz_is_renamed_in_place_is_finished_by_logd_recover() {
    crash_at("compress::after_gz", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs --features failpoints")]
async fn a_crash_after_the_compressed_event_is_recorded_is_finished_at_restart() {
    crash_at("compress::after_event", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs --features failpoints")]
async fn a_crash_between_xadd_and_outbox_removal_resends_the_same_event() {
    crash_at("mirror::after_xadd", false).await;
}

/// Compression jobs left in the store by a crash are picked up at the next
/// start; their `compressed` events must still come in seq order, also when
/// the names of one second do not sort by seq (`…10-10.log` < `…9-9.log`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs --features failpoints")]
async fn compressions_left_by_a_crash_are_announced_in_seq_order() {
    let redis = RedisServer::start();
    let mut consumer = EventConsumer::create(&redis.url, "logd:events", "etl").await;
    let td = TestDir::new();
    let dir = td.log_dir();
    let t0 = unix_now();
    let env = [
        ("REDIS_URL", redis.url.as_str()),
        ("LOG_MAX_SIZE_BYTES", "1"), // every write rotates
        ("LOG_COMPRESSION", "gzip"),
        ("LOG_FLUSH_INTERVAL_MS", "20"),
    ];
    // Each compression stalls (not aborts) after its .gz: a backlog builds.
    let mut slow = env.to_vec();
    slow.push(("FAILPOINTS", "compress::after_gz=sleep(10000)"));
    let mut server = Server::start(&dir, &slow);
    let mut acked = Acked::new();
    // Start right after a second begins, so that the files get one stamp.
    while store::now_ms() % 1000 > 100 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for _ in 0..15 {
        send_n(&server, &mut acked, "order", 1, 20).await;
    }
    wait_for(
        &server,
        "15 rotations, compressions waiting",
        Duration::from_secs(10),
        |s| s.rotations_size == 15 && s.compress_backlog >= 10,
    )
    .await;
    server.kill9();
    let mut server = Server::start(&dir, &env);
    wait_files_settled(&server, &dir, Duration::from_secs(30)).await;
    server.stop();
    let files = rotated_files(&dir, (t0, unix_now()));
    assert_eq!(files.len(), 15);
    assert_exactly_acked(&dir, &files, &acked);
    let got = consumer.read_at_least(30, Duration::from_secs(10)).await;
    check_events(got, &files, "json", true);
}

/// Sets the soft RLIMIT_NOFILE of a running process (util-linux `prlimit`).
fn set_nofile_soft(pid: u32, soft: u64) {
    let out = Command::new("prlimit")
        .arg("--pid")
        .arg(pid.to_string())
        .arg(format!("--nofile={soft}:"))
        .output()
        .expect("prlimit (util-linux) is needed");
    assert!(
        out.status.success(),
        "prlimit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A writer that failed (here: `open` of its file hit the fd limit) drops
/// the frames routed to it; they are only in the WAL. The session must stay
/// stopped until a restart replays them: if the idle timeout let a new
/// writer take the session, its later seqs would make replay skip the
/// dropped ones, and acked frames would be lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_writer_failed_loses_no_acked_frame_across_idle_eviction_and_restart() {
    let td = TestDir::new();
    let dir = td.log_dir();
    let env = [
        ("LOG_IDLE_TIMEOUT_SECONDS", "1"),
        ("LOG_COMPRESSION", "none"),
        ("LOG_FLUSH_INTERVAL_MS", "50"),
    ];
    let mut server = Server::start(&dir, &env);
    let pid = server.child.as_ref().unwrap().id();
    let mut client = server.client().await;
    let sessions: Vec<String> = (0..150).map(|i| format!("fd-{i:03}")).collect();
    let batch = |round: usize, n: usize| LogBatch {
        frames: sessions
            .iter()
            .flat_map(|s| (0..n).map(move |k| frame(s, 0, &format!("{s} round {round} frame {k}"))))
            .collect(),
    };
    // Room for about 30 more files: most writers cannot open theirs.
    let open_now = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count() as u64;
    set_nofile_soft(pid, open_now + 30);
    let r = client.write_log_batch(batch(0, 3)).await.unwrap().into_inner();
    assert_eq!(
        r.frames_accepted, 450,
        "acked although files cannot be opened: the WAL has them"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    set_nofile_soft(pid, nofile_soft_limit());
    assert!(
        server.stderr().contains("Too many open files"),
        "the limit made writers fail:\n{}",
        server.stderr()
    );
    // Past the idle timeout, then more frames for every session.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = client.write_log_batch(batch(1, 2)).await.unwrap().into_inner();
    assert_eq!(r.frames_accepted, 300);
    assert!(r.sessions.iter().all(|s| (s.first_seq, s.last_seq) == (4, 5)), "{r:?}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.stop();
    server.restart(); // the recovery pass replays what the WAL holds
    server.stop();

    let acked: Acked = sessions
        .iter()
        .map(|s| {
            let frames = (0..3)
                .map(|k| (k as i64 + 1, format!("{s} round 0 frame {k}")))
                .chain((0..2).map(|k| (k as i64 + 4, format!("{s} round 1 frame {k}"))))
                .collect();
            (s.clone(), frames)
        })
        .collect();
    let files = rotated_files(&dir, (unix_now() - 60, unix_now()));
    assert_exactly_acked(&dir, &files, &acked);
}

/// Frames that reach a writer's queue while it goes idle (here its last
/// write took longer than the idle timeout) are written before it stops;
/// they must not stay behind in a live file that nothing rotates, compresses
/// or announces until the session sends again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs --features failpoints")]
async fn frames_queued_when_a_session_goes_idle_do_not_stay_in_a_live_file() {
    let td = TestDir::new();
    let dir = td.log_dir();
    let t0 = unix_now();
    let env = [
        ("LOG_IDLE_TIMEOUT_SECONDS", "1"),
        ("LOG_COMPRESSION", "none"),
        ("LOG_FLUSH_INTERVAL_MS", "50"),
        // Every session-file write stalls past the idle timeout.
        ("FAILPOINTS", "writer::after_write=sleep(1100)"),
    ];
    let mut server = Server::start(&dir, &env);
    let sessions = ["q-0", "q-1", "q-2", "q-3"];
    let mut acked = Acked::new();
    for s in sessions {
        send_n(&server, &mut acked, s, 2, 20).await;
        send_n(&server, &mut acked, s, 1, 20).await;
    }
    wait_for(&server, "every session evicted", Duration::from_secs(30), |s| {
        s.evictions >= 4 && s.active_sessions == 0
    })
    .await;
    server.stop();
    let live: Vec<String> = file_names(&dir)
        .into_iter()
        .filter(|n| n.ends_with(".logtmp"))
        .collect();
    assert!(live.is_empty(), "live files of evicted sessions: {live:?}");
    let files = rotated_files(&dir, (t0, unix_now()));
    assert_exactly_acked(&dir, &files, &acked);
}
