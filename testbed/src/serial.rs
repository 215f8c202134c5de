//! Taking turns: test beds use fixed names, so the tests of one test binary that build
//! one must not run at the same time.

use std::sync::{Mutex, MutexGuard};

static SERIAL: Mutex<()> = Mutex::new(());

/// Takes the binary-wide one-test-bed-at-a-time lock (surviving an earlier test's panic)
/// and sets up test logging once, filtered by `RUST_LOG` or else by `default_filter`.
pub fn serial(default_filter: &str) -> MutexGuard<'static, ()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_test_writer()
        .try_init();
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
