//! `drover node list`, `drover node show`, `drover node evict`.

use anyhow::Context;
use drover_api::cluster::Timestamp;
use drover_api::inventory::GpuHealth;
use drover_api::wire;
use drover_control::output;
use reqwest::Method;

use super::client::{Client, ClientArgs, encode, print_json};
use super::output::{ago, bytes, or_dash, table};
use drover_control::server::now;

/// `drover node …`.
#[derive(clap::Args)]
pub struct NodeArgs {
    #[command(subcommand)]
    command: NodeCommand,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(clap::Subcommand)]
enum NodeCommand {
    /// List nodes: state, IP, GPUs (healthy/total), last heartbeat, job
    /// (`--json` adds each node's VM, agent, inventory and part).
    List {
        /// Only this cluster's.
        #[arg(long, short = 'c')]
        compute: Option<String>,
    },
    /// Show a node: its state and cluster, its VM (name, size, id,
    /// priority), address, host and GPUs with their health, the part it
    /// runs, its last heartbeat and its agent's version.
    Show {
        /// The node id.
        node: String,
    },
    /// Preempt a node of a local cluster the way a spot eviction does: its
    /// VM gets a `Preempt` scheduled event, its agent stops the job, and the
    /// job is requeued on another node.
    Evict {
        /// The node id.
        node: String,
    },
}

/// Runs a `drover node` command.
pub async fn run(args: NodeArgs) -> anyhow::Result<i32> {
    let client = Client::new(&args.client)?;
    let json = args.client.json;
    match args.command {
        NodeCommand::List { compute } => list(&client, compute, json).await,
        NodeCommand::Show { node } => {
            let info: wire::NodeInfo = client
                .call(
                    Method::GET,
                    &format!("/v1/nodes/{}", encode(&node)),
                    None::<&()>,
                )
                .await
                .with_context(|| format!("cannot show node {node}"))?;
            if json {
                print_json(&info)?;
            } else {
                output::print(&show(&info, now()))?;
            }
            Ok(0)
        }
        NodeCommand::Evict { node } => {
            let path = format!("/v1/nodes/{}/evict", encode(&node));
            let answer: wire::EvictResponse =
                client
                    .call(Method::POST, &path, None::<&()>)
                    .await
                    .with_context(|| format!("cannot evict node {node}"))?;
            if json {
                print_json(&answer)?;
            } else {
                output::println(format_args!(
                    "node {}: Preempt scheduled event {} injected",
                    answer.node, answer.event_id
                ))?;
            }
            Ok(0)
        }
    }
}

async fn list(client: &Client, compute: Option<String>, json: bool) -> anyhow::Result<i32> {
    let path = match &compute {
        Some(c) => format!("/v1/nodes?compute={}", encode(c)),
        None => "/v1/nodes".to_string(),
    };
    let list: wire::NodeList = client
        .call(Method::GET, &path, None::<&()>)
        .await
        .context("cannot list nodes")?;
    if json {
        print_json(&list)?;
        return Ok(0);
    }
    let t = now();
    let rows: Vec<Vec<String>> = list
        .nodes
        .iter()
        .map(|n| {
            vec![
                n.id.clone(),
                n.cluster.clone(),
                n.state.to_string(),
                or_dash(n.ip.as_ref()),
                format!("{}/{}", n.healthy_gpus, n.total_gpus),
                ago(n.last_heartbeat, t),
                or_dash(n.current_job.as_ref()),
            ]
        })
        .collect();
    output::print(&table(
        &["NODE", "COMPUTE", "STATE", "IP", "GPUS", "HEARTBEAT", "JOB"],
        &rows,
    ))?;
    Ok(0)
}

/// `node show` as text, relative to `t`.
fn show(n: &wire::NodeInfo, t: Timestamp) -> String {
    let mut out = String::new();
    let mut kv = |k: &str, v: String| out.push_str(&format!("{k:<16}{v}\n"));
    kv("node:", n.id.clone());
    kv("compute:", n.cluster.clone());
    kv("state:", n.state.to_string());
    kv("address:", or_dash(n.ip.as_ref()));
    match &n.vm {
        Some(vm) => {
            kv("vm name:", dash_if_empty(&vm.name));
            kv("vm size:", dash_if_empty(&vm.vm_size));
            kv("vm id:", dash_if_empty(&vm.vm_id));
            kv("priority:", dash_if_empty(&vm.priority));
            if !vm.location.is_empty() {
                kv("location:", vm.location.clone());
            }
        }
        None => kv("vm:", "- (no instance metadata)".to_string()),
    }
    let job = match (&n.current_part, &n.current_job) {
        (Some(p), _) => format!(
            "{} (attempt {}, node rank {}, {}{})",
            p.part.job,
            p.part.attempt,
            p.part.node_rank,
            p.state,
            p.started_at
                .map(|s| format!(", started {}", ago(s, t)))
                .unwrap_or_default()
        ),
        (None, Some(job)) => job.clone(),
        (None, None) => "-".to_string(),
    };
    kv("job:", job);
    kv("heartbeat:", ago(n.last_heartbeat, t));
    kv("registered:", ago(n.registered_at, t));
    kv("agent:", or_dash(n.agent_version.as_ref()));
    let inv = n.inventory.clone().unwrap_or_default();
    let host = [
        inv.hostname.clone(),
        inv.os.clone(),
        (inv.logical_cores > 0).then(|| format!("{} cpus", inv.logical_cores)),
        (inv.memory_total_bytes > 0).then(|| format!("{} memory", bytes(inv.memory_total_bytes))),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>();
    kv(
        "host:",
        if host.is_empty() {
            "-".to_string()
        } else {
            host.join(", ")
        },
    );
    if let Some(driver) = &inv.driver_version {
        let cuda = inv
            .cuda_version
            .as_ref()
            .map(|c| format!(" (cuda {c})"))
            .unwrap_or_default();
        kv("driver:", format!("{driver}{cuda}"));
    }
    kv(
        "gpus:",
        format!("{} of {} healthy", n.healthy_gpus, n.total_gpus),
    );
    if !inv.gpus.is_empty() {
        let rows: Vec<Vec<String>> = inv
            .gpus
            .iter()
            .map(|g| {
                vec![
                    g.index.to_string(),
                    or_dash(g.name.as_ref()),
                    or_dash(g.uuid.as_ref()),
                    or_dash(g.memory_total_bytes.map(bytes)),
                    health(&g.health, t),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&table(&["GPU", "NAME", "UUID", "MEMORY", "HEALTH"], &rows));
    }
    out
}

/// `healthy`, or `unhealthy: xid 79 (healthy again in 4m)`.
fn health(h: &GpuHealth, t: Timestamp) -> String {
    match h {
        GpuHealth::Healthy => "healthy".to_string(),
        GpuHealth::Unhealthy {
            reason,
            recovers_at_unix_ms,
            ..
        } => {
            let left = recovers_at_unix_ms.saturating_sub(t.as_millis()) / 1000;
            let when = match left {
                0 => String::new(),
                1..60 => format!(" (healthy again in {left}s)"),
                _ => format!(" (healthy again in {}m)", left.div_ceil(60)),
            };
            format!("unhealthy: {reason}{when}")
        }
    }
}

fn dash_if_empty(s: &str) -> String {
    if s.is_empty() {
        "-".to_string()
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_api::cluster::NodeState;
    use drover_api::inventory::{GpuSummary, InventorySummary, VmInfo};

    #[test]
    fn show_names_the_vm_the_part_and_each_gpus_health() {
        let t = Timestamp::from_secs(10_000);
        let n = wire::NodeInfo {
            id: "n1".into(),
            cluster: "gpu".into(),
            state: NodeState::Running,
            ip: Some("10.0.0.4".into()),
            healthy_gpus: 1,
            total_gpus: 2,
            registered_at: Timestamp::from_secs(2_800),
            last_heartbeat: Timestamp::from_secs(9_997),
            current_job: Some("train".into()),
            current_part: Some(wire::NodePart {
                part: wire::PartKey::new("train", 2, 1),
                state: wire::PartState::Running,
                started_at: Some(Timestamp::from_secs(9_880)),
            }),
            vm: Some(VmInfo {
                name: "vm-n1".into(),
                vm_size: "Standard_ND96asr_v4".into(),
                vm_id: "02aab8a4".into(),
                priority: "Spot".into(),
                ..VmInfo::default()
            }),
            agent_version: Some("0.1.0".into()),
            inventory: Some(InventorySummary {
                hostname: Some("vm-n1".into()),
                logical_cores: 96,
                memory_total_bytes: 2 << 40,
                driver_version: Some("550.54.15".into()),
                cuda_version: Some("12.4".into()),
                gpus: vec![
                    GpuSummary {
                        index: 0,
                        name: Some("NVIDIA A100".into()),
                        uuid: Some("GPU-a".into()),
                        memory_total_bytes: Some(80 << 30),
                        health: GpuHealth::Healthy,
                    },
                    GpuSummary {
                        index: 1,
                        health: GpuHealth::Unhealthy {
                            reason: "xid 79".into(),
                            since_unix_ms: 0,
                            last_event_unix_ms: 0,
                            recovers_at_unix_ms: 10_000_000 + 240_000,
                        },
                        ..GpuSummary::default()
                    },
                ],
                ..InventorySummary::default()
            }),
        };
        let text = show(&n, t);
        for want in [
            "state:          running\n",
            "address:        10.0.0.4\n",
            "vm name:        vm-n1\n",
            "vm size:        Standard_ND96asr_v4\n",
            "vm id:          02aab8a4\n",
            "priority:       Spot\n",
            "job:            train (attempt 2, node rank 1, running, started 2m ago)\n",
            "heartbeat:      3s ago\n",
            "agent:          0.1.0\n",
            "host:           vm-n1, 96 cpus, 2.0 TiB memory\n",
            "driver:         550.54.15 (cuda 12.4)\n",
            "gpus:           1 of 2 healthy\n",
            "GPU  NAME         UUID   MEMORY    HEALTH\n",
            "0    NVIDIA A100  GPU-a  80.0 GiB  healthy\n",
            "1    -            -      -         unhealthy: xid 79 (healthy again in 4m)\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }

    #[test]
    fn a_node_without_metadata_or_inventory_still_shows() {
        let n = wire::NodeInfo {
            id: "n".into(),
            cluster: "c".into(),
            state: NodeState::Idle,
            ip: None,
            healthy_gpus: 0,
            total_gpus: 0,
            registered_at: Timestamp::from_secs(1),
            last_heartbeat: Timestamp::from_secs(1),
            current_job: None,
            current_part: None,
            vm: None,
            agent_version: None,
            inventory: None,
        };
        let text = show(&n, Timestamp::from_secs(1));
        assert!(
            text.contains("vm:             - (no instance metadata)\n"),
            "{text}"
        );
        assert!(text.contains("job:            -\n"), "{text}");
        assert!(!text.contains("GPU "), "{text}");
    }
}
