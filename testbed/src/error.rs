//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong while loading a topology or building a test bed.
///
/// Messages name the offending file, field, host, switch or interface so that a failing
/// `cargo xtask testbed up` tells the user what to fix without reading the source.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The topology file could not be read.
    #[error("cannot read topology file {path}: {source}")]
    ReadTopology {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The topology text is not valid TOML or does not match the schema (unknown field,
    /// wrong type, missing field). The message from the TOML parser names the field and line.
    #[error("topology{}: {message}", origin_suffix(.origin))]
    Parse {
        origin: Option<PathBuf>,
        message: String,
    },
    /// The topology parsed but is inconsistent (duplicate name, bad address, ...).
    #[error("invalid topology{}: {message}", origin_suffix(.origin))]
    Invalid {
        origin: Option<PathBuf>,
        message: String,
    },
    /// The prefix or a name derived from it is not usable as a Linux name.
    #[error("invalid name: {0}")]
    Name(String),
    /// A host, switch or interface asked for through the API does not exist.
    #[error("{0}")]
    Unknown(String),
    /// An external command could not be started.
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    /// An external command ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    /// Something did not become ready in time (OVS daemons, switch ports).
    #[error("timed out: {0}")]
    Timeout(String),
    /// Reading or writing the test bed's own state files failed.
    #[error("state file {path}: {message}")]
    State { path: PathBuf, message: String },
    /// A thread could not step into or out of a host's network namespace.
    #[error("{action} network namespace {name}: {source}")]
    Netns {
        name: String,
        action: &'static str,
        source: std::io::Error,
    },
    /// The machine lacks something the test bed needs.
    #[error(transparent)]
    Missing(#[from] crate::privileges::Missing),
}

fn origin_suffix(origin: &Option<PathBuf>) -> String {
    match origin {
        Some(path) => format!(" {}", path.display()),
        None => String::new(),
    }
}

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
