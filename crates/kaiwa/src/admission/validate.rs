//! Turns what a client sent into a checked [`Draft`]: known type, sane text, decodable media of
//! an accepted format within its size limit, a harmless filename.

use super::media;
use crate::domain::MediaFormat;
use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use bytes::Bytes;
use clap::Args;
use kaiwa_protocol::{ErrorCode, MessageType};

/// Size limits for message content.
#[derive(Debug, Clone, Copy, Args)]
#[command(next_help_heading = "Message limits")]
pub struct ContentLimits {
    /// Longest text message, in characters.
    #[arg(long, env = "KAIWA_MAX_TEXT_CHARS", default_value = "4096", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_text_chars: u32,
    /// Largest image file (e.g. 5MiB).
    #[arg(long, env = "KAIWA_MAX_IMAGE_BYTES", default_value = "5MiB", value_parser = parse_bytes)]
    pub max_image_bytes: usize,
    /// Largest voice file.
    #[arg(long, env = "KAIWA_MAX_VOICE_BYTES", default_value = "5MiB", value_parser = parse_bytes)]
    pub max_voice_bytes: usize,
    /// Largest video file.
    #[arg(long, env = "KAIWA_MAX_VIDEO_BYTES", default_value = "25MiB", value_parser = parse_bytes)]
    pub max_video_bytes: usize,
}

impl ContentLimits {
    pub fn max_bytes(&self, kind: MessageType) -> usize {
        match kind {
            MessageType::Text => self.max_text_chars as usize * 4,
            MessageType::Voice => self.max_voice_bytes,
            MessageType::Video => self.max_video_bytes,
            MessageType::Image => self.max_image_bytes,
        }
    }

    /// The largest WebSocket message a client may need to send: the largest file in base64,
    /// plus room for the JSON around it.
    pub fn max_frame_bytes(&self) -> usize {
        let largest = MessageType::ALL
            .into_iter()
            .map(|kind| self.max_bytes(kind))
            .max()
            .unwrap_or(0);
        largest.div_ceil(3) * 4 + 64 * 1024
    }
}

/// A size in bytes: `1048576`, `512KiB`, `5MiB`, `5MB` (kaiwa reads MB as MiB, as most people
/// mean it for file limits).
pub fn parse_bytes(raw: &str) -> Result<usize, String> {
    let text = raw.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: usize = number
        .parse()
        .map_err(|_| format!("{raw:?} is not a size such as 5MiB or 1048576"))?;
    let multiplier = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?} in {raw:?}")),
    };
    let bytes = number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("{raw} is too large"))?;
    if !(1..=(1usize << 30)).contains(&bytes) {
        return Err(format!("{raw} is out of range: use 1 byte to 1GiB"));
    }
    Ok(bytes)
}

/// A message as received, from either protocol, before anything is checked.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Submission {
    pub client_message_id: Option<String>,
    pub message_type: Option<String>,
    pub content: Option<String>,
    pub filename: Option<String>,
    pub client_timestamp: Option<String>,
    /// The file, when it came as a binary frame rather than base64 in `content`.
    pub binary: Option<Bytes>,
    /// Whether a media message without a file name is a text note: the path dialect's clients
    /// send text under every type. Elsewhere such a message lacks its file name.
    pub text_notes: bool,
}

impl Submission {
    /// Its type, if it names a known one.
    pub fn kind(&self) -> Option<MessageType> {
        MessageType::parse(self.message_type.as_deref()?.trim())
    }
}

/// A message that passed validation and awaits its window verdict.
#[derive(Debug)]
pub struct Draft {
    pub kind: MessageType,
    pub body: Body,
    pub client_message_id: Option<String>,
    pub client_timestamp: Option<String>,
}

#[derive(Debug)]
pub enum Body {
    Text(String),
    Media(Upload),
    /// Text sent under a media type (the path dialect): not the file its type is for, so it
    /// is stored as rejected, with the reason (R6, R7), and without its text, as a refused
    /// file is stored without its bytes.
    Note(String),
}

#[derive(Debug)]
pub struct Upload {
    pub bytes: Bytes,
    /// The client's name for the file, checked to be a plain name; never used as a path.
    pub filename: String,
    pub format: &'static MediaFormat,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("message_type is required: one of text, voice, video, image")]
    MissingType,
    #[error("unknown message_type {0:?}: use text, voice, video or image")]
    UnknownType(String),
    #[error("a text message needs non-empty content")]
    EmptyText,
    #[error("text is {chars} characters; the limit is {max}")]
    TextTooLong { chars: usize, max: u32 },
    #[error("a {0} message needs the file, as base64 in content or as a binary frame")]
    MissingContent(MessageType),
    #[error("content is not valid base64: {0}")]
    Base64(String),
    #[error("a {0} message needs a filename")]
    MissingFilename(MessageType),
    #[error(
        "filename {0:?} must be a plain file name: no path, no '..', no control characters, at most 255 bytes"
    )]
    BadFilename(String),
    #[error("the {kind} file is {size} bytes; the limit is {max}")]
    TooLarge {
        kind: MessageType,
        size: usize,
        max: usize,
    },
    #[error("the file is not an accepted {kind} format ({accepted})")]
    UnknownFormat { kind: MessageType, accepted: String },
    #[error("the file is {format} but its name {filename:?} says otherwise")]
    ExtensionMismatch {
        format: &'static str,
        filename: String,
    },
    #[error("message id must be 1 to 64 characters")]
    BadMessageId,
}

impl Invalid {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::MissingType | Self::UnknownType(_) => ErrorCode::UnknownMessageType,
            Self::EmptyText => ErrorCode::EmptyText,
            Self::TextTooLong { .. } => ErrorCode::TextTooLong,
            Self::MissingContent(_) => ErrorCode::MissingContent,
            Self::Base64(_) => ErrorCode::InvalidBase64,
            Self::MissingFilename(_) => ErrorCode::MissingFilename,
            Self::BadFilename(_) => ErrorCode::InvalidFilename,
            Self::TooLarge { .. } => ErrorCode::MediaTooLarge,
            Self::UnknownFormat { .. } | Self::ExtensionMismatch { .. } => ErrorCode::MediaMismatch,
            Self::BadMessageId => ErrorCode::InvalidMessageId,
        }
    }
}

/// Base64 as browsers and Python produce it: standard alphabet, padding optional.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

const MAX_TIMESTAMP_LEN: usize = 64;

impl ContentLimits {
    pub fn validate(&self, submission: Submission) -> Result<Draft, Invalid> {
        let raw_type = submission.message_type.ok_or(Invalid::MissingType)?;
        let kind = MessageType::parse(raw_type.trim())
            .ok_or_else(|| Invalid::UnknownType(raw_type.chars().take(32).collect()))?;
        let note = kind.is_media()
            && submission.text_notes
            && submission.binary.is_none()
            && submission.filename.is_none();
        let body = if note {
            Body::Note(self.text(submission.content)?)
        } else if kind.is_media() {
            Body::Media(self.upload(
                kind,
                submission.filename,
                submission.content,
                submission.binary,
            )?)
        } else {
            Body::Text(self.text(submission.content)?)
        };
        Ok(Draft {
            kind,
            body,
            client_message_id: submission.client_message_id,
            client_timestamp: submission
                .client_timestamp
                .map(|t| t.chars().take(MAX_TIMESTAMP_LEN).collect()),
        })
    }

    fn text(&self, content: Option<String>) -> Result<String, Invalid> {
        let text = content.unwrap_or_default();
        if text.trim().is_empty() {
            return Err(Invalid::EmptyText);
        }
        let max = self.max_text_chars;
        // Bytes bound characters from above, so most texts skip the count.
        if text.len() > max as usize {
            let chars = text.chars().count();
            if chars > max as usize {
                return Err(Invalid::TextTooLong { chars, max });
            }
        }
        Ok(text)
    }

    fn upload(
        &self,
        kind: MessageType,
        filename: Option<String>,
        content: Option<String>,
        binary: Option<Bytes>,
    ) -> Result<Upload, Invalid> {
        let filename = filename
            .filter(|name| !name.trim().is_empty())
            .ok_or(Invalid::MissingFilename(kind))?;
        let filename = plain_filename(&filename)?;
        let max = self.max_bytes(kind);
        let bytes = match (binary, content) {
            (Some(bytes), _) => bytes,
            (None, Some(text)) => decode_base64(&text, kind, max)?,
            (None, None) => return Err(Invalid::MissingContent(kind)),
        };
        if bytes.is_empty() {
            return Err(Invalid::MissingContent(kind));
        }
        if bytes.len() > max {
            return Err(Invalid::TooLarge {
                kind,
                size: bytes.len(),
                max,
            });
        }
        let format = media::sniff(kind, &bytes).ok_or_else(|| Invalid::UnknownFormat {
            kind,
            accepted: media::accepted_names(kind),
        })?;
        if !format.fits_filename(&filename) {
            return Err(Invalid::ExtensionMismatch {
                format: format.name,
                filename,
            });
        }
        Ok(Upload {
            bytes,
            filename,
            format,
        })
    }
}

/// Decodes base64, also inside a `data:` URL as `FileReader.readAsDataURL` produces, refusing
/// oversize content before decoding it.
fn decode_base64(text: &str, kind: MessageType, max: usize) -> Result<Bytes, Invalid> {
    let payload = match text.strip_prefix("data:") {
        Some(url) => url
            .split_once(";base64,")
            .map(|(_, data)| data)
            .ok_or_else(|| Invalid::Base64("a data: URL must be base64-encoded".into()))?,
        None => text,
    };
    let payload = payload.trim();
    let estimate = payload.len() / 4 * 3;
    if estimate > max + 3 {
        return Err(Invalid::TooLarge {
            kind,
            size: estimate,
            max,
        });
    }
    BASE64
        .decode(payload)
        .map(Bytes::from)
        .map_err(|err| Invalid::Base64(err.to_string()))
}

/// A filename is kept for display only; still, refuse anything that looks like a path so that
/// nobody downstream is tempted to use it as one.
fn plain_filename(raw: &str) -> Result<String, Invalid> {
    let name = raw.trim();
    let bad = name.len() > 255
        || name == "."
        || name.contains("..")
        || name.contains(['/', '\\'])
        || name.chars().any(char::is_control);
    if bad {
        return Err(Invalid::BadFilename(raw.chars().take(64).collect()));
    }
    Ok(name.to_owned())
}

/// Checks a native client's message id.
pub fn client_message_id(raw: Option<String>) -> Result<String, Invalid> {
    match raw {
        Some(id) if (1..=64).contains(&id.chars().count()) && !id.chars().any(char::is_control) => {
            Ok(id)
        }
        _ => Err(Invalid::BadMessageId),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ContentLimits {
        ContentLimits {
            max_text_chars: 10,
            max_image_bytes: 64,
            max_voice_bytes: 64,
            max_video_bytes: 64,
        }
    }

    fn submit(kind: &str, content: &str, filename: Option<&str>) -> Result<Draft, Invalid> {
        limits().validate(Submission {
            message_type: Some(kind.into()),
            content: Some(content.into()),
            filename: filename.map(Into::into),
            ..Submission::default()
        })
    }

    const PNG_B64: &str = "iVBORw0KGgoAAAANSUhEUg==";

    #[test]
    fn text_must_be_present_and_short_enough() {
        assert!(matches!(
            submit("text", "hi", None),
            Ok(Draft {
                body: Body::Text(_),
                ..
            })
        ));
        assert_eq!(submit("text", "   ", None).err(), Some(Invalid::EmptyText));
        assert_eq!(
            submit("text", "ééééééééééé", None).err(),
            Some(Invalid::TextTooLong { chars: 11, max: 10 })
        );
        assert!(
            submit("text", "éééééééééé", None).is_ok(),
            "10 two-byte characters fit"
        );
        assert_eq!(
            submit("sticker", "hi", None).err().map(|e| e.code()),
            Some(ErrorCode::UnknownMessageType)
        );
    }

    #[test]
    fn media_is_checked_by_content_name_and_size() {
        let draft = submit("image", PNG_B64, Some("a.png")).expect("valid png");
        let Body::Media(upload) = draft.body else {
            panic!("expected media");
        };
        assert_eq!(upload.format.mime, "image/png");

        let data_url = format!("data:image/png;base64,{PNG_B64}");
        assert!(submit("image", &data_url, Some("a.png")).is_ok());

        let code = |r: Result<Draft, Invalid>| r.err().map(|e| e.code());
        assert_eq!(
            code(submit("image", "not base64!", Some("a.png"))),
            Some(ErrorCode::InvalidBase64)
        );
        assert_eq!(
            code(submit("image", PNG_B64, Some("a.jpg"))),
            Some(ErrorCode::MediaMismatch)
        );
        assert_eq!(
            code(submit("voice", PNG_B64, Some("a.wav"))),
            Some(ErrorCode::MediaMismatch)
        );
        assert_eq!(
            code(submit("image", PNG_B64, Some("../../x.png"))),
            Some(ErrorCode::InvalidFilename)
        );
        assert_eq!(
            code(submit("image", PNG_B64, Some("C:\\x.png"))),
            Some(ErrorCode::InvalidFilename)
        );
        assert_eq!(
            code(submit("image", PNG_B64, None)),
            Some(ErrorCode::MissingFilename)
        );
        let big = BASE64.encode([0x89u8; 100]);
        assert_eq!(
            code(submit("image", &big, Some("a.png"))),
            Some(ErrorCode::MediaTooLarge)
        );
    }

    #[test]
    fn media_without_a_file_is_a_note_only_where_the_dialect_sends_notes() {
        let note = |text_notes: bool, filename: Option<&str>| {
            limits().validate(Submission {
                message_type: Some("voice".into()),
                content: Some("hello".into()),
                filename: filename.map(Into::into),
                text_notes,
                ..Submission::default()
            })
        };
        assert!(matches!(
            note(true, None),
            Ok(Draft {
                body: Body::Note(_),
                ..
            })
        ));
        assert_eq!(
            note(false, None).err(),
            Some(Invalid::MissingFilename(MessageType::Voice))
        );
        assert_eq!(
            note(true, Some("a.wav")).err().map(|e| e.code()),
            Some(ErrorCode::InvalidBase64),
            "with a file name, content is the file"
        );
        let long = limits().validate(Submission {
            message_type: Some("video".into()),
            content: Some("x".repeat(11)),
            text_notes: true,
            ..Submission::default()
        });
        assert_eq!(
            long.err(),
            Some(Invalid::TextTooLong { chars: 11, max: 10 })
        );
    }

    #[test]
    fn frames_can_carry_the_largest_file_in_base64() {
        let limits = ContentLimits {
            max_text_chars: 4096,
            max_image_bytes: 5 << 20,
            max_voice_bytes: 5 << 20,
            max_video_bytes: 25 << 20,
        };
        assert!(limits.max_frame_bytes() > (25 << 20) * 4 / 3);
    }
}
