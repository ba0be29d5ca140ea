//! Faults of the disk and of peers: a `tasks/` that refuses the end of a run (full, read-only), a
//! peer stopped while it holds the spool lock. Each test prints a `RELIABILITY` line with what was
//! thrown and what was lost. The tests that mount file systems are in `root` (tools/test skips
//! them when not run as root).

mod common;

use std::time::Duration;

use common::*;

/// The test configuration with `tasks/` and the state directory on `dir` (one file system: the
/// spool refuses to start otherwise); `context/` and the supervisor's log stay on the normal disk.
/// The free-space floor is off: these file systems are a few MiB, below the default floor, and
/// the tests are about what happens when writes fail, not about the floor holding claims back.
fn config_on(dir: &std::path::Path, extra: &str) -> String {
    let extra = format!("workspace:\n  min_free_disk_mb: 0\n{extra}");
    test_config(&extra).replacen(
        "orchestrator:\n",
        &format!(
            "orchestrator:\n  tasks_dir: {0}/tasks\n  state_dir: {0}/state\n",
            dir.display()
        ),
        1,
    )
}

fn result_of(dir: &std::path::Path, state: &str, id: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join(format!("tasks/{state}/{id}_result.yaml")))
        .expect("result file");
    yaml_to_json(&text)
}

fn runs(counter: &std::path::Path) -> u32 {
    std::fs::read_to_string(counter)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

mod root {
    use super::*;

    /// A full disk refuses the result of an agent that succeeded: the outcome is held, `status`
    /// says why, and it lands when space returns, without running the agent again.
    #[test]
    fn a_finish_refused_by_a_full_disk_lands_when_space_returns_without_a_rerun() {
        let fs = Tmpfs::mount("4m");
        let p = Project::with_config(
            &config_on(fs.path(), "").replace("max_retries: 1", "max_retries: 0"),
        );
        let mut sup = p.start();
        let go = p.path("go");
        let counter = p.path("runs");
        p.drop_task_in(
            &fs.path().join("tasks/pending"),
            "t.yaml",
            &format!(
                "description: \"@fake wait-for={} fail-until={}:1 print=finished-once\"\n",
                go.display(),
                counter.display()
            ),
        );
        let assigned = fs.path().join("tasks/assigned/t.claim.yaml");
        wait_for("t to run", Duration::from_secs(10), || assigned.exists());
        let _ = fs.fill("fill");
        std::fs::write(&go, "").expect("let the agent finish");
        wait_for("the refusal", Duration::from_secs(20), || {
            sup.output().contains("cannot finish t:")
        });
        assert!(
            sup.output().contains("No space left on device"),
            "{}",
            sup.output()
        );
        // The mirror lives on the full disk too and cannot take a note: the supervisor says it in
        // space its instance file reserved at start.
        let mut status = String::new();
        wait_for("status to say why", Duration::from_secs(10), || {
            status = p.run(&["status"]).stdout();
            status.contains("problem: cannot finish t: ") && status.contains("No space left")
        });

        std::fs::remove_file(fs.path().join("fill")).expect("free the space");
        let done = fs.path().join("tasks/completed/t.yaml");
        wait_for("t to land in completed/", Duration::from_secs(60), || {
            done.exists()
        });
        let r = result_of(fs.path(), "completed", "t");
        let attempts = r["attempts"].as_array().expect("attempts");
        assert_eq!(attempts.len(), 1, "{r}");
        assert_eq!(attempts[0]["outcome"], "completed");
        assert_eq!(runs(&counter), 1, "the agent ran again");
        assert!(
            p.read("context/agent_outputs/t_output.md")
                .contains("finished-once")
        );
        // The file lands before the loop hears its commit is back.
        wait_for("the landing to be said", Duration::from_secs(10), || {
            sup.output().contains("landed     t:")
        });
        assert!(sup.stop().success(), "{}", sup.output());
        eprintln!(
            "RELIABILITY faults disk-full-at-finish: thrown 1, lost 0, runs {}",
            runs(&counter)
        );
    }

    /// `completed/` refuses the result (read-only), the supervisor is killed meanwhile: the kept
    /// outcome is committed at the next start, and the agent does not run again.
    #[test]
    fn an_outcome_kept_in_the_state_directory_survives_a_kill_and_is_committed_at_start() {
        let fs = Tmpfs::mount("16m");
        let p = Project::with_config(&config_on(fs.path(), ""));
        let mut sup = p.start();
        let counter = p.path("runs");
        let completed = fs.path().join("tasks/completed");
        bind_read_only(&completed);
        p.drop_task_in(
            &fs.path().join("tasks/pending"),
            "t.yaml",
            &format!(
                "description: \"@fake fail-until={}:1 print=kept\"\n",
                counter.display()
            ),
        );
        wait_for("the refusal", Duration::from_secs(20), || {
            sup.output().contains("cannot finish t:")
        });
        let kept = fs.path().join("state/unfinished/t.result.yaml");
        assert!(kept.exists(), "{}", sup.output());
        sup.sigkill();
        unmount(&completed);

        let mut again = p.start();
        let done = completed.join("t.yaml");
        wait_for("t to land in completed/", Duration::from_secs(20), || {
            done.exists()
        });
        assert_eq!(runs(&counter), 1, "the agent ran again: {}", again.output());
        let r = result_of(fs.path(), "completed", "t");
        assert_eq!(r["attempts"].as_array().map(|a| a.len()), Some(1), "{r}");
        assert!(!kept.exists(), "the kept copy is removed once it landed");
        assert!(again.stop().success(), "{}", again.output());
        eprintln!("RELIABILITY faults read-only-completed-and-kill: thrown 1, lost 0, runs 1");
    }

    /// A requeue refused (`pending/` read-only) is held and lands later; the retry then runs.
    #[test]
    fn a_requeue_refused_by_a_read_only_pending_lands_later() {
        let fs = Tmpfs::mount("16m");
        let p = Project::with_config(&config_on(fs.path(), ""));
        let mut sup = p.start();
        let counter = p.path("runs");
        let pending = fs.path().join("tasks/pending");
        p.drop_task_in(
            &pending,
            "t.yaml",
            &format!(
                "description: \"@fake wait-for={} fail-until={}:2\"\n",
                p.path("go").display(),
                counter.display()
            ),
        );
        let claim = fs.path().join("tasks/assigned/t.claim.yaml");
        wait_for("t to run", Duration::from_secs(10), || claim.exists());
        bind_read_only(&pending);
        std::fs::write(p.path("go"), "").expect("let the agent fail");
        wait_for("the refusal", Duration::from_secs(20), || {
            sup.output().contains("cannot requeue t:")
        });
        unmount(&pending);
        let done = fs.path().join("tasks/completed/t.yaml");
        wait_for(
            "t to complete on its retry",
            Duration::from_secs(60),
            || done.exists(),
        );
        assert_eq!(runs(&counter), 2);
        assert!(sup.stop().success(), "{}", sup.output());
        eprintln!("RELIABILITY faults read-only-pending-at-requeue: thrown 1, lost 0, runs 2");
    }

    /// The state directory's file system below `workspace.min_free_disk_mb`: no claim, a note
    /// that says why, and the task runs by itself once space comes back (nothing else changes).
    #[test]
    fn claims_wait_below_the_free_disk_floor_and_resume_when_space_returns() {
        let fs = Tmpfs::mount("32m");
        let p = Project::with_config(
            &config_on(fs.path(), "").replace("min_free_disk_mb: 0", "min_free_disk_mb: 20"),
        );
        let mut sup = p.start();
        std::fs::write(fs.path().join("filler"), vec![1u8; 16 * 1024 * 1024]).expect("filler");
        // Looked at once a second (on the heartbeat when nothing else happens): said at once.
        wait_for(
            "the supervisor to see the floor",
            Duration::from_secs(20),
            || sup.output().contains("no new claims until there is more"),
        );
        p.drop_task_in(
            &fs.path().join("tasks/pending"),
            "t.yaml",
            "description: \"@fake print=ran\"\n",
        );
        let mut status = String::new();
        wait_for("t to wait for disk space", Duration::from_secs(20), || {
            status = p.run(&["status"]).stdout();
            status.contains("waiting for disk space")
        });
        assert!(
            status.contains("problem: no new claims:")
                && status.contains("below workspace.min_free_disk_mb (20 MiB)"),
            "{status}"
        );
        assert!(fs.path().join("tasks/pending/t.yaml").exists(), "{status}");

        std::fs::remove_file(fs.path().join("filler")).expect("free the space");
        wait_for("t to complete", Duration::from_secs(30), || {
            fs.path().join("tasks/completed/t.yaml").exists()
        });
        let out = sup.output();
        assert_eq!(
            out.matches("no new claims until there is more").count(),
            1,
            "{out}"
        );
        assert_eq!(out.matches("claims resume").count(), 1, "{out}");
        assert!(
            !p.run(&["status"]).stdout().contains("no new claims"),
            "the problem is cleared"
        );
        assert!(sup.stop().success(), "{}", sup.output());
        eprintln!("RELIABILITY faults free-disk-floor: thrown 1, lost 0");
    }

    /// `context/` full: the prompt cannot be written. The task waits (no attempt counted) and says
    /// why with the path, and runs once space returns.
    #[test]
    fn a_full_context_folder_makes_tasks_wait_not_fail() {
        let fs = Tmpfs::mount("1m");
        let config = test_config("").replacen(
            "orchestrator:\n",
            &format!(
                "orchestrator:\n  context_dir: {}/context\n",
                fs.path().display()
            ),
            1,
        );
        let p = Project::with_config(&config.replace("max_retries: 1", "max_retries: 0"));
        let mut sup = p.start();
        let _ = fs.fill("fill");
        p.drop_task("t.yaml", "description: \"@fake print=ran\"\n");
        let mut status = String::new();
        wait_for("t to wait, saying why", Duration::from_secs(20), || {
            status = p.run(&["status"]).stdout();
            status.contains("No space left on device")
        });
        assert!(
            status.contains(&format!(
                "{}/context/logs/t/attempt-1.prompt.md",
                fs.path().display()
            )),
            "the reason names the path: {status}"
        );
        assert!(p.tasks_in("failed").is_empty(), "{}", sup.output());

        std::fs::remove_file(fs.path().join("fill")).expect("free the space");
        wait_for("t to complete", Duration::from_secs(30), || {
            p.tasks_in("completed") == vec!["t"]
        });
        let r = p.result("completed", "t");
        assert_eq!(r["attempts"].as_array().map(|a| a.len()), Some(1), "{r}");
        assert!(sup.stop().success(), "{}", sup.output());
        eprintln!("RELIABILITY faults full-context-folder: thrown 1, lost 0, attempts counted 1");
    }

    fn bind_read_only(dir: &std::path::Path) {
        for args in [
            vec!["--bind", "DIR", "DIR"],
            vec!["-o", "remount,bind,ro", "DIR"],
        ] {
            let args: Vec<std::ffi::OsString> = args
                .iter()
                .map(|a| {
                    if *a == "DIR" {
                        dir.as_os_str().to_owned()
                    } else {
                        a.into()
                    }
                })
                .collect();
            let ok = std::process::Command::new("mount")
                .args(&args)
                .status()
                .expect("mount");
            assert!(ok.success(), "mount {args:?}");
        }
    }

    fn unmount(dir: &std::path::Path) {
        let ok = std::process::Command::new("umount")
            .arg(dir)
            .status()
            .expect("umount");
        assert!(ok.success(), "umount {}", dir.display());
    }
}

/// The clock was set back after a back-off was written: the wait is never longer than the
/// back-off itself (here its history says 1 s, ending two hours from now by the clock).
#[test]
fn a_clock_set_back_cannot_stretch_a_retry_back_off() {
    let p = Project::new();
    let later = time::OffsetDateTime::now_utc() + time::Duration::hours(2);
    let until = later
        .format(&time::format_description::well_known::Rfc3339)
        .expect("format");
    std::fs::write(
        p.path("tasks/pending/.t.history.yaml"),
        format!(
            "task_id: t\nversion: 2\nnot_before: \"{until}\"\nbackoff_seconds: 1.0\nreason: exit code 1\n"
        ),
    )
    .expect("write history");
    let mut sup = p.start();
    p.drop_task("t.yaml", "description: \"@fake print=ran\"\n");
    wait_for(
        "t to run after its 1 s back-off",
        Duration::from_secs(15),
        || p.tasks_in("completed") == vec!["t"],
    );
    assert!(sup.stop().success(), "{}", sup.output());
    eprintln!("RELIABILITY faults clock-set-back-during-back-off: thrown 1, lost 0, waited <= 1 s");
}

/// A peer stopped (SIGSTOP) while it holds the spool lock: another supervisor on the tree starts,
/// stays responsive and stops on SIGTERM.
#[test]
fn a_peer_stopped_while_holding_the_spool_lock_does_not_freeze_the_other() {
    let p = Project::new();
    let mut a = p.start_with_env(&[
        ("ORCHESTRATE_PAUSE_AT", "claim.after_rename:1"),
        ("ORCHESTRATE_PAUSE_MS", "60000"),
    ]);
    p.drop_task("t.yaml", "description: \"@fake print=hi\"\n");
    wait_for(
        "a to pause holding the lock",
        Duration::from_secs(10),
        || a.output().contains("paused at claim.after_rename"),
    );
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(a.pid() as i32, libc::SIGSTOP);
    }
    // Its start-up recovery and every rescan (2 s) want the lock.
    let mut b = p.start();
    std::thread::sleep(Duration::from_secs(3));
    let status = b.stop();
    assert!(status.success(), "{}", b.output());
    assert!(b.output().contains("supervisor stopped"), "{}", b.output());
    // SAFETY: as above.
    unsafe {
        libc::kill(a.pid() as i32, libc::SIGCONT);
    }
    a.sigkill();
    eprintln!("RELIABILITY faults stopped-peer-holding-lock: thrown 1, frozen 0");
}
