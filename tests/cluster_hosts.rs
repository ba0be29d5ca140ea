//! Cluster mode end to end: whole supervisors (`orchestrate start`), each on its own checkout of
//! one repository with its own state directory and host name, sharing one queue in a real
//! PostgreSQL schema. Every test is in `postgres`, which `tools/test` skips when the server is down.

mod common;

mod postgres {
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    use crate::common::{PgSchema, Project, Proxy, Supervisor, git, test_config, wait_for};

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
            self.host_on(&self.schema.url(), name, labels, lease)
        }

        /// A host that reaches the database at `url` (through a proxy, say).
        fn host_on(&self, url: &str, name: &str, labels: &[&str], lease: u64) -> Project {
            self.host_with(&test_config(&self.cluster_keys(url, name, labels, lease)))
        }

        /// The `database` and `cluster` keys of a host.
        fn cluster_keys(&self, url: &str, name: &str, labels: &[&str], lease: u64) -> String {
            format!(
                "database:\n  url: \"{}\"\n  schema: {}\ncluster:\n  enabled: true\n  host: {name}\n  labels: [{}]\n  lease_seconds: {lease}\n  poll_ms: 200\n",
                url,
                self.schema.name,
                labels.join(", ")
            )
        }

        /// A host with this whole configuration.
        fn host_with(&self, config: &str) -> Project {
            let p = Project::with_config(config);
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
        // The first claim's host never reported before the task was taken from it: its attempt
        // is `lost`, with its host, as a crashed supervisor's is on one host.
        let names = ["b", "w"];
        let attempts = r["attempts"].as_array().expect("attempts");
        assert_eq!(attempts.len(), 2, "{r}");
        assert_eq!(
            (
                &attempts[0]["n"],
                &attempts[0]["outcome"],
                &attempts[0]["host"]
            ),
            (
                &serde_json::json!(1),
                &serde_json::json!("lost"),
                &serde_json::json!(names[first])
            ),
            "{r}"
        );
        assert_eq!(attempts[1]["host"], names[other], "{r}");
        assert_eq!(attempts[1]["outcome"], "completed", "{r}");
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

    /// A host cut off from PostgreSQL by a proxy that goes silent (no error reaches either side):
    /// it gives its lease up and stops its agent before the lease runs out, another host takes the
    /// task over, and once the proxy passes traffic again the cut-off host's attempt is stored as
    /// stale; the task ran once at a time and landed once.
    #[test]
    fn a_host_cut_off_from_the_database_stops_its_agent_and_the_task_runs_once_elsewhere() {
        let c = Cluster::new("cluster_partition");
        let proxy = Proxy::start();
        let origin = c.host("origin", &[], 3);
        let cut = c.host_on(&c.schema.url_on(&proxy.url()), "cut", &["worker"], 3);
        let w = c.host("w", &["worker"], 3);
        let mut o = origin.start();
        let mut s_cut = cut.start();
        // Long enough to be running when the proxy goes silent (10 s); only workers may run it.
        origin.drop_task(
            "slow.yaml",
            &format!(
                "description: \"@fake lock={} ticks=40:0.25 write=out/slow.txt:slow\"\nrequires: [worker]\n",
                c.lock("slow")
            ),
        );
        wait_for(
            "the host behind the proxy leased the task",
            Duration::from_secs(30),
            || log_of(&s_cut).contains("leased     slow "),
        );
        // The other worker joins only now, so the cut-off host is the one running the task.
        let mut s_w = w.start();
        wait_for("the other worker joined", Duration::from_secs(30), || {
            log_of(&s_w).contains("joined as host w")
        });
        let t_cut = Instant::now();
        proxy.blackhole();
        wait_for(
            "the cut-off host gave its lease up",
            Duration::from_secs(30),
            || log_of(&s_cut).contains("the lease on slow is no longer this host's"),
        );
        let gave_up = t_cut.elapsed();
        wait_for(
            "the other worker took the task over",
            Duration::from_secs(30),
            || log_of(&s_w).contains("leased     slow "),
        );
        let taken = t_cut.elapsed();
        eprintln!(
            "cut off: gave the lease up {:.2} s and the task was taken over {:.2} s after the proxy went silent (lease 3 s)",
            gave_up.as_secs_f64(),
            taken.as_secs_f64()
        );
        assert!(
            log_of(&s_w).contains("leased     slow from host origin (fence 2, attempt 2"),
            "{}",
            log_of(&s_w)
        );
        wait_for(
            "the task completed on its origin",
            Duration::from_secs(60),
            || origin.tasks_in("completed").contains(&"slow".to_string()),
        );
        assert_eq!(origin.read("out/slow.txt").trim(), "slow");
        assert!(
            c.overlaps().is_empty(),
            "the task ran on two hosts at once: {:?}",
            c.overlaps()
        );
        proxy.restore();
        wait_for(
            "the cut-off host's attempt is stored as stale",
            Duration::from_secs(60),
            || {
                c.schema.count(
                    "SELECT count(*) FROM cluster_results WHERE task_id = 'slow' AND stale AND host = 'cut'",
                ) == 1
            },
        );
        assert_eq!(
            c.schema
                .count("SELECT count(*) FROM cluster_results WHERE task_id = 'slow' AND NOT stale"),
            1,
            "one outcome"
        );
        // The cut-off host is back in the cluster: it beats again.
        wait_for(
            "the cut-off host beats again",
            Duration::from_secs(30),
            || {
                c.schema.count(
                "SELECT count(*) FROM cluster_hosts WHERE name = 'cut' AND heartbeat_at > now() - interval '2 seconds'",
            ) == 1
            },
        );
        let r = origin.result("completed", "slow");
        let attempts = r["attempts"].as_array().expect("attempts");
        assert_eq!(attempts.last().expect("one")["host"], "w", "{r}");
        for s in [&mut s_cut, &mut s_w, &mut o] {
            assert!(s.stop().success(), "{}", log_of(s));
        }
    }

    /// How many attempts a task has is its origin's word, not the runner's: a runner whose own
    /// `max_retries` is 1 retries a task from an origin that allows 2 retries until it has had
    /// 3 attempts, and fails one from an origin that allows none after its first.
    #[test]
    fn a_task_gets_the_attempts_its_origin_allows_on_any_runner() {
        let c = Cluster::new("cluster_attempts");
        let config = |name: &str, labels: &[&str], retries: &str| {
            test_config(&c.cluster_keys(&c.schema.url(), name, labels, 3))
                .replace("max_retries: 1", &format!("max_retries: {retries}"))
        };
        let none = c.host_with(&config("none", &[], "0"));
        let two = c.host_with(&config("two", &[], "2"));
        let w = c.host("w", &["worker"], 3);
        let mut sups = vec![none.start(), two.start(), w.start()];
        for (p, id) in [(&none, "once"), (&two, "thrice")] {
            p.drop_task(
                &format!("{id}.yaml"),
                "description: \"@fake print=trying exit=3\"\nrequires: [worker]\n",
            );
        }
        wait_for(
            "both failed on their origins",
            Duration::from_secs(60),
            || none.tasks_in("failed") == ["once"] && two.tasks_in("failed") == ["thrice"],
        );
        let ran = |id: &str| {
            c.schema.count(&format!(
                "SELECT count(*) FROM cluster_results WHERE task_id = '{id}'"
            ))
        };
        assert_eq!(ran("once"), 1, "{}", log_of(&sups[2]));
        assert_eq!(ran("thrice"), 3, "{}", log_of(&sups[2]));
        for (p, id, n) in [(&none, "once", 1), (&two, "thrice", 3)] {
            let r = p.result("failed", id);
            assert_eq!(r["attempts"].as_array().map(Vec::len), Some(n), "{r}");
            assert!(
                !r["error"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("was the last"),
                "the runner judged as the origin would: {r}"
            );
        }
        for s in &mut sups {
            assert!(s.stop().success(), "{}", log_of(s));
        }
    }

    /// A runner of an earlier version, which judged retries by its own default, asks for a retry
    /// on the last attempt the origin allowed: the queue fails the task there and then (no claim
    /// could take it again), and the origin's record gives the queue's reason after the runner's
    /// error. The runner is this test, on the queue's own API.
    #[test]
    fn a_retry_the_queue_cannot_grant_fails_the_task_and_the_origin_s_record_says_why() {
        use orchestrate::mirror::postgres::queue::{
            Capacity, End, Finished, Held, Queue, Settings,
        };
        let c = Cluster::new("cluster_last_attempt");
        let origin = c.host_with(
            &test_config(&c.cluster_keys(&c.schema.url(), "origin", &[], 3))
                .replace("max_retries: 1", "max_retries: 0"),
        );
        let mut o = origin.start();
        origin.drop_task(
            "doomed.yaml",
            "description: \"@fake print=never\"\nrequires: [old]\n",
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let mut q = rt
            .block_on(Queue::connect(
                &c.schema.url(),
                &c.schema.name,
                "old",
                "old-1",
                Settings::default(),
            ))
            .expect("the old runner connects");
        rt.block_on(q.register_host(&["old".to_string()]))
            .expect("the old runner joins");
        let cap = Capacity {
            labels: vec!["old".into()],
            agents: vec!["fake".into()],
            limit: 1,
        };
        let mut lease = None;
        wait_for(
            "the old runner leased the task",
            Duration::from_secs(30),
            || {
                lease = rt
                    .block_on(q.claim(&cap))
                    .expect("claim")
                    .into_iter()
                    .next();
                lease.is_some()
            },
        );
        let lease = lease.expect("leased");
        assert_eq!((lease.attempt, lease.max_attempts), (1, 1));
        let record = orchestrate::record::TaskResult::failed(
            "doomed",
            1,
            "",
            vec![],
            "the agent exited with 3".into(),
        );
        let done = Finished {
            end: End::Retry {
                after: Duration::from_millis(200),
            },
            record: orchestrate::record::to_yaml(&record, &orchestrate::redact::Redactor::none()),
            output: String::new(),
            patch: String::new(),
            log_tail: String::new(),
        };
        assert_eq!(
            rt.block_on(q.finish("doomed", lease.fence, &done))
                .expect("finish"),
            Held::Ok
        );
        wait_for(
            "the task failed on its origin",
            Duration::from_secs(30),
            || origin.tasks_in("failed") == ["doomed"],
        );
        let r = origin.result("failed", "doomed");
        let error = r["error"].as_str().unwrap_or_default();
        assert!(
            error.starts_with("the agent exited with 3; ")
                && error.contains("attempt 1 on host old was the last (1 allowed)"),
            "{r}\n{}",
            log_of(&o)
        );
        assert!(o.stop().success(), "{}", log_of(&o));
    }

    /// The base is the origin's commit, and a runner must have it: one the origin never pushed is
    /// refused on the runner, saying so, and the task fails on its origin with that reason; once
    /// pushed, the runner fetches it from its `origin` remote and the task lands.
    #[test]
    fn a_base_the_runner_cannot_fetch_is_refused_saying_so_and_a_pushed_one_is_fetched() {
        let c = Cluster::new("cluster_base");
        let origin = c.host("origin", &[], 3);
        let w = c.host("w", &["worker"], 3);
        std::fs::write(origin.path("local.txt"), "not pushed\n").expect("write");
        git(origin.root(), &["add", "local.txt"]);
        git(origin.root(), &["commit", "-qm", "local only"]);
        let local = git(origin.root(), &["rev-parse", "HEAD"])
            .trim()
            .to_string();
        let mut o = origin.start();
        let mut s_w = w.start();
        origin.drop_task(
            "early.yaml",
            &format!(
                "{}requires: [worker]\nmax_retries: 0\n",
                task(&c, "early", "")
            ),
        );
        wait_for(
            "the task failed on its origin",
            Duration::from_secs(60),
            || origin.tasks_in("failed") == ["early"],
        );
        let r = origin.result("failed", "early");
        let error = r["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("the base commit of task early is not available on this host"),
            "{r}\n{}",
            log_of(&s_w)
        );
        assert!(!origin.path("out/early.txt").exists());

        git(origin.root(), &["push", "-q", "origin", "main"]);
        origin.drop_task(
            "later.yaml",
            &format!("{}requires: [worker]\n", task(&c, "later", "")),
        );
        wait_for(
            "the task completed on its origin",
            Duration::from_secs(60),
            || origin.tasks_in("completed") == ["later"],
        );
        assert_eq!(origin.read("out/later.txt").trim(), "later");
        let r = origin.result("completed", "later");
        assert_eq!(r["workspace"]["base"], local.as_str(), "{r}");
        // Fetched by the runner: the commit is in its repository now.
        git(
            w.root(),
            &["cat-file", "-e", &format!("{local}^{{commit}}")],
        );
        assert!(o.stop().success(), "{}", log_of(&o));
        assert!(s_w.stop().success(), "{}", log_of(&s_w));
    }

    /// The origin's tree moved on while a runner worked: a change that conflicts with it does not
    /// land. It is kept on the task's branch in the origin's repository and the record names the
    /// conflicting files, as on one host.
    #[test]
    fn a_change_that_conflicts_with_the_origin_s_tree_is_kept_on_a_branch_and_named() {
        let c = Cluster::new("cluster_conflict");
        let origin = c.host("origin", &[], 3);
        let w = c.host("w", &["worker"], 3);
        let mut o = origin.start();
        origin.drop_task(
            "clash.yaml",
            "description: \"@fake write=README:theirs\"\nrequires: [worker]\nmerge: apply\n",
        );
        // Published with its base; the origin's tree moves on before any runner has joined.
        wait_for("the task is published", Duration::from_secs(30), || {
            c.schema.count(
                "SELECT count(*) FROM cluster_queue WHERE id = 'clash' AND base_commit IS NOT NULL",
            ) == 1
        });
        std::fs::write(origin.path("README"), "ours\n").expect("write");
        git(origin.root(), &["commit", "-qam", "ours"]);
        let mut s_w = w.start();
        // As on one host: the task completed; its change did not land.
        wait_for(
            "the task completed on its origin",
            Duration::from_secs(60),
            || origin.tasks_in("completed") == ["clash"],
        );
        let r = origin.result("completed", "clash");
        let ws = &r["workspace"];
        assert_eq!(ws["merge"], "conflict", "{r}\n{}", log_of(&o));
        assert_eq!(ws["conflicts"], serde_json::json!(["README"]), "{r}");
        let branch = ws["branch"].as_str().expect("the branch is kept");
        assert_eq!(
            git(origin.root(), &["show", &format!("{branch}:README")]).trim(),
            "theirs"
        );
        assert_eq!(
            origin.read("README").trim(),
            "ours",
            "the origin's tree is as it was"
        );
        assert!(o.stop().success(), "{}", log_of(&o));
        assert!(s_w.stop().success(), "{}", log_of(&s_w));
    }

    /// The origin killed right after it landed an outcome (commit point `cluster.after_land`),
    /// before the result file was written: started again at once, it takes its host name back, is
    /// offered the outcome once more, lands nothing new, and the task is completed once and
    /// delivered.
    #[test]
    fn an_origin_killed_after_landing_an_outcome_settles_it_once_after_the_restart() {
        for merge in ["apply", "commit"] {
            let c = Cluster::new(&format!("cluster_crash_{merge}"));
            let origin = c.host("origin", &[], 3);
            let w = c.host("w", &["worker"], 3);
            let mut s_w = w.start();
            origin.drop_task(
                "crash.yaml",
                &format!(
                    "description: \"@fake write=out/crash.txt:crash\"\nrequires: [worker]\nmerge: {merge}\n"
                ),
            );
            let commits = || -> u32 {
                git(origin.root(), &["rev-list", "--count", "HEAD"])
                    .trim()
                    .parse()
                    .expect("a count")
            };
            let before = commits();
            let crashed = origin.run_until_crash("cluster.after_land:1");
            assert_eq!(
                origin.read("out/crash.txt").trim(),
                "crash",
                "{merge}: landed before the crash\n{crashed}"
            );
            assert!(
                origin.tasks_in("completed").is_empty(),
                "{merge}: {crashed}"
            );
            // Started again at once: the crashed process was this tree's last instance and its
            // lock is free, so the name is taken over without waiting out the lease.
            let mut o = origin.start();
            wait_for(
                "the restarted origin joined under its name",
                Duration::from_secs(30),
                || log_of(&o).contains("joined as host origin"),
            );
            wait_for(
                "the outcome settled on the restarted origin",
                Duration::from_secs(60),
                || {
                    c.schema.count(
                        "SELECT count(*) FROM cluster_queue WHERE id = 'crash' AND delivered_at IS NOT NULL",
                    ) == 1
                },
            );
            let logs = log_of(&o);
            assert_eq!(
                origin.tasks_in("completed"),
                vec!["crash"],
                "{merge}\n{crashed}\n{logs}"
            );
            assert!(origin.tasks_in("failed").is_empty(), "{merge}\n{logs}");
            assert!(origin.tasks_in("quarantine").is_empty(), "{merge}\n{logs}");
            let r = origin.result("completed", "crash");
            assert_eq!(r["status"], "completed", "{merge}: {r}");
            assert_eq!(origin.read("out/crash.txt").trim(), "crash", "{merge}");
            assert_eq!(
                commits() - before,
                u32::from(merge == "commit"),
                "{merge}: commits added\n{logs}"
            );
            assert_eq!(
                c.schema
                    .count("SELECT count(*) FROM cluster_results WHERE task_id = 'crash'"),
                1,
                "{merge}: the task ran once"
            );
            assert!(o.stop().success(), "{}", log_of(&o));
            assert!(s_w.stop().success(), "{}", log_of(&s_w));
        }
    }

    /// The origin's router chooses the agent, and its answer travels with the task: the runner
    /// (which has no router) runs the chosen agent, and the record says why. The router is asked
    /// once, on the origin.
    #[test]
    fn the_origin_s_router_chooses_the_agent_a_runner_starts() {
        use crate::common::model_server::{Api, ModelServer, Reply};
        let server = ModelServer::start();
        server.script(
            Api::Chat,
            vec![Reply::Text(
                r#"{"category": "planning", "agent": "planner", "confidence": 0.93}"#.into(),
            )],
        );
        let c = Cluster::new("cluster_router");
        let bin = env!("CARGO_BIN_EXE_orchestrate");
        let fake = |name: &str| {
            format!(
                "  {name}:\n    kind: command\n    command: {bin}\n    args: [fake-agent, \"print=ran-by-{name}\"]\n"
            )
        };
        let common = "orchestrator:\n  max_concurrent: 4\n  settle_ms: 100\n  kill_grace_seconds: 1\ntask_queue:\n  max_retries: 0\nsecurity:\n  env_allow: [PATH, HOME]\n";
        // On the origin `planner` is a model the router may pick; on the runner the agent of that
        // name is a command: each host defines its agents.
        let model = |name: &str| {
            format!(
                "  {name}:\n    kind: openai\n    base_url: {}/v1\n    model: local-model\n",
                server.url()
            )
        };
        let origin = c.host_with(&format!(
            "{common}agents:\n{}{}{}routing:\n  fallback: [writer]\n  router: {{agent: router, timeout_seconds: 10}}\n{}",
            model("router"),
            fake("writer"),
            model("planner"),
            c.cluster_keys(&c.schema.url(), "origin", &[], 30)
        ));
        let w = c.host_with(&format!(
            "{common}agents:\n{}{}routing:\n  fallback: [writer]\n{}",
            fake("writer"),
            fake("planner"),
            c.cluster_keys(&c.schema.url(), "w", &["worker"], 30)
        ));
        let mut o = origin.start();
        let mut s_w = w.start();
        origin.drop_task(
            "route.yaml",
            "description: Plan the next release\nrequires: [worker]\n",
        );
        wait_for(
            "the task completed on its origin",
            Duration::from_secs(60),
            || origin.tasks_in("completed").contains(&"route".to_string()),
        );
        let r = origin.result("completed", "route");
        assert_eq!(r["agent"], "planner", "{r}\n{}", log_of(&o));
        let because = r["chosen_because"].as_str().unwrap_or_default();
        assert!(
            because.contains("ran on host w")
                && because.contains("router router: category planning, confidence 0.93"),
            "{because}"
        );
        assert!(
            origin
                .read("context/agent_outputs/route_output.md")
                .contains("ran-by-planner"),
            "{r}"
        );
        assert_eq!(
            server.conversations(Api::Chat),
            1,
            "the router was asked once"
        );
        assert!(
            log_of(&s_w).contains("leased     route "),
            "{}",
            log_of(&s_w)
        );
        for s in [&mut s_w, &mut o] {
            assert!(s.stop().success(), "{}", log_of(s));
        }
    }
}
