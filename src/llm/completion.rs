//! One chat completion's body added up into an answer: the events of a stream (`choices[].delta`),
//! or a whole completion (`choices[].message`) from a server that ignored `stream: true`, become a
//! [`ChatReply`], or a [`ChatError`] saying what came instead (no choices, no answer text, garbage,
//! an error object inside a 200).
//!
//! It never panics and never trusts the server: events that are not JSON, fields of the wrong type
//! and missing pieces are counted or quoted (cut to `QUOTE_BYTES`), never unwrapped. It does no I/O;
//! `chat` feeds it the body as it arrives, and the caller's `on_delta` sees the answer text as it
//! grows.

use serde_json::Value;

use super::http_error::{QUOTE_BYTES, classify_http_error, provider_message, truncate};
use super::sse::SseParser;
use super::{ChatError, ChatReply};
use crate::record::Outcome;

/// What the body of one answer adds up to, fed as it arrives.
#[derive(Default)]
pub(super) struct Accumulator {
    parser: SseParser,
    /// Events the parser finished in the current chunk; kept between chunks for its allocation.
    pending: Vec<String>,
    reply: ChatReply,
    /// Some event carried a non-empty `choices` array.
    saw_choices: bool,
    events: usize,
    done: bool,
    reasoning_chars: usize,
    finish_reason: Option<String>,
    /// An `{"error": …}` object sent inside a 200 stream (OpenRouter does this).
    stream_error: Option<Value>,
    /// Event data that was not JSON, kept for the error message.
    garbage: Vec<String>,
}

impl Accumulator {
    /// Adds the next piece of the body, cut anywhere.
    pub(super) fn push(&mut self, bytes: &[u8], on_delta: &mut dyn FnMut(&str)) {
        self.parser.push(bytes, &mut self.pending);
        let mut events = std::mem::take(&mut self.pending);
        for data in events.drain(..) {
            self.on_event(&data, on_delta);
        }
        self.pending = events;
    }

    /// The server said `[DONE]`: reading on would only wait for it to close the connection.
    pub(super) fn is_done(&self) -> bool {
        self.done
    }

    fn on_event(&mut self, data: &str, on_delta: &mut dyn FnMut(&str)) {
        self.events += 1;
        let trimmed = data.trim();
        if trimmed == "[DONE]" {
            self.done = true;
            return;
        }
        if trimmed.is_empty() {
            return;
        }
        match serde_json::from_str::<Value>(trimmed) {
            Ok(v) => self.on_json(&v, on_delta),
            // A server that forgets the blank line between events runs several `data:` lines
            // into one event; take them one by one.
            Err(_) if trimmed.contains('\n') => {
                for line in trimmed.lines() {
                    self.events -= 1;
                    self.on_event(line, on_delta);
                }
            }
            Err(_) => {
                if self.garbage.len() < 3 {
                    self.garbage.push(truncate(trimmed, 512));
                }
            }
        }
    }

    /// One chunk (`choices[].delta`) or one whole completion (`choices[].message`).
    fn on_json(&mut self, v: &Value, on_delta: &mut dyn FnMut(&str)) {
        if let Some(e) = v.get("error").filter(|e| !e.is_null()) {
            self.stream_error.get_or_insert_with(|| e.clone());
        }
        if let Some(m) = v
            .get("model")
            .and_then(Value::as_str)
            .filter(|m| !m.is_empty())
        {
            self.reply.model = Some(m.to_string());
        }
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            let n = |p: &str| u.pointer(p).and_then(Value::as_u64);
            self.reply.input_tokens = n("/prompt_tokens").or(self.reply.input_tokens);
            self.reply.output_tokens = n("/completion_tokens").or(self.reply.output_tokens);
            self.reply.cached_tokens =
                n("/prompt_tokens_details/cached_tokens").or(self.reply.cached_tokens);
        }
        let Some(choices) = v.get("choices").and_then(Value::as_array) else {
            return;
        };
        // With n > 1 the server interleaves choices; the answer is choice 0.
        let first = choices
            .iter()
            .find(|c| c.get("index").and_then(Value::as_u64).unwrap_or(0) == 0);
        let Some(choice) = first else {
            return;
        };
        self.saw_choices = true;
        for part in ["delta", "message"] {
            let Some(p) = choice.get(part) else { continue };
            if let Some(text) = p
                .get("content")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
            {
                self.reply.text.push_str(text);
                on_delta(text);
            }
            for k in ["reasoning_content", "reasoning"] {
                if let Some(r) = p.get(k).and_then(Value::as_str) {
                    self.reasoning_chars += r.chars().count();
                }
            }
        }
        if let Some(r) = choice.get("finish_reason").and_then(Value::as_str) {
            self.finish_reason = Some(r.to_string());
        }
    }

    /// The body ended (or said `[DONE]`); `raw` is all of it, for servers that answered plain JSON
    /// and for quoting what came when it is no answer.
    pub(super) fn finish(
        mut self,
        url: &str,
        status: u16,
        raw: &[u8],
        on_delta: &mut dyn FnMut(&str),
    ) -> Result<ChatReply, ChatError> {
        let mut events = std::mem::take(&mut self.pending);
        self.parser.finish(&mut events);
        for data in events {
            self.on_event(&data, on_delta);
        }
        if self.events == 0 {
            // No SSE at all: a plain JSON answer (or error) to a streaming request.
            let body = String::from_utf8_lossy(raw);
            if let Ok(v) = serde_json::from_str::<Value>(body.trim()) {
                self.on_json(&v, on_delta);
            }
        }
        if let Some(e) = self.stream_error.take() {
            // The provider reported an error inside a 200; its `code` is often the HTTP status
            // it would have sent.
            let code = e
                .get("code")
                .and_then(|c| {
                    c.as_u64()
                        .or_else(|| c.as_str().and_then(|s| s.parse().ok()))
                })
                .and_then(|c| u16::try_from(c).ok())
                .filter(|c| (400..600).contains(c))
                .unwrap_or(500);
            let body = serde_json::json!({ "error": e }).to_string();
            let mut err = classify_http_error(url, code, "", &body, None);
            err.message = format!(
                "POST {url}: HTTP {status}, but the answer reported an error (code {code}): {}",
                provider_message(&body)
            );
            return Err(err);
        }
        let quoted = || truncate(String::from_utf8_lossy(raw).trim(), QUOTE_BYTES);
        if !self.saw_choices {
            let what = if self.garbage.is_empty() {
                "no choices in the answer"
            } else {
                "the answer is not chat-completion JSON"
            };
            return Err(ChatError::new(
                Outcome::BadOutput,
                format!("POST {url}: HTTP {status}: {what}; it was: {}", quoted()),
            ));
        }
        if self.reply.text.is_empty() {
            let mut why = String::new();
            if let Some(r) = &self.finish_reason {
                why.push_str(&format!(" (finish_reason {r}"));
                if self.reasoning_chars > 0 {
                    why.push_str(&format!(
                        ", after {} characters of reasoning",
                        self.reasoning_chars
                    ));
                }
                why.push(')');
            }
            return Err(ChatError::new(
                Outcome::BadOutput,
                format!("POST {url}: HTTP {status}: the model gave no answer text{why}"),
            ));
        }
        Ok(self.reply)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Feeds `body` in pieces of `step` bytes and adds it up, as `chat` does.
    fn accumulate(body: &[u8], step: usize) -> (Result<ChatReply, ChatError>, Vec<String>) {
        let mut acc = Accumulator::default();
        let mut deltas = Vec::new();
        let mut on_delta = |d: &str| deltas.push(d.to_string());
        for piece in body.chunks(step.max(1)) {
            acc.push(piece, &mut on_delta);
        }
        let result = acc.finish("http://h/v1/chat/completions", 200, body, &mut on_delta);
        (result, deltas)
    }

    /// A streamed answer with what real servers mix in: a keep-alive comment, `event:` and `id:`
    /// lines, reasoning before the answer, usage in a last chunk without choices, CRLF line ends.
    /// The live-server tests in `llm` send it too.
    pub(in crate::llm) const STREAM: &str = concat!(
        ": keep-alive comment\r\n\r\n",
        "data: {\"model\":\"qwen3\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"reasoning_content\":\"hmm\"}}]}\r\n\r\n",
        "event: message\r\nid: 2\r\n",
        "data: {\"model\":\"qwen3\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Héllo\"}}]}\r\n\r\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\", wörld ✓\"},\"finish_reason\":\"stop\"}]}\r\n\r\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":5,",
        "\"prompt_tokens_details\":{\"cached_tokens\":8}}}\r\n\r\n",
        "data: [DONE]\r\n\r\n",
    );

    #[test]
    fn sse_stream_adds_up_whatever_the_chunk_boundaries() {
        for step in [1, 2, 3, 7, 64, 4096] {
            let (reply, deltas) = accumulate(STREAM.as_bytes(), step);
            let reply = reply.unwrap();
            assert_eq!(reply.text, "Héllo, wörld ✓", "step {step}");
            assert_eq!(deltas.concat(), "Héllo, wörld ✓");
            assert_eq!(reply.input_tokens, Some(12));
            assert_eq!(reply.output_tokens, Some(5));
            assert_eq!(reply.cached_tokens, Some(8));
            assert_eq!(reply.model.as_deref(), Some("qwen3"));
        }
    }

    #[test]
    fn events_without_blank_lines_between_them_still_count() {
        let body = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\ndata: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\ndata: [DONE]\n";
        let (reply, _) = accumulate(body.as_bytes(), 5);
        assert_eq!(reply.unwrap().text, "ab");
    }

    #[test]
    fn a_plain_json_answer_to_a_streaming_request_is_accepted() {
        let body = r#"{"id":"x","model":"m1","choices":[{"index":0,"message":{"role":"assistant","content":"plain"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#;
        let (reply, deltas) = accumulate(body.as_bytes(), 10);
        let reply = reply.unwrap();
        assert_eq!(reply.text, "plain");
        assert_eq!(deltas, vec!["plain"]);
        assert_eq!(
            (reply.input_tokens, reply.output_tokens),
            (Some(3), Some(1))
        );
        assert_eq!(reply.model.as_deref(), Some("m1"));
    }

    #[test]
    fn garbage_or_choiceless_answers_are_bad_output_quoting_the_body() {
        for body in [
            "<html>proxy says hi</html>",
            "data: not json\n\n",
            "data: {\"object\":\"x\"}\n\n",
            "",
        ] {
            let err = accumulate(body.as_bytes(), 3).0.unwrap_err();
            assert_eq!(err.outcome, Outcome::BadOutput, "{body}");
            assert!(err.message.contains(body.trim()), "{}", err.message);
            assert!(err.message.contains("http://h/v1/chat/completions"));
        }
        let huge = format!("data: {}\n\n", "x".repeat(100_000));
        let err = accumulate(huge.as_bytes(), 4096).0.unwrap_err();
        assert!(err.message.len() < 6000, "{}", err.message.len());
        // Only reasoning, no answer text.
        let body = "data: {\"choices\":[{\"delta\":{\"reasoning_content\":\"thinking\"},\"finish_reason\":\"length\"}]}\n\n";
        let err = accumulate(body.as_bytes(), 8).0.unwrap_err();
        assert_eq!(err.outcome, Outcome::BadOutput);
        assert!(
            err.message.contains("finish_reason length"),
            "{}",
            err.message
        );
    }

    #[test]
    fn an_error_inside_a_200_stream_is_classified_by_its_code() {
        let body = "data: {\"choices\":[{\"delta\":{\"content\":\"par\"}}]}\n\ndata: {\"error\":{\"code\":429,\"message\":\"Provider overloaded\"}}\n\n";
        let err = accumulate(body.as_bytes(), 9).0.unwrap_err();
        assert_eq!(err.outcome, Outcome::RateLimited);
        assert!(
            err.message.contains("\"Provider overloaded\""),
            "{}",
            err.message
        );
        let body = r#"{"error":{"message":"boom"}}"#;
        let err = accumulate(body.as_bytes(), 9).0.unwrap_err();
        assert_eq!(err.outcome, Outcome::AgentError);
        assert!(err.message.contains("boom"));
    }
}
