//! One HTTP connection: hyper serving the router over a TCP stream, watched by its deadline.
//!
//! Three small parts cooperate, all sharing the connection's [`Activity`]:
//!
//! * [`Watched`], the TCP stream as hyper sees it, tells the activity when bytes arrive, and
//!   holds the connection's slot of `HOTPATH_MAX_CONNECTIONS`. A WebSocket upgrade hands this
//!   very stream to the socket, so a WebSocket keeps its slot until it closes, and the slot is
//!   given back by `Drop` however the connection ends.
//! * The request service marks each request busy from its headers until hyper has taken the
//!   whole response body (the guard rides in the body).
//! * [`serve`] drives hyper and closes the connection when its phase's deadline passes
//!   (`phase.rs`). Closing is dropping hyper's connection: no request is in flight then, so
//!   nothing is cut short but a client's slow headers or an idle keep-alive.
//!
//! After an upgrade, hyper's connection future ends and so does the watching: the socket has
//! its own heartbeat (`socket::connection`), and the HTTP timeouts no longer apply.

use std::convert::Infallible;
use std::io;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use axum::Router;
use axum::body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::ServerMetrics;
use super::phase::{Expiry, Phase, Timeouts};

/// The phase of one connection, shared by its stream, its requests and its watcher.
pub struct Activity {
    phase: Mutex<Phase>,
    /// Woken when the deadline may have moved earlier or appeared.
    changed: Notify,
}

impl Activity {
    pub fn new(now: Instant) -> Activity {
        Activity {
            phase: Mutex::new(Phase::accepted(now)),
            changed: Notify::new(),
        }
    }

    pub fn phase(&self) -> Phase {
        // The lock only guards copies of a small value; a panic cannot happen while it is
        // held, and a poisoned lock still holds a valid phase.
        *self.phase.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn update(&self, change: impl FnOnce(Phase) -> Phase) {
        let mut phase = self.phase.lock().unwrap_or_else(PoisonError::into_inner);
        let before = *phase;
        *phase = change(before);
        // Leaving busy, or a new head after idle, sets an earlier deadline than the watcher
        // sleeps until; entering busy only removes one (the watcher finds out when it wakes).
        let wake = matches!(
            (before, *phase),
            (Phase::Busy { .. }, Phase::Idle { .. }) | (Phase::Idle { .. }, Phase::Head { .. })
        );
        drop(phase);
        if wake {
            self.changed.notify_one();
        }
    }

    fn received(&self) {
        self.update(|phase| phase.received(Instant::now()));
    }

    fn request_started(self: &Arc<Self>) -> InFlight {
        self.update(Phase::request_started);
        InFlight(self.clone())
    }
}

/// A request in the gateway's hands; dropping it finishes the request.
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .update(|phase| phase.request_finished(Instant::now()));
    }
}

/// The connection's place under `HOTPATH_MAX_CONNECTIONS`, given back when the stream is
/// dropped (the connection closed, or the WebSocket it became closed).
pub struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    metrics: ServerMetrics,
}

impl Slot {
    pub fn new(permit: tokio::sync::OwnedSemaphorePermit, metrics: ServerMetrics) -> Slot {
        metrics.connection_opened();
        Slot {
            _permit: permit,
            metrics,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.metrics.connection_closed();
    }
}

/// The TCP stream, reporting reads to the connection's activity and holding its slot.
pub struct Watched {
    stream: TcpStream,
    activity: Arc<Activity>,
    _slot: Slot,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.received();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The router as hyper calls it: each request busy until its response body is taken.
async fn handle(
    router: Router,
    activity: Arc<Activity>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let in_flight = activity.request_started();
    let response = router.oneshot(request.map(Body::new)).await?;
    Ok(response.map(|body| holding(body, in_flight)))
}

/// `body`, with `in_flight` living exactly as long as it: the closure owns the guard, and
/// hyper drops the body once it has taken its last frame (or gives up on the connection).
fn holding(body: Body, in_flight: InFlight) -> Body {
    Body::new(body.map_frame(move |frame| {
        let _in_flight = &in_flight;
        frame
    }))
}

/// Serves one accepted connection until it ends, is upgraded, or passes its deadline; on
/// `shutdown`, hyper finishes the request in hand and closes.
pub async fn serve(
    stream: TcpStream,
    slot: Slot,
    router: Router,
    timeouts: Timeouts,
    metrics: ServerMetrics,
    shutdown: CancellationToken,
) {
    let activity = Arc::new(Activity::new(Instant::now()));
    let io = TokioIo::new(Watched {
        stream,
        activity: activity.clone(),
        _slot: slot,
    });
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |request| handle(router.clone(), activity.clone(), request))
    };
    // hyper's own header timer is off: it would also close idle keep-alives (`phase.rs`).
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.header_read_timeout(None);
    let mut conn = pin!(builder.serve_connection(io, service).with_upgrades());
    let mut draining = false;
    loop {
        // Registered before the deadline is read, so a change in between is not missed.
        let changed = activity.changed.notified();
        let deadline = activity.phase().deadline(&timeouts);
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(error) = served {
                    tracing::debug!(%error, "connection ended with an error");
                }
                return;
            }
            () = sleep_until(deadline) => {
                if let Some(why) = activity.phase().expired(Instant::now(), &timeouts) {
                    tracing::debug!(reason = why.label(), "closing a connection at its deadline");
                    metrics.closed_by_deadline(why);
                    return;
                }
            }
            () = changed => {}
            () = shutdown.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

async fn sleep_until(deadline: Option<(Instant, Expiry)>) {
    match deadline {
        Some((at, _)) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_is_busy_until_its_response_body_is_gone() {
        let activity = Arc::new(Activity::new(Instant::now()));
        let body = holding(Body::from("hello"), activity.request_started());
        assert_eq!(activity.phase(), Phase::Busy { requests: 1 });

        let bytes = body.collect().await.expect("body").to_bytes();
        assert_eq!(bytes, "hello");
        assert!(matches!(activity.phase(), Phase::Idle { .. }));
    }
}
