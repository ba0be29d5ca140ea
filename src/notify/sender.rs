//! The sender: a thread beside the supervisor loop that moves events into the outbox and delivers
//! them, retrying with exponential back-off until they are accepted or given up on.
//!
//! It has its own SQLite connection (the mirror's `WriterDb`, so a database deleted and rebuilt
//! under it is noticed and reopened) and its own small tokio runtime; a receiver that hangs costs
//! it a channel's `timeout_seconds` and costs the loop nothing. Channels are served concurrently
//! within a pass, one event at a time each, oldest first. The configuration is the one it was
//! started with: a change to `notify` takes effect at the next start.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Result;

use super::deliver::{self, Context};
use super::{Event, notice_event, task_event, wanted};
use crate::config::Config;
use crate::console;
use crate::layout::Layout;
use crate::mirror::outbox::{self, Queued, Tried};
use crate::mirror::sqlite::WriterDb;
use crate::redact::Redactor;

/// How often the sender looks for new events and due retries.
const POLL: Duration = Duration::from_millis(250);
/// The first retry's delay; each failure in a row doubles it, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// The delay before the try after `tries` failed ones.
pub fn backoff(tries: u32) -> Duration {
    let exp = tries.saturating_sub(1).min(16);
    (FIRST_BACKOFF * 2u32.pow(exp)).min(MAX_BACKOFF)
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// A running sender. Dropping it leaves the thread running until the process ends (undelivered
/// events wait in the outbox for the next start either way).
pub struct Sender {
    /// Passes completed that found nothing to queue and nothing due.
    idle_passes: Arc<AtomicU64>,
    passes: Arc<AtomicU64>,
}

impl Sender {
    /// Start the sender thread when the configuration has channels.
    pub fn start(cfg: &Config, layout: &Layout, host: &str) -> Result<Option<Sender>> {
        if cfg.notify.is_empty() {
            return Ok(None);
        }
        // A channel seen for the first time starts at the end of the event streams: make its cursor
        // now, before the supervisor starts, so the first events of this run are after it.
        // (Should this fail, the thread makes it on its first pass.)
        if let Err(e) = crate::mirror::sqlite::open(&layout.state_db()).and_then(|conn| {
            cfg.notify
                .iter()
                .try_for_each(|c| outbox::cursor(&conn, c.name()).map(|_| ()))
        }) {
            console::warn(&format!("notify: {e:#}; trying again"));
        }
        let idle_passes = Arc::new(AtomicU64::new(0));
        let passes = Arc::new(AtomicU64::new(0));
        let state = State {
            cfg: cfg.clone(),
            layout: layout.clone(),
            db_path: layout.state_db(),
            host: host.to_string(),
            redactor: Arc::new(cfg.redactor()),
            idle_passes: idle_passes.clone(),
            passes: passes.clone(),
        };
        std::thread::Builder::new()
            .name("notify".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        console::error(&format!("notify: cannot start the sender: {e}"));
                        return;
                    }
                };
                rt.block_on(state.run());
            })?;
        Ok(Some(Sender {
            idle_passes,
            passes,
        }))
    }

    /// Wait (at most `limit`) for a pass that starts after this call to find nothing new and
    /// nothing due: what `start --once` does before it exits, so its last events go out.
    pub fn settle(&self, limit: Duration) {
        let start = self.passes.load(Ordering::SeqCst);
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            // The pass running now may have started before the call: wait for the one after it.
            if self.passes.load(Ordering::SeqCst) > start + 1
                && self.idle_passes.load(Ordering::SeqCst) > start + 1
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

struct State {
    cfg: Config,
    layout: Layout,
    db_path: PathBuf,
    host: String,
    redactor: Arc<Redactor>,
    /// The number of the last pass that was idle.
    idle_passes: Arc<AtomicU64>,
    passes: Arc<AtomicU64>,
}

impl State {
    async fn run(self) {
        let mut db: Option<WriterDb> = None;
        let mut failing = false;
        let mut last_prune = std::time::Instant::now() - Duration::from_secs(3600);
        let mut lock: Option<std::fs::File> = None;
        let mut waiting_said = false;
        loop {
            // One sender per state directory: another supervisor's holds the lock, and this one
            // takes over when that one ends.
            if lock.is_none() {
                lock = self.take_lock();
                if lock.is_none() {
                    if !waiting_said {
                        console::info(
                            "notify: another supervisor on this tree delivers notifications; taking over when it stops",
                        );
                        waiting_said = true;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
            if db.is_none() {
                match WriterDb::open(&self.db_path) {
                    Ok(d) => db = Some(d),
                    Err(e) if !failing => {
                        console::warn(&format!(
                            "notify: cannot open {}: {e:#}; trying again",
                            self.db_path.display()
                        ));
                        failing = true;
                    }
                    Err(_) => {}
                }
            }
            if let Some(d) = &mut db {
                d.reopen_if_replaced();
                match self.pass(&mut d.conn).await {
                    Ok(idle) => {
                        failing = false;
                        let n = self.passes.fetch_add(1, Ordering::SeqCst) + 1;
                        if idle {
                            self.idle_passes.store(n, Ordering::SeqCst);
                        }
                    }
                    Err(e) if !failing => {
                        console::warn(&format!("notify: {e:#}; trying again"));
                        failing = true;
                    }
                    Err(_) => {}
                }
                if last_prune.elapsed() > Duration::from_secs(3600) {
                    last_prune = std::time::Instant::now();
                    let _ = outbox::prune(&d.conn, now_ms());
                    // At the first pass too: a channel removed from config.yaml leaves events
                    // nobody will try; they are given up on, so `status` says so.
                    let names: Vec<&str> = self.cfg.notify.iter().map(|c| c.name()).collect();
                    let _ = outbox::drop_unconfigured(&d.conn, &names, now_ms());
                }
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn take_lock(&self) -> Option<std::fs::File> {
        let path = self.layout.notify_lock();
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .ok()?;
        f.try_lock().ok()?;
        Some(f)
    }

    /// Queue what is new for each channel, then deliver what is due. Returns whether there was
    /// nothing to do.
    async fn pass(&self, conn: &mut rusqlite::Connection) -> Result<bool> {
        let mut queued_any = false;
        for channel in &self.cfg.notify {
            queued_any |= self.queue_new(conn, channel.name())?;
        }
        let known: BTreeMap<&str, _> = self.cfg.notify.iter().map(|c| (c.name(), c)).collect();
        let now = now_ms();
        let mut due = Vec::new();
        for name in known.keys() {
            due.extend(outbox::due(conn, name, now, 100)?);
        }
        if due.is_empty() {
            return Ok(!queued_any);
        }
        let mut by_channel: BTreeMap<String, Vec<outbox::Pending>> = BTreeMap::new();
        for p in due {
            by_channel.entry(p.channel.clone()).or_default().push(p);
        }
        let cx = Context {
            cfg: &self.cfg,
            layout: &self.layout,
            redactor: &self.redactor,
        };
        let cx = &cx;
        let runs = by_channel.into_iter().map(|(name, rows)| {
            let channel = known[name.as_str()];
            async move {
                let mut done = Vec::new();
                for row in rows {
                    let result = match serde_json::from_str::<Event>(&row.body) {
                        Ok(event) => deliver::deliver(cx, channel, &event).await,
                        Err(e) => Err(format!("the queued event is not readable: {e}")),
                    };
                    let failed = result.is_err();
                    done.push((row, result));
                    // The receiver is down: the rest wait for their own next try.
                    if failed {
                        break;
                    }
                }
                (channel, done)
            }
        });
        for (channel, done) in futures_util::future::join_all(runs).await {
            let now = now_ms();
            for (row, result) in done {
                let name = channel.name();
                // A receiver's answer or a command's output may quote a secret back.
                let result = result.map_err(|e| self.redactor.redact(&e));
                let tried = match &result {
                    Ok(answer) => {
                        console::debug(&format!(
                            "notify     {name}: {} {} delivered ({answer})",
                            row.kind, row.event_id
                        ));
                        Tried::Delivered
                    }
                    Err(e) => {
                        let tries = row.tries + 1;
                        let waited = Duration::from_millis((now - row.queued_ms).max(0) as u64);
                        if waited >= channel.give_up_after() {
                            console::error(&format!(
                                "notify     {name}: gave up on {} {} after {tries} tries: {e}",
                                row.kind, row.event_id
                            ));
                            Tried::GiveUp { error: e }
                        } else {
                            let next = backoff(tries);
                            console::warn(&format!(
                                "notify     {name}: {} {} not delivered (try {tries}): {e}; again in {} s",
                                row.kind,
                                row.event_id,
                                next.as_secs()
                            ));
                            let next_ms = now + next.as_millis() as i64;
                            outbox::hold_channel(conn, name, next_ms)?;
                            Tried::Retry { error: e, next_ms }
                        }
                    }
                };
                outbox::record_try(conn, name, &row.event_id, tried, now)?;
            }
        }
        Ok(false)
    }

    /// Move what is past `channel`'s cursor into the outbox. Returns whether it queued anything.
    fn queue_new(&self, conn: &mut rusqlite::Connection, name: &str) -> Result<bool> {
        let Some(channel) = self.cfg.notify.iter().find(|c| c.name() == name) else {
            return Ok(false);
        };
        let cursor = outbox::cursor(conn, name)?;
        let tasks = outbox::task_events_after(conn, cursor.task_seq, 500)?;
        let notices = outbox::notices_after(conn, cursor.notice_seq, 500)?;
        if tasks.is_empty() && notices.is_empty() {
            return Ok(false);
        }
        let mut events = Vec::new();
        let task_seq = tasks.last().map_or(cursor.task_seq, |e| e.seq);
        let notice_seq = notices.last().map_or(cursor.notice_seq, |(s, _)| *s);
        // Events from before the channel existed are history, not news (fixed-width UTC times
        // compare as strings).
        let fresh = |at: &str| at >= cursor.since.as_str();
        for e in &tasks {
            if let Some(ev) = task_event(e).filter(|ev| fresh(&e.at) && wanted(channel, ev)) {
                events.push(ev);
            }
        }
        for (_, n) in &notices {
            let ev = notice_event(n, &self.host);
            if fresh(&n.at) && wanted(channel, &ev) {
                events.push(ev);
            }
        }
        let queued: Vec<Queued> = events
            .iter()
            .map(|e| Queued {
                event_id: e.id.clone(),
                kind: e.kind.clone(),
                body: serde_json::to_string(e).unwrap_or_default(),
            })
            .collect();
        outbox::queue(conn, name, &queued, task_seq, notice_seq, now_ms())?;
        Ok(!queued.is_empty())
    }
}

/// `orchestrate notify test`: send a sample event on each channel named (all when `only` is
/// `None`) and say what each receiver answered. Returns (channel, answer or error) per channel.
pub fn test(cfg: &Config, layout: &Layout, only: Option<&str>) -> Vec<(String, Result<String>)> {
    let host = crate::fsutil::hostname();
    let redactor = Arc::new(cfg.redactor());
    let cx = Context {
        cfg,
        layout,
        redactor: &redactor,
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return vec![("-".into(), Err(e.into()))],
    };
    let mut out = Vec::new();
    for c in cfg
        .notify
        .iter()
        .filter(|c| only.is_none_or(|n| n == c.name()))
    {
        let event = super::sample(&host, c.name());
        let r = rt.block_on(deliver::deliver(&cx, c, &event));
        out.push((c.name().to_string(), r.map_err(anyhow::Error::msg)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_up_to_five_minutes() {
        let secs: Vec<u64> = (1..=11).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(backoff(u32::MAX).as_secs(), 300);
    }
}
