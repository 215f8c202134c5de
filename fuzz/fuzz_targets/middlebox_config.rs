//! The middlebox's TOML configuration (`ncp_dataplane::config`).
//!
//! Properties: no panic; a configuration that validates keeps its promises to the code
//! that runs it (every rule, the implied ones included, validates, and every service's
//! session configuration validates); and it survives a round trip: written back as TOML
//! it parses to the same configuration, which validates again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ncp_dataplane::config::Config;

/// Cores the fuzzed configurations may pin workers to (fixed, so runs are repeatable).
const CORES: usize = 4;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = toml::from_str::<Config>(text) else {
        return;
    };
    if config.validate(CORES).is_err() {
        return;
    }
    for rule in config.all_rules() {
        assert!(
            rule.validate().is_ok(),
            "validated config implies invalid rule {rule}"
        );
    }
    for service in &config.services {
        assert!(service.session_config().validate().is_ok());
    }
    let written = toml::to_string(&config)
        .unwrap_or_else(|e| panic!("a valid configuration cannot be written back: {e}"));
    let again: Config = toml::from_str(&written)
        .unwrap_or_else(|e| panic!("written configuration does not parse: {e}\n{written}"));
    assert_eq!(
        again, config,
        "TOML round trip changed the configuration:\n{written}"
    );
    assert!(again.validate(CORES).is_ok());
});
