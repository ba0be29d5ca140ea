//! Recorded outputs of the real CLIs (tests/fixtures/agents/<cli>/<case>.{stdout,stderr,code}),
//! turned back into the [`Exit`] the process module would have produced.
//!
//! Tests only; it never runs a CLI.

use std::path::PathBuf;
use std::time::Duration;

use crate::process::Exit;

pub fn exit_from(stdout: &str, stderr: &str, code: Option<i32>) -> Exit {
    Exit {
        code,
        signal: None,
        timed_out: false,
        stopped: None,
        stdout: stdout.to_string(),
        stderr_tail: stderr.to_string(),
        duration: Duration::from_millis(10),
        log_bytes: (stdout.len() + stderr.len()) as u64,
        log_bytes_dropped: 0,
        spawn_error: None,
        escaped: 0,
        spawn_errno: None,
        limit: Duration::from_secs(60),
        stalled: None,
    }
}

/// A recorded case; panics when it is missing, so a renamed fixture cannot turn a test into a no-op.
pub fn fixture(cli: &str, case: &str) -> Exit {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/agents")
        .join(cli);
    let read = |ext: &str| std::fs::read_to_string(dir.join(format!("{case}.{ext}")));
    let stdout = read("stdout").unwrap_or_else(|e| panic!("fixture {cli}/{case}.stdout: {e}"));
    let stderr = read("stderr").unwrap_or_default();
    let code = read("code")
        .ok()
        .and_then(|c| c.trim().parse().ok())
        .unwrap_or_else(|| panic!("fixture {cli}/{case}.code missing or not a number"));
    exit_from(&stdout, &stderr, Some(code))
}
