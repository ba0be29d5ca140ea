//! The project every command and the server start from: root, configuration, the paths derived
//! from them, the database reads come from ([`Project::source`], the one place that picks it), and
//! the writes a user may ask for (add, cancel, retry), each through the spool protocol so every way
//! in gets the same validation and records.
//!
//! It never prints to stdout (a mirror write that fails is a warning on stderr): the CLI and the HTTP server render what these functions return.

pub mod cluster;
pub mod land;
pub mod status;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::config::Config;
use crate::error::UsageError;
use crate::layout::Layout;
use crate::mirror::read::{Reader, Source};
use crate::mirror::{self, Op};
use crate::record::{TaskResult, Terminal};
use crate::spool::{Place, Spool};
use crate::task::{self, TaskFile};

/// The project a command works on: root, configuration and the paths derived from them.
pub struct Project {
    pub root: PathBuf,
    pub cfg: Config,
    /// The file `cfg` came from (it may not exist: then the built-in default applies).
    pub config_path: PathBuf,
    pub layout: Layout,
    pub spool: Spool,
}

impl Project {
    pub fn load(root: Option<&Path>, config: Option<&Path>) -> Result<Project> {
        let root = match root {
            Some(r) => r.to_path_buf(),
            None => std::env::current_dir().context("cannot read the current directory")?,
        };
        let root = root.canonicalize().map_err(|e| {
            crate::error::UsageError(format!("project root {}: {e}", root.display()))
        })?;
        let cfg_path = config
            .map(Path::to_path_buf)
            .unwrap_or_else(|| Layout::config_file(&root));
        if config.is_some() && !cfg_path.exists() {
            return Err(crate::error::UsageError(format!(
                "config file {} does not exist",
                cfg_path.display()
            ))
            .into());
        }
        let cfg = Config::load(&cfg_path)?;
        let layout = cfg.layout(&root);
        let spool = Spool::new(&layout, cfg.redactor());
        Ok(Project {
            root,
            cfg,
            config_path: std::path::absolute(&cfg_path).unwrap_or(cfg_path),
            layout,
            spool,
        })
    }

    pub fn db_path(&self) -> PathBuf {
        self.layout.state_db()
    }

    /// Where read commands read: the PostgreSQL mirror named by `--database-url` (no folder needed),
    /// else this folder's SQLite mirror.
    pub fn source(&self, database_url: Option<&str>) -> Result<Source> {
        Ok(match database_url {
            Some(url) => Source::Postgres {
                url: url.to_string(),
                schema: self.cfg.database.schema.clone(),
            },
            None => Source::Sqlite(self.mirror_read()?),
        })
    }

    /// The mirror to read from, connected (see [`Project::source`]).
    pub fn reader(&self, database_url: Option<&str>) -> Result<Reader> {
        self.source(database_url)?.reader()
    }

    /// A read connection to the mirror, building the mirror from the tree first if there is none.
    fn mirror_read(&self) -> Result<rusqlite::Connection> {
        if !self.db_path().exists() {
            if !self.spool.layout().pending.exists() {
                return Err(crate::error::UsageError(format!(
                    "{} has no tasks/ folder: run `orchestrate init` first (or pass -C DIR)",
                    self.root.display()
                ))
                .into());
            }
            self.reconcile(false)?;
        }
        crate::mirror::sqlite::open_read(&self.db_path())?.context("mirror database vanished")
    }

    /// Bring the mirror in line with the tree (`rebuild`: from empty tables).
    pub fn reconcile(&self, rebuild: bool) -> Result<crate::mirror::reconcile::ReconcileReport> {
        std::fs::create_dir_all(&self.layout.state_dir)?;
        let mut conn = crate::mirror::sqlite::open(&self.db_path())?;
        crate::mirror::reconcile::reconcile(
            &mut conn,
            &self.spool,
            &crate::fsutil::hostname(),
            self.cfg.orchestrator.max_task_bytes,
            rebuild,
        )
    }

    /// Apply one write to the mirror from a CLI command (add, retry, cancel). The supervisor's writer
    /// does the same through its thread; version guards make the order irrelevant.
    pub fn mirror_write(&self, ops: Vec<crate::mirror::Op>) {
        let r = (|| -> Result<()> {
            std::fs::create_dir_all(&self.layout.state_dir)?;
            let mut conn = crate::mirror::sqlite::open(&self.db_path())?;
            let mut ops: Vec<_> = ops
                .into_iter()
                .map(|op| op.redacted(self.spool.redactor()))
                .collect();
            crate::mirror::sqlite::apply(&mut conn, &crate::fsutil::hostname(), &mut ops)?;
            Ok(())
        })();
        if let Err(e) = r {
            // The file operation already happened and the tree is the truth; the next reconcile fixes this.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr().lock(),
                "{}",
                crate::console::visible(&format!("warning: mirror not updated: {e:#}"))
            );
        }
    }

    pub fn rel(&self, p: &Path) -> String {
        self.layout.rel(p)
    }
}

/// A task to add, as `orchestrate add` and `POST /api/v1/tasks` take it.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewTask {
    pub description: String,
    #[serde(default)]
    pub priority: Option<crate::task::Priority>,
    #[serde(default)]
    pub agent: Option<String>,
    #[serde(default)]
    pub after: Vec<String>,
    #[serde(default)]
    pub context: Vec<String>,
    #[serde(default, rename = "type")]
    pub task_type: Option<String>,
    #[serde(default)]
    pub workdir: Option<String>,
    #[serde(default)]
    pub timeout_minutes: Option<f64>,
    #[serde(default)]
    pub max_retries: Option<u32>,
    /// What all its attempts together may cost, in USD (`max_cost_usd`).
    #[serde(default)]
    pub max_cost_usd: Option<f64>,
    #[serde(default)]
    pub id: Option<String>,
    /// The command that verifies the result (`check`).
    #[serde(default)]
    pub check: Option<String>,
    #[serde(default)]
    pub labels: Vec<String>,
    /// Candidates to race (`fan_out`): agents, or a count.
    #[serde(default)]
    pub fan_out: Option<crate::task::FanOut>,
    #[serde(default)]
    pub pick: Option<crate::task::Pick>,
    #[serde(default)]
    pub judge: Option<String>,
}

/// The next free `task_NNN` across the whole tree.
fn next_number(project: &Project) -> u64 {
    let mut max = 0;
    for dir in project.spool.layout().spool_dirs() {
        let Ok(rd) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if let Some(rest) = name.strip_prefix("task_") {
                let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
                if let Ok(n) = digits.parse::<u64>() {
                    max = max.max(n);
                }
            }
        }
    }
    max + 1
}

impl Project {
    /// Write a valid task file into `pending/` atomically; returns its id and its file (relative to
    /// the root). Never talks to a running supervisor.
    pub fn add_task(&self, new: &NewTask) -> Result<(String, String)> {
        let project = self;
        if !project.spool.layout().pending.is_dir() {
            bail!(UsageError(format!(
                "{} does not exist: run `orchestrate init` first (or pass -C DIR)",
                project.spool.layout().pending.display()
            )));
        }
        if let Some(a) = &new.agent
            && !project.cfg.agents.contains_key(a)
        {
            bail!(UsageError(format!(
                "unknown agent `{a}` (configured: {})",
                project.cfg.agent_names()
            )));
        }
        // A task file may name a dependency that has not arrived yet (the next `git pull` brings it);
        // `add` is typed by a person, for whom a dependency that exists nowhere is a mistake.
        for dep in &new.after {
            let known = project.spool.settled_place(dep).is_some()
                || project.spool.task_path(Place::Pending, dep).exists()
                || match crate::mirror::sqlite::open_read(&project.db_path())? {
                    Some(conn) => crate::mirror::sqlite::get(&conn, dep)?.is_some(),
                    None => false,
                };
            if !known {
                bail!(UsageError(format!(
                    "--after {dep}: no task {dep} exists (pending, running, completed or failed)"
                )));
            }
        }
        let mut file = TaskFile {
            id: None,
            description: new.description.clone(),
            priority: new.priority,
            agent: new.agent.clone(),
            task_type: new.task_type.clone(),
            labels: new.labels.clone(),
            dependencies: new.after.clone(),
            context_files: new.context.clone(),
            workdir: new.workdir.clone(),
            timeout_minutes: new.timeout_minutes,
            max_retries: new.max_retries,
            max_cost_usd: new.max_cost_usd,
            subtasks: vec![],
            parent: None,
            isolation: None,
            merge: None,
            check: new.check.clone(),
            check_timeout_minutes: None,
            fan_out: new.fan_out.clone(),
            pick: new.pick,
            judge: new.judge.clone(),
            ..Default::default()
        };
        let id = &new.id;
        let mut n = next_number(project);
        for _ in 0..1000 {
            let tid = id.clone().unwrap_or_else(|| format!("task_{n:03}"));
            file.id = Some(tid.clone());
            let text = file.to_yaml();
            // Validate exactly what we write: `add` must never produce a file the supervisor rejects.
            let parsed = task::parse_task(&text, &tid, "<new task>")
                .map_err(|e| UsageError(e.message().to_string()))?;
            if project.spool.settled_place(&tid).is_some() {
                if id.is_some() {
                    bail!(UsageError(format!("task id {tid} already exists")));
                }
                n += 1;
                continue;
            }
            let path = project.spool.task_path(Place::Pending, &tid);
            let name = path
                .file_name()
                .expect("a task path has a file name")
                .to_string_lossy();
            if project.spool.add_pending(&name, text.as_bytes())? {
                project.mirror_write(vec![Op::Upsert {
                    row: mirror::pending_row(&project.spool, &parsed, &path, None),
                    attempts: vec![],
                }]);
                return Ok((tid, project.rel(&path)));
            }
            if id.is_some() {
                bail!(UsageError(format!(
                    "task id {tid} already exists in pending/"
                )));
            }
            n += 1;
        }
        bail!("could not find a free task id")
    }

    /// Cancel a pending task (straight to failed/), or ask the supervisor running it to stop it and
    /// wait until it has; returns what happened, for the user. Never kills an agent itself.
    pub fn cancel(&self, id: &str) -> Result<String> {
        let project = self;
        let spool = &project.spool;
        match spool.settled_place(id) {
            Some(Place::Completed) | Some(Place::Failed) => {
                bail!(UsageError(format!(
                    "task {id} has already finished ({}); nothing to cancel",
                    spool.settled_place(id).map(Place::state).unwrap_or("?")
                )));
            }
            Some(Place::Assigned) => return self.cancel_running(id),
            _ => {}
        }
        // Pending: find its file (any name) by parsing pending/ if it is not `<id>.yaml`.
        let mut file = spool.task_path(Place::Pending, id);
        if !file.exists() {
            let found = std::fs::read_dir(&spool.layout().pending)?
                .flatten()
                .map(|e| e.path())
                .find(|p| {
                    crate::task::read_task(p, project.cfg.orchestrator.max_task_bytes)
                        .is_ok_and(|(t, _)| t.id == id)
                });
            match found {
                Some(p) => file = p,
                None => bail!(UsageError(format!(
                    "no task {id} in {}",
                    project.rel(&spool.layout().tasks_dir)
                ))),
            }
        }
        let (task, _) =
            crate::task::read_task(&file, u64::MAX).map_err(|e| anyhow::anyhow!(e.render(id)))?;
        let history = spool.read_history(id).unwrap_or_default();
        let result = TaskResult::failed(
            id,
            history.version.max(1) + 1,
            &task.file.description,
            history.attempts,
            "cancelled by user".into(),
        );
        if spool.fail_pending(&file, &result)? {
            project.mirror_write(vec![Op::Upsert {
                row: mirror::terminal_row(spool, &result, Some(&task)),
                attempts: result.attempts.clone(),
            }]);
            // A fan-out's candidates (and judge) are its work: they go with it.
            let mut children = crate::scheduler::fan_out::candidate_ids(&task);
            if !children.is_empty() {
                children.push(crate::scheduler::fan_out::judge_id(id));
            }
            let mut stopped = 0;
            for child in children {
                if matches!(
                    spool.settled_place(&child),
                    Some(Place::Pending | Place::Assigned)
                ) && self.cancel(&child).is_ok()
                {
                    stopped += 1;
                }
            }
            if stopped > 0 {
                return Ok(format!(
                    "cancelled (it had not started), with {stopped} of its candidates"
                ));
            }
            return Ok("cancelled (it had not started)".into());
        }
        // Claimed between our look and the move: stop it as a running task.
        self.cancel_running(id)
    }

    fn cancel_running(&self, id: &str) -> Result<String> {
        let spool = &self.spool;
        let Some(claim) = spool.read_claim(id) else {
            bail!(
                "task {id} is in assigned/ without a claim; its supervisor is starting or stopping, try again"
            );
        };
        if claim.host != crate::fsutil::hostname() {
            bail!("task {id} runs on host {}; cancel it there", claim.host);
        }
        spool.request_cancel(id)?;
        // SAFETY: plain signal to the supervisor pid recorded in the claim.
        unsafe {
            libc::kill(claim.pid as i32, libc::SIGUSR1);
        }
        let grace = self.cfg.orchestrator.kill_grace_seconds;
        let deadline = Instant::now() + Duration::from_secs_f64(grace + 30.0);
        while Instant::now() < deadline {
            if let Some(place @ (Place::Failed | Place::Completed)) = spool.settled_place(id) {
                return Ok(format!("stopped; now {}", place.state()));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        bail!(
            "asked supervisor pid {} to cancel {id}, but it has not finished after {:.0} s",
            claim.pid,
            grace + 30.0
        )
    }

    /// Failed → pending with its attempt history kept, or a task waiting out a retry back-off runs
    /// now. Moves files only through the spool.
    pub fn retry(&self, id: &str) -> Result<Retried> {
        if self.spool.settled_place(id).is_none() && self.spool.run_now(id)? {
            return Ok(Retried::RunsNow);
        }
        // A fan-out runs its failed candidates again; they go back first, so the fan-out never
        // finds them all failed again the moment it is back in pending/.
        let failed_file = self.spool.task_path(Place::Failed, id);
        if let Ok((task, _)) = crate::task::read_task(&failed_file, u64::MAX) {
            for child in crate::scheduler::fan_out::candidate_ids(&task) {
                if self.spool.settled_place(&child) == Some(Place::Failed) {
                    self.retry(&child)?;
                }
            }
            // An earlier judge's verdict is about earlier candidates: the next one is asked anew.
            let judge = crate::scheduler::fan_out::judge_id(id);
            if task.file.fan_out.is_some() {
                for (place, t) in [
                    (Place::Completed, Terminal::Completed),
                    (Place::Failed, Terminal::Failed),
                ] {
                    let file = self.spool.task_path(place, &judge);
                    if file.exists() {
                        std::fs::remove_file(self.spool.result_path(t, &judge))
                            .or_else(|e| match e.kind() {
                                std::io::ErrorKind::NotFound => Ok(()),
                                _ => Err(e),
                            })
                            .with_context(|| format!("cannot remove the result of {judge}"))?;
                        std::fs::remove_file(&file)
                            .with_context(|| format!("cannot remove {}", file.display()))?;
                        self.mirror_write(vec![Op::Delete(judge.clone())]);
                    }
                }
            }
        }
        let history = self.spool.retry(id)?;
        let path = self.spool.task_path(Place::Pending, id);
        if let Ok((task, _)) = crate::task::read_task(&path, u64::MAX) {
            let row = mirror::pending_row(&self.spool, &task, &path, Some(&history));
            self.mirror_write(vec![Op::Upsert {
                row,
                attempts: history.attempts.clone(),
            }]);
        }
        Ok(Retried::Pending {
            previous_attempts: history.attempts.len(),
        })
    }
}

/// What [`Project::retry`] did.
pub enum Retried {
    /// It was waiting out a back-off in pending/; it runs as soon as a slot is free.
    RunsNow,
    /// Moved from failed/ back to pending/.
    Pending { previous_attempts: usize },
}

/// Everything about one task (`orchestrate show`, `GET /api/v1/tasks/{id}`).
#[derive(serde::Serialize)]
pub struct Shown {
    pub id: String,
    pub state: String,
    pub file: Option<String>,
    pub task: Option<String>,
    pub note: Option<String>,
    pub claim: Option<crate::record::Claim>,
    pub result: Option<crate::record::TaskResult>,
    pub error: Option<String>,
    pub output: Option<String>,
    pub diff: Option<String>,
    /// As JSON values, whose keys print sorted, as they always have.
    pub attempts: Vec<serde_json::Value>,
}

impl Project {
    /// One task from the tree (the truth) and the local mirror.
    pub fn show(&self, reader: &Reader, id: &str) -> Result<Shown> {
        let project = self;
        let row = reader.get(id)?;
        let spool = &project.spool;
        let place = spool.settled_place(id).or_else(|| {
            let pending = row
                .as_ref()
                .map(|r| spool.layout().tasks_dir.join(&r.payload.file))
                .filter(|p| p.exists());
            pending.map(|_| Place::Pending).or_else(|| {
                spool
                    .task_path(Place::Pending, id)
                    .exists()
                    .then_some(Place::Pending)
            })
        });
        let Some(place) = place else {
            bail!(UsageError(format!(
                "no task {id} in {}",
                project.rel(&spool.layout().tasks_dir)
            )));
        };
        let file = match place {
            Place::Pending => row
                .as_ref()
                .map(|r| spool.layout().tasks_dir.join(&r.payload.file))
                .filter(|p| p.exists())
                .unwrap_or_else(|| spool.task_path(Place::Pending, id)),
            p => spool.task_path(p, id),
        };
        let result = match place {
            Place::Completed => spool.read_result(Terminal::Completed, id),
            Place::Failed => spool.read_result(Terminal::Failed, id),
            _ => None,
        };
        let read = |p: std::path::PathBuf| std::fs::read_to_string(p).ok();
        let shown = Shown {
            id: id.to_string(),
            state: place.state().to_string(),
            file: Some(project.rel(&file)),
            task: read(file.clone()),
            note: row.as_ref().and_then(|r| r.note.clone()),
            claim: if place == Place::Assigned {
                spool.read_claim(id)
            } else {
                None
            },
            error: result.as_ref().and_then(|r| r.error.clone()).or_else(|| {
                if place == Place::Failed {
                    read(Layout::error_path(&file))
                } else {
                    None
                }
            }),
            output: read(project.layout.output_path(id)),
            diff: read(project.layout.diff_path(id)),
            attempts: reader
                .attempts_of(id)?
                .iter()
                .map(serde_json::to_value)
                .collect::<Result<_, _>>()?,
            result,
        };
        Ok(shown)
    }
}

/// One configured agent as `orchestrate agents` and `GET /api/v1/agents` show it.
#[derive(serde::Serialize)]
pub struct AgentInfo {
    pub name: String,
    pub kind: String,
    pub command: String,
    pub found: Option<String>,
    pub available: bool,
    pub problem: Option<String>,
    pub install_hint: Option<String>,
    /// What `<command> --version` printed (first line), when the program was found.
    pub version: Option<String>,
    pub running: usize,
    pub max_instances: usize,
    /// Resting after a rate limit or an exhausted quota until this time.
    pub cooldown_until: Option<String>,
    /// `rate_limited` or `quota_exhausted`.
    pub cooldown_outcome: Option<String>,
    pub cooldown_reason: Option<String>,
    /// Its credentials were refused: no task goes to it until this clears.
    pub needs_login: Option<LoginState>,
    pub attempts: u64,
    pub completed: u64,
    pub failed: u64,
    pub cost_usd: f64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Spend today and this month (in `orchestrator.timezone`) against the agent's `budget`, and
    /// whether a reached limit pauses it.
    pub budget: crate::budget::Standing,
}

#[derive(serde::Serialize)]
pub struct LoginState {
    pub since: String,
    /// What the agent said.
    pub reason: String,
    /// What to do about it.
    pub hint: String,
    /// When the supervisor looks again by itself (its CLI's login check, or the next task tries
    /// it); `None`: only a change of its configuration, environment or credentials, or `--reset`.
    pub next_check: Option<String>,
}

/// `--reset NAME`: clear the agent's "needs login" mark.
impl Project {
    /// Every configured agent: whether it can run, cooldowns, login marks, running instances and
    /// what its attempts add up to.
    pub fn agents(&self, reader: &Reader) -> Result<Vec<AgentInfo>> {
        let project = self;
        let totals = reader.agent_totals()?;
        let running = reader.list(Some("running"))?;
        let cooldowns = crate::cooldown::Cooldowns::read(&project.layout);
        let logins = crate::login::Logins::read(&project.layout);
        let now = time::OffsetDateTime::now_utc();
        let spending = project.spending(reader, now)?;
        // Node CLIs take a second or so each to print a version: ask them all at once.
        let found_paths: Vec<Option<std::path::PathBuf>> = project
            .cfg
            .agents
            .iter()
            .map(|(name, a)| crate::process::find_program(&a.program(name)))
            .collect();
        let versions: Vec<Option<String>> = std::thread::scope(|s| {
            let handles: Vec<_> = project
                .cfg
                .agents
                .values()
                .zip(&found_paths)
                .map(|(a, p)| {
                    s.spawn(move || match (a.kind, p) {
                        // A `command` agent is any program: `--version` might do something else.
                        (crate::config::AgentKind::Command, _) | (_, None) => None,
                        (_, Some(p)) => version_of(p),
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().ok().flatten())
                .collect()
        });
        let mut out = Vec::new();
        for (i, (name, a)) in project.cfg.agents.iter().enumerate() {
            let program = a.program(name);
            let found = if a.kind == crate::config::AgentKind::Openai {
                Some(format!(
                    "built in, {}",
                    a.base_url.as_deref().unwrap_or("no base_url")
                ))
            } else {
                found_paths[i].as_ref().map(|p| p.display().to_string())
            };
            let cooling = cooldowns
                .get(name)
                .filter(|c| crate::cooldown::until_of(c).is_some_and(|u| u > now));
            let problem = crate::agents::unavailable_reason(name, a);
            let t = totals.iter().find(|t| &t.agent == name);
            out.push(AgentInfo {
                name: name.clone(),
                kind: a.kind.as_str().into(),
                command: program,
                available: problem.is_none(),
                install_hint: if found.is_none() {
                    crate::agents::install_hint(a.kind).map(String::from)
                } else {
                    None
                },
                found,
                version: versions[i].clone(),
                problem,
                cooldown_until: cooling.map(|c| c.until.clone()),
                cooldown_outcome: cooling.map(|c| c.outcome.as_str().to_string()),
                cooldown_reason: cooling.map(|c| c.reason.clone()),
                needs_login: logins.get(name).filter(|m| m.active()).map(|m| LoginState {
                    since: m.since.clone(),
                    reason: m.reason.clone(),
                    hint: m.hint.clone(),
                    next_check: m.next_check.clone(),
                }),
                running: running
                    .iter()
                    .filter(|r| r.agent.as_deref() == Some(name))
                    .count(),
                max_instances: a.max_instances,
                attempts: t.map(|t| t.attempts).unwrap_or(0),
                completed: t.map(|t| t.completed).unwrap_or(0),
                failed: t.map(|t| t.failed).unwrap_or(0),
                cost_usd: t.map(|t| t.cost_usd).unwrap_or(0.0),
                input_tokens: t.map(|t| t.input_tokens).unwrap_or(0),
                output_tokens: t.map(|t| t.output_tokens).unwrap_or(0),
                budget: spending.standing(&project.cfg, Some(name), now),
            });
        }
        Ok(out)
    }

    /// What the agents spent in `now`'s month, from the mirror's attempts: the sums budgets are
    /// held to, as the supervisor makes them (see `crate::budget`).
    pub fn spending(
        &self,
        reader: &Reader,
        now: time::OffsetDateTime,
    ) -> Result<crate::budget::Ledger> {
        let zone = self.cfg.orchestrator.zone();
        let (since, _) = crate::budget::window(now, zone, crate::budget::Window::Month);
        let mut ledger = crate::budget::Ledger::default();
        for r in reader.spent_since(&crate::fsutil::fmt_time(since))? {
            ledger.add(
                &r.task_id,
                r.n,
                &r.agent,
                Some(&r.finished_at),
                r.cost_usd,
                r.input_tokens,
                r.output_tokens,
            );
        }
        Ok(ledger)
    }

    /// The standing of every configured budget: `orchestrator.budget` (scope `all`) and each
    /// agent's, for `status`, the API and `/metrics`.
    pub fn budgets(&self, reader: &Reader) -> Result<Vec<BudgetStanding>> {
        let now = time::OffsetDateTime::now_utc();
        let ledger = self.spending(reader, now)?;
        let cfg = &self.cfg;
        let mut out = Vec::new();
        if cfg.orchestrator.budget.is_some() {
            out.push(BudgetStanding {
                scope: "all".into(),
                standing: ledger.standing(cfg, None, now),
            });
        }
        for (name, a) in &cfg.agents {
            if a.budget.is_some() {
                out.push(BudgetStanding {
                    scope: name.clone(),
                    standing: ledger.standing(cfg, Some(name), now),
                });
            }
        }
        Ok(out)
    }
}

/// A configured budget's spend against its limits.
#[derive(serde::Serialize)]
pub struct BudgetStanding {
    /// `all` for `orchestrator.budget`, else the agent's name.
    pub scope: String,
    #[serde(flatten)]
    pub standing: crate::budget::Standing,
}

/// `<program> --version`, bounded: a CLI that hangs (first-run prompt, network) must not hang us.
fn version_of(program: &std::path::Path) -> Option<String> {
    use std::io::Read;
    let mut child = std::process::Command::new(program)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
    let mut out = String::new();
    child.stdout.take()?.read_to_string(&mut out).ok()?;
    out.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(String::from)
}
