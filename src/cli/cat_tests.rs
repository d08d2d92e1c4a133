//! Tests of `logd cat` on real files: rotated, compressed and live files of
//! one or several log directories, written the way logd names and fills them.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;

fn line(seq: i64, content: &str) -> String {
    format!(
        "{{\"seq\":{seq},\"time\":\"2026-12-01T08:00:{:02}Z\",\"session_id\":\"s\",\"user_id\":\"\",\"role\":\"agent\",\"version\":1,\"content\":{},\"metadata\":{{}}}}\n",
        seq % 60,
        serde_json::to_string(content).unwrap()
    )
}

fn lines(seqs: impl IntoIterator<Item = i64>) -> String {
    seqs.into_iter().map(|s| line(s, &format!("line {s}"))).collect()
}

/// `s.<stamp>.<first>-<last>.log[.gz]` holding `first..=last`; `stamp_s` sets
/// the name's time so tests can make names sort differently from seqs.
fn rotated(dir: &Path, stamp_s: u64, first: i64, last: i64, gz: bool) {
    let name = store::rotated_name("s", 1_700_000_000_000 + stamp_s * 1000, first, last);
    let body = lines(first..=last);
    if gz {
        let f = File::create(dir.join(format!("{name}.gz"))).unwrap();
        let mut enc = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
        enc.write_all(body.as_bytes()).unwrap();
        enc.finish().unwrap();
    } else {
        std::fs::write(dir.join(name), body).unwrap();
    }
}

fn args(dirs: &[&Path]) -> CatArgs {
    CatArgs {
        session: "s".into(),
        from_seq: 0,
        to_seq: i64::MAX,
        follow: false,
        format: CatFormat::Json,
        poll_interval_ms: 5,
        dirs: dirs.iter().map(|d| d.to_path_buf()).collect(),
    }
}

fn cat_seqs(a: &CatArgs) -> (Vec<i64>, Summary) {
    let mut out = Vec::new();
    let summary = run(a, &mut out).unwrap();
    (seqs_of(&out), summary)
}

#[test]
fn cat_prints_a_session_in_seq_order_across_gzip_rotated_and_live_files() {
    let d = tempfile::tempdir().unwrap();
    // Names sort by time to the second only: 10-12 sorts first by name.
    rotated(d.path(), 5, 10, 12, true);
    rotated(d.path(), 6, 1, 3, true);
    rotated(d.path(), 7, 4, 9, false);
    // The live file ends with a line still being written (no newline yet).
    let live = format!("{}{{\"seq\":15,\"time\"", lines(13..=14));
    std::fs::write(d.path().join("s.logtmp"), live).unwrap();
    // Another session whose id extends this one's is not read.
    std::fs::write(d.path().join("s.x.logtmp"), lines(100..=101)).unwrap();
    rotated_other(d.path());

    let (seqs, summary) = cat_seqs(&args(&[d.path()]));
    assert_eq!(seqs, (1..=14).collect::<Vec<_>>());
    assert_eq!(
        summary,
        Summary {
            printed: 14,
            duplicates: 0,
            unparsable: 0
        }
    );

    let mut a = args(&[d.path()]);
    a.from_seq = 3;
    a.to_seq = 11;
    assert_eq!(cat_seqs(&a).0, (3..=11).collect::<Vec<_>>());
}

fn rotated_other(dir: &Path) {
    let name = store::rotated_name("s.x", 1_700_000_000_000, 1, 2);
    std::fs::write(dir.join(name), lines(1..=2)).unwrap();
}

#[test]
fn cat_drops_seqs_found_in_two_directories_and_counts_them() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    // Instance A made 1..=7 durable; its last acks were lost in a failover,
    // so the client resent 5..=7 to B, which then took 8..=9.
    rotated(a.path(), 1, 1, 4, true);
    std::fs::write(a.path().join("s.logtmp"), lines(5..=7)).unwrap();
    rotated(b.path(), 2, 5, 6, false);
    std::fs::write(b.path().join("s.logtmp"), lines(7..=9)).unwrap();

    let (seqs, summary) = cat_seqs(&args(&[a.path(), b.path()]));
    assert_eq!(seqs, (1..=9).collect::<Vec<_>>());
    assert_eq!(summary.duplicates, 3, "5, 6 and 7 are in both directories");
    assert_eq!(summary.printed, 9);
}

#[test]
fn cat_text_format_prints_time_role_and_content_on_one_line() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("s.logtmp"), line(1, "two\nlines")).unwrap();
    let mut a = args(&[d.path()]);
    a.format = CatFormat::Text;
    let mut out = Vec::new();
    run(&a, &mut out).unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "2026-12-01T08:00:01Z agent two\\nlines\n"
    );
}

#[test]
fn cat_refuses_a_session_id_that_could_name_another_path() {
    let d = tempfile::tempdir().unwrap();
    let mut a = args(&[d.path()]);
    a.session = "../etc/passwd".into();
    let e = run(&a, &mut Vec::new()).unwrap_err();
    assert!(e.to_string().contains("not a valid session id"), "{e}");
}

/// Descriptors of this process open on files under `dir` now.
fn open_fds_under(dir: &Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.starts_with(dir))
        .count()
}

/// An output that records the most descriptors open under `dir` while it
/// was written.
struct FdWatch {
    dir: std::path::PathBuf,
    bytes: Vec<u8>,
    fds_max: usize,
}

impl Write for FdWatch {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.fds_max = self.fds_max.max(open_fds_under(&self.dir));
        self.bytes.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn cat_reads_a_session_of_thousands_of_files_holding_few_open_at_once() {
    let d = tempfile::tempdir().unwrap();
    let files = 3000i64;
    for i in 0..files {
        // Two lines a file; every third file still uncompressed.
        rotated(d.path(), i as u64, 2 * i + 1, 2 * i + 2, i % 3 != 0);
    }
    std::fs::write(d.path().join("s.logtmp"), lines(2 * files + 1..=2 * files + 2)).unwrap();
    let mut out = FdWatch {
        dir: d.path().canonicalize().unwrap(),
        bytes: Vec::new(),
        fds_max: 0,
    };
    let summary = run(&args(&[d.path()]), &mut out).unwrap();
    assert_eq!(seqs_of(&out.bytes), (1..=2 * files + 2).collect::<Vec<_>>());
    assert_eq!(summary.printed as i64, 2 * files + 2);
    // The live file and the rotated file being read.
    assert!(
        out.fds_max <= 2,
        "{} descriptors open at once while reading {files} files",
        out.fds_max
    );
}

/// A shared output a follower thread writes and the test reads.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Shared {
    fn wait_for(&self, n: usize) -> Vec<i64> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let seqs = seqs_of(&self.0.lock().unwrap());
            if seqs.len() >= n {
                return seqs;
            }
            assert!(Instant::now() < deadline, "only {seqs:?} printed, waiting for {n}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Runs `logd cat --follow` on a thread; its summary arrives on the channel
/// once it reaches `--to-seq` (a test that waits for it has a deadline).
fn follow(a: CatArgs, mut out: Shared) -> std::sync::mpsc::Receiver<Summary> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(run(&a, &mut out).unwrap());
    });
    rx
}

#[test]
fn cat_follow_keeps_printing_by_seq_across_a_rotation_and_a_compression() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_path_buf();
    let live = dir.join("s.logtmp");
    let mut f = File::create(&live).unwrap();
    f.write_all(lines(1..=3).as_bytes()).unwrap();

    let mut a = args(&[&dir]);
    a.follow = true;
    a.to_seq = 8;
    let out = Shared::default();
    let follower = follow(a, out.clone());
    assert_eq!(out.wait_for(3), vec![1, 2, 3]);

    // A line written in two pieces is printed once it is whole.
    let four = line(4, "line 4");
    f.write_all(&four.as_bytes()[..10]).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    f.write_all(&four.as_bytes()[10..]).unwrap();
    assert_eq!(out.wait_for(4), vec![1, 2, 3, 4]);

    // Rotation: a last line, the rename, a new live file; then the rotated
    // file is compressed and the .log removed, as logd does.
    f.write_all(line(5, "line 5").as_bytes()).unwrap();
    drop(f);
    let name = store::rotated_name("s", 1_700_000_000_000, 1, 5);
    std::fs::rename(&live, dir.join(&name)).unwrap();
    std::fs::write(&live, lines(6..=7)).unwrap();
    assert_eq!(out.wait_for(7), (1..=7).collect::<Vec<_>>());
    let gz = File::create(dir.join(format!("{name}.gz"))).unwrap();
    let mut enc = flate2::write::GzEncoder::new(gz, flate2::Compression::fast());
    enc.write_all(lines(1..=5).as_bytes()).unwrap();
    enc.finish().unwrap();
    std::fs::remove_file(dir.join(&name)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    std::fs::OpenOptions::new()
        .append(true)
        .open(&live)
        .unwrap()
        .write_all(lines(8..=9).as_bytes())
        .unwrap();

    let summary = follower
        .recv_timeout(Duration::from_secs(20))
        .expect("logd cat --follow did not reach --to-seq");
    assert_eq!(seqs_of(&out.0.lock().unwrap()), (1..=8).collect::<Vec<_>>());
    assert_eq!(
        summary.duplicates, 0,
        "the rotated and compressed copies are not read again"
    );
}

#[test]
fn cat_follow_rereads_a_live_file_truncated_under_it_without_printing_twice() {
    let d = tempfile::tempdir().unwrap();
    let live = d.path().join("s.logtmp");
    // A crash left a torn last line, longer than what is written after the
    // cut (so the cut is seen whenever the follower looks).
    let torn = format!("{{\"seq\":4,\"content\":\"{}", "x".repeat(2000));
    std::fs::write(&live, format!("{}{torn}", lines(1..=3))).unwrap();
    let mut a = args(&[d.path()]);
    a.follow = true;
    a.to_seq = 5;
    let out = Shared::default();
    let follower = follow(a, out.clone());
    assert_eq!(out.wait_for(3), vec![1, 2, 3]);
    // Recovery cuts the torn line; the writer goes on from there.
    let f = std::fs::OpenOptions::new().write(true).open(&live).unwrap();
    f.set_len(lines(1..=3).len() as u64).unwrap();
    drop(f);
    let mut f = std::fs::OpenOptions::new().append(true).open(&live).unwrap();
    f.write_all(lines(4..=5).as_bytes()).unwrap();
    let summary = follower
        .recv_timeout(Duration::from_secs(20))
        .expect("logd cat --follow did not reach --to-seq");
    assert_eq!(seqs_of(&out.0.lock().unwrap()), (1..=5).collect::<Vec<_>>());
    assert_eq!(summary.duplicates, 0);
    assert_eq!(summary.unparsable, 0);
}
