//! The prompt: a system prompt template filled with the client's time and place, the earlier
//! turns, and the message itself.

use super::wire::Message;
use crate::replies::{ReplyRequest, Role};

pub(crate) const DEFAULT_SYSTEM_PROMPT: &str = "You are kaiwa, a warm and concise chat companion. \
Reply in the language the user writes in, in one to three short sentences. \
The user is in the {timezone} timezone, where it is {weekday} {local_date}, {local_time}. \
Their latest message is a {message_type} message.";

/// A system prompt with placeholders: {timezone}, {local_time}, {local_date}, {weekday},
/// {message_type}, {client_id}. Unknown placeholders are left as written.
#[derive(Debug, Clone)]
pub(crate) struct PromptTemplate(String);

impl PromptTemplate {
    pub(crate) fn new(template: impl Into<String>) -> Self {
        Self(template.into())
    }

    pub(crate) fn render(&self, request: &ReplyRequest<'_>) -> String {
        let local = &request.local_time;
        [
            ("{timezone}", local.timezone().name().to_owned()),
            ("{local_time}", local.format("%H:%M").to_string()),
            ("{local_date}", local.format("%Y-%m-%d").to_string()),
            ("{weekday}", local.format("%A").to_string()),
            ("{message_type}", request.kind.as_str().to_owned()),
            ("{client_id}", request.client_id.to_string()),
        ]
        .into_iter()
        .fold(self.0.clone(), |text, (placeholder, value)| {
            text.replace(placeholder, &value)
        })
    }

    /// The messages of a request: system prompt, earlier turns, then this message.
    pub(crate) fn messages<'a>(&self, request: &ReplyRequest<'_>) -> Vec<Message<'a>> {
        let mut messages = Vec::with_capacity(request.history.len() + 2);
        messages.push(Message {
            role: "system",
            content: self.render(request),
        });
        for turn in request.history {
            messages.push(Message {
                role: match turn.role {
                    Role::User => "user",
                    Role::Assistant => "assistant",
                },
                content: turn.text.clone(),
            });
        }
        messages.push(Message {
            role: "user",
            content: this_message(request),
        });
        messages
    }
}

/// A text as written; a file described, since the model cannot see or hear it.
fn this_message(request: &ReplyRequest<'_>) -> String {
    match request.text {
        Some(text) => text.to_owned(),
        None => format!(
            "[The user sent a {} file named \"{}\"{}. You cannot see or hear it; acknowledge it briefly and kindly.]",
            request.kind,
            request.filename.unwrap_or("unnamed"),
            request
                .size_bytes
                .map(|bytes| format!(" ({} KiB)", bytes.div_ceil(1024)))
                .unwrap_or_default(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ClientId;
    use crate::replies::Turn;
    use chrono::TimeZone;
    use chrono_tz::Tz;
    use kaiwa_protocol::MessageType;

    #[test]
    fn the_template_is_filled_and_history_goes_between_system_and_message() {
        let client = ClientId::parse("u7").expect("id");
        let tz: Tz = "Asia/Kolkata".parse().expect("zone");
        let history = [
            Turn {
                role: Role::User,
                text: "hi".into(),
            },
            Turn {
                role: Role::Assistant,
                text: "hello!".into(),
            },
        ];
        let request = ReplyRequest {
            client_id: &client,
            kind: MessageType::Text,
            text: Some("what now?"),
            filename: None,
            size_bytes: None,
            local_time: tz
                .with_ymd_and_hms(2026, 11, 21, 20, 15, 0)
                .single()
                .expect("time"),
            history: &history,
        };
        let template = PromptTemplate::new(
            "{client_id} in {timezone} at {local_time} on {weekday} {local_date}: {message_type} {unknown}",
        );
        let messages = template.messages(&request);
        assert_eq!(
            messages[0].content,
            "u7 in Asia/Kolkata at 20:15 on Saturday 2026-11-21: text {unknown}"
        );
        let roles: Vec<&str> = messages.iter().map(|m| m.role).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        assert_eq!(messages[3].content, "what now?");
    }
}
