//! The `cluster` key of `config.yaml`: whether this supervisor shares one queue in PostgreSQL with
//! other hosts, under which name, with which labels and leases.
//!
//! Everything is checked here, once, with errors naming the key (`cluster.lease_seconds`); the
//! supervisor's cluster part never parses a value again. Nothing here connects to a database.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Share the queue in `database.url` with other hosts (needs `database.url`).
    pub enabled: bool,
    /// This host's name, unique in the cluster; the machine's host name when unset.
    pub host: Option<String>,
    /// What this host offers: a task's `requires` labels must all be among them.
    pub labels: Vec<String>,
    /// How long a claim holds a task without a renewal; a dead host's tasks go to others after it
    /// (plus one heartbeat). Renewed every third of it.
    pub lease_seconds: u64,
    /// How often this host asks the queue for work when no wake-up came (milliseconds).
    pub poll_ms: u64,
    /// How many tasks may run at once across all hosts (each host's own
    /// `orchestrator.max_concurrent` holds too); unset: no limit beyond the hosts' own. Every
    /// host should set the same value: each claim honours the claimer's.
    pub max_concurrent: Option<u32>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            enabled: false,
            host: None,
            labels: vec![],
            lease_seconds: 30,
            poll_ms: 1000,
            max_concurrent: None,
        }
    }
}

impl ClusterConfig {
    /// How often a running lease is renewed: a third of the lease, so two renewals may be lost
    /// before it runs out.
    pub fn heartbeat(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.lease_seconds * 1000 / 3)
    }

    pub(super) fn check(&self, database_url: Option<&str>) -> Result<(), (String, String)> {
        if !self.enabled {
            return Ok(());
        }
        if database_url.is_none() {
            return Err((
                "cluster.enabled".into(),
                "cluster mode needs `database.url`: PostgreSQL holds the shared queue".into(),
            ));
        }
        if let Some(h) = &self.host
            && (h.trim().is_empty() || h.len() > 255 || h.chars().any(char::is_whitespace))
        {
            return Err((
                "cluster.host".into(),
                format!("`{h}` is not a host name: 1 to 255 characters, no spaces"),
            ));
        }
        for (i, l) in self.labels.iter().enumerate() {
            if !crate::task::valid_name(l) {
                return Err((
                    format!("cluster.labels[{i}]"),
                    format!("`{l}`: labels may use letters, digits, `.`, `_` and `-` only"),
                ));
            }
        }
        if self.lease_seconds < 3 {
            return Err((
                "cluster.lease_seconds".into(),
                "must be at least 3 (a lease is renewed every third of it)".into(),
            ));
        }
        if self.poll_ms == 0 {
            return Err(("cluster.poll_ms".into(), "must be at least 1".into()));
        }
        if self.max_concurrent == Some(0) {
            return Err((
                "cluster.max_concurrent".into(),
                "must be at least 1 (leave it out for no cluster-wide limit)".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::ClusterConfig;

    fn on(yaml: &str) -> ClusterConfig {
        let mut c: ClusterConfig =
            serde_saphyr::from_str_with_options(yaml, crate::yaml::options()).expect("parses");
        c.enabled = true;
        c
    }

    #[test]
    fn each_bad_value_is_named_by_its_key() {
        let url = Some("postgres://u@h/d");
        let cases = [
            ("host: \"two words\"", "cluster.host"),
            ("labels: [gpu, \"no/slash\"]", "cluster.labels[1]"),
            ("lease_seconds: 2", "cluster.lease_seconds"),
            ("poll_ms: 0", "cluster.poll_ms"),
            ("max_concurrent: 0", "cluster.max_concurrent"),
        ];
        for (yaml, key) in cases {
            let (k, why) = on(yaml).check(url).expect_err(yaml);
            assert_eq!(k, key, "{yaml}: {why}");
        }
        let (k, _) = on("{}").check(None).expect_err("no database");
        assert_eq!(k, "cluster.enabled");
        assert!(on("max_concurrent: 4\nlabels: [gpu]").check(url).is_ok());
    }
}
