//! Managed identity in job containers on a local cluster made by `drover
//! up`: unmodified Python `azure-identity` (Debian's, in
//! `drover/openmpi:bookworm`) gets its cluster's tokens from the node's
//! token endpoint through the App Service path and, with `IDENTITY_*`
//! unset, through Azure ML's; a user-assigned identity by client id; a
//! system-assigned cluster with the App Service protocol off; a cluster
//! without identity; and the refusals (no secret, a forged secret, an
//! ended part's secret, an identity the cluster lacks, no identity), each
//! in the node's audit log.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use drover_tests::{JobDir, LocalUp, containers_of_job, require_image, short_name, wait_until};
use serde_json::Value;

const IMAGE: &str = "drover/openmpi:bookworm";
const SUB: &str = "8d10da13-8125-4ba9-a717-bf7490507b3d";

fn uai(name: &str) -> String {
    format!(
        "/subscriptions/{SUB}/resourceGroups/rg-ml/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
    )
}

/// What the job runs: `probe.py MODE [ARG]` prints `RESULT MODE {json}`.
/// Tokens are never printed, only their claims; secrets never.
const PROBE_PY: &str = r#"
import base64, json, os, sys, urllib.error, urllib.request
from azure.identity import ManagedIdentityCredential

ARM = "https://management.azure.com/.default"
VAULT = "https://vault.azure.net/.default"

def claims(token):
    p = token.split(".")[1]
    c = json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))
    return {k: c.get(k) for k in ("aud", "xms_mirid", "appid", "oid")}

def get(cred, scope):
    try:
        t = cred.get_token(scope)
        return {"ok": True, "claims": claims(t.token), "expires_on": t.expires_on}
    except Exception as e:
        return {"ok": False, "error": type(e).__name__, "message": str(e)[:400]}

def path(cred):
    return type(cred._credential).__name__

def raw(url, headers):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
            body = json.loads(r.read())
            status = r.status
    except urllib.error.HTTPError as e:
        body = json.loads(e.read() or b"null")
        status = e.code
    if isinstance(body, dict) and "access_token" in body:
        body["access_token"] = claims(body["access_token"])
    return {"status": status, "body": body}

names = ["MSI_ENDPOINT", "IDENTITY_ENDPOINT", "DEFAULT_IDENTITY_CLIENT_ID"]
env = {n: os.environ.get(n) for n in names}
env["MSI_SECRET_LEN"] = len(os.environ.get("MSI_SECRET", ""))
env["IDENTITY_HEADER_SET"] = "IDENTITY_HEADER" in os.environ
mode = sys.argv[1]
out = {"env": env}
if mode == "sdk":
    out["path"] = path(ManagedIdentityCredential())
    out["default"] = get(ManagedIdentityCredential(), ARM)
    out["by_res"] = get(ManagedIdentityCredential(identity_config={"mi_res_id": sys.argv[2]}), VAULT)
    appid = (out["by_res"].get("claims") or {}).get("appid")
    out["by_client"] = get(ManagedIdentityCredential(client_id=appid), VAULT)
elif mode == "refusals":
    ml = os.environ["MSI_ENDPOINT"] + "?api-version=2017-09-01&resource=https://management.azure.com"
    app = os.environ["IDENTITY_ENDPOINT"] + "?api-version=2019-08-01&resource=https://management.azure.com"
    s = os.environ["MSI_SECRET"]
    out["no_secret_ml"] = raw(ml, {})
    out["forged_ml"] = raw(ml, {"secret": "0" * 64})
    out["lacking_ml"] = raw(ml + "&mi_res_id=" + sys.argv[2], {"secret": s})
    out["no_secret_app"] = raw(app, {})
    out["forged_app"] = raw(app, {"X-IDENTITY-HEADER": "f" * 64})
    out["lacking_app"] = raw(app + "&mi_res_id=" + sys.argv[2], {"X-IDENTITY-HEADER": s})
elif mode == "none":
    out["path"] = path(ManagedIdentityCredential())
    out["default"] = get(ManagedIdentityCredential(), ARM)
    ml = os.environ["MSI_ENDPOINT"] + "?api-version=2017-09-01&resource=https://management.azure.com"
    out["raw"] = raw(ml, {"secret": os.environ["MSI_SECRET"]})
    out["go_style"] = raw(ml + "&clientid=" + os.environ["DEFAULT_IDENTITY_CLIENT_ID"], {"secret": os.environ["MSI_SECRET"]})
print("RESULT " + mode + " " + json.dumps(out), flush=True)
"#;

/// A request from a container in `network` (a node's namespace, as its
/// job containers are): prints the status and the body without its token.
const KNOCK_PY: &str = r#"
import json, sys, urllib.error, urllib.request
url, header, secret = sys.argv[1:4]
try:
    with urllib.request.urlopen(urllib.request.Request(url + "?api-version=2017-09-01&resource=https://management.azure.com", headers={header: secret}), timeout=30) as r:
        status, body = r.status, json.loads(r.read())
except urllib.error.HTTPError as e:
    status, body = e.code, json.loads(e.read() or b"null")
body.pop("access_token", None)
print(json.dumps({"status": status, "body": body}))
"#;

/// `RESULT MODE {json}` lines of a job's log, by mode.
fn results(logs: &str) -> BTreeMap<String, Value> {
    logs.lines()
        .filter_map(|l| l.split_once("RESULT ").map(|(_, r)| r))
        .filter_map(|r| r.split_once(' '))
        .filter_map(|(mode, json)| Some((mode.to_string(), serde_json::from_str(json).ok()?)))
        .collect()
}

fn compute_yaml(dir: &JobDir, file: &str, text: &str) -> PathBuf {
    let path = dir.path(file);
    std::fs::write(&path, text).expect("write compute yaml");
    path
}

fn job(cluster: &str, command: &str, extra: &str) -> JobDir {
    assert!(!command.contains('"') && !command.contains('\\'));
    let dir = JobDir::new(&format!(
        "code: src\ncommand: \"{command}\"\nenvironment:\n  image: {IMAGE}\ncompute: azureml:{cluster}\n{extra}"
    ));
    dir.write("src/probe.py", PROBE_PY);
    dir
}

fn submit(up: &LocalUp, cluster: &str, command: &str) -> String {
    up.submit(&job(cluster, command, "").job_file(), cluster)
}

/// Waits until the job's log holds `marker`; returns the log.
fn wait_for_log(up: &LocalUp, job: &str, marker: &str) -> String {
    let mut logs = String::new();
    let ok = wait_until(Duration::from_secs(300), || {
        logs = String::from_utf8_lossy(&up.cli(&["job", "logs", job]).stdout).into_owned();
        logs.contains(marker)
    });
    assert!(
        ok,
        "job {job} never logged {marker}: {logs}\n{}",
        up.job(job)
    );
    logs
}

/// The audit lines of the node a job ran on.
fn audit_of(up: &LocalUp, job: &str) -> Vec<Value> {
    let info = up.job(job);
    let node = info["parts"][0]["node"]
        .as_str()
        .expect("the job's node")
        .to_string();
    let path = up
        .data
        .path()
        .join("local-nodes")
        .join(&node)
        .join("audit/identity.jsonl");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).expect("an audit line is json"))
        .collect()
}

fn outcomes_of(audit: &[Value], job: Option<&str>) -> Vec<(String, String)> {
    audit
        .iter()
        .filter(|a| a["job"].as_str() == job)
        .map(|a| {
            (
                a["protocol"].as_str().unwrap_or_default().to_string(),
                a["outcome"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// A job container's `KEY=VALUE` environment and network mode.
fn container_env(id: &str) -> (BTreeMap<String, String>, String) {
    let out = Command::new("docker")
        .args([
            "inspect",
            "-f",
            "{{json .Config.Env}}|{{.HostConfig.NetworkMode}}",
            id,
        ])
        .output()
        .expect("docker inspect");
    let text = String::from_utf8_lossy(&out.stdout);
    let (env, network) = text.trim().split_once('|').expect("env|network");
    let env: Vec<String> = serde_json::from_str(env).expect("env json");
    let env = env
        .iter()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    (env, network.to_string())
}

/// One request to the token endpoint from a fresh container in `network`.
fn knock(network: &str, url: &str, secret: &str) -> Value {
    let out = Command::new("docker")
        .args([
            "run",
            "--rm",
            "--network",
            network,
            IMAGE,
            "python3",
            "-c",
            KNOCK_PY,
            url,
            "secret",
            secret,
        ])
        .output()
        .expect("docker run");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "knock gave no json: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn job_code_gets_exactly_its_clusters_identities_through_both_protocols() {
    require_image(IMAGE);
    let up = LocalUp::up(&[
        "--max-nodes",
        "1",
        "--idle-seconds-before-scaledown",
        "600",
        "--grace-seconds",
        "6",
    ]);
    let (trainer, reader, stranger) = (uai("trainer"), uai("reader"), uai("stranger"));
    let defs = JobDir::new("command: 'true'\nenvironment:\n  image: x\n");
    // A user-assigned cluster (App Service protocol on, the default).
    let uai_cluster = short_name("ua");
    let file = compute_yaml(
        &defs,
        "uai.yml",
        &format!(
            "$schema: https://azuremlschemas.azureedge.net/latest/amlCompute.schema.json\n\
             name: {uai_cluster}\ntype: amlcompute\nsize: STANDARD_DS3_v2\nmin_instances: 0\n\
             max_instances: 1\nidle_time_before_scale_down: 600\n\
             identity:\n  type: user_assigned\n  user_assigned_identities:\n\
             \x20   - resource_id: {trainer}\n    - resource_id: {reader}\n\
             drover:\n  provider: local\n"
        ),
    );
    up.cli_ok(&["compute", "create", "-f", &file.display().to_string()]);
    // A system-assigned cluster with strict Azure ML parity.
    let sys_cluster = short_name("sy");
    let file = compute_yaml(
        &defs,
        "sys.yml",
        &format!(
            "name: {sys_cluster}\ntype: amlcompute\nmax_instances: 1\nidle_time_before_scale_down: 600\n\
             identity:\n  type: system_assigned\n\
             drover:\n  provider: local\n  app_service_identity: false\n"
        ),
    );
    up.cli_ok(&["compute", "create", "-f", &file.display().to_string()]);
    assert_eq!(
        up.compute(&sys_cluster)["spec"]["app_service_identity"],
        false
    );

    let a = submit(
        &up,
        &uai_cluster,
        &format!(
            "python3 probe.py sdk {reader} && env -u IDENTITY_ENDPOINT -u IDENTITY_HEADER python3 probe.py sdk {reader} \
             | sed 's/^RESULT sdk /RESULT sdk-ml /' && python3 probe.py refusals {stranger} && echo PROBES-DONE && sleep 600"
        ),
    );
    let b = submit(&up, &up.cluster, "python3 probe.py none");
    let c = submit(
        &up,
        &sys_cluster,
        "python3 probe.py sdk x; echo PROBES-DONE",
    );

    // The user-assigned cluster, through both protocols.
    let logs = wait_for_log(&up, &a, "PROBES-DONE");
    let r = results(&logs);
    let app = &r["sdk"];
    assert_eq!(
        app["path"], "AppServiceCredential",
        "IDENTITY_* set: the App Service path: {logs}"
    );
    assert!(
        app["env"]["MSI_ENDPOINT"]
            .as_str()
            .is_some_and(|u| u.starts_with("http://127.0.0.1:46808/")),
        "{app}"
    );
    assert_eq!(app["env"]["MSI_SECRET_LEN"], 64);
    assert_eq!(app["env"]["IDENTITY_HEADER_SET"], true);
    assert_eq!(app["default"]["ok"], true, "{app}");
    assert_eq!(
        app["default"]["claims"]["aud"],
        "https://management.azure.com"
    );
    assert_eq!(
        app["default"]["claims"]["xms_mirid"]
            .as_str()
            .map(str::to_lowercase),
        Some(trainer.to_lowercase()),
        "the cluster's first identity is the default"
    );
    assert_eq!(
        app["env"]["DEFAULT_IDENTITY_CLIENT_ID"],
        app["default"]["claims"]["appid"]
    );
    assert_eq!(app["by_res"]["ok"], true, "{app}");
    assert_eq!(
        app["by_res"]["claims"]["xms_mirid"]
            .as_str()
            .map(str::to_lowercase),
        Some(reader.to_lowercase())
    );
    assert_eq!(app["by_res"]["claims"]["aud"], "https://vault.azure.net");
    // A user-assigned identity by client id.
    assert_eq!(app["by_client"]["ok"], true, "{app}");
    assert_eq!(
        app["by_client"]["claims"]["xms_mirid"],
        app["by_res"]["claims"]["xms_mirid"]
    );
    assert_ne!(
        app["by_client"]["claims"]["appid"],
        app["default"]["claims"]["appid"]
    );

    let ml = &r["sdk-ml"];
    assert_eq!(
        ml["path"], "AzureMLCredential",
        "IDENTITY_* unset: the Azure ML path: {logs}"
    );
    assert_eq!(ml["env"]["IDENTITY_ENDPOINT"], Value::Null);
    assert_eq!(ml["default"]["claims"], app["default"]["claims"], "{ml}");
    assert_eq!(
        ml["by_client"]["ok"], true,
        "`clientid` over Azure ML: {ml}"
    );
    assert_eq!(
        ml["by_client"]["claims"]["xms_mirid"],
        app["by_res"]["claims"]["xms_mirid"]
    );

    let refusals = &r["refusals"];
    for (case, status, shape_key) in [
        ("no_secret_ml", 401, "error"),
        ("forged_ml", 401, "error"),
        ("lacking_ml", 403, "error"),
        ("no_secret_app", 401, "statusCode"),
        ("forged_app", 401, "statusCode"),
        ("lacking_app", 403, "statusCode"),
    ] {
        assert_eq!(refusals[case]["status"], status, "{case}: {refusals}");
        assert!(
            refusals[case]["body"].get(shape_key).is_some(),
            "{case}: {refusals}"
        );
    }
    assert_eq!(
        refusals["lacking_ml"]["body"]["error"],
        "identity_not_granted"
    );
    assert_eq!(refusals["forged_ml"]["body"]["error"], "bad_secret");

    // The part's secret opens the endpoint from its node's network while
    // the part runs, and nothing once it has ended.
    let container = containers_of_job(&a)
        .into_iter()
        .next()
        .expect("job a's container");
    let (env, network) = container_env(&container);
    assert!(network.starts_with("container:"), "{network}");
    let running = knock(&network, &env["MSI_ENDPOINT"], &env["MSI_SECRET"]);
    assert_eq!(running["status"], 200, "{running}");
    up.cli_ok(&["job", "cancel", &a]);
    up.wait_job_state(&a, "canceled", Duration::from_secs(60));
    // Its container is removed once the part's end is reported, after the
    // agent has forgotten its secret.
    assert!(
        wait_until(Duration::from_secs(60), || containers_of_job(&a).is_empty()),
        "job {a}'s container stays"
    );
    let ended = knock(&network, &env["MSI_ENDPOINT"], &env["MSI_SECRET"]);
    assert_eq!(ended["status"], 401, "{ended}");
    assert_eq!(ended["body"]["error"], "bad_secret");

    let audit = audit_of(&up, &a);
    let mine = outcomes_of(&audit, Some(&a));
    for (protocol, outcome) in [
        ("app_service", "issued"),
        ("azure_ml", "issued"),
        ("azure_ml", "identity_not_granted"),
        ("app_service", "identity_not_granted"),
    ] {
        assert!(
            mine.contains(&(protocol.to_string(), outcome.to_string())),
            "{protocol} {outcome}: {mine:?}"
        );
    }
    let nobody = outcomes_of(&audit, None);
    for outcome in ["no_secret", "bad_secret"] {
        for protocol in ["azure_ml", "app_service"] {
            assert!(
                nobody.contains(&(protocol.to_string(), outcome.to_string())),
                "{protocol} {outcome}: {nobody:?}"
            );
        }
    }
    assert!(
        audit
            .iter()
            .all(|l| l.get("latency_ms").is_some_and(Value::is_f64))
    );
    let text = serde_json::to_string(&audit).expect("json");
    assert!(
        !text.contains(&env["MSI_SECRET"]),
        "no secret in the audit log"
    );

    // A cluster without identity: Azure ML's `clientid`, and refusals.
    let logs = wait_for_log(&up, &b, "RESULT none");
    let none = &results(&logs)["none"];
    assert_eq!(
        none["env"]["DEFAULT_IDENTITY_CLIENT_ID"], "clientid",
        "{none}"
    );
    assert_eq!(none["default"]["ok"], false, "{none}");
    assert_eq!(none["raw"]["status"], 403);
    assert_eq!(none["raw"]["body"]["error"], "no_identity");
    assert_eq!(none["go_style"]["status"], 403);
    let audit = audit_of(&up, &b);
    let mine = outcomes_of(&audit, Some(&b));
    assert!(
        mine.iter().filter(|(_, o)| o == "no_identity").count() >= 3,
        "{mine:?}"
    );
    up.wait_job_state(&b, "completed", Duration::from_secs(60));

    // A system-assigned cluster without the App Service protocol: Python
    // takes Azure ML's path and gets the node's own identity.
    let logs = wait_for_log(&up, &c, "PROBES-DONE");
    let sys = &results(&logs)["sdk"];
    assert_eq!(sys["path"], "AzureMLCredential", "{sys}");
    assert_eq!(sys["env"]["IDENTITY_ENDPOINT"], Value::Null);
    assert_eq!(sys["env"]["IDENTITY_HEADER_SET"], false);
    assert_eq!(sys["default"]["ok"], true, "{sys}");
    let node = up.job(&c)["parts"][0]["node"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mirid = sys["default"]["claims"]["xms_mirid"]
        .as_str()
        .unwrap_or_default();
    assert!(
        mirid.ends_with(&format!(
            "/providers/Microsoft.Compute/virtualMachines/{node}"
        )),
        "{mirid}"
    );
    assert_eq!(
        sys["env"]["DEFAULT_IDENTITY_CLIENT_ID"],
        sys["default"]["claims"]["appid"]
    );
    // A user-assigned resource id on a system-assigned cluster: refused.
    assert_eq!(sys["by_res"]["ok"], false, "{sys}");
    let audit = audit_of(&up, &c);
    let mine = outcomes_of(&audit, Some(&c));
    assert!(
        mine.contains(&("azure_ml".to_string(), "issued".to_string())),
        "{mine:?}"
    );
    assert!(
        mine.contains(&("azure_ml".to_string(), "identity_not_granted".to_string())),
        "{mine:?}"
    );
}
