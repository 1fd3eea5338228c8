//! API tokens, and the digest every stored secret goes through.

use drover_api::cluster::Timestamp;
use rusqlite::{OptionalExtension, TransactionBehavior, params};
use sha2::{Digest, Sha256};

use super::{Store, StoreError, ms};

/// The SHA-256 digest under which a secret is stored.
///
/// A plain hash without salt is enough: the secrets are long random tokens
/// the server generates, not passwords a person chose.
pub(crate) fn hash_secret(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

impl Store {
    /// Stores a user API token under a name (only its hash is kept).
    pub fn add_api_token(
        &mut self,
        name: &str,
        token: &str,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let hash = hash_secret(token);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let taken = tx
            .query_row("SELECT 1 FROM api_tokens WHERE name = ?1", [name], |_| {
                Ok(())
            })
            .optional()?
            .is_some();
        if taken {
            return Err(StoreError::AlreadyExists {
                kind: "api token",
                name: name.to_string(),
            });
        }
        let reused = tx
            .query_row(
                "SELECT 1 FROM api_tokens WHERE hash = ?1",
                [hash.as_slice()],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        if reused {
            // Do not say under which name: that would leak it.
            return Err(StoreError::Conflict(
                "this token is already registered".to_string(),
            ));
        }
        tx.execute(
            "INSERT INTO api_tokens (name, hash, created_at) VALUES (?1, ?2, ?3)",
            params![name, hash.as_slice(), ms(now)],
        )?;
        tx.commit()?;
        tracing::info!(token = %name, "api token added");
        Ok(())
    }

    /// The name of the API token `token`, or `None` when it is not one.
    pub fn api_token_name(&self, token: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT name FROM api_tokens WHERE hash = ?1")?
            .query_row([hash_secret(token).as_slice()], |r| r.get(0))
            .optional()?)
    }

    /// How many API tokens exist (none at first start: the server creates one).
    pub fn api_token_count(&self) -> Result<u64, StoreError> {
        let n: i64 = self
            .conn
            .query_row("SELECT count(*) FROM api_tokens", [], |r| r.get(0))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Removes an API token by name.
    pub fn remove_api_token(&mut self, name: &str) -> Result<(), StoreError> {
        let removed = self
            .conn
            .execute("DELETE FROM api_tokens WHERE name = ?1", [name])?;
        if removed == 0 {
            return Err(StoreError::not_found("api token", name));
        }
        tracing::info!(token = %name, "api token removed");
        Ok(())
    }
}
