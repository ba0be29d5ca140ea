//! `orchestrate serve`: bind, say where (and the token, when one was made up), then answer until
//! SIGINT or SIGTERM. The server itself is [`crate::serve`]; this file only prints.

use anyhow::Result;

use super::{Cli, Project};

pub fn run(cli: &Cli, project: Project, opts: crate::serve::Options) -> Result<i32> {
    // The MCP server reads the folder's own mirror: with --database-url alone there is none to read.
    let mcp = opts.database_url.is_none();
    let mut bound = crate::serve::bind(project, opts)?;
    if mcp {
        let project = Project::load(cli.root.as_deref(), cli.config.as_deref())?;
        bound.mount_mcp(crate::mcp::http_router(
            project,
            bound.read_only(),
            bound.has_token(),
        ));
    }
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
