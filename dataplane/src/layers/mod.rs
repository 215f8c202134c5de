//! Device layers, stacked the way smoltcp's `phy` wrappers are: each layer is an
//! [`EngineDevice`] that wraps another one and adds one concern, so the engine sees a
//! single device and a concern can be added or left out without touching the others.
//!
//! A worker's stack, bottom up:
//!
//! ```text
//! XskDevice                      AF_XDP socket + Ethernet (crate::device)
//!   └─ HandoverDevice            frames owned by other workers leave, theirs come in
//!        └─ Tap / Faults         optional: record what passes, inject loss (tests)
//!             └─ Engine          smoltcp TCP (crate::engine)
//! ```
//!
//! - [`crate::handover::HandoverDevice`] needs whole link-layer frames from the device
//!   below it, through [`LinkFrames`];
//! - [`tap::Tap`] shows every packet that passes to a [`tap::TapSink`] (a recorder, a
//!   trace);
//! - [`faults::Faults`] drops, duplicates and reorders received packets, by a seeded
//!   random draw or by script, so tests can exercise loss recovery deterministically.
//!
//! What the worker needs from the stack (the descriptor to sleep on, the neighbour table)
//! is passed through every layer, so it never reaches past them to the socket.

pub mod faults;
pub mod tap;

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
