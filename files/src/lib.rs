//! Job files: what travels with a job between the user's machine, the
//! control plane and the nodes.
//!
//! - [`digest`]: sha256 of files and streams, as [`drover_api::files::Digest`]s.
//! - [`snapshot`]: a folder as a deterministic tar (code and folder
//!   inputs), honouring `.amlignore` (else `.gitignore`) as Azure ML does.
//! - [`unpack`]: a snapshot back into a folder, refusing entries that would
//!   land outside it.
//! - [`transfer`]: the client side of the blob protocol (see
//!   [`drover_api::files`]): uploads that resume where they were cut, and
//!   downloads that resume and are verified against their digest.
//!
//! Architecture Invariant: no module here knows who calls it; the CLI, the
//! agent and `drover run` share them, and the control plane serves the
//! protocol [`transfer`] speaks.

pub mod digest;
pub mod snapshot;
pub mod transfer;
pub mod unpack;

pub use digest::{HashingWriter, sha256_file};
pub use snapshot::{IgnoreRules, Scan, SnapshotError};
pub use transfer::{BlobClient, BlobRoutes, TransferError};
pub use unpack::{UnpackError, unpack, unpack_atomic};
