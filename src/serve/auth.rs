//! The server's one token: made up, hashed, stored, and checked on every request.
//!
//! The token itself is never written anywhere: only its SHA-256, so the state directory gives away
//! nothing a request could use.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::extract::{Request, State as Extract};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};

use super::{State, error_response};

/// The cookie that opening the printed link sets.
pub const COOKIE: &str = "orchestrate_token";

/// 32 random bytes from the kernel, as hex.
pub fn new_token() -> Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("cannot read /dev/urandom for a token")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

pub fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Keep the hash of the token in force in `state_dir/serve-token.sha256`.
pub fn store_hash(state_dir: &Path, h: &[u8; 32]) -> Result<()> {
    std::fs::create_dir_all(state_dir)?;
    let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
    let path = state_dir.join("serve-token.sha256");
    crate::fsutil::atomic_write(&path, format!("{hex}\n").as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Compare without stopping at the first difference, so timing tells nothing about the token.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token a request carries: bearer header, cookie, or `?token=` (the printed link).
fn presented(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    if let Some(v) = headers.get(header::AUTHORIZATION)
        && let Ok(v) = v.to_str()
        && let Some(t) = v.strip_prefix("Bearer ")
    {
        return Some(t.trim().to_string());
    }
    for v in headers.get_all(header::COOKIE) {
        for part in v.to_str().unwrap_or_default().split(';') {
            if let Some(t) = part.trim().strip_prefix(&format!("{COOKIE}=")) {
                return Some(t.to_string());
            }
        }
    }
    query?
        .split('&')
        .find_map(|kv| kv.strip_prefix("token="))
        .map(String::from)
}

/// Let a request in or answer 401 (without the token, first); a write on a read-only server gets 403.
pub async fn guard(Extract(state): Extract<Arc<State>>, req: Request, next: Next) -> Response {
    let read_only = |req: &Request| {
        // MCP sends every message, reads too, as a POST: its server leaves out its writes itself.
        let mcp = req.uri().path() == "/mcp" || req.uri().path().starts_with("/mcp/");
        (req.method() == Method::POST && state.read_only && !mcp).then(|| {
            error_response(
                StatusCode::FORBIDDEN,
                "this server is read-only (--read-only, or --database-url)",
            )
        })
    };
    let Some(expected) = &state.token_hash else {
        return match read_only(&req) {
            Some(refused) => refused,
            None => next.run(req).await,
        };
    };
    let from_query = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv.starts_with("token=")));
    match presented(req.headers(), req.uri().query()) {
        Some(t) if same(&hash(&t), expected) => {
            if let Some(refused) = read_only(&req) {
                return refused;
            }
            let mut resp = next.run(req).await;
            let cookie = format!("{COOKIE}={t}; HttpOnly; SameSite=Strict; Path=/");
            if from_query && let Ok(v) = cookie.parse() {
                resp.headers_mut().insert(header::SET_COOKIE, v);
            }
            resp
        }
        _ => error_response(
            StatusCode::UNAUTHORIZED,
            "this server needs its token: an `Authorization: Bearer TOKEN` header, or open the link it printed",
        ),
    }
}
