//! The node cache: blobs, unpacked folder snapshots, URL and datastore
//! inputs, shared by every part of the node, kept under a size cap by
//! evicting the least recently used entries that no running part uses.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use drover_api::files::Digest;

/// The default cap of the cache (20 GiB).
pub const DEFAULT_CACHE_MAX_BYTES: u64 = 20 << 30;

/// The kinds of entries, one folder each under the cache.
const KINDS: [&str; 4] = ["blobs", "trees", "urls", "datastores"];

/// One entry of the cache as eviction sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheEntry {
    /// Its path.
    pub path: PathBuf,
    /// Its bytes (a folder's files together).
    pub size: u64,
    /// When a part last used it.
    pub last_used: SystemTime,
}

/// The entries to evict so the cache holds at most `cap` bytes: least
/// recently used first, never one in `pinned`. When the pinned entries
/// alone are over the cap every unpinned one goes, and the cache stays
/// over it.
pub fn choose_evictions(
    entries: &[CacheEntry],
    pinned: &BTreeSet<PathBuf>,
    cap: u64,
) -> Vec<PathBuf> {
    let mut total: u64 = entries.iter().map(|e| e.size).sum();
    let mut order: Vec<&CacheEntry> = entries
        .iter()
        .filter(|e| !pinned.contains(&e.path))
        .collect();
    order.sort_by(|a, b| a.last_used.cmp(&b.last_used).then(a.path.cmp(&b.path)));
    let mut out = Vec::new();
    for e in order {
        if total <= cap {
            break;
        }
        total = total.saturating_sub(e.size);
        out.push(e.path.clone());
    }
    out
}

/// The node cache under `root`, with its cap and the entries running
/// parts use.
#[derive(Debug)]
pub struct Cache {
    root: PathBuf,
    cap: u64,
    pins: Mutex<BTreeMap<PathBuf, usize>>,
}

/// Entries a part uses, unpinned when dropped.
#[derive(Debug)]
pub struct Pins {
    cache: Arc<Cache>,
    paths: Vec<PathBuf>,
}

impl Drop for Pins {
    fn drop(&mut self) {
        let mut pins = self.cache.pins.lock().unwrap_or_else(|e| e.into_inner());
        for p in &self.paths {
            if let Some(n) = pins.get_mut(p) {
                *n -= 1;
                if *n == 0 {
                    pins.remove(p);
                }
            }
        }
    }
}

impl Pins {
    /// Pins `path` (an entry of the cache) for as long as these pins live.
    pub fn add(&mut self, path: PathBuf) {
        let mut pins = self.cache.pins.lock().unwrap_or_else(|e| e.into_inner());
        *pins.entry(path.clone()).or_default() += 1;
        self.paths.push(path);
    }
}

/// A key for a cache entry made of parts (a URL, a datastore path and
/// versions): the sha256 of them, NUL-separated.
pub fn key_of(parts: &[&str]) -> String {
    drover_files::digest::sha256_bytes(parts.join("\0").as_bytes()).hex()
}

impl Cache {
    /// The cache under `root`, holding at most `cap` bytes after eviction.
    pub fn new(root: PathBuf, cap: u64) -> Arc<Self> {
        Arc::new(Cache {
            root,
            cap,
            pins: Mutex::default(),
        })
    }

    /// No pins yet.
    pub fn pins(self: &Arc<Self>) -> Pins {
        Pins {
            cache: self.clone(),
            paths: Vec::new(),
        }
    }

    /// The file of a blob.
    pub fn blob(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs").join(digest.hex())
    }

    /// The folder of an unpacked folder snapshot.
    pub fn tree(&self, digest: &Digest) -> PathBuf {
        self.root.join("trees").join(digest.hex())
    }

    /// The folder of a URL input.
    pub fn url(&self, url: &str) -> PathBuf {
        self.root.join("urls").join(key_of(&[url]))
    }

    /// The folder of a datastore input with this key.
    pub fn datastore(&self, key: &str) -> PathBuf {
        self.root.join("datastores").join(key)
    }

    /// Where partial downloads and unpackings are staged.
    pub fn staging(&self) -> PathBuf {
        self.root.join("staging")
    }

    /// Marks an entry used now (its mtime), for eviction's order.
    pub fn touch(path: &Path) {
        if let Ok(f) = std::fs::File::open(path) {
            let _ = f.set_modified(SystemTime::now());
        }
    }

    /// The cache's entries as they are on disk.
    pub fn entries(&self) -> Vec<CacheEntry> {
        let mut out = Vec::new();
        for kind in KINDS {
            let Ok(rd) = std::fs::read_dir(self.root.join(kind)) else {
                continue;
            };
            for e in rd.flatten() {
                let path = e.path();
                let Ok(meta) = std::fs::symlink_metadata(&path) else {
                    continue;
                };
                // Partial downloads (`.partial`) are not entries yet.
                if path.extension().is_some_and(|x| x == "partial") {
                    continue;
                }
                out.push(CacheEntry {
                    size: size_of(&path),
                    last_used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    path,
                });
            }
        }
        out
    }

    /// Evicts least recently used entries no part pins until the cache is
    /// within its cap; returns the bytes freed.
    pub fn evict(&self) -> u64 {
        let entries = self.entries();
        let pinned: BTreeSet<PathBuf> = self
            .pins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        let mut freed = 0;
        for path in choose_evictions(&entries, &pinned, self.cap) {
            let size = entries
                .iter()
                .find(|e| e.path == path)
                .map_or(0, |e| e.size);
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            match removed {
                Ok(()) => {
                    tracing::info!(entry = %path.display(), bytes = size, "evicted from the node cache");
                    freed += size;
                }
                Err(e) => {
                    tracing::warn!(entry = %path.display(), error = %e, "evicting from the node cache failed")
                }
            }
        }
        freed
    }
}

/// Bytes of the files under `path` (links are not followed).
fn size_of(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| size_of(&e.path()))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn entry(name: &str, size: u64, age_s: u64) -> CacheEntry {
        CacheEntry {
            path: PathBuf::from(name),
            size,
            last_used: SystemTime::UNIX_EPOCH + Duration::from_secs(1000 - age_s),
        }
    }

    #[test]
    fn nothing_is_evicted_under_the_cap() {
        let e = [entry("a", 10, 5), entry("b", 10, 1)];
        assert!(choose_evictions(&e, &BTreeSet::new(), 20).is_empty());
    }

    #[test]
    fn the_least_recently_used_go_first_until_under_the_cap() {
        let e = [
            entry("new", 10, 1),
            entry("old", 10, 9),
            entry("mid", 10, 5),
        ];
        assert_eq!(
            choose_evictions(&e, &BTreeSet::new(), 15),
            [PathBuf::from("old"), PathBuf::from("mid")]
        );
        assert_eq!(
            choose_evictions(&e, &BTreeSet::new(), 25),
            [PathBuf::from("old")]
        );
    }

    #[test]
    fn pinned_entries_are_never_evicted_even_over_the_cap() {
        let e = [entry("old", 50, 9), entry("new", 10, 1)];
        let pinned: BTreeSet<PathBuf> = [PathBuf::from("old")].into();
        assert_eq!(choose_evictions(&e, &pinned, 20), [PathBuf::from("new")]);
        assert!(choose_evictions(&e[..1], &pinned, 0).is_empty());
    }

    #[test]
    fn eviction_on_disk_keeps_pinned_entries() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::new(tmp.path().to_path_buf(), 5);
        let d = drover_files::digest::sha256_bytes(b"x");
        std::fs::create_dir_all(tmp.path().join("blobs")).unwrap();
        std::fs::write(cache.blob(&d), b"0123456789").unwrap();
        let tree = cache.tree(&d);
        std::fs::create_dir_all(&tree).unwrap();
        std::fs::write(tree.join("f"), b"0123456789").unwrap();
        let mut pins = cache.pins();
        pins.add(tree.clone());
        assert_eq!(cache.evict(), 10);
        assert!(tree.is_dir() && !cache.blob(&d).exists());
        drop(pins);
        assert_eq!(cache.evict(), 10);
        assert!(!tree.exists());
    }
}
