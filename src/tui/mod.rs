//! `orchestrate watch`: the terminal UI. A header with counts and agents, the task table kept
//! live, a detail view (output, or the running attempt's log tail, and the diff), and cancel/retry
//! behind a y/n.
//!
//! Theory of operation: one loop waits at most [`TICK`] for a key, then asks the mirror for its
//! last event number; the snapshot is read again when that number moved or [`REFRESH`] passed
//! (elapsed times tick), so the loop sleeps in `poll` and never spins. Cancel and retry go through
//! [`Project::cancel`] and [`Project::retry`], the same writes as the CLI's, on a thread of their
//! own (stopping a running task waits for its supervisor) and report back over a channel.
//!
//! It reads only through [`Reader`] and the folder, acts only through [`Project`], and never uses
//! `cli` or `serve`. The terminal is restored on every way out: return, error (a guard) and panic
//! (ratatui's hook).

pub mod app;
pub mod model;

use std::io::{Read, Seek, SeekFrom};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Result;
use ratatui::crossterm::event::{self, Event, KeyEventKind};

use crate::mirror::read::Reader;
use crate::project::Project;
use app::{Action, App};
use model::{Snapshot, TaskLine};

/// The longest the loop waits for a key before looking at the mirror.
const TICK: Duration = Duration::from_millis(250);
/// Read the snapshot again at least this often, even without a new event.
const REFRESH: Duration = Duration::from_secs(1);
/// How much of a running attempt's log the detail view shows: its end.
const LOG_TAIL_BYTES: u64 = 64 * 1024;

/// Puts the terminal back however the loop ends (a panic is handled by ratatui's hook).
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

/// Run the UI on the terminal until `q`. `database_url`: read that PostgreSQL mirror (no cancel or
/// retry: there is no folder to write them into).
pub fn run(project: &Project, database_url: Option<&str>) -> Result<()> {
    let mut reader = Some(project.reader(database_url)?);
    let first = Snapshot::load(project, reader.as_ref().expect("just opened"), database_url)?;
    let mut app = App::new(first, database_url.is_some());
    // Before the terminal changes: a failure half-way through setting it up restores it too.
    let _restore = Restore;
    let mut terminal = ratatui::try_init()?;
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::scope(|scope| -> Result<()> {
        let mut last_load = Instant::now();
        loop {
            terminal.draw(|f| app.render(f))?;
            let mut reload = false;
            if event::poll(TICK)? {
                match event::read()? {
                    Event::Key(k) if k.kind == KeyEventKind::Press => match app.handle_key(k) {
                        Action::Quit => return Ok(()),
                        Action::None => {}
                        Action::Open(id) => refresh_detail(project, &reader, &mut app, id),
                        Action::Cancel(id) => {
                            let tx = tx.clone();
                            scope.spawn(move || {
                                let said = match project.cancel(&id) {
                                    Ok(s) => format!("{id}: {s}"),
                                    Err(e) => format!("{id}: {e:#}"),
                                };
                                let _ = tx.send(said);
                            });
                        }
                        Action::Retry(id) => {
                            let tx = tx.clone();
                            scope.spawn(move || {
                                let said = match project.retry(&id) {
                                    Ok(crate::project::Retried::RunsNow) => {
                                        format!("{id}: runs as soon as a slot is free")
                                    }
                                    Ok(crate::project::Retried::Pending { .. }) => {
                                        format!("{id}: back in pending")
                                    }
                                    Err(e) => format!("{id}: {e:#}"),
                                };
                                let _ = tx.send(said);
                            });
                        }
                    },
                    // The next draw takes the new size.
                    Event::Resize(..) => {}
                    _ => {}
                }
            }
            while let Ok(said) = rx.try_recv() {
                app.busy = false;
                app.message = Some(said);
                reload = true;
            }
            if last_load.elapsed() >= REFRESH {
                reload = true;
            }
            if !reload {
                reload = match &reader {
                    Some(r) => r.max_seq().map_or(true, |s| s != app.snapshot.seq),
                    None => true,
                };
            }
            if reload {
                last_load = Instant::now();
                load(project, database_url, &mut reader, &mut app);
                if let Some(id) = app.detail.as_ref().map(|d| d.id.clone()) {
                    refresh_detail(project, &reader, &mut app, id);
                }
            }
        }
    })
}

/// Read a new snapshot; a failed read is shown and the connection opened again next time.
fn load(project: &Project, database_url: Option<&str>, reader: &mut Option<Reader>, app: &mut App) {
    if reader.is_none() {
        match project.reader(database_url) {
            Ok(r) => *reader = Some(r),
            Err(e) => {
                app.message = Some(format!("cannot read the mirror: {e:#}"));
                return;
            }
        }
    }
    let Some(r) = reader.as_ref() else { return };
    match Snapshot::load(project, r, database_url) {
        Ok(s) => {
            if app
                .message
                .as_deref()
                .is_some_and(|m| m.starts_with("cannot read"))
            {
                app.message = None;
            }
            app.update(s);
        }
        Err(e) => {
            app.message = Some(format!("cannot read the mirror: {e:#}"));
            *reader = None;
        }
    }
}

fn refresh_detail(project: &Project, reader: &Option<Reader>, app: &mut App, id: String) {
    let Some(r) = reader else { return };
    let line = app.snapshot.tasks.iter().find(|t| t.id == id).cloned();
    let lines = detail_lines(project, r, &id, line.as_ref());
    app.show_detail(id, lines);
}

/// The detail view's text: what the task is, then its error, its output (or, while it runs, the end
/// of its log), its diff and its task file. Every line has its control characters made visible.
pub fn detail_lines(
    project: &Project,
    reader: &Reader,
    id: &str,
    line: Option<&TaskLine>,
) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut section = |title: &str, text: &str| {
        out.push(String::new());
        out.push(format!("── {title} ──"));
        out.extend(
            crate::console::visible(text)
                .lines()
                .map(|l| l.replace('\t', "    ")),
        );
    };
    if !reader.is_local() {
        let row = reader.get(id).ok().flatten();
        let mut head = vec![format!("{id}")];
        if let Some(r) = &row {
            head.push(format!(
                "{} · agent {} · attempts {} · cost {}",
                r.state,
                r.agent.as_deref().unwrap_or("-"),
                r.payload.attempts,
                model::cost(r.payload.cost_usd)
            ));
            if let Some(e) = &r.payload.error {
                section("error", e);
            }
            section("description", &r.payload.description);
        }
        section(
            "output and diff",
            "kept in the project folder: run `orchestrate watch` there to see them",
        );
        head.extend(out);
        return head;
    }
    let shown = match project.show(reader, id) {
        Ok(s) => s,
        Err(e) => return vec![format!("{id}: {e:#}")],
    };
    let mut head = vec![format!(
        "{id} · {} · agent {} · attempts {}",
        shown.state,
        line.and_then(|l| l.agent.as_deref()).unwrap_or("-"),
        shown.attempts.len()
    )];
    if let Some(file) = &shown.file {
        head.push(format!("file {file}"));
    }
    if let Some(n) = &shown.note {
        section("note", n);
    }
    if let Some(e) = &shown.error {
        section("error", e);
    }
    if shown.state == "running" {
        let attempt = shown
            .claim
            .as_ref()
            .map(|c| c.attempt)
            .or(line.map(|l| l.attempts))
            .unwrap_or(1)
            .max(1);
        let path = project.layout.log_path(id, attempt);
        let title = format!("log of attempt {attempt} ({}), live", project.rel(&path));
        match tail(&path, LOG_TAIL_BYTES) {
            Ok(t) if t.is_empty() => section(&title, "(nothing yet)"),
            Ok(t) => section(&title, &t),
            Err(e) => section(&title, &format!("cannot read it: {e}")),
        }
    } else if let Some(o) = &shown.output {
        section("output", o);
    }
    if let Some(d) = &shown.diff {
        section("diff", d);
    }
    if let Some(t) = &shown.task {
        section("task file", t);
    }
    head.extend(out);
    head
}

/// The last `limit` bytes of a file, from the start of a line.
fn tail(path: &std::path::Path, limit: u64) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let start = len.saturating_sub(limit);
    f.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    f.take(limit).read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    if start > 0 {
        // The first line is cut: drop it and say so.
        let rest = text.split_once('\n').map_or("", |(_, r)| r);
        return Ok(format!("… (earlier lines not shown)\n{rest}"));
    }
    Ok(text)
}
