//! Scheduled events (`/metadata/scheduledevents?api-version=2020-07-01`):
//! maintenance and eviction notices for this VM.
//!
//! <https://learn.microsoft.com/azure/virtual-machines/linux/scheduled-events>.
//! The document carries a `DocumentIncarnation` that changes whenever the
//! events change; the events list every VM of the availability or scale set,
//! so the agent picks out those whose `Resources` name its own VM.

use std::time::{Duration, SystemTime};

use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::date::{InvalidDate, parse_event_time};
use super::{ImdsClient, ImdsError, RetryPolicy, wire};

/// The api-version used for scheduled events.
pub const EVENTS_API_VERSION: &str = "2020-07-01";

/// Microsoft recommends polling about once a second: a preemption may come
/// with only 30 s notice.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The scheduled-events document.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ScheduledEvents {
    /// Changes whenever `Events` changes.
    #[serde(rename = "DocumentIncarnation", deserialize_with = "wire::i64_or_zero")]
    pub document_incarnation: i64,
    /// All current events; empty when none is scheduled.
    #[serde(rename = "Events", default)]
    pub events: Vec<ScheduledEvent>,
}

/// What an event will do to the VM.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub enum EventType {
    /// A pause of a few seconds; memory is kept.
    Freeze,
    /// A reboot; memory is lost.
    Reboot,
    /// A move to another host; ephemeral disks are lost.
    Redeploy,
    /// A spot VM is being evicted.
    Preempt,
    /// The VM is being deleted.
    Terminate,
    /// A type this agent does not know.
    #[serde(other)]
    Unknown,
}

impl EventType {
    /// The least notice Azure documents for this type, from when the event
    /// appears to when it may start: Freeze and Reboot 15 minutes, Redeploy
    /// 10, Preempt 30 seconds, Terminate 5 (it is configurable from 5 to 15).
    /// `None` for a type this agent does not know.
    ///
    /// <https://learn.microsoft.com/azure/virtual-machines/linux/scheduled-events#event-scheduling>.
    pub fn minimum_notice(&self) -> Option<Duration> {
        let minutes = |m: u64| Some(Duration::from_secs(m * 60));
        match self {
            EventType::Freeze | EventType::Reboot => minutes(15),
            EventType::Redeploy => minutes(10),
            EventType::Preempt => Some(Duration::from_secs(30)),
            EventType::Terminate => minutes(5),
            EventType::Unknown => None,
        }
    }
}

/// Where an event is in its life.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub enum EventStatus {
    /// Will start after `NotBefore`, or once acknowledged.
    Scheduled,
    /// Has started; the event disappears from the document when it is over.
    Started,
    /// A status this agent does not know.
    #[serde(other)]
    Unknown,
}

/// One scheduled event.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ScheduledEvent {
    /// Globally unique id; acknowledge with it.
    #[serde(deserialize_with = "wire::string")]
    pub event_id: String,
    /// What will happen.
    pub event_type: EventType,
    /// `VirtualMachine`.
    #[serde(default, deserialize_with = "wire::string")]
    pub resource_type: String,
    /// Names of the VMs affected.
    #[serde(default)]
    pub resources: Vec<String>,
    /// Scheduled or started.
    pub event_status: EventStatus,
    /// The time before which the event will not start, in RFC 1123 (what
    /// Azure documents) or RFC 3339 (what Microsoft's mock server sends);
    /// `""` once started. See [`ScheduledEvent::not_before_time`].
    #[serde(default, deserialize_with = "wire::string")]
    pub not_before: String,
    /// Human-readable description.
    #[serde(default, deserialize_with = "wire::string")]
    pub description: String,
    /// `Platform` or `User`.
    #[serde(default, deserialize_with = "wire::string")]
    pub event_source: String,
    /// Expected interruption in seconds; -1 when unknown, 0 when none.
    #[serde(default, deserialize_with = "wire::opt_i64")]
    pub duration_in_seconds: Option<i64>,
}

impl ScheduledEvent {
    /// Whether the event names the VM called `vm_name`.
    pub fn affects(&self, vm_name: &str) -> bool {
        self.resources
            .iter()
            .any(|r| r.eq_ignore_ascii_case(vm_name))
    }

    /// `NotBefore` read as RFC 1123 or RFC 3339: `Ok(None)` when blank (a
    /// started event has none), an error when it is neither, so that a
    /// caller never mistakes an unreadable date for "now".
    pub fn not_before_time(&self) -> Result<Option<SystemTime>, InvalidDate> {
        if self.not_before.trim().is_empty() {
            return Ok(None);
        }
        parse_event_time(&self.not_before).map(Some)
    }
}

/// A change of the document, seen by a [`ScheduledEventsWatcher`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventsUpdate {
    /// The new `DocumentIncarnation`.
    pub incarnation: i64,
    /// The events that name this VM (possibly none: events ended).
    pub events: Vec<ScheduledEvent>,
}

/// Polls scheduled events and reports each new incarnation.
///
/// Its requests are retried by the client's policy with every wait cut to
/// the poll interval ([`RetryPolicy::capped`]): while IMDS fails the watcher
/// still asks about once an interval (well under IMDS's 5 requests a
/// second), so it sees the first good answer within an interval of IMDS
/// recovering, not at the end of a 16 s backoff step. A preemption gives only
/// 30 s of notice.
pub struct ScheduledEventsWatcher {
    client: ImdsClient,
    vm_name: String,
    last_incarnation: Option<i64>,
    retry: RetryPolicy,
}

impl ScheduledEventsWatcher {
    /// A watcher for the VM called `vm_name` (instance metadata `compute.name`).
    pub fn new(client: ImdsClient, vm_name: &str) -> Self {
        let retry = client.retry_policy().capped(DEFAULT_POLL_INTERVAL);
        Self {
            client,
            vm_name: vm_name.to_owned(),
            last_incarnation: None,
            retry,
        }
    }

    /// Fetches the document once; `Some` when its incarnation is new (the
    /// first poll always reports).
    pub async fn poll(&mut self) -> Result<Option<EventsUpdate>, ImdsError> {
        let doc = self.client.scheduled_events_with(&self.retry).await?;
        if self.last_incarnation == Some(doc.document_incarnation) {
            return Ok(None);
        }
        self.last_incarnation = Some(doc.document_incarnation);
        let events: Vec<ScheduledEvent> = doc
            .events
            .into_iter()
            .filter(|e| e.affects(&self.vm_name))
            .collect();
        tracing::debug!(
            incarnation = doc.document_incarnation,
            events = events.len(),
            vm = %self.vm_name,
            "imds scheduled events changed"
        );
        Ok(Some(EventsUpdate {
            incarnation: doc.document_incarnation,
            events,
        }))
    }

    /// The `imds-scheduled-events` task: polls every `interval` and sends each
    /// update to `updates` until `shutdown` is cancelled or the receiver is
    /// gone. Failures are logged and polling goes on at the same cadence.
    pub async fn run(
        mut self,
        interval: Duration,
        updates: mpsc::Sender<EventsUpdate>,
        shutdown: CancellationToken,
    ) {
        self.retry = self.client.retry_policy().capped(interval);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let polled = tokio::select! {
                () = shutdown.cancelled() => return,
                polled = self.poll() => polled,
            };
            match polled {
                Ok(Some(update)) => {
                    if updates.send(update).await.is_err() {
                        return;
                    }
                }
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(error = %drover_api::error::chain(&error), "imds scheduled events poll failed");
                }
            }
        }
    }
}
