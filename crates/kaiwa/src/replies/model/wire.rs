//! The chat-completions API as providers actually answer it: every field optional, unknown
//! fields ignored, content as a string or as a list of parts.

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Serialize)]
pub(crate) struct Request<'a> {
    pub model: &'a str,
    pub messages: Vec<Message<'a>>,
    pub temperature: f32,
    pub max_tokens: u32,
    pub stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
}

#[derive(Debug, Serialize)]
pub(crate) struct StreamOptions {
    pub include_usage: bool,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub(crate) struct Message<'a> {
    pub role: &'a str,
    pub content: String,
}

/// A whole completion, or one chunk of a streamed one.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Completion {
    pub choices: Vec<Choice>,
    pub usage: Option<Usage>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Choice {
    pub message: Option<Content>,
    pub delta: Option<Content>,
    /// The legacy completions shape, still sent by some servers.
    pub text: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Content {
    pub content: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Usage {
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
}

impl Completion {
    /// The text this completion (or chunk) adds, from whichever shape the provider used.
    pub(crate) fn text(&self) -> String {
        let Some(choice) = self.choices.first() else {
            return String::new();
        };
        let content = choice
            .delta
            .as_ref()
            .or(choice.message.as_ref())
            .and_then(|c| c.content.as_ref());
        match content {
            Some(Value::String(text)) => text.clone(),
            Some(Value::Array(parts)) => parts
                .iter()
                .filter_map(|part| part.get("text").and_then(Value::as_str))
                .collect(),
            _ => choice.text.clone().unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(json: &str) -> String {
        serde_json::from_str::<Completion>(json)
            .expect("parses")
            .text()
    }

    #[test]
    fn every_shape_of_content_is_read() {
        assert_eq!(text(r#"{"choices":[{"message":{"content":"hi"}}]}"#), "hi");
        assert_eq!(
            text(r#"{"choices":[{"delta":{"content":"h"},"finish_reason":null}]}"#),
            "h"
        );
        assert_eq!(text(r#"{"choices":[{"delta":{"role":"assistant"}}]}"#), "");
        assert_eq!(text(r#"{"choices":[{"delta":{"content":null}}]}"#), "");
        assert_eq!(text(r#"{"choices":[]}"#), "");
        assert_eq!(text(r#"{}"#), "");
        assert_eq!(text(r#"{"choices":[{"text":"legacy"}]}"#), "legacy");
        assert_eq!(
            text(
                r#"{"choices":[{"message":{"content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}}]}"#
            ),
            "ab"
        );
        assert_eq!(
            text(
                r#"{"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"ok"},"logprobs":null,"finish_reason":""}],"extra":{"ignored":true}}"#
            ),
            "ok"
        );
    }
}
