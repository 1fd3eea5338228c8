//! The one error type of control-plane actions, and its HTTP mapping.

use drover_api::compute::InvalidCompute;
use drover_api::job::InvalidJob;
use drover_api::wire::ErrorCode;
use drover_api::wire::InvalidBody;

use crate::artifacts::ArtifactError;
use crate::autoscaler::SubmissionError;
use crate::provider::ProviderError;
use crate::store::StoreError;

/// Why a control-plane action failed. Every handler returns this; the HTTP
/// layer turns it into a status and an [`drover_api::wire::ErrorBody`] via
/// [`ControlError::code`].
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A cluster definition failed validation.
    #[error(transparent)]
    InvalidCompute(#[from] InvalidCompute),
    /// A job failed validation or its cluster's host path policy.
    #[error(transparent)]
    InvalidJob(#[from] InvalidJob),
    /// A user's request body was refused by its strict reading.
    #[error("invalid request body: {0}")]
    InvalidBody(#[from] InvalidBody),
    /// A job cannot ever run on its cluster.
    #[error(transparent)]
    Submission(#[from] SubmissionError),
    /// A provider refused or failed (e.g. `drover node evict`).
    #[error(transparent)]
    Provider(#[from] ProviderError),
    /// The artifact store refused or failed.
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    /// Datastore secrets could not be sealed or opened.
    #[error(transparent)]
    Secrets(#[from] crate::secrets::SecretsError),
    /// Something named does not exist; the message says what.
    #[error("{0}")]
    NotFound(String),
    /// The server failed; the message says how.
    #[error("{0}")]
    Internal(String),
    /// The request is malformed; the message says what.
    #[error("{0}")]
    Invalid(String),
    /// The request body is over the limit; the message says which.
    #[error("{0}")]
    TooLarge(String),
    /// No credential, or a credential that is not one.
    #[error("{0}")]
    Unauthorized(String),
    /// A valid credential that does not allow this.
    #[error("{0}")]
    Forbidden(String),
    /// A blocking store call could not run to its end (its thread panicked
    /// or the runtime is shutting down).
    #[error("store task failed")]
    StoreTask(#[source] tokio::task::JoinError),
    /// The OS gave no random bytes for a secret or an id.
    #[error("cannot get random bytes from the operating system")]
    Random(#[source] getrandom::Error),
    /// The store mutex was poisoned by a panic in another request.
    #[error("store is unavailable after an internal panic")]
    Poisoned,
}

impl ControlError {
    /// The error code (and so the HTTP status) this error is answered with.
    pub fn code(&self) -> ErrorCode {
        match self {
            ControlError::Store(e) => match e {
                StoreError::NotFound { .. } => ErrorCode::NotFound,
                StoreError::AlreadyExists { .. }
                | StoreError::Conflict(_)
                | StoreError::InvalidTransition { .. } => ErrorCode::Conflict,
                StoreError::Invalid(_) => ErrorCode::Invalid,
                StoreError::Busy(_) => ErrorCode::Busy,
                StoreError::Sqlite(_)
                | StoreError::Corrupt { .. }
                | StoreError::CreateDir { .. }
                | StoreError::TooNew { .. }
                | StoreError::Migration { .. } => ErrorCode::Internal,
            },
            ControlError::InvalidCompute(_)
            | ControlError::InvalidJob(_)
            | ControlError::InvalidBody(_)
            | ControlError::Submission(_)
            | ControlError::Invalid(_) => ErrorCode::Invalid,
            ControlError::Provider(e) => match e {
                ProviderError::NotSupported { .. } | ProviderError::Unavailable { .. } => {
                    ErrorCode::Invalid
                }
                ProviderError::NodeNotFound { .. } => ErrorCode::NotFound,
                ProviderError::QuotaExceeded { .. } => ErrorCode::Conflict,
                ProviderError::Backend { .. } => ErrorCode::Internal,
            },
            ControlError::Artifact(e) => match e {
                ArtifactError::NotFound(_) => ErrorCode::NotFound,
                ArtifactError::WrongOffset { .. } | ArtifactError::WrongTotal { .. } => {
                    ErrorCode::Conflict
                }
                ArtifactError::TooLarge(_) => ErrorCode::TooLarge,
                ArtifactError::TooMany { .. }
                | ArtifactError::Mismatch { .. }
                | ArtifactError::BadRange { .. }
                | ArtifactError::BrokenBody { .. } => ErrorCode::Invalid,
                ArtifactError::Io { .. }
                | ArtifactError::BadUrl(_)
                | ArtifactError::Remote { .. } => ErrorCode::Internal,
            },
            ControlError::NotFound(_) => ErrorCode::NotFound,
            ControlError::Secrets(_) | ControlError::Internal(_) => ErrorCode::Internal,
            ControlError::TooLarge(_) => ErrorCode::TooLarge,
            ControlError::Unauthorized(_) => ErrorCode::Unauthorized,
            ControlError::Forbidden(_) => ErrorCode::Forbidden,
            ControlError::StoreTask(_) | ControlError::Random(_) | ControlError::Poisoned => {
                ErrorCode::Internal
            }
        }
    }

    /// The message sent to the client: the whole chain for client errors,
    /// and for server errors too (operators run both ends; hiding the cause
    /// only slows them down).
    pub fn message(&self) -> String {
        drover_api::error::chain(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_api::cluster::JobState;
    use drover_api::compute::FieldError;

    fn sqlite(code: rusqlite::ffi::ErrorCode) -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error {
                code,
                extended_code: 0,
            },
            None,
        )
    }

    #[test]
    fn error_codes_and_statuses() {
        let cases: Vec<(ControlError, ErrorCode, u16)> = vec![
            (
                StoreError::NotFound {
                    kind: "cluster",
                    name: "x".into(),
                }
                .into(),
                ErrorCode::NotFound,
                404,
            ),
            (
                StoreError::AlreadyExists {
                    kind: "cluster",
                    name: "x".into(),
                }
                .into(),
                ErrorCode::Conflict,
                409,
            ),
            (
                StoreError::Conflict("cluster `x` still has nodes".into()).into(),
                ErrorCode::Conflict,
                409,
            ),
            (
                StoreError::InvalidTransition {
                    job: "j".into(),
                    from: JobState::Completed,
                    to: JobState::Canceled,
                }
                .into(),
                ErrorCode::Conflict,
                409,
            ),
            (
                StoreError::Invalid("bad".into()).into(),
                ErrorCode::Invalid,
                400,
            ),
            (
                StoreError::from(sqlite(rusqlite::ffi::ErrorCode::DatabaseBusy)).into(),
                ErrorCode::Busy,
                503,
            ),
            (
                StoreError::from(sqlite(rusqlite::ffi::ErrorCode::DiskFull)).into(),
                ErrorCode::Internal,
                500,
            ),
            (
                StoreError::TooNew {
                    found: 9,
                    supported: 1,
                }
                .into(),
                ErrorCode::Internal,
                500,
            ),
            (
                InvalidCompute {
                    errors: vec![FieldError {
                        field: "max_nodes".into(),
                        message: "must be at least min_nodes".into(),
                    }],
                }
                .into(),
                ErrorCode::Invalid,
                400,
            ),
            (
                SubmissionError::TooManyInstances {
                    cluster: "c".into(),
                    instance_count: 5,
                    max_nodes: 2,
                }
                .into(),
                ErrorCode::Invalid,
                400,
            ),
            (
                ControlError::Invalid("no cluster".into()),
                ErrorCode::Invalid,
                400,
            ),
            (
                ControlError::TooLarge("big".into()),
                ErrorCode::TooLarge,
                413,
            ),
            (
                ControlError::Unauthorized("missing".into()),
                ErrorCode::Unauthorized,
                401,
            ),
            (
                ControlError::Forbidden("other cluster".into()),
                ErrorCode::Forbidden,
                403,
            ),
            (ControlError::Poisoned, ErrorCode::Internal, 500),
        ];
        for (error, code, status) in cases {
            assert_eq!(error.code(), code, "{error:?}");
            assert_eq!(error.code().status(), status, "{error:?}");
        }
    }

    #[test]
    fn messages_carry_the_cause_once() {
        let e: ControlError = StoreError::NotFound {
            kind: "cluster",
            name: "gpu".into(),
        }
        .into();
        assert_eq!(e.message(), "cluster `gpu` not found");
        let e: ControlError = StoreError::from(sqlite(rusqlite::ffi::ErrorCode::DiskFull)).into();
        assert!(
            e.message().starts_with("database error: "),
            "{}",
            e.message()
        );
        let e: ControlError = ProviderError::Backend {
            provider: drover_api::compute::ProviderKind::Local,
            operation: crate::provider::Operation::Evict,
            source: "docker is not running".into(),
        }
        .into();
        assert_eq!(
            e.message(),
            "the local provider failed to evict a node: docker is not running"
        );
        assert_eq!(e.code(), ErrorCode::Internal);
    }
}
