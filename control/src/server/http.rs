//! The HTTP layer: routes, authentication and JSON bodies. Each handler
//! only translates between HTTP and one [`ControlPlane`] method.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body as HttpBody, Bytes};
use axum::extract::rejection::{BytesRejection, JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use drover_api::compute::ComputeUpdate;
use drover_api::files::{self as api_files, Digest};
use drover_api::wire::{self, ErrorBody, ErrorCode, ErrorDetail, InvalidBody};
use serde::Deserialize;

use super::core::{ControlPlane, VersionSelector};
use super::error::ControlError;
use crate::artifacts::PutOutcome;
use crate::store::Node;

/// Shared state of the handlers.
pub type AppState = Arc<ControlPlane>;

/// The API's router.
pub fn router(core: AppState) -> Router {
    Router::new()
        .route("/v1/clusters", post(create_cluster).get(list_clusters))
        .route(
            "/v1/clusters/{name}",
            get(show_cluster)
                .patch(update_cluster)
                .delete(delete_cluster),
        )
        .route("/v1/jobs", post(submit_job).get(list_jobs))
        .route("/v1/jobs/{id}", get(show_job))
        .route("/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/v1/jobs/{id}/logs", get(job_logs))
        .route("/v1/jobs/{id}/outputs", get(job_outputs))
        .route(
            "/v1/blobs/{digest}",
            get(user_get_blob).head(user_head_blob).put(user_put_blob),
        )
        .route("/v1/uploads/{digest}", get(user_upload_status))
        .route(
            "/v1/agent/blobs/{digest}",
            get(agent_get_blob)
                .head(agent_head_blob)
                .put(agent_put_blob),
        )
        .route("/v1/agent/uploads/{digest}", get(agent_upload_status))
        .route("/v1/agent/outputs", post(post_outputs))
        .route(
            "/v1/datastores",
            post(create_datastore).get(list_datastores),
        )
        .route(
            "/v1/datastores/{name}",
            get(show_datastore).delete(delete_datastore),
        )
        .route(
            "/v1/agent/datastores/{name}/list",
            get(agent_list_datastore),
        )
        .route(
            "/v1/agent/datastores/{name}/file",
            get(agent_datastore_file),
        )
        .route(
            "/v1/environments",
            post(create_environment).get(list_environments),
        )
        .route("/v1/environments/{name}", get(list_environment_versions))
        .route(
            "/v1/environments/{name}/archive",
            post(archive_all_versions),
        )
        .route(
            "/v1/environments/{name}/restore",
            post(restore_all_versions),
        )
        .route(
            "/v1/environments/{name}/versions/{version}",
            get(show_environment).patch(update_environment),
        )
        .route(
            "/v1/environments/{name}/versions/{version}/archive",
            post(archive_environment),
        )
        .route(
            "/v1/environments/{name}/versions/{version}/restore",
            post(restore_environment),
        )
        .route(
            "/v1/agent/environments/{name}/versions/{version}",
            get(agent_show_environment),
        )
        .route("/v1/agent/builds", post(agent_request_build))
        .route("/v1/agent/builds/report", post(agent_report_build))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{id}", get(show_node))
        .route("/metrics", get(metrics))
        .route("/v1/nodes/{id}/evict", post(evict_node))
        .route("/v1/agent/register", post(register))
        .route("/v1/agent/heartbeat", post(heartbeat))
        .route("/v1/agent/assignments", get(assignments))
        .route("/v1/agent/logs", post(upload_logs))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(wire::MAX_REQUEST_BYTES))
        .layer(middleware::from_fn(request_limits))
        .with_state(core)
}

/// Refuses URIs and headers past the documented limits with the documented
/// error body (hyper's own limits, far above these, answer without one).
async fn request_limits(req: Request, next: Next) -> Response {
    let uri = req.uri().to_string().len();
    if uri > wire::MAX_URI_BYTES {
        return error_response(
            ErrorCode::UriTooLong,
            format!(
                "the request uri is {uri} bytes, more than the server's limit of {} bytes",
                wire::MAX_URI_BYTES
            ),
        );
    }
    let headers: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum();
    if headers > wire::MAX_HEADER_BYTES {
        return error_response(
            ErrorCode::HeadersTooLarge,
            format!(
                "the request headers are {headers} bytes, more than the server's limit of {} bytes",
                wire::MAX_HEADER_BYTES
            ),
        );
    }
    next.run(req).await
}

/// A user's request body, read strictly: every field checked, unknown ones
/// refused, each problem named by its field.
pub struct Strict<T>(
    /// The body.
    pub T,
);

/// How a user body is read strictly.
pub trait StrictBody: Sized {
    /// Reads the body.
    fn decode(body: &[u8]) -> Result<Self, InvalidBody>;
}

impl StrictBody for wire::ClusterCreate {
    fn decode(body: &[u8]) -> Result<Self, InvalidBody> {
        wire::decode_strict(body)
    }
}

impl StrictBody for ComputeUpdate {
    fn decode(body: &[u8]) -> Result<Self, InvalidBody> {
        wire::decode_strict(body)
    }
}

impl StrictBody for drover_api::datastore::DatastoreCreate {
    fn decode(body: &[u8]) -> Result<Self, InvalidBody> {
        wire::decode_strict(body)
    }
}

impl StrictBody for drover_api::environment::EnvironmentCreate {
    fn decode(body: &[u8]) -> Result<Self, InvalidBody> {
        wire::decode_strict(body)
    }
}

impl StrictBody for drover_api::environment::EnvironmentUpdate {
    fn decode(body: &[u8]) -> Result<Self, InvalidBody> {
        wire::decode_strict(body)
    }
}

impl StrictBody for wire::JobSubmit {
    fn decode(body: &[u8]) -> Result<Self, InvalidBody> {
        wire::JobSubmit::decode_strict(body)
    }
}

impl<T: StrictBody, S: Send + Sync> FromRequest<S> for Strict<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e: BytesRejection| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE || is_length_limit(&e) {
                    ApiError(ControlError::TooLarge(wire::too_large_message(None)))
                } else {
                    ApiError(ControlError::Invalid(format!(
                        "cannot read the request body: {}",
                        e.body_text()
                    )))
                }
            })?;
        T::decode(&bytes)
            .map(Strict)
            .map_err(|e| ApiError(ControlError::InvalidBody(e)))
    }
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError(ControlError);

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        ApiError(e)
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE || is_length_limit(&e) {
            return ApiError(ControlError::TooLarge(wire::too_large_message(None)));
        }
        ApiError(ControlError::Invalid(format!(
            "invalid request body: {}",
            e.body_text()
        )))
    }
}

/// Whether a body was refused for its size. axum reports the limit as a 400
/// "failed to buffer" when the error arrives wrapped more deeply than it
/// unwraps, so the cause chain is searched for `http_body_util`'s
/// `LengthLimitError` by its message (the type is not a dependency here).
fn is_length_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = source {
        if s.to_string() == "length limit exceeded" {
            return true;
        }
        source = s.source();
    }
    false
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        ApiError(ControlError::Invalid(format!(
            "invalid query: {}",
            e.body_text()
        )))
    }
}

/// The status and body for an error code and message.
pub fn error_response(code: ErrorCode, message: String) -> Response {
    let status = StatusCode::from_u16(code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (
        status,
        Json(ErrorBody {
            error: ErrorDetail { code, message },
        }),
    )
        .into_response();
    match code {
        ErrorCode::Busy => {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        ErrorCode::Unauthorized => {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        _ => {}
    }
    response
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = self.0.code();
        let message = self.0.message();
        if code == ErrorCode::Internal {
            tracing::error!(error = %message, "request failed");
        } else {
            tracing::debug!(code = %code, error = %message, "request refused");
        }
        error_response(code, message)
    }
}

async fn not_found() -> Response {
    error_response(ErrorCode::NotFound, "no such route".to_string())
}

async fn method_not_allowed(req: Request) -> Response {
    error_response(
        ErrorCode::MethodNotAllowed,
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

fn bearer(headers: &HeaderMap) -> Result<&str, ControlError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| ControlError::Unauthorized("missing bearer token".to_string()))?;
    value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ControlError::Unauthorized(
                "malformed authorization header: expected `Bearer <token>`".to_string(),
            )
        })
}

/// A request from a user with a valid API token.
pub struct User(
    /// The token's name.
    pub String,
);

impl FromRequestParts<AppState> for User {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, core: &AppState) -> Result<Self, ApiError> {
        let token = bearer(&parts.headers)?;
        Ok(User(core.authenticate_user(token).await?))
    }
}

/// A request from a registered node's agent.
pub struct Agent(
    /// The node.
    pub Node,
);

impl FromRequestParts<AppState> for Agent {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, core: &AppState) -> Result<Self, ApiError> {
        let token = bearer(&parts.headers)?;
        Ok(Agent(core.authenticate_node(token).await?))
    }
}

type Body<T> = Result<Json<T>, JsonRejection>;
type Answer<T> = Result<Json<T>, ApiError>;

async fn create_cluster(
    State(core): State<AppState>,
    User(user): User,
    Strict(req): Strict<wire::ClusterCreate>,
) -> Result<(StatusCode, Json<wire::ClusterCreated>), ApiError> {
    tracing::info!(user = %user, cluster = %req.spec.name, "create cluster");
    Ok((
        StatusCode::CREATED,
        Json(core.create_cluster(req.spec).await?),
    ))
}

async fn list_clusters(State(core): State<AppState>, _user: User) -> Answer<wire::ClusterList> {
    Ok(Json(core.clusters().await?))
}

async fn show_cluster(
    State(core): State<AppState>,
    _user: User,
    Path(name): Path<String>,
) -> Answer<wire::ClusterInfo> {
    Ok(Json(core.cluster(name).await?))
}

async fn update_cluster(
    State(core): State<AppState>,
    _user: User,
    Path(name): Path<String>,
    Strict(update): Strict<ComputeUpdate>,
) -> Answer<wire::ClusterInfo> {
    Ok(Json(core.update_cluster(name, update).await?))
}

/// `?force=true`.
#[derive(Debug, Deserialize)]
struct DeleteQuery {
    #[serde(default)]
    force: bool,
}

async fn delete_cluster(
    State(core): State<AppState>,
    User(user): User,
    Path(name): Path<String>,
    query: Result<Query<DeleteQuery>, QueryRejection>,
) -> Answer<wire::ClusterDeleted> {
    let Query(q) = query?;
    tracing::info!(user = %user, cluster = %name, force = q.force, "delete cluster");
    Ok(Json(core.delete_cluster(name, q.force).await?))
}

async fn submit_job(
    State(core): State<AppState>,
    User(user): User,
    Strict(req): Strict<wire::JobSubmit>,
) -> Result<(StatusCode, Json<wire::JobInfo>), ApiError> {
    tracing::info!(user = %user, job = ?req.spec.name(), "submit job");
    Ok((StatusCode::CREATED, Json(core.submit_job(req).await?)))
}

/// `?compute=NAME`.
#[derive(Debug, Deserialize)]
struct ComputeQuery {
    compute: Option<String>,
}

async fn list_jobs(
    State(core): State<AppState>,
    _user: User,
    query: Result<Query<ComputeQuery>, QueryRejection>,
) -> Answer<wire::JobList> {
    let Query(q) = query?;
    Ok(Json(core.jobs(q.compute).await?))
}

async fn show_job(
    State(core): State<AppState>,
    _user: User,
    Path(id): Path<String>,
) -> Answer<wire::JobInfo> {
    Ok(Json(core.job(id).await?))
}

async fn cancel_job(
    State(core): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
) -> Answer<wire::JobInfo> {
    tracing::info!(user = %user, job = %id, "cancel job");
    Ok(Json(core.cancel_job(id).await?))
}

/// `?from=N&limit=M&attempt=A`.
#[derive(Debug, Deserialize)]
struct LogQuery {
    #[serde(default)]
    from: u64,
    limit: Option<usize>,
    attempt: Option<u32>,
}

async fn job_logs(
    State(core): State<AppState>,
    _user: User,
    Path(id): Path<String>,
    query: Result<Query<LogQuery>, QueryRejection>,
) -> Answer<wire::LogPage> {
    let Query(q) = query?;
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    Ok(Json(core.job_logs(id, q.attempt, q.from, limit).await?))
}

async fn list_nodes(
    State(core): State<AppState>,
    _user: User,
    query: Result<Query<ComputeQuery>, QueryRejection>,
) -> Answer<wire::NodeList> {
    let Query(q) = query?;
    Ok(Json(core.nodes(q.compute).await?))
}

async fn show_node(
    State(core): State<AppState>,
    _user: User,
    Path(id): Path<String>,
) -> Answer<wire::NodeInfo> {
    Ok(Json(core.node(id).await?))
}

/// Prometheus text, unauthenticated like most `/metrics` endpoints: counts
/// and cluster names only, no secrets.
async fn metrics(State(core): State<AppState>) -> Result<Response, ApiError> {
    let text = core.metrics_text().await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

async fn evict_node(
    State(core): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
) -> Answer<wire::EvictResponse> {
    tracing::info!(user = %user, node = %id, "evict node");
    let event_id = core.evict_node(id.clone()).await?;
    Ok(Json(wire::EvictResponse { node: id, event_id }))
}

async fn register(
    State(core): State<AppState>,
    body: Body<wire::RegisterRequest>,
) -> Result<(StatusCode, Json<wire::RegisterResponse>), ApiError> {
    let Json(req) = body?;
    Ok((StatusCode::CREATED, Json(core.register(req).await?)))
}

/// Authenticates inside the heartbeat's own store turn (see
/// [`ControlPlane::heartbeat_with_credential`]) rather than through [`Agent`].
async fn heartbeat(
    State(core): State<AppState>,
    headers: HeaderMap,
    body: Body<wire::HeartbeatRequest>,
) -> Answer<wire::HeartbeatResponse> {
    let credential = bearer(&headers)?;
    let Json(req) = body?;
    Ok(Json(core.heartbeat_with_credential(credential, req).await?))
}

/// `?version=N&timeout=S`.
#[derive(Debug, Deserialize)]
struct WatchQuery {
    #[serde(default)]
    version: u64,
    /// Seconds; fractions allowed.
    timeout: Option<f64>,
}

async fn assignments(
    State(core): State<AppState>,
    Agent(node): Agent,
    query: Result<Query<WatchQuery>, QueryRejection>,
) -> Answer<wire::Assignments> {
    let Query(q) = query?;
    let timeout = match q.timeout {
        Some(s) if s.is_finite() && s >= 0.0 => Some(Duration::from_secs_f64(s.min(86_400.0))),
        Some(s) => {
            return Err(ControlError::Invalid(format!(
                "timeout must be a non-negative number of seconds, got {s}"
            ))
            .into());
        }
        None => None,
    };
    Ok(Json(core.assignments(node.id, q.version, timeout).await?))
}

async fn upload_logs(
    State(core): State<AppState>,
    Agent(node): Agent,
    body: Body<wire::LogBatch>,
) -> Answer<wire::LogBatchAccepted> {
    let Json(batch) = body?;
    Ok(Json(core.upload_logs(node.id, batch).await?))
}

/// `?attempt=N`.
#[derive(Debug, Deserialize)]
struct AttemptQuery {
    attempt: Option<u32>,
}

async fn job_outputs(
    State(core): State<AppState>,
    _user: User,
    Path(id): Path<String>,
    query: Result<Query<AttemptQuery>, QueryRejection>,
) -> Answer<api_files::JobOutputs> {
    let Query(q) = query?;
    Ok(Json(core.job_outputs(id, q.attempt).await?))
}

async fn post_outputs(
    State(core): State<AppState>,
    Agent(node): Agent,
    body: Body<api_files::PartOutputs>,
) -> Answer<api_files::PartOutputsAccepted> {
    let Json(posted) = body?;
    Ok(Json(core.post_outputs(node, posted).await?))
}

fn parse_digest(text: &str) -> Result<Digest, ApiError> {
    text.parse::<Digest>()
        .map_err(|e| ApiError(ControlError::Invalid(e.to_string())))
}

/// `Range: bytes=N-`: the start, or `None` without a range.
fn range_start(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get(header::RANGE) else {
        return Ok(None);
    };
    let bad = || {
        ApiError(ControlError::Invalid(
            "only `Range: bytes=N-` is supported".to_string(),
        ))
    };
    let text = value.to_str().map_err(|_| bad())?;
    let start = text
        .strip_prefix("bytes=")
        .and_then(|r| r.strip_suffix('-'))
        .ok_or_else(bad)?;
    start.parse::<u64>().map(Some).map_err(|_| bad())
}

async fn head_blob(core: &ControlPlane, digest: &str) -> Result<Response, ApiError> {
    let d = parse_digest(digest)?;
    match core
        .artifacts()?
        .stat(&d)
        .await
        .map_err(ControlError::from)?
    {
        Some(size) => Ok((
            StatusCode::OK,
            [
                (header::CONTENT_LENGTH, size.to_string()),
                (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            ],
        )
            .into_response()),
        None => Ok(StatusCode::NOT_FOUND.into_response()),
    }
}

async fn get_blob(
    core: &ControlPlane,
    digest: &str,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let d = parse_digest(digest)?;
    let from = range_start(headers)?;
    let (size, stream) = core
        .artifacts()?
        .read(&d, from.unwrap_or(0))
        .await
        .map_err(ControlError::from)?;
    let body = HttpBody::from_stream(stream);
    let mut response = Response::new(body);
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let from = from.unwrap_or(0);
    if let Ok(v) = HeaderValue::from_str(&(size - from).to_string()) {
        h.insert(header::CONTENT_LENGTH, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", d.hex())) {
        h.insert(header::ETAG, v);
    }
    if headers.contains_key(header::RANGE) {
        let end = size.saturating_sub(1);
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {from}-{end}/{size}")) {
            h.insert(header::CONTENT_RANGE, v);
        }
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
    Ok(response)
}

/// `?size=TOTAL&offset=N`.
#[derive(Debug, Deserialize)]
struct PutQuery {
    size: u64,
    offset: u64,
}

async fn put_blob(
    core: &ControlPlane,
    digest: &str,
    query: Result<Query<PutQuery>, QueryRejection>,
    headers: &HeaderMap,
    body: HttpBody,
) -> Result<Response, ApiError> {
    let d = parse_digest(digest)?;
    let Query(q) = query?;
    if q.size > api_files::MAX_BLOB_BYTES {
        return Err(ControlError::TooLarge(format!(
            "a blob may be at most {} bytes; this one is {}",
            api_files::MAX_BLOB_BYTES,
            q.size
        ))
        .into());
    }
    if q.offset > q.size {
        return Err(ControlError::Invalid(format!(
            "offset {} is past the blob's size {}",
            q.offset, q.size
        ))
        .into());
    }
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(length) = length
        && length > q.size - q.offset
    {
        return Err(ControlError::Invalid(format!(
            "the body is {length} bytes, more than the {} left of the blob's {} from offset {}",
            q.size - q.offset,
            q.size,
            q.offset
        ))
        .into());
    }
    let outcome = core
        .artifacts()?
        .put(d, q.size, q.offset, body.into_data_stream())
        .await
        .map_err(ControlError::from)?;
    Ok(match outcome {
        PutOutcome::AlreadyStored(info) => (StatusCode::OK, Json(info)).into_response(),
        PutOutcome::Stored(info) => (StatusCode::CREATED, Json(info)).into_response(),
        PutOutcome::Staged(offset) => (
            StatusCode::ACCEPTED,
            Json(api_files::UploadStatus {
                digest: d,
                offset,
                complete: false,
            }),
        )
            .into_response(),
    })
}

async fn upload_status(core: &ControlPlane, digest: &str) -> Answer<api_files::UploadStatus> {
    let d = parse_digest(digest)?;
    Ok(Json(
        core.artifacts()?
            .upload_status(&d)
            .await
            .map_err(ControlError::from)?,
    ))
}

async fn user_head_blob(
    State(core): State<AppState>,
    _user: User,
    Path(digest): Path<String>,
) -> Result<Response, ApiError> {
    head_blob(&core, &digest).await
}

async fn agent_head_blob(
    State(core): State<AppState>,
    _agent: Agent,
    Path(digest): Path<String>,
) -> Result<Response, ApiError> {
    head_blob(&core, &digest).await
}

async fn user_get_blob(
    State(core): State<AppState>,
    _user: User,
    Path(digest): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    get_blob(&core, &digest, &headers).await
}

async fn agent_get_blob(
    State(core): State<AppState>,
    _agent: Agent,
    Path(digest): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    get_blob(&core, &digest, &headers).await
}

async fn user_put_blob(
    State(core): State<AppState>,
    _user: User,
    Path(digest): Path<String>,
    query: Result<Query<PutQuery>, QueryRejection>,
    headers: HeaderMap,
    body: HttpBody,
) -> Result<Response, ApiError> {
    put_blob(&core, &digest, query, &headers, body).await
}

async fn agent_put_blob(
    State(core): State<AppState>,
    _agent: Agent,
    Path(digest): Path<String>,
    query: Result<Query<PutQuery>, QueryRejection>,
    headers: HeaderMap,
    body: HttpBody,
) -> Result<Response, ApiError> {
    put_blob(&core, &digest, query, &headers, body).await
}

async fn user_upload_status(
    State(core): State<AppState>,
    _user: User,
    Path(digest): Path<String>,
) -> Answer<api_files::UploadStatus> {
    upload_status(&core, &digest).await
}

async fn agent_upload_status(
    State(core): State<AppState>,
    _agent: Agent,
    Path(digest): Path<String>,
) -> Answer<api_files::UploadStatus> {
    upload_status(&core, &digest).await
}

async fn create_datastore(
    State(core): State<AppState>,
    User(user): User,
    Strict(req): Strict<drover_api::datastore::DatastoreCreate>,
) -> Result<(StatusCode, Json<drover_api::datastore::DatastoreInfo>), ApiError> {
    tracing::info!(user = %user, datastore = %req.spec.name, "create datastore");
    Ok((
        StatusCode::CREATED,
        Json(core.create_datastore(req.spec).await?),
    ))
}

async fn list_datastores(
    State(core): State<AppState>,
    _user: User,
) -> Answer<drover_api::datastore::DatastoreList> {
    Ok(Json(core.datastores().await?))
}

async fn show_datastore(
    State(core): State<AppState>,
    _user: User,
    Path(name): Path<String>,
) -> Answer<drover_api::datastore::DatastoreInfo> {
    Ok(Json(core.datastore(name).await?))
}

async fn delete_datastore(
    State(core): State<AppState>,
    User(user): User,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    tracing::info!(user = %user, datastore = %name, "delete datastore");
    core.delete_datastore(name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `?include_archived=true`.
#[derive(Debug, Deserialize)]
struct ArchivedQuery {
    #[serde(default)]
    include_archived: bool,
}

/// `latest` or a version.
fn version_selector(version: String) -> VersionSelector {
    if version == "latest" {
        VersionSelector::Latest
    } else {
        VersionSelector::Version(version)
    }
}

async fn create_environment(
    State(core): State<AppState>,
    User(user): User,
    Strict(req): Strict<drover_api::environment::EnvironmentCreate>,
) -> Result<(StatusCode, Json<drover_api::environment::EnvironmentInfo>), ApiError> {
    tracing::info!(user = %user, environment = %req.spec.name, "create environment");
    Ok((
        StatusCode::CREATED,
        Json(core.create_environment(req).await?),
    ))
}

async fn list_environments(
    State(core): State<AppState>,
    _user: User,
) -> Answer<drover_api::environment::EnvironmentList> {
    Ok(Json(core.list_environments(None, false).await?))
}

async fn list_environment_versions(
    State(core): State<AppState>,
    _user: User,
    Path(name): Path<String>,
    query: Result<Query<ArchivedQuery>, QueryRejection>,
) -> Answer<drover_api::environment::EnvironmentList> {
    let Query(q) = query?;
    Ok(Json(
        core.list_environments(Some(name), q.include_archived)
            .await?,
    ))
}

async fn show_environment(
    State(core): State<AppState>,
    _user: User,
    Path((name, version)): Path<(String, String)>,
) -> Answer<drover_api::environment::EnvironmentInfo> {
    Ok(Json(
        core.show_environment(name, version_selector(version))
            .await?,
    ))
}

async fn agent_show_environment(
    State(core): State<AppState>,
    _agent: Agent,
    Path((name, version)): Path<(String, String)>,
) -> Answer<drover_api::environment::EnvironmentInfo> {
    Ok(Json(
        core.show_environment(name, version_selector(version))
            .await?,
    ))
}

async fn update_environment(
    State(core): State<AppState>,
    User(user): User,
    Path((name, version)): Path<(String, String)>,
    Strict(update): Strict<drover_api::environment::EnvironmentUpdate>,
) -> Answer<drover_api::environment::EnvironmentInfo> {
    tracing::info!(user = %user, environment = %name, version = %version, "update environment");
    Ok(Json(core.update_environment(name, version, update).await?))
}

async fn set_archived(
    core: &AppState,
    user: &str,
    name: String,
    version: Option<String>,
    archived: bool,
) -> Result<Json<serde_json::Value>, ApiError> {
    tracing::info!(user = %user, environment = %name, version = ?version, archived, "archive environment");
    let n = core.archive_environment(name, version, archived).await?;
    Ok(Json(serde_json::json!({ "versions": n })))
}

async fn archive_environment(
    State(core): State<AppState>,
    User(user): User,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    set_archived(&core, &user, name, Some(version), true).await
}

async fn restore_environment(
    State(core): State<AppState>,
    User(user): User,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    set_archived(&core, &user, name, Some(version), false).await
}

async fn archive_all_versions(
    State(core): State<AppState>,
    User(user): User,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    set_archived(&core, &user, name, None, true).await
}

async fn restore_all_versions(
    State(core): State<AppState>,
    User(user): User,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    set_archived(&core, &user, name, None, false).await
}

async fn agent_request_build(
    State(core): State<AppState>,
    Agent(node): Agent,
    body: Body<drover_api::environment::BuildRequest>,
) -> Answer<drover_api::environment::BuildDecision> {
    let Json(req) = body?;
    Ok(Json(core.request_build(node.id, req).await?))
}

async fn agent_report_build(
    State(core): State<AppState>,
    Agent(node): Agent,
    body: Body<drover_api::environment::BuildReport>,
) -> Answer<serde_json::Value> {
    let Json(report) = body?;
    core.report_build(node.id, report).await?;
    Ok(Json(serde_json::json!({})))
}

/// `?path=P`.
#[derive(Debug, Deserialize)]
struct PathQuery {
    #[serde(default)]
    path: String,
}

async fn agent_list_datastore(
    State(core): State<AppState>,
    _agent: Agent,
    Path(name): Path<String>,
    query: Result<Query<PathQuery>, QueryRejection>,
) -> Answer<api_files::DataListing> {
    let Query(q) = query?;
    Ok(Json(core.list_datastore(name, q.path).await?))
}

async fn agent_datastore_file(
    State(core): State<AppState>,
    _agent: Agent,
    Path(name): Path<String>,
    query: Result<Query<PathQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query?;
    let (size, version, stream) = core.datastore_file(name, q.path).await?;
    let mut response = Response::new(HttpBody::from_stream(stream));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(v) = HeaderValue::from_str(&size.to_string()) {
        h.insert(header::CONTENT_LENGTH, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("\"{version}\"")) {
        h.insert(header::ETAG, v);
    }
    Ok(response)
}
