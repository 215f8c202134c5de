//! Recorders for unit tests of the data planes: one writing into a fresh directory, and
//! reading back what it wrote.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed step should fail the test"
)]

use std::path::{Path, PathBuf};

use super::reader::{Recording, read_files};
use super::recorder::{Recorder, RecorderConfig};

/// A recorder writing into a fresh directory under the system's temp dir (`tag` keeps
/// tests apart), keeping the primary's answers if `responses`.
pub fn recorder(tag: &str, responses: bool) -> (Recorder, PathBuf) {
    let dir = std::env::temp_dir().join(format!(
        "ncp-rec-{tag}-{}-{}",
        std::process::id(),
        super::now_ns()
    ));
    let recorder = Recorder::start(RecorderConfig {
        dir: dir.clone(),
        file_prefix: "test".into(),
        rotate_bytes: 1 << 30,
        rotate_secs: 3600,
        queue_capacity: 8192,
        record_responses: responses,
    })
    .unwrap();
    (recorder, dir)
}

/// Everything recorded in `dir` (files in recording order), then removes the directory.
pub fn recorded(dir: &Path) -> Recording {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let r = read_files(&files);
    std::fs::remove_dir_all(dir).unwrap();
    r
}
