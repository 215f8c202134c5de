//! NCP test bed: hosts as network namespaces, switches as Open vSwitch bridges (userspace
//! datapath), joined by veth pairs, all described by a TOML topology file.
//!
//! ```no_run
//! use ncp_testbed::{Testbed, Topology, UpOptions};
//!
//! # fn main() -> ncp_testbed::Result<()> {
//! let topology = Topology::load("testbed/paper.toml")?;
//! let bed = Testbed::up(&topology, &UpOptions::with_prefix("demo"))?;
//! let primary = bed.address("primary", "eth0")?.to_string();
//! bed.exec("source", &["ping", "-c", "1", &primary])?;
//! println!("port of primary on prod: {}", bed.ofport("prod", "primary")?);
//! Testbed::down("demo")?;
//! # Ok(())
//! # }
//! ```
//!
//! Modules:
//! * [`topology`]: the file format, parsing and validation (pure).
//! * [`plan`]: names, port numbers and objects a topology yields under a prefix (pure).
//! * [`prometheus`]: a real Prometheus scraping ncpd, and its query API.
//! * [`fuzz_seeds`]: the fuzz targets' seed corpora, checked against the fixtures they
//!   come from.
//! * [`Testbed`]: `up`/`down` and accessors; runs `ip`, `ethtool`, `sysctl`, `ovs-vsctl`.
//! * [`require_privileges`] / [`ready_or_skip`]: machine checks and the test skip rule;
//!   [`serial()`]: the lock that makes a test binary's test beds take turns.
//!
//! Everything created is named `<prefix>-...`, so [`Testbed::down`] finds it by name even
//! after a crash. Progress is reported through `tracing` (`info` for each object created
//! or removed, `debug` for every command run).
//!
//! Bridges speak OpenFlow 1.3 only, so `ovs-ofctl` needs `-O OpenFlow13`.

pub mod cmd;
mod error;
pub mod fuzz_seeds;
pub mod netns;
mod ovs;
pub mod plan;
mod privileges;
pub mod prometheus;
mod serial;
pub mod servers;
mod state;
#[cfg(test)]
mod test_toml;
mod testbed;
pub mod topology;
pub mod workload;

pub use error::{Error, Result};
pub use netns::Netns;
pub use plan::{DEFAULT_PREFIX, Plan};
pub use privileges::{Missing, REQUIRED_TOOLS, ready_or_skip, require_privileges, require_tools};
pub use serial::serial;
pub use state::{OvsSsl, STATE_DIR};
pub use testbed::{DownReport, Testbed, UpOptions, create_namespace};
pub use topology::{Mac, Topology};
