//! `logd send`.

use std::process::ExitCode;

use anyhow::Context;

use super::{bearer, channel};
use crate::config::SendArgs;

/// `logd send`: the `logger(1)` of logd. Every line becomes a frame with a
/// client seq continuing the session's, sent over one bidi stream.
pub(super) async fn send(args: SendArgs) -> anyhow::Result<ExitCode> {
    use crate::pb::LogFrame;
    use tokio::io::AsyncBufReadExt;
    let ch = channel(&args.target, args.tls_ca.as_deref()).await?;
    let mut client = crate::pb::log_service_client::LogServiceClient::with_interceptor(ch, bearer(&args.token)?);
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
    let (session, role, user) = (args.session.clone(), args.role.clone(), args.user.clone());
    let reader = tokio::spawn(async move {
        let mut sent = 0i64;
        while let Some(line) = lines.next_line().await? {
            let frame = LogFrame {
                session_id: session.clone(),
                role: role.clone(),
                user_id: user.clone(),
                content: line,
                ..Default::default()
            };
            if tx.send(frame).await.is_err() {
                break;
            }
            sent += 1;
        }
        anyhow::Ok(sent)
    });
    let mut acks = client
        .write_log_bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .context("WriteLogBidi")?
        .into_inner();
    let (mut first, mut last, mut through, mut rejected) = (i64::MAX, 0i64, 0i64, Vec::new());
    let mut accepted = 0;
    let mut duplicate = 0;
    while let Some(ack) = acks.message().await.context("waiting for acks")? {
        through = ack.through_index;
        accepted = ack.frames_accepted;
        duplicate = ack.frames_duplicate;
        for r in &ack.sessions {
            first = first.min(r.first_seq);
            last = last.max(r.last_seq);
        }
        rejected.extend(ack.rejections);
    }
    let sent = reader.await??;
    for r in &rejected {
        eprintln!("line {}: rejected: {}", r.index + 1, r.reason);
    }
    if through != sent {
        anyhow::bail!("only {through} of {sent} line(s) were acknowledged");
    }
    if accepted > 0 {
        println!(
            "{accepted} line(s) acked as seq {first}..={last} of session {}",
            args.session
        );
    } else {
        println!("0 lines acked");
    }
    if duplicate > 0 {
        println!("{duplicate} duplicate(s)");
    }
    Ok(if rejected.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
