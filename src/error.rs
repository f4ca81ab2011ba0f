//! Errors a user can cause. Each one names the file, tensor or flag at fault and what was
//! expected, so that the binary can print it on one line and exit non-zero.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not found ({expected})")]
    NotFound { path: PathBuf, expected: String },
    #[error("{path}: malformed JSON: {message}")]
    Json { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    /// A file the user gave that is readable but wrong (a prompts file, say).
    #[error("{path}: {message}")]
    Input { path: PathBuf, message: String },
    #[error("{path}: unsupported model_type {found:?}; ferry supports {supported}")]
    UnsupportedArchitecture {
        path: PathBuf,
        found: String,
        supported: &'static str,
    },
    #[error("{path}: missing tensor {tensor:?}")]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("tensor {tensor:?}: expected shape {expected:?}, found {found:?}")]
    Shape {
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor {tensor:?}: unsupported dtype {found}; expected {expected}")]
    DType {
        tensor: String,
        found: String,
        expected: &'static str,
    },
    #[error("{path}: tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("chat template: {0}")]
    Template(String),
    #[error("{flag}: {message}")]
    Flag { flag: &'static str, message: String },
    #[error("prompt is {tokens} tokens, but the context holds {context} (see --context and the model's max_position_embeddings)")]
    PromptTooLong { tokens: usize, context: usize },
    #[error("{0}")]
    Device(String),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            return Error::NotFound {
                path,
                expected: "no such file or directory".into(),
            };
        }
        Error::Io { path, source }
    }

    pub fn checkpoint(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            message: message.into(),
        }
    }
}
