//! What one HTTP connection is doing, and when it must be closed for doing nothing.
//!
//! A connection is always in one of three phases:
//!
//! * **head**: a request's headers are on their way. A new connection starts here (a client
//!   that connects owes us a request), and an idle one comes back here with the first byte of
//!   its next request. The headers must be complete within the *header timeout* of that
//!   moment, or the connection is closed: this is what stops a slowloris client, which sends
//!   a header line every few seconds and never finishes.
//! * **busy**: requests are being handled, from complete headers until hyper has taken the
//!   whole response body. No deadline here: the body read has its own timeout (a tower layer
//!   and `http::BoundedJson`), and every handler's waits are bounded (publish, statement and pool
//!   timeouts).
//! * **idle**: between requests of a keep-alive connection, nothing of the next one received.
//!   Closed after the *idle timeout*, which is usually longer than the header timeout so that
//!   a load balancer's pooled connections are not closed under it.
//!
//! hyper 1.x has one timer for this, `header_read_timeout`, and starts it as soon as a
//! connection is ready for its next request (`proto/h1/conn.rs`, `State::idle` sets
//! `notify_read` so that the wait for the next head starts the timer at once). An idle
//! keep-alive connection would therefore be closed after the header timeout, and the two
//! timeouts could not differ. The gateway turns hyper's timer off and keeps the phase here
//! instead, fed by the connection's reads and by the request service (`connection.rs`).
//!
//! The machine is pure: the clock is passed in, so the table tests below state the policy.

use std::time::Duration;

use tokio::time::Instant;

/// The two waits a connection is allowed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timeouts {
    pub header: Duration,
    pub idle: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Phase {
    /// A request's headers are due; `since` is when the connection was accepted or the first
    /// byte of the request arrived.
    Head { since: Instant },
    /// `requests` requests are in the gateway's hands.
    Busy { requests: usize },
    /// Between requests since `since`.
    Idle { since: Instant },
}

/// Why a connection was closed by its deadline; the `reason` label of
/// `gateway_http_connections_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    HeaderTimeout,
    IdleTimeout,
}

impl Expiry {
    pub fn label(self) -> &'static str {
        match self {
            Expiry::HeaderTimeout => "header_timeout",
            Expiry::IdleTimeout => "idle_timeout",
        }
    }
}

impl Phase {
    /// A connection just accepted: its first request's headers are due.
    pub fn accepted(now: Instant) -> Phase {
        Phase::Head { since: now }
    }

    /// Bytes arrived. Only an idle connection changes: those bytes start a request, whose
    /// headers are now due. (Bytes while busy are a body, or a pipelined request that hyper
    /// reads once the current one is done.)
    pub fn received(self, now: Instant) -> Phase {
        match self {
            Phase::Idle { .. } => Phase::Head { since: now },
            other => other,
        }
    }

    /// A request's headers are complete and the request is handed to the gateway.
    pub fn request_started(self) -> Phase {
        match self {
            Phase::Busy { requests } => Phase::Busy {
                requests: requests + 1,
            },
            Phase::Head { .. } | Phase::Idle { .. } => Phase::Busy { requests: 1 },
        }
    }

    /// hyper has taken a response's whole body: the request is done.
    pub fn request_finished(self, now: Instant) -> Phase {
        match self {
            Phase::Busy { requests } if requests > 1 => Phase::Busy {
                requests: requests - 1,
            },
            _ => Phase::Idle { since: now },
        }
    }

    /// When the connection must be closed if nothing changes, and why.
    pub fn deadline(self, timeouts: &Timeouts) -> Option<(Instant, Expiry)> {
        match self {
            Phase::Head { since } => Some((since + timeouts.header, Expiry::HeaderTimeout)),
            Phase::Idle { since } => Some((since + timeouts.idle, Expiry::IdleTimeout)),
            Phase::Busy { .. } => None,
        }
    }

    /// `Some(why)` when the deadline has passed at `now`.
    pub fn expired(self, now: Instant, timeouts: &Timeouts) -> Option<Expiry> {
        self.deadline(timeouts)
            .filter(|(deadline, _)| now >= *deadline)
            .map(|(_, why)| why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUTS: Timeouts = Timeouts {
        header: Duration::from_secs(10),
        idle: Duration::from_secs(60),
    };

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn each_phase_has_its_deadline() {
        let t0 = Instant::now();
        let cases = [
            (
                Phase::accepted(t0),
                Some((t0 + secs(10), Expiry::HeaderTimeout)),
            ),
            (
                Phase::Idle { since: t0 },
                Some((t0 + secs(60), Expiry::IdleTimeout)),
            ),
            (Phase::Busy { requests: 1 }, None),
        ];
        for (phase, deadline) in cases {
            assert_eq!(phase.deadline(&TIMEOUTS), deadline, "{phase:?}");
        }
    }

    #[test]
    fn transitions() {
        let t0 = Instant::now();
        let t5 = t0 + secs(5);
        let head = Phase::Head { since: t0 };
        let idle = Phase::Idle { since: t0 };
        let busy = |requests| Phase::Busy { requests };
        let cases = [
            // The first byte after an idle spell starts the header clock; later bytes of
            // the same head do not restart it.
            (idle.received(t5), Phase::Head { since: t5 }),
            (head.received(t5), head),
            // Bytes while busy (a body) change nothing.
            (busy(1).received(t5), busy(1)),
            (head.request_started(), busy(1)),
            (idle.request_started(), busy(1)),
            (busy(1).request_started(), busy(2)),
            (busy(2).request_finished(t5), busy(1)),
            (busy(1).request_finished(t5), Phase::Idle { since: t5 }),
        ];
        for (got, want) in cases {
            assert_eq!(got, want);
        }
    }

    #[test]
    fn a_slow_head_expires_at_the_header_timeout_an_idle_connection_at_the_idle_timeout() {
        let t0 = Instant::now();
        let head = Phase::accepted(t0).received(t0 + secs(3));
        assert_eq!(head.expired(t0 + secs(9), &TIMEOUTS), None);
        assert_eq!(
            head.expired(t0 + secs(10), &TIMEOUTS),
            Some(Expiry::HeaderTimeout)
        );

        let idle = Phase::Busy { requests: 1 }.request_finished(t0);
        assert_eq!(idle.expired(t0 + secs(30), &TIMEOUTS), None);
        assert_eq!(
            idle.expired(t0 + secs(60), &TIMEOUTS),
            Some(Expiry::IdleTimeout)
        );

        // A long request never expires by itself.
        let busy = Phase::Busy { requests: 1 };
        assert_eq!(busy.expired(t0 + secs(3600), &TIMEOUTS), None);
    }
}
