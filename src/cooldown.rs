//! Agent cooldowns after rate limits and exhausted quotas.
//!
//! A rate-limited attempt is not the task's fault: the agent rests until the provider's reset time
//! (or an exponential back-off from `cooldown_seconds` when none was given) while its tasks go to the
//! next agent in the chain. Cooldowns are written to `state_dir/cooldowns.json` so `orchestrate
//! agents` and `status` can say until when, and a restarted supervisor honours them.
//!
//! It decides nothing about tasks: it only remembers which agents rest, and until when.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::fsutil;
use crate::layout::Layout;
use crate::record::Outcome;

/// Without `cooldown_seconds`, the first back-off.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(60);
/// The shortest cooldown, whatever the provider said.
pub const MIN_COOLDOWN: Duration = Duration::from_secs(1);
/// Rate limits in a row for which the provider's own retry-after is trusted as it is.
const FREE_STREAK: u32 = 3;
/// No back-off is longer, whatever the streak; a reset time from the provider may be.
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// A provider's reset time further out than this is taken as this (a bogus date must not park an
/// agent for a year).
pub const MAX_COOLDOWN: Duration = Duration::from_secs(7 * 86400);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Cooldown {
    /// RFC 3339, fixed width.
    pub until: String,
    pub outcome: Outcome,
    pub reason: String,
    /// Rate limits in a row without a success in between; drives the back-off.
    pub streak: u32,
}

#[derive(Debug, Default)]
pub struct Cooldowns {
    map: BTreeMap<String, Cooldown>,
    path: Option<PathBuf>,
}

impl Cooldowns {
    /// Load what an earlier run left; expired entries keep their streak until a success.
    pub fn load(layout: &Layout) -> Cooldowns {
        let path = layout.cooldowns();
        let map = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Cooldowns {
            map,
            path: Some(path),
        }
    }

    /// Read-only view for the CLI.
    pub fn read(layout: &Layout) -> BTreeMap<String, Cooldown> {
        Self::load(layout).map
    }

    /// Put `agent` into cooldown after a rate-limited attempt; returns when it ends.
    pub fn rate_limited(
        &mut self,
        agent: &str,
        outcome: Outcome,
        retry_after: Option<Duration>,
        base: Option<Duration>,
        reason: &str,
    ) -> OffsetDateTime {
        let streak = self.map.get(agent).map_or(0, |c| c.streak) + 1;
        let base = base.unwrap_or(DEFAULT_COOLDOWN);
        // The provider's time, but never less than a second, and once the limits keep coming
        // (a "retry-after: 0" that is not true) the back-off takes over: no hot loop.
        let wait = match retry_after {
            Some(d) if streak <= FREE_STREAK => d.max(MIN_COOLDOWN).min(MAX_COOLDOWN),
            Some(d) => d.max(backoff(base, streak - FREE_STREAK)).min(MAX_COOLDOWN),
            None => backoff(base, streak),
        };
        let until = OffsetDateTime::now_utc() + wait;
        self.map.insert(
            agent.to_string(),
            Cooldown {
                until: fsutil::fmt_time(until),
                outcome,
                reason: reason.to_string(),
                streak,
            },
        );
        self.save();
        until
    }

    /// A completed attempt: the agent's back-off starts over next time.
    pub fn succeeded(&mut self, agent: &str) {
        if self.map.remove(agent).is_some() {
            self.save();
        }
    }

    /// The agents cooling down now, with a reason naming the end.
    pub fn active(&self, now: OffsetDateTime) -> impl Iterator<Item = (&str, &Cooldown)> {
        self.map
            .iter()
            .filter(move |(_, c)| until_of(c).is_some_and(|u| u > now))
            .map(|(a, c)| (a.as_str(), c))
    }

    /// How long until the next cooldown ends, if one is running.
    pub fn next_end(&self, now: OffsetDateTime) -> Option<Duration> {
        self.active(now)
            .filter_map(|(_, c)| until_of(c))
            .min()
            .map(|u| (u - now).try_into().unwrap_or(Duration::ZERO))
    }

    fn save(&self) {
        let Some(path) = &self.path else { return };
        let body = serde_json::to_vec_pretty(&self.map).expect("cooldowns serialise");
        // Advisory state for the CLI: no fsync.
        if let Err(e) = fsutil::atomic_write_derived(path, &body) {
            crate::console::warn(&format!("cannot write {}: {e}", path.display()));
        }
    }
}

pub fn until_of(c: &Cooldown) -> Option<OffsetDateTime> {
    fsutil::parse_time(&c.until)
}

fn backoff(base: Duration, streak: u32) -> Duration {
    let factor = 2u32.saturating_pow(streak.saturating_sub(1).min(20));
    base.saturating_mul(factor)
        .min(MAX_BACKOFF)
        .max(base.min(MAX_BACKOFF))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn layout(dir: &Path) -> Layout {
        Layout::new(
            dir,
            Path::new("tasks"),
            Path::new("context"),
            Path::new("."),
        )
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let b = Duration::from_secs(30);
        assert_eq!(backoff(b, 1), Duration::from_secs(30));
        assert_eq!(backoff(b, 2), Duration::from_secs(60));
        assert_eq!(backoff(b, 3), Duration::from_secs(120));
        assert_eq!(backoff(b, 30), MAX_BACKOFF);
    }

    #[test]
    fn provider_time_wins_streak_grows_success_resets() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Cooldowns::load(&layout(dir.path()));
        let now = OffsetDateTime::now_utc();
        let until = c.rate_limited(
            "claude",
            Outcome::RateLimited,
            Some(Duration::from_secs(5)),
            None,
            "429",
        );
        assert!((until - now).whole_seconds() <= 6);
        c.rate_limited("claude", Outcome::RateLimited, None, None, "429");
        assert_eq!(c.map["claude"].streak, 2);
        assert_eq!(c.active(now).count(), 1);
        assert!(c.next_end(now).is_some());
        // Persisted for the CLI and the next start.
        assert_eq!(Cooldowns::read(&layout(dir.path()))["claude"].streak, 2);
        c.succeeded("claude");
        assert_eq!(c.active(now).count(), 0);
        assert!(Cooldowns::read(&layout(dir.path())).is_empty());
    }

    #[test]
    fn a_zero_retry_after_is_not_a_hot_loop() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Cooldowns::load(&layout(dir.path()));
        let base = Some(Duration::from_secs(10));
        let mut waits = vec![];
        for _ in 0..5 {
            let now = OffsetDateTime::now_utc();
            let until =
                c.rate_limited("a", Outcome::RateLimited, Some(Duration::ZERO), base, "429");
            waits.push((until - now).whole_seconds());
        }
        assert!(waits[..3].iter().all(|w| (1..=2).contains(w)), "{waits:?}");
        assert!(waits[3] >= 9 && waits[4] >= 19, "{waits:?}");
    }
}
