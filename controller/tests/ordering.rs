//! Ordering between the middlebox and the switches, on Open vSwitch with the tree test
//! bed and a fake middlebox control socket: the redirect goes in only after the
//! middlebox acknowledged the service it steers to (until then the status says what it
//! waits for), and a deleted replication's service leaves the middlebox's list only
//! after its redirect is off the switch.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{TreeScene, call, tree_scene, wait_for};
use ncp_controller::rules::{PRIORITY_REDIRECT, RuleKind, cookie};
use serde_json::json;

const PREFIX: &str = "nc4o";

/// A `services-set` the fake middlebox received: whether it held replication 1's
/// service, and whether replication 1's redirect was on the switch at that moment.
#[derive(Debug, Clone, Copy)]
struct Seen {
    has_r1: bool,
    redirect_on: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_follows_the_service_and_the_service_outlives_the_redirect() {
    let tools = ["ovs-ofctl"];
    let Some(scene) = tree_scene("controller ordering", &tools, PREFIX, |_| {}).await else {
        return;
    };
    let TreeScene { api, bed, .. } = &scene;
    common::pin_all(api, bed).await;
    let agg1 = bed.bridge("agg1").expect("bridge");
    let redirect = format!("cookie={:#x}", cookie(RuleKind::Flow, 1));
    let priority = format!("priority={PRIORITY_REDIRECT}");
    let redirect_on = move || {
        common::dump_flows(&agg1)
            .iter()
            .any(|l| l.contains(&redirect) && l.contains(&priority))
    };

    // The fake middlebox answers every request but holds back its answer to service
    // lists until told.
    let ack = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let dir = common::temp_state("ordering-mb");
    let dir = dir.parent().expect("dir").to_path_buf();
    let control = {
        let (ack, seen, redirect_on) = (ack.clone(), seen.clone(), redirect_on.clone());
        common::fake_control_socket(&dir, "mb", move |line| {
            if line.starts_with("{\"cmd\":\"services-set\"") {
                let s = Seen {
                    has_r1: line.contains("\"name\":\"r1\""),
                    redirect_on: tokio::task::block_in_place(&redirect_on),
                };
                seen.lock().expect("lock").push(s);
                if !ack.load(Ordering::SeqCst) {
                    return None;
                }
            }
            Some("{\"result\":\"done\"}".to_string())
        })
    };
    let mb = bed.address("h31", "eth0").expect("address").to_string();
    let r = call(
        api,
        "PUT",
        &format!("/v1/middleboxes/{mb}"),
        Some(json!({ "control": control }).to_string()),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    common::add_replication(api, &common::h11_to_h21_via_h31(bed)).await;

    // No acknowledgement, no redirect: the status says what it waits for.
    let waiting = format!("waiting for middlebox {mb} to acknowledge");
    common::wait_not_installed(api, 1, &waiting, Duration::from_secs(15)).await;
    wait_for(
        Duration::from_secs(10),
        "a service list with r1 sent",
        || async {
            seen.lock()
                .expect("lock")
                .iter()
                .any(|s| s.has_r1)
                .then_some(())
        },
    )
    .await;
    assert!(
        !tokio::task::block_in_place(&redirect_on),
        "redirect before the ack"
    );

    // The middlebox acknowledges: the redirect goes in.
    ack.store(true, Ordering::SeqCst);
    common::wait_installed(api, 1, true, Duration::from_secs(15)).await;
    assert!(tokio::task::block_in_place(&redirect_on));

    // Deleted: the list without r1 reaches the middlebox only once the redirect is gone.
    let before = seen.lock().expect("lock").len();
    let path = "/v1/replications/1";
    assert_eq!(common::status(api, "DELETE", path).await, 204);
    let (first_without, _) = wait_for(Duration::from_secs(15), "a list without r1", || async {
        seen.lock()
            .expect("lock")
            .iter()
            .skip(before)
            .find(|s| !s.has_r1)
            .copied()
    })
    .await;
    assert!(
        !first_without.redirect_on,
        "service removed while its redirect was on"
    );
    assert!(!tokio::task::block_in_place(&redirect_on));
    let _ = std::fs::remove_dir_all(&dir);
}
