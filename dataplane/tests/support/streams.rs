//! Plain TCP servers and clients run in test-bed hosts' namespaces: they read whole
//! streams and answer with their length, so a test compares what each end got.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream},
    sync::{Arc, mpsc},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use ncp_testbed::Testbed;

use super::{PATIENCE, in_netns};

/// What a server answers a stream of `len` bytes: `<tag> <len>`, or the length alone for
/// an empty tag.
fn answer(tag: &str, len: usize) -> String {
    if tag.is_empty() {
        format!("{len}\n")
    } else {
        format!("{tag} {len}\n")
    }
}

/// A listener on `port` (any address) of the calling thread's namespace, with room for
/// `backlog` connections not accepted yet and, if given, a receive buffer of
/// `recv_buffer` bytes for the connections it accepts.
fn listen(port: u16, backlog: i32, recv_buffer: Option<usize>) -> TcpListener {
    let listener =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    listener.set_reuse_address(true).unwrap();
    if let Some(bytes) = recv_buffer {
        listener.set_recv_buffer_size(bytes).unwrap();
    }
    listener
        .bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).into())
        .unwrap();
    listener.listen(backlog).unwrap();
    TcpListener::from(listener)
}

/// A server in `host`'s namespace taking `count` connections at once: each is read to its
/// end in its own thread and answered (see [`answer`]); returns the streams in arrival
/// order. Ready when the function returns.
pub fn many_shot_server(
    bed: &Testbed,
    host: &str,
    port: u16,
    count: usize,
    tag: &'static str,
) -> JoinHandle<Vec<Vec<u8>>> {
    let (ready, bound) = mpsc::channel();
    let server = in_netns(&bed.netns(host).unwrap(), move || {
        // A backlog for the whole burst: std's 128 sends the kernel into SYN cookies
        // under 200 simultaneous connections, which lose the window scale and reset
        // some of them: a property of the server, not of what is under test.
        let listener = listen(port, 1024, None);
        ready.send(()).unwrap();
        let handlers: Vec<JoinHandle<Vec<u8>>> = (0..count)
            .map(|_| {
                let (mut s, _) = listener.accept().unwrap();
                thread::spawn(move || {
                    s.set_read_timeout(Some(PATIENCE)).unwrap();
                    let mut all = Vec::new();
                    s.read_to_end(&mut all).unwrap();
                    let _ = s.write_all(answer(tag, all.len()).as_bytes());
                    all
                })
            })
            .collect();
        handlers.into_iter().map(|h| h.join().unwrap()).collect()
    });
    bound.recv_timeout(PATIENCE).unwrap();
    server
}

/// A server in `host`'s namespace that takes one connection and then does not read it
/// until `gate` says so (a replica that stopped reading), then reads it to its end.
/// Its receive buffer is small (`SO_RCVBUF` 64 KiB), so the kernel absorbs little of
/// what it is sent meanwhile. Returns what it read and whether the stream ended cleanly
/// (`false`: reset, i.e. detached). Ready when the function returns.
pub fn gated_server(
    bed: &Testbed,
    host: &str,
    port: u16,
    gate: mpsc::Receiver<()>,
) -> JoinHandle<(Vec<u8>, bool)> {
    let (ready, bound) = mpsc::channel();
    let server = in_netns(&bed.netns(host).unwrap(), move || {
        let listener = listen(port, 16, Some(64 << 10));
        ready.send(()).unwrap();
        let (mut s, _) = listener.accept().unwrap();
        gate.recv_timeout(PATIENCE).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut all = Vec::new();
        let mut buf = vec![0; 64 << 10];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return (all, true),
                Ok(n) => all.extend_from_slice(&buf[..n]),
                Err(_) => return (all, false),
            }
        }
    });
    bound.recv_timeout(PATIENCE).unwrap();
    server
}

/// [`many_shot_server`] for one connection; returns what it read.
pub fn one_shot_server(
    bed: &Testbed,
    host: &str,
    port: u16,
    tag: &'static str,
) -> JoinHandle<Vec<u8>> {
    let server = many_shot_server(bed, host, port, 1, tag);
    thread::spawn(move || server.join().unwrap().pop().unwrap())
}

/// Sends `data` to `to`, half-closes, reads the answer to the end (on the calling
/// thread, which must be in the sending host's namespace).
pub fn exchange(to: SocketAddrV4, data: &[u8]) -> String {
    let mut s = TcpStream::connect_timeout(&to.into(), Duration::from_secs(10)).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.set_write_timeout(Some(PATIENCE)).unwrap();
    s.write_all(data).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer
}

/// From `host`: [`exchange`]s `data` with `to`. Returns the answer and the time from
/// connect to the server's close.
pub fn send_stream(
    bed: &Testbed,
    host: &str,
    to: SocketAddrV4,
    data: Arc<Vec<u8>>,
) -> (String, Duration) {
    in_netns(&bed.netns(host).unwrap(), move || {
        let started = Instant::now();
        let answer = exchange(to, &data);
        (answer, started.elapsed())
    })
    .join()
    .unwrap()
}
