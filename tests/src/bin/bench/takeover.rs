//! Scenario 9: requests that fail while the agent is upgraded under load. Pods ask for
//! credentials in a loop (half with a connection and a token per attempt, as botocore;
//! half keeping both, as SDKs that pool connections and cache the token) while the agent
//! is replaced, round after round, in two ways on the same node:
//! - **surge** (the DaemonSet's update: `maxSurge: 1, maxUnavailable: 0`): the new agent
//!   starts beside the old one and takes over once ready (its ready file appears), then
//!   the old one gets SIGTERM;
//! - **stop, then start** (the baseline: what `maxUnavailable: 1` does): SIGTERM, then
//!   the new agent.
//!
//! The figure is the number of failed attempts during surge rounds (target 0), beside
//! the stop-then-start rounds' count. Any attempt served with another role or the node's
//! credentials fails the bench outright.

use std::time::Duration;

use anyhow::{Result, bail};
use interceptor_tests::{
    Node,
    agent::{Agent, free_port},
    clients::CredsLoop,
    cluster,
    fake_imds::NODE_ACCESS_KEY,
    pins::Pins,
};
use serde_json::json;

use crate::{
    World,
    report::{Figure, Report, Target},
};

const WAIT: Duration = Duration::from_secs(60);
/// Pods asking, half of each kind.
const PODS: usize = 4;

/// How the agent is replaced in a round.
#[derive(Clone, Copy, Debug)]
enum Upgrade {
    Surge,
    StopThenStart,
}

pub(crate) fn takeovers(world: &World<'_>, report: &mut Report) -> Result<()> {
    let node = Node::new();
    let pods: Vec<_> = (0..PODS).map(|_| node.pod()).collect();
    let roles: Vec<String> = (0..PODS).map(|at| format!("takeover-{at}")).collect();
    let bindings: Vec<(&str, &interceptor_tests::Pod, &str)> = pods
        .iter()
        .zip(&roles)
        .map(|(pod, role)| (role.as_str(), pod, role.as_str()))
        .collect();
    let file = cluster::bindings_file("bench-takeover", &bindings);
    let args = cluster::standalone_args(&node, &file, &world.upstream, &world.sts.endpoint());
    let pins = Pins::new("bench-takeover");
    let metrics_port = free_port();

    let mut agent = Agent::run(&args, &pins.0, metrics_port, &cluster::AGENT_ENV);
    agent.leave_programs();
    wait_taken_over(&agent)?;
    let loops: Vec<(usize, CredsLoop)> = pods
        .iter()
        .enumerate()
        .map(|(at, pod)| {
            let asking = if at % 2 == 0 {
                CredsLoop::start(pod)
            } else {
                CredsLoop::start_keep_alive(pod)
            };
            (at, asking)
        })
        .collect();
    for (_, asking) in &loops {
        asking.wait_for(0, 3, "served before the first upgrade", WAIT, |line| {
            line.starts_with("ok ")
        });
    }

    let rounds = world.sizes.rounds.max(2);
    let (mut surge, mut stop_start) = (Tally::default(), Tally::default());
    for round in 0..rounds * 2 {
        let upgrade = if round % 2 == 0 {
            Upgrade::Surge
        } else {
            Upgrade::StopThenStart
        };
        let marks: Vec<usize> = loops.iter().map(|(_, a)| a.lines().len()).collect();
        agent = match upgrade {
            Upgrade::Surge => {
                let new = Agent::run(&args, &pins.0, metrics_port, &cluster::AGENT_ENV);
                // What its ready file (a file per pod) says, from its log: taken over.
                wait_taken_over(&new)?;
                let mut old = std::mem::replace(&mut agent, new);
                old.terminate();
                agent
            }
            Upgrade::StopThenStart => {
                agent.terminate();
                Agent::run(&args, &pins.0, metrics_port, &cluster::AGENT_ENV)
            }
        };
        agent.leave_programs();
        wait_taken_over(&agent)?;
        // The round ends once every pod was served again.
        for ((_, asking), mark) in loops.iter().zip(&marks) {
            asking.wait_for(*mark, 2, "served after the upgrade", WAIT, |line| {
                line.starts_with("ok ")
            });
        }
        let tally = match upgrade {
            Upgrade::Surge => &mut surge,
            Upgrade::StopThenStart => &mut stop_start,
        };
        for ((at, asking), mark) in loops.iter().zip(&marks) {
            tally.count(&asking.lines()[*mark..], &roles[*at])?;
        }
    }
    for (_, asking) in loops {
        drop(asking.stop());
    }
    agent.terminate();
    drop(agent);
    let _ = interceptor::ebpf::detach(&pins.0);
    node.assert_no_node_imds_reached();
    let _ = std::fs::remove_file(&file);

    report.add(Figure {
        scenario: "9",
        measure: format!(
            "requests failed during {rounds} surge upgrades ({PODS} pods asking in a loop)"
        ),
        ours: surge.failed as f64,
        baseline: Some(stop_start.failed as f64),
        unit: "requests",
        target: Some(Target::ValueAtMost(0.0)),
    });
    report.details.insert(
        "9_takeover".into(),
        json!({
            "rounds_per_kind": rounds,
            "pods": PODS,
            "surge": surge.json(),
            "stop_then_start": stop_start.json(),
        }),
    );
    Ok(())
}

/// Attempts in one kind of round.
#[derive(Default)]
struct Tally {
    attempts: usize,
    failed: usize,
    /// The first few failures, as the pods saw them.
    seen: Vec<String>,
}

impl Tally {
    fn count(&mut self, lines: &[String], role: &str) -> Result<()> {
        for line in lines {
            self.attempts += 1;
            match line.strip_prefix("ok ") {
                Some(rest) => {
                    let (key, served) = rest.split_once(' ').unwrap_or((rest, ""));
                    if key == NODE_ACCESS_KEY || served != role {
                        bail!("LEAK during an upgrade: {line} (the pod's role is {role})");
                    }
                }
                None => {
                    self.failed += 1;
                    if self.seen.len() < 5 {
                        self.seen.push(line.clone());
                    }
                }
            }
        }
        Ok(())
    }

    fn json(&self) -> serde_json::Value {
        json!({ "attempts": self.attempts, "failed": self.failed, "first_failures": self.seen })
    }
}

/// Waits until `agent` has put its socket in the kernel's proxy map (what makes it ready).
fn wait_taken_over(agent: &Agent) -> Result<()> {
    let deadline = std::time::Instant::now() + WAIT;
    while !agent.log_text().contains("the kernel steers connections") {
        if std::time::Instant::now() >= deadline {
            bail!("the agent never took over:\n{}", agent.log_text());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
