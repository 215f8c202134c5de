//! What a data plane gives the [`super::Driver`]: TCP connections it can open, read,
//! write, half-close and abort, and events about them. Everything else about carrying
//! out the replication core's contract lives in the driver, once.

use std::{
    fmt::Debug,
    hash::Hash,
    io,
    net::{SocketAddr, SocketAddrV4},
};

use ncp_replication::Side;

/// The outcome of one read.
#[derive(Debug)]
pub enum Received {
    /// This many bytes were read into the buffer (at least one).
    Data(usize),
    /// Nothing to read right now; an [`Event::Active`] says when to try again.
    Nothing,
    /// The peer's FIN: every byte before it has been read.
    Eof,
    /// The connection is broken; the driver aborts it.
    Broken(io::Error),
}

/// The outcome of one write.
#[derive(Debug)]
pub enum Sent {
    /// This many bytes of the slice were queued (at least one).
    Wrote(usize),
    /// No room (or not established yet, or already half-closed); an [`Event::Active`]
    /// or [`Event::Connected`] says when to try again.
    Full,
    /// The connection is broken; the driver aborts it.
    Broken(io::Error),
}

/// Where an accepted connection was addressed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addressed {
    /// The listener of this service (index into the driver's plans).
    Service(usize),
    /// This local endpoint, to be matched against the services' primaries.
    Endpoint(SocketAddrV4),
}

/// What happened to a transport's connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event<C> {
    /// A client connection completed its handshake.
    Accepted {
        /// The new connection.
        conn: C,
        /// What the client addressed.
        to: Addressed,
        /// The client.
        remote: SocketAddr,
    },
    /// An upstream connection is established.
    Connected(C),
    /// An upstream connection attempt failed. The transport has released it.
    Refused(C),
    /// An established connection was reset or died. The transport has released it.
    Reset(C),
    /// The peer's FIN arrived after every byte before it was read (transports that
    /// report it as an event rather than as [`Received::Eof`]).
    PeerClosed(C),
    /// Both directions finished cleanly. The transport has released it.
    Closed(C),
    /// The connection may be readable or writable again.
    Active(C),
}

/// One data plane's TCP connections, as the driver uses them.
pub trait Transport {
    /// Names a connection for as long as the transport has not released it.
    type Conn: Copy + Eq + Hash + Ord + Debug;
    /// How a service's replicas are reached (a link, a source binding).
    type Route: Clone + Debug;
    /// Sessions a drive moves bytes for before the others get their turn: at most this
    /// many rounds of reads and writes on every side.
    const ROUNDS_PER_PASS: usize;

    /// Starts connecting to `to`, through `route` (replicas) or the default path
    /// (`None`: primaries). `Err`: the attempt failed at once.
    fn connect(&mut self, to: SocketAddrV4, route: Option<&Self::Route>) -> io::Result<Self::Conn>;
    /// Reads into `buf`.
    fn read(&mut self, conn: Self::Conn, buf: &mut [u8]) -> Received;
    /// Queues a prefix of `data`.
    fn write(&mut self, conn: Self::Conn, data: &[u8]) -> Sent;
    /// Sends FIN after what is queued; reading goes on.
    fn shutdown_write(&mut self, conn: Self::Conn) -> io::Result<()>;
    /// Resets the connection (RST) and releases it.
    fn abort(&mut self, conn: Self::Conn);
    /// The driver is done with the connection and will not wait for it: close it as
    /// well as this transport can without anybody waiting (an orderly close where a FIN
    /// was sent, if the transport can finish one on its own; otherwise a RST).
    fn release(&mut self, conn: Self::Conn);
    /// Whether `side`'s connection, half-closed by us when its session finished, is worth
    /// keeping open (*lingering*) and draining until the peer closes or the drain
    /// timeout passes, rather than released at once.
    fn may_linger(&self, conn: Self::Conn, side: Side) -> bool;
}
