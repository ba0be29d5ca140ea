//! `orchestrate merge ID` and `orchestrate discard ID`: print what [`Project::merge_kept`] and
//! [`Project::discard_kept`] did with a completed task's kept branch.

use anyhow::Result;

use super::{Cli, Project};
use crate::project::land::Merged;

pub fn merge(
    cli: &Cli,
    project: &Project,
    id: &str,
    commit: bool,
    candidate: Option<&str>,
) -> Result<i32> {
    let mut out = super::Out::new();
    let merged = match candidate {
        Some(c) => project.merge_candidate(id, c, commit)?,
        None => project.merge_kept(id, commit)?,
    };
    match merged {
        Merged::Conflict { files, branch } => {
            if cli.json {
                super::print_json(
                    &serde_json::json!({"id": id, "merge": "conflict", "conflicts": files}),
                )?;
            } else {
                outln!(
                    out,
                    "{id}: not merged, nothing written: {} conflict with your working tree; its branch {branch} is kept",
                    files.join(", ")
                )?;
                out.flush()?;
            }
            Ok(1)
        }
        Merged::Landed { how, branch } => {
            if cli.json {
                super::print_json(&serde_json::json!({"id": id, "merge": how}))?;
            } else {
                outln!(out, "{id}: {how}; branch {branch} deleted")?;
                out.flush()?;
            }
            Ok(0)
        }
    }
}

pub fn discard(cli: &Cli, project: &Project, id: &str) -> Result<i32> {
    let branch = project.discard_kept(id)?;
    if cli.json {
        super::print_json(&serde_json::json!({"id": id, "merge": "discarded"}))?;
    } else {
        let mut out = super::Out::new();
        outln!(
            out,
            "{id}: branch {branch} deleted; its changes are discarded"
        )?;
        out.flush()?;
    }
    Ok(0)
}
