//! `drover-agent prepull`: pulls images, or pulls or builds registered
//! environments, ahead of any job — while a VM image is baked — and pins
//! them in the agent's image ledger so collection keeps them. The first job
//! that needs one then starts without a pull or a build.
//!
//! Images are pulled with the machine's Docker client logins
//! (`$DOCKER_CONFIG`, else `~/.docker/config.json`). Environments are read
//! from the control plane (`--from-server`, a user token in
//! `DROVER_TOKEN`): an image environment is pulled; a build environment is
//! pulled when its image is in the control plane's registry, else built
//! here from its uploaded context, exactly as a node would build it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, bail};
use clap::Args;
use drover_agent::environments::ENVIRONMENT_LABEL;
use drover_agent::images::ledger::ImageLedger;
use drover_api::environment::{CONTEXT_LABEL, EnvironmentInfo, EnvironmentSource};
use drover_api::job::Code;
use drover_runner::DockerRuntime;
use drover_runner::runtime::{ContainerRuntime, ImageBuildRequest};
use futures_util::StreamExt;
use serde::Deserialize;

/// Arguments of `drover-agent prepull`.
#[derive(Args)]
pub struct PrepullArgs {
    /// An image to pull and pin, repeatable.
    #[arg(long = "image", value_name = "REF")]
    images: Vec<String>,
    /// A registered environment to pull or build and pin (`NAME` for its
    /// latest version, or `NAME:VERSION`), repeatable; needs --from-server.
    #[arg(long = "environment", value_name = "NAME[:VERSION]")]
    environments: Vec<String>,
    /// The control plane the environments are registered with.
    #[arg(long, env = "DROVER_SERVER")]
    from_server: Option<String>,
    /// A user API token of that control plane.
    #[arg(long, env = "DROVER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The agent's config file, for its `data_dir`.
    #[arg(long, env = "DROVER_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// The agent's data dir, where the image ledger is kept.
    #[arg(long, env = "DROVER_AGENT_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

/// The settings of the config file this command reads.
#[derive(Default, Deserialize)]
struct FileConfig {
    data_dir: Option<PathBuf>,
}

/// What to prepull.
enum Item {
    Image(String),
    Environment { name: String, version: String },
}

impl Item {
    fn describe(&self) -> String {
        match self {
            Item::Image(i) => format!("image {i}"),
            Item::Environment { name, version } => format!("environment {name}:{version}"),
        }
    }
}

/// Pulls or builds every item, going on after a failure; fails at the end
/// when any did, naming each.
pub async fn run(args: PrepullArgs) -> anyhow::Result<()> {
    let file: FileConfig = super::read_config(args.config.as_deref())?;
    let data_dir = args
        .data_dir
        .or(file.data_dir)
        .unwrap_or_else(super::run::default_data_dir);
    let mut items: Vec<Item> = args.images.iter().cloned().map(Item::Image).collect();
    for e in &args.environments {
        let (name, version) = match e.split_once(':') {
            Some((n, v)) => (n.to_string(), v.to_string()),
            None => (e.clone(), "latest".to_string()),
        };
        drover_api::environment::check_name(&name)
            .map_err(|m| anyhow::anyhow!("--environment {e}: {m}"))?;
        if version != "latest" {
            drover_api::environment::check_version(&version)
                .map_err(|m| anyhow::anyhow!("--environment {e}: {m}"))?;
        }
        items.push(Item::Environment { name, version });
    }
    if items.is_empty() {
        bail!("nothing to prepull: give --image REF or --environment NAME[:VERSION]");
    }
    if !args.environments.is_empty() && args.from_server.is_none() {
        bail!("--environment needs --from-server URL (the control plane it is registered with)");
    }
    let ledger = ImageLedger::open(&data_dir)
        .with_context(|| format!("opening the image ledger in {}", data_dir.display()))?;
    let docker = Arc::new(
        DockerRuntime::connect()
            .await
            .context("prepull needs the node's Docker engine")?,
    );
    let server = args
        .from_server
        .as_deref()
        .map(|url| Server::new(url, args.token.clone().unwrap_or_default()))
        .transpose()?;
    let mut failed = Vec::new();
    for item in &items {
        let r = match item {
            Item::Image(image) => pull(&docker, image).await.map(|()| image.clone()),
            Item::Environment { name, version } => match &server {
                Some(s) => environment(&docker, s, name, version, &data_dir).await,
                None => Err(anyhow::anyhow!("no --from-server")),
            },
        };
        match r {
            Ok(image) => {
                ledger
                    .pin(&image, now_ms())
                    .with_context(|| format!("pinning {image} in the image ledger"))?;
                tracing::info!(item = %item.describe(), image = %image, "prepulled and pinned");
                eprintln!("prepull: {} ready as {image} (pinned)", item.describe());
            }
            Err(e) => {
                eprintln!("prepull: {} failed: {e:#}", item.describe());
                failed.push(item.describe());
            }
        }
    }
    if !failed.is_empty() {
        bail!("prepull failed for {}", failed.join(", "));
    }
    Ok(())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Pulls `image` with the Docker client's login for its registry,
/// printing each layer's progress as it changes.
async fn pull(docker: &DockerRuntime, image: &str) -> anyhow::Result<()> {
    let auth = drover_runner::auth::resolve(image, None)
        .with_context(|| format!("reading the registry login for {image}"))?;
    eprintln!("prepull: pulling {image}");
    let mut stream = docker.pull(image, auth);
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    while let Some(item) = stream.next().await {
        let p = item.with_context(|| format!("pulling {image}"))?;
        if p.layer.is_empty() {
            continue;
        }
        if last.get(&p.layer) != Some(&p.status) {
            eprintln!("prepull: {image}: layer {} {}", p.layer, p.status);
            last.insert(p.layer.clone(), p.status.clone());
        }
    }
    Ok(())
}

/// The control plane's user API, as far as prepull needs it.
struct Server {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Server {
    fn new(url: &str, token: String) -> anyhow::Result<Server> {
        let http = reqwest::Client::builder()
            .build()
            .context("setting up the http client")?;
        Ok(Server {
            base: url.trim_end_matches('/').to_string(),
            token,
            http,
        })
    }

    async fn environment(&self, name: &str, version: &str) -> anyhow::Result<EnvironmentInfo> {
        let url = format!("{}/v1/environments/{name}/versions/{version}", self.base);
        let resp = self
            .http
            .get(&url)
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("asking {} for environment {name}:{version}", self.base))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            let message = serde_json::from_str::<drover_api::wire::ErrorBody>(&text)
                .map(|b| b.error.message)
                .unwrap_or(text);
            bail!("{} answered {status}: {message}", self.base);
        }
        serde_json::from_str(&text).with_context(|| format!("reading the answer of {url}"))
    }

    fn blobs(&self) -> drover_files::BlobClient {
        drover_files::BlobClient::new(
            self.http.clone(),
            &self.base,
            drover_files::BlobRoutes::User,
            self.token.clone(),
        )
    }
}

/// Pulls or builds an environment's image; returns its name.
async fn environment(
    docker: &DockerRuntime,
    server: &Server,
    name: &str,
    version: &str,
    data_dir: &Path,
) -> anyhow::Result<String> {
    let info = server.environment(name, version).await?;
    let what = format!("{}:{}", info.name, info.version);
    let build = match &info.source {
        EnvironmentSource::Image { .. } => {
            pull(docker, &info.image).await?;
            return Ok(info.image);
        }
        EnvironmentSource::Build(b) => b,
    };
    let Code::Snapshot(blob) = &build.context else {
        bail!("environment {what} has no uploaded build context");
    };
    let digest = blob.digest.hex();
    if docker
        .image_label(&info.image, CONTEXT_LABEL)
        .await?
        .flatten()
        .as_deref()
        == Some(digest.as_str())
    {
        eprintln!("prepull: {} is already here", info.image);
        return Ok(info.image);
    }
    // Built for the registry by a node already: pull it.
    if matches!(info.build_state, drover_api::environment::BuildState::Built)
        && !info
            .image
            .starts_with(drover_api::environment::BUILD_REPOSITORY)
    {
        match pull(docker, &info.image).await {
            Ok(()) => return Ok(info.image),
            Err(e) => eprintln!(
                "prepull: pulling {} failed ({e:#}); building it here",
                info.image
            ),
        }
    }
    let dir = data_dir.join("cache").join("prepull");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let tar = dir.join(format!("{digest}.tar"));
    server
        .blobs()
        .download_to(*blob, &tar, &|_| {})
        .await
        .with_context(|| format!("fetching the build context of {what}"))?;
    let mut labels = BTreeMap::new();
    labels.insert(CONTEXT_LABEL.to_string(), digest);
    labels.insert(ENVIRONMENT_LABEL.to_string(), what.clone());
    let request = ImageBuildRequest {
        tag: info.image.clone(),
        context_tar: tar.clone(),
        dockerfile: build.dockerfile_path.clone(),
        labels,
    };
    eprintln!("prepull: building environment {what} as {}", info.image);
    let mut progress = |line: &str| eprintln!("prepull: build: {line}");
    let built = docker.build_image_from(&request, &mut progress).await;
    let _ = std::fs::remove_file(&tar);
    built.with_context(|| format!("building environment {what}"))?;
    Ok(info.image)
}
