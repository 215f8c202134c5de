//! A layer that recovers lost TCP segments for the engine above it, the way Linux does,
//! where smoltcp 0.14 alone would wait a second: its timeout has a 1 s floor, it ignores
//! duplicate ACKs that also move the window (Linux receivers send exactly those), it has
//! no partial-ACK or SACK recovery and it sends whole windows as bursts.
//!
//! smoltcp stays the connection's TCP engine: it segments, acknowledges, reassembles and
//! closes. The layer sits directly under it, keeps a copy of every data segment until the
//! peer acknowledges it, and answers losses itself ([`sender`] has the rules): smoltcp
//! then only sees the ACKs arrive, as it would on a path without loss. Duplicate ACKs
//! identical to the last one smoltcp saw are kept from it, so it does not answer them
//! with a retransmission of its own (which would also switch off its timer). New data
//! beyond the layer's congestion window is held back and released, paced, as ACKs come.
//!
//! Retransmissions and released data are queued and go out at the start of the engine's
//! next transmit, at the end of its round ([`EngineDevice::flush`]) or when the
//! engine's poll starts ([`EngineDevice::start_round`]); the engine wakes for the
//! layer's timers through [`EngineDevice::poll_at`].
//!
//! Switched off (`[tcp] loss_recovery = "smoltcp"`), the layer passes everything through
//! untouched.

mod sender;
#[cfg(test)]
mod tests;

use std::net::Ipv4Addr;

use smoltcp::{
    phy::{self, Device},
    time::Instant,
};

pub use self::sender::RecoveryCounters;
use self::sender::{Inbound, Limits, LossRecovery, Outbound};
use super::forward_to_inner;
use crate::{engine::EngineDevice, xdp::device::MacAddr, xdp::neighbours::Neighbours};

/// Default cap on the bytes of segment copies one layer keeps: 256 connections' full
/// 256 KiB send buffers. Beyond it new segments go untracked (counted) and smoltcp
/// recovers them alone.
pub const DEFAULT_MAX_TRACKED_BYTES: usize = 64 << 20;

/// Who recovers lost segments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecoveryConfig {
    /// The layer does (true), or smoltcp alone (false: the layer passes through).
    pub enabled: bool,
    /// Cap on the bytes of segment copies kept over all connections.
    pub max_tracked_bytes: usize,
}

impl RecoveryConfig {
    /// The layer on, with the default cap.
    pub fn enabled() -> Self {
        Self {
            enabled: true,
            max_tracked_bytes: DEFAULT_MAX_TRACKED_BYTES,
        }
    }

    /// The layer off.
    pub fn disabled() -> Self {
        Self {
            enabled: false,
            max_tracked_bytes: 0,
        }
    }
}

/// Wraps a device and recovers the engine's lost segments (see the module docs).
pub struct Recovery<D> {
    inner: D,
    core: Option<LossRecovery>,
    /// The time of the engine's current round.
    now: Instant,
    /// The packet peeked below was shown to the core already and is to be handed over.
    vetted: bool,
}

impl<D> Recovery<D> {
    /// Wraps `inner`.
    pub fn new(inner: D, config: RecoveryConfig) -> Self {
        let core = config.enabled.then(|| {
            LossRecovery::new(Limits {
                max_tracked_bytes: config.max_tracked_bytes,
            })
        });
        Self {
            inner,
            core,
            now: Instant::ZERO,
            vetted: false,
        }
    }

    /// What the layer did so far (all zero when switched off).
    pub fn counters(&self) -> RecoveryCounters {
        self.core
            .as_ref()
            .map(LossRecovery::counters)
            .unwrap_or_default()
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

impl<D: EngineDevice> Recovery<D> {
    /// Fires the core's due timers and sends what it queued, as far as the device below
    /// has room.
    fn emit(&mut self) {
        let Some(core) = &mut self.core else { return };
        core.poll(self.now.total_micros());
        while let Some(frame) = core.front_frame() {
            let Some(tx) = self.inner.transmit(self.now) else {
                return;
            };
            phy::TxToken::consume(tx, frame.len(), |buf| buf.copy_from_slice(frame));
            core.pop_frame();
        }
    }

    /// Shows the core the packet waiting below and drops the duplicate ACKs it absorbs.
    /// Returns whether a packet may wait for the engine: `false` only when there is
    /// none. With the layer off it is always `true` and peeks nothing, so the device
    /// below is asked once per packet, by the caller, as without the layer.
    fn settle(&mut self) -> bool {
        let Some(core) = &mut self.core else {
            return true;
        };
        loop {
            if self.vetted {
                return true;
            }
            let Some(packet) = self.inner.peek_packet() else {
                return false;
            };
            match core.on_receive(self.now.total_micros(), packet) {
                Inbound::Pass => self.vetted = true,
                Inbound::Absorb => match self.inner.receive(self.now) {
                    Some((rx, _)) => phy::RxToken::consume(rx, |_| ()),
                    // No frame for an answer below: the engine gets it after all (a
                    // duplicate ACK more is harmless).
                    None => self.vetted = true,
                },
            }
        }
    }
}

/// A packet the engine writes: into a buffer of the core first, which it keeps as its
/// copy of the segment (and may hold back) or reuses.
pub struct RecoveryTx<'a, T> {
    inner: T,
    layer: Option<&'a mut LossRecovery>,
    now: Instant,
}

impl<T: phy::TxToken> phy::TxToken for RecoveryTx<'_, T> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let Some(core) = self.layer else {
            return self.inner.consume(len, f);
        };
        // A reused buffer keeps an earlier packet's bytes: only a longer packet's new
        // tail is zeroed, and smoltcp writes every byte, as it does into a UMEM frame
        // (which nobody zeroes either).
        let mut packet = core.buffer();
        packet.truncate(len);
        packet.resize(len, 0);
        let result = f(&mut packet);
        match core.on_transmit(self.now.total_micros(), packet) {
            Outbound::Send(bytes) => self.inner.consume(len, |buf| buf.copy_from_slice(bytes)),
            // The token below goes unused: dropping it sends nothing.
            Outbound::Held => {}
        }
        result
    }
}

impl<D: EngineDevice> Device for Recovery<D> {
    type RxToken<'a>
        = D::RxToken<'a>
    where
        Self: 'a;
    type TxToken<'a>
        = RecoveryTx<'a, D::TxToken<'a>>
    where
        Self: 'a;

    fn receive(&mut self, timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        self.now = timestamp;
        self.emit();
        if !self.settle() {
            return None;
        }
        let (rx, tx) = self.inner.receive(timestamp)?;
        // Handed over: the next packet is a new one to show the core.
        self.vetted = false;
        let layer = self.core.as_mut();
        Some((
            rx,
            RecoveryTx {
                inner: tx,
                layer,
                now: timestamp,
            },
        ))
    }

    fn transmit(&mut self, timestamp: Instant) -> Option<Self::TxToken<'_>> {
        self.now = timestamp;
        self.emit();
        let tx = self.inner.transmit(timestamp)?;
        let layer = self.core.as_mut();
        Some(RecoveryTx {
            inner: tx,
            layer,
            now: timestamp,
        })
    }

    forward_to_inner!(capabilities);
}

impl<D: EngineDevice> EngineDevice for Recovery<D> {
    fn start_round(&mut self, now: Instant) {
        self.now = now;
        self.inner.start_round(now);
        self.emit();
    }

    /// Sends what the round queued (retransmissions found while reading ACKs), then
    /// ends the round below.
    fn flush(&mut self) {
        self.emit();
        self.inner.flush();
    }

    fn peek_packet(&mut self) -> Option<&[u8]> {
        if !self.settle() {
            return None;
        }
        self.inner.peek_packet()
    }

    forward_to_inner!(readiness_fd);

    fn poll_at(&self) -> Option<Instant> {
        let own = self.core.as_ref().and_then(|core| {
            // Frames the device below had no room for are tried again soon.
            if core.front_frame().is_some() {
                return Some(self.now.total_micros() + 1_000);
            }
            core.poll_at()
        });
        match (own.map(Instant::from_micros), self.inner.poll_at()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

impl<D: Neighbours> Neighbours for Recovery<D> {
    fn neighbour(&self, ip: Ipv4Addr) -> Option<MacAddr> {
        self.inner.neighbour(ip)
    }

    fn learn(&mut self, ip: Ipv4Addr, mac: MacAddr) {
        self.inner.learn(ip, mac);
    }
}
