//! Privileged tests of the replicas' consistency state on the paper's test bed, in both
//! data planes: a Redis replica written to behind the middlebox's back is found diverged
//! by its answers, and an operator's reset puts it back in step.
//!
//! Needs root, Open vSwitch, redis-server and redis-cli (skipped without them; `CI=true`
//! turns a skip into a failure). Run one test binary at a time (the bed's names are
//! fixed): `cargo test -p ncp-dataplane --test consistency -- --test-threads=1`.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed step should fail the test"
)]

mod support;

use support::{scenarios, scene::Mode};

#[test]
fn xdp_a_replica_written_behind_the_middlebox_is_found_diverged_by_its_answers() {
    scenarios::a_replica_written_behind_the_middlebox_is_found_diverged_by_its_answers(
        Mode::Xdp,
        "ncx1",
        0x5eed_c001,
    );
}

#[test]
fn sockets_a_replica_written_behind_the_middlebox_is_found_diverged_by_its_answers() {
    scenarios::a_replica_written_behind_the_middlebox_is_found_diverged_by_its_answers(
        Mode::Sockets,
        "ncs1",
        0x5eed_c002,
    );
}
