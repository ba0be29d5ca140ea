//! The `notify` key of `config.yaml`: notification channels, their checks and defaults.
//!
//! A channel says which events it wants (`on`), which tasks (`filter`), and where they go: a
//! `command` run with the event on stdin, or a `webhook` POSTed to. Everything is checked here,
//! once, with errors naming the key (`notify[1].webhook.url`); the `notify` module that delivers
//! never parses a value again. Nothing here sends, runs or reads a database.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What a channel can be told about. Task events come from the mirror's `task_events`; agent
/// events (`cooldown`, `budget`, `needs_login`, `stalled`) from the code that decides them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NotifyOn {
    /// A task completed (also said of one that needs review or hit a merge conflict).
    Completed,
    Failed,
    /// A task completed and touched a `security.review_paths` file.
    ReviewRequired,
    /// A task completed but its changes did not apply to the working tree (`merge: conflict`).
    MergeConflict,
    /// An agent hit a rate limit or its quota and rests.
    Cooldown,
    /// An agent (or all of them) reached a spending limit and pauses.
    Budget,
    /// An agent's credentials were refused.
    NeedsLogin,
    /// An attempt was stopped for making no progress.
    Stalled,
}

impl NotifyOn {
    pub const ALL: [NotifyOn; 8] = [
        NotifyOn::Completed,
        NotifyOn::Failed,
        NotifyOn::ReviewRequired,
        NotifyOn::MergeConflict,
        NotifyOn::Cooldown,
        NotifyOn::Budget,
        NotifyOn::NeedsLogin,
        NotifyOn::Stalled,
    ];

    /// What a channel that does not say `on` is told: what needs a person.
    pub const DEFAULT: [NotifyOn; 5] = [
        NotifyOn::Failed,
        NotifyOn::ReviewRequired,
        NotifyOn::MergeConflict,
        NotifyOn::Budget,
        NotifyOn::NeedsLogin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NotifyOn::Completed => "completed",
            NotifyOn::Failed => "failed",
            NotifyOn::ReviewRequired => "review_required",
            NotifyOn::MergeConflict => "merge_conflict",
            NotifyOn::Cooldown => "cooldown",
            NotifyOn::Budget => "budget",
            NotifyOn::NeedsLogin => "needs_login",
            NotifyOn::Stalled => "stalled",
        }
    }

    pub fn parse(s: &str) -> Option<NotifyOn> {
        NotifyOn::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Whether the event is about one task (else about an agent).
    pub fn is_task_event(self) -> bool {
        matches!(
            self,
            NotifyOn::Completed
                | NotifyOn::Failed
                | NotifyOn::ReviewRequired
                | NotifyOn::MergeConflict
        )
    }
}

/// One entry of `notify`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyChannel {
    /// Default: `command-N` or `webhook-N` (N its index in the list). Undelivered events and the
    /// channel's place in the event stream are kept under this name.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub on: Option<Vec<NotifyOn>>,
    #[serde(default)]
    pub filter: NotifyFilter,
    #[serde(default)]
    pub command: Option<NotifyCommand>,
    #[serde(default)]
    pub webhook: Option<Webhook>,
    /// One delivery's time limit (the command's run, the HTTP request); default 30.
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
    /// An event still not delivered this long after it was queued is given up on (and shown by
    /// `orchestrate status`); default 60.
    #[serde(default)]
    pub give_up_minutes: Option<f64>,
}

/// Only events about tasks that match all of what is given (an agent event matches `agents` only;
/// `labels` and `description` let no agent event through).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotifyFilter {
    /// The task has at least one of these labels.
    pub labels: Vec<String>,
    /// The event's agent is one of these.
    pub agents: Vec<String>,
    /// A regular expression the task's description matches.
    pub description: Option<String>,
    #[serde(skip)]
    pub regex: Option<regex::Regex>,
}

impl NotifyFilter {
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.agents.is_empty() && self.description.is_none()
    }
}

/// A command: an argv list (run directly) or one string (run by `/bin/sh -c`).
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum NotifyCommand {
    Shell(String),
    Argv(Vec<String>),
}

// By hand rather than `untagged`, whose error ("did not match any variant") says nothing useful.
impl<'de> Deserialize<'de> for NotifyCommand {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = NotifyCommand;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a shell command (a string) or a list: the program, then its arguments")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<NotifyCommand, E> {
                Ok(NotifyCommand::Shell(v.to_string()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<NotifyCommand, A::Error> {
                let mut v = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    v.push(s);
                }
                Ok(NotifyCommand::Argv(v))
            }
        }
        d.deserialize_any(V)
    }
}

impl NotifyCommand {
    /// Program and arguments.
    pub fn argv(&self) -> (String, Vec<String>) {
        match self {
            NotifyCommand::Shell(s) => ("/bin/sh".into(), vec!["-c".into(), s.clone()]),
            NotifyCommand::Argv(v) => (v[0].clone(), v[1..].to_vec()),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// The event as JSON.
    #[default]
    None,
    /// ntfy.sh (or a self-hosted ntfy): the message as plain text, `Title`, `Tags`, `Priority`.
    Ntfy,
    /// A Slack incoming webhook: `{"text": MESSAGE}`.
    Slack,
    /// A Discord webhook: `{"content": MESSAGE}`.
    Discord,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    /// `${VAR}` is expanded from the environment (a Slack URL is a secret).
    pub url: String,
    /// Extra request headers; values may use `${VAR}`.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Signs the body: `X-Orchestrate-Signature: sha256=<hex HMAC-SHA256 of the body>`. May use
    /// `${VAR}`.
    #[serde(default)]
    pub secret: Option<String>,
    #[serde(default)]
    pub preset: Preset,
    /// The environment variables `url`, `headers` and `secret` named: their values are secrets.
    #[serde(skip)]
    pub secret_vars: Vec<String>,
}

/// Per-delivery time limit when a channel does not say.
pub const DEFAULT_TIMEOUT_SECONDS: u64 = 30;
/// How long an undelivered event is retried when a channel does not say.
pub const DEFAULT_GIVE_UP_MINUTES: f64 = 60.0;

impl NotifyChannel {
    /// The name it is known by (set by [`check`] when the file gave none).
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or_default()
    }

    /// What it is told about.
    pub fn events(&self) -> &[NotifyOn] {
        self.on.as_deref().unwrap_or(&NotifyOn::DEFAULT)
    }

    /// Whether an event of `kind` is for this channel. `completed` takes every completed task,
    /// the ones needing review or with a conflict too.
    pub fn wants(&self, kind: NotifyOn) -> bool {
        let on = self.events();
        on.contains(&kind)
            || (matches!(kind, NotifyOn::ReviewRequired | NotifyOn::MergeConflict)
                && on.contains(&NotifyOn::Completed))
    }

    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.timeout_seconds.unwrap_or(DEFAULT_TIMEOUT_SECONDS))
    }

    pub fn give_up_after(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(
            self.give_up_minutes.unwrap_or(DEFAULT_GIVE_UP_MINUTES) * 60.0,
        )
    }
}

/// Expand `${VAR}` in the webhook values, remembering which variables were named.
pub(super) fn expand_env(channels: &mut [NotifyChannel]) {
    for c in channels {
        if let Some(w) = &mut c.webhook {
            let mut vars = Vec::new();
            w.url = expand(&w.url, &mut vars);
            for v in w.headers.values_mut() {
                *v = expand(v, &mut vars);
            }
            if let Some(s) = &mut w.secret {
                *s = expand(s, &mut vars);
            }
            w.secret_vars = vars;
        }
    }
}

fn expand(s: &str, vars: &mut Vec<String>) -> String {
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        match rest[i + 2..].find('}') {
            Some(j) => {
                vars.push(rest[i + 2..i + 2 + j].to_string());
                rest = &rest[i + 3 + j..];
            }
            None => break,
        }
    }
    super::expand_vars(s)
}

/// Check every channel and compile its filter; errors are `(key, message)`.
pub(super) fn check(
    channels: &mut [NotifyChannel],
    agents: &BTreeMap<String, super::AgentConfig>,
) -> Result<(), (String, String)> {
    let mut names: Vec<String> = Vec::new();
    for (i, c) in channels.iter_mut().enumerate() {
        let key = |k: &str| format!("notify[{i}].{k}");
        let kind = match (&c.command, &c.webhook) {
            (Some(_), None) => "command",
            (None, Some(_)) => "webhook",
            (Some(_), Some(_)) => {
                return Err((
                    format!("notify[{i}]"),
                    "a channel has either `command` or `webhook`, not both".into(),
                ));
            }
            (None, None) => {
                return Err((
                    format!("notify[{i}]"),
                    "a channel needs `command` (run with the event on stdin) or `webhook` (POSTed to)"
                        .into(),
                ));
            }
        };
        let name = c.name.clone().unwrap_or_else(|| format!("{kind}-{i}"));
        if !crate::task::valid_name(&name) {
            return Err((
                key("name"),
                format!("`{name}`: channel names may use letters, digits, `.`, `_` and `-` only"),
            ));
        }
        if names.contains(&name) {
            return Err((
                key("name"),
                format!("`{name}` names two channels; give each its own `name`"),
            ));
        }
        names.push(name.clone());
        c.name = Some(name);
        if c.on.as_ref().is_some_and(Vec::is_empty) {
            return Err((
                key("on"),
                format!(
                    "must list at least one of: {} (leave it out for the default: {})",
                    NotifyOn::ALL.map(NotifyOn::as_str).join(", "),
                    NotifyOn::DEFAULT.map(NotifyOn::as_str).join(", ")
                ),
            ));
        }
        if c.timeout_seconds == Some(0) {
            return Err((key("timeout_seconds"), "must be at least 1".into()));
        }
        if let Some(m) = c.give_up_minutes
            && !(m > 0.0 && m.is_finite())
        {
            return Err((key("give_up_minutes"), "must be a positive number".into()));
        }
        for (j, a) in c.filter.agents.iter().enumerate() {
            if !agents.contains_key(a) {
                return Err((
                    key(&format!("filter.agents[{j}]")),
                    format!("unknown agent `{a}` (not under `agents`)"),
                ));
            }
        }
        c.filter.regex = match &c.filter.description {
            Some(re) => Some(
                regex::Regex::new(re)
                    .map_err(|e| (key("filter.description"), format!("bad regex: {e}")))?,
            ),
            None => None,
        };
        match &c.command {
            Some(NotifyCommand::Shell(s)) if s.trim().is_empty() => {
                return Err((key("command"), "must be a shell command, not empty".into()));
            }
            Some(NotifyCommand::Argv(v)) if v.first().is_none_or(|p| p.trim().is_empty()) => {
                return Err((key("command"), "must start with the program to run".into()));
            }
            _ => {}
        }
        if let Some(w) = &c.webhook {
            check_webhook(w, &|k| key(&format!("webhook.{k}")))?;
        }
    }
    Ok(())
}

fn check_webhook(w: &Webhook, key: &dyn Fn(&str) -> String) -> Result<(), (String, String)> {
    if w.url.trim().is_empty() {
        return Err((
            key("url"),
            "is empty (an unset `${VAR}` expands to nothing)".into(),
        ));
    }
    match reqwest::Url::parse(&w.url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {}
        Ok(_) => {
            return Err((key("url"), "must be an http:// or https:// URL".into()));
        }
        Err(e) => return Err((key("url"), format!("not a URL: {e}"))),
    }
    for (k, v) in &w.headers {
        if reqwest::header::HeaderName::from_bytes(k.as_bytes()).is_err() {
            return Err((
                key(&format!("headers.{k}")),
                "is not a valid HTTP header name".into(),
            ));
        }
        if reqwest::header::HeaderValue::from_str(v).is_err() {
            return Err((
                key(&format!("headers.{k}")),
                "the value is not a valid HTTP header value (a line break or a control character)"
                    .into(),
            ));
        }
    }
    if w.secret.as_ref().is_some_and(|s| s.is_empty()) {
        return Err((
            key("secret"),
            "is empty (an unset `${VAR}` expands to nothing); leave the key out to send unsigned"
                .into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn err(notify: &str) -> String {
        let text = format!("agents:\n  a: {{kind: command, command: sh}}\nnotify:\n{notify}");
        match Config::parse(&text, "config.yaml") {
            Ok(_) => panic!("accepted:\n{notify}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn channels_get_names_and_default_events() {
        let cfg = Config::parse(
            "notify:\n  - command: [notify-send]\n  - webhook: {url: https://ntfy.sh/x, preset: ntfy}\n    on: [completed]\n",
            "config.yaml",
        )
        .expect("valid");
        assert_eq!(cfg.notify[0].name(), "command-0");
        assert_eq!(cfg.notify[1].name(), "webhook-1");
        assert_eq!(cfg.notify[0].events(), &super::NotifyOn::DEFAULT);
        assert!(cfg.notify[1].wants(super::NotifyOn::MergeConflict));
        assert!(!cfg.notify[1].wants(super::NotifyOn::Failed));
    }

    #[test]
    fn bad_channels_are_refused_naming_the_key() {
        for (yaml, key, says) in [
            ("  - on: [failed]\n", "notify[0]", "needs `command`"),
            (
                "  - command: x\n    webhook: {url: http://h}\n",
                "notify[0]",
                "not both",
            ),
            (
                "  - webhook: {url: ftp://h/x}\n",
                "notify[0].webhook.url",
                "http://",
            ),
            (
                "  - webhook: {url: nonsense}\n",
                "notify[0].webhook.url",
                "not a URL",
            ),
            (
                "  - webhook: {url: http://h, headers: {\"a b\": x}}\n",
                "notify[0].webhook.headers.a b",
                "header name",
            ),
            ("  - command: []\n", "notify[0].command", "program"),
            (
                "  - command: x\n    on: []\n",
                "notify[0].on",
                "at least one",
            ),
            (
                "  - command: x\n    filter: {agents: [nobody]}\n",
                "notify[0].filter.agents[0]",
                "unknown agent",
            ),
            (
                "  - command: x\n    filter: {description: \"(\"}\n",
                "notify[0].filter.description",
                "bad regex",
            ),
            (
                "  - command: one\n    name: a\n  - command: two\n    name: a\n",
                "notify[1].name",
                "two channels",
            ),
            (
                "  - command: x\n    timeout_seconds: 0\n",
                "notify[0].timeout_seconds",
                "at least 1",
            ),
        ] {
            let e = err(yaml);
            assert!(e.contains(key) && e.contains(says), "{yaml}: {e}");
        }
        for (yaml, says) in [
            (
                "  - command: x\n    on: [failed, sometimes]\n",
                "config.yaml:5:",
            ),
            ("  - command: {program: x}\n", "config.yaml:4:"),
        ] {
            let e = err(yaml);
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn webhook_values_expand_variables_and_count_as_secrets() {
        // SAFETY: a variable only this test reads.
        unsafe { std::env::set_var("NOTIFY_TEST_HOOK_SECRET", "s3cr3t-value") };
        let cfg = Config::parse(
            "notify:\n  - webhook: {url: \"https://h/${NOTIFY_TEST_HOOK_SECRET}\", secret: \"${NOTIFY_TEST_HOOK_SECRET}\"}\n",
            "config.yaml",
        )
        .expect("valid");
        let w = cfg.notify[0].webhook.as_ref().expect("webhook");
        assert_eq!(w.url, "https://h/s3cr3t-value");
        assert_eq!(w.secret.as_deref(), Some("s3cr3t-value"));
        assert!(
            cfg.secret_names()
                .contains(&"NOTIFY_TEST_HOOK_SECRET".to_string())
        );
    }
}
