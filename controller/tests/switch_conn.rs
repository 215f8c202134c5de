//! Switch connection handling over real TCP on loopback: a well-behaved fake switch built
//! from the crate's own codec, and hostile peers that must be dropped without disturbing it.

use std::net::SocketAddr;
use std::time::Duration;

use ncp_controller::openflow::messages::MULTIPART_MORE;
use ncp_controller::openflow::{
    Decoder, MacAddr, Message, MultipartReply, MultipartReplyBody, MultipartRequest, PortDesc,
    SwitchFeatures, encode,
};
use ncp_controller::switch::{Controller, ServerConfig, SessionConfig, SwitchError, SwitchEvent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;

fn fast_config() -> ServerConfig {
    ServerConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        session: SessionConfig {
            echo_interval: Duration::from_millis(200),
            dead_after: Duration::from_millis(700),
            handshake_timeout: Duration::from_millis(500),
            max_message_len: 4096,
        },
        request_timeout: Duration::from_secs(2),
        event_capacity: 64,
        duplicate_probe_timeout: Duration::from_millis(300),
        tls: None,
    }
}

fn port(no: u32) -> PortDesc {
    PortDesc::new(no, MacAddr([2, 0, 0, 0, 0, no as u8]), format!("p{no}"))
}

/// A minimal switch: answers the handshake, echo, barrier and port-desc (in two parts).
/// With `mute_after_handshake` it goes silent once connected, like a hung switch.
fn fake_switch(addr: SocketAddr, dpid: u64, mute_after_handshake: bool) -> JoinHandle<()> {
    tokio::spawn(async move {
        let Ok(mut s) = TcpStream::connect(addr).await else {
            return;
        };
        let mut dec = Decoder::default();
        let mut buf = [0u8; 4096];
        let mut connected = false;
        let _ = s
            .write_all(&encode(&Message::Hello { versions: vec![4] }, 1))
            .await;
        loop {
            let n = match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            dec.feed(&buf[..n]);
            while let Ok(Some(f)) = dec.next_frame() {
                if connected && mute_after_handshake {
                    continue;
                }
                let replies: Vec<Message> = match f.message {
                    Message::FeaturesRequest => {
                        connected = true;
                        vec![Message::FeaturesReply(SwitchFeatures {
                            datapath_id: dpid,
                            n_buffers: 0,
                            n_tables: 1,
                            auxiliary_id: 0,
                            capabilities: 0,
                        })]
                    }
                    Message::EchoRequest(d) => vec![Message::EchoReply(d)],
                    Message::BarrierRequest => vec![Message::BarrierReply],
                    Message::MultipartRequest(MultipartRequest::PortDesc) => vec![
                        Message::MultipartReply(MultipartReply {
                            flags: MULTIPART_MORE,
                            body: MultipartReplyBody::PortDesc(vec![port(1), port(2)]),
                        }),
                        Message::MultipartReply(MultipartReply {
                            flags: 0,
                            body: MultipartReplyBody::PortDesc(vec![port(3)]),
                        }),
                    ],
                    _ => vec![],
                };
                for r in replies {
                    if s.write_all(&encode(&r, f.xid)).await.is_err() {
                        return;
                    }
                }
            }
        }
    })
}

async fn next_event(rx: &mut mpsc::Receiver<SwitchEvent>) -> SwitchEvent {
    timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("event in time")
        .expect("channel open")
}

/// The next event must be the connection of `dpid`.
async fn expect_connected(rx: &mut mpsc::Receiver<SwitchEvent>, dpid: u64) {
    match next_event(rx).await {
        SwitchEvent::Connected { dpid: d, .. } => assert_eq!(d, dpid),
        e => panic!("expected {dpid:#x} to connect, got {e:?}"),
    }
}

/// `dpid` is the one switch connected and still answers a barrier, and no event is
/// queued. The peers the test is about were already seen closed by then, and the
/// controller reports a connection's events before it closes it, so an event they caused
/// would be waiting here: no time has to pass to show that none came.
async fn only_switch_and_no_event(
    ctl: &Controller,
    events: &mut mpsc::Receiver<SwitchEvent>,
    dpid: u64,
    about: &str,
) {
    assert_eq!(ctl.connected(), vec![dpid]);
    ctl.barrier(dpid)
        .await
        .expect("the remaining switch still serves requests");
    match events.try_recv() {
        Err(mpsc::error::TryRecvError::Empty) => {}
        other => panic!("no event expected from {about}, got {other:?}"),
    }
}

async fn start() -> (Controller, mpsc::Receiver<SwitchEvent>) {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    Controller::start(fast_config())
        .await
        .expect("bind loopback")
}

#[tokio::test]
async fn handshake_barrier_and_multipart() {
    let (ctl, mut events) = start().await;
    let _sw = fake_switch(ctl.local_addr(), 0x11, false);
    match next_event(&mut events).await {
        SwitchEvent::Connected { dpid, features, .. } => {
            assert_eq!(dpid, 0x11);
            assert_eq!(features.n_tables, 1);
        }
        e => panic!("unexpected {e:?}"),
    }
    assert_eq!(ctl.connected(), vec![0x11]);
    ctl.barrier(0x11).await.expect("barrier reply");
    let ports = ctl.port_desc(0x11).await.expect("ports");
    assert_eq!(
        ports.iter().map(|p| p.port_no).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(
        ctl.barrier(0x99).await,
        Err(SwitchError::NotConnected(0x99))
    );
    // Keepalive holds the connection across several echo intervals.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ctl.barrier(0x11).await.expect("still alive");
}

#[tokio::test]
async fn new_connection_replaces_a_silent_one() {
    let (ctl, mut events) = start().await;
    // The first connection went quiet, as a half-open connection of a restarted switch
    // does: it fails the echo probe that the second one's claim triggers.
    let first = fake_switch(ctl.local_addr(), 7, true);
    expect_connected(&mut events, 7).await;
    let _second = fake_switch(ctl.local_addr(), 7, false);
    expect_connected(&mut events, 7).await;
    // The controller closes the first connection, so the first fake switch ends.
    timeout(Duration::from_secs(3), first)
        .await
        .expect("stale connection closed")
        .expect("task");
    // No Disconnected event for 7: the replaced connection does not own the slot.
    only_switch_and_no_event(&ctl, &mut events, 7, "the replaced connection").await;
    assert_eq!(ctl.duplicate_claims_refused(), 0);
}

/// A peer that completes the handshake as `dpid` and then answers echoes; returns once the
/// controller closes the connection (`true`) or after `limit` (`false`).
async fn impostor_is_closed(addr: SocketAddr, dpid: u64, limit: Duration) -> bool {
    let sw = fake_switch(addr, dpid, false);
    timeout(limit, sw).await.is_ok()
}

#[tokio::test]
async fn impostor_does_not_displace_a_live_switch() {
    let (ctl, mut events) = start().await;
    let _real = fake_switch(ctl.local_addr(), 0x51, false);
    expect_connected(&mut events, 0x51).await;
    for n in 1..=2u64 {
        assert!(
            impostor_is_closed(ctl.local_addr(), 0x51, Duration::from_secs(3)).await,
            "the impostor must be closed"
        );
        assert_eq!(ctl.duplicate_claims_refused(), n);
    }
    // The real switch never saw a disconnect and the impostors never a connect.
    only_switch_and_no_event(&ctl, &mut events, 0x51, "the refused impostors").await;
}

#[tokio::test]
async fn silent_switch_is_declared_dead() {
    let (ctl, mut events) = start().await;
    let _sw = fake_switch(ctl.local_addr(), 5, true);
    expect_connected(&mut events, 5).await;
    match next_event(&mut events).await {
        SwitchEvent::Disconnected { dpid, reason } => {
            assert_eq!(dpid, 5);
            assert!(reason.contains("no complete message"), "{reason}");
        }
        e => panic!("unexpected {e:?}"),
    }
    assert!(ctl.connected().is_empty());
}

/// Connects, sends `bytes`, and returns how long the controller took to close on us.
async fn hostile(addr: SocketAddr, bytes: Vec<u8>) -> Duration {
    let start = std::time::Instant::now();
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(&bytes).await.expect("write");
    let mut buf = [0u8; 1024];
    loop {
        match timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Err(_) => panic!("hostile peer was not dropped"),
            Ok(Ok(0) | Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => {} // our HELLO, maybe an echo request
        }
    }
}

#[tokio::test]
async fn hostile_peers_are_dropped_and_harm_nobody() {
    // Roomy timers so that "dropped at once" and "dropped by a timer" stay far apart even
    // on a loaded machine.
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let mut cfg = fast_config();
    cfg.session.echo_interval = Duration::from_millis(500);
    cfg.session.dead_after = Duration::from_millis(2000);
    cfg.session.handshake_timeout = Duration::from_millis(1500);
    let (ctl, mut events) = Controller::start(cfg).await.expect("bind loopback");
    let addr = ctl.local_addr();
    let _good = fake_switch(addr, 1, false);
    expect_connected(&mut events, 1).await;

    let hello = encode(&Message::Hello { versions: vec![4] }, 1);
    // Garbage: the header's length field says 0x0101... bytes below 8 or absurd.
    let garbage = vec![0x41, 0x41, 0x00, 0x02, 0x41, 0x41, 0x41, 0x41, 0x41, 0x41];
    // A valid hello, then a message claiming more than the configured maximum.
    let mut absurd = hello.clone();
    absurd.extend_from_slice(&[4, 10, 0xff, 0xff, 0, 0, 0, 2]);
    // A valid hello, then half a header, and nothing more.
    let mut unfinished = hello.clone();
    unfinished.extend_from_slice(&[4, 0]);
    // Wrong protocol version only.
    let old = encode(&Message::Hello { versions: vec![1] }, 1);

    let quick = [garbage, absurd, old];
    let handles: Vec<_> = quick
        .into_iter()
        .map(|b| tokio::spawn(hostile(addr, b)))
        .collect();
    let slow = tokio::spawn(hostile(addr, unfinished));
    let silent = tokio::spawn(hostile(addr, Vec::new()));
    for h in handles {
        let took = h.await.expect("task");
        assert!(
            took < Duration::from_millis(1000),
            "protocol errors drop at once, took {took:?}"
        );
    }
    for h in [slow, silent] {
        let took = h.await.expect("task");
        assert!(
            took >= Duration::from_millis(1400),
            "timeouts drop these, took {took:?}"
        );
    }

    // The good switch never noticed.
    only_switch_and_no_event(&ctl, &mut events, 1, "hostile peers").await;
}
