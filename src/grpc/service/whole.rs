//! Whole-call submission, for calls that cannot tell the client which of
//! their frames were kept (an OTLP export answers all or nothing: a failed
//! export is retried whole). Admission is taken for every frame of the call
//! at once, before anything reaches the commit thread, so a refusal
//! (overload, low disk) leaves nothing behind that a retry would duplicate.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use prost::Message;
use tonic::Status;

use super::{
    BUDGET_UNIT_BYTES, CHUNK_BYTES_MAX, CHUNK_FRAMES_MAX, Chunk, StreamIngest, admit, resource_exhausted, session_runs,
    submit_frames,
};
use crate::pb::{LogFrame, Rejection};

impl StreamIngest {
    /// Rejects the next item of the call without a frame (it could not
    /// become one, e.g. an OTLP record naming no session): `rule` is the
    /// metric label, `reason` what the client sees.
    pub(crate) fn reject(&mut self, rule: &'static str, reason: String) {
        let index = self.next_index;
        self.next_index += 1;
        self.shared.metrics.frames_received.inc();
        self.shared.stats.rejected.fetch_add(1, Ordering::Relaxed);
        self.shared.metrics.frames_rejected.with_label_values(&[rule]).inc();
        self.building_rejections.push(Rejection { index, reason });
    }

    /// Hands every frame built to the commit thread, in chunks, after taking
    /// the admission budget for all of them at once: on Err nothing was
    /// submitted (unless the server is shutting down), so a caller that
    /// cannot say which frames were kept (an OTLP export) is retried whole
    /// without duplicates.
    pub(crate) async fn submit_whole(&mut self) -> Result<(), Status> {
        let (frames, indices) = (
            std::mem::take(&mut self.building),
            std::mem::take(&mut self.building_indices),
        );
        self.building_bytes = 0;
        let mut chunks: Vec<(Vec<LogFrame>, Vec<i64>, u32)> = Vec::new();
        let mut bytes = 0;
        for (frame, index) in frames.into_iter().zip(indices) {
            if chunks
                .last()
                .is_none_or(|c| c.0.len() >= CHUNK_FRAMES_MAX || bytes >= CHUNK_BYTES_MAX)
            {
                chunks.push((Vec::new(), Vec::new(), 0));
                bytes = 0;
            }
            let chunk = chunks.last_mut().expect("pushed above");
            bytes += frame.encoded_len();
            chunk.2 = bytes.div_ceil(BUDGET_UNIT_BYTES).max(1) as u32;
            chunk.0.push(frame);
            chunk.1.push(index);
        }
        let units_total: u64 = chunks.iter().map(|c| u64::from(c.2)).sum();
        if !chunks.is_empty() {
            if self.shared.disk_low.load(Ordering::Relaxed) {
                self.shared.metrics.errors.with_label_values(&["disk_low"]).inc();
                return Err(resource_exhausted(
                    "free disk space is below the watermark (LOGD_DISK_FREE_MIN_*); nothing of this call was accepted"
                        .into(),
                    Duration::from_secs(5),
                ));
            }
            if units_total > u64::from(self.shared.budget_units_total) {
                return Err(Status::invalid_argument(format!(
                    "this call's frames take {units_total} KiB, more than LOGD_INFLIGHT_BYTES_MAX ({} KiB): \
                     nothing was accepted; send smaller batches",
                    self.shared.budget_units_total
                )));
            }
            admit(&self.shared, units_total as u32, "nothing of this call was accepted").await?;
        }
        let mut unsubmitted = units_total as usize;
        let rejections = std::mem::take(&mut self.building_rejections);
        for (frames, indices, units) in chunks {
            let runs = session_runs(&frames);
            let end_index = indices.last().map_or(self.next_index, |i| i + 1);
            let Some(rx) = submit_frames(&self.shared, frames, units) else {
                self.shared.budget.add_permits(unsubmitted);
                return Err(Status::unavailable("server is shutting down"));
            };
            unsubmitted -= units as usize;
            let (rejections, submitted) = (Vec::new(), Instant::now());
            self.pending.push_back(Chunk {
                end_index,
                runs,
                indices,
                rejections,
                reply: Some(rx),
                submitted,
            });
        }
        // Rejections settle with the last chunk (listed in index order).
        let (end_index, submitted) = (self.next_index, Instant::now());
        match self.pending.back_mut() {
            Some(last) => last.rejections.extend(rejections),
            None if !rejections.is_empty() => self.pending.push_back(Chunk {
                end_index,
                runs: Vec::new(),
                indices: Vec::new(),
                rejections,
                reply: None,
                submitted,
            }),
            None => {}
        }
        Ok(())
    }
}
