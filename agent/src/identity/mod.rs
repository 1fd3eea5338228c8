//! Managed-identity tokens for job code: what the token endpoint
//! (`crate::http::identity`) decides and remembers.
//!
//! Each part gets, when its container is made, a secret of its own (32
//! random bytes, hex) in its environment — `MSI_SECRET` and, unless its
//! cluster turned the App Service protocol off, `IDENTITY_HEADER` — with
//! the endpoint's URLs (`MSI_ENDPOINT`, `IDENTITY_ENDPOINT`) and
//! `DEFAULT_IDENTITY_CLIENT_ID`, as Azure ML sets them. The secret is held
//! in memory only while the part runs ([`PartIdentity`] forgets it when
//! dropped), never logged, and authorizes only its own part: a request's
//! secret says which part asks, and so which cluster identities it may
//! have ([`authorize`]). Tokens come from `drover_imds`'s cache, so a
//! thousand requests cost IMDS one request per (identity, resource) per
//! token lifetime. Every request is audited ([`audit`]) and counted in the
//! agent's metrics; each part is rate limited ([`limit`]).
//!
//! Modules: [`protocol`] (the two protocols' requests and answers, pure),
//! [`authorize`] (the decision, pure), [`limit`] (the token bucket, pure),
//! [`audit`] (the audit log file).

pub mod audit;
pub mod authorize;
pub mod limit;
pub mod protocol;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use drover_api::compute;
use drover_api::job::JobIdentity;
use drover_api::wire::PartKey;
use drover_imds::{AccessToken, Identity, ImdsClient};
use serde_json::Value;
use tokio::time::Instant;

use crate::metrics::Metrics;
use audit::{AuditLog, AuditRecord, audit_time};
use authorize::{Grant, Refusal, judge, precheck, token_claims};
use limit::{RateLimit, TokenBucket, retry_after_seconds};
use protocol::{Issued, Protocol, error_body, parse_request, token_body};

/// The `DEFAULT_IDENTITY_CLIENT_ID` of a part whose cluster has no
/// identity: the literal Azure ML sets then.
pub const NO_IDENTITY_CLIENT_ID: &str = "clientid";
/// The endpoint's address unless `--identity-listen` says otherwise (the
/// port Azure ML's own endpoint uses).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:46808";
/// How long a request waits for IMDS (the client retries inside it).
const IMDS_WAIT: Duration = Duration::from_secs(30);
/// How long a part's start waits to learn its default identity's client id.
const CLIENT_ID_WAIT: Duration = Duration::from_secs(10);
/// The resource asked for to learn a client id (the token stays cached).
const LOOKUP_RESOURCE: &str = "https://management.azure.com/";

/// What became of a token request: the audit log's and the metrics' word
/// for it, and its HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// A token was handed out.
    Issued,
    /// No secret header.
    NoSecret,
    /// A secret no running part holds (forged, or of a part that ended).
    BadSecret,
    /// The request could not be read.
    BadRequest,
    /// The part is over its rate limit.
    RateLimited,
    /// The part's cluster has no identity.
    NoIdentity,
    /// The identity asked for is not one of the cluster's.
    NotGranted,
    /// IMDS refused the request (e.g. the node has no such identity).
    ImdsRejected,
    /// IMDS did not answer.
    ImdsUnavailable,
    /// This node has no IMDS.
    NoImds,
    /// IMDS's token does not say whose it is.
    Unverifiable,
}

impl Outcome {
    /// Its name in the audit log, the metrics and Azure ML's `error`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Issued => "issued",
            Outcome::NoSecret => "no_secret",
            Outcome::BadSecret => "bad_secret",
            Outcome::BadRequest => "invalid_request",
            Outcome::RateLimited => "rate_limited",
            Outcome::NoIdentity => "no_identity",
            Outcome::NotGranted => "identity_not_granted",
            Outcome::ImdsRejected => "imds_rejected",
            Outcome::ImdsUnavailable => "imds_unavailable",
            Outcome::NoImds => "no_imds",
            Outcome::Unverifiable => "unverifiable_token",
        }
    }

    /// The HTTP status it is answered with.
    pub fn status(self) -> u16 {
        match self {
            Outcome::Issued => 200,
            Outcome::BadRequest | Outcome::ImdsRejected => 400,
            Outcome::NoSecret | Outcome::BadSecret => 401,
            Outcome::NoIdentity | Outcome::NotGranted => 403,
            Outcome::RateLimited => 429,
            Outcome::ImdsUnavailable | Outcome::Unverifiable => 502,
            Outcome::NoImds => 503,
        }
    }
}

/// A part's secret: 32 random bytes as hex. `Debug` never shows it.
pub struct PartSecret(String);

impl PartSecret {
    /// A fresh secret from the OS's random source.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut bytes = [0u8; 32];
        getrandom::getrandom(&mut bytes)?;
        Ok(PartSecret(
            bytes.iter().map(|b| format!("{b:02x}")).collect(),
        ))
    }

    /// A secret saved by [`PartSecret::expose`], if it is one (64 hex
    /// digits).
    pub fn from_saved(text: &str) -> Option<Self> {
        let text = text.trim();
        (text.len() == 64 && text.chars().all(|c| c.is_ascii_hexdigit()))
            .then(|| PartSecret(text.to_string()))
    }

    /// The secret's text, for the part's environment only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this secret, in time that does not depend on
    /// where they differ.
    fn matches(&self, presented: &[u8]) -> bool {
        let mine = self.0.as_bytes();
        mine.len() == presented.len()
            && mine
                .iter()
                .zip(presented)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

impl fmt::Debug for PartSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PartSecret(***)")
    }
}

/// A running part, as the endpoint knows it.
struct PartEntry {
    id: u64,
    secret: PartSecret,
    part: PartKey,
    grant: Grant,
    /// The identity of requests that name none (`None`: no identity).
    default: Option<Identity>,
    bucket: Mutex<TokenBucket>,
}

/// The running parts' secrets.
#[derive(Default)]
struct Registry {
    parts: Mutex<Vec<Arc<PartEntry>>>,
    next: AtomicU64,
}

impl Registry {
    /// The part whose secret `presented` is. Every secret is compared (a
    /// node runs few parts), so the time taken says nothing about which
    /// one, or how much of one, matched.
    fn find(&self, presented: &[u8]) -> Option<Arc<PartEntry>> {
        let parts = self.parts.lock().unwrap_or_else(|e| e.into_inner());
        let mut found = None;
        for p in parts.iter() {
            if p.secret.matches(presented) {
                found = Some(p.clone());
            }
        }
        found
    }

    fn remove(&self, id: u64) {
        self.parts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|p| p.id != id);
    }
}

/// A part's hold on the endpoint: its environment while it lives, and its
/// secret forgotten when dropped (when the part's container has ended).
pub struct PartIdentity {
    registry: Arc<Registry>,
    id: u64,
    env: BTreeMap<String, String>,
}

impl PartIdentity {
    /// The variables the part's container gets (they hold its secret).
    pub fn env(&self) -> &BTreeMap<String, String> {
        &self.env
    }
}

impl Drop for PartIdentity {
    fn drop(&mut self) {
        self.registry.remove(self.id);
    }
}

impl fmt::Debug for PartIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PartIdentity")
            .field("id", &self.id)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Why a part could not be given an identity.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The OS gave no random bytes for its secret.
    #[error("making the part's identity secret")]
    Secret(#[source] getrandom::Error),
}

/// How a request carried its secret header.
#[derive(Debug, Clone, Copy)]
pub enum SecretHeader<'a> {
    /// Not at all.
    Missing,
    /// Once.
    One(&'a [u8]),
    /// More than once.
    Many,
}

/// An answer of the endpoint, in the request's protocol.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// JSON body.
    pub body: Value,
    /// `Retry-After` seconds (429 only).
    pub retry_after: Option<u64>,
}

/// The token endpoint's state: the running parts, the node's IMDS, the
/// audit log and the metrics.
pub struct IdentityService {
    registry: Arc<Registry>,
    imds: Option<ImdsClient>,
    audit: AuditLog,
    metrics: Arc<Metrics>,
    endpoint: String,
    limit: RateLimit,
}

/// What a request came to be, for its audit line.
#[derive(Default)]
struct Known {
    part: Option<PartKey>,
    identity: Option<String>,
    resource: Option<String>,
    granted: Option<String>,
}

/// A refusal on its way to an answer.
struct Refused {
    refusal: Refusal,
    retry_after: Option<u64>,
}

impl From<Refusal> for Refused {
    fn from(refusal: Refusal) -> Self {
        Refused {
            refusal,
            retry_after: None,
        }
    }
}

fn refused(outcome: Outcome, message: impl Into<String>) -> Refused {
    Refusal {
        outcome,
        message: message.into(),
    }
    .into()
}

/// How the audit log names an identity.
fn describe(identity: &Identity) -> String {
    match identity {
        Identity::System => "system".to_string(),
        Identity::ClientId(id) => format!("client_id:{id}"),
        Identity::ObjectId(id) => format!("object_id:{id}"),
        Identity::ResourceId(id) => format!("resource_id:{id}"),
    }
}

/// The identity a job's `identity:` makes its part's default.
fn job_default(job: Option<&JobIdentity>, grant: &Grant) -> Option<Identity> {
    if *grant == Grant::None {
        return None;
    }
    match job {
        Some(JobIdentity::Managed {
            client_id: Some(id),
            ..
        }) => Some(Identity::ClientId(id.clone())),
        Some(JobIdentity::Managed {
            object_id: Some(id),
            ..
        }) => Some(Identity::ObjectId(id.clone())),
        Some(JobIdentity::Managed {
            msi_resource_id: Some(id),
            ..
        }) => Some(Identity::ResourceId(id.clone())),
        // No id named (or a kind validation refuses): the cluster's default.
        _ => grant.default_identity(),
    }
}

fn epoch_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// 16 random bytes as hex: App Service's `correlationId` of an error.
fn correlation_id() -> String {
    let mut bytes = [0u8; 16];
    match getrandom::getrandom(&mut bytes) {
        Ok(()) => bytes.iter().map(|b| format!("{b:02x}")).collect(),
        Err(_) => String::new(),
    }
}

impl IdentityService {
    /// The endpoint's state. `endpoint` is the base URL parts reach it at
    /// (`http://127.0.0.1:46808`); `imds` is `None` on a node without one
    /// (every request is then refused, `no_imds`).
    pub fn new(
        endpoint: String,
        limit: RateLimit,
        imds: Option<ImdsClient>,
        audit: AuditLog,
        metrics: Arc<Metrics>,
    ) -> Self {
        IdentityService {
            registry: Arc::default(),
            imds,
            audit,
            metrics,
            endpoint,
            limit,
        }
    }

    /// The base URL parts reach the endpoint at.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// How many parts hold a secret now.
    pub fn parts(&self) -> usize {
        self.registry
            .parts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Gives a starting part its secret and environment. `cluster` is its
    /// cluster's identity, `app_service` whether it also gets the App
    /// Service protocol, `job` its job's `identity:`.
    pub async fn start_part(
        &self,
        part: &PartKey,
        cluster: &compute::Identity,
        app_service: bool,
        job: Option<&JobIdentity>,
    ) -> Result<PartIdentity, StartError> {
        let secret = PartSecret::generate().map_err(StartError::Secret)?;
        let grant = Grant::from(cluster);
        let default = job_default(job, &grant);
        let client_id = self.default_client_id(part, &grant, default.as_ref()).await;
        let mut env = BTreeMap::from([
            (
                "MSI_ENDPOINT".to_string(),
                format!("{}{}", self.endpoint, protocol::AZURE_ML_PATH),
            ),
            ("MSI_SECRET".to_string(), secret.expose().to_string()),
        ]);
        if let Some(id) = client_id {
            env.insert("DEFAULT_IDENTITY_CLIENT_ID".to_string(), id);
        }
        if app_service {
            env.insert(
                "IDENTITY_ENDPOINT".to_string(),
                format!("{}{}", self.endpoint, protocol::APP_SERVICE_PATH),
            );
            env.insert("IDENTITY_HEADER".to_string(), secret.expose().to_string());
        }
        tracing::debug!(part = %part, app_service, "part holds an identity secret");
        Ok(self.register(part, secret, grant, default, env))
    }

    /// Takes back the secret of a part this agent adopts after a restart
    /// (its container holds it in its environment already). `cluster` and
    /// `job` are as for [`IdentityService::start_part`].
    pub fn adopt_part(
        &self,
        part: &PartKey,
        secret: PartSecret,
        cluster: &compute::Identity,
        job: Option<&JobIdentity>,
    ) -> PartIdentity {
        let grant = Grant::from(cluster);
        let default = job_default(job, &grant);
        tracing::debug!(part = %part, "adopted part holds its identity secret again");
        self.register(part, secret, grant, default, BTreeMap::new())
    }

    fn register(
        &self,
        part: &PartKey,
        secret: PartSecret,
        grant: Grant,
        default: Option<Identity>,
        env: BTreeMap<String, String>,
    ) -> PartIdentity {
        let id = self.registry.next.fetch_add(1, Ordering::Relaxed);
        let entry = PartEntry {
            id,
            secret,
            part: part.clone(),
            grant,
            default,
            bucket: Mutex::new(TokenBucket::new(self.limit, Instant::now())),
        };
        self.registry
            .parts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::new(entry));
        PartIdentity {
            registry: self.registry.clone(),
            id,
            env,
        }
    }

    /// `DEFAULT_IDENTITY_CLIENT_ID`: `clientid` without identity, the
    /// job's client id when it names one, else the client id IMDS gives
    /// for the part's default identity; `None` (the variable is left out)
    /// when IMDS does not tell in time — Go and .NET then name no identity
    /// and get the default all the same.
    async fn default_client_id(
        &self,
        part: &PartKey,
        grant: &Grant,
        default: Option<&Identity>,
    ) -> Option<String> {
        let identity = match default {
            None => return Some(NO_IDENTITY_CLIENT_ID.to_string()),
            Some(Identity::ClientId(id)) => return Some(id.clone()),
            Some(identity) => identity,
        };
        let Some(imds) = &self.imds else {
            tracing::warn!(part = %part, "no imds on this node: the part gets no DEFAULT_IDENTITY_CLIENT_ID");
            return None;
        };
        let answer =
            tokio::time::timeout(CLIENT_ID_WAIT, imds.token(LOOKUP_RESOURCE, identity)).await;
        let token: Arc<AccessToken> = match answer {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                tracing::warn!(part = %part, grant = ?grant, error = %drover_api::error::chain(&e), "imds did not say the part's default identity's client id");
                return None;
            }
            Err(_) => {
                tracing::warn!(part = %part, "imds did not say the part's default identity's client id in time");
                return None;
            }
        };
        if !token.client_id.is_empty() {
            return Some(token.client_id.clone());
        }
        token_claims(&token.token)
            .map(|c| c.appid)
            .filter(|id| !id.is_empty())
    }

    /// Answers one token request: `query` is the raw query string.
    pub async fn answer(
        &self,
        protocol: Protocol,
        secret: SecretHeader<'_>,
        query: &str,
    ) -> Answer {
        let started = Instant::now();
        let mut known = Known::default();
        let result = self.decide(protocol, secret, query, &mut known).await;
        let (outcome, status, body, retry_after) = match result {
            Ok(body) => (Outcome::Issued, 200, body, None),
            Err(Refused {
                refusal,
                retry_after,
            }) => {
                let status = refusal.outcome.status();
                let body = error_body(
                    protocol,
                    status,
                    refusal.outcome.as_str(),
                    &refusal.message,
                    &correlation_id(),
                );
                (refusal.outcome, status, body, retry_after)
            }
        };
        let latency = started.elapsed();
        self.metrics
            .observe_identity(protocol.as_str(), outcome.as_str(), latency);
        let part = known.part.as_ref();
        self.audit.record(&AuditRecord {
            time: audit_time(SystemTime::now()),
            job: part.map(|p| p.job.clone()),
            attempt: part.map(|p| p.attempt),
            node_rank: part.map(|p| p.node_rank),
            protocol: protocol.as_str().to_string(),
            identity: known.identity,
            resource: known.resource,
            outcome: outcome.as_str().to_string(),
            status,
            latency_ms: latency.as_secs_f64() * 1000.0,
            granted: known.granted,
        });
        if outcome != Outcome::Issued {
            tracing::info!(
                part = ?part.map(ToString::to_string), protocol = protocol.as_str(),
                outcome = outcome.as_str(), status, "identity token request refused"
            );
        }
        Answer {
            status,
            body,
            retry_after,
        }
    }

    async fn decide(
        &self,
        protocol: Protocol,
        secret: SecretHeader<'_>,
        query: &str,
        known: &mut Known,
    ) -> Result<Value, Refused> {
        let header = protocol.secret_header();
        let presented = match secret {
            SecretHeader::One(s) if !s.is_empty() => s,
            SecretHeader::Missing | SecretHeader::One(_) => {
                return Err(refused(
                    Outcome::NoSecret,
                    format!("the {header} header is required"),
                ));
            }
            SecretHeader::Many => {
                return Err(refused(
                    Outcome::BadRequest,
                    format!("the {header} header is given more than once"),
                ));
            }
        };
        let Some(entry) = self.registry.find(presented) else {
            return Err(refused(
                Outcome::BadSecret,
                format!("the {header} header holds no running job's secret"),
            ));
        };
        known.part = Some(entry.part.clone());
        let wait = entry
            .bucket
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(Instant::now());
        if let Err(wait) = wait {
            return Err(Refused {
                refusal: Refusal {
                    outcome: Outcome::RateLimited,
                    message: "too many token requests from this job; tokens last hours, cache them"
                        .to_string(),
                },
                retry_after: Some(retry_after_seconds(wait)),
            });
        }
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query).map_err(|_| {
            refused(
                Outcome::BadRequest,
                "the query string is not valid form encoding",
            )
        })?;
        let request =
            parse_request(protocol, &pairs).map_err(|bad| refused(Outcome::BadRequest, bad.0))?;
        known.resource = Some(request.resource.clone());
        let asked = request.selector.or_else(|| entry.default.clone());
        let Some(asked) = asked else {
            return Err(refused(
                Outcome::NoIdentity,
                "the job's cluster has no managed identity",
            ));
        };
        known.identity = Some(describe(&asked));
        precheck(&entry.grant, &asked)?;
        let token = self.token(&request.imds_resource, &asked).await?;
        let claims = token_claims(&token.token).ok_or_else(|| {
            refused(
                Outcome::Unverifiable,
                "imds issued a token that is not a JWT",
            )
        })?;
        let system_mirid = match (&entry.grant, &asked) {
            (Grant::System, Identity::System) => Some(claims.mirid.clone()),
            (Grant::System, _) => {
                let system = self
                    .token(&request.imds_resource, &Identity::System)
                    .await?;
                token_claims(&system.token).map(|c| c.mirid)
            }
            _ => None,
        };
        judge(&entry.grant, &asked, &claims.mirid, system_mirid.as_deref())?;
        known.granted = Some(claims.mirid.clone());
        let client_id = if token.client_id.is_empty() {
            claims.appid.as_str()
        } else {
            token.client_id.as_str()
        };
        Ok(token_body(
            protocol,
            &Issued {
                access_token: &token.token,
                expires_on: epoch_seconds(token.expires_on),
                resource: &request.resource,
                token_type: &token.token_type,
                client_id,
            },
        ))
    }

    /// A token from IMDS (through the client's cache), or why not.
    async fn token(
        &self,
        resource: &str,
        identity: &Identity,
    ) -> Result<Arc<AccessToken>, Refused> {
        let Some(imds) = &self.imds else {
            return Err(refused(
                Outcome::NoImds,
                "this node has no instance metadata service to get tokens from",
            ));
        };
        match tokio::time::timeout(IMDS_WAIT, imds.token(resource, identity)).await {
            Ok(Ok(token)) => Ok(token),
            Ok(Err(e)) => match e.rejection() {
                Some((error, description)) => Err(refused(
                    Outcome::ImdsRejected,
                    format!("imds refused the token request: {error}: {description}"),
                )),
                None => {
                    tracing::warn!(%resource, %identity, error = %drover_api::error::chain(&e), "imds token request failed");
                    Err(refused(
                        Outcome::ImdsUnavailable,
                        "the instance metadata service did not issue a token; try again",
                    ))
                }
            },
            Err(_) => Err(refused(
                Outcome::ImdsUnavailable,
                "the instance metadata service did not answer in time; try again",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_long_random_and_never_shown() {
        let a = PartSecret::generate().expect("random");
        let b = PartSecret::generate().expect("random");
        assert_eq!(a.expose().len(), 64);
        assert!(a.expose().chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a.expose(), b.expose());
        assert_eq!(format!("{a:?}"), "PartSecret(***)");
        assert!(a.matches(a.expose().as_bytes()));
        assert!(!a.matches(b.expose().as_bytes()));
        assert!(!a.matches(&a.expose().as_bytes()[..63]));
        assert!(!a.matches(b""));
        let saved = PartSecret::from_saved(&format!("{}\n", a.expose())).expect("saved");
        assert!(saved.matches(a.expose().as_bytes()));
        assert!(PartSecret::from_saved("abc").is_none());
        assert!(PartSecret::from_saved(&"g".repeat(64)).is_none());
    }

    #[test]
    fn a_jobs_managed_identity_becomes_its_parts_default() {
        let system = Grant::System;
        let managed = |c: Option<&str>, o: Option<&str>, r: Option<&str>| JobIdentity::Managed {
            client_id: c.map(String::from),
            object_id: o.map(String::from),
            msi_resource_id: r.map(String::from),
        };
        assert_eq!(job_default(None, &system), Some(Identity::System));
        assert_eq!(
            job_default(Some(&managed(None, None, None)), &system),
            Some(Identity::System)
        );
        assert_eq!(
            job_default(Some(&managed(Some("c"), None, None)), &system),
            Some(Identity::ClientId("c".into()))
        );
        assert_eq!(
            job_default(Some(&managed(None, Some("o"), None)), &system),
            Some(Identity::ObjectId("o".into()))
        );
        assert_eq!(
            job_default(
                Some(&managed(None, None, Some("r"))),
                &Grant::User(vec!["x".into()])
            ),
            Some(Identity::ResourceId("r".into()))
        );
        assert_eq!(
            job_default(Some(&managed(Some("c"), None, None)), &Grant::None),
            None
        );
        let statuses: Vec<u16> = [
            Outcome::Issued,
            Outcome::NoSecret,
            Outcome::BadSecret,
            Outcome::RateLimited,
            Outcome::NotGranted,
        ]
        .iter()
        .map(|o| o.status())
        .collect();
        assert_eq!(statuses, [200, 401, 401, 429, 403]);
    }
}
