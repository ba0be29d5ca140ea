//! The model router: for a task that names no agent and matches no rule, ask an `openai` agent
//! (a local model, typically) which agent fits, as JSON `{category, agent, confidence}`.
//!
//! The router is advice, never a dependency: unreachable, slow (bounded by its timeout), unsure or
//! talking nonsense, it is logged and the task goes down `routing.fallback` as if there were no
//! router. Only agents of the CLI kinds and other `openai` agents are offered; `command` agents run
//! arbitrary programs and are reached by name or by rule only.

use std::time::Duration;

use serde_json::Value;

use crate::config::{AgentKind, Config};
use crate::llm::{ChatRequest, chat};
use crate::task::Task;

/// Without `routing.router.timeout_seconds`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);
/// Answers below this confidence are not followed (without `routing.router.min_confidence`).
pub const DEFAULT_MIN_CONFIDENCE: f64 = 0.5;
/// How much of a description the router sees.
const MAX_DESCRIPTION: usize = 4000;

/// What the router said, or why it said nothing useful.
#[derive(Debug, Clone, PartialEq)]
pub struct Routed {
    /// The agent to try first; `None` sends the task down the fallback chain.
    pub agent: Option<String>,
    /// For the result file's `chosen_because` and the log.
    pub because: String,
}

/// The agents the router may pick from.
pub fn candidates(cfg: &Config) -> Vec<String> {
    let router = cfg.routing.router.as_ref().map(|r| r.agent.as_str());
    cfg.agents
        .iter()
        .filter(|(n, a)| a.kind != AgentKind::Command && Some(n.as_str()) != router)
        .map(|(n, _)| n.clone())
        .collect()
}

pub fn messages(cfg: &Config, task: &Task) -> Vec<(String, String)> {
    let list: Vec<String> = candidates(cfg)
        .iter()
        .map(|n| {
            let a = &cfg.agents[n];
            format!(
                "- {n}: {}{}",
                describe(a.kind),
                a.model
                    .as_deref()
                    .map(|m| format!(" (model {m})"))
                    .unwrap_or_default()
            )
        })
        .collect();
    let system = format!(
        "You route software tasks to the coding agent best suited to them. The agents:\n{}\n\
         Answer with one JSON object and nothing else: \
         {{\"category\": \"<a short label for the kind of task>\", \"agent\": \"<one of the agent names above>\", \
         \"confidence\": <a number from 0 to 1>}}",
        list.join("\n")
    );
    let mut d = task.file.description.clone();
    if d.len() > MAX_DESCRIPTION {
        let mut end = MAX_DESCRIPTION;
        while !d.is_char_boundary(end) {
            end -= 1;
        }
        d.truncate(end);
        d.push_str(" …");
    }
    let mut user = format!("Task: {d}\n");
    if let Some(t) = &task.file.task_type {
        user.push_str(&format!("Type: {t}\n"));
    }
    if !task.file.labels.is_empty() {
        user.push_str(&format!("Labels: {}\n", task.file.labels.join(", ")));
    }
    vec![("system".into(), system), ("user".into(), user)]
}

fn describe(kind: AgentKind) -> &'static str {
    match kind {
        AgentKind::Claude => "Claude Code, edits code in the repository",
        AgentKind::Codex => "OpenAI Codex CLI, edits code and runs commands in the repository",
        AgentKind::Gemini => "Gemini CLI, edits code; good at web search and long context",
        AgentKind::Cursor => "Cursor agent, edits code in the repository",
        AgentKind::Openai => {
            "a chat model, text only: analysis, planning, answers; cannot edit files"
        }
        AgentKind::Command => "a command",
    }
}

/// Read the router's answer: a JSON object, possibly fenced in Markdown or wrapped in prose.
pub fn interpret(cfg: &Config, router: &str, text: &str) -> Routed {
    let fallback = |why: String| Routed {
        agent: None,
        because: format!("router {router} {why}; routing.fallback"),
    };
    let Some(v) = first_object(text) else {
        return fallback(format!("answered no JSON object ({})", quote(text)));
    };
    let Some(agent) = v.get("agent").and_then(Value::as_str) else {
        return fallback(format!("named no agent ({})", quote(text)));
    };
    let agent = agent.trim();
    if !candidates(cfg).iter().any(|c| c == agent) {
        return fallback(format!(
            "named `{}`, which is not an agent it may pick",
            quote(agent)
        ));
    }
    let category = v
        .get("category")
        .and_then(Value::as_str)
        .unwrap_or("-")
        .to_string();
    let confidence = v.get("confidence").and_then(|c| {
        c.as_f64()
            .or_else(|| c.as_str().and_then(|s| s.trim().parse().ok()))
    });
    let min = cfg
        .routing
        .router
        .as_ref()
        .and_then(|r| r.min_confidence)
        .unwrap_or(DEFAULT_MIN_CONFIDENCE);
    match confidence {
        Some(c) if (0.0..=1.0).contains(&c) && c < min => fallback(format!(
            "chose {agent} with confidence {c:.2}, below min_confidence {min:.2}"
        )),
        Some(c) if !(0.0..=1.0).contains(&c) => {
            fallback(format!("gave a confidence of {c}, outside 0..1"))
        }
        c => Routed {
            agent: Some(agent.to_string()),
            because: format!(
                "router {router}: category {}, confidence {}",
                quote(&category),
                c.map(|c| format!("{c:.2}")).unwrap_or("not given".into())
            ),
        },
    }
}

fn quote(s: &str) -> String {
    let one = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if one.chars().count() > 80 {
        format!("{}…", one.chars().take(80).collect::<String>())
    } else {
        one
    }
}

/// The first balanced `{…}` in `text` that parses as a JSON object.
fn first_object(text: &str) -> Option<Value> {
    let bytes = text.as_bytes();
    let mut start = 0;
    while let Some(off) = text[start..].find('{') {
        let s = start + off;
        let (mut depth, mut in_str, mut esc) = (0i32, false, false);
        for (i, &b) in bytes.iter().enumerate().skip(s) {
            match (in_str, esc, b) {
                (true, true, _) => esc = false,
                (true, false, b'\\') => esc = true,
                (true, false, b'"') => in_str = false,
                (true, false, _) => {}
                (false, _, b'"') => in_str = true,
                (false, _, b'{') => depth += 1,
                (false, _, b'}') => {
                    depth -= 1;
                    if depth == 0 {
                        if let Ok(v @ Value::Object(_)) = serde_json::from_str(&text[s..=i]) {
                            return Some(v);
                        }
                        break;
                    }
                }
                _ => {}
            }
        }
        start = s + 1;
    }
    None
}

/// Ask the router about one task. Never fails: every problem becomes a fallback with the reason.
pub async fn route(cfg: &Config, task: &Task) -> Routed {
    let Some(r) = &cfg.routing.router else {
        return Routed {
            agent: None,
            because: "routing.fallback".into(),
        };
    };
    let a = &cfg.agents[&r.agent];
    let timeout = r
        .timeout_seconds
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_TIMEOUT);
    let req = ChatRequest {
        base_url: a.base_url.clone().unwrap_or_default(),
        model: a.model.clone().unwrap_or_default(),
        api_key: a
            .api_key_env
            .as_deref()
            .and_then(|k| std::env::var(k).ok())
            .filter(|k| !k.is_empty()),
        messages: messages(cfg, task),
        timeout,
        json_mode: true,
    };
    match chat(&req, &mut |_| {}).await {
        Ok(reply) => interpret(cfg, &r.agent, &reply.text),
        Err(e) => Routed {
            agent: None,
            because: format!("router {} failed ({e}); routing.fallback", r.agent),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config::parse(
            "agents:\n  claude: {kind: claude}\n  codex: {kind: codex}\n  sh: {kind: command, command: sh}\n  local: {kind: openai, base_url: 'http://127.0.0.1:9/v1', model: m}\nrouting:\n  fallback: [claude, codex]\n  router: {agent: local}\n",
            "c.yaml",
        )
        .unwrap()
    }

    #[test]
    fn offers_cli_agents_but_not_commands_or_itself() {
        assert_eq!(candidates(&cfg()), vec!["claude", "codex"]);
    }

    #[test]
    fn reads_answers_and_refuses_nonsense() {
        let c = cfg();
        let r = interpret(
            &c,
            "local",
            "```json\n{\"category\": \"refactor\", \"agent\": \"codex\", \"confidence\": 0.9}\n```",
        );
        assert_eq!(r.agent.as_deref(), Some("codex"));
        assert!(r.because.contains("refactor"), "{}", r.because);
        for bad in [
            "I think codex",
            "{\"agent\": \"sh\", \"confidence\": 1}",
            "{\"agent\": \"local\"}",
            "{\"agent\": \"gpt-9\"}",
            "{\"category\": \"x\"}",
            "{\"agent\": \"codex\", \"confidence\": 0.2}",
            "{\"agent\": \"codex\", \"confidence\": 7}",
            "{\"agent\": \"codex\"",
        ] {
            let r = interpret(&c, "local", bad);
            assert_eq!(r.agent, None, "{bad} → {r:?}");
            assert!(r.because.ends_with("routing.fallback"), "{}", r.because);
        }
    }

    #[tokio::test]
    async fn unreachable_router_falls_back() {
        let c = cfg();
        let t = crate::task::parse_task("description: x\n", "t", "t").unwrap();
        let r = route(&c, &t).await;
        assert_eq!(r.agent, None);
        assert!(r.because.contains("router local failed"), "{}", r.because);
    }
}
