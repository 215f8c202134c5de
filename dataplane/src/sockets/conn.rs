//! Kernel sockets as the relay uses them: listeners shared between workers, non-blocking
//! upstream connects from an optional source address and device, aborts that send a RST,
//! and a small slab that gives every connection a stable poll token (and the driver its
//! name for it).

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

use mio::net::{TcpListener, TcpStream};
use socket2::{Domain, Protocol, SockRef, Socket, Type};

/// Pending connections the kernel queues per listener before the relay accepts them:
/// large enough for a burst of short connections while the worker is busy.
const LISTEN_BACKLOG: i32 = 1024;

/// Where an upstream connection leaves from (the service's `replica_interface`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceBinding {
    /// Local address to bind (the interface's configured address).
    pub address: Ipv4Addr,
    /// Device to bind to, so the kernel routes out of this NIC whatever its tables say.
    pub device: String,
}

/// A listening socket on `addr` with `SO_REUSEPORT`, so every worker can bind its own on
/// the same port and the kernel spreads connections over them. Port 0 picks a free port.
/// With `mss`, the connections it accepts advertise at most that MSS (`TCP_MAXSEG`, for
/// clients whose frames reach us through a tunnel).
pub fn listener(addr: SocketAddrV4, mss: Option<u16>) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if let Some(mss) = mss {
        socket.set_tcp_mss(u32::from(mss))?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::V4(addr).into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Starts a non-blocking connection to `to`. Completion (or failure) is signalled by
/// writability; see [`connect_result`].
pub fn connect(to: SocketAddrV4, from: Option<&SourceBinding>) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    // The relay forwards whatever segments it gets as soon as it gets them; the original
    // sender already did its own coalescing, so Nagle here would only add latency.
    socket.set_tcp_nodelay(true)?;
    if let Some(b) = from {
        socket.bind_device(Some(b.device.as_bytes()))?;
        socket.bind(&SocketAddr::V4(SocketAddrV4::new(b.address, 0)).into())?;
    }
    match socket.connect(&SocketAddr::V4(to).into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(socket.into()))
}

/// After a writable event on a connecting socket: `Ok(true)` connected, `Ok(false)` not
/// yet (spurious wakeup), `Err` the attempt failed.
pub fn connect_result(stream: &TcpStream) -> io::Result<bool> {
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    match stream.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
        Err(e) => Err(e),
    }
}

/// Closes `stream` with a RST instead of a FIN (zero linger), discarding unsent data.
pub fn abort(stream: TcpStream) {
    if let Err(e) = SockRef::from(&stream).set_linger(Some(Duration::ZERO)) {
        tracing::debug!(error = %e, "SO_LINGER before abort failed; closing normally");
    }
    drop(stream);
}

/// One kernel TCP connection and what the event loop knows about it. Readiness is
/// remembered because mio is edge-triggered: a side held back by the core's window keeps
/// `readable` set and is read again once the window reopens.
#[derive(Debug)]
pub struct Conn {
    pub stream: TcpStream,
    /// Handshake completed (accepted client connections start connected).
    pub connected: bool,
    pub readable: bool,
    pub writable: bool,
    /// The peer's FIN was read.
    pub read_eof: bool,
    /// Our FIN was sent (`shutdown(Write)`).
    pub write_shut: bool,
    /// Failed and reported to the driver as such; the slot stays taken until the driver
    /// has seen that report, so no new connection can be mistaken for this one.
    pub dead: bool,
}

impl Conn {
    pub fn new(stream: TcpStream, connected: bool) -> Self {
        Self {
            stream,
            connected,
            readable: false,
            writable: false,
            read_eof: false,
            write_shut: false,
            dead: false,
        }
    }
}

/// Connections by slot; a slot index is the connection's poll token and its name in the
/// driver. Freed slots are reused; the driver forgets a slot before it is freed.
#[derive(Debug, Default)]
pub struct Slab {
    entries: Vec<Option<Conn>>,
    free: Vec<usize>,
}

impl Slab {
    pub fn insert(&mut self, conn: Conn) -> usize {
        if let Some(i) = self.free.pop()
            && let Some(slot) = self.entries.get_mut(i)
        {
            *slot = Some(conn);
            return i;
        }
        self.entries.push(Some(conn));
        self.entries.len() - 1
    }

    pub fn get(&self, i: usize) -> Option<&Conn> {
        self.entries.get(i).and_then(Option::as_ref)
    }

    pub fn get_mut(&mut self, i: usize) -> Option<&mut Conn> {
        self.entries.get_mut(i).and_then(Option::as_mut)
    }

    pub fn remove(&mut self, i: usize) -> Option<Conn> {
        let conn = self.entries.get_mut(i)?.take()?;
        self.free.push(i);
        Some(conn)
    }

    /// Slots in use.
    #[cfg(test)]
    pub fn slots(&self) -> impl Iterator<Item = usize> + '_ {
        self.entries
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.as_ref().map(|_| i))
    }
}

/// A listener of one service in one worker.
#[derive(Debug)]
pub struct Listener {
    pub socket: TcpListener,
    /// Index into the worker's services.
    pub service: usize,
    /// Accept again at this time even without an event: set when the last turn stopped
    /// with connections possibly still queued (turn budget used up, or a transient error
    /// such as running out of file descriptors).
    pub retry_at: Option<Instant>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slab_reuses_slots_and_counts() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = match l.local_addr().unwrap() {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => unreachable!("bound to IPv4"),
        };
        let stream = || {
            let s = connect(addr, None).unwrap();
            Conn::new(s, false)
        };
        let mut slab = Slab::default();
        let a = slab.insert(stream());
        let b = slab.insert(stream());
        assert_ne!(a, b);
        assert_eq!(slab.slots().count(), 2);
        assert!(slab.remove(a).is_some());
        assert!(slab.remove(a).is_none());
        assert_eq!(slab.insert(stream()), a);
        assert_eq!(slab.slots().count(), 2);
    }

    #[test]
    fn a_listener_with_an_mss_advertises_no_more() {
        let l = listener("127.0.0.1:0".parse().unwrap(), Some(1456)).unwrap();
        let addr = match l.local_addr().unwrap() {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => unreachable!("bound to IPv4"),
        };
        assert_eq!(SockRef::from(&l).tcp_mss().unwrap(), 1456);
        // Over loopback (MTU 65536) the client's segments are as large as the listener
        // allows: at most 1456 bytes (less the timestamp option when it is on).
        let client = std::net::TcpStream::connect(addr).unwrap();
        let _accepted = l.accept().unwrap();
        let mss = SockRef::from(&client).tcp_mss().unwrap();
        assert!((1400..=1456).contains(&mss), "client MSS {mss}");
        // Without, the kernel's own choice (loopback's far larger one).
        let l = listener("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let addr = match l.local_addr().unwrap() {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => unreachable!("bound to IPv4"),
        };
        let client = std::net::TcpStream::connect(addr).unwrap();
        assert!(SockRef::from(&client).tcp_mss().unwrap() > 1456);
    }

    #[test]
    fn refused_connect_is_reported_as_an_error() {
        // Bind then close a port so nothing listens on it.
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            match l.local_addr().unwrap() {
                SocketAddr::V4(a) => a,
                SocketAddr::V6(_) => unreachable!("bound to IPv4"),
            }
        };
        let s = connect(addr, None).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match connect_result(&s) {
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
                    break;
                }
                Ok(true) => panic!("connected to a closed port"),
                Ok(false) => {
                    assert!(Instant::now() < deadline, "no answer to connect");
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
}
