//! `drover environment create|list|show|update|archive|restore`
//! (`az ml environment …`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use drover_api::SetOverride;
use drover_api::environment::{
    BuildState, EnvironmentCreate, EnvironmentInfo, EnvironmentList, EnvironmentSource,
    EnvironmentSpec, EnvironmentUpdate, ImageBuild, conda_dockerfile, conda_env_name,
};
use drover_api::job::Code;
use drover_control::output;
use reqwest::Method;

use super::client::{Client, ClientArgs, encode, print_json};
use super::files::upload_build_context;
use super::output::{or_dash, table};

/// `drover environment …`.
#[derive(clap::Args)]
pub struct EnvironmentArgs {
    #[command(subcommand)]
    command: EnvironmentCommand,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(clap::Subcommand)]
enum EnvironmentCommand {
    /// Register an environment version from Azure ML's environment YAML
    /// (`image:`, `image:` with `conda_file:`, or `build:` with a Docker
    /// context), or from flags. Without a version, it gets the next integer.
    Create {
        /// The environment file.
        #[arg(short = 'f', long = "file")]
        file: Option<PathBuf>,
        /// The name (overrides `name:`).
        #[arg(long, short = 'n')]
        name: Option<String>,
        /// The version (overrides `version:`).
        #[arg(long, short = 'v')]
        version: Option<String>,
        /// The image (overrides `image:`).
        #[arg(long, short = 'i')]
        image: Option<String>,
        /// A Docker build context folder (overrides `build.path`).
        #[arg(long)]
        build_context: Option<PathBuf>,
        /// The Dockerfile inside the build context (default: Dockerfile).
        #[arg(long)]
        dockerfile_path: Option<String>,
        /// A conda environment file to create on top of the image.
        #[arg(long)]
        conda_file: Option<PathBuf>,
        /// Free text.
        #[arg(long, short = 'd')]
        description: Option<String>,
        /// Override a key of the YAML (`--set description=x`), repeatable.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// List environments: the newest version of each, or every version of
    /// one with --name. Archived versions are hidden unless asked for.
    List {
        /// List the versions of this environment.
        #[arg(long, short = 'n')]
        name: Option<String>,
        /// Include archived versions (with --name).
        #[arg(long, requires = "name")]
        include_archived: bool,
    },
    /// Show an environment version (`--label latest` for the newest).
    Show(Selector),
    /// Change a version's description or tags (nothing else changes: a
    /// version is immutable).
    Update {
        #[command(flatten)]
        which: Selector,
        /// A new description.
        #[arg(long, short = 'd')]
        description: Option<String>,
        /// Set a tag (`--set tags.key=value`), repeatable.
        #[arg(long = "set", value_name = "tags.KEY=VALUE")]
        set: Vec<String>,
        /// Remove a tag, repeatable.
        #[arg(long = "remove", value_name = "tags.KEY")]
        remove: Vec<String>,
    },
    /// Archive a version, or every version without --version: hidden from
    /// lists and from @latest, still usable by jobs that pin its version.
    Archive(ArchiveSelector),
    /// Restore archived versions.
    Restore(ArchiveSelector),
}

#[derive(clap::Args)]
struct Selector {
    /// The environment.
    #[arg(long, short = 'n')]
    name: String,
    /// The version.
    #[arg(
        long,
        short = 'v',
        conflicts_with = "label",
        required_unless_present = "label"
    )]
    version: Option<String>,
    /// `latest`.
    #[arg(long, short = 'l')]
    label: Option<String>,
}

impl Selector {
    fn path(&self) -> anyhow::Result<String> {
        let v = match (&self.version, &self.label) {
            (Some(v), _) => v.clone(),
            (None, Some(l)) if l == "latest" => "latest".to_string(),
            (None, Some(l)) => bail!("--label: the only label is latest, not {l}"),
            (None, None) => bail!("give --version or --label latest"),
        };
        Ok(format!(
            "/v1/environments/{}/versions/{}",
            encode(&self.name),
            encode(&v)
        ))
    }
}

#[derive(clap::Args)]
struct ArchiveSelector {
    /// The environment.
    #[arg(long, short = 'n')]
    name: String,
    /// Only this version.
    #[arg(long, short = 'v')]
    version: Option<String>,
}

/// Reads the definition from the file and flags; a conda file becomes a
/// build context (the Dockerfile Azure ML would generate and the file).
fn definition(
    file: Option<&Path>,
    overrides: &Overrides,
) -> anyhow::Result<(EnvironmentSpec, Option<PathBuf>, Option<tempfile::TempDir>)> {
    let (mut spec, conda_path) = match file {
        Some(f) => {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("cannot read {}", f.display()))?;
            let sets = overrides
                .set
                .iter()
                .map(|s| s.parse::<SetOverride>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow::anyhow!("--set: {e}"))?;
            let base = f.parent().unwrap_or(Path::new("."));
            let base = if base.as_os_str().is_empty() {
                Path::new(".")
            } else {
                base
            };
            let parsed =
                EnvironmentSpec::from_yaml_with(&f.display().to_string(), &text, base, &sets)
                    .map_err(|e| anyhow::anyhow!("{e}"))
                    .context("invalid environment definition")?;
            for w in &parsed.warnings {
                output::note(format_args!("warning: {w}"));
            }
            (parsed.spec, parsed.conda_path)
        }
        None => {
            let Some(name) = &overrides.name else {
                bail!("give -f FILE, or --name with --image or --build-context");
            };
            let source = match (&overrides.image, &overrides.build_context) {
                (Some(i), None) => EnvironmentSource::Image { image: i.clone() },
                (None, Some(p)) => EnvironmentSource::Build(ImageBuild {
                    context: Code::Local(p.clone()),
                    dockerfile_path: overrides
                        .dockerfile_path
                        .clone()
                        .unwrap_or_else(|| "Dockerfile".to_string()),
                }),
                _ => bail!("{}", drover_api::environment::IMAGE_OR_BUILD),
            };
            (
                EnvironmentSpec {
                    name: name.clone(),
                    version: None,
                    description: None,
                    tags: BTreeMap::new(),
                    source,
                    conda_file: None,
                },
                None,
            )
        }
    };
    if let Some(n) = &overrides.name {
        spec.name = n.clone();
    }
    if let Some(v) = &overrides.version {
        spec.version = Some(v.clone());
    }
    if let Some(d) = &overrides.description {
        spec.description = Some(d.clone());
    }
    if file.is_some() {
        match (&overrides.image, &overrides.build_context, &mut spec.source) {
            (Some(i), None, EnvironmentSource::Image { image }) => *image = i.clone(),
            (None, Some(p), EnvironmentSource::Build(b)) => b.context = Code::Local(p.clone()),
            (None, None, _) => {}
            _ => bail!("{}", drover_api::environment::IMAGE_OR_BUILD),
        }
    }
    if let (Some(d), EnvironmentSource::Build(b)) = (&overrides.dockerfile_path, &mut spec.source) {
        b.dockerfile_path = d.clone();
    }
    let conda_path = overrides.conda_file.clone().or(conda_path);
    let mut context_dir = None;
    if let Some(conda) = &conda_path {
        let EnvironmentSource::Image { image } = &spec.source else {
            bail!(
                "conda_file goes with image:, not build: (install the conda environment in the Dockerfile)"
            );
        };
        let text = std::fs::read_to_string(conda)
            .with_context(|| format!("conda_file: cannot read {}", conda.display()))?;
        let dir = tempfile::tempdir().context("cannot create a temporary folder")?;
        let file_name = "conda_dependencies.yml";
        std::fs::write(dir.path().join(file_name), &text)
            .context("cannot write the conda file into the build context")?;
        std::fs::write(
            dir.path().join("Dockerfile"),
            conda_dockerfile(image, file_name, &conda_env_name(&text)),
        )
        .context("cannot write the generated Dockerfile")?;
        spec.source = EnvironmentSource::Build(ImageBuild {
            context: Code::Local(dir.path().to_path_buf()),
            dockerfile_path: "Dockerfile".to_string(),
        });
        spec.conda_file = Some(text);
        context_dir = Some(dir);
    }
    if let Err(errors) = spec.validate() {
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        bail!("invalid environment definition: {}", text.join("; "));
    }
    Ok((spec, conda_path, context_dir))
}

struct Overrides {
    name: Option<String>,
    version: Option<String>,
    image: Option<String>,
    build_context: Option<PathBuf>,
    dockerfile_path: Option<String>,
    conda_file: Option<PathBuf>,
    description: Option<String>,
    set: Vec<String>,
}

fn state_text(s: &BuildState) -> String {
    match s {
        BuildState::Failed { reason } => format!("failed: {reason}"),
        BuildState::Building { node } => format!("building on {node}"),
        other => other.word().to_string(),
    }
}

fn print_info(info: &EnvironmentInfo) -> anyhow::Result<()> {
    let mut out = String::new();
    let mut kv = |k: &str, v: String| out.push_str(&format!("{k:<14}{v}\n"));
    kv("name:", info.name.clone());
    kv("version:", info.version.clone());
    kv("image:", info.image.clone());
    match &info.source {
        EnvironmentSource::Image { image } => kv("from:", format!("image {image}")),
        EnvironmentSource::Build(b) => {
            let ctx = match &b.context {
                Code::Snapshot(s) => format!("context {} ({} bytes)", s.digest, s.size),
                Code::Local(p) => format!("context {}", p.display()),
            };
            kv("from:", format!("build: {ctx}, {}", b.dockerfile_path));
        }
    }
    kv("build:", state_text(&info.build_state));
    kv("description:", or_dash(info.description.clone()));
    let tags: Vec<String> = info.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
    kv(
        "tags:",
        if tags.is_empty() {
            "-".into()
        } else {
            tags.join(", ")
        },
    );
    kv("archived:", if info.archived { "yes" } else { "no" }.into());
    kv(
        "use as:",
        format!("environment: azureml:{}:{}", info.name, info.version),
    );
    if let Some(c) = &info.conda_file {
        out.push_str("conda_file:\n");
        for l in c.lines() {
            out.push_str(&format!("  {l}\n"));
        }
    }
    output::print(&out)?;
    Ok(())
}

/// Runs a `drover environment` command.
pub async fn run(args: EnvironmentArgs) -> anyhow::Result<i32> {
    let client = Client::new(&args.client)?;
    let json = args.client.json;
    match args.command {
        EnvironmentCommand::Create {
            file,
            name,
            version,
            image,
            build_context,
            dockerfile_path,
            conda_file,
            description,
            set,
        } => {
            let overrides = Overrides {
                name,
                version,
                image,
                build_context,
                dockerfile_path,
                conda_file,
                description,
                set,
            };
            let (mut spec, _conda, _context_dir) = definition(file.as_deref(), &overrides)?;
            if let EnvironmentSource::Build(b) = &mut spec.source {
                upload_build_context(b, &client.blobs(), "build").await?;
            }
            let name = spec.name.clone();
            let info: EnvironmentInfo = client
                .call(
                    Method::POST,
                    "/v1/environments",
                    Some(&EnvironmentCreate { spec }),
                )
                .await
                .with_context(|| format!("cannot create environment {name}"))?;
            if json {
                print_json(&info)?;
            } else {
                let how = match &info.source {
                    EnvironmentSource::Image { .. } => format!("image {}", info.image),
                    EnvironmentSource::Build(_) => {
                        format!("built on first use as {}", info.image)
                    }
                };
                output::println(format_args!(
                    "created environment {}:{} ({how}); use it as environment: azureml:{}:{} or azureml:{}@latest",
                    info.name, info.version, info.name, info.version, info.name
                ))?;
            }
            Ok(0)
        }
        EnvironmentCommand::List {
            name,
            include_archived,
        } => {
            let path = match &name {
                Some(n) => format!(
                    "/v1/environments/{}?include_archived={include_archived}",
                    encode(n)
                ),
                None => "/v1/environments".to_string(),
            };
            let list: EnvironmentList = client
                .call(Method::GET, &path, None::<&()>)
                .await
                .context("cannot list environments")?;
            if json {
                print_json(&list)?;
            } else {
                let rows: Vec<Vec<String>> = list
                    .environments
                    .iter()
                    .map(|e| {
                        let mut state = e.build_state.word().to_string();
                        if e.archived {
                            state.push_str(", archived");
                        }
                        vec![e.name.clone(), e.version.clone(), e.image.clone(), state]
                    })
                    .collect();
                output::print(&table(&["NAME", "VERSION", "IMAGE", "STATE"], &rows))?;
            }
            Ok(0)
        }
        EnvironmentCommand::Show(which) => {
            let path = which.path()?;
            let info: EnvironmentInfo = client
                .call(Method::GET, &path, None::<&()>)
                .await
                .with_context(|| format!("cannot show environment {}", which.name))?;
            if json {
                print_json(&info)?;
            } else {
                print_info(&info)?;
            }
            Ok(0)
        }
        EnvironmentCommand::Update {
            which,
            description,
            set,
            remove,
        } => {
            let mut update = EnvironmentUpdate {
                description,
                ..Default::default()
            };
            for s in &set {
                let Some((k, v)) = s.split_once('=') else {
                    bail!("--set {s}: expected tags.KEY=VALUE");
                };
                let Some(k) = k.strip_prefix("tags.") else {
                    bail!(
                        "--set {s}: only tags.KEY and --description can change (a version is immutable)"
                    );
                };
                update.tags.insert(k.to_string(), v.to_string());
            }
            for r in &remove {
                update
                    .remove_tags
                    .push(r.strip_prefix("tags.").unwrap_or(r).to_string());
            }
            let path = which.path()?;
            let info: EnvironmentInfo = client
                .call(Method::PATCH, &path, Some(&update))
                .await
                .with_context(|| format!("cannot update environment {}", which.name))?;
            if json {
                print_json(&info)?;
            } else {
                print_info(&info)?;
            }
            Ok(0)
        }
        EnvironmentCommand::Archive(which) => archive(&client, json, which, true).await,
        EnvironmentCommand::Restore(which) => archive(&client, json, which, false).await,
    }
}

async fn archive(
    client: &Client,
    json: bool,
    which: ArchiveSelector,
    archived: bool,
) -> anyhow::Result<i32> {
    let verb = if archived { "archive" } else { "restore" };
    let path = match &which.version {
        Some(v) => format!(
            "/v1/environments/{}/versions/{}/{verb}",
            encode(&which.name),
            encode(v)
        ),
        None => format!("/v1/environments/{}/{verb}", encode(&which.name)),
    };
    let answer: serde_json::Value = client
        .call(Method::POST, &path, None::<&()>)
        .await
        .with_context(|| format!("cannot {verb} environment {}", which.name))?;
    if json {
        print_json(&answer)?;
    } else {
        let what = match &which.version {
            Some(v) => format!("{}:{v}", which.name),
            None => format!("every version of {}", which.name),
        };
        let done = if archived { "archived" } else { "restored" };
        output::println(format_args!("{done} {what}"))?;
    }
    Ok(0)
}
