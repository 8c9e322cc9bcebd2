//! Image replies: a picture generated from the message id (a symmetric pattern on a soft
//! gradient), rendered when it is requested rather than stored, so replying costs no disk write.

use crate::store::NewReply;
use kaiwa_protocol::ReplyType;

pub const MIME: &str = "image/png";
const SIZE: u32 = 256;
const GRID: u32 = 5;
const MARGIN: u32 = 28;

/// The image reply to message `message_id`, served at `/media/replies/image/{id}.png`.
pub fn reply(message_id: i64) -> NewReply {
    NewReply {
        reply_type: ReplyType::Image,
        content: format!("/media/replies/image/{message_id}.png"),
        filename: Some(format!("reply-{message_id}.png")),
        mime_type: Some(MIME.to_owned()),
        fallback: false,
    }
}

/// SplitMix64: a tiny, well-mixed generator, so the same id always gives the same picture.
struct Mixer(u64);

impl Mixer {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// HSL (hue in degrees, saturation and lightness in 0..=1) to RGB.
fn hsl(hue: f64, saturation: f64, lightness: f64) -> [u8; 3] {
    let c = (1.0 - (2.0 * lightness - 1.0).abs()) * saturation;
    let h = (hue % 360.0) / 60.0;
    let x = c * (1.0 - (h % 2.0 - 1.0).abs());
    let (r, g, b) = match h as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = lightness - c / 2.0;
    [r, g, b].map(|channel| ((channel + m) * 255.0).round().clamp(0.0, 255.0) as u8)
}

/// Renders the picture for `seed` as PNG bytes.
pub fn render(seed: i64) -> Vec<u8> {
    let mut mixer = Mixer(seed as u64 ^ 0x006B_6169_7761);
    let hue = (mixer.next() % 360) as f64;
    let top = hsl(hue, 0.55, 0.92);
    let bottom = hsl(hue + 40.0, 0.55, 0.80);
    let ink = hsl(hue + 180.0, 0.60, 0.42);
    // Each cell of the left half (and middle column) is on or off; the right half mirrors it.
    let bits = mixer.next();
    let half = GRID.div_ceil(2);
    let on = |col: u32, row: u32| {
        let col = if col >= half { GRID - 1 - col } else { col };
        bits >> (row * half + col) & 1 == 1
    };
    let cell = (SIZE - 2 * MARGIN) / GRID;
    let mut pixels = Vec::with_capacity((SIZE * SIZE * 3) as usize);
    for y in 0..SIZE {
        let t = f64::from(y) / f64::from(SIZE - 1);
        let background: [u8; 3] = std::array::from_fn(|i| {
            (f64::from(top[i]) * (1.0 - t) + f64::from(bottom[i]) * t) as u8
        });
        for x in 0..SIZE {
            let inside =
                (MARGIN..SIZE - MARGIN).contains(&x) && (MARGIN..SIZE - MARGIN).contains(&y);
            let lit = inside && on((x - MARGIN) / cell, (y - MARGIN) / cell);
            pixels.extend_from_slice(if lit { &ink } else { &background });
        }
    }
    let mut png = Vec::with_capacity(4096);
    let mut encoder = png::Encoder::new(&mut png, SIZE, SIZE);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Fast);
    // Writing into a Vec cannot fail for a header and data of the declared size.
    let written = encoder
        .write_header()
        .and_then(|mut writer| writer.write_image_data(&pixels));
    debug_assert!(
        written.is_ok(),
        "PNG encoding into memory failed: {written:?}"
    );
    png
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pictures_are_valid_pngs_and_differ_by_message() {
        let one = render(1);
        let two = render(2);
        assert!(one.starts_with(b"\x89PNG\r\n\x1a\n"));
        assert_ne!(one, two);
        assert_eq!(one, render(1), "the same id gives the same picture");
        let decoder = png::Decoder::new(std::io::Cursor::new(one));
        let reader = decoder.read_info().expect("decodes");
        assert_eq!(reader.info().width, SIZE);
    }
}
