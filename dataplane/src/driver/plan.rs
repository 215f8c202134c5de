//! One configured service as a driver carries it out.

use std::{net::SocketAddrV4, path::PathBuf};

use ncp_replication::{ManagerConfig, SessionConfig};

use super::ConsistencyBook;
use crate::{
    config::{Config, ServiceConfig},
    offline::recorder::RecordHandle,
    rules::Ipv4Prefix,
};

/// One configured service as a worker uses it; `R` is how its replicas are reached
/// ([`super::Transport::Route`]).
#[derive(Clone, Debug)]
pub struct ServicePlan<R> {
    /// Name for logs and stats.
    pub name: String,
    /// The endpoint clients address; the primary is connected to there.
    pub primary: SocketAddrV4,
    /// Clients whose connections are replicated; others are reset.
    pub clients: Ipv4Prefix,
    /// Replica endpoints, by replica index.
    pub replicas: Vec<SocketAddrV4>,
    /// The core's per-session configuration.
    pub session: SessionConfig,
    /// How the replicas are reached.
    pub replica_route: R,
    /// Local port the clients' connections arrive on (the primary's in XDP mode, the
    /// listener's in sockets mode).
    pub listen_port: u16,
    /// The service's recorder, if it records its sessions (shared by all workers).
    pub record: Option<RecordHandle>,
    /// Where its replicas' consistency is kept (one book shared by all workers).
    pub consistency: ConsistencyBook,
    /// Where replicas that fall behind their memory budget spill (`None`: they are
    /// detached instead); the budget is the session's `spill_budget_bytes`.
    pub spill_dir: Option<PathBuf>,
}

impl<R> ServicePlan<R> {
    /// The plan for `service`, with replicas reached through `replica_route` and clients
    /// arriving on the primary's port. Without a recorder: the runtime hands out the
    /// service's recorder when it starts one (checking a configuration starts none); with
    /// a book of its own, which the runtime replaces with the one all workers share.
    pub fn new(service: &ServiceConfig, replica_route: R) -> Self {
        let mut session = service.session_config();
        // The configuration was validated with the files read; if one changed since, the
        // replicas without a readable secret fail their login (and say why) instead.
        session.start = service.start_spec().unwrap_or_else(|e| {
            tracing::error!(service = %service.name, error = %e, "replica credentials unreadable");
            service.protocol.map(|p| {
                std::sync::Arc::new(ncp_replication::start::StartConfig {
                    protocol: p.into(),
                    replicas: Vec::new(),
                })
            })
        });
        Self {
            name: service.name.clone(),
            primary: service.primary,
            clients: service.clients,
            replicas: service.replicas.clone(),
            session,
            replica_route,
            listen_port: service.primary.port(),
            record: None,
            consistency: ConsistencyBook::default(),
            spill_dir: service.spill_dir.clone(),
        }
    }
}

/// The manager limits of one worker, from the configuration's `[limits]`.
pub fn manager_config(config: &Config) -> ManagerConfig {
    ManagerConfig {
        max_sessions: config.limits.max_sessions,
        max_memory_bytes: config.limits.max_buffer_bytes,
        ..ManagerConfig::default()
    }
}
