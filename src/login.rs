//! Agents that need a login.
//!
//! An attempt whose credentials were refused or missing (`auth`) is not the task's fault, and
//! another try on the same agent fails the same way: the agent is marked "needs login" and its
//! tasks go to the next agent in their chain (or wait, saying which agent needs a login). A mark is
//! like a cooldown without an end time. It goes away when something may have fixed the login: the
//! agent's configuration, environment or credential file changed (its fingerprint, see
//! `agents::login_fingerprint`), its CLI's own login check passes, the recheck interval passed (the
//! next task tries the agent again), or `orchestrate agents --reset NAME`. Marks are written to
//! `state_dir/needs_login.json` (durably: a restarted supervisor honours them until the fingerprint
//! changes), under a lock, read-modify-write, so supervisors sharing the tree and the CLI agree.
//!
//! It decides nothing about tasks and runs nothing: it remembers which agents need a login, why,
//! what to do about it and when to look again; the supervisor runs the checks.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::fsutil;
use crate::layout::Layout;

/// No wait between two looks at a logged-out agent is longer.
pub const MAX_RECHECK: Duration = Duration::from_secs(3600);

/// The commit points of a write of `needs_login.json` (see `failpoint::POINTS`).
const POINTS: [&str; 2] = ["needs_login.before_rename", "needs_login.after_rename"];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NeedsLogin {
    /// When the agent was marked (RFC 3339).
    pub since: String,
    /// What the agent said (the attempt's error: "Not logged in · Please run /login").
    pub reason: String,
    /// What a person can do about it ("run `claude` once to log in, or set ANTHROPIC_API_KEY").
    pub hint: String,
    /// The agent's login fingerprint when it was marked; another one clears the mark.
    pub fingerprint: String,
    /// Marks in a row without a completed attempt between: the recheck interval doubles with each.
    pub streak: u32,
    /// Login checks that found it still logged out since it was marked: the interval doubles too.
    #[serde(default)]
    pub checks: u32,
    /// When the agent is looked at again (its login check, or the next task tries it); `None`:
    /// only a change or a reset clears the mark.
    pub next_check: Option<String>,
    /// Set when the mark was lifted by a check or a retrial, with why; the entry stays (for the
    /// streak) until an attempt on the agent completes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifted: Option<String>,
}

impl NeedsLogin {
    /// The mark keeps tasks away from the agent (it was not lifted).
    pub fn active(&self) -> bool {
        self.lifted.is_none()
    }
}

/// The wait before the next look at an agent marked `streak` times in a row whose login checks
/// failed `checks` times since: `base`, doubling with each, at most [`MAX_RECHECK`].
pub fn recheck_after(base: Duration, streak: u32, checks: u32) -> Duration {
    let doublings = streak.saturating_sub(1).saturating_add(checks).min(20);
    base.saturating_mul(2u32.saturating_pow(doublings))
        .min(MAX_RECHECK.max(base))
}

#[derive(Debug, Default)]
pub struct Logins {
    map: BTreeMap<String, NeedsLogin>,
    path: Option<PathBuf>,
    lock: Option<PathBuf>,
}

fn read_map(path: &std::path::Path) -> BTreeMap<String, NeedsLogin> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

impl Logins {
    /// What earlier runs (and other supervisors sharing the tree) left.
    pub fn load(layout: &Layout) -> Logins {
        let path = layout.needs_login();
        Logins {
            map: read_map(&path),
            path: Some(path),
            lock: Some(layout.needs_login_lock()),
        }
    }

    /// Read-only view for the CLI.
    pub fn read(layout: &Layout) -> BTreeMap<String, NeedsLogin> {
        read_map(&layout.needs_login())
    }

    /// Take what the file says now: marks made or cleared by other supervisors or the CLI.
    pub fn refresh(&mut self) {
        if let Some(path) = &self.path {
            self.map = read_map(path);
        }
    }

    pub fn get(&self, agent: &str) -> Option<&NeedsLogin> {
        self.map.get(agent)
    }

    /// The agents that need a login now.
    pub fn active(&self) -> impl Iterator<Item = (&str, &NeedsLogin)> {
        self.map
            .iter()
            .filter(|(_, m)| m.active())
            .map(|(a, m)| (a.as_str(), m))
    }

    /// Marked agents whose next look is due at `now`.
    pub fn due(&self, now: OffsetDateTime) -> Vec<String> {
        self.active()
            .filter(|(_, m)| {
                m.next_check
                    .as_deref()
                    .and_then(fsutil::parse_time)
                    .is_some_and(|t| t <= now)
            })
            .map(|(a, _)| a.to_string())
            .collect()
    }

    /// Mark `agent`: its credentials were refused. `recheck` is the base interval of its looks
    /// (`None`: it is never looked at by itself). An agent already marked keeps its mark's start
    /// and streak (several of its attempts may fail at once); one marked again after its mark was
    /// lifted has a longer wait. Returns the mark as written.
    pub fn mark(
        &mut self,
        agent: &str,
        reason: &str,
        hint: &str,
        fingerprint: &str,
        recheck: Option<Duration>,
    ) -> NeedsLogin {
        let now = OffsetDateTime::now_utc();
        self.update(|map| {
            let mark = match map.get(agent) {
                Some(m) if m.active() => NeedsLogin {
                    reason: reason.to_string(),
                    hint: hint.to_string(),
                    fingerprint: fingerprint.to_string(),
                    ..m.clone()
                },
                old => {
                    let streak = old.map_or(0, |m| m.streak) + 1;
                    NeedsLogin {
                        since: fsutil::fmt_time(now),
                        reason: reason.to_string(),
                        hint: hint.to_string(),
                        fingerprint: fingerprint.to_string(),
                        streak,
                        checks: 0,
                        next_check: recheck
                            .map(|b| fsutil::fmt_time(now + recheck_after(b, streak, 0))),
                        lifted: None,
                    }
                }
            };
            map.insert(agent.to_string(), mark);
            true
        });
        self.map
            .get(agent)
            .cloned()
            .expect("the mark was just inserted")
    }

    /// A login check found `agent` still logged out: the next look is later.
    pub fn still_logged_out(&mut self, agent: &str, recheck: Duration) {
        let now = OffsetDateTime::now_utc();
        self.update(|map| {
            let Some(m) = map.get_mut(agent).filter(|m| m.active()) else {
                return false;
            };
            m.checks += 1;
            m.next_check = Some(fsutil::fmt_time(
                now + recheck_after(recheck, m.streak, m.checks),
            ));
            true
        });
    }

    /// Tasks may go to `agent` again (its login check passed, or the next task is to try it). The
    /// entry stays, so a mark that follows waits longer.
    pub fn lift(&mut self, agent: &str, why: &str) {
        let at = fsutil::now_rfc3339();
        self.update(|map| {
            let Some(m) = map.get_mut(agent).filter(|m| m.active()) else {
                return false;
            };
            m.lifted = Some(format!("{at}: {why}"));
            true
        });
    }

    /// Forget `agent`'s mark and streak: an attempt on it completed, or what its login depends on
    /// changed. Returns whether there was a mark that kept tasks away.
    pub fn forget(&mut self, agent: &str) -> bool {
        let mut was_active = false;
        self.update(|map| match map.remove(agent) {
            Some(m) => {
                was_active = m.active();
                true
            }
            None => false,
        });
        was_active
    }

    /// Change the file under its lock: read it (the truth, which other supervisors and the CLI
    /// write too), apply `change`, and write it back when `change` says it changed something. The
    /// write is durable: a restart must honour a mark. A failure to write is reported, and the
    /// change still holds in memory for this run.
    fn update(&mut self, change: impl FnOnce(&mut BTreeMap<String, NeedsLogin>) -> bool) {
        let (Some(path), Some(lock)) = (&self.path, &self.lock) else {
            change(&mut self.map);
            return;
        };
        let guard = lock_file(lock)
            .map_err(|e| crate::console::warn(&format!("cannot lock {}: {e}", lock.display())));
        let mut map = read_map(path);
        if change(&mut map) {
            let body = serde_json::to_vec_pretty(&map).expect("marks serialise");
            if let Err(e) = fsutil::atomic_write_at(path, &body, POINTS) {
                crate::console::warn(&format!("cannot write {}: {e}", path.display()));
            }
        }
        drop(guard);
        self.map = map;
    }
}

/// Clear `agent`'s mark (`orchestrate agents --reset`). Returns whether it had one that kept tasks
/// away. A running supervisor sees the cleared mark at its next heartbeat.
pub fn reset(layout: &Layout, agent: &str) -> std::io::Result<bool> {
    let path = layout.needs_login();
    let _guard = lock_file(&layout.needs_login_lock())?;
    let mut map = read_map(&path);
    let Some(m) = map.remove(agent) else {
        return Ok(false);
    };
    let body = serde_json::to_vec_pretty(&map).expect("marks serialise");
    fsutil::atomic_write_at(&path, &body, POINTS)?;
    Ok(m.active())
}

/// An exclusive lock on `path` (created if missing), held until the file is dropped.
fn lock_file(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    f.lock()?;
    Ok(f)
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
    fn the_recheck_interval_doubles_and_is_bounded() {
        let b = Duration::from_secs(300);
        assert_eq!(recheck_after(b, 1, 0), b);
        assert_eq!(recheck_after(b, 2, 0), Duration::from_secs(600));
        assert_eq!(recheck_after(b, 1, 2), Duration::from_secs(1200));
        assert_eq!(recheck_after(b, 9, 9), MAX_RECHECK);
        // A base longer than the cap is the user's choice.
        let long = Duration::from_secs(7200);
        assert_eq!(recheck_after(long, 3, 0), long);
    }

    #[test]
    fn a_mark_persists_lifts_and_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let l = layout(dir.path());
        let mut logins = Logins::load(&l);
        let base = Some(Duration::from_secs(300));
        let m = logins.mark("claude", "Not logged in", "run `claude`", "f1", base);
        assert_eq!((m.streak, m.checks, m.active()), (1, 0, true));
        // Persisted for the CLI and the next start.
        let read = Logins::read(&l);
        assert_eq!(read["claude"].reason, "Not logged in");
        assert!(read["claude"].next_check.is_some());
        assert_eq!(Logins::load(&l).active().count(), 1);
        // A second failure while marked keeps the mark's start and streak.
        let again = logins.mark("claude", "401", "run `claude`", "f1", base);
        assert_eq!((again.since.as_str(), again.streak), (m.since.as_str(), 1));
        // Nothing is due before its time; a failed check pushes the next look out.
        assert!(logins.due(OffsetDateTime::now_utc()).is_empty());
        let later = OffsetDateTime::now_utc() + Duration::from_secs(301);
        assert_eq!(logins.due(later), ["claude"]);
        logins.still_logged_out("claude", Duration::from_secs(300));
        assert!(logins.due(later).is_empty());
        assert_eq!(logins.get("claude").map(|m| m.checks), Some(1));
        // Lifted: no longer active, but the next mark waits longer.
        logins.lift("claude", "login check passed");
        assert_eq!(logins.active().count(), 0);
        assert!(Logins::read(&l)["claude"].lifted.is_some());
        let third = logins.mark("claude", "Not logged in", "run `claude`", "f1", base);
        assert_eq!(third.streak, 2);
        // A completed attempt forgets it all.
        assert!(logins.forget("claude"));
        assert!(Logins::read(&l).is_empty());
        assert!(!logins.forget("claude"));
    }

    #[test]
    fn a_reset_or_another_writer_is_seen_on_refresh() {
        let dir = tempfile::tempdir().unwrap();
        let l = layout(dir.path());
        let mut mine = Logins::load(&l);
        let mut theirs = Logins::load(&l);
        mine.mark("a", "401", "h", "f", None);
        theirs.mark("b", "401", "h", "f", None);
        // Read-modify-write: the second writer kept the first one's mark.
        assert_eq!(Logins::read(&l).len(), 2);
        mine.refresh();
        assert_eq!(mine.active().count(), 2);
        assert!(reset(&l, "a").unwrap());
        assert!(!reset(&l, "a").unwrap());
        mine.refresh();
        assert_eq!(mine.active().map(|(a, _)| a).collect::<Vec<_>>(), ["b"]);
        // Without a recheck interval nothing is ever due by itself.
        let far = OffsetDateTime::now_utc() + Duration::from_secs(86400 * 365);
        assert!(mine.due(far).is_empty());
    }
}
