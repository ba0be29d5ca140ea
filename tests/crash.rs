//! Crash injection: the supervisor SIGKILLs itself at every commit point of the spool protocol
//! (`ORCHESTRATE_CRASH_AT`, see src/failpoint.rs), is restarted, and must end with every task in
//! exactly one terminal place, none run twice at once, and the mirror agreeing with the tree.
//! Then three supervisors share one tree while a killer SIGKILLs them at random.

mod common;

use std::collections::HashMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

const TASKS: usize = 6;

/// Tasks that take the whole protocol: a lock (to catch two runs at once), a file written in the
/// workdir, and one task that fails its first attempt so the retry path (requeue) runs too.
fn drop_tasks(p: &Project, prefix: &str, n: usize) -> Vec<String> {
    std::fs::create_dir_all(p.path("locks")).expect("mkdir locks");
    (0..n)
        .map(|i| {
            let id = format!("{prefix}{i:02}");
            let extra = if i == 0 {
                format!(" fail-until=locks/{id}.count:2")
            } else {
                String::new()
            };
            p.drop_task(
                &format!("{id}.yaml"),
                &format!(
                    "description: \"@fake lock=locks/{id}.lock sleep=0.3 write=out_{id}.txt:{id}{extra}\"\n"
                ),
            );
            id
        })
        .collect()
}

/// Every task in exactly one terminal place, completed, run at most once at a time, with exactly
/// one completed attempt; nothing quarantined; the mirror agrees. Returns how many were lost.
fn check_outcome(p: &Project, ids: &[String], logs: &str) -> usize {
    let completed = p.tasks_in("completed");
    let failed = p.tasks_in("failed");
    assert!(
        p.tasks_in("pending").is_empty() && p.tasks_in("assigned").is_empty(),
        "left behind: pending {:?} assigned {:?}\n{logs}",
        p.tasks_in("pending"),
        p.tasks_in("assigned")
    );
    assert!(
        p.files("tasks/quarantine").is_empty(),
        "quarantined: {:?}\n{logs}",
        p.files("tasks/quarantine")
    );
    let mut lost = 0;
    for id in ids {
        let places = usize::from(completed.contains(id)) + usize::from(failed.contains(id));
        assert!(places <= 1, "{id} is in two terminal places\n{logs}");
        if !completed.contains(id) {
            lost += 1;
            let why = if failed.contains(id) {
                p.result("failed", id).to_string()
            } else {
                "in no terminal place".into()
            };
            eprintln!("LOST {id}: {why}");
            continue;
        }
        assert!(
            !p.path(&format!("locks/{id}.lock.overlap")).exists(),
            "{id} ran twice at the same time\n{logs}"
        );
        let r = p.result("completed", id);
        let done = r["attempts"]
            .as_array()
            .expect("attempts")
            .iter()
            .filter(|a| a["outcome"] == "completed")
            .count();
        assert_eq!(done, 1, "{id} completed {done} times: {r}\n{logs}");
        assert_eq!(
            p.read(&format!("out_{id}.txt")),
            format!("{id}\n"),
            "{id}'s work\n{logs}"
        );
    }
    assert_eq!(p.mirror_states(), p.tree_states(), "mirror vs tree\n{logs}");
    lost
}

#[test]
fn a_crash_at_every_commit_point_loses_and_duplicates_nothing() {
    let mut thrown = 0;
    let mut crashes = 0;
    let mut lost = 0;
    for point in orchestrate::failpoint::POINTS {
        if point.starts_with("needs_login.")
            || point.starts_with("worktree.")
            || point.starts_with("fanout.")
            || *point == "attempt.after_check"
        {
            // Only an agent whose credentials are refused, a task in a git repository, a task
            // with a check or a fan-out gets there: see the tests below, tests/isolation.rs and
            // tests/fan_out.rs.
            continue;
        }
        // Early and later hits: the first claim, and one with other tasks already in flight.
        let hits: &[u32] = match *point {
            p if p.starts_with("requeue.") => &[1],
            p if p.starts_with("write.") => &[1, 4, 9],
            _ => &[1, 3],
        };
        for n in hits {
            let spec = format!("{point}:{n}");
            // Retries to spare: a crash mid-attempt costs one (`lost`), the first task's planned
            // failure another.
            let p =
                Project::with_config(&test_config("").replace("max_retries: 1", "max_retries: 3"));
            let ids = drop_tasks(&p, "c", TASKS);
            thrown += ids.len();
            let crashed = p.run_until_crash(&spec);
            crashes += 1;
            // Restart without the crash and let it finish everything.
            let second = p.run(&["start", "--once", "-v"]);
            let logs = format!(
                "--- {spec}: crashed run\n{crashed}\n--- restart\n{}{}",
                second.stdout(),
                second.stderr()
            );
            second.assert_code(0);
            lost += check_outcome(&p, &ids, &logs);
        }
    }
    eprintln!(
        "RELIABILITY crash-points: {} points, {crashes} crashes, {thrown} tasks thrown, {lost} lost",
        orchestrate::failpoint::POINTS.len()
    );
    assert_eq!(lost, 0);
}

/// A crash while an agent's "needs login" mark is written (the mark goes to disk before its task
/// is requeued): after the restart every task completes once on the fallback agent, the mark file
/// is whole and marks the agent, and the tree and the mirror agree.
#[test]
fn a_crash_while_marking_an_agent_as_needing_a_login_loses_and_duplicates_nothing() {
    use common::model_server::{Api, ModelServer, Reply};
    let points: Vec<&str> = orchestrate::failpoint::POINTS
        .iter()
        .copied()
        .filter(|p| p.starts_with("needs_login."))
        .collect();
    assert_eq!(points.len(), 2, "{points:?}");
    let mut lost = 0;
    for point in &points {
        let server = ModelServer::start();
        // Every request is refused: the `local` agent is an agent nobody logged in.
        server.script(Api::Chat, vec![Reply::AuthError]);
        let config = test_config("")
            .replace("max_retries: 1", "max_retries: 3")
            .replace(
                "agents:\n",
                &format!(
                    "agents:\n  local:\n    kind: openai\n    base_url: {}/v1\n    model: m\n    max_instances: 4\n",
                    server.url()
                ),
            )
            .replace("fallback: [fake]", "fallback: [local, fake]");
        let p = Project::with_config(&config);
        let ids = drop_tasks(&p, "n", 3);
        let spec = format!("{point}:1");
        let crashed = p.run_until_crash(&spec);
        let second = p.run(&["start", "--once", "-v"]);
        let logs = format!(
            "--- {spec}: crashed run\n{crashed}\n--- restart\n{}{}",
            second.stdout(),
            second.stderr()
        );
        second.assert_code(0);
        lost += check_outcome(&p, &ids, &logs);
        for id in &ids {
            let r = p.result("completed", id);
            assert_eq!(r["agent"], "fake", "{id}: {r}\n{logs}");
        }
        let marks: serde_json::Value =
            serde_json::from_str(&p.read(".orchestrate/needs_login.json"))
                .unwrap_or_else(|e| panic!("{spec}: the mark file is whole: {e}\n{logs}"));
        assert!(
            marks["local"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("HTTP 401"))
                && marks["local"].get("lifted").is_none(),
            "{spec}: {marks}\n{logs}"
        );
    }
    eprintln!(
        "RELIABILITY needs-login: {} points, {} crashes, {lost} lost",
        points.len(),
        points.len()
    );
    assert_eq!(lost, 0);
}

/// A supervisor in the background with its output in `name.log`.
fn spawn_supervisor(p: &Project, name: &str) -> std::process::Child {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(p.path(&format!("{name}.log")))
        .expect("log");
    p.cmd(&["start", "-v"])
        .stdin(Stdio::null())
        .stdout(f.try_clone().expect("clone"))
        .stderr(f)
        .spawn()
        .expect("spawn supervisor")
}

#[test]
fn three_supervisors_with_random_sigkills_complete_each_task_exactly_once() {
    const N: usize = 1000;
    let p = Project::with_config(&test_config("").replace("max_retries: 1", "max_retries: 5"));
    std::fs::create_dir_all(p.path("locks")).expect("mkdir locks");
    let mut sups: Vec<std::process::Child> = (0..3)
        .map(|i| spawn_supervisor(&p, &format!("s{i}")))
        .collect();
    let ids: Vec<String> = (0..N).map(|i| format!("m{i:04}")).collect();
    for id in &ids {
        // A workdir each: the point is supervisors dying, not snapshots of one big shared folder.
        std::fs::create_dir_all(p.path(&format!("w/{id}"))).expect("mkdir workdir");
        p.drop_task(
            &format!("{id}.yaml"),
            &format!(
                "description: \"@fake lock=../../locks/{id}.lock sleep=0.2 write=../../out_{id}.txt:{id}\"\nworkdir: w/{id}\n"
            ),
        );
    }
    // A cheap deterministic generator: the test must not depend on a crate for randomness.
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15 ^ u64::from(std::process::id());
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut kills = 0;
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let done = p.tasks_in("completed").len() + p.tasks_in("failed").len();
        if done == N {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {done} of {N} tasks finished"
        );
        std::thread::sleep(Duration::from_millis(300 + next() % 700));
        // Kill one at random while there is work left, and start a replacement.
        if kills < 25 && done < N - 50 {
            let i = (next() % 3) as usize;
            let _ = sups[i].kill();
            let _ = sups[i].wait();
            kills += 1;
            sups[i] = spawn_supervisor(&p, &format!("s{i}"));
        }
    }
    for s in &mut sups {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(s.id() as i32, libc::SIGTERM) };
        assert!(wait_child(s, Duration::from_secs(30)).is_some(), "stop");
    }
    let logs = (0..3)
        .map(|i| std::fs::read_to_string(p.path(&format!("s{i}.log"))).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n---\n");
    let tail: String = logs
        .lines()
        .rev()
        .take(60)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    // Runs of each task (attempts that started an agent) for the figures.
    let mut outcomes: HashMap<String, usize> = HashMap::new();
    for id in &ids {
        if let Some(r) = p
            .tasks_in("completed")
            .contains(id)
            .then(|| p.result("completed", id))
        {
            for a in r["attempts"].as_array().into_iter().flatten() {
                *outcomes
                    .entry(a["outcome"].as_str().unwrap_or("?").to_string())
                    .or_default() += 1;
            }
        }
    }
    let lost = check_outcome(&p, &ids, &tail);
    eprintln!(
        "RELIABILITY three-supervisors: {N} tasks, {kills} SIGKILLs, attempts by outcome {outcomes:?}, {lost} lost"
    );
    assert_eq!(lost, 0);
    assert!(kills >= 5, "only {kills} kills happened");
}

/// Pids of processes whose environment has `name=…suffix`.
fn processes_with_env(name: &str, suffix: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let env = std::fs::read(e.path().join("environ")).ok()?;
            env.split(|b| *b == 0)
                .any(|kv| {
                    let kv = String::from_utf8_lossy(kv);
                    kv.starts_with(&format!("{name}=")) && kv.ends_with(suffix)
                })
                .then_some(pid)
        })
        .collect()
}

/// A claim left by a supervisor that was SIGKILLed while its task ran, edited into each way an owner
/// can be gone (dead pid, pid reused by another process, machine rebooted): each is recovered and the
/// task completes once. A live owner is never robbed.
#[test]
fn dead_reused_and_rebooted_owners_are_recovered_and_a_live_one_is_not_robbed() {
    let mut recovered = 0;
    for case in ["dead pid", "reused pid", "changed boot id"] {
        let p = Project::new();
        std::fs::create_dir_all(p.path("locks")).expect("mkdir");
        let mut sup = p.start();
        p.drop_task(
            "own.yaml",
            "description: \"@fake lock=locks/own.lock sleep=2 write=out_own.txt:own\"\n",
        );
        wait_for("the task to be claimed", Duration::from_secs(20), || {
            p.path("tasks/assigned/own.claim.yaml").exists()
        });
        sup.sigkill();
        // Something else alive, to stand in for a process that got the dead owner's pid.
        let mut other = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("spawn sleep");
        let claim_path = p.path("tasks/assigned/own.claim.yaml");
        let claim = std::fs::read_to_string(&claim_path).expect("claim");
        let edited: String = claim
            .lines()
            .map(|l| match case {
                "reused pid" if l.starts_with("pid:") => format!("pid: {}", other.id()),
                "changed boot id" if l.starts_with("pid:") => format!("pid: {}", other.id()),
                "changed boot id" if l.starts_with("boot_id:") => {
                    "boot_id: 00000000-0000-4000-8000-000000000000".to_string()
                }
                _ => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            case == "dead pid" || edited != claim,
            "{case}: nothing edited"
        );
        if case == "changed boot id" {
            // A reboot leaves no process of the old boot: the killed supervisor's agent goes too.
            // (Recovery trusts that and does not look for orphans from another boot.)
            for pid in processes_with_env("ORCHESTRATE_RUN", "/own/1") {
                // SAFETY: a process this test's project started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        std::fs::write(&claim_path, edited + "\n").expect("write claim");
        let second = p.run(&["start", "--once", "-v"]);
        let logs = format!("{case}\n{}\n{}", sup.output(), second.stdout());
        second.assert_code(0);
        let _ = other.kill();
        let _ = other.wait();
        assert_eq!(p.tasks_in("completed"), vec!["own".to_string()], "{logs}");
        let r = p.result("completed", "own");
        let outcomes: Vec<&str> = r["attempts"]
            .as_array()
            .expect("attempts")
            .iter()
            .filter_map(|a| a["outcome"].as_str())
            .collect();
        assert_eq!(outcomes, ["lost", "completed"], "{case}: {r}\n{logs}");
        assert!(
            !p.path("locks/own.lock.overlap").exists(),
            "{case}: ran twice at once\n{logs}"
        );
        recovered += 1;
    }

    // A live owner: a second supervisor on the same tree leaves its running task alone.
    let p = Project::new();
    std::fs::create_dir_all(p.path("locks")).expect("mkdir");
    let mut first = p.start();
    p.drop_task(
        "busy.yaml",
        "description: \"@fake lock=locks/busy.lock sleep=3\"\n",
    );
    wait_for("the task to be claimed", Duration::from_secs(20), || {
        p.path("tasks/assigned/busy.claim.yaml").exists()
    });
    let second = p.run(&["start", "--once", "-v"]);
    second.assert_code(0);
    assert!(
        p.path("tasks/assigned/busy.yaml").exists(),
        "the live owner's task was taken\n{}",
        second.stdout()
    );
    wait_for("the owner to finish", Duration::from_secs(30), || {
        p.tasks_in("completed").contains(&"busy".to_string())
    });
    let r = p.result("completed", "busy");
    assert_eq!(r["attempts"].as_array().map(Vec::len), Some(1), "{r}");
    assert!(first.stop().success(), "{}", first.output());
    eprintln!("RELIABILITY owners: {recovered} dead owners recovered, 1 live owner not robbed");
}
