//! Registered datastores: the definition without its secrets (shown), and
//! the whole definition sealed by [`crate::secrets`] (used).

use drover_api::cluster::Timestamp;
use drover_api::datastore::DatastoreSpec;
use rusqlite::{OptionalExtension, params};

use super::{Store, StoreError, from_json, ms, to_json, ts};

/// A stored datastore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDatastore {
    /// The definition with every secret emptied.
    pub public: DatastoreSpec,
    /// The whole definition, sealed.
    pub sealed: Vec<u8>,
    /// When it was created.
    pub created_at: Timestamp,
}

impl Store {
    /// Adds a datastore; [`StoreError::AlreadyExists`] when the name is taken.
    pub fn add_datastore(
        &mut self,
        public: &DatastoreSpec,
        sealed: &[u8],
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let doc = to_json("datastore", public)?;
        match self.conn.execute(
            "INSERT INTO datastores (name, spec, sealed, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![public.name, doc, sealed, ms(now)],
        ) {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StoreError::AlreadyExists {
                    kind: "datastore",
                    name: public.name.clone(),
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Every datastore, by name.
    pub fn datastores(&self) -> Result<Vec<StoredDatastore>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT name, spec, sealed, created_at FROM datastores ORDER BY name",
        )?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(name, spec, sealed, at)| {
                Ok(StoredDatastore {
                    public: from_json(|| format!("datastore {name}"), &spec)?,
                    sealed,
                    created_at: ts(at),
                })
            })
            .collect()
    }

    /// One datastore.
    pub fn datastore(&self, name: &str) -> Result<StoredDatastore, StoreError> {
        let row = self
            .conn
            .query_row(
                "SELECT spec, sealed, created_at FROM datastores WHERE name = ?1",
                [name],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, Vec<u8>>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                },
            )
            .optional()?
            .ok_or_else(|| StoreError::not_found("datastore", name))?;
        Ok(StoredDatastore {
            public: from_json(|| format!("datastore {name}"), &row.0)?,
            sealed: row.1,
            created_at: ts(row.2),
        })
    }

    /// Removes a datastore (not its data).
    pub fn remove_datastore(&mut self, name: &str) -> Result<(), StoreError> {
        let n = self
            .conn
            .execute("DELETE FROM datastores WHERE name = ?1", [name])?;
        if n == 0 {
            return Err(StoreError::not_found("datastore", name));
        }
        Ok(())
    }
}
