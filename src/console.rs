//! What orchestrate prints: the foreground supervisor's console lines (one per transition, `-v` for
//! more), and the one escaping of untrusted text that every surface applies before it prints.
//!
//! Console lines are written by a thread of their own, so the supervisor's loop never waits for its
//! output: a closed stdout (`orchestrate start | head`) stops the lines to it and nothing else, a full
//! disk under a redirected log loses the lines it could not take and says how many once it takes
//! them again, and a reader that stops reading (a paused pager, a terminal stopped with Ctrl-S) costs
//! dropped lines, counted, never a stalled supervisor. Nothing here panics on a failed write.
//!
//! Text an agent, a task file or a file name supplies reaches a terminal only through [`visible`]:
//! escape sequences, bells and bidirectional overrides are shown as `\u{1b}` and so on instead of
//! being acted on. Paths in diffs are quoted the way git quotes them ([`quote_path`]).
//!
//! It never decides anything and never redacts: what reaches it was redacted where it came from.

use std::borrow::Cow;
use std::io::Write;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

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

/// `HH:MM:SS.mmm `: the stamp that opens every console line, and the indent of its continuation
/// lines (so that no text inside a message can pass for a line of its own).
const STAMP_WIDTH: usize = 13;

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
        emit(Stream::Out, format!("{} {}", stamp(), console_text(msg)));
    }
}

pub fn debug(msg: &str) {
    if LEVEL.load(Ordering::Relaxed) >= 3 {
        emit(Stream::Out, format!("{} {}", stamp(), console_text(msg)));
    }
}

pub fn warn(msg: &str) {
    if LEVEL.load(Ordering::Relaxed) >= 1 {
        emit(
            Stream::Err,
            format!("{} warning: {}", stamp(), console_text(msg)),
        );
    }
}

pub fn error(msg: &str) {
    emit(
        Stream::Err,
        format!("{} error: {}", stamp(), console_text(msg)),
    );
}

/// A message as one console entry: control characters made visible, and every line after the first
/// indented under the message, so a description or an error with a line break in it cannot forge a
/// console line of its own.
fn console_text(msg: &str) -> String {
    let shown = visible(msg.trim_end_matches('\n'));
    shown.replace('\n', &format!("\n{:width$}", "", width = STAMP_WIDTH))
}

// ---- the writer thread -----------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stream {
    Out,
    Err,
}

enum Msg {
    Line(Stream, String),
    /// Answered once every line sent before it has been handled.
    Flush(mpsc::Sender<()>),
}

/// Lines waiting for the writer: enough for any burst the supervisor makes while its output is
/// readable, small enough (a few megabytes at most) to hold while it is not.
const QUEUE: usize = 4096;

/// Lines dropped because the queue was full, not yet reported.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// The writer thread's queue, started by the first console line (`None`: no thread could be
/// started, and there is nowhere to print; the supervisor runs on, silently).
static QUEUE_TX: OnceLock<Option<mpsc::SyncSender<Msg>>> = OnceLock::new();

fn queue() -> Option<&'static mpsc::SyncSender<Msg>> {
    QUEUE_TX
        .get_or_init(|| {
            let (tx, rx) = mpsc::sync_channel(QUEUE);
            std::thread::Builder::new()
                .name("console".into())
                .spawn(move || writer(rx))
                .ok()
                .map(|_| tx)
        })
        .as_ref()
}

fn emit(stream: Stream, mut line: String) {
    line.push('\n');
    // Unit tests of the library print through libtest's capture instead.
    if cfg!(test) {
        print!("{line}");
        return;
    }
    let Some(tx) = queue() else { return };
    if let Err(mpsc::TrySendError::Full(_)) = tx.try_send(Msg::Line(stream, line)) {
        DROPPED.fetch_add(1, Ordering::Relaxed);
    }
}

/// Wait (at most `limit`) until every console line emitted so far is written or given up: before
/// the process exits, so the last lines ("supervisor stopped") are not lost in the queue.
pub fn flush(limit: Duration) {
    let Some(Some(tx)) = QUEUE_TX.get() else {
        return;
    };
    let deadline = std::time::Instant::now() + limit;
    let (done_tx, done_rx) = mpsc::channel();
    let mut msg = Msg::Flush(done_tx);
    // Bounded both ways: a queue that stays full means a reader that does not read, and then the
    // lines are lost anyway.
    loop {
        match tx.try_send(msg) {
            Ok(()) => break,
            Err(mpsc::TrySendError::Full(m)) if std::time::Instant::now() < deadline => {
                msg = m;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return,
        }
    }
    let _ = done_rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()));
}

/// One of the process's standard streams as the console thread sees it.
struct Sink {
    stream: Stream,
    fd: i32,
    /// The reader went away (EPIPE): nothing will ever read this stream again.
    closed: bool,
    /// Lines lost to other write errors since the last line that got through, and the last error.
    lost: u64,
    why: Option<String>,
    /// The last write stopped inside a line: the next one starts on a fresh line.
    partial: bool,
}

impl Sink {
    fn new(stream: Stream) -> Sink {
        Sink {
            stream,
            fd: match stream {
                Stream::Out => libc::STDOUT_FILENO,
                Stream::Err => libc::STDERR_FILENO,
            },
            closed: false,
            lost: 0,
            why: None,
            partial: false,
        }
    }

    fn name(&self) -> &'static str {
        match self.stream {
            Stream::Out => "stdout",
            Stream::Err => "stderr",
        }
    }

    /// Write one line (with what must come before it: the end of a cut line, a note about lines
    /// lost). Returns the error that closed the stream, the first time it does.
    fn line(&mut self, line: &str) -> Option<std::io::Error> {
        if self.closed {
            return None;
        }
        let mut text = String::new();
        if self.partial {
            text.push('\n');
        }
        if self.lost > 0 {
            text.push_str(&format!(
                "{} warning: {} console line(s) could not be written to {} ({})\n",
                stamp(),
                self.lost,
                self.name(),
                self.why.as_deref().unwrap_or("write error")
            ));
        }
        text.push_str(line);
        let (written, result) = write_fd(self.fd, text.as_bytes());
        match result {
            Ok(()) => {
                self.partial = false;
                self.lost = 0;
                self.why = None;
                None
            }
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                self.closed = true;
                Some(e)
            }
            Err(e) => {
                // A full disk, an I/O error, a descriptor someone made non-blocking: this line is
                // lost; the next one tries again (space may have been freed) and says how many were.
                self.partial = written > 0 && !text.as_bytes()[..written].ends_with(b"\n");
                self.lost += 1;
                self.why = Some(e.to_string());
                None
            }
        }
    }
}

/// Write all of `buf` to `fd`, directly (std's buffered stdout would keep what failed and retry it
/// inside some later line). Returns how many bytes went out, and the error that stopped it.
fn write_fd(fd: i32, buf: &[u8]) -> (usize, std::io::Result<()>) {
    use std::os::fd::FromRawFd;
    // SAFETY: the standard descriptors stay open for the life of the process; ManuallyDrop keeps
    // this File from closing one.
    let mut file = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) });
    let mut done = 0;
    while done < buf.len() {
        match file.write(&buf[done..]) {
            Ok(0) => return (done, Err(std::io::ErrorKind::WriteZero.into())),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return (done, Err(e)),
        }
    }
    (done, Ok(()))
}

fn writer(rx: mpsc::Receiver<Msg>) {
    let mut out = Sink::new(Stream::Out);
    let mut err = Sink::new(Stream::Err);
    for msg in rx {
        let (stream, line) = match msg {
            Msg::Line(stream, line) => (stream, line),
            Msg::Flush(done) => {
                let _ = done.send(());
                continue;
            }
        };
        let dropped = DROPPED.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let note = format!(
                "{} warning: {dropped} console line(s) dropped: the output was not being read\n",
                stamp()
            );
            let _ = err.line(&note);
        }
        let (sink, other) = match stream {
            Stream::Out => (&mut out, &mut err),
            Stream::Err => (&mut err, &mut out),
        };
        if let Some(e) = sink.line(&line) {
            // Said once, where it may still be read; the supervisor carries on regardless.
            let note = format!(
                "{} warning: {} is closed ({e}); console lines to it are no longer printed\n",
                stamp(),
                sink.name()
            );
            let _ = other.line(&note);
        }
    }
}

// ---- escaping --------------------------------------------------------------------------------------

/// Characters a terminal acts on, or that reorder or hide what is shown, other than line feeds and
/// tabs: C0 and C1 controls and DEL (escape sequences, bells, carriage returns), bidirectional
/// embeddings, overrides and isolates (text shown in another order than it is stored), line and
/// paragraph separators, invisible characters and tag characters (text nobody sees).
fn needs_escape(c: char) -> bool {
    match c {
        '\n' | '\t' => false,
        c if c.is_control() => true,
        '\u{061c}'
        | '\u{180e}'
        | '\u{200b}'
        | '\u{200e}'
        | '\u{200f}'
        | '\u{2028}'..='\u{202e}'
        | '\u{2060}'..='\u{2064}'
        | '\u{2066}'..='\u{206f}'
        | '\u{feff}'
        | '\u{fff9}'..='\u{fffb}'
        | '\u{e0000}'..='\u{e007f}' => true,
        _ => false,
    }
}

/// `text` as it may be shown on a terminal: every character [`needs_escape`] names is written as
/// `\u{1b}` (its code point in hex), so an escape sequence or a bidirectional override in an agent's
/// output, a task file, an error or a file name is seen rather than obeyed. Line feeds and tabs stay
/// (layouts need them), and so does a carriage return right before a line feed (a CRLF file); a
/// lone carriage return, which would let later text overwrite earlier text, does not. Text without
/// such characters comes back borrowed. Every human-readable surface prints untrusted text through
/// this one function; the files under `context/` keep the bytes as written.
pub fn visible(text: &str) -> Cow<'_, str> {
    let crlf = |i: usize| text.as_bytes().get(i + 1) == Some(&b'\n');
    let hit = text
        .char_indices()
        .any(|(i, c)| needs_escape(c) && !(c == '\r' && crlf(i)));
    if !hit {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for (i, c) in text.char_indices() {
        if needs_escape(c) && !(c == '\r' && crlf(i)) {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// JSON text (as serde_json writes it) with the characters [`needs_escape`] names written as
/// `\uXXXX` escapes: the same JSON value, safe to print. serde_json escapes C0 controls itself but
/// writes DEL, C1 controls and bidirectional overrides as they are.
pub fn json_visible(json: &str) -> Cow<'_, str> {
    if !json.chars().any(needs_escape) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if needs_escape(c) {
            // Outside strings JSON has only ASCII punctuation and whitespace, which never needs it.
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{u:04x}"));
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A path as git prints it in a diff header: unchanged when it is plain, else in double quotes with
/// C escapes (`"a\nb"`, `\t`, `\"`, `\\`, and other bytes in octal, `\033`). Quoted too are names
/// with characters [`visible`] escapes and names that are not UTF-8, so a file named with a line
/// break cannot add a line of its own to a diff, nor an override turn a header around. Other UTF-8
/// stays as it is (git's `core.quotePath=false`).
pub fn quote_path(name: &[u8]) -> String {
    let text = String::from_utf8_lossy(name);
    let plain = matches!(text, Cow::Borrowed(_))
        && !text
            .chars()
            .any(|c| c == '"' || c == '\\' || c == '\t' || c == '\n' || needs_escape(c));
    if plain {
        return text.into_owned();
    }
    let mut out = String::from("\"");
    let octal = |out: &mut String, bytes: &[u8]| {
        for b in bytes {
            out.push_str(&format!("\\{b:03o}"));
        }
    };
    for chunk in name.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\u{7}' => out.push_str("\\a"),
                '\u{8}' => out.push_str("\\b"),
                '\t' => out.push_str("\\t"),
                '\n' => out.push_str("\\n"),
                '\u{b}' => out.push_str("\\v"),
                '\u{c}' => out.push_str("\\f"),
                '\r' => out.push_str("\\r"),
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if needs_escape(c) => octal(&mut out, c.encode_utf8(&mut [0; 4]).as_bytes()),
                c => out.push(c),
            }
        }
        octal(&mut out, chunk.invalid());
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visible_escapes_what_a_terminal_would_act_on() {
        assert_eq!(visible("plain\ttext\n"), "plain\ttext\n");
        assert!(matches!(visible("plain"), Cow::Borrowed(_)));
        assert_eq!(
            visible("\u{1b}[2J\u{1b}]0;PWNED\u{7}"),
            "\\u{1b}[2J\\u{1b}]0;PWNED\\u{7}"
        );
        assert_eq!(visible("a\u{9b}b\u{7f}"), "a\\u{9b}b\\u{7f}");
        assert_eq!(visible("abc\u{202e}def"), "abc\\u{202e}def");
        assert_eq!(visible("tag\u{e0041}"), "tag\\u{e0041}");
        assert_eq!(visible("crlf\r\nlone\rcr"), "crlf\r\nlone\\u{d}cr");
        // Emoji joiners and ordinary non-ASCII text are left alone.
        assert_eq!(visible("é 👨\u{200d}👩"), "é 👨\u{200d}👩");
    }

    #[test]
    fn console_text_indents_continuation_lines() {
        assert_eq!(
            console_text("failed x: one\n12:00:00.000 completed y\n"),
            format!("failed x: one\n{}12:00:00.000 completed y", " ".repeat(13))
        );
    }

    #[test]
    fn json_visible_keeps_the_value() {
        let v = serde_json::json!({"d": "a\u{1b}b\u{9b}c\u{202e}d\u{e0041}"});
        let text = serde_json::to_string(&v).expect("json");
        let shown = json_visible(&text);
        assert!(
            !shown.contains('\u{9b}') && !shown.contains('\u{202e}') && !shown.contains('\u{1b}'),
            "{shown}"
        );
        let back: serde_json::Value = serde_json::from_str(&shown).expect("still JSON");
        assert_eq!(back, v);
    }

    #[test]
    fn quote_path_quotes_like_git() {
        assert_eq!(quote_path(b"src/main.rs"), "src/main.rs");
        assert_eq!(quote_path("café.txt".as_bytes()), "café.txt");
        assert_eq!(quote_path(b"a\nb"), "\"a\\nb\"");
        assert_eq!(quote_path(b"tab\there"), "\"tab\\there\"");
        assert_eq!(quote_path(b"q\"uote\\"), "\"q\\\"uote\\\\\"");
        assert_eq!(quote_path(b"esc\x1b[1m"), "\"esc\\033[1m\"");
        assert_eq!(quote_path(b"bad\xffbyte"), "\"bad\\377byte\"");
        assert_eq!(
            quote_path("rlo\u{202e}txt".as_bytes()),
            "\"rlo\\342\\200\\256txt\""
        );
    }
}
