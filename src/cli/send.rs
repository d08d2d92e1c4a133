//! `logd send`: the `logger(1)` of logd. Every line (plain text, or with
//! `--json` one JSON object) becomes a frame, sent over one bidi stream;
//! it prints the totals of accepted, duplicate and rejected lines and the
//! first few reasons.

use std::process::ExitCode;

use anyhow::Context;
use prost_types::value::Kind;

use super::connect;
use crate::config::SendArgs;
use crate::pb::LogFrame;
use crate::telemetry::console::{errln, outln};

/// Rejection reasons printed, at most; the rest are counted.
const REASONS_SHOWN_MAX: usize = 5;

/// Lines refused before sending (bad JSON), kept for their line numbers,
/// at most; past it they are only counted.
const LOCAL_REJECTIONS_KEPT_MAX: usize = 100_000;

/// A line that was not sent: its 1-based number and why.
struct Skipped {
    line: u64,
    reason: String,
}

/// What the reader task saw.
#[derive(Default)]
struct Read {
    sent: i64,
    /// Lines not sent, in line order (at most LOCAL_REJECTIONS_KEPT_MAX).
    skipped: Vec<Skipped>,
    skipped_total: u64,
}

impl Read {
    /// The input line of the `index`-th frame sent (0-based): frames skip
    /// the lines that were not sent.
    fn line_of(&self, index: i64) -> u64 {
        let mut line = index as u64 + 1;
        for s in &self.skipped {
            if s.line <= line {
                line += 1;
            }
        }
        line
    }
}

/// `logd send`; exit 0 only when every line was accepted (or a duplicate).
pub(super) async fn send(args: SendArgs) -> anyhow::Result<ExitCode> {
    use tokio::io::AsyncBufReadExt;
    let mut client = crate::pb::log_service_client::LogServiceClient::new(connect(&args.client).await?);
    let input: Box<dyn tokio::io::AsyncRead + Unpin + Send> = match &args.file {
        Some(p) => Box::new(
            tokio::fs::File::open(p)
                .await
                .with_context(|| format!("opening {}", p.display()))?,
        ),
        None => Box::new(tokio::io::stdin()),
    };
    let mut lines = tokio::io::BufReader::new(input).lines();
    let (tx, rx) = tokio::sync::mpsc::channel::<LogFrame>(1024);
    let template = args.clone();
    let reader = tokio::spawn(async move {
        let mut read = Read::default();
        let mut line_no = 0u64;
        while let Some(line) = lines.next_line().await? {
            line_no += 1;
            let frame = if template.json {
                match json_frame(&line, &template) {
                    Ok(f) => f,
                    Err(reason) => {
                        read.skipped_total += 1;
                        if read.skipped.len() < LOCAL_REJECTIONS_KEPT_MAX {
                            read.skipped.push(Skipped { line: line_no, reason });
                        }
                        continue;
                    }
                }
            } else {
                text_frame(line, &template)
            };
            if tx.send(frame).await.is_err() {
                break;
            }
            read.sent += 1;
        }
        anyhow::Ok(read)
    });
    let mut acks = client
        .write_log_bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .context("WriteLogBidi")?
        .into_inner();
    let mut ranges: Ranges = Default::default();
    let (mut through, mut accepted, mut duplicate, mut rejected) = (0i64, 0i64, 0i64, 0i64);
    let mut reasons = Vec::new();
    while let Some(ack) = acks.message().await.context("waiting for acks")? {
        through = ack.through_index;
        accepted = ack.frames_accepted;
        duplicate = ack.frames_duplicate;
        rejected = ack.frames_rejected;
        for r in &ack.sessions {
            let e = ranges.entry(r.session_id.clone()).or_insert((i64::MAX, 0, 0));
            e.0 = e.0.min(r.first_seq);
            e.1 = e.1.max(r.last_seq);
            e.2 += r.frames;
        }
        for r in ack.rejections {
            if reasons.len() < REASONS_SHOWN_MAX {
                reasons.push((r.index, r.reason));
            }
        }
    }
    let read = reader.await??;
    report(&read, (accepted, duplicate, rejected), &ranges, &reasons);
    if through != read.sent {
        anyhow::bail!("only {through} of {} line(s) sent were acknowledged", read.sent);
    }
    Ok(if rejected == 0 && read.skipped_total == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Per session: the first and last seq accepted, and how many frames.
type Ranges = std::collections::BTreeMap<String, (i64, i64, i64)>;

/// Prints the totals (stdout) and the first few reasons (stderr).
fn report(read: &Read, (accepted, duplicate, rejected): (i64, i64, i64), ranges: &Ranges, reasons: &[(i64, String)]) {
    let mut shown = 0;
    // Local and server rejections in line order, the first few.
    let mut first: Vec<(u64, &str)> = read
        .skipped
        .iter()
        .take(REASONS_SHOWN_MAX)
        .map(|s| (s.line, s.reason.as_str()))
        .collect();
    first.extend(reasons.iter().map(|(i, r)| (read.line_of(*i), r.as_str())));
    first.sort_by_key(|(line, _)| *line);
    for (line, reason) in first.iter().take(REASONS_SHOWN_MAX) {
        errln!("line {line}: rejected: {reason}");
        shown += 1;
    }
    let rejected_total = rejected as u64 + read.skipped_total;
    if rejected_total > shown {
        errln!("… and {} more rejected line(s)", rejected_total - shown);
    }
    let lines = read.sent as u64 + read.skipped_total;
    outln!("{lines} line(s): {accepted} accepted, {duplicate} duplicate, {rejected_total} rejected");
    for (session, (first, last, frames)) in ranges {
        outln!("{frames} line(s) acked as seq {first}..={last} of session {session}");
    }
}

/// A plain line as a frame.
fn text_frame(content: String, args: &SendArgs) -> LogFrame {
    LogFrame {
        session_id: args.session.clone().unwrap_or_default(),
        role: args.role.clone(),
        user_id: args.user.clone(),
        content,
        metadata: meta_struct(&args.meta, None),
        ..Default::default()
    }
}

/// `--meta` pairs, then the line's own `metadata` over them; None if both
/// are empty.
fn meta_struct(meta: &[(String, String)], own: Option<prost_types::Struct>) -> Option<prost_types::Struct> {
    if meta.is_empty() {
        return own;
    }
    let mut st = prost_types::Struct::default();
    for (k, v) in meta {
        st.fields.insert(
            k.clone(),
            prost_types::Value {
                kind: Some(Kind::StringValue(v.clone())),
            },
        );
    }
    st.fields.extend(own.map(|o| o.fields).unwrap_or_default());
    Some(st)
}

/// A `--json` line as a frame, or why it cannot be one.
fn json_frame(line: &str, args: &SendArgs) -> Result<LogFrame, String> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let serde_json::Value::Object(mut o) = v else {
        return Err("not a JSON object".into());
    };
    let mut text = |key: &str, default: &str| -> Result<String, String> {
        match o.remove(key) {
            None | Some(serde_json::Value::Null) => Ok(default.to_owned()),
            Some(serde_json::Value::String(s)) => Ok(s),
            Some(other) => Err(format!("{key} must be a string, not {other}")),
        }
    };
    let session_id = text("session_id", args.session.as_deref().unwrap_or(""))?;
    if session_id.is_empty() {
        return Err("no session_id (and no --session)".into());
    }
    let role = text("role", &args.role)?;
    let user_id = text("user_id", &args.user)?;
    let content = match o.remove("content") {
        None => return Err("no content".into()),
        Some(serde_json::Value::String(s)) => s,
        Some(other) => other.to_string(),
    };
    let seq = match o.remove("seq") {
        None | Some(serde_json::Value::Null) => 0,
        Some(n) => n.as_i64().ok_or_else(|| format!("seq must be an integer, not {n}"))?,
    };
    let time = match o.remove("time") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(t)) => {
            let t = chrono::DateTime::parse_from_rfc3339(&t).map_err(|e| format!("time {t:?} is not RFC 3339: {e}"))?;
            Some(prost_types::Timestamp {
                seconds: t.timestamp(),
                nanos: t.timestamp_subsec_nanos() as i32,
            })
        }
        Some(other) => return Err(format!("time must be an RFC 3339 string, not {other}")),
    };
    let own = match o.remove("metadata") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Object(m)) => Some(json_struct(m)),
        Some(other) => return Err(format!("metadata must be an object, not {other}")),
    };
    if let Some(k) = o.keys().next() {
        return Err(format!(
            "unknown field {k:?} (known: content, session_id, role, user_id, metadata, time, seq)"
        ));
    }
    Ok(LogFrame {
        session_id,
        role,
        user_id,
        content,
        seq,
        time,
        metadata: meta_struct(&args.meta, own),
        ..Default::default()
    })
}

fn json_struct(m: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: m.into_iter().map(|(k, v)| (k, json_value(v))).collect(),
    }
}

fn json_value(v: serde_json::Value) -> prost_types::Value {
    use serde_json::Value as J;
    let kind = match v {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        J::String(s) => Kind::StringValue(s),
        J::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(json_value).collect(),
        }),
        J::Object(m) => Kind::StructValue(json_struct(m)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> SendArgs {
        let mut argv = vec!["logd", "send"];
        argv.extend_from_slice(extra);
        match crate::config::Cli::parse_from(argv).command {
            crate::config::Command::Send(a) => a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn a_json_line_fills_every_field_and_its_metadata_wins_over_meta_flags() {
        let a = args(&["--json", "--session", "dflt", "--meta", "host=h1", "--meta", "k=flag"]);
        let f = json_frame(
            r#"{"content":"hi","role":"user","seq":7,"time":"2026-12-01T08:00:00.5Z","metadata":{"k":"line","n":2}}"#,
            &a,
        )
        .unwrap();
        assert_eq!(
            (f.session_id.as_str(), f.role.as_str(), f.content.as_str(), f.seq),
            ("dflt", "user", "hi", 7)
        );
        let t = f.time.unwrap();
        assert_eq!((t.seconds, t.nanos), (1_796_112_000, 500_000_000));
        let md = f.metadata.unwrap().fields;
        assert_eq!(md["host"].kind, Some(Kind::StringValue("h1".into())));
        assert_eq!(md["k"].kind, Some(Kind::StringValue("line".into())));
        assert_eq!(md["n"].kind, Some(Kind::NumberValue(2.0)));
        let f = json_frame(r#"{"session_id":"s2","content":{"a":[1,true]}}"#, &a).unwrap();
        assert_eq!((f.session_id.as_str(), f.content.as_str()), ("s2", r#"{"a":[1,true]}"#));
    }

    #[test]
    fn a_bad_json_line_says_why() {
        let a = args(&["--json"]);
        for (line, why) in [
            ("nope", "not JSON"),
            ("[1]", "not a JSON object"),
            (r#"{"content":"x"}"#, "no session_id"),
            (r#"{"session_id":"s"}"#, "no content"),
            (
                r#"{"session_id":"s","content":"x","seq":"1"}"#,
                "seq must be an integer",
            ),
            (
                r#"{"session_id":"s","content":"x","time":"yesterday"}"#,
                "is not RFC 3339",
            ),
            (
                r#"{"session_id":"s","content":"x","colour":1}"#,
                "unknown field \"colour\"",
            ),
        ] {
            let e = json_frame(line, &a).unwrap_err();
            assert!(e.contains(why), "{line}: {e}");
        }
    }

    #[test]
    fn a_frame_index_maps_to_its_line_past_the_lines_not_sent() {
        let read = Read {
            sent: 5,
            skipped: vec![
                Skipped {
                    line: 2,
                    reason: String::new(),
                },
                Skipped {
                    line: 3,
                    reason: String::new(),
                },
                Skipped {
                    line: 6,
                    reason: String::new(),
                },
            ],
            skipped_total: 3,
        };
        // Lines 1 4 5 7 8 were sent as frames 0..5.
        let lines: Vec<u64> = (0..5).map(|i| read.line_of(i)).collect();
        assert_eq!(lines, [1, 4, 5, 7, 8]);
    }
}
