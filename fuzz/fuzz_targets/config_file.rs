//! Arbitrary bytes as `config.yaml`, through `Config::parse` as `Config::load` calls it (load reads
//! the file with `read_to_string`, so bytes that are not UTF-8 never reach the parser).
//!
//! Beyond "no panic" it checks that an accepted config obeys what `validate` promises, that parsing
//! is deterministic, and that a rejection renders as `name:line[:col]: ...`, non-empty, in the
//! user's words, with a line that exists in the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use orchestrate::config::{AgentKind, Config};
use orchestrate::error::ConfigError;

const NAME: &str = "config.yaml";

fuzz_target!(
    init: {
        // Config::parse falls back to $DATABASE_URL when the file has no `database.url`: keep the
        // result a function of the input alone.
        // SAFETY: runs once, before libFuzzer starts calling the target; no other threads yet.
        unsafe { std::env::remove_var("DATABASE_URL") };
    },
    |data: &[u8]| {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        let first = Config::parse(text, NAME);
        match &first {
            Ok(cfg) => check_config(cfg),
            Err(e) => check_error(e, text),
        }
        // Same input, same answer (agents live in a BTreeMap, so validation order is fixed).
        let again = Config::parse(text, NAME);
        match (&first, &again) {
            (Ok(_), Ok(_)) => {}
            (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "nondeterministic error"),
            _ => panic!("parse is not deterministic"),
        }
    }
);

fn check_config(c: &Config) {
    let o = &c.orchestrator;
    assert!(o.max_concurrent >= 1);
    assert!(o.rescan_seconds >= 1);
    assert!(o.kill_grace_seconds >= 0.0 && o.kill_grace_seconds.is_finite());
    assert!(["error", "warn", "info", "debug"].contains(&o.log_level.as_str()));
    let q = &c.task_queue;
    for v in [q.timeout_minutes, q.retry_delay_seconds, q.aging_minutes] {
        assert!(v >= 0.0 && v.is_finite(), "accepted task_queue value {v}");
    }
    for (name, a) in &c.agents {
        assert!(orchestrate::task::valid_name(name), "accepted agent name {name:?}");
        assert!(a.max_instances >= 1);
        if a.kind == AgentKind::Command {
            assert!(a.command.is_some(), "command agent {name} without command");
        }
        if a.kind == AgentKind::Openai {
            assert!(a.base_url.as_deref().is_some_and(|v| !v.trim().is_empty()));
            assert!(a.model.as_deref().is_some_and(|v| !v.trim().is_empty()));
        }
        if let Some(p) = &a.prices {
            for v in [p.input_per_mtok, p.output_per_mtok, p.cached_input_per_mtok.unwrap_or(0.0)] {
                assert!(v >= 0.0 && v.is_finite(), "agent {name}: accepted price {v}");
            }
            let _ = p.cost(1_000, 1_000, 1_000);
        }
        let _ = c.attempt_timeout(None, a);
        let _ = c.attempt_timeout(Some(1.0), a);
    }
    for n in &c.routing.fallback {
        assert!(c.agents.contains_key(n), "accepted unknown fallback agent {n:?}");
    }
    for r in &c.routing.rules {
        assert!(c.agents.contains_key(&r.agent), "accepted unknown rule agent {:?}", r.agent);
        if let Some(re) = &r.matches {
            assert!(regex::Regex::new(re).is_ok(), "accepted bad regex {re:?}");
        }
    }
    if let Some(r) = &c.routing.router {
        assert!(c.agents.get(&r.agent).is_some_and(|a| a.kind == AgentKind::Openai));
    }
    for g in c.security.review_paths.iter().chain(&c.context.diff_exclude) {
        assert!(glob::Pattern::new(g).is_ok(), "accepted bad glob {g:?}");
    }
    if let Some(url) = &c.database.url {
        assert!(!url.trim().is_empty(), "an empty database.url must mean no mirror");
    }
}

fn check_error(e: &ConfigError, text: &str) {
    let rendered = e.to_string();
    assert!(
        rendered.starts_with(NAME) && rendered.len() > NAME.len() + 2,
        "error does not start with the file name: {rendered:?}"
    );
    // The parser's wording for programmers must not reach users. Only the message is checked (the
    // excerpt quotes the file), and not when the file itself says it: messages quote what they read
    // (with control characters shown as spaces).
    let first_line = rendered.lines().next().unwrap_or_default();
    let seen: Vec<u8> = text.as_bytes().iter().map(|&b| if b < 0x20 || b == 0x7f { b' ' } else { b }).collect();
    for jargon in ["DuplicateKeyPolicy", "from_str_multiple", "untagged enum"] {
        let quoted = seen.windows(jargon.len()).any(|w| w == jargon.as_bytes());
        assert!(quoted || !first_line.contains(jargon), "programmer wording in: {rendered}");
    }
    let b = text.as_bytes();
    let lines = 1 + b
        .iter()
        .enumerate()
        .filter(|&(i, &c)| c == b'\n' || (c == b'\r' && b.get(i + 1) != Some(&b'\n')))
        .count();
    let (line, message) = match e {
        ConfigError::Read { .. } => panic!("parse never reads a file: {rendered}"),
        ConfigError::Yaml { at, problem } => {
            assert!(at.starts_with(NAME), "{rendered}");
            if problem.column.is_some() {
                assert!(problem.line.is_some(), "column without line: {e:?}");
            }
            (problem.line, problem.message.as_str())
        }
        ConfigError::Invalid { key, line, message, .. } => {
            assert!(!key.is_empty(), "{rendered}");
            (*line, message.as_str())
        }
    };
    assert!(!message.trim().is_empty(), "empty message: {rendered:?}");
    if let Some(l) = line {
        assert!(l >= 1 && l <= lines, "line {l} outside the file's {lines} lines: {rendered}");
    }
}
