//! Live reload of `config.yaml`: the file is looked at every second (a stat), and once more before a
//! task is failed for naming an agent the running configuration does not know (`add --agent new`
//! right after the agent was added must not lose the race with the next look).
//!
//! A valid change applies to everything that starts afterwards (agents, limits, routing, timeouts,
//! environment rules, context settings, the settle and heartbeat periods, the log level); attempts
//! already running keep the configuration they started with. What cannot change under a running
//! supervisor — its folders, the PostgreSQL mirror, the rescan period — keeps its running value, and
//! the console says a restart applies it. An invalid file is refused with its error, and the running
//! configuration stays; so does a deleted one.
//!
//! Owns the file's last seen signature and the decision of what a change means. It never touches
//! tasks or the spool: the loop swaps the configuration it returns.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::config::Config;
use crate::console;
use crate::redact::Redactor;

/// How often the file is looked at (one stat).
pub(super) const CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// (`section.key`, what happened to it).
type Change = (String, String);

/// (size, mtime in ns, inode): a file that keeps these was not written.
type Sig = Option<(u64, i128, u64)>;

fn sig_of(path: &Path) -> Sig {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| {
        (
            m.len(),
            m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
            m.ino(),
        )
    })
}

pub(super) struct ConfigFile {
    path: PathBuf,
    seen: Sig,
}

/// What a changed file means for the running supervisor.
pub(super) struct Reload {
    /// The configuration to run with from now on (what needs a restart kept at its running value).
    pub(super) cfg: Config,
    /// `section.key` paths whose value changed and now apply, each with old → new where short.
    pub(super) applied: Vec<String>,
    /// `section.key` paths that changed but apply only at the next start.
    pub(super) on_restart: Vec<String>,
}

/// Keys read once at start: the folders (the spool, watcher and databases are built on them), the
/// PostgreSQL mirror, and the watcher's rescan ticker.
const RESTART_ONLY: &[&str] = &[
    "orchestrator.tasks_dir",
    "orchestrator.context_dir",
    "orchestrator.state_dir",
    "orchestrator.rescan_seconds",
    "database",
    // The cluster link is joined once, at start, with these settings.
    "cluster",
];

impl ConfigFile {
    pub(super) fn new(path: PathBuf) -> ConfigFile {
        let seen = sig_of(&path);
        ConfigFile { path, seen }
    }

    /// If the file changed since it was last seen: the reload it calls for, or `None` when it is
    /// unchanged, gone or invalid (said on the console once per change).
    pub(super) fn check(&mut self, running: &Config, redactor: &Redactor) -> Option<Reload> {
        let now = sig_of(&self.path);
        if now == self.seen {
            return None;
        }
        self.seen = now;
        let name = self.path.display();
        if now.is_none() {
            // `Config::load` would fall back to the built-in default: never for a running supervisor.
            console::warn(&format!(
                "{name} is gone; keeping the running configuration"
            ));
            return None;
        }
        let new = match Config::load(&self.path) {
            Ok(c) => c,
            Err(e) => {
                console::warn(&redactor.redact(&format!(
                    "{name} changed but is not valid; keeping the running configuration: {e}"
                )));
                return None;
            }
        };
        let reload = plan(running, new);
        if reload.applied.is_empty() && reload.on_restart.is_empty() {
            return None;
        }
        let mut line = format!("{name} reloaded");
        if !reload.applied.is_empty() {
            line.push_str(&format!(": {}", reload.applied.join(", ")));
        }
        if !reload.on_restart.is_empty() {
            line.push_str(&format!(
                "; needs a restart to apply (running value kept): {}",
                reload.on_restart.join(", ")
            ));
        }
        console::info(&redactor.redact(&line));
        for n in &reload.cfg.notes {
            console::info(&format!("note: {n}"));
        }
        Some(reload)
    }
}

/// What `new` changes relative to `running`, with the keys that need a restart put back to their
/// running values. Pure.
pub(super) fn plan(running: &Config, mut new: Config) -> Reload {
    let old = serde_json::to_value(running).unwrap_or(Value::Null);
    let fresh = serde_json::to_value(&new).unwrap_or(Value::Null);
    let mut changed = vec![];
    diff("", &old, &fresh, &mut changed);
    let (on_restart, applied): (Vec<Change>, Vec<Change>) =
        changed.into_iter().partition(|(path, _)| {
            RESTART_ONLY
                .iter()
                .any(|k| path == k || path.starts_with(&format!("{k}.")))
        });
    if !on_restart.is_empty() {
        new.orchestrator.tasks_dir = running.orchestrator.tasks_dir.clone();
        new.orchestrator.context_dir = running.orchestrator.context_dir.clone();
        new.orchestrator.state_dir = running.orchestrator.state_dir.clone();
        new.orchestrator.rescan_seconds = running.orchestrator.rescan_seconds;
        new.database = running.database.clone();
        new.cluster = running.cluster.clone();
    }
    let texts = |v: Vec<Change>| {
        let mut t: Vec<String> = v.into_iter().map(|(_, text)| text).collect();
        t.sort();
        t
    };
    Reload {
        cfg: new,
        applied: texts(applied),
        on_restart: texts(on_restart),
    }
}

/// The paths where `a` and `b` differ, each with a text saying how: `agents.x added`,
/// `orchestrator.max_concurrent 4 → 8`. Maps are walked; anything else is compared whole.
fn diff(path: &str, a: &Value, b: &Value, out: &mut Vec<Change>) {
    if a == b {
        return;
    }
    let join = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, va) in x {
                match y.get(k) {
                    Some(vb) => diff(&join(k), va, vb, out),
                    None => out.push((join(k), format!("{} removed", join(k)))),
                }
            }
            for k in y.keys().filter(|k| !x.contains_key(*k)) {
                out.push((join(k), format!("{} added", join(k))));
            }
        }
        _ => {
            let (sa, sb) = (short(a), short(b));
            let text = if sa.len() + sb.len() <= 60 {
                format!("{path} {sa} → {sb}")
            } else {
                format!("{path} changed")
            };
            out.push((path.to_string(), text));
        }
    }
}

fn short(v: &Value) -> String {
    match v {
        Value::Null => "(none)".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> Config {
        Config::parse(text, "config.yaml").expect("valid config")
    }

    const BASE: &str = "orchestrator: {max_concurrent: 2}\nagents:\n  a: {kind: command, command: sh}\nrouting: {fallback: [a]}\n";

    #[test]
    fn an_added_agent_and_a_new_limit_apply() {
        let new = cfg(&format!(
            "{}\n",
            BASE.replace("max_concurrent: 2", "max_concurrent: 8")
                .replace(
                    "  a: {kind: command, command: sh}",
                    "  a: {kind: command, command: sh}\n  echoer: {kind: command, command: echo}"
                )
        ));
        let r = plan(&cfg(BASE), new);
        assert_eq!(
            r.applied,
            vec!["agents.echoer added", "orchestrator.max_concurrent 2 → 8"]
        );
        assert!(r.on_restart.is_empty());
        assert!(r.cfg.agents.contains_key("echoer"));
        assert_eq!(r.cfg.orchestrator.max_concurrent, 8);
    }

    #[test]
    fn folders_and_the_database_keep_their_running_values() {
        let new = cfg(&BASE.replace(
            "orchestrator: {max_concurrent: 2}",
            "orchestrator: {max_concurrent: 3, tasks_dir: elsewhere, rescan_seconds: 5}\ndatabase: {url: \"postgres://u@h/d\"}",
        ));
        let running = cfg(BASE);
        let r = plan(&running, new);
        assert_eq!(r.applied, vec!["orchestrator.max_concurrent 2 → 3"]);
        assert_eq!(
            r.on_restart,
            vec![
                "database.url (none) → postgres://u@h/d",
                "orchestrator.rescan_seconds 30 → 5",
                "orchestrator.tasks_dir ./tasks → elsewhere"
            ]
        );
        assert_eq!(r.cfg.orchestrator.tasks_dir, running.orchestrator.tasks_dir);
        assert_eq!(r.cfg.orchestrator.rescan_seconds, 30);
        assert!(r.cfg.database.url.is_none());
        assert_eq!(r.cfg.orchestrator.max_concurrent, 3);
    }

    #[test]
    fn the_cluster_settings_keep_their_running_values() {
        let running = cfg(BASE);
        let new = cfg(&format!(
            "{BASE}cluster: {{max_concurrent: 5, lease_seconds: 60}}\n"
        ));
        let r = plan(&running, new);
        assert_eq!(
            r.on_restart,
            vec![
                "cluster.lease_seconds 30 → 60",
                "cluster.max_concurrent (none) → 5"
            ]
        );
        assert_eq!(r.cfg.cluster.lease_seconds, 30);
        assert_eq!(r.cfg.cluster.max_concurrent, None);
    }

    #[test]
    fn an_invalid_or_deleted_file_keeps_the_running_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, BASE).unwrap();
        let running = cfg(BASE);
        let mut file = ConfigFile::new(path.clone());
        assert!(
            file.check(&running, &Redactor::none()).is_none(),
            "unchanged"
        );
        std::fs::write(&path, "agents: [unclosed\n").unwrap();
        assert!(file.check(&running, &Redactor::none()).is_none(), "invalid");
        std::fs::remove_file(&path).unwrap();
        assert!(file.check(&running, &Redactor::none()).is_none(), "gone");
        std::fs::write(
            &path,
            BASE.replace("max_concurrent: 2", "max_concurrent: 5"),
        )
        .unwrap();
        let r = file
            .check(&running, &Redactor::none())
            .expect("a valid change");
        assert_eq!(r.cfg.orchestrator.max_concurrent, 5);
        assert!(file.check(&running, &Redactor::none()).is_none(), "seen");
    }
}
