//! Finding the static `drover-init` that job containers run as PID 1. Shared
//! by every binary that starts parts (the agent; `drover run` has its own
//! copy of the same rules).

use std::path::{Path, PathBuf};

/// No static drover-init was found.
#[derive(Debug, thiserror::Error)]
#[error(
    "no statically linked drover-init found (looked at {looked}); build it with `make build` or pass its path"
)]
pub struct InitNotFound {
    /// The paths tried, comma-separated.
    pub looked: String,
}

/// True if `path` is an ELF executable without a program interpreter, i.e.
/// one that runs in any image (no dynamic loader or libc needed inside it).
pub fn is_static_elf(path: &Path) -> bool {
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    // 64-bit little-endian ELF only: the one target drover-init is built for.
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let mut phoff = [0u8; 8];
    phoff.copy_from_slice(&bytes[0x20..0x28]);
    let phoff = u64::from_le_bytes(phoff) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    const PT_INTERP: u32 = 3;
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        bytes
            .get(o..o + 4)
            .map(|t| u32::from_le_bytes([t[0], t[1], t[2], t[3]]) != PT_INTERP)
            .unwrap_or(false)
    })
}

/// Finds a statically linked drover-init: `explicit` when given, then the
/// static build of a source checkout (`target/x86_64-unknown-linux-gnu/release`
/// above this executable), next to this executable, or `/usr/local/lib/drover`.
/// Dynamically linked builds are skipped: they fail inside images with
/// another libc, or none.
pub fn find(explicit: Option<&Path>) -> Result<PathBuf, InitNotFound> {
    let mut candidates = Vec::new();
    if let Some(p) = explicit {
        candidates.push(p.to_path_buf());
    }
    if let Ok(exe) = std::env::current_exe() {
        // Walk up from target/<profile>/[deps/] to target/.
        for dir in exe.ancestors().skip(1).take(3) {
            candidates.push(dir.join("x86_64-unknown-linux-gnu/release/drover-init"));
        }
        if let Some(dir) = exe.parent() {
            candidates.push(dir.join("drover-init"));
        }
    }
    candidates.push(PathBuf::from("/usr/local/lib/drover/drover-init"));
    if explicit.is_some() {
        // An explicit path is used or refused, never silently replaced.
        candidates.truncate(1);
    }
    candidates
        .iter()
        .find(|c| is_static_elf(c))
        .cloned()
        .ok_or_else(|| InitNotFound {
            looked: candidates
                .iter()
                .map(|c| c.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_and_missing_binaries_are_refused() {
        // This test binary is dynamically linked: it has an interpreter.
        let me = std::env::current_exe().expect("exe");
        assert!(!is_static_elf(&me));
        assert!(!is_static_elf(Path::new("/nonexistent/drover-init")));
        let err = find(Some(Path::new("/nonexistent/drover-init"))).unwrap_err();
        assert_eq!(err.looked, "/nonexistent/drover-init");
    }
}
