//! The OpenFlow 1.3 decoder on arbitrary bytes from a switch.
//!
//! Properties: no panic; the same frames come out whatever the chunking of the stream;
//! every decoded message re-encodes to a well-framed message that decodes to the same
//! message (decode → encode → decode), and encoding that again gives the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ncp_controller::openflow::codec::MAX_MESSAGE_LEN;
use ncp_controller::openflow::{DecodeError, Decoder, Frame, encode};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the chunk size of the second pass (1..=256 bytes).
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let whole = decode_all(std::iter::once(stream));
    let chunked = decode_all(stream.chunks(usize::from(chunk) + 1));
    assert_eq!(whole, chunked, "chunking changed what was decoded");

    for frame in whole.iter().filter_map(|r| r.as_ref().ok()) {
        let bytes = encode(&frame.message, frame.xid);
        assert!(
            (8..=MAX_MESSAGE_LEN).contains(&bytes.len()),
            "encoded length {} outside one OpenFlow message",
            bytes.len()
        );
        assert_eq!(
            usize::from(u16::from_be_bytes([bytes[2], bytes[3]])),
            bytes.len()
        );
        let again = decode_all(std::iter::once(bytes.as_slice()));
        let [Ok(second)] = again.as_slice() else {
            panic!("re-encoding of {frame:?} decodes to {again:?}");
        };
        assert_eq!(
            second.message, frame.message,
            "decode → encode → decode changed it"
        );
        assert_eq!(second.xid, frame.xid);
        assert_eq!(
            encode(&second.message, second.xid),
            bytes,
            "encoding is not stable"
        );
    }
});

/// Every result the decoder yields for `chunks` fed one after the other, stopping at a
/// fatal error like a session does.
fn decode_all<'a>(chunks: impl Iterator<Item = &'a [u8]>) -> Vec<Result<Frame, DecodeError>> {
    let mut decoder = Decoder::default();
    let mut fed = 0;
    let mut out = Vec::new();
    for chunk in chunks {
        decoder.feed(chunk);
        fed += chunk.len();
        loop {
            match decoder.next_frame() {
                Ok(None) => break,
                Ok(Some(frame)) => out.push(Ok(frame)),
                Err(e) => {
                    let fatal = e.is_fatal();
                    out.push(Err(e));
                    if fatal {
                        return out;
                    }
                }
            }
        }
        // What is held back is an unfinished message: never more than was fed, never a
        // whole maximal message.
        assert!(decoder.pending() <= fed);
        assert!(decoder.pending() < MAX_MESSAGE_LEN);
    }
    out
}
