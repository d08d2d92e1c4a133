//! `logd rotate`.

use std::process::ExitCode;

use anyhow::Context;

use super::channel;
use crate::config::RotateArgs;

pub(super) async fn rotate(args: RotateArgs) -> anyhow::Result<ExitCode> {
    let mut client = crate::pb::admin_service_client::AdminServiceClient::new(channel(&args.target, None).await?);
    let req = crate::pb::RotateRequest {
        session_id: args.session.clone().unwrap_or_default(),
        all: args.all,
    };
    let files = client.rotate(req).await.context("Rotate")?.into_inner().files;
    if files.is_empty() {
        match &args.session {
            Some(s) => println!("nothing to rotate: session {s} is unknown or its live file is empty"),
            None => println!("nothing to rotate (no open file with frames)"),
        }
    }
    for f in files {
        println!("rotated: {f}");
    }
    Ok(ExitCode::SUCCESS)
}
