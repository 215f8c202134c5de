//! NCP controller (issue 4): an OpenFlow 1.3 controller that plans and installs the
//! redirection rules of the NCP replication service.
//!
//! Layers, each usable on its own:
//! - [`openflow`]: sans-IO codec for the OpenFlow 1.3 messages in use;
//! - [`topology`] and [`planner`]: pure route and rule computation;
//! - [`reconcile`]: pure diff of desired rules against what a switch reports;
//! - [`rules`]: the rule value and the ownership cookie shared by all of the above;
//! - [`switch`]: sans-IO session plus tokio glue that keeps switch connections alive;
//! - [`lldp`] and [`discovery`]: link discovery with LLDP probes;
//! - [`installer`]: phased, barrier-confirmed application of reconciler diffs;
//! - [`store`], [`service`], [`api`], [`client`]: desired state on disk, the running
//!   controller, its REST API and the client `ncpctl` uses.
//!
//! Binaries: `ncpd` (the controller daemon) and `ncpctl` (its command-line client).

pub mod api;
pub mod client;
pub mod discovery;
pub mod health;
pub mod hosts;
pub mod installer;
pub mod lldp;
pub mod openflow;
pub mod planner;
pub mod reconcile;
pub mod rules;
pub mod service;
pub mod store;
pub mod switch;
pub mod topology;
