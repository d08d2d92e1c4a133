//! Starting the edge: the ports open (gRPC and metrics) before recovery,
//! with health NOT_SERVING and the log services answering UNAVAILABLE until
//! the pipeline is ready.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;

use super::{Lifelines, shutdown_signal, tls_config};
use crate::config::ServeArgs;
use crate::grpc::auth::{Auth, TokenAuth, reload_tokens_on_sighup};
use crate::grpc::conn::limited_incoming;
use crate::grpc::otlp::OtlpLogsSvc;
use crate::grpc::service::{AdminSvc, LogSvc, Ready, Shared};
use crate::pb::admin_service_server::AdminServiceServer;
use crate::pb::log_service_server::LogServiceServer;
use crate::telemetry::console::outln;
use crate::telemetry::prometheus::Metrics;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::LogsServiceServer;

/// The running edge: the gRPC server and the tasks beside it.
pub(super) struct Edge {
    /// The gRPC port's address.
    pub addr: SocketAddr,
    /// The gRPC server; ends after the shutdown token is cancelled.
    pub server: JoinHandle<Result<(), tonic::transport::Error>>,
    /// Reloads the token file on SIGHUP.
    pub reloader: JoinHandle<()>,
    /// The Prometheus endpoint, unless `off`.
    pub metrics_server: Option<JoinHandle<std::io::Result<()>>>,
    health: tonic_health::server::HealthReporter,
    /// `logd_serving`: 1 from ready until shutdown begins.
    serving: prometheus::IntGauge,
    ready: Ready,
}

/// What the edge needs before its port opens: the token file, the SIGHUP
/// handler (installed before the port opens, so SIGHUP never takes its
/// default action of terminating logd) and TLS.
pub(super) struct EdgeSetup {
    auth: Auth,
    hup: tokio::signal::unix::Signal,
    tls: Option<tonic::transport::ServerTlsConfig>,
}

impl EdgeSetup {
    /// Reads the token file and TLS files, installs the SIGHUP handler.
    pub fn prepare(args: &ServeArgs) -> anyhow::Result<EdgeSetup> {
        let auth = Auth(args.auth_token_file.as_deref().map(TokenAuth::from_file).transpose()?);
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).context("SIGHUP handler")?;
        let tls = tls_config(args)?;
        Ok(EdgeSetup { auth, hup, tls })
    }
}

/// Binds the gRPC and metrics ports and starts serving them, not ready.
pub(super) async fn start_edge(
    args: &ServeArgs,
    setup: EdgeSetup,
    metrics: &Arc<Metrics>,
    lifelines: &Lifelines,
) -> anyhow::Result<Edge> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    let metrics_server = start_metrics(args, metrics, &lifelines.shutdown).await?;
    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_not_serving::<LogServiceServer<LogSvc>>().await;
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(opentelemetry_proto::DESCRIPTORS)
        .build_v1()
        .context("building the reflection service")?;
    let reflection_v1alpha = reflection_v1alpha()?;
    let ready = Ready::default();
    let log_svc =
        LogServiceServer::new(LogSvc { ready: ready.clone() }).max_decoding_message_size(args.max_message_bytes);
    let admin_svc = AdminServiceServer::new(AdminSvc { ready: ready.clone() });
    let otlp_svc = LogsServiceServer::new(OtlpLogsSvc {
        ready: ready.clone(),
        session_attribute: args.otlp_session_attribute.clone(),
    })
    // The Collector's otlp exporter compresses with gzip by default; the
    // size limit applies to the decompressed message.
    .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
    .max_decoding_message_size(args.max_message_bytes);
    let mut builder = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(args.max_concurrent_streams))
        .http2_keepalive_interval(Some(Duration::from_secs(args.http2_keepalive_seconds)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .tcp_keepalive(Some(Duration::from_secs(60)))
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(16 << 20));
    if let Some(tls) = setup.tls {
        builder = builder.tls_config(tls).context("TLS configuration")?;
    }
    let auth = setup.auth;
    let reloader = tokio::spawn(reload_tokens_on_sighup(
        setup.hup,
        auth.0.clone(),
        lifelines.shutdown.clone(),
    ));
    let server = builder
        // Open (no token), but its requests end the handshake timeout.
        .add_service(InterceptedService::new(health_svc, Auth(None)))
        // Reflection describes the services: behind the token like them.
        // Health stays open for load balancers and probes.
        .add_service(InterceptedService::new(reflection, auth.clone()))
        .add_service(InterceptedService::new(reflection_v1alpha, auth.clone()))
        .add_service(InterceptedService::new(otlp_svc, auth.clone()))
        .add_service(InterceptedService::new(log_svc, auth.clone()))
        .add_service(InterceptedService::new(admin_svc, auth))
        .serve_with_incoming_shutdown(
            limited_incoming(
                listener,
                args.max_connections,
                Duration::from_millis(args.handshake_timeout_ms),
                metrics.errors.with_label_values(&["handshake_timeout"]),
            ),
            stop_serving(health.clone(), metrics.serving.clone(), lifelines.clone()),
        );
    let server = tokio::spawn(server);
    Ok(Edge {
        addr,
        server,
        reloader,
        metrics_server,
        health,
        serving: metrics.serving.clone(),
        ready,
    })
}

/// Reflection as `grpc.reflection.v1alpha` too, for the clients that speak
/// only it (grpcio-reflection, older grpcurl, Evans).
fn reflection_v1alpha() -> anyhow::Result<
    tonic_reflection::server::v1alpha::ServerReflectionServer<impl tonic_reflection::server::v1alpha::ServerReflection>,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(opentelemetry_proto::DESCRIPTORS)
        .build_v1alpha()
        .context("building the v1alpha reflection service")
}

/// The Prometheus endpoint (`LOGD_METRICS_LISTEN`), unless `off`.
async fn start_metrics(
    args: &ServeArgs,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<JoinHandle<std::io::Result<()>>>> {
    if args.metrics_listen == "off" {
        return Ok(None);
    }
    let l = tokio::net::TcpListener::bind(&args.metrics_listen)
        .await
        .with_context(|| format!("binding LOGD_METRICS_LISTEN {}", args.metrics_listen))?;
    outln!("logd: metrics on {}", l.local_addr()?);
    Ok(Some(tokio::spawn(crate::telemetry::prometheus::serve(
        l,
        metrics.clone(),
        shutdown.clone(),
    ))))
}

/// Resolves on SIGINT/SIGTERM or a fatal failure: health goes NOT_SERVING
/// and the shutdown token is cancelled (streams settle and end).
async fn stop_serving(
    health: tonic_health::server::HealthReporter,
    serving: prometheus::IntGauge,
    lifelines: Lifelines,
) {
    tokio::select! {
        _ = shutdown_signal() => {}
        _ = lifelines.fatal.cancelled() => {}
    }
    serving.set(0);
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    health.set_not_serving::<LogServiceServer<LogSvc>>().await;
    lifelines.shutdown.cancel();
    serving.set(0); // again: `set_ready` may have looked just before the cancel
}

impl Edge {
    /// Hands the services what they serve with, and reports SERVING (unless
    /// shutdown already began).
    pub async fn set_ready(&self, shared: Shared, shutdown: &CancellationToken) {
        self.ready.set(shared);
        if !shutdown.is_cancelled() {
            self.serving.set(1);
            self.health.set_serving::<LogServiceServer<LogSvc>>().await;
            self.health
                .set_service_status("", tonic_health::ServingStatus::Serving)
                .await;
            tracing::info!("serving");
        }
    }

    /// Drops the services' handle on the pipeline (the commit thread's
    /// submitter), so the pipeline can stop.
    pub fn unready(&mut self) {
        self.ready = Ready::default();
    }
}
