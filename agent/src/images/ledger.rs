//! The images this agent brought to its node — pulled for a part, built
//! from an environment, or prepulled — with when each was last used and
//! whether it is pinned. Image collection considers these and no others:
//! the engine may be shared with images the agent must never touch.
//!
//! One JSON file in the data dir, written whole to a temporary file and
//! renamed, so a crash leaves the old ledger or the new one. Every change
//! reads the file first, so `prepull` may pin images while an agent runs.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// How an image came to the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageOrigin {
    /// Pulled for a part.
    Pulled,
    /// Built from an environment's context.
    Built,
    /// Pulled or built by `drover-agent prepull`.
    Prepulled,
}

/// One image of the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// How it came.
    pub origin: ImageOrigin,
    /// Kept by collection whatever the disk pressure (prepulled images).
    pub pinned: bool,
    /// When a part last used it (or it arrived), ms since the epoch.
    pub last_used_ms: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct LedgerFile {
    images: BTreeMap<String, LedgerEntry>,
}

/// The ledger, shared by the supervisors, the collector and `prepull`.
#[derive(Debug)]
pub struct ImageLedger {
    path: PathBuf,
    state: Mutex<LedgerFile>,
}

impl ImageLedger {
    /// The ledger file of a data dir.
    pub fn path_in(data_dir: &Path) -> PathBuf {
        data_dir.join("images").join("ledger.json")
    }

    /// Opens the ledger of `data_dir` (empty when there is none yet).
    pub fn open(data_dir: &Path) -> io::Result<ImageLedger> {
        let path = Self::path_in(data_dir);
        let state = Self::read(&path)?;
        Ok(ImageLedger {
            path,
            state: Mutex::new(state),
        })
    }

    fn read(path: &Path) -> io::Result<LedgerFile> {
        Ok(match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} is not an image ledger: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => LedgerFile::default(),
            Err(e) => return Err(e),
        })
    }

    fn save(&self, state: &LedgerFile) -> io::Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(state).map_err(io::Error::other)?;
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, &self.path)
    }

    fn change(&self, f: impl FnOnce(&mut LedgerFile)) -> io::Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // Another process (prepull) may have written since.
        if let Ok(on_disk) = Self::read(&self.path) {
            *state = on_disk;
        }
        f(&mut state);
        self.save(&state)
    }

    /// Records that `image` arrived or was used at `now_ms`; a pinned image
    /// stays pinned.
    pub fn record(&self, image: &str, origin: ImageOrigin, now_ms: u64) -> io::Result<()> {
        self.change(|s| {
            let e = s.images.entry(image.to_string()).or_insert(LedgerEntry {
                origin,
                pinned: false,
                last_used_ms: now_ms,
            });
            e.last_used_ms = e.last_used_ms.max(now_ms);
        })
    }

    /// Records `image` as prepulled and pinned.
    pub fn pin(&self, image: &str, now_ms: u64) -> io::Result<()> {
        self.change(|s| {
            let e = s.images.entry(image.to_string()).or_insert(LedgerEntry {
                origin: ImageOrigin::Prepulled,
                pinned: true,
                last_used_ms: now_ms,
            });
            e.pinned = true;
            e.last_used_ms = e.last_used_ms.max(now_ms);
        })
    }

    /// Forgets `image` (it was removed).
    pub fn forget(&self, image: &str) -> io::Result<()> {
        self.change(|s| {
            s.images.remove(image);
        })
    }

    /// Every image, by name (as on disk now, when it reads).
    pub fn entries(&self) -> BTreeMap<String, LedgerEntry> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(on_disk) = Self::read(&self.path) {
            *state = on_disk;
        }
        state.images.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_pins_and_forgets_across_opens() {
        let dir = tempfile::tempdir().unwrap();
        let l = ImageLedger::open(dir.path()).unwrap();
        l.record("a:1", ImageOrigin::Pulled, 10).unwrap();
        l.record("a:1", ImageOrigin::Pulled, 5).unwrap();
        l.pin("b:1", 20).unwrap();
        l.record("b:1", ImageOrigin::Pulled, 30).unwrap();
        let again = ImageLedger::open(dir.path()).unwrap();
        let e = again.entries();
        assert_eq!(e["a:1"].last_used_ms, 10);
        assert!(!e["a:1"].pinned);
        assert!(e["b:1"].pinned, "a pin survives later use");
        assert_eq!(e["b:1"].last_used_ms, 30);
        again.forget("a:1").unwrap();
        assert!(
            !ImageLedger::open(dir.path())
                .unwrap()
                .entries()
                .contains_key("a:1")
        );
        std::fs::write(ImageLedger::path_in(dir.path()), "nope").unwrap();
        assert!(ImageLedger::open(dir.path()).is_err());
    }
}
