//! What runs next, and starting it.

use super::*;

pub(super) struct Running {
    pub(super) task: Task,
    pub(super) claim: Claim,
    pub(super) stop: watch::Sender<Option<Stop>>,
    /// A cancel was requested: a later shutdown must not turn it into a requeue.
    pub(super) cancelling: bool,
    /// Where the task file was in `pending/` before the claim.
    pub(super) path: PathBuf,
    /// Which start of the supervisor's this is (see `claimed_tx`).
    pub(super) start: u64,
    /// The claim is done and the task file is ours (the claim runs in the attempt's task, off the
    /// loop); until then there is no claim record to refresh.
    pub(super) claimed: bool,
}

impl Supervisor {
    pub(super) fn dep_state(&self, id: &str) -> DepState {
        if let Some(t) = self.done.get(id) {
            return match t {
                Terminal::Completed => DepState::Completed,
                Terminal::Failed => DepState::Failed,
            };
        }
        if self.in_hand(id) {
            return DepState::Running;
        }
        if self.sched.contains(id) {
            return DepState::Pending;
        }
        // Finished or claimed by another supervisor sharing the tree.
        match self.spool.settled_place(id) {
            Some(Place::Completed) => DepState::Completed,
            Some(Place::Failed) => DepState::Failed,
            Some(Place::Assigned) => DepState::Running,
            Some(Place::Pending) => DepState::Pending,
            None => DepState::Missing,
        }
    }

    pub(super) fn schedule(&mut self) {
        if self.shutting_down {
            return;
        }
        if self.cycles_dirty && self.sched.has_edges() {
            self.cycles_dirty = false;
            for (id, cycle) in self.sched.cycles() {
                self.fail_pending(&id, &format!("dependency cycle: {cycle}"));
            }
        }
        // Which agents can run, refreshed at most once a second: a PATH lookup per agent on every
        // pass would be the scheduler's main cost in a burst, and installs are not that quick.
        let fresh = self
            .unavailable
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < Duration::from_secs(1));
        if !fresh {
            let mut map = HashMap::new();
            for (name, a) in &self.cfg.agents {
                if let Some(r) = agents::unavailable_reason(name, a) {
                    map.insert(name.clone(), Unavailable::Missing(r));
                }
            }
            self.unavailable = Some((Instant::now(), map));
        }
        // A handful of entries: cloning is cheaper than fighting the borrow of `self` below.
        let mut unavailable = self
            .unavailable
            .as_ref()
            .map(|(_, m)| m.clone())
            .unwrap_or_default();
        let now = Instant::now();
        let wall = time::OffsetDateTime::now_utc();
        for (agent, c) in self.cooldowns.active(wall) {
            unavailable
                .entry(agent.to_string())
                .or_insert_with(|| Unavailable::CoolingDown {
                    agent: agent.to_string(),
                    until: c.until.clone(),
                    outcome: c.outcome,
                });
        }

        let cfg = self.cfg.clone();
        // A full pass looks at every pending task (wait notes, back-off wake-ups); otherwise the pass
        // ends once every slot is taken, so a long queue costs nothing while agents are busy.
        let full = std::mem::take(&mut self.full_pass_due);
        if !full && self.running.len() >= cfg.orchestrator.max_concurrent {
            return;
        }
        if full {
            self.next_wake = None;
        }
        if let Some(d) = self.cooldowns.next_end(wall) {
            // Wake when the first cooldown ends, so the tasks waiting for it are looked at again.
            let t = now + d;
            self.next_wake = Some(self.next_wake.map_or(t, |w| w.min(t)));
        }
        let order = self.sched.take_order(&cfg, now);
        for entry in &order {
            if !full && self.running.len() >= cfg.orchestrator.max_concurrent {
                break;
            }
            let id = &entry.2;
            let Some(p) = self.sched.get(id).filter(|p| p.seq == entry.1) else {
                continue;
            };
            if full && let Some(t) = p.not_before.filter(|t| *t > now) {
                self.next_wake = Some(self.next_wake.map_or(t, |w| w.min(t)));
            }
            let cap = Capacity {
                running_total: self.running.len(),
                running_per_agent: &self.per_agent,
                unavailable: &unavailable,
            };
            let routed = self.routes.get(id).and_then(Option::as_ref);
            let decision = scheduler::decide(&cfg, p, now, &cap, &|d| self.dep_state(d), routed);
            match decision {
                Decision::Route => self.ask_router(id),
                Decision::Run { agent, because } => self.start(id, &agent, &because),
                Decision::CompleteParent => self.complete_parent(id),
                Decision::Fail(reason) => self.fail_pending(id, &reason),
                Decision::Wait(reason) => {
                    if let Some(note) = self.note(id, reason) {
                        console::debug(&format!("waiting    {id}: {note}"));
                    }
                }
            }
        }
        self.sched.put_order(order);
    }

    /// Ask the router about a task, once; it waits with a note until the answer comes.
    pub(super) fn ask_router(&mut self, id: &str) {
        if self.routes.contains_key(id) {
            return;
        }
        let Some(task) = self.sched.get(id).map(|p| p.task.clone()) else {
            return;
        };
        let router = self
            .cfg
            .routing
            .router
            .as_ref()
            .map(|r| r.agent.clone())
            .unwrap_or_default();
        // A burst of unrouted tasks must not become a burst of requests to one local model.
        let asking = self.routes.values().filter(|r| r.is_none()).count();
        if asking >= self.cfg.orchestrator.max_concurrent.max(1) {
            self.note(
                id,
                WaitReason::RouterBusy {
                    router,
                    outstanding: asking,
                },
            );
            return;
        }
        // A task is asked about once (see `routes`), so this note is always new.
        self.note(id, WaitReason::AskingRouter { router });
        self.routes.insert(id.to_string(), None);
        let (cfg, tx) = (self.cfg.clone(), self.route_tx.clone());
        let id = id.to_string();
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

    /// Tell the mirror why `id` waits, when that changed; returns the new note then.
    fn note(&mut self, id: &str, reason: WaitReason) -> Option<String> {
        let note = self.sched.set_note(id, reason)?.to_string();
        self.writer.send(Op::Note {
            id: id.to_string(),
            note: Some(note.clone()),
        });
        Some(note)
    }

    pub(super) fn on_routed(&mut self, id: String, routed: Routed) {
        if routed.agent.is_none() {
            console::warn(&format!("router     {id}: {}", routed.because));
        } else {
            console::debug(&format!("router     {id}: {}", routed.because));
        }
        // Only for tasks still waiting for it; one that left pending meanwhile is forgotten.
        if self.sched.contains(&id) {
            self.routes.insert(id, Some(routed));
            self.full_pass_due = true;
        } else {
            self.routes.remove(&id);
        }
    }

    pub(super) fn claim_record(&self, p: &Pending, agent: &str, because: &str) -> Claim {
        let now = fsutil::now_rfc3339();
        Claim {
            task_id: p.task.id.clone(),
            version: p.history.version + 1,
            host: self.me.host.clone(),
            pid: self.me.pid,
            boot_id: self.me.boot_id.clone(),
            instance: self.me.id.clone(),
            attempt: p.history.attempts.len() as u32 + 1,
            agent: agent.to_string(),
            started_at: now.clone(),
            heartbeat_at: now,
            history: p.history.attempts.clone(),
            chosen_because: Some(because.to_string()),
        }
    }

    /// Start a pending task: the attempt's own task claims it (the rename, the claim record and
    /// their fsyncs run there, beside other claims and commits), then runs the agent.
    pub(super) fn start(&mut self, id: &str, agent: &str, because: &str) {
        let Some(p) = self.sched.remove(id) else {
            return;
        };
        self.by_path.remove(&p.path);
        self.cycles_dirty = true;
        self.claiming.insert(p.path.clone());
        let claim = self.claim_record(&p, agent, because);
        // A retry asks again: the answer may differ once an agent has failed it.
        self.routes.remove(id);
        let (stop_tx, stop_rx) = watch::channel(None);
        *self.per_agent.entry(agent.to_string()).or_default() += 1;
        let ctx = AttemptCtx {
            cfg: self.cfg.clone(),
            layout: self.layout.clone(),
            redactor: self.redactor.clone(),
        };
        self.starts += 1;
        let job = ClaimJob {
            start: self.starts,
            spool: self.spool.clone(),
            src: p.path.clone(),
            hash: p.hash,
            writer: self.writer.clone(),
            row: mirror::running_row(&self.spool, &p.task, &claim),
            because: because.to_string(),
            claimed: self.claimed_tx.clone(),
        };
        let task = p.task.clone();
        let c = claim.clone();
        let handle = self
            .attempts
            .spawn(async move { run_attempt(ctx, job, task, c, stop_rx).await });
        self.attempt_ids.insert(handle.id(), id.to_string());
        self.running.insert(
            id.to_string(),
            Running {
                task: p.task,
                claim,
                stop: stop_tx,
                cancelling: false,
                path: p.path,
                start: self.starts,
                claimed: false,
            },
        );
        self.state_dirty = true;
    }

    /// The attempt's task holds the claim now: the file has left `pending/`.
    pub(super) fn on_claimed(&mut self, id: &str, start: u64) {
        if let Some(r) = self.running.get_mut(id).filter(|r| r.start == start) {
            r.claimed = true;
            self.claiming.remove(&r.path);
        }
    }

    pub(super) fn complete_parent(&mut self, id: &str) {
        let Some(p) = self.sched.remove(id) else {
            return;
        };
        self.by_path.remove(&p.path);
        self.cycles_dirty = true;
        let claim = self.claim_record(&p, "-", "all subtasks completed");
        // Rare and quick (no agent runs): claimed on the loop.
        match claim_task(&self.spool, &p.path, &claim, p.hash, None) {
            Claimed::Ours => {}
            how => {
                self.on_unclaimed(&p.task, &claim, &p.path, false, how);
                return;
            }
        }
        let mut text = String::new();
        for i in 1..=p.task.file.subtasks.len() {
            let child = scheduler::subtask_id(id, i);
            if let Ok(t) = std::fs::read_to_string(self.layout.output_path(&child)) {
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
        let output = context::write_output(&self.layout, &header, &text, &self.redactor).ok();
        let result = TaskResult {
            task_id: id.to_string(),
            status: Terminal::Completed,
            version: claim.version + 1,
            agent: None,
            description: p.task.file.description.clone(),
            finished_at: fsutil::now_rfc3339(),
            attempts: claim.history.clone(),
            output_file: output.map(|o| self.layout.rel(&o)),
            diff_file: None,
            files_modified: vec![],
            review_required: false,
            review_files: vec![],
            error: None,
            chosen_because: Some("all subtasks completed".into()),
        };
        self.commit_terminal(&p.task, result);
    }

    /// Fail a pending task without running it.
    pub(super) fn fail_pending(&mut self, id: &str, reason: &str) {
        self.routes.remove(id);
        let Some(p) = self.sched.remove(id) else {
            return;
        };
        self.by_path.remove(&p.path);
        self.cycles_dirty = true;
        let result = TaskResult::failed(
            id,
            p.history.version + 1,
            &p.task.file.description,
            p.history.attempts.clone(),
            reason.to_string(),
        );
        match self.spool.fail_pending(&p.path, &result) {
            Ok(true) => {
                console::info(&format!("failed     {id}: {reason}"));
                self.writer.send(Op::Upsert {
                    row: mirror::terminal_row(&self.spool, &result, Some(&p.task)),
                    attempts: result.attempts.clone(),
                });
                self.done.insert(id.to_string(), Terminal::Failed);
                self.state_dirty = true;
            }
            Ok(false) => {}
            Err(e) => console::error(&format!("cannot fail {id}: {e:#}")),
        }
    }
}
