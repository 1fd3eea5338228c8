//! Image pulls: shared between parts, bounded in time, with progress.
//!
//! Two parts that need one image cause one pull: the first caller starts a
//! pull task, later callers join it and receive its progress and its result.
//! The task runs detached, so a caller that gives up does not cancel the pull
//! for the others. Two limits apply: a total time, and a time without any
//! progress message — a multi-GB pull can legitimately take long, but a pull
//! that says nothing for minutes is stuck.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_api::job::PullPolicy;
use futures_util::StreamExt;
use tokio::sync::{broadcast, mpsc, watch};

use crate::auth::RegistryAuth;
use crate::runtime::{ContainerRuntime, PullProgress, RuntimeError};

/// Time limits of one pull.
#[derive(Debug, Clone, Copy)]
pub struct PullLimits {
    /// The whole pull.
    pub total: Duration,
    /// Longest silence between two progress messages.
    pub no_progress: Duration,
}

impl Default for PullLimits {
    fn default() -> Self {
        PullLimits {
            total: Duration::from_secs(60 * 60),
            no_progress: Duration::from_secs(5 * 60),
        }
    }
}

/// Why an image is not available.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PullError {
    /// `pull_policy: never` and the image is not on the node.
    #[error("image {image} is not present and pull_policy is never")]
    NotPresent {
        /// The image.
        image: String,
    },
    /// The registry (or the engine talking to it) refused; its reason verbatim.
    #[error("pulling {image} failed: {reason}")]
    Registry {
        /// The image.
        image: String,
        /// The registry's reason.
        reason: String,
    },
    /// The pull took longer than the total limit.
    #[error("pulling {image} took longer than {limit:?}")]
    Timeout {
        /// The image.
        image: String,
        /// The limit.
        limit: Duration,
    },
    /// No progress for the no-progress limit.
    #[error("pulling {image} made no progress for {limit:?}")]
    Stalled {
        /// The image.
        image: String,
        /// The limit.
        limit: Duration,
    },
    /// The container engine failed.
    #[error("container engine error while pulling {image}: {reason}")]
    Engine {
        /// The image.
        image: String,
        /// The engine's message.
        reason: String,
    },
}

type PullResult = Option<Result<(), PullError>>;

struct InFlight {
    progress: broadcast::Sender<PullProgress>,
    done: watch::Receiver<PullResult>,
}

/// Pulls images through a [`ContainerRuntime`], sharing concurrent pulls of one image.
pub struct ImagePuller<R: ContainerRuntime> {
    runtime: Arc<R>,
    limits: PullLimits,
    in_flight: Arc<Mutex<HashMap<String, InFlight>>>,
}

impl<R: ContainerRuntime> ImagePuller<R> {
    /// A puller over `runtime`.
    pub fn new(runtime: Arc<R>, limits: PullLimits) -> Self {
        ImagePuller {
            runtime,
            limits,
            in_flight: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The images being pulled now.
    pub fn in_flight(&self) -> Vec<String> {
        self.in_flight
            .lock()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Makes `image` available according to `policy`, forwarding progress to
    /// `progress` (if given) until it is.
    pub async fn ensure(
        &self,
        image: &str,
        policy: PullPolicy,
        auth: Option<RegistryAuth>,
        progress: Option<mpsc::Sender<PullProgress>>,
    ) -> Result<(), PullError> {
        let engine = |e: RuntimeError| PullError::Engine {
            image: image.to_string(),
            reason: e.to_string(),
        };
        match policy {
            PullPolicy::Always => {}
            PullPolicy::IfNotPresent => {
                if self.runtime.image_present(image).await.map_err(engine)? {
                    return Ok(());
                }
            }
            PullPolicy::Never => {
                return if self.runtime.image_present(image).await.map_err(engine)? {
                    Ok(())
                } else {
                    Err(PullError::NotPresent {
                        image: image.to_string(),
                    })
                };
            }
        }
        let (mut progress_rx, mut done) = self.join_or_start(image, auth);
        loop {
            tokio::select! {
                changed = done.changed() => {
                    if changed.is_err() {
                        // The task ended without a result: only a panic does that.
                        return Err(PullError::Engine {
                            image: image.to_string(),
                            reason: "pull task ended unexpectedly".into(),
                        });
                    }
                    let finished = done.borrow().clone();
                    if let Some(result) = finished {
                        // Deliver what was sent before the result, so callers see the last layer finish.
                        while let Ok(p) = progress_rx.try_recv() {
                            if let Some(tx) = &progress {
                                let _ = tx.try_send(p);
                            }
                        }
                        return result;
                    }
                }
                msg = progress_rx.recv() => {
                    if let (Ok(p), Some(tx)) = (msg, &progress) {
                        let _ = tx.try_send(p);
                    }
                }
            }
        }
    }

    fn join_or_start(
        &self,
        image: &str,
        auth: Option<RegistryAuth>,
    ) -> (
        broadcast::Receiver<PullProgress>,
        watch::Receiver<PullResult>,
    ) {
        let mut map = self
            .in_flight
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(f) = map.get(image) {
            tracing::debug!(image, "joining pull in flight");
            return (f.progress.subscribe(), f.done.clone());
        }
        let (progress_tx, progress_rx) = broadcast::channel(256);
        let (done_tx, done_rx) = watch::channel(None);
        map.insert(
            image.to_string(),
            InFlight {
                progress: progress_tx.clone(),
                done: done_rx.clone(),
            },
        );
        drop(map);

        let runtime = self.runtime.clone();
        let limits = self.limits;
        let in_flight = self.in_flight.clone();
        let image = image.to_string();
        tokio::spawn(async move {
            tracing::info!(image = %image, "pull started");
            let started = std::time::Instant::now();
            let result = pull_with_limits(&*runtime, &image, auth, limits, &progress_tx).await;
            match &result {
                Ok(()) => {
                    tracing::info!(image = %image, elapsed_ms = started.elapsed().as_millis() as u64, "pull finished")
                }
                Err(e) => tracing::warn!(image = %image, error = %e, "pull failed"),
            }
            // Remove before publishing, so a caller arriving after a failure starts afresh.
            in_flight
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .remove(&image);
            let _ = done_tx.send(Some(result));
        });
        (progress_rx, done_rx)
    }
}

async fn pull_with_limits<R: ContainerRuntime>(
    runtime: &R,
    image: &str,
    auth: Option<RegistryAuth>,
    limits: PullLimits,
    progress: &broadcast::Sender<PullProgress>,
) -> Result<(), PullError> {
    let mut stream = runtime.pull(image, auth);
    let work = async {
        loop {
            match tokio::time::timeout(limits.no_progress, stream.next()).await {
                Err(_) => {
                    return Err(PullError::Stalled {
                        image: image.to_string(),
                        limit: limits.no_progress,
                    });
                }
                Ok(None) => return Ok(()),
                Ok(Some(Ok(p))) => {
                    let _ = progress.send(p);
                }
                Ok(Some(Err(RuntimeError::Registry(reason)))) => {
                    return Err(PullError::Registry {
                        image: image.to_string(),
                        reason,
                    });
                }
                Ok(Some(Err(e))) => {
                    return Err(PullError::Engine {
                        image: image.to_string(),
                        reason: e.to_string(),
                    });
                }
            }
        }
    };
    match tokio::time::timeout(limits.total, work).await {
        Ok(r) => r,
        Err(_) => Err(PullError::Timeout {
            image: image.to_string(),
            limit: limits.total,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{ExitScript, FakeRuntime, PullScript};

    fn puller(
        pull: PullScript,
        limits: PullLimits,
    ) -> (Arc<FakeRuntime>, ImagePuller<FakeRuntime>) {
        let rt = Arc::new(FakeRuntime::new(pull, ExitScript::UntilStopped));
        (rt.clone(), ImagePuller::new(rt, limits))
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_pull_is_stalled_not_waited_for_forever() {
        let limits = PullLimits {
            total: Duration::from_secs(3600),
            no_progress: Duration::from_secs(60),
        };
        let (_, p) = puller(
            PullScript::Progress {
                n: 3,
                every: Duration::from_secs(120),
            },
            limits,
        );
        let err = p
            .ensure("img:1", PullPolicy::Always, None, None)
            .await
            .unwrap_err();
        assert_eq!(
            err,
            PullError::Stalled {
                image: "img:1".into(),
                limit: Duration::from_secs(60)
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_steady_but_endless_pull_hits_the_total_limit() {
        let limits = PullLimits {
            total: Duration::from_secs(100),
            no_progress: Duration::from_secs(60),
        };
        let (_, p) = puller(
            PullScript::Progress {
                n: 1000,
                every: Duration::from_secs(1),
            },
            limits,
        );
        let err = p
            .ensure("img:1", PullPolicy::Always, None, None)
            .await
            .unwrap_err();
        assert!(matches!(err, PullError::Timeout { .. }), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn progress_reaches_every_joined_caller_and_one_pull_runs() {
        let (rt, p) = puller(
            PullScript::Progress {
                n: 5,
                every: Duration::from_millis(100),
            },
            PullLimits::default(),
        );
        let (tx1, mut rx1) = mpsc::channel(64);
        let (tx2, mut rx2) = mpsc::channel(64);
        let (a, b) = tokio::join!(
            p.ensure("img:1", PullPolicy::IfNotPresent, None, Some(tx1)),
            p.ensure("img:1", PullPolicy::IfNotPresent, None, Some(tx2)),
        );
        a.unwrap();
        b.unwrap();
        assert_eq!(rt.record().pulls, 1);
        let mut n1 = 0;
        while rx1.try_recv().is_ok() {
            n1 += 1;
        }
        let mut n2 = 0;
        while rx2.try_recv().is_ok() {
            n2 += 1;
        }
        assert_eq!((n1, n2), (5, 5));
    }

    #[tokio::test]
    async fn registry_reasons_are_kept_and_present_images_are_not_pulled() {
        let (rt, p) = puller(
            PullScript::Fail("unauthorized: authentication required".into()),
            PullLimits::default(),
        );
        let err = p
            .ensure("r/x:1", PullPolicy::Always, None, None)
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "pulling r/x:1 failed: unauthorized: authentication required"
        );
        rt.present.lock().unwrap().push("r/x:1".into());
        p.ensure("r/x:1", PullPolicy::IfNotPresent, None, None)
            .await
            .unwrap();
        p.ensure("r/x:1", PullPolicy::Never, None, None)
            .await
            .unwrap();
        assert_eq!(rt.record().pulls, 1);
        let err = p
            .ensure("r/y:1", PullPolicy::Never, None, None)
            .await
            .unwrap_err();
        assert!(matches!(err, PullError::NotPresent { .. }));
    }
}
