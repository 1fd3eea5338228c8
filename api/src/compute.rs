//! Compute clusters (Azure ML `AmlCompute`): the definition and its two front ends.
//!
//! A cluster is described once, as a [`ComputeSpec`], whichever way the user
//! wrote it:
//! - Azure ML v2 compute YAML (`az ml compute create -f compute.yml`), read by
//!   [`ComputeSpec::from_yaml`] with file/line diagnostics like job YAML;
//! - the v1 CLI flags (`az ml computetarget create amlcompute --vm-size …`),
//!   gathered in [`ComputeFlags`] and checked by [`ComputeFlags::to_spec`].
//!
//! Both front ends end in the same checks ([`ComputeSpec::validate`]), which the
//! control plane also runs on every spec it receives over the wire; only the
//! way a field is named in a message differs ([`Naming`]).

use std::collections::BTreeMap;
use std::fmt;

use marked_yaml::Node;
use serde::{Deserialize, Serialize};

pub use crate::error::FieldError;
use crate::error::write_lines;
use crate::units::parse_duration;
use crate::yaml::{Diagnostic, InvalidDefinition, Reader, is_null, join, line_of};

/// Azure ML's default idle time before a node is released (seconds).
pub const DEFAULT_IDLE_SECONDS: u64 = 120;
/// Azure ML v2's default `size` when neither the YAML nor a flag names one
/// (the compute YAML reference: `Standard_DS3_v2`).
pub const DEFAULT_VM_SIZE: &str = "STANDARD_DS3_V2";
/// Azure ML v2's default `max_instances` when the YAML names none (the
/// compute YAML reference, `reference-yaml-compute-aml`: 1).
pub const DEFAULT_MAX_NODES: u32 = 1;
/// The default `--max-instances`/`--max-nodes` of the CLI flags: the
/// `azure-ai-ml` `AmlCompute` entity's default, which `az ml compute create`
/// builds from its flags (4).
pub const DEFAULT_FLAG_MAX_NODES: u32 = 4;
/// The largest `max_instances`: Azure ML clusters scale to hundreds of
/// nodes, thousands on request; a bound keeps counts far from overflow.
pub const MAX_NODES: u32 = 10_000;

/// A compute cluster: a pool of nodes of one VM size that scales between
/// `min_nodes` and `max_nodes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComputeSpec {
    /// Cluster name, unique in a control plane (see [`is_valid_compute_name`]).
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
    /// VM size of every node (`STANDARD_NC24ADS_A100_V4`), kept as written.
    #[serde(default = "default_vm_size")]
    pub vm_size: String,
    /// Nodes kept even when idle; 0 lets the cluster scale to zero.
    #[serde(default)]
    pub min_nodes: u32,
    /// Upper bound on nodes; a job needing more can never run here.
    pub max_nodes: u32,
    /// How long a node stays idle before it leaves (down to `min_nodes`).
    #[serde(default = "default_idle")]
    pub idle_seconds_before_scaledown: u64,
    /// Dedicated or low-priority (preemptible) nodes.
    #[serde(default)]
    pub vm_priority: VmPriority,
    /// Managed identity granted to the cluster's jobs.
    #[serde(default)]
    pub identity: Identity,
    /// Cloud region (`eastus`); informational for the static provider.
    #[serde(default)]
    pub location: Option<String>,
    /// Free-form tags.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// What creates and removes the cluster's nodes; `None` in a definition
    /// leaves it to the control plane (`local` under `drover up`, else
    /// `static`), which stores its choice.
    #[serde(default)]
    pub provider: Option<ProviderKind>,
    /// Host folders under which the cluster's jobs may bind host paths
    /// (`drover.mounts`, path inputs, …); none by default. See
    /// [`crate::host_paths`] for what is refused whatever this says.
    #[serde(default)]
    pub allowed_host_paths: Vec<String>,
    /// Whether job containers get the App Service managed-identity
    /// protocol (`IDENTITY_ENDPOINT`, `IDENTITY_HEADER`) beside Azure ML's
    /// own (`MSI_ENDPOINT`, `MSI_SECRET`, always there). On by default: the
    /// Rust, Go, Java and .NET SDKs find a managed identity only through
    /// it. `drover.app_service_identity: false` is strict Azure ML parity:
    /// Python's azure-identity, which prefers `IDENTITY_*` when set, then
    /// takes the Azure ML path as it does on Azure ML. Absent in specs
    /// stored before it existed: on.
    #[serde(default = "yes")]
    pub app_service_identity: bool,
    /// The VM scale set an `azure-vmss` cluster scales: its ARM resource id
    /// (`/subscriptions/S/resourceGroups/G/providers/Microsoft.Compute/virtualMachineScaleSets/N`),
    /// made outside Drover and adopted. `drover.scale_set`, `--scale-set`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_set: Option<String>,
}

fn yes() -> bool {
    true
}

fn default_vm_size() -> String {
    DEFAULT_VM_SIZE.to_string()
}

fn default_idle() -> u64 {
    DEFAULT_IDLE_SECONDS
}

/// Node priority (`--vm-priority`, YAML `tier`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum VmPriority {
    /// Regular VMs, never preempted.
    #[default]
    #[serde(rename = "dedicated")]
    Dedicated,
    /// Spot VMs: cheaper, may be preempted; their jobs are requeued.
    #[serde(rename = "lowpriority", alias = "low_priority")]
    LowPriority,
}

impl VmPriority {
    /// The v1 CLI spelling (`dedicated`, `lowpriority`).
    pub fn as_str(self) -> &'static str {
        match self {
            VmPriority::Dedicated => "dedicated",
            VmPriority::LowPriority => "lowpriority",
        }
    }
}

impl fmt::Display for VmPriority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The managed identity of a cluster.
///
/// Architecture Invariant: a cluster has either one system-assigned identity or
/// one or more user-assigned ones, never both (the design's promise; mixing them
/// would make "the" identity of a token request ambiguous).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Identity {
    /// Jobs get no cloud tokens.
    #[default]
    None,
    /// The cluster's own identity (`--assign-identity '[system]'`).
    SystemAssigned,
    /// Identities created beforehand, by Azure resource id.
    UserAssigned {
        /// Resource ids as written, each valid per [`parse_identity_resource_id`].
        resource_ids: Vec<String>,
    },
}

/// What creates and removes a cluster's nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProviderKind {
    /// Nodes are containers on this machine's Docker.
    Local,
    /// Pre-provisioned machines join with the cluster's token; nothing is created.
    #[default]
    Static,
    /// An Azure virtual machine scale set.
    AzureVmss,
}

impl ProviderKind {
    /// The spelling used in YAML, flags and JSON (`local`, `static`, `azure-vmss`).
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Local => "local",
            ProviderKind::Static => "static",
            ProviderKind::AzureVmss => "azure-vmss",
        }
    }

    fn parse(text: &str) -> Option<ProviderKind> {
        match text.trim().to_ascii_lowercase().replace('_', "-").as_str() {
            "local" => Some(ProviderKind::Local),
            "static" => Some(ProviderKind::Static),
            "azure-vmss" | "vmss" => Some(ProviderKind::AzureVmss),
            _ => None,
        }
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The parts of a user-assigned identity's resource id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityResourceId {
    /// Subscription GUID, as written.
    pub subscription_id: String,
    /// Resource group name.
    pub resource_group: String,
    /// Identity name.
    pub name: String,
}

impl IdentityResourceId {
    /// The id in Azure's canonical spelling. Azure compares resource ids
    /// case-insensitively, so compare canonical forms lowercased.
    pub fn canonical(&self) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{}",
            self.subscription_id, self.resource_group, self.name
        )
    }
}

/// Why a string is not a user-assigned identity resource id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityIdError {
    /// The segments are not those of an identity id.
    #[error(
        "`{0}` is not a user-assigned identity resource id \
         (expected /subscriptions/GUID/resourceGroups/GROUP/providers/Microsoft.ManagedIdentity/userAssignedIdentities/NAME)"
    )]
    Shape(String),
    /// The subscription segment is not a GUID.
    #[error("subscription id `{0}` is not a guid")]
    Subscription(String),
    /// The resource group name breaks Azure's naming rule.
    #[error(
        "resource group `{0}` is not valid (1 to 90 letters, digits, `_`, `-`, `.`, `(` and `)`, not ending in `.`)"
    )]
    ResourceGroup(String),
    /// The identity name breaks Azure's naming rule.
    #[error(
        "identity name `{0}` is not valid (3 to 128 letters, digits, `-` and `_`, starting with a letter or digit)"
    )]
    Name(String),
}

fn is_guid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Parses `/subscriptions/<guid>/resourceGroups/<rg>/providers/Microsoft.ManagedIdentity/userAssignedIdentities/<name>`.
///
/// The fixed segments are matched case-insensitively, as Azure does (the CLI
/// and portal write `resourcegroups` and `Microsoft.ManagedIdentity`
/// interchangeably). Surrounding whitespace is ignored.
pub fn parse_identity_resource_id(text: &str) -> Result<IdentityResourceId, IdentityIdError> {
    let id = text.trim();
    let shape = || IdentityIdError::Shape(id.to_string());
    let rest = id.strip_prefix('/').ok_or_else(shape)?;
    let parts: Vec<&str> = rest.split('/').collect();
    let [subs, sub, rgs, rg, providers, namespace, kind, name] = parts.as_slice() else {
        return Err(shape());
    };
    let fixed = [
        (subs, "subscriptions"),
        (rgs, "resourcegroups"),
        (providers, "providers"),
        (namespace, "microsoft.managedidentity"),
        (kind, "userassignedidentities"),
    ];
    if !fixed
        .iter()
        .all(|(got, want)| got.eq_ignore_ascii_case(want))
    {
        return Err(shape());
    }
    if !is_guid(sub) {
        return Err(IdentityIdError::Subscription(sub.to_string()));
    }
    // https://learn.microsoft.com/azure/azure-resource-manager/management/resource-name-rules
    let rg_ok = (1..=90).contains(&rg.chars().count())
        && !rg.ends_with('.')
        && rg
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | '(' | ')'));
    if !rg_ok {
        return Err(IdentityIdError::ResourceGroup(rg.to_string()));
    }
    let name_ok = (3..=128).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !name_ok {
        return Err(IdentityIdError::Name(name.to_string()));
    }
    Ok(IdentityResourceId {
        subscription_id: sub.to_string(),
        resource_group: rg.to_string(),
        name: name.to_string(),
    })
}

/// True for compute names: 2 to 24 letters, digits and `-`, starting with a
/// letter and not ending with `-`.
///
/// A superset of Azure ML's rule, and safe in URLs, container names and
/// host names (the local provider names its node containers after the cluster).
pub fn is_valid_compute_name(name: &str) -> bool {
    (2..=24).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && !name.ends_with('-')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// True for VM sizes: letters, digits and `_`, at most 64 (`STANDARD_D3_V2`).
pub fn is_valid_vm_size(size: &str) -> bool {
    !size.is_empty()
        && size.len() <= 64
        && size.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A field of a [`ComputeSpec`], named per front end in messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Name,
    VmSize,
    MinNodes,
    MaxNodes,
    Idle,
    VmPriority,
    Identity,
    Location,
    Tags,
    Provider,
    AllowedHostPaths,
    ScaleSet,
}

/// How messages name the fields of a spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    /// v1 CLI flags (`az ml computetarget create amlcompute`): `--max-nodes`.
    Flags,
    /// v2 CLI flags (`az ml compute create`): `--max-instances`.
    FlagsV2,
    /// JSON/Rust field names: `max_nodes`.
    Fields,
    /// Azure ML v2 YAML keys: `max_instances` (used by [`ComputeSpec::from_yaml`]).
    Yaml,
}

impl Naming {
    fn name(self, field: Field) -> &'static str {
        use Field as F;
        match self {
            Naming::Flags => match field {
                F::Name => "--name",
                F::VmSize => "--vm-size",
                F::MinNodes => "--min-nodes",
                F::MaxNodes => "--max-nodes",
                F::Idle => "--idle-seconds-before-scaledown",
                F::VmPriority => "--vm-priority",
                F::Identity => "--assign-identity",
                F::Location => "--location",
                F::Tags => "--tags",
                F::Provider => "--provider",
                F::AllowedHostPaths => "--allow-host-path",
                F::ScaleSet => "--scale-set",
            },
            Naming::FlagsV2 => match field {
                F::Name => "--name",
                F::VmSize => "--size",
                F::MinNodes => "--min-instances",
                F::MaxNodes => "--max-instances",
                F::Idle => "--idle-time-before-scale-down",
                F::VmPriority => "--tier",
                F::Identity => "--identity-type",
                F::Location => "--location",
                F::Tags => "--tags",
                F::Provider => "--provider",
                F::AllowedHostPaths => "--allow-host-path",
                F::ScaleSet => "--scale-set",
            },
            Naming::Fields => match field {
                F::Name => "name",
                F::VmSize => "vm_size",
                F::MinNodes => "min_nodes",
                F::MaxNodes => "max_nodes",
                F::Idle => "idle_seconds_before_scaledown",
                F::VmPriority => "vm_priority",
                F::Identity => "identity",
                F::Location => "location",
                F::Tags => "tags",
                F::Provider => "provider",
                F::AllowedHostPaths => "allowed_host_paths",
                F::ScaleSet => "scale_set",
            },
            Naming::Yaml => match field {
                F::Name => "name",
                F::VmSize => "size",
                F::MinNodes => "min_instances",
                F::MaxNodes => "max_instances",
                F::Idle => "idle_time_before_scale_down",
                F::VmPriority => "tier",
                F::Identity => "identity",
                F::Location => "location",
                F::Tags => "tags",
                F::Provider => "drover.provider",
                F::AllowedHostPaths => "drover.allowed_host_paths",
                F::ScaleSet => "drover.scale_set",
            },
        }
    }
}

/// A cluster definition that could not be accepted: every problem found, one per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct InvalidCompute {
    /// All problems, in field order.
    pub errors: Vec<FieldError>,
}

impl fmt::Display for InvalidCompute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_lines(f, &self.errors)
    }
}

/// Collects field errors under one naming.
struct Problems {
    naming: Naming,
    errors: Vec<(Field, String)>,
}

impl Problems {
    fn new(naming: Naming) -> Self {
        Problems {
            naming,
            errors: Vec::new(),
        }
    }

    fn push(&mut self, field: Field, message: impl Into<String>) {
        self.errors.push((field, message.into()));
    }

    fn into_result(self) -> Result<(), InvalidCompute> {
        if self.errors.is_empty() {
            return Ok(());
        }
        let naming = self.naming;
        Err(InvalidCompute {
            errors: self
                .errors
                .into_iter()
                .map(|(f, message)| FieldError {
                    field: naming.name(f).to_string(),
                    message,
                })
                .collect(),
        })
    }
}

/// The checks every spec passes, whichever front end produced it.
fn check_spec(spec: &ComputeSpec, p: &mut Problems) {
    let naming = p.naming;
    if !is_valid_compute_name(&spec.name) {
        let msg = format!(
            "`{}` is not a valid compute name (2 to 24 letters, digits and `-`, starting with a letter, not ending with `-`)",
            spec.name
        );
        p.push(Field::Name, msg);
    }
    if !is_valid_vm_size(&spec.vm_size) {
        let msg = format!(
            "`{}` is not a valid vm size (letters, digits and `_`, like STANDARD_D3_V2)",
            spec.vm_size
        );
        p.push(Field::VmSize, msg);
    }
    if spec.max_nodes == 0 {
        p.push(Field::MaxNodes, "must be at least 1, got 0");
    } else if spec.max_nodes > MAX_NODES {
        p.push(
            Field::MaxNodes,
            format!("must be at most {MAX_NODES}, got {}", spec.max_nodes),
        );
    } else if spec.max_nodes < spec.min_nodes {
        let msg = format!(
            "must be at least {} ({}), got {}",
            naming.name(Field::MinNodes),
            spec.min_nodes,
            spec.max_nodes
        );
        p.push(Field::MaxNodes, msg);
    }
    check_identity(&spec.identity, p);
    if spec
        .location
        .as_ref()
        .is_some_and(|loc| loc.trim().is_empty())
    {
        p.push(Field::Location, "must not be empty");
    }
    if spec.tags.keys().any(|k| k.trim().is_empty()) {
        p.push(Field::Tags, "tag names must not be empty");
    }
    for prefix in &spec.allowed_host_paths {
        if let Err(e) = crate::host_paths::check_allowed_prefix(prefix) {
            p.push(Field::AllowedHostPaths, e);
        }
    }
    match (&spec.scale_set, spec.provider) {
        (Some(id), Some(ProviderKind::AzureVmss)) => {
            if let Err(e) = ScaleSetId::parse(id) {
                p.push(Field::ScaleSet, e);
            }
        }
        (Some(_), _) => p.push(
            Field::ScaleSet,
            format!(
                "goes with {} azure-vmss",
                naming.name(Field::Provider)
            ),
        ),
        (None, Some(ProviderKind::AzureVmss)) => p.push(
            Field::ScaleSet,
            "is required with the azure-vmss provider: the ARM resource id of the scale set to adopt (/subscriptions/S/resourceGroups/G/providers/Microsoft.Compute/virtualMachineScaleSets/N)",
        ),
        (None, _) => {}
    }
}

/// A VM scale set's ARM resource id, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaleSetId {
    /// The subscription (a GUID).
    pub subscription: String,
    /// The resource group.
    pub resource_group: String,
    /// The scale set's name.
    pub name: String,
}

impl ScaleSetId {
    /// Reads `/subscriptions/S/resourceGroups/G/providers/Microsoft.Compute/virtualMachineScaleSets/N`
    /// (ARM's segment names are case-insensitive).
    pub fn parse(id: &str) -> Result<ScaleSetId, String> {
        let bad = || {
            format!(
                "`{id}` is not a scale set resource id: expected /subscriptions/SUBSCRIPTION/resourceGroups/GROUP/providers/Microsoft.Compute/virtualMachineScaleSets/NAME"
            )
        };
        let parts: Vec<&str> = id.trim_end_matches('/').split('/').collect();
        let [
            "",
            subs,
            subscription,
            rgs,
            resource_group,
            providers,
            namespace,
            kind,
            name,
        ] = parts.as_slice()
        else {
            return Err(bad());
        };
        let is = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
        let safe = |s: &str| {
            !s.is_empty()
                && s.len() <= 90
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '(' | ')'))
        };
        let guid = subscription.len() == 36
            && subscription
                .chars()
                .all(|c| c.is_ascii_hexdigit() || c == '-');
        if !(is(subs, "subscriptions")
            && is(rgs, "resourceGroups")
            && is(providers, "providers")
            && is(namespace, "Microsoft.Compute")
            && is(kind, "virtualMachineScaleSets")
            && guid
            && safe(resource_group)
            && safe(name))
        {
            return Err(bad());
        }
        Ok(ScaleSetId {
            subscription: subscription.to_string(),
            resource_group: resource_group.to_string(),
            name: name.to_string(),
        })
    }

    /// The id in ARM's canonical spelling.
    pub fn path(&self) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachineScaleSets/{}",
            self.subscription, self.resource_group, self.name
        )
    }
}

fn check_identity(identity: &Identity, p: &mut Problems) {
    let Identity::UserAssigned { resource_ids } = identity else {
        return;
    };
    if resource_ids.is_empty() {
        p.push(
            Field::Identity,
            "user-assigned identity needs at least one resource id",
        );
    }
    let mut seen: Vec<String> = Vec::new();
    for id in resource_ids {
        match parse_identity_resource_id(id) {
            Ok(parsed) => {
                let key = parsed.canonical().to_ascii_lowercase();
                if seen.contains(&key) {
                    p.push(Field::Identity, format!("`{}` is listed twice", id.trim()));
                } else {
                    seen.push(key);
                }
            }
            Err(e) => p.push(Field::Identity, e.to_string()),
        }
    }
}

impl ComputeSpec {
    /// A spec with Azure ML's defaults: `min_nodes` 0, idle time 120 s,
    /// dedicated, no identity, the control plane's provider.
    pub fn new(name: &str, vm_size: &str, max_nodes: u32) -> Self {
        ComputeSpec {
            name: name.to_string(),
            description: None,
            vm_size: vm_size.to_string(),
            min_nodes: 0,
            max_nodes,
            idle_seconds_before_scaledown: DEFAULT_IDLE_SECONDS,
            vm_priority: VmPriority::Dedicated,
            identity: Identity::None,
            location: None,
            tags: BTreeMap::new(),
            provider: None,
            allowed_host_paths: Vec::new(),
            app_service_identity: true,
            scale_set: None,
        }
    }

    /// Checks a spec that arrived by any route (the control plane runs this on
    /// every create and update it receives, whatever the client checked).
    pub fn validate(&self, naming: Naming) -> Result<(), InvalidCompute> {
        let mut p = Problems::new(naming);
        check_spec(self, &mut p);
        p.into_result()
    }

    /// This spec with `update` applied, checked as a whole (a new `max_nodes`
    /// below the existing `min_nodes` is refused).
    pub fn updated(
        &self,
        update: &ComputeUpdate,
        naming: Naming,
    ) -> Result<ComputeSpec, InvalidCompute> {
        if update.is_empty() {
            // Not about one field: the update as a whole is empty.
            return Err(InvalidCompute {
                errors: vec![FieldError {
                    field: "update".to_string(),
                    message: format!(
                        "give at least one of {}, {} and {}",
                        naming.name(Field::MinNodes),
                        naming.name(Field::MaxNodes),
                        naming.name(Field::Idle)
                    ),
                }],
            });
        }
        let mut p = Problems::new(naming);
        let mut spec = self.clone();
        if let Some(v) = update.min_nodes {
            spec.min_nodes = v;
        }
        if let Some(v) = update.max_nodes {
            spec.max_nodes = v;
        }
        if let Some(v) = update.idle_seconds_before_scaledown {
            spec.idle_seconds_before_scaledown = v;
        }
        check_spec(&spec, &mut p);
        p.into_result()?;
        Ok(spec)
    }

    /// Parses Azure ML v2 compute YAML (`type: amlcompute`); `file` names the
    /// file in messages. Drover's own settings go under `drover:`.
    pub fn from_yaml(file: &str, text: &str) -> Result<ParsedCompute, InvalidDefinition> {
        ComputeSpec::from_yaml_with(file, text, &[])
    }

    /// [`ComputeSpec::from_yaml`] with `--set KEY=VALUE` overrides applied
    /// to the YAML first (`az ml compute create -f c.yml --set max_instances=4`).
    pub fn from_yaml_with(
        file: &str,
        text: &str,
        sets: &[crate::yaml::SetOverride],
    ) -> Result<ParsedCompute, InvalidDefinition> {
        let root = crate::yaml::parse_mapping_with(file, text, sets)?;
        let mut r = Reader::new(file);
        let spec = read_compute(&mut r, &root);
        // Checks that span fields run last; show every message in file order.
        r.errors.sort_by_key(|d| d.line);
        let (spec, warnings) = r.finish(spec)?;
        match spec {
            Some(spec) => Ok(ParsedCompute { spec, warnings }),
            // read_compute returns None only after recording an error.
            None => Err(InvalidDefinition { errors: vec![] }),
        }
    }
}

/// A cluster read from YAML, with the warnings its file produced.
#[derive(Debug, Clone)]
pub struct ParsedCompute {
    /// The cluster.
    pub spec: ComputeSpec,
    /// Non-fatal findings (unknown or unsupported keys), each with file and line.
    pub warnings: Vec<Diagnostic>,
}

/// A change to a cluster's scale settings (`az ml computetarget update amlcompute`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComputeUpdate {
    /// New `min_nodes`.
    #[serde(default)]
    pub min_nodes: Option<u32>,
    /// New `max_nodes`.
    #[serde(default)]
    pub max_nodes: Option<u32>,
    /// New idle time, in seconds.
    #[serde(default)]
    pub idle_seconds_before_scaledown: Option<u64>,
}

impl ComputeUpdate {
    /// True when the update changes nothing.
    pub fn is_empty(&self) -> bool {
        self.min_nodes.is_none()
            && self.max_nodes.is_none()
            && self.idle_seconds_before_scaledown.is_none()
    }
}

/// The CLI flags of a cluster, as given: the v1 `az ml computetarget create
/// amlcompute` spellings or the v2 `az ml compute create` ones (`naming`
/// says which, for messages); both end in the same spec.
///
/// API Boundary: plain data; the `drover` CLI derives its argument parser into
/// this and [`ComputeFlags::to_spec`] owns every check, so the CLI and any
/// other client agree on what is valid.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComputeFlags {
    /// Which CLI generation's spellings were used: [`Naming::Flags`] (v1,
    /// the default) or [`Naming::FlagsV2`].
    #[serde(skip)]
    pub generation: FlagGeneration,
    /// `--name` (required).
    pub name: Option<String>,
    /// `--vm-size` / `--size` (default `STANDARD_DS3_V2`).
    pub vm_size: Option<String>,
    /// `--min-nodes` / `--min-instances` (default 0).
    pub min_nodes: Option<u32>,
    /// `--max-nodes` / `--max-instances` (default 4).
    pub max_nodes: Option<u32>,
    /// `--idle-seconds-before-scaledown` / `--idle-time-before-scale-down`
    /// (default 120).
    pub idle_seconds_before_scaledown: Option<u64>,
    /// `--vm-priority dedicated|lowpriority` / `--tier dedicated|low_priority`
    /// (default dedicated; either spelling is read).
    pub vm_priority: Option<String>,
    /// v1 `--assign-identity '[system]'` or resource ids separated by `,`.
    pub assign_identity: Option<String>,
    /// v2 `--identity-type SystemAssigned|UserAssigned|None`.
    pub identity_type: Option<String>,
    /// v2 `--user-assigned-identities ID…` (with `--identity-type UserAssigned`).
    pub user_assigned_identities: Vec<String>,
    /// `--location`.
    pub location: Option<String>,
    /// `--tags KEY=VALUE`, repeatable.
    pub tags: Vec<String>,
    /// `--description`.
    pub description: Option<String>,
    /// `--provider local|static|azure-vmss` (default: the control plane's);
    /// a Drover addition.
    pub provider: Option<String>,
    /// `--allow-host-path DIR`, repeatable; a Drover addition.
    pub allowed_host_paths: Vec<String>,
    /// `--app-service-identity true|false` (default true): whether jobs
    /// also get the App Service identity protocol; a Drover addition.
    #[serde(default)]
    pub app_service_identity: Option<bool>,
    /// `--scale-set ID`: the VM scale set an azure-vmss cluster adopts; a
    /// Drover addition.
    #[serde(default)]
    pub scale_set: Option<String>,
}

/// Which CLI generation's flag spellings a [`ComputeFlags`] came with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FlagGeneration {
    /// `az ml computetarget create amlcompute --vm-size … --max-nodes …`.
    #[default]
    V1,
    /// `az ml compute create --type amlcompute --size … --max-instances …`.
    V2,
}

impl FlagGeneration {
    fn naming(self) -> Naming {
        match self {
            FlagGeneration::V1 => Naming::Flags,
            FlagGeneration::V2 => Naming::FlagsV2,
        }
    }
}

/// Reads v2's `--identity-type` (Azure's `SystemAssigned`, `UserAssigned`,
/// `None`, case and `_`/`-` aside) with `--user-assigned-identities`.
fn parse_identity_type(kind: &str, ids: &[String]) -> Result<Identity, String> {
    let normalized = kind
        .trim()
        .to_ascii_lowercase()
        .replace(['_', '-', ' '], "");
    match normalized.as_str() {
        "none" | "systemassigned" if !ids.is_empty() => Err(format!(
            "--user-assigned-identities needs --identity-type UserAssigned, not {kind}"
        )),
        "none" => Ok(Identity::None),
        "systemassigned" => Ok(Identity::SystemAssigned),
        "userassigned" if ids.is_empty() => {
            Err("UserAssigned needs --user-assigned-identities ID…".to_string())
        }
        "userassigned" => Ok(Identity::UserAssigned {
            resource_ids: ids
                .iter()
                .flat_map(|i| i.split(','))
                .map(|i| i.trim().to_string())
                .filter(|i| !i.is_empty())
                .collect(),
        }),
        "systemassigned,userassigned" => Err(
            "a cluster has one system-assigned identity or user-assigned ones, not both"
                .to_string(),
        ),
        _ => Err(format!(
            "expected SystemAssigned, UserAssigned or None, got {kind}"
        )),
    }
}

/// Reads `--assign-identity`: `[system]`, or user-assigned ids separated by `,`.
fn parse_assign_identity(text: &str) -> Result<Identity, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("expected '[system]' or user-assigned identity resource ids".to_string());
    }
    let items: Vec<&str> = t.split(',').map(str::trim).collect();
    let system = |s: &&str| s.eq_ignore_ascii_case("[system]");
    if items.iter().any(system) {
        return if items.len() == 1 {
            Ok(Identity::SystemAssigned)
        } else {
            Err("'[system]' cannot be combined with user-assigned identities".to_string())
        };
    }
    if items.iter().any(|s| s.is_empty()) {
        return Err("empty resource id in the list".to_string());
    }
    Ok(Identity::UserAssigned {
        resource_ids: items.into_iter().map(str::to_string).collect(),
    })
}

fn parse_priority_flag(text: &str) -> Option<VmPriority> {
    match text.trim().to_ascii_lowercase().as_str() {
        "dedicated" => Some(VmPriority::Dedicated),
        // v1 spells it `lowpriority`, v2 `low_priority`: read both.
        "lowpriority" | "low_priority" | "low-priority" => Some(VmPriority::LowPriority),
        _ => None,
    }
}

impl ComputeFlags {
    /// Checks the flags and builds the spec, reporting every problem at
    /// once, with the spellings of the generation that was used.
    pub fn to_spec(&self) -> Result<ComputeSpec, InvalidCompute> {
        let naming = self.generation.naming();
        let mut p = Problems::new(naming);
        let name = match &self.name {
            Some(n) => n.trim().to_string(),
            None => {
                p.push(Field::Name, "is required");
                String::new()
            }
        };
        let mut spec = ComputeSpec::new(
            &name,
            DEFAULT_VM_SIZE,
            self.max_nodes.unwrap_or(DEFAULT_FLAG_MAX_NODES),
        );
        self.apply(&mut spec, &mut p);
        // A missing required flag already said so; don't add "is not valid" about its placeholder.
        let missing: Vec<Field> = p.errors.iter().map(|(f, _)| *f).collect();
        let mut rest = Problems::new(naming);
        check_spec(&spec, &mut rest);
        p.errors.extend(
            rest.errors
                .into_iter()
                .filter(|(f, _)| !missing.contains(f)),
        );
        p.errors.sort_by_key(|(f, _)| field_order(*f));
        p.into_result()?;
        Ok(spec)
    }

    /// `spec` (read from compute YAML) with the flags given beside it
    /// applied over it, checked as a whole; the YAML's own problems were
    /// reported when it was read.
    pub fn override_spec(&self, mut spec: ComputeSpec) -> Result<ComputeSpec, InvalidCompute> {
        let naming = self.generation.naming();
        let mut p = Problems::new(naming);
        if let Some(n) = &self.name {
            spec.name = n.trim().to_string();
        }
        if let Some(m) = self.max_nodes {
            spec.max_nodes = m;
        }
        self.apply(&mut spec, &mut p);
        check_spec(&spec, &mut p);
        p.errors.sort_by_key(|(f, _)| field_order(*f));
        p.into_result()?;
        Ok(spec)
    }

    /// Sets what the flags name (beside name and max nodes) on `spec`.
    fn apply(&self, spec: &mut ComputeSpec, p: &mut Problems) {
        if let Some(s) = &self.vm_size {
            spec.vm_size = s.trim().to_string();
        }
        if let Some(m) = self.min_nodes {
            spec.min_nodes = m;
        }
        if let Some(i) = self.idle_seconds_before_scaledown {
            spec.idle_seconds_before_scaledown = i;
        }
        if let Some(v) = self.vm_priority.as_deref() {
            match parse_priority_flag(v) {
                Some(pr) => spec.vm_priority = pr,
                None => p.push(
                    Field::VmPriority,
                    match self.generation {
                        FlagGeneration::V1 => format!("expected dedicated or lowpriority, got {v}"),
                        FlagGeneration::V2 => {
                            format!("expected dedicated or low_priority, got {v}")
                        }
                    },
                ),
            }
        }
        match (&self.assign_identity, &self.identity_type) {
            (Some(_), Some(_)) => p.push(
                Field::Identity,
                "give --assign-identity (v1) or --identity-type (v2), not both",
            ),
            (Some(v), None) => match parse_assign_identity(v) {
                Ok(i) => spec.identity = i,
                Err(e) => p.push(Field::Identity, e),
            },
            (None, Some(kind)) => match parse_identity_type(kind, &self.user_assigned_identities) {
                Ok(i) => spec.identity = i,
                Err(e) => p.push(Field::Identity, e),
            },
            (None, None) if !self.user_assigned_identities.is_empty() => p.push(
                Field::Identity,
                "--user-assigned-identities needs --identity-type UserAssigned",
            ),
            (None, None) => {}
        }
        if let Some(l) = &self.location {
            spec.location = Some(l.clone());
        }
        if let Some(d) = &self.description {
            spec.description = Some(d.clone());
        }
        if let Some(v) = self.provider.as_deref() {
            match ProviderKind::parse(v) {
                Some(k) => spec.provider = Some(k),
                None => p.push(
                    Field::Provider,
                    format!("expected local, static or azure-vmss, got {v}"),
                ),
            }
        }
        for t in &self.tags {
            match t.split_once('=') {
                Some((k, v)) => {
                    spec.tags.insert(k.trim().to_string(), v.to_string());
                }
                None => p.push(Field::Tags, format!("expected KEY=VALUE, got {t}")),
            }
        }
        if let Some(on) = self.app_service_identity {
            spec.app_service_identity = on;
        }
        if let Some(s) = &self.scale_set {
            spec.scale_set = Some(s.trim().to_string());
        }
        spec.allowed_host_paths.extend(
            self.allowed_host_paths
                .iter()
                .map(|p| crate::host_paths::normalized_prefix(p)),
        );
    }
}

/// Message order for flags: the order the fields are declared in.
fn field_order(f: Field) -> u8 {
    match f {
        Field::Name => 0,
        Field::VmSize => 1,
        Field::MinNodes => 2,
        Field::MaxNodes => 3,
        Field::Idle => 4,
        Field::VmPriority => 5,
        Field::Identity => 6,
        Field::Location => 7,
        Field::Tags => 8,
        Field::Provider => 9,
        Field::AllowedHostPaths => 10,
        Field::ScaleSet => 11,
    }
}

const TOP_KEYS: &[&str] = &[
    "$schema",
    "type",
    "name",
    "description",
    "location",
    "size",
    "tier",
    "min_instances",
    "max_instances",
    "idle_time_before_scale_down",
    "identity",
    "tags",
    "drover",
    // Accepted by Azure ML, meaningless for Drover: warned about below.
    "ssh_public_access_enabled",
    "ssh_settings",
    "network_settings",
    "enable_node_public_ip",
];

const UNSUPPORTED_KEYS: &[&str] = &[
    "ssh_public_access_enabled",
    "ssh_settings",
    "network_settings",
    "enable_node_public_ip",
];

fn read_compute(r: &mut Reader, root: &Node) -> Option<ComputeSpec> {
    let top = r.mapping(root, "", TOP_KEYS)?;
    let get = |k: &str| top.get_node(k).filter(|n| !is_null(n));

    for key in UNSUPPORTED_KEYS {
        if let Some(n) = top.get_node(key) {
            r.warn(n, key, "is not supported by drover, ignored");
        }
    }

    match top.get_node("type") {
        Some(n) => match r.string(n, "type") {
            Some(t) if !t.eq_ignore_ascii_case("amlcompute") => r.error(
                n,
                "type",
                format!("only amlcompute clusters are supported, got {t}"),
            ),
            _ => {}
        },
        None => r.error_at(0, "type", "is required (type: amlcompute)"),
    }

    // Not `get`: an empty `name:` should say "must not be empty", not "is required".
    let name = match top.get_node("name") {
        Some(n) => r.non_empty(n, "name").map(|s| s.trim().to_string()),
        None => {
            r.error_at(0, "name", "is required");
            None
        }
    };
    let description = get("description").and_then(|n| r.string(n, "description"));
    let location = top
        .get_node("location")
        .and_then(|n| r.non_empty(n, "location"));
    let vm_size = match get("size") {
        Some(n) => r.non_empty(n, "size").map(|s| s.trim().to_string()),
        None => Some(DEFAULT_VM_SIZE.to_string()),
    };
    let vm_priority = match get("tier") {
        None => Some(VmPriority::Dedicated),
        Some(n) => r.string(n, "tier").and_then(|t| {
            match t.trim().to_ascii_lowercase().as_str() {
                "dedicated" => Some(VmPriority::Dedicated),
                // `lowpriority` is the v1 spelling; accepting it costs nothing.
                "low_priority" | "lowpriority" => Some(VmPriority::LowPriority),
                _ => {
                    r.error(
                        n,
                        "tier",
                        format!("expected dedicated or low_priority, got {t}"),
                    );
                    None
                }
            }
        }),
    };
    let min_nodes = match get("min_instances") {
        None => Some(0),
        Some(n) => r.non_negative(n, "min_instances").and_then(|v| {
            u32::try_from(v).ok().or_else(|| {
                r.error(
                    n,
                    "min_instances",
                    format!("must be at most {}, got {v}", u32::MAX),
                );
                None
            })
        }),
    };
    let max_nodes = match get("max_instances") {
        None => Some(DEFAULT_MAX_NODES),
        Some(n) => r.positive(n, "max_instances"),
    };
    let idle = match get("idle_time_before_scale_down") {
        None => Some(DEFAULT_IDLE_SECONDS),
        Some(n) => read_idle(r, n),
    };
    let identity = match get("identity") {
        None => Some(Identity::None),
        Some(n) => read_identity(r, n),
    };
    let tags = top
        .get_node("tags")
        .map(|n| r.string_map(n, "tags"))
        .unwrap_or_default();
    // `Some(None)`: no provider named (the control plane's); `None`: a
    // mistake already reported.
    let (provider, allowed_host_paths, app_service_identity, scale_set) = match get("drover") {
        None => (Some(None), Vec::new(), true, None),
        Some(n) => match read_drover(r, n) {
            Some(d) => (
                Some(d.provider),
                d.allowed_host_paths,
                d.app_service_identity,
                d.scale_set,
            ),
            None => (None, Vec::new(), true, None),
        },
    };

    // Fields that failed to read already have their message; the rest are
    // still checked together, so one run shows every mistake of the file.
    let failed: Vec<Field> = [
        (Field::Name, name.is_none()),
        (Field::VmSize, vm_size.is_none()),
        (Field::MinNodes, min_nodes.is_none()),
        (Field::MaxNodes, max_nodes.is_none()),
        (Field::Idle, idle.is_none()),
        (Field::VmPriority, vm_priority.is_none()),
        (Field::Identity, identity.is_none()),
        (Field::Provider, provider.is_none()),
    ]
    .into_iter()
    .filter_map(|(f, bad)| bad.then_some(f))
    .collect();
    let spec = ComputeSpec {
        name: name.unwrap_or_default(),
        description,
        vm_size: vm_size.unwrap_or_default(),
        min_nodes: min_nodes.unwrap_or(0),
        max_nodes: max_nodes.unwrap_or(u32::MAX),
        idle_seconds_before_scaledown: idle.unwrap_or(DEFAULT_IDLE_SECONDS),
        vm_priority: vm_priority.unwrap_or_default(),
        identity: identity.unwrap_or_default(),
        location,
        tags,
        provider: provider.flatten(),
        allowed_host_paths,
        app_service_identity,
        scale_set,
    };
    let mut p = Problems::new(Naming::Yaml);
    check_spec(&spec, &mut p);
    for (field, message) in p.errors {
        // A max below a min that failed to read is not news either.
        let related = field == Field::MaxNodes && failed.contains(&Field::MinNodes);
        if failed.contains(&field) || related {
            continue;
        }
        let key = Naming::Yaml.name(field);
        let node = match field {
            Field::Provider => get("drover").and_then(|d| d.as_mapping()?.get_node("provider")),
            Field::AllowedHostPaths => {
                get("drover").and_then(|d| d.as_mapping()?.get_node("allowed_host_paths"))
            }
            Field::ScaleSet => get("drover").and_then(|d| d.as_mapping()?.get_node("scale_set")),
            _ => top.get_node(key),
        };
        let line = node.map(line_of).unwrap_or(0);
        r.error_at(line, key, message);
    }
    failed.is_empty().then_some(spec)
}

/// `idle_time_before_scale_down`: seconds as Azure ML writes them, or a
/// duration with a unit (`5m`), a Drover addition.
fn read_idle(r: &mut Reader, n: &Node) -> Option<u64> {
    let key = "idle_time_before_scale_down";
    if let Some(v) = n.as_scalar().and_then(|s| s.as_i64()) {
        if v < 0 {
            r.error(
                n,
                key,
                format!("expected a non-negative number of seconds, got {v}"),
            );
            return None;
        }
        return Some(v as u64);
    }
    let s = r.string(n, key)?;
    match parse_duration(&s) {
        Ok(d) => Some(d.as_secs()),
        Err(e) => {
            r.error(n, key, e);
            None
        }
    }
}

fn read_identity(r: &mut Reader, n: &Node) -> Option<Identity> {
    let m = r.mapping(n, "identity", &["type", "user_assigned_identities"])?;
    let Some(t) = m.get_node("type") else {
        r.error(
            n,
            "identity.type",
            "is required (system_assigned or user_assigned)",
        );
        return None;
    };
    let kind = r.string(t, "identity.type")?;
    let uai = m
        .get_node("user_assigned_identities")
        .filter(|u| !is_null(u));
    let normalized = kind
        .trim()
        .to_ascii_lowercase()
        .replace(['_', '-', ' '], "");
    match normalized.as_str() {
        "none" | "systemassigned" => {
            if let Some(u) = uai {
                r.error(
                    u,
                    "identity.user_assigned_identities",
                    format!("only allowed when identity.type is user_assigned, got {kind}"),
                );
                return None;
            }
            Some(if normalized == "none" {
                Identity::None
            } else {
                Identity::SystemAssigned
            })
        }
        "userassigned" => {
            let Some(u) = uai else {
                r.error(
                    n,
                    "identity.user_assigned_identities",
                    "is required when identity.type is user_assigned",
                );
                return None;
            };
            read_user_assigned(r, u)
        }
        "systemassigned,userassigned" | "userassigned,systemassigned" => {
            r.error(
                t,
                "identity.type",
                "a cluster has either a system-assigned identity or user-assigned identities, not both",
            );
            None
        }
        _ => {
            r.error(
                t,
                "identity.type",
                format!("expected system_assigned, user_assigned or none, got {kind}"),
            );
            None
        }
    }
}

/// `user_assigned_identities`: a list of `{resource_id: …}` (Azure ML's form)
/// or of plain ids. Ids are checked here so each message points at its line.
fn read_user_assigned(r: &mut Reader, n: &Node) -> Option<Identity> {
    let base = "identity.user_assigned_identities";
    let Node::Sequence(seq) = n else {
        r.error(n, base, "expected a list of {resource_id: …}");
        return None;
    };
    if seq.is_empty() {
        r.error(
            n,
            base,
            "user-assigned identity needs at least one resource id",
        );
        return None;
    }
    let mut ids: Vec<String> = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    let mut ok = true;
    for (i, item) in seq.iter().enumerate() {
        let path = format!("{base}[{i}]");
        let (node, path) = match item {
            Node::Mapping(_) => {
                let Some(m) = r.mapping(item, &path, &["resource_id", "client_id", "principal_id"])
                else {
                    ok = false;
                    continue;
                };
                let p = join(&path, "resource_id");
                match m.get_node("resource_id") {
                    Some(id) => (id, p),
                    None => {
                        r.error(item, &p, "is required");
                        ok = false;
                        continue;
                    }
                }
            }
            _ => (item, path),
        };
        let Some(id) = r.non_empty(node, &path) else {
            ok = false;
            continue;
        };
        match parse_identity_resource_id(&id) {
            Ok(parsed) => {
                let key = parsed.canonical().to_ascii_lowercase();
                if seen.contains(&key) {
                    r.error(node, &path, format!("`{}` is listed twice", id.trim()));
                    ok = false;
                } else {
                    seen.push(key);
                    ids.push(id.trim().to_string());
                }
            }
            Err(e) => {
                r.error(node, &path, e.to_string());
                ok = false;
            }
        }
    }
    ok.then_some(Identity::UserAssigned { resource_ids: ids })
}

/// The `drover:` section of compute YAML.
struct DroverSection {
    /// `drover.provider`; `None` leaves it to the control plane.
    provider: Option<ProviderKind>,
    /// `drover.allowed_host_paths`, normalized.
    allowed_host_paths: Vec<String>,
    /// `drover.app_service_identity` (default on).
    app_service_identity: bool,
    /// `drover.scale_set`.
    scale_set: Option<String>,
}

/// The `drover:` section of compute YAML: the provider, the host paths
/// jobs may bind and whether jobs get the App Service identity protocol.
fn read_drover(r: &mut Reader, n: &Node) -> Option<DroverSection> {
    let m = r.mapping(
        n,
        "drover",
        &[
            "provider",
            "allowed_host_paths",
            "app_service_identity",
            "scale_set",
        ],
    )?;
    let mut allowed = Vec::new();
    if let Some(list) = m.get_node("allowed_host_paths").filter(|l| !is_null(l)) {
        match list {
            Node::Sequence(items) => {
                for (i, item) in items.iter().enumerate() {
                    if let Some(p) = r.non_empty(item, &format!("drover.allowed_host_paths[{i}]")) {
                        allowed.push(crate::host_paths::normalized_prefix(&p));
                    }
                }
            }
            other => r.error(
                other,
                "drover.allowed_host_paths",
                "expected a list of absolute folders",
            ),
        }
    }
    let app_service_identity = match m.get_node("app_service_identity").filter(|b| !is_null(b)) {
        None => true,
        Some(b) => r.boolean(b, "drover.app_service_identity")?,
    };
    let scale_set = match m.get_node("scale_set").filter(|s| !is_null(s)) {
        None => None,
        Some(s) => Some(r.non_empty(s, "drover.scale_set")?.trim().to_string()),
    };
    let section = |provider| DroverSection {
        provider,
        allowed_host_paths: allowed,
        app_service_identity,
        scale_set,
    };
    let Some(p) = m.get_node("provider").filter(|p| !is_null(p)) else {
        return Some(section(None));
    };
    let v = r.string(p, "drover.provider")?;
    let kind = ProviderKind::parse(&v);
    if kind.is_none() {
        r.error(
            p,
            "drover.provider",
            format!("expected local, static or azure-vmss, got {v}"),
        );
    }
    kind.map(|k| section(Some(k)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUB: &str = "00000000-1111-2222-3333-444444444444";

    fn uai(name: &str) -> String {
        format!(
            "/subscriptions/{SUB}/resourceGroups/rg-ml/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
        )
    }

    // ---- identity resource ids ----

    #[test]
    fn identity_resource_ids() {
        let check = |input: &str, expect: Result<(&str, &str), &str>| {
            let got = parse_identity_resource_id(input)
                .map(|p| (p.resource_group, p.name))
                .map_err(|e| e.to_string());
            let expect = expect
                .map(|(rg, n)| (rg.to_string(), n.to_string()))
                .map_err(str::to_string);
            assert_eq!(got, expect, "{input}");
        };
        check(&uai("id-one"), Ok(("rg-ml", "id-one")));
        // Fixed segments in any case, as the Azure CLI and portal write them.
        check(
            &format!(
                "/SUBSCRIPTIONS/{SUB}/resourcegroups/My.Group(1)/providers/microsoft.managedidentity/USERASSIGNEDIDENTITIES/x_y-z"
            ),
            Ok(("My.Group(1)", "x_y-z")),
        );
        check(&format!("  {}  ", uai("padded")), Ok(("rg-ml", "padded")));
        let shape = |id: &str| {
            format!(
                "`{id}` is not a user-assigned identity resource id \
                 (expected /subscriptions/GUID/resourceGroups/GROUP/providers/Microsoft.ManagedIdentity/userAssignedIdentities/NAME)"
            )
        };
        let no_slash = uai("a1b").trim_start_matches('/').to_string();
        check(&no_slash, Err(&shape(&no_slash)));
        let wrong_provider = uai("abc").replace("ManagedIdentity", "Compute");
        check(&wrong_provider, Err(&shape(&wrong_provider)));
        let too_long = format!("{}/extra", uai("abc"));
        check(&too_long, Err(&shape(&too_long)));
        check("[system]", Err(&shape("[system]")));
        check(
            &uai("abc").replace(SUB, "not-a-guid"),
            Err("subscription id `not-a-guid` is not a guid"),
        );
        check(
            &uai("abc").replace(SUB, "0000000g-1111-2222-3333-444444444444"),
            Err("subscription id `0000000g-1111-2222-3333-444444444444` is not a guid"),
        );
        check(
            &uai("abc").replace("rg-ml", "rg."),
            Err(
                "resource group `rg.` is not valid (1 to 90 letters, digits, `_`, `-`, `.`, `(` and `)`, not ending in `.`)",
            ),
        );
        check(
            &uai("abc").replace("rg-ml", "a b"),
            Err(
                "resource group `a b` is not valid (1 to 90 letters, digits, `_`, `-`, `.`, `(` and `)`, not ending in `.`)",
            ),
        );
        check(
            &uai("ab"),
            Err(
                "identity name `ab` is not valid (3 to 128 letters, digits, `-` and `_`, starting with a letter or digit)",
            ),
        );
        check(
            &uai("-abc"),
            Err(
                "identity name `-abc` is not valid (3 to 128 letters, digits, `-` and `_`, starting with a letter or digit)",
            ),
        );
    }

    #[test]
    fn canonical_identity_id() {
        let id = format!(
            "/subscriptions/{SUB}/resourcegroups/rg/providers/microsoft.managedidentity/userassignedidentities/me1"
        );
        assert_eq!(
            parse_identity_resource_id(&id).map(|p| p.canonical()),
            Ok(format!(
                "/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/me1"
            ))
        );
    }

    #[test]
    fn compute_names() {
        for ok in ["cpu", "gpu-a100", "Ab", "c0123456789012345678901x"] {
            assert!(is_valid_compute_name(ok), "{ok}");
        }
        for bad in [
            "",
            "a",
            "1cpu",
            "-cpu",
            "cpu-",
            "cpu_1",
            "cpu.1",
            "c0123456789012345678901xy",
        ] {
            assert!(!is_valid_compute_name(bad), "{bad}");
        }
    }

    // ---- v1 flags ----

    fn flags() -> ComputeFlags {
        ComputeFlags {
            name: Some("cpu".into()),
            vm_size: Some("STANDARD_D3_V2".into()),
            max_nodes: Some(4),
            ..ComputeFlags::default()
        }
    }

    #[test]
    fn flags_defaults_follow_azure_ml() {
        let spec = flags().to_spec().expect("valid");
        let mut expect = ComputeSpec::new("cpu", "STANDARD_D3_V2", 4);
        expect.min_nodes = 0;
        assert_eq!(spec, expect);
        assert_eq!(spec.idle_seconds_before_scaledown, 120);
        assert_eq!(spec.vm_priority, VmPriority::Dedicated);
        assert_eq!(spec.identity, Identity::None);
        assert_eq!(spec.provider, None, "the control plane picks");
    }

    #[test]
    fn flags_default_what_azure_defaults() {
        let spec = ComputeFlags {
            name: Some("cpu".into()),
            ..ComputeFlags::default()
        }
        .to_spec()
        .expect("valid");
        assert_eq!(spec.vm_size, "STANDARD_DS3_V2");
        assert_eq!((spec.min_nodes, spec.max_nodes), (0, 4));
        assert_eq!(spec.idle_seconds_before_scaledown, 120);
        assert_eq!(spec.vm_priority, VmPriority::Dedicated);
    }

    #[test]
    fn v2_flags_read_as_v1_flags_and_their_messages_use_v2_names() {
        // az ml compute create -n cpu --type amlcompute --size STANDARD_NC6 --min-instances 0
        //   --max-instances 2 --tier low_priority --identity-type SystemAssigned
        let v2 = ComputeFlags {
            generation: FlagGeneration::V2,
            name: Some("cpu".into()),
            vm_size: Some("STANDARD_NC6".into()),
            min_nodes: Some(0),
            max_nodes: Some(2),
            idle_seconds_before_scaledown: Some(300),
            vm_priority: Some("low_priority".into()),
            identity_type: Some("SystemAssigned".into()),
            ..ComputeFlags::default()
        };
        let spec = v2.to_spec().expect("valid");
        assert_eq!(spec.vm_priority, VmPriority::LowPriority);
        assert_eq!(spec.identity, Identity::SystemAssigned);
        assert_eq!(spec.max_nodes, 2);
        let uai_spec = ComputeFlags {
            identity_type: Some("UserAssigned".into()),
            user_assigned_identities: vec![uai("one"), uai("two")],
            ..v2.clone()
        }
        .to_spec()
        .expect("valid");
        assert_eq!(
            uai_spec.identity,
            Identity::UserAssigned {
                resource_ids: vec![uai("one"), uai("two")]
            }
        );
        let err = ComputeFlags {
            max_nodes: Some(0),
            vm_priority: Some("spot".into()),
            identity_type: Some("UserAssigned".into()),
            ..v2.clone()
        }
        .to_spec()
        .expect_err("invalid");
        assert_eq!(
            err.to_string(),
            "--max-instances: must be at least 1, got 0\n\
             --tier: expected dedicated or low_priority, got spot\n\
             --identity-type: UserAssigned needs --user-assigned-identities ID…"
        );
        let err = ComputeFlags {
            assign_identity: Some("[system]".into()),
            ..v2
        }
        .to_spec()
        .expect_err("both generations");
        assert!(err.to_string().contains("not both"), "{err}");
    }

    #[test]
    fn flags_override_a_yaml_definition() {
        let spec =
            ComputeSpec::from_yaml("c.yml", "type: amlcompute\nname: basic\nmax_instances: 2\n")
                .expect("yaml")
                .spec;
        let out = ComputeFlags {
            name: Some("renamed".into()),
            provider: Some("local".into()),
            allowed_host_paths: vec!["/data/".into()],
            ..ComputeFlags::default()
        }
        .override_spec(spec)
        .expect("valid");
        assert_eq!(out.name, "renamed");
        assert_eq!(out.max_nodes, 2, "what the flags leave alone stays");
        assert_eq!(out.provider, Some(ProviderKind::Local));
        assert_eq!(out.allowed_host_paths, ["/data"]);
    }

    #[test]
    fn flags_from_the_seed_example() {
        // drover compute create --name cpu --vm-size STANDARD_D3_V2 --min-nodes 0 --max-nodes 4
        //   --vm-priority lowpriority --idle-seconds-before-scaledown 120 --assign-identity '[system]'
        let f = ComputeFlags {
            min_nodes: Some(0),
            vm_priority: Some("lowpriority".into()),
            idle_seconds_before_scaledown: Some(300),
            assign_identity: Some("[system]".into()),
            location: Some("eastus".into()),
            tags: vec!["team=ml".into(), "cost=a=b".into()],
            provider: Some("local".into()),
            description: Some("training".into()),
            ..flags()
        };
        let spec = f.to_spec().expect("valid");
        assert_eq!(spec.vm_priority, VmPriority::LowPriority);
        assert_eq!(spec.idle_seconds_before_scaledown, 300);
        assert_eq!(spec.identity, Identity::SystemAssigned);
        assert_eq!(spec.location.as_deref(), Some("eastus"));
        assert_eq!(spec.tags.get("team").map(String::as_str), Some("ml"));
        assert_eq!(spec.tags.get("cost").map(String::as_str), Some("a=b"));
        assert_eq!(spec.provider, Some(ProviderKind::Local));
        assert_eq!(spec.description.as_deref(), Some("training"));
    }

    #[test]
    fn flags_identity_forms() {
        let check = |value: &str, expect: Result<Identity, &str>| {
            let f = ComputeFlags {
                assign_identity: Some(value.into()),
                ..flags()
            };
            assert_eq!(
                f.to_spec().map(|s| s.identity).map_err(|e| e.to_string()),
                expect.map_err(str::to_string),
                "{value}"
            );
        };
        check("[system]", Ok(Identity::SystemAssigned));
        check("[SYSTEM]", Ok(Identity::SystemAssigned));
        check(
            &uai("one"),
            Ok(Identity::UserAssigned {
                resource_ids: vec![uai("one")],
            }),
        );
        check(
            &format!("{}, {}", uai("one"), uai("two")),
            Ok(Identity::UserAssigned {
                resource_ids: vec![uai("one"), uai("two")],
            }),
        );
        check(
            "",
            Err("--assign-identity: expected '[system]' or user-assigned identity resource ids"),
        );
        check(
            &format!("[system],{}", uai("one")),
            Err("--assign-identity: '[system]' cannot be combined with user-assigned identities"),
        );
        check(
            &format!("{},", uai("one")),
            Err("--assign-identity: empty resource id in the list"),
        );
        check(
            &format!(
                "{},{}",
                uai("one"),
                uai("one")
                    .to_uppercase()
                    .replace("SUBSCRIPTIONS", "subscriptions")
            ),
            Err(&format!(
                "--assign-identity: `{}` is listed twice",
                uai("one")
                    .to_uppercase()
                    .replace("SUBSCRIPTIONS", "subscriptions")
            )),
        );
        check(
            "bogus",
            Err(
                "--assign-identity: `bogus` is not a user-assigned identity resource id \
                 (expected /subscriptions/GUID/resourceGroups/GROUP/providers/Microsoft.ManagedIdentity/userAssignedIdentities/NAME)",
            ),
        );
    }

    #[test]
    fn flags_errors() {
        let check = |f: ComputeFlags, expect: &str| {
            let err = f.to_spec().expect_err(expect);
            assert_eq!(err.to_string(), expect);
        };
        check(ComputeFlags::default(), "--name: is required");
        check(
            ComputeFlags {
                name: Some("1cpu".into()),
                ..flags()
            },
            "--name: `1cpu` is not a valid compute name (2 to 24 letters, digits and `-`, starting with a letter, not ending with `-`)",
        );
        check(
            ComputeFlags {
                vm_size: Some("Standard D3".into()),
                ..flags()
            },
            "--vm-size: `Standard D3` is not a valid vm size (letters, digits and `_`, like STANDARD_D3_V2)",
        );
        check(
            ComputeFlags {
                min_nodes: Some(2),
                max_nodes: Some(1),
                ..flags()
            },
            "--max-nodes: must be at least --min-nodes (2), got 1",
        );
        check(
            ComputeFlags {
                max_nodes: Some(0),
                ..flags()
            },
            "--max-nodes: must be at least 1, got 0",
        );
        check(
            ComputeFlags {
                vm_priority: Some("spot".into()),
                ..flags()
            },
            "--vm-priority: expected dedicated or lowpriority, got spot",
        );
        check(
            ComputeFlags {
                provider: Some("aws".into()),
                ..flags()
            },
            "--provider: expected local, static or azure-vmss, got aws",
        );
        check(
            ComputeFlags {
                tags: vec!["team".into()],
                ..flags()
            },
            "--tags: expected KEY=VALUE, got team",
        );
        check(
            ComputeFlags {
                tags: vec!["=x".into()],
                ..flags()
            },
            "--tags: tag names must not be empty",
        );
        check(
            ComputeFlags {
                location: Some(" ".into()),
                ..flags()
            },
            "--location: must not be empty",
        );
        // Several problems are reported together, in flag order.
        check(
            ComputeFlags {
                name: Some("x".into()),
                min_nodes: Some(5),
                vm_priority: Some("low".into()),
                ..flags()
            },
            "--name: `x` is not a valid compute name (2 to 24 letters, digits and `-`, starting with a letter, not ending with `-`)\n\
             --max-nodes: must be at least --min-nodes (5), got 4\n\
             --vm-priority: expected dedicated or lowpriority, got low",
        );
    }

    // ---- update ----

    #[test]
    fn updates() {
        let mut base = ComputeSpec::new("cpu", "STANDARD_D3_V2", 4);
        base.min_nodes = 1;
        let check = |u: ComputeUpdate, naming: Naming, expect: Result<(u32, u32, u64), &str>| {
            let got = base
                .updated(&u, naming)
                .map(|s| (s.min_nodes, s.max_nodes, s.idle_seconds_before_scaledown))
                .map_err(|e| e.to_string());
            assert_eq!(got, expect.map_err(str::to_string), "{u:?}");
        };
        let u = |min, max, idle| ComputeUpdate {
            min_nodes: min,
            max_nodes: max,
            idle_seconds_before_scaledown: idle,
        };
        check(u(Some(0), None, None), Naming::Flags, Ok((0, 4, 120)));
        check(
            u(None, Some(10), Some(600)),
            Naming::Flags,
            Ok((1, 10, 600)),
        );
        check(u(Some(2), Some(2), Some(0)), Naming::Flags, Ok((2, 2, 0)));
        check(
            u(Some(5), None, None),
            Naming::Flags,
            Err("--max-nodes: must be at least --min-nodes (5), got 4"),
        );
        check(
            u(None, Some(0), None),
            Naming::Fields,
            Err("max_nodes: must be at least 1, got 0"),
        );
        check(
            u(Some(3), Some(2), None),
            Naming::Fields,
            Err("max_nodes: must be at least min_nodes (3), got 2"),
        );
        check(
            ComputeUpdate::default(),
            Naming::Flags,
            Err(
                "update: give at least one of --min-nodes, --max-nodes and --idle-seconds-before-scaledown",
            ),
        );
        check(
            ComputeUpdate::default(),
            Naming::Fields,
            Err(
                "update: give at least one of min_nodes, max_nodes and idle_seconds_before_scaledown",
            ),
        );
    }

    #[test]
    fn wire_validation_names_json_fields() {
        let mut spec = ComputeSpec::new("gpu", "Standard_NC6", 2);
        assert_eq!(spec.validate(Naming::Fields), Ok(()));
        spec.identity = Identity::UserAssigned {
            resource_ids: vec![],
        };
        spec.name = "g".into();
        assert_eq!(
            spec.validate(Naming::Fields).map_err(|e| e.to_string()),
            Err("name: `g` is not a valid compute name (2 to 24 letters, digits and `-`, starting with a letter, not ending with `-`)\n\
                 identity: user-assigned identity needs at least one resource id"
                .to_string())
        );
    }

    #[test]
    fn json_round_trip_and_defaults() {
        let mut spec = ComputeSpec::new("gpu", "Standard_NC6", 2);
        spec.vm_priority = VmPriority::LowPriority;
        spec.identity = Identity::UserAssigned {
            resource_ids: vec![uai("one")],
        };
        spec.provider = Some(ProviderKind::AzureVmss);
        let json = serde_json::to_value(&spec).expect("serializes");
        assert_eq!(json["vm_priority"], "lowpriority");
        assert_eq!(json["identity"]["type"], "user-assigned");
        assert_eq!(json["provider"], "azure-vmss");
        let back: ComputeSpec = serde_json::from_value(json).expect("deserializes");
        assert_eq!(back, spec);

        let minimal: ComputeSpec =
            serde_json::from_str(r#"{"name":"cpu","max_nodes":3}"#).expect("defaults");
        assert_eq!(minimal, ComputeSpec::new("cpu", DEFAULT_VM_SIZE, 3));
        let low: VmPriority = serde_json::from_str(r#""low_priority""#).expect("alias");
        assert_eq!(low, VmPriority::LowPriority);
        let system: Identity =
            serde_json::from_str(r#"{"type":"system-assigned"}"#).expect("identity");
        assert_eq!(system, Identity::SystemAssigned);
    }

    // ---- YAML ----

    fn parse(text: &str) -> Result<ParsedCompute, String> {
        ComputeSpec::from_yaml("compute.yml", text).map_err(|e| e.to_string())
    }

    #[test]
    fn yaml_full_example() {
        let text = format!(
            "$schema: https://azuremlschemas.azureedge.net/latest/amlCompute.schema.json
type: amlcompute
name: gpu-cluster
description: a100 nodes
size: Standard_NC24ads_A100_v4
location: westeurope
tier: low_priority
min_instances: 1
max_instances: 8
idle_time_before_scale_down: 300
identity:
  type: user_assigned
  user_assigned_identities:
    - resource_id: {}
    - {}
tags:
  team: vision
drover:
  provider: local
",
            uai("one"),
            uai("two")
        );
        let parsed = parse(&text).expect("valid");
        assert!(parsed.warnings.is_empty(), "{:?}", parsed.warnings);
        let s = parsed.spec;
        assert_eq!(s.name, "gpu-cluster");
        assert_eq!(s.description.as_deref(), Some("a100 nodes"));
        assert_eq!(s.vm_size, "Standard_NC24ads_A100_v4");
        assert_eq!(s.location.as_deref(), Some("westeurope"));
        assert_eq!(s.vm_priority, VmPriority::LowPriority);
        assert_eq!((s.min_nodes, s.max_nodes), (1, 8));
        assert_eq!(s.idle_seconds_before_scaledown, 300);
        assert_eq!(
            s.identity,
            Identity::UserAssigned {
                resource_ids: vec![uai("one"), uai("two")]
            }
        );
        assert_eq!(s.tags.get("team").map(String::as_str), Some("vision"));
        assert_eq!(s.provider, Some(ProviderKind::Local));
    }

    #[test]
    fn yaml_defaults_follow_azure_ml_v2() {
        let s = parse("type: amlcompute\nname: cpu\n").expect("valid").spec;
        assert_eq!(s, ComputeSpec::new("cpu", DEFAULT_VM_SIZE, 1));
        // `type` is matched case-insensitively, like Azure ML's schema does.
        assert!(parse("type: AmlCompute\nname: cpu\n").is_ok());
    }

    #[test]
    fn yaml_values() {
        let check = |body: &str, expect: &dyn Fn(&ComputeSpec) -> bool| {
            let text = format!("type: amlcompute\nname: cpu\nmax_instances: 4\n{body}");
            let s = parse(&text).expect(body).spec;
            assert!(expect(&s), "{body}: {s:?}");
        };
        check("tier: dedicated\n", &|s| {
            s.vm_priority == VmPriority::Dedicated
        });
        check("tier: LowPriority\n", &|s| {
            s.vm_priority == VmPriority::LowPriority
        });
        check("idle_time_before_scale_down: 0\n", &|s| {
            s.idle_seconds_before_scaledown == 0
        });
        check("idle_time_before_scale_down: 5m\n", &|s| {
            s.idle_seconds_before_scaledown == 300
        });
        check("identity:\n  type: system_assigned\n", &|s| {
            s.identity == Identity::SystemAssigned
        });
        check("identity:\n  type: SystemAssigned\n", &|s| {
            s.identity == Identity::SystemAssigned
        });
        check("identity:\n  type: none\n", &|s| {
            s.identity == Identity::None
        });
        check(
            &format!(
                "drover:\n  provider: azure_vmss\n  scale_set: /subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/gpu\n"
            ),
            &|s| {
                s.provider == Some(ProviderKind::AzureVmss)
                    && s.scale_set
                        .as_deref()
                        .is_some_and(|id| id.ends_with("/gpu"))
            },
        );
        let e = parse("type: amlcompute\nname: cpu\ndrover:\n  provider: azure-vmss\n  scale_set: /subscriptions/x/resourceGroups/g/providers/Microsoft.Compute/virtualMachines/v\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("compute.yml:5: drover.scale_set: `/subscriptions/x/"),
            "{e}"
        );
        let e = parse("type: amlcompute\nname: cpu\ndrover:\n  scale_set: /subscriptions/x\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("drover.scale_set: goes with drover.provider azure-vmss"),
            "{e}"
        );
        check("drover: {}\n", &|s| {
            s.provider.is_none() && s.app_service_identity
        });
        check("drover:\n  app_service_identity: false\n", &|s| {
            !s.app_service_identity && s.provider.is_none()
        });
        check("min_instances: 4\n", &|s| s.min_nodes == 4);
    }

    #[test]
    fn yaml_warnings() {
        let parsed =
            parse("type: amlcompute\nname: cpu\nssh_public_access_enabled: false\ncolour: blue\n")
                .expect("valid");
        let text: Vec<String> = parsed.warnings.iter().map(|w| w.to_string()).collect();
        assert_eq!(
            text,
            [
                "compute.yml:4: colour: unknown key, ignored",
                "compute.yml:3: ssh_public_access_enabled: is not supported by drover, ignored",
            ]
        );
    }

    #[test]
    fn yaml_errors() {
        let check = |text: &str, expect: &str| {
            assert_eq!(
                parse(text).map(|p| p.spec),
                Err(expect.to_string()),
                "{text}"
            );
        };
        let good = |rest: &str| format!("type: amlcompute\nname: cpu\n{rest}");
        check(
            "name: cpu\n",
            "compute.yml: type: is required (type: amlcompute)",
        );
        check(
            "type: computeinstance\nname: cpu\n",
            "compute.yml:1: type: only amlcompute clusters are supported, got computeinstance",
        );
        check("type: amlcompute\n", "compute.yml: name: is required");
        check(
            "type: amlcompute\nname: \"\"\n",
            "compute.yml:2: name: must not be empty",
        );
        check(
            "type: amlcompute\nname: my_cluster\n",
            "compute.yml:2: name: `my_cluster` is not a valid compute name (2 to 24 letters, digits and `-`, starting with a letter, not ending with `-`)",
        );
        check(
            &good("size: Standard NC6\n"),
            "compute.yml:3: size: `Standard NC6` is not a valid vm size (letters, digits and `_`, like STANDARD_D3_V2)",
        );
        // The brief's example: the message names the other key and its value.
        check(
            &good(
                "size: STANDARD_D3_V2\ntier: dedicated\nlocation: eastus\nmin_instances: 2\nmax_instances: 1\n",
            ),
            "compute.yml:7: max_instances: must be at least min_instances (2), got 1",
        );
        check(
            &good("min_instances: 3\n"),
            "compute.yml: max_instances: must be at least min_instances (3), got 1",
        );
        check(
            &good("max_instances: 0\n"),
            "compute.yml:3: max_instances: expected a positive integer, got 0",
        );
        check(
            &good("min_instances: -1\n"),
            "compute.yml:3: min_instances: expected a non-negative integer, got -1",
        );
        check(
            &good("min_instances: 4294967296\nmax_instances: 4\n"),
            "compute.yml:3: min_instances: must be at most 4294967295, got 4294967296",
        );
        check(
            &good("tier: spot\n"),
            "compute.yml:3: tier: expected dedicated or low_priority, got spot",
        );
        check(
            &good("idle_time_before_scale_down: -5\n"),
            "compute.yml:3: idle_time_before_scale_down: expected a non-negative number of seconds, got -5",
        );
        check(
            &good("idle_time_before_scale_down: soon\n"),
            "compute.yml:3: idle_time_before_scale_down: expected a duration like 3600 or 2h, got soon",
        );
        check(
            &good("location: \"\"\n"),
            "compute.yml:3: location: must not be empty",
        );
        check(
            &good("tags: [a, b]\n"),
            "compute.yml:3: tags: expected a mapping, got a list",
        );
        check(
            &good("drover:\n  provider: aws\n"),
            "compute.yml:4: drover.provider: expected local, static or azure-vmss, got aws",
        );
        check(
            &good("drover:\n  app_service_identity: sometimes\n"),
            "compute.yml:4: drover.app_service_identity: expected true or false, got sometimes",
        );
        check(
            &good("identity: system_assigned\n"),
            "compute.yml:3: identity: expected a mapping, got system_assigned",
        );
        check(
            &good("identity:\n  user_assigned_identities: []\n"),
            "compute.yml:4: identity.type: is required (system_assigned or user_assigned)",
        );
        check(
            &good("identity:\n  type: managed\n"),
            "compute.yml:4: identity.type: expected system_assigned, user_assigned or none, got managed",
        );
        check(
            &good("identity:\n  type: system_assigned,user_assigned\n"),
            "compute.yml:4: identity.type: a cluster has either a system-assigned identity or user-assigned identities, not both",
        );
        check(
            &good("identity:\n  type: user_assigned\n"),
            "compute.yml:4: identity.user_assigned_identities: is required when identity.type is user_assigned",
        );
        check(
            &good(&format!(
                "identity:\n  type: system_assigned\n  user_assigned_identities:\n    - resource_id: {}\n",
                uai("one")
            )),
            "compute.yml:6: identity.user_assigned_identities: only allowed when identity.type is user_assigned, got system_assigned",
        );
        check(
            &good("identity:\n  type: user_assigned\n  user_assigned_identities: []\n"),
            "compute.yml:5: identity.user_assigned_identities: user-assigned identity needs at least one resource id",
        );
        check(
            &good("identity:\n  type: user_assigned\n  user_assigned_identities: x\n"),
            "compute.yml:5: identity.user_assigned_identities: expected a list of {resource_id: …}",
        );
        check(
            &good(
                "identity:\n  type: user_assigned\n  user_assigned_identities:\n    - client_id: abc\n",
            ),
            "compute.yml:6: identity.user_assigned_identities[0].resource_id: is required",
        );
        check(
            &good(&format!(
                "identity:\n  type: user_assigned\n  user_assigned_identities:\n    - resource_id: {}\n    - resource_id: /subscriptions/x\n",
                uai("one")
            )),
            "compute.yml:7: identity.user_assigned_identities[1].resource_id: `/subscriptions/x` is not a user-assigned identity resource id \
             (expected /subscriptions/GUID/resourceGroups/GROUP/providers/Microsoft.ManagedIdentity/userAssignedIdentities/NAME)",
        );
        check(
            &good(&format!(
                "identity:\n  type: user_assigned\n  user_assigned_identities:\n    - {}\n    - {}\n",
                uai("one"),
                uai("one")
            )),
            &format!(
                "compute.yml:7: identity.user_assigned_identities[1]: `{}` is listed twice",
                uai("one")
            ),
        );
        // Every error of a file at once, in line order.
        check(
            "type: amlcompute\nname: cpu\ntier: spot\nmin_instances: x\n",
            "compute.yml:3: tier: expected dedicated or low_priority, got spot\n\
             compute.yml:4: min_instances: expected a non-negative integer, got x",
        );
        check(
            "type: amlcompute\nname: c\nmax_instances: 1\ntier: spot\nmin_instances: 2\n",
            "compute.yml:2: name: `c` is not a valid compute name (2 to 24 letters, digits and `-`, starting with a letter, not ending with `-`)\n\
             compute.yml:3: max_instances: must be at least min_instances (2), got 1\n\
             compute.yml:4: tier: expected dedicated or low_priority, got spot",
        );
        // A min that failed to read does not also produce a max message.
        check(
            "type: amlcompute\nname: cpu\nmin_instances: many\nmax_instances: 0\n",
            "compute.yml:3: min_instances: expected a non-negative integer, got many\n\
             compute.yml:4: max_instances: expected a positive integer, got 0",
        );
        check(
            "- a\n",
            "compute.yml:1: the document must be a mapping of keys to values",
        );
    }
}
