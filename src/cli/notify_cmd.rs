//! `orchestrate notify test [CHANNEL]`: send a sample event on the configured channels (or the one
//! named) now, without a supervisor, and print what each receiver answered. Exit 0 when every one
//! accepted it, 1 when one did not, 2 when there is no such channel.

use anyhow::Result;

use super::{Cli, Project};

pub fn test(cli: &Cli, project: &Project, channel: Option<&str>) -> Result<i32> {
    let names: Vec<&str> = project.cfg.notify.iter().map(|c| c.name()).collect();
    if names.is_empty() {
        return Err(crate::error::UsageError(
            "no notification channels: add some under `notify` in config.yaml (see docs/configuration.md)".into(),
        )
        .into());
    }
    if let Some(c) = channel
        && !names.contains(&c)
    {
        return Err(crate::error::UsageError(format!(
            "no channel named `{c}` under `notify` (channels: {})",
            names.join(", ")
        ))
        .into());
    }
    let results = crate::notify::sender::test(&project.cfg, &project.layout, channel);
    let ok = results.iter().all(|(_, r)| r.is_ok());
    let mut out = super::Out::new();
    if cli.json {
        let v: Vec<serde_json::Value> = results
            .iter()
            .map(|(name, r)| match r {
                Ok(a) => serde_json::json!({"channel": name, "ok": true, "answer": a}),
                Err(e) => {
                    serde_json::json!({"channel": name, "ok": false, "error": format!("{e:#}")})
                }
            })
            .collect();
        out.json(&serde_json::to_string_pretty(&v)?)?;
    } else {
        for (name, r) in &results {
            match r {
                Ok(a) => outln!(out, "{name}: delivered: {a}")?,
                Err(e) => outln!(out, "{name}: FAILED: {e:#}")?,
            }
        }
    }
    out.flush()?;
    Ok(if ok { 0 } else { 1 })
}
