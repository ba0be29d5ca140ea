//! The OpenAI-compatible chat client: one streamed chat completion against any server that answers
//! `POST …/chat/completions` (llama.cpp's llama-server, llama-swap, Ollama, vLLM, OpenRouter, OpenAI
//! itself). The `openai` agent kind (run as the `orchestrate openai-agent` child) and the model
//! router both talk to models through it.
//!
//! It owns the request, the reply, the error and the HTTP exchange: [`chat`] streams the answer (so a
//! live log shows progress) and sorts every way it can fail into an [`Outcome`] the scheduler already
//! knows (rate limit, quota, auth, timeout, bad output). [`sse`] splits the stream into events,
//! `completion` adds them up into an answer, and [`http_error`] classifies what went wrong.
//!
//! It never panics on what a server sends: every answer, however broken, becomes a [`ChatReply`] or a
//! [`ChatError`], and bodies are read under a size cap. It never touches files. It sits below the
//! agents and must never import `crate::agents`: besides leaf modules it uses only [`Outcome`].
//!
//! HTTP is `reqwest` (the issue asked for it): maintained, streams response bodies, and speaks TLS
//! through rustls with the `ring` provider this crate already uses for PostgreSQL, so no second
//! crypto library (aws-lc) is built.

mod completion;
pub mod http_error;
pub mod sse;

use std::time::Duration;

use crate::record::Outcome;
use completion::Accumulator;
use http_error::{chain, classify_http_error, retry_after, transport_error};

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
    let mut acc = Accumulator::default();
    let mut raw: Vec<u8> = Vec::new();
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
        acc.push(&chunk, on_delta);
        if acc.is_done() {
            break;
        }
    }
    acc.finish(url, status.as_u16(), &raw, on_delta)
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::time::Instant;

    use completion::tests::STREAM;

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
