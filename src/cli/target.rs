//! The server address every client subcommand (`send`, `status`, `rotate`,
//! `bench`) takes as `--target` (with `--tls-ca`, `--tls-cert`/`--tls-key`): `host:port` (plaintext), `http://host:port`
//! (plaintext) or `https://host:port` (TLS, verifying the server against the
//! system's root certificates unless the caller supplies a CA). One parser
//! for all of them, with one clear error for anything else.

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// What `--target` accepts, for help texts and errors.
pub const TARGET_FORMS: &str = "host:port, http://host:port or https://host:port";

/// Why a target cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// Not one of the accepted forms.
    #[error("invalid target {target:?}: expected {TARGET_FORMS}")]
    Malformed {
        /// The target as given.
        target: String,
    },
    /// A CA to verify the server with, but a plaintext target.
    #[error("--tls-ca needs an https:// target, not {target:?}")]
    CaWithoutTls {
        /// The target as given.
        target: String,
    },
    /// A client certificate, but a plaintext target.
    #[error("--tls-cert needs an https:// target, not {target:?}")]
    CertWithoutTls {
        /// The target as given.
        target: String,
    },
    /// TLS could not be set up (no usable root certificates, a bad CA file).
    #[error("setting up TLS for {target:?}")]
    Tls {
        /// The target as given.
        target: String,
        /// What tonic/rustls reported.
        #[source]
        source: tonic::transport::Error,
    },
}

/// A scheme and `host:port` checked to be one of the accepted forms.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    tls: bool,
    /// `http://host:port` or `https://host:port`, without a path.
    uri: String,
}

fn parse(target: &str) -> Result<Target, TargetError> {
    let malformed = || TargetError::Malformed {
        target: target.to_owned(),
    };
    let (tls, authority) = match target.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => (false, rest),
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("https") => (true, rest),
        Some(_) => return Err(malformed()),
        None => (false, target),
    };
    // A trailing `/` is harmless; any other path, a query or user info is
    // not an address of a gRPC server.
    let authority = authority.strip_suffix('/').unwrap_or(authority);
    if authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
        return Err(malformed());
    }
    let parsed: tonic::codegen::http::uri::Authority = authority.parse().map_err(|_| malformed())?;
    let port_ok = parsed
        .port()
        .is_some_and(|p| p.as_str().parse::<u16>().is_ok_and(|p| p > 0));
    if parsed.host().is_empty() || !port_ok {
        return Err(malformed());
    }
    let scheme = if tls { "https" } else { "http" };
    Ok(Target {
        tls,
        uri: format!("{scheme}://{parsed}"),
    })
}

/// The endpoint for `target`: plaintext for `host:port` and `http://`, TLS
/// with the system's root certificates for `https://`.
#[cfg(test)]
pub fn endpoint(target: &str) -> Result<Endpoint, TargetError> {
    endpoint_with_ca(target, None)
}

/// Like [`endpoint`], but an `https://` server is verified against `ca_pem`
/// (PEM) instead of the system's roots. A CA with a plaintext target is an
/// error rather than silently unused.
#[cfg(test)]
pub fn endpoint_with_ca(target: &str, ca_pem: Option<&[u8]>) -> Result<Endpoint, TargetError> {
    endpoint_with_tls(target, ca_pem, None)
}

/// Like [`endpoint_with_ca`], and with a client certificate chain and its
/// key (`identity_pem`, both PEM) for mutual TLS.
pub fn endpoint_with_tls(
    target: &str,
    ca_pem: Option<&[u8]>,
    identity_pem: Option<(&[u8], &[u8])>,
) -> Result<Endpoint, TargetError> {
    let t = parse(target)?;
    let ep = Endpoint::from_shared(t.uri).map_err(|_| TargetError::Malformed {
        target: target.to_owned(),
    })?;
    if !t.tls {
        let target = target.to_owned();
        return match (ca_pem, identity_pem) {
            (Some(_), _) => Err(TargetError::CaWithoutTls { target }),
            (None, Some(_)) => Err(TargetError::CertWithoutTls { target }),
            (None, None) => Ok(ep),
        };
    }
    let mut tls = match ca_pem {
        Some(pem) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)),
        None => ClientTlsConfig::new().with_enabled_roots(),
    };
    if let Some((cert, key)) = identity_pem {
        tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
    }
    ep.tls_config(tls).map_err(|source| TargetError::Tls {
        target: target.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(target: &str) -> Target {
        parse(target).unwrap_or_else(|e| panic!("{target:?}: {e}"))
    }

    #[test]
    fn host_and_port_alone_means_plaintext_http() {
        assert_eq!(
            ok("127.0.0.1:50051"),
            Target {
                tls: false,
                uri: "http://127.0.0.1:50051".into()
            }
        );
        assert_eq!(ok("localhost:1").uri, "http://localhost:1");
        assert_eq!(ok("[::1]:50051").uri, "http://[::1]:50051");
        assert_eq!(ok("logs.example.com:443").uri, "http://logs.example.com:443");
        let ep = endpoint("127.0.0.1:50051").unwrap();
        assert_eq!(ep.uri().to_string(), "http://127.0.0.1:50051/");
    }

    #[test]
    fn http_and_https_urls_keep_their_scheme() {
        assert_eq!(
            ok("http://127.0.0.1:50051"),
            Target {
                tls: false,
                uri: "http://127.0.0.1:50051".into()
            }
        );
        assert_eq!(ok("http://127.0.0.1:50051/").uri, "http://127.0.0.1:50051");
        assert_eq!(
            ok("https://logs.example.com:443"),
            Target {
                tls: true,
                uri: "https://logs.example.com:443".into()
            }
        );
        assert_eq!(ok("HTTPS://localhost:8443").uri, "https://localhost:8443");
        let ep = endpoint("https://localhost:8443").unwrap();
        assert_eq!(ep.uri().scheme_str(), Some("https"));
        assert_eq!(
            endpoint("http://localhost:8443").unwrap().uri().scheme_str(),
            Some("http")
        );
    }

    #[test]
    fn anything_else_is_one_clear_error_naming_the_target() {
        for bad in [
            "",
            "foo bar",
            "127.0.0.1",
            "http://127.0.0.1",
            "127.0.0.1:",
            ":50051",
            "http://",
            "https://",
            "http://:50051",
            "127.0.0.1:0",
            "127.0.0.1:99999",
            "127.0.0.1:port",
            "ftp://127.0.0.1:50051",
            "unix:///tmp/logd.sock",
            "http://127.0.0.1:50051/logging.v1.LogService",
            "http://user@127.0.0.1:50051",
            "http://127.0.0.1:50051?x=1",
            "http://http://127.0.0.1:50051",
        ] {
            let err = endpoint(bad).expect_err(bad);
            assert!(matches!(err, TargetError::Malformed { .. }), "{bad:?}: {err:?}");
            assert_eq!(
                err.to_string(),
                format!("invalid target {bad:?}: expected host:port, http://host:port or https://host:port")
            );
            assert!(std::error::Error::source(&err).is_none(), "nothing repeats it");
        }
    }

    #[test]
    fn a_ca_needs_an_https_target() {
        let err = endpoint_with_ca("127.0.0.1:50051", Some(b"")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--tls-ca needs an https:// target, not \"127.0.0.1:50051\""
        );
        let err = endpoint_with_tls("127.0.0.1:50051", None, Some((b"", b""))).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--tls-cert needs an https:// target, not \"127.0.0.1:50051\""
        );
    }
}
