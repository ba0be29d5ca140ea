//! `GET /metrics`: the project in the Prometheus exposition format, built with `prometheus-client`
//! from the mirror and the folder at each scrape.
//!
//! Gauges and per-agent totals are read fresh each time. Transitions, queue waits and attempt
//! durations come from the mirror's event sequence, carried over between scrapes so each event is
//! read once; they start from the first event the mirror holds, so they are totals over its whole
//! history (a restarted server counts it again, as a counter reset).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicU64;

use anyhow::Result;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use time::OffsetDateTime;

use super::State;
use crate::mirror::read::Reader;

/// Events read per query while counting transitions.
const BATCH: usize = 10_000;
/// Attempt durations, from seconds to a day.
const DURATION_BUCKETS: [f64; 12] = [
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 14400.0, 86400.0,
];

/// What the events counted so far add up to: transitions by (state, agent), the two histograms,
/// and per task when it last entered `pending` and `running` (to time the next transition).
pub struct Transitions {
    cursor: i64,
    counts: BTreeMap<(String, String), u64>,
    queue_wait: Histogram,
    attempt_duration: Histogram,
    pending_since: HashMap<String, OffsetDateTime>,
    running_since: HashMap<String, OffsetDateTime>,
}

impl Default for Transitions {
    fn default() -> Transitions {
        Transitions {
            cursor: 0,
            counts: BTreeMap::new(),
            queue_wait: Histogram::new(DURATION_BUCKETS),
            attempt_duration: Histogram::new(DURATION_BUCKETS),
            pending_since: HashMap::new(),
            running_since: HashMap::new(),
        }
    }
}

impl Transitions {
    fn count(&mut self, e: &crate::mirror::Event) {
        let agent = e.agent.clone().unwrap_or_default();
        *self.counts.entry((e.state.clone(), agent)).or_default() += 1;
        self.cursor = e.seq;
        let Some(at) = crate::fsutil::parse_time(&e.at) else {
            return;
        };
        let secs = |since: OffsetDateTime| (at - since).as_seconds_f64().max(0.0);
        if let Some(started) = self.running_since.remove(&e.task_id) {
            self.attempt_duration.observe(secs(started));
        }
        match e.state.as_str() {
            "pending" => {
                self.pending_since.insert(e.task_id.clone(), at);
            }
            "running" => {
                if let Some(queued) = self.pending_since.remove(&e.task_id) {
                    self.queue_wait.observe(secs(queued));
                }
                self.running_since.insert(e.task_id.clone(), at);
            }
            _ => {
                self.pending_since.remove(&e.task_id);
            }
        }
    }
}

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn render(state: &State, reader: &Reader) -> Result<String> {
    let project = &state.project;
    let mut reg = Registry::with_prefix("orchestrate");

    let tasks = Family::<Labels, Gauge>::default();
    reg.register("tasks", "Tasks by state", tasks.clone());
    for s in ["pending", "running", "completed", "failed"] {
        tasks.get_or_create(&labels(&[("state", s)])).set(0);
    }
    for (s, n) in reader.counts()? {
        tasks.get_or_create(&labels(&[("state", &s)])).set(n as i64);
    }

    let transitions = Family::<Labels, Counter>::default();
    reg.register(
        "task_transitions",
        "Task state transitions the mirror recorded, by the state entered and the task's agent",
        transitions.clone(),
    );
    {
        let mut t = state
            .transitions
            .lock()
            .map_err(|_| anyhow::anyhow!("metrics state poisoned"))?;
        loop {
            let events = reader.events_since(t.cursor, BATCH)?;
            for e in &events {
                t.count(e);
            }
            if events.len() < BATCH {
                break;
            }
        }
        for ((s, a), n) in &t.counts {
            transitions
                .get_or_create(&labels(&[("state", s), ("agent", a)]))
                .inc_by(*n);
        }
        reg.register(
            "attempt_duration_seconds",
            "How long attempts ran, from entering running to leaving it",
            t.attempt_duration.clone(),
        );
        reg.register(
            "queue_wait_seconds",
            "How long tasks waited in pending before an attempt started",
            t.queue_wait.clone(),
        );
    }

    let mut running_by_agent: BTreeMap<String, i64> = BTreeMap::new();
    for r in reader.list(Some("running"))? {
        *running_by_agent
            .entry(r.agent.unwrap_or_default())
            .or_default() += 1;
    }

    let running = Family::<Labels, Gauge>::default();
    reg.register(
        "running_attempts",
        "Attempts running now, by agent",
        running.clone(),
    );
    let slots = Family::<Labels, Gauge>::default();
    reg.register(
        "agent_slots",
        "Attempts an agent may run at once (max_instances)",
        slots.clone(),
    );
    let cooling = Family::<Labels, Gauge>::default();
    reg.register(
        "agent_cooling_down",
        "1 while an agent rests after a rate limit or an exhausted quota",
        cooling.clone(),
    );
    let cooldowns = if reader.is_local() {
        crate::cooldown::Cooldowns::read(&project.layout)
    } else {
        BTreeMap::new()
    };
    let now = time::OffsetDateTime::now_utc();
    for (name, a) in &project.cfg.agents {
        let l = labels(&[("agent", name)]);
        running
            .get_or_create(&l)
            .set(running_by_agent.get(name).copied().unwrap_or(0));
        slots.get_or_create(&l).set(a.max_instances as i64);
        let cools = cooldowns
            .get(name)
            .and_then(crate::cooldown::until_of)
            .is_some_and(|u| u > now);
        cooling.get_or_create(&l).set(i64::from(cools));
    }

    let attempts = Family::<Labels, Counter>::default();
    reg.register(
        "agent_attempts",
        "Finished and running attempts by agent and outcome",
        attempts.clone(),
    );
    let cost = Family::<Labels, Counter<f64, AtomicU64>>::default();
    reg.register(
        "agent_cost_usd",
        "What an agent's attempts cost, in US dollars",
        cost.clone(),
    );
    let tokens = Family::<Labels, Counter>::default();
    reg.register(
        "agent_tokens",
        "Tokens an agent's attempts used, by direction",
        tokens.clone(),
    );
    for t in reader.agent_totals()? {
        let a = t.agent.as_str();
        attempts
            .get_or_create(&labels(&[("agent", a), ("outcome", "completed")]))
            .inc_by(t.completed);
        attempts
            .get_or_create(&labels(&[("agent", a), ("outcome", "failed")]))
            .inc_by(t.failed);
        cost.get_or_create(&labels(&[("agent", a)]))
            .inc_by(t.cost_usd);
        tokens
            .get_or_create(&labels(&[("agent", a), ("direction", "input")]))
            .inc_by(t.input_tokens);
        tokens
            .get_or_create(&labels(&[("agent", a), ("direction", "output")]))
            .inc_by(t.output_tokens);
    }

    // Spend against each configured budget, per window (in `orchestrator.timezone`).
    let spend_usd = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    reg.register(
        "budget_spent_usd",
        "What the attempts of a budget's scope (an agent, or `all`) cost in the current window",
        spend_usd.clone(),
    );
    let spend_tokens = Family::<Labels, Gauge>::default();
    reg.register(
        "budget_spent_tokens",
        "Input plus output tokens of a budget's scope (an agent, or `all`) in the current window",
        spend_tokens.clone(),
    );
    let limit_usd = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    reg.register(
        "budget_limit_usd",
        "A configured budget limit in US dollars, per window",
        limit_usd.clone(),
    );
    let limit_tokens = Family::<Labels, Gauge>::default();
    reg.register(
        "budget_limit_tokens",
        "A configured budget limit in tokens, per window",
        limit_tokens.clone(),
    );
    let paused = Family::<Labels, Gauge>::default();
    reg.register(
        "budget_paused",
        "1 while a reached budget limit pauses the scope (an agent, or `all`)",
        paused.clone(),
    );
    for b in project.budgets(reader)? {
        let s = &b.standing;
        paused
            .get_or_create(&labels(&[("scope", &b.scope)]))
            .set(i64::from(s.paused.is_some()));
        for (w, spend, usd, tokens) in [
            ("day", s.today, s.limits.daily_usd, s.limits.daily_tokens),
            (
                "month",
                s.this_month,
                s.limits.monthly_usd,
                s.limits.monthly_tokens,
            ),
        ] {
            let l = labels(&[("scope", &b.scope), ("window", w)]);
            spend_usd.get_or_create(&l).set(spend.usd);
            spend_tokens
                .get_or_create(&l)
                .set(i64::try_from(spend.tokens).unwrap_or(i64::MAX));
            if let Some(v) = usd {
                limit_usd.get_or_create(&l).set(v);
            }
            if let Some(v) = tokens {
                limit_tokens
                    .get_or_create(&l)
                    .set(i64::try_from(v).unwrap_or(i64::MAX));
            }
        }
    }

    let last_seq = Gauge::<i64>::default();
    reg.register(
        "mirror_last_event_seq",
        "The newest task event's sequence number",
        last_seq.clone(),
    );
    last_seq.set(reader.max_seq()?);
    let lag = Gauge::<f64, AtomicU64>::default();
    reg.register(
        "mirror_lag_seconds",
        "Age of the oldest transition not yet in PostgreSQL, as the local supervisor last saw it (0 without PostgreSQL)",
        lag.clone(),
    );
    let pg_connected = Gauge::<i64>::default();
    reg.register(
        "mirror_postgres_connected",
        "1 while the local supervisor's PostgreSQL writer holds a session (1 without PostgreSQL)",
        pg_connected.clone(),
    );
    pg_connected.set(1);
    if reader.is_local() && project.cfg.database.url.is_some() {
        let health: crate::mirror::postgres::Health =
            std::fs::read(project.layout.postgres_health())
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
        lag.set(health.lag_ms as f64 / 1000.0);
        pg_connected.set(i64::from(health.connected && !health.stalled));
    }

    let supervisors = Gauge::<i64>::default();
    reg.register("supervisors", "Supervisors alive", supervisors.clone());
    let problems = Gauge::<i64>::default();
    reg.register(
        "supervisor_problems",
        "Problems the live supervisors report now (a finish the disk refuses, say)",
        problems.clone(),
    );
    if reader.is_local() {
        let live = crate::instance::live_instances(&project.layout);
        supervisors.set(live.len() as i64);
        problems.set(
            live.iter()
                .map(|(_, p)| crate::instance::problems_of(p).lines().count() as i64)
                .sum(),
        );
    } else {
        supervisors.set(reader.supervisors()?.len() as i64);
    }

    // The cluster's gauges only when there is a cluster to read, and left out of a scrape that
    // cannot read it: a missing series says so, where a zero would claim every host gone.
    if let Some(Ok(view)) = project.cluster(state.database_url.as_deref()) {
        let alive = Gauge::<i64>::default();
        reg.register(
            "cluster_hosts_alive",
            "Hosts of the cluster that have not left and beat within one lease",
            alive.clone(),
        );
        alive.set(view.hosts.iter().filter(|h| h.alive).count() as i64);
        let leases = Family::<Labels, Gauge>::default();
        reg.register(
            "cluster_leases",
            "Leases each host of the cluster holds that have not run out",
            leases.clone(),
        );
        for h in &view.hosts {
            leases
                .get_or_create(&labels(&[("host", &h.name)]))
                .set(i64::from(h.leases));
        }
    }

    let mut text = String::new();
    encode(&mut text, &reg)?;
    Ok(state.redactor.redact_owned(text))
}
