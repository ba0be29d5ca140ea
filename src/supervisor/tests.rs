//! The loop's decisions, tested without agents or the `select!`: events go to `handle` (and
//! `dispatch_phase`) directly, and the tests look at what a user would see: files in the spool's
//! folders, their explanations, and whether `--once` may stop.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use super::*;
use crate::record::{History, Outcome, TaskResult, Terminal};

fn supervisor(config: &str) -> (tempfile::TempDir, Supervisor) {
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = Config::parse(config, "config.yaml").expect("valid config");
    let sup = Supervisor::new(
        cfg,
        dir.path(),
        Options {
            once: true,
            ..Default::default()
        },
    )
    .expect("supervisor");
    (dir, sup)
}

const CONFIG: &str = "agents:\n  a: {kind: command, command: sh}\nrouting: {fallback: [a]}\n";

/// Write a task file into `pending/`, last modified long enough ago to count as quiet.
fn drop_file(sup: &Supervisor, name: &str, text: &str) -> PathBuf {
    let path = sup.env.spool.layout().pending.join(name);
    std::fs::write(&path, text).expect("write task file");
    let old = SystemTime::now() - Duration::from_secs(60);
    std::fs::File::options()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_modified(old))
        .expect("set mtime");
    path
}

fn failed_result(sup: &Supervisor, id: &str) -> TaskResult {
    sup.env
        .spool
        .read_result(Terminal::Failed, id)
        .expect("a result in failed/")
}

#[test]
fn an_invalid_file_is_rejected_saying_where_it_is_wrong() {
    let (_dir, mut sup) = supervisor(CONFIG);
    let path = drop_file(&sup, "bad.yaml", "description: [unclosed\n");
    sup.handle(Event::Arrived(path));
    let failed = &sup.env.spool.layout().failed;
    assert!(failed.join("bad.yaml").exists());
    let why = std::fs::read_to_string(failed.join("bad.error.txt")).expect("explanation");
    assert!(why.starts_with("bad.yaml:1:14: "), "{why}");
}

#[test]
fn a_file_seen_changing_settles_before_it_is_read() {
    let (_dir, mut sup) = supervisor(CONFIG);
    let path = drop_file(&sup, "t.yaml", "description: x\n");
    sup.handle(Event::Changed(path.clone()));
    assert!(sup.intake.is_settling());
    assert!(!sup.intake.queue.contains("t"));
    // Arriving whole (renamed in, closed by its writer) needs no settling.
    sup.handle(Event::Arrived(path));
    assert!(sup.intake.queue.contains("t"));
}

#[test]
fn a_file_still_open_for_writing_is_not_read_until_its_writer_closes_it() {
    use std::io::Write;
    let (_dir, mut sup) = supervisor(CONFIG);
    let path = drop_file(&sup, "t.yaml", "description: x\n");
    // A child that inherited the descriptor closed it (close-write news), but we still write.
    let mut writer = std::fs::File::options()
        .append(true)
        .open(&path)
        .expect("open for writing");
    sup.handle(Event::Closed(path.clone()));
    assert!(
        !sup.intake.queue.contains("t"),
        "read while open for writing"
    );
    // A scan that finds it quiet does not read it either.
    sup.handle(Event::Rescan);
    sup.handle(Event::ScanChunk);
    assert!(!sup.intake.queue.contains("t"));
    let held: Vec<_> = sup.intake.held().collect();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].1.writer.pid, std::process::id());
    assert!(
        sup.intake.is_settling(),
        "a held file keeps the settle ticker going"
    );

    // Held for long: the page a phone reads says who holds it.
    sup.intake.backdate_held(intake::OPEN_NOTE_AFTER);
    sup.handle(Event::SettleTick);
    assert!(sup.state_dirty, "the note is news for current_state.md");
    sup.write_state_files();
    let page = std::fs::read_to_string(sup.env.layout.current_state()).expect("current_state.md");
    assert!(
        page.contains("## Still being written")
            && page.contains(&format!(
                "tasks/pending/t.yaml: still open for writing by pid {}",
                std::process::id()
            )),
        "{page}"
    );

    writer.write_all(b"dependencies: [t0]\n").expect("write");
    drop(writer);
    sup.handle(Event::Closed(path));
    sup.handle(Event::SettleTick);
    // Read whole: with what was written last.
    assert_eq!(
        sup.intake
            .queue
            .get("t")
            .map(|p| p.task.file.dependencies.clone()),
        Some(vec!["t0".to_string()])
    );
    assert_eq!(sup.intake.held().count(), 0);
}

#[test]
fn a_file_renamed_in_is_read_at_once() {
    let (_dir, mut sup) = supervisor(CONFIG);
    let path = drop_file(&sup, "t.yaml", "description: x\n");
    // Renaming is the protocol that needs no look at writers: even one still open is read.
    let _writer = std::fs::File::options()
        .append(true)
        .open(&path)
        .expect("open for writing");
    sup.handle(Event::Arrived(path));
    assert!(sup.intake.queue.contains("t"));
}

#[test]
fn a_cancel_fails_a_pending_task_without_running_it() {
    let (_dir, mut sup) = supervisor(CONFIG);
    let path = drop_file(&sup, "t.yaml", "description: x\n");
    sup.handle(Event::Arrived(path));
    assert!(sup.intake.queue.contains("t"));
    let requests = sup.env.layout.cancel_dir();
    std::fs::create_dir_all(&requests).expect("cancel dir");
    std::fs::write(requests.join("t"), "").expect("cancel request");
    sup.handle(Event::CancelRequested);
    assert_eq!(
        failed_result(&sup, "t").error.as_deref(),
        Some("cancelled by user")
    );
    assert!(!requests.join("t").exists(), "the request is answered");
    assert_eq!(sup.ledger.status("t"), Some(Terminal::Failed));
    assert!(sup.runs.is_empty());
}

#[test]
fn a_rescan_forgets_a_task_whose_file_left_pending() {
    let (_dir, mut sup) = supervisor(CONFIG);
    let path = drop_file(&sup, "t.yaml", "description: x\n");
    sup.handle(Event::Arrived(path.clone()));
    std::fs::remove_file(&path).expect("remove");
    sup.handle(Event::Rescan);
    assert!(!sup.intake.queue.contains("t"));
    assert!(!sup.intake.is_scanning());
}

#[test]
fn a_dependency_cycle_fails_every_member_at_the_next_dispatch() {
    let (_dir, mut sup) = supervisor(CONFIG);
    for (id, dep) in [("a", "b"), ("b", "a")] {
        let text = format!("description: x\ndependencies: [{dep}]\n");
        let path = drop_file(&sup, &format!("{id}.yaml"), &text);
        sup.handle(Event::Arrived(path));
    }
    sup.dispatch_phase();
    for id in ["a", "b"] {
        let error = failed_result(&sup, id).error.unwrap_or_default();
        assert!(error.starts_with("dependency cycle: "), "{error}");
    }
    assert!(sup.runs.is_empty());
}

#[test]
fn once_stays_for_a_retry_back_off_and_not_for_a_task_nothing_can_run() {
    let (_dir, mut sup) = supervisor(CONFIG);
    let history = History {
        task_id: "t".into(),
        version: 2,
        not_before: Some(fsutil::fmt_time(
            time::OffsetDateTime::now_utc() + Duration::from_secs(60),
        )),
        ..Default::default()
    };
    let sidecar = sup.env.spool.history_path("t");
    std::fs::write(
        sidecar,
        crate::record::to_yaml(&history, &crate::redact::Redactor::none()),
    )
    .expect("history");
    let path = drop_file(&sup, "t.yaml", "description: x\n");
    sup.handle(Event::Arrived(path));
    assert!(!sup.nothing_left(), "the back-off ends by itself");

    let (_dir, mut sup) = supervisor(
        "agents:\n  gone: {kind: command, command: no-such-agent-cli-here}\nrouting: {fallback: [gone]}\n",
    );
    let path = drop_file(&sup, "t.yaml", "description: x\n");
    sup.handle(Event::Arrived(path));
    sup.dispatch_phase();
    assert!(sup.intake.queue.contains("t"));
    assert!(
        sup.nothing_left(),
        "a CLI that is not installed does not come by itself"
    );
}

#[test]
fn once_stays_for_a_task_that_waits_for_a_cooldown() {
    let (_dir, mut sup) = supervisor(CONFIG);
    let until = Some(Duration::from_secs(60));
    sup.dispatch
        .cool_down("a", Outcome::RateLimited, until, None, "429");
    let path = drop_file(&sup, "t.yaml", "description: x\n");
    sup.handle(Event::Arrived(path));
    sup.dispatch_phase();
    assert!(sup.runs.is_empty(), "the only agent rests");
    let note = sup.intake.queue.get("t").and_then(|p| p.note.clone());
    assert!(
        note.as_ref().is_some_and(|n| n.waits_for_cooldown()),
        "{note:?}"
    );
    assert!(!sup.nothing_left());
}
