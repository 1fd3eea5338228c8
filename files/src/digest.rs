//! sha256 digests of files and of bytes as they are written.

use std::io::{self, Read, Write};
use std::path::Path;

use drover_api::files::{BlobInfo, Digest};
use sha2::{Digest as _, Sha256};

/// The digest and size of a file's bytes.
pub fn sha256_file(path: &Path) -> io::Result<BlobInfo> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok(BlobInfo {
        digest: Digest(hasher.finalize().into()),
        size,
    })
}

/// The digest of `bytes`.
pub fn sha256_bytes(bytes: &[u8]) -> Digest {
    Digest(Sha256::digest(bytes).into())
}

/// A running sha256 over bytes fed to it in pieces.
#[derive(Clone, Default)]
pub struct Hasher {
    inner: Sha256,
    size: u64,
}

impl Hasher {
    /// A hasher that has seen nothing.
    pub fn new() -> Self {
        Hasher::default()
    }

    /// Feeds `bytes`.
    pub fn update(&mut self, bytes: &[u8]) {
        self.inner.update(bytes);
        self.size += bytes.len() as u64;
    }

    /// Bytes fed so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The digest and size of everything fed.
    pub fn finish(self) -> BlobInfo {
        BlobInfo {
            digest: Digest(self.inner.finalize().into()),
            size: self.size,
        }
    }
}

/// A writer that hashes what passes through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Hasher,
}

impl<W: Write> HashingWriter<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Hasher::new(),
        }
    }

    /// The writer back, with the digest and size of what was written.
    pub fn finish(self) -> (W, BlobInfo) {
        (self.inner, self.hasher.finish())
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_agree_however_the_bytes_arrive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let from_file = sha256_file(&path).unwrap();
        assert_eq!(from_file.size, data.len() as u64);
        assert_eq!(from_file.digest, sha256_bytes(&data));
        let mut w = HashingWriter::new(Vec::new());
        for chunk in data.chunks(7777) {
            w.write_all(chunk).unwrap();
        }
        let (out, info) = w.finish();
        assert_eq!(out, data);
        assert_eq!(info, from_file);
        // The empty blob is the well-known one.
        assert_eq!(
            sha256_bytes(b"").hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
