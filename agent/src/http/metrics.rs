//! `GET /metrics`: the agent's [`Metrics`] as Prometheus text.
//!
//! Unauthenticated, on its own listener (`--metrics-listen`). Each answer
//! closes its connection, as the agent's metrics endpoint always has:
//! scrapers that read an answer to the end of the stream rely on it.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::metrics::Metrics;

/// The Prometheus text exposition format's content type.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The `/metrics` router: 200 with the metrics for `GET` (and `HEAD`), 405
/// for other methods, 404 for any other path.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(render))
        .fallback(not_found)
        .with_state(metrics)
        .layer(axum::middleware::map_response(close_connection))
}

async fn render(State(metrics): State<Arc<Metrics>>) -> Response {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], metrics.render()).into_response()
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        "not found\n",
    )
        .into_response()
}

/// One request per connection (see the module doc).
async fn close_connection(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::http::serve;

    #[tokio::test]
    async fn metrics_listener_answers_get_and_refuses_the_rest() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let metrics = Arc::new(Metrics::default());
        metrics.pulls.inc();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(listener, router(metrics), shutdown.clone()));
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client");
        let url = |path: &str| format!("http://{addr}{path}");

        let ok = http.get(url("/metrics")).send().await.expect("get");
        assert_eq!(ok.status(), 200);
        assert_eq!(
            ok.headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some(CONTENT_TYPE)
        );
        let text = ok.text().await.expect("body");
        assert!(text.contains("drover_agent_pulls_total 1"), "{text}");
        assert!(
            text.contains("# TYPE drover_agent_heartbeat_latency_seconds histogram"),
            "{text}"
        );

        let post = http.post(url("/metrics")).send().await.expect("post");
        assert_eq!(post.status(), 405);
        let nope = http.get(url("/nope")).send().await.expect("get /nope");
        assert_eq!(nope.status(), 404);

        // A client that reads to the end of the stream gets it: the server
        // closes the connection after the answer.
        let mut conn = TcpStream::connect(addr).await.expect("connect");
        conn.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut raw))
            .await
            .expect("the server closes the connection")
            .expect("read");
        let raw = String::from_utf8_lossy(&raw);
        assert!(raw.starts_with("HTTP/1.1 200 OK"), "{raw}");
        assert!(raw.contains("drover_agent_pulls_total 1"), "{raw}");

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(3), server)
            .await
            .expect("the server stops at shutdown")
            .expect("server task");
    }
}
