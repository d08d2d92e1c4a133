//! Subcommands other than the service itself: `recover`, `wal inspect`,
//! `wal verify`, `bench`, `send`, `status`, `rotate`, `cat`. Output for humans by
//! default, `--json` for scripts.

pub(crate) mod bench;
mod cat;
mod recover;
mod rotate;
mod send;
mod status;
pub(crate) mod target;
mod wal;

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;

use crate::config::Command;

/// Exit code for an error: 2 when the state needs an operator, else 1.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    let integrity = e.chain().any(|c| {
        c.downcast_ref::<recovery::PassError>()
            .is_some_and(|r| r.is_integrity())
            || c.downcast_ref::<recovery::Error>().is_some_and(|r| r.is_integrity())
            || c.downcast_ref::<::wal::Error>().is_some_and(::wal::Error::is_integrity)
    });
    if integrity { 2 } else { 1 }
}

/// An error as one line: each cause after the error, `: `-separated, except
/// a cause whose text the line already ends with (an error that prints its
/// own source, as hyper's and tonic's sometimes do, would show it twice).
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Runs one subcommand.
pub async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve(args) => crate::server::serve(*args).await.map(|_| ExitCode::SUCCESS),
        Command::Bench(args) => {
            let r = crate::cli::bench::run(args).await?;
            Ok(if r.errors > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Recover(args) => tokio::task::spawn_blocking(move || recover::recover(args)).await?,
        Command::Rotate(args) => rotate::rotate(args).await,
        Command::Send(args) => send::send(args).await,
        Command::Status(args) => status::status(args).await,
        Command::Cat(args) => tokio::task::spawn_blocking(move || cat::cat(args)).await?,
        Command::Wal { command } => tokio::task::spawn_blocking(move || wal::wal_command(command)).await?,
    }
}

/// Adds `authorization: Bearer <token>` to every call when a token is set.
#[derive(Clone)]
struct BearerToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert("authorization", t.clone());
        }
        Ok(req)
    }
}

fn bearer(token: &Option<String>) -> anyhow::Result<BearerToken> {
    let v = token
        .as_ref()
        .map(|t| format!("Bearer {t}").parse())
        .transpose()
        .context("token is not valid ASCII")?;
    Ok(BearerToken(v))
}

/// A connection to `target` (see [`crate::cli::target`]); an `https://` server is
/// verified against `tls_ca` when given, else the system's roots.
async fn channel(target: &str, tls_ca: Option<&Path>) -> anyhow::Result<tonic::transport::Channel> {
    let pem = match tls_ca {
        Some(ca) => Some(std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?),
        None => None,
    };
    let ep = crate::cli::target::endpoint_with_ca(target, pem.as_deref())?;
    ep.connect().await.with_context(|| format!("connecting to {target}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Repeats(&'static str, Option<Box<Repeats>>);

    impl std::fmt::Display for Repeats {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Repeats {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn an_error_line_names_each_cause_once() {
        let leaf = Repeats("scheme is missing", None);
        let same = Repeats("scheme is missing", Some(Box::new(leaf)));
        let e = anyhow::Error::new(same).context("connecting to x");
        assert_eq!(
            format!("{e:#}"),
            "connecting to x: scheme is missing: scheme is missing"
        );
        assert_eq!(error_line(&e), "connecting to x: scheme is missing");

        let inner = Repeats("refused", None);
        let wraps = Repeats("connect failed: refused", Some(Box::new(inner)));
        let e = anyhow::Error::new(wraps).context("connecting to y");
        assert_eq!(error_line(&e), "connecting to y: connect failed: refused");

        let e = anyhow::anyhow!("plain");
        assert_eq!(error_line(&e), "plain");
    }
}
