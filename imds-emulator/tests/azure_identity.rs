//! Conformance with a real client: Python's `azure-identity`
//! `ManagedIdentityCredential` (Debian's `python3-azure`) gets tokens from the
//! emulator exactly as it would from IMDS. It is pointed at the emulator with
//! `AZURE_POD_IDENTITY_AUTHORITY_HOST`, which replaces `http://169.254.169.254`
//! in its IMDS URL (`azure/identity/_credentials/imds.py`).

use std::process::Command;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use drover_imds_emulator::{Emulator, EmulatorConfig, ManagedIdentity, VmSpec};
use serde_json::Value;

/// Debian's interpreter, which has `python3-azure`; not whatever `python3` is first on PATH.
const PYTHON: &str = "/usr/bin/python3";

const SCRIPT: &str = r#"
import json, sys
from azure.identity import ManagedIdentityCredential
out = {}
system = ManagedIdentityCredential()
t = system.get_token("https://management.azure.com/.default")
out["system"] = {"token": t.token, "expires_on": t.expires_on}
user = ManagedIdentityCredential(client_id=sys.argv[1])
t = user.get_token("https://vault.azure.net/.default")
out["user"] = {"token": t.token, "expires_on": t.expires_on}
try:
    ManagedIdentityCredential(client_id="00000000-0000-0000-0000-000000000000").get_token("https://vault.azure.net/.default")
    out["unknown"] = "got a token"
except Exception as e:
    out["unknown"] = type(e).__name__ + ": " + str(e)
print(json.dumps(out))
"#;

fn has_azure_identity() -> bool {
    Command::new(PYTHON)
        .args(["-c", "import azure.identity"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("jwt payload");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64url")).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_azure_identity_gets_tokens_from_the_emulator() {
    // No silent skip: a conformance check that does not run proves nothing.
    // `make test` (scripts/setup.sh) installs the package.
    assert!(
        has_azure_identity(),
        "{PYTHON} cannot import azure.identity; install it with `apt-get install python3-azure` (scripts/setup.sh does)"
    );
    let mut vm = VmSpec::new("node-0");
    let user =
        ManagedIdentity::user_assigned(&vm.subscription_id, &vm.resource_group, "job-identity");
    vm.user_identities.push(user.clone());
    let emulator = Emulator::new(EmulatorConfig::default());
    emulator.add_vm(vm.clone()).expect("add vm");
    let server = emulator
        .bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    let system = emulator.vms()[0]
        .system_identity
        .clone()
        .expect("system identity");

    let base_url = server.base_url();
    let client_id = user.client_id.clone();
    let output = tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(PYTHON);
        cmd.args(["-c", SCRIPT, &client_id])
            .env("AZURE_POD_IDENTITY_AUTHORITY_HOST", &base_url)
            .env("NO_PROXY", "*");
        // Make sure the credential picks IMDS, not App Service / Azure ML / Arc.
        for var in [
            "IDENTITY_ENDPOINT",
            "IDENTITY_HEADER",
            "IDENTITY_SERVER_THUMBPRINT",
            "IMDS_ENDPOINT",
            "MSI_ENDPOINT",
            "MSI_SECRET",
            "AZURE_CLIENT_ID",
            "AZURE_TENANT_ID",
            "AZURE_FEDERATED_TOKEN_FILE",
            "HTTP_PROXY",
            "http_proxy",
        ] {
            cmd.env_remove(var);
        }
        cmd.output()
    })
    .await
    .expect("join")
    .expect("run python");
    assert!(
        output.status.success(),
        "python failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let out: Value = serde_json::from_slice(&output.stdout).expect("json from python");

    let system_claims = claims(out["system"]["token"].as_str().expect("system token"));
    assert_eq!(system_claims["aud"], "https://management.azure.com");
    assert_eq!(system_claims["oid"], system.object_id.as_str());
    assert_eq!(system_claims["xms_mirid"], vm.resource_id().as_str());
    assert_eq!(out["system"]["expires_on"], system_claims["exp"]);

    let user_claims = claims(out["user"]["token"].as_str().expect("user token"));
    assert_eq!(user_claims["aud"], "https://vault.azure.net");
    assert_eq!(user_claims["appid"], user.client_id.as_str());
    assert_eq!(user_claims["oid"], user.object_id.as_str());

    // An identity the VM does not have: azure-identity turns IMDS's 400 into
    // CredentialUnavailableError, as on Azure.
    let unknown = out["unknown"].as_str().expect("unknown");
    assert!(
        unknown.starts_with("CredentialUnavailableError"),
        "{unknown}"
    );
    assert_eq!(emulator.stats().tokens_issued, 2);
}
