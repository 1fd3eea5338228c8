//! `drover node list`, `drover node evict`.

use anyhow::Context;
use drover_api::wire;
use reqwest::Method;

use super::client::{Client, ClientArgs, encode, print_json};
use super::output::{ago, or_dash, table};
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
    /// List nodes: state, IP, GPUs (healthy/total), last heartbeat, job.
    List {
        /// Only this cluster's.
        #[arg(long, short = 'c')]
        compute: Option<String>,
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
    let compute = match args.command {
        NodeCommand::List { compute } => compute,
        NodeCommand::Evict { node } => {
            let path = format!("/v1/nodes/{}/evict", encode(&node));
            let answer: wire::EvictResponse =
                client
                    .call(Method::POST, &path, None::<&()>)
                    .await
                    .with_context(|| format!("cannot evict node {node}"))?;
            if args.client.json {
                print_json(&answer)?;
            } else {
                println!(
                    "node {}: Preempt scheduled event {} injected",
                    answer.node, answer.event_id
                );
            }
            return Ok(0);
        }
    };
    let path = match &compute {
        Some(c) => format!("/v1/nodes?compute={}", encode(c)),
        None => "/v1/nodes".to_string(),
    };
    let list: wire::NodeList = client
        .call(Method::GET, &path, None::<&()>)
        .await
        .context("cannot list nodes")?;
    if args.client.json {
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
    print!(
        "{}",
        table(
            &["NODE", "COMPUTE", "STATE", "IP", "GPUS", "HEARTBEAT", "JOB"],
            &rows
        )
    );
    Ok(0)
}
