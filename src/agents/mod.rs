//! Agent adapters: one per kind. An adapter turns a task's prompt into a command line and the
//! finished process into one [`AgentOutcome`]. Adapters never spawn or wait themselves; the
//! `process` module does that for all of them, so limits, timeouts and capture are the same everywhere.

pub mod claude;
pub mod codex;
pub mod command;
pub mod cursor;
pub mod gemini;
pub mod openai;

#[cfg(test)]
pub(crate) mod fixture;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;

use crate::config::{AgentConfig, AgentKind};
use crate::process::{Exit, Stalled};
use crate::record::Outcome;

/// What the adapter needs to know about the attempt.
pub struct RunRequest<'a> {
    pub task_id: &'a str,
    pub description: &'a str,
    pub prompt: &'a str,
    pub prompt_file: &'a std::path::Path,
    pub workdir: &'a std::path::Path,
    /// The session an earlier attempt on this same agent left behind, when the retry should
    /// continue it (after a timeout or an interrupted run) rather than start over.
    pub resume_session: Option<&'a str>,
    /// What this attempt may still cost (the task's `max_cost_usd` less its earlier attempts'), for
    /// CLIs that cap themselves.
    pub max_cost_usd: Option<f64>,
}

/// The command line for one attempt.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub program: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub stdin: Option<Vec<u8>>,
    pub cwd: PathBuf,
    /// The session id the adapter gave the CLI up front, so a run that is killed can be resumed.
    pub session_id: Option<String>,
}

/// Everything orchestrate learns from one finished attempt.
#[derive(Debug, Clone)]
pub struct AgentOutcome {
    pub outcome: Outcome,
    /// The agent's final answer (for `command` agents, their stdout; for output that could not be
    /// parsed, the raw text).
    pub text: String,
    pub error: Option<String>,
    pub cost_usd: Option<f64>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    /// Input tokens served from the provider's prompt cache (part of, or in addition to,
    /// `input_tokens` depending on the provider; recorded as reported).
    pub cached_tokens: Option<u64>,
    pub session_id: Option<String>,
    /// Files the agent says it changed (relative to its workdir where it said so).
    pub files_reported: Vec<String>,
    /// When the provider said to come back (rate limits).
    pub retry_after: Option<Duration>,
}

impl AgentOutcome {
    pub fn new(outcome: Outcome) -> AgentOutcome {
        AgentOutcome {
            outcome,
            text: String::new(),
            error: None,
            cost_usd: None,
            input_tokens: None,
            output_tokens: None,
            cached_tokens: None,
            session_id: None,
            files_reported: Vec::new(),
            retry_after: None,
        }
    }

    pub fn failed(outcome: Outcome, error: impl Into<String>) -> AgentOutcome {
        AgentOutcome {
            error: Some(error.into()),
            ..AgentOutcome::new(outcome)
        }
    }
}

pub trait Adapter: Send + Sync {
    fn invocation(&self, name: &str, cfg: &AgentConfig, req: &RunRequest) -> Result<Invocation>;
    fn parse(&self, exit: &Exit) -> AgentOutcome;

    /// Whether the CLI prints while it works, the way orchestrate runs it (JSON events, a
    /// command's own output): then a long silence means it is stuck, and the default
    /// `stall_timeout_seconds` applies. A CLI that prints only its final answer is silent while
    /// it works, so only a stall timeout set on the agent itself watches it.
    fn streams_progress(&self) -> bool {
        true
    }

    /// The CLI's own cheap "am I logged in?" command, for an agent marked "needs login": exit code 0
    /// means it is. It must not talk to the model. `None` when the CLI has no such check that
    /// orchestrate can trust; the next task then simply tries the agent again.
    fn login_check(&self, _name: &str, _cfg: &AgentConfig, _cwd: &Path) -> Option<Invocation> {
        None
    }
}

/// The adapter for a kind, or `None` when this build cannot drive that kind yet; the scheduler then
/// treats the agent as unavailable and routes around it.
pub fn adapter_for(kind: AgentKind) -> Option<&'static dyn Adapter> {
    match kind {
        AgentKind::Command => Some(&command::CommandAdapter),
        AgentKind::Claude => Some(&claude::ClaudeAdapter),
        AgentKind::Codex => Some(&codex::CodexAdapter),
        AgentKind::Gemini => Some(&gemini::GeminiAdapter),
        AgentKind::Cursor => Some(&cursor::CursorAdapter),
        AgentKind::Openai => Some(&openai::OpenaiAdapter),
    }
}

/// The package or script that installs a kind's CLI, for `orchestrate agents` and error messages.
pub fn install_hint(kind: AgentKind) -> Option<&'static str> {
    match kind {
        AgentKind::Claude => Some("npm install -g @anthropic-ai/claude-code"),
        AgentKind::Codex => Some("npm install -g @openai/codex"),
        AgentKind::Gemini => Some("npm install -g @google/gemini-cli"),
        AgentKind::Cursor => Some("curl https://cursor.com/install -fsS | bash"),
        AgentKind::Command | AgentKind::Openai => None,
    }
}

/// The agent's own `env`, plus its API key: taken from `api_key_env` (or the CLI's usual variable)
/// in the supervisor's environment and handed over under the name the CLI reads. Agents do not
/// inherit the supervisor's environment, so without this a key exported in the shell would not
/// reach them.
pub fn agent_env(cfg: &AgentConfig) -> BTreeMap<String, String> {
    let mut env = cfg.env.clone();
    // An `openai` agent may point anywhere (a local server, a stranger's endpoint): it gets a key
    // only when its config names one, never the user's OpenAI key by default.
    let named_only = cfg.kind == AgentKind::Openai && cfg.api_key_env.is_none();
    if let Some(target) = cfg.kind.key_var()
        && !named_only
        && !env.contains_key(target)
    {
        let source = cfg.api_key_env.as_deref().unwrap_or(target);
        if let Ok(v) = std::env::var(source)
            && !v.is_empty()
        {
            env.insert(target.to_string(), v);
        }
    }
    env
}

/// Cost from configured prices when the CLI reported tokens but no cost.
pub fn fill_cost(cfg: &AgentConfig, o: &mut AgentOutcome) {
    if o.cost_usd.is_some() {
        return;
    }
    if let (Some(p), Some(i), Some(out)) = (&cfg.prices, o.input_tokens, o.output_tokens) {
        o.cost_usd = Some(p.cost(i, out, o.cached_tokens.unwrap_or(0)));
    }
}

/// Rate limit, quota and auth failures told apart by the words providers and CLIs use, for CLIs that
/// report them only as text. `None` means an ordinary agent error.
pub fn classify_error_text(text: &str) -> Option<(Outcome, Option<Duration>)> {
    use std::sync::LazyLock;
    // A status code as a word of its own: not a port (":42913"), a path, an id or a UUID.
    static STATUS: LazyLock<regex::Regex> = LazyLock::new(|| {
        regex::Regex::new(r"(?:^|[\s(\[=])(429|401)(?:[\s)\],.:]|$)").expect("valid regex")
    });
    let t = text.to_ascii_lowercase();
    let has = |words: &[&str]| words.iter().any(|w| t.contains(w));
    let status = |code: &str| STATUS.captures_iter(&t).any(|c| &c[1] == code);
    if has(&[
        "insufficient_quota",
        "quota exceeded",
        "exceeded your current quota",
        "usage limit",
        "billing details",
        "billing hard limit",
        "credit balance",
        "out of credits",
    ]) && !has(&["per minute", "rate limit", "rate_limit"])
    {
        return Some((Outcome::QuotaExhausted, retry_after_in_text(&t)));
    }
    if status("429")
        || has(&[
            "rate limit",
            "rate_limit",
            "ratelimit",
            "too many requests",
            "overloaded_error",
            "resource has been exhausted",
        ])
    {
        return Some((Outcome::RateLimited, retry_after_in_text(&t)));
    }
    if status("401")
        || has(&[
            "unauthorized",
            "authentication_error",
            "authentication failed",
            "authentication required",
            "invalid api key",
            "invalid x-api-key",
            "api key not valid",
            "not logged in",
            "please run /login",
            "login required",
        ])
    {
        return Some((Outcome::Auth, None));
    }
    None
}

/// "retry after 30 seconds", "try again in 20s", "try again in 1m30s", "retry-after: 12",
/// "resets at <unix seconds>" (Claude's subscription limit), read out of an error message.
pub fn retry_after_in_text(lower: &str) -> Option<Duration> {
    use std::sync::LazyLock;
    static TRIGGER: LazyLock<regex::Regex> = LazyLock::new(|| {
        regex::Regex::new(
            r"(?:retry[ -]after|try again in|retry in|resets? in|please wait)[:\s]*((?:\d+(?:\.\d+)?\s*[a-z]*[\s,]*)+)",
        )
        .expect("valid regex")
    });
    static PART: LazyLock<regex::Regex> =
        LazyLock::new(|| regex::Regex::new(r"(\d+(?:\.\d+)?)\s*([a-z]*)").expect("valid regex"));
    static EPOCH: LazyLock<regex::Regex> = LazyLock::new(|| {
        regex::Regex::new(r"(?:limit reached\||resets? at )(\d{10})\b").expect("valid regex")
    });
    if let Some(c) = EPOCH.captures(lower) {
        let at: i64 = c[1].parse().ok()?;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        return Some(Duration::from_secs(at.saturating_sub(now).max(1) as u64));
    }
    let span = TRIGGER.captures(lower)?.get(1)?.as_str();
    let mut secs = 0.0;
    for p in PART.captures_iter(span) {
        let n: f64 = p[1].parse().ok()?;
        secs += n * match &p[2] {
            "ms" | "msec" | "millisecond" | "milliseconds" => 0.001,
            "h" | "hr" | "hrs" | "hour" | "hours" => 3600.0,
            "m" | "min" | "mins" | "minute" | "minutes" => 60.0,
            "" | "s" | "sec" | "secs" | "second" | "seconds" => 1.0,
            // "retry after 3 attempts": not a duration.
            _ => return None,
        };
    }
    (secs > 0.0 && secs < 7.0 * 86400.0).then(|| Duration::from_secs_f64(secs))
}

/// Parse a JSON document out of a CLI's stdout, tolerating banner lines before it (some CLIs print
/// warnings on stdout): the last line that parses as a JSON object wins, else the whole text.
pub fn json_document(stdout: &str) -> Option<serde_json::Value> {
    let trimmed = stdout.trim();
    if let Ok(v @ serde_json::Value::Object(_)) = serde_json::from_str(trimmed) {
        return Some(v);
    }
    if let Some(i) = trimmed.find("\n{")
        && let Ok(v @ serde_json::Value::Object(_)) = serde_json::from_str(&trimmed[i + 1..])
    {
        return Some(v);
    }
    trimmed
        .lines()
        .rev()
        .find_map(|l| match serde_json::from_str(l.trim()) {
            Ok(v @ serde_json::Value::Object(_)) => Some(v),
            _ => None,
        })
}

/// Output that is not what the CLI documents: kept raw so a person can see what came back.
pub fn bad_output(exit: &Exit, what: &str) -> AgentOutcome {
    AgentOutcome {
        text: exit.stdout.clone(),
        ..AgentOutcome::failed(
            Outcome::BadOutput,
            format!(
                "{what} (exit code {}){}",
                exit.code.map(|c| c.to_string()).unwrap_or("?".into()),
                stderr_hint(exit)
            ),
        )
    }
}

/// A random (version 4) UUID for a CLI session id, from the kernel's random source.
pub fn new_session_id() -> String {
    let mut b = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// `--resume <id>` to continue a session, else `--session-id <new id>` so that even a run killed
/// before it printed anything can be resumed (the flags of Claude Code and Gemini CLI). Returns the id.
pub fn session_args(req: &RunRequest, args: &mut Vec<String>) -> String {
    match req.resume_session {
        Some(s) => {
            args.extend(["--resume".into(), s.into()]);
            s.to_string()
        }
        None => {
            let s = new_session_id();
            args.extend(["--session-id".into(), s.clone()]);
            s
        }
    }
}

/// A CLI that printed no parsable result and exited non-zero: classified by the words of its output
/// (rate limit, quota, auth), else an agent error quoting the end of stderr. Exit code 0 without a
/// result is `bad_output`.
pub fn failed_without_result(exit: &Exit, cli: &str) -> AgentOutcome {
    if exit.code == Some(0) {
        return bad_output(exit, &format!("{cli} printed no JSON result"));
    }
    let text = format!("{}\n{}", exit.stdout, exit.stderr_tail);
    let (outcome, retry_after) = classify_error_text(&text).unwrap_or((Outcome::AgentError, None));
    AgentOutcome {
        retry_after,
        text: exit.stdout.clone(),
        ..AgentOutcome::failed(
            outcome,
            format!(
                "{cli} exited with code {}{}",
                exit.code.map(|c| c.to_string()).unwrap_or("?".into()),
                stderr_hint(exit)
            ),
        )
    }
}

/// [`abnormal`], keeping whatever the agent printed before it was stopped.
pub fn abnormal_with_output(exit: &Exit) -> Option<AgentOutcome> {
    abnormal(exit).map(|o| AgentOutcome {
        text: exit.stdout.clone(),
        ..o
    })
}

/// The permission mode for a kind: the configured one, else the kind's unattended-edit mode.
pub fn permissions<'a>(cfg: &'a AgentConfig, default: &'a str) -> &'a str {
    cfg.permissions.as_deref().unwrap_or(default)
}

/// Whether the user's `args` already set one of `flags` (as `--flag value` or `--flag=value`).
/// Where they do, the user's value wins and the adapter leaves its own out: CLIs refuse a flag
/// given twice (`--sandbox … cannot be used multiple times`) or merge it into nonsense
/// (`auto_edit,auto_edit`). Permission flags are looked up in their own table instead
/// ([`AgentConfig::args_set_permissions`]), which validation shares.
pub fn user_sets(cfg: &AgentConfig, flags: &[&str]) -> bool {
    cfg.args.iter().any(|a| {
        flags
            .iter()
            .any(|f| a == f || a.strip_prefix(f).is_some_and(|rest| rest.starts_with('=')))
    })
}

/// Why an agent cannot take work right now, if it cannot.
pub fn unavailable_reason(name: &str, cfg: &AgentConfig) -> Option<String> {
    if adapter_for(cfg.kind).is_none() {
        return Some(format!(
            "agent {name}: kind `{}` has no adapter in this build",
            cfg.kind.as_str()
        ));
    }
    // Built in: the request runs in a copy of this binary.
    if cfg.kind == AgentKind::Openai {
        return None;
    }
    let program = cfg.program(name);
    if crate::process::find_program(&program).is_none() {
        return Some(format!(
            "agent {name}: `{program}` not found on PATH{}",
            install_hint(cfg.kind)
                .map(|h| format!(" (install: {h})"))
                .unwrap_or_default()
        ));
    }
    None
}

/// Outcome of a process that did not finish normally (timeout, signal, spawn failure), shared by adapters.
pub fn abnormal(exit: &Exit) -> Option<AgentOutcome> {
    if exit.spawn_errno == Some(libc::E2BIG) {
        return Some(AgentOutcome::failed(
            Outcome::AgentError,
            "the prompt is too long to pass as a command-line argument: use {prompt_file} in args, or no prompt placeholder (the prompt then goes to stdin)",
        ));
    }
    if let Some(e) = &exit.spawn_error {
        return Some(AgentOutcome::failed(Outcome::AgentError, e.clone()));
    }
    if let Some(stalled) = &exit.stalled {
        return Some(AgentOutcome::failed(Outcome::Stalled, stall_error(stalled)));
    }
    if exit.timed_out {
        return Some(AgentOutcome::failed(
            Outcome::Timeout,
            format!(
                "timed out: still running after its {:.1} s limit, stopped (SIGTERM, then SIGKILL after the grace period)",
                exit.limit.as_secs_f64()
            ),
        ));
    }
    if let Some(sig) = exit.signal {
        return Some(AgentOutcome::failed(
            Outcome::AgentError,
            format!("killed by signal {sig}{}", stderr_hint(exit)),
        ));
    }
    None
}

/// Text without terminal colour codes (CLIs colour their errors even when not on a terminal).
pub use crate::process::strip_ansi;

/// A stalled attempt's error: for how long nothing happened, and what the agent said last, which
/// is usually what it was waiting for ("stalled: no progress for 600 s; last output: Reconnecting…
/// waiting for network").
pub fn stall_error(s: &Stalled) -> String {
    let secs = s.after.as_secs_f64();
    let secs = if secs.fract() == 0.0 {
        format!("{secs:.0}")
    } else {
        format!("{secs:.1}")
    };
    match s.last_line.as_deref() {
        Some(line) => format!(
            "stalled: no progress for {secs} s; last output: {}",
            line_text(line)
        ),
        None => format!("stalled: no progress for {secs} s, and no output at all"),
    }
}

/// One line of a CLI's output as a person would say it: the message of a JSON event (codex's
/// `{"type":"error","message":"Reconnecting…"}`), else the line itself.
fn line_text(line: &str) -> String {
    let Ok(serde_json::Value::Object(v)) = serde_json::from_str::<serde_json::Value>(line) else {
        return line.to_string();
    };
    let v = serde_json::Value::Object(v);
    [
        "/message",
        "/error/message",
        "/item/text",
        "/item/message",
        "/text",
        "/result",
    ]
    .iter()
    .find_map(|p| v.pointer(p).and_then(serde_json::Value::as_str))
    .map(|m| m.split_whitespace().collect::<Vec<_>>().join(" "))
    .filter(|m| !m.is_empty())
    .unwrap_or_else(|| line.to_string())
}

/// What to do about refused or missing credentials, for the "needs login" state: the CLI's own
/// login step, or the variable its key is read from.
pub fn login_hint(name: &str, cfg: &AgentConfig) -> String {
    let program = cfg.program(name);
    let key = cfg.api_key_env.as_deref().or(cfg.kind.key_var());
    // A key it was given and that was refused wants checking, not setting.
    let had_key = cfg
        .kind
        .key_var()
        .is_some_and(|target| agent_env(cfg).contains_key(target));
    let key_part = |k: &str| {
        if had_key {
            format!("check {k} (the key it was given was refused)")
        } else {
            format!("set {k}")
        }
    };
    let login = match cfg.kind {
        AgentKind::Claude => Some(format!("run `{program}` once to log in")),
        AgentKind::Codex => Some(format!("run `{program} login`")),
        AgentKind::Gemini => Some(format!("run `{program}` once to choose how to log in")),
        AgentKind::Cursor => Some(format!("run `{program} login`")),
        AgentKind::Openai | AgentKind::Command => None,
    };
    match (login, key, cfg.kind) {
        (Some(l), Some(k), _) => format!("{l}, or {}", key_part(k)),
        (Some(l), None, _) => l,
        (None, Some(_), AgentKind::Openai) if cfg.api_key_env.is_none() => {
            "the server wants a key: name the variable that holds it in `api_key_env`".into()
        }
        (None, Some(k), _) => key_part(k),
        (None, None, _) => format!("check the credentials `{program}` uses"),
    }
}

/// What an agent's login depends on, as one opaque value: its configuration, the environment it is
/// given (its `env`, its key, the allow-listed variables) and the size and mtime of its CLI's
/// credential file. A different value means something a person changed may have fixed the login.
/// Secrets only go into the hash; the value never holds them.
pub fn login_fingerprint(name: &str, cfg: &AgentConfig, env_allow: &[String]) -> String {
    use std::hash::{Hash, Hasher};
    let mut env = crate::process::build_env(env_allow, &agent_env(cfg));
    env.sort();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    name.hash(&mut h);
    serde_json::to_string(cfg).unwrap_or_default().hash(&mut h);
    env.hash(&mut h);
    for file in credential_files(cfg.kind, &env) {
        use std::os::unix::fs::MetadataExt;
        let stamp = std::fs::metadata(&file)
            .ok()
            .map(|m| (m.len(), m.mtime(), m.mtime_nsec(), m.ino()));
        (file, stamp).hash(&mut h);
    }
    format!("{:016x}", h.finish())
}

/// Where a kind's CLI keeps the credentials its own login step writes, in the environment `env` it
/// runs with (the pinned CLIs' defaults: Claude Code `.credentials.json` in its config folder, Codex
/// `auth.json` in `CODEX_HOME`, Gemini CLI `oauth_creds.json`). Cursor's is not known.
fn credential_files(kind: AgentKind, env: &[(String, String)]) -> Vec<PathBuf> {
    let var = |k: &str| {
        env.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| PathBuf::from(v))
            .filter(|p| p.is_absolute())
    };
    let home = var("HOME");
    let dir = |own: &str, under_home: &str| {
        var(own).or_else(|| home.as_ref().map(|h| h.join(under_home)))
    };
    match kind {
        AgentKind::Claude => dir("CLAUDE_CONFIG_DIR", ".claude")
            .map(|d| vec![d.join(".credentials.json")])
            .unwrap_or_default(),
        AgentKind::Codex => dir("CODEX_HOME", ".codex")
            .map(|d| vec![d.join("auth.json")])
            .unwrap_or_default(),
        AgentKind::Gemini => dir("GEMINI_CLI_HOME", "")
            .map(|d| vec![d.join(".gemini").join("oauth_creds.json")])
            .unwrap_or_default(),
        AgentKind::Cursor | AgentKind::Command | AgentKind::Openai => vec![],
    }
}

/// The last lines of stderr, for error messages.
pub fn stderr_hint(exit: &Exit) -> String {
    let plain = strip_ansi(&exit.stderr_tail);
    let lines: Vec<&str> = plain.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return String::new();
    }
    let start = lines.len().saturating_sub(5);
    format!(": {}", lines[start..].join(" | "))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The user's own flag wins over the adapter's, and is passed once.
    #[test]
    fn a_flag_in_the_users_args_is_not_passed_twice() {
        let cfg = |kind: &str, args: &str| -> AgentConfig {
            crate::config::Config::parse(
                &format!("agents:\n  a:\n    kind: {kind}\n    model: m1\n    args: [{args}]\n"),
                "c.yaml",
            )
            .expect("config")
            .agents["a"]
                .clone()
        };
        let dir = std::path::Path::new("/tmp");
        let req = RunRequest {
            task_id: "t",
            description: "d",
            prompt: "p",
            prompt_file: dir,
            workdir: dir,
            resume_session: None,
            max_cost_usd: None,
        };
        let count =
            |args: &[String], flag: &str| args.iter().filter(|a| a.starts_with(flag)).count();
        for (kind, user, flag) in [
            ("codex", "--sandbox, danger-full-access", "--sandbox"),
            ("gemini", "--approval-mode, yolo", "--approval-mode"),
            ("claude", "--permission-mode=plan", "--permission-mode"),
            ("cursor", "--model, m2", "--model"),
        ] {
            let c = cfg(kind, user);
            let inv = adapter_for(c.kind)
                .expect("adapter")
                .invocation("a", &c, &req)
                .expect("invocation");
            assert_eq!(count(&inv.args, flag), 1, "{kind}: {:?}", inv.args);
            let last = user.split(", ").last().expect("a value");
            assert!(
                inv.args.iter().any(|a| a.ends_with(last)),
                "{kind}: {:?}",
                inv.args
            );
        }
        // Without the user's flag, the adapter's own is there.
        let c = cfg("codex", "");
        let inv = adapter_for(c.kind)
            .expect("adapter")
            .invocation("a", &c, &req)
            .expect("invocation");
        assert!(
            inv.args
                .windows(2)
                .any(|w| w == ["--sandbox", "workspace-write"]),
            "{:?}",
            inv.args
        );
    }

    /// A permission flag of the shared table in `args` (any spelling of it) keeps the adapter's own
    /// permission flag out, on a fresh run and on a resumed one.
    #[test]
    fn any_permission_flag_in_args_replaces_the_adapters_own() {
        let dir = std::path::Path::new("/tmp");
        for (kind, user, own) in [
            ("codex", "--approve-for-me", "sandbox"),
            ("codex", "-sread-only", "sandbox"),
            (
                "claude",
                "--dangerously-skip-permissions",
                "--permission-mode",
            ),
            ("gemini", "-y", "--approval-mode"),
        ] {
            let cfg = crate::config::Config::parse(
                &format!("agents:\n  a:\n    kind: {kind}\n    args: [{user}]\n"),
                "c.yaml",
            )
            .expect("config")
            .agents["a"]
                .clone();
            for resume in [None, Some("s-1")] {
                let req = RunRequest {
                    task_id: "t",
                    description: "d",
                    prompt: "p",
                    prompt_file: dir,
                    workdir: dir,
                    resume_session: resume,
                    max_cost_usd: None,
                };
                let inv = adapter_for(cfg.kind)
                    .expect("adapter")
                    .invocation("a", &cfg, &req)
                    .expect("invocation");
                assert!(
                    !inv.args.iter().any(|a| a != user && a.contains(own)),
                    "{kind} {user} {resume:?}: {:?}",
                    inv.args
                );
                assert_eq!(
                    inv.args.iter().filter(|a| *a == user).count(),
                    1,
                    "{kind}: {:?}",
                    inv.args
                );
            }
        }
    }

    #[test]
    fn retry_after_phrases() {
        let d = |t: &str| retry_after_in_text(&t.to_ascii_lowercase()).map(|d| d.as_secs_f64());
        assert_eq!(
            d("Rate limit reached. Please try again in 20s."),
            Some(20.0)
        );
        assert_eq!(d("try again in 1m30s"), Some(90.0));
        assert_eq!(d("Retry-After: 12"), Some(12.0));
        assert_eq!(d("please retry after 2 minutes"), Some(120.0));
        assert_eq!(d("try again in 250ms"), Some(0.25));
        assert_eq!(d("retry after 3 attempts"), None);
        assert_eq!(d("nothing here"), None);
        let soon = time::OffsetDateTime::now_utc().unix_timestamp() + 600;
        let got = d(&format!("Claude AI usage limit reached|{soon}")).expect("epoch");
        assert!((595.0..=600.0).contains(&got), "{got}");
    }

    #[test]
    fn error_classes_from_text() {
        let c = |t: &str| classify_error_text(t).map(|(o, _)| o);
        assert_eq!(
            c("stream error: 429 Too Many Requests"),
            Some(Outcome::RateLimited)
        );
        assert_eq!(
            c("You exceeded your current quota, please check your plan and billing details"),
            Some(Outcome::QuotaExhausted)
        );
        assert_eq!(
            c("Rate limit reached for requests per minute"),
            Some(Outcome::RateLimited)
        );
        assert_eq!(c("401 Unauthorized: invalid api key"), Some(Outcome::Auth));
        assert_eq!(c("segmentation fault"), None);
        // Numbers and words inside ports, paths and ids are not statuses.
        assert_eq!(
            c(
                "API Error: 500 Internal server error. check your inference gateway (127.0.0.1:42913)."
            ),
            None
        );
        assert_eq!(
            c("No conversation found with session ID 5f0e4291-4290-4429-a"),
            None
        );
        assert_eq!(c("cannot open src/billing/invoice.rs"), None);
        assert_eq!(c("error in authentication.ts line 3"), None);
        assert_eq!(c("unexpected status 401 Unauthorized"), Some(Outcome::Auth));
        assert_eq!(c("HTTP 429"), Some(Outcome::RateLimited));
    }

    #[test]
    fn a_stall_says_how_long_and_what_the_agent_said_last() {
        let s = |line: Option<&str>, secs: f64| {
            stall_error(&Stalled {
                after: Duration::from_secs_f64(secs),
                last_line: line.map(String::from),
            })
        };
        assert_eq!(
            s(Some("Reconnecting… waiting for network"), 600.0),
            "stalled: no progress for 600 s; last output: Reconnecting… waiting for network"
        );
        // A JSON event is quoted by its message.
        assert_eq!(
            s(
                Some(r#"{"type":"error","message":"Reconnecting... 2/5 (stream disconnected)"}"#),
                1.0
            ),
            "stalled: no progress for 1 s; last output: Reconnecting... 2/5 (stream disconnected)"
        );
        assert_eq!(
            s(None, 0.5),
            "stalled: no progress for 0.5 s, and no output at all"
        );
    }

    fn agent(yaml: &str) -> AgentConfig {
        crate::config::Config::parse(&format!("agents:\n  a:\n{yaml}"), "c.yaml")
            .expect("config")
            .agents["a"]
            .clone()
    }

    #[test]
    fn login_hints_name_the_cli_login_and_the_key() {
        // SAFETY: test-only; no other test reads these variables.
        unsafe {
            std::env::remove_var("ORCH_TEST_NO_KEY");
            std::env::set_var("ORCH_TEST_SOME_KEY", "k");
        }
        let claude = agent("    kind: claude\n    api_key_env: ORCH_TEST_NO_KEY\n");
        assert_eq!(
            login_hint("a", &claude),
            "run `claude` once to log in, or set ORCH_TEST_NO_KEY"
        );
        let codex = agent(
            "    kind: codex\n    command: /opt/codex\n    api_key_env: ORCH_TEST_SOME_KEY\n",
        );
        assert_eq!(
            login_hint("a", &codex),
            "run `/opt/codex login`, or check ORCH_TEST_SOME_KEY (the key it was given was refused)"
        );
        let local = agent("    kind: openai\n    base_url: http://x/v1\n    model: m\n");
        assert!(login_hint("a", &local).contains("`api_key_env`"));
        let cmd = agent("    kind: command\n    command: tool\n");
        assert_eq!(login_hint("a", &cmd), "check the credentials `tool` uses");
    }

    #[test]
    fn the_login_fingerprint_follows_config_environment_and_credentials() {
        let home = tempfile::tempdir().expect("tempdir");
        let yaml = |extra: &str| {
            format!(
                "    kind: claude\n    env:\n      HOME: {}\n{extra}",
                home.path().display()
            )
        };
        let allow = ["PATH".to_string()];
        let f = |cfg: &AgentConfig| login_fingerprint("a", cfg, &allow);
        let base = agent(&yaml(""));
        let first = f(&base);
        assert_eq!(first, f(&base), "stable");
        assert_ne!(first, f(&agent(&yaml("    model: other\n"))), "config");
        assert_ne!(
            first,
            f(&agent(&yaml("    api_key_env: PATH\n"))),
            "the key it is given"
        );
        // The CLI's own login writes its credential file.
        std::fs::create_dir_all(home.path().join(".claude")).expect("mkdir");
        std::fs::write(home.path().join(".claude/.credentials.json"), "{}").expect("write");
        let logged_in = f(&base);
        assert_ne!(first, logged_in, "credentials");
        assert!(
            !logged_in.contains("PATH") && logged_in.len() == 16,
            "{logged_in}"
        );
    }

    #[test]
    fn json_after_banner_lines() {
        let v = json_document("warning: something\n{\"a\": 1}\n").expect("found");
        assert_eq!(v["a"], 1);
        assert!(json_document("not json").is_none());
        assert!(json_document("").is_none());
    }
}
