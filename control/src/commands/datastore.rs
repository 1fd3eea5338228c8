//! `drover datastore create|list|show|delete` (`az ml datastore …`).

use std::path::PathBuf;

use anyhow::Context;
use drover_api::SetOverride;
use drover_api::datastore::{DatastoreCreate, DatastoreInfo, DatastoreList, DatastoreSpec};
use drover_control::output;
use reqwest::Method;

use super::client::{Client, ClientArgs, encode, print_json};
use super::output::{or_dash, table};

/// `drover datastore …`.
#[derive(clap::Args)]
pub struct DatastoreArgs {
    #[command(subcommand)]
    command: DatastoreCommand,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(clap::Subcommand)]
enum DatastoreCommand {
    /// Register a datastore from its YAML: Azure ML's `type: azure_blob`,
    /// or Drover's `type: s3` and `type: local`. Its credentials are stored
    /// encrypted by the control plane and never shown again.
    Create {
        /// The datastore file.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// The datastore's name (overrides `name:`).
        #[arg(long, short = 'n')]
        name: Option<String>,
        /// Override a key of the YAML (`--set container_name=data`), repeatable.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// List datastores (`workspaceblobstore`, the artifact store, first).
    List,
    /// Show a datastore (never its secrets).
    Show(DatastoreName),
    /// Remove a datastore (not its data).
    Delete(DatastoreName),
}

#[derive(clap::Args)]
struct DatastoreName {
    /// The datastore.
    #[arg(required_unless_present = "name")]
    datastore: Option<String>,
    /// The datastore (the Azure CLI's spelling).
    #[arg(long, short = 'n', conflicts_with = "datastore")]
    name: Option<String>,
}

impl DatastoreName {
    fn get(&self) -> String {
        self.name
            .clone()
            .or_else(|| self.datastore.clone())
            .unwrap_or_default()
    }
}

/// Runs a `drover datastore` command.
pub async fn run(args: DatastoreArgs) -> anyhow::Result<i32> {
    let client = Client::new(&args.client)?;
    let json = args.client.json;
    match args.command {
        DatastoreCommand::Create { file, name, set } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let mut sets = set
                .iter()
                .map(|s| s.parse::<SetOverride>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow::anyhow!("--set: {e}"))?;
            if let Some(n) = &name {
                sets.push(
                    format!("name={n}")
                        .parse()
                        .map_err(|e| anyhow::anyhow!("--name: {e}"))?,
                );
            }
            let parsed = DatastoreSpec::from_yaml_with(&file.display().to_string(), &text, &sets)
                .map_err(|e| anyhow::anyhow!("{e}"))
                .context("invalid datastore definition")?;
            for w in &parsed.warnings {
                output::note(format_args!("warning: {w}"));
            }
            let name = parsed.spec.name.clone();
            let info: DatastoreInfo = client
                .call(
                    Method::POST,
                    "/v1/datastores",
                    Some(&DatastoreCreate { spec: parsed.spec }),
                )
                .await
                .with_context(|| format!("cannot create datastore {name}"))?;
            if json {
                print_json(&info)?;
            } else {
                output::println(format_args!(
                    "created datastore {name} ({}, {}); use it as azureml://datastores/{name}/paths/PATH",
                    info.kind, info.location
                ))?;
            }
            Ok(0)
        }
        DatastoreCommand::List => {
            let list: DatastoreList = client
                .call(Method::GET, "/v1/datastores", None::<&()>)
                .await
                .context("cannot list datastores")?;
            if json {
                print_json(&list)?;
            } else {
                let rows: Vec<Vec<String>> = list
                    .datastores
                    .iter()
                    .map(|d| {
                        vec![
                            d.name.clone(),
                            d.kind.clone(),
                            d.location.clone(),
                            if d.is_default {
                                "yes".into()
                            } else {
                                "-".into()
                            },
                        ]
                    })
                    .collect();
                output::print(&table(&["NAME", "TYPE", "LOCATION", "DEFAULT"], &rows))?;
            }
            Ok(0)
        }
        DatastoreCommand::Show(n) => {
            let name = n.get();
            let info: DatastoreInfo = client
                .call(
                    Method::GET,
                    &format!("/v1/datastores/{}", encode(&name)),
                    None::<&()>,
                )
                .await
                .with_context(|| format!("cannot show datastore {name}"))?;
            if json {
                print_json(&info)?;
            } else {
                let mut out = String::new();
                let mut kv = |k: &str, v: String| out.push_str(&format!("{k:<14}{v}\n"));
                kv("name:", info.name.clone());
                kv("type:", info.kind.clone());
                kv("location:", info.location.clone());
                kv("credentials:", info.credentials.clone());
                kv("description:", or_dash(info.description.clone()));
                kv(
                    "default:",
                    if info.is_default { "yes" } else { "no" }.into(),
                );
                kv("uri:", format!("azureml://datastores/{}/paths/", info.name));
                output::print(&out)?;
            }
            Ok(0)
        }
        DatastoreCommand::Delete(n) => {
            let name = n.get();
            client
                .call_text(
                    Method::DELETE,
                    &format!("/v1/datastores/{}", encode(&name)),
                    None::<&()>,
                )
                .await
                .with_context(|| format!("cannot delete datastore {name}"))?;
            if json {
                print_json(&serde_json::json!({ "deleted": name }))?;
            } else {
                output::println(format_args!(
                    "deleted datastore {name} (its data is where it was)"
                ))?;
            }
            Ok(0)
        }
    }
}
