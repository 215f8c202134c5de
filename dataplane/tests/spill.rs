//! Privileged tests of spilling on the paper's test bed, in both data planes: a replica
//! that stops reading for far longer than its memory budget lasts is fed from its on-disk
//! spool once it reads again and ends with exactly the primary's bytes, not detached;
//! with a spill budget too small it is detached and marked diverged.
//!
//! Needs root and Open vSwitch (skipped without them; `CI=true` turns a skip into a
//! failure). Run one test binary at a time (the bed's names are fixed):
//! `flock /tmp/ncp-privileged.lock cargo test -p ncp-dataplane --test spill -- --test-threads=1`.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed step should fail the test"
)]

mod support;

use support::{scenarios, scene::Mode};

#[test]
fn xdp_a_stalled_replica_spills_and_catches_up_with_every_byte() {
    scenarios::a_stalled_replica_spills_and_catches_up_with_every_byte(
        Mode::Xdp,
        "nsx1",
        0x5eed_5001,
    );
}

#[test]
fn sockets_a_stalled_replica_spills_and_catches_up_with_every_byte() {
    scenarios::a_stalled_replica_spills_and_catches_up_with_every_byte(
        Mode::Sockets,
        "nss1",
        0x5eed_5002,
    );
}

#[test]
fn xdp_a_replica_beyond_its_spill_budget_is_detached_and_diverged() {
    scenarios::a_replica_beyond_its_spill_budget_is_detached_and_diverged(
        Mode::Xdp,
        "nsx2",
        0x5eed_5003,
    );
}

#[test]
fn sockets_a_replica_beyond_its_spill_budget_is_detached_and_diverged() {
    scenarios::a_replica_beyond_its_spill_budget_is_detached_and_diverged(
        Mode::Sockets,
        "nss2",
        0x5eed_5004,
    );
}
