//! A stand-in for IMDS as Microsoft's scheduled-events mock server
//! (`Azure-Samples/scheduled-events-mock-server`, `main.py`) answers it,
//! plus the instance metadata a spot VM gets: `NotBefore` in ISO 8601 (or
//! whatever text a test sets), a new `EventId` whenever an event changes
//! status, `POST` `StartRequests` moving scheduled events to `Started`,
//! `DocumentIncarnation` bumped at each change, and IMDS's 410 while it is
//! being updated. Unlike the mock, it holds several events at once (a
//! Preempt may come during a Reboot).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

/// The VM's name, as scheduled events name it.
pub const VM: &str = "vmss_vm1";
/// Its private address.
pub const VM_IP: &str = "10.0.0.7";

#[derive(Clone, Debug)]
struct Event {
    id: String,
    status: &'static str,
    kind: &'static str,
    not_before: String,
}

#[derive(Default)]
struct Inner {
    incarnation: i64,
    events: Vec<Event>,
    /// This status to every request until then.
    down: Option<(Instant, StatusCode)>,
    /// Bodies of the `POST`s.
    posts: Vec<Value>,
    /// Requests for instance metadata and for scheduled events.
    instance_gets: u32,
    event_gets: u32,
    next_id: u32,
}

impl Inner {
    fn id(&mut self) -> String {
        self.next_id += 1;
        format!("{:08x}-5eed-4000-8000-000000000000", self.next_id)
    }

    fn document(&self) -> Value {
        let events: Vec<Value> = self
            .events
            .iter()
            .map(|e| {
                json!({
                    "Description": "Virtual machine is going to be restarted as requested by authorized user.",
                    "DurationInSeconds": -1,
                    "EventId": e.id,
                    "EventSource": "User",
                    "EventStatus": e.status,
                    "EventType": e.kind,
                    // The mock blanks NotBefore once an event has started.
                    "NotBefore": if e.status == "Started" { "" } else { e.not_before.as_str() },
                    "ResourceType": "VirtualMachine",
                    "Resources": [VM],
                })
            })
            .collect();
        json!({"DocumentIncarnation": self.incarnation, "Events": events})
    }

    fn gone(&self) -> Option<Response> {
        self.down
            .filter(|(until, _)| Instant::now() < *until)
            .map(|(_, status)| {
                (status, Json(json!({"error": "the service is unavailable"}))).into_response()
            })
    }
}

/// The stand-in; clones share it.
#[derive(Clone)]
pub struct MockImds(Arc<Mutex<Inner>>);

impl MockImds {
    /// Serves on a free loopback port; returns it and its base URL.
    pub async fn serve() -> (MockImds, String) {
        let mock = MockImds(Arc::new(Mutex::new(Inner {
            incarnation: 1,
            ..Inner::default()
        })));
        let app = axum::Router::new()
            .route("/metadata/instance", get(instance))
            .route(
                "/metadata/scheduledevents",
                get(events).post(start_requests),
            )
            .with_state(mock.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (mock, format!("http://{addr}"))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap()
    }

    /// Answers 410 (IMDS being updated) to everything for `d` from now.
    pub fn gone_for(&self, d: Duration) {
        self.lock().down = Some((Instant::now() + d, StatusCode::GONE));
    }

    /// Answers 500 to everything for `d` from now.
    pub fn failing_for(&self, d: Duration) {
        self.lock().down = Some((Instant::now() + d, StatusCode::INTERNAL_SERVER_ERROR));
    }

    /// A new scheduled event of `kind` (`Reboot`, `Preempt`…) with
    /// `not_before` as its text; returns its id.
    pub fn schedule(&self, kind: &'static str, not_before: String) -> String {
        let mut m = self.lock();
        let id = m.id();
        m.events.push(Event {
            id: id.clone(),
            status: "Scheduled",
            kind,
            not_before,
        });
        m.incarnation += 1;
        id
    }

    /// The event is cancelled: it leaves the document.
    pub fn cancel(&self, id: &str) {
        let mut m = self.lock();
        m.events.retain(|e| e.id != id);
        m.incarnation += 1;
    }

    /// The platform starts the event (its `NotBefore` passed), under a new
    /// id as the mock does; returns the new id.
    pub fn start(&self, id: &str) -> String {
        let mut m = self.lock();
        let new = m.id();
        let e = m.events.iter_mut().find(|e| e.id == id).unwrap();
        e.id = new.clone();
        e.status = "Started";
        m.incarnation += 1;
        new
    }

    /// The ids named in `POST`ed `StartRequests`, in order.
    pub fn acknowledged(&self) -> Vec<String> {
        self.lock()
            .posts
            .iter()
            .flat_map(|p| p["StartRequests"].as_array().cloned().unwrap_or_default())
            .filter_map(|r| r["EventId"].as_str().map(str::to_owned))
            .collect()
    }

    /// The `POST` bodies.
    pub fn posts(&self) -> Vec<Value> {
        self.lock().posts.clone()
    }

    /// Requests for instance metadata so far.
    pub fn instance_gets(&self) -> u32 {
        self.lock().instance_gets
    }

    /// Requests for scheduled events so far.
    pub fn event_gets(&self) -> u32 {
        self.lock().event_gets
    }
}

async fn instance(State(mock): State<MockImds>) -> Response {
    let mut m = mock.lock();
    m.instance_gets += 1;
    if let Some(r) = m.gone() {
        return r;
    }
    Json(json!({
        "compute": {
            "name": VM,
            "vmId": "5c08b38e-4d57-4c23-ac45-aca61037f084",
            "vmSize": "Standard_NC24ads_A100_v4",
            "location": "westeurope",
            "priority": "Spot",
            "evictionPolicy": "Delete",
            "vmScaleSetName": "vmss",
            "resourceId": "/subscriptions/x/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/vmss/virtualMachines/1",
        },
        "network": {"interface": [{"ipv4": {"ipAddress": [{"privateIpAddress": VM_IP, "publicIpAddress": ""}]}}]},
    }))
    .into_response()
}

async fn events(State(mock): State<MockImds>) -> Response {
    let mut m = mock.lock();
    m.event_gets += 1;
    m.gone()
        .unwrap_or_else(|| Json(m.document()).into_response())
}

/// Each `StartRequests` entry naming a scheduled event moves it to
/// `Started` under a new id (the mock does this for the first entry).
async fn start_requests(State(mock): State<MockImds>, body: axum::body::Bytes) -> Response {
    let mut m = mock.lock();
    if let Some(r) = m.gone() {
        return r;
    }
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "Invalid JSON"})),
        )
            .into_response();
    };
    m.posts.push(request.clone());
    let asked: Vec<String> = request["StartRequests"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|r| r["EventId"].as_str().map(str::to_owned))
        .collect();
    let mut changed = false;
    for id in asked {
        let new = m.id();
        if let Some(e) = m
            .events
            .iter_mut()
            .find(|e| e.id == id && e.status == "Scheduled")
        {
            e.id = new;
            e.status = "Started";
            changed = true;
        }
    }
    if changed {
        m.incarnation += 1;
    }
    Json(m.document()).into_response()
}

/// `t` as the mock writes `NotBefore`: `%Y-%m-%dT%H:%M:%SZ`.
pub fn iso(t: SystemTime) -> String {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `d` from now, as the mock writes it.
pub fn iso_in(d: Duration) -> String {
    iso(SystemTime::now() + d)
}
