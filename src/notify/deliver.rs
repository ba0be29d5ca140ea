//! One delivery of one event on one channel: a webhook POST (the event as JSON, or as a preset
//! shapes it for ntfy, Slack or Discord), signed when the channel has a `secret`; or a command run
//! with the event as JSON on stdin. What the receiver answered comes back as one line, for the
//! outbox's record and for `orchestrate notify test`.
//!
//! Headers every webhook request carries:
//!
//! - `X-Orchestrate-Event-Id`: the event's id, the same on every retry (deduplicate on it);
//! - `X-Orchestrate-Event`: its kind (`failed`, `cooldown`, …);
//! - `X-Orchestrate-Signature: sha256=<hex>` with a `secret`: HMAC-SHA256 of the exact request
//!   body, keyed with the secret. A receiver computes the same over the bytes it received and
//!   compares (in constant time).
//!
//! A command runs like an agent does (`process::run`): its own process group, the
//! `security.env_allow` environment plus `ORCHESTRATE_*` variables, the channel's time limit with
//! SIGTERM then SIGKILL, its output (redacted, capped) in `state_dir/notify/<channel>.log`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use hmac::{KeyInit, Mac};

use super::Event;
use crate::config::notify::{Preset, Webhook};
use crate::config::{Config, NotifyChannel};
use crate::layout::Layout;
use crate::process;
use crate::redact::Redactor;

/// The signature header's name.
pub const SIGNATURE_HEADER: &str = "X-Orchestrate-Signature";
pub const EVENT_ID_HEADER: &str = "X-Orchestrate-Event-Id";
pub const EVENT_KIND_HEADER: &str = "X-Orchestrate-Event";

/// `sha256=<hex>`: HMAC-SHA256 of `body` keyed with `secret`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    // HMAC takes a key of any length.
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(secret.as_bytes())
        .expect("HMAC accepts keys of any length");
    mac.update(body);
    let bytes = mac.finalize().into_bytes();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// What one channel needs besides itself.
pub struct Context<'a> {
    pub cfg: &'a Config,
    pub layout: &'a Layout,
    pub redactor: &'a Arc<Redactor>,
}

/// One try: `Ok` with what the receiver said when it accepted the event, `Err` with why not.
pub async fn deliver(
    cx: &Context<'_>,
    channel: &NotifyChannel,
    event: &Event,
) -> Result<String, String> {
    if let Some(w) = &channel.webhook {
        post(w, channel.timeout(), event).await
    } else {
        run(cx, channel, event).await
    }
}

/// The request a webhook gets: (body, content type, headers besides the user's).
pub fn request(w: &Webhook, event: &Event) -> (Vec<u8>, &'static str, Vec<(String, String)>) {
    let text = format!("{}\n{}", event.title, event.message);
    let mut headers = vec![
        (EVENT_ID_HEADER.to_string(), event.id.clone()),
        (EVENT_KIND_HEADER.to_string(), event.kind.clone()),
    ];
    let json = |v: serde_json::Value| v.to_string().into_bytes();
    let (body, ctype) = match w.preset {
        Preset::None => (
            serde_json::to_vec(event).unwrap_or_default(),
            "application/json",
        ),
        Preset::Slack => (
            json(serde_json::json!({ "text": text })),
            "application/json",
        ),
        Preset::Discord => (
            json(serde_json::json!({ "content": text })),
            "application/json",
        ),
        Preset::Ntfy => {
            let (tags, priority) = match event.kind.as_str() {
                "failed" => ("x", "high"),
                "merge_conflict" => ("warning", "high"),
                "needs_login" | "budget" => ("warning", "high"),
                "review_required" => ("eyes", "default"),
                "completed" => ("white_check_mark", "default"),
                "test" => ("bell", "default"),
                _ => ("hourglass", "default"),
            };
            headers.push(("Title".into(), header_text(&event.title)));
            headers.push(("Tags".into(), tags.into()));
            headers.push(("Priority".into(), priority.into()));
            (
                event.message.clone().into_bytes(),
                "text/plain; charset=utf-8",
            )
        }
    };
    if let Some(secret) = &w.secret {
        headers.push((SIGNATURE_HEADER.to_string(), signature(secret, &body)));
    }
    (body, ctype, headers)
}

/// A header value from free text: one line of printable ASCII (others become `?`).
fn header_text(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(250)
        .collect()
}

/// A client for `url`: loopback is reached directly even when a proxy is set in the environment.
fn client(url: &reqwest::Url, timeout: Duration) -> Result<reqwest::Client, String> {
    // reqwest picks up the process-wide provider; installing it twice is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut b = reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::limited(3));
    let host = url.host_str().unwrap_or("");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
    {
        b = b.no_proxy();
    }
    b.build()
        .map_err(|e| format!("cannot set up the HTTP client: {e}"))
}

async fn post(w: &Webhook, timeout: Duration, event: &Event) -> Result<String, String> {
    let url = reqwest::Url::parse(&w.url).map_err(|e| format!("not a URL: {e}"))?;
    // The URL may hold a token (Slack's do): errors name only where it goes.
    let shown = format!("{}://{}", url.scheme(), url.host_str().unwrap_or(""));
    let (body, ctype, headers) = request(w, event);
    let mut req = client(&url, timeout)?
        .post(url.clone())
        .header(reqwest::header::CONTENT_TYPE, ctype)
        .header(
            reqwest::header::USER_AGENT,
            concat!("orchestrate/", env!("CARGO_PKG_VERSION")),
        );
    for (k, v) in headers.iter().map(|(k, v)| (k, v)).chain(w.headers.iter()) {
        req = req.header(k.as_str(), v.as_str());
    }
    let mut resp = req.body(body).send().await.map_err(|e| {
        // reqwest's own text names the full URL (a token in its path or query): left out, as it
        // is written (normalised by the URL parser, so not found by a text search).
        let e = e.without_url();
        let mut why = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            why = format!("{why}: {s}");
            src = s.source();
        }
        why = why
            .replace(w.url.as_str(), &shown)
            .replace(url.as_str(), &shown);
        format!("POST {shown}: {why}")
    })?;
    let status = resp.status();
    let mut said = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        said.extend_from_slice(&chunk);
        if said.len() >= 4096 {
            break;
        }
    }
    let first = super::line(&String::from_utf8_lossy(&said), 200);
    let answer = if first.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {first}")
    };
    if status.is_success() {
        Ok(answer)
    } else {
        Err(answer)
    }
}

/// The environment a command channel gets besides the allow-list.
pub fn command_env(event: &Event) -> BTreeMap<String, String> {
    let mut env = BTreeMap::from([
        ("ORCHESTRATE_EVENT_ID".to_string(), event.id.clone()),
        ("ORCHESTRATE_EVENT".to_string(), event.kind.clone()),
        ("ORCHESTRATE_TITLE".to_string(), event.title.clone()),
        ("ORCHESTRATE_MESSAGE".to_string(), event.message.clone()),
        ("ORCHESTRATE_HOST".to_string(), event.host.clone()),
    ]);
    if let Some(a) = &event.agent {
        env.insert("ORCHESTRATE_AGENT".into(), a.clone());
    }
    if let Some(t) = &event.task {
        env.insert("ORCHESTRATE_TASK_ID".into(), t.id.clone());
        env.insert("ORCHESTRATE_STATE".into(), t.state.clone());
    }
    env
}

async fn run(cx: &Context<'_>, channel: &NotifyChannel, event: &Event) -> Result<String, String> {
    let Some(command) = &channel.command else {
        return Err("the channel has neither a command nor a webhook".into());
    };
    let (program, args) = command.argv();
    let name = channel.name();
    let log_path = cx.layout.notify_log(name);
    if let Some(dir) = log_path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let stamp = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
    let body = serde_json::to_vec(event).unwrap_or_default();
    let spec = process::Spec {
        program: program.clone(),
        args,
        env: process::build_env(&cx.cfg.security.env_allow, &command_env(event)),
        cwd: cx.layout.root.clone(),
        stdin: Some(body),
        timeout: channel.timeout(),
        grace: Duration::from_secs_f64(cx.cfg.orchestrator.kill_grace_seconds),
        log_path,
        log_append: false,
        max_log_bytes: 1024 * 1024,
        redactor: cx.redactor.clone(),
        marker: format!("notify/{name}/{stamp}"),
        stall: None,
    };
    let (_stop_tx, stop) = tokio::sync::watch::channel(None);
    let exit = process::run(spec, stop).await;
    if let Some(e) = exit.spawn_error {
        return Err(format!("cannot run `{program}`: {e}"));
    }
    if exit.timed_out {
        return Err(format!(
            "`{program}` did not finish within {} s (timeout_seconds)",
            channel.timeout().as_secs()
        ));
    }
    let out = super::line(&exit.stdout, 200);
    let err = exit
        .stderr_tail
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| super::line(l, 200))
        .unwrap_or_default();
    match exit.code {
        Some(0) => Ok(if out.is_empty() {
            "exit 0".into()
        } else {
            format!("exit 0: {out}")
        }),
        code => {
            let how = match (code, exit.signal) {
                (Some(c), _) => format!("exit code {c}"),
                (None, Some(s)) => format!("killed by signal {s}"),
                (None, None) => "ended without an exit code".into(),
            };
            let said = if err.is_empty() { out } else { err };
            Err(if said.is_empty() {
                format!("`{program}`: {how}")
            } else {
                format!("`{program}`: {how}: {said}")
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn presets_shape_the_body_for_their_service() {
        let event = super::super::sample("h", "c");
        let hook = |preset| Webhook {
            url: "https://example.invalid/x".into(),
            headers: BTreeMap::new(),
            secret: Some("k".into()),
            preset,
            secret_vars: vec![],
        };
        let (body, ctype, headers) = request(&hook(Preset::Slack), &event);
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert!(
            v["text"]
                .as_str()
                .expect("text")
                .contains("this channel works")
        );
        assert_eq!(ctype, "application/json");
        let sig = headers
            .iter()
            .find(|(k, _)| k == SIGNATURE_HEADER)
            .expect("signed");
        assert_eq!(sig.1, signature("k", &body));
        let (body, _, _) = request(&hook(Preset::Discord), &event);
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert!(v["content"].is_string());
        let (body, ctype, headers) = request(&hook(Preset::Ntfy), &event);
        assert_eq!(String::from_utf8_lossy(&body), event.message);
        assert!(ctype.starts_with("text/plain"));
        assert!(
            headers
                .iter()
                .any(|(k, v)| k == "Title" && v == &event.title)
        );
        let (body, _, headers) = request(&hook(Preset::None), &event);
        let back: Event = serde_json::from_slice(&body).expect("the event");
        assert_eq!(back, event);
        assert!(
            headers
                .iter()
                .any(|(k, v)| k == EVENT_ID_HEADER && v == &event.id)
        );
    }
}
