//! The routes of `/api/v1` and `/metrics`, and how an error becomes an HTTP answer.
//!
//! Reads run on blocking threads (the mirror's readers are synchronous, and a PostgreSQL reader
//! drives its own runtime); every JSON body has its strings redacted before it leaves.

use std::convert::Infallible;
use std::sync::Arc;

use anyhow::Result;
use axum::extract::{Path, Query, State as Extract};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use super::{State, error_response};
use crate::error::UsageError;
use crate::mirror::read::Reader;
use crate::project::{NewTask, Retried};

pub fn router(state: Arc<State>, mcp: Option<Router>) -> Router {
    let app = Router::new();
    let app = match mcp {
        Some(mcp) => app.nest_service("/mcp", mcp),
        None => app,
    };
    app.route("/", get(dashboard))
        .route("/api/v1/status", get(status))
        .route("/api/v1/tasks", get(tasks).post(add))
        .route("/api/v1/tasks/{id}", get(task))
        .route("/api/v1/tasks/{id}/log", get(log))
        .route("/api/v1/tasks/{id}/cancel", post(cancel))
        .route("/api/v1/tasks/{id}/retry", post(retry))
        .route("/api/v1/agents", get(agents))
        .route("/api/v1/hosts", get(hosts))
        .route("/api/v1/events", get(events))
        .route("/metrics", get(metrics))
        .fallback(|| async { error_response(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            super::auth::guard,
        ))
        .with_state(state)
}

/// An error as the CLI's exit codes would classify it: a usage error (exit 2) is the request's
/// fault — 404 when it names a task that is not there, else 400; anything else (exit 1) is 500.
struct ApiError(anyhow::Error);

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> ApiError {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let text = format!("{:#}", self.0);
        let status = match self.0.downcast_ref::<UsageError>() {
            Some(UsageError(m)) if m.starts_with("no task ") => StatusCode::NOT_FOUND,
            Some(_) => StatusCode::BAD_REQUEST,
            None => StatusCode::INTERNAL_SERVER_ERROR,
        };
        error_response(status, &text)
    }
}

type Answer = Result<Response, ApiError>;

/// Run `f` on a blocking thread with a reader of the mirror, and send its value as redacted JSON.
async fn read_json<T: serde::Serialize + Send + 'static>(
    state: Arc<State>,
    f: impl FnOnce(&State, &Reader) -> Result<T> + Send + 'static,
) -> Answer {
    let s = state.clone();
    let value = blocking(move || {
        let reader = s.project.reader(s.database_url.as_deref())?;
        f(&s, &reader)
    })
    .await?;
    Ok(json(&state, &value, StatusCode::OK)?)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| anyhow::anyhow!("request handler failed: {e}"))?
}

/// Serialise with every string value (and key) redacted.
fn json<T: serde::Serialize>(state: &State, value: &T, status: StatusCode) -> Result<Response> {
    let mut v = serde_json::to_value(value)?;
    state.redactor.redact_json(&mut v);
    Ok((status, Json(v)).into_response())
}

/// The dashboard: one page, embedded, that reads everything else through this API.
async fn dashboard() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Nothing but this page's own inline code and the API it reads.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self'; img-src 'self' data:; form-action 'none'; base-uri 'none'",
            ),
            (header::CACHE_CONTROL, "no-store"),
        ],
        include_str!("dashboard.html"),
    )
        .into_response()
}

async fn status(Extract(state): Extract<Arc<State>>) -> Answer {
    read_json(state, |s, reader| {
        crate::project::status::status(&s.project, reader, s.database_url.as_deref())
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TasksQuery {
    state: Option<String>,
    agent: Option<String>,
    limit: Option<usize>,
    after: Option<String>,
    order: Option<String>,
}

/// Tasks oldest change first (`order=newest`: newest first); `after=ID` starts past that task (the
/// last of the previous page), `limit=N` keeps the first N.
async fn tasks(Extract(state): Extract<Arc<State>>, Query(q): Query<TasksQuery>) -> Answer {
    read_json(state, move |_, reader| {
        let st = q
            .state
            .as_deref()
            .map(|s| if s == "active" { "running" } else { s });
        if let Some(s) = st
            && !["pending", "running", "completed", "failed"].contains(&s)
        {
            anyhow::bail!(UsageError(format!(
                "state must be pending, running (or active), completed or failed, not `{s}`"
            )));
        }
        let mut rows = reader.list(st)?;
        if let Some(a) = &q.agent {
            rows.retain(|r| r.agent.as_deref() == Some(a.as_str()));
        }
        match q.order.as_deref() {
            None | Some("oldest") => {}
            Some("newest") => rows.reverse(),
            Some(o) => anyhow::bail!(UsageError(format!(
                "order must be oldest or newest, not `{o}`"
            ))),
        }
        if let Some(after) = &q.after {
            let Some(i) = rows.iter().position(|r| &r.id == after) else {
                anyhow::bail!(UsageError(format!(
                    "after={after}: no such task in this listing"
                )));
            };
            rows.drain(..=i);
        }
        if let Some(n) = q.limit {
            rows.truncate(n);
        }
        Ok(rows)
    })
    .await
}

async fn task(Extract(state): Extract<Arc<State>>, Path(id): Path<String>) -> Answer {
    read_json(state, move |s, reader| {
        if reader.is_local() {
            return Ok(serde_json::to_value(s.project.show(reader, &id)?)?);
        }
        let Some(row) = reader.get(&id)? else {
            anyhow::bail!(UsageError(format!("no task {id} in the database")));
        };
        Ok(serde_json::json!({"task": row, "attempts": reader.attempts_of(&id)?}))
    })
    .await
}

/// The running attempt's log so far, as text.
#[derive(Deserialize)]
struct LogQuery {
    /// `1` (or `true`): keep the answer open and send the log as it grows, until the attempt ends.
    follow: Option<String>,
}

async fn log(
    Extract(state): Extract<Arc<State>>,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
) -> Answer {
    let follow = match q.follow.as_deref() {
        None | Some("0") | Some("false") => false,
        Some("1") | Some("true") => true,
        Some(other) => {
            return Err(
                anyhow::Error::new(UsageError(format!("follow={other}: use follow=1"))).into(),
            );
        }
    };
    let s = state.clone();
    let task_id = id.clone();
    let (path, text) = blocking(move || {
        let reader = s.project.reader(s.database_url.as_deref())?;
        if !reader.is_local() {
            anyhow::bail!(UsageError(
                "logs live in the folder; this server reads PostgreSQL alone".into()
            ));
        }
        let Some(row) = reader.get(&id)? else {
            anyhow::bail!(UsageError(format!("no task {id}")));
        };
        if row.state != "running" {
            anyhow::bail!(UsageError(format!(
                "task {id} is {}, not running: its output is in GET /api/v1/tasks/{id}",
                row.state
            )));
        }
        let path = s.project.layout.log_path(&id, row.payload.attempts.max(1));
        let bytes = std::fs::read(&path).unwrap_or_default();
        Ok((path, bytes))
    })
    .await?;
    let content_type = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    if !follow {
        let text = state
            .redactor
            .redact_owned(String::from_utf8_lossy(&text).into_owned());
        return Ok((content_type, text).into_response());
    }
    // Whole lines only, each redacted: a secret cut between two reads would slip past the
    // redactor. What is read so far goes first, then what the log gains.
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(64);
    let s = state.clone();
    tokio::task::spawn_blocking(move || follow_log(&s, &task_id, &path, text, &tx));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, Infallible>(axum::body::Bytes::from(chunk)), rx))
    });
    Ok((content_type, axum::body::Body::from_stream(stream)).into_response())
}

/// Send the log at `path` of running task `id` line by line as it grows, starting with `first`
/// (what was read already), until the attempt is no longer running or the client has gone.
fn follow_log(
    s: &State,
    id: &str,
    path: &std::path::Path,
    first: Vec<u8>,
    tx: &tokio::sync::mpsc::Sender<String>,
) {
    use std::io::{Read, Seek, SeekFrom};
    const POLL: std::time::Duration = std::time::Duration::from_millis(200);
    let mut offset = first.len() as u64;
    let mut pending = first;
    let mut last_look = std::time::Instant::now();
    let send_lines = |pending: &mut Vec<u8>, all: bool| -> bool {
        let cut = if all {
            pending.len()
        } else {
            pending
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |i| i + 1)
        };
        if cut == 0 {
            return true;
        }
        let text = String::from_utf8_lossy(&pending[..cut]).into_owned();
        pending.drain(..cut);
        tx.blocking_send(s.redactor.redact_owned(text)).is_ok()
    };
    loop {
        if !send_lines(&mut pending, false) {
            return;
        }
        std::thread::sleep(POLL);
        if tx.is_closed() {
            return;
        }
        if let Ok(mut f) = std::fs::File::open(path)
            && f.seek(SeekFrom::Start(offset)).is_ok()
        {
            let mut more = vec![];
            if f.read_to_end(&mut more).is_ok() {
                offset += more.len() as u64;
                pending.extend(more);
            }
        }
        // The attempt's end, looked for once a second: then the rest goes, and the answer ends.
        if last_look.elapsed() >= std::time::Duration::from_secs(1) {
            last_look = std::time::Instant::now();
            let running = s
                .project
                .reader(s.database_url.as_deref())
                .and_then(|r| r.get(id))
                .is_ok_and(|row| row.is_some_and(|r| r.state == "running"));
            if !running {
                send_lines(&mut pending, true);
                return;
            }
        }
    }
}

async fn agents(Extract(state): Extract<Arc<State>>) -> Answer {
    read_json(state, |s, reader| s.project.agents(reader)).await
}

/// The cluster's hosts (`[]` when there is no cluster to read); a queue that cannot be read is a 500.
async fn hosts(Extract(state): Extract<Arc<State>>) -> Answer {
    let s = state.clone();
    let hosts = blocking(move || match s.project.cluster(s.database_url.as_deref()) {
        None => Ok(vec![]),
        Some(view) => Ok(view?.hosts),
    })
    .await?;
    Ok(json(&state, &hosts, StatusCode::OK)?)
}

async fn add(Extract(state): Extract<Arc<State>>, body: axum::body::Bytes) -> Answer {
    let new: NewTask = serde_json::from_slice(&body)
        .map_err(|e| anyhow::Error::new(UsageError(format!("request body: {e}"))))?;
    let s = state.clone();
    let (id, file) = blocking(move || s.project.add_task(&new)).await?;
    Ok(json(
        &state,
        &serde_json::json!({"id": id, "file": file}),
        StatusCode::CREATED,
    )?)
}

async fn cancel(Extract(state): Extract<Arc<State>>, Path(id): Path<String>) -> Answer {
    let s = state.clone();
    let i = id.clone();
    let what = blocking(move || s.project.cancel(&i)).await?;
    Ok(json(
        &state,
        &serde_json::json!({"id": id, "result": what}),
        StatusCode::OK,
    )?)
}

async fn retry(Extract(state): Extract<Arc<State>>, Path(id): Path<String>) -> Answer {
    let s = state.clone();
    let i = id.clone();
    let body = match blocking(move || s.project.retry(&i)).await? {
        Retried::RunsNow => serde_json::json!({"id": id, "state": "pending", "runs": "now"}),
        Retried::Pending { previous_attempts } => serde_json::json!(
            {"id": id, "state": "pending", "previous_attempts": previous_attempts}
        ),
    };
    Ok(json(&state, &body, StatusCode::OK)?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    since: Option<i64>,
}

/// Task events as server-sent events, the mirror's sequence number as each one's id. A client that
/// reconnects with `Last-Event-ID` gets every event after it; `?since=N` does the same on a first
/// connection; without either the stream starts with the next event.
async fn events(
    Extract(state): Extract<Arc<State>>,
    headers: HeaderMap,
    Query(q): Query<EventsQuery>,
) -> Answer {
    let last = match headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<i64>().ok())
                .ok_or_else(|| {
                    anyhow::Error::new(UsageError(
                        "Last-Event-ID must be an event sequence number".into(),
                    ))
                })?,
        ),
        None => None,
    };
    let since = last.or(q.since);
    let (tx, rx) = tokio::sync::mpsc::channel::<SseEvent>(256);
    let s = state.clone();
    let source = blocking(move || s.project.source(s.database_url.as_deref())).await?;
    let s = state.clone();
    // The feed is synchronous; it stops at the first event after the client went away.
    tokio::task::spawn_blocking(move || {
        let r = source.follow(
            since,
            |e| {
                let mut v = serde_json::to_value(e)?;
                s.redactor.redact_json(&mut v);
                let ev = SseEvent::default()
                    .id(e.seq.to_string())
                    .event("task")
                    .data(v.to_string());
                Ok(tx.blocking_send(ev).is_err())
            },
            |_, _| {},
        );
        if let Err(e) = r {
            let _ = tx.blocking_send(
                SseEvent::default()
                    .event("error")
                    .data(s.redactor.redact(&format!("{e:#}"))),
            );
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

async fn metrics(Extract(state): Extract<Arc<State>>) -> Answer {
    let s = state.clone();
    let text = blocking(move || {
        let reader = s.project.reader(s.database_url.as_deref())?;
        super::metrics::render(&s, &reader)
    })
    .await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}
