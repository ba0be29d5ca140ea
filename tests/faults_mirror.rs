//! Faults of the mirror while a supervisor runs: a PostgreSQL server that stops answering (the
//! connection stays open, nothing comes back) and the SQLite mirror's file deleted under it.
//!
//! Every case prints one line `RELIABILITY faults-mirror <case>: ...` with its counts (lost must be
//! 0), which RELIABILITY.md quotes: `cargo nextest run --test faults_mirror --no-capture`. The
//! PostgreSQL cases are in the module `postgres`, so `tools/test` skips them without a server.

mod common;

use std::time::Duration;

use common::*;

/// Print the figures for RELIABILITY.md, then insist nothing was lost.
#[track_caller]
fn report(case: &str, figures: &str, lost: usize) {
    eprintln!("RELIABILITY faults-mirror {case}: {figures}, lost {lost}");
    assert_eq!(lost, 0, "{case}: {lost} lost");
}

fn drop_tasks(p: &Project, prefix: &str, n: usize) {
    for i in 0..n {
        p.drop_task(
            &format!("{prefix}{i:03}.yaml"),
            "description: \"@fake print=ok\"\n",
        );
    }
}

/// Tasks of the tree (id, state) that a mirror does not hold as such.
fn missing(tree: &[(String, String)], rows: &[(String, String)]) -> usize {
    tree.iter().filter(|t| !rows.contains(t)).count()
}

/// A child process that is killed and reaped if the test ends before it does: a failed wait must
/// not leave a reader hanging behind the test.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// [`wait_for`], printing the supervisor's output if it times out: what the supervisor said is
/// what explains a fault it did not handle.
#[track_caller]
fn wait_showing(sup: &Supervisor, what: &str, limit: Duration, cond: impl FnMut() -> bool) {
    let waited =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| wait_for(what, limit, cond)));
    if let Err(e) = waited {
        eprintln!("--- supervisor output\n{}", sup.output());
        std::panic::resume_unwind(e);
    }
}

/// Lines of the supervisor's output that contain `text`.
fn lines_with(sup: &Supervisor, text: &str) -> usize {
    sup.output().lines().filter(|l| l.contains(text)).count()
}

/// Deleting `.orchestrate/state.db` (with its `-wal` and `-shm`) while the supervisor runs: it
/// notices, creates the database again and rebuilds it from the tree, whether nothing has touched
/// the path since or a read command has already made a new file there.
#[test]
fn a_deleted_sqlite_mirror_is_rebuilt_while_the_supervisor_runs() {
    // No periodic rescan (and so no periodic reconcile) to hide the fault: the writer must notice.
    let p =
        Project::with_config(&test_config("").replace("rescan_seconds: 2", "rescan_seconds: 3600"));
    let mut sup = p.start();
    let delete = |files: &[&str]| {
        for f in files {
            let path = p.path(&format!(".orchestrate/{f}"));
            if let Err(e) = std::fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                panic!("remove {}: {e}", path.display());
            }
        }
    };
    // What the read commands show: completed tasks per `status`, and every task `tasks` lists.
    let shown = || {
        let st = p.run(&["status", "--json"]).assert_code(0).json();
        let listed = p.run(&["tasks", "--json"]).assert_code(0).json();
        (
            st["counts"]["completed"].as_u64().unwrap_or(0) as usize,
            listed.as_array().map(Vec::len).unwrap_or(0),
        )
    };
    // Five more tasks after a deletion: all run, the supervisor has (when `made_again`) created the
    // file again itself, and the read commands and the mirror show every task.
    let five_more_and_all_shown = |prefix: &str, total: usize, made_again: bool| {
        drop_tasks(&p, prefix, 5);
        wait_showing(
            &sup,
            &format!("{total} completed in the tree"),
            Duration::from_secs(60),
            || p.tasks_in("completed").len() == total,
        );
        if made_again {
            wait_showing(
                &sup,
                "the supervisor to create state.db again",
                Duration::from_secs(30),
                || p.path(".orchestrate/state.db").exists(),
            );
        }
        wait_showing(
            &sup,
            &format!("status and tasks to show all {total}"),
            Duration::from_secs(30),
            || shown() == (total, total),
        );
        assert_eq!(p.mirror_states(), p.tree_states());
    };
    drop_tasks(&p, "a", 5);
    wait_showing(&sup, "the first 5 tasks", Duration::from_secs(60), || {
        p.tasks_in("completed").len() == 5 && p.mirror_states() == p.tree_states()
    });

    let all = ["state.db", "state.db-wal", "state.db-shm"];
    // 1. Deleted, and nothing reads the mirror until the supervisor has made it again.
    delete(&all);
    five_more_and_all_shown("b", 10, true);

    // 2. Deleted, and `status` runs at once: it builds a new file from the tree as it stands, which
    //    the supervisor must take up rather than keep writing to the deleted one.
    delete(&all);
    assert_eq!(shown(), (10, 10), "status rebuilds a missing mirror itself");
    five_more_and_all_shown("c", 15, false);

    // 3. Only state.db deleted, its -wal and -shm left: the new file must not start from them.
    delete(&all[..1]);
    five_more_and_all_shown("d", 20, true);
    let check: String = p
        .db()
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check");
    assert_eq!(check, "ok");
    assert!(sup.stop().success(), "{}", sup.output());
    let said = lines_with(&sup, "was deleted or replaced while the supervisor ran");
    assert_eq!(said, 3, "one console line per deletion:\n{}", sup.output());
    let rows = p.mirror_states();
    let lost = missing(&p.tree_states(), &rows);
    report(
        "sqlite-deleted",
        &format!(
            "3 deletions (2 with -wal and -shm, 1 without), 20 tasks, {} completed, {} rows",
            p.tasks_in("completed").len(),
            rows.len()
        ),
        lost,
    );
}

mod postgres {
    use super::*;

    /// `orchestrate status --json`'s view of the PostgreSQL writer.
    fn health(p: &Project) -> serde_json::Value {
        p.run(&["status", "--json"]).assert_code(0).json()["postgres"].clone()
    }

    fn n(v: &serde_json::Value) -> u64 {
        v.as_u64().unwrap_or(0)
    }

    /// The server stops answering while tasks flow: the proxy keeps every connection open and
    /// passes nothing (no error, no reset; keepalives are acknowledged by the proxy's kernel).
    /// `status` must say so within a bound, with the queue and its lag growing, the supervisor must
    /// say it once and reconnect, and once the server answers again every row must arrive.
    #[test]
    fn a_silent_database_is_reported_and_nothing_is_lost() {
        let s = PgSchema::new("fault_silent");
        let proxy = Proxy::start();
        let p = Project::with_config(&pg_config(&s.url_on(&proxy.url()), &s.name));
        let mut sup = p.start();
        drop_tasks(&p, "a", 10);
        wait_showing(
            &sup,
            "the first 10 in PostgreSQL",
            Duration::from_secs(60),
            || s.count_or_zero("SELECT count(*) FROM tasks WHERE state = 'completed'") == 10,
        );

        proxy.blackhole();
        drop_tasks(&p, "b", 20);
        wait_showing(
            &sup,
            "30 completed in the tree",
            Duration::from_secs(60),
            || p.tasks_in("completed").len() == 30,
        );
        // First `stalled` (connected, no answer), then, past the bound, not connected at all; both
        // with the queue and its lag as they are.
        let mut stalled_line = String::new();
        wait_showing(
            &sup,
            "status to show the writer stalled",
            Duration::from_secs(60),
            || {
                let text = p.run(&["status"]).assert_code(0).stdout();
                let line = text.lines().find(|l| {
                    l.starts_with(
                        "postgres mirror: STALLED (connected, but no answer from PostgreSQL for",
                    )
                });
                stalled_line = line.unwrap_or_default().to_string();
                line.is_some()
            },
        );
        // From then on the writer is stalled or has given up on the connection, with the queue
        // and its lag as they are.
        let first = health(&p);
        assert!(
            (first["stalled"] == true || first["connected"] == false)
                && n(&first["queued"]) > 0
                && n(&first["lag_ms"]) > 0,
            "{first}"
        );
        wait_showing(
            &sup,
            "status to report the connection given up",
            // Past the longest bound: a batch waiting for the events lock may wait 60 s.
            Duration::from_secs(90),
            || {
                let h = health(&p);
                h["connected"] == false
                    && h["last_error"]
                        .as_str()
                        .is_some_and(|e| e.contains("no answer from PostgreSQL for"))
            },
        );
        let text = p.run(&["status"]).assert_code(0).stdout();
        assert!(
            text.contains("postgres mirror: NOT CONNECTED (no answer from PostgreSQL"),
            "{text}"
        );
        // The queue keeps growing while the server is silent, and so does its lag.
        let before = health(&p);
        drop_tasks(&p, "c", 20);
        wait_showing(
            &sup,
            "50 completed in the tree",
            Duration::from_secs(60),
            || p.tasks_in("completed").len() == 50,
        );
        wait_showing(&sup, "the queue to grow", Duration::from_secs(30), || {
            let h = health(&p);
            n(&h["queued"]) > n(&before["queued"]) && n(&h["lag_ms"]) > n(&before["lag_ms"])
        });
        let during = health(&p);
        assert_eq!(
            s.count("SELECT count(*) FROM tasks WHERE state = 'completed'"),
            10,
            "nothing can have passed the silent proxy"
        );

        proxy.restore();
        wait_showing(
            &sup,
            "PostgreSQL to catch up",
            Duration::from_secs(90),
            || s.states() == p.tree_states(),
        );
        wait_showing(
            &sup,
            "status to show the queue written",
            Duration::from_secs(30),
            || {
                let h = health(&p);
                h["connected"] == true && h["stalled"] == false && n(&h["queued"]) == 0
            },
        );
        assert!(sup.stop().success(), "{}", sup.output());
        let warned = lines_with(&sup, "warning: postgres mirror: no answer from PostgreSQL");
        let back = lines_with(&sup, "postgres mirror: connected again");
        assert_eq!((warned, back), (1, 1), "said once:\n{}", sup.output());
        // Every task has its row and its three events, once each.
        let rows = s.count("SELECT count(*) FROM tasks") as usize;
        let tasks = p.tree_states().len();
        assert_eq!((rows, tasks), (50, 50));
        assert_eq!(
            s.count("SELECT count(*) FROM task_events WHERE state = 'completed'"),
            50
        );
        assert_eq!(
            s.count("SELECT count(*) FROM (SELECT task_id, version FROM task_events GROUP BY 1, 2 HAVING count(*) > 1) d"),
            0
        );
        report(
            "postgres-silent",
            &format!(
                "50 tasks (40 while silent), `{stalled_line}`, \
                 later queued {} lag {} ms, 1 console warning; rows {rows} of {tasks} tasks",
                n(&during["queued"]),
                n(&during["lag_ms"])
            ),
            missing(&p.tree_states(), &s.states()),
        );
    }

    /// Read commands through a server that stops answering: a one-shot read ends with a clear
    /// error, a follower says so, reconnects, and prints everything it missed, once.
    #[test]
    fn reads_from_a_silent_database_end_or_reconnect_instead_of_hanging() {
        let s = PgSchema::new("fault_silent_reads");
        let proxy = Proxy::start();
        // The supervisor writes directly; only the readers go through the proxy.
        let p = Project::with_config(&pg_config(&s.url(), &s.name));
        drop_tasks(&p, "a", 3);
        p.run(&["start", "--once"]).assert_code(0);
        let cfg = p.path("remote.yaml");
        std::fs::write(&cfg, format!("database:\n  schema: {}\n", s.name)).expect("cfg");
        let remote = |args: &[&str]| {
            let mut c = std::process::Command::new(BIN);
            c.arg("--config")
                .arg(&cfg)
                .args(["--database-url", &proxy.url()])
                .args(args)
                .current_dir(std::env::temp_dir());
            c
        };

        proxy.blackhole();
        let err_file = p.path("status.err");
        let mut status = Reaped(
            remote(&["status"])
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(&err_file).expect("err"))
                .spawn()
                .expect("status"),
        );
        let ended = wait_child(&mut status.0, Duration::from_secs(60));
        let err = std::fs::read_to_string(&err_file).unwrap_or_default();
        assert_eq!(
            ended.and_then(|s| s.code()),
            Some(1),
            "status through a silent server must end with an error: {err}"
        );
        assert!(
            err.contains("no answer from PostgreSQL for 10 s (connecting)"),
            "{err}"
        );
        proxy.restore();

        // A follower connected through the proxy: 9 events so far, 6 more while it is cut off.
        let err_file = p.path("follow.err");
        let mut follower = Reaped(
            remote(&["--json", "follow", "--since", "0", "--limit", "15"])
                .stdout(std::fs::File::create(p.path("follow.out")).expect("out"))
                .stderr(std::fs::File::create(&err_file).expect("err"))
                .spawn()
                .expect("follow"),
        );
        wait_for("the follower to catch up", Duration::from_secs(30), || {
            followed_seqs(&std::fs::read_to_string(p.path("follow.out")).unwrap_or_default()).len()
                == 9
        });
        proxy.blackhole();
        drop_tasks(&p, "b", 2);
        p.run(&["start", "--once"]).assert_code(0);
        wait_for(
            "the follower to say the server is silent",
            Duration::from_secs(60),
            || {
                std::fs::read_to_string(&err_file)
                    .unwrap_or_default()
                    .contains("no answer from PostgreSQL")
            },
        );
        assert!(
            follower.0.try_wait().expect("try_wait").is_none(),
            "follow keeps trying"
        );
        proxy.restore();
        let ended = wait_child(&mut follower.0, Duration::from_secs(60));
        assert!(
            ended.is_some_and(|s| s.success()),
            "follow ends after its 15 events; stderr:\n{}",
            std::fs::read_to_string(&err_file).unwrap_or_default()
        );
        let seqs = followed_seqs(&p.read("follow.out"));
        let all: Vec<i64> = s
            .query("SELECT seq FROM task_events ORDER BY seq")
            .into_iter()
            .map(|r| r[0].as_deref().and_then(|v| v.parse().ok()).expect("seq"))
            .collect();
        assert_eq!(seqs, all, "every event once, in order");
        report(
            "postgres-silent-reads",
            &format!(
                "status ended with exit 1 and `no answer`; follower cut off for 6 of {} events, printed {}",
                all.len(),
                seqs.len()
            ),
            all.iter().filter(|e| !seqs.contains(e)).count(),
        );
    }
}
