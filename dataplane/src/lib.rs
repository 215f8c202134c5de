//! The NCP middlebox data plane.
//!
//! ```text
//!                     ┌──────────────── config, rules (validated, no I/O) ───────────────┐
//!  ncp-middlebox run ─┤ runtime: starts one data plane and the control socket (control) │
//!                     └──────────────┬─────────────────────────────────┬─────────────────┘
//!                  XDP mode          │                                 │   sockets mode
//!   xdp::steering   XDP program + maps                                 │   sockets: mio loop over
//!   xdp::xsk        AF_XDP socket, UMEM                                │   kernel TCP sockets
//!   xdp::device     Ethernet over it          ┐                        │   (nftables redirect)
//!   xdp::handover   frames to their worker    │ device layers          │
//!   xdp::layers     taps, fault injection     ┘ (smoltcp phy style)    │
//!   engine          smoltcp TCP, 4-tuple dispatch                      │
//!   xdp::transport  engines as a driver Transport ──┐          ┌───────┘
//!   xdp::worker     pinned per-queue threads         ▼          ▼
//!                                         driver: the sans-IO replication core
//!                                         (ncp_replication) carried out once, over
//!                                         any Transport; stats; recording hooks
//!                                                   │
//!                                         offline: pcapng recorder, reader, replay
//! ```
//!
//! - [`xdp`]: everything of the kernel-bypass data plane below the driver;
//! - [`engine`]: a worker's TCP engine (smoltcp in any-IP mode) over a device stack;
//! - [`driver`]: the replication core carried out over any transport, written once;
//! - [`sockets`]: the kernel-socket data plane (the paper's own design, and the baseline);
//! - [`offline`]: recording sessions to pcapng files and replaying them (offline mode);
//! - [`control`]: the control socket used by `stats` and `rule`;
//! - [`config`] and [`rules`]: the operator's configuration, validated without I/O;
//! - [`frame`]: building Ethernet/IPv4/TCP frames (packet generator and tests) over the
//!   one packet view, `ncp_common::wire`;
//! - [`kernel_pktgen`]: driving the kernel's pktgen module where it is loaded;
//! - [`sys`]: every raw system call, behind safe wrappers;
//! - [`runtime`]: `ncp-middlebox run`, tying the above together.

pub mod config;
pub mod control;
pub mod credentials;
pub mod driver;
pub mod engine;
pub mod frame;
pub mod kernel_pktgen;
pub mod offline;
pub mod rules;
pub mod runtime;
pub mod sockets;
pub mod sys;
pub mod xdp;
