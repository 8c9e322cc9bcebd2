//! The channel from a store's callers to its one writer, with a doorbell: a command wakes the
//! writer only when it cannot wait for the writer's next turn. A writer woken by every command
//! switched threads once or twice a message for a quarter of a call each (docs/architecture.md,
//! "What a call costs"); now it sleeps through its write interval and through the writes it
//! makes, and takes what came when it is done.

use super::StoreError;
use super::batch::Command;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio::sync::Notify;
use tokio::time::Instant;

/// A batch of this many commands goes at once, however soon after the call before.
pub(super) const FULL_ENOUGH: usize = 64;

/// What wakes a writer that waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wake {
    /// Any command: the writer has nothing to do.
    Any,
    /// Any command but a delivery mark or an acknowledgement: the writer holds updates that
    /// wait for a batch to ride with, and more of them can wait as well.
    Write,
    /// An urgent command ([`Command::is_urgent`]) or a full batch ([`FULL_ENOUGH`]): the writer
    /// waits until its batch is due.
    Urgent,
    /// Nothing: the writer is writing, or was woken already, and looks at what came before it
    /// waits again.
    Never,
}

/// What waits in the inbox, for the writer to decide whether to take it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Pending {
    pub len: usize,
    /// Commands other than delivery marks and acknowledgements, which may wait.
    pub writes: usize,
    /// Whether one of them is urgent.
    pub urgent: bool,
}

impl Wake {
    /// Whether `command`, just added to what waits (`pending`), wakes a writer that listens
    /// for `self`. Delivery marks and acknowledgements alone never need the writer early, however
    /// many: it holds them anyway ([`Schedule::decide`]).
    fn rings(self, command: &Command, pending: &Pending) -> bool {
        match self {
            Self::Any => true,
            Self::Write => !command.may_wait(),
            Self::Urgent => command.is_urgent() || pending.len >= FULL_ENOUGH,
            Self::Never => false,
        }
    }
}

impl Pending {
    fn add(&mut self, command: &Command) {
        self.len += 1;
        if !command.may_wait() {
            self.writes += 1;
        }
        self.urgent |= command.is_urgent();
    }
}

/// How a writer waits: what wakes it, and until when at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Listen {
    pub wake: Wake,
    pub until: Option<Instant>,
}

/// What the writer does next ([`Receiver::take_or_listen`]).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Turn {
    /// It took what waited, and writes it.
    Took,
    /// It waits ([`Receiver::wait`]).
    Listen(Listen),
    /// Nothing waits and the store dropped its sender without closing: the writer ends.
    Abandoned,
}

struct State {
    commands: Vec<Command>,
    pending: Pending,
    wake: Wake,
    /// The writer ended: sends fail.
    closed: bool,
    /// The sender is gone.
    abandoned: bool,
}

struct Shared {
    state: Mutex<State>,
    bell: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing that can panic runs under the lock but a `Vec` growing; the state stays whole.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The sending half, one per store.
pub(super) struct Sender {
    shared: Arc<Shared>,
}

/// The writer's half.
pub(super) struct Receiver {
    shared: Arc<Shared>,
}

pub(super) fn channel() -> (Sender, Receiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            commands: Vec::new(),
            pending: Pending::default(),
            // Until the writer first looks, a command must wake it.
            wake: Wake::Any,
            closed: false,
            abandoned: false,
        }),
        bell: Notify::new(),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

impl Sender {
    /// Unbounded because every command stems from a message holding an in-flight slot or a
    /// reply frame in a bounded outbox: the limits upstream bound it.
    pub(super) fn send(&self, command: Command) -> Result<(), StoreError> {
        let ring = {
            let mut state = self.shared.lock();
            if state.closed {
                return Err(StoreError::Closed);
            }
            state.pending.add(&command);
            let ring = state.wake.rings(&command, &state.pending);
            state.commands.push(command);
            if ring {
                state.wake = Wake::Never;
            }
            ring
        };
        // Outside the lock: the writer it wakes takes the lock first thing. A writer not yet
        // waiting finds the permit this leaves when it does.
        if ring {
            self.shared.bell.notify_one();
        }
        Ok(())
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.shared.lock().abandoned = true;
        self.shared.bell.notify_one();
    }
}

impl Drop for Receiver {
    /// A writer that ends without closing (it panicked) fails what waits and what comes after,
    /// instead of leaving its callers waiting for answers that never come.
    fn drop(&mut self) {
        let orphans = self.close();
        // Dropped outside the lock: each drop answers a caller, who may send again at once.
        drop(orphans);
    }
}

impl Receiver {
    /// Shows the writer what waits, and under the same lock either takes up to `max` commands
    /// into `into` or listens for what `decide` says should wake it: a command sent between
    /// the look and the wait cannot slip by.
    pub(super) fn take_or_listen(
        &self,
        into: &mut Vec<Command>,
        max: usize,
        decide: impl FnOnce(&Pending) -> Option<Listen>,
    ) -> Turn {
        let mut state = self.shared.lock();
        if state.pending.len == 0 && state.abandoned {
            return Turn::Abandoned;
        }
        let decided = if state.abandoned {
            None
        } else {
            decide(&state.pending)
        };
        if let Some(listen) = decided {
            state.wake = listen.wake;
            return Turn::Listen(listen);
        }
        state.wake = Wake::Never;
        state.take(into, max);
        Turn::Took
    }

    /// Waits for the doorbell, or until `listen.until`.
    pub(super) async fn wait(&self, listen: Listen) {
        let rung = self.shared.bell.notified();
        match listen.until {
            Some(until) => {
                // Either way the writer looks again: a timeout is no error.
                let _timed_out = tokio::time::timeout_at(until, rung).await;
            }
            None => rung.await,
        }
    }

    /// Refuses every later command and takes those that came before.
    pub(super) fn close(&self) -> Vec<Command> {
        let mut state = self.shared.lock();
        state.closed = true;
        let mut rest = Vec::new();
        state.take(&mut rest, usize::MAX);
        rest
    }
}

impl State {
    fn take(&mut self, into: &mut Vec<Command>, max: usize) {
        if self.commands.len() <= max {
            if into.is_empty() {
                // The writer's emptied vector comes back for the next commands, and its room
                // with it.
                std::mem::swap(&mut self.commands, into);
            } else {
                into.append(&mut self.commands);
            }
            self.pending = Pending::default();
        } else {
            into.extend(self.commands.drain(..max));
            let mut pending = Pending::default();
            for command in &self.commands {
                pending.add(command);
            }
            self.pending = pending;
        }
    }
}

/// When a connected writer takes what waits: the policy both writers share.
#[derive(Debug, Clone, Copy)]
pub(super) struct Schedule {
    /// When a small batch of writes goes: the write interval after the last call began.
    /// `None`: as soon as the writer is free.
    pub writes_due: Option<Instant>,
    /// When the updates that wait for a batch to ride with are written alone; `None` when none
    /// wait.
    pub backlog_due: Option<Instant>,
}

impl Schedule {
    /// `None` to take what waits now, else how to wait for more.
    pub(super) fn decide(&self, pending: &Pending, now: Instant) -> Option<Listen> {
        let backlog_due = self.backlog_due;
        if pending.urgent || pending.len >= FULL_ENOUGH || backlog_due.is_some_and(|d| d <= now) {
            return None;
        }
        if pending.writes > 0 {
            return match self.writes_due {
                Some(due) if now < due => Some(Listen {
                    wake: Wake::Urgent,
                    // Held updates due first go then, and take the writes with them.
                    until: Some(backlog_due.map_or(due, |held| held.min(due))),
                }),
                _ => None,
            };
        }
        match backlog_due {
            // Updates that may wait stay here until the held ones go, and go with them.
            Some(due) => Some(Listen {
                wake: Wake::Write,
                until: Some(due),
            }),
            // The first of them is taken to be held, which sets when they go.
            None if pending.len > 0 => None,
            None => Some(Listen {
                wake: Wake::Any,
                until: None,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::batch::{DeliveryUpdate, StreamUpdate};
    use super::super::contract::message;
    use super::*;
    use crate::domain::ClientId;
    use chrono::Utc;
    use kaiwa_protocol::Delivery;
    use std::time::Duration;
    use tokio::sync::oneshot;

    fn a_message() -> Command {
        Command::Message(Box::new(message("ann", None, "hi")), oneshot::channel().0)
    }

    fn a_mark() -> Command {
        Command::Delivery(DeliveryUpdate {
            reply_id: 1,
            delivery: Delivery::Delivered,
            at: Utc::now(),
        })
    }

    fn a_departure() -> Command {
        Command::Departure(StreamUpdate {
            client_id: ClientId::parse("ann").expect("an id"),
            seq: 0,
            at: Utc::now(),
        })
    }

    fn listen(wake: Wake) -> impl FnOnce(&Pending) -> Option<Listen> {
        move |_| Some(Listen { wake, until: None })
    }

    /// Whether the doorbell rang since the writer last waited. On the paused clock a bell that
    /// did not ring shows as the timeout passing at once.
    async fn rang(receiver: &Receiver) -> bool {
        tokio::time::timeout(Duration::from_secs(1), receiver.shared.bell.notified())
            .await
            .is_ok()
    }

    /// Sends `commands` to a writer that listens for `wake`, and says whether each rang.
    async fn rings(wake: Wake, commands: Vec<Command>) -> Vec<bool> {
        let (sender, receiver) = channel();
        let mut rung = Vec::new();
        for command in commands {
            let turn = receiver.take_or_listen(&mut Vec::new(), usize::MAX, listen(wake));
            assert!(matches!(turn, Turn::Listen(_)));
            sender.send(command).expect("open");
            rung.push(rang(&receiver).await);
        }
        rung
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_writer_is_woken_by_any_command() {
        assert_eq!(
            rings(Wake::Any, vec![a_mark(), a_message(), a_departure()]).await,
            [true, true, true]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_writer_holding_updates_is_woken_by_writes_only() {
        assert_eq!(
            rings(Wake::Write, vec![a_mark(), a_message(), a_departure()]).await,
            [false, true, true]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_writer_in_its_interval_is_woken_by_urgent_commands_only() {
        assert_eq!(
            rings(Wake::Urgent, vec![a_mark(), a_message(), a_departure()]).await,
            [false, false, true]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_wakes_a_writer_in_its_interval_once() {
        let (sender, receiver) = channel();
        receiver.take_or_listen(&mut Vec::new(), usize::MAX, listen(Wake::Urgent));
        for _ in 1..FULL_ENOUGH {
            sender.send(a_message()).expect("open");
        }
        assert!(!rang(&receiver).await, "not full yet");
        sender.send(a_message()).expect("open");
        assert!(rang(&receiver).await, "full");
        // Rung once: until the writer listens again, nothing rings.
        sender.send(a_departure()).expect("open");
        assert!(!rang(&receiver).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_writing_writer_is_never_woken() {
        let (sender, receiver) = channel();
        sender.send(a_message()).expect("open");
        assert!(rang(&receiver).await);
        let mut taken = Vec::new();
        let turn = receiver.take_or_listen(&mut taken, usize::MAX, |_| None);
        assert_eq!(turn, Turn::Took);
        assert_eq!(taken.len(), 1);
        sender.send(a_departure()).expect("open");
        assert!(!rang(&receiver).await);
        // What came while it wrote is what it sees next.
        let mut seen = Pending::default();
        receiver.take_or_listen(&mut Vec::new(), usize::MAX, |pending| {
            seen = *pending;
            Some(Listen {
                wake: Wake::Any,
                until: None,
            })
        });
        assert_eq!(
            seen,
            Pending {
                len: 1,
                writes: 1,
                urgent: true
            }
        );
    }

    #[test]
    fn a_writer_takes_at_most_max_and_sees_the_rest() {
        let (sender, receiver) = channel();
        for command in [a_departure(), a_mark(), a_message(), a_mark()] {
            sender.send(command).expect("open");
        }
        let mut taken = Vec::new();
        receiver.take_or_listen(&mut taken, 2, |_| None);
        assert_eq!(taken.len(), 2);
        let mut seen = Pending::default();
        receiver.take_or_listen(&mut taken, 8, |pending| {
            seen = *pending;
            None
        });
        assert_eq!(
            seen,
            Pending {
                len: 2,
                writes: 1,
                urgent: false
            }
        );
        assert_eq!(taken.len(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_sender_wakes_the_writer_which_ends_after_the_rest() {
        let (sender, receiver) = channel();
        receiver.take_or_listen(&mut Vec::new(), usize::MAX, listen(Wake::Urgent));
        sender.send(a_mark()).expect("open");
        drop(sender);
        assert!(rang(&receiver).await);
        let mut taken = Vec::new();
        let never = |_: &Pending| -> Option<Listen> { panic!("nothing is waited for") };
        assert_eq!(receiver.take_or_listen(&mut taken, 8, never), Turn::Took);
        assert_eq!(taken.len(), 1);
        assert_eq!(
            receiver.take_or_listen(&mut taken, 8, never),
            Turn::Abandoned
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_writer_that_ends_without_closing_fails_what_waits_and_what_comes() {
        let (sender, receiver) = channel();
        let (respond, waiting) = oneshot::channel();
        sender
            .send(Command::Message(
                Box::new(message("ann", None, "hi")),
                respond,
            ))
            .expect("open");
        drop(receiver);
        let answer = tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("the caller is answered");
        assert!(answer.is_err(), "with the store closed");
        assert!(sender.send(a_message()).is_err());
    }

    #[test]
    fn a_closed_inbox_refuses_commands_and_gives_back_those_before() {
        let (sender, receiver) = channel();
        sender.send(a_mark()).expect("open");
        assert_eq!(receiver.close().len(), 1);
        assert!(sender.send(a_message()).is_err());
    }

    mod schedule {
        use super::*;

        const MS: Duration = Duration::from_millis(1);

        fn pending(len: usize, writes: usize, urgent: bool) -> Pending {
            Pending {
                len,
                writes,
                urgent,
            }
        }

        fn listen(wake: Wake, until: Option<Instant>) -> Option<Listen> {
            Some(Listen { wake, until })
        }

        #[test]
        fn nothing_waiting_waits_for_any_command() {
            let now = Instant::now();
            let idle = Schedule {
                writes_due: Some(now + MS),
                backlog_due: None,
            };
            assert_eq!(
                idle.decide(&Pending::default(), now),
                listen(Wake::Any, None)
            );
        }

        #[test]
        fn writes_wait_until_due_unless_urgent_or_full() {
            let now = Instant::now();
            let due = now + 8 * MS;
            let schedule = Schedule {
                writes_due: Some(due),
                backlog_due: None,
            };
            assert_eq!(
                schedule.decide(&pending(3, 2, false), now),
                listen(Wake::Urgent, Some(due))
            );
            assert_eq!(schedule.decide(&pending(3, 2, false), due), None);
            assert_eq!(schedule.decide(&pending(3, 3, true), now), None);
            assert_eq!(schedule.decide(&pending(FULL_ENOUGH, 1, false), now), None);
            let at_once = Schedule {
                writes_due: None,
                backlog_due: None,
            };
            assert_eq!(at_once.decide(&pending(1, 1, false), now), None);
        }

        #[test]
        fn held_updates_going_first_take_the_writes_with_them() {
            let now = Instant::now();
            let schedule = Schedule {
                writes_due: Some(now + 8 * MS),
                backlog_due: Some(now + 2 * MS),
            };
            assert_eq!(
                schedule.decide(&pending(1, 1, false), now),
                listen(Wake::Urgent, Some(now + 2 * MS))
            );
            assert_eq!(schedule.decide(&pending(1, 1, false), now + 2 * MS), None);
        }

        #[test]
        fn updates_are_held_and_more_of_them_wait_with_them() {
            let now = Instant::now();
            let none_held = Schedule {
                writes_due: None,
                backlog_due: None,
            };
            assert_eq!(none_held.decide(&pending(2, 0, false), now), None);
            let held = Schedule {
                writes_due: None,
                backlog_due: Some(now + 50 * MS),
            };
            assert_eq!(
                held.decide(&pending(2, 0, false), now),
                listen(Wake::Write, Some(now + 50 * MS))
            );
            assert_eq!(held.decide(&Pending::default(), now + 50 * MS), None);
        }
    }
}
