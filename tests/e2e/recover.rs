//! `logd recover` after a kill -9: it finishes exactly what `logd serve`'s
//! start would, reports it truthfully ("would …" in a dry run), and its
//! `--json` carries the pending compressions and the outbox backlog.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use logd::pb::LogBatch;

use crate::redis_server::free_port;
use crate::util::*;

/// Every file and directory under `dir` (recursively) with its size and
/// crc32, except the state lock (which holds the pid of its last holder).
pub fn tree(dir: &Path) -> BTreeMap<PathBuf, (u64, u32)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, (u64, u32)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            if p.is_dir() {
                out.insert(rel, (0, 0));
                walk(root, &p, out);
            } else if rel != Path::new(".logd/LOCK") {
                let bytes = std::fs::read(&p).unwrap();
                out.insert(rel, (bytes.len() as u64, crc32fast::hash(&bytes)));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Names of the files directly in `dir` ending with `suffix`.
fn named(dir: &Path, suffix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(suffix))
        .collect();
    v.sort();
    v
}

/// Rotated and compressed files and temporaries (what a lifecycle step touches).
fn lifecycle_files(dir: &Path) -> Vec<String> {
    let mut v = named(dir, ".log");
    v.extend(named(dir, ".log.gz"));
    v.extend(named(dir, ".tmp"));
    v.sort();
    v
}

async fn send_one(server: &Server, session: &str) -> bool {
    let Ok(mut client) = logd::pb::log_service_client::LogServiceClient::connect(server.addr.clone()).await else {
        return false;
    };
    client
        .write_log_batch(LogBatch {
            frames: vec![frame(session, 0, "a line that is longer than one byte")],
        })
        .await
        .is_ok()
}

fn wait_until(what: &str, server: &Server, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; stderr:\n{}",
            server.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn copy_dir(from: &Path, to: &Path) {
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success(), "cp -a");
}

fn text(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "logd recover failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn json(out: &std::process::Output) -> serde_json::Value {
    let t = text(out);
    serde_json::from_str(t.lines().last().unwrap_or_default()).unwrap_or_else(|e| panic!("not JSON ({e}): {t}"))
}

fn names(v: &serde_json::Value, pointer: &str) -> Vec<String> {
    v.pointer(pointer)
        .unwrap_or_else(|| panic!("no {pointer} in {v}"))
        .as_array()
        .unwrap_or_else(|| panic!("{pointer} is not a list in {v}"))
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect()
}

/// A kill -9 inside a gzip leaves `<f2>.log` with a 0-byte `<f2>.log.gz.tmp`
/// beside `<f1>.log.gz`, compressed and announced before. `recover --dry-run`
/// names only `f2` ("would"), changes nothing; `recover` finishes `f2` and
/// says so; both report the pending compression and the outbox backlog in
/// JSON; after `recover`, `serve` finds nothing left to finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs --features failpoints")]
async fn recover_after_a_kill_inside_gzip_reports_and_finishes_exactly_what_serve_would() {
    let td = TestDir::new();
    let dir = td.log_dir();
    // Events on, Redis unreachable: every event stays in the outbox.
    let redis_url = format!("redis://127.0.0.1:{}", free_port());
    let env = [
        ("REDIS_URL", redis_url.as_str()),
        ("LOG_MAX_SIZE_BYTES", "1"),
        ("LOG_COMPRESSION", "gzip"),
        ("LOG_FLUSH_INTERVAL_MS", "20"),
    ];
    let mut armed = env.to_vec();
    armed.push(("FAILPOINTS", "compress::after_tmp_open=1*off->return"));
    let mut server = Server::start(&dir, &armed);
    assert!(send_one(&server, "rec").await);
    wait_until("the first file compressed", &server, || {
        named(&dir, ".log.gz").len() == 1 && named(&dir, ".log").is_empty()
    });
    let _ = send_one(&server, "rec").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.try_exit_status().is_none() {
        assert!(
            Instant::now() < deadline,
            "logd did not abort inside the second gzip; stderr:\n{}",
            server.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(server.stderr().contains("crash point compress::after_tmp_open hit"));
    let gz1 = named(&dir, ".log.gz").pop().unwrap();
    let log2 = named(&dir, ".log").pop().expect("the second rotated file");
    let tmp2 = format!("{log2}.gz.tmp");
    assert_eq!(lifecycle_files(&dir), {
        let mut v = vec![gz1.clone(), log2.clone(), tmp2.clone()];
        v.sort();
        v
    });
    assert_eq!(std::fs::metadata(dir.join(&tmp2)).unwrap().len(), 0);
    let (dir_a, dir_b) = (td.dir.path().join("copy-a"), td.dir.path().join("copy-b"));
    copy_dir(&dir, &dir_a);
    copy_dir(&dir, &dir_b);

    // Dry run: "would", only f2, nothing changed.
    let before = tree(&dir);
    let dry = text(&run_logd(&["recover", "--dry-run"], &dir, &env));
    println!("recover --dry-run:\n{dry}");
    assert!(
        dry.contains(&format!("would finish an interrupted compression: {log2}.gz")),
        "{dry}"
    );
    assert!(!dry.contains(&gz1), "f1 was finished and announced before: {dry}");
    assert!(
        !dry.lines().any(|l| l.starts_with("finished")),
        "a dry run finishes nothing: {dry}"
    );
    assert!(
        dry.contains("events: 1 would be recorded; 4 would wait in the outbox"),
        "{dry}"
    );
    let dj = json(&run_logd(&["recover", "--dry-run", "--json"], &dir, &env));
    println!("recover --dry-run --json: {dj}");
    assert_eq!(tree(&dir), before, "recover --dry-run changed files");
    assert_eq!(dj["dry_run"], true);
    assert_eq!(names(&dj, "/lifecycle/compressions_pending"), vec![log2.clone()]);
    assert_eq!(names(&dj, "/lifecycle/compressions_finished"), vec![log2.clone()]);
    assert_eq!(names(&dj, "/lifecycle/rotations_finished"), Vec::<String>::new());
    assert_eq!(dj["lifecycle"]["events_recorded"], 1);
    assert_eq!(dj["outbox_events"], 4);

    // Real runs: text on one copy, JSON on the other.
    let done = text(&run_logd(&["recover"], &dir_a, &env));
    println!("recover:\n{done}");
    assert!(
        done.contains(&format!("finished an interrupted compression: {log2}.gz")),
        "{done}"
    );
    assert!(!done.contains("would"), "{done}");
    assert!(!done.contains(&gz1), "{done}");
    assert!(done.contains("events: 1 recorded; 4 wait in the outbox"), "{done}");
    let rj = json(&run_logd(&["recover", "--json"], &dir_b, &env));
    println!("recover --json: {rj}");
    assert_eq!(rj["dry_run"], false);
    assert_eq!(names(&rj, "/lifecycle/compressions_pending"), vec![log2.clone()]);
    assert_eq!(names(&rj, "/lifecycle/compressions_finished"), vec![log2.clone()]);
    assert_eq!(rj["lifecycle"]["events_recorded"], 1);
    assert_eq!(rj["outbox_events"], 4);
    for d in [&dir_a, &dir_b] {
        let mut want = vec![gz1.clone(), format!("{log2}.gz")];
        want.sort();
        assert_eq!(lifecycle_files(d), want, "recover finished the gzip in {}", d.display());
    }

    // Nothing left for serve.
    let again = json(&run_logd(&["recover", "--dry-run", "--json"], &dir_a, &env));
    assert_eq!(
        names(&again, "/lifecycle/compressions_pending"),
        Vec::<String>::new(),
        "{again}"
    );
    assert_eq!(names(&again, "/lifecycle/compressions_finished"), Vec::<String>::new());
    assert_eq!(again["lifecycle"]["events_recorded"], 0);
    assert_eq!(again["outbox_events"], 4);
    let files = lifecycle_files(&dir_a);
    let mut server = Server::start(&dir_a, &env);
    server.stop();
    let stderr = server.stderr();
    assert!(
        !stderr.contains("finished interrupted file steps") && !stderr.contains("left for the compression pool"),
        "serve found something to finish after recover:\n{stderr}"
    );
    assert_eq!(lifecycle_files(&dir_a), files);
}

/// Writes 30 frames to one session, stops logd (every frame materialized),
/// then flips a byte in the payload of the 6th WAL record: damage in the
/// middle of the WAL, in a region already in the session file. Returns the
/// damaged segment's name and the record's offset.
async fn damage_a_materialized_region(dir: &Path) -> (String, u64) {
    let mut server = Server::start(dir, &[]);
    let frames = (1..=30)
        .map(|i| frame("mat", 0, &format!("line {i} {}", "m".repeat(60))))
        .collect();
    let mut client = server.client().await;
    let r = client.write_log_batch(LogBatch { frames }).await.unwrap().into_inner();
    assert_eq!(r.frames_accepted, 30);
    drop(client);
    server.stop_async().await;
    assert_eq!(read_sessions(dir)["mat"].len(), 30);
    let wal_dir = dir.join(".logd/wal");
    let mut recs = Vec::new();
    wal::read_from(&wal::fs::RealFs, &wal_dir, 0, 16 << 20, |rec| {
        recs.push((rec.lsn, rec.offset, rec.payload.len() as u64));
        Ok(())
    })
    .unwrap();
    assert!(recs.len() >= 30, "{} records in the WAL", recs.len());
    let mut segs: Vec<PathBuf> = std::fs::read_dir(&wal_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    segs.sort();
    assert_eq!(segs.len(), 1, "one segment: {segs:?}");
    let (_, offset, len) = recs[5];
    let mut bytes = std::fs::read(&segs[0]).unwrap();
    bytes[(offset + 17 + len / 2) as usize] ^= 0x10;
    std::fs::write(&segs[0], bytes).unwrap();
    (segs[0].file_name().unwrap().to_str().unwrap().to_string(), offset)
}

fn output(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Serve refuses mid-log corruption and names the next steps; `recover
/// --salvage --dry-run` reports what salvage would do and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refusing_a_damaged_wal_names_the_next_steps_and_a_salvage_dry_run_changes_nothing() {
    let td = TestDir::new();
    let dir = td.log_dir();
    let (seg, offset) = damage_a_materialized_region(&dir).await;
    let refused = Server::try_start(&dir, &[])
        .err()
        .expect("serve must refuse a damaged WAL");
    println!("serve refused: {refused:?}");
    assert_eq!(refused.status.and_then(|s| s.code()), Some(2));
    let e = &refused.stderr;
    assert!(e.contains(&seg) && e.contains(&offset.to_string()), "{e}");
    let dry = e.find("logd recover --dry-run");
    let salvage = e.find("logd recover --salvage");
    assert!(
        dry.is_some() && salvage.is_some() && dry < salvage,
        "serve's message names `logd recover --dry-run`, then `logd recover --salvage`:\n{e}"
    );

    let before = tree(&dir);
    // The first step: a dry run shows the damage and points on to salvage.
    let out = run_logd(&["recover", "--dry-run"], &dir, &[]);
    let said = output(&out);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains(&seg) && said.contains(&offset.to_string()), "{said}");
    assert!(said.contains("logd recover --salvage --dry-run"), "{said}");
    let out = run_logd(&["recover", "--salvage", "--dry-run"], &dir, &[]);
    let said = output(&out);
    println!("recover --salvage --dry-run:\n{said}");
    assert!(out.status.success(), "{said}");
    assert!(said.contains("would be moved aside"), "{said}");
    assert!(
        said.contains("1 damaged record(s) were already in session files"),
        "{said}"
    );
    assert!(!said.contains("LOST"), "{said}");
    let out = run_logd(&["recover", "--salvage", "--dry-run", "--json"], &dir, &[]);
    let j = json(&out);
    println!("recover --salvage --dry-run --json: {j}");
    assert_eq!(tree(&dir), before, "recover --salvage --dry-run changed files");
    assert_eq!(j["dry_run"], true);
    assert_eq!(j["salvage"]["records_lost"], 0, "{j}");
    assert_eq!(j["salvage"]["records_in_session_files"], 1, "{j}");
    assert!(Server::try_start(&dir, &[]).is_err(), "still damaged after a dry run");
}

/// A damaged record that is already in its session file is not lost:
/// salvage says so, reports 0 records lost, and every line stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn salvage_of_damage_in_a_materialized_region_reports_nothing_lost() {
    let td = TestDir::new();
    let dir = td.log_dir();
    damage_a_materialized_region(&dir).await;
    let out = run_logd(&["recover", "--salvage"], &dir, &[]);
    let said = output(&out);
    println!("recover --salvage:\n{said}");
    assert!(out.status.success(), "{said}");
    assert!(!said.contains("LOST"), "{said}");
    assert!(said.contains("0 record(s) lost"), "{said}");
    assert!(
        said.contains("1 damaged record(s) were already in session files"),
        "{said}"
    );
    assert!(said.contains("moved aside to"), "{said}");
    let mut server = Server::start(&dir, &[]);
    server.stop_async().await;
    let lines = &read_sessions(&dir)["mat"];
    assert_eq!(
        lines.iter().map(|l| l.seq).collect::<Vec<_>>(),
        (1..=30).collect::<Vec<_>>()
    );
}
