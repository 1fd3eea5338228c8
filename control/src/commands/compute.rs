//! `drover compute create|update|show|list|delete`.

use std::path::PathBuf;

use anyhow::{Context, bail};
use drover_api::compute::{ComputeFlags, ComputeSpec, ComputeUpdate, Identity, Naming};
use drover_api::host_paths::normalized_prefix;
use drover_api::wire;
use reqwest::Method;

use super::client::{Client, ClientArgs, encode, print_json};
use super::output::{ago, table};
use drover_control::server::now;

/// `drover compute …`.
#[derive(clap::Args)]
pub struct ComputeArgs {
    #[command(subcommand)]
    command: ComputeCommand,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(clap::Subcommand)]
enum ComputeCommand {
    /// Create a cluster from v1 flags or Azure ML v2 compute YAML.
    Create(Box<CreateArgs>),
    /// Change a cluster's node counts or idle time.
    Update(UpdateArgs),
    /// Show a cluster: definition, allocation state, nodes, scaling errors.
    Show {
        /// The cluster.
        name: String,
    },
    /// List clusters.
    List,
    /// Delete a cluster without nodes or unfinished jobs.
    Delete {
        /// The cluster.
        name: String,
    },
}

#[derive(clap::Args)]
struct CreateArgs {
    /// Azure ML v2 compute YAML (`type: amlcompute`).
    #[arg(short = 'f', long = "file", conflicts_with_all = ["vm_size", "min_nodes", "max_nodes", "vm_priority", "idle_seconds_before_scaledown", "assign_identity", "location", "tags", "description", "provider"])]
    file: Option<PathBuf>,
    /// Cluster name (overrides the YAML's with -f).
    #[arg(long, short = 'n')]
    name: Option<String>,
    /// VM size, e.g. STANDARD_D3_V2.
    #[arg(long, short = 's')]
    vm_size: Option<String>,
    /// Fewest nodes (default 0).
    #[arg(long)]
    min_nodes: Option<u32>,
    /// Most nodes.
    #[arg(long)]
    max_nodes: Option<u32>,
    /// dedicated or lowpriority.
    #[arg(long)]
    vm_priority: Option<String>,
    /// Seconds a node stays idle before it leaves (default 120).
    #[arg(long)]
    idle_seconds_before_scaledown: Option<u64>,
    /// '[system]' or user-assigned identity resource ids separated by `,`.
    #[arg(long)]
    assign_identity: Option<String>,
    /// Location (region).
    #[arg(long)]
    location: Option<String>,
    /// KEY=VALUE, repeatable.
    #[arg(long)]
    tags: Vec<String>,
    /// Free text.
    #[arg(long)]
    description: Option<String>,
    /// static (default), local or azure-vmss.
    #[arg(long)]
    provider: Option<String>,
    /// A host folder under which the cluster's jobs may bind host paths
    /// (drover.mounts); repeatable; adds to the YAML's with -f.
    #[arg(long = "allow-host-path", value_name = "DIR")]
    allow_host_path: Vec<String>,
}

#[derive(clap::Args)]
struct UpdateArgs {
    /// The cluster.
    name: String,
    /// Fewest nodes.
    #[arg(long)]
    min_nodes: Option<u32>,
    /// Most nodes.
    #[arg(long)]
    max_nodes: Option<u32>,
    /// Seconds a node stays idle before it leaves.
    #[arg(long)]
    idle_seconds_before_scaledown: Option<u64>,
}

/// Runs a `drover compute` command.
pub async fn run(args: ComputeArgs) -> anyhow::Result<i32> {
    let client = Client::new(&args.client)?;
    let json = args.client.json;
    match args.command {
        ComputeCommand::Create(c) => create(&client, *c, json).await,
        ComputeCommand::Update(u) => update(&client, u, json).await,
        ComputeCommand::Show { name } => {
            let info: wire::ClusterInfo = client
                .call(
                    Method::GET,
                    &format!("/v1/clusters/{}", encode(&name)),
                    None::<&()>,
                )
                .await
                .with_context(|| format!("cannot show cluster {name}"))?;
            if json {
                print_json(&info)?;
            } else {
                print!("{}", show(&info));
            }
            Ok(0)
        }
        ComputeCommand::List => {
            let list: wire::ClusterList = client
                .call(Method::GET, "/v1/clusters", None::<&()>)
                .await
                .context("cannot list clusters")?;
            if json {
                print_json(&list)?;
            } else {
                let rows: Vec<Vec<String>> = list
                    .clusters
                    .iter()
                    .map(|c| {
                        vec![
                            c.spec.name.clone(),
                            c.spec.vm_size.clone(),
                            c.spec.vm_priority.to_string(),
                            format!("{}-{}", c.spec.min_nodes, c.spec.max_nodes),
                            c.status.allocation_state.to_string(),
                            c.status.current_node_count.to_string(),
                            c.status.target_node_count.to_string(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table(
                        &[
                            "NAME", "VM SIZE", "PRIORITY", "NODES", "STATE", "CURRENT", "TARGET"
                        ],
                        &rows
                    )
                );
            }
            Ok(0)
        }
        ComputeCommand::Delete { name } => {
            client
                .call_text(
                    Method::DELETE,
                    &format!("/v1/clusters/{}", encode(&name)),
                    None::<&()>,
                )
                .await
                .with_context(|| format!("cannot delete cluster {name}"))?;
            if !json {
                println!("deleted cluster {name}");
            }
            Ok(0)
        }
    }
}

fn spec_of(c: &CreateArgs) -> anyhow::Result<ComputeSpec> {
    if let Some(file) = &c.file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let parsed = ComputeSpec::from_yaml(&file.display().to_string(), &text)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .context("invalid compute definition")?;
        for w in &parsed.warnings {
            eprintln!("warning: {w}");
        }
        let mut spec = parsed.spec;
        if let Some(name) = &c.name {
            spec.name = name.clone();
        }
        spec.allowed_host_paths
            .extend(c.allow_host_path.iter().map(|p| normalized_prefix(p)));
        spec.validate(Naming::Flags)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .context("invalid cluster definition")?;
        return Ok(spec);
    }
    let flags = ComputeFlags {
        name: c.name.clone(),
        vm_size: c.vm_size.clone(),
        min_nodes: c.min_nodes,
        max_nodes: c.max_nodes,
        idle_seconds_before_scaledown: c.idle_seconds_before_scaledown,
        vm_priority: c.vm_priority.clone(),
        assign_identity: c.assign_identity.clone(),
        location: c.location.clone(),
        tags: c.tags.clone(),
        description: c.description.clone(),
        provider: c.provider.clone(),
        allowed_host_paths: c.allow_host_path.clone(),
    };
    flags
        .to_spec()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("invalid cluster definition")
}

async fn create(client: &Client, c: CreateArgs, json: bool) -> anyhow::Result<i32> {
    let spec = spec_of(&c)?;
    let name = spec.name.clone();
    let created: wire::ClusterCreated = client
        .call(
            Method::POST,
            "/v1/clusters",
            Some(&wire::ClusterCreate { spec }),
        )
        .await
        .with_context(|| format!("cannot create cluster {name}"))?;
    if json {
        print_json(&created)?;
    } else {
        println!("created cluster {name}");
        println!("join token (shown once; start drover-agent on each node with it):");
        println!("  {}", created.join_token);
    }
    Ok(0)
}

async fn update(client: &Client, u: UpdateArgs, json: bool) -> anyhow::Result<i32> {
    let update = ComputeUpdate {
        min_nodes: u.min_nodes,
        max_nodes: u.max_nodes,
        idle_seconds_before_scaledown: u.idle_seconds_before_scaledown,
    };
    if update.is_empty() {
        bail!(
            "cannot update cluster {}: give at least one of --min-nodes, --max-nodes and --idle-seconds-before-scaledown",
            u.name
        );
    }
    let info: wire::ClusterInfo = client
        .call(
            Method::PATCH,
            &format!("/v1/clusters/{}", encode(&u.name)),
            Some(&update),
        )
        .await
        .with_context(|| format!("cannot update cluster {}", u.name))?;
    if json {
        print_json(&info)?;
    } else {
        print!("{}", show(&info));
    }
    Ok(0)
}

fn identity(i: &Identity) -> String {
    match i {
        Identity::None => "none".to_string(),
        Identity::SystemAssigned => "system-assigned".to_string(),
        Identity::UserAssigned { resource_ids } => {
            format!("user-assigned: {}", resource_ids.join(", "))
        }
    }
}

/// `compute show` as text.
fn show(info: &wire::ClusterInfo) -> String {
    let s = &info.spec;
    let st = &info.status;
    let c = &st.node_state_counts;
    let mut out = String::new();
    let mut kv = |k: &str, v: String| out.push_str(&format!("{k:<24}{v}\n"));
    kv("name:", s.name.clone());
    kv("vm size:", s.vm_size.clone());
    kv("vm priority:", s.vm_priority.to_string());
    kv(
        "nodes:",
        format!("min {}, max {}", s.min_nodes, s.max_nodes),
    );
    kv(
        "idle before scale-down:",
        format!("{}s", s.idle_seconds_before_scaledown),
    );
    kv("identity:", identity(&s.identity));
    kv("provider:", s.provider.to_string());
    if let Some(l) = &s.location {
        kv("location:", l.clone());
    }
    kv(
        "allocation state:",
        format!(
            "{} (current {}, target {})",
            st.allocation_state, st.current_node_count, st.target_node_count
        ),
    );
    kv(
        "node states:",
        format!(
            "idle {}, running {}, preparing {}, unusable {}, leaving {}, preempted {}",
            c.idle, c.running, c.preparing, c.unusable, c.leaving, c.preempted
        ),
    );
    if st.errors.is_empty() {
        out.push_str("scaling errors:         none\n");
    } else {
        out.push_str("scaling errors:\n");
        let t = now();
        for e in st.errors.iter().rev().take(5) {
            out.push_str(&format!("  {:<9} {}\n", ago(e.at, t), e.message));
        }
    }
    out
}
