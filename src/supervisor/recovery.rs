//! Start-up, heartbeat, cancels, state files.

use super::*;

impl Supervisor {
    /// Recover dead claims, bring the mirror in line, load what is already finished.
    pub(super) fn startup(&mut self) -> Result<()> {
        self.recover();
        if let Err(e) = self.spool.repair_rejected() {
            console::warn(&format!(
                "cannot check failed/ for lost explanations: {e:#}"
            ));
        }
        let report = self
            .writer
            // pending/ is read by the start-up scan right after, which mirrors what it finds.
            .reconcile(&self.spool, self.cfg.orchestrator.max_task_bytes, true)
            .map_err(|e| anyhow::anyhow!("mirror reconcile failed: {e}"))?;
        console::debug(&format!(
            "mirror reconciled: {} rows updated, {} removed",
            report.upserted, report.deleted
        ));
        let conn = mirror::open(&self.layout.state_dir.join("state.db"))?;
        for row in mirror::list(&conn, Some("completed"))? {
            self.done.insert(row.id.clone(), Terminal::Completed);
            self.completed.push(CompletedEntry {
                id: row.id,
                description: row.payload.description,
                agent: row.agent,
                finished_at: row.payload.finished_at.unwrap_or(row.updated_at),
                output_file: None,
                diff_file: None,
                files_modified: row.payload.files_modified,
            });
        }
        self.completed
            .sort_by(|a, b| a.finished_at.cmp(&b.finished_at));
        // Rows of supervisors on this host that died without saying so (SIGKILL, power cut).
        for row in mirror::supervisors(&conn)? {
            let lock = self
                .layout
                .state_dir
                .join("instances")
                .join(format!("{}.lock", row.instance));
            if row.host == self.me.host && !spool::instance_lock_held(&lock) {
                self.writer.send(Op::Supervisor {
                    instance: row.instance,
                    pid: row.pid,
                    started_at: row.started_at,
                    heartbeat_at: row.heartbeat_at,
                    alive: false,
                });
            }
        }
        for row in mirror::list(&conn, Some("failed"))? {
            self.done.insert(row.id, Terminal::Failed);
        }
        self.writer.send(Op::Supervisor {
            instance: self.me.id.clone(),
            pid: self.me.pid,
            started_at: self.me.started_at.clone(),
            heartbeat_at: fsutil::now_rfc3339(),
            alive: true,
        });
        Ok(())
    }

    pub(super) fn recover(&mut self) {
        let cfg = self.cfg.clone();
        let max = move |p: &Path| {
            task::read_task(p, u64::MAX)
                .ok()
                .and_then(|(t, _)| t.file.max_retries)
                .unwrap_or(cfg.task_queue.max_retries)
        };
        match self.spool.recover(&self.me, &max) {
            Ok(list) => {
                for r in list {
                    match r {
                        spool::Recovered::Requeued(id) => {
                            console::info(&format!(
                                "recovered  {id}: its supervisor stopped mid-run; back to pending"
                            ));
                            self.ingest_path(&self.spool.task_path(Place::Pending, &id), true);
                        }
                        spool::Recovered::Finished(id, t) => {
                            console::info(&format!(
                                "recovered  {id}: finished before its supervisor stopped → {}",
                                t.dir_name()
                            ));
                            if let Some(r) = self.spool.read_result(t, &id) {
                                self.writer.send(Op::Upsert {
                                    row: mirror::terminal_row(&self.spool, &r, None),
                                    attempts: r.attempts.clone(),
                                });
                            }
                            self.done.insert(id, t);
                        }
                    }
                }
            }
            Err(e) => console::warn(&format!("recovery failed: {e:#}")),
        }
    }

    pub(super) fn heartbeat(&mut self) {
        for r in self.running.values().filter(|r| r.claimed) {
            if let Err(e) = self.spool.heartbeat(&r.claim) {
                console::warn(&format!("heartbeat for {} failed: {e:#}", r.claim.task_id));
            }
        }
        self.writer.send(Op::Supervisor {
            instance: self.me.id.clone(),
            pid: self.me.pid,
            started_at: self.me.started_at.clone(),
            heartbeat_at: fsutil::now_rfc3339(),
            alive: true,
        });
    }

    /// `orchestrate cancel` leaves `state_dir/cancel/<id>` and sends SIGUSR1. The request stays
    /// until the task is in `failed/`: a supervisor that dies before then finds it again at its next
    /// start, when recovery has put the task back in `pending/`, and cancels it there.
    pub(super) fn check_cancels(&mut self) {
        for id in self.spool.cancel_requests() {
            if let Some(r) = self.running.get_mut(&id) {
                if !r.cancelling {
                    console::info(&format!("cancelling {id}"));
                    r.cancelling = true;
                    let _ = r.stop.send(Some(Stop::Cancel));
                }
            } else if self.sched.contains(&id) {
                self.fail_pending(&id, "cancelled by user");
                self.spool.drop_cancel_request(&id);
            } else if !self.finishing.contains_key(&id)
                && matches!(
                    self.spool.settled_place(&id),
                    Some(Place::Completed | Place::Failed)
                )
            {
                // Finished, cancelled or not: nothing left to cancel.
                self.spool.drop_cancel_request(&id);
            }
        }
    }

    pub(super) fn write_state_files(&mut self) {
        self.state_dirty = false;
        let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
        counts.insert("pending", self.sched.len());
        // A finishing task is still running as far as anyone reading the tree can tell.
        counts.insert("running", self.running.len() + self.finishing.len());
        let (mut c, mut f) = (0, 0);
        for t in self.done.values() {
            match t {
                Terminal::Completed => c += 1,
                Terminal::Failed => f += 1,
            }
        }
        counts.insert("completed", c);
        counts.insert("failed", f);
        let running: Vec<(String, String, String)> = self
            .running
            .values()
            .map(|r| {
                (
                    r.claim.task_id.clone(),
                    r.claim.agent.clone(),
                    r.claim.started_at.clone(),
                )
            })
            .collect();
        if let Err(e) = context::write_state_files(&self.layout, &self.completed, &counts, &running)
        {
            console::warn(&format!("cannot write context state files: {e:#}"));
        }
    }
}
