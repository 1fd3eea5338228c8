//! Registered environments (one row per version) and the builds of their
//! images (one row per image name).

use std::time::Duration;

use drover_api::cluster::Timestamp;
use drover_api::environment::{BuildDecision, EnvironmentSpec, EnvironmentUpdate, next_version};
use rusqlite::{OptionalExtension, params};

use super::{Store, StoreError, from_json, ms, to_json, ts};

/// A stored environment version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEnvironment {
    /// The definition; its `version` is always set.
    pub spec: EnvironmentSpec,
    /// The version (`spec.version`, unwrapped).
    pub version: String,
    /// Hidden from lists and from `@latest`.
    pub archived: bool,
    /// When it was created.
    pub created_at: Timestamp,
}

/// Where an image's build stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildRowState {
    /// A node took the build (for the registry) and has not reported.
    Building,
    /// Built (and pushed, with a registry).
    Built,
    /// Failed; jobs naming it are refused.
    Failed,
}

impl BuildRowState {
    fn as_str(self) -> &'static str {
        match self {
            BuildRowState::Building => "building",
            BuildRowState::Built => "built",
            BuildRowState::Failed => "failed",
        }
    }

    fn parse(s: &str) -> BuildRowState {
        match s {
            "built" => BuildRowState::Built,
            "failed" => BuildRowState::Failed,
            _ => BuildRowState::Building,
        }
    }
}

/// One image's build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildRow {
    /// Its state.
    pub state: BuildRowState,
    /// The node that took it last.
    pub node: Option<String>,
    /// When that node took it.
    pub started_at: Timestamp,
    /// Why it failed.
    pub failure: Option<String>,
}

/// What a node asking to build an image should do, and the row to store.
///
/// Without a registry every node builds its own copy, so it is told to
/// build unless the image is known to fail. With one, one node builds and
/// pushes while the others wait and then pull; a builder that has not
/// reported within `lease` (lost, or restarted without its build) is
/// replaced by the next node that asks, and a node asking again for a
/// build it holds gets it again.
pub fn decide_build(
    row: Option<&BuildRow>,
    node: &str,
    registry: bool,
    now: Timestamp,
    lease: Duration,
) -> (BuildDecision, Option<BuildRow>) {
    let take = || BuildRow {
        state: BuildRowState::Building,
        node: Some(node.to_string()),
        started_at: now,
        failure: None,
    };
    match row {
        Some(r) if r.state == BuildRowState::Failed => (
            BuildDecision::Failed {
                reason: r.failure.clone().unwrap_or_default(),
            },
            None,
        ),
        Some(r) if r.state == BuildRowState::Built && registry => (BuildDecision::Pull, None),
        _ if !registry => (BuildDecision::Build, None),
        Some(r) if r.state == BuildRowState::Building => {
            let expired = now.0.saturating_sub(r.started_at.0)
                >= u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
            match &r.node {
                Some(n) if n != node && !expired => (BuildDecision::Wait { node: n.clone() }, None),
                _ => (BuildDecision::Build, Some(take())),
            }
        }
        _ => (BuildDecision::Build, Some(take())),
    }
}

fn read_env(
    name: &str,
    spec: &str,
    archived: i64,
    created: i64,
) -> Result<StoredEnvironment, StoreError> {
    let spec: EnvironmentSpec = from_json(|| format!("environment {name}"), spec)?;
    Ok(StoredEnvironment {
        version: spec.version.clone().unwrap_or_default(),
        spec,
        archived: archived != 0,
        created_at: ts(created),
    })
}

const COLUMNS: &str = "name, spec, archived, created_at";

impl Store {
    /// Adds a version of an environment: `spec.version`, or when `None`
    /// the next integer. [`StoreError::AlreadyExists`] when the version is
    /// taken (versions never change once created).
    pub fn add_environment(
        &mut self,
        spec: &EnvironmentSpec,
        now: Timestamp,
    ) -> Result<StoredEnvironment, StoreError> {
        let tx = self.conn.transaction()?;
        let mut spec = spec.clone();
        let version = match &spec.version {
            Some(v) => v.clone(),
            None => {
                let mut stmt =
                    tx.prepare_cached("SELECT version FROM environments WHERE name = ?1")?;
                let versions = stmt
                    .query_map([&spec.name], |r| r.get::<_, String>(0))?
                    .collect::<Result<Vec<_>, _>>()?;
                next_version(versions.iter().map(String::as_str))
            }
        };
        spec.version = Some(version.clone());
        let doc = to_json("environment", &spec)?;
        match tx.execute(
            "INSERT INTO environments (name, version, spec, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?4)",
            params![spec.name, version, doc, ms(now)],
        ) {
            Ok(_) => {}
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                return Err(StoreError::AlreadyExists {
                    kind: "environment version",
                    name: format!("{}:{version}", spec.name),
                });
            }
            Err(e) => return Err(e.into()),
        }
        tx.commit()?;
        Ok(StoredEnvironment {
            spec,
            version,
            archived: false,
            created_at: now,
        })
    }

    fn environments_where(
        &self,
        clause: &str,
        args: &[&dyn rusqlite::ToSql],
    ) -> Result<Vec<StoredEnvironment>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM environments {clause}");
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let rows = stmt
            .query_map(args, |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.iter()
            .map(|(n, s, a, c)| read_env(n, s, *a, *c))
            .collect()
    }

    /// The newest version of every environment not archived, by name.
    pub fn latest_environments(&self) -> Result<Vec<StoredEnvironment>, StoreError> {
        self.environments_where(
            "WHERE seq IN (SELECT MAX(seq) FROM environments WHERE archived = 0 GROUP BY name) ORDER BY name",
            &[],
        )
    }

    /// The versions of `name`, newest first; archived ones only when asked.
    pub fn environment_versions(
        &self,
        name: &str,
        include_archived: bool,
    ) -> Result<Vec<StoredEnvironment>, StoreError> {
        let archived = i64::from(include_archived);
        self.environments_where(
            "WHERE name = ?1 AND (archived = 0 OR ?2 = 1) ORDER BY seq DESC",
            &[&name, &archived],
        )
    }

    /// One version, archived or not.
    pub fn environment(&self, name: &str, version: &str) -> Result<StoredEnvironment, StoreError> {
        self.environments_where("WHERE name = ?1 AND version = ?2", &[&name, &version])?
            .pop()
            .ok_or_else(|| {
                StoreError::not_found("environment version", &format!("{name}:{version}"))
            })
    }

    /// The most recently created version of `name` not archived.
    pub fn latest_environment(&self, name: &str) -> Result<StoredEnvironment, StoreError> {
        self.environment_versions(name, false)?
            .into_iter()
            .next()
            .ok_or_else(|| StoreError::not_found("environment", name))
    }

    /// Changes a version's description and tags.
    pub fn update_environment(
        &mut self,
        name: &str,
        version: &str,
        update: &EnvironmentUpdate,
        now: Timestamp,
    ) -> Result<StoredEnvironment, StoreError> {
        let tx = self.conn.transaction()?;
        let spec: String = tx
            .query_row(
                "SELECT spec FROM environments WHERE name = ?1 AND version = ?2",
                [name, version],
                |r| r.get(0),
            )
            .optional()?
            .ok_or_else(|| {
                StoreError::not_found("environment version", &format!("{name}:{version}"))
            })?;
        let mut spec: EnvironmentSpec = from_json(|| format!("environment {name}"), &spec)?;
        if let Some(d) = &update.description {
            spec.description = Some(d.clone());
        }
        for k in &update.remove_tags {
            spec.tags.remove(k);
        }
        spec.tags
            .extend(update.tags.iter().map(|(k, v)| (k.clone(), v.clone())));
        let doc = to_json("environment", &spec)?;
        tx.execute(
            "UPDATE environments SET spec = ?3, updated_at = ?4 WHERE name = ?1 AND version = ?2",
            params![name, version, doc, ms(now)],
        )?;
        tx.commit()?;
        self.environment(name, version)
    }

    /// Archives or restores one version, or every version of `name` when
    /// `version` is `None`; returns how many rows changed.
    pub fn set_environment_archived(
        &mut self,
        name: &str,
        version: Option<&str>,
        archived: bool,
        now: Timestamp,
    ) -> Result<usize, StoreError> {
        let n = self.conn.execute(
            "UPDATE environments SET archived = ?3, updated_at = ?4 WHERE name = ?1 AND (?2 IS NULL OR version = ?2)",
            params![name, version, i64::from(archived), ms(now)],
        )?;
        if n == 0 {
            let what = match version {
                Some(v) => format!("{name}:{v}"),
                None => name.to_string(),
            };
            return Err(StoreError::not_found("environment", &what));
        }
        Ok(n)
    }

    /// The build of `image`, if any node asked for one.
    pub fn image_build(&self, image: &str) -> Result<Option<BuildRow>, StoreError> {
        let row = self
            .conn
            .query_row(
                "SELECT state, node, started_at, failure FROM image_builds WHERE image = ?1",
                [image],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, Option<String>>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, Option<String>>(3)?,
                    ))
                },
            )
            .optional()?;
        Ok(row.map(|(state, node, started, failure)| BuildRow {
            state: BuildRowState::parse(&state),
            node,
            started_at: ts(started),
            failure,
        }))
    }

    /// Decides a node's request to build `image` ([`decide_build`]) and
    /// stores the lease it takes, in one transaction.
    pub fn request_build(
        &mut self,
        image: &str,
        node: &str,
        registry: bool,
        now: Timestamp,
        lease: Duration,
    ) -> Result<BuildDecision, StoreError> {
        let tx = self.conn.transaction()?;
        let row = {
            let mut stmt = tx.prepare_cached(
                "SELECT state, node, started_at, failure FROM image_builds WHERE image = ?1",
            )?;
            stmt.query_row([image], |r| {
                Ok(BuildRow {
                    state: BuildRowState::parse(&r.get::<_, String>(0)?),
                    node: r.get(1)?,
                    started_at: ts(r.get(2)?),
                    failure: r.get(3)?,
                })
            })
            .optional()?
        };
        let (decision, new_row) = decide_build(row.as_ref(), node, registry, now, lease);
        if let Some(r) = new_row {
            write_build(&tx, image, &r)?;
        }
        tx.commit()?;
        Ok(decision)
    }

    /// Gives up `node`'s lease on `image` without a verdict (its push
    /// failed): the next node to ask builds it.
    pub fn release_build(&mut self, image: &str, node: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "DELETE FROM image_builds WHERE image = ?1 AND node = ?2 AND state = 'building'",
            [image, node],
        )?;
        Ok(())
    }

    /// Records how a node's build of `image` ended. A success always
    /// counts (the image exists); a failure marks the image failed.
    pub fn report_build(
        &mut self,
        image: &str,
        node: &str,
        failure: Option<&str>,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let row = BuildRow {
            state: if failure.is_some() {
                BuildRowState::Failed
            } else {
                BuildRowState::Built
            },
            node: Some(node.to_string()),
            started_at: now,
            failure: failure.map(str::to_string),
        };
        let tx = self.conn.transaction()?;
        // A success reported after another node's failure still means the
        // image exists; a failure after a success is that node's alone.
        let existing: Option<String> = tx
            .query_row(
                "SELECT state FROM image_builds WHERE image = ?1",
                [image],
                |r| r.get(0),
            )
            .optional()?;
        if !(failure.is_some() && existing.as_deref() == Some("built")) {
            write_build(&tx, image, &row)?;
        }
        tx.execute(
            "UPDATE image_builds SET ended_at = ?2 WHERE image = ?1",
            params![image, ms(now)],
        )?;
        tx.commit()?;
        Ok(())
    }
}

fn write_build(
    tx: &rusqlite::Transaction<'_>,
    image: &str,
    r: &BuildRow,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO image_builds (image, state, node, started_at, failure) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (image) DO UPDATE SET state = ?2, node = ?3, started_at = ?4, failure = ?5, ended_at = NULL",
        params![image, r.state.as_str(), r.node, ms(r.started_at), r.failure],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use drover_api::environment::EnvironmentSource;

    use super::*;

    fn spec(name: &str, version: Option<&str>) -> EnvironmentSpec {
        EnvironmentSpec {
            name: name.into(),
            version: version.map(str::to_string),
            description: None,
            tags: Default::default(),
            source: EnvironmentSource::Image {
                image: "busybox".into(),
            },
            conda_file: None,
        }
    }

    #[test]
    fn versions_count_up_latest_is_the_newest_created_and_archived_ones_hide() {
        let mut s = Store::open_in_memory().unwrap();
        assert_eq!(
            s.add_environment(&spec("t", None), Timestamp(1))
                .unwrap()
                .version,
            "1"
        );
        assert_eq!(
            s.add_environment(&spec("t", Some("beta")), Timestamp(2))
                .unwrap()
                .version,
            "beta"
        );
        assert_eq!(
            s.add_environment(&spec("t", None), Timestamp(3))
                .unwrap()
                .version,
            "2"
        );
        let e = s
            .add_environment(&spec("t", Some("2")), Timestamp(4))
            .unwrap_err();
        assert!(matches!(e, StoreError::AlreadyExists { .. }), "{e}");
        // Newest created, not highest number.
        s.add_environment(&spec("t", Some("0")), Timestamp(5))
            .unwrap();
        assert_eq!(s.latest_environment("t").unwrap().version, "0");
        s.add_environment(&spec("u", None), Timestamp(6)).unwrap();
        let latest: Vec<_> = s
            .latest_environments()
            .unwrap()
            .into_iter()
            .map(|e| (e.spec.name, e.version))
            .collect();
        assert_eq!(latest, [("t".into(), "0".into()), ("u".into(), "1".into())]);
        s.set_environment_archived("t", Some("0"), true, Timestamp(7))
            .unwrap();
        assert_eq!(s.latest_environment("t").unwrap().version, "2");
        assert_eq!(s.environment_versions("t", false).unwrap().len(), 3);
        assert_eq!(s.environment_versions("t", true).unwrap().len(), 4);
        // A pinned archived version still reads.
        assert!(s.environment("t", "0").unwrap().archived);
        s.set_environment_archived("u", None, true, Timestamp(8))
            .unwrap();
        assert!(matches!(
            s.latest_environment("u"),
            Err(StoreError::NotFound { .. })
        ));
        s.set_environment_archived("u", None, false, Timestamp(9))
            .unwrap();
        assert_eq!(s.latest_environment("u").unwrap().version, "1");
        let u = EnvironmentUpdate {
            description: Some("d".into()),
            tags: [("k".to_string(), "v".to_string())].into(),
            remove_tags: vec![],
        };
        let e = s.update_environment("u", "1", &u, Timestamp(10)).unwrap();
        assert_eq!(e.spec.description.as_deref(), Some("d"));
        assert_eq!(e.spec.tags["k"], "v");
    }

    #[test]
    fn one_node_builds_for_the_registry_and_the_others_wait_then_pull() {
        let lease = Duration::from_secs(60);
        let mut s = Store::open_in_memory().unwrap();
        let img = "r/t:1";
        assert_eq!(
            s.request_build(img, "a", true, Timestamp(0), lease)
                .unwrap(),
            BuildDecision::Build
        );
        assert_eq!(
            s.request_build(img, "b", true, Timestamp(1000), lease)
                .unwrap(),
            BuildDecision::Wait { node: "a".into() }
        );
        // The builder asking again keeps its lease.
        assert_eq!(
            s.request_build(img, "a", true, Timestamp(2000), lease)
                .unwrap(),
            BuildDecision::Build
        );
        s.report_build(img, "a", None, Timestamp(3000)).unwrap();
        assert_eq!(
            s.request_build(img, "b", true, Timestamp(4000), lease)
                .unwrap(),
            BuildDecision::Pull
        );
        // A lost builder's lease passes on.
        let img2 = "r/t:2";
        s.request_build(img2, "a", true, Timestamp(0), lease)
            .unwrap();
        assert_eq!(
            s.request_build(img2, "b", true, Timestamp(61_000), lease)
                .unwrap(),
            BuildDecision::Build
        );
        s.report_build(img2, "b", Some("step 2: exit 1"), Timestamp(62_000))
            .unwrap();
        assert_eq!(
            s.request_build(img2, "c", true, Timestamp(63_000), lease)
                .unwrap(),
            BuildDecision::Failed {
                reason: "step 2: exit 1".into()
            }
        );
        // Without a registry every node builds its own.
        assert_eq!(
            s.request_build("local:1", "a", false, Timestamp(0), lease)
                .unwrap(),
            BuildDecision::Build
        );
        assert_eq!(
            s.request_build("local:1", "b", false, Timestamp(0), lease)
                .unwrap(),
            BuildDecision::Build
        );
        assert_eq!(s.image_build("local:1").unwrap(), None);
        s.report_build("local:1", "a", None, Timestamp(5)).unwrap();
        assert_eq!(
            s.image_build("local:1").unwrap().unwrap().state,
            BuildRowState::Built
        );
        // A failure after a success is that node's alone.
        s.report_build("local:1", "b", Some("disk full"), Timestamp(6))
            .unwrap();
        assert_eq!(
            s.image_build("local:1").unwrap().unwrap().state,
            BuildRowState::Built
        );
    }
}
