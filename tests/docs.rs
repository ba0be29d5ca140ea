//! The documentation's examples, run: every ```console block of README.md and docs/*.md is executed
//! by trycmd against the built binary, and what it prints must match what the page shows. A changed
//! message, flag or exit code fails here instead of leaving the docs wrong.
//!
//! Each document is a case under `tests/docs/`: a symlink to the page, `<name>.out/` (its presence
//! makes trycmd run the page's commands, all blocks in order, in a fresh temporary folder) and, when
//! the page starts from files of its own, `<name>.in/` (copied into that folder first). `[..]` and
//! `...` in a block elide what changes from run to run: times, host names, temporary paths.
//!
//! The commands see a fixed environment: a `PATH` without any agent CLI, so a page can show what
//! happens when one is missing whatever is installed here, and none of the variables that would
//! change what orchestrate does (a project root, a database URL, API keys whose values get redacted,
//! the reliability suite's switches). Pages never start a long-lived supervisor or a real agent CLI:
//! those examples are fenced as `text` or `sh` and are not run.
//!
//! To update a page after a deliberate change: `TRYCMD=overwrite cargo nextest run --test docs`,
//! then read every block it rewrote.

use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::Duration;

/// The pages whose examples run, each with its case under `tests/docs/`.
const PAGES: &[&str] = &[
    "README.md",
    "docs/commands.md",
    "docs/configuration.md",
    "docs/task-format.md",
    "docs/folder-protocol.md",
    "docs/agents.md",
    "docs/postgres.md",
];

/// Variables that change what orchestrate does or prints; the commands must not inherit them.
const SCRUBBED: &[&str] = &[
    "ORCHESTRATE_ROOT",
    "ORCHESTRATE_SERVE_TOKEN",
    "DATABASE_URL",
    "ANTHROPIC_API_KEY",
    "OPENAI_API_KEY",
    "GEMINI_API_KEY",
    "CURSOR_API_KEY",
    "ORCHESTRATE_NO_WATCH",
    "ORCHESTRATE_CRASH_AT",
    "ORCHESTRATE_PAUSE_AT",
    "ORCHESTRATE_PAUSE_MS",
];

/// Where the commands find programs: the system's, and no agent CLI (those live under
/// `tools/agents/node_modules/.bin` or in a user's own folders, never in these two).
const PATH: &str = "/usr/bin:/bin";

static SCRUB: Once = Once::new();

fn scrub_environment() {
    // trycmd can add variables to a command but not take them away, so they leave this process.
    SCRUB.call_once(|| {
        for var in SCRUBBED {
            // SAFETY: every test in this file calls this before it spawns anything, and `Once`
            // holds the others back until it is done, so no thread reads the environment meanwhile.
            unsafe { std::env::remove_var(var) };
        }
    });
}

/// A system program the pages use beside orchestrate (`cat` to show a file, `mv` to drop one).
fn system_program(name: &str) -> PathBuf {
    PATH.split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{name}` is not in {PATH}"))
}

fn case_of(page: &str) -> PathBuf {
    let name = Path::new(page).file_name().expect("a page has a file name");
    Path::new("tests/docs").join(name)
}

#[track_caller]
fn run_page(page: &str) {
    scrub_environment();
    let case = case_of(page);
    let target = std::fs::canonicalize(&case)
        .unwrap_or_else(|e| panic!("{}: {e} (a symlink to {page})", case.display()));
    assert_eq!(
        target,
        std::fs::canonicalize(page).expect("the page exists"),
        "{} must be a symlink to {page}",
        case.display()
    );
    assert!(
        case.with_extension("out").is_dir(),
        "{} needs {}/ so its commands run in a temporary folder, not in the repository",
        case.display(),
        case.with_extension("out").display()
    );
    trycmd::TestCases::new()
        .register_bin("orchestrate", trycmd::cargo::cargo_bin!("orchestrate"))
        .register_bin("cat", system_program("cat"))
        .register_bin("mv", system_program("mv"))
        .env("PATH", PATH)
        // Bounded: a command that hangs fails its page instead of the run.
        .timeout(Duration::from_secs(60))
        .case(&case)
        .run();
}

#[test]
fn readme() {
    run_page("README.md");
}

#[test]
fn commands() {
    run_page("docs/commands.md");
}

#[test]
fn configuration() {
    run_page("docs/configuration.md");
}

#[test]
fn task_format() {
    run_page("docs/task-format.md");
}

#[test]
fn folder_protocol() {
    run_page("docs/folder-protocol.md");
}

#[test]
fn agents() {
    run_page("docs/agents.md");
}

#[test]
fn postgres() {
    run_page("docs/postgres.md");
}

/// A page with a ```console block that no test runs would go stale unseen: each one is in `PAGES`,
/// or its examples are fenced as something else (`text`, `sh`).
#[test]
fn every_page_with_console_examples_is_run() {
    let mut pages = vec![PathBuf::from("README.md")];
    for entry in std::fs::read_dir("docs").expect("docs/") {
        let path = entry.expect("docs/ entry").path();
        if path.extension().is_some_and(|e| e == "md") {
            pages.push(path);
        }
    }
    for page in pages {
        let text = std::fs::read_to_string(&page).expect("readable page");
        let runs = PAGES.iter().any(|p| Path::new(p) == page);
        let has_console = text
            .lines()
            .any(|l| l.trim_start().starts_with("```console") || l.trim() == "```trycmd");
        assert!(
            runs || !has_console,
            "{} has ```console examples that no test runs: add it to PAGES in tests/docs.rs (with \
             tests/docs/{name} → ../../{page} and tests/docs/{stem}.out/.keep), or fence them as ```sh",
            page.display(),
            name = page.file_name().expect("name").to_string_lossy(),
            page = page.display(),
            stem = page.file_stem().expect("stem").to_string_lossy(),
        );
    }
}
