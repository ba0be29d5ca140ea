//! The supervisor's line to the cluster queue: a thread with a runtime of its own that owns the
//! [`Queue`] handle, takes the loop's requests (publish, claim, finish, release, delivered), and
//! keeps the host alive on its own clock: the host heartbeat, the renewal of every lease it holds,
//! reclaiming expired leases, and offering the origin's outcomes.
//!
//! It decides nothing about tasks: it tells the loop what the queue said ([`News`]), and the loop
//! decides. It must never touch the tree. A lease it can no longer renew (refused, or the database
//! out of reach for longer than the lease) is reported lost at once, so the loop stops that agent:
//! a host that cannot prove it holds a task stops working on it.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::console;
use crate::mirror::postgres::queue::{Capacity, Finished, Held, Publish, Queue, Settings};
use crate::record::{Attempt, TaskResult};
pub(in crate::supervisor) use crate::supervisor::events::{Leased, News};

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
    pub(in crate::supervisor) labels: Vec<String>,
    pub(in crate::supervisor) lease: Duration,
    pub(in crate::supervisor) aging: Duration,
    pub(in crate::supervisor) poll: Duration,
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

/// The attempts a task's earlier claims reported (outcome rows and retries, not stale ones), in
/// claim order.
fn earlier_attempts(rows: &[crate::mirror::postgres::queue::ResultRow]) -> Vec<Attempt> {
    let mut rows: Vec<_> = rows.iter().filter(|r| !r.stale).collect();
    rows.sort_by_key(|r| r.fence);
    let mut out: Vec<Attempt> = vec![];
    for r in rows {
        if let Ok(res) = crate::record::from_yaml::<TaskResult>(&r.record)
            && let Some(last) = res.attempts.last()
        {
            out.push(last.clone());
        }
    }
    out
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
    };
    let mut q = match Queue::connect(&s.url, &s.schema, &s.host, &s.instance, settings).await {
        Ok(q) => q,
        Err(e) => {
            let _ = ready.send(Err(format!("{e:#}")));
            return;
        }
    };
    if let Err(e) = q.register_host(&s.labels).await {
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
    // The leases this host holds, and when each was last renewed (by our clock: only to give up
    // on a lease we could not renew for a whole lease, never to judge one).
    let mut leases: HashMap<String, (i64, Instant)> = HashMap::new();
    let mut unsent: Vec<Unsent> = vec![];
    // Outcomes handed to the loop and not yet acknowledged: not offered twice.
    let mut offered: HashSet<String> = HashSet::new();
    let beat = s.lease / 3;
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
                                // Ours already (a restart publishes its pending tasks again).
                                Some(c) if c.origin == s.host && c.state != "done" => None,
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
                    Ask::Claim(cap) => match q.claim(&cap).await {
                        Ok(got) => {
                            let mut out = Vec::with_capacity(got.len());
                            for lease in got {
                                leases.insert(lease.id.clone(), (lease.fence, Instant::now()));
                                let earlier = if lease.attempt > 1 {
                                    q.results(&lease.id).await.map(|r| earlier_attempts(&r)).unwrap_or_default()
                                } else {
                                    vec![]
                                };
                                out.push(Leased { lease, earlier });
                            }
                            let _ = news.send(News::Claimed(out));
                        }
                        Err(e) => {
                            console::debug(&format!("cluster: claim failed: {e:#}"));
                            let _ = news.send(News::ClaimFailed);
                        }
                    },
                    Ask::Finish { id, fence, done } => {
                        leases.remove(&id);
                        unsent.push(Unsent { id, fence, done });
                        send_finishes(&mut q, &mut unsent, &news).await;
                    }
                    Ask::Release { id, fence } => {
                        leases.remove(&id);
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
                renew(&mut q, &mut leases, s.lease, &news).await;
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
}

/// Renew every lease held; report the ones refused, and the ones not renewed for a whole lease
/// (the database out of reach: another host may hold them by now).
async fn renew(
    q: &mut Queue,
    leases: &mut HashMap<String, (i64, Instant)>,
    lease: Duration,
    news: &mpsc::UnboundedSender<News>,
) {
    if leases.is_empty() {
        return;
    }
    let held: Vec<(String, i64)> = leases.iter().map(|(id, (f, _))| (id.clone(), *f)).collect();
    let mut lost = vec![];
    match q.renew_all(&held).await {
        Ok(answers) => {
            for ((id, fence), h) in held.into_iter().zip(answers) {
                match h {
                    Held::Ok => {
                        if let Some(l) = leases.get_mut(&id) {
                            l.1 = Instant::now();
                        }
                    }
                    Held::Fenced => lost.push((id, fence)),
                }
            }
        }
        Err(e) => {
            console::warn(&format!("cluster: cannot renew leases: {e:#}"));
            for (id, fence) in held {
                if leases.get(&id).is_some_and(|(_, at)| at.elapsed() >= lease) {
                    lost.push((id, fence));
                }
            }
        }
    }
    if !lost.is_empty() {
        for (id, _) in &lost {
            leases.remove(id);
        }
        let _ = news.send(News::Lost(lost));
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
                .map(|r| earlier_attempts(&r))
                .unwrap_or_default();
            out.push((o, earlier));
        }
    }
    if !out.is_empty() {
        let _ = news.send(News::Outcomes(out));
    }
}
