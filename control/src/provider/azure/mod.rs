//! The `azure-vmss` provider: an Azure VM scale set, made outside Drover
//! (with the baked node image and the cluster's join settings in its custom
//! data) and adopted by a cluster (`drover.scale_set`), grown and shrunk
//! through ARM (`arm`).
//!
//! - Creating nodes raises the scale set's capacity; the new instances come
//!   back as `Creating` until their agents register. An instance's node id
//!   is its VM name (`SCALESET_N`), the name its agent reads from IMDS.
//! - Removing a node deletes that one instance (`deleteInstances`): the
//!   autoscaler picks idle nodes, and only those are removed.
//! - ARM's refusals (quota, a size not available in the region, an image
//!   not found) become the provider error the cluster shows as the reason
//!   it is resizing.
//! - A `low_priority` cluster needs a Spot scale set whose eviction policy
//!   is Delete (an evicted instance is gone, and the scale set makes a new
//!   one when asked): anything else is refused, saying so.
//!
//! The decisions — instance states, which instances are new, which one a
//! node is — are plain functions over the listed instances, tested without
//! ARM.

pub mod arm;

use std::collections::BTreeSet;

use drover_api::compute::{ComputeSpec, ProviderKind, ScaleSetId, VmPriority};
use reqwest::Method;
use serde_json::{Value, json};

use self::arm::{ArmClient, ArmError};
use super::{Operation, Provider, ProviderError, ProviderFuture, ProvisionState, ProvisionedNode};

/// One instance of a scale set, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// Its instance id (`3`), what `deleteInstances` takes.
    pub instance_id: String,
    /// Its VM name (`myscaleset_3`): the node id its agent registers with.
    pub name: String,
    /// Its VM id (a GUID), also accepted as a node id.
    pub vm_id: Option<String>,
    /// `provisioningState`.
    pub provisioning: String,
}

/// Reads `GET …/virtualMachines`'s `value`.
pub fn parse_instances(body: &Value) -> Vec<Instance> {
    body["value"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|v| {
                    let id = v["id"].as_str().unwrap_or_default();
                    let instance_id = v["instanceId"]
                        .as_str()
                        .map(str::to_string)
                        .or_else(|| id.rsplit('/').next().map(str::to_string))?;
                    Some(Instance {
                        name: v["name"].as_str().unwrap_or(&instance_id).to_string(),
                        instance_id,
                        vm_id: v["properties"]["vmId"].as_str().map(str::to_string),
                        provisioning: v["properties"]["provisioningState"]
                            .as_str()
                            .unwrap_or("Creating")
                            .to_string(),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// An instance as the control plane sees a provider's machine.
pub fn provisioned(i: &Instance) -> ProvisionedNode {
    let state = match i.provisioning.to_ascii_lowercase().as_str() {
        "succeeded" => ProvisionState::Running,
        "deleting" => ProvisionState::Deleting,
        "failed" => ProvisionState::Failed(format!(
            "instance {} of the scale set failed to provision",
            i.name
        )),
        _ => ProvisionState::Creating,
    };
    ProvisionedNode {
        id: i.name.clone(),
        state,
    }
}

/// The instances in `after` that were not in `before`.
pub fn new_instances<'a>(before: &[Instance], after: &'a [Instance]) -> Vec<&'a Instance> {
    let old: BTreeSet<&str> = before.iter().map(|i| i.instance_id.as_str()).collect();
    after
        .iter()
        .filter(|i| !old.contains(i.instance_id.as_str()))
        .collect()
}

/// The instance a node id names: its VM name or its VM id.
pub fn instance_of<'a>(instances: &'a [Instance], node_id: &str) -> Option<&'a Instance> {
    instances.iter().find(|i| {
        i.name.eq_ignore_ascii_case(node_id)
            || i.vm_id
                .as_deref()
                .is_some_and(|v| v.eq_ignore_ascii_case(node_id))
    })
}

/// Why a scale set cannot serve a cluster of this tier, if it cannot.
pub fn tier_mismatch(cluster: &ComputeSpec, scale_set: &Value) -> Option<String> {
    let profile = &scale_set["properties"]["virtualMachineProfile"];
    let priority = profile["priority"].as_str().unwrap_or("Regular");
    let eviction = profile["evictionPolicy"].as_str().unwrap_or("");
    let spot = priority.eq_ignore_ascii_case("Spot") || priority.eq_ignore_ascii_case("Low");
    match cluster.vm_priority {
        VmPriority::LowPriority if !spot => Some(format!(
            "cluster {} is low_priority but its scale set's priority is {priority}: use a Spot scale set (az vmss create … --priority Spot --eviction-policy Delete)",
            cluster.name
        )),
        VmPriority::LowPriority if !eviction.eq_ignore_ascii_case("Delete") => Some(format!(
            "cluster {} is low_priority but its Spot scale set evicts with {}: use --eviction-policy Delete, so an evicted instance is gone and a new one can take its place",
            cluster.name,
            if eviction.is_empty() {
                "the default (Deallocate)"
            } else {
                eviction
            }
        )),
        VmPriority::Dedicated if spot => Some(format!(
            "cluster {} is dedicated but its scale set is {priority}: use a Regular scale set, or make the cluster low_priority",
            cluster.name
        )),
        _ => None,
    }
}

/// The `azure-vmss` provider over one ARM client.
#[derive(Debug)]
pub struct AzureVmssProvider {
    arm: ArmClient,
}

impl AzureVmssProvider {
    /// A provider calling ARM through `arm`.
    pub fn new(arm: ArmClient) -> Self {
        AzureVmssProvider { arm }
    }

    fn backend(operation: Operation, e: ArmError) -> ProviderError {
        ProviderError::Backend {
            provider: ProviderKind::AzureVmss,
            operation,
            source: Box::new(e),
        }
    }

    fn scale_set(cluster: &ComputeSpec, operation: Operation) -> Result<ScaleSetId, ProviderError> {
        let id = cluster.scale_set.as_deref().unwrap_or_default();
        ScaleSetId::parse(id).map_err(|hint| ProviderError::NotSupported {
            provider: ProviderKind::AzureVmss,
            operation,
            hint,
        })
    }

    async fn instances(
        &self,
        set: &ScaleSetId,
        operation: Operation,
    ) -> Result<Vec<Instance>, ProviderError> {
        let url = self.arm.url(&format!("{}/virtualMachines", set.path()));
        let (_, _, body) = self
            .arm
            .call(Method::GET, &url, None)
            .await
            .map_err(|e| Self::backend(operation, e))?;
        Ok(parse_instances(&body))
    }

    async fn create(
        &self,
        cluster: &ComputeSpec,
        count: u32,
    ) -> Result<Vec<ProvisionedNode>, ProviderError> {
        let op = Operation::CreateNodes;
        let set = Self::scale_set(cluster, op)?;
        let url = self.arm.url(&set.path());
        let (_, _, vmss) = self
            .arm
            .call(Method::GET, &url, None)
            .await
            .map_err(|e| Self::backend(op, e))?;
        if let Some(hint) = tier_mismatch(cluster, &vmss) {
            return Err(ProviderError::NotSupported {
                provider: ProviderKind::AzureVmss,
                operation: op,
                hint,
            });
        }
        let capacity = vmss["sku"]["capacity"].as_u64().unwrap_or(0);
        let before = self.instances(&set, op).await?;
        let target = capacity + u64::from(count);
        tracing::info!(scale_set = %set.name, from = capacity, to = target, "raising scale set capacity");
        self.arm
            .call_and_wait(
                Method::PATCH,
                &url,
                Some(&json!({"sku": {"capacity": target}})),
            )
            .await
            .map_err(|e| Self::backend(op, e))?;
        let after = self.instances(&set, op).await?;
        Ok(new_instances(&before, &after)
            .into_iter()
            .map(provisioned)
            .collect())
    }

    async fn remove(&self, cluster: &ComputeSpec, node_id: &str) -> Result<(), ProviderError> {
        let op = Operation::RemoveNode;
        let set = Self::scale_set(cluster, op)?;
        let instances = self.instances(&set, op).await?;
        let Some(instance) = instance_of(&instances, node_id) else {
            // Gone already: removing it again succeeds.
            return Ok(());
        };
        tracing::info!(scale_set = %set.name, node = %node_id, instance = %instance.instance_id, "deleting scale set instance");
        let url = self.arm.url(&format!("{}/delete", set.path()));
        self.arm
            .call_and_wait(
                Method::POST,
                &url,
                Some(&json!({"instanceIds": [instance.instance_id]})),
            )
            .await
            .map_err(|e| Self::backend(op, e))?;
        Ok(())
    }
}

impl Provider for AzureVmssProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::AzureVmss
    }

    fn create_nodes<'a>(
        &'a self,
        cluster: &'a ComputeSpec,
        count: u32,
        _join_token: &'a str,
    ) -> ProviderFuture<'a, Vec<ProvisionedNode>> {
        Box::pin(self.create(cluster, count))
    }

    fn remove_node<'a>(
        &'a self,
        cluster: &'a ComputeSpec,
        node_id: &'a str,
    ) -> ProviderFuture<'a, ()> {
        Box::pin(self.remove(cluster, node_id))
    }

    fn list_nodes<'a>(
        &'a self,
        cluster: &'a ComputeSpec,
    ) -> ProviderFuture<'a, Vec<ProvisionedNode>> {
        Box::pin(async move {
            let op = Operation::ListNodes;
            let set = Self::scale_set(cluster, op)?;
            Ok(self
                .instances(&set, op)
                .await?
                .iter()
                .map(provisioned)
                .collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing() -> Value {
        json!({"value": [
            {"name": "ss_0", "instanceId": "0", "properties": {"vmId": "a-1", "provisioningState": "Succeeded"}},
            {"name": "ss_1", "instanceId": "1", "properties": {"vmId": "b-2", "provisioningState": "Creating"}},
            {"id": "/subscriptions/s/resourceGroups/g/providers/Microsoft.Compute/virtualMachineScaleSets/ss/virtualMachines/2",
             "properties": {"provisioningState": "Failed"}}
        ]})
    }

    #[test]
    fn instances_map_to_nodes_by_name_or_vm_id() {
        let all = parse_instances(&listing());
        assert_eq!(all.len(), 3);
        assert_eq!(all[2].instance_id, "2");
        let states: Vec<ProvisionState> = all.iter().map(|i| provisioned(i).state).collect();
        assert_eq!(states[0], ProvisionState::Running);
        assert_eq!(states[1], ProvisionState::Creating);
        assert!(matches!(states[2], ProvisionState::Failed(_)));
        assert_eq!(instance_of(&all, "SS_1").unwrap().instance_id, "1");
        assert_eq!(instance_of(&all, "a-1").unwrap().instance_id, "0");
        assert!(instance_of(&all, "ss_9").is_none());
        let before = &all[..1];
        let new: Vec<&str> = new_instances(before, &all)
            .iter()
            .map(|i| i.name.as_str())
            .collect();
        assert_eq!(new, ["ss_1", "2"]);
    }

    #[test]
    fn low_priority_needs_spot_with_delete() {
        let mut c = ComputeSpec::new("gpu", "STANDARD_NC6", 2);
        let regular = json!({"properties": {"virtualMachineProfile": {}}});
        let spot_dealloc = json!({"properties": {"virtualMachineProfile": {"priority": "Spot"}}});
        let spot = json!({"properties": {"virtualMachineProfile": {"priority": "Spot", "evictionPolicy": "Delete"}}});
        assert_eq!(tier_mismatch(&c, &regular), None);
        assert!(tier_mismatch(&c, &spot).unwrap().contains("is dedicated"));
        c.vm_priority = VmPriority::LowPriority;
        assert!(
            tier_mismatch(&c, &regular)
                .unwrap()
                .contains("priority is Regular")
        );
        assert!(
            tier_mismatch(&c, &spot_dealloc)
                .unwrap()
                .contains("Deallocate")
        );
        assert_eq!(tier_mismatch(&c, &spot), None);
    }
}
