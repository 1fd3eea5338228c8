//! A two-node cluster of real processes for end-to-end tests.

use std::time::Duration;

use crate::{
    AgentProc, ServerProc, containers_of_job, remove_job_containers, require_docker, unique_name,
    wait_until,
};

/// A real cluster on this machine: a `drover server` and two `drover-agent`
/// processes as distinct nodes of cluster `e2e`.
pub struct Cluster {
    /// The server.
    pub server: ServerProc,
    /// The nodes' agents.
    pub agents: Vec<AgentProc>,
    /// The cluster's name.
    pub name: String,
}

impl Cluster {
    pub fn start(grace_seconds: u64) -> Cluster {
        Cluster::start_with(grace_seconds, &[])
    }

    /// A cluster created with these extra `compute create` flags.
    pub fn start_with(grace_seconds: u64, flags: &[&str]) -> Cluster {
        require_docker();
        Cluster::start_on(ServerProc::start(grace_seconds), flags)
    }

    /// A cluster of two agents on a server started by the caller.
    pub fn start_on(server: ServerProc, flags: &[&str]) -> Cluster {
        require_docker();
        let name = "e2e".to_string();
        let join = server.create_cluster_with(&name, 2, flags);
        let tag = unique_name("n");
        let agents = (1..=2)
            .map(|i| AgentProc::start(&server, &name, &join, &format!("{tag}-{i}")))
            .collect();
        let c = Cluster {
            server,
            agents,
            name,
        };
        c.wait_nodes_idle(2);
        c
    }

    pub fn nodes(&self) -> serde_json::Value {
        let out = self.server.cli_ok(&["node", "list", "--json"]);
        serde_json::from_str(&out).expect("node json")
    }

    pub fn node_state(&self, id: &str) -> String {
        self.nodes()["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["id"] == id)
            .and_then(|n| n["state"].as_str())
            .unwrap_or_default()
            .to_string()
    }

    pub fn wait_nodes_idle(&self, n: usize) {
        let ok = wait_until(Duration::from_secs(60), || {
            self.nodes()["nodes"]
                .as_array()
                .map(|ns| ns.iter().filter(|x| x["state"] == "idle").count() >= n)
                .unwrap_or(false)
        });
        assert!(
            ok,
            "nodes never became idle: {}\n{}",
            self.nodes(),
            self.agents
                .iter()
                .map(AgentProc::log_text)
                .collect::<String>()
        );
    }

    /// Submits a job and returns its name.
    pub fn submit(&self, command: &str, instances: u32) -> String {
        self.submit_yaml(&format!(
            "command: {command}\nenvironment:\n  image: {}\nresources:\n  instance_count: {instances}\n",
            crate::BASE_IMAGE
        ))
    }

    /// Submits a job written as `yaml` and returns its name.
    pub fn submit_yaml(&self, yaml: &str) -> String {
        let name = unique_name("cl");
        let out = self.submit_args(yaml, &name);
        assert!(
            out.status.success(),
            "submitting failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        name
    }

    /// `drover job create` of `yaml` as `name`, whatever its outcome.
    pub fn submit_args(&self, yaml: &str, name: &str) -> std::process::Output {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("job.yml");
        std::fs::write(&file, yaml).expect("write job");
        self.server.cli(&[
            "job",
            "create",
            "-f",
            &file.display().to_string(),
            "--compute",
            &self.name,
            "--name",
            name,
        ])
    }

    pub fn logs(&self, job: &str) -> String {
        self.server.cli_ok(&["job", "logs", job])
    }

    /// Waits until `job` runs; its rank-0 node and that node's agent index.
    pub fn running_on(&self, job: &str) -> (String, usize) {
        self.server
            .wait_job_state(job, "running", Duration::from_secs(90));
        let node = parts(&self.server.job(job))[0]["node"]
            .as_str()
            .expect("node")
            .to_string();
        let i = self.agent_of(&node);
        (node, i)
    }

    pub fn agent_of(&self, node: &str) -> usize {
        self.agents
            .iter()
            .position(|a| a.node_id == node)
            .expect("node is one of ours")
    }

    /// The job's containers are gone (the agents remove them once the
    /// server has their final state); cleans up whatever is left either way.
    pub fn assert_no_containers(&self, job: &str) {
        let gone = wait_until(Duration::from_secs(20), || {
            containers_of_job(job).is_empty()
        });
        remove_job_containers(job);
        assert!(
            gone,
            "containers of {job} left behind\n{}",
            self.agents
                .iter()
                .map(AgentProc::log_text)
                .collect::<String>()
        );
    }
}

/// The parts of a job's JSON.
pub fn parts(job: &serde_json::Value) -> Vec<serde_json::Value> {
    job["parts"].as_array().cloned().unwrap_or_default()
}
