//! What the replies to a message say and contain (R8): a text from a [`TextResponder`] (the
//! built-in one, or a language model), a spoken voice clip, a generated picture.

pub mod image;
pub mod model;
mod responder;
pub mod voice;

pub use responder::{
    BuiltinResponder, Deltas, ReplyRequest, ResponderError, Role, TextResponder, Turn,
};

use crate::queue::Job;
use crate::store::{NewReply, Store, StoredMessage};
use chrono::{DateTime, Utc};
use kaiwa_protocol::{MessageStatus, MessageType, ReplyType};
use std::sync::Arc;

/// Said when the responder fails, so that a text reply is never missing from a reply set.
pub const FALLBACK_TEXT: &str =
    "Sorry, I could not come up with a reply just now. Your message is safe and stored.";

/// Makes the replies of a message.
pub struct ReplyMaker {
    responder: Arc<dyn TextResponder>,
    /// For the earlier turns a responder may want as context.
    store: Arc<dyn Store>,
}

impl ReplyMaker {
    pub fn new(responder: Arc<dyn TextResponder>, store: Arc<dyn Store>) -> Self {
        Self { responder, store }
    }

    pub fn responder_name(&self) -> &'static str {
        self.responder.name()
    }

    /// The text reply. Never fails: when the responder gives up, the reply is
    /// [`FALLBACK_TEXT`], marked as a fallback.
    pub async fn text(&self, job: &Job, now: DateTime<Utc>, deltas: &Deltas) -> NewReply {
        let history = self.history(job).await;
        let request = ReplyRequest {
            client_id: &job.client_id,
            kind: job.kind,
            text: (!job.kind.is_media()).then_some(job.content.as_str()),
            filename: job.filename.as_deref(),
            size_bytes: job.size_bytes,
            local_time: now.with_timezone(&job.timezone.tz()),
            history: &history,
        };
        let (content, fallback) = match self.responder.respond(&request, deltas).await {
            Ok(text) => (text, false),
            Err(err) => {
                tracing::warn!(message_id = job.message_id, responder = self.responder.name(), %err, "text responder failed; sending the fallback reply");
                (FALLBACK_TEXT.to_owned(), true)
            }
        };
        NewReply {
            reply_type: ReplyType::Text,
            content,
            filename: None,
            mime_type: None,
            fallback,
        }
    }

    /// The voice and image replies the message's type calls for, in the order they are sent.
    pub fn media(&self, job: &Job) -> Vec<NewReply> {
        job.kind
            .reply_types()
            .iter()
            .filter_map(|reply_type| match reply_type {
                ReplyType::Text => None,
                ReplyType::Voice => Some(voice::reply(job.kind)),
                ReplyType::Image => Some(image::reply(job.message_id)),
            })
            .collect()
    }

    /// The client's turns before this message, oldest first. Context is a nicety: if it cannot
    /// be read, the reply is written without it.
    async fn history(&self, job: &Job) -> Vec<Turn> {
        let wanted = self.responder.context_turns();
        if wanted == 0 {
            return Vec::new();
        }
        let limit = u32::try_from(wanted).unwrap_or(u32::MAX);
        match self
            .store
            .history(&job.client_id, Some(job.message_id), limit)
            .await
        {
            Ok(messages) => turns(messages),
            Err(err) => {
                tracing::warn!(message_id = job.message_id, %err, "could not read the conversation for context");
                Vec::new()
            }
        }
    }
}

/// Turns for a model: each accepted message as a user turn, and its text reply (unless it was
/// a fallback) as the assistant's.
fn turns(newest_first: Vec<StoredMessage>) -> Vec<Turn> {
    let mut turns = Vec::with_capacity(newest_first.len() * 2);
    for message in newest_first.into_iter().rev() {
        if message.status == MessageStatus::Rejected {
            continue;
        }
        let said = match message.kind {
            MessageType::Text => message.content,
            kind => format!(
                "[sent a {kind} file: {}]",
                message.filename.as_deref().unwrap_or("unnamed")
            ),
        };
        turns.push(Turn {
            role: Role::User,
            text: said,
        });
        if let Some(reply) = message
            .replies
            .into_iter()
            .find(|r| r.reply_type == ReplyType::Text && !r.fallback)
        {
            turns.push(Turn {
                role: Role::Assistant,
                text: reply.content,
            });
        }
    }
    turns
}
