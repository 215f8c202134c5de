//! The scale experiment's traffic: many concurrent TCP connections from the source, and a
//! sink on each server that holds as many; each side is one mio event loop.
//!
//! The clients live in this process: a socket belongs to the network namespace it was
//! created in, whatever thread uses it afterwards, so only socket creation steps into the
//! source's namespace (see [`ncp_testbed::Netns`]). The sinks are processes of their own, as each
//! holds one descriptor per session and a process may only hold so many.

use std::{
    io::{BufRead as _, BufReader, ErrorKind, Read as _, Write as _},
    net::SocketAddr,
    os::fd::AsRawFd as _,
    process::{Child, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use mio::{
    Events, Interest, Poll, Token,
    net::{TcpListener, TcpStream},
    unix::SourceFd,
};
use ncp_testbed::{Netns, Testbed};

/// Connections being set up at once: a bounded burst of SYNs, so that none is dropped and
/// retried a second later, which would measure the retry timer instead of the middlebox.
pub const CONNECTS_IN_FLIGHT: usize = 64;
/// Listen backlog of the sinks (the kernel caps it at `net.core.somaxconn`).
const SINK_BACKLOG: i32 = 4096;
/// How long the clients' event loop sleeps before it looks at its deadline again.
const TICK: Duration = Duration::from_millis(50);

/// Raises this process's soft open-file limit as far as the hard limit allows (children
/// inherit it, the middlebox among them) and returns it. Raising the hard limit needs
/// CAP_SYS_RESOURCE, which even root may lack (it does on the machine the numbers in
/// BENCHMARKS.md come from), so it is left alone.
pub fn raise_nofile() -> anyhow::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error()).context("reading RLIMIT_NOFILE");
    }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(std::io::Error::last_os_error()).context("raising RLIMIT_NOFILE");
        }
    }
    Ok(limit.rlim_cur)
}

/// Counters of a sink, as its parent sees them.
#[derive(Default)]
struct SinkCounters {
    /// Connections accepted and not yet closed.
    open: AtomicU64,
    /// Bytes received over all connections.
    bytes: AtomicU64,
}

/// A sink process in a test-bed host: a TCP server that accepts any number of
/// connections, reads and discards everything and closes a connection when its peer does.
/// It runs as a process of its own (`cargo xtask scale-sink`, see [`sink_main`]) because a
/// process may hold only so many descriptors, and each sink holds one per session.
pub struct Sink {
    child: Child,
    counters: Arc<SinkCounters>,
    reader: Option<JoinHandle<()>>,
}

impl Sink {
    /// Starts a sink listening on `at` in `host`, and waits until it listens.
    pub fn start(bed: &Testbed, host: &str, at: SocketAddr) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating the xtask binary")?;
        let exe = exe.to_str().context("non-UTF-8 xtask path")?;
        let mut child = bed
            .command(host, &[exe, "scale-sink", "--listen", &at.to_string()])?
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting the sink in {host}"))?;
        let stdout = child.stdout.take().context("sink without stdout")?;
        let counters = Arc::new(SinkCounters::default());
        let (listening, ready) = std::sync::mpsc::channel();
        let reader = std::thread::spawn({
            let counters = Arc::clone(&counters);
            move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if line == "listening" {
                        let _ = listening.send(());
                    } else if let Some((open, bytes)) = parse_counters(&line) {
                        counters.open.store(open, Ordering::Relaxed);
                        counters.bytes.store(bytes, Ordering::Relaxed);
                    }
                }
            }
        });
        let mut sink = Self {
            child,
            counters,
            reader: Some(reader),
        };
        if ready.recv_timeout(Duration::from_secs(10)).is_err() {
            let status = sink.child.try_wait().ok().flatten();
            bail!(
                "the sink in {host} did not start listening on {at} within 10 s{}",
                status.map_or(String::new(), |s| format!(" (it exited: {s})"))
            );
        }
        Ok(sink)
    }

    /// Connections open right now.
    pub fn open(&self) -> u64 {
        self.counters.open.load(Ordering::Relaxed)
    }

    /// Bytes received so far.
    pub fn bytes(&self) -> u64 {
        self.counters.bytes.load(Ordering::Relaxed)
    }

    /// Stops the sink (closing every connection) and reports how it ended.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        // Closing its stdin is the sink's signal to stop.
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        match status {
            Some(s) if s.success() => Ok(()),
            Some(s) => bail!("the sink failed ({s})"),
            None => bail!("the sink did not stop within 5 s and was killed"),
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if self.reader.is_some() {
            let _ = self.finish();
        }
    }
}

/// `open=<connections> bytes=<bytes>`, the line a sink prints when its counters move.
fn parse_counters(line: &str) -> Option<(u64, u64)> {
    let (open, bytes) = line.split_once(' ')?;
    Some((
        open.strip_prefix("open=")?.parse().ok()?,
        bytes.strip_prefix("bytes=")?.parse().ok()?,
    ))
}

const LISTENER: Token = Token(usize::MAX);
const STDIN: Token = Token(usize::MAX - 1);
/// How often a sink reports its counters at most (when they changed).
const REPORT_INTERVAL: Duration = Duration::from_millis(10);

/// The sink process (`cargo xtask scale-sink --listen ADDR`, run inside a test-bed host):
/// prints `listening` once bound, then `open=… bytes=…` whenever its counters changed,
/// and exits when its stdin closes.
pub fn sink_main(listen: SocketAddr) -> anyhow::Result<()> {
    raise_nofile()?;
    let mut listener =
        TcpListener::bind(listen).with_context(|| format!("sink: binding {listen}"))?;
    // mio listens with a backlog of 1024; a burst of connections from the middlebox can
    // be larger, and a dropped SYN costs a one-second retry.
    // SAFETY: listen on a socket we own; calling it again only changes the backlog.
    if unsafe { libc::listen(listener.as_raw_fd(), SINK_BACKLOG) } != 0 {
        return Err(std::io::Error::last_os_error()).context("sink: raising the backlog");
    }
    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let stdin_fd = std::io::stdin().as_raw_fd();
    poll.registry()
        .register(&mut SourceFd(&stdin_fd), STDIN, Interest::READABLE)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening")?;
    out.flush()?;

    let mut conns: Vec<Option<TcpStream>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let (mut open, mut bytes) = (0u64, 0u64);
    let mut reported = (0u64, 0u64);
    let mut last_report = Instant::now();
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        poll_once(&mut poll, &mut events, REPORT_INTERVAL).context("sink")?;
        for event in &events {
            match event.token() {
                STDIN => {
                    // EOF (or anything else) on stdin: the parent wants us gone.
                    let mut byte = [0u8; 1];
                    if !matches!(std::io::stdin().read(&mut byte), Ok(1)) {
                        return Ok(());
                    }
                }
                LISTENER => loop {
                    // Edge-triggered: take every pending connection now.
                    match listener.accept() {
                        Ok((mut stream, _)) => {
                            let slot = free.pop().unwrap_or_else(|| {
                                conns.push(None);
                                conns.len() - 1
                            });
                            poll.registry().register(
                                &mut stream,
                                Token(slot),
                                Interest::READABLE,
                            )?;
                            conns[slot] = Some(stream);
                            open += 1;
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        // Reset before we took it: the peer's business.
                        Err(e) if e.kind() == ErrorKind::ConnectionAborted => {}
                        Err(e) => return Err(e).context("sink: accept"),
                    }
                },
                Token(slot) => {
                    let Some(stream) = conns.get_mut(slot).and_then(Option::as_mut) else {
                        continue;
                    };
                    let closed = loop {
                        match stream.read(&mut buf) {
                            Ok(0) => break true,
                            Ok(n) => bytes += n as u64,
                            Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
                            Err(e) if e.kind() == ErrorKind::Interrupted => {}
                            // Reset by the peer: gone, as far as a sink cares.
                            Err(_) => break true,
                        }
                    };
                    if closed {
                        if let Some(mut stream) = conns[slot].take() {
                            let _ = poll.registry().deregister(&mut stream);
                        }
                        free.push(slot);
                        open -= 1;
                    }
                }
            }
        }
        if (open, bytes) != reported && last_report.elapsed() >= REPORT_INTERVAL {
            writeln!(out, "open={open} bytes={bytes}")?;
            out.flush()?;
            reported = (open, bytes);
            last_report = Instant::now();
        }
    }
}

/// Many client connections to one server, driven from the calling thread.
pub struct Clients {
    poll: Poll,
    streams: Vec<TcpStream>,
}

impl Clients {
    /// Opens `n` connections to `to` from inside `netns`, at most [`CONNECTS_IN_FLIGHT`]
    /// handshakes at a time, calling `progress` with the count established about once a
    /// second. Fails at `deadline`, or on the first refused connection, saying how many
    /// were established.
    pub fn open(
        netns: &Netns,
        to: SocketAddr,
        n: usize,
        deadline: Instant,
        mut progress: impl FnMut(usize),
    ) -> anyhow::Result<Self> {
        let mut poll = Poll::new()?;
        let mut streams: Vec<TcpStream> = Vec::with_capacity(n);
        let mut connected = vec![false; n];
        let mut established = 0;
        let mut events = Events::with_capacity(1024);
        let mut reported = Instant::now();
        while established < n {
            while streams.len() - established < CONNECTS_IN_FLIGHT && streams.len() < n {
                let mut stream = netns.run(|| TcpStream::connect(to))?.with_context(|| {
                    format!(
                        "connection {} to {to} ({established} established)",
                        streams.len()
                    )
                })?;
                // Nagle would hold each connection's last partial segment until the
                // peer's delayed acknowledgement of the rest: tens of ms per connection.
                stream.set_nodelay(true)?;
                // Writable once the handshake is done (or failed); data later uses the
                // same registration.
                poll.registry()
                    .register(&mut stream, Token(streams.len()), Interest::WRITABLE)?;
                streams.push(stream);
            }
            if Instant::now() > deadline {
                bail!("{established} of {n} client connections established before the deadline");
            }
            if reported.elapsed() >= Duration::from_secs(1) {
                progress(established);
                reported = Instant::now();
            }
            poll_once(&mut poll, &mut events, TICK)?;
            for event in &events {
                let i = event.token().0;
                let Some(stream) = streams.get(i) else {
                    continue;
                };
                if connected[i] {
                    continue;
                }
                if let Some(e) = stream.take_error()? {
                    bail!("client connection {i} failed: {e} ({established} of {n} established)");
                }
                match stream.peer_addr() {
                    Ok(_) => {
                        connected[i] = true;
                        established += 1;
                    }
                    // Not done yet: a later event will tell.
                    Err(e) if e.kind() == ErrorKind::NotConnected => {}
                    Err(e) => bail!(
                        "client connection {i} failed: {e} ({established} of {n} established)"
                    ),
                }
            }
        }
        progress(established);
        Ok(Self { poll, streams })
    }

    /// Has every connection send `bytes_each` bytes, `at_once` connections at a time: a
    /// connection's turn ends when the middlebox has acknowledged all of its bytes, and
    /// the next one starts. Returns when every byte has been acknowledged. Fails at
    /// `deadline` or on a broken connection.
    ///
    /// Why not all at once: every new sender starts with a full initial window, and the
    /// test bed's software switch drops much of a burst of thousands of them; the losses
    /// then cost seconds of retransmission backoff, which would be measured instead of
    /// the middlebox.
    pub fn send(
        &mut self,
        bytes_each: usize,
        at_once: usize,
        deadline: Instant,
    ) -> anyhow::Result<()> {
        let chunk = vec![0x5a_u8; bytes_each.clamp(1, 64 * 1024)];
        let n = self.streams.len();
        let mut left = vec![bytes_each; n];
        let mut active: Vec<usize> = Vec::with_capacity(at_once);
        let mut next = 0;
        let mut events = Events::with_capacity(1024);
        loop {
            while active.len() < at_once.max(1) && next < n {
                write_some(&mut self.streams[next], &mut left[next], &chunk)
                    .with_context(|| format!("client connection {next}"))?;
                active.push(next);
                next += 1;
            }
            if active.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} of {n} connections had not had all their bytes acknowledged at the deadline",
                    n - next + active.len()
                );
            }
            // Acknowledgements raise no event of their own, hence the short wait.
            poll_once(&mut self.poll, &mut events, Duration::from_millis(1))?;
            for event in &events {
                let i = event.token().0;
                if let (Some(stream), Some(left)) = (self.streams.get_mut(i), left.get_mut(i))
                    && *left > 0
                {
                    write_some(stream, left, &chunk)
                        .with_context(|| format!("client connection {i}"))?;
                }
            }
            let mut failed = None;
            active.retain(|&i| {
                if left[i] > 0 {
                    return true;
                }
                match unacknowledged(&self.streams[i]) {
                    Ok(bytes) => bytes > 0,
                    Err(e) => {
                        failed = Some((i, e));
                        false
                    }
                }
            });
            if let Some((i, e)) = failed {
                return Err(e).with_context(|| format!("client connection {i}"));
            }
        }
    }

    /// Connections held.
    pub fn len(&self) -> usize {
        self.streams.len()
    }
}

/// Bytes written to `stream` that its peer has not acknowledged yet.
fn unacknowledged(stream: &TcpStream) -> std::io::Result<i32> {
    let mut bytes: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ for TCP: sent or queued and not acknowledged) writes one
    // int into the pointer we pass, on a socket we own.
    if unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut bytes) } == 0 {
        Ok(bytes)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Writes from `chunk` until `left` is 0 (true) or the socket is full (false).
fn write_some(stream: &mut TcpStream, left: &mut usize, chunk: &[u8]) -> std::io::Result<bool> {
    while *left > 0 {
        match stream.write(&chunk[..(*left).min(chunk.len())]) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => *left -= n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Waits up to `timeout` for events; a signal just makes it an empty round.
fn poll_once(poll: &mut Poll, events: &mut Events, timeout: Duration) -> anyhow::Result<()> {
    match poll.poll(events, Some(timeout)) {
        Err(e) if e.kind() == ErrorKind::Interrupted => {
            events.clear();
            Ok(())
        }
        other => other.context("poll"),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_counters;

    #[test]
    fn reads_the_sink_counter_line_and_nothing_else() {
        assert_eq!(parse_counters("open=3 bytes=65536"), Some((3, 65536)));
        assert_eq!(parse_counters("listening"), None);
        assert_eq!(parse_counters("open=3"), None);
        assert_eq!(parse_counters("open=x bytes=1"), None);
    }
}
