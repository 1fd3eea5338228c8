//! Clusters, their join tokens and their recent scaling errors.

use drover_api::cluster::{ScalingError, Timestamp};
use drover_api::compute::ComputeSpec;
use rusqlite::{OptionalExtension, TransactionBehavior, params};

use super::tokens::hash_secret;
use super::{Store, StoreError, from_json, ms, to_json, ts};

/// A stored cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// Its definition.
    pub spec: ComputeSpec,
    /// When it was created.
    pub created_at: Timestamp,
    /// When its definition last changed.
    pub updated_at: Timestamp,
}

const CLUSTER_COLUMNS: &str = "name, spec, created_at, updated_at";

fn read_cluster(row: &rusqlite::Row<'_>) -> rusqlite::Result<(String, String, i64, i64)> {
    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
}

fn decode(
    (name, spec, created, updated): (String, String, i64, i64),
) -> Result<Cluster, StoreError> {
    Ok(Cluster {
        spec: from_json(|| format!("spec of cluster `{name}`"), &spec)?,
        created_at: ts(created),
        updated_at: ts(updated),
    })
}

impl Store {
    /// Creates a cluster whose agents join with `join_token` (only its hash
    /// is kept). The spec is stored as given: validate it first.
    pub fn create_cluster(
        &mut self,
        spec: &ComputeSpec,
        join_token: &str,
        now: Timestamp,
    ) -> Result<Cluster, StoreError> {
        let json = to_json("cluster spec", spec)?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let exists = tx
            .query_row(
                "SELECT 1 FROM clusters WHERE name = ?1",
                [&spec.name],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        if exists {
            return Err(StoreError::AlreadyExists {
                kind: "cluster",
                name: spec.name.clone(),
            });
        }
        tx.execute(
            "INSERT INTO clusters (name, spec, provider, min_nodes, max_nodes, join_token_hash,
                                   created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
            params![
                spec.name,
                json,
                spec.provider.unwrap_or_default().as_str(),
                spec.min_nodes,
                spec.max_nodes,
                hash_secret(join_token).as_slice(),
                ms(now)
            ],
        )?;
        tx.commit()?;
        tracing::info!(cluster = %spec.name, "cluster created");
        Ok(Cluster {
            spec: spec.clone(),
            created_at: now,
            updated_at: now,
        })
    }

    /// One cluster.
    pub fn cluster(&self, name: &str) -> Result<Cluster, StoreError> {
        let row = self
            .conn
            .prepare_cached(&format!(
                "SELECT {CLUSTER_COLUMNS} FROM clusters WHERE name = ?1"
            ))?
            .query_row([name], read_cluster)
            .optional()?
            .ok_or_else(|| StoreError::not_found("cluster", name))?;
        decode(row)
    }

    /// Every cluster, by name.
    pub fn clusters(&self) -> Result<Vec<Cluster>, StoreError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {CLUSTER_COLUMNS} FROM clusters ORDER BY name"
        ))?;
        let rows = stmt
            .query_map([], read_cluster)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(decode).collect()
    }

    /// Replaces a cluster's definition (found by `spec.name`). The spec is
    /// stored as given: build it with `ComputeSpec::updated`, which checks it.
    pub fn update_cluster(
        &mut self,
        spec: &ComputeSpec,
        now: Timestamp,
    ) -> Result<Cluster, StoreError> {
        let json = to_json("cluster spec", spec)?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let changed = tx.execute(
            "UPDATE clusters SET spec = ?2, provider = ?3, min_nodes = ?4, max_nodes = ?5,
                                 updated_at = ?6
             WHERE name = ?1",
            params![
                spec.name,
                json,
                spec.provider.unwrap_or_default().as_str(),
                spec.min_nodes,
                spec.max_nodes,
                ms(now)
            ],
        )?;
        if changed == 0 {
            return Err(StoreError::not_found("cluster", &spec.name));
        }
        let created: i64 = tx.query_row(
            "SELECT created_at FROM clusters WHERE name = ?1",
            [&spec.name],
            |r| r.get(0),
        )?;
        tx.commit()?;
        tracing::info!(cluster = %spec.name, "cluster updated");
        Ok(Cluster {
            spec: spec.clone(),
            created_at: ts(created),
            updated_at: now,
        })
    }

    /// Deletes a cluster with its finished jobs (and their parts and logs)
    /// and its scaling errors. Refused while it has nodes or unfinished jobs.
    pub fn delete_cluster(&mut self, name: &str) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let exists = tx
            .query_row("SELECT 1 FROM clusters WHERE name = ?1", [name], |_| Ok(()))
            .optional()?
            .is_some();
        if !exists {
            return Err(StoreError::not_found("cluster", name));
        }
        let nodes: i64 = tx.query_row(
            "SELECT count(*) FROM nodes WHERE cluster = ?1",
            [name],
            |r| r.get(0),
        )?;
        if nodes > 0 {
            return Err(StoreError::Conflict(format!(
                "cluster `{name}` still has {nodes} node(s); remove them first (nodes its provider created go once min nodes is 0 and they are idle)"
            )));
        }
        let unfinished: i64 = tx.query_row(
            "SELECT count(*) FROM jobs
             WHERE cluster = ?1 AND state NOT IN ('completed', 'failed', 'canceled')",
            [name],
            |r| r.get(0),
        )?;
        if unfinished > 0 {
            return Err(StoreError::Conflict(format!(
                "cluster `{name}` still has {unfinished} unfinished job(s); cancel them first"
            )));
        }
        // Jobs, their parts and logs, and scaling errors go by ON DELETE CASCADE.
        tx.execute("DELETE FROM clusters WHERE name = ?1", [name])?;
        tx.commit()?;
        tracing::info!(cluster = %name, "cluster deleted");
        Ok(())
    }

    /// Replaces a cluster's join token (only its hash is kept).
    pub fn set_join_token(&mut self, cluster: &str, token: &str) -> Result<(), StoreError> {
        let changed = self.conn.execute(
            "UPDATE clusters SET join_token_hash = ?2 WHERE name = ?1",
            params![cluster, hash_secret(token).as_slice()],
        )?;
        if changed == 0 {
            return Err(StoreError::not_found("cluster", cluster));
        }
        tracing::info!(cluster = %cluster, "join token replaced");
        Ok(())
    }

    /// Whether `token` is the cluster's join token.
    pub fn verify_join_token(&self, cluster: &str, token: &str) -> Result<bool, StoreError> {
        let hash: Vec<u8> = self
            .conn
            .prepare_cached("SELECT join_token_hash FROM clusters WHERE name = ?1")?
            .query_row([cluster], |r| r.get(0))
            .optional()?
            .ok_or_else(|| StoreError::not_found("cluster", cluster))?;
        // Digests of equal length; comparing digests, not secrets, leaks
        // nothing useful through timing.
        Ok(hash == hash_secret(token).as_slice())
    }

    /// Records a scaling problem of a cluster, keeping only the newest
    /// [`super::StoreConfig::scaling_errors_kept`].
    pub fn record_scaling_error(
        &mut self,
        cluster: &str,
        error: &ScalingError,
    ) -> Result<(), StoreError> {
        let keep = i64::from(self.config.scaling_errors_kept);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let exists = tx
            .query_row("SELECT 1 FROM clusters WHERE name = ?1", [cluster], |_| {
                Ok(())
            })
            .optional()?
            .is_some();
        if !exists {
            return Err(StoreError::not_found("cluster", cluster));
        }
        tx.execute(
            "INSERT INTO scaling_errors (cluster, at, message) VALUES (?1, ?2, ?3)",
            params![cluster, ms(error.at), error.message],
        )?;
        tx.execute(
            "DELETE FROM scaling_errors WHERE cluster = ?1 AND id NOT IN
                 (SELECT id FROM scaling_errors WHERE cluster = ?1 ORDER BY id DESC LIMIT ?2)",
            params![cluster, keep],
        )?;
        tx.commit()?;
        tracing::debug!(cluster = %cluster, message = %error.message, "scaling error recorded");
        Ok(())
    }

    /// A cluster's kept scaling errors, newest last.
    pub fn scaling_errors(&self, cluster: &str) -> Result<Vec<ScalingError>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT at, message FROM scaling_errors WHERE cluster = ?1 ORDER BY id",
        )?;
        let errors = stmt
            .query_map([cluster], |r| {
                Ok(ScalingError {
                    at: ts(r.get(0)?),
                    message: r.get(1)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(errors)
    }
}
