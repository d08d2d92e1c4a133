//! Subcommands other than the service itself: `recover`, `wal inspect`,
//! `wal verify`, `bench`, `send`, `status`, `rotate`, `cat`. Output for
//! humans by default, `--json` for scripts; a closed stdout (`| head`) drops
//! the output rather than panicking ([`crate::telemetry::console`]).
//!
//! The client subcommands share one set of connection flags
//! ([`ClientArgs`]) and [`connect`]; a failed call prints its gRPC code name
//! and the server's message, once ([`error_line`]). `cat` reads files only.

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

use crate::config::{ClientArgs, Command};

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
/// A gRPC status shows as its code name and the server's message
/// (`INVALID_ARGUMENT: invalid session_id …`), not tonic's description of
/// the code.
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = match cause.downcast_ref::<tonic::Status>() {
            Some(s) if s.message().is_empty() => code_name(s.code()).to_owned(),
            Some(s) => format!("{}: {}", code_name(s.code()), s.message()),
            None => cause.to_string(),
        };
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

/// The canonical name of a gRPC status code, as the gRPC docs and grpcurl
/// spell it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Prints `logd: error: <error_line>` to stderr (dropped if stderr is closed).
pub fn print_error(e: &anyhow::Error) {
    crate::telemetry::console::errln!("logd: error: {}", error_line(e));
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
pub(crate) struct BearerToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert("authorization", t.clone());
        }
        Ok(req)
    }
}

/// A channel that sends the bearer token with every call.
pub(crate) type Authed = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerToken>;

/// The token interceptor of `--token`.
pub(crate) fn bearer(token: &Option<String>) -> anyhow::Result<BearerToken> {
    let v = token
        .as_ref()
        .map(|t| format!("Bearer {t}").parse())
        .transpose()
        .context("token is not valid ASCII")?;
    Ok(BearerToken(v))
}

fn read_pem(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// The endpoint of `--target` (see [`crate::cli::target`]) with its TLS
/// flags: an `https://` server is verified against `--tls-ca` when given,
/// else the system's roots, and `--tls-cert`/`--tls-key` are presented for
/// mutual TLS.
pub(crate) fn endpoint(c: &ClientArgs) -> anyhow::Result<tonic::transport::Endpoint> {
    let ca = c.tls_ca.as_deref().map(read_pem).transpose()?;
    let identity = match (&c.tls_cert, &c.tls_key) {
        (Some(cert), Some(key)) => Some((read_pem(cert)?, read_pem(key)?)),
        _ => None,
    };
    let identity = identity.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice()));
    Ok(crate::cli::target::endpoint_with_tls(
        &c.target,
        ca.as_deref(),
        identity,
    )?)
}

/// A connection to `--target`, with the token on every call.
pub(crate) async fn connect(c: &ClientArgs) -> anyhow::Result<Authed> {
    connect_with(c, endpoint(c)?).await
}

/// A connection through `ep` (an [`endpoint`] with more settings).
pub(crate) async fn connect_with(c: &ClientArgs, ep: tonic::transport::Endpoint) -> anyhow::Result<Authed> {
    let ch = ep
        .connect()
        .await
        .with_context(|| format!("connecting to {}", c.target))?;
    Ok(tonic::service::interceptor::InterceptedService::new(
        ch,
        bearer(&c.token)?,
    ))
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

    #[test]
    fn a_grpc_status_shows_its_code_name_and_the_servers_message_once() {
        let status = tonic::Status::invalid_argument("invalid session_id \"../x\"");
        let e = anyhow::Error::new(status).context("Rotate");
        assert_eq!(error_line(&e), "Rotate: INVALID_ARGUMENT: invalid session_id \"../x\"");
        let e = anyhow::Error::new(tonic::Status::unauthenticated("")).context("GetStats");
        assert_eq!(error_line(&e), "GetStats: UNAUTHENTICATED");
        for (code, name) in [
            (tonic::Code::ResourceExhausted, "RESOURCE_EXHAUSTED"),
            (tonic::Code::Unavailable, "UNAVAILABLE"),
            (tonic::Code::DataLoss, "DATA_LOSS"),
        ] {
            assert_eq!(code_name(code), name);
        }
    }
}
