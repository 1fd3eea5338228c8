//! Image collection by disk pressure, as the kubelet does it: when the
//! filesystem of the engine's data root is fuller than `high_percent`,
//! remove the least recently used images of the ledger — never a pinned
//! one, one a container uses, one an assigned part needs, or one being
//! pulled — until it is expected under `low_percent`.
//!
//! Only images in the [`ImageLedger`] are ever considered: what the agent
//! pulled or built. The engine may hold other images (the node's own, other
//! tools', on a shared engine other agents'), and those are never touched.
//! [`plan_collection`] decides (a plain function over plain data); the
//! `[image-collector]` task measures, removes, and reports each removal as
//! a [`CollectEvent`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_runner::PartRunner;
use drover_runner::runtime::{ContainerRuntime, RuntimeError};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::ledger::ImageLedger;
use crate::metrics::Metrics;

/// Collection settings (`--image-gc-high-percent`, `--image-gc-low-percent`).
#[derive(Debug, Clone, PartialEq)]
pub struct CollectConfig {
    /// Collect when the filesystem is fuller than this, percent.
    pub high_percent: f64,
    /// Collect until it is expected below this, percent.
    pub low_percent: f64,
    /// How often the disk is measured.
    pub interval: Duration,
    /// The folder whose filesystem is measured (default: the engine's data
    /// root, when the agent can see it).
    pub path: Option<PathBuf>,
}

impl Default for CollectConfig {
    fn default() -> Self {
        CollectConfig {
            high_percent: 85.0,
            low_percent: 80.0,
            interval: Duration::from_secs(60),
            path: None,
        }
    }
}

/// A filesystem's size and free space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskUsage {
    /// Its size, bytes.
    pub total: u64,
    /// What is free for unprivileged use, bytes.
    pub available: u64,
}

impl DiskUsage {
    /// Used bytes (size less free).
    pub fn used(&self) -> u64 {
        self.total.saturating_sub(self.available)
    }

    /// Percent used.
    pub fn percent(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.used() as f64 * 100.0 / self.total as f64
        }
    }
}

/// One image the collector may consider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Its name.
    pub image: String,
    /// Its size, bytes.
    pub size: u64,
    /// When it was last used, ms since the epoch.
    pub last_used_ms: u64,
    /// Pinned by prepull.
    pub pinned: bool,
}

/// Why an image was kept although it was old enough to go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeptBecause {
    /// Prepull pinned it.
    Pinned,
    /// A container uses it, or an assigned part needs it.
    InUse,
    /// A pull of it is in flight.
    Pulling,
}

/// What to do under the current usage.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CollectionPlan {
    /// Images to remove, least recently used first.
    pub remove: Vec<String>,
    /// Images kept, and why (only those that would otherwise have gone).
    pub kept: Vec<(String, KeptBecause)>,
    /// Bytes the plan expects to free.
    pub bytes: u64,
}

/// Decides which images to remove: nothing below `high_percent`; above it
/// the least recently used removable candidates until usage is expected at
/// or below `low_percent`.
pub fn plan_collection(
    usage: DiskUsage,
    high_percent: f64,
    low_percent: f64,
    candidates: &[Candidate],
    in_use: &BTreeSet<String>,
    pulling: &BTreeSet<String>,
) -> CollectionPlan {
    let mut plan = CollectionPlan::default();
    if usage.percent() < high_percent || usage.total == 0 {
        return plan;
    }
    let target = (usage.total as f64 * low_percent / 100.0) as u64;
    let mut used = usage.used();
    let mut by_age: Vec<&Candidate> = candidates.iter().collect();
    by_age.sort_by(|a, b| {
        a.last_used_ms
            .cmp(&b.last_used_ms)
            .then(a.image.cmp(&b.image))
    });
    for c in by_age {
        if used <= target {
            break;
        }
        let kept = if c.pinned {
            Some(KeptBecause::Pinned)
        } else if in_use.contains(&c.image) {
            Some(KeptBecause::InUse)
        } else if pulling.contains(&c.image) {
            Some(KeptBecause::Pulling)
        } else {
            None
        };
        match kept {
            Some(why) => plan.kept.push((c.image.clone(), why)),
            None => {
                plan.remove.push(c.image.clone());
                plan.bytes += c.size;
                used = used.saturating_sub(c.size);
            }
        }
    }
    plan
}

/// The images the node's assigned parts need, counted per part, so the
/// collector never removes one between its pull and its container.
#[derive(Debug, Clone, Default)]
pub struct NeededImages(Arc<Mutex<BTreeMap<String, usize>>>);

/// Holds an image as needed until dropped.
#[derive(Debug)]
pub struct NeededGuard {
    set: NeededImages,
    image: String,
}

impl NeededImages {
    /// Marks `image` needed while the guard lives.
    pub fn hold(&self, image: &str) -> NeededGuard {
        *self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(image.to_string())
            .or_insert(0) += 1;
        NeededGuard {
            set: self.clone(),
            image: image.to_string(),
        }
    }

    fn names(&self) -> BTreeSet<String> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }
}

impl Drop for NeededGuard {
    fn drop(&mut self) {
        let mut m = self.set.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.image) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.image);
            }
        }
    }
}

/// A notable step of collection: one log line and one metric each.
#[derive(Debug, Clone, PartialEq)]
pub enum CollectEvent {
    /// An image was removed.
    Removed {
        /// The image.
        image: String,
        /// Its size.
        bytes: u64,
        /// Usage when the pass began, percent.
        percent: f64,
    },
    /// An image that would have gone was kept.
    Kept {
        /// The image.
        image: String,
        /// Why.
        because: KeptBecause,
    },
    /// Removing an image failed (a container took it meanwhile, …).
    Failed {
        /// The image.
        image: String,
        /// The engine's message.
        reason: String,
    },
    /// The disk cannot be measured: collection is off.
    Unmeasurable {
        /// The folder.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

impl CollectEvent {
    /// Logs the event and counts it.
    pub fn emit(&self, metrics: &Metrics) {
        match self {
            CollectEvent::Removed {
                image,
                bytes,
                percent,
            } => {
                tracing::info!(image = %image, bytes, disk_percent = percent, "image collected");
                metrics.image_gc_removed.inc();
                metrics.image_gc_bytes.inc_by(*bytes);
            }
            CollectEvent::Kept { image, because } => {
                tracing::debug!(image = %image, because = ?because, "image kept by collection");
            }
            CollectEvent::Failed { image, reason } => {
                tracing::warn!(image = %image, reason = %reason, "image collection failed");
                metrics.image_gc_failures.inc();
            }
            CollectEvent::Unmeasurable { path, reason } => {
                tracing::warn!(path = %path.display(), reason = %reason, "image collection is off: cannot measure the disk (set --image-gc-path)");
            }
        }
    }
}

/// The filesystem usage of `path` (statvfs).
pub fn disk_usage(path: &Path) -> std::io::Result<DiskUsage> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `s` a valid out-pointer.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let frsize = s.f_frsize as u64;
    Ok(DiskUsage {
        total: s.f_blocks as u64 * frsize,
        available: s.f_bavail as u64 * frsize,
    })
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One pass: measure, plan, remove. Returns the events of the pass.
pub async fn collect_once<R: ContainerRuntime>(
    runner: &PartRunner<R>,
    ledger: &ImageLedger,
    needed: &NeededImages,
    config: &CollectConfig,
    path: &Path,
) -> Result<Vec<CollectEvent>, RuntimeError> {
    let usage = disk_usage(path)
        .map_err(|e| RuntimeError::Engine(format!("measuring {}: {e}", path.display())))?;
    if usage.percent() < config.high_percent {
        return Ok(Vec::new());
    }
    let mut candidates = Vec::new();
    for (image, e) in ledger.entries() {
        match runner.runtime.image_size(&image).await? {
            Some(size) => candidates.push(Candidate {
                image,
                size,
                last_used_ms: e.last_used_ms,
                pinned: e.pinned,
            }),
            // Gone already (removed by hand): forget it.
            None => {
                let _ = ledger.forget(&image);
            }
        }
    }
    let mut in_use = runner.runtime.images_in_use().await?;
    in_use.extend(needed.names());
    let pulling: BTreeSet<String> = runner.puller.in_flight().into_iter().collect();
    let plan = plan_collection(
        usage,
        config.high_percent,
        config.low_percent,
        &candidates,
        &in_use,
        &pulling,
    );
    let mut events: Vec<CollectEvent> = plan
        .kept
        .iter()
        .map(|(image, because)| CollectEvent::Kept {
            image: image.clone(),
            because: *because,
        })
        .collect();
    for image in plan.remove {
        let bytes = candidates
            .iter()
            .find(|c| c.image == image)
            .map_or(0, |c| c.size);
        // Checked again at the last moment: a part may have taken it.
        if needed.names().contains(&image) || runner.puller.in_flight().contains(&image) {
            events.push(CollectEvent::Kept {
                image,
                because: KeptBecause::InUse,
            });
            continue;
        }
        match runner.runtime.delete_image(&image).await {
            Ok(()) => {
                let _ = ledger.forget(&image);
                events.push(CollectEvent::Removed {
                    image,
                    bytes,
                    percent: usage.percent(),
                });
            }
            Err(e) => events.push(CollectEvent::Failed {
                image,
                reason: e.to_string(),
            }),
        }
    }
    Ok(events)
}

/// The `[image-collector]` task: a pass every `interval` and whenever
/// `wake` is notified (a part ended), until `stop`.
pub async fn collector_task<R: ContainerRuntime>(
    runner: Arc<PartRunner<R>>,
    ledger: Arc<ImageLedger>,
    needed: NeededImages,
    config: CollectConfig,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    let path = match &config.path {
        Some(p) => p.clone(),
        None => match runner.runtime.data_root().await {
            Ok(p) => p,
            Err(e) => {
                CollectEvent::Unmeasurable {
                    path: PathBuf::from("(docker data root)"),
                    reason: e.to_string(),
                }
                .emit(&metrics);
                return;
            }
        },
    };
    if let Err(e) = disk_usage(&path) {
        CollectEvent::Unmeasurable {
            path,
            reason: e.to_string(),
        }
        .emit(&metrics);
        return;
    }
    tracing::info!(path = %path.display(), high = config.high_percent, low = config.low_percent, "image collection on");
    loop {
        match collect_once(&runner, &ledger, &needed, &config, &path).await {
            Ok(events) => events.iter().for_each(|e| e.emit(&metrics)),
            Err(e) => tracing::warn!(error = %e, "image collection pass failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(config.interval) => {}
            _ = wake.notified() => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Records that a part used `image` at `now`: a pull or build adds it to
/// the ledger; an image the ledger has gets a newer last use.
pub fn record_use(ledger: &ImageLedger, image: &str, brought: Option<super::ledger::ImageOrigin>) {
    let now = now_ms();
    let r = match brought {
        Some(origin) => ledger.record(image, origin, now),
        None if ledger.entries().contains_key(image) => {
            ledger.record(image, super::ledger::ImageOrigin::Pulled, now)
        }
        None => Ok(()),
    };
    if let Err(e) = r {
        tracing::warn!(image = %image, error = %e, "cannot update the image ledger");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(image: &str, size: u64, last: u64, pinned: bool) -> Candidate {
        Candidate {
            image: image.into(),
            size,
            last_used_ms: last,
            pinned,
        }
    }

    const GB: u64 = 1 << 30;

    #[test]
    fn nothing_goes_below_the_high_threshold() {
        let usage = DiskUsage {
            total: 100 * GB,
            available: 16 * GB,
        };
        let plan = plan_collection(
            usage,
            85.0,
            80.0,
            &[c("a", 10 * GB, 1, false)],
            &BTreeSet::new(),
            &BTreeSet::new(),
        );
        assert_eq!(plan, CollectionPlan::default());
    }

    #[test]
    fn oldest_removable_first_until_under_the_low_threshold() {
        let usage = DiskUsage {
            total: 100 * GB,
            available: 10 * GB,
        };
        let cands = [
            c("new", 5 * GB, 50, false),
            c("old", 3 * GB, 10, false),
            c("pinned", 9 * GB, 1, true),
            c("running", 9 * GB, 2, false),
            c("pulling", 9 * GB, 3, false),
            c("mid", 4 * GB, 20, false),
            c("newest", 4 * GB, 60, false),
        ];
        let in_use = BTreeSet::from(["running".to_string()]);
        let pulling = BTreeSet::from(["pulling".to_string()]);
        let plan = plan_collection(usage, 85.0, 80.0, &cands, &in_use, &pulling);
        // 90 used, target 80: old (3) + mid (4) + new (5) = 12 → 78.
        assert_eq!(plan.remove, ["old", "mid", "new"]);
        assert_eq!(plan.bytes, 12 * GB);
        assert_eq!(
            plan.kept,
            [
                ("pinned".to_string(), KeptBecause::Pinned),
                ("running".to_string(), KeptBecause::InUse),
                ("pulling".to_string(), KeptBecause::Pulling)
            ]
        );
    }

    #[test]
    fn needed_images_are_counted_per_holder() {
        let n = NeededImages::default();
        let a = n.hold("x");
        let b = n.hold("x");
        drop(a);
        assert!(n.names().contains("x"));
        drop(b);
        assert!(n.names().is_empty());
    }

    #[test]
    fn the_disk_of_a_folder_is_measured() {
        let u = disk_usage(Path::new("/")).unwrap();
        assert!(u.total > 0 && u.available <= u.total);
        assert!(disk_usage(Path::new("/no/such/folder")).is_err());
    }
}
