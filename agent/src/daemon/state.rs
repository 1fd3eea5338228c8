//! The state the tasks share behind mutexes rather than channels, because
//! its readers want the latest value, not every change.
//!
//! - `Reports` (`SharedReports`): written by the `reconciler` (ended
//!   parts) and the part supervisors (live states), read and cleared by the
//!   `heartbeat`, which is woken through `Reports::changed`.
//! - `HealthyGpus`: written by `run` and every `heartbeat`, read by a part
//!   supervisor when it picks its GPUs.
//! - `Contact`: when the control plane was last heard from (or known to be
//!   down), written by the `heartbeat`, read by the `fence` task.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use drover_api::wire::PartState;

use crate::inventory::{GpuHealth, Inventory};
use drover_api::wire::PartKey;

/// A part's final state, kept until the server accepts it.
#[derive(Debug, Clone)]
pub(super) struct Ended {
    pub(super) state: PartState,
    pub(super) exit_code: Option<i64>,
    pub(super) container: Option<String>,
}

/// What heartbeats report: live part states and ended parts not yet acked.
#[derive(Debug, Default)]
pub(super) struct Reports {
    pub(super) live: BTreeMap<PartKey, PartState>,
    pub(super) ended: BTreeMap<PartKey, Ended>,
    /// Wakes the heartbeat when a part changes state, so that the server
    /// (and the user) learn of a start or an end at once, not a heartbeat
    /// interval later.
    pub(super) changed: Arc<tokio::sync::Notify>,
}

impl Reports {
    pub(super) fn set_live(&mut self, part: PartKey, state: PartState) {
        if self.live.insert(part, state) != Some(state) {
            self.changed.notify_one();
        }
    }

    pub(super) fn end(&mut self, part: PartKey, ended: Ended) {
        self.live.remove(&part);
        self.ended.insert(part, ended);
        self.changed.notify_one();
    }
}

pub(super) type SharedReports = Arc<Mutex<Reports>>;

/// When the control plane last answered a heartbeat, or last refused the
/// connection (it was down, so it could not requeue this node's work).
pub(super) type Contact = Arc<Mutex<std::time::Instant>>;

/// UUIDs of the GPUs that are healthy now, refreshed by every heartbeat.
pub(super) type HealthyGpus = Arc<Mutex<Vec<String>>>;

pub(super) fn healthy_uuids(inv: &Inventory) -> Vec<String> {
    inv.gpus
        .iter()
        .filter(|g| matches!(g.health, GpuHealth::Healthy))
        .filter_map(|g| g.uuid.clone())
        .collect()
}

pub(super) fn lock(r: &SharedReports) -> std::sync::MutexGuard<'_, Reports> {
    // A panic while holding this lock leaves plain data behind; keep going.
    r.lock().unwrap_or_else(|e| e.into_inner())
}
