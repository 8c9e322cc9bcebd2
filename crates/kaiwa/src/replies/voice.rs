//! Voice replies: short spoken clips, made with espeak-ng by `scripts/make-voice-clips.sh` and
//! embedded in the binary, so the server needs no speech engine at run time.

use crate::store::NewReply;
use kaiwa_protocol::{MessageType, ReplyType};

/// A spoken clip and the name it is served under.
#[derive(Debug)]
pub struct Clip {
    pub name: &'static str,
    pub wav: &'static [u8],
}

const CLIPS: [Clip; 3] = [
    Clip {
        name: "voice",
        wav: include_bytes!("../../assets/voice/voice.wav"),
    },
    Clip {
        name: "video",
        wav: include_bytes!("../../assets/voice/video.wav"),
    },
    Clip {
        name: "image",
        wav: include_bytes!("../../assets/voice/image.wav"),
    },
];

pub const MIME: &str = "audio/wav";

/// The clip served at `/media/replies/voice/{name}.wav`.
pub fn clip(name: &str) -> Option<&'static Clip> {
    CLIPS.iter().find(|clip| clip.name == name)
}

/// The voice reply to a message of this kind: the clip that answers it.
pub fn reply(kind: MessageType) -> NewReply {
    let name = match kind {
        MessageType::Video => "video",
        MessageType::Image => "image",
        MessageType::Voice | MessageType::Text => "voice",
    };
    NewReply {
        reply_type: ReplyType::Voice,
        content: format!("/media/replies/voice/{name}.wav"),
        filename: Some(format!("reply-{name}.wav")),
        mime_type: Some(MIME.to_owned()),
        fallback: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_clip_is_a_wav_file_named_by_its_reply() {
        for kind in [MessageType::Voice, MessageType::Video, MessageType::Image] {
            let reply = reply(kind);
            let name = reply
                .content
                .strip_prefix("/media/replies/voice/")
                .and_then(|rest| rest.strip_suffix(".wav"))
                .expect("a clip URL");
            let clip = clip(name).expect("the clip exists");
            assert_eq!(&clip.wav[..4], b"RIFF");
            assert_eq!(&clip.wav[8..12], b"WAVE");
        }
    }
}
