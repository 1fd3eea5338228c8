//! The `heartbeat` task: node and part states to the control plane.
//!
//! Reads: `Reports` (live and ended parts; woken by `Reports::changed`), the
//! drain and preemption flags, the inventory, beat-now requests from the
//! reconciler (mpsc 4, each answered once its beat is done), the `io` token.
//! Writes: the control plane (`POST` heartbeat), `HealthyGpus`, the metrics,
//! and `Input::Acked`/`Input::Rejected` to the reconciler (mpsc 64).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use drover_api::cluster::NodeState;
use drover_api::wire::{HeartbeatRequest, PartStatus};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::credentials::{RegisterError, register};
use super::state::{Contact, HealthyGpus, SharedReports, healthy_uuids, lock};
use super::{DaemonConfig, Input, InventorySource, gpu_counts};
use crate::control_client::{ClientError, ControlClient};
use crate::metrics::Metrics;
use drover_api::wire::PartKey;

pub(super) struct HeartbeatCtx {
    pub(super) client: ControlClient,
    pub(super) config: DaemonConfig,
    pub(super) interval: Duration,
    pub(super) reports: SharedReports,
    pub(super) draining: Arc<AtomicBool>,
    pub(super) preempted: Arc<AtomicBool>,
    pub(super) inventory: InventorySource,
    pub(super) input: mpsc::Sender<Input>,
    pub(super) now: mpsc::Receiver<oneshot::Sender<()>>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) gpus: HealthyGpus,
    pub(super) contact: Contact,
    pub(super) io: CancellationToken,
}

/// The node state a beat asks for: `preempted` once the VM is going away,
/// `leaving` while draining, `idle` to come back after a drain that ended
/// without the agent exiting, else none (the server's own view stands).
fn requested_state(preempted: bool, draining: bool, back: bool) -> Option<NodeState> {
    if preempted {
        Some(NodeState::Preempted)
    } else if draining {
        Some(NodeState::Leaving)
    } else if back {
        Some(NodeState::Idle)
    } else {
        None
    }
}

/// The `heartbeat` task: every interval (or at once when asked) sends GPU
/// health, the drain state and every part state; accepted final states go
/// back to the reconciler so their containers can be removed.
pub(super) async fn heartbeat_task(mut ctx: HeartbeatCtx) {
    let mut tick = tokio::time::interval(ctx.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let changed = Arc::clone(&lock(&ctx.reports).changed);
    let mut last_gpus = None;
    // Whether the last beat said `leaving`, and whether the node must say it
    // is back (a drain that ended without the agent exiting: the events it
    // drained for were cancelled).
    let (mut said_leaving, mut back) = (false, false);
    loop {
        let done = tokio::select! {
            _ = tick.tick() => None,
            _ = changed.notified() => None,
            Some(ack) = ctx.now.recv() => Some(ack),
            _ = ctx.io.cancelled() => return,
        };
        let inv = {
            let source = ctx.inventory.clone();
            match tokio::task::spawn_blocking(move || source()).await {
                Ok(inv) => Some(inv),
                Err(e) => {
                    tracing::error!(error = %e, "inventory refresh panicked");
                    None
                }
            }
        };
        let gpus = inv.as_ref().map(gpu_counts);
        if let Some(inv) = &inv {
            ctx.metrics.observe_gpus(inv);
            *ctx.gpus.lock().unwrap_or_else(|e| e.into_inner()) = healthy_uuids(inv);
        }
        let (parts, ended): (Vec<PartStatus>, Vec<(PartKey, Option<String>)>) = {
            let r = lock(&ctx.reports);
            let status = |p: &PartKey, state, exit_code| PartStatus {
                part: p.clone(),
                state,
                exit_code,
            };
            let mut parts: Vec<PartStatus> =
                r.live.iter().map(|(p, s)| status(p, *s, None)).collect();
            parts.extend(r.ended.iter().map(|(p, e)| status(p, e.state, e.exit_code)));
            let ended = r
                .ended
                .iter()
                .map(|(p, e)| (p.clone(), e.container.clone()))
                .collect();
            (parts, ended)
        };
        ctx.metrics.observe_parts(&parts);
        let draining = ctx.draining.load(Ordering::Relaxed);
        back |= said_leaving && !draining;
        said_leaving = draining;
        let state = requested_state(ctx.preempted.load(Ordering::Relaxed), draining, back);
        let mut req = HeartbeatRequest {
            state,
            ip: None,
            gpus: if gpus != last_gpus { gpus } else { None },
            // The whole document only when what scheduling reads changed.
            inventory: if gpus != last_gpus && last_gpus.is_some() {
                inv.clone()
            } else {
                None
            },
            parts,
        };
        let started = Instant::now();
        let mut answer = tokio::select! {
            r = ctx.client.heartbeat(&req) => r,
            _ = ctx.io.cancelled() => return,
        };
        if back {
            match &answer {
                // Back in service.
                Ok(_) => back = false,
                // Refused while the node still holds a job: send the beat
                // without the state now, ask again next time.
                Err(ClientError::Rejected { status: 400, .. }) => {
                    req.state = None;
                    answer = tokio::select! {
                        r = ctx.client.heartbeat(&req) => r,
                        _ = ctx.io.cancelled() => return,
                    };
                }
                Err(_) => {}
            }
        }
        ctx.metrics
            .heartbeat_latency
            .observe(started.elapsed().as_secs_f64());
        let heard = match &answer {
            Ok(_) => true,
            Err(e) => e.is_refused() || !e.is_transient(),
        };
        if heard {
            *ctx.contact.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        }
        match answer {
            Ok(resp) => {
                last_gpus = gpus;
                {
                    let mut r = lock(&ctx.reports);
                    for (p, _) in &ended {
                        r.ended.remove(p);
                    }
                }
                if !ended.is_empty() {
                    let _ = ctx.input.send(Input::Acked(ended)).await;
                }
                if !resp.rejected.is_empty() {
                    let _ = ctx.input.send(Input::Rejected(resp.rejected)).await;
                }
            }
            Err(e) if e.is_unauthorized() => {
                // The control plane forgot this node (its store was reset or
                // the node removed): join again; the next watch then tells
                // which of the running parts still count.
                ctx.metrics.heartbeat_failures.inc();
                tracing::warn!(node = %ctx.config.node_id, "node credential refused; registering again");
                if let Some(inv) = &inv {
                    match register(&ctx.config, inv, &ctx.client).await {
                        Ok(_) => tracing::info!(node = %ctx.config.node_id, "registered again"),
                        Err(RegisterError::Client(e)) => {
                            tracing::warn!(error = %e, "registering again failed")
                        }
                        Err(RegisterError::Fatal(e)) => {
                            tracing::error!(error = %e, "registering again failed")
                        }
                    }
                }
            }
            Err(e) => {
                ctx.metrics.heartbeat_failures.inc();
                tracing::warn!(error = %e, "heartbeat failed");
            }
        }
        if let Some(ack) = done {
            let _ = ack.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_a_beat_asks_for() {
        assert_eq!(
            requested_state(true, true, false),
            Some(NodeState::Preempted)
        );
        assert_eq!(
            requested_state(false, true, false),
            Some(NodeState::Leaving)
        );
        assert_eq!(requested_state(false, false, true), Some(NodeState::Idle));
        assert_eq!(requested_state(false, false, false), None);
    }
}
