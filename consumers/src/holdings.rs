//! What this consumer process holds: which of its partitions it processes now, which it stands
//! by for, and whether it is configured to own anything at all. Readiness (`/readyz` of
//! `hotpath consumers`) and the `delivery_partition_leases_held` gauge are read from here.
//!
//! Readiness answers "is this process doing the job it was configured for?":
//!
//! | state | `/readyz` | when |
//! | --- | --- | --- |
//! | `owns_nothing` | 503 | the configuration gives it no partition (replica index ≥ replica count, or zero partitions): a mistake, said loudly at start-up |
//! | `acquiring` | 503 | some configured partition has no answer from NATS yet: starting up, or it stopped processing one (a lost or lapsed lease) and NATS has not answered its next try |
//! | `holding` | 200 | it holds at least one of its partitions' leases |
//! | `standby` | 200 | every one of its partitions is held by another process: a standby by design, ready to take over |
//!
//! A standby is ready on purpose: standing by is its job, and a StatefulSet rollout that waits
//! for readiness must not stall on it. Which partitions it waits for is in the body.
//!
//! Partitions of other replicas' shares that this process holds while covering for a replica
//! that is gone ([`crate::failover`]) count as held, and are listed again under `covering`;
//! they never make a process ready or unready, which is about its own share.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use hotpath_core::config::Config;
use hotpath_core::telemetry::meter;
use opentelemetry::metrics::Gauge;
use serde_json::{Value, json};

use crate::lease::Holder;

#[derive(Debug, Clone, PartialEq)]
enum PartitionState {
    Held,
    /// Another process holds it (`None`: unknown, e.g. the key changed while read).
    Standby(Option<Holder>),
}

#[derive(Default)]
struct Board {
    configured: Vec<u32>,
    /// Why the configuration gives this process no partition.
    problem: Option<String>,
    states: BTreeMap<u32, PartitionState>,
    /// Whether the state after the first round of acquisition was logged.
    announced: bool,
}

/// What `/readyz` answers.
#[derive(Debug, Clone, PartialEq)]
pub struct Readiness {
    pub ready: bool,
    pub body: Value,
}

impl Board {
    fn held(&self) -> Vec<u32> {
        self.with_state(|state| *state == PartitionState::Held)
    }

    fn standby(&self) -> Vec<u32> {
        self.with_state(|state| matches!(state, PartitionState::Standby(_)))
    }

    /// Held partitions of other replicas' shares.
    fn covering(&self) -> Vec<u32> {
        let mut held = self.held();
        held.retain(|partition| !self.configured.contains(partition));
        held
    }

    fn with_state(&self, wanted: impl Fn(&PartitionState) -> bool) -> Vec<u32> {
        self.states
            .iter()
            .filter(|(_, state)| wanted(state))
            .map(|(&partition, _)| partition)
            .collect()
    }

    /// Whether every configured partition has an answer: held here, or by someone else.
    fn all_known(&self) -> bool {
        self.configured.iter().all(|p| self.states.contains_key(p))
    }

    fn readiness(&self) -> Readiness {
        let (held, standby) = (self.held(), self.standby());
        let holds_own = held.iter().any(|p| self.configured.contains(p));
        let (ready, status) = if self.problem.is_some() {
            (false, "owns_nothing")
        } else if !self.all_known() {
            (false, "acquiring")
        } else if holds_own {
            (true, "holding")
        } else {
            (true, "standby")
        };
        let mut body = json!({
            "status": status,
            "configured": self.configured,
            "held": held,
            "standby": standby,
            "covering": self.covering(),
        });
        if let Some(problem) = &self.problem {
            body["reason"] = json!(problem);
        }
        Readiness { ready, body }
    }
}

/// Shared between the partition keepers (which write it) and the metrics listener (which
/// reads it).
#[derive(Clone)]
pub struct Holdings {
    board: Arc<Mutex<Board>>,
    leases_held: Gauge<u64>,
}

impl Holdings {
    /// What a consumer process started with `config` holds: nothing yet. (Pass the same
    /// configuration to [`crate::run`].)
    pub fn for_config(config: &Config) -> Holdings {
        let board = Board {
            configured: config.owned_partitions(),
            problem: config.owns_nothing_because(),
            ..Board::default()
        };
        Holdings {
            board: Arc::new(Mutex::new(board)),
            leases_held: meter()
                .u64_gauge("delivery_partition_leases_held")
                .with_description("Partition leases this consumer process holds (0: standby)")
                .build(),
        }
    }

    fn update(&self, change: impl FnOnce(&mut Board)) {
        // The lock guards plain data and is never held across a panic or an await.
        let mut board = self.board.lock().expect("holdings lock");
        change(&mut board);
        self.leases_held.record(board.held().len() as u64, &[]);
        if !board.announced && board.problem.is_none() && board.all_known() {
            board.announced = true;
            announce(&board);
        }
    }

    pub(crate) fn held(&self, partition: u32) {
        self.update(|board| {
            let previous = board.states.insert(partition, PartitionState::Held);
            if let Some(PartitionState::Standby(holder)) = previous {
                tracing::warn!(partition, previous_holder = ?holder, "took over the partition lease");
            }
        });
    }

    /// Another process holds `partition`'s lease (logged when the holder changes).
    pub(crate) fn standby(&self, partition: u32, holder: Option<Holder>) {
        self.update(|board| {
            let state = PartitionState::Standby(holder.clone());
            if board.announced && board.states.get(&partition) != Some(&state) && holder.is_some() {
                tracing::info!(partition, holder = ?holder, "standing by for the partition");
            }
            board.states.insert(partition, state);
        });
    }

    /// This process stopped processing `partition`; it is unknown who holds it until the
    /// next try.
    pub(crate) fn not_held(&self, partition: u32) {
        self.update(|board| {
            board.states.remove(&partition);
        });
    }

    pub fn readiness(&self) -> Readiness {
        self.board.lock().expect("holdings lock").readiness()
    }
}

/// The state after the first round: which partitions this process processes, and loudly,
/// which it only stands by for.
fn announce(board: &Board) {
    let (held, standby) = (board.held(), board.standby());
    if !held.is_empty() {
        tracing::info!(partitions = ?held, "holding the leases of partitions");
    }
    if !standby.is_empty() {
        let holders: Vec<String> = board
            .states
            .values()
            .filter_map(|state| match state {
                PartitionState::Standby(Some(holder)) => {
                    Some(format!("{}/{}/{}", holder.host, holder.pid, holder.id))
                }
                _ => None,
            })
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        tracing::warn!(
            partitions = ?standby,
            held_by = ?holders,
            "standby for partitions: another process holds their leases; this one takes over \
             when it releases them or dies"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn board(configured: Vec<u32>, problem: Option<&str>, held: &[u32], standby: &[u32]) -> Board {
        let mut board = Board {
            configured,
            problem: problem.map(str::to_string),
            ..Board::default()
        };
        for &p in held {
            board.states.insert(p, PartitionState::Held);
        }
        for &p in standby {
            board.states.insert(p, PartitionState::Standby(None));
        }
        board
    }

    #[test]
    fn readiness_by_state() {
        let cases = [
            (board(vec![0, 2], None, &[], &[]), false, "acquiring"),
            (
                board(vec![], Some("replica 2 of 2"), &[], &[]),
                false,
                "owns_nothing",
            ),
            (board(vec![0, 2], None, &[0], &[]), false, "acquiring"),
            (board(vec![0, 2], None, &[0], &[2]), true, "holding"),
            (board(vec![0, 2], None, &[], &[0, 2]), true, "standby"),
            // Covering for another replica changes nothing about its own share's readiness.
            (board(vec![0, 2], None, &[1], &[0]), false, "acquiring"),
            (board(vec![0, 2], None, &[1, 3], &[0, 2]), true, "standby"),
            (board(vec![0, 2], None, &[0, 1, 2, 3], &[]), true, "holding"),
        ];
        for (board, ready, status) in cases {
            let readiness = board.readiness();
            assert_eq!(readiness.ready, ready, "{status}");
            assert_eq!(readiness.body["status"], status);
        }
        let misconfigured = board(vec![], Some("replica 2 of 2"), &[], &[]).readiness();
        assert_eq!(misconfigured.body["reason"], "replica 2 of 2");
        let covering = board(vec![0, 2], None, &[0, 1, 2, 3], &[]).readiness();
        assert_eq!(covering.body["held"], serde_json::json!([0, 1, 2, 3]));
        assert_eq!(covering.body["covering"], serde_json::json!([1, 3]));
    }
}
