//! The PostgreSQL mirror against the real server (`common::pg_url`), each test in its own schema.
//! The whole binary needs the server: `tools/test` skips it when the server is down.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;

fn drop_tasks(p: &Project, prefix: &str, n: usize, body: &str) {
    for i in 0..n {
        p.drop_task(
            &format!("{prefix}{i:03}.yaml"),
            &format!("description: \"{body}\"\n"),
        );
    }
}

/// `orchestrate follow` in the background, its stdout captured to a file.
fn follower(
    p: &Project,
    url: &str,
    schema: &PgSchema,
    limit: usize,
    out: &str,
) -> std::process::Child {
    let f = std::fs::File::create(p.path(out)).expect("out file");
    std::fs::write(
        p.path("follow.yaml"),
        format!("database:\n  schema: {}\n", schema.name),
    )
    .expect("cfg");
    std::process::Command::new(BIN)
        .args([
            "--config",
            p.path("follow.yaml").to_str().expect("utf8"),
            "--json",
            "--database-url",
            url,
        ])
        .args(["follow", "--since", "0", "--limit", &limit.to_string()])
        .current_dir(std::env::temp_dir())
        .stdout(f)
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn follow")
}

#[track_caller]
fn assert_gap_free(seqs: &[i64], n: usize) {
    assert_eq!(seqs.len(), n, "events received: {seqs:?}");
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "not strictly increasing: {seqs:?}"
    );
}

#[test]
fn the_postgres_mirror_matches_the_tree_after_500_tasks() {
    let s = PgSchema::new("five_hundred");
    let p = Project::with_config(&pg_config(&s.url(), &s.name));
    let mut sup = p.start();
    drop_tasks(&p, "t", 500, "@fake print=ok");
    wait_for("500 completed", Duration::from_secs(180), || {
        p.tasks_in("completed").len() == 500
    });
    assert!(sup.stop().success(), "{}", sup.output());
    assert_eq!(s.states(), p.tree_states());
    // Every task went pending → running → completed, one event each, sequence numbers unique.
    assert_eq!(s.count("SELECT count(*) FROM task_events"), 1500);
    assert_eq!(s.count("SELECT count(DISTINCT seq) FROM task_events"), 1500);
    assert_eq!(
        s.count("SELECT count(*) FROM (SELECT task_id FROM task_events GROUP BY task_id HAVING count(*) = 3) t"),
        500
    );
    assert_eq!(
        s.count("SELECT count(*) FROM attempts WHERE outcome = 'completed'"),
        500
    );
    assert_eq!(
        s.count("SELECT count(*) FROM supervisors"),
        0,
        "a stopped supervisor removes its row"
    );
}

#[test]
fn a_late_follower_receives_every_event_once_and_in_order() {
    let s = PgSchema::new("late_follower");
    let p = Project::with_config(&pg_config(&s.url(), &s.name));
    let mut sup = p.start();
    drop_tasks(&p, "a", 20, "@fake print=ok");
    wait_for("first 20", Duration::from_secs(60), || {
        p.tasks_in("completed").len() == 20
    });
    // Started late: it must catch up on the 60 events it missed, then follow 60 more live.
    let mut f = follower(&p, &s.url(), &s, 120, "follow.out");
    drop_tasks(&p, "b", 20, "@fake print=ok");
    let status = wait_child(&mut f, Duration::from_secs(60)).expect("follower got all 120 events");
    assert!(status.success());
    assert!(sup.stop().success(), "{}", sup.output());
    let seqs = followed_seqs(&p.read("follow.out"));
    assert_gap_free(&seqs, 120);
    let all: Vec<i64> = s
        .query("SELECT seq FROM task_events ORDER BY seq")
        .into_iter()
        .map(|r| r[0].as_deref().and_then(|v| v.parse().ok()).expect("seq"))
        .collect();
    assert_eq!(seqs, all);
}

#[test]
fn terminating_the_writer_and_follower_connections_mid_run_loses_nothing() {
    let s = PgSchema::new("terminate");
    let p = Project::with_config(&pg_config(&s.url(), &s.name));
    let mut sup = p.start();
    let mut f = follower(&p, &s.url(), &s, 180, "follow.out");
    drop_tasks(&p, "k", 60, "@fake sleep=0.05");
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        s.terminate_backends();
    }
    wait_for("60 completed", Duration::from_secs(60), || {
        p.tasks_in("completed").len() == 60
    });
    let status = wait_child(&mut f, Duration::from_secs(60)).expect("follower got all 180 events");
    assert!(status.success());
    assert!(sup.stop().success());
    assert_gap_free(&followed_seqs(&p.read("follow.out")), 180);
    assert_eq!(s.states(), p.tree_states());
    assert_eq!(s.count("SELECT count(*) FROM task_events"), 180);
}

#[test]
fn a_database_outage_never_stops_the_supervisor_and_ends_consistent() {
    let s = PgSchema::new("outage");
    let proxy = Proxy::start();
    let p = Project::with_config(&pg_config(&s.url_on(&proxy.url()), &s.name));
    let mut sup = p.start();
    drop_tasks(&p, "o", 10, "@fake print=before");
    wait_for("before the outage", Duration::from_secs(30), || {
        p.tasks_in("completed").len() == 10
            && s.count_or_zero("SELECT count(*) FROM tasks WHERE state = 'completed'") == 10
    });
    proxy.cut();
    // Tasks keep flowing through the folders and SQLite while the database is unreachable.
    drop_tasks(&p, "x", 30, "@fake print=during");
    wait_for("during the outage", Duration::from_secs(60), || {
        p.tasks_in("completed").len() == 40
    });
    // `status` reports the outage (the writer notices on its next attempt, within a second or so).
    wait_for(
        "status to show the mirror disconnected",
        Duration::from_secs(15),
        || p.run(&["status", "--json"]).assert_code(0).json()["postgres"]["connected"] == false,
    );
    assert_eq!(p.mirror_states(), p.tree_states());
    proxy.restore();
    wait_for("the mirror to catch up", Duration::from_secs(60), || {
        s.states() == p.tree_states()
    });
    assert!(sup.stop().success());
    assert_eq!(s.states(), p.tree_states());
    assert_eq!(
        s.count("SELECT count(*) FROM task_events WHERE state = 'completed'"),
        40
    );
    assert_eq!(s.count("SELECT count(*) FROM (SELECT task_id, version FROM task_events GROUP BY 1, 2 HAVING count(*) > 1) d"), 0);
}

#[test]
fn two_supervisors_on_one_database_never_duplicate_or_interleave_sequences() {
    let s = PgSchema::new("two_writers");
    let p = Project::with_config(&pg_config(&s.url(), &s.name));
    std::fs::create_dir_all(p.path("locks")).expect("mkdir");
    let mut one = p.start();
    let mut two = p.start();
    // A follower that was there from the start sees a gap-free, strictly increasing sequence: the
    // advisory lock makes commits happen in sequence order.
    let mut f = follower(&p, &s.url(), &s, 600, "follow.out");
    for i in 0..200 {
        p.drop_task(
            &format!("d{i:03}.yaml"),
            &format!("description: \"@fake lock=locks/d{i:03}.lock\"\n"),
        );
    }
    wait_for("200 completed", Duration::from_secs(120), || {
        p.tasks_in("completed").len() == 200
    });
    let status = wait_child(&mut f, Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| s.success()),
        "follower printed {} events; the table has {}; tree: {:?}",
        followed_seqs(&p.read("follow.out")).len(),
        s.count("SELECT count(*) FROM task_events"),
        s.query("SELECT state, count(*) FROM task_events GROUP BY state ORDER BY state")
    );
    assert!(one.stop().success());
    assert!(two.stop().success());
    assert_gap_free(&followed_seqs(&p.read("follow.out")), 600);
    assert_eq!(s.count("SELECT count(*) FROM task_events"), 600);
    assert_eq!(s.states(), p.tree_states());
    for i in 0..200 {
        assert!(
            !p.path(&format!("locks/d{i:03}.lock.overlap")).exists(),
            "d{i:03} ran twice at once"
        );
    }
    let both_claimed =
        one.output().contains("started    d") && two.output().contains("started    d");
    assert!(both_claimed, "both supervisors should have run tasks");
}

#[test]
fn read_commands_answer_from_postgres_without_the_folder() {
    let s = PgSchema::new("remote_read");
    let p = Project::with_config(&pg_config(&s.url(), &s.name));
    p.drop_task("r1.yaml", "description: \"@fake print=ok\"\n");
    p.drop_task("r2.yaml", "description: \"@fake exit=4\"\nmax_retries: 0\n");
    p.drop_task(
        "r3.yaml",
        "description: \"@fake print=ok\"\ncheck: 'echo fine'\n",
    );
    p.run(&["start", "--once"]).assert_code(0);
    // A different directory with only a config naming the schema: no tasks/, no .orchestrate/.
    let elsewhere = config_only_folder(&s.name);
    let remote = |args: &[&str]| {
        let out = std::process::Command::new(BIN)
            .arg("-C")
            .arg(elsewhere.path())
            .args(["--database-url", &pg_url(), "--json"])
            .args(args)
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json")
    };
    let st = remote(&["status"]);
    assert_eq!(st["source"], "postgres");
    assert_eq!(st["counts"]["completed"], 2);
    assert_eq!(st["counts"]["failed"], 1);
    let tasks = remote(&["tasks", "--status", "failed"]);
    assert_eq!(tasks[0]["id"], "r2");
    let shown = remote(&["show", "r2"]);
    assert_eq!(shown["attempts"][0]["exit_code"], 4);
    assert!(shown["attempts"][0].get("check").is_none(), "{shown}");
    // The attempt's check, as the mirror stored it.
    let shown = remote(&["show", "r3"]);
    let check = &shown["attempts"][0]["check"];
    assert_eq!(check["command"], "echo fine", "{shown}");
    assert_eq!(check["passed"], true, "{shown}");
    assert_eq!(check["log_file"], "context/logs/r3/attempt-1.check.log");
    assert!(
        !elsewhere.path().join(".orchestrate").exists(),
        "remote reads must not create local state"
    );
    // Read-only: a session opened that way cannot write.
    let out = std::process::Command::new(BIN)
        .args(["--database-url", &pg_url(), "show", "nope"])
        .arg("-C")
        .arg(elsewhere.path())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn sslmode_require_connects_over_tls() {
    let s = PgSchema::new("tls");
    let url = s.url_on(&format!("{}?sslmode=require", pg_url()));
    let p = Project::with_config(&pg_config(&url, &s.name));
    let mut sup = p.start();
    p.drop_task("t1.yaml", "description: \"@fake print=ok\"\n");
    wait_for("mirrored", Duration::from_secs(30), || {
        s.count_or_zero("SELECT count(*) FROM tasks WHERE state = 'completed'") == 1
    });
    // The server's own view of the writer's connection.
    let ssl = pg_rows_public(&format!(
        "SELECT bool_and(s.ssl)::text FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
         WHERE a.application_name = '{}'",
        s.name
    ));
    assert_eq!(ssl, Some("true".to_string()));
    assert!(sup.stop().success());
}

#[test]
fn remote_reads_fail_clearly_and_follow_waits_on_a_schema_nobody_wrote() {
    let elsewhere = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        elsewhere.path().join("config.yaml"),
        "database:\n  schema: t_nobody_wrote_here\n",
    )
    .expect("cfg");
    let remote = |args: &[&str]| {
        let mut c = std::process::Command::new(BIN);
        c.arg("-C")
            .arg(elsewhere.path())
            .args(["--database-url", &pg_url()])
            .args(args);
        c
    };
    let out = remote(&["status"]).output().expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no orchestrate tables"));
    // `follow` says what it waits for and keeps waiting (a supervisor may come later).
    let err_file = elsewhere.path().join("follow.err");
    let mut child = remote(&["follow", "--limit", "1"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_file).expect("err file"))
        .spawn()
        .expect("run");
    wait_for("follow to explain", Duration::from_secs(10), || {
        std::fs::read_to_string(&err_file)
            .unwrap_or_default()
            .contains("waiting for a supervisor")
    });
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "follow should keep waiting"
    );
    let _ = child.kill();
    let _ = child.wait();
    // A URL that can never work is reported at once.
    let mut bad = std::process::Command::new(BIN);
    bad.arg("-C").arg(elsewhere.path()).args([
        "--database-url",
        "postgres://127.0.0.1:5432/test?sslmode=verify-full",
        "follow",
    ]);
    let out = bad.output().expect("run");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid database URL"));
    // --database-url is refused where it does not apply.
    let out = remote(&["retry", "x"]).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
}

/// The same transitions written to both databases read back identically through the one read API.
#[test]
fn both_mirrors_answer_every_read_the_same() {
    use orchestrate::mirror::read::Source;
    use orchestrate::mirror::{Op, Payload, TaskRow, postgres, sqlite};
    use orchestrate::record::{Attempt, Outcome};

    let s = PgSchema::new("same_reads");
    let mut ops = Vec::new();
    for i in 0..12u32 {
        let id = format!("t{i:02}");
        let state = ["pending", "running", "completed", "failed"][i as usize % 4];
        // Mixed case: both must sort agent names by bytes.
        let agent = ["claude", "codex", "Gemini"][i as usize % 3];
        // Ties on the second, so the order by id counts too.
        let at = |ms: u32| format!("2025-03-04T05:06:{:02}.{ms:03}Z", i % 5);
        let outcome = match state {
            "running" => Some(Outcome::Interrupted),
            "completed" => Some(Outcome::Completed),
            "failed" => Some(Outcome::AgentError),
            _ => None,
        };
        let attempts: Vec<Attempt> = outcome
            .into_iter()
            .map(|o| {
                let mut a = Attempt::new(1, agent, &at(0), o);
                if o != Outcome::Interrupted {
                    a.finished_at = Some(at(500));
                    a.exit_code = Some(i as i32 % 2);
                    // Eighths add up exactly, in any order.
                    a.cost_usd = Some(f64::from(i) / 8.0);
                    a.input_tokens = Some(u64::from(i) * 100);
                    a.output_tokens = Some(u64::from(i));
                }
                a
            })
            .collect();
        ops.push(Op::Upsert {
            row: TaskRow {
                id: id.clone(),
                version: 1 + u64::from(i % 4),
                state: state.into(),
                agent: outcome.map(|_| agent.to_string()),
                payload: Payload {
                    description: format!("task {i}"),
                    priority: i64::from(i % 3),
                    file: format!("{state}/{id}.yaml"),
                    attempts: attempts.len() as u32,
                    error: (state == "failed").then(|| "exit 1".to_string()),
                    ..Default::default()
                },
                updated_at: at(0),
                note: None,
            },
            attempts,
        });
        if state == "pending" && i % 8 == 0 {
            ops.push(Op::Note {
                id,
                note: Some("waits for t01".into()),
            });
        }
    }
    ops.push(Op::Supervisor {
        instance: "i1".into(),
        pid: 7,
        started_at: "2025-03-04T05:00:00.000Z".into(),
        heartbeat_at: "2025-03-04T05:06:07.000Z".into(),
        alive: true,
    });

    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("state.db");
    let mut sqlite_ops = ops.clone();
    sqlite::apply(&mut sqlite::open(&db).expect("open"), "h1", &mut sqlite_ops).expect("apply");
    migrated(&s, async |c| {
        postgres::apply(c, "h1", &postgres::channel(&s.name), &ops).await
    })
    .expect("postgres write");

    let conn = sqlite::open_read(&db).expect("open").expect("a database");
    let lite = Source::Sqlite(conn).reader().expect("sqlite reader");
    let pg = Source::Postgres {
        url: s.url(),
        schema: s.name.clone(),
    }
    .reader()
    .expect("postgres reader");
    assert!(lite.is_local() && !pg.is_local());
    macro_rules! same {
        ($($call:tt)*) => {{
            let want = lite.$($call)*.expect("sqlite read");
            assert_eq!(want, pg.$($call)*.expect("postgres read"), stringify!($($call)*));
            want
        }};
    }
    assert_eq!(same!(list(None)).len(), 12);
    for state in ["pending", "running", "completed", "failed"] {
        assert_eq!(same!(list(Some(state))).len(), 3);
    }
    for i in 0..12 {
        let id = format!("t{i:02}");
        assert!(same!(get(&id)).is_some());
        same!(attempts_of(&id));
    }
    assert_eq!(same!(get("nope")), None);
    assert_eq!(same!(waiting()).len(), 2);
    assert_eq!(same!(counts()).len(), 4);
    assert_eq!(same!(events_since(0, 100)).len(), 12);
    assert_eq!(same!(events_since(3, 4)).first().map(|e| e.seq), Some(4));
    assert_eq!(same!(max_seq()), 12);
    assert_eq!(same!(supervisors()).len(), 1);
    let totals = same!(agent_totals());
    let names: Vec<&str> = totals.iter().map(|t| t.agent.as_str()).collect();
    assert_eq!(names, ["Gemini", "claude", "codex"]);
    // What budgets sum: the finished attempts from a time on, with their spend.
    assert_eq!(same!(spent_since("2000-01-01T00:00:00.000Z")).len(), 6);
    let since = same!(spent_since("2025-03-04T05:06:02.000Z"));
    let ids: Vec<&str> = since.iter().map(|r| r.task_id.as_str()).collect();
    assert_eq!(ids, ["t02", "t07", "t03"]);
    assert_eq!(since[0].cost_usd, Some(0.25));
    assert_eq!(since[0].input_tokens, Some(200));
    assert_eq!(since[0].finished_at, "2025-03-04T05:06:02.500Z");
}

/// A writer's session on the test's schema, connected and migrated as on every (re)connect, for
/// `then`.
fn migrated<T>(
    s: &PgSchema,
    then: impl AsyncFnOnce(&mut orchestrate::mirror::postgres::Session) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    use orchestrate::mirror::postgres;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            let mut c = postgres::connect(&s.url(), &s.name).await?;
            postgres::migrate(&mut c).await?;
            then(&mut c).await
        })
}

/// Connect and migrate as the writer does on every (re)connect.
fn connect_and_migrate(s: &PgSchema) -> anyhow::Result<()> {
    migrated(s, async |_| Ok(()))
}

/// A writer that (re)connects to tables already current takes no lock: it does not wait for the
/// transactions of the supervisors already writing, and puts none of their statements behind a
/// lock of its own. (`ADD COLUMN IF NOT EXISTS` and `CREATE INDEX IF NOT EXISTS` lock their
/// table even when there is nothing to do.)
#[test]
fn a_reconnect_to_current_tables_waits_for_no_writer_s_transaction() {
    let s = PgSchema::new("migrate_current");
    connect_and_migrate(&s).expect("the first migration");
    let n = &s.name;
    let _hold = PgHold::new(&format!(
        "LOCK TABLE {n}.tasks, {n}.attempts, {n}.task_events, {n}.supervisors IN ROW EXCLUSIVE MODE"
    ));
    connect_and_migrate(&s).expect("a reconnect while another writer's transaction is open");
}

/// Tables from an older orchestrate are upgraded under a bounded wait for their lock: a writer
/// busy on them makes the upgrade give up saying why (and try again on its next connect), rather
/// than stall that writer behind the upgrade's exclusive lock; once free, it is upgraded.
#[test]
fn an_upgrade_waits_a_bounded_time_for_a_busy_table_then_applies() {
    let s = PgSchema::new("migrate_upgrade");
    connect_and_migrate(&s).expect("the first migration");
    pg_exec(&format!(
        "ALTER TABLE {}.attempts DROP COLUMN check_result",
        s.name
    ));
    let column = || {
        s.count(
            "SELECT count(*) FROM information_schema.columns
             WHERE table_schema = current_schema() AND table_name = 'attempts' AND column_name = 'check_result'",
        )
    };
    assert_eq!(column(), 0);
    {
        let _hold = PgHold::new(&format!(
            "LOCK TABLE {}.attempts IN ROW EXCLUSIVE MODE",
            s.name
        ));
        let e = connect_and_migrate(&s).expect_err("the table is busy");
        assert!(format!("{e:#}").contains("lock timeout"), "{e:#}");
    }
    connect_and_migrate(&s).expect("the upgrade once the table is free");
    assert_eq!(column(), 1);
}

/// `orchestrate_schema` says which build wrote the schema: an older one's is brought forward, and a
/// newer one's is refused, naming both versions, before anything is written.
#[test]
fn an_older_schema_version_is_upgraded_and_a_newer_one_refused() {
    let s = PgSchema::new("migrate_version");
    connect_and_migrate(&s).expect("the first migration");
    let version = || s.count("SELECT max(version) FROM orchestrate_schema");
    let current = version();
    assert!(current >= 2, "per-schema lock keys are version 2");
    pg_exec(&format!(
        "UPDATE {}.orchestrate_schema SET version = 1",
        s.name
    ));
    connect_and_migrate(&s).expect("an older version is upgraded");
    assert_eq!(version(), current);
    pg_exec(&format!(
        "UPDATE {}.orchestrate_schema SET version = 99",
        s.name
    ));
    let e = connect_and_migrate(&s).expect_err("a newer version is refused");
    assert!(
        format!("{e:#}").contains(&format!(
            "the database schema is version 99, newer than this orchestrate understands ({current})"
        )),
        "{e:#}"
    );
    assert_eq!(version(), 99, "left as it was");
}
