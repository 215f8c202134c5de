//! NCP controller (issue 4): an OpenFlow 1.3 controller that plans and installs the
//! redirection rules of the NCP replication service.
//!
//! Layers, each usable on its own:
//! - [`openflow`]: sans-IO codec for the OpenFlow 1.3 messages in use;
//! - [`topology`] and [`planner`]: pure route and rule computation;
//! - [`reconcile`]: pure diff of desired rules against what a switch reports;
//! - [`rules`]: the rule value and the ownership cookie shared by all of the above;
//! - [`switch`]: sans-IO session plus tokio glue that keeps switch connections alive,
//!   OpenFlow over TLS with switch certificates ([`switch::tls`]) and the rule for two
//!   connections claiming one datapath id ([`switch::registry`]);
//! - [`pki`]: the CA and certificates `ncpctl pki` makes for that;
//! - [`lldp`] and [`discovery`]: link discovery with LLDP probes;
//! - [`installer`]: phased, barrier-confirmed application of reconciler diffs;
//! - [`store`], [`service`], [`api`], [`client`]: desired state on disk, the running
//!   controller, its REST API and the client `ncpctl` uses.
//!
//! - [`hosts`] and [`health`]: host learning from PACKET_INs, and middlebox health
//!   probes for fail-open.
//! - [`middlebox`]: the service lists pushed to registered middleboxes over their control
//!   sockets, so a replication created through the API configures its middlebox too.
//! - [`mbstats`] and [`consistency`]: each replica's consistency state, read from its
//!   middlebox and merged with the controller's fail-open and withdrawal windows;
//!   [`metrics`]: all of it, and the counters, for Prometheus.
//!
//! Binaries: `ncpd` (the controller daemon) and `ncpctl` (its command-line client).
//!
//! # How traffic is forwarded
//!
//! **Ordinary traffic** (everything NCP does not steer) is forwarded by each switch's
//! own learning switch: the lowest-priority rule is OpenFlow `NORMAL`. We chose this over
//! reactive, controller-computed paths because NCP steers a few selected flows and
//! should not put the controller in the path of every new connection: if the controller
//! is down, slow or restarting, ordinary traffic keeps flowing. (`--no-normal-fallback`
//! leaves forwarding to someone else's rules.)
//!
//! **Why the redirect sits on the path the traffic really takes.** The planner computes
//! the route to the primary and the route to the middlebox from one shortest-path tree
//! rooted at the source's switch and places the redirect on the last switch they share
//! (see [`planner`]). NCP supports loop-free switch topologies (the test bed's tree and
//! the paper's Fig. 5 are such): there, between two switches there is exactly one path,
//! so the path MAC learning forwards a packet on and the planner's path are the same,
//! and the redirect's switch is on it. The redirect matches the flow without an input
//! port, so it catches the flow whichever port it enters by. The end-to-end tests check
//! this with real TCP: the SYNs hit the route rules behind the redirect, and while the
//! redirect is in place a connection to the primary does not reach it. A topology with
//! loops would need spanning tree for `NORMAL`, whose tree may differ from the planner's;
//! it is not supported.
//!
//! **Rules on every switch**, by priority (all carry NCP's cookie, see [`rules`]):
//!
//! | priority | match | actions | purpose |
//! |---|---|---|---|
//! | 65000 | LLDP | controller | link discovery ([`discovery`]) |
//! | 60000 | ARP to [`health::PROBE_MAC`] | controller | health-probe replies |
//! | 40000 | the replicated flow | set MAC, (tag), output | redirect ([`planner`]) |
//! | 39500 | tunnel tag | (pop), output | tunnel hop (VLAN/MPLS mode) |
//! | 39000 | flow + in_port | output | route hop (rewrite mode) |
//! | 3 | in_port of a link / a known host's port, MAC, IPv4 source | NORMAL | known senders |
//! | 2 | ARP, IPv4 | controller (128 bytes), NORMAL | host learning ([`hosts`]) |
//! | 1 | any | NORMAL | ordinary traffic |
//!
//! **Hosts** are pinned by the operator (REST API) or learned from ARP and IPv4 at edge
//! ports (ports without an LLDP-discovered link); pins win. The priority-3 rules keep the
//! controller from seeing every packet: each known host, and all transit traffic, is
//! exempt from the copy to the controller, so only unknown or moved senders are seen. A
//! host seen at another edge port has moved: the plan is redone. A link lost (LLDP
//! expiry, PORT_STATUS) re-plans too. A port is believed to be an edge port only once
//! its switch and the topology have settled ([`settle`]); a host learned at a port that
//! turns out to carry a link is forgotten, and so is a host silent for the expiry time,
//! each re-planning what used it. A host that a replication names but nobody has seen
//! is asked for with ARP requests out of every edge port ([`search`]).
//!
//! **Resilience.** Every NCP rule asks for FLOW_REMOVED, so a rule deleted by hand is
//! put back at once; a switch that connects (a re-created bridge, a restarted
//! ovs-vswitchd) is read, diffed and completed; rules without NCP's cookie are never
//! deleted or overwritten; a restarted controller sends nothing for rules that are
//! already right (see [`service`]). Middleboxes are health-checked through OpenFlow and
//! bypassed while silent ([`health`]).

pub mod api;
pub mod client;
pub mod consistency;
pub mod discovery;
#[cfg(test)]
mod fake_switches;
pub mod health;
pub mod hosts;
pub mod installer;
pub mod lldp;
pub mod mbstats;
pub mod metrics;
pub mod middlebox;
pub mod openflow;
pub mod pki;
pub mod planner;
pub mod reconcile;
pub mod rules;
pub mod search;
pub mod service;
pub mod settle;
pub mod store;
pub mod switch;
pub mod token;
pub mod topology;
