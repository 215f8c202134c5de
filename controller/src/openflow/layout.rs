//! Fixed-layout message bodies described once. Most OpenFlow bodies are a run of
//! big-endian integers with zero padding in between, ending in a match, a list or raw
//! data; [`wire_layout!`] turns one field list into both the encoder and the decoder, so
//! the two can never disagree about order, widths or padding.

use super::actions::{Action, Instruction, emit_actions, parse_actions};
use super::actions::{emit_instructions, parse_instructions};
use super::bytes::{Put, Reader};
use super::messages::BodyError;
use super::oxm::Match;

/// One field of a fixed-layout body: how it is written and read.
pub(crate) trait Field: Sized {
    fn put(&self, out: &mut Vec<u8>);
    fn take(r: &mut Reader<'_>) -> Result<Self, BodyError>;
}

macro_rules! integer_field {
    ($($ty:ty => $put:ident, $take:ident;)*) => {$(
        impl Field for $ty {
            fn put(&self, out: &mut Vec<u8>) {
                out.$put(*self);
            }
            fn take(r: &mut Reader<'_>) -> Result<Self, BodyError> {
                Ok(r.$take()?)
            }
        }
    )*};
}

integer_field! {
    u8 => put_u8, u8;
    u16 => put_u16, u16;
    u32 => put_u32, u32;
    u64 => put_u64, u64;
}

impl Field for Match {
    fn put(&self, out: &mut Vec<u8>) {
        self.emit(out);
    }
    fn take(r: &mut Reader<'_>) -> Result<Self, BodyError> {
        Ok(Match::parse(r)?)
    }
}

// The list and data fields below take everything that is left, so they can only stand
// last in a layout (each body that has one ends with it).

impl Field for Vec<u8> {
    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self);
    }
    fn take(r: &mut Reader<'_>) -> Result<Self, BodyError> {
        Ok(r.rest().to_vec())
    }
}

impl Field for Vec<Instruction> {
    fn put(&self, out: &mut Vec<u8>) {
        emit_instructions(self, out);
    }
    fn take(r: &mut Reader<'_>) -> Result<Self, BodyError> {
        Ok(parse_instructions(r.rest())?)
    }
}

impl Field for Vec<Action> {
    fn put(&self, out: &mut Vec<u8>) {
        emit_actions(self, out);
    }
    fn take(r: &mut Reader<'_>) -> Result<Self, BodyError> {
        Ok(parse_actions(r.rest())?)
    }
}

/// Implements `emit_fields` and `parse_fields` for a struct from its wire order:
/// `wire_layout!(Type { a, b pad 2, c })` writes `a`, `b`, two zero bytes and `c`, and
/// reads them back in the same order, skipping the padding.
macro_rules! wire_layout {
    ($ty:ident { $($field:ident $(pad $pad:literal)?),* $(,)? }) => {
        impl $ty {
            fn emit_fields(&self, out: &mut Vec<u8>) {
                $(
                    $crate::openflow::layout::Field::put(&self.$field, out);
                    $( $crate::openflow::bytes::Put::put_zeros(out, $pad); )?
                )*
            }

            fn parse_fields(
                r: &mut $crate::openflow::bytes::Reader<'_>,
            ) -> Result<Self, $crate::openflow::messages::BodyError> {
                // Struct expression fields are evaluated in the order written, which is
                // the wire order.
                Ok(Self {
                    $($field: {
                        let value = $crate::openflow::layout::Field::take(r)?;
                        $( r.skip($pad)?; )?
                        value
                    },)*
                })
            }
        }
    };
}

pub(crate) use wire_layout;
