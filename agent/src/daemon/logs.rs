//! The `log-shipper` task: part output to the control plane in batches.
//!
//! Reads: `Ship` items from the part supervisors (mpsc 4096): lines, and
//! flush requests that are answered once every line before them is
//! uploaded, so a part's final state never overtakes its logs; the `io`
//! token. Writes: the control plane (`POST` logs).

use std::time::Duration;

use drover_api::wire::LogBatch;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Ship;
use crate::control_client::{Backoff, ControlClient};

/// The `log-shipper` task: uploads lines in batches of at most
/// [`MAX_BATCH`], retrying with backoff while the server is unreachable.
pub(super) async fn ship_task(
    client: ControlClient,
    mut rx: mpsc::Receiver<Ship>,
    io: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    // A line that did not fit the last batch starts the next one.
    let mut carry: Option<Ship> = None;
    loop {
        let first = match carry.take() {
            Some(item) => item,
            None => tokio::select! {
                item = rx.recv() => match item { Some(i) => i, None => return },
                _ = io.cancelled() => return,
            },
        };
        let mut lines = Vec::new();
        let mut bytes = 0;
        let mut flushes = Vec::new();
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                Ship::Line(l) => {
                    // The server reads at most MAX_REQUEST_BYTES per body.
                    let size = serde_json::to_vec(&l).map_or(0, |v| v.len()) + 1;
                    if !lines.is_empty() && bytes + size > MAX_BATCH_BYTES {
                        carry = Some(Ship::Line(l));
                        break;
                    }
                    bytes += size;
                    lines.push(l);
                }
                Ship::Flush(f) => flushes.push(f),
            }
            if lines.len() >= MAX_BATCH {
                break;
            }
            next = rx.try_recv().ok();
        }
        while !lines.is_empty() {
            let batch = LogBatch { lines };
            let r = tokio::select! {
                r = client.upload_logs(&batch) => r,
                _ = io.cancelled() => return,
            };
            lines = batch.lines;
            match r {
                Ok(answer) => {
                    backoff.reset();
                    lines.clear();
                    if !answer.rejected.is_empty() {
                        // A superseded attempt: the heartbeat stops it too.
                        tracing::info!(parts = ?answer.rejected, "the control plane refused lines of superseded attempts");
                    }
                }
                Err(e) if !e.is_transient() => {
                    // A refused batch (e.g. a part the server ended) is dropped.
                    tracing::warn!(error = %e, lines = lines.len(), "log batch refused");
                    lines.clear();
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "uploading logs failed");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = io.cancelled() => return,
                    }
                }
            }
        }
        for f in flushes {
            let _ = f.send(());
        }
    }
}

/// Lines per log upload.
pub const MAX_BATCH: usize = 500;

/// Bytes of one upload's lines as JSON: a quarter of the server's body limit.
pub const MAX_BATCH_BYTES: usize = drover_api::wire::MAX_REQUEST_BYTES / 4;

/// Bytes of one log line kept; the rest is cut.
pub const MAX_LINE_BYTES: usize = 16 * 1024;
