//! Pieces of a request's URL that kaiwa reads itself: a query parameter and a path segment,
//! with their `%XX` escapes undone.

/// What a `+` means where it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Plus {
    /// A space, as HTML forms encode one in a query.
    Space,
    /// Itself: in a path, and in values that never hold a space (a timezone such as
    /// `Etc/GMT+5`, which a hand-written URL does not escape).
    Literal,
}

/// The first value of `name` in `query`, unescaped; `None` when it is not there.
pub(crate) fn query_param(query: &str, name: &str, plus: Plus) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key == name).then(|| unescape(value, plus))
    })
}

/// Undoes `%XX` escapes. Bytes that are not UTF-8 become U+FFFD, which no id, token or
/// timezone holds, so they are refused by whoever reads the value.
pub(crate) fn unescape(text: &str, plus: Plus) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let escaped = (bytes[at] == b'%')
            .then(|| bytes.get(at + 1..at + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                at += 3;
            }
            None => {
                out.push(match (bytes[at], plus) {
                    (b'+', Plus::Space) => b' ',
                    (byte, _) => byte,
                });
                at += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_are_undone_and_a_plus_means_what_its_place_says() {
        assert_eq!(
            query_param("a=1&timezone=Etc/GMT+5", "timezone", Plus::Literal).as_deref(),
            Some("Etc/GMT+5")
        );
        assert_eq!(
            query_param("timezone=Asia%2FTokyo", "timezone", Plus::Literal).as_deref(),
            Some("Asia/Tokyo")
        );
        assert_eq!(unescape("a+b", Plus::Space), "a b");
        assert_eq!(unescape("alice%40home", Plus::Literal), "alice@home");
        assert_eq!(unescape("100%", Plus::Literal), "100%", "a lone % stays");
        assert_eq!(unescape("%FF", Plus::Literal), "\u{FFFD}");
        assert_eq!(query_param("token=x", "timezone", Plus::Literal), None);
    }
}
