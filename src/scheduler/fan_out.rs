//! Fan-out in the scheduler: the candidate tasks a `fan_out` task is expanded into, the judge task
//! `pick: judge` adds, and when the parent may be decided. A candidate is an ordinary task
//! (`<id>.<name>`, pinned to its agent, in its own worktree, its changes kept on its branch), so
//! limits, cooldowns, retries, checks and crash recovery apply to it unchanged; the parent waits
//! in `pending/` until its candidates settle it. Pure decisions: nothing here touches a file.

use crate::config::Config;
use crate::task::{FanOut, Isolation, JUDGE, MergeMode, Pick, Task, TaskFile};

use super::{Decision, DepState, Pending, WaitReason};

/// The task id of candidate `name` of `parent`.
pub fn candidate_id(parent: &str, name: &str) -> String {
    format!("{parent}.{name}")
}

/// The task id of `parent`'s judge.
pub fn judge_id(parent: &str) -> String {
    candidate_id(parent, JUDGE)
}

/// The candidates' task ids of a fan-out task, in its `fan_out` order.
pub fn candidate_ids(task: &Task) -> Vec<String> {
    task.file
        .fan_out
        .as_ref()
        .map(|f| {
            f.names()
                .iter()
                .map(|n| candidate_id(&task.id, n))
                .collect()
        })
        .unwrap_or_default()
}

/// The task file of candidate `name` of `parent`: the parent's task, on the named agent (a count's
/// candidates go where routing sends them), in a worktree of its own, its changes kept on its
/// branch for the pick to land.
pub fn candidate_file(parent: &Task, name: &str) -> TaskFile {
    let f = &parent.file;
    let agent = match f.fan_out {
        Some(FanOut::Agents(_)) => Some(name.to_string()),
        _ => f.agent.clone(),
    };
    TaskFile {
        id: Some(candidate_id(&parent.id, name)),
        description: f.description.clone(),
        priority: f.priority,
        agent,
        task_type: f.task_type.clone(),
        labels: f.labels.clone(),
        dependencies: f.dependencies.clone(),
        context_files: f.context_files.clone(),
        workdir: f.workdir.clone(),
        timeout_minutes: f.timeout_minutes,
        max_retries: f.max_retries,
        // Each candidate may spend up to the task's cap.
        max_cost_usd: f.max_cost_usd,
        parent: Some(parent.id.clone()),
        isolation: Some(Isolation::Worktree),
        merge: Some(MergeMode::Branch),
        check: f.check.clone(),
        check_timeout_minutes: f.check_timeout_minutes,
        fan_out_skip_cooling: f.fan_out_skip_cooling,
        candidate: Some(name.to_string()),
        ..Default::default()
    }
}

/// The judge's time limit when the task sets none: a judge reads, it does not build.
const JUDGE_TIMEOUT_MINUTES: f64 = 10.0;

/// The task file of `parent`'s judge, asked `prompt`. One attempt only: a judge that fails is not
/// asked again, the pick falls back to the order the candidates passed in.
pub fn judge_file(parent: &Task, prompt: String) -> TaskFile {
    let f = &parent.file;
    TaskFile {
        id: Some(judge_id(&parent.id)),
        description: prompt,
        priority: f.priority,
        agent: f.judge.clone(),
        labels: f.labels.clone(),
        workdir: f.workdir.clone(),
        timeout_minutes: Some(f.timeout_minutes.unwrap_or(JUDGE_TIMEOUT_MINUTES)),
        max_retries: Some(0),
        parent: Some(parent.id.clone()),
        // A CLI judge reads the candidates' diffs in the prompt; whatever it might write stays on
        // a branch the pick deletes.
        isolation: Some(Isolation::Worktree),
        merge: Some(MergeMode::Branch),
        candidate: Some(JUDGE.to_string()),
        ..Default::default()
    }
}

/// Decide for a pending fan-out task: wait for its candidates, have them judged, pick, or fail.
pub fn decide(cfg: &Config, p: &Pending, dep_state: &dyn Fn(&str) -> DepState) -> Decision {
    let f = &p.task.file;
    let Some(fan) = &f.fan_out else {
        return Decision::Fail("not a fan-out task".into());
    };
    // A candidate on an unknown agent could never run: say so before anything is started.
    if let FanOut::Agents(agents) = fan
        && let Some(a) = agents.iter().find(|a| !cfg.agents.contains_key(*a))
    {
        return Decision::Fail(format!(
            "fan_out: agent `{a}` is not configured (known: {})",
            cfg.agent_names()
        ));
    }
    let pick = f.pick.unwrap_or_default();
    if pick == Pick::Judge
        && let Some(j) = f.judge.as_ref().filter(|j| !cfg.agents.contains_key(*j))
    {
        return Decision::Fail(format!(
            "judge: agent `{j}` is not configured (known: {})",
            cfg.agent_names()
        ));
    }
    let mut open = vec![];
    let mut completed = 0;
    for id in candidate_ids(&p.task) {
        match dep_state(&id) {
            DepState::Completed => completed += 1,
            DepState::Failed => {}
            s @ (DepState::Pending | DepState::Running | DepState::Missing) => open.push((id, s)),
        }
    }
    let none_completed = || {
        Decision::Fail(format!(
            "no candidate completed: {} failed (their results say why)",
            candidate_ids(&p.task).join(", ")
        ))
    };
    match pick {
        // The first to pass wins at once; the pick stops the others.
        Pick::FirstPass if completed > 0 => Decision::Pick,
        _ if !open.is_empty() => Decision::Wait(WaitReason::Dependencies(open)),
        _ if completed == 0 => none_completed(),
        Pick::FirstPass | Pick::All => Decision::Pick,
        Pick::Judge if completed == 1 => Decision::Pick,
        Pick::Judge => match dep_state(&judge_id(&p.task.id)) {
            DepState::Missing => Decision::Judge,
            DepState::Completed | DepState::Failed => Decision::Pick,
            s @ (DepState::Pending | DepState::Running) => {
                Decision::Wait(WaitReason::Dependencies(vec![(judge_id(&p.task.id), s)]))
            }
        },
    }
}
