//! State files under [`STATE_DIR`] and the lock that serialises OVS start/stop decisions.
//!
//! * `<prefix>.toml`: one per test bed that is up (or half-built); holds the topology text and
//!   options so that [`crate::Testbed::open`] can rebuild the handle in another process.
//!   `down` never *depends* on it: it finds objects by name prefix.
//! * `ovs-daemons.toml`: written only when `up` started ovsdb-server and/or ovs-vswitchd,
//!   with their pids. `down` stops exactly those pids, and only when no test bed is left.
//! * `lock`: `flock`ed while deciding whether to start or stop OVS daemons, so two processes
//!   (or two test threads) never race on that.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Directory of the test bed's state files (tmpfs: a reboot forgets it along with everything
/// it describes).
pub const STATE_DIR: &str = "/run/ncp-testbed";

/// What `up` recorded about one test bed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TestbedState {
    pub prefix: String,
    pub controller_port: Option<u16>,
    pub topology: String,
    /// OpenFlow over TLS with these switch credentials (absent in older state files).
    #[serde(default)]
    pub controller_tls: Option<OvsSsl>,
}

/// The switch side's TLS files, as `ovs-vsctl set-ssl` takes them (PEM).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OvsSsl {
    pub privkey: PathBuf,
    pub cert: PathBuf,
    pub cacert: PathBuf,
}

/// Daemons the test bed started itself.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OvsDaemons {
    pub ovsdb_server: Option<i32>,
    pub ovs_vswitchd: Option<i32>,
}

fn state_err(path: &Path, message: impl std::fmt::Display) -> Error {
    Error::State {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

fn ensure_dir() -> Result<()> {
    std::fs::create_dir_all(STATE_DIR).map_err(|e| state_err(Path::new(STATE_DIR), e))
}

/// Path of a test bed's state file.
pub fn testbed_path(prefix: &str) -> PathBuf {
    Path::new(STATE_DIR).join(format!("{prefix}.toml"))
}

fn ovs_path() -> PathBuf {
    Path::new(STATE_DIR).join("ovs-daemons.toml")
}

fn write_toml<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    ensure_dir()?;
    let text = toml::to_string(value).map_err(|e| state_err(path, e))?;
    // Write then rename, so a crash never leaves a half-written file behind.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| state_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| state_err(path, e))
}

fn read_toml<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text)
            .map(Some)
            .map_err(|e| state_err(path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(state_err(path, e)),
    }
}

fn remove(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(state_err(path, e)),
    }
}

pub fn write_testbed(state: &TestbedState) -> Result<()> {
    write_toml(&testbed_path(&state.prefix), state)
}

pub fn read_testbed(prefix: &str) -> Result<Option<TestbedState>> {
    read_toml(&testbed_path(prefix))
}

pub fn remove_testbed(prefix: &str) -> Result<()> {
    remove(&testbed_path(prefix))
}

/// Prefixes of all test beds that have a state file.
pub fn testbed_prefixes() -> Result<Vec<String>> {
    let dir = match std::fs::read_dir(STATE_DIR) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(state_err(Path::new(STATE_DIR), e)),
    };
    let mut out = Vec::new();
    for entry in dir {
        let entry = entry.map_err(|e| state_err(Path::new(STATE_DIR), e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(prefix) = name.strip_suffix(".toml")
            && prefix != "ovs-daemons"
        {
            out.push(prefix.to_string());
        }
    }
    out.sort();
    Ok(out)
}

pub fn read_ovs() -> Result<OvsDaemons> {
    Ok(read_toml(&ovs_path())?.unwrap_or_default())
}

pub fn write_ovs(daemons: &OvsDaemons) -> Result<()> {
    if daemons == &OvsDaemons::default() {
        remove(&ovs_path())
    } else {
        write_toml(&ovs_path(), daemons)
    }
}

/// An exclusive `flock` on the state directory's lock file, released on drop.
pub struct Lock {
    _file: File,
}

pub fn lock() -> Result<Lock> {
    ensure_dir()?;
    let path = Path::new(STATE_DIR).join("lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| state_err(&path, e))?;
    // SAFETY: flock(2) on a descriptor we own; no memory is shared with the kernel.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    if rc != 0 {
        return Err(state_err(&path, std::io::Error::last_os_error()));
    }
    // Closing the file (on drop) releases the lock.
    Ok(Lock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_files_without_tls_still_read() {
        let old = "prefix = \"nt1\"\ncontroller_port = 6653\ntopology = \"\"\n";
        let st: TestbedState = toml::from_str(old).expect("older state file");
        assert_eq!(st.controller_tls, None);
        let tls = TestbedState {
            controller_tls: Some(OvsSsl {
                privkey: "/k.pem".into(),
                cert: "/c.pem".into(),
                cacert: "/ca.pem".into(),
            }),
            ..st
        };
        let back: TestbedState =
            toml::from_str(&toml::to_string(&tls).expect("write")).expect("read");
        assert_eq!(back, tls);
    }
}
