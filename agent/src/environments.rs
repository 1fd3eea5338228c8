//! Environment images on this node: before a part whose job names a build
//! environment starts, its image is made present — found (by the context
//! digest label it was built with), pulled from the control plane's
//! registry, or built here from the uploaded context with the node's Docker
//! engine (and pushed, with a registry, so other nodes pull it instead).
//!
//! The control plane decides who builds ([`BuildDecision`]): without a
//! registry every node builds its own copy; with one, one node builds while
//! the others wait and then pull. Each outcome is an
//! [`EnvironmentEvent`]: one log line and one metric.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use drover_api::environment::{
    BuildDecision, BuildReport, BuildRequest, CONTEXT_LABEL, EnvironmentRegistry,
};
use drover_api::job::{Code, CommandJob};
use drover_runner::ContainerRuntime;
use drover_runner::auth::RegistryAuth;
use drover_runner::runtime::{ImageBuildRequest, RuntimeError};
use futures_util::StreamExt;
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use crate::files::materialize::Materializer;
use crate::metrics::Metrics;
use crate::registry_login::RegistryLogin;
use drover_imds::Identity;

/// How many of a failed build's last lines its error keeps.
const LAST_LINES: usize = 15;

/// How often a node waiting for another's build asks again.
const WAIT_POLL: Duration = Duration::from_secs(2);

/// The label naming the environment version an image was built for.
pub const ENVIRONMENT_LABEL: &str = "drover.environment";

/// Why a part's environment image could not be made present.
#[derive(Debug, thiserror::Error)]
pub enum EnvironmentError {
    /// The job's build context was never uploaded.
    #[error("environment {0}: the build context is not an uploaded snapshot")]
    NotUploaded(String),
    /// The context could not be fetched from the control plane.
    #[error("environment {environment}: cannot fetch its build context: {message}")]
    Context {
        /// The environment.
        environment: String,
        /// What went wrong.
        message: String,
    },
    /// The build failed (here, or on another node before).
    #[error("building environment {environment} ({image}) failed: {reason}")]
    Build {
        /// The environment.
        environment: String,
        /// The image.
        image: String,
        /// The engine's error and the build's last lines.
        reason: String,
    },
    /// The registry refused a push or a pull.
    #[error("environment {environment}: {action} {image} failed: {source}")]
    Registry {
        /// The environment.
        environment: String,
        /// `pushing` or `pulling`.
        action: &'static str,
        /// The image.
        image: String,
        /// The engine's error.
        #[source]
        source: RuntimeError,
    },
    /// The Docker engine failed otherwise.
    #[error("environment {environment}: {source}")]
    Engine {
        /// The environment.
        environment: String,
        /// The engine's error.
        #[source]
        source: RuntimeError,
    },
    /// The control plane could not be asked.
    #[error(
        "environment {environment}: asking the control plane about its build failed: {message}"
    )]
    Control {
        /// The environment.
        environment: String,
        /// What went wrong.
        message: String,
    },
    /// The node could not log in to the registry with its identity.
    #[error("environment {environment}: {message}")]
    RegistryLogin {
        /// The environment.
        environment: String,
        /// Why.
        message: String,
    },
    /// Stopped while waiting.
    #[error("canceled while preparing environment {0}")]
    Canceled(String),
}

/// How a part's environment image came to be present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvironmentOutcome {
    /// The job names no build environment.
    NotNeeded,
    /// The node had it.
    Present,
    /// Built here (and pushed, with a registry).
    Built,
    /// Pulled from the registry after another node built it.
    Pulled,
}

/// A notable step of preparing an environment image: a log line and a metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvironmentEvent {
    /// The image was ready, by whatever way.
    Ready {
        /// The image.
        image: String,
        /// How.
        outcome: EnvironmentOutcome,
        /// Time taken.
        elapsed: Duration,
    },
    /// It could not be made ready.
    Failed {
        /// The image.
        image: String,
        /// Why.
        reason: String,
    },
}

impl EnvironmentEvent {
    /// Logs the event and counts it.
    pub fn emit(&self, metrics: &Metrics) {
        match self {
            EnvironmentEvent::Ready {
                image,
                outcome,
                elapsed,
            } => {
                let outcome = match outcome {
                    EnvironmentOutcome::NotNeeded => return,
                    EnvironmentOutcome::Present => "present",
                    EnvironmentOutcome::Built => "built",
                    EnvironmentOutcome::Pulled => "pulled",
                };
                tracing::info!(image = %image, outcome, elapsed_ms = elapsed.as_millis() as u64, "environment image ready");
                metrics
                    .environment_images
                    .get_or_create(&vec![("outcome".to_string(), outcome.to_string())])
                    .inc();
            }
            EnvironmentEvent::Failed { image, reason } => {
                tracing::warn!(image = %image, reason = %reason, "environment image failed");
                metrics
                    .environment_images
                    .get_or_create(&vec![("outcome".to_string(), "failed".to_string())])
                    .inc();
            }
        }
    }
}

/// What preparing an environment needs from the node.
pub struct EnvironmentContext<'a, R: ContainerRuntime> {
    /// The node's container engine.
    pub runtime: &'a Arc<R>,
    /// Fetches the build context (and reaches the control plane).
    pub materializer: &'a Materializer,
    /// The control plane's registry, when it has one.
    pub registry: Option<&'a EnvironmentRegistry>,
    /// Logs in with the cluster's managed identity, for a registry that
    /// says so ([`EnvironmentRegistry::identity`]).
    pub registry_login: &'a RegistryLogin,
    /// The cluster's identity a registry login uses (its default one).
    pub identity: Option<Identity>,
    /// Lines for the part's log (build output, waits, pushes).
    pub log: UnboundedSender<String>,
    /// Stops a wait or a build.
    pub cancel: &'a CancellationToken,
}

/// The engine's login to the control plane's registry: its user and
/// password, or the cluster's managed identity's refresh token.
async fn registry_auth<R: ContainerRuntime>(
    ctx: &EnvironmentContext<'_, R>,
    r: &EnvironmentRegistry,
    environment: &str,
) -> Result<Option<RegistryAuth>, EnvironmentError> {
    if !r.identity {
        return Ok(match (&r.username, &r.password) {
            (Some(u), Some(p)) => Some(RegistryAuth {
                server: r.host().to_string(),
                username: u.clone(),
                password: p.clone(),
            }),
            _ => None,
        });
    }
    let failed = |message: String| EnvironmentError::RegistryLogin {
        environment: environment.to_string(),
        message,
    };
    let Some(identity) = &ctx.identity else {
        return Err(failed(format!(
            "the control plane's registry {} is logged in to with the cluster's managed identity (--registry-identity), and this cluster has none: give the cluster `identity: {{type: system_assigned}}` or a user-assigned identity",
            r.host()
        )));
    };
    let _ = ctx.log.send(format!(
        "logging in to {} with the cluster's {identity}",
        r.host()
    ));
    ctx.registry_login
        .login(r.host(), identity)
        .await
        .map_err(|e| failed(drover_api::error::chain(&e)))
}

/// Makes the image of `job`'s build environment present on this node (see
/// the module doc). A job without one needs nothing.
pub async fn ensure_environment<R: ContainerRuntime>(
    ctx: &EnvironmentContext<'_, R>,
    job: &CommandJob,
) -> Result<EnvironmentOutcome, EnvironmentError> {
    let Some(env) = &job.environment else {
        return Ok(EnvironmentOutcome::NotNeeded);
    };
    let Some(build) = &env.build else {
        return Ok(EnvironmentOutcome::NotNeeded);
    };
    let what = env.describe();
    let image = job.image.clone();
    let Code::Snapshot(blob) = &build.context else {
        return Err(EnvironmentError::NotUploaded(what));
    };
    let digest = blob.digest.hex();
    let engine = |source| EnvironmentError::Engine {
        environment: what.clone(),
        source,
    };
    if ctx
        .runtime
        .image_label(&image, CONTEXT_LABEL)
        .await
        .map_err(engine)?
        .flatten()
        .as_deref()
        == Some(digest.as_str())
    {
        return Ok(EnvironmentOutcome::Present);
    }
    let registry = ctx.registry.filter(|r| r.holds(&image));
    let client = &ctx.materializer.client;
    let control = |e: crate::control_client::ClientError| EnvironmentError::Control {
        environment: what.clone(),
        message: drover_api::error::chain(&e),
    };
    let mut waited_for: Option<String> = None;
    loop {
        let decision = client
            .request_build(&BuildRequest {
                image: image.clone(),
            })
            .await
            .map_err(control)?;
        match decision {
            BuildDecision::Failed { reason } => {
                return Err(EnvironmentError::Build {
                    environment: what,
                    image,
                    reason,
                });
            }
            BuildDecision::Wait { node } => {
                if waited_for.as_deref() != Some(node.as_str()) {
                    let _ = ctx.log.send(format!(
                        "waiting for node {node} to build environment {what} ({image})"
                    ));
                    waited_for = Some(node);
                }
                tokio::select! {
                    _ = tokio::time::sleep(WAIT_POLL) => continue,
                    _ = ctx.cancel.cancelled() => return Err(EnvironmentError::Canceled(what)),
                }
            }
            BuildDecision::Pull => {
                let auth = match registry {
                    Some(r) => registry_auth(ctx, r, &what).await?,
                    None => None,
                };
                let _ = ctx
                    .log
                    .send(format!("pulling environment {what} from {image}"));
                let mut stream = ctx.runtime.pull(&image, auth);
                while let Some(item) = stream.next().await {
                    if let Err(source) = item {
                        forget_login(ctx, registry);
                        return Err(EnvironmentError::Registry {
                            environment: what,
                            action: "pulling",
                            image,
                            source,
                        });
                    }
                }
                return Ok(EnvironmentOutcome::Pulled);
            }
            BuildDecision::Build => break,
        }
    }
    // This node builds; a registry login that fails does so before the build.
    let auth = match registry {
        Some(r) => match registry_auth(ctx, r, &what).await {
            Ok(auth) => auth,
            Err(e) => {
                let report = BuildReport {
                    image: image.clone(),
                    failure: None,
                    released: true,
                };
                let _ = client.report_build(&report).await;
                return Err(e);
            }
        },
        None => None,
    };
    let tar = ctx
        .materializer
        .blob(*blob)
        .await
        .map_err(|message| EnvironmentError::Context {
            environment: what.clone(),
            message,
        })?;
    let mut labels = BTreeMap::new();
    labels.insert(CONTEXT_LABEL.to_string(), digest);
    if env.name.is_some() {
        labels.insert(ENVIRONMENT_LABEL.to_string(), what.clone());
    }
    let request = ImageBuildRequest {
        tag: image.clone(),
        context_tar: tar,
        dockerfile: build.dockerfile_path.clone(),
        labels,
    };
    let _ = ctx
        .log
        .send(format!("building environment {what} as {image}"));
    let mut last: VecDeque<String> = VecDeque::with_capacity(LAST_LINES);
    let log = ctx.log.clone();
    let mut progress = |line: &str| {
        if last.len() == LAST_LINES {
            last.pop_front();
        }
        last.push_back(line.to_string());
        let _ = log.send(format!("build: {line}"));
    };
    let built = tokio::select! {
        r = ctx.runtime.build_image_from(&request, &mut progress) => r,
        _ = ctx.cancel.cancelled() => {
            let _ = client.report_build(&BuildReport { image: image.clone(), failure: None, released: true }).await;
            return Err(EnvironmentError::Canceled(what));
        }
    };
    if let Err(e) = built {
        let mut reason = e.to_string();
        let tail: Vec<String> = last.into_iter().collect();
        if !tail.is_empty() {
            reason = format!("{reason}; last lines of the build:\n{}", tail.join("\n"));
        }
        let report = BuildReport {
            image: image.clone(),
            failure: Some(reason.clone()),
            released: false,
        };
        if let Err(e) = client.report_build(&report).await {
            tracing::warn!(image = %image, error = %drover_api::error::chain(&e), "cannot report a failed build");
        }
        return Err(EnvironmentError::Build {
            environment: what,
            image,
            reason,
        });
    }
    if registry.is_some() {
        let _ = ctx.log.send(format!("pushing {image}"));
        let log = ctx.log.clone();
        let mut progress = |line: &str| {
            let _ = log.send(format!("push: {line}"));
        };
        if let Err(source) = ctx.runtime.push_image(&image, auth, &mut progress).await {
            forget_login(ctx, registry);
            let report = BuildReport {
                image: image.clone(),
                failure: None,
                released: true,
            };
            let _ = client.report_build(&report).await;
            return Err(EnvironmentError::Registry {
                environment: what,
                action: "pushing",
                image,
                source,
            });
        }
    }
    client
        .report_build(&BuildReport {
            image: image.clone(),
            failure: None,
            released: false,
        })
        .await
        .map_err(control)?;
    Ok(EnvironmentOutcome::Built)
}

/// A registry that refused a pull or a push may have revoked the kept
/// identity login: the next try exchanges a fresh one.
fn forget_login<R: ContainerRuntime>(
    ctx: &EnvironmentContext<'_, R>,
    registry: Option<&EnvironmentRegistry>,
) {
    if let (Some(r), Some(identity)) = (registry.filter(|r| r.identity), &ctx.identity) {
        ctx.registry_login.forget(r.host(), identity);
    }
}

/// Runs [`ensure_environment`] and reports what happened as an event.
pub async fn prepare_environment<R: ContainerRuntime>(
    ctx: &EnvironmentContext<'_, R>,
    job: &CommandJob,
    metrics: &Metrics,
) -> Result<EnvironmentOutcome, EnvironmentError> {
    let started = Instant::now();
    let r = ensure_environment(ctx, job).await;
    let event = match &r {
        Ok(outcome) => EnvironmentEvent::Ready {
            image: job.image.clone(),
            outcome: *outcome,
            elapsed: started.elapsed(),
        },
        Err(e) => EnvironmentEvent::Failed {
            image: job.image.clone(),
            reason: e.to_string(),
        },
    };
    event.emit(metrics);
    r
}
