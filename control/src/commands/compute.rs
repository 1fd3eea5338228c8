//! `drover compute create|update|show|list|delete`.

use std::path::PathBuf;

use anyhow::{Context, bail};
use drover_api::SetOverride;
use drover_api::compute::{ComputeFlags, ComputeSpec, ComputeUpdate, FlagGeneration, Identity};
use drover_api::wire;
use reqwest::Method;

use super::client::{Client, ClientArgs, encode, print_json};
use super::output::{ago, table};
use drover_control::output;
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
    /// Create a cluster: Azure ML v2 compute YAML (-f, with --set and
    /// flags as overrides), v2 flags (`az ml compute create --type
    /// amlcompute --size … --max-instances …`) or v1 flags (`az ml
    /// computetarget create amlcompute --vm-size … --max-nodes …`).
    Create(Box<CreateArgs>),
    /// Change a cluster's node counts or idle time (v1 or v2 flags).
    Update(UpdateArgs),
    /// Show a cluster: definition, allocation state, nodes, scaling errors.
    Show(NameArg),
    /// List clusters.
    List,
    /// Delete a cluster, removing its idle nodes first (as Azure does);
    /// refused while jobs run on it unless --force cancels them.
    Delete(DeleteArgs),
}

/// The cluster a command is about: positional (`show cpu`) or `-n cpu`.
#[derive(clap::Args)]
struct NameArg {
    /// The cluster.
    #[arg(required_unless_present = "name")]
    cluster: Option<String>,
    /// The cluster (the Azure CLI's spelling).
    #[arg(long, short = 'n', conflicts_with = "cluster")]
    name: Option<String>,
}

impl NameArg {
    fn get(&self) -> String {
        self.name
            .clone()
            .or_else(|| self.cluster.clone())
            .unwrap_or_default()
    }
}

#[derive(clap::Args)]
struct DeleteArgs {
    #[command(flatten)]
    name: NameArg,
    /// Cancel the cluster's unfinished jobs first.
    #[arg(long)]
    force: bool,
    /// Do not ask (accepted for the Azure CLI's sake; nothing is asked).
    #[arg(long, short = 'y')]
    yes: bool,
}

#[derive(clap::Args)]
struct CreateArgs {
    /// Azure ML v2 compute YAML (`type: amlcompute`); flags given beside it
    /// override its keys.
    #[arg(short = 'f', long = "file")]
    file: Option<PathBuf>,
    /// Override a key of the YAML: `--set max_instances=4` (repeatable;
    /// needs --file).
    #[arg(long = "set", value_name = "KEY=VALUE", requires = "file")]
    set: Vec<String>,
    /// Cluster name (overrides the YAML's with -f).
    #[arg(long, short = 'n')]
    name: Option<String>,
    /// The compute type (v2); only amlcompute.
    #[arg(long = "type", short = 't', value_name = "TYPE")]
    compute_type: Option<String>,
    /// VM size (default STANDARD_DS3_V2).
    #[arg(long, short = 's', conflicts_with = "size")]
    vm_size: Option<String>,
    /// VM size (v2 spelling of --vm-size).
    #[arg(long)]
    size: Option<String>,
    /// Fewest nodes (default 0).
    #[arg(long, conflicts_with = "min_instances")]
    min_nodes: Option<u32>,
    /// Fewest nodes (v2 spelling of --min-nodes).
    #[arg(long)]
    min_instances: Option<u32>,
    /// Most nodes (default 4).
    #[arg(long, conflicts_with = "max_instances")]
    max_nodes: Option<u32>,
    /// Most nodes (v2 spelling of --max-nodes).
    #[arg(long)]
    max_instances: Option<u32>,
    /// dedicated or lowpriority.
    #[arg(long, conflicts_with = "tier")]
    vm_priority: Option<String>,
    /// dedicated or low_priority (v2 spelling of --vm-priority).
    #[arg(long)]
    tier: Option<String>,
    /// Seconds a node stays idle before it leaves (default 120).
    #[arg(long, conflicts_with = "idle_time_before_scale_down")]
    idle_seconds_before_scaledown: Option<u64>,
    /// Seconds a node stays idle before it leaves (v2 spelling).
    #[arg(long)]
    idle_time_before_scale_down: Option<u64>,
    /// '[system]' or user-assigned identity resource ids separated by `,` (v1).
    #[arg(long)]
    assign_identity: Option<String>,
    /// SystemAssigned, UserAssigned or None (v2).
    #[arg(long)]
    identity_type: Option<String>,
    /// Resource ids of user-assigned identities (v2, with --identity-type UserAssigned).
    #[arg(long, num_args = 1..)]
    user_assigned_identities: Vec<String>,
    /// Location (region).
    #[arg(long)]
    location: Option<String>,
    /// KEY=VALUE, repeatable (`--tags a=1 b=2` as v2 writes it, or `--tags a=1 --tags b=2`).
    #[arg(long, num_args = 1..)]
    tags: Vec<String>,
    /// Free text.
    #[arg(long)]
    description: Option<String>,
    /// static, local or azure-vmss (default: the control plane's: local
    /// under `drover up`, else static).
    #[arg(long)]
    provider: Option<String>,
    /// A host folder under which the cluster's jobs may bind host paths
    /// (drover.mounts); repeatable; adds to the YAML's with -f.
    #[arg(long = "allow-host-path", value_name = "DIR")]
    allow_host_path: Vec<String>,
    /// Whether jobs also get the App Service managed-identity protocol
    /// (IDENTITY_ENDPOINT, IDENTITY_HEADER) beside Azure ML's MSI_ENDPOINT;
    /// `false` for strict Azure ML parity (default true).
    #[arg(long, value_name = "BOOL", action = clap::ArgAction::Set)]
    app_service_identity: Option<bool>,
    /// With `--provider azure-vmss`: the ARM resource id of the VM scale
    /// set to adopt (/subscriptions/S/resourceGroups/G/providers/Microsoft.Compute/virtualMachineScaleSets/N).
    #[arg(long, value_name = "RESOURCE_ID")]
    scale_set: Option<String>,
}

#[derive(clap::Args)]
struct UpdateArgs {
    #[command(flatten)]
    name: NameArg,
    /// Fewest nodes.
    #[arg(long, visible_alias = "min-instances")]
    min_nodes: Option<u32>,
    /// Most nodes.
    #[arg(long, visible_alias = "max-instances")]
    max_nodes: Option<u32>,
    /// Seconds a node stays idle before it leaves.
    #[arg(long, visible_alias = "idle-time-before-scale-down")]
    idle_seconds_before_scaledown: Option<u64>,
}

/// Runs a `drover compute` command.
pub async fn run(args: ComputeArgs) -> anyhow::Result<i32> {
    let client = Client::new(&args.client)?;
    let json = args.client.json;
    match args.command {
        ComputeCommand::Create(c) => create(&client, *c, json).await,
        ComputeCommand::Update(u) => update(&client, u, json).await,
        ComputeCommand::Show(n) => {
            let name = n.get();
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
                output::print(&show(&info))?;
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
                output::print(&table(
                    &[
                        "NAME", "VM SIZE", "PRIORITY", "NODES", "STATE", "CURRENT", "TARGET",
                    ],
                    &rows,
                ))?;
            }
            Ok(0)
        }
        ComputeCommand::Delete(d) => {
            let name = d.name.get();
            let _ = d.yes;
            let query = if d.force { "?force=true" } else { "" };
            let gone: wire::ClusterDeleted = client
                .call(
                    Method::DELETE,
                    &format!("/v1/clusters/{}{query}", encode(&name)),
                    None::<&()>,
                )
                .await
                .with_context(|| format!("cannot delete cluster {name}"))?;
            if json {
                print_json(&gone)?;
            } else {
                for job in &gone.canceled_jobs {
                    output::println(format_args!("canceled job {job}"))?;
                }
                for node in &gone.removed_nodes {
                    output::println(format_args!("removed node {node}"))?;
                }
                output::println(format_args!("deleted cluster {name}"))?;
            }
            Ok(0)
        }
    }
}

/// The flags of `compute create`, in the generation their spellings say.
fn flags_of(c: &CreateArgs) -> ComputeFlags {
    let v2 = c.compute_type.is_some()
        || c.size.is_some()
        || c.min_instances.is_some()
        || c.max_instances.is_some()
        || c.tier.is_some()
        || c.idle_time_before_scale_down.is_some()
        || c.identity_type.is_some()
        || !c.user_assigned_identities.is_empty();
    ComputeFlags {
        generation: if v2 {
            FlagGeneration::V2
        } else {
            FlagGeneration::V1
        },
        name: c.name.clone(),
        vm_size: c.vm_size.clone().or_else(|| c.size.clone()),
        min_nodes: c.min_nodes.or(c.min_instances),
        max_nodes: c.max_nodes.or(c.max_instances),
        idle_seconds_before_scaledown: c
            .idle_seconds_before_scaledown
            .or(c.idle_time_before_scale_down),
        vm_priority: c.vm_priority.clone().or_else(|| c.tier.clone()),
        assign_identity: c.assign_identity.clone(),
        identity_type: c.identity_type.clone(),
        user_assigned_identities: c.user_assigned_identities.clone(),
        location: c.location.clone(),
        tags: c.tags.clone(),
        description: c.description.clone(),
        provider: c.provider.clone(),
        allowed_host_paths: c.allow_host_path.clone(),
        app_service_identity: c.app_service_identity,
        scale_set: c.scale_set.clone(),
    }
}

fn spec_of(c: &CreateArgs) -> anyhow::Result<ComputeSpec> {
    if let Some(t) = &c.compute_type
        && !t.eq_ignore_ascii_case("amlcompute")
    {
        bail!("--type: only amlcompute clusters are supported, got {t}");
    }
    let flags = flags_of(c);
    let Some(file) = &c.file else {
        return flags
            .to_spec()
            .map_err(|e| anyhow::anyhow!("{e}"))
            .context("invalid cluster definition");
    };
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let sets = c
        .set
        .iter()
        .map(|s| s.parse::<SetOverride>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("--set: {e}"))?;
    let parsed = ComputeSpec::from_yaml_with(&file.display().to_string(), &text, &sets)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("invalid compute definition")?;
    for w in &parsed.warnings {
        output::note(format_args!("warning: {w}"));
    }
    flags
        .override_spec(parsed.spec)
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
        output::println(format_args!("created cluster {name}"))?;
        output::println(format_args!(
            "join token (shown once; start drover-agent on each node with it):"
        ))?;
        output::println(format_args!("  {}", created.join_token))?;
    }
    Ok(0)
}

async fn update(client: &Client, u: UpdateArgs, json: bool) -> anyhow::Result<i32> {
    let name = u.name.get();
    let update = ComputeUpdate {
        min_nodes: u.min_nodes,
        max_nodes: u.max_nodes,
        idle_seconds_before_scaledown: u.idle_seconds_before_scaledown,
    };
    if update.is_empty() {
        bail!(
            "cannot update cluster {name}: give at least one of --min-nodes, --max-nodes and --idle-seconds-before-scaledown (or --min-instances, --max-instances and --idle-time-before-scale-down)"
        );
    }
    let info: wire::ClusterInfo = client
        .call(
            Method::PATCH,
            &format!("/v1/clusters/{}", encode(&name)),
            Some(&update),
        )
        .await
        .with_context(|| format!("cannot update cluster {name}"))?;
    if json {
        print_json(&info)?;
    } else {
        output::print(&show(&info))?;
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
    kv(
        "identity protocols:",
        if s.app_service_identity {
            "azure ml (MSI_ENDPOINT), app service (IDENTITY_ENDPOINT)".to_string()
        } else {
            "azure ml (MSI_ENDPOINT)".to_string()
        },
    );
    kv(
        "provider:",
        s.provider
            .map_or_else(|| "the control plane's".to_string(), |p| p.to_string()),
    );
    if let Some(id) = &s.scale_set {
        kv("scale set:", id.clone());
    }
    if !s.allowed_host_paths.is_empty() {
        kv("allowed host paths:", s.allowed_host_paths.join(", "));
    }
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
