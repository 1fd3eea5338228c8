//! Which tokens a part may have: only those of its cluster's identities.
//!
//! Decided by the token itself: the endpoint asks IMDS (through the
//! client's cache) for the identity a request names and reads the JWT's
//! `xms_mirid` claim, the ARM id of the identity IMDS issued it to. The
//! signature is not checked: the token came straight from IMDS. A client
//! or object id says nothing by itself about which identity it is; the
//! token's claims do. Pure: plain data in, a verdict out.

use base64::Engine as _;
use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use drover_api::compute;
use drover_api::job::same_resource_id;
use drover_imds::Identity;

use super::Outcome;

/// What a part's cluster grants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// No identity: every request is refused.
    None,
    /// The node's own (system-assigned) identity.
    System,
    /// These user-assigned identities, by ARM resource id.
    User(Vec<String>),
}

impl From<&compute::Identity> for Grant {
    fn from(identity: &compute::Identity) -> Self {
        match identity {
            compute::Identity::None => Grant::None,
            compute::Identity::SystemAssigned => Grant::System,
            compute::Identity::UserAssigned { resource_ids } => Grant::User(resource_ids.clone()),
        }
    }
}

impl Grant {
    /// The identity a request naming none gets when the job names none
    /// either: the node's own, or the cluster's first user-assigned one
    /// (Azure ML's default is the same: `DEFAULT_IDENTITY_CLIENT_ID`).
    pub fn default_identity(&self) -> Option<Identity> {
        match self {
            Grant::None => None,
            Grant::System => Some(Identity::System),
            Grant::User(ids) => ids.first().map(|id| Identity::ResourceId(id.clone())),
        }
    }
}

/// A refusal: its outcome and the message the caller reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// What the audit log and the metrics call it.
    pub outcome: Outcome,
    /// What the caller is told.
    pub message: String,
}

fn refuse(outcome: Outcome, message: impl Into<String>) -> Refusal {
    Refusal {
        outcome,
        message: message.into(),
    }
}

/// What the cluster's definition alone refuses, before IMDS is asked: a
/// cluster without identity, and resource ids it does not list.
pub fn precheck(grant: &Grant, asked: &Identity) -> Result<(), Refusal> {
    match (grant, asked) {
        (Grant::None, _) => Err(refuse(
            Outcome::NoIdentity,
            "the job's cluster has no managed identity",
        )),
        (Grant::System, Identity::ResourceId(id)) => Err(refuse(
            Outcome::NotGranted,
            format!(
                "the job's cluster grants its system-assigned identity, not the user-assigned identity {id}"
            ),
        )),
        (Grant::User(ids), Identity::ResourceId(id))
            if !ids.iter().any(|g| same_resource_id(g, id)) =>
        {
            Err(refuse(
                Outcome::NotGranted,
                format!("identity {id} is not one of the job's cluster's identities"),
            ))
        }
        _ => Ok(()),
    }
}

/// Whether an ARM id names a user-assigned identity (rather than a VM or
/// scale set, the `xms_mirid` of a system-assigned identity).
pub fn is_user_assigned(resource_id: &str) -> bool {
    resource_id
        .to_ascii_lowercase()
        .contains("/providers/microsoft.managedidentity/userassignedidentities/")
}

/// Whether a token IMDS issued for `asked` is one the part may have.
/// `token_mirid` is the token's `xms_mirid`; `system_mirid` that of the
/// node's own identity (the token IMDS issues when no identity is named),
/// needed only on a system-assigned cluster.
pub fn judge(
    grant: &Grant,
    asked: &Identity,
    token_mirid: &str,
    system_mirid: Option<&str>,
) -> Result<(), Refusal> {
    let not_granted = || {
        refuse(
            Outcome::NotGranted,
            format!("{asked} is not one of the job's cluster's identities"),
        )
    };
    if token_mirid.trim().is_empty() {
        return Err(refuse(
            Outcome::Unverifiable,
            "imds issued a token that names no identity (no xms_mirid claim)",
        ));
    }
    match grant {
        Grant::None => Err(refuse(
            Outcome::NoIdentity,
            "the job's cluster has no managed identity",
        )),
        Grant::User(ids) if ids.iter().any(|g| same_resource_id(g, token_mirid)) => Ok(()),
        Grant::User(_) => Err(not_granted()),
        // The node's own identity and only it: on a VM with no system
        // identity and one user-assigned one, IMDS answers a request naming
        // none with the user-assigned identity's token.
        Grant::System
            if !is_user_assigned(token_mirid)
                && system_mirid.is_some_and(|s| same_resource_id(s, token_mirid)) =>
        {
            Ok(())
        }
        Grant::System => Err(not_granted()),
    }
}

/// The claims of an access token that the endpoint reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenClaims {
    /// `xms_mirid`: the ARM id of the managed identity.
    pub mirid: String,
    /// `appid`: the identity's client id.
    pub appid: String,
}

/// The claims of a JWT's payload, unverified (the token came from IMDS);
/// `None` when it is not a JWT.
pub fn token_claims(token: &str) -> Option<TokenClaims> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD
        .decode(payload)
        .or_else(|_| URL_SAFE.decode(payload))
        .ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let text = |k: &str| {
        value
            .get(k)
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string()
    };
    Some(TokenClaims {
        mirid: text("xms_mirid"),
        appid: text("appid"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uai(name: &str) -> String {
        format!(
            "/subscriptions/8d10da13-8125-4ba9-a717-bf7490507b3d/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
        )
    }
    const VM: &str = "/subscriptions/8d10da13-8125-4ba9-a717-bf7490507b3d/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/node-0";

    #[test]
    fn the_cluster_definition_refuses_what_it_can_alone() {
        let user = Grant::User(vec![uai("one")]);
        let outcome = |g: &Grant, a: &Identity| precheck(g, a).map_err(|r| r.outcome);
        assert_eq!(
            outcome(&Grant::None, &Identity::System),
            Err(Outcome::NoIdentity)
        );
        assert_eq!(
            outcome(&Grant::None, &Identity::ClientId("c".into())),
            Err(Outcome::NoIdentity)
        );
        assert_eq!(
            outcome(&Grant::System, &Identity::ResourceId(uai("one"))),
            Err(Outcome::NotGranted)
        );
        assert_eq!(
            outcome(&user, &Identity::ResourceId(uai("two"))),
            Err(Outcome::NotGranted)
        );
        // Case does not matter in ARM ids; client and object ids wait for
        // the token.
        assert_eq!(
            outcome(&user, &Identity::ResourceId(uai("ONE").to_uppercase())),
            Ok(())
        );
        assert_eq!(outcome(&user, &Identity::ClientId("c".into())), Ok(()));
        assert_eq!(outcome(&Grant::System, &Identity::System), Ok(()));
    }

    #[test]
    fn the_token_decides() {
        let user = Grant::User(vec![uai("one"), uai("two")]);
        let asked = Identity::ClientId("c".into());
        let verdict = |g: &Grant, mirid: &str, system: Option<&str>| {
            judge(g, &asked, mirid, system).map_err(|r| r.outcome)
        };
        assert_eq!(verdict(&user, &uai("two"), None), Ok(()));
        assert_eq!(verdict(&user, &uai("two").to_uppercase(), None), Ok(()));
        assert_eq!(
            verdict(&user, &uai("three"), None),
            Err(Outcome::NotGranted)
        );
        assert_eq!(verdict(&user, VM, None), Err(Outcome::NotGranted));
        // System-assigned: the node's own identity, not another the VM has.
        assert_eq!(verdict(&Grant::System, VM, Some(VM)), Ok(()));
        assert_eq!(
            verdict(&Grant::System, &uai("one"), Some(VM)),
            Err(Outcome::NotGranted)
        );
        // A VM whose only identity is user-assigned answers "none named"
        // with it: still not the cluster's system identity.
        assert_eq!(
            verdict(&Grant::System, &uai("one"), Some(&uai("one"))),
            Err(Outcome::NotGranted)
        );
        assert_eq!(verdict(&Grant::System, VM, None), Err(Outcome::NotGranted));
        assert_eq!(
            verdict(&Grant::None, VM, Some(VM)),
            Err(Outcome::NoIdentity)
        );
        assert_eq!(verdict(&user, "", None), Err(Outcome::Unverifiable));
    }

    #[test]
    fn defaults_follow_the_cluster() {
        assert_eq!(Grant::None.default_identity(), None);
        assert_eq!(Grant::System.default_identity(), Some(Identity::System));
        assert_eq!(
            Grant::User(vec![uai("one"), uai("two")]).default_identity(),
            Some(Identity::ResourceId(uai("one")))
        );
    }

    #[test]
    fn claims_are_read_from_the_payload() {
        let payload = URL_SAFE_NO_PAD.encode(
            serde_json::json!({"xms_mirid": uai("one"), "appid": "c", "aud": "x"}).to_string(),
        );
        let claims = token_claims(&format!("eyJhbGciOiJFUzI1NiJ9.{payload}.sig")).expect("a jwt");
        assert_eq!(claims.mirid, uai("one"));
        assert_eq!(claims.appid, "c");
        assert_eq!(token_claims("not a jwt"), None);
        assert_eq!(token_claims("a.!!!.c"), None);
        assert_eq!(
            token_claims(&format!("a.{}.c", URL_SAFE_NO_PAD.encode("{}"))),
            Some(TokenClaims::default())
        );
    }
}
