//! Drover's runtime for parallel jobs (`runner/parallel/driver.py`),
//! shipped inside the binaries and written to the node's disk to be
//! mounted read-only into a parallel job's container at
//! [`drover_api::job::PARALLEL_DRIVER_PATH`].

use std::io::Write as _;
use std::path::{Path, PathBuf};

/// The runtime's source.
pub const DRIVER: &str = include_str!("../parallel/driver.py");

/// Writes the runtime under `dir` (once per version: the file is named by
/// its content, so a running job's copy is never rewritten) and returns
/// its path.
pub fn install(dir: &Path) -> std::io::Result<PathBuf> {
    // FNV-1a: a name per content, not a security boundary.
    let hash = DRIVER.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let path = dir.join(format!("driver-{hash:016x}.py"));
    if path.is_file() {
        return Ok(path);
    }
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".driver-{hash:016x}.{}", std::process::id()));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(DRIVER.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_runtime_is_written_once_per_version() {
        let dir = tempfile::tempdir().unwrap();
        let a = super::install(dir.path()).unwrap();
        let b = super::install(dir.path()).unwrap();
        assert_eq!(a, b);
        assert_eq!(std::fs::read_to_string(&a).unwrap(), super::DRIVER);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
