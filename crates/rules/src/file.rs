//! The `file` sink: one JSON document per line, appended and synced to disk per batch.

use std::path::PathBuf;

use herald_router::OutboxEntry;
use tokio::io::AsyncWriteExt;

use crate::{Delivery, Sink, SinkError};

pub struct FileSink {
    path: PathBuf,
}

impl FileSink {
    pub fn new(path: PathBuf) -> FileSink {
        FileSink { path }
    }
}

impl Sink for FileSink {
    fn deliver<'a>(&'a mut self, entries: &'a [OutboxEntry]) -> Delivery<'a> {
        Box::pin(async move {
            let fail =
                |e: std::io::Error| SinkError::Failed(format!("{}: {e}", self.path.display()));
            let mut lines = Vec::new();
            for entry in entries {
                lines.extend_from_slice(&entry.payload);
                lines.push(b'\n');
            }
            // Opened per batch, so a file moved away by log rotation is recreated.
            let mut file = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .await
                .map_err(fail)?;
            file.write_all(&lines).await.map_err(fail)?;
            file.sync_data().await.map_err(fail)?;
            Ok(())
        })
    }
}
