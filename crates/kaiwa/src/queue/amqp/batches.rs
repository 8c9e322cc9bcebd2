//! Publishing in batches: items that wait while earlier ones are being confirmed, or that
//! tasks woken together send at once, go to their destination together, as one AMQP message
//! (a JSON array) that the broker routes, stores and confirms once, instead of one message
//! each. Jobs to the workers' queue, events to each gateway's.

use super::{EVENTS, Inner, JOBS};
use crate::queue::QueueError;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::borrow::Cow;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Batches published and awaiting their confirms at once, per kind. Items that come meanwhile
/// wait and go together: one in flight would add a confirm's round trip to every item under
/// load, many would send each item alone.
const IN_FLIGHT: usize = 2;

/// Where one kind of item goes, and how.
#[derive(Debug, Clone, Copy)]
pub(super) struct Route {
    exchange: &'static str,
    /// Returned by the broker when no queue takes it (events for a gateway that is gone).
    mandatory: bool,
    /// Written to disk by the broker.
    persistent: bool,
    /// [`Outgoing`]s in one AMQP message, at most (a job each, or one message's few events):
    /// enough that a busy process sends a message per confirm rather than per item, few enough
    /// that one message stays small (and, for jobs, that a worker that dies takes few others'
    /// jobs back to the queue with its own).
    per_message: usize,
}

/// Jobs: to the one durable queue, persistent.
pub(super) const JOBS_ROUTE: Route = Route {
    exchange: "",
    mandatory: false,
    persistent: true,
    per_message: 32,
};

/// Events: through the events exchange to a gateway's queue, returned if it has none.
pub(super) const EVENTS_ROUTE: Route = Route {
    exchange: EVENTS,
    mandatory: true,
    persistent: false,
    per_message: 128,
};

/// Items on their way, in order, and where their fate goes: whether they came back
/// unroutable. They travel in one AMQP message, never split: a message's events reach their
/// gateway together and in order, or come back together. The channel is unbounded, as the
/// store's writes are: every item stems from a message holding an in-flight slot, so the
/// limits upstream bound it.
pub(super) struct Outgoing<T> {
    /// The routing key: a gateway's id for an event, the jobs queue for a job.
    pub key: Cow<'static, str>,
    pub items: Vec<T>,
    pub fate: oneshot::Sender<Result<bool, QueueError>>,
}

impl<T> Outgoing<T> {
    pub(super) fn job(item: T) -> (Self, oneshot::Receiver<Result<bool, QueueError>>) {
        Self::to(Cow::Borrowed(JOBS), vec![item])
    }

    pub(super) fn to(
        key: Cow<'static, str>,
        items: Vec<T>,
    ) -> (Self, oneshot::Receiver<Result<bool, QueueError>>) {
        let (fate, answer) = oneshot::channel();
        (Self { key, items, fate }, answer)
    }
}

/// Publishes items as they come, those waiting for one routing key as one message, with at
/// most [`IN_FLIGHT`] messages awaiting confirms; answers every item with its message's fate.
/// Ends when the queue stops (items still waiting are dropped, so their callers see `Closed`).
pub(super) async fn send<T: Serialize>(
    inner: Arc<Inner>,
    route: Route,
    mut outgoing: mpsc::UnboundedReceiver<Outgoing<T>>,
) {
    let mut waiting = Vec::with_capacity(route.per_message);
    let mut publishing = FuturesUnordered::new();
    loop {
        tokio::select! {
            () = inner.stop.cancelled() => return,
            received = outgoing.recv_many(&mut waiting, route.per_message),
                if publishing.len() < IN_FLIGHT =>
            {
                if received == 0 {
                    return;
                }
                gather_woken(&mut outgoing, &mut waiting, route.per_message).await;
                for (key, batch) in by_key(waiting.drain(..)) {
                    publishing.push(publish(&inner, route, key, batch));
                }
            }
            Some(()) = publishing.next(), if !publishing.is_empty() => {}
        }
    }
}

/// Takes the items of tasks that were woken with the sender of the first: a commit answers
/// every command of its batch at once, and each answered task sends its job or events. The
/// first send wakes the publisher, which tokio runs next, before the others had their turn:
/// without this, the first item left alone, the second alone in the other confirm's place,
/// and only the rest together. Yielding once lets every task that can run send first; it
/// costs no time when none can.
async fn gather_woken<T>(
    outgoing: &mut mpsc::UnboundedReceiver<Outgoing<T>>,
    waiting: &mut Vec<Outgoing<T>>,
    at_most: usize,
) {
    if waiting.len() >= at_most {
        return;
    }
    tokio::task::yield_now().await;
    while waiting.len() < at_most {
        match outgoing.try_recv() {
            Ok(item) => waiting.push(item),
            Err(_) => break,
        }
    }
}

/// Items grouped by routing key, each group in the order the items came.
fn by_key<T>(
    items: impl Iterator<Item = Outgoing<T>>,
) -> Vec<(Cow<'static, str>, Vec<Outgoing<T>>)> {
    let mut groups: Vec<(Cow<'static, str>, Vec<Outgoing<T>>)> = Vec::new();
    for item in items {
        match groups.iter_mut().find(|(key, _)| *key == item.key) {
            Some((_, group)) => group.push(item),
            None => groups.push((item.key.clone(), vec![item])),
        }
    }
    groups
}

/// One routing key's items as one message; every item shares its fate.
async fn publish<T: Serialize>(
    inner: &Inner,
    route: Route,
    key: Cow<'static, str>,
    batch: Vec<Outgoing<T>>,
) {
    let items: Vec<&T> = batch.iter().flat_map(|outgoing| &outgoing.items).collect();
    let fate = match serde_json::to_vec(&items) {
        Ok(payload) => {
            inner
                .publish(
                    route.exchange,
                    &key,
                    &payload,
                    route.mandatory,
                    route.persistent,
                )
                .await
        }
        Err(err) => Err(QueueError::Malformed(err.to_string())),
    };
    for outgoing in batch {
        // A publisher that stopped waiting (its task ended) needs no answer.
        let _ = outgoing.fate.send(fate.clone());
    }
}

/// The items of one AMQP message: a batch, or one item alone (as kaiwa before batches sent
/// them, so that processes of both kinds work together during an upgrade).
pub(super) fn read<T: DeserializeOwned>(data: &[u8]) -> Result<Vec<T>, serde_json::Error> {
    if data.first() == Some(&b'[') {
        serde_json::from_slice(data)
    } else {
        serde_json::from_slice(data).map(|item| vec![item])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ClientId;
    use crate::queue::{Event, MessageRef};

    fn processing(client: &str, message_id: i64) -> Event {
        Event::Processing(MessageRef {
            client_id: ClientId::parse(client).expect("an id"),
            message_id,
            client_message_id: None,
            receipt: None,
        })
    }

    #[test]
    fn a_batch_and_a_lone_item_both_read_as_items() {
        let events = vec![processing("a", 1), processing("b", 2)];
        let batch = serde_json::to_vec(&events).expect("JSON");
        assert_eq!(read::<Event>(&batch).expect("a batch"), events);
        let alone = serde_json::to_vec(&events[0]).expect("JSON");
        assert_eq!(read::<Event>(&alone).expect("one event"), &events[..1]);
        assert!(read::<Event>(br#"[{"Nope": 1}]"#).is_err());
    }

    /// Four tasks answered at once, as a commit answers its batch, each sending one item: the
    /// publisher takes all four, not the first alone. On one tokio worker, where a task woken
    /// by another runs next: the way every worker of a busy process schedules.
    #[test]
    fn items_of_tasks_woken_together_are_taken_together() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .expect("a runtime");
        let taken = runtime.block_on(async {
            let (sender, mut outgoing) = mpsc::unbounded_channel();
            let (ready, mut all_ready) = mpsc::unbounded_channel();
            let mut answers = Vec::new();
            for message_id in 0..4_i64 {
                let (answer, answered) = oneshot::channel::<()>();
                answers.push(answer);
                let (sender, ready) = (sender.clone(), ready.clone());
                tokio::spawn(async move {
                    let _ = ready.send(());
                    if answered.await.is_ok() {
                        let item = Outgoing::to(Cow::Borrowed("gw-1"), vec![message_id]).0;
                        let _ = sender.send(item);
                    }
                });
            }
            let publisher = tokio::spawn(async move {
                let mut waiting = Vec::new();
                outgoing.recv_many(&mut waiting, 32).await;
                gather_woken(&mut outgoing, &mut waiting, 32).await;
                waiting.len()
            });
            for _ in 0..4 {
                all_ready.recv().await.expect("a task");
            }
            // The answers from one task, with no yield between them, as the writer answers.
            tokio::spawn(async move {
                for answer in answers {
                    let _ = answer.send(());
                }
            });
            publisher.await.expect("the publisher")
        });
        assert_eq!(taken, 4);
    }

    #[test]
    fn items_are_grouped_by_routing_key_in_the_order_they_came() {
        let outgoing =
            |to: &'static str, message_id| Outgoing::to(Cow::Borrowed(to), vec![message_id]).0;
        let items = [
            outgoing("gw-1", 1),
            outgoing("gw-2", 2),
            outgoing("gw-1", 3),
            outgoing("gw-1", 4),
        ];
        let groups: Vec<(String, Vec<i64>)> = by_key(items.into_iter())
            .into_iter()
            .map(|(key, group)| {
                let items = group.iter().flat_map(|o| o.items.iter().copied()).collect();
                (key.into_owned(), items)
            })
            .collect();
        assert_eq!(
            groups,
            [
                ("gw-1".to_owned(), vec![1, 3, 4]),
                ("gw-2".to_owned(), vec![2])
            ]
        );
    }
}
