//! Device layers, stacked the way smoltcp's `phy` wrappers are: each layer is an
//! [`EngineDevice`] that wraps another one and adds one concern, so the engine sees a
//! single device and a concern can be added or left out without touching the others.
//!
//! A worker's stack, bottom up:
//!
//! ```text
//! XskDevice                      AF_XDP socket + Ethernet (crate::xdp::device)
//!   └─ HandoverDevice            frames owned by other workers leave, theirs come in
//!        └─ Recovery             loss recovery, congestion window, pacing (TCP senders)
//!             └─ Tap / Faults    optional: record what passes, inject loss (tests)
//!                  └─ Engine     smoltcp TCP (crate::engine)
//! ```
//!
//! - [`crate::xdp::handover::HandoverDevice`] needs whole link-layer frames from the device
//!   below it, through [`LinkFrames`];
//! - [`recovery::Recovery`] repairs lost segments of the engine's connections as Linux
//!   would (fast retransmit, partial ACKs, SACK, a 200 ms timeout floor, tail-loss
//!   probes), where smoltcp alone would wait a second;
//! - [`tap::Tap`] shows every packet that passes to a [`tap::TapSink`] (a recorder, a
//!   trace);
//! - [`faults::Faults`] drops, duplicates and reorders received packets, by a seeded
//!   random draw or by script, so tests can exercise loss recovery deterministically.
//!
//! What the worker needs from the stack (the descriptor to sleep on, the neighbour table)
//! is passed through every layer, so it never reaches past them to the socket.

pub mod faults;
pub mod recovery;
pub mod tap;

/// Writes, inside a layer's `impl Device` or `impl EngineDevice`, the methods the layer
/// passes through unchanged to the device below it (a field named `inner`), so that each
/// impl spells out only what the layer changes. Name the methods:
///
/// ```ignore
/// impl<D: EngineDevice> EngineDevice for MyLayer<D> {
///     fn peek_packet(&mut self) -> Option<&[u8]> { /* what the layer changes */ }
///     forward_to_inner!(flush, readiness_fd);
/// }
/// ```
///
/// `transmit` forwards the token as it is, so it suits a layer whose `TxToken` is the
/// inner device's; `forward_to_inner!(type TxToken of D);` declares that token type (and
/// likewise `RxToken`) for a layer over a device of type `D`.
macro_rules! forward_to_inner {
    (type $token:ident of $inner:ident) => {
        type $token<'a>
            = $inner::$token<'a>
        where
            Self: 'a;
    };
    ($($method:ident),+ $(,)?) => {
        $(forward_to_inner!(@one $method);)+
    };
    (@one transmit) => {
        fn transmit(
            &mut self,
            timestamp: ::smoltcp::time::Instant,
        ) -> Option<Self::TxToken<'_>> {
            self.inner.transmit(timestamp)
        }
    };
    (@one capabilities) => {
        fn capabilities(&self) -> ::smoltcp::phy::DeviceCapabilities {
            self.inner.capabilities()
        }
    };
    (@one flush) => {
        fn flush(&mut self) {
            self.inner.flush();
        }
    };
    (@one peek_packet) => {
        fn peek_packet(&mut self) -> Option<&[u8]> {
            self.inner.peek_packet()
        }
    };
    (@one readiness_fd) => {
        fn readiness_fd(&self) -> Option<::std::os::fd::BorrowedFd<'_>> {
            self.inner.readiness_fd()
        }
    };
    (@one start_round) => {
        fn start_round(&mut self, now: ::smoltcp::time::Instant) {
            self.inner.start_round(now);
        }
    };
    (@one poll_at) => {
        fn poll_at(&self) -> Option<::smoltcp::time::Instant> {
            self.inner.poll_at()
        }
    };
}
pub(crate) use forward_to_inner;

use crate::engine::EngineDevice;

/// What a layer that redirects frames needs from the device below it: the link-layer
/// frame behind the packet [`EngineDevice::peek_packet`] shows, and ways to drop it or
/// to feed in a frame that arrived some other way.
pub trait LinkFrames: EngineDevice {
    /// The whole link-layer frame the next `receive` hands over, and where its IP packet
    /// starts in it.
    fn peek_frame(&mut self) -> Option<(&[u8], usize)>;

    /// Gives up the peeked frame without handing it to smoltcp (another worker took a
    /// copy). Nothing happens when no frame is peeked.
    fn skip_peeked(&mut self);

    /// Whether a frame is peeked (and `receive` would hand it over).
    fn has_peeked(&self) -> bool;

    /// Takes a link-layer frame that did not come from this device's own ring as the next
    /// one to receive, after the same link-layer checks (a frame failing them is dropped
    /// and counted). Only call it when [`LinkFrames::has_peeked`] is false; otherwise the
    /// frame is dropped and counted.
    fn inject(&mut self, frame: Vec<u8>);
}

/// The scene the layers' tests share: a client engine over one end of an in-memory
/// pipe, and a server engine listening on [`test_scene::SERVER`] over the other end,
/// wrapped in the layer under test.
#[cfg(test)]
pub(crate) mod test_scene {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use crate::{
        config::PortRange,
        engine::{
            Engine, EngineConfig, EngineDevice,
            pipe::{Pipe, pipe_pair},
        },
    };

    /// The endpoint the server engine listens on.
    pub(crate) const SERVER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 7000);

    /// The client engine, and the server engine over `wrap` of its pipe end.
    pub(crate) fn engines<D: EngineDevice>(
        wrap: impl FnOnce(Pipe) -> D,
    ) -> (Engine<Pipe>, Engine<D>) {
        let ports = PortRange {
            first: 20000,
            last: 20099,
        };
        let (a, b) = pipe_pair();
        let client =
            Engine::new(a, EngineConfig::new(Ipv4Addr::new(198, 18, 0, 1), ports)).unwrap();
        let mut config = EngineConfig::new(*SERVER.ip(), ports);
        config.listen = vec![SERVER];
        let server = Engine::new(wrap(b), config).unwrap();
        (client, server)
    }
}
