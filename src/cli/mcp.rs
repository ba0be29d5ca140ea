//! `orchestrate mcp`: start the MCP server ([`crate::mcp`]) on stdio, or print the snippet that
//! registers it with a client. It prints nothing while serving: stdout is the protocol's.

use anyhow::Result;

use super::{Cli, Project};

/// A client whose registration snippet `--print-config` prints.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Client {
    Claude,
    Codex,
    Gemini,
    Cursor,
}

pub fn run(project: Project) -> Result<i32> {
    crate::mcp::run(project)?;
    Ok(0)
}

/// The snippet for `client`, naming this project's root (and configuration, when one was given) so
/// the server works on it wherever the client starts it.
pub fn print_config(cli: &Cli, client: Client) -> Result<i32> {
    let root = match &cli.root {
        Some(r) => std::path::absolute(r)?,
        None => std::env::current_dir()?,
    };
    let mut args = vec!["-C".to_string(), root.display().to_string()];
    if let Some(c) = &cli.config {
        args.push("--config".into());
        args.push(std::path::absolute(c)?.display().to_string());
    }
    args.push("mcp".into());
    let program = "orchestrate";
    let json = || {
        serde_json::to_string_pretty(&serde_json::json!({
            "mcpServers": {"orchestrate": {"command": program, "args": args}}
        }))
    };
    let text = match client {
        Client::Claude => format!(
            "# run this (or give the JSON below to `claude --mcp-config FILE`)\nclaude mcp add orchestrate -- {program} {}\n\n{}",
            args.iter()
                .map(|a| shell_quote(a))
                .collect::<Vec<_>>()
                .join(" "),
            json()?
        ),
        Client::Codex => format!(
            "# add to ~/.codex/config.toml\n[mcp_servers.orchestrate]\ncommand = {}\nargs = [{}]",
            toml_str(program),
            args.iter()
                .map(|a| toml_str(a))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Client::Gemini => format!(
            "// merge into ~/.gemini/settings.json (or .gemini/settings.json in a project)\n{}",
            json()?
        ),
        Client::Cursor => format!(
            "// merge into .cursor/mcp.json (or ~/.cursor/mcp.json)\n{}",
            json()?
        ),
    };
    let mut out = super::Out::new();
    for line in text.lines() {
        outln!(out, "{line}")?;
    }
    out.flush()?;
    Ok(0)
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:@".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// A TOML basic string (JSON's escaping is valid TOML for these).
fn toml_str(s: &str) -> String {
    serde_json::Value::String(s.into()).to_string()
}
