//! The REST API's request bodies (`ncp_controller::api`) and the state file they end up
//! in (`ncp_controller::store`).
//!
//! The first byte picks the body: a replication (`POST /v1/replications`), a pinned host
//! (`PUT /v1/hosts`), a middlebox (`PUT /v1/middleboxes/{ip}`), or a whole desired state
//! (the state file). The rest is the JSON, parsed with serde_json as axum's `Json`
//! extractor does. Properties: no panic; a body accepted by validation converts into the
//! planner's types (the store promises that everything stored converts), and it survives
//! a JSON round trip unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ncp_controller::store::{DesiredState, HostSpec, MiddleboxSpec, ReplicationSpec};

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    let state = match kind % 4 {
        0 => parse::<ReplicationSpec>(body).map(|r| DesiredState {
            replications: vec![r],
            ..DesiredState::default()
        }),
        1 => parse::<HostSpec>(body).map(|h| DesiredState {
            hosts: vec![h],
            ..DesiredState::default()
        }),
        2 => parse::<MiddleboxSpec>(body).map(|m| DesiredState {
            middleboxes: vec![m],
            ..DesiredState::default()
        }),
        _ => parse::<DesiredState>(body),
    };
    let Some(state) = state else {
        return;
    };
    if state.validate().is_err() {
        return;
    }
    assert_eq!(
        state.hosts().len(),
        state.hosts.len(),
        "a valid host does not convert"
    );
    assert_eq!(
        state.replications().len(),
        state.replications.len(),
        "a valid replication does not convert"
    );
    for m in &state.middleboxes {
        assert!(m.control_addr().is_ok());
    }
    let again = parse::<DesiredState>(&serde_json::to_vec(&state).expect("serializable"))
        .expect("what was written parses");
    assert_eq!(again, state, "JSON round trip changed the state");
});

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Option<T> {
    serde_json::from_slice(body).ok()
}
