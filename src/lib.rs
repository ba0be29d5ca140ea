//! orchestrate: a supervisor for AI coding-agent CLIs, driven by a folder of YAML task files.
//!
//! Data flows one way: `watch` → `supervisor` (intake) → `scheduler` → `supervisor` (attempt:
//! `spool`, `process`/`agents`, `snapshot`, `context`) → `spool` → `mirror`. The files are the truth;
//! the mirror can be rebuilt from them at any time. The modules are layered (leaves, records,
//! mechanisms, agents, context, mirror, decisions, the loop, surfaces): `docs/architecture.md`
//! explains them and `tests/layering.rs` keeps them so.

// Unit tests may unwrap: a panic is exactly how a test should fail.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod agents;
pub mod budget;
pub mod cli;
pub mod config;
pub mod console;
pub mod context;
pub mod cooldown;
pub mod error;
pub mod failpoint;
pub mod fsutil;
pub mod git;
pub mod instance;
pub mod layout;
pub mod llm;
pub mod login;
pub mod marker;
pub mod mcp;
pub mod mirror;
pub mod notify;
pub mod process;
pub mod project;
pub mod record;
pub mod redact;
pub mod router;
pub mod scheduler;
pub mod serve;
pub mod snapshot;
pub mod spool;
pub mod supervisor;
pub mod task;
pub mod tui;
pub mod watch;
pub mod writers;
pub mod yaml;
