//! The cluster as the views show it (`status`, `tasks`, `watch`, `GET /api/v1/hosts`, `/metrics`):
//! the hosts with whether each is alive, the leases it holds, its last heartbeat and what it runs,
//! and for each task of the queue the host that runs (or ran, or published) it.
//!
//! It picks where the cluster is read (the one place that does) and turns the queue's rows into
//! plain values to render. It only reads, through `mirror::postgres::cluster_read`, and never
//! decides anything about leases: ages and lease times are the database's.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;

use super::Project;
use crate::mirror::postgres::cluster_read;

/// One host of the cluster.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Host {
    pub name: String,
    /// The process that holds the name now (or held it last).
    pub instance: String,
    pub labels: Vec<String>,
    pub started_at: String,
    /// Not left, and its last heartbeat is within one lease (`cluster.lease_seconds`).
    pub alive: bool,
    /// Leases it holds that have not run out.
    pub leases: u32,
    /// Seconds since its last heartbeat, by the database's clock.
    pub heartbeat_age_seconds: u64,
    /// The tasks it runs now (a lease that has not run out), by id.
    pub running: Vec<String>,
}

/// One task of the cluster queue, as far as the views need it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueuedTask {
    pub id: String,
    /// The host that published it.
    pub origin: String,
    /// `pending`, `running` or `done`.
    pub state: String,
    pub outcome: Option<String>,
    /// The host running it now (a lease that has not run out).
    pub owner: Option<String>,
    /// The host that holds or last held its claim, else its origin: what `tasks` shows as HOST.
    pub host: String,
    pub fence: i64,
    pub attempts: u32,
    /// Whole seconds the running claim still holds, by the database's clock.
    pub lease_left_seconds: Option<u64>,
}

/// What the cluster looks like now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterView {
    pub hosts: Vec<Host>,
    pub queue: Vec<QueuedTask>,
}

impl ClusterView {
    fn of(c: cluster_read::Cluster) -> ClusterView {
        let mut running: HashMap<&str, Vec<String>> = HashMap::new();
        for q in &c.queue {
            if let Some(o) = &q.owner {
                running.entry(o).or_default().push(q.id.clone());
            }
        }
        let hosts = c
            .hosts
            .iter()
            .map(|h| Host {
                name: h.name.clone(),
                instance: h.instance.clone(),
                labels: h.labels.clone(),
                started_at: h.started_at.clone(),
                alive: h.alive,
                leases: h.leases,
                heartbeat_age_seconds: h.heartbeat_age.as_secs(),
                running: running.remove(h.name.as_str()).unwrap_or_default(),
            })
            .collect();
        let queue = c
            .queue
            .into_iter()
            .map(|q| QueuedTask {
                host: q.last_owner.clone().unwrap_or_else(|| q.origin.clone()),
                id: q.id,
                origin: q.origin,
                state: q.state,
                outcome: q.outcome,
                owner: q.owner,
                fence: q.fence,
                attempts: q.attempts,
                lease_left_seconds: q.lease_left.map(|d| d.as_secs()),
            })
            .collect();
        ClusterView { hosts, queue }
    }

    /// The queue's row of a task.
    pub fn task(&self, id: &str) -> Option<&QueuedTask> {
        self.queue.iter().find(|q| q.id == id)
    }

    /// `h1 alive (1 lease), h2 gone (last heartbeat 40 s ago)`: one line for narrow views.
    pub fn hosts_line(&self) -> String {
        let parts: Vec<String> = self
            .hosts
            .iter()
            .map(|h| {
                if h.alive {
                    format!("{} alive ({})", h.name, leases_text(h.leases))
                } else {
                    format!(
                        "{} gone (last heartbeat {} ago)",
                        h.name,
                        crate::fsutil::duration_text(h.heartbeat_age_seconds)
                    )
                }
            })
            .collect();
        format!("hosts: {}", parts.join(", "))
    }
}

/// `1 lease`, `2 leases`.
pub fn leases_text(n: u32) -> String {
    format!("{n} lease{}", if n == 1 { "" } else { "s" })
}

impl Project {
    /// The cluster, read from `--database-url` when given, else from `database.url` when cluster
    /// mode is on here. `None` when there is nothing to read: no cluster mode and no
    /// `--database-url`, or a `--database-url` whose schema never had the cluster tables. With
    /// cluster mode on and no host registered yet, the view is empty rather than `None`.
    pub fn cluster(&self, database_url: Option<&str>) -> Option<Result<ClusterView>> {
        let cfg = &self.cfg;
        let (url, configured) = match (database_url, &cfg.database.url) {
            (Some(url), _) => (url, false),
            (None, Some(url)) if cfg.cluster.enabled => (url.as_str(), true),
            _ => return None,
        };
        let lease = Duration::from_secs(cfg.cluster.lease_seconds);
        match cluster_read::read_blocking(url, &cfg.database.schema, lease) {
            Ok(c) if !c.present && !configured => None,
            Ok(c) => Some(Ok(ClusterView::of(c))),
            Err(e) => Some(Err(e.context("cannot read the cluster queue"))),
        }
    }
}
