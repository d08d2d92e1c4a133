//! Ingest over each RPC: seqs, duplicates, rejections, materialized lines.

use std::collections::BTreeMap;

use logd::pb::{LogBatch, LogFrame};
use prost_types::{Struct, Timestamp, Value, value::Kind};

use crate::util::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_streaming_frames_are_acked_then_materialized_as_json_lines() {
    let td = TestDir::new();
    let mut server = Server::start(&td.log_dir(), &[]);
    let mut client = server.client().await;
    let mut md = Struct::default();
    md.fields.insert(
        "k".into(),
        Value {
            kind: Some(Kind::StringValue("v".into())),
        },
    );
    for (k, n) in [("line", 11.0), ("ratio", 0.5)] {
        md.fields.insert(
            k.into(),
            Value {
                kind: Some(Kind::NumberValue(n)),
            },
        );
    }
    let mut frames: Vec<LogFrame> = (0..100)
        .map(|i| frame("s-stream", 0, &format!("line {i}\nwith newline")))
        .collect();
    frames[0].metadata = Some(md);
    frames[1].time = Some(Timestamp {
        seconds: 1_700_000_000,
        nanos: 123_456_789,
    });
    let resp = send_stream(&mut client, frames).await;
    assert_eq!(resp.frames_accepted, 100);
    assert_eq!(resp.frames_duplicate, 0);
    assert_eq!(resp.frames_rejected, 0);
    assert_eq!(resp.sessions.len(), 1);
    let r = &resp.sessions[0];
    assert_eq!(
        (r.session_id.as_str(), r.first_seq, r.last_seq, r.frames),
        ("s-stream", 1, 100, 100)
    );
    server.stop();

    let sessions = read_sessions(&td.log_dir());
    let lines = &sessions["s-stream"];
    assert_eq!(lines.len(), 100);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l.seq, i as i64 + 1);
        assert_eq!(l.content, format!("line {i}\nwith newline"));
        assert_eq!((l.user_id.as_str(), l.role.as_str(), l.version), ("u1", "agent", 1));
        assert!(
            l.time.ends_with('Z') && l.time.len() == "2026-11-29T05:14:07.123456789Z".len(),
            "time {}",
            l.time
        );
    }
    // An integer stays an integer (serde_json tells 11 from 11.0 apart).
    assert_eq!(
        lines[0].metadata,
        serde_json::json!({"k": "v", "line": 11, "ratio": 0.5})
    );
    assert_eq!(lines[1].time, "2023-11-14T22:13:20.123456789Z");
    assert_eq!(lines[2].metadata, serde_json::json!({}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bidi_acks_cover_every_frame_in_order_with_session_ranges() {
    let td = TestDir::new();
    let mut server = Server::start(&td.log_dir(), &[]);
    let mut client = server.client().await;
    let frames: Vec<LogFrame> = (0..3000)
        .map(|i| frame(if i % 2 == 0 { "b-even" } else { "b-odd" }, 0, "x"))
        .collect();
    let acks = send_bidi(&mut client, frames).await;
    assert!(!acks.is_empty());
    let mut last = 0;
    let mut per_session: BTreeMap<String, (i64, i64, i64)> = BTreeMap::new();
    for a in &acks {
        assert!(
            a.through_index > last,
            "through_index must grow: {} after {last}",
            a.through_index
        );
        last = a.through_index;
        for r in &a.sessions {
            let e = per_session.entry(r.session_id.clone()).or_insert((i64::MAX, 0, 0));
            assert!(r.first_seq > e.1, "ranges of one session do not overlap across acks");
            e.0 = e.0.min(r.first_seq);
            e.1 = e.1.max(r.last_seq);
            e.2 += r.frames;
        }
    }
    let final_ack = acks.last().unwrap();
    assert_eq!(final_ack.through_index, 3000);
    assert_eq!(final_ack.frames_accepted, 3000);
    assert_eq!(per_session["b-even"], (1, 1500, 1500));
    assert_eq!(per_session["b-odd"], (1, 1500, 1500));
    server.stop();
    let sessions = read_sessions(&td.log_dir());
    assert_eq!(sessions["b-even"].len(), 1500);
    assert_eq!(sessions["b-odd"].len(), 1500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_batch_assigns_seqs_and_counts_duplicates_of_client_seqs() {
    let td = TestDir::new();
    let mut server = Server::start(&td.log_dir(), &[]);
    let mut client = server.client().await;
    // Client seqs with a gap, then a server-assigned one, then duplicates.
    let frames = vec![
        frame("u-1", 5, "a"),
        frame("u-1", 9, "b"),
        frame("u-1", 0, "c"),   // server assigns 10
        frame("u-1", 9, "dup"), // duplicate
        frame("u-1", 3, "dup"), // duplicate (below last)
        frame("u-1", 11, "d"),
    ];
    let resp = client.write_log_batch(LogBatch { frames }).await.unwrap().into_inner();
    assert_eq!(
        (resp.frames_accepted, resp.frames_duplicate, resp.frames_rejected),
        (4, 2, 0)
    );
    assert_eq!(resp.sessions[0].first_seq, 5);
    assert_eq!(resp.sessions[0].last_seq, 11);
    // A retry of the whole batch is entirely duplicate: idempotent resends.
    let again = vec![frame("u-1", 5, "a"), frame("u-1", 9, "b"), frame("u-1", 11, "d")];
    let resp = client
        .write_log_batch(LogBatch { frames: again })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((resp.frames_accepted, resp.frames_duplicate), (0, 3));
    assert!(resp.sessions.is_empty());
    server.stop();
    let lines = &read_sessions(&td.log_dir())["u-1"];
    let got: Vec<(i64, &str)> = lines.iter().map(|l| (l.seq, l.content.as_str())).collect();
    assert_eq!(got, vec![(5, "a"), (9, "b"), (10, "c"), (11, "d")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rejection_rule_has_its_reason_and_valid_neighbours_are_kept() {
    let td = TestDir::new();
    let outside = td.dir.path().join("escaped");
    let mut server = Server::start(&td.log_dir(), &[("LOG_MAX_FRAME_BYTES", "4096")]);
    let mut client = server.client().await;
    let bad_ids = [
        "../escaped",
        "..",
        ".",
        ".hidden",
        "a/b",
        "/abs",
        "",
        "a b",
        &"x".repeat(129),
    ];
    let mut frames = Vec::new();
    let mut expect_reason: Vec<(usize, &str)> = Vec::new();
    frames.push(frame("ok-1", 0, "first"));
    for id in bad_ids {
        expect_reason.push((frames.len(), "invalid session_id"));
        frames.push(frame(id, 0, "evil"));
        frames.push(frame("ok-1", 0, "between"));
    }
    expect_reason.push((frames.len(), "unsupported version 2"));
    frames.push(LogFrame {
        version: 2,
        ..frame("ok-1", 0, "v2")
    });
    expect_reason.push((frames.len(), "invalid seq -4"));
    frames.push(frame("ok-1", -4, "neg"));
    expect_reason.push((frames.len(), "exceeds LOG_MAX_FRAME_BYTES 4096"));
    frames.push(frame("ok-1", 0, &"y".repeat(5000)));
    expect_reason.push((frames.len(), "invalid time"));
    frames.push(LogFrame {
        time: Some(Timestamp {
            seconds: 1,
            nanos: 2_000_000_000,
        }),
        ..frame("ok-1", 0, "t")
    });
    frames.push(frame("ok-1", 0, "last"));
    let total = frames.len() as i64;

    for rpc in ["stream", "bidi", "batch"] {
        let (accepted, rejected, rejections) = match rpc {
            "stream" => {
                let r = send_stream(&mut client, frames.clone()).await;
                (r.frames_accepted, r.frames_rejected, r.rejections)
            }
            "batch" => {
                let r = client
                    .write_log_batch(LogBatch { frames: frames.clone() })
                    .await
                    .unwrap()
                    .into_inner();
                (r.frames_accepted, r.frames_rejected, r.rejections)
            }
            _ => {
                let acks = send_bidi(&mut client, frames.clone()).await;
                let last = acks.last().unwrap();
                assert_eq!(last.through_index, total);
                (
                    last.frames_accepted,
                    last.frames_rejected,
                    acks.iter().flat_map(|a| a.rejections.clone()).collect(),
                )
            }
        };
        assert_eq!(rejected, expect_reason.len() as i64, "{rpc}");
        assert_eq!(accepted, total - expect_reason.len() as i64, "{rpc}");
        assert_eq!(rejections.len(), expect_reason.len(), "{rpc}");
        for (r, (index, reason)) in rejections.iter().zip(&expect_reason) {
            assert_eq!(r.index, *index as i64, "{rpc}: {r:?}");
            assert!(
                r.reason.contains(reason),
                "{rpc}: index {index}: {:?} lacks {reason:?}",
                r.reason
            );
        }
    }
    server.stop();
    assert!(!outside.exists(), "a session id escaped LOG_DIR");
    let names: Vec<String> = std::fs::read_dir(td.log_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let files: Vec<&String> = names.iter().filter(|n| !n.starts_with('.')).collect();
    assert_eq!(
        files,
        vec!["ok-1.logtmp"],
        "only the valid session has a file: {names:?}"
    );
    let lines = &read_sessions(&td.log_dir())["ok-1"];
    assert_eq!(lines.len() as i64, 3 * (total - expect_reason.len() as i64));
    assert_increasing("ok-1", lines);
    assert_eq!(lines.last().unwrap().content, "last");
}

/// Content for a frame of `session` such that `len(frame)` is exactly `bytes`.
fn content_for(session: &str, bytes: usize, len: impl Fn(&LogFrame) -> usize) -> String {
    let mut content = "z".repeat(bytes - 64);
    while len(&frame(session, 0, &content)) < bytes {
        content.push('z');
    }
    assert_eq!(
        len(&frame(session, 0, &content)),
        bytes,
        "no content gives {bytes} bytes"
    );
    content
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_grpc_limit_is_out_of_range_on_every_rpc_after_what_came_before_it_is_settled() {
    use prost::Message;
    const LIMIT: usize = 65536;
    let td = TestDir::new();
    let mut server = Server::start(
        &td.log_dir(),
        &[("LOG_MAX_FRAME_BYTES", "1024"), ("LOGD_MAX_MESSAGE_BYTES", "65536")],
    );
    let mut client = server.client().await;
    let batch_len = |f: &LogFrame| {
        LogBatch {
            frames: vec![f.clone()],
        }
        .encoded_len()
    };

    // Unary: a batch of exactly the limit is decoded (its frame is then
    // rejected as over LOG_MAX_FRAME_BYTES); one byte more is refused whole.
    let at_limit = frame("unary", 0, &content_for("unary", LIMIT, batch_len));
    let resp = client
        .write_log_batch(LogBatch { frames: vec![at_limit] })
        .await
        .expect("a batch of exactly LOGD_MAX_MESSAGE_BYTES")
        .into_inner();
    assert_eq!((resp.frames_accepted, resp.frames_rejected), (0, 1));
    let over = frame("unary", 0, &content_for("unary", LIMIT + 1, batch_len));
    let err = client
        .write_log_batch(LogBatch { frames: vec![over] })
        .await
        .expect_err("a batch one byte over LOGD_MAX_MESSAGE_BYTES");
    eprintln!("WriteLogBatch over the limit: {err:?}");
    assert_eq!(err.code(), tonic::Code::OutOfRange, "WriteLogBatch: {err:?}");
    assert!(
        err.metadata().get("grpc-status-details-bin").is_none(),
        "no RetryInfo: {err:?}"
    );

    // Client streaming: the frames before the big one are made durable and
    // counted in the message.
    let huge = content_for("stream", LIMIT + 1, |f| f.encoded_len());
    let mut frames: Vec<LogFrame> = (0..3).map(|i| frame("stream", 0, &format!("s{i}"))).collect();
    frames.push(frame("stream", 0, &huge));
    frames.push(frame("stream", 0, "after"));
    let err = client
        .write_log_stream(tokio_stream::iter(frames))
        .await
        .expect_err("WriteLogStream with a message over the limit");
    eprintln!("WriteLogStream over the limit: {err:?}");
    assert_eq!(err.code(), tonic::Code::OutOfRange, "WriteLogStream: {err:?}");
    assert!(
        err.message().contains("3 frame(s) of this call were made durable"),
        "WriteLogStream's message counts what was durable before: {err:?}"
    );

    // Bidi: every frame before the big one is acked before the error.
    let huge = content_for("bidi", LIMIT + 1, |f| f.encoded_len());
    let mut frames: Vec<LogFrame> = (0..3).map(|i| frame("bidi", 0, &format!("b{i}"))).collect();
    frames.push(frame("bidi", 0, &huge));
    frames.push(frame("bidi", 0, "after"));
    let mut acks = client
        .write_log_bidi(tokio_stream::iter(frames))
        .await
        .expect("WriteLogBidi")
        .into_inner();
    let (last, err) = acks_until_error(&mut acks).await;
    let through = last.through_index;
    eprintln!("WriteLogBidi over the limit: {err:?}");
    assert_eq!(err.code(), tonic::Code::OutOfRange, "WriteLogBidi: {err:?}");
    assert_eq!(through, 3, "the frames before the big one are acked before the error");

    // The server still serves.
    let ok = send_stream(&mut client, vec![frame("unary", 0, "fine")]).await;
    assert_eq!(ok.frames_accepted, 1);
    server.stop();
    let sessions = read_sessions(&td.log_dir());
    let contents = |s: &str| sessions[s].iter().map(|l| l.content.clone()).collect::<Vec<_>>();
    assert_eq!(contents("unary"), ["fine"]);
    assert_eq!(contents("stream"), ["s0", "s1", "s2"]);
    assert_eq!(contents("bidi"), ["b0", "b1", "b2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_sessions_over_concurrent_streams_each_get_gapless_server_seqs() {
    let td = TestDir::new();
    let mut server = Server::start(&td.log_dir(), &[]);
    let mut tasks = Vec::new();
    for t in 0..8 {
        let mut client = server.client().await;
        tasks.push(tokio::spawn(async move {
            let mut acked = 0;
            for round in 0..5 {
                // Every stream writes to every one of 16 shared sessions.
                let frames: Vec<LogFrame> = (0..400)
                    .map(|i| frame(&format!("c-{}", i % 16), 0, &format!("t{t} r{round} i{i}")))
                    .collect();
                let acks = send_bidi(&mut client, frames).await;
                acked += acks.last().unwrap().frames_accepted;
            }
            acked
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert_eq!(total, 8 * 5 * 400);
    server.stop();
    let sessions = read_sessions(&td.log_dir());
    assert_eq!(sessions.len(), 16);
    for (s, lines) in &sessions {
        let seqs: Vec<i64> = lines.iter().map(|l| l.seq).collect();
        assert_eq!(
            seqs,
            (1..=1000).collect::<Vec<_>>(),
            "session {s}: server seqs are 1..=n without gaps"
        );
    }
    // Frames of one stream and session keep their order.
    for lines in sessions.values() {
        for t in 0..8 {
            let mine: Vec<(u32, u32)> = lines
                .iter()
                .filter_map(|l| {
                    let mut p = l.content.split(' ');
                    (p.next()? == format!("t{t}")).then(|| {
                        let r = p.next().unwrap()[1..].parse().unwrap();
                        let i = p.next().unwrap()[1..].parse().unwrap();
                        (r, i)
                    })
                })
                .collect();
            assert!(mine.windows(2).all(|w| w[0] < w[1]), "stream order kept");
        }
    }
}
