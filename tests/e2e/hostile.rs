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
async fn a_session_at_the_largest_seq_refuses_server_seqs_per_frame_and_every_acked_frame_is_in_the_file() {
    let td = TestDir::new();
    let mut server = Server::start(&td.log_dir(), &[]);
    let mut client = server.client().await;
    assert_eq!(store::SEQ_MAX, i64::MAX, "the whole int64 range of the contract");

    // The probe's exact sequence: 1, 2, 3, i64::MAX, 0, 0. The old code
    // wrapped `last + 1` to negative seqs, acked both frames and never wrote
    // them.
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
        (4, 0, 2),
        "{resp:?}"
    );
    assert_eq!(
        resp.rejections.iter().map(|r| r.index).collect::<Vec<_>>(),
        [4, 5],
        "{resp:?}"
    );
    for r in &resp.rejections {
        assert!(
            r.reason
                .contains(&format!("no seq left: session ovf holds the largest seq {}", i64::MAX)),
            "reason: {:?}",
            r.reason
        );
    }
    assert_eq!(resp.sessions[0].first_seq, 1);
    assert_eq!(resp.sessions[0].last_seq, i64::MAX, "{resp:?}");
    // A resent seq 2 is a duplicate, not a new frame; so is a resent i64::MAX.
    let resp = batch(
        &mut client,
        vec![frame("ovf", 2, "two-again"), frame("ovf", i64::MAX, "huge-again")],
    )
    .await;
    assert_eq!((resp.frames_accepted, resp.frames_duplicate), (0, 2), "{resp:?}");

    // After a restart the same holds (the last seq comes back from disk).
    server.stop();
    server.restart();
    let mut client = server.client().await;
    let resp = batch(
        &mut client,
        vec![frame("ovf", 0, "after-restart"), frame("fresh", 0, "unaffected")],
    )
    .await;
    assert_eq!((resp.frames_accepted, resp.frames_rejected), (1, 1), "{resp:?}");
    assert_eq!(resp.rejections[0].index, 0, "{resp:?}");
    assert!(resp.rejections[0].reason.contains("no seq left"), "{resp:?}");
    server.stop();

    assert_eq!(
        seqs_and_contents(&td.log_dir(), "ovf"),
        [(1, "one"), (2, "two"), (3, "three"), (i64::MAX, "huge")].map(|(s, c)| (s, c.to_owned()))
    );
    assert_eq!(
        seqs_and_contents(&td.log_dir(), "fresh"),
        [(1, "unaffected".to_owned())]
    );
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

// ---------------------------------------------------------------------------
// Messages that do not decode (issue 12, item 19)
// ---------------------------------------------------------------------------

/// Sends pre-encoded messages as they are; decodes replies with prost.
struct RawCodec<R>(std::marker::PhantomData<R>);

struct RawEncoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, buf: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        use prost::bytes::BufMut;
        buf.put_slice(&item);
        Ok(())
    }
}

impl<R: prost::Message + Default + Send + 'static> tonic::codec::Codec for RawCodec<R> {
    type Encode = Vec<u8>;
    type Decode = R;
    type Encoder = RawEncoder;
    type Decoder = tonic_prost::ProstDecoder<R>;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

fn raw_codec<R>() -> RawCodec<R> {
    RawCodec(std::marker::PhantomData)
}

const PLACEHOLDER: &[u8] = b"@@BAD-UTF8@@";

/// `message` encoded, with the placeholder bytes replaced by invalid UTF-8.
fn with_bad_utf8(message: &impl prost::Message) -> Vec<u8> {
    let mut raw = message.encode_to_vec();
    let at = raw
        .windows(PLACEHOLDER.len())
        .position(|w| w == PLACEHOLDER)
        .expect("the placeholder is in the message");
    raw[at..at + PLACEHOLDER.len()].fill(0xff);
    raw
}

/// A frame whose metadata nests lists `depth` deep (prost decodes 100 levels).
fn deeply_nested(session: &str, depth: usize) -> LogFrame {
    use prost_types::{ListValue, Struct, Value, value::Kind};
    let mut v = Value {
        kind: Some(Kind::StringValue("deep".into())),
    };
    for _ in 0..depth {
        v = Value {
            kind: Some(Kind::ListValue(ListValue { values: vec![v] })),
        };
    }
    LogFrame {
        metadata: Some(Struct {
            fields: [("k".to_owned(), v)].into(),
        }),
        ..frame(session, 0, "nested")
    }
}

async fn raw_grpc(server: &Server) -> tonic::client::Grpc<Channel> {
    let mut grpc = tonic::client::Grpc::new(connect(server).await);
    grpc.ready().await.expect("ready");
    grpc
}

fn path(method: &str) -> tonic::codegen::http::uri::PathAndQuery {
    tonic::codegen::http::uri::PathAndQuery::try_from(format!("/logging.v1.LogService/{method}")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_does_not_decode_is_invalid_argument_with_its_index_after_what_came_before_is_settled() {
    use logd::pb::{SessionInfo, SessionRequest, WriteLogAck};
    use prost::Message;
    let td = TestDir::new();
    let mut server = Server::start(&td.log_dir(), &[]);

    // Client streaming: 5 good frames, one with invalid UTF-8 in `content`,
    // then one more.
    let mut msgs: Vec<Vec<u8>> = (0..5)
        .map(|i| frame("cs", 0, &format!("s{i}")).encode_to_vec())
        .collect();
    msgs.push(with_bad_utf8(&frame(
        "cs",
        0,
        std::str::from_utf8(PLACEHOLDER).unwrap(),
    )));
    msgs.push(frame("cs", 0, "after").encode_to_vec());
    let err = raw_grpc(&server)
        .await
        .client_streaming::<_, Vec<u8>, WriteLogResponse, _>(
            tonic::Request::new(tokio_stream::iter(msgs)),
            path("WriteLogStream"),
            raw_codec(),
        )
        .await
        .expect_err("WriteLogStream with a message that does not decode");
    eprintln!("WriteLogStream: {err:?}");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("stream message 5 does not decode as a LogFrame"),
        "{err:?}"
    );
    assert!(
        err.message().contains("5 frame(s) of this call were made durable"),
        "{err:?}"
    );

    // Bidi: 5 good frames, one nested past prost's limit, then one more:
    // the 5 are acked before the error.
    let mut msgs: Vec<Vec<u8>> = (0..5)
        .map(|i| frame("bd", 0, &format!("b{i}")).encode_to_vec())
        .collect();
    msgs.push(deeply_nested("bd", 120).encode_to_vec());
    msgs.push(frame("bd", 0, "after").encode_to_vec());
    let mut acks = raw_grpc(&server)
        .await
        .streaming::<_, Vec<u8>, WriteLogAck, _>(
            tonic::Request::new(tokio_stream::iter(msgs)),
            path("WriteLogBidi"),
            raw_codec(),
        )
        .await
        .expect("WriteLogBidi")
        .into_inner();
    let (last, err) = acks_until_error(&mut acks).await;
    let (through, accepted) = (last.through_index, last.frames_accepted);
    eprintln!("WriteLogBidi: {err:?}");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("stream message 5 does not decode as a LogFrame"),
        "{err:?}"
    );
    assert_eq!(
        (through, accepted),
        (5, 5),
        "the 5 good frames are acked before the error"
    );

    // Unary: the frames before the bad one are made durable and counted;
    // the error names the frame.
    let bad_batch = with_bad_utf8(&LogBatch {
        frames: vec![
            frame("un", 0, "u0"),
            frame("un", 0, "u1"),
            frame("un", 0, std::str::from_utf8(PLACEHOLDER).unwrap()),
            frame("un", 0, "u3"),
        ],
    });
    let err = raw_grpc(&server)
        .await
        .unary::<Vec<u8>, WriteLogResponse, _>(tonic::Request::new(bad_batch), path("WriteLogBatch"), raw_codec())
        .await
        .expect_err("WriteLogBatch with a frame that does not decode");
    eprintln!("WriteLogBatch: {err:?}");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message()
            .contains("frame 2 of the batch does not decode as a LogFrame"),
        "{err:?}"
    );
    assert!(
        err.message().contains("2 frame(s) of this call were made durable"),
        "{err:?}"
    );

    // GetSession knows what was kept.
    let mut client = server.client().await;
    for (session, last) in [("cs", 5), ("bd", 5), ("un", 2)] {
        let info: SessionInfo = client
            .get_session(SessionRequest {
                session_id: session.into(),
            })
            .await
            .expect("GetSession")
            .into_inner();
        assert_eq!(info.last_seq, last, "{session}");
    }
    server.stop_async().await;
    let contents = |s: &str| -> Vec<String> { seqs_and_contents(&td.log_dir(), s).into_iter().map(|x| x.1).collect() };
    assert_eq!(contents("cs"), ["s0", "s1", "s2", "s3", "s4"]);
    assert_eq!(contents("bd"), ["b0", "b1", "b2", "b3", "b4"]);
    assert_eq!(contents("un"), ["u0", "u1"]);
}

// ---------------------------------------------------------------------------
// Idle sockets (issue 12, item 18)
// ---------------------------------------------------------------------------

/// Reads from `s` until the server closes it or `within` passes; true if closed.
fn closed_within(s: &mut std::net::TcpStream, within: std::time::Duration) -> bool {
    use std::io::Read;
    let deadline = std::time::Instant::now() + within;
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_that_never_send_the_http2_preface_are_closed_after_the_handshake_timeout_and_free_their_slots() {
    const LIMIT: usize = 4;
    const TIMEOUT_MS: u64 = 1000;
    let td = TestDir::new();
    let mut server = Server::start(
        &td.log_dir(),
        &[("LOGD_MAX_CONNECTIONS", "4"), ("LOGD_HANDSHAKE_TIMEOUT_MS", "1000")],
    );
    let hp = server.addr.trim_start_matches("http://").to_owned();
    // More idle sockets than the limit: they hold every slot, and the rest
    // wait in the backlog.
    let mut idle: Vec<std::net::TcpStream> = (0..LIMIT + 3)
        .map(|_| std::net::TcpStream::connect(&hp).expect("connect"))
        .collect();

    // A real client is served within the timeout plus a margin.
    let started = std::time::Instant::now();
    let margin = std::time::Duration::from_secs(10);
    let within = std::time::Duration::from_millis(TIMEOUT_MS) + margin;
    let served = tokio::time::timeout(within, async {
        let ch = tonic::transport::Endpoint::from_shared(server.addr.clone())
            .unwrap()
            .connect()
            .await?;
        let mut client = LogServiceClient::new(ch);
        let r = client
            .write_log_batch(LogBatch {
                frames: vec![frame("through", 0, "served")],
            })
            .await
            .map_err(|s| Box::new(s) as Box<dyn std::error::Error + Send + Sync>)?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(r.into_inner())
    })
    .await;
    let resp = match served {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => panic!("the client failed: {e}"),
        Err(_) => panic!(
            "a real client was not served within {within:?} while {} idle sockets were open",
            idle.len()
        ),
    };
    assert_eq!(resp.frames_accepted, 1);
    eprintln!("served after {:?}", started.elapsed());

    // The idle sockets themselves are closed by the server.
    for (i, s) in idle.iter_mut().enumerate() {
        assert!(
            closed_within(s, within),
            "idle socket {i} still open {within:?} after it could have been closed"
        );
    }
    server.stop_async().await;
    assert_eq!(seqs_and_contents(&td.log_dir(), "through"), [(1, "served".to_owned())]);
}

// ---------------------------------------------------------------------------
// Limits on state (issue 12, item 7)
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_session_beyond_logd_sessions_active_max_is_resource_exhausted_until_an_idle_one_closes() {
    let td = TestDir::new();
    let mut server = Server::start(
        &td.log_dir(),
        &[("LOGD_SESSIONS_ACTIVE_MAX", "3"), ("LOG_IDLE_TIMEOUT_SECONDS", "2")],
    );
    let mut client = server.client().await;
    let r = batch(
        &mut client,
        vec![frame("a", 0, "a1"), frame("b", 0, "b1"), frame("c", 0, "c1")],
    )
    .await;
    assert_eq!(r.frames_accepted, 3);

    // Unary: the frames before the fourth session's are kept and counted.
    let err = client
        .write_log_batch(LogBatch {
            frames: vec![frame("a", 0, "a2"), frame("d", 0, "d1"), frame("b", 0, "b2")],
        })
        .await
        .expect_err("a fourth session");
    eprintln!("WriteLogBatch: {err:?}");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    for want in [
        "3 sessions are active (LOGD_SESSIONS_ACTIVE_MAX 3)",
        "session \"d\" at stream index 1",
        "1 frame(s) of this call were made durable",
    ] {
        assert!(err.message().contains(want), "{want:?} not in {err:?}");
    }
    assert!(
        tonic_types::StatusExt::get_details_retry_info(&err).is_some(),
        "RetryInfo: {err:?}"
    );

    // Bidi: acks precede the error.
    let mut acks = client
        .write_log_bidi(tokio_stream::iter(vec![
            frame("b", 0, "b2"),
            frame("c", 0, "c2"),
            frame("e", 0, "e1"),
        ]))
        .await
        .expect("WriteLogBidi")
        .into_inner();
    let (last, err) = acks_until_error(&mut acks).await;
    let through = last.through_index;
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert_eq!(through, 2, "the frames before the new session are acked first");

    // Once the sessions went idle (writers stopped), a new one gets a slot.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        match client
            .write_log_batch(LogBatch {
                frames: vec![frame("d", 0, "d1")],
            })
            .await
        {
            Ok(r) => {
                assert_eq!(r.into_inner().frames_accepted, 1);
                break;
            }
            Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                assert!(std::time::Instant::now() < deadline, "no slot 60 s later: {e:?}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    server.stop_async().await;
    let contents = |s: &str| -> Vec<String> { seqs_and_contents(&td.log_dir(), s).into_iter().map(|x| x.1).collect() };
    assert_eq!(contents("a"), ["a1", "a2"]);
    assert_eq!(contents("b"), ["b1", "b2"]);
    assert_eq!(contents("c"), ["c1", "c2"]);
    assert_eq!(contents("d"), ["d1"]);
    assert!(contents("e").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "slow writers need the `failpoints` feature (FAILPOINTS sleep)"
)]
async fn get_session_goes_through_admission_and_is_resource_exhausted_while_the_budget_is_full() {
    use logd::pb::SessionRequest;
    let td = TestDir::new();
    let mut server = Server::start(
        &td.log_dir(),
        &[
            ("FAILPOINTS", "writer::after_write=sleep(3000)"),
            ("LOG_MAX_FRAME_BYTES", "8192"),
            ("LOGD_INFLIGHT_BYTES_MAX", "65536"),
            ("LOGD_STREAM_BLOCKED_MAX_MS", "300"),
        ],
    );
    let mut client = server.client().await;
    // 10 frames of ~7 KB take the whole 64 KiB budget; the writer then
    // sleeps 3 s in its write, holding it.
    let pad = "g".repeat(7000);
    let r = batch(
        &mut client,
        (0..10).map(|i| frame("full", 0, &format!("{i} {pad}"))).collect(),
    )
    .await;
    assert_eq!(r.frames_accepted, 10);
    let err = client
        .get_session(SessionRequest {
            session_id: "full".into(),
        })
        .await
        .expect_err("GetSession while the admission budget is taken");
    eprintln!("GetSession: {err:?}");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("GetSession was not answered"), "{err:?}");
    assert!(
        tonic_types::StatusExt::get_details_retry_info(&err).is_some(),
        "{err:?}"
    );
    // Once the writer is done, it is answered, exactly.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let last = loop {
        match client
            .get_session(SessionRequest {
                session_id: "full".into(),
            })
            .await
        {
            Ok(info) => break info.into_inner().last_seq,
            Err(e) if e.code() == tonic::Code::ResourceExhausted && std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    };
    assert_eq!(last, 10);
    server.stop_async().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_leave_the_seq_cache_and_their_seqs_continue_exactly_after_a_reload() {
    use crate::ops::{Metrics, start_with_metrics};
    use logd::pb::SessionRequest;
    const SESSIONS: usize = 12;
    let td = TestDir::new();
    let (mut server, metrics) = start_with_metrics(
        &td.log_dir(),
        &[("LOGD_SEQ_CACHE_SESSIONS_MAX", "4"), ("LOG_FLUSH_INTERVAL_MS", "20")],
    );
    let ch = connect(&server).await;
    let mut client = LogServiceClient::new(ch.clone());
    let mut admin = logd::pb::admin_service_client::AdminServiceClient::new(ch);
    let name = |i: usize| format!("cache-{i}");
    for i in 0..SESSIONS {
        let r = batch(
            &mut client,
            (1..=3).map(|n| frame(&name(i), 0, &format!("r1-{n}"))).collect(),
        )
        .await;
        assert_eq!((r.sessions[0].first_seq, r.sessions[0].last_seq), (1, 3));
    }
    // Wait until every one of them is materialized and checkpointed.
    let stats = admin
        .get_stats(logd::pb::StatsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while admin
        .get_stats(logd::pb::StatsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .wal_removable_below_lsn
        < stats.wal_next_lsn
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint through LSN {}",
            stats.wal_next_lsn
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // New sessions push the old ones out of the cache.
    for k in 0..SESSIONS {
        batch(&mut client, vec![frame(&format!("fill-{k}"), 0, "f")]).await;
    }
    let m = Metrics::scrape(&metrics);
    let evicted = m.value("logd_seq_cache_evictions_total", &[]);
    let cached = m.value("logd_seq_cache_sessions", &[]);
    eprintln!("evicted {evicted}, cached {cached}");
    assert!(evicted >= SESSIONS as f64, "evicted {evicted}");
    assert!(cached <= SESSIONS as f64, "cached {cached}: the cache is bounded");

    // Back again: server seqs continue exactly, client seqs below are
    // duplicates, GetSession answers the exact last seq.
    for i in 0..SESSIONS {
        let r = batch(
            &mut client,
            vec![
                frame(&name(i), 0, "r2-4"),
                frame(&name(i), 2, "dup"),
                frame(&name(i), 0, "r2-5"),
            ],
        )
        .await;
        assert_eq!(
            (
                r.frames_accepted,
                r.frames_duplicate,
                r.sessions[0].first_seq,
                r.sessions[0].last_seq
            ),
            (2, 1, 4, 5),
            "{}: {r:?}",
            name(i)
        );
        let info = client
            .get_session(SessionRequest { session_id: name(i) })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.last_seq, 5);
    }
    server.stop_async().await;
    for i in 0..SESSIONS {
        let got = seqs_and_contents(&td.log_dir(), &name(i));
        let want: Vec<(i64, String)> = [(1, "r1-1"), (2, "r1-2"), (3, "r1-3"), (4, "r2-4"), (5, "r2-5")]
            .map(|(s, c)| (s, c.to_owned()))
            .into();
        assert_eq!(got, want, "{}", name(i));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotations_wait_while_the_outbox_holds_logd_outbox_events_max_events_and_go_on_once_redis_takes_them() {
    use crate::ops::{Metrics, start_with_metrics};
    use crate::redis_server::{RedisServer, free_port};
    let td = TestDir::new();
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let (mut server, metrics) = start_with_metrics(
        &td.log_dir(),
        &[
            ("REDIS_URL", url.as_str()),
            ("LOGD_OUTBOX_EVENTS_MAX", "2"),
            ("LOG_COMPRESSION", "none"),
            ("LOG_MAX_SIZE_BYTES", "100"),
            ("LOG_FLUSH_INTERVAL_MS", "20"),
        ],
    );
    let mut client = server.client().await;
    let wait_for = |what: &str, ok: &dyn Fn(&Metrics) -> bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let m = Metrics::scrape(&metrics);
            if ok(&m) {
                return m;
            }
            assert!(std::time::Instant::now() < deadline, "no {what} within 60 s");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    let pending = |m: &Metrics| m.value("logd_redis_events_pending", &[]);
    // Each frame fills the file past 100 bytes: one rotation (and event) each.
    for n in 1..=2 {
        batch(&mut client, vec![frame("ob", 0, &format!("f{n}"))]).await;
        wait_for(&format!("{n} event(s) pending"), &|m| pending(m) == n as f64);
    }
    // The outbox is full: the next rotations wait, the frames stay live.
    for n in 3..=4 {
        batch(&mut client, vec![frame("ob", 0, &format!("f{n}"))]).await;
    }
    let m = wait_for("a deferred rotation", &|m| {
        m.value("logd_rotations_deferred_total", &[]) >= 2.0
    });
    assert_eq!(pending(&m), 2.0, "no event beyond LOGD_OUTBOX_EVENTS_MAX");
    // A manual rotation is refused meanwhile, with the reason.
    let err = logd::pb::admin_service_client::AdminServiceClient::new(connect(&server).await)
        .rotate(logd::pb::RotateRequest {
            session_id: "ob".into(),
            all: false,
        })
        .await
        .expect_err("a manual rotation while the outbox is full");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message()
            .contains("the event outbox holds 2 events (LOGD_OUTBOX_EVENTS_MAX 2)"),
        "{err:?}"
    );

    // Redis comes up: the outbox drains and the waiting rotation happens.
    let _redis = RedisServer::start_on(port);
    wait_for("the outbox to drain", &|m| pending(m) == 0.0);
    // f5 would take the file holding f3 and f4 (both written while the
    // rotation waited) further past the limit: that file rotates first
    // (event 3), then f5, alone over the limit, gets a file of its own
    // (event 4).
    batch(&mut client, vec![frame("ob", 0, "f5")]).await;
    wait_for("the waiting rotation's event and f5's", &|m| {
        m.value("logd_redis_events_published_total", &[]) == 4.0 && pending(m) == 0.0
    });
    server.stop_async().await;
    let contents: Vec<String> = seqs_and_contents(&td.log_dir(), "ob")
        .into_iter()
        .map(|x| x.1)
        .collect();
    assert_eq!(contents, ["f1", "f2", "f3", "f4", "f5"]);
    let live = std::fs::read_to_string(td.log_dir().join("ob.logtmp")).unwrap_or_default();
    assert!(
        live.is_empty(),
        "f3..f5 went to rotated files; the live file holds {live:?}"
    );
}
