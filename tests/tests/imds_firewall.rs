//! The IMDS firewall on a local cluster's nodes: a job container, which
//! shares its node's network namespace, cannot reach the node's IMDS (the
//! emulator) itself, while the agent's own marked requests still do; a rule
//! removed by hand is put back within seconds.

use std::process::Command;
use std::time::{Duration, Instant};

use drover_tests::{JobDir, LocalUp, wait_until};

const PROBE_PY: &str = r#"import os, sys, time, urllib.request
port, probes = sys.argv[1], int(sys.argv[2])
gateway = os.environ["MASTER_ADDR"].rsplit(".", 1)[0] + ".1"
url = f"http://{gateway}:{port}/metadata/instance?api-version=2021-02-01"
for i in range(probes):
    try:
        r = urllib.request.urlopen(urllib.request.Request(url, headers={"Metadata": "true"}), timeout=2)
        print("probe", i, "imds answered", r.status, flush=True)
    except Exception as e:
        print("probe", i, "imds refused", type(e).__name__, e, flush=True)
    time.sleep(1)
"#;

/// A job that asks the node's IMDS (the emulator, at the gateway of the
/// node's network) for its instance metadata `probes` times, a second
/// apart, and prints what happened.
fn prober(up: &LocalUp, probes: u32) -> JobDir {
    let dir = JobDir::new(&format!(
        "code: src\ncommand: python3 probe.py {} {probes}\nenvironment:\n  image: drover/openmpi:bookworm\n",
        up.imds_port
    ));
    dir.write("src/probe.py", PROBE_PY);
    dir
}

fn node_of(up: &LocalUp, job: &str) -> String {
    up.job(job)["parts"][0]["node"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn iptables(node: &str, args: &[&str]) -> std::process::Output {
    Command::new("docker")
        .args(["exec", node, "iptables", "-w"])
        .args(args)
        .output()
        .expect("docker exec iptables")
}

#[test]
fn job_containers_cannot_reach_imds_and_a_removed_rule_comes_back() {
    let up = LocalUp::up(&["--max-nodes", "1"]);
    let job = prober(&up, 3);
    let id = up.submit(&job.job_file(), &up.cluster);
    up.wait_job_state(&id, "completed", Duration::from_secs(120));
    let logs = up.cli_ok(&["job", "logs", &id]);
    assert_eq!(
        logs.matches("imds refused").count(),
        3,
        "a job container reached IMDS: {logs}"
    );
    assert!(!logs.contains("imds answered"), "{logs}");
    // The agent's own requests pass: the node registered with its VM from
    // the emulator's instance metadata.
    let node = node_of(&up, &id);
    let nodes = up.nodes(&up.cluster);
    let me = nodes
        .iter()
        .find(|n| n["id"] == node.as_str())
        .expect("the node is listed");
    assert_eq!(me["vm"]["name"], node.as_str(), "{me}");

    // The rule taken out by hand: back within seconds, and the job refused again.
    let rules = String::from_utf8_lossy(&iptables(&node, &["-S", "OUTPUT"]).stdout).into_owned();
    let jump = rules
        .lines()
        .find(|l| l.contains("DROVER-IMDS"))
        .unwrap_or_else(|| panic!("no jump to DROVER-IMDS in OUTPUT: {rules}"))
        .replacen("-A OUTPUT", "", 1);
    let jump: Vec<&str> = jump.split_whitespace().collect();
    let mut delete = vec!["-D", "OUTPUT"];
    delete.extend(jump.iter().copied());
    let out = iptables(&node, &delete);
    assert!(out.status.success(), "{out:?}");
    let removed = Instant::now();
    let mut check = vec!["-C", "OUTPUT"];
    check.extend(jump.iter().copied());
    assert!(
        wait_until(Duration::from_secs(10), || iptables(&node, &check)
            .status
            .success()),
        "the rule was not put back"
    );
    eprintln!(
        "rule put back after {:.1} s",
        removed.elapsed().as_secs_f64()
    );
    let again = up.submit(&prober(&up, 1).job_file(), &up.cluster);
    up.wait_job_state(&again, "completed", Duration::from_secs(60));
    let logs = up.cli_ok(&["job", "logs", &again]);
    assert!(logs.contains("imds refused"), "{logs}");
    let metrics = Command::new("docker")
        .args(["logs", &node])
        .output()
        .expect("docker logs");
    assert!(
        String::from_utf8_lossy(&metrics.stderr)
            .contains("imds firewall rules were missing; put back"),
        "the repair is logged"
    );
}
