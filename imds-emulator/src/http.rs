//! The HTTP face of the emulator: IMDS paths and the admin API, via axum.
//! Handlers only translate between HTTP and [`Emulator`]; the contract lives in `state.rs`.

use std::net::SocketAddr;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::model::{ADMIN_PREFIX, EventSpec, Fault, ManagedIdentity, VmSpec};
use crate::state::{Emulator, EmulatorError, ImdsRequest, ImdsResponse};
use base64::Engine as _;

/// Errors starting or running the HTTP server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Binding the listening socket failed.
    #[error("bind imds emulator to {addr}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading the bound address back failed.
    #[error("read imds emulator listening address")]
    LocalAddr(#[source] std::io::Error),
}

/// A running emulator server. Dropping it stops the server.
pub struct RunningEmulator {
    emulator: Emulator,
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl RunningEmulator {
    /// The address the server listens on (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, the base URL to give a client instead of `http://169.254.169.254`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The emulator behind the server, to register VMs and inject events and faults.
    pub fn emulator(&self) -> &Emulator {
        &self.emulator
    }

    /// Stops accepting connections and waits for the server task to end.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for RunningEmulator {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

impl Emulator {
    /// Binds `addr` (port 0 picks a free port) and serves in a background task.
    pub async fn bind(&self, addr: SocketAddr) -> Result<RunningEmulator, ServeError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { addr, source })?;
        self.serve(listener)
    }

    /// Serves on an already bound listener in a background task.
    pub fn serve(&self, listener: TcpListener) -> Result<RunningEmulator, ServeError> {
        let addr = listener.local_addr().map_err(ServeError::LocalAddr)?;
        let (tx, rx) = oneshot::channel::<()>();
        let app = self
            .router()
            .into_make_service_with_connect_info::<SocketAddr>();
        let task = tokio::spawn(async move {
            let server = axum::serve(listener, app).with_graceful_shutdown(async {
                let _ = rx.await;
            });
            if let Err(error) = server.await {
                tracing::error!(%error, "imds emulator server failed");
            }
        });
        tracing::debug!(%addr, "imds emulator listening");
        Ok(RunningEmulator {
            emulator: self.clone(),
            addr,
            shutdown: Some(tx),
            task: Some(task),
        })
    }

    /// The axum router: IMDS paths, plus the admin API when enabled.
    pub fn router(&self) -> Router {
        let mut router = Router::new();
        if self.config().admin_api {
            let admin = Router::new()
                .route("/vms", get(list_vms).post(add_vm))
                .route("/vms/{name}", delete(remove_vm))
                .route("/vms/{name}/identities", post(add_identity))
                .route("/events", post(schedule_event))
                .route("/faults", post(inject_fault).delete(clear_faults))
                .route("/jwks", get(jwks))
                .route("/stats", get(stats));
            router = router.nest(ADMIN_PREFIX, admin);
        }
        router
            .route("/oauth2/exchange", post(registry_exchange))
            .route(
                "/oauth2/token",
                get(registry_token_get).post(registry_token_post),
            )
            .fallback(imds)
            .with_state(self.clone())
    }
}

/// A form or query string as its pairs, repeated keys (`scope`) kept.
fn pairs(text: &[u8]) -> Vec<(String, String)> {
    serde_urlencoded::from_bytes(text).unwrap_or_default()
}

fn answer(answer: ImdsResponse) -> Response {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, Json(answer.body)).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"Azure Container Registry\""),
        );
    }
    response
}

async fn registry_exchange(State(emulator): State<Emulator>, body: Bytes) -> Response {
    answer(emulator.registry_exchange(&pairs(&body)))
}

/// Docker's way after a `docker login` with a refresh token: Basic auth
/// whose password is the refresh token, `service` and `scope` in the query.
async fn registry_token_get(
    State(emulator): State<Emulator>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let query = pairs(uri.query().unwrap_or("").as_bytes());
    let password = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|userpass| userpass.split_once(':').map(|(_, p)| p.to_owned()));
    let Some(password) = password else {
        return answer(ImdsResponse::error(
            401,
            json!({"errors": [{"code": "UNAUTHORIZED", "message": "log in with the refresh token as password (user 00000000-0000-0000-0000-000000000000)"}]}),
        ));
    };
    registry_token(&emulator, &password, &query)
}

/// The OAuth2 way: `grant_type=refresh_token` in a form.
async fn registry_token_post(State(emulator): State<Emulator>, body: Bytes) -> Response {
    let form = pairs(&body);
    if !form
        .iter()
        .any(|(k, v)| k == "grant_type" && v == "refresh_token")
    {
        return answer(ImdsResponse::error(
            400,
            json!({"errors": [{"code": "UNSUPPORTED_GRANT_TYPE", "message": "grant_type must be refresh_token"}]}),
        ));
    }
    let refresh = form
        .iter()
        .find(|(k, _)| k == "refresh_token")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    registry_token(&emulator, &refresh, &form)
}

fn registry_token(emulator: &Emulator, refresh: &str, fields: &[(String, String)]) -> Response {
    let service = fields
        .iter()
        .find(|(k, _)| k == "service")
        .map(|(_, v)| v.as_str())
        .unwrap_or("");
    let scopes: Vec<String> = fields
        .iter()
        .filter(|(k, _)| k == "scope")
        .map(|(_, v)| v.clone())
        .collect();
    answer(emulator.registry_access_token(refresh, service, &scopes))
}

async fn imds(
    State(emulator): State<Emulator>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request = ImdsRequest {
        post: method == Method::POST,
        path: uri.path().to_owned(),
        query: uri.query().unwrap_or("").to_owned(),
        metadata_header: headers
            .get("metadata")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        forwarded: headers.contains_key("x-forwarded-for"),
        // An IPv4 client of a dual-stack socket shows up as ::ffff:a.b.c.d.
        peer: peer.ip().to_canonical(),
        body: body.to_vec(),
    };
    let answer = emulator.handle(&request);
    tracing::trace!(path = %request.path, status = answer.status, "imds emulator request");
    if let Some(delay) = answer.delay {
        tokio::time::sleep(delay).await;
    }
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, Json(answer.body)).into_response();
    if let Some(value) = answer
        .retry_after
        .and_then(|secs| HeaderValue::from_str(&secs.to_string()).ok())
    {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

fn admin_error(error: EmulatorError) -> Response {
    let status = match error {
        EmulatorError::VmNotFound(_) => StatusCode::NOT_FOUND,
        EmulatorError::AddVmDuplicate(_) => StatusCode::CONFLICT,
        EmulatorError::ScheduleEventNoResources => StatusCode::BAD_REQUEST,
    };
    (status, Json(json!({"error": error.to_string()}))).into_response()
}

async fn list_vms(State(emulator): State<Emulator>) -> Json<Vec<VmSpec>> {
    Json(emulator.vms())
}

async fn add_vm(State(emulator): State<Emulator>, Json(vm): Json<VmSpec>) -> Response {
    match emulator.add_vm(vm) {
        Ok(()) => StatusCode::CREATED.into_response(),
        Err(error) => admin_error(error),
    }
}

async fn remove_vm(State(emulator): State<Emulator>, Path(name): Path<String>) -> Response {
    match emulator.remove_vm(&name) {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(error) => admin_error(error),
    }
}

async fn add_identity(
    State(emulator): State<Emulator>,
    Path(name): Path<String>,
    Json(identity): Json<ManagedIdentity>,
) -> Response {
    match emulator.add_user_identity(&name, identity) {
        Ok(()) => StatusCode::CREATED.into_response(),
        Err(error) => admin_error(error),
    }
}

async fn schedule_event(State(emulator): State<Emulator>, Json(spec): Json<EventSpec>) -> Response {
    match emulator.schedule_event(spec) {
        Ok(id) => (StatusCode::CREATED, Json(json!({"EventId": id}))).into_response(),
        Err(error) => admin_error(error),
    }
}

async fn inject_fault(State(emulator): State<Emulator>, Json(fault): Json<Fault>) -> StatusCode {
    emulator.inject_fault(fault);
    StatusCode::CREATED
}

async fn clear_faults(State(emulator): State<Emulator>) -> StatusCode {
    emulator.clear_faults();
    StatusCode::NO_CONTENT
}

async fn jwks(State(emulator): State<Emulator>) -> Json<serde_json::Value> {
    Json(emulator.jwks())
}

async fn stats(State(emulator): State<Emulator>) -> Response {
    Json(emulator.stats()).into_response()
}
