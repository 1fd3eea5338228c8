//! Job files on the wire: content-addressed blobs (code snapshots, uploaded
//! inputs, output files), the uploads that bring them to the control plane,
//! and the outputs a part leaves behind.
//!
//! # The blob protocol
//!
//! Blobs are named by the sha256 of their bytes ([`Digest`]), so the same
//! code uploaded twice is stored once and a blob is never half-written:
//! bytes are staged by the control plane and become the blob only when all
//! of them have arrived and hash to the name.
//!
//! Users (CLI) use `/v1/blobs/…` with their token, agents the same routes
//! under `/v1/agent/blobs/…` with theirs:
//!
//! `{digest}` in a path is the 64 hex digits (`sha256:` may precede them).
//!
//! - `HEAD /v1/blobs/{digest}`: 200 with `Content-Length` when the blob is
//!   stored, 404 when not.
//! - `GET /v1/blobs/{digest}`: its bytes (`application/octet-stream`);
//!   `Range: bytes=N-` answers 206 with the bytes from N, so a cut download
//!   resumes.
//! - `GET /v1/uploads/{digest}`: [`UploadStatus`] — how many bytes of an
//!   upload are staged (0 when none), or `complete` when the blob exists.
//! - `PUT /v1/blobs/{digest}?size=TOTAL&offset=N`: appends the body to the
//!   staged bytes, which must number exactly N (409 `conflict` otherwise,
//!   naming the staged count; the client asks for the status again). TOTAL
//!   above [`MAX_BLOB_BYTES`] is 413 `too_large`; one that differs from an
//!   upload already staged is 409. Bytes that arrive are kept even
//!   when the connection breaks, so an upload resumes from
//!   [`UploadStatus::offset`]. When N plus the body reaches TOTAL the bytes
//!   are hashed: a match is stored and answered 201 with [`BlobInfo`]; a
//!   mismatch is discarded and answered 400 `invalid`, saying so. A PUT for a
//!   blob already stored is answered 200 at once, its body unread.
//!
//! A blob is at most [`MAX_BLOB_BYTES`]. Code and folder inputs travel as
//! snapshots: an uncompressed tar of the folder with entries in byte order
//! of their paths, modes kept, owners, groups and times cleared, so the
//! same tree always makes the same blob.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::wire::PartKey;

/// The largest blob the control plane stores (1 TiB).
pub const MAX_BLOB_BYTES: u64 = 1 << 40;

/// The largest code snapshot a job may have: Azure ML's own limit (300 MB).
pub const MAX_CODE_BYTES: u64 = 300 * 1024 * 1024;

/// The output name of a part's working directory's `outputs/` and `logs/`
/// folders (Azure ML's default output, downloaded to `artifacts/`).
pub const DEFAULT_OUTPUT: &str = "default";

/// The name of the datastore that is the control plane's own artifact store.
pub const WORKSPACE_DATASTORE: &str = "workspaceblobstore";

/// The sha256 of a blob's bytes, written `sha256:` and 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The 64 hex digits, without the `sha256:` prefix (object names, URLs).
    pub fn hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

/// A digest that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a sha256 digest (expected sha256: and 64 lowercase hex digits)")]
pub struct BadDigest(pub String);

impl FromStr for Digest {
    type Err = BadDigest;

    /// `sha256:<hex>`, or the 64 hex digits alone (as in a URL path).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s.strip_prefix("sha256:").unwrap_or(s);
        let bad = || BadDigest(s.chars().take(80).collect());
        if hex.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
            let digit = |c: u8| match c {
                b'0'..=b'9' => Some(c - b'0'),
                b'a'..=b'f' => Some(c - b'a' + 10),
                _ => None,
            };
            match (digit(pair[0]), digit(pair[1])) {
                (Some(h), Some(l)) => out[i] = h << 4 | l,
                _ => return Err(bad()),
            }
        }
        Ok(Digest(out))
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A stored blob: its name and its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobInfo {
    /// The sha256 of its bytes.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
}

/// How far an upload has come (`GET /v1/uploads/{digest}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadStatus {
    /// The blob.
    pub digest: Digest,
    /// Bytes staged so far; send the rest from here.
    pub offset: u64,
    /// The blob is stored: nothing is left to send.
    pub complete: bool,
}

/// One file of an output, as the agent uploaded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFile {
    /// Its path inside the output, `/`-separated, relative, without `.`
    /// or `..` components (checked by [`check_relative_path`]).
    pub path: String,
    /// Its size in bytes.
    pub size: u64,
    /// The blob holding its bytes.
    pub digest: Digest,
    /// Whether it was executable.
    #[serde(default)]
    pub executable: bool,
}

/// Every output of one part, as its agent uploaded them, posted before the
/// part's final state (`POST /v1/agent/outputs`). Posting it again replaces
/// what the part posted before, so a resumed upload posts it once more.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartOutputs {
    /// The part.
    pub part: PartKey,
    /// Files by output name; [`DEFAULT_OUTPUT`] holds the working
    /// directory's `outputs/` and `logs/` folders (paths start with them).
    pub outputs: BTreeMap<String, Vec<OutputFile>>,
    /// Files the agent could not upload (a link, a socket, an unreadable
    /// file), by output name, each with why: shown by `job show`.
    #[serde(default)]
    pub skipped: BTreeMap<String, Vec<SkippedFile>>,
}

/// A file of an output that was not uploaded, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedFile {
    /// Its path inside the output.
    pub path: String,
    /// Why (`a symbolic link`, `permission denied`).
    pub reason: String,
}

/// The answer to [`PartOutputs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartOutputsAccepted {
    /// Files recorded.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// One output of a job, as `job show` and `job download` see it
/// (`GET /v1/jobs/{name}/outputs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobOutput {
    /// The output's name ([`DEFAULT_OUTPUT`] for the artifacts).
    pub name: String,
    /// Its files, merged across the job's nodes in path order; where two
    /// nodes wrote the same path, the lowest node rank's file is kept.
    pub files: Vec<OutputFile>,
    /// The sum of the files' sizes.
    pub bytes: u64,
    /// Nodes whose files are in (a node still uploading is not).
    pub nodes: Vec<u32>,
    /// Paths two nodes wrote with different bytes (only the lowest node
    /// rank's is kept).
    #[serde(default)]
    pub conflicts: Vec<String>,
    /// Files no node could upload.
    #[serde(default)]
    pub skipped: Vec<SkippedFile>,
    /// Where the output is also written, when its `path:` names a datastore.
    #[serde(default)]
    pub destination: Option<String>,
}

/// A job's outputs for one attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobOutputs {
    /// The job.
    pub job: String,
    /// The attempt they are of (the latest unless one was asked for).
    pub attempt: u32,
    /// Its outputs, by name; the default output first.
    pub outputs: Vec<JobOutput>,
}

/// One file or object of a datastore, as an agent lists it to fetch a
/// datastore input through the control plane
/// (`GET /v1/agent/datastores/{name}/list?path=P`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataEntry {
    /// Its path under the listed one (the listed path itself for a file).
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// What changes when its bytes change (an ETag, or a time and size).
    pub version: String,
}

/// The answer to a datastore listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataListing {
    /// The datastore.
    pub datastore: String,
    /// The path listed.
    pub path: String,
    /// Files under it (one, the path itself, when it names a file), in path order.
    pub entries: Vec<DataEntry>,
}

/// Checks a `/`-separated relative path inside an output or a snapshot:
/// not empty, not absolute, no `.`, `..` or empty components, no NUL, at
/// most 4096 bytes.
pub fn check_relative_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("a path is empty".into());
    }
    if path.len() > 4096 {
        return Err(format!(
            "a path is {} bytes long (at most 4096)",
            path.len()
        ));
    }
    if path.contains('\0') {
        return Err("a path holds a NUL byte".into());
    }
    if path.starts_with('/') {
        return Err(format!(
            "`{path}` is absolute; paths are relative to the output"
        ));
    }
    if path
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(format!(
            "`{path}` has an empty, `.` or `..` component; paths stay inside their folder"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_parse_with_or_without_their_prefix_and_print_with_it() {
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let d: Digest = hex.parse().unwrap();
        assert_eq!(d, format!("sha256:{hex}").parse().unwrap());
        assert_eq!(d.to_string(), format!("sha256:{hex}"));
        assert_eq!(d.hex(), hex);
        assert_eq!(
            serde_json::to_string(&d).unwrap(),
            format!("\"sha256:{hex}\"")
        );
        for bad in [
            "",
            "sha256:",
            &hex[1..],
            &hex.to_uppercase(),
            &format!("md5:{hex}"),
            &format!("{hex}0"),
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad}");
        }
    }

    #[test]
    fn relative_paths_stay_inside() {
        for ok in ["a", "a/b.txt", "outputs/x.txt", ".hidden/..x"] {
            assert!(check_relative_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a//b",
            "./a",
            "a/",
            "a\0b",
        ] {
            assert!(check_relative_path(bad).is_err(), "{bad:?}");
        }
    }
}
