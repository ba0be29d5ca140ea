//! A fan-out's end: the judge's question and the reading of its answer, and the pick.
//!
//! Candidates and the judge are ordinary tasks the loop runs like any other (the scheduler's
//! `fan_out` module writes and waits for them); this module owns what happens once they settle
//! the fan-out. The pick stops the candidates still open, claims the parent like any task, and
//! then, on a blocking thread, chooses the winner from the candidates' result records, lands the
//! winner's branch by the parent's `merge`, deletes the losers' branches, and writes the parent's
//! output, diff and result (every candidate, the winner and why). It never runs an agent.
//!
//! Crash safety: the winner is a function of the records (the first to complete by its result's
//! `finished_at`, or the judge's saved answer), so a pick run again after a crash picks the same
//! one. Landing the same change twice writes nothing the second time (`git::land` applies a
//! three-way merge the tree already holds), and the winner's result records the landing before
//! its branch is deleted, so nothing is lost between the steps.

use std::path::Path;
use std::sync::Arc;

use super::Supervisor;
use super::events::Action;
use crate::config::Config;
use crate::console;
use crate::context;
use crate::fsutil;
use crate::git::{self, Landed, Merge};
use crate::layout::Layout;
use crate::mirror::{self, Op, Writer};
use crate::record::{CandidateResult, Claim, FanOutResult, TaskResult, Terminal};
use crate::redact::Redactor;
use crate::scheduler::fan_out::{candidate_id, candidate_ids, judge_file, judge_id};
use crate::spool::{Place, Spool};
use crate::task::{MergeMode, Pick, Task};

/// How much of one candidate's diff and output the judge is shown.
const JUDGE_DIFF_CHARS: usize = 20_000;
const JUDGE_OUTPUT_CHARS: usize = 4_000;

impl Supervisor {
    /// Every candidate of a `pick: judge` fan-out has finished and more than one completed: write
    /// the judge's task, which the loop runs like any other.
    #[must_use = "the actions are the rest of the work: apply them"]
    pub(super) fn write_judge(&mut self, id: &str) -> Vec<Action> {
        let Some(p) = self.intake.queue.get(id) else {
            return vec![];
        };
        let task = p.task.clone();
        let prompt = judge_prompt(
            &self.env.spool,
            &self.env.layout,
            &task,
            self.env.cfg.orchestrator.max_task_bytes,
        );
        console::info(&format!(
            "judging    {id}: its candidates finished; asking {}",
            task.file.judge.as_deref().unwrap_or("-")
        ));
        let mut out = vec![];
        let (intake, _, view) = self.parts();
        intake.write_children(&view, vec![judge_file(&task, prompt)], &mut out);
        out
    }

    /// The candidates settled fan-out `id`: stop those still open (first one back wins), and once
    /// none is, claim the task and pick off the loop.
    #[must_use = "the actions are the rest of the work: apply them"]
    pub(super) fn pick(&mut self, id: &str) -> Vec<Action> {
        let Some(p) = self.intake.queue.get(id) else {
            return vec![];
        };
        let mut others = candidate_ids(&p.task);
        others.push(judge_id(id));
        let mut out = vec![];
        let mut settling = false;
        for cid in &others {
            if self.runs.contains(cid) {
                let why = format!("stopped: another candidate of {id} completed first");
                if self.runs.cancel_because(cid, &why) == Some(true) {
                    console::info(&format!("cancelling {cid}: {why}"));
                }
                settling = true;
            } else if self.commits.contains(cid) {
                settling = true;
            } else if self.intake.queue.contains(cid) {
                out.push(Action::Fail {
                    id: cid.clone(),
                    reason: format!("not run: another candidate of {id} completed first"),
                });
                settling = true;
            } else if self.env.spool.settled_place(cid) == Some(Place::Assigned) {
                // Claimed by another supervisor sharing the tree: asked to stop as `orchestrate
                // cancel` asks, and picked once it is terminal.
                if let Err(e) = self.env.spool.request_cancel(cid) {
                    console::warn(&format!("cannot ask {cid} to stop: {e:#}"));
                }
                settling = true;
            }
        }
        if settling {
            // Picked on a later pass, once every candidate is terminal: a loser finishing after
            // the pick would leave a branch no record owns.
            return out;
        }
        let (p, claim) = match self.claim_agentless(id, "its candidates settled the fan-out") {
            Ok(claimed) => claimed,
            Err(mut more) => {
                out.append(&mut more);
                return out;
            }
        };
        let env = &self.env;
        let job = PickJob {
            cfg: env.cfg.clone(),
            layout: env.layout.clone(),
            spool: env.spool.clone(),
            writer: env.writer.clone(),
            redactor: env.redactor.clone(),
            task: p.task.clone(),
            claim,
        };
        self.commits
            .start_with(&self.env.spool, p.task, move || job.run());
        self.state_dirty = true;
        out
    }
}

impl Supervisor {
    /// Fan-out `id` is failing without a pick (cancelled, say): its candidates and judge still
    /// open go with it.
    #[must_use = "the actions are the rest of the work: apply them"]
    pub(super) fn stop_candidates_of(&mut self, id: &str, reason: &str) -> Vec<Action> {
        let Some(p) = self
            .intake
            .queue
            .get(id)
            .filter(|p| p.task.file.fan_out.is_some())
        else {
            return vec![];
        };
        let mut ids = candidate_ids(&p.task);
        ids.push(judge_id(id));
        let why = format!("its fan-out task {id} failed: {reason}");
        let mut out = vec![];
        for cid in ids {
            if self.runs.cancel_because(&cid, &why) == Some(true) {
                console::info(&format!("cancelling {cid}: {why}"));
            } else if self.intake.queue.contains(&cid) {
                out.push(Action::Fail {
                    id: cid,
                    reason: why.clone(),
                });
            } else if self.env.spool.settled_place(&cid) == Some(Place::Assigned)
                && !self.runs.contains(&cid)
            {
                // Another supervisor sharing the tree runs it.
                let _ = self.env.spool.request_cancel(&cid);
            }
        }
        out
    }
}

/// The judge's prompt: the task, then each candidate that completed with its check, summary and
/// diff (each cut to fit the task file's size limit), then the answer's form.
fn judge_prompt(spool: &Spool, layout: &Layout, task: &Task, max_task_bytes: u64) -> String {
    let names = task
        .file
        .fan_out
        .as_ref()
        .map(|f| f.names())
        .unwrap_or_default();
    let passed: Vec<(String, TaskResult)> = names
        .iter()
        .filter_map(|n| {
            let r = spool.read_result(Terminal::Completed, &candidate_id(&task.id, n))?;
            Some((n.clone(), r))
        })
        .collect();
    // Half the size limit for the candidates' diffs, shared among them.
    let share = (max_task_bytes as usize / 2 / passed.len().max(1)).min(JUDGE_DIFF_CHARS);
    let mut p = format!(
        "You are the judge of {} candidate solutions to one task, each made by a different \
         agent in its own copy of the repository. Choose the one that best does what the task \
         asks, correctly and completely. Do not change any file.\n\n## The task\n\n{}\n",
        passed.len(),
        task.file.description.trim()
    );
    for (name, r) in &passed {
        p.push_str(&format!(
            "\n## Candidate `{name}` (agent {})\n\n",
            r.agent.as_deref().unwrap_or("-")
        ));
        match r.attempts.last().and_then(|a| a.check.as_ref()) {
            Some(c) => p.push_str(&format!(
                "Check `{}`: {}\n",
                c.command,
                if c.passed { "passed" } else { "failed" }
            )),
            None => p.push_str("No check ran.\n"),
        }
        if !r.files_modified.is_empty() {
            p.push_str(&format!("Changed files: {}\n", r.files_modified.join(", ")));
        }
        let read = |rel: &Option<String>, cap: usize| {
            read_rel_capped(layout, rel, cap).unwrap_or_default()
        };
        let summary = read(&r.output_file, JUDGE_OUTPUT_CHARS);
        if !summary.trim().is_empty() {
            p.push_str(&format!("\n### What it said\n\n{}\n", summary.trim()));
        }
        let diff = read(&r.diff_file, share);
        p.push_str(&format!(
            "\n### Its diff\n\n```diff\n{}\n```\n",
            if diff.trim().is_empty() {
                "(no changes)"
            } else {
                diff.trim_end()
            }
        ));
    }
    let list: Vec<&str> = passed.iter().map(|(n, _)| n.as_str()).collect();
    p.push_str(&format!(
        "\n## Your answer\n\nAnswer with one JSON object and nothing else: \
         {{\"winner\": \"<candidate>\", \"reason\": \"<one sentence>\"}}, where <candidate> is one \
         of: {}.\n",
        list.join(", ")
    ));
    p
}

/// The text of a file a record names relative to the project root (`None`: none named, or unreadable).
fn read_rel(layout: &Layout, rel: &Option<String>) -> Option<String> {
    rel.as_ref()
        .and_then(|f| std::fs::read_to_string(layout.root.join(f)).ok())
}

/// At most `cap` bytes of such a file (a candidate's diff may be huge; the judge sees its start),
/// saying how much more there is.
fn read_rel_capped(layout: &Layout, rel: &Option<String>, cap: usize) -> Option<String> {
    use std::io::Read;
    let path = layout.root.join(rel.as_ref()?);
    let size = std::fs::metadata(&path).ok()?.len();
    let mut head = Vec::new();
    std::fs::File::open(&path)
        .ok()?
        .take(cap as u64 + 4)
        .read_to_end(&mut head)
        .ok()?;
    let text = String::from_utf8_lossy(&head);
    let mut shown = cut(&text, cap);
    if size > head.len() as u64 && !shown.ends_with("not shown]") {
        shown.push_str(&format!(
            "\n[... {} more bytes not shown]",
            size - head.len() as u64
        ));
    }
    Some(shown)
}

/// `text` cut to at most `cap` bytes at a character boundary, saying so.
fn cut(text: &str, cap: usize) -> String {
    if text.len() <= cap {
        return text.to_string();
    }
    let mut end = cap;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}\n[... {} more bytes not shown]",
        &text[..end],
        text.len() - end
    )
}

/// The candidate the judge's answer names, with its reason: the last JSON object in `text` that
/// has a `winner`, naming one of `names` (or its task id). `Err` says what was wrong with it.
pub(super) fn judge_verdict(
    text: &str,
    parent: &str,
    names: &[&str],
) -> Result<(String, String), String> {
    let mut found = None;
    for (i, _) in text.match_indices('{') {
        let mut it =
            serde_json::Deserializer::from_str(&text[i..]).into_iter::<serde_json::Value>();
        if let Some(Ok(serde_json::Value::Object(o))) = it.next()
            && let Some(w) = o.get("winner").and_then(|w| w.as_str())
        {
            let reason = o
                .get("reason")
                .and_then(|r| r.as_str())
                .unwrap_or("no reason given")
                .to_string();
            found = Some((w.trim().to_string(), reason));
        }
    }
    let Some((w, reason)) = found else {
        return Err("it holds no JSON object with a `winner`".into());
    };
    let prefix = format!("{parent}.");
    let named = w.strip_prefix(&prefix).unwrap_or(&w);
    match names.iter().find(|n| n.eq_ignore_ascii_case(named)) {
        Some(n) => Ok((n.to_string(), reason)),
        None => Err(format!(
            "it names `{}`, which is not one of the candidates that completed ({})",
            cut(&w, 80),
            names.join(", ")
        )),
    }
}

/// The pick, off the loop: everything it needs, owned.
struct PickJob {
    cfg: Arc<Config>,
    layout: Layout,
    spool: Spool,
    writer: Writer,
    redactor: Arc<Redactor>,
    task: Task,
    claim: Claim,
}

/// One candidate as the pick reads it.
struct Candidate {
    name: String,
    id: String,
    result: Option<TaskResult>,
}

impl Candidate {
    fn completed(&self) -> Option<&TaskResult> {
        self.result
            .as_ref()
            .filter(|r| r.status == Terminal::Completed)
    }
}

impl PickJob {
    fn run(self) -> TaskResult {
        let task = &self.task;
        let id = &task.id;
        let pick = task.file.pick.unwrap_or_default();
        let names = task
            .file
            .fan_out
            .as_ref()
            .map(|f| f.names())
            .unwrap_or_default();
        let candidates: Vec<Candidate> = names
            .iter()
            .map(|n| {
                let cid = candidate_id(id, n);
                let result = self
                    .spool
                    .read_result(Terminal::Completed, &cid)
                    .or_else(|| self.spool.read_result(Terminal::Failed, &cid));
                Candidate {
                    name: n.clone(),
                    id: cid,
                    result,
                }
            })
            .collect();
        // Those that completed, in the order they finished (ties: the order of `fan_out`).
        let mut passed: Vec<&Candidate> = candidates
            .iter()
            .filter(|c| c.completed().is_some())
            .collect();
        // (A time that does not parse sorts last: it must not win by being unreadable.)
        passed.sort_by_key(|c| {
            c.completed()
                .and_then(|r| fsutil::parse_time(&r.finished_at))
                .map_or(i128::MAX, |t| t.unix_timestamp_nanos())
        });
        if passed.is_empty() {
            return self.failed("no candidate's result records a completion".into());
        }
        let check = task.file.check.as_deref().filter(|c| !c.trim().is_empty());
        let first = || {
            format!(
                "the first candidate to complete{}",
                if check.is_some() {
                    " with its check passing"
                } else {
                    ""
                }
            )
        };
        let (winner, because): (Option<&Candidate>, String) = match pick {
            Pick::All => (
                None,
                format!(
                    "pick: all: every candidate's branch is kept; land one with `orchestrate merge {id} --candidate NAME`"
                ),
            ),
            Pick::FirstPass => (Some(passed[0]), first()),
            Pick::Judge if passed.len() == 1 => (
                Some(passed[0]),
                "the only candidate that completed (the judge was not asked)".into(),
            ),
            Pick::Judge => {
                let (i, because) = self.judged(&passed);
                (Some(passed[i]), because)
            }
        };
        console::info(&format!(
            "picked     {id}: {} ({because})",
            winner.map(|w| w.name.as_str()).unwrap_or("none")
        ));
        let root = context::task_workdir(&self.layout, &self.cfg, task)
            .ok()
            .and_then(|w| git::toplevel(&w).ok().flatten());
        let workspace = match (winner, &root) {
            (Some(w), Some(root)) => self.land(w, root),
            (Some(w), None) => w.completed().and_then(|r| r.workspace.as_deref().cloned()),
            (None, _) => None,
        };
        // The losers' changes go with their branches (their diffs stay in context/diffs); with
        // `pick: all` every branch stays for a person to choose.
        if pick != Pick::All
            && let Some(root) = &root
        {
            for c in candidates
                .iter()
                .filter(|c| winner.is_none_or(|w| w.id != c.id))
            {
                self.discard(root, &c.id, c.result.clone(), "lost the fan-out");
            }
            let jid = judge_id(id);
            let judge = self.spool.read_result(Terminal::Completed, &jid);
            self.discard(root, &jid, judge, "the judge's own changes");
        }
        self.completed(&candidates, winner, because, pick, workspace)
    }

    /// The judge's choice among `passed` (by index), or the first of them when the judge failed
    /// or answered nothing usable, saying why.
    fn judged(&self, passed: &[&Candidate]) -> (usize, String) {
        let id = &self.task.id;
        let jid = judge_id(id);
        let judge = self.task.file.judge.as_deref().unwrap_or("-");
        let names: Vec<&str> = passed.iter().map(|c| c.name.as_str()).collect();
        let problem = match self.spool.read_result(Terminal::Completed, &jid) {
            Some(r) => {
                let text = read_rel(&self.layout, &r.output_file).unwrap_or_default();
                match judge_verdict(&text, id, &names) {
                    Ok((name, reason)) => {
                        let i = names.iter().position(|n| *n == name).unwrap_or(0);
                        return (i, format!("judge {judge}: {reason}"));
                    }
                    Err(e) => format!("the judge {judge}'s answer was not usable: {e}"),
                }
            }
            None => {
                let error = self
                    .spool
                    .read_result(Terminal::Failed, &jid)
                    .and_then(|r| r.error)
                    .unwrap_or_else(|| "no result".into());
                format!("the judge {judge} failed: {error}")
            }
        };
        console::warn(&format!("{id}: {problem}; falling back to first_pass"));
        (
            0,
            format!("{problem}; picked the first candidate to complete instead"),
        )
    }

    /// Land the winner's branch by the parent's `merge`; the parent's workspace record.
    fn land(&self, w: &Candidate, root: &Path) -> Option<crate::record::WorkspaceResult> {
        let r = w.completed()?;
        let mut ws = r.workspace.as_deref().cloned()?;
        let (Some(base), Some(head), Some(branch)) =
            (ws.base.clone(), ws.head.clone(), ws.branch.clone())
        else {
            // No branch: nothing changed, or an earlier pick (before a crash) landed it already.
            return Some(ws);
        };
        let how = match self.task.file.merge.unwrap_or(self.cfg.workspace.merge) {
            MergeMode::Apply => Merge::Apply,
            MergeMode::Commit => Merge::Commit,
            // The parent's result names the winner's branch: `orchestrate merge ID` lands it.
            MergeMode::Branch => {
                ws.merge = Some("kept".into());
                return Some(ws);
            }
        };
        let id = &self.task.id;
        let message = format!(
            "orchestrate: task {id}, candidate {} picked\n\n{}\n",
            w.name,
            self.task
                .file
                .description
                .lines()
                .next()
                .unwrap_or_default()
        );
        let excludes = self.layout.own_folders();
        let how = match git::land(root, &base, &head, how, &excludes, &message) {
            Ok(Landed::Applied) => "applied",
            Ok(Landed::Committed(_)) => "committed",
            Ok(Landed::Kept) => "kept",
            Ok(Landed::Conflict(files)) => {
                ws.merge = Some("conflict".into());
                ws.conflicts = files;
                return Some(ws);
            }
            Err(e) => {
                // Nothing was written; the branch holds the changes.
                ws.merge = Some("conflict".into());
                ws.error = Some(format!("{e:#}"));
                return Some(ws);
            }
        };
        crate::failpoint::hit("fanout.after_land");
        // The winner's record says it landed before its branch goes: a crash between the two
        // leaves a branch too many, never a record naming a branch that is gone.
        let mut landed = r.clone();
        if let Some(lw) = landed.workspace.as_deref_mut() {
            lw.merge = Some(how.into());
            lw.branch = None;
        }
        self.rewrite(&w.id, landed);
        if let Err(e) = git::delete_branch(root, &branch) {
            console::warn(&format!("cannot delete the branch {branch}: {e:#}"));
        }
        ws.merge = Some(how.into());
        ws.branch = None;
        Some(ws)
    }

    /// Delete a losing candidate's kept branch, and say so in its record.
    fn discard(&self, root: &Path, id: &str, result: Option<TaskResult>, why: &str) {
        let Some(mut r) = result else {
            return;
        };
        let Some(branch) = r.workspace.as_ref().and_then(|w| w.branch.clone()) else {
            return;
        };
        // The record first, as for the winner: a crash between the two leaves a branch too many,
        // never a record naming a branch that is gone.
        if let Some(w) = r.workspace.as_deref_mut() {
            w.merge = Some(format!("discarded ({why})"));
            w.branch = None;
        }
        self.rewrite(id, r);
        if let Err(e) = git::delete_branch(root, &branch) {
            console::warn(&format!("cannot delete the branch {branch}: {e:#}"));
        }
    }

    /// A new version of a candidate's result record, told to the mirror.
    fn rewrite(&self, id: &str, mut r: TaskResult) {
        r.version += 1;
        if let Err(e) = self.spool.rewrite_result(&r) {
            console::warn(&format!("cannot rewrite the result of {id}: {e:#}"));
            return;
        }
        let place = match r.status {
            Terminal::Completed => Place::Completed,
            Terminal::Failed => Place::Failed,
        };
        let task = crate::task::read_task(&self.spool.task_path(place, id), u64::MAX)
            .ok()
            .map(|(t, _)| t);
        self.writer.send(Op::Upsert {
            row: mirror::terminal_row(&self.spool, &r, task.as_ref()),
            attempts: r.attempts.clone(),
        });
    }

    fn failed(&self, error: String) -> TaskResult {
        TaskResult::failed(
            &self.task.id,
            self.claim.version + 1,
            &self.task.file.description,
            self.claim.history.clone(),
            error,
        )
    }

    /// The parent's result: the winner's changes, output and diff as the task's own, and every
    /// candidate listed.
    fn completed(
        &self,
        candidates: &[Candidate],
        winner: Option<&Candidate>,
        because: String,
        pick: Pick,
        workspace: Option<crate::record::WorkspaceResult>,
    ) -> TaskResult {
        let id = &self.task.id;
        let winner_name = winner.map(|w| w.name.clone());
        let mut fan = FanOutResult {
            pick: pick.as_str().into(),
            winner: winner_name.clone(),
            picked_because: Some(because.clone()),
            ..Default::default()
        };
        let sum = |into: &mut Option<f64>, v: Option<f64>| {
            if let Some(v) = v {
                *into = Some(into.unwrap_or(0.0) + v);
            }
        };
        for c in candidates {
            let mut rec = CandidateResult {
                name: c.name.clone(),
                task_id: c.id.clone(),
                status: "missing".into(),
                ..Default::default()
            };
            // The branch as it is now: the pick just landed or discarded some.
            let now = self
                .spool
                .read_result(Terminal::Completed, &c.id)
                .or_else(|| c.result.clone());
            if let Some(r) = now.as_ref() {
                let last = r.attempts.last();
                rec.agent = r.agent.clone();
                rec.status = match (r.status, last.map(|a| a.outcome)) {
                    (Terminal::Completed, _) => "completed".into(),
                    (Terminal::Failed, Some(crate::record::Outcome::Cancelled)) => {
                        "cancelled".into()
                    }
                    (Terminal::Failed, None) => "not run".into(),
                    (Terminal::Failed, _) => "failed".into(),
                };
                rec.check = last.and_then(|a| a.check.clone());
                let mut cost = None;
                for a in &r.attempts {
                    sum(&mut cost, a.cost_usd);
                    if let Some(t) = a.input_tokens {
                        *rec.input_tokens.get_or_insert(0) += t;
                    }
                    if let Some(t) = a.output_tokens {
                        *rec.output_tokens.get_or_insert(0) += t;
                    }
                    if let Some(d) = a.duration_ms {
                        *rec.duration_ms.get_or_insert(0) += d;
                    }
                }
                rec.cost_usd = cost;
                rec.branch = r.workspace.as_ref().and_then(|w| w.branch.clone());
                rec.diff_file = r.diff_file.clone();
                rec.output_file = r.output_file.clone();
                rec.error = r.error.clone();
            }
            sum(&mut fan.cost_usd, rec.cost_usd);
            if let Some(t) = rec.input_tokens {
                *fan.input_tokens.get_or_insert(0) += t;
            }
            if let Some(t) = rec.output_tokens {
                *fan.output_tokens.get_or_insert(0) += t;
            }
            fan.candidates.push(rec);
        }
        let won = winner.and_then(|w| w.completed());
        // The task's own output: which candidate won and why, the list, then the winner's words.
        let mut text = format!(
            "Fan-out to {} candidate(s), pick: {}. Winner: {} ({because}).\n\n",
            candidates.len(),
            pick.as_str(),
            winner_name.as_deref().unwrap_or("none")
        );
        for c in &fan.candidates {
            text.push_str(&format!(
                "- {} ({}): {}{}{}\n",
                c.name,
                c.agent.as_deref().unwrap_or("-"),
                c.status,
                c.check
                    .as_ref()
                    .map(|k| format!(", check {}", if k.passed { "passed" } else { "failed" }))
                    .unwrap_or_default(),
                c.branch
                    .as_ref()
                    .map(|b| format!(", branch {b}"))
                    .unwrap_or_default()
            ));
        }
        if let Some(out) = won.and_then(|r| read_rel(&self.layout, &r.output_file)) {
            text.push_str(&format!("\n## The winner's output\n\n{out}"));
        }
        let header = context::OutputHeader {
            task: &self.task,
            agent: won.and_then(|r| r.agent.as_deref()).unwrap_or("-"),
            attempt: self.claim.attempt,
            duration: std::time::Duration::ZERO,
            exit: format!(
                "fan-out picked {}",
                winner_name.as_deref().unwrap_or("none")
            ),
        };
        let output = context::write_output(&self.layout, &header, &text, &self.redactor)
            .map_err(|e| console::warn(&format!("cannot write the output of {id}: {e:#}")))
            .ok();
        let diff = won
            .and_then(|r| read_rel(&self.layout, &r.diff_file))
            .and_then(|d| {
                context::write_diff(&self.layout, id, &d, &self.redactor)
                    .map_err(|e| console::warn(&format!("cannot write the diff of {id}: {e:#}")))
                    .ok()
            });
        let rel = |p: Option<std::path::PathBuf>| p.map(|p| self.layout.rel(&p));
        TaskResult {
            task_id: id.clone(),
            status: Terminal::Completed,
            version: self.claim.version + 1,
            agent: won.and_then(|r| r.agent.clone()),
            description: self.task.file.description.clone(),
            finished_at: fsutil::now_rfc3339(),
            attempts: self.claim.history.clone(),
            output_file: rel(output),
            diff_file: rel(diff),
            files_modified: won.map(|r| r.files_modified.clone()).unwrap_or_default(),
            files_modified_total: won.and_then(|r| r.files_modified_total),
            files_modified_file: won.and_then(|r| r.files_modified_file.clone()),
            review_required: won.is_some_and(|r| r.review_required),
            review_files: won.map(|r| r.review_files.clone()).unwrap_or_default(),
            error: None,
            chosen_because: Some(because),
            workspace: workspace.map(Box::new),
            fan_out: Some(Box::new(fan)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::judge_verdict;

    #[test]
    fn the_judge_answer_is_the_last_json_object_naming_a_candidate() {
        let names = ["claude", "codex"];
        let text = "# t1.judge\n\nI compared them.\n{\"winner\": \"codex\", \"reason\": \"it has tests\"}\n";
        assert_eq!(
            judge_verdict(text, "t1", &names),
            Ok(("codex".to_string(), "it has tests".to_string()))
        );
        // A task id and another case name the same candidate; the last object counts.
        let text = "{\"winner\": \"claude\"} then, on reflection: {\"winner\": \"t1.CODEX\"}";
        assert_eq!(
            judge_verdict(text, "t1", &names).map(|(n, _)| n),
            Ok("codex".to_string())
        );
    }

    #[test]
    fn a_judge_answer_without_a_known_winner_says_what_was_wrong() {
        let names = ["claude", "codex"];
        let e = judge_verdict("I like both.", "t1", &names).unwrap_err();
        assert!(e.contains("no JSON object"), "{e}");
        let e = judge_verdict("{\"winner\": \"gemini\"}", "t1", &names).unwrap_err();
        assert!(e.contains("`gemini`") && e.contains("claude, codex"), "{e}");
        let e = judge_verdict("{\"winner\": 3}", "t1", &names).unwrap_err();
        assert!(e.contains("no JSON object"), "{e}");
    }
}
