//! Hostile or careless clients at the gRPC edge: seqs at the top of the
//! range, malformed messages, idle sockets, tokens, reflection, times past
//! year 9999, and the limits on per-session state.

use logd::pb::{LogBatch, LogFrame, WriteLogResponse};
use tonic::transport::Channel;

use logd::pb::log_service_client::LogServiceClient;

use crate::util::*;

async fn batch(client: &mut LogServiceClient<Channel>, frames: Vec<LogFrame>) -> WriteLogResponse {
    client
        .write_log_batch(LogBatch { frames })
        .await
        .expect("WriteLogBatch")
        .into_inner()
}

fn seqs_and_contents(log_dir: &std::path::Path, session: &str) -> Vec<(i64, String)> {
    read_sessions(log_dir)
        .get(session)
        .map(|lines| lines.iter().map(|l| (l.seq, l.content.clone())).collect())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Seqs at the top of the range (issue 12, item 16)
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seq_beyond_the_largest_is_refused_per_frame_and_every_acked_frame_is_in_the_file() {
    let td = TestDir::new();
    let mut server = Server::start(&td.log_dir(), &[]);
    let mut client = server.client().await;
    let max = logd::validate::SEQ_MAX;

    // The probe's exact sequence: 1, 2, 3, i64::MAX, 0, 0.
    let frames = vec![
        frame("ovf", 1, "one"),
        frame("ovf", 2, "two"),
        frame("ovf", 3, "three"),
        frame("ovf", i64::MAX, "huge"),
        frame("ovf", 0, "next-a"),
        frame("ovf", 0, "next-b"),
    ];
    let resp = batch(&mut client, frames).await;
    assert_eq!(
        (resp.frames_accepted, resp.frames_duplicate, resp.frames_rejected),
        (5, 0, 1),
        "{resp:?}"
    );
    assert_eq!(resp.rejections.len(), 1, "{resp:?}");
    assert_eq!(resp.rejections[0].index, 3);
    assert!(
        resp.rejections[0]
            .reason
            .contains(&format!("invalid seq {}: exceeds the largest seq {max}", i64::MAX)),
        "reason: {:?}",
        resp.rejections[0].reason
    );
    assert_eq!(resp.sessions[0].first_seq, 1);
    assert_eq!(resp.sessions[0].last_seq, 5, "server seqs continue after 3: {resp:?}");
    // A resent seq 2 is a duplicate, not a new frame.
    let resp = batch(&mut client, vec![frame("ovf", 2, "two-again")]).await;
    assert_eq!((resp.frames_accepted, resp.frames_duplicate), (0, 1), "{resp:?}");

    // At the largest seq: accepted; a server seq after it has no room and is
    // refused with its reason, never wrapped.
    let resp = batch(
        &mut client,
        vec![
            frame("top", max, "at-max"),
            frame("top", 0, "no-room"),
            frame("top", max, "dup"),
        ],
    )
    .await;
    assert_eq!(
        (resp.frames_accepted, resp.frames_duplicate, resp.frames_rejected),
        (1, 1, 1),
        "{resp:?}"
    );
    assert_eq!(resp.rejections[0].index, 1, "{resp:?}");
    assert!(
        resp.rejections[0]
            .reason
            .contains(&format!("session top holds the largest seq {max}")),
        "reason: {:?}",
        resp.rejections[0].reason
    );

    // After a restart the same holds (the last seq comes back from disk).
    server.stop();
    server.restart();
    let mut client = server.client().await;
    let resp = batch(
        &mut client,
        vec![frame("ovf", 0, "after-restart"), frame("top", 0, "still-no-room")],
    )
    .await;
    assert_eq!((resp.frames_accepted, resp.frames_rejected), (1, 1), "{resp:?}");
    assert_eq!(resp.sessions[0].last_seq, 6, "{resp:?}");
    assert_eq!(resp.rejections[0].index, 1, "{resp:?}");
    server.stop();

    assert_eq!(
        seqs_and_contents(&td.log_dir(), "ovf"),
        [
            (1, "one"),
            (2, "two"),
            (3, "three"),
            (4, "next-a"),
            (5, "next-b"),
            (6, "after-restart")
        ]
        .map(|(s, c)| (s, c.to_owned()))
    );
    assert_eq!(seqs_and_contents(&td.log_dir(), "top"), [(max, "at-max".to_owned())]);
}
