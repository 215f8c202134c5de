//! The switch session state machine driven by a hostile peer: bytes in any chunking,
//! interleaved with timer ticks and messages the application sends.
//!
//! Properties: no panic; everything the session sends is one well-formed OpenFlow
//! message; nothing but a failed probe result is output after `Close`, and `Close` comes
//! at most once; `Up` comes at most once and before any delivered message; a probe
//! result only answers a probe asked for; after a tick at its deadline the session asks
//! to be woken strictly later (the glue can never spin).
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use ncp_controller::openflow::codec::MAX_MESSAGE_LEN;
use ncp_controller::openflow::{Decoder, Message};
use ncp_controller::switch::session::{Output, Session, SessionConfig};

fuzz_target!(|data: &[u8]| {
    let Some((&limit, mut script)) = data.split_first() else {
        return;
    };
    let cfg = SessionConfig {
        // From tiny (every real message is too long) to the protocol's maximum.
        max_message_len: (usize::from(limit) * 256).clamp(8, MAX_MESSAGE_LEN),
        ..SessionConfig::default()
    };
    let mut now = Instant::now();
    let mut session = Session::new(cfg, now);
    let mut seen = Seen::default();
    seen.drain(&mut session);
    // Each step: an operation byte, a length byte, then (for receive) that many bytes.
    while let [op, len, rest @ ..] = script {
        let len = usize::from(*len);
        script = rest;
        match op % 5 {
            0 => {
                let (bytes, rest) = script.split_at(len.min(script.len()));
                script = rest;
                session.receive(bytes, now);
            }
            1 => {
                now += Duration::from_millis(len as u64 * 40);
                session.on_tick(now);
            }
            2 => {
                let deadline = session.next_deadline();
                now = now.max(deadline);
                session.on_tick(now);
                if !session.is_closed() {
                    assert!(
                        session.next_deadline() > now,
                        "a tick at the deadline left the deadline in the past"
                    );
                }
            }
            3 => {
                session.send(Message::EchoRequest(vec![*op; len]));
            }
            _ => {
                session.probe(now, Duration::from_millis(len as u64 * 10));
                seen.probes_asked = true;
            }
        }
        seen.drain(&mut session);
        assert_eq!(session.features().is_some(), seen.up);
        assert_eq!(session.is_closed(), seen.closed);
    }
});

/// What the session has output so far.
#[derive(Default)]
struct Seen {
    up: bool,
    closed: bool,
    probes_asked: bool,
}

impl Seen {
    fn drain(&mut self, session: &mut Session) {
        while let Some(output) = session.poll_output() {
            // A probe asked of a closed session is still answered (failed), so its
            // waiter is not left hanging; nothing else may follow Close.
            assert!(
                !self.closed || matches!(output, Output::Probed(false)),
                "{output:?} after Close"
            );
            match output {
                Output::Send(bytes) => {
                    let mut decoder = Decoder::default();
                    decoder.feed(&bytes);
                    assert!(
                        matches!(decoder.next_frame(), Ok(Some(_))),
                        "the session sent a message it cannot decode itself: {bytes:?}"
                    );
                    assert_eq!(decoder.pending(), 0, "the session sent a partial message");
                }
                Output::Up(_) => {
                    assert!(!self.up, "Up twice");
                    self.up = true;
                }
                Output::Deliver(_) => assert!(self.up, "a message delivered before Up"),
                Output::Probed(_) => assert!(self.probes_asked, "a probe result unasked"),
                Output::Close(_) => self.closed = true,
            }
        }
    }
}
