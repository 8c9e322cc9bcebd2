//! Text replies: the [`TextResponder`] trait, what a responder is given ([`ReplyRequest`],
//! earlier [`Turn`]s, a [`Deltas`] sink for streaming), and the built-in responder used when no
//! language model is configured.

use crate::domain::ClientId;
use async_trait::async_trait;
use chrono::{DateTime, Timelike};
use chrono_tz::Tz;
use kaiwa_protocol::MessageType;
use tokio::sync::mpsc;

/// What a responder knows about the message it answers.
#[derive(Debug)]
pub struct ReplyRequest<'a> {
    pub client_id: &'a ClientId,
    pub kind: MessageType,
    /// The text of a text message.
    pub text: Option<&'a str>,
    /// The client's name of a media file.
    pub filename: Option<&'a str>,
    pub size_bytes: Option<u64>,
    /// Now, in the client's timezone.
    pub local_time: DateTime<Tz>,
    /// Earlier turns of this client's conversation, oldest first (as many as
    /// [`TextResponder::context_turns`] asked for).
    pub history: &'a [Turn],
}

/// One side of an earlier exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub role: Role,
    pub text: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    User,
    Assistant,
}

/// Where a responder puts the pieces of a reply as it writes them, for clients that show the
/// reply growing. The whole text is still what `respond` returns.
#[derive(Debug, Clone)]
pub struct Deltas(Option<mpsc::UnboundedSender<String>>);

impl Deltas {
    /// Pieces go nowhere: nobody shows this reply growing.
    pub fn discard() -> Self {
        Self(None)
    }

    /// A sink and the stream of what is put in it. Unbounded, because a reply's length is
    /// bounded by the model's token limit.
    pub fn channel() -> (Self, mpsc::UnboundedReceiver<String>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self(Some(tx)), rx)
    }

    pub fn send(&self, piece: String) {
        if let Some(tx) = &self.0
            && tx.send(piece).is_err()
        {
            // The reader is gone (its message was abandoned): the pieces have no audience.
            tracing::trace!("a reply piece was written after its reader left");
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ResponderError {
    #[error("the responder gave up after {attempts} attempt(s): {reason}")]
    GaveUp { attempts: u32, reason: String },
}

#[async_trait]
pub trait TextResponder: Send + Sync + 'static {
    /// A short name for logs and `/health`.
    fn name(&self) -> &'static str;

    /// How many earlier turns of the client's history to pass as context.
    fn context_turns(&self) -> usize {
        0
    }

    /// Writes the reply, putting its pieces in `deltas` as they come if it can.
    async fn respond(
        &self,
        request: &ReplyRequest<'_>,
        deltas: &Deltas,
    ) -> Result<String, ResponderError>;
}

/// Answers without any external service: short, friendly, aware of the client's local time.
#[derive(Debug, Default, Clone, Copy)]
pub struct BuiltinResponder;

#[async_trait]
impl TextResponder for BuiltinResponder {
    fn name(&self) -> &'static str {
        "built-in"
    }

    async fn respond(
        &self,
        request: &ReplyRequest<'_>,
        _deltas: &Deltas,
    ) -> Result<String, ResponderError> {
        Ok(compose(request))
    }
}

fn greeting(local: &DateTime<Tz>) -> &'static str {
    match local.hour() {
        5..=11 => "Good morning",
        12..=17 => "Good afternoon",
        _ => "Good evening",
    }
}

fn excerpt(text: &str) -> String {
    const MAX: usize = 80;
    let text = text.trim();
    if text.chars().count() <= MAX {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(MAX).collect();
    cut.push('…');
    cut
}

fn size(bytes: Option<u64>) -> String {
    match bytes {
        Some(b) if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / f64::from(1 << 20)),
        Some(b) if b >= 1 << 10 => format!("{:.0} KiB", b as f64 / 1024.0),
        Some(b) => format!("{b} bytes"),
        None => "a file".to_owned(),
    }
}

fn is_greeting(text: &str) -> bool {
    let lower = text.trim().to_lowercase();
    let first = lower
        .split(|c: char| !c.is_alphanumeric())
        .find(|word| !word.is_empty())
        .unwrap_or_default();
    matches!(
        first,
        "hi" | "hello" | "hey" | "hallo" | "hola" | "chào" | "xin" | "yo"
    ) || lower.starts_with("good morning")
        || lower.starts_with("good evening")
        || lower.starts_with("good afternoon")
}

fn compose(request: &ReplyRequest<'_>) -> String {
    let local = &request.local_time;
    let clock = local.format("%H:%M");
    let zone = local.timezone().name();
    let name = request.filename.unwrap_or("your file");
    match request.kind {
        MessageType::Text => {
            let text = request.text.unwrap_or_default();
            if is_greeting(text) {
                format!(
                    "{}! It is {clock} where you are ({zone}). What is on your mind?",
                    greeting(local)
                )
            } else if text.trim_end().ends_with('?') {
                format!(
                    "Good question. I am kaiwa's built-in responder, so I cannot look that up, but I have noted it: “{}”",
                    excerpt(text)
                )
            } else {
                let words = text.split_whitespace().count();
                let plural = if words == 1 { "" } else { "s" };
                format!(
                    "Got it: “{}” ({words} word{plural}, {clock} your time).",
                    excerpt(text)
                )
            }
        }
        MessageType::Voice => format!(
            "{}! Thanks for your voice message ({}). Here is a spoken reply.",
            greeting(local),
            size(request.size_bytes)
        ),
        MessageType::Video => format!(
            "Thanks for the video “{name}” ({}). Here are a voice note and a picture in return.",
            size(request.size_bytes)
        ),
        MessageType::Image => format!(
            "Thanks for the picture “{name}” ({})! Here are a voice note and a picture back.",
            size(request.size_bytes)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn request<'a>(
        client: &'a ClientId,
        kind: MessageType,
        text: Option<&'a str>,
    ) -> ReplyRequest<'a> {
        let tz: Tz = "Asia/Ho_Chi_Minh".parse().expect("zone");
        ReplyRequest {
            client_id: client,
            kind,
            text,
            filename: Some("cat.png"),
            size_bytes: Some(2048),
            local_time: tz
                .with_ymd_and_hms(2026, 11, 21, 9, 5, 0)
                .single()
                .expect("time"),
            history: &[],
        }
    }

    #[tokio::test]
    async fn built_in_replies_fit_the_message() {
        let client = ClientId::parse("u1").expect("id");
        let responder = BuiltinResponder;
        let hello = responder
            .respond(
                &request(&client, MessageType::Text, Some("Hello there")),
                &Deltas::discard(),
            )
            .await
            .expect("never fails");
        assert_eq!(
            hello,
            "Good morning! It is 09:05 where you are (Asia/Ho_Chi_Minh). What is on your mind?"
        );
        let question = responder
            .respond(
                &request(&client, MessageType::Text, Some("What time is it?")),
                &Deltas::discard(),
            )
            .await
            .expect("never fails");
        assert!(question.contains("“What time is it?”"), "{question}");
        let image = responder
            .respond(
                &request(&client, MessageType::Image, None),
                &Deltas::discard(),
            )
            .await
            .expect("never fails");
        assert!(
            image.contains("cat.png") && image.contains("2 KiB"),
            "{image}"
        );
    }

    #[test]
    fn long_texts_are_cut_on_a_character_boundary() {
        let cut = excerpt(&"語".repeat(100));
        assert_eq!(cut.chars().count(), 81);
        assert!(cut.ends_with('…'));
    }
}
