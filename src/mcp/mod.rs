//! `orchestrate mcp`: a Model Context Protocol server over stdio (and over streamable HTTP, mounted
//! by `orchestrate serve` at `/mcp`), so an agent (Claude Code, Codex,
//! Gemini CLI, Cursor) can add tasks, watch them and act on their results. Every tool is a thin
//! call into [`crate::project`], the same functions the CLI and the HTTP server use, so a task added
//! here is validated and written exactly like one added by `orchestrate add`.
//!
//! It owns the tool definitions (schemas, descriptions) and their answers. It must never write to
//! stdout itself (that is the protocol's channel), never let a bad call end the server (every
//! failure is a tool error the model can read and correct), and never return a string the
//! project's redactor has not seen.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use rmcp::ErrorData as McpError;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::{Json, Parameters};
use rmcp::model::{JsonObject, ServerCapabilities, ServerInfo};
use rmcp::{ServiceExt, task_handler, tool, tool_handler, tool_router};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::project::{NewTask, Project, Retried};

/// Longest text (output, diff, log) returned whole; longer ones are cut with a note.
const MAX_TEXT: usize = 20_000;
/// Longest `wait_for_task` wait: MCP clients time requests out (often after a few minutes).
const MAX_WAIT_SECONDS: u64 = 300;

/// Serve MCP on stdin/stdout until the client closes stdin.
pub fn run(project: Project) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let server = Server::new(project);
        let stdin = EofSignal {
            inner: tokio::io::stdin(),
            gone: server.gone.clone(),
        };
        let service = server.serve((stdin, tokio::io::stdout())).await?;
        service.waiting().await?;
        Ok(())
    })
}

/// The tools that write (a task file, a cancel or retry request, a landing): a read-only server
/// leaves them out, so a client never sees a tool it may not call.
const WRITE_TOOLS: [&str; 5] = [
    "add_task",
    "cancel_task",
    "retry_task",
    "merge_task",
    "discard_task",
];

/// The server over streamable HTTP, as an axum router for `orchestrate serve` to mount at `/mcp`
/// behind its own token check: one session per client, a long call (`wait_for_task`) answered
/// over the request's event stream. `read_only` leaves out the tools that write. rmcp's check of
/// the `Host` header (loopback names only, against DNS rebinding) stays on unless a token guards the
/// server (`any_host`), which is what lets a server on a LAN address answer at all.
pub fn http_router(project: Project, read_only: bool, any_host: bool) -> axum::Router {
    use rmcp::transport::streamable_http_server::{
        StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
    };
    let mut server = Server::new(project);
    if read_only {
        for name in WRITE_TOOLS {
            server.tool_router.remove_route(name);
        }
    }
    let mut config = StreamableHttpServerConfig::default();
    if any_host {
        config = config.disable_allowed_hosts();
    }
    let service = StreamableHttpService::new(
        move || Ok(server.clone()),
        Arc::new(LocalSessionManager::default()),
        config,
    );
    axum::Router::new().fallback_service(service)
}

/// The client's end of stdin: tells the server's calls when it reaches its end. rmcp gives calls
/// still running when the input closes five seconds to finish before it exits; a `wait_for_task`
/// would use all of them, so the server would outlive its client by five seconds for nothing.
struct EofSignal<R> {
    inner: R,
    gone: Arc<tokio::sync::watch::Sender<bool>>,
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for EofSignal<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let ended = match &r {
            std::task::Poll::Ready(Ok(())) => buf.filled().len() == before && buf.remaining() > 0,
            std::task::Poll::Ready(Err(_)) => true,
            std::task::Poll::Pending => false,
        };
        if ended {
            self.gone.send_replace(true);
        }
        r
    }
}

#[derive(Clone)]
pub struct Server {
    project: Arc<Project>,
    tool_router: ToolRouter<Server>,
    /// Set once the client has gone (its input closed): waits end at once.
    gone: Arc<tokio::sync::watch::Sender<bool>>,
    /// Calls a client made as the protocol's tasks (`wait_for_task` only): running, or finished
    /// and waiting for the client to fetch their result.
    processor: Arc<tokio::sync::Mutex<rmcp::task_manager::OperationProcessor>>,
}

/// The input schema a tool advertises: its arguments type's, while the handler takes the raw object
/// so a wrong argument is a tool error naming its path rather than a protocol error.
fn schema<T: JsonSchema + 'static>() -> Arc<JsonObject> {
    rmcp::handler::server::common::schema_for_type::<T>()
}

/// Decode a tool's arguments, naming the path of a field that is wrong.
fn args<T: serde::de::DeserializeOwned>(raw: JsonObject) -> Result<T, String> {
    serde_path_to_error::deserialize(Value::Object(raw)).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            format!("invalid arguments: {}", e.inner())
        } else {
            format!("invalid argument `{path}`: {}", e.inner())
        }
    })
}

impl Server {
    pub fn new(project: Project) -> Server {
        Server {
            project: Arc::new(project),
            tool_router: Self::tool_router(),
            gone: Arc::new(tokio::sync::watch::channel(false).0),
            processor: Arc::new(tokio::sync::Mutex::new(
                rmcp::task_manager::OperationProcessor::new(),
            )),
        }
    }

    /// Run `f` on a blocking thread (the project's calls read files and the mirror, and cancel
    /// waits), its error rendered for the model and everything it returns redacted.
    async fn call<T: Serialize + Send + 'static>(
        &self,
        f: impl FnOnce(&Project) -> Result<T> + Send + 'static,
    ) -> Result<Json<Answer>, String> {
        let p = self.project.clone();
        let redactor = p.cfg.redactor();
        let r =
            tokio::task::spawn_blocking(move || f(&p).and_then(|v| Ok(serde_json::to_value(v)?)))
                .await
                .map_err(|e| format!("internal error: {e}"))?;
        match r {
            Ok(mut v) => {
                redactor.redact_json(&mut v);
                Ok(Json(Answer(v)))
            }
            Err(e) => Err(redactor.redact(&format!("{e:#}"))),
        }
    }
}

/// A tool's structured result: always a JSON object (MCP requires one).
#[derive(Serialize, JsonSchema)]
#[serde(transparent)]
pub struct Answer(#[schemars(with = "JsonObject")] Value);

/// Cut `text` to [`MAX_TEXT`] characters (its end kept: that is where an output or a log says how it
/// ended), with a note saying where the whole of it is.
fn cut(text: Option<String>, whole_at: &str) -> (Option<String>, Option<String>) {
    let Some(text) = text else {
        return (None, None);
    };
    let n = text.chars().count();
    if n <= MAX_TEXT {
        return (Some(text), None);
    }
    let tail: String = text.chars().skip(n - MAX_TEXT).collect();
    (
        Some(tail),
        Some(format!(
            "cut: the last {MAX_TEXT} of {n} characters; the whole text is in {whole_at}"
        )),
    )
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AddTaskArgs {
    /// What to do: the prompt the agent gets (the `shell` agent runs it as a command).
    pub description: String,
    /// A configured agent (see `list_agents`); omit to let routing decide.
    pub agent: Option<String>,
    /// "high", "normal" (default), "low", or an integer (larger runs sooner).
    #[schemars(with = "Option<Value>")]
    pub priority: Option<crate::task::Priority>,
    /// Ids of tasks that must complete before this one runs; each must exist.
    #[serde(default)]
    pub after: Vec<String>,
    /// Files (relative to the project root) whose contents go into the prompt.
    #[serde(default)]
    pub context_files: Vec<String>,
    /// Where the agent runs, relative to the project root; default: the root.
    pub workdir: Option<String>,
    /// A shell command run after the agent; the task completes only if it exits 0 (e.g. `cargo test`).
    pub check: Option<String>,
    /// Free-form labels.
    #[serde(default)]
    pub labels: Vec<String>,
    /// Free text that routing rules can match.
    #[serde(rename = "type")]
    pub task_type: Option<String>,
    /// Time limit of one attempt, in minutes.
    pub timeout_minutes: Option<f64>,
    /// How many times a failed attempt is retried.
    pub max_retries: Option<u32>,
    /// What all its attempts together may cost, in USD; once spent, it is not retried.
    pub max_cost_usd: Option<f64>,
    /// Race several candidates: a list of agent names (`["claude", "codex"]`), or a count (2 to 16)
    /// of candidates on the agent routing picks. Each runs in its own worktree as task `<id>.<name>`.
    #[schemars(with = "Option<Value>")]
    pub fan_out: Option<crate::task::FanOut>,
    /// With `fan_out`: which candidate lands: "first_pass" (default: the first to complete with its
    /// check passing), "judge" (the `judge` agent chooses), "all" (none; merge one with `merge_task`).
    #[schemars(with = "Option<String>")]
    pub pick: Option<crate::task::Pick>,
    /// With `pick: "judge"`: the agent that chooses among the candidates.
    pub judge: Option<String>,
    /// Use this id instead of the next task_NNN.
    pub id: Option<String>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListTasksArgs {
    /// Only tasks in this state: pending, running, completed or failed.
    pub state: Option<String>,
    /// Only tasks of this agent.
    pub agent: Option<String>,
    /// Only the N most recently updated.
    pub limit: Option<usize>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IdArgs {
    /// The task id (as `add_task` or `list_tasks` gave it).
    pub id: String,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MergeArgs {
    /// The completed task whose kept branch to land.
    pub id: String,
    /// Also commit the changes on the current branch (default: leave them uncommitted).
    #[serde(default)]
    pub commit: bool,
    /// For a fan-out task: the candidate to land (its name: an agent, or a number).
    pub candidate: Option<String>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WaitArgs {
    /// The task to wait for.
    pub id: String,
    /// Seconds to wait at most (default 60, at most 300); call again to keep waiting.
    pub timeout_seconds: Option<u64>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoArgs {}

// What each tool answers. Each is the tool's output schema as well as what builds its answer, so
// the schema a client is shown cannot drift from what it gets.

/// What `add_task` answers.
#[derive(Serialize, JsonSchema)]
pub struct Added {
    /// The new task's id: give it to get_task, wait_for_task or another task's `after`.
    pub id: String,
    /// Its task file, relative to the project root.
    pub file: String,
    /// Always `pending`: the supervisor takes it from there.
    pub state: String,
}

/// What `list_tasks` answers.
#[derive(Serialize, JsonSchema)]
pub struct Listed {
    /// One row per task: id, state, agent, description and more.
    #[schemars(with = "Vec<JsonObject>")]
    pub tasks: Vec<Value>,
}

/// What `get_task` and `wait_for_task` answer.
#[derive(Serialize, JsonSchema)]
pub struct TaskView {
    pub id: String,
    /// pending, running, completed or failed (or the mirror's word for a state in between).
    pub state: String,
    /// Whether the task has finished (completed or failed): false means it is still going.
    pub terminal: bool,
    /// Its task file, relative to the project root.
    pub file: Option<String>,
    /// The task file's text.
    pub task: Option<String>,
    pub note: Option<String>,
    /// The running attempt's claim (agent, attempt, started_at), while it runs.
    #[schemars(with = "Option<JsonObject>")]
    pub claim: Option<Value>,
    /// The result record, once finished.
    #[schemars(with = "Option<JsonObject>")]
    pub result: Option<Value>,
    pub error: Option<String>,
    /// What the agent said (its end, when long: see `notes`).
    pub output: Option<String>,
    /// The diff of what it changed (its end, when long: see `notes`).
    pub diff: Option<String>,
    /// Each attempt: agent, start and end, outcome, exit code, cost, tokens.
    #[schemars(with = "Vec<JsonObject>")]
    pub attempts: Vec<Value>,
    /// Where the whole of a text that was cut is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// What `get_log` answers.
#[derive(Serialize, JsonSchema)]
pub struct Logged {
    pub id: String,
    pub attempt: u32,
    pub agent: String,
    /// The log so far (its end, when long: see `note`).
    pub log: Option<String>,
    pub note: Option<String>,
}

/// What `cancel_task` answers.
#[derive(Serialize, JsonSchema)]
pub struct Cancelled {
    pub id: String,
    /// What was done: the pending task moved to failed/, or a stop requested.
    pub cancelled: String,
}

/// What `retry_task` answers.
#[derive(Serialize, JsonSchema)]
pub struct RetriedOut {
    pub id: String,
    /// `pending` (moved back from failed/) or `runs now` (its back-off skipped).
    pub retried: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_attempts: Option<usize>,
}

/// What `merge_task` and `discard_task` answer.
#[derive(Serialize, JsonSchema)]
pub struct Landing {
    pub id: String,
    /// `applied`, `committed`, `conflict` or `discarded`.
    pub merge: String,
    /// The files that conflict, when `merge` is `conflict` (nothing was written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflicts: Option<Vec<String>>,
    /// The kept branch, deleted (not on a conflict).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch_deleted: Option<String>,
}

/// What `list_agents` answers.
#[derive(Serialize, JsonSchema)]
pub struct Agents {
    /// One per configured agent: name, whether it can run, cooldown, login, instances, totals.
    #[schemars(with = "Vec<JsonObject>")]
    pub agents: Vec<Value>,
}

/// One task as `get_task` and `wait_for_task` return it.
fn task_view(p: &Project, id: &str) -> Result<TaskView> {
    let reader = p.reader(None)?;
    let shown = p.show(&reader, id)?;
    let (output, output_note) = cut(shown.output, &p.rel(&p.layout.output_path(id)));
    let (diff, diff_note) = cut(shown.diff, &p.rel(&p.layout.diff_path(id)));
    Ok(TaskView {
        terminal: matches!(shown.state.as_str(), "completed" | "failed"),
        id: shown.id,
        state: shown.state,
        file: shown.file,
        task: shown.task,
        note: shown.note,
        claim: shown.claim.map(serde_json::to_value).transpose()?,
        result: shown.result.map(serde_json::to_value).transpose()?,
        error: shown.error,
        output,
        diff,
        attempts: shown.attempts,
        notes: [output_note, diff_note].into_iter().flatten().collect(),
    })
}

#[tool_router]
impl Server {
    #[tool(
        description = "Add a task to the queue: written as a task file into tasks/pending/, validated exactly like one; the supervisor (`orchestrate start`) runs it. Returns its id and file.",
        input_schema = schema::<AddTaskArgs>(),
        output_schema = schema::<Added>()
    )]
    async fn add_task(
        &self,
        Parameters(raw): Parameters<JsonObject>,
    ) -> Result<Json<Answer>, String> {
        let a: AddTaskArgs = args(raw)?;
        let new = NewTask {
            description: a.description,
            priority: a.priority,
            agent: a.agent,
            after: a.after,
            context: a.context_files,
            task_type: a.task_type,
            workdir: a.workdir,
            timeout_minutes: a.timeout_minutes,
            max_retries: a.max_retries,
            max_cost_usd: a.max_cost_usd,
            id: a.id,
            check: a.check,
            labels: a.labels,
            fan_out: a.fan_out,
            pick: a.pick,
            judge: a.judge,
        };
        self.call(move |p| {
            let (id, file) = p.add_task(&new)?;
            Ok(Added {
                id,
                file,
                state: "pending".into(),
            })
        })
        .await
    }

    #[tool(
        description = "List tasks, oldest change first: id, state, agent, description and more. Filter by state (pending, running, completed, failed) and agent; limit keeps the N most recently updated.",
        input_schema = schema::<ListTasksArgs>(),
        output_schema = schema::<Listed>()
    )]
    async fn list_tasks(
        &self,
        Parameters(raw): Parameters<JsonObject>,
    ) -> Result<Json<Answer>, String> {
        let a: ListTasksArgs = args(raw)?;
        self.call(move |p| {
            let st = a
                .state
                .as_deref()
                .map(|s| if s == "active" { "running" } else { s });
            if let Some(s) = st
                && !["pending", "running", "completed", "failed"].contains(&s)
            {
                anyhow::bail!("state must be pending, running, completed or failed, not `{s}`");
            }
            let mut rows = p.reader(None)?.list(st)?;
            if let Some(agent) = &a.agent {
                if !p.cfg.agents.contains_key(agent) {
                    anyhow::bail!(
                        "unknown agent `{agent}` (configured: {})",
                        p.cfg.agent_names()
                    );
                }
                rows.retain(|r| r.agent.as_deref() == Some(agent.as_str()));
            }
            if let Some(n) = a.limit {
                rows.drain(..rows.len().saturating_sub(n));
            }
            Ok(Listed {
                tasks: rows
                    .iter()
                    .map(serde_json::to_value)
                    .collect::<Result<_, _>>()?,
            })
        })
        .await
    }

    #[tool(
        description = "One task: state, its file, attempts, result, error, output and diff (long texts are cut to their last 20000 characters, with a note naming the file that holds all of it). `terminal` says whether it has finished.",
        input_schema = schema::<IdArgs>(),
        output_schema = schema::<TaskView>()
    )]
    async fn get_task(
        &self,
        Parameters(raw): Parameters<JsonObject>,
    ) -> Result<Json<Answer>, String> {
        let a: IdArgs = args(raw)?;
        self.call(move |p| task_view(p, &a.id)).await
    }

    #[tool(
        description = "The running attempt's log so far (its last 20000 characters). Only for a running task; a finished one's output is in get_task.",
        input_schema = schema::<IdArgs>(),
        output_schema = schema::<Logged>()
    )]
    async fn get_log(
        &self,
        Parameters(raw): Parameters<JsonObject>,
    ) -> Result<Json<Answer>, String> {
        let a: IdArgs = args(raw)?;
        self.call(move |p| {
            let id = a.id;
            // The tree, not the mirror: the mirror may not have heard of the start yet.
            let claim = match p.spool.settled_place(&id) {
                Some(crate::spool::Place::Assigned) => p.spool.read_claim(&id),
                Some(place) => anyhow::bail!(
                    "task {id} is {}, not running: call get_task for its output",
                    place.state()
                ),
                None => None,
            };
            let Some(claim) = claim else {
                anyhow::bail!(
                    "task {id} is not running (pending, starting, or no such task): call get_task"
                );
            };
            let attempt = claim.attempt.max(1);
            let path = p.layout.log_path(&id, attempt);
            let text =
                String::from_utf8_lossy(&std::fs::read(&path).unwrap_or_default()).into_owned();
            let (log, note) = cut(Some(text), &p.rel(&path));
            Ok(Logged {
                id,
                attempt,
                agent: claim.agent,
                log,
                note,
            })
        })
        .await
    }

    #[tool(
        description = "Wait until a task has finished (completed or failed) or timeout_seconds (default 60, at most 300) pass, then return what get_task returns; `terminal` false means it is still going: call again. A client that supports the protocol's tasks may run it as one.",
        input_schema = schema::<WaitArgs>(),
        output_schema = schema::<TaskView>(),
        execution(task_support = "optional")
    )]
    async fn wait_for_task(
        &self,
        Parameters(raw): Parameters<JsonObject>,
        context: rmcp::service::RequestContext<rmcp::RoleServer>,
    ) -> Result<Json<Answer>, String> {
        let a: WaitArgs = args(raw)?;
        let secs = a.timeout_seconds.unwrap_or(60);
        if secs > MAX_WAIT_SECONDS {
            return Err(format!(
                "invalid argument `timeout_seconds`: at most {MAX_WAIT_SECONDS}, not {secs}; call again to wait longer"
            ));
        }
        let deadline = Instant::now() + Duration::from_secs(secs);
        let id = a.id;
        loop {
            let tid = id.clone();
            let settled = self
                .call(move |p| {
                    Ok(p.spool
                        .settled_place(&tid)
                        .is_some_and(|pl| pl.state() == "completed" || pl.state() == "failed"))
                })
                .await?;
            if settled.0.0 == Value::Bool(true) || Instant::now() >= deadline {
                let tid = id.clone();
                return self.call(move |p| task_view(p, &tid)).await;
            }
            // Until the next look, unless the client cancels the call or goes away: then nobody
            // reads the answer.
            let mut gone = self.gone.subscribe();
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = context.ct.cancelled() => return Err("cancelled by the client".into()),
                _ = gone.wait_for(|g| *g) => return Err("the client has gone".into()),
            }
        }
    }

    #[tool(
        description = "Cancel a pending task, or stop a running one; it ends in failed/.",
        input_schema = schema::<IdArgs>(),
        output_schema = schema::<Cancelled>()
    )]
    async fn cancel_task(
        &self,
        Parameters(raw): Parameters<JsonObject>,
    ) -> Result<Json<Answer>, String> {
        let a: IdArgs = args(raw)?;
        self.call(move |p| {
            let cancelled = p.cancel(&a.id)?;
            Ok(Cancelled {
                id: a.id,
                cancelled,
            })
        })
        .await
    }

    #[tool(
        description = "Move a failed task back to pending (its attempt history kept), or make a task waiting out a retry back-off run now.",
        input_schema = schema::<IdArgs>(),
        output_schema = schema::<RetriedOut>()
    )]
    async fn retry_task(
        &self,
        Parameters(raw): Parameters<JsonObject>,
    ) -> Result<Json<Answer>, String> {
        let a: IdArgs = args(raw)?;
        self.call(move |p| {
            let (retried, previous_attempts) = match p.retry(&a.id)? {
                Retried::RunsNow => ("runs now", None),
                Retried::Pending { previous_attempts } => ("pending", Some(previous_attempts)),
            };
            Ok(RetriedOut {
                id: a.id,
                retried: retried.into(),
                previous_attempts,
            })
        })
        .await
    }

    #[tool(
        description = "Land a completed task's changes kept on its branch into the working tree (all or nothing; `commit` also commits them). On a conflict nothing is written and the conflicting files are listed.",
        input_schema = schema::<MergeArgs>(),
        output_schema = schema::<Landing>()
    )]
    async fn merge_task(
        &self,
        Parameters(raw): Parameters<JsonObject>,
    ) -> Result<Json<Answer>, String> {
        let a: MergeArgs = args(raw)?;
        self.call(move |p| {
            let merged = match &a.candidate {
                Some(c) => p.merge_candidate(&a.id, c, a.commit)?,
                None => p.merge_kept(&a.id, a.commit)?,
            };
            Ok(match merged {
                crate::project::land::Merged::Conflict { files, .. } => Landing {
                    id: a.id,
                    merge: "conflict".into(),
                    conflicts: Some(files),
                    branch_deleted: None,
                },
                crate::project::land::Merged::Landed { how, branch } => Landing {
                    id: a.id,
                    merge: how.into(),
                    conflicts: None,
                    branch_deleted: Some(branch),
                },
            })
        })
        .await
    }

    #[tool(
        description = "Delete a completed task's kept branch, and its changes with it.",
        input_schema = schema::<IdArgs>(),
        output_schema = schema::<Landing>()
    )]
    async fn discard_task(
        &self,
        Parameters(raw): Parameters<JsonObject>,
    ) -> Result<Json<Answer>, String> {
        let a: IdArgs = args(raw)?;
        self.call(move |p| {
            let branch = p.discard_kept(&a.id)?;
            Ok(Landing {
                id: a.id,
                merge: "discarded".into(),
                conflicts: None,
                branch_deleted: Some(branch),
            })
        })
        .await
    }

    #[tool(
        description = "The configured agents: whether each can run, cooldowns, login problems, running instances and totals. Use a name from here as add_task's agent.",
        input_schema = schema::<NoArgs>(),
        output_schema = schema::<Agents>()
    )]
    async fn list_agents(
        &self,
        Parameters(raw): Parameters<JsonObject>,
    ) -> Result<Json<Answer>, String> {
        let _: NoArgs = args(raw)?;
        self.call(|p| {
            let agents = p.agents(&p.reader(None)?)?;
            Ok(Agents {
                agents: agents
                    .iter()
                    .map(serde_json::to_value)
                    .collect::<Result<_, _>>()?,
            })
        })
        .await
    }

    #[tool(
        description = "Counts of tasks by state, the running tasks and the supervisors.",
        input_schema = schema::<NoArgs>()
    )]
    async fn status(
        &self,
        Parameters(raw): Parameters<JsonObject>,
    ) -> Result<Json<Answer>, String> {
        let _: NoArgs = args(raw)?;
        self.call(|p| crate::project::status::status(p, &p.reader(None)?, None))
            .await
    }
}

/// The files a client may read without a tool call: the two context pages, and each task's output
/// and diff (by template), under `orchestrate://`.
const OVERVIEW_URI: &str = "orchestrate://context/project_overview.md";
const STATE_URI: &str = "orchestrate://context/current_state.md";
const OUTPUT_TEMPLATE: &str = "orchestrate://tasks/{id}/output";
const DIFF_TEMPLATE: &str = "orchestrate://tasks/{id}/diff";

impl Server {
    /// The file a resource URI stands for, or why there is none.
    fn resource_file(&self, uri: &str) -> Result<std::path::PathBuf, String> {
        let layout = &self.project.layout;
        if uri == OVERVIEW_URI {
            return Ok(layout.project_overview());
        }
        if uri == STATE_URI {
            return Ok(layout.current_state());
        }
        let task = uri
            .strip_prefix("orchestrate://tasks/")
            .and_then(|rest| rest.rsplit_once('/'));
        match task {
            Some((id, "output")) if crate::task::valid_name(id) => Ok(layout.output_path(id)),
            Some((id, "diff")) if crate::task::valid_name(id) => Ok(layout.diff_path(id)),
            _ => Err(format!(
                "no resource {uri}: use {OVERVIEW_URI}, {STATE_URI}, {OUTPUT_TEMPLATE} or \
                 {DIFF_TEMPLATE}"
            )),
        }
    }
}

// `task_handler` answers the protocol's task requests (tasks/get, tasks/result, tasks/list,
// tasks/cancel) from `processor`, for the tools that offer them.
#[tool_handler(router = self.tool_router)]
#[task_handler(processor = self.processor)]
impl rmcp::ServerHandler for Server {
    /// A call made as a task (what `task_handler` would generate, but for the cancellation token):
    /// the request's own token is cancelled as soon as the task is created and answered, which
    /// would end a `wait_for_task` at once, so the call gets a token of its own; `tasks/cancel`
    /// stops it by aborting it instead.
    async fn enqueue_task(
        &self,
        request: rmcp::model::CallToolRequestParams,
        context: rmcp::service::RequestContext<rmcp::RoleServer>,
    ) -> Result<rmcp::model::CreateTaskResult, McpError> {
        use rmcp::task_manager::{
            OperationDescriptor, OperationMessage, OperationResultTransport, ToolCallTaskResult,
            current_timestamp,
        };
        let task_id = context.id.to_string();
        let mut call_context = context.clone();
        call_context.ct = Default::default();
        let call_request = request.clone();
        let server = self.clone();
        let descriptor = OperationDescriptor::new(task_id.clone(), request.name.to_string())
            .with_context(context)
            .with_client_request(rmcp::model::ClientRequest::CallToolRequest(
                rmcp::model::Request::new(request),
            ));
        let result_id = task_id.clone();
        let future = Box::pin(async move {
            let result = server.call_tool(call_request, call_context).await;
            Ok(Box::new(ToolCallTaskResult::new(result_id, result))
                as Box<dyn OperationResultTransport>)
        });
        self.processor
            .lock()
            .await
            .submit_operation(OperationMessage::new(descriptor, future))
            .map_err(|e| McpError::internal_error(format!("cannot start the task: {e}"), None))?;
        let now = current_timestamp();
        Ok(rmcp::model::CreateTaskResult::new(
            rmcp::model::Task::new(task_id, rmcp::model::TaskStatus::Working, now.clone(), now)
                .with_status_message("waiting"),
        ))
    }

    async fn list_resources(
        &self,
        _request: Option<rmcp::model::PaginatedRequestParams>,
        _context: rmcp::service::RequestContext<rmcp::RoleServer>,
    ) -> Result<rmcp::model::ListResourcesResult, rmcp::ErrorData> {
        use rmcp::model::{AnnotateAble, RawResource};
        let pages = [
            (
                OVERVIEW_URI,
                "project_overview.md",
                "What the project is, as every prompt starts",
            ),
            (
                STATE_URI,
                "current_state.md",
                "Counts, what runs, what waits and why, recent failures",
            ),
        ];
        Ok(rmcp::model::ListResourcesResult::with_all_items(
            pages
                .iter()
                .map(|(uri, name, what)| {
                    let mut r = RawResource::new(*uri, *name);
                    r.description = Some((*what).into());
                    r.mime_type = Some("text/markdown".into());
                    r.no_annotation()
                })
                .collect(),
        ))
    }

    async fn list_resource_templates(
        &self,
        _request: Option<rmcp::model::PaginatedRequestParams>,
        _context: rmcp::service::RequestContext<rmcp::RoleServer>,
    ) -> Result<rmcp::model::ListResourceTemplatesResult, rmcp::ErrorData> {
        use rmcp::model::{AnnotateAble, RawResourceTemplate};
        let templates = [
            (OUTPUT_TEMPLATE, "task output", "text/markdown"),
            (DIFF_TEMPLATE, "task diff", "text/x-diff"),
        ];
        Ok(rmcp::model::ListResourceTemplatesResult::with_all_items(
            templates
                .iter()
                .map(|(uri, name, mime)| {
                    let mut t = RawResourceTemplate::new(*uri, *name);
                    t.mime_type = Some((*mime).into());
                    t.no_annotation()
                })
                .collect(),
        ))
    }

    async fn read_resource(
        &self,
        request: rmcp::model::ReadResourceRequestParams,
        _context: rmcp::service::RequestContext<rmcp::RoleServer>,
    ) -> Result<rmcp::model::ReadResourceResult, rmcp::ErrorData> {
        let uri = request.uri;
        let file = self
            .resource_file(&uri)
            .map_err(|e| rmcp::ErrorData::resource_not_found(e, None))?;
        let text = std::fs::read_to_string(&file).map_err(|e| {
            rmcp::ErrorData::resource_not_found(
                format!("{uri}: cannot read {}: {e}", self.project.rel(&file)),
                None,
            )
        })?;
        let text = self.project.cfg.redactor().redact_owned(text);
        Ok(rmcp::model::ReadResourceResult::new(vec![
            rmcp::model::ResourceContents::text(text, uri),
        ]))
    }

    fn get_info(&self) -> ServerInfo {
        ServerInfo::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_resources()
                .enable_tasks_with(rmcp::model::TasksCapability::server_default())
                .build(),
        )
        .with_server_info(rmcp::model::Implementation::new(
            "orchestrate",
            env!("CARGO_PKG_VERSION"),
        ))
        .with_instructions(
            "orchestrate runs AI coding-agent CLIs on tasks from a folder. add_task queues work, \
             wait_for_task or get_task reads the result, list_agents names the agents.",
        )
    }
}
