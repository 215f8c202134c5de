//! Spill spools on disk: the I/O half of spilling. The policy (when a replica spills,
//! how much its spool may hold, when it is detached) is the replication core's; this
//! module only keeps the bytes the core hands out ([`ncp_replication::Action::Spill`])
//! and gives them back, in order, as the replica catches up.
//!
//! Format: one file per spill episode of a replica in a session, in the service's
//! `spill_dir`, named `ncp-spill-<pid>-<spooler>-<session>-r<replica>-<episode>.spool`.
//! The file holds the replica's stream bytes back to back, with no header and no framing:
//! the file's byte `k` is the `k`-th byte the replica gets from the spool. (The offline
//! mode's pcapng recordings carry packets, timestamps and both directions; a spool is
//! only ever read back sequentially by the worker that wrote it, so raw bytes suffice.)
//! An episode ends when the spool has been replayed to its end, when the replica is
//! detached or when the session ends: its file is removed then, and a later spill of the
//! same replica starts a new file.
//!
//! Writes never block the worker: they go to one writer thread per [`Spooler`] through
//! a queue bounded in bytes, and an append that does not fit (the disk is slow) or a
//! write that fails (the disk is full) is reported as a failure, which the driver turns
//! into a detach of that replica. The worker reads back only what the writer has
//! written (`pread` at its own offset), so it never waits for the disk either.

use std::{
    collections::HashMap,
    fs::{self, File, OpenOptions},
    io::Write,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
};

use crossbeam_channel::{Receiver, Sender};
use ncp_replication::SessionId;

/// Spooled bytes queued toward the writer thread at least allowed per worker; a larger
/// spill (a replica budget plus a read) raises it to two of those.
pub const MIN_QUEUED_BYTES: u64 = 64 << 20;

/// Numbers the spoolers of this process, so that workers' files never share a name.
static SPOOLERS: AtomicU64 = AtomicU64::new(0);

/// A replica of a session.
pub type SpoolKey = (SessionId, u16);

/// Why an append was refused.
#[derive(Debug, thiserror::Error)]
pub enum SpillError {
    /// The writer is too far behind: the disk does not keep up.
    #[error("spool writer is {queued} bytes behind, at most {max} allowed")]
    Backlogged {
        /// Bytes already queued.
        queued: u64,
        /// The bound.
        max: u64,
    },
    /// The spool's file could not be written (earlier failure, or the writer is gone).
    #[error("spool could not be written")]
    WriteFailed,
}

/// What [`Spooler::read`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum SpoolRead {
    /// This many bytes, from the replica's position on.
    Data(usize),
    /// The next bytes are still on their way to the disk: try again shortly.
    NotYet,
    /// The spool is broken (write or read error): the replica cannot get its
    /// stream any more.
    Failed,
}

/// What the writer thread tells the worker about one spool file.
#[derive(Debug, Default)]
struct Progress {
    /// Bytes written to the file so far.
    written: AtomicU64,
    /// A write failed; the file is incomplete.
    failed: AtomicBool,
}

/// One spool as the worker sees it.
#[derive(Debug)]
struct SpoolFile {
    path: Arc<Path>,
    progress: Arc<Progress>,
    /// Bytes appended (queued or written).
    appended: u64,
    /// Bytes handed back to the driver and reported sent.
    read_at: u64,
    /// Opened once the writer has created the file.
    reader: Option<File>,
}

enum Msg {
    Append {
        path: Arc<Path>,
        progress: Arc<Progress>,
        bytes: Vec<u8>,
    },
    Remove(Arc<Path>),
}

/// The spools of one worker and the thread that writes them.
#[derive(Debug)]
pub struct Spooler {
    tx: Option<Sender<Msg>>,
    thread: Option<JoinHandle<()>>,
    queued: Arc<AtomicU64>,
    max_queued: u64,
    spools: HashMap<SpoolKey, SpoolFile>,
    /// File name prefix: process and spooler.
    prefix: String,
    episodes: u64,
}

impl Spooler {
    /// A spooler whose writer may fall at most `max_queued` bytes behind.
    pub fn new(max_queued: u64) -> std::io::Result<Self> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let queued = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&queued);
        let number = SPOOLERS.fetch_add(1, Ordering::Relaxed);
        let thread = std::thread::Builder::new()
            .name(format!("ncp-spool-{number}"))
            .spawn(move || write_spools(&rx, &counted))?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
            queued,
            max_queued,
            spools: HashMap::new(),
            prefix: format!("ncp-spill-{}-{number}", std::process::id()),
            episodes: 0,
        })
    }

    /// Appends `bytes` to the spool of `key` (starting one in `dir` if it has none).
    /// Never blocks: refused when the writer is too far behind or the spool broke.
    pub fn append(&mut self, key: SpoolKey, dir: &Path, bytes: Vec<u8>) -> Result<(), SpillError> {
        let len = bytes.len() as u64;
        let queued = self.queued.load(Ordering::Acquire);
        if queued + len > self.max_queued {
            return Err(SpillError::Backlogged {
                queued,
                max: self.max_queued,
            });
        }
        let Some(tx) = &self.tx else {
            return Err(SpillError::WriteFailed);
        };
        let spool = self.spools.entry(key).or_insert_with(|| {
            self.episodes += 1;
            let name = format!(
                "{}-{}-r{}-{}.spool",
                self.prefix, key.0.0, key.1, self.episodes
            );
            SpoolFile {
                path: dir.join(name).into(),
                progress: Arc::default(),
                appended: 0,
                read_at: 0,
                reader: None,
            }
        });
        if spool.progress.failed.load(Ordering::Acquire) {
            return Err(SpillError::WriteFailed);
        }
        self.queued.fetch_add(len, Ordering::AcqRel);
        let msg = Msg::Append {
            path: Arc::clone(&spool.path),
            progress: Arc::clone(&spool.progress),
            bytes,
        };
        if tx.send(msg).is_err() {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            return Err(SpillError::WriteFailed);
        }
        spool.appended += len;
        Ok(())
    }

    /// Reads the next bytes of `key`'s spool into `buf`, without consuming them: report
    /// what was used with [`Spooler::consumed`].
    pub fn read(&mut self, key: SpoolKey, buf: &mut [u8]) -> SpoolRead {
        let Some(spool) = self.spools.get_mut(&key) else {
            // The core counts spilled bytes as spooled from the moment it spills them;
            // the driver appends them when it carries out the `Spill` action, which may
            // come after a write attempt in the same pass.
            return SpoolRead::NotYet;
        };
        if spool.progress.failed.load(Ordering::Acquire) {
            return SpoolRead::Failed;
        }
        let written = spool.progress.written.load(Ordering::Acquire);
        let ready = written.saturating_sub(spool.read_at);
        if ready == 0 {
            return SpoolRead::NotYet;
        }
        let reader = match &mut spool.reader {
            Some(file) => file,
            slot @ None => match File::open(&spool.path) {
                Ok(file) => slot.insert(file),
                Err(e) => {
                    tracing::warn!(path = %spool.path.display(), error = %e, "spool cannot be opened");
                    return SpoolRead::Failed;
                }
            },
        };
        let want = usize::try_from(ready).unwrap_or(usize::MAX).min(buf.len());
        let Some(buf) = buf.get_mut(..want) else {
            return SpoolRead::Failed;
        };
        match reader.read_at(buf, spool.read_at) {
            Ok(0) => SpoolRead::Failed, // shorter than written: truncated behind our back
            Ok(n) => SpoolRead::Data(n),
            Err(e) => {
                tracing::warn!(path = %spool.path.display(), error = %e, "spool cannot be read");
                SpoolRead::Failed
            }
        }
    }

    /// `n` bytes of what [`Spooler::read`] gave were handed to the replica. Once every
    /// appended byte was, the episode is over and its file is removed.
    pub fn consumed(&mut self, key: SpoolKey, n: usize) {
        let Some(spool) = self.spools.get_mut(&key) else {
            return;
        };
        spool.read_at = spool.read_at.saturating_add(n as u64);
        if spool.read_at >= spool.appended {
            self.remove(key);
        }
    }

    /// Ends `key`'s spool, if it has one: its file is removed (after any write still
    /// queued for it).
    pub fn remove(&mut self, key: SpoolKey) {
        let Some(spool) = self.spools.remove(&key) else {
            return;
        };
        drop(spool.reader);
        if let Some(tx) = &self.tx
            && tx.send(Msg::Remove(Arc::clone(&spool.path))).is_ok()
        {
            return;
        }
        // No writer: nothing can be queued for the file either.
        remove_file(&spool.path);
    }

    /// Ends every spool of session `id`.
    pub fn remove_session(&mut self, id: SessionId) {
        let keys: Vec<SpoolKey> = self.spools.keys().filter(|k| k.0 == id).copied().collect();
        for key in keys {
            self.remove(key);
        }
    }

    /// Spools open right now (gauge).
    pub fn open_spools(&self) -> usize {
        self.spools.len()
    }

    /// Bytes queued toward the disk right now (gauge).
    pub fn queued_bytes(&self) -> u64 {
        self.queued.load(Ordering::Acquire)
    }
}

impl Drop for Spooler {
    /// Every spool ends with the worker: files are removed, the writer stops.
    fn drop(&mut self) {
        let keys: Vec<SpoolKey> = self.spools.keys().copied().collect();
        for key in keys {
            self.remove(key);
        }
        self.tx = None;
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("spool writer panicked");
        }
    }
}

fn remove_file(path: &Path) {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "spool file not removed"),
    }
}

/// The writer thread: appends in arrival order, removes files when told; every file it
/// still has open when the workers' side goes away is removed too.
fn write_spools(rx: &Receiver<Msg>, queued: &AtomicU64) {
    let mut open: HashMap<Arc<Path>, File> = HashMap::new();
    for msg in rx {
        match msg {
            Msg::Append {
                path,
                progress,
                bytes,
            } => {
                let len = bytes.len() as u64;
                if !progress.failed.load(Ordering::Acquire) {
                    match append(&mut open, &path, &bytes) {
                        Ok(()) => {
                            progress.written.fetch_add(len, Ordering::AcqRel);
                        }
                        Err(e) => {
                            tracing::warn!(path = %path.display(), error = %e, "spool write failed");
                            progress.failed.store(true, Ordering::Release);
                        }
                    }
                }
                queued.fetch_sub(len, Ordering::AcqRel);
            }
            Msg::Remove(path) => {
                open.remove(&path);
                remove_file(&path);
            }
        }
    }
    for (path, file) in open.drain() {
        drop(file);
        remove_file(&path);
    }
}

fn append(
    open: &mut HashMap<Arc<Path>, File>,
    path: &Arc<Path>,
    bytes: &[u8],
) -> std::io::Result<()> {
    let file = match open.get_mut(path) {
        Some(file) => file,
        None => {
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir)?;
            }
            let file = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(path)?;
            open.entry(Arc::clone(path)).or_insert(file)
        }
    };
    file.write_all(bytes)
}

/// Removes the spool files in `dir` left by middlebox processes that no longer run (a
/// middlebox killed outright cannot remove its own). Files of running processes,
/// this one included, are kept. Returns how many were removed.
pub fn remove_orphans(dir: &Path) -> usize {
    let mut removed = 0;
    for path in spool_files(dir) {
        let pid = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("ncp-spill-"))
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<u32>().ok());
        let Some(pid) = pid else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            remove_file(&path);
            removed += 1;
        }
    }
    removed
}

/// Files a spooler would name in `dir` (for tests and checks).
pub fn spool_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("ncp-spill-") && n.ends_with(".spool"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_read(spooler: &mut Spooler, key: SpoolKey, buf: &mut [u8]) -> SpoolRead {
        // The writer thread runs on its own: wait for its progress, not for a time.
        loop {
            match spooler.read(key, buf) {
                SpoolRead::NotYet => std::thread::yield_now(),
                other => return other,
            }
        }
    }

    /// A test's own directory, not created yet; removed with all it holds when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("ncp-spool-test-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            Self(dir)
        }

        /// The directory, created, holding a small file for each of `files`; their paths.
        fn holding<const N: usize>(name: &str, files: [&str; N]) -> (Self, [PathBuf; N]) {
            let scratch = Self::new(name);
            fs::create_dir_all(&scratch.0).unwrap();
            let paths = files.map(|f| scratch.0.join(f));
            for path in &paths {
                fs::write(path, b"x").unwrap();
            }
            (scratch, paths)
        }
    }

    impl std::ops::Deref for Scratch {
        type Target = Path;

        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn appended_bytes_come_back_in_order_and_the_file_goes_when_replayed() {
        let dir = Scratch::new("order");
        let mut spooler = Spooler::new(1 << 20).unwrap();
        let key = (SessionId(7), 0);
        spooler.append(key, &dir, b"hello ".to_vec()).unwrap();
        spooler.append(key, &dir, b"world".to_vec()).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4];
        while got.len() < 11 {
            let SpoolRead::Data(n) = wait_read(&mut spooler, key, &mut buf) else {
                panic!("spool broke");
            };
            // Take one byte less than offered: the rest comes again.
            let used = n.saturating_sub(1).max(1);
            got.extend_from_slice(&buf[..used]);
            spooler.consumed(key, used);
        }
        assert_eq!(got, b"hello world");
        assert_eq!(spooler.open_spools(), 0);
        drop(spooler); // the writer has carried out the removal when it stops
        assert!(spool_files(&dir).is_empty(), "{:?}", spool_files(&dir));
    }

    #[test]
    fn a_backlog_beyond_the_bound_is_refused() {
        let dir = Scratch::new("bound");
        let mut spooler = Spooler::new(8).unwrap();
        let key = (SessionId(1), 2);
        assert!(matches!(
            spooler.append(key, &dir, vec![0; 9]),
            Err(SpillError::Backlogged { max: 8, .. })
        ));
        drop(spooler);
    }

    #[test]
    fn an_unwritable_spool_fails_and_leaves_nothing() {
        // A directory where a file is expected: creating the spool fails.
        let (_dir, [blocker]) = Scratch::holding("unwritable", ["not-a-dir"]);
        let mut spooler = Spooler::new(1 << 20).unwrap();
        let key = (SessionId(3), 0);
        spooler.append(key, &blocker, b"data".to_vec()).unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(wait_read(&mut spooler, key, &mut buf), SpoolRead::Failed);
        assert!(matches!(
            spooler.append(key, &blocker, b"more".to_vec()),
            Err(SpillError::WriteFailed)
        ));
        spooler.remove_session(SessionId(3));
        assert_eq!(spooler.open_spools(), 0);
        drop(spooler);
    }

    #[test]
    fn orphans_of_dead_processes_are_removed_and_live_ones_kept() {
        let ours = format!("ncp-spill-{}-0-1-r0-1.spool", std::process::id());
        let (dir, [dead, ours, other]) = Scratch::holding(
            "orphans",
            // Above any pid_max Linux allows: no such process can be running.
            [
                "ncp-spill-999999999-0-1-r0-1.spool",
                &ours,
                "unrelated.spool",
            ],
        );
        assert_eq!(remove_orphans(&dir), 1);
        assert!(!dead.exists());
        assert!(ours.exists() && other.exists());
    }

    #[test]
    fn ending_a_session_removes_its_files() {
        let dir = Scratch::new("session");
        let mut spooler = Spooler::new(1 << 20).unwrap();
        for replica in 0..2 {
            spooler
                .append((SessionId(9), replica), &dir, vec![1; 100])
                .unwrap();
        }
        let mut buf = [0u8; 100];
        // Both written (the files exist) before the session ends.
        for replica in 0..2 {
            assert_eq!(
                wait_read(&mut spooler, (SessionId(9), replica), &mut buf),
                SpoolRead::Data(100)
            );
        }
        assert_eq!(spool_files(&dir).len(), 2);
        spooler.remove_session(SessionId(9));
        drop(spooler);
        assert!(spool_files(&dir).is_empty());
    }
}
