//! The compression pool: rotated `.log` files are gzipped off the ingest
//! path, at most `LOGD_COMPRESSION_WORKERS` at a time, each on a thread of
//! its own at idle priority. Jobs come from the writers (a bounded queue,
//! [`super::COMPRESS_QUEUE_MAX`]) and, at start and every sweep interval,
//! from the store (jobs that did not fit the queue or were left by a
//! crash). Each job is [`run_compression`], which is idempotent and reads
//! its job from the store, so a job taken twice runs once.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};
use tracing::{debug, error};

use super::WriterConfig;
use store::CompressJob;
use store::{CompressionRun, run_compression};

/// The stored jobs a sweep starts, in the order it starts them: those not
/// running already, by session and first seq. The store keeps them by name,
/// which within one second is not seq order (`…10-10.log` < `…9-9.log`); a
/// session's `compressed` events must go out in seq order.
pub fn sweep_order(stored: Vec<CompressJob>, in_flight: &std::collections::HashSet<String>) -> Vec<CompressJob> {
    let mut fresh: Vec<CompressJob> = stored
        .into_iter()
        .filter(|j| !in_flight.contains(&j.rotation.to))
        .collect();
    fresh.sort_by(|a, b| {
        (&a.rotation.session, a.rotation.stats.first_seq).cmp(&(&b.rotation.session, b.rotation.stats.first_seq))
    });
    fresh
}

/// Runs compression jobs, at most `workers` at a time, off the ingest path.
/// Jobs come from the writers and, at start and every minute, from the
/// store (jobs that did not fit the queue or were left by a crash).
/// Stops when `stop` is cancelled (after the writers are done).
pub async fn run_compression_pool(
    cfg: WriterConfig,
    mut jobs: mpsc::Receiver<CompressJob>,
    workers: usize,
    sweep_interval: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(workers.max(1)));
    let mut sweep = tokio::time::interval(sweep_interval);
    let mut in_flight: std::collections::HashSet<String> = std::collections::HashSet::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<String>();
    loop {
        let job = tokio::select! {
                        j = jobs.recv() => match j { Some(j) => j, None => break },
            _ = stop.cancelled() => break,
            Some(name) = done_rx.recv() => { in_flight.remove(&name); continue; }
            _ = sweep.tick() => {
                let stored = cfg.settings.meta.compress_jobs().unwrap_or_default();
                let fresh = sweep_order(stored, &in_flight);
                cfg.settings.stats.compress_backlog.store((fresh.len() + in_flight.len()) as u64, Ordering::Relaxed);
                // A sweep may start hundreds of jobs (a backlog left by a
                // crash), each waiting for a worker: shutdown must not wait
                // for all of them (those not started stay in the store).
                for j in fresh {
                    tokio::select! {
                        () = start_job(&cfg, &slots, &mut in_flight, &done_tx, j) => {}
                        () = stop.cancelled() => break,
                    }
                }
                continue;
            }
        };
        if in_flight.contains(&job.rotation.to) {
            // The sweep took it first; it runs once.
            cfg.settings
                .stats
                .compress_backlog
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(1)))
                .ok();
        } else {
            // May have been run (and finished) by the sweep meanwhile:
            // `run_compression` then finds no job in the store and does nothing.
            start_job(&cfg, &slots, &mut in_flight, &done_tx, job).await;
        }
    }
    // Let running jobs finish (the rest stay in the store for next start).
    let _ = slots.acquire_many(workers.max(1) as u32).await;
}

async fn start_job(
    cfg: &WriterConfig,
    slots: &Arc<Semaphore>,
    in_flight: &mut std::collections::HashSet<String>,
    done_tx: &mpsc::UnboundedSender<String>,
    job: CompressJob,
) {
    let permit = slots.clone().acquire_owned().await.expect("pool semaphore open");
    in_flight.insert(job.rotation.to.clone());
    let (cfg, done_tx) = (cfg.clone(), done_tx.clone());
    // A thread of its own at idle priority: compression uses only CPU that
    // ingest leaves over, and when there is none the files wait as `.log`
    // (the backlog metric shows it) instead of slowing acks down.
    let spawned = std::thread::Builder::new().name("logd-gzip".into()).spawn(move || {
        lower_to_idle_priority();
        let name = job.rotation.to.clone();
        match run_compression(
            cfg.settings.fs.as_ref(),
            &cfg.settings.log_dir,
            cfg.settings.meta.as_ref(),
            cfg.settings.life,
            &name,
        ) {
            Ok(CompressionRun::NoJob) => {}
            Ok(CompressionRun::Finished(c)) => {
                let s = &cfg.settings.stats;
                s.compressed_files.fetch_add(1, Ordering::Relaxed);
                s.compress_bytes_in.fetch_add(c.bytes_in, Ordering::Relaxed);
                s.compress_bytes_out.fetch_add(c.bytes_out, Ordering::Relaxed);
                if cfg.settings.life.events {
                    cfg.events_added.notify_one();
                }
            }
            Err(e) => error!(
                file = name,
                "compression failed: {e}; the .log stays and is retried later"
            ),
        }
        let _ = cfg
            .settings
            .stats
            .compress_backlog
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(1)));
        let _ = done_tx.send(name);
        drop(permit);
    });
    if let Err(e) = spawned {
        error!("cannot start a compression thread: {e}; the job stays in the store");
    }
}

/// Moves the calling thread to `SCHED_IDLE` (Linux): it runs only when no
/// other thread wants the CPU.
fn lower_to_idle_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` outlives the call.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if rc != 0 {
        debug!("SCHED_IDLE not available: {}", std::io::Error::last_os_error());
    }
}
