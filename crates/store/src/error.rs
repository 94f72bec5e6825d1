//! [`StoreError`], the one error type of this crate, and the mapping of redb's errors into it.
//!
//! Every message names the file or directory it is about, so that an operator reading a
//! start-up failure knows what to look at. The cause is part of the message (not a `source`),
//! so that a log line printing only `%error` still shows it.

use std::io;
use std::path::{Path, PathBuf};

/// What went wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The operating system refused a read, write, sync or directory operation.
    #[error("storage I/O error on {}: {error}", path.display())]
    Io { path: PathBuf, error: io::Error },

    /// A file is not what this store wrote: not a redb database, a value that does not decode,
    /// a write-ahead log record that passed its checksum but does not decode. Nothing was
    /// changed on disk.
    #[error("storage is corrupt: {0}; it was left untouched: restore a backup or move it aside")]
    Corrupt(String),

    /// The data directory was written by a newer Herald.
    #[error(
        "storage at {} has format version {found}, newer than version {supported} which this \
         Herald supports; run a newer Herald or point storage at another directory",
        path.display()
    )]
    NewerFormat {
        path: PathBuf,
        found: u64,
        supported: u64,
    },

    /// The storage engine failed for another reason (the file is locked by another process,
    /// the disk is full, ...).
    #[error("storage engine error: {0}")]
    Engine(String),

    /// An earlier write failed half-way and could not be undone, or the checkpoint thread
    /// ended in the middle of a checkpoint, so the store refuses further writes and reads
    /// rather than risk applying a batch the caller was told had failed, or emptying a log
    /// that holds the only copy of some. Restarting recovers from what is on disk.
    #[error(
        "storage at {} refuses writes and reads after an earlier failure it could not recover \
         from; restart to recover from disk",
        path.display()
    )]
    Unusable { path: PathBuf },
}

impl StoreError {
    pub(crate) fn io(path: &Path, error: io::Error) -> StoreError {
        StoreError::Io {
            path: path.to_path_buf(),
            error,
        }
    }
}

/// Adds the file and the action to a redb error.
pub(crate) trait EngineContext<T> {
    fn at(self, path: &Path, doing: &str) -> Result<T, StoreError>;
}

impl<T, E: Into<redb::Error>> EngineContext<T> for Result<T, E> {
    fn at(self, path: &Path, doing: &str) -> Result<T, StoreError> {
        self.map_err(|e| from_redb(path, doing, e.into()))
    }
}

fn from_redb(path: &Path, doing: &str, error: redb::Error) -> StoreError {
    let path_shown = path.display();
    match error {
        redb::Error::Corrupted(what) => {
            StoreError::Corrupt(format!("{path_shown}: {doing}: {what}"))
        }
        // redb reports a file without its magic number as InvalidData: not a database.
        redb::Error::Io(e) if e.kind() == io::ErrorKind::InvalidData => {
            StoreError::Corrupt(format!("{path_shown}: {doing}: {e}"))
        }
        redb::Error::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => StoreError::Corrupt(
            format!("{path_shown}: {doing}: too short to be a redb database ({e})"),
        ),
        redb::Error::Io(e) => StoreError::Io {
            path: path.to_path_buf(),
            error: e,
        },
        redb::Error::DatabaseAlreadyOpen => StoreError::Engine(format!(
            "{path_shown}: {doing}: the database is already open, probably by another Herald \
             using the same data directory"
        )),
        redb::Error::TableTypeMismatch { .. }
        | redb::Error::TableIsMultimap(_)
        | redb::Error::TableIsNotMultimap(_)
        | redb::Error::TypeDefinitionChanged { .. } => StoreError::Corrupt(format!(
            "{path_shown}: {doing}: a table does not have the layout this Herald writes ({error})"
        )),
        other => StoreError::Engine(format!("{path_shown}: {doing}: {other}")),
    }
}
