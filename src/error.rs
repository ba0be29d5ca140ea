//! Errors that carry their own exit code.
//!
//! Exit codes: 0 ok, 1 the operation failed, 2 usage or configuration error. Domain modules return
//! these or `anyhow` errors; only `main` decides the code, by looking for a [`UsageError`] or
//! [`ConfigError`] in the chain, or an [`OutputClosed`], which ends a command quietly with 0.

use thiserror::Error;

use crate::yaml::YamlProblem;

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

/// Standard output was closed by its reader (`orchestrate tasks | head`). Like ripgrep, a command
/// then stops writing and ends quietly with success: the reader had what it wanted.
#[derive(Debug, Error)]
#[error("standard output was closed")]
pub struct OutputClosed;

/// Whether the error is a closed standard output, which ends a command quietly.
pub fn output_closed(err: &anyhow::Error) -> bool {
    err.chain().any(|c| c.is::<OutputClosed>())
}

/// The exit code for an error chain.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    if output_closed(err) {
        return 0;
    }
    for cause in err.chain() {
        if cause.is::<UsageError>() || cause.is::<ConfigError>() {
            return 2;
        }
    }
    1
}
