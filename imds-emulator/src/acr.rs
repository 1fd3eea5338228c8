//! The token service of an Azure Container Registry, for a registry (such
//! as Distribution's `docker-registry`) whose `auth: token` realm is this
//! emulator's `/oauth2/token`.
//!
//! It speaks ACR's protocol for managed identities, as `az acr login` and
//! Drover's agent use it:
//! 1. `POST /oauth2/exchange` (form: `grant_type=access_token`, `service`,
//!    `access_token`): a Microsoft Entra access token (one this emulator
//!    issued through IMDS) becomes an ACR refresh token for that service;
//! 2. `GET /oauth2/token?service=…&scope=…` with HTTP Basic auth (user
//!    `00000000-0000-0000-0000-000000000000`, password the refresh token),
//!    as Docker asks after a `docker login` with it, or `POST /oauth2/token`
//!    (`grant_type=refresh_token`): a registry access token for the scopes.
//!
//! Refresh tokens are signed with the emulator's own key; registry access
//! tokens with the key whose certificate the registry trusts
//! (`rootcertbundle`), the certificate in the token's `x5c` header, which
//! is how Distribution finds the key to verify with.
//!
//! <https://github.com/Azure/acr/blob/main/docs/AAD-OAuth.md>

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use p256::ecdsa::SigningKey;
use p256::pkcs8::DecodePrivateKey as _;
use serde_json::{Value, json};

use crate::state::ImdsResponse;
use crate::token::{Signer, sign_jws};

/// The `iss` of registry access tokens: the registry's `auth.token.issuer`.
pub const REGISTRY_TOKEN_ISSUER: &str = "Azure Container Registry";

/// How long a refresh token lives (ACR: three hours).
const REFRESH_LIFETIME_SECS: u64 = 3 * 3600;

/// How long a registry access token lives (ACR: 75 minutes).
const ACCESS_LIFETIME_SECS: u64 = 75 * 60;

/// Audiences of Entra tokens ACR exchanges: Resource Manager's and its own.
const ACCEPTED_AUDIENCES: &[&str] = &[
    "https://management.azure.com/",
    "https://management.azure.com",
    "https://management.core.windows.net/",
    "https://containerregistry.azure.net",
];

/// Why the registry token service could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RegistryTokensError {
    /// The key is not a PEM PKCS#8 P-256 private key.
    #[error(
        "the registry token key is not a PEM PKCS#8 P-256 private key (openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256)"
    )]
    Key,
    /// The certificate is not PEM.
    #[error("the registry token certificate is not a PEM certificate")]
    Certificate,
}

/// The registry token service: the key that signs access tokens and its
/// certificate.
pub struct RegistryTokens {
    key: SigningKey,
    /// The certificate, DER in standard base64, as `x5c` carries it.
    x5c: String,
}

impl RegistryTokens {
    /// From a PEM PKCS#8 P-256 private key and the PEM certificate of its
    /// public key (self-signed will do: the registry trusts it directly).
    pub fn from_pem(key_pem: &str, cert_pem: &str) -> Result<Self, RegistryTokensError> {
        let key = pem_body(key_pem, "PRIVATE KEY")
            .and_then(|der| SigningKey::from_pkcs8_der(&der).ok())
            .ok_or(RegistryTokensError::Key)?;
        let cert = pem_body(cert_pem, "CERTIFICATE").ok_or(RegistryTokensError::Certificate)?;
        Ok(Self {
            key,
            x5c: STANDARD.encode(cert),
        })
    }

    /// `POST /oauth2/exchange`: an Entra access token for an ACR refresh token.
    pub(crate) fn exchange(
        &self,
        entra: &Signer,
        form: &[(String, String)],
        now: u64,
    ) -> ImdsResponse {
        let field = |name: &str| {
            form.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
                .filter(|v| !v.is_empty())
        };
        match field("grant_type") {
            Some("access_token") => {}
            Some(other) => {
                return refusal(
                    400,
                    "UNSUPPORTED_GRANT_TYPE",
                    &format!("grant_type {other} is not supported; use access_token"),
                );
            }
            None => return refusal(400, "BAD_REQUEST", "grant_type is required"),
        }
        let Some(service) = field("service") else {
            return refusal(400, "BAD_REQUEST", "service is required");
        };
        let Some(token) = field("access_token") else {
            return refusal(400, "BAD_REQUEST", "access_token is required");
        };
        let claims = match entra.verify(token, now) {
            Ok(claims) => claims,
            Err(why) => {
                return refusal(
                    401,
                    "UNAUTHORIZED",
                    &format!("the access token is not valid: {why}"),
                );
            }
        };
        let audience = claims.get("aud").and_then(Value::as_str).unwrap_or("");
        if !ACCEPTED_AUDIENCES.contains(&audience) {
            return refusal(
                401,
                "UNAUTHORIZED",
                &format!(
                    "an access token for {audience} cannot be exchanged; ask for https://management.azure.com/"
                ),
            );
        }
        let refresh = entra.sign_claims(&json!({
            "jti": crate::random_uuid(),
            "sub": claims.get("oid").cloned().unwrap_or(Value::Null),
            "tenant": claims.get("tid").cloned().unwrap_or(Value::Null),
            "iss": REGISTRY_TOKEN_ISSUER,
            "aud": service,
            "iat": now,
            "nbf": now,
            "exp": now + REFRESH_LIFETIME_SECS,
            "grant_type": "refresh_token",
            "version": "1.0",
            "permissions": {"actions": ["read", "write", "delete"], "notActions": []},
        }));
        ImdsResponse::ok(json!({"refresh_token": refresh}))
    }

    /// `GET|POST /oauth2/token`: a refresh token for a registry access
    /// token holding `scopes` (`repository:NAME:pull,push`).
    pub(crate) fn access_token(
        &self,
        entra: &Signer,
        refresh: &str,
        service: &str,
        scopes: &[String],
        now: u64,
    ) -> ImdsResponse {
        let claims = match entra.verify(refresh, now) {
            Ok(claims)
                if claims.get("grant_type").and_then(Value::as_str) == Some("refresh_token") =>
            {
                claims
            }
            Ok(_) => {
                return refusal(
                    401,
                    "UNAUTHORIZED",
                    "the password is not an ACR refresh token",
                );
            }
            Err(why) => {
                return refusal(
                    401,
                    "UNAUTHORIZED",
                    &format!("the refresh token is not valid: {why}"),
                );
            }
        };
        let for_service = claims.get("aud").and_then(Value::as_str).unwrap_or("");
        if for_service != service {
            return refusal(
                401,
                "UNAUTHORIZED",
                &format!("the refresh token is for {for_service}, not {service}"),
            );
        }
        let mut access = Vec::new();
        for scope in scopes
            .iter()
            .flat_map(|s| s.split(' '))
            .filter(|s| !s.is_empty())
        {
            let parsed = scope.split_once(':').and_then(|(kind, rest)| {
                rest.rsplit_once(':')
                    .map(|(name, actions)| (kind, name, actions))
            });
            let Some((kind, name, actions)) = parsed else {
                return refusal(
                    400,
                    "BAD_REQUEST",
                    &format!("scope {scope} is not TYPE:NAME:ACTIONS"),
                );
            };
            let actions: Vec<&str> = actions.split(',').filter(|a| !a.is_empty()).collect();
            access.push(json!({"type": kind, "name": name, "actions": actions}));
        }
        let header = json!({"typ": "JWT", "alg": "ES256", "x5c": [self.x5c]});
        let token = sign_jws(
            &self.key,
            &header,
            &json!({
                "jti": crate::random_uuid(),
                "sub": claims.get("sub").cloned().unwrap_or(Value::Null),
                "iss": REGISTRY_TOKEN_ISSUER,
                "aud": service,
                "iat": now,
                "nbf": now,
                "exp": now + ACCESS_LIFETIME_SECS,
                "version": "1.0",
                "grant_type": "refresh_token",
                "access": access,
            }),
        );
        ImdsResponse::ok(json!({
            "access_token": token,
            "token": token,
            "expires_in": ACCESS_LIFETIME_SECS,
        }))
    }
}

/// ACR's error body.
fn refusal(status: u16, code: &str, message: &str) -> ImdsResponse {
    ImdsResponse::error(
        status,
        json!({"errors": [{"code": code, "message": message}]}),
    )
}

/// The bytes of the first `label` block of a PEM text.
fn pem_body(pem: &str, label: &str) -> Option<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = pem.find(&begin)? + begin.len();
    let stop = start + pem[start..].find(&end)?;
    let text: String = pem[start..stop]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    STANDARD.decode(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::{Claims, verify_jws};

    const NOW: u64 = 1_800_000_000;
    const SERVICE: &str = "127.0.0.1:5000";

    fn entra_token(signer: &Signer, audience: &str, expires_at: u64) -> String {
        signer.sign(&Claims {
            audience,
            issuer: "https://sts.windows.net/t/",
            tenant_id: "t",
            object_id: "oid-1",
            client_id: "cid-1",
            mi_resource_id: "/subscriptions/s/vm",
            issued_at: NOW - 10,
            expires_at,
        })
    }

    fn form(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn service() -> RegistryTokens {
        RegistryTokens {
            key: SigningKey::random(&mut rand_core::OsRng),
            x5c: "Y2VydA==".to_owned(),
        }
    }

    fn message(answer: &ImdsResponse) -> String {
        answer.body["errors"][0]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    #[test]
    fn an_entra_token_becomes_a_refresh_token_and_then_a_scoped_access_token() {
        let (entra, tokens) = (Signer::generate(), service());
        let aad = entra_token(&entra, "https://management.azure.com/", NOW + 3600);
        let answer = tokens.exchange(
            &entra,
            &form(&[
                ("grant_type", "access_token"),
                ("service", SERVICE),
                ("access_token", &aad),
            ]),
            NOW,
        );
        assert_eq!(answer.status, 200, "{}", answer.body);
        let refresh = answer.body["refresh_token"].as_str().unwrap().to_owned();
        let claims = entra.verify(&refresh, NOW).unwrap();
        assert_eq!(claims["aud"], SERVICE);
        assert_eq!(claims["sub"], "oid-1");

        let scopes = ["repository:envs/trainer:pull,push".to_owned()];
        let answer = tokens.access_token(&entra, &refresh, SERVICE, &scopes, NOW);
        assert_eq!(answer.status, 200, "{}", answer.body);
        let token = answer.body["token"].as_str().unwrap();
        assert_eq!(answer.body["access_token"], token);
        let claims = verify_jws(&tokens.key, token, NOW).unwrap();
        assert_eq!(claims["iss"], REGISTRY_TOKEN_ISSUER);
        assert_eq!(claims["aud"], SERVICE);
        assert_eq!(
            claims["access"],
            json!([{"type": "repository", "name": "envs/trainer", "actions": ["pull", "push"]}])
        );
        let header: Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(token.split('.').next().unwrap())
                .unwrap(),
        )
        .unwrap();
        assert_eq!(header["x5c"], json!(["Y2VydA=="]));
        assert_eq!(header["alg"], "ES256");
    }

    #[test]
    fn foreign_expired_or_misdirected_tokens_are_refused_with_acr_errors() {
        let (entra, tokens) = (Signer::generate(), service());
        let exchange = |token: &str, grant: &str| {
            tokens.exchange(
                &entra,
                &form(&[
                    ("grant_type", grant),
                    ("service", SERVICE),
                    ("access_token", token),
                ]),
                NOW,
            )
        };
        let stranger = entra_token(
            &Signer::generate(),
            "https://management.azure.com/",
            NOW + 60,
        );
        let a = exchange(&stranger, "access_token");
        assert_eq!(a.status, 401);
        assert!(
            message(&a).contains("not issued by this service"),
            "{}",
            a.body
        );
        let expired = entra_token(&entra, "https://management.azure.com/", NOW - 1);
        assert!(message(&exchange(&expired, "access_token")).contains("expired"));
        let storage = entra_token(&entra, "https://storage.azure.com/", NOW + 60);
        let a = exchange(&storage, "access_token");
        assert_eq!(a.status, 401);
        assert!(
            message(&a).contains("https://storage.azure.com/"),
            "{}",
            a.body
        );
        let good = entra_token(&entra, "https://management.azure.com/", NOW + 60);
        assert_eq!(exchange(&good, "password").status, 400);
        let missing = tokens.exchange(&entra, &form(&[("grant_type", "access_token")]), NOW);
        assert_eq!(message(&missing), "service is required");

        // A refresh token for one registry opens no other; an Entra token
        // is not a refresh token.
        let refresh = exchange(&good, "access_token").body["refresh_token"]
            .as_str()
            .unwrap()
            .to_owned();
        let other = tokens.access_token(&entra, &refresh, "10.0.0.9:5000", &[], NOW);
        assert_eq!(other.status, 401);
        assert!(
            message(&other).contains("not 10.0.0.9:5000"),
            "{}",
            other.body
        );
        let not_refresh = tokens.access_token(&entra, &good, SERVICE, &[], NOW);
        assert!(message(&not_refresh).contains("not an ACR refresh token"));
        let bad_scope = tokens.access_token(&entra, &refresh, SERVICE, &["pull".into()], NOW);
        assert_eq!(bad_scope.status, 400);
    }

    #[test]
    fn keys_and_certificates_are_read_from_pem_and_garbage_is_refused() {
        assert!(matches!(
            RegistryTokens::from_pem("nope", "nope"),
            Err(RegistryTokensError::Key)
        ));
        assert_eq!(
            pem_body(
                "x\n-----BEGIN CERTIFICATE-----\nAAEC\nAw==\n-----END CERTIFICATE-----\n",
                "CERTIFICATE"
            ),
            Some(vec![0, 1, 2, 3])
        );
        assert_eq!(
            pem_body("-----BEGIN CERTIFICATE-----\nAAEC", "CERTIFICATE"),
            None
        );
    }
}
