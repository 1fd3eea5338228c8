//! The `imds-instance` task: this VM's instance metadata when IMDS did not
//! give it before the daemon started (IMDS answers 410 for a while when it
//! is being updated, and Microsoft says to retry for up to 70 s).
//!
//! Reads: IMDS instance metadata, round after round of the client's retry
//! policy, until it answers or the `io` token fires. Writes, once it
//! answers: the VM to [`LateVm`] (which the inventory source reads), the
//! VM's name to the `maintenance` task (oneshot), so that scheduled events
//! are watched from then on, `Input::Vm` to the reconciler (mpsc 64) for
//! the parts it starts later, and one heartbeat carrying the node's address
//! and inventory to the control plane.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_api::wire::HeartbeatRequest;
use drover_imds::{ImdsClient, InstanceMetadata};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{Input, InventorySource};
use crate::control_client::{Backoff, ControlClient};
use crate::inventory::VmInfo;

/// The node's IMDS, as `drover-agent run` found it.
#[derive(Clone)]
pub struct NodeImds {
    /// The client.
    pub client: ImdsClient,
    /// What the instance metadata said before the daemon started; `None`
    /// when IMDS did not answer in time: the daemon then keeps asking in
    /// the background and reports the VM when it answers.
    pub vm: Option<VmFacts>,
    /// The node's address is to be IMDS's (no `--ip` was given), so a late
    /// answer replaces the address it registered with.
    pub address_from_imds: bool,
}

/// What the agent takes from its VM's instance metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmFacts {
    /// The VM as the inventory reports it; scheduled events name it by
    /// `name` (`compute.name`).
    pub vm: VmInfo,
    /// False on spot and low-priority VMs.
    pub dedicated: bool,
    /// Its first private IPv4 address.
    pub ip: Option<String>,
}

impl VmFacts {
    /// The facts in `m`.
    pub fn from_metadata(m: &InstanceMetadata) -> Self {
        let c = &m.compute;
        VmFacts {
            vm: VmInfo {
                vm_id: c.vm_id.clone(),
                name: c.name.clone(),
                vm_size: c.vm_size.clone(),
                location: c.location.clone(),
                priority: c.priority_raw.clone(),
                vm_scale_set_name: c.vm_scale_set_name.clone(),
                resource_id: c.resource_id.clone(),
            },
            dedicated: !c.priority().is_preemptible(),
            ip: m.private_ipv4().first().map(ToString::to_string),
        }
    }
}

/// The VM learnt after start, for inventories whose collector was opened
/// without it.
#[derive(Clone, Default)]
pub(super) struct LateVm(Arc<Mutex<Option<VmInfo>>>);

impl LateVm {
    /// `source`, with the VM filled in once it is known.
    pub(super) fn overlay(&self, source: InventorySource) -> InventorySource {
        let late = self.clone();
        Arc::new(move || {
            let mut inv = source();
            if inv.vm.is_none() {
                inv.vm = late.get();
            }
            inv
        })
    }

    fn get(&self) -> Option<VmInfo> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, vm: VmInfo) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(vm);
    }
}

/// What the `imds-instance` task needs.
pub(super) struct InstanceCtx {
    pub(super) imds: ImdsClient,
    pub(super) address_from_imds: bool,
    pub(super) control: ControlClient,
    pub(super) inventory: InventorySource,
    pub(super) late: LateVm,
    pub(super) input: mpsc::Sender<Input>,
    pub(super) vm_name: oneshot::Sender<String>,
    pub(super) io: CancellationToken,
}

/// The `imds-instance` task (see the module's documentation).
pub(super) async fn instance_task(ctx: InstanceCtx) {
    let Some(facts) = read_until_answered(&ctx.imds, &ctx.io).await else {
        return;
    };
    tracing::info!(
        vm = %facts.vm.name, ip = ?facts.ip, dedicated = facts.dedicated,
        "instance metadata arrived"
    );
    ctx.late.set(facts.vm.clone());
    // An empty name is the maintenance task's to report.
    let _ = ctx.vm_name.send(facts.vm.name.clone());
    let _ = ctx
        .input
        .send(Input::Vm {
            dedicated: facts.dedicated,
        })
        .await;
    let inventory = ctx.inventory.clone();
    let inv = match tokio::task::spawn_blocking(move || inventory()).await {
        Ok(inv) => Some(inv),
        Err(e) => {
            tracing::error!(error = %e, "inventory refresh panicked");
            None
        }
    };
    let beat = HeartbeatRequest {
        ip: facts.ip.filter(|_| ctx.address_from_imds),
        inventory: inv,
        ..HeartbeatRequest::default()
    };
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let answer = tokio::select! {
            answer = ctx.control.heartbeat(&beat) => answer,
            () = ctx.io.cancelled() => return,
        };
        match answer {
            Ok(_) => {
                tracing::info!(ip = ?beat.ip, "node address and vm reported");
                return;
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(
                    error = %e, retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    "reporting the node's vm failed"
                );
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = ctx.io.cancelled() => return,
                }
            }
        }
    }
}

/// Instance metadata, asked for with the client's retry policy; when a
/// round gives up, again after the policy's longest wait. `None` when `io`
/// fires first.
async fn read_until_answered(imds: &ImdsClient, io: &CancellationToken) -> Option<VmFacts> {
    let pause = imds
        .retry_policy()
        .delays
        .iter()
        .max()
        .copied()
        .unwrap_or(Duration::from_secs(1));
    loop {
        let answer = tokio::select! {
            answer = imds.instance_metadata() => answer,
            () = io.cancelled() => return None,
        };
        match answer {
            Ok(m) => return Some(VmFacts::from_metadata(&m)),
            Err(e) => tracing::warn!(
                error = %drover_api::error::chain(&e),
                retry_in_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX),
                "instance metadata still unavailable"
            ),
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = io.cancelled() => return None,
        }
    }
}
