//! Environments through the user API (create, list, show, update, archive,
//! restore), their resolution in submitted jobs, and the agents' builds.

use drover_api::environment::{
    BuildDecision, BuildReport, BuildRequest, BuildState, EnvironmentCreate, EnvironmentInfo,
    EnvironmentList, EnvironmentSource, EnvironmentUpdate, JobEnvironment, build_image_name,
    check_metadata,
};
use drover_api::job::{Code, JobSpec};

use super::{ControlPlane, now};
use crate::server::error::ControlError;
use crate::store::{BuildRowState, Store, StoreError, StoredEnvironment};

/// Which version of an environment a request names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionSelector {
    /// A version.
    Version(String),
    /// The newest created, not archived.
    Latest,
}

/// The image a job runs for an environment version, under the registry
/// prefix when there is one.
fn environment_image(registry: Option<&str>, env: &StoredEnvironment) -> String {
    match &env.spec.source {
        EnvironmentSource::Image { image } => image.clone(),
        EnvironmentSource::Build(b) => {
            build_image_name(registry, Some((&env.spec.name, &env.version)), b).unwrap_or_default()
        }
    }
}

fn build_state(s: &Store, env: &StoredEnvironment, image: &str) -> Result<BuildState, StoreError> {
    if matches!(env.spec.source, EnvironmentSource::Image { .. }) {
        return Ok(BuildState::Ready);
    }
    Ok(match s.image_build(image)? {
        None => BuildState::NotBuilt,
        Some(r) => match r.state {
            BuildRowState::Built => BuildState::Built,
            BuildRowState::Failed => BuildState::Failed {
                reason: r.failure.unwrap_or_default(),
            },
            BuildRowState::Building => BuildState::Building {
                node: r.node.unwrap_or_default(),
            },
        },
    })
}

fn info(
    s: &Store,
    registry: Option<&str>,
    env: StoredEnvironment,
) -> Result<EnvironmentInfo, StoreError> {
    let image = environment_image(registry, &env);
    let build_state = build_state(s, &env, &image)?;
    Ok(EnvironmentInfo {
        name: env.spec.name,
        version: env.version,
        description: env.spec.description,
        tags: env.spec.tags,
        source: env.spec.source,
        conda_file: env.spec.conda_file,
        image,
        build_state,
        archived: env.archived,
        created_at: env.created_at,
    })
}

fn select(s: &Store, name: &str, which: &VersionSelector) -> Result<StoredEnvironment, StoreError> {
    match which {
        VersionSelector::Version(v) => s.environment(name, v),
        VersionSelector::Latest => s.latest_environment(name),
    }
}

/// A node may ask about, and report, only the builds of its own assigned
/// parts' environments: no node can mark another job's image failed.
fn assigned_build(s: &Store, node: &str, image: &str) -> Result<(), StoreError> {
    let assigned = s.assignments(node)?.parts.iter().any(|p| {
        p.spec.as_command().is_some_and(|j| {
            j.image == image && j.environment.as_ref().is_some_and(|e| e.build.is_some())
        })
    });
    if assigned {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "node {node} has no assigned part that builds {image}"
        )))
    }
}

impl ControlPlane {
    fn registry_prefix(&self) -> Option<String> {
        self.config
            .environment_registry
            .as_ref()
            .map(|r| r.prefix.clone())
    }

    /// `POST /v1/environments`: adds a version (the next integer when the
    /// spec names none). A build's context must be uploaded already.
    pub async fn create_environment(
        &self,
        req: EnvironmentCreate,
    ) -> Result<EnvironmentInfo, ControlError> {
        let spec = req.spec;
        if let Err(errors) = spec.validate() {
            return Err(ControlError::Invalid(
                errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
            ));
        }
        if let EnvironmentSource::Build(b) = &spec.source {
            match &b.context {
                Code::Local(p) => {
                    return Err(ControlError::Invalid(format!(
                        "build.path: {} is a folder of the client's machine; upload it (drover environment create does) and send its snapshot",
                        p.display()
                    )));
                }
                Code::Snapshot(blob) => {
                    let artifacts = self.artifacts()?;
                    match artifacts.stat(&blob.digest).await? {
                        Some(size) if size == blob.size => {}
                        _ => {
                            return Err(ControlError::Invalid(format!(
                                "build.path: context {} is not stored; upload it first",
                                blob.digest
                            )));
                        }
                    }
                }
            }
        }
        let registry = self.registry_prefix();
        let env = self
            .with_store(move |s| {
                let env = s.add_environment(&spec, now())?;
                info(s, registry.as_deref(), env)
            })
            .await?;
        tracing::info!(
            environment = %env.name,
            version = %env.version,
            image = %env.image,
            "environment created"
        );
        Ok(env)
    }

    /// `GET /v1/environments`: the newest version of each, or every version
    /// of `name` (archived ones too when asked).
    pub async fn list_environments(
        &self,
        name: Option<String>,
        include_archived: bool,
    ) -> Result<EnvironmentList, ControlError> {
        let registry = self.registry_prefix();
        let environments = self
            .with_store(move |s| {
                let envs = match &name {
                    Some(n) => s.environment_versions(n, include_archived)?,
                    None => s.latest_environments()?,
                };
                envs.into_iter()
                    .map(|e| info(s, registry.as_deref(), e))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await?;
        Ok(EnvironmentList { environments })
    }

    /// `GET /v1/environments/{name}/versions/{version}` (or `…/latest`).
    pub async fn show_environment(
        &self,
        name: String,
        which: VersionSelector,
    ) -> Result<EnvironmentInfo, ControlError> {
        let registry = self.registry_prefix();
        self.with_store(move |s| {
            let env = select(s, &name, &which)?;
            info(s, registry.as_deref(), env)
        })
        .await
    }

    /// `PATCH /v1/environments/{name}/versions/{version}`: description and tags.
    pub async fn update_environment(
        &self,
        name: String,
        version: String,
        update: EnvironmentUpdate,
    ) -> Result<EnvironmentInfo, ControlError> {
        let errors = check_metadata(update.description.as_deref(), &update.tags);
        if !errors.is_empty() {
            return Err(ControlError::Invalid(
                errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
            ));
        }
        let registry = self.registry_prefix();
        self.with_store(move |s| {
            let env = s.update_environment(&name, &version, &update, now())?;
            info(s, registry.as_deref(), env)
        })
        .await
    }

    /// Archives (or restores) a version, or every version of `name`.
    pub async fn archive_environment(
        &self,
        name: String,
        version: Option<String>,
        archived: bool,
    ) -> Result<usize, ControlError> {
        self.with_store(move |s| {
            s.set_environment_archived(&name, version.as_deref(), archived, now())
        })
        .await
    }

    /// Resolves a submitted job's environment: a registered one becomes
    /// its pinned version (`@latest` the newest created, not archived), and
    /// the job's image what that version runs; an inline build gets its
    /// content-named image. What the client sent in their place is
    /// replaced, never trusted. A failed build refuses the job with why.
    pub(super) async fn resolve_environment(&self, spec: &mut JobSpec) -> Result<(), ControlError> {
        let Some(job) = spec.as_command_mut() else {
            return Ok(());
        };
        let Some(env) = job.environment.clone() else {
            return Ok(());
        };
        let registry = self.registry_prefix();
        let (resolved, image, failed) = match &env.name {
            Some(name) => {
                let which = match &env.version {
                    Some(v) => VersionSelector::Version(v.clone()),
                    None => VersionSelector::Latest,
                };
                let name = name.clone();
                let registry = registry.clone();
                self.with_store(move |s| {
                    let stored = match select(s, &name, &which) {
                        Ok(e) => e,
                        Err(StoreError::NotFound { .. }) => {
                            let known: Vec<String> = s
                                .latest_environments()?
                                .into_iter()
                                .map(|e| e.spec.name)
                                .collect();
                            let what = match &which {
                                VersionSelector::Version(v) => format!("{name}:{v}"),
                                VersionSelector::Latest => format!("{name}@latest"),
                            };
                            let hint = if known.is_empty() {
                                "none is registered: drover environment create -f env.yml"
                                    .to_string()
                            } else {
                                format!("known: {}", known.join(", "))
                            };
                            return Err(StoreError::Invalid(format!(
                                "environment: no environment {what} ({hint})"
                            )));
                        }
                        Err(e) => return Err(e),
                    };
                    let image = environment_image(registry.as_deref(), &stored);
                    let state = build_state(s, &stored, &image)?;
                    let build = match &stored.spec.source {
                        EnvironmentSource::Build(b) => Some(b.clone()),
                        EnvironmentSource::Image { .. } => None,
                    };
                    let failed = match state {
                        BuildState::Failed { reason } => Some(reason),
                        _ => None,
                    };
                    Ok((
                        JobEnvironment {
                            name: Some(stored.spec.name.clone()),
                            version: Some(stored.version.clone()),
                            label: env.label.clone(),
                            build,
                        },
                        image,
                        failed,
                    ))
                })
                .await?
            }
            None => {
                let Some(build) = &env.build else {
                    return Err(ControlError::Invalid(
                        "environment: names no registered environment and no build".to_string(),
                    ));
                };
                let Some(image) = build_image_name(registry.as_deref(), None, build) else {
                    return Err(ControlError::Invalid(
                        "environment.build.path: the build context is a folder of the client's machine; upload it and send its snapshot".to_string(),
                    ));
                };
                let lookup = image.clone();
                let failed = self
                    .with_store(move |s| s.image_build(&lookup))
                    .await?
                    .filter(|r| r.state == BuildRowState::Failed)
                    .map(|r| r.failure.unwrap_or_default());
                (
                    JobEnvironment {
                        name: None,
                        version: None,
                        label: None,
                        build: Some(build.clone()),
                    },
                    image,
                    failed,
                )
            }
        };
        if let Some(reason) = failed {
            return Err(ControlError::Invalid(format!(
                "environment {}: its image {image} failed to build, so the job would fail too: {reason} (fix the Dockerfile and create a new version)",
                resolved.describe()
            )));
        }
        job.image = image;
        job.environment = Some(resolved);
        Ok(())
    }

    /// `POST /v1/agent/builds`: may `node` build `image` now?
    pub async fn request_build(
        &self,
        node: String,
        req: BuildRequest,
    ) -> Result<BuildDecision, ControlError> {
        let registry = self.config.environment_registry.is_some();
        let lease = self.config.build_lease;
        let image = req.image;
        let decision = self
            .with_store(move |s| {
                assigned_build(s, &node, &image)?;
                s.request_build(&image, &node, registry, now(), lease)
            })
            .await?;
        Ok(decision)
    }

    /// `POST /v1/agent/builds/report`: how `node`'s build ended.
    pub async fn report_build(
        &self,
        node: String,
        report: BuildReport,
    ) -> Result<(), ControlError> {
        match &report.failure {
            None => tracing::info!(image = %report.image, node = %node, "environment image built"),
            Some(why) => {
                tracing::warn!(image = %report.image, node = %node, reason = %why, "environment image build failed")
            }
        }
        self.with_store(move |s| {
            assigned_build(s, &node, &report.image)?;
            if report.released {
                s.release_build(&report.image, &node)
            } else {
                s.report_build(&report.image, &node, report.failure.as_deref(), now())
            }
        })
        .await?;
        Ok(())
    }
}
