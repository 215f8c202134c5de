//! Privileged test of run-time service changes (what the controller pushes): a middlebox
//! started with no services is given one through its control socket, replicates a byte
//! stream to the primary and the replica, and drops it again when given an empty list.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed step should fail the test"
)]

mod support;

use support::{
    XdpMiddlebox,
    scene::{paper_bed, steer_to_middlebox, wait_listening},
};

use std::{
    path::Path,
    process::{Child, Command, Stdio},
};

use ncp_dataplane::{
    config::{SERVICE_RULE_ID_BASE, ServiceConfig},
    control::{self, Request, Response},
};
use ncp_testbed::{Testbed, workload};

const PREFIX: &str = "nsp";
const PORT: u16 = 7100;

/// The test bed and the middlebox (stopped with SIGTERM on drop), torn down on drop.
struct Scene {
    bed: Testbed,
    middlebox: Option<XdpMiddlebox>,
}

impl Drop for Scene {
    fn drop(&mut self) {
        drop(self.middlebox.take());
        let _ = Testbed::down(PREFIX);
        let _ = std::fs::remove_dir_all(format!("/tmp/ncp-{PREFIX}"));
    }
}

fn call(socket: &Path, request: Request) -> Response {
    control::call(socket, &request).unwrap()
}

/// Replaces the middlebox's service list.
fn set_services(socket: &Path, services: Vec<ServiceConfig>) -> Response {
    call(socket, Request::ServicesSet { services })
}

fn sha256_sink(bed: &Testbed, host: &str) -> Child {
    bed.command(
        host,
        &[
            "sh",
            "-c",
            &format!("socat -u TCP-LISTEN:{PORT},reuseaddr - | sha256sum"),
        ],
    )
    .unwrap()
    .stdout(Stdio::piped())
    .spawn()
    .unwrap()
}

#[test]
fn services_pushed_at_run_time_are_replicated_and_removable() {
    if !ncp_testbed::ready_or_skip("services push", &["socat", "sha256sum", "ss"]) {
        return;
    }
    let bed = paper_bed(PREFIX, 1);
    let mut scene = Scene {
        bed,
        middlebox: None,
    };
    let mb0 = scene.bed.address("middlebox", "eth0").unwrap();
    let mb1 = scene.bed.address("middlebox", "eth1").unwrap();
    let dir = format!("/tmp/ncp-{PREFIX}");
    std::fs::create_dir_all(&dir).unwrap();
    let socket = Path::new(&dir).join("mb.sock");
    let config = Path::new(&dir).join("mb.toml");
    std::fs::write(
        &config,
        format!(
            "control_socket = \"{}\"\n[[interfaces]]\nname = \"eth0\"\naddress = \"{mb0}\"\n\
             queues = [{{ queue = 0, core = 1 }}]\n[[interfaces]]\nname = \"eth1\"\naddress = \"{mb1}\"\n\
             queues = [{{ queue = 0, core = 1 }}]\n",
            socket.display()
        ),
    )
    .unwrap();
    scene.middlebox = Some(XdpMiddlebox::start_answering(&scene.bed, &config, &socket));
    assert_eq!(
        call(&socket, Request::Services),
        Response::Services { services: vec![] }
    );

    let source = scene.bed.address("source", "eth0").unwrap();
    let primary = scene.bed.address("primary", "eth0").unwrap();
    let replica = scene.bed.address("replica", "eth1").unwrap();
    let service: ServiceConfig = serde_json::from_value(serde_json::json!({
        "name": "r1",
        "primary": format!("{primary}:{PORT}"),
        "clients": format!("{source}/32"),
        "replicas": [format!("{replica}:{PORT}")],
        "replica_interface": "eth1",
    }))
    .unwrap();
    // A replica on the primary's host is refused (R4) and changes nothing.
    let mut bad = service.clone();
    bad.replicas = vec![format!("{primary}:9").parse().unwrap()];
    let refused = set_services(&socket, vec![bad]);
    assert!(
        matches!(&refused, Response::Error { message } if message.contains("R4")),
        "{refused:?}"
    );

    assert_eq!(set_services(&socket, vec![service.clone()]), Response::Done);
    assert_eq!(
        call(&socket, Request::Services),
        Response::Services {
            services: vec![service.clone()]
        }
    );
    // Pushing the same list again is a no-op.
    assert_eq!(set_services(&socket, vec![service.clone()]), Response::Done);
    match call(&socket, Request::Rules) {
        Response::Rules { rules } => assert!(
            rules
                .iter()
                .any(|r| r.id == SERVICE_RULE_ID_BASE && r.destination_port == PORT)
        ),
        other => panic!("{other:?}"),
    }

    // Real bytes through it: the source talks to the primary's address via the middlebox.
    steer_to_middlebox(&scene.bed, primary);
    let primary_sink = sha256_sink(&scene.bed, "primary");
    let replica_sink = sha256_sink(&scene.bed, "replica");
    wait_listening(&scene.bed, "primary", PORT);
    wait_listening(&scene.bed, "replica", PORT);
    let data = workload::seeded_bytes(0x5e41, 4 << 20);
    let file = Path::new(&dir).join("data.bin");
    std::fs::write(&file, &data).unwrap();
    let sent = scene
        .bed
        .exec(
            "source",
            &[
                "sh",
                "-c",
                &format!(
                    "socat -u FILE:{} TCP:{primary}:{PORT},connect-timeout=5",
                    file.display()
                ),
            ],
        )
        .unwrap();
    assert!(sent.status.success());
    let expected = String::from_utf8(
        Command::new("sha256sum")
            .arg(&file)
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let expected = expected.split_whitespace().next().unwrap().to_owned();
    for (what, sink) in [("primary", primary_sink), ("replica", replica_sink)] {
        let out = sink.wait_with_output().unwrap();
        let got = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            got.split_whitespace().next(),
            Some(expected.as_str()),
            "{what} received other bytes"
        );
    }

    // An empty list removes the service and its redirect rule.
    assert_eq!(set_services(&socket, vec![]), Response::Done);
    match call(&socket, Request::Rules) {
        Response::Rules { rules } => assert!(
            rules.iter().all(|r| r.id < SERVICE_RULE_ID_BASE),
            "{rules:?}"
        ),
        other => panic!("{other:?}"),
    }
}
