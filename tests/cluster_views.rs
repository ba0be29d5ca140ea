//! What the views show of a cluster (`status`, `tasks`, `watch`, `serve`'s `/api/v1/hosts` and
//! `/metrics`): the real binary reads a real cluster queue, whose hosts are queue handles made here
//! as separate machines would make them. Every test is in `postgres`, which `tools/test` skips when
//! the server is down.

mod common;

mod postgres {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    use crate::common::{PgSchema, Project, pg_url, spawn_serve, test_config};
    use orchestrate::mirror::postgres::cluster_read::STATEMENTS;
    use orchestrate::mirror::postgres::queue::{Capacity, Publish, Queue, Settings};

    /// One host of the cluster: its queue handle and the runtime it runs on.
    struct Host {
        rt: tokio::runtime::Runtime,
        q: Queue,
    }

    impl Host {
        fn join(s: &PgSchema, name: &str, labels: &[&str]) -> Host {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let settings = Settings {
                lease: Duration::from_secs(30),
                ..Settings::default()
            };
            let mut q = rt
                .block_on(Queue::connect(
                    &s.url(),
                    &s.name,
                    name,
                    &format!("{name}-1"),
                    settings,
                ))
                .unwrap_or_else(|e| panic!("host {name} connects: {e:#}"));
            let labels: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
            rt.block_on(q.register_host(&labels))
                .unwrap_or_else(|e| panic!("host {name} registers: {e:#}"));
            Host { rt, q }
        }

        fn publish(&mut self, id: &str) {
            let task = Publish {
                id: id.into(),
                payload: format!("description: \"{id}\"\n"),
                max_attempts: 3,
                ..Publish::default()
            };
            self.rt
                .block_on(self.q.publish(&task))
                .unwrap_or_else(|e| panic!("publish {id}: {e:#}"));
        }

        fn claim_one(&mut self) -> String {
            let cap = Capacity {
                labels: vec![],
                agents: vec!["fake".into()],
                limit: 1,
            };
            let leases = self.rt.block_on(self.q.claim(&cap)).expect("claim");
            assert_eq!(leases.len(), 1, "one task claimed");
            leases[0].id.clone()
        }
    }

    /// A project whose configuration has the cluster on, as host `h1`, on `s`'s schema.
    fn cluster_project(url: &str, schema: &str) -> Project {
        Project::with_config(&test_config(&format!(
            "database:\n  url: \"{url}\"\n  schema: {schema}\ncluster:\n  enabled: true\n  host: h1\n"
        )))
    }

    fn host<'a>(st: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
        st["hosts"]
            .as_array()
            .unwrap_or_else(|| panic!("a hosts list: {st}"))
            .iter()
            .find(|h| h["name"] == name)
            .unwrap_or_else(|| panic!("host {name} in {st}"))
    }

    /// One HTTP/1.1 GET, `Connection: close`, read to the end (bounded): status and body.
    fn get(addr: &str, path: &str, headers: &[&str]) -> (u16, String) {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("set a read timeout");
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        for h in headers {
            req.push_str(&format!("{h}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).expect("send");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).expect("read response");
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("a status code");
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_string()
        };
        (status, body)
    }

    fn dechunk(mut s: &str) -> String {
        let mut out = String::new();
        loop {
            let (size, rest) = s.split_once("\r\n").expect("chunk size");
            let n = usize::from_str_radix(size.trim(), 16).expect("hex size");
            if n == 0 {
                return out;
            }
            out.push_str(&rest[..n]);
            s = &rest[n + 2..];
        }
    }

    /// Two hosts in the queue, `h2` running `t1` that `h1` published: `status` lists both hosts
    /// with their leases and what each runs, `tasks` names the host of each task of the queue, and
    /// `watch` has a hosts line. Once `h1` leaves, it shows as gone.
    #[test]
    fn status_tasks_and_watch_show_the_hosts_their_leases_and_who_runs_what() {
        let s = PgSchema::new("views_status");
        let p = cluster_project(&s.url(), &s.name);
        p.drop_task("t1.yaml", "description: \"@fake print=one\"\n");
        p.drop_task("t2.yaml", "description: \"@fake print=two\"\n");
        let mut h1 = Host::join(&s, "h1", &["gpu"]);
        let mut h2 = Host::join(&s, "h2", &[]);
        h1.publish("t1");
        h1.publish("t2");
        assert_eq!(h2.claim_one(), "t1", "the oldest task first");

        let st = p.run(&["status", "--json"]).assert_code(0).json();
        assert_eq!(st["cluster_error"], serde_json::Value::Null, "{st}");
        assert_eq!(st["hosts"].as_array().map(Vec::len), Some(2), "{st}");
        let one = host(&st, "h1");
        assert_eq!(one["alive"], true, "{st}");
        assert_eq!(one["leases"], 0, "{st}");
        assert_eq!(one["labels"], serde_json::json!(["gpu"]), "{st}");
        assert_eq!(one["running"], serde_json::json!([]), "{st}");
        let two = host(&st, "h2");
        assert_eq!(two["alive"], true, "{st}");
        assert_eq!(two["leases"], 1, "{st}");
        assert_eq!(two["running"], serde_json::json!(["t1"]), "{st}");
        assert!(
            two["heartbeat_age_seconds"].as_u64().is_some(),
            "an age in seconds: {st}"
        );

        let text = p.run(&["status"]).assert_code(0).stdout();
        let line = |name: &str| -> String {
            text.lines()
                .find(|l| l.trim_start().starts_with(&format!("{name} ")))
                .unwrap_or_else(|| panic!("a line for {name}:\n{text}"))
                .to_string()
        };
        assert!(text.contains("\nhosts:\n"), "{text}");
        let l1 = line("h1");
        assert!(
            l1.contains("alive") && l1.contains("0 leases") && l1.contains("labels gpu"),
            "{l1}"
        );
        let l2 = line("h2");
        assert!(
            l2.contains("alive")
                && l2.contains("1 lease,")
                && l2.contains("last heartbeat ")
                && l2.contains("runs t1"),
            "{l2}"
        );

        // HOST: the host holding the claim (t1 on h2), else the origin (t2 waits, published by h1).
        let listed = p.run(&["tasks", "--json"]).assert_code(0).json();
        let host_of = |id: &str| {
            listed
                .as_array()
                .expect("a list")
                .iter()
                .find(|t| t["id"] == id)
                .unwrap_or_else(|| panic!("{id} in {listed}"))["host"]
                .clone()
        };
        assert_eq!(host_of("t1"), "h2", "{listed}");
        assert_eq!(host_of("t2"), "h1", "{listed}");
        let table = p.run(&["tasks"]).assert_code(0).stdout();
        let header = table.lines().next().unwrap_or_default();
        assert!(header.contains(" HOST "), "{table}");
        let t1 = table
            .lines()
            .find(|l| l.starts_with("t1 "))
            .unwrap_or_else(|| panic!("t1 listed:\n{table}"));
        assert!(t1.contains(" h2 "), "{table}");

        let watch = p.run(&["watch"]).assert_code(0).stdout();
        assert_eq!(
            watch.lines().nth(2),
            Some("hosts: h1 alive (0 leases), h2 alive (1 lease)"),
            "{watch}"
        );

        h1.rt.block_on(h1.q.leave_host()).expect("h1 leaves");
        let st = p.run(&["status", "--json"]).assert_code(0).json();
        assert_eq!(host(&st, "h1")["alive"], false, "{st}");
        assert_eq!(host(&st, "h2")["alive"], true, "{st}");
        let text = p.run(&["status"]).assert_code(0).stdout();
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with("h1 ") && l.contains(" gone ")),
            "{text}"
        );
    }

    /// `GET /api/v1/hosts` over a real `orchestrate serve`, behind the same token as every other
    /// route; `/metrics` counts the live hosts and each host's leases.
    #[test]
    fn serve_lists_the_hosts_and_measures_them() {
        let s = PgSchema::new("views_serve");
        let p = cluster_project(&s.url(), &s.name);
        let mut h1 = Host::join(&s, "h1", &[]);
        let mut h2 = Host::join(&s, "h2", &["linux"]);
        h1.publish("a1");
        assert_eq!(h2.claim_one(), "a1");

        let (mut child, addr, _) = spawn_serve(&p, &["--token", "t0ken"], ("UNUSED", "x"), 0);
        let bearer = "Authorization: Bearer t0ken";
        let (code, body) = get(&addr, "/api/v1/hosts", &[]);
        assert_eq!(code, 401, "without the token: {body}");
        let (code, body) = get(&addr, "/api/v1/hosts", &[bearer]);
        assert_eq!(code, 200, "{body}");
        let hosts: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        let names: Vec<&str> = hosts
            .as_array()
            .expect("a list")
            .iter()
            .filter_map(|h| h["name"].as_str())
            .collect();
        assert_eq!(names, ["h1", "h2"], "{body}");
        assert_eq!(hosts[1]["leases"], 1, "{body}");
        assert_eq!(hosts[1]["labels"], serde_json::json!(["linux"]), "{body}");
        assert_eq!(hosts[1]["running"], serde_json::json!(["a1"]), "{body}");

        let (code, status) = get(&addr, "/api/v1/status", &[bearer]);
        assert_eq!(code, 200, "{status}");
        let status: serde_json::Value = serde_json::from_str(&status).expect("JSON");
        // The same hosts; a heartbeat's age may have passed a whole second between the two reads.
        let without_age = |v: &serde_json::Value| {
            let mut v = v.clone();
            for h in v.as_array_mut().into_iter().flatten() {
                h.as_object_mut().map(|o| o.remove("heartbeat_age_seconds"));
            }
            v
        };
        assert_eq!(
            without_age(&status["hosts"]),
            without_age(&hosts),
            "the status carries the same hosts"
        );
        assert!(
            status["hosts"][0]["heartbeat_age_seconds"].is_u64(),
            "{status}"
        );

        let (code, metrics) = get(&addr, "/metrics", &[bearer]);
        assert_eq!(code, 200, "{metrics}");
        assert!(
            metrics.contains("\norchestrate_cluster_hosts_alive 2\n"),
            "{metrics}"
        );
        assert!(
            metrics.contains("\norchestrate_cluster_leases{host=\"h2\"} 1\n")
                && metrics.contains("\norchestrate_cluster_leases{host=\"h1\"} 0\n"),
            "{metrics}"
        );
        let _ = child.kill();
        let _ = child.wait();
    }

    /// A schema where no host ever joined has no cluster tables: the views show no hosts and no
    /// error; without cluster mode there is no hosts section at all; a database that cannot be
    /// reached costs the hosts, not the status.
    #[test]
    fn no_cluster_tables_show_no_hosts_and_no_error() {
        let s = PgSchema::new("views_empty");
        let p = cluster_project(&s.url(), &s.name);
        p.drop_task("t1.yaml", "description: \"@fake print=one\"\n");
        let st = p.run(&["status", "--json"]).assert_code(0).json();
        assert_eq!(st["hosts"], serde_json::json!([]), "{st}");
        assert_eq!(st["cluster_error"], serde_json::Value::Null, "{st}");
        let text = p.run(&["status"]).assert_code(0).stdout();
        assert!(
            text.contains("hosts: none has joined the cluster yet"),
            "{text}"
        );
        let table = p.run(&["tasks"]).assert_code(0).stdout();
        assert!(!table.contains("HOST"), "{table}");
        let listed = p.run(&["tasks", "--json"]).assert_code(0).json();
        assert_eq!(listed[0]["id"], "t1", "{listed}");
        assert!(listed[0].get("host").is_none(), "{listed}");
        let watch = p.run(&["watch"]).assert_code(0).stdout();
        assert!(!watch.contains("hosts:"), "{watch}");
        assert_eq!(
            s.count(&format!(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = '{}'",
                s.name
            )),
            0,
            "reading created nothing"
        );

        // Cluster mode off: no hosts, even with the database configured.
        let off = Project::with_config(&test_config(&format!(
            "database:\n  url: \"{}\"\n  schema: {}\n",
            s.url(),
            s.name
        )));
        let st = off.run(&["status", "--json"]).assert_code(0).json();
        assert_eq!(st["hosts"], serde_json::Value::Null, "{st}");

        // Nothing listens on port 1: the status still answers, and says why the hosts are missing.
        let away = cluster_project("postgres://postgres@127.0.0.1:1/test", &s.name);
        let st = away.run(&["status", "--json"]).assert_code(0).json();
        assert_eq!(st["hosts"], serde_json::Value::Null, "{st}");
        let why = st["cluster_error"].as_str().unwrap_or_default();
        assert!(why.contains("cannot read the cluster queue"), "{st}");
    }

    /// The views judge ages and leases by the database's clock alone, as the queue does: every
    /// statement they send, prepared by the server, has no parameter of a time type.
    #[test]
    fn the_view_statements_take_no_time_from_the_caller() {
        let s = PgSchema::new("views_clock");
        let _h = Host::join(&s, "h1", &[]);
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
        assert_eq!(STATEMENTS.len(), 2, "the list is the module's statements");
        assert_eq!(timed, Vec::<String>::new(), "statements taking a time");
    }
}
