//! A cluster node's request for a shard another node serves (the core answered
//! [`crate::error::Error::Elsewhere`]): sent on to that node as it came, and its
//! answer given back (or, with `cluster.redirect = true`, a 307 to it).
//!
//! A forwarded request carries `X-Kami-Forwarded` with a token only the cluster's
//! nodes can make ([`crate::core::cluster::ClusterNode::forward_token`]): the node
//! it reaches does not limit it again by address (the first node did, by the
//! buyer's), and never forwards it a second time (the shard moved meanwhile: the
//! answer is 503 `shard_moving`, and the client tries again).
//!
//! Every answer of a cluster node names the node that made it (`X-Kami-Node`).

use axum::body::Bytes;
use axum::http::{header, request::Parts, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::AppState;
use crate::core::cluster::ClusterNode;
use crate::domain::ShardId;
use crate::error::Error;

pub static FORWARDED: HeaderName = HeaderName::from_static("x-kami-forwarded");
pub static NODE: HeaderName = HeaderName::from_static("x-kami-node");
/// The address the client of a forwarded request connected from (trusted only
/// with the forwarding token): the node it reaches scopes Idempotency-Keys and
/// per-address limits by it, as the first node did.
pub static CLIENT: HeaderName = HeaderName::from_static("x-kami-client");

/// Most bytes of an owner's answer passed back (the largest answers are exports,
/// which name no shard and are never forwarded).
const MAX_ANSWER_BYTES: usize = 16 << 20;

/// What is needed to send a request again.
pub struct Replay {
    method: Method,
    path_and_query: String,
    headers: HeaderMap,
    body: Bytes,
    /// The address the client connected from.
    client: Option<std::net::IpAddr>,
}

impl Replay {
    pub fn of(parts: &Parts, body: Bytes) -> Replay {
        Replay {
            method: parts.method.clone(),
            path_and_query: parts.uri.path_and_query().map_or_else(|| parts.uri.path().to_string(), |p| p.to_string()),
            headers: parts.headers.clone(),
            body,
            client: parts.extensions.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.ip()),
        }
    }
}

/// For a request another node of the cluster forwarded: its client's address as
/// that node saw it (`X-Kami-Client`), put where the handlers and limits look for
/// the caller's address. Anyone else's `X-Kami-Client` is ignored.
pub fn adopt_client(st: &AppState, req: &mut axum::extract::Request) {
    if !forwarded(st, req.headers()) {
        return;
    }
    let client = req.headers().get(&CLIENT).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    if let Some(ip) = client {
        req.extensions_mut().insert(axum::extract::ConnectInfo(std::net::SocketAddr::new(ip, 0)));
    }
}

/// Whether `headers` carry this cluster's forwarding token.
pub fn forwarded(st: &AppState, headers: &HeaderMap) -> bool {
    let Some(cluster) = st.cluster() else { return false };
    headers
        .get(&FORWARDED)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|given| super::extract::secret_matches(given, &cluster.forward_token))
}

/// Headers that belong to one connection, not to the request or answer.
fn hop_by_hop(name: &HeaderName) -> bool {
    [
        header::HOST,
        header::CONNECTION,
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::TE,
        header::TRAILER,
        header::PROXY_AUTHORIZATION,
    ]
    .contains(name)
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// Sends `replay` on to the nodes serving `shards` in turn, or answers why it
/// cannot: the first answer other than 409 is given back. Several shards come
/// with an order that may go to any shard: the buyer hears `sold_out` only when
/// every node said so (or this one, `first`, and every other), and 503 when one
/// could not be asked.
pub async fn forward(
    cluster: &ClusterNode,
    shards: &[ShardId],
    replay: Replay,
    first: Response,
    st: &AppState,
) -> Response {
    if forwarded(st, &replay.headers) {
        // Sent here by another node, and the shard moved meanwhile (a 409 is this
        // node's own answer to give back: the first node asks the others).
        return match shards.first() {
            Some(shard) if first.status() != StatusCode::CONFLICT => {
                ApiError::from(Error::NoOwner(shard.clone())).into_response()
            }
            _ => first,
        };
    }
    let (mut last, mut unknown) = (first, None);
    let mut asked = std::collections::HashSet::new();
    for shard in shards {
        let owner = cluster.owner_elsewhere(shard).await;
        let answer = match owner {
            Ok((node, _)) if !asked.insert(node.clone()) => continue,
            Ok((node, address)) => send(cluster, shard, &replay, &node, &address).await,
            Err(e) => ApiError::from(e).into_response(),
        };
        match answer.status() {
            StatusCode::CONFLICT => last = answer,
            s if s.is_server_error() => unknown = Some(answer),
            _ => return answer,
        }
    }
    unknown.unwrap_or(last)
}

/// `replay` sent to `node` at `address` (or a 307 there), its answer given back.
async fn send(cluster: &ClusterNode, shard: &ShardId, replay: &Replay, node: &str, address: &str) -> Response {
    let target = format!("{address}{}", replay.path_and_query);
    if cluster.redirect {
        let body = serde_json::json!({"redirect": target, "node": node, "shard": shard.to_string()});
        let mut response = (StatusCode::TEMPORARY_REDIRECT, super::Json(body)).into_response();
        if let Ok(location) = HeaderValue::from_str(&target) {
            response.headers_mut().insert(header::LOCATION, location);
        }
        return response;
    }
    let mut request = cluster.http.request(replay.method.clone(), &target).body(replay.body.clone());
    for (name, value) in replay.headers.iter().filter(|(n, _)| !hop_by_hop(n) && **n != FORWARDED && **n != CLIENT) {
        request = request.header(name, value);
    }
    request = request.header(&FORWARDED, cluster.forward_token.as_str());
    if let Some(client) = replay.client {
        request = request.header(&CLIENT, client.to_string());
    }
    let answer = match request.send().await {
        Ok(answer) => answer,
        Err(e) => {
            tracing::warn!(shard = %shard, node = %node, error = %e, "the node serving a shard did not answer");
            return ApiError::from(Error::NoOwner(shard.clone())).into_response();
        }
    };
    metrics::counter!("kami_cluster_forwarded_total").increment(1);
    let status = answer.status();
    let headers = answer.headers().clone();
    let bytes = match read_bounded(answer).await {
        Ok(bytes) => bytes,
        Err(e) => {
            return ApiError::from(Error::Unavailable(format!("node {node} answered shard {shard} in part: {e}")))
                .into_response()
        }
    };
    let mut response = Response::new(axum::body::Body::from(bytes));
    *response.status_mut() = status;
    for (name, value) in headers.iter().filter(|(n, _)| !hop_by_hop(n)) {
        response.headers_mut().append(name, value.clone());
    }
    response
}

async fn read_bounded(answer: reqwest::Response) -> Result<Bytes, String> {
    crate::core::read_bounded(answer, MAX_ANSWER_BYTES as u64).await.map(Bytes::from)
}

/// Sends part of a merchant request (`body` as JSON, `POST path`, with the
/// caller's `Authorization`) to the node serving `shard`, and gives back its
/// answer's JSON; an answer that is not 2xx comes back as the error.
pub async fn send_part(
    cluster: &ClusterNode,
    shard: &ShardId,
    path: &str,
    headers: &HeaderMap,
    body: serde_json::Value,
) -> Result<serde_json::Value, ApiError> {
    let (node, address) = cluster.owner_elsewhere(shard).await?;
    let mut request = cluster.http.post(format!("{address}{path}")).json(&body);
    if let Some(auth) = headers.get(header::AUTHORIZATION) {
        request = request.header(header::AUTHORIZATION, auth);
    }
    request = request.header(&FORWARDED, cluster.forward_token.as_str());
    let answer = request.send().await.map_err(|e| {
        tracing::warn!(shard = %shard, node = %node, error = %e, "the node serving a shard did not answer");
        ApiError::from(Error::NoOwner(shard.clone()))
    })?;
    let status = answer.status();
    let bytes = read_bounded(answer)
        .await
        .map_err(|e| ApiError::from(Error::Unavailable(format!("node {node} answered in part: {e}"))))?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    if status.is_success() {
        return Ok(value);
    }
    let code = value["error"]["code"].as_str().unwrap_or("unavailable");
    let message = value["error"]["message"].as_str().unwrap_or("").to_string();
    // The codes are the project's own; one unknown here stays a 503.
    let code: &'static str = match code {
        "shard_moving" => "shard_moving",
        "shard_elsewhere" => "shard_elsewhere",
        "overloaded" => "overloaded",
        "queue_full" => "queue_full",
        "timeout" => "timeout",
        _ => "unavailable",
    };
    // (Keys were checked before any part was sent: what fails there is passing.)
    Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, format!("node {node} ({status}): {message}"))
        .retry_after(1))
}
