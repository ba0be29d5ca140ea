//! Command-line interface: argument definitions, the project context every command starts from, and
//! one module per subcommand. Read commands (`status`, `tasks`, `agents`, `show`, `follow`) read the
//! mirror through one read API ([`crate::mirror::read`]) and the tree, and never need a running
//! supervisor; [`Project::source`] is the one place that picks the database they read.
//!
//! Commands print through [`Out`] (`outln!`), never `println!`: human text has its control
//! characters made visible by [`crate::console::visible`], JSON by [`crate::console::json_visible`],
//! and a closed stdout ends the command quietly ([`crate::error::OutputClosed`]) instead of a panic.

/// One line of human-readable text to an [`Out`]: `outln!(out, "format", args)?`.
macro_rules! outln {
    ($out:expr) => {
        $out.line("")
    };
    ($out:expr, $($arg:tt)*) => {
        $out.line(&format!($($arg)*))
    };
}

mod add;
mod agents;
mod cancel;
mod completions;
mod fake_agent;
mod follow;
mod init;
mod land;
mod man;
mod mcp;
mod mirror_cmd;
mod notify_cmd;
mod openai_agent;
mod retry;
mod serve;
mod show;
mod start;
mod status;
mod tasks;
mod validate;
mod watch;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

pub use crate::project::Project;

/// The help heading of the options every command takes, so a command's own options stand apart.
const GLOBAL: &str = "Global options";

#[derive(Debug, Parser)]
#[command(
    name = "orchestrate",
    version,
    about = "Run AI coding-agent CLIs from a watched folder"
)]
pub struct Cli {
    /// Project root (holds config.yaml, tasks/ and context/); default: the current directory.
    #[arg(short = 'C', long, global = true, env = "ORCHESTRATE_ROOT", help_heading = GLOBAL)]
    pub root: Option<PathBuf>,
    /// Configuration file; default: <root>/config.yaml, else the built-in defaults.
    #[arg(long, global = true, help_heading = GLOBAL)]
    pub config: Option<PathBuf>,
    /// Machine-readable output (JSON).
    #[arg(long, global = true, help_heading = GLOBAL)]
    pub json: bool,
    /// Read from this PostgreSQL mirror instead of the local folder (status, tasks, show, follow, serve, watch).
    #[arg(long, global = true, value_name = "URL", help_heading = GLOBAL)]
    pub database_url: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create config.yaml, the tasks/ spool, context/ and .orchestrate/ in the project root.
    Init,
    /// Run the supervisor (foreground unless --detach).
    Start {
        /// Process everything runnable, then exit (for CI jobs).
        #[arg(long)]
        once: bool,
        /// Run in the background; the pid is written to .orchestrate/supervisor.pid.
        #[arg(long, conflicts_with = "once")]
        detach: bool,
        /// More output (-v: every decision).
        #[arg(short, long, action = clap::ArgAction::Count)]
        verbose: u8,
        /// Also answer `orchestrate serve`'s API and dashboard on ADDR (its token, when it needs
        /// one, from ORCHESTRATE_SERVE_TOKEN).
        #[arg(long, value_name = "ADDR", conflicts_with = "detach")]
        serve: Option<String>,
    },
    /// Stop running supervisors gracefully (agents get SIGTERM, then SIGKILL after the grace period).
    Stop {
        /// Seconds to wait for them to exit.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Write a new task into tasks/pending/ and print its id.
    Add {
        /// What to do: the prompt's first part (the `shell` agent runs it as a command).
        description: String,
        /// high, normal (default), low, or an integer (larger runs sooner).
        #[arg(long, value_parser = parse_priority)]
        priority: Option<crate::task::Priority>,
        /// A configured agent; default: routing decides (rules, router, then routing.fallback).
        #[arg(long)]
        agent: Option<String>,
        /// Run only after this task completed (repeatable; it must exist).
        #[arg(long = "after", value_name = "ID")]
        after: Vec<String>,
        /// A file to include in the prompt (repeatable).
        #[arg(long = "context", value_name = "FILE")]
        context: Vec<String>,
        /// Free text that routing rules can match.
        #[arg(long = "type")]
        task_type: Option<String>,
        /// Where the agent runs, relative to the project root; default: the root.
        #[arg(long)]
        workdir: Option<String>,
        /// Time limit of one attempt; default: the agent's, else task_queue.timeout_minutes.
        #[arg(long)]
        timeout_minutes: Option<f64>,
        /// Failed attempts retried this many times; default: task_queue.max_retries.
        #[arg(long)]
        max_retries: Option<u32>,
        /// What all attempts together may cost, in USD; once spent, no retry.
        #[arg(long, value_name = "USD")]
        max_cost_usd: Option<f64>,
        /// A shell command run after the agent; the task completes only when it exits 0
        /// (for example `cargo test`).
        #[arg(long, value_name = "COMMAND")]
        check: Option<String>,
        /// Race several candidates: agents separated by commas (`claude,codex`), or a count
        /// (`3`: that many attempts on the agent routing picks).
        #[arg(long = "fan-out", value_name = "AGENTS|N", value_parser = parse_fan_out)]
        fan_out: Option<crate::task::FanOut>,
        /// Which candidate lands: first_pass (default), judge, all.
        #[arg(long, value_parser = parse_pick)]
        pick: Option<crate::task::Pick>,
        /// The agent that chooses with `--pick judge`.
        #[arg(long, value_name = "AGENT")]
        judge: Option<String>,
        /// Use this id instead of the next task_NNN.
        #[arg(long)]
        id: Option<String>,
    },
    /// Counts, running tasks and supervisors.
    Status,
    /// List tasks.
    Tasks {
        /// Only tasks in this state (pending, running or active, completed, failed), or the files in
        /// quarantine/ (quarantined).
        #[arg(long)]
        status: Option<String>,
        /// Only the N most recently updated (listed oldest first, like `tail`).
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
    },
    /// Configured agents: installed or not, cooling down or in need of a login, running instances,
    /// totals.
    Agents {
        /// Clear this agent's "needs login" mark (after logging it in): tasks go to it again.
        #[arg(long, value_name = "NAME")]
        reset: Option<String>,
    },
    /// One task: its file, result, output and diff.
    Show { id: String },
    /// Move a failed task back to pending (its attempt history is kept).
    Retry { id: String },
    /// Land a completed task's changes kept on its branch (`merge: branch`, or a conflict) into the
    /// working tree, all or nothing; exit 1 and nothing written when they conflict.
    Merge {
        id: String,
        /// Also commit them on the current branch.
        #[arg(long)]
        commit: bool,
        /// For a fan-out task: land this candidate's branch (`pick: all` keeps them all).
        #[arg(long, value_name = "NAME")]
        candidate: Option<String>,
    },
    /// Delete a completed task's kept branch, and its changes with it.
    Discard { id: String },
    /// Cancel a pending task, or stop a running one; it ends in failed/.
    Cancel { id: String },
    /// Check task files (or the configuration) and report errors with line and column; exit 1 on any error.
    Validate {
        files: Vec<PathBuf>,
        /// Check the configuration (--config FILE, else <root>/config.yaml) instead of task files.
        #[arg(long = "check-config")]
        check_config: bool,
    },
    /// Print task events as they happen (from PostgreSQL with --database-url, else the local mirror).
    Follow {
        /// Start after this event sequence number (0: everything); default: only new events.
        #[arg(long)]
        since: Option<i64>,
        /// Exit after this many events.
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Serve a dashboard (/), the JSON API (/api/v1), server-sent events and Prometheus metrics over HTTP.
    Serve {
        /// Address and port to listen on (port 0: any free one); not loopback only with a token.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7777")]
        listen: String,
        /// The token every request must carry (bearer header, or the cookie the printed link sets).
        #[arg(long, env = "ORCHESTRATE_SERVE_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Make up a token, print it once with a link that logs a browser in.
        #[arg(long, conflicts_with = "token")]
        generate_token: bool,
        /// Refuse every write (POST).
        #[arg(long)]
        read_only: bool,
    },
    /// The live terminal UI: the task table, counts, agents and cooldowns; Enter shows a task's
    /// output or log tail and its diff, c cancels, r retries, q quits. When stdout is not a terminal
    /// it prints one plain snapshot instead (or, with --follow, the snapshot and then events).
    Watch {
        /// Not a terminal: after the snapshot, print task events as they happen (as `follow`).
        #[arg(long)]
        follow: bool,
    },
    /// Serve the Model Context Protocol on stdin/stdout, so an agent (Claude Code, Codex, Gemini
    /// CLI, Cursor) can add tasks, wait for them and read their results.
    Mcp {
        /// Print the snippet that registers this server with a client, instead of serving.
        #[arg(long, value_enum, value_name = "CLIENT")]
        print_config: Option<mcp::Client>,
    },
    /// Print the completion script for a shell to stdout (needs no project).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout, or write one page per subcommand into a folder (needs no
    /// project).
    Man {
        /// Write one page per subcommand (orchestrate.1, orchestrate-add.1 and so on) into this
        /// folder, created if missing, and print their paths.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Notification channels (`notify` in config.yaml).
    Notify {
        #[command(subcommand)]
        action: NotifyAction,
    },
    /// Mirror maintenance.
    Mirror {
        #[command(subcommand)]
        action: MirrorAction,
    },
    /// A misbehaving agent for tests (sleeps, ignores SIGTERM, floods, forks, writes files).
    #[command(hide = true, name = "fake-agent")]
    FakeAgent {
        #[arg(long)]
        prompt: Option<String>,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        directives: Vec<String>,
    },
    /// One chat completion against an OpenAI-compatible endpoint (the `openai` agent kind).
    #[command(hide = true, name = "openai-agent")]
    OpenaiAgent(openai_agent::OpenaiAgentArgs),
}

#[derive(Debug, Subcommand)]
pub enum MirrorAction {
    /// Drop the SQLite mirror's rows and rebuild them from the tree.
    Rebuild,
}

#[derive(Debug, Subcommand)]
pub enum NotifyAction {
    /// Send a sample event on every channel (or the one named) and print what each receiver
    /// answered; exit 1 when one did not accept it.
    Test {
        /// A channel's `name` (default `command-N`/`webhook-N`, N its place in the list).
        channel: Option<String>,
    },
}

fn parse_priority(s: &str) -> Result<crate::task::Priority, String> {
    crate::task::Priority::parse_cli(s)
        .ok_or_else(|| format!("`{s}` is not high, normal, low or an integer"))
}

fn parse_fan_out(s: &str) -> Result<crate::task::FanOut, String> {
    if let Ok(n) = s.trim().parse::<u32>() {
        return Ok(crate::task::FanOut::Count(n));
    }
    let agents: Vec<String> = s
        .split(',')
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
        .collect();
    if agents.is_empty() {
        return Err("give agents separated by commas (`claude,codex`) or a count".into());
    }
    Ok(crate::task::FanOut::Agents(agents))
}

fn parse_pick(s: &str) -> Result<crate::task::Pick, String> {
    use crate::task::Pick;
    match s {
        "first_pass" | "first-pass" => Ok(Pick::FirstPass),
        "judge" => Ok(Pick::Judge),
        "all" => Ok(Pick::All),
        _ => Err(format!("`{s}` is not first_pass, judge or all")),
    }
}

pub fn run(cli: Cli) -> Result<i32> {
    if cli.database_url.is_some()
        && !matches!(
            cli.command,
            Command::Status
                | Command::Tasks { .. }
                | Command::Show { .. }
                | Command::Follow { .. }
                | Command::Serve { .. }
                | Command::Watch { .. }
        )
    {
        return Err(crate::error::UsageError(
            "--database-url works with status, tasks, show, follow, serve and watch (reading only); other commands act on the folder".into(),
        )
        .into());
    }
    match &cli.command {
        // Generated from the argument definitions alone: no project, configuration or tree is read.
        Command::Completions { shell } => completions::run(*shell),
        Command::Man { dir } => man::run(dir.as_deref()),
        Command::FakeAgent { prompt, directives } => fake_agent::run(prompt.clone(), directives),
        Command::OpenaiAgent(args) => openai_agent::run(args.clone()),
        Command::Init => init::run(&cli),
        Command::Start {
            once,
            detach,
            verbose,
            serve,
        } => start::start(&cli, *once, *detach, *verbose, serve.as_deref()),
        Command::Stop { timeout } => start::stop(&load(&cli)?, *timeout),
        Command::Validate {
            files,
            check_config,
        } => validate::run(&cli, files, *check_config),
        Command::Add { .. } => add::run(&cli, &load(&cli)?),
        Command::Status => status::run(&cli, &load(&cli)?),
        Command::Tasks { status, limit } => {
            tasks::run(&cli, &load(&cli)?, status.as_deref(), *limit)
        }
        Command::Agents { reset: Some(name) } => agents::reset(&load(&cli)?, name),
        Command::Agents { reset: None } => agents::run(&cli, &load(&cli)?),
        Command::Show { id } => show::run(&cli, &load(&cli)?, id),
        Command::Retry { id } => retry::run(&cli, &load(&cli)?, id),
        Command::Merge {
            id,
            commit,
            candidate,
        } => land::merge(&cli, &load(&cli)?, id, *commit, candidate.as_deref()),
        Command::Discard { id } => land::discard(&cli, &load(&cli)?, id),
        Command::Cancel { id } => cancel::run(&cli, &load(&cli)?, id),
        Command::Follow { since, limit } => follow::run(&cli, &load(&cli)?, *since, *limit),
        Command::Serve {
            listen,
            token,
            generate_token,
            read_only,
        } => serve::run(
            &cli,
            load(&cli)?,
            crate::serve::Options {
                listen: listen.clone(),
                token: token.clone(),
                generate_token: *generate_token,
                read_only: *read_only || cli.database_url.is_some(),
                database_url: cli.database_url.clone(),
            },
        ),
        Command::Mcp {
            print_config: Some(client),
        } => mcp::print_config(&cli, *client),
        Command::Mcp { print_config: None } => mcp::run(load(&cli)?),
        Command::Watch { follow } => watch::run(&cli, &load(&cli)?, *follow),
        Command::Mirror {
            action: MirrorAction::Rebuild,
        } => mirror_cmd::rebuild(&cli, &load(&cli)?),
        Command::Notify {
            action: NotifyAction::Test { channel },
        } => notify_cmd::test(&cli, &load(&cli)?, channel.as_deref()),
    }
}

/// Print JSON to stdout.
pub fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    let mut out = Out::new();
    out.json(&serde_json::to_string_pretty(v)?)?;
    out.flush()
}

/// Standard output for what a command prints: buffered, every write checked. Human text goes
/// through [`crate::console::visible`] (an agent's escape sequences are shown, not obeyed), JSON
/// through [`crate::console::json_visible`]. A reader that went away (`| head`) makes the write fail
/// with [`crate::error::OutputClosed`], which ends the command quietly with success, as ripgrep
/// does; any other write error is an error of the command. Call [`Out::flush`] at the end: dropping
/// an `Out` flushes too, but cannot report a failure.
pub struct Out(std::io::BufWriter<std::io::StdoutLock<'static>>);

impl Out {
    pub fn new() -> Out {
        Out(std::io::BufWriter::new(std::io::stdout().lock()))
    }

    /// One line of human-readable text (the line feed is added).
    pub fn line(&mut self, text: &str) -> Result<()> {
        use std::io::Write;
        let shown = crate::console::visible(text);
        self.0
            .write_all(shown.as_bytes())
            .and_then(|()| self.0.write_all(b"\n"))
            .map_err(output_error)
    }

    /// One JSON document or JSON line (the line feed is added).
    pub fn json(&mut self, text: &str) -> Result<()> {
        use std::io::Write;
        let shown = crate::console::json_visible(text);
        self.0
            .write_all(shown.as_bytes())
            .and_then(|()| self.0.write_all(b"\n"))
            .map_err(output_error)
    }

    /// Bytes as they are, for output that is not text for a terminal (a man page, a completion
    /// script: both generated from our own definitions).
    pub fn bytes(&mut self, bytes: &[u8]) -> Result<()> {
        use std::io::Write;
        self.0.write_all(bytes).map_err(output_error)
    }

    pub fn flush(&mut self) -> Result<()> {
        use std::io::Write;
        self.0.flush().map_err(output_error)
    }
}

impl Default for Out {
    fn default() -> Out {
        Out::new()
    }
}

fn output_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        crate::error::OutputClosed.into()
    } else {
        anyhow::Error::new(e).context("cannot write to standard output")
    }
}

/// A line to stderr (a warning beside a command's result), control characters made visible. A
/// stderr that cannot be written to is ignored: there is nowhere else to say it.
pub fn note(text: &str) {
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr().lock(),
        "{}",
        crate::console::visible(text)
    );
}

/// Shorten to one line of at most `n` characters, for tables.
pub fn short(s: &str, n: usize) -> String {
    let line = s.lines().next().unwrap_or_default();
    if line.chars().count() > n {
        let cut: String = line.chars().take(n.saturating_sub(1)).collect();
        format!("{cut}…")
    } else if s.lines().nth(1).is_some() {
        format!("{line} …")
    } else {
        line.to_string()
    }
}

/// The project the global options name.
fn load(cli: &Cli) -> Result<Project> {
    Project::load(cli.root.as_deref(), cli.config.as_deref())
}
