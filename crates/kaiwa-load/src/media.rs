//! The small media files the simulated clients send: a real WAV clip, PNG picture and MP4 file,
//! made in memory at start so the tool needs no files on disk. kaiwa checks uploads by their
//! leading bytes and the filename's extension, so each sample is a genuine file of its kind.

use base64::Engine as _;
use kaiwa_protocol::MessageType;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("could not encode the sample PNG: {0}")]
    Png(#[from] png::EncodingError),
}

/// One sample file, with its content already in base64 (what a `send` frame carries).
#[derive(Debug, Clone)]
pub struct Sample {
    pub filename: &'static str,
    pub bytes: Arc<[u8]>,
    pub base64: Arc<str>,
}

impl Sample {
    fn new(filename: &'static str, bytes: Vec<u8>) -> Self {
        let base64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
        Self {
            filename,
            bytes: bytes.into(),
            base64: base64.into(),
        }
    }
}

/// A sample for every media message type.
#[derive(Debug, Clone)]
pub struct Samples {
    pub voice: Sample,
    pub video: Sample,
    pub image: Sample,
}

impl Samples {
    pub fn generate() -> Result<Self, MediaError> {
        Ok(Self {
            voice: Sample::new("note.wav", wav()),
            video: Sample::new("clip.mp4", mp4()),
            image: Sample::new("picture.png", png_image()?),
        })
    }

    /// The sample for a media type; `None` for text.
    pub fn get(&self, kind: MessageType) -> Option<&Sample> {
        match kind {
            MessageType::Text => None,
            MessageType::Voice => Some(&self.voice),
            MessageType::Video => Some(&self.video),
            MessageType::Image => Some(&self.image),
        }
    }
}

/// A quarter of a second of a 440 Hz tone: 8 kHz, mono, 16-bit PCM in a RIFF/WAVE file.
pub fn wav() -> Vec<u8> {
    const RATE: u32 = 8_000;
    const SAMPLES: u32 = RATE / 4;
    let data_len = SAMPLES * 2;
    let mut out = Vec::with_capacity(44 + data_len as usize);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data_len).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes()); // PCM
    out.extend_from_slice(&1u16.to_le_bytes()); // mono
    out.extend_from_slice(&RATE.to_le_bytes());
    out.extend_from_slice(&(RATE * 2).to_le_bytes()); // bytes per second
    out.extend_from_slice(&2u16.to_le_bytes()); // block align
    out.extend_from_slice(&16u16.to_le_bytes()); // bits per sample
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data_len.to_le_bytes());
    for n in 0..SAMPLES {
        let phase = f64::from(n) * 440.0 * std::f64::consts::TAU / f64::from(RATE);
        let sample = (phase.sin() * 8_000.0) as i16;
        out.extend_from_slice(&sample.to_le_bytes());
    }
    out
}

/// A 32×32 RGB gradient.
pub fn png_image() -> Result<Vec<u8>, MediaError> {
    const SIDE: u32 = 32;
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, SIDE, SIDE);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    let mut pixels = Vec::with_capacity((SIDE * SIDE * 3) as usize);
    for y in 0..SIDE {
        for x in 0..SIDE {
            pixels.extend_from_slice(&[(x * 8) as u8, (y * 8) as u8, 160]);
        }
    }
    writer.write_image_data(&pixels)?;
    writer.finish()?;
    Ok(out)
}

/// An MP4 file's boxes: `ftyp` (brand isom), a `free` box and an `mdat` of padding. Enough for
/// any sniffer to call it MPEG-4, and small.
pub fn mp4() -> Vec<u8> {
    fn boxed(kind: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + body.len());
        out.extend_from_slice(&(8 + body.len() as u32).to_be_bytes());
        out.extend_from_slice(kind);
        out.extend_from_slice(body);
        out
    }
    let mut out = boxed(b"ftyp", b"isom\0\0\x02\0isomiso2avc1mp41");
    out.extend(boxed(b"free", &[]));
    out.extend(boxed(b"mdat", &[0u8; 2048]));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_start_with_the_magic_bytes_of_their_format() {
        let samples = Samples::generate().expect("samples are generated");
        assert!(samples.voice.bytes.starts_with(b"RIFF"));
        assert_eq!(&samples.voice.bytes[8..12], b"WAVE");
        assert_eq!(&samples.video.bytes[4..8], b"ftyp");
        assert!(samples.image.bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
        assert!(samples.get(MessageType::Text).is_none());
    }

    #[test]
    fn the_wav_header_describes_its_data() {
        let wav = wav();
        let riff_len = u32::from_le_bytes([wav[4], wav[5], wav[6], wav[7]]) as usize;
        assert_eq!(riff_len + 8, wav.len());
    }
}
