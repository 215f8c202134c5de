//! The fuzz targets' seed corpora (`fuzz/seeds/<target>/`), kept in step with the code.
//!
//! Each crate's tests build its seeds from its own fixtures (real, valid inputs: encoded
//! messages, recordings, configurations) and call [`sync`]. Normally that checks the
//! committed files are exactly those seeds, so a change to an encoder or a format that
//! leaves the seeds stale fails a test; with `NCP_WRITE_FUZZ_SEEDS=1` it rewrites them.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// The environment variable that makes [`sync`] rewrite the seeds instead of checking them.
pub const WRITE_VAR: &str = "NCP_WRITE_FUZZ_SEEDS";

/// Checks (or, with [`WRITE_VAR`] set, writes) `fuzz/seeds/<target>/` to hold exactly
/// `seeds`, as (file name, contents). Panics with what differs: it is a test helper.
pub fn sync(target: &str, seeds: &[(String, Vec<u8>)]) {
    let dir = seeds_dir(target);
    let wanted: BTreeMap<&str, &[u8]> = seeds
        .iter()
        .map(|(name, bytes)| (name.as_str(), bytes.as_slice()))
        .collect();
    assert_eq!(
        wanted.len(),
        seeds.len(),
        "two seeds of {target} share a name"
    );
    if std::env::var(WRITE_VAR).is_ok_and(|v| v == "1") {
        if dir.exists() {
            std::fs::remove_dir_all(&dir).expect("removing the old seeds");
        }
        std::fs::create_dir_all(&dir).expect("creating the seed directory");
        for (name, bytes) in &wanted {
            std::fs::write(dir.join(name), bytes).expect("writing a seed");
        }
    }
    let mut present = BTreeMap::new();
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}; write the seeds with {WRITE_VAR}=1", dir.display()));
    for entry in entries {
        let entry = entry.expect("reading the seed directory");
        let name = entry.file_name().to_string_lossy().into_owned();
        present.insert(name, std::fs::read(entry.path()).expect("reading a seed"));
    }
    let present: BTreeMap<&str, &[u8]> = present
        .iter()
        .map(|(name, bytes)| (name.as_str(), bytes.as_slice()))
        .collect();
    assert!(
        present == wanted,
        "{} is stale (files {:?}, expected {:?}); rewrite it with {WRITE_VAR}=1",
        dir.display(),
        present.keys().collect::<Vec<_>>(),
        wanted.keys().collect::<Vec<_>>()
    );
}

fn seeds_dir(target: &str) -> PathBuf {
    // This crate sits at the repository root's `testbed/`.
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("fuzz")
        .join("seeds")
        .join(target)
}
