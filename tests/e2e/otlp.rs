//! OTLP/gRPC logs ingestion (`opentelemetry.proto.collector.logs.v1.LogsService`)
//! and reflection through `grpc.reflection.v1` and `v1alpha` (issue 16, items
//! 1 and 2), against the real binary. The OpenTelemetry Python SDK's own
//! exporter is tested in `clients/python/tests/test_otlp.py`.

use std::time::Duration;

use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::collector::logs::v1::{ExportLogsServiceRequest, ExportLogsServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, KeyValueList};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use tonic::transport::{Channel, Endpoint};

use crate::util::{Server, TestDir, read_sessions};

fn kv(key: &str, value: Any) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn text(s: &str) -> Any {
    Any::StringValue(s.into())
}

/// A record with a string body and these attributes.
fn record(body: &str, attributes: Vec<KeyValue>) -> LogRecord {
    LogRecord {
        body: Some(AnyValue {
            value: Some(text(body)),
        }),
        attributes,
        ..Default::default()
    }
}

/// One export: one resource (with these attributes) holding these records.
fn export_of(resource: Vec<KeyValue>, records: Vec<LogRecord>) -> ExportLogsServiceRequest {
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(Resource {
                attributes: resource,
                ..Default::default()
            }),
            scope_logs: vec![ScopeLogs {
                scope: Some(InstrumentationScope {
                    name: "e2e".into(),
                    version: "1.0".into(),
                    ..Default::default()
                }),
                log_records: records,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

async fn channel(server: &Server) -> Channel {
    Endpoint::from_shared(server.addr.clone())
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("connect")
}

async fn export(
    server: &Server,
    request: ExportLogsServiceRequest,
) -> Result<ExportLogsServiceResponse, tonic::Status> {
    let mut client = LogsServiceClient::new(channel(server).await);
    client.export(request).await.map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_otlp_export_is_durable_once_answered_and_reports_its_rejected_records_in_partial_success() {
    let td = TestDir::new();
    let mut server = Server::start(&td.log_dir(), &[]);
    let first = LogRecord {
        time_unix_nano: 1_764_547_200_000_000_001, // 2025-12-01T00:00:00.000000001Z
        severity_number: 9,
        severity_text: "INFO".into(),
        trace_id: vec![0x11; 16],
        span_id: vec![0x22; 8],
        ..record(
            "hello otlp",
            vec![kv("session.id", text("otel-a")), kv("k", Any::IntValue(7))],
        )
    };
    let structured = LogRecord {
        body: Some(AnyValue {
            value: Some(Any::KvlistValue(KeyValueList {
                values: vec![kv("x", Any::BoolValue(true))],
            })),
        }),
        ..record("", vec![kv("session.id", text("otel-a"))])
    };
    let mut request = export_of(
        vec![kv("service.name", text("svc-fallback"))],
        vec![
            first,
            record("bad session", vec![kv("session.id", text("../etc"))]),
            structured,
            record("by service.name", vec![]),
        ],
    );
    // A second resource naming no session at all.
    request.resource_logs.push(
        export_of(vec![], vec![record("nameless", vec![])])
            .resource_logs
            .remove(0),
    );

    let answer = export(&server, request).await.expect("Export");
    let partial = answer.partial_success.expect("two records were rejected");
    eprintln!("partial_success: {partial:?}");
    assert_eq!(partial.rejected_log_records, 2);
    for want in [
        "2 of 5 log records rejected",
        "record 1: invalid session_id \"../etc\"",
        "record 4: log record names no session",
    ] {
        assert!(partial.error_message.contains(want), "{want:?} not in {partial:?}");
    }

    // Answered means fsynced in the WAL: a crash right now loses nothing.
    server.kill9();
    server.restart();
    server.stop_async().await;
    let sessions = read_sessions(&td.log_dir());
    let a = &sessions["otel-a"];
    assert_eq!(a.len(), 2, "{a:?}");
    assert_eq!(
        (a[0].seq, a[0].content.as_str(), a[0].role.as_str()),
        (1, "hello otlp", "INFO")
    );
    assert_eq!(a[0].time, "2025-12-01T00:00:00.000000001Z");
    let m = &a[0].metadata;
    assert_eq!(m["attributes"]["k"], 7);
    assert_eq!(m["attributes"]["session.id"], "otel-a");
    assert_eq!(m["resource"]["service.name"], "svc-fallback");
    assert_eq!(m["scope"]["name"], "e2e");
    assert_eq!(m["trace_id"], "11".repeat(16));
    assert_eq!(m["span_id"], "22".repeat(8));
    assert_eq!(m["severity_number"], 9);
    assert_eq!(a[1].content, r#"{"x":true}"#, "a non-string body is JSON");
    let fallback = &sessions["svc-fallback"];
    assert_eq!(fallback.len(), 1);
    assert_eq!(fallback[0].content, "by service.name");
    assert_eq!(sessions.len(), 2, "{:?}", sessions.keys().collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_export_whose_records_carry_logd_seq_is_kept_exactly_once() {
    let td = TestDir::new();
    let mut server = Server::start(&td.log_dir(), &[]);
    let records = |range: std::ops::RangeInclusive<i64>| {
        range
            .map(|n| record(&format!("r{n}"), vec![kv("logd.seq", Any::IntValue(n))]))
            .collect::<Vec<_>>()
    };
    let resource = vec![kv("session.id", text("seqd"))];
    let answer = export(&server, export_of(resource.clone(), records(1..=3)))
        .await
        .unwrap();
    assert_eq!(answer.partial_success, None);
    // The retry of an export that was durable but whose answer was lost,
    // and one that overlaps it.
    export(&server, export_of(resource.clone(), records(1..=3)))
        .await
        .unwrap();
    export(&server, export_of(resource, records(2..=5))).await.unwrap();
    server.stop_async().await;
    let lines = &read_sessions(&td.log_dir())["seqd"];
    let seqs: Vec<i64> = lines.iter().map(|l| l.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    assert!(lines.iter().all(|l| l.metadata["attributes"].get("logd.seq").is_none()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_beyond_logd_sessions_active_max_is_resource_exhausted_with_retry_info_and_keeps_nothing() {
    let td = TestDir::new();
    let mut server = Server::start(&td.log_dir(), &[("LOGD_SESSIONS_ACTIVE_MAX", "1")]);
    let request = export_of(
        vec![],
        vec![
            record("a1", vec![kv("session.id", text("a"))]),
            record("b1", vec![kv("session.id", text("b"))]),
        ],
    );
    let err = export(&server, request).await.expect_err("a second active session");
    eprintln!("Export: {err:?}");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("LOGD_SESSIONS_ACTIVE_MAX 1"), "{err:?}");
    assert!(
        tonic_types::StatusExt::get_details_retry_info(&err).is_some(),
        "OTLP exporters retry RESOURCE_EXHAUSTED only with RetryInfo: {err:?}"
    );
    assert!(
        err.metadata().get_bin("google.rpc.retryinfo-bin").is_some(),
        "the Python SDK reads the delay from this trailer: {err:?}"
    );
    let ok = export(
        &server,
        export_of(vec![], vec![record("a2", vec![kv("session.id", text("a"))])]),
    )
    .await;
    assert_eq!(ok.expect("session a holds the slot").partial_success, None);
    server.stop_async().await;
    let sessions = read_sessions(&td.log_dir());
    let contents: Vec<&str> = sessions["a"].iter().map(|l| l.content.as_str()).collect();
    assert_eq!(contents, vec!["a2"], "the refused export left nothing behind");
    assert!(!sessions.contains_key("b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_needs_the_bearer_token_like_the_log_service() {
    let td = TestDir::new();
    let tokens = td.dir.path().join("tokens");
    std::fs::write(&tokens, "otlp-token\n").unwrap();
    let mut server = Server::start(&td.log_dir(), &[("LOGD_AUTH_TOKEN_FILE", tokens.to_str().unwrap())]);
    let request = || export_of(vec![kv("session.id", text("tok"))], vec![record("x", vec![])]);
    let err = export(&server, request()).await.expect_err("no token");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    let ch = channel(&server).await;
    let with_token = |value: &'static str| {
        LogsServiceClient::with_interceptor(ch.clone(), move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("authorization", value.parse().unwrap());
            Ok(req)
        })
    };
    let err = with_token("Bearer wrong")
        .export(request())
        .await
        .expect_err("a wrong token");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    let ok = with_token("Bearer otlp-token")
        .export(request())
        .await
        .expect("the token");
    assert_eq!(ok.into_inner().partial_success, None);
    server.stop_async().await;
    assert_eq!(read_sessions(&td.log_dir())["tok"].len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services_through_v1_and_through_v1alpha() {
    let td = TestDir::new();
    let mut server = Server::start(&td.log_dir(), &[]);
    let want = [
        "logging.v1.LogService",
        "logging.v1.AdminService",
        "grpc.health.v1.Health",
        "opentelemetry.proto.collector.logs.v1.LogsService",
    ];

    let v1 = {
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut client = ServerReflectionClient::new(channel(&server).await);
        let mut replies = client
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner();
        let reply: ServerReflectionResponse = replies.message().await.unwrap().expect("one reply");
        let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
            panic!("unexpected v1 reply {reply:?}");
        };
        list.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
    };
    let v1alpha = {
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::v1alpha::{ServerReflectionRequest, ServerReflectionResponse};
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut client = ServerReflectionClient::new(channel(&server).await);
        let mut replies = client
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner();
        let reply: ServerReflectionResponse = replies.message().await.unwrap().expect("one reply");
        let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
            panic!("unexpected v1alpha reply {reply:?}");
        };
        list.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
    };
    eprintln!("v1: {v1:?}\nv1alpha: {v1alpha:?}");
    for names in [&v1, &v1alpha] {
        for w in want {
            assert!(names.iter().any(|n| n == w), "{w} missing from {names:?}");
        }
    }
    assert!(v1.iter().any(|n| n == "grpc.reflection.v1.ServerReflection"), "{v1:?}");
    assert!(
        v1alpha.iter().any(|n| n == "grpc.reflection.v1alpha.ServerReflection"),
        "{v1alpha:?}"
    );
    server.stop_async().await;
}

/// A CA and a leaf it signed for `names` with `usage`: (CA PEM, leaf cert PEM, leaf key PEM).
fn pki(names: &[&str], usage: rcgen::ExtendedKeyUsagePurpose) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "otlp test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, names[0]);
    p.extended_key_usages = vec![usage];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &*ca).unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_over_mutual_tls_is_served_and_a_plaintext_one_is_not() {
    use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let td = TestDir::new();
    let (ca, server_cert, server_key) = pki(&["localhost"], ServerAuth);
    let (client_ca, client_cert, client_key) = pki(&["agent-1"], ClientAuth);
    let write = |name: &str, text: &str| {
        let p = td.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let (cert, key, client_ca) = (
        write("server.pem", &server_cert),
        write("server.key", &server_key),
        write("client-ca.pem", &client_ca),
    );
    let mut server = Server::start(
        &td.log_dir(),
        &[
            ("LOGD_TLS_CERT", &cert),
            ("LOGD_TLS_KEY", &key),
            ("LOGD_TLS_CLIENT_CA", &client_ca),
        ],
    );
    let request = || export_of(vec![kv("session.id", text("tls"))], vec![record("over mtls", vec![])]);
    let plaintext = export(&server, request()).await;
    assert!(plaintext.is_err(), "a plaintext export must fail: {plaintext:?}");

    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca))
        .domain_name("localhost")
        .identity(Identity::from_pem(&client_cert, &client_key));
    let host_port = server.addr.trim_start_matches("http://").to_owned();
    let ch = Endpoint::from_shared(format!("https://{host_port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("TLS connect with a client certificate");
    let answer = LogsServiceClient::new(ch)
        .export(request())
        .await
        .expect("Export over mTLS");
    assert_eq!(answer.into_inner().partial_success, None);
    server.stop_async().await;
    let lines = &read_sessions(&td.log_dir())["tls"];
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0].content, "over mtls");
}
