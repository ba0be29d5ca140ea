//! A scripted model server for end-to-end tests of the real agent CLIs (Claude Code, Codex, Gemini CLI)
//! and of plain OpenAI-compatible chat clients, entirely offline on 127.0.0.1.
//!
//! It speaks HTTP/1.1 (thread per connection, keep-alive, chunked request bodies) and four APIs, all
//! streaming as SSE when asked to:
//! - Anthropic Messages: `POST /v1/messages[?beta=true]`, `POST /v1/messages/count_tokens`;
//! - OpenAI Responses: `POST …/responses` (any base path);
//! - Gemini: `POST /v1beta/models/{model}:streamGenerateContent?alt=sse`, `:generateContent`, `:countTokens`;
//! - OpenAI chat completions: `POST …/chat/completions`, streaming or not.
//!
//! Every other GET/HEAD answers 200 (`GET …/models` with an empty model list).
//!
//! Each *conversation* request takes the next scripted [`Reply`] for its API. Not conversations:
//! - tool-result follow-ups (Anthropic `tool_result`, Responses `*_output` items after the last user message,
//!   Gemini `functionResponse`, chat `role: tool`): answered with the `then` of the matching call id (or of
//!   the latest call of that API);
//! - auxiliary requests: Anthropic requests without tools (title/topic generation), Responses requests
//!   without tools and instructions, Gemini JSON-mode requests (`responseJsonSchema`/`responseSchema`/
//!   `responseMimeType: application/json`, e.g. the routing classifier: answered with a value built from
//!   the schema) or without tools, and all count-tokens/model-list calls.
//!
//! A CLI's own retry of a failed request is a new conversation and takes the next reply, so
//! `[RateLimit, Text]` fails once and then succeeds when the CLI retries.
//! See `tools/agents/CLI-NOTES.md` for how each CLI is driven against it.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{Value, json};

/// Input (prompt) tokens reported by every reply, in each API's own input field (Anthropic `input_tokens`,
/// Responses `input_tokens`, Gemini `promptTokenCount`, chat `prompt_tokens`). Note that Anthropic's
/// `input_tokens` excludes cache reads while the others include them: the same number is reported anyway.
pub const INPUT_TOKENS: u64 = 11;
/// Output (completion) tokens reported by every reply.
pub const OUTPUT_TOKENS: u64 = 7;
/// Cached input tokens reported where the API has such a field (Anthropic `cache_read_input_tokens`,
/// Responses `input_tokens_details.cached_tokens`, Gemini `cachedContentTokenCount`, chat
/// `prompt_tokens_details.cached_tokens`).
pub const CACHED_TOKENS: u64 = 3;
/// Anthropic `cache_creation_input_tokens`.
pub const CACHE_CREATION_TOKENS: u64 = 0;
/// The text that answers when nothing is scripted.
pub const DEFAULT_TEXT: &str = "ok";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Api {
    Anthropic,
    Responses,
    Gemini,
    Chat,
}

#[derive(Clone, Debug)]
pub enum Reply {
    /// A plain text answer.
    Text(String),
    /// A tool call that makes the CLI write `content` into `path` (relative to the CLI's working directory),
    /// using the CLI's own write/apply_patch/shell tool; the follow-up request carrying the tool result gets
    /// the final text `then`.
    WriteFile {
        path: String,
        content: String,
        then: String,
    },
    /// HTTP 429 with the provider's own rate-limit error body (and a `retry-after` header when Some).
    RateLimit { retry_after_secs: Option<u64> },
    /// HTTP 500 with the provider's error body.
    ServerError,
    /// An authentication failure: HTTP 401 (Gemini: 400 `API_KEY_INVALID`, as the real API answers a bad
    /// key) with the provider's error body.
    AuthError,
    /// Accept the request and never answer (the connection is held until the server is dropped).
    Hang,
    /// A call of the offered tool whose name ends with `tool` (an MCP tool as the CLI names it, e.g.
    /// `mcp__orchestrate__add_task`) with `args`; the follow-up carrying its result gets `then`.
    /// Scripted for the Anthropic and Responses APIs (the others answer with a text saying so).
    CallTool {
        tool: String,
        args: Value,
        then: String,
    },
    /// Several tool calls one after the other, as a model that reads each result before its next
    /// call: the first answers the conversation, each follow-up carrying a result gets the next, and
    /// the follow-up carrying the last result gets `then`. A string argument `{{N:/pointer}}` is
    /// replaced by the value at that JSON pointer in the result of call N (0-based) of this chain,
    /// read as JSON from the result's text (e.g. `{{0:/id}}`: the id an `add_task` call returned).
    /// Scripted for the Anthropic and Responses APIs, like `CallTool`.
    CallTools { calls: Vec<Call>, then: String },
}

/// One call of a [`Reply::CallTools`] chain.
#[derive(Clone, Debug)]
pub struct Call {
    /// The end of the offered tool's name, as for [`Reply::CallTool`].
    pub tool: String,
    pub args: Value,
}

impl Call {
    pub fn new(tool: &str, args: Value) -> Call {
        Call {
            tool: tool.to_string(),
            args,
        }
    }
}

/// A chain in progress: the calls still to make, the results of those made, and the closing text.
#[derive(Clone, Debug)]
struct Chain {
    rest: VecDeque<Call>,
    results: Vec<String>,
    then: String,
}

#[derive(Default)]
struct State {
    queues: HashMap<Api, VecDeque<Reply>>,
    last: HashMap<Api, Reply>,
    conversations: HashMap<Api, usize>,
    requests: Vec<(String, String, String)>,
    /// Tool call id → text to answer its follow-up with.
    pending: HashMap<String, String>,
    /// The `then` of the latest tool call per API, for follow-ups whose call id cannot be matched.
    last_then: HashMap<Api, String>,
    /// Tool call id → the chain it belongs to (`Reply::CallTools`).
    chains: HashMap<String, Chain>,
}

struct Shared {
    state: Mutex<State>,
    stop: AtomicBool,
    stopped: Condvar,
    ids: AtomicU64,
    hung: Mutex<Vec<TcpStream>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// The server; it stops (and releases hung connections) when dropped.
pub struct ModelServer {
    port: u16,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl ModelServer {
    pub fn start() -> ModelServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local addr").port();
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            stop: AtomicBool::new(false),
            stopped: Condvar::new(),
            ids: AtomicU64::new(0),
            hung: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let acceptor = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let s = s.clone();
                std::thread::spawn(move || {
                    let _ = serve_connection(&s, conn);
                });
            }
        });
        ModelServer {
            port,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Replace the queue of replies for one API. Each new conversation takes the next reply; when the
    /// queue is empty the last reply repeats; with nothing scripted, `Text("ok")`.
    pub fn script(&self, api: Api, replies: Vec<Reply>) {
        let mut st = self.shared.lock();
        st.last.remove(&api);
        st.queues.insert(api, replies.into());
    }

    /// How many conversation requests (not auxiliary ones, not follow-ups) `api` has received so far.
    pub fn conversations(&self, api: Api) -> usize {
        self.shared
            .lock()
            .conversations
            .get(&api)
            .copied()
            .unwrap_or(0)
    }

    /// Every request seen, in order: (method, path with query, body).
    pub fn requests(&self) -> Vec<(String, String, String)> {
        self.shared.lock().requests.clone()
    }
}

impl Drop for ModelServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.stopped.notify_all();
        for s in self
            .shared
            .hung
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = s.shutdown(Shutdown::Both);
        }
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// HTTP

struct Request {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
    fn wants_close(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.to_ascii_lowercase().contains("close"))
    }
}

struct Conn<'a> {
    stream: TcpStream,
    buf: Vec<u8>,
    shared: &'a Shared,
}

impl Conn<'_> {
    /// Reads more bytes; false on EOF or when the server stops.
    fn fill(&mut self) -> io::Result<bool> {
        let mut chunk = [0u8; 16384];
        loop {
            if self.shared.stop.load(Ordering::SeqCst) {
                return Ok(false);
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(true);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn read_line(&mut self) -> io::Result<Option<String>> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return Ok(Some(line));
            }
            if !self.fill()? {
                return Ok(None);
            }
        }
    }

    fn read_exact_n(&mut self, n: usize) -> io::Result<Option<Vec<u8>>> {
        while self.buf.len() < n {
            if !self.fill()? {
                return Ok(None);
            }
        }
        Ok(Some(self.buf.drain(..n).collect()))
    }

    fn read_request(&mut self) -> io::Result<Option<Request>> {
        let mut line = String::new();
        while line.is_empty() {
            match self.read_line()? {
                Some(l) => line = l,
                None => return Ok(None),
            }
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let target = parts.next().unwrap_or("/").to_string();
        let mut headers = Vec::new();
        loop {
            let Some(h) = self.read_line()? else {
                return Ok(None);
            };
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        let mut req = Request {
            method,
            target,
            headers,
            body: Vec::new(),
        };
        let chunked = req
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        if chunked {
            loop {
                let Some(size_line) = self.read_line()? else {
                    return Ok(None);
                };
                let size =
                    usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                if size == 0 {
                    // Trailers, then the empty line.
                    while let Some(t) = self.read_line()? {
                        if t.is_empty() {
                            break;
                        }
                    }
                    break;
                }
                let Some(data) = self.read_exact_n(size)? else {
                    return Ok(None);
                };
                req.body.extend_from_slice(&data);
                self.read_line()?;
            }
        } else if let Some(len) = req
            .header("content-length")
            .and_then(|v| v.parse::<usize>().ok())
        {
            let Some(data) = self.read_exact_n(len)? else {
                return Ok(None);
            };
            req.body = data;
        }
        Ok(Some(req))
    }
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn json(status: u16, v: &Value) -> Response {
        Response {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: v.to_string().into_bytes(),
        }
    }
    fn sse(body: String) -> Response {
        Response {
            status: 200,
            headers: vec![
                ("content-type".into(), "text/event-stream".into()),
                ("cache-control".into(), "no-cache".into()),
            ],
            body: body.into_bytes(),
        }
    }
    fn with_header(mut self, k: &str, v: String) -> Response {
        self.headers.push((k.to_string(), v));
        self
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        _ => "Unknown",
    }
}

enum Outcome {
    Respond(Response),
    Hang,
}

fn serve_connection(shared: &Shared, stream: TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    let _ = stream.set_nodelay(true);
    let mut conn = Conn {
        stream,
        buf: Vec::new(),
        shared,
    };
    while let Some(req) = conn.read_request()? {
        let close = req.wants_close();
        match handle(shared, &req) {
            Outcome::Hang => {
                if let Ok(s) = conn.stream.try_clone() {
                    shared
                        .hung
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(s);
                }
                let mut g = shared.lock();
                while !shared.stop.load(Ordering::SeqCst) {
                    g = shared.stopped.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                drop(g);
                let _ = conn.stream.shutdown(Shutdown::Both);
                return Ok(());
            }
            Outcome::Respond(resp) => {
                let head_only = req.method == "HEAD";
                let mut out = format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status));
                for (k, v) in &resp.headers {
                    out.push_str(&format!("{k}: {v}\r\n"));
                }
                out.push_str(&format!("content-length: {}\r\n", resp.body.len()));
                out.push_str(if close {
                    "connection: close\r\n\r\n"
                } else {
                    "connection: keep-alive\r\n\r\n"
                });
                let mut bytes = out.into_bytes();
                if !head_only {
                    bytes.extend_from_slice(&resp.body);
                }
                conn.stream.write_all(&bytes)?;
                conn.stream.flush()?;
                if close {
                    let _ = conn.stream.shutdown(Shutdown::Both);
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// Routing and the conversation logic shared by all APIs

/// What a request is, once parsed.
enum Kind {
    /// A new conversation: takes the next scripted reply.
    Conversation,
    /// A tool-result follow-up: answered with the `then` of the matching tool call.
    FollowUp(Option<String>),
    /// A side request (title generation, next-speaker check, …): answered without touching the script.
    Auxiliary,
}

/// The tool call the server decided on, in API-neutral form.
struct ToolCall {
    id: String,
    name: String,
    /// Function-call arguments, or the free-form input of a custom tool (Codex `apply_patch`).
    args: Value,
    custom_input: Option<String>,
}

/// A tool offered by the client.
struct Tool {
    name: String,
    custom: bool,
    params: Value,
}

fn handle(shared: &Shared, req: &Request) -> Outcome {
    let body_text = String::from_utf8_lossy(&req.body).into_owned();
    shared
        .lock()
        .requests
        .push((req.method.clone(), req.target.clone(), body_text.clone()));
    let path = req.path();
    if req.method != "POST" {
        if path.ends_with("/models") {
            return Outcome::Respond(Response::json(
                200,
                &json!({"object": "list", "data": [], "models": []}),
            ));
        }
        return Outcome::Respond(Response::json(200, &json!({})));
    }
    let body: Value = serde_json::from_str(&body_text).unwrap_or(Value::Null);
    if path.ends_with("/messages/count_tokens") {
        return Outcome::Respond(Response::json(200, &json!({"input_tokens": INPUT_TOKENS})));
    }
    if path.ends_with("/messages") {
        return anthropic(shared, &body);
    }
    if path.ends_with("/responses") {
        return responses(shared, &body);
    }
    if path.ends_with("/chat/completions") {
        return chat(shared, &body);
    }
    if let Some(i) = path.rfind(':') {
        let (model_part, method) = path.split_at(i);
        let model = model_part
            .rsplit('/')
            .next()
            .unwrap_or("gemini")
            .to_string();
        match method {
            ":countTokens" => {
                return Outcome::Respond(Response::json(
                    200,
                    &json!({"totalTokens": INPUT_TOKENS}),
                ));
            }
            ":streamGenerateContent" => return gemini(shared, &body, &model, true),
            ":generateContent" => return gemini(shared, &body, &model, false),
            ":embedContent" | ":batchEmbedContents" => {
                return Outcome::Respond(Response::json(
                    200,
                    &json!({"embedding": {"values": [0.0]}, "embeddings": [{"values": [0.0]}]}),
                ));
            }
            _ => {}
        }
    }
    Outcome::Respond(Response::json(
        404,
        &json!({"error": {"message": format!("no route for {path}"), "code": 404}}),
    ))
}

/// The next scripted reply for a new conversation of `api`.
fn take_reply(shared: &Shared, api: Api) -> Reply {
    let mut st = shared.lock();
    *st.conversations.entry(api).or_insert(0) += 1;
    let next = st.queues.get_mut(&api).and_then(|q| q.pop_front());
    match next {
        Some(r) => {
            st.last.insert(api, r.clone());
            r
        }
        None => st
            .last
            .get(&api)
            .cloned()
            .unwrap_or_else(|| Reply::Text(DEFAULT_TEXT.to_string())),
    }
}

fn remember_call(shared: &Shared, api: Api, id: &str, then: &str) {
    let mut st = shared.lock();
    st.pending.insert(id.to_string(), then.to_string());
    st.last_then.insert(api, then.to_string());
}

fn follow_up_text(shared: &Shared, api: Api, id: Option<&str>) -> String {
    let st = shared.lock();
    id.and_then(|id| st.pending.get(id))
        .or_else(|| st.last_then.get(&api))
        .cloned()
        .unwrap_or_else(|| DEFAULT_TEXT.to_string())
}

/// A scripted single tool call (`Reply::CallTool`): no text, the call of the offered tool whose
/// name ends with `tool`, its follow-up to be answered `then`.
fn one_call(
    shared: &Shared,
    api: Api,
    tools: &[Tool],
    tool: &str,
    args: Value,
    then: &str,
    id_prefix: &str,
) -> (String, Option<ToolCall>) {
    let id = format!("{id_prefix}{:06}", shared.next_id());
    remember_call(shared, api, &id, then);
    let name = offered_name(tools, tool);
    (
        String::new(),
        Some(ToolCall {
            id,
            name,
            args,
            custom_input: None,
        }),
    )
}

/// The first call of a `CallTools` chain (or its closing text when it has no calls).
fn start_chain(
    shared: &Shared,
    api: Api,
    tools: &[Tool],
    calls: Vec<Call>,
    then: String,
    id_prefix: &str,
) -> (String, Option<ToolCall>) {
    let chain = Chain {
        rest: calls.into(),
        results: Vec::new(),
        then,
    };
    next_in_chain(shared, api, tools, chain, id_prefix)
}

/// The answer to a follow-up whose call belongs to a chain: the chain's next call, or its closing
/// text once every call has its result; None when the call is not part of a chain.
fn chain_follow_up(
    shared: &Shared,
    api: Api,
    tools: &[Tool],
    id: Option<&str>,
    result: String,
    id_prefix: &str,
) -> Option<(String, Option<ToolCall>)> {
    let mut chain = shared.lock().chains.remove(id?)?;
    chain.results.push(result);
    Some(next_in_chain(shared, api, tools, chain, id_prefix))
}

fn next_in_chain(
    shared: &Shared,
    api: Api,
    tools: &[Tool],
    mut chain: Chain,
    id_prefix: &str,
) -> (String, Option<ToolCall>) {
    let Some(call) = chain.rest.pop_front() else {
        return (chain.then, None);
    };
    let id = format!("{id_prefix}{:06}", shared.next_id());
    let args = fill_in(&call.args, &chain.results);
    let name = offered_name(tools, &call.tool);
    {
        let mut st = shared.lock();
        // A follow-up whose id cannot be matched still gets the chain's closing text.
        st.last_then.insert(api, chain.then.clone());
        st.chains.insert(id.clone(), chain);
    }
    (
        String::new(),
        Some(ToolCall {
            id,
            name,
            args,
            custom_input: None,
        }),
    )
}

/// The offered tool whose name ends with `tool` (an MCP tool as the CLI prefixes it), or `tool`.
fn offered_name(tools: &[Tool], tool: &str) -> String {
    tools
        .iter()
        .find(|t| t.name.ends_with(tool))
        .map(|t| t.name.clone())
        .unwrap_or_else(|| tool.to_string())
}

/// `args` with each string `{{N:/pointer}}` replaced by that value of result N (read as JSON).
fn fill_in(args: &Value, results: &[String]) -> Value {
    match args {
        Value::String(s) => {
            let Some(inner) = s.strip_prefix("{{").and_then(|r| r.strip_suffix("}}")) else {
                return args.clone();
            };
            let Some((n, pointer)) = inner.split_once(':') else {
                return args.clone();
            };
            n.parse::<usize>()
                .ok()
                .and_then(|n| results.get(n))
                .and_then(|r| result_json(r))
                .and_then(|v| v.pointer(pointer).cloned())
                .unwrap_or_else(|| args.clone())
        }
        Value::Array(a) => Value::Array(a.iter().map(|v| fill_in(v, results)).collect()),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, v)| (k.clone(), fill_in(v, results)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// A tool result's JSON: its whole text, or from its first `{` (Codex puts a `Wall time: …` header
/// before an MCP tool's answer).
fn result_json(text: &str) -> Option<Value> {
    serde_json::from_str(text)
        .ok()
        .or_else(|| serde_json::from_str(&text[text.find('{')?..]).ok())
}

/// The text of a tool result's content: a string, or the text parts of an array of parts.
fn result_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// The CLI's working directory, as its system prompt / environment context states it.
fn find_cwd(texts: &str) -> Option<String> {
    const MARKERS: [&str; 5] = [
        "Primary working directory: ",
        "Working directory: ",
        "<cwd>",
        "I'm currently working in the directory: ",
        "current working directory: ",
    ];
    for m in MARKERS {
        if let Some(i) = texts.find(m) {
            let rest = &texts[i + m.len()..];
            let end = rest.find(['\n', '<', '"', '\\']).unwrap_or(rest.len());
            let dir = rest[..end].trim().trim_end_matches('.');
            if dir.starts_with('/') {
                return Some(dir.to_string());
            }
        }
    }
    None
}

fn absolute(cwd: Option<&str>, path: &str) -> String {
    match cwd {
        Some(dir) if !path.starts_with('/') => format!("{}/{}", dir.trim_end_matches('/'), path),
        _ => path.to_string(),
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn patch_for(path: &str, content: &str) -> String {
    let mut p = format!("*** Begin Patch\n*** Add File: {path}\n");
    for line in content.lines() {
        p.push('+');
        p.push_str(line);
        p.push('\n');
    }
    p.push_str("*** End Patch\n");
    p
}

fn prop_names(params: &Value) -> Vec<String> {
    params
        .get("properties")
        .and_then(Value::as_object)
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

/// Pick the client's tool that best writes a file, and build its call.
fn choose_write_call(
    tools: &[Tool],
    cwd: Option<&str>,
    path: &str,
    content: &str,
    id: String,
) -> ToolCall {
    let find = |pred: &dyn Fn(&Tool) -> bool| tools.iter().find(|t| pred(t));
    // 1. A dedicated write tool (Claude `Write`, Gemini `write_file`, generic `write_file`).
    if let Some(t) = find(&|t| {
        let n = t.name.to_ascii_lowercase();
        (n == "write" || n == "write_file" || n.contains("write_file") || n == "create_file")
            && prop_names(&t.params).iter().any(|p| p == "content")
    }) {
        let props = prop_names(&t.params);
        let path_key = ["file_path", "path", "absolute_path", "filename"]
            .into_iter()
            .find(|k| props.iter().any(|p| p == k))
            .unwrap_or("file_path");
        let mut args = serde_json::Map::new();
        args.insert(path_key.into(), json!(absolute(cwd, path)));
        args.insert("content".into(), json!(content));
        return ToolCall {
            id,
            name: t.name.clone(),
            args: Value::Object(args),
            custom_input: None,
        };
    }
    // 2. apply_patch (Codex), free-form or JSON.
    if let Some(t) = find(&|t| t.name == "apply_patch") {
        let patch = patch_for(path, content);
        return if t.custom {
            ToolCall {
                id,
                name: t.name.clone(),
                args: Value::Null,
                custom_input: Some(patch),
            }
        } else {
            ToolCall {
                id,
                name: t.name.clone(),
                args: json!({"input": patch}),
                custom_input: None,
            }
        };
    }
    // 3. A shell.
    let mut script = format!("printf %s {} > {}", shell_quote(content), shell_quote(path));
    if let Some((dir, _)) = path.rsplit_once('/').filter(|(d, _)| !d.is_empty()) {
        script = format!("mkdir -p {} && {script}", shell_quote(dir));
    }
    if let Some(t) = find(&|t| {
        let n = t.name.to_ascii_lowercase();
        n == "shell"
            || n == "bash"
            || n == "exec_command"
            || n == "shell_command"
            || n == "run_shell_command"
    }) {
        let props = prop_names(&t.params);
        let is_array = t
            .params
            .pointer("/properties/command/type")
            .and_then(Value::as_str)
            == Some("array");
        let args = if props.iter().any(|p| p == "cmd") {
            json!({"cmd": script})
        } else if is_array {
            json!({"command": ["bash", "-lc", script]})
        } else {
            json!({"command": script})
        };
        return ToolCall {
            id,
            name: t.name.clone(),
            args,
            custom_input: None,
        };
    }
    // 4. Nothing fits: name a write_file tool anyway.
    ToolCall {
        id,
        name: "write_file".into(),
        args: json!({"path": path, "content": content}),
        custom_input: None,
    }
}

/// Build a value that satisfies a JSON schema (enough for the CLIs' JSON-mode side requests).
fn value_for_schema(schema: &Value) -> Value {
    if let Some(e) = schema
        .get("enum")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
    {
        return e.clone();
    }
    let ty = schema
        .get("type")
        .map(|t| match t {
            Value::Array(a) => a
                .first()
                .and_then(Value::as_str)
                .unwrap_or("string")
                .to_ascii_lowercase(),
            other => other.as_str().unwrap_or("string").to_ascii_lowercase(),
        })
        .unwrap_or_else(|| {
            if schema.get("properties").is_some() {
                "object".into()
            } else {
                "string".into()
            }
        });
    match ty.as_str() {
        "object" => {
            let mut m = serde_json::Map::new();
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (k, v) in props {
                    m.insert(k.clone(), value_for_schema(v));
                }
            }
            Value::Object(m)
        }
        "array" => json!([]),
        "boolean" => json!(false),
        "integer" | "number" => schema.get("minimum").cloned().unwrap_or(json!(1)),
        "null" => Value::Null,
        _ => json!(DEFAULT_TEXT),
    }
}

// ---------------------------------------------------------------------------------------------------
// Anthropic Messages

fn anthropic_error(status: u16, kind: &str, message: &str) -> Response {
    Response::json(
        status,
        &json!({"type": "error", "error": {"type": kind, "message": message}}),
    )
}

fn anthropic(shared: &Shared, body: &Value) -> Outcome {
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("claude")
        .to_string();
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let tools: Vec<Tool> = body
        .get("tools")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|t| Tool {
                    name: t
                        .get("name")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                    custom: false,
                    params: t.get("input_schema").cloned().unwrap_or(Value::Null),
                })
                .collect()
        })
        .unwrap_or_default();
    let system = body
        .get("system")
        .map(|s| s.to_string())
        .unwrap_or_default();

    // Claude Code may append `role: system` messages after the user's turn.
    let last = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) != Some("system"));
    let tool_result = last
        .filter(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .and_then(|m| m.get("content"))
        .and_then(Value::as_array)
        .and_then(|parts| {
            parts
                .iter()
                .rev()
                .find(|p| p.get("type").and_then(Value::as_str) == Some("tool_result"))
        });
    let tool_result_id = tool_result.map(|p| {
        p.get("tool_use_id")
            .and_then(Value::as_str)
            .map(str::to_string)
    });
    let kind = if let Some(id) = tool_result_id {
        Kind::FollowUp(id)
    } else if tools.is_empty() && !messages.is_empty() {
        // Claude Code's side requests (title/topic generation, quota probes) carry no tools.
        Kind::Auxiliary
    } else {
        Kind::Conversation
    };

    let (text, call) = match kind {
        Kind::Auxiliary => {
            let wants_json = system.contains("JSON") || system.contains("json");
            let t = if wants_json {
                json!({"title": DEFAULT_TEXT, "isNewTopic": false}).to_string()
            } else {
                DEFAULT_TEXT.to_string()
            };
            (t, None)
        }
        Kind::FollowUp(id) => chain_follow_up(
            shared,
            Api::Anthropic,
            &tools,
            id.as_deref(),
            result_text(tool_result.and_then(|p| p.get("content"))),
            "toolu_orch",
        )
        .unwrap_or_else(|| (follow_up_text(shared, Api::Anthropic, id.as_deref()), None)),
        Kind::Conversation => match take_reply(shared, Api::Anthropic) {
            Reply::Text(t) => (t, None),
            Reply::WriteFile {
                path,
                content,
                then,
            } => {
                let id = format!("toolu_orch{:06}", shared.next_id());
                remember_call(shared, Api::Anthropic, &id, &then);
                let cwd = find_cwd(&format!("{system}\n{}", Value::Array(messages.clone())));
                let call = choose_write_call(&tools, cwd.as_deref(), &path, &content, id);
                (String::new(), Some(call))
            }
            Reply::RateLimit { retry_after_secs } => {
                let r = anthropic_error(
                    429,
                    "rate_limit_error",
                    "Number of request tokens has exceeded your per-minute rate limit",
                );
                return Outcome::Respond(match retry_after_secs {
                    Some(s) => r.with_header("retry-after", s.to_string()),
                    None => r,
                });
            }
            Reply::ServerError => {
                return Outcome::Respond(anthropic_error(
                    500,
                    "api_error",
                    "Internal server error",
                ));
            }
            Reply::AuthError => {
                return Outcome::Respond(anthropic_error(
                    401,
                    "authentication_error",
                    "invalid x-api-key",
                ));
            }
            Reply::Hang => return Outcome::Hang,
            Reply::CallTool { tool, args, then } => one_call(
                shared,
                Api::Anthropic,
                &tools,
                &tool,
                args,
                &then,
                "toolu_orch",
            ),
            Reply::CallTools { calls, then } => {
                start_chain(shared, Api::Anthropic, &tools, calls, then, "toolu_orch")
            }
        },
    };

    let msg_id = format!("msg_orch{:06}", shared.next_id());
    let usage = json!({
        "input_tokens": INPUT_TOKENS,
        "output_tokens": OUTPUT_TOKENS,
        "cache_read_input_tokens": CACHED_TOKENS,
        "cache_creation_input_tokens": CACHE_CREATION_TOKENS,
    });
    let (block, stop_reason) = match &call {
        Some(c) => (
            json!({"type": "tool_use", "id": c.id, "name": c.name, "input": c.args}),
            "tool_use",
        ),
        None => (json!({"type": "text", "text": text}), "end_turn"),
    };
    if !stream {
        return Outcome::Respond(Response::json(
            200,
            &json!({
                "id": msg_id, "type": "message", "role": "assistant", "model": model,
                "content": [block], "stop_reason": stop_reason, "stop_sequence": null, "usage": usage,
            }),
        ));
    }
    let mut out = String::new();
    let mut ev = |name: &str, data: Value| {
        out.push_str(&format!("event: {name}\ndata: {data}\n\n"));
    };
    let mut start_usage = usage.clone();
    start_usage["output_tokens"] = json!(1);
    ev(
        "message_start",
        json!({"type": "message_start", "message": {
            "id": msg_id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": null, "stop_sequence": null, "usage": start_usage}}),
    );
    match &call {
        Some(c) => {
            ev(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block":
                    {"type": "tool_use", "id": c.id, "name": c.name, "input": {}}}),
            );
            ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta":
                    {"type": "input_json_delta", "partial_json": c.args.to_string()}}),
            );
        }
        None => {
            ev(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            );
            ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}),
            );
        }
    }
    ev(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    );
    ev(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": null}, "usage": usage}),
    );
    ev("message_stop", json!({"type": "message_stop"}));
    Outcome::Respond(Response::sse(out))
}

// ---------------------------------------------------------------------------------------------------
// OpenAI Responses

fn openai_error(status: u16, kind: &str, code: Option<&str>, message: &str) -> Response {
    Response::json(
        status,
        &json!({"error": {"message": message, "type": kind, "param": null, "code": code}}),
    )
}

fn openai_rate_limit(retry_after_secs: Option<u64>) -> Response {
    let r = openai_error(
        429,
        "requests",
        Some("rate_limit_exceeded"),
        "Rate limit reached for requests. Please try again later.",
    );
    match retry_after_secs {
        Some(s) => r.with_header("retry-after", s.to_string()),
        None => r,
    }
}

fn openai_server_error() -> Response {
    openai_error(
        500,
        "server_error",
        None,
        "The server had an error while processing your request. Sorry about that!",
    )
}

fn openai_auth_error() -> Response {
    openai_error(
        401,
        "invalid_request_error",
        Some("invalid_api_key"),
        "Incorrect API key provided: test-key. You can find your API key at https://platform.openai.com/account/api-keys.",
    )
}

fn responses(shared: &Shared, body: &Value) -> Outcome {
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("gpt")
        .to_string();
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let input = match body.get("input") {
        Some(Value::Array(a)) => a.clone(),
        Some(Value::String(s)) => vec![json!({"type": "message", "role": "user", "content": s})],
        _ => Vec::new(),
    };
    // Codex groups an MCP server's tools in a `namespace` tool (`mcp__orchestrate`); a call of one
    // names the tool and its namespace.
    let mut namespaces: HashMap<String, String> = HashMap::new();
    let offered: Vec<Value> = body
        .get("tools")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .flat_map(
                    |t| match (t.get("type").and_then(Value::as_str), t.get("tools")) {
                        (Some("namespace"), Some(Value::Array(inner))) => {
                            let ns = t.get("name").and_then(Value::as_str).unwrap_or("");
                            for i in inner {
                                if let Some(n) = i.get("name").and_then(Value::as_str) {
                                    namespaces.insert(n.to_string(), ns.to_string());
                                }
                            }
                            inner.clone()
                        }
                        _ => vec![t.clone()],
                    },
                )
                .collect()
        })
        .unwrap_or_default();
    let tools: Vec<Tool> = Some(&offered)
        .map(|a| {
            a.iter()
                .map(|t| Tool {
                    name: t
                        .get("name")
                        .or_else(|| t.pointer("/function/name"))
                        .and_then(Value::as_str)
                        .unwrap_or_else(|| t.get("type").and_then(Value::as_str).unwrap_or(""))
                        .to_string(),
                    custom: t.get("type").and_then(Value::as_str) == Some("custom"),
                    params: t.get("parameters").cloned().unwrap_or(Value::Null),
                })
                .collect()
        })
        .unwrap_or_default();
    // A follow-up: the newest items (after the last user message) include a tool output.
    let last_user = input
        .iter()
        .rposition(|i| i.get("role").and_then(Value::as_str) == Some("user"))
        .map(|p| p + 1)
        .unwrap_or(0);
    let output_item = input[last_user.min(input.len())..].iter().rev().find(|i| {
        i.get("type")
            .and_then(Value::as_str)
            .is_some_and(|t| t.ends_with("_output"))
    });
    let output_id =
        output_item.map(|i| i.get("call_id").and_then(Value::as_str).map(str::to_string));
    let has_instructions = body.get("instructions").is_some();
    let kind = match output_id {
        Some(id) => Kind::FollowUp(id),
        None if tools.is_empty() && !has_instructions => Kind::Auxiliary,
        None => Kind::Conversation,
    };
    let (text, call) = match kind {
        Kind::Auxiliary => (DEFAULT_TEXT.to_string(), None),
        Kind::FollowUp(id) => chain_follow_up(
            shared,
            Api::Responses,
            &tools,
            id.as_deref(),
            result_text(output_item.and_then(|i| i.get("output"))),
            "call_orch",
        )
        .unwrap_or_else(|| (follow_up_text(shared, Api::Responses, id.as_deref()), None)),
        Kind::Conversation => match take_reply(shared, Api::Responses) {
            Reply::Text(t) => (t, None),
            Reply::WriteFile {
                path,
                content,
                then,
            } => {
                let id = format!("call_orch{:06}", shared.next_id());
                remember_call(shared, Api::Responses, &id, &then);
                let cwd = find_cwd(&Value::Array(input.clone()).to_string());
                let call = choose_write_call(&tools, cwd.as_deref(), &path, &content, id);
                (String::new(), Some(call))
            }
            Reply::RateLimit { retry_after_secs } => {
                return Outcome::Respond(openai_rate_limit(retry_after_secs));
            }
            Reply::ServerError => return Outcome::Respond(openai_server_error()),
            Reply::AuthError => return Outcome::Respond(openai_auth_error()),
            Reply::Hang => return Outcome::Hang,
            Reply::CallTool { tool, args, then } => one_call(
                shared,
                Api::Responses,
                &tools,
                &tool,
                args,
                &then,
                "call_orch",
            ),
            Reply::CallTools { calls, then } => {
                start_chain(shared, Api::Responses, &tools, calls, then, "call_orch")
            }
        },
    };
    let resp_id = format!("resp_orch{:06}", shared.next_id());
    let item_id = format!("item_orch{:06}", shared.next_id());
    let item = match &call {
        Some(c) => match &c.custom_input {
            Some(inp) => json!({"type": "custom_tool_call", "id": item_id, "status": "completed",
                "call_id": c.id, "name": c.name, "input": inp}),
            None => {
                let mut item = json!({"type": "function_call", "id": item_id, "status": "completed",
                    "call_id": c.id, "name": c.name, "arguments": c.args.to_string()});
                if let Some(ns) = namespaces.get(&c.name) {
                    item["namespace"] = json!(ns);
                }
                item
            }
        },
        None => {
            json!({"type": "message", "id": item_id, "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]})
        }
    };
    let usage = json!({
        "input_tokens": INPUT_TOKENS,
        "input_tokens_details": {"cached_tokens": CACHED_TOKENS},
        "output_tokens": OUTPUT_TOKENS,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": INPUT_TOKENS + OUTPUT_TOKENS,
    });
    let full = json!({"id": resp_id, "object": "response", "created_at": 0, "status": "completed",
        "model": model, "output": [item.clone()], "usage": usage});
    if !stream {
        return Outcome::Respond(Response::json(200, &full));
    }
    let mut out = String::new();
    let mut seq = 0u64;
    let mut ev = |name: &str, mut data: Value| {
        data["sequence_number"] = json!(seq);
        seq += 1;
        out.push_str(&format!("event: {name}\ndata: {data}\n\n"));
    };
    let mut created = full.clone();
    created["status"] = json!("in_progress");
    created["output"] = json!([]);
    created["usage"] = Value::Null;
    ev(
        "response.created",
        json!({"type": "response.created", "response": created}),
    );
    if call.is_none() {
        let mut added = item.clone();
        added["status"] = json!("in_progress");
        added["content"] = json!([]);
        ev(
            "response.output_item.added",
            json!({"type": "response.output_item.added", "output_index": 0, "item": added}),
        );
        ev(
            "response.output_text.delta",
            json!({"type": "response.output_text.delta", "item_id": item_id, "output_index": 0,
                "content_index": 0, "delta": text}),
        );
    }
    ev(
        "response.output_item.done",
        json!({"type": "response.output_item.done", "output_index": 0, "item": item}),
    );
    ev(
        "response.completed",
        json!({"type": "response.completed", "response": full}),
    );
    Outcome::Respond(Response::sse(out))
}

// ---------------------------------------------------------------------------------------------------
// Gemini

fn gemini_error(status: u16, state: &str, message: &str) -> Response {
    Response::json(
        status,
        &json!({"error": {"code": status, "message": message, "status": state}}),
    )
}

fn gemini(shared: &Shared, body: &Value, model: &str, stream: bool) -> Outcome {
    let contents = body
        .get("contents")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let gen_cfg = body.get("generationConfig").cloned().unwrap_or(Value::Null);
    let schema = gen_cfg
        .get("responseJsonSchema")
        .or_else(|| gen_cfg.get("responseSchema"))
        .cloned();
    let json_mode = schema.is_some()
        || gen_cfg.get("responseMimeType").and_then(Value::as_str) == Some("application/json");
    let tools: Vec<Tool> = body
        .get("tools")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .flat_map(|t| {
                    t.get("functionDeclarations")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default()
                })
                .map(|f| Tool {
                    name: f
                        .get("name")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                    custom: false,
                    params: f
                        .get("parametersJsonSchema")
                        .or_else(|| f.get("parameters"))
                        .cloned()
                        .unwrap_or(Value::Null),
                })
                .collect()
        })
        .unwrap_or_default();
    let last = contents.last();
    let response_id = last
        .and_then(|c| c.get("parts"))
        .and_then(Value::as_array)
        .and_then(|parts| {
            parts
                .iter()
                .rev()
                .find(|p| p.get("functionResponse").is_some())
        })
        .map(|p| {
            p.pointer("/functionResponse/id")
                .and_then(Value::as_str)
                .map(str::to_string)
        });
    let kind = match response_id {
        Some(id) => Kind::FollowUp(id),
        None if json_mode || tools.is_empty() => Kind::Auxiliary,
        None => Kind::Conversation,
    };
    let (text, call) = match kind {
        Kind::Auxiliary => {
            let t = match &schema {
                Some(s) => value_for_schema(s).to_string(),
                None if json_mode => "{}".to_string(),
                None => DEFAULT_TEXT.to_string(),
            };
            (t, None)
        }
        Kind::FollowUp(id) => (follow_up_text(shared, Api::Gemini, id.as_deref()), None),
        Kind::Conversation => match take_reply(shared, Api::Gemini) {
            Reply::Text(t) => (t, None),
            Reply::WriteFile {
                path,
                content,
                then,
            } => {
                let id = format!("call_orch{:06}", shared.next_id());
                remember_call(shared, Api::Gemini, &id, &then);
                let mut all = Value::Array(contents.clone()).to_string();
                if let Some(si) = body.get("systemInstruction") {
                    all.push_str(&si.to_string());
                }
                let cwd = find_cwd(&all);
                let call = choose_write_call(&tools, cwd.as_deref(), &path, &content, id);
                (String::new(), Some(call))
            }
            Reply::RateLimit { retry_after_secs } => {
                let r = gemini_error(
                    429,
                    "RESOURCE_EXHAUSTED",
                    "Resource has been exhausted (e.g. check quota).",
                );
                return Outcome::Respond(match retry_after_secs {
                    Some(s) => r.with_header("retry-after", s.to_string()),
                    None => r,
                });
            }
            Reply::ServerError => {
                return Outcome::Respond(gemini_error(
                    500,
                    "INTERNAL",
                    "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting",
                ));
            }
            Reply::AuthError => {
                return Outcome::Respond(Response::json(
                    400,
                    &json!({"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.",
                        "status": "INVALID_ARGUMENT", "details": [{
                            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                            "reason": "API_KEY_INVALID", "domain": "googleapis.com"}]}}),
                ));
            }
            Reply::Hang => return Outcome::Hang,
            Reply::CallTool { .. } | Reply::CallTools { .. } => (
                "CallTool is scripted for the Anthropic and Responses APIs only".to_string(),
                None,
            ),
        },
    };
    let part = match &call {
        Some(c) => json!({"functionCall": {"id": c.id, "name": c.name, "args": c.args}}),
        None => json!({"text": text}),
    };
    let chunk = json!({
        "candidates": [{"content": {"role": "model", "parts": [part]}, "finishReason": "STOP", "index": 0}],
        "usageMetadata": {
            "promptTokenCount": INPUT_TOKENS,
            "candidatesTokenCount": OUTPUT_TOKENS,
            "totalTokenCount": INPUT_TOKENS + OUTPUT_TOKENS,
            "cachedContentTokenCount": CACHED_TOKENS,
        },
        "modelVersion": model,
        "responseId": format!("orch{:06}", shared.next_id()),
    });
    if stream {
        Outcome::Respond(Response::sse(format!("data: {chunk}\r\n\r\n")))
    } else {
        Outcome::Respond(Response::json(200, &chunk))
    }
}

// ---------------------------------------------------------------------------------------------------
// OpenAI chat completions

fn chat(shared: &Shared, body: &Value) -> Outcome {
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("gpt")
        .to_string();
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let tools: Vec<Tool> = body
        .get("tools")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|t| Tool {
                    name: t
                        .pointer("/function/name")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                    custom: false,
                    params: t
                        .pointer("/function/parameters")
                        .cloned()
                        .unwrap_or(Value::Null),
                })
                .collect()
        })
        .unwrap_or_default();
    let last = messages.last();
    let kind = match last {
        Some(m) if m.get("role").and_then(Value::as_str) == Some("tool") => Kind::FollowUp(
            m.get("tool_call_id")
                .and_then(Value::as_str)
                .map(str::to_string),
        ),
        _ => Kind::Conversation,
    };
    let (text, call) = match kind {
        Kind::Auxiliary => (DEFAULT_TEXT.to_string(), None),
        Kind::FollowUp(id) => (follow_up_text(shared, Api::Chat, id.as_deref()), None),
        Kind::Conversation => match take_reply(shared, Api::Chat) {
            Reply::Text(t) => (t, None),
            Reply::WriteFile {
                path,
                content,
                then,
            } => {
                let id = format!("call_orch{:06}", shared.next_id());
                remember_call(shared, Api::Chat, &id, &then);
                let cwd = find_cwd(&Value::Array(messages.clone()).to_string());
                let call = choose_write_call(&tools, cwd.as_deref(), &path, &content, id);
                (String::new(), Some(call))
            }
            Reply::RateLimit { retry_after_secs } => {
                return Outcome::Respond(openai_rate_limit(retry_after_secs));
            }
            Reply::ServerError => return Outcome::Respond(openai_server_error()),
            Reply::AuthError => return Outcome::Respond(openai_auth_error()),
            Reply::Hang => return Outcome::Hang,
            Reply::CallTool { .. } | Reply::CallTools { .. } => (
                "CallTool is scripted for the Anthropic and Responses APIs only".to_string(),
                None,
            ),
        },
    };
    let id = format!("chatcmpl-orch{:06}", shared.next_id());
    let usage = json!({
        "prompt_tokens": INPUT_TOKENS,
        "completion_tokens": OUTPUT_TOKENS,
        "total_tokens": INPUT_TOKENS + OUTPUT_TOKENS,
        "prompt_tokens_details": {"cached_tokens": CACHED_TOKENS},
    });
    let tool_calls = call.as_ref().map(|c| {
        json!([{"index": 0, "id": c.id, "type": "function",
            "function": {"name": c.name, "arguments": c.args.to_string()}}])
    });
    let finish = if call.is_some() { "tool_calls" } else { "stop" };
    if !stream {
        let mut message = json!({"role": "assistant", "content": if call.is_some() { Value::Null } else { json!(text) }});
        if let Some(tc) = &tool_calls {
            message["tool_calls"] = tc.clone();
        }
        return Outcome::Respond(Response::json(
            200,
            &json!({"id": id, "object": "chat.completion", "created": 0, "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": finish}], "usage": usage}),
        ));
    }
    let chunk = |choices: Value| json!({"id": id, "object": "chat.completion.chunk", "created": 0, "model": model, "choices": choices});
    let mut out = String::new();
    let mut delta = json!({"role": "assistant"});
    match &tool_calls {
        Some(tc) => delta["tool_calls"] = tc.clone(),
        None => delta["content"] = json!(text),
    }
    out.push_str(&format!(
        "data: {}\n\n",
        chunk(json!([{"index": 0, "delta": delta, "finish_reason": null}]))
    ));
    out.push_str(&format!(
        "data: {}\n\n",
        chunk(json!([{"index": 0, "delta": {}, "finish_reason": finish}]))
    ));
    if include_usage {
        let mut u = chunk(json!([]));
        u["usage"] = usage;
        out.push_str(&format!("data: {u}\n\n"));
    }
    out.push_str("data: [DONE]\n\n");
    Outcome::Respond(Response::sse(out))
}
