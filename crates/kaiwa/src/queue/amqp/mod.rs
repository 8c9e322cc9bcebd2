//! The queue between processes: RabbitMQ. Jobs go to one durable queue that every worker takes
//! from, published persistently and confirmed; a job stays a worker's until it says `done`, and
//! goes to another worker if that one dies first. Events go through a direct exchange to the
//! queue of the gateway they are for (one per gateway, gone with it), published as mandatory so
//! that an event for a gateway that is no longer there comes back instead of vanishing. Both
//! travel in batches ([`batches`]): those that wait while earlier ones are being confirmed go
//! as one AMQP message (a `processing` and the reply right behind it, the replies of several
//! clients, the jobs of several gateways' clients), which the broker routes and confirms once.
//!
//! The connection is kaiwa's to keep: when it breaks, a supervisor reconnects with backoff,
//! declares the queues again and restarts the consumers. An outage of the broker is a delay:
//! a publish that cannot go through waits for the next connection and is made again on it (the
//! process's outbox is the publishes waiting so), so nothing accepted waits for the sweeper.

mod batches;

use super::{Done, Event, GatewayId, Job, Queue, QueueError, Routed, Taken, record_publish};
use async_trait::async_trait;
use batches::{EVENTS_ROUTE, JOBS_ROUTE, Outgoing};
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, BasicRejectOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};
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
    /// Jobs and events on their way to the tasks that publish them in batches.
    jobs: mpsc::UnboundedSender<Outgoing<Job>>,
    events: mpsc::UnboundedSender<Outgoing<Event>>,
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
        let (jobs, outgoing_jobs) = mpsc::unbounded_channel();
        let (events, outgoing_events) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            url: url.to_owned(),
            describe,
            options,
            link: tx,
            stop: CancellationToken::new(),
            broken: Notify::new(),
            jobs,
            events,
        });
        tokio::spawn(supervise(inner.clone(), link));
        tokio::spawn(batches::send(inner.clone(), JOBS_ROUTE, outgoing_jobs));
        tokio::spawn(batches::send(inner.clone(), EVENTS_ROUTE, outgoing_events));
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

/// The ack of one AMQP message of jobs, on the channel it was delivered on: sent when the last
/// of its jobs is done. Until then the broker keeps them all, and a worker that dies takes the
/// whole message back to the queue, its jobs done before included (processing one again is
/// harmless: the worker finds its replies stored).
struct BatchAck {
    acker: lapin::Acker,
    left: AtomicUsize,
}

/// One job's part of its message's ack, and its place among the jobs a worker holds.
struct Ack {
    batch: Arc<BatchAck>,
    _held: OwnedSemaphorePermit,
}

#[async_trait]
impl Done for Ack {
    async fn done(self: Box<Self>) -> Result<(), QueueError> {
        if self.batch.left.fetch_sub(1, Ordering::AcqRel) > 1 {
            return Ok(());
        }
        let acked = self
            .batch
            .acker
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
        let started = std::time::Instant::now();
        let (outgoing, fate) = Outgoing::job(job);
        self.inner
            .jobs
            .send(outgoing)
            .map_err(|_| QueueError::Closed)?;
        fate.await.map_err(|_| QueueError::Closed)??;
        // The wait for the batch to go counts: it is part of the job's way to a worker.
        record_publish("job", started);
        Ok(())
    }

    fn jobs(&self) -> Result<BoxStream<'static, Taken>, QueueError> {
        let prefetch = self.inner.options.prefetch;
        let (tx, rx) = mpsc::channel(usize::from(prefetch).max(1));
        // The broker counts messages unacked, and a message may carry several jobs: the jobs a
        // worker holds are counted here, so that `prefetch` still bounds them.
        let held = Arc::new(Semaphore::new(usize::from(prefetch).max(1)));
        keep_consuming(self.inner.clone(), tx, move |channel, out| {
            let held = held.clone();
            async move {
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
                    match batches::read::<Job>(&delivery.data) {
                        Ok(jobs) if !jobs.is_empty() => {
                            let batch = Arc::new(BatchAck {
                                acker: delivery.acker,
                                left: AtomicUsize::new(jobs.len()),
                            });
                            for job in jobs {
                                let Ok(place) = held.clone().acquire_owned().await else {
                                    return Ok(());
                                };
                                let ack = Ack {
                                    batch: batch.clone(),
                                    _held: place,
                                };
                                let taken = Taken::new(job, delivery.redelivered, Box::new(ack));
                                if out.send(taken).await.is_err() {
                                    return Ok(());
                                }
                            }
                        }
                        Ok(_) => {
                            // An empty batch has nothing to do.
                            delivery.acker.ack(BasicAckOptions::default()).await?;
                        }
                        Err(err) => {
                            // It would only come back: drop it, and say so.
                            tracing::error!(%err, "a message that holds no kaiwa jobs was dropped from the queue");
                            delivery
                                .acker
                                .reject(BasicRejectOptions { requeue: false })
                                .await?;
                        }
                    }
                }
                Ok(())
            }
        });
        Ok(into_stream(rx))
    }

    async fn publish_event(&self, gateway: &GatewayId, event: Event) -> Result<Routed, QueueError> {
        Ok(if self.publish_events(gateway, vec![event]).await? == 1 {
            Routed::Delivered
        } else {
            Routed::NoGateway
        })
    }

    async fn publish_events(
        &self,
        gateway: &GatewayId,
        events: Vec<Event>,
    ) -> Result<usize, QueueError> {
        let started = std::time::Instant::now();
        let count = events.len();
        // One item of the publisher's: it never splits them, so they reach the gateway in one
        // message, or all come back.
        let (outgoing, fate) = Outgoing::to(gateway.as_str().to_owned().into(), events);
        self.inner
            .events
            .send(outgoing)
            .map_err(|_| QueueError::Closed)?;
        let returned = fate.await.map_err(|_| QueueError::Closed)??;
        // The wait for the batch to go counts: it is part of each event's way to its gateway.
        for _ in 0..count {
            record_publish("event", started);
        }
        Ok(if returned { 0 } else { count })
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
                    match batches::read::<Event>(&delivery.data) {
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
