//! `orchestrate serve`: bind, say where (and the token, when one was made up), then answer until
//! SIGINT or SIGTERM. The server itself is [`crate::serve`]; this file only prints.

use anyhow::Result;

use super::{Cli, Project};

pub fn run(cli: &Cli, project: Project, opts: crate::serve::Options) -> Result<i32> {
    let bound = crate::serve::bind(project, opts)?;
    let addr = bound.local_addr()?;
    let mut out = super::Out::new();
    if cli.json {
        out.json(&serde_json::json!({"listening": format!("http://{addr}"), "token": bound.generated_token}).to_string())?;
    } else {
        outln!(out, "listening on http://{addr}")?;
        if let Some(t) = &bound.generated_token {
            outln!(out, "token (shown once): {t}")?;
            outln!(
                out,
                "open http://{addr}/?token={t} to log a browser in (the dashboard)"
            )?;
        }
    }
    out.flush()?;
    bound.run()?;
    Ok(0)
}
