//! The NCP middlebox data plane.
//!
//! - [`steering`]: the XDP program and its maps (which frames reach the workers);
//! - [`xsk`]: one AF_XDP socket and its UMEM;
//! - [`sys`]: every raw system call, behind safe wrappers;
//! - [`device`]: a smoltcp device over that socket, doing Ethernet itself;
//! - [`layers`]: device layers stacked on it (taps, fault injection);
//! - [`handover`]: which worker owns a frame, the queues between workers, and the device
//!   layer that uses them;
//! - [`engine`]: a worker's TCP engine (smoltcp in any-IP mode) over such a device;
//! - [`driver`]: the replication core carried out over any transport, once;
//! - [`replicator`]: XDP mode's transport (a worker's TCP engines) for the driver;
//! - [`neighbours`]: upstream next hops resolved through the kernel's neighbour table;
//! - [`worker`]: per-queue worker threads pinned to cores;
//! - [`control`]: the control socket used by `stats` and `rule`;
//! - [`config`] and [`rules`]: the operator's configuration, validated without I/O;
//! - [`frame`]: building Ethernet/IPv4/TCP frames (packet generator and tests);
//! - [`kernel_pktgen`]: driving the kernel's pktgen module where it is loaded;
//! - [`offline`]: recording sessions to pcapng files and replaying them (offline mode);
//! - [`runtime`]: `ncp-middlebox run`, tying the above together.

pub mod config;
pub mod control;
pub mod device;
pub mod driver;
pub mod engine;
pub mod frame;
pub mod handover;
pub mod kernel_pktgen;
pub mod layers;
pub mod neighbours;
pub mod offline;
pub mod replicator;
pub mod rules;
pub mod runtime;
pub mod sockets;
pub mod steering;
pub mod sys;
pub mod worker;
pub mod xsk;
