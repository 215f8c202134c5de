//! One switch connection as a sans-IO state machine: bytes and time in, bytes and events
//! out. The tokio glue in [`super::server`] only moves bytes and sleeps until
//! [`Session::next_deadline`]; every protocol decision is here and tested without sockets.
//!
//! Liveness counts whole messages only. A peer that trickles bytes without ever finishing
//! a message therefore looks silent and is declared dead like one that sends nothing, so a
//! half-sent frame can never pin a connection open.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::openflow::codec::MAX_MESSAGE_LEN;
use crate::openflow::messages::error_type;
use crate::openflow::{
    DecodeError, Decoder, ErrorMsg, Frame, Message, OFP_VERSION_1_3, SwitchConfig, SwitchFeatures,
    encode,
};

/// Timing and size limits of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    /// Send an ECHO_REQUEST after this long without a complete message.
    pub echo_interval: Duration,
    /// Declare the switch dead after this long without a complete message.
    pub dead_after: Duration,
    /// HELLO and FEATURES_REPLY must both have arrived within this time.
    pub handshake_timeout: Duration,
    /// Longest message accepted from the switch.
    pub max_message_len: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            echo_interval: Duration::from_secs(5),
            dead_after: Duration::from_secs(15),
            handshake_timeout: Duration::from_secs(10),
            max_message_len: MAX_MESSAGE_LEN,
        }
    }
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloseReason {
    #[error("protocol error: {0}")]
    Protocol(DecodeError),
    #[error("peer offers no OpenFlow 1.3 (versions {0:?})")]
    VersionMismatch(Vec<u8>),
    #[error("peer sent {0} before the handshake finished")]
    Unexpected(&'static str),
    #[error("handshake not finished in time")]
    HandshakeTimeout,
    #[error("no complete message for too long")]
    Dead,
}

/// What the glue must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Write these bytes to the peer.
    Send(Vec<u8>),
    /// The handshake finished; the switch is usable.
    Up(SwitchFeatures),
    /// A message for the application (replies to our requests included).
    Deliver(Frame),
    /// Stop: send nothing more and close the socket.
    Close(CloseReason),
    /// The outcome of [`Session::probe`]: `true` if the switch echoed in time.
    Probed(bool),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitHello,
    AwaitFeatures,
    Ready,
    Closed,
}

/// Connection state machine.
#[derive(Debug)]
pub struct Session {
    cfg: SessionConfig,
    state: State,
    decoder: Decoder,
    next_xid: u32,
    started: Instant,
    last_rx: Instant,
    echo_sent: bool,
    features: Option<SwitchFeatures>,
    /// The liveness probe in flight: its ECHO_REQUEST's xid and when it counts as failed.
    probe: Option<(u32, Instant)>,
    out: VecDeque<Output>,
}

impl Session {
    /// Starts a session; the HELLO to send is already queued.
    pub fn new(cfg: SessionConfig, now: Instant) -> Self {
        let mut s = Self {
            cfg,
            state: State::AwaitHello,
            decoder: Decoder::new(cfg.max_message_len),
            next_xid: 0,
            started: now,
            last_rx: now,
            echo_sent: false,
            features: None,
            probe: None,
            out: VecDeque::new(),
        };
        s.send(Message::Hello {
            versions: vec![OFP_VERSION_1_3],
        });
        s
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    pub fn features(&self) -> Option<SwitchFeatures> {
        self.features
    }

    /// Queues `msg` with a fresh transaction id and returns that id.
    pub fn send(&mut self, msg: Message) -> u32 {
        self.next_xid = self.next_xid.wrapping_add(1).max(1);
        let xid = self.next_xid;
        self.send_with_xid(&msg, xid);
        xid
    }

    /// Asks the switch to prove it is alive: sends an ECHO_REQUEST now and later emits
    /// [`Output::Probed`], `true` when the matching ECHO_REPLY arrives before
    /// `now + timeout`, `false` at that deadline (or at once when the session is closed).
    /// A probe already in flight is not doubled: its outcome answers this call too.
    pub fn probe(&mut self, now: Instant, timeout: Duration) {
        if self.state == State::Closed {
            self.out.push_back(Output::Probed(false));
        } else if self.probe.is_none() {
            let xid = self.send(Message::EchoRequest(b"ncp-probe".to_vec()));
            self.probe = Some((xid, now + timeout));
        }
    }

    fn send_with_xid(&mut self, msg: &Message, xid: u32) {
        if self.state != State::Closed {
            self.out.push_back(Output::Send(encode(msg, xid)));
        }
    }

    fn close(&mut self, why: CloseReason) {
        if self.state != State::Closed {
            self.state = State::Closed;
            if self.probe.take().is_some() {
                self.out.push_back(Output::Probed(false));
            }
            self.out.push_back(Output::Close(why));
        }
    }

    /// Next thing for the glue to do.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// Feeds received bytes.
    pub fn receive(&mut self, bytes: &[u8], now: Instant) {
        if self.state == State::Closed {
            return;
        }
        self.decoder.feed(bytes);
        loop {
            match self.decoder.next_frame() {
                Ok(None) => break,
                Ok(Some(frame)) => {
                    self.last_rx = now;
                    self.echo_sent = false;
                    self.on_frame(frame);
                    if self.state == State::Closed {
                        break;
                    }
                }
                Err(e) if e.is_fatal() => {
                    self.close(CloseReason::Protocol(e));
                    break;
                }
                Err(e) => {
                    // The frame was well delimited, so the stream is still usable.
                    tracing::warn!(error = %e, "ignoring malformed message from switch");
                    self.last_rx = now;
                }
            }
        }
    }

    fn on_frame(&mut self, frame: Frame) {
        let Frame {
            version,
            xid,
            message,
        } = frame;
        match (self.state, message) {
            (_, Message::EchoRequest(data)) => self.send_with_xid(&Message::EchoReply(data), xid),
            (_, Message::EchoReply(_)) => {
                if self.probe.is_some_and(|(probe_xid, _)| probe_xid == xid) {
                    self.probe = None;
                    self.out.push_back(Output::Probed(true));
                }
            }
            (State::AwaitHello, Message::Hello { versions }) => {
                // Without a bitmap the header version is the highest the peer speaks.
                let ok = if versions.is_empty() {
                    version >= OFP_VERSION_1_3
                } else {
                    versions.contains(&OFP_VERSION_1_3)
                };
                if ok {
                    self.state = State::AwaitFeatures;
                    self.send(Message::FeaturesRequest);
                } else {
                    let data = b"NCP speaks OpenFlow 1.3 only".to_vec();
                    let err = ErrorMsg {
                        err_type: error_type::HELLO_FAILED,
                        code: 0,
                        data,
                    };
                    self.send_with_xid(&Message::Error(err), xid);
                    self.close(CloseReason::VersionMismatch(versions));
                }
            }
            (State::AwaitHello, _) => self.close(CloseReason::Unexpected("a message before HELLO")),
            (State::AwaitFeatures, Message::FeaturesReply(f)) => {
                self.state = State::Ready;
                self.features = Some(f);
                // Whole packets to the controller (LLDP discovery needs the full frame).
                self.send(Message::SetConfig(SwitchConfig {
                    flags: 0,
                    miss_send_len: 0xffff,
                }));
                self.out.push_back(Output::Up(f));
            }
            (State::AwaitFeatures, Message::Hello { .. }) => {}
            (State::AwaitFeatures, Message::Error(e)) => {
                tracing::warn!(?e, "switch answered the handshake with an error");
                self.close(CloseReason::Unexpected("an error during the handshake"));
            }
            (State::AwaitFeatures, _) => {
                // Switches may send PORT_STATUS etc. early; nobody can use them before we
                // know the dpid, and the switch reports its state again on request.
            }
            (State::Ready, m) if version != OFP_VERSION_1_3 => {
                tracing::warn!(
                    version,
                    msg_type = m.msg_type(),
                    "version changed mid-session"
                );
                self.close(CloseReason::Unexpected(
                    "a message of another OpenFlow version",
                ));
            }
            (State::Ready, message) => self.out.push_back(Output::Deliver(Frame {
                version,
                xid,
                message,
            })),
            (State::Closed, _) => {}
        }
    }

    /// When [`Session::on_tick`] must run next.
    pub fn next_deadline(&self) -> Instant {
        let dead = self.last_rx + self.cfg.dead_after;
        let probe = self.last_rx + self.cfg.echo_interval;
        let mut next = if self.echo_sent {
            dead
        } else {
            probe.min(dead)
        };
        if self.state != State::Ready {
            next = next.min(self.started + self.cfg.handshake_timeout);
        }
        if let Some((_, deadline)) = self.probe {
            next = next.min(deadline);
        }
        next
    }

    /// Runs the timers.
    pub fn on_tick(&mut self, now: Instant) {
        if self.state == State::Closed {
            return;
        }
        if self.probe.is_some_and(|(_, deadline)| now >= deadline) {
            self.probe = None;
            self.out.push_back(Output::Probed(false));
        }
        if self.state != State::Ready && now >= self.started + self.cfg.handshake_timeout {
            self.close(CloseReason::HandshakeTimeout);
        } else if now >= self.last_rx + self.cfg.dead_after {
            self.close(CloseReason::Dead);
        } else if !self.echo_sent && now >= self.last_rx + self.cfg.echo_interval {
            self.echo_sent = true;
            self.send(Message::EchoRequest(Vec::new()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openflow::codec::Decoder as WireDecoder;

    fn cfg() -> SessionConfig {
        SessionConfig {
            echo_interval: Duration::from_secs(1),
            dead_after: Duration::from_secs(3),
            handshake_timeout: Duration::from_secs(2),
            max_message_len: 1024,
        }
    }

    /// Drains outputs, decoding what the session sends.
    fn drain(s: &mut Session) -> (Vec<Message>, Vec<Output>) {
        let mut sent = Vec::new();
        let mut other = Vec::new();
        while let Some(o) = s.poll_output() {
            match o {
                Output::Send(b) => {
                    let mut d = WireDecoder::default();
                    d.feed(&b);
                    sent.push(d.next_frame().expect("valid").expect("whole").message);
                }
                o => other.push(o),
            }
        }
        (sent, other)
    }

    fn features(dpid: u64) -> Message {
        Message::FeaturesReply(SwitchFeatures {
            datapath_id: dpid,
            n_buffers: 0,
            n_tables: 254,
            auxiliary_id: 0,
            capabilities: 0,
        })
    }

    fn ready(now: Instant) -> Session {
        let mut s = Session::new(cfg(), now);
        s.receive(&encode(&Message::Hello { versions: vec![4] }, 1), now);
        s.receive(&encode(&features(0xab), 1), now);
        drain(&mut s);
        s
    }

    #[test]
    fn handshake() {
        let t0 = Instant::now();
        let mut s = Session::new(cfg(), t0);
        assert_eq!(drain(&mut s).0, vec![Message::Hello { versions: vec![4] }]);
        s.receive(
            &encode(
                &Message::Hello {
                    versions: vec![1, 4],
                },
                9,
            ),
            t0,
        );
        assert_eq!(drain(&mut s).0, vec![Message::FeaturesRequest]);
        s.receive(&encode(&features(0xab), 2), t0);
        let (sent, other) = drain(&mut s);
        assert_eq!(
            sent,
            vec![Message::SetConfig(SwitchConfig {
                flags: 0,
                miss_send_len: 0xffff
            })]
        );
        assert!(matches!(other.as_slice(), [Output::Up(f)] if f.datapath_id == 0xab));
        assert_eq!(s.features().map(|f| f.datapath_id), Some(0xab));
    }

    #[test]
    fn version_mismatch_is_refused() {
        let t0 = Instant::now();
        let mut s = Session::new(cfg(), t0);
        drain(&mut s);
        s.receive(&encode(&Message::Hello { versions: vec![1] }, 1), t0);
        let (sent, other) = drain(&mut s);
        assert!(
            matches!(sent.as_slice(), [Message::Error(e)] if e.err_type == error_type::HELLO_FAILED)
        );
        assert_eq!(
            other,
            vec![Output::Close(CloseReason::VersionMismatch(vec![1]))]
        );
        assert!(s.is_closed());
    }

    #[test]
    fn message_before_hello_is_refused() {
        let t0 = Instant::now();
        let mut s = Session::new(cfg(), t0);
        drain(&mut s);
        s.receive(&encode(&features(1), 1), t0);
        assert!(matches!(
            drain(&mut s).1.as_slice(),
            [Output::Close(CloseReason::Unexpected(_))]
        ));
    }

    #[test]
    fn echo_is_answered_and_sent_when_idle_then_dead() {
        let t0 = Instant::now();
        let mut s = ready(t0);
        s.receive(&encode(&Message::EchoRequest(vec![7]), 77), t0);
        assert_eq!(drain(&mut s).0, vec![Message::EchoReply(vec![7])]);
        assert_eq!(s.next_deadline(), t0 + Duration::from_secs(1));
        s.on_tick(t0 + Duration::from_secs(1));
        assert_eq!(drain(&mut s).0, vec![Message::EchoRequest(vec![])]);
        assert_eq!(s.next_deadline(), t0 + Duration::from_secs(3));
        // The reply revives the session.
        s.receive(
            &encode(&Message::EchoReply(vec![]), 1),
            t0 + Duration::from_secs(2),
        );
        s.on_tick(t0 + Duration::from_secs(4));
        assert!(!s.is_closed());
        assert_eq!(drain(&mut s).0, vec![Message::EchoRequest(vec![])]);
        s.on_tick(t0 + Duration::from_secs(5));
        assert_eq!(drain(&mut s).1, vec![Output::Close(CloseReason::Dead)]);
    }

    #[test]
    fn half_message_does_not_count_as_alive() {
        let t0 = Instant::now();
        let mut s = ready(t0);
        let bytes = encode(&Message::BarrierReply, 5);
        // A byte every half second, never completing the 8-byte message.
        for (i, b) in (1u64..).zip(&bytes[..4]) {
            let t = t0 + Duration::from_millis(500 * i);
            s.receive(&[*b], t);
            s.on_tick(t);
        }
        s.on_tick(t0 + Duration::from_secs(3));
        assert!(s.is_closed());
        assert!(drain(&mut s).1.contains(&Output::Close(CloseReason::Dead)));
    }

    #[test]
    fn probe_answered_in_time() {
        let t0 = Instant::now();
        let mut s = ready(t0);
        s.probe(t0, Duration::from_millis(500));
        // A second probe while one is in flight sends nothing more.
        s.probe(t0, Duration::from_millis(500));
        let (sent, _) = drain(&mut s);
        assert_eq!(sent, vec![Message::EchoRequest(b"ncp-probe".to_vec())]);
        assert_eq!(s.next_deadline(), t0 + Duration::from_millis(500));
        // An echo reply with another xid (a keepalive's) does not answer the probe.
        let t1 = t0 + Duration::from_millis(200);
        s.receive(&encode(&Message::EchoReply(vec![]), 999), t1);
        assert_eq!(drain(&mut s).1, vec![]);
        let probe_xid = s.next_xid;
        s.receive(&encode(&Message::EchoReply(vec![]), probe_xid), t1);
        assert_eq!(drain(&mut s).1, vec![Output::Probed(true)]);
        s.on_tick(t0 + Duration::from_millis(600));
        assert_eq!(drain(&mut s).1, vec![], "answered probes report once");
    }

    /// A ready session that has sent an echo probe at `t0`, answer due within `limit`.
    fn probing(t0: Instant, limit: Duration) -> Session {
        let mut s = ready(t0);
        s.probe(t0, limit);
        drain(&mut s);
        s
    }

    #[test]
    fn probe_unanswered_fails_at_its_deadline() {
        let t0 = Instant::now();
        let mut s = probing(t0, Duration::from_millis(500));
        s.on_tick(t0 + Duration::from_millis(499));
        assert_eq!(drain(&mut s).1, vec![]);
        s.on_tick(t0 + Duration::from_millis(500));
        assert_eq!(drain(&mut s).1, vec![Output::Probed(false)]);
        // The session itself stays up: the caller decides what a failed probe means.
        assert!(!s.is_closed());
    }

    #[test]
    fn probe_of_a_closing_session_fails() {
        let t0 = Instant::now();
        let mut s = probing(t0, Duration::from_secs(5));
        s.on_tick(t0 + Duration::from_secs(3));
        assert_eq!(
            drain(&mut s).1,
            vec![Output::Probed(false), Output::Close(CloseReason::Dead)]
        );
        s.probe(t0 + Duration::from_secs(4), Duration::from_secs(5));
        assert_eq!(drain(&mut s).1, vec![Output::Probed(false)]);
    }

    #[test]
    fn handshake_timeout() {
        let t0 = Instant::now();
        let mut s = Session::new(cfg(), t0);
        s.receive(&encode(&Message::Hello { versions: vec![4] }, 1), t0);
        assert_eq!(s.next_deadline(), t0 + Duration::from_secs(1));
        s.on_tick(t0 + Duration::from_secs(1));
        s.receive(
            &encode(&Message::EchoReply(vec![]), 1),
            t0 + Duration::from_secs(1),
        );
        s.on_tick(t0 + Duration::from_secs(2));
        assert!(
            drain(&mut s)
                .1
                .contains(&Output::Close(CloseReason::HandshakeTimeout))
        );
    }

    #[test]
    fn absurd_length_closes() {
        let t0 = Instant::now();
        let mut s = ready(t0);
        s.receive(&[4, 10, 0xff, 0xff, 0, 0, 0, 0], t0);
        assert!(matches!(
            drain(&mut s).1.as_slice(),
            [Output::Close(CloseReason::Protocol(_))]
        ));
        // Nothing is sent after closing.
        s.send(Message::BarrierRequest);
        assert!(s.poll_output().is_none());
    }

    #[test]
    fn messages_are_delivered_with_their_xid() {
        let t0 = Instant::now();
        let mut s = ready(t0);
        s.receive(&encode(&Message::BarrierReply, 42), t0);
        let (_, other) = drain(&mut s);
        assert!(
            matches!(other.as_slice(), [Output::Deliver(f)] if f.xid == 42 && f.message == Message::BarrierReply)
        );
    }
}
