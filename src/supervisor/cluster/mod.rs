//! Cluster mode in the loop: tasks that enter this host are published to the shared queue instead
//! of being run here; this host claims what it can run from the queue (its own tasks and others'),
//! runs each lease as an attempt in a worktree made from the task's base commit, and sends the
//! result back through the queue; the outcomes of the tasks it published come back to it, and it
//! materialises them into its tree (result file, `context/`, the change landed by the task's merge
//! policy).
//!
//! The files stay the truth for what this host is the origin of: a published task waits in
//! `pending/` until its outcome is committed here, so a crash at any point leaves it there to be
//! published again (answered as already ours) and its outcome offered again until delivered.
//! This part never runs an agent or touches the queue itself: attempts are `Runs`', the queue is the
//! link thread's (`link.rs`).

pub(super) mod link;
mod materialise;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use link::{Ask, Link, News};

use super::Supervisor;
use super::events::{Action, Report};
use super::finish::Verdict;
use crate::console;
use crate::mirror::postgres::queue::{Capacity, End, Finished, Held, Publish};
use crate::record::{History, TaskResult, Terminal};
use crate::scheduler::{self, Capacity as LocalCapacity, Decision, Pending};
use crate::task::Task;

/// A lease this host is running.
pub(super) struct Running {
    fence: i64,
    /// Lost while the attempt ran: its result is stale whatever it says.
    lost: bool,
}

pub(super) struct Cluster {
    pub(super) link: Link,
    labels: Vec<String>,
    /// Published (or being published): never started here from `pending/`.
    published: HashSet<String>,
    /// Tasks that entered `pending/` since the last turn (`Action::Queued`): the ones to publish,
    /// so a turn never walks the whole queue.
    pub(super) fresh: Vec<String>,
    pub(super) leases: HashMap<String, Running>,
    /// A claim is asked and not answered.
    claiming: bool,
    next_claim: Instant,
    /// No claim before this, whatever wakes the loop: a lease just given back unstarted is not
    /// claimed again at once (its release wakes every host, this one too).
    held_off_until: Instant,
    poll: Duration,
    /// Outcomes being materialised (their commit under way).
    materialising: HashSet<String>,
    /// Tasks waiting for this origin's router before they are published.
    pub(super) routing: HashSet<String>,
    /// Outcomes that came before their task file was read.
    pending_outcomes: Vec<(
        crate::mirror::postgres::queue::Outcome,
        Vec<crate::record::Attempt>,
    )>,
}

impl Cluster {
    pub(super) fn new(link: Link, labels: Vec<String>, poll: Duration) -> Cluster {
        Cluster {
            link,
            labels,
            published: HashSet::new(),
            fresh: vec![],
            leases: HashMap::new(),
            claiming: false,
            next_claim: Instant::now(),
            held_off_until: Instant::now(),
            poll,
            materialising: HashSet::new(),
            routing: HashSet::new(),
            pending_outcomes: vec![],
        }
    }
}

impl Cluster {
    /// Release a lease that cannot start here now, and hold claims off for a poll.
    fn give_back(&mut self, id: &str, fence: i64) {
        self.link.ask(Ask::Release {
            id: id.to_string(),
            fence,
        });
        self.held_off_until = Instant::now() + self.poll;
    }
}

/// Whether a pending task goes to the cluster, or stays a local aggregator (a subtask parent or a
/// fan-out waits here for its children, which go to the cluster themselves).
pub(super) fn goes_to_cluster(task: &Task) -> bool {
    task.file.subtasks.is_empty() && task.file.fan_out.is_none()
}

impl Supervisor {
    /// Publish what entered `pending/` since the last turn, then claim what this host can run.
    pub(super) fn cluster_phase(&mut self) {
        if self.cluster.is_none() || self.shutting_down {
            return;
        }
        let fresh: Vec<String> = {
            let c = self.cluster.as_mut().expect("checked");
            let queue = &self.intake.queue;
            std::mem::take(&mut c.fresh)
                .into_iter()
                .filter(|id| !c.published.contains(id))
                .filter(|id| queue.get(id).is_some_and(|p| goes_to_cluster(&p.task)))
                .collect()
        };
        // One look at git per workdir and turn, not per task: a burst of files publishes on one
        // answer (each look is two `git` processes on the loop's thread).
        let mut heads: HashMap<std::path::PathBuf, Option<String>> = HashMap::new();
        for id in fresh {
            self.publish(&id, &mut heads);
        }
        self.claim_more();
    }

    /// The origin's router answer for `id`, when its configuration sends the task to the router:
    /// `Err` while it is being asked (the task is published when the answer comes, see the loop's
    /// `Event::Routed`), or could not be asked yet (tried again at the next turn).
    fn routed_for_cluster(&mut self, id: &str) -> Result<Option<crate::router::Routed>, ()> {
        let Some(p) = self.intake.queue.get(id) else {
            return Ok(None);
        };
        let (none, idle) = (HashMap::new(), HashMap::new());
        let cap = LocalCapacity {
            running_total: 0,
            running_per_agent: &idle,
            unavailable: &none,
        };
        let decision = scheduler::choose_agent(&self.env.cfg, &p.task, &cap, None, None);
        if !matches!(decision, Decision::Route) {
            return Ok(None);
        }
        match self.dispatch.route_of(id) {
            Some(Some(r)) => return Ok(Some(r.clone())),
            Some(None) => return Err(()),
            None => {}
        }
        self.dispatch
            .ask_router(&self.env, &mut self.intake.queue, id);
        let c = self.cluster.as_mut().expect("cluster mode");
        if self.dispatch.route_of(id).is_some() {
            c.routing.insert(id.to_string());
        } else {
            // The router is busy with others: again at the next turn.
            c.fresh.push(id.to_string());
        }
        Err(())
    }

    fn publish(&mut self, id: &str, heads: &mut HashMap<std::path::PathBuf, Option<String>>) {
        let Ok(routed) = self.routed_for_cluster(id) else {
            return;
        };
        let Some(p) = self.intake.queue.get(id) else {
            return;
        };
        let env = &self.env;
        let base = crate::context::task_workdir(&env.layout, &env.cfg, &p.task)
            .ok()
            .and_then(|wd| {
                heads
                    .entry(wd)
                    .or_insert_with_key(|wd| {
                        crate::git::toplevel(wd)
                            .ok()
                            .flatten()
                            .and_then(|root| crate::git::head_commit(&root))
                    })
                    .clone()
            });
        let Some(base) = base else {
            let reason = "cluster mode runs every task in a git worktree made from its origin's \
                          commit: the task's workdir is not in a git repository with a commit";
            self.fail_pending(id, reason);
            return;
        };
        let mut file = p.task.file.clone();
        file.id = Some(id.to_string());
        let publish = Publish {
            id: id.to_string(),
            payload: file.to_yaml(),
            priority: p.task.priority(),
            requires: p.task.file.requires.clone(),
            pinned_host: p.task.file.host.clone(),
            agent: p.task.file.agent.clone(),
            dependencies: p.task.file.dependencies.clone(),
            max_attempts: env.max_retries_of(&p.task) + 1,
            base_commit: Some(base),
            routed_agent: routed.as_ref().and_then(|r| r.agent.clone()),
            routed_because: routed.map(|r| r.because),
        };
        let _ = super::dispatch::note(
            &self.env,
            &mut self.intake.queue,
            id,
            scheduler::WaitReason::InCluster,
        );
        let c = self.cluster.as_mut().expect("cluster mode");
        c.published.insert(id.to_string());
        c.link.ask(Ask::Publish(Box::new(publish)));
    }

    /// Ask the queue for as many tasks as there are free slots, for the agents that can start now.
    fn claim_more(&mut self) {
        let cfg = self.env.cfg.clone();
        let free = cfg
            .orchestrator
            .max_concurrent
            .saturating_sub(self.runs.len());
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        let now = Instant::now();
        if c.claiming || free == 0 || now < c.next_claim || now < c.held_off_until {
            return;
        }
        let unavailable = self.dispatch.unavailable_now(&self.env);
        let per_agent = self.runs.per_agent();
        let agents: Vec<String> = cfg
            .agents
            .iter()
            .filter(|(name, _)| !unavailable.contains_key(*name))
            .filter(|(name, a)| per_agent.get(*name).copied().unwrap_or(0) < a.max_instances)
            .map(|(name, _)| name.clone())
            .collect();
        if agents.is_empty() {
            return;
        }
        let c = self.cluster.as_mut().expect("checked");
        c.claiming = true;
        c.next_claim = Instant::now() + c.poll;
        c.link.ask(Ask::Claim(Capacity {
            labels: c.labels.clone(),
            agents,
            limit: u32::try_from(free).unwrap_or(u32::MAX),
        }));
    }

    /// What the queue said.
    pub(super) fn on_cluster(&mut self, news: News) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        match news {
            News::Published { id, clash: None } => {
                console::debug(&format!("published  {id} to the cluster"));
            }
            News::PublishFailed(id) => {
                c.published.remove(&id);
                c.fresh.push(id);
            }
            News::Published {
                id,
                clash: Some(why),
            } => {
                c.published.remove(&id);
                self.quarantine_clash(&id, &why);
            }
            News::Claimed(got) => {
                c.claiming = false;
                if !got.is_empty() {
                    // More may be there: ask again at once when slots are left.
                    c.next_claim = Instant::now();
                }
                for l in got {
                    self.start_lease(l);
                }
            }
            News::ClaimFailed => c.claiming = false,
            News::Wake => c.next_claim = Instant::now(),
            News::Lost { leases, why } => {
                for (id, fence) in leases {
                    let Some(r) = c.leases.get_mut(&id).filter(|r| r.fence == fence) else {
                        continue;
                    };
                    r.lost = true;
                    let why = match why {
                        link::LostWhy::Fenced => format!(
                            "stopped: the lease on {id} is no longer this host's (another host took the task over)"
                        ),
                        link::LostWhy::Unrenewed => format!(
                            "stopped: the lease on {id} is no longer this host's (no renewal was answered in time: the database is out of reach, or this process was stopped); another host may take the task over"
                        ),
                    };
                    console::warn(&why);
                    // Killed, not asked to stop: its work cannot land, and another host may
                    // start the task before a grace period would end.
                    let _ = self.runs.kill_because(&id, &why);
                }
            }
            News::Finished { id, held } => match held {
                Held::Ok => console::debug(&format!("cluster    result of {id} stored")),
                Held::Fenced => console::warn(&format!(
                    "fenced     {id}: this host's lease had ended; its result is kept as a stale attempt and does not land"
                )),
            },
            News::Outcomes(outcomes) => {
                for (o, earlier) in outcomes {
                    let more = self.materialise(o, earlier);
                    self.apply(more);
                }
            }
        }
    }

    /// The file of a task whose id another host's task has: to `quarantine/` with the reason.
    fn quarantine_clash(&mut self, id: &str, why: &str) {
        let reason = format!("{why}: task ids must be unique across the cluster; rename the file");
        let (intake, _, view) = self.parts();
        let more = intake.quarantine_pending(&view, id, &reason);
        self.apply(more);
    }

    /// Run a claimed lease here: its agent chosen as for a local task, or the lease given back when
    /// none can start now.
    fn start_lease(&mut self, claimed: link::Leased) {
        let link::Leased { lease, earlier } = claimed;
        let c = self.cluster.as_mut().expect("cluster mode");
        if self.runs.contains(&lease.id) {
            // An earlier lease's attempt on it is still stopping here: never two at once.
            c.give_back(&lease.id, lease.fence);
            return;
        }
        let stem = lease.id.clone();
        let mut task = match crate::task::parse_task(&lease.payload, &stem, &lease.id) {
            Ok(t) => t,
            Err(e) => {
                // The origin validated it: a newer version's key, say. Failed, with why.
                let done = failed_finish(
                    &lease.id,
                    &format!("cannot read the task here: {}", e.problem.message),
                );
                c.link.ask(Ask::Finish {
                    id: lease.id,
                    fence: lease.fence,
                    done: Box::new(done),
                });
                return;
            }
        };
        // How many attempts the task has is its origin's word (its `max_retries`, or the origin's
        // default), which the queue keeps: this host's default would retry a task the queue then
        // fails, or fail one the origin would have retried.
        if lease.max_attempts > 0 {
            task.file.max_retries = Some(lease.max_attempts - 1);
        }
        let unavailable = self.dispatch.unavailable_now(&self.env);
        let cap = LocalCapacity {
            running_total: self.runs.len(),
            running_per_agent: self.runs.per_agent(),
            unavailable: &unavailable,
        };
        // The origin's router chose (or was not asked); this host's router is never asked.
        let routed = crate::router::Routed {
            agent: lease.routed_agent.clone(),
            because: lease
                .routed_because
                .clone()
                .unwrap_or_else(|| "routing.fallback (the origin did not ask a router)".into()),
        };
        let decision = scheduler::choose_agent(&self.env.cfg, &task, &cap, None, Some(&routed));
        let c = self.cluster.as_mut().expect("cluster mode");
        let (agent, because) = match decision {
            Decision::Run { agent, because } => (agent, because),
            Decision::Fail(reason) => {
                c.link.ask(Ask::Finish {
                    id: lease.id.clone(),
                    fence: lease.fence,
                    done: Box::new(failed_finish(&lease.id, &reason)),
                });
                return;
            }
            _ => {
                c.give_back(&lease.id, lease.fence);
                return;
            }
        };
        console::info(&format!(
            "leased     {} from host {} (fence {}, attempt {}{})",
            lease.id,
            lease.origin,
            lease.fence,
            lease.attempt,
            lease
                .reclaimed_from
                .as_ref()
                .map(|l| format!(", reclaimed from {}", l.host))
                .unwrap_or_default()
        ));
        c.leases.insert(
            lease.id.clone(),
            Running {
                fence: lease.fence,
                lost: false,
            },
        );
        let history = History {
            task_id: lease.id.clone(),
            version: 0,
            attempts: earlier,
            not_before: None,
            backoff_seconds: None,
            reason: None,
        };
        let Some(base) = lease.base_commit.clone() else {
            // Every origin publishes its base; a row without one is not ours to guess.
            let c = self.cluster.as_mut().expect("cluster mode");
            c.leases.remove(&lease.id);
            let done = failed_finish(&lease.id, "the task was published without a base commit");
            c.link.ask(Ask::Finish {
                id: lease.id,
                fence: lease.fence,
                done: Box::new(done),
            });
            return;
        };
        let p = Pending {
            path: self.env.layout.state_dir.join("cluster").join(&lease.id),
            hash: 0,
            sig: (0, 0, 0),
            seq: 0,
            enqueued: Instant::now(),
            history,
            not_before: None,
            note: None,
            task,
        };
        let mut claim = super::dispatch::claim_record(&self.env.me, &p, &agent, &because);
        claim.attempt = lease.attempt.max(claim.attempt);
        self.runs.launch(&self.env, p, claim, &because, Some(base));
    }

    /// A leased attempt reported: tell the queue how it ended (the verdict as on one host), or give
    /// the lease back when the task should simply run again (a shutdown, a cooldown, a login).
    pub(super) fn on_leased_report(
        &mut self,
        run: &super::runs::Running,
        r: Report,
        verdict: Verdict,
        attempts: Vec<crate::record::Attempt>,
    ) -> Vec<Action> {
        let c = self.cluster.as_mut().expect("cluster mode");
        let Some(lease) = c.leases.remove(&r.id) else {
            return vec![];
        };
        let id = r.id.clone();
        let release = |c: &mut Cluster| {
            c.link.ask(Ask::Release {
                id: id.clone(),
                fence: lease.fence,
            });
            c.next_claim = Instant::now();
            vec![]
        };
        let end = match &verdict {
            // Stale whatever it says; back to the queue if no one else took it meanwhile.
            _ if lease.lost => End::Abandoned,
            Verdict::Interrupted | Verdict::CoolDown | Verdict::NeedsLogin => {
                if matches!(verdict, Verdict::CoolDown) {
                    let agent = &run.claim.agent;
                    let base = self.env.cfg.agents[agent]
                        .cooldown_seconds
                        .map(Duration::from_secs);
                    let error = r.attempt.error.clone().unwrap_or_default();
                    self.dispatch
                        .cool_down(agent, r.attempt.outcome, r.retry_after, base, &error);
                } else if matches!(verdict, Verdict::NeedsLogin) {
                    let error = r.attempt.error.clone().unwrap_or_default();
                    let _ = self
                        .dispatch
                        .needs_login(&self.env, &run.claim.agent, &error);
                }
                let c = self.cluster.as_mut().expect("cluster mode");
                return release(c);
            }
            Verdict::Retry { delay, .. } => End::Retry { after: *delay },
            Verdict::Done { status, .. } if *status == Terminal::Completed => End::Completed,
            Verdict::Done { .. } => End::Failed,
        };
        let (status, error) = match &verdict {
            Verdict::Done { status, error } => (*status, error.clone()),
            _ => (Terminal::Failed, r.attempt.error.clone()),
        };
        let error = if lease.lost {
            Some(format!(
                "stale: this host's lease ended while the attempt ran ({})",
                r.attempt.error.as_deref().unwrap_or("-")
            ))
        } else {
            error
        };
        let mut result = TaskResult::failed(
            &id,
            1,
            &run.task.file.description,
            attempts,
            error.unwrap_or_default(),
        );
        result.status = status;
        if status == Terminal::Completed && !lease.lost {
            result.error = None;
        }
        result.agent = Some(run.claim.agent.clone());
        result.chosen_because = run.claim.chosen_because.clone();
        result.workspace = r.workspace.clone().map(Box::new);
        let review = crate::context::review_matches(&self.env.cfg, &r.files_modified);
        result.set_files(&r.files_modified, None, review);
        let got = r.cluster.unwrap_or_default();
        let done = Finished {
            end,
            record: crate::record::to_yaml(&result, &self.env.redactor),
            output: got.output,
            patch: got.patch,
            log_tail: got.log_tail,
        };
        let c = self.cluster.as_mut().expect("cluster mode");
        c.link.ask(Ask::Finish {
            id,
            fence: lease.fence,
            done: Box::new(done),
        });
        c.next_claim = Instant::now();
        vec![]
    }

    /// Before the loop ends: leave the cluster (leases not finished run out).
    pub(super) fn leave_cluster(&mut self) {
        if let Some(c) = &self.cluster {
            // Releases and finishes asked before are sent first (one channel, in order); the
            // wait is bounded by the queue's own bound on each answer.
            let (tx, rx) = std::sync::mpsc::channel();
            c.link.ask(Ask::Leave(tx));
            let _ = rx.recv_timeout(Duration::from_secs(15));
        }
    }
}

fn failed_finish(id: &str, reason: &str) -> Finished {
    let result = TaskResult::failed(id, 1, "", vec![], reason.to_string());
    Finished {
        end: End::Failed,
        record: crate::record::to_yaml(&result, &crate::redact::Redactor::default()),
        output: String::new(),
        patch: String::new(),
        log_tail: String::new(),
    }
}
