//! Which pending task runs next, and on which agent.
//!
//! Order: effective priority (the task's priority plus one level per `aging_minutes` waited, so low
//! priorities are never starved), then FIFO by arrival. A task is runnable when every dependency has
//! completed, its retry back-off has passed, and an agent can take it within `max_concurrent` and the
//! agent's `max_instances`. This module keeps no files and spawns nothing: the supervisor asks it for
//! decisions and carries them out. A task that cannot run gets a typed [`WaitReason`]; the note people
//! read is rendered from it, and the supervisor decides on the variant, never on the text.

pub mod fan_out;
mod wait;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::record::{Attempt, History, Terminal};
use crate::router::Routed;
use crate::task::Task;

pub use wait::{Unavailable, WaitReason};

/// A task waiting in `pending/`.
#[derive(Debug, Clone)]
pub struct Pending {
    pub task: Task,
    pub path: PathBuf,
    /// Content hash when parsed; the claim re-checks it to catch files still being written.
    pub hash: u64,
    /// (size, mtime ns, inode) when parsed, to notice edits on rescan.
    pub sig: (u64, i128, u64),
    pub seq: u64,
    pub enqueued: Instant,
    pub history: History,
    pub not_before: Option<Instant>,
    /// The reason it is waiting, as last reported to the mirror.
    pub note: Option<WaitReason>,
}

impl Pending {
    pub fn attempts(&self) -> &[Attempt] {
        &self.history.attempts
    }

    /// The dependencies the scheduler waits for: the declared ones, or the children of a task that
    /// was expanded into subtasks (it completes when they all have).
    pub fn waits_for(&self) -> Vec<String> {
        if self.task.file.fan_out.is_some() {
            fan_out::candidate_ids(&self.task)
        } else if self.task.file.subtasks.is_empty() {
            self.task.file.dependencies.clone()
        } else {
            (1..=self.task.file.subtasks.len())
                .map(|i| subtask_id(&self.task.id, i))
                .collect()
        }
    }
}

pub fn subtask_id(parent: &str, n: usize) -> String {
    format!("{parent}.{n}")
}

/// The task file of subtask `n` (1-based) of `parent`: it inherits the parent's settings and depends
/// on the subtask before it (the first, on the parent's dependencies), so the children run in order.
/// Its description is the subtask alone (a `shell` agent runs it as is); the prompt builder adds the
/// parent's description as context.
pub fn subtask_file(parent: &Task, n: usize) -> crate::task::TaskFile {
    let f = &parent.file;
    crate::task::TaskFile {
        id: Some(subtask_id(&parent.id, n)),
        description: f.subtasks[n - 1].clone(),
        priority: f.priority,
        agent: f.agent.clone(),
        task_type: f.task_type.clone(),
        labels: f.labels.clone(),
        dependencies: if n == 1 {
            f.dependencies.clone()
        } else {
            vec![subtask_id(&parent.id, n - 1)]
        },
        context_files: f.context_files.clone(),
        workdir: f.workdir.clone(),
        timeout_minutes: f.timeout_minutes,
        max_retries: f.max_retries,
        max_cost_usd: f.max_cost_usd,
        subtasks: vec![],
        parent: Some(parent.id.clone()),
        isolation: f.isolation,
        merge: f.merge,
        check: f.check.clone(),
        check_timeout_minutes: f.check_timeout_minutes,
        ..Default::default()
    }
}

/// Where a dependency stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DepState {
    Completed,
    Failed,
    Pending,
    Running,
    Missing,
}

/// What to do with one pending task now.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Run {
        agent: String,
        because: String,
    },
    /// All children of a subtask parent completed: finish it without an agent.
    CompleteParent,
    /// A fan-out's candidates have settled it: pick the winner (stopping the others first).
    Pick,
    /// Every candidate of a `pick: judge` fan-out has finished: write the judge's task.
    Judge,
    Fail(String),
    Wait(WaitReason),
    /// Ask the router which agent fits, then decide again with its answer.
    Route,
}

pub struct Scheduler {
    /// Private: every change goes through `insert` and `remove`, which keep `order` and
    /// `with_edges` in step.
    pending: HashMap<String, Pending>,
    next_seq: u64,
    /// Pending ids in run order: (effective priority, arrival seq, id), best first. Kept sorted as tasks
    /// arrive instead of sorting the whole set on every pass; entries of tasks that left are skipped
    /// (and dropped from the front, where claimed tasks leave). Re-sorted in full now and then so aging
    /// moves waiting tasks up.
    order: std::collections::VecDeque<(i64, u64, String)>,
    sorted_at: Option<Instant>,
    /// Pending tasks with dependencies or subtasks: cycles can exist only while this is non-zero.
    with_edges: usize,
}

impl Default for Scheduler {
    fn default() -> Self {
        Self::new()
    }
}

/// How often the order is rebuilt from scratch (aging, changed priorities).
const RESORT: Duration = Duration::from_secs(60);

fn order_key(a: &(i64, u64, String)) -> (std::cmp::Reverse<i64>, u64) {
    (std::cmp::Reverse(a.0), a.1)
}

impl Scheduler {
    pub fn new() -> Self {
        Scheduler {
            pending: HashMap::new(),
            next_seq: 0,
            order: Default::default(),
            sorted_at: None,
            with_edges: 0,
        }
    }

    pub fn next_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    pub fn has_edges(&self) -> bool {
        self.with_edges > 0
    }

    /// Add or replace a pending task.
    pub fn insert(&mut self, p: Pending) {
        let id = p.task.id.clone();
        let (rank, seq, edges) = (p.task.priority(), p.seq, !p.waits_for().is_empty());
        match self.pending.insert(id.clone(), p) {
            Some(old) => {
                self.with_edges -= usize::from(!old.waits_for().is_empty());
                // Its priority may have changed: rebuild the order on the next pass.
                self.sorted_at = None;
            }
            None => {
                let entry = (rank, seq, id);
                let at = self
                    .order
                    .partition_point(|e| order_key(e) < order_key(&entry));
                self.order.insert(at, entry);
            }
        }
        self.with_edges += usize::from(edges);
    }

    pub fn remove(&mut self, id: &str) -> Option<Pending> {
        let p = self.pending.remove(id)?;
        self.with_edges -= usize::from(!p.waits_for().is_empty());
        Some(p)
    }

    pub fn get(&self, id: &str) -> Option<&Pending> {
        self.pending.get(id)
    }

    pub fn contains(&self, id: &str) -> bool {
        self.pending.contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Record why `id` waits. Returns the new note when it differs from the last one (then the
    /// mirror must hear of it), `None` when it is unchanged or the task is not pending.
    pub fn set_note(&mut self, id: &str, reason: WaitReason) -> Option<&WaitReason> {
        let p = self.pending.get_mut(id)?;
        if p.note.as_ref() == Some(&reason) {
            return None;
        }
        p.note = Some(reason);
        p.note.as_ref()
    }

    /// Pending tasks that wait, with why (as of the last pass that noted it), in no order.
    pub fn waiting(&self) -> impl Iterator<Item = (&str, &WaitReason)> {
        self.pending
            .iter()
            .filter_map(|(id, p)| p.note.as_ref().map(|n| (id.as_str(), n)))
    }

    /// Some pending task waits for an agent's cooldown to end (as of the last pass that noted it).
    pub fn waits_for_cooldown(&self) -> bool {
        self.pending
            .values()
            .any(|p| p.note.as_ref().is_some_and(WaitReason::waits_for_cooldown))
    }

    /// Some pending task is in a retry back-off that ends after `now`.
    pub fn backing_off(&self, now: Instant) -> bool {
        self.pending
            .values()
            .any(|p| p.not_before.is_some_and(|t| t > now))
    }

    /// Pending ids in the order they should be considered. The caller hands the list back with
    /// [`Scheduler::put_order`]; it is taken so the caller may change the pending set meanwhile.
    pub fn take_order(
        &mut self,
        cfg: &Config,
        now: Instant,
    ) -> std::collections::VecDeque<(i64, u64, String)> {
        if self
            .sorted_at
            .is_none_or(|t| now.saturating_duration_since(t) >= RESORT)
        {
            let aging = cfg.task_queue.aging_minutes * 60.0;
            let mut v: Vec<(i64, u64, String)> = self
                .pending
                .iter()
                .map(|(id, p)| {
                    let waited = now.saturating_duration_since(p.enqueued).as_secs_f64();
                    let boost = if aging > 0.0 {
                        (waited / aging) as i64
                    } else {
                        0
                    };
                    (p.task.priority().saturating_add(boost), p.seq, id.clone())
                })
                .collect();
            v.sort_by_key(order_key);
            self.order = v.into();
            self.sorted_at = Some(now);
        }
        // Claimed tasks leave from the front: drop their entries for good.
        while let Some(front) = self.order.front() {
            if self.is_current(front) {
                break;
            }
            self.order.pop_front();
        }
        std::mem::take(&mut self.order)
    }

    pub fn put_order(&mut self, order: std::collections::VecDeque<(i64, u64, String)>) {
        // Tasks inserted while the order was out are in `self.order`; merge them back in place.
        let added = std::mem::replace(&mut self.order, order);
        for entry in added {
            let at = self
                .order
                .partition_point(|e| order_key(e) < order_key(&entry));
            self.order.insert(at, entry);
        }
    }

    /// Whether an order entry still stands for a pending task.
    pub fn is_current(&self, entry: &(i64, u64, String)) -> bool {
        self.pending.get(&entry.2).is_some_and(|p| p.seq == entry.1)
    }

    /// Every pending task that sits on a dependency cycle made of pending tasks, with the cycle
    /// spelled out.
    pub fn cycles(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        // Iterative DFS with colours; on a back edge, the stack slice from the target is a cycle.
        let mut colour: HashMap<&str, u8> = HashMap::new();
        let mut ids: Vec<&String> = self.pending.keys().collect();
        ids.sort();
        for start in ids {
            if colour.contains_key(start.as_str()) {
                continue;
            }
            let mut stack: Vec<(&str, Vec<String>, usize)> =
                vec![(start, self.pending[start].waits_for(), 0)];
            colour.insert(start, 1);
            while let Some((node, deps, i)) = stack.last_mut() {
                if *i >= deps.len() {
                    colour.insert(node, 2);
                    stack.pop();
                    continue;
                }
                let dep = deps[*i].clone();
                *i += 1;
                let Some((dep_key, p)) = self.pending.get_key_value(&dep) else {
                    continue;
                };
                match colour.get(dep_key.as_str()) {
                    None => {
                        colour.insert(dep_key, 1);
                        stack.push((dep_key, p.waits_for(), 0));
                    }
                    Some(1) => {
                        let from = stack
                            .iter()
                            .position(|(n, _, _)| *n == dep_key)
                            .unwrap_or(0);
                        let members: Vec<&str> = stack[from..].iter().map(|(n, _, _)| *n).collect();
                        let text = format!("{} → {}", members.join(" → "), dep_key);
                        for m in members {
                            out.entry(m.to_string()).or_insert_with(|| text.clone());
                        }
                    }
                    _ => {}
                }
            }
        }
        out
    }
}

/// Live counts the choice depends on.
pub struct Capacity<'a> {
    pub running_total: usize,
    pub running_per_agent: &'a HashMap<String, usize>,
    /// Agents that cannot run now, with the reason (not installed, no adapter, cooling down).
    pub unavailable: &'a HashMap<String, Unavailable>,
}

/// Decide for one pending task. `dep_state` answers where a dependency stands.
pub fn decide(
    cfg: &Config,
    p: &Pending,
    now: Instant,
    cap: &Capacity,
    dep_state: &dyn Fn(&str) -> DepState,
    routed: Option<&Routed>,
) -> Decision {
    if p.task.file.fan_out.is_some() {
        return fan_out::decide(cfg, p, dep_state);
    }
    let parent = !p.task.file.subtasks.is_empty();
    let mut waiting_on = Vec::new();
    for dep in p.waits_for() {
        match dep_state(&dep) {
            DepState::Completed => {}
            DepState::Failed => {
                return Decision::Fail(if parent {
                    format!("subtask {dep} failed")
                } else {
                    format!("dependency {dep} failed")
                });
            }
            state @ (DepState::Pending | DepState::Running | DepState::Missing) => {
                waiting_on.push((dep, state));
            }
        }
    }
    if !waiting_on.is_empty() {
        return Decision::Wait(WaitReason::Dependencies(waiting_on));
    }
    if parent {
        return Decision::CompleteParent;
    }
    if let Some(t) = p.not_before
        && t > now
    {
        return Decision::Wait(WaitReason::NotBefore {
            until: p.history.not_before.clone(),
            why: p.history.reason.clone(),
        });
    }
    // After a real failure, the agent that failed goes to the back of the chain when the config
    // asks for a second opinion.
    // (The last *failed* attempt: a rate-limited one in between does not reset the choice.)
    let avoid = p
        .attempts()
        .iter()
        .rev()
        .find(|a| a.outcome.counts_as_failure())
        .filter(|_| cfg.routing.retry_on_other_agent)
        .map(|a| a.agent.as_str());
    choose_agent(cfg, &p.task, cap, avoid, routed)
}

/// Agent choice: the task's `agent`, else the first matching routing rule, else the fallback chain;
/// agents that cannot run are skipped in favour of the next in the chain.
pub fn choose_agent(
    cfg: &Config,
    task: &Task,
    cap: &Capacity,
    avoid: Option<&str>,
    routed: Option<&Routed>,
) -> Decision {
    let mut chain: Vec<(String, String)> = Vec::new();
    if let Some(a) = &task.file.agent {
        if !cfg.agents.contains_key(a) {
            return Decision::Fail(format!(
                "agent `{a}` is not configured (known: {})",
                cfg.agent_names()
            ));
        }
        chain.push((a.clone(), "named by the task".into()));
    } else if let Some((i, rule)) = cfg
        .routing
        .rules
        .iter()
        .enumerate()
        .find(|(_, r)| rule_matches(r, task))
    {
        chain.push((rule.agent.clone(), format!("routing.rules[{i}] matched")));
    } else if let Some(r) = routed {
        // The router's answer: this host's router, or (cluster mode) the origin's, which came with
        // the task whether or not this host has a router of its own.
        match r {
            Routed {
                agent: Some(a),
                because,
            } if cfg.agents.contains_key(a) => chain.push((a.clone(), because.clone())),
            Routed { agent, because } => {
                let because = match agent {
                    Some(a) => format!("{because}; `{a}` is not configured here"),
                    None => because.clone(),
                };
                for f in &cfg.routing.fallback {
                    if !chain.iter().any(|(a, _)| a == f) {
                        chain.push((f.clone(), because.clone()));
                    }
                }
            }
        }
    } else if cfg.routing.router.is_some() {
        return Decision::Route;
    }
    // A fan-out candidate named after its agent is that agent's entry: it never runs elsewhere.
    let pinned = task.file.candidate.is_some() && task.file.agent.is_some();
    for f in cfg.routing.fallback.iter().filter(|_| !pinned) {
        if !chain.iter().any(|(a, _)| a == f) {
            chain.push((f.clone(), "routing.fallback".into()));
        }
    }
    if let Some(bad) = avoid
        && chain.len() > 1
        && let Some(i) = chain.iter().position(|(a, _)| a == bad)
    {
        let (a, why) = chain.remove(i);
        for (_, w) in chain.iter_mut() {
            *w = format!("{w}; retry handed over from {bad}, which failed the last attempt");
        }
        chain.push((a, why));
    }
    if chain.is_empty() {
        return Decision::Wait(WaitReason::NoAgent);
    }
    let mut skipped = Vec::new();
    for (name, why) in &chain {
        if let Some(reason) = cap.unavailable.get(name) {
            skipped.push(reason.clone());
            continue;
        }
        // Slots are looked at only once an agent could take the task: a task no agent of its chain
        // can run says so even while every slot is busy (a free slot would not help it).
        if cap.running_total >= cfg.orchestrator.max_concurrent {
            return Decision::Wait(WaitReason::AtCapacity {
                slots: cfg.orchestrator.max_concurrent,
            });
        }
        let agent = &cfg.agents[name];
        let running = cap.running_per_agent.get(name).copied().unwrap_or(0);
        if running >= agent.max_instances {
            // Busy is not unavailable: wait for the agent the routing chose rather than spill over.
            return Decision::Wait(WaitReason::AgentBusy {
                agent: name.clone(),
                running,
                max: agent.max_instances,
            });
        }
        let because = if skipped.is_empty() {
            why.clone()
        } else {
            format!("{why}; skipped: {}", wait::join(&skipped))
        };
        return Decision::Run {
            agent: name.clone(),
            because,
        };
    }
    if task.file.candidate.is_some() && task.file.fan_out_skip_cooling == Some(true) {
        return Decision::Fail(format!(
            "candidate dropped (fan_out_skip_cooling): {}",
            wait::join(&skipped)
        ));
    }
    Decision::Wait(WaitReason::AgentUnavailable(skipped))
}

fn rule_matches(rule: &crate::config::RoutingRule, task: &Task) -> bool {
    if let Some(t) = &rule.task_type
        && task.file.task_type.as_ref() != Some(t)
    {
        return false;
    }
    if !rule.labels.iter().all(|l| task.file.labels.contains(l)) {
        return false;
    }
    if rule.matches.is_some()
        && !rule
            .regex
            .as_ref()
            .is_some_and(|re| re.is_match(&task.file.description))
    {
        return false;
    }
    rule.task_type.is_some() || !rule.labels.is_empty() || rule.matches.is_some()
}

/// Back-off before retry number `failures` (1-based): `retry_delay_seconds * 2^(failures-1)`, capped at an hour.
pub fn retry_delay(cfg: &Config, failures: u32) -> Duration {
    let base = cfg.task_queue.retry_delay_seconds;
    let secs = base * 2f64.powi(failures.saturating_sub(1).min(20) as i32);
    Duration::from_secs_f64(secs.min(MAX_RETRY_DELAY.as_secs_f64()))
}

/// No retry back-off is longer.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(3600);

/// What is left of a back-off that ends at `not_before` (wall clock) and lasts `length`: never more
/// than its length (or, for records that did not say, [`MAX_RETRY_DELAY`]), whatever the clock did
/// since it was written (set back two hours, say).
pub fn backoff_left(
    not_before: time::OffsetDateTime,
    length: Option<Duration>,
    now: time::OffsetDateTime,
) -> Duration {
    let left = (not_before - now).as_seconds_f64().max(0.0);
    Duration::from_secs_f64(left).min(length.unwrap_or(MAX_RETRY_DELAY))
}

/// Ids of terminal tasks, as the supervisor knows them.
pub type Done = HashMap<String, Terminal>;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod backoff_tests {
    use super::*;

    #[test]
    fn a_clock_set_back_cannot_stretch_a_back_off_beyond_its_length() {
        let now = time::OffsetDateTime::now_utc();
        let written = now - time::Duration::hours(2);
        // Written 80 s ahead of a clock that was then two hours ahead of now.
        let not_before = written + time::Duration::hours(2) + time::Duration::seconds(80);
        let length = Some(Duration::from_secs(80));
        assert_eq!(
            backoff_left(not_before, length, now),
            Duration::from_secs(80)
        );
        let later = now + time::Duration::hours(2);
        assert_eq!(
            backoff_left(not_before + time::Duration::hours(2), length, now),
            Duration::from_secs(80)
        );
        assert_eq!(backoff_left(now, length, later), Duration::ZERO);
        // An old record without its length: at most the longest back-off there is.
        let far = now + time::Duration::days(3);
        assert_eq!(backoff_left(far, None, now), MAX_RETRY_DELAY);
    }
}
