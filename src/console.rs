//! Console lines for the foreground supervisor: one line per transition, `-v` for more.
//! Library code calls these instead of printing directly so the verbosity is decided in one place.
//!
//! It never decides anything and never redacts: what reaches it was redacted where it came from.

use std::sync::atomic::{AtomicU8, Ordering};

static LEVEL: AtomicU8 = AtomicU8::new(2);

/// 0 error, 1 warn, 2 info, 3 debug.
pub fn set_level(name: &str, verbose: u8) {
    let base = match name {
        "error" => 0,
        "warn" => 1,
        "debug" => 3,
        _ => 2,
    };
    LEVEL.store((base + verbose).min(3), Ordering::Relaxed);
}

fn stamp() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        now.hour(),
        now.minute(),
        now.second(),
        now.millisecond()
    )
}

pub fn info(msg: &str) {
    if LEVEL.load(Ordering::Relaxed) >= 2 {
        println!("{} {msg}", stamp());
    }
}

pub fn debug(msg: &str) {
    if LEVEL.load(Ordering::Relaxed) >= 3 {
        println!("{} {msg}", stamp());
    }
}

pub fn warn(msg: &str) {
    if LEVEL.load(Ordering::Relaxed) >= 1 {
        eprintln!("{} warning: {msg}", stamp());
    }
}

pub fn error(msg: &str) {
    eprintln!("{} error: {msg}", stamp());
}
