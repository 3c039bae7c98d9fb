//! The socket node: this gateway's registry of open WebSockets, by user.
//!
//! * For each user with at least one socket here, the node holds exactly one NATS core
//!   subscription to `deliver.user.<id>`, shared by all of the user's sockets; it is dropped
//!   (unsubscribed) when the user's last socket here closes.
//! * Every frame that arrives on it (a delivery may carry several, one per line: fanout tells a
//!   user a batch's frames together) is offered to each of the user's sockets without waiting:
//!   a socket whose outbound queue is full is cut off (close 1008) instead of holding the
//!   frame, so one slow client costs a bounded amount of memory and never delays the others.
//! * The node writes the user's presence (how many sockets it holds) when a socket opens or
//!   closes, and rewrites all of it every third of the presence TTL, so entries of a node that
//!   died expire by themselves (see `hotpath_core::presence`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use futures::StreamExt;
use hotpath_core::names::{FRAME_SEPARATOR, deliver_subject};
use hotpath_core::presence::Presence;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio_util::sync::CancellationToken;

use super::close::{CloseReason, Ending};
use super::metrics::SocketMetrics;

/// Presence writes in flight at once during a refresh.
const REFRESH_CONCURRENCY: usize = 32;
/// Longest wait for NATS to confirm a new subscription before the socket opens anyway.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// What the node keeps of one socket: where its frames go and how to end it.
struct SocketHandle {
    id: u64,
    outbound: mpsc::Sender<Utf8Bytes>,
    ending: Ending,
}

impl SocketHandle {
    /// Queues a frame without waiting; a full queue ends the socket.
    fn offer(&self, user_id: &str, frame: Utf8Bytes) {
        match self.outbound.try_send(frame) {
            Ok(()) | Err(TrySendError::Closed(_)) => {}
            Err(TrySendError::Full(_)) => {
                if !self.ending.is_ending() {
                    tracing::warn!(
                        user_id,
                        socket = self.id,
                        "outbound queue full; disconnecting the socket"
                    );
                }
                self.ending.end(CloseReason::OutboundQueueFull);
            }
        }
    }
}

/// One user's sockets on this node and their shared subscription.
struct UserSockets {
    sockets: Arc<Mutex<Vec<SocketHandle>>>,
    /// Stops the forwarding task, which drops (unsubscribes) the subscription.
    subscription: CancellationToken,
}

#[derive(Clone)]
pub struct SocketNode {
    inner: Arc<Inner>,
}

struct Inner {
    node_id: String,
    nats: async_nats::Client,
    presence: Presence,
    users: Mutex<HashMap<String, UserSockets>>,
    next_socket: AtomicU64,
    shutdown: CancellationToken,
    metrics: SocketMetrics,
}

/// A socket's place in the registry; dropping it removes the socket (and the user's
/// subscription with the last one) and updates presence.
pub struct Registration {
    node: SocketNode,
    user_id: String,
    socket_id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let user_id = std::mem::take(&mut self.user_id);
        self.node.remove(&user_id, self.socket_id);
        // Presence is written off the dropping task; during a runtime shutdown there is no
        // runtime to write it on, and the entry expires by itself instead.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let node = self.node.clone();
            runtime.spawn(async move { node.write_presence(&user_id).await });
        }
    }
}

impl SocketNode {
    pub fn new(
        node_id: String,
        nats: async_nats::Client,
        presence: Presence,
        shutdown: CancellationToken,
    ) -> SocketNode {
        SocketNode {
            inner: Arc::new(Inner {
                node_id,
                nats,
                presence,
                users: Mutex::new(HashMap::new()),
                next_socket: AtomicU64::new(1),
                shutdown,
                metrics: SocketMetrics::new(),
            }),
        }
    }

    pub fn metrics(&self) -> &SocketMetrics {
        &self.inner.metrics
    }

    /// Cancelled when the gateway stops: sockets close with 1001.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    /// Adds a socket of `user_id` whose live frames go to `outbound`.
    ///
    /// Returns once NATS has the user's subscription and presence says the user is here, in
    /// that order: anything published after presence shows the user online reaches this
    /// socket, and a `sync` the client sends next sees everything persisted before.
    pub async fn register(
        &self,
        user_id: &str,
        outbound: mpsc::Sender<Utf8Bytes>,
        ending: Ending,
    ) -> anyhow::Result<Registration> {
        let socket_id = self.inner.next_socket.fetch_add(1, Ordering::Relaxed);
        let handle = SocketHandle {
            id: socket_id,
            outbound,
            ending,
        };
        if let Err(handle) = self.join_existing(user_id, handle) {
            // The user's first socket here: subscribe (outside the lock), then either install
            // the subscription or, if another socket of the user won the race, drop ours.
            let subscription = self.inner.nats.subscribe(deliver_subject(user_id)).await?;
            if let Err(handle) = self.join_existing(user_id, handle) {
                self.install(user_id, handle, subscription);
            }
        }
        let registration = Registration {
            node: self.clone(),
            user_id: user_id.to_string(),
            socket_id,
        };
        // The server has the subscription once it answered a ping sent after it. While NATS
        // is away this cannot be known; the socket still opens and receives once it is back.
        match tokio::time::timeout(FLUSH_TIMEOUT, self.inner.nats.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(user_id, %error, "cannot confirm the subscription"),
            Err(_) => tracing::warn!(user_id, "NATS did not confirm the subscription in time"),
        }
        self.write_presence(user_id).await;
        Ok(registration)
    }

    /// Adds the socket to the user's entry if there is one; hands it back if not.
    fn join_existing(&self, user_id: &str, handle: SocketHandle) -> Result<(), SocketHandle> {
        let users = self.lock_users();
        match users.get(user_id) {
            Some(user) => {
                lock(&user.sockets).push(handle);
                Ok(())
            }
            None => Err(handle),
        }
    }

    fn install(&self, user_id: &str, handle: SocketHandle, subscription: async_nats::Subscriber) {
        let sockets = Arc::new(Mutex::new(vec![handle]));
        let stop = CancellationToken::new();
        self.lock_users().insert(
            user_id.to_string(),
            UserSockets {
                sockets: sockets.clone(),
                subscription: stop.clone(),
            },
        );
        self.inner.metrics.subscribed(1);
        let (user_id, metrics) = (user_id.to_string(), self.inner.metrics.clone());
        tokio::spawn(async move {
            forward(&user_id, subscription, &sockets, &stop).await;
            metrics.subscribed(-1);
        });
    }

    fn remove(&self, user_id: &str, socket_id: u64) {
        let mut users = self.lock_users();
        let Some(user) = users.get(user_id) else {
            return;
        };
        let now_empty = {
            let mut sockets = lock(&user.sockets);
            sockets.retain(|s| s.id != socket_id);
            sockets.is_empty()
        };
        if now_empty && let Some(user) = users.remove(user_id) {
            user.subscription.cancel();
        }
    }

    /// The user's sockets on this node.
    pub fn socket_count(&self, user_id: &str) -> u32 {
        self.lock_users()
            .get(user_id)
            .map_or(0, |user| lock(&user.sockets).len() as u32)
    }

    /// Writes this node's count for the user to presence. A failure is logged: the socket
    /// works without presence, and the next refresh writes it again.
    async fn write_presence(&self, user_id: &str) {
        let inner = &self.inner;
        let written = inner
            .presence
            .set_node(user_id, &inner.node_id, || self.socket_count(user_id))
            .await;
        if let Err(error) = written {
            tracing::warn!(
                user_id,
                error = format!("{error:#}"),
                "cannot write presence"
            );
        }
    }

    /// Rewrites the presence of every user connected here, every third of the TTL, until
    /// shutdown.
    pub async fn refresh_presence(self) {
        let period = self.inner.presence.ttl() / 3;
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick fires at once; the sockets wrote their own presence just now.
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.inner.shutdown.cancelled() => return,
            }
            let users: Vec<String> = self.lock_users().keys().cloned().collect();
            let node = &self;
            futures::stream::iter(users)
                .for_each_concurrent(REFRESH_CONCURRENCY, |user_id| async move {
                    node.write_presence(&user_id).await
                })
                .await;
        }
    }

    fn lock_users(&self) -> std::sync::MutexGuard<'_, HashMap<String, UserSockets>> {
        lock(&self.inner.users)
    }
}

/// The registry's critical sections only move handles around and never panic; a poisoned
/// lock would still hold a consistent map.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Offers every frame published for the user to each of the user's sockets here, until the
/// user's last socket closes.
async fn forward(
    user_id: &str,
    mut subscription: async_nats::Subscriber,
    sockets: &Mutex<Vec<SocketHandle>>,
    stop: &CancellationToken,
) {
    loop {
        let message = tokio::select! {
            message = subscription.next() => message,
            () = stop.cancelled() => return,
        };
        let Some(message) = message else {
            // Only a closed NATS client ends a subscription (reconnects keep it). The sockets
            // would never hear anything again: close them so their clients reconnect.
            tracing::warn!(
                user_id,
                "delivery subscription ended; closing the user's sockets"
            );
            for socket in lock(sockets).iter() {
                socket.ending.end(CloseReason::ServerShutdown);
            }
            return;
        };
        let frames = frames_of(user_id, &message.payload);
        let sockets = lock(sockets);
        let span = crate::trace::deliver_span(message.headers.as_ref(), sockets.len());
        let _in_span = span.enter();
        for frame in frames {
            for socket in sockets.iter() {
                socket.offer(user_id, frame.clone());
            }
        }
    }
}

/// The frames of one delivery: fanout sends a user the frames of a batch in one payload,
/// separated by newlines ([`FRAME_SEPARATOR`]; compact JSON never holds a raw one), so each line is one WebSocket text frame, in order. A line that is not
/// UTF-8 is dropped and logged.
fn frames_of(user_id: &str, payload: &Bytes) -> Vec<Utf8Bytes> {
    payload
        .split(|&byte| byte == FRAME_SEPARATOR)
        .filter(|line| !line.is_empty())
        .filter_map(|line| match Utf8Bytes::try_from(payload.slice_ref(line)) {
            Ok(frame) => Some(frame),
            Err(error) => {
                tracing::warn!(user_id, %error, "dropping a delivery that is not UTF-8 text");
                None
            }
        })
        .collect()
}
