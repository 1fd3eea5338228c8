//! The join settings of a node baked without them: which control plane and
//! cluster it joins, and the join token. On a VM made from Drover's image
//! (`images/vm/`) they arrive at first boot, never in the image: in a TOML
//! file that cloud-init writes from the VM's custom data (`--join-file`,
//! `/etc/drover/join.toml`), or as the same TOML in the VM's IMDS user data
//! (`--join-from-user-data`).
//!
//! ```toml
//! server = "http://10.0.0.4:7340"
//! cluster = "gpu"
//! join_token = "…"
//! ```
//!
//! Parsing is pure: [`JoinSettings::parse`] and
//! [`JoinSettings::from_user_data`] never log, and their errors never quote
//! the text, which holds the token.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// What a node needs to join a cluster; each may be missing (another source
/// gives it).
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinSettings {
    /// The control plane's URL.
    pub server: Option<String>,
    /// The cluster to join.
    pub cluster: Option<String>,
    /// The cluster's join token.
    pub join_token: Option<String>,
}

impl std::fmt::Debug for JoinSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinSettings")
            .field("server", &self.server)
            .field("cluster", &self.cluster)
            .field(
                "join_token",
                &self.join_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// Why join settings could not be read. No variant carries the text read:
/// it holds the join token.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The join file exists but could not be read.
    #[error("reading the join settings from {} failed", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not UTF-8 text.
    #[error("the join settings in {origin} are not UTF-8 text")]
    NotText {
        /// Where they came from (a path, `imds user data`).
        origin: String,
    },
    /// The text is not the TOML of join settings.
    #[error("parsing the join settings in {origin} failed at line {line}: {message}")]
    Parse {
        /// Where they came from.
        origin: String,
        /// The line (1-based) the parser stopped at.
        line: usize,
        /// The parser's message, without its quote of the text.
        message: String,
    },
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    let before = &text.as_bytes()[..offset.min(text.len())];
    before.iter().filter(|b| **b == b'\n').count() + 1
}

/// Where [`JoinSettings::from_user_data`] says its settings came from.
pub const USER_DATA_ORIGIN: &str = "imds user data";

impl JoinSettings {
    /// The join settings in `text`, a TOML document with any of `server`,
    /// `cluster` and `join_token` (other keys are refused: a typo must not
    /// pass silently). Blank strings count as missing.
    pub fn parse(text: &str, origin: &str) -> Result<Self, JoinError> {
        let settings: JoinSettings = toml::from_str(text).map_err(|e| JoinError::Parse {
            origin: origin.to_string(),
            line: e.span().map(|s| line_of(text, s.start)).unwrap_or(1),
            message: e.message().to_string(),
        })?;
        let keep = |v: Option<String>| v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
        Ok(JoinSettings {
            server: keep(settings.server),
            cluster: keep(settings.cluster),
            join_token: keep(settings.join_token),
        })
    }

    /// The join settings in a VM's user data (already base64-decoded);
    /// empty user data gives none.
    pub fn from_user_data(bytes: &[u8]) -> Result<Self, JoinError> {
        let text = std::str::from_utf8(bytes).map_err(|_| JoinError::NotText {
            origin: USER_DATA_ORIGIN.to_string(),
        })?;
        Self::parse(text, USER_DATA_ORIGIN)
    }

    /// The join settings in the file at `path`, or `None` when there is no
    /// such file (a VM deployed without custom data).
    pub fn read_file(path: &Path) -> Result<Option<Self>, JoinError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(JoinError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let origin = path.display().to_string();
        let text = String::from_utf8(bytes).map_err(|_| JoinError::NotText {
            origin: origin.clone(),
        })?;
        Self::parse(&text, &origin).map(Some)
    }

    /// These settings, with the ones they lack taken from `other`.
    pub fn or(self, other: JoinSettings) -> JoinSettings {
        JoinSettings {
            server: self.server.or(other.server),
            cluster: self.cluster.or(other.cluster),
            join_token: self.join_token.or(other.join_token),
        }
    }

    /// Whether all three are known.
    pub fn is_complete(&self) -> bool {
        self.server.is_some() && self.cluster.is_some() && self.join_token.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn some(s: &str) -> Option<String> {
        Some(s.to_string())
    }

    #[test]
    fn all_three_are_read_and_blank_ones_are_missing() {
        let s = JoinSettings::parse(
            "server = \"http://10.0.0.4:7340\"\ncluster = \" gpu \"\njoin_token = \"\"\n",
            "f",
        )
        .unwrap();
        assert_eq!(s.server, some("http://10.0.0.4:7340"));
        assert_eq!(s.cluster, some("gpu"));
        assert_eq!(s.join_token, None);
        assert!(!s.is_complete());
        assert_eq!(
            JoinSettings::from_user_data(b"").unwrap(),
            JoinSettings::default()
        );
    }

    #[test]
    fn errors_name_the_origin_and_line_but_never_quote_the_text() {
        let text = "server = \"http://s\"\njoin_token = sekrit-token\n";
        let e = JoinSettings::parse(text, "/etc/drover/join.toml").unwrap_err();
        let shown = format!("{e} {e:?}");
        assert!(shown.contains("/etc/drover/join.toml"), "{shown}");
        assert!(shown.contains("line 2"), "{shown}");
        assert!(!shown.contains("sekrit"), "{shown}");

        let e = JoinSettings::parse("join_tokn = \"sekrit\"\n", "f").unwrap_err();
        let shown = format!("{e}");
        assert!(shown.contains("unknown field"), "{shown}");
        assert!(!shown.contains("sekrit"), "{shown}");

        let e = JoinSettings::from_user_data(&[0xff, 0xfe]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the join settings in imds user data are not UTF-8 text"
        );
        // Cloud-config in user data is not join settings.
        assert!(JoinSettings::from_user_data(b"#cloud-config\nwrite_files: []\n").is_err());
    }

    #[test]
    fn debug_redacts_the_token() {
        let s = JoinSettings::parse("join_token = \"sekrit\"", "f").unwrap();
        let shown = format!("{s:?}");
        assert!(!shown.contains("sekrit"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn earlier_sources_win_and_later_ones_fill_gaps() {
        let flags = JoinSettings {
            server: some("a"),
            ..JoinSettings::default()
        };
        let file = JoinSettings {
            server: some("b"),
            cluster: some("c"),
            ..JoinSettings::default()
        };
        let user_data = JoinSettings {
            server: some("d"),
            cluster: some("e"),
            join_token: some("t"),
        };
        let s = flags.or(file).or(user_data);
        assert_eq!(s.server, some("a"));
        assert_eq!(s.cluster, some("c"));
        assert_eq!(s.join_token, some("t"));
        assert!(s.is_complete());
    }

    #[test]
    fn a_missing_file_is_none_and_a_present_one_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("join.toml");
        assert_eq!(JoinSettings::read_file(&path).unwrap(), None);
        std::fs::write(&path, "cluster = \"cpu\"\n").unwrap();
        assert_eq!(
            JoinSettings::read_file(&path).unwrap().unwrap().cluster,
            some("cpu")
        );
    }
}
