//! Host paths on cluster nodes: a cluster's policy, not a job's wish.
//!
//! A job that binds a host path reaches the node beneath it: the Docker
//! socket is root on the node, `/etc` holds its credentials, the agent's
//! data directory holds the node's control-plane credential. So on a
//! cluster a job may name a host path (in `drover.mounts`, `code`, path
//! inputs, output paths, registry credential files) only under a prefix the
//! cluster's administrator allowed (`drover compute create --allow-host-path
//! /data`; none by default), and never one of [`ALWAYS_REFUSED`] — nor `/`
//! or any folder above them, which would contain them — whatever the policy
//! says. `drover run` (the user's own machine) applies no policy.
//!
//! The checks here are lexical: the control plane cannot see a node's
//! files. The agent, which can, checks again with the real path
//! ([`HostPathPolicy::check`] on the canonicalized path), so a symbolic link
//! under an allowed prefix cannot point outside it.

use std::path::{Component, Path, PathBuf};

use crate::error::FieldError;
use crate::job::{Code, CommandJob, Input, JobSpec, RegistryCredentials, SecretSource};

/// Host folders no job may bind, whatever the cluster allows: the kernel's
/// views (`/proc`, `/sys`, `/dev`), the node's configuration and secrets
/// (`/etc`, `/boot`), runtime state with the Docker socket (`/run`,
/// `/var/run`), the engines' own data, and the agent's default data dir.
pub const ALWAYS_REFUSED: &[&str] = &[
    "/proc",
    "/sys",
    "/dev",
    "/etc",
    "/boot",
    "/run",
    "/var/run",
    "/var/lib/docker",
    "/var/lib/containerd",
    "/var/lib/drover",
    "/var/lib/drover-agent",
];

/// File names of container-engine sockets, refused wherever they are.
const ENGINE_SOCKETS: &[&str] = &[
    "docker.sock",
    "containerd.sock",
    "crio.sock",
    "podman.sock",
    "dockershim.sock",
];

/// Environment variables of the agent that a job's registry credentials
/// may name on a cluster: the node's administrator opts in by this prefix.
pub const REGISTRY_ENV_PREFIX: &str = "DROVER_REGISTRY_";

/// `path` made absolute-and-clean lexically: `.` and repeated or trailing
/// `/` removed. `..` is refused rather than resolved: on a node it could
/// climb out of an allowed prefix through a symbolic link.
pub fn normalize(path: &Path) -> Result<PathBuf, String> {
    if !path.is_absolute() {
        return Err(format!("{} is not an absolute path", path.display()));
    }
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => out.push(part),
            Component::ParentDir => {
                return Err(format!("{} contains `..`", path.display()));
            }
            Component::Prefix(_) => {
                return Err(format!("{} is not a unix path", path.display()));
            }
        }
    }
    Ok(out)
}

/// A prefix as the policy compares it (`/data/` → `/data`); as given when
/// it does not normalize, so that [`check_allowed_prefix`] reports it.
pub fn normalized_prefix(prefix: &str) -> String {
    normalize(Path::new(prefix.trim()))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| prefix.to_string())
}

/// Why a host path may never be bound, if it may not: it is `/`, one of
/// `refused` or under one, a folder above one, or an engine socket.
fn never_allowed(path: &Path, refused: &[PathBuf]) -> Option<String> {
    if path == Path::new("/") {
        return Some("/ is the whole node".to_string());
    }
    if let Some(name) = path.file_name().and_then(|n| n.to_str())
        && ENGINE_SOCKETS.contains(&name)
    {
        return Some(format!(
            "{} is a container engine's socket (root on the node)",
            path.display()
        ));
    }
    for r in refused {
        if path.starts_with(r) {
            return Some(format!("{} is under {}", path.display(), r.display()));
        }
        if r.starts_with(path) {
            return Some(format!("{} contains {}", path.display(), r.display()));
        }
    }
    None
}

/// Checks a prefix an administrator wants to allow on a cluster; returns
/// it normalized.
pub fn check_allowed_prefix(prefix: &str) -> Result<PathBuf, String> {
    let path = normalize(Path::new(prefix.trim()))?;
    let refused = default_refused();
    if let Some(why) = never_allowed(&path, &refused) {
        return Err(format!(
            "{} cannot be allowed: {why}, which no job may bind",
            path.display()
        ));
    }
    Ok(path)
}

fn default_refused() -> Vec<PathBuf> {
    ALWAYS_REFUSED.iter().map(PathBuf::from).collect()
}

/// Which host paths jobs on one cluster may bind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPathPolicy {
    /// The cluster (for messages).
    cluster: String,
    /// Allowed prefixes, normalized.
    allowed: Vec<PathBuf>,
    /// Refused whatever `allowed` says: [`ALWAYS_REFUSED`] plus the data
    /// directories of the control plane and of the cluster's agents.
    refused: Vec<PathBuf>,
}

impl HostPathPolicy {
    /// The policy of `cluster` with these allowed prefixes (as stored in its
    /// spec; ones that do not normalize are ignored, as they were refused
    /// when the cluster was defined).
    pub fn new(cluster: &str, allowed: &[String]) -> Self {
        HostPathPolicy {
            cluster: cluster.to_string(),
            allowed: allowed
                .iter()
                .filter_map(|p| normalize(Path::new(p)).ok())
                .collect(),
            refused: default_refused(),
        }
    }

    /// Also refuses `dir` and everything under and above it (a data
    /// directory of the control plane or of an agent).
    pub fn refuse(mut self, dir: &Path) -> Self {
        if let Ok(dir) = normalize(dir)
            && !self.refused.contains(&dir)
        {
            self.refused.push(dir);
        }
        self
    }

    /// Checks one host path; the message says why it is refused.
    pub fn check(&self, path: &Path) -> Result<(), String> {
        let path = normalize(path)?;
        if let Some(why) = never_allowed(&path, &self.refused) {
            return Err(format!("is never allowed: {why}"));
        }
        if self.allowed.iter().any(|a| path.starts_with(a)) {
            return Ok(());
        }
        let allowed = if self.allowed.is_empty() {
            "none".to_string()
        } else {
            self.allowed
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        Err(format!(
            "{} is not under a host path cluster {} allows (allowed: {allowed}; an administrator adds one with `drover compute create --allow-host-path DIR`)",
            path.display(),
            self.cluster
        ))
    }

    /// Every host path `job` names, checked lexically; one error per
    /// refused path, naming its field.
    pub fn check_job(&self, job: &JobSpec) -> Vec<FieldError> {
        self.check_job_resolved(job, |p| p.to_path_buf())
    }

    /// Like [`HostPathPolicy::check_job`], and each path is also checked as
    /// `resolve` gives it (a node resolves symbolic links: a link under an
    /// allowed prefix may point anywhere).
    pub fn check_job_resolved(
        &self,
        job: &JobSpec,
        resolve: impl Fn(&Path) -> PathBuf,
    ) -> Vec<FieldError> {
        match job {
            JobSpec::Command(c) => self.check_command(c, &resolve),
        }
    }

    fn check_command(
        &self,
        job: &CommandJob,
        resolve: &dyn Fn(&Path) -> PathBuf,
    ) -> Vec<FieldError> {
        let mut errors = Vec::new();
        for (field, path) in host_paths(job) {
            let real = resolve(path);
            let checked = self.check(path).and_then(|()| {
                self.check(&real).map_err(|e| {
                    format!(
                        "{} resolves to {}, which {e}",
                        path.display(),
                        real.display()
                    )
                })
            });
            if let Err(message) = checked {
                let message = match field.as_str() {
                    // Until code is uploaded, a node sees only its own files.
                    "code" => format!(
                        "{message}; the code folder is a path on the submitting machine, which cluster nodes do not see"
                    ),
                    _ => message,
                };
                errors.push(FieldError::new(field, message));
            }
        }
        if let Some(RegistryCredentials::Login {
            password: SecretSource::Env(var),
            ..
        }) = &job.drover.registry_credentials
            && !var.starts_with(REGISTRY_ENV_PREFIX)
        {
            errors.push(FieldError::new(
                "drover.registry_credentials.password_env",
                format!(
                    "`{var}` would be read from the agent's environment on the node; on a cluster only variables named {REGISTRY_ENV_PREFIX}* (set by the node's administrator) may be used"
                ),
            ));
        }
        errors
    }
}

/// The host paths a command job names, with the field that names each.
pub fn host_paths(job: &CommandJob) -> Vec<(String, &Path)> {
    let mut out: Vec<(String, &Path)> = Vec::new();
    if let Some(code) = job.code.as_ref().and_then(Code::local) {
        out.push(("code".to_string(), code));
    }
    for (name, input) in &job.inputs {
        if let Input::Path { path, .. } = input {
            out.push((format!("inputs.{name}.path"), path));
        }
    }
    for (name, output) in &job.outputs {
        if let Some(path) = &output.path {
            out.push((format!("outputs.{name}.path"), path));
        }
    }
    for (i, m) in job.drover.mounts.iter().enumerate() {
        out.push((format!("drover.mounts[{i}].source"), &m.source));
    }
    match &job.drover.registry_credentials {
        Some(RegistryCredentials::DockerConfig(path)) => {
            out.push((
                "drover.registry_credentials.docker_config".to_string(),
                path,
            ));
        }
        Some(RegistryCredentials::Login {
            password: SecretSource::File(path),
            ..
        }) => out.push((
            "drover.registry_credentials.password_file".to_string(),
            path,
        )),
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allowed: &[&str]) -> HostPathPolicy {
        let allowed: Vec<String> = allowed.iter().map(|s| s.to_string()).collect();
        HostPathPolicy::new("cpu", &allowed).refuse(Path::new("/srv/drover-agent"))
    }

    #[test]
    fn paths_are_checked_against_the_policy() {
        let p = policy(&["/data", "/scratch/"]);
        for ok in ["/data", "/data/x", "/data/./x/", "/scratch/a/b"] {
            assert_eq!(p.check(Path::new(ok)), Ok(()), "{ok}");
        }
        for (bad, expect) in [
            ("/", "is never allowed: / is the whole node"),
            ("/etc", "is never allowed: /etc is under /etc"),
            ("/etc/shadow", "is under /etc"),
            ("/var/run/docker.sock", "a container engine's socket"),
            ("/var/run/x", "is under /var/run"),
            ("/data/docker.sock", "a container engine's socket"),
            ("/var", "/var contains /var/run"),
            ("/proc/1/root", "is under /proc"),
            ("/srv/drover-agent/cred.json", "is under /srv/drover-agent"),
            ("/srv", "/srv contains /srv/drover-agent"),
            (
                "/home/u",
                "/home/u is not under a host path cluster cpu allows (allowed: /data, /scratch;",
            ),
            ("/data/../etc", "contains `..`"),
            ("data", "is not an absolute path"),
            ("/database", "is not under a host path"),
        ] {
            let err = p.check(Path::new(bad)).expect_err(bad);
            assert!(err.contains(expect), "{bad}: {err}");
        }
        assert!(
            policy(&[])
                .check(Path::new("/data"))
                .expect_err("nothing allowed")
                .contains("(allowed: none;")
        );
    }

    #[test]
    fn a_link_out_of_an_allowed_prefix_is_refused_where_it_resolves() {
        let job = crate::JobSpec::from_yaml(
            "job.yml",
            "command: x\nimage: y\ndrover:\n  mounts: ['/data/link:/d', '/data/ok:/o']\n",
            Path::new("/jobs"),
        )
        .expect("job")
        .spec;
        let resolve = |p: &Path| {
            if p == Path::new("/data/link") {
                PathBuf::from("/etc")
            } else {
                p.to_path_buf()
            }
        };
        let errors = policy(&["/data"]).check_job_resolved(&job, resolve);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].field, "drover.mounts[0].source");
        assert!(
            errors[0]
                .message
                .starts_with("/data/link resolves to /etc, which is never allowed"),
            "{}",
            errors[0].message
        );
        assert!(policy(&["/data"]).check_job(&job).is_empty());
    }

    #[test]
    fn an_administrator_cannot_allow_what_is_never_allowed() {
        assert_eq!(check_allowed_prefix("/data/"), Ok(PathBuf::from("/data")));
        for bad in ["/", "/etc", "/var", "/run/x", "relative", "/a/../etc"] {
            assert!(check_allowed_prefix(bad).is_err(), "{bad}");
        }
    }
}
