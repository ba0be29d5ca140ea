//! The one [`Redactor`]: replaces the values of secret environment variables with `***`.
//!
//! It is built once, from [`crate::config::Config::secret_names`] (every `security.secrets` entry,
//! every agent's `api_key_env`, and the conventional key variable of each configured agent kind),
//! and handed as a value to whoever writes: the spool's records, agent logs and outputs, state
//! files and both databases' payloads. There is no process-wide copy, so no writer can end up with
//! a narrower list than another.
//!
//! It never reads files and never logs; cloning it is cheap, and clones share their values: when a
//! reloaded configuration names more secrets, [`Redactor::widen`] on any clone widens them all. The
//! list only grows while a supervisor runs; a value once secret stays redacted.

use std::sync::{Arc, RwLock};

/// Replaces secret values with `***`. Cheap to clone; clones share one list.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    /// Longest first, so a secret containing another is replaced whole.
    secrets: Arc<RwLock<Arc<[String]>>>,
}

/// Longest first (ties by value, so duplicates meet and go).
fn ordered(mut secrets: Vec<String>) -> Arc<[String]> {
    secrets.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    secrets.dedup();
    secrets.into()
}

impl Redactor {
    /// The current values of the environment variables `names`. Very short values are skipped:
    /// redacting "1" everywhere would destroy the output and protect nothing.
    pub fn from_env<S: AsRef<str>>(names: &[S]) -> Redactor {
        Redactor::from_values(names.iter().filter_map(|n| std::env::var(n.as_ref()).ok()))
    }

    /// A redactor for these values (the environment is not read).
    pub fn from_values(values: impl IntoIterator<Item = String>) -> Redactor {
        let secrets: Vec<String> = values.into_iter().filter(|v| v.len() >= 4).collect();
        Redactor {
            secrets: Arc::new(RwLock::new(ordered(secrets))),
        }
    }

    /// The list as it is now (a reload may widen it at any time).
    fn secrets(&self) -> Arc<[String]> {
        self.secrets
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Add `more`'s values to this redactor and every clone of it. Whether it added any.
    pub fn widen(&self, more: &Redactor) -> bool {
        let extra = more.secrets();
        let mut list = self.secrets.write().unwrap_or_else(|e| e.into_inner());
        if extra.iter().all(|v| list.contains(v)) {
            return false;
        }
        *list = ordered(list.iter().chain(extra.iter()).cloned().collect());
        true
    }

    /// Redacts nothing: for tools that write no records (parsers under fuzzing, tests).
    pub fn none() -> Redactor {
        Redactor::default()
    }

    /// Whether there is nothing to redact (no secret variable is set).
    pub fn is_empty(&self) -> bool {
        self.secrets().is_empty()
    }

    pub fn redact(&self, s: &str) -> String {
        let mut out = s.to_string();
        for secret in self.secrets().iter() {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), "***");
            }
        }
        out
    }

    /// Redact every string of a JSON value, object keys included: what a surface (the HTTP API, the
    /// MCP server) sends is built from records whose free text may hold a secret anywhere.
    pub fn redact_json(&self, v: &mut serde_json::Value) {
        use serde_json::Value;
        match v {
            Value::String(s) => *s = self.redact(s),
            Value::Array(a) => a.iter_mut().for_each(|x| self.redact_json(x)),
            Value::Object(o) => {
                let old = std::mem::take(o);
                for (k, mut x) in old {
                    self.redact_json(&mut x);
                    o.insert(self.redact(&k), x);
                }
            }
            _ => {}
        }
    }

    /// Like [`Redactor::redact`], taking ownership so the common case (nothing to hide) copies nothing.
    pub fn redact_owned(&self, s: String) -> String {
        if self.secrets().iter().any(|x| s.contains(x.as_str())) {
            self.redact(&s)
        } else {
            s
        }
    }

    pub fn redact_bytes(&self, b: &[u8]) -> Vec<u8> {
        let secrets = self.secrets();
        if secrets.is_empty() {
            return b.to_vec();
        }
        match std::str::from_utf8(b) {
            Ok(s) => self.redact(s).into_bytes(),
            Err(_) => {
                let mut out = b.to_vec();
                for secret in secrets.iter() {
                    out = replace_bytes(&out, secret.as_bytes(), b"***");
                }
                out
            }
        }
    }
}

fn replace_bytes(hay: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hay.len());
    let mut i = 0;
    while i < hay.len() {
        if hay[i..].starts_with(needle) {
            out.extend_from_slice(with);
            i += needle.len();
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_and_keys_are_redacted_at_any_depth() {
        let r = Redactor::from_values(["s3cret".to_string()]);
        let mut v = serde_json::json!({"a": ["x s3cret", {"s3cret": 1, "n": 2}], "b": true});
        r.redact_json(&mut v);
        assert_eq!(
            v,
            serde_json::json!({"a": ["x ***", {"***": 1, "n": 2}], "b": true})
        );
    }

    #[test]
    fn redacts_longest_first() {
        let r = Redactor::from_values(["abcd".to_string(), "abcdef".to_string()]);
        assert_eq!(r.redact("x abcdef abcd y"), "x *** *** y");
        assert_eq!(r.redact_bytes(b"\xffabcd"), b"\xff***".to_vec());
        assert_eq!(r.redact_owned("abcdef!".into()), "***!");
    }

    #[test]
    fn widening_one_clone_widens_them_all() {
        let r = Redactor::from_values(["first-secret".to_string()]);
        let held_elsewhere = r.clone();
        assert!(!r.widen(&Redactor::from_values(["first-secret".to_string()])));
        assert!(r.widen(&Redactor::from_values(["second-secret".to_string()])));
        assert_eq!(
            held_elsewhere.redact("first-secret second-secret"),
            "*** ***"
        );
    }

    #[test]
    fn short_values_are_not_secrets() {
        let r = Redactor::from_values(["1".to_string(), "abc".to_string()]);
        assert_eq!(r.redact("1 abc"), "1 abc");
    }
}
