//! Every redirection mode carries full-size TCP segments end to end, on Open vSwitch
//! (userspace datapath) with the real controller in front of the real XDP middlebox.
//!
//! The test bed is a spine with three leaves (testbed/spine.toml): the client on leaf1, the
//! primary and the replica on leaf2, the middlebox on leaf3. The client's routes to the
//! primary and to the middlebox part at the spine, so the redirect goes there and, in
//! VLAN and MPLS modes, the tag is pushed on the spine and popped on leaf3: it rides the
//! spine-leaf3 link, whose MTU is the usual 1500 bytes. For each mode in turn the client
//! sends a few MiB through NCP; the primary and the replica must each receive every byte,
//! in time, while the frames the tunnel carried are full-size. The middlebox's interface
//! keeps its default `mtu` (1500): the controller tells it each service's tunnel overhead
//! and the middlebox advertises an MSS that leaves room for the tag. Last, with that room
//! taken away again, MPLS mode shows the failure of issue 15: labelled full-size frames
//! are lost between the spine and leaf3 and the client's connection stalls.

mod support;

// The controller tests' scene helpers (controller, REST API, OVS test bed over TLS).
#[path = "../../controller/tests/common/mod.rs"]
mod common;

use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    path::Path,
    sync::{Arc, mpsc},
    thread,
    time::{Duration, Instant},
};

use common::TreeScene;
use ncp_controller::rules::{PRIORITY_REDIRECT, RuleKind, cookie};
use ncp_controller::store::{ModeSpec, ReplicationSpec};
use ncp_testbed::{Testbed, Topology};
use serde_json::json;
use support::{
    PATIENCE, XdpMiddlebox, one_nic_config,
    scene::{ping, wait_until},
    streams,
};

const PREFIX: &str = "ntun";
const SPINE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../testbed/spine.toml");

/// Bytes each transfer sends: a few thousand full-size segments.
const BYTES: usize = 4 << 20;
/// Upper bound of one transfer (it takes well under a second when nothing is lost; a
/// lost full-size frame stalls it for good).
const TRANSFER_LIMIT: Duration = Duration::from_secs(30);
/// The smallest average frame, in bytes, that counts as full-size traffic: a client's
/// segment at the middlebox's MSS (1456 or 1460) is a 1510- or 1514-byte frame before
/// tagging; the few pure ACKs the client sends meanwhile lower the average a little.
const FULL_SIZE_AVERAGE: u64 = 1400;

/// One mode under test: the replication that uses it and how its tag shows in OVS's
/// flow dumps (`None` for rewrite mode, which has no tag).
struct Case {
    mode: ModeSpec,
    port: u16,
    push: Option<&'static str>,
    pop: Option<&'static str>,
    overhead: u64,
}

const CASES: [Case; 3] = [
    Case {
        mode: ModeSpec::Rewrite,
        port: 5001,
        push: None,
        pop: None,
        overhead: 0,
    },
    Case {
        mode: ModeSpec::Vlan { vid: 100 },
        port: 5002,
        push: Some("push_vlan"),
        pop: Some("pop_vlan"),
        overhead: 4,
    },
    Case {
        mode: ModeSpec::Mpls { label: 1017 },
        port: 5003,
        push: Some("push_mpls"),
        pop: Some("pop_mpls"),
        overhead: 4,
    },
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mode_carries_full_size_segments_across_the_spine() {
    let tools = ["ovs-ofctl", "ping", "ip", "ss"];
    let topology = Topology::load(SPINE).expect("spine topology");
    // A restarted middlebox gets its services back within a second.
    let fast_push = |c: &mut ncp_controller::service::ServiceConfig| {
        c.push.refresh = Duration::from_secs(1);
    };
    let Some(scene) =
        common::scene_on(&topology, "tunnel full size", &tools, PREFIX, fast_push).await
    else {
        return;
    };
    let TreeScene { api, bed, .. } = &scene;
    common::pin_all(api, bed).await;
    let ip = |h: &str| bed.address(h, "eth0").expect("address");
    let (client, primary, replica, mb) =
        (ip("client"), ip("primary"), ip("replica"), ip("middlebox"));

    // The middlebox starts without services and with the default mtu (the links'); the
    // controller pushes it one service per replication, with the mode's overhead.
    let dir = common::temp_state("tunnel-mb");
    let dir = dir.parent().expect("dir").to_path_buf();
    let middlebox = start_middlebox(bed, &dir, mb, 1500);
    let socket = format!("unix:{}", dir.join("mb.sock").display());
    let body = json!({ "control": socket }).to_string();
    let r = common::call(api, "PUT", &format!("/v1/middleboxes/{mb}"), Some(body)).await;
    assert_eq!(r.status, 201, "{}", r.body);
    // The middlebox's workers take next hops from the kernel's neighbour table.
    tokio::task::block_in_place(|| {
        for to in [primary, replica, client] {
            ping(bed, "middlebox", to);
        }
        ping(bed, "client", primary);
    });

    let (spine, leaf3) = (
        bed.bridge("spine").expect("bridge"),
        bed.bridge("leaf3").expect("bridge"),
    );
    // The link the tag rides (the spine's port 3, toward leaf3) has the usual MTU.
    let link = ncp_testbed::plan::port_ifname(PREFIX, "spine", 3);
    let shown = common::sh(&["ip", "-o", "link", "show", &link]);
    assert!(shown.contains(" mtu 1500 "), "{shown}");
    let sent = data();
    for (case, id) in CASES.iter().zip(1u32..) {
        let what = format!("{:?}", case.mode);
        let spec = ReplicationSpec {
            primary_port: case.port,
            replicas: vec![SocketAddrV4::new(replica, case.port).to_string()],
            ..common::spec(
                id,
                &client.to_string(),
                &primary.to_string(),
                &mb.to_string(),
                case.mode,
            )
        };
        common::add_replication(api, &spec).await;
        let status = common::wait_installed(api, id, true, Duration::from_secs(30)).await;
        assert_eq!(
            status["tunnel_overhead_bytes"], case.overhead,
            "{what}: {status}"
        );
        assert_eq!(
            status["redirection_switch"],
            bed.dpid("spine").expect("dpid"),
            "{what}: the redirect belongs on the spine: {status}"
        );

        let (to_primary, to_replica, answer) =
            tokio::task::block_in_place(|| transfer(bed, primary, case.port, &what));
        assert_eq!(answer, format!("primary {BYTES}\n"), "{what}");
        assert!(to_primary == sent, "{what}: the primary got other bytes");
        assert_eq!(to_replica.len(), BYTES, "{what}: bytes the replica got");
        assert!(to_replica == sent, "{what}: the replica got other bytes");

        // Full-size frames took the redirect, and in the tunnel modes crossed the
        // spine-leaf3 link tagged and were untagged on leaf3.
        let redirected =
            tokio::task::block_in_place(|| full_size_flow(&spine, &what, |l| is_redirect(l, id)));
        match (case.push, case.pop) {
            (Some(push), Some(pop)) => {
                assert!(redirected.contains(push), "{what}: {redirected}");
                tokio::task::block_in_place(|| full_size_flow(&leaf3, &what, |l| l.contains(pop)));
            }
            _ => assert!(!redirected.contains("push_"), "{what}: {redirected}"),
        }
    }

    // Without the headroom, the failure the issue reported: a middlebox whose interface
    // claims 4 bytes more than the link has (mtu 1504, so the MSS is 1460 despite the
    // overhead) gets no full-size segment through MPLS mode. The spine pushes the label
    // and cannot send the 1518-byte frame on (Linux takes a frame 4 bytes past the MTU
    // only if it carries an 802.1Q tag, which is why VLAN mode gets away with it), so
    // the client's connection stalls in retransmission back-off.
    drop(middlebox);
    let middlebox = start_middlebox(bed, &dir, mb, 1504);
    let (case, id) = CASES
        .iter()
        .zip(1u32..)
        .find(|(c, _)| matches!(c.mode, ModeSpec::Mpls { .. }))
        .expect("an MPLS case");
    let what = "MPLS without headroom: the client backs off while labelled frames go missing";
    tokio::task::block_in_place(|| {
        // Serving again once the controller has pushed the services back.
        wait_until(what, PATIENCE, || {
            middlebox.stats().is_some_and(|s| s.workers > 0)
        });
        for to in [primary, replica, client] {
            ping(bed, "middlebox", to);
        }
    });
    common::wait_installed(api, id, true, Duration::from_secs(30)).await;
    let before = tokio::task::block_in_place(|| {
        (
            packets(&spine, |l| is_redirect(l, id)),
            packets(&leaf3, |l| l.contains("pop_mpls")),
        )
    });
    let (stalled, lost) = tokio::task::block_in_place(|| {
        // Servers that take the connection and read whatever arrives; they and the
        // client end with the test bed.
        let (open, gate) = (mpsc::channel(), mpsc::channel());
        let _servers = [
            streams::gated_server(bed, "primary", case.port, open.1),
            streams::gated_server(bed, "replica", case.port, gate.1),
        ];
        open.0.send(()).expect("gate");
        gate.0.send(()).expect("gate");
        let to = SocketAddrV4::new(primary, case.port);
        let _client = support::in_netns(&bed.netns("client").expect("netns"), move || {
            if let Ok(mut s) = TcpStream::connect_timeout(&to.into(), Duration::from_secs(10)) {
                let _ = s.set_write_timeout(Some(TRANSFER_LIMIT));
                let _ = s.write_all(&sent);
            }
        });
        // Stalled: the client backs off its retransmissions, while frames the spine
        // labelled never reached leaf3's pop.
        let filter = format!("dst {to}");
        let (mut client, mut lost) = (String::new(), 0);
        wait_until(what, PATIENCE, || {
            let out = bed.exec("client", &["ss", "-tni", &filter]).expect("ss");
            client = String::from_utf8_lossy(&out.stdout).into_owned();
            let pushed = packets(&spine, |l| is_redirect(l, id)).saturating_sub(before.0);
            let popped = packets(&leaf3, |l| l.contains("pop_mpls")).saturating_sub(before.1);
            lost = pushed.saturating_sub(popped);
            counter(&client, "backoff:") >= 2 && lost >= 3
        });
        (client, lost)
    });
    eprintln!(
        "MPLS without headroom: {lost} labelled frames lost between the spine and leaf3; client: {stalled}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Starts a middlebox without services whose interface has `mtu`, its configuration
/// and control socket (`mb.sock`) in `dir`.
fn start_middlebox(bed: &Testbed, dir: &Path, mb: Ipv4Addr, mtu: u16) -> XdpMiddlebox {
    let (config, socket) = one_nic_config(dir, mb, &format!("mtu = {mtu}"), "");
    tokio::task::block_in_place(|| XdpMiddlebox::start_answering(bed, &config, &socket))
}

/// Whether a flow dump line is replication `id`'s redirect.
fn is_redirect(line: &str, id: u32) -> bool {
    line.contains(&format!("cookie={:#x}", cookie(RuleKind::Flow, id)))
        && line.contains(&format!("priority={PRIORITY_REDIRECT}"))
}

/// The bytes every transfer sends: a pattern that no shift of itself matches, so a lost,
/// doubled or reordered segment shows.
fn data() -> Vec<u8> {
    (0..BYTES)
        .map(|i| (i % 251) as u8 ^ ((i / 251) % 256) as u8)
        .collect()
}

/// Servers on the primary and the replica at `port`, then [`BYTES`] from the client to
/// the primary (through NCP); returns what the primary and the replica read and the
/// primary's answer. Fails the test if the transfer does not end within
/// [`TRANSFER_LIMIT`].
fn transfer(bed: &Testbed, primary: Ipv4Addr, port: u16, what: &str) -> (Vec<u8>, Vec<u8>, String) {
    let at_primary = streams::one_shot_server(bed, "primary", port, "primary");
    let at_replica = streams::one_shot_server(bed, "replica", port, "replica");
    let (done, finished) = mpsc::channel();
    let netns = bed.netns("client").expect("netns");
    let to = SocketAddrV4::new(primary, port);
    let started = Instant::now();
    thread::spawn(move || {
        let data = Arc::new(data());
        let sent = support::in_netns(&netns, move || streams::exchange(to, &data)).join();
        let _ = done.send(sent);
    });
    let answer = match finished.recv_timeout(TRANSFER_LIMIT) {
        Ok(Ok(answer)) => answer,
        Ok(Err(_)) => panic!("{what}: the client's transfer failed"),
        Err(_) => {
            for argv in [["coverage/show"].as_slice(), &["dpctl/show", "-s"]] {
                let out = std::process::Command::new("ovs-appctl").args(argv).output();
                if let Ok(out) = out {
                    eprintln!(
                        "ovs-appctl {argv:?}:\n{}",
                        String::from_utf8_lossy(&out.stdout)
                    );
                }
            }
            panic!("{what}: {BYTES} bytes not through NCP within {TRANSFER_LIMIT:?}")
        }
    };
    eprintln!(
        "{what}: {BYTES} bytes through NCP in {:?}",
        started.elapsed()
    );
    let to_primary = at_primary.join().expect("primary's server");
    let to_replica = wait_joined(at_replica, what);
    (to_primary, to_replica, answer)
}

/// The replica's server's result: it reads on after the client is done, until the
/// middlebox closes its connection; bounded by [`TRANSFER_LIMIT`].
fn wait_joined(server: thread::JoinHandle<Vec<u8>>, what: &str) -> Vec<u8> {
    let deadline = Instant::now() + TRANSFER_LIMIT;
    while !server.is_finished() {
        assert!(
            Instant::now() < deadline,
            "{what}: the replica's stream did not end"
        );
        thread::sleep(Duration::from_millis(20));
    }
    server.join().expect("replica's server")
}

/// The flow of `bridge` that `matches`, once its counters show that it carried the
/// whole transfer as full-size frames: at least one frame per client segment (OVS
/// brings a rule's counters up to date from its datapath flows every so often, so they
/// are polled, within 10 s), at least [`FULL_SIZE_AVERAGE`] bytes each on average.
/// Returns the flow's line.
fn full_size_flow(bridge: &str, what: &str, matches: impl Fn(&str) -> bool) -> String {
    let segments = (BYTES / 1460) as u64;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let line = flow(bridge, &matches);
        let (packets, bytes) = (counter(&line, "n_packets="), counter(&line, "n_bytes="));
        if packets >= segments {
            assert!(
                bytes / packets >= FULL_SIZE_AVERAGE,
                "{what}: {bytes} bytes in {packets} frames: {line}"
            );
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {packets} frames, fewer than the {segments} segments sent: {line}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// The flow of `bridge`, with its counters, that `matches`; fails the test if none does.
fn flow(bridge: &str, matches: impl Fn(&str) -> bool) -> String {
    common::sh(&["ovs-ofctl", "-O", "OpenFlow13", "dump-flows", bridge])
        .lines()
        .find(|l| matches(l))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no such flow on {bridge}"))
}

/// The packets the flow of `bridge` that `matches` has counted.
fn packets(bridge: &str, matches: impl Fn(&str) -> bool) -> u64 {
    counter(&flow(bridge, matches), "n_packets=")
}

/// The number after `key` in a flow dump line (0 if absent).
fn counter(line: &str, key: &str) -> u64 {
    line.split(key)
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}
