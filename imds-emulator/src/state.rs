//! The emulator's state and the IMDS contract, independent of HTTP.
//!
//! [`Emulator::handle`] takes a plain [`ImdsRequest`] and returns a plain
//! [`ImdsResponse`]; `http.rs` only translates to and from axum.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::{Value, json};

use crate::acr::RegistryTokens;
use crate::model::{
    EmulatorConfig, Endpoint, EventSpec, Fault, FaultKind, FaultLimit, ManagedIdentity, VmSpec,
};
use crate::token::{Claims, Signer};

/// IMDS api-versions the emulator accepts, newest first.
///
/// <https://learn.microsoft.com/azure/virtual-machines/instance-metadata-service#supported-api-versions>
pub const SUPPORTED_API_VERSIONS: &[&str] = &[
    "2025-04-07",
    "2024-07-17",
    "2024-03-15",
    "2023-11-15",
    "2023-07-01",
    "2021-12-13",
    "2021-11-15",
    "2021-11-01",
    "2021-10-01",
    "2021-08-01",
    "2021-05-01",
    "2021-03-01",
    "2021-02-01",
    "2021-01-01",
    "2020-12-01",
    "2020-10-01",
    "2020-09-01",
    "2020-07-15",
    "2020-07-01",
    "2020-06-01",
    "2019-11-01",
    "2019-08-15",
    "2019-08-01",
    "2019-06-04",
    "2019-06-01",
    "2019-04-30",
    "2019-03-11",
    "2019-02-01",
    "2019-01-01",
    "2018-10-01",
    "2018-04-02",
    "2018-02-01",
    "2017-12-01",
    "2017-11-01",
    "2017-10-01",
    "2017-08-01",
    "2017-04-02",
    "2017-03-01",
];

/// Errors of the emulator's Rust and admin API.
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    /// `add_vm` was given a name that is already registered.
    #[error("add vm {0}: a vm with this name is already registered")]
    AddVmDuplicate(String),
    /// An operation named a VM that is not registered.
    #[error("vm {0} is not registered")]
    VmNotFound(String),
    /// An event was scheduled with no VM in `resources`.
    #[error("schedule event: resources is empty")]
    ScheduleEventNoResources,
}

/// One request as the IMDS contract sees it.
#[derive(Debug, Clone)]
pub struct ImdsRequest {
    /// `true` for POST (scheduled-event acknowledgements), `false` for GET.
    pub post: bool,
    /// The URL path, e.g. `/metadata/instance`.
    pub path: String,
    /// The raw query string, without `?`.
    pub query: String,
    /// The value of the `Metadata` header, if present.
    pub metadata_header: Option<String>,
    /// Whether the request carried `X-Forwarded-For`.
    pub forwarded: bool,
    /// The peer address the request came from.
    pub peer: IpAddr,
    /// The request body.
    pub body: Vec<u8>,
}

/// The answer to an [`ImdsRequest`].
#[derive(Debug, Clone)]
pub struct ImdsResponse {
    /// HTTP status.
    pub status: u16,
    /// JSON body.
    pub body: Value,
    /// `Retry-After`, in seconds.
    pub retry_after: Option<u64>,
    /// Delay the answer by this much (an injected slow fault).
    pub delay: Option<Duration>,
}

impl ImdsResponse {
    pub(crate) fn ok(body: Value) -> Self {
        Self {
            status: 200,
            body,
            retry_after: None,
            delay: None,
        }
    }

    pub(crate) fn error(status: u16, body: Value) -> Self {
        Self {
            status,
            body,
            retry_after: None,
            delay: None,
        }
    }
}

/// Per-endpoint request counters, for tests that count round trips.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    /// Requests to `/metadata/instance...`, whatever the outcome.
    pub instance: u64,
    /// Requests to the identity token endpoint, whatever the outcome.
    pub identity: u64,
    /// Requests (GET and POST) to `/metadata/scheduledevents`.
    pub scheduled_events: u64,
    /// Tokens issued.
    pub tokens_issued: u64,
    /// Requests answered 429 by the rate limiter.
    pub throttled: u64,
    /// Entra tokens exchanged for container registry refresh tokens.
    pub registry_refresh_tokens: u64,
    /// Container registry access tokens issued.
    pub registry_access_tokens: u64,
}

#[derive(Debug, Clone)]
struct Event {
    id: String,
    spec: EventSpec,
    not_before: SystemTime,
    started_at: Option<SystemTime>,
}

struct ActiveFault {
    fault: Fault,
    remaining: u32,
    until: Option<Instant>,
}

struct State {
    vms: Vec<VmSpec>,
    events: Vec<Event>,
    incarnation: u64,
    faults: Vec<ActiveFault>,
    /// Sliding one-second windows of accepted request times, per (VM, identity?).
    windows: HashMap<(String, bool), VecDeque<Instant>>,
    stats: Stats,
}

struct Inner {
    config: EmulatorConfig,
    signer: Signer,
    /// The container registry token service, once enabled.
    registry_tokens: OnceLock<RegistryTokens>,
    state: Mutex<State>,
}

/// An IMDS emulator: VMs, identities, scheduled events and faults. Cheap to clone.
#[derive(Clone)]
pub struct Emulator {
    inner: Arc<Inner>,
}

impl Emulator {
    /// An emulator with no VMs and a fresh signing key.
    pub fn new(config: EmulatorConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                signer: Signer::generate(),
                registry_tokens: OnceLock::new(),
                state: Mutex::new(State {
                    vms: Vec::new(),
                    events: Vec::new(),
                    incarnation: 1,
                    faults: Vec::new(),
                    windows: HashMap::new(),
                    stats: Stats::default(),
                }),
            }),
        }
    }

    /// The emulator's configuration.
    pub fn config(&self) -> &EmulatorConfig {
        &self.inner.config
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-updated in
        // a way that matters to a test double; keep serving.
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a VM. A system identity with an empty `resource_id` gets the
    /// VM's own resource id, as in Azure.
    pub fn add_vm(&self, mut vm: VmSpec) -> Result<(), EmulatorError> {
        let resource_id = vm.resource_id();
        if let Some(identity) = vm
            .system_identity
            .as_mut()
            .filter(|i| i.resource_id.is_empty())
        {
            identity.resource_id = resource_id;
        }
        let mut state = self.state();
        if state.vms.iter().any(|v| v.name == vm.name) {
            return Err(EmulatorError::AddVmDuplicate(vm.name));
        }
        tracing::debug!(vm = %vm.name, "imds emulator vm added");
        state.vms.push(vm);
        Ok(())
    }

    /// Removes a VM.
    pub fn remove_vm(&self, name: &str) -> Result<VmSpec, EmulatorError> {
        let mut state = self.state();
        let index = state
            .vms
            .iter()
            .position(|v| v.name == name)
            .ok_or_else(|| EmulatorError::VmNotFound(name.to_owned()))?;
        Ok(state.vms.remove(index))
    }

    /// The registered VMs.
    pub fn vms(&self) -> Vec<VmSpec> {
        self.state().vms.clone()
    }

    /// Assigns a user-assigned identity to a VM.
    pub fn add_user_identity(
        &self,
        vm: &str,
        identity: ManagedIdentity,
    ) -> Result<(), EmulatorError> {
        let mut state = self.state();
        let vm = state
            .vms
            .iter_mut()
            .find(|v| v.name == vm)
            .ok_or_else(|| EmulatorError::VmNotFound(vm.to_owned()))?;
        vm.user_identities.push(identity);
        Ok(())
    }

    /// Schedules an event and returns its `EventId`. Bumps `DocumentIncarnation`.
    pub fn schedule_event(&self, spec: EventSpec) -> Result<String, EmulatorError> {
        if spec.resources.is_empty() {
            return Err(EmulatorError::ScheduleEventNoResources);
        }
        let mut state = self.state();
        for name in &spec.resources {
            if !state.vms.iter().any(|v| &v.name == name) {
                return Err(EmulatorError::VmNotFound(name.clone()));
            }
        }
        let id = crate::random_uuid().to_uppercase();
        tracing::debug!(event_id = %id, event_type = ?spec.event_type, "imds emulator event scheduled");
        state.events.push(Event {
            id: id.clone(),
            not_before: SystemTime::now() + spec.not_before_in,
            started_at: None,
            spec,
        });
        state.incarnation += 1;
        Ok(id)
    }

    /// The current `DocumentIncarnation`.
    pub fn incarnation(&self) -> u64 {
        let mut state = self.state();
        advance_events(&mut state, SystemTime::now());
        state.incarnation
    }

    /// Injects a fault; faults apply in the order injected.
    pub fn inject_fault(&self, fault: Fault) {
        let (remaining, until) = match fault.limit {
            FaultLimit::Requests(n) => (n, None),
            FaultLimit::Millis(ms) => (u32::MAX, Some(Instant::now() + Duration::from_millis(ms))),
        };
        self.state().faults.push(ActiveFault {
            fault,
            remaining,
            until,
        });
    }

    /// Removes all injected faults.
    pub fn clear_faults(&self) {
        self.state().faults.clear();
    }

    /// Request counters.
    pub fn stats(&self) -> Stats {
        self.state().stats.clone()
    }

    /// Serves a container registry token service (see [`crate::acr`]) on
    /// the emulator's own address, trusting the Entra tokens the emulator
    /// issues. False when one was already enabled.
    pub fn enable_registry_tokens(&self, tokens: RegistryTokens) -> bool {
        self.inner.registry_tokens.set(tokens).is_ok()
    }

    /// `POST /oauth2/exchange` of the registry token service.
    pub fn registry_exchange(&self, form: &[(String, String)]) -> ImdsResponse {
        let Some(tokens) = self.inner.registry_tokens.get() else {
            return no_registry_tokens();
        };
        let answer = tokens.exchange(&self.inner.signer, form, unix_now());
        if answer.status == 200 {
            self.state().stats.registry_refresh_tokens += 1;
        }
        answer
    }

    /// `GET|POST /oauth2/token` of the registry token service.
    pub fn registry_access_token(
        &self,
        refresh_token: &str,
        service: &str,
        scopes: &[String],
    ) -> ImdsResponse {
        let Some(tokens) = self.inner.registry_tokens.get() else {
            return no_registry_tokens();
        };
        let answer = tokens.access_token(
            &self.inner.signer,
            refresh_token,
            service,
            scopes,
            unix_now(),
        );
        if answer.status == 200 {
            self.state().stats.registry_access_tokens += 1;
        }
        answer
    }

    /// The token-signing public key as a JWK Set.
    pub fn jwks(&self) -> Value {
        self.inner.signer.jwks()
    }

    /// Answers one IMDS request. Checks run in Azure's order: forwarding and
    /// the `Metadata` header, then `api-version`, then faults and rate limits.
    pub fn handle(&self, req: &ImdsRequest) -> ImdsResponse {
        let endpoint = classify(&req.path);
        let mut state = self.state();
        match endpoint {
            Endpoint::Instance => state.stats.instance += 1,
            Endpoint::Identity => state.stats.identity += 1,
            Endpoint::ScheduledEvents => state.stats.scheduled_events += 1,
            Endpoint::Other => {}
        }

        // https://learn.microsoft.com/azure/virtual-machines/instance-metadata-service#security-and-authentication
        if req.forwarded {
            return ImdsResponse::error(
                400,
                json!({"error": "Bad request. X-Forwarded-For header is not allowed. For more information refer to aka.ms/azureimds"}),
            );
        }
        let metadata_ok = req
            .metadata_header
            .as_deref()
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
        if !metadata_ok {
            let body = if endpoint == Endpoint::Identity {
                json!({"error": "bad_request_102", "error_description": "Required metadata header not specified"})
            } else {
                json!({"error": "Bad request. Required metadata header not specified"})
            };
            return ImdsResponse::error(400, body);
        }
        let query = match parse_query(&req.query) {
            Ok(q) => q,
            Err(name) => {
                return ImdsResponse::error(
                    400,
                    json!({"error": format!("Bad request. Duplicate query parameter {name}. For more information refer to aka.ms/azureimds")}),
                );
            }
        };
        let version_ok = query
            .get("api-version")
            .is_some_and(|v| SUPPORTED_API_VERSIONS.contains(&v.as_str()));
        if !version_ok {
            return ImdsResponse::error(
                400,
                json!({
                    "error": "Bad request. api-version is invalid or was not specified in the request. For more information refer to aka.ms/azureimds",
                    "newest-versions": &SUPPORTED_API_VERSIONS[..3],
                }),
            );
        }

        let now = Instant::now();
        let mut delay = None;
        if let Some(fault) = take_fault(&mut state.faults, endpoint, now) {
            match fault {
                FaultKind::Status(status) => return fault_response(status, None),
                FaultKind::StatusRetryAfter(status, secs) => {
                    return fault_response(status, Some(secs));
                }
                FaultKind::SlowMillis(ms) => delay = Some(Duration::from_millis(ms)),
            }
        }

        let Some(vm) = find_vm(&state.vms, req.peer).cloned() else {
            return ImdsResponse::error(
                404,
                json!({"error": format!("Not found. No VM is registered for source address {}", req.peer)}),
            );
        };

        // https://learn.microsoft.com/azure/virtual-machines/instance-metadata-service#rate-limiting
        let identity = endpoint == Endpoint::Identity;
        let limit = if identity {
            self.inner.config.identity_rate_limit
        } else {
            self.inner.config.general_rate_limit
        };
        if let Some(limit) = limit {
            let window = state
                .windows
                .entry((vm.name.clone(), identity))
                .or_default();
            while window
                .front()
                .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
            {
                window.pop_front();
            }
            if window.len() >= limit as usize {
                state.stats.throttled += 1;
                tracing::debug!(vm = %vm.name, identity, "imds emulator request throttled");
                return ImdsResponse::error(429, json!({"error": "Too many requests"}));
            }
            window.push_back(now);
        }

        let mut response = match (endpoint, req.post) {
            (Endpoint::Instance, false) => instance(&vm, &req.path),
            (Endpoint::Identity, false) => {
                let response = self.token(&vm, &query);
                if response.status == 200 {
                    state.stats.tokens_issued += 1;
                }
                response
            }
            (Endpoint::ScheduledEvents, false) => {
                advance_events(&mut state, SystemTime::now());
                scheduled_events(&state)
            }
            (Endpoint::ScheduledEvents, true) => acknowledge(&mut state, &vm, &req.body),
            (_, true) => ImdsResponse::error(405, json!({"error": "Method not allowed"})),
            (Endpoint::Other, false) => ImdsResponse::error(404, json!({"error": "Not found"})),
        };
        response.delay = delay;
        response
    }

    fn token(&self, vm: &VmSpec, query: &HashMap<String, String>) -> ImdsResponse {
        let Some(resource) = query.get("resource").filter(|r| !r.is_empty()) else {
            return ImdsResponse::error(
                400,
                json!({"error": "invalid_request", "error_description": "Required query variable 'resource' is missing"}),
            );
        };
        // IMDS accepts `mi_res_id` as an alias of `msi_res_id`.
        let selectors: Vec<(&str, &String)> = ["client_id", "object_id", "msi_res_id", "mi_res_id"]
            .iter()
            .filter_map(|k| query.get(*k).map(|v| (*k, v)))
            .collect();
        let identity = match selectors.as_slice() {
            [] => vm
                .system_identity
                .as_ref()
                .or(match vm.user_identities.as_slice() {
                    // With no system identity and exactly one user-assigned one, IMDS uses that.
                    [only] => Some(only),
                    _ => None,
                }),
            [(kind, value)] => all_identities(vm).find(|id| match *kind {
                "client_id" => id.client_id.eq_ignore_ascii_case(value),
                "object_id" => id.object_id.eq_ignore_ascii_case(value),
                _ => id.resource_id.eq_ignore_ascii_case(value),
            }),
            _ => {
                return ImdsResponse::error(
                    400,
                    json!({"error": "invalid_request", "error_description": "Only one of client_id, object_id or msi_res_id may be specified"}),
                );
            }
        };
        let Some(identity) = identity else {
            return ImdsResponse::error(
                400,
                json!({"error": "invalid_request", "error_description": "Identity not found"}),
            );
        };
        let now = unix_now();
        let lifetime = self.inner.config.token_lifetime.as_secs();
        let expires_on = now + lifetime;
        let issuer = format!("https://sts.windows.net/{}/", self.inner.config.tenant_id);
        let access_token = self.inner.signer.sign(&Claims {
            audience: resource,
            issuer: &issuer,
            tenant_id: &self.inner.config.tenant_id,
            object_id: &identity.object_id,
            client_id: &identity.client_id,
            mi_resource_id: &identity.resource_id,
            issued_at: now,
            expires_at: expires_on,
        });
        tracing::debug!(vm = %vm.name, client_id = %identity.client_id, resource = %resource, "imds emulator token issued");
        // https://learn.microsoft.com/entra/identity/managed-identities-azure-resources/how-to-use-vm-token#get-a-token-using-http
        ImdsResponse::ok(json!({
            "access_token": access_token,
            "refresh_token": "",
            "expires_in": lifetime.to_string(),
            "expires_on": expires_on.to_string(),
            "ext_expires_in": lifetime.to_string(),
            "not_before": now.to_string(),
            "resource": resource,
            "token_type": "Bearer",
            "client_id": identity.client_id,
        }))
    }
}

fn all_identities(vm: &VmSpec) -> impl Iterator<Item = &ManagedIdentity> {
    vm.system_identity.iter().chain(vm.user_identities.iter())
}

fn classify(path: &str) -> Endpoint {
    let path = path.trim_end_matches('/');
    if path == "/metadata/instance" || path.starts_with("/metadata/instance/") {
        Endpoint::Instance
    } else if path == "/metadata/identity/oauth2/token" {
        Endpoint::Identity
    } else if path == "/metadata/scheduledevents" {
        Endpoint::ScheduledEvents
    } else {
        Endpoint::Other
    }
}

fn find_vm(vms: &[VmSpec], peer: IpAddr) -> Option<&VmSpec> {
    let by_addr = vms.iter().find(|vm| match vm.source_addr {
        Some(addr) => addr == peer,
        None => vm.private_ip.parse::<IpAddr>().is_ok_and(|ip| ip == peer),
    });
    match (by_addr, vms) {
        (Some(vm), _) => Some(vm),
        (None, [only]) => Some(only),
        _ => None,
    }
}

fn take_fault(
    faults: &mut Vec<ActiveFault>,
    endpoint: Endpoint,
    now: Instant,
) -> Option<FaultKind> {
    faults.retain(|f| f.remaining > 0 && f.until.is_none_or(|u| now < u));
    let fault = faults
        .iter_mut()
        .find(|f| f.fault.endpoint.is_none_or(|e| e == endpoint))?;
    if fault.until.is_none() {
        fault.remaining -= 1;
    }
    Some(fault.fault.kind)
}

fn fault_response(status: u16, retry_after: Option<u64>) -> ImdsResponse {
    let error = match status {
        410 => "Gone. The service is being updated; retry",
        429 => "Too many requests",
        500..=599 => "Internal server error",
        404 => "Not found",
        _ => "Injected fault",
    };
    ImdsResponse {
        status,
        body: json!({"error": error}),
        retry_after,
        delay: None,
    }
}

/// Parses a query string, rejecting duplicate names as IMDS does.
fn parse_query(query: &str) -> Result<HashMap<String, String>, String> {
    let mut out = HashMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = percent_decode(name);
        if out.insert(name.clone(), percent_decode(value)).is_some() {
            return Err(name);
        }
    }
    Ok(out)
}

/// Decodes `%XX` escapes and `+` (form encoding, as Python and reqwest send it).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn no_registry_tokens() -> ImdsResponse {
    ImdsResponse::error(
        404,
        json!({"error": "this emulator serves no container registry token service (start it with --registry-token-key and --registry-token-cert)"}),
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn instance(vm: &VmSpec, path: &str) -> ImdsResponse {
    let tags = vm
        .tags
        .iter()
        .map(|(k, v)| format!("{k}:{v}"))
        .collect::<Vec<_>>()
        .join(";");
    let tags_list: Vec<Value> = vm
        .tags
        .iter()
        .map(|(k, v)| json!({"name": k, "value": v}))
        .collect();
    // In IMDS JSON every primitive is a string and missing values are "".
    // https://learn.microsoft.com/azure/virtual-machines/instance-metadata-service#data-format
    let doc = json!({
        "compute": {
            "azEnvironment": "AzurePublicCloud",
            "evictionPolicy": vm.eviction_policy,
            "isHostCompatibilityLayerVm": "false",
            "licenseType": "",
            "location": vm.location,
            "name": vm.name,
            "offer": "",
            "osProfile": {"adminUsername": "drover", "computerName": vm.name, "disablePasswordAuthentication": "true"},
            "osType": "Linux",
            "placementGroupId": "",
            "platformFaultDomain": "0",
            "platformUpdateDomain": "0",
            "priority": vm.priority.as_str(),
            "provider": "Microsoft.Compute",
            "publisher": "",
            "resourceGroupName": vm.resource_group,
            "resourceId": vm.resource_id(),
            "sku": "",
            "subscriptionId": vm.subscription_id,
            "tags": tags,
            "tagsList": tags_list,
            "userData": base64::engine::general_purpose::STANDARD.encode(&vm.user_data),
            "version": "",
            "vmId": vm.vm_id,
            "vmScaleSetName": vm.vm_scale_set_name,
            "vmSize": vm.vm_size,
            "zone": vm.zone,
        },
        "network": {
            "interface": [{
                "ipv4": {
                    "ipAddress": [{"privateIpAddress": vm.private_ip, "publicIpAddress": ""}],
                    "subnet": [{"address": "10.0.0.0", "prefix": "24"}],
                },
                "ipv6": {"ipAddress": []},
                "macAddress": "000D3A000000",
            }],
        },
    });
    // Route parameters walk into the document: /metadata/instance/compute/vmId.
    // https://learn.microsoft.com/azure/virtual-machines/instance-metadata-service#route-parameters
    let mut node = &doc;
    for part in path
        .trim_end_matches('/')
        .trim_start_matches("/metadata/instance")
        .split('/')
        .filter(|p| !p.is_empty())
    {
        let next = match node {
            Value::Object(map) => map.get(part),
            Value::Array(items) => part.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        };
        match next {
            Some(n) => node = n,
            None => return ImdsResponse::error(404, json!({"error": "Not found"})),
        }
    }
    ImdsResponse::ok(node.clone())
}

/// Moves events along: `Scheduled` → `Started` at `NotBefore`, and removes
/// `Started` events once they have happened. Every change bumps the incarnation.
fn advance_events(state: &mut State, now: SystemTime) {
    let mut changed = false;
    for event in &mut state.events {
        if event.started_at.is_none() && now >= event.not_before {
            event.started_at = Some(now);
            changed = true;
        }
    }
    let before = state.events.len();
    state
        .events
        .retain(|e| e.started_at.is_none_or(|s| now < s + e.spec.started_for));
    changed |= state.events.len() != before;
    if changed {
        state.incarnation += 1;
    }
}

fn scheduled_events(state: &State) -> ImdsResponse {
    // Scheduled events are shared by the VMs of one availability set or scale
    // set; the emulator treats all its VMs as one such set, so every VM sees
    // every event and must pick out the ones naming it.
    let events: Vec<Value> = state
        .events
        .iter()
        .map(|e| {
            let (status, not_before) = match e.started_at {
                None => ("Scheduled", httpdate::fmt_http_date(e.not_before)),
                // NotBefore is blank once the event has started.
                Some(_) => ("Started", String::new()),
            };
            json!({
                "EventId": e.id,
                "EventStatus": status,
                "EventType": e.spec.event_type,
                "ResourceType": "VirtualMachine",
                "Resources": e.spec.resources,
                "NotBefore": not_before,
                "Description": e.spec.description,
                "EventSource": e.spec.source,
                "DurationInSeconds": e.spec.duration_in_seconds,
            })
        })
        .collect();
    ImdsResponse::ok(json!({"DocumentIncarnation": state.incarnation, "Events": events}))
}

fn acknowledge(state: &mut State, vm: &VmSpec, body: &[u8]) -> ImdsResponse {
    #[derive(serde::Deserialize)]
    struct StartRequest {
        #[serde(rename = "EventId")]
        event_id: String,
    }
    #[derive(serde::Deserialize)]
    struct Body {
        #[serde(rename = "StartRequests")]
        start_requests: Vec<StartRequest>,
    }
    let bad =
        |what: &str| ImdsResponse::error(400, json!({"error": format!("Bad request. {what}")}));
    let Ok(body) = serde_json::from_slice::<Body>(body) else {
        return bad("The request body is malformed");
    };
    advance_events(state, SystemTime::now());
    let now = SystemTime::now();
    let mut changed = false;
    for request in &body.start_requests {
        let Some(event) = state
            .events
            .iter_mut()
            .find(|e| e.id.eq_ignore_ascii_case(&request.event_id))
        else {
            return bad("Unknown EventId");
        };
        // Approval lets the event proceed for every VM it names, but only a VM
        // it names may approve it.
        if !event.spec.resources.iter().any(|r| r == &vm.name) {
            return bad("The event does not affect this VM");
        }
        if event.started_at.is_none() {
            event.started_at = Some(now);
            changed = true;
        }
        tracing::debug!(vm = %vm.name, event_id = %event.id, "imds emulator event acknowledged");
    }
    if changed {
        state.incarnation += 1;
    }
    ImdsResponse::ok(json!({}))
}
