//! Logging in to a container registry with the node's managed identity,
//! the way Azure Container Registry expects (the one boundary module that
//! talks to a registry's token service; image pulls and pushes stay with
//! the container engine).
//!
//! 1. `GET https://REGISTRY/v2/` answers 401 with a `Bearer` challenge
//!    naming the token service (`realm`) and the registry's `service` name.
//! 2. An Entra access token for Resource Manager comes from IMDS (the
//!    node's client, so its cache and rate limits apply).
//! 3. `POST REALM-ORIGIN/oauth2/exchange` turns it into a refresh token
//!    for the service, valid for hours.
//! 4. The engine logs in with user `00000000-0000-0000-0000-000000000000`
//!    and the refresh token as password (what `az acr login` does), and
//!    asks the token service itself for each pull's or push's scope.
//!
//! Refresh tokens are kept per (registry, identity) until five minutes
//! before they expire, so a node makes one exchange per registry per few
//! hours whatever the number of pulls. Every login is one
//! [`RegistryLoginEvent`]: a log line and a metric.
//!
//! <https://github.com/Azure/acr/blob/main/docs/AAD-OAuth.md>

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use drover_imds::{Identity, ImdsClient};
use drover_runner::auth::RegistryAuth;
use serde::Deserialize;

use crate::metrics::Metrics;

/// The user name a registry refresh token logs in with.
pub const TOKEN_USERNAME: &str = "00000000-0000-0000-0000-000000000000";

/// The audience of the Entra token exchanged (ACR accepts Resource Manager's).
pub const ENTRA_RESOURCE: &str = "https://management.azure.com/";

/// A refresh token is not used in its last minutes.
const EXPIRY_MARGIN: Duration = Duration::from_secs(5 * 60);

/// How long a refresh token lives when it does not say (ACR: three hours).
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3 * 3600);

/// How long one request to a registry or its token service may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a registry login with the managed identity failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryLoginError {
    /// The node has no IMDS (no `--imds-url`), so no managed identity.
    #[error(
        "cannot log in to registry {registry} with a managed identity: this node has no IMDS (start the agent with --imds-url)"
    )]
    NoImds {
        /// The registry.
        registry: String,
    },
    /// No HTTP client could be made (no CA certificates on the node).
    #[error(
        "cannot log in to registry {registry}: no HTTP client (are CA certificates installed?)"
    )]
    Client {
        /// The registry.
        registry: String,
        /// Cause.
        #[source]
        source: reqwest::Error,
    },
    /// The registry could not be reached.
    #[error("cannot reach registry {registry} at {url}")]
    Unreachable {
        /// The registry.
        registry: String,
        /// What was asked.
        url: String,
        /// Cause.
        #[source]
        source: reqwest::Error,
    },
    /// The registry does not send clients to a token service.
    #[error(
        "registry {registry} does not take token logins (its /v2/ answered {status}{challenge}); a managed identity can log in only to a registry with a token service, such as Azure Container Registry"
    )]
    NotTokenRegistry {
        /// The registry.
        registry: String,
        /// The status of `/v2/`.
        status: u16,
        /// `, challenge …` when there was one.
        challenge: String,
    },
    /// IMDS gave no token for the identity.
    #[error("cannot get a token for {identity} to log in to registry {registry}")]
    Identity {
        /// The registry.
        registry: String,
        /// The identity.
        identity: Identity,
        /// Cause.
        #[source]
        source: drover_imds::ImdsError,
    },
    /// The token service refused the exchange or answered nonsense.
    #[error(
        "registry {registry}: the token service at {url} refused the {identity}'s token ({status}): {message}"
    )]
    Exchange {
        /// The registry.
        registry: String,
        /// The exchange URL.
        url: String,
        /// The identity.
        identity: Identity,
        /// HTTP status (0 when the request itself failed).
        status: u16,
        /// The service's own words.
        message: String,
    },
}

/// One login's outcome: a log line and a metric.
#[derive(Debug)]
pub enum RegistryLoginEvent<'a> {
    /// A fresh refresh token was obtained.
    Exchanged {
        /// The registry.
        registry: &'a str,
        /// The identity.
        identity: &'a Identity,
        /// How long the exchange took, IMDS included.
        elapsed: Duration,
    },
    /// A kept refresh token served.
    Cached {
        /// The registry.
        registry: &'a str,
    },
    /// The registry needs no login.
    Anonymous {
        /// The registry.
        registry: &'a str,
    },
    /// The login failed.
    Failed {
        /// Why.
        error: &'a RegistryLoginError,
    },
}

impl RegistryLoginEvent<'_> {
    /// Logs the event and counts it in `drover_agent_registry_logins{outcome}`.
    pub fn emit(&self, metrics: &Metrics) {
        let outcome = match self {
            RegistryLoginEvent::Exchanged {
                registry,
                identity,
                elapsed,
            } => {
                tracing::info!(registry, %identity, elapsed_ms = elapsed.as_millis() as u64, "registry login with the managed identity");
                "exchanged"
            }
            RegistryLoginEvent::Cached { registry } => {
                tracing::debug!(registry, "registry login from the kept refresh token");
                "cached"
            }
            RegistryLoginEvent::Anonymous { registry } => {
                tracing::info!(registry, "registry needs no login");
                "anonymous"
            }
            RegistryLoginEvent::Failed { error } => {
                tracing::warn!(error = %drover_api::error::chain(*error), "registry login with the managed identity failed");
                "failed"
            }
        };
        metrics
            .registry_logins
            .get_or_create(&vec![("outcome".to_string(), outcome.to_string())])
            .inc();
    }
}

/// A kept refresh token.
#[derive(Clone)]
struct Kept {
    token: String,
    usable_until: SystemTime,
}

/// Registry logins with managed identities. Cheap to clone.
#[derive(Clone)]
pub struct RegistryLogin {
    imds: Option<ImdsClient>,
    /// Built on the first login: most nodes never log in, and a node
    /// without CA certificates cannot build one (that must not stop it).
    http: Arc<tokio::sync::OnceCell<reqwest::Client>>,
    kept: Arc<Mutex<HashMap<(String, Identity), Kept>>>,
    /// Serializes logins so that concurrent parts share one exchange.
    exchange: Arc<tokio::sync::Mutex<()>>,
    metrics: Arc<Metrics>,
}

#[derive(Deserialize)]
struct ExchangeAnswer {
    refresh_token: String,
}

impl RegistryLogin {
    /// Logins through `imds` (none: every login fails with a clear reason).
    pub fn new(imds: Option<ImdsClient>, metrics: Arc<Metrics>) -> Self {
        RegistryLogin {
            imds,
            http: Arc::default(),
            kept: Arc::default(),
            exchange: Arc::default(),
            metrics,
        }
    }

    /// The engine's login to `registry` (`host[:port]`) as `identity`;
    /// `None` when the registry needs none.
    pub async fn login(
        &self,
        registry: &str,
        identity: &Identity,
    ) -> Result<Option<RegistryAuth>, RegistryLoginError> {
        let result = self.login_inner(registry, identity).await;
        if let Err(error) = &result {
            RegistryLoginEvent::Failed { error }.emit(&self.metrics);
        }
        result
    }

    /// Forgets the kept token (the registry refused it): the next login
    /// exchanges again.
    pub fn forget(&self, registry: &str, identity: &Identity) {
        self.lock()
            .remove(&(registry.to_string(), identity.clone()));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, Identity), Kept>> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn kept(&self, registry: &str, identity: &Identity) -> Option<String> {
        let key = (registry.to_string(), identity.clone());
        self.lock()
            .get(&key)
            .filter(|k| k.usable_until > SystemTime::now())
            .map(|k| k.token.clone())
    }

    async fn login_inner(
        &self,
        registry: &str,
        identity: &Identity,
    ) -> Result<Option<RegistryAuth>, RegistryLoginError> {
        let auth = |token| {
            Some(RegistryAuth {
                server: registry.to_string(),
                username: TOKEN_USERNAME.to_string(),
                password: token,
            })
        };
        if let Some(token) = self.kept(registry, identity) {
            RegistryLoginEvent::Cached { registry }.emit(&self.metrics);
            return Ok(auth(token));
        }
        let _one = self.exchange.lock().await;
        if let Some(token) = self.kept(registry, identity) {
            RegistryLoginEvent::Cached { registry }.emit(&self.metrics);
            return Ok(auth(token));
        }
        let Some(imds) = &self.imds else {
            return Err(RegistryLoginError::NoImds {
                registry: registry.to_string(),
            });
        };
        let started = std::time::Instant::now();
        let Some(challenge) = self.challenge(registry).await? else {
            RegistryLoginEvent::Anonymous { registry }.emit(&self.metrics);
            return Ok(None);
        };
        let entra = imds
            .token(ENTRA_RESOURCE, identity)
            .await
            .map_err(|source| RegistryLoginError::Identity {
                registry: registry.to_string(),
                identity: identity.clone(),
                source,
            })?;
        let url = exchange_url(&challenge.realm);
        let refused = |status: u16, message: String| RegistryLoginError::Exchange {
            registry: registry.to_string(),
            url: url.clone(),
            identity: identity.clone(),
            status,
            message,
        };
        let form = serde_urlencoded::to_string([
            ("grant_type", "access_token"),
            ("service", challenge.service.as_str()),
            ("access_token", entra.token.as_str()),
        ])
        .map_err(|e| refused(0, e.to_string()))?;
        let response = self
            .client(registry)
            .await?
            .post(&url)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(form)
            .send()
            .await
            .map_err(|e| refused(0, drover_api::error::chain(&e)))?;
        let status = response.status().as_u16();
        let body = response
            .bytes()
            .await
            .map_err(|e| refused(status, drover_api::error::chain(&e)))?;
        if status != 200 {
            return Err(refused(status, service_message(&body)));
        }
        let answer: ExchangeAnswer = serde_json::from_slice(&body)
            .map_err(|e| refused(status, format!("not a refresh token answer: {e}")))?;
        let usable_until = expiry(&answer.refresh_token)
            .unwrap_or_else(|| SystemTime::now() + DEFAULT_LIFETIME)
            .checked_sub(EXPIRY_MARGIN)
            .unwrap_or(UNIX_EPOCH);
        self.lock().insert(
            (registry.to_string(), identity.clone()),
            Kept {
                token: answer.refresh_token.clone(),
                usable_until,
            },
        );
        RegistryLoginEvent::Exchanged {
            registry,
            identity,
            elapsed: started.elapsed(),
        }
        .emit(&self.metrics);
        Ok(auth(answer.refresh_token))
    }

    async fn client(&self, registry: &str) -> Result<&reqwest::Client, RegistryLoginError> {
        self.http
            .get_or_try_init(|| async {
                reqwest::Client::builder()
                    .timeout(REQUEST_TIMEOUT)
                    .build()
                    .map_err(|source| RegistryLoginError::Client {
                        registry: registry.to_string(),
                        source,
                    })
            })
            .await
    }

    /// The registry's token challenge; `None` when `/v2/` lets anyone in.
    async fn challenge(&self, registry: &str) -> Result<Option<Challenge>, RegistryLoginError> {
        let url = format!("{}://{registry}/v2/", scheme_of(registry));
        let response = self
            .client(registry)
            .await?
            .get(&url)
            .send()
            .await
            .map_err(|source| RegistryLoginError::Unreachable {
                registry: registry.to_string(),
                url: url.clone(),
                source,
            })?;
        let status = response.status().as_u16();
        if status == 200 {
            return Ok(None);
        }
        let header = response
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        match parse_challenge(&header) {
            Some(c) if status == 401 => Ok(Some(c)),
            _ => Err(RegistryLoginError::NotTokenRegistry {
                registry: registry.to_string(),
                status,
                challenge: if header.is_empty() {
                    String::new()
                } else {
                    format!(", challenge {header}")
                },
            }),
        }
    }
}

/// A `Bearer` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Challenge {
    realm: String,
    service: String,
}

/// `Bearer realm="https://r.azurecr.io/oauth2/token",service="r.azurecr.io"`.
fn parse_challenge(header: &str) -> Option<Challenge> {
    let (scheme, params) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let (mut realm, mut service) = (None, None);
    let mut rest = params.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let key = key.trim().trim_start_matches(',').trim();
        let (value, after) = match after.strip_prefix('"') {
            Some(quoted) => {
                let end = quoted.find('"')?;
                (&quoted[..end], &quoted[end + 1..])
            }
            None => after.split_once(',').unwrap_or((after, "")),
        };
        match key {
            "realm" => realm = Some(value.to_string()),
            "service" => service = Some(value.to_string()),
            _ => {}
        }
        rest = after.trim_start_matches(',').trim();
    }
    Some(Challenge {
        realm: realm?,
        service: service?,
    })
}

/// The exchange endpoint beside a realm: its origin and `/oauth2/exchange`.
fn exchange_url(realm: &str) -> String {
    let after_scheme = realm.find("://").map(|i| i + 3).unwrap_or(0);
    let origin_end = realm[after_scheme..]
        .find('/')
        .map(|i| after_scheme + i)
        .unwrap_or(realm.len());
    format!("{}/oauth2/exchange", &realm[..origin_end])
}

/// `http` for a registry on this machine (as Docker treats loopback
/// registries as insecure), `https` otherwise.
fn scheme_of(registry: &str) -> &'static str {
    let host = registry
        .rsplit_once(':')
        .filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit()))
        .map(|(host, _)| host)
        .unwrap_or(registry);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback { "http" } else { "https" }
}

/// A token service's words: ACR's `errors[].message`, or the body.
fn service_message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Errors {
        errors: Vec<Message>,
    }
    #[derive(Deserialize)]
    struct Message {
        message: String,
    }
    match serde_json::from_slice::<Errors>(body) {
        Ok(e) if !e.errors.is_empty() => e
            .errors
            .into_iter()
            .map(|m| m.message)
            .collect::<Vec<_>>()
            .join("; "),
        _ => String::from_utf8_lossy(body).chars().take(300).collect(),
    }
}

/// The `exp` of a JWT, unverified (only to know when to exchange again).
fn expiry(jwt: &str) -> Option<SystemTime> {
    #[derive(Deserialize)]
    struct Exp {
        exp: u64,
    }
    let payload = jwt.split('.').nth(1)?;
    let claims: Exp = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(claims.exp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_are_read_as_docker_reads_them() {
        let c = parse_challenge(
            r#"Bearer realm="https://r.azurecr.io/oauth2/token",service="r.azurecr.io""#,
        )
        .unwrap();
        assert_eq!(c.realm, "https://r.azurecr.io/oauth2/token");
        assert_eq!(c.service, "r.azurecr.io");
        let c = parse_challenge(
            r#"Bearer service="127.0.0.1:5000", realm="http://127.0.0.1:9/oauth2/token", error="invalid_token""#,
        )
        .unwrap();
        assert_eq!(c.service, "127.0.0.1:5000");
        assert_eq!(c.realm, "http://127.0.0.1:9/oauth2/token");
        assert_eq!(parse_challenge(r#"Basic realm="Registry Realm""#), None);
        assert_eq!(parse_challenge(r#"Bearer realm="x""#), None);
        assert_eq!(parse_challenge(""), None);
    }

    #[test]
    fn the_exchange_is_beside_the_realm_and_loopback_is_plain_http() {
        assert_eq!(
            exchange_url("https://r.azurecr.io/oauth2/token"),
            "https://r.azurecr.io/oauth2/exchange"
        );
        assert_eq!(
            exchange_url("http://127.0.0.1:7341/oauth2/token?x=1"),
            "http://127.0.0.1:7341/oauth2/exchange"
        );
        assert_eq!(scheme_of("127.0.0.1:5000"), "http");
        assert_eq!(scheme_of("localhost:5000"), "http");
        assert_eq!(scheme_of("[::1]:5000"), "http");
        assert_eq!(scheme_of("r.azurecr.io"), "https");
        assert_eq!(scheme_of("10.0.0.4:5000"), "https");
    }

    #[test]
    fn token_service_errors_and_expiry_are_read() {
        assert_eq!(
            service_message(br#"{"errors":[{"code":"UNAUTHORIZED","message":"no"}]}"#),
            "no"
        );
        assert_eq!(service_message(b"gateway down"), "gateway down");
        let payload = URL_SAFE_NO_PAD.encode(br#"{"exp":1000}"#);
        assert_eq!(
            expiry(&format!("h.{payload}.s")),
            Some(UNIX_EPOCH + Duration::from_secs(1000))
        );
        assert_eq!(expiry("not-a-jwt"), None);
    }
}
