//! Strict YAML: the parser limits every file we read is held to, and the text of its errors.
//!
//! Task files arrive from editors, phones, sync clients and CI jobs, so a file may be hostile: the
//! budgets here bound the CPU and memory any one file can cost, and duplicate keys are errors. Error
//! text speaks to the person editing the file (`file:line:column: message`), never to a programmer.
//! The records orchestrate writes itself are parsed with budgets of their own ([`record_options`]),
//! sized for what a record holds: a large record must never make a task vanish, and the task-file
//! budgets must never grow to fit one. This module never touches the file system.

/// Parse options shared by the config and task parsers: duplicate keys are errors and the budgets
/// (events, aliases, depth) bound what a hostile file can cost.
pub fn options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        duplicate_keys: serde_saphyr::options::DuplicateKeyPolicy::Error,
        budget: serde_saphyr::budget! {
            max_events: 200_000,
            max_aliases: 1_000,
            max_anchors: 1_000,
            max_depth: 64,
        },
    }
}

/// Parse options for the records orchestrate writes itself (claims, histories, results): as strict,
/// with budgets sized for what a record may hold rather than for a hostile task file. A result lists
/// up to `record::FILES_IN_RECORD` changed and review files (results written before that cap may list
/// hundreds of thousands), every attempt, and a description as long as `max_task_bytes` allows; the
/// file itself is read up to `record::MAX_RECORD_BYTES`.
pub fn record_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        duplicate_keys: serde_saphyr::options::DuplicateKeyPolicy::Error,
        budget: serde_saphyr::budget! {
            max_events: 4_000_000,
            max_nodes: 4_000_000,
            max_total_scalar_bytes: 64 * 1024 * 1024,
            max_aliases: 1_000,
            max_anchors: 1_000,
            max_depth: 64,
        },
    }
}

/// The parser speaks to programmers ("set DuplicateKeyPolicy in Options"); people editing a task file
/// need to hear about their file instead.
fn plain_message(m: &str) -> String {
    m.replace(
        ", set DuplicateKeyPolicy in Options if acceptable",
        " (each key may appear once)",
    )
    .replace(
        "multiple YAML documents detected; use from_str_multiple or from_str_multiple_with_options",
        "several YAML documents (`---`) in one file; a file holds one",
    )
    .replace(
        "data did not match any variant of untagged enum Priority",
        "priority must be high, normal, low or an integer",
    )
}

/// A YAML problem placed in its file: `path:line:column: message`, plus the parser's source excerpt.
#[derive(Debug, Clone)]
pub struct YamlProblem {
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
    /// The parser's rendering with a source excerpt and caret, when it has one.
    pub excerpt: Option<String>,
}

impl YamlProblem {
    pub fn from_saphyr(source_name: &str, e: &serde_saphyr::Error) -> YamlProblem {
        let full = e.to_string();
        let loc = e.location();
        let first = full.lines().next().unwrap_or_default();
        // serde-saphyr prefixes "error: line L column C: "; we print the location ourselves.
        let message = match first.find(": ") {
            Some(_) if first.starts_with("error: line ") => {
                first.splitn(3, ": ").nth(2).unwrap_or(first).to_string()
            }
            _ => first.to_string(),
        };
        let message = plain_message(&message);
        let excerpt = full
            .find("\n -->")
            .map(|i| plain_message(&full[i + 1..].replace("<input>", source_name)));
        YamlProblem {
            line: loc.map(|l| l.line() as usize).filter(|&l| l > 0),
            column: loc.map(|l| l.column() as usize).filter(|&c| c > 0),
            message,
            excerpt,
        }
    }

    pub fn at(&self, source_name: &str) -> String {
        match (self.line, self.column) {
            (Some(l), Some(c)) => format!("{source_name}:{l}:{c}"),
            (Some(l), None) => format!("{source_name}:{l}"),
            _ => source_name.to_string(),
        }
    }
}

/// Lines (1-based) where `key` appears as a top-level key: at the start of an unindented line (plain,
/// quoted, or `key :`, or as `? key`), or inside a flow mapping (`{a: 1, key: 2}`). For validation
/// errors, which serde cannot place. Indented lines are skipped: they belong to nested values or block
/// scalars (`description: |` followed by `  id: x` is text, not a key).
pub fn key_lines(text: &str, key: &str) -> Vec<usize> {
    let spellings = [key.to_string(), format!("\"{key}\""), format!("'{key}'")];
    let flow = [format!("{{{key}:"), format!(", {key}:"), format!(",{key}:")];
    let mut out: Vec<usize> = Vec::new();
    for (i, l) in lines(text).enumerate() {
        // A stray byte-order mark counts as blank (YAML parsers skip it; so must we).
        let t = l.trim_start_matches('\u{feff}');
        let mut t = t.strip_prefix("? ").unwrap_or(t);
        // Node properties before the key (`!tag agent: x`, `&anchor agent: x`) belong to the key.
        while t.starts_with(['!', '&'])
            && let Some(i) = t.find([' ', '\t'])
        {
            t = t[i..].trim_start_matches([' ', '\t']);
        }
        let block = spellings.iter().any(|s| {
            t.strip_prefix(s.as_str()).is_some_and(|rest| {
                let rest = rest.trim_start_matches([' ', '\t']);
                rest.starts_with(':') || (t.len() == s.len() && l.starts_with("? "))
            })
        });
        if block || flow.iter().any(|f| l.contains(f.as_str())) {
            out.push(i + 1);
        }
    }
    out
}

/// Lines as YAML counts them: a line break is `\r\n`, `\n` or a lone `\r` (which `str::lines` does not
/// split on), so line numbers agree with the parser's.
pub fn lines(text: &str) -> impl Iterator<Item = &str> {
    text.split('\n').flat_map(|l| {
        let l = l.strip_suffix('\r').unwrap_or(l);
        l.split('\r')
    })
}
