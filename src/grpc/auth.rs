//! Bearer-token authentication of the gRPC services, reloaded on SIGHUP.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::grpc::conn::ConnInfo;

/// Checks `authorization: Bearer <token>` against the accepted tokens in
/// constant time; `UNAUTHENTICATED` otherwise. The scheme matches in any
/// case (RFC 6750 via RFC 7235); the token is exact. [`TokenAuth::reload`]
/// (on SIGHUP) swaps the tokens in force for the file's current ones.
#[derive(Clone)]
pub struct TokenAuth {
    path: PathBuf,
    tokens: Arc<std::sync::RwLock<Arc<Vec<Vec<u8>>>>>,
}

/// One token per non-empty line of `path` (surrounding spaces trimmed).
fn read_tokens(path: &Path) -> anyhow::Result<Vec<Vec<u8>>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading token file {}", path.display()))?;
    let tokens: Vec<Vec<u8>> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| l.as_bytes().to_vec())
        .collect();
    anyhow::ensure!(!tokens.is_empty(), "token file {} holds no token", path.display());
    Ok(tokens)
}

impl TokenAuth {
    /// Reads one token per non-empty line of `path`.
    pub fn from_file(path: &Path) -> anyhow::Result<TokenAuth> {
        Ok(TokenAuth {
            path: path.to_path_buf(),
            tokens: Arc::new(std::sync::RwLock::new(Arc::new(read_tokens(path)?))),
        })
    }

    /// Reads the file again and puts its tokens in force; on an error (the
    /// file is unreadable or holds no token) the tokens in force stay.
    /// Returns how many tokens are in force now.
    pub fn reload(&self) -> anyhow::Result<usize> {
        let fresh = Arc::new(read_tokens(&self.path)?);
        let n = fresh.len();
        *self.tokens.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(n)
    }

    fn check(&self, req: &tonic::Request<()>) -> Result<(), tonic::Status> {
        use subtle::ConstantTimeEq;
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim_start_matches(' '));
        let Some(given) = given else {
            return Err(tonic::Status::unauthenticated(
                "missing `authorization: Bearer <token>`",
            ));
        };
        let tokens = self.tokens.read().unwrap_or_else(|p| p.into_inner()).clone();
        // Compare against every token without stopping early.
        let mut ok = subtle::Choice::from(0u8);
        for t in tokens.iter() {
            ok |= t.as_slice().ct_eq(given.as_bytes());
        }
        if bool::from(ok) {
            Ok(())
        } else {
            Err(tonic::Status::unauthenticated("invalid token"))
        }
    }
}

/// Reloads the token file on every SIGHUP until `stop`. Without a token
/// file SIGHUP only logs (it never stops logd).
pub(crate) async fn reload_tokens_on_sighup(
    mut hup: tokio::signal::unix::Signal,
    auth: Option<TokenAuth>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            got = hup.recv() => if got.is_none() { return },
            _ = stop.cancelled() => return,
        }
        match &auth {
            None => info!("SIGHUP: no LOGD_AUTH_TOKEN_FILE, nothing to reload"),
            Some(a) => match a.reload() {
                Ok(n) => info!(tokens = n, file = %a.path.display(), "SIGHUP: reloaded the token file"),
                Err(e) => error!("SIGHUP: token file not reloaded ({e:#}); keeping the tokens in force"),
            },
        }
    }
}

/// A tonic interceptor: the token check, or nothing. A request that
/// passes it ends its connection's handshake timeout.
#[derive(Clone)]
pub(crate) struct Auth(pub(crate) Option<TokenAuth>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(a) = &self.0 {
            a.check(&req)?;
        }
        ConnInfo::of(&req).inspect(|c| c.mark_served());
        Ok(req)
    }
}
