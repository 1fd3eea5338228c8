//! Datastore credentials at rest: sealed with XChaCha20-Poly1305 under a
//! key kept in the data directory (`datastore.key`, created 0600), so the
//! database alone never holds a usable secret.
//!
//! Architecture Invariant: only this module sees the key; what it seals is
//! opened only to reach a datastore, never to answer a request.

use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

/// The key file's name inside the data directory.
pub const KEY_FILE: &str = "datastore.key";

const KEY_BYTES: usize = 32;
const NONCE_BYTES: usize = 24;

/// Why sealing or opening failed.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    /// The key file could not be read or written.
    #[error("cannot use the key file {}", path.display())]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The key file holds something other than a key.
    #[error("the key file {} is not {KEY_BYTES} bytes", .0.display())]
    BadKey(PathBuf),
    /// The OS gave no random bytes.
    #[error("cannot get random bytes from the operating system")]
    Random(#[source] getrandom::Error),
    /// What was sealed does not open with this key (another data
    /// directory's, or damaged).
    #[error("a sealed secret does not open with this server's key")]
    Open,
}

/// The sealing key. `Debug` shows nothing of it.
pub struct Secrets {
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secrets(***)")
    }
}

impl Secrets {
    /// The key of `data_dir`, created (0600) on first use.
    pub fn open(data_dir: &Path) -> Result<Secrets, SecretsError> {
        let path = data_dir.join(KEY_FILE);
        let fail = |source| SecretsError::KeyFile {
            path: path.clone(),
            source,
        };
        let key = match std::fs::read(&path) {
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = vec![0u8; KEY_BYTES];
                getrandom::getrandom(&mut key).map_err(SecretsError::Random)?;
                write_new_0600(&path, &key).map_err(fail)?;
                // Another process may have won the race: read what is there.
                std::fs::read(&path).map_err(fail)?
            }
            Err(e) => return Err(fail(e)),
        };
        Secrets::from_key(&key).ok_or(SecretsError::BadKey(path))
    }

    /// A key from its bytes (tests).
    pub fn from_key(key: &[u8]) -> Option<Secrets> {
        (key.len() == KEY_BYTES)
            .then(|| XChaCha20Poly1305::new_from_slice(key).ok())
            .flatten()
            .map(|cipher| Secrets { cipher })
    }

    /// Seals `plain`: a random nonce, then the ciphertext and its tag.
    pub fn seal(&self, plain: &[u8]) -> Result<Vec<u8>, SecretsError> {
        let mut nonce = [0u8; NONCE_BYTES];
        getrandom::getrandom(&mut nonce).map_err(SecretsError::Random)?;
        let sealed = self
            .cipher
            .encrypt(&XNonce::from(nonce), plain)
            .map_err(|_| SecretsError::Open)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Opens what [`Secrets::seal`] sealed.
    pub fn unseal(&self, sealed: &[u8]) -> Result<Vec<u8>, SecretsError> {
        if sealed.len() < NONCE_BYTES {
            return Err(SecretsError::Open);
        }
        let (nonce, body) = sealed.split_at(NONCE_BYTES);
        let nonce: [u8; NONCE_BYTES] = nonce.try_into().map_err(|_| SecretsError::Open)?;
        self.cipher
            .decrypt(&XNonce::from(nonce), body)
            .map_err(|_| SecretsError::Open)
    }
}

fn write_new_0600(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.mode(0o600);
    match options.open(path) {
        Ok(mut f) => {
            f.write_all(bytes)?;
            f.sync_all()
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_secrets_open_only_with_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let s = Secrets::open(dir.path()).unwrap();
        let sealed = s.seal(b"account key").unwrap();
        assert!(!sealed.windows(7).any(|w| w == b"account"));
        assert_eq!(s.unseal(&sealed).unwrap(), b"account key");
        let again = Secrets::open(dir.path()).unwrap();
        assert_eq!(again.unseal(&sealed).unwrap(), b"account key");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let other = Secrets::from_key(&[7u8; 32]).unwrap();
        assert!(other.unseal(&sealed).is_err());
        assert!(s.unseal(b"short").is_err());
        assert_eq!(format!("{s:?}"), "Secrets(***)");
    }
}
