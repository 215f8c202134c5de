//! A layer that shows every packet passing through to a sink, unchanged: the hook point
//! for recording or tracing what an engine saw and sent.

use std::cell::RefCell;

use smoltcp::{
    phy::{self, Device},
    time::Instant,
};

use super::forward_to_inner;
use crate::engine::EngineDevice;

/// Which way a packet went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Handed to the engine.
    Received,
    /// Written by the engine.
    Sent,
}

/// Where a [`Tap`] shows packets. Takes `&self`: the receive and transmit tokens of one
/// round exist at the same time and both hold the sink.
pub trait TapSink {
    /// Sees one packet (the IP packet, as the engine reads or wrote it).
    fn observe(&self, direction: Direction, packet: &[u8]);
}

/// Keeps a copy of every packet, in order (for tests and offline inspection).
#[derive(Debug, Default)]
pub struct PacketLog {
    packets: RefCell<Vec<(Direction, Vec<u8>)>>,
}

impl PacketLog {
    /// Takes the packets logged so far.
    pub fn take(&self) -> Vec<(Direction, Vec<u8>)> {
        std::mem::take(&mut *self.packets.borrow_mut())
    }
}

impl TapSink for PacketLog {
    fn observe(&self, direction: Direction, packet: &[u8]) {
        self.packets.borrow_mut().push((direction, packet.to_vec()));
    }
}

/// Logs each packet's direction and length at `trace` level.
#[derive(Clone, Debug)]
pub struct TraceSink {
    /// Names the device in the log lines.
    pub label: String,
}

impl TapSink for TraceSink {
    fn observe(&self, direction: Direction, packet: &[u8]) {
        tracing::trace!(device = %self.label, ?direction, len = packet.len(), "packet");
    }
}

/// Wraps a device and shows its traffic to a [`TapSink`].
#[derive(Debug)]
pub struct Tap<D, S> {
    inner: D,
    sink: S,
}

impl<D, S> Tap<D, S> {
    /// Taps `inner` into `sink`.
    pub fn new(inner: D, sink: S) -> Self {
        Self { inner, sink }
    }

    /// The sink.
    pub fn sink(&self) -> &S {
        &self.sink
    }

    /// The device underneath.
    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// The device underneath, mutably.
    pub fn inner_mut(&mut self) -> &mut D {
        &mut self.inner
    }
}

/// A received packet on its way to the engine.
pub struct TapRx<'a, T, S> {
    inner: T,
    sink: &'a S,
}

impl<T: phy::RxToken, S: TapSink> phy::RxToken for TapRx<'_, T, S> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        let sink = self.sink;
        self.inner.consume(|packet| {
            sink.observe(Direction::Received, packet);
            f(packet)
        })
    }
}

/// A packet the engine is about to write.
pub struct TapTx<'a, T, S> {
    inner: T,
    sink: &'a S,
}

impl<T: phy::TxToken, S: TapSink> phy::TxToken for TapTx<'_, T, S> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let sink = self.sink;
        self.inner.consume(len, |buf| {
            let result = f(buf);
            sink.observe(Direction::Sent, buf);
            result
        })
    }
}

impl<D: EngineDevice, S: TapSink> Device for Tap<D, S> {
    type RxToken<'a>
        = TapRx<'a, D::RxToken<'a>, S>
    where
        Self: 'a;
    type TxToken<'a>
        = TapTx<'a, D::TxToken<'a>, S>
    where
        Self: 'a;

    fn receive(&mut self, timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let (rx, tx) = self.inner.receive(timestamp)?;
        let sink = &self.sink;
        Some((TapRx { inner: rx, sink }, TapTx { inner: tx, sink }))
    }

    fn transmit(&mut self, timestamp: Instant) -> Option<Self::TxToken<'_>> {
        let tx = self.inner.transmit(timestamp)?;
        Some(TapTx {
            inner: tx,
            sink: &self.sink,
        })
    }

    forward_to_inner!(capabilities);
}

impl<D: EngineDevice, S: TapSink> EngineDevice for Tap<D, S> {
    forward_to_inner!(start_round, poll_at, flush, peek_packet, readiness_fd);
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::{
        engine::EngineEvent,
        xdp::layers::test_scene::{SERVER, engines},
    };

    #[test]
    fn a_tap_sees_the_handshake_both_ways_without_changing_it() {
        let (mut client, mut tapped) = engines(|end| Tap::new(end, PacketLog::default()));
        client.connect(SERVER).unwrap();
        let mut now = Instant::now();
        let mut events = Vec::new();
        let mut accepted = false;
        for _ in 0..100 {
            client.poll(now, &mut Vec::new());
            tapped.poll(now, &mut events);
            accepted |= events
                .drain(..)
                .any(|e| matches!(e, EngineEvent::Accepted { .. }));
            if accepted {
                break;
            }
            now += Duration::from_millis(1);
        }
        assert!(accepted, "the tap passes packets on");
        let log = tapped.device().sink().take();
        let flags: Vec<(Direction, u8)> = log.iter().map(|(d, p)| (*d, p[33])).collect();
        // SYN in, SYN-ACK out, ACK in (TCP flags at IPv4 header 20 + 13).
        assert_eq!(
            flags,
            [
                (Direction::Received, 0x02),
                (Direction::Sent, 0x12),
                (Direction::Received, 0x10)
            ]
        );
    }
}
