//! A misbehaving agent for tests (`orchestrate fake-agent`, hidden). Directives come from `@fake`
//! lines in the prompt (so each task picks its own behaviour) and from trailing arguments:
//!
//! `sleep=SECS` `ignore-term` `grandchild=PIDFILE` `flood=BYTES` `write=PATH:CONTENT` `stderr=TEXT`
//! `print=TEXT` `echo-prompt` `env=NAME` `fail-until=COUNTERFILE:N` `close-pipes` `exit=CODE`
//! `write-if=NEEDLE:PATH:CONTENT` (write only when the prompt holds NEEDLE, `_` read as spaces)
//! `wait-for=PATH` (until PATH exists, at most 120 s) `ticks=N:SECS` (print `tick 1` … `tick N`, SECS
//! apart, before `print`) `escape=PIDFILE` (a grandchild that leaves the process group with setsid) `pidfile=PATH` (own pid) `lock=PATH` (hold an exclusive lock while running; if another run holds it,
//! append "OVERLAP" to PATH.overlap and exit 42: proves a task never runs twice at once)
//!
//! Without directives it prints one line naming the task and exits 0.

use std::io::{Read, Write};

use anyhow::Result;

pub fn run(prompt: Option<String>, args: &[String]) -> Result<i32> {
    let prompt = match prompt {
        Some(p) => p,
        None => {
            let mut s = String::new();
            let _ = std::io::stdin().read_to_string(&mut s);
            s
        }
    };
    let mut directives: Vec<String> = args.to_vec();
    for line in prompt.lines() {
        if let Some(rest) = line.trim().strip_prefix("@fake") {
            directives.extend(rest.split_whitespace().map(String::from));
        }
    }
    let get = |k: &str| {
        directives
            .iter()
            .find_map(|d| d.strip_prefix(&format!("{k}=")).map(String::from))
    };
    let has = |k: &str| directives.iter().any(|d| d == k);

    if let Some(p) = get("pidfile") {
        std::fs::write(&p, std::process::id().to_string())?;
    }
    // Held until exit (the descriptor closes with the process, whatever kills it).
    let _lock = match get("lock") {
        Some(p) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&p)?;
            if f.try_lock().is_err() {
                let mut o = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(format!("{p}.overlap"))?;
                writeln!(o, "OVERLAP pid {}", std::process::id())?;
                return Ok(42);
            }
            Some(f)
        }
        None => None,
    };
    if let Some(path) = get("wait-for") {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while !std::path::Path::new(&path).exists() && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    if has("ignore-term") {
        // SAFETY: installing SIG_IGN for SIGTERM is sound at any point.
        unsafe {
            libc::signal(libc::SIGTERM, libc::SIG_IGN);
        }
    }
    if let Some(pidfile) = get("grandchild") {
        let child = std::process::Command::new(std::env::current_exe()?)
            .args(["fake-agent", "--prompt", "", "sleep=300", "ignore-term"])
            .stdin(std::process::Stdio::null())
            .spawn()?;
        std::fs::write(&pidfile, child.id().to_string())?;
        // Deliberately not waited for: the supervisor must take it down with the group.
        std::mem::forget(child);
    }
    if let Some(pidfile) = get("escape") {
        use std::os::unix::process::CommandExt;
        let mut cmd = std::process::Command::new(std::env::current_exe()?);
        cmd.args(["fake-agent", "--prompt", "", "sleep=300", "ignore-term"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        std::fs::write(&pidfile, child.id().to_string())?;
        std::mem::forget(child);
    }
    if let Some(w) = get("write")
        && let Some((path, content)) = w.split_once(':')
    {
        if let Some(d) = std::path::Path::new(path).parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(path, format!("{}\n", content.replace('_', " ")))?;
    }
    // After `write`, so it can correct what `write` wrote once the prompt says what was wrong.
    if let Some(w) = get("write-if")
        && let Some((needle, rest)) = w.split_once(':')
        && let Some((path, content)) = rest.split_once(':')
        && prompt.contains(&needle.replace('_', " "))
    {
        std::fs::write(path, format!("{}\n", content.replace('_', " ")))?;
    }
    if let Some(spec) = get("fail-until")
        && let Some((file, n)) = spec.split_once(':')
    {
        let count: u32 = std::fs::read_to_string(file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
            + 1;
        std::fs::write(file, count.to_string())?;
        if count < n.parse().unwrap_or(1) {
            eprintln!("fake agent: failing on purpose (run {count} of {n})");
            return Ok(1);
        }
    }
    let mut out = std::io::stdout().lock();
    if let Some(n) = get("flood").and_then(|n| n.parse::<u64>().ok()) {
        let line = [b'x'; 1023];
        let mut left = n;
        while left > 0 {
            let k = left.min(1024) as usize;
            if out
                .write_all(&line[..k - 1])
                .and_then(|_| out.write_all(b"\n"))
                .is_err()
            {
                break;
            }
            left -= k as u64;
        }
    }
    if let Some(t) = get("stderr") {
        eprintln!("{}", t.replace('_', " "));
    }
    if has("echo-prompt") {
        writeln!(out, "{prompt}")?;
    }
    if let Some(name) = get("env") {
        writeln!(
            out,
            "{name}={}",
            std::env::var(&name).unwrap_or_else(|_| "<unset>".into())
        )?;
    }
    if let Some(spec) = get("ticks")
        && let Some((n, secs)) = spec.split_once(':')
    {
        let pause = std::time::Duration::from_secs_f64(secs.parse().unwrap_or(0.5));
        for i in 1..=n.parse::<u32>().unwrap_or(1) {
            writeln!(out, "tick {i}")?;
            out.flush()?;
            std::thread::sleep(pause);
        }
    }
    match get("print") {
        Some(t) => writeln!(out, "{}", t.replace('_', " "))?,
        None => {
            let title = prompt
                .lines()
                .find(|l| l.starts_with("# Task "))
                .unwrap_or("# Task ?");
            writeln!(
                out,
                "fake agent finished {}",
                title.trim_start_matches("# ")
            )?;
        }
    }
    out.flush()?;
    drop(out);
    if has("close-pipes") {
        // SAFETY: closing our own stdout/stderr descriptors; nothing below writes to them.
        unsafe {
            libc::close(1);
            libc::close(2);
        }
    }
    if let Some(s) = get("sleep").and_then(|s| s.parse::<f64>().ok()) {
        std::thread::sleep(std::time::Duration::from_secs_f64(s));
    }
    Ok(get("exit").and_then(|c| c.parse().ok()).unwrap_or(0))
}
