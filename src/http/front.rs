//! The front of the server: everything every request goes through, in one place
//! and one pass (no stack of boxed middleware per request):
//!
//! 1. its request id (the client's `X-Request-Id` when usable, else a new one),
//!    echoed on the answer, and a tracing span carrying it;
//! 2. the door ([`super::intake`]): the body read whole, bounded in size and time,
//!    then one of the server's in-flight slots;
//! 3. the request timeout around routing and the handler;
//! 4. inside routing, per route ([`Gate`]): the per-IP rate limit of buyer routes,
//!    and the route's template put on the answer for the metrics;
//! 5. the answer counted per route, method and status, and an error answer that
//!    is not JSON (axum's own rejections) rewritten into the JSON error format.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tower::{Service, ServiceExt};
use tracing::Instrument;

use super::error::ApiError;
use super::{extract, AppState};

static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The whole HTTP application: the router behind the front.
pub struct Front {
    router: Router,
    state: AppState,
    timeout: Duration,
    next_id: AtomicU64,
    id_prefix: String,
}

impl Front {
    pub fn new(router: Router, state: AppState) -> Front {
        let timeout = state.limits.request_timeout;
        Front { router, state, timeout, next_id: AtomicU64::new(0), id_prefix: format!("{:08x}-", std::process::id()) }
    }

    /// Answers one request (never fails: every failure is a JSON error answer).
    pub async fn serve(&self, mut req: Request) -> Response {
        let id = self.request_id(&mut req);
        // Client text in log fields is bounded: the method from a closed set, the
        // path cut at `MAX_LOGGED_PATH` bytes, the query left out. `order_id` is
        // filled in by handlers that know it (see `telemetry::record_order`).
        let span = tracing::info_span!(
            "request",
            method = super::method_label(req.method()),
            path = super::truncate(req.uri().path(), super::MAX_LOGGED_PATH),
            request_id = id.to_str().unwrap_or("-"),
            order_id = tracing::field::Empty,
        );
        let mut response = self.admitted(req).instrument(span).await;
        response.headers_mut().insert(REQUEST_ID.clone(), id);
        response
    }

    async fn admitted(&self, req: Request) -> Response {
        let started = Instant::now();
        let method = super::method_label(req.method());
        let (req, slot) = match self.state.intake.admit(req).await {
            Ok(admitted) => admitted,
            Err(refused) => return refused,
        };
        // A cluster node keeps what it needs to send the request on to the node
        // serving its shard (the body is in memory already).
        let (req, replay) = match self.state.cluster() {
            Some(_) => {
                let mut req = req;
                super::forward::adopt_client(&self.state, &mut req);
                let (parts, body) = req.into_parts();
                let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap_or_default();
                let replay = super::forward::Replay::of(&parts, bytes.clone());
                (Request::from_parts(parts, axum::body::Body::from(bytes)), Some(replay))
            }
            None => (req, None),
        };
        let routed = tokio::time::timeout(self.timeout, self.router.clone().oneshot(req));
        let mut response = match routed.await {
            Ok(Ok(response)) => response,
            Ok(Err(never)) => match never {},
            Err(_) => {
                crate::telemetry::count_rejection("timeout");
                ApiError::from(crate::error::Error::Timeout).into_response()
            }
        };
        if let (Some(cluster), Some(replay)) = (self.state.cluster(), replay) {
            if let Some(super::error::Elsewhere(shards)) = response.extensions_mut().remove::<super::error::Elsewhere>()
            {
                let route = response.extensions().get::<MatchedPath>().cloned();
                let sent = super::forward::forward(cluster, &shards, replay, response, &self.state);
                // Within what is left of the request's time, not a second timeout.
                let left = self.timeout.saturating_sub(started.elapsed());
                response = match tokio::time::timeout(left, sent).await {
                    Ok(answer) => answer,
                    Err(_) => ApiError::from(crate::error::Error::Timeout).into_response(),
                };
                if let Some(route) = route {
                    response.extensions_mut().insert(route);
                }
            }
            if !response.headers().contains_key(&super::forward::NODE) {
                if let Ok(name) = HeaderValue::from_str(&cluster.name) {
                    response.headers_mut().insert(super::forward::NODE.clone(), name);
                }
            }
        }
        drop(slot);
        let route = response.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str());
        super::count_request(route, method, response.status(), started);
        let response = super::error::as_json_error(response).await;
        tracing::debug!(
            status = response.status().as_u16(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "answered"
        );
        if response.status() == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!("answered 500");
        }
        response
    }

    /// The client's `X-Request-Id` when it is at most `MAX_REQUEST_ID` visible
    /// ASCII characters (it is echoed and logged), else a new one; put on the request.
    fn request_id(&self, req: &mut Request) -> HeaderValue {
        let usable = |v: &HeaderValue| {
            v.len() <= super::MAX_REQUEST_ID && !v.is_empty() && v.as_bytes().iter().all(|b| b.is_ascii_graphic())
        };
        if let Some(given) = req.headers().get(&REQUEST_ID) {
            if usable(given) {
                return given.clone();
            }
        }
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut id = String::with_capacity(self.id_prefix.len() + 16);
        id.push_str(&self.id_prefix);
        std::fmt::Write::write_fmt(&mut id, format_args!("{n:x}")).expect("writing to a String");
        let id = HeaderValue::try_from(id).expect("hex digits and a dash are a valid header value");
        req.headers_mut().insert(REQUEST_ID.clone(), id.clone());
        id
    }
}

/// The per-route part of the front, applied to every route by `Router::layer`
/// (the route is known there): buyer routes are rate limited per client IP (and
/// order creation per buyer, in its handler, with the tier put into the request
/// here); merchant, payment-channel and operations routes are not (they are
/// authenticated or must never be refused). Every answer carries its route's
/// template (never the path a client sent) for the metrics.
#[derive(Clone)]
pub struct GateLayer(pub AppState);

impl<S> tower::Layer<S> for GateLayer {
    type Service = Gate<S>;
    fn layer(&self, inner: S) -> Gate<S> {
        Gate { inner, state: self.0.clone() }
    }
}

#[derive(Clone)]
pub struct Gate<S> {
    inner: S,
    state: AppState,
}

impl<S> Service<Request> for Gate<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = GateFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        let route = req.extensions().get::<MatchedPath>().cloned();
        if route.is_some() {
            if let Err(refused) = rate_limit(&self.state, &mut req) {
                let mut refused = refused.into_response();
                refused.extensions_mut().insert(route);
                return GateFuture::Refused { response: Some(refused) };
            }
        }
        GateFuture::Called { inner: self.inner.call(req), route }
    }
}

pin_project_lite::pin_project! {
    #[project = GateProj]
    pub enum GateFuture<F> {
        Refused { response: Option<Response> },
        Called { #[pin] inner: F, route: Option<MatchedPath> },
    }
}

impl<F: Future<Output = Result<Response, Infallible>>> Future for GateFuture<F> {
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            GateProj::Refused { response } => Poll::Ready(Ok(response.take().expect("polled after completion"))),
            GateProj::Called { inner, route } => match inner.poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(mut response)) => {
                    if let Some(route) = route.take() {
                        response.extensions_mut().insert(route);
                    }
                    Poll::Ready(Ok(response))
                }
                Poll::Ready(Err(never)) => match never {},
            },
        }
    }
}

/// The per-IP limit of a buyer route; the caller's tier is put into the request.
fn rate_limit(st: &AppState, req: &mut Request) -> Result<(), ApiError> {
    let rate_limits = &st.rate_limits;
    let path = req.uri().path();
    let buyer_route = path.starts_with("/api/v1/orders")
        || path.starts_with("/api/v1/redemptions")
        || path.starts_with("/api/v1/groups")
        || path.starts_with("/api/v1/buyers/")
        || (req.method() == Method::GET && (path == "/api/v1/products" || path.starts_with("/api/v1/products/")));
    if !buyer_route {
        return Ok(());
    }
    let api_key = extract::header_str(req.headers(), "x-api-key")?;
    let tier = rate_limits.tier(api_key).map_err(|_| {
        crate::telemetry::count_rejection("invalid_api_key");
        ApiError::new(StatusCode::UNAUTHORIZED, "invalid_api_key", "unknown X-Api-Key")
    })?;
    // A request another node of the cluster admitted was limited there, by the
    // buyer's own address.
    let forwarded = super::forward::forwarded(st, req.headers());
    if let Some(ConnectInfo(addr)) = req.extensions().get::<ConnectInfo<SocketAddr>>().filter(|_| !forwarded) {
        if let Err(wait_secs) = tier.check_ip(&addr.ip()) {
            return Err(super::rate_limited(&tier.name, "ip", wait_secs));
        }
    }
    req.extensions_mut().insert(tier);
    Ok(())
}
