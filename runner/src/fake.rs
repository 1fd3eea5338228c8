//! An in-memory [`ContainerRuntime`] with scripted behaviour, for testing the
//! logic above the engine (pull limits, timeouts, cancellation, cleanup)
//! without Docker. Real-engine behaviour is covered by the e2e tests.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::{self, BoxStream};
use tokio::sync::watch;

use crate::auth::RegistryAuth;
use crate::runtime::{
    ContainerConfig, ContainerRuntime, ContainerState, ContainerSummary, ExitStatus, LogLine,
    LogStream, PullProgress, RuntimeError,
};

/// How a scripted pull behaves.
#[derive(Debug, Clone)]
pub enum PullScript {
    /// `n` progress messages, `every` apart, then success.
    Progress {
        /// Number of messages.
        n: usize,
        /// Gap between messages.
        every: Duration,
    },
    /// Fails at once with this registry reason.
    Fail(String),
}

/// How a scripted container behaves once started.
#[derive(Debug, Clone)]
pub enum ExitScript {
    /// Exits by itself after a delay.
    After {
        /// Delay.
        delay: Duration,
        /// Exit code.
        code: i64,
        /// Reported as OOM-killed.
        oom: bool,
    },
    /// Runs until stopped.
    UntilStopped,
}

/// What a test can inspect afterwards.
#[derive(Debug, Default, Clone)]
pub struct FakeRecord {
    /// Pulls started.
    pub pulls: usize,
    /// Containers created (configs).
    pub created: Vec<ContainerConfig>,
    /// Ids stopped.
    pub stopped: Vec<String>,
    /// Ids removed.
    pub removed: Vec<String>,
}

struct Container {
    config: ContainerConfig,
    exit: watch::Sender<Option<ExitStatus>>,
    started: bool,
}

/// A scripted runtime.
pub struct FakeRuntime {
    /// Images present from the start.
    pub present: Mutex<Vec<String>>,
    /// Behaviour of pulls.
    pub pull: PullScript,
    /// Behaviour of containers.
    pub exit: ExitScript,
    /// Make `start` fail with this message.
    pub fail_start: Option<String>,
    /// Make `remove` fail with this message.
    pub fail_remove: Option<String>,
    /// Lines every container prints.
    pub log_lines: Vec<String>,
    record: Mutex<FakeRecord>,
    containers: Mutex<HashMap<String, Container>>,
}

/// The time the fake's log lines start at (2026-01-01T00:00:00Z); lines
/// come two per stamp, 100 ms apart (fast output shares timestamps, which
/// log cursors must tell apart).
pub const FAKE_LOG_EPOCH: i64 = 1_767_225_600;

/// The engine timestamp of the fake's log line `i` (RFC 3339, nanoseconds).
pub fn fake_log_timestamp(i: usize) -> String {
    let tenths = (i / 2) as i64;
    let secs = tenths / 10;
    let nanos = (tenths % 10) * 100_000_000;
    format!(
        "2026-01-01T{:02}:{:02}:{:02}.{nanos:09}Z",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

impl FakeRuntime {
    /// A runtime whose pulls and containers follow the given scripts.
    pub fn new(pull: PullScript, exit: ExitScript) -> Self {
        FakeRuntime {
            present: Mutex::new(Vec::new()),
            pull,
            exit,
            fail_start: None,
            fail_remove: None,
            log_lines: vec!["hello".into()],
            record: Mutex::new(FakeRecord::default()),
            containers: Mutex::new(HashMap::new()),
        }
    }

    /// What happened so far.
    pub fn record(&self) -> FakeRecord {
        self.record.lock().map(|r| r.clone()).unwrap_or_default()
    }

    fn with_record(&self, f: impl FnOnce(&mut FakeRecord)) {
        if let Ok(mut r) = self.record.lock() {
            f(&mut r);
        }
    }
}

impl ContainerRuntime for FakeRuntime {
    async fn image_present(&self, image: &str) -> Result<bool, RuntimeError> {
        Ok(self
            .present
            .lock()
            .map(|p| p.iter().any(|i| i == image))
            .unwrap_or(false))
    }

    fn pull(
        &self,
        image: &str,
        _auth: Option<RegistryAuth>,
    ) -> BoxStream<'static, Result<PullProgress, RuntimeError>> {
        self.with_record(|r| r.pulls += 1);
        let image = image.to_string();
        match self.pull.clone() {
            PullScript::Fail(reason) => {
                stream::once(async move { Err(RuntimeError::Registry(reason)) }).boxed()
            }
            PullScript::Progress { n, every } => stream::iter(0..n)
                .then(move |i| {
                    let image = image.clone();
                    async move {
                        tokio::time::sleep(every).await;
                        Ok(PullProgress {
                            image,
                            layer: "layer0".into(),
                            status: "Downloading".into(),
                            current: Some(i as u64),
                            total: Some(n as u64),
                        })
                    }
                })
                .boxed(),
        }
    }

    async fn create(&self, config: &ContainerConfig) -> Result<String, RuntimeError> {
        let id = format!("fake-{}", config.name);
        let mut containers = self
            .containers
            .lock()
            .map_err(|_| RuntimeError::Engine("poisoned".into()))?;
        if containers.contains_key(&id) {
            return Err(RuntimeError::Conflict(format!(
                "name {} in use",
                config.name
            )));
        }
        let (exit, _) = watch::channel(None);
        containers.insert(
            id.clone(),
            Container {
                config: config.clone(),
                exit,
                started: false,
            },
        );
        self.with_record(|r| r.created.push(config.clone()));
        Ok(id)
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        if let Some(msg) = &self.fail_start {
            return Err(RuntimeError::Engine(msg.clone()));
        }
        let mut containers = self
            .containers
            .lock()
            .map_err(|_| RuntimeError::Engine("poisoned".into()))?;
        let c = containers
            .get_mut(id)
            .ok_or_else(|| RuntimeError::NotFound(id.to_string()))?;
        c.started = true;
        if let ExitScript::After { delay, code, oom } = self.exit {
            let exit = c.exit.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                // send_replace: the status must stick even when nobody waits yet.
                exit.send_replace(Some(ExitStatus {
                    code,
                    oom_killed: oom,
                }));
            });
        }
        Ok(())
    }

    fn logs(
        &self,
        _id: &str,
        since_unix_secs: i64,
    ) -> BoxStream<'static, Result<LogLine, RuntimeError>> {
        let lines: Vec<Result<LogLine, RuntimeError>> = self
            .log_lines
            .iter()
            .enumerate()
            .filter(|(i, _)| FAKE_LOG_EPOCH + (*i as i64 / 2) / 10 >= since_unix_secs)
            .map(|(i, l)| {
                Ok(LogLine {
                    stream: LogStream::Stdout,
                    timestamp: fake_log_timestamp(i),
                    text: l.clone(),
                })
            })
            .collect();
        stream::iter(lines).boxed()
    }

    async fn wait(&self, id: &str) -> Result<ExitStatus, RuntimeError> {
        let mut rx = {
            let containers = self
                .containers
                .lock()
                .map_err(|_| RuntimeError::Engine("poisoned".into()))?;
            containers
                .get(id)
                .ok_or_else(|| RuntimeError::NotFound(id.to_string()))?
                .exit
                .subscribe()
        };
        loop {
            if let Some(status) = *rx.borrow() {
                return Ok(status);
            }
            if rx.changed().await.is_err() {
                return Err(RuntimeError::NotFound(id.to_string()));
            }
        }
    }

    async fn stop(&self, id: &str, _grace: Duration) -> Result<(), RuntimeError> {
        self.with_record(|r| r.stopped.push(id.to_string()));
        if let Ok(containers) = self.containers.lock()
            && let Some(c) = containers.get(id)
        {
            c.exit.send_replace(Some(ExitStatus {
                code: 143,
                oom_killed: false,
            }));
        }
        Ok(())
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        if let Some(msg) = &self.fail_remove {
            return Err(RuntimeError::Engine(msg.clone()));
        }
        self.with_record(|r| r.removed.push(id.to_string()));
        if let Ok(mut containers) = self.containers.lock() {
            containers.remove(id);
        }
        Ok(())
    }

    async fn list(
        &self,
        labels: &[(String, String)],
    ) -> Result<Vec<ContainerSummary>, RuntimeError> {
        let containers = self
            .containers
            .lock()
            .map_err(|_| RuntimeError::Engine("poisoned".into()))?;
        Ok(containers
            .iter()
            .filter(|(_, c)| {
                labels
                    .iter()
                    .all(|(k, v)| c.config.labels.get(k) == Some(v))
            })
            .map(|(id, c)| ContainerSummary {
                id: id.clone(),
                name: c.config.name.clone(),
                labels: c.config.labels.clone(),
                state: match (c.started, c.exit.borrow().is_some()) {
                    (false, _) => ContainerState::Created,
                    (true, false) => ContainerState::Running,
                    (true, true) => ContainerState::Exited,
                },
            })
            .collect())
    }
}
