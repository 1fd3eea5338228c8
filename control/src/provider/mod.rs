//! Providers: what actually creates and removes a cluster's machines.
//!
//! The autoscaler decides ([`crate::autoscaler::decide`]); a [`Provider`]
//! acts. Each cluster names its provider in [`ComputeSpec::provider`]:
//! - `static` ([`StaticProvider`], here): pre-provisioned machines join with
//!   the cluster's join token. It creates and removes nothing; asked to, it
//!   answers [`ProviderError::NotSupported`] with what the operator should do,
//!   and that message becomes the cluster's "why it is resizing".
//! - `local` ([`local::LocalProvider`]): nodes are containers on this
//!   machine's Docker, one private network per cluster, with an IMDS emulator.
//! - `azure-vmss` ([`azure::AzureVmssProvider`]): an Azure VM scale set,
//!   scaled through Azure Resource Manager, when the server is given Azure
//!   credentials (`drover server --azure-…`).
//!
//! [`Providers`] picks the one a cluster names.
//!
//! API Boundary: the control plane stores every error a provider returns as a
//! scaling error and passes the latest to the next autoscaler decision; a
//! provider never retries on its own.

pub mod azure;
pub mod local;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use drover_api::compute::{ComputeSpec, ProviderKind};

/// A boxed future of a provider call. Boxed rather than `async fn` so that
/// `dyn Provider` works: the control plane picks the provider per cluster at
/// run time.
pub type ProviderFuture<'a, T> =
    Pin<Box<dyn Future<Output = Result<T, ProviderError>> + Send + 'a>>;

/// What a provider was asked to do (for messages and metrics labels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// [`Provider::create_nodes`].
    CreateNodes,
    /// [`Provider::remove_node`].
    RemoveNode,
    /// [`Provider::list_nodes`].
    ListNodes,
    /// [`Provider::evict`].
    Evict,
}

impl Operation {
    /// A short snake_case name, usable as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::CreateNodes => "create_nodes",
            Operation::RemoveNode => "remove_node",
            Operation::ListNodes => "list_nodes",
            Operation::Evict => "evict",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operation::CreateNodes => "create nodes",
            Operation::RemoveNode => "remove a node",
            Operation::ListNodes => "list nodes",
            Operation::Evict => "evict a node",
        })
    }
}

/// Why a provider call failed. Messages are shown to users as the reason a
/// cluster is stuck resizing, so they say what to do where they can.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The provider cannot do this at all (the static provider creates nothing).
    #[error("the {provider} provider cannot {operation}: {hint}")]
    NotSupported {
        /// The provider asked.
        provider: ProviderKind,
        /// What it was asked.
        operation: Operation,
        /// What the operator can do instead.
        hint: String,
    },
    /// The cloud refused for lack of quota.
    #[error("quota exceeded: asked for {requested} node(s), {available} available: {message}")]
    QuotaExceeded {
        /// Nodes asked for.
        requested: u32,
        /// Nodes the quota still allows.
        available: u32,
        /// The cloud's own words.
        message: String,
    },
    /// This control plane does not run the provider the cluster names.
    #[error("the {provider} provider is not available in this control plane: {hint}")]
    Unavailable {
        /// The provider the cluster names.
        provider: ProviderKind,
        /// How to make it available.
        hint: String,
    },
    /// The node is not one of the provider's.
    #[error("node {node} is not known to the {provider} provider")]
    NodeNotFound {
        /// The provider asked.
        provider: ProviderKind,
        /// The node id.
        node: String,
    },
    /// The backend (Docker, the cloud API) failed.
    #[error("the {provider} provider failed to {operation}")]
    Backend {
        /// The provider asked.
        provider: ProviderKind,
        /// What it was asked.
        operation: Operation,
        /// The backend's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl ProviderError {
    /// The message with its causes (`…: No such image: drover/node:…`), as
    /// users read it in a cluster's scaling errors.
    pub fn message(&self) -> String {
        drover_api::error::chain(self)
    }

    /// The operation's metric label for this error (`not_supported`, `quota`, …).
    pub fn error_type(&self) -> &'static str {
        match self {
            ProviderError::NotSupported { .. } => "not_supported",
            ProviderError::QuotaExceeded { .. } => "quota",
            ProviderError::Unavailable { .. } => "unavailable",
            ProviderError::NodeNotFound { .. } => "node_not_found",
            ProviderError::Backend { .. } => "backend",
        }
    }
}

/// Where a machine the provider owns is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProvisionState {
    /// Being created; its agent has not registered yet.
    Creating,
    /// Up; its agent registers (or has registered) with this id.
    Running,
    /// Being removed.
    Deleting,
    /// Creation or the machine failed; the provider's reason.
    Failed(String),
}

/// A machine as its provider sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisionedNode {
    /// The id the machine's agent registers with, so the control plane can
    /// match provider machines with registered nodes.
    pub id: String,
    /// Its provisioning state.
    pub state: ProvisionState,
}

/// Actuation of scale decisions for one kind of infrastructure.
///
/// Architecture Invariant: providers only act; they never decide how many
/// nodes a cluster should have (that is [`crate::autoscaler`]) and never
/// touch jobs. Every call may be repeated safely after a failure.
pub trait Provider: Send + Sync {
    /// Which provider this is.
    fn kind(&self) -> ProviderKind;

    /// Starts creating `count` machines for `cluster` whose agents join with
    /// `join_token`; returns them as `Creating` (they count as preparing
    /// nodes until their agents register).
    fn create_nodes<'a>(
        &'a self,
        cluster: &'a ComputeSpec,
        count: u32,
        join_token: &'a str,
    ) -> ProviderFuture<'a, Vec<ProvisionedNode>>;

    /// Removes one machine. The caller has drained it first; removing a
    /// machine that is already gone succeeds.
    fn remove_node<'a>(
        &'a self,
        cluster: &'a ComputeSpec,
        node_id: &'a str,
    ) -> ProviderFuture<'a, ()>;

    /// The machines the provider owns for `cluster`, in any state.
    fn list_nodes<'a>(
        &'a self,
        cluster: &'a ComputeSpec,
    ) -> ProviderFuture<'a, Vec<ProvisionedNode>>;

    /// Asks the infrastructure to preempt a node the way a spot eviction
    /// does (a `Preempt` scheduled event); returns the event's id. For tests
    /// and drills; providers of real clouds cannot.
    fn evict<'a>(
        &'a self,
        cluster: &'a ComputeSpec,
        node_id: &'a str,
    ) -> ProviderFuture<'a, String> {
        let _ = (cluster, node_id);
        let provider = self.kind();
        Box::pin(std::future::ready(Err(ProviderError::NotSupported {
            provider,
            operation: Operation::Evict,
            hint: "only the local provider can inject a preemption".to_string(),
        })))
    }

    /// The cluster is gone from the control plane (it had no nodes left):
    /// release what the provider kept for it (a network, say).
    fn cluster_deleted<'a>(&'a self, cluster: &'a ComputeSpec) -> ProviderFuture<'a, ()> {
        let _ = cluster;
        Box::pin(std::future::ready(Ok(())))
    }

    /// Whether the provider needs a join token to create nodes (so the
    /// control plane manages one for the cluster).
    fn creates_nodes(&self) -> bool {
        false
    }
}

/// A provider this control plane does not run: every call says how to get it.
#[derive(Debug, Clone)]
struct Unavailable {
    kind: ProviderKind,
    hint: &'static str,
}

impl Unavailable {
    fn error<'a, T: Send + 'a>(&'a self) -> ProviderFuture<'a, T> {
        Box::pin(std::future::ready(Err(ProviderError::Unavailable {
            provider: self.kind,
            hint: self.hint.to_string(),
        })))
    }
}

impl Provider for Unavailable {
    fn kind(&self) -> ProviderKind {
        self.kind
    }
    fn create_nodes<'a>(
        &'a self,
        _: &'a ComputeSpec,
        _: u32,
        _: &'a str,
    ) -> ProviderFuture<'a, Vec<ProvisionedNode>> {
        self.error()
    }
    fn remove_node<'a>(&'a self, _: &'a ComputeSpec, _: &'a str) -> ProviderFuture<'a, ()> {
        self.error()
    }
    fn list_nodes<'a>(&'a self, _: &'a ComputeSpec) -> ProviderFuture<'a, Vec<ProvisionedNode>> {
        // Listing nothing keeps the autoscaler's view of registered nodes.
        Box::pin(std::future::ready(Ok(Vec::new())))
    }
}

/// The providers of one control plane; a cluster's spec picks one.
pub struct Providers {
    static_: StaticProvider,
    local: Option<Arc<dyn Provider>>,
    no_local: Unavailable,
    vmss: Option<Arc<dyn Provider>>,
    no_vmss: Unavailable,
}

impl fmt::Debug for Providers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Providers")
            .field("local", &self.local.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for Providers {
    fn default() -> Self {
        Self::new(None)
    }
}

impl Providers {
    /// Static always; the provider of `local` clusters when given (the
    /// [`local::LocalProvider`], or a stand-in in tests).
    pub fn new(local: Option<Arc<dyn Provider>>) -> Self {
        Providers {
            static_: StaticProvider::default(),
            local,
            vmss: None,
            no_local: Unavailable {
                kind: ProviderKind::Local,
                hint: "start the server with --local (or use `drover up`)",
            },
            no_vmss: Unavailable {
                kind: ProviderKind::AzureVmss,
                hint: "start the server with --azure-arm (and --azure-tenant-id, --azure-client-id, --azure-client-secret-file for a service principal; its managed identity otherwise)",
            },
        }
    }

    /// Gives `azure-vmss` clusters their provider.
    pub fn with_vmss(mut self, vmss: Arc<dyn Provider>) -> Self {
        self.vmss = Some(vmss);
        self
    }

    /// Names the URL agents reach this control plane at, for the command
    /// the static provider suggests.
    pub fn with_server_url(mut self, url: String) -> Self {
        self.static_.server_url = Some(url);
        self
    }

    /// The provider a cluster that names none gets: the local one when this
    /// control plane runs it (`drover up`), else the static one.
    pub fn default_kind(&self) -> ProviderKind {
        if self.local.is_some() {
            ProviderKind::Local
        } else {
            ProviderKind::Static
        }
    }

    /// The provider of `cluster` (the default one when it names none).
    pub fn for_cluster(&self, cluster: &ComputeSpec) -> &dyn Provider {
        match cluster.provider.unwrap_or_else(|| self.default_kind()) {
            ProviderKind::Static => &self.static_,
            ProviderKind::Local => match &self.local {
                Some(p) => p.as_ref(),
                None => &self.no_local,
            },
            ProviderKind::AzureVmss => match &self.vmss {
                Some(p) => p.as_ref(),
                None => &self.no_vmss,
            },
        }
    }
}

/// Pre-provisioned machines: nodes join by running `drover-agent` with the
/// cluster's join token, and leave when their agent stops.
///
/// It owns no machines, so it lists none, and every create or remove is
/// [`ProviderError::NotSupported`] with the manual step instead: the
/// autoscaler still computes the target it would want, and `drover compute
/// show` says what would reach it.
#[derive(Debug, Clone, Default)]
pub struct StaticProvider {
    /// The URL agents reach this control plane at, for the command it
    /// suggests; a placeholder when unknown.
    pub server_url: Option<String>,
}

impl Provider for StaticProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Static
    }

    fn create_nodes<'a>(
        &'a self,
        cluster: &'a ComputeSpec,
        count: u32,
        _join_token: &'a str,
    ) -> ProviderFuture<'a, Vec<ProvisionedNode>> {
        let server = self.server_url.as_deref().unwrap_or("URL-OF-THIS-SERVER");
        let hint = format!(
            "start drover-agent with the join token of cluster {0} on {count} more machine(s): \
             drover-agent run --server {server} --cluster {0} --join-token-file FILE \
             (FILE holds the token `drover compute create` printed)",
            cluster.name
        );
        Box::pin(std::future::ready(Err(ProviderError::NotSupported {
            provider: ProviderKind::Static,
            operation: Operation::CreateNodes,
            hint,
        })))
    }

    fn remove_node<'a>(
        &'a self,
        _cluster: &'a ComputeSpec,
        node_id: &'a str,
    ) -> ProviderFuture<'a, ()> {
        let hint = format!("stop drover-agent on node {node_id} to take it out of the cluster");
        Box::pin(std::future::ready(Err(ProviderError::NotSupported {
            provider: ProviderKind::Static,
            operation: Operation::RemoveNode,
            hint,
        })))
    }

    fn list_nodes<'a>(
        &'a self,
        _cluster: &'a ComputeSpec,
    ) -> ProviderFuture<'a, Vec<ProvisionedNode>> {
        Box::pin(std::future::ready(Ok(Vec::new())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::{Context, Poll, Waker};

    /// Polls a future that is ready at once (the static provider's are).
    fn ready<T>(mut f: ProviderFuture<'_, T>) -> Result<T, ProviderError> {
        let mut cx = Context::from_waker(Waker::noop());
        match f.as_mut().poll(&mut cx) {
            Poll::Ready(r) => r,
            Poll::Pending => panic!("static provider futures are ready at once"),
        }
    }

    #[test]
    fn static_provider_creates_and_removes_nothing_and_says_what_to_do() {
        let p: Box<dyn Provider> = Box::new(StaticProvider::default());
        let cluster = ComputeSpec::new("cpu", "STANDARD_D3_V2", 4);
        assert_eq!(p.kind(), ProviderKind::Static);

        let err = ready(p.create_nodes(&cluster, 2, "t")).expect_err("creates nothing");
        assert_eq!(
            err.to_string(),
            "the static provider cannot create nodes: start drover-agent with the join token of cluster cpu on 2 more machine(s): drover-agent run --server URL-OF-THIS-SERVER --cluster cpu --join-token-file FILE (FILE holds the token `drover compute create` printed)"
        );
        assert_eq!(err.error_type(), "not_supported");

        let err = ready(p.remove_node(&cluster, "node-7")).expect_err("removes nothing");
        assert_eq!(
            err.to_string(),
            "the static provider cannot remove a node: stop drover-agent on node node-7 to take it out of the cluster"
        );

        assert_eq!(ready(p.list_nodes(&cluster)).expect("lists"), Vec::new());
    }

    #[test]
    fn error_messages() {
        let check = |e: ProviderError, text: &str, kind: &str| {
            assert_eq!(e.to_string(), text);
            assert_eq!(e.error_type(), kind);
        };
        check(
            ProviderError::QuotaExceeded {
                requested: 4,
                available: 1,
                message: "standard ndv4 family vcpus".into(),
            },
            "quota exceeded: asked for 4 node(s), 1 available: standard ndv4 family vcpus",
            "quota",
        );
        check(
            ProviderError::NodeNotFound {
                provider: ProviderKind::Local,
                node: "n1".into(),
            },
            "node n1 is not known to the local provider",
            "node_not_found",
        );
        let backend = ProviderError::Backend {
            provider: ProviderKind::AzureVmss,
            operation: Operation::ListNodes,
            source: "connection refused".into(),
        };
        assert_eq!(
            std::error::Error::source(&backend).map(|s| s.to_string()),
            Some("connection refused".to_string())
        );
        assert_eq!(
            backend.message(),
            "the azure-vmss provider failed to list nodes: connection refused"
        );
        check(
            backend,
            "the azure-vmss provider failed to list nodes",
            "backend",
        );
        assert_eq!(Operation::RemoveNode.as_str(), "remove_node");
    }
}
