//! `orchestrate status`: counts, what runs, what waits and why, and who supervises.

use anyhow::Result;
use serde::Serialize;

use super::{Cli, Project, short};
use crate::mirror;

#[derive(Serialize)]
struct Status {
    counts: std::collections::BTreeMap<String, usize>,
    quarantined: usize,
    running: Vec<Running>,
    waiting: Vec<Waiting>,
    supervisors: Vec<Supervisor>,
    last_event_seq: i64,
}

#[derive(Serialize)]
struct Running {
    id: String,
    agent: Option<String>,
    since: Option<String>,
    attempt: u32,
}

#[derive(Serialize)]
struct Waiting {
    id: String,
    reason: String,
}

#[derive(Serialize)]
struct Supervisor {
    pid: u32,
    instance: String,
}

pub fn run(cli: &Cli, project: &Project) -> Result<i32> {
    let conn = project.mirror_read()?;
    let mut counts: std::collections::BTreeMap<String, usize> =
        ["pending", "running", "completed", "failed"]
            .iter()
            .map(|s| (s.to_string(), 0))
            .collect();
    for (state, n) in mirror::counts(&conn)? {
        counts.insert(state, n);
    }
    let quarantined = std::fs::read_dir(&project.spool.quarantine)
        .map(|rd| {
            rd.flatten()
                .filter(|e| {
                    let n = e.file_name();
                    let n = n.to_string_lossy();
                    !n.ends_with(".reason.txt") && !n.starts_with('.')
                })
                .count()
        })
        .unwrap_or(0);
    let running: Vec<Running> = mirror::list(&conn, Some("running"))?
        .into_iter()
        .map(|r| Running {
            id: r.id,
            agent: r.agent,
            since: r.payload.started_at,
            attempt: r.payload.attempts,
        })
        .collect();
    let waiting: Vec<Waiting> = mirror::list(&conn, Some("pending"))?
        .into_iter()
        .filter_map(|r| {
            r.note.map(|n| Waiting {
                id: r.id,
                reason: n,
            })
        })
        .collect();
    let supervisors: Vec<Supervisor> = crate::spool::live_instances(&project.layout.state_dir)
        .into_iter()
        .map(|(pid, path)| Supervisor {
            pid,
            instance: path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
        })
        .collect();
    let last_event_seq: i64 =
        conn.query_row("SELECT coalesce(max(seq), 0) FROM task_events", [], |r| {
            r.get(0)
        })?;
    let st = Status {
        counts,
        quarantined,
        running,
        waiting,
        supervisors,
        last_event_seq,
    };
    if cli.json {
        super::print_json(&st)?;
        return Ok(0);
    }
    let c = &st.counts;
    println!(
        "tasks: {} pending, {} running, {} completed, {} failed, {} quarantined",
        c["pending"], c["running"], c["completed"], c["failed"], st.quarantined
    );
    if st.supervisors.is_empty() {
        println!("supervisor: not running (start one with `orchestrate start`)");
    } else {
        for s in &st.supervisors {
            println!("supervisor: running, pid {} ({})", s.pid, s.instance);
        }
    }
    if !st.running.is_empty() {
        println!("\nrunning:");
        for r in &st.running {
            println!(
                "  {:<20} {:<10} attempt {} since {}",
                r.id,
                r.agent.as_deref().unwrap_or("-"),
                r.attempt,
                r.since.as_deref().unwrap_or("-")
            );
        }
    }
    if !st.waiting.is_empty() {
        println!("\nwaiting:");
        for w in st.waiting.iter().take(20) {
            println!("  {:<20} {}", w.id, short(&w.reason, 100));
        }
        if st.waiting.len() > 20 {
            println!(
                "  … and {} more (orchestrate tasks --status pending)",
                st.waiting.len() - 20
            );
        }
    }
    Ok(0)
}
