//! A faithful emulator of the Azure Instance Metadata Service (IMDS), for tests
//! and for Drover's local clusters.
//!
//! It answers the three IMDS endpoints the agent uses — instance metadata
//! (`/metadata/instance`), managed-identity tokens
//! (`/metadata/identity/oauth2/token`) and scheduled events
//! (`/metadata/scheduledevents`) — under the same contract as Azure: the
//! `Metadata: true` header, a valid `api-version`, no `X-Forwarded-For`, and
//! per-VM rate limits. Each request is answered as the VM its source address
//! belongs to. Tokens are JWTs signed with the emulator's own ES256 key, whose
//! public half is published as a JWK Set. Tests can inject scheduled events and
//! faults (410, 429, 5xx, slow answers).
//!
//! With [`Emulator::enable_registry_tokens`] it is also the token service of
//! a container registry, exchanging its Entra tokens as Azure Container
//! Registry does (see [`acr`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use drover_imds_emulator::{Emulator, EmulatorConfig, VmSpec};
//! let emulator = Emulator::new(EmulatorConfig::default());
//! emulator.add_vm(VmSpec::new("node-0"))?;
//! let server = emulator.bind("127.0.0.1:0".parse()?).await?;
//! println!("IMDS at {}", server.base_url());
//! # Ok(()) }
//! ```

pub mod acr;
mod http;
mod model;
mod state;
mod token;

pub use http::{RunningEmulator, ServeError};
pub use model::{
    ADMIN_PREFIX, EmulatorConfig, Endpoint, EventSource, EventSpec, EventType, Fault, FaultKind,
    FaultLimit, ManagedIdentity, Priority, VmSpec,
};
pub use state::{
    Emulator, EmulatorError, ImdsRequest, ImdsResponse, SUPPORTED_API_VERSIONS, Stats,
};

/// A random RFC 4122 version-4 UUID string, for VM, identity and event ids.
pub fn random_uuid() -> String {
    use rand_core::RngCore as _;
    let mut b = [0u8; 16];
    rand_core::OsRng.fill_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}
