//! Instance metadata: who this VM is (`GET /metadata/instance?api-version=2021-02-01`).
//!
//! <https://learn.microsoft.com/azure/virtual-machines/instance-metadata-service#instance-metadata>.
//! The types keep only what Drover uses, ignore fields they do not know, and
//! read every primitive leniently (see `wire.rs`), so a newer IMDS cannot break them.

use std::collections::BTreeMap;
use std::net::IpAddr;

use base64::Engine as _;
use serde::Deserialize;

use super::wire;

/// The api-version used for instance metadata.
pub const INSTANCE_API_VERSION: &str = "2021-02-01";

/// The instance metadata document.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct InstanceMetadata {
    /// `compute`: the VM itself.
    pub compute: Compute,
    /// `network`: its interfaces.
    pub network: Network,
}

/// `compute` in the instance metadata document. Missing values are `""`.
/// Its `Debug` leaves out the user data, which may hold a secret (a node's
/// join token).
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Compute {
    /// Unique id of the VM.
    #[serde(deserialize_with = "wire::string")]
    pub vm_id: String,
    /// Name of the VM (the name scheduled events use in `Resources`).
    #[serde(deserialize_with = "wire::string")]
    pub name: String,
    /// VM size, e.g. `Standard_NC24ads_A100_v4`.
    #[serde(deserialize_with = "wire::string")]
    pub vm_size: String,
    /// Azure region.
    #[serde(deserialize_with = "wire::string")]
    pub location: String,
    /// `Regular`, `Low` or `Spot`; see [`Compute::priority`].
    #[serde(rename = "priority", deserialize_with = "wire::string")]
    pub priority_raw: String,
    /// `Deallocate` or `Delete` for spot VMs, `""` otherwise.
    #[serde(deserialize_with = "wire::string")]
    pub eviction_policy: String,
    /// Tags as `k:v;k2:v2`.
    #[serde(deserialize_with = "wire::string")]
    pub tags: String,
    /// Tags as a list (preferred: values may contain `:` and `;`).
    pub tags_list: Vec<Tag>,
    /// Name of the scale set, `""` outside one.
    #[serde(deserialize_with = "wire::string")]
    pub vm_scale_set_name: String,
    /// ARM resource id of the VM.
    #[serde(deserialize_with = "wire::string")]
    pub resource_id: String,
    /// Subscription id.
    #[serde(deserialize_with = "wire::string")]
    pub subscription_id: String,
    /// Resource group name.
    #[serde(deserialize_with = "wire::string")]
    pub resource_group_name: String,
    /// Availability zone, `""` when none.
    #[serde(deserialize_with = "wire::string")]
    pub zone: String,
    /// User data, base64; see [`Compute::user_data`].
    #[serde(rename = "userData", deserialize_with = "wire::string")]
    pub user_data_base64: String,
}

impl std::fmt::Debug for Compute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compute")
            .field("vm_id", &self.vm_id)
            .field("name", &self.name)
            .field("vm_size", &self.vm_size)
            .field("location", &self.location)
            .field("priority_raw", &self.priority_raw)
            .field("eviction_policy", &self.eviction_policy)
            .field("tags", &self.tags)
            .field("tags_list", &self.tags_list)
            .field("vm_scale_set_name", &self.vm_scale_set_name)
            .field("resource_id", &self.resource_id)
            .field("subscription_id", &self.subscription_id)
            .field("resource_group_name", &self.resource_group_name)
            .field("zone", &self.zone)
            .field(
                "user_data_base64",
                &format_args!("<{} bytes, redacted>", self.user_data_base64.len()),
            )
            .finish()
    }
}

/// One entry of `compute.tagsList`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Tag {
    /// Tag name.
    #[serde(deserialize_with = "wire::string")]
    pub name: String,
    /// Tag value.
    #[serde(deserialize_with = "wire::string")]
    pub value: String,
}

/// A VM's priority.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Priority {
    /// Dedicated.
    Regular,
    /// Low priority (scale-set spelling of spot); may be preempted.
    Low,
    /// Spot; may be preempted.
    Spot,
    /// Missing (older VMs) or a value this agent does not know.
    Unknown(String),
}

impl Priority {
    /// Whether Azure may preempt the VM (AZ_BATCH_NODE_IS_DEDICATED=false).
    pub fn is_preemptible(&self) -> bool {
        matches!(self, Self::Low | Self::Spot)
    }
}

impl Compute {
    /// The parsed priority.
    pub fn priority(&self) -> Priority {
        match self.priority_raw.as_str() {
            "Regular" => Priority::Regular,
            "Low" => Priority::Low,
            "Spot" => Priority::Spot,
            other => Priority::Unknown(other.to_owned()),
        }
    }

    /// Tags by name, from `tagsList` when present, else parsed from `tags`.
    pub fn tag_map(&self) -> BTreeMap<String, String> {
        if !self.tags_list.is_empty() {
            return self
                .tags_list
                .iter()
                .map(|t| (t.name.clone(), t.value.clone()))
                .collect();
        }
        self.tags
            .split(';')
            .filter(|t| !t.is_empty())
            .map(|t| match t.split_once(':') {
                Some((k, v)) => (k.to_owned(), v.to_owned()),
                None => (t.to_owned(), String::new()),
            })
            .collect()
    }

    /// The decoded user data; `None` when it is not valid base64.
    pub fn user_data(&self) -> Option<Vec<u8>> {
        base64::engine::general_purpose::STANDARD
            .decode(self.user_data_base64.trim())
            .ok()
    }
}

/// `network` in the instance metadata document.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Network {
    /// The VM's interfaces, primary first.
    pub interface: Vec<Interface>,
}

/// One network interface.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Interface {
    /// IPv4 configuration.
    pub ipv4: IpConfig,
    /// IPv6 configuration.
    pub ipv6: IpConfig,
    /// MAC address, upper-case hex without separators.
    #[serde(deserialize_with = "wire::string")]
    pub mac_address: String,
}

/// Addresses of one IP family on an interface.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct IpConfig {
    /// The addresses.
    pub ip_address: Vec<IpAddress>,
}

/// One address pair.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct IpAddress {
    /// Private address.
    #[serde(deserialize_with = "wire::string")]
    pub private_ip_address: String,
    /// Public address, `""` when none.
    #[serde(deserialize_with = "wire::string")]
    pub public_ip_address: String,
}

impl InstanceMetadata {
    /// Private IPv4 addresses of all interfaces, primary first; unparsable ones skipped.
    pub fn private_ipv4(&self) -> Vec<IpAddr> {
        self.network
            .interface
            .iter()
            .flat_map(|i| i.ipv4.ip_address.iter())
            .filter_map(|a| a.private_ip_address.parse().ok())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_leaves_out_the_user_data() {
        let c = Compute {
            name: "vm0".into(),
            // base64 of `join_token = "sekrit"`
            user_data_base64: "am9pbl90b2tlbiA9ICJzZWtyaXQi".into(),
            ..Compute::default()
        };
        let shown = format!("{c:?}");
        assert!(shown.contains("vm0"), "{shown}");
        assert!(!shown.contains("am9pbl90b2tl"), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
        assert_eq!(
            c.user_data().as_deref(),
            Some(&b"join_token = \"sekrit\""[..])
        );
    }
}
