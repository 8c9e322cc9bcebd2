//! Server-sent events: turns a byte stream, cut anywhere (mid-line, mid-character), into the
//! `data` of each event.

/// Decodes events incrementally. Feed it bytes as they arrive; it yields each complete event's
/// data (multi-line data joined with `\n`).
#[derive(Debug, Default)]
pub(crate) struct SseDecoder {
    /// The current line, kept as bytes until its end so a character split across two reads is
    /// decoded whole.
    line: Vec<u8>,
    data: String,
    has_data: bool,
}

impl SseDecoder {
    pub(crate) fn feed(&mut self, bytes: &[u8], events: &mut Vec<String>) {
        let mut rest = bytes;
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            self.line.extend_from_slice(&rest[..end]);
            self.end_line(events);
            rest = &rest[end + 1..];
        }
        self.line.extend_from_slice(rest);
    }

    /// The stream ended: an event without its closing blank line still counts.
    pub(crate) fn finish(&mut self, events: &mut Vec<String>) {
        if !self.line.is_empty() {
            self.end_line(events);
        }
        self.dispatch(events);
    }

    fn end_line(&mut self, events: &mut Vec<String>) {
        let mut line = std::mem::take(&mut self.line);
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.is_empty() {
            self.dispatch(events);
            return;
        }
        if line[0] == b':' {
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (&line[..], &[][..]),
        };
        if field == b"data" {
            if self.has_data {
                self.data.push('\n');
            }
            self.data.push_str(&String::from_utf8_lossy(value));
            self.has_data = true;
        }
    }

    fn dispatch(&mut self, events: &mut Vec<String>) {
        if self.has_data {
            events.push(std::mem::take(&mut self.data));
            self.has_data = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_in_pieces(stream: &[u8], piece: usize) -> Vec<String> {
        let mut decoder = SseDecoder::default();
        let mut events = Vec::new();
        for chunk in stream.chunks(piece) {
            decoder.feed(chunk, &mut events);
        }
        decoder.finish(&mut events);
        events
    }

    #[test]
    fn events_survive_any_split_of_the_stream() {
        let stream = "data: {\"a\":\"こんにちは\"}\r\n\r\n: keep-alive\n\nevent: x\ndata: line1\ndata: line2\n\ndata: [DONE]\n\n".as_bytes();
        let expected = vec![
            "{\"a\":\"こんにちは\"}".to_owned(),
            "line1\nline2".to_owned(),
            "[DONE]".to_owned(),
        ];
        for piece in 1..stream.len() {
            assert_eq!(
                decode_in_pieces(stream, piece),
                expected,
                "pieces of {piece} bytes"
            );
        }
    }

    #[test]
    fn a_last_event_without_its_blank_line_is_kept() {
        assert_eq!(decode_in_pieces(b"data: tail", 3), vec!["tail".to_owned()]);
    }
}
