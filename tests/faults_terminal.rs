//! Faults of what orchestrate prints, against the real binary.
//!
//! Output that cannot be written: the supervisor keeps supervising when the reader of its stdout goes
//! away (`orchestrate start | head`), when every write to its console fails (`/dev/full`), and when
//! its log is on a full file system (a tmpfs filled up, then freed); read commands end quietly with
//! exit 0 when their reader is gone. Text that cannot be trusted: escape sequences, bells, C1
//! controls and bidirectional overrides written by an agent, in a task's description or in an error
//! reach `show`, `tasks`, `status`, `follow` and the supervisor's console escaped, never raw, while
//! the files under `context/` keep the bytes as written; a file name with line breaks is quoted in
//! diffs the way git quotes it.
//!
//! Every case prints one line `RELIABILITY faults_terminal <case>: ...` for RELIABILITY.md
//! (`cargo nextest run --test faults_terminal --no-capture`). The full-disk case mounts a tmpfs and
//! so needs root: it sits in the module `root`, which `tools/test` skips (saying so) when it does not
//! run as root, and refuses to skip under CI.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn report(case: &str, figures: &str) {
    eprintln!("RELIABILITY faults_terminal {case}: {figures}");
}

/// `orchestrate start -v` with the given stdout and stderr (the harness's `start` logs to a file).
fn spawn_start(p: &Project, stdout: Stdio, stderr: Stdio, log: PathBuf) -> Supervisor {
    let child = p
        .cmd(&["start", "-v"])
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .expect("spawn supervisor");
    Supervisor {
        child: Some(child),
        log,
    }
}

/// Fails the test at once, with what the supervisor said, if it is no longer running.
#[track_caller]
fn assert_alive(sup: &mut Supervisor, when: &str) {
    let child = sup.child.as_mut().expect("running");
    if let Some(status) = child.try_wait().expect("try_wait") {
        panic!(
            "the supervisor exited ({status}) {when}; what it wrote to {}:\n{}",
            sup.log.display(),
            sup.output()
        );
    }
}

/// Wait until `n` tasks are in `completed/`, failing at once if the supervisor dies meanwhile.
#[track_caller]
fn wait_completed(p: &Project, sup: &mut Supervisor, n: usize, when: &str) {
    wait_for(
        &format!("{n} tasks in completed/ {when}"),
        Duration::from_secs(90),
        || {
            assert_alive(sup, when);
            p.tasks_in("completed").len() >= n
        },
    );
}

/// `orchestrate stop`, then the supervisor's own exit status.
fn stop(p: &Project, sup: &mut Supervisor) -> std::process::ExitStatus {
    p.run(&["stop", "--timeout", "60"]).assert_code(0);
    let mut child = sup.child.take().expect("running");
    wait_child(&mut child, Duration::from_secs(60)).expect("the supervisor exits after stop")
}

fn task(description: &str) -> String {
    let lines: String = description.lines().map(|l| format!("  {l}\n")).collect();
    format!("description: |\n{lines}")
}

// ---- output that cannot be written ------------------------------------------------------------------

/// `orchestrate start | head`: the reader reads while four agents run, then goes away. The agents'
/// ends and everything after are printed to a pipe nobody reads; the supervisor carries on.
#[test]
fn the_supervisor_keeps_supervising_after_the_reader_of_its_stdout_goes_away() {
    let p = Project::new();
    let errlog = p.path("stderr.log");
    let err = std::fs::File::create(&errlog).expect("stderr log");
    let mut sup = spawn_start(&p, Stdio::piped(), Stdio::from(err), errlog.clone());
    let stdout = sup
        .child
        .as_mut()
        .and_then(|c| c.stdout.take())
        .expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = Vec::new();
        let mut started = 0;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            started += usize::from(line.contains("started    slow"));
            lines.push(line);
            if started == 4 {
                break;
            }
        }
        // The pipe's only reader is dropped with the iterator, before this is sent.
        let _ = tx.send((started, lines));
    });
    for i in 1..=4 {
        p.drop_task(
            &format!("slow{i}.yaml"),
            &task(&format!("slow task {i}\n@fake sleep=2")),
        );
    }
    let (started, lines) = rx
        .recv_timeout(Duration::from_secs(90))
        .expect("the reader saw four agents start");
    assert_eq!(
        started,
        4,
        "the reader met the end of stdout first:\n{}",
        lines.join("\n")
    );
    wait_completed(&p, &mut sup, 4, "after the reader of stdout left");
    for i in 5..=7 {
        p.drop_task(
            &format!("late{i}.yaml"),
            &task(&format!("late task {i}\n@fake sleep=0.2")),
        );
    }
    wait_completed(
        &p,
        &mut sup,
        7,
        "for the tasks dropped after the reader left",
    );
    assert_alive(&mut sup, "after its tasks completed");
    // SIGPIPE stays ignored (the Rust runtime's choice; nothing resets it): a write to the closed
    // pipe is an EPIPE the console handles, never a kill.
    let proc_status =
        std::fs::read_to_string(format!("/proc/{}/status", sup.pid())).expect("status");
    let ignored = proc_status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .expect("SigIgn in /proc/PID/status");
    assert_ne!(
        ignored & (1 << (libc::SIGPIPE - 1)),
        0,
        "SIGPIPE is not ignored"
    );
    let status = stop(&p, &mut sup);
    let said = std::fs::read_to_string(&errlog).unwrap_or_default();
    assert_eq!(
        status.code(),
        Some(0),
        "stop ended it with {status}:\n{said}"
    );
    assert!(!said.contains("panicked"), "{said}");
    // Said once on stderr; stdout's own lines do not move there.
    assert!(said.contains("stdout is closed"), "{said}");
    assert!(!said.contains("supervisor stopped"), "{said}");
    assert!(p.tasks_in("assigned").is_empty() && p.tasks_in("pending").is_empty());
    assert_eq!(p.tasks_in("completed").len(), 7);
    report(
        "closed-stdout",
        &format!(
            "4 agents running when the reader left after {} lines, 3 tasks dropped after; completed 7 of 7, supervisor alive, stop exit 0",
            lines.len()
        ),
    );
}

/// Every console write fails (`/dev/full`: no space left, from the first byte, on stdout and
/// stderr): the supervisor runs its tasks and stops cleanly all the same. Runs without root.
#[test]
fn the_supervisor_keeps_supervising_when_no_console_line_can_be_written() {
    let p = Project::new();
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("open /dev/full");
    let mut sup = spawn_start(
        &p,
        Stdio::from(full.try_clone().expect("dup")),
        Stdio::from(full),
        PathBuf::from("/dev/full"),
    );
    for i in 1..=3 {
        p.drop_task(
            &format!("t{i}.yaml"),
            &task(&format!("task {i}\n@fake sleep=0.2")),
        );
    }
    wait_completed(&p, &mut sup, 3, "with every console write failing");
    let status = stop(&p, &mut sup);
    assert_eq!(status.code(), Some(0), "stop ended it with {status}");
    assert!(p.tasks_in("assigned").is_empty() && p.tasks_in("pending").is_empty());
    report(
        "dev-full-console",
        "every console write failed (ENOSPC); completed 3 of 3, stop exit 0",
    );
}

/// `orchestrate tasks | head` and the rest: a read command whose reader is gone before it writes a
/// byte ends quietly with exit 0 (ripgrep's convention), saying nothing on stderr; a command that
/// acts (`add`) has done its work by then.
#[test]
fn commands_end_quietly_with_success_when_their_reader_is_gone() {
    let p = Project::new();
    let mut sup = p.start();
    for i in 1..=3 {
        p.drop_task(&format!("t{i}.yaml"), &task(&format!("task {i}")));
    }
    wait_completed(&p, &mut sup, 3, "before the reads");
    assert!(sup.stop().success(), "{}", sup.output());
    let task_file = p.path("tasks/completed/t1.yaml");
    let task_file = task_file.to_str().expect("utf-8 path");
    let cases: &[&[&str]] = &[
        &["tasks"],
        &["tasks", "--json"],
        &["status"],
        &["status", "--json"],
        &["show", "t1"],
        &["agents"],
        &["follow", "--since", "0", "--limit", "2"],
        &["validate", task_file],
        &["completions", "bash"],
        &["man"],
        &["add", "added after the reader left", "--id", "added"],
    ];
    for args in cases {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let mut child = p
            .cmd(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(writer))
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let status = wait_child(&mut child, Duration::from_secs(60))
            .unwrap_or_else(|| panic!("orchestrate {args:?} did not end with its reader gone"));
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
            .expect("read stderr");
        assert_eq!(
            status.code(),
            Some(0),
            "orchestrate {args:?} with its reader gone: {status}\n{err}"
        );
        assert!(err.is_empty(), "orchestrate {args:?} said:\n{err}");
    }
    assert_eq!(p.tasks_in("pending"), vec!["added"]);
    report(
        "closed-stdout-commands",
        &format!(
            "{} commands with their reader gone: all exit 0, nothing on stderr",
            cases.len()
        ),
    );
}

/// A tmpfs filled to the last byte under the supervisor's log, then freed.
mod root {
    use super::*;

    #[test]
    fn the_supervisor_keeps_supervising_on_a_full_disk_and_says_what_it_lost_once_it_can() {
        let fs = Tmpfs::mount("64k");
        let p = Project::new();
        let log = fs.path().join("supervisor.log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log");
        let filled = fs.fill("filler");
        let mut sup = spawn_start(
            &p,
            Stdio::from(out.try_clone().expect("dup")),
            Stdio::from(out),
            log.clone(),
        );
        for i in 1..=3 {
            p.drop_task(
                &format!("t{i}.yaml"),
                &task(&format!("task {i}\n@fake sleep=0.2")),
            );
        }
        wait_completed(&p, &mut sup, 3, "with its log on a full disk");
        let while_full = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        // Space again: the next line gets through, after a note of how many did not.
        std::fs::remove_file(fs.path().join("filler")).expect("free the space");
        p.drop_task("after.yaml", &task("after the space came back"));
        wait_completed(&p, &mut sup, 4, "after the space came back");
        wait_for(
            "the console to say how many lines it lost",
            Duration::from_secs(30),
            || sup.output().contains("could not be written to stdout"),
        );
        let status = stop(&p, &mut sup);
        let said = sup.output();
        assert_eq!(
            status.code(),
            Some(0),
            "stop ended it with {status}:\n{said}"
        );
        assert!(!said.contains("panicked"), "{said}");
        assert!(said.contains("completed  after"), "{said}");
        assert!(said.contains("supervisor stopped"), "{said}");
        let lost: u64 = said
            .lines()
            .find_map(|l| {
                let (_, rest) = l.split_once("warning: ")?;
                let (n, rest) = rest.split_once(' ')?;
                rest.starts_with("console line(s) could not be written to stdout")
                    .then(|| n.parse().ok())?
            })
            .unwrap_or_else(|| panic!("no count of lost lines:\n{said}"));
        assert!(lost > 0, "{said}");
        assert!(p.tasks_in("assigned").is_empty() && p.tasks_in("pending").is_empty());
        report(
            "full-disk-log",
            &format!(
                "log on a 64 KiB tmpfs filled ({filled} bytes of filler, {while_full} bytes of log while full); \
                 completed 3 of 3 while full, {lost} stdout lines lost and counted, output resumed once space was freed; stop exit 0"
            ),
        );
    }
}

// ---- text that cannot be trusted --------------------------------------------------------------------

/// The test configuration plus a `shell` agent (runs the description with `sh -c`).
fn config_with_shell() -> String {
    test_config("").replacen(
        "agents:\n",
        "agents:\n  shell:\n    kind: command\n    command: sh\n    args: [-c, \"{description}\"]\n    max_instances: 2\n",
        1,
    )
}

/// Fails unless `text` has no raw ESC, BEL, CSI (C1), RLO or carriage return, and shows each of
/// `shown` (escaped forms).
#[track_caller]
fn assert_escaped(what: &str, text: &[u8], shown: &[&str]) {
    let s = String::from_utf8_lossy(text);
    for (c, name) in [
        ('\u{1b}', "ESC"),
        ('\u{7}', "BEL"),
        ('\u{9b}', "CSI (C1)"),
        ('\u{202e}', "RIGHT-TO-LEFT OVERRIDE"),
        ('\r', "carriage return"),
    ] {
        assert!(!s.contains(c), "{what} printed a raw {name}:\n{s:?}");
    }
    for v in shown {
        assert!(s.contains(v), "{what} does not show {v}:\n{s}");
    }
}

/// What the hostile task writes, as YAML escapes: clear the screen, set the window title, a C1 CSI,
/// a right-to-left override, a carriage return; its error sets the clipboard (OSC 52).
const HOSTILE: &str = r#"description: "clear \e[2J title \e]0;PWNED\a c1 \u009B31m bidi \u202Eevil\u202C cr \rover\n@fake echo-prompt stderr=\e]52;c;UFdORUQ=\a\e]0;PWNED\a\u202E exit=3"
max_retries: 0
"#;

/// A file named with line breaks that look like diff headers (a name cannot hold a slash).
const LINE_BREAK_NAME: &str = "x\n+++ b\ndiff --git a b";

#[test]
fn escapes_from_agents_tasks_and_errors_are_shown_not_obeyed_and_files_keep_them() {
    let p = Project::with_config(&config_with_shell());
    std::fs::create_dir_all(p.path("work")).expect("mkdir work");
    let mut sup = p.start();
    p.drop_task("evil.yaml", HOSTILE);
    p.drop_task(
        "names.yaml",
        "agent: shell\nworkdir: work\ndescription: |\n  printf 'hi\\n' > \"$(printf 'x\\n+++ b\\ndiff --git a b')\"\n",
    );
    wait_for(
        "evil in failed/ and names in completed/",
        Duration::from_secs(90),
        || p.tasks_in("failed") == ["evil"] && p.tasks_in("completed") == ["names"],
    );
    // The current-state page, rewritten on its ticker, lists the file the shell task made.
    wait_for(
        "current_state.md to list the file names made",
        Duration::from_secs(30),
        || {
            std::fs::read_to_string(p.path("context/current_state.md"))
                .is_ok_and(|s| s.contains(" — changed "))
        },
    );
    assert!(sup.stop().success(), "{}", sup.output());

    // The files keep what was written: the agent's output byte for byte, the error as its value.
    let output = std::fs::read(p.path("context/agent_outputs/evil_output.md")).expect("output");
    for raw in [
        "\u{1b}[2J",
        "\u{1b}]0;PWNED\u{7}",
        "\u{9b}31m",
        "\u{202e}evil",
        "\rover",
    ] {
        assert!(
            output.windows(raw.len()).any(|w| w == raw.as_bytes()),
            "the output file lost {raw:?}: {:?}",
            String::from_utf8_lossy(&output)
        );
    }
    let result = p.result("failed", "evil");
    let error = result["error"].as_str().expect("an error").to_string();
    assert!(
        error.contains("\u{1b}]52;c;UFdORUQ=\u{7}"),
        "the result keeps the error as the agent wrote it: {error:?}"
    );

    // The supervisor's console: the failure line carries the error, escaped.
    assert_escaped(
        "the supervisor's console",
        sup.output().as_bytes(),
        &["failed     evil: ", "\\u{1b}]52;c;UFdORUQ=\\u{7}"],
    );

    // The read commands.
    let show = p.run(&["show", "evil"]);
    show.assert_code(0);
    assert_escaped(
        "show",
        &show.out.stdout,
        &[
            "\\u{1b}[2J",
            "\\u{1b}]0;PWNED\\u{7}",
            "\\u{9b}31m",
            "\\u{202e}evil",
            "\\u{d}over",
            "\\u{1b}]52;c;UFdORUQ=\\u{7}",
        ],
    );
    let tasks = p.run(&["tasks"]);
    tasks.assert_code(0);
    assert_escaped(
        "tasks",
        &tasks.out.stdout,
        &["\\u{1b}[2J", "\\u{1b}]0;PWNED\\u{7}", "\\u{1b}]52;c;"],
    );
    let events: i64 = p
        .db()
        .query_row("SELECT count(*) FROM task_events", [], |r| r.get(0))
        .expect("count events");
    let follow = p.run(&["follow", "--since", "0", "--limit", &events.to_string()]);
    follow.assert_code(0);
    assert_escaped(
        "follow",
        &follow.out.stdout,
        &["\\u{1b}]52;c;UFdORUQ=\\u{7}"],
    );
    // `status` shows the command of a process that holds a task file open for writing: one named
    // with an escape sequence (its name is what the kernel reports, from the file it ran).
    let bin = tempfile::tempdir().expect("tempdir");
    let evil_name = bin.path().join("\u{1b}]0;PWNED\u{7}");
    std::os::unix::fs::symlink(which("sleep"), &evil_name).expect("symlink");
    let held = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(p.path("tasks/pending/held.yaml"))
        .expect("held file");
    // argv[0] stays `sleep`, for a multi-call coreutils that dispatches on it.
    let mut writer = Command::new(&evil_name)
        .arg0("sleep")
        .arg("60")
        .stdin(Stdio::null())
        .stdout(Stdio::from(held))
        .spawn()
        .expect("spawn the writer");
    let status = p.run(&["status"]);
    let _ = writer.kill();
    let _ = writer.wait();
    status.assert_code(0);
    assert_escaped(
        "status",
        &status.out.stdout,
        &[
            "held.yaml: still open for writing by pid",
            "(\\u{1b}]0;PWNED\\u{7})",
        ],
    );

    // JSON stays JSON, with every such character as a \u escape, and reads back to the same text.
    for args in [&["tasks", "--json"][..], &["show", "evil", "--json"][..]] {
        let run = p.run(args);
        run.assert_code(0);
        assert_escaped(
            &format!("{args:?}"),
            &run.out.stdout,
            &["\\u001b", "\\u202e"],
        );
        let v = run.json();
        assert!(
            v.to_string().contains("\\u001b]0;PWNED\\u0007"),
            "{args:?} no longer holds the text: {v}"
        );
    }

    // A file name with line breaks: quoted in the diff as git quotes it, no line of its own.
    let diff = p.read("context/diffs/names.diff");
    let quoted = "\"b/x\\n+++ b\\ndiff --git a b\"";
    assert!(diff.contains(&format!("+++ {quoted}\n")), "{diff}");
    assert_eq!(
        diff.lines().filter(|l| l.starts_with("+++")).count(),
        1,
        "{diff}"
    );
    assert!(!diff.lines().any(|l| l.starts_with("diff --git")), "{diff}");
    let names = p.result("completed", "names");
    assert_eq!(
        names["files_modified"],
        serde_json::json!([LINE_BREAK_NAME])
    );
    let state = p.read("context/current_state.md");
    assert_escaped(
        "current_state.md",
        state.as_bytes(),
        &["evil (fake): exited with code 3: \\u{1b}]52;c;"],
    );
    assert!(
        state.contains("changed \"x\\n+++ b\\ndiff --git a b\""),
        "{state}"
    );
    let show_names = p.run(&["show", "names"]);
    show_names.assert_code(0);
    assert!(
        !show_names
            .stdout()
            .lines()
            .any(|l| l.starts_with("diff --git") || l == "+++ b"),
        "{}",
        show_names.stdout()
    );
    report(
        "escapes",
        "ESC, BEL, CSI, OSC 0 and 52, C1 CSI, RLO and CR from an agent's output, a description and an error: \
         escaped in show, tasks, status, follow, the console and current_state.md, \\u-escaped in --json; the output file keeps the raw bytes",
    );
    report(
        "line-break-file-name",
        "a file named \"x\\n+++ b\\ndiff --git a b\": quoted in the diff header, current_state.md and show; no fake header line",
    );
}

/// The full path of a program on PATH.
fn which(program: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(program))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| panic!("{program} is not on PATH"))
}
