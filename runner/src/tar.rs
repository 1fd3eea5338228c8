//! A minimal ustar writer for image build contexts: regular files only,
//! which is all a build context of a few generated files needs.

use crate::runtime::ContextFile;

const BLOCK: usize = 512;

/// The files as one uncompressed tar archive.
pub fn archive(files: &[ContextFile]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in files {
        out.extend_from_slice(&header(f));
        out.extend_from_slice(&f.data);
        let pad = (BLOCK - f.data.len() % BLOCK) % BLOCK;
        out.resize(out.len() + pad, 0);
    }
    // Two zero blocks end the archive.
    out.resize(out.len() + 2 * BLOCK, 0);
    out
}

fn octal(field: &mut [u8], value: u64) {
    // Width minus the terminating NUL, zero-padded.
    let text = format!("{value:0width$o}", width = field.len() - 1);
    let bytes = text.as_bytes();
    let width = field.len() - 1;
    let start = bytes.len().saturating_sub(width);
    field[..width].copy_from_slice(&bytes[start..]);
    field[width] = 0;
}

fn header(f: &ContextFile) -> [u8; BLOCK] {
    let mut h = [0u8; BLOCK];
    let name = f.path.as_bytes();
    let n = name.len().min(100);
    h[..n].copy_from_slice(&name[..n]);
    octal(&mut h[100..108], u64::from(f.mode & 0o7777));
    octal(&mut h[108..116], 0); // uid
    octal(&mut h[116..124], 0); // gid
    octal(&mut h[124..136], f.data.len() as u64);
    octal(&mut h[136..148], 0); // mtime: fixed, so the same files give the same archive
    h[156] = b'0'; // regular file
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    // The checksum is computed with its own field as spaces.
    h[148..156].copy_from_slice(b"        ");
    let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
    let text = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(text.as_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_system_tar_reads_what_we_write() {
        let files = [
            ContextFile {
                path: "Dockerfile".into(),
                mode: 0o644,
                data: b"FROM scratch\n".to_vec(),
            },
            ContextFile {
                path: "bin/tool".into(),
                mode: 0o755,
                data: vec![7u8; 1000],
            },
        ];
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ctx.tar");
        std::fs::write(&path, archive(&files)).expect("write");
        let out = std::process::Command::new("tar")
            .args(["-tvf"])
            .arg(&path)
            .output()
            .expect("run tar");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(
            listing.contains("-rw-r--r--") && listing.contains("Dockerfile"),
            "{listing}"
        );
        assert!(
            listing.contains("-rwxr-xr-x")
                && listing.contains("1000")
                && listing.contains("bin/tool"),
            "{listing}"
        );
        let x = std::process::Command::new("tar")
            .arg("-xf")
            .arg(&path)
            .arg("-C")
            .arg(dir.path())
            .status()
            .expect("extract");
        assert!(x.success());
        assert_eq!(
            std::fs::read(dir.path().join("bin/tool")).expect("read"),
            vec![7u8; 1000]
        );
    }
}
