//! OpenFlow 1.3 wire format: the subset NCP uses, written sans-IO.
//!
//! Layout: [`bytes`] (checked cursor), [`header`], [`oxm`] (matches), [`actions`]
//! (actions and instructions), [`messages`] (typed bodies), [`codec`] (framing).

pub mod actions;
pub mod bytes;
pub mod codec;
pub mod header;
mod layout;
pub mod messages;
pub mod oxm;

#[cfg(test)]
mod tests;

pub use actions::{Action, Instruction, port};
pub use codec::{DecodeError, Decoder, Frame, encode};
pub use header::OFP_VERSION_1_3;
pub use messages::*;
pub use oxm::{Ipv4Prefix, MacAddr, Match, OxmField};
