//! Text replies from a language model over the OpenAI-compatible chat-completions API (R10):
//! streamed when the provider can, bounded by timeouts, retried with jittered backoff, paused
//! together on rate limits, capped in concurrency, and replaced by a fallback when it gives up.

mod gate;
mod prompt;
mod sse;
mod wire;

use super::{Deltas, ReplyRequest, ResponderError, TextResponder};
use crate::config::ModelConfig;
use crate::flags::Secret;
use async_trait::async_trait;
use futures::StreamExt;
use gate::Gate;
use prompt::{DEFAULT_SYSTEM_PROMPT, PromptTemplate};
use rand::RngExt;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderMap, RETRY_AFTER};
use sse::SseDecoder;
use std::time::Duration;
use tokio::time::{Instant, timeout, timeout_at};
use wire::{Completion, Request, StreamOptions};

/// Longest cool-down a provider's `Retry-After` can impose on every call.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// Longest reply kept; a provider that ignores `max_tokens` does not get to fill memory.
const MAX_REPLY_BYTES: usize = 64 * 1024;
/// Most bytes read from one response (events carry JSON around each piece of text).
const MAX_RESPONSE_BYTES: usize = 16 * MAX_REPLY_BYTES;
/// First backoff between attempts; doubled each time, with jitter.
const BASE_BACKOFF: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read the system prompt file {path}: {source}")]
    PromptFile {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot build the HTTP client: {0}")]
    Client(reqwest::Error),
}

/// Why one attempt failed. The names are the `kind` label of the failure metric.
#[derive(Debug)]
enum Failure {
    Connect,
    Timeout,
    RateLimited(Option<Duration>),
    Server(StatusCode),
    Rejected(StatusCode),
    Malformed,
    Empty,
    /// The stream broke after pieces were forwarded: retrying would show the client two replies.
    Interrupted,
    /// More than [`MAX_REPLY_BYTES`] of text, or [`MAX_RESPONSE_BYTES`] in all.
    TooLong,
}

impl Failure {
    fn kind(&self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::RateLimited(_) => "rate_limited",
            Self::Server(_) => "server_error",
            Self::Rejected(_) => "rejected",
            Self::Malformed => "malformed",
            Self::Empty => "empty",
            Self::Interrupted => "interrupted",
            Self::TooLong => "too_long",
        }
    }

    fn retryable(&self) -> bool {
        matches!(
            self,
            Self::Connect | Self::Timeout | Self::RateLimited(_) | Self::Server(_)
        )
    }

    /// What the log may say: never a body or a header (they could echo the key).
    fn describe(&self) -> String {
        match self {
            Self::Server(status) | Self::Rejected(status) => {
                format!("{} (HTTP {})", self.kind(), status.as_u16())
            }
            _ => self.kind().to_owned(),
        }
    }
}

pub struct ModelResponder {
    http: reqwest::Client,
    endpoint: String,
    key: Secret,
    model: String,
    temperature: f32,
    max_tokens: u32,
    stream: bool,
    first_token_timeout: Duration,
    total_timeout: Duration,
    retries: u32,
    context_turns: usize,
    prompt: PromptTemplate,
    gate: Gate,
}

impl ModelResponder {
    pub fn new(config: &ModelConfig, key: Secret) -> Result<Self, ModelError> {
        let template = match (&config.system_prompt_file, &config.system_prompt) {
            (Some(path), _) => {
                std::fs::read_to_string(path).map_err(|source| ModelError::PromptFile {
                    path: path.display().to_string(),
                    source,
                })?
            }
            (None, Some(text)) => text.clone(),
            (None, None) => DEFAULT_SYSTEM_PROMPT.to_owned(),
        };
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .user_agent(concat!("kaiwa/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(ModelError::Client)?;
        Ok(Self {
            http,
            endpoint: format!("{}/chat/completions", config.base_url.trim_end_matches('/')),
            key,
            model: config.model.clone(),
            temperature: config.temperature,
            max_tokens: config.max_tokens,
            stream: config.stream,
            first_token_timeout: config.first_token_timeout,
            total_timeout: config.total_timeout,
            retries: config.retries,
            context_turns: config.history_turns as usize,
            prompt: PromptTemplate::new(template),
            gate: Gate::new(config.concurrency as usize),
        })
    }

    /// Where requests go, for the start-up log (it holds no secret).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// One request: waits for the gate, sends, and reads the reply (streamed or whole).
    async fn attempt(&self, body: &Request<'_>, deltas: &Deltas) -> Result<String, Failure> {
        let Some(_turn) = self.gate.enter().await else {
            return Err(Failure::Connect);
        };
        metrics::counter!("kaiwa_model_calls_total").increment(1);
        let sent = Instant::now();
        let response = timeout(
            self.first_token_timeout,
            self.http
                .post(&self.endpoint)
                .bearer_auth(self.key.expose())
                .json(body)
                .send(),
        )
        .await
        .map_err(|_| Failure::Timeout)?
        .map_err(|err| {
            if err.is_timeout() {
                Failure::Timeout
            } else {
                Failure::Connect
            }
        })?;
        let status = response.status();
        if status == StatusCode::TOO_MANY_REQUESTS {
            return Err(Failure::RateLimited(retry_after(response.headers())));
        }
        if status.is_server_error() {
            return Err(Failure::Server(status));
        }
        if !status.is_success() {
            return Err(Failure::Rejected(status));
        }
        let streamed = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let text = if streamed {
            self.read_stream(response, deltas, sent).await?
        } else {
            let bytes = timeout(self.first_token_timeout, read_capped(response))
                .await
                .map_err(|_| Failure::Timeout)??;
            let completion: Completion =
                serde_json::from_slice(&bytes).map_err(|_| Failure::Malformed)?;
            record_usage(&completion);
            completion.text()
        };
        if text.len() > MAX_REPLY_BYTES {
            return Err(Failure::TooLong);
        }
        metrics::histogram!("kaiwa_model_latency_seconds", "stage" => "complete")
            .record(sent.elapsed().as_secs_f64());
        if text.trim().is_empty() {
            return Err(Failure::Empty);
        }
        Ok(text)
    }

    /// Reads server-sent events, forwarding each piece as it comes. The first piece must come
    /// within the first-token timeout; after that the total deadline bounds the stream.
    async fn read_stream(
        &self,
        response: reqwest::Response,
        deltas: &Deltas,
        sent: Instant,
    ) -> Result<String, Failure> {
        let mut body = response.bytes_stream();
        let mut decoder = SseDecoder::default();
        let mut events = Vec::new();
        let mut text = String::new();
        let mut malformed = false;
        let first_token_by = sent + self.first_token_timeout;
        let mut received = 0usize;
        let mut done = false;
        while !done {
            let chunk = if text.is_empty() {
                timeout_at(first_token_by, body.next())
                    .await
                    .map_err(|_| Failure::Timeout)?
            } else {
                body.next().await
            };
            match chunk {
                Some(Ok(bytes)) => {
                    received += bytes.len();
                    if received > MAX_RESPONSE_BYTES {
                        return Err(Failure::TooLong);
                    }
                    decoder.feed(&bytes, &mut events);
                }
                Some(Err(_)) if text.is_empty() => return Err(Failure::Connect),
                Some(Err(_)) => return Err(Failure::Interrupted),
                None => {
                    decoder.finish(&mut events);
                    done = true;
                }
            }
            for data in events.drain(..) {
                if data.trim() == "[DONE]" {
                    done = true;
                    continue;
                }
                match serde_json::from_str::<Completion>(&data) {
                    Ok(chunk) => {
                        record_usage(&chunk);
                        let piece = chunk.text();
                        if piece.is_empty() {
                            continue;
                        }
                        if text.is_empty() {
                            metrics::histogram!("kaiwa_model_latency_seconds", "stage" => "first_token")
                                .record(sent.elapsed().as_secs_f64());
                        }
                        if text.len() + piece.len() > MAX_REPLY_BYTES {
                            return Err(Failure::TooLong);
                        }
                        text.push_str(&piece);
                        deltas.send(piece);
                    }
                    Err(_) => malformed = true,
                }
            }
        }
        if text.trim().is_empty() && malformed {
            return Err(Failure::Malformed);
        }
        Ok(text)
    }
}

#[async_trait]
impl TextResponder for ModelResponder {
    fn name(&self) -> &'static str {
        "model"
    }

    fn context_turns(&self) -> usize {
        self.context_turns
    }

    async fn respond(
        &self,
        request: &ReplyRequest<'_>,
        deltas: &Deltas,
    ) -> Result<String, ResponderError> {
        let body = Request {
            model: &self.model,
            messages: self.prompt.messages(request),
            temperature: self.temperature,
            max_tokens: self.max_tokens,
            stream: self.stream,
            stream_options: self.stream.then_some(StreamOptions {
                include_usage: true,
            }),
        };
        let deadline = Instant::now() + self.total_timeout;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let failure = match timeout_at(deadline, self.attempt(&body, deltas)).await {
                Ok(Ok(text)) => {
                    metrics::counter!("kaiwa_model_replies_total", "outcome" => "ok").increment(1);
                    return Ok(text);
                }
                Ok(Err(failure)) => failure,
                Err(_) => Failure::Timeout,
            };
            metrics::counter!("kaiwa_model_failures_total", "kind" => failure.kind()).increment(1);
            let (pause, wait) = match &failure {
                Failure::RateLimited(Some(after)) => {
                    // Every call waits: the provider asked us, not this request, to slow down.
                    // The gate does the waiting; a pause past the budget means giving up.
                    self.gate.cool_down((*after).min(MAX_RETRY_AFTER));
                    (Duration::ZERO, *after)
                }
                _ => {
                    let pause = backoff(attempts);
                    (pause, pause)
                }
            };
            let out_of_time = Instant::now() + wait >= deadline;
            if !failure.retryable() || attempts > self.retries || out_of_time {
                metrics::counter!("kaiwa_model_replies_total", "outcome" => "fallback")
                    .increment(1);
                return Err(ResponderError::GaveUp {
                    attempts,
                    reason: failure.describe(),
                });
            }
            tracing::debug!(attempt = attempts, failure = %failure.describe(), "model call failed; retrying");
            tokio::time::sleep(pause).await;
        }
    }
}

/// Exponential backoff with full jitter: spreads the retries of many replies apart.
fn backoff(attempt: u32) -> Duration {
    let ceiling = BASE_BACKOFF.saturating_mul(1 << attempt.min(6));
    ceiling.mul_f64(rand::rng().random_range(0.5..1.0))
}

/// `Retry-After` as seconds or as an HTTP date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<f64>() {
        // Checked: a provider may send anything, such as 1e300.
        return Duration::try_from_secs_f64(seconds).ok();
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    (at.with_timezone(&chrono::Utc) - chrono::Utc::now())
        .to_std()
        .ok()
}

/// A whole response body, refused past [`MAX_RESPONSE_BYTES`].
async fn read_capped(response: reqwest::Response) -> Result<Vec<u8>, Failure> {
    let mut body = response.bytes_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|_| Failure::Connect)?;
        if bytes.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(Failure::TooLong);
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

fn record_usage(completion: &Completion) {
    if let Some(usage) = &completion.usage {
        if let Some(tokens) = usage.prompt_tokens {
            metrics::counter!("kaiwa_model_tokens_total", "kind" => "prompt").increment(tokens);
        }
        if let Some(tokens) = usage.completion_tokens {
            metrics::counter!("kaiwa_model_tokens_total", "kind" => "completion").increment(tokens);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("2"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(2)));
        headers.insert(RETRY_AFTER, HeaderValue::from_static("0.5"));
        assert_eq!(retry_after(&headers), Some(Duration::from_millis(500)));
        let soon = (chrono::Utc::now() + chrono::Duration::seconds(30)).to_rfc2822();
        headers.insert(RETRY_AFTER, HeaderValue::from_str(&soon).expect("header"));
        let pause = retry_after(&headers).expect("a date");
        assert!(pause > Duration::from_secs(25) && pause <= Duration::from_secs(30));
        headers.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers), None);
        for absurd in ["1e300", "-1", "NaN", "inf"] {
            headers.insert(RETRY_AFTER, HeaderValue::from_static(absurd));
            assert_eq!(retry_after(&headers), None, "{absurd}");
        }
    }

    #[test]
    fn backoff_grows_and_stays_jittered() {
        for attempt in 1..8 {
            let pause = backoff(attempt);
            let ceiling = BASE_BACKOFF.saturating_mul(1 << attempt.min(6));
            assert!(
                pause >= ceiling / 2 && pause <= ceiling,
                "{pause:?} for attempt {attempt}"
            );
        }
    }
}
