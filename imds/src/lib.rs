//! Client for the Azure Instance Metadata Service (IMDS): who this VM is,
//! managed-identity tokens, and scheduled events (preemption, maintenance).
//!
//! Architecture invariant: this crate is the only code in Drover that speaks
//! HTTP to IMDS. It follows Azure's contract
//! (<https://learn.microsoft.com/azure/virtual-machines/instance-metadata-service>):
//! `Metadata: true` on every request, no proxy, fixed api-versions, Microsoft's
//! retry guidance ([`RetryPolicy`]) and a client-side limiter that keeps under
//! IMDS's 5 req/s (20 req/s for identity) so the agent never causes a 429.
//!
//! It knows nothing of the agent: the node agent uses it for its VM's
//! metadata and scheduled events, and the control plane can use it for
//! tokens of its own managed identity.

mod date;
mod events;
mod instance;
mod limiter;
mod retry;
mod token;
mod wire;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, StatusCode};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;
use url::Url;

pub use date::{InvalidDate, parse_event_time};
pub use events::{
    DEFAULT_POLL_INTERVAL, EVENTS_API_VERSION, EventStatus, EventType, EventsUpdate,
    ScheduledEvent, ScheduledEvents, ScheduledEventsWatcher,
};
pub use instance::{
    Compute, INSTANCE_API_VERSION, InstanceMetadata, Interface, IpAddress, IpConfig, Network,
    Priority, Tag,
};
pub use retry::{RetryPolicy, is_retryable_status};
pub use token::{AccessToken, Identity, TOKEN_API_VERSION, refresh_ahead};

use limiter::RateLimiter;
use token::{Lookup, TokenCache, TokenResponse};

/// The IMDS address on every Azure VM.
pub const DEFAULT_BASE_URL: &str = "http://169.254.169.254";

/// Client settings.
#[derive(Debug, Clone)]
pub struct ImdsConfig {
    /// Where IMDS is: [`DEFAULT_BASE_URL`] on Azure, the emulator elsewhere.
    pub base_url: String,
    /// TCP connect timeout. IMDS is link-local and answers at once when it is
    /// there; a short timeout makes "not on Azure" quick to find out.
    pub connect_timeout: Duration,
    /// Whole-request timeout (a token can take a few seconds to mint).
    pub request_timeout: Duration,
    /// When to retry.
    pub retry: RetryPolicy,
    /// Client-side rate limits; `None` disables them (benchmarks only).
    pub rate_limits: Option<RateLimits>,
    /// `SO_MARK` on the client's sockets (setting it needs
    /// `CAP_NET_ADMIN`), so that a firewall can let only this client's
    /// packets reach IMDS; `None` leaves them unmarked.
    pub socket_mark: Option<u32>,
}

/// Requests per second the client allows itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimits {
    /// Instance metadata and scheduled events (IMDS: 5/s).
    pub general: u32,
    /// Identity tokens (IMDS: 20/s).
    pub identity: u32,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            general: 5,
            identity: 20,
        }
    }
}

impl Default for ImdsConfig {
    fn default() -> Self {
        Self {
            base_url: DEFAULT_BASE_URL.to_owned(),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
            retry: RetryPolicy::default(),
            rate_limits: Some(RateLimits::default()),
            socket_mark: None,
        }
    }
}

/// A failed IMDS operation.
#[derive(Debug, thiserror::Error)]
pub enum ImdsError {
    /// The configured base URL is not a URL.
    #[error("parse imds base url {0:?}")]
    ParseBaseUrl(String),
    /// Fetching instance metadata failed.
    #[error("get instance metadata")]
    GetInstanceMetadata(#[source] RequestError),
    /// Fetching a token failed.
    #[error("get token for {resource} ({identity})")]
    GetToken {
        /// The resource asked for.
        resource: String,
        /// The identity asked for.
        identity: Identity,
        /// Why.
        #[source]
        source: RequestError,
    },
    /// Fetching scheduled events failed.
    #[error("get scheduled events")]
    GetScheduledEvents(#[source] RequestError),
    /// Acknowledging scheduled events failed.
    #[error("acknowledge scheduled events {event_ids:?}")]
    AcknowledgeEvents {
        /// The events.
        event_ids: Vec<String>,
        /// Why.
        #[source]
        source: RequestError,
    },
}

impl ImdsError {
    /// The request failure behind this error, if any.
    pub fn request_error(&self) -> Option<&RequestError> {
        match self {
            Self::ParseBaseUrl(_) => None,
            Self::GetInstanceMetadata(e) | Self::GetScheduledEvents(e) => Some(e),
            Self::GetToken { source, .. } | Self::AcknowledgeEvents { source, .. } => Some(source),
        }
    }

    /// IMDS's `(error, error_description)` when IMDS rejected the request.
    pub fn rejection(&self) -> Option<(&str, &str)> {
        match self.request_error()? {
            RequestError::Rejected {
                error, description, ..
            } => Some((error, description)),
            _ => None,
        }
    }
}

/// Why one IMDS request failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// IMDS answered with a status that must not be retried (a 4xx other
    /// than 404, 410 and 429). `error` and `description` are IMDS's own
    /// `error` and `error_description`.
    #[error("imds rejected the request ({status}): {error}{}", if description.is_empty() { String::new() } else { format!(": {description}") })]
    Rejected {
        /// HTTP status.
        status: u16,
        /// IMDS's `error` (the body, if it was not JSON).
        error: String,
        /// IMDS's `error_description` (`""` when absent).
        description: String,
    },
    /// Every try allowed by the [`RetryPolicy`] failed.
    #[error("gave up after {attempts} tries in {elapsed:?}")]
    RetriesExhausted {
        /// Tries made.
        attempts: u32,
        /// Time from the first try to giving up.
        elapsed: Duration,
        /// The last failure.
        #[source]
        last: AttemptError,
    },
    /// The answer was not the JSON expected.
    #[error("decode imds response")]
    Decode(#[source] serde_json::Error),
}

/// One failed try.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    /// IMDS answered with a retryable status.
    #[error("imds answered {status}: {body}")]
    Status {
        /// HTTP status.
        status: u16,
        /// The body, for the log.
        body: String,
    },
    /// No answer: connect failure, timeout, broken connection.
    #[error("send request to imds")]
    Transport(#[source] TransportError),
}

/// Why a try got no answer.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Nothing came back in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Connecting, sending or receiving failed (boxed: the client's error
    /// is large, and errors travel by value).
    #[error(transparent)]
    Http(Box<hyper_util::client::legacy::Error>),
    /// The answer's body broke off.
    #[error("read the answer")]
    Body(#[source] hyper::Error),
    /// The request could not be made (a URL the HTTP types refuse).
    #[error("make the request")]
    Request(#[source] hyper::http::Error),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    General,
    Identity,
}

struct Inner {
    http: HttpClient<HttpConnector, Full<Bytes>>,
    request_timeout: Duration,
    base: Url,
    retry: RetryPolicy,
    general: Option<RateLimiter>,
    identity: Option<RateLimiter>,
    tokens: TokenCache,
}

/// The IMDS client. Cheap to clone; clones share the token cache and limiters.
#[derive(Clone)]
pub struct ImdsClient {
    inner: Arc<Inner>,
}

impl ImdsClient {
    /// A client for `config`.
    pub fn new(config: ImdsConfig) -> Result<Self, ImdsError> {
        let base = Url::parse(&config.base_url)
            .map_err(|_| ImdsError::ParseBaseUrl(config.base_url.clone()))?;
        if base.cannot_be_a_base() || base.scheme() != "http" {
            return Err(ImdsError::ParseBaseUrl(config.base_url));
        }
        // Plain HTTP, straight to IMDS: it must never be reached through a
        // proxy (https://learn.microsoft.com/azure/virtual-machines/instance-metadata-service#proxies),
        // and this client has no proxy support at all.
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_nodelay(true);
        connector.set_mark(config.socket_mark);
        let http = HttpClient::builder(TokioExecutor::new()).build(connector);
        let limits = config.rate_limits;
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                request_timeout: config.request_timeout,
                base,
                retry: config.retry,
                general: limits.map(|l| RateLimiter::new(l.general)),
                identity: limits.map(|l| RateLimiter::new(l.identity)),
                tokens: TokenCache::default(),
            }),
        })
    }

    /// Instance metadata of this VM.
    pub async fn instance_metadata(&self) -> Result<InstanceMetadata, ImdsError> {
        let url = self.url(
            "/metadata/instance",
            &[("api-version", INSTANCE_API_VERSION)],
        );
        let body = self
            .send(Class::General, Method::GET, url, None)
            .await
            .map_err(ImdsError::GetInstanceMetadata)?;
        serde_json::from_slice(&body)
            .map_err(|e| ImdsError::GetInstanceMetadata(RequestError::Decode(e)))
    }

    /// A token for `resource` (e.g. `https://management.azure.com/`) as
    /// `identity`, from the cache when it holds one that is not due for
    /// refresh. Concurrent callers for one (resource, identity) share one
    /// request. A token due for refresh is still handed out while one
    /// background request replaces it.
    pub async fn token(
        &self,
        resource: &str,
        identity: &Identity,
    ) -> Result<Arc<AccessToken>, ImdsError> {
        let slot = self.inner.tokens.slot(resource, identity);
        match TokenCache::lookup(&slot) {
            Lookup::Fresh(token) => return Ok(token),
            Lookup::Stale(token) => {
                // Whoever wins the lock refreshes in the background; everyone
                // (the winner included) keeps using the still-valid token.
                if let Ok(guard) = slot.fetch.clone().try_lock_owned() {
                    let client = self.clone();
                    let (resource, identity) = (resource.to_owned(), identity.clone());
                    let slot = slot.clone();
                    tokio::spawn(async move {
                        let _guard = guard;
                        if matches!(TokenCache::lookup(&slot), Lookup::Fresh(_)) {
                            return;
                        }
                        match client.fetch_token(&resource, &identity).await {
                            Ok(fresh) => slot.store(Arc::new(fresh)),
                            Err(error) => tracing::warn!(
                                %resource, %identity, error = %error, cause = ?error.request_error(),
                                "imds token refresh failed; keeping the current token"
                            ),
                        }
                    });
                }
                return Ok(token);
            }
            Lookup::Missing => {}
        }
        let _guard = slot.fetch.lock().await;
        // Someone else may have fetched while we waited for the lock.
        if let Lookup::Fresh(token) | Lookup::Stale(token) = TokenCache::lookup(&slot) {
            return Ok(token);
        }
        let token = Arc::new(self.fetch_token(resource, identity).await?);
        slot.store(token.clone());
        Ok(token)
    }

    /// One token request to IMDS, bypassing the cache.
    pub async fn fetch_token(
        &self,
        resource: &str,
        identity: &Identity,
    ) -> Result<AccessToken, ImdsError> {
        let mut query = vec![("api-version", TOKEN_API_VERSION), ("resource", resource)];
        query.extend(identity.query_param());
        let url = self.url("/metadata/identity/oauth2/token", &query);
        let err = |source| ImdsError::GetToken {
            resource: resource.to_owned(),
            identity: identity.clone(),
            source,
        };
        let body = self
            .send(Class::Identity, Method::GET, url, None)
            .await
            .map_err(err)?;
        let received = Instant::now();
        let response: TokenResponse =
            serde_json::from_slice(&body).map_err(|e| err(RequestError::Decode(e)))?;
        Ok(AccessToken::from_response(response, received))
    }

    /// The scheduled-events document.
    pub async fn scheduled_events(&self) -> Result<ScheduledEvents, ImdsError> {
        self.scheduled_events_with(&self.inner.retry).await
    }

    /// The scheduled-events document, retried by `retry` instead of the
    /// client's policy (the watcher's, whose waits are cut to its interval).
    pub(crate) async fn scheduled_events_with(
        &self,
        retry: &RetryPolicy,
    ) -> Result<ScheduledEvents, ImdsError> {
        let url = self.url(
            "/metadata/scheduledevents",
            &[("api-version", EVENTS_API_VERSION)],
        );
        let body = self
            .send_with(retry, Class::General, Method::GET, url, None)
            .await
            .map_err(ImdsError::GetScheduledEvents)?;
        serde_json::from_slice(&body)
            .map_err(|e| ImdsError::GetScheduledEvents(RequestError::Decode(e)))
    }

    /// Approves events so that they may start before `NotBefore`.
    pub async fn acknowledge_events(&self, event_ids: &[String]) -> Result<(), ImdsError> {
        let body = serde_json::json!({
            "StartRequests": event_ids.iter().map(|id| serde_json::json!({"EventId": id})).collect::<Vec<_>>(),
        });
        let url = self.url(
            "/metadata/scheduledevents",
            &[("api-version", EVENTS_API_VERSION)],
        );
        self.send(Class::General, Method::POST, url, Some(body.to_string()))
            .await
            .map(|_| ())
            .map_err(|source| ImdsError::AcknowledgeEvents {
                event_ids: event_ids.to_vec(),
                source,
            })
    }

    /// The retry policy this client was made with.
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.inner.retry
    }

    /// A watcher of scheduled events for the VM called `vm_name`.
    pub fn scheduled_events_watcher(&self, vm_name: &str) -> ScheduledEventsWatcher {
        ScheduledEventsWatcher::new(self.clone(), vm_name)
    }

    fn url(&self, path: &str, query: &[(&str, &str)]) -> Url {
        let mut url = self.inner.base.clone();
        let prefix = url.path().trim_end_matches('/').to_owned();
        url.set_path(&format!("{prefix}{path}"));
        url.query_pairs_mut().clear().extend_pairs(query);
        url
    }

    /// Sends one request with the client's retries, rate limiting and the
    /// `Metadata` header; returns the body of the 2xx answer.
    async fn send(
        &self,
        class: Class,
        method: Method,
        url: Url,
        body: Option<String>,
    ) -> Result<Vec<u8>, RequestError> {
        self.send_with(&self.inner.retry, class, method, url, body)
            .await
    }

    /// [`ImdsClient::send`] with the retries of `retry`.
    async fn send_with(
        &self,
        retry: &RetryPolicy,
        class: Class,
        method: Method,
        url: Url,
        body: Option<String>,
    ) -> Result<Vec<u8>, RequestError> {
        let limiter = match class {
            Class::General => self.inner.general.as_ref(),
            Class::Identity => self.inner.identity.as_ref(),
        };
        let start = Instant::now();
        let mut failures: usize = 0;
        loop {
            if let Some(limiter) = limiter {
                limiter.acquire().await;
            }
            let (failure, retry_after) = match self.try_once(&method, &url, body.as_deref()).await {
                Ok((status, _, bytes)) if status.is_success() => return Ok(bytes.to_vec()),
                Ok((status, retry_after, bytes)) if is_retryable_status(status.as_u16()) => (
                    AttemptError::Status {
                        status: status.as_u16(),
                        body: String::from_utf8_lossy(&bytes).into_owned(),
                    },
                    retry_after,
                ),
                Ok((status, _, bytes)) => return Err(rejection(status, &bytes)),
                Err(e) => (AttemptError::Transport(e), None),
            };
            failures += 1;
            let gone = matches!(failure, AttemptError::Status { status: 410, .. });
            let elapsed = start.elapsed();
            let Some(delay) = retry.next_delay(failures, elapsed, gone, retry_after) else {
                return Err(RequestError::RetriesExhausted {
                    attempts: u32::try_from(failures).unwrap_or(u32::MAX),
                    elapsed,
                    last: failure,
                });
            };
            tracing::debug!(
                path = url.path(),
                attempt = failures,
                delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                error = %failure,
                "imds request failed; retrying"
            );
            tokio::time::sleep(delay).await;
        }
    }
}

impl ImdsClient {
    /// One request with the `Metadata` header, bounded by the request
    /// timeout: its status, `Retry-After` and whole body.
    async fn try_once(
        &self,
        method: &Method,
        url: &Url,
        body: Option<&str>,
    ) -> Result<(StatusCode, Option<Duration>, Bytes), TransportError> {
        let mut request = hyper::Request::builder()
            .method(method.clone())
            .uri(url.as_str())
            .header("Metadata", "true");
        if body.is_some() {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default().to_owned())))
            .map_err(TransportError::Request)?;
        let timeout = self.inner.request_timeout;
        let exchange = async {
            let response = self
                .inner
                .http
                .request(request)
                .await
                .map_err(|e| TransportError::Http(Box::new(e)))?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(hyper::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(retry::parse_retry_after);
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(TransportError::Body)?
                .to_bytes();
            Ok((status, retry_after, bytes))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| TransportError::Timeout(timeout))?
    }
}

fn rejection(status: StatusCode, body: &[u8]) -> RequestError {
    #[derive(serde::Deserialize)]
    struct ErrorBody {
        #[serde(default, deserialize_with = "wire::string")]
        error: String,
        #[serde(default, deserialize_with = "wire::string")]
        error_description: String,
    }
    let (error, description) = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(b) if !b.error.is_empty() => (b.error, b.error_description),
        _ => (
            String::from_utf8_lossy(body).trim().to_owned(),
            String::new(),
        ),
    };
    RequestError::Rejected {
        status: status.as_u16(),
        error,
        description,
    }
}
