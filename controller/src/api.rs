//! REST API (axum) over the [`Service`]. Every route but `/v1/health` needs
//! `Authorization: Bearer <token>`; tokens are compared in constant time, and a missing
//! or wrong token gets 401 before any handler runs, so it changes nothing. Each token has
//! a name ([`router_with_tokens`]); every change is logged and kept in the audit log with
//! the name of the caller who made it.
//!
//! Bodies are JSON of at most [`MAX_BODY`] bytes. A body that is not JSON gets 400, one
//! with a missing field or a field of the wrong type gets 422 naming the field (e.g.
//! `primary_port: invalid type: string "http", expected u16`), a value that parses but is
//! not valid (a prefix length of 40) gets 400 naming what is wrong.
//!
//! | method | path                      | body / answer                         |
//! |--------|---------------------------|---------------------------------------|
//! | GET    | /v1/health                | `ok`                                  |
//! | GET    | /v1/replications          | `[ReplicationStatus]`                 |
//! | POST   | /v1/replications          | `ReplicationSpec` → 201 `{id, middlebox_service}`, 409 if taken |
//! | DELETE | /v1/replications/{id}     | 204 / 404                             |
//! | GET    | /v1/hosts                 | `[HostSpec]`                          |
//! | PUT    | /v1/hosts                 | `HostSpec` (pin or move) → 204        |
//! | DELETE | /v1/hosts/{ip}            | 204 / 404                             |
//! | GET    | /v1/middleboxes           | `[MiddleboxStatus]` (push status)     |
//! | PUT    | /v1/middleboxes/{ip}      | `MiddleboxBody` → 201 new / 204 replaced |
//! | DELETE | /v1/middleboxes/{ip}      | 204 / 404                             |
//! | GET    | /v1/topology              | `TopologyView`                        |
//! | POST   | /v1/reconcile             | `ReconcileSummary` (runs now)         |
//! | GET    | /v1/audit                 | `[AuditEntry]` (who changed what)     |
//! | GET    | /v1/metrics               | `Metrics` (flow-mods sent, ...)       |
//! | POST   | /v1/replications/{id}/replicas/{ip:port}/reset | 200 `ResetDone`; 404 unknown replication or replica, 409 middlebox not registered, 502 middlebox unreachable or refused |
//! | GET    | /metrics                  | Prometheus / OpenMetrics text ([`crate::metrics`]) |
//!
//! A `ReplicationSpec` may carry `"verify":"replies"` (default `"off"`, left out when off):
//! its middlebox then compares the replicas' answers with the primary's.
//!
//! Each replication's status lists its replicas' consistency (`in-step`, `diverged` since
//! when and why, or `unknown`; see [`crate::consistency`]). A reset tells the middlebox
//! the replica is in step again and stops the controller's fail-open and withdrawal
//! windows from counting for it; it is audited under the caller's name. `/metrics` needs
//! the token like every other route (Prometheus sends it with `authorization:
//! credentials_file:` in its scrape config).
//!
//! A replication whose middlebox is registered (`/v1/middleboxes`) is also pushed to that
//! middlebox as a service (see [`crate::middlebox`]); the others get redirection rules
//! only, and their `middlebox_service` says so ([`crate::middlebox::NOT_REGISTERED`]).
//! Registering a middlebox hands its service list to the controller: from then on it
//! runs exactly the replications naming it, an empty list included (services configured
//! on it by other means are replaced). Unregistering stops the pushes; it does not clear
//! the middlebox.

use std::net::Ipv4Addr;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Extension, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};

use crate::service::{ResetError, Service};
use crate::store::{DesiredState, HostSpec, MiddleboxSpec, ReplicationSpec, StoreError};

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

#[derive(Clone)]
struct AppState {
    svc: Service,
    /// (caller name, token)
    tokens: Arc<[(String, String)]>,
}

/// The authenticated caller's name.
#[derive(Clone)]
struct Caller(Arc<str>);

/// The API router with one token, whose caller is named `operator`.
pub fn router(svc: Service, token: &str) -> Router {
    router_with_tokens(svc, vec![("operator".to_string(), token.to_string())])
}

/// The API router; `tokens` are (caller name, token) pairs. Empty tokens never match.
pub fn router_with_tokens(svc: Service, tokens: Vec<(String, String)>) -> Router {
    let state = AppState {
        svc,
        tokens: Arc::from(tokens),
    };
    let protected = Router::new()
        .route(
            "/v1/replications",
            get(list_replications).post(add_replication),
        )
        .route("/v1/replications/{id}", delete(delete_replication))
        .route("/v1/hosts", get(list_hosts).put(put_host))
        .route("/v1/hosts/{ip}", delete(delete_host))
        .route("/v1/middleboxes", get(list_middleboxes))
        .route(
            "/v1/middleboxes/{ip}",
            put(put_middlebox).delete(delete_middlebox),
        )
        .route("/v1/topology", get(topology))
        .route("/v1/reconcile", post(reconcile))
        .route("/v1/audit", get(audit))
        .route("/v1/metrics", get(metrics))
        .route(
            "/v1/replications/{id}/replicas/{replica}/reset",
            post(reset_replica),
        )
        .route("/metrics", get(prometheus))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/v1/health", get(|| async { "ok" }))
        .merge(protected)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Equal-length comparison whose time does not depend on where the bytes differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The name of the caller whose token this is. Every token is compared, so the time
/// taken does not say which one matched.
fn caller_of(tokens: &[(String, String)], given: &str) -> Option<Arc<str>> {
    let mut found = None;
    for (name, token) in tokens {
        if !token.is_empty() && same_secret(given.as_bytes(), token.as_bytes()) {
            found = Some(Arc::from(name.as_str()));
        }
    }
    found
}

async fn require_token(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given.and_then(|t| caller_of(&st.tokens, t)) {
        Some(name) => {
            req.extensions_mut().insert(Caller(name));
            next.run(req).await
        }
        None => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "unauthorized\n",
        )
            .into_response(),
    }
}

fn bad_request(e: StoreError) -> Response {
    let status = match e {
        StoreError::Invalid { .. } => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (status, format!("{e}\n")).into_response()
}

async fn list_replications(State(st): State<AppState>) -> Response {
    Json(st.svc.status()).into_response()
}

/// A body that did not deserialize: the rejection's status (400 not JSON, 415 not
/// declared JSON, 413 too large, 422 wrong or missing field) and its text, which names the
/// field.
fn body_error(e: JsonRejection) -> Response {
    (
        e.status(),
        format!("invalid request body: {}\n", e.body_text()),
    )
        .into_response()
}

async fn add_replication(
    State(st): State<AppState>,
    Extension(Caller(who)): Extension<Caller>,
    body: Result<Json<ReplicationSpec>, JsonRejection>,
) -> Response {
    let spec = match body {
        Ok(Json(s)) => s,
        Err(e) => return body_error(e),
    };
    let id = spec.id;
    let middlebox = spec.middlebox;
    let added = st.svc.update(&who, |d| {
        if d.replications.iter().any(|r| r.id == id) {
            return (false, None);
        }
        let what = format!(
            "add replication {id}: {} -> {}:{} via {}",
            spec.source, spec.primary, spec.primary_port, spec.middlebox
        );
        d.replications.push(spec);
        (true, Some(what))
    });
    match added {
        Ok(true) => (
            StatusCode::CREATED,
            Json(Created {
                id,
                middlebox_service: st.svc.middlebox_service(middlebox),
            }),
        )
            .into_response(),
        Ok(false) => (StatusCode::CONFLICT, format!("replication {id} exists\n")).into_response(),
        Err(e) => bad_request(e),
    }
}

/// The answer to a new replication.
#[derive(serde::Serialize)]
struct Created {
    id: u32,
    /// [`crate::middlebox::NOT_REGISTERED`] or `push pending`.
    middlebox_service: String,
}

async fn delete_replication(
    State(st): State<AppState>,
    Extension(Caller(who)): Extension<Caller>,
    Path(id): Path<u32>,
) -> Response {
    let what = format!("delete replication {id}");
    remove(&st, &who, what, |d| &mut d.replications, |r| r.id == id)
}

/// Removes the entries `doomed` picks from one list of the desired state, recording `what`
/// if any went: 204 when something was removed, 404 when there was nothing to remove.
fn remove<T>(
    st: &AppState,
    who: &str,
    what: String,
    list: impl FnOnce(&mut DesiredState) -> &mut Vec<T>,
    doomed: impl Fn(&T) -> bool,
) -> Response {
    let removed = st.svc.update(who, |d| {
        let list = list(d);
        let before = list.len();
        list.retain(|e| !doomed(e));
        let gone = before != list.len();
        (gone, gone.then_some(what))
    });
    match removed {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => StatusCode::NOT_FOUND.into_response(),
        Err(e) => bad_request(e),
    }
}

async fn list_hosts(State(st): State<AppState>) -> Response {
    Json(st.svc.desired().hosts).into_response()
}

async fn put_host(
    State(st): State<AppState>,
    Extension(Caller(who)): Extension<Caller>,
    body: Result<Json<HostSpec>, JsonRejection>,
) -> Response {
    let host = match body {
        Ok(Json(h)) => h,
        Err(e) => return body_error(e),
    };
    let done = st.svc.update(&who, |d| {
        let what = format!(
            "pin host {} ({}) at {:#x}:{}",
            host.ip, host.mac, host.dpid, host.port
        );
        d.hosts.retain(|h| h.ip != host.ip);
        d.hosts.push(host);
        ((), Some(what))
    });
    match done {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => bad_request(e),
    }
}

async fn delete_host(
    State(st): State<AppState>,
    Extension(Caller(who)): Extension<Caller>,
    Path(ip): Path<Ipv4Addr>,
) -> Response {
    let what = format!("unpin host {ip}");
    remove(&st, &who, what, |d| &mut d.hosts, |h| h.ip == ip)
}

async fn list_middleboxes(State(st): State<AppState>) -> Response {
    Json(st.svc.middleboxes()).into_response()
}

/// `PUT /v1/middleboxes/{ip}` body: the address comes from the path (a body `ip`, if
/// given, must match it).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MiddleboxBody {
    #[serde(default)]
    ip: Option<Ipv4Addr>,
    control: String,
    #[serde(default)]
    replica_interface: Option<String>,
}

async fn put_middlebox(
    State(st): State<AppState>,
    Extension(Caller(who)): Extension<Caller>,
    Path(ip): Path<Ipv4Addr>,
    body: Result<Json<MiddleboxBody>, JsonRejection>,
) -> Response {
    let body = match body {
        Ok(Json(b)) => b,
        Err(e) => return body_error(e),
    };
    if let Some(other) = body.ip.filter(|b| *b != ip) {
        return bad_request(StoreError::Invalid {
            what: "middlebox ip",
            detail: format!("body says {other}, path says {ip}"),
        });
    }
    let spec = MiddleboxSpec {
        ip,
        control: body.control,
        replica_interface: body.replica_interface,
    };
    let done = st.svc.update(&who, |d| {
        let old = d.middleboxes.iter().position(|m| m.ip == ip);
        if old.is_some_and(|i| d.middleboxes[i] == spec) {
            return (false, None);
        }
        let what = format!(
            "register middlebox {ip} at {}{}",
            spec.control,
            spec.replica_interface
                .as_deref()
                .map(|i| format!(", replicas via {i}"))
                .unwrap_or_default()
        );
        match old {
            Some(i) => d.middleboxes[i] = spec,
            None => d.middleboxes.push(spec),
        }
        (old.is_none(), Some(what))
    });
    match done {
        Ok(true) => StatusCode::CREATED.into_response(),
        Ok(false) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => bad_request(e),
    }
}

async fn delete_middlebox(
    State(st): State<AppState>,
    Extension(Caller(who)): Extension<Caller>,
    Path(ip): Path<Ipv4Addr>,
) -> Response {
    let what = format!("unregister middlebox {ip}");
    remove(&st, &who, what, |d| &mut d.middleboxes, |m| m.ip == ip)
}

async fn topology(State(st): State<AppState>) -> Response {
    Json(st.svc.topology()).into_response()
}

async fn reconcile(State(st): State<AppState>) -> Response {
    Json(st.svc.reconcile_now().await).into_response()
}

async fn audit(State(st): State<AppState>) -> Response {
    Json(st.svc.audit()).into_response()
}

async fn metrics(State(st): State<AppState>) -> Response {
    Json(st.svc.metrics()).into_response()
}

async fn reset_replica(
    State(st): State<AppState>,
    Extension(Caller(who)): Extension<Caller>,
    Path((id, replica)): Path<(u32, String)>,
) -> Response {
    let Ok(replica) = replica.parse::<std::net::SocketAddrV4>() else {
        return (
            StatusCode::BAD_REQUEST,
            format!("replica must be ip:port, not {replica:?}\n"),
        )
            .into_response();
    };
    match st.svc.reset_replica(&who, id, replica).await {
        Ok(done) => Json(done).into_response(),
        Err(e) => {
            let status = match e {
                ResetError::NoReplication(_) | ResetError::NoReplica { .. } => {
                    StatusCode::NOT_FOUND
                }
                ResetError::NotRegistered(_) => StatusCode::CONFLICT,
                ResetError::Middlebox { .. } => StatusCode::BAD_GATEWAY,
            };
            (status, format!("{e}\n")).into_response()
        }
    }
}

async fn prometheus(State(st): State<AppState>) -> Response {
    let text = crate::metrics::render(&st.svc.metrics_snapshot());
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response()
}

#[cfg(test)]
mod tests {
    use super::{caller_of, same_secret};

    #[test]
    fn secret_comparison() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
    }

    #[test]
    fn callers_are_named_by_their_token() {
        let tokens = vec![
            ("alice".to_string(), "t-alice".to_string()),
            ("bob".to_string(), "t-bob".to_string()),
            ("nobody".to_string(), String::new()),
        ];
        assert_eq!(caller_of(&tokens, "t-bob").as_deref(), Some("bob"));
        assert_eq!(caller_of(&tokens, "t-alice").as_deref(), Some("alice"));
        assert_eq!(caller_of(&tokens, ""), None);
        assert_eq!(caller_of(&tokens, "t-carol"), None);
    }
}
