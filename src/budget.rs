//! Spending limits: what each agent, and all agents together, spent in the current day and month of
//! `orchestrator.timezone`, against the `budget` keys of `config.yaml`.
//!
//! Spend is summed from the attempts the records hold (each attempt records its cost and tokens).
//! The supervisor loads them at start from the mirror, which start-up has just brought in line with
//! the tree, and adds each attempt as it finishes, once per (task, attempt number): a restart
//! neither forgets nor counts twice. `orchestrate agents`, `status`, the API and `/metrics` build the
//! same sums from the mirror's rows.
//!
//! It decides nothing about tasks: it says which agents are over a limit, in words a person reads
//! ("budget: $20.00 of $20.00 today, resets at 00:00 UTC"), and when that ends. Running attempts are
//! none of its business: a limit stops new attempts only.

use std::collections::{BTreeMap, HashSet};

use time::{Date, Month, OffsetDateTime, Time, UtcOffset};

use crate::config::{Budget, Config, zone_label};
use crate::fsutil;

/// A window a limit counts over, in the configured time zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// From midnight to midnight.
    Day,
    /// From the first of the month at midnight to the first of the next.
    Month,
}

impl Window {
    pub fn as_str(self) -> &'static str {
        match self {
            Window::Day => "day",
            Window::Month => "month",
        }
    }
}

/// Where `now` falls: the start and the end of its window, as instants.
pub fn window(now: OffsetDateTime, zone: UtcOffset, w: Window) -> (OffsetDateTime, OffsetDateTime) {
    let local = now.to_offset(zone);
    let day = local.date();
    let (start, end) = match w {
        Window::Day => (day, day.next_day().unwrap_or(Date::MAX)),
        Window::Month => {
            let first = day.replace_day(1).unwrap_or(day);
            let next = match first.month() {
                Month::December => Date::from_calendar_date(first.year() + 1, Month::January, 1),
                m => Date::from_calendar_date(first.year(), m.next(), 1),
            }
            .unwrap_or(Date::MAX);
            (first, next)
        }
    };
    let at = |d: Date| d.with_time(Time::MIDNIGHT).assume_offset(zone);
    (at(start), at(end))
}

/// Money and tokens spent.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Spend {
    pub usd: f64,
    /// Input plus output tokens.
    pub tokens: u64,
}

impl Spend {
    fn add(&mut self, usd: f64, tokens: u64) {
        self.usd += usd;
        self.tokens = self.tokens.saturating_add(tokens);
    }
}

/// An amount of US dollars as reasons say it: cents (`20.00`), or as many decimals as a smaller
/// amount needs, up to six (`0.0003`, `0.000185`).
pub fn usd(v: f64) -> String {
    let cents = v * 100.0;
    if v.abs() >= 100.0 || (cents - cents.round()).abs() < 1e-6 {
        return format!("{v:.2}");
    }
    let s = format!("{v:.6}");
    let s = s.trim_end_matches('0');
    // Two decimals at least: `0.50`, not `0.5`.
    match s.split_once('.') {
        Some((_, d)) if d.len() < 2 => format!("{v:.2}"),
        _ => s.to_string(),
    }
}

/// A limit that is reached: why, in a person's words, and when its window ends.
#[derive(Debug, Clone, PartialEq)]
pub struct Reached {
    pub reason: String,
    pub resets_at: OffsetDateTime,
}

/// Whether `limits` are reached by `day` and `month` spend at `now`. Of several reached limits the
/// one that lasts longest is named: it is the one that decides when work resumes.
pub fn reached(
    limits: &Budget,
    day: Spend,
    month: Spend,
    now: OffsetDateTime,
    zone: UtcOffset,
) -> Option<Reached> {
    let mut found: Option<Reached> = None;
    for (w, spend, usd_limit, tokens) in [
        (Window::Day, day, limits.daily_usd, limits.daily_tokens),
        (
            Window::Month,
            month,
            limits.monthly_usd,
            limits.monthly_tokens,
        ),
    ] {
        let (_, end) = window(now, zone, w);
        let what = match (usd_limit, tokens) {
            (Some(l), _) if spend.usd >= l => format!("${} of ${}", usd(spend.usd), usd(l)),
            (_, Some(l)) if spend.tokens >= l => format!("{} of {l} tokens", spend.tokens),
            _ => continue,
        };
        let local = end.to_offset(zone);
        let label = zone_label(zone);
        let reason = match w {
            Window::Day => format!(
                "budget: {what} today, resets at {:02}:{:02} {label}",
                local.hour(),
                local.minute()
            ),
            Window::Month => format!(
                "budget: {what} this month, resets at {} 00:00 {label}",
                local.date()
            ),
        };
        // On the last day of a month both end together: the month says more.
        if found.as_ref().is_none_or(|f| end >= f.resets_at) {
            found = Some(Reached {
                reason,
                resets_at: end,
            });
        }
    }
    found
}

/// A reason of `orchestrator.budget`, as an agent it pauses says it.
pub fn global_reason(reason: &str) -> String {
    match reason.strip_prefix("budget: ") {
        Some(rest) => format!("budget of all agents (orchestrator.budget): {rest}"),
        None => reason.to_string(),
    }
}

/// What a task's `attempts` cost together, and its `max_cost_usd`, when that is set and reached.
pub fn task_spent<'a>(
    max_cost_usd: Option<f64>,
    attempts: impl IntoIterator<Item = &'a crate::record::Attempt>,
) -> Option<(f64, f64)> {
    let max = max_cost_usd?;
    let spent: f64 = attempts.into_iter().filter_map(|a| a.cost_usd).sum();
    (spent >= max).then_some((spent, max))
}

/// One attempt's spend, as the records hold it.
#[derive(Debug, Clone)]
struct Entry {
    agent: String,
    at: OffsetDateTime,
    usd: f64,
    tokens: u64,
}

/// The attempts of the current month (and any later, should a clock have jumped), with the
/// attempts already counted.
#[derive(Debug, Default)]
pub struct Ledger {
    seen: HashSet<(String, u32)>,
    entries: Vec<Entry>,
}

/// Who a limit is over: one agent, or all of them together (`orchestrator.budget`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    All,
    Agent(String),
}

impl Ledger {
    /// Count attempt `n` of `task`, finished at `finished_at` (RFC 3339) on `agent`; an attempt
    /// already counted, or one without a finish time, is not counted again. `true` when counted.
    #[allow(clippy::too_many_arguments)]
    pub fn add(
        &mut self,
        task: &str,
        n: u32,
        agent: &str,
        finished_at: Option<&str>,
        usd: Option<f64>,
        input_tokens: Option<u64>,
        output_tokens: Option<u64>,
    ) -> bool {
        let Some(at) = finished_at.and_then(fsutil::parse_time) else {
            return false;
        };
        let usd = usd.filter(|c| c.is_finite() && *c > 0.0).unwrap_or(0.0);
        let tokens = input_tokens
            .unwrap_or(0)
            .saturating_add(output_tokens.unwrap_or(0));
        if !self.seen.insert((task.to_string(), n)) {
            return false;
        }
        self.entries.push(Entry {
            agent: agent.to_string(),
            at,
            usd,
            tokens,
        });
        true
    }

    /// What `agent` (`None`: every agent) spent in `now`'s window.
    pub fn spent(
        &self,
        agent: Option<&str>,
        w: Window,
        now: OffsetDateTime,
        zone: UtcOffset,
    ) -> Spend {
        let (start, end) = window(now, zone, w);
        let mut s = Spend::default();
        for e in &self.entries {
            if e.at >= start && e.at < end && agent.is_none_or(|a| a == e.agent) {
                s.add(e.usd, e.tokens);
            }
        }
        s
    }

    /// Forget attempts before `now`'s month: no window counts them any more. Their ids stay
    /// known, so a record read again is not counted again.
    pub fn prune(&mut self, now: OffsetDateTime, zone: UtcOffset) {
        let (start, _) = window(now, zone, Window::Month);
        self.entries.retain(|e| e.at >= start);
    }

    /// Every limit of `cfg` that is reached at `now`: per agent, and `orchestrator.budget` over all.
    pub fn reached(&self, cfg: &Config, now: OffsetDateTime) -> BTreeMap<Scope, Reached> {
        let zone = cfg.orchestrator.zone();
        let mut out = BTreeMap::new();
        let mut check = |scope: Scope, agent: Option<&str>, limits: &Budget| {
            let day = self.spent(agent, Window::Day, now, zone);
            let month = self.spent(agent, Window::Month, now, zone);
            if let Some(r) = reached(limits, day, month, now, zone) {
                out.insert(scope, r);
            }
        };
        if let Some(b) = &cfg.orchestrator.budget {
            check(Scope::All, None, b);
        }
        for (name, a) in &cfg.agents {
            if let Some(b) = &a.budget {
                check(Scope::Agent(name.clone()), Some(name), b);
            }
        }
        out
    }
}

/// Spend against limits, as `orchestrate agents`, `status`, the API and `/metrics` show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Standing {
    pub today: Spend,
    pub this_month: Spend,
    pub limits: Budget,
    /// Set while a limit is reached: the reason and, as RFC 3339, when it resets.
    pub paused: Option<String>,
    pub resets_at: Option<String>,
}

impl Ledger {
    /// The standing of `agent` (`None`: all agents, against `orchestrator.budget`).
    pub fn standing(&self, cfg: &Config, agent: Option<&str>, now: OffsetDateTime) -> Standing {
        let zone = cfg.orchestrator.zone();
        let limits = match agent {
            Some(a) => cfg.agents.get(a).and_then(|a| a.budget),
            None => cfg.orchestrator.budget,
        }
        .unwrap_or_default();
        let today = self.spent(agent, Window::Day, now, zone);
        let this_month = self.spent(agent, Window::Month, now, zone);
        // An agent within its own limits is paused all the same by the limit over all agents.
        let r = reached(&limits, today, this_month, now, zone).or_else(|| {
            let all = cfg.orchestrator.budget.filter(|_| agent.is_some())?;
            let day = self.spent(None, Window::Day, now, zone);
            let month = self.spent(None, Window::Month, now, zone);
            reached(&all, day, month, now, zone).map(|r| Reached {
                reason: global_reason(&r.reason),
                ..r
            })
        });
        Standing {
            today,
            this_month,
            limits,
            resets_at: r.as_ref().map(|r| fsutil::fmt_time(r.resets_at)),
            paused: r.map(|r| r.reason),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_zone;
    use time::macros::{datetime, offset};

    #[test]
    fn a_day_runs_from_midnight_to_midnight_in_the_zone() {
        let now = datetime!(2026-11-30 23:30 UTC);
        assert_eq!(
            window(now, UtcOffset::UTC, Window::Day),
            (
                datetime!(2026-11-30 0:00 UTC),
                datetime!(2026-12-01 0:00 UTC)
            )
        );
        // 23:30 UTC is already tomorrow at +02:00.
        let (start, end) = window(now, offset!(+2), Window::Day);
        assert_eq!(start, datetime!(2026-12-01 0:00 +2));
        assert_eq!(end, datetime!(2026-12-02 0:00 +2));
        assert_eq!(start, datetime!(2026-11-30 22:00 UTC));
        // And still yesterday at -05:00.
        let (start, _) = window(datetime!(2026-12-01 03:00 UTC), offset!(-5), Window::Day);
        assert_eq!(start, datetime!(2026-11-30 0:00 -5));
    }

    #[test]
    fn a_month_ends_on_the_first_including_december_and_february() {
        let (s, e) = window(
            datetime!(2026-12-31 12:00 UTC),
            UtcOffset::UTC,
            Window::Month,
        );
        assert_eq!(
            (s, e),
            (
                datetime!(2026-12-01 0:00 UTC),
                datetime!(2027-01-01 0:00 UTC)
            )
        );
        let (s, e) = window(
            datetime!(2028-02-29 23:59 UTC),
            UtcOffset::UTC,
            Window::Month,
        );
        assert_eq!(
            (s, e),
            (
                datetime!(2028-02-01 0:00 UTC),
                datetime!(2028-03-01 0:00 UTC)
            )
        );
        // The last evening of January UTC is February at +09:00.
        let (s, _) = window(datetime!(2027-01-31 20:00 UTC), offset!(+9), Window::Month);
        assert_eq!(s, datetime!(2027-02-01 0:00 +9));
    }

    #[test]
    fn zones_parse_and_bad_ones_say_what_works() {
        assert_eq!(parse_zone("UTC"), Ok(UtcOffset::UTC));
        assert_eq!(parse_zone("Z"), Ok(UtcOffset::UTC));
        assert_eq!(parse_zone("+02:00"), Ok(offset!(+2)));
        assert_eq!(parse_zone("-05:30"), Ok(offset!(-5:30)));
        assert_eq!(parse_zone("UTC+01:00"), Ok(offset!(+1)));
        assert_eq!(parse_zone("+9"), Ok(offset!(+9)));
        for bad in ["Europe/Berlin", "+25:00", "+02:75", "", "2"] {
            let e = parse_zone(bad).expect_err(bad);
            assert!(e.contains("fixed offset such as +02:00"), "{e}");
        }
        assert_eq!(zone_label(offset!(+2)), "+02:00");
        assert_eq!(zone_label(offset!(-5:30)), "-05:30");
        assert_eq!(zone_label(UtcOffset::UTC), "UTC");
    }

    fn limits(daily_usd: Option<f64>, monthly_tokens: Option<u64>) -> Budget {
        Budget {
            daily_usd,
            monthly_tokens,
            ..Budget::default()
        }
    }

    #[test]
    fn a_reached_limit_names_spend_limit_and_reset() {
        let now = datetime!(2026-11-30 15:00 UTC);
        let day = Spend {
            usd: 20.0,
            tokens: 10,
        };
        let r = reached(&limits(Some(20.0), None), day, day, now, UtcOffset::UTC).expect("reached");
        assert_eq!(
            r.reason,
            "budget: $20.00 of $20.00 today, resets at 00:00 UTC"
        );
        assert_eq!(r.resets_at, datetime!(2026-12-01 0:00 UTC));
        // Under the limit: nothing.
        let under = Spend {
            usd: 19.99,
            tokens: 10,
        };
        assert_eq!(
            reached(&limits(Some(20.0), None), under, under, now, UtcOffset::UTC),
            None
        );
        // The month's limit lasts longer than the day's: it is the one named.
        let r = reached(&limits(Some(1.0), Some(10)), day, day, now, offset!(+2)).expect("reached");
        assert_eq!(
            r.reason,
            "budget: 10 of 10 tokens this month, resets at 2026-12-01 00:00 +02:00"
        );
        assert_eq!(r.resets_at, datetime!(2026-11-30 22:00 UTC));
    }

    #[test]
    fn amounts_show_cents_or_the_decimals_a_small_one_needs() {
        assert_eq!(usd(20.0), "20.00");
        assert_eq!(usd(36.0), "36.00");
        assert_eq!(usd(0.5), "0.50");
        assert_eq!(usd(19.999), "19.999");
        assert_eq!(usd(0.0003), "0.0003");
        assert_eq!(usd(0.0001846), "0.000185");
        assert_eq!(usd(1234.5678), "1234.57");
    }

    #[test]
    fn the_ledger_counts_each_attempt_once_in_its_windows() {
        let mut l = Ledger::default();
        let zone = UtcOffset::UTC;
        assert!(l.add(
            "t1",
            1,
            "claude",
            Some("2026-11-30T10:00:00.000Z"),
            Some(1.5),
            Some(100),
            Some(20)
        ));
        // The same attempt again (a restart reading the records): not counted twice.
        assert!(!l.add(
            "t1",
            1,
            "claude",
            Some("2026-11-30T10:00:00.000Z"),
            Some(1.5),
            Some(100),
            Some(20)
        ));
        assert!(l.add(
            "t1",
            2,
            "claude",
            Some("2026-11-29T10:00:00.000Z"),
            Some(2.0),
            None,
            None
        ));
        assert!(l.add(
            "t2",
            1,
            "codex",
            Some("2026-11-30T11:00:00.000Z"),
            None,
            Some(5),
            Some(5)
        ));
        // Unfinished: nothing to count.
        assert!(!l.add("t3", 1, "codex", None, Some(9.0), None, None));
        let now = datetime!(2026-11-30 12:00 UTC);
        assert_eq!(
            l.spent(Some("claude"), Window::Day, now, zone),
            Spend {
                usd: 1.5,
                tokens: 120
            }
        );
        assert_eq!(
            l.spent(Some("claude"), Window::Month, now, zone),
            Spend {
                usd: 3.5,
                tokens: 120
            }
        );
        assert_eq!(
            l.spent(None, Window::Day, now, zone),
            Spend {
                usd: 1.5,
                tokens: 130
            }
        );
        // Next month: nothing spent, and pruning keeps the ids.
        let later = datetime!(2026-12-01 0:00 UTC);
        l.prune(later, zone);
        assert_eq!(l.spent(None, Window::Month, later, zone), Spend::default());
        assert!(!l.add(
            "t1",
            1,
            "claude",
            Some("2026-11-30T10:00:00.000Z"),
            Some(1.5),
            None,
            None
        ));
    }
}
