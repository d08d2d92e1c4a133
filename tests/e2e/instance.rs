//! Instance names (`LOGD_INSTANCE`): in every event on the shared Redis
//! stream (`instance`, and `event_id`'s `@<instance>`), and in the
//! `logd_instance_info` gauge. Real binary, real `redis-server`.

use std::time::Duration;

use logd::pb::LogBatch;

use crate::ops::{scrape, start_with_metrics};
use crate::redis_server::RedisServer;
use crate::util::*;

/// Every event's `content`, decoded, in stream order.
async fn stream_events(url: &str) -> Vec<store::Event> {
    let client = redis::Client::open(url).unwrap();
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis");
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg("logd:events")
        .arg("-")
        .arg("+")
        .query_async(&mut con)
        .await
        .expect("XRANGE");
    reply
        .ids
        .iter()
        .map(|e| {
            let v = e.map.get("content").expect("content field");
            serde_json::from_slice(&redis::from_redis_value_ref::<Vec<u8>>(v).unwrap()).unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_and_metrics_name_the_instance_set_by_logd_instance() {
    let redis = RedisServer::start();
    let td = TestDir::new();
    let dir = td.log_dir();
    let env = [("LOGD_INSTANCE", "edge-7"), ("REDIS_URL", redis.url.as_str())];
    let (mut server, metrics) = start_with_metrics(&dir, &env);
    assert!(
        scrape(&metrics)
            .lines()
            .any(|l| l == "logd_instance_info{instance=\"edge-7\"} 1"),
        "no logd_instance_info for edge-7"
    );
    let mut client = server.client().await;
    let frames = (1..=3).map(|i| frame("named", i, "hello")).collect();
    client.write_log_batch(LogBatch { frames }).await.unwrap();
    assert_eq!(rotate_all(&server).await.len(), 1);
    wait_files_settled(&server, &dir, Duration::from_secs(60)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let events = loop {
        let events = stream_events(&redis.url).await;
        if events.len() >= 2 {
            break events;
        }
        assert!(std::time::Instant::now() < deadline, "events on the stream: {events:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    server.stop();
    let ids: Vec<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(ids, ["rotated:named:1-3@edge-7", "compressed:named:1-3@edge-7"]);
    assert!(events.iter().all(|e| e.instance == "edge-7"), "{events:?}");
    assert!(
        dir.join(&events[1].path).exists(),
        "{} is in this instance's LOG_DIR",
        events[1].path
    );
}

#[test]
fn an_instance_name_that_would_break_event_ids_is_refused_at_start() {
    let td = TestDir::new();
    let failure = match Server::try_start(&td.log_dir(), &[("LOGD_INSTANCE", "a@b")]) {
        Ok(_) => panic!("logd started with LOGD_INSTANCE=a@b"),
        Err(f) => f,
    };
    assert!(
        failure
            .stderr
            .contains("LOGD_INSTANCE \"a@b\" must be 1 to 64 bytes of [A-Za-z0-9._-]"),
        "{}",
        failure.stderr
    );
}
