//! Distributed jobs: how long Open MPI takes to start 6 ranks on 3 nodes
//! through `drover-init rsh` and `launch-listen` against `mpirun` over
//! `ssh` in the same containers, and the bandwidth of a 100 MB Gloo
//! `all_reduce` in a Drover job against the same containers on one plain
//! Docker bridge.
//!
//! ```text
//! cargo run --release -p drover-tests --bin bench-distributed -- [--runs 5] [--iters 10]
//! ```
//!
//! MPI launch. Three containers of `drover/bench-sshd:bookworm` (built once
//! from `images/bench/sshd`: `drover/openmpi:bookworm` plus openssh-server)
//! on a Docker network of the benchmark's own, each running sshd (root login
//! by a key generated for this run) and, as PID 1, the release static
//! `drover-init launch-listen` under a launch secret generated for this run,
//! as node ranks 0–2 of one job. From container 0, `docker exec` runs
//! `mpirun --hostfile H -np 6` of a shell that prints its rank, host name
//! and `date +%s.%N`, with `plm_rsh_agent` set to (a) `ssh` (non-interactive
//! options) and (b) `/drover/bin/drover-init rsh`; both with the Open MPI
//! settings Drover uses (no tree spawn, no vader single copy). The clock is
//! the containers' `date +%s.%N` (one host clock): from just before mpirun
//! starts to the last rank's line, and to mpirun's exit. (a) and (b)
//! alternate ABBA after one warm-up of each; every run must show 6 distinct
//! ranks on 3 distinct hosts.
//!
//! For information, the same hello as a Drover job (3 nodes × 2, `type:
//! mpi`) on a release `drover up` cluster: from the job's `started_at` (all
//! parts running) to the last rank's line.
//!
//! Gloo. A PyTorch script (`init_process_group("gloo")`, `env://`) does one
//! warm-up and then `--iters` `all_reduce`s of a 25 M-element float32 tensor
//! (100 MB) and prints, from rank 0, the tensor's bytes over the median time
//! of one `all_reduce`. (a) A Drover job, 3 nodes × 1 process, `type:
//! pytorch`, on the same cluster; (b) three containers of
//! `drover/pytorch:bookworm` on one user-defined bridge, `MASTER_ADDR` =
//! container 0's address, each rank started with `docker exec`. Alternated
//! ABBA after one warm-up of each. Ratios: of the medians, and the median
//! of the ratios of each run's two sides (paired, side by side in time).
//!
//! Every container and network the benchmark makes carries the label
//! `drover.bench=<id>` and is removed at the end, after a panic, and after
//! Ctrl-C or SIGTERM (the signal ends the child at hand; the benchmark then
//! fails and cleans up); the cluster is `drover down`ed likewise.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use drover_tests::{
    JobDir, LocalUp, containers_labelled, image_exists, init_bin_release, key_values, median,
    networks_labelled, repo_root, require_docker, require_image, short_name, wait_until,
};

const MPI_IMAGE: &str = "drover/openmpi:bookworm";
const TORCH_IMAGE: &str = "drover/pytorch:bookworm";
const SSHD_IMAGE: &str = "drover/bench-sshd:bookworm";
const LABEL: &str = "drover.bench";
const NODES: usize = 3;
const PER_NODE: usize = 2;
/// Where the run's folder (keys, launch secret, hostfile, script) is mounted.
const MNT: &str = "/bench";
const INIT: &str = "/drover/bin/drover-init";
const MASTER_PORT: &str = "29500";

/// What every MPI rank prints.
const HELLO: &str = "echo hello rank=$OMPI_COMM_WORLD_RANK host=$(hostname) t=$(date +%s.%N)";
/// ssh without questions: no host key prompt, no known_hosts, no password.
const SSH_OPTIONS: &str = "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
                           -o BatchMode=yes -o LogLevel=ERROR -o ConnectTimeout=10";

const ALLREDUCE_PY: &str = r#"import os, sys, time, torch, torch.distributed as dist
dist.init_process_group("gloo")
iters = int(sys.argv[1])
t = torch.ones(25_000_000, dtype=torch.float32)
nbytes = t.numel() * t.element_size()
dist.all_reduce(t)
dist.barrier()
times = []
for _ in range(iters):
    start = time.perf_counter()
    dist.all_reduce(t)
    times.append(time.perf_counter() - start)
times.sort()
mid = times[len(times) // 2]
if dist.get_rank() == 0:
    print(f"allreduce world={dist.get_world_size()} bytes={nbytes} iters={iters} "
          f"median_s={mid:.6f} min_s={times[0]:.6f} max_s={times[-1]:.6f} bw={nbytes / mid:.0f}", flush=True)
dist.destroy_process_group()
"#;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT and SIGTERM set a flag instead of ending the process, so that
/// what the benchmark made is removed; the child at hand still gets the
/// signal (a handler, unlike `SIG_IGN`, is reset by `exec`).
fn catch_interrupts() {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(sig, handler as libc::sighandler_t) };
    }
}

fn check_interrupted() {
    assert!(
        !INTERRUPTED.load(Ordering::SeqCst),
        "interrupted; removing the benchmark's containers and networks"
    );
}

fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("docker runs")
}

/// Runs `docker ARGS`, asserts success and returns stdout, trimmed.
fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Builds the benchmark's sshd image unless it exists.
fn sshd_image() {
    if image_exists(SSHD_IMAGE) {
        return;
    }
    eprintln!("building {SSHD_IMAGE} from images/bench/sshd");
    let status = Command::new("docker")
        .args(["build", "--network", "host", "--build-arg"])
        .arg(format!("BASE={MPI_IMAGE}"))
        .args(["-t", SSHD_IMAGE])
        .arg(repo_root().join("images/bench/sshd"))
        .stdout(Stdio::null())
        .status()
        .expect("docker build runs");
    assert!(status.success(), "docker build {SSHD_IMAGE} failed");
}

/// The Docker objects of one benchmark run, labelled `drover.bench=<id>`:
/// one bridge network and the containers on it. Removed when dropped.
struct Scratch {
    id: String,
}

impl Scratch {
    fn new() -> Scratch {
        let s = Scratch {
            id: short_name("bench-"),
        };
        docker_ok(&["network", "create", "--label", &s.label(), &s.id]);
        s
    }

    fn label(&self) -> String {
        format!("{LABEL}={}", self.id)
    }

    /// `docker run` of a labelled container on the network: `opts` go
    /// before the image, `cmd` after it. Returns the container's name.
    fn run(&self, name: &str, detach: bool, opts: &[&str], image: &str, cmd: &[&str]) -> String {
        let name = format!("{}-{name}", self.id);
        let label = self.label();
        let mut args = vec!["run", "--name", &name, "--label", &label];
        args.extend(["--network", &self.id]);
        args.push(if detach { "-d" } else { "--rm" });
        args.extend_from_slice(opts);
        args.push(image);
        args.extend_from_slice(cmd);
        docker_ok(&args);
        name
    }

    fn remove(&self, containers: &[String]) {
        if !containers.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(containers.iter().map(String::as_str));
            docker_ok(&args);
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let ours = containers_labelled(LABEL, &self.id);
        if !ours.is_empty() {
            let _ = Command::new("docker")
                .args(["rm", "-f"])
                .args(&ours)
                .output();
        }
        for net in networks_labelled(LABEL, &self.id) {
            let _ = Command::new("docker")
                .args(["network", "rm", &net])
                .output();
        }
    }
}

/// The container's address on the benchmark's network.
fn ip_of(container: &str) -> String {
    docker_ok(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        container,
    ])
}

/// 32 random bytes as hex, the form a launch secret file holds.
fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("read /dev/urandom");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Seconds since the epoch printed after `marker ` at the start of a line.
fn printed_time(text: &str, marker: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(marker)?.strip_prefix(' '))
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

/// The time of the last rank's line, after checking that every rank of
/// `NODES × PER_NODE` printed once and that they ran on `NODES` hosts.
fn last_rank_line(text: &str, what: &str) -> f64 {
    let ranks = key_values(text, "hello rank=");
    let seen: BTreeSet<&str> = ranks.iter().map(|r| r["rank"].as_str()).collect();
    let want: BTreeSet<String> = (0..NODES * PER_NODE).map(|r| r.to_string()).collect();
    let hosts: BTreeSet<&str> = ranks.iter().map(|r| r["host"].as_str()).collect();
    assert!(
        ranks.len() == NODES * PER_NODE
            && seen == want.iter().map(String::as_str).collect()
            && hosts.len() == NODES,
        "{what}: expected ranks 0–{} once each on {NODES} distinct hosts, got {} lines, ranks {seen:?}, hosts {hosts:?}:\n{text}",
        NODES * PER_NODE - 1,
        ranks.len(),
    );
    ranks
        .iter()
        .filter_map(|r| r["t"].parse::<f64>().ok())
        .fold(f64::NEG_INFINITY, f64::max)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Agent {
    Ssh,
    Drover,
}

/// One hello through `agent`: seconds from just before mpirun to the last
/// rank's line, and to mpirun's exit.
fn mpi_hello(node0: &str, host_list: &str, agent: Agent) -> (f64, f64) {
    check_interrupted();
    let agent_args = match agent {
        Agent::Ssh => format!("-mca plm_rsh_agent ssh -mca plm_rsh_args '{SSH_OPTIONS}'"),
        Agent::Drover => format!("-mca plm_rsh_agent '{INIT} rsh'"),
    };
    let script = format!(
        "echo start $(date +%s.%N); \
         timeout 120 mpirun --hostfile {MNT}/hostfile -np {np} {agent_args} sh -c '{HELLO}'; \
         rc=$?; echo end $(date +%s.%N); exit $rc",
        np = NODES * PER_NODE
    );
    let out = docker(&[
        "exec",
        "-e",
        &format!("AZ_BATCH_HOST_LIST={host_list}"),
        node0,
        "sh",
        "-c",
        &script,
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "mpirun over {agent:?} failed ({}): {text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let start = printed_time(&text, "start");
    let last = last_rank_line(&text, &format!("mpirun over {agent:?}"));
    let end = printed_time(&text, "end");
    (last - start, end - start)
}

/// Starts the three MPI node containers; returns their names and addresses.
fn mpi_nodes(scratch: &Scratch, dir: &Path, init: &Path) -> Vec<(String, String)> {
    // SAFETY: getuid and getgid cannot fail and touch no memory.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mount = format!("{}:{MNT}", dir.display());
    // Keys for this run only: root's key pair (its public half authorised
    // everywhere) and the host key every sshd uses.
    scratch.run(
        "keygen",
        false,
        &["-v", &mount],
        SSHD_IMAGE,
        &[
            "sh",
            "-c",
            &format!(
                "ssh-keygen -q -t ed25519 -N '' -C bench -f {MNT}/id_ed25519 \
                 && ssh-keygen -q -t ed25519 -N '' -C bench-host -f {MNT}/host_ed25519 \
                 && cp {MNT}/id_ed25519.pub {MNT}/authorized_keys \
                 && chown {uid}:{gid} {MNT}/id_ed25519 {MNT}/id_ed25519.pub {MNT}/host_ed25519 {MNT}/host_ed25519.pub {MNT}/authorized_keys"
            ),
        ],
    );
    std::fs::write(dir.join("launch-secret"), random_hex()).expect("write the launch secret");
    let start = format!(
        "install -m 600 {MNT}/host_ed25519 /etc/ssh/ssh_host_ed25519_key \
         && install -m 600 {MNT}/id_ed25519 /root/.ssh/id_ed25519 \
         && install -m 600 {MNT}/authorized_keys /root/.ssh/authorized_keys \
         && /usr/sbin/sshd -h /etc/ssh/ssh_host_ed25519_key \
         && exec {INIT} launch-listen --grace 2"
    );
    let init_mount = format!("{}:{INIT}:ro", init.display());
    let ro_mount = format!("{mount}:ro");
    let nodes: Vec<(String, String)> = (0..NODES)
        .map(|rank| {
            let hostname = format!("{}-n{rank}", scratch.id);
            let node_rank = format!("NODE_RANK={rank}");
            let job = format!("DROVER_JOB_NAME={}", scratch.id);
            let secret = format!("DROVER_LAUNCH_SECRET_FILE={MNT}/launch-secret");
            let name = scratch.run(
                &format!("mpi{rank}"),
                true,
                &[
                    "--hostname",
                    &hostname,
                    "-v",
                    &ro_mount,
                    "-v",
                    &init_mount,
                    "-e",
                    &node_rank,
                    "-e",
                    &job,
                    "-e",
                    "DROVER_ATTEMPT=1",
                    "-e",
                    &secret,
                    "-e",
                    "DROVER_LAUNCH_CONNECT_TIMEOUT=10",
                    "-e",
                    "OMPI_ALLOW_RUN_AS_ROOT=1",
                    "-e",
                    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1",
                    "-e",
                    "OMPI_MCA_plm_rsh_no_tree_spawn=1",
                    "-e",
                    "OMPI_MCA_btl_vader_single_copy_mechanism=none",
                ],
                SSHD_IMAGE,
                &["sh", "-c", &start],
            );
            let ip = ip_of(&name);
            (name, ip)
        })
        .collect();
    for (name, _) in &nodes {
        let ready = wait_until(Duration::from_secs(30), || {
            let out = docker(&["logs", name]);
            String::from_utf8_lossy(&out.stderr).contains("waiting for launches")
                || String::from_utf8_lossy(&out.stdout).contains("waiting for launches")
        });
        let logs = docker(&["logs", name]);
        assert!(
            ready,
            "{name} did not start sshd and launch-listen: {}{}",
            String::from_utf8_lossy(&logs.stdout),
            String::from_utf8_lossy(&logs.stderr)
        );
    }
    let hostfile: String = nodes
        .iter()
        .map(|(_, ip)| format!("{ip} slots={PER_NODE}\n"))
        .collect();
    std::fs::write(dir.join("hostfile"), hostfile).expect("write the hostfile");
    nodes
}

/// The hello as a Drover job: seconds from `started_at` to the last rank's line.
fn drover_mpi_hello(up: &LocalUp, job: &JobDir) -> f64 {
    check_interrupted();
    let name = up.submit(&job.job_file(), &up.cluster);
    up.wait_job_state(&name, "completed", Duration::from_secs(300));
    let started = up.job(&name)["started_at"].as_u64().unwrap_or(0) as f64 / 1000.0;
    let logs = up.cli_ok(&["job", "logs", &name]);
    last_rank_line(&logs, &format!("Drover job {name}")) - started
}

/// Rank 0's line of the all_reduce script: the bandwidth in bytes/s.
fn allreduce_bandwidth(text: &str, what: &str) -> f64 {
    let lines = key_values(text, "allreduce world=");
    let line = lines
        .first()
        .unwrap_or_else(|| panic!("{what}: no all_reduce result:\n{text}"));
    assert_eq!(line["world"], NODES.to_string(), "{what}:\n{text}");
    line["bw"]
        .parse()
        .unwrap_or_else(|_| panic!("{what}: no bandwidth:\n{text}"))
}

/// One all_reduce run in the three bridge containers, ranks started together.
fn bridge_allreduce(gloo: &[(String, String)], iters: usize) -> f64 {
    check_interrupted();
    let master = format!("MASTER_ADDR={}", gloo[0].1);
    let children: Vec<_> = gloo
        .iter()
        .enumerate()
        .map(|(rank, (name, _))| {
            Command::new("docker")
                .args(["exec", "-e", &master, "-e"])
                .arg(format!("MASTER_PORT={MASTER_PORT}"))
                .args(["-e", &format!("WORLD_SIZE={NODES}"), "-e"])
                .arg(format!("RANK={rank}"))
                .args([name, "timeout", "600", "python3"])
                .arg(format!("{MNT}/code/allreduce.py"))
                .arg(iters.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("docker exec runs")
        })
        .collect();
    let outs: Vec<Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().expect("docker exec"))
        .collect();
    for (rank, out) in outs.iter().enumerate() {
        assert!(
            out.status.success(),
            "rank {rank} of the bridge all_reduce failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    allreduce_bandwidth(&String::from_utf8_lossy(&outs[0].stdout), "bridge")
}

/// One all_reduce run as a Drover job.
fn drover_allreduce(up: &LocalUp, job: &JobDir) -> f64 {
    check_interrupted();
    let name = up.submit(&job.job_file(), &up.cluster);
    up.wait_job_state(&name, "completed", Duration::from_secs(600));
    let logs = up.cli_ok(&["job", "logs", &name]);
    allreduce_bandwidth(&logs, &format!("Drover job {name}"))
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The median of `a[i] / b[i]`: runs side by side, paired.
fn paired_ratio(a: &[f64], b: &[f64]) -> f64 {
    let mut r: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
    median(&mut r)
}

/// `median (min–max)` of seconds, in milliseconds.
fn ms_summary(v: &mut [f64]) -> (f64, String) {
    let m = median(v);
    let (min, max) = (v[0], v[v.len() - 1]);
    (
        m,
        format!("{:.0} ms ({:.0}–{:.0})", m * 1e3, min * 1e3, max * 1e3),
    )
}

/// `median (min–max)` of bytes/s, in MB/s (10⁶ bytes).
fn mbs_summary(v: &mut [f64]) -> (f64, String) {
    let m = median(v);
    let (min, max) = (v[0], v[v.len() - 1]);
    (
        m,
        format!("{:.0} MB/s ({:.0}–{:.0})", m / 1e6, min / 1e6, max / 1e6),
    )
}

fn main() {
    let mut runs = 5usize;
    let mut iters = 10usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = args.next().and_then(|v| v.parse().ok()).unwrap_or(runs),
            "--iters" => iters = args.next().and_then(|v| v.parse().ok()).unwrap_or(iters),
            other => {
                eprintln!(
                    "unknown argument {other}; usage: bench-distributed [--runs 5] [--iters 10]"
                );
                std::process::exit(2);
            }
        }
    }
    let runs = runs.max(1);
    let iters = iters.max(1);
    catch_interrupts();
    require_docker();
    require_image(MPI_IMAGE);
    require_image(TORCH_IMAGE);
    sshd_image();
    let init = init_bin_release();
    eprintln!("load average at start: {}", load());

    let scratch = Scratch::new();
    let dir = tempfile::tempdir().expect("tempdir");

    // MPI launch: ssh vs drover-init rsh, in the same three containers.
    let nodes = mpi_nodes(&scratch, dir.path(), &init);
    let node0 = nodes[0].0.clone();
    let host_list = nodes
        .iter()
        .map(|(_, ip)| ip.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let (mut ssh_line, mut ssh_exit, mut rsh_line, mut rsh_exit) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..=runs {
        // ABBA order after the warm-up (i = 0, not counted).
        let order = if i % 2 == 0 {
            [Agent::Ssh, Agent::Drover]
        } else {
            [Agent::Drover, Agent::Ssh]
        };
        for agent in order {
            let (line, exit) = mpi_hello(&node0, &host_list, agent);
            eprintln!(
                "mpi run {i} over {agent:?}: last rank's line after {:.0} ms, mpirun exited after {:.0} ms",
                line * 1e3,
                exit * 1e3
            );
            if i > 0 {
                let (l, e) = match agent {
                    Agent::Ssh => (&mut ssh_line, &mut ssh_exit),
                    Agent::Drover => (&mut rsh_line, &mut rsh_exit),
                };
                l.push(line);
                e.push(exit);
            }
        }
    }
    scratch.remove(&nodes.into_iter().map(|(n, _)| n).collect::<Vec<_>>());

    // The same hello as a Drover job, then Gloo, on one local cluster.
    let up = LocalUp::up_release(&[
        "--max-nodes",
        &NODES.to_string(),
        "--idle-seconds-before-scaledown",
        "600",
    ]);
    let hello_job = JobDir::new(&format!(
        "command: >-\n  mpirun -np {np} sh -c '{HELLO}'\n\
         environment:\n  image: {MPI_IMAGE}\n\
         resources:\n  instance_count: {NODES}\n\
         distribution:\n  type: mpi\n  process_count_per_instance: {PER_NODE}\n",
        np = NODES * PER_NODE
    ));
    let mut job_line = Vec::new();
    for i in 0..=runs {
        let line = drover_mpi_hello(&up, &hello_job);
        eprintln!(
            "drover mpi job {i}: last rank's line {:.0} ms after started_at",
            line * 1e3
        );
        if i > 0 {
            job_line.push(line);
        }
    }

    std::fs::create_dir_all(dir.path().join("code")).expect("mkdir code");
    std::fs::write(dir.path().join("code/allreduce.py"), ALLREDUCE_PY).expect("write script");
    let code_mount = format!("{}:{MNT}/code:ro", dir.path().join("code").display());
    let gloo: Vec<(String, String)> = (0..NODES)
        .map(|rank| {
            let name = scratch.run(
                &format!("gloo{rank}"),
                true,
                &["-v", &code_mount],
                TORCH_IMAGE,
                &["sleep", "infinity"],
            );
            let ip = ip_of(&name);
            (name, ip)
        })
        .collect();
    let torch_job = JobDir::new(&format!(
        "code: src\n\
         command: python3 allreduce.py {iters}\n\
         environment:\n  image: {TORCH_IMAGE}\n\
         resources:\n  instance_count: {NODES}\n\
         distribution:\n  type: pytorch\n  process_count_per_instance: 1\n"
    ));
    torch_job.write("src/allreduce.py", ALLREDUCE_PY);
    let (mut drover_bw, mut bridge_bw) = (Vec::new(), Vec::new());
    for i in 0..=runs {
        let (d, b) = if i % 2 == 0 {
            let d = drover_allreduce(&up, &torch_job);
            (d, bridge_allreduce(&gloo, iters))
        } else {
            let b = bridge_allreduce(&gloo, iters);
            (drover_allreduce(&up, &torch_job), b)
        };
        eprintln!(
            "gloo run {i}: Drover {:.0} MB/s, bridge {:.0} MB/s",
            d / 1e6,
            b / 1e6
        );
        if i > 0 {
            drover_bw.push(d);
            bridge_bw.push(b);
        }
    }
    scratch.remove(&gloo.into_iter().map(|(n, _)| n).collect::<Vec<_>>());
    drop(up);
    drop(scratch);
    eprintln!("load average at end: {}", load());

    // Paired first: the summaries sort their vectors.
    let line_pairs = paired_ratio(&rsh_line, &ssh_line);
    let exit_pairs = paired_ratio(&rsh_exit, &ssh_exit);
    let bw_pairs = paired_ratio(&drover_bw, &bridge_bw);
    let (rl, rl_s) = ms_summary(&mut rsh_line);
    let (sl, sl_s) = ms_summary(&mut ssh_line);
    let (re, re_s) = ms_summary(&mut rsh_exit);
    let (se, se_s) = ms_summary(&mut ssh_exit);
    println!(
        "| MPI hello, 3 containers × 2 ranks | runs | `drover-init rsh` median (min–max) | `ssh` median (min–max) | Drover/ssh, ratio of medians (goal ≤ 1.0×) | median of paired ratios |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| mpirun started → last rank's line | {runs} | {rl_s} | {sl_s} | **{:.2}×** | {line_pairs:.2}× |",
        rl / sl
    );
    println!(
        "| mpirun started → mpirun exited | {runs} | {re_s} | {se_s} | {:.2}× | {exit_pairs:.2}× |",
        re / se
    );
    let (_, job_s) = ms_summary(&mut job_line);
    println!();
    println!("| Drover job, 3 nodes × 2 ranks (`type: mpi`) | runs | median (min–max) |");
    println!("|---|---|---|");
    println!("| `started_at` → last rank's line | {runs} | {job_s} |");
    let (db, db_s) = mbs_summary(&mut drover_bw);
    let (bb, bb_s) = mbs_summary(&mut bridge_bw);
    println!();
    println!(
        "| Gloo all_reduce, 100 MB float32, 3 ranks: bytes of the tensor / median time of one all_reduce ({iters} after a warm-up) | runs | Drover job median (min–max) | Docker bridge median (min–max) | Drover/bridge, ratio of medians (goal ≥ 0.95×) | median of paired ratios |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| bandwidth | {runs} | {db_s} | {bb_s} | **{:.2}×** | {bw_pairs:.2}× |",
        db / bb
    );
}
