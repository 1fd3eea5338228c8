//! Nodes: registration, heartbeats, loss, and what each should run.

use drover_api::JobSpec;
use drover_api::cluster::{JobState, NodeState, NodeSummary, Timestamp};
use drover_api::inventory::Inventory;
use drover_api::wire::{LogCursor, PartKey};
use rusqlite::{OptionalExtension, TransactionBehavior, params};

use super::jobs::{PartState, requeue_in};
use super::tokens::hash_secret;
use super::{
    Store, StoreError, VersionBump, bump_version, count, from_json, ms, parse_col, to_json, ts,
};

/// What a node reports of itself.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeInventory {
    /// GPUs it reports healthy.
    pub healthy_gpus: u32,
    /// All its GPUs.
    pub total_gpus: u32,
    /// The whole inventory as the agent sent it; kept for display and the
    /// host path policy (the agent's data dir), never queried on in SQL.
    pub details: Inventory,
}

/// A node joining a cluster.
#[derive(Debug, Clone, Copy)]
pub struct NewNode<'a> {
    /// Node id, unique in the control plane.
    pub id: &'a str,
    /// The cluster it joins.
    pub cluster: &'a str,
    /// Its private IP address, when known.
    pub ip: Option<&'a str>,
    /// Its hardware.
    pub inventory: &'a NodeInventory,
    /// The credential the server issued it (only its hash is kept).
    pub credential: &'a str,
}

/// What a heartbeat changes; `None` fields stay as they are.
#[derive(Debug, Clone, Copy, Default)]
pub struct Heartbeat<'a> {
    /// The node's state, when the agent reports one (`leaving` on drain).
    pub state: Option<NodeState>,
    /// A new IP address.
    pub ip: Option<&'a str>,
    /// A changed inventory.
    pub inventory: Option<&'a NodeInventory>,
}

/// A stored node.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Node id.
    pub id: String,
    /// Its cluster.
    pub cluster: String,
    /// Current state.
    pub state: NodeState,
    /// Private IP address.
    pub ip: Option<String>,
    /// Its hardware.
    pub inventory: NodeInventory,
    /// When it registered.
    pub registered_at: Timestamp,
    /// When its last heartbeat arrived.
    pub last_heartbeat: Timestamp,
    /// Since when it has held no job.
    pub free_since: Option<Timestamp>,
    /// The job whose part it holds.
    pub current_job: Option<String>,
    /// Its desired-state version.
    pub desired_version: u64,
}

impl Node {
    /// What the scheduler and autoscaler read.
    pub fn summary(&self) -> NodeSummary {
        NodeSummary {
            id: self.id.clone(),
            state: self.state,
            healthy_gpus: self.inventory.healthy_gpus,
            total_gpus: self.inventory.total_gpus,
            last_heartbeat: self.last_heartbeat,
            free_since: self.free_since,
            current_job: self.current_job.clone(),
        }
    }
}

/// The result of [`Store::mark_node_lost`].
#[derive(Debug, Clone, PartialEq)]
pub struct NodeLost {
    /// The job the node held, after it was requeued or failed.
    pub job: Option<(String, JobState)>,
    /// Nodes whose desired state changed (the lost node and its job's
    /// other nodes).
    pub bumped: Vec<VersionBump>,
}

/// A node of a placement, as an assignment lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssignedNode {
    /// Node id.
    pub id: String,
    /// Its IP address, when known.
    pub ip: Option<String>,
}

/// One part a node should run.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    /// The part.
    pub part: PartKey,
    /// The part's state as last reported.
    pub state: PartState,
    /// Where the stored log of the part ends.
    pub log_cursor: Option<LogCursor>,
    /// What to run.
    pub spec: JobSpec,
    /// Every node of the attempt, rank 0 first (for the hostfile and
    /// `AZ_BATCH_NODE_LIST`).
    pub nodes: Vec<AssignedNode>,
    /// The attempt's launch secret (`None` for a job placed before there
    /// were any).
    pub launch_secret: Option<String>,
}

/// A node's desired state.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignments {
    /// The version this answer reflects.
    pub version: u64,
    /// Parts to run.
    pub parts: Vec<Assignment>,
}

const NODE_COLUMNS: &str = "id, cluster, state, ip, inventory, healthy_gpus, total_gpus, \
                            registered_at, last_heartbeat, free_since, current_job, desired_version";

struct NodeRow {
    node: Node,
    inventory: String,
}

fn read_node(row: &rusqlite::Row<'_>) -> rusqlite::Result<NodeRow> {
    Ok(NodeRow {
        inventory: row.get("inventory")?,
        node: Node {
            id: row.get("id")?,
            cluster: row.get("cluster")?,
            state: parse_col(row, "state")?,
            ip: row.get("ip")?,
            inventory: NodeInventory {
                healthy_gpus: count(row.get("healthy_gpus")?),
                total_gpus: count(row.get("total_gpus")?),
                details: Inventory::default(),
            },
            registered_at: ts(row.get("registered_at")?),
            last_heartbeat: ts(row.get("last_heartbeat")?),
            free_since: row.get::<_, Option<i64>>("free_since")?.map(ts),
            current_job: row.get("current_job")?,
            desired_version: u64::try_from(row.get::<_, i64>("desired_version")?).unwrap_or(0),
        },
    })
}

impl NodeRow {
    fn decode(self) -> Result<Node, StoreError> {
        let mut node = self.node;
        node.inventory.details = from_json(
            || format!("inventory of node `{}`", node.id),
            &self.inventory,
        )?;
        Ok(node)
    }
}

fn load_node(conn: &rusqlite::Connection, id: &str) -> Result<Node, StoreError> {
    conn.prepare_cached(&format!("SELECT {NODE_COLUMNS} FROM nodes WHERE id = ?1"))?
        .query_row([id], read_node)
        .optional()?
        .ok_or_else(|| StoreError::not_found("node", id))?
        .decode()
}

fn require_cluster(conn: &rusqlite::Connection, name: &str) -> Result<(), StoreError> {
    conn.prepare_cached("SELECT 1 FROM clusters WHERE name = ?1")?
        .query_row([name], |_| Ok(()))
        .optional()?
        .ok_or_else(|| StoreError::not_found("cluster", name))
}

impl Store {
    /// Registers a node: idle, free and heard from `now`.
    pub fn register_node(&mut self, new: &NewNode<'_>, now: Timestamp) -> Result<Node, StoreError> {
        let inventory = to_json("node inventory", &new.inventory.details)?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        require_cluster(&tx, new.cluster)?;
        let taken = tx
            .query_row("SELECT 1 FROM nodes WHERE id = ?1", [new.id], |_| Ok(()))
            .optional()?
            .is_some();
        if taken {
            return Err(StoreError::AlreadyExists {
                kind: "node",
                name: new.id.to_string(),
            });
        }
        tx.execute(
            "INSERT INTO nodes (id, cluster, state, ip, inventory, healthy_gpus, total_gpus,
                                credential_hash, registered_at, last_heartbeat, free_since,
                                desired_version)
             VALUES (?1, ?2, 'idle', ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?8, 0)",
            params![
                new.id,
                new.cluster,
                new.ip,
                inventory,
                new.inventory.healthy_gpus,
                new.inventory.total_gpus,
                hash_secret(new.credential).as_slice(),
                ms(now)
            ],
        )?;
        // A fresh version from the global counter: an agent that watched an
        // earlier node of the same id sees a change, never an old number.
        bump_version(&tx, new.id)?;
        let node = load_node(&tx, new.id)?;
        tx.commit()?;
        tracing::info!(node = %new.id, cluster = %new.cluster, "node registered");
        Ok(node)
    }

    /// One node.
    pub fn node(&self, id: &str) -> Result<Node, StoreError> {
        load_node(&self.conn, id)
    }

    /// The node whose credential is `credential`, if any.
    pub fn node_by_credential(&self, credential: &str) -> Result<Option<Node>, StoreError> {
        let row = self
            .conn
            .prepare_cached(&format!(
                "SELECT {NODE_COLUMNS} FROM nodes WHERE credential_hash = ?1"
            ))?
            .query_row([hash_secret(credential).as_slice()], read_node)
            .optional()?;
        row.map(NodeRow::decode).transpose()
    }

    /// A cluster's nodes, by id.
    pub fn nodes(&self, cluster: &str) -> Result<Vec<Node>, StoreError> {
        require_cluster(&self.conn, cluster)?;
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {NODE_COLUMNS} FROM nodes WHERE cluster = ?1 ORDER BY id"
        ))?;
        let rows = stmt
            .query_map([cluster], read_node)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(NodeRow::decode).collect()
    }

    /// Every node of every cluster, by cluster then id (`drover node list`
    /// without a cluster).
    pub fn all_nodes(&self) -> Result<Vec<Node>, StoreError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {NODE_COLUMNS} FROM nodes ORDER BY cluster, id"
        ))?;
        let rows = stmt
            .query_map([], read_node)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(NodeRow::decode).collect()
    }

    /// What the scheduler and autoscaler need of a cluster's nodes, by id,
    /// without decoding inventories.
    pub fn node_summaries(&self, cluster: &str) -> Result<Vec<NodeSummary>, StoreError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {NODE_COLUMNS} FROM nodes WHERE cluster = ?1 ORDER BY id"
        ))?;
        let nodes = stmt
            .query_map([cluster], read_node)?
            .map(|r| r.map(|row| row.node.summary()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(nodes)
    }

    /// Records a heartbeat: the time, and whatever it changed.
    pub fn heartbeat(
        &mut self,
        id: &str,
        beat: &Heartbeat<'_>,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let inventory = beat
            .inventory
            .map(|i| to_json("node inventory", &i.details))
            .transpose()?;
        // One statement: the hot path of 10,000 agents is a single write.
        let changed = self
            .conn
            .prepare_cached(
                "UPDATE nodes SET last_heartbeat = ?2,
                     state = COALESCE(?3, state),
                     ip = COALESCE(?4, ip),
                     inventory = COALESCE(?5, inventory),
                     healthy_gpus = COALESCE(?6, healthy_gpus),
                     total_gpus = COALESCE(?7, total_gpus),
                     free_since = CASE WHEN current_job IS NULL
                                       THEN COALESCE(free_since, ?2) ELSE NULL END
                 WHERE id = ?1",
            )?
            .execute(params![
                id,
                ms(now),
                beat.state.map(NodeState::as_str),
                beat.ip,
                inventory,
                beat.inventory.map(|i| i.healthy_gpus),
                beat.inventory.map(|i| i.total_gpus),
            ])?;
        if changed == 0 {
            return Err(StoreError::not_found("node", id));
        }
        tracing::debug!(node = %id, state = ?beat.state, "heartbeat");
        Ok(())
    }

    /// Live or leaving nodes (of every cluster) not heard from since `before`:
    /// the candidates for [`Store::mark_node_lost`].
    pub fn silent_nodes(&self, before: Timestamp) -> Result<Vec<String>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id FROM nodes
             WHERE last_heartbeat < ?1 AND state IN ('idle', 'running', 'preparing', 'leaving')
             ORDER BY id",
        )?;
        let ids = stmt
            .query_map([ms(before)], |r| r.get(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ids)
    }

    /// Marks a node `unusable` or `preempted` and, in the same transaction,
    /// requeues the job it held (or fails it when out of attempts).
    pub fn mark_node_lost(
        &mut self,
        id: &str,
        state: NodeState,
        reason: &str,
        now: Timestamp,
    ) -> Result<NodeLost, StoreError> {
        if !matches!(state, NodeState::Unusable | NodeState::Preempted) {
            return Err(StoreError::Invalid(format!(
                "a lost node becomes unusable or preempted, not {state}"
            )));
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let node = load_node(&tx, id)?;
        tx.execute(
            "UPDATE nodes SET state = ?2 WHERE id = ?1",
            params![id, state.as_str()],
        )?;
        let mut bumped = Vec::new();
        let mut job = None;
        if let Some(j) = &node.current_job {
            let held: JobState =
                tx.query_row("SELECT state FROM jobs WHERE id = ?1", [j], |r| {
                    parse_col(r, "state")
                })?;
            if held.holds_nodes() {
                bumped = requeue_in(&tx, j, &format!("node `{id}` {state}: {reason}"), now)?;
            } else {
                // Not expected (ending a job releases its nodes), but a stale
                // pointer must not keep the node busy forever.
                tx.execute(
                    "UPDATE nodes SET current_job = NULL, free_since = ?2 WHERE id = ?1",
                    params![id, ms(now)],
                )?;
                bumped.push(bump_version(&tx, id)?);
            }
            let after: JobState =
                tx.query_row("SELECT state FROM jobs WHERE id = ?1", [j], |r| {
                    parse_col(r, "state")
                })?;
            job = Some((j.clone(), after));
        }
        tx.commit()?;
        tracing::info!(node = %id, state = %state, reason, job = ?job, "node lost");
        Ok(NodeLost { job, bumped })
    }

    /// Marks an idle node that holds no job `leaving`, so nothing is placed
    /// on it while its machine is removed. False when it was not idle (a
    /// placement won the race) — then it must stay.
    pub fn mark_node_leaving(&mut self, id: &str) -> Result<bool, StoreError> {
        let changed = self.conn.execute(
            "UPDATE nodes SET state = 'leaving'
             WHERE id = ?1 AND state = 'idle' AND current_job IS NULL",
            [id],
        )?;
        Ok(changed == 1)
    }

    /// Removes a node (scale-down, decommission). Refused while it holds a
    /// job. Its parts' history stays.
    pub fn remove_node(&mut self, id: &str) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let node = load_node(&tx, id)?;
        if let Some(job) = node.current_job {
            return Err(StoreError::Conflict(format!(
                "node `{id}` still holds job `{job}`"
            )));
        }
        tx.execute("DELETE FROM nodes WHERE id = ?1", [id])?;
        tx.commit()?;
        tracing::info!(node = %id, "node removed");
        Ok(())
    }

    /// A node's desired-state version (cheap: for the long-poll's check).
    pub fn desired_version(&self, id: &str) -> Result<u64, StoreError> {
        let v: i64 = self
            .conn
            .prepare_cached("SELECT desired_version FROM nodes WHERE id = ?1")?
            .query_row([id], |r| r.get(0))
            .optional()?
            .ok_or_else(|| StoreError::not_found("node", id))?;
        Ok(u64::try_from(v).unwrap_or(0))
    }

    /// What a node should run now: the live parts of the current attempts of
    /// its placed jobs, with the version they reflect (read in one
    /// transaction, so the two agree).
    pub fn assignments(&self, id: &str) -> Result<Assignments, StoreError> {
        let tx = self.conn.unchecked_transaction()?;
        let version = {
            let v: i64 = tx
                .query_row(
                    "SELECT desired_version FROM nodes WHERE id = ?1",
                    [id],
                    |r| r.get(0),
                )
                .optional()?
                .ok_or_else(|| StoreError::not_found("node", id))?;
            u64::try_from(v).unwrap_or(0)
        };
        type Row = (
            String,
            u32,
            u32,
            PartState,
            String,
            Option<LogCursor>,
            Option<String>,
        );
        let rows: Vec<Row> = {
            let mut stmt = tx.prepare_cached(
                "SELECT p.job, p.attempt, p.node_rank, p.state, j.spec, p.log_at_ns, p.log_index,
                        j.launch_secret
                 FROM job_parts p JOIN jobs j ON j.id = p.job AND j.attempt = p.attempt
                 WHERE p.node = ?1 AND p.state IN ('assigned', 'preparing', 'running')
                   AND j.state IN ('preparing', 'running')
                 ORDER BY j.seq",
            )?;
            stmt.query_map([id], |r| {
                let at: Option<i64> = r.get(5)?;
                let index: Option<i64> = r.get(6)?;
                Ok((
                    r.get(0)?,
                    count(r.get(1)?),
                    count(r.get(2)?),
                    parse_col(r, "state")?,
                    r.get(4)?,
                    at.zip(index).map(|(at, index)| LogCursor {
                        at_ns: u64::try_from(at).unwrap_or(0),
                        index: count(index),
                    }),
                    r.get(7)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?
        };
        let mut parts = Vec::with_capacity(rows.len());
        for (job, attempt, node_rank, state, spec, log_cursor, launch_secret) in rows {
            let nodes = {
                let mut stmt = tx.prepare_cached(
                    "SELECT p.node, n.ip FROM job_parts p LEFT JOIN nodes n ON n.id = p.node
                     WHERE p.job = ?1 AND p.attempt = ?2 ORDER BY p.node_rank",
                )?;
                stmt.query_map(params![job, attempt], |r| {
                    Ok(AssignedNode {
                        id: r.get(0)?,
                        ip: r.get(1)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?
            };
            parts.push(Assignment {
                spec: from_json(|| format!("spec of job `{job}`"), &spec)?,
                part: PartKey {
                    job,
                    attempt,
                    node_rank,
                },
                log_cursor,
                state,
                nodes,
                launch_secret,
            });
        }
        tx.finish()?;
        Ok(Assignments { version, parts })
    }
}
