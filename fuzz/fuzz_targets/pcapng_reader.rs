//! The pcapng reader and session reassembler on arbitrary files.
//!
//! Properties: no panic; a packet's bytes and every error offset lie within the input;
//! the reassembled sessions never hold more bytes than the file; reading the file in
//! small pieces (as from a pipe) gives exactly what reading it whole gives.
#![no_main]

use std::io::Read;
use std::ops::ControlFlow;

use libfuzzer_sys::fuzz_target;
use ncp_dataplane::offline::pcapng::{Block, BlockReader};
use ncp_dataplane::offline::reader::{Event, SessionReader, read_bytes};

fuzz_target!(|data: &[u8]| {
    let Some((&piece, file)) = data.split_first() else {
        return;
    };

    let mut blocks = BlockReader::new(file);
    let mut last_offset = 0;
    loop {
        match blocks.next_block() {
            Ok(None) => break,
            Ok(Some(Block::Packet(p))) => {
                assert!(p.data.len() <= file.len());
                assert!(p.offset < file.len() as u64);
            }
            Ok(Some(_)) => {}
            Err(e) => {
                assert!(e.offset <= file.len() as u64, "{e} is past the end");
                break;
            }
        }
        assert!(blocks.offset() > last_offset || blocks.offset() == 0);
        assert!(blocks.offset() <= file.len() as u64);
        last_offset = blocks.offset();
    }

    let whole = read_bytes(file);
    let held: usize = whole
        .sessions
        .iter()
        .map(|s| s.client.len() + s.server.len())
        .sum();
    assert!(
        held <= file.len(),
        "{held} bytes reassembled from {} bytes",
        file.len()
    );
    assert_eq!(whole.stats.sessions, whole.sessions.len() as u64);
    for e in &whole.errors {
        assert!(e.error.offset <= file.len() as u64);
    }

    // The same file through a reader that hands out at most 1..=16 bytes a call.
    let mut reader = SessionReader::new();
    let (mut opened, mut bytes) = (0, 0);
    let mut sink = |event| {
        match event {
            Event::Open { .. } => opened += 1,
            Event::Client { data, .. } | Event::Server { data, .. } => bytes += data.len(),
            Event::End { .. } => {}
        }
        ControlFlow::Continue(())
    };
    let trickle = Trickle {
        rest: file,
        piece: usize::from(piece % 16) + 1,
    };
    let error = reader.read_stream(trickle, &mut sink).err();
    reader.finish(&mut sink);
    assert_eq!(
        error.as_ref(),
        whole.errors.first().map(|e| &e.error),
        "reading in pieces changed the error"
    );
    assert_eq!(
        reader.stats(),
        whole.stats,
        "reading in pieces changed the counters"
    );
    assert_eq!(
        (opened, bytes),
        (whole.sessions.len(), held),
        "reading in pieces changed the sessions"
    );
});

/// A reader that returns at most `piece` bytes per call, like a pipe or a socket.
struct Trickle<'a> {
    rest: &'a [u8],
    piece: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.piece).min(self.rest.len());
        buf[..n].copy_from_slice(&self.rest[..n]);
        self.rest = &self.rest[n..];
        Ok(n)
    }
}
