//! `config.yaml`: schema, defaults, and all of its validation.
//!
//! The repository's `config.yaml` is embedded as the default, so a bare `orchestrate start` in a folder
//! without one behaves exactly like the documented file. Errors name the file, the key, and the line
//! and column; a config error stops the start (exit code 2), it is never half-applied.
//!
//! [`Config::parse`] goes from raw input to ready objects in one pass: serde reads the text, `${VAR}`
//! expansion fills values, and `Config::compile` checks every value and keeps what it compiled
//! (routing regexes, review and diff-exclude globs) in the config itself, so nothing downstream parses
//! a pattern again. This module owns what the configuration *means* (defaults, the project
//! [`Layout`], the list of secret names); it never reads task files and never opens a database.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::layout::Layout;
use crate::redact::Redactor;

pub mod cluster;
pub mod notify;
pub use cluster::ClusterConfig;
pub use notify::{NotifyChannel, NotifyOn};

/// The documented default configuration (also what `orchestrate init` writes).
pub const DEFAULT_CONFIG: &str = include_str!("../config.yaml");

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub orchestrator: OrchestratorConfig,
    pub database: DatabaseConfig,
    pub agents: BTreeMap<String, AgentConfig>,
    pub routing: RoutingConfig,
    pub task_queue: TaskQueueConfig,
    pub security: SecurityConfig,
    pub context: ContextConfig,
    pub workspace: WorkspaceConfig,
    /// Notification channels (see [`notify`]).
    pub notify: Vec<NotifyChannel>,
    /// Several hosts sharing one queue in PostgreSQL (see [`cluster`]).
    pub cluster: ClusterConfig,
    /// What validation noticed that is not wrong but worth saying (a permission flag in an agent's
    /// `args` that a config key says too). `validate --check-config` prints them and `start` logs them
    /// once; nothing else reads them.
    #[serde(skip)]
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OrchestratorConfig {
    pub tasks_dir: PathBuf,
    pub context_dir: PathBuf,
    pub state_dir: PathBuf,
    pub max_concurrent: usize,
    pub settle_ms: u64,
    pub rescan_seconds: u64,
    pub log_level: String,
    /// fsync files and directories at each commit point. Off trades crash safety for speed.
    pub durable: bool,
    /// Seconds between SIGTERM and SIGKILL when an agent is stopped.
    pub kill_grace_seconds: f64,
    /// Task files larger than this are rejected unread.
    pub max_task_bytes: u64,
    /// Cap on each attempt's log in context/logs (head and tail kept).
    pub max_log_bytes: u64,
    /// Seconds between heartbeats written into claim records.
    pub heartbeat_seconds: u64,
    /// How long an agent marked "needs login" waits before it is looked at again (its CLI's login
    /// check, or the next task tries it); doubles with each look that finds it still logged out, up
    /// to an hour. 0: only a change of its configuration, environment or credentials, or
    /// `orchestrate agents --reset`, clears the mark.
    pub login_recheck_seconds: u64,
    /// The zone budget days and months are counted in: `UTC` or a fixed offset like `+02:00`.
    pub timezone: String,
    /// Limits over all agents together; reaching one pauses every agent until its window resets.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
    /// `timezone`, parsed (by `compile`).
    #[serde(skip)]
    pub utc_offset: Option<time::UtcOffset>,
}

impl OrchestratorConfig {
    /// The zone budget windows are counted in.
    pub fn zone(&self) -> time::UtcOffset {
        self.utc_offset.unwrap_or(time::UtcOffset::UTC)
    }
}

/// Spending limits over a day or a month in `orchestrator.timezone`, in USD (the cost the attempts
/// record) and in tokens (input plus output, for agents without a price). Reaching any of them
/// pauses the agent (or, under `orchestrator.budget`, every agent) until its window resets.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily_usd: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monthly_usd: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monthly_tokens: Option<u64>,
}

impl Budget {
    /// Every limit a number of its kind; at least one limit. Errors are `(key, message)`.
    fn check(&self, key: &str) -> Result<(), (String, String)> {
        for (k, v) in [
            ("daily_usd", self.daily_usd),
            ("monthly_usd", self.monthly_usd),
        ] {
            if let Some(v) = v
                && !(v > 0.0 && v.is_finite())
            {
                return Err((
                    format!("{key}.{k}"),
                    "must be a positive number of US dollars".into(),
                ));
            }
        }
        for (k, v) in [
            ("daily_tokens", self.daily_tokens),
            ("monthly_tokens", self.monthly_tokens),
        ] {
            if v == Some(0) {
                return Err((format!("{key}.{k}"), "must be at least 1".into()));
            }
        }
        if *self == Budget::default() {
            return Err((
                key.into(),
                "names no limit: give daily_usd, monthly_usd, daily_tokens or monthly_tokens"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// `UTC`, `Z` or a fixed offset `+HH:MM` / `-HH:MM`: the zone budget windows are counted in. A fixed
/// offset, not a named zone: `time` has no zone database, and a day that starts at the same offset
/// all year is what a budget needs (a summer-time change moves the reset by an hour, nothing more).
pub fn parse_zone(s: &str) -> Result<time::UtcOffset, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("utc") || t == "Z" {
        return Ok(time::UtcOffset::UTC);
    }
    let bad = || {
        format!(
            "`{s}` is not a time zone orchestrate knows: use UTC or a fixed offset such as +02:00 or -05:00 (named zones like Europe/Berlin are not supported)"
        )
    };
    let t = t
        .strip_prefix("UTC")
        .or_else(|| t.strip_prefix("utc"))
        .unwrap_or(t);
    let (sign, rest) = match t.as_bytes().first() {
        Some(b'+') => (1i8, &t[1..]),
        Some(b'-') => (-1i8, &t[1..]),
        _ => return Err(bad()),
    };
    let (h, m) = rest.split_once(':').unwrap_or((rest, "0"));
    let (Ok(h), Ok(m)) = (h.parse::<i8>(), m.parse::<i8>()) else {
        return Err(bad());
    };
    if !(0..=14).contains(&h) || !(0..60).contains(&m) {
        return Err(bad());
    }
    time::UtcOffset::from_hms(sign * h, sign * m, 0).map_err(|_| bad())
}

/// How a zone is named in reasons: `UTC` or `+02:00`.
pub fn zone_label(zone: time::UtcOffset) -> String {
    if zone == time::UtcOffset::UTC {
        return "UTC".into();
    }
    let (h, m, _) = zone.as_hms();
    let sign = if zone.is_negative() { '-' } else { '+' };
    format!("{sign}{:02}:{:02}", h.unsigned_abs(), m.unsigned_abs())
}

impl Default for OrchestratorConfig {
    fn default() -> Self {
        OrchestratorConfig {
            tasks_dir: "./tasks".into(),
            context_dir: "./context".into(),
            state_dir: "./.orchestrate".into(),
            max_concurrent: 4,
            settle_ms: 500,
            rescan_seconds: 30,
            log_level: "info".into(),
            durable: true,
            kill_grace_seconds: 5.0,
            max_task_bytes: 1024 * 1024,
            max_log_bytes: 8 * 1024 * 1024,
            heartbeat_seconds: 10,
            login_recheck_seconds: 300,
            timezone: "UTC".into(),
            budget: None,
            utc_offset: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// PostgreSQL URL; `${VAR}` is expanded from the environment. Empty means SQLite only.
    pub url: Option<String>,
    /// Schema holding orchestrate's tables (created if missing), so one database can serve several
    /// projects. Its NOTIFY channel is `orchestrate_events`, or `orchestrate_events_<schema>` outside `public`.
    pub schema: String,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: None,
            schema: "public".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentKind {
    Command,
    Claude,
    Codex,
    Gemini,
    Cursor,
    Openai,
}

impl AgentKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentKind::Command => "command",
            AgentKind::Claude => "claude",
            AgentKind::Codex => "codex",
            AgentKind::Gemini => "gemini",
            AgentKind::Cursor => "cursor",
            AgentKind::Openai => "openai",
        }
    }

    /// The values `permissions` takes for this kind: the CLI's own names for its modes.
    pub fn permission_modes(self) -> &'static [&'static str] {
        match self {
            AgentKind::Claude => &[
                "acceptEdits",
                "auto",
                "bypassPermissions",
                "manual",
                "dontAsk",
                "plan",
            ],
            AgentKind::Codex => &["read-only", "workspace-write", "danger-full-access"],
            AgentKind::Gemini => &["default", "auto_edit", "yolo", "plan"],
            AgentKind::Cursor => &["default", "force"],
            AgentKind::Command | AgentKind::Openai => &[],
        }
    }

    /// The flags of this kind's CLI that set what `permissions` sets: the one table the adapters
    /// (which leave their own permission flag out when `args` hold one of these) and validation
    /// (which names the equivalent key, or refuses a contradiction) both read.
    pub fn permission_flags(self) -> &'static [PermissionFlag] {
        use FlagValue::{Follows, Implies, Means};
        match self {
            AgentKind::Claude => {
                const FLAGS: &[PermissionFlag] = &[
                    PermissionFlag::new("--permission-mode", Follows),
                    PermissionFlag::new(
                        "--dangerously-skip-permissions",
                        Means("bypassPermissions"),
                    ),
                ];
                FLAGS
            }
            // `-a`/`--ask-for-approval` are not here: they choose approvals, not the sandbox that
            // `permissions` chooses, and `codex exec` (0.169) refuses them. `--full-auto` is the
            // sandbox alias of older releases (0.169 refuses it too); whoever still writes it gets
            // the key named.
            AgentKind::Codex => {
                const FLAGS: &[PermissionFlag] = &[
                    PermissionFlag::new("--sandbox", Follows),
                    PermissionFlag::new("-s", Follows),
                    PermissionFlag::new(
                        "--dangerously-bypass-approvals-and-sandbox",
                        Means("danger-full-access"),
                    ),
                    PermissionFlag::new("--full-auto", Means("workspace-write")),
                    // Refused by codex together with `--sandbox`.
                    PermissionFlag::new("--approve-for-me", Implies("workspace-write")),
                ];
                FLAGS
            }
            AgentKind::Gemini => {
                const FLAGS: &[PermissionFlag] = &[
                    PermissionFlag::new("--approval-mode", Follows),
                    PermissionFlag::new("--yolo", Means("yolo")),
                    PermissionFlag::new("-y", Means("yolo")),
                ];
                FLAGS
            }
            AgentKind::Cursor => {
                const FLAGS: &[PermissionFlag] = &[
                    PermissionFlag::new("--force", Means("force")),
                    PermissionFlag::new("-f", Means("force")),
                ];
                FLAGS
            }
            AgentKind::Command | AgentKind::Openai => &[],
        }
    }

    /// The environment variable the kind's CLI conventionally reads its API key from.
    pub fn key_var(self) -> Option<&'static str> {
        match self {
            AgentKind::Claude => Some("ANTHROPIC_API_KEY"),
            AgentKind::Codex | AgentKind::Openai => Some("OPENAI_API_KEY"),
            AgentKind::Gemini => Some("GEMINI_API_KEY"),
            AgentKind::Cursor => Some("CURSOR_API_KEY"),
            AgentKind::Command => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptVia {
    /// `{prompt}` in args when present, else stdin.
    #[default]
    Auto,
    Arg,
    Stdin,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub kind: AgentKind,
    #[serde(default)]
    pub command: Option<String>,
    #[serde(default)]
    pub args: Vec<String>,
    /// Extra environment for this agent only (values may use `${VAR}`).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default = "one")]
    pub max_instances: usize,
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
    #[serde(default)]
    pub prompt_via: PromptVia,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub base_url: Option<String>,
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// First cooldown after a rate limit that names no reset time; doubles on each one in a row.
    #[serde(default)]
    pub cooldown_seconds: Option<u64>,
    /// An attempt with neither output nor a change in its workdir for this long is stopped as
    /// `stalled`; 0 turns the check off for this agent. Default: `task_queue.stall_timeout_seconds`
    /// for agents whose CLI prints as it works (see [`Config::stall_timeout`]).
    #[serde(default)]
    pub stall_timeout_seconds: Option<u64>,
    /// How much the agent may do unattended, in its own CLI's terms: claude `--permission-mode`
    /// (default acceptEdits), codex `--sandbox` (default workspace-write), gemini `--approval-mode`
    /// (default auto_edit), cursor `force` to pass `--force`. Without it edits are refused or wait
    /// for a human who is not there. A permission flag in `args` wins over it (see
    /// [`AgentKind::permission_flags`]); the two saying different things is an error.
    #[serde(default)]
    pub permissions: Option<String>,
    /// Prices in USD per million tokens, to compute a cost for CLIs that report only tokens.
    #[serde(default)]
    pub prices: Option<Prices>,
    /// Overrides `workspace.isolation` for tasks this agent runs (a task's own key wins).
    #[serde(default)]
    pub isolation: Option<Isolation>,
    /// The check run after this agent's attempts (a task's own `check` wins; see [`Config::check_for`]).
    #[serde(default)]
    pub check: Option<String>,
    #[serde(default)]
    pub check_timeout_minutes: Option<f64>,
    /// This agent's spending limits (see [`Budget`]).
    #[serde(default)]
    pub budget: Option<Budget>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Prices {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
    /// Cached input tokens; the input price when not given.
    #[serde(default)]
    pub cached_input_per_mtok: Option<f64>,
}

impl Prices {
    pub fn cost(&self, input: u64, output: u64, cached: u64) -> f64 {
        let cached = cached.min(input);
        let cached_price = self.cached_input_per_mtok.unwrap_or(self.input_per_mtok);
        ((input - cached) as f64 * self.input_per_mtok
            + cached as f64 * cached_price
            + output as f64 * self.output_per_mtok)
            / 1e6
    }
}

fn one() -> usize {
    1
}

/// A flag of an agent CLI that says what the agent's `permissions` key says (see
/// [`AgentKind::permission_flags`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PermissionFlag {
    pub flag: &'static str,
    pub value: FlagValue,
}

/// Which `permissions` value a [`PermissionFlag`] stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagValue {
    /// The value that follows the flag is the mode: `--sandbox read-only`, `--sandbox=read-only`, and
    /// for a short flag `-sread-only`.
    Follows,
    /// The flag alone is this mode.
    Means(&'static str),
    /// The flag chooses this mode and does more that `permissions` cannot say.
    Implies(&'static str),
}

impl PermissionFlag {
    const fn new(flag: &'static str, value: FlagValue) -> PermissionFlag {
        PermissionFlag { flag, value }
    }

    /// The mode `arg` (followed by `next`) sets if it is this flag: `None` if it is another argument,
    /// `Some(None)` if the flag's value is missing. The second element says whether `next` was used.
    fn matches<'a>(&self, arg: &'a str, next: Option<&'a str>) -> Option<(Option<&'a str>, bool)> {
        let short = !self.flag.starts_with("--");
        let attached = arg.strip_prefix(self.flag)?;
        match self.value {
            FlagValue::Follows if attached.is_empty() => Some((next, next.is_some())),
            FlagValue::Follows => match attached.strip_prefix('=') {
                Some(v) => Some((Some(v), false)),
                // `-sread-only`; a long flag is only ever followed by `=` (`--sandboxes` is not it).
                None if short => Some((Some(attached), false)),
                None => None,
            },
            FlagValue::Means(m) | FlagValue::Implies(m) => {
                (attached.is_empty() || attached.starts_with('=')).then_some((Some(m), false))
            }
        }
    }
}

/// A permission flag found in an agent's `args`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PermissionArg {
    /// As the user wrote it, value included (`--sandbox workspace-write`).
    pub written: String,
    pub flag: PermissionFlag,
    /// The `permissions` value it stands for; `None` when the flag's value is missing.
    pub mode: Option<String>,
}

impl AgentConfig {
    /// The permission flags in `args` (see [`AgentKind::permission_flags`]), in order. Nothing after
    /// `--` is a flag.
    pub fn permission_args(&self) -> Vec<PermissionArg> {
        let flags = self.kind.permission_flags();
        let mut found = Vec::new();
        let mut i = 0;
        while i < self.args.len() && self.args[i] != "--" {
            let arg = self.args[i].as_str();
            let next = self.args.get(i + 1).map(String::as_str);
            i += 1;
            if let Some((flag, (mode, used_next))) =
                flags.iter().find_map(|f| Some((*f, f.matches(arg, next)?)))
            {
                let written = match (used_next, next) {
                    (true, Some(v)) => format!("{arg} {v}"),
                    _ => arg.to_string(),
                };
                i += usize::from(used_next);
                found.push(PermissionArg {
                    written,
                    flag,
                    mode: mode.map(String::from),
                });
            }
        }
        found
    }

    /// Whether `args` choose the permission mode themselves: then the adapter passes no permission
    /// flag of its own (a CLI refuses a flag given twice, or `--sandbox` beside `--approve-for-me`).
    pub fn args_set_permissions(&self) -> bool {
        !self.permission_args().is_empty()
    }

    /// The executable this agent runs.
    pub fn program(&self, name: &str) -> String {
        self.command.clone().unwrap_or_else(|| match self.kind {
            AgentKind::Claude => "claude".into(),
            AgentKind::Codex => "codex".into(),
            AgentKind::Gemini => "gemini".into(),
            AgentKind::Cursor => "cursor-agent".into(),
            AgentKind::Command | AgentKind::Openai => name.into(),
        })
    }
}

/// How long a check may run when nothing says.
pub const DEFAULT_CHECK_TIMEOUT_MINUTES: f64 = 10.0;

/// The check an attempt runs after its agent (see [`Config::check_for`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// Run as `/bin/sh -c COMMAND`.
    pub command: String,
    pub timeout: std::time::Duration,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Tried in order when a task names no agent and no rule matches.
    pub fallback: Vec<String>,
    pub rules: Vec<RoutingRule>,
    pub router: Option<RouterConfig>,
    /// A retry after a real failure goes to the next available agent in the chain (with the failed
    /// attempt's output and error handed over in the prompt) instead of the one that failed.
    #[serde(default)]
    pub retry_on_other_agent: bool,
    /// The check run after every attempt whose task and agent set none (see [`Config::check_for`]).
    #[serde(default)]
    pub check: Option<String>,
    #[serde(default)]
    pub check_timeout_minutes: Option<f64>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingRule {
    #[serde(default, rename = "type")]
    pub task_type: Option<String>,
    #[serde(default)]
    pub labels: Vec<String>,
    /// Regular expression matched against the description.
    #[serde(default)]
    pub matches: Option<String>,
    pub agent: String,
    /// `matches`, compiled by `Config::compile`.
    #[serde(skip)]
    pub regex: Option<regex::Regex>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    /// An `openai` agent.
    pub agent: String,
    /// How long to wait for its answer before falling back (default 20).
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
    /// Answers less sure than this are not followed (default 0.5).
    #[serde(default)]
    pub min_confidence: Option<f64>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TaskQueueConfig {
    pub timeout_minutes: f64,
    /// An attempt that makes no progress (no output, no change in its workdir) for this long is
    /// stopped as `stalled` and retried like a timeout; 0 turns the check off.
    pub stall_timeout_seconds: u64,
    pub max_retries: u32,
    pub retry_delay_seconds: f64,
    /// A waiting task gains one priority level per this many minutes.
    pub aging_minutes: f64,
}

impl Default for TaskQueueConfig {
    fn default() -> Self {
        TaskQueueConfig {
            timeout_minutes: 30.0,
            stall_timeout_seconds: 600,
            max_retries: 3,
            retry_delay_seconds: 60.0,
            aging_minutes: 30.0,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// Environment variables passed through to agents; everything else is withheld.
    pub env_allow: Vec<String>,
    /// Environment variables whose values are redacted (`***`) from everything written.
    pub secrets: Vec<String>,
    /// Roots a task's workdir must resolve inside (relative to the project root).
    pub workspace_roots: Vec<PathBuf>,
    /// Globs; a diff touching one marks the result `review_required`.
    pub review_paths: Vec<String>,
    /// `review_paths`, compiled by `Config::compile`.
    #[serde(skip)]
    pub review_globs: Vec<glob::Pattern>,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        SecurityConfig {
            env_allow: ["PATH", "HOME", "LANG", "TERM"].map(String::from).to_vec(),
            secrets: ["ANTHROPIC_API_KEY", "OPENAI_API_KEY", "GEMINI_API_KEY"]
                .map(String::from)
                .to_vec(),
            workspace_roots: vec![".".into()],
            review_paths: ["package.json", "*.sql", "Dockerfile", ".github/**"]
                .map(String::from)
                .to_vec(),
            review_globs: vec![],
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContextConfig {
    /// Extra names or globs skipped by diff capture (`.git`, `target`, `node_modules` always are).
    pub diff_exclude: Vec<String>,
    /// Files larger than this are summarised in diffs, not diffed line by line.
    pub max_diff_file_bytes: u64,
    /// Total bytes of file content remembered before a run to diff against.
    pub max_snapshot_bytes: u64,
    /// Time allowed to each walk of a workdir (the snapshot before a run, the diff after it).
    pub max_diff_seconds: u64,
    /// Each context file (and dependency output) is cut to this many bytes in the prompt.
    pub max_context_file_bytes: u64,
    /// `diff_exclude`, compiled by `Config::compile`.
    #[serde(skip)]
    pub diff_exclude_globs: Vec<glob::Pattern>,
}

impl Default for ContextConfig {
    fn default() -> Self {
        ContextConfig {
            diff_exclude: vec![],
            max_diff_file_bytes: 1024 * 1024,
            max_snapshot_bytes: 256 * 1024 * 1024,
            max_diff_seconds: 60,
            max_context_file_bytes: 64 * 1024,
            diff_exclude_globs: vec![],
        }
    }
}

/// Defined with the task file, which names them too.
pub use crate::task::{Isolation, MergeMode};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkspaceConfig {
    pub isolation: Isolation,
    /// Task branches are `<branch_prefix><task id>`.
    pub branch_prefix: String,
    pub merge: MergeMode,
    /// Keep each attempt's worktree folder after it ends, for inspection.
    pub keep: bool,
    /// How long an idle worktree is kept for reuse (0: none is; each attempt makes its own).
    pub pool_idle_seconds: u64,
    /// No claim starts while the state directory's file system has less free space than this
    /// (MiB); 0: no floor.
    pub min_free_disk_mb: u64,
    /// Shell commands (`sh -c`) run in the top of each new worktree before the agent, in order.
    pub setup: Vec<String>,
    /// Time limit of each `setup` command.
    pub setup_timeout_seconds: u64,
    /// Ignored paths of the user's work tree (relative to its top) made available in each worktree.
    pub link: Vec<String>,
    pub link_mode: LinkMode,
}

/// How a `workspace.link` path reaches a worktree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkMode {
    /// Symbolic links to the user's own files: shared, writes included.
    #[default]
    Symlink,
    /// A copy-on-write clone (reflink): the worktree's own copy; a symlink where the file system
    /// cannot clone.
    Clone,
}

impl Default for WorkspaceConfig {
    fn default() -> Self {
        WorkspaceConfig {
            isolation: Isolation::Auto,
            branch_prefix: "orchestrate/".into(),
            merge: MergeMode::Apply,
            keep: false,
            pool_idle_seconds: 60,
            min_free_disk_mb: 1024,
            setup: vec![],
            setup_timeout_seconds: 600,
            link: vec![],
            link_mode: LinkMode::Symlink,
        }
    }
}

/// Why `path` cannot be a `workspace.link` entry, if it cannot: it must name something inside the
/// work tree, by a plain relative path, and not git's own folder.
pub fn link_path_problem(path: &str) -> Option<&'static str> {
    let p = Path::new(path);
    if path.trim().is_empty() {
        return Some("must not be empty");
    }
    if p.is_absolute() {
        return Some("must be relative to the top of the git work tree, not absolute");
    }
    if !p
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)))
    {
        return Some("must be a plain relative path inside the work tree (no `..` or `.` parts)");
    }
    if p.components()
        .next()
        .is_some_and(|c| c.as_os_str() == ".git")
    {
        return Some("must not be inside `.git`");
    }
    None
}

impl WorkspaceConfig {
    /// `setup`, `setup_timeout_seconds` and `link`; errors are `(key, message)`.
    fn check(&self) -> Result<(), (String, String)> {
        for (i, c) in self.setup.iter().enumerate() {
            if c.trim().is_empty() {
                return Err((
                    format!("workspace.setup[{i}]"),
                    "must be a shell command, not empty".into(),
                ));
            }
        }
        if self.setup_timeout_seconds == 0 {
            return Err((
                "workspace.setup_timeout_seconds".into(),
                "must be at least 1".into(),
            ));
        }
        for (i, l) in self.link.iter().enumerate() {
            let key = format!("workspace.link[{i}]");
            if let Some(why) = link_path_problem(l) {
                return Err((key, format!("`{l}` {why}")));
            }
            // One path inside another would link the inner one twice (or over the outer link).
            let inner = self.link[..i].iter().find(|o| {
                let (a, b) = (Path::new(o.as_str()), Path::new(l.as_str()));
                a.starts_with(b) || b.starts_with(a)
            });
            if let Some(o) = inner {
                return Err((key, format!("`{l}` overlaps `{o}`, listed before it")));
            }
        }
        Ok(())
    }
}

/// A `check_timeout_minutes` must be a positive number when given.
fn check_timeout_ok(key: &str, v: Option<f64>) -> Result<(), (String, String)> {
    match v {
        Some(m) if !(m > 0.0 && m.is_finite()) => {
            Err((key.into(), "must be a positive number".into()))
        }
        _ => Ok(()),
    }
}

/// Why `prefix` cannot start a branch name, if it cannot (git's `check-ref-format` rules that a
/// prefix can break on its own).
pub fn branch_prefix_problem(prefix: &str) -> Option<&'static str> {
    if prefix.is_empty() {
        return Some("must not be empty");
    }
    if prefix.starts_with('/') || prefix.starts_with('-') || prefix.starts_with('.') {
        return Some("must not start with `/`, `-` or `.`");
    }
    if prefix.contains("..")
        || prefix.contains("//")
        || prefix.contains("@{")
        || prefix.contains("/.")
    {
        return Some("must not contain `..`, `//`, `/.` or `@{`");
    }
    if prefix
        .chars()
        .any(|c| c.is_control() || c.is_whitespace() || "~^:?*[\\".contains(c))
    {
        return Some("must not contain spaces, control characters or any of ~ ^ : ? * [ \\");
    }
    None
}

impl Config {
    /// Load `path` if it exists, else the embedded default. `root` anchors relative paths.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let (text, source) = match std::fs::read_to_string(path) {
            Ok(t) => (t, path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (
                DEFAULT_CONFIG.to_string(),
                "<built-in default config>".into(),
            ),
            Err(e) => {
                return Err(ConfigError::Read {
                    path: path.display().to_string(),
                    source: e,
                });
            }
        };
        Self::parse(&text, &source)
    }

    pub fn parse(text: &str, source: &str) -> Result<Config, ConfigError> {
        let mut cfg: Config = if text.trim().is_empty() {
            Config::default()
        } else {
            serde_saphyr::from_str_with_options(text, crate::yaml::options()).map_err(|e| {
                let mut err = ConfigError::from_yaml(source, &e);
                if let ConfigError::Yaml { problem, .. } = &mut err
                    && let Some(h) = hint(text, &problem.message, problem.line)
                {
                    problem.message = format!("{}; {h}", problem.message);
                }
                err
            })?
        };
        cfg.expand_env();
        cfg.compile()
            .map_err(|(key, message)| ConfigError::Invalid {
                source_name: source.to_string(),
                line: find_key_line(text, &key),
                key,
                message,
            })?;
        Ok(cfg)
    }

    fn expand_env(&mut self) {
        match &self.database.url {
            // Written in the file: that is the answer, even when it expands to nothing (`url: ""` turns
            // the PostgreSQL mirror off).
            Some(url) => {
                let v = expand_vars(url);
                self.database.url = if v.trim().is_empty() { None } else { Some(v) };
            }
            // Not written at all: the conventional environment variable.
            None => {
                self.database.url = std::env::var("DATABASE_URL")
                    .ok()
                    .filter(|v| !v.trim().is_empty());
            }
        }
        for agent in self.agents.values_mut() {
            for v in agent.env.values_mut() {
                *v = expand_vars(v);
            }
        }
        notify::expand_env(&mut self.notify);
    }

    /// Check every value, and keep what had to be compiled to check it. Errors are `(key, message)`.
    fn compile(&mut self) -> Result<(), (String, String)> {
        if let Some(url) = &self.database.url
            && let Err(e) = url.parse::<tokio_postgres::Config>()
        {
            return Err((
                "database.url".into(),
                format!(
                    "invalid database URL: {e} (supported sslmode values: disable, prefer, require)"
                ),
            ));
        }
        if !valid_schema(&self.database.schema) {
            return Err((
                "database.schema".into(),
                "must be a lowercase SQL identifier (letters, digits, `_`; not starting with a digit)".into(),
            ));
        }
        if let Some(why) = branch_prefix_problem(&self.workspace.branch_prefix) {
            return Err(("workspace.branch_prefix".into(), why.into()));
        }
        self.workspace.check()?;
        self.cluster.check(self.database.url.as_deref())?;
        let o = &self.orchestrator;
        if o.max_concurrent == 0 {
            return Err((
                "orchestrator.max_concurrent".into(),
                "must be at least 1".into(),
            ));
        }
        if o.rescan_seconds == 0 {
            return Err((
                "orchestrator.rescan_seconds".into(),
                "must be at least 1".into(),
            ));
        }
        if !(o.kill_grace_seconds >= 0.0 && o.kill_grace_seconds.is_finite()) {
            return Err((
                "orchestrator.kill_grace_seconds".into(),
                "must be a non-negative number".into(),
            ));
        }
        if !["error", "warn", "info", "debug"].contains(&o.log_level.as_str()) {
            return Err((
                "orchestrator.log_level".into(),
                format!("`{}` is not one of error, warn, info, debug", o.log_level),
            ));
        }
        let zone = parse_zone(&o.timezone).map_err(|e| ("orchestrator.timezone".to_string(), e))?;
        if let Some(b) = &o.budget {
            b.check("orchestrator.budget")?;
        }
        self.orchestrator.utc_offset = Some(zone);
        if self.context.max_diff_seconds == 0 {
            return Err((
                "context.max_diff_seconds".into(),
                "must be at least 1".into(),
            ));
        }
        let q = &self.task_queue;
        for (k, v) in [
            ("task_queue.timeout_minutes", q.timeout_minutes),
            ("task_queue.retry_delay_seconds", q.retry_delay_seconds),
            ("task_queue.aging_minutes", q.aging_minutes),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err((k.into(), "must be a non-negative number".into()));
            }
        }
        let mut notes = Vec::new();
        for (name, a) in &self.agents {
            if !crate::task::valid_name(name) {
                return Err((
                    format!("agents.{name}"),
                    "agent names may use letters, digits, `.`, `_` and `-` only".into(),
                ));
            }
            if a.max_instances == 0 {
                return Err((
                    format!("agents.{name}.max_instances"),
                    "must be at least 1".into(),
                ));
            }
            if a.kind == AgentKind::Command && a.command.is_none() {
                return Err((
                    format!("agents.{name}.command"),
                    "a `command` agent needs the program to run".into(),
                ));
            }
            // `command: "claude --flag"` (a shape people copy from elsewhere) names no program: the
            // agent would be "not found" at run time. A path that exists may have spaces.
            if let Some(cmd) = &a.command
                && let Some((program, flags)) = cmd.trim().split_once(char::is_whitespace)
                && !Path::new(cmd).exists()
            {
                let flags: Vec<&str> = flags.split_whitespace().collect();
                return Err((
                    format!("agents.{name}.command"),
                    format!(
                        "`{cmd}` is a program with flags: put the program in `command: {program}` and the flags in `args: [{}]`; \
                         permission modes have their own key, `permissions` (and `--dangerously-skip-permissions` as root needs \
                         `IS_SANDBOX: \"1\"` under the agent's `env`)",
                        flags.join(", ")
                    ),
                ));
            }
            if a.kind == AgentKind::Openai {
                for (key, v) in [("base_url", &a.base_url), ("model", &a.model)] {
                    if v.as_deref().is_none_or(|v| v.trim().is_empty()) {
                        return Err((
                            format!("agents.{name}.{key}"),
                            format!("an `openai` agent needs `{key}`"),
                        ));
                    }
                }
            }
            if let Some(p) = &a.prices
                && [
                    p.input_per_mtok,
                    p.output_per_mtok,
                    p.cached_input_per_mtok.unwrap_or(0.0),
                ]
                .iter()
                .any(|v| !(*v >= 0.0 && v.is_finite()))
            {
                return Err((
                    format!("agents.{name}.prices"),
                    "prices must be non-negative numbers (USD per million tokens)".into(),
                ));
            }
            if let Some(p) = &a.permissions {
                let allowed = a.kind.permission_modes();
                if !allowed.contains(&p.as_str()) {
                    return Err((
                        format!("agents.{name}.permissions"),
                        if allowed.is_empty() {
                            format!("a `{}` agent has no permissions setting", a.kind.as_str())
                        } else {
                            format!(
                                "`{p}` is not a {} permission mode (one of: {})",
                                a.kind.as_str(),
                                allowed.join(", ")
                            )
                        },
                    ));
                }
            }
            check_timeout_ok(
                &format!("agents.{name}.check_timeout_minutes"),
                a.check_timeout_minutes,
            )?;
            if let Some(b) = &a.budget {
                b.check(&format!("agents.{name}.budget"))?;
            }
            notes.extend(permission_args_note(name, a)?);
        }
        check_timeout_ok(
            "routing.check_timeout_minutes",
            self.routing.check_timeout_minutes,
        )?;
        self.notes = notes;
        let known = |n: &str| self.agents.contains_key(n);
        for (i, n) in self.routing.fallback.iter().enumerate() {
            if !known(n) {
                return Err((
                    format!("routing.fallback[{i}]"),
                    format!("unknown agent `{n}` (not under `agents`)"),
                ));
            }
        }
        // One pass, in rule order, so the first bad rule is the one reported.
        for (i, r) in self.routing.rules.iter_mut().enumerate() {
            if !self.agents.contains_key(&r.agent) {
                return Err((
                    format!("routing.rules[{i}].agent"),
                    format!("unknown agent `{}`", r.agent),
                ));
            }
            r.regex = match &r.matches {
                Some(re) => Some(regex::Regex::new(re).map_err(|e| {
                    (
                        format!("routing.rules[{i}].matches"),
                        format!("bad regex: {e}"),
                    )
                })?),
                None => None,
            };
        }
        if let Some(r) = &self.routing.router {
            match self.agents.get(&r.agent) {
                None => {
                    return Err((
                        "routing.router.agent".into(),
                        format!("unknown agent `{}`", r.agent),
                    ));
                }
                Some(a) if a.kind != AgentKind::Openai => {
                    return Err((
                        "routing.router.agent".into(),
                        format!(
                            "the router must be an `openai` agent; `{}` is `{}`",
                            r.agent,
                            a.kind.as_str()
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
        self.security.review_globs = globs("security.review_paths", &self.security.review_paths)?;
        self.context.diff_exclude_globs =
            globs("context.diff_exclude", &self.context.diff_exclude)?;
        notify::check(&mut self.notify, &self.agents)?;
        Ok(())
    }

    /// The project's paths, with the configured folders taken from `root` when relative.
    pub fn layout(&self, root: &Path) -> Layout {
        let o = &self.orchestrator;
        Layout::new(root, &o.tasks_dir, &o.context_dir, &o.state_dir)
    }

    /// Every environment variable whose value is a secret: `security.secrets`, each agent's
    /// `api_key_env`, and the conventional key variable of each configured agent's kind (API keys
    /// are secrets whether or not someone listed them).
    pub fn secret_names(&self) -> Vec<String> {
        let mut names = self.security.secrets.clone();
        for a in self.agents.values() {
            names.extend(a.api_key_env.clone());
            names.extend(a.kind.key_var().map(String::from));
        }
        // A webhook's URL, headers and secret are credentials (a Slack URL is one by itself).
        for c in &self.notify {
            names.extend(c.webhook.iter().flat_map(|w| w.secret_vars.clone()));
        }
        names.sort();
        names.dedup();
        names
    }

    /// The configured agents' names, comma-separated, for errors that name an unknown one.
    pub fn agent_names(&self) -> String {
        self.agents.keys().cloned().collect::<Vec<_>>().join(", ")
    }

    /// The one redactor for this configuration, from the current values of [`Config::secret_names`].
    pub fn redactor(&self) -> Redactor {
        Redactor::from_env(&self.secret_names())
    }

    /// Timeout for one attempt of a task on an agent: the task's own, else the agent's, else the queue's.
    pub fn attempt_timeout(
        &self,
        task_minutes: Option<f64>,
        agent: &AgentConfig,
    ) -> std::time::Duration {
        let secs = match (task_minutes, agent.timeout_seconds) {
            (Some(m), _) => m * 60.0,
            (None, Some(s)) => s as f64,
            (None, None) => self.task_queue.timeout_minutes * 60.0,
        };
        std::time::Duration::from_secs_f64(secs.clamp(0.001, 1e9))
    }

    /// The check an attempt of `task` on `agent` runs after the agent: the first `check` set by the
    /// task, the agent, `routing`; one set to `""` means none. Its time limit comes the same way
    /// from `check_timeout_minutes`, else [`DEFAULT_CHECK_TIMEOUT_MINUTES`].
    pub fn check_for(&self, task: &crate::task::TaskFile, agent: &AgentConfig) -> Option<Check> {
        let command = task
            .check
            .as_ref()
            .or(agent.check.as_ref())
            .or(self.routing.check.as_ref())?;
        if command.trim().is_empty() {
            return None;
        }
        let minutes = task
            .check_timeout_minutes
            .or(agent.check_timeout_minutes)
            .or(self.routing.check_timeout_minutes)
            .unwrap_or(DEFAULT_CHECK_TIMEOUT_MINUTES);
        Some(Check {
            command: command.clone(),
            timeout: std::time::Duration::from_secs_f64((minutes * 60.0).clamp(0.001, 1e9)),
        })
    }

    /// How long an attempt on `agent` may go without progress before it is stopped as `stalled`;
    /// `None` when it is not watched. The agent's own `stall_timeout_seconds` decides when set (0:
    /// off). Otherwise the queue's default applies only to agents whose output shows progress
    /// (`streams_progress`): a CLI that prints its answer only at the end is silent while it works,
    /// and its workdir alone would call a long read-only task stalled.
    pub fn stall_timeout(
        &self,
        agent: &AgentConfig,
        streams_progress: bool,
    ) -> Option<std::time::Duration> {
        let secs = match agent.stall_timeout_seconds {
            Some(s) => s,
            None if streams_progress => self.task_queue.stall_timeout_seconds,
            None => 0,
        };
        (secs > 0).then(|| std::time::Duration::from_secs(secs))
    }
}

/// A permission flag in an agent's `args` is the user's choice and wins (the adapter leaves its own
/// out); this says which `permissions` value means the same, as a note. A flag without its value,
/// two flags that disagree, or a flag that disagrees with `permissions` is an error: only the flag
/// would reach the CLI, and the key would be silently ignored.
fn permission_args_note(name: &str, a: &AgentConfig) -> Result<Option<String>, (String, String)> {
    let found = a.permission_args();
    let Some(first) = found.first() else {
        return Ok(None);
    };
    let modes = a.kind.permission_modes().join(", ");
    let args_key = format!("agents.{name}.args");
    if let Some(x) = found.iter().find(|x| x.mode.is_none()) {
        return Err((
            args_key,
            format!(
                "`{}` is the last argument: its value is missing (one of: {modes})",
                x.written
            ),
        ));
    }
    if let Some(x) = found.iter().find(|x| x.mode != first.mode) {
        return Err((
            args_key,
            format!(
                "`{}` and `{}` set different permission modes; keep one",
                first.written, x.written
            ),
        ));
    }
    let mode = first.mode.as_deref().unwrap_or_default();
    let written = &first.written;
    match &a.permissions {
        Some(p) if p != mode => Err((
            format!("agents.{name}.permissions"),
            format!(
                "`permissions: {p}` and `{written}` in `{args_key}` disagree: orchestrate passes the flag in `args` \
                 and not the key, so keep one of them"
            ),
        )),
        Some(p) => Ok(Some(format!(
            "{args_key} sets `{written}`, which chooses `{p}` already: orchestrate passes the flag and not \
             the key, so `permissions: {p}` can go."
        ))),
        None => {
            let yours = match first.flag.value {
                FlagValue::Follows => "your value",
                FlagValue::Means(_) | FlagValue::Implies(_) => "your flag",
            };
            let then =
                format!("{args_key} sets `{written}`; orchestrate passes {yours} and not its own.");
            Ok(Some(match first.flag.value {
                _ if !a.kind.permission_modes().contains(&mode) => format!(
                    "{then} `{mode}` is not a value the `permissions` key knows (one of: {modes}), so `args` is the place for it."
                ),
                FlagValue::Implies(_) => format!(
                    "{then} The config key `permissions: {mode}` chooses the same mode, without the rest of what `{}` does.",
                    first.flag.flag
                ),
                FlagValue::Follows | FlagValue::Means(_) => {
                    format!("{then} The config key `permissions: {mode}` says the same.")
                }
            }))
        }
    }
}

/// What to write instead, for keys people bring from other tools' configs (and the specification
/// orchestrate grew from), and for an agent without `kind`. `line` is where the parser stopped.
fn hint(text: &str, message: &str, line: Option<usize>) -> Option<String> {
    if message.starts_with("missing field `kind`") {
        return Some(
            "every agent needs `kind`: one of command, claude, codex, gemini, cursor, openai"
                .into(),
        );
    }
    let field = message.strip_prefix("unknown field `")?.split('`').next()?;
    // The section is the nearest unindented key at or above the line.
    let section = text
        .lines()
        .take(line?)
        .filter(|l| !l.starts_with([' ', '\t', '#', '-']) && l.contains(':'))
        .last()?
        .split(':')
        .next()?
        .trim();
    Some(match (section, field) {
        ("task_queue", "database") => "the SQLite mirror is always `state_dir/state.db` (see `orchestrator.state_dir`); PostgreSQL is `database.url`".into(),
        ("context", "directory") => "the context folder is `orchestrator.context_dir`".into(),
        ("context", "update_on_completion") => "context files are always updated when a task finishes; remove this key".into(),
        _ => return None,
    })
}

fn globs(key: &str, patterns: &[String]) -> Result<Vec<glob::Pattern>, (String, String)> {
    patterns
        .iter()
        .enumerate()
        .map(|(i, g)| {
            glob::Pattern::new(g).map_err(|e| (format!("{key}[{i}]"), format!("bad glob: {e}")))
        })
        .collect()
}

/// A PostgreSQL schema name orchestrate accepts: a lowercase identifier that needs no quoting.
pub fn valid_schema(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
}

/// Expand `${VAR}` from the environment; an unset variable expands to nothing.
pub fn expand_vars(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        match rest[i + 2..].find('}') {
            Some(j) => {
                let name = &rest[i + 2..i + 2 + j];
                out.push_str(&std::env::var(name).unwrap_or_default());
                rest = &rest[i + 3 + j..];
            }
            None => {
                out.push_str(&rest[i..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// Best-effort line number of a dotted key (`a.b[2].c`) in the YAML text, for validation errors
/// that serde cannot place.
fn find_key_line(text: &str, key: &str) -> Option<usize> {
    let last = key.rsplit('.').next()?;
    let last = last.split('[').next()?;
    let mut found = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_start().trim_start_matches("- ");
        if t.starts_with(&format!("{last}:"))
            || t.contains(&format!("{{{last}:"))
            || t.contains(&format!(" {last}:"))
        {
            found = Some(i + 1);
            if t.starts_with(&format!("{last}:")) {
                break;
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_from_elsewhere_get_a_hint() {
        let err = |text: &str| Config::parse(text, "c.yaml").unwrap_err().to_string();
        let e = err("task_queue:\n  max_retries: 2\n  database: sqlite:///x.db\n");
        assert!(e.starts_with("c.yaml:3:3: unknown field `database`"), "{e}");
        assert!(
            e.contains("`state_dir/state.db`") && e.contains("`database.url`"),
            "{e}"
        );
        let e = err("context:\n  directory: ./context\n");
        assert!(e.contains("`orchestrator.context_dir`"), "{e}");
        let e = err("context:\n  update_on_completion: true\n");
        assert!(e.contains("always updated"), "{e}");
        let e = err("agents:\n  a:\n    command: x\n");
        assert!(
            e.contains("missing field `kind`; every agent needs `kind`: one of command, claude"),
            "{e}"
        );
        // Other unknown keys keep the parser's message alone.
        let e = err("orchestrator:\n  nope: 1\n");
        assert!(!e.contains(';'), "{e}");
    }

    #[test]
    fn a_command_with_flags_in_it_is_refused_with_the_fix() {
        let e = Config::parse(
            "agents:\n  claude:\n    kind: claude\n    command: \"claude --dangerously-skip-permissions\"\n",
            "c.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("c.yaml:4: `agents.claude.command`"), "{e}");
        assert!(
            e.contains("`command: claude`")
                && e.contains("`args: [--dangerously-skip-permissions]`"),
            "{e}"
        );
        assert!(
            e.contains("`permissions`") && e.contains("IS_SANDBOX"),
            "{e}"
        );
    }

    fn agent(kind: &str, extra: &str) -> String {
        format!("agents:\n  a:\n    kind: {kind}\n{extra}")
    }

    #[test]
    fn a_permission_flag_in_args_is_accepted_with_a_note_naming_the_key() {
        for (kind, args, written, key) in [
            (
                "codex",
                "[--sandbox, workspace-write]",
                "--sandbox workspace-write",
                "permissions: workspace-write",
            ),
            (
                "codex",
                "[-sread-only]",
                "-sread-only",
                "permissions: read-only",
            ),
            (
                "codex",
                "[--dangerously-bypass-approvals-and-sandbox]",
                "--dangerously-bypass-approvals-and-sandbox",
                "permissions: danger-full-access",
            ),
            (
                "claude",
                "[--permission-mode=plan]",
                "--permission-mode=plan",
                "permissions: plan",
            ),
            (
                "claude",
                "[--dangerously-skip-permissions]",
                "--dangerously-skip-permissions",
                "permissions: bypassPermissions",
            ),
            ("gemini", "[-y]", "-y", "permissions: yolo"),
            (
                "gemini",
                "[--approval-mode, auto_edit]",
                "--approval-mode auto_edit",
                "permissions: auto_edit",
            ),
            ("cursor", "[--force]", "--force", "permissions: force"),
        ] {
            let cfg = Config::parse(&agent(kind, &format!("    args: {args}\n")), "c.yaml")
                .unwrap_or_else(|e| panic!("{kind} {args}: {e}"));
            assert_eq!(cfg.notes.len(), 1, "{kind} {args}: {:?}", cfg.notes);
            let n = &cfg.notes[0];
            assert!(
                n.starts_with(&format!(
                    "agents.a.args sets `{written}`; orchestrate passes your"
                )),
                "{n}"
            );
            assert!(n.contains(&format!("`{key}` says the same")), "{n}");
        }
        // A flag that does more than the key can say is not called the same.
        let cfg = Config::parse(&agent("codex", "    args: [--approve-for-me]\n"), "c.yaml")
            .expect("valid");
        assert!(
            cfg.notes[0]
                .contains("`permissions: workspace-write` chooses the same mode, without the rest"),
            "{:?}",
            cfg.notes
        );
        // A mode the key does not know is the user's to pass.
        let cfg = Config::parse(
            &agent("claude", "    args: [--permission-mode, newMode]\n"),
            "c.yaml",
        )
        .expect("valid");
        assert!(
            cfg.notes[0].contains("`newMode` is not a value the `permissions` key knows"),
            "{:?}",
            cfg.notes
        );
        // The same choice in both places: valid, and the key is redundant.
        let cfg = Config::parse(
            &agent(
                "codex",
                "    permissions: read-only\n    args: [--sandbox=read-only]\n",
            ),
            "c.yaml",
        )
        .expect("valid");
        assert_eq!(
            cfg.notes,
            [
                "agents.a.args sets `--sandbox=read-only`, which chooses `read-only` already: orchestrate passes \
              the flag and not the key, so `permissions: read-only` can go."
            ]
        );
    }

    #[test]
    fn args_without_a_permission_flag_give_no_note() {
        for (kind, args) in [
            // Not permission flags, though they begin like one or sit after `--`.
            ("codex", "[--sandboxes, x, --model, m]"),
            ("codex", "[--, --sandbox, read-only]"),
            ("gemini", "[--yolo-mode]"),
            ("cursor", "[--format, json]"),
            ("command", "[--force]"),
        ] {
            let text = if kind == "command" {
                agent(kind, &format!("    command: x\n    args: {args}\n"))
            } else {
                agent(kind, &format!("    args: {args}\n"))
            };
            let cfg = Config::parse(&text, "c.yaml").unwrap_or_else(|e| panic!("{e}"));
            assert!(cfg.notes.is_empty(), "{kind} {args}: {:?}", cfg.notes);
            assert!(!cfg.agents["a"].args_set_permissions(), "{kind} {args}");
        }
        assert!(
            Config::parse(DEFAULT_CONFIG, "config.yaml")
                .expect("valid")
                .notes
                .is_empty()
        );
    }

    #[test]
    fn a_permission_flag_that_contradicts_is_an_error_naming_both() {
        let err = |text: String| Config::parse(&text, "c.yaml").unwrap_err().to_string();
        let e = err(agent(
            "codex",
            "    permissions: read-only\n    args: [--sandbox, workspace-write]\n",
        ));
        assert!(e.starts_with("c.yaml:4: `agents.a.permissions`"), "{e}");
        assert!(
            e.ends_with(
                "`permissions: read-only` and `--sandbox workspace-write` in `agents.a.args` disagree: \
                 orchestrate passes the flag in `args` and not the key, so keep one of them"
            ),
            "{e}"
        );
        let e = err(agent(
            "cursor",
            "    permissions: default\n    args: [-f]\n",
        ));
        assert!(
            e.contains("`permissions: default` and `-f` in `agents.a.args` disagree"),
            "{e}"
        );
        let e = err(agent(
            "gemini",
            "    args: [--approval-mode, plan, --yolo]\n",
        ));
        assert!(e.contains("`agents.a.args`"), "{e}");
        assert!(
            e.contains("`--approval-mode plan` and `--yolo` set different permission modes"),
            "{e}"
        );
        let e = err(agent("claude", "    args: [--permission-mode]\n"));
        assert!(
            e.contains("`--permission-mode` is the last argument: its value is missing (one of: acceptEdits"),
            "{e}"
        );
    }

    #[test]
    fn a_check_is_the_tasks_else_the_agents_else_routings_and_empty_turns_it_off() {
        let text = "agents:\n  a: {kind: command, command: x, check: 'agent', check_timeout_minutes: 2}\n  \
                    b: {kind: command, command: x}\nrouting:\n  check: 'routing'\n";
        let cfg = Config::parse(text, "c.yaml").expect("valid");
        let task = |yaml: &str| {
            crate::task::parse_task(&format!("description: d\n{yaml}"), "t", "t.yaml")
                .expect("valid task")
                .file
        };
        let check = |t: &str, agent: &str| cfg.check_for(&task(t), &cfg.agents[agent]);
        let mins = |m: f64| std::time::Duration::from_secs_f64(m * 60.0);
        let c = check("check: own\n", "a").expect("a check");
        assert_eq!((c.command.as_str(), c.timeout), ("own", mins(2.0)));
        let c = check("check: own\ncheck_timeout_minutes: 0.5\n", "a").expect("a check");
        assert_eq!(c.timeout, mins(0.5));
        assert_eq!(check("", "a").expect("a check").command, "agent");
        let c = check("", "b").expect("a check");
        assert_eq!((c.command.as_str(), c.timeout), ("routing", mins(10.0)));
        assert_eq!(check("check: ''\n", "a"), None);
        let none =
            Config::parse("agents:\n  b: {kind: command, command: x}\n", "c.yaml").expect("valid");
        assert_eq!(none.check_for(&task(""), &none.agents["b"]), None);
        let e = Config::parse("routing:\n  check_timeout_minutes: -1\n", "c.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("routing.check_timeout_minutes"), "{e}");
    }

    #[test]
    fn the_stall_timeout_is_the_agents_own_else_the_queues_for_agents_that_print_as_they_work() {
        let text = "agents:\n  a: {kind: command, command: x}\n  b: {kind: command, command: x, stall_timeout_seconds: 0}\n  c: {kind: claude, stall_timeout_seconds: 90}\n  d: {kind: claude}\n";
        let cfg = Config::parse(text, "c.yaml").expect("valid");
        let secs = |s: u64| Some(std::time::Duration::from_secs(s));
        assert_eq!(cfg.stall_timeout(&cfg.agents["a"], true), secs(600));
        assert_eq!(cfg.stall_timeout(&cfg.agents["b"], true), None);
        assert_eq!(cfg.stall_timeout(&cfg.agents["c"], false), secs(90));
        assert_eq!(cfg.stall_timeout(&cfg.agents["d"], false), None);
        let off = Config::parse(
            &format!("{text}task_queue: {{stall_timeout_seconds: 0}}\n"),
            "c.yaml",
        )
        .expect("valid");
        assert_eq!(off.stall_timeout(&off.agents["a"], true), None);
        assert_eq!(off.stall_timeout(&off.agents["c"], false), secs(90));
    }

    #[test]
    fn default_config_parses_and_validates() {
        let cfg = Config::parse(DEFAULT_CONFIG, "config.yaml").expect("default config is valid");
        assert!(cfg.agents.contains_key("shell"));
        assert!(cfg.orchestrator.max_concurrent >= 1);
    }

    #[test]
    fn built_in_defaults_are_what_config_yaml_shows() {
        // config.yaml promises that a key left out takes the value it shows.
        let shown = Config::parse(DEFAULT_CONFIG, "config.yaml").expect("valid");
        let bare = Config::default();
        let j = |v: serde_json::Result<serde_json::Value>| v.expect("serializes");
        assert_eq!(
            j(serde_json::to_value(&shown.orchestrator)),
            j(serde_json::to_value(&bare.orchestrator))
        );
        assert_eq!(
            j(serde_json::to_value(&shown.task_queue)),
            j(serde_json::to_value(&bare.task_queue))
        );
        assert_eq!(
            j(serde_json::to_value(&shown.security)),
            j(serde_json::to_value(&bare.security))
        );
        assert_eq!(
            j(serde_json::to_value(&shown.context)),
            j(serde_json::to_value(&bare.context))
        );
        assert_eq!(
            j(serde_json::to_value(&shown.workspace)),
            j(serde_json::to_value(&bare.workspace))
        );
    }

    #[test]
    fn budgets_and_the_time_zone_are_checked_naming_the_key() {
        let agent = |budget: &str| {
            format!("agents:\n  a:\n    kind: command\n    command: sh\n    budget: {budget}\n")
        };
        let cfg = Config::parse(
            &format!(
                "orchestrator:\n  timezone: \"+02:00\"\n  budget: {{monthly_usd: 300}}\n{}",
                agent("{daily_usd: 20, daily_tokens: 1000}")
            ),
            "c.yaml",
        )
        .expect("valid");
        assert_eq!(cfg.orchestrator.zone(), time::macros::offset!(+2));
        assert_eq!(
            cfg.orchestrator.budget.and_then(|b| b.monthly_usd),
            Some(300.0)
        );
        assert_eq!(
            cfg.agents["a"].budget.and_then(|b| b.daily_tokens),
            Some(1000)
        );
        assert_eq!(Config::default().orchestrator.zone(), time::UtcOffset::UTC);
        for (text, key, why) in [
            (
                agent("{daily_usd: 0}"),
                "agents.a.budget.daily_usd",
                "positive number",
            ),
            (
                agent("{monthly_usd: .nan}"),
                "agents.a.budget.monthly_usd",
                "positive number",
            ),
            (
                agent("{daily_tokens: 0}"),
                "agents.a.budget.daily_tokens",
                "at least 1",
            ),
            (agent("{}"), "agents.a.budget", "names no limit"),
            (
                "orchestrator:\n  budget: {monthly_usd: -1}\n".into(),
                "orchestrator.budget.monthly_usd",
                "positive number",
            ),
            (
                "orchestrator:\n  timezone: Europe/Berlin\n".into(),
                "orchestrator.timezone",
                "fixed offset such as +02:00",
            ),
        ] {
            let e = Config::parse(&text, "c.yaml").unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(why), "{text}: {e}");
        }
        // An unknown limit is named with its line.
        let e = Config::parse(&agent("{daily_dollars: 5}"), "c.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("daily_dollars") && e.contains("c.yaml:5"), "{e}");
    }

    #[test]
    fn workspace_keys_are_checked() {
        let e = Config::parse("workspace:\n  isolation: sometimes\n", "c.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("c.yaml:2"), "{e}");
        let e = Config::parse("workspace:\n  branch_prefix: \"a b/\"\n", "c.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("workspace.branch_prefix"), "{e}");
        assert!(e.contains("spaces"), "{e}");
        let cfg = Config::parse(
            "workspace:\n  isolation: none\n  merge: branch\n  keep: true\n",
            "c.yaml",
        )
        .unwrap();
        assert_eq!(cfg.workspace.isolation, Isolation::None);
        assert_eq!(cfg.workspace.merge, MergeMode::Branch);
        assert!(cfg.workspace.keep);
        assert_eq!(cfg.workspace.min_free_disk_mb, 1024, "the default floor");
        let e = Config::parse("workspace:\n  min_free_disk_mb: -5\n", "c.yaml")
            .unwrap_err()
            .to_string();
        // Where it is and what is wrong, as for every number.
        assert!(e.contains("c.yaml:2:21"), "{e}");
        assert!(e.contains("invalid u64"), "{e}");
        let cfg = Config::parse("workspace:\n  min_free_disk_mb: 0\n", "c.yaml").unwrap();
        assert_eq!(cfg.workspace.min_free_disk_mb, 0);
    }

    #[test]
    fn setup_and_link_are_checked_naming_the_entry() {
        let err = |text: &str| Config::parse(text, "c.yaml").unwrap_err().to_string();
        let e = err("workspace:\n  link: [node_modules, ../cache]\n");
        assert!(e.contains("c.yaml:2"), "{e}");
        assert!(e.contains("workspace.link[1]"), "{e}");
        assert!(e.contains("`../cache`") && e.contains("no `..`"), "{e}");
        let e = err("workspace:\n  link: [/srv/cache]\n");
        assert!(
            e.contains("workspace.link[0]") && e.contains("not absolute"),
            "{e}"
        );
        let e = err("workspace:\n  link: [.git/hooks]\n");
        assert!(e.contains("inside `.git`"), "{e}");
        let e = err("workspace:\n  link: [web, web/node_modules]\n");
        assert!(
            e.contains("workspace.link[1]") && e.contains("overlaps `web`"),
            "{e}"
        );
        let e = err("workspace:\n  setup: [\"npm ci\", \" \"]\n");
        assert!(
            e.contains("workspace.setup[1]") && e.contains("not empty"),
            "{e}"
        );
        let e = err("workspace:\n  setup_timeout_seconds: 0\n");
        assert!(e.contains("workspace.setup_timeout_seconds"), "{e}");
        let e = err("workspace:\n  link_mode: hardlink\n");
        assert!(e.contains("c.yaml:2"), "{e}");
        let cfg = Config::parse(
            "workspace:\n  setup: [\"npm ci\"]\n  link: [node_modules, .env]\n  link_mode: clone\n",
            "c.yaml",
        )
        .unwrap();
        assert_eq!(cfg.workspace.setup, vec!["npm ci".to_string()]);
        assert_eq!(cfg.workspace.link, vec!["node_modules", ".env"]);
        assert_eq!(cfg.workspace.link_mode, LinkMode::Clone);
        assert_eq!(cfg.workspace.setup_timeout_seconds, 600);
    }

    #[test]
    fn unknown_key_is_named_with_line() {
        let err = Config::parse("orchestrator:\n  max_concurent: 3\n", "c.yaml").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("max_concurent"), "{msg}");
        assert!(msg.contains("c.yaml:2:"), "{msg}");
    }

    #[test]
    fn unknown_fallback_agent_is_an_error() {
        let err = Config::parse("routing:\n  fallback: [nope]\n", "c.yaml").unwrap_err();
        assert!(err.to_string().contains("routing.fallback[0]"), "{err}");
        assert!(err.to_string().contains("c.yaml:2"), "{err}");
    }

    #[test]
    fn expands_env_vars() {
        // SAFETY: test-only; no other thread reads this variable.
        unsafe { std::env::set_var("ORCH_TEST_VAR", "abc") };
        assert_eq!(
            expand_vars("x${ORCH_TEST_VAR}y${ORCH_UNSET_VAR}z"),
            "xabcyz"
        );
    }
}
