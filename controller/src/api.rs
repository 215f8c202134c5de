//! REST API (axum) over the [`Service`]. Every route but `/v1/health` needs
//! `Authorization: Bearer <token>`; the token is compared in constant time.
//!
//! | method | path                      | body / answer                         |
//! |--------|---------------------------|---------------------------------------|
//! | GET    | /v1/health                | `ok`                                  |
//! | GET    | /v1/replications          | `[ReplicationStatus]`                 |
//! | POST   | /v1/replications          | `ReplicationSpec` → 201, 409 if taken |
//! | DELETE | /v1/replications/{id}     | 204 / 404                             |
//! | GET    | /v1/hosts                 | `[HostSpec]`                          |
//! | PUT    | /v1/hosts                 | `HostSpec` (pin or move) → 204        |
//! | DELETE | /v1/hosts/{ip}            | 204 / 404                             |
//! | GET    | /v1/topology              | `TopologyView`                        |
//! | POST   | /v1/reconcile             | `ReconcileSummary` (runs now)         |

use std::net::Ipv4Addr;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};

use crate::service::Service;
use crate::store::{HostSpec, ReplicationSpec, StoreError};

#[derive(Clone)]
struct AppState {
    svc: Service,
    token: Arc<str>,
}

/// The API router. `token` must be non-empty.
pub fn router(svc: Service, token: &str) -> Router {
    let state = AppState {
        svc,
        token: Arc::from(token),
    };
    let protected = Router::new()
        .route(
            "/v1/replications",
            get(list_replications).post(add_replication),
        )
        .route("/v1/replications/{id}", delete(delete_replication))
        .route("/v1/hosts", get(list_hosts).put(put_host))
        .route("/v1/hosts/{ip}", delete(delete_host))
        .route("/v1/topology", get(topology))
        .route("/v1/reconcile", post(reconcile))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/v1/health", get(|| async { "ok" }))
        .merge(protected)
        .with_state(state)
}

/// Equal-length comparison whose time does not depend on where the bytes differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_token(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if !st.token.is_empty() && same_secret(t.as_bytes(), st.token.as_bytes()) => {
            next.run(req).await
        }
        _ => (
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

async fn add_replication(
    State(st): State<AppState>,
    Json(spec): Json<ReplicationSpec>,
) -> Response {
    let id = spec.id;
    let added = st.svc.update(|d| {
        if d.replications.iter().any(|r| r.id == id) {
            return false;
        }
        d.replications.push(spec);
        true
    });
    match added {
        Ok(true) => StatusCode::CREATED.into_response(),
        Ok(false) => (StatusCode::CONFLICT, format!("replication {id} exists\n")).into_response(),
        Err(e) => bad_request(e),
    }
}

async fn delete_replication(State(st): State<AppState>, Path(id): Path<u32>) -> Response {
    let removed = st.svc.update(|d| {
        let before = d.replications.len();
        d.replications.retain(|r| r.id != id);
        before != d.replications.len()
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

async fn put_host(State(st): State<AppState>, Json(host): Json<HostSpec>) -> Response {
    let done = st.svc.update(|d| {
        d.hosts.retain(|h| h.ip != host.ip);
        d.hosts.push(host);
    });
    match done {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => bad_request(e),
    }
}

async fn delete_host(State(st): State<AppState>, Path(ip): Path<Ipv4Addr>) -> Response {
    let removed = st.svc.update(|d| {
        let before = d.hosts.len();
        d.hosts.retain(|h| h.ip != ip);
        before != d.hosts.len()
    });
    match removed {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => StatusCode::NOT_FOUND.into_response(),
        Err(e) => bad_request(e),
    }
}

async fn topology(State(st): State<AppState>) -> Response {
    Json(st.svc.topology()).into_response()
}

async fn reconcile(State(st): State<AppState>) -> Response {
    Json(st.svc.reconcile_now().await).into_response()
}

#[cfg(test)]
mod tests {
    use super::same_secret;

    #[test]
    fn secret_comparison() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
    }
}
