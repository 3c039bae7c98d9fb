//! A push sender that sends nothing: it records what the push workers ask it to send and answers
//! from a script, so tests can follow the pipeline end to end without Apple or Google (APNS's
//! endpoint cannot be pointed elsewhere).

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use hotpath_consumers::push::{Device, Notification, PushOutcome, PushSender};

/// One send the sender was asked for, and what it answered.
#[derive(Debug, Clone)]
pub struct RecordedSend {
    pub at: Instant,
    pub device: Device,
    pub notification: Notification,
    pub outcome: PushOutcome,
}

/// A [`PushSender`] that records every send and answers `Sent` unless scripted otherwise.
/// Share it as an `Arc<RecordingSender>`: one clone goes into the workers' senders, the test
/// keeps the other.
#[derive(Default)]
pub struct RecordingSender {
    ledger: Mutex<Ledger>,
}

struct Ledger {
    script: VecDeque<PushOutcome>,
    scripts_by_token: HashMap<String, VecDeque<PushOutcome>>,
    /// What answers once the scripts are used up.
    default: PushOutcome,
    sends: Vec<RecordedSend>,
}

impl Default for Ledger {
    fn default() -> Ledger {
        Ledger {
            script: VecDeque::new(),
            scripts_by_token: HashMap::new(),
            default: PushOutcome::Sent,
            sends: Vec::new(),
        }
    }
}

impl RecordingSender {
    pub fn new() -> RecordingSender {
        RecordingSender::default()
    }

    /// The next sends are answered with `outcomes`, in order, then with the default.
    pub fn script(&self, outcomes: Vec<PushOutcome>) {
        self.ledger().script = outcomes.into();
    }

    /// The next sends to the device with `device_token` are answered with `outcomes`, in order,
    /// ahead of the shared script; once they are used up, that device takes the shared script's
    /// turn.
    pub fn script_for(&self, device_token: &str, outcomes: Vec<PushOutcome>) {
        self.ledger()
            .scripts_by_token
            .insert(device_token.to_string(), outcomes.into());
    }

    /// Every send from now on is answered with `outcome`: the scripts are dropped.
    pub fn answer_always(&self, outcome: PushOutcome) {
        let mut ledger = self.ledger();
        ledger.default = outcome;
        ledger.script.clear();
        ledger.scripts_by_token.clear();
    }

    /// Everything the sender was asked to send, in order, whatever it answered.
    pub fn sent(&self) -> Vec<(Device, Notification)> {
        self.ledger()
            .sends
            .iter()
            .map(|send| (send.device.clone(), send.notification.clone()))
            .collect()
    }

    /// Every send with when it was asked for and what was answered, in order.
    pub fn sends(&self) -> Vec<RecordedSend> {
        self.ledger().sends.clone()
    }

    /// Waits until at least `n` sends were asked for and returns them all; panics, listing what
    /// did arrive, if `within` passes first.
    pub async fn wait_for(&self, n: usize, within: Duration) -> Vec<(Device, Notification)> {
        let deadline = Instant::now() + within;
        loop {
            let sent = self.sent();
            if sent.len() >= n {
                return sent;
            }
            if Instant::now() > deadline {
                let arrived: Vec<String> = self
                    .sends()
                    .iter()
                    .map(|send| {
                        format!(
                            "{} {} message {} -> {}",
                            send.device.platform,
                            send.device.token,
                            send.notification.message_id,
                            send.outcome.reason()
                        )
                    })
                    .collect();
                panic!(
                    "expected {n} pushes within {within:?}, got {}: {arrived:#?}",
                    arrived.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The sends; every update is one push or assignment, so a lock poisoned by a panicking
    /// test still holds a consistent ledger.
    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl PushSender for RecordingSender {
    fn send<'a>(
        &'a self,
        device: &'a Device,
        notification: &'a Notification,
    ) -> BoxFuture<'a, PushOutcome> {
        let mut ledger = self.ledger();
        let for_device = ledger
            .scripts_by_token
            .get_mut(&device.token)
            .and_then(VecDeque::pop_front);
        let outcome = for_device
            .or_else(|| ledger.script.pop_front())
            .unwrap_or_else(|| ledger.default.clone());
        ledger.sends.push(RecordedSend {
            at: Instant::now(),
            device: device.clone(),
            notification: notification.clone(),
            outcome: outcome.clone(),
        });
        Box::pin(async move { outcome })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hotpath_consumers::push::Platform;
    use uuid::Uuid;

    fn device(token: &str) -> Device {
        Device {
            token: token.to_string(),
            platform: Platform::Apns,
            app_id: "chat.hotpath.app".to_string(),
            sandbox: true,
        }
    }

    fn notification() -> Notification {
        Notification {
            message_id: Uuid::new_v4(),
            conversation_id: Uuid::new_v4(),
            seq: 1,
            sender_id: "alice".to_string(),
            title: "alice".to_string(),
            body: "hi".to_string(),
            preview: true,
            badge: Some(1),
            high_priority: true,
            expires_at: chrono::Utc::now(),
        }
    }

    #[tokio::test]
    async fn sends_are_recorded_and_answered_per_script_then_sent() {
        let sender = RecordingSender::new();
        let retry = PushOutcome::Retry {
            reason: "503".to_string(),
            retry_after: Some(Duration::from_secs(2)),
        };
        let gone = PushOutcome::InvalidToken {
            reason: "Unregistered".to_string(),
        };
        sender.script(vec![retry.clone()]);
        sender.script_for("stale", vec![gone.clone()]);
        let hello = notification();

        assert_eq!(sender.send(&device("fresh"), &hello).await, retry);
        assert_eq!(sender.send(&device("stale"), &hello).await, gone);
        assert_eq!(
            sender.send(&device("fresh"), &hello).await,
            PushOutcome::Sent
        );

        let sent = sender.wait_for(3, Duration::from_secs(1)).await;
        let tokens: Vec<&str> = sent.iter().map(|(d, _)| d.token.as_str()).collect();
        assert_eq!(tokens, vec!["fresh", "stale", "fresh"]);
        assert!(sent.iter().all(|(_, n)| *n == hello));
        let outcomes: Vec<PushOutcome> = sender.sends().into_iter().map(|s| s.outcome).collect();
        assert_eq!(outcomes, vec![retry, gone, PushOutcome::Sent]);
    }

    #[tokio::test]
    async fn answer_always_replaces_the_scripts() {
        let sender = RecordingSender::new();
        sender.script(vec![PushOutcome::Sent]);
        let auth = PushOutcome::Auth {
            reason: "InvalidProviderToken".to_string(),
        };
        sender.answer_always(auth.clone());
        assert_eq!(sender.send(&device("a"), &notification()).await, auth);
        assert_eq!(sender.send(&device("a"), &notification()).await, auth);
    }
}
