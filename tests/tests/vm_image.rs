//! The VM image of `images/vm/`, checked without Azure: the Packer template
//! validates (Debian's packer, whose azure-arm builder is built in, checks
//! the builder's settings, not only the syntax); the agent's unit passes
//! `systemd-analyze verify`; `provision.sh` run twice in a container from the
//! offline Debian base succeeds both times and leaves the same files; and
//! in that container the agent, started with the unit's `ExecStart` line
//! under the unit's capability bounding set, reads its join settings at
//! first boot — from IMDS user data, then from the file cloud-init writes
//! from `cloud-init.yaml` — joins a `drover server` under the VM's name and
//! runs a job that cannot reach IMDS.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use drover_tests::{
    BASE_IMAGE, ServerProc, agent_bin, imds_emulator_bin, init_bin, remove_job_containers,
    repo_root, require_docker, require_image, short_name, unique_name, wait_until,
};

fn vm_dir() -> PathBuf {
    repo_root().join("images/vm")
}

fn unit_text() -> String {
    std::fs::read_to_string(vm_dir().join("drover-agent.service")).expect("read the unit")
}

/// The values of `key=` in the unit's `[Service]` section, in order.
fn service_values(key: &str) -> Vec<String> {
    let mut in_service = false;
    let mut values = Vec::new();
    for line in unit_text().lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_service = line == "[Service]";
            continue;
        }
        if !in_service || line.starts_with('#') {
            continue;
        }
        if let Some((k, v)) = line.split_once('=')
            && k.trim() == key
        {
            values.push(v.trim().to_string());
        }
    }
    values
}

/// The unit's `ExecStart`, as words (the unit quotes nothing).
fn exec_start() -> Vec<String> {
    let lines = service_values("ExecStart");
    assert_eq!(lines.len(), 1, "one ExecStart: {lines:?}");
    assert!(
        !lines[0].contains(['"', '\'', '$', '%']),
        "ExecStart is plain words: {}",
        lines[0]
    );
    lines[0].split_whitespace().map(str::to_string).collect()
}

fn require_program(program: &str, install: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{program} is missing: install it with `{install}` (scripts/setup.sh does)"
    );
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_packer_template_validates_for_both_variants() {
    require_program("packer", "apt-get install packer");
    let agent = agent_bin();
    let init = init_bin();
    let template = vm_dir().join("drover-node.pkr.hcl");
    let validate = |template: &Path, variant: &str| {
        Command::new("packer")
            .current_dir(repo_root())
            .args(["validate", "-var", "resource_group=drover-images"])
            .arg("-var")
            .arg(format!("variant={variant}"))
            .arg("-var")
            .arg(format!("agent_binary={}", agent.display()))
            .arg("-var")
            .arg(format!("init_binary={}", init.display()))
            .arg(template)
            .env("CHECKPOINT_DISABLE", "1")
            .output()
            .expect("packer runs")
    };
    for variant in ["cpu", "gpu"] {
        let out = validate(&template, variant);
        assert!(
            out.status.success(),
            "packer validate ({variant}): {}",
            text(&out)
        );
    }
    let out = Command::new("packer")
        .args(["fmt", "-check"])
        .arg(&template)
        .output()
        .expect("packer runs");
    assert!(out.status.success(), "packer fmt -check: {}", text(&out));

    // The builder's own settings are checked, not only the syntax: a
    // misspelt azure-arm setting fails.
    let dir = tempfile::tempdir().expect("tempdir");
    let broken = dir.path().join("broken.pkr.hcl");
    let source = std::fs::read_to_string(&template).expect("read the template");
    assert!(source.contains("  vm_size         = local.vm_size"));
    std::fs::write(
        &broken,
        source.replace(
            "  vm_size         = local.vm_size",
            "  vm_sizes = local.vm_size",
        ),
    )
    .expect("write");
    let out = validate(&broken, "cpu");
    assert!(!out.status.success(), "a misspelt setting passed");
    assert!(text(&out).contains("vm_sizes"), "{}", text(&out));
}

/// The agent's binary is built on Debian bookworm; the image is Ubuntu
/// 22.04, whose glibc is 2.35: the binary must ask for no newer symbol.
#[test]
fn the_agent_binary_needs_no_glibc_newer_than_ubuntu_22_04s() {
    let bytes = std::fs::read(agent_bin()).expect("read drover-agent");
    let needle = b"GLIBC_2.";
    let newest = bytes
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .filter_map(|(i, _)| {
            let digits: String = bytes[i + needle.len()..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .map(|b| *b as char)
                .collect();
            digits.parse::<u32>().ok()
        })
        .max()
        .expect("drover-agent links glibc");
    assert!(
        newest <= 35,
        "drover-agent needs GLIBC_2.{newest}; Ubuntu 22.04 has 2.35: build it on an older system"
    );
}

#[test]
fn the_unit_verifies_and_says_what_the_agent_needs() {
    require_program("systemd-analyze", "apt-get install systemd");
    // Its promises, by name.
    assert_eq!(service_values("Restart"), ["on-failure"]);
    let unit = unit_text();
    assert!(
        unit.lines()
            .any(|l| l.starts_with("After=") && l.contains("docker.service")),
        "{unit}"
    );
    for (key, value) in [
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("NoNewPrivileges", "yes"),
        ("StateDirectory", "drover-agent"),
    ] {
        assert_eq!(service_values(key), [value], "{key}");
    }
    let caps = service_values("CapabilityBoundingSet").join(" ");
    for cap in ["CAP_NET_ADMIN", "CAP_NET_RAW"] {
        assert!(caps.contains(cap), "the firewall needs {cap}: {caps}");
    }
    assert!(
        service_values("PrivateDevices").is_empty(),
        "NVML opens /dev/nvidia*"
    );
    assert!(!service_values("MemoryMax").is_empty());

    // A root holding what the unit names: systemd's own units (targets),
    // Docker's, the agent binary and the unit itself.
    let root = tempfile::tempdir().expect("tempdir");
    let r = root.path();
    let systemd_units = Path::new("/lib/systemd/system");
    let docker_unit = systemd_units.join("docker.service");
    assert!(
        docker_unit.exists(),
        "{} is missing: install Docker's package with `apt-get install docker.io`",
        docker_unit.display()
    );
    let copy = |from: &Path, to: &str| {
        let to = r.join(to.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
        let out = Command::new("cp")
            .arg("-a")
            .arg(from)
            .arg(&to)
            .output()
            .expect("cp");
        assert!(
            out.status.success(),
            "cp {}: {}",
            from.display(),
            text(&out)
        );
    };
    copy(Path::new("/lib/systemd/system/."), "/lib/systemd/system/");
    copy(&agent_bin(), &exec_start()[0]);
    copy(Path::new("/usr/bin/touch"), "/usr/bin/touch");
    copy(
        &vm_dir().join("drover-agent.service"),
        "/etc/systemd/system/drover-agent.service",
    );
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", r.display()))
        .arg("/etc/systemd/system/drover-agent.service")
        .output()
        .expect("systemd-analyze runs");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        text(&out)
    );
    // Its exposure, as systemd scores it (0 best, 10 worst).
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=40", "--no-pager"])
        .arg(format!("--root={}", r.display()))
        .arg("/etc/systemd/system/drover-agent.service")
        .output()
        .expect("systemd-analyze runs");
    let said = text(&out);
    assert!(out.status.success(), "systemd-analyze security: {said}");
    let score = said
        .split("Overall exposure level for drover-agent.service: ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no exposure level: {said}"));
    eprintln!("systemd-analyze security: exposure {score}");
    assert!(score <= 4.0, "exposure {score}: {said}");
}

/// A container standing for the VM, removed when dropped with the job
/// containers its agents started (labelled with their node, `drover.owner`).
struct Vm {
    name: String,
    nodes: std::cell::RefCell<Vec<String>>,
}

impl Vm {
    fn exec(&self, env: &[(&str, String)], args: &[&str]) -> Output {
        let mut cmd = Command::new("docker");
        cmd.arg("exec");
        for (k, v) in env {
            cmd.arg("-e").arg(format!("{k}={v}"));
        }
        cmd.arg(&self.name)
            .args(args)
            .output()
            .expect("docker exec")
    }

    fn sh(&self, script: &str) -> Output {
        self.exec(&[], &["bash", "-c", script])
    }

    fn sh_ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(out.status.success(), "{script}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts `script` in the background; its pid goes to `pid_file`.
    fn spawn(&self, env: &[(&str, String)], pid_file: &Path, script: &str) {
        let mut cmd = Command::new("docker");
        cmd.args(["exec", "-d"]);
        for (k, v) in env {
            cmd.arg("-e").arg(format!("{k}={v}"));
        }
        let out = cmd
            .arg(&self.name)
            .args([
                "bash",
                "-c",
                &format!("echo $$ > {}; {script}", pid_file.display()),
            ])
            .output()
            .expect("docker exec -d");
        assert!(out.status.success(), "{script}: {}", text(&out));
    }

    /// SIGTERM to the process whose pid is in `pid_file`; waits until it is gone.
    fn stop(&self, pid_file: &Path) {
        let pid = std::fs::read_to_string(pid_file).expect("pid file");
        let pid = pid.trim();
        self.sh(&format!("kill -TERM {pid}"));
        assert!(
            wait_until(Duration::from_secs(60), || !self
                .sh(&format!("kill -0 {pid} 2>/dev/null"))
                .status
                .success()),
            "process {pid} did not end"
        );
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        for node in self.nodes.borrow().iter() {
            let ids = drover_tests::containers_labelled("drover.owner", node);
            if !ids.is_empty() {
                let _ = Command::new("docker")
                    .args(["rm", "-f"])
                    .args(&ids)
                    .output();
            }
        }
        let _ = Command::new("docker")
            .args(["rm", "-f", "-v", &self.name])
            .output();
    }
}

/// What provisioning leaves, as lines to compare between runs.
const EXPECTED: &[(&str, &str)] = &[
    ("/usr/local/bin/drover-agent", "755 root:root regular file"),
    (
        "/usr/local/lib/drover/drover-init",
        "755 root:root regular file",
    ),
    (
        "/etc/systemd/system/drover-agent.service",
        "644 root:root regular file",
    ),
    (
        "/etc/systemd/system/multi-user.target.wants/drover-agent.service",
        "777 root:root symbolic link",
    ),
    ("/etc/drover", "755 root:root directory"),
    ("/etc/drover/agent.toml", "644 root:root regular file"),
    ("/etc/drover/docker", "700 root:root directory"),
    ("/var/lib/drover-agent", "700 root:root directory"),
    ("/etc/docker/daemon.json", "644 root:root regular file"),
    (
        "/etc/logrotate.d/drover-agent",
        "644 root:root regular file",
    ),
    (
        "/etc/systemd/journald.conf.d/drover.conf",
        "644 root:root regular file",
    ),
];

fn snapshot(vm: &Vm) -> String {
    let paths: Vec<&str> = EXPECTED.iter().map(|(p, _)| *p).collect();
    vm.sh_ok(&format!(
        "stat -c '%n %a %U:%G %F' {0}; find {0} -maxdepth 0 -type f -exec sha256sum {{}} +; \
         readlink /etc/systemd/system/multi-user.target.wants/drover-agent.service; \
         ls -A /etc/drover",
        paths.join(" ")
    ))
}

/// The address `container` reaches this host at: its network's gateway.
fn gateway_of(container: &str) -> String {
    let out = Command::new("docker")
        .args(["inspect", "-f", "{{.NetworkSettings.Gateway}}", container])
        .output()
        .expect("docker inspect");
    let ip = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success() && !ip.is_empty(),
        "container {container} has no gateway: {}",
        text(&out)
    );
    ip
}

fn node<'a>(nodes: &'a serde_json::Value, id: &str) -> Option<&'a serde_json::Value> {
    nodes["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["id"] == id)
}

#[test]
fn provisioned_twice_in_a_container_the_agent_joins_as_its_unit_says_and_runs_a_job() {
    require_docker();
    require_image(BASE_IMAGE);
    let agent = agent_bin();
    let init = init_bin();
    let emulator = imds_emulator_bin();
    // Host paths the shared engine binds into job containers are bound at
    // the same paths into the VM's container, as on a local cluster's node.
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    let vm = Vm {
        name: unique_name("drover-vmimg"),
        nodes: Default::default(),
    };
    let vol = |from: &Path, to: &str, mode: &str| format!("{}:{to}{mode}", from.display());
    let out = Command::new("docker")
        .args([
            "run",
            "-d",
            "--name",
            &vm.name,
            "--label",
            "drover-test=vm-image",
        ])
        // The firewall and the IMDS address on the VM's own network.
        .args(["--cap-add", "NET_ADMIN", "--cap-add", "NET_RAW"])
        .args(["--cap-add", "DAC_READ_SEARCH"])
        .args(["-v", "/var/run/docker.sock:/var/run/docker.sock"])
        .args(["-v", &vol(&vm_dir(), "/src/vm", ":ro")])
        .args(["-v", &vol(&agent, "/src/bin/drover-agent", ":ro")])
        .args(["-v", &vol(&init, "/src/bin/drover-init", ":ro")])
        .args([
            "-v",
            &vol(&emulator, "/src/test/drover-imds-emulator", ":ro"),
        ])
        .args(["-v", &vol(&init, &init.display().to_string(), ":ro")])
        .args(["-v", &vol(w, &w.display().to_string(), "")])
        .args([BASE_IMAGE, "sleep", "infinity"])
        .output()
        .expect("docker run");
    assert!(out.status.success(), "docker run: {}", text(&out));

    // Provisioned twice: both succeed, the second changes nothing.
    let provision = || {
        vm.exec(
            &[("DROVER_BIN_DIR", "/src/bin".to_string())],
            &["bash", "/src/vm/provision.sh"],
        )
    };
    let first = provision();
    assert!(first.status.success(), "provision.sh: {}", text(&first));
    let after_first = snapshot(&vm);
    let second = provision();
    assert!(
        second.status.success(),
        "provision.sh again: {}",
        text(&second)
    );
    assert!(
        !text(&second).contains("installing"),
        "the second run installed again: {}",
        text(&second)
    );
    assert_eq!(snapshot(&vm), after_first, "the second run changed files");
    for (path, what) in EXPECTED {
        assert!(
            after_first.contains(&format!("{path} {what}\n")),
            "{path}: expected {what}: {after_first}"
        );
    }
    // The files are the repository's; nothing secret is baked: /etc/drover
    // holds the config and the empty registry-login folder only.
    for (installed, source) in [
        (
            "/etc/systemd/system/drover-agent.service",
            "drover-agent.service",
        ),
        ("/etc/drover/agent.toml", "agent.toml"),
        ("/etc/docker/daemon.json", "docker-daemon.json"),
        ("/etc/logrotate.d/drover-agent", "logrotate-drover-agent"),
    ] {
        vm.sh_ok(&format!("cmp {installed} /src/vm/{source}"));
    }
    vm.sh_ok("cmp /usr/local/bin/drover-agent /src/bin/drover-agent");
    vm.sh_ok("cmp /usr/local/lib/drover/drover-init /src/bin/drover-init");
    assert!(
        after_first.ends_with("agent.toml\ndocker\n"),
        "{after_first}"
    );
    assert_eq!(
        vm.sh_ok("ls -A /etc/drover/docker /var/lib/drover-agent"),
        "/etc/drover/docker:\n\n/var/lib/drover-agent:\n"
    );
    vm.sh_ok("docker --version && iptables --version");
    vm.sh_ok("logrotate -d /etc/logrotate.d/drover-agent 2>&1 | grep -q 'rotating pattern: /var/lib/drover-agent/audit/'");

    // cloud-init (what Ubuntu's image runs at first boot) accepts the
    // custom data.
    let out = vm.sh(
        "apt-get install -y -q --no-install-recommends cloud-init iproute2 >/tmp/apt.log 2>&1 || { cat /tmp/apt.log; exit 1; }; \
         cloud-init schema --config-file /src/vm/cloud-init.yaml",
    );
    assert!(out.status.success(), "cloud-init schema: {}", text(&out));

    // A control plane the VM reaches, and a cluster to join.
    let gateway = gateway_of(&vm.name);
    let server = ServerProc::start_on(120, &gateway);
    let cluster = short_name("vmi");
    let token = server.create_cluster(&cluster, 2);

    // The VM's IMDS at its real address, on the VM's own network.
    vm.sh_ok("ip addr add 169.254.169.254/32 dev lo");
    let start_imds = |vm_name: &str, user_data: Option<&Path>, starts: usize| {
        let user_data = user_data
            .map(|p| format!("--user-data {}", p.display()))
            .unwrap_or_default();
        vm.spawn(
            &[],
            &w.join("imds.pid"),
            &format!(
                "exec /src/test/drover-imds-emulator --listen 169.254.169.254:80 --vm {vm_name} \
                 {user_data} --no-rate-limit >> {} 2>&1",
                w.join("imds.log").display()
            ),
        );
        // Its log, not a connection: once an agent has run, the firewall
        // it leaves in place refuses every unmarked connection to IMDS.
        let listening = || {
            std::fs::read_to_string(w.join("imds.log"))
                .unwrap_or_default()
                .matches("imds emulator listening")
                .count()
        };
        assert!(
            wait_until(Duration::from_secs(20), || listening() == starts),
            "the emulator did not listen: {}",
            std::fs::read_to_string(w.join("imds.log")).unwrap_or_default()
        );
    };

    // The agent exactly as the unit starts it: its ExecStart, its
    // Environment=, its capability bounding set and no new privileges.
    // Beside them only what a shared engine needs: the data dir and
    // drover-init at host paths, the VM's network for parts, and the token
    // endpoint on that network's loopback.
    let caps: Vec<String> = service_values("CapabilityBoundingSet")
        .join(" ")
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let start_agent = |data: &str| {
        let data_dir = w.join(data);
        let mut env: Vec<(&str, String)> = vec![
            ("DROVER_AGENT_DATA_DIR", data_dir.display().to_string()),
            ("DROVER_INIT", init.display().to_string()),
            ("DROVER_NODE_NETWORK", format!("container:{}", vm.name)),
            ("DROVER_JOB_NETWORK", format!("container:{}", vm.name)),
            ("DROVER_IDENTITY_LISTEN", "127.0.0.1:46808".to_string()),
        ];
        let unit_env: Vec<(String, String)> = service_values("Environment")
            .iter()
            .map(|e| {
                let (k, v) = e.split_once('=').expect("KEY=VALUE");
                (k.to_string(), v.to_string())
            })
            .collect();
        for (k, v) in &unit_env {
            env.push((k.as_str(), v.clone()));
        }
        let log = w.join(format!("{data}.log"));
        vm.spawn(
            &env,
            &w.join(format!("{data}.pid")),
            &format!(
                "exec >> {} 2>&1; exec setpriv --bounding-set -all,{} --inh-caps -all --no-new-privs -- {}",
                log.display(),
                caps.join(","),
                exec_start().join(" ")
            ),
        );
        log
    };
    let wait_idle = |id: &str, log: &Path| {
        let ok = wait_until(Duration::from_secs(90), || {
            let nodes: serde_json::Value =
                serde_json::from_str(&server.cli_ok(&["node", "list", "--json"]))
                    .expect("node json");
            node(&nodes, id).is_some_and(|n| n["state"] == "idle")
        });
        assert!(
            ok,
            "node {id} never joined: {}\nagent: {}\nimds: {}",
            server.cli_ok(&["node", "list", "--json"]),
            std::fs::read_to_string(log).unwrap_or_default(),
            std::fs::read_to_string(w.join("imds.log")).unwrap_or_default()
        );
    };

    // First boot with the join settings in IMDS user data.
    let vm_a = unique_name("vm-a");
    let user_data = w.join("user-data.toml");
    std::fs::write(
        &user_data,
        format!(
            "server = \"{}\"\ncluster = \"{cluster}\"\njoin_token = \"{token}\"\n",
            server.url()
        ),
    )
    .expect("write user data");
    vm.nodes.borrow_mut().push(vm_a.clone());
    start_imds(&vm_a, Some(&user_data), 1);
    let log_a = start_agent("node-a");
    wait_idle(&vm_a, &log_a);
    let agent_log = std::fs::read_to_string(&log_a).unwrap_or_default();
    assert!(
        agent_log.contains("join settings read from imds user data"),
        "{agent_log}"
    );
    assert!(!agent_log.contains(&token), "the join token was logged");
    assert!(agent_log.contains("imds firewall in place"), "{agent_log}");
    let rules = vm.sh_ok("iptables -w -S DROVER-IMDS");
    assert!(rules.contains("--mark 0xd50"), "{rules}");

    let job = unique_name("vmimg");
    let jobs = tempfile::tempdir().expect("tempdir");
    let job_file = jobs.path().join("job.yml");
    std::fs::write(
        &job_file,
        format!(
            "command: >-\n  bash -c 'echo hello from the image;\n  if (exec 3<>/dev/tcp/169.254.169.254/80) 2>/dev/null;\n  then echo imds reached; else echo imds refused; fi'\nenvironment:\n  image: {BASE_IMAGE}\n"
        ),
    )
    .expect("write job");
    server.cli_ok(&[
        "job",
        "create",
        "-f",
        &job_file.display().to_string(),
        "--compute",
        &cluster,
        "--name",
        &job,
    ]);
    let finished = wait_until(Duration::from_secs(120), || {
        matches!(
            server.job_state(&job).as_str(),
            "completed" | "failed" | "canceled"
        )
    });
    let logs = server.cli_ok(&["job", "logs", &job]);
    assert!(
        finished && server.job_state(&job) == "completed",
        "job {job}: {}\n{logs}\nagent: {}",
        server.job(&job),
        std::fs::read_to_string(&log_a).unwrap_or_default()
    );
    assert!(logs.contains("hello from the image"), "{logs}");
    assert!(logs.contains("imds refused"), "a job reached IMDS: {logs}");
    vm.stop(&w.join("node-a.pid"));
    remove_job_containers(&job);

    // Another VM of the image: custom data, applied by cloud-init's own
    // write_files, no user data.
    vm.stop(&w.join("imds.pid"));
    let vm_b = unique_name("vm-b");
    vm.nodes.borrow_mut().push(vm_b.clone());
    start_imds(&vm_b, None, 2);
    let custom_data = w.join("custom-data.yaml");
    let template =
        std::fs::read_to_string(vm_dir().join("cloud-init.yaml")).expect("read cloud-init.yaml");
    std::fs::write(
        &custom_data,
        template
            .replace("@SERVER@", &server.url())
            .replace("@CLUSTER@", &cluster)
            .replace("@JOIN_TOKEN@", &token),
    )
    .expect("write custom data");
    let out = vm.sh(&format!(
        "cloud-init --file {} single --name write_files --frequency always",
        custom_data.display()
    ));
    assert!(
        out.status.success(),
        "cloud-init write_files: {}",
        text(&out)
    );
    assert_eq!(
        vm.sh_ok("stat -c '%a %U' /etc/drover/join.toml"),
        "600 root\n"
    );
    let log_b = start_agent("node-b");
    wait_idle(&vm_b, &log_b);
    let agent_log = std::fs::read_to_string(&log_b).unwrap_or_default();
    assert!(
        agent_log.contains("join settings read from the join file"),
        "{agent_log}"
    );
    assert!(!agent_log.contains("imds user data"), "{agent_log}");
    vm.stop(&w.join("node-b.pid"));
}
