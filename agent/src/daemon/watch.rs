//! The `watch` task: the assignments long poll.
//!
//! Reads: the control plane (`GET` assignments, through `ControlClient`),
//! the `io` token. Writes: `Input::Desired` to the reconciler (mpsc 64).

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Input;
use crate::control_client::{Backoff, ControlClient};

/// The `watch` task: long-polls assignments with the last version seen and
/// hands every answer to the reconciler.
pub(super) async fn watch_task(
    client: ControlClient,
    wait: Duration,
    input: mpsc::Sender<Input>,
    io: CancellationToken,
) {
    let mut version = 0;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let answer = tokio::select! {
            r = client.assignments(version, wait) => r,
            _ = io.cancelled() => return,
        };
        match answer {
            Ok(a) => {
                backoff.reset();
                version = a.version;
                tracing::debug!(version, parts = a.parts.len(), "assignments");
                if input.send(Input::Desired(a)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "watching assignments failed");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = io.cancelled() => return,
                }
            }
        }
    }
}
