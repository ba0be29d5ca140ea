//! The tree → rows plan: what a mirror must change to agree with the files.
//!
//! Both backends reconcile by these rules (the SQLite writer thread, the PostgreSQL writer on every
//! (re)connect and periodically, and `orchestrate mirror rebuild`): read each task where its furthest
//! file is, skip rows the mirror already holds in the same state and file, let rows read from the
//! tree win over the mirror's, delete rows whose task has left the tree, and leave tasks another
//! live supervisor changed moments ago to that supervisor's own writer.
//!
//! This file only reads the tree and plans; it never changes a file (the tree is the truth, and a
//! reconcile must be safe while supervisors run), and it writes to a database only through the
//! backend's own `apply`.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Result;
use rusqlite::Connection;
use serde::Serialize;

use super::{
    Known, Op, TaskRow, pending_row, rejected_row, rel_to, running_attempt, running_row,
    terminal_row,
};
use crate::record::{Attempt, Terminal};
use crate::spool::{Place, Spool};
use crate::task;

/// Rows read from the tree with their attempts, and every id present in the tree.
pub type TreeRows = (
    Vec<(TaskRow, Vec<Attempt>)>,
    std::collections::HashSet<String>,
);

/// Rows for everything in the tree, read from the files. `known` holds the mirror's current
/// (state, version, file) per id; rows whose state and file already match are skipped unread.
pub fn rows_from_tree(
    spool: &Spool,
    max_task_bytes: u64,
    known: &Known,
    skip_pending: bool,
) -> Result<TreeRows> {
    let mut rows = Vec::new();
    let mut present = std::collections::HashSet::new();
    let pending_files: HashMap<&str, &str> = known
        .iter()
        .filter(|(_, (s, _, _))| s == "pending")
        .map(|(id, (_, _, f))| (f.as_str(), id.as_str()))
        .collect();
    let matches = |id: &str, state: &str, file: &str| {
        known
            .get(id)
            .is_some_and(|(s, _, f)| s == state && f == file)
    };
    // Furthest place first: a task is where its furthest file is, and a copy left in pending/ (a
    // resurrection awaiting quarantine) must never make a finished task look pending.
    for place in [
        Place::Completed,
        Place::Failed,
        Place::Assigned,
        Place::Pending,
    ] {
        if skip_pending && place == Place::Pending {
            // The caller reads pending/ itself (a starting supervisor): keep what the mirror knows.
            present.extend(
                known
                    .iter()
                    .filter(|(_, (st, _, _))| st == "pending")
                    .map(|(id, _)| id.clone()),
            );
            continue;
        }
        let dir = spool.dir(place);
        let Ok(rd) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in rd.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !task::is_task_file_name(&name)
                || (place == Place::Pending && task::is_conflict_copy(&name))
                || name.ends_with("_result.yaml")
                || name.ends_with(".claim.yaml")
            {
                continue;
            }
            let path = entry.path();
            let rel = rel_to(&spool.layout().tasks_dir, &path);
            let stem = crate::layout::file_stem(&name).to_string();
            match place {
                Place::Pending => {
                    // The id of a pending file is inside it; a file the mirror already lists is trusted.
                    if let Some(id) = pending_files.get(rel.as_str()) {
                        present.insert(id.to_string());
                        continue;
                    }
                    if let Ok((t, _)) = task::read_task(&path, max_task_bytes) {
                        if !present.insert(t.id.clone()) {
                            continue;
                        }
                        if !matches(&t.id, "pending", &rel) {
                            let h = spool.read_history(&t.id);
                            let row = pending_row(spool, &t, &path, h.as_ref());
                            rows.push((row, h.map(|h| h.attempts).unwrap_or_default()));
                        }
                    }
                }
                Place::Assigned => {
                    present.insert(stem.clone());
                    if matches(&stem, place.state(), &rel) {
                        continue;
                    }
                    if let (Ok((t, _)), Some(c)) =
                        (task::read_task(&path, u64::MAX), spool.read_claim(&stem))
                    {
                        let mut attempts = c.history.clone();
                        attempts.push(running_attempt(&c));
                        rows.push((running_row(spool, &t, &c), attempts));
                    }
                }
                Place::Completed | Place::Failed => {
                    present.insert(stem.clone());
                    if matches(&stem, place.state(), &rel) {
                        continue;
                    }
                    let t = if place == Place::Completed {
                        Terminal::Completed
                    } else {
                        Terminal::Failed
                    };
                    if let Some(r) = spool.read_result(t, &stem) {
                        let task = task::read_task(&path, u64::MAX).ok().map(|(t, _)| t);
                        rows.push((terminal_row(spool, &r, task.as_ref()), r.attempts.clone()));
                    } else if place == Place::Failed {
                        let err = std::fs::read_to_string(crate::layout::Layout::error_path(&path))
                            .unwrap_or_default();
                        rows.push((rejected_row(spool, &path, &err), vec![]));
                    }
                }
            }
        }
    }
    Ok((rows, present))
}

/// Bring the SQLite mirror in line with the tree (the CLI's reconcile and `mirror rebuild`; the
/// writer thread plans on its own connection). With `rebuild`, start from empty tables.
pub fn reconcile(
    conn: &mut Connection,
    spool: &Spool,
    host: &str,
    max_task_bytes: u64,
    rebuild: bool,
) -> Result<ReconcileReport> {
    if rebuild {
        conn.execute_batch("DELETE FROM tasks; DELETE FROM attempts;")?;
    }
    let known = super::sqlite::known_rows(conn)?;
    let (mut ops, report) = reconcile_plan(spool, max_task_bytes, &known, rebuild, false)?;
    super::sqlite::apply(conn, host, &mut ops)?;
    Ok(report)
}

/// Drop from a reconcile plan every operation on a task that `queued` transitions will bring forward.
///
/// The tree is read before the queue is drained, so it can be ahead of transitions still on their way
/// (a task already `completed` whose `running` op has not been written). Writing the tree's newer
/// version first would make the queued one stale and lose its event; the queue carries those tasks,
/// one event per transition, and the plan fills in only the rest.
pub fn without_queued(plan: Vec<Op>, queued: &[Op]) -> Vec<Op> {
    let ids: std::collections::HashSet<&str> = queued
        .iter()
        .filter_map(|op| match op {
            Op::Upsert { row, .. } => Some(row.id.as_str()),
            Op::Delete(id) | Op::Note { id, .. } => Some(id.as_str()),
            _ => None,
        })
        .collect();
    plan.into_iter()
        .filter(|op| match op {
            Op::Upsert { row, .. } => !ids.contains(row.id.as_str()),
            Op::Delete(id) => !ids.contains(id.as_str()),
            _ => true,
        })
        .collect()
}

/// The operations that bring a mirror holding `known` in line with the tree. Shared by the SQLite
/// and PostgreSQL backends so both reconcile by the same rules.
pub fn reconcile_plan(
    spool: &Spool,
    max_task_bytes: u64,
    known: &Known,
    rebuild: bool,
    skip_pending: bool,
) -> Result<(Vec<Op>, ReconcileReport)> {
    let (rows, present) = rows_from_tree(spool, max_task_bytes, known, skip_pending)?;
    // With another supervisor live on this tree, a transition it just made may still be on its way
    // to the mirrors; writing the tree's state first would make its op stale and lose its event. Such
    // tasks are left to their writer, and a later reconcile catches them if that writer died.
    // A rebuild starts from empty tables: leaving anything out would only make it wrong for longer.
    let others_live = !rebuild && crate::instance::live_instances(spool.layout()).len() > 1;
    let now = std::time::SystemTime::now();
    let recent = |rel: &str| {
        use std::os::unix::fs::MetadataExt;
        // A file gone since the tree was read has just moved: that is as recent as it gets.
        others_live
            && std::fs::symlink_metadata(spool.layout().tasks_dir.join(rel))
                .ok()
                .is_none_or(|m| {
                    // ctime, not mtime: a rename between spool directories changes only the ctime.
                    let changed = std::time::UNIX_EPOCH
                        + Duration::new(
                            m.ctime().max(0) as u64,
                            m.ctime_nsec().clamp(0, 999_999_999) as u32,
                        );
                    now.duration_since(changed).unwrap_or_default() < RECENT
                })
    };
    let mut report = ReconcileReport {
        upserted: 0,
        deleted: 0,
        skipped_recent: 0,
    };
    let mut ops: Vec<Op> = Vec::new();
    for (row, attempts) in rows {
        if recent(&row.payload.file) {
            report.skipped_recent += 1;
            continue;
        }
        // Rows read from the tree must win over whatever the mirror holds, even at an equal or lower
        // version (the mirror may hold a transition the tree later undid by hand): delete first.
        if let Some((state, version, _)) = known.get(&row.id)
            && *version >= row.version
            && *state != row.state
            && row.state != "pending"
        {
            ops.push(Op::Delete(row.id.clone()));
        }
        report.upserted += 1;
        ops.push(Op::Upsert { row, attempts });
    }
    for (id, (_, _, file)) in known.iter().filter(|(id, _)| !present.contains(*id)) {
        // Look again: a task renamed between two directory listings was in neither.
        if spool.settled_place(id).is_some()
            || (!file.is_empty() && spool.layout().tasks_dir.join(file).exists())
        {
            continue;
        }
        ops.push(Op::Delete(id.clone()));
        report.deleted += 1;
    }
    let ops = ops
        .into_iter()
        .map(|op| op.redacted(spool.redactor()))
        .collect();
    Ok((ops, report))
}

/// How long a task's latest transition belongs to the writer that made it (see [`reconcile_plan`]).
pub const RECENT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, Serialize)]
pub struct ReconcileReport {
    pub upserted: usize,
    pub deleted: usize,
    /// Tasks left alone because another live supervisor changed them moments ago.
    pub skipped_recent: usize,
}
