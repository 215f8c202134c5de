//! Putting the calling thread into a test-bed host's network namespace. A thread's
//! namespace decides where the sockets it creates live (and threads it spawns inherit
//! it), so a test or benchmark can act as a host without spawning `ip netns exec`.

use std::{fs::File, os::fd::AsRawFd as _};

use crate::{Error, Result};

/// A named network namespace (one `ip netns add` made), held open.
pub struct Netns {
    name: String,
    file: File,
}

impl Netns {
    /// Opens the namespace `ip netns` created under `name` (a host's [`crate::Testbed::netns`]).
    pub fn open(name: &str) -> Result<Self> {
        let file = File::open(format!("/run/netns/{name}")).map_err(|source| Error::Netns {
            name: name.to_owned(),
            action: "opening",
            source,
        })?;
        Ok(Self {
            name: name.to_owned(),
            file,
        })
    }

    /// Moves the calling thread into this namespace for good (for a thread that lives
    /// there; see [`Netns::run`] to come back).
    pub fn enter(&self) -> Result<()> {
        setns(&self.file).map_err(|source| Error::Netns {
            name: self.name.clone(),
            action: "entering",
            source,
        })
    }

    /// Runs `f` with the calling thread in this namespace, then moves the thread back.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        // The namespace to return to is the calling thread's own, whichever thread it is.
        let home = File::open("/proc/thread-self/ns/net").map_err(|source| Error::Netns {
            name: self.name.clone(),
            action: "opening the own namespace before entering",
            source,
        })?;
        self.enter()?;
        let out = f();
        // A thread that cannot get back would run everything after it (commands it
        // spawns included) in the test-bed host: fail loudly rather than carry on there.
        setns(&home).map_err(|source| Error::Netns {
            name: self.name.clone(),
            action: "leaving",
            source,
        })?;
        Ok(out)
    }
}

fn setns(ns: &File) -> std::io::Result<()> {
    // SAFETY: setns(2) on a descriptor we hold open; it changes only this thread's network
    // namespace, which is allowed in a multi-threaded process.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
