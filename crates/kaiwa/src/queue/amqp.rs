//! The queue between processes: RabbitMQ. Jobs go to one durable queue that every worker takes
//! from, published persistently and confirmed; a job stays a worker's until it says `done`, and
//! goes to another worker if that one dies first. Events go through a direct exchange to the
//! queue of the gateway they are for (one per gateway, gone with it), published as mandatory so
//! that an event for a gateway that is no longer there comes back instead of vanishing. Events
//! travel in batches: those that wait while earlier ones are being confirmed go to their gateway
//! as one AMQP message (a `processing` and the reply right behind it, the replies of several
//! clients), which the broker routes and confirms once.
//!
//! The connection is kaiwa's to keep: when it breaks, a supervisor reconnects with backoff,
//! declares the queues again and restarts the consumers. An outage of the broker is a delay:
//! a publish that cannot go through waits for the next connection and is made again on it (the
//! process's outbox is the publishes waiting so), so nothing accepted waits for the sweeper.

use super::{Done, Event, GatewayId, Job, Queue, QueueError, Routed, Taken, record_publish};
use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, BasicRejectOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

/// The durable queue every worker takes jobs from.
const JOBS: &str = "kaiwa.jobs";
/// The exchange that routes events to a gateway's queue by the gateway's id.
const EVENTS: &str = "kaiwa.events";
/// How long a depth query waits for a connection that is being made again.
const RECONNECT_WAIT: Duration = Duration::from_secs(2);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// At most this long after the broker is back, publishes go through again: an outage is a
/// delay of its own length plus this.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// A confirm that has not come by then is taken as lost, and the message published again (a
/// job or event that arrives twice is harmless: workers and streams are idempotent).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a publish the broker refused (a nack) waits before it is made again.
const REFUSED_WAIT: Duration = Duration::from_secs(1);
/// AMQP delivery mode 2: the broker writes the message to disk.
const PERSISTENT: u8 = 2;
/// Events in one AMQP message, at most: enough that a busy worker sends a message per confirm
/// rather than per event, few enough that one message stays small.
const EVENTS_PER_MESSAGE: usize = 128;
/// Event batches published and awaiting their confirms at once. Events that come meanwhile
/// wait and go together: one in flight would add a confirm's round trip to every event under
/// load, many would send each event alone.
const EVENT_BATCHES_IN_FLIGHT: usize = 2;

/// What the queue needs to know besides where the broker is.
#[derive(Debug, Clone, Copy)]
pub struct AmqpOptions {
    /// Jobs a worker process holds at once (they wait out their reply delays while held).
    pub prefetch: u16,
}

pub struct AmqpQueue {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    /// The broker without its password, for logs and errors.
    describe: String,
    options: AmqpOptions,
    /// The current connection, `None` while it is being made again.
    link: watch::Sender<Option<Link>>,
    /// Stops the supervisor and the consumers: the last step of shutdown.
    stop: CancellationToken,
    /// A publish failed on a connection that still looks alive (its channel broke): the
    /// supervisor makes a new one.
    broken: Notify,
    /// Events on their way to [`send_events`], which batches them.
    events: mpsc::UnboundedSender<Outgoing>,
}

/// An event for a gateway, and where its fate goes. Unbounded, as the store's writes are:
/// every event stems from a message holding an in-flight slot, so the limits upstream bound it.
struct Outgoing {
    gateway: GatewayId,
    event: Event,
    routed: oneshot::Sender<Result<Routed, QueueError>>,
}

/// One connection and the channel publishes go through (with publisher confirms on).
#[derive(Clone)]
struct Link {
    conn: Arc<Connection>,
    publisher: Channel,
}

impl AmqpQueue {
    /// Connects, declares the queues, and keeps the connection up until [`Queue::close`]. The
    /// first connection must succeed: a broker that cannot be reached at start is an error
    /// that names it.
    pub async fn connect(url: &str, options: AmqpOptions) -> Result<Self, QueueError> {
        let describe = Self::describe_url(url);
        let link = open(url).await.map_err(|err| {
            QueueError::Unavailable(format!(
                "could not connect to RabbitMQ at {describe}: {err}"
            ))
        })?;
        let (tx, _) = watch::channel(Some(link.clone()));
        let (events, outgoing) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            url: url.to_owned(),
            describe,
            options,
            link: tx,
            stop: CancellationToken::new(),
            broken: Notify::new(),
            events,
        });
        tokio::spawn(supervise(inner.clone(), link));
        tokio::spawn(send_events(inner.clone(), outgoing));
        Ok(Self { inner })
    }

    /// An AMQP URL without its password: `amqp://user@host:port/vhost`. A URL that does not
    /// parse is never shown, not even in part: it may hold a password where a host should be.
    pub fn describe_url(url: &str) -> String {
        match url.parse::<lapin::uri::AMQPUri>() {
            Ok(uri) => format!(
                "{}://{}@{}:{}/{}",
                uri.scheme,
                uri.authority.userinfo.username,
                uri.authority.host,
                uri.authority.port,
                uri.vhost.replace('%', "%25").replace('/', "%2f")
            ),
            Err(_) => "RabbitMQ (an unreadable URL)".to_owned(),
        }
    }

    /// Whether `url` is an AMQP URL lapin can use; the error never repeats it.
    pub fn check_url(url: &str) -> Result<(), String> {
        url.parse::<lapin::uri::AMQPUri>().map(drop).map_err(|_| {
            "--queue-url is an unreadable URL: use amqp://user:password@host:port/vhost (the value is not shown)".to_owned()
        })
    }
}

/// Opens a connection, declares what kaiwa uses, and a publishing channel with confirms.
async fn open(url: &str) -> Result<Link, lapin::Error> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let publisher = conn.create_channel().await?;
    publisher
        .queue_declare(
            JOBS.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    publisher
        .exchange_declare(
            EVENTS.into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(Link {
        conn: Arc::new(conn),
        publisher,
    })
}

/// Watches the connection; when it breaks, makes it again with backoff and hands the new one
/// to publishers and consumers.
async fn supervise(inner: Arc<Inner>, mut link: Link) {
    loop {
        let mut events = link.conn.events_listener();
        // A failure reported about the connection before this one is no reason to drop it.
        let _ = inner.broken.notified().now_or_never();
        // Until the connection reports an error, or the queue stops.
        loop {
            tokio::select! {
                () = inner.stop.cancelled() => {
                    close_link(&link).await;
                    return;
                }
                event = events.next() => match event {
                    Some(lapin::Event::Error(err)) => {
                        tracing::warn!(broker = %inner.describe, %err, "the connection to RabbitMQ broke; reconnecting");
                        break;
                    }
                    Some(_) => {}
                    None => break,
                },
                () = inner.broken.notified() => {
                    tracing::warn!(broker = %inner.describe, "publishing to RabbitMQ failed on a connection that looked alive; reconnecting");
                    close_link(&link).await;
                    break;
                }
            }
        }
        inner.link.send_replace(None);
        let mut backoff = FIRST_BACKOFF;
        link = loop {
            tokio::select! {
                () = inner.stop.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            match open(&inner.url).await {
                Ok(link) => break link,
                Err(err) => {
                    tracing::warn!(broker = %inner.describe, %err, retry_in_ms = backoff.as_millis() as u64, "RabbitMQ is still unreachable");
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        };
        tracing::info!(broker = %inner.describe, "reconnected to RabbitMQ");
        inner.link.send_replace(Some(link.clone()));
    }
}

async fn close_link(link: &Link) {
    if let Err(err) = link.conn.close(200, "kaiwa is stopping".into()).await {
        tracing::debug!(%err, "closing the RabbitMQ connection");
    }
}

impl Inner {
    /// The current connection; waits a moment for one being made again.
    async fn link(&self) -> Result<Link, QueueError> {
        let mut watch = self.link.subscribe();
        let wait = watch.wait_for(Option::is_some);
        match tokio::time::timeout(RECONNECT_WAIT, wait).await {
            Ok(Ok(link)) => link
                .clone()
                .ok_or_else(|| self.unavailable("not connected")),
            Ok(Err(_)) => Err(QueueError::Closed),
            Err(_) => Err(self.unavailable("reconnecting")),
        }
    }

    fn unavailable(&self, why: impl std::fmt::Display) -> QueueError {
        QueueError::Unavailable(format!("RabbitMQ at {}: {why}", self.describe))
    }

    /// Publishes and waits for the broker's confirm, through outages: a publish that fails
    /// with its connection is made again on the next one, as soon as there is one. Returns
    /// whether the message came back unroutable (only possible with `mandatory`); fails only
    /// when the queue stops.
    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        mandatory: bool,
        persistent: bool,
    ) -> Result<bool, QueueError> {
        let mut watch = self.link.subscribe();
        loop {
            let link = tokio::select! {
                () = self.stop.cancelled() => return Err(QueueError::Closed),
                link = watch.wait_for(Option::is_some) => match link {
                    Ok(link) => link.clone(),
                    Err(_) => return Err(QueueError::Closed),
                },
            };
            let Some(link) = link else { continue };
            let attempt =
                publish_on(&link, exchange, routing_key, payload, mandatory, persistent).await;
            let failed = match attempt {
                Ok(Published::Confirmed { returned }) => return Ok(returned),
                Ok(Published::Refused) => {
                    tracing::warn!(broker = %self.describe, "RabbitMQ refused a message; publishing it again shortly");
                    None
                }
                Err(err) => Some(err),
            };
            // Until the connection is replaced (a broken one), or a moment has passed (a
            // refusal, or a confirm that never came on a connection that stays).
            let replaced = watch.wait_for(|current| {
                current
                    .as_ref()
                    .is_none_or(|current| !Arc::ptr_eq(&current.conn, &link.conn))
            });
            if let Some(err) = &failed {
                tracing::debug!(broker = %self.describe, %err, "a publish failed; it is made again on the next connection");
                if link.conn.status().connected() {
                    self.broken.notify_one();
                }
            }
            tokio::select! {
                () = self.stop.cancelled() => return Err(QueueError::Closed),
                _ = replaced => {}
                () = tokio::time::sleep(REFUSED_WAIT) => {}
            }
        }
    }
}

/// What became of one publish on a live connection.
enum Published {
    Confirmed {
        returned: bool,
    },
    /// The broker answered with a nack: it could not take the message now.
    Refused,
}

/// One attempt at publishing on `link`, waiting for the confirm.
async fn publish_on(
    link: &Link,
    exchange: &str,
    routing_key: &str,
    payload: &[u8],
    mandatory: bool,
    persistent: bool,
) -> Result<Published, String> {
    let properties = BasicProperties::default().with_content_type("application/json".into());
    let properties = if persistent {
        properties.with_delivery_mode(PERSISTENT)
    } else {
        properties
    };
    let confirm = link
        .publisher
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory,
                ..BasicPublishOptions::default()
            },
            payload,
            properties,
        )
        .await
        .map_err(|err| err.to_string())?;
    let confirm = tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
        .await
        .map_err(|_| "no confirm came in time".to_owned())?
        .map_err(|err| err.to_string())?;
    if confirm.is_nack() {
        return Ok(Published::Refused);
    }
    Ok(Published::Confirmed {
        returned: confirm.take_message().is_some(),
    })
}

/// Publishes events as they come, each gateway's waiting ones as one message, with at most
/// [`EVENT_BATCHES_IN_FLIGHT`] messages awaiting confirms; answers every event with its
/// message's fate. Ends when the queue stops (events still waiting are answered `Closed`).
async fn send_events(inner: Arc<Inner>, mut outgoing: mpsc::UnboundedReceiver<Outgoing>) {
    let mut waiting = Vec::with_capacity(EVENTS_PER_MESSAGE);
    let mut publishing = futures::stream::FuturesUnordered::new();
    loop {
        tokio::select! {
            () = inner.stop.cancelled() => return,
            received = outgoing.recv_many(&mut waiting, EVENTS_PER_MESSAGE),
                if publishing.len() < EVENT_BATCHES_IN_FLIGHT =>
            {
                if received == 0 {
                    return;
                }
                for (gateway, batch) in by_gateway(waiting.drain(..)) {
                    publishing.push(publish_events(&inner, gateway, batch));
                }
            }
            Some(()) = publishing.next(), if !publishing.is_empty() => {}
        }
    }
}

/// Events grouped by the gateway they go to, each group in the order the events came.
fn by_gateway(events: impl Iterator<Item = Outgoing>) -> Vec<(GatewayId, Vec<Outgoing>)> {
    let mut groups: Vec<(GatewayId, Vec<Outgoing>)> = Vec::new();
    for event in events {
        match groups
            .iter_mut()
            .find(|(gateway, _)| *gateway == event.gateway)
        {
            Some((_, group)) => group.push(event),
            None => groups.push((event.gateway.clone(), vec![event])),
        }
    }
    groups
}

/// One gateway's events as one message (a JSON array); every event shares its fate.
async fn publish_events(inner: &Inner, gateway: GatewayId, batch: Vec<Outgoing>) {
    let events: Vec<&Event> = batch.iter().map(|outgoing| &outgoing.event).collect();
    let routed = match serde_json::to_vec(&events) {
        Ok(payload) => inner
            .publish(EVENTS, gateway.as_str(), &payload, true, false)
            .await
            .map(|returned| {
                if returned {
                    Routed::NoGateway
                } else {
                    Routed::Delivered
                }
            }),
        Err(err) => Err(QueueError::Malformed(err.to_string())),
    };
    for outgoing in batch {
        // A publisher that stopped waiting (its task ended) needs no answer.
        let _ = outgoing.routed.send(routed.clone());
    }
}

/// The events of one AMQP message: a batch, or one event alone (as kaiwa before batches sent
/// them, so that gateways and workers of both kinds work together during an upgrade).
fn read_events(data: &[u8]) -> Result<Vec<Event>, serde_json::Error> {
    if data.first() == Some(&b'[') {
        serde_json::from_slice(data)
    } else {
        serde_json::from_slice(data).map(|event| vec![event])
    }
}

/// A job's ack, on the channel it was delivered on.
struct Ack(lapin::Acker);

#[async_trait]
impl Done for Ack {
    async fn done(self: Box<Self>) -> Result<(), QueueError> {
        let acked = self
            .0
            .ack(BasicAckOptions::default())
            .await
            .map_err(|err| QueueError::Unavailable(err.to_string()))?;
        if acked {
            Ok(())
        } else {
            // The channel it came on is gone, so the broker delivers the job again; the
            // worker's redelivery path makes that harmless.
            Err(QueueError::Unavailable(
                "the job's channel closed before its ack".into(),
            ))
        }
    }
}

/// Runs `consume` on every connection there is, until the queue stops or `out` is dropped:
/// a consumer that ends with its connection starts again on the next one.
fn keep_consuming<T, F, Fut>(inner: Arc<Inner>, out: mpsc::Sender<T>, consume: F)
where
    T: Send + 'static,
    F: Fn(Channel, mpsc::Sender<T>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), lapin::Error>> + Send,
{
    tokio::spawn(async move {
        let mut watch = inner.link.subscribe();
        loop {
            let link = tokio::select! {
                () = inner.stop.cancelled() => return,
                () = out.closed() => return,
                link = watch.wait_for(Option::is_some) => match link {
                    Ok(link) => link.clone(),
                    Err(_) => return,
                },
            };
            let Some(link) = link else { continue };
            let consumed = async {
                let channel = link.conn.create_channel().await?;
                consume(channel, out.clone()).await
            };
            tokio::select! {
                () = inner.stop.cancelled() => return,
                result = consumed => {
                    if let Err(err) = result {
                        tracing::debug!(%err, "a RabbitMQ consumer stopped; it starts again on the next connection");
                    }
                }
            }
            // Wait for this connection to be replaced before consuming again.
            if watch
                .wait_for(|current| {
                    current
                        .as_ref()
                        .is_none_or(|current| !Arc::ptr_eq(&current.conn, &link.conn))
                })
                .await
                .is_err()
            {
                return;
            }
        }
    });
}

fn into_stream<T: Send + 'static>(receiver: mpsc::Receiver<T>) -> BoxStream<'static, T> {
    futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|item| (item, receiver))
    })
    .boxed()
}

#[async_trait]
impl Queue for AmqpQueue {
    async fn publish_job(&self, job: Job) -> Result<(), QueueError> {
        let payload =
            serde_json::to_vec(&job).map_err(|err| QueueError::Malformed(err.to_string()))?;
        let started = std::time::Instant::now();
        self.inner.publish("", JOBS, &payload, false, true).await?;
        record_publish("job", started);
        Ok(())
    }

    fn jobs(&self) -> Result<BoxStream<'static, Taken>, QueueError> {
        let prefetch = self.inner.options.prefetch;
        let (tx, rx) = mpsc::channel(usize::from(prefetch).max(1));
        keep_consuming(self.inner.clone(), tx, move |channel, out| async move {
            channel
                .basic_qos(prefetch, BasicQosOptions::default())
                .await?;
            let mut consumer = channel
                .basic_consume(
                    JOBS.into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            while let Some(delivery) = consumer.next().await {
                let delivery = delivery?;
                match serde_json::from_slice::<Job>(&delivery.data) {
                    Ok(job) => {
                        let taken =
                            Taken::new(job, delivery.redelivered, Box::new(Ack(delivery.acker)));
                        if out.send(taken).await.is_err() {
                            return Ok(());
                        }
                    }
                    Err(err) => {
                        // It would only come back: drop it, and say so.
                        tracing::error!(%err, "a job that is not a kaiwa job was dropped from the queue");
                        delivery
                            .acker
                            .reject(BasicRejectOptions { requeue: false })
                            .await?;
                    }
                }
            }
            Ok(())
        });
        Ok(into_stream(rx))
    }

    async fn publish_event(&self, gateway: &GatewayId, event: Event) -> Result<Routed, QueueError> {
        let started = std::time::Instant::now();
        let (routed, fate) = oneshot::channel();
        let outgoing = Outgoing {
            gateway: gateway.clone(),
            event,
            routed,
        };
        self.inner
            .events
            .send(outgoing)
            .map_err(|_| QueueError::Closed)?;
        let routed = fate.await.map_err(|_| QueueError::Closed)??;
        // The wait for the batch to go counts: it is part of the event's way to its gateway.
        record_publish("event", started);
        Ok(routed)
    }

    fn events(&self, gateway: &GatewayId) -> Result<BoxStream<'static, Event>, QueueError> {
        let (tx, rx) = mpsc::channel(4096);
        let gateway = gateway.clone();
        keep_consuming(self.inner.clone(), tx, move |channel, out| {
            let gateway = gateway.clone();
            async move {
                // The gateway's own queue: gone with its connection, so events for a gateway
                // that died come back to their publisher instead of piling up.
                let queue = format!("{EVENTS}.{gateway}");
                channel
                    .queue_declare(
                        queue.as_str().into(),
                        QueueDeclareOptions {
                            exclusive: true,
                            auto_delete: true,
                            ..QueueDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await?;
                channel
                    .queue_bind(
                        queue.as_str().into(),
                        EVENTS.into(),
                        gateway.as_str().into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                let mut consumer = channel
                    .basic_consume(
                        queue.as_str().into(),
                        "".into(),
                        BasicConsumeOptions {
                            no_ack: true,
                            ..BasicConsumeOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await?;
                while let Some(delivery) = consumer.next().await {
                    let delivery = delivery?;
                    match read_events(&delivery.data) {
                        Ok(events) => {
                            for event in events {
                                if out.send(event).await.is_err() {
                                    return Ok(());
                                }
                            }
                        }
                        Err(err) => {
                            tracing::error!(%err, "an event that is not a kaiwa event was dropped")
                        }
                    }
                }
                Ok(())
            }
        });
        Ok(into_stream(rx))
    }

    async fn depth(&self) -> Option<usize> {
        let link = self.inner.link().await.ok()?;
        let queue = link
            .publisher
            .queue_declare(
                JOBS.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .ok()?;
        usize::try_from(queue.message_count()).ok()
    }

    fn unavailable(&self) -> Option<String> {
        self.inner.link.borrow().is_none().then(|| {
            format!(
                "RabbitMQ at {} is unreachable; reconnecting",
                self.inner.describe
            )
        })
    }

    async fn close(&self) {
        self.inner.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn processing(client: &str, message_id: i64) -> Event {
        Event::Processing(super::super::MessageRef {
            client_id: crate::domain::ClientId::parse(client).expect("an id"),
            message_id,
            client_message_id: None,
            receipt: None,
        })
    }

    #[test]
    fn a_batch_and_a_lone_event_both_read_as_events() {
        let events = vec![processing("a", 1), processing("b", 2)];
        let batch = serde_json::to_vec(&events).expect("JSON");
        assert_eq!(read_events(&batch).expect("a batch"), events);
        let alone = serde_json::to_vec(&events[0]).expect("JSON");
        assert_eq!(read_events(&alone).expect("one event"), &events[..1]);
        assert!(read_events(b"[{\"Nope\": 1}]").is_err());
    }

    #[test]
    fn events_are_grouped_by_gateway_in_the_order_they_came() {
        let gateway = |id: &str| GatewayId::new(id);
        let outgoing = |to: &str, message_id| Outgoing {
            gateway: gateway(to),
            event: processing("a", message_id),
            routed: oneshot::channel().0,
        };
        let events = [
            outgoing("gw-1", 1),
            outgoing("gw-2", 2),
            outgoing("gw-1", 3),
            outgoing("gw-1", 4),
        ];
        let groups: Vec<(String, Vec<i64>)> = by_gateway(events.into_iter())
            .into_iter()
            .map(|(to, group)| {
                let ids = group
                    .iter()
                    .filter_map(|o| o.event.message().map(|m| m.message_id))
                    .collect();
                (to.as_str().to_owned(), ids)
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

    #[test]
    fn a_broker_is_described_without_its_password() {
        assert_eq!(
            AmqpQueue::describe_url("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            AmqpQueue::describe_url("amqp://kaiwa:pw@rabbit.internal/kaiwa"),
            "amqp://kaiwa@rabbit.internal:5672/kaiwa"
        );
    }

    #[test]
    fn an_unreadable_url_is_never_shown_even_in_part() {
        // A password with a slash in it: split naively, it would be taken for the host.
        for url in [
            "amqp://user:pa/ss@host/vhost",
            "amqp://user:s3cret@",
            "amqp://user:s3cret@host:notaport/v",
        ] {
            let described = AmqpQueue::describe_url(url);
            assert!(
                !described.contains("pa/ss") && !described.contains("s3cret"),
                "{described}"
            );
            if let Err(message) = AmqpQueue::check_url(url) {
                assert!(
                    !message.contains("ss@") && !message.contains("s3cret"),
                    "{message}"
                );
            }
        }
        assert!(AmqpQueue::check_url("amqp://user:s3cret@host:notaport/v").is_err());
    }
}
