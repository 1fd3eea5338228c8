//! JWT-shaped access tokens signed with the emulator's own key.
//!
//! ES256 (ECDSA over P-256 with SHA-256, RFC 7518 §3.4) rather than Entra ID's
//! RS256: with the pure-Rust `p256` crate a key is generated in microseconds
//! and nothing needs a C toolchain, while any JOSE library can still verify the
//! token against the JWKS the emulator publishes.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p256::ecdsa::signature::{Signer as _, Verifier as _};
use p256::ecdsa::{Signature, SigningKey};
use serde_json::{Value, json};

/// Claims the emulator writes into a token.
#[derive(Debug, Clone)]
pub(crate) struct Claims<'a> {
    pub audience: &'a str,
    pub issuer: &'a str,
    pub tenant_id: &'a str,
    pub object_id: &'a str,
    pub client_id: &'a str,
    pub mi_resource_id: &'a str,
    pub issued_at: u64,
    pub expires_at: u64,
}

/// The emulator's signing key.
pub(crate) struct Signer {
    key: SigningKey,
    kid: String,
}

impl Signer {
    /// A fresh random key.
    pub(crate) fn generate() -> Self {
        let key = SigningKey::random(&mut rand_core::OsRng);
        let point = key.verifying_key().to_encoded_point(false);
        // The key id is derived from the public key so it is stable for one key.
        let kid = URL_SAFE_NO_PAD.encode(&point.as_bytes()[1..13]);
        Self { key, kid }
    }

    /// The public key as a JWK Set (RFC 7517).
    pub(crate) fn jwks(&self) -> serde_json::Value {
        let point = self.key.verifying_key().to_encoded_point(false);
        let (x, y) = match (point.x(), point.y()) {
            (Some(x), Some(y)) => (URL_SAFE_NO_PAD.encode(x), URL_SAFE_NO_PAD.encode(y)),
            // An uncompressed, non-identity point always has both coordinates.
            _ => (String::new(), String::new()),
        };
        json!({"keys": [{
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256",
            "kid": self.kid, "x": x, "y": y,
        }]})
    }

    /// Encodes and signs `claims` as a compact JWS.
    pub(crate) fn sign(&self, claims: &Claims<'_>) -> String {
        let payload = json!({
            "aud": claims.audience,
            "iss": claims.issuer,
            "iat": claims.issued_at,
            "nbf": claims.issued_at,
            "exp": claims.expires_at,
            "aio": "drover-imds-emulator",
            "appid": claims.client_id,
            "appidacr": "2",
            "idp": claims.issuer,
            "oid": claims.object_id,
            "sub": claims.object_id,
            "tid": claims.tenant_id,
            "uti": crate::random_uuid(),
            "ver": "1.0",
            "xms_mirid": claims.mi_resource_id,
        });
        self.sign_claims(&payload)
    }

    /// Signs any claim set with this key (its `kid` in the header).
    pub(crate) fn sign_claims(&self, payload: &Value) -> String {
        let header = json!({"typ": "JWT", "alg": "ES256", "kid": self.kid});
        sign_jws(&self.key, &header, payload)
    }

    /// The claims of `token` when this key signed it and it has not
    /// expired at `now` (seconds since the epoch).
    pub(crate) fn verify(&self, token: &str, now: u64) -> Result<Value, String> {
        verify_jws(&self.key, token, now)
    }
}

/// A compact JWS of `payload` under `header`, signed ES256 with `key`.
pub(crate) fn sign_jws(key: &SigningKey, header: &Value, payload: &Value) -> String {
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(payload.to_string())
    );
    let signature: Signature = key.sign(signing_input.as_bytes());
    format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature.to_bytes())
    )
}

/// The claims of a compact JWS `key` signed, unless it is malformed, its
/// signature is not `key`'s, or its `exp` is not after `now`.
pub(crate) fn verify_jws(key: &SigningKey, token: &str, now: u64) -> Result<Value, String> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("the token is not a compact JWS".to_owned());
    };
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .ok()
        .and_then(|b| Signature::from_slice(&b).ok())
        .ok_or("the token's signature is malformed")?;
    key.verifying_key()
        .verify(format!("{header}.{payload}").as_bytes(), &signature)
        .map_err(|_| "the token was not issued by this service".to_owned())?;
    let claims: Value = URL_SAFE_NO_PAD
        .decode(payload)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or("the token's claims are not JSON")?;
    match claims.get("exp").and_then(Value::as_u64) {
        Some(exp) if exp > now => Ok(claims),
        Some(_) => Err("the token has expired".to_owned()),
        None => Err("the token has no expiry".to_owned()),
    }
}
