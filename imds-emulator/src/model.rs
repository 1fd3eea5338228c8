//! What the emulator is configured with: VMs, identities, events and faults.
//!
//! These types are the emulator's Rust API and, through serde, the JSON body of
//! its admin HTTP API (`/drover-emulator/...`).

use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Settings that apply to the whole emulator.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// Requests per second allowed per VM on the general endpoints (Azure: 5).
    /// `None` disables the limit (benchmarks).
    ///
    /// <https://learn.microsoft.com/azure/virtual-machines/instance-metadata-service#rate-limiting>
    pub general_rate_limit: Option<u32>,
    /// Requests per second allowed per VM on the identity endpoint (Azure: 20).
    pub identity_rate_limit: Option<u32>,
    /// Lifetime of issued access tokens (Azure managed-identity tokens: about 24 h).
    pub token_lifetime: Duration,
    /// Tenant id written into tokens (`tid`, and the `iss` URL).
    pub tenant_id: String,
    /// Serve the admin API under [`ADMIN_PREFIX`]. A local cluster that lets
    /// untrusted code reach the emulator turns this off and drives the emulator
    /// through the Rust API instead.
    pub admin_api: bool,
}

/// Path prefix of the emulator's own admin API, chosen so that it can never
/// collide with an IMDS path (all of which start with `/metadata`).
pub const ADMIN_PREFIX: &str = "/drover-emulator";

impl Default for EmulatorConfig {
    fn default() -> Self {
        Self {
            general_rate_limit: Some(5),
            identity_rate_limit: Some(20),
            token_lifetime: Duration::from_secs(24 * 3600),
            tenant_id: "72f988bf-86f1-41af-91ab-2d7cd011db47".to_owned(),
            admin_api: true,
        }
    }
}

/// Azure's VM priority, as IMDS reports it in `compute.priority`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Priority {
    /// A dedicated VM.
    #[default]
    Regular,
    /// A low-priority VM (the older name for spot in VM scale sets).
    Low,
    /// A spot VM, which Azure may preempt with 30 s notice.
    Spot,
}

impl Priority {
    /// The string IMDS writes.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Regular => "Regular",
            Self::Low => "Low",
            Self::Spot => "Spot",
        }
    }
}

/// One managed identity assigned to a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagedIdentity {
    /// The identity's application (client) id: `client_id` in requests, `appid` in tokens.
    pub client_id: String,
    /// The identity's principal (object) id: `object_id` in requests, `oid` in tokens.
    pub object_id: String,
    /// The identity's ARM resource id: `msi_res_id` in requests, `xms_mirid` in tokens.
    pub resource_id: String,
}

impl ManagedIdentity {
    /// A user-assigned identity named `name` with fresh random ids.
    pub fn user_assigned(subscription_id: &str, resource_group: &str, name: &str) -> Self {
        Self {
            client_id: crate::random_uuid(),
            object_id: crate::random_uuid(),
            resource_id: format!(
                "/subscriptions/{subscription_id}/resourcegroups/{resource_group}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
            ),
        }
    }
}

/// A VM the emulator answers for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct VmSpec {
    /// `compute.name`; also the name scheduled events use in `Resources`.
    pub name: String,
    /// `compute.vmId`.
    pub vm_id: String,
    /// `compute.vmSize`, e.g. `Standard_NC24ads_A100_v4`.
    pub vm_size: String,
    /// `compute.location`.
    pub location: String,
    /// `compute.priority`.
    pub priority: Priority,
    /// `compute.evictionPolicy` (`Deallocate` or `Delete` for spot; `""` otherwise).
    pub eviction_policy: String,
    /// `compute.tags` / `compute.tagsList`, in order.
    pub tags: Vec<(String, String)>,
    /// `compute.vmScaleSetName` (`""` outside a scale set).
    pub vm_scale_set_name: String,
    /// `compute.subscriptionId`.
    pub subscription_id: String,
    /// `compute.resourceGroupName`.
    pub resource_group: String,
    /// `compute.zone`.
    pub zone: String,
    /// `compute.userData`, raw; the emulator base64-encodes it as IMDS does.
    pub user_data: String,
    /// `network.interface[0].ipv4.ipAddress[0].privateIpAddress`.
    pub private_ip: String,
    /// The source address this VM's requests come from. `None` means
    /// `private_ip`. A request from an address no VM claims is answered as the
    /// only VM when exactly one is registered.
    pub source_addr: Option<IpAddr>,
    /// The system-assigned identity, if the VM has one.
    pub system_identity: Option<ManagedIdentity>,
    /// User-assigned identities.
    pub user_identities: Vec<ManagedIdentity>,
}

impl Default for VmSpec {
    fn default() -> Self {
        Self::new("drover-vm-0")
    }
}

impl VmSpec {
    /// A regular VM called `name` with a system-assigned identity and fresh ids.
    pub fn new(name: &str) -> Self {
        let subscription_id = "8d10da13-8125-4ba9-a717-bf7490507b3d".to_owned();
        let resource_group = "drover".to_owned();
        Self {
            name: name.to_owned(),
            vm_id: crate::random_uuid(),
            vm_size: "Standard_D4s_v3".to_owned(),
            location: "westeurope".to_owned(),
            priority: Priority::Regular,
            eviction_policy: String::new(),
            tags: Vec::new(),
            vm_scale_set_name: String::new(),
            subscription_id,
            resource_group,
            zone: String::new(),
            user_data: String::new(),
            private_ip: "10.0.0.4".to_owned(),
            source_addr: None,
            system_identity: Some(ManagedIdentity {
                client_id: crate::random_uuid(),
                object_id: crate::random_uuid(),
                resource_id: String::new(),
            }),
            user_identities: Vec::new(),
        }
    }

    /// `compute.resourceId`.
    pub fn resource_id(&self) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachines/{}",
            self.subscription_id, self.resource_group, self.name
        )
    }
}

/// Scheduled-event types, as IMDS spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventType {
    /// A pause of a few seconds (live migration).
    Freeze,
    /// A reboot; memory is lost.
    Reboot,
    /// A move to another host; ephemeral disks are lost.
    Redeploy,
    /// Spot eviction (at least 30 s notice).
    Preempt,
    /// Deletion of the VM.
    Terminate,
}

/// `EventSource` of a scheduled event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum EventSource {
    /// Azure started it.
    #[default]
    Platform,
    /// The VM's owner started it.
    User,
}

/// An event to inject.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventSpec {
    /// What will happen.
    pub event_type: EventType,
    /// Names of the VMs affected (`Resources`).
    pub resources: Vec<String>,
    /// How far in the future `NotBefore` is. The event starts then, or when acknowledged.
    #[serde(with = "secs")]
    pub not_before_in: Duration,
    /// `DurationInSeconds` (`-1` when unknown).
    pub duration_in_seconds: i64,
    /// How long the event stays listed as `Started` before it has "happened"
    /// and disappears from the document.
    #[serde(with = "secs")]
    pub started_for: Duration,
    /// `Description`.
    pub description: String,
    /// `EventSource`.
    pub source: EventSource,
}

impl EventSpec {
    /// An event of `event_type` for `vm`, starting after `not_before_in`,
    /// listed as `Started` for 5 s before it disappears.
    pub fn new(event_type: EventType, vm: &str, not_before_in: Duration) -> Self {
        let description = match event_type {
            EventType::Freeze => {
                "Virtual machine is being paused because of a memory-preserving Live Migration operation."
            }
            EventType::Reboot => {
                "Virtual machine is going to be restarted as requested by authorized user."
            }
            EventType::Redeploy => "Host server is undergoing an emergency repair.",
            EventType::Preempt => "Spot virtual machine is being evicted.",
            EventType::Terminate => "Virtual machine is being deleted.",
        };
        Self {
            event_type,
            resources: vec![vm.to_owned()],
            not_before_in,
            duration_in_seconds: if event_type == EventType::Freeze {
                5
            } else {
                -1
            },
            started_for: Duration::from_secs(5),
            description: description.to_owned(),
            source: EventSource::Platform,
        }
    }
}

/// Which IMDS endpoint a request was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Endpoint {
    /// `/metadata/instance...`
    Instance,
    /// `/metadata/identity/oauth2/token`
    Identity,
    /// `/metadata/scheduledevents`
    ScheduledEvents,
    /// Any other `/metadata/...` path.
    Other,
}

/// What an injected fault does to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FaultKind {
    /// Answer with this HTTP status (410, 429, 500, ...) and a JSON error body.
    Status(u16),
    /// Answer with this status and a `Retry-After` header of the given seconds.
    StatusRetryAfter(u16, u64),
    /// Answer normally, but only after this many milliseconds.
    SlowMillis(u64),
}

/// How long an injected fault lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FaultLimit {
    /// For the next N matching requests.
    Requests(u32),
    /// For matching requests during the next this many milliseconds.
    Millis(u64),
}

/// A fault to inject into matching requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// What happens.
    pub kind: FaultKind,
    /// For how long.
    pub limit: FaultLimit,
    /// Which endpoint; `None` for all of them.
    pub endpoint: Option<Endpoint>,
}

impl Fault {
    /// The next `n` requests to `endpoint` (all if `None`) get `status`.
    pub fn status_times(status: u16, n: u32, endpoint: Option<Endpoint>) -> Self {
        Self {
            kind: FaultKind::Status(status),
            limit: FaultLimit::Requests(n),
            endpoint,
        }
    }

    /// Requests to `endpoint` get `status` for the next `duration`.
    pub fn status_for(status: u16, duration: Duration, endpoint: Option<Endpoint>) -> Self {
        Self {
            kind: FaultKind::Status(status),
            limit: FaultLimit::Millis(duration_millis(duration)),
            endpoint,
        }
    }

    /// The next `n` requests to `endpoint` are answered after `delay`.
    pub fn slow_times(delay: Duration, n: u32, endpoint: Option<Endpoint>) -> Self {
        Self {
            kind: FaultKind::SlowMillis(duration_millis(delay)),
            limit: FaultLimit::Requests(n),
            endpoint,
        }
    }
}

fn duration_millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Durations as whole or fractional seconds in the admin API's JSON.
mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom)
    }
}
