//! What the watch screen shows, read in one go: counts, every task as one line, the agents with
//! their running instances and cooldowns. Plain data, so the screen can be drawn from it in a test
//! and printed as text when stdout is not a terminal.
//!
//! It only reads (the mirror's read API, and the folder's cooldowns when it is at hand); it never
//! measures worktrees or asks agents for their version, so it stays cheap enough to re-read each
//! second.

use std::collections::BTreeMap;

use anyhow::Result;

use crate::mirror::TaskRow;
use crate::mirror::read::Reader;
use crate::project::Project;

/// The order tasks are listed in: what needs attention first.
const STATE_ORDER: &[&str] = &["running", "pending", "failed", "completed"];

#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// `local` or `postgres`.
    pub source: &'static str,
    pub counts: BTreeMap<String, usize>,
    pub tasks: Vec<TaskLine>,
    pub agents: Vec<AgentLine>,
    /// The last event's sequence number: when it moves, something changed.
    pub seq: i64,
    /// The cluster's hosts on one line (`hosts: h1 alive (1 lease), …`), or why they cannot be
    /// read; `None` without a cluster or before any host joined it.
    pub hosts: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TaskLine {
    pub id: String,
    pub state: String,
    pub agent: Option<String>,
    /// Running: since its attempt started; finished: how long its last attempt took.
    pub elapsed_seconds: Option<u64>,
    pub cost_usd: Option<f64>,
    /// Why a pending task waits, or what went wrong.
    pub note: Option<String>,
    /// The attempt number (its log is `attempt-N.log`).
    pub attempts: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AgentLine {
    pub name: String,
    pub running: usize,
    pub max_instances: usize,
    /// `rate_limited until 2026-…` while it rests (only known with the folder at hand).
    pub cooldown: Option<String>,
}

impl Snapshot {
    /// `database_url`: where the cluster is read, as for [`Project::cluster`].
    pub fn load(
        project: &Project,
        reader: &Reader,
        database_url: Option<&str>,
    ) -> Result<Snapshot> {
        let mut counts: BTreeMap<String, usize> =
            STATE_ORDER.iter().map(|s| (s.to_string(), 0)).collect();
        counts.extend(reader.counts()?);
        let seq = reader.max_seq()?;
        let mut tasks: Vec<TaskLine> = reader.list(None)?.into_iter().map(task_line).collect();
        sort_tasks(&mut tasks);
        let cooling = if reader.is_local() {
            crate::project::status::cooling(&project.layout)
        } else {
            vec![]
        };
        let agents = project
            .cfg
            .agents
            .iter()
            .map(|(name, a)| AgentLine {
                name: name.clone(),
                running: tasks
                    .iter()
                    .filter(|t| t.state == "running" && t.agent.as_deref() == Some(name))
                    .count(),
                max_instances: a.max_instances,
                cooldown: cooling
                    .iter()
                    .find(|c| &c.agent == name)
                    .map(|c| format!("{} until {}", c.outcome, c.until)),
            })
            .collect();
        let hosts = match project.cluster(database_url) {
            None => None,
            Some(Ok(view)) if view.hosts.is_empty() => None,
            Some(Ok(view)) => Some(view.hosts_line()),
            Some(Err(e)) => Some(format!("hosts: {e:#}")),
        };
        Ok(Snapshot {
            source: reader.kind(),
            counts,
            tasks,
            agents,
            seq,
            hosts,
        })
    }

    /// The one-line summary the header and the plain output open with.
    pub fn counts_line(&self) -> String {
        let mut parts: Vec<String> = STATE_ORDER
            .iter()
            .map(|s| format!("{s} {}", self.counts.get(*s).copied().unwrap_or(0)))
            .collect();
        // A state this version does not know still shows, after the known ones.
        parts.extend(
            self.counts
                .iter()
                .filter(|(s, _)| !STATE_ORDER.contains(&s.as_str()))
                .map(|(s, n)| format!("{s} {n}")),
        );
        parts.join("  ")
    }

    pub fn agents_line(&self) -> String {
        let parts: Vec<String> = self
            .agents
            .iter()
            .map(|a| {
                let mut s = format!("{} {}/{}", a.name, a.running, a.max_instances);
                if let Some(c) = &a.cooldown {
                    s.push_str(&format!(" ({c})"));
                }
                s
            })
            .collect();
        format!("agents: {}", parts.join(", "))
    }

    /// The snapshot as plain text: what `watch` prints when stdout is not a terminal.
    pub fn plain_lines(&self) -> Vec<String> {
        let mut out = vec![
            format!(
                "{} ({}, event {})",
                self.counts_line(),
                self.source,
                self.seq
            ),
            self.agents_line(),
        ];
        out.extend(self.hosts.clone());
        if self.tasks.is_empty() {
            out.push("no tasks".into());
            return out;
        }
        let w = self
            .tasks
            .iter()
            .map(|t| t.id.chars().count())
            .max()
            .unwrap_or(2)
            .max(2);
        out.push(format!(
            "{:<w$}  {:<9}  {:<10}  {:>8}  {:>8}  NOTE",
            "ID", "STATE", "AGENT", "ELAPSED", "COST"
        ));
        for t in &self.tasks {
            let line = format!(
                "{:<w$}  {:<9}  {:<10}  {:>8}  {:>8}  {}",
                t.id,
                t.state,
                t.agent.as_deref().unwrap_or("-"),
                elapsed(t.elapsed_seconds),
                cost(t.cost_usd),
                one_line(t.note.as_deref().unwrap_or(""))
            );
            out.push(line.trim_end().to_string());
        }
        out
    }
}

fn task_line(r: TaskRow) -> TaskLine {
    let p = &r.payload;
    let elapsed_seconds = match (&p.started_at, &p.finished_at) {
        (Some(s), Some(f)) if r.state != "running" => {
            match (crate::fsutil::parse_time(s), crate::fsutil::parse_time(f)) {
                (Some(s), Some(f)) => Some((f - s).whole_seconds().max(0) as u64),
                _ => None,
            }
        }
        (Some(s), _) if r.state == "running" => crate::fsutil::seconds_since(s),
        _ => None,
    };
    TaskLine {
        note: r.note.clone().or_else(|| p.error.clone()),
        elapsed_seconds,
        cost_usd: p.cost_usd,
        attempts: p.attempts,
        id: r.id,
        state: r.state,
        agent: r.agent,
    }
}

/// Running first, then pending, failed, completed; within a state the latest change first.
fn sort_tasks(tasks: &mut [TaskLine]) {
    let rank = |s: &str| {
        STATE_ORDER
            .iter()
            .position(|x| *x == s)
            .unwrap_or(STATE_ORDER.len())
    };
    // `list` returns the oldest change first: a stable sort on the rank, reversed within each
    // state, puts the latest change on top.
    tasks.reverse();
    tasks.sort_by_key(|t| rank(&t.state));
}

/// `42s`, `3m05s`, `2h10m`; `-` when unknown.
pub fn elapsed(s: Option<u64>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s < 60 => format!("{s}s"),
        Some(s) if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        Some(s) => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

pub fn cost(c: Option<f64>) -> String {
    match c {
        None => "-".into(),
        Some(c) => format!("${c:.2}"),
    }
}

/// The first line of a note or error, its control characters made visible.
pub fn one_line(s: &str) -> String {
    let first = s.lines().next().unwrap_or_default();
    let mut line = crate::console::visible(first).replace('\t', " ");
    if s.lines().nth(1).is_some() {
        line.push_str(" …");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_at_a_glance() {
        assert_eq!(elapsed(None), "-");
        assert_eq!(elapsed(Some(42)), "42s");
        assert_eq!(elapsed(Some(185)), "3m05s");
        assert_eq!(elapsed(Some(7800)), "2h10m");
        assert_eq!(cost(Some(0.1234)), "$0.12");
        assert_eq!(cost(None), "-");
    }

    #[test]
    fn a_note_is_one_visible_line() {
        assert_eq!(one_line("a\tb\nsecond"), "a b …");
        assert_eq!(one_line("\u{1b}[31mred"), "\\u{1b}[31mred");
    }

    fn line(id: &str, state: &str) -> TaskLine {
        TaskLine {
            id: id.into(),
            state: state.into(),
            agent: None,
            elapsed_seconds: None,
            cost_usd: None,
            note: None,
            attempts: 0,
        }
    }

    #[test]
    fn running_tasks_come_first_and_the_latest_change_leads_each_state() {
        let mut v = vec![
            line("c1", "completed"),
            line("p1", "pending"),
            line("r1", "running"),
            line("c2", "completed"),
            line("f1", "failed"),
        ];
        sort_tasks(&mut v);
        let ids: Vec<_> = v.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids, ["r1", "p1", "f1", "c2", "c1"]);
    }
}
