//! The connection layer under the router: kami accepts and serves HTTP/1.1
//! connections itself (hyper), so that every connection is bounded, whatever a
//! client does with it:
//!
//! * at most `server.max_connections` open at once; one more is answered 503
//!   `overloaded` (`Connection: close`) and closed at once;
//! * request headers must arrive within `server.header_read_timeout_ms`
//!   (hyper closes the connection otherwise), and at most `server.max_header_bytes`
//!   of them (431);
//! * a keep-alive connection with no request in flight and no bytes moving for
//!   `server.idle_timeout_secs` is closed;
//! * the few answers hyper writes itself (400, 414, 431, 505 on a request it cannot
//!   parse) leave in kami's JSON error format, with `Connection: close`.
//!
//! Body reads are bounded in size and time by [`super::admission`].

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

/// The connection limits (`[server]` in the configuration).
#[derive(Debug, Clone)]
pub struct ConnLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
}

/// Runs a connection's future on a thread chosen by the caller (kami: the actor
/// arbiters in turn, so a request and the stock actor it calls often share a
/// thread). The future is handed over `Send`; the stream inside it is registered
/// with the runtime of the thread that polls it.
pub type Spawn = Arc<dyn Fn(Pin<Box<dyn Future<Output = ()> + Send>>) + Send + Sync>;

/// Serves `app` on `listener` until `stop` fires, then lets open connections finish
/// their requests (idle ones close at once) and returns when none is left. Each
/// connection is served by the next of `spawners` in turn (none: on this runtime).
pub async fn serve(
    listener: TcpListener,
    app: Arc<super::front::Front>,
    limits: ConnLimits,
    spawners: Vec<Spawn>,
    stop: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (closing_tx, closing_rx) = watch::channel(false);
    let open = Arc::new(AtomicUsize::new(0));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    tokio::pin!(stop);
    let mut next = 0usize;
    loop {
        let (tcp, remote) = tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment, go on.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refuse(tcp);
            continue;
        };
        if let Err(e) = tcp.set_nodelay(true) {
            // Without it, a response written in two segments waits for the
            // client's delayed ACK (~40 ms) under Nagle's algorithm.
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        open.fetch_add(1, Ordering::Relaxed);
        let conn = Conn {
            http: http.clone(),
            app: app.clone(),
            closing: closing_rx.clone(),
            open: open.clone(),
            idle_timeout: limits.idle_timeout,
            remote,
        };
        match spawners.get(next % spawners.len().max(1)) {
            None => {
                tokio::spawn(conn.serve(tcp, slot));
            }
            Some(spawn) => match tcp.into_std() {
                Ok(std) => spawn(Box::pin(async move {
                    match TcpStream::from_std(std) {
                        Ok(tcp) => conn.serve(tcp, slot).await,
                        Err(e) => {
                            tracing::debug!(error = %e, "could not hand a connection over");
                            conn.open.fetch_sub(1, Ordering::Relaxed);
                        }
                    }
                })),
                Err(e) => {
                    tracing::debug!(error = %e, "could not hand a connection over");
                    open.fetch_sub(1, Ordering::Relaxed);
                }
            },
        }
        next = next.wrapping_add(1);
    }
    drop(listener);
    let _ = closing_tx.send(true);
    while open.load(Ordering::Relaxed) > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// What serving one connection needs.
struct Conn {
    http: hyper::server::conn::http1::Builder,
    app: Arc<super::front::Front>,
    closing: watch::Receiver<bool>,
    open: Arc<AtomicUsize>,
    idle_timeout: Duration,
    remote: std::net::SocketAddr,
}

impl Conn {
    async fn serve(self, tcp: TcpStream, slot: tokio::sync::OwnedSemaphorePermit) {
        let Conn { http, app, mut closing, open, idle_timeout, remote } = self;
        let _slot = slot;
        let activity = Arc::new(Activity::new());
        let io = TokioIo::new(Watched { inner: tcp, activity: activity.clone(), rewrite: Rewrite::default() });
        let service = {
            let activity = activity.clone();
            hyper::service::service_fn(move |mut req: axum::extract::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(remote));
                let in_flight = activity.request_started();
                let app = app.clone();
                async move {
                    let response = app.serve(req.map(axum::body::Body::new)).await;
                    drop(in_flight);
                    Ok::<_, std::convert::Infallible>(response)
                }
            })
        };
        let conn = http.serve_connection(io, service);
        tokio::pin!(conn);
        let mut shutting_down = false;
        loop {
            let idle_check = tokio::time::sleep(activity.idle_deadline(idle_timeout));
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    break;
                }
                changed = closing.changed(), if !shutting_down => {
                    if changed.is_err() || *closing.borrow() {
                        shutting_down = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
                _ = idle_check, if !shutting_down => {
                    if activity.idle_for(idle_timeout) {
                        shutting_down = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        }
        open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One connection over the limit: a 503 in the JSON format written without
/// waiting (the socket's buffer takes it), then closed.
fn refuse(tcp: TcpStream) {
    crate::telemetry::count_rejection("connections");
    let body = "{\"error\":{\"code\":\"overloaded\",\"message\":\"too many open connections; try again shortly\"}}\n";
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tcp.try_write(response.as_bytes());
}

/// When a connection last moved a byte, and how many of its requests are being
/// answered.
struct Activity {
    started: Instant,
    last_ms: AtomicU64,
    in_flight: Arc<AtomicUsize>,
}

struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Activity {
    fn new() -> Activity {
        Activity { started: Instant::now(), last_ms: AtomicU64::new(0), in_flight: Arc::new(AtomicUsize::new(0)) }
    }

    fn touch(&self) {
        self.last_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn request_started(&self) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.in_flight.clone())
    }

    fn idle_deadline(&self, idle: Duration) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        (last + idle).saturating_sub(self.started.elapsed()).max(Duration::from_millis(10))
    }

    /// No request being answered and no byte read or written for `idle`.
    fn idle_for(&self, idle: Duration) -> bool {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.in_flight.load(Ordering::Relaxed) == 0 && self.started.elapsed() >= last + idle
    }
}

/// The TCP stream as hyper sees it: every byte moved counts as activity, and the
/// error answers hyper writes itself are rewritten into kami's JSON format.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
    rewrite: Rewrite,
}

/// A replacement answer being written in place of hyper's own.
#[derive(Default)]
struct Rewrite {
    pending: Vec<u8>,
    written: usize,
}

/// The JSON answer for an error response hyper writes itself (it has an empty
/// body); `None` for any other write.
fn json_error_for(hyper_wrote: &[u8]) -> Option<Vec<u8>> {
    let head = hyper_wrote.strip_prefix(b"HTTP/1.1 ")?;
    let (status, code, message): (&str, &str, &str) = match head.get(..3)? {
        b"400" => ("400 Bad Request", "bad_request", "the request could not be parsed as HTTP/1.1"),
        b"414" => ("414 URI Too Long", "uri_too_long", "the request target is too long"),
        b"431" => ("431 Request Header Fields Too Large", "headers_too_large", "the request headers are too large"),
        b"505" => ("505 HTTP Version Not Supported", "http_version_not_supported", "only HTTP/1.0 and 1.1 are served"),
        _ => return None,
    };
    // Only hyper's own answers: kami's handlers never send these with an empty body.
    let empty_body = hyper_wrote.windows(19).any(|w| w.eq_ignore_ascii_case(b"content-length: 0\r\n"));
    if !empty_body || !hyper_wrote.ends_with(b"\r\n\r\n") {
        return None;
    }
    let body = format!("{{\"error\":{{\"code\":\"{code}\",\"message\":\"{message}\"}}}}\n");
    Some(
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

impl Watched {
    /// Writes what is left of a replacement answer; Ready once all of it is out.
    fn drain_rewrite(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.rewrite.written < self.rewrite.pending.len() {
            let rest = &self.rewrite.pending[self.rewrite.written..];
            match Pin::new(&mut self.inner).poll_write(cx, rest) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.rewrite.written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        result
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if let Poll::Ready(Err(e)) = this.drain_rewrite(cx) {
            return Poll::Ready(Err(e));
        }
        if this.rewrite.written < this.rewrite.pending.len() {
            return Poll::Pending;
        }
        if let Some(replacement) = json_error_for(buf) {
            this.rewrite = Rewrite { pending: replacement, written: 0 };
            this.activity.touch();
            // hyper's bytes count as written; ours go out now and on flush.
            return match this.drain_rewrite(cx) {
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                _ => Poll::Ready(Ok(buf.len())),
            };
        }
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &result {
            if *n > 0 {
                this.activity.touch();
            }
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.drain_rewrite(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut self.inner).poll_flush(cx),
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.drain_rewrite(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut self.inner).poll_shutdown(cx),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hyper_error_answers_become_json() {
        let hyper = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let json = String::from_utf8(json_error_for(hyper).unwrap()).unwrap();
        assert!(json.starts_with("HTTP/1.1 431 "), "{json}");
        assert!(json.contains("connection: close\r\n"), "{json}");
        assert!(json.ends_with(
            r#"{"error":{"code":"headers_too_large","message":"the request headers are too large"}}
"#
        ));
        // kami's own answers (a body) and other statuses are left alone.
        assert!(json_error_for(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 12\r\n\r\n").is_none());
        assert!(json_error_for(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_none());
        assert!(json_error_for(b"{\"partial\": true}").is_none());
    }
}
