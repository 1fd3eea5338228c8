//! The reconciler's decision: desired parts (from the control plane) against
//! part containers (from Docker labels) and what this agent supervises, as a
//! pure function. Running it again on the same inputs is always safe, and it
//! is the only place that decides to start or stop a container.

use std::collections::{BTreeMap, BTreeSet};

use drover_api::wire::{Assignment, PartKey, PartState};
use drover_runner::part::PartContainer;
use drover_runner::runtime::ContainerState;

/// What the agent itself knows this session.
#[derive(Debug, Clone, Default)]
pub struct Known {
    /// Parts with a live supervisor (starting, running, or adopted).
    pub supervised: BTreeSet<PartKey>,
    /// Parts whose supervisor ended this session: never started again, even
    /// if a stale desired state still lists them.
    pub finished: BTreeSet<PartKey>,
    /// Draining: no new part starts.
    pub draining: bool,
}

/// One step toward the desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Run an assigned part that has no container (pull, create, start).
    Start(PartKey),
    /// Supervise a running container found by label (after a restart):
    /// wait for it, ship its logs from now on.
    Adopt {
        /// The part.
        part: PartKey,
        /// Its container.
        container: String,
        /// It was created but never started (the agent died in between):
        /// start it first.
        start: bool,
    },
    /// A container that ended while nobody watched: read its exit code,
    /// report it, remove the container once the report is accepted.
    Collect {
        /// The part.
        part: PartKey,
        /// Its container.
        container: String,
    },
    /// Cancel a supervised part the control plane no longer assigns.
    Cancel(PartKey),
    /// Stop and remove an unsupervised running container the control plane
    /// no longer assigns.
    StopContainer {
        /// The part.
        part: PartKey,
        /// Its container.
        container: String,
    },
    /// The control plane believes the part runs here but it has no container
    /// and was not started this session (removed behind the agent's back):
    /// report it failed rather than start a duplicate.
    ReportMissing(PartKey),
}

/// Decides what to do. `desired` is `None` until the control plane has
/// answered a watch in this session: before that nothing is stopped or
/// started (two-phase), only adopted and collected, so a restarted agent
/// never removes work on a guess. `actual` are this node's containers only.
pub fn reconcile(
    desired: Option<&[Assignment]>,
    actual: &[PartContainer],
    known: &Known,
) -> Vec<Action> {
    let mut actions = Vec::new();
    // Live desired parts; ended ones are kept only for their history.
    let wanted: BTreeMap<PartKey, &Assignment> = desired
        .unwrap_or_default()
        .iter()
        .filter(|a| {
            matches!(
                a.state,
                PartState::Assigned | PartState::Preparing | PartState::Running
            )
        })
        .map(|a| (a.part.clone(), a))
        .collect();
    let confirmed = desired.is_some();

    let mut has_container = BTreeSet::new();
    for c in actual {
        let part = c.part.clone();
        has_container.insert(part.clone());
        let assigned = wanted.contains_key(&part);
        if known.supervised.contains(&part) {
            if confirmed && !assigned {
                actions.push(Action::Cancel(part));
            }
            continue;
        }
        match c.state {
            ContainerState::Exited => actions.push(Action::Collect {
                part,
                container: c.id.clone(),
            }),
            ContainerState::Running | ContainerState::Created => {
                let created = c.state == ContainerState::Created;
                if confirmed && !assigned {
                    actions.push(Action::StopContainer {
                        part,
                        container: c.id.clone(),
                    });
                } else if known.finished.contains(&part) || (created && !confirmed) {
                    // A created container is started only for a confirmed
                    // assignment: the agent never starts what it was not given.
                } else {
                    actions.push(Action::Adopt {
                        part,
                        container: c.id.clone(),
                        start: created,
                    });
                }
            }
        }
    }

    for (part, a) in &wanted {
        if has_container.contains(part) || known.finished.contains(part) {
            continue;
        }
        if known.supervised.contains(part) {
            continue;
        }
        match a.state {
            // Assigned or preparing: no container was ever created (one that
            // was would carry the part's labels and be in `actual`).
            PartState::Assigned | PartState::Preparing if !known.draining => {
                actions.push(Action::Start(part.clone()));
            }
            PartState::Running => actions.push(Action::ReportMissing(part.clone())),
            _ => {}
        }
    }
    // Supervised parts not wanted and without a container yet (still
    // pulling) are canceled too.
    if confirmed {
        for part in &known.supervised {
            if !wanted.contains_key(part) && !has_container.contains(part) {
                actions.push(Action::Cancel(part.clone()));
            }
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_api::JobSpec;
    use std::path::Path;

    fn spec() -> JobSpec {
        JobSpec::from_yaml(
            "job.yml",
            "command: echo hi\nenvironment:\n  image: drover/base:bookworm\n",
            Path::new("/tmp"),
        )
        .expect("job parses")
        .spec
    }

    fn id(job: &str) -> PartKey {
        PartKey::new(job, 1, 0)
    }

    fn assigned(job: &str, state: PartState) -> Assignment {
        Assignment {
            part: PartKey::new(job, 1, 0),
            state,
            spec: spec(),
            nodes: vec![],
            allowed_host_paths: vec![],
        }
    }

    fn container(job: &str, state: ContainerState) -> PartContainer {
        PartContainer {
            id: format!("c-{job}"),
            name: format!("drover-{job}"),
            part: PartKey::new(job, 1, 0),
            owner: "n1".into(),
            state,
        }
    }

    fn known(supervised: &[&str], finished: &[&str], draining: bool) -> Known {
        Known {
            supervised: supervised.iter().map(|j| id(j)).collect(),
            finished: finished.iter().map(|j| id(j)).collect(),
            draining,
        }
    }

    fn adopt(job: &str) -> Action {
        Action::Adopt {
            part: id(job),
            container: format!("c-{job}"),
            start: false,
        }
    }

    fn collect(job: &str) -> Action {
        Action::Collect {
            part: id(job),
            container: format!("c-{job}"),
        }
    }

    fn stop(job: &str) -> Action {
        Action::StopContainer {
            part: id(job),
            container: format!("c-{job}"),
        }
    }

    #[test]
    fn decisions() {
        use ContainerState::{Exited, Running};
        use PartState::{Assigned, Preparing, Running as PRunning, Succeeded};
        struct Case {
            name: &'static str,
            desired: Option<Vec<Assignment>>,
            actual: Vec<PartContainer>,
            known: Known,
            want: Vec<Action>,
        }
        let cases = vec![
            Case {
                name: "an assigned part with no container starts",
                desired: Some(vec![assigned("a", Assigned)]),
                actual: vec![],
                known: Known::default(),
                want: vec![Action::Start(id("a"))],
            },
            Case {
                name: "preparing (agent died before create) starts",
                desired: Some(vec![assigned("a", Preparing)]),
                actual: vec![],
                known: Known::default(),
                want: vec![Action::Start(id("a"))],
            },
            Case {
                name: "nothing starts while draining",
                desired: Some(vec![assigned("a", Assigned)]),
                actual: vec![],
                known: known(&[], &[], true),
                want: vec![],
            },
            Case {
                name: "a part with a container never starts again",
                desired: Some(vec![assigned("a", Assigned)]),
                actual: vec![container("a", Running)],
                known: Known::default(),
                want: vec![adopt("a")],
            },
            Case {
                name: "a supervised part is left alone",
                desired: Some(vec![assigned("a", PRunning)]),
                actual: vec![container("a", Running)],
                known: known(&["a"], &[], false),
                want: vec![],
            },
            Case {
                name: "a part finished this session is not restarted by a stale state",
                desired: Some(vec![assigned("a", PRunning)]),
                actual: vec![],
                known: known(&[], &["a"], false),
                want: vec![],
            },
            Case {
                name: "a running part without container or history is reported, not restarted",
                desired: Some(vec![assigned("a", PRunning)]),
                actual: vec![],
                known: Known::default(),
                want: vec![Action::ReportMissing(id("a"))],
            },
            Case {
                name: "before confirmation: adopt and collect, never stop or start",
                desired: None,
                actual: vec![container("a", Running), container("b", Exited)],
                known: Known::default(),
                want: vec![adopt("a"), collect("b")],
            },
            Case {
                name: "after confirmation an unassigned running container is stopped",
                desired: Some(vec![]),
                actual: vec![container("a", Running)],
                known: Known::default(),
                want: vec![stop("a")],
            },
            Case {
                name: "an ended assignment counts as not assigned",
                desired: Some(vec![assigned("a", Succeeded)]),
                actual: vec![container("a", Running)],
                known: Known::default(),
                want: vec![stop("a")],
            },
            Case {
                name: "an exited container is collected whether assigned or not",
                desired: Some(vec![assigned("a", PRunning)]),
                actual: vec![container("a", Exited), container("b", Exited)],
                known: Known::default(),
                want: vec![collect("a"), collect("b")],
            },
            Case {
                name: "a supervised part no longer assigned is canceled",
                desired: Some(vec![]),
                actual: vec![container("a", Running)],
                known: known(&["a"], &[], false),
                want: vec![Action::Cancel(id("a"))],
            },
            Case {
                name: "a supervised part still pulling is canceled when unassigned",
                desired: Some(vec![]),
                actual: vec![],
                known: known(&["a"], &[], false),
                want: vec![Action::Cancel(id("a"))],
            },
            Case {
                name: "a created, never started container waits for confirmation",
                desired: None,
                actual: vec![container("a", ContainerState::Created)],
                known: Known::default(),
                want: vec![],
            },
            Case {
                name: "a created container of a confirmed assignment is started, not recreated",
                desired: Some(vec![assigned("a", Preparing)]),
                actual: vec![container("a", ContainerState::Created)],
                known: Known::default(),
                want: vec![Action::Adopt {
                    part: id("a"),
                    container: "c-a".into(),
                    start: true,
                }],
            },
            Case {
                name: "a created container no longer assigned is stopped",
                desired: Some(vec![]),
                actual: vec![container("a", ContainerState::Created)],
                known: Known::default(),
                want: vec![stop("a")],
            },
            Case {
                name: "a supervised part still pulling is kept while unconfirmed",
                desired: None,
                actual: vec![],
                known: known(&["a"], &[], false),
                want: vec![],
            },
        ];
        for c in cases {
            let got = reconcile(c.desired.as_deref(), &c.actual, &c.known);
            assert_eq!(got, c.want, "{}", c.name);
            // Level-triggered: the same inputs give the same answer.
            assert_eq!(
                reconcile(c.desired.as_deref(), &c.actual, &c.known),
                got,
                "{}",
                c.name
            );
        }
    }
}
