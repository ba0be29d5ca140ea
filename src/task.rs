//! Task files (schema v1): what people write into `pending/`, and the names the spool accepts.
//!
//! Parsing is strict: unknown keys, duplicate keys, several documents, a missing description or a file
//! over the size cap are errors with a line and column. Budgets in [`crate::yaml::options`] bound
//! the CPU and memory a hostile file can cost. The records orchestrate writes beside a task are in
//! `record`. Nothing here touches the file system except [`read_task`], and nothing here writes.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::yaml::{self, YamlProblem, key_lines};

/// Longest task id (file names must stay well under 255 bytes with suffixes like `_result.yaml`).
pub const MAX_ID_LEN: usize = 200;

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TaskFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(alias = "prompt")]
    pub description: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub task_type: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dependencies: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub context_files: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_minutes: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    /// What the task's attempts together may cost, in USD: passed to CLIs that cap themselves
    /// (Claude Code's `--max-budget-usd`), and checked after each attempt: a task that spent it is
    /// not retried (it fails with `budget_exhausted`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_usd: Option<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subtasks: Vec<String>,
    /// Set on the child tasks orchestrate writes when it expands `subtasks`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Overrides `workspace.isolation` (and the agent's) for this task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<Isolation>,
    /// Overrides `workspace.merge` for this task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge: Option<MergeMode>,
    /// A shell command run in the attempt's workdir after the agent; the attempt completes only
    /// when it exits 0. Overrides the agent's and `routing.check`; `""` turns theirs off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
    /// How long the check may run (default: the agent's, `routing`'s, else 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_timeout_minutes: Option<f64>,
    /// Run the task as several candidates at once: a list of agents, or a count of attempts on
    /// the agent routing picks. Each candidate is a child task `<id>.<agent>` (or `<id>.<n>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fan_out: Option<FanOut>,
    /// Which candidate of a `fan_out` lands (default `first_pass`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pick: Option<Pick>,
    /// The agent that chooses among candidates with `pick: judge`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge: Option<String>,
    /// A candidate whose agent cannot run now (cooling down, needs a login) is dropped instead of
    /// waiting for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fan_out_skip_cooling: Option<bool>,
    /// Set on the candidate tasks orchestrate writes for a `fan_out` (with `parent`): the
    /// candidate's name, an agent or a number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate: Option<String>,
    /// Cluster mode: the one host that may run it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Cluster mode: labels a host must all have (`cluster.labels`) to run it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requires: Vec<String>,
}

/// How many candidates a task fans out to.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum FanOut {
    /// That many candidates, each on the agent routing picks for it.
    Count(u32),
    /// One candidate per agent named.
    Agents(Vec<String>),
}

/// The most candidates one task may fan out to.
pub const MAX_FAN_OUT: usize = 16;

/// The id of a fan-out's judge task: `judge` is never a candidate's name.
pub const JUDGE: &str = "judge";

impl FanOut {
    /// The candidates' names: the agents, or `1`..`n`.
    pub fn names(&self) -> Vec<String> {
        match self {
            FanOut::Count(n) => (1..=*n).map(|i| i.to_string()).collect(),
            FanOut::Agents(a) => a.clone(),
        }
    }
}

/// Which candidate of a fan-out lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pick {
    /// The first candidate that completes (its check passed) wins; the others are cancelled.
    #[default]
    FirstPass,
    /// Every candidate finishes; the `judge` agent chooses among those that completed.
    Judge,
    /// Every candidate's branch is kept and none lands: a person chooses (`merge --candidate`).
    All,
}

impl Pick {
    pub fn as_str(self) -> &'static str {
        match self {
            Pick::FirstPass => "first_pass",
            Pick::Judge => "judge",
            Pick::All => "all",
        }
    }
}

/// Where a task's agent works.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// A worktree when the task's workdir is inside a git work tree, else none.
    #[default]
    Auto,
    /// Always a worktree of its own; a workdir outside git is an error.
    Worktree,
    /// In the workdir itself; tasks that share a workdir run one at a time.
    None,
}

/// How a worktree task's changes come back to the user's tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MergeMode {
    /// Applied to the working tree as uncommitted changes (three-way; all or nothing).
    #[default]
    Apply,
    /// Applied and committed on the current branch.
    Commit,
    /// Left on the task's branch only.
    Branch,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Priority {
    Level(PriorityLevel),
    Value(i64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PriorityLevel {
    High,
    Normal,
    Low,
}

impl Priority {
    /// Larger runs sooner. The named levels sit at 2/1/0 so integers can be placed around them.
    pub fn rank(self) -> i64 {
        match self {
            Priority::Level(PriorityLevel::High) => 2,
            Priority::Level(PriorityLevel::Normal) => 1,
            Priority::Level(PriorityLevel::Low) => 0,
            Priority::Value(v) => v,
        }
    }

    pub fn parse_cli(s: &str) -> Option<Priority> {
        match s {
            "high" => Some(Priority::Level(PriorityLevel::High)),
            "normal" => Some(Priority::Level(PriorityLevel::Normal)),
            "low" => Some(Priority::Level(PriorityLevel::Low)),
            _ => s.parse().ok().map(Priority::Value),
        }
    }
}

/// A task file that parsed and passed validation.
#[derive(Debug, Clone)]
pub struct Task {
    pub id: String,
    pub file: TaskFile,
}

impl TaskFile {
    /// The file as orchestrate writes it (`orchestrate add`, subtask children). Never redacted: a
    /// task file says what its author asked for, and `***` in a prompt would change the task.
    pub fn to_yaml(&self) -> String {
        serde_saphyr::to_string(self).expect("a task file is plain data and always serializes")
    }
}

impl Task {
    pub fn priority(&self) -> i64 {
        self.file.priority.map(Priority::rank).unwrap_or(1)
    }
}

/// A task file's content hash: a claim hashes the file again, so it runs the file that was read.
pub fn content_hash(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// Names the spool accepts for tasks and agents: no path separators, no leading dot or dash.
pub fn valid_name(s: &str) -> bool {
    s.len() <= MAX_ID_LEN && name_chars_ok(s)
}

/// The character rule of the whitelist, without the length limit (checked bytewise: never slices).
fn name_chars_ok(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

/// Whether an id would collide with the names of the records kept beside task files.
fn reserved_id(id: &str) -> bool {
    id.ends_with("_result") || id.ends_with(".claim") || id.ends_with(".error")
}

/// The `^[A-Za-z0-9][A-Za-z0-9._-]*\.ya?ml$` whitelist: everything else in `pending/` is ignored.
pub fn is_task_file_name(name: &str) -> bool {
    let stem = name
        .strip_suffix(".yaml")
        .or_else(|| name.strip_suffix(".yml"));
    match stem {
        Some(stem) => {
            // Long names are accepted here; the id rules (length included) are checked on parse.
            name_chars_ok(stem)
        }
        None => false,
    }
}

/// Copies made by sync clients when two devices edit one file; never run, always quarantined.
///
/// Syncthing: `x.sync-conflict-20240101-120000-ABCDEFG.yaml`; ownCloud and older Nextcloud:
/// `x_conflict-20240101-120000.yaml`; Nextcloud: `x (conflicted copy 2024-01-01 120000).yaml`. Dropbox
/// puts the user or device first, `x (Jane's conflicted copy 2024-01-01).yaml`, so "conflicted copy" is
/// matched anywhere and in any case, not only right after the parenthesis.
pub fn is_conflict_copy(name: &str) -> bool {
    name.contains(".sync-conflict-")
        || name.to_ascii_lowercase().contains("conflicted copy")
        || name.contains("_conflict-")
}

/// Why a task file was rejected.
#[derive(Debug, Clone)]
pub struct TaskError {
    pub problem: YamlProblem,
}

impl TaskError {
    fn plain(message: impl Into<String>) -> TaskError {
        TaskError {
            problem: YamlProblem {
                line: None,
                column: None,
                message: message.into(),
                excerpt: None,
            },
        }
    }

    fn at_key(text: &str, key: &str, message: impl Into<String>) -> TaskError {
        let line = key_lines(text, key).first().copied();
        TaskError {
            problem: YamlProblem {
                line,
                column: line.map(|_| 1),
                message: message.into(),
                excerpt: None,
            },
        }
    }

    /// `file:line:col: message` followed by the source excerpt when there is one.
    pub fn render(&self, source_name: &str) -> String {
        let mut s = format!("{}: {}", self.problem.at(source_name), self.problem.message);
        if let Some(x) = &self.problem.excerpt {
            s.push('\n');
            s.push_str(x);
        }
        s
    }

    pub fn message(&self) -> &str {
        &self.problem.message
    }
}

/// Parse and validate a task. `stem` is the file name without its extension (the default id).
pub fn parse_task(text: &str, stem: &str, source_name: &str) -> Result<Task, TaskError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if text.contains('\0') {
        return Err(TaskError::plain(
            "file contains NUL bytes (binary or UTF-16 file?)",
        ));
    }
    if let Some(i) = yaml::lines(text)
        .position(|l| l.starts_with("<<<<<<< ") || l.starts_with(">>>>>>> ") || l == "=======")
    {
        return Err(TaskError {
            problem: YamlProblem {
                line: Some(i + 1),
                column: Some(1),
                message: "unresolved git conflict marker".into(),
                excerpt: None,
            },
        });
    }
    if text.trim().is_empty() {
        return Err(TaskError::plain(
            "empty file: a task needs at least `description:`",
        ));
    }
    let file: TaskFile = serde_saphyr::from_str_with_options(text, crate::yaml::options())
        .map_err(|e| {
            let mut problem = YamlProblem::from_saphyr(source_name, &e);
            // A key given twice under two spellings (`prompt` is `description`) is caught by serde,
            // which knows no position: point at the second one.
            if problem.line.is_none()
                && let Some(field) = problem
                    .message
                    .strip_prefix("duplicate field `")
                    .and_then(|r| r.split('`').next())
            {
                let mut lines = key_lines(text, field);
                if field == "description" {
                    lines.extend(key_lines(text, "prompt"));
                }
                lines.sort_unstable();
                problem.line = lines.get(1).or(lines.first()).copied();
                problem.column = problem.line.map(|_| 1);
            }
            TaskError { problem }
        })?;
    let id = match &file.id {
        Some(id) => id.clone(),
        None => stem.to_string(),
    };
    if !valid_name(&id) {
        let msg = format!(
            "invalid task id `{}`: use 1-{MAX_ID_LEN} letters, digits, `.`, `_` or `-`, starting with a letter or digit",
            id.escape_debug()
        );
        return Err(if file.id.is_some() {
            TaskError::at_key(text, "id", msg)
        } else {
            TaskError::plain(msg)
        });
    }
    if reserved_id(&id) {
        return Err(TaskError::at_key(
            text,
            "id",
            format!(
                "task id `{id}` ends in a suffix orchestrate reserves (_result, .claim, .error)"
            ),
        ));
    }
    if file.description.trim().is_empty() {
        return Err(TaskError::at_key(
            text,
            "description",
            "`description` must not be empty",
        ));
    }
    for dep in &file.dependencies {
        if !valid_name(dep) {
            return Err(TaskError::at_key(
                text,
                "dependencies",
                format!("`{}` is not a valid task id", dep.escape_debug()),
            ));
        }
        if *dep == id {
            return Err(TaskError::at_key(
                text,
                "dependencies",
                "a task cannot depend on itself",
            ));
        }
    }
    for l in &file.requires {
        if !valid_name(l) {
            return Err(TaskError::at_key(
                text,
                "requires",
                format!("`{}` is not a valid label", l.escape_debug()),
            ));
        }
    }
    if let Some(h) = &file.host
        && (h.trim().is_empty() || h.len() > 255 || h.chars().any(char::is_whitespace))
    {
        return Err(TaskError::at_key(
            text,
            "host",
            format!("`{}` is not a host name", h.escape_debug()),
        ));
    }
    if let Some(a) = &file.agent
        && !valid_name(a)
    {
        return Err(TaskError::at_key(
            text,
            "agent",
            format!("`{}` is not a valid agent name", a.escape_debug()),
        ));
    }
    if let Some(t) = file.timeout_minutes
        && !(t > 0.0 && t.is_finite())
    {
        return Err(TaskError::at_key(
            text,
            "timeout_minutes",
            "`timeout_minutes` must be a positive number",
        ));
    }
    if let Some(c) = file.max_cost_usd
        && !(c > 0.0 && c.is_finite())
    {
        return Err(TaskError::at_key(
            text,
            "max_cost_usd",
            "`max_cost_usd` must be a positive number of US dollars",
        ));
    }
    if let Some(t) = file.check_timeout_minutes
        && !(t > 0.0 && t.is_finite())
    {
        return Err(TaskError::at_key(
            text,
            "check_timeout_minutes",
            "`check_timeout_minutes` must be a positive number",
        ));
    }
    if !file.subtasks.is_empty() {
        // Children are `<id>.<n>`: they must be valid ids too.
        let longest = id.len() + 1 + file.subtasks.len().to_string().len();
        if longest > MAX_ID_LEN {
            return Err(TaskError::at_key(
                text,
                "subtasks",
                format!(
                    "with {} subtasks the id may have at most {} characters (children are named `{id:.20}….{}`)",
                    file.subtasks.len(),
                    MAX_ID_LEN - (longest - id.len()),
                    file.subtasks.len()
                ),
            ));
        }
    }
    if file.subtasks.iter().any(|s| s.trim().is_empty()) {
        return Err(TaskError::at_key(
            text,
            "subtasks",
            "subtasks must not be empty strings",
        ));
    }
    check_fan_out(text, &id, &file)?;
    Ok(Task { id, file })
}

/// The `fan_out`, `pick` and `judge` rules: candidates are child tasks, so their names must make
/// valid, distinct ids; a judge must be named where it decides.
fn check_fan_out(text: &str, id: &str, file: &TaskFile) -> Result<(), TaskError> {
    let err = |key: &str, msg: String| Err(TaskError::at_key(text, key, msg));
    let Some(fan) = &file.fan_out else {
        for key in ["pick", "judge", "fan_out_skip_cooling"] {
            let set = match key {
                "pick" => file.pick.is_some(),
                "judge" => file.judge.is_some(),
                // A candidate carries it from its fan-out.
                _ => file.fan_out_skip_cooling.is_some() && file.candidate.is_none(),
            };
            if set {
                return err(key, format!("`{key}` only applies with `fan_out`"));
            }
        }
        return Ok(());
    };
    if !file.subtasks.is_empty() {
        return err(
            "fan_out",
            "`fan_out` and `subtasks` cannot be combined: fan out each step instead".into(),
        );
    }
    if file.candidate.is_some() {
        return err("fan_out", "a fan-out candidate cannot fan out again".into());
    }
    if file.isolation == Some(Isolation::None) {
        return err(
            "isolation",
            "`fan_out` runs each candidate in a git worktree of its own: `isolation: none` cannot be combined with it".into(),
        );
    }
    let names = fan.names();
    match fan {
        FanOut::Count(n) if *n < 2 || *n as usize > MAX_FAN_OUT => {
            return err(
                "fan_out",
                format!("`fan_out` must be between 2 and {MAX_FAN_OUT} candidates, not {n}"),
            );
        }
        FanOut::Agents(a) if a.is_empty() || a.len() > MAX_FAN_OUT => {
            return err(
                "fan_out",
                format!(
                    "`fan_out` must list between 1 and {MAX_FAN_OUT} agents, not {}",
                    a.len()
                ),
            );
        }
        _ => {}
    }
    for (i, name) in names.iter().enumerate() {
        if !valid_name(name) {
            return err(
                "fan_out",
                format!(
                    "fan_out[{i}]: `{}` is not a valid agent name",
                    name.escape_debug()
                ),
            );
        }
        if name == JUDGE {
            return err(
                "fan_out",
                format!(
                    "fan_out[{i}]: `{JUDGE}` is the name of the fan-out's judge task; rename the agent"
                ),
            );
        }
        if names[..i].contains(name) {
            return err(
                "fan_out",
                format!(
                    "fan_out[{i}]: `{name}` is listed twice (use a count to run one agent several times)"
                ),
            );
        }
    }
    let longest = names
        .iter()
        .map(String::len)
        .max()
        .unwrap_or(0)
        .max(JUDGE.len());
    if id.len() + 1 + longest > MAX_ID_LEN {
        return err(
            "fan_out",
            format!(
                "with these candidates the id may have at most {} characters (candidates are named `<id>.<candidate>`)",
                MAX_ID_LEN - 1 - longest
            ),
        );
    }
    match (file.pick.unwrap_or_default(), &file.judge) {
        (Pick::Judge, None) => err(
            "pick",
            "`pick: judge` needs `judge: AGENT`, the agent that chooses".into(),
        ),
        (Pick::Judge, Some(j)) if !valid_name(j) => err(
            "judge",
            format!("`{}` is not a valid agent name", j.escape_debug()),
        ),
        (Pick::FirstPass | Pick::All, Some(_)) => {
            err("judge", "`judge` only applies with `pick: judge`".into())
        }
        _ => Ok(()),
    }
}

/// Read a task file with the size cap applied before reading.
pub fn read_task(path: &Path, max_bytes: u64) -> Result<(Task, Vec<u8>), TaskError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let meta = std::fs::symlink_metadata(path)
        .map_err(|e| TaskError::plain(format!("cannot read: {e}")))?;
    if !meta.file_type().is_file() {
        return Err(TaskError::plain(
            "not a regular file (directory, symlink, FIFO or device)",
        ));
    }
    if meta.len() > max_bytes {
        return Err(TaskError::plain(format!(
            "file is {} bytes, over the {max_bytes}-byte limit (orchestrator.max_task_bytes)",
            meta.len()
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| TaskError::plain(format!("cannot read: {e}")))?;
    if bytes.len() as u64 > max_bytes {
        return Err(TaskError::plain(format!(
            "file grew over the {max_bytes}-byte limit while being read"
        )));
    }
    if bytes.starts_with(&[0xff, 0xfe]) || bytes.starts_with(&[0xfe, 0xff]) {
        return Err(TaskError::plain("file is UTF-16; save it as UTF-8"));
    }
    let text = std::str::from_utf8(&bytes).map_err(|e| {
        let line = bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1;
        TaskError {
            problem: YamlProblem {
                line: Some(line),
                column: None,
                message: "file is not valid UTF-8".into(),
                excerpt: None,
            },
        }
    })?;
    let task = parse_task(text, crate::layout::file_stem(&name), &name)?;
    Ok((task, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_serde_cannot_place_still_get_a_line() {
        // Found by the fuzzer: a duplicate under the alias, and a key in a flow mapping.
        let e = parse_task("id: t1\nprompt: o \ndescription:\n", "t", "t.yaml").unwrap_err();
        assert!(
            e.render("t.yaml").starts_with("t.yaml:3:1: "),
            "{}",
            e.render("t.yaml")
        );
        let e = parse_task("\n\u{feff}description: |  # x\n", "t", "t.yaml").unwrap_err();
        assert!(
            e.render("t.yaml").starts_with("t.yaml:2:1: "),
            "{}",
            e.render("t.yaml")
        );
        let e =
            parse_task("description: d\rdependencies: [j\nb_gate]\n", "t", "t.yaml").unwrap_err();
        assert!(
            e.render("t.yaml").starts_with("t.yaml:2:1: "),
            "{}",
            e.render("t.yaml")
        );
        for (text, line) in [
            ("\"id\": \"../x\"\ndescription: d\n", 1),
            ("description: d\n'agent': a/b\n", 2),
            ("description: d\ntimeout_minutes : -1\n", 2),
            ("description: d\ncheck: x\ncheck_timeout_minutes: 0\n", 3),
            ("description: d\nmax_cost_usd: 0\n", 2),
            ("description: d\nmax_cost_usd: -1.5\n", 2),
            ("description: |\n  id: old\nid: ../x\n", 3),
            // Found by the fuzzer: node properties before the key.
            ("!t agent: s\"\ndescription: d\n", 1),
            ("description: d\n&a agent: a/b\n", 2),
        ] {
            let e = parse_task(text, "t", "t.yaml").unwrap_err();
            let r = e.render("t.yaml");
            assert!(
                r.starts_with(&format!("t.yaml:{line}:1: ")),
                "{text:?}: {r}"
            );
        }
        let e = parse_task("{description: f/, dependencies: [::b]}", "t", "t.yaml").unwrap_err();
        assert!(
            e.render("t.yaml").starts_with("t.yaml:1:1: "),
            "{}",
            e.render("t.yaml")
        );
    }

    #[test]
    fn subtask_ids_must_fit_the_id_limit() {
        let long = "a".repeat(MAX_ID_LEN - 1);
        let e = parse_task(
            &format!("id: {long}\ndescription: d\nsubtasks: [x, y]\n"),
            "t",
            "t.yaml",
        )
        .unwrap_err();
        assert!(
            e.message().contains("at most 198 characters"),
            "{}",
            e.message()
        );
        let ok = "a".repeat(MAX_ID_LEN - 2);
        assert!(
            parse_task(
                &format!("id: {ok}\ndescription: d\nsubtasks: [x]\n"),
                "t",
                "t.yaml"
            )
            .is_ok()
        );
    }

    #[test]
    fn whitelist() {
        assert!(is_task_file_name("task_001.yaml"));
        assert!(is_task_file_name("a.yml"));
        for bad in [
            ".x.yaml",
            "x.yaml.swp",
            "4913",
            "x~",
            ".#x.yaml",
            "#x.yaml#",
            "-x.yaml",
            "x.txt",
            ".syncthing.x.yaml.tmp",
        ] {
            assert!(!is_task_file_name(bad), "{bad}");
        }
        // Regression: a multibyte character at the length limit must not panic.
        assert!(!is_task_file_name(&format!("{}é.yaml", "a".repeat(199))));
        assert!(is_task_file_name(&format!("{}.yaml", "a".repeat(240))));
        assert!(is_conflict_copy("t.sync-conflict-20240101-120000-ABC.yaml"));
        assert!(is_conflict_copy("t (conflicted copy 2024-01-01).yaml"));
        assert!(is_conflict_copy("t_conflict-20240101.yaml"));
        // Regression: Dropbox names the user or device before "conflicted copy".
        assert!(is_conflict_copy(
            "t (Jane Doe's conflicted copy 2024-01-01).yaml"
        ));
        assert!(is_conflict_copy(
            "t (Conflicted Copy 2024-01-01 120000).yaml"
        ));
    }

    #[test]
    fn parse_minimal_and_full() {
        let t = parse_task("description: hi\n", "task_9", "t.yaml").expect("valid");
        assert_eq!(t.id, "task_9");
        assert_eq!(t.priority(), 1);
        let t = parse_task(
            "id: x1\nprompt: do it\npriority: high\ndependencies: [a, b]\nsubtasks: [s1, s2]\n",
            "file",
            "t.yaml",
        )
        .expect("valid");
        assert_eq!(t.id, "x1");
        assert_eq!(t.priority(), 2);
        assert_eq!(t.file.dependencies, vec!["a", "b"]);
        let t = parse_task("description: x\npriority: 7\n", "f", "t.yaml").expect("valid");
        assert_eq!(t.priority(), 7);
    }

    #[test]
    fn errors_have_positions() {
        let e = parse_task("description: x\nbogus: 1\n", "f", "t.yaml").unwrap_err();
        assert_eq!(e.problem.line, Some(2));
        assert!(e.message().contains("bogus"));
        let e = parse_task("description: [x\n", "f", "t.yaml").unwrap_err();
        assert_eq!(e.problem.line, Some(1));
        let e = parse_task("priority: high\n", "f", "t.yaml").unwrap_err();
        assert!(e.message().contains("description"), "{}", e.message());
        let e = parse_task("description: x\ndescription: y\n", "f", "t.yaml").unwrap_err();
        assert_eq!(e.problem.line, Some(2));
        assert!(!e.message().contains("Options"), "{}", e.message());
        let e = parse_task("description: x\npriority: urgent\n", "f", "t.yaml").unwrap_err();
        assert!(e.message().contains("high, normal, low"), "{}", e.message());
        let e = parse_task("description: x\n---\ndescription: y\n", "f", "t.yaml").unwrap_err();
        assert!(
            e.message().contains("several YAML documents"),
            "{}",
            e.message()
        );
        let e = parse_task("description: x\nid: ../etc\n", "f", "t.yaml").unwrap_err();
        assert_eq!(e.problem.line, Some(2));
        let e = parse_task("description: x\ndependencies: [f]\n", "f", "t.yaml").unwrap_err();
        assert!(e.message().contains("itself"));
    }

    #[test]
    fn rejects_bombs_and_markers() {
        let bomb = "a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\ng: [*f,*f,*f,*f,*f,*f,*f,*f,*f]\ndescription: x\n";
        assert!(parse_task(bomb, "f", "t.yaml").is_err());
        let e = parse_task("<<<<<<< HEAD\ndescription: x\n", "f", "t.yaml").unwrap_err();
        assert_eq!(e.problem.line, Some(1));
    }
}
