//! What the agents spent, against their `budget` limits: the loop's side of `crate::budget`.
//!
//! Loaded at start from the mirror's attempts (start-up has just reconciled the mirror with the
//! tree, so they are the records' attempts), then told of the history of every task that enters the
//! queue (`pending/` is not in the mirror yet at start when it was rebuilt) and of every attempt as
//! it finishes; each attempt counts once, however often it is told. Each
//! scheduling pass asks which agents a reached limit pauses (`pause`): they are unavailable like an
//! agent that cools down, so no attempt starts on them and their tasks go down the fallback chain or
//! wait; running attempts go on. When a limit is newly reached, `budget_reached` is called once: the
//! one place a `budget` notification starts from.
//!
//! Owns the spend ledger and which limits are reached. It never reads a task file or a result file.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use time::OffsetDateTime;

use super::Env;
use crate::budget::{Ledger, Reached, Scope, global_reason};
use crate::console;
use crate::fsutil;
use crate::record::Attempt;
use crate::scheduler::Unavailable;

/// How often, at most, the limits are summed again when no attempt finished (a window may have
/// reset, or the configuration changed).
const RECHECK_EVERY: Duration = Duration::from_secs(1);

#[derive(Default)]
pub(super) struct Spending {
    ledger: Ledger,
    /// The limits reached as of the last check, and when that was (`None`: check at the next pass).
    reached: BTreeMap<Scope, Reached>,
    checked: Option<Instant>,
}

impl Spending {
    /// Count the attempts the records hold (the mirror's rows, just reconciled with the tree), and
    /// say which limits they reach already.
    pub(super) fn load(&mut self, env: &Env, conn: &rusqlite::Connection) {
        let cfg = &env.cfg;
        let now = OffsetDateTime::now_utc();
        let (since, _) =
            crate::budget::window(now, cfg.orchestrator.zone(), crate::budget::Window::Month);
        match crate::mirror::sqlite::spent_since(conn, &fsutil::fmt_time(since)) {
            Ok(rows) => {
                for r in rows {
                    self.ledger.add(
                        &r.task_id,
                        r.n,
                        &r.agent,
                        Some(&r.finished_at),
                        r.cost_usd,
                        r.input_tokens,
                        r.output_tokens,
                    );
                }
            }
            Err(e) => console::warn(&format!(
                "cannot read what the agents spent this month from the mirror: {e:#}; budgets count from now"
            )),
        }
        self.reached = self.ledger.reached(cfg, now);
        self.checked = Some(Instant::now());
        for (scope, r) in &self.reached {
            console::warn(&format!(
                "budget     {}: paused: {}",
                scope_name(scope),
                r.reason
            ));
        }
    }

    /// Attempt `a` of `task` ended: count what it spent (once, whatever calls this again), and look
    /// at the limits at the next pass.
    pub(super) fn attempt_finished(&mut self, task: &str, a: &Attempt) {
        let counted = self.ledger.add(
            task,
            a.n,
            &a.agent,
            a.finished_at.as_deref(),
            a.cost_usd,
            a.input_tokens,
            a.output_tokens,
        );
        if counted {
            self.checked = None;
        }
    }

    /// Mark the agents a reached limit pauses as unavailable (an agent already unavailable for
    /// another reason keeps it). Calls `budget_reached` for each limit reached since the last look.
    pub(super) fn pause(
        &mut self,
        env: &Env,
        wall: OffsetDateTime,
        unavailable: &mut HashMap<String, Unavailable>,
    ) {
        let cfg = &env.cfg;
        let stale = self.checked.is_none_or(|at| at.elapsed() >= RECHECK_EVERY);
        if stale {
            let now = self.ledger.reached(cfg, wall);
            for (scope, r) in &now {
                if self
                    .reached
                    .get(scope)
                    .is_none_or(|was| was.resets_at != r.resets_at)
                {
                    budget_reached(env, scope, r);
                }
            }
            for scope in self.reached.keys().filter(|s| !now.contains_key(*s)) {
                console::info(&format!("budget     {}: resumed", scope_name(scope)));
            }
            self.reached = now;
            self.checked = Some(Instant::now());
            self.ledger.prune(wall, cfg.orchestrator.zone());
        }
        let all = self.reached.get(&Scope::All);
        for name in cfg.agents.keys() {
            let why = self
                .reached
                .get(&Scope::Agent(name.clone()))
                .map(|r| r.reason.clone())
                .or_else(|| all.map(|r| global_reason(&r.reason)));
            if let Some(reason) = why {
                unavailable
                    .entry(name.clone())
                    .or_insert_with(|| Unavailable::OverBudget {
                        agent: name.clone(),
                        reason,
                    });
            }
        }
    }

    /// How long until the first reached limit resets: the loop wakes then to look at the waiting
    /// tasks again.
    pub(super) fn next_reset(&self, wall: OffsetDateTime) -> Option<Duration> {
        self.reached
            .values()
            .map(|r| r.resets_at)
            .min()
            .map(|t| (t - wall).try_into().unwrap_or(Duration::ZERO) + Duration::from_millis(10))
    }
}

fn scope_name(scope: &Scope) -> String {
    match scope {
        Scope::All => "all agents (orchestrator.budget)".into(),
        Scope::Agent(a) => format!("agent {a}"),
    }
}

/// A budget limit was just reached: `scope`'s new attempts pause until `r.resets_at`. Said on the
/// console and sent as a `budget` notice (once per limit reached, not again at a restart).
pub(super) fn budget_reached(env: &Env, scope: &Scope, r: &Reached) {
    console::warn(&format!(
        "budget     {} paused: {} (running attempts go on)",
        scope_name(scope),
        r.reason
    ));
    let agent = match scope {
        Scope::All => None,
        Scope::Agent(a) => Some(a.as_str()),
    };
    env.notice(
        crate::config::NotifyOn::Budget,
        agent,
        None,
        format!("{} paused: {}", scope_name(scope), r.reason),
        Some(crate::fsutil::fmt_time(r.resets_at)),
    );
}
