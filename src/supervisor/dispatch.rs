//! What runs next, and starting it.
//!
//! After every turn of the loop, a pass goes through the pending queue in run order and asks the
//! scheduler about each task; a task whose agent only the router can choose waits while the router
//! is asked. Each decision that changes something comes back as an `Action` that the loop carries
//! out before the next task is decided: a start takes a slot, a failure decides its dependents.
//! Starting an attempt writes its claim record and launches it through `Runs`; a parent whose
//! subtasks all completed is claimed and finished right here, without an agent. A claim that did
//! not give us the task (lost to another supervisor, the file changed, a stop or a cancel came
//! first) is undone here too (`unclaimed`).
//!
//! Owns the router's answers, the cooldowns, the agents that need a login (and their login checks,
//! which run off the loop), which agents can run (looked up at most once a second), whether the
//! state directory's file system is below the free-space floor (looked at most once a second; no
//! claim starts while it is) and when to wake for the next retry back-off. It never runs an agent and never reads a task file; the only disk
//! work on the loop is the rare claim of a finished parent and the rare write of a login mark.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio::sync::mpsc;

use super::attempt::claim_task;
use super::events::Action;
use super::events::{Claimed, LoginChecked};
use super::{Env, Supervisor, View};
use crate::agents;
use crate::config::Config;
use crate::console;
use crate::context;
use crate::cooldown::Cooldowns;
use crate::fsutil;
use crate::instance::Instance;
use crate::login::{Logins, NeedsLogin};
use crate::mirror::Op;
use crate::record::{Claim, Outcome, TaskResult, Terminal};
use crate::router::{self, Routed};
use crate::scheduler::{
    self, Capacity, Decision, DepState, Pending, Scheduler, Unavailable, WaitReason,
};
use crate::spool::{Place, Spool};
use crate::task::Task;

pub(super) struct Dispatch {
    /// The next pass looks at every pending task (see `begin_pass`).
    full_pass_due: bool,
    /// When the earliest retry back-off ends, as far as known.
    next_wake: Option<Instant>,
    /// Agents that cannot run and why, with when that was checked.
    unavailable: Option<(Instant, HashMap<String, Unavailable>)>,
    /// Agents resting after a rate limit.
    cooldowns: Cooldowns,
    /// Agents whose credentials were refused.
    logins: Logins,
    /// Agents whose login check is running.
    checking: HashSet<String>,
    login_tx: mpsc::UnboundedSender<(String, LoginChecked)>,
    /// The router's answers, by task, and the tasks it is being asked about (`None`).
    routes: HashMap<String, Option<Routed>>,
    route_tx: mpsc::UnboundedSender<(String, Routed)>,
    /// The free-space floor (`workspace.min_free_disk_mb`) as last looked at.
    disk: DiskFloor,
    /// What the agents spent against their budgets; a reached limit pauses agents like a cooldown.
    pub(super) spending: super::spend::Spending,
}

/// How often, at most, the free space of the state directory's file system is looked at (one
/// `statvfs`); while it is below the floor the loop wakes this often to look again, so claims
/// resume by themselves once space comes back.
const DISK_CHECK_EVERY: Duration = Duration::from_secs(1);

#[derive(Default)]
struct DiskFloor {
    checked: Option<Instant>,
    /// While below the floor: (free bytes at the last look, the floor in MiB).
    low: Option<(u64, u64)>,
}

/// How long an agent CLI's login check may take (Claude Code's takes a third of a second).
const LOGIN_CHECK_LIMIT: Duration = Duration::from_secs(30);

/// The receiving ends of `Dispatch`'s helpers: the router's answers and the login checks.
pub(super) struct DispatchInbox {
    pub(super) routed: mpsc::UnboundedReceiver<(String, Routed)>,
    pub(super) login_checked: mpsc::UnboundedReceiver<(String, LoginChecked)>,
}

impl Dispatch {
    /// The router's answers and the login checks arrive on the receivers.
    pub(super) fn new(cooldowns: Cooldowns, logins: Logins) -> (Dispatch, DispatchInbox) {
        let (route_tx, routed) = mpsc::unbounded_channel();
        let (login_tx, login_checked) = mpsc::unbounded_channel();
        let dispatch = Dispatch {
            full_pass_due: true,
            next_wake: None,
            unavailable: None,
            cooldowns,
            logins,
            checking: HashSet::new(),
            login_tx,
            routes: HashMap::new(),
            route_tx,
            disk: DiskFloor::default(),
            spending: Default::default(),
        };
        (
            dispatch,
            DispatchInbox {
                routed,
                login_checked,
            },
        )
    }

    /// `id` entered the queue or changed: an earlier router answer no longer applies, and its
    /// retry back-off, if any, ends at `not_before`.
    pub(super) fn queued(&mut self, id: &str, not_before: Option<Instant>) {
        if let Some(t) = not_before {
            self.wake_at(t);
        }
        self.routes.remove(id);
    }

    /// `id` left the queue: a task re-created under the same id is asked afresh.
    pub(super) fn forget(&mut self, id: &str) {
        self.routes.remove(id);
    }

    /// Answers for tasks that left the queue by a way that did not say so.
    pub(super) fn forget_answers_not_in(&mut self, queue: &Scheduler) {
        self.routes.retain(|id, _| queue.contains(id));
    }

    /// The next pass looks at every pending task, even while all slots are busy.
    pub(super) fn want_full_pass(&mut self) {
        self.full_pass_due = true;
    }

    fn wake_at(&mut self, t: Instant) {
        self.next_wake = Some(self.next_wake.map_or(t, |w| w.min(t)));
    }

    /// Some task waits for the router's answer.
    pub(super) fn asking_router(&self) -> bool {
        self.routes.values().any(Option::is_none)
    }

    /// Some agent is cooling down.
    pub(super) fn cooling_down(&self) -> bool {
        self.cooldowns.next_end(OffsetDateTime::now_utc()).is_some()
    }

    /// `agent` hit a rate limit or its quota: it rests until the time returned, and the next pass
    /// looks at every task again.
    pub(super) fn cool_down(
        &mut self,
        agent: &str,
        outcome: Outcome,
        retry_after: Option<Duration>,
        base: Option<Duration>,
        error: &str,
    ) -> OffsetDateTime {
        self.full_pass_due = true;
        self.cooldowns
            .rate_limited(agent, outcome, retry_after, base, error)
    }

    /// An attempt on `agent` completed: its cooldown back-off and its login streak start over.
    pub(super) fn succeeded(&mut self, agent: &str) {
        self.cooldowns.succeeded(agent);
        if self.logins.get(agent).is_some() {
            self.logins.forget(agent);
        }
    }

    /// `agent`'s credentials were refused (`error`, in its words): no task goes to it until
    /// something may have fixed that (see `crate::login`), and the next pass looks at every task
    /// again. Returns the mark, with what to do about it.
    pub(super) fn needs_login(&mut self, env: &Env, agent: &str, error: &str) -> NeedsLogin {
        self.full_pass_due = true;
        let cfg = &env.cfg.agents[agent];
        let hint = agents::login_hint(agent, cfg);
        let fingerprint = agents::login_fingerprint(agent, cfg, &env.cfg.security.env_allow);
        let recheck = Some(env.cfg.orchestrator.login_recheck_seconds)
            .filter(|s| *s > 0)
            .map(Duration::from_secs);
        // One line (it becomes part of wait notes and table rows), redacted like every state file.
        let reason: String = env
            .redactor
            .redact(error)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .chars()
            .take(500)
            .collect();
        self.logins
            .mark(agent, &reason, &hint, &fingerprint, recheck)
    }

    /// Look at the agents that need a login (at start and on every heartbeat): take the marks
    /// other supervisors and `orchestrate agents --reset` left or cleared, clear the marks of
    /// agents whose configuration, environment or credentials changed, and for those whose look is
    /// due run their CLI's login check off the loop (its answer comes back as `on_login_checked`),
    /// or, when the CLI has none, let the next task try the agent again.
    pub(super) fn check_logins(&mut self, env: &Env) {
        let before: HashSet<String> = self.logins.active().map(|(a, _)| a.to_string()).collect();
        self.logins.refresh();
        let after: HashSet<String> = self.logins.active().map(|(a, _)| a.to_string()).collect();
        for gone in before.difference(&after) {
            console::info(&format!(
                "login      {gone}: needs-login mark cleared (orchestrate agents --reset, or another supervisor)"
            ));
            self.full_pass_due = true;
        }
        let marked: Vec<(String, String)> = self
            .logins
            .active()
            .map(|(a, m)| (a.to_string(), m.fingerprint.clone()))
            .collect();
        for (agent, fingerprint) in marked {
            let Some(cfg) = env.cfg.agents.get(&agent) else {
                // No longer configured: the mark means nothing.
                self.logins.forget(&agent);
                continue;
            };
            if agents::login_fingerprint(&agent, cfg, &env.cfg.security.env_allow) != fingerprint {
                self.logins.forget(&agent);
                self.full_pass_due = true;
                console::info(&format!(
                    "login      {agent}: its configuration, environment or credentials changed; tasks go to it again"
                ));
            }
        }
        let recheck = env.cfg.orchestrator.login_recheck_seconds;
        if recheck == 0 {
            return;
        }
        for agent in self.logins.due(OffsetDateTime::now_utc()) {
            if self.checking.contains(&agent) {
                continue;
            }
            let cfg = &env.cfg.agents[&agent];
            let check = agents::adapter_for(cfg.kind)
                .and_then(|a| a.login_check(&agent, cfg, &env.layout.root));
            let Some(inv) = check else {
                self.logins.lift(
                    &agent,
                    "the recheck interval passed: the next task tries it",
                );
                self.full_pass_due = true;
                console::info(&format!(
                    "login      {agent}: trying it again (login_recheck_seconds passed)"
                ));
                continue;
            };
            self.checking.insert(agent.clone());
            let command = std::iter::once(inv.program.as_str())
                .chain(inv.args.iter().map(String::as_str))
                .collect::<Vec<_>>()
                .join(" ");
            let child_env = crate::process::build_env(&env.cfg.security.env_allow, &inv.env);
            let tx = self.login_tx.clone();
            tokio::spawn(async move {
                let checked = crate::process::check(
                    &inv.program,
                    &inv.args,
                    &child_env,
                    &inv.cwd,
                    LOGIN_CHECK_LIMIT,
                )
                .await;
                let _ = tx.send((agent, LoginChecked { command, checked }));
            });
        }
    }

    /// An agent's login check is back: exit code 0 lifts its mark; anything else keeps it, and the
    /// next look waits longer.
    pub(super) fn on_login_checked(&mut self, env: &Env, agent: &str, r: LoginChecked) {
        self.checking.remove(agent);
        if !self.logins.get(agent).is_some_and(NeedsLogin::active) {
            return;
        }
        let said = env.redactor.redact(&r.checked.said);
        if r.checked.code == Some(0) {
            self.logins
                .lift(agent, &format!("`{}` passed: {said}", r.command));
            self.full_pass_due = true;
            console::info(&format!(
                "login      {agent}: `{}` says it is logged in; tasks go to it again",
                r.command
            ));
        } else {
            let base = Duration::from_secs(env.cfg.orchestrator.login_recheck_seconds.max(1));
            self.logins.still_logged_out(agent, base);
            console::debug(&format!(
                "login      {agent}: still needs a login (`{}`: {said})",
                r.command
            ));
        }
    }

    /// The agents that need a login, for the console at start.
    pub(super) fn marked_logins(&self) -> impl Iterator<Item = (&str, &NeedsLogin)> {
        self.logins.active()
    }

    /// Look at the free space of the file system holding `state_dir`, at most once a
    /// [`DISK_CHECK_EVERY`]. Going below `workspace.min_free_disk_mb` and back above it are each
    /// said once on the console; coming back asks for a full pass. Whether [`Dispatch::disk_problem`]
    /// changed. Results, logs and the mirror need the disk as much as a worktree does, so the floor
    /// holds every claim back, not only those that would make a worktree.
    pub(super) fn check_disk(&mut self, cfg: &Config, state_dir: &Path) -> bool {
        if self
            .disk
            .checked
            .is_some_and(|t| t.elapsed() < DISK_CHECK_EVERY)
        {
            return false;
        }
        self.disk.checked = Some(Instant::now());
        let min_mb = cfg.workspace.min_free_disk_mb;
        let floor = min_mb.saturating_mul(1024 * 1024);
        let free = if floor == 0 {
            None
        } else {
            match fsutil::free_bytes(state_dir) {
                Ok(f) => Some(f),
                // A file system that cannot say how full it is does not stop the work.
                Err(e) => {
                    console::debug(&format!(
                        "disk       cannot read the free space of {}: {e}",
                        state_dir.display()
                    ));
                    None
                }
            }
        };
        let low = free.filter(|f| *f < floor).map(|f| (f, min_mb));
        let before = std::mem::replace(&mut self.disk.low, low);
        match (before, low) {
            (None, Some((free, _))) => console::warn(&format!(
                "disk       {} free on the file system of {}, below workspace.min_free_disk_mb ({min_mb} MiB): no new claims until there is more (running tasks go on)",
                fsutil::bytes_text(free),
                state_dir.display()
            )),
            (Some(_), None) => {
                console::info(&format!(
                    "disk       free space on the file system of {} is back above the floor: claims resume",
                    state_dir.display()
                ));
                self.full_pass_due = true;
            }
            _ => {}
        }
        let shown = |l: Option<(u64, u64)>| l.map(|(f, m)| (fsutil::bytes_text(f), m));
        shown(before) != shown(low)
    }

    /// What `status` shows while no claim starts for lack of free space.
    pub(super) fn disk_problem(&self) -> Option<String> {
        self.disk.low.map(|(free, min_mb)| {
            format!(
                "no new claims: {} free on the state directory's file system, below workspace.min_free_disk_mb ({min_mb} MiB)",
                fsutil::bytes_text(free)
            )
        })
    }

    /// The earliest retry back-off still ahead, from the last full pass and later requeues. When it
    /// has passed, the next pass is a full one that finds the next.
    pub(super) fn wake_deadline(&mut self) -> Option<Instant> {
        match self.next_wake {
            Some(t) if t > Instant::now() => Some(t),
            Some(_) => {
                self.next_wake = None;
                self.full_pass_due = true;
                None
            }
            None => None,
        }
    }

    /// The router answered about `id`.
    pub(super) fn on_routed(&mut self, queue: &Scheduler, id: String, routed: Routed) {
        if routed.agent.is_none() {
            console::warn(&format!("router     {id}: {}", routed.because));
        } else {
            console::debug(&format!("router     {id}: {}", routed.because));
        }
        // Only for tasks still waiting for it; one that left pending meanwhile is forgotten.
        if queue.contains(&id) {
            self.routes.insert(id, Some(routed));
            self.full_pass_due = true;
        } else {
            self.routes.remove(&id);
        }
    }

    /// Which agents cannot run now, and why: not installed (looked up at most once a second: a
    /// PATH lookup per agent on every pass would be the scheduler's main cost in a burst, and
    /// installs are not that quick), cooling down, or in need of a login.
    fn availability(
        &mut self,
        env: &Env,
        cfg: &Config,
        wall: OffsetDateTime,
    ) -> HashMap<String, Unavailable> {
        let fresh = self
            .unavailable
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < Duration::from_secs(1));
        if !fresh {
            let mut map = HashMap::new();
            for (name, a) in &cfg.agents {
                if let Some(r) = agents::unavailable_reason(name, a) {
                    map.insert(name.clone(), Unavailable::Missing(r));
                }
            }
            self.unavailable = Some((Instant::now(), map));
        }
        // A handful of entries: cloned, so the pass may hold it while it changes the rest.
        let mut unavailable = self
            .unavailable
            .as_ref()
            .map(|(_, m)| m.clone())
            .unwrap_or_default();
        for (agent, c) in self.cooldowns.active(wall) {
            unavailable
                .entry(agent.to_string())
                .or_insert_with(|| Unavailable::CoolingDown {
                    agent: agent.to_string(),
                    until: c.until.clone(),
                    outcome: c.outcome,
                });
        }
        // A reached budget pauses like a cooldown (which, ending sooner, is said first).
        self.spending.pause(env, wall, &mut unavailable);
        // A login outlasts any cooldown: when both hold, the login is what a person must see to
        // (a CLI that is not installed comes first all the same).
        for (agent, m) in self.logins.active() {
            if cfg.agents.contains_key(agent)
                && !matches!(unavailable.get(agent), Some(Unavailable::Missing(_)))
            {
                unavailable.insert(
                    agent.to_string(),
                    Unavailable::NeedsLogin {
                        agent: agent.to_string(),
                        reason: m.reason.clone(),
                        hint: m.hint.clone(),
                    },
                );
            }
        }
        unavailable
    }

    /// Which agents cannot start now, and why (for a cluster claim).
    pub(super) fn unavailable_now(&mut self, env: &Env) -> HashMap<String, Unavailable> {
        let cfg = env.cfg.clone();
        self.availability(env, &cfg, OffsetDateTime::now_utc())
    }

    /// Begin a scheduling pass. A full pass looks at every pending task (wait notes, back-off
    /// wake-ups); otherwise the pass ends once every slot is taken, so a long queue costs nothing
    /// while agents are busy. `None`: every slot is taken and no full pass is due.
    pub(super) fn begin_pass(
        &mut self,
        env: &Env,
        running: usize,
        queue: &mut Scheduler,
    ) -> Option<Pass> {
        let cfg = &env.cfg;
        let now = Instant::now();
        let wall = OffsetDateTime::now_utc();
        let unavailable = self.availability(env, cfg, wall);
        let full = std::mem::take(&mut self.full_pass_due);
        if !full && running >= cfg.orchestrator.max_concurrent {
            return None;
        }
        if full {
            self.next_wake = None;
        }
        if self.disk.low.is_some() {
            // Look at the disk again soon, even when nothing else happens.
            self.wake_at(now + DISK_CHECK_EVERY);
        }
        if let Some(d) = self.cooldowns.next_end(wall) {
            // Wake when the first cooldown ends, so the tasks waiting for it are looked at again.
            self.wake_at(now + d);
        }
        if let Some(d) = self.spending.next_reset(wall) {
            // Likewise when a budget window resets.
            self.wake_at(now + d);
        }
        Some(Pass {
            order: queue.take_order(cfg, now),
            at: 0,
            full,
            now,
            unavailable,
        })
    }

    /// The router's answer about `id`: `Some(None)` while it is being asked, `None` when it was
    /// not asked (or the task changed since).
    pub(super) fn route_of(&self, id: &str) -> Option<Option<&Routed>> {
        self.routes.get(id).map(Option::as_ref)
    }

    /// Ask the router about a task, once; it waits with a note until the answer comes.
    pub(super) fn ask_router(&mut self, env: &Env, queue: &mut Scheduler, id: &str) {
        if self.routes.contains_key(id) || !queue.contains(id) {
            return;
        }
        let router = env
            .cfg
            .routing
            .router
            .as_ref()
            .map(|r| r.agent.clone())
            .unwrap_or_default();
        // A burst of unrouted tasks must not become a burst of requests to one local model.
        let asking = self.routes.values().filter(|r| r.is_none()).count();
        if asking >= env.cfg.orchestrator.max_concurrent.max(1) {
            let busy = WaitReason::RouterBusy {
                router,
                outstanding: asking,
            };
            note(env, queue, id, busy);
            return;
        }
        // A task is asked about once (see `routes`), so this note is always new.
        note(env, queue, id, WaitReason::AskingRouter { router });
        self.routes.insert(id.to_string(), None);
        let task = queue
            .get(id)
            .map(|p| p.task.clone())
            .expect("checked above");
        let (cfg, tx, id) = (env.cfg.clone(), self.route_tx.clone(), id.to_string());
        // Its own small runtime on a blocking thread: the HTTP client's stream is not `Send`.
        tokio::task::spawn_blocking(move || {
            let routed = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(router::route(&cfg, &task)),
                Err(e) => Routed {
                    agent: None,
                    because: format!("router not asked ({e}); routing.fallback"),
                },
            };
            let _ = tx.send((id, routed));
        });
    }
}

/// One scheduling pass: the queue's run order, taken for the length of the pass (see
/// `Scheduler::take_order`), and what it found at its start.
pub(super) struct Pass {
    order: VecDeque<(i64, u64, String)>,
    /// The next entry of `order` to look at.
    at: usize,
    full: bool,
    now: Instant,
    unavailable: HashMap<String, Unavailable>,
}

impl Pass {
    /// The next thing to do. Waits are noted (and routers asked) here; anything else comes back
    /// for the loop to carry out before it asks again. `None`: the pass is over.
    #[must_use = "the actions are the rest of the work: apply them"]
    pub(super) fn next(
        &mut self,
        dispatch: &mut Dispatch,
        queue: &mut Scheduler,
        view: &View,
    ) -> Option<Action> {
        let cfg = &view.env.cfg;
        while let Some(entry) = self.order.get(self.at) {
            self.at += 1;
            if !self.full && view.runs.len() >= cfg.orchestrator.max_concurrent {
                self.at = self.order.len();
                return None;
            }
            let id = &entry.2;
            let Some(p) = queue.get(id).filter(|p| p.seq == entry.1) else {
                continue;
            };
            // Published to the cluster: whichever host claims it runs it, this one included.
            if view.cluster && super::cluster::goes_to_cluster(&p.task) {
                continue;
            }
            if self.full
                && let Some(t) = p.not_before.filter(|t| *t > self.now)
            {
                dispatch.wake_at(t);
            }
            let cap = Capacity {
                running_total: view.runs.len(),
                running_per_agent: view.runs.per_agent(),
                unavailable: &self.unavailable,
            };
            let routed = dispatch.routes.get(id).and_then(Option::as_ref);
            let dep_state = |d: &str| dep_state(view, queue, d);
            let decision = match scheduler::decide(cfg, p, self.now, &cap, &dep_state, routed) {
                // Every claim needs the disk: the floor holds back whatever would start.
                Decision::Run { .. } | Decision::CompleteParent | Decision::Pick
                    if let Some((_, min_mb)) = dispatch.disk.low =>
                {
                    Decision::Wait(WaitReason::LowDisk { min_mb })
                }
                d => d,
            };
            match decision {
                Decision::Route => dispatch.ask_router(view.env, queue, id),
                Decision::Wait(reason) => {
                    if let Some(note) = note(view.env, queue, id, reason) {
                        console::debug(&format!("waiting    {id}: {note}"));
                    }
                }
                Decision::Run { agent, because } => {
                    // Without a worktree, tasks sharing a workdir take turns, so each diff is
                    // that task's alone.
                    if let Some(dir) =
                        super::workspace::exclusive_workdir(cfg, &view.env.layout, &p.task, &agent)
                        && let Some(holder) = view.runs.holder_of(&dir)
                    {
                        let rel = view.env.layout.rel(&dir);
                        let reason = WaitReason::Workdir {
                            path: if rel.is_empty() { ".".into() } else { rel },
                            holder: holder.to_string(),
                        };
                        if let Some(note) = note(view.env, queue, id, reason) {
                            console::debug(&format!("waiting    {id}: {note}"));
                        }
                        continue;
                    }
                    let id = id.clone();
                    return Some(Action::Start { id, agent, because });
                }
                Decision::CompleteParent => return Some(Action::CompleteParent(id.clone())),
                Decision::Pick => return Some(Action::Pick(id.clone())),
                Decision::Judge => return Some(Action::Judge(id.clone())),
                Decision::Fail(reason) => {
                    let id = id.clone();
                    return Some(Action::Fail { id, reason });
                }
            }
        }
        None
    }

    /// Hand the order back to the queue.
    pub(super) fn end(self, queue: &mut Scheduler) {
        queue.put_order(self.order);
    }
}

/// Tell the mirror why `id` waits, when that changed; returns the new note then.
pub(super) fn note(
    env: &Env,
    queue: &mut Scheduler,
    id: &str,
    reason: WaitReason,
) -> Option<String> {
    let note = queue.set_note(id, reason)?.to_string();
    env.writer.send(Op::Note {
        id: id.to_string(),
        note: Some(note.clone()),
    });
    Some(note)
}

fn dep_state(view: &View, queue: &Scheduler, id: &str) -> DepState {
    if let Some(t) = view.ledger.status(id) {
        return match t {
            Terminal::Completed => DepState::Completed,
            Terminal::Failed => DepState::Failed,
        };
    }
    if view.in_hand(id) {
        return DepState::Running;
    }
    if queue.contains(id) {
        return DepState::Pending;
    }
    // Finished or claimed by another supervisor sharing the tree.
    match view.env.spool.settled_place(id) {
        Some(Place::Completed) => DepState::Completed,
        Some(Place::Failed) => DepState::Failed,
        Some(Place::Assigned) => DepState::Running,
        Some(Place::Pending) => DepState::Pending,
        None => DepState::Missing,
    }
}

pub(super) fn claim_record(me: &Instance, p: &Pending, agent: &str, because: &str) -> Claim {
    let now = fsutil::now_rfc3339();
    Claim {
        task_id: p.task.id.clone(),
        version: p.history.version + 1,
        host: me.host.clone(),
        pid: me.pid,
        boot_id: me.boot_id.clone(),
        instance: me.id.clone(),
        attempt: p.history.attempts.len() as u32 + 1,
        agent: agent.to_string(),
        started_at: now.clone(),
        heartbeat_at: now,
        history: p.history.attempts.clone(),
        chosen_because: Some(because.to_string()),
    }
}

/// This claim's record is in `assigned/`: the claim got at least that far.
pub(super) fn claim_on_disk(spool: &Spool, claim: &Claim) -> bool {
    spool
        .read_claim(&claim.task_id)
        .is_some_and(|c| c.instance == claim.instance && c.version == claim.version)
}

/// The claim of `task` from `path` did not give us the task (see [`Claimed`]); nothing ran.
#[must_use = "the actions are the rest of the work: apply them"]
pub(super) fn unclaimed(
    env: &Env,
    task: &Task,
    claim: &Claim,
    path: &Path,
    cancelling: bool,
    how: Claimed,
) -> Vec<Action> {
    let id = &task.id;
    let spool = &env.spool;
    match how {
        Claimed::Ours => {}
        Claimed::Lost => {
            console::debug(&format!("lost race  {id}: claimed by another supervisor"));
        }
        Claimed::Failed(e) => {
            console::error(&format!("claim of {id} failed: {e}"));
            // Failed after the rename (the fsync, say): the file is in `assigned/` under our
            // live claim, where nothing would look at it again until we stop. Put it back.
            if claim_on_disk(spool, claim) {
                return unclaim(env, id, path.to_path_buf(), true);
            }
            // Never renamed (the spool lock was busy, say): the file is still in `pending/`.
            if path.exists() {
                return vec![Action::Settle(path.to_path_buf())];
            }
        }
        Claimed::Stopping if cancelling => {
            // `orchestrate cancel` saw the claim record before the agent started: the task ends
            // cancelled, with no attempt, instead of going back to pending.
            spool.drop_history(id);
            let result = TaskResult::failed(
                id,
                claim.version + 1,
                &task.file.description,
                claim.history.clone(),
                "cancelled by user".into(),
            );
            return vec![Action::commit(task, result)];
        }
        Claimed::Changed | Claimed::Stopping => {
            let changed = matches!(how, Claimed::Changed);
            if changed {
                console::info(&format!(
                    "changed    {id}: file changed while being claimed; back to pending to settle"
                ));
            }
            return unclaim(env, id, path.to_path_buf(), changed);
        }
    }
    vec![]
}

impl Supervisor {
    /// The dispatch phase, after every turn: fail tasks caught in dependency cycles, then start
    /// what can run.
    pub(super) fn dispatch_phase(&mut self) {
        if self.shutting_down {
            return;
        }
        if self.intake.cycles_due() {
            let cycles = self.intake.queue.cycles().into_iter();
            let reason = |cycle| format!("dependency cycle: {cycle}");
            self.apply(
                cycles
                    .map(|(id, cycle)| Action::Fail {
                        id,
                        reason: reason(cycle),
                    })
                    .collect(),
            );
        }
        if self
            .dispatch
            .check_disk(&self.env.cfg, &self.env.layout.state_dir)
        {
            self.say_problems();
        }
        let Some(mut pass) =
            self.dispatch
                .begin_pass(&self.env, self.runs.len(), &mut self.intake.queue)
        else {
            return;
        };
        // A judge task written during the pass is not in its order: another pass starts it.
        let mut again = false;
        loop {
            let next = {
                let (intake, dispatch, view) = self.parts();
                pass.next(dispatch, &mut intake.queue, &view)
            };
            let Some(action) = next else {
                break;
            };
            again |= matches!(action, Action::Judge(_));
            if let Action::Fail { id, .. } = &action
                && self.names_unknown_agent(id)
                && self.reload_config()
            {
                // `add --agent new` right after the agent was added to config.yaml: the file is
                // ahead of the last look at it. Decide again with what it says now.
                pass.end(&mut self.intake.queue);
                return self.dispatch_phase();
            }
            self.apply(vec![action]);
        }
        pass.end(&mut self.intake.queue);
        if again {
            self.dispatch_phase();
        }
    }

    /// The pending task `id` names an agent the running configuration does not have.
    fn names_unknown_agent(&self, id: &str) -> bool {
        self.intake
            .queue
            .get(id)
            .and_then(|p| p.task.file.agent.as_ref())
            .is_some_and(|a| !self.env.cfg.agents.contains_key(a))
    }

    /// Start a pending task: launch the attempt that claims it and runs it.
    pub(super) fn start(&mut self, id: &str, agent: &str, because: &str) {
        let Some(p) = self.intake.take(id) else {
            return;
        };
        self.intake.hold(&p.path);
        let claim = claim_record(&self.env.me, &p, agent, because);
        // A retry asks again: the answer may differ once an agent has failed it.
        self.dispatch.forget(id);
        self.runs.launch(&self.env, p, claim, because, None);
        self.state_dirty = true;
    }

    /// Claim pending task `id` for work orchestrate does itself (no agent runs: a subtask parent's
    /// completion, a fan-out's pick). Rare and quick, so claimed on the loop. `Err`: it was not ours
    /// to claim, and what follows from that.
    pub(super) fn claim_agentless(
        &mut self,
        id: &str,
        because: &str,
    ) -> Result<(Pending, Claim), Vec<Action>> {
        let Some(p) = self.intake.take(id) else {
            return Err(vec![]);
        };
        let env = &self.env;
        let claim = claim_record(&env.me, &p, crate::record::NO_AGENT, because);
        match claim_task(&env.spool, &p.path, &claim, p.hash, None) {
            Claimed::Ours => Ok((p, claim)),
            how => Err(unclaimed(env, &p.task, &claim, &p.path, false, how)),
        }
    }

    /// Finish a parent whose subtasks all completed: its output is theirs, one after the other.
    #[must_use = "the actions are the rest of the work: apply them"]
    pub(super) fn complete_parent(&mut self, id: &str) -> Vec<Action> {
        let (p, claim) = match self.claim_agentless(id, "all subtasks completed") {
            Ok(claimed) => claimed,
            Err(actions) => return actions,
        };
        let env = &self.env;
        let mut text = String::new();
        for i in 1..=p.task.file.subtasks.len() {
            let child = scheduler::subtask_id(id, i);
            if let Ok(t) = std::fs::read_to_string(env.layout.output_path(&child)) {
                text.push_str(&t);
                text.push('\n');
            }
        }
        let header = context::OutputHeader {
            task: &p.task,
            agent: "-",
            attempt: claim.attempt,
            duration: Duration::ZERO,
            exit: "all subtasks completed".into(),
        };
        let output = context::write_output(&env.layout, &header, &text, &env.redactor).ok();
        let result = TaskResult {
            task_id: id.to_string(),
            status: Terminal::Completed,
            version: claim.version + 1,
            agent: None,
            description: p.task.file.description.clone(),
            finished_at: fsutil::now_rfc3339(),
            attempts: claim.history.clone(),
            output_file: output.map(|o| env.layout.rel(&o)),
            diff_file: None,
            files_modified: vec![],
            files_modified_total: None,
            files_modified_file: None,
            review_required: false,
            review_files: vec![],
            error: None,
            chosen_because: Some("all subtasks completed".into()),
            workspace: None,
            fan_out: None,
        };
        vec![Action::commit(&p.task, result)]
    }
}

/// Return a just-claimed file to `pending/` (`settle`: read it again once it settled); a refusal
/// is held and tried again.
#[must_use = "the actions are the rest of the work: apply them"]
pub(super) fn unclaim(env: &Env, id: &str, path: std::path::PathBuf, settle: bool) -> Vec<Action> {
    match env.spool.unclaim(id, &path) {
        Ok(()) if settle => vec![Action::Settle(path)],
        Ok(()) => vec![],
        Err(e) => {
            let what = super::events::Deferred::Unclaim {
                id: id.to_string(),
                path,
                settle,
            };
            vec![Action::Defer(Box::new(what), format!("{e:#}"))]
        }
    }
}
