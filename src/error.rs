//! Errors that carry their own exit code.
//!
//! Exit codes: 0 ok, 1 the operation failed, 2 usage or configuration error. Domain modules return
//! these or `anyhow` errors; only `main` decides the code, by looking for a [`UsageError`] or
//! [`ConfigError`] in the chain.

use thiserror::Error;

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

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{at}: {}", problem.message)]
    Yaml { at: String, problem: YamlProblem },
    #[error("{}: `{key}` {message}", match line { Some(l) => format!("{source_name}:{l}"), None => source_name.clone() })]
    Invalid {
        source_name: String,
        key: String,
        line: Option<usize>,
        message: String,
    },
}

impl ConfigError {
    pub fn from_yaml(source_name: &str, e: &serde_saphyr::Error) -> ConfigError {
        let problem = YamlProblem::from_saphyr(source_name, e);
        ConfigError::Yaml {
            at: problem.at(source_name),
            problem,
        }
    }
}

/// The user asked for something that cannot be done as asked (bad argument, unknown id, wrong state).
#[derive(Debug, Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// The exit code for an error chain.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if cause.is::<UsageError>() || cause.is::<ConfigError>() {
            return 2;
        }
    }
    1
}
