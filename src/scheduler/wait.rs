//! Why a pending task waits, typed. The supervisor decides on the variant (may `--once` stop?);
//! people read the note rendered from it by `Display`, in `status` and the mirror, and that text
//! must stay as it is. This module decides nothing and keeps no state.

use std::fmt;

use super::DepState;
use crate::record::Outcome;

impl DepState {
    fn as_str(self) -> &'static str {
        match self {
            DepState::Completed => "completed",
            DepState::Failed => "failed",
            DepState::Pending => "pending",
            DepState::Running => "running",
            DepState::Missing => "no such task exists yet",
        }
    }
}

/// Why a pending task does not run now. `Display` gives the note shown by `status` and stored in
/// the mirror; code that must know whether the wait ends by itself matches on the variant.
#[derive(Debug, Clone, PartialEq)]
pub enum WaitReason {
    /// Dependencies (or a parent's subtasks) that have not completed, with where each stands.
    Dependencies(Vec<(String, DepState)>),
    /// A retry back-off; `until` is the time the task's history records, `why` its reason.
    NotBefore {
        until: Option<String>,
        why: Option<String>,
    },
    /// Nothing names an agent: no `agent:`, no matching rule, no fallback.
    NoAgent,
    /// Every one of the `max_concurrent` slots is taken.
    AtCapacity { slots: usize },
    /// Every instance of the agent the routing chose is busy.
    AgentBusy {
        agent: String,
        running: usize,
        max: usize,
    },
    /// No agent in the task's chain can run, each for its reason.
    AgentUnavailable(Vec<Unavailable>),
    /// The router is being asked which agent fits.
    AskingRouter { router: String },
    /// Enough router questions are outstanding already; this one waits its turn.
    RouterBusy { router: String, outstanding: usize },
    /// The task runs in its workdir itself (no worktree), and another task is running there.
    Workdir { path: String, holder: String },
    /// The state directory's file system has less free space than `workspace.min_free_disk_mb`:
    /// no claim starts. The floor only, not the free figure, so the note stays put while space
    /// moves.
    LowDisk { min_mb: u64 },
    /// Cluster mode: published to the shared queue, where any host that fits claims it; its
    /// outcome comes back here.
    InCluster,
}

impl WaitReason {
    /// The wait ends by itself when an agent's cooldown does: `--once` stays for it.
    pub fn waits_for_cooldown(&self) -> bool {
        matches!(self, WaitReason::AgentUnavailable(why)
            if why.iter().any(|u| matches!(u, Unavailable::CoolingDown { .. })))
    }
}

impl fmt::Display for WaitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaitReason::Dependencies(deps) => {
                f.write_str("waiting for ")?;
                for (i, (dep, state)) in deps.iter().enumerate() {
                    let sep = if i == 0 { "" } else { ", " };
                    write!(f, "{sep}{dep} ({})", state.as_str())?;
                }
                Ok(())
            }
            // A stable note (not a countdown) so the mirror is not rewritten on every pass.
            WaitReason::NotBefore { until, why } => {
                write!(f, "retry back-off until {}", until.as_deref().unwrap_or("later"))?;
                match why {
                    Some(w) => write!(f, " (after: {w})"),
                    None => Ok(()),
                }
            }
            WaitReason::InCluster => {
                f.write_str("in the cluster queue: the first host that can run it claims it")
            }
            WaitReason::Workdir { path, holder } => {
                write!(f, "waiting for workdir {path}, held by task {holder}")
            }
            WaitReason::LowDisk { min_mb } => write!(
                f,
                "waiting for disk space: less than workspace.min_free_disk_mb ({min_mb} MiB) free on the state directory's file system"
            ),
            WaitReason::NoAgent => f.write_str(
                "no agent: name one with `agent:` in the task, or set routing.fallback in config.yaml",
            ),
            WaitReason::AtCapacity { slots } => {
                write!(f, "all {slots} slots busy (max_concurrent)")
            }
            WaitReason::AgentBusy {
                agent,
                running,
                max,
            } => write!(f, "waiting for a free {agent} instance ({running}/{max})"),
            WaitReason::AgentUnavailable(why) => write!(f, "no agent available: {}", join(why)),
            WaitReason::AskingRouter { router } => {
                write!(f, "asking the router ({router}) which agent fits")
            }
            WaitReason::RouterBusy {
                router,
                outstanding,
            } => write!(
                f,
                "waiting to ask the router ({router}): {outstanding} questions outstanding"
            ),
        }
    }
}

/// Why an agent cannot take a task now.
#[derive(Debug, Clone, PartialEq)]
pub enum Unavailable {
    /// Resting after a rate limit or an exhausted quota.
    CoolingDown {
        agent: String,
        until: String,
        outcome: Outcome,
    },
    /// Its credentials were refused or missing: it waits for a login (see `login`).
    NeedsLogin {
        agent: String,
        /// What the agent said.
        reason: String,
        /// What to do about it.
        hint: String,
    },
    /// Cannot run at all (not installed, no adapter), in the words of `agents::unavailable_reason`.
    Missing(String),
    /// Its spend (or all agents' spend, under `orchestrator.budget`) reached a `budget` limit:
    /// paused until the window resets. `reason` names spend, limit and reset.
    OverBudget { agent: String, reason: String },
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unavailable::CoolingDown {
                agent,
                until,
                outcome,
            } => write!(
                f,
                "agent {agent}: cooling down until {until} ({})",
                outcome.as_str()
            ),
            Unavailable::NeedsLogin {
                agent,
                reason,
                hint,
            } => write!(f, "agent {agent}: needs login: {reason} ({hint})"),
            Unavailable::Missing(reason) => f.write_str(reason),
            Unavailable::OverBudget { agent, reason } => write!(f, "agent {agent}: {reason}"),
        }
    }
}

/// The reasons, as one note says them.
pub(super) fn join(why: &[Unavailable]) -> String {
    why.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Agent `a`, resting until 2030.
    pub(in crate::scheduler) fn cooling(outcome: Outcome) -> Unavailable {
        Unavailable::CoolingDown {
            agent: "a".into(),
            until: "2030-01-01T00:00:00Z".into(),
            outcome,
        }
    }

    /// The notes `status` shows are rendered from the typed reasons; their text is what it was when
    /// they were strings.
    #[test]
    fn wait_notes_read_as_before() {
        let cases = [
            (
                WaitReason::Dependencies(vec![
                    ("x".into(), DepState::Pending),
                    ("y".into(), DepState::Running),
                    ("z".into(), DepState::Missing),
                ]),
                "waiting for x (pending), y (running), z (no such task exists yet)",
            ),
            (
                WaitReason::NotBefore {
                    until: Some("2030-01-01T00:00:00Z".into()),
                    why: Some("exit code 1".into()),
                },
                "retry back-off until 2030-01-01T00:00:00Z (after: exit code 1)",
            ),
            (
                WaitReason::NotBefore {
                    until: None,
                    why: None,
                },
                "retry back-off until later",
            ),
            (
                WaitReason::NoAgent,
                "no agent: name one with `agent:` in the task, or set routing.fallback in config.yaml",
            ),
            (
                WaitReason::AtCapacity { slots: 4 },
                "all 4 slots busy (max_concurrent)",
            ),
            (
                WaitReason::AgentBusy {
                    agent: "a".into(),
                    running: 1,
                    max: 1,
                },
                "waiting for a free a instance (1/1)",
            ),
            (
                WaitReason::AgentUnavailable(vec![
                    cooling(Outcome::RateLimited),
                    Unavailable::Missing("agent b: `b` not found on PATH".into()),
                ]),
                "no agent available: agent a: cooling down until 2030-01-01T00:00:00Z (rate_limited); agent b: `b` not found on PATH",
            ),
            (
                WaitReason::AskingRouter {
                    router: "local".into(),
                },
                "asking the router (local) which agent fits",
            ),
            (
                WaitReason::RouterBusy {
                    router: "local".into(),
                    outstanding: 2,
                },
                "waiting to ask the router (local): 2 questions outstanding",
            ),
        ];
        for (reason, text) in cases {
            assert_eq!(reason.to_string(), text);
        }
    }

    #[test]
    fn an_agent_that_needs_a_login_is_named_with_what_to_do() {
        let why = WaitReason::AgentUnavailable(vec![Unavailable::NeedsLogin {
            agent: "claude".into(),
            reason: "Not logged in · Please run /login".into(),
            hint: "run `claude` once to log in, or set ANTHROPIC_API_KEY".into(),
        }]);
        assert_eq!(
            why.to_string(),
            "no agent available: agent claude: needs login: Not logged in · Please run /login \
             (run `claude` once to log in, or set ANTHROPIC_API_KEY)"
        );
        // A person has to act: `--once` does not stay for it.
        assert!(!why.waits_for_cooldown());
    }

    #[test]
    fn an_agent_over_budget_says_spend_limit_and_reset() {
        let why = WaitReason::AgentUnavailable(vec![Unavailable::OverBudget {
            agent: "claude".into(),
            reason: "budget: $20.00 of $20.00 today, resets at 00:00 UTC".into(),
        }]);
        assert_eq!(
            why.to_string(),
            "no agent available: agent claude: budget: $20.00 of $20.00 today, resets at 00:00 UTC"
        );
        // Hours away: `--once` does not stay for it.
        assert!(!why.waits_for_cooldown());
    }

    #[test]
    fn only_a_cooldown_among_the_reasons_is_waiting_for_a_cooldown() {
        let quota = cooling(Outcome::QuotaExhausted);
        let missing = Unavailable::Missing("agent b: `b` not found on PATH".into());
        assert!(WaitReason::AgentUnavailable(vec![missing.clone(), quota]).waits_for_cooldown());
        assert!(!WaitReason::AgentUnavailable(vec![missing]).waits_for_cooldown());
        assert!(!WaitReason::AtCapacity { slots: 1 }.waits_for_cooldown());
        assert!(
            !WaitReason::NotBefore {
                until: None,
                why: None
            }
            .waits_for_cooldown()
        );
    }
}
