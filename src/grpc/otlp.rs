//! OTLP/gRPC logs ingestion: `opentelemetry.proto.collector.logs.v1.LogsService/Export`
//! on logd's gRPC port, behind the same token and TLS as `LogService`.
//!
//! Each `LogRecord` becomes one frame and goes through the same validation,
//! admission and sequencer as `WriteLogBatch`:
//!
//! - session: the first of the record's, then the resource's, attribute
//!   named by `LOGD_OTLP_SESSION_ATTRIBUTE` (default `session.id`), then
//!   `service.instance.id`, then `service.name`; an invalid id is rejected
//!   like any other;
//! - seq: the record attribute `logd.seq` (an integer > 0) when present, so
//!   a producer that numbers its records makes a retried export exactly
//!   once; otherwise the server assigns the next one;
//! - time: `time_unix_nano`, else `observed_time_unix_nano`, else receipt;
//! - role: `severity_text`; content: the body (a string as is, any other
//!   `AnyValue` as JSON);
//! - metadata: `attributes`, `resource`, `scope`, `trace_id`, `span_id`
//!   (hex), `severity_number`, `flags`, `event_name` (empty ones left out).
//!
//! The export answers only after every accepted record is fsynced in the
//! WAL. Records that fail validation are counted in `partial_success` (with
//! the first reasons in `error_message`) and the rest are kept. Admission
//! is taken for the whole export at once ([`StreamIngest::submit_whole`]),
//! so backpressure (UNAVAILABLE while recovering, RESOURCE_EXHAUSTED when
//! overloaded, both with `google.rpc.RetryInfo`: the codes OTLP exporters
//! retry) leaves nothing behind that the retry would duplicate.

use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::LogsService;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsPartialSuccess, ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::logs::v1::LogRecord;
use prost_types::value::Kind;
use tonic::{Request, Response, Status};

use crate::grpc::service::{Ready, StreamIngest, Tally};
use crate::pb::LogFrame;

/// The record attribute that carries the producer's seq for the record.
pub const SEQ_ATTRIBUTE: &str = "logd.seq";
/// Attributes that name the session when the configured one is absent, in order.
pub const SESSION_ATTRIBUTE_FALLBACKS: [&str; 2] = ["service.instance.id", "service.name"];
/// The binary trailer OpenTelemetry SDKs read a retry delay from.
pub const RETRY_INFO_TRAILER: &str = "google.rpc.retryinfo-bin";
/// Rejection reasons quoted in `partial_success.error_message` (the count is exact).
const REASONS_QUOTED_MAX: usize = 5;
/// Integers above this magnitude go into metadata as strings: metadata
/// numbers are doubles, exact only below 2^53.
const METADATA_INTEGER_EXACT_MAX: u64 = 1 << 53;

/// The `LogsService` implementation.
pub struct OtlpLogsSvc {
    /// Shared state, once recovery is done.
    pub ready: Ready,
    /// LOGD_OTLP_SESSION_ATTRIBUTE: the attribute that names a record's session.
    pub session_attribute: String,
}

#[tonic::async_trait]
impl LogsService for OtlpLogsSvc {
    async fn export(
        &self,
        request: Request<ExportLogsServiceRequest>,
    ) -> Result<Response<ExportLogsServiceResponse>, Status> {
        self.export_records(request).await.map_err(with_retry_trailer)
    }
}

/// Adds the `google.rpc.retryinfo-bin` trailer beside the status details
/// that hold the same `RetryInfo`: the Collector reads the details, the
/// OpenTelemetry Python SDK's exporter the trailer.
fn with_retry_trailer(mut status: Status) -> Status {
    use tonic_types::StatusExt;
    let Some(delay) = status.get_details_retry_info().and_then(|r| r.retry_delay) else {
        return status;
    };
    let info = tonic_types::pb::RetryInfo {
        retry_delay: Some(prost_types::Duration {
            seconds: delay.as_secs() as i64,
            nanos: delay.subsec_nanos() as i32,
        }),
    };
    let value = tonic::metadata::MetadataValue::from_bytes(&prost::Message::encode_to_vec(&info));
    status.metadata_mut().insert_bin(RETRY_INFO_TRAILER, value);
    status
}

impl OtlpLogsSvc {
    /// One export, made durable (see the module doc).
    async fn export_records(
        &self,
        request: Request<ExportLogsServiceRequest>,
    ) -> Result<Response<ExportLogsServiceResponse>, Status> {
        let shared = self.ready.get()?;
        let export = request.into_inner();
        let mut ingest = StreamIngest::new(shared);
        let mut records = 0i64;
        for resource_logs in &export.resource_logs {
            let resource: &[KeyValue] = resource_logs.resource.as_ref().map_or(&[], |r| &r.attributes);
            let resource_meta = (!resource.is_empty()).then(|| struct_of(resource));
            for scope_logs in &resource_logs.scope_logs {
                let scope_meta = scope_logs.scope.as_ref().and_then(scope_struct);
                for record in &scope_logs.log_records {
                    records += 1;
                    let context = Context {
                        resource,
                        resource_meta: resource_meta.as_ref(),
                        scope_meta: scope_meta.as_ref(),
                    };
                    match self.frame_of(record, &context) {
                        // Err: LOGD_SESSIONS_ACTIVE_MAX; nothing was
                        // submitted yet, so the retry duplicates nothing.
                        Ok(frame) => ingest.push(frame)?,
                        Err(reason) => ingest.reject("session_id", reason),
                    }
                }
            }
        }
        ingest.submit_whole().await?;
        let mut tally = Tally::default();
        while ingest.settle_one(&mut tally).await?.is_some() {}
        debug_assert_eq!(
            tally.accepted + tally.duplicate + tally.rejected,
            records,
            "every record is accepted, a duplicate or rejected"
        );
        let partial_success = (tally.rejected > 0).then(|| ExportLogsPartialSuccess {
            rejected_log_records: tally.rejected,
            error_message: rejection_message(&tally, records),
        });
        Ok(Response::new(ExportLogsServiceResponse { partial_success }))
    }
}

/// What the records of one scope share.
struct Context<'a> {
    resource: &'a [KeyValue],
    resource_meta: Option<&'a prost_types::Value>,
    scope_meta: Option<&'a prost_types::Value>,
}

impl OtlpLogsSvc {
    /// The frame of one record; Err: no attribute names its session.
    fn frame_of(&self, record: &LogRecord, context: &Context<'_>) -> Result<LogFrame, String> {
        let session_id = self.session_of(record, context.resource).ok_or_else(|| {
            format!(
                "log record names no session: none of the attributes {:?}, {:?}, {:?} (on the record or its \
                 resource) holds a string or an integer",
                self.session_attribute, SESSION_ATTRIBUTE_FALLBACKS[0], SESSION_ATTRIBUTE_FALLBACKS[1]
            )
        })?;
        let mut seq = 0;
        let mut attributes = Vec::with_capacity(record.attributes.len());
        for kv in &record.attributes {
            match (kv.key.as_str(), kv.value.as_ref().and_then(|v| v.value.as_ref())) {
                (SEQ_ATTRIBUTE, Some(Any::IntValue(n))) => seq = *n,
                (SEQ_ATTRIBUTE, Some(Any::StringValue(s))) if s.parse::<i64>().is_ok() => {
                    seq = s.parse().expect("checked")
                }
                _ => attributes.push(kv),
            }
        }
        let mut meta = std::collections::BTreeMap::new();
        if !attributes.is_empty() {
            meta.insert("attributes".to_owned(), struct_of(attributes));
        }
        if let Some(r) = context.resource_meta {
            meta.insert("resource".to_owned(), r.clone());
        }
        if let Some(s) = context.scope_meta {
            meta.insert("scope".to_owned(), s.clone());
        }
        for (key, id) in [("trace_id", &record.trace_id), ("span_id", &record.span_id)] {
            if !id.is_empty() {
                meta.insert(key.to_owned(), string(hex(id)));
            }
        }
        if record.severity_number != 0 {
            meta.insert("severity_number".to_owned(), number(f64::from(record.severity_number)));
        }
        if record.flags != 0 {
            meta.insert("flags".to_owned(), number(f64::from(record.flags)));
        }
        if !record.event_name.is_empty() {
            meta.insert("event_name".to_owned(), string(record.event_name.clone()));
        }
        let nanos = [record.time_unix_nano, record.observed_time_unix_nano]
            .into_iter()
            .find(|t| *t != 0);
        Ok(LogFrame {
            version: 1,
            time: nanos.map(timestamp),
            session_id,
            user_id: String::new(),
            role: record.severity_text.clone(),
            seq,
            content: content_of(record.body.as_ref()),
            metadata: Some(prost_types::Struct { fields: meta }),
        })
    }

    /// The session named by the record's or its resource's attributes.
    fn session_of(&self, record: &LogRecord, resource: &[KeyValue]) -> Option<String> {
        let keys = std::iter::once(self.session_attribute.as_str()).chain(SESSION_ATTRIBUTE_FALLBACKS);
        for key in keys {
            for kv in record.attributes.iter().chain(resource) {
                if kv.key != key {
                    continue;
                }
                match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                    Some(Any::StringValue(s)) => return Some(s.clone()),
                    Some(Any::IntValue(n)) => return Some(n.to_string()),
                    _ => {}
                }
            }
        }
        None
    }
}

/// `partial_success.error_message`: the count and the first reasons.
fn rejection_message(tally: &Tally, records: i64) -> String {
    let quoted: Vec<String> = tally
        .rejections
        .iter()
        .take(REASONS_QUOTED_MAX)
        .map(|r| format!("record {}: {}", r.index, r.reason))
        .collect();
    format!(
        "{} of {records} log records rejected (the others are durable); first {}: {}",
        tally.rejected,
        quoted.len(),
        quoted.join("; ")
    )
}

/// Nanoseconds since the epoch as a timestamp.
fn timestamp(nanos: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (nanos / 1_000_000_000) as i64,
        nanos: (nanos % 1_000_000_000) as i32,
    }
}

/// A body as frame content: a string as is, any other value as JSON.
fn content_of(body: Option<&AnyValue>) -> String {
    match body.and_then(|b| b.value.as_ref()) {
        None => String::new(),
        Some(Any::StringValue(s)) => s.clone(),
        Some(other) => json_of(Some(other)).to_string(),
    }
}

/// An `AnyValue` as JSON: bytes as lowercase hex, a non-finite double as a string.
fn json_of(value: Option<&Any>) -> serde_json::Value {
    use serde_json::Value as J;
    match value {
        None | Some(Any::StringValueStrindex(_)) => J::Null,
        Some(Any::StringValue(s)) => J::String(s.clone()),
        Some(Any::BoolValue(b)) => J::Bool(*b),
        Some(Any::IntValue(n)) => J::from(*n),
        Some(Any::DoubleValue(d)) => {
            serde_json::Number::from_f64(*d).map_or_else(|| J::String(d.to_string()), J::Number)
        }
        Some(Any::BytesValue(b)) => J::String(hex(b)),
        Some(Any::ArrayValue(a)) => J::Array(a.values.iter().map(|v| json_of(v.value.as_ref())).collect()),
        Some(Any::KvlistValue(l)) => J::Object(
            l.values
                .iter()
                .map(|kv| {
                    (
                        kv.key.clone(),
                        json_of(kv.value.as_ref().and_then(|v| v.value.as_ref())),
                    )
                })
                .collect(),
        ),
    }
}

/// An `AnyValue` as a metadata value (integers past 2^53 as strings).
fn value_of(value: Option<&Any>) -> prost_types::Value {
    let kind = match value {
        None | Some(Any::StringValueStrindex(_)) => Kind::NullValue(0),
        Some(Any::StringValue(s)) => Kind::StringValue(s.clone()),
        Some(Any::BoolValue(b)) => Kind::BoolValue(*b),
        Some(Any::IntValue(n)) if n.unsigned_abs() < METADATA_INTEGER_EXACT_MAX => Kind::NumberValue(*n as f64),
        Some(Any::IntValue(n)) => Kind::StringValue(n.to_string()),
        Some(Any::DoubleValue(d)) if d.is_finite() => Kind::NumberValue(*d),
        Some(Any::DoubleValue(d)) => Kind::StringValue(d.to_string()),
        Some(Any::BytesValue(b)) => Kind::StringValue(hex(b)),
        Some(Any::ArrayValue(a)) => Kind::ListValue(prost_types::ListValue {
            values: a.values.iter().map(|v| value_of(v.value.as_ref())).collect(),
        }),
        Some(Any::KvlistValue(l)) => return struct_of(&l.values),
    };
    prost_types::Value { kind: Some(kind) }
}

/// Key-values as a metadata object (a later duplicate key wins).
fn struct_of<'a>(kvs: impl IntoIterator<Item = &'a KeyValue>) -> prost_types::Value {
    let fields = kvs
        .into_iter()
        .map(|kv| {
            (
                kv.key.clone(),
                value_of(kv.value.as_ref().and_then(|v| v.value.as_ref())),
            )
        })
        .collect();
    prost_types::Value {
        kind: Some(Kind::StructValue(prost_types::Struct { fields })),
    }
}

/// A scope as metadata (`name`, `version`, `attributes`), unless it is empty.
fn scope_struct(scope: &InstrumentationScope) -> Option<prost_types::Value> {
    let mut fields = std::collections::BTreeMap::new();
    if !scope.name.is_empty() {
        fields.insert("name".to_owned(), string(scope.name.clone()));
    }
    if !scope.version.is_empty() {
        fields.insert("version".to_owned(), string(scope.version.clone()));
    }
    if !scope.attributes.is_empty() {
        fields.insert("attributes".to_owned(), struct_of(&scope.attributes));
    }
    if fields.is_empty() {
        return None;
    }
    Some(prost_types::Value {
        kind: Some(Kind::StructValue(prost_types::Struct { fields })),
    })
}

fn string(s: String) -> prost_types::Value {
    prost_types::Value {
        kind: Some(Kind::StringValue(s)),
    }
}

fn number(n: f64) -> prost_types::Value {
    prost_types::Value {
        kind: Some(Kind::NumberValue(n)),
    }
}

/// Bytes as lowercase hex (trace and span ids are written so in OTLP/JSON).
fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::{ArrayValue, KeyValueList};

    fn kv(key: &str, value: Any) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(value) }),
            ..Default::default()
        }
    }

    fn svc() -> OtlpLogsSvc {
        OtlpLogsSvc {
            ready: Ready::default(),
            session_attribute: "session.id".into(),
        }
    }

    fn frame(record: &LogRecord, resource: &[KeyValue]) -> Result<LogFrame, String> {
        let resource_meta = (!resource.is_empty()).then(|| struct_of(resource));
        let context = Context {
            resource,
            resource_meta: resource_meta.as_ref(),
            scope_meta: None,
        };
        svc().frame_of(record, &context)
    }

    #[test]
    fn the_session_comes_from_the_record_then_the_resource_then_the_fallbacks() {
        let resource = [
            kv("service.name", Any::StringValue("svc".into())),
            kv("session.id", Any::StringValue("from-resource".into())),
        ];
        let record = LogRecord {
            attributes: vec![kv("session.id", Any::StringValue("from-record".into()))],
            ..Default::default()
        };
        assert_eq!(frame(&record, &resource).unwrap().session_id, "from-record");
        assert_eq!(
            frame(&LogRecord::default(), &resource).unwrap().session_id,
            "from-resource"
        );
        let only_name = [kv("service.name", Any::StringValue("svc".into()))];
        assert_eq!(frame(&LogRecord::default(), &only_name).unwrap().session_id, "svc");
        let instance = [
            kv("service.name", Any::StringValue("svc".into())),
            kv("service.instance.id", Any::IntValue(7)),
        ];
        assert_eq!(frame(&LogRecord::default(), &instance).unwrap().session_id, "7");
        let err = frame(&LogRecord::default(), &[]).unwrap_err();
        assert!(
            err.contains("\"session.id\", \"service.instance.id\", \"service.name\""),
            "{err}"
        );
    }

    #[test]
    fn a_record_maps_to_time_role_content_seq_and_metadata() {
        let record = LogRecord {
            time_unix_nano: 0,
            observed_time_unix_nano: 1_700_000_000_123_456_789,
            severity_number: 9,
            severity_text: "INFO".into(),
            body: Some(AnyValue {
                value: Some(Any::KvlistValue(KeyValueList {
                    values: vec![
                        kv("n", Any::IntValue(1)),
                        kv("l", Any::ArrayValue(ArrayValue { values: vec![] })),
                    ],
                })),
            }),
            attributes: vec![
                kv("session.id", Any::StringValue("s1".into())),
                kv("logd.seq", Any::IntValue(42)),
                kv("big", Any::IntValue(i64::MAX)),
            ],
            trace_id: vec![0xab; 16],
            span_id: vec![0x01; 8],
            ..Default::default()
        };
        let f = frame(&record, &[]).unwrap();
        assert_eq!((f.session_id.as_str(), f.seq, f.role.as_str()), ("s1", 42, "INFO"));
        let t = f.time.unwrap();
        assert_eq!((t.seconds, t.nanos), (1_700_000_000, 123_456_789));
        assert_eq!(f.content, r#"{"l":[],"n":1}"#);
        let meta = f.metadata.unwrap().fields;
        assert_eq!(meta["trace_id"], string("ab".repeat(16)));
        assert_eq!(meta["span_id"], string("01".repeat(8)));
        assert_eq!(meta["severity_number"], number(9.0));
        let Some(Kind::StructValue(attrs)) = &meta["attributes"].kind else {
            panic!("attributes are an object: {meta:?}");
        };
        assert!(
            !attrs.fields.contains_key("logd.seq"),
            "the seq attribute becomes the seq"
        );
        assert_eq!(attrs.fields["big"], string(i64::MAX.to_string()));
        assert_eq!(attrs.fields["session.id"], string("s1".into()));
    }

    #[test]
    fn a_string_body_is_the_content_as_is_and_odd_doubles_become_strings() {
        let body = AnyValue {
            value: Some(Any::StringValue("{not json".into())),
        };
        assert_eq!(content_of(Some(&body)), "{not json");
        assert_eq!(content_of(None), "");
        let nan = AnyValue {
            value: Some(Any::DoubleValue(f64::NAN)),
        };
        assert_eq!(content_of(Some(&nan)), "\"NaN\"");
        let bytes = AnyValue {
            value: Some(Any::BytesValue(vec![0, 255])),
        };
        assert_eq!(content_of(Some(&bytes)), "\"00ff\"");
    }
}
