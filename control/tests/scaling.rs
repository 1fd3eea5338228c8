//! The control plane's scaling glue against a stand-in provider: machines
//! it made count as preparing until their agents register, are not made
//! twice, are given up when they die or never register, dead nodes are
//! reclaimed once their machine stopped, idle nodes leave cleanly, and a
//! queued job says what it waits for.
//! (The local provider itself is exercised against Docker in
//! `tests/tests/local.rs`.)

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_api::cluster::{JobState, NodeState};
use drover_api::compute::{ComputeSpec, ProviderKind};
use drover_api::job::JobSpec;
use drover_api::wire;
use drover_api::wire::PartKey;
use drover_control::provider::{
    Operation, Provider, ProviderError, ProviderFuture, Providers, ProvisionState, ProvisionedNode,
};
use drover_control::server::{ControlPlane, CoreConfig};
use drover_control::store::Store;

/// Machines in memory, in whatever state a test sets.
#[derive(Default)]
struct Machines {
    state: Mutex<BTreeMap<String, ProvisionState>>,
    tokens: Mutex<Vec<String>>,
    removed: Mutex<Vec<String>>,
    made: Mutex<u32>,
    /// Operations that fail (a cloud API outage).
    failing: Mutex<Vec<Operation>>,
}

impl Machines {
    fn ids(&self) -> Vec<String> {
        self.state.lock().unwrap().keys().cloned().collect()
    }
    fn set(&self, id: &str, state: ProvisionState) {
        self.state.lock().unwrap().insert(id.to_string(), state);
    }
    fn token(&self) -> String {
        self.tokens
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a join token was given")
    }
    fn removed(&self) -> Vec<String> {
        self.removed.lock().unwrap().clone()
    }
    fn fail(&self, operations: &[Operation]) {
        *self.failing.lock().unwrap() = operations.to_vec();
    }
    fn outage_error(&self, operation: Operation) -> Option<ProviderError> {
        self.failing
            .lock()
            .unwrap()
            .contains(&operation)
            .then(|| ProviderError::Backend {
                provider: ProviderKind::Local,
                operation,
                source: "the backend is down".into(),
            })
    }
}

impl Provider for Machines {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Local
    }
    fn creates_nodes(&self) -> bool {
        true
    }
    fn create_nodes<'a>(
        &'a self,
        _cluster: &'a ComputeSpec,
        count: u32,
        join_token: &'a str,
    ) -> ProviderFuture<'a, Vec<ProvisionedNode>> {
        if let Some(e) = self.outage_error(Operation::CreateNodes) {
            return Box::pin(std::future::ready(Err(e)));
        }
        self.tokens.lock().unwrap().push(join_token.to_string());
        let mut out = Vec::new();
        for _ in 0..count {
            let mut n = self.made.lock().unwrap();
            *n += 1;
            let id = format!("m-{n}");
            self.set(&id, ProvisionState::Creating);
            out.push(ProvisionedNode {
                id,
                state: ProvisionState::Creating,
            });
        }
        Box::pin(std::future::ready(Ok(out)))
    }
    fn remove_node<'a>(&'a self, _: &'a ComputeSpec, node_id: &'a str) -> ProviderFuture<'a, ()> {
        if let Some(e) = self.outage_error(Operation::RemoveNode) {
            return Box::pin(std::future::ready(Err(e)));
        }
        self.state.lock().unwrap().remove(node_id);
        self.removed.lock().unwrap().push(node_id.to_string());
        Box::pin(std::future::ready(Ok(())))
    }
    fn list_nodes<'a>(&'a self, _: &'a ComputeSpec) -> ProviderFuture<'a, Vec<ProvisionedNode>> {
        if let Some(e) = self.outage_error(Operation::ListNodes) {
            return Box::pin(std::future::ready(Err(e)));
        }
        let all = self
            .state
            .lock()
            .unwrap()
            .iter()
            .map(|(id, state)| ProvisionedNode {
                id: id.clone(),
                state: state.clone(),
            })
            .collect();
        Box::pin(std::future::ready(Ok(all)))
    }
}

struct Setup {
    core: ControlPlane,
    machines: Arc<Machines>,
    _dir: tempfile::TempDir,
}

async fn setup(config: CoreConfig, min: u32, max: u32, idle: u64) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let machines = Arc::new(Machines::default());
    let provider: Arc<dyn Provider> = machines.clone();
    let core =
        ControlPlane::new(store, config).with_providers(Arc::new(Providers::new(Some(provider))));
    let mut spec = ComputeSpec::new("loc", "Standard_D4s_v3", max);
    spec.min_nodes = min;
    spec.idle_seconds_before_scaledown = idle;
    spec.provider = Some(ProviderKind::Local);
    core.create_cluster(spec).await.expect("cluster");
    Setup {
        core,
        machines,
        _dir: dir,
    }
}

async fn submit(core: &ControlPlane, name: &str, instances: u32) {
    let yaml = format!(
        "name: {name}\ncommand: 'true'\nenvironment:\n  image: drover/base:bookworm\nresources:\n  instance_count: {instances}\n"
    );
    let spec = JobSpec::from_yaml("job.yml", &yaml, Path::new("/tmp"))
        .expect("job parses")
        .spec;
    core.submit_job(wire::JobSubmit {
        spec,
        compute: Some("loc".into()),
    })
    .await
    .expect("submit");
}

async fn register(core: &ControlPlane, id: &str, token: &str) -> String {
    core.register(wire::RegisterRequest {
        cluster: "loc".into(),
        join_token: token.into(),
        node_id: Some(id.into()),
        ip: Some("10.213.0.10".into()),
        gpus: wire::GpuCounts::default(),
        inventory: Default::default(),
    })
    .await
    .expect("register")
    .credential
}

async fn status(core: &ControlPlane) -> drover_api::cluster::ClusterStatus {
    core.cluster("loc".into()).await.expect("cluster").status
}

#[tokio::test]
async fn created_machines_count_as_preparing_until_they_register_and_are_not_made_twice() {
    let s = setup(CoreConfig::default(), 0, 3, 120).await;
    submit(&s.core, "two", 2).await;
    s.core.schedule_pass().await.expect("pass");
    assert_eq!(s.machines.ids(), ["m-1", "m-2"]);
    // Nothing registered yet: the next passes make no more machines.
    s.core.schedule_pass().await.expect("pass");
    s.core.schedule_pass().await.expect("pass");
    assert_eq!(s.machines.ids(), ["m-1", "m-2"]);
    let st = status(&s.core).await;
    assert_eq!((st.current_node_count, st.target_node_count), (2, 2));
    assert_eq!(st.node_state_counts.preparing, 2);

    // The agents join with the token the provider was given; the job is placed on both.
    let token = s.machines.token();
    for id in ["m-1", "m-2"] {
        register(&s.core, id, &token).await;
    }
    s.core.schedule_pass().await.expect("pass");
    let job = s.core.job("two".into()).await.expect("job");
    assert_eq!(job.state, JobState::Preparing);
    let mut nodes: Vec<String> = job.parts.iter().map(|p| p.node.clone()).collect();
    nodes.sort();
    assert_eq!(nodes, ["m-1", "m-2"]);
    assert!(s.machines.removed().is_empty());
}

#[tokio::test]
async fn a_machine_that_dies_or_never_registers_is_given_up_replaced_and_reported() {
    let config = CoreConfig {
        register_timeout: Duration::from_millis(200),
        ..CoreConfig::default()
    };
    let s = setup(config, 0, 2, 120).await;
    submit(&s.core, "one", 1).await;
    s.core.schedule_pass().await.expect("pass");
    assert_eq!(s.machines.ids(), ["m-1"]);

    // It exits before its agent registers: removed, replaced, reported.
    s.machines.set(
        "m-1",
        ProvisionState::Failed("the node container exited".into()),
    );
    s.core.schedule_pass().await.expect("pass");
    assert_eq!(s.machines.removed(), ["m-1"]);
    assert_eq!(s.machines.ids(), ["m-2"]);
    let st = status(&s.core).await;
    assert!(
        st.errors
            .iter()
            .any(|e| e.message == "node m-1 failed before registering: the node container exited"),
        "{:?}",
        st.errors
    );

    // The replacement never registers: after the timeout it goes too.
    s.machines.set("m-2", ProvisionState::Running);
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.core.schedule_pass().await.expect("pass");
    assert_eq!(s.machines.removed(), ["m-1", "m-2"]);
    let st = status(&s.core).await;
    assert!(
        st.errors.iter().any(|e| e
            .message
            .contains("m-2 failed before registering: its agent did not register within 0s")),
        "{:?}",
        st.errors
    );
}

#[tokio::test]
async fn a_dead_node_is_reclaimed_once_its_machine_stopped_while_a_replacement_runs_its_job() {
    let s = setup(CoreConfig::default(), 0, 2, 120).await;
    submit(&s.core, "one", 1).await;
    s.core.schedule_pass().await.expect("pass");
    s.machines.set("m-1", ProvisionState::Running);
    register(&s.core, "m-1", &s.machines.token()).await;
    s.core.schedule_pass().await.expect("pass");
    assert_eq!(
        s.core.job("one".into()).await.expect("job").parts[0].node,
        "m-1"
    );

    // Silent: unusable, its job requeued; its machine still runs (it may
    // still be stopping the job), so it stays, and a replacement is made.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let lost = s
        .core
        .reap_silent_nodes(Duration::from_millis(1))
        .await
        .expect("reap");
    assert_eq!(lost, ["m-1"]);
    s.core.schedule_pass().await.expect("pass");
    assert!(s.machines.removed().is_empty());
    assert_eq!(s.machines.ids(), ["m-1", "m-2"]);
    let st = status(&s.core).await;
    assert_eq!(st.node_state_counts.unusable, 1);
    assert_eq!(st.node_state_counts.preparing, 1);

    // Its machine stopped: reclaimed, machine and record.
    s.machines.set(
        "m-1",
        ProvisionState::Failed("the node container exited".into()),
    );
    s.core.schedule_pass().await.expect("pass");
    assert_eq!(s.machines.removed(), ["m-1"]);
    let nodes = s.core.nodes(Some("loc".into())).await.expect("nodes");
    assert!(nodes.nodes.iter().all(|n| n.id != "m-1"), "{nodes:?}");
    assert_eq!(status(&s.core).await.node_state_counts.unusable, 0);
}

#[tokio::test]
async fn an_idle_node_leaves_and_is_forgotten_but_not_while_it_holds_a_job() {
    let mut config = CoreConfig::default();
    config.autoscaler.cooldown = Duration::ZERO;
    let s = setup(config, 0, 2, 0).await;
    submit(&s.core, "one", 1).await;
    s.core.schedule_pass().await.expect("pass");
    s.machines.set("m-1", ProvisionState::Running);
    let cred = register(&s.core, "m-1", &s.machines.token()).await;
    s.core.schedule_pass().await.expect("pass");
    // Holding the job: idle time 0 does not remove it.
    s.core.schedule_pass().await.expect("pass");
    assert!(s.machines.removed().is_empty());

    // The job ends; the node is idle and goes at once (idle 0, no cool-down).
    let report = |state| wire::HeartbeatRequest {
        state: None,
        ip: None,
        gpus: None,
        inventory: None,
        parts: vec![wire::PartStatus {
            part: PartKey::new("one", 1, 0),
            state,
            exit_code: (state == wire::PartState::Succeeded).then_some(0),
        }],
    };
    for state in [wire::PartState::Running, wire::PartState::Succeeded] {
        s.core
            .heartbeat_with_credential(&cred, report(state))
            .await
            .expect("heartbeat");
    }
    assert_eq!(
        s.core.job("one".into()).await.expect("job").state,
        JobState::Completed
    );
    s.core.schedule_pass().await.expect("pass");
    assert_eq!(s.machines.removed(), ["m-1"]);
    let nodes = s.core.nodes(Some("loc".into())).await.expect("nodes");
    assert!(nodes.nodes.is_empty(), "{nodes:?}");
    let st = status(&s.core).await;
    assert_eq!((st.current_node_count, st.target_node_count), (0, 0));
    assert!(st.node_state_counts.get(NodeState::Leaving) == 0);
}

#[tokio::test]
async fn every_provider_error_of_a_pass_is_recorded_and_a_failed_listing_makes_no_duplicates() {
    let s = setup(CoreConfig::default(), 0, 2, 120).await;
    submit(&s.core, "one", 1).await;
    s.core.schedule_pass().await.expect("pass");
    assert_eq!(s.machines.ids(), ["m-1"]);

    // The backend cannot list: m-1 stays preparing and nothing is made twice.
    s.machines.fail(&[Operation::ListNodes]);
    s.core.schedule_pass().await.expect("pass");
    s.core.schedule_pass().await.expect("pass");
    assert_eq!(s.machines.ids(), ["m-1"]);
    let st = status(&s.core).await;
    assert_eq!(st.node_state_counts.preparing, 1);
    assert_eq!(
        st.errors.last().map(|e| e.message.as_str()),
        Some("the local provider failed to list nodes: the backend is down")
    );

    // m-1 fails and removing it fails too: both errors of the pass are
    // recorded, and the cluster gives both as its reason.
    s.machines.fail(&[Operation::RemoveNode]);
    s.machines
        .set("m-1", ProvisionState::Failed("it exited".into()));
    let before = status(&s.core).await.errors.len();
    s.core.schedule_pass().await.expect("pass");
    let st = status(&s.core).await;
    let new: Vec<&str> = st.errors[before..]
        .iter()
        .map(|e| e.message.as_str())
        .collect();
    assert_eq!(
        new,
        [
            "node m-1 failed before registering: it exited",
            "the local provider failed to remove a node: the backend is down",
        ]
    );
}

async fn waiting_reason(core: &ControlPlane) -> Option<String> {
    core.job("one".into()).await.expect("job").waiting_reason
}

#[tokio::test]
async fn a_queued_job_says_why_it_waits_until_it_is_placed() {
    let s = setup(CoreConfig::default(), 0, 2, 120).await;
    submit(&s.core, "one", 1).await;
    // Decided, not yet asked of the provider.
    assert_eq!(
        waiting_reason(&s.core).await.as_deref(),
        Some("waiting for 1 node: cluster loc is resizing 0 → 1")
    );

    // The provider cannot create nodes: its error is the job's reason.
    s.machines.fail(&[Operation::CreateNodes]);
    s.core.schedule_pass().await.expect("pass");
    assert_eq!(
        waiting_reason(&s.core).await.as_deref(),
        Some(
            "cluster loc cannot reach 1 node: the local provider failed to create nodes: the backend is down"
        )
    );

    // It recovers: the machine is being made.
    s.machines.fail(&[]);
    s.core.schedule_pass().await.expect("pass");
    assert_eq!(s.machines.ids(), ["m-1"]);
    assert_eq!(
        waiting_reason(&s.core).await.as_deref(),
        Some("waiting for 1 node: cluster loc is resizing 0 → 1")
    );

    // Its agent registers and the job is placed: nothing to wait for.
    register(&s.core, "m-1", &s.machines.token()).await;
    s.core.schedule_pass().await.expect("pass");
    let job = s.core.job("one".into()).await.expect("job");
    assert_eq!(job.state, JobState::Preparing);
    assert_eq!(job.waiting_reason, None);
}
