//! Arbitrary bytes as a task file, read the way the supervisor reads one: `task::read_task` on a file
//! in the spool (size cap, UTF-16 and UTF-8 checks, then `parse_task`).
//!
//! Beyond "no panic" it checks:
//! - an accepted task obeys every rule the parser promises (valid, unreserved id; non-empty
//!   description; valid dependencies and agent; positive finite timeout; non-empty subtasks);
//! - what orchestrate writes back parses again to the same task: `to_yaml` of the file (as
//!   `orchestrate add` does) and the child files the supervisor writes when it expands `subtasks`;
//! - a rejection renders to `name:line:col: message`, non-empty, in the user's words, with a line
//!   that exists in the file, and a line at all unless the problem is the whole file.
//!
//! `ORCH_FUZZ_SKIP=check,check` turns named checks off (to keep exploring past a known bug):
//! `roundtrip`, `subtasks`, `error-line`.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use orchestrate::scheduler::{subtask_file, subtask_id};
use orchestrate::task::{self, MAX_ID_LEN, Task, TaskError, TaskFile};

/// The name the scratch file gets in the "spool": its stem is the default id.
const NAME: &str = "task_001.yaml";
const STEM: &str = "task_001";
/// `orchestrator.max_task_bytes` by default.
const MAX_BYTES: u64 = 1024 * 1024;

struct Env {
    path: PathBuf,
    skip: Vec<String>,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        // One scratch directory per fuzzing process (libFuzzer's -fork/-jobs run several).
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("orchestrate-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        let skip = std::env::var("ORCH_FUZZ_SKIP")
            .unwrap_or_default()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        Env {
            path: dir.join(NAME),
            skip,
        }
    })
}

fn on(check: &str) -> bool {
    !env().skip.iter().any(|s| s == check)
}

fuzz_target!(|data: &[u8]| {
    let path = &env().path;
    std::fs::write(path, data).expect("write scratch task file");
    match task::read_task(path, MAX_BYTES) {
        Ok((t, bytes)) => {
            assert_eq!(bytes, data, "read_task must hand back the bytes it parsed");
            check_task(&t, STEM);
            if on("roundtrip") {
                round_trip(&t.file, STEM, &t.id, "to_yaml of the parsed file");
            }
            if on("subtasks") {
                expand_subtasks(&t);
            }
        }
        Err(e) => check_error(&e, data),
    }
});

fn reserved(id: &str) -> bool {
    id.ends_with("_result") || id.ends_with(".claim") || id.ends_with(".error")
}

/// Everything `parse_task` promises about a task it accepts.
fn check_task(t: &Task, stem: &str) {
    let f = &t.file;
    assert!(task::valid_name(&t.id), "accepted invalid id {:?}", t.id);
    assert!(t.id.len() <= MAX_ID_LEN);
    assert!(!reserved(&t.id), "accepted reserved id {:?}", t.id);
    assert_eq!(t.id, f.id.as_deref().unwrap_or(stem), "id is the file's or the stem");
    assert!(!f.description.trim().is_empty(), "accepted empty description");
    for d in &f.dependencies {
        assert!(task::valid_name(d), "accepted invalid dependency {d:?}");
        assert_ne!(d, &t.id, "accepted self-dependency");
    }
    if let Some(a) = &f.agent {
        assert!(task::valid_name(a), "accepted invalid agent {a:?}");
    }
    if let Some(m) = f.timeout_minutes {
        assert!(m > 0.0 && m.is_finite(), "accepted timeout_minutes {m}");
    }
    assert!(f.subtasks.iter().all(|s| !s.trim().is_empty()), "accepted empty subtask");
    let _ = t.priority();
}

/// orchestrate writes task files with `to_yaml` and reads them back with the same parser: what it
/// writes must parse, to the same task.
fn round_trip(file: &TaskFile, stem: &str, id: &str, what: &str) {
    let text = file.to_yaml();
    match task::parse_task(&text, stem, "<written>") {
        Ok(back) => {
            assert_eq!(&back.file, file, "{what}: re-parse differs\n--- written:\n{text}");
            assert_eq!(back.id, id, "{what}: id changed\n--- written:\n{text}");
        }
        Err(e) => panic!(
            "{what}: orchestrate wrote a task it then rejects: {}\n--- written:\n{text}",
            e.render("<written>")
        ),
    }
}

/// The child files `Supervisor::expand_subtasks` writes for a parent with `subtasks`.
fn expand_subtasks(parent: &Task) {
    for i in 0..parent.file.subtasks.len() {
        let id = subtask_id(&parent.id, i + 1);
        let child = subtask_file(parent, i + 1);
        round_trip(&child, &id, &id, &format!("subtask {} of {:?}", i + 1, parent.id));
        // Only the first few: a parent may list thousands, each the same check.
        if i >= 3 {
            break;
        }
    }
}

/// Problems that concern the whole file, for which no line applies.
fn whole_file(msg: &str) -> bool {
    msg.starts_with("empty file")
        || msg.starts_with("file contains NUL bytes")
        || msg.starts_with("file is UTF-16")
        || msg.starts_with("file is ") && msg.contains("-byte limit")
        || msg.starts_with("cannot read")
        || msg.starts_with("not a regular file")
        // An id taken from the file name (no `id:` key) has no line of its own.
        || msg.starts_with("invalid task id")
}

fn check_error(e: &TaskError, data: &[u8]) {
    let msg = e.message();
    assert!(!msg.trim().is_empty(), "empty error message: {e:?}");
    let rendered = e.render(NAME);
    assert!(
        rendered.starts_with(&format!("{NAME}:")) && rendered.len() > NAME.len() + 2,
        "rendered error does not start with the file name: {rendered:?}"
    );
    // The parser's wording for programmers must not reach users. Only the message is checked (the
    // excerpt quotes the file), and not when the file itself says it: messages quote what they read
    // (with control characters shown as spaces).
    let seen: Vec<u8> = data.iter().map(|&b| if b < 0x20 || b == 0x7f { b' ' } else { b }).collect();
    for jargon in ["DuplicateKeyPolicy", "from_str_multiple", "untagged enum"] {
        let quoted = seen.windows(jargon.len()).any(|w| w == jargon.as_bytes());
        assert!(quoted || !msg.contains(jargon), "programmer wording in: {rendered}");
    }
    // YAML breaks lines at \n, \r\n and a lone \r; the last line may lack a break.
    let lines = 1 + data
        .iter()
        .enumerate()
        .filter(|&(i, &b)| b == b'\n' || (b == b'\r' && data.get(i + 1) != Some(&b'\n')))
        .count();
    let p = &e.problem;
    if let Some(l) = p.line {
        assert!(l >= 1 && l <= lines, "line {l} outside the file's {lines} lines: {rendered}");
    }
    if p.column.is_some() {
        assert!(p.line.is_some(), "column without line: {e:?}");
        assert!(p.column >= Some(1), "column 0: {rendered}");
    }
    if on("error-line") && p.line.is_none() {
        assert!(whole_file(msg), "no line number for: {rendered}");
    }
}
