//! Registry credentials: from the job's `drover.registry_credentials`, or from
//! the Docker client configuration (`~/.docker/config.json`) like `docker pull`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use drover_api::job::{RegistryCredentials, SecretSource};
use serde::Deserialize;

/// A resolved registry login. `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryAuth {
    /// Registry host (`127.0.0.1:5000`, `docker.io`).
    pub server: String,
    /// User name.
    pub username: String,
    /// Password or token.
    pub password: String,
}

impl fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryAuth")
            .field("server", &self.server)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Why credentials could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A password or config file could not be read.
    #[error("cannot read registry credentials from {path}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A password environment variable is not set.
    #[error("registry password variable {0} is not set")]
    MissingEnv(String),
    /// A credential helper failed.
    #[error("credential helper {helper} failed: {reason}")]
    Helper {
        /// Helper name (`desktop`, `ecr-login`, …).
        helper: String,
        /// What went wrong (never the secret).
        reason: String,
    },
    /// A Docker config file is not valid.
    #[error("{path} is not a valid docker config: {reason}")]
    BadConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The registry host of an image reference, as Docker decides it: the first
/// path component when it has a `.` or `:` or is `localhost`, else Docker Hub.
pub fn registry_of(image: &str) -> &str {
    match image.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            first
        }
        _ => "docker.io",
    }
}

#[derive(Deserialize)]
struct DockerConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, DockerConfigAuth>,
    /// Default credential helper (`docker-credential-<name>`).
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    /// Per-registry credential helpers.
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct HelperAnswer {
    #[serde(rename = "Username")]
    username: String,
    #[serde(rename = "Secret")]
    secret: String,
}

/// The server name a credential helper is asked for: Docker Hub's historical URL, else the host.
fn helper_server(registry: &str) -> &str {
    if registry == "docker.io" {
        "https://index.docker.io/v1/"
    } else {
        registry
    }
}

/// Asks `docker-credential-<helper> get` (found in `helper_dir`, else on
/// `PATH`) for `registry`, the way the Docker CLI does. A helper that knows
/// no credentials for it answers `None`.
fn from_helper(
    helper: &str,
    registry: &str,
    helper_dir: Option<&Path>,
) -> Result<Option<RegistryAuth>, AuthError> {
    use std::io::Write;
    let program = format!("docker-credential-{helper}");
    let program = match helper_dir {
        Some(dir) => dir.join(program),
        None => PathBuf::from(program),
    };
    let failed = |reason: String| AuthError::Helper {
        helper: helper.to_string(),
        reason,
    };
    let mut child = std::process::Command::new(&program)
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| failed(format!("cannot run {}: {e}", program.display())))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(helper_server(registry).as_bytes())
            .map_err(|e| failed(e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| failed(e.to_string()))?;
    if !out.status.success() {
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        if text.contains("credentials not found") {
            return Ok(None);
        }
        return Err(failed(text.trim().to_string()));
    }
    let answer: HelperAnswer = serde_json::from_slice(&out.stdout)
        .map_err(|e| failed(format!("unreadable answer: {e}")))?;
    Ok(Some(RegistryAuth {
        server: registry.to_string(),
        username: answer.username,
        password: answer.secret,
    }))
}

#[derive(Deserialize)]
struct DockerConfigAuth {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// Hub's historical key names in `config.json`.
fn same_registry(key: &str, registry: &str) -> bool {
    let strip = |s: &str| {
        s.trim_start_matches("https://")
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .trim_end_matches("/v1")
            .trim_end_matches("/v2")
            .to_string()
    };
    let k = strip(key);
    let hub = ["docker.io", "index.docker.io", "registry-1.docker.io"];
    k == registry || (hub.contains(&registry) && hub.contains(&k.as_str()))
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut buf = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace()) {
        if c == b'=' {
            break;
        }
        let v = ALPHABET.iter().position(|a| *a == c)? as u32;
        buf = (buf << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
            buf &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// Reads the login for `registry` from a Docker `config.json`; `Ok(None)`
/// when the file does not exist or has no entry for it. Like the Docker CLI,
/// a per-registry `credHelpers` entry wins, then `credsStore`, then `auths`.
pub fn from_docker_config(path: &Path, registry: &str) -> Result<Option<RegistryAuth>, AuthError> {
    from_docker_config_with(path, registry, None)
}

fn from_docker_config_with(
    path: &Path,
    registry: &str,
    helper_dir: Option<&Path>,
) -> Result<Option<RegistryAuth>, AuthError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(AuthError::ReadFile {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let bad = |reason: String| AuthError::BadConfig {
        path: path.to_path_buf(),
        reason,
    };
    let cfg: DockerConfigFile = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let helper = cfg
        .cred_helpers
        .iter()
        .find(|(k, _)| same_registry(k, registry))
        .map(|(_, v)| v.clone())
        .or(cfg.creds_store.clone());
    if let Some(helper) = helper
        && let Some(auth) = from_helper(&helper, registry, helper_dir)?
    {
        return Ok(Some(auth));
    }
    for (key, entry) in cfg.auths {
        if !same_registry(&key, registry) {
            continue;
        }
        if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
            return Ok(Some(RegistryAuth {
                server: registry.to_string(),
                username: u.clone(),
                password: p.clone(),
            }));
        }
        if let Some(auth) = entry.auth {
            let decoded = decode_base64(&auth)
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| bad(format!("auths.{key}.auth is not base64 user:password")))?;
            let (u, p) = decoded
                .split_once(':')
                .ok_or_else(|| bad(format!("auths.{key}.auth is not user:password")))?;
            return Ok(Some(RegistryAuth {
                server: registry.to_string(),
                username: u.to_string(),
                password: p.to_string(),
            }));
        }
    }
    Ok(None)
}

/// The default Docker client config: `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`.
pub fn default_docker_config() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// Resolves the login to pull `image`: the job's credentials when it has
/// some, else the machine's Docker config, else anonymous (`None`).
pub fn resolve(
    image: &str,
    job: Option<&RegistryCredentials>,
) -> Result<Option<RegistryAuth>, AuthError> {
    let registry = registry_of(image);
    match job {
        Some(RegistryCredentials::DockerConfig(path)) => from_docker_config(path, registry),
        Some(RegistryCredentials::Login {
            registry: server,
            username,
            password,
        }) => {
            let password = match password {
                SecretSource::Env(var) => {
                    std::env::var(var).map_err(|_| AuthError::MissingEnv(var.clone()))?
                }
                SecretSource::File(path) => std::fs::read_to_string(path)
                    .map_err(|source| AuthError::ReadFile {
                        path: path.clone(),
                        source,
                    })?
                    .trim_end_matches(['\n', '\r'])
                    .to_string(),
            };
            Ok(Some(RegistryAuth {
                server: server.clone().unwrap_or_else(|| registry.to_string()),
                username: username.clone(),
                password,
            }))
        }
        None => match default_docker_config() {
            Some(path) => from_docker_config(&path, registry),
            None => Ok(None),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_host_follows_docker_rules() {
        assert_eq!(registry_of("ubuntu"), "docker.io");
        assert_eq!(registry_of("library/ubuntu:22.04"), "docker.io");
        assert_eq!(registry_of("127.0.0.1:5000/x/y:1"), "127.0.0.1:5000");
        assert_eq!(registry_of("localhost/x"), "localhost");
        assert_eq!(registry_of("myacr.azurecr.io/train:1"), "myacr.azurecr.io");
    }

    #[test]
    fn docker_config_auth_is_decoded_and_debug_redacts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        // "alice:s3cret" in base64.
        std::fs::write(
            &path,
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"YWxpY2U6czNjcmV0"},
                "127.0.0.1:5000":{"auth":"Ym9iOnB3"}}}"#,
        )
        .unwrap();
        let hub = from_docker_config(&path, "docker.io").unwrap().unwrap();
        assert_eq!(hub.username, "alice");
        assert_eq!(hub.password, "s3cret");
        assert!(!format!("{hub:?}").contains("s3cret"));
        let local = from_docker_config(&path, "127.0.0.1:5000")
            .unwrap()
            .unwrap();
        assert_eq!(
            (local.username.as_str(), local.password.as_str()),
            ("bob", "pw")
        );
        assert!(from_docker_config(&path, "other:1").unwrap().is_none());
        assert!(
            from_docker_config(&dir.path().join("missing.json"), "x")
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn credential_helpers_are_asked_like_the_docker_cli_does() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let helper = dir.path().join("docker-credential-drovertest");
        // Answers for 127.0.0.1:5000 only; records what it was asked.
        std::fs::write(
            &helper,
            format!(
                "#!/bin/sh\nread server\necho \"$server\" > {}/asked\nif [ \"$server\" = 127.0.0.1:5000 ]; then echo '{{\"ServerURL\":\"127.0.0.1:5000\",\"Username\":\"h-user\",\"Secret\":\"h-secret\"}}'; else echo 'credentials not found in native keychain'; exit 1; fi\n",
                dir.path().display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let cfg = dir.path().join("config.json");
        std::fs::write(
            &cfg,
            r#"{"credsStore":"drovertest","auths":{"https://index.docker.io/v1/":{"auth":"YWxpY2U6czNjcmV0"}}}"#,
        )
        .unwrap();
        let got = from_docker_config_with(&cfg, "127.0.0.1:5000", Some(dir.path()))
            .unwrap()
            .unwrap();
        assert_eq!(
            (got.username.as_str(), got.password.as_str()),
            ("h-user", "h-secret")
        );
        // Not in the helper: falls back to auths (Hub is asked by its historical URL).
        let hub = from_docker_config_with(&cfg, "docker.io", Some(dir.path()))
            .unwrap()
            .unwrap();
        assert_eq!(hub.username, "alice");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("asked"))
                .unwrap()
                .trim(),
            "https://index.docker.io/v1/"
        );
        // A helper that cannot run is a clear error.
        std::fs::write(&cfg, r#"{"credHelpers":{"r.io":"absent"}}"#).unwrap();
        let err = from_docker_config_with(&cfg, "r.io", Some(dir.path())).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("credential helper absent failed: cannot run"),
            "{err}"
        );
    }

    #[test]
    fn job_password_file_and_missing_env() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "hunter2\n").unwrap();
        let creds = RegistryCredentials::Login {
            registry: None,
            username: "u".into(),
            password: SecretSource::File(pw),
        };
        let auth = resolve("127.0.0.1:5000/a:1", Some(&creds))
            .unwrap()
            .unwrap();
        assert_eq!(auth.server, "127.0.0.1:5000");
        assert_eq!(auth.password, "hunter2");
        let creds = RegistryCredentials::Login {
            registry: None,
            username: "u".into(),
            password: SecretSource::Env("DROVER_TEST_SURELY_UNSET".into()),
        };
        let err = resolve("a:1", Some(&creds)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "registry password variable DROVER_TEST_SURELY_UNSET is not set"
        );
    }
}
