//! Managed-identity tokens (`GET /metadata/identity/oauth2/token?api-version=2018-02-01`)
//! and the cache in front of them.
//!
//! <https://learn.microsoft.com/entra/identity/managed-identities-azure-resources/how-to-use-vm-token#get-a-token-using-http>.
//! Numbers in the response are strings. Tokens are cached per (resource,
//! identity) and refreshed ahead of expiry: at half-life for tokens of 2 h or
//! more (as MSAL does), otherwise 5 minutes before expiry (or at half-life if
//! that comes later). Only one request per key is ever in flight.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use tokio::time::Instant;

use super::wire;

/// The api-version used for tokens.
pub const TOKEN_API_VERSION: &str = "2018-02-01";

/// Which managed identity a token is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// The system-assigned identity (or the only user-assigned one, if the VM has no system identity).
    System,
    /// A user-assigned identity by application (client) id.
    ClientId(String),
    /// A user-assigned identity by principal (object) id.
    ObjectId(String),
    /// A user-assigned identity by ARM resource id.
    ResourceId(String),
}

impl Identity {
    /// The query parameter IMDS selects this identity with, if any.
    pub(crate) fn query_param(&self) -> Option<(&'static str, &str)> {
        match self {
            Self::System => None,
            Self::ClientId(id) => Some(("client_id", id)),
            Self::ObjectId(id) => Some(("object_id", id)),
            Self::ResourceId(id) => Some(("msi_res_id", id)),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::System => f.write_str("system-assigned identity"),
            Self::ClientId(id) => write!(f, "identity with client_id {id}"),
            Self::ObjectId(id) => write!(f, "identity with object_id {id}"),
            Self::ResourceId(id) => write!(f, "identity {id}"),
        }
    }
}

/// The token response as IMDS sends it.
#[derive(Debug, Deserialize)]
pub(crate) struct TokenResponse {
    access_token: String,
    #[serde(default, deserialize_with = "wire::opt_u64")]
    expires_in: Option<u64>,
    #[serde(default, deserialize_with = "wire::opt_u64")]
    expires_on: Option<u64>,
    #[serde(default, deserialize_with = "wire::opt_u64")]
    not_before: Option<u64>,
    #[serde(default, deserialize_with = "wire::string")]
    resource: String,
    #[serde(default, deserialize_with = "wire::string")]
    token_type: String,
    #[serde(default, deserialize_with = "wire::string")]
    client_id: String,
}

/// An access token from IMDS.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken {
    /// The bearer token (a JWT).
    pub token: String,
    /// When it expires.
    pub expires_on: SystemTime,
    /// When it was issued (`not_before`).
    pub not_before: SystemTime,
    /// The resource (audience) it is for.
    pub resource: String,
    /// `Bearer`.
    pub token_type: String,
    /// Client id of the identity it was issued to.
    pub client_id: String,
    /// When the cache starts refreshing it.
    refresh_at: Instant,
    /// After this the cache no longer hands it out.
    usable_until: Instant,
}

impl fmt::Debug for AccessToken {
    // Never print the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("resource", &self.resource)
            .field("client_id", &self.client_id)
            .field("expires_on", &self.expires_on)
            .finish_non_exhaustive()
    }
}

impl AccessToken {
    /// Builds a token from IMDS's response received at `received`.
    pub(crate) fn from_response(r: TokenResponse, received: Instant) -> Self {
        let now = SystemTime::now();
        let now_secs = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        // Remaining lifetime: `expires_in` is relative to this answer (IMDS
        // serves cached tokens with a shorter `expires_in`); fall back to
        // `expires_on` for servers that omit it.
        let remaining = r
            .expires_in
            .or_else(|| r.expires_on.map(|on| on.saturating_sub(now_secs)))
            .unwrap_or(0);
        let remaining = Duration::from_secs(remaining);
        // Full lifetime decides between half-life and 5-minute refresh.
        let lifetime = match (r.expires_on, r.not_before) {
            (Some(on), Some(nb)) if on > nb => Duration::from_secs(on - nb),
            _ => remaining,
        };
        let ahead = refresh_ahead(lifetime);
        let expires_at = received + remaining;
        // Never sooner than half of what remains: IMDS serves tokens from its
        // own cache, and one already past its half-life would otherwise be
        // "refreshed" on every lookup and come back unchanged.
        let refresh_at = expires_at
            .checked_sub(ahead)
            .unwrap_or(received)
            .max(received + remaining / 2);
        // Stop handing a token out shortly before it expires, so that callers
        // do not present a token that dies in flight.
        let margin = (remaining / 10).min(Duration::from_secs(10));
        let usable_until = expires_at.checked_sub(margin).unwrap_or(received);
        let expires_on = r
            .expires_on
            .map(|s| UNIX_EPOCH + Duration::from_secs(s))
            .unwrap_or(now + remaining);
        let not_before = r
            .not_before
            .map(|s| UNIX_EPOCH + Duration::from_secs(s))
            .unwrap_or(now);
        Self {
            token: r.access_token,
            expires_on,
            not_before,
            resource: r.resource,
            token_type: r.token_type,
            client_id: r.client_id,
            refresh_at,
            usable_until,
        }
    }

    /// Whether the cache would refresh this token now.
    pub fn needs_refresh(&self) -> bool {
        Instant::now() >= self.refresh_at
    }
}

/// How long before expiry a token of `lifetime` is refreshed: half its
/// lifetime for long tokens (≥ 2 h), else 5 minutes, but never more than half.
pub fn refresh_ahead(lifetime: Duration) -> Duration {
    const LONG: Duration = Duration::from_secs(2 * 3600);
    const AHEAD: Duration = Duration::from_secs(5 * 60);
    if lifetime >= LONG {
        lifetime / 2
    } else {
        AHEAD.min(lifetime / 2)
    }
}

/// One cache entry: the current token, and a lock that whoever fetches holds.
#[derive(Default)]
pub(crate) struct Slot {
    current: RwLock<Option<Arc<AccessToken>>>,
    /// Held for the duration of a fetch: the single-flight guarantee.
    pub(crate) fetch: Arc<tokio::sync::Mutex<()>>,
}

impl Slot {
    pub(crate) fn current(&self) -> Option<Arc<AccessToken>> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn store(&self, token: Arc<AccessToken>) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Some(token);
    }
}

/// What a cache lookup found.
pub(crate) enum Lookup {
    /// A token that needs no refresh.
    Fresh(Arc<AccessToken>),
    /// A usable token that is due for refresh.
    Stale(Arc<AccessToken>),
    /// Nothing usable.
    Missing,
}

/// Tokens by (resource, identity).
#[derive(Default)]
pub(crate) struct TokenCache {
    slots: Mutex<HashMap<(String, Identity), Arc<Slot>>>,
}

impl TokenCache {
    pub(crate) fn slot(&self, resource: &str, identity: &Identity) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        // Lookup by borrowed key would need a custom Borrow impl; the key is
        // small and this runs once per lookup, not per request.
        let key = (resource.to_owned(), identity.clone());
        slots.entry(key).or_default().clone()
    }

    pub(crate) fn lookup(slot: &Slot) -> Lookup {
        let now = Instant::now();
        match slot.current() {
            Some(t) if now < t.refresh_at => Lookup::Fresh(t),
            Some(t) if now < t.usable_until => Lookup::Stale(t),
            _ => Lookup::Missing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_points() {
        let h = |h: u64| Duration::from_secs(h * 3600);
        let m = |m: u64| Duration::from_secs(m * 60);
        assert_eq!(refresh_ahead(h(24)), h(12));
        assert_eq!(refresh_ahead(h(2)), h(1));
        assert_eq!(refresh_ahead(h(1)), m(5));
        assert_eq!(refresh_ahead(m(4)), m(2));
    }

    #[test]
    fn token_response_numbers_as_strings() {
        let body = r#"{"access_token":"eyJ0","refresh_token":"","expires_in":"86399",
            "expires_on":"1700086399","not_before":"1700000000","resource":"https://management.azure.com/",
            "token_type":"Bearer","client_id":"abc","ext_expires_in":"86399","extra":1}"#;
        let r: TokenResponse = serde_json::from_str(body).expect("parse");
        assert_eq!(r.expires_in, Some(86399));
        let t = AccessToken::from_response(r, Instant::now());
        assert_eq!(
            t.expires_on,
            UNIX_EPOCH + Duration::from_secs(1_700_086_399)
        );
        assert_eq!(t.client_id, "abc");
        // 24 h lifetime: refresh in about 12 h.
        let until_refresh = t.refresh_at - Instant::now();
        assert!(
            until_refresh > Duration::from_secs(11 * 3600)
                && until_refresh <= Duration::from_secs(43200)
        );
        assert!(
            !format!("{t:?}").contains("eyJ0"),
            "Debug must not print the token"
        );
    }

    /// A token IMDS served from its own cache, past its half-life: refreshed
    /// at half of what remains, not at once (which would loop).
    #[test]
    fn token_past_half_life_is_not_refreshed_at_once() {
        let body = r#"{"access_token":"t","expires_in":"3600","expires_on":"1700086400",
            "not_before":"1700000000","resource":"r","token_type":"Bearer","client_id":"c"}"#;
        let r: TokenResponse = serde_json::from_str(body).expect("parse");
        let t = AccessToken::from_response(r, Instant::now());
        assert!(!t.needs_refresh());
        let until_refresh = t.refresh_at - Instant::now();
        assert!(
            until_refresh > Duration::from_secs(1790) && until_refresh <= Duration::from_secs(1800)
        );
    }
}
