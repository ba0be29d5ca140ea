//! The records orchestrate writes beside task files: the claim (`assigned/X.claim.yaml`), the history
//! a requeued task carries (`pending/.X.history.yaml`), each attempt, and the result
//! (`completed/X_result.yaml`, `failed/X_result.yaml`).
//!
//! These are orchestrate's own files, apart from the task file schema people write (`task`). Every
//! record is serialized through [`to_yaml`], which redacts the secrets in its free text (see
//! [`Record`]), and parsed through [`from_yaml`], which holds even our own files to YAML budgets (a
//! synced or hand-edited record may be anything), sized for records (`yaml::record_options`), not the
//! task files' budgets: a result must always read back. A result lists at most [`FILES_IN_RECORD`]
//! changed files; the whole list goes to a file beside the diff that the result names. This module
//! never touches the file system: the spool decides where records go.

use serde::{Deserialize, Serialize};

use crate::redact::Redactor;

/// How many changed (and review) files a result lists; more are counted, and listed in a file of
/// their own (`files_modified_file`), so a task that touched 200,000 files keeps a small record.
pub const FILES_IN_RECORD: usize = 1_000;

/// The largest record read back: a file bigger than this is not one orchestrate wrote.
pub const MAX_RECORD_BYTES: u64 = 64 * 1024 * 1024;

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Completed,
    AgentError,
    Timeout,
    Cancelled,
    /// The supervisor stopped gracefully while it ran; does not count against `max_retries`.
    Interrupted,
    /// The supervisor died while it ran (found at recovery); counts against `max_retries`.
    Lost,
    RateLimited,
    QuotaExhausted,
    /// The agent's credentials were refused, or it has none: it is marked "needs login" and the
    /// attempt does not count against `max_retries` (another try on the same agent fails the same way).
    Auth,
    BadOutput,
    /// Neither output nor a change in the workdir for `stall_timeout_seconds`: stopped like a timeout.
    Stalled,
    /// A `workspace.setup` command failed (or a `workspace.link` path could not be linked): the
    /// agent never ran.
    SetupFailed,
    /// The agent finished, but the task's `check` command did not pass: nothing landed, and the
    /// next attempt is told what the check printed.
    CheckFailed,
    /// The task's `max_cost_usd` was reached: the CLI stopped itself at the cap it was given
    /// (Claude Code's `--max-budget-usd`). The task is not retried.
    BudgetExhausted,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::AgentError => "agent_error",
            Outcome::Timeout => "timeout",
            Outcome::Cancelled => "cancelled",
            Outcome::Interrupted => "interrupted",
            Outcome::Lost => "lost",
            Outcome::RateLimited => "rate_limited",
            Outcome::QuotaExhausted => "quota_exhausted",
            Outcome::Auth => "auth",
            Outcome::BadOutput => "bad_output",
            Outcome::Stalled => "stalled",
            Outcome::SetupFailed => "setup_failed",
            Outcome::CheckFailed => "check_failed",
            Outcome::BudgetExhausted => "budget_exhausted",
        }
    }

    /// Whether this attempt uses up one of the task's retries. Rate limits, exhausted quotas and
    /// refused credentials are the agent's state, not the task's failure: retrying on that agent
    /// cannot help, so the agent rests (or needs a login) and the task goes to the next one.
    pub fn counts_as_failure(self) -> bool {
        !matches!(
            self,
            Outcome::Completed
                | Outcome::Interrupted
                | Outcome::RateLimited
                | Outcome::QuotaExhausted
                | Outcome::Auth
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Attempt {
    pub n: u32,
    pub agent: String,
    pub started_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tokens: Option<u64>,
    /// The part of `input_tokens` served from the provider's prompt cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// For rate limits: when the provider said the agent may be used again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_file: Option<String>,
    /// The task's `check`, when it ran after the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckRecord>,
    /// Cluster mode: the host that ran the attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// How an attempt's `check` command went.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckRecord {
    pub command: String,
    pub passed: bool,
    /// `None` when it was killed (time limit, cancel, shutdown) or could not start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub timed_out: bool,
    pub duration_ms: u64,
    /// Its output (`context/logs/<id>/attempt-<n>.check.log`), relative to the project root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_file: Option<String>,
}

impl Attempt {
    /// An attempt with only what every attempt has; the rest is filled in as it becomes known.
    pub fn new(n: u32, agent: &str, started_at: &str, outcome: Outcome) -> Attempt {
        Attempt {
            n,
            agent: agent.to_string(),
            started_at: started_at.to_string(),
            finished_at: None,
            duration_ms: None,
            exit_code: None,
            signal: None,
            outcome,
            error: None,
            cost_usd: None,
            input_tokens: None,
            output_tokens: None,
            cached_tokens: None,
            session_id: None,
            host: None,
            retry_at: None,
            log_file: None,
            check: None,
        }
    }
}

/// The agent a claim names when orchestrate itself finishes the task (a subtask parent, a fan-out's
/// pick): no agent runs, so a supervisor that dies meanwhile costs the task no retry.
pub const NO_AGENT: &str = "-";

/// The agent of a cluster attempt whose host died before it said which agent it ran: `?` is no
/// agent's name (names are letters, digits, `.`, `_` and `-`), so no agent's totals count it.
pub const UNKNOWN_AGENT: &str = "?";

/// `assigned/X.claim.yaml`: who runs the task, since when, and everything earlier attempts left.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claim {
    pub task_id: String,
    pub version: u64,
    pub host: String,
    pub pid: u32,
    pub boot_id: String,
    pub instance: String,
    pub attempt: u32,
    pub agent: String,
    pub started_at: String,
    pub heartbeat_at: String,
    #[serde(default)]
    pub history: Vec<Attempt>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chosen_because: Option<String>,
}

/// `pending/.X.history.yaml`: what a requeued task carries back to `pending/` (hidden from the whitelist).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct History {
    pub task_id: String,
    pub version: u64,
    #[serde(default)]
    pub attempts: Vec<Attempt>,
    /// Do not start the next attempt before this time (retry back-off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
    /// The back-off's length in seconds: a clock changed since `not_before` was written cannot
    /// make the wait longer than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Terminal {
    Completed,
    Failed,
}

impl Terminal {
    pub fn dir_name(self) -> &'static str {
        match self {
            Terminal::Completed => "completed",
            Terminal::Failed => "failed",
        }
    }
}

/// `completed/X_result.yaml` or `failed/X_result.yaml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskResult {
    pub task_id: String,
    pub status: Terminal,
    pub version: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    pub description: String,
    pub finished_at: String,
    #[serde(default)]
    pub attempts: Vec<Attempt>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff_file: Option<String>,
    /// The changed files, relative to the workdir: the first [`FILES_IN_RECORD`] of them.
    #[serde(default)]
    pub files_modified: Vec<String>,
    /// How many files changed in all, when that is more than `files_modified` lists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_modified_total: Option<u64>,
    /// The file listing every changed file, one a line (relative to the project root), when
    /// `files_modified` does not list them all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_modified_file: Option<String>,
    #[serde(default)]
    pub review_required: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub review_files: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chosen_because: Option<String>,
    /// Where the task ran and where its changes went, when it ran in a worktree. Boxed: most
    /// results have none, and results are moved around a lot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<Box<WorkspaceResult>>,
    /// A `fan_out` task's candidates and which of them won. Boxed as `workspace` is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fan_out: Option<Box<FanOutResult>>,
}

/// How a fan-out went: every candidate, the winner and why it was picked. Cost and tokens are the
/// sums over the candidates (the parent task ran no agent of its own).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FanOutResult {
    /// `first_pass`, `judge` or `all`.
    pub pick: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub winner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub picked_because: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tokens: Option<u64>,
    #[serde(default)]
    pub candidates: Vec<CandidateResult>,
}

/// One candidate of a fan-out, as the parent's result lists it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CandidateResult {
    /// The candidate's name (an agent, or a number).
    pub name: String,
    /// Its own task: `<id>.<name>`.
    pub task_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// `completed`, `failed`, or `cancelled` (another candidate won first).
    pub status: String,
    /// Its last attempt's check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Its branch, while it is kept (`pick: all`, or until it is merged or discarded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A worktree task's git facts: the commits its diff spans and how it landed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkspaceResult {
    /// `worktree` (the only value written today; `none` leaves no `workspace` in the result).
    pub isolation: String,
    /// The snapshot commit the worktree started from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    /// The task's own commit on `branch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<String>,
    /// `applied`, `committed`, `kept` or `conflict`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge: Option<String>,
    /// With `merge: conflict`: the files that did not apply.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<String>,
    /// Why landing could not even be tried (it failed, not conflicted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl TaskResult {
    /// A failure decided without (another) run: dependency failed, cycle, cancel, retries used up.
    pub fn failed(
        id: &str,
        version: u64,
        description: &str,
        attempts: Vec<Attempt>,
        error: String,
    ) -> TaskResult {
        TaskResult {
            task_id: id.to_string(),
            status: Terminal::Failed,
            version,
            agent: attempts.last().map(|a| a.agent.clone()),
            description: description.to_string(),
            finished_at: crate::fsutil::now_rfc3339(),
            attempts,
            output_file: None,
            diff_file: None,
            files_modified: vec![],
            files_modified_total: None,
            files_modified_file: None,
            review_required: false,
            review_files: vec![],
            error: Some(error),
            chosen_because: None,
            workspace: None,
            fan_out: None,
        }
    }

    /// Record the files a task changed and those a review is required for: the first
    /// [`FILES_IN_RECORD`] of each, and when there are more, how many and the file that lists them
    /// all (`list`, written beside the diff).
    pub fn set_files(&mut self, all: &[String], list: Option<String>, review: Vec<String>) {
        self.files_modified = all.iter().take(FILES_IN_RECORD).cloned().collect();
        if all.len() > FILES_IN_RECORD {
            self.files_modified_total = Some(all.len() as u64);
            self.files_modified_file = list;
        }
        self.review_required = !review.is_empty();
        self.review_files = review;
        self.review_files.truncate(FILES_IN_RECORD);
    }

    /// How many files the task changed in all.
    pub fn files_changed(&self) -> u64 {
        self.files_modified_total
            .unwrap_or(self.files_modified.len() as u64)
    }
}

/// A record whose free text may carry a secret (an agent's error, a session id, a description).
///
/// Redaction works on the fields, before serializing: replacing a secret in the YAML text would
/// rewrite ids, agent names and paths that happen to contain it, and a value that starts with it
/// would read back as a YAML alias (`***`), making the record unreadable.
pub trait Record: Serialize + Clone {
    fn redact(&mut self, r: &Redactor);
}

fn redact_opt(s: &mut Option<String>, r: &Redactor) {
    if let Some(v) = s.take() {
        *s = Some(r.redact_owned(v));
    }
}

impl Record for Attempt {
    fn redact(&mut self, r: &Redactor) {
        redact_opt(&mut self.error, r);
        redact_opt(&mut self.session_id, r);
        if let Some(c) = &mut self.check {
            c.command = r.redact_owned(std::mem::take(&mut c.command));
        }
    }
}

impl Record for Claim {
    fn redact(&mut self, r: &Redactor) {
        self.history.iter_mut().for_each(|a| a.redact(r));
        redact_opt(&mut self.chosen_because, r);
    }
}

impl Record for History {
    fn redact(&mut self, r: &Redactor) {
        self.attempts.iter_mut().for_each(|a| a.redact(r));
        redact_opt(&mut self.reason, r);
    }
}

impl Record for TaskResult {
    fn redact(&mut self, r: &Redactor) {
        self.description = r.redact_owned(std::mem::take(&mut self.description));
        self.attempts.iter_mut().for_each(|a| a.redact(r));
        redact_opt(&mut self.error, r);
        redact_opt(&mut self.chosen_because, r);
        for f in self
            .files_modified
            .iter_mut()
            .chain(self.review_files.iter_mut())
        {
            *f = r.redact_owned(std::mem::take(f));
        }
    }
}

/// Serialize one of our own records, secrets redacted. Every record the spool writes goes through
/// here. These types contain nothing serde-saphyr cannot represent.
pub fn to_yaml<T: Record>(v: &T, redactor: &Redactor) -> String {
    let text =
        |v: &T| serde_saphyr::to_string(v).expect("records are plain data and always serialize");
    if redactor.is_empty() {
        return text(v);
    }
    let mut v = v.clone();
    v.redact(redactor);
    text(&v)
}

/// Parse one of our own records (claims, results, histories): trusted but still budgeted, with the
/// budgets for records.
pub fn from_yaml<T: for<'de> Deserialize<'de>>(text: &str) -> Result<T, String> {
    serde_saphyr::from_str_with_options(text, crate::yaml::record_options())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let r = TaskResult {
            task_id: "t".into(),
            status: Terminal::Completed,
            version: 3,
            agent: Some("shell".into()),
            description: "multi\nline: with colon".into(),
            finished_at: "2026-01-01T00:00:00Z".into(),
            attempts: vec![Attempt {
                duration_ms: Some(5),
                exit_code: Some(0),
                ..Attempt::new(1, "shell", "2026-01-01T00:00:00Z", Outcome::Completed)
            }],
            output_file: None,
            diff_file: None,
            files_modified: vec!["a.txt".into()],
            files_modified_total: None,
            files_modified_file: None,
            review_required: false,
            review_files: vec![],
            error: None,
            chosen_because: None,
            workspace: Some(Box::new(WorkspaceResult {
                isolation: "worktree".into(),
                merge: Some("conflict".into()),
                conflicts: vec!["a.txt".into()],
                ..Default::default()
            })),
            fan_out: None,
        };
        let back: TaskResult = from_yaml(&to_yaml(&r, &Redactor::none())).expect("round trip");
        assert_eq!(back.description, r.description);
        assert_eq!(back.attempts, r.attempts);
        assert_eq!(back.workspace, r.workspace);
        // A result written before isolation existed still reads.
        let old = to_yaml(
            &TaskResult {
                workspace: None,
                ..r
            },
            &Redactor::none(),
        );
        assert!(!old.contains("workspace"), "{old}");
        let back: TaskResult = from_yaml(&old).expect("old record");
        assert_eq!(back.workspace, None);
    }

    #[test]
    fn a_result_of_a_task_that_changed_200000_files_is_small_and_reads_back() {
        let all: Vec<String> = (0..200_000).map(|i| format!("d{}/f{i}", i % 200)).collect();
        let mut r = TaskResult::failed("big", 3, "touch them all", vec![], "x".into());
        r.set_files(&all, Some("context/diffs/big.files.txt".into()), vec![]);
        let text = to_yaml(&r, &Redactor::none());
        let back: TaskResult = from_yaml(&text).expect("reads back");
        assert_eq!(back.files_modified.len(), FILES_IN_RECORD);
        assert_eq!(back.files_changed(), 200_000);
        assert_eq!(
            back.files_modified_file.as_deref(),
            Some("context/diffs/big.files.txt")
        );
        // A result written before the cap, listing every file, reads back too: the record budget
        // is not the task files' budget, which it would exceed.
        r.files_modified = all;
        let text = to_yaml(&r, &Redactor::none());
        let back: TaskResult = from_yaml(&text).expect("a legacy result reads back");
        assert_eq!(back.files_modified.len(), 200_000);
        let as_task: Result<TaskResult, _> =
            serde_saphyr::from_str_with_options(&text, crate::yaml::options());
        assert!(as_task.is_err(), "the task-file budget would refuse it");
    }

    #[test]
    fn redaction_touches_free_text_only_and_the_record_still_reads() {
        let r = Redactor::from_values(["ollama".to_string()]);
        let result = TaskResult {
            attempts: vec![Attempt {
                session_id: Some("ollama-session".into()),
                ..Attempt::new(1, "ollama", "2026-01-01T00:00:00Z", Outcome::AgentError)
            }],
            ..TaskResult::failed("deploy-ollama", 2, "ollama is down", vec![], "x".into())
        };
        let text = to_yaml(&result, &r);
        let back: TaskResult = from_yaml(&text).expect("a redacted record still parses");
        assert_eq!(back.task_id, "deploy-ollama", "{text}");
        assert_eq!(back.attempts[0].agent, "ollama", "{text}");
        assert_eq!(back.description, "*** is down", "{text}");
        assert_eq!(back.attempts[0].session_id.as_deref(), Some("***-session"));
    }
}
