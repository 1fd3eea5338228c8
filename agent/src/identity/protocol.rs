//! The two managed-identity protocols job code speaks to the token
//! endpoint, as the Azure SDKs speak them (their sources are the reference):
//!
//! - Azure ML's (`MSI_ENDPOINT`, `MSI_SECRET`): `GET
//!   $MSI_ENDPOINT?api-version=2017-09-01&resource=R[&clientid=ID]` with
//!   the header `secret: $MSI_SECRET`; the answer is `{access_token,
//!   expires_on, resource, token_type}` with `expires_on` an integer (epoch
//!   seconds). Python's azure-identity sends `clientid` only when the caller
//!   names a client id; Go's azidentity and MSAL .NET send
//!   `$DEFAULT_IDENTITY_CLIENT_ID` when it names none.
//! - App Service's (`IDENTITY_ENDPOINT`, `IDENTITY_HEADER`): `GET
//!   $IDENTITY_ENDPOINT?api-version=2019-08-01&resource=R[&client_id=ID|object_id=ID|mi_res_id=ID]`
//!   with `X-IDENTITY-HEADER: $IDENTITY_HEADER`; the answer has
//!   `expires_on` as a JSON string (the Rust `azure_identity` crate
//!   requires it so) beside `access_token`, `token_type`, `resource` and
//!   `client_id`. Errors are `{statusCode, message, correlationId}`.
//!
//! `resource` is echoed as the caller sent it (Python's async client keys
//! its cache by it and fails without it). A scope (`…/.default`) is taken
//! as its resource. Pure: parsing and bodies, no I/O.

use drover_imds::Identity;
use serde_json::{Value, json};

/// Which protocol a request speaks: told by the path it came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// Azure ML's (`MSI_ENDPOINT`).
    AzureMl,
    /// App Service's (`IDENTITY_ENDPOINT`).
    AppService,
}

/// Azure ML's protocol's path on the endpoint (`MSI_ENDPOINT`'s).
pub const AZURE_ML_PATH: &str = "/msi/token";
/// App Service's protocol's path on the endpoint (`IDENTITY_ENDPOINT`'s).
pub const APP_SERVICE_PATH: &str = "/identity/token";
/// The longest `resource` taken: resource URIs are short; a bound keeps a
/// part from filling the token cache and the audit log with junk.
pub const MAX_RESOURCE_BYTES: usize = 2048;

impl Protocol {
    /// The name the audit log and the metrics use.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::AzureMl => "azure_ml",
            Protocol::AppService => "app_service",
        }
    }

    /// The path it is served at.
    pub fn path(self) -> &'static str {
        match self {
            Protocol::AzureMl => AZURE_ML_PATH,
            Protocol::AppService => APP_SERVICE_PATH,
        }
    }

    /// The header that carries the part's secret.
    pub fn secret_header(self) -> &'static str {
        match self {
            Protocol::AzureMl => "secret",
            Protocol::AppService => "x-identity-header",
        }
    }

    /// The one `api-version` it answers.
    pub fn api_version(self) -> &'static str {
        match self {
            Protocol::AzureMl => "2017-09-01",
            Protocol::AppService => "2019-08-01",
        }
    }

    /// The identity a query parameter names `value` by, if it names one.
    /// Azure ML's own is `clientid`; the others are what SDKs pass
    /// through from a caller's `identity_config`. App Service's resource
    /// id is `mi_res_id` (IMDS's older `msi_res_id` is taken too).
    fn selector(self, key: &str, value: &str) -> Option<Identity> {
        let value = value.to_string();
        match (self, key) {
            (Protocol::AzureMl, "clientid") | (_, "client_id") => Some(Identity::ClientId(value)),
            (_, "object_id") => Some(Identity::ObjectId(value)),
            (_, "mi_res_id" | "msi_res_id") => Some(Identity::ResourceId(value)),
            _ => None,
        }
    }
}

/// A token request, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// `resource` as the caller sent it (echoed back).
    pub resource: String,
    /// What IMDS is asked for: the resource, a scope's `/.default` cut.
    pub imds_resource: String,
    /// The identity named, if any (never `Identity::System`: naming none
    /// is how a request asks for the default).
    pub selector: Option<Identity>,
}

/// Why a request cannot be read: a 400 in the protocol's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRequest(pub String);

/// Reads a request's query parameters (decoded, in order).
pub fn parse_request(
    protocol: Protocol,
    pairs: &[(String, String)],
) -> Result<TokenRequest, BadRequest> {
    let bad = |m: String| Err(BadRequest(m));
    for (i, (key, _)) in pairs.iter().enumerate() {
        if pairs[..i].iter().any(|(k, _)| k == key) {
            return bad(format!("the query parameter `{key}` is given twice"));
        }
    }
    let get = |k: &str| {
        pairs
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    match get("api-version") {
        Some(v) if v == protocol.api_version() => {}
        Some(v) => {
            return bad(format!(
                "api-version {v} is not supported here; use {}",
                protocol.api_version()
            ));
        }
        None => {
            return bad(format!(
                "the query parameter api-version is required ({})",
                protocol.api_version()
            ));
        }
    }
    let resource = match get("resource") {
        None => return bad("the query parameter resource is required".to_string()),
        Some(r) => r,
    };
    if let Err(why) = check_resource(resource) {
        return bad(why);
    }
    let mut selector: Option<(Identity, &str)> = None;
    for (key, value) in pairs {
        if key == "api-version" || key == "resource" {
            continue;
        }
        let Some(named) = protocol.selector(key, value) else {
            // An unknown parameter may be a way of naming an identity this
            // endpoint does not know: answering with the default identity
            // would hand out the wrong one.
            return bad(format!("unknown query parameter `{key}`"));
        };
        if let Err(why) = check_id(key, value) {
            return bad(why);
        }
        match &selector {
            None => selector = Some((named, key)),
            // MSAL-style clients may send Azure ML's `clientid` and
            // `client_id` together; the same id twice names one identity.
            Some((Identity::ClientId(v), _)) if matches!(&named, Identity::ClientId(n) if n.eq_ignore_ascii_case(v)) =>
                {}
            Some((_, first)) => {
                return bad(format!(
                    "give one identity: `{first}` and `{key}` are both given"
                ));
            }
        }
    }
    Ok(TokenRequest {
        resource: resource.to_string(),
        imds_resource: resource_of_scope(resource).to_string(),
        selector: selector.map(|(identity, _)| identity),
    })
}

/// The resource of a scope: `https://management.azure.com/.default` is
/// `https://management.azure.com` (as the SDKs turn scopes into resources);
/// a resource is itself.
pub fn resource_of_scope(resource: &str) -> &str {
    resource.strip_suffix("/.default").unwrap_or(resource)
}

fn check_resource(resource: &str) -> Result<(), String> {
    if resource.trim().is_empty() || resource_of_scope(resource).is_empty() {
        return Err("the query parameter resource must not be empty".to_string());
    }
    if resource.len() > MAX_RESOURCE_BYTES {
        return Err(format!(
            "the resource is {} bytes long, at most {MAX_RESOURCE_BYTES}",
            resource.len()
        ));
    }
    if resource
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err("the resource holds whitespace or control characters".to_string());
    }
    Ok(())
}

/// An identity id: a GUID or an ARM path, never empty, short, printable.
fn check_id(key: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("the query parameter `{key}` must not be empty"));
    }
    if value.len() > 1024 || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("the query parameter `{key}` is not an identity id"));
    }
    Ok(())
}

/// A token as a protocol answers it.
#[derive(Debug, Clone, Copy)]
pub struct Issued<'a> {
    /// The bearer token.
    pub access_token: &'a str,
    /// Its expiry, epoch seconds.
    pub expires_on: u64,
    /// The resource as the caller sent it.
    pub resource: &'a str,
    /// `Bearer`.
    pub token_type: &'a str,
    /// The identity's client id.
    pub client_id: &'a str,
}

/// The body of a token answer in `protocol`'s shape.
pub fn token_body(protocol: Protocol, t: &Issued<'_>) -> Value {
    let token_type = if t.token_type.is_empty() {
        "Bearer"
    } else {
        t.token_type
    };
    match protocol {
        Protocol::AzureMl => json!({
            "access_token": t.access_token,
            "expires_on": t.expires_on,
            "resource": t.resource,
            "token_type": token_type,
        }),
        Protocol::AppService => json!({
            "access_token": t.access_token,
            "expires_on": t.expires_on.to_string(),
            "resource": t.resource,
            "token_type": token_type,
            "client_id": t.client_id,
        }),
    }
}

/// The body of an error answer in `protocol`'s shape: OAuth's `{error,
/// error_description}` for Azure ML (as IMDS answers), App Service's
/// `{statusCode, message, correlationId}`.
pub fn error_body(
    protocol: Protocol,
    status: u16,
    code: &str,
    message: &str,
    correlation_id: &str,
) -> Value {
    match protocol {
        Protocol::AzureMl => json!({"error": code, "error_description": message}),
        Protocol::AppService => json!({
            "statusCode": status,
            "message": message,
            "correlationId": correlation_id,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const ARM: &str = "https://management.azure.com";

    #[test]
    fn azure_ml_requests_as_the_sdks_send_them() {
        // Python azure-identity, no client id named.
        let r = parse_request(
            Protocol::AzureMl,
            &q(&[("api-version", "2017-09-01"), ("resource", ARM)]),
        )
        .expect("reads");
        assert_eq!(r.resource, ARM);
        assert_eq!(r.selector, None);
        // Go and .NET with DEFAULT_IDENTITY_CLIENT_ID.
        let id = "6f4c2a58-21c5-4b0e-9c1c-7a5d1e0f3b2a";
        let r = parse_request(
            Protocol::AzureMl,
            &q(&[
                ("api-version", "2017-09-01"),
                ("resource", ARM),
                ("clientid", id),
            ]),
        )
        .expect("reads");
        assert_eq!(r.selector, Some(Identity::ClientId(id.into())));
        // The same id under both spellings is one identity.
        let r = parse_request(
            Protocol::AzureMl,
            &q(&[
                ("api-version", "2017-09-01"),
                ("resource", ARM),
                ("clientid", id),
                ("client_id", &id.to_uppercase()),
            ]),
        )
        .expect("reads");
        assert_eq!(r.selector, Some(Identity::ClientId(id.into())));
    }

    #[test]
    fn app_service_requests_name_identities_three_ways() {
        let base = [("api-version", "2019-08-01"), ("resource", ARM)];
        for (key, expect) in [
            ("client_id", Identity::ClientId("c".into())),
            ("object_id", Identity::ObjectId("c".into())),
            ("mi_res_id", Identity::ResourceId("c".into())),
            ("msi_res_id", Identity::ResourceId("c".into())),
        ] {
            let mut pairs = base.to_vec();
            pairs.push((key, "c"));
            let r = parse_request(Protocol::AppService, &q(&pairs)).expect(key);
            assert_eq!(r.selector, Some(expect), "{key}");
        }
        // Azure ML's own spelling is not App Service's.
        let mut pairs = base.to_vec();
        pairs.push(("clientid", "c"));
        assert_eq!(
            parse_request(Protocol::AppService, &q(&pairs)),
            Err(BadRequest("unknown query parameter `clientid`".into()))
        );
    }

    #[test]
    fn a_scope_asks_imds_for_its_resource_and_is_echoed_as_sent() {
        let scope = "https://management.azure.com/.default";
        let r = parse_request(
            Protocol::AppService,
            &q(&[("api-version", "2019-08-01"), ("resource", scope)]),
        )
        .expect("reads");
        assert_eq!(r.resource, scope);
        assert_eq!(r.imds_resource, ARM);
        assert_eq!(
            resource_of_scope("https://vault.azure.net/"),
            "https://vault.azure.net/"
        );
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let long = "x".repeat(MAX_RESOURCE_BYTES + 1);
        for (protocol, pairs, why) in [
            (
                Protocol::AzureMl,
                vec![("resource", ARM)],
                "the query parameter api-version is required (2017-09-01)",
            ),
            (
                Protocol::AzureMl,
                vec![("api-version", "2019-08-01"), ("resource", ARM)],
                "api-version 2019-08-01 is not supported here; use 2017-09-01",
            ),
            (
                Protocol::AppService,
                vec![("api-version", "2017-09-01"), ("resource", ARM)],
                "api-version 2017-09-01 is not supported here; use 2019-08-01",
            ),
            (
                Protocol::AzureMl,
                vec![("api-version", "2017-09-01")],
                "the query parameter resource is required",
            ),
            (
                Protocol::AzureMl,
                vec![("api-version", "2017-09-01"), ("resource", "")],
                "the query parameter resource must not be empty",
            ),
            (
                Protocol::AzureMl,
                vec![("api-version", "2017-09-01"), ("resource", "/.default")],
                "the query parameter resource must not be empty",
            ),
            (
                Protocol::AzureMl,
                vec![("api-version", "2017-09-01"), ("resource", long.as_str())],
                "the resource is 2049 bytes long, at most 2048",
            ),
            (
                Protocol::AzureMl,
                vec![("api-version", "2017-09-01"), ("resource", "a b")],
                "the resource holds whitespace or control characters",
            ),
            (
                Protocol::AzureMl,
                vec![
                    ("api-version", "2017-09-01"),
                    ("resource", ARM),
                    ("resource", ARM),
                ],
                "the query parameter `resource` is given twice",
            ),
            (
                Protocol::AzureMl,
                vec![
                    ("api-version", "2017-09-01"),
                    ("resource", ARM),
                    ("principal_id", "p"),
                ],
                "unknown query parameter `principal_id`",
            ),
            (
                Protocol::AzureMl,
                vec![
                    ("api-version", "2017-09-01"),
                    ("resource", ARM),
                    ("clientid", ""),
                ],
                "the query parameter `clientid` must not be empty",
            ),
            (
                Protocol::AppService,
                vec![
                    ("api-version", "2019-08-01"),
                    ("resource", ARM),
                    ("client_id", "a"),
                    ("mi_res_id", "b"),
                ],
                "give one identity: `client_id` and `mi_res_id` are both given",
            ),
        ] {
            assert_eq!(
                parse_request(protocol, &q(&pairs)),
                Err(BadRequest(why.to_string())),
                "{pairs:?}"
            );
        }
    }

    #[test]
    fn answers_in_each_protocols_shape() {
        let t = Issued {
            access_token: "eyJ",
            expires_on: 1_700_000_000,
            resource: ARM,
            token_type: "",
            client_id: "c",
        };
        assert_eq!(
            token_body(Protocol::AzureMl, &t),
            json!({"access_token": "eyJ", "expires_on": 1_700_000_000u64, "resource": ARM, "token_type": "Bearer"})
        );
        assert_eq!(
            token_body(Protocol::AppService, &t),
            json!({"access_token": "eyJ", "expires_on": "1700000000", "resource": ARM, "token_type": "Bearer", "client_id": "c"})
        );
        assert_eq!(
            error_body(Protocol::AzureMl, 403, "identity_not_granted", "no", "x"),
            json!({"error": "identity_not_granted", "error_description": "no"})
        );
        assert_eq!(
            error_body(Protocol::AppService, 403, "identity_not_granted", "no", "x"),
            json!({"statusCode": 403, "message": "no", "correlationId": "x"})
        );
    }
}
