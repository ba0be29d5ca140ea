//! Cluster mode end to end: whole supervisors (`orchestrate start`), each on its own checkout of
//! one repository with its own state directory and host name, sharing one queue in a real
//! PostgreSQL schema. Every test is in `postgres`, which `tools/test` skips when the server is down.

mod common;

mod postgres {
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    use crate::common::{PgSchema, Project, Supervisor, git, test_config, wait_for};

    /// The repository every host checked out: one commit, in a bare `origin` they fetch from.
    struct Cluster {
        _upstream: tempfile::TempDir,
        bare: PathBuf,
        /// Where the agents' locks live (one folder all hosts see): a task run twice at once
        /// leaves a `.overlap` file here.
        locks: tempfile::TempDir,
        schema: PgSchema,
    }

    impl Cluster {
        fn new(test: &str) -> Cluster {
            let up = tempfile::tempdir().expect("tempdir");
            std::fs::write(up.path().join("README"), "the project\n").expect("write");
            git(up.path(), &["init", "-q", "-b", "main"]);
            git(up.path(), &["add", "."]);
            git(up.path(), &["commit", "-qm", "first"]);
            let bare = up.path().join("origin.git");
            git(
                up.path(),
                &[
                    "clone",
                    "-q",
                    "--bare",
                    ".",
                    bare.to_str().expect("utf-8 path"),
                ],
            );
            Cluster {
                _upstream: up,
                bare,
                locks: tempfile::tempdir().expect("tempdir"),
                schema: PgSchema::new(test),
            }
        }

        /// A host: a checkout of the repository with the cluster configured.
        fn host(&self, name: &str, labels: &[&str], lease: u64) -> Project {
            let extra = format!(
                "database:\n  url: \"{}\"\n  schema: {}\ncluster:\n  enabled: true\n  host: {name}\n  labels: [{}]\n  lease_seconds: {lease}\n  poll_ms: 200\n",
                self.schema.url(),
                self.schema.name,
                labels.join(", ")
            );
            let p = Project::with_config(&test_config(&extra));
            git(p.root(), &["init", "-q", "-b", "main"]);
            git(
                p.root(),
                &[
                    "remote",
                    "add",
                    "origin",
                    self.bare.to_str().expect("utf-8 path"),
                ],
            );
            git(p.root(), &["fetch", "-q", "origin"]);
            git(p.root(), &["reset", "-q", "--hard", "origin/main"]);
            p
        }

        fn lock(&self, id: &str) -> String {
            self.locks
                .path()
                .join(format!("{id}.lock"))
                .display()
                .to_string()
        }

        fn overlaps(&self) -> Vec<String> {
            std::fs::read_dir(self.locks.path())
                .expect("locks folder")
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".overlap"))
                .collect()
        }
    }

    fn task(c: &Cluster, id: &str, extra: &str) -> String {
        format!(
            "description: \"@fake lock={} sleep=0.05 write=out/{id}.txt:{id}{extra}\"\n",
            c.lock(id)
        )
    }

    fn log_of(s: &Supervisor) -> String {
        s.output()
    }

    fn completed(p: &Project) -> usize {
        p.tasks_in("completed").len()
    }

    #[test]
    fn three_hosts_share_the_tasks_and_each_lands_on_its_origin() {
        let c = Cluster::new("cluster_three_hosts");
        let hosts: Vec<Project> = ["a", "b", "c"].iter().map(|n| c.host(n, &[], 30)).collect();
        let n: usize = std::env::var("CLUSTER_TASKS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(600);
        let mut sups: Vec<Supervisor> = hosts.iter().map(|h| h.start()).collect();
        let t0 = Instant::now();
        for i in 0..n {
            let h = &hosts[i % 3];
            let id = format!("t{i:04}");
            h.drop_task(&format!("{id}.yaml"), &task(&c, &id, ""));
        }
        wait_for(
            "every task finished on its origin",
            Duration::from_secs(900),
            || {
                hosts
                    .iter()
                    .map(|h| completed(h) + h.tasks_in("failed").len())
                    .sum::<usize>()
                    >= n
            },
        );
        for h in &hosts {
            assert!(
                h.tasks_in("failed").is_empty(),
                "failed: {:?}",
                h.tasks_in("failed")
            );
        }
        let took = t0.elapsed();
        for (i, h) in hosts.iter().enumerate() {
            for j in (i..n).step_by(3) {
                let id = format!("t{j:04}");
                let r = h.result("completed", &id);
                assert_eq!(r["status"], "completed", "{id}: {r}");
                // Landed on its origin, as uncommitted changes (merge: apply).
                assert_eq!(
                    h.read(&format!("out/{id}.txt")).trim(),
                    id,
                    "{id} landed on its origin"
                );
                assert!(
                    r["attempts"][0]["host"].is_string(),
                    "{id}: the record names its host: {r}"
                );
            }
            // Nothing of the others' tasks landed here.
            let landed = std::fs::read_dir(h.path("out"))
                .map(|d| d.count())
                .unwrap_or(0);
            assert_eq!(
                landed,
                (i..n).step_by(3).count(),
                "host {i} holds only its own changes"
            );
        }
        assert!(
            c.overlaps().is_empty(),
            "a task ran twice at once: {:?}",
            c.overlaps()
        );
        // Every task has exactly one outcome, none stale, and it was delivered.
        assert_eq!(
            c.schema.count("SELECT count(*) FROM cluster_queue WHERE state = 'done' AND outcome = 'completed' AND delivered_at IS NOT NULL"),
            n as i64
        );
        assert_eq!(
            c.schema
                .count("SELECT count(*) FROM cluster_results WHERE stale"),
            0
        );
        let ran_on: Vec<i64> = ["a", "b", "c"]
            .iter()
            .map(|h| {
                c.schema.count(&format!(
                    "SELECT count(*) FROM cluster_results WHERE host = '{h}'"
                ))
            })
            .collect();
        eprintln!(
            "{n} tasks in {:.1} s; ran on a/b/c: {ran_on:?}",
            took.as_secs_f64()
        );
        assert!(
            ran_on.iter().all(|&k| k > 0),
            "every host ran some: {ran_on:?}"
        );
        for s in &mut sups {
            assert!(s.stop().success(), "{}", log_of(s));
        }
    }

    /// Which of `sups` leased `id` (its log says so), and how many of them did.
    fn runner_of(sups: &[Supervisor], id: &str) -> Option<usize> {
        sups.iter()
            .position(|s| log_of(s).contains(&format!("leased     {id} ")))
    }

    fn reclaim_case(kill: bool) {
        let c = Cluster::new(if kill {
            "cluster_sigkill"
        } else {
            "cluster_sigstop"
        });
        let origin = c.host("origin", &[], 3);
        let b = c.host("b", &["worker"], 3);
        let w = c.host("w", &["worker"], 3);
        let mut o = origin.start();
        let mut sups = vec![b.start(), w.start()];
        // Slow enough to be caught running; only the workers may run it.
        origin.drop_task(
            "slow.yaml",
            &format!(
                "description: \"@fake lock={} ticks=40 sleep=0.2 write=out/slow.txt:slow\"\nrequires: [worker]\n",
                c.lock("slow")
            ),
        );
        wait_for("a worker leased the task", Duration::from_secs(30), || {
            runner_of(&sups, "slow").is_some()
        });
        let first = runner_of(&sups, "slow").expect("leased");
        let other = 1 - first;
        let pid = sups[first].pid() as i32;
        let t_stop = Instant::now();
        unsafe { libc::kill(pid, if kill { libc::SIGKILL } else { libc::SIGSTOP }) };
        wait_for(
            "the other worker reclaimed it",
            Duration::from_secs(30),
            || log_of(&sups[other]).contains("leased     slow "),
        );
        let reclaimed_after = t_stop.elapsed();
        eprintln!(
            "reclaimed {:.2} s after the {} (lease 3 s, heartbeat 1 s)",
            reclaimed_after.as_secs_f64(),
            if kill { "SIGKILL" } else { "SIGSTOP" }
        );
        assert!(
            log_of(&sups[other]).contains("leased     slow from host origin (fence 2, attempt 2"),
            "{}",
            log_of(&sups[other])
        );
        if !kill {
            // Longer than the lease, then back: it must learn its lease is gone.
            std::thread::sleep(Duration::from_secs(1));
            unsafe { libc::kill(pid, libc::SIGCONT) };
            wait_for(
                "the paused host stopped its orphaned agent",
                Duration::from_secs(30),
                || log_of(&sups[first]).contains("no longer this host's"),
            );
        }
        wait_for(
            "the task completed on its origin",
            Duration::from_secs(60),
            || origin.tasks_in("completed").contains(&"slow".to_string()),
        );
        let r = origin.result("completed", "slow");
        assert_eq!(origin.read("out/slow.txt").trim(), "slow");
        assert!(
            c.overlaps().is_empty(),
            "ran twice at once: {:?}",
            c.overlaps()
        );
        if !kill {
            wait_for(
                "the late attempt is stored as stale",
                Duration::from_secs(30),
                || {
                    c.schema.count(
                        "SELECT count(*) FROM cluster_results WHERE task_id = 'slow' AND stale",
                    ) == 1
                },
            );
        }
        assert_eq!(
            c.schema
                .count("SELECT count(*) FROM cluster_results WHERE task_id = 'slow' AND NOT stale"),
            1,
            "one outcome"
        );
        assert!(r["attempts"].as_array().is_some(), "{r}");
        if kill {
            sups.remove(first).sigkill();
        }
        for s in &mut sups {
            if kill {
                break;
            }
            let _ = s.stop();
        }
        assert!(o.stop().success());
    }

    #[test]
    fn a_killed_host_s_task_is_reclaimed_and_completed_elsewhere() {
        reclaim_case(true);
    }

    #[test]
    fn a_paused_host_is_fenced_off_and_its_agent_stopped() {
        reclaim_case(false);
    }
}
