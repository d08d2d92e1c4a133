//! Event identity on the Redis stream: without a crash every `event_id`
//! reaches the stream once; across a kill -9 (placed precisely with crash
//! points) the only event sent again is the one whose `XADD` was not yet
//! confirmed when the process died. Real `redis-server`, real binary.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use logd::pb::LogBatch;

use crate::redis_server::RedisServer;
use crate::util::*;

const STREAM: &str = "logd:events";

/// `.log.gz` files in `dir`.
fn gz_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".log.gz"))
        .collect();
    v.sort();
    v
}

/// Every entry's `event_id`, in stream order.
async fn stream_event_ids(url: &str) -> Vec<String> {
    let client = redis::Client::open(url).unwrap();
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis");
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(STREAM)
        .arg("-")
        .arg("+")
        .query_async(&mut con)
        .await
        .expect("XRANGE");
    reply
        .ids
        .iter()
        .map(|e| {
            let v = e.map.get("event_id").expect("event_id field");
            redis::from_redis_value_ref::<String>(v).unwrap()
        })
        .collect()
}

/// `event_id` → how many stream entries carry it, for those with more than one.
fn repeated(ids: &[String]) -> BTreeMap<String, usize> {
    let mut n: BTreeMap<String, usize> = BTreeMap::new();
    for id in ids {
        *n.entry(id.clone()).or_default() += 1;
    }
    n.retain(|_, c| *c > 1);
    n
}

/// One WriteLogBatch of `n` frames (server seqs) to each session; false if
/// the server is gone.
async fn send_round(server: &Server, sessions: &[String], n: usize) -> bool {
    let frames = sessions
        .iter()
        .flat_map(|s| (0..n).map(move |i| frame(s, 0, &format!("{s} frame {i} {}", "z".repeat(80)))))
        .collect();
    let Ok(mut client) = logd::pb::log_service_client::LogServiceClient::connect(server.addr.clone()).await else {
        return false;
    };
    client.write_log_batch(LogBatch { frames }).await.is_ok()
}

fn env_for(redis: &RedisServer) -> Vec<(&'static str, String)> {
    vec![
        ("REDIS_URL", redis.url.clone()),
        ("LOG_MAX_SIZE_BYTES", "1".into()), // every write rotates
        ("LOG_COMPRESSION", "gzip".into()),
        ("LOG_FLUSH_INTERVAL_MS", "20".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k, v.to_string()))
    .collect()
}

fn as_env<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    v.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// Many rotations, compressions slowed so that the writers' queue holds
/// jobs when the pool's store sweep (every 50 ms here) runs: a job taken by
/// the sweep must not run again when it comes out of the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs --features failpoints")]
async fn a_run_with_many_rotations_and_no_crash_sends_every_event_id_once() {
    let redis = RedisServer::start();
    let td = TestDir::new();
    let dir = td.log_dir();
    let mut env = env_for(&redis);
    env.push(("LOGD_COMPRESSION_SWEEP_INTERVAL_MS", "50".into()));
    env.push(("FAILPOINTS", "compress::after_gz=sleep(5)".into()));
    let mut server = Server::start(&dir, &as_env(&env));
    let sessions: Vec<String> = (0..8).map(|i| format!("many-{i}")).collect();
    for _ in 0..25 {
        assert!(send_round(&server, &sessions, 1).await);
    }
    rotate_all(&server).await;
    wait_files_settled(&server, &dir, Duration::from_secs(60)).await;
    server.stop();
    let gz = gz_files(&dir);
    assert_eq!(gz.len(), 8 * 25, "one file per write");
    let ids = stream_event_ids(&redis.url).await;
    assert_eq!(
        repeated(&ids),
        BTreeMap::new(),
        "event_ids on the stream more than once"
    );
    assert_eq!(ids.len(), 2 * gz.len(), "a rotated and a compressed event per file");
}

/// Redis answers slowly (a busy or swapping server; here `CLIENT PAUSE
/// WRITE` holds every write for 2 s): the mirror must wait for the answer to
/// its `XADD` rather than give up, take it for failed and send the event
/// again while the first `XADD` is still queued in Redis. (With the Redis
/// client's default 500 ms response timeout, each event of this test reached
/// the stream several times; seen as a flake under load before.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_answer_does_not_send_an_event_twice() {
    let redis = RedisServer::start();
    let td = TestDir::new();
    let dir = td.log_dir();
    let env = env_for(&redis);
    let server = Server::start(&dir, &as_env(&env));
    let client = redis::Client::open(redis.url.as_str()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let paused = Instant::now();
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(2000)
        .arg("WRITE")
        .query_async(&mut con)
        .await
        .expect("CLIENT PAUSE");
    let sessions: Vec<String> = (0..3).map(|i| format!("slow-{i}")).collect();
    assert!(send_round(&server, &sessions, 1).await);
    rotate_all(&server).await;
    wait_files_settled(&server, &dir, Duration::from_secs(60)).await;
    assert!(
        paused.elapsed() >= Duration::from_millis(1500),
        "the events were delivered while Redis paused writes: the test paused nothing"
    );
    let mut server = server;
    server.stop();
    let gz = gz_files(&dir);
    let ids = stream_event_ids(&redis.url).await;
    println!("{} files, {} stream entries", gz.len(), ids.len());
    assert_eq!(
        repeated(&ids),
        BTreeMap::new(),
        "event_ids on the stream more than once"
    );
    assert_eq!(ids.len(), 2 * gz.len(), "a rotated and a compressed event per file");
}

/// Starts logd with `failpoints` armed and writes until it aborts (or, with
/// `None`, SIGKILLs it after ~1 s of load); reads the stream; restarts,
/// lets everything finish; reads the stream again. The stream after the
/// restart starts with what it held before the kill, and the only
/// `event_id` it may hold twice is the last one sent before the kill (the
/// mirror sends one at a time, so only that one can have been unconfirmed).
async fn only_the_unconfirmed_event_is_resent(failpoints: Option<&str>) {
    let redis = RedisServer::start();
    let td = TestDir::new();
    let dir = td.log_dir();
    let env = env_for(&redis);
    let mut armed = env.clone();
    if let Some(fp) = failpoints {
        armed.push(("FAILPOINTS", fp.to_string()));
    }
    let mut server = Server::start(&dir, &as_env(&armed));
    let sessions: Vec<String> = (0..4).map(|i| format!("kill-{i}")).collect();
    let started = Instant::now();
    loop {
        if server.try_exit_status().is_some() {
            break;
        }
        match failpoints {
            Some(fp) => assert!(
                started.elapsed() < Duration::from_secs(30),
                "logd did not abort at {fp}; stderr:\n{}",
                server.stderr()
            ),
            None if started.elapsed() > Duration::from_millis(1500) => {
                server.kill9();
                break;
            }
            None => {}
        }
        if !send_round(&server, &sessions, 2).await {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    if let Some(fp) = failpoints {
        let point = fp.split('=').next().unwrap();
        assert!(
            server.stderr().contains(&format!("crash point {point} hit")),
            "{}",
            server.stderr()
        );
    }
    let before = stream_event_ids(&redis.url).await;
    let mut server = Server::start(&dir, &as_env(&env));
    for _ in 0..3 {
        assert!(send_round(&server, &sessions, 1).await);
    }
    rotate_all(&server).await;
    wait_files_settled(&server, &dir, Duration::from_secs(60)).await;
    server.stop();
    let after = stream_event_ids(&redis.url).await;
    assert!(
        after.starts_with(&before),
        "the stream before the kill is a prefix of the stream after"
    );
    let reps = repeated(&after);
    let allowed: BTreeMap<String, usize> = before.last().map(|l| (l.clone(), 2)).into_iter().collect();
    for (id, n) in &reps {
        assert!(
            allowed.get(id) == Some(n),
            "{id} reached the stream {n} times; only the last event sent before the kill ({:?}) may be sent \
             again, once. {} entries before the kill, {} after; repeated: {reps:?}",
            before.last(),
            before.len(),
            after.len()
        );
    }
    let gz = gz_files(&dir);
    let distinct: std::collections::BTreeSet<&String> = after.iter().collect();
    assert_eq!(
        distinct.len(),
        2 * gz.len(),
        "a rotated and a compressed event per file"
    );
    println!(
        "{failpoints:?}: {} entries before the kill, {} after, {} files, repeated: {reps:?}",
        before.len(),
        after.len(),
        gz.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs --features failpoints")]
async fn a_kill_between_xadd_and_outbox_removal_resends_only_that_event() {
    only_the_unconfirmed_event_is_resent(Some("mirror::after_xadd=20*off->return")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs --features failpoints")]
async fn a_kill_after_the_compressed_event_is_recorded_announces_it_once() {
    only_the_unconfirmed_event_is_resent(Some("compress::after_event=6*off->return")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs --features failpoints")]
async fn a_kill_after_the_gz_rename_announces_the_compression_once() {
    only_the_unconfirmed_event_is_resent(Some("compress::after_gz=6*off->return")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs --features failpoints")]
async fn a_kill_after_the_unlink_of_a_compressed_log_announces_the_compression_once() {
    only_the_unconfirmed_event_is_resent(Some("compress::after_unlink=6*off->return")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs --features failpoints")]
async fn a_kill_after_a_rotation_rename_announces_the_rotation_once() {
    only_the_unconfirmed_event_is_resent(Some("rotate::after_rename=6*off->return")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_under_load_resends_at_most_the_unconfirmed_event() {
    only_the_unconfirmed_event_is_resent(None).await;
}

/// A restart after a crash finds a backlog of compressions, which the pool's
/// first sweep starts one after another; SIGTERM must not wait for the whole
/// backlog (each job here takes a second): the jobs not started stay in the
/// store for the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs --features failpoints")]
async fn shutdown_does_not_wait_for_a_compression_backlog_found_by_the_sweep() {
    let td = TestDir::new();
    let dir = td.log_dir();
    let slow = [
        ("LOG_MAX_SIZE_BYTES", "1"), // every write rotates
        ("FAILPOINTS", "compress::after_gz=sleep(1000)"),
    ];
    let mut server = Server::start(&dir, &slow);
    let sessions: Vec<String> = (0..12).map(|i| format!("backlog-{i}")).collect();
    for _ in 0..2 {
        assert!(send_round(&server, &sessions, 1).await);
    }
    rotate_all(&server).await;
    server.kill9();
    let logs = |d: &Path| {
        std::fs::read_dir(d)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".log"))
            .count()
    };
    let backlog = logs(&dir);
    assert!(backlog >= 12, "{backlog} rotated files wait for compression");

    let mut server = Server::start(&dir, &slow);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopped = Instant::now();
    server.try_stop_within(Duration::from_secs(30)).unwrap();
    let took = stopped.elapsed();
    assert!(
        took < Duration::from_secs(6),
        "SIGTERM took {took:?} with {backlog} compressions of ~1 s each in the backlog"
    );
    assert!(logs(&dir) > 0, "the jobs not started stay for the next start");
}
