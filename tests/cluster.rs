//! The cluster queue (`mirror::postgres::queue`) against the real server: hosts are threads here,
//! each with its own connection (and its own runtime), as separate machines would be. Every test
//! is in `postgres`, which `tools/test` skips when the server is down.

mod common;

mod postgres {
    use std::collections::{HashMap, HashSet};
    use std::sync::{Arc, Barrier, Mutex};
    use std::time::Duration;

    use crate::common::{PgHold, PgSchema, Proxy, pg_exec, pg_rows_public, pg_url, wait_for};
    use orchestrate::mirror::postgres::queue::{
        Capacity, Clash, End, Finished, Held, NameInUse, Publish, Queue, STATEMENTS, Settings,
    };

    /// One simulated host: its queue handle and the runtime it runs on.
    struct Host {
        rt: tokio::runtime::Runtime,
        q: Queue,
    }

    impl Host {
        fn on(url: &str, schema: &PgSchema, name: &str, lease: Duration) -> Host {
            Host::instance(url, schema, name, &format!("{name}-1"), lease)
        }

        fn instance(
            url: &str,
            schema: &PgSchema,
            name: &str,
            instance: &str,
            lease: Duration,
        ) -> Host {
            let settings = Settings {
                lease,
                ..Settings::default()
            };
            Host::with(url, schema, name, instance, settings)
        }

        fn with(
            url: &str,
            schema: &PgSchema,
            name: &str,
            instance: &str,
            settings: Settings,
        ) -> Host {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let q = rt
                .block_on(Queue::connect(url, &schema.name, name, instance, settings))
                .unwrap_or_else(|e| panic!("host {name} connects: {e:#}"));
            Host { rt, q }
        }

        fn new(schema: &PgSchema, name: &str) -> Host {
            Host::on(&schema.url(), schema, name, Duration::from_secs(30))
        }

        fn run<T>(&mut self, f: impl AsyncFnOnce(&mut Queue) -> T) -> T {
            self.rt.block_on(f(&mut self.q))
        }

        fn publish(&mut self, task: Publish) {
            let id = task.id.clone();
            self.run(async |q| q.publish(&task).await)
                .unwrap_or_else(|e| panic!("publish {id}: {e:#}"));
        }

        fn claim(&mut self, cap: &Capacity) -> Vec<orchestrate::mirror::postgres::queue::Lease> {
            self.run(async |q| q.claim(cap).await).expect("claim")
        }

        fn renew(&mut self, id: &str, fence: i64) -> Held {
            self.run(async |q| q.renew(id, fence).await).expect("renew")
        }

        fn finish(&mut self, id: &str, fence: i64, end: End) -> Held {
            let done = finished(end, &format!("{id} by {}", self.q.host()));
            self.run(async |q| q.finish(id, fence, &done).await)
                .expect("finish")
        }
    }

    fn task(id: &str) -> Publish {
        Publish {
            id: id.into(),
            payload: format!("description: \"{id}\"\n"),
            max_attempts: 3,
            ..Publish::default()
        }
    }

    fn any(limit: u32) -> Capacity {
        Capacity {
            labels: Vec::new(),
            agents: vec!["claude".into()],
            limit,
        }
    }

    fn finished(end: End, what: &str) -> Finished {
        Finished {
            end,
            record: format!("status: {what}\n"),
            output: format!("output of {what}"),
            patch: format!("--- a/f\n+++ b/f\n@@ -0,0 +1 @@\n+{what}\n"),
            log_tail: format!("log of {what}"),
        }
    }

    fn ids(leases: &[orchestrate::mirror::postgres::queue::Lease]) -> Vec<&str> {
        leases.iter().map(|l| l.id.as_str()).collect()
    }

    /// (state, outcome, owner, fence, attempts) of a queue row, as text.
    fn row(s: &PgSchema, id: &str) -> Vec<Option<String>> {
        s.query(&format!(
            "SELECT state, outcome, owner, fence, attempts FROM cluster_queue WHERE id = '{id}'"
        ))
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no queue row for {id}"))
    }

    fn text(v: &[&str]) -> Vec<Option<String>> {
        v.iter()
            .map(|s| (!s.is_empty()).then(|| s.to_string()))
            .collect()
    }

    /// Three hosts claim 600 tasks published through all three: each task is claimed and finished
    /// exactly once, and no task is ever held by two hosts at once.
    #[test]
    fn three_hosts_share_600_tasks_each_claimed_and_finished_exactly_once() {
        let s = PgSchema::new("cluster_600");
        let names = ["alpha", "beta", "gamma"];
        let mut hosts: Vec<Host> = names.iter().map(|n| Host::new(&s, n)).collect();
        for (i, h) in hosts.iter_mut().enumerate() {
            for k in 0..200 {
                let mut t = task(&format!("t{i}-{k:03}"));
                t.priority = (k % 5) as i64;
                h.publish(t);
            }
        }
        // Who holds what right now, as the hosts say: a second holder of one task is the bug.
        let holders: Arc<Mutex<HashMap<String, String>>> = Arc::default();
        let start = Arc::new(Barrier::new(3));
        let threads: Vec<_> = hosts
            .into_iter()
            .map(|mut h| {
                let (holders, start) = (holders.clone(), start.clone());
                std::thread::spawn(move || {
                    let me = h.q.host().to_string();
                    let mut mine = Vec::new();
                    start.wait();
                    loop {
                        let leases = h.claim(&any(4));
                        if leases.is_empty() {
                            break;
                        }
                        for l in &leases {
                            assert_eq!((l.fence, l.attempt), (1, 1), "{l:?}");
                            let before = holders
                                .lock()
                                .expect("lock")
                                .insert(l.id.clone(), me.clone());
                            assert_eq!(before, None, "{} held by two hosts at once", l.id);
                        }
                        for l in &leases {
                            assert_eq!(h.renew(&l.id, l.fence), Held::Ok);
                            // Let go in our own books before the finish commits: from then on
                            // another claim would be legal.
                            holders.lock().expect("lock").remove(&l.id);
                            assert_eq!(h.finish(&l.id, l.fence, End::Completed), Held::Ok);
                            mine.push(l.id.clone());
                        }
                    }
                    (me, mine)
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in threads {
            let (me, mine) = t.join().expect("a host panicked");
            println!("{me} ran {} tasks", mine.len());
            all.extend(mine);
        }
        let distinct: HashSet<&String> = all.iter().collect();
        assert_eq!(all.len(), 600, "finishes in all");
        assert_eq!(distinct.len(), 600, "each task finished once");
        assert_eq!(
            s.count(
                "SELECT count(*) FROM cluster_queue
                 WHERE state = 'done' AND outcome = 'completed' AND fence = 1 AND attempts = 1"
            ),
            600
        );
        assert_eq!(
            s.count("SELECT count(*) FROM cluster_results WHERE NOT stale AND fence = 1"),
            600
        );
        assert_eq!(s.count("SELECT count(*) FROM cluster_results"), 600);
        // The result row was written by the host that ran the task.
        assert_eq!(
            s.count(
                "SELECT count(*) FROM cluster_results r JOIN cluster_queue q ON q.id = r.task_id
                 WHERE r.host <> q.owner OR r.record <> 'status: ' || q.id || ' by ' || q.owner || E'\\n'"
            ),
            0
        );
    }

    /// A lease that runs out is claimed again by another host with a higher fence and one more
    /// attempt; the first host can then neither renew nor finish, and its finish is kept as stale.
    #[test]
    fn an_expired_lease_is_reclaimed_and_the_late_host_is_fenced_off() {
        let s = PgSchema::new("cluster_expiry");
        let mut a = Host::on(&s.url(), &s, "a", Duration::from_secs(1));
        let mut b = Host::new(&s, "b");
        a.publish(task("x"));
        let first = a.claim(&any(1));
        assert_eq!(ids(&first), ["x"]);
        assert_eq!((first[0].fence, first[0].attempt), (1, 1));
        assert_eq!(first[0].reclaimed_from, None);

        let mut second = Vec::new();
        wait_for(
            "b reclaims x once a's lease ran out",
            Duration::from_secs(30),
            || {
                second = b.claim(&any(1));
                !second.is_empty()
            },
        );
        let l = &second[0];
        assert_eq!(
            (
                l.id.as_str(),
                l.fence,
                l.attempt,
                l.reclaimed_from.as_ref().map(|c| c.host.as_str())
            ),
            ("x", 2, 2, Some("a"))
        );
        assert_eq!(row(&s, "x"), text(&["running", "", "b", "2", "2"]));

        assert_eq!(a.renew("x", 1), Held::Fenced, "a's renew is refused");
        assert_eq!(
            a.finish("x", 1, End::Completed),
            Held::Fenced,
            "a's finish is refused"
        );
        assert_eq!(
            row(&s, "x"),
            text(&["running", "", "b", "2", "2"]),
            "a's finish changed nothing"
        );
        assert_eq!(
            a.finish("x", 1, End::Completed),
            Held::Fenced,
            "asked again"
        );
        assert_eq!(b.renew("x", 2), Held::Ok);
        assert_eq!(b.finish("x", 2, End::Completed), Held::Ok);
        assert_eq!(b.finish("x", 2, End::Completed), Held::Ok, "asked again");
        assert_eq!(row(&s, "x"), text(&["done", "completed", "b", "2", "2"]));
        assert_eq!(
            b.renew("x", 2),
            Held::Fenced,
            "a finished task holds no lease"
        );

        let results = b.run(async |q| q.results("x").await).expect("results");
        let seen: Vec<(i64, &str, bool, &str)> = results
            .iter()
            .map(|r| (r.fence, r.host.as_str(), r.stale, r.record.as_str()))
            .collect();
        assert_eq!(
            seen,
            [
                (1, "a", true, "status: x by a\n"),
                (2, "b", false, "status: x by b\n")
            ]
        );
        assert_eq!(
            results[0].patch,
            "--- a/f\n+++ b/f\n@@ -0,0 +1 @@\n+x by a\n"
        );
    }

    /// A claim that follows a lost one says whose it was and when it ran (the runner records it
    /// as a `lost` attempt), whether the claim took the expired lease itself or `reclaim` had put
    /// the task back first; a claim after a retry, which its host reported, names no one.
    #[test]
    fn a_claim_after_a_lost_one_names_its_host_and_span() {
        let s = PgSchema::new("cluster_lost_claim");
        let mut a = Host::on(&s.url(), &s, "a", Duration::from_secs(1));
        let mut b = Host::new(&s, "b");
        a.publish(task("x"));
        assert_eq!(ids(&a.claim(&any(1))), ["x"]);
        wait_for(
            "a's lease ran out and was reclaimed",
            Duration::from_secs(30),
            || {
                !b.run(async |q| q.reclaim().await)
                    .expect("reclaim")
                    .is_empty()
            },
        );
        assert_eq!(row(&s, "x"), text(&["pending", "", "a", "1", "1"]));
        let l = b.claim(&any(1)).pop().expect("b claims x");
        let lost = l.reclaimed_from.clone().expect("the lost claim");
        assert_eq!((l.attempt, lost.host.as_str()), (2, "a"));
        let (started, until) = (lost.claimed_at, lost.lease_ended);
        assert!(started < until, "{started} < {until}");
        assert_eq!(
            b.finish(
                "x",
                l.fence,
                End::Retry {
                    after: Duration::ZERO
                }
            ),
            Held::Ok
        );
        let mut again = Vec::new();
        wait_for(
            "x is claimed again after the retry",
            Duration::from_secs(30),
            || {
                again = a.claim(&any(1));
                !again.is_empty()
            },
        );
        assert_eq!((again[0].attempt, &again[0].reclaimed_from), (3, &None));
    }

    /// No statement takes a time from the host, and leases are set and judged by the database's
    /// `now()`: a lease the database says is live cannot be taken, whatever time a host thinks it
    /// is, and one the database says ran out is gone, however long the holder thinks it has left.
    #[test]
    fn leases_are_judged_by_the_database_clock_alone() {
        let s = PgSchema::new("cluster_clock");
        let hour = Duration::from_secs(3600);
        let mut a = Host::on(&s.url(), &s, "a", hour);
        let mut b = Host::new(&s, "b");

        // Every statement, prepared by the server: none has a parameter of a time type.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let timed: Vec<String> = rt.block_on(async {
            use tokio_postgres::types::Type;
            let (client, conn) = tokio_postgres::connect(&pg_url(), tokio_postgres::NoTls)
                .await
                .expect("connect");
            tokio::spawn(conn);
            client
                .batch_execute(&format!("SET search_path TO {}", s.name))
                .await
                .expect("schema");
            let mut timed = Vec::new();
            for sql in STATEMENTS {
                let st = client
                    .prepare(sql)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
                for t in st.params() {
                    if [
                        Type::TIMESTAMPTZ,
                        Type::TIMESTAMP,
                        Type::DATE,
                        Type::TIME,
                        Type::TIMETZ,
                        Type::INTERVAL,
                    ]
                    .contains(t)
                    {
                        timed.push(format!("{t} in {sql}"));
                    }
                }
            }
            timed
        });
        assert!(
            STATEMENTS.len() >= 10,
            "the list is the module's statements"
        );
        assert_eq!(timed, Vec::<String>::new(), "statements taking a time");

        a.publish(task("x"));
        let lease = a.claim(&any(1));
        assert_eq!(ids(&lease), ["x"]);
        // Set by the server, in one statement: exactly one lease after the claim's own now().
        assert_eq!(
            s.count(
                "SELECT count(*) FROM cluster_queue
                 WHERE id = 'x' AND lease_until - claimed_at = interval '1 hour'"
            ),
            1
        );
        assert_eq!(b.claim(&any(1)), [], "a live lease is not taken");
        let none = b.run(async |q| q.expired_leases().await).expect("expired");
        assert_eq!(none, []);

        // The server's clock passes the lease (as if an hour went by there): the lease is gone,
        // though the holder was promised an hour a moment ago.
        s.query(
            "UPDATE cluster_queue SET lease_until = now() - interval '5 seconds' WHERE id = 'x'",
        );
        let expired = b.run(async |q| q.expired_leases().await).expect("expired");
        assert_eq!(expired.len(), 1);
        assert_eq!(
            (expired[0].id.as_str(), expired[0].owner.as_str()),
            ("x", "a")
        );
        assert!(
            expired[0].overdue >= Duration::from_secs(5),
            "overdue by the server's clock: {:?}",
            expired[0].overdue
        );
        assert_eq!(
            a.renew("x", 1),
            Held::Fenced,
            "a lease that ran out cannot be renewed"
        );
        let taken = b.claim(&any(1));
        assert_eq!(ids(&taken), ["x"]);
        assert_eq!(taken[0].fence, 2);
    }

    /// A host claims only what it may run: labels covering `requires`, its own name when pinned,
    /// an agent it offers, dependencies completed anywhere; best priority first.
    #[test]
    fn claims_honour_requires_pinned_host_agent_dependencies_and_priority() {
        let s = PgSchema::new("cluster_filter");
        let mut a = Host::new(&s, "a");
        let mut b = Host::new(&s, "b");
        let with = |id: &str, f: &dyn Fn(&mut Publish)| {
            let mut t = task(id);
            f(&mut t);
            t
        };
        a.publish(with("low", &|_| {}));
        a.publish(with("high", &|t| t.priority = 5));
        a.publish(with("mid", &|t| t.priority = 2));
        a.publish(with("gpu", &|t| t.requires = vec!["gpu".into()]));
        a.publish(with("gpu_linux", &|t| {
            t.requires = vec!["gpu".into(), "linux".into()]
        }));
        a.publish(with("on_b", &|t| t.pinned_host = Some("b".into())));
        a.publish(with("codex", &|t| t.agent = Some("codex".into())));
        a.publish(with("after_low", &|t| t.dependencies = vec!["low".into()]));

        let nothing = Capacity {
            agents: Vec::new(),
            ..any(10)
        };
        assert_eq!(a.claim(&nothing), [], "no agent free, nothing claimed");
        let first = a.claim(&any(1));
        assert_eq!(ids(&first), ["high"], "best priority first");
        let rest = a.claim(&any(10));
        assert_eq!(
            ids(&rest),
            ["mid", "low"],
            "then by priority; nothing else fits a"
        );

        let cap_b = Capacity {
            labels: vec!["gpu".into(), "arm".into()],
            agents: vec!["claude".into(), "codex".into()],
            limit: 10,
        };
        let mut got = ids(&b.claim(&cap_b))
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
        got.sort();
        assert_eq!(got, ["codex", "gpu", "on_b"], "gpu_linux needs linux too");

        // A dependency that failed does not release its dependent; one that completed does.
        assert_eq!(a.finish("mid", 1, End::Failed), Held::Ok);
        assert_eq!(a.claim(&any(10)), []);
        assert_eq!(a.finish("low", 1, End::Completed), Held::Ok);
        assert_eq!(ids(&a.claim(&any(10))), ["after_low"]);
    }

    /// With aging, a task that waited long enough overtakes a younger one of higher priority
    /// (one level per `aging` waited, by the server's clock).
    #[test]
    fn aging_lifts_a_task_that_waited() {
        let s = PgSchema::new("cluster_aging");
        let ten_minutes = Duration::from_secs(600);
        let settings = Settings {
            aging: ten_minutes,
            ..Settings::default()
        };
        let mut a = Host::with(&s.url(), &s, "a", "a-1", settings);
        let mut young = task("young");
        young.priority = 5;
        a.publish(task("old"));
        a.publish(young);
        // Published an hour ago, by the server's clock: six levels up, 6 > 5.
        s.query(
            "UPDATE cluster_queue SET created_at = now() - interval '61 minutes' WHERE id = 'old'",
        );
        assert_eq!(ids(&a.claim(&any(1))), ["old"]);
        let mut plain = Host::new(&s, "b");
        plain.publish(task("old2"));
        let mut young2 = task("young2");
        young2.priority = 5;
        plain.publish(young2);
        s.query(
            "UPDATE cluster_queue SET created_at = now() - interval '61 minutes' WHERE id = 'old2'",
        );
        assert_eq!(
            ids(&plain.claim(&any(2))),
            ["young", "young2"],
            "without aging, priority alone: old2 waits"
        );
    }

    /// The heartbeat renews every lease in one statement and says which are gone; a claim given
    /// back unused is pending again at once, its attempt not counted, its fence kept.
    #[test]
    fn renew_all_names_the_lost_leases_and_release_gives_a_claim_back() {
        let s = PgSchema::new("cluster_renew_all");
        let mut a = Host::new(&s, "a");
        let mut b = Host::new(&s, "b");
        for id in ["x", "y", "z"] {
            a.publish(task(id));
        }
        let held = a.claim(&any(3));
        assert_eq!(ids(&held), ["x", "y", "z"]);
        // y's lease runs out by the server's clock, and b takes it.
        s.query(
            "UPDATE cluster_queue SET lease_until = now() - interval '1 second' WHERE id = 'y'",
        );
        assert_eq!(ids(&b.claim(&any(1))), ["y"]);
        let leases: Vec<(String, i64)> = held.iter().map(|l| (l.id.clone(), l.fence)).collect();
        let answers = a
            .run(async |q| q.renew_all(&leases).await)
            .expect("renew_all");
        assert_eq!(answers, [Held::Ok, Held::Fenced, Held::Ok]);

        let back = a.run(async |q| q.release("z", 1).await).expect("release");
        assert_eq!(back, Held::Ok);
        assert_eq!(row(&s, "z"), text(&["pending", "", "", "1", "0"]));
        let again = b.claim(&any(1));
        assert_eq!(ids(&again), ["z"]);
        assert_eq!((again[0].fence, again[0].attempt), (2, 1));
        let late = a.run(async |q| q.release("z", 1).await).expect("release");
        assert_eq!(late, Held::Fenced, "b holds it now");
        assert_eq!(row(&s, "z"), text(&["running", "", "b", "2", "1"]));
    }

    /// The origin is offered each finished task of its own, with the result that decided it
    /// (never a stale one), until it says it took delivery.
    #[test]
    fn the_origin_is_offered_each_outcome_until_it_takes_delivery() {
        let s = PgSchema::new("cluster_outcomes");
        let mut a = Host::new(&s, "a");
        let mut b = Host::new(&s, "b");
        for id in ["x", "y"] {
            a.publish(task(id));
        }
        let mut z = task("z");
        z.max_attempts = 1;
        z.base_commit = Some("abc123".into());
        a.publish(z);
        b.publish(task("of_b"));
        assert_eq!(ids(&b.claim(&any(10))), ["x", "y", "z", "of_b"]);
        assert_eq!(b.finish("x", 1, End::Completed), Held::Ok);
        assert_eq!(b.finish("y", 1, End::Failed), Held::Ok);
        assert_eq!(b.finish("of_b", 1, End::Completed), Held::Ok);
        s.query(
            "UPDATE cluster_queue SET lease_until = now() - interval '1 second' WHERE id = 'z'",
        );
        let settled = a.run(async |q| q.reclaim().await).expect("reclaim");
        assert_eq!(settled.len(), 1);
        assert_eq!(b.finish("z", 1, End::Completed), Held::Fenced, "too late");

        let out = a.run(async |q| q.outcomes(10).await).expect("outcomes");
        let seen: Vec<(&str, bool, Option<&str>, Option<&str>)> = out
            .iter()
            .map(|o| {
                (
                    o.id.as_str(),
                    o.completed,
                    o.result.as_ref().map(|r| r.record.as_str()),
                    o.reason.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("x", true, Some("status: x by b\n"), None),
                ("y", false, Some("status: y by b\n"), None),
                (
                    "z",
                    false,
                    None,
                    Some("the lease of attempt 1 ran out on host b and no attempts are left")
                ),
            ]
        );
        assert_eq!(out[2].base_commit.as_deref(), Some("abc123"));
        assert_eq!(out[0].result.as_ref().map(|r| r.host.as_str()), Some("b"));

        assert!(a.run(async |q| q.delivered("x").await).expect("ack"));
        assert!(
            !a.run(async |q| q.delivered("x").await).expect("ack"),
            "once"
        );
        assert!(
            !b.run(async |q| q.delivered("y").await).expect("ack"),
            "not b's"
        );
        let left = a.run(async |q| q.outcomes(10).await).expect("outcomes");
        assert_eq!(
            left.iter().map(|o| o.id.as_str()).collect::<Vec<_>>(),
            ["y", "z"]
        );
        let of_b = b.run(async |q| q.outcomes(10).await).expect("outcomes");
        assert_eq!(
            of_b.iter().map(|o| o.id.as_str()).collect::<Vec<_>>(),
            ["of_b"]
        );
    }

    /// Hosts listening on the cluster's channel wake when a task is published (to claim it) and
    /// when an outcome of theirs is decided (to take delivery).
    #[test]
    fn publishing_and_finishing_wake_the_listening_hosts() {
        let s = PgSchema::new("cluster_wake");
        let mut a = Host::new(&s, "a");
        let mut b = Host::new(&s, "b");
        let bound = Duration::from_secs(10);
        let mut b_wakes = b.run(async |q| q.listen().await).expect("listen");
        a.publish(task("x"));
        let woke =
            b.rt.block_on(async { tokio::time::timeout(bound, b_wakes.next()).await });
        assert_eq!(woke.ok().flatten(), Some(()), "b wakes for the new task");

        // a listens from here on: the wake-up of its own publish is behind it.
        let mut a_wakes = a.run(async |q| q.listen().await).expect("listen");
        assert_eq!(ids(&b.claim(&any(1))), ["x"]);
        assert_eq!(b.finish("x", 1, End::Completed), Held::Ok);
        let woke =
            a.rt.block_on(async { tokio::time::timeout(bound, a_wakes.next()).await });
        assert_eq!(
            woke.ok().flatten(),
            Some(()),
            "the origin wakes for the outcome"
        );
        let out = a.run(async |q| q.outcomes(10).await).expect("outcomes");
        assert_eq!(out.len(), 1);
    }

    /// An id already in the queue is refused, naming the host that published it, and the row
    /// stays as it was.
    #[test]
    fn a_clashing_id_is_refused_naming_its_origin() {
        let s = PgSchema::new("cluster_clash");
        let mut a = Host::new(&s, "a");
        let mut b = Host::new(&s, "b");
        a.publish(task("dup"));
        let mut again = task("dup");
        again.payload = "description: other\n".into();
        let e = b
            .run(async |q| q.publish(&again).await)
            .expect_err("a clash");
        let clash = e.downcast_ref::<Clash>().expect("a Clash");
        assert_eq!(
            (clash.origin.as_str(), clash.state.as_str()),
            ("a", "pending")
        );
        assert_eq!(
            e.to_string(),
            "task id dup is already in the cluster queue (published by host a, pending)"
        );
        assert_eq!(
            s.query("SELECT origin, payload FROM cluster_queue"),
            [text(&["a", "description: \"dup\"\n"])]
        );
        let mut zero = task("zero");
        zero.max_attempts = 0;
        let e = a
            .run(async |q| q.publish(&zero).await)
            .expect_err("refused");
        assert_eq!(e.to_string(), "task zero: max_attempts must be at least 1");
    }

    /// A retry puts the task back (after its back-off, by the server's clock); a task whose lease
    /// runs out on its last attempt is failed by `reclaim`, and a late finish stays stale.
    #[test]
    fn a_retry_requeues_and_a_lease_lost_on_the_last_attempt_fails_the_task() {
        let s = PgSchema::new("cluster_retry");
        let mut a = Host::on(&s.url(), &s, "a", Duration::from_secs(1));
        let mut b = Host::new(&s, "b");
        let mut r = task("r");
        r.max_attempts = 2;
        a.publish(r);
        a.publish(task("s"));

        assert_eq!(ids(&a.claim(&any(1))), ["r"], "the older first");
        assert_eq!(
            a.finish(
                "r",
                1,
                End::Retry {
                    after: Duration::ZERO
                }
            ),
            Held::Ok
        );
        assert_eq!(row(&s, "r"), text(&["pending", "", "", "1", "1"]));
        let both = a.claim(&any(2));
        assert_eq!(ids(&both), ["r", "s"]);
        assert_eq!((both[0].fence, both[0].attempt), (2, 2));
        let hour = Duration::from_secs(3600);
        assert_eq!(a.finish("s", 1, End::Retry { after: hour }), Held::Ok);
        assert_eq!(
            a.claim(&any(10)),
            [],
            "s waits out its back-off; r is running"
        );

        wait_for("r's lease runs out", Duration::from_secs(30), || {
            let e = b.run(async |q| q.expired_leases().await).expect("expired");
            e.iter()
                .any(|e| e.id == "r" && e.attempts == 2 && e.max_attempts == 2)
        });
        assert_eq!(b.claim(&any(10)), [], "r has no attempts left");
        let settled = b.run(async |q| q.reclaim().await).expect("reclaim");
        assert_eq!(settled.len(), 1);
        assert_eq!(
            (
                settled[0].id.as_str(),
                settled[0].owner.as_str(),
                settled[0].failed
            ),
            ("r", "a", true)
        );
        assert_eq!(row(&s, "r"), text(&["done", "failed", "a", "2", "2"]));
        assert_eq!(
            s.query("SELECT reason FROM cluster_queue WHERE id = 'r'"),
            [text(&[
                "the lease of attempt 2 ran out on host a and no attempts are left"
            ])]
        );
        assert_eq!(a.finish("r", 2, End::Completed), Held::Fenced, "too late");
        assert_eq!(row(&s, "r"), text(&["done", "failed", "a", "2", "2"]));
        assert_eq!(
            s.query("SELECT fence, outcome, stale FROM cluster_results WHERE task_id = 'r' ORDER BY fence"),
            [text(&["1", "retry", "f"]), text(&["2", "completed", "t"])]
        );
    }

    /// The queue counts attempts, whatever the runner counted: a retry or an abandoned attempt on
    /// the last attempt the task has fails it, saying why, instead of leaving it pending where no
    /// claim can take it. (A runner's history misses attempts whose host died without a word.)
    #[test]
    fn a_retry_or_an_abandon_on_the_last_attempt_fails_the_task_saying_why() {
        let s = PgSchema::new("cluster_spent");
        let mut a = Host::new(&s, "a");
        for id in ["r", "g"] {
            let mut t = task(id);
            t.max_attempts = 1;
            a.publish(t);
        }
        let got = a.claim(&any(2));
        assert_eq!(ids(&got), ["r", "g"]);
        let after = Duration::ZERO;
        assert_eq!(a.finish("r", 1, End::Retry { after }), Held::Ok);
        assert_eq!(row(&s, "r"), text(&["done", "failed", "a", "1", "1"]));
        assert_eq!(a.finish("g", 1, End::Abandoned), Held::Fenced);
        assert_eq!(row(&s, "g"), text(&["done", "failed", "a", "1", "1"]));
        assert_eq!(
            s.query("SELECT id, reason FROM cluster_queue ORDER BY id"),
            [
                text(&[
                    "g",
                    "attempt 1 on host a was the last (1 allowed): the host gave its lease up (no renewal was answered in time)"
                ]),
                text(&[
                    "r",
                    "attempt 1 on host a was the last (1 allowed): it failed and was to be retried"
                ]),
            ]
        );
        // Both are offered to the origin: r with the result that decided it, g with the reason.
        let offered = a.run(async |q| q.outcomes(10).await).expect("outcomes");
        let seen: Vec<(&str, bool)> = offered
            .iter()
            .map(|o| (o.id.as_str(), o.result.is_some()))
            .collect();
        assert_eq!(seen, [("r", true), ("g", false)]);
    }

    /// Host names are unique while their holder lives; `hosts` shows who is alive and holds what.
    #[test]
    fn host_names_are_unique_while_alive_and_hosts_show_their_leases() {
        let s = PgSchema::new("cluster_hosts");
        let url = s.url();
        let mut a = Host::instance(&url, &s, "a", "a-1", Duration::from_secs(30));
        let mut a2 = Host::instance(&url, &s, "a", "a-2", Duration::from_secs(30));
        let mut b = Host::new(&s, "b");
        a.run(async |q| q.register_host(&["gpu".to_string()]).await)
            .expect("a registers");
        b.run(async |q| q.register_host(&[]).await)
            .expect("b registers");
        let e = a2
            .run(async |q| q.register_host(&[]).await)
            .expect_err("the name is taken");
        let taken = e.downcast_ref::<NameInUse>().expect("NameInUse");
        assert_eq!((taken.name.as_str(), taken.instance.as_str()), ("a", "a-1"));
        assert!(e.to_string().contains("give each host its own name"), "{e}");

        a.publish(task("x"));
        assert_eq!(ids(&a.claim(&any(1))), ["x"]);
        a.run(async |q| q.heartbeat_host().await).expect("beat");
        let hosts = b.run(async |q| q.hosts().await).expect("hosts");
        let seen: Vec<(&str, bool, u32, Vec<String>)> = hosts
            .iter()
            .map(|h| (h.name.as_str(), h.alive, h.leases, h.labels.clone()))
            .collect();
        assert_eq!(
            seen,
            [
                ("a", true, 1, vec!["gpu".to_string()]),
                ("b", true, 0, vec![])
            ]
        );
        assert!(
            hosts[0].started_at.ends_with('Z'),
            "{}",
            hosts[0].started_at
        );

        a.run(async |q| q.leave_host().await).expect("leave");
        let hosts = b.run(async |q| q.hosts().await).expect("hosts");
        assert!(!hosts[0].alive, "a left");
        a2.run(async |q| q.register_host(&[]).await)
            .expect("the name is free once its holder left");
        // A new process that knows the holder is dead (its own predecessor on this tree) takes
        // the name at once; naming any other instance does not.
        let mut a3 = Host::instance(&url, &s, "a", "a-3", Duration::from_secs(30));
        let e = a3
            .run(async |q| q.register_host_replacing(&[], Some("a-1")).await)
            .expect_err("a-1 does not hold the name: a-2, alive, does");
        assert!(e.downcast_ref::<NameInUse>().is_some(), "{e}");
        a3.run(async |q| q.register_host_replacing(&[], Some("a-2")).await)
            .expect("the holder named as dead gives the name up at once");
        // Neither earlier instance holds the name any more: a-2 lost it to a-3, a-1 to a-2.
        for (old, was) in [(&mut a2, "a-2"), (&mut a, "a-1")] {
            let e = old.run(async |q| q.heartbeat_host().await).expect_err(was);
            assert!(
                e.to_string().contains("another supervisor took the name"),
                "{was}: {e}"
            );
        }
    }

    /// A host cut off from the server (a proxy between them drops the connection; the server runs
    /// on) cannot renew; its lease runs out and another host takes the task with a higher fence;
    /// once the link is back the cut-off host is fenced off and its finish kept as stale.
    #[test]
    fn a_host_cut_off_by_a_proxy_loses_its_task_to_the_others() {
        let s = PgSchema::new("cluster_proxy");
        let proxy = Proxy::start();
        let mut a = Host::on(&s.url_on(&proxy.url()), &s, "a", Duration::from_secs(2));
        let mut b = Host::new(&s, "b");
        a.publish(task("x"));
        let l = a.claim(&any(1));
        assert_eq!(ids(&l), ["x"]);
        assert_eq!(a.renew("x", 1), Held::Ok);

        proxy.cut();
        let e = a
            .run(async |q| q.renew("x", 1).await)
            .expect_err("no server behind the proxy");
        println!("a's renew while cut off: {e:#}");
        let mut taken = Vec::new();
        wait_for("b takes x over", Duration::from_secs(30), || {
            taken = b.claim(&any(1));
            !taken.is_empty()
        });
        assert_eq!(
            (
                taken[0].fence,
                taken[0].reclaimed_from.as_ref().map(|c| c.host.as_str())
            ),
            (2, Some("a"))
        );

        proxy.restore();
        assert_eq!(
            a.renew("x", 1),
            Held::Fenced,
            "back online, a learns it lost x"
        );
        assert_eq!(a.finish("x", 1, End::Completed), Held::Fenced);
        assert_eq!(b.finish("x", 2, End::Completed), Held::Ok);
        assert_eq!(
            s.query("SELECT fence, host, stale FROM cluster_results ORDER BY fence"),
            [text(&["1", "a", "t"]), text(&["2", "b", "f"])]
        );
    }

    /// A link that goes silent (the proxy holds everything; no error reaches either side): the
    /// renewal gives up within the bound on every answer instead of hanging, the others take the
    /// task once the lease ran out, and the host is fenced off when the link comes back.
    #[test]
    fn a_host_behind_a_silent_link_gives_up_within_the_bound_and_is_fenced_off() {
        let s = PgSchema::new("cluster_silent");
        let proxy = Proxy::start();
        let mut a = Host::on(&s.url_on(&proxy.url()), &s, "a", Duration::from_secs(2));
        let mut b = Host::new(&s, "b");
        a.publish(task("x"));
        assert_eq!(ids(&a.claim(&any(1))), ["x"]);

        proxy.blackhole();
        let e = a
            .run(async |q| q.renew("x", 1).await)
            .expect_err("no answer through a silent link");
        assert!(
            orchestrate::mirror::postgres::is_no_answer(&e),
            "a bounded wait, not a hang: {e:#}"
        );
        let mut taken = Vec::new();
        wait_for("b takes x over", Duration::from_secs(30), || {
            taken = b.claim(&any(1));
            !taken.is_empty()
        });
        assert_eq!(taken[0].fence, 2);

        proxy.restore();
        assert_eq!(a.renew("x", 1), Held::Fenced, "a new session, and the news");
        assert_eq!(a.finish("x", 1, End::Completed), Held::Fenced);
        assert_eq!(b.finish("x", 2, End::Completed), Held::Ok);
    }

    /// `cluster.max_concurrent`: three hosts claim at once, again and again, with a limit of 2 live
    /// leases across the cluster; never more than 2 are held, and a finished or expired lease frees
    /// its slot.
    #[test]
    fn a_cluster_wide_limit_holds_while_hosts_claim_at_once() {
        let s = PgSchema::new("cluster_max_running");
        let lease = Duration::from_secs(30);
        let settings = Settings {
            lease,
            max_running: Some(2),
            ..Settings::default()
        };
        let mut hosts: Vec<Host> = ["a", "b", "c"]
            .iter()
            .map(|n| Host::with(&s.url(), &s, n, &format!("{n}-1"), settings.clone()))
            .collect();
        for i in 0..30 {
            hosts[i % 3].publish(task(&format!("m{i:02}")));
        }
        let live =
            "SELECT count(*) FROM cluster_queue WHERE state = 'running' AND lease_until >= now()";
        let mut finished = 0;
        for round in 0..15 {
            // All three claim at the same moment, each asking for up to 5.
            let barrier = Arc::new(Barrier::new(3));
            let got: Vec<Vec<orchestrate::mirror::postgres::queue::Lease>> =
                std::thread::scope(|sc| {
                    let handles: Vec<_> = hosts
                        .iter_mut()
                        .map(|h| {
                            let b = barrier.clone();
                            sc.spawn(move || {
                                b.wait();
                                h.claim(&any(5))
                            })
                        })
                        .collect();
                    handles
                        .into_iter()
                        .map(|j| j.join().expect("claimer"))
                        .collect()
                });
            let held = s.count(live);
            let claimed = got.iter().map(Vec::len).sum::<usize>();
            // Each round starts with every slot free and tasks enough for all: exactly two.
            assert_eq!(
                (claimed, held),
                (2, 2),
                "round {round}: {claimed} claimed, {held} live leases, with a limit of 2"
            );
            // Finish what each got: the slots are free for the next round.
            for (h, leases) in hosts.iter_mut().zip(&got) {
                for l in leases {
                    assert_eq!(h.finish(&l.id, l.fence, End::Completed), Held::Ok);
                    finished += 1;
                }
            }
        }
        assert_eq!(finished, 30, "every task ran, two at a time at most");
        // An expired lease frees its slot: a host that claims two and dies leaves room after its
        // lease has run out.
        for i in 0..3 {
            hosts[0].publish(task(&format!("x{i}")));
        }
        let short = Settings {
            lease: Duration::from_secs(1),
            max_running: Some(2),
            ..Settings::default()
        };
        let mut dying = Host::with(&s.url(), &s, "dying", "dying-1", short);
        assert_eq!(dying.claim(&any(5)).len(), 2, "two slots, two leases");
        assert!(hosts[1].claim(&any(5)).is_empty(), "no slot left");
        std::thread::sleep(Duration::from_millis(1500));
        let after = hosts[1].claim(&any(5));
        assert_eq!(
            after.len(),
            2,
            "the dead host's slots are free again: {:?}",
            ids(&after)
        );
    }

    /// A runner that gave its lease up (no renewal answered in time) reports the attempt as
    /// abandoned: stored as stale whatever it says, and the task goes back to pending while the
    /// fence still holds (the attempt counted); after a newer claim it is just a stale row.
    #[test]
    fn an_abandoned_attempt_is_stale_and_puts_the_task_back() {
        let s = PgSchema::new("cluster_abandoned");
        let mut a = Host::new(&s, "a");
        let mut b = Host::new(&s, "b");
        a.publish(task("gone"));
        let l = a.claim(&any(1)).pop().expect("claimed");
        assert_eq!(a.finish("gone", l.fence, End::Abandoned), Held::Fenced);
        assert_eq!(row(&s, "gone"), text(&["pending", "", "", "1", "1"]));
        assert_eq!(
            s.count("SELECT count(*) FROM cluster_results WHERE task_id = 'gone' AND stale"),
            1
        );
        // Claimed again (attempt 2); a late abandon of an older fence changes nothing.
        let l2 = b.claim(&any(1)).pop().expect("claimed again");
        assert_eq!((l2.fence, l2.attempt), (2, 2));
        assert_eq!(b.finish("gone", l2.fence, End::Completed), Held::Ok);
        assert_eq!(row(&s, "gone"), text(&["done", "completed", "b", "2", "2"]));
    }

    /// A host joins (every start migrates) while the hosts already running hold the queue's
    /// tables in open transactions: tables already current are only read, so the start neither
    /// waits for those transactions nor queues a lock ahead of the statements that follow them.
    #[test]
    fn a_host_joins_while_the_others_hold_the_queue_s_tables() {
        let s = PgSchema::new("cluster_join_busy");
        let mut a = Host::new(&s, "a");
        a.publish(task("t"));
        let n = &s.name;
        let _hold = PgHold::new(&format!(
            "LOCK TABLE {n}.cluster_hosts, {n}.cluster_queue, {n}.cluster_results IN ROW EXCLUSIVE MODE"
        ));
        let mut b = Host::new(&s, "b");
        assert_eq!(b.claim(&any(1)).len(), 1, "the joined host claims");
    }

    /// Migrations take turns per schema: while one project's migration lock is held (a host
    /// upgrading its tables), a host of another project sharing the database migrates at once.
    #[test]
    fn a_migration_under_way_in_one_schema_holds_up_no_other_schema() {
        let busy = PgSchema::new("cluster_upgrade_busy");
        drop(Host::new(&busy, "a"));
        // The tables of an older orchestrate: the next start has DDL to run, under the lock.
        pg_exec(&format!(
            "ALTER TABLE {}.cluster_queue DROP COLUMN routed_because",
            busy.name
        ));
        // The migration lock of `busy`, as the supervisor keys it (`xact_lock`); that it is that
        // very lock is checked below, by a start of `busy` waiting for it.
        let hold = PgHold::new(&format!(
            "SET LOCAL search_path TO {}; SELECT pg_advisory_xact_lock(hashtextextended(current_schema(), {}))",
            busy.name, 0x6f72_6368_0001_i64
        ));
        let url = busy.url();
        let name = busy.name.clone();
        let upgrading = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(Queue::connect(&url, &name, "a", "a-2", Settings::default()))
                .map(drop)
        });
        let waiting = format!(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity s ON s.pid = l.pid
             WHERE l.locktype = 'advisory' AND NOT l.granted AND s.application_name = '{}'",
            busy.name
        );
        wait_for(
            "the start of the busy schema waits for its migration lock",
            Duration::from_secs(30),
            || pg_rows_public(&waiting).as_deref() == Some("1"),
        );
        // Another project in the same database starts meanwhile: its migration does not wait.
        let other = PgSchema::new("cluster_upgrade_other");
        let mut b = Host::new(&other, "b");
        b.publish(task("t"));
        assert!(
            !upgrading.is_finished(),
            "the busy schema's start went on while its migration lock was held"
        );
        drop(hold);
        upgrading
            .join()
            .expect("the upgrading thread")
            .expect("the busy schema upgraded once its lock was free");
        assert_eq!(
            busy.count(
                "SELECT count(*) FROM information_schema.columns
                 WHERE table_schema = current_schema() AND table_name = 'cluster_queue'
                   AND column_name = 'routed_because'"
            ),
            1,
            "upgraded"
        );
    }
}
