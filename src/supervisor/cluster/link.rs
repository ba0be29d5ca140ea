//! The supervisor's line to the cluster queue: a thread with a runtime of its own that owns the
//! [`Queue`] handle, takes the loop's requests (publish, claim, finish, release, delivered), and
//! keeps the host alive on its own clock: the host heartbeat, the renewal of every lease it holds,
//! reclaiming expired leases, and offering the origin's outcomes.
//!
//! It decides nothing about tasks: it tells the loop what the queue said ([`News`]), and the loop
//! decides. It must never touch the tree. A lease it can no longer renew is reported lost at
//! once, so the loop stops that agent: a host that cannot prove it holds a task stops working on
//! it. Refused renewals are reported as they come back; a lease whose renewals go unanswered is
//! given up by a watchdog of its own (the loop of this thread may be waiting on a silent
//! database), before the database's clock lets another host take the task.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::console;
use crate::mirror::postgres::queue::{
    Capacity, Finished, Held, LostClaim, Publish, Queue, Settings,
};
use crate::record::{Attempt, TaskResult};
pub(in crate::supervisor) use crate::supervisor::events::{Leased, LostWhy, News};

/// What the loop asks of the queue.
pub(in crate::supervisor) enum Ask {
    Publish(Box<Publish>),
    Claim(Capacity),
    Finish {
        id: String,
        fence: i64,
        done: Box<Finished>,
    },
    Release {
        id: String,
        fence: i64,
    },
    /// The origin materialised this outcome: the queue stops offering it.
    Delivered(String),
    /// The supervisor stops: leave the cluster, then say so on the channel.
    Leave(std::sync::mpsc::Sender<()>),
}

pub(in crate::supervisor) struct Link {
    pub(in crate::supervisor) tx: mpsc::UnboundedSender<Ask>,
    pub(in crate::supervisor) news: Option<mpsc::UnboundedReceiver<News>>,
    pub(in crate::supervisor) host: String,
}

pub(in crate::supervisor) struct Start {
    pub(in crate::supervisor) url: String,
    pub(in crate::supervisor) schema: String,
    pub(in crate::supervisor) host: String,
    pub(in crate::supervisor) instance: String,
    /// This host's previous instance, known dead: its name is taken over at once.
    pub(in crate::supervisor) replaces: Option<String>,
    pub(in crate::supervisor) labels: Vec<String>,
    pub(in crate::supervisor) lease: Duration,
    pub(in crate::supervisor) aging: Duration,
    pub(in crate::supervisor) poll: Duration,
    pub(in crate::supervisor) max_running: Option<u32>,
}

/// How long `start` waits for the queue to answer before the supervisor refuses to start.
const CONNECT_WITHIN: Duration = Duration::from_secs(20);

impl Link {
    /// Connect, register the host name, and start the thread. An error names what failed (the
    /// database out of reach, the host name taken by a live supervisor).
    pub(in crate::supervisor) fn start(s: Start) -> anyhow::Result<Link> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (news_tx, news_rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let host = s.host.clone();
        std::thread::Builder::new()
            .name("orchestrate-cluster".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("cannot start a runtime: {e}")));
                        return;
                    }
                };
                rt.block_on(run(s, rx, news_tx, ready_tx));
            })?;
        match ready_rx.recv_timeout(CONNECT_WITHIN) {
            Ok(Ok(())) => Ok(Link {
                tx,
                news: Some(news_rx),
                host,
            }),
            Ok(Err(e)) => anyhow::bail!("cluster: {e}"),
            Err(_) => anyhow::bail!(
                "cluster: the queue in PostgreSQL did not answer within {} s",
                CONNECT_WITHIN.as_secs()
            ),
        }
    }

    pub(in crate::supervisor) fn ask(&self, a: Ask) {
        let _ = self.tx.send(a);
    }
}

/// The attempts a task's earlier claims reported, in claim order: retries as they were, and stale
/// ones (fenced off, or given up) as `lost`, since they decided nothing and count as failures the
/// way an attempt cut short by a crash does. Each row's own attempt is what that claim reported;
/// the attempts its record carried from before fill in the numbers no row has (a claim whose host
/// died without a word, which the runner after it recorded as `lost`), so they are not forgotten
/// at the next retry. `lost` is the claim just before a new lease (numbered `lost.0`), when its
/// lease ran out: it is recorded so unless a row says more.
fn earlier_attempts(
    rows: &[crate::mirror::postgres::queue::ResultRow],
    lost: Option<(u32, &LostClaim)>,
) -> Vec<Attempt> {
    let mut rows: Vec<_> = rows.iter().collect();
    rows.sort_by_key(|r| r.fence);
    let records: Vec<_> = rows
        .iter()
        .filter_map(|r| {
            crate::record::from_yaml::<TaskResult>(&r.record)
                .ok()
                .map(|res| (*r, res))
        })
        .collect();
    let mut by_n: std::collections::BTreeMap<u32, Attempt> = Default::default();
    for (r, res) in &records {
        if let Some(last) = res.attempts.last() {
            let mut a = last.clone();
            if r.stale {
                a.outcome = crate::record::Outcome::Lost;
                a.error = Some(format!(
                    "stale: host {}'s lease had ended; this attempt decided nothing ({})",
                    r.host,
                    last.error.as_deref().unwrap_or(last.outcome.as_str())
                ));
            }
            by_n.insert(a.n, a);
        }
    }
    for (_, res) in &records {
        for a in res.attempts.iter().rev().skip(1) {
            by_n.entry(a.n).or_insert_with(|| a.clone());
        }
    }
    if let Some((n, l)) = lost.filter(|(n, _)| *n > 0) {
        // Its host never reported (it died, or is cut off still): `lost`, as a crashed
        // supervisor's attempt is on one host. Without it the history would be short of an
        // attempt the queue counted, and a retry could be asked for that the queue cannot grant.
        by_n.entry(n).or_insert_with(|| Attempt {
            finished_at: Some(l.lease_ended.clone()),
            error: Some(format!(
                "host {} stopped answering while this attempt ran; its lease ran out before it said how the attempt ended",
                l.host
            )),
            host: Some(l.host.clone()),
            ..Attempt::new(
                n,
                crate::record::UNKNOWN_AGENT,
                &l.claimed_at,
                crate::record::Outcome::Lost,
            )
        });
    }
    by_n.into_values().collect()
}

/// The leases this host holds: each one's fence, and when the last renewal the queue accepted was
/// sent. The database set the lease's end from its own clock when the statement ran, which was
/// no earlier than the send, so `sent + lease` by our clock is never later than the end the
/// database judges by: giving up before it means no other host can have the task yet.
type Leases = Arc<Mutex<HashMap<String, (i64, Instant)>>>;

/// How long after the last accepted renewal was sent a lease is given up: a sixth of the lease
/// (at most 5 s) before it would run out, so the agent is stopped before another host may claim
/// the task, with two renewals tried on the way (they come every third of the lease).
fn give_up_after(lease: Duration) -> Duration {
    lease - (lease / 6).min(Duration::from_secs(5))
}

/// Give up every lease whose renewals went unanswered for [`give_up_after`]: report them lost.
/// Runs beside [`run`] on the same thread's runtime, so a statement the database never answers
/// (a partition, a silent proxy) cannot keep an agent running past its lease.
async fn watchdog(
    leases: Leases,
    give_up: Duration,
    beat: Duration,
    news: mpsc::UnboundedSender<News>,
) {
    loop {
        let now = Instant::now();
        // A lease claimed or renewed meanwhile ends no earlier than `now + give_up`, which is
        // later than `now + beat`: waking each beat at the latest sees it in time.
        let next = table(&leases)
            .values()
            .map(|(_, sent)| *sent + give_up)
            .min()
            .map_or(now + beat, |d| d.min(now + beat));
        tokio::time::sleep_until(next.into()).await;
        let now = Instant::now();
        let lost: Vec<(String, i64)> = {
            let mut held = table(&leases);
            let gone: Vec<(String, i64)> = held
                .iter()
                .filter(|(_, (_, sent))| now >= *sent + give_up)
                .map(|(id, (fence, _))| (id.clone(), *fence))
                .collect();
            for (id, _) in &gone {
                held.remove(id);
            }
            gone
        };
        if !lost.is_empty() {
            for (id, _) in &lost {
                console::warn(&format!(
                    "cluster: no renewal of the lease on {id} was answered within {:.1} s: giving it up",
                    give_up.as_secs_f64()
                ));
            }
            let gone = News::Lost {
                leases: lost,
                why: LostWhy::Unrenewed,
            };
            if news.send(gone).is_err() {
                return;
            }
        }
    }
}

/// Forget a lease this host held, if the table still has that claim of it (not a newer one).
fn forget(leases: &Leases, id: &str, fence: i64) {
    let mut held = table(leases);
    if held.get(id).is_some_and(|(f, _)| *f == fence) {
        held.remove(id);
    }
}

/// The lease table, even if a holder panicked (no invariant spans a lock).
fn table(leases: &Leases) -> std::sync::MutexGuard<'_, HashMap<String, (i64, Instant)>> {
    leases
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A finish the database did not take yet: tried again on every tick until it is stored.
struct Unsent {
    id: String,
    fence: i64,
    done: Box<Finished>,
}

async fn run(
    s: Start,
    mut rx: mpsc::UnboundedReceiver<Ask>,
    news: mpsc::UnboundedSender<News>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let settings = Settings {
        lease: s.lease,
        aging: s.aging,
        max_running: s.max_running,
    };
    let mut q = match Queue::connect(&s.url, &s.schema, &s.host, &s.instance, settings).await {
        Ok(q) => q,
        Err(e) => {
            let _ = ready.send(Err(format!("{e:#}")));
            return;
        }
    };
    if let Err(e) = q
        .register_host_replacing(&s.labels, s.replaces.as_deref())
        .await
    {
        let _ = ready.send(Err(format!("{e:#}")));
        return;
    }
    let mut wakeups = q.listen().await.ok();
    let _ = ready.send(Ok(()));
    console::info(&format!(
        "cluster    joined as host {} (lease {} s)",
        s.host,
        s.lease.as_secs()
    ));
    let leases: Leases = Arc::default();
    let mut unsent: Vec<Unsent> = vec![];
    // Outcomes handed to the loop and not yet acknowledged: not offered twice.
    let mut offered: HashSet<String> = HashSet::new();
    let beat = s.lease / 3;
    let guard = tokio::spawn(watchdog(
        leases.clone(),
        give_up_after(s.lease),
        beat,
        news.clone(),
    ));
    let mut heartbeat = tokio::time::interval(beat.max(Duration::from_millis(500)));
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut poll = tokio::time::interval(s.poll);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_reclaim = Instant::now();
    loop {
        tokio::select! {
            ask = rx.recv() => {
                let Some(ask) = ask else { break };
                match ask {
                    Ask::Leave(done) => {
                        let _ = q.leave_host().await;
                        let _ = done.send(());
                        break;
                    }
                    Ask::Publish(p) => {
                        let clash = match q.publish(&p).await {
                            Ok(()) => None,
                            Err(e) => match e.downcast_ref::<crate::mirror::postgres::queue::Clash>() {
                                // Ours already (a restart publishes its pending tasks again; a
                                // crash before an outcome was taken puts it back in pending/).
                                Some(c) if c.is_own_unsettled(&s.host) => None,
                                Some(c) => Some(c.to_string()),
                                None => {
                                    console::warn(&format!("cluster: cannot publish {}: {e:#}", p.id));
                                    let _ = news.send(News::PublishFailed(p.id.clone()));
                                    continue;
                                }
                            },
                        };
                        let _ = news.send(News::Published { id: p.id.clone(), clash });
                    }
                    Ask::Claim(cap) => {
                        // Before the statement: the lease's end is reckoned from no later than
                        // the database's.
                        let sent = Instant::now();
                        match q.claim(&cap).await {
                            Ok(got) => {
                                let mut out = Vec::with_capacity(got.len());
                                for lease in got {
                                    table(&leases).insert(lease.id.clone(), (lease.fence, sent));
                                    let earlier = if lease.attempt > 1 {
                                        let lost = lease.reclaimed_from.as_ref().map(|l| (lease.attempt - 1, l));
                                        q.results(&lease.id).await.map(|r| earlier_attempts(&r, lost)).unwrap_or_default()
                                    } else {
                                        vec![]
                                    };
                                    out.push(Leased { lease, earlier });
                                }
                                // One given up, or past the point of giving up, while histories were
                                // read (a silent database) is not started: it is given back, or runs
                                // out and another claim takes it.
                                let give_up = give_up_after(s.lease);
                                let (mut keep, mut drop_) = (vec![], vec![]);
                                for l in out {
                                    let live = table(&leases).get(&l.lease.id).is_some_and(|(f, at)| {
                                        *f == l.lease.fence && at.elapsed() < give_up
                                    });
                                    if live { keep.push(l) } else { drop_.push(l) }
                                }
                                for l in drop_ {
                                    forget(&leases, &l.lease.id, l.lease.fence);
                                    let _ = q.release(&l.lease.id, l.lease.fence).await;
                                }
                                let _ = news.send(News::Claimed(keep));
                            }
                            Err(e) => {
                                console::debug(&format!("cluster: claim failed: {e:#}"));
                                let _ = news.send(News::ClaimFailed);
                            }
                        }
                    }
                    Ask::Finish { id, fence, done } => {
                        forget(&leases, &id, fence);
                        unsent.push(Unsent { id, fence, done });
                        send_finishes(&mut q, &mut unsent, &news).await;
                    }
                    Ask::Release { id, fence } => {
                        forget(&leases, &id, fence);
                        let _ = q.release(&id, fence).await;
                    }
                    Ask::Delivered(id) => {
                        if q.delivered(&id).await.is_ok() {
                            offered.remove(&id);
                        }
                    }
                }
            }
            _ = heartbeat.tick() => {
                if let Err(e) = q.heartbeat_host().await {
                    console::debug(&format!("cluster: heartbeat failed: {e:#}"));
                }
                renew(&mut q, &leases, &news).await;
                send_finishes(&mut q, &mut unsent, &news).await;
            }
            _ = poll.tick() => {
                if last_reclaim.elapsed() >= beat {
                    last_reclaim = Instant::now();
                    if let Ok(back) = q.reclaim().await {
                        for r in back {
                            console::info(&format!(
                                "reclaimed  {} from host {} ({})",
                                r.id, r.owner, if r.failed { "no attempts left: failed" } else { "pending again" }
                            ));
                        }
                    }
                }
                offer_outcomes(&mut q, &mut offered, &news).await;
                let _ = news.send(News::Wake);
            }
            note = async {
                match wakeups.as_mut() {
                    Some(w) => w.next().await,
                    None => std::future::pending().await,
                }
            } => {
                if note.is_none() {
                    // The listening connection broke: polling goes on; listen again later.
                    wakeups = None;
                } else {
                    offer_outcomes(&mut q, &mut offered, &news).await;
                    let _ = news.send(News::Wake);
                }
            }
        }
        if wakeups.is_none() && last_reclaim.elapsed() >= beat {
            wakeups = q.listen().await.ok();
        }
    }
    guard.abort();
}

/// Renew every lease held, and report the ones the queue refused (another host holds them now, or
/// they ended). One that goes unanswered is the watchdog's to give up in time.
async fn renew(q: &mut Queue, leases: &Leases, news: &mpsc::UnboundedSender<News>) {
    let held: Vec<(String, i64)> = table(leases)
        .iter()
        .map(|(id, (f, _))| (id.clone(), *f))
        .collect();
    if held.is_empty() {
        return;
    }
    let sent = Instant::now();
    let answers = match q.renew_all(&held).await {
        Ok(a) => a,
        Err(e) => {
            console::warn(&format!("cluster: cannot renew leases: {e:#}"));
            return;
        }
    };
    let mut lost = vec![];
    let mut table = table(leases);
    for ((id, fence), h) in held.into_iter().zip(answers) {
        // Only the claim asked about: one finished, released or given up meanwhile is not ours
        // to touch.
        let Some(entry) = table.get_mut(&id).filter(|(f, _)| *f == fence) else {
            continue;
        };
        match h {
            Held::Ok => entry.1 = sent,
            Held::Fenced => {
                table.remove(&id);
                lost.push((id, fence));
            }
        }
    }
    drop(table);
    if !lost.is_empty() {
        let _ = news.send(News::Lost {
            leases: lost,
            why: LostWhy::Fenced,
        });
    }
}

async fn send_finishes(
    q: &mut Queue,
    unsent: &mut Vec<Unsent>,
    news: &mpsc::UnboundedSender<News>,
) {
    let mut left = vec![];
    for u in unsent.drain(..) {
        if !left.is_empty() {
            left.push(u);
            continue;
        }
        match q.finish(&u.id, u.fence, &u.done).await {
            Ok(held) => {
                let _ = news.send(News::Finished { id: u.id, held });
            }
            Err(e) => {
                console::warn(&format!(
                    "cluster: cannot store the result of {} yet: {e:#}",
                    u.id
                ));
                left.push(u);
            }
        }
    }
    *unsent = left;
}

async fn offer_outcomes(
    q: &mut Queue,
    offered: &mut HashSet<String>,
    news: &mpsc::UnboundedSender<News>,
) {
    let Ok(all) = q.outcomes(200).await else {
        return;
    };
    let mut out = vec![];
    for o in all {
        if offered.insert(o.id.clone()) {
            let earlier = q
                .results(&o.id)
                .await
                .map(|r| earlier_attempts(&r, None))
                .unwrap_or_default();
            out.push((o, earlier));
        }
    }
    if !out.is_empty() {
        let _ = news.send(News::Outcomes(out));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::postgres::queue::ResultRow;
    use crate::record::Outcome;

    fn row(fence: i64, host: &str, stale: bool, attempts: Vec<Attempt>) -> ResultRow {
        let r = TaskResult::failed("t", 1, "", attempts, "x".into());
        ResultRow {
            task_id: "t".into(),
            fence,
            host: host.into(),
            end: if stale { "failed" } else { "retry" }.into(),
            stale,
            record: crate::record::to_yaml(&r, &crate::redact::Redactor::none()),
            output: String::new(),
            patch: String::new(),
            log_tail: String::new(),
        }
    }

    fn attempt(n: u32, agent: &str, outcome: Outcome, host: &str) -> Attempt {
        Attempt {
            host: Some(host.into()),
            ..Attempt::new(n, agent, "2026-01-01T00:00:00.000Z", outcome)
        }
    }

    fn summary(v: &[Attempt]) -> Vec<(u32, String, Outcome)> {
        v.iter()
            .map(|a| (a.n, a.host.clone().unwrap_or_default(), a.outcome))
            .collect()
    }

    /// A lost claim a runner recorded (its host died without a row) stays in the history of every
    /// later claim, not only the next one; a row of its own, when one comes, says more and wins.
    #[test]
    fn a_lost_claim_recorded_by_one_runner_stays_in_the_history_after_it() {
        let lost = attempt(1, crate::record::UNKNOWN_AGENT, Outcome::Lost, "a");
        let b = attempt(2, "fake", Outcome::AgentError, "b");
        let c = attempt(3, "fake", Outcome::AgentError, "c");
        let rows = [
            row(2, "b", false, vec![lost.clone(), b.clone()]),
            row(3, "c", false, vec![lost.clone(), b.clone(), c.clone()]),
        ];
        assert_eq!(
            summary(&earlier_attempts(&rows, None)),
            [
                (1, "a".into(), Outcome::Lost),
                (2, "b".into(), Outcome::AgentError),
                (3, "c".into(), Outcome::AgentError)
            ]
        );
        // The dead host's own late row: its attempt, marked stale, replaces the stand-in.
        let late = attempt(1, "fake", Outcome::Completed, "a");
        let mut with_late = rows.to_vec();
        with_late.push(row(1, "a", true, vec![late]));
        let got = earlier_attempts(&with_late, None);
        assert_eq!(got[0].agent, "fake");
        assert_eq!(got[0].outcome, Outcome::Lost);
        assert!(
            got[0]
                .error
                .as_deref()
                .unwrap_or_default()
                .starts_with("stale: host a's"),
            "{:?}",
            got[0].error
        );
        assert_eq!(got.len(), 3);
        // The claim a new lease took over, with no row: a stand-in from what the lease says of it;
        // with a row, the row.
        let gone = LostClaim {
            host: "a".into(),
            claimed_at: "2026-01-01T00:00:00.000Z".into(),
            lease_ended: "2026-01-01T00:00:30.000Z".into(),
        };
        let got = earlier_attempts(&[], Some((1, &gone)));
        assert_eq!(summary(&got), [(1, "a".into(), Outcome::Lost)]);
        assert_eq!(got[0].agent, crate::record::UNKNOWN_AGENT);
        assert_eq!(
            got[0].finished_at.as_deref(),
            Some("2026-01-01T00:00:30.000Z")
        );
        let got = earlier_attempts(&with_late, Some((1, &gone)));
        assert_eq!(got[0].agent, "fake");
    }
}
