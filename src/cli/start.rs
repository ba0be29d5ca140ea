//! `orchestrate start` (foreground, `--once`, `--detach`) and `orchestrate stop`.
//!
//! Everything the supervisor does is in `supervisor`; this file only starts it, detaches it or stops it.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::{Cli, Project};
use crate::supervisor::{Options, Supervisor};

pub fn start(cli: &Cli, once: bool, detach: bool, verbose: u8, serve: Option<&str>) -> Result<i32> {
    let project = Project::load(cli.root.as_deref(), cli.config.as_deref())?;
    if detach {
        return detach_start(cli, &project, verbose);
    }
    crate::console::set_level(&project.cfg.orchestrator.log_level, verbose);
    // Once per start, before the loop; a reload says its own notes.
    for n in &project.cfg.notes {
        crate::console::info(&format!("note: {n}"));
    }
    if let Some(listen) = serve {
        // Bound before the supervisor starts, so a refused address (taken, or not loopback without
        // a token) stops the start with its error; then it answers beside the loop until the
        // process ends (it stops on the same signals).
        let mut bound = crate::serve::bind(
            Project::load(cli.root.as_deref(), cli.config.as_deref())?,
            crate::serve::Options {
                listen: listen.to_string(),
                token: std::env::var("ORCHESTRATE_SERVE_TOKEN")
                    .ok()
                    .filter(|t| !t.is_empty()),
                generate_token: false,
                read_only: false,
                database_url: None,
            },
        )?;
        bound.mount_mcp(crate::mcp::http_router(
            Project::load(cli.root.as_deref(), cli.config.as_deref())?,
            false,
            bound.has_token(),
        ));
        crate::console::info(&format!("serving    http://{}", bound.local_addr()?));
        std::thread::Builder::new()
            .name("serve".into())
            .spawn(move || {
                if let Err(e) = bound.run() {
                    crate::console::warn(&format!("the HTTP server stopped: {e:#}"));
                }
            })?;
    }
    // Beside the loop, on its own thread: a slow or dead receiver never slows the supervisor.
    let notifier = crate::notify::sender::Sender::start(
        &project.cfg,
        &project.layout,
        &crate::fsutil::hostname(),
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()?;
    let root = project.root.clone();
    let options = Options {
        once,
        config_file: Some(project.config_path.clone()),
        verbose,
    };
    let sup = Supervisor::new(project.cfg, &root, options)?;
    rt.block_on(sup.run())?;
    // Agents' stdin writers may still be parked; do not wait for them.
    rt.shutdown_timeout(Duration::from_millis(100));
    // A `--once` run's last events go out before it exits (bounded: a receiver that is down gets
    // them at the next start).
    if let Some(n) = &notifier
        && once
    {
        n.settle(Duration::from_secs(10));
    }
    Ok(0)
}

fn detach_start(cli: &Cli, project: &Project, verbose: u8) -> Result<i32> {
    use std::os::unix::process::CommandExt;
    let state = &project.layout.state_dir;
    std::fs::create_dir_all(state)?;
    let log_path = project.layout.supervisor_log();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("-C").arg(&project.root);
    if let Some(c) = &cli.config {
        cmd.arg("--config").arg(c);
    }
    cmd.arg("start");
    for _ in 0..verbose {
        cmd.arg("-v");
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; it detaches the child from our terminal and session.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .context("cannot start the background supervisor")?;
    let pid = child.id();
    crate::fsutil::atomic_write(
        &project.layout.supervisor_pid(),
        format!("{pid}\n").as_bytes(),
    )?;
    // Wait until it holds its instance lock, so "started" means started (bounded).
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if crate::instance::live_instances(&project.layout)
            .iter()
            .any(|(p, _)| *p == pid)
        {
            let mut out = super::Out::new();
            outln!(
                out,
                "supervisor started in the background (pid {pid}); log: {}",
                project.rel(&log_path)
            )?;
            out.flush()?;
            return Ok(0);
        }
        if !crate::fsutil::pid_alive(pid) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
    let last: Vec<&str> = tail.lines().rev().take(5).collect();
    super::note(&format!(
        "error: the background supervisor did not start; last lines of {}:\n{}",
        project.rel(&log_path),
        last.into_iter().rev().collect::<Vec<_>>().join("\n")
    ));
    Ok(1)
}

pub fn stop(project: &Project, timeout: u64) -> Result<i32> {
    let live = crate::instance::live_instances(&project.layout);
    // Said as it happens, and only said: a closed stdout must not cut the wait short, since the
    // exit code tells whether the supervisors stopped.
    let mut out = super::Out::new();
    let mut say = |text: &str| {
        let _ = out.line(text).and_then(|()| out.flush());
    };
    if live.is_empty() {
        say("no supervisor is running");
        return Ok(0);
    }
    for (pid, _) in &live {
        if *pid > 0 {
            // SAFETY: sending SIGTERM to a pid read from a lock file that a live process holds.
            unsafe {
                libc::kill(*pid as i32, libc::SIGTERM);
            }
            say(&format!("sent SIGTERM to supervisor pid {pid}"));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(timeout);
    loop {
        let still: Vec<u32> = live
            .iter()
            .filter(|(_, path)| crate::instance::instance_lock_held(path))
            .map(|(p, _)| *p)
            .collect();
        if still.is_empty() {
            let _ = std::fs::remove_file(project.layout.supervisor_pid());
            say("stopped");
            return Ok(0);
        }
        if Instant::now() >= deadline {
            super::note(&format!(
                "error: still running after {timeout} s: pid {still:?}"
            ));
            return Ok(1);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
