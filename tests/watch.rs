//! `orchestrate watch`: the real terminal UI under tmux (a private server, a fixed size), and the
//! plain output when stdout is not a terminal. The supervisor and its agent are real processes.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{BIN, Project, wait_for};

#[test]
fn watch_prints_one_plain_snapshot_when_stdout_is_not_a_terminal() {
    let p = Project::new();
    let mut sup = p.start();
    p.drop_task("ok1.yaml", "description: \"@fake print=hi\"\n");
    wait_for("ok1 completed", Duration::from_secs(30), || {
        p.tasks_in("completed").contains(&"ok1".to_string())
    });
    sup.stop();
    let run = p.run(&["watch"]);
    run.assert_code(0);
    let out = run.stdout();
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("running 0  pending 0  failed 0  completed 1 (local, event "),
        "{out}"
    );
    assert_eq!(lines[1], "agents: fake 0/8", "{out}");
    assert!(lines[2].starts_with("ID "), "{out}");
    assert!(
        lines[3].starts_with("ok1 ")
            && lines[3].contains(" completed ")
            && lines[3].contains(" fake "),
        "{out}"
    );
    assert_eq!(lines.len(), 4, "{out}");
}

#[test]
fn watch_follow_prints_the_snapshot_then_each_event() {
    let p = Project::new();
    let _sup = p.start();
    let mut child = p
        .cmd(&["watch", "--follow"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn watch --follow");
    let seen = Arc::new(Mutex::new(String::new()));
    let stdout = child.stdout.take().expect("stdout");
    let sink = seen.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let mut s = sink.lock().expect("lock");
            s.push_str(&line);
            s.push('\n');
        }
    });
    wait_for("the snapshot", Duration::from_secs(20), || {
        seen.lock().expect("lock").contains("no tasks")
    });
    p.drop_task("f1.yaml", "description: \"@fake print=hi\"\n");
    let events = || {
        seen.lock()
            .expect("lock")
            .lines()
            .filter(|l| l.contains(" f1 "))
            .map(|l| l.split_whitespace().nth(3).unwrap_or_default().to_string())
            .collect::<Vec<_>>()
    };
    wait_for(
        "f1's events up to completed",
        Duration::from_secs(30),
        || events().contains(&"completed".to_string()),
    );
    let states = events();
    assert_eq!(
        states.first().map(String::as_str),
        Some("pending"),
        "{states:?}"
    );
    let _ = child.kill();
    let _ = child.wait();
    reader.join().expect("reader");
}

mod postgres {
    use super::*;
    use common::{PgSchema, config_only_folder, pg_config, pg_url};

    /// With `--database-url` it reads PostgreSQL alone: a folder with nothing but a config naming the
    /// schema is enough.
    #[test]
    fn watch_reads_postgres_alone() {
        let s = PgSchema::new("watch_remote");
        let p = Project::with_config(&pg_config(&s.url(), &s.name));
        p.drop_task("r1.yaml", "description: \"@fake print=ok\"\n");
        p.drop_task("r2.yaml", "description: \"@fake exit=4\"\nmax_retries: 0\n");
        p.run(&["start", "--once"]).assert_code(0);
        let elsewhere = config_only_folder(&s.name);
        let out = Command::new(BIN)
            .arg("-C")
            .arg(elsewhere.path())
            .args(["--database-url", &pg_url(), "watch"])
            .stdin(Stdio::null())
            .output()
            .expect("run watch");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("running 0  pending 0  failed 1  completed 1 (postgres, event "),
            "{text}"
        );
        let row = |id: &str| {
            lines
                .iter()
                .find(|l| l.split_whitespace().next() == Some(id))
                .map(|l| l.split_whitespace().nth(1).unwrap_or_default().to_string())
        };
        assert_eq!(row("r2").as_deref(), Some("failed"), "{text}");
        assert_eq!(row("r1").as_deref(), Some("completed"), "{text}");
    }
}

/// Needs the `tmux` program: `tools/test` skips this module where it is missing.
mod tmux {
    use super::*;

    /// A tmux server of this test's own; killed when the test ends, passed or not.
    struct Tmux {
        socket: String,
    }

    impl Tmux {
        fn new(tag: &str) -> Tmux {
            common::assert_grouped("tmux", None, "tmux");
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .subsec_nanos();
            Tmux {
                socket: format!("orchestrate-{tag}-{}-{nanos}", std::process::id()),
            }
        }

        fn cmd(&self, args: &[&str]) -> std::process::Output {
            Command::new("tmux")
                .arg("-L")
                .arg(&self.socket)
                .args(args)
                .env_remove("TMUX")
                .stdin(Stdio::null())
                .output()
                .expect("run tmux")
        }

        fn screen(&self) -> String {
            String::from_utf8_lossy(&self.cmd(&["capture-pane", "-p", "-t", "w"]).stdout)
                .into_owned()
        }

        fn keys(&self, keys: &[&str]) {
            let mut args = vec!["send-keys", "-t", "w"];
            args.extend(keys);
            assert!(self.cmd(&args).status.success(), "send-keys {keys:?}");
        }

        /// Wait (bounded) until the screen shows a line for which `cond` holds; on timeout the panic
        /// shows the screen.
        #[track_caller]
        fn wait_line(&self, what: &str, cond: impl Fn(&str) -> bool) {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                let s = self.screen();
                if s.lines().any(&cond) {
                    return;
                }
                if std::time::Instant::now() >= deadline {
                    panic!("timed out waiting for {what}; the screen:\n{s}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    impl Drop for Tmux {
        fn drop(&mut self) {
            let _ = self.cmd(&["kill-server"]);
        }
    }

    fn quote(s: &str) -> String {
        format!("'{}'", s.replace('\'', r"'\''"))
    }

    #[test]
    fn watch_under_tmux_shows_a_dropped_task_live_opens_its_log_cancels_and_retries() {
        let p = Project::new();
        let _sup = p.start();
        let tmux = Tmux::new("watch");
        // Inside a shell, so that after `q` the screen shows what the shell prints next: the terminal
        // is back to normal.
        let script = format!(
            "env -u DATABASE_URL {} -C {} watch; echo watch-exited-$?; sleep 60",
            quote(BIN),
            quote(&p.root().display().to_string())
        );
        let out = tmux.cmd(&[
            "new-session",
            "-d",
            "-x",
            "100",
            "-y",
            "30",
            "-s",
            "w",
            "sh",
            "-c",
            &script,
        ]);
        assert!(
            out.status.success(),
            "tmux new-session: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tmux.wait_line("the header", |l| l.contains("orchestrate watch · local"));
        tmux.wait_line("the empty table", |l| l.contains("no tasks yet"));

        p.drop_task(
            "tw1.yaml",
            "description: \"@fake ticks=600:0.1\"\nmax_retries: 0\n",
        );
        tmux.wait_line("tw1 running", |l| {
            l.contains("tw1") && l.contains("running") && l.contains("fake")
        });
        tmux.wait_line("the counts", |l| l.contains("running 1  pending 0"));

        // A phone's width: the table is drawn again for it, the note keeps its room.
        assert!(
            tmux.cmd(&["resize-window", "-t", "w", "-x", "50", "-y", "30"])
                .status
                .success()
        );
        tmux.wait_line("the narrow table", |l| {
            l.contains("STATE") && l.contains("TIME") && !l.contains("AGENT")
        });
        assert!(
            tmux.cmd(&["resize-window", "-t", "w", "-x", "100", "-y", "30"])
                .status
                .success()
        );
        tmux.wait_line("the wide table", |l| {
            l.contains("STATE") && l.contains("AGENT")
        });

        // The detail view: the running attempt's log, live.
        tmux.keys(&["Enter"]);
        tmux.wait_line("the log section", |l| l.contains("log of attempt 1"));
        tmux.wait_line("the agent's output in the log", |l| l.contains("tick "));
        tmux.keys(&["Escape"]);
        tmux.wait_line("the table again", |l| l.contains("Enter open"));

        // Cancel asks first; `y` stops it through its supervisor.
        tmux.keys(&["c"]);
        tmux.wait_line("the question", |l| l.contains("cancel tw1? y/n"));
        tmux.keys(&["y"]);
        tmux.wait_line("tw1 failed", |l| l.contains("tw1") && l.contains("failed"));
        wait_for("tw1 in failed/", Duration::from_secs(30), || {
            p.tasks_in("failed").contains(&"tw1".to_string())
        });

        // Retry puts it back; it runs again.
        tmux.keys(&["r"]);
        tmux.wait_line("the question", |l| l.contains("retry tw1? y/n"));
        tmux.keys(&["y"]);
        tmux.wait_line("the answer", |l| l.contains("tw1: back in pending"));
        tmux.wait_line("tw1 running again", |l| {
            l.contains("tw1") && l.contains("running")
        });

        tmux.keys(&["q"]);
        tmux.wait_line("watch to exit with 0", |l| l.contains("watch-exited-0"));
        assert!(
            !tmux.screen().contains("orchestrate watch · local"),
            "the table is gone from the screen after q:\n{}",
            tmux.screen()
        );
    }
}
