//! The reconciler's decision: desired parts (from the control plane) against
//! part containers (from Docker labels) and what this agent supervises, as a
//! pure function. Running it again on the same inputs is always safe, and it
//! is the only place that decides to start or stop a container.

use std::collections::{BTreeMap, BTreeSet};

use drover_api::wire::{Assignment, LogCursor, PartKey, PartState};
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
    /// Cut off from the control plane past the grace (self-fenced): no new
    /// part starts until it answers again.
    pub fenced: bool,
}

/// One step toward the desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Run an assigned part that has no container (pull, create, start).
    Start(PartKey),
    /// Supervise a container found by label (after a restart) that the
    /// control plane still assigns: ship its logs from where the control
    /// plane's log of it ends, wait for it (an exited one at once), report
    /// its end.
    Adopt {
        /// The part.
        part: PartKey,
        /// Its container.
        container: String,
        /// It was created but never started (the agent died in between):
        /// start it first.
        start: bool,
        /// Where the control plane's log of the part ends.
        log_from: Option<LogCursor>,
    },
    /// A container that ended while nobody watched and that the control
    /// plane no longer assigns (or whose end this agent already has): read
    /// its exit code, report it, remove the container once the report is
    /// accepted.
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
/// answered a watch in this session: before that nothing is started,
/// stopped, adopted or collected (two-phase), so a restarted agent never
/// removes work on a guess, and adopts a container knowing where the
/// control plane's log of it ends. `actual` are this node's containers only.
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
        let assigned = wanted.get(&part);
        if known.supervised.contains(&part) {
            if confirmed && assigned.is_none() {
                actions.push(Action::Cancel(part));
            }
            continue;
        }
        if !confirmed {
            continue;
        }
        let finished = known.finished.contains(&part);
        match (c.state, assigned) {
            (ContainerState::Exited, Some(a)) if !finished => actions.push(Action::Adopt {
                part,
                container: c.id.clone(),
                start: false,
                log_from: a.log_cursor,
            }),
            (ContainerState::Exited, _) => actions.push(Action::Collect {
                part,
                container: c.id.clone(),
            }),
            (ContainerState::Running | ContainerState::Created, None) => {
                actions.push(Action::StopContainer {
                    part,
                    container: c.id.clone(),
                });
            }
            (ContainerState::Running | ContainerState::Created, Some(a)) => {
                // A created container starts only while the node is in touch.
                let hold = known.fenced && c.state == ContainerState::Created;
                if !(finished || hold) {
                    actions.push(Action::Adopt {
                        part,
                        container: c.id.clone(),
                        start: c.state == ContainerState::Created,
                        log_from: a.log_cursor,
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
            PartState::Assigned | PartState::Preparing if !known.draining && !known.fenced => {
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
            log_cursor: None,
            launch_secret: None,
            identity: Default::default(),
            app_service_identity: true,
            environment_registry: None,
        }
    }

    fn with_cursor(mut a: Assignment, at_ns: u64) -> Assignment {
        a.log_cursor = Some(LogCursor { at_ns, index: 1 });
        a
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
            fenced: false,
        }
    }

    fn adopt(job: &str) -> Action {
        Action::Adopt {
            part: id(job),
            container: format!("c-{job}"),
            start: false,
            log_from: None,
        }
    }

    fn adopt_from(job: &str, at_ns: u64) -> Action {
        Action::Adopt {
            part: id(job),
            container: format!("c-{job}"),
            start: false,
            log_from: Some(LogCursor { at_ns, index: 1 }),
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
                name: "before confirmation nothing is adopted, collected, stopped or started",
                desired: None,
                actual: vec![container("a", Running), container("b", Exited)],
                known: Known::default(),
                want: vec![],
            },
            Case {
                name: "an adopted part ships its log from the control plane's cursor",
                desired: Some(vec![with_cursor(assigned("a", PRunning), 7)]),
                actual: vec![container("a", Running)],
                known: Known::default(),
                want: vec![adopt_from("a", 7)],
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
                name: "an exited assigned container is adopted (its log shipped), an unassigned one collected",
                desired: Some(vec![with_cursor(assigned("a", PRunning), 9)]),
                actual: vec![container("a", Exited), container("b", Exited)],
                known: Known::default(),
                want: vec![adopt_from("a", 9), collect("b")],
            },
            Case {
                name: "an exited container of a part ended this session is collected",
                desired: Some(vec![assigned("a", PRunning)]),
                actual: vec![container("a", Exited)],
                known: known(&[], &["a"], false),
                want: vec![collect("a")],
            },
            Case {
                name: "nothing starts while fenced",
                desired: Some(vec![assigned("a", Assigned), assigned("b", Preparing)]),
                actual: vec![container("b", ContainerState::Created)],
                known: Known {
                    fenced: true,
                    ..Known::default()
                },
                want: vec![],
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
                    log_from: None,
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
