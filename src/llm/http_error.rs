//! How a chat request that got no answer becomes a [`ChatError`]: failures below HTTP (refused,
//! reset, DNS, TLS, timeout), non-2xx statuses sorted into an [`Outcome`] by status and by the
//! provider's own words, and when to come back (`Retry-After` and OpenAI's rate-limit headers).
//!
//! Everything here reads what a server sent, so it never panics and never trusts a length: a quoted
//! body is cut to `QUOTE_BYTES` on a character boundary, and a header that does not parse counts as
//! absent. It does no I/O: `chat` reads the status, headers and a capped body and hands them here.

use std::time::Duration;

use serde_json::Value;

use super::ChatError;
use crate::record::Outcome;

/// How much of a bad body to quote in an error message.
pub(super) const QUOTE_BYTES: usize = 4096;

/// A failure below HTTP: refused, reset, DNS, TLS, timeout.
pub(super) fn transport_error(url: &str, e: &reqwest::Error) -> ChatError {
    // reqwest's own top line repeats the URL; its causes say what went wrong.
    let cause = match std::error::Error::source(e) {
        Some(source) => chain(source),
        None => chain(e),
    };
    if e.is_timeout() {
        return ChatError::new(Outcome::Timeout, format!("POST {url}: timed out: {cause}"));
    }
    let what = if e.is_connect() {
        "cannot connect (is the server running at that address?)"
    } else {
        "request failed"
    };
    ChatError::new(Outcome::AgentError, format!("POST {url}: {what}: {cause}"))
}

/// An error and its causes on one line ("client error (Connect): … : Connection refused").
pub(super) fn chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

/// Sorts a non-2xx answer into an outcome. The message names the URL and status and quotes the
/// provider's own `error.message`.
pub fn classify_http_error(
    url: &str,
    status: u16,
    reason: &str,
    body: &str,
    retry_after: Option<Duration>,
) -> ChatError {
    let provider = provider_message(body);
    let lower = body.to_ascii_lowercase();
    let quota = ["insufficient_quota", "quota", "billing"]
        .iter()
        .any(|w| lower.contains(w));
    let outcome = match status {
        429 | 403 if quota => Outcome::QuotaExhausted,
        402 => Outcome::QuotaExhausted,
        429 => Outcome::RateLimited,
        401 | 403 => Outcome::Auth,
        408 => Outcome::Timeout,
        _ => Outcome::AgentError,
    };
    let hint = match status {
        404 => " (check the model name, and that the base URL ends in /v1 if the server wants it)",
        _ => "",
    };
    let status_text = if reason.is_empty() {
        status.to_string()
    } else {
        format!("{status} {reason}")
    };
    ChatError {
        outcome,
        message: format!("POST {url}: HTTP {status_text}: {provider}{hint}"),
        retry_after,
    }
}

/// The provider's own words from an error body: `error.message` (OpenAI, OpenRouter, vLLM,
/// llama-server), `error` as a string (Ollama), `message` or `detail`; else the body itself.
pub(super) fn provider_message(body: &str) -> String {
    if let Ok(v) = serde_json::from_str::<Value>(body) {
        let found = [
            v.pointer("/error/message"),
            v.get("error").filter(|e| e.is_string()),
            v.get("message"),
            v.get("detail").filter(|e| e.is_string()),
        ]
        .into_iter()
        .flatten()
        .find_map(Value::as_str);
        if let Some(m) = found {
            return format!("\"{}\"", truncate(m.trim(), QUOTE_BYTES));
        }
    }
    let body = body.trim();
    if body.is_empty() {
        "(empty body)".to_string()
    } else {
        format!("body: {}", truncate(body, QUOTE_BYTES))
    }
}

/// At most `max` bytes of `s`, cut on a character boundary, with a note when cut.
pub(super) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes in all)", &s[..end], s.len())
}

/// When to come back, from `retry-after` (seconds or an HTTP date), `retry-after-ms`, or else the
/// later of `x-ratelimit-reset-requests` and `x-ratelimit-reset-tokens` (Go durations like `6m0s`).
pub fn retry_after(
    headers: &reqwest::header::HeaderMap,
    now: time::OffsetDateTime,
) -> Option<Duration> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(d) = get("retry-after-ms")
        .and_then(|v| v.trim().parse::<f64>().ok())
        .and_then(|ms| Duration::try_from_secs_f64(ms / 1000.0).ok())
    {
        return Some(d);
    }
    if let Some(d) = get("retry-after").and_then(|v| parse_retry_after(v, now)) {
        return Some(d);
    }
    ["x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"]
        .iter()
        .filter_map(|h| get(h).and_then(parse_go_duration))
        .max()
}

/// A `Retry-After` value: delay seconds (`120`, also `1.5`) or an HTTP date, which counts from
/// `now` (a date already past means now).
pub fn parse_retry_after(value: &str, now: time::OffsetDateTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).ok();
    }
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    let at = time::PrimitiveDateTime::parse(value, format)
        .ok()?
        .assume_utc();
    let secs = (at - now).as_seconds_f64().max(0.0);
    Duration::try_from_secs_f64(secs).ok()
}

/// A Go duration as OpenAI's rate-limit headers write it: `1s`, `6m0s`, `1h2m3.5s`, `250ms`; a
/// bare number is seconds.
pub fn parse_go_duration(value: &str) -> Option<Duration> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    if let Ok(secs) = value.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).ok();
    }
    let mut total = 0.0_f64;
    let mut rest = value;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * scale;
    }
    Duration::try_from_secs_f64(total).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_errors_are_classified() {
        let url = "http://h/v1/chat/completions";
        let c = |status, body| classify_http_error(url, status, "", body, None);
        let rate = classify_http_error(
            url,
            429,
            "Too Many Requests",
            r#"{"error":{"message":"Rate limit reached for requests","type":"requests"}}"#,
            Some(Duration::from_secs(3)),
        );
        assert_eq!(rate.outcome, Outcome::RateLimited);
        assert_eq!(rate.retry_after, Some(Duration::from_secs(3)));
        assert_eq!(
            rate.message,
            "POST http://h/v1/chat/completions: HTTP 429 Too Many Requests: \"Rate limit reached for requests\""
        );
        let quota = r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota"}}"#;
        assert_eq!(c(429, quota).outcome, Outcome::QuotaExhausted);
        assert_eq!(
            c(403, r#"{"error":{"message":"billing hard limit"}}"#).outcome,
            Outcome::QuotaExhausted
        );
        assert_eq!(
            c(402, "Insufficient credits").outcome,
            Outcome::QuotaExhausted
        );
        assert_eq!(
            c(401, r#"{"error":{"message":"Incorrect API key"}}"#).outcome,
            Outcome::Auth
        );
        assert_eq!(c(403, "forbidden").outcome, Outcome::Auth);
        let server = c(
            503,
            r#"{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}"#,
        );
        assert_eq!(server.outcome, Outcome::AgentError);
        assert!(
            server.message.contains("HTTP 503: \"Loading model\""),
            "{}",
            server.message
        );
        let ollama = c(
            404,
            r#"{"error":"model \"llama9\" not found, try pulling it first"}"#,
        );
        assert_eq!(ollama.outcome, Outcome::AgentError);
        assert!(ollama.message.contains("not found, try pulling"));
        assert!(ollama.message.contains("/v1"));
        assert!(c(500, "").message.ends_with("(empty body)"));
        assert!(
            c(502, "<html>bad gateway</html>")
                .message
                .contains("body: <html>bad gateway</html>")
        );
    }

    #[test]
    fn retry_after_values_parse() {
        let now = time::macros::datetime!(2015-10-21 07:28:00 UTC);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after(" 1.5 ", now),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        for bad in [
            "",
            "soon",
            "-5",
            "NaN",
            "1e400",
            "Wed, 99 Oct 2015 07:28:30 GMT",
        ] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad}");
        }
        assert_eq!(parse_go_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_go_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(
            parse_go_duration("1h2m3.5s"),
            Some(Duration::from_millis(3_723_500))
        );
        assert_eq!(parse_go_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_go_duration("17"), Some(Duration::from_secs(17)));
        for bad in ["", "s", "5x", "1.2.3s", "m5"] {
            assert_eq!(parse_go_duration(bad), None, "{bad}");
        }

        let mut h = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after(&h, now), None);
        h.insert("x-ratelimit-reset-requests", "1s".parse().unwrap());
        h.insert("x-ratelimit-reset-tokens", "6m0s".parse().unwrap());
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(360)));
        h.insert("retry-after", "20".parse().unwrap());
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(20)));
        h.insert("retry-after-ms", "1500".parse().unwrap());
        assert_eq!(retry_after(&h, now), Some(Duration::from_millis(1500)));
    }
}
