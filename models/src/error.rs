use std::path::{Path, PathBuf};

/// Errors from loading or running a model. Every variant names the file or field at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: {msg}", path.display())]
    Config { path: PathBuf, msg: String },
    #[error("{}: {msg}", path.display())]
    Safetensors { path: PathBuf, msg: String },
    #[error("tensor `{name}` is missing from the checkpoint in {}", dir.display())]
    MissingTensor { name: String, dir: PathBuf },
    #[error("{}: tensor `{name}`: {msg}", path.display())]
    Tensor { path: PathBuf, name: String, msg: String },
    #[error("{0}")]
    Input(String),
}

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io { path: path.to_owned(), source }
    }
}
