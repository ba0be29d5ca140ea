//! Server-sent events: the `text/event-stream` framing a streamed chat completion arrives in, parsed
//! from bytes cut into chunks anywhere (inside a UTF-8 character, between a `\r` and its `\n`).
//!
//! It owns the framing only: line ends (LF, CR, CRLF), comments, fields, and the blank line that
//! ends an event. What an event's `data` means is `completion`'s business. It never fails and never
//! panics: bytes that are not UTF-8 become U+FFFD, and everything but `data` is dropped. It keeps at
//! most one line and one event's data, so its memory is bounded by the caller's cap on the body
//! (`MAX_BODY_BYTES` in `chat`); it must never hold more than that.
//!
//! Hand-written rather than a crate, on evidence. `sse-stream` 0.3 (maintained) discards an event
//! that the body ends without its blank line, so a server that never sends blank lines would lose
//! its whole answer, and it ends the stream at the first invalid UTF-8 byte of a `data:` line where
//! this parser substitutes U+FFFD and goes on. `eventsource-stream` 0.2.3 (no release since 2022)
//! drops the same unfinished last event and re-parses the whole unfinished line for every chunk, so
//! a long line in small chunks costs quadratic time (an open issue upstream). Both are pull streams,
//! while `chat` also needs each raw chunk, for its size cap and for servers that answer plain JSON.

/// Yields the `data` of each event; comments, `event:`, `id:` and `retry:` are dropped, since a chat
/// completion carries everything in `data`.
#[derive(Default)]
pub struct SseParser {
    line: Vec<u8>,
    data: String,
    has_data: bool,
    /// The last byte seen was a `\r`, so a `\n` right after it ends nothing.
    after_cr: bool,
}

impl SseParser {
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<String>) {
        for &b in bytes {
            match b {
                b'\n' if self.after_cr => self.after_cr = false,
                b'\r' | b'\n' => {
                    self.after_cr = b == b'\r';
                    self.end_line(out);
                }
                _ => {
                    self.after_cr = false;
                    self.line.push(b);
                }
            }
        }
    }

    /// The body ended: a last line without its newline and an event without its blank line still count.
    pub fn finish(&mut self, out: &mut Vec<String>) {
        if !self.line.is_empty() {
            self.end_line(out);
        }
        self.dispatch(out);
    }

    fn end_line(&mut self, out: &mut Vec<String>) {
        let line = String::from_utf8_lossy(&self.line).into_owned();
        self.line.clear();
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line.as_str(), ""),
        };
        if field == "data" {
            if self.has_data {
                self.data.push('\n');
            }
            self.data.push_str(value);
            self.has_data = true;
        }
    }

    fn dispatch(&mut self, out: &mut Vec<String>) {
        if self.has_data {
            out.push(std::mem::take(&mut self.data));
            self.has_data = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_parser_handles_lf_cr_multiline_data_and_a_missing_final_newline() {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        p.push(b"data: a\ndata: b\n\n", &mut out);
        p.push(b"data:c\r", &mut out);
        p.push(b"\n\r", &mut out); // CRLF split across chunks, then a lone CR as the blank line
        p.push(b"\ndata: last", &mut out); // LF after a CR-terminated line ends nothing...
        assert_eq!(out, vec!["a\nb".to_string(), "c".to_string()]);
        p.finish(&mut out);
        assert_eq!(out.last().map(String::as_str), Some("last"));
        let mut p = SseParser::default();
        let mut out = Vec::new();
        p.push(b": only a comment\n\nevent: ping\n\n", &mut out);
        p.finish(&mut out);
        assert!(out.is_empty());
    }
}
