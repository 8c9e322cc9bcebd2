//! Which file formats each media type accepts, recognised by their leading bytes (R7).

use crate::domain::MediaFormat;
use kaiwa_protocol::MessageType;

/// An accepted format and how to recognise it: the format is what the rest of kaiwa sees, the
/// test of its leading bytes stays here.
#[derive(Debug)]
struct Signature {
    format: MediaFormat,
    matches: fn(&[u8]) -> bool,
}

fn riff(bytes: &[u8], form: &[u8; 4]) -> bool {
    bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == form
}

fn iso_media(bytes: &[u8]) -> bool {
    bytes.len() >= 12 && &bytes[4..8] == b"ftyp"
}

fn iso_brand(bytes: &[u8]) -> &[u8] {
    if iso_media(bytes) { &bytes[8..12] } else { &[] }
}

fn mpeg_audio(bytes: &[u8]) -> bool {
    bytes.starts_with(b"ID3")
        // A frame sync with a valid MPEG layer (ADTS AAC has layer 00 and is its own format).
        || (bytes.len() >= 2 && bytes[0] == 0xFF && bytes[1] & 0xE0 == 0xE0 && bytes[1] & 0x06 != 0)
}

fn matroska(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0x1A, 0x45, 0xDF, 0xA3])
}

const IMAGE: &[Signature] = &[
    Signature {
        format: MediaFormat {
            name: "PNG",
            mime: "image/png",
            extensions: &["png"],
        },
        matches: |b| b.starts_with(b"\x89PNG\r\n\x1a\n"),
    },
    Signature {
        format: MediaFormat {
            name: "JPEG",
            mime: "image/jpeg",
            extensions: &["jpg", "jpeg", "jfif"],
        },
        matches: |b| b.starts_with(&[0xFF, 0xD8, 0xFF]),
    },
    Signature {
        format: MediaFormat {
            name: "GIF",
            mime: "image/gif",
            extensions: &["gif"],
        },
        matches: |b| b.starts_with(b"GIF87a") || b.starts_with(b"GIF89a"),
    },
    Signature {
        format: MediaFormat {
            name: "WebP",
            mime: "image/webp",
            extensions: &["webp"],
        },
        matches: |b| riff(b, b"WEBP"),
    },
];

const VOICE: &[Signature] = &[
    Signature {
        format: MediaFormat {
            name: "WAV",
            mime: "audio/wav",
            extensions: &["wav", "wave"],
        },
        matches: |b| riff(b, b"WAVE"),
    },
    Signature {
        format: MediaFormat {
            name: "MP3",
            mime: "audio/mpeg",
            extensions: &["mp3"],
        },
        matches: mpeg_audio,
    },
    Signature {
        format: MediaFormat {
            name: "Ogg",
            mime: "audio/ogg",
            extensions: &["ogg", "oga", "opus"],
        },
        matches: |b| b.starts_with(b"OggS"),
    },
    Signature {
        format: MediaFormat {
            name: "WebM audio",
            mime: "audio/webm",
            extensions: &["webm", "weba"],
        },
        matches: matroska,
    },
    Signature {
        format: MediaFormat {
            name: "MPEG-4 audio",
            mime: "audio/mp4",
            extensions: &["m4a", "mp4", "aac"],
        },
        matches: iso_media,
    },
    Signature {
        format: MediaFormat {
            name: "AAC",
            mime: "audio/aac",
            extensions: &["aac"],
        },
        matches: |b| b.len() >= 2 && b[0] == 0xFF && b[1] & 0xF6 == 0xF0,
    },
    Signature {
        format: MediaFormat {
            name: "FLAC",
            mime: "audio/flac",
            extensions: &["flac"],
        },
        matches: |b| b.starts_with(b"fLaC"),
    },
];

const VIDEO: &[Signature] = &[
    Signature {
        format: MediaFormat {
            name: "QuickTime",
            mime: "video/quicktime",
            extensions: &["mov", "qt"],
        },
        matches: |b| iso_brand(b) == b"qt  ",
    },
    Signature {
        format: MediaFormat {
            name: "MPEG-4 video",
            mime: "video/mp4",
            extensions: &["mp4", "m4v", "mov", "3gp"],
        },
        matches: iso_media,
    },
    Signature {
        format: MediaFormat {
            name: "WebM",
            mime: "video/webm",
            extensions: &["webm", "mkv"],
        },
        matches: matroska,
    },
    Signature {
        format: MediaFormat {
            name: "Ogg video",
            mime: "video/ogg",
            extensions: &["ogv", "ogg"],
        },
        matches: |b| b.starts_with(b"OggS"),
    },
    Signature {
        format: MediaFormat {
            name: "AVI",
            mime: "video/x-msvideo",
            extensions: &["avi"],
        },
        matches: |b| riff(b, b"AVI "),
    },
];

/// The formats accepted for a media type (none for text).
fn formats(kind: MessageType) -> &'static [Signature] {
    match kind {
        MessageType::Text => &[],
        MessageType::Voice => VOICE,
        MessageType::Video => VIDEO,
        MessageType::Image => IMAGE,
    }
}

/// The accepted format these bytes are, for this media type.
pub fn sniff(kind: MessageType, bytes: &[u8]) -> Option<&'static MediaFormat> {
    formats(kind)
        .iter()
        .find(|signature| (signature.matches)(bytes))
        .map(|signature| &signature.format)
}

/// A short list of accepted formats, for error messages.
pub fn accepted_names(kind: MessageType) -> String {
    formats(kind)
        .iter()
        .map(|signature| signature.format.name)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";
    const WAV: &[u8] = b"RIFF\x24\0\0\0WAVEfmt ";
    const MP4: &[u8] = b"\0\0\0\x18ftypisom\0\0\0\0";
    const MOV: &[u8] = b"\0\0\0\x14ftypqt  \0\0\0\0";

    #[test]
    fn formats_are_recognised_by_content_for_their_own_type_only() {
        assert_eq!(
            sniff(MessageType::Image, PNG).map(|f| f.mime),
            Some("image/png")
        );
        assert!(sniff(MessageType::Voice, PNG).is_none());
        assert_eq!(
            sniff(MessageType::Voice, WAV).map(|f| f.mime),
            Some("audio/wav")
        );
        assert!(sniff(MessageType::Image, WAV).is_none());
        assert_eq!(
            sniff(MessageType::Video, MP4).map(|f| f.mime),
            Some("video/mp4")
        );
        assert_eq!(
            sniff(MessageType::Video, MOV).map(|f| f.mime),
            Some("video/quicktime")
        );
        assert!(sniff(MessageType::Image, b"hello, world").is_none());
        assert!(sniff(MessageType::Image, b"").is_none());
        assert!(sniff(MessageType::Text, PNG).is_none());
    }

    #[test]
    fn mp3_frame_sync_is_not_mistaken_for_aac() {
        assert_eq!(
            sniff(MessageType::Voice, &[0xFF, 0xFB, 0x90, 0x00]).map(|f| f.name),
            Some("MP3")
        );
        assert_eq!(
            sniff(MessageType::Voice, &[0xFF, 0xF1, 0x50, 0x80]).map(|f| f.name),
            Some("AAC")
        );
    }

    #[test]
    fn filenames_must_carry_a_matching_extension() {
        let png = sniff(MessageType::Image, PNG).expect("png");
        assert!(png.fits_filename("cat.PNG"));
        assert!(png.fits_filename("cat"));
        assert!(!png.fits_filename("cat.jpg"));
        assert!(!png.fits_filename("cat.png.exe"));
    }
}
