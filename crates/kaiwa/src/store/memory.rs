//! An in-memory store: the [`Store`] contract with nothing on disk, for tests that exercise
//! the layers above the store (HTTP handlers, sessions) without files or sockets. Everything is
//! lost when it is dropped.

use super::{
    Existing, Inserted, MissedReply, NewMessage, NewReply, Store, StoreError, StoreFuture,
    StoredMessage, StoredReply,
};
use crate::domain::ClientId;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use kaiwa_protocol::{Delivery, MessageStatus};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

#[derive(Debug, Default)]
pub struct MemoryStore {
    data: Mutex<Data>,
    closed: AtomicBool,
}

#[derive(Debug, Default)]
struct Data {
    /// By id; ids are assigned in call order, from 1.
    messages: BTreeMap<i64, StoredMessage>,
    /// `(client, client message id)` to message id: a native resend finds the first.
    by_client_message_id: HashMap<(ClientId, String), i64>,
    /// Reply id to the message holding it.
    reply_owner: HashMap<i64, i64>,
    /// Each client's replies in stream order: `seq` to reply id.
    streams: HashMap<ClientId, BTreeMap<u64, i64>>,
    /// How far each client acknowledged its stream.
    acknowledged: HashMap<ClientId, u64>,
    next_reply_id: i64,
}

impl Data {
    fn reply_mut(&mut self, reply_id: i64) -> Option<&mut StoredReply> {
        let message_id = *self.reply_owner.get(&reply_id)?;
        self.messages
            .get_mut(&message_id)?
            .replies
            .iter_mut()
            .find(|reply| reply.id == reply_id)
    }

    fn reply(&self, reply_id: i64) -> Option<&StoredReply> {
        let message_id = *self.reply_owner.get(&reply_id)?;
        self.messages
            .get(&message_id)?
            .replies
            .iter()
            .find(|reply| reply.id == reply_id)
    }

    /// The reply ids of a client's stream in a range of `seq`.
    fn stream_ids(&self, client_id: &ClientId, range: impl std::ops::RangeBounds<u64>) -> Vec<i64> {
        self.streams
            .get(client_id)
            .map(|stream| stream.range(range).map(|(_, &id)| id).collect())
            .unwrap_or_default()
    }
}

impl MemoryStore {
    fn lock(&self) -> MutexGuard<'_, Data> {
        // Every change is made under the lock in one go; a panic in a test cannot leave it torn
        // in a way that matters more than the panic itself.
        self.data
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn open(&self) -> Result<(), StoreError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        Ok(())
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn insert_message(&self, message: NewMessage) -> StoreFuture<Inserted> {
        let inserted = self.open().map(|()| {
            let mut data = self.lock();
            if let Some(client_message_id) = &message.client_message_id {
                let key = (message.client_id.clone(), client_message_id.clone());
                if let Some(stored) = data
                    .by_client_message_id
                    .get(&key)
                    .and_then(|id| data.messages.get(id))
                {
                    return Inserted::Duplicate(Existing {
                        id: stored.id,
                        status: stored.status,
                        reason: stored.reason.clone(),
                        received_at: stored.received_at,
                    });
                }
            }
            let id = data.messages.keys().next_back().map_or(1, |last| last + 1);
            if let Some(client_message_id) = &message.client_message_id {
                data.by_client_message_id
                    .insert((message.client_id.clone(), client_message_id.clone()), id);
            }
            data.messages.insert(id, StoredMessage::new(id, message));
            Inserted::New(id)
        });
        Box::pin(std::future::ready(inserted))
    }

    async fn insert_replies(
        &self,
        message_id: i64,
        client_id: &ClientId,
        replies: Vec<NewReply>,
        created_at: DateTime<Utc>,
        completes: bool,
    ) -> Result<Vec<StoredReply>, StoreError> {
        self.open()?;
        let mut data = self.lock();
        let Data {
            messages,
            reply_owner,
            streams,
            next_reply_id,
            ..
        } = &mut *data;
        let message = messages
            .get_mut(&message_id)
            .ok_or_else(|| StoreError::Corrupt(format!("no message {message_id}")))?;
        let stream = streams.entry(client_id.clone()).or_default();
        let mut answer = Vec::with_capacity(replies.len());
        for reply in replies {
            // One reply of each type per message: a job processed twice gets the first set.
            if let Some(stored) = message
                .replies
                .iter()
                .find(|stored| stored.reply_type == reply.reply_type)
            {
                answer.push(stored.clone());
                continue;
            }
            *next_reply_id += 1;
            let seq = stream.keys().next_back().map_or(1, |last| last + 1);
            let stored = reply.stored(*next_reply_id, message_id, seq, created_at);
            stream.insert(seq, stored.id);
            reply_owner.insert(stored.id, message_id);
            message.replies.push(stored.clone());
            answer.push(stored);
        }
        if completes && message.status == MessageStatus::Accepted {
            message.status = MessageStatus::Replied;
        }
        Ok(answer)
    }

    fn record_delivery(&self, reply_id: i64, delivery: Delivery, at: DateTime<Utc>) {
        let mut data = self.lock();
        if let Some(reply) = data.reply_mut(reply_id)
            && reply.delivery != Delivery::Delivered
        {
            reply.delivery = delivery;
            reply.delivered_at = (delivery == Delivery::Delivered).then_some(at);
        }
    }

    fn record_received(&self, client_id: &ClientId, seq: u64, at: DateTime<Utc>) {
        let mut data = self.lock();
        let since = data.acknowledged.get(client_id).copied().unwrap_or(0);
        if seq <= since {
            return;
        }
        data.acknowledged.insert(client_id.clone(), seq);
        for id in data.stream_ids(client_id, since.saturating_add(1)..=seq) {
            if let Some(reply) = data.reply_mut(id)
                && reply.delivery != Delivery::Delivered
            {
                reply.delivery = Delivery::Delivered;
                reply.delivered_at = Some(at);
            }
        }
    }

    fn record_departure(&self, client_id: &ClientId, acknowledged: u64, _at: DateTime<Utc>) {
        let mut data = self.lock();
        for id in data.stream_ids(client_id, acknowledged.saturating_add(1)..) {
            if let Some(reply) = data.reply_mut(id)
                && reply.delivery == Delivery::Pending
            {
                reply.delivery = Delivery::Failed;
            }
        }
    }

    async fn message(&self, id: i64) -> Result<Option<StoredMessage>, StoreError> {
        Ok(self.lock().messages.get(&id).cloned())
    }

    async fn history(
        &self,
        client_id: &ClientId,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let data = self.lock();
        Ok(data
            .messages
            .range(..before.unwrap_or(i64::MAX))
            .rev()
            .filter(|(_, message)| &message.client_id == client_id)
            .take(limit as usize)
            .map(|(_, message)| message.clone())
            .collect())
    }

    async fn history_by_offset(
        &self,
        client_id: &ClientId,
        offset: u64,
        limit: u32,
    ) -> Result<(Vec<StoredMessage>, u64), StoreError> {
        let data = self.lock();
        let theirs: Vec<&StoredMessage> = data
            .messages
            .values()
            .rev()
            .filter(|message| &message.client_id == client_id)
            .collect();
        let total = theirs.len() as u64;
        let page = theirs
            .into_iter()
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
            .take(limit as usize)
            .cloned()
            .collect();
        Ok((page, total))
    }

    async fn replies_after(
        &self,
        client_id: &ClientId,
        after: u64,
        limit: u32,
    ) -> Result<Vec<MissedReply>, StoreError> {
        let data = self.lock();
        let ids = data.stream_ids(client_id, after.saturating_add(1)..);
        Ok(ids
            .into_iter()
            .take(limit as usize)
            .filter_map(|id| {
                let reply = data.reply(id)?.clone();
                let message = data.messages.get(&reply.message_id)?;
                let completes = message.status == MessageStatus::Replied
                    && message.replies.iter().all(|other| other.seq <= reply.seq);
                Some(MissedReply {
                    client_message_id: message.client_message_id.clone(),
                    reply,
                    completes,
                })
            })
            .collect())
    }

    async fn latest_seq(&self, client_id: &ClientId) -> Result<u64, StoreError> {
        let data = self.lock();
        Ok(data
            .streams
            .get(client_id)
            .and_then(|stream| stream.keys().next_back().copied())
            .unwrap_or(0))
    }

    async fn acknowledged(&self, client_id: &ClientId) -> Result<u64, StoreError> {
        Ok(self
            .lock()
            .acknowledged
            .get(client_id)
            .copied()
            .unwrap_or(0))
    }

    async fn unfinished_messages(&self) -> Result<Vec<StoredMessage>, StoreError> {
        let data = self.lock();
        Ok(data
            .messages
            .values()
            .filter(|message| message.status == MessageStatus::Accepted)
            .map(|message| StoredMessage {
                replies: Vec::new(),
                ..message.clone()
            })
            .collect())
    }

    async fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }
}
