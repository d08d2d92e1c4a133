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

// ---------------------------------------------------------------------------
// Times past year 9999, tokens, reflection (issue 12, item 21)
// ---------------------------------------------------------------------------

fn at(session: &str, content: &str, seconds: i64, nanos: i32) -> LogFrame {
    LogFrame {
        time: Some(prost_types::Timestamp { seconds, nanos }),
        ..frame(session, 0, content)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_time_outside_years_0000_to_9999_is_rejected_per_frame_because_rfc_3339_cannot_write_it() {
    const LAST_SECOND_OF_9999: i64 = 253_402_300_799;
    const FIRST_SECOND_OF_0000: i64 = -62_167_219_200;
    let td = TestDir::new();
    let mut server = Server::start(&td.log_dir(), &[]);
    let mut client = server.client().await;
    let resp = batch(
        &mut client,
        vec![
            at("t", "last-ns-of-9999", LAST_SECOND_OF_9999, 999_999_999),
            at("t", "year-10000", LAST_SECOND_OF_9999 + 1, 0),
            at("t", "first-of-0000", FIRST_SECOND_OF_0000, 0),
            at("t", "year-minus-1", FIRST_SECOND_OF_0000 - 1, 0),
        ],
    )
    .await;
    assert_eq!((resp.frames_accepted, resp.frames_rejected), (2, 2), "{resp:?}");
    let rejected: Vec<i64> = resp.rejections.iter().map(|r| r.index).collect();
    assert_eq!(rejected, [1, 3], "{resp:?}");
    for r in &resp.rejections {
        assert!(
            r.reason
                .contains("outside 0000-01-01T00:00:00Z..=9999-12-31T23:59:59.999999999Z"),
            "reason: {:?}",
            r.reason
        );
    }
    server.stop();
    let lines = &read_sessions(&td.log_dir())["t"];
    let times: Vec<&str> = lines.iter().map(|l| l.time.as_str()).collect();
    assert_eq!(
        times,
        ["9999-12-31T23:59:59.999999999Z", "0000-01-01T00:00:00.000000000Z"]
    );
}

/// Adds `authorization: <value>` to every request when given.
#[derive(Clone)]
struct AuthHeader(Option<String>);

impl tonic::service::Interceptor for AuthHeader {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.parse().unwrap());
        }
        Ok(req)
    }
}

/// A LogService client sending `authorization: <value>` when given.
fn with_auth(
    ch: Channel,
    value: Option<String>,
) -> LogServiceClient<tonic::service::interceptor::InterceptedService<Channel, AuthHeader>> {
    LogServiceClient::with_interceptor(ch, AuthHeader(value))
}

async fn connect(server: &Server) -> Channel {
    tonic::transport::Endpoint::from_shared(server.addr.clone())
        .unwrap()
        .connect_timeout(std::time::Duration::from_secs(10))
        .connect()
        .await
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_matches_in_any_case_as_rfc_6750_says() {
    let td = TestDir::new();
    let tokens = td.dir.path().join("tokens");
    std::fs::write(&tokens, "tok-one\n").unwrap();
    let mut server = Server::start(&td.log_dir(), &[("LOGD_AUTH_TOKEN_FILE", tokens.to_str().unwrap())]);
    let ch = connect(&server).await;
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let mut c = with_auth(ch.clone(), Some(format!("{scheme} tok-one")));
        let r = c
            .write_log_batch(LogBatch {
                frames: vec![frame("case", 0, scheme)],
            })
            .await
            .unwrap_or_else(|e| panic!("scheme {scheme:?}: {e:?}"));
        assert_eq!(r.into_inner().frames_accepted, 1, "{scheme}");
    }
    // The token itself stays case-sensitive.
    let err = with_auth(ch.clone(), Some("Bearer TOK-ONE".into()))
        .write_log_batch(LogBatch {
            frames: vec![frame("case", 0, "x")],
        })
        .await
        .expect_err("a token in the wrong case");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    server.stop_async().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_file_is_reloaded_on_sighup_and_a_bad_reload_keeps_the_old_tokens() {
    let td = TestDir::new();
    let tokens = td.dir.path().join("tokens");
    std::fs::write(&tokens, "old-token\n").unwrap();
    let mut server = Server::start(&td.log_dir(), &[("LOGD_AUTH_TOKEN_FILE", tokens.to_str().unwrap())]);
    let ch = connect(&server).await;
    let try_with = |token: &str| {
        let mut c = with_auth(ch.clone(), Some(format!("Bearer {token}")));
        async move {
            c.write_log_batch(LogBatch {
                frames: vec![frame("hup", 0, "x")],
            })
            .await
            .map(|r| r.into_inner().frames_accepted)
        }
    };
    assert_eq!(try_with("old-token").await.expect("old token before the reload"), 1);
    assert_eq!(
        try_with("new-token").await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );

    let hup = |server: &Server| {
        let pid = server.child.as_ref().expect("running").id();
        let ok = std::process::Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    };
    std::fs::write(&tokens, "new-token\n").unwrap();
    hup(&server);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while try_with("new-token").await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the new token is not accepted 30 s after SIGHUP; stderr:\n{}",
            server.stderr()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        try_with("old-token").await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );

    // An empty file is refused at reload: the tokens in force stay.
    std::fs::write(&tokens, "\n").unwrap();
    hup(&server);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !server.stderr().contains("keeping the tokens in force") {
        assert!(
            std::time::Instant::now() < deadline,
            "no refused reload logged; stderr:\n{}",
            server.stderr()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(try_with("new-token").await.expect("new token after a bad reload"), 1);
    assert!(server.try_exit_status().is_none(), "SIGHUP must not stop logd");
    server.stop_async().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tokens_on_reflection_needs_a_token_and_health_stays_open_for_balancers() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let td = TestDir::new();
    let tokens = td.dir.path().join("tokens");
    std::fs::write(&tokens, "tok\n").unwrap();
    let mut server = Server::start(&td.log_dir(), &[("LOGD_AUTH_TOKEN_FILE", tokens.to_str().unwrap())]);
    let ch = connect(&server).await;
    let list = |token: Option<&'static str>| {
        let ch = ch.clone();
        async move {
            let mut client = ServerReflectionClient::with_interceptor(ch, move |mut req: tonic::Request<()>| {
                if let Some(t) = token {
                    req.metadata_mut().insert("authorization", t.parse().unwrap());
                }
                Ok(req)
            });
            let req = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut replies = client
                .server_reflection_info(tokio_stream::iter(vec![req]))
                .await?
                .into_inner();
            let reply = replies.message().await?.expect("one reply");
            let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
                panic!("unexpected reflection reply {reply:?}");
            };
            Ok::<Vec<String>, tonic::Status>(list.service.into_iter().map(|s| s.name).collect())
        }
    };
    let err = list(None).await.expect_err("reflection without a token");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    let err = list(Some("Bearer wrong"))
        .await
        .expect_err("reflection with a wrong token");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    let names = list(Some("Bearer tok")).await.expect("reflection with the token");
    assert!(names.iter().any(|n| n == "logging.v1.LogService"), "{names:?}");

    let health = tonic_health::pb::health_client::HealthClient::new(ch.clone())
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .expect("health needs no token")
        .into_inner();
    assert_eq!(
        health.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    server.stop_async().await;
}
