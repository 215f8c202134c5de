//! Shared by the integration tests that bring up the test bed.

use ncp_testbed::Testbed;

/// Name prefix of everything these tests create (bridges, namespaces, veths).
pub const PREFIX: &str = "ncpc";

/// The three-level tree topology of the test bed.
pub const TREE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../testbed/tree.toml");

/// Takes the test bed down when dropped, also when an assertion fails.
pub struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Err(e) = Testbed::down(PREFIX) {
            eprintln!("cleanup of test bed {PREFIX} failed: {e}");
        }
    }
}
