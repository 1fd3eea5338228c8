//! The token endpoint: managed-identity tokens for job containers over
//! Azure ML's protocol (`GET /msi/token`, `MSI_ENDPOINT`) and App
//! Service's (`GET /identity/token`, `IDENTITY_ENDPOINT`), on its own
//! listener (`--identity-listen`, `127.0.0.1:46808` by default: job
//! containers share the node's network on a VM's host network and on a
//! local cluster's node container).
//!
//! Only translates: the secret header and the raw query go to
//! [`IdentityService::answer`], which authenticates, authorizes, audits and
//! answers in the protocol's JSON; this module writes that as HTTP. Other
//! paths get 404 and other methods 405, as JSON.

use std::sync::Arc;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

use crate::identity::protocol::{APP_SERVICE_PATH, AZURE_ML_PATH, Protocol};
use crate::identity::{IdentityService, SecretHeader};

/// The endpoint's router.
pub fn router(service: Arc<IdentityService>) -> Router {
    Router::new()
        .route(
            AZURE_ML_PATH,
            get(azure_ml).fallback(|| async { wrong_method(Protocol::AzureMl) }),
        )
        .route(
            APP_SERVICE_PATH,
            get(app_service).fallback(|| async { wrong_method(Protocol::AppService) }),
        )
        .fallback(not_found)
        .with_state(service)
}

async fn azure_ml(
    State(service): State<Arc<IdentityService>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    token(&service, Protocol::AzureMl, &headers, query).await
}

async fn app_service(
    State(service): State<Arc<IdentityService>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    token(&service, Protocol::AppService, &headers, query).await
}

async fn token(
    service: &IdentityService,
    protocol: Protocol,
    headers: &HeaderMap,
    query: Option<String>,
) -> Response {
    let mut values = headers.get_all(protocol.secret_header()).iter();
    let secret = match (values.next(), values.next()) {
        (None, _) => SecretHeader::Missing,
        (Some(v), None) => SecretHeader::One(v.as_bytes()),
        (Some(_), Some(_)) => SecretHeader::Many,
    };
    let answer = service
        .answer(protocol, secret, query.as_deref().unwrap_or(""))
        .await;
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = json_response(status, &answer.body);
    if let Some(secs) = answer.retry_after
        && let Ok(v) = HeaderValue::from_str(&secs.to_string())
    {
        response.headers_mut().insert(header::RETRY_AFTER, v);
    }
    response
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn wrong_method(protocol: Protocol) -> Response {
    let body = crate::identity::protocol::error_body(
        protocol,
        405,
        "method_not_allowed",
        "only GET is served here",
        "",
    );
    let mut response = json_response(StatusCode::METHOD_NOT_ALLOWED, &body);
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET,HEAD"));
    response
}

async fn not_found() -> Response {
    json_response(
        StatusCode::NOT_FOUND,
        &json!({
            "error": "not_found",
            "error_description": format!("tokens are served at {AZURE_ML_PATH} and {APP_SERVICE_PATH}"),
        }),
    )
}
