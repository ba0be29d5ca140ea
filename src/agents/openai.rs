//! The `openai` agent kind: one chat completion against any OpenAI-compatible endpoint (llama.cpp's
//! llama-server, llama-swap, Ollama, vLLM, OpenRouter, OpenAI itself). It produces text only, for
//! analysis, planning and routing; it never touches files.
//!
//! [`chat`] streams the answer (so a live log shows progress) and sorts every way it can fail into
//! an [`Outcome`] the scheduler already knows (rate limit, quota, auth, timeout, bad output). The
//! supervisor runs it like every other agent, as a child process (`orchestrate openai-agent`, see
//! `cli/openai_agent.rs`), whose one line of JSON on stdout [`parse_agent_stdout`] reads back.
//! Nothing here may panic on what a server sends: every answer, however broken, becomes a
//! [`ChatReply`] or a [`ChatError`].
//!
//! HTTP is `reqwest` (the issue asked for it): maintained, streams response bodies, and speaks TLS
//! through rustls with the `ring` provider this crate already uses for PostgreSQL, so no second
//! crypto library (aws-lc) is built.

use std::time::Duration;

use serde_json::Value;

use crate::agents::AgentOutcome;
use crate::record::Outcome;

/// One chat completion to run.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    /// The API root, e.g. `http://127.0.0.1:8080/v1`; the request goes to
    /// `{base_url}/chat/completions` (see [`endpoint`]).
    pub base_url: String,
    pub model: String,
    /// Sent as `Authorization: Bearer …` when set.
    pub api_key: Option<String>,
    /// `(role, content)` pairs, in order.
    pub messages: Vec<(String, String)>,
    /// Bound on the whole request: connecting, waiting and streaming.
    pub timeout: Duration,
    /// Ask for a JSON object (`response_format: {"type": "json_object"}`), for the router.
    pub json_mode: bool,
}

/// A finished answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatReply {
    pub text: String,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub cached_tokens: Option<u64>,
    /// The model the server says answered (may differ from the one asked for, e.g. behind a router).
    pub model: Option<String>,
}

/// Why there is no answer, already classified.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatError {
    pub outcome: Outcome,
    pub message: String,
    /// When the provider said to come back (rate limits).
    pub retry_after: Option<Duration>,
}

impl ChatError {
    fn new(outcome: Outcome, message: impl Into<String>) -> ChatError {
        ChatError {
            outcome,
            message: message.into(),
            retry_after: None,
        }
    }
}

impl std::fmt::Display for ChatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.outcome.as_str(), self.message)
    }
}

impl std::error::Error for ChatError {}

/// How much of a bad body to quote in an error message.
const QUOTE_BYTES: usize = 4096;
/// A response body larger than this is refused: a text answer is never that long.
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
/// How much of an error body to read before classifying it.
const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;

/// The chat-completions URL for a base URL: trailing slashes are dropped and `/chat/completions`
/// appended, whatever the base ends in. A bare host (`http://127.0.0.1:8080`) therefore becomes
/// `http://127.0.0.1:8080/chat/completions`, which llama-server also serves; most other servers
/// want the `/v1` spelled out. A base that already ends in `/chat/completions` is used as it is.
pub fn endpoint(base_url: &str) -> String {
    let base = base_url.trim().trim_end_matches('/');
    if base.ends_with("/chat/completions") {
        base.to_string()
    } else {
        format!("{base}/chat/completions")
    }
}

/// Runs one streamed chat completion, calling `on_delta` with each piece of answer text as it
/// arrives. Never panics; every failure is a classified [`ChatError`] naming the URL.
pub async fn chat(
    req: &ChatRequest,
    on_delta: &mut dyn FnMut(&str),
) -> Result<ChatReply, ChatError> {
    let url = endpoint(&req.base_url);
    match tokio::time::timeout(req.timeout, chat_inner(req, &url, on_delta)).await {
        Ok(result) => result,
        Err(_) => Err(ChatError::new(
            Outcome::Timeout,
            format!(
                "POST {url}: no complete answer within the {:.1} s limit",
                req.timeout.as_secs_f64()
            ),
        )),
    }
}

async fn chat_inner(
    req: &ChatRequest,
    url: &str,
    on_delta: &mut dyn FnMut(&str),
) -> Result<ChatReply, ChatError> {
    let client = client_for(url)?;
    let mut body = serde_json::json!({
        "model": req.model,
        "messages": req.messages.iter()
            .map(|(role, content)| serde_json::json!({"role": role, "content": content}))
            .collect::<Vec<_>>(),
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if req.json_mode {
        body["response_format"] = serde_json::json!({"type": "json_object"});
    }
    let mut builder = client
        .post(url)
        .header(
            reqwest::header::ACCEPT,
            "text/event-stream, application/json",
        )
        .json(&body);
    if let Some(key) = req.api_key.as_deref().filter(|k| !k.is_empty()) {
        builder = builder.bearer_auth(key);
    }
    let mut resp = builder.send().await.map_err(|e| transport_error(url, &e))?;

    let status = resp.status();
    if !status.is_success() {
        let retry_after = retry_after(resp.headers(), time::OffsetDateTime::now_utc());
        let body = read_capped(&mut resp, MAX_ERROR_BODY_BYTES).await;
        return Err(classify_http_error(
            url,
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            &String::from_utf8_lossy(&body),
            retry_after,
        ));
    }

    // Parse as SSE whatever the content type says, and keep the raw body too: some servers answer
    // plain JSON despite `stream: true`, which yields no SSE events and is parsed whole at the end.
    let mut parser = SseParser::default();
    let mut acc = Accumulator::default();
    let mut raw: Vec<u8> = Vec::new();
    let mut events = Vec::new();
    loop {
        let chunk = match resp.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => {
                let mut err = transport_error(url, &e);
                err.message = format!(
                    "{} (the answer broke off after {} bytes)",
                    err.message,
                    raw.len()
                );
                return Err(err);
            }
        };
        if raw.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(ChatError::new(
                Outcome::BadOutput,
                format!(
                    "POST {url}: HTTP {status}: the answer is larger than {} MiB; refused",
                    MAX_BODY_BYTES / (1024 * 1024)
                ),
            ));
        }
        raw.extend_from_slice(&chunk);
        parser.push(&chunk, &mut events);
        for data in events.drain(..) {
            acc.on_event(&data, on_delta);
        }
        if acc.done {
            break;
        }
    }
    parser.finish(&mut events);
    for data in events.drain(..) {
        acc.on_event(&data, on_delta);
    }
    acc.into_reply(url, status.as_u16(), &raw, on_delta)
}

/// A client for one request. Loopback servers are reached directly even when a proxy is set in
/// the environment: a local llama-server is never behind the office proxy.
fn client_for(url: &str) -> Result<reqwest::Client, ChatError> {
    // reqwest picks up the process-wide provider; installing it twice is harmless (the second
    // call reports the first one, which is this same provider).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::Client::builder();
    let parsed = reqwest::Url::parse(url).map_err(|e| {
        ChatError::new(
            Outcome::AgentError,
            format!("invalid base URL: {url} is not a URL ({e})"),
        )
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(ChatError::new(
            Outcome::AgentError,
            format!("invalid base URL: {url} is not http:// or https://"),
        ));
    }
    let host = parsed.host_str().unwrap_or("");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback {
        builder = builder.no_proxy();
    }
    builder.build().map_err(|e| {
        ChatError::new(
            Outcome::AgentError,
            format!("POST {url}: cannot set up the HTTP client: {}", chain(&e)),
        )
    })
}

/// A failure below HTTP: refused, reset, DNS, TLS, timeout.
fn transport_error(url: &str, e: &reqwest::Error) -> ChatError {
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
fn chain(e: &dyn std::error::Error) -> String {
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

async fn read_capped(resp: &mut reqwest::Response, cap: usize) -> Vec<u8> {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        body.extend_from_slice(&chunk);
        if body.len() >= cap {
            body.truncate(cap);
            break;
        }
    }
    body
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
fn provider_message(body: &str) -> String {
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
fn truncate(s: &str, max: usize) -> String {
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

/// Server-sent events, fed bytes in chunks split anywhere (even inside a UTF-8 character or
/// between `\r` and `\n`). Yields the `data` of each event; comments, `event:`, `id:` and `retry:`
/// are dropped.
#[derive(Default)]
pub struct SseParser {
    line: Vec<u8>,
    data: String,
    has_data: bool,
    /// The last byte seen was a `\r`, so a `\n` right after it ends nothing.
    after_cr: bool,
}

impl SseParser {
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<String>) {
        for &b in bytes {
            match b {
                b'\n' if self.after_cr => self.after_cr = false,
                b'\r' | b'\n' => {
                    self.after_cr = b == b'\r';
                    self.end_line(out);
                }
                _ => {
                    self.after_cr = false;
                    self.line.push(b);
                }
            }
        }
    }

    /// The body ended: a last line without its newline and an event without its blank line still count.
    pub fn finish(&mut self, out: &mut Vec<String>) {
        if !self.line.is_empty() {
            self.end_line(out);
        }
        self.dispatch(out);
    }

    fn end_line(&mut self, out: &mut Vec<String>) {
        let line = String::from_utf8_lossy(&self.line).into_owned();
        self.line.clear();
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line.as_str(), ""),
        };
        if field == "data" {
            if self.has_data {
                self.data.push('\n');
            }
            self.data.push_str(value);
            self.has_data = true;
        }
    }

    fn dispatch(&mut self, out: &mut Vec<String>) {
        if self.has_data {
            out.push(std::mem::take(&mut self.data));
            self.has_data = false;
        }
    }
}

/// What the events of one answer add up to.
#[derive(Default)]
struct Accumulator {
    reply: ChatReply,
    /// Some event carried a non-empty `choices` array.
    saw_choices: bool,
    events: usize,
    done: bool,
    reasoning_chars: usize,
    finish_reason: Option<String>,
    /// An `{"error": …}` object sent inside a 200 stream (OpenRouter does this).
    stream_error: Option<Value>,
    /// Event data that was not JSON, kept for the error message.
    garbage: Vec<String>,
}

impl Accumulator {
    fn on_event(&mut self, data: &str, on_delta: &mut dyn FnMut(&str)) {
        self.events += 1;
        let trimmed = data.trim();
        if trimmed == "[DONE]" {
            self.done = true;
            return;
        }
        if trimmed.is_empty() {
            return;
        }
        match serde_json::from_str::<Value>(trimmed) {
            Ok(v) => self.on_json(&v, on_delta),
            // A server that forgets the blank line between events runs several `data:` lines
            // into one event; take them one by one.
            Err(_) if trimmed.contains('\n') => {
                for line in trimmed.lines() {
                    self.events -= 1;
                    self.on_event(line, on_delta);
                }
            }
            Err(_) => {
                if self.garbage.len() < 3 {
                    self.garbage.push(truncate(trimmed, 512));
                }
            }
        }
    }

    /// One chunk (`choices[].delta`) or one whole completion (`choices[].message`).
    fn on_json(&mut self, v: &Value, on_delta: &mut dyn FnMut(&str)) {
        if let Some(e) = v.get("error").filter(|e| !e.is_null()) {
            self.stream_error.get_or_insert_with(|| e.clone());
        }
        if let Some(m) = v
            .get("model")
            .and_then(Value::as_str)
            .filter(|m| !m.is_empty())
        {
            self.reply.model = Some(m.to_string());
        }
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            let n = |p: &str| u.pointer(p).and_then(Value::as_u64);
            self.reply.input_tokens = n("/prompt_tokens").or(self.reply.input_tokens);
            self.reply.output_tokens = n("/completion_tokens").or(self.reply.output_tokens);
            self.reply.cached_tokens =
                n("/prompt_tokens_details/cached_tokens").or(self.reply.cached_tokens);
        }
        let Some(choices) = v.get("choices").and_then(Value::as_array) else {
            return;
        };
        // With n > 1 the server interleaves choices; the answer is choice 0.
        let first = choices
            .iter()
            .find(|c| c.get("index").and_then(Value::as_u64).unwrap_or(0) == 0);
        let Some(choice) = first else {
            return;
        };
        self.saw_choices = true;
        for part in ["delta", "message"] {
            let Some(p) = choice.get(part) else { continue };
            if let Some(text) = p
                .get("content")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
            {
                self.reply.text.push_str(text);
                on_delta(text);
            }
            for k in ["reasoning_content", "reasoning"] {
                if let Some(r) = p.get(k).and_then(Value::as_str) {
                    self.reasoning_chars += r.chars().count();
                }
            }
        }
        if let Some(r) = choice.get("finish_reason").and_then(Value::as_str) {
            self.finish_reason = Some(r.to_string());
        }
    }

    fn into_reply(
        mut self,
        url: &str,
        status: u16,
        raw: &[u8],
        on_delta: &mut dyn FnMut(&str),
    ) -> Result<ChatReply, ChatError> {
        if self.events == 0 {
            // No SSE at all: a plain JSON answer (or error) to a streaming request.
            let body = String::from_utf8_lossy(raw);
            if let Ok(v) = serde_json::from_str::<Value>(body.trim()) {
                self.on_json(&v, on_delta);
            }
        }
        if let Some(e) = self.stream_error.take() {
            // The provider reported an error inside a 200; its `code` is often the HTTP status
            // it would have sent.
            let code = e
                .get("code")
                .and_then(|c| {
                    c.as_u64()
                        .or_else(|| c.as_str().and_then(|s| s.parse().ok()))
                })
                .and_then(|c| u16::try_from(c).ok())
                .filter(|c| (400..600).contains(c))
                .unwrap_or(500);
            let body = serde_json::json!({ "error": e }).to_string();
            let mut err = classify_http_error(url, code, "", &body, None);
            err.message = format!(
                "POST {url}: HTTP {status}, but the answer reported an error (code {code}): {}",
                provider_message(&body)
            );
            return Err(err);
        }
        let quoted = || truncate(String::from_utf8_lossy(raw).trim(), QUOTE_BYTES);
        if !self.saw_choices {
            let what = if self.garbage.is_empty() {
                "no choices in the answer"
            } else {
                "the answer is not chat-completion JSON"
            };
            return Err(ChatError::new(
                Outcome::BadOutput,
                format!("POST {url}: HTTP {status}: {what}; it was: {}", quoted()),
            ));
        }
        if self.reply.text.is_empty() {
            let mut why = String::new();
            if let Some(r) = &self.finish_reason {
                why.push_str(&format!(" (finish_reason {r}"));
                if self.reasoning_chars > 0 {
                    why.push_str(&format!(
                        ", after {} characters of reasoning",
                        self.reasoning_chars
                    ));
                }
                why.push(')');
            }
            return Err(ChatError::new(
                Outcome::BadOutput,
                format!("POST {url}: HTTP {status}: the model gave no answer text{why}"),
            ));
        }
        Ok(self.reply)
    }
}

/// Reads what `orchestrate openai-agent` printed on stdout (one JSON object, see
/// `cli/openai_agent.rs`) into the outcome of the attempt. Output that is not that object is
/// `BadOutput`, keeping the raw text; no output at all from a failed process is `AgentError`.
pub fn parse_agent_stdout(stdout: &str, code: Option<i32>) -> AgentOutcome {
    let trimmed = stdout.trim();
    let parsed = serde_json::from_str::<Value>(trimmed).ok().or_else(|| {
        trimmed
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .and_then(|l| serde_json::from_str::<Value>(l.trim()).ok())
    });
    let Some(v) = parsed.filter(Value::is_object) else {
        if trimmed.is_empty() && code != Some(0) {
            return AgentOutcome::failed(
                Outcome::AgentError,
                format!("openai-agent {} and printed no result", exit_text(code)),
            );
        }
        let mut out = AgentOutcome::failed(
            Outcome::BadOutput,
            format!(
                "openai-agent {} and its output is not the expected JSON",
                exit_text(code)
            ),
        );
        out.text = stdout.to_string();
        return out;
    };
    if let Some(e) = v.get("error") {
        let outcome = e
            .get("outcome")
            .cloned()
            .and_then(|o| serde_json::from_value::<Outcome>(o).ok())
            .filter(|o| *o != Outcome::Completed)
            .unwrap_or(Outcome::AgentError);
        let message = e
            .get("message")
            .and_then(Value::as_str)
            .map(String::from)
            .unwrap_or_else(|| e.to_string());
        let mut out = AgentOutcome::failed(outcome, message);
        out.retry_after = e
            .get("retry_after_seconds")
            .and_then(Value::as_f64)
            .and_then(|s| Duration::try_from_secs_f64(s).ok());
        return out;
    }
    let Some(text) = v.get("text").and_then(Value::as_str) else {
        let mut out = AgentOutcome::failed(
            Outcome::BadOutput,
            "openai-agent printed JSON with neither `text` nor `error`",
        );
        out.text = stdout.to_string();
        return out;
    };
    let mut out = AgentOutcome::new(Outcome::Completed);
    out.text = text.to_string();
    out.input_tokens = v.get("input_tokens").and_then(Value::as_u64);
    out.output_tokens = v.get("output_tokens").and_then(Value::as_u64);
    out.cached_tokens = v.get("cached_tokens").and_then(Value::as_u64);
    out
}

fn exit_text(code: Option<i32>) -> String {
    match code {
        Some(c) => format!("exited with code {c}"),
        None => "did not exit normally".to_string(),
    }
}

/// The JSON line `openai-agent` prints for a result; [`parse_agent_stdout`] reads it back.
pub fn agent_stdout(result: &Result<ChatReply, ChatError>) -> String {
    match result {
        Ok(r) => serde_json::json!({
            "text": r.text,
            "input_tokens": r.input_tokens,
            "output_tokens": r.output_tokens,
            "cached_tokens": r.cached_tokens,
            "model": r.model,
        }),
        Err(e) => serde_json::json!({
            "error": {
                "outcome": e.outcome.as_str(),
                "message": e.message,
                "retry_after_seconds": e.retry_after.map(|d| d.as_secs_f64()),
            }
        }),
    }
    .to_string()
}

/// The `openai` kind as an adapter: the request runs in a child process (`orchestrate
/// openai-agent`), so timeouts, cancel, logs and kill work exactly as for the CLI kinds.
pub struct OpenaiAdapter;

impl super::Adapter for OpenaiAdapter {
    fn invocation(
        &self,
        _name: &str,
        cfg: &crate::config::AgentConfig,
        req: &super::RunRequest,
    ) -> anyhow::Result<super::Invocation> {
        use anyhow::Context;
        let exe = std::env::current_exe().context("cannot find the orchestrate executable")?;
        let env = super::agent_env(cfg);
        let mut args = vec![
            "openai-agent".to_string(),
            "--base-url".into(),
            cfg.base_url.clone().unwrap_or_default(),
            "--model".into(),
            cfg.model.clone().unwrap_or_default(),
        ];
        // `agent_env` has put the key (from `api_key_env`) under OPENAI_API_KEY when it is set;
        // local servers usually want none.
        if env.contains_key("OPENAI_API_KEY") {
            args.extend(["--api-key-env".into(), "OPENAI_API_KEY".into()]);
        }
        args.extend(cfg.args.iter().cloned());
        Ok(super::Invocation {
            program: exe.display().to_string(),
            args,
            env,
            stdin: Some(req.prompt.as_bytes().to_vec()),
            cwd: req.workdir.to_path_buf(),
            session_id: None,
        })
    }

    fn parse(&self, exit: &crate::process::Exit) -> AgentOutcome {
        if let Some(o) = super::abnormal(exit) {
            return o;
        }
        parse_agent_stdout(&exit.stdout, exit.code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::time::Instant;

    /// Feeds `body` to the parser in pieces of `step` bytes and adds the events up, as `chat` does.
    fn accumulate(body: &[u8], step: usize) -> (Result<ChatReply, ChatError>, Vec<String>) {
        let mut parser = SseParser::default();
        let mut acc = Accumulator::default();
        let mut deltas = Vec::new();
        let mut on_delta = |d: &str| deltas.push(d.to_string());
        let mut events = Vec::new();
        for piece in body.chunks(step.max(1)) {
            parser.push(piece, &mut events);
            for e in events.drain(..) {
                acc.on_event(&e, &mut on_delta);
            }
        }
        parser.finish(&mut events);
        for e in events.drain(..) {
            acc.on_event(&e, &mut on_delta);
        }
        let result = acc.into_reply("http://h/v1/chat/completions", 200, body, &mut on_delta);
        (result, deltas)
    }

    const STREAM: &str = concat!(
        ": keep-alive comment\r\n\r\n",
        "data: {\"model\":\"qwen3\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"reasoning_content\":\"hmm\"}}]}\r\n\r\n",
        "event: message\r\nid: 2\r\n",
        "data: {\"model\":\"qwen3\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Héllo\"}}]}\r\n\r\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\", wörld ✓\"},\"finish_reason\":\"stop\"}]}\r\n\r\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":5,",
        "\"prompt_tokens_details\":{\"cached_tokens\":8}}}\r\n\r\n",
        "data: [DONE]\r\n\r\n",
    );

    #[test]
    fn sse_stream_adds_up_whatever_the_chunk_boundaries() {
        for step in [1, 2, 3, 7, 64, 4096] {
            let (reply, deltas) = accumulate(STREAM.as_bytes(), step);
            let reply = reply.unwrap();
            assert_eq!(reply.text, "Héllo, wörld ✓", "step {step}");
            assert_eq!(deltas.concat(), "Héllo, wörld ✓");
            assert_eq!(reply.input_tokens, Some(12));
            assert_eq!(reply.output_tokens, Some(5));
            assert_eq!(reply.cached_tokens, Some(8));
            assert_eq!(reply.model.as_deref(), Some("qwen3"));
        }
    }

    #[test]
    fn sse_parser_handles_lf_cr_multiline_data_and_a_missing_final_newline() {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        p.push(b"data: a\ndata: b\n\n", &mut out);
        p.push(b"data:c\r", &mut out);
        p.push(b"\n\r", &mut out); // CRLF split across chunks, then a lone CR as the blank line
        p.push(b"\ndata: last", &mut out); // LF after a CR-terminated line ends nothing...
        assert_eq!(out, vec!["a\nb".to_string(), "c".to_string()]);
        p.finish(&mut out);
        assert_eq!(out.last().map(String::as_str), Some("last"));
        let mut p = SseParser::default();
        let mut out = Vec::new();
        p.push(b": only a comment\n\nevent: ping\n\n", &mut out);
        p.finish(&mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn events_without_blank_lines_between_them_still_count() {
        let body = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\ndata: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\ndata: [DONE]\n";
        let (reply, _) = accumulate(body.as_bytes(), 5);
        assert_eq!(reply.unwrap().text, "ab");
    }

    #[test]
    fn a_plain_json_answer_to_a_streaming_request_is_accepted() {
        let body = r#"{"id":"x","model":"m1","choices":[{"index":0,"message":{"role":"assistant","content":"plain"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#;
        let (reply, deltas) = accumulate(body.as_bytes(), 10);
        let reply = reply.unwrap();
        assert_eq!(reply.text, "plain");
        assert_eq!(deltas, vec!["plain"]);
        assert_eq!(
            (reply.input_tokens, reply.output_tokens),
            (Some(3), Some(1))
        );
        assert_eq!(reply.model.as_deref(), Some("m1"));
    }

    #[test]
    fn garbage_or_choiceless_answers_are_bad_output_quoting_the_body() {
        for body in [
            "<html>proxy says hi</html>",
            "data: not json\n\n",
            "data: {\"object\":\"x\"}\n\n",
            "",
        ] {
            let err = accumulate(body.as_bytes(), 3).0.unwrap_err();
            assert_eq!(err.outcome, Outcome::BadOutput, "{body}");
            assert!(err.message.contains(body.trim()), "{}", err.message);
            assert!(err.message.contains("http://h/v1/chat/completions"));
        }
        let huge = format!("data: {}\n\n", "x".repeat(100_000));
        let err = accumulate(huge.as_bytes(), 4096).0.unwrap_err();
        assert!(err.message.len() < 6000, "{}", err.message.len());
        // Only reasoning, no answer text.
        let body = "data: {\"choices\":[{\"delta\":{\"reasoning_content\":\"thinking\"},\"finish_reason\":\"length\"}]}\n\n";
        let err = accumulate(body.as_bytes(), 8).0.unwrap_err();
        assert_eq!(err.outcome, Outcome::BadOutput);
        assert!(
            err.message.contains("finish_reason length"),
            "{}",
            err.message
        );
    }

    #[test]
    fn an_error_inside_a_200_stream_is_classified_by_its_code() {
        let body = "data: {\"choices\":[{\"delta\":{\"content\":\"par\"}}]}\n\ndata: {\"error\":{\"code\":429,\"message\":\"Provider overloaded\"}}\n\n";
        let err = accumulate(body.as_bytes(), 9).0.unwrap_err();
        assert_eq!(err.outcome, Outcome::RateLimited);
        assert!(
            err.message.contains("\"Provider overloaded\""),
            "{}",
            err.message
        );
        let body = r#"{"error":{"message":"boom"}}"#;
        let err = accumulate(body.as_bytes(), 9).0.unwrap_err();
        assert_eq!(err.outcome, Outcome::AgentError);
        assert!(err.message.contains("boom"));
    }

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

    #[test]
    fn endpoint_appends_chat_completions_once() {
        for base in [
            "http://h:8080/v1",
            "http://h:8080/v1/",
            " http://h:8080/v1// ",
        ] {
            assert_eq!(endpoint(base), "http://h:8080/v1/chat/completions");
        }
        assert_eq!(endpoint("http://h:8080"), "http://h:8080/chat/completions");
        assert_eq!(
            endpoint("http://h/v1/chat/completions/"),
            "http://h/v1/chat/completions"
        );
    }

    #[test]
    fn agent_stdout_round_trips_through_the_parser() {
        let ok = Ok(ChatReply {
            text: "answer\nwith \"quotes\"".into(),
            input_tokens: Some(10),
            output_tokens: Some(2),
            cached_tokens: None,
            model: Some("m".into()),
        });
        let out = parse_agent_stdout(&format!("{}\n", agent_stdout(&ok)), Some(0));
        assert_eq!(out.outcome, Outcome::Completed);
        assert_eq!(out.text, "answer\nwith \"quotes\"");
        assert_eq!(
            (out.input_tokens, out.output_tokens, out.cached_tokens),
            (Some(10), Some(2), None)
        );
        assert_eq!(out.error, None);

        let err = Err(ChatError {
            outcome: Outcome::RateLimited,
            message: "slow down".into(),
            retry_after: Some(Duration::from_millis(2500)),
        });
        let out = parse_agent_stdout(&agent_stdout(&err), Some(1));
        assert_eq!(out.outcome, Outcome::RateLimited);
        assert_eq!(out.error.as_deref(), Some("slow down"));
        assert_eq!(out.retry_after, Some(Duration::from_millis(2500)));

        let unknown = parse_agent_stdout(r#"{"error":{"outcome":"weird","message":"m"}}"#, Some(1));
        assert_eq!(unknown.outcome, Outcome::AgentError);
    }

    #[test]
    fn unparseable_agent_stdout_is_bad_output_keeping_the_text() {
        let out = parse_agent_stdout("thread 'main' panicked", Some(101));
        assert_eq!(out.outcome, Outcome::BadOutput);
        assert_eq!(out.text, "thread 'main' panicked");
        let out = parse_agent_stdout("[1, 2]", Some(0));
        assert_eq!(out.outcome, Outcome::BadOutput);
        let out = parse_agent_stdout(r#"{"nothing": true}"#, Some(0));
        assert_eq!(out.outcome, Outcome::BadOutput);
        let out = parse_agent_stdout("", Some(2));
        assert_eq!(out.outcome, Outcome::AgentError);
        assert!(out.error.unwrap().contains("code 2"));
        // Stray lines before the result line do not hide it.
        let out = parse_agent_stdout("noise\n{\"text\":\"t\"}\n", Some(0));
        assert_eq!((out.outcome, out.text.as_str()), (Outcome::Completed, "t"));
    }

    // --- against a real local HTTP server -------------------------------------------------

    /// A one-connection HTTP server on 127.0.0.1 that sends `pieces` (flushing and pausing between
    /// them, so the client sees them as separate reads) and then, if `hang`, holds the connection
    /// until the client goes away (at most 10 s). The request it read comes back on the channel.
    struct Server {
        base_url: String,
        request: std::sync::mpsc::Receiver<String>,
    }

    fn serve(pieces: Vec<Vec<u8>>, hang: bool) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base_url = format!("http://{}/v1", listener.local_addr().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let Ok((mut conn, _)) = listener.accept() else {
                return;
            };
            conn.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let text = String::from_utf8_lossy(&req).to_string();
                if let Some(head_end) = text.find("\r\n\r\n") {
                    let len = text[..head_end]
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0usize);
                    if req.len() >= head_end + 4 + len {
                        break;
                    }
                }
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let _ = tx.send(String::from_utf8_lossy(&req).into_owned());
            for p in pieces {
                if conn.write_all(&p).and_then(|()| conn.flush()).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(15));
            }
            if hang {
                while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
            }
        });
        Server {
            base_url,
            request: rx,
        }
    }

    /// An SSE answer in chunked transfer encoding, cut into `cuts` pieces at awkward places.
    fn chunked_sse(body: &str, piece_len: usize) -> Vec<Vec<u8>> {
        let mut pieces = vec![
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n".to_vec(),
        ];
        for part in body.as_bytes().chunks(piece_len) {
            let mut p = format!("{:x}\r\n", part.len()).into_bytes();
            p.extend_from_slice(part);
            p.extend_from_slice(b"\r\n");
            pieces.push(p);
        }
        pieces.push(b"0\r\n\r\n".to_vec());
        pieces
    }

    fn fixed(status: &str, headers: &str, body: &str) -> Vec<Vec<u8>> {
        vec![
            format!(
                "HTTP/1.1 {status}\r\n{headers}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        ]
    }

    fn request(base_url: &str, timeout: Duration) -> ChatRequest {
        ChatRequest {
            base_url: base_url.to_string(),
            model: "test-model".into(),
            api_key: Some("sk-test".into()),
            messages: vec![
                ("system".into(), "be brief".into()),
                ("user".into(), "hi".into()),
            ],
            timeout,
            json_mode: true,
        }
    }

    async fn run(
        server: &Server,
        timeout: Duration,
    ) -> (Result<ChatReply, ChatError>, Vec<String>) {
        let mut deltas = Vec::new();
        let result = chat(&request(&server.base_url, timeout), &mut |d| {
            deltas.push(d.to_string())
        })
        .await;
        (result, deltas)
    }

    #[tokio::test]
    async fn streams_an_answer_from_a_server() {
        let server = serve(chunked_sse(STREAM, 37), false);
        let (reply, deltas) = run(&server, Duration::from_secs(10)).await;
        let reply = reply.unwrap();
        assert_eq!(reply.text, "Héllo, wörld ✓");
        assert_eq!(deltas, vec!["Héllo", ", wörld ✓"]);
        assert_eq!(
            (reply.input_tokens, reply.output_tokens, reply.cached_tokens),
            (Some(12), Some(5), Some(8))
        );
        let req = server.request.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(
            req.starts_with("POST /v1/chat/completions HTTP/1.1\r\n"),
            "{req}"
        );
        assert!(
            req.to_ascii_lowercase()
                .contains("authorization: bearer sk-test"),
            "{req}"
        );
        let body: Value = serde_json::from_str(&req[req.find("\r\n\r\n").unwrap() + 4..]).unwrap();
        assert_eq!(body["model"], "test-model");
        assert_eq!(body["stream"], true);
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["response_format"]["type"], "json_object");
        assert_eq!(body["messages"][1]["content"], "hi");
    }

    #[tokio::test]
    async fn accepts_a_non_streaming_json_answer() {
        let body = r#"{"choices":[{"index":0,"message":{"role":"assistant","content":"{\"agent\":\"a\"}"}}],"usage":{"prompt_tokens":4,"completion_tokens":6}}"#;
        let server = serve(fixed("200 OK", "", body), false);
        let reply = run(&server, Duration::from_secs(10)).await.0.unwrap();
        assert_eq!(reply.text, r#"{"agent":"a"}"#);
        assert_eq!(reply.output_tokens, Some(6));
    }

    #[tokio::test]
    async fn a_429_is_rate_limited_with_its_retry_after() {
        let body = r#"{"error":{"message":"Too many requests, slow down","type":"rate_limit"}}"#;
        let server = serve(
            fixed("429 Too Many Requests", "retry-after: 7\r\n", body),
            false,
        );
        let err = run(&server, Duration::from_secs(10)).await.0.unwrap_err();
        assert_eq!(err.outcome, Outcome::RateLimited);
        assert_eq!(err.retry_after, Some(Duration::from_secs(7)));
        let url = format!("{}/chat/completions", server.base_url);
        assert_eq!(
            err.message,
            format!("POST {url}: HTTP 429 Too Many Requests: \"Too many requests, slow down\"")
        );
    }

    #[tokio::test]
    async fn a_401_is_auth() {
        let body = r#"{"error":{"message":"Invalid API key","code":"invalid_api_key"}}"#;
        let server = serve(fixed("401 Unauthorized", "", body), false);
        let err = run(&server, Duration::from_secs(10)).await.0.unwrap_err();
        assert_eq!(err.outcome, Outcome::Auth);
        assert!(
            err.message.contains("401") && err.message.contains("Invalid API key"),
            "{}",
            err.message
        );
    }

    #[tokio::test]
    async fn a_server_that_stops_mid_answer_times_out_within_the_limit() {
        // Headers and one delta, then nothing.
        let mut pieces = chunked_sse(
            "data: {\"choices\":[{\"delta\":{\"content\":\"par\"}}]}\n\n",
            1000,
        );
        pieces.pop();
        let server = serve(pieces, true);
        let started = Instant::now();
        let (result, deltas) = run(&server, Duration::from_millis(400)).await;
        let err = result.unwrap_err();
        assert_eq!(err.outcome, Outcome::Timeout);
        assert!(err.message.contains(&server.base_url), "{}", err.message);
        assert_eq!(deltas, vec!["par"]);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn connection_refused_is_an_agent_error_naming_the_url() {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let base = format!("http://127.0.0.1:{port}/v1");
        let err = chat(&request(&base, Duration::from_secs(10)), &mut |_| {})
            .await
            .unwrap_err();
        assert_eq!(err.outcome, Outcome::AgentError);
        assert!(
            err.message.contains(&format!("{base}/chat/completions")),
            "{}",
            err.message
        );
        assert!(err.message.contains("cannot connect"), "{}", err.message);
    }

    #[tokio::test]
    async fn a_bad_base_url_is_an_agent_error() {
        for base in ["not a url", "ftp://h/v1", ""] {
            let err = chat(&request(base, Duration::from_secs(5)), &mut |_| {})
                .await
                .unwrap_err();
            assert_eq!(err.outcome, Outcome::AgentError, "{base}");
            assert!(err.message.contains("invalid base URL"), "{}", err.message);
        }
    }
}
