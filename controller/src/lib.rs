//! NCP controller (issue 4): an OpenFlow 1.3 controller that plans and installs the
//! redirection rules of the NCP replication service.
//!
//! Layers, each usable on its own:
//! - [`openflow`]: sans-IO codec for the OpenFlow 1.3 messages in use;
//! - [`topology`] and [`planner`]: pure route and rule computation;
//! - [`reconcile`]: pure diff of desired rules against what a switch reports;
//! - [`switch`]: tokio glue that keeps switch connections alive.

pub mod api;
pub mod client;
pub mod discovery;
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
