//! `logd rotate`.

use std::process::ExitCode;

use anyhow::Context;

use super::connect;
use crate::config::RotateArgs;
use crate::telemetry::console::outln;

/// `logd rotate --session S | --all`: rotates now and names the files.
pub(super) async fn rotate(args: RotateArgs) -> anyhow::Result<ExitCode> {
    let mut client = crate::pb::admin_service_client::AdminServiceClient::new(connect(&args.client).await?);
    let req = crate::pb::RotateRequest {
        session_id: args.which.session.clone().unwrap_or_default(),
        all: args.which.all,
    };
    let files = client.rotate(req).await.context("Rotate")?.into_inner().files;
    if files.is_empty() {
        match &args.which.session {
            Some(s) => outln!("nothing to rotate: session {s} is unknown or its live file is empty"),
            None => outln!("nothing to rotate (no open file with frames)"),
        }
    }
    for f in files {
        outln!("rotated: {f}");
    }
    Ok(ExitCode::SUCCESS)
}
