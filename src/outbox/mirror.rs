//! The Redis mirror: drains the metadata store's event outbox into a Redis
//! stream, oldest first, removing an event only after its `XADD` succeeded.
//!
//! Delivery is at least once and in order: a failed `XADD` stops the pass
//! and is retried with backoff. Each removal is flushed before the next
//! `XADD`, so a crash can re-send only the one event whose `XADD` was not
//! yet confirmed by a durable removal (with the same `event_id`). A slow
//! answer is waited for ([`REDIS_RESPONSE_TIMEOUT`]), not taken for a
//! failure: Redis may still run a command its client gave up on. Redis
//! being down never touches ingest: events wait in the outbox (bounded by
//! `LOGD_OUTBOX_EVENTS_MAX`: at it, rotations wait). Started only after the
//! recovery pass, so events of files recovery finished go out too.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use store::{Event, EventKind};

use crate::outbox::encoding::Encoding;
use crate::telemetry::stats::MirrorStats;
use store::{MetaStore, event_delete_op};

/// Events fetched from the outbox per pass.
const OUTBOX_BATCH_MAX: usize = 256;
/// Longest wait between retries while Redis is unreachable.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Where and how events are published.
#[derive(Debug, Clone)]
pub struct MirrorConfig {
    /// `redis://…`
    pub url: String,
    /// Stream key.
    pub stream: String,
    /// `MAXLEN ~` cap.
    pub maxlen: u64,
    /// Encoding of `content`.
    pub encoding: Encoding,
    /// Optional pub/sub channel for a wake-up ping.
    pub pubsub_channel: Option<String>,
    /// `LOGD_INSTANCE`, stamped into every event published.
    pub instance: String,
}

fn kind_name(k: EventKind) -> &'static str {
    match k {
        EventKind::Rotated => "rotated",
        EventKind::Compressed => "compressed",
    }
}

/// Publishes one event: `XADD <stream> MAXLEN ~ <n> * type … encoding …
/// content … timestamp … event_id …`.
async fn publish(con: &mut ConnectionManager, cfg: &MirrorConfig, e: &Event) -> redis::RedisResult<()> {
    let _: String = redis::cmd("XADD")
        .arg(&cfg.stream)
        .arg("MAXLEN")
        .arg("~")
        .arg(cfg.maxlen)
        .arg("*")
        .arg("type")
        .arg(kind_name(e.kind))
        .arg("encoding")
        .arg(cfg.encoding.name())
        .arg("content")
        .arg(cfg.encoding.encode(e))
        .arg("timestamp")
        .arg(e.timestamp_ms)
        .arg("event_id")
        .arg(&e.event_id)
        .query_async(con)
        .await?;
    Ok(())
}

/// How long the mirror waits for Redis to answer a command. Not the Redis
/// client's default (500 ms): a command that times out may still run in
/// Redis (it is queued there), so an `XADD` given up on and sent again would
/// put the event on the stream twice while nothing crashed. Redis answering
/// slowly (busy, swapping, `CLIENT PAUSE`) must only delay the events. A
/// dead connection is still noticed: it fails at once, or at this bound.
const REDIS_RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);

async fn connect(cfg: &MirrorConfig) -> redis::RedisResult<ConnectionManager> {
    let client = redis::Client::open(cfg.url.as_str())?;
    let config = redis::aio::ConnectionManagerConfig::new().set_response_timeout(Some(REDIS_RESPONSE_TIMEOUT));
    ConnectionManager::new_with_config(client, config).await
}

/// Runs until `shutdown`, publishing the outbox whenever `wake` fires (and
/// at least every second).
pub async fn run_mirror(
    cfg: MirrorConfig,
    meta: Arc<dyn MetaStore>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
    stats: Arc<MirrorStats>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut con: Option<ConnectionManager> = None;
    let mut warned = false;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let m = meta.clone();
        let batch = match tokio::task::spawn_blocking(move || m.outbox(OUTBOX_BATCH_MAX)).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                warn!("reading the event outbox failed: {e}");
                Vec::new()
            }
            Err(e) => {
                warn!("outbox reader panicked: {e}");
                Vec::new()
            }
        };
        if batch.is_empty() {
            stats.pending.store(0, Ordering::Relaxed);
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.cancelled() => return,
            }
            continue;
        }
        stats
            .pending
            .store(meta.outbox_len().unwrap_or(batch.len()) as u64, Ordering::Relaxed);
        if con.is_none() {
            match connect(&cfg).await {
                Ok(c) => {
                    info!(url = cfg.url, stream = cfg.stream, "redis mirror connected");
                    con = Some(c);
                }
                Err(e) => {
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                    if !warned {
                        warn!(
                            pending = batch.len(),
                            "redis unreachable ({e}); events wait in the outbox"
                        );
                        warned = true;
                    }
                    sleep_or_stop(&shutdown, &mut backoff).await;
                    continue;
                }
            }
        }
        let c = con.as_mut().expect("connected");
        let mut sent = 0usize;
        for (key, event) in &batch {
            let mut event = event.clone();
            event.stamp_instance(&cfg.instance);
            let event = &event;
            // Shutdown does not wait for a slow answer: the event stays in
            // the outbox and is sent again at the next start (if Redis ran
            // the XADD after all, that one event twice, as after a crash).
            let published = tokio::select! {
                r = publish(c, &cfg, event) => r,
                _ = shutdown.cancelled() => return,
            };
            if let Err(e) = published {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                if !warned {
                    warn!(
                        event_id = event.event_id,
                        "XADD failed ({e}); events wait in the outbox and are retried in order"
                    );
                    warned = true;
                }
                break;
            }
            wal::crash_point!("mirror::after_xadd");
            if let Some(channel) = &cfg.pubsub_channel {
                let _: redis::RedisResult<i64> = redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg(&event.event_id)
                    .query_async(c)
                    .await;
            }
            // Durable before the next XADD: after a crash, only this event
            // (XADDed, removal not yet durable) can be sent again.
            let (m, k) = (meta.clone(), key.clone());
            let removed = tokio::task::spawn_blocking(move || {
                m.apply(vec![event_delete_op(&k)])?;
                m.flush()
            })
            .await;
            match removed {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    warn!("removing a delivered event from the outbox failed: {e}");
                    break;
                }
                Err(e) => {
                    warn!("removing a delivered event from the outbox panicked: {e}");
                    break;
                }
            }
            stats.published.fetch_add(1, Ordering::Relaxed);
            sent += 1;
        }
        if sent < batch.len() {
            sleep_or_stop(&shutdown, &mut backoff).await;
        } else {
            if warned {
                info!("redis mirror caught up");
            }
            warned = false;
            backoff = Duration::from_millis(100);
        }
    }
}

async fn sleep_or_stop(shutdown: &CancellationToken, backoff: &mut Duration) {
    tokio::select! {
        _ = tokio::time::sleep(*backoff) => {}
        _ = shutdown.cancelled() => {}
    }
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
}
