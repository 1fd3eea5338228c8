//! The Azure Resource Manager boundary: the few VM scale set calls the
//! provider makes, with a bearer token from the control plane's managed
//! identity (IMDS) or a service principal (client credentials), retries
//! that honour `Retry-After` (429 and 5xx, with ARM's throttling headers
//! logged), and long-running operations polled through
//! `Azure-AsyncOperation` (or `Location`).
//!
//! Architecture Invariant: only this module speaks HTTP to ARM and to the
//! token endpoints; the secret and tokens never reach a log line, an error
//! or `Debug`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::Value;

/// The ARM api-version of every scale set call.
pub const API_VERSION: &str = "2024-07-01";

/// The ARM audience.
pub const ARM_RESOURCE: &str = "https://management.azure.com/";

/// The longest `Retry-After` honoured; longer answers wait this long.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// How the control plane authenticates to ARM.
#[derive(Clone)]
pub enum ArmCredential {
    /// Its own managed identity, through IMDS.
    ManagedIdentity(drover_imds::ImdsClient, drover_imds::Identity),
    /// A service principal's client credentials.
    ClientSecret {
        /// `https://login.microsoftonline.com` (or a test's).
        authority: String,
        /// The tenant.
        tenant: String,
        /// The application (client) id.
        client_id: String,
        /// Its secret.
        secret: String,
    },
}

impl std::fmt::Debug for ArmCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ArmCredential::ManagedIdentity(_, id) => {
                f.debug_tuple("ManagedIdentity").field(id).finish()
            }
            ArmCredential::ClientSecret {
                authority,
                tenant,
                client_id,
                ..
            } => f
                .debug_struct("ClientSecret")
                .field("authority", authority)
                .field("tenant", tenant)
                .field("client_id", client_id)
                .field("secret", &"<redacted>")
                .finish(),
        }
    }
}

/// An ARM call that failed.
#[derive(Debug, thiserror::Error)]
pub enum ArmError {
    /// ARM answered with an error body (`{"error": {"code", "message"}}`).
    #[error("azure refused ({code}): {message}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// ARM's error code (`OperationNotAllowed`, `SkuNotAvailable`, …).
        code: String,
        /// ARM's message.
        message: String,
    },
    /// A long-running operation ended other than `Succeeded`.
    #[error("the azure operation ended {status}: {code}: {message}")]
    OperationFailed {
        /// `Failed` or `Canceled`.
        status: String,
        /// ARM's error code.
        code: String,
        /// ARM's message.
        message: String,
    },
    /// No token.
    #[error("cannot get a token for azure resource manager: {0}")]
    Token(String),
    /// ARM or the token endpoint could not be reached.
    #[error("cannot reach {url}: {message}")]
    Transport {
        /// The URL, without its query.
        url: String,
        /// The cause.
        message: String,
    },
    /// An answer did not read as expected.
    #[error("unexpected answer from {url}: {message}")]
    Decode {
        /// The URL.
        url: String,
        /// What was wrong.
        message: String,
    },
    /// Still throttled or failing after every retry.
    #[error("{url} kept answering {status} after {attempts} tries")]
    GaveUp {
        /// The URL.
        url: String,
        /// The last status.
        status: u16,
        /// Tries made.
        attempts: u32,
    },
}

/// `{"error": {"code", "message"}}`.
#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Debug, Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// How long to wait before trying again, from `Retry-After` (seconds or an
/// HTTP date is not used by ARM: seconds only), bounded; `fallback` when
/// absent.
pub fn retry_after(header: Option<&str>, fallback: Duration) -> Duration {
    header
        .and_then(|h| h.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(fallback)
        .min(MAX_RETRY_AFTER)
}

/// `application/x-www-form-urlencoded` encoding of one value.
fn form_encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'*' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Whether an answer is worth trying again.
pub fn retryable(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

struct CachedToken {
    token: String,
    renew_at: Instant,
}

/// A small ARM client.
pub struct ArmClient {
    base: String,
    http: reqwest::Client,
    credential: ArmCredential,
    token: Mutex<Option<CachedToken>>,
    /// Tries per call (429 and 5xx are retried).
    pub attempts: u32,
    /// The wait between tries and polls when ARM names none.
    pub default_wait: Duration,
}

impl std::fmt::Debug for ArmClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArmClient")
            .field("base", &self.base)
            .field("credential", &self.credential)
            .finish_non_exhaustive()
    }
}

fn without_query(url: &str) -> String {
    url.split('?').next().unwrap_or(url).to_string()
}

impl ArmClient {
    /// A client of ARM at `base` (`https://management.azure.com`).
    pub fn new(base: &str, credential: ArmCredential) -> Result<ArmClient, ArmError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| ArmError::Transport {
                url: base.to_string(),
                message: e.to_string(),
            })?;
        Ok(ArmClient {
            base: base.trim_end_matches('/').to_string(),
            http,
            credential,
            token: Mutex::new(None),
            attempts: 6,
            default_wait: Duration::from_secs(2),
        })
    }

    async fn bearer(&self) -> Result<String, ArmError> {
        if let Some(t) = self
            .token
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .filter(|t| Instant::now() < t.renew_at)
        {
            return Ok(t.token.clone());
        }
        let (token, lifetime) = match &self.credential {
            ArmCredential::ManagedIdentity(imds, identity) => {
                let t = imds
                    .token(ARM_RESOURCE, identity)
                    .await
                    .map_err(|e| ArmError::Token(drover_api::error::chain(&e)))?;
                let left = t
                    .expires_on
                    .duration_since(std::time::SystemTime::now())
                    .unwrap_or_default();
                (t.token.clone(), left)
            }
            ArmCredential::ClientSecret {
                authority,
                tenant,
                client_id,
                secret,
            } => {
                let url = format!(
                    "{}/{tenant}/oauth2/v2.0/token",
                    authority.trim_end_matches('/')
                );
                let scope = format!("{ARM_RESOURCE}.default");
                let form = [
                    ("grant_type", "client_credentials"),
                    ("client_id", client_id.as_str()),
                    ("client_secret", secret.as_str()),
                    ("scope", scope.as_str()),
                ];
                let body = form
                    .iter()
                    .map(|(k, v)| format!("{k}={}", form_encode(v)))
                    .collect::<Vec<_>>()
                    .join("&");
                let resp = self
                    .http
                    .post(&url)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| ArmError::Token(format!("{url}: {e}")))?;
                let status = resp.status();
                let body: Value = resp.json().await.unwrap_or(Value::Null);
                if !status.is_success() {
                    let why = body["error_description"]
                        .as_str()
                        .or(body["error"].as_str())
                        .unwrap_or("no reason given");
                    return Err(ArmError::Token(format!("{url} answered {status}: {why}")));
                }
                let token = body["access_token"]
                    .as_str()
                    .ok_or_else(|| ArmError::Token(format!("{url} gave no access_token")))?
                    .to_string();
                let secs = body["expires_in"].as_u64().unwrap_or(3599);
                (token, Duration::from_secs(secs))
            }
        };
        // Renewed at four fifths of its life, as the SDKs do.
        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = Some(CachedToken {
            token: token.clone(),
            renew_at: Instant::now() + lifetime.mul_f64(0.8),
        });
        Ok(token)
    }

    /// The full URL of a resource path (`/subscriptions/…`) with the api-version.
    pub fn url(&self, path: &str) -> String {
        let sep = if path.contains('?') { '&' } else { '?' };
        format!("{}{path}{sep}api-version={API_VERSION}", self.base)
    }

    /// One call, retried on 429 and 5xx after `Retry-After`; an error
    /// answer becomes [`ArmError::Refused`]. Returns the status, the
    /// long-running operation's URL when there is one, and the body.
    pub async fn call(
        &self,
        method: Method,
        url: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Option<String>, Value), ArmError> {
        let shown = without_query(url);
        let mut last = 0;
        for attempt in 1..=self.attempts.max(1) {
            let token = self.bearer().await?;
            let mut req = self.http.request(method.clone(), url).bearer_auth(token);
            if let Some(b) = body {
                req = req.json(b);
            }
            let resp = req.send().await.map_err(|e| ArmError::Transport {
                url: shown.clone(),
                message: e.to_string(),
            })?;
            let status = resp.status();
            let headers = resp.headers().clone();
            let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
            if retryable(status) && attempt < self.attempts {
                let wait = retry_after(header("retry-after"), self.default_wait);
                tracing::warn!(
                    url = %shown,
                    status = status.as_u16(),
                    attempt,
                    wait_ms = wait.as_millis() as u64,
                    remaining_writes = header("x-ms-ratelimit-remaining-subscription-writes").unwrap_or("-"),
                    remaining_reads = header("x-ms-ratelimit-remaining-subscription-reads").unwrap_or("-"),
                    "azure throttled or failed; trying again"
                );
                last = status.as_u16();
                tokio::time::sleep(wait).await;
                continue;
            }
            let operation = header("azure-asyncoperation")
                .or_else(|| header("location"))
                .map(str::to_string);
            let text = resp.text().await.unwrap_or_default();
            let value: Value = if text.trim().is_empty() {
                Value::Null
            } else {
                serde_json::from_str(&text).map_err(|e| ArmError::Decode {
                    url: shown.clone(),
                    message: e.to_string(),
                })?
            };
            if !status.is_success() {
                let (code, message) = match serde_json::from_value::<ErrorBody>(value.clone()) {
                    Ok(b) => (b.error.code, b.error.message),
                    Err(_) => (status.as_u16().to_string(), text),
                };
                return Err(ArmError::Refused {
                    status: status.as_u16(),
                    code,
                    message,
                });
            }
            return Ok((status, operation, value));
        }
        Err(ArmError::GaveUp {
            url: shown,
            status: last,
            attempts: self.attempts,
        })
    }

    /// A call that may be long-running: a 201/202 with an operation URL is
    /// polled until the operation ends; a failed operation is an error.
    pub async fn call_and_wait(
        &self,
        method: Method,
        url: &str,
        body: Option<&Value>,
    ) -> Result<Value, ArmError> {
        let (status, operation, value) = self.call(method, url, body).await?;
        let Some(op) =
            operation.filter(|_| status == StatusCode::ACCEPTED || status == StatusCode::CREATED)
        else {
            return Ok(value);
        };
        loop {
            let (polled, _, answer) = self.call(Method::GET, &op, None).await?;
            // `Azure-AsyncOperation` answers carry a status; a `Location`
            // answers 202 while running and 200 (or 204) when done.
            let status = match answer["status"].as_str() {
                Some(s) => s,
                None if polled == StatusCode::ACCEPTED => "InProgress",
                None => "Succeeded",
            };
            match status {
                "InProgress" | "Accepted" | "Running" => {
                    tokio::time::sleep(self.default_wait).await;
                }
                "Succeeded" => return Ok(value),
                other => {
                    return Err(ArmError::OperationFailed {
                        status: other.to_string(),
                        code: answer["error"]["code"].as_str().unwrap_or("").to_string(),
                        message: answer["error"]["message"]
                            .as_str()
                            .unwrap_or("")
                            .to_string(),
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_honoured_and_bounded() {
        let d = Duration::from_secs(2);
        assert_eq!(retry_after(Some("5"), d), Duration::from_secs(5));
        assert_eq!(retry_after(Some("0.5"), d), Duration::from_millis(500));
        assert_eq!(retry_after(None, d), d);
        assert_eq!(retry_after(Some("soon"), d), d);
        assert_eq!(retry_after(Some("3600"), d), MAX_RETRY_AFTER);
        assert!(retryable(StatusCode::TOO_MANY_REQUESTS));
        assert!(retryable(StatusCode::SERVICE_UNAVAILABLE));
        assert!(!retryable(StatusCode::CONFLICT));
    }

    #[test]
    fn the_secret_never_shows() {
        let c = ArmCredential::ClientSecret {
            authority: "https://login.microsoftonline.com".into(),
            tenant: "t".into(),
            client_id: "c".into(),
            secret: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
